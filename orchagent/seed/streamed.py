"""Streamed seeds: a backup tool's output sent while the tool produces it (hot seeds).

A hot seed from a running server need not wait for a whole backup before sending a byte:
the source runs ``mariabackup --backup --stream=xbstream`` (or xtrabackup), sends its
standard output as it comes, and the target extracts it (``mbstream -x``) into the
seed's staging directory at the same time; then the target prepares the extracted backup
there, gives it the datadir's owner, syncs it and moves it into the datadir exactly like
every seed (:class:`~orchagent.seed.staging.Staging`).  Backup, transfer and extraction
overlap, as in ``mariabackup --stream | nc`` / ``nc -l | mbstream -x``, with the seed's
authentication and verification on.

The wire is the seed engine's: the same handshake (:mod:`orchagent.seed.auth`, role
``stream``), the same frames (:mod:`orchagent.seed.frames`), on one connection::

    sender   MANIFEST_END {"stream": "xbstream", "tool", "version", "estimate", and
                          of a replica "master": {"host", "port", "user"}}
    receiver READY                      extraction started, tools and space checked
    sender   DATA ...                   file 0, offset = position in the stream; each
                                        chunk's BLAKE3 digest bound to the keyed tag
    sender   FINISH {"bytes", "digest"} the tool exited 0; the stream digest
    receiver RESULT {"ok": true}        extracted, prepared, owned, synced, in place
    either   ABORT / RESULT ok=false    with a message naming the step that failed

The stream digest is BLAKE3 over every chunk's offset, length and BLAKE3 digest, in
order: it commits to every byte of the stream (each chunk's digest does to its bytes)
without a second hash pass over the data on either side.

Chunks must arrive in order (their offsets follow each other); a chunk that fails
verification, a gap, a short or different stream (FINISH's length and digest), a tool
exiting non-zero or a lost connection fail the seed on both sides: the target's datadir
is untouched, staging and the tools' processes go away.  Nothing is resent: a stream
cannot be rewound, and the backup it came from no longer exists.  A new seed takes a
new backup (see README, "Hot seeds", for what resumes).

Data path and backpressure: the tool writes into a pipe (1 MiB) that a worker thread
reads in chunks of :data:`CHUNK` bytes, hashes and frames, one read at a time and at
most :data:`AHEAD` framed chunks waiting for the socket; when the socket's buffer is
full the transport pauses us, no read is started, the pipe fills and the tool blocks in
its write.  On the target each stream's batch of frames is verified and written into
the extractor's pipe by a worker thread, one batch after the other; above
:data:`WINDOW` bytes queued the socket is not read, so TCP pushes back on the source.
(Reading the tool's output through the reactor's process pipes costs 8 KiB reads: for
700 MB, 0.43 s of the reactor's CPU against 0.08 s for 1 MiB reads in a thread.)
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import struct
from collections import deque
from typing import TYPE_CHECKING

import blake3
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.python.failure import Failure

from orchagent.errors import AgentError, BadRequest, StepFailed
from orchagent.host.diskusage import free_bytes
from orchagent.process import CommandGroup
from orchagent.replica.control import ThisServersMaster
from orchagent.seed import frames, plan, state, tree
from orchagent.seed.auth import Rejected
from orchagent.seed.frames import FrameType, ProtocolError
from orchagent.seed.receiver import ReceiveJob
from orchagent.seed.sender import SenderStream, receiver_endpoint, tell_abort

if TYPE_CHECKING:
    from orchagent.seed.context import SeedContext

log = Logger()

ROLE = "stream"
FORMAT = "xbstream"
#: Bytes of the tool's output per DATA frame.
CHUNK = 1 << 20
#: Framed chunks that may wait for the socket (the read in flight not counted).
AHEAD = 2
#: The pipes between the tools and us (F_SETPIPE_SZ; Linux allows 1 MiB unprivileged).
PIPE_SIZE = 1 << 20
#: Bytes a receiving stream may have queued for the extractor before it stops reading.
WINDOW = 8 << 20
#: Bytes extracted between two write-back passes over staging (see _Writeback): with 32
#: or 64 MiB a 673 MB seed took 1.0-1.3 s, with 128 or 256 MiB 1.0-1.9 s.
WRITEBACK = 32 << 20
#: Seconds a blocked read of the tool's output waits before checking for an abort.
POLL_SECONDS = 0.2
#: The stream extractor of each backup tool.
EXTRACTORS = {"mariabackup": "mbstream", "xtrabackup": "xbstream"}
_F_SETPIPE_SZ = 1031
#: sync_file_range: SYNC_FILE_RANGE_WAIT_BEFORE | _WRITE | _WAIT_AFTER.
_SYNC_WHOLE = 7
_libc = ctypes.CDLL(None, use_errno=True)
#: What the stream digest hashes per chunk, in order: offset, length, the chunk's BLAKE3.
STREAM_RECORD = struct.Struct(">QI32s")


#: How the tools of a streamed seed run: as long as they take (an abort stops them), as
#: root (they read or write the datadir's files), their exit status read here.
_TOOL = {"timeout": 0, "check": False, "privileged": True}


def _pipe() -> tuple[int, int]:
    """A pipe (both ends close-on-exec) enlarged to PIPE_SIZE where the kernel lets us."""
    read_end, write_end = os.pipe()
    try:
        fcntl.fcntl(write_end, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass
    return read_end, write_end


class _Stopwatch:
    """Seconds each step took, for the log: ``took("step")`` after each one."""

    def __init__(self, clock):
        self.clock = clock
        self.last = clock.seconds()
        self.steps: list[str] = []

    def __call__(self, step: str) -> None:
        now = self.clock.seconds()
        self.steps.append(f"{step} {now - self.last:.2f}s")
        self.last = now

    def __str__(self) -> str:
        return ", ".join(self.steps)


# --- the source -------------------------------------------------------------------------------


class _PipeReader:
    """The tool's standard output, read in a worker thread (see the module docstring)."""

    def __init__(self, fd: int, key: bytes = frames.ZERO_KEY):
        self.fd = fd
        #: The stream key, once the handshake made it.
        self.key = key
        self.hasher = blake3.blake3()
        self.position = 0
        self.stopping = False

    def read(self) -> tuple[list, int] | None:
        """Worker thread: the next chunk framed as a DATA frame's pieces and its length,
        None at the end of the output (or when stopping)."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        pieces: list[bytes] = []
        have = 0
        while have < CHUNK and not self.stopping:
            if not poller.poll(POLL_SECONDS * 1000):
                continue
            data = os.read(self.fd, CHUNK - have)
            if not data:
                break
            pieces.append(data)
            have += len(data)
        if not have or self.stopping:
            return None
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        framed, digest, _compressed = frames.seal_chunk(0, self.position, data, self.key, False,
                                                        kind=frames.Digest.BLAKE3)
        self.hasher.update(STREAM_RECORD.pack(self.position, have, digest))
        self.position += have
        return framed, have


class StreamSendJob(state.JobIdentity):
    """The source of a streamed seed: runs ``command``, sends its output (see the module
    docstring).  ``announce`` (tool, version, estimate) goes to the target first."""

    def __init__(self, context: "SeedContext", record: state.SeedRecord, auth_key: bytes | None,
                 host: str, port: int, command: list[str], what: str, announce: dict,
                 cwd: str | None = None):
        self.context = context
        self.record = record
        self.auth_key = auth_key
        self.host = host
        self.port = port
        self.command = command
        self.what = what
        self.announce = dict(announce, stream=FORMAT)
        self.cwd = cwd
        self.session = os.urandom(8).hex()
        self.children = CommandGroup(context.runner)
        self.stream: SenderStream | None = None
        self.reader: _PipeReader | None = None
        self.ready = False
        self.reading = False
        self.eof = False
        self.waiting: deque = deque()
        self.tool_result = None
        self.finishing = False
        self.timer = None
        self.bucket = state.TokenBucket(context.clock, record.rate_limit)
        self.meter = state.RateMeter(context.clock)
        self.done = defer.Deferred()

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the tool and connect at once: the tool's start-up (connecting to the
        server, starting its redo log copy) hides the handshake and the target's checks.
        Its output waits in the pipe (the tool blocks when it is full) until READY."""
        self.record.state = state.RUNNING
        self.context.touch(self.record, force=True)
        read_end, write_end = _pipe()
        self.reader = _PipeReader(read_end)
        try:
            tool = self.children.run(self.command, stdout_fd=write_end, cwd=self.cwd, **_TOOL)
        except OSError as e:
            self.fail(f"hot seed {self.seed_id}: step backup failed: cannot start {self.what}: {e}",
                      tell=False)
            return
        finally:
            os.close(write_end)
        tool.addBoth(self._tool_ended)
        defer.ensureDeferred(self._connect()).addErrback(self._crashed)

    async def _connect(self) -> None:
        endpoint = receiver_endpoint(self.context, self.host, self.port)
        stream = self.stream = SenderStream(self, ROLE, 0)
        stream.connecting = endpoints.connectProtocol(endpoint, stream)
        try:
            await stream.connecting
            await stream.accepted
        except Exception as e:
            if self.active:
                self.fail(f"cannot connect to {self.host}:{self.port}: {e}", tell=False)
            return
        if not self.active:
            return
        stream.transport.write(frames.seal_json(FrameType.MANIFEST_END, self.announce, stream.key))

    def _ready(self) -> None:
        """The target extracts: send the tool's output."""
        if self.ready or not self.active:
            return
        self.ready = True
        self.reader.key = self.stream.key
        log.info("seed {seed}: the target is ready; streaming {what} to {target}",
                 seed=self.seed_id, what=self.what, target=self.record.target)
        self.pump(self.stream)

    def _tool_ended(self, result) -> None:
        if isinstance(result, Failure) and result.check(defer.CancelledError):
            return  # stopped by fail()
        if isinstance(result, Failure):
            if self.active:
                self.fail(f"hot seed {self.seed_id}: step backup failed: {self.what} could not "
                          f"run: {result.getErrorMessage()}")
            return
        self.tool_result = result
        self._maybe_finish()

    def _crashed(self, failure) -> None:
        if self.active:
            log.failure("seed {seed}: streaming crashed", failure, seed=self.seed_id)
            self.fail(f"streaming failed: {failure.getErrorMessage()}")

    # --- the stream (SenderStream calls these) ---------------------------------------------

    def pump(self, stream: SenderStream) -> None:
        """Start reading the next chunk when the socket may take more."""
        if (not self.active or not self.ready or self.reading or self.eof
                or stream is not self.stream or stream.closed or len(self.waiting) >= AHEAD):
            return
        delay = self.bucket.delay()
        if delay > 0:
            if self.timer is None or not self.timer.active():
                self.timer = self.context.clock.callLater(delay, self.pump, stream)
            return
        self.bucket.take(CHUNK)
        self.reading = True
        self.context.thread(self.reader.read).addBoth(self._read_done)

    def _read_done(self, result) -> None:
        self.reading = False
        if not self.active:
            self._close_reader()
            return
        if isinstance(result, Failure):
            self.fail(f"reading the output of {self.what} failed: {result.getErrorMessage()}")
            self._close_reader()
            return
        if result is None:
            self.eof = True
            self._close_reader()
            self._maybe_finish()
            return
        self.waiting.append(result)
        self.flush(self.stream)
        self.pump(self.stream)

    def flush(self, stream: SenderStream) -> None:
        while self.waiting and stream is self.stream and not stream.paused and not stream.closed:
            pieces, length = self.waiting.popleft()
            stream.transport.writeSequence(pieces)
            self.record.bytes_done += length
        record = self.record
        record.bytes_total = max(record.bytes_total, record.bytes_done)
        self._maybe_finish()

    def frame(self, stream: SenderStream, frame: frames.Frame) -> None:
        if frame.type == FrameType.READY:
            frames.open_control(frame, stream.key)
            self._ready()
        elif frame.type == FrameType.RESULT:
            result = frames.open_json(frame, stream.key)
            if result.get("ok") is True and self.finishing:
                self._succeeded()
            else:
                final = state.ABORTED if result.get("state") == state.ABORTED else state.FAILED
                self.fail(f"the receiver reports: {result.get('message', 'failed')}", final, tell=False)
        else:
            raise ProtocolError(f"unexpected frame type {frame.type} from the receiver")

    def rejected(self, stream: SenderStream, message: str) -> None:
        self.fail(f"the receiver refused the seed: {message}", tell=False)

    def broken(self, stream: SenderStream, message: str) -> None:
        stream.close(abort=True)
        self.fail(message, tell=False)

    def stream_lost(self, stream: SenderStream, reason) -> None:
        if self.active and stream is self.stream:
            self.fail(f"the connection to {self.host}:{self.port} was lost "
                      f"({reason.getErrorMessage()}); a streamed hot seed cannot resume: "
                      "start the seed again", tell=False)

    # --- the end -------------------------------------------------------------------------

    def _maybe_finish(self) -> None:
        """After the tool's output ended and the tool exited: FINISH, or fail."""
        if (self.finishing or not self.active or not self.eof or self.waiting
                or self.tool_result is None):
            return
        result = self.tool_result
        if not result.ok:
            self.fail(f"hot seed {self.seed_id}: step backup failed: {result.tool_failure(self.what)}")
            return
        self.finishing = True
        stream = self.stream
        self.record.bytes_total = self.record.bytes_done
        self.record.state = state.VERIFYING
        stream.transport.write(frames.seal_json(FrameType.FINISH, {
            "bytes": self.reader.position, "digest": self.reader.hasher.hexdigest()}, stream.key))
        self.context.touch(self.record, force=True)
        log.info("seed {seed}: {what} done, {bytes} bytes sent; the target prepares them",
                 seed=self.seed_id, what=self.what, bytes=self.reader.position)

    def _succeeded(self) -> None:
        self.record.state = state.COMPLETED
        log.info("seed {seed}: {target} confirmed the hot backup prepared and in place",
                 seed=self.seed_id, target=self.record.target)
        self._close()
        self.context.touch(self.record, force=True)
        self._settle()

    def fail(self, message: str, final_state: str = state.FAILED, tell: bool = True) -> defer.Deferred:
        """Stop the tool (its process group), tell the target unless it told us, end."""
        if not self.active:
            return defer.succeed(None)
        self.end_record(message, final_state, log)
        if tell:
            tell_abort(self.stream, {"message": message, "state": final_state})
        self.children.cancel()
        if self.reader is not None:
            self.reader.stopping = True
        self._close()
        self.context.touch(self.record, force=True)
        self._settle()
        return defer.ensureDeferred(self.children.ended())

    def _close(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.waiting.clear()
        if self.stream is not None:
            self.stream.close()

    def _close_reader(self) -> None:
        if self.reader is not None and self.reader.fd >= 0 and not self.reading:
            os.close(self.reader.fd)
            self.reader.fd = -1

    def _settle(self) -> None:
        if not self.reading:
            self._close_reader()
        super()._settle()

    async def stop(self) -> None:
        """Service stop: a stream cannot resume, so the seed fails (the tool is stopped)."""
        await self.fail("the agent stopped while the hot backup was streaming; a streamed hot "
                        "seed cannot resume: start the seed again")


# --- the target -------------------------------------------------------------------------------


def _verify_and_write(chunks: list, fd: int, hasher) -> int:
    """Worker thread: check each chunk against its digest, add it to the stream digest,
    write it to the extractor (in order: the caller runs one batch at a time).  An
    IntegrityError, or an OSError (EPIPE: the extractor stopped reading), propagates."""
    total = 0
    for chunk in chunks:
        parts = frames.unpack_chunk(chunk)
        hasher.update(STREAM_RECORD.pack(chunk.offset, chunk.length, chunk.digest))
        _write_all(fd, parts)
        total += chunk.length
    return total


def _write_all(fd: int, parts: list) -> None:
    pending = [memoryview(p) for p in parts if len(p)]
    while pending:
        written = os.writev(fd, pending[:64])
        while written:
            if written >= len(pending[0]):
                written -= len(pending[0])
                pending.pop(0)
            else:
                pending[0] = pending[0][written:]
                written = 0


class _Writeback:
    """What the extractor wrote so far, written back and out of the page cache while the
    stream goes on (worker thread, one pass at a time).

    ``mbstream`` writes through the page cache.  Left alone, a seed would fill it with
    the whole backup (evicting the host's cached data) and leave it all to write back at
    the end (the final syncfs took 0.3 s for 660 MB); worse, on a VM whose host reclaims
    the guest's free memory (this one: Firecracker, DAMON reclaim), every page of a
    backup-sized page cache is a fresh page the host must provide, which made extraction
    take 0.2 to 2 s for the same 660 MB.  A pass writes back every file that grew since
    the last pass (``sync_file_range``, waiting: that file's data only, where syncfs
    would flush the whole file system) and drops its pages (``POSIX_FADV_DONTNEED``,
    which never drops dirty data): the extractor's next writes reuse the same few pages.
    Durability is still the final syncfs's (Staging.finalize).  Measured on 673 MB (stream, extraction, prepare, sync):
    0.9-1.3 s instead of 1.5-1.9 s (see BENCHMARKS.md, "Hot seed")."""

    def __init__(self, root: str):
        self.root = root
        self.sizes: dict[str, int] = {}

    def run(self) -> None:
        try:
            for path, size in _file_sizes(self.root):
                if self.sizes.get(path) != size:
                    self.sizes[path] = size
                    _write_back(path)
        except OSError:
            pass  # staging went away (a failed seed); the final syncfs reports real errors

    @property
    def interval(self) -> int:
        """Bytes between passes: a pass stats every file, so a tree of many files gets
        fewer passes (16 KiB per file: 50,000 files, a pass per 800 MB)."""
        return max(WRITEBACK, len(self.sizes) * 16 << 10)


def _file_sizes(root: str):
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    yield entry.path, entry.stat(follow_symlinks=False).st_size


def _write_back(path: str) -> None:
    """Write the file's dirty pages and wait for them (its data only: no journal commit,
    nothing of other files), then drop its clean pages from the page cache."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if _libc.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), _SYNC_WHOLE) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class StreamReceiveJob(ReceiveJob):
    """The target of a streamed seed: takes over the seed's receive job when the sender's
    stream says it is one (see the module docstring).  Everything a receive job shows the
    manager (record, key, staging, status, abort, cleanup) stays the same."""

    @classmethod
    def take_over(cls, job: ReceiveJob) -> "StreamReceiveJob":
        if isinstance(job, cls):
            return job
        if not job.active:
            raise Rejected(f"seed {job.seed_id} is {job.record.state} on this host")
        if job.session or job.streams:
            raise Rejected(f"seed {job.seed_id} is already being received as a tree")
        return cls(job.context, job.record, job.auth_key)

    def __init__(self, context: "SeedContext", record: state.SeedRecord, auth_key: bytes | None):
        super().__init__(context, record, auth_key)
        self.children = CommandGroup(context.runner)
        self.stream = None
        self.tool = ""
        self.extractor: defer.Deferred | None = None
        self.pipe = -1
        self.received = 0
        self.written = 0
        self.hasher = blake3.blake3()
        self.pending: list = []
        self.writing = False
        self.writeback = _Writeback(self.staging.root)
        self.synced = 0
        self.syncing = False
        #: The master the source's server replicates from, as its sender announced it
        #: (a replica's hot backup names none): read by orchagent.replica.seeded.
        self.source_master = None

    @property
    def tools(self):
        if self.context.hot is not None:
            return self.context.hot.tools
        from orchagent.backups.tools import Tools

        return Tools(self.context.config, self.context.runner)

    # --- the stream ----------------------------------------------------------------------

    def attach(self, stream, hello: dict) -> None:
        if hello["role"] != ROLE:
            raise Rejected(f"seed {self.seed_id} is being received as a stream")
        if not self.active:
            raise Rejected(f"seed {self.seed_id} is {self.record.state} on this host")
        if self.stream is not None:
            raise Rejected(f"seed {self.seed_id} already has its stream; a streamed seed "
                           "cannot resume")
        self._note_unauthenticated(stream)
        self.stream = self.control = stream
        self.source_address = stream.peer
        self.streams.add(stream)
        self.sessions += 1
        self.record.state = state.RUNNING
        self.record.source = "hot"
        self.context.touch(self.record, force=True)

    def stream_lost(self, stream) -> None:
        self.streams.discard(stream)
        if stream is self.stream and self.active and not self.record.promoting:
            self.fail(f"the connection from the sender {stream.peer} was lost; a streamed hot "
                      "seed cannot resume: start the seed again")

    def frame(self, stream, frame: frames.Frame) -> None:
        if stream is not self.stream or not self.active:
            return
        if frame.type == FrameType.DATA:
            self._data(stream, frame)
        elif frame.type == FrameType.MANIFEST_END and not self.tool:
            announce = frames.open_json(frame, stream.key)
            defer.ensureDeferred(self._start(announce)).addErrback(self._step_failed, "start")
        elif frame.type == FrameType.FINISH and self.extractor is not None and self.finish is None:
            self.finish = frames.open_json(frame, stream.key)
            self.flush(stream)  # the chunks cut from the same read come first
        elif frame.type == FrameType.ABORT:
            body = frames.open_json(frame, stream.key)
            final = state.FAILED if body.get("state") == state.FAILED else state.ABORTED
            self.context.clock.callLater(0, self.fail, f"the sender stopped the seed: "
                                           f"{body.get('message', '')}", final)
        else:
            raise ProtocolError(f"unexpected frame type {frame.type} on a seed stream")

    async def _start(self, announce: dict) -> None:
        """Check what the sender announces against this host, then start extracting."""
        tool, version = str(announce.get("tool", "")), str(announce.get("version", ""))
        estimate = announce.get("estimate")
        if announce.get("stream") != FORMAT or tool not in EXTRACTORS or not isinstance(estimate, int):
            raise BadRequest(f"the sender announced a stream this host cannot take: {announce!r:.200}")
        self.tool = tool
        self.source_master = ThisServersMaster.from_announce(announce.get("master"))
        tools = self.tools
        for needed in (EXTRACTORS[tool], tool):
            if not tools.installed(needed):
                raise BadRequest(f"{needed} is not installed on this host: it is needed to extract "
                                 "and prepare a hot seed")
        mine = await tools.version(tool)
        if version and mine and version != mine:
            raise BadRequest(f"the backup is made by {tool} {version} and this host has {tool} "
                             f"{mine}: --prepare needs the version that made the backup")
        where = os.path.dirname(self.staging.root)
        free = await self.context.thread(free_bytes, where)
        if estimate > free:
            raise BadRequest(f"not enough space for seed {self.seed_id} in {self.record.datadir}: "
                             f"the source's datadir holds {estimate} bytes, {free} bytes are free")
        await self.context.thread(self.staging.discard)
        await self.context.thread(os.makedirs, self.staging.root, 0o700)
        if not self.active:
            return
        read_end, self.pipe = _pipe()
        try:
            self.extractor = self.children.run([EXTRACTORS[tool], "-x", "-C", self.staging.root],
                                               stdin_fd=read_end, **_TOOL)
        finally:
            os.close(read_end)
        self.extractor.addBoth(self._extractor_ended)
        self.record.bytes_total, self.record.totals = estimate, state.ESTIMATE
        self.context.touch(self.record)
        self.stream.send_frame(frames.seal(FrameType.READY, b"", self.stream.key))
        log.info("seed {seed}: extracting a {tool} {version} stream (about {estimate} bytes) into "
                 "{staging}", seed=self.seed_id, tool=tool, version=version, estimate=estimate,
                 staging=self.staging.root)

    def _data(self, stream, frame: frames.Frame) -> None:
        if self.extractor is None or self.finish is not None:
            raise ProtocolError("DATA before READY or after FINISH")
        try:
            chunk = frames.open_data(frame, stream.key, frames.Digest.BLAKE3)
        except frames.IntegrityError as e:
            self._corrupt(e)
            return
        if chunk.file != 0 or chunk.offset != self.received:
            self._corrupt(f"a chunk for offset {chunk.offset} came where {self.received} was due")
            return
        self.received += chunk.length
        stream.batch.append(chunk)
        stream.queued += frame.size

    def _corrupt(self, error) -> None:
        self.fail(f"hot seed {self.seed_id}: step receive failed: the stream failed verification "
                  f"near offset {self.written} ({error}); a streamed seed cannot be resent: "
                  "start the seed again")

    def flush(self, stream) -> None:
        batch, stream.batch = stream.batch, []
        self.pending.extend(batch)
        if stream.queued > WINDOW:
            stream.pause()
        self._write_next()
        self._maybe_finish()

    def _write_next(self) -> None:
        if self.writing or not self.pending or not self.active:
            return
        batch, self.pending = self.pending, []
        self.writing = True
        d = self.context.thread(_verify_and_write, batch, self.pipe, self.hasher)
        self.inflight.add(d)
        d.addBoth(self._written, batch, d)

    def _written(self, result, batch: list, d) -> None:
        self.inflight.discard(d)
        self.writing = False
        stream = self.stream
        stream.queued -= sum(chunk.size for chunk in batch)
        if stream.queued <= WINDOW // 2:
            stream.unpause()
        if not self.active:
            return
        if isinstance(result, Failure):
            if result.check(frames.IntegrityError):
                self._corrupt(result.value)
            elif result.check(OSError) and result.value.errno == errno.EPIPE:
                pass  # the extractor ended: _extractor_ended says how
            else:
                self.fail(f"hot seed {self.seed_id}: step extract failed: cannot write to "
                          f"{EXTRACTORS[self.tool]}: {result.getErrorMessage()}")
            return
        self.written += result
        self.record.bytes_done = self.written
        self.record.bytes_total = max(self.record.bytes_total, self.written)
        if self.written - self.synced >= self.writeback.interval:
            self._writeback()
        self._write_next()
        self._maybe_finish()

    def _writeback(self) -> None:
        """A :class:`_Writeback` pass, unless one runs."""
        if self.syncing:
            return
        self.syncing, self.synced = True, self.written

        def synced(_):
            self.syncing = False
            self.inflight.discard(d)

        d = self.context.thread(self.writeback.run)
        self.inflight.add(d)
        d.addBoth(synced)

    def _extractor_ended(self, result):
        """The extractor must not end before we closed its input (the end of the stream)."""
        stopped = isinstance(result, Failure) and result.check(defer.CancelledError)
        if self.active and self.pipe >= 0 and not stopped:
            why = result.tool_failure() if not isinstance(result, Failure) else result.getErrorMessage()
            self.fail(f"hot seed {self.seed_id}: step extract failed: {EXTRACTORS[self.tool]} -x "
                      f"stopped before the end of the stream: it {why}")
        return None if isinstance(result, Failure) else result

    # --- the end -------------------------------------------------------------------------

    def _maybe_finish(self) -> None:
        if self.finish is None or self.finalizing or self.writing or self.pending:
            return
        self.finalizing = True
        defer.ensureDeferred(self._finalize()).addErrback(self._step_failed, "finish")

    async def _finalize(self) -> None:
        record, root = self.record, self.staging.root
        record.state = state.VERIFYING
        self.context.touch(record)
        if (self.finish.get("bytes") != self.written
                or self.finish.get("digest") != self.hasher.hexdigest()):
            raise StepFailed(f"hot seed {self.seed_id}: step verify failed: the stream received "
                             f"({self.written} bytes) does not match the sender's digest of "
                             f"{self.finish.get('bytes')} bytes")
        self._close_pipe()
        self.steps += 1
        took = _Stopwatch(self.context.clock)
        await self._step("extract", self.extractor, f"{EXTRACTORS[self.tool]} -x")
        took("extract")
        self.steps += 1
        await self._step("prepare", self.children.run(
            [self.tool, *self.tools.prepare_defaults(root), "--prepare", f"--target-dir={root}"],
            **_TOOL), f"{self.tool} --prepare")
        took("prepare")
        self.steps += 1
        await self._own(root)
        took("own")
        self.steps += 1
        manifest = await self.context.thread(tree.walk, root)
        table = plan.ChunkTable(manifest)
        record.bytes_total, record.files_total = self.written, manifest.file_count
        record.files_done, record.totals = record.files_total, state.FINAL
        await self.context.thread(self.staging.finalize, manifest, table)
        self.steps += 1
        took("sync")
        try:
            if not await self.check_start():
                return
        except BadRequest as e:
            raise StepFailed(f"hot seed {self.seed_id}: step check failed: {e.message}") from None
        self.steps += 1
        took("check")
        if not await self.promote():
            return
        took("move")
        log.info("seed {seed}: received {bytes} bytes of a {tool} stream, prepared and moved "
                 "{files} files into {datadir} (after the stream: {steps})", seed=self.seed_id,
                 bytes=self.written, tool=self.tool, files=record.files_total,
                 datadir=record.datadir, steps=took)
        await self.completed()

    async def _step(self, step: str, running: defer.Deferred, what: str) -> None:
        result = await running
        if result is None:
            raise defer.CancelledError()  # stopped by fail()
        if not result.ok and self.active:
            raise StepFailed(f"hot seed {self.seed_id}: step {step} failed: {result.tool_failure(what)}")

    async def _own(self, root: str) -> None:
        """The datadir's owner for the prepared files: mysqld must open them."""
        if os.geteuid() != 0 and not self.context.config.exec_with_sudo:
            return
        result = await self.children.run(["chown", "-R", f"--reference={self.record.datadir}",
                                          "--", root], **_TOOL)
        if not result.ok and self.active:
            raise StepFailed(f"hot seed {self.seed_id}: step own failed: {result.tool_failure('chown')}")

    def _step_failed(self, failure, step: str) -> None:
        self.finalizing = False
        if not self.active or failure.check(defer.CancelledError):
            return
        if failure.check(AgentError):
            message = failure.value.message
        else:
            log.failure("seed {seed}: streamed seed failed", failure, seed=self.seed_id)
            message = f"{type(failure.value).__name__}: {failure.getErrorMessage()}"
        if not message.startswith(f"hot seed {self.seed_id}: step"):
            message = f"hot seed {self.seed_id}: step {step} failed: {message}"
        self.fail(message)

    def fail(self, message: str, final_state: str = state.FAILED) -> defer.Deferred:
        """Stop the extractor and prepare (their process groups), then as every receive
        job: tell the sender, remove staging; the datadir is untouched."""
        if not self.active:
            return defer.succeed(None)
        ended = super().fail(message, final_state)
        self.children.cancel()
        return ended

    async def drain(self) -> None:
        await super().drain()
        self._close_pipe()
        await self.children.ended()

    def _close_pipe(self) -> None:
        if self.pipe >= 0 and not self.writing:
            os.close(self.pipe)
            self.pipe = -1

    async def stop(self) -> None:
        """Service stop: a stream cannot resume; unless the prepared seed is already being
        moved into place (a restart finishes that), the seed fails and staging goes."""
        if self.record.promoting:
            await super().stop()
            return
        await self.fail("the agent stopped while receiving a streamed hot seed; it cannot "
                        "resume: start the seed again")
        await self.done

    def set_rate_limit(self, rate: int) -> None:
        """The source's tool sets the pace; a limit applies where the stream is read."""
        self.bucket.set_rate(rate)

