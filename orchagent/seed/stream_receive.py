"""A hot seed's stream received: the payload of a streamed seed's receive job.

The sender's one stream (role ``stream``, see :mod:`orchagent.seed.streamed` for the
wire) carries a backup tool's output; it is verified chunk by chunk and written into
the extractor (``mbstream -x``) running into staging.  Once the tool's whole stream is
in, its digest checked and the extractor done, the backup is prepared in staging, given
the datadir's owner and synced, and the job (orchagent.seed.receiver) installs it.
Nothing is resent: a failure fails the seed on both sides.

Backpressure: each batch of frames is verified and written into the extractor's pipe by
a worker thread, one batch after the other; above :data:`WINDOW` bytes queued the
socket is not read, so TCP pushes back on the source.
"""

from __future__ import annotations

import ctypes
import errno
import os

import blake3
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from orchagent.errors import AgentError, BadRequest, StepFailed
from orchagent.host.diskusage import free_bytes
from orchagent.process import CommandGroup
from orchagent.replica.control import ThisServersMaster
from orchagent.seed import frames, plan, state, tree
from orchagent.seed.auth import Rejected
from orchagent.seed.frames import FrameType, ProtocolError
from orchagent.seed.streamed import FORMAT, ROLE, STREAM_RECORD, TOOL, pipe

log = Logger()

#: Bytes the stream may have queued for the extractor before it stops reading.
WINDOW = 8 << 20
#: Bytes extracted between two write-back passes over staging (see _Writeback): with 32
#: or 64 MiB a 673 MB seed took 1.0-1.3 s, with 128 or 256 MiB 1.0-1.9 s.
WRITEBACK = 32 << 20
#: The stream extractor of each backup tool.
EXTRACTORS = {"mariabackup": "mbstream", "xtrabackup": "xbstream"}
#: sync_file_range: SYNC_FILE_RANGE_WAIT_BEFORE | _WRITE | _WAIT_AFTER.
_SYNC_WHOLE = 7
_libc = ctypes.CDLL(None, use_errno=True)


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


class StreamReceive(state.ReceivePayload):
    RESUMES = False
    STOPPED = ("the agent stopped while receiving a streamed hot seed; it cannot resume: "
               "start the seed again")

    def __init__(self, job):
        super().__init__(job)
        self.children = CommandGroup(job.context.runner)
        self.stream = None
        #: DATA frames of the current read; bytes handed to the workers.
        self.batch: list = []
        self.queued = 0
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
        self.finish: dict | None = None

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
        if self.stream is not None:
            raise Rejected(f"seed {self.seed_id} already has its stream; a streamed seed "
                           "cannot resume")
        self.job.note_sender(stream)
        self.stream = stream
        self.record.state, self.record.source = state.RUNNING, "hot"
        self.context.touch(self.record, force=True)

    def stream_lost(self, stream) -> None:
        if stream is self.stream and self.job.active and not self.record.promoting:
            self.job.fail(f"the connection from the sender {stream.peer} was lost; a streamed hot "
                          "seed cannot resume: start the seed again")

    def tell(self, result: dict) -> None:
        if self.stream is not None:
            self.stream.last_word(FrameType.RESULT, result)

    def close_streams(self) -> None:
        if self.stream is not None:
            self.stream.close(abort=True)

    def arriving(self) -> int:
        return self.queued + self.stream.buffered if self.stream is not None else 0

    def rate_changed(self) -> None:
        pass  # the source's tool sets the pace; a limit applies where the stream is read

    def frame(self, stream, frame: frames.Frame) -> None:
        if stream is not self.stream or not self.job.active:
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
            self.context.clock.callLater(0, self.job.fail, f"the sender stopped the seed: "
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
        self.job.source_master = ThisServersMaster.from_announce(announce.get("master"))
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
        await self.context.thread(self.staging.make_empty)
        if not self.job.active:
            return
        read_end, self.pipe = pipe()
        try:
            self.extractor = self.children.run([EXTRACTORS[tool], "-x", "-C", self.staging.root],
                                               stdin_fd=read_end, **TOOL)
        finally:
            os.close(read_end)
        self.extractor.addBoth(self._extractor_ended)
        self.record.bytes_total, self.record.totals = estimate, state.ESTIMATE
        self.context.touch(self.record)
        self.stream.send(FrameType.READY, b"")
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
        self.batch.append(chunk)
        self.queued += frame.size

    def _corrupt(self, error) -> None:
        self.job.fail(f"hot seed {self.seed_id}: step receive failed: the stream failed verification "
                  f"near offset {self.written} ({error}); a streamed seed cannot be resent: "
                  "start the seed again")

    def flush(self, stream) -> None:
        batch, self.batch = self.batch, []
        self.pending.extend(batch)
        if self.queued > WINDOW:
            stream.pause("window")
        self._write_next()
        self._maybe_finish()

    def _write_next(self) -> None:
        if self.writing or not self.pending or not self.job.active:
            return
        batch, self.pending = self.pending, []
        self.writing = True
        d = self.context.thread(_verify_and_write, batch, self.pipe, self.hasher)
        state.tracked(d, self.inflight).addBoth(self._written, batch)

    def _written(self, result, batch: list) -> None:
        self.writing = False
        self.queued -= sum(chunk.size for chunk in batch)
        if self.queued <= WINDOW // 2:
            self.stream.resume("window")
        if not self.job.active:
            return
        if isinstance(result, Failure):
            if result.check(frames.IntegrityError):
                self._corrupt(result.value)
            elif result.check(OSError) and result.value.errno == errno.EPIPE:
                pass  # the extractor ended: _extractor_ended says how
            else:
                self.job.fail(f"hot seed {self.seed_id}: step extract failed: cannot write to "
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
        if not self.syncing:
            self.syncing, self.synced = True, self.written
            state.tracked(self.context.thread(self.writeback.run), self.inflight).addBoth(
                lambda _: setattr(self, "syncing", False))

    def _extractor_ended(self, result):
        """The extractor must not end before we closed its input (the end of the stream)."""
        stopped = isinstance(result, Failure) and result.check(defer.CancelledError)
        if self.job.active and self.pipe >= 0 and not stopped:
            why = result.tool_failure() if not isinstance(result, Failure) else result.getErrorMessage()
            self.job.fail(f"hot seed {self.seed_id}: step extract failed: {EXTRACTORS[self.tool]} -x "
                      f"stopped before the end of the stream: it {why}")
        return None if isinstance(result, Failure) else result

    # --- the end -------------------------------------------------------------------------

    def _maybe_finish(self) -> None:
        if self.finish is None or self.job.finalizing or self.writing or self.pending:
            return
        self.job.finalizing = True
        defer.ensureDeferred(self._finalize()).addErrback(self._step_failed, "finish")

    async def _finalize(self) -> None:
        job, record, root = self.job, self.record, self.staging.root
        record.state = state.VERIFYING
        self.context.touch(record)
        if (self.finish.get("bytes") != self.written
                or self.finish.get("digest") != self.hasher.hexdigest()):
            raise StepFailed(f"hot seed {self.seed_id}: step verify failed: the stream received "
                             f"({self.written} bytes) does not match the sender's digest of "
                             f"{self.finish.get('bytes')} bytes")
        self.let_go()
        job.steps += 1
        took = _Stopwatch(self.context.clock)
        await self._step("extract", self.extractor, f"{EXTRACTORS[self.tool]} -x")
        took("extract")
        job.steps += 1
        prepared = await self._step("prepare", self.children.run(
            [self.tool, *self.tools.prepare_defaults(root), "--prepare", f"--target-dir={root}"],
            **self._local()), f"{self.tool} --prepare")
        failed = f"hot seed {self.seed_id}: step prepare failed: {self.tool} --prepare exited 0, but"
        ignored = self.tools.ignored_failure(prepared.stdout + prepared.stderr)
        if ignored:  # --prepare exits 0 all the same (orchagent.backups.tools)
            raise StepFailed(f"{failed} {ignored}")
        problem = await self.context.thread(self.tools.unprepared, root, self.tool)
        if problem:
            raise StepFailed(f"{failed} {problem}: a write of it failed")
        damage = await self.tools.aria_damage(root, self.children.run, **self._local())
        if damage:  # a failed write of a table: exit 0 and no message (Tools.aria_damage)
            raise StepFailed(f"{failed} left an Aria table damaged: {damage}")
        took("prepare")
        job.steps += 1
        await self._own(root)
        took("own")
        job.steps += 1
        manifest = await self.context.thread(tree.walk, root)
        table = plan.ChunkTable(manifest)
        record.bytes_total, record.files_total = self.written, manifest.file_count
        record.files_done, record.totals = record.files_total, state.FINAL
        await self.context.thread(self.staging.finalize, manifest, table)
        job.steps += 1
        took("sync")
        try:
            if not await job.install():
                return
        except BadRequest as e:
            raise StepFailed(f"hot seed {self.seed_id}: step check failed: {e.message}") from None
        took("check and move")
        log.info("seed {seed}: received {bytes} bytes of a {tool} stream, prepared and moved "
                 "{files} files into {datadir} (after the stream: {steps})", seed=self.seed_id,
                 bytes=self.written, tool=self.tool, files=record.files_total,
                 datadir=record.datadir, steps=took)
        await job.completed()

    def _local(self) -> dict:
        """How the tools that work on the staged files alone run: as TOOL, stopped if
        they hang (ToolStallSeconds); not the extractor, which waits for the stream."""
        return dict(TOOL, stall=self.context.config.tool_stall_seconds)

    async def _step(self, step: str, running: defer.Deferred, what: str) -> None:
        result = await running
        if result is None:
            raise defer.CancelledError()  # stopped by fail()
        if not result.ok and self.job.active:
            raise StepFailed(f"hot seed {self.seed_id}: step {step} failed: {result.tool_failure(what)}")
        return result

    async def _own(self, root: str) -> None:
        """The datadir's owner for the prepared files: mysqld must open them."""
        if os.geteuid() == 0 or self.context.config.exec_with_sudo:
            await self._step("own", self.children.run(
                ["chown", "-R", f"--reference={self.record.datadir}", "--", root], **self._local()), "chown")

    def _step_failed(self, failure, step: str) -> None:
        self.job.finalizing = False
        if not self.job.active or failure.check(defer.CancelledError):
            return
        if failure.check(AgentError):
            message = failure.value.message
        else:
            log.failure("seed {seed}: streamed seed failed", failure, seed=self.seed_id)
            message = f"{type(failure.value).__name__}: {failure.getErrorMessage()}"
        if not message.startswith(f"hot seed {self.seed_id}: step"):
            message = f"hot seed {self.seed_id}: step {step} failed: {message}"
        self.job.fail(message)

    def cancel(self) -> None:
        """Stop the extractor and prepare (their process groups)."""
        self.children.cancel()

    async def drain(self) -> None:
        await super().drain()
        self.let_go()
        await self.children.ended()

    def let_go(self) -> None:
        if self.pipe >= 0 and not self.writing:
            os.close(self.pipe)
            self.pipe = -1


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
        while pending and written >= len(pending[0]):
            written -= len(pending.pop(0))
        if written:
            pending[0] = pending[0][written:]


class _Writeback:
    """What the extractor wrote so far, written back and out of the page cache while the
    stream goes on (worker thread, one pass at a time).

    ``mbstream`` writes through the page cache.  Left alone, a seed would fill it with
    the whole backup (evicting the host's cached data) and leave it all to write back at
    the end; worse, on a VM whose host reclaims the guest's free memory, every page of a
    backup-sized page cache is a fresh page the host must provide.  A pass writes back
    every file that grew since the last pass (``sync_file_range``, waiting: that file's
    data only, where syncfs would flush the whole file system) and drops its pages
    (``POSIX_FADV_DONTNEED``, which never drops dirty data): the extractor's next writes
    reuse the same few pages.  Durability is still the final syncfs's (Staging.finalize);
    the measures are in BENCHMARKS.md, "Hot seed"."""

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
