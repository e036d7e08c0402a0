"""Replication coordinates read from what a copy holds (orchagent.replica.coordinates), and
the server options of a start check (orchagent.replica.verify): files written as MariaDB
10.11 and xtrabackup/mariabackup write them."""

from __future__ import annotations

import os

from twisted.trial import unittest

from orchagent.host.mysql_options import Option, ServerOptions
from orchagent.replica import coordinates as C
from orchagent.replica import verify

#: master.info of a MariaDB 10.11 replica (CHANGE MASTER ... MASTER_USE_GTID=slave_pos).
MARIADB_MASTER_INFO = ("33\nmysql-bin.000001\n1111\n10.0.0.5\nrepl\ns3cr3t-pw\n3307\n60\n0\n\n\n\n\n\n0\n"
                       "30.000\n\n0\n\n0\n\n\n\n\n\n\n\n\n\n\n\n\n\nusing_gtid=2\ndo_domain_ids=0\n"
                       "ignore_domain_ids=0\nEND_MARKER\n")
MARIADB_RELAY_LOG_INFO = "5\n./mysqld-relay-bin.000002\n1410\nmysql-bin.000001\n1090\n0\n"


def write(root: str, name: str, text: str) -> None:
    with open(os.path.join(root, name), "w") as fh:
        fh.write(text)


class ParsingTests(unittest.TestCase):

    def test_mariadb_master_info(self):
        info = C.parse_master_info(MARIADB_MASTER_INFO)
        self.assertEqual((info.host, info.port, info.user, info.file, info.position, info.using_gtid),
                         ("10.0.0.5", 3307, "repl", "mysql-bin.000001", 1111, "slave_pos"))
        self.assertEqual(info.password, "s3cr3t-pw")
        self.assertNotIn("s3cr3t-pw", repr(info))

    def test_oldest_master_info_has_no_line_count(self):
        info = C.parse_master_info("bin.000007\n4\ndb1\nu\np\n3306\n60\n")
        self.assertEqual((info.file, info.position, info.host, info.port), ("bin.000007", 4, "db1", 3306))
        self.assertIsNone(info.using_gtid)

    def test_master_info_without_a_host_is_no_master(self):
        self.assertIsNone(C.parse_master_info("33\n\n4\n\ntest\n\n3306\n"))
        self.assertIsNone(C.parse_master_info(""))

    def test_relay_log_info_with_and_without_a_count(self):
        self.assertEqual(C.parse_relay_log_info(MARIADB_RELAY_LOG_INFO), ("mysql-bin.000001", 1090))
        self.assertEqual(C.parse_relay_log_info("./r.000002\n1410\nmysql-bin.000003\n77\n"),
                         ("mysql-bin.000003", 77))
        self.assertIsNone(C.parse_relay_log_info("5\n"))

    def test_binlog_info_files(self):
        self.assertEqual(C.parse_binlog_info("mysql-bin.000002\t385\t0-1-17\n"),
                         ("mysql-bin.000002", 385, "0-1-17"))
        self.assertEqual(C.parse_binlog_info("mysql-bin.000002\t385\n"), ("mysql-bin.000002", 385, None))
        # MySQL's GTID set may be cut over lines.
        self.assertEqual(C.parse_binlog_info("b.000001\t9\t3E11FA47:1-5,\n4A55:1-2\n")[2],
                         "3E11FA47:1-5,4A55:1-2")
        self.assertIsNone(C.parse_binlog_info(""))

    def test_slave_info_files(self):
        self.assertEqual(C.parse_slave_info(
            "SET GLOBAL gtid_slave_pos = '0-1-9';\nCHANGE MASTER TO master_use_gtid = slave_pos\n"),
            {"gtid": "0-1-9"})
        self.assertEqual(C.parse_slave_info(
            "CHANGE MASTER TO MASTER_LOG_FILE='mysql-bin.000004', MASTER_LOG_POS=120;"),
            {"file": "mysql-bin.000004", "position": 120})


class TreeTests(unittest.TestCase):

    def setUp(self):
        self.root = self.mktemp()
        os.makedirs(self.root)

    def test_replica_copy_its_master_at_the_executed_position(self):
        write(self.root, "master.info", MARIADB_MASTER_INFO)
        write(self.root, "relay-log.info", MARIADB_RELAY_LOG_INFO)
        found, info = C.from_tree(self.root, "192.0.2.9")
        found = C.complete(found, {"gtid_slave_pos": "0-1-5", "gtid_binlog_pos": "0-2-1"},
                           "192.0.2.9", 3306)
        self.assertEqual(found.status(), {
            "MasterHost": "10.0.0.5", "MasterPort": 3307, "MasterUser": "repl",
            "BinlogFile": "mysql-bin.000001", "BinlogPos": 1090, "GTID": "0-1-5",
            "GTIDMode": "slave_pos", "From": "master.info, relay-log.info, gtid_slave_pos"})
        self.assertEqual(info.password, "s3cr3t-pw")
        self.assertNotIn("s3cr3t-pw", repr(found.status()))

    def test_primary_copy_the_source_at_its_binlog_end(self):
        found, info = C.from_tree(self.root, "192.0.2.9")
        self.assertIsNone(info)
        found = C.complete(found, {"gtid_binlog_pos": "0-1-5", "binlog_file": "mysql-bin.000001",
                                   "binlog_pos": 1149, "gtid_slave_pos": ""}, "192.0.2.9", 3306)
        status = found.status()
        self.assertEqual((status["MasterHost"], status["MasterPort"], status["MasterUser"],
                          status["BinlogFile"], status["BinlogPos"], status["GTID"], status["GTIDMode"]),
                         ("192.0.2.9", 3306, None, "mysql-bin.000001", 1149, "0-1-5", "slave_pos"))
        self.assertIn("gtid_binlog_pos", status["From"])

    def test_nothing_known_without_files_or_a_started_copy(self):
        found, _ = C.from_tree(self.root, "192.0.2.9")
        self.assertEqual(C.complete(found, {}, "192.0.2.9", 3306).sources, [])

    def test_backup_its_source_at_the_consistent_point(self):
        write(self.root, "mariadb_backup_binlog_info", "mysql-bin.000003\t642\t0-1-44\n")
        found, _ = C.from_tree(self.root, "192.0.2.9")
        found = C.complete(found, {"gtid_binlog_pos": "0-1-45", "binlog_file": "mysql-bin.000004",
                                   "binlog_pos": 4}, "192.0.2.9", 3306)
        self.assertEqual((found.master_host, found.master_port, found.binlog_file, found.binlog_pos,
                          found.gtid), ("192.0.2.9", 3306, "mysql-bin.000003", 642, "0-1-44"))
        self.assertTrue(found.status()["From"].startswith("mariadb_backup_binlog_info"))

    def test_hot_backup_of_a_replica_its_master_at_the_slave_info_position(self):
        """A replica's backup (--slave-info): the position is in its master's binlog, at
        the backup's consistent point; the master is the one its sender announced (the
        backup holds no master.info), never the source host at its own binlog."""
        from orchagent.replica.control import ThisServersMaster, change_master

        write(self.root, "mariadb_backup_binlog_info", "mysql-bin.000003\t342\t0-1-1859\n")
        write(self.root, "mariadb_backup_slave_info",
              "SET GLOBAL gtid_slave_pos = '0-1-1173';\nCHANGE MASTER TO master_use_gtid = slave_pos;\n")
        master = ThisServersMaster("10.0.0.5", 3307, "repl")
        found, info = C.from_tree(self.root, "192.0.2.9", source_master=master)
        self.assertIsNone(info)
        found = C.complete(found, {"gtid_binlog_pos": "0-1-1859", "gtid_slave_pos": "0-1-1173",
                                   "binlog_file": "mysql-bin.000004", "binlog_pos": 4},
                           "192.0.2.9", 3306)
        status = found.status()
        self.assertEqual(status, {
            "MasterHost": "10.0.0.5", "MasterPort": 3307, "MasterUser": "repl",
            "BinlogFile": None, "BinlogPos": None, "GTID": "0-1-1173", "GTIDMode": "slave_pos",
            "From": "mariadb_backup_slave_info, the source's SHOW SLAVE STATUS (seed peer)"})
        # A backup has no crash-safe position of its own: the seed's is set.
        self.assertIn("SET GLOBAL gtid_slave_pos = '0-1-1173';", change_master(status, "repl", "pw"))

        # File and position when the replica does not use GTIDs; an unknown port is
        # taken as this host's.
        write(self.root, "mariadb_backup_slave_info",
              "CHANGE MASTER TO MASTER_LOG_FILE='mysql-bin.000007', MASTER_LOG_POS=4711;\n")
        found, _ = C.from_tree(self.root, "192.0.2.9", source_master=ThisServersMaster("db1", None, ""))
        found = C.complete(found, {}, "192.0.2.9", 3306)
        self.assertEqual((found.master_host, found.master_port, found.master_user, found.binlog_file,
                          found.binlog_pos, found.gtid), ("db1", 3306, None, "mysql-bin.000007", 4711, None))

    def test_hot_backup_of_a_replica_without_its_master_names_none(self):
        """A sender that announced no master (an older agent): the position is known, the
        master is not, so nothing is replicated from a wrong host."""
        write(self.root, "xtrabackup_slave_info", "SET GLOBAL gtid_slave_pos = '0-1-9';\n")
        write(self.root, "xtrabackup_binlog_info", "mysql-bin.000003\t342\t0-3-2\n")
        found, _ = C.from_tree(self.root, "192.0.2.9")
        found = C.complete(found, {}, "192.0.2.9", 3306)
        self.assertEqual((found.master_host, found.gtid, found.status()["From"]),
                         (None, "0-1-9", "xtrabackup_slave_info"))

    def test_status_round_trip(self):
        found = C.Coordinates("h", 1, "u", "f", 2, "g", "slave_pos", ["a", "b"])
        self.assertEqual(C.Coordinates.from_status(found.status()).status(), found.status())


class ServerArgumentsTests(unittest.TestCase):

    def options(self, **values) -> ServerOptions:
        return ServerOptions([Option(k, v, "my.cnf:1") for k, v in values.items()])

    def test_the_copy_runs_apart_from_the_host(self):
        args = verify.server_arguments(self.options(log_bin="mysql-bin"), "/d/.data.seed", "/d/data",
                                       "/tmp/p", "mysql")
        for expected in ("--datadir=/d/.data.seed", "--socket=/tmp/p/mysqld.sock",
                         "--skip-networking", "--skip-slave-start", "--event-scheduler=OFF",
                         "--skip-grant-tables", "--user=mysql", "--log-error=/tmp/p/error.log"):
            self.assertIn(expected, args)
        self.assertNotIn("--skip-log-bin", args)

    def test_host_files_outside_the_datadir_are_never_used(self):
        args = verify.server_arguments(self.options(
            log_bin="/var/log/mysql/mysql-bin", relay_log="/var/log/mysql/relay-bin",
            innodb_log_group_home_dir="/srv/redo", innodb_data_home_dir="/d/data"),
            "/d/.data.seed", "/d/data", "/tmp/p", None)
        self.assertIn("--skip-log-bin", args)
        self.assertIn("--relay-log=/tmp/p/relay-bin", args)
        self.assertIn("--loose-innodb-log-group-home-dir=/d/.data.seed", args)
        self.assertFalse([a for a in args if "innodb-data-home-dir" in a])
        self.assertFalse([a for a in args if a.startswith("--user")])

    def test_auto_wants_a_datadir_and_a_server(self):
        self.assertFalse(verify.wanted("auto", self.mktemp()))
        self.assertFalse(verify.wanted("off", "/"))
        self.assertTrue(verify.wanted("on", self.mktemp()))
        root = self.mktemp()
        os.makedirs(root)
        write(root, "ibdata1", "")
        write(root, "f.ibd", "")
        self.assertFalse(verify.wanted("auto", root))  # looks like a datadir, no system tables
        os.mkdir(os.path.join(root, "mysql"))
        write(root, "mysql/global_priv.frm", "")
        self.assertEqual(verify.wanted("auto", root), verify.server_program() is not None)


class ChangeMasterTests(unittest.TestCase):

    def test_a_primarys_copy_sets_the_gtid_position_a_replicas_keeps_its_own(self):
        from orchagent.replica.control import change_master

        primary = {"MasterHost": "db1", "MasterPort": 3306, "GTID": "0-1-5", "GTIDMode": "slave_pos",
                   "BinlogFile": "b.000001", "BinlogPos": 9,
                   "From": "binlog after crash recovery, gtid_binlog_pos, the source host (seed peer)"}
        text = change_master(primary, "repl", "it's\\secret")
        self.assertIn("SET GLOBAL gtid_slave_pos = '0-1-5';", text)
        self.assertIn("MASTER_PASSWORD='it\\'s\\\\secret'", text)
        self.assertIn("MASTER_USE_GTID=slave_pos", text)
        self.assertNotIn("MASTER_LOG_FILE", text)
        replica = dict(primary, From="master.info, relay-log.info, gtid_slave_pos")
        self.assertNotIn("SET GLOBAL", change_master(replica, "repl", None))
        by_file = dict(primary, GTID=None)
        self.assertIn("MASTER_LOG_FILE='b.000001', MASTER_LOG_POS=9", change_master(by_file, "", None))

    def test_slave_status_in_batch_mode(self):
        from orchagent.replica.control import parse_slave_status

        out = (b"Slave_IO_Running\tSlave_SQL_Running\tSeconds_Behind_Master\tLast_IO_Errno\tMaster_Host\n"
               b"Yes\tNo\tNULL\t1236\tdb1\n")
        self.assertEqual({k: v for k, v in parse_slave_status(out).items() if v is not None},
                         {"IORunning": True, "SQLRunning": False, "LastIOErrno": 1236, "MasterHost": "db1"})
        self.assertIsNone(parse_slave_status(b""))


class ThisServersMasterTests(unittest.TestCase):
    """The master a hot seed's source replicates from: read through MySQLClientCommand,
    and checked when a target reads it from the wire."""

    def config(self, client="mysql --defaults-file=/etc/db.cnf"):
        from orchagent.config import Config

        return Config(mysql_client_command=client)

    async def master(self, stdout=b"", exit_code=0, stderr=b""):
        from orchagent.replica.control import master_of_this_server
        from tests.support.fakes import FakeRunner

        runner = FakeRunner(self)
        runner.expect_shell("mysql --defaults-file=/etc/db.cnf", ["--batch"], stdout=stdout,
                            exit_code=exit_code, stderr=stderr)
        found = await master_of_this_server(self.config(), runner)
        self.assertEqual(runner.calls[0].stdin, b"SHOW SLAVE STATUS\n")
        return found

    async def test_a_replica_names_its_master(self):
        found = await self.master(b"Slave_IO_State\tMaster_Host\tMaster_User\tMaster_Port\tSlave_IO_Running\n"
                                  b"Waiting for master to send event\t10.0.0.5\trepl\t3307\tYes\n")
        self.assertEqual((found.host, found.port, found.user), ("10.0.0.5", 3307, "repl"))
        self.assertEqual(found.announce(), {"host": "10.0.0.5", "port": 3307, "user": "repl"})

    async def test_a_primary_names_none(self):
        self.assertIsNone(await self.master(b""))
        # RESET SLAVE leaves a row without a host.
        self.assertIsNone(await self.master(b"Master_Host\tMaster_Port\n\t3306\n"))

    async def test_a_client_that_cannot_say(self):
        from orchagent.errors import NotAvailable

        with self.assertRaises(NotAvailable) as caught:
            await self.master(exit_code=1, stderr=b"ERROR 1227 (42000): Access denied; you need "
                                                  b"(at least one of) the SLAVE MONITOR privilege(s)")
        self.assertIn("SLAVE MONITOR", caught.exception.message)

    async def test_no_client_configured(self):
        from orchagent.errors import NotAvailable
        from orchagent.replica.control import master_of_this_server

        with self.assertRaises(NotAvailable):
            await master_of_this_server(self.config(client=""), runner=None)

    def test_an_announced_master_is_checked(self):
        from orchagent.replica.control import ThisServersMaster

        good = ThisServersMaster.from_announce({"host": "db1", "port": 3306, "user": "repl"})
        self.assertEqual((good.host, good.port, good.user), ("db1", 3306, "repl"))
        self.assertEqual(ThisServersMaster.from_announce({"host": "db1", "port": None, "user": ""}).port, None)
        for bad in (None, "db1", {}, {"host": "", "port": 1, "user": "u"},
                    {"host": "db 1", "port": 1, "user": "u"}, {"host": "db1", "port": "3306", "user": "u"},
                    {"host": "db1", "port": 70000, "user": "u"}, {"host": "db1", "port": True, "user": "u"},
                    {"host": "db1", "port": 1, "user": 5}, {"host": "h" * 256, "port": 1, "user": "u"}):
            self.assertIsNone(ThisServersMaster.from_announce(bad), bad)


class DiagnoseTests(unittest.TestCase):
    """What stops replication, restated with the seed's coordinates (the texts are the
    servers' own: MariaDB's as the real tests met them, MySQL 8's GTID variant)."""

    SEED = {"MasterHost": "db1", "MasterPort": 3306, "MasterUser": "repl", "GTID": "0-1-5",
            "GTIDMode": "slave_pos", "BinlogFile": "mysql-bin.000012", "BinlogPos": 4711}

    def diagnose(self, errno, text, coordinates=SEED, **found):
        from orchagent.replica.control import diagnose

        return diagnose(dict({"LastIOErrno": errno, "LastIOError": text, "MasterHost": "db1",
                              "MasterPort": 3306}, **found), coordinates)

    def test_purged_by_file_names_the_file_and_position(self):
        text = ("Got fatal error 1236 from master when reading data from binary log: "
                "'Could not find first log file name in binary log index file'")
        problem = self.diagnose(1236, text, dict(self.SEED, GTID=None))
        self.assertTrue(problem.startswith(
            "the master db1:3306 no longer has the binlog this seed needs: mysql-bin.000012 "
            "(from position 4711), purged past the seed's position; the master's answer does not "
            "list the binlogs it still has (SHOW BINARY LOGS on the master does) (error 1236: Got fatal"), problem)
        self.assertIn("replication stays stopped, the datadir is kept", problem)

    def test_purged_by_gtid_names_what_the_master_lacks_when_it_says(self):
        text = ("Got fatal error 1236 from source when reading data from binary log: 'Cannot replicate "
                "because the source purged required binary logs. Replicate the missing transactions from "
                "elsewhere, or provision a new replica from backup. Consider increasing the source's binary "
                "log expiration period. The GTID set sent by the replica is 'u:1-5', and the missing "
                "transactions are 'u:6-9'.'")
        problem = self.diagnose(1236, text)
        self.assertIn("mysql-bin.000012 (from position 4711) holding the transactions after GTID 0-1-5", problem)
        self.assertIn("the master lacks the transactions u:6-9", problem)

    def test_another_1236_is_no_purge(self):
        problem = self.diagnose(1236, "Got fatal error 1236 from master: 'binlog truncated in the middle of event'")
        self.assertTrue(problem.startswith("the master db1:3306 refused to send its binlog from the seed's "
                                           "binlog mysql-bin.000012 at position 4711 / GTID 0-1-5"), problem)

    def test_refused_credentials_and_unreachable_master(self):
        for errno in (1045, 1698):
            problem = self.diagnose(errno, "Access denied for user 'repl'@'10.0.0.2'", MasterUser="repl")
            self.assertTrue(problem.startswith(f"the master db1:3306 refused the replication user repl "
                                               f"(error {errno}: Access denied"), problem)
        for errno in (2003, 2005):
            problem = self.diagnose(errno, "error connecting to master 'repl@db1:3306' - retry-time: 60")
            self.assertTrue(problem.startswith(f"cannot reach the master db1:3306 (error {errno}: "), problem)

    def test_sql_errors_and_nothing(self):
        problem = self.diagnose(0, "", LastSQLErrno=1062, LastSQLError="Duplicate entry '7'",
                                RelayMasterLogFile="mysql-bin.000013", ExecMasterLogPos=900)
        self.assertEqual(problem, "replication from db1:3306 stopped on an SQL error 1062 at "
                                  "mysql-bin.000013:900: Duplicate entry '7'")
        self.assertEqual(self.diagnose(0, ""), "")
        self.assertEqual(self.diagnose(2003, "error connecting", IORunning=True), "", "reconnected since")
