"""The sending side: the send job, its sessions, and the push-producer streams.

A *session* is one attempt: a control stream carries the manifest (batch by batch as
the walk of the source makes them: the first session connects while the walk goes on,
and the receiver parses each batch as it comes), learns from READY which chunks the
receiver already holds, then it and SeedStreams-1 data streams pull chunks from one
shared queue (so a large file is split between streams).  Any stream failing ends the
session; the job reconnects with backoff and the receiver's READY makes the next session
continue from the last verified chunk.  When the queue is empty the control stream sends
the per-file digests and the tree digest, and the receiver answers RESULT after it
verified and moved everything into place.

Each stream is an IPushProducer on its transport: when the transport's buffer is full it
is paused and keeps at most :data:`AHEAD` batches read ahead (read, hashed, maybe
compressed in the thread pool) so that it can refill the socket the moment it is resumed,
without waiting for the disk.  Memory is bounded by streams × AHEAD × batch size,
independent of the seed's size.

The source must stay what the walk saw (:class:`SourceFiles`, :func:`_survey`,
:meth:`SendJob._watch_mysql`): any change fails the seed rather than send a mix of two trees.
"""

from __future__ import annotations

import os
import threading
from array import array
from collections import deque
from functools import partial

import attrs
import blake3
import zstandard
from typing import TYPE_CHECKING, Callable, Iterable

from twisted.internet import defer, endpoints, protocol, task
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from orchagent.errors import BadRequest
from orchagent.seed import early, frames, plan, spill, state, tree
from orchagent.seed.auth import ClientHandshake, Rejected, is_loopback, tls_client_options
from orchagent.seed.frames import FrameType, ProtocolError
from orchagent.seed.session import Session
from orchagent.seed.stream import Stream

if TYPE_CHECKING:
    from orchagent.seed.context import SeedContext

log = Logger()

#: Batches a stream may have being read or read and waiting for the socket, besides the
#: one its transport holds: one is as fast as two for large chunks and small files alike
#: (BENCHMARKS.md), and each batch more is up to 2 MiB more memory per stream.
AHEAD = 1
#: A read task gathers whole small files up to this many bytes (one task per file would
#: cost more in thread hand-offs than reading them); larger files go a chunk per task.
BATCH_BYTES = 1 << 20
BATCH_ITEMS = 1024
MANIFEST_BATCH = 4096
#: Kept MANIFEST batches read back and sent at a time to a session after the first.
RESEND_BATCHES = 32
CONNECT_TIMEOUT = 10
#: Seconds a connected stream may take to finish its handshake.
HANDSHAKE_TIMEOUT = 30
#: Sessions in a row that fail without progress before the seed fails.
MAX_ATTEMPTS = 6
#: Seconds an abort after the whole tree was sent waits for the receiver to say how the
#: seed ended (it may be moving it into place, which an abort no longer stops).
RESULT_WAIT = 30.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 15.0
#: Seconds between checks that MySQL is still stopped while a datadir seed reads it.
MYSQL_POLL = 2.0
#: Files of several chunks kept open between their chunks' reads, at most (per send).
KEEP_OPEN = 8


@implementer(IPushProducer)
class SenderStream(Stream):
    """One connection to the receiver: handshake, then frames to/from the job.  It is
    its transport's producer: while the transport's buffer is full it is ``blocked`` and
    the job writes nothing to it."""

    def __init__(self, job, role: str, index: int, session_id: str):
        super().__init__(job.context.clock)
        self.job = job
        self.index = index
        self.handshake = ClientHandshake(job.seed_id, session_id, role, index, job.auth_key)
        self.blocked = False
        self.lost = defer.Deferred()
        self.accepted = defer.Deferred()
        self.connecting: defer.Deferred | None = None
        #: The ABORT it says once its handshake is done (:meth:`tell_abort`).
        self.abort_body: dict | None = None
        self.unblocked: defer.Deferred | None = None

    def connectionMade(self):
        if self.closed:
            self.transport.abortConnection()
            return
        self.peer = self.transport.getPeer().host
        self.set_timer(HANDSHAKE_TIMEOUT, self.job.broken, self,
                       f"the receiver did not complete the handshake in {HANDSHAKE_TIMEOUT}s")
        self.transport.write(self.handshake.hello())

    def dataReceived(self, data):
        try:
            for frame in self.splitter.feed(data):
                if self.closed:
                    return
                if self.key is not None:
                    self.job.frame(self, frame)
                elif (reply := self.handshake.receive(frame)) is not None:
                    self.transport.write(reply)
                else:
                    self._accepted()
        except Rejected as e:
            self.abort_body = None
            self.close()
            self.job.rejected(self, str(e))
        except ProtocolError as e:
            self.close(abort=True)
            self.job.broken(self, f"protocol error from the receiver: {e}")

    def _accepted(self) -> None:
        self._cancel("timer")
        self.key = self.handshake.key
        if self.abort_body is not None:
            body, self.abort_body = self.abort_body, None
            self.tell_abort(body)
            self.close()
            return
        self.transport.registerProducer(self, True)
        self.accepted.callback(self)

    def tell_abort(self, body: dict) -> None:
        """Tell the receiver that the seed is over (ABORT).  A stream still in its
        handshake (the seed failed at once: a source that cannot be walked, an abort right
        after the call) says it as its only frame once the handshake is done, and stays
        open until then: closed now, it would look to the receiver like a broken
        connection, and the receiver would wait for the sender to resume."""
        if self.closed:
            return
        if self.key is not None:
            self.send(FrameType.ABORT, body)
        else:
            self.abort_body = body

    def drained(self) -> defer.Deferred:
        """Fires once the transport took what was written (at once unless it asked us
        to pause), or the connection is gone."""
        if not self.blocked or self.closed:
            return defer.succeed(None)
        self.unblocked = self.unblocked or defer.Deferred()
        return self.unblocked

    def _unblock(self) -> None:
        waiting, self.unblocked = self.unblocked, None
        if waiting is not None:
            waiting.callback(None)

    def connectionLost(self, reason=protocol.connectionDone):
        self.closed = True
        self.stop_timers()
        self._unblock()
        if not self.accepted.called:
            self.accepted.errback(reason)
        self.job.stream_lost(self, reason)
        if not self.lost.called:
            self.lost.callback(None)

    def close(self, abort: bool = False) -> None:
        """Close the connection; a stream that has an ABORT to say after its handshake
        (:meth:`tell_abort`) stays open for it unless ``abort``."""
        if self.closed or (self.abort_body is not None and not abort):
            return
        if self.transport is not None:
            super().close(abort)
            return
        # Still connecting: stop trying; nothing to wait for.
        self.closed = True
        self.stop_timers()
        if self.connecting is not None:
            self.connecting.cancel()
        if not self.lost.called:
            self.lost.callback(None)

    # IPushProducer
    def pauseProducing(self):
        self.blocked = True

    def resumeProducing(self):
        self.blocked = False
        self._unblock()
        self.job.flush(self)
        self.job.pump(self)

    def stopProducing(self):
        self.closed = True


class ChunkQueue:
    """Chunk numbers still to send: an array and a cursor (no object per chunk), and in
    front of it the few taken back from a stream that closed."""

    def __init__(self, chunks: array | memoryview | None = None):
        self._chunks = array("I") if chunks is None else chunks
        self._next = 0
        self._front: deque = deque()

    def __len__(self) -> int:
        return len(self._front) + len(self._chunks) - self._next

    def first(self) -> int:
        return self._front[0] if self._front else self._chunks[self._next]

    def popleft(self) -> int:
        if self._front:
            return self._front.popleft()
        chunk = self._chunks[self._next]  # IndexError when empty
        self._next += 1
        return chunk

    def push_front(self, chunks) -> None:
        self._front.extendleft(reversed(chunks))


class CompressionPolicy:
    """Adaptive zstd: try on a chunk; after chunks that did not shrink, skip more and
    more chunks (up to 64) before trying again."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._skip = 0
        self._backoff = 1

    def should_try(self) -> bool:
        if self.enabled and self._skip:
            self._skip -= 1
            return False
        return self.enabled

    def record(self, tried: bool, compressed: bool) -> None:
        if tried and compressed:
            self._backoff = 1
        elif tried:
            self._skip = self._backoff
            self._backoff = min(self._backoff * 2, 64)


class SourceFiles:
    """The files one send reads, each checked, when opened, against what the walk saw
    (:class:`tree.Pins`: device, inode, size, mtime, ctime).

    A file of several chunks is opened once and kept open (up to :data:`KEEP_OPEN` of
    them, the least recently read closed first) while its chunks are read, and checked
    again when it is closed, at the latest before the sender says it is done
    (:meth:`check_held`): a write to it meanwhile changes its ctime, a rename over it
    drops its last link.  Two ``fstat`` per file, none per chunk.  A whole small file is
    opened, checked, read and closed in one go.  Worker threads share it: a lock guards
    the open descriptors, and each acquire is paired with a release."""

    def __init__(self, root: str, manifest: tree.Manifest, pins: tree.Pins):
        self.root = root
        self.manifest = manifest
        self.pins = pins
        self._lock = threading.Lock()
        #: entry index -> [descriptor, readers]; in the order last read (oldest first).
        self._open: dict[int, list[int]] = {}
        self._closed = False

    def open_checked(self, index: int) -> int:
        """A new descriptor of entry ``index`` (the caller closes it); BadRequest naming
        the file when it is not the file the walk saw."""
        path = os.path.join(self.root, self.manifest.paths[index])
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            self.pins.check(self.manifest, index, os.fstat(fd), path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def acquire(self, index: int) -> int:
        """A descriptor of entry ``index`` to read from, kept open; :meth:`release` it."""
        with self._lock:
            held = self._open.pop(index, None)
            if held is not None:
                held[1] += 1
                self._open[index] = held
                return held[0]
        fd = self.open_checked(index)
        with self._lock:
            if not self._closed and index not in self._open:
                self._open[index] = [fd, 1]
        return fd

    def release(self, index: int, fd: int) -> None:
        """Done reading through ``fd``; a file closed now (more than KEEP_OPEN held) is
        checked again, BadRequest naming it when it changed while it was open."""
        victims = []
        with self._lock:
            held = self._open.get(index)
            if held is None or held[0] != fd:
                victims.append((None, fd))
            else:
                held[1] -= 1
                if self._closed and not held[1]:
                    del self._open[index]
                    victims.append((None, fd))
                for old in [i for i, (_, users) in self._open.items() if not users]:
                    if len(self._open) <= KEEP_OPEN:
                        break
                    victims.append((old, self._open.pop(old)[0]))
        self._check_and_close(victims)

    def _check_and_close(self, victims: list[tuple[int | None, int]]) -> None:
        """Close each ``(entry index, descriptor)``, after checking those with an index
        against the walk (BadRequest naming the first that changed)."""
        try:
            for index, fd in victims:
                if index is not None:
                    self.pins.check(self.manifest, index, os.fstat(fd),
                                    os.path.join(self.root, self.manifest.paths[index]))
        finally:
            for _, fd in victims:
                os.close(fd)

    def _let_go_idle(self, closing: bool = False) -> list[tuple[int, int]]:
        """Forget every file no read holds: ``[(entry index, descriptor)]`` to close."""
        with self._lock:
            self._closed = self._closed or closing
            idle = [i for i, (_, users) in self._open.items() if not users]
            return [(i, self._open.pop(i)[0]) for i in idle]

    def check_held(self) -> None:
        """Check and close every file held open (worker thread, no read running: every
        chunk was read), so that nothing of the source stays open while the sender only
        waits for the receiver's verdict; BadRequest naming the first that changed since
        it was opened."""
        self._check_and_close(self._let_go_idle())

    def close(self) -> None:
        """Close what no read holds; what reads hold is closed when they release it."""
        for _, fd in self._let_go_idle(closing=True):
            os.close(fd)


@attrs.define
class _Outflow:
    """A stream's reads in the worker threads, and the batches read waiting for it."""

    reads: int = 0
    waiting: deque = attrs.field(factory=deque)


class _Attempt(Session):
    """A session as the sender holds it: the chunks left to send, whether READY came and
    the digests went, and the control stream while it is sent the manifest's batches."""

    def __init__(self, session_id: str):
        super().__init__(session_id)
        self.queue = ChunkQueue()
        self.ready = False
        self.finishing = False
        self.manifest_stream: SenderStream | None = None
        #: MANIFEST batches sent on the control stream: files of later ones may not go early.
        self.batches_sent = 0


class SenderJob(state.JobIdentity):
    """What both sending jobs share: :class:`SendJob` (a tree, in sessions that resume)
    and :class:`~orchagent.seed.streamed.StreamSendJob` (a backup tool's output, on one
    stream that cannot).  Either connects :class:`SenderStream` s to the receiver
    (:meth:`_dial`), and ends as the receiver's RESULT says (:meth:`_result`) or as
    :meth:`fail` says; ending closes every stream (``_close``, each job's own)."""

    #: What the receiver's RESULT ok=true confirmed, in the log line of a success.
    CONFIRMED = "{bytes} bytes verified"

    def __init__(self, context: "SeedContext", record: state.SeedRecord, auth_key: bytes | None,
                 host: str, port: int):
        super().__init__(context, record)
        self.auth_key = auth_key
        self.host = host
        self.port = port
        self.bucket = state.TokenBucket(context.clock, record.rate_limit)
        self.meter = state.RateMeter(context.clock)

    def _dial(self, stream: SenderStream) -> defer.Deferred:
        """Connect ``stream`` to the receiver: TCP, in TLS when seed TLS is on (fires once connected)."""
        context = self.context
        endpoint = endpoints.HostnameEndpoint(context.reactor, self.host, self.port, timeout=CONNECT_TIMEOUT)
        if context.tls:
            endpoint = endpoints.wrapClientTLS(tls_client_options(context.config, self.host), endpoint)
        stream.connecting = endpoints.connectProtocol(endpoint, stream)
        return stream.connecting

    def _result(self, stream: SenderStream, frame: frames.Frame, complete: bool = True) -> None:
        """RESULT: the receiver says how the seed ended; ``ok`` completes it only when
        ``complete`` (a streamed seed: once its FINISH went)."""
        result = frames.open_json(frame, stream.key)
        if result.get("ok") is True and complete:
            self._succeeded()
        else:
            final = state.ABORTED if result.get("state") == state.ABORTED else state.FAILED
            self.fail(f"the receiver reports: {result.get('message', 'failed')}", final, tell=False)

    def rejected(self, stream: SenderStream, message: str) -> None:
        self.fail(f"the receiver refused the seed: {message}", tell=False)

    def _succeeded(self) -> None:
        record = self.record
        record.state = state.COMPLETED
        record.bytes_done, record.files_done = record.bytes_total, record.files_total
        log.info("seed {seed}: {target} confirmed " + self.CONFIRMED + " and in place",
                 seed=self.seed_id, target=record.target, bytes=record.bytes_total)
        self._end()

    def fail(self, message: str, final_state: str = state.FAILED, tell: bool = True) -> defer.Deferred:
        """End the seed ``final_state`` with ``message``; every stream tells the receiver
        (an ABORT) as its last frame unless ``tell`` is false (the receiver ended or
        refused the seed, or cannot be told)."""
        if self.active:
            self.end_record(message, final_state, log)
            self._end({"message": message, "state": final_state} if tell else None)
        return defer.succeed(None)

    def _end(self, tell: dict | None = None) -> None:
        """The record says how the seed ended: close the streams (with ``tell``, the
        ABORT they say), save it, and let the manager forget the job."""
        self._close(tell)
        self.context.touch(self.record, force=True)
        self._settle()


class SendJob(SenderJob):
    """The sending side of one tree seed (engine mode)."""

    def __init__(self, context: "SeedContext", record: state.SeedRecord, auth_key: bytes | None,
                 host: str, port: int):
        super().__init__(context, record, auth_key, host, port)
        #: The chunk plan (and :attr:`plan.ChunkTable.manifest`), set once the walk is over.
        self.table: plan.ChunkTable | None = None
        #: The current attempt, None between two.
        self.session: _Attempt | None = None
        self.attempts = 0
        self.retry_call = None
        #: An abort after the whole tree was sent, waiting for the receiver's RESULT.
        self.result_wait = None
        self.compression = CompressionPolicy(False)
        #: Chunk contents need a digest a forger can't match only when the frames are the
        #: stream's sole authentication (see frames.Digest).
        self.digest_kind = frames.Digest.for_stream(auth_key is not None, context.tls)
        #: The manifest as packed MANIFEST bodies (made once, off the reactor, as the walk
        #: goes), kept in StateDir for the sessions after the first (8 MB at a million
        #: files), and where each ends there.
        self.batches = spill.Spool(context.store.root, fallback=True)
        self.batch_ends: list[int] = []
        #: Small files sent while the walk goes on, when the receiver allows it.
        self.early = early.Feed(context.store.root)
        #: Data bytes framed and written to streams, over all sessions (tests, benchmarks).
        self.bytes_sent = 0
        self.stream_bytes: dict[int, int] = {}
        self.have_at_ready = 0
        #: The source's files, opened and checked against the walk (set by the walk).
        self.files: SourceFiles | None = None
        self.mysql_watch: task.LoopingCall | None = None

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Walk the source and connect at once: the manifest's batches travel while the
        walk goes on, and the receiver reads them as they come (a 50,000-file seed saves
        a third of a second before the first byte of data)."""
        defer.ensureDeferred(self._walk()).addErrback(self._crashed)
        self._watch_mysql()
        self._connect()

    @property
    def reading(self) -> bool:
        """Whether the send may still read its source: it runs, and not every chunk was
        read and sent yet (once all were, the source may go: the sender only waits for
        the receiver's verdict, and a resume that needs a chunk again finds the source
        checked, see :class:`SourceFiles`)."""
        return self.active and not (self.table is not None and self.table.complete)

    async def _walk(self) -> None:
        store, seed_id = self.context.store, self.seed_id
        try:
            previous = await self.context.thread(store.read, seed_id, "pins")
        except OSError as e:
            raise BadRequest(f"cannot read the source's identities that this seed's walk saved "
                             f"before the agent restarted: {e}") from None
        kept, reactor = self.batches, self.context.reactor

        def packed(bodies: list[bytes], files: int, size: int, found: list) -> None:
            ends = []
            for body in bodies:
                try:
                    kept.add(body)
                except OSError as e:
                    raise BadRequest(f"cannot keep the seed manifest in {store.root}: {e}") from None
                ends.append(kept.size)
            reactor.callFromThread(self._more_batches, bodies, ends, files, size, found)

        manifest, table, pins = await self.context.thread(
            _survey, self.record.source_path, self.context.chunk_size, packed, previous, store.root,
            self.early)
        if not self.active:
            return
        if previous is None:
            # Kept for a restart of the agent, whose new walk must find the same files.
            self.context.thread(lambda: store.write(seed_id, "pins", pins.pack(manifest))).addErrback(
                lambda f: log.warn("seed {seed}: cannot save the source's identities: {error}",
                                   seed=seed_id, error=f.getErrorMessage()))
        self.files = SourceFiles(self.record.source_path, manifest, pins)
        self.table = table
        self.record.bytes_total, self.record.files_total = self.table.bytes_total, len(self.table.files)
        self.record.totals = state.FINAL
        self.context.touch(self.record)
        log.info("seed {seed}: sending {bytes} bytes in {files} files from {source} to {target}",
                 seed=self.seed_id, bytes=self.table.bytes_total, files=len(self.table.files),
                 source=self.record.source_path, target=self.record.target)
        if self.session is not None and self.session.manifest_stream is not None:
            self._end_manifest(self.session.manifest_stream)

    def _more_batches(self, bodies: list[bytes], ends: list[int], files: int, size: int,
                      found: list) -> None:
        """Batches packed and kept by the walk (called in order, before the walk's
        result), the files and bytes walked so far (the status's totals until the walk
        ends), and the batches' files that may go early."""
        if not self.active:
            return
        if self.record.totals == state.WALKING:  # a restarted send's are final already
            self.record.files_total, self.record.bytes_total = files, size
        self.batch_ends += ends
        self.early.offer(len(self.batch_ends), found)
        session = self.session
        stream = session.manifest_stream if session is not None else None
        if stream is not None:
            for body in bodies:
                stream.send(FrameType.MANIFEST, body)
            session.batches_sent = len(self.batch_ends)
            self._send_early(session)

    def _crashed(self, failure) -> None:
        if self.active:
            self.fail(state.failure_message(failure, self.seed_id, "sending",
                                            f"cannot read the seed source {self.record.source_path}"))

    def _connect(self) -> None:
        self.retry_call = None
        if not self.active:
            return
        session = self.session = _Attempt(os.urandom(8).hex())
        self.record.state = state.RUNNING
        session.run(self._open_control(session), partial(self._connect_failed, session))

    async def _open_control(self, session: "_Attempt") -> None:
        stream = await self._open(session, "control", 0)
        allowed = stream.handshake.accept.get("early")
        if isinstance(allowed, dict) and allowed.get("content_digest") == self.digest_kind.label \
                and self.table is None:
            old = self.early.start(session, allowed)
            if old is not None:
                self.context.thread(old.close)
        setting = self.context.config.seed_compression
        self.compression = CompressionPolicy(
            setting == "zstd" or (setting == "auto" and not is_loopback(stream.peer)))
        sent = 0
        while sent < len(self.batch_ends):  # the walk may keep more meanwhile
            start = self.batch_ends[sent - 1] if sent else 0
            ends = self.batch_ends[sent:sent + RESEND_BATCHES]
            kept = await session.wait(self.context.thread(self.batches.read, start, ends[-1]))
            for begin, end in zip([start, *ends], ends):
                stream.send(FrameType.MANIFEST, kept[begin - start:end - start])
            sent = session.batches_sent = sent + len(ends)
            self._send_early(session)
            await session.wait(stream.drained())
        session.manifest_stream = stream
        if self.table is not None:
            self._end_manifest(stream)

    async def _open(self, session: "_Attempt", role: str, index: int) -> SenderStream:
        """A stream of ``session``, connected and past its handshake."""
        stream = SenderStream(self, role, index, session.id)
        session.add(stream, _Outflow())
        await self._dial(stream)
        return await session.wait(stream.accepted)

    def _end_manifest(self, stream: SenderStream) -> None:
        """MANIFEST_END, after the bundle being read early if one is (no early data may
        follow it, and a bundle read for nothing costs a small seed as much again)."""
        self.early.stop()
        if self.early.reading:
            self.early.ending = stream
            return
        self.session.manifest_stream = None
        manifest = self.table.manifest
        stream.send(FrameType.MANIFEST_END, {
            "count": len(manifest), "chunk_size": manifest.chunk_size,
            "digest": manifest.digest().hex(), "bytes": self.table.bytes_total,
            "content_digest": self.digest_kind.label})

    def _connect_failed(self, session: "_Attempt", failure) -> None:
        if session.ended:
            return
        self._session_failed(f"cannot connect to {self.host}:{self.port}: "
                             f"{failure.getErrorMessage()}")

    # --- frames from the receiver ----------------------------------------------------------

    def frame(self, stream: SenderStream, frame: frames.Frame) -> None:
        session = self.session
        if session is None or stream is not session.control:
            raise ProtocolError(f"frame type {frame.type} on a data stream")
        if frame.type == FrameType.READY:
            try:
                packed = frames.open_control(frame, stream.key)
                have = plan.unpack_records(frames._decompressor().decompress(packed, max_output_size=1 << 30))
            except (ValueError, zstandard.ZstdError) as e:
                raise ProtocolError(f"malformed READY: {e}") from None
            session.run(self._ready(have, session), self._crashed)
        elif frame.type == FrameType.RESULT:
            self._result(stream, frame)
        else:
            raise ProtocolError(f"unexpected frame type {frame.type} from the receiver")

    def _send_early(self, session: "_Attempt") -> None:
        """Read and send the next bundle of small files the walk found, while the
        receiver allows it and the control stream takes it (one read at a time)."""
        feed, stream = self.early, session.control
        if (feed.reading or not feed.open or session is not self.session or not self.active
                or stream is None or stream.key is None or stream.closed or stream.blocked):
            return
        delay = self.bucket.delay()
        if delay > 0:
            stream.later(delay, self._send_early, session)
            return
        items = feed.take(session.batches_sent, early.BUNDLE_BYTES, BATCH_ITEMS)
        if not items:
            return
        feed.reading = True
        compress = self.compression.should_try()
        d = self.context.thread(early.read_bundle, self.record.source_path, items, stream.key,
                                compress, self.digest_kind, feed.kept)
        d.addBoth(self._sent_early, session, stream, compress)
        d.addErrback(self._crashed)

    def _sent_early(self, result, session: "_Attempt", stream: SenderStream, compress: bool) -> None:
        """A bundle read early: written to the control stream (unless its session
        ended), then the next, or the MANIFEST_END that waited for it."""
        feed = self.early
        feed.reading = False
        if not (session.ended or stream.closed):
            if isinstance(result, Failure):
                self.fail(state.failure_message(result, self.seed_id, "reading the seed source",
                                                "cannot read the seed source"))
                return
            pieces, size, compressed = result
            self.bucket.take(size)
            stream.write(pieces)
            self.compression.record(compress, compressed)
            self._count_sent(stream, size)
        if feed.ending is not None:
            ending, feed.ending = feed.ending, None
            if not ending.closed and self.session is not None:
                self._end_manifest(ending)
        elif not session.ended:
            self._send_early(session)

    async def _ready(self, have: Iterable[tuple[int, int, int, bytes]], session: "_Attempt") -> None:
        table = self.table
        recheck = await session.wait(self.context.thread(_resume, table, have, self.early, session))
        if recheck:
            good = await session.wait(self.context.thread(_recheck_source, self.files, table,
                                                          recheck, self.digest_kind))
            for cid, digest in good:
                table.mark_done(cid, digest)
        if table.bytes_done > self.have_at_ready:
            self.attempts = 0
        self.have_at_ready = table.bytes_done
        session.ready = True
        session.queue = ChunkQueue(await session.wait(self.context.thread(table.todo, self.context.store.root)))
        self.record.bytes_done, self.record.files_done = table.bytes_done, table.files_done
        log.info("seed {seed}: receiver ready; {left} bytes to send ({have} already there)",
                 seed=self.seed_id, left=table.bytes_total - table.bytes_done, have=table.bytes_done)
        for index in range(1, self.context.config.seed_streams):
            session.run(self._open_data(session, index), partial(self._connect_failed, session))
        self.pump(session.control)

    async def _open_data(self, session: "_Attempt", index: int) -> None:
        self.pump(await self._open(session, "data", index))

    # --- pumping -------------------------------------------------------------------------

    def pump(self, stream: SenderStream) -> None:
        """Start read tasks for ``stream`` while it may take more (the producer's loop)."""
        session = self.session
        if session is not None and not session.ready and stream is session.control:
            self._send_early(session)
        flow = session.flows.get(stream) if session is not None else None
        while (self.active and flow is not None and stream.key is not None and not stream.closed
               and flow.reads + len(flow.waiting) < AHEAD and session.queue):
            delay = self.bucket.delay()
            if delay > 0:
                stream.later(delay, self.pump, stream)
                return
            queue, table, length = session.queue, self.table, self.table.length
            items = [queue.popleft()]
            size = length[items[0]]
            while (queue and table.whole_file(table.file[queue.first()])
                   and table.whole_file(table.file[items[0]])
                   and size + length[queue.first()] <= BATCH_BYTES and len(items) < BATCH_ITEMS):
                items.append(queue.popleft())
                size += length[items[-1]]
            self.bucket.take(size)
            flow.reads += 1
            compress = self.compression.should_try()
            d = self.context.thread(_read_chunks, self.files, [self.table.chunk(cid) for cid in items],
                                    stream.key, compress, self.digest_kind)
            d.addBoth(self._read_done, stream, flow, items, compress, session)
            d.addErrback(self._crashed)
        self._maybe_finish()

    def _read_done(self, result, stream: SenderStream, flow: "_Outflow", items, compress,
                   session: "_Attempt"):
        flow.reads -= 1
        if session.ended:
            return None
        if isinstance(result, Failure):
            self.fail(state.failure_message(result, self.seed_id, "reading the seed source",
                                            "cannot read the seed source"))
            return None
        if stream.closed:
            session.queue.push_front(items)
            return None
        flow.waiting.append((items, result, compress))
        self.flush(stream)
        self.pump(stream)

    def flush(self, stream: SenderStream) -> None:
        """Write batches read ahead, unless the transport asked us to pause."""
        flow = self.session.flows.get(stream) if self.session is not None else None
        while flow is not None and flow.waiting and not stream.blocked and not stream.closed:
            items, result, compress = flow.waiting.popleft()
            pending = iter(items)
            for pieces, digests, compressed in result:
                stream.write(pieces)
                self.compression.record(compress, compressed)
                for digest in digests:
                    cid = next(pending)
                    self.table.mark_done(cid, digest)
                    length = self.table.length[cid]
                    self._count_sent(stream, length)
        if self.table is not None:  # none while the walk goes on (the control stream may
            # already be paused and resumed, sending the manifest)
            self.record.bytes_done, self.record.files_done = self.table.bytes_done, self.table.files_done

    def _count_sent(self, stream: SenderStream, length: int) -> None:
        """Data bytes framed and written to ``stream`` (tests, benchmarks)."""
        self.bytes_sent += length
        self.stream_bytes[stream.index] = self.stream_bytes.get(stream.index, 0) + length

    def _maybe_finish(self) -> None:
        session = self.session
        if (session is None or session.finishing or not session.ready or session.queue
                or any(f.reads or f.waiting for f in session.flows.values())
                or not self.table.complete):
            return
        session.finishing = True
        session.run(self._finish(session), self._crashed)

    async def _finish(self, session: "_Attempt") -> None:
        """Everything is on its way: send the file digests, then the tree digest over
        them.  A piece is made (in a worker thread) once the control stream took the one
        before: made and framed at once, they were the sender's peak (36 bytes a file
        twice over, 60 MB at a million files)."""
        table = self.table
        await session.wait(self.context.thread(self.files.check_held))
        control, pieces = session.control, table.digest_pieces()
        tree_digest = blake3.blake3(table.manifest.digest())
        while (piece := await session.wait(self.context.thread(next, pieces, None))) is not None:
            tree_digest.update(piece)
            control.send(FrameType.DIGESTS, piece)
            await session.wait(control.drained())
        if control.closed:
            return
        control.send(FrameType.FINISH, {"tree": tree_digest.hexdigest()})
        self.record.state = state.VERIFYING
        self.context.touch(self.record)

    # --- endings -------------------------------------------------------------------------

    def broken(self, stream: SenderStream, message: str) -> None:
        log.warn("seed {seed}: {message}", seed=self.seed_id, message=message)
        stream.close(abort=True)

    def stream_lost(self, stream: SenderStream, reason) -> None:
        if not self.active or self.session is None or stream not in self.session.flows:
            return
        self._session_failed(f"connection to {self.host}:{self.port} lost: {reason.getErrorMessage()}")

    def _session_failed(self, message: str) -> None:
        if self.result_wait is not None:
            self._no_result(message)
            return
        if not self.active or self.session is None:
            return
        self.session.end()
        self.session = None
        self.attempts += 1
        if self.attempts >= MAX_ATTEMPTS:
            self.fail(f"{message} (gave up after {self.attempts} attempts)", tell=False)
            return
        delay = min(BACKOFF_FIRST * 2 ** (self.attempts - 1), BACKOFF_MAX)
        log.warn("seed {seed}: {message}; resuming in {delay:.1f}s", seed=self.seed_id,
                 message=message, delay=delay)
        self.record.resumes += 1
        self.record.state = state.RUNNING
        self.retry_call = self.context.clock.callLater(delay, self._connect)

    def fail(self, message: str, final_state: str = state.FAILED, tell: bool = True) -> defer.Deferred:
        """See :meth:`SenderJob.fail`; once the receiver has the whole tree, it is told
        and the seed ends as it says, or :data:`RESULT_WAIT` later as unknown (the
        Deferred fires then)."""
        control = self.session.control if self.session is not None else None
        if (self.active and tell and self.record.state == state.VERIFYING and self.result_wait is None
                and control is not None and not control.closed):
            log.warn("seed {seed}: {message}; the receiver has the whole tree: waiting for it to "
                     "say how the seed ends", seed=self.seed_id, message=message)
            control.tell_abort({"message": message, "state": final_state})
            self.result_wait = self.context.clock.callLater(RESULT_WAIT, self._no_result, message)
            ended = defer.Deferred()
            self.done.addBoth(lambda result: (ended.callback(None), result)[1])
            return ended
        return super().fail(message, final_state, tell)

    def _no_result(self, message: str) -> None:
        """An abort after the whole tree was sent, and the receiver never said how the seed
        ended: say so instead of guessing."""
        self.result_wait = None
        if not self.active:
            return
        self.end_record(f"{message}; the receiver had the whole tree and did not say how the seed "
                        "ended: it may have completed it; its seed-status tells", state.UNKNOWN, log)
        self._end()

    def _close(self, tell: dict | None = None) -> None:
        """Close every stream; with ``tell``, each says it (an ABORT) as its last frame.

        Every stream, not the control stream alone: the receiver reads a stream only while
        it can write what came in, so it may see a data stream end before it reads the
        control stream's ABORT, and it would take that end for a broken session and wait
        for a resume that never comes.  Whichever stream it finds ending, the ABORT is
        just before that end."""
        self.result_wait = state.cancelled(self.result_wait)
        self.retry_call = state.cancelled(self.retry_call)
        if self.mysql_watch is not None and self.mysql_watch.running:
            self.mysql_watch.stop()
        self.mysql_watch = None
        if self.files is not None:
            self.files.close()
        self.context.thread(self.batches.close).addErrback(
            lambda f: log.warn("seed {seed}: cannot close its kept manifest: {error}",
                               seed=self.seed_id, error=f.getErrorMessage()))
        self.early.stop()
        self.context.thread(self.early.close).addErrback(
            lambda f: log.warn("seed {seed}: cannot close the digests it sent early: {error}",
                               seed=self.seed_id, error=f.getErrorMessage()))
        session, self.session = self.session, None
        if session is None:
            return
        for stream, flow in session.flows.items() if tell is not None else ():
            flow.waiting.clear()
            stream.tell_abort(tell)
        session.end()

    async def stop(self) -> None:
        """Service stop: close streams (the next start resumes); wait for reads to end."""
        streams = list(self.session.streams) if self.session is not None else []
        self._close()
        for stream in streams:
            stream.close(abort=True)
        await defer.DeferredList([s.lost for s in streams if not s.lost.called], consumeErrors=True)
        self.context.save(self.record)

    def _watch_mysql(self) -> None:
        """A datadir seed fails as soon as MySQL is seen running on its source (checked
        every :data:`MYSQL_POLL` seconds through the MySQL service): the files sent
        would no longer make one consistent datadir."""
        if self.record.source != "datadir" or self.context.mysql is None:
            return
        self.mysql_watch = task.LoopingCall(lambda: defer.ensureDeferred(self._check_mysql()))
        self.mysql_watch.clock = self.context.clock
        self.mysql_watch.start(MYSQL_POLL, now=False)

    async def _check_mysql(self) -> None:
        if not self.reading:
            return
        try:
            running = await self.context.mysql.is_running()
        except Exception as e:
            log.warn("seed {seed}: cannot tell whether MySQL runs: {error}", seed=self.seed_id, error=e)
            return
        if running and self.reading:
            self.fail(f"MySQL started on this host while its datadir {self.record.source_path} "
                      f"was being sent: the seed cannot be a consistent copy any more")

    def set_rate_limit(self, rate: int) -> None:
        self.bucket.set_rate(rate)
        for stream in list(self.session.streams) if self.session is not None else ():
            self.pump(stream)


def _survey(root: str, chunk_size: int, packed: Callable[[list[bytes], int, int, list], None],
            previous: bytes | None = None, directory: str | None = None,
            feed: early.Feed | None = None):
    """Worker thread: walk the source, handing ``packed`` the manifest's batches as it
    grows with the files and data bytes walked so far, and the batches' files that may
    go early when ``feed`` wants some; returns the manifest (with its digest), the chunk
    plan and the entries' identities (large ones kept in a file of ``directory``, see
    orchagent.seed.spill).  ``previous``: the identities saved by this seed's walk before
    the agent restarted, which the files must still have (BadRequest naming the first
    that has not)."""
    packer = None
    pins = early.WalkPins(directory)
    files = size = 0

    def grown(manifest: tree.Manifest) -> None:
        nonlocal packer, files, size
        packer = packer or tree.ManifestPacker(manifest)
        more_files, more_bytes = manifest.tally(packer.packed, len(manifest))
        files, size = files + more_files, size + more_bytes
        found = (early.candidates(manifest, packer.packed, pins.recent)
                 if feed is not None and feed.hungry else [])
        pins.recent.clear()
        bodies = packer.pack_new(MANIFEST_BATCH)
        if bodies:
            packed(bodies, files, size, found)

    manifest = tree.walk(root, chunk_size, grown, pins, directory)
    if feed is not None:
        feed.walked()
    pins.seal()
    if previous is not None:
        pins.compare(manifest, previous, root)
    packer.finish()  # walk() calls grown at least once, at its end
    return manifest, plan.ChunkTable(manifest, directory), pins


def _resume(table: plan.ChunkTable, have: Iterable[tuple[int, int, int, bytes]],
            feed: early.Feed, session: "_Attempt") -> plan.ChunkDigests:
    """Worker thread, at ``session``'s READY: the plan reset to what the receiver has
    (``have``, and the files sent early when ``session`` sent them: see
    :meth:`early.Feed.settle`); returned, the chunks it names with a digest the sender
    never knew, to be checked against the source."""
    table.reset()
    feed.settle(table, session)
    recheck = plan.ChunkDigests()
    for index, offset, length, digest in have:
        cid = table.chunk_id(index, offset)
        if cid is None or table.length[cid] != length:
            continue
        known = table.known(cid)
        if known is None:
            recheck.append(cid, digest)
        elif known == digest:
            table.mark_done(cid, digest)
    return recheck


def _read_chunks(files: SourceFiles, items, key: bytes, compress: bool, kind: int) -> list:
    """Worker thread: read, hash and frame a batch: ``[(pieces, digests, compressed)]``,
    one BUNDLE frame for several whole small files, else one DATA frame per chunk."""
    manifest = files.manifest
    if len(items) > 1:
        raw = early.read_whole([(index, length) for index, _, length in items], files.open_checked,
                               manifest.paths.__getitem__)
        return [frames.seal_bundle([(i, n) for i, _, n in items], raw, key, compress, kind)]
    (index, offset, length), = items
    data = _read_range(files, index, offset, length)
    pieces, digest, compressed = frames.seal_chunk(index, offset, data, key, compress, kind=kind)
    return [(pieces, [digest], compressed)]


def _read_range(files: SourceFiles, index: int, offset: int, length: int) -> bytes:
    """``length`` bytes of entry ``index`` at ``offset``, through a checked descriptor
    (kept open when the file has more chunks)."""
    manifest = files.manifest
    whole = manifest.sizes[index] <= manifest.chunk_size
    fd = files.open_checked(index) if whole else files.acquire(index)
    try:
        data = os.pread(fd, length, offset)
    finally:
        if whole:
            os.close(fd)
        else:
            files.release(index, fd)
    if len(data) != length:
        raise BadRequest(f"seed source file {manifest.paths[index]} changed while it was being "
                         f"sent (short read at offset {offset})")
    return data


def _recheck_source(files: SourceFiles, table: plan.ChunkTable, claimed: plan.ChunkDigests,
                    kind: int) -> plan.ChunkDigests:
    """Worker thread: which chunks the receiver says it has match the source's bytes
    (read through checked descriptors: a changed file fails the seed)."""
    good = plan.ChunkDigests()
    for cid, digest in claimed:
        data = _read_range(files, *table.chunk(cid))
        if frames.content_digest(data, kind) == digest:
            good.append(cid, digest)
    return good
