"""Streamed seeds: a backup tool's output sent while the tool produces it (hot seeds).
This module is the source's side; the target's is :mod:`orchagent.seed.stream_receive`.

The source sends the standard output of ``mariabackup --backup --stream=xbstream`` (or
xtrabackup) as it comes, and the target extracts it as it arrives, as ``mariabackup
--stream | nc`` / ``nc -l | mbstream -x`` would, with the seed's authentication and
verification on (what the target does then, and why: :mod:`orchagent.backups.hot`).

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
is untouched, staging and the tools' processes go away.  Nothing is resent (a stream
cannot be rewound): a new seed takes a new backup.

Data path and backpressure: the tool writes into a pipe (1 MiB) that a worker thread
reads in chunks of :data:`CHUNK` bytes (the reactor's process pipes read 8 KiB at a
time: 0.43 s of its CPU for 700 MB, against 0.08 s here), hashes and frames, one read at
a time and at most :data:`AHEAD` framed chunks waiting for the socket; when the socket's
buffer is full the transport pauses us, no read is started, the pipe fills and the tool
blocks in its write; the target stops reading the socket when the extractor falls
behind, so TCP pushes back on the source.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import struct
from collections import deque
from typing import TYPE_CHECKING

import blake3
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from orchagent.process import CommandGroup
from orchagent.seed import frames, state
from orchagent.seed.frames import FrameType, ProtocolError
from orchagent.seed.sender import SenderJob, SenderStream

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
#: Seconds a blocked read of the tool's output waits before checking for an abort.
POLL_SECONDS = 0.2
_F_SETPIPE_SZ = 1031
#: What the stream digest hashes per chunk, in order: offset, length, the chunk's BLAKE3.
STREAM_RECORD = struct.Struct(">QI32s")

#: How the tools of a streamed seed run: as long as they take (an abort stops them), as
#: root (they read or write the datadir's files), their exit status read here.
TOOL = {"timeout": 0, "check": False, "privileged": True}


def pipe() -> tuple[int, int]:
    """A pipe (both ends close-on-exec) enlarged to PIPE_SIZE where the kernel lets us."""
    read_end, write_end = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(write_end, _F_SETPIPE_SZ, PIPE_SIZE)
    return read_end, write_end


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


class StreamSendJob(SenderJob):
    """The source of a streamed seed: runs ``command``, sends its output (see the module
    docstring).  ``announce`` (tool, version, estimate) goes to the target first."""

    CONFIRMED = "the hot backup prepared"

    def __init__(self, context: "SeedContext", record: state.SeedRecord, auth_key: bytes | None,
                 host: str, port: int, command: list[str], what: str, announce: dict,
                 cwd: str | None = None):
        super().__init__(context, record, auth_key, host, port)
        self.command = command
        self.what = what
        self.announce = dict(announce, stream=FORMAT)
        self.cwd = cwd
        self.children = CommandGroup(context.runner)
        self.stream: SenderStream | None = None
        self.reader: _PipeReader | None = None
        self.ready = False
        self.reading = False
        self.eof = False
        self.waiting: deque = deque()
        self.tool_result = None
        self.finishing = False

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the tool and connect at once: the tool's start-up (connecting to the
        server, starting its redo log copy) hides the handshake and the target's checks.
        Its output waits in the pipe (the tool blocks when it is full) until READY."""
        self.record.state = state.RUNNING
        self.context.touch(self.record, force=True)
        read_end, write_end = pipe()
        self.reader = _PipeReader(read_end)
        try:
            tool = self.children.run(self.command, stdout_fd=write_end, cwd=self.cwd, **TOOL)
        except OSError as e:
            self.fail(f"hot seed {self.seed_id}: step backup failed: cannot start {self.what}: {e}",
                      tell=False)
            return
        finally:
            os.close(write_end)
        tool.addBoth(self._tool_ended)
        defer.ensureDeferred(self._connect()).addErrback(self._crashed)

    async def _connect(self) -> None:
        stream = self.stream = SenderStream(self, ROLE, 0, os.urandom(8).hex())
        try:
            await self._dial(stream)
            await stream.accepted
        except Exception as e:
            if self.active:
                self.fail(f"cannot connect to {self.host}:{self.port}: {e}", tell=False)
            return
        if not self.active:
            return
        stream.send(FrameType.MANIFEST_END, self.announce)

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
        if isinstance(result, Failure):
            if self.active and not result.check(defer.CancelledError):  # cancelled: by fail()
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
            stream.later(delay, self.pump, stream)
            return
        self.bucket.take(CHUNK)
        self.reading = True
        self.context.thread(self.reader.read).addBoth(self._read_done)

    def _read_done(self, result) -> None:
        self.reading = False
        if isinstance(result, Failure) and self.active:
            self.fail(f"reading the output of {self.what} failed: {result.getErrorMessage()}")
        if result is None or isinstance(result, Failure) or not self.active:
            self.eof = self.eof or result is None
            self._close_reader()
            self._maybe_finish()
            return
        self.waiting.append(result)
        self.flush(self.stream)
        self.pump(self.stream)

    def flush(self, stream: SenderStream) -> None:
        while self.waiting and stream is self.stream and not stream.blocked and not stream.closed:
            pieces, length = self.waiting.popleft()
            stream.write(pieces)
            self.record.bytes_done += length
        record = self.record
        record.bytes_total = max(record.bytes_total, record.bytes_done)
        self._maybe_finish()

    def frame(self, stream: SenderStream, frame: frames.Frame) -> None:
        if frame.type == FrameType.READY:
            frames.open_control(frame, stream.key)
            self._ready()
        elif frame.type == FrameType.RESULT:
            self._result(stream, frame, complete=self.finishing)
        else:
            raise ProtocolError(f"unexpected frame type {frame.type} from the receiver")

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
        stream.send(FrameType.FINISH, {"bytes": self.reader.position,
                                       "digest": self.reader.hasher.hexdigest()})
        self.context.touch(self.record, force=True)
        log.info("seed {seed}: {what} done, {bytes} bytes sent; the target prepares them",
                 seed=self.seed_id, what=self.what, bytes=self.reader.position)

    def fail(self, message: str, final_state: str = state.FAILED, tell: bool = True) -> defer.Deferred:
        """See :meth:`SenderJob.fail`; the tool is stopped (its process group), and the
        Deferred fires once it has exited."""
        super().fail(message, final_state, tell)
        return defer.ensureDeferred(self.children.ended())

    def _close(self, tell: dict | None = None) -> None:
        self.waiting.clear()
        if self.stream is not None:
            if tell is not None:
                self.stream.tell_abort(tell)
            self.stream.close()
        self.children.cancel()
        if self.reader is not None:
            self.reader.stopping = True

    def _close_reader(self) -> None:
        if self.reader is not None and self.reader.fd >= 0 and not self.reading:
            os.close(self.reader.fd)
            self.reader.fd = -1

    def _settle(self) -> None:
        self._close_reader()
        super()._settle()

    async def stop(self) -> None:
        """Service stop: a stream cannot resume, so the seed fails (the tool is stopped)."""
        await self.fail("the agent stopped while the hot backup was streaming; a streamed hot "
                        "seed cannot resume: start the seed again")
