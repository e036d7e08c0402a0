"""End to end, nothing mocked: two hosts seed one another.

Each "host" is a network namespace (tests.support.netns: the two joined by a veth pair)
with its own address, a real agent (``twistd -n orchestrator-agent`` run inside the
namespace), a real MariaDB, and a btrfs loop file system holding the datadir subvolume,
the snapshots and the snapshot mount point.  The seed stream runs agent to agent over the
veth pair; the controller (the ``orchagent`` command, as a child process) and the
stand-in orchestrator reach each agent over its host's management link.

The source's MariaDB holds a few tables (120k, 60k and 20k rows) and takes writes while
its snapshot is made.  A seed is right when CHECKSUM TABLE of every table on the seeded
target equals what a throwaway server started on a writable clone of the same snapshot
reports: both did InnoDB crash recovery from the same bytes.

Runs as root only (namespaces, loop devices, mounts); everything made is removed at
cleanup, also when a test fails.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from urllib.parse import quote

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.trial import unittest

from orchagent.config import FIELDS
from orchagent.snapshots import mountinfo
from tests.support import mariadb as mariadb_support
from tests.support.btrfs import make_btrfs
from tests.support.daemon import REPO_ROOT, Daemon, start_daemon
from tests.support.mariadb import MariaDB
from tests.support.netns import create_pair
from tests.support.orchestrator import StandInOrchestrator, V1Seed
from tests.test_backups_mariadb import backup as mariabackup_backup, mariabackup_unavailable

DATABASE = "seedtest"
FS_SIZE = 640 << 20
#: Bytes per second the source sends at in the tests that interrupt a copy mid-way.
SLOW_RATE = 12 << 20
#: The stand-in orchestrator's poll interval (orchestrator's is 30 s), and the source's
#: rate for its seed: a few 2 MiB chunks between two polls, as at 30 s and full speed.
V1_POLL = 1.0
V1_RATE = 6 << 20
_ATTR_TO_KEY = {f.attr: f.key for f in FIELDS}
#: Seconds a writer may run when a test stops it (stop_writer) once what it must outlast
#: is over: a seed's backup or snapshot takes longer on a loaded machine, and a writer of
#: fixed length may end before it.
UNTIL_STOPPED = 300.0
REPL_PASSWORD = "r3pl-Pw-e2e-71b"

POPULATE = f"""
CREATE DATABASE {DATABASE};
USE {DATABASE};
CREATE TABLE t1 (id INT PRIMARY KEY, v VARCHAR(64) NOT NULL, n BIGINT NOT NULL, KEY (n)) ENGINE=InnoDB;
INSERT INTO t1 SELECT seq, MD5(seq), seq * 7919 % 100003 FROM seq_1_to_120000;
CREATE TABLE t2 (id INT AUTO_INCREMENT PRIMARY KEY, payload VARBINARY(255), created DATETIME) ENGINE=InnoDB;
INSERT INTO t2 (payload, created)
  SELECT REPEAT(UNHEX(SHA2(seq, 256)), 4), '2024-01-01' + INTERVAL seq SECOND FROM seq_1_to_60000;
CREATE TABLE t3 (id INT PRIMARY KEY, label VARCHAR(32)) ENGINE=Aria;
INSERT INTO t3 SELECT seq, CONCAT('label-', seq) FROM seq_1_to_20000;
CREATE TABLE w (id INT AUTO_INCREMENT PRIMARY KEY, k INT NOT NULL, note VARCHAR(40)) ENGINE=InnoDB;
CREATE TABLE writer_stop (id INT PRIMARY KEY) ENGINE=InnoDB;
DELIMITER //
CREATE PROCEDURE writer(secs DOUBLE)
BEGIN
  DECLARE stop_at DOUBLE DEFAULT UNIX_TIMESTAMP(NOW(6)) + secs;
  DECLARE i INT DEFAULT 0;
  WHILE UNIX_TIMESTAMP(NOW(6)) < stop_at AND NOT EXISTS (SELECT 1 FROM writer_stop) DO
    INSERT INTO w (k, note) VALUES (i, CONCAT('row ', i));
    UPDATE t1 SET n = n + 1 WHERE id = 1 + (i * 37) % 120000;
    SET i = i + 1;
    DO SLEEP(0.001);
  END WHILE;
END //
DELIMITER ;
"""

_golden: dict[str, str] = {}


async def stop_writer(db: MariaDB, writer: defer.Deferred) -> None:
    """Stop a ``CALL writer(UNTIL_STOPPED)`` and wait for it (the flag is cleared after)."""
    await db.sql_async("INSERT INTO writer_stop VALUES (1)", DATABASE)
    await writer
    await db.sql_async("DELETE FROM writer_stop", DATABASE)


async def writes_after(db: MariaDB, gtid: str, timeout: float = 60) -> None:
    """Until ``db`` has written a transaction after GTID position ``gtid``."""
    seq = int(gtid.rsplit("-", 1)[1])
    deadline = reactor.seconds() + timeout
    while int((await db.sql_async("SELECT @@gtid_binlog_pos"))[0][0].rsplit("-", 1)[1]) <= seq:
        if reactor.seconds() > deadline:
            raise AssertionError(f"nothing written after {gtid} within {timeout}s")
        await task.deferLater(reactor, 0.05, lambda: None)


def golden_datadir() -> str:
    """A populated, cleanly shut down datadir, made once per test process (blocking)."""
    if "data" in _golden:
        return _golden["data"]
    base = tempfile.mkdtemp(prefix="mdb-golden-")
    _golden["base"] = base
    atexit.register(shutil.rmtree, base, True)
    os.chmod(base, 0o755)
    shutil.chown(base, "mysql", "mysql")
    server = MariaDB(base)
    try:
        server.install()
        server.start()
        server.sql(POPULATE)
    finally:
        server.stop()
    _golden["data"] = server.datadir
    return server.datadir


def checksums(db: MariaDB) -> dict[str, tuple[str, str]]:
    """``{table: (CHECKSUM TABLE, COUNT(*))}`` for every table of the test database."""
    tables = [row[0] for row in db.sql(
        f"SELECT table_name FROM information_schema.tables WHERE table_schema = '{DATABASE}' "
        "AND table_type = 'BASE TABLE' ORDER BY table_name")]
    result = {}
    for table in tables:
        checksum = db.sql(f"CHECKSUM TABLE `{DATABASE}`.`{table}` EXTENDED")[0][1]
        count = db.sql(f"SELECT COUNT(*) FROM `{DATABASE}`.`{table}`")[0][0]
        result[table] = (checksum, count)
    return result


def tree_manifest(top: str) -> dict[str, tuple]:
    """Every entry under ``top``: files with size and SHA-1, directories and links."""
    manifest = {}
    for directory, dirs, files in os.walk(top):
        for name in dirs:
            path = os.path.join(directory, name)
            manifest[os.path.relpath(path, top)] = ("dir",)
        for name in files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                manifest[os.path.relpath(path, top)] = ("link", os.readlink(path))
                continue
            digest = hashlib.sha1()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            manifest[os.path.relpath(path, top)] = ("file", os.path.getsize(path), digest.hexdigest())
    return manifest


def mounted_on(path: str) -> bool:
    return mountinfo.at(mountinfo.read(), mountinfo.normalize(path)) is not None


class Host:
    """One simulated MySQL host: namespace, btrfs, MariaDB, agent."""

    def __init__(self, ns, fs, datadir, snapshots, mount_point, db, agent):
        self.ns = ns
        self.fs = fs
        self.datadir = datadir
        self.snapshots = snapshots
        self.mount_point = mount_point
        self.db = db
        self.agent = agent

    @property
    def address(self) -> str:
        """HOST for the controller: the host's address and its agent's port."""
        return f"{self.ns.address}:{self.agent.port}"

    async def api(self, endpoint: str, **params):
        status, body = await self.agent.get(endpoint, **params)
        if status != 200:
            raise AssertionError(f"{self.ns.address} {endpoint}: HTTP {status}: {body}")
        return body


class ControllerProcess(protocol.ProcessProtocol):
    """``orchagent ...`` as a child process: its output as it comes, its exit status."""

    def __init__(self):
        self.out = b""
        self.err = b""
        self.ended = defer.Deferred()
        self._watchers: list[tuple] = []

    def outReceived(self, data):
        self.out += data
        self._notify()

    def errReceived(self, data):
        self.err += data

    def _notify(self):
        for watcher in list(self._watchers):
            predicate, d = watcher
            if predicate(self.out.decode("utf-8", "replace")):
                self._watchers.remove(watcher)
                d.callback(None)

    def wait_for(self, predicate, timeout: float = 60.0) -> defer.Deferred:
        d = defer.Deferred()
        self._watchers.append((predicate, d))
        self._notify()
        return d.addTimeout(timeout, reactor)

    def processEnded(self, reason):
        code = reason.value.exitCode if isinstance(reason.value, (ProcessDone, ProcessTerminated)) else None
        self.ended.callback(code)

    def text(self) -> str:
        return self.out.decode("utf-8", "replace") + self.err.decode("utf-8", "replace")


def bytes_done(output: str) -> list[int]:
    """BytesDone of each progress line the controller printed so far (any unit)."""
    units = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    return [int(float(n) * units[u]) for n, u in
            re.findall(r"^progress: \S+\s+\S+%\s+([0-9.]+) (B|KiB|MiB|GiB) /", output, re.MULTILINE)]


class SeedEndToEndTests(unittest.TestCase):
    timeout = 300

    def setUp(self):
        reason = mariadb_support.unavailable_reason()
        if reason:
            raise unittest.SkipTest(reason)
        self.pair = create_pair(self)
        self.home = os.path.abspath(self.mktemp())
        os.makedirs(self.home)
        self.token_file = os.path.join(self.home, "fleet-token")
        with open(self.token_file, "w") as fh:
            fh.write(hashlib.sha256(os.urandom(32)).hexdigest() + "\n")
        os.chmod(self.token_file, 0o600)

    # --- fixtures ------------------------------------------------------------------------

    def agent_config(self, ns, fs, datadir, snapshots, mount_point, db, extra) -> dict:
        config = {
            "AgentHostname": ns.address, "HTTPBindAddress": ns.address, "TokenFile": self.token_file,
            "SnapshotBackend": "btrfs", "SnapshotDirectory": snapshots,
            "SnapshotMountPoint": mount_point, "SnapshotVolumesFilter": "orchsnap",
            "CommandTimeoutSeconds": 120,
        }
        config.update({_ATTR_TO_KEY[k]: v for k, v in db.agent_settings().items()})
        config.update(extra or {})
        return config

    async def make_host(self, ns, *, populated: bool, config: dict | None = None,
                        db: dict | None = None) -> Host:
        """``db``: more arguments of the host's MariaDB (port, server_id, options)."""
        fs = make_btrfs(self, size=FS_SIZE, label="orchagent-e2e")
        datadir = fs.subvolume("mysql")
        shutil.chown(datadir, "mysql", "mysql")
        if populated:
            subprocess.run(["cp", "-a", "--", golden_datadir() + "/.", datadir + "/"], check=True)
            db = MariaDB.create(self, datadir=datadir, install=False, **(db or {}))
        else:
            db = MariaDB.create(self, datadir=datadir, **(db or {}))
            db.sql("CREATE DATABASE targetonly; CREATE TABLE targetonly.m (x INT) ENGINE=InnoDB; "
                   "INSERT INTO targetonly.m VALUES (42)")
        snapshots = fs.directory("snapshots")
        mount_point = fs.scratch("mnt")
        settings = self.agent_config(ns, fs, datadir, snapshots, mount_point, db, config)
        agent = await start_daemon(self, settings, prefix=ns.prefix, address=ns.address)
        return Host(ns, fs, datadir, snapshots, mount_point, db, agent)

    async def hosts(self, source_config=None, target_config=None) -> tuple[Host, Host]:
        source = await self.make_host(self.pair.a, populated=True, config=source_config)
        target = await self.make_host(self.pair.b, populated=False, config=target_config)
        return source, target

    async def snapshot_under_writes(self, source: Host) -> dict:
        """create-snapshot while the writer runs; the snapshot's LogicalVolume."""
        writer = source.db.sql_async("CALL writer(2.5)", DATABASE)
        count = "SELECT COUNT(*) FROM w"
        while int((await source.db.sql_async(count, DATABASE))[0][0]) == 0:
            await task.deferLater(reactor, 0.05, lambda: None)
        before = int((await source.db.sql_async(count, DATABASE))[0][0])
        self.assertIs(await source.api("/api/create-snapshot"), True)
        after = int((await source.db.sql_async(count, DATABASE))[0][0])
        await writer
        self.assertGreater(after, before, "the writer kept writing while the snapshot was made")
        snapshots = await source.api("/api/lvs-snapshots")
        self.assertEqual(len(snapshots), 1)
        self.assertEqual(snapshots[0]["SnapshotPercent"], 0.0)
        return snapshots[0]

    async def reference_checksums(self, source: Host, snapshot: dict) -> dict:
        """CHECKSUM TABLE from a throwaway server on a writable clone of ``snapshot``."""
        clone = source.fs.path("reference-clone")
        subprocess.run(["btrfs", "subvolume", "snapshot", snapshot["Path"], clone],
                       check=True, stdout=subprocess.DEVNULL)
        server = MariaDB.create(self, datadir=clone, install=False, start=False)
        await server.start_async()
        try:
            sums = await defer.Deferred.fromCoroutine(_in_thread(checksums, server))
        finally:
            await server.stop_async()
        self.assertEqual(sorted(sums), ["t1", "t2", "t3", "w", "writer_stop"])
        self.assertEqual([sums[t][1] for t in ("t1", "t2", "t3")], ["120000", "60000", "20000"])
        self.assertGreater(int(sums["w"][1]), 0)
        return sums

    async def controller(self, *argv) -> ControllerProcess:
        process = ControllerProcess()
        env = dict(os.environ, ORCHAGENT_HOME=os.path.join(self.home, "controller"),
                   ORCHAGENT_TOKEN_FILE=self.token_file, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p))
        args = [sys.executable, "-m", "orchagent.cli.main", *argv]
        transport = reactor.spawnProcess(process, args[0], args, env=env, path=self.home)

        def kill():
            if not process.ended.called:
                transport.signalProcess("KILL")
            return process.ended

        self.addCleanup(kill)
        return process

    async def run_controller(self, *argv) -> tuple[int, str]:
        process = await self.controller(*argv)
        code = await process.ended
        return code, process.text()

    async def fill(self, host: Host) -> None:
        """Leave about 2 MiB free on the host's file system (btrfs may report free space
        late: fill until the agent sees it)."""
        for i in range(5):
            free = await host.api("/api/mysql-datadir-available-space")
            if free < 4 << 20:
                return
            filler = host.fs.path(f"filler-{i}")
            subprocess.run(["fallocate", "-l", str(free - (2 << 20)), filler], stderr=subprocess.DEVNULL)
            subprocess.run(["btrfs", "filesystem", "sync", host.fs.mount_point], check=True)
        self.fail(f"{host.fs.mount_point} does not fill up")

    def records(self) -> list[str]:
        directory = os.path.join(self.home, "controller", "seeds")
        return sorted(os.listdir(directory)) if os.path.isdir(directory) else []

    async def assertSeeded(self, target: Host, reference: dict) -> None:
        self.assertTrue(target.db.is_running(), "MySQL runs on the seeded target")
        seeded = await defer.Deferred.fromCoroutine(_in_thread(checksums, target.db))
        self.assertEqual(seeded, reference)

    async def assertUnmounted(self, source: Host) -> None:
        self.assertFalse((await source.api("/api/mount"))["IsMounted"])
        self.assertFalse(mounted_on(source.mount_point))

    # --- the whole path --------------------------------------------------------------------

    async def test_seed_with_the_controller(self):
        source, target = await self.hosts()
        snapshot = await self.snapshot_under_writes(source)
        reference = await self.reference_checksums(source, snapshot)
        self.assertTrue(target.db.is_running())

        code, output = await self.run_controller(
            "seed", "--target", target.address, "--source", source.address, "--stop-target",
            "--poll-interval", "0.3")
        self.assertEqual(code, 0, output)
        self.assertIn(f"stopping MySQL on {target.address}", output)
        self.assertIn("target datadir kept until the copy is verified", output)
        self.assertIn("100.0%", output)
        self.assertRegex(output, r"seed s[0-9a-f]+ done: MySQL answers on ")
        await self.assertSeeded(target, reference)
        await self.assertUnmounted(source)
        self.assertEqual(self.records(), [])
        # Nothing was lost: the target's own data was set aside by the receiver, not deleted.
        kept = [name for name in os.listdir(target.datadir) if name.startswith(".orchagent-previous-")]
        self.assertEqual(len(kept), 1)
        self.assertTrue(os.path.exists(os.path.join(target.datadir, kept[0], "targetonly", "m.ibd")))
        seed_id = re.search(r"seed (s[0-9a-f]+) done", output).group(1)
        status = await target.api(f"/api/seed-status/{seed_id}")
        self.assertEqual((status["State"], status["BytesDone"]), ("completed", status["BytesTotal"]))

    async def test_seed_by_the_stand_in_orchestrator(self):
        orchestrator = StandInOrchestrator()
        url = await orchestrator.serve(self, interface=self.pair.callback_address)
        registering = {"AgentsServer": url, "ContinuousPollSeconds": 1}
        source, target = await self.hosts({**registering, "SeedRateLimitBytesPerSec": V1_RATE},
                                          registering)
        await orchestrator.wait_for("submit-agent", 2, timeout=30)
        submitted = {s.hostname: s for s in orchestrator.submissions}
        snapshot = await self.snapshot_under_writes(source)
        reference = await self.reference_checksums(source, snapshot)
        await target.db.stop_async()

        # Rate-limited so that the seed takes more polls than orchestrator's stall limit
        # (ten: five minutes at its 30 s), with orchestrator's exact stall counter.  The
        # datadir is a btrfs subvolume: staging is inside it, files preallocated.
        seed = V1Seed(orchestrator, submitted[target.ns.address], submitted[source.ns.address], 4711,
                      wait_before_send=0.5, poll_interval=V1_POLL)
        outcome = await seed.run()
        self.assertTrue(outcome.ok, f"{outcome.reason}; mysql-du at each poll: {seed.polled_usage}")
        self.assertEqual(outcome.problems, (), "every answer has the v1 type")
        self.assertGreaterEqual(len(seed.polled_usage), 15, seed.polled_usage)
        self.assertLessEqual(seed.stale_polls, 1, seed.polled_usage)
        final = seed.polled_usage[-1]
        self.assertTrue(all(u < final for u in seed.polled_usage[:-1]), seed.polled_usage)
        calls = [c.split(" ", 1)[1] for c in outcome.calls]
        self.assertIn(f"mountlv?lv={snapshot['Path'].replace('/', '%2F')}", calls)
        self.assertEqual(calls[-5:], ["seed-command-completed/4711", "seed-command-succeeded/4711",
                                      f"post-copy/?sourceHost={source.ns.address}", "umount",
                                      "mysql-start"])
        await self.assertSeeded(target, reference)
        await self.assertUnmounted(source)

    # --- ending with a replica (SeedStartReplication, seed --replicate) ---------------------

    async def replication_hosts(self, source_config=None, target_config=None,
                                source_options=None) -> tuple[Host, Host]:
        """A primary whose server listens on its own address inside its namespace, with a
        replication user, and a target on the same port (as hosts of one fleet are) with
        another server id, whose agent is given that user in ReplicationCredentialsFile."""
        port = mariadb_support.free_port()
        credentials = os.path.join(self.home, "repl.cnf")
        with open(credentials, "w") as fh:
            fh.write(f"[client]\nuser=repl\npassword={REPL_PASSWORD}\n")
        os.chmod(credentials, 0o600)
        source = await self.make_host(self.pair.a, populated=True, config=source_config,
                                      db={"port": port, "options": {"bind-address": "0.0.0.0",
                                                                    **(source_options or {})}})
        source.db.sql(f"CREATE USER repl@'%' IDENTIFIED BY '{REPL_PASSWORD}';"
                      "GRANT REPLICATION SLAVE ON *.* TO repl@'%'")
        # Started again by its agent, the server runs inside the source's namespace.
        await source.db.stop_async()
        self.assertIs(await source.api("/api/mysql-start"), True)
        target = await self.make_host(
            self.pair.b, populated=False, db={"port": port, "server_id": 2},
            config={"ReplicationCredentialsFile": credentials, **(target_config or {})})
        return source, target

    async def quiet_snapshot(self, source: Host) -> dict:
        """create-snapshot after a burst of writes has ended.

        Not under writes: a btrfs snapshot taken while the server commits can hold InnoDB
        commits whose binlog events (buffered writes, sync_binlog=0) it does not hold, so
        the copy's binlog end is behind its data and replication from it repeats
        transactions (seen here as error 1062); see README, "Replicating and caught up"."""
        await source.db.sql_async("CALL writer(0.5)", DATABASE)
        self.assertIs(await source.api("/api/create-snapshot"), True)
        return (await source.api("/api/lvs-snapshots"))[0]

    async def assertReplicates(self, source: Host | MariaDB, target: Host) -> dict:
        """Rows written on the source (a host, or the master server itself) after the seed
        reach the target; with writes paused and the target at the source's GTID, every
        table's CHECKSUM TABLE is the source's."""
        master = source.db if isinstance(source, Host) else source
        status = await target.api("/api/replication-status")
        self.assertEqual((status["MasterHost"], status["MasterPort"], status["UsingGTID"]),
                         (self.pair.a.address, master.port, "Slave_Pos"), status)
        await master.sql_async("CALL writer(1.0)", DATABASE)
        (gtid,), = await master.sql_async("SELECT @@gtid_binlog_pos")
        deadline = reactor.seconds() + 120
        while (await target.db.sql_async("SELECT @@gtid_slave_pos")) != [(gtid,)]:
            status = await target.api("/api/replication-status")
            self.assertFalse(status["Problem"], status)
            self.assertLess(reactor.seconds(), deadline, f"the target did not reach {gtid}: {status}")
            await task.deferLater(reactor, 0.2, lambda: None)
        on_source = await defer.Deferred.fromCoroutine(_in_thread(checksums, master))
        on_target = await defer.Deferred.fromCoroutine(_in_thread(checksums, target.db))
        self.assertEqual(on_target, on_source)
        status = await target.api("/api/replication-status")
        self.assertTrue(status["IORunning"] and status["SQLRunning"], status)
        self.assertEqual((status["Error"], status["Problem"]), ("", ""))
        for directory in (target.agent.directory, os.path.join(self.home, "controller")):
            for top, _, files in os.walk(directory):
                for name in files:
                    with open(os.path.join(top, name), "rb") as fh:
                        self.assertNotIn(REPL_PASSWORD.encode(), fh.read(), os.path.join(top, name))
        return status

    async def test_seed_with_the_controller_ends_replicating(self):
        """seed --replicate: the copy of the primary's snapshot replicates from the
        primary and the controller returns once it is within --max-lag."""
        source, target = await self.replication_hosts()
        await self.quiet_snapshot(source)
        # Written after the snapshot: replication brings them.
        await source.db.sql_async("INSERT INTO w (k, note) VALUES (-1, 'after the snapshot')", DATABASE)
        code, output = await self.run_controller(
            "seed", "--target", target.address, "--source", source.address, "--stop-target",
            "--poll-interval", "0.3", "--replicate", "--max-lag", "10")
        self.assertEqual(code, 0, output)
        self.assertRegex(output, r"starting replication on \S+ \(seed s[0-9a-f]+'s master\)")
        self.assertRegex(output, r"replication: lag (\?|\d+ s)  relay ")
        self.assertRegex(output, rf"replicates from {re.escape(self.pair.a.address)}:{source.db.port}, "
                                 r"\d+ s behind \(at most 10 s asked\)")
        self.assertNotIn(REPL_PASSWORD, output)
        await self.assertReplicates(source, target)
        self.assertEqual(await target.db.sql_async(
            f"SELECT COUNT(*) FROM {DATABASE}.w WHERE note = 'after the snapshot'"), [("1",)])

    async def test_a_primarys_snapshot_under_writes_with_sync_binlog_ends_replicating(self):
        """With sync_binlog=1 on the primary, its btrfs snapshot taken while it commits
        holds every binlog event InnoDB committed (without it, 3 snapshots in 10 did not):
        the copy replicates from the right position."""
        source, target = await self.replication_hosts(source_options={"sync-binlog": "1"})
        await self.snapshot_under_writes(source)
        code, output = await self.run_controller(
            "seed", "--target", target.address, "--source", source.address, "--stop-target",
            "--poll-interval", "0.3", "--replicate")
        self.assertEqual(code, 0, output)
        await self.assertReplicates(source, target)

    async def test_a_hot_seed_under_writes_ends_replicating(self):
        """seed --hot --replicate while the primary takes writes: the backup's consistent
        point (mariadb_backup_binlog_info) is where the copy replicates from."""
        source, target = await self.replication_hosts()
        writer = source.db.sql_async(f"CALL writer({UNTIL_STOPPED})", DATABASE)
        coordinates = await self.seed_replicating(source, target, source.db.port, "--hot")
        await stop_writer(source.db, writer)
        self.assertIn("binlog_info", coordinates["From"])
        (written,), = await source.db.sql_async("SELECT @@gtid_binlog_pos")
        self.assertLess(int(coordinates["GTID"].rsplit("-", 1)[1]), int(written.rsplit("-", 1)[1]),
                        "the writer went on after the backup's consistent point")
        await self.assertReplicates(source, target)

    async def test_a_backup_of_the_primary_under_writes_ends_replicating(self):
        """A ``mariabackup --backup`` of the primary taken while it writes, in its agent's
        BackupDirectories, is the source's newest snapshot: the agent prepares it on
        mountlv and sends the prepared copy; with --replicate the target replicates from
        the primary at the backup's consistent point (mariadb_backup_binlog_info)."""
        if mariabackup_unavailable():
            raise unittest.SkipTest(mariabackup_unavailable())
        backups = os.path.join(self.home, "backups")
        os.makedirs(backups)
        source, target = await self.replication_hosts({"BackupDirectories": [backups]})
        nightly = os.path.join(backups, "nightly")
        writer = source.db.sql_async("CALL writer(4.0)", DATABASE)
        count = "SELECT COUNT(*) FROM w"
        while int((await source.db.sql_async(count, DATABASE))[0][0]) == 0:
            await task.deferLater(reactor, 0.05, lambda: None)
        before = int((await source.db.sql_async(count, DATABASE))[0][0])
        await defer.Deferred.fromCoroutine(_in_thread(mariabackup_backup, source.db, nightly))
        after = int((await source.db.sql_async(count, DATABASE))[0][0])
        await writer
        self.assertGreater(after, before, "the writer kept writing while the backup was taken")
        await source.db.sql_async("INSERT INTO w (k, note) VALUES (-1, 'after the backup')", DATABASE)
        snapshots = await source.api("/api/lvs-snapshots")
        self.assertEqual([(s["Name"], s["GroupName"]) for s in snapshots], [("nightly", "backup")])

        coordinates = await self.seed_replicating(source, target, source.db.port)
        self.assertRegex(coordinates["From"], r"^(mariadb_backup|xtrabackup)_binlog_info, ")
        (written,), = await source.db.sql_async("SELECT @@gtid_binlog_pos")
        self.assertLess(int(coordinates["GTID"].rsplit("-", 1)[1]), int(written.rsplit("-", 1)[1]),
                        "the writer went on after the backup's consistent point")
        await self.assertUnmounted(source)
        await self.assertReplicates(source, target)
        self.assertEqual(await target.db.sql_async(
            f"SELECT COUNT(*) FROM {DATABASE}.w WHERE note = 'after the backup'"), [("1",)])

    async def replica_hosts(self, target_config=None, source_config=None) -> tuple[MariaDB, Host, Host]:
        """A primary (its own server, listening on the source namespace's address, with a
        replication user), the source host whose server replicates from it with
        MASTER_USE_GTID=slave_pos (server id 3), and a target on the source's port (server
        id 2): the primary's server, the source host and the target host."""
        port = mariadb_support.free_port()
        primary_dir = tempfile.mkdtemp(prefix="mdb-primary-")
        self.addCleanup(shutil.rmtree, primary_dir, True)
        os.chmod(primary_dir, 0o755)
        subprocess.run(["cp", "-a", "--", golden_datadir() + "/.", primary_dir + "/"], check=True)
        shutil.chown(primary_dir, "mysql", "mysql")
        primary = MariaDB.create(self, datadir=primary_dir, install=False, start=False,
                                 port=mariadb_support.free_port(), options={"bind-address": "0.0.0.0"})
        subprocess.run([*self.pair.a.prefix, "sh", "-c", primary.start_command], check=True,
                       stdout=subprocess.DEVNULL)
        primary.sql(f"CREATE USER repl@'%' IDENTIFIED BY '{REPL_PASSWORD}';"
                    "GRANT REPLICATION SLAVE ON *.* TO repl@'%'")
        source = await self.make_host(self.pair.a, populated=True, config=source_config,
                                      db={"port": port, "server_id": 3})
        await source.db.stop_async()
        self.assertIs(await source.api("/api/mysql-start"), True)
        (start,), = await source.db.sql_async("SELECT @@gtid_binlog_pos")
        await source.db.sql_async(
            f"SET GLOBAL gtid_slave_pos = '{start}'; CHANGE MASTER TO MASTER_HOST='{self.pair.a.address}', "
            f"MASTER_PORT={primary.port}, MASTER_USER='repl', MASTER_PASSWORD='{REPL_PASSWORD}', "
            "MASTER_USE_GTID=slave_pos; START SLAVE")
        target = await self.make_host(self.pair.b, populated=False, db={"port": port, "server_id": 2},
                                      config=target_config)
        return primary, source, target

    async def seed_replicating(self, source: Host, target: Host, master_port: int, *options: str) -> dict:
        """``orchagent seed --replicate`` (and ``options``) from ``source`` to ``target``:
        it ends replicating from the source namespace's address at ``master_port``; the
        seed's coordinates as the target reports them."""
        code, output = await self.run_controller(
            "seed", "--target", target.address, "--source", source.address, *options, "--stop-target",
            "--poll-interval", "0.3", "--replicate")
        self.assertEqual(code, 0, output)
        self.assertRegex(output, rf"replicates from {re.escape(self.pair.a.address)}:{master_port}, ")
        seed_id = re.search(r"seed (s[0-9a-f]+) done", output).group(1)
        return (await target.api(f"/api/seed-status/{seed_id}"))["Replication"]

    async def replica_applies(self, source: Host) -> None:
        """Until the source's server (a replica) has applied some of its primary's writes."""
        count = f"SELECT COUNT(*) FROM {DATABASE}.w"
        deadline = reactor.seconds() + 60
        while int((await source.db.sql_async(count))[0][0]) == 0:
            self.assertLess(reactor.seconds(), deadline, "the replica applies nothing")
            await task.deferLater(reactor, 0.05, lambda: None)

    async def test_a_replicas_snapshot_under_writes_ends_replicating_from_its_master(self):
        """The source host's server is a replica of a primary (both in the source's
        namespace); its btrfs snapshot, taken while it applies the primary's writes, is
        seeded with --replicate: the target replicates from the primary, with the user and
        password of the copied master.info (no ReplicationCredentialsFile)."""
        primary, source, target = await self.replica_hosts()
        writer = primary.sql_async(f"CALL writer({UNTIL_STOPPED})", DATABASE)
        await self.replica_applies(source)
        self.assertIs(await source.api("/api/create-snapshot"), True)
        (snapped,), = await primary.sql_async("SELECT @@gtid_binlog_pos")
        await writes_after(primary, snapped)
        await stop_writer(primary, writer)
        coordinates = await self.seed_replicating(source, target, primary.port)
        self.assertEqual((coordinates["MasterHost"], coordinates["MasterPort"], coordinates["MasterUser"]),
                         (self.pair.a.address, primary.port, "repl"))
        self.assertIn("gtid_slave_pos", coordinates["From"])
        (written,), = await primary.sql_async("SELECT @@gtid_binlog_pos")
        self.assertLess(int(coordinates["GTID"].rsplit("-", 1)[1]), int(written.rsplit("-", 1)[1]),
                        "the primary wrote on after the snapshot")
        await self.assertReplicates(primary, target)

    async def test_a_hot_seed_of_a_replica_under_writes_ends_replicating_from_its_master(self):
        """seed --hot --replicate from a replica while its primary writes and it applies
        them: the backup carries the replica's executed position at its consistent point
        (--slave-info: mariadb_backup_slave_info), the source agent names the replica's
        master (its SHOW SLAVE STATUS: host, port, user), and the target replicates from
        the primary, with ReplicationCredentialsFile's password (a backup holds no
        master.info)."""
        credentials = os.path.join(self.home, "repl.cnf")
        with open(credentials, "w") as fh:
            fh.write(f"[client]\nuser=repl\npassword={REPL_PASSWORD}\n")
        os.chmod(credentials, 0o600)
        primary, source, target = await self.replica_hosts({"ReplicationCredentialsFile": credentials})
        writer = primary.sql_async(f"CALL writer({UNTIL_STOPPED})", DATABASE)
        await self.replica_applies(source)
        (applied,), = await source.db.sql_async("SELECT @@gtid_slave_pos")
        coordinates = await self.seed_replicating(source, target, primary.port, "--hot")
        (at_end,), = await source.db.sql_async("SELECT @@gtid_slave_pos")
        await stop_writer(primary, writer)
        self.assertEqual((coordinates["MasterHost"], coordinates["MasterPort"], coordinates["MasterUser"]),
                         (self.pair.a.address, primary.port, "repl"), coordinates)
        self.assertRegex(coordinates["From"], r"^(mariadb_backup|xtrabackup)_slave_info, ")
        self.assertEqual(coordinates["GTIDMode"], "slave_pos")
        seq = int(coordinates["GTID"].rsplit("-", 1)[1])
        self.assertGreaterEqual(seq, int(applied.rsplit("-", 1)[1]),
                                "the replica's position when the seed started, or later")
        self.assertLessEqual(seq, int(at_end.rsplit("-", 1)[1]))
        (written,), = await primary.sql_async("SELECT @@gtid_binlog_pos")
        self.assertLess(seq, int(written.rsplit("-", 1)[1]),
                        "the primary wrote on after the backup's consistent point")
        await primary.sql_async("INSERT INTO w (k, note) VALUES (-1, 'after the backup')", DATABASE)
        await self.assertReplicates(primary, target)
        self.assertEqual(await target.db.sql_async(
            f"SELECT COUNT(*) FROM {DATABASE}.w WHERE note = 'after the backup'"), [("1",)])

    async def orchestrator(self) -> tuple[StandInOrchestrator, dict]:
        """The stand-in orchestrator, and the settings that register an agent with it."""
        orchestrator = StandInOrchestrator()
        url = await orchestrator.serve(self, interface=self.pair.callback_address)
        return orchestrator, {"AgentsServer": url, "ContinuousPollSeconds": 1}

    async def v1_seed(self, orchestrator: StandInOrchestrator, source: Host, target: Host,
                      seed_id: int) -> None:
        """orchestrator's own v1 sequence from ``source``'s newest snapshot to ``target``
        (its MySQL stopped first, as an operator does), ending with mysql-start and no call
        orchestrator does not make."""
        await orchestrator.wait_for("submit-agent", 2, timeout=30)
        submitted = {s.hostname: s for s in orchestrator.submissions}
        await target.db.stop_async()
        seed = V1Seed(orchestrator, submitted[target.ns.address], submitted[source.ns.address], seed_id,
                      wait_before_send=0.5, poll_interval=V1_POLL)
        outcome = await seed.run()
        self.assertTrue(outcome.ok, f"{outcome.reason}; mysql-du at each poll: {seed.polled_usage}")
        self.assertEqual(outcome.problems, (), "every answer has the v1 type")
        calls = [c.split(" ", 1)[1] for c in outcome.calls]
        self.assertEqual(calls[-1], "mysql-start")
        self.assertFalse([c for c in calls if "replication" in c], "orchestrator calls nothing new")

    async def test_the_v1_sequence_ends_replicating(self):
        """orchestrator's own v1 sequence, unchanged, with SeedStartReplication on the
        target: its closing mysql-start leaves the target replicating from the source."""
        orchestrator, registering = await self.orchestrator()
        source, target = await self.replication_hosts(
            registering, {**registering, "SeedStartReplication": True})
        await self.quiet_snapshot(source)
        await source.db.sql_async("INSERT INTO w (k, note) VALUES (-1, 'after the snapshot')", DATABASE)
        await self.v1_seed(orchestrator, source, target, 4712)
        status = await self.assertReplicates(source, target)
        self.assertEqual(status["SeedId"], "4712")
        self.assertEqual(await target.db.sql_async(
            f"SELECT COUNT(*) FROM {DATABASE}.w WHERE note = 'after the snapshot'"), [("1",)])

    async def test_the_v1_sequence_from_a_replicas_snapshot_ends_replicating_from_its_master(self):
        """Scenario (a) through orchestrator's own v1 sequence: the newest snapshot of a
        replica, taken while it applies its primary's writes, and SeedStartReplication on
        the target: orchestrator's closing mysql-start leaves the target replicating from
        the replica's master, with the copied master.info's user and password."""
        orchestrator, registering = await self.orchestrator()
        primary, source, target = await self.replica_hosts(
            {**registering, "SeedStartReplication": True}, source_config=registering)
        writer = primary.sql_async(f"CALL writer({UNTIL_STOPPED})", DATABASE)
        await self.replica_applies(source)
        self.assertIs(await source.api("/api/create-snapshot"), True)
        (snapped,), = await primary.sql_async("SELECT @@gtid_binlog_pos")
        await writes_after(primary, snapped)
        await stop_writer(primary, writer)
        await self.v1_seed(orchestrator, source, target, 4713)
        status = await self.assertReplicates(primary, target)
        self.assertEqual(status["SeedId"], "4713")
        self.assertEqual((status["MasterHost"], status["MasterPort"]), (self.pair.a.address, primary.port))

    # --- bad paths ---------------------------------------------------------------------------

    async def test_refusals_change_nothing(self):
        source, target = await self.hosts()
        seed = ("seed", "--target", target.address, "--source", source.address)

        # No snapshot on the source yet.
        code, output = await self.run_controller(*seed)
        self.assertEqual(code, 3, output)
        self.assertIn(f"the source {source.address} has no snapshot (lvs-snapshots is empty)", output)

        # MySQL runs on the target.
        snapshot = await self.snapshot_under_writes(source)
        pid = mariadb_support.server_status(target.db.option_file)
        names = sorted(os.listdir(target.datadir))
        code, output = await self.run_controller(*seed)
        self.assertEqual(code, 3, output)
        self.assertIn(f"MySQL is running on the target {target.address}", output)
        self.assertIn("refused, nothing was changed", output)
        self.assertEqual(mariadb_support.server_status(target.db.option_file), pid)
        self.assertEqual(sorted(os.listdir(target.datadir)), names)
        await self.assertUnmounted(source)

        # Not enough space on the target, even counting its datadir.
        await target.db.stop_async()
        before = tree_manifest(target.datadir)
        await self.fill(target)
        need = await source.api("/api/du?path=" + quote(snapshot["Path"], safe=""))
        free = await target.api("/api/mysql-datadir-available-space")
        used = await target.api("/api/mysql-du")
        self.assertLess(free + used, need, "the target is full enough for the test")
        code, output = await self.run_controller(*seed)
        self.assertEqual(code, 3, output)
        self.assertIn(f"not enough space on the target {target.address}", output)
        self.assertEqual(tree_manifest(target.datadir), before, "nothing was erased")
        await self.assertUnmounted(source)
        self.assertEqual(self.records(), [])
        for host in (source, target):
            self.assertNotIn('state="running"', (await host.agent.get("/metrics"))[1])

    async def test_abort_mid_copy(self):
        source, target = await self.hosts(source_config={"SeedRateLimitBytesPerSec": SLOW_RATE})
        await self.snapshot_under_writes(source)
        await target.db.stop_async()
        before = tree_manifest(target.datadir)

        process = await self.controller("seed", "--target", target.address, "--source", source.address,
                                        "--poll-interval", "0.2")
        await process.wait_for(lambda out: any(0 < n for n in bytes_done(out)))
        os.kill(process.transport.pid, signal.SIGINT)
        code = await process.ended
        output = process.text()
        self.assertEqual(code, 130, output)
        self.assertIn("interrupted: the seed was aborted", output)
        seed_id = re.search(r"^seed (s[0-9a-f]+):", output, re.MULTILINE).group(1)
        for host in (source, target):
            status = await host.api(f"/api/seed-status/{seed_id}")
            self.assertEqual(status["State"], "aborted", host.ns.address)
        self.assertLess((await target.api(f"/api/seed-status/{seed_id}"))["BytesDone"],
                        (await target.api(f"/api/seed-status/{seed_id}"))["BytesTotal"], "mid-copy")
        await self.assertUnmounted(source)
        self.assertEqual(tree_manifest(target.datadir), before, "the target's datadir is as before")
        self.assertEqual([n for n in os.listdir(os.path.dirname(target.datadir)) if "orchagent-seed" in n], [])
        self.assertFalse(target.db.is_running())
        self.assertEqual(self.records(), [])

    async def test_source_agent_killed_then_resume(self):
        source, target = await self.hosts(source_config={"SeedRateLimitBytesPerSec": SLOW_RATE})
        snapshot = await self.snapshot_under_writes(source)
        reference = await self.reference_checksums(source, snapshot)
        await target.db.stop_async()

        process = await self.controller("seed", "--target", target.address, "--source", source.address,
                                        "--poll-interval", "0.2", "--unreachable-timeout", "1.5")
        await process.wait_for(lambda out: any(5 << 20 < n for n in bytes_done(out)))
        source.agent._transport.signalProcess("KILL")
        await source.agent.wait_exit()
        code = await process.ended
        output = process.text()
        self.assertEqual(code, 1, output)
        seed_id = re.search(r"orchagent seed --resume (s[0-9a-f]+)", output).group(1)
        self.assertEqual(self.records(), [seed_id + ".json"])
        partial = (await target.api(f"/api/seed-status/{seed_id}"))
        self.assertLess(partial["BytesDone"], partial["BytesTotal"])

        restarted = Daemon(source.agent.directory, source.agent.config, prefix=source.ns.prefix,
                           address=source.ns.address)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(restarted.stop()))
        await restarted.start()
        source.agent = restarted

        code, output = await self.run_controller("seed", "--resume", seed_id, "--poll-interval", "0.2")
        self.assertEqual(code, 0, output)
        self.assertIn(f"resuming seed {seed_id}", output)
        await self.assertSeeded(target, reference)
        await self.assertUnmounted(source)
        status = await target.api(f"/api/seed-status/{seed_id}")
        self.assertEqual(status["State"], "completed")
        self.assertGreaterEqual(status["Resumes"], 1)
        self.assertEqual(self.records(), [])


async def _in_thread(function, *args):
    from twisted.internet import threads

    return await threads.deferToThread(function, *args)
