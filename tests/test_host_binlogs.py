"""Relay-log and binlog endpoints against the files of real MariaDB servers.

A source server writes; a replica of it fills its relay logs; a third server receives
relay log contents through apply-relaylog-contents, as orchestrator uses them.
"""

from __future__ import annotations

import base64
import gzip
import os
import subprocess

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from orchagent.config import Config
from orchagent.errors import BadRequest, CommandFailed, NotFound
from orchagent.host.binlogs import MYSQLBINLOG, MySQLLogs, binlog_header_size
from orchagent.host.facts import MySQLHost
from orchagent.host.service import MySQLService
from orchagent.process import ProcessRunner
from tests.support.mariadb import MariaDB


def make_logs(db: MariaDB) -> MySQLLogs:
    config = Config(**db.agent_settings())
    runner = ProcessRunner(reactor)
    host = MySQLHost(config, runner, reactor, MySQLService(config, runner))
    return MySQLLogs(config, runner, reactor, host)


def decode(answer: str) -> bytes:
    return gzip.decompress(base64.b64decode(answer, validate=True))


def master_position(db: MariaDB) -> tuple[str, int]:
    name, position = db.sql("SHOW MASTER STATUS")[0][:2]
    return name, int(position)


def binlog_text(data: bytes) -> str:
    """What mysqlbinlog makes of a binary log stream."""
    return subprocess.run([*MYSQLBINLOG, "-"], input=data, check=True,
                          stdout=subprocess.PIPE).stdout.decode()


async def wait_for(condition, timeout: float = 30.0) -> None:
    waited = 0.0
    while not condition():
        if waited > timeout:
            raise AssertionError(f"condition not met after {timeout}s")
        await task.deferLater(reactor, 0.05, lambda: None)
        waited += 0.05


class BinlogTests(unittest.TestCase):
    def setUp(self):
        self.db = MariaDB.create(self)
        self.db.sql("CREATE DATABASE shop; CREATE TABLE shop.t (id INT PRIMARY KEY, v VARCHAR(20))")
        self.db.sql("INSERT INTO shop.t VALUES (1, 'first')")
        self.file1, self.between = master_position(self.db)
        self.db.sql("INSERT INTO shop.t VALUES (2, 'second')")
        _, self.end1 = master_position(self.db)
        self.logs = make_logs(self.db)
        self.path1 = os.path.join(self.db.datadir, self.file1)

    async def test_text_contents(self):
        text = decode(await self.logs.binlog_contents([self.file1])).decode()
        self.assertIn("CREATE TABLE shop.t", text)
        self.assertIn("INSERT INTO shop.t VALUES (1, 'first')", text)
        self.assertIn("INSERT INTO shop.t VALUES (2, 'second')", text)
        part = decode(await self.logs.binlog_contents([self.path1], self.between, self.end1)).decode()
        self.assertIn("INSERT INTO shop.t VALUES (2, 'second')", part)
        self.assertNotIn("'first'", part)

    async def test_text_contents_of_several_files(self):
        self.db.sql("FLUSH BINARY LOGS; INSERT INTO shop.t VALUES (3, 'third')")
        file2, _ = master_position(self.db)
        text = decode(await self.logs.binlog_contents([self.file1, file2], self.between)).decode()
        self.assertIn("'second'", text)
        self.assertIn("'third'", text)
        self.assertNotIn("'first'", text)

    async def test_binary_contents_whole_file(self):
        with open(self.path1, "rb") as fh:
            whole = fh.read()
        self.assertEqual(decode(await self.logs.binlog_binary_contents([self.file1])), whole)

    async def test_binary_contents_range_is_header_plus_bytes(self):
        with open(self.path1, "rb") as fh:
            whole = fh.read()
        header = binlog_header_size(self.path1)
        got = decode(await self.logs.binlog_binary_contents([self.file1], self.between, self.end1))
        self.assertEqual(got, whole[:header] + whole[self.between:self.end1])
        text = binlog_text(got)
        self.assertIn("'second'", text)
        self.assertNotIn("'first'", text)

    async def test_binary_contents_across_files_drop_later_headers(self):
        self.db.sql("FLUSH BINARY LOGS; INSERT INTO shop.t VALUES (3, 'third')")
        file2, end2 = master_position(self.db)
        self.db.sql("INSERT INTO shop.t VALUES (4, 'fourth')")
        path2 = os.path.join(self.db.datadir, file2)
        with open(self.path1, "rb") as a, open(path2, "rb") as b:
            one, two = a.read(), b.read()
        got = decode(await self.logs.binlog_binary_contents([self.file1, file2], self.between, end2))
        expected = (one[:binlog_header_size(self.path1)] + one[self.between:]
                    + two[binlog_header_size(path2):end2])
        self.assertEqual(got, expected)
        text = binlog_text(got)
        self.assertIn("'second'", text)
        self.assertIn("'third'", text)
        self.assertNotIn("'fourth'", text)

    async def test_refuses_unknown_names_and_ranges(self):
        size = os.path.getsize(self.path1)
        for names, kind in ((["../mysql-bin.000001"], BadRequest),
                            ([self.db.datadir + "/../data/mysql-bin.000001"], BadRequest),
                            (["/etc/passwd"], NotFound),
                            (["mysql-bin.000009"], NotFound),
                            (["mysql-bin.index"], NotFound),
                            (["ibdata1"], NotFound),
                            (["mysql-bin.000001;id"], NotFound),
                            ([], BadRequest)):
            e = await self.assertFailure(defer.ensureDeferred(self.logs.binlog_contents(names)), kind)
            self.assertTrue(e.message)
            await self.assertFailure(defer.ensureDeferred(self.logs.binlog_binary_contents(names)), kind)
        for start, stop, word in ((10, 0, "start 10"), (size + 1, 0, "start"),
                                  (0, size + 1, "stop"), (self.end1, self.between, "stop")):
            e = await self.assertFailure(defer.ensureDeferred(
                self.logs.binlog_binary_contents([self.file1], start, stop)), BadRequest)
            self.assertIn(word, e.message)


class RelayLogTests(unittest.TestCase):
    """A replica's relay logs, and applying them to a third server."""

    def setUp(self):
        self.source = MariaDB.create(self, server_id=1)
        self.source.sql("CREATE USER repl@'127.0.0.1' IDENTIFIED BY 'pw';"
                        "GRANT REPLICATION SLAVE ON *.* TO repl@'127.0.0.1';"
                        "CREATE DATABASE shop; CREATE TABLE shop.t (id INT PRIMARY KEY, v VARCHAR(20));"
                        "INSERT INTO shop.t VALUES (1, 'first'), (2, 'second')")
        self.replica = MariaDB.create(self, server_id=2)
        self.replica.sql(f"CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={self.source.port}, "
                         "MASTER_USER='repl', MASTER_PASSWORD='pw', MASTER_USE_GTID=no; START SLAVE")
        self.logs = make_logs(self.replica)

    def rows(self, db: MariaDB):
        try:
            return db.sql("SELECT id, v FROM shop.t ORDER BY id")
        except RuntimeError:
            return None

    async def synced(self):
        expected = self.rows(self.source)
        await wait_for(lambda: self.rows(self.replica) == expected)

    async def test_index_files_and_end_coordinates(self):
        await self.synced()
        index = await self.logs.relay_log_index_file()
        self.assertEqual(index, os.path.join(self.replica.datadir, "mysqld-relay-bin.index"))
        files = await self.logs.relay_log_files()
        self.assertTrue(files)
        for path in files:
            self.assertEqual(os.path.dirname(path), self.replica.datadir)
            self.assertTrue(os.path.exists(path), path)
        end = await self.logs.relay_log_end_coordinates()
        self.assertEqual(end, {"LogFile": files[-1], "LogPos": os.path.getsize(files[-1]), "Type": 1})
        relay_log_file = self.replica.sql("SHOW SLAVE STATUS")[0][7]
        self.assertEqual(os.path.basename(end["LogFile"]), relay_log_file)

    async def test_no_relay_logs_on_a_server_that_never_replicated(self):
        e = await self.assertFailure(defer.ensureDeferred(make_logs(self.source).relay_log_files()), NotFound)
        self.assertIn("mysqld-relay-bin.index", e.message)

    async def test_tail_applied_to_another_server_catches_it_up(self):
        await self.synced()
        files = await self.logs.relay_log_files()
        target = MariaDB.create(self, server_id=3)
        target_logs = make_logs(target)

        tail = await self.logs.relaylog_contents_tail(os.path.basename(files[0]), 0)
        await target_logs.apply_relaylog_contents(base64.b64decode(tail))
        self.assertEqual(self.rows(target), [("1", "first"), ("2", "second")])

        mark = await self.logs.relay_log_end_coordinates()
        self.source.sql("INSERT INTO shop.t VALUES (3, 'third'); UPDATE shop.t SET v='changed' WHERE id=1")
        await self.synced()
        tail = await self.logs.relaylog_contents_tail(mark["LogFile"], mark["LogPos"])
        await target_logs.apply_relaylog_contents(base64.b64decode(tail))
        self.assertEqual(self.rows(target), self.rows(self.source))
        self.assertEqual(self.rows(target), [("1", "changed"), ("2", "second"), ("3", "third")])

    async def test_tail_refuses_unknown_relay_logs(self):
        await self.synced()
        for name, kind in (("mysql-bin.000001", NotFound), ("../mysqld-relay-bin.000001", BadRequest),
                           ("/etc/passwd", NotFound)):
            await self.assertFailure(defer.ensureDeferred(self.logs.relaylog_contents_tail(name, 0)), kind)


class ApplyTests(unittest.TestCase):
    def setUp(self):
        self.db = MariaDB.create(self)
        self.logs = make_logs(self.db)

    async def refused(self, payload: bytes, kind, word: str):
        e = await self.assertFailure(defer.ensureDeferred(self.logs.apply_relaylog_contents(payload)), kind)
        self.assertIn(word, e.message)

    async def test_bad_payloads_change_nothing(self):
        before = self.db.sql("SHOW DATABASES")
        await self.refused(b"not gzip at all", BadRequest, "not valid gzip")
        await self.refused(gzip.compress(b"CREATE DATABASE evil;")[:-4], BadRequest, "gzip")
        await self.refused(gzip.compress(b"CREATE DATABASE evil;"), BadRequest, "no binlog magic")
        self.assertEqual(self.db.sql("SHOW DATABASES"), before)

    async def test_client_failure_is_reported(self):
        source = MariaDB.create(self, server_id=5)
        source.sql("CREATE DATABASE shop; CREATE TABLE shop.t (id INT PRIMARY KEY)")
        name, start = master_position(source)
        source.sql("INSERT INTO shop.t VALUES (7)")
        _, stop = master_position(source)
        payload = await make_logs(source).binlog_binary_contents([name], start, stop)
        e = await self.assertFailure(defer.ensureDeferred(
            self.logs.apply_relaylog_contents(base64.b64decode(payload))), CommandFailed)
        self.assertIn("shop", e.message)
        self.db.sql("CREATE DATABASE shop; CREATE TABLE shop.t (id INT PRIMARY KEY)")
        await self.logs.apply_relaylog_contents(base64.b64decode(payload))
        self.assertEqual(self.db.sql("SELECT id FROM shop.t"), [("7",)])
