"""A tree received file by file: the payload of a tree seed's receive job.

The sender's *session* (one attempt: a control stream, then data streams) sends the
manifest, learns from READY which chunks are here already, and sends the rest; each
chunk is checked against its digest, written into staging and journaled.  A new session
of the same seed supersedes the old one: the old session's chunks finish writing first,
then READY says what is here, so the sender continues where it stopped.  At the end the
sender's file digests and tree digest are compared, staging is completed, synced and
checked on disk, and the job (orchagent.seed.receiver) installs it.

Backpressure: each stream counts the bytes it handed to the thread pool; above
:data:`STREAM_WINDOW` it stops reading its socket, so TCP pushes back on the sender.
Memory stays bounded by streams × window, whatever the seed's size.
"""

from __future__ import annotations

import itertools
import json
import os
import struct

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from orchagent.errors import AgentError, BadRequest
from orchagent.host.diskusage import block_size, free_bytes, free_inodes
from orchagent.seed import early, frames, plan, spill, state, tree
from orchagent.seed.auth import Rejected
from orchagent.seed.frames import FrameType, ProtocolError
from orchagent.seed.session import Session
from orchagent.seed.staging import StagedDamage

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
#: MANIFEST batches that may wait to be kept and read before the control stream stops
#: reading (4096 entries each).
MANIFEST_AHEAD = 8


@attrs.define
class _Flow:
    """A stream's frames of the current read, and its bytes handed to the workers."""

    batch: list = attrs.field(factory=list)
    queued: int = 0
    held: bool = False


class _DigestSpool:
    """The sender's file digests (DIGESTS, 36 bytes a file) as they come, in StateDir
    (:class:`spill.Spool`) rather than in the engine: held there until the comparison at
    the end, they were the receiver's peak (36 MB at a million files).  The writes, the
    comparison and the close run in worker threads, one after another in that order."""

    def __init__(self, thread, directory: str):
        self.thread = thread
        self.kept = spill.Spool(directory)
        self.lock = defer.DeferredLock()
        #: Pieces added and not yet written.
        self.unwritten = 0

    def _run(self, fn, *args) -> defer.Deferred:
        return self.lock.run(self.thread, fn, *args)

    def add(self, piece: bytes) -> defer.Deferred:
        self.unwritten += 1
        return self._run(self.kept.add, piece).addBoth(self._counted)

    def _counted(self, result):
        self.unwritten -= 1
        return result

    def compare(self, table: plan.ChunkTable) -> defer.Deferred:
        """``table.check_digests`` against every piece added before."""
        return self._run(self._compare, table)

    def _compare(self, table: plan.ChunkTable) -> tuple:
        with self.kept.open() as theirs:
            return table.check_digests(theirs)

    def close(self) -> None:
        self._run(self.kept.close).addErrback(
            lambda f: log.warn("cannot close the sender's file digests: {error}", error=f.getErrorMessage()))


class _Attempt(Session):
    """A sender's session as the receiver holds it."""

    def __init__(self, session_id: str, thread, directory: str):
        super().__init__(session_id)
        self.thread = thread
        self.ready = False
        #: MANIFEST bodies (packed batches) until MANIFEST_END, each after its length as
        #: the saved manifest keeps them, in StateDir (8 MB at a million files); the
        #: batches not yet kept and read; the manifest being read from them as they come
        #: (see _read_batch).
        self.batches = spill.Spool(directory)
        self.unread = 0
        self.manifest_bytes = 0
        self.reader: tree.ManifestReader | None = None
        self.reading: defer.Deferred | None = None
        self.digests = _DigestSpool(thread, directory)
        self.finish: dict | None = None
        #: Early data (orchagent.seed.early): the content digest it is checked with while
        #: the sender may send it (None once the manifest ended, or never allowed), the
        #: files and bytes it may still take, its bytes waiting to be written, and what
        #: was written (RECORDs, in StateDir) until MANIFEST_END settles it.
        self.early_kind: int | None = None
        self.early_files = self.early_bytes = self.early_queued = 0
        self.early_kept: spill.Spool | None = None
        #: The directories the last early bundle's files are in (early.write_bundle).
        self.early_made: set[str] = set()

    def end(self, abort: bool = False, close: bool = True) -> None:
        super().end(abort, close)
        if self.reading is not None:
            # A manifest no one reads to its end: its next step meets the spools closed.
            self.reading.addErrback(lambda _: None)
        self.digests.close()
        if self.early_kept is not None:
            self.thread(self.early_kept.close).addErrback(
                lambda f: log.warn("cannot close the record of early data: {error}", error=f.getErrorMessage()))
        self.thread(self.batches.close).addErrback(
            lambda f: log.warn("cannot close the seed manifest kept: {error}", error=f.getErrorMessage()))


class TreeReceive(state.ReceivePayload):
    RESUMES = True
    STOPPED = ""

    def __init__(self, job):
        super().__init__(job)
        self.manifest: tree.Manifest | None = None
        self.table: plan.ChunkTable | None = None
        #: How the staged chunks' contents were digested (announced by the sender).
        self.digest_kind = frames.Digest.BLAKE3
        self.session: _Attempt | None = None
        #: Control streams of a sender that reconnected while we verified: told RESULT.
        self.waiting: set = set()
        self.failures: dict[tuple[int, int], int] = {}
        self.journal_fd: int | None = None
        self.recheck_journal = False
        self.restoring: defer.Deferred | None = None
        #: Sessions (sender attempts) seen, and whether the seed came back from a restart.
        self.sessions = 0
        self.restored = False
        self.free_at_start = 0
        #: Staging's buffered bytes at the last write-back, and whether one is running.
        self.written_back = 0
        self.writing_back = False

    # --- restart -------------------------------------------------------------------------

    def restore(self, saved: bytes) -> None:
        """After an agent restart: reload the manifest (in a worker thread); the journal is
        re-checked on the next session (its records are trusted only after re-hashing the
        staged bytes)."""
        self.restored = True
        self.restoring = self.context.thread(_load_manifest, saved, self.context.store.root)
        self.restoring.addCallbacks(self._restored, self._restore_failed)

    def _restored(self, restored: tuple) -> None:
        self.table, self.digest_kind = restored
        self.manifest = self.table.manifest
        self.recheck_journal = True

    def _restore_failed(self, failure) -> None:
        log.warn("seed {seed}: saved manifest unreadable, starting over: {error}",
                 seed=self.seed_id, error=failure.getErrorMessage())

    # --- streams -------------------------------------------------------------------------

    def attach(self, stream, hello: dict) -> None:
        if hello["role"] == "control":
            if self.job.finalizing:
                # The sender lost its control stream while we verify: it waits for RESULT.
                self.waiting.add(stream)
                return
            if self.session is not None:
                self._end_session()
            if self.sessions or self.restored:
                self.record.resumes += 1
            self.sessions += 1
            self.session = _Attempt(hello["session"], self.context.thread, self.context.store.root)
            self.job.note_sender(stream)
            if hello.get("early") is True:
                self._allow_early(stream, self.session)
        elif hello["role"] != "data":
            raise Rejected(f"seed {self.seed_id} is already being received as a tree")
        elif self.session is None or hello["session"] != self.session.id or not self.session.ready:
            raise Rejected(f"data stream for seed {self.seed_id} does not belong to the current session")
        self.session.add(stream, _Flow())

    def _allow_early(self, stream, session: _Attempt) -> None:
        """Early data allowed (a field of the control stream's ACCEPT), on the first
        attempt at a seed of which nothing is here: no manifest, no staging (a restarted
        agent's, or one an earlier attempt left, is emptied at MANIFEST_END instead)."""
        if self.sessions != 1 or self.restored or self.manifest is not None or self.staging.exists():
            return
        kind = frames.Digest.for_stream(self.record.keyed, self.context.tls)
        where = os.path.dirname(self.staging.root)
        self.free_at_start = free_bytes(where)
        session.early_bytes, session.early_files = early.allowance(self.free_at_start, free_inodes(where))
        session.early_kind = kind
        session.early_kept = spill.Spool(self.context.store.root)
        stream.offer["early"] = {"bytes": session.early_bytes, "files": session.early_files,
                                 "content_digest": kind.label}

    def _end_session(self) -> None:
        session, self.session = self.session, None
        session.end(abort=True)

    def stream_lost(self, stream) -> None:
        self.waiting.discard(stream)
        session = self.session
        if session is not None and session.discard(stream) and self.job.active and not self.job.finalizing:
            log.info("seed {seed}: a stream from {peer} ended; waiting for the sender to resume",
                     seed=self.seed_id, peer=stream.peer)
            self._end_session()

    def tell(self, result: dict) -> None:
        session = self.session
        for control in [*self.waiting, *([session.control] if session else [])]:
            control.last_word(FrameType.RESULT, result)
        self.waiting.clear()
        if session is not None:
            for stream in session.streams:
                stream.last_word()
            session.end(close=False)

    def close_streams(self) -> None:
        if self.session is not None:
            self.session.end(abort=True)

    def cancel(self) -> None:
        pass  # nothing runs but writes, which the job's cleanup waits for (drain)

    def arriving(self) -> int:
        """Data bytes that arrived and wait to be written; before READY, the manifest's
        bytes as they come (orchestrator counts a stall at every poll with the same
        mysql-du, and a walk of millions of files takes minutes)."""
        session = self.session
        if session is None:
            return 0
        buffered = sum(stream.buffered for stream in session.streams)
        if not session.ready:
            return session.manifest_bytes + buffered
        return buffered + sum(flow.queued for flow in session.flows.values())

    # --- frames --------------------------------------------------------------------------

    def frame(self, stream, frame: frames.Frame) -> None:
        session = self.session
        if session is None or stream not in session.flows:
            return
        if frame.type == FrameType.BUNDLE and session.early_kind is not None and stream is session.control:
            self._early_bundle(stream, session, frame)
            return
        if frame.type in (FrameType.DATA, FrameType.BUNDLE):
            self._data(stream, frame)
            return
        if frame.type == FrameType.ABORT:
            message = frames.open_json(frame, stream.key).get("message", "")
            self.context.clock.callLater(0, self.job.fail, f"the sender aborted the seed: {message}",
                                         state.ABORTED)
            return
        if stream is not session.control:
            raise ProtocolError(f"control frame {frame.type} on a data stream")
        if frame.type == FrameType.MANIFEST and not session.ready:
            self._read_batch(stream, session, frames.open_control(frame, stream.key))
        elif frame.type == FrameType.MANIFEST_END and not session.ready:
            session.early_kind = None
            session.run(self._prepare(session, frames.open_json(frame, stream.key)),
                        self._prepare_failed)
        elif frame.type == FrameType.DIGESTS and session.ready:
            self._keep_digests(stream, session.digests, frames.open_control(frame, stream.key))
        elif frame.type == FrameType.FINISH and session.ready:
            session.finish = frames.open_json(frame, stream.key)
            self._maybe_finish()
        else:
            raise ProtocolError(f"unexpected frame type {frame.type} on the control stream")

    def _read_batch(self, stream, session: _Attempt, body: bytes) -> None:
        """A MANIFEST batch: kept and parsed in a worker thread at once, after the batch
        before it, while the sender's walk goes on (the sender sends batches as it
        walks).  The control stream stops reading while :data:`MANIFEST_AHEAD` batches
        wait for that (TCP holds the sender's next ones meanwhile)."""
        session.manifest_bytes += len(body)
        if session.reader is None:
            session.reader, session.reading = tree.ManifestReader(self.context.store.root), defer.succeed(None)
        reader, kept, thread = session.reader, session.batches, self.context.thread

        def keep_and_read() -> None:
            kept.add(struct.pack(">I", len(body)) + body)
            reader.feed(body)

        def done(result):
            session.unread -= 1
            if session.unread <= MANIFEST_AHEAD // 2:
                stream.resume("manifest")
            return result

        session.unread += 1
        if session.unread > MANIFEST_AHEAD:
            stream.pause("manifest")
        session.reading.addCallback(lambda _: thread(keep_and_read)).addBoth(done)
        session.reading.addCallback(self._counted, session, reader)

    def _early_bundle(self, stream, session: _Attempt, frame: frames.Frame) -> None:
        """An early BUNDLE: written into staging after the MANIFEST batch before it was
        read, in the same chain of worker-thread steps (see orchagent.seed.early).  The
        control stream stops reading while more than a stream's window waits."""
        bundle = frames.open_bundle(frame, stream.key, session.early_kind)
        session.early_files -= len(bundle.items)
        session.early_bytes -= bundle.raw_length
        if session.early_files < 0 or session.early_bytes < 0:
            raise ProtocolError("more early data than the receiver allowed")
        if session.reader is None:
            raise ProtocolError("early data before the manifest")
        self.job.bucket.take(bundle.raw_length)
        session.manifest_bytes += frame.size
        session.early_queued += frame.size
        if session.early_queued > STREAM_WINDOW:
            stream.pause("early")
        reader, kept = session.reader, session.early_kept

        def write(_):
            if session.ended:
                return None
            d = state.tracked(self.job.on_staging(early.write_bundle, self.staging, reader.manifest,
                                                  bundle, kept, session.early_made), self.inflight)
            return d.addCallbacks(written, self._early_failed, errbackArgs=(session,))

        def written(result) -> None:
            files, size = result
            if not session.ended and self.record.totals == state.WALKING:
                self.record.files_done += files
                self.record.bytes_done += size

        def done(result):
            session.early_queued -= frame.size
            if session.early_queued <= STREAM_WINDOW // 2:
                stream.resume("early")
            return result

        session.reading.addCallback(write).addBoth(done)

    def _early_failed(self, failure, session: _Attempt) -> None:
        if failure.check(ProtocolError) and session is self.session:
            log.info("seed {seed}: {error}; waiting for the sender to resume", seed=self.seed_id,
                     error=failure.getErrorMessage())
            self._end_session()
        elif self.job.active:
            self._write_failed(failure)

    def _keep_digests(self, stream, spool: _DigestSpool, piece: bytes) -> None:
        """A DIGESTS piece, written out while the control stream stops reading (TCP holds
        the sender's next piece meanwhile).  It reads again once no piece waits to be
        written, whatever else waits on the spool: the comparison queued behind the last
        piece must not keep it deaf to the sender's ABORT until the seed ends."""
        stream.pause("digests")

        def written(_) -> None:
            if not spool.unwritten:
                stream.resume("digests")

        spool.add(piece).addCallbacks(written, self._digests_failed)

    def _digests_failed(self, failure) -> None:
        if self.job.active:
            self.job.fail(state.failure_message(failure, self.seed_id, "keeping the sender's file digests",
                                                f"cannot keep the sender's file digests in {self.context.store.root}"))

    def _counted(self, _, session: _Attempt, reader: tree.ManifestReader) -> None:
        """The files and bytes read so far: the status's totals until MANIFEST_END."""
        if reader is session.reader and not session.ended and self.record.totals == state.WALKING:
            self.record.files_total, self.record.bytes_total = reader.files, reader.bytes

    async def _prepare(self, session: _Attempt, end: dict) -> None:
        """MANIFEST_END: check the manifest, make room, answer READY with what is here."""
        reader, reading, session.reader, session.reading = session.reader, session.reading, None, None
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
            reader = reader or tree.ManifestReader(self.context.store.root)
            manifest = await self.context.thread(reader.finish, chunk_size, count, digest)
        except BadRequest as e:
            raise BadRequest(f"refused the seed manifest: {e.message}") from None
        except OSError as e:
            raise self._not_kept(session, e) from None
        await self.drain()
        if self.restoring is not None:
            await self.restoring
            self.restoring = None
        if self.manifest is None and session.early_kept is None and self.staging.exists():
            # Files an earlier attempt sent early, that no record names (the source may
            # have lost some since): never promoted.
            log.info("seed {seed}: emptying the staging an earlier attempt left", seed=self.seed_id)
            await session.wait(self.context.thread(self.staging.discard))
        if self.manifest is not None and (self.manifest.digest() != manifest.digest()
                                          or self.digest_kind != kind):
            log.info("seed {seed}: the source changed since the last attempt; starting over",
                     seed=self.seed_id)
            await self.context.thread(self.staging.discard)
            self.let_go()
            self.context.store.remove(self.seed_id, "journal", "manifest")
            self.manifest = self.table = None
        if self.manifest is None:
            saving = self.context.thread(_save_manifest, self.context.store, self.seed_id,
                                         session.batches, dict(end, content_digest=kind.label))
            table = await self.context.thread(plan.ChunkTable, manifest, self.context.store.root)
            try:
                await session.wait(saving)
            except OSError as e:
                raise self._not_kept(session, e) from None
            self.manifest, self.table, self.digest_kind = manifest, table, kind
        if session.early_kept is not None and self.staging.exists():
            if self.journal_fd is None:
                self.journal_fd = self._open_journal()
            await session.wait(self.context.thread(early.settle, self.table, session.early_kept,
                                                   self.journal_fd))
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
        session.check()
        self._check_space()
        await session.wait(self.job.on_staging(self.staging.prepare, self.manifest))
        if self.journal_fd is None:
            self.journal_fd = self._open_journal()
        table, record = self.table, self.record
        record.bytes_total, record.files_total = table.bytes_total, len(table.files)
        record.bytes_done, record.files_done = table.bytes_done, table.files_done
        record.totals = state.FINAL
        self.context.touch(record)
        # An attempt with early data: done is what it sent early, which it counts as here.
        records = (lambda: b"") if session.early_kept is not None else table.done_records
        have = await session.wait(self.context.thread(lambda: frames._compressor().compress(records())))
        session.ready = True
        session.control.send(FrameType.READY, have)
        log.info("seed {seed}: ready for {total} bytes in {files} files ({have} bytes already here)",
                 seed=self.seed_id, total=table.bytes_total, files=len(table.files),
                 have=table.bytes_done)

    def _open_journal(self) -> int:
        return os.open(self.context.store.path(self.seed_id, "journal"),
                       os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def _not_kept(self, session: _Attempt, error: OSError) -> BadRequest:
        """The manifest's spool failed: Ended when the attempt ended (it closed the spool
        under the thread: no failure of the seed), else the seed's failure."""
        session.check()
        return BadRequest(f"cannot keep the seed manifest in {self.context.store.root}: {error}")

    def _prepare_failed(self, failure) -> None:
        if self.job.active:
            self.job.fail(state.failure_message(failure, self.seed_id, "preparing the seed",
                                                f"cannot prepare staging in {self.staging.root}"))

    def _check_space(self) -> None:
        where = os.path.dirname(self.staging.root)
        needed = max(0, self.manifest.needed_space(block_size(where)) - self.table.bytes_done)
        free = self.free_at_start = free_bytes(where)
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

    def _data(self, stream, frame: frames.Frame) -> None:
        """A DATA or BUNDLE frame: its tag checked, its chunks in the plan; queued for
        :meth:`flush` (a chunk that failed its check is sent again)."""
        bundled = frame.type == FrameType.BUNDLE
        if not self.session.ready:
            raise ProtocolError(f"{'BUNDLE' if bundled else 'DATA'} before READY")
        try:
            item = (frames.open_bundle if bundled else frames.open_data)(frame, stream.key, self.digest_kind)
        except frames.IntegrityError as e:
            if e.where is None or self.table.expected_length(*e.where) is None:
                raise
            self._chunk_failed(stream, e.where, e)
            return
        table = self.table
        if bundled:
            for index, length, _digest in item.items:
                cid = table.chunk_id(index, 0)
                if cid is None or table.length[cid] != length or not table.whole_file(index):
                    raise ProtocolError(f"file #{index} in a bundle is not a whole small file of the plan")
        else:
            cid = table.chunk_id(item.file, item.offset)
            if cid is None or table.length[cid] != item.length:
                raise ProtocolError(f"chunk of file #{item.file} at offset {item.offset} "
                                    "is not in the plan")
        flow = self.session.flows[stream]
        flow.batch.append((item, None if bundled else table.whole_file(item.file)))
        flow.queued += frame.size

    def flush(self, stream) -> None:
        """Write the chunks of one read of ``stream`` (a worker thread)."""
        flow = self.session.flows.get(stream) if self.session is not None else None
        if flow is None or not flow.batch:
            return
        batch, flow.batch = flow.batch, []
        size = sum(item.size for item, _ in batch)
        bucket = self.job.bucket
        bucket.take(size)
        if flow.queued > STREAM_WINDOW:
            stream.pause("window")
        delay = bucket.delay()
        if delay > 0 and not flow.held:
            flow.held = True
            stream.pause("rate")
            stream.later(delay, self._release, stream, flow)
        d = self.context.thread(self.staging.write_batch, self.manifest, batch, self.journal_fd)
        state.tracked(d, self.inflight).addBoth(self._written, stream, flow, size)
        d.addErrback(self._crashed)

    def _release(self, stream, flow: _Flow) -> None:
        """The rate limit allows reading again."""
        delay = self.job.bucket.delay()
        if delay > 0:
            stream.later(delay, self._release, stream, flow)
        else:
            flow.held = False
            stream.resume("rate")

    def rate_changed(self) -> None:
        if self.session is not None:
            for stream, flow in list(self.session.flows.items()):
                if flow.held:
                    self._release(stream, flow)

    def _written(self, result, stream, flow: _Flow, size):
        flow.queued -= size
        if flow.queued <= STREAM_WINDOW // 2:
            stream.resume("window")
        if not self.job.active or self.table is None:
            return
        if isinstance(result, Failure):
            self._write_failed(result)
            return
        table = self.table
        for where, outcome in result:
            if isinstance(outcome, frames.IntegrityError):
                self._chunk_failed(stream, where, outcome)
                continue
            index = where[0]
            if table.mark_done(table.chunk_id(*where), outcome) and not table.whole_file(index):
                entry = self.manifest.entry(index)
                self.job.on_staging(self.staging.finish_file, index, entry).addErrback(
                    self._finish_file_failed, entry)
        self.record.bytes_done, self.record.files_done = table.bytes_done, table.files_done
        if (self.staging.buffered_bytes - self.written_back >= WRITEBACK_BYTES
                and not self.writing_back):
            self._write_back()
        self._maybe_finish()

    def _write_failed(self, failure) -> None:
        """A write into staging failed: the seed fails, naming the file."""
        if failure.check(OSError):
            self.job.fail(f"seed {self.seed_id} could not be written: {failure.value.strerror}"
                          f" (the file system had {self.free_at_start} bytes free at the start)")
        elif failure.check(AgentError):
            self.job.fail(failure.value.message)
        else:
            log.failure("seed {seed}: write failed", failure, seed=self.seed_id)
            self.job.fail(f"seed {self.seed_id} could not be written: {failure.value}")

    def _write_back(self) -> None:
        """Write what the seed left dirty back to disk while it goes on (a worker thread,
        one pass at a time; O_DIRECT chunks do not count).

        Left alone, a seed of 50,000 small files keeps 800 MB dirty until the final syncfs;
        written back as it goes, the disk works while the threads wait on file creation,
        and ext4 never nears a full file system counting dirty data (BENCHMARKS.md).
        Durability is still the final syncfs's.  A write error fails the seed here: the
        kernel reports it to one syncfs only, this one."""
        self.written_back = self.staging.buffered_bytes
        self.writing_back = True

        def done(result):
            self.writing_back = False
            if isinstance(result, Failure) and self.job.active:
                self.job.fail(result.value.message if result.check(AgentError) else
                              f"cannot write staging back: {result.getErrorMessage()}")

        self.context.thread(self.staging.write_back).addBoth(done)

    def _crashed(self, failure) -> None:
        """A bug, not a condition: fail the seed rather than leave it hanging."""
        log.failure("seed {seed}: internal error", failure, seed=self.seed_id)
        if self.job.active:
            self.job.fail(f"internal error: {failure.getErrorMessage()}")

    def _finish_file_failed(self, failure, entry):
        if self.job.active:
            self.job.fail(f"cannot finish {entry.path}: {failure.value}")

    def _chunk_failed(self, stream, key: tuple[int, int], error) -> None:
        self.failures[key] = self.failures.get(key, 0) + 1
        path, offset = self.manifest.paths[key[0]], key[1]
        log.warn("seed {seed}: chunk of {path} at offset {offset} failed verification "
                 "({n} time(s)); it will be sent again", seed=self.seed_id, path=path,
                 offset=offset, n=self.failures[key])
        if self.failures[key] >= MAX_CHUNK_FAILURES:
            self.job.fail(f"{path} at offset {offset} failed verification "
                          f"{self.failures[key]} times: {error}")
        elif self.session is not None and stream in self.session.flows:
            self._end_session()

    # --- the end -------------------------------------------------------------------------

    def _maybe_finish(self) -> None:
        session = self.session
        if (session is None or session.finish is None or self.job.finalizing
                or not self.table.complete or self.inflight):
            return
        self.job.finalizing = True
        defer.ensureDeferred(self._finalize(session)).addErrback(self._finalize_failed)

    async def _finalize(self, session: _Attempt) -> None:
        job, record, table = self.job, self.record, self.table
        record.state = state.VERIFYING
        self.context.touch(record)
        same, index, tree_digest = await session.digests.compare(table)
        if not same:
            path = self.manifest.paths[index] if index is not None else "?"
            raise BadRequest(f"{path} does not match the sender's file digest")
        if bytes.fromhex(str(session.finish.get("tree", ""))) != tree_digest:
            raise BadRequest("the tree digest does not match the sender's")
        job.steps += 1
        await job.on_staging(self.staging.complete, self.manifest, table)
        # The final sync and the check on disk go side by side: neither needs the other
        # (a read back sees what the sync writes), and the check costs no time then.
        results = await defer.DeferredList(
            [self.context.thread(self.staging.sync), defer.ensureDeferred(self.check_on_disk())],
            consumeErrors=True)
        for ok, result in results:
            if not ok:
                result.raiseException()
        job.steps += 2
        if not await job.install():
            return
        log.info("seed {seed}: received and verified {bytes} bytes in {files} files into {datadir}",
                 seed=self.seed_id, bytes=table.bytes_total, files=len(table.files),
                 datadir=record.datadir)
        # The manager keeps the job a while for a sender that reconnects: not its tree.
        self.manifest = self.table = None
        session.digests.close()
        await job.completed()

    async def check_on_disk(self) -> None:
        """Staging, as it is on disk, is the tree received: every entry there, of its size
        (always), every byte read back against its digest (SeedVerifyOnDisk)."""
        job, setting = self.job, self.context.config.seed_verify_on_disk
        resumed = self.record.resumes > 0 or self.restored
        reread = resumed if setting == "auto" else setting == "on"
        job.reread, job.rereading = 0, reread

        def read(length: int) -> None:  # a worker thread; the reactor reads a plain int
            job.reread += length

        try:
            await self.context.thread(self.staging.check_on_disk, self.manifest, self.table,
                                      self.digest_kind, reread, read)
        except StagedDamage as e:
            raise BadRequest(f"seed {self.seed_id} was not moved into {self.record.datadir}: {e}") from None
        finally:
            job.rereading = False
        if reread:
            log.info("seed {seed}: read {bytes} staged bytes back, all as received",
                     seed=self.seed_id, bytes=job.reread)

    def _finalize_failed(self, failure) -> None:
        self.job.finalizing = False
        if self.job.active:
            self.job.fail(state.failure_message(failure, self.seed_id, "finishing the seed"))

    def let_go(self) -> None:
        if self.journal_fd is not None:
            os.close(self.journal_fd)
            self.journal_fd = None


def _save_manifest(store: state.StateStore, seed_id: str, batches: spill.Spool, end: dict) -> None:
    """Keep the manifest as it came: its MANIFEST_END, then its packed batches (``batches``
    keeps them each after its length already), a piece at a time."""
    head = json.dumps({k: end[k] for k in ("chunk_size", "count", "digest", "content_digest")}).encode()
    framed_head = struct.pack(">I", len(head)) + head
    store.write(seed_id, "manifest", itertools.chain((framed_head,), batches.pieces()))


def _load_manifest(saved: bytes, directory: str) -> tuple[plan.ChunkTable, frames.Digest]:
    """The saved manifest's chunk table (spilled into ``directory`` when large)."""
    pieces, position = [], 0
    while position < len(saved):
        (size,) = struct.unpack_from(">I", saved, position)
        pieces.append(saved[position + 4:position + 4 + size])
        position += 4 + size
    end = json.loads(pieces[0])
    manifest = tree.manifest_from_batches(pieces[1:], end["chunk_size"], end["count"], end["digest"],
                                          directory)
    return plan.ChunkTable(manifest, directory), frames.Digest.from_label(end.get("content_digest", "blake3"))
