"""The receiving side of a tree seed: the receive job.

A connection is accepted, admitted and handed over by :mod:`orchagent.seed.listener`;
everything after its handshake goes to the :class:`ReceiveJob` of its seed, which owns
the state: manifest, chunk table,
staging, journal and the current *session* (one control stream plus data streams from
one sender attempt).  A new session of the same seed supersedes the old one; the job
first lets the old session's chunks finish writing, then answers READY with the chunks
it already has, so the sender continues where it stopped.

Backpressure: each stream counts the bytes it handed to the thread pool; above
:data:`STREAM_WINDOW` it stops reading its socket (pauseProducing), so TCP pushes back on
the sender.  Memory stays bounded by streams × window, whatever the seed's size.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from orchagent.errors import AgentError, BadRequest
from orchagent.host.diskusage import block_size, free_bytes, free_inodes
from orchagent.seed import frames, plan, promotion, state, tree, usage
from orchagent.seed.auth import Rejected
from orchagent.seed.frames import FrameType, ProtocolError
from orchagent.seed.staging import StagedDamage, Staging, syncfs

if TYPE_CHECKING:
    from orchagent.seed.context import AcceptedStream as ReceiverStream, SeedContext

log = Logger()

#: Bytes a stream may have queued for writing before it stops reading its socket (it reads
#: again at half).  Two bundles of small files or a chunk of a large one: 4 MiB was no
#: faster and cost the engine 10 MB more at its peak (BENCHMARKS.md).
STREAM_WINDOW = 2 << 20
#: Bytes written through the page cache between two background write-backs of staging
#: (see _write_back).
WRITEBACK_BYTES = 64 << 20
#: A chunk that fails verification this often fails the seed.
MAX_CHUNK_FAILURES = 3
class ReceiveJob(state.JobIdentity):
    """The receiving side of one seed (engine mode)."""

    def __init__(self, context: "SeedContext", record: state.SeedRecord, auth_key: bytes | None):
        self.context = context
        self.record = record
        self.auth_key = auth_key
        self.staging = Staging(record.datadir, record.seed_id)
        self.manifest: tree.Manifest | None = None
        self.table: plan.ChunkTable | None = None
        #: How the staged chunks' contents were digested (announced by the sender).
        self.digest_kind = frames.Digest.BLAKE3
        self.session = ""
        self.control: ReceiverStream | None = None
        self.streams: set[ReceiverStream] = set()
        #: Control streams of a sender that reconnected while we verified: told RESULT.
        self.waiting: set[ReceiverStream] = set()
        self.ready = False
        #: MANIFEST bodies (packed batches) of the current session, until MANIFEST_END,
        #: and the manifest being read from them as they come (see _read_batch).
        self.batches: list[bytes] = []
        self.reader: tree.ManifestReader | None = None
        self.reading: defer.Deferred | None = None
        #: The sender's file digests as they come (DIGESTS frames of 3.6 MB: a bytearray
        #: grows in place, bytes would be copied whole for each).
        self.sender_digests = bytearray()
        self.finish: dict | None = None
        self.inflight: set[defer.Deferred] = set()
        #: Worker-thread calls that make entries in staging (prepare, finish a file,
        #: complete): the end of the seed waits for them before it removes staging, or
        #: one still running would make it again after (_on_staging).
        self.making: set[defer.Deferred] = set()
        self.failures: dict[tuple[int, int], int] = {}
        self.journal_fd: int | None = None
        self.recheck_journal = False
        self.restoring: defer.Deferred | None = None
        self.bucket = state.TokenBucket(context.clock, record.rate_limit)
        #: Sessions (sender attempts) seen, and whether the job came back from a restart.
        self.sessions = 0
        self.restored = False
        self.finalizing = False
        self.done = defer.Deferred()
        self.meter = state.RateMeter(context.clock)
        self.free_at_start = 0
        #: Staging's buffered bytes at the last write-back, and whether one is running.
        self.written_back = 0
        self.writing_back = False
        #: Final phases done after the transfer (each shows in /api/mysql-du, see
        #: datadir_usage), and the datadir's kept usage last read before promotion.
        self.steps = 0
        self.kept = 0
        #: The promotion is recorded: the seed completes, whatever arrives (promote()).
        self.committed = False
        #: Staged bytes read back so far (check_on_disk), while it reads them.
        self.reread = 0
        self.rereading = False
        #: The throwaway server of the verified start (orchagent.replica), while it runs,
        #: and the share of its steps done; the address the sender connects from.
        self.start_check = None
        self.check_share = 0.0
        self.source_address = ""

    # --- restart -------------------------------------------------------------------------

    def restore(self) -> None:
        """After an agent restart: reload the manifest (in a worker thread); the journal is
        re-checked on the next session (its records are trusted only after re-hashing the
        staged bytes)."""
        saved = self.context.store.read(self.seed_id, "manifest")
        if saved is None or not self.staging.exists():
            return
        self.restored = True
        self.restoring = self.context.thread(_load_manifest, saved)
        self.restoring.addCallbacks(self._restored, self._restore_failed)

    def _restored(self, restored: tuple) -> None:
        manifest, self.digest_kind = restored
        self.manifest = manifest
        self.table = plan.ChunkTable(manifest)
        self.recheck_journal = True

    def _restore_failed(self, failure) -> None:
        log.warn("seed {seed}: saved manifest unreadable, starting over: {error}",
                 seed=self.seed_id, error=failure.getErrorMessage())

    # --- streams -------------------------------------------------------------------------

    def attach(self, stream: ReceiverStream, hello: dict) -> None:
        """A stream passed the handshake; raises Rejected if it may not join.  A control
        stream of a completed seed is let in only to be told the result (by the stream)."""
        completed = self.record.state == state.COMPLETED and hello["role"] == "control"
        if not self.active and not completed:
            raise Rejected(f"seed {self.seed_id} is {self.record.state} on this host")
        if self.record.peer_host and not self.record.keyed and not self.context.tls:
            if stream.peer != self.record.peer_host:
                raise Rejected(f"seed {self.seed_id} is being sent from {self.record.peer_host}, "
                               f"not {stream.peer}")
        if completed:
            return
        if hello["role"] == "control":
            if self.finalizing:
                # The sender lost its control stream while we verify: it waits for RESULT.
                self.waiting.add(stream)
                return
            if self.session:
                self._end_session()
            if self.sessions or self.restored:
                self.record.resumes += 1
            self.sessions += 1
            self.session = hello["session"]
            self.control = stream
            self.source_address = stream.peer
            self.ready = False
            self._drop_reading()
            self.batches = []
            self.sender_digests = bytearray()
            self.finish = None
            self._note_unauthenticated(stream)
        elif hello["session"] != self.session or not self.ready:
            raise Rejected(f"data stream for seed {self.seed_id} does not belong to the current session")
        if self.record.state == state.PENDING:
            self.record.state = state.RUNNING
        self.streams.add(stream)
        self.context.touch(self.record)

    def _end_session(self) -> None:
        for stream in list(self.streams):
            stream.close(abort=True)
        self.streams.clear()
        self.session = ""
        self.control = None
        self.ready = False
        self._drop_reading()

    def _note_unauthenticated(self, stream: ReceiverStream) -> None:
        """A sender without key or TLS: remember its address (the v1 source check of a
        resume) and warn that nothing proved who it is."""
        if not self.record.keyed and not self.context.tls:
            self.record.peer_host = stream.peer
            log.warn("seed {seed}: receiving from {peer} WITHOUT authentication (no key, no "
                     "TLS); set SeedAllowedNetworks, pass ?key= or configure SeedTLS*",
                     seed=self.seed_id, peer=stream.peer)

    def stream_lost(self, stream: ReceiverStream) -> None:
        self.waiting.discard(stream)
        was_current = stream in self.streams
        self.streams.discard(stream)
        if was_current and self.active and not self.finalizing:
            log.info("seed {seed}: a stream from {peer} ended; waiting for the sender to resume",
                     seed=self.seed_id, peer=stream.peer)
            self._end_session()

    def result_read(self) -> None:
        if self.record.state == state.COMPLETED:
            self.context.forget_completed(self.seed_id)

    # --- frames --------------------------------------------------------------------------

    def frame(self, stream: ReceiverStream, frame: frames.Frame) -> None:
        if stream not in self.streams:
            return
        if frame.type == FrameType.DATA:
            self._data(stream, frame)
            return
        if frame.type == FrameType.BUNDLE:
            self._bundle(stream, frame)
            return
        if frame.type == FrameType.ABORT:
            message = frames.open_json(frame, stream.key).get("message", "")
            self.context.clock.callLater(0, self.fail, f"the sender aborted the seed: {message}",
                                           state.ABORTED)
            return
        if stream is not self.control:
            raise ProtocolError(f"control frame {frame.type} on a data stream")
        if frame.type == FrameType.MANIFEST and not self.ready:
            self._read_batch(frames.open_control(frame, stream.key))
        elif frame.type == FrameType.MANIFEST_END and not self.ready:
            end = frames.open_json(frame, stream.key)
            session, batches, self.batches = self.session, self.batches, []
            reader, reading, self.reader, self.reading = self.reader, self.reading, None, None
            d = defer.ensureDeferred(self._prepare(batches, end, session, reader, reading))
            d.addErrback(self._prepare_failed, session)
        elif frame.type == FrameType.DIGESTS and self.ready:
            self.sender_digests += frames.open_control(frame, stream.key)
        elif frame.type == FrameType.FINISH and self.ready:
            self.finish = frames.open_json(frame, stream.key)
            self._maybe_finish()
        else:
            raise ProtocolError(f"unexpected frame type {frame.type} on the control stream")

    def _read_batch(self, body: bytes) -> None:
        """A MANIFEST batch: parsed in a worker thread at once, after the batch before it,
        while the sender's walk goes on (the sender sends batches as it walks)."""
        self.batches.append(body)
        if self.reader is None:
            self.reader, self.reading = tree.ManifestReader(), defer.succeed(None)
        reader, thread = self.reader, self.context.thread
        self.reading.addCallback(lambda _: thread(reader.feed, body))
        self.reading.addCallback(self._counted, reader)

    def _counted(self, _, reader: tree.ManifestReader) -> None:
        """The files and bytes read so far: the status's totals until MANIFEST_END."""
        if reader is self.reader and self.record.totals == state.WALKING:
            self.record.files_total, self.record.bytes_total = reader.files, reader.bytes

    def _drop_reading(self) -> None:
        """Forget a manifest read by a session that ended before its MANIFEST_END."""
        if self.reading is not None:
            self.reading.addErrback(lambda _: None)
        self.reader = self.reading = None

    async def _prepare(self, batches: list[bytes], end: dict, session: str,
                       reader: tree.ManifestReader | None, reading: defer.Deferred | None) -> None:
        """MANIFEST_END: check the manifest, make room, answer READY with what is here."""
        try:
            chunk_size, count, digest = end["chunk_size"], end["count"], end["digest"]
            kind = frames.Digest.from_label(end.get("content_digest", "blake3"))
        except (KeyError, TypeError, ValueError):
            raise BadRequest("malformed MANIFEST_END") from None
        if kind != frames.Digest.BLAKE3 and self.record.keyed and not self.context.tls:
            raise BadRequest(f"refused {kind.label} content digests: a seed authenticated by its "
                             "key alone (no TLS) needs BLAKE3")
        try:
            if reading is not None:
                await reading
            reader = reader or tree.ManifestReader()
            manifest = await self.context.thread(reader.finish, chunk_size, count, digest)
        except BadRequest as e:
            raise BadRequest(f"refused the seed manifest: {e.message}") from None
        await self.drain()
        if self.restoring is not None:
            await self.restoring
            self.restoring = None
        if self.manifest is not None and (self.manifest.digest() != manifest.digest()
                                          or self.digest_kind != kind):
            log.info("seed {seed}: the source changed since the last attempt; starting over",
                     seed=self.seed_id)
            await self._reset_staging()
        if self.manifest is None:
            saving = self.context.thread(_save_manifest, self.context.store, self.seed_id, batches,
                                         dict(end, content_digest=kind.label))
            table = await self.context.thread(plan.ChunkTable, manifest)
            await saving
            if session != self.session:
                return
            self.manifest, self.table, self.digest_kind = manifest, table, kind
        if self.recheck_journal:
            journal = self.context.store.read(self.seed_id, "journal") or b""
            good = await self.context.thread(self.staging.recheck, self.manifest, self.table,
                                             state.read_journal(journal), self.digest_kind)
            for cid, digest in good:
                self.table.mark_done(cid, digest)
            log.info("seed {seed}: {n} of {m} journaled chunks re-checked good after restart",
                     seed=self.seed_id, n=len(good), m=len(journal) // state.JOURNAL_RECORD.size)
            del journal, good  # not held while the session gets ready
            self.recheck_journal = False
        if session != self.session:
            return
        await self._check_space()
        if session != self.session:
            return
        await self._on_staging(self.staging.prepare, self.manifest)
        if session != self.session or not self.active:
            return
        if self.journal_fd is None:
            self.journal_fd = os.open(self.context.store.path(self.seed_id, "journal"),
                                      os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        table = self.table
        record = self.record
        record.bytes_total, record.files_total = table.bytes_total, len(table.files)
        record.bytes_done, record.files_done = table.bytes_done, table.files_done
        record.totals = state.FINAL
        self.context.touch(record)
        if session != self.session or self.control is None:
            return
        have = await self.context.thread(lambda: frames._compressor().compress(table.done_records()))
        if session != self.session or self.control is None:
            return
        self.ready = True
        self.control.send_frame(frames.seal(FrameType.READY, have, self.control.key))
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

    async def _reset_staging(self) -> None:
        await self.context.thread(self.staging.discard)
        self._close_journal()
        self.context.store.remove(self.seed_id, "journal", "manifest")
        self.manifest = self.table = None

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
        # A tree of many small files can run out of inodes with bytes to spare (ext4
        # fixes their number at mkfs).  Resuming, the directories and the files with
        # data done are staged already (files without chunks are made at the end).
        inodes = free_inodes(where)
        entries = len(self.manifest)
        if self.staging.exists():
            entries -= (self.manifest.kinds.count(ord(tree.DIR))
                        + self.table.files_done - self.table.chunkless_files)
        if inodes is not None and entries > inodes:
            raise BadRequest(
                f"not enough inodes for seed {self.seed_id} in {self.record.datadir}: it needs "
                f"{entries} files and directories, {inodes} inodes are free")

    def _data(self, stream: ReceiverStream, frame: frames.Frame) -> None:
        if not self.ready:
            raise ProtocolError("DATA before READY")
        try:
            chunk = frames.open_data(frame, stream.key, self.digest_kind)
        except frames.IntegrityError as e:
            if e.where is None or self.table.expected_length(*e.where) is None:
                raise
            self._chunk_failed(stream, e.where, e)
            return
        table = self.table
        cid = table.chunk_id(chunk.file, chunk.offset)
        if cid is None or table.length[cid] != chunk.length:
            raise ProtocolError(f"chunk of file #{chunk.file} at offset {chunk.offset} "
                                "is not in the plan")
        stream.batch.append((chunk, self._whole_file(chunk.file)))
        stream.queued += frame.size

    def _bundle(self, stream: ReceiverStream, frame: frames.Frame) -> None:
        if not self.ready:
            raise ProtocolError("BUNDLE before READY")
        try:
            bundle = frames.open_bundle(frame, stream.key, self.digest_kind)
        except frames.IntegrityError as e:
            if self.table.expected_length(*e.where) is None:
                raise
            self._chunk_failed(stream, e.where, e)
            return
        table = self.table
        for index, length, _digest in bundle.items:
            cid = table.chunk_id(index, 0)
            if cid is None or table.length[cid] != length or not self._whole_file(index):
                raise ProtocolError(f"file #{index} in a bundle is not a whole small file of the plan")
        stream.batch.append((bundle, None))
        stream.queued += frame.size

    def _whole_file(self, index: int) -> bool:
        """A dense file of one chunk: written, given its metadata and closed in one go."""
        return self.table.chunk_count(index) == 1 and self.manifest.is_dense(index)

    def flush(self, stream: ReceiverStream) -> None:
        batch, stream.batch = stream.batch, []
        size = sum(item.size for item, _ in batch)
        self.bucket.take(size)
        if stream.queued > STREAM_WINDOW:
            stream.pause()
        delay = self.bucket.delay()
        if delay > 0 and stream.hold is None:
            stream.pause()
            stream.hold = self.context.clock.callLater(delay, self._release, stream)
        d = self.context.thread(self.staging.write_batch, self.manifest, batch, self.journal_fd)
        self.inflight.add(d)
        d.addBoth(self._written, stream, size, d)
        d.addErrback(self._crashed)

    def _release(self, stream: ReceiverStream) -> None:
        """The rate limit allows reading again (if the write window does too)."""
        stream.hold = None
        delay = self.bucket.delay()
        if delay > 0:
            stream.hold = self.context.clock.callLater(delay, self._release, stream)
        elif stream.queued <= STREAM_WINDOW // 2:
            stream.unpause()

    def set_rate_limit(self, rate: int) -> None:
        self.bucket.set_rate(rate)
        for stream in list(self.streams):
            if stream.hold is not None:
                stream.hold.cancel()
                self._release(stream)

    def _written(self, result, stream: ReceiverStream, size, d):
        self.inflight.discard(d)
        stream.queued -= size
        if stream.queued <= STREAM_WINDOW // 2 and stream.hold is None:
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
        table = self.table
        for where, outcome in result:
            if isinstance(outcome, frames.IntegrityError):
                self._chunk_failed(stream, where, outcome)
                continue
            index = where[0]
            if table.mark_done(table.chunk_id(*where), outcome) and not self._whole_file(index):
                entry = self.manifest.entry(index)
                self._on_staging(self.staging.finish_file, index, entry).addErrback(
                    self._finish_file_failed, entry)
        self.record.bytes_done, self.record.files_done = table.bytes_done, table.files_done
        if (self.staging.buffered_bytes - self.written_back >= WRITEBACK_BYTES
                and not self.writing_back):
            self._write_back()
        self._maybe_finish()
        return None

    def _write_back(self) -> None:
        """Write what the seed left dirty back to disk while it goes on (a worker thread,
        one pass at a time).

        Large chunks bypass the page cache (O_DIRECT) and do not count; small files and
        tails go through it.  Left alone, a seed of 50,000 small files keeps 800 MB dirty until
        the final syncfs; written back as it goes, the disk works while the threads wait
        on file creation, and ext4 never nears a full file system counting dirty data
        (measured: 3.1 s instead of 2.7 s for the whole seed on a file system sized for
        the data, 3.0 s instead of 2.8 s on one eight times larger; BENCHMARKS.md).
        Durability is still the final syncfs's (Staging.finalize), which also reports a
        write error a pass here met."""
        self.written_back = self.staging.buffered_bytes
        self.writing_back = True

        def done(_):
            self.writing_back = False

        self.context.thread(syncfs, self.staging.root).addBoth(done)

    def _on_staging(self, fn, *args) -> defer.Deferred:
        """``fn(*args)`` in a worker thread, as one of the calls that make entries in
        staging (:attr:`making`)."""
        d = self.context.thread(fn, *args)
        self.making.add(d)

        def made(result):
            self.making.discard(d)
            return result

        return d.addBoth(made)

    def _crashed(self, failure) -> None:
        """A bug, not a condition: fail the seed rather than leave it hanging."""
        log.failure("seed {seed}: internal error", failure, seed=self.seed_id)
        if self.active:
            self.fail(f"internal error: {failure.getErrorMessage()}")

    def _finish_file_failed(self, failure, entry):
        if self.active:
            self.fail(f"cannot finish {entry.path}: {failure.value}")

    def _chunk_failed(self, stream, key: tuple[int, int], error) -> None:
        self.failures[key] = self.failures.get(key, 0) + 1
        path = self.manifest.paths[key[0]]
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
        if self.start_check is not None:
            await self.start_check.ended()

    def _maybe_finish(self) -> None:
        if self.finish is None or self.finalizing or not self.table.complete or self.inflight:
            return
        self.finalizing = True
        defer.ensureDeferred(self._finalize()).addErrback(self._finalize_failed)

    async def _finalize(self) -> None:
        record, table = self.record, self.table
        record.state = state.VERIFYING
        self.context.touch(record)
        same, index, tree_digest = await self.context.thread(table.check_digests, self.sender_digests)
        if not same:
            path = self.manifest.paths[index] if index is not None else "?"
            raise BadRequest(f"{path} does not match the sender's file digest")
        if bytes.fromhex(str(self.finish.get("tree", ""))) != tree_digest:
            raise BadRequest("the tree digest does not match the sender's")
        self.steps += 1
        await self._on_staging(self.staging.complete, self.manifest, table)
        # The final sync and the check on disk go side by side: neither needs the other
        # (a read back sees what the sync writes), and the check costs no time then.
        results = await defer.DeferredList(
            [self.context.thread(self.staging.sync), defer.ensureDeferred(self.check_on_disk())],
            consumeErrors=True)
        for ok, result in results:
            if not ok:
                result.raiseException()
        self.steps += 2
        if not await self.check_start():
            return
        self.steps += 1
        if not await self.promote():
            return
        log.info("seed {seed}: received and verified {bytes} bytes in {files} files into {datadir}",
                 seed=self.seed_id, bytes=table.bytes_total, files=len(table.files),
                 datadir=record.datadir)
        # The manager keeps this job a while for a sender that reconnects: not its tree.
        self.manifest = self.table = None
        self.sender_digests = bytearray()
        await self.completed()

    def _reread_wanted(self) -> bool:
        setting = self.context.config.seed_verify_on_disk
        if setting == "auto":
            return self.record.resumes > 0 or self.restored
        return setting == "on"

    async def check_on_disk(self) -> None:
        """Staging, as it is on disk, is the tree received: every entry there, of its size
        (always), every byte read back against its digest (SeedVerifyOnDisk)."""
        reread = self._reread_wanted()
        self.reread, self.rereading = 0, reread

        def read(length: int) -> None:  # a worker thread; the reactor reads a plain int
            self.reread += length

        try:
            await self.context.thread(self.staging.check_on_disk, self.manifest, self.table,
                                      self.digest_kind, reread, read)
        except StagedDamage as e:
            raise BadRequest(f"seed {self.seed_id} was not moved into {self.record.datadir}: {e}") from None
        finally:
            self.rereading = False
        if reread:
            log.info("seed {seed}: read {bytes} staged bytes back, all as received",
                     seed=self.seed_id, bytes=self.reread)

    async def check_start(self) -> bool:
        """The verified start and the replication coordinates (orchagent.replica.seeded):
        True when the seed may go on to its promotion."""
        from orchagent.replica.seeded import check_staged_copy
        from orchagent.replica.verify import StartCheckFailed

        if not self.active:
            return False
        try:
            await check_staged_copy(self)
        except StartCheckFailed as e:
            raise BadRequest(f"seed {self.seed_id} was not moved into {self.record.datadir} "
                             f"(untouched): {e.message}") from None
        return self.active

    async def promote(self) -> bool:
        """Move the verified, synced tree into the datadir as one journaled step
        (:mod:`orchagent.seed.promotion`); True once it is there.

        MySQL must be stopped right before (it may have been started while the seed ran).
        The record written is the commit point: from then on an abort (or any ``fail``)
        waits for the seed to complete instead of racing it.  A rename that fails undoes
        the promotion and fails the seed; the datadir is then as it was."""
        record = self.record
        if not self.active:
            return False
        if await self.context.mysql.is_running():
            self.fail(f"MySQL is running on this host: the verified seed {self.seed_id} was not "
                      f"moved into {record.datadir}; stop MySQL and receive the seed again")
            return False
        if not self.active:
            return False
        self.committed = True
        path = self.context.store.path(self.seed_id, promotion.SUFFIX)

        def commit() -> promotion.Promotion:
            planned = promotion.plan(self.staging)
            try:
                promotion.write_record(path, planned)
            except OSError:
                # Not begun: a record left in place (a failed directory fsync after its
                # rename) would be settled at the next start, long after this failure.
                with contextlib.suppress(OSError):
                    promotion.remove_record(path)
                raise
            return planned

        try:
            planned = await self.context.thread(commit)
        except OSError as e:
            self.committed = False
            self.fail(f"cannot record the promotion of seed {self.seed_id} in {path}: {e}")
            return False
        record.promoting = True
        self.steps += 1
        self.context.save(record)
        if planned.old:
            log.warn("seed {seed}: {datadir} was not empty; keeping {names} in {aside}",
                     seed=self.seed_id, datadir=record.datadir, names=planned.old[:20],
                     aside=planned.aside)
        try:
            await self.context.thread(promotion.settle, path, planned)
        except promotion.Undone as e:
            self.committed = record.promoting = False
            await self.fail(f"seed {self.seed_id} could not be moved into {record.datadir} ({e}); "
                            "everything moved was put back: the datadir is as it was")
            await self.context.thread(promotion.remove_record, path)
            return False
        except (promotion.PromotionError, OSError) as e:
            self.committed = False  # staging stays (promoting): the next start settles it
            await self.fail(f"seed {self.seed_id} could not be moved into {record.datadir} nor put "
                            f"back ({e}); the agent settles it from {path} at its next start")
            return False
        return True

    async def completed(self) -> None:
        """The tree is in place: the seed completed; the sender is told; the promotion
        record goes once that is saved (a crash before settles the promotion again)."""
        record = self.record
        self._close_journal()
        # The key stays while a sender may still reconnect to learn the result
        # (SeedManager.forget_completed removes it).
        self.context.store.remove(self.seed_id, "journal", "manifest")
        record.state = state.COMPLETED
        record.promoting = False
        self.committed = False
        record.updated_at = self.context.clock.seconds()
        path = self.context.store.path(self.seed_id, promotion.SUFFIX)
        if not self.context.save(record):
            # The record on disk still says "promoting": the promotion record stays, so the
            # next start settles it forward again (a no-op) and saves "completed" then.
            log.warn("seed {seed}: its completion could not be saved; the promotion record "
                     "{path} is kept for the next start", seed=self.seed_id, path=path)
        else:
            try:
                await self.context.thread(promotion.remove_record, path)
            except OSError as e:
                # The seed is complete and saved so; a record left over is settled forward
                # again at the next start, where it finds everything in place.
                log.warn("seed {seed}: cannot remove the promotion record {path}: {error}",
                         seed=self.seed_id, path=path, error=e)
        for control in [self.control, *self.waiting]:
            if control is not None:
                control.last_word(frames.seal_json(FrameType.RESULT, {"ok": True}, control.key))
        self.waiting.clear()
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
        """Stop: tell the sender, close streams, remove staging; the datadir is untouched.
        Once the promotion is recorded it is too late: the seed completes, and the
        Deferred fires when it has."""
        if not self.active:
            return defer.succeed(None)
        if self.committed:
            log.warn("seed {seed}: {message}: too late, the verified seed is being moved into "
                     "place; it completes", seed=self.seed_id, message=message)
            ended = defer.Deferred()
            self.done.addBoth(lambda result: (ended.callback(None), result)[1])
            return ended
        record = self.record
        self.end_record(message, final_state, log)
        if self.start_check is not None:
            self.start_check.cancel()
        for control in [self.control, *self.waiting]:
            if control is not None:
                control.last_word(frames.seal_json(
                    FrameType.RESULT, {"ok": False, "message": message, "state": final_state},
                    control.key))
        self.waiting.clear()
        for stream in list(self.streams):
            stream.last_word()
        self.streams.clear()
        self.context.touch(record, force=True)
        return defer.ensureDeferred(self._cleanup())

    async def settle_promotion(self) -> None:
        """After a restart with a promotion record (the agent died while the verified tree
        moved in): finish it in the record's direction; the seed then completed, or
        failed with the datadir as it was."""
        path = self.context.store.path(self.seed_id, promotion.SUFFIX)
        record = self.record
        self.committed = record.promoting = True  # an abort now waits for the end
        planned = await self.context.thread(promotion.read_record, path)
        try:
            direction = await self.context.thread(promotion.settle, path, planned)
        except promotion.Undone as e:
            direction, why = promotion.BACK, str(e)
        except (promotion.PromotionError, OSError) as e:
            self.committed = False
            record.state, record.error = state.FAILED, (
                f"the agent restarted while moving seed {self.seed_id} into {record.datadir} and "
                f"can neither finish nor undo it ({e}); settle {path} by hand")
            log.error("seed {seed}: {error}", seed=self.seed_id, error=record.error)
            self.context.touch(record, force=True)
            self._settle()
            return
        else:
            why = "it was being undone"
        if direction == promotion.FORWARD:
            log.info("seed {seed}: finished moving the verified seed into {datadir} after a restart",
                     seed=self.seed_id, datadir=record.datadir)
            await self.completed()
            return
        self.committed = record.promoting = False
        self.end_record(f"the agent restarted while moving seed {self.seed_id} into "
                        f"{record.datadir} ({why}); everything moved was put back: the datadir "
                        "is as it was", state.FAILED, log)
        self.context.touch(record, force=True)
        await self._cleanup()
        await self.context.thread(promotion.remove_record, path)

    async def _cleanup(self) -> None:
        await self.drain()
        while self.making:
            await defer.DeferredList(list(self.making), consumeErrors=True)
        try:
            if not self.record.promoting:
                await self.context.thread(self.staging.discard)
        finally:
            self._close_journal()
            self.context.store.remove(self.seed_id, "journal", "manifest", "key")
            # A write of the promotion record that a crash cut short (never the record).
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.context.store.path(self.seed_id, promotion.SUFFIX) + ".tmp")
            self._settle()

    def _close_journal(self) -> None:
        if self.journal_fd is not None:
            os.close(self.journal_fd)
            self.journal_fd = None

    async def stop(self) -> None:
        """Service stop: keep staging and journal so a restarted agent resumes."""
        if self.start_check is not None:
            self.start_check.cancel()
        for stream in list(self.streams):
            stream.close(abort=True)
        self.streams.clear()
        await self.drain()
        await self.context.thread(self.staging.close_files)
        self._close_journal()
        self.context.save(self.record)

    async def datadir_usage(self) -> int:
        """/api/mysql-du while this seed is received (orchagent.seed.usage): what the
        datadir keeps, plus the data that arrived and the final phases done."""
        if not self.record.promoting:
            self.kept = await self.context.thread(self.staging.kept_usage)
        arriving = sum(s.queued + s.splitter.buffered for s in self.streams)
        total = self.record.bytes_total
        within = self.reread / total if self.rereading and total else 0.0
        if self.record.state == state.CHECKING:
            within = self.check_share
        return self.kept + usage.visible_progress(
            total, self.record.bytes_done + arriving, self.steps, within)


def _save_manifest(store: state.StateStore, seed_id: str, batches: list[bytes], end: dict) -> None:
    """Keep the manifest as it came (its MANIFEST_END, then its packed batches)."""
    head = json.dumps({k: end[k] for k in ("chunk_size", "count", "digest", "content_digest")}).encode()
    parts = [struct.pack(">I", len(head)), head]
    for body in batches:
        parts += [struct.pack(">I", len(body)), body]
    store.write(seed_id, "manifest", b"".join(parts))


def _load_manifest(saved: bytes) -> tuple[tree.Manifest, frames.Digest]:
    pieces = []
    position = 0
    while position < len(saved):
        (size,) = struct.unpack_from(">I", saved, position)
        pieces.append(saved[position + 4:position + 4 + size])
        position += 4 + size
    end = json.loads(pieces[0])
    manifest = tree.manifest_from_batches(pieces[1:], end["chunk_size"], end["count"], end["digest"])
    return manifest, frames.Digest.from_label(end.get("content_digest", "blake3"))
