"""Hot seeds: send the running server's data, with no snapshot, through the seed engine.

``send-mysql-seed-data/{target}/{seedId}?source=hot`` answers at once; in the
background the source agent does one of two things.

**Streamed** (the default): it runs ``mariabackup`` (else ``xtrabackup``) ``--backup
--stream=xbstream`` and sends the tool's output while the tool produces it
(:mod:`orchagent.seed.streamed`); the target extracts it (``mbstream -x``) into the
seed's staging directory as it arrives, then ``--prepare`` s it there, gives it the
datadir's owner, syncs it and moves it into the datadir like every seed.  Backup,
transfer and extraction overlap, so the seed takes about as long as the backup alone
plus the prepare.  The source needs no space for a copy.

Why the target prepares (the directory mode below prepares at the source): a stream's
data leaves the source as it is read, so there is nothing left there to prepare; the
target checks before any byte flows that it has the extractor and the same tool
version (``--prepare`` needs the version that made the backup) and enough space, and a
failed prepare fails the seed with the datadir untouched (staging is removed).

**Directory** (``HotBackupCommand`` set: shell text writing a backup into the directory
given as its last argument, e.g. ``xtrabackup --backup --target-dir``):

1. *backup* into ``StateDir/hot/<seedId>/data``;
2. *prepare*: ``--prepare`` on that directory (it is ours, no copy needed), then gives it
   the datadir's owner;
3. *send*: hands the directory to the seed engine, exactly like a mounted snapshot:
   manifest, verified chunks, resume, progress, the receiver's staging and atomic swap;
4. removes the work directory when the send ends, either way.

Either way the tool connects to the server with its own option groups
(``[mariabackup]``, ``[xtrabackup]``, ``[client]``) of ``MySQLOptionsFile`` or of its
default files: the agent holds no MySQL credentials.  The tool checks every page's
checksum as it copies it.  When this host's server is a replica (its SHOW SLAVE STATUS,
through MySQLClientCommand, names a master), the streamed backup is taken with
``--slave-info`` and that master is announced to the target (:meth:`HotSeeds.master`):
the copy replicates from the replica's master, not from the replica.

What resumes: nothing of a streamed seed — a lost connection, a failing tool, an abort
or an agent stop on either side fails the seed (the target removes staging, its datadir
untouched) and a new seed takes a new backup.  (Spooling the stream to the source's disk
to resend it would cost a full write of the backup on the source, and the target would
need its own spool to restart the extractor mid-stream: not worth it for a seed that
lasts as long as its backup.)  In directory mode the send (step 3) resumes like every
seed — after a lost connection, a restart of the target agent, or a restart of the
source agent (the work directory is kept across it and the engine resumes from it;
:meth:`HotSeeds.adopt` then removes it when that send ends); the backup and prepare
(steps 1-2) do not.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import attrs

from twisted.internet import defer, threads
from twisted.logger import Logger

from orchagent.backups.discovery import checkpoints_file, read_backup
from orchagent.backups.prepare import Preparer
from orchagent.backups.tools import Tools
from orchagent.errors import AgentError, NotAvailable, Refused, StepFailed, reason_of
from orchagent.host.diskusage import free_bytes
from orchagent.process import CommandGroup
from orchagent.replica.control import ThisServersMaster, master_of_this_server
from orchagent.seed.state import FAILED, RUNNING, JobIdentity, failure_message

log = Logger()

#: Free space a hot backup needs beyond the size of the datadir it copies.
SPACE_MARGIN = 64 << 20
#: Files mariabackup/xtrabackup copy at once during a hot backup.
BACKUP_THREADS = 2


@attrs.frozen
class StreamedBackup:
    """A hot seed's source by default: ``command`` writes the backup as an xbstream to
    its standard output, sent as it is made (orchagent.seed.streamed); ``announce`` tells
    the target the tool, its version and the ``estimate`` of the size."""

    command: list[str]
    what: str
    cwd: str
    estimate: int
    announce: dict


@attrs.frozen
class BackupDirectory:
    """A hot seed's source with HotBackupCommand: a backup to make, prepare and own in
    ``work`` (a HotSeedJob), then sent like a mounted snapshot."""

    work: str


class HotSeeds:
    """Makes and cleans up hot seeds' sources; :meth:`source` is the seed manager's hook
    (the manager makes and registers the jobs)."""

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

    async def source(self, seed_id: str, jobs: Mapping[str, Any]) -> StreamedBackup | BackupDirectory:
        """What hot seed ``seed_id`` sends, once its checks passed (the manager makes the
        job): the tool's stream, or a backup directory still to be made (HotBackupCommand).
        ``jobs``: the manager's jobs by seed id (work directories none of them uses are
        removed first)."""
        if self.config.send_seed_data_command:
            raise NotAvailable(f"hot seed {seed_id}: hot seeds run on the seed engine, and "
                               "SendSeedDataCommand (the original command mode) is configured")
        if not self.config.hot_backup_command and self.tools.hot_tool() is None:
            raise NotAvailable(f"hot seed {seed_id}: neither mariabackup nor xtrabackup is "
                               "installed (or set HotBackupCommand)")
        # The checks run together: the seed's clock is running.
        usage = defer.ensureDeferred(self.host.mysql_disk_usage())
        if not await self.service.is_running():
            usage.addErrback(lambda _: None)
            raise Refused(f"hot seed {seed_id}: MySQL is not running here; a hot seed copies "
                          "the running server (send a snapshot or the datadir instead)")
        await self.sweep(jobs)
        size = await usage
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        if not self.config.hot_backup_command:
            # BytesTotal starts as the datadir's size (an estimate: the backup leaves out
            # the redo log files and binary logs, and adds a little framing) and becomes
            # the stream's exact length at its end.
            tool = self.tools.hot_tool()
            version = await self.tools.version(tool)
            master = await self.master(seed_id)
            announce = {"tool": tool, "version": version, "estimate": size}
            if master is not None:
                announce["master"] = master.announce()
            return StreamedBackup(
                command=[*self.tools.backup_argv(tool, slave_info=master is not None),
                         "--stream=xbstream"],
                what=f"{tool} --backup --stream", cwd=self.root, estimate=size, announce=announce)
        need = size + SPACE_MARGIN
        free = free_bytes(self.root)
        if free < need:
            raise Refused(f"hot seed {seed_id}: not enough space for the backup in {self.root}: "
                          f"it needs about {need} bytes (the datadir's size) and {free} are free")
        return BackupDirectory(work=self.work_dir(seed_id))

    async def master(self, seed_id: str) -> ThisServersMaster | None:
        """The master this server replicates from, None for a primary.  A replica's
        backup is taken with ``--slave-info`` and its master announced to the target:
        the copy replicates from that master at the position the replica had applied at
        the backup's consistent point, not from this host at its own binlog's end (which
        would need log_slave_updates, and makes a chain the operator did not ask for)."""
        try:
            master = await master_of_this_server(self.config, self.runner)
        except AgentError as e:
            log.warn("hot seed {seed}: cannot tell whether this server is a replica ({why}); "
                     "the backup is taken as a primary's (without --slave-info): its copy "
                     "replicates from this host", seed=seed_id, why=e.message)
            return None
        if master is not None:
            log.info("hot seed {seed}: this server replicates from {host}:{port}; the backup "
                     "records its position there (--slave-info)", seed=seed_id,
                     host=master.host, port=master.port)
        return master

    def adopt(self, jobs: Mapping[str, Any]) -> None:
        """After the manager resumed its seeds (agent start; ``jobs`` by seed id): a
        resumed hot send removes its work directory when it ends; one whose backup had not
        finished, or that was streaming (either side), cannot go on."""
        for job in list(jobs.values()):
            record = job.record
            if record.source != "hot" or not job.active:
                continue
            if record.role == "receiver":
                if not record.promoting:
                    job.fail("the agent restarted while receiving a streamed hot seed; a "
                             "stream cannot resume: start the seed again")
                continue
            if not record.source_path or not os.path.isdir(record.source_path):
                job.fail("the agent restarted while the hot backup was being made or streamed; "
                         "it cannot resume: start the seed again")
                continue
            job.done.addBoth(self.discard_after, record.seed_id)
        defer.ensureDeferred(self.sweep(jobs)).addErrback(
            lambda f: log.failure("hot seeds: removing leftovers failed", f))

    async def sweep(self, jobs: Mapping[str, Any]) -> None:
        """Remove work directories no active seed uses (left by a crash or a kill)."""
        try:
            names = os.listdir(self.root)
        except OSError:
            return
        for name in names:
            job = jobs.get(name)
            if job is None or not job.active:
                log.info("hot seeds: removing the leftover work directory {path}",
                         path=os.path.join(self.root, name))
                await self.remove(os.path.join(self.root, name))

    def discard_after(self, result, seed_id: str):
        """Remove the seed's work directory (a Deferred's callback: ``result`` passes)."""
        d = defer.ensureDeferred(self.remove(self.work_dir(seed_id)))
        d.addErrback(lambda f: log.failure("hot seed {seed}: removing the work directory failed",
                                           f, seed=seed_id))
        return result

    # --- steps 1 and 2 -----------------------------------------------------------------------

    async def produce(self, seed_id: str, runner: CommandGroup) -> str:
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
                    [*self.tools.backup_argv(tool), f"--parallel={BACKUP_THREADS}",
                     f"--target-dir={data}"],
                    timeout=0, check=False, privileged=True)
                what = f"{tool} --backup"
            if not result.ok:
                raise AgentError(result.tool_failure(what))
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
                raise StepFailed(f"hot seed {seed_id}: step {step} failed: {reason_of(e)}") from e
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
    """Steps 1-2 of a hot seed in directory mode (HotBackupCommand): backup, prepare and
    own the work directory; ``ready`` then fires with its data path, and the seed manager
    hands the seed to a SendJob of that directory (step 3).  This job is then done."""

    def __init__(self, context: Any, record: Any, hot: HotSeeds):
        super().__init__(context, record)
        self.hot = hot
        self.runner = CommandGroup(hot.runner)
        self.handed_over = False
        self.ready = defer.Deferred()

    @property
    def active(self) -> bool:
        return not self.record.terminal and not self.handed_over

    def start(self) -> None:
        self.record.state = RUNNING
        self.context.touch(self.record, force=True)
        defer.ensureDeferred(self._run()).addErrback(self._crashed)

    async def _run(self) -> None:
        data = await self.hot.produce(self.seed_id, self.runner)
        if self.record.terminal:
            return
        self.handed_over = True
        log.info("hot seed {seed}: backup ready in {data}; sending", seed=self.seed_id, data=data)
        self.ready.callback(data)
        self.done.callback(None)

    def _crashed(self, failure) -> None:
        if not self.record.terminal:
            self.fail(failure_message(failure, self.seed_id, f"hot seed {self.seed_id}"))

    def fail(self, message: str, final_state: str | None = None) -> defer.Deferred:
        """Stop the backup or prepare that runs, remove the work directory, and end."""
        if not self.active:
            return defer.succeed(None)
        self.end_record(message, final_state or FAILED, log)
        self.runner.cancel()
        self.context.touch(self.record, force=True)
        return defer.ensureDeferred(self._clean_up())

    async def _clean_up(self) -> None:
        try:
            await self.runner.ended()  # a dying backup tool writes on until it is gone
            await self.hot.remove(self.hot.work_dir(self.seed_id))
        except Exception:
            log.failure("hot seed {seed}: removing the work directory failed", seed=self.seed_id)
        finally:
            self.context.store.remove(self.seed_id, "key")
            self._settle()

    async def stop(self) -> None:
        """Service stop during steps 1-2: they cannot resume, so the seed fails."""
        await self.fail("the agent stopped while the hot backup ran; a hot backup cannot "
                        "resume: start the seed again")
