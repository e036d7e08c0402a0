"""Hot seeds: send the running server's data, with no snapshot, through the seed engine.

``send-mysql-seed-data/{target}/{seedId}?source=hot`` answers at once; in the
background the source agent

1. *backup*: runs ``HotBackupCommand`` (shell text; the directory to write the backup
   into is appended as its last argument, e.g. ``xtrabackup --backup --target-dir``) or,
   by default, ``mariabackup`` (else ``xtrabackup``) ``--backup --parallel=2
   --target-dir=StateDir/hot/<seedId>/data``.  The tool connects to the server with its
   own option groups (``[mariabackup]``, ``[xtrabackup]``, ``[client]``) of
   ``MySQLOptionsFile`` or of its default files: the agent holds no MySQL credentials.
   The tool checks every page's checksum as it copies it.
2. *prepare*: ``--prepare`` on that directory (it is ours, no copy needed), then gives it
   the datadir's owner;
3. *send*: hands the directory to the seed engine, exactly like a mounted snapshot:
   manifest, verified chunks, resume, progress, the receiver's staging and atomic swap;
4. removes the work directory when the send ends, either way.

Why the source prepares, not the target: ``--prepare`` must be run by the same tool
version that made the backup, which only the source is sure to have (a new replica may
have none, or another version); a prepare that fails (a corrupt page, a bad redo log)
then fails the seed before a byte is sent and before the target is touched; and the
target stays an ordinary receiver, with nothing to run on data that came off the
network.  The cost is the prepare's I/O on the source, where the backup's is anyway.

What resumes: the send (step 3) resumes like every seed — after a lost connection, a
restart of the target agent, or a restart of the source agent (the work directory is
kept across it and the engine resumes from it; :meth:`HotSeeds.adopt` then removes it
when that send ends).  The backup and prepare (steps 1-2) do not: if they fail, are
aborted, or the source agent stops during them, the seed fails, the partial backup is
removed, and a new seed takes a new backup.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger

from orchagent.backups.discovery import checkpoints_file, read_backup
from orchagent.backups.prepare import Preparer, StepFailed, _free_bytes, _tail
from orchagent.backups.tools import Tools
from orchagent.errors import AgentError, NotAvailable, Refused
from orchagent.seed.state import JobIdentity

log = Logger()

#: Free space a hot backup needs beyond the size of the datadir it copies.
SPACE_MARGIN = 64 << 20
#: Files mariabackup/xtrabackup copy at once during a hot backup.
BACKUP_THREADS = 2


class _TrackedRunner:
    """The agent's runner, remembering the commands in flight so an abort can stop them
    (cancelling a runner Deferred stops its process group)."""

    def __init__(self, runner):
        self.runner = runner
        self.running: set[defer.Deferred] = set()

    def _track(self, d: defer.Deferred) -> defer.Deferred:
        self.running.add(d)

        def forget(result):
            self.running.discard(d)
            return result

        return d.addBoth(forget)

    def run(self, argv, **kwargs):
        return self._track(self.runner.run(argv, **kwargs))

    def shell(self, text, args=(), **kwargs):
        return self._track(self.runner.shell(text, args=args, **kwargs))

    def cancel(self) -> None:
        for d in list(self.running):
            d.cancel()


class HotSeeds:
    """Makes and cleans up hot seeds; :meth:`send` is the seed manager's hook."""

    def __init__(self, config: Any, runner: Any, host: Any, service: Any, tools: Tools,
                 thread=threads.deferToThread):
        self.config = config
        self.runner = runner
        self.host = host
        self.service = service
        self.tools = tools
        self.thread = thread

    @property
    def root(self) -> str:
        return os.path.join(self.config.state_dir, "hot")

    def work_dir(self, seed_id: str) -> str:
        return os.path.join(self.root, seed_id)

    # --- the seed manager's hooks ------------------------------------------------------------

    async def send(self, manager: Any, seed_id: str, target: str, host: str, port: int,
                   key: str | None) -> bool:
        """Start hot seed ``seed_id`` to ``target``; answers once the checks passed."""
        from orchagent.seed import auth

        if self.config.send_seed_data_command:
            raise NotAvailable(f"hot seed {seed_id}: hot seeds run on the seed engine, and "
                               "SendSeedDataCommand (the original command mode) is configured")
        if not await self.service.is_running():
            raise Refused(f"hot seed {seed_id}: MySQL is not running here; a hot seed copies "
                          "the running server (send a snapshot or the datadir instead)")
        if not self.config.hot_backup_command and self.tools.hot_tool() is None:
            raise NotAvailable(f"hot seed {seed_id}: neither mariabackup nor xtrabackup is "
                               "installed (or set HotBackupCommand)")
        await self.sweep(manager)
        need = await self.host.mysql_disk_usage() + SPACE_MARGIN
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        free = _free_bytes(self.root)
        if free < need:
            raise Refused(f"hot seed {seed_id}: not enough space for the backup in {self.root}: "
                          f"it needs about {need} bytes (the datadir's size) and {free} are free")
        auth_key = auth.derive_auth_key(key, seed_id) if key else None
        record = manager._new_record(seed_id, "sender", target=target, source="hot",
                                     keyed=auth_key is not None,
                                     rate_limit=self.config.seed_rate_limit_bytes_per_sec)
        if auth_key is not None:
            manager.store.write(seed_id, "key", auth_key)
        manager.save(record)
        job = HotSeedJob(self, manager, record, auth_key, host, port)
        manager.jobs[seed_id] = job
        job.start()
        return True

    def adopt(self, manager: Any) -> None:
        """After the manager resumed its seeds (agent start): a resumed hot send removes
        its work directory when it ends; one whose backup had not finished cannot go on."""
        for job in list(manager.jobs.values()):
            record = job.record
            if record.source != "hot" or record.role != "sender" or not job.active:
                continue
            if not record.source_path or not os.path.isdir(record.source_path):
                job.fail("the agent restarted before the hot backup was ready; a hot backup "
                         "cannot resume: start the seed again")
                continue
            job.done.addBoth(self._discard_after, record.seed_id)
        defer.ensureDeferred(self.sweep(manager)).addErrback(
            lambda f: log.failure("hot seeds: removing leftovers failed", f))

    async def sweep(self, manager: Any) -> None:
        """Remove work directories no active seed uses (left by a crash or a kill)."""
        try:
            names = os.listdir(self.root)
        except OSError:
            return
        for name in names:
            job = manager.jobs.get(name)
            if job is None or not job.active:
                log.info("hot seeds: removing the leftover work directory {path}",
                         path=os.path.join(self.root, name))
                await self.remove(os.path.join(self.root, name))

    def _discard_after(self, result, seed_id: str):
        d = defer.ensureDeferred(self.remove(self.work_dir(seed_id)))
        d.addErrback(lambda f: log.failure("hot seed {seed}: removing the work directory failed",
                                           f, seed=seed_id))
        return result

    # --- steps 1 and 2 -----------------------------------------------------------------------

    async def produce(self, seed_id: str, runner: _TrackedRunner) -> str:
        """Backup, prepare and own the work directory of ``seed_id``; its data path."""
        work = self.work_dir(seed_id)
        data = os.path.join(work, "data")
        preparer = Preparer(self.config, runner, self.tools, self.host, self.thread)
        await self.remove(work)
        await self.thread(os.makedirs, work, 0o700)

        async def backup():
            if self.config.hot_backup_command:
                result = await runner.shell(self.config.hot_backup_command, args=[data],
                                            timeout=0, check=False)
                what = "HotBackupCommand"
            else:
                tool = self.tools.hot_tool()
                if tool is None:
                    raise NotAvailable("neither mariabackup nor xtrabackup is installed")
                # The backup is on the seed's critical path; two copy threads shorten it.
                result = await runner.run(
                    [tool, *self.tools.defaults_args(), "--backup", f"--parallel={BACKUP_THREADS}",
                     f"--target-dir={data}"],
                    timeout=0, check=False, privileged=True)
                what = f"{tool} --backup"
            if not result.ok:
                status = "was killed" if result.exit_code is None else f"exited with status {result.exit_code}"
                raise AgentError(f"{what} {status}: {_tail(result.stderr)}")
            if not os.path.isdir(data) or checkpoints_file(data) is None:
                raise AgentError(f"{what} left no backup (no checkpoints file) in {data}")

        async def prepare():
            made = await self.thread(read_backup, data, seed_id)
            await preparer._decode([made], work)
            await preparer.prepare(made.tool, data, [])

        async def own():
            try:
                datadir = await self.host.datadir()
            except AgentError:
                datadir = None
            await preparer.own(data, datadir)

        for step, function in (("backup", backup), ("prepare", prepare), ("own", own)):
            log.info("hot seed {seed}: {step} in {work}", seed=seed_id, step=step, work=work)
            try:
                await function()
            except defer.CancelledError:
                raise
            except Exception as e:
                reason = e.message if isinstance(e, AgentError) else f"{type(e).__name__}: {e}"
                raise StepFailed(f"hot seed {seed_id}: step {step} failed: {reason}") from e
        return data

    async def remove(self, path: str) -> None:
        """Rename aside first (a tool still writing can no longer add to it), then delete."""
        if not os.path.lexists(path):
            return
        doomed = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.removing")
        if os.path.lexists(doomed):
            await self.runner.run(["rm", "-rf", "--one-file-system", "--", doomed], privileged=True, timeout=0)
        await self.thread(os.rename, path, doomed)
        await self.runner.run(["rm", "-rf", "--one-file-system", "--", doomed], privileged=True, timeout=0)


class HotSeedJob(JobIdentity):
    """Steps 1-2 of a hot seed, standing in the seed manager's jobs until the engine's
    SendJob takes over (step 3); then it is done."""

    def __init__(self, hot: HotSeeds, manager: Any, record: Any, auth_key: bytes | None,
                 host: str, port: int):
        self.hot = hot
        self.manager = manager
        self.record = record
        self.auth_key = auth_key
        self.host = host
        self.port = port
        self.runner = _TrackedRunner(hot.runner)
        self.sender = None
        self.done = defer.Deferred()

    @property
    def active(self) -> bool:
        return not self.record.terminal and self.sender is None

    def start(self) -> None:
        from orchagent.seed import state

        self.record.state = state.RUNNING
        self.manager.touch(self.record, force=True)
        defer.ensureDeferred(self._run()).addErrback(self._crashed)

    async def _run(self) -> None:
        from orchagent.seed.sender import SendJob

        data = await self.hot.produce(self.seed_id, self.runner)
        if self.record.terminal:
            return
        self.record.source_path = data
        sender = SendJob(self.manager, self.record, self.auth_key, self.host, self.port)
        sender.done.addBoth(self.hot._discard_after, self.seed_id)
        self.sender = sender
        self.manager.jobs[self.seed_id] = sender
        log.info("hot seed {seed}: backup ready in {data}; sending", seed=self.seed_id, data=data)
        sender.start()
        self.done.callback(None)

    def _crashed(self, failure) -> None:
        if self.record.terminal:
            return
        message = failure.value.message if failure.check(AgentError) else \
            f"hot seed {self.seed_id} failed: {failure.getErrorMessage()}"
        if not failure.check(AgentError):
            log.failure("hot seed {seed}: crashed", failure, seed=self.seed_id)
        self.fail(message)

    def fail(self, message: str, final_state: str | None = None) -> defer.Deferred:
        """Stop the backup or prepare that runs, remove the work directory, and end."""
        from orchagent.seed import state

        if self.record.terminal or self.sender is not None:
            return defer.succeed(None)
        self.record.state = final_state or state.FAILED
        self.record.error = message
        if self.record.state == state.FAILED:
            log.error("seed {seed} failed: {message}", seed=self.seed_id, message=message)
        else:
            log.warn("seed {seed} aborted: {message}", seed=self.seed_id, message=message)
        self.runner.cancel()
        self.manager.touch(self.record, force=True)
        return defer.ensureDeferred(self._clean_up())

    async def _clean_up(self) -> None:
        try:
            await self.hot.remove(self.hot.work_dir(self.seed_id))
        except Exception:
            log.failure("hot seed {seed}: removing the work directory failed", seed=self.seed_id)
        finally:
            self.manager.store.remove(self.seed_id, "key")
            self.manager.job_ended(self)
            if not self.done.called:
                self.done.callback(None)

    async def stop(self) -> None:
        """Service stop during steps 1-2: they cannot resume, so the seed fails."""
        await self.fail("the agent stopped while the hot backup ran; a hot backup cannot "
                        "resume: start the seed again")

    def progress(self) -> tuple[float, float | None]:
        return 0.0, None
