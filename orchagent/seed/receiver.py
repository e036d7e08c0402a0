"""The receiving side: the listener, its thin stream protocol, and the receive job.

:class:`ReceiverStream` only cuts frames and runs the handshake; everything else goes to
the :class:`ReceiveJob` of its seed, which owns the state: manifest, chunk table,
staging, journal and the current *session* (one control stream plus data streams from
one sender attempt).  A new session of the same seed supersedes the old one; the job
first lets the old session's chunks finish writing, then answers READY with the chunks
it already has, so the sender continues where it stopped.

Backpressure: each stream counts the bytes it handed to the thread pool; above
:data:`STREAM_WINDOW` it stops reading its socket (pauseProducing), so TCP pushes back on
the sender.  Memory stays bounded by streams × window, whatever the seed's size.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from orchagent.errors import AgentError, BadRequest
from orchagent.seed import frames, plan, state, tree
from orchagent.seed.auth import Rejected, ServerHandshake, reject_frame
from orchagent.seed.frames import FrameType, ProtocolError
from orchagent.seed.staging import Staging, block_size, free_bytes

if TYPE_CHECKING:
    from orchagent.seed.manager import SeedManager

log = Logger()

#: Bytes a stream may have queued for writing before it stops reading its socket.
STREAM_WINDOW = 4 << 20
#: A chunk that fails verification this often fails the seed.
MAX_CHUNK_FAILURES = 3
#: Socket read size: larger reads than Twisted's 64 KiB cost less per byte; larger
#: still cost memory (each read is a fresh buffer) for little gain.
READ_SIZE = 256 << 10
#: Seconds a new connection has to complete the handshake.
HANDSHAKE_TIMEOUT = 30
#: Seconds the sender has to close a stream after our last frame.
LINGER = 10


class ReceiverStream(protocol.Protocol):
    """One accepted connection: frames in, handshake, then hand-off to the job."""

    def __init__(self, manager: "SeedManager"):
        self.manager = manager
        self.splitter = frames.FrameSplitter()
        self.handshake: ServerHandshake | None = None
        self.job: ReceiveJob | None = None
        self.role = ""
        self.session = ""
        self.key: bytes | None = None
        self.queued = 0
        self.paused = False
        self.closed = False
        self.batch: list = []
        self.timer = None
        self.lingering = False

    def connectionMade(self):
        transport = getattr(self.transport, "transport", self.transport)
        if hasattr(transport, "bufferSize") and transport is self.transport:
            self.transport.bufferSize = READ_SIZE
        self.peer = self.transport.getPeer().host
        self.handshake = ServerHandshake(self.manager.admission, self.peer)
        self.manager.streams.add(self)
        self.timer = self.manager.clock.callLater(HANDSHAKE_TIMEOUT, self.fail,
                                                  "no handshake within the time limit")

    def dataReceived(self, data):
        if self.closed or self.lingering:
            return
        try:
            for frame in self.splitter.feed(data):
                if self.closed:
                    return
                if self.key is None:
                    self._handshake(frame)
                else:
                    self.job.frame(self, frame)
            if self.batch:
                self.job.flush(self)
        except Rejected as e:
            self.reject(str(e))
        except (ProtocolError, BadRequest) as e:
            self.fail(str(e))

    def _handshake(self, frame):
        reply = self.handshake.receive(frame)
        if reply is not None:
            self.transport.write(reply)
            return
        hello = self.handshake.hello
        job = self.manager.receive_job(hello["seed"])
        if job is None:
            raise Rejected(f"this host is not receiving seed {hello['seed']}")
        job.attach(self, hello)
        self.job, self.role, self.session = job, hello["role"], hello["session"]
        self.key = self.handshake.key
        self._stop_timer()
        self.transport.write(self.handshake.accept())

    def send_frame(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def reject(self, message: str) -> None:
        log.warn("seed connection from {peer} refused: {message}", peer=self.peer, message=message)
        self.last_word(reject_frame(message))

    def last_word(self, data: bytes | None = None) -> None:
        """Send a final frame and let the sender close: closing with its unread data in
        our socket would reset the connection and could destroy that frame in flight.
        Whatever still arrives is ignored; after LINGER seconds the connection is cut."""
        if self.closed or self.lingering:
            return
        self.lingering = True
        if data:
            self.transport.write(data)
        if self.paused:
            self.paused = False
            self.transport.resumeProducing()
        self._stop_timer()
        self.timer = self.manager.clock.callLater(LINGER, self.close, True)

    def fail(self, message: str) -> None:
        log.warn("seed stream from {peer} broken: {message}", peer=self.peer, message=message)
        self.close(abort=True)

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def pause(self) -> None:
        if not self.paused and not self.closed:
            self.paused = True
            self.transport.pauseProducing()

    def unpause(self) -> None:
        if self.paused and not self.closed:
            self.paused = False
            self.transport.resumeProducing()

    def _stop_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def connectionLost(self, reason=protocol.connectionDone):
        self.closed = True
        self._stop_timer()
        self.manager.streams.discard(self)
        if self.job is not None:
            self.job.stream_lost(self)


class ReceiverFactory(protocol.Factory):
    def __init__(self, manager: "SeedManager"):
        self.manager = manager

    def buildProtocol(self, addr):
        stream = ReceiverStream(self.manager)
        stream.factory = self
        return stream


class ReceiveJob:
    """The receiving side of one seed (engine mode)."""

    def __init__(self, manager: "SeedManager", record: state.SeedRecord, auth_key: bytes | None):
        self.manager = manager
        self.record = record
        self.auth_key = auth_key
        self.staging = Staging(record.datadir, record.seed_id)
        self.manifest: tree.Manifest | None = None
        self.table: plan.ChunkTable | None = None
        self.session = ""
        self.control: ReceiverStream | None = None
        self.streams: set[ReceiverStream] = set()
        self.ready = False
        self.pending_entries: list = []
        self.sender_digests: dict[int, bytes] = {}
        self.finish: dict | None = None
        self.inflight: set[defer.Deferred] = set()
        self.failures: dict[tuple[int, int], int] = {}
        self.written: set[int] = set()
        self.journal_fd: int | None = None
        self.recheck_journal = False
        #: Sessions (sender attempts) seen, and whether the job came back from a restart.
        self.sessions = 0
        self.restored = False
        self.finalizing = False
        self.done = defer.Deferred()
        self.meter = state.RateMeter(manager.clock)
        self.free_at_start = 0

    @property
    def seed_id(self) -> str:
        return self.record.seed_id

    @property
    def active(self) -> bool:
        return not self.record.terminal

    # --- restart -------------------------------------------------------------------------

    def restore(self) -> None:
        """After an agent restart: reload the manifest; the journal is re-checked on the
        next session (its records are trusted only after re-hashing the staged bytes)."""
        packed = self.manager.store.read(self.seed_id, "manifest")
        if packed is None or not self.staging.exists():
            return
        try:
            data = frames._decompressor().decompress(packed, max_output_size=1 << 30)
            doc = json.loads(data)
            self.manifest = tree.Manifest(tuple(tree.Entry.from_wire(e) for e in doc["entries"]),
                                          doc["chunk_size"])
        except Exception as e:
            log.warn("seed {seed}: saved manifest unreadable, starting over: {error}",
                     seed=self.seed_id, error=e)
            self.manifest = None
            return
        self.table = plan.ChunkTable(self.manifest)
        self.recheck_journal = True
        self.restored = True

    # --- streams -------------------------------------------------------------------------

    def attach(self, stream: ReceiverStream, hello: dict) -> None:
        """A stream passed the handshake; raises Rejected if it may not join."""
        if not self.active:
            raise Rejected(f"seed {self.seed_id} is {self.record.state} on this host")
        if self.record.peer_host and not self.record.keyed and not self.manager.tls:
            if stream.peer != self.record.peer_host:
                raise Rejected(f"seed {self.seed_id} is being sent from {self.record.peer_host}, "
                               f"not {stream.peer}")
        if hello["role"] == "control":
            if self.finalizing:
                raise Rejected(f"seed {self.seed_id} is being verified; try again")
            if self.session:
                self._end_session()
            if self.sessions or self.restored:
                self.record.resumes += 1
            self.sessions += 1
            self.session = hello["session"]
            self.control = stream
            self.ready = False
            self.pending_entries = []
            self.sender_digests = {}
            self.finish = None
            if not self.record.keyed and not self.manager.tls:
                self.record.peer_host = stream.peer
                log.warn("seed {seed}: receiving from {peer} WITHOUT authentication (no key, no "
                         "TLS); set SeedAllowedNetworks, pass ?key= or configure SeedTLS*",
                         seed=self.seed_id, peer=stream.peer)
        elif hello["session"] != self.session or not self.ready:
            raise Rejected(f"data stream for seed {self.seed_id} does not belong to the current session")
        if self.record.state == state.PENDING:
            self.record.state = state.RUNNING
        self.streams.add(stream)
        self.manager.touch(self.record)

    def _end_session(self) -> None:
        for stream in list(self.streams):
            stream.close(abort=True)
        self.streams.clear()
        self.session = ""
        self.control = None
        self.ready = False

    def stream_lost(self, stream: ReceiverStream) -> None:
        was_current = stream in self.streams
        self.streams.discard(stream)
        if was_current and self.active and not self.finalizing:
            log.info("seed {seed}: a stream from {peer} ended; waiting for the sender to resume",
                     seed=self.seed_id, peer=stream.peer)
            self._end_session()

    # --- frames --------------------------------------------------------------------------

    def frame(self, stream: ReceiverStream, frame: frames.Frame) -> None:
        if stream not in self.streams:
            return
        if frame.type == FrameType.DATA:
            self._data(stream, frame)
            return
        if frame.type == FrameType.ABORT:
            message = frames.open_json(frame, stream.key).get("message", "")
            self.manager.reactor.callLater(0, self.fail, f"the sender aborted the seed: {message}",
                                           state.ABORTED)
            return
        if stream is not self.control:
            raise ProtocolError(f"control frame {frame.type} on a data stream")
        if frame.type == FrameType.MANIFEST and not self.ready:
            self.pending_entries.extend(frames.open_packed(frame, stream.key))
        elif frame.type == FrameType.MANIFEST_END and not self.ready:
            self._manifest_end(frames.open_json(frame, stream.key))
        elif frame.type == FrameType.DIGESTS and self.ready:
            try:
                self.sender_digests.update(plan.unpack_digests(frames.open_control(frame, stream.key)))
            except ValueError as e:
                raise ProtocolError(str(e)) from None
        elif frame.type == FrameType.FINISH and self.ready:
            self.finish = frames.open_json(frame, stream.key)
            self._maybe_finish()
        else:
            raise ProtocolError(f"unexpected frame type {frame.type} on the control stream")

    def _manifest_end(self, end: dict) -> None:
        try:
            entries = tuple(tree.Entry.from_wire(e) for e in self.pending_entries)
            manifest = tree.Manifest(entries, int(end["chunk_size"]))
            tree.validate_entries(entries, manifest.chunk_size)
            if len(entries) != end["count"] or manifest.digest().hex() != end["digest"]:
                raise BadRequest("the seed manifest arrived incomplete or altered")
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"malformed MANIFEST_END: {e}") from None
        except BadRequest as e:
            self.fail(f"refused the seed manifest: {e.message}")
            return
        self.pending_entries = []
        session = self.session
        d = defer.ensureDeferred(self._prepare(manifest, session))
        d.addErrback(self._prepare_failed, session)

    async def _prepare(self, manifest: tree.Manifest, session: str) -> None:
        await self.drain()
        if self.manifest is not None and self.manifest.digest() != manifest.digest():
            log.info("seed {seed}: the source changed since the last attempt; starting over",
                     seed=self.seed_id)
            await self._reset_staging()
        if self.manifest is None:
            self.manifest = manifest
            self.table = plan.ChunkTable(manifest)
            await self.manager.thread(self._save_manifest, manifest)
        if self.recheck_journal:
            records = state.read_journal(self.manager.store.read(self.seed_id, "journal") or b"")
            good = await self.manager.thread(self.staging.recheck, self.manifest, records)
            for index, offset, _length, digest in good:
                self.table.mark_done(index, offset, digest)
                self.written.add(index)
            log.info("seed {seed}: {n} of {m} journaled chunks re-checked good after restart",
                     seed=self.seed_id, n=len(good), m=len(records))
            self.recheck_journal = False
        if session != self.session:
            return
        await self._check_space()
        if session != self.session:
            return
        await self.manager.thread(self.staging.prepare, self.manifest)
        if self.journal_fd is None:
            self.journal_fd = os.open(self.manager.store.path(self.seed_id, "journal"),
                                      os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        table = self.table
        record = self.record
        record.bytes_total, record.files_total = table.bytes_total, len(table.files)
        record.bytes_done, record.files_done = table.bytes_done, table.files_done
        self.manager.touch(record)
        if session != self.session or self.control is None:
            return
        have = [[i, o, n, d.hex()] for i, o, n, d in table.done_list()]
        self.ready = True
        self.control.send_frame(frames.seal_packed(FrameType.READY, {"have": have}, self.control.key))
        log.info("seed {seed}: ready for {total} bytes in {files} files ({have} bytes already here)",
                 seed=self.seed_id, total=table.bytes_total, files=len(table.files),
                 have=table.bytes_done)

    def _prepare_failed(self, failure, session):
        if not self.active:
            return
        if failure.check(AgentError):
            self.fail(failure.value.message)
        elif failure.check(OSError):
            self.fail(f"cannot prepare staging in {self.staging.root}: {failure.value}")
        else:
            log.failure("seed {seed}: preparing failed", failure, seed=self.seed_id)
            self.fail(f"preparing the seed failed: {failure.value}")

    def _save_manifest(self, manifest: tree.Manifest) -> None:
        doc = {"chunk_size": manifest.chunk_size, "entries": [e.to_wire() for e in manifest.entries]}
        packed = frames._compressor().compress(json.dumps(doc).encode())
        self.manager.store.write(self.seed_id, "manifest", packed)

    async def _reset_staging(self) -> None:
        await self.manager.thread(self.staging.discard)
        self._close_journal()
        self.manager.store.remove(self.seed_id, "journal", "manifest")
        self.manifest = self.table = None
        self.written = set()

    async def _check_space(self) -> None:
        where = os.path.dirname(self.staging.root)
        block = block_size(where)
        needed = self.manifest.needed_space(block)
        if self.table.bytes_done:
            needed = max(0, needed - self.table.bytes_done)
        free = free_bytes(where)
        self.free_at_start = free
        if needed > free:
            raise BadRequest(
                f"not enough space for seed {self.seed_id} in {self.record.datadir}: it needs "
                f"{needed} bytes, {free} bytes are free")

    def _data(self, stream: ReceiverStream, frame: frames.Frame) -> None:
        if not self.ready:
            raise ProtocolError("DATA before READY")
        try:
            chunk = frames.open_data(frame, stream.key)
        except frames.IntegrityError as e:
            if e.where is None or self.table.expected_length(*e.where) is None:
                raise
            self._chunk_failed(stream, e.where, e)
            return
        expected = self.table.expected_length(chunk.file, chunk.offset)
        if expected is None or expected != chunk.length:
            raise ProtocolError(f"chunk of file #{chunk.file} at offset {chunk.offset} "
                                "is not in the plan")
        whole = chunk.offset == 0 and chunk.length == self.manifest.entries[chunk.file].size \
            and self.manifest.entries[chunk.file].extents is None
        stream.batch.append((chunk, whole))
        stream.queued += frame.size

    def flush(self, stream: ReceiverStream) -> None:
        batch, stream.batch = stream.batch, []
        size = sum(c.size for c, _ in batch)
        if stream.queued > STREAM_WINDOW:
            stream.pause()
        d = self.manager.thread(self.staging.write_batch, self.manifest, batch, self.journal_fd)
        self.inflight.add(d)
        d.addBoth(self._written, stream, batch, size, d)

    def _written(self, result, stream: ReceiverStream, batch, size, d):
        self.inflight.discard(d)
        stream.queued -= size
        if stream.queued <= STREAM_WINDOW // 2:
            stream.unpause()
        if not self.active or self.table is None:
            return None
        if isinstance(result, Failure):
            if result.check(OSError):
                self.fail(f"seed {self.seed_id} could not be written: {result.value.strerror}"
                          f" (the file system had {self.free_at_start} bytes free at the start)")
            else:
                log.failure("seed {seed}: write failed", result, seed=self.seed_id)
                self.fail(f"seed {self.seed_id} could not be written: {result.value}")
            return None
        completed = []
        for chunk, outcome in result:
            if isinstance(outcome, frames.IntegrityError):
                self._chunk_failed(stream, chunk.where, outcome)
                continue
            if self.table.mark_done(chunk.file, chunk.offset, outcome):
                completed.append(chunk.file)
            self.written.add(chunk.file)
        for index in completed:
            entry = self.manifest.entries[index]
            if not (entry.extents is None and self.table.length.get((index, 0)) == entry.size):
                self.manager.thread(self.staging.finish_file, index, entry).addErrback(
                    self._finish_file_failed, entry)
        self.record.bytes_done, self.record.files_done = self.table.bytes_done, self.table.files_done
        self._maybe_finish()
        return None

    def _finish_file_failed(self, failure, entry):
        if self.active:
            self.fail(f"cannot finish {entry.path}: {failure.value}")

    def _chunk_failed(self, stream, key: tuple[int, int], error) -> None:
        self.failures[key] = self.failures.get(key, 0) + 1
        path = self.manifest.entries[key[0]].path
        offset = key[1]
        log.warn("seed {seed}: chunk of {path} at offset {offset} failed verification "
                 "({n} time(s)); it will be sent again", seed=self.seed_id, path=path,
                 offset=offset, n=self.failures[key])
        if self.failures[key] >= MAX_CHUNK_FAILURES:
            self.fail(f"{path} at offset {offset} failed verification "
                      f"{self.failures[key]} times: {error}")
        elif stream in self.streams:
            self._end_session()

    # --- the end -------------------------------------------------------------------------

    async def drain(self) -> None:
        while self.inflight:
            await defer.DeferredList(list(self.inflight), consumeErrors=True)

    def _maybe_finish(self) -> None:
        if self.finish is None or self.finalizing or not self.table.complete or self.inflight:
            return
        self.finalizing = True
        defer.ensureDeferred(self._finalize()).addErrback(self._finalize_failed)

    async def _finalize(self) -> None:
        record, table = self.record, self.table
        record.state = state.VERIFYING
        self.manager.touch(record)
        mine = table.file_digests()
        for index in table.files:
            theirs = self.sender_digests.get(index)
            if theirs != mine[index]:
                path = self.manifest.entries[index].path
                raise BadRequest(f"{path} does not match the sender's file digest")
        if bytes.fromhex(str(self.finish.get("tree", ""))) != table.tree_digest(mine):
            raise BadRequest("the tree digest does not match the sender's")
        await self.manager.thread(self.staging.finalize, self.manifest, set(self.written))
        if not self.active:
            return
        if not record.promoting:
            moved = await self.manager.thread(self.staging.move_aside, self.manifest)
            if moved:
                log.warn("seed {seed}: {datadir} was not empty; kept {names} in {aside}",
                         seed=self.seed_id, datadir=record.datadir, names=moved[:20],
                         aside=self.staging.aside)
            record.promoting = True
            self.manager.save(record)
        await self.manager.thread(self.staging.promote)
        self._close_journal()
        self.manager.store.remove(self.seed_id, "journal", "manifest", "key")
        record.state = state.COMPLETED
        record.promoting = False
        self.manager.touch(record, force=True)
        log.info("seed {seed}: received and verified {bytes} bytes in {files} files into {datadir}",
                 seed=self.seed_id, bytes=table.bytes_total, files=len(table.files),
                 datadir=record.datadir)
        if self.control is not None:
            self.control.last_word(frames.seal_json(FrameType.RESULT, {"ok": True}, self.control.key))
        for stream in list(self.streams):
            stream.last_word()
        self._settle()

    def _finalize_failed(self, failure) -> None:
        self.finalizing = False
        if not self.active:
            return
        if failure.check(AgentError):
            self.fail(failure.value.message)
        else:
            log.failure("seed {seed}: finishing failed", failure, seed=self.seed_id)
            self.fail(f"finishing the seed failed: {failure.value}")

    def fail(self, message: str, final_state: str = state.FAILED) -> defer.Deferred:
        """Stop: tell the sender, close streams, remove staging; the datadir is untouched."""
        if not self.active:
            return defer.succeed(None)
        record = self.record
        record.state = final_state
        record.error = message
        if final_state == state.FAILED:
            log.error("seed {seed} failed: {message}", seed=self.seed_id, message=message)
        else:
            log.warn("seed {seed} aborted: {message}", seed=self.seed_id, message=message)
        if self.control is not None:
            self.control.last_word(frames.seal_json(
                FrameType.RESULT, {"ok": False, "message": message, "state": final_state},
                self.control.key))
        for stream in list(self.streams):
            stream.last_word()
        self.streams.clear()
        self.manager.touch(record, force=True)
        return defer.ensureDeferred(self._cleanup())

    async def _cleanup(self) -> None:
        await self.drain()
        try:
            if not self.record.promoting:
                await self.manager.thread(self.staging.discard)
        finally:
            self._close_journal()
            self.manager.store.remove(self.seed_id, "journal", "manifest", "key")
            self._settle()

    def _settle(self) -> None:
        self.manager.job_ended(self)
        if not self.done.called:
            self.done.callback(None)

    def _close_journal(self) -> None:
        if self.journal_fd is not None:
            os.close(self.journal_fd)
            self.journal_fd = None

    async def stop(self) -> None:
        """Service stop: keep staging and journal so a restarted agent resumes."""
        for stream in list(self.streams):
            stream.close(abort=True)
        self.streams.clear()
        await self.drain()
        await self.manager.thread(self.staging.close_files)
        self._close_journal()
        self.manager.save(self.record)

    def progress(self) -> tuple[float, float | None]:
        self.meter.sample(self.record.bytes_done)
        return self.meter.rate(), self.meter.eta(self.record.bytes_total - self.record.bytes_done)
