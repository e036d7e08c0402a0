"""Simulated MySQL hosts behind the real agent API, in memory, for controller tests.

Each :class:`FakeHost` is a real :class:`~orchagent.api.resource.AgentAPI` (so paths,
parameters, the token and the v1 error body are the real ones) whose components are small
models of one host: MySQL running or not, a datadir (file name -> size), free space,
snapshots, the snapshot mount, an error log and the seeds it takes part in.  A
:class:`FakeNetwork` moves seed data between hosts on an injected clock, the way the
engine does as far as a controller can see: the receiver stages and swaps verified data
in at the end (the previous datadir is kept aside), a re-sent seed id resumes where the
bytes stopped, an abort throws staging away.

Example::

    net = FakeNetwork(clock, token="t")
    db1 = net.add("db1", files={"ibdata1": 100}, snapshots=[("snap-2", 0.0, {...})])
    db2 = net.add("db2", running=True)
    http = net.http_for(address)          # what the controller's http_factory returns
    client = net.client()                 # one client for all hosts (stand-in orchestrator)
    db2.changes                           # mutating calls made on db2, in order
"""

from __future__ import annotations

from typing import Any

from treq.testing import StubTreq
from twisted.internet import defer, task

from orchagent.agent import Agent
from orchagent.api.resource import AgentAPI
from orchagent.config import Config
from orchagent.errors import CommandFailed, NotAvailable, NotFound, Refused
from orchagent.seed.usage import visible_progress
from orchagent.snapshots.model import LogicalVolume, Mount
from orchagent.token import Token

MOUNT_POINT = "/mnt/snapshot"
TICK = 0.5


class _Registration:
    def is_healthy(self) -> bool:
        return True


class FakeSeedSide:
    """One side of a seed on one host; ``status()`` is the seed-status answer."""

    def __init__(self, seed_id: str, role: str, key: str | None, started_at: float):
        self.seed_id = seed_id
        self.role = role
        self.key = key
        self.state = "pending"
        self.bytes_total = 0
        self.bytes_done = 0
        self.files_total = 0
        self.files_done = 0
        self.rate = 0
        self.resumes = 0
        self.error = ""
        self.started_at = started_at
        #: What the totals are (orchagent.seed.state: walking, estimate, final, unknown).
        self.totals = "final"

    def status(self) -> dict[str, Any]:
        left = self.bytes_total - self.bytes_done
        return {
            "SeedId": self.seed_id, "Role": self.role, "State": self.state,
            "BytesTotal": self.bytes_total, "BytesDone": self.bytes_done,
            "FilesTotal": self.files_total, "FilesDone": self.files_done,
            "RateBytesPerSec": self.rate,
            "EtaSeconds": int(left / self.rate) if self.rate and self.totals == "final" else None,
            "Totals": self.totals, "Resumes": self.resumes, "Error": self.error,
            "StartedAt": "2024-01-01T00:00:00Z", "UpdatedAt": "2024-01-01T00:00:00Z",
        }


class FakeHost:
    def __init__(self, network: "FakeNetwork", name: str, *, hostname: str | None = None,
                 running: bool = False, files: dict[str, int] | None = None,
                 available: int = 10 << 30, snapshots=(), local=(), anywhere=(),
                 error_log: bool = True, datacenter: str = "dc1"):
        self.network = network
        self.name = name
        self.hostname = hostname or f"{name}.example"
        self.running = running
        self.datadir: dict[str, int] = dict(files or {})
        #: Previous datadirs the receiver moved aside when it swapped a seed in.
        self.aside: list[dict[str, int]] = []
        self.available = available
        #: [(name, percent, files)] newest first.
        self.snapshots = [tuple(s) for s in snapshots]
        self.mounted: str | None = None
        self.local_hosts = list(local)
        self.anywhere_hosts = list(local) + [h for h in anywhere if h not in local]
        self.has_error_log = error_log
        self.log: list[str] = [f"{name} old line {i}" for i in range(3)]
        self.starts = 0
        self.down = False
        self.seeds: dict[str, FakeSeedSide] = {}
        self.changes: list[tuple] = _Changes(self)
        #: Called with each change as it is made (tests interrupt a seed at a given step).
        self.on_change = None
        self.post_copy_sources: list[str | None] = []
        #: Raised (once) by the next post-copy, to fail a seed after its copy.
        self.post_copy_error: Exception | None = None
        #: What /api/replication-status answers, one per call (the last one stays); the
        #: first is start-replication's.  Empty: not a replica.
        self.replication_statuses: list[dict[str, Any]] = []
        self.agent = agent = Agent(
            config=Config(snapshot_mount_point=MOUNT_POINT, datacenter=datacenter),
            reactor=network.clock, runner=None, hostname=self.hostname,
            token=Token(network.token), service=_Service(self), host=_Facts(self),
            binlogs=None, snapshots=_Snapshots(self), snapshot_hosts=_SnapshotHosts(self),
            seeds=_Seeds(self), registration=_Registration(), replication=_Replication(self))
        self.stub = StubTreq(AgentAPI(agent).resource())

    # --- as seen by tests -------------------------------------------------------------

    def snapshot_path(self, name: str) -> str:
        return f"/snapshots/{name}"

    def kill(self) -> None:
        """The agent dies: no answers, its sending sides stop moving data."""
        self.down = True

    def revive(self) -> None:
        """The agent restarts: it answers again; a seed it was sending is failed."""
        self.down = False
        for side in self.seeds.values():
            if side.role == "sender" and side.state in ("pending", "running"):
                side.state, side.error = "failed", "the agent restarted"

    @property
    def mutations(self) -> list[str]:
        return [c[0] for c in self.changes]


class _Changes(list):
    def __init__(self, host: FakeHost):
        super().__init__()
        self.host = host

    def append(self, change: tuple) -> None:
        super().append(change)
        if self.host.on_change is not None:
            self.host.on_change(change)


class _Service:
    def __init__(self, h: FakeHost):
        self.h = h

    async def is_running(self) -> bool:
        return self.h.running

    async def stop(self) -> bool:
        self.h.changes.append(("mysql-stop",))
        self.h.running = False
        return True

    async def start(self) -> bool:
        self.h.changes.append(("mysql-start",))
        if "ibdata1" not in self.h.datadir:
            raise CommandFailed("command shell exited with status 1: no MySQL data in the datadir")
        self.h.running = True
        self.h.starts += 1
        self.h.log.append(f"[Note] mariadbd: ready for connections (start {self.h.starts})")
        return True


class _Replication:
    """start-replication and replication-status, from ``replication_statuses``."""

    def __init__(self, h: FakeHost):
        self.h = h

    async def after_start(self, statuses) -> bool:
        return False  # SeedStartReplication unset, as by default

    async def status(self) -> dict:
        if not self.h.replication_statuses:
            return {"IORunning": False, "SQLRunning": False, "Error": "", "Problem": ""}
        if len(self.h.replication_statuses) > 1:
            return self.h.replication_statuses.pop(0)
        return self.h.replication_statuses[0]

    async def start(self, seed_id: str, statuses) -> dict:
        if not any(s.get("SeedId") == seed_id and s.get("State") == "completed" for s in statuses):
            raise NotFound(f"this host knows no completed seed {seed_id}")
        self.h.changes.append(("start-replication", seed_id))
        return await self.status()


class _Facts:
    def __init__(self, h: FakeHost):
        self.h = h

    async def mysql_disk_usage(self) -> int:
        return sum(self.h.datadir.values()) + sum(sum(a.values()) for a in self.h.aside)

    async def datadir_available_space(self) -> int:
        return self.h.available

    async def error_log_tail(self) -> list[str]:
        if not self.h.has_error_log:
            raise NotAvailable("the MySQL error log is not configured")
        return self.h.log[-20:]

    async def port(self) -> int:
        return 3306

    async def delete_datadir(self) -> bool:
        if self.h.running:
            raise Refused("MySQL is running: refusing to delete its datadir")
        self.h.changes.append(("delete-mysql-datadir",))
        self.h.available += sum(self.h.datadir.values())
        self.h.datadir.clear()
        return True

    async def post_copy(self, source: str | None) -> bool:
        self.h.changes.append(("post-copy", source))
        error, self.h.post_copy_error = self.h.post_copy_error, None
        if error is not None:
            raise error
        self.h.post_copy_sources.append(source)
        return True


class _Snapshots:
    def __init__(self, h: FakeHost):
        self.h = h

    def _volume(self, name: str, percent: float) -> LogicalVolume:
        return LogicalVolume(name=name, group_name="snaps", path=self.h.snapshot_path(name),
                             is_snapshot=True, snapshot_percent=percent)

    async def list_snapshots(self):
        return [self._volume(name, percent) for name, percent, _ in self.h.snapshots]

    def _files(self, name: str) -> dict[str, int]:
        for snap, _, files in self.h.snapshots:
            if snap == name:
                return files
        raise NotFound(f"no snapshot named {name!r}")

    async def mount_state(self) -> Mount:
        if self.h.mounted is None:
            return Mount(path=MOUNT_POINT)
        size = sum(self._files(self.h.mounted).values())
        return Mount(path=MOUNT_POINT, device="/dev/fake", lv_path=self.h.snapshot_path(self.h.mounted),
                     file_system="btrfs", is_mounted=True, disk_usage=size,
                     mysql_data_path=MOUNT_POINT + "/mysql", mysql_disk_usage=size)

    async def mount(self, name: str) -> Mount:
        short = name.rsplit("/", 1)[-1]
        self._files(short)
        if self.h.mounted is not None:
            raise Refused(f"{MOUNT_POINT} is already mounted")
        self.h.changes.append(("mountlv", name))
        self.h.mounted = short
        return await self.mount_state()

    async def unmount(self) -> Mount:
        self.h.changes.append(("umount",))
        self.h.mounted = None
        return await self.mount_state()


class _SnapshotHosts:
    def __init__(self, h: FakeHost):
        self.h = h

    async def local(self):
        return self.h.local_hosts

    async def anywhere(self):
        return self.h.anywhere_hosts


class _Seeds:
    def __init__(self, h: FakeHost):
        self.h = h

    def _side(self, seed_id: str) -> FakeSeedSide:
        try:
            return self.h.seeds[seed_id]
        except KeyError:
            raise NotFound(f"no seed {seed_id!r} on this host") from None

    async def receive(self, seed_id: str, key: str | None = None) -> bool:
        self.h.changes.append(("receive", seed_id))
        if self.h.running:
            raise Refused("MySQL is running: refusing to receive a seed into its datadir")
        side = self.h.seeds.get(seed_id)
        if side is None or side.state in ("failed", "aborted"):
            old = side
            side = FakeSeedSide(seed_id, "receiver", key, self.h.network.clock.seconds())
            if old is not None and old.state == "failed":
                side.bytes_done, side.resumes = old.bytes_done, old.resumes + 1
            self.h.seeds[seed_id] = side
        elif side.key != key:
            raise Refused("seed already known with another key")
        return True

    async def send(self, target: str, seed_id: str, key: str | None = None, source: str = "snapshot") -> bool:
        self.h.changes.append(("send", target, seed_id))
        if self.h.mounted is None:
            raise Refused("no snapshot is mounted")
        receiver_host = self.h.network.find(target)
        side = self.h.seeds.get(seed_id)
        if side is None or side.state in ("failed", "aborted"):
            side = FakeSeedSide(seed_id, "sender", key, self.h.network.clock.seconds())
            self.h.seeds[seed_id] = side
        self.h.network.transfer(self.h, receiver_host, seed_id)
        return True

    async def abort(self, seed_id: str) -> None:
        self.h.changes.append(("abort-seed", seed_id))
        side = self.h.seeds.get(seed_id)
        if side is not None and side.state not in ("completed", "failed"):
            side.state = "aborted"

    async def status(self, seed_id: str) -> dict:
        return self._side(seed_id).status()

    async def completed(self, seed_id: str) -> bool:
        return self._side(seed_id).state in ("completed", "failed", "aborted")

    async def datadir_usage(self) -> int | None:
        """As the engine shows a receive in mysql-du: what the datadir holds plus the
        seed's visible progress (orchagent.seed.usage)."""
        side = next((s for s in self.h.seeds.values()
                     if s.role == "receiver" and s.state in ("pending", "running")), None)
        if side is None:
            return None
        return await _Facts(self.h).mysql_disk_usage() + visible_progress(
            side.bytes_total, side.bytes_done, 0)

    async def succeeded(self, seed_id: str) -> bool:
        return self._side(seed_id).state == "completed"

    async def set_rate_limit(self, seed_id: str, limit: int) -> bool:
        self._side(seed_id).rate = limit
        self.h.changes.append(("seed-rate-limit", seed_id, limit))
        return True

    def all_status(self) -> list[dict]:
        return [side.status() for side in self.h.seeds.values()]


class _Unreachable:
    """The treq surface of a host that may be down (connection refused)."""

    def __init__(self, host: FakeHost):
        self.host = host

    def get(self, url, **kwargs):
        if self.host.down:
            return defer.fail(ConnectionRefusedError(f"connection to {self.host.name} refused"))
        kwargs.pop("reactor", None)
        kwargs.pop("timeout", None)
        return self.host.stub.get(url, **kwargs)


class _Dispatcher:
    def __init__(self, network: "FakeNetwork"):
        self.network = network

    def get(self, url, **kwargs):
        from urllib.parse import urlsplit

        host = self.network.find(urlsplit(url).hostname)
        if host is None:
            return defer.fail(ConnectionRefusedError(url))
        return _Unreachable(host).get(url, **kwargs)


class FakeNetwork:
    """The hosts by name (the URL host part) and the seed transfers between them."""

    def __init__(self, clock: task.Clock, token: str = "fleet-token", bytes_per_second: int = 100,
                 walk_seconds: float = 0.0):
        self.clock = clock
        self.token = token
        self.bytes_per_second = bytes_per_second
        #: Seconds a transfer spends walking its source first (its totals growing, no data).
        self.walk_seconds = walk_seconds
        self.hosts: dict[str, FakeHost] = {}
        self._loops: dict[tuple[str, str], task.LoopingCall] = {}

    def add(self, name: str, **kwargs) -> FakeHost:
        host = FakeHost(self, name, **kwargs)
        self.hosts[name] = host
        return host

    def find(self, host: str) -> FakeHost | None:
        """A host by its name or its hostname."""
        return self.hosts.get(host) or next(
            (h for h in self.hosts.values() if h.hostname == host), None)

    def http_for(self, address) -> _Unreachable:
        """The controller's http_factory: one client per agent address."""
        return _Unreachable(self.hosts[address.host])

    def client(self) -> "_Dispatcher":
        """One treq-like client for every host, chosen by the URL's host (orchestrator)."""
        return _Dispatcher(self)

    def transfer(self, sender_host: FakeHost, receiver_host: FakeHost | None, seed_id: str) -> None:
        sender = sender_host.seeds[seed_id]
        files = dict(next(f for n, _, f in sender_host.snapshots if n == sender_host.mounted))
        total = sum(files.values())
        receiver = receiver_host.seeds.get(seed_id) if receiver_host is not None else None
        if receiver is None or receiver.state in ("failed", "aborted", "completed"):
            sender.state, sender.error = "failed", f"the target refused seed {seed_id}"
            return
        if receiver.key != sender.key:
            for side in (sender, receiver):
                side.state, side.error = "failed", "handshake failed: wrong key"
            return
        start = receiver.bytes_done
        if receiver.state == "running" or start:
            receiver.resumes += 1
        for side in (sender, receiver):
            side.state, side.bytes_total, side.files_total = "running", total, len(files)
            side.bytes_done = start
        walked_at = self.clock.seconds() + self.walk_seconds
        if self.walk_seconds:
            for side in (sender, receiver):
                side.totals, side.bytes_total, side.files_total = "walking", 0, 0
        self._stop(sender_host, seed_id)
        loop = task.LoopingCall(self._tick, sender_host, receiver_host, seed_id, files, walked_at)
        loop.clock = self.clock
        self._loops[sender_host.name, seed_id] = loop
        loop.start(TICK, now=False)

    def _tick(self, sender_host: FakeHost, receiver_host: FakeHost, seed_id: str, files: dict,
              walked_at: float = 0.0) -> None:
        sender, receiver = sender_host.seeds[seed_id], receiver_host.seeds[seed_id]
        if sender_host.down or sender.state != "running" or receiver.state != "running":
            self._stop(sender_host, seed_id)
            return
        if self.clock.seconds() < walked_at:
            share = 1 - (walked_at - self.clock.seconds()) / self.walk_seconds
            for side in (sender, receiver):
                side.files_total = int(len(files) * share)
                side.bytes_total = int(sum(files.values()) * share)
            return
        if sender.totals == "walking":
            for side in (sender, receiver):
                side.totals, side.bytes_total, side.files_total = "final", sum(files.values()), len(files)
        step = int((sender.rate or self.bytes_per_second) * TICK)
        done = min(sender.bytes_total, receiver.bytes_done + step)
        for side in (sender, receiver):
            side.bytes_done = done
            side.files_done = int(side.files_total * done / max(1, side.bytes_total))
            side.rate = sender.rate or self.bytes_per_second
        if done == sender.bytes_total:
            if receiver_host.datadir:
                receiver_host.aside.append(dict(receiver_host.datadir))
            receiver_host.datadir = dict(files)
            receiver_host.available -= sum(files.values())
            sender.state = receiver.state = "completed"
            self._stop(sender_host, seed_id)

    def _stop(self, sender_host: FakeHost, seed_id: str) -> None:
        loop = self._loops.pop((sender_host.name, seed_id), None)
        if loop is not None and loop.running:
            loop.stop()
