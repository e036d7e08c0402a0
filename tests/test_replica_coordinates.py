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
