"""The seed manager: the one object the API and the service tree see for seeds.

It owns the seed jobs (by id: it alone makes and registers them, and names the job an
admitted connection joins), the listener on SeedTransferPort (:mod:`orchagent.seed.listener`),
the worker thread pool for disk, hashing and compression work, the persisted state under
StateDir, and the progress log.  Engine mode is the default; when ReceiveSeedDataCommand /
SendSeedDataCommand are set the original command mode runs instead
(:mod:`orchagent.seed.command`).

On restart every seed that was pending or running is picked up again: a receiver
listens again (its staging and journal are kept), a sender reconnects, and the
receiver's READY makes the transfer continue from its last verified chunk.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from orchagent.backups.hot import HotSeedJob, StreamedBackup
from orchagent.config import seed_tls_configured
from orchagent.errors import AgentError, BadRequest, NotAvailable, NotFound, Refused
from orchagent.interfaces import ISeedSurface
from orchagent.seed import auth, promotion, spill, state, tree
from orchagent.seed.command import CommandJob
from orchagent.seed.context import SeedContext
from orchagent.seed.listener import SeedListener
from orchagent.seed.receiver import ReceiveJob
from orchagent.seed.sender import SendJob
from orchagent.seed.sources import SeedSources
from orchagent.seed.streamed import StreamSendJob

log = Logger()

#: Seconds between progress lines in the log (and state saves) while seeds run.
PROGRESS_INTERVAL = 5.0
#: Finished seeds remembered for status queries.
KEEP_FINISHED = 200
#: Worker threads: disk I/O blocks more than it computes, so twice the 2 cores we plan for.
THREADS = 4
#: Seconds a completed receive still answers its sender (and keeps the listener open) when
#: the sender did not visibly read our RESULT: a sender whose control connection dropped
#: reconnects within its backoff (well under a minute) and learns the success.
COMPLETED_GRACE = 60.0


def _tune_malloc() -> None:
    """Keep glibc from handing the seed's buffers back to the kernel between chunks.

    Two arenas: glibc gives each allocating thread its own, and memory freed in one is not
    reused by another (tens of MB resident for nothing, with worker threads passing
    megabyte buffers around).  Fixed mmap and trim thresholds: by default a buffer of a few
    MB is mmap'd, or the heap's top trimmed, after every chunk, so the next chunk faults in
    fresh zeroed pages (1 GiB sent: 90,000 page faults instead of 16,000).  Resident
    memory stays bounded by the data in flight plus the trim threshold."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-8, 2)  # M_ARENA_MAX
        libc.mallopt(-3, 16 << 20)  # M_MMAP_THRESHOLD: above the largest frame
        libc.mallopt(-1, 32 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


@implementer(ISeedSurface)
class SeedManager(service.Service):
    """See the module docstring.  ``clock`` defaults to the reactor (tests pass a Clock)."""

    name = "seeds"

    def __init__(self, config, reactor, runner, host, service_, snapshots, clock=None,
                 chunk_size: int = tree.DEFAULT_CHUNK, hot=None):
        self.config = config
        self.reactor = reactor
        self.clock = clock or reactor
        self.host = host
        self.mysql = service_
        self.snapshots = snapshots
        #: orchagent.backups.hot.HotSeeds: makes the source of ``source=hot`` seeds.
        self.hot = hot
        self.store = state.StateStore(config.state_dir)
        networks = auth.parse_networks(config.seed_allowed_networks)
        self.sources = SeedSources(config, reactor, networks)
        self.tls = seed_tls_configured(config)
        if self.tls:
            auth.tls_server_options(config)  # a ConfigError naming the key stops the daemon
        self.records: dict[str, state.SeedRecord] = {}
        self.jobs: dict[str, Any] = {}
        #: Receive jobs that completed within COMPLETED_GRACE, with their expiry call.
        self.completed_receives: dict[str, tuple[ReceiveJob, Any]] = {}
        self.pool: ThreadPool | None = None
        self._ticker: task.LoopingCall | None = None
        #: Lets the pages of spilled columns go (orchagent.seed.spill).
        self._dropper = task.LoopingCall(spill.drop_all)
        self._dropper.clock = self.clock
        self._saved_at: dict[str, float] = {}
        #: Called with each record touched or saved (the seed engine process pushes the
        #: statuses that changed to the agent).
        self.watchers: list = []
        #: The seed port and the connections on it.
        self.listener = SeedListener(config, reactor, self.clock, self.tls, self.sources,
                                     self.receive_job)
        #: What the jobs are handed (orchagent.seed.context).
        self.context = SeedContext(
            reactor=reactor, clock=self.clock, config=config, store=self.store, runner=runner,
            mysql=service_, tls=self.tls, chunk_size=chunk_size, touch=self.touch, save=self.save,
            job_ended=self.job_ended, forget_completed=self.forget_completed, hot=hot)

    @property
    def runner(self):
        return self.context.runner

    @runner.setter
    def runner(self, runner) -> None:
        self.context.runner = runner

    # --- service ---------------------------------------------------------------------------

    def startService(self):
        super().startService()
        _tune_malloc()
        self.store.open()
        self.pool = self.context.pool = ThreadPool(minthreads=0, maxthreads=THREADS,
                                                   name="orchagent-seed")
        self.pool.start()
        self._ticker = task.LoopingCall(self._tick)
        self._ticker.clock = self.clock
        self._ticker.start(PROGRESS_INTERVAL, now=False)
        self._dropper.start(spill.DROP_INTERVAL, now=False)
        for record in self.store.load_all():
            self.records[record.seed_id] = record
        self._prune()
        for record in list(self.records.values()):
            if os.path.exists(self.store.path(record.seed_id, promotion.SUFFIX)):
                self._settle_promotion(record)
            elif not record.terminal:
                self._resume_after_restart(record)
            elif record.role == "receiver" and record.state == state.COMPLETED:
                self._remember_completed(record)
        if self.hot is not None:
            self.hot.adopt(self.jobs)

    async def _stop(self) -> None:
        for _, expiry in self.completed_receives.values():
            expiry.cancel()
        self.completed_receives.clear()
        for job in list(self.jobs.values()):
            try:
                await job.stop()
            except Exception:
                log.failure("seed {seed}: error while stopping", seed=job.seed_id)
        await self.listener.close()
        self.listener.close_streams()
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        if self._dropper.running:
            self._dropper.stop()
        for record in self.records.values():
            self.save(record)  # a failed write is logged: the pool below must stop anyway
        if self.pool is not None:
            self.pool.stop()
            self.pool = self.context.pool = None

    def stopService(self):
        super().stopService()
        return defer.ensureDeferred(self._stop())

    def _resume_after_restart(self, record: state.SeedRecord) -> None:
        key = self.store.read(record.seed_id, "key") if record.keyed else None
        if record.mode != "engine" or (record.keyed and key is None):
            return self._cannot_resume(record, "the agent restarted while this seed ran and it "
                                       "cannot be resumed")
        log.info("seed {seed}: resuming as {role} after a restart", seed=record.seed_id, role=record.role)
        if record.role == "receiver":
            if record.promoting:
                # Moving into place without a promotion record: an earlier version's.
                return self._cannot_resume(record, f"the agent restarted while moving seed "
                                           f"{record.seed_id} into {record.datadir} and has no "
                                           "record of what moved: check it")
            job = self.jobs[record.seed_id] = ReceiveJob(self.context, record, key)
            job.restore()
            defer.ensureDeferred(self._listen()).addErrback(self._listen_failed, job)
        else:
            record.resumes += 1
            host, port = self._parse_target(record.target)
            job = self.jobs[record.seed_id] = SendJob(self.context, record, key, host, port)
            defer.ensureDeferred(self._restart_send(job)).addErrback(
                lambda f: job.fail(f"cannot resume after a restart: {f.getErrorMessage()}"))

    def _cannot_resume(self, record: state.SeedRecord, why: str) -> None:
        record.state, record.error = state.FAILED, why
        self.store.save(record)

    def _settle_promotion(self, record: state.SeedRecord) -> None:
        """The agent stopped while a verified seed moved into the datadir (its promotion
        record is there): finish it, or undo it, before anything else touches the
        datadir; a seed that completed so listens again for its sender to learn it."""
        key = self.store.read(record.seed_id, "key") if record.keyed else None
        job = self.jobs[record.seed_id] = ReceiveJob(self.context, record, key)
        log.warn("seed {seed}: the agent stopped while it moved the seed into {datadir}; settling "
                 "that first", seed=record.seed_id, datadir=record.datadir)

        async def settle() -> None:
            await job.settle_promotion()
            if record.state == state.COMPLETED and record.seed_id in self.completed_receives:
                await self._listen()

        defer.ensureDeferred(settle()).addErrback(
            lambda f: log.failure("seed {seed}: settling its promotion failed", f, seed=record.seed_id))

    def _remember_completed(self, record: state.SeedRecord) -> None:
        """A seed this host completed just before a restart: its sender may not have read
        the RESULT yet and reconnects to learn it, with the seed's key (kept until then)."""
        left = COMPLETED_GRACE - (self.clock.seconds() - record.updated_at)
        key = self.store.read(record.seed_id, "key") if record.keyed else None
        if left <= 0 or record.mode != "engine" or (record.keyed and key is None):
            self.store.remove(record.seed_id, "key")
            return
        try:
            job = ReceiveJob(self.context, record, key)
        except OSError:
            self.store.remove(record.seed_id, "key")
            return
        expiry = self.clock.callLater(left, self.forget_completed, record.seed_id)
        self.completed_receives[record.seed_id] = (job, expiry)
        defer.ensureDeferred(self._listen()).addErrback(
            lambda f: log.warn("seed {seed}: cannot listen to tell a late sender the result: {error}",
                               seed=record.seed_id, error=f.getErrorMessage()))

    async def _restart_send(self, job: SendJob) -> None:
        """The source must still be what it was: the same mounted snapshot, or the datadir
        with MySQL stopped.  Walking an unmounted mount point would send an empty tree."""
        record = job.record
        if record.source in ("snapshot", "datadir"):
            path = await self._source_path(record.source, record.seed_id)
            if path != record.source_path:
                raise Refused(f"the seed source moved from {record.source_path} to {path}")
        job.start()

    # --- helpers the jobs use ----------------------------------------------------------------

    def touch(self, record: state.SeedRecord, force: bool = False) -> None:
        record.updated_at = self.clock.seconds()
        for watcher in self.watchers:
            watcher(record)
        if force or record.updated_at - self._saved_at.get(record.seed_id, 0) > PROGRESS_INTERVAL:
            self.save(record)

    def save(self, record: state.SeedRecord) -> bool:
        """Write the record to StateDir; False (logged) when that failed."""
        self._saved_at[record.seed_id] = self.clock.seconds()
        for watcher in self.watchers:
            watcher(record)
        try:
            self.store.save(record)
        except OSError as e:
            log.error("cannot save seed state for {seed}: {error}", seed=record.seed_id, error=e)
            return False
        return True

    def job_ended(self, job) -> None:
        if self.jobs.get(job.seed_id) is job:
            del self.jobs[job.seed_id]
        completed = isinstance(job, ReceiveJob) and job.record.state == state.COMPLETED
        if not completed:
            # A finished seed is never resumed: its key has no use left on disk.
            self.store.remove(job.seed_id, "key")
        self.store.remove(job.seed_id, "pins")
        if self.running:
            # The heap the seed's passes freed, given back (M_TRIM_THRESHOLD would keep 32 MB).
            self.context.thread(spill.trim)
        if completed and self.running:
            state.cancelled(self.completed_receives.pop(job.seed_id, (None, None))[1])
            expiry = self.clock.callLater(COMPLETED_GRACE, self.forget_completed, job.seed_id)
            self.completed_receives[job.seed_id] = (job, expiry)
        self._close_port_if_idle()

    def forget_completed(self, seed_id: str) -> None:
        """The sender of a completed seed learned the result, or waited too long."""
        self.store.remove(seed_id, "key")
        _, expiry = self.completed_receives.pop(seed_id, (None, None))
        if expiry is not None:
            state.cancelled(expiry)
            self._close_port_if_idle()

    def _close_port_if_idle(self) -> None:
        if not self.completed_receives and not any(isinstance(j, ReceiveJob) for j in self.jobs.values()):
            defer.ensureDeferred(self.listener.close())

    def receive_job(self, seed_id: str) -> ReceiveJob | None:
        """The seed's receive job: the running one, else one that completed lately (its
        sender may reconnect to learn the result)."""
        job = self.jobs.get(seed_id)
        return job if isinstance(job, ReceiveJob) else self.completed_receives.get(seed_id, (None, None))[0]

    # --- listening -------------------------------------------------------------------------

    async def _listen(self) -> None:
        unkeyed = [job.seed_id for job in list(self.jobs.values())
                   if isinstance(job, ReceiveJob) and job.active and job.auth_key is None]
        await self.listener.listen(unkeyed)

    def _listen_failed(self, failure, job) -> None:
        job.fail(f"cannot listen on seed port {self.config.seed_transfer_port}: {failure.getErrorMessage()}")

    # --- the API ---------------------------------------------------------------------------

    def _new_record(self, seed_id: str, role: str, **fields) -> state.SeedRecord:
        now = self.clock.seconds()
        record = state.SeedRecord(seed_id=seed_id, role=role, **{"started_at": now, "updated_at": now, **fields})
        self.records[seed_id] = record
        self._prune()
        return record

    def _engine_record(self, seed_id: str, role: str, key: str | None, keep_key: bool = True,
                       **fields) -> tuple[state.SeedRecord, bytes | None]:
        """A new record of an engine seed, saved, and the seed's key derived from ``key``
        (None without one), kept in StateDir for a resume unless ``keep_key`` is false."""
        auth_key = auth.derive_auth_key(key, seed_id) if key else None
        record = self._new_record(seed_id, role, keyed=auth_key is not None, **fields)
        if auth_key is not None and keep_key:
            self.store.write(seed_id, "key", auth_key)
        self.save(record)
        return record, auth_key

    def _start(self, job) -> bool:
        """Register ``job`` (the manager alone does) and start it."""
        self.jobs[job.seed_id] = job
        job.start()
        return True

    def _active(self, seed_id: str):
        job = self.jobs.get(seed_id)
        return job if job is not None and job.active else None

    async def receive(self, seed_id: str, key: str | None = None) -> bool:
        """Start receiving ``seed_id`` into the datadir; answers once listening."""
        return await self._or_remember_refusal(seed_id, "receiver", self._receive(seed_id, key))

    async def _or_remember_refusal(self, seed_id: str, role: str, starting) -> bool:
        """Run ``starting`` (a receive or send); if it refuses, remember the seed as failed
        with the refusal, so that seed-command-completed answers true and
        seed-command-succeeded false: orchestrator never reads an HTTP error status, and
        would otherwise poll a seed that never started until its stall count gives up.
        A seed that runs on this host, or a record the refused call made itself, stays
        as it is."""
        before = self.records.get(seed_id)
        try:
            return await starting
        except AgentError as e:
            now = self.records.get(seed_id)
            if now is before and (now is None or now.terminal):
                self.save(self._new_record(seed_id, role, state=state.FAILED, error=f"refused: {e.message}"))
            raise

    async def _receive(self, seed_id: str, key: str | None) -> bool:
        job = self._active(seed_id)
        if job is not None:
            if isinstance(job, ReceiveJob) or isinstance(job, CommandJob) and job.record.role == "receiver":
                return True
            raise Refused(f"this host is sending seed {seed_id}; it cannot also receive it")
        if await self.mysql.is_running():
            raise Refused(f"MySQL is running on this host: stop it before receiving seed {seed_id}")
        datadir = await self.host.datadir()
        if not datadir or datadir == "/":
            raise Refused(f"refusing to receive seed {seed_id} into datadir {datadir!r}")
        self._refuse_busy_datadir(seed_id, datadir)
        if self.config.receive_seed_data_command:
            record = self._new_record(seed_id, "receiver", mode="command", datadir=datadir,
                                      totals=state.UNCOUNTED)
            return self._start(CommandJob(self.context, record, self.config.receive_seed_data_command,
                                          [datadir, str(self.config.seed_transfer_port)]))
        if not os.path.isdir(datadir):
            raise Refused(f"datadir {datadir} of seed {seed_id} is not a directory")
        self.store.remove(seed_id, "journal", "manifest")
        record, auth_key = self._engine_record(seed_id, "receiver", key, datadir=datadir)
        job = self.jobs[seed_id] = ReceiveJob(self.context, record, auth_key)
        try:
            await self._listen()
        except Exception as e:
            message = f"cannot listen on seed port {self.config.seed_transfer_port}: {e}"
            job.fail(message)
            raise NotAvailable(message) from None
        if auth_key is None and not self.tls:
            where = ", ".join(self.config.seed_allowed_networks) or "ANY address"
            log.warn("seed {seed}: waiting for an UNAUTHENTICATED stream from {where} on port {port} "
                     "(no key given, no seed TLS configured)", seed=seed_id, where=where,
                     port=self.config.seed_transfer_port)
        else:
            log.info("seed {seed}: waiting for the sender on port {port}", seed=seed_id,
                     port=self.config.seed_transfer_port)
        return True

    def _refuse_busy_datadir(self, seed_id: str, datadir: str) -> None:
        """Two seeds promoting into one datadir would move each other's result aside."""
        wanted = os.path.realpath(datadir)
        for job in self.jobs.values():
            record = job.record
            if (job.active and record.role == "receiver" and record.datadir
                    and os.path.realpath(record.datadir) == wanted):
                raise Refused(f"seed {record.seed_id} is still being received into datadir {datadir}: "
                              f"abort it or wait for it to end before receiving seed {seed_id}")

    def _parse_target(self, target: str) -> tuple[str, int]:
        port = self.config.seed_transfer_port
        host = target
        if target.startswith("["):
            host, _, rest = target[1:].partition("]")
            if rest.startswith(":"):
                port = int(rest[1:])
        elif target.count(":") == 1:
            host, _, text = target.partition(":")
            port = int(text)
        if not 0 < port < 65536:
            raise BadRequest(f"invalid port in target {target!r}")
        return host, port

    async def send(self, target: str, seed_id: str, key: str | None = None,
                   source: str = "snapshot") -> bool:
        """Start sending ``source`` to ``target`` ("host" or "host:port") in the background."""
        return await self._or_remember_refusal(
            seed_id, "sender", self._send(target, seed_id, key, source))

    async def _send(self, target: str, seed_id: str, key: str | None, source: str) -> bool:
        job = self._active(seed_id)
        if job is not None:
            if job.record.role == "sender" and job.record.target == target:
                return True
            raise Refused(f"seed {seed_id} is already active on this host as {job.record.role}")
        host, port = self._parse_target(target)
        self.store.remove(seed_id, "pins")  # a new send starts over: its own walk counts
        if source == "hot":
            if self.hot is None:
                raise NotAvailable("hot seeds are not available on this agent")
            return await self._send_hot(target, seed_id, key, host, port)
        path = await self._source_path(source, seed_id)
        if self.config.send_seed_data_command:
            record = self._new_record(seed_id, "sender", mode="command", target=target,
                                      source=source, source_path=path, totals=state.UNCOUNTED)
            return self._start(CommandJob(self.context, record, self.config.send_seed_data_command,
                                          [path, host, str(port)]))
        if not path or not os.path.isdir(path):
            raise Refused(f"seed source {path!r} is not a directory")
        previous = self.records.get(seed_id)
        fields = {"target": target, "source": source, "source_path": path,
                  "rate_limit": self.config.seed_rate_limit_bytes_per_sec}
        if previous is not None and previous.role == "sender":
            fields.update(resumes=previous.resumes + 1, rate_limit=previous.rate_limit,
                          started_at=previous.started_at)
        record, auth_key = self._engine_record(seed_id, "sender", key, **fields)
        return self._start(SendJob(self.context, record, auth_key, host, port))

    async def _send_hot(self, target: str, seed_id: str, key: str | None, host: str,
                        port: int) -> bool:
        """A hot seed (orchagent.backups.hot): the tool's stream sent as it is made, or a
        backup directory made first (HotBackupCommand), then sent like a snapshot."""
        made = await self.hot.source(seed_id, self.jobs)
        fields = {"target": target, "source": "hot", "rate_limit": self.config.seed_rate_limit_bytes_per_sec}
        if isinstance(made, StreamedBackup):
            # A stream cannot resume: its key is never kept.
            record, auth_key = self._engine_record(seed_id, "sender", key, keep_key=False,
                                                   bytes_total=made.estimate, totals=state.ESTIMATE, **fields)
            return self._start(StreamSendJob(self.context, record, auth_key, host, port, made.command,
                                             made.what, made.announce, cwd=made.cwd))
        record, auth_key = self._engine_record(seed_id, "sender", key, **fields)
        job = HotSeedJob(self.context, record, self.hot)
        job.ready.addCallback(self._send_backup, job, auth_key, host, port)
        job.ready.addErrback(lambda f: log.failure("hot seed {seed}: cannot send the backup", f,
                                                   seed=seed_id))
        return self._start(job)

    def _send_backup(self, data: str, made: HotSeedJob, auth_key: bytes | None, host: str,
                     port: int) -> None:
        """A hot seed's backup directory is ready: send it like a mounted snapshot; the
        work directory goes when the send ends, either way."""
        record = made.record
        record.source_path = data
        job = SendJob(self.context, record, auth_key, host, port)
        job.done.addBoth(self.hot.discard_after, record.seed_id)
        self._start(job)

    async def _source_path(self, source: str, seed_id: str) -> str:
        if source == "snapshot":
            mount = await self.snapshots.mount_state()
            if not mount.is_mounted:
                raise Refused(f"no snapshot is mounted on {mount.path or 'SnapshotMountPoint'}: "
                              f"mount one (mountlv) before sending seed {seed_id}")
            return mount.mysql_data_path
        if source == "datadir":
            if await self.mysql.is_running():
                raise Refused(f"MySQL is running: a datadir seed ({seed_id}) needs it stopped; "
                              "send a snapshot instead")
            return await self.host.datadir()
        raise BadRequest(f"unknown seed source {source!r}")

    def _record(self, seed_id: str) -> state.SeedRecord:
        record = self.records.get(seed_id)
        if record is None:
            raise NotFound(f"no seed {seed_id} on this host")
        return record

    async def reading_sources(self) -> list[dict]:
        """The sends that may still read their source (a mounted snapshot or the
        datadir): ``{"SeedId", "Source", "SourcePath"}`` each.  The snapshot API refuses
        to unmount, mount over, remove or restore what one of them reads."""
        return [{"SeedId": job.seed_id, "Source": job.record.source,
                 "SourcePath": job.record.source_path}
                for job in list(self.jobs.values())
                if job.record.role == "sender" and job.record.source in ("snapshot", "datadir")
                and getattr(job, "reading", job.active)]

    async def abort(self, seed_id: str) -> bool:
        """Stop this host's side of the seed; true also for a seed this host never heard
        of, as the original answered."""
        job = self._active(seed_id)
        if job is not None:
            await job.fail("aborted through the API", state.ABORTED)
        return True

    async def completed(self, seed_id: str) -> bool:
        """Whether this host's side ended, either way; false for a seed it never heard of
        (the original's answer)."""
        record = self.records.get(seed_id)
        return record is not None and record.terminal

    async def succeeded(self, seed_id: str) -> bool:
        record = self.records.get(seed_id)
        return record is not None and record.state == state.COMPLETED

    async def datadir_usage(self) -> int | None:
        """/api/mysql-du while this host receives a seed into its datadir, or None when it
        receives none (see orchagent.seed.usage; one datadir takes one seed at a time)."""
        for job in list(self.jobs.values()):
            if isinstance(job, ReceiveJob) and job.active:
                return await job.datadir_usage()
        return None

    async def status(self, seed_id: str) -> dict:
        return self._status(self._record(seed_id))

    def all_status(self) -> list[dict]:
        return [self._status(r) for r in self.records.values()]

    async def set_rate_limit(self, seed_id: str, bytes_per_sec: int) -> bool:
        record = self._record(seed_id)
        record.rate_limit = bytes_per_sec
        job = self._active(seed_id)
        if isinstance(job, (SendJob, ReceiveJob)):
            job.set_rate_limit(bytes_per_sec)
        self.save(record)
        log.info("seed {seed}: rate limit set to {rate} bytes/s", seed=seed_id, rate=bytes_per_sec)
        return True

    # --- progress --------------------------------------------------------------------------

    def _status(self, record: state.SeedRecord) -> dict:
        job = self._active(record.seed_id)
        if job is not None:
            return record.status(*job.progress())
        return record.status(0.0, 0.0 if record.state == state.COMPLETED else None)

    def _tick(self) -> None:
        for job in list(self.jobs.values()):
            if not job.active:
                continue
            status = self._status(job.record)
            log.info("seed {SeedId} {Role} {State}: {BytesDone}/{BytesTotal} bytes, "
                     "{FilesDone}/{FilesTotal} files (totals {Totals}), {RateBytesPerSec} B/s, "
                     "eta {EtaSeconds}s, resumes {Resumes}", **status)
            self.save(job.record)

    def _prune(self) -> None:
        finished = sorted((r for r in self.records.values() if r.terminal), key=lambda r: r.updated_at)
        for record in finished[:max(0, len(finished) - KEEP_FINISHED)]:
            del self.records[record.seed_id]
            self.store.remove(record.seed_id, "json", "key", "journal", "manifest", "pins")
