"""The receiving side of a seed: the receive job, whatever arrives.

:mod:`orchagent.seed.listener` hands each admitted connection to the :class:`ReceiveJob`
of its seed, which owns the record, the staging directory, the verified start, the
promotion into the datadir and the cleanup of a seed that failed.  What arrives is its
*payload* (:class:`~orchagent.interfaces.IReceivePayload`), chosen by the first stream
that joins: a tree sent file by file, resumable (:mod:`~orchagent.seed.tree_receive`), or
a backup tool's stream, extracted and prepared as it comes
(:mod:`~orchagent.seed.stream_receive`).  Both end in :meth:`ReceiveJob.install`.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.logger import Logger

from orchagent.errors import BadRequest, CommandFailed
from orchagent.seed import promotion, state, usage
from orchagent.seed.auth import Rejected
from orchagent.seed.staging import Staging
from orchagent.seed.stream_receive import ROLE as STREAM_ROLE, StreamReceive
from orchagent.seed.tree_receive import TreeReceive

if TYPE_CHECKING:
    from orchagent.seed.context import SeedContext

log = Logger()


class ReceiveJob(state.JobIdentity):
    """The receiving side of one seed (engine mode)."""

    def __init__(self, context: "SeedContext", record: state.SeedRecord, auth_key: bytes | None):
        super().__init__(context, record)
        self.auth_key = auth_key
        self.staging = Staging(record.datadir, record.seed_id)
        #: TreeReceive or StreamReceive, from the first stream that joined (or a restart).
        self.payload: TreeReceive | StreamReceive | None = None
        #: Worker-thread calls that make entries in staging (prepare, finish a file,
        #: complete): the end of the seed waits for them before it removes staging, or
        #: one still running would make it again after (on_staging).
        self.making: set[defer.Deferred] = set()
        self.bucket = state.TokenBucket(context.clock, record.rate_limit)
        self.meter = state.RateMeter(context.clock)
        #: Everything arrived; the payload checks it and installs it.
        self.finalizing = False
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
        #: and the share of its steps done; the address the sender connects from, and the
        #: master a hot seed's source replicates from (read by orchagent.replica.seeded).
        self.start_check = None
        self.check_share = 0.0
        self.source_address = ""
        self.source_master = None

    def restore(self) -> None:
        """After an agent restart: a tree seed with staging and its manifest resumes."""
        saved = self.context.store.read(self.seed_id, "manifest")
        if saved is not None and self.staging.exists():
            self.payload = TreeReceive(self)
            self.payload.restore(saved)

    # --- streams (called by orchagent.seed.listener) -------------------------------------

    def attach(self, stream, hello: dict) -> None:
        """A stream passed the handshake; raises Rejected if it may not join.  A control
        stream of a completed seed is let in only to be told the result (by the stream)."""
        completed = self.record.state == state.COMPLETED and hello["role"] == "control"
        if not self.active and not completed:
            raise Rejected(f"seed {self.seed_id} is {self.record.state} on this host")
        if (self.record.peer_host and not self.record.keyed and not self.context.tls
                and stream.peer != self.record.peer_host):
            raise Rejected(f"seed {self.seed_id} is being sent from {self.record.peer_host}, "
                           f"not {stream.peer}")
        if completed:
            return
        if self.payload is None:
            self.payload = (StreamReceive if hello["role"] == STREAM_ROLE else TreeReceive)(self)
        self.payload.attach(stream, hello)
        if self.record.state == state.PENDING:
            self.record.state = state.RUNNING
        self.context.touch(self.record)

    def note_sender(self, stream) -> None:
        """A sender's first stream: where it sends from (the copy's replication source);
        without key or TLS, remember the address (the v1 source check of a resume) and
        warn that nothing proved who it is."""
        self.source_address = stream.peer
        if not self.record.keyed and not self.context.tls:
            self.record.peer_host = stream.peer
            log.warn("seed {seed}: receiving from {peer} WITHOUT authentication (no key, no "
                     "TLS); set SeedAllowedNetworks, pass ?key= or configure SeedTLS*",
                     seed=self.seed_id, peer=stream.peer)

    def frame(self, stream, frame) -> None:
        if self.payload is not None:
            self.payload.frame(stream, frame)

    def flush(self, stream) -> None:
        if self.payload is not None:
            self.payload.flush(stream)

    def stream_lost(self, stream) -> None:
        if self.payload is not None:
            self.payload.stream_lost(stream)

    def result_read(self) -> None:
        if self.record.state == state.COMPLETED:
            self.context.forget_completed(self.seed_id)

    def set_rate_limit(self, rate: int) -> None:
        self.bucket.set_rate(rate)
        if self.payload is not None:
            self.payload.rate_changed()

    def on_staging(self, fn, *args) -> defer.Deferred:
        """``fn(*args)`` in a worker thread, as one of the calls that make entries in
        staging (:attr:`making`)."""
        return state.tracked(self.context.thread(fn, *args), self.making)

    # --- the end -------------------------------------------------------------------------

    async def install(self) -> bool:
        """The payload's tree is verified and synced in staging: the verified start, then
        the promotion; True once it is in the datadir (the payload then says so and calls
        :meth:`completed`), False if the seed ended on the way.  The verified start also
        reads the copy's replication coordinates (orchagent.replica.seeded)."""
        from orchagent.replica.seeded import check_staged_copy
        from orchagent.replica.verify import StartCheckFailed

        if not self.active:
            return False
        try:
            await check_staged_copy(self)
        except StartCheckFailed as e:
            raise BadRequest(f"seed {self.seed_id} was not moved into {self.record.datadir} "
                             f"(untouched): {e.message}") from None
        if not self.active:
            return False
        self.steps += 1
        return await self.promote()

    async def promote(self) -> bool:
        """Move the verified, synced tree into the datadir as one journaled step
        (:mod:`orchagent.seed.promotion`, whose record is the commit point: see
        :meth:`fail`); True once it is there.  MySQL must be stopped right before (it may
        have been started while the seed ran)."""
        record = self.record
        try:
            running = await self.context.mysql.is_running()
        except CommandFailed as e:
            self.fail(f"{e.message}: the verified seed {self.seed_id} was not moved into "
                      f"{record.datadir}; mend MySQLServiceStatusCommand and receive the seed again")
            return False
        if running:
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
        record goes once that is saved (until then, the next start settles it forward
        again, a no-op).  The key stays for a sender that reconnects to learn the result
        (SeedManager.forget_completed removes it)."""
        record = self.record
        self._let_go()
        self.context.store.remove(self.seed_id, "journal", "manifest")
        record.state, record.promoting = state.COMPLETED, False
        self.committed = False
        record.updated_at = self.context.clock.seconds()
        path = self.context.store.path(self.seed_id, promotion.SUFFIX)
        if not self.context.save(record):
            log.warn("seed {seed}: its completion could not be saved; the promotion record "
                     "{path} is kept for the next start", seed=self.seed_id, path=path)
        else:
            try:
                await self.context.thread(promotion.remove_record, path)
            except OSError as e:
                log.warn("seed {seed}: cannot remove the promotion record {path}: {error}",
                         seed=self.seed_id, path=path, error=e)
        if self.payload is not None:
            self.payload.tell({"ok": True})
        self._settle()

    def fail(self, message: str, final_state: str = state.FAILED) -> defer.Deferred:
        """Stop: tell the sender, close streams, stop the payload's tools, remove staging;
        the datadir is untouched.  Once the promotion is recorded it is too late (instead
        of racing it): the seed completes, and the Deferred fires when it has."""
        if not self.active:
            return defer.succeed(None)
        if self.committed:
            log.warn("seed {seed}: {message}: too late, the verified seed is being moved into "
                     "place; it completes", seed=self.seed_id, message=message)
            ended = defer.Deferred()
            self.done.addBoth(lambda result: (ended.callback(None), result)[1])
            return ended
        self.end_record(message, final_state, log)
        if self.start_check is not None:
            self.start_check.cancel()
        if self.payload is not None:
            self.payload.tell({"ok": False, "message": message, "state": final_state})
            self.payload.cancel()
        self.context.touch(self.record, force=True)
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
            self.end_record(f"the agent restarted while moving seed {self.seed_id} into "
                            f"{record.datadir} and can neither finish nor undo it ({e}); settle "
                            f"{path} by hand", state.FAILED, log)
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

    async def drain(self) -> None:
        """Wait for the payload's writes and tools, and the verified start's server."""
        if self.payload is not None:
            await self.payload.drain()
        if self.start_check is not None:
            await self.start_check.ended()

    async def _cleanup(self) -> None:
        await self.drain()
        while self.making:
            await defer.DeferredList(list(self.making), consumeErrors=True)
        try:
            if not self.record.promoting:
                await self.context.thread(self.staging.discard)
        finally:
            self._let_go()
            self.context.store.remove(self.seed_id, "journal", "manifest", "key")
            # A write of the promotion record that a crash cut short (never the record).
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.context.store.path(self.seed_id, promotion.SUFFIX) + ".tmp")
            self._settle()

    def _let_go(self) -> None:
        if self.payload is not None:
            self.payload.let_go()
        self.staging.unwatch()

    async def stop(self) -> None:
        """Service stop: keep staging and journal so a restarted agent resumes; a seed that
        cannot resume (a hot seed's stream) fails unless it is being moved into place."""
        if self.start_check is not None:
            self.start_check.cancel()
        payload = self.payload
        if payload is not None and not payload.RESUMES and not self.record.promoting:
            await self.fail(payload.STOPPED)
            await self.done
            return
        if payload is not None:
            payload.close_streams()
        await self.drain()
        await self.context.thread(self.staging.close_files)
        self._let_go()
        self.context.save(self.record)

    async def datadir_usage(self) -> int:
        """/api/mysql-du while this seed is received (orchagent.seed.usage): what the
        datadir keeps, plus the data that arrived and the final phases done."""
        if not self.record.promoting:
            self.kept = await self.context.thread(self.staging.kept_usage)
        arriving = self.payload.arriving() if self.payload is not None else 0
        total = self.record.bytes_total
        within = self.reread / total if self.rereading and total else 0.0
        if self.record.state == state.CHECKING:
            within = self.check_share
        return self.kept + usage.visible_progress(
            total, self.record.bytes_done + arriving, self.steps, within)

