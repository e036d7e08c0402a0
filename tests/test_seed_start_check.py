"""The verified start (SeedVerifyStart) and the replication coordinates of a seed, with real
MariaDB servers and two seed managers on loopback.

The source's datadir is seeded as a crashed server leaves it (mariadbd killed with
SIGKILL, as a snapshot of a running server is): the target's throwaway server must
recover it.  Each test checks the target's datadir, its staging and its seed-status.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import time

from twisted.internet import defer, reactor, threads
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from orchagent.replica import seeded, verify
from tests import seed_support as S
from tests.support.mariadb import MariaDB, _read_pid, unavailable_reason

PASSWORD = "s3cr3t-Pw-9f2c"


def kill_hard(db: MariaDB) -> None:
    """Stop ``db`` as a crash (or a snapshot of it running) would."""
    pid = _read_pid(db.pid_file)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while db.is_running() and time.monotonic() < deadline:
        time.sleep(0.05)


class _SeedHarness(unittest.TestCase):
    timeout = 180

    def setUp(self):
        reason = unavailable_reason() or (None if verify.server_program() else "no mariadbd")
        if reason:
            raise unittest.SkipTest(reason)
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        os.chmod(os.path.dirname(self.base), 0o755)  # mkdtemp's 0700: mysql must pass
        self.port = S.free_port()
        self.logged: list[str] = []

        def observe(event):
            self.logged.append(json.dumps({k: str(v) for k, v in event.items()}))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.private: list[str] = []
        made = verify.private_directory

        def private_directory() -> str:
            self.private.append(made())
            self.addCleanup(shutil.rmtree, self.private[-1], True)
            return self.private[-1]

        self.patch(verify, "private_directory", private_directory)

    def source(self, **kwargs) -> MariaDB:
        db = MariaDB.create(self, **kwargs)
        db.sql("CREATE DATABASE d; CREATE TABLE d.t (id INT PRIMARY KEY, v VARCHAR(200)) ENGINE=InnoDB;"
               "CREATE TABLE d.a (id INT) ENGINE=Aria; INSERT INTO d.a VALUES (1);"
               "CREATE TABLE d.empty (id INT) ENGINE=InnoDB;")
        db.sql("INSERT INTO d.t SELECT seq, REPEAT('x', 150) FROM seq_1_to_2000", database="d")
        return db

    def target(self) -> tuple[MariaDB, str]:
        datadir = os.path.join(self.base, "target-data")
        os.makedirs(datadir)
        shutil.chown(datadir, "mysql", "mysql")
        db = MariaDB.create(self, datadir=datadir, install=False, start=False, server_id=9)
        return db, datadir

    def managers(self, source_datadir: str, target: MariaDB, setting: str = "on"):
        r = S.make_manager(self, os.path.join(self.base, "r"), target.datadir, self.port,
                           mysql_options_file=target.option_file, seed_verify_start=setting)
        s = S.make_manager(self, os.path.join(self.base, "s"), source_datadir, self.port)
        return r, s

    async def seed(self, r, s, seed: str) -> dict:
        self.assertTrue(await r.receive(seed))
        self.assertTrue(await s.send(f"127.0.0.1:{self.port}", seed, source="datadir"))
        return await S.finished(r, seed, timeout=150)

    async def assert_no_staging(self, r, seed: str, datadir: str) -> None:
        job = r.jobs.get(seed)
        if job is not None:
            await job.done
        parent = os.path.dirname(datadir)
        self.assertEqual([n for n in os.listdir(parent) if "orchagent-seed" in n], [])
        self.assertTrue(self.private)
        self.assertEqual([p for p in self.private if os.path.exists(p)], [])



class StartCheckTests(_SeedHarness):

    async def test_a_primarys_copy_starts_and_reports_its_binlog_end(self):
        """A crashed primary's datadir: the copy recovers, passes, is promoted; its
        coordinates are the source host at the binlog's end, gtid_binlog_pos."""
        source = self.source()
        (file, position), = [tuple(row[:2]) for row in source.sql("SHOW MASTER STATUS")]
        (gtid,), = source.sql("SELECT @@gtid_binlog_pos")
        await threads.deferToThread(kill_hard, source)
        target, datadir = self.target()
        r, s = self.managers(source.datadir, target)
        seen = []
        r.watchers.append(lambda record: seen.append(record.state))
        status = await self.seed(r, s, "primary")
        self.assertEqual(status["State"], "completed", status["Error"])
        self.assertIn("checking", seen)
        self.assertEqual(status["Replication"], {
            "MasterHost": "127.0.0.1", "MasterPort": target.port, "MasterUser": None,
            "BinlogFile": file, "BinlogPos": int(position), "GTID": gtid, "GTIDMode": "slave_pos",
            "From": "binlog after crash recovery, gtid_binlog_pos, the source host (seed peer)"})
        await self.assert_no_staging(r, status["SeedId"], datadir)
        # The promoted copy is the source's data: a real server starts on it.
        await target.start_async()
        self.assertEqual(await target.sql_async("SELECT COUNT(*), SUM(id) FROM d.t"), [("2000", "2001000")])
        await target.stop_async()

    async def test_a_corrupted_page_is_never_promoted(self):
        """A page of d.t with bytes flipped (on the source's disk): the seed arrives as it
        is, the check fails naming its step and the error log, the datadir is untouched."""
        source = self.source()
        await source.stop_async()
        path = os.path.join(source.datadir, "d", "t.ibd")
        with open(path, "r+b") as fh:
            fh.seek(3 * 16384 + 2000)
            data = fh.read(64)
            fh.seek(3 * 16384 + 2000)
            fh.write(bytes(b ^ 0x5A for b in data))
        target, datadir = self.target()
        with open(os.path.join(datadir, "keep.me"), "w") as fh:
            fh.write("before")
        r, s = self.managers(source.datadir, target)
        status = await self.seed(r, s, "corrupt")
        self.assertEqual(status["State"], "failed")
        error = status["Error"]
        # The sample is read in one session: the statement that failed is named by its
        # table (the third of three), not by its line in the session.
        self.assertIn("start check at step user tables: reading d.t failed: ERROR 1877 (HY000): ", error)
        self.assertIn("error log", error)
        self.assertIn("not moved into", error)
        self.assertEqual(os.listdir(datadir), ["keep.me"])
        self.assertIsNone(status["Replication"])
        await self.assert_no_staging(r, status["SeedId"], datadir)

    async def test_a_replicas_copy_names_its_master_and_never_its_password(self):
        """A replica (CHANGE MASTER with a password, GTID slave_pos) killed and seeded: its
        master, user, executed position and gtid_slave_pos; the password only in StateDir
        (0600), never in the status or a log line."""
        primary = self.source()
        primary.sql(f"CREATE USER repl@'127.0.0.1' IDENTIFIED BY '{PASSWORD}';"
                    "GRANT REPLICATION SLAVE ON *.* TO repl@'127.0.0.1'")
        replica = MariaDB.create(self, server_id=2)
        replica.sql(f"CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={primary.port}, "
                    f"MASTER_USER='repl', MASTER_PASSWORD='{PASSWORD}', MASTER_USE_GTID=slave_pos;"
                    "START SLAVE")
        (gtid,), = primary.sql("SELECT @@gtid_binlog_pos")
        file, position = primary.sql("SHOW MASTER STATUS")[0][:2]
        deadline = time.monotonic() + 60
        while replica.sql("SELECT @@gtid_slave_pos") != [(gtid,)]:
            self.assertLess(time.monotonic(), deadline, "the replica did not catch up")
            time.sleep(0.1)
        await threads.deferToThread(kill_hard, replica)
        target, datadir = self.target()
        r, s = self.managers(replica.datadir, target)
        status = await self.seed(r, s, "replica")
        self.assertEqual(status["State"], "completed", status["Error"])
        replication = status["Replication"]
        self.assertEqual((replication["MasterHost"], replication["MasterPort"], replication["MasterUser"],
                          replication["BinlogFile"], replication["GTID"], replication["GTIDMode"]),
                         ("127.0.0.1", primary.port, "repl", file, gtid, "slave_pos"))
        self.assertLessEqual(replication["BinlogPos"], int(position))
        self.assertTrue(replication["From"].startswith("master.info, relay-log.info"))
        self.assertIn("gtid_slave_pos", replication["From"])
        saved = r.store.path("replica", seeded.PASSWORD_SUFFIX)
        self.assertEqual(stat.S_IMODE(os.stat(saved).st_mode), 0o600)
        self.assertEqual(seeded.master_password(r.store, "replica"), PASSWORD)
        # Nowhere else: not the status (nor the persisted record), not a log event.
        self.assertNotIn(PASSWORD, json.dumps(await r.status("replica")))
        with open(r.store.path("replica", "json")) as fh:
            self.assertNotIn(PASSWORD, fh.read())
        self.assertTrue(self.logged)
        self.assertEqual([line for line in self.logged if PASSWORD in line], [])

    async def test_an_abort_while_checking_stops_the_server(self):
        """The throwaway server runs as long as it likes (a stand-in that never answers):
        an abort meanwhile kills it, removes staging and leaves the datadir."""
        script = os.path.join(self.base, "slow-mariadbd")
        pid_file = os.path.join(self.base, "slow.pid")
        with open(script, "w") as fh:
            fh.write(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 300\n")
        os.chmod(script, 0o755)
        self.patch(verify, "server_program", lambda: script)
        source = self.source()
        await source.stop_async()
        target, datadir = self.target()
        r, s = self.managers(source.datadir, target)
        self.assertTrue(await r.receive("slow"))
        self.assertTrue(await s.send(f"127.0.0.1:{self.port}", "slow", source="datadir"))
        await S.wait_for(lambda: r.records["slow"].state == "checking" and os.path.exists(pid_file)
                         and os.path.getsize(pid_file) > 0, timeout=60)
        with open(pid_file) as fh:
            pid = int(fh.read())
        self.assertTrue(await r.abort("slow"))
        status = await S.finished(r, "slow")
        self.assertEqual(status["State"], "aborted")
        await S.wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=20)
        self.assertEqual(os.listdir(datadir), [])
        await self.assert_no_staging(r, status["SeedId"], datadir)


class HotSeedCoordinatesTests(unittest.TestCase):
    """A streamed hot seed (mariabackup) of a primary: checked by its start, and its
    coordinates are the backup's binlog info, the source as master."""

    timeout = 180

    async def test_a_backup_names_the_source_at_its_consistent_point(self):
        from orchagent.agent import build_seed_manager
        from orchagent.config import Config
        from tests.test_backups_mariadb import mariabackup_unavailable, populated

        reason = mariabackup_unavailable()
        if reason:
            raise unittest.SkipTest(reason)
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        port = S.free_port()
        source = populated(self)
        target = MariaDB.create(self, start=False)
        for name in os.listdir(target.datadir):
            path = os.path.join(target.datadir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
        managers = []
        for name, db in (("source", source), ("target", target)):
            manager = build_seed_manager(Config(
                **db.agent_settings(), state_dir=os.path.join(home, name, "state"),
                seed_transfer_port=port, command_timeout_seconds=120, seed_verify_start="on"),
                reactor)
            manager.startService()
            self.addCleanup(lambda m=manager: m.stopService() if m.running else None)
            managers.append(manager)
        s, r = managers
        (file, position), = [tuple(row[:2]) for row in source.sql("SHOW MASTER STATUS")]
        (gtid,), = source.sql("SELECT @@gtid_binlog_pos")
        self.assertTrue(await r.receive("hot1", key="k"))
        self.assertTrue(await s.send(f"127.0.0.1:{port}", "hot1", key="k", source="hot"))
        status = await S.finished(r, "hot1", timeout=150)
        self.assertEqual(status["State"], "completed", status["Error"])
        replication = dict(status["Replication"])
        # MariaDB 10.11's mariabackup still names it xtrabackup_binlog_info.
        self.assertIn(replication.pop("From"), [
            f"{name}, the source host (seed peer)" for name in
            ("mariadb_backup_binlog_info", "xtrabackup_binlog_info")])
        self.assertEqual(replication, {
            "MasterHost": "127.0.0.1", "MasterPort": target.port, "MasterUser": None,
            "BinlogFile": file, "BinlogPos": int(position), "GTID": gtid, "GTIDMode": "slave_pos"})


class StartReplicationTests(_SeedHarness):
    """SeedStartReplication: once MySQL runs on the seeded datadir, the agent points it at
    the seed's master through the host's client, and rows written on the master after the
    copy arrive."""

    def control(self, r, target: MariaDB, **overrides):
        from orchagent.config import Config
        from orchagent.replica.control import ReplicationControl
        from orchagent.process import ProcessRunner

        config = Config(state_dir=r.config.state_dir, mysql_client_command=target.client_command,
                        seed_start_replication=True, **overrides)
        return ReplicationControl(config, ProcessRunner(reactor))

    async def replicating(self, control, target: MariaDB, master: MariaDB, marker: int) -> dict:
        master.sql(f"INSERT INTO d.t VALUES ({marker}, 'after the copy')")
        deadline = time.monotonic() + 60
        while True:
            status = await control.status()
            rows = await target.sql_async(f"SELECT COUNT(*) FROM d.t WHERE id = {marker}")
            if rows == [("1",)] and status["IORunning"] and status["SQLRunning"]:
                return status
            self.assertLess(time.monotonic(), deadline, f"not replicating: {status}")
            await threads.deferToThread(time.sleep, 0.2)

    async def test_a_replicas_copy_replicates_from_its_master(self):
        primary = self.source()
        primary.sql(f"CREATE USER repl@'127.0.0.1' IDENTIFIED BY '{PASSWORD}';"
                    "GRANT REPLICATION SLAVE ON *.* TO repl@'127.0.0.1'")
        replica = MariaDB.create(self, server_id=2)
        replica.sql(f"CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={primary.port}, "
                    f"MASTER_USER='repl', MASTER_PASSWORD='{PASSWORD}', MASTER_USE_GTID=slave_pos;"
                    "START SLAVE")
        (gtid,), = primary.sql("SELECT @@gtid_binlog_pos")
        deadline = time.monotonic() + 60
        while replica.sql("SELECT @@gtid_slave_pos") != [(gtid,)]:
            self.assertLess(time.monotonic(), deadline, "the replica did not catch up")
            time.sleep(0.1)
        await threads.deferToThread(kill_hard, replica)
        primary.sql("INSERT INTO d.t VALUES (5001, 'while the replica was down')")
        target, datadir = self.target()
        r, s = self.managers(replica.datadir, target)
        status = await self.seed(r, s, "rep")
        self.assertEqual(status["State"], "completed", status["Error"])
        control = self.control(r, target)
        await target.start_async()
        self.assertTrue(await control.after_start(r.all_status()))
        self.assertFalse(await control.after_start(r.all_status()), "applied once")
        replication = await self.replicating(control, target, primary, 5002)
        self.assertEqual((replication["MasterHost"], replication["MasterPort"], replication["UsingGTID"]),
                         ("127.0.0.1", primary.port, "Slave_Pos"))
        self.assertEqual(await target.sql_async("SELECT COUNT(*) FROM d.t WHERE id = 5001"), [("1",)])
        self.assertEqual(replication["SeedId"], "rep")
        self.assertIsNone(seeded.master_password(r.store, "rep"), "removed once used")
        self.assertEqual([line for line in self.logged if PASSWORD in line], [])
        self.assertNotIn(PASSWORD, json.dumps(replication))
        await target.stop_async()

    async def test_a_primarys_copy_replicates_from_the_source_with_the_credentials_file(self):
        primary = self.source()
        primary.sql(f"CREATE USER repl@'127.0.0.1' IDENTIFIED BY '{PASSWORD}';"
                    "GRANT REPLICATION SLAVE ON *.* TO repl@'127.0.0.1'")
        await threads.deferToThread(kill_hard, primary)
        target, datadir = self.target()
        r, s = self.managers(primary.datadir, target)
        status = await self.seed(r, s, "pri")
        self.assertEqual(status["State"], "completed", status["Error"])
        await primary.start_async()
        credentials = os.path.join(self.base, "repl.cnf")
        with open(credentials, "w") as fh:
            fh.write(f"[client]\nuser=repl\npassword={PASSWORD}\n")
        os.chmod(credentials, 0o600)
        # The copy's binlog port is this host's: the test's primary listens elsewhere.
        record = r.records["pri"]
        record.replication = dict(record.replication, MasterPort=primary.port)
        control = self.control(r, target, replication_credentials_file=credentials)
        await target.start_async()
        self.assertTrue(await control.after_start(r.all_status()))
        replication = await self.replicating(control, target, primary, 6001)
        self.assertEqual(replication["MasterUser"], "repl")
        self.assertEqual([line for line in self.logged if PASSWORD in line], [])
        await target.stop_async()

    async def test_refused_credentials_are_reported_and_change_nothing_else(self):
        primary = self.source()
        primary.sql("CREATE USER nobody@'127.0.0.1' IDENTIFIED BY 'another-one';"
                    "GRANT REPLICATION SLAVE ON *.* TO nobody@'127.0.0.1'")
        await threads.deferToThread(kill_hard, primary)
        target, datadir = self.target()
        r, s = self.managers(primary.datadir, target)
        status = await self.seed(r, s, "bad")
        self.assertEqual(status["State"], "completed", status["Error"])
        await primary.start_async()
        credentials = os.path.join(self.base, "repl.cnf")
        with open(credentials, "w") as fh:
            fh.write(f"[client]\nuser=nobody\npassword={PASSWORD}\n")
        record = r.records["bad"]
        record.replication = dict(record.replication, MasterPort=primary.port)
        control = self.control(r, target, replication_credentials_file=credentials)
        await target.start_async()
        self.assertTrue(await control.after_start(r.all_status()))
        deadline = time.monotonic() + 60
        while True:
            replication = await control.status()
            if replication["LastIOErrno"]:
                break
            self.assertLess(time.monotonic(), deadline, f"no IO error: {replication}")
            await threads.deferToThread(time.sleep, 0.2)
        self.assertEqual(replication["LastIOErrno"], 1045)
        self.assertIn("nobody", replication["LastIOError"])
        self.assertNotIn(PASSWORD, json.dumps(replication))
        self.assertEqual(await target.sql_async("SELECT COUNT(*) FROM d.t"), [("2000",)])
        await target.stop_async()


class _InProcessAgent:
    """What the controller's replication wait calls on a target agent, answered by a real
    ReplicationControl over a real server (the API routes are one line each)."""

    def __init__(self, control, manager):
        self.name = "target"
        self.control = control
        self.manager = manager

    async def call(self, path: str, **params):
        if path.startswith("start-replication/"):
            return await self.control.start(path.split("/", 1)[1], self.manager.all_status())
        assert path == "replication-status", path
        return await self.control.status()


class ReplicateAndDiagnoseTests(_SeedHarness):
    """``orchagent seed --replicate``'s wait (Seeder.replicate) against a real seeded server,
    and the errors it meets, each restated with the seed's position."""

    def control(self, r, target: MariaDB, **overrides):
        from orchagent.config import Config
        from orchagent.process import ProcessRunner
        from orchagent.replica.control import ReplicationControl

        config = Config(state_dir=r.config.state_dir, mysql_client_command=target.client_command,
                        **overrides)
        return ReplicationControl(config, ProcessRunner(reactor))

    async def primarys_copy(self, seed: str, credentials_user: str = "repl"):
        """A primary with a replication user, its crashed copy seeded to a new target;
        MySQL started on the target (replication not applied: SeedStartReplication off)."""
        primary = self.source()
        primary.sql(f"CREATE USER repl@'127.0.0.1' IDENTIFIED BY '{PASSWORD}';"
                    "GRANT REPLICATION SLAVE ON *.* TO repl@'127.0.0.1'")
        await threads.deferToThread(kill_hard, primary)
        target, datadir = self.target()
        r, s = self.managers(primary.datadir, target)
        status = await self.seed(r, s, seed)
        self.assertEqual(status["State"], "completed", status["Error"])
        await primary.start_async()
        credentials = os.path.join(self.base, "repl.cnf")
        with open(credentials, "w") as fh:
            fh.write(f"[client]\nuser={credentials_user}\npassword={PASSWORD}\n")
        os.chmod(credentials, 0o600)
        record = r.records[seed]
        record.replication = dict(record.replication, MasterPort=primary.port)
        control = self.control(r, target, replication_credentials_file=credentials)
        await target.start_async()
        self.addCleanup(target.stop)
        return primary, target, r, control

    def seeder(self, poll: float = 0.2):
        import io

        from orchagent.cli.render import Reporter
        from orchagent.cli.seed import SeedOptions, Seeder

        out = io.StringIO()
        seeder = Seeder(lambda name: None, None, reactor, Reporter(out, out, live=False, line_interval=0),
                        SeedOptions(poll_interval=poll, max_lag=10))
        return seeder, out

    async def test_the_controller_waits_until_the_copy_replicates(self):
        primary, target, r, control = await self.primarys_copy("rc")
        self.assertFalse(await control.after_start(r.all_status()), "SeedStartReplication is off")
        primary.sql("INSERT INTO d.t SELECT seq, 'after the copy' FROM seq_3001_to_3500", database="d")
        seeder, out = self.seeder()
        status = await seeder.replicate("rc", _InProcessAgent(control, r))
        self.assertTrue(status["IORunning"] and status["SQLRunning"])
        self.assertLessEqual(status["SecondsBehindMaster"], 10)
        self.assertEqual(status["SeedId"], "rc")
        self.assertEqual(status["Problem"], "")
        self.assertRegex(out.getvalue(), r"replication: lag (\?|\d+ s)  relay \S+:\d+  executed")
        self.assertIn(f"target replicates from 127.0.0.1:{primary.port}", out.getvalue())
        # Asking again applies nothing twice.
        again = await control.start("rc", r.all_status())
        self.assertEqual(again["SeedId"], "rc")
        deadline = time.monotonic() + 60
        while await target.sql_async("SELECT COUNT(*) FROM d.t WHERE id > 3000") != [("500",)]:
            self.assertLess(time.monotonic(), deadline, "rows written after the copy did not arrive")
            await threads.deferToThread(time.sleep, 0.2)
        self.assertEqual([line for line in self.logged if PASSWORD in line], [])
        self.assertNotIn(PASSWORD, out.getvalue())

    async def test_binlogs_purged_past_the_seeds_position_name_the_file(self):
        """Through GTID (slave_pos) as the primary's copy has it."""
        await self.purged_past_the_seeds_position(gtid=True)

    async def test_binlogs_purged_past_the_seeds_file_and_position(self):
        """Through the binlog file and position (a copy with no GTID)."""
        await self.purged_past_the_seeds_position(gtid=False)

    async def purged_past_the_seeds_position(self, gtid: bool):
        from orchagent.cli.seed import ReplicationFailed

        primary, target, r, control = await self.primarys_copy("pg")
        if not gtid:
            record = r.records["pg"]
            record.replication = dict(record.replication, GTID=None, GTIDMode=None)
        coordinates = r.records["pg"].replication
        primary.sql("INSERT INTO d.t VALUES (7001, 'after the copy')")
        deadline = time.monotonic() + 30
        while True:
            # A binlog InnoDB has not checkpointed yet is kept by PURGE: flush until it has.
            primary.sql("FLUSH BINARY LOGS")
            (newest, _), = [tuple(row[:2]) for row in primary.sql("SHOW MASTER STATUS")]
            primary.sql(f"PURGE BINARY LOGS TO '{newest}'")
            if [row[0] for row in primary.sql("SHOW BINARY LOGS")] == [newest]:
                break
            self.assertLess(time.monotonic(), deadline, "the primary keeps its old binlogs")
            await threads.deferToThread(time.sleep, 0.2)
        seeder, out = self.seeder()
        failure = await self.assertFailure(
            defer.ensureDeferred(seeder.replicate("pg", _InProcessAgent(control, r))), ReplicationFailed)
        message = str(failure)
        self.assertIn(f"the master 127.0.0.1:{primary.port} no longer has the binlog this seed needs: "
                      f"{coordinates['BinlogFile']} (from position {coordinates['BinlogPos']})", message)
        if gtid:
            self.assertIn(f"holding the transactions after GTID {coordinates['GTID']}", message)
        self.assertIn("error 1236", message)
        status = await control.status()
        self.assertFalse(status["IORunning"], "replication stays stopped")
        self.assertEqual(await target.sql_async("SELECT COUNT(*) FROM d.t"), [("2000",)], "the copy kept")

    async def test_an_unreachable_master_names_host_and_port(self):
        primary, target, r, control = await self.primarys_copy("ur")
        nobody = S.free_port()
        record = r.records["ur"]
        record.replication = dict(record.replication, MasterPort=nobody)
        status = await control.start("ur", r.all_status())
        deadline = time.monotonic() + 60
        while not status["Problem"]:
            self.assertLess(time.monotonic(), deadline, f"no problem reported: {status}")
            await threads.deferToThread(time.sleep, 0.2)
            status = await control.status()
        self.assertEqual(status["LastIOErrno"], 2003)
        self.assertIn(f"cannot reach the master 127.0.0.1:{nobody} (error 2003", status["Problem"])
        self.assertIn(f"from the seed's binlog {record.replication['BinlogFile']}", status["Problem"])
        self.assertFalse(status["IORunning"])

    async def test_refused_credentials_say_what_to_check(self):
        primary, target, r, control = await self.primarys_copy("rf", credentials_user="nobody")
        primary.sql("CREATE USER nobody@'127.0.0.1' IDENTIFIED BY 'another-one';"
                    "GRANT REPLICATION SLAVE ON *.* TO nobody@'127.0.0.1'")
        status = await control.start("rf", r.all_status())
        deadline = time.monotonic() + 60
        while not status["Problem"]:
            self.assertLess(time.monotonic(), deadline, f"no problem reported: {status}")
            await threads.deferToThread(time.sleep, 0.2)
            status = await control.status()
        self.assertEqual(status["LastIOErrno"], 1045)
        self.assertIn(f"the master 127.0.0.1:{primary.port} refused the replication user nobody "
                      "(error 1045", status["Problem"])
        self.assertIn("ReplicationCredentialsFile", status["Problem"])
        self.assertNotIn(PASSWORD, json.dumps(status))
