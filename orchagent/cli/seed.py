"""The seed controller: one replica seeded from a snapshot, driven over the agents' API.

:class:`Seeder` is a plain object: agents come in through ``connect`` (a host name → an
:class:`~orchagent.cli.client.AgentClient`), time through an injected reactor, output
through a :class:`~orchagent.cli.render.Reporter`, memory through a
:class:`~orchagent.cli.state.SeedStore`.  Its tests run it against in-memory agents.

The order of a seed is chosen so that nothing is erased before every check passed:

1. Checks, read-only: target MySQL stopped (or ``stop_target``), the source's newest
   snapshot valid (lvs-snapshots, SnapshotPercent < 100), the source's mount point free,
   no other seed on either host: none unfinished in our state files, none active in the
   agents' own list (/api/seeds, which sees seeds whoever started them).  Every problem found is reported at once.
2. Mount the snapshot on the source (reversible) to learn its MySQL data size; refuse and
   unmount when the target cannot hold it even after emptying its datadir (free space +
   mysql-du).  When the target has room for the copy next to its current datadir
   (free space >= size + 5%), the datadir is kept: the agent receives into a staging
   area and swaps only verified data in (setting the old contents aside, not deleting
   them), so an abort leaves the target as it was.  Only when space is short is the
   datadir emptied first, the v1 way.
3. Record the seed (hosts, snapshot, random key) in the state file, stop the target's
   MySQL if asked, empty the datadir if needed, receive on the target, send from the
   source, both with ``?key=``; follow the target's seed-status (progress bar).
4. post-copy on the target, unmount the source, start MySQL on the target and wait until
   it answers: mysql-status true and, when the agent can read the error log, a new
   "ready for connections" line.
5. With ``replicate`` (``--replicate``), once the seed's record is gone (the seed is done):
   the target's agent applies the seed's coordinates (start-replication) and the
   controller waits for both replication threads within ``max_lag`` (:meth:`Seeder.replicate`);
   a failure there undoes nothing.

An interruption (Ctrl-C, :meth:`Seeder.interrupt`) during 1-3 aborts both sides, unmounts
the source, restarts the target's MySQL if we stopped it and its datadir was kept, and
forgets the seed.  A failure during the copy (an agent unreachable, a side failed) leaves
both sides as they are and keeps the record: ``--resume`` re-sends the same id and key,
and the agents resume where the data stopped; ``abort`` cleans up instead.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Callable

import attrs
from twisted.internet import defer, task

from orchagent.cli.client import SLOW_TIMEOUT, AgentCallFailed, AgentClient, segment
from orchagent.cli.render import Reporter, format_bytes, format_duration
from orchagent.cli.state import SeedRecord, SeedStore

#: seed-status states in which a side is still working.
ACTIVE_STATES = ("pending", "running", "verifying", "checking")
#: Keep the target's datadir during the copy only with this much headroom over the size.
KEEP_DATADIR_HEADROOM = 1.05
READY_MARK = "ready for connections"


class SeedRefused(Exception):
    """The checks said no; nothing was changed on either host."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


class SeedFailed(Exception):
    """The seed stopped.  With ``resumable``, the record is kept for --resume / abort."""

    def __init__(self, message: str, seed_id: str | None = None, resumable: bool = False):
        super().__init__(message)
        self.seed_id = seed_id
        self.resumable = resumable


class ReplicationFailed(SeedFailed):
    """The seed is done (MySQL runs on the copy) but its replication did not get going
    or catch up; the datadir stays, nothing is undone."""


class SeedInterrupted(Exception):
    """The operator interrupted the seed (Ctrl-C); clean-up has run."""


@attrs.frozen
class SeedOptions:
    stop_target: bool = False
    #: Bytes per second for the sender (seed-rate-limit); 0 keeps the agent's setting.
    rate_limit: int = 0
    poll_interval: float = 1.0
    #: Seconds between receive and send (the v1 SeedWaitSecondsBeforeSend; our agents
    #: listen before receive answers, so 0 is enough).
    send_delay: float = 0.0
    #: An agent that does not answer this long fails the seed (resumable).
    unreachable_timeout: float = 60.0
    #: No byte moved this long fails the seed (resumable).
    stall_timeout: float = 600.0
    #: Seconds to wait for the target's MySQL to answer after mysql-start.
    start_timeout: float = 600.0
    #: Copy a hot backup of the source's running server (send-mysql-seed-data?source=hot)
    #: instead of its newest snapshot.
    hot: bool = False
    #: After the seed, have the target replicate from the seed's master
    #: (/api/start-replication) and wait until it is within ``max_lag`` seconds.
    replicate: bool = False
    max_lag: float = 10.0


def active_seeds(statuses: list[dict]) -> dict[tuple[str, str], int]:
    """``{(role, state): count}`` of the seeds in an active state, from an agent's /api/seeds."""
    active: dict[tuple[str, str], int] = {}
    for status in statuses:
        if status.get("State") in ACTIVE_STATES:
            key = (str(status.get("Role")), str(status["State"]))
            active[key] = active.get(key, 0) + 1
    return active


def caught_up(status: dict, max_lag: float) -> bool:
    """Both replication threads run and the lag is known and at most ``max_lag`` seconds."""
    lag = status.get("SecondsBehindMaster")
    return bool(status.get("IORunning") and status.get("SQLRunning")
                and lag is not None and lag <= max_lag)


def new_seed_id() -> str:
    return "s" + secrets.token_hex(5)


def new_key() -> str:
    return secrets.token_urlsafe(32)


@attrs.define
class _Source:
    client: AgentClient
    hostname: str
    snapshot: dict[str, Any]


class Seeder:
    def __init__(self, connect: Callable[[str], AgentClient], store: SeedStore, reactor,
                 reporter: Reporter, options: SeedOptions = SeedOptions(),
                 make_id: Callable[[], str] = new_seed_id, make_key: Callable[[], str] = new_key):
        self.connect = connect
        self.store = store
        self.reactor = reactor
        self.report = reporter
        self.options = options
        self.make_id = make_id
        self.make_key = make_key
        self._interrupted = False
        self._sleeping: defer.Deferred | None = None
        #: The target's replication status once --replicate saw it caught up.
        self.replication: dict | None = None

    # --- interruption --------------------------------------------------------------------

    def interrupt(self) -> bool:
        """Ask the running seed to stop and clean up; False when already asked."""
        if self._interrupted:
            return False
        self._interrupted = True
        if self._sleeping is not None:
            self._sleeping.cancel()
        return True

    def _check(self) -> None:
        if self._interrupted:
            raise SeedInterrupted()

    async def _sleep(self, seconds: float) -> None:
        self._check()
        self._sleeping = task.deferLater(self.reactor, seconds, lambda: None)
        try:
            await self._sleeping
        except defer.CancelledError:
            pass
        finally:
            self._sleeping = None
        self._check()

    async def _api(self, client: AgentClient, path: str, **params) -> Any:
        """A call made on the way forward: an interruption is noticed right after it."""
        value = await client.call(path, **params)
        self._check()
        return value

    # --- the seed ------------------------------------------------------------------------

    async def seed(self, target_name: str, source_name: str | None = None) -> SeedRecord:
        """Seed ``target_name`` (from ``source_name``, or a source the target suggests)."""
        target = self.connect(target_name)
        target_hostname = await self._api(target, "hostname")
        problems = await self._check_target(target)
        if source_name is not None:
            source = self.connect(source_name)
            source_problems, chosen = await self._check_source(source)
            if source.address.url == target.address.url:
                source_problems.insert(0, "source and target are the same agent")
            problems += source_problems
        else:
            chosen = await self._pick_source(target, target_hostname)
        if chosen is not None and chosen.hostname == target_hostname:
            problems.append(f"source and target are the same host ({target_hostname})")
        if chosen is not None:
            problems += await self._busy(target, chosen.client)
        if problems:
            raise SeedRefused(problems)

        source = chosen.client
        record = SeedRecord(
            seed_id=self.make_id(), key=self.make_key(), target=target.name, source=source.name,
            target_host=target.address.host, source_hostname=chosen.hostname,
            snapshot=chosen.snapshot["Path"], created_at=time.time(),
            rate_limit=self.options.rate_limit, hot=self.options.hot)
        self.report.step(f"seed {record.seed_id}: {source.name} ({chosen.hostname}) -> "
                         f"{target.name} ({target_hostname}), snapshot {chosen.snapshot['Name']}")
        self.store.save(record)
        try:
            await self._prepare(record, target, source)
            record.phase = "copying"
            self.store.save(record)
            await self._start_transfer(record, target, source)
            await self._watch(record, target, source)
        except SeedInterrupted:
            await self._clean_up(record, target, source)
            raise
        except SeedRefused:
            self.store.remove(record.seed_id)
            raise
        except AgentCallFailed as e:
            if record.phase == "prepared" and not (record.stopped_mysql or record.deleted_datadir):
                await self._clean_up(record, target, source)
                raise SeedFailed(str(e), record.seed_id) from None
            raise SeedFailed(str(e), record.seed_id, resumable=True) from None
        await self._finish_safely(record, target, source)
        return await self._maybe_replicate(record, target)

    async def _check_target(self, target: AgentClient) -> list[str]:
        running = await self._api(target, "mysql-status")
        if running is True and not self.options.stop_target:
            return [f"MySQL is running on the target {target.name} "
                    "(stop it first, or give --stop-target)"]
        return []

    async def _check_source(self, source: AgentClient) -> tuple[list[str], _Source | None]:
        """Problems of ``source`` as a seed source, and what was learned about it."""
        hostname = await self._api(source, "hostname")
        if self.options.hot:
            running = await self._api(source, "mysql-status")
            problems = [] if running is True else [
                f"MySQL is not running on the source {source.name}: a hot seed copies the running server"]
            return problems, _Source(source, hostname, {"Path": "", "Name": "(hot backup)"})
        snapshots = await self._api(source, "lvs-snapshots")
        problems = []
        newest = snapshots[0] if snapshots else None
        if newest is None:
            problems.append(f"the source {source.name} has no snapshot (lvs-snapshots is empty)")
        elif not newest.get("IsSnapshot") or float(newest.get("SnapshotPercent", 0)) >= 100:
            problems.append(
                f"the newest snapshot {newest.get('Name')} of the source {source.name} is invalid "
                f"(SnapshotPercent {newest.get('SnapshotPercent')}: it overflowed)")
        mount = await self._api(source, "mount")
        if mount.get("IsMounted"):
            problems.append(
                f"the source {source.name} already has {mount.get('LVPath') or mount.get('Device')} "
                f"mounted on {mount.get('Path')} (another seed running?)")
        return problems, _Source(source, hostname, newest) if newest is not None else None

    async def _pick_source(self, target: AgentClient, target_hostname: str) -> _Source | None:
        """The first host the target suggests (local first) that can serve as source."""
        rejected: list[str] = []
        tried: set[str] = {target_hostname, target.name, target.address.host}
        for endpoint in ("available-snapshots-local", "available-snapshots"):
            try:
                hosts = await self._api(target, endpoint)
            except AgentCallFailed as e:
                rejected.append(str(e))
                continue
            for host in hosts:
                if host in tried:
                    continue
                tried.add(host)
                try:
                    client = self.connect(host)
                    problems, found = await self._check_source(client)
                except SeedInterrupted:
                    raise
                except Exception as e:  # unreachable, or not in the settings: skip this one
                    rejected.append(f"{host}: {e}")
                    continue
                if not problems:
                    self.report.step(f"source: {host} (suggested by {target.name} {endpoint})")
                    return found
                rejected.append("; ".join(problems))
        if not rejected:
            raise SeedRefused([f"the target {target.name} knows no other host with a snapshot "
                               "(available-snapshots-local and available-snapshots are empty); "
                               "give --source HOST"])
        raise SeedRefused(["no usable source: " + " | ".join(rejected)])

    async def _busy(self, target: AgentClient, source: AgentClient) -> list[str]:
        """Other seeds on either host: unfinished ones recorded here, active ones the agents
        report in /api/seeds (any seed, whoever started it).
        When an agent cannot tell, the answer is "busy" (fail closed)."""
        ours = {target.address.url, source.address.url}
        problems = []
        for record in self.store.all():
            urls = set()
            for name in (record.target, record.source):
                try:
                    urls.add(self.connect(name).address.url)
                except Exception:
                    continue
            if ours & urls:
                problems.append(
                    f"seed {record.seed_id} ({record.source} -> {record.target}, {record.phase}) "
                    f"is unfinished: orchagent seed --resume {record.seed_id}, or "
                    f"orchagent abort {record.seed_id}")
        for client in (target, source):
            try:
                active = active_seeds(await self._api(client, "seeds"))
            except AgentCallFailed as e:
                problems.append(f"cannot tell whether {client.name} is seeding: {e}")
                continue
            if active:
                what = ", ".join(f"{n} {role} {state}" for (role, state), n in sorted(active.items()))
                problems.append(f"{client.name} is busy with another seed ({what})")
        return problems

    async def _prepare(self, record: SeedRecord, target: AgentClient, source: AgentClient) -> None:
        """Mount, check the space, stop MySQL, empty the datadir if there is no room."""
        if record.hot:
            mount = {"MySQLDataPath": "(hot backup)"}
            need = int(await self._api(source, "mysql-du"))
        else:
            self.report.step(f"mounting {record.snapshot} on {source.name}")
            mount = await self._api(source, "mountlv", lv=record.snapshot, timeout=SLOW_TIMEOUT)
            need = int(mount.get("MySQLDiskUsage") or 0)
        if not mount.get("MySQLDataPath") or need <= 0:
            if not record.hot:
                await self._unmount(source)
            raise SeedRefused([f"the snapshot {record.snapshot} on {source.name} holds no MySQL data "
                               f"(mounted on {mount.get('Path')}, MySQLDataPath empty)"])
        available = int(await self._api(target, "mysql-datadir-available-space"))
        used = int(await self._api(target, "mysql-du"))
        if need > available + used:
            if not record.hot:
                await self._unmount(source)
            raise SeedRefused([
                f"not enough space on the target {target.name}: the snapshot's MySQL data is "
                f"{format_bytes(need)} ({need} bytes); the target has {format_bytes(available)} free "
                f"plus {format_bytes(used)} in its datadir"])
        keep = available >= need * KEEP_DATADIR_HEADROOM
        if await self._api(target, "mysql-status") is True:
            self.report.step(f"stopping MySQL on {target.name}")
            record.stopped_mysql = True
            self.store.save(record)
            await self._api(target, "mysql-stop", timeout=SLOW_TIMEOUT)
            if await self._api(target, "mysql-status") is not False:
                raise AgentCallFailed(target.name, "/api/mysql-stop", "MySQL still runs after mysql-stop")
        if not keep:
            self.report.warn(
                f"{target.name} has {format_bytes(available)} free for {format_bytes(need)} of data: "
                "its datadir is emptied before the copy (an abort leaves it empty)")
            record.deleted_datadir = True
            self.store.save(record)
            await self._api(target, "delete-mysql-datadir", timeout=SLOW_TIMEOUT)
        self.report.step(f"{format_bytes(need)} to copy; "
                         + ("target datadir kept until the copy is verified" if keep
                            else "target datadir emptied"))

    async def _start_transfer(self, record: SeedRecord, target: AgentClient, source: AgentClient) -> None:
        seed = segment(record.seed_id)
        await self._api(target, f"receive-mysql-seed-data/{seed}", key=record.key)
        if self.options.send_delay:
            await self._sleep(self.options.send_delay)
        hot = {"source": "hot"} if record.hot else {}
        await self._api(source, f"send-mysql-seed-data/{segment(record.target_host)}/{seed}",
                        key=record.key, **hot)
        if record.rate_limit:
            await self._api(source, f"seed-rate-limit/{seed}", bytesPerSec=str(record.rate_limit))

    async def _status(self, client: AgentClient, seed_id: str, unreachable_since: dict) -> dict | None:
        """seed-status of one side; None while it is unreachable (within the allowance)."""
        try:
            status = await client.call(f"seed-status/{segment(seed_id)}")
        except AgentCallFailed as e:
            if not e.unreachable:
                raise
            since = unreachable_since.setdefault(client.name, self.reactor.seconds())
            if self.reactor.seconds() - since >= self.options.unreachable_timeout:
                raise
            return None
        unreachable_since.pop(client.name, None)
        return status

    async def _watch(self, record: SeedRecord, target: AgentClient, source: AgentClient) -> dict:
        """Follow the copy until the target has verified everything."""
        unreachable_since: dict[str, float] = {}
        last_done, last_growth = (-1, -1, -1), self.reactor.seconds()
        while True:
            await self._sleep(self.options.poll_interval)
            t_status = await self._status(target, record.seed_id, unreachable_since)
            self._check()
            s_status = await self._status(source, record.seed_id, unreachable_since)
            self._check()
            if t_status is not None:
                self.report.progress(t_status)
                if t_status.get("State") == "completed":
                    self.report.finish_progress()
                    if await self._api(target, f"seed-command-succeeded/{segment(record.seed_id)}") is not True:
                        raise AgentCallFailed(target.name, "seed-command-succeeded",
                                              "seed-status says completed but seed-command-succeeded is false")
                    return t_status
            for side, client, status in (("target", target, t_status), ("source", source, s_status)):
                if status is not None and status.get("State") in ("failed", "aborted", "unknown"):
                    self.report.finish_progress()
                    raise AgentCallFailed(client.name, "seed-status",
                                          f"the {side} side of seed {record.seed_id} {status.get('State')}: "
                                          f"{status.get('Error') or 'no reason given'}")
            if t_status is None:
                continue
            # Bytes moving or, while the source is walked, files found: both are progress.
            done = tuple(int(t_status.get(k) or 0) for k in ("BytesDone", "FilesTotal", "BytesTotal"))
            if done > last_done:
                last_done, last_growth = done, self.reactor.seconds()
            elif self.reactor.seconds() - last_growth >= self.options.stall_timeout:
                self.report.finish_progress()
                raise AgentCallFailed(target.name, "seed-status",
                                      f"no progress for {format_duration(self.options.stall_timeout)}")

    async def _finish_safely(self, record: SeedRecord, target: AgentClient, source: AgentClient) -> SeedRecord:
        record.phase = "finishing"
        self.store.save(record)
        try:
            await self._finish(record, target, source)
        except SeedInterrupted:
            raise SeedFailed(f"interrupted after the copy was verified; finish with "
                             f"orchagent seed --resume {record.seed_id}", record.seed_id,
                             resumable=True) from None
        except AgentCallFailed as e:
            raise SeedFailed(str(e), record.seed_id, resumable=True) from None
        self.store.remove(record.seed_id)
        return record

    async def _finish(self, record: SeedRecord, target: AgentClient, source: AgentClient) -> None:
        self.report.step(f"post-copy on {target.name}")
        await self._api(target, "post-copy/", sourceHost=record.source_hostname, timeout=SLOW_TIMEOUT)
        if not record.hot:
            await self._unmount(source)
        before = await self._error_log(target)
        self.report.step(f"starting MySQL on {target.name}")
        await self._api(target, "mysql-start", timeout=SLOW_TIMEOUT)
        await self._wait_ready(target, before)
        self.report.step(f"seed {record.seed_id} done: MySQL answers on {target.name}")

    async def _error_log(self, target: AgentClient) -> set[str] | None:
        try:
            return set(await self._api(target, "mysql-error-log-tail"))
        except AgentCallFailed as e:
            if e.unreachable:
                raise
            return None

    async def _wait_ready(self, target: AgentClient, before: set[str] | None) -> None:
        """mysql-status true and, where the log is readable, a new ready-for-connections line."""
        deadline = self.reactor.seconds() + self.options.start_timeout
        if before is None:
            self.report.warn(f"{target.name} cannot show its error log: waiting for mysql-status only")
        while True:
            running = await self._api(target, "mysql-status")
            lines = await self._error_log(target) if before is not None else None
            if running is True and (lines is None or any(
                    READY_MARK in line for line in lines - before)):
                return
            if self.reactor.seconds() >= deadline:
                tail = "\n  ".join(sorted(lines or ())) or "(no error log)"
                raise AgentCallFailed(target.name, "mysql-start",
                                      f"MySQL did not become ready within "
                                      f"{format_duration(self.options.start_timeout)}; error log tail:\n  {tail}")
            await self._sleep(self.options.poll_interval)

    # --- replication ------------------------------------------------------------------------

    async def _maybe_replicate(self, record: SeedRecord, target: AgentClient) -> SeedRecord:
        if self.options.replicate:
            self.replication = await self.replicate(record.seed_id, target)
        return record

    async def replicate(self, seed_id: str, target: AgentClient) -> dict:
        """Have ``target`` (MySQL running on the seeded copy) replicate from the seed's
        master and wait until both threads run within ``max_lag`` seconds of it.

        The agent applies the coordinates it recorded with the credentials it was given
        (/api/start-replication, a no-op when SeedStartReplication already did at
        mysql-start); the controller only asks and watches /api/replication-status.  An
        apply error or a ``Problem`` (purged binlog, refused credentials, unreachable
        master, a thread's error) raises :class:`ReplicationFailed` with the agent's words;
        nothing is undone."""
        self.report.step(f"starting replication on {target.name} (seed {seed_id}'s master)")
        try:
            status = await self._api(target, f"start-replication/{segment(seed_id)}",
                                     timeout=SLOW_TIMEOUT)
            while True:
                failure = status.get("Error") or status.get("Problem")
                if failure:
                    self.report.finish_progress()
                    raise ReplicationFailed(f"{target.name}: {failure}", seed_id)
                self.report.replication(status)
                if caught_up(status, self.options.max_lag):
                    self.report.finish_progress()
                    self.report.step(
                        f"{target.name} replicates from {status.get('MasterHost')}:{status.get('MasterPort')}, "
                        f"{status.get('SecondsBehindMaster')} s behind (at most {self.options.max_lag:g} s asked)")
                    return status
                await self._sleep(self.options.poll_interval)
                status = await self._api(target, "replication-status")
        except AgentCallFailed as e:
            self.report.finish_progress()
            raise ReplicationFailed(str(e), seed_id) from None
        except SeedInterrupted:
            self.report.finish_progress()
            raise ReplicationFailed(f"interrupted while {target.name} was catching up; the seed is done "
                                    "and replication goes on (see /api/replication-status)", seed_id) from None

    # --- resume ------------------------------------------------------------------------------

    async def resume(self, seed_id: str) -> SeedRecord:
        """Continue a seed recorded in the state file: re-send the same id and key."""
        record = self.store.load(seed_id)
        target, source = self.connect(record.target), self.connect(record.source)
        self.report.step(f"resuming seed {seed_id}: {record.source} -> {record.target} ({record.phase})")
        if record.phase == "prepared":
            raise SeedFailed(f"seed {seed_id} stopped before copying started; "
                             f"orchagent abort {seed_id}, then start a new seed", seed_id, resumable=True)
        try:
            if record.phase == "copying":
                target_state = await self._state_of(target, seed_id)
                if target_state != "completed":
                    await self._ensure_mounted(record, source)
                    source_state = await self._state_of(source, seed_id)
                    if not (target_state in ACTIVE_STATES and source_state in ACTIVE_STATES):
                        self.report.step(f"re-sending seed {seed_id} (target {target_state}, "
                                         f"source {source_state})")
                        await self._start_transfer(record, target, source)
                    await self._watch(record, target, source)
        except SeedInterrupted:
            await self._clean_up(record, target, source)
            raise
        except AgentCallFailed as e:
            raise SeedFailed(str(e), record.seed_id, resumable=True) from None
        await self._finish_safely(record, target, source)
        return await self._maybe_replicate(record, target)

    async def _state_of(self, client: AgentClient, seed_id: str) -> str | None:
        """The seed's State on one side; None when the agent does not know it."""
        try:
            return (await self._api(client, f"seed-status/{segment(seed_id)}")).get("State")
        except AgentCallFailed as e:
            if e.unreachable:
                raise
            return None

    async def _ensure_mounted(self, record: SeedRecord, source: AgentClient) -> None:
        if record.hot:
            return
        mount = await self._api(source, "mount")
        if not mount.get("IsMounted"):
            self.report.step(f"mounting {record.snapshot} on {source.name} again")
            await self._api(source, "mountlv", lv=record.snapshot, timeout=SLOW_TIMEOUT)
        elif mount.get("LVPath") and mount.get("LVPath") != record.snapshot:
            raise AgentCallFailed(source.name, "mount",
                                  f"{mount.get('LVPath')} is mounted, not this seed's {record.snapshot}")

    # --- abort and clean-up ----------------------------------------------------------------

    async def abort(self, seed_id: str, hosts: list[str] = ()) -> list[str]:
        """Abort a seed: from its record (both sides, unmount), or on the named hosts."""
        if self.store.exists(seed_id):
            record = self.store.load(seed_id)
            target, source = self.connect(record.target), self.connect(record.source)
            return await self._clean_up(record, target, source)
        if not hosts:
            raise SeedFailed(f"no record of seed {seed_id} here: name the hosts with --host")
        problems = []
        for host in hosts:
            problems += await self._quietly(self.connect(host), f"abort-seed/{segment(seed_id)}")
        return problems

    async def _quietly(self, client: AgentClient, path: str, **params) -> list[str]:
        try:
            await client.call(path, **params)
            return []
        except AgentCallFailed as e:
            self.report.warn(str(e))
            return [str(e)]

    async def _unmount(self, source: AgentClient) -> None:
        self.report.step(f"unmounting the snapshot on {source.name}")
        mount = await source.call("umount", timeout=SLOW_TIMEOUT)
        if mount.get("IsMounted"):
            raise AgentCallFailed(source.name, "/api/umount", "the snapshot is still mounted")

    async def _clean_up(self, record: SeedRecord, target: AgentClient, source: AgentClient) -> list[str]:
        """Undo an unfinished seed as far as possible; returns the problems met (also warned)."""
        problems = []
        if record.phase == "finishing":
            raise SeedFailed(f"seed {record.seed_id} is copied and verified; finish it with "
                             f"orchagent seed --resume {record.seed_id}", record.seed_id, resumable=True)
        self.report.step(f"aborting seed {record.seed_id}")
        if record.phase == "copying":
            for client in (target, source):
                problems += await self._quietly(client, f"abort-seed/{segment(record.seed_id)}")
        try:
            mount = await source.call("mount")
            if not record.hot and mount.get("IsMounted") and mount.get("LVPath") in ("", record.snapshot):
                await self._unmount(source)
        except AgentCallFailed as e:
            self.report.warn(str(e))
            problems.append(str(e))
        if record.stopped_mysql and not record.deleted_datadir:
            self.report.step(f"starting MySQL on {target.name} again (its datadir was kept)")
            problems += await self._quietly(target, "mysql-start", timeout=SLOW_TIMEOUT)
        elif record.deleted_datadir:
            self.report.warn(f"the datadir of {target.name} was emptied before the copy; it stays empty")
        if not problems:
            self.store.remove(record.seed_id)
        return problems
