"""The host endpoints end to end in memory: StubTreq -> AgentAPI -> real components.

The agent is the one :func:`orchagent.agent.build_agent` makes, pointed at a real
MariaDB through MySQLOptionsFile and the service commands; requests go through the whole
Klein app in memory.  Hostile input must change nothing and answer the v1 error body.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
from urllib.parse import quote

from treq.testing import StubTreq
from twisted.internet import reactor, task
from twisted.trial import unittest

from orchagent.agent import build_agent
from orchagent.api.resource import AgentAPI
from orchagent.config import Config
from orchagent.token import Token
from tests.support.mariadb import MariaDB

TOKEN = "host-api-token"
HOSTILE = ["x;touch {canary}", "$(touch {canary})", "`touch {canary}`", "../../{canary}",
           "a b|touch {canary}"]


class HostApiCase(unittest.TestCase):
    server_options: dict = {}

    def setUp(self):
        self.db = MariaDB.create(self, options=self.server_options)
        self.canary = os.path.abspath(self.mktemp())
        self.agent = self.make_agent()
        self.http = StubTreq(AgentAPI(self.agent).resource())

    def make_agent(self, **config):
        state = os.path.abspath(self.mktemp())
        settings = dict(self.db.agent_settings(), state_dir=state, agent_hostname="db1.test")
        settings.update(config)
        return build_agent(Config(**settings), reactor, token=Token(TOKEN))

    async def call(self, path: str, method: str = "GET", token: str | None = TOKEN, http=None, **kwargs):
        """(status, JSON body) of one request; the agent's work runs on the real reactor."""
        http = http or self.http
        if token is not None:
            path += ("&" if "?" in path else "?") + "token=" + token
        d = http.request(method, "http://agent" + path, **kwargs)
        response = await self.settle(http, d)
        body = await self.settle(http, response.content())
        return response.code, json.loads(body)

    async def settle(self, http, d):
        """Pump the in-memory connection until ``d`` has its final result."""
        done = []
        d.addBoth(lambda result: done.append(result) or result)
        waited = 0.0
        while not done:
            http.flush()
            await task.deferLater(reactor, 0.01, lambda: None)
            waited += 0.01
            if waited > 60:
                raise AssertionError("request did not finish")
        return await d

    async def assert_error(self, path: str, *words: str, method: str = "GET", **kwargs):
        code, body = await self.call(path, method=method, **kwargs)
        self.assertEqual(code, 500, body)
        self.assertEqual(set(body), {"Code", "Message", "Details"})
        self.assertEqual((body["Code"], body["Details"]), ("ERROR", None))
        for word in words:
            self.assertIn(word, body["Message"])
        return body["Message"]

    def hostile(self):
        for pattern in HOSTILE:
            yield pattern.format(canary=self.canary)

    def assert_unchanged(self):
        self.assertFalse(os.path.exists(self.canary), "hostile input reached a shell")
        self.assertIn("ibdata1", os.listdir(self.db.datadir))


class FactsApiTests(HostApiCase):
    async def test_facts_endpoints(self):
        self.assertEqual(await self.call("/api/mysql-port"), (200, self.db.port))
        code, used = await self.call("/api/mysql-du")
        self.assertEqual(code, 200)
        self.assertIsInstance(used, int)
        self.assertGreater(used, 1_000_000)
        code, free = await self.call("/api/mysql-datadir-available-space")
        self.assertEqual(code, 200)
        self.assertGreater(free, 0)
        code, tail = await self.call("/api/mysql-error-log-tail")
        self.assertEqual(code, 200)
        self.assertEqual(len(tail), 20)
        self.assertTrue(all(isinstance(line, str) for line in tail))
        code, size = await self.call("/api/du?path=" + quote(self.db.datadir + "/mysql"))
        self.assertEqual(code, 200)
        self.assertGreater(size, 0)
        self.assertLess(size, used)

    async def test_every_endpoint_needs_the_token(self):
        for path in ("/api/mysql-port", "/api/mysql-du", "/api/mysql-datadir-available-space",
                     "/api/mysql-error-log-tail", "/api/mysql-status", "/api/mysql-stop",
                     "/api/mysql-start", "/api/delete-mysql-datadir", "/api/post-copy",
                     "/api/post-copy/?sourceHost=db2", "/api/du?path=/tmp",
                     "/api/mysql-relay-log-index-file", "/api/mysql-relay-log-files",
                     "/api/mysql-relay-log-end-coordinates",
                     "/api/mysql-binlog-contents?binlog=mysql-bin.000001",
                     "/api/mysql-binlog-binary-contents?binlog=mysql-bin.000001",
                     "/api/mysql-relaylog-contents-tail/mysqld-relay-bin.000001/4"):
            await self.assert_error(path, "Invalid token", token=None)
            await self.assert_error(path, "Invalid token", token="wrong")
        await self.assert_error("/api/apply-relaylog-contents", "Invalid token", method="POST",
                                token="wrong", data=b"H4sI")
        self.assertTrue(self.db.is_running())

    async def test_du_refuses_bad_paths(self):
        await self.assert_error("/api/du", "missing parameter path")
        await self.assert_error("/api/du?path=relative/dir", "absolute path")
        await self.assert_error("/api/du?path=" + quote("/var/../etc"), "..")
        for value in self.hostile():
            message = await self.assert_error("/api/du?path=" + quote("/tmp/" + value))
            self.assertTrue("no such file" in message or ".." in message, message)
        self.assert_unchanged()

    async def test_error_log_tail_without_log_error(self):
        config_file = self.db.option_file + ".nolog"
        with open(self.db.option_file) as src, open(config_file, "w") as dst:
            dst.write("".join(line for line in src if not line.startswith("log-error")))
        http = StubTreq(AgentAPI(self.make_agent(mysql_options_file=config_file)).resource())
        await self.assert_error("/api/mysql-error-log-tail", "log-error is not set", http=http)


class ServiceApiTests(HostApiCase):
    async def test_status_stop_start(self):
        self.assertEqual(await self.call("/api/mysql-status"), (200, True))
        self.assertEqual(await self.call("/api/mysql-stop"), (200, True))
        self.assertFalse(self.db.is_running())
        self.assertEqual(await self.call("/api/mysql-status"), (200, False))
        self.assertEqual(await self.call("/api/mysql-start"), (200, True))
        self.assertEqual(await self.call("/api/mysql-status"), (200, True))
        self.assertEqual(self.db.sql("SELECT 1"), [("1",)])

    async def test_failing_command_is_the_v1_error(self):
        http = StubTreq(AgentAPI(self.make_agent(
            mysql_service_stop_command="echo 'no permission to stop' >&2; exit 1")).resource())
        await self.assert_error("/api/mysql-stop", "cannot stop MySQL", "no permission to stop", http=http)
        self.assertTrue(self.db.is_running())


class DatadirApiTests(HostApiCase):
    async def test_delete_refused_while_running_then_done(self):
        await self.assert_error("/api/delete-mysql-datadir", "MySQL is running")
        self.assert_unchanged()
        self.db.stop()
        self.assertEqual(await self.call("/api/delete-mysql-datadir"), (200, True))
        self.assertTrue(os.path.isdir(self.db.datadir))
        self.assertEqual(os.listdir(self.db.datadir), [])

    async def test_delete_refuses_the_root(self):
        self.db.stop()
        http = StubTreq(AgentAPI(self.make_agent(mysql_datadir_command="echo /")).resource())
        await self.assert_error("/api/delete-mysql-datadir", "system directory", http=http)
        self.assert_unchanged()

    async def test_delete_refuses_a_directory_holding_only_mysql(self):
        """#16 item 13: the v1 error body names the directory and why; nothing goes."""
        self.db.stop()
        parent = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(parent, "mysql", "bin"))
        open(os.path.join(parent, "mysql", "bin", "mysqld"), "w").close()
        http = StubTreq(AgentAPI(self.make_agent(mysql_datadir_command=f"echo {parent}")).resource())
        await self.assert_error("/api/delete-mysql-datadir",
                                f"{parent} does not look like a MySQL datadir", http=http)
        self.assertEqual(os.listdir(os.path.join(parent, "mysql", "bin")), ["mysqld"])
        self.assert_unchanged()

    async def test_post_copy(self):
        self.db.stop()
        open(os.path.join(self.db.datadir, "auto.cnf"), "w").close()
        open(os.path.join(self.db.datadir, "master.info"), "w").close()
        self.assertEqual(await self.call("/api/post-copy/?sourceHost=db2.example"), (200, True))
        names = os.listdir(self.db.datadir)
        self.assertNotIn("auto.cnf", names)
        self.assertIn("master.info.from-db2.example", names)
        self.assertEqual(await self.call("/api/post-copy"), (200, True))

    async def test_post_copy_refuses_bad_source_hosts(self):
        self.db.stop()
        open(os.path.join(self.db.datadir, "master.info"), "w").close()
        await self.assert_error("/api/post-copy/?sourceHost=", "sourceHost")
        for value in self.hostile():
            await self.assert_error("/api/post-copy/?sourceHost=" + quote(value), "invalid host")
        self.assert_unchanged()
        self.assertIn("master.info", os.listdir(self.db.datadir))


class BinlogApiTests(HostApiCase):
    def setUp(self):
        super().setUp()
        self.db.sql("CREATE DATABASE shop; CREATE TABLE shop.t (id INT PRIMARY KEY);"
                    "INSERT INTO shop.t VALUES (1)")
        self.binlog, self.end = self.db.sql("SHOW MASTER STATUS")[0][:2]
        self.path = os.path.join(self.db.datadir, self.binlog)

    async def test_contents(self):
        code, text = await self.call(f"/api/mysql-binlog-contents?binlog={self.binlog}")
        self.assertEqual(code, 200)
        self.assertIn("INSERT INTO shop.t VALUES (1)", gzip.decompress(base64.b64decode(text)).decode())
        code, data = await self.call(
            f"/api/mysql-binlog-binary-contents?binlog={quote(self.path)}&start=0&stop={self.end}")
        self.assertEqual(code, 200)
        with open(self.path, "rb") as fh:
            self.assertEqual(gzip.decompress(base64.b64decode(data)), fh.read(int(self.end)))

    async def test_bad_names_and_positions(self):
        for endpoint in ("mysql-binlog-contents", "mysql-binlog-binary-contents"):
            await self.assert_error(f"/api/{endpoint}", "missing parameter binlog")
            await self.assert_error(f"/api/{endpoint}?binlog={self.binlog}&start=-1", "start")
            await self.assert_error(f"/api/{endpoint}?binlog={self.binlog}&stop=1e3", "stop")
            await self.assert_error(f"/api/{endpoint}?binlog=/etc/passwd", "not in the server's index")
            for value in self.hostile():
                message = await self.assert_error(f"/api/{endpoint}?binlog=" + quote(value))
                self.assertIn("binlog", message)
        self.assert_unchanged()

    async def test_no_relay_logs_here(self):
        for path in ("/api/mysql-relay-log-index-file", "/api/mysql-relay-log-files",
                     "/api/mysql-relay-log-end-coordinates",
                     "/api/mysql-relaylog-contents-tail/mysqld-relay-bin.000001/0"):
            await self.assert_error(path, "mysqld-relay-bin.index")

    async def test_apply(self):
        target = MariaDB.create(self, server_id=9)
        http = StubTreq(AgentAPI(self.make_agent(mysql_client_command=target.client_command)).resource())
        _, payload = await self.call(f"/api/mysql-binlog-binary-contents?binlog={self.binlog}")
        wrapped = base64.encodebytes(base64.b64decode(payload))  # as the Go agent sent it
        self.assertEqual(await self.call("/api/apply-relaylog-contents", method="POST", data=wrapped,
                                         http=http), (200, "OK"))
        self.assertEqual(target.sql("SELECT id FROM shop.t"), [("1",)])

    async def test_apply_refuses_bad_bodies(self):
        before = self.db.sql("SHOW DATABASES")
        for body, word in ((b"", "empty request body"), (b"%%%", "base64"),
                           (base64.b64encode(b"DROP DATABASE shop"), "gzip"),
                           (base64.b64encode(gzip.compress(b"DROP DATABASE shop;")), "binlog magic")):
            await self.assert_error("/api/apply-relaylog-contents", word, method="POST", data=body)
        self.assertEqual(self.db.sql("SHOW DATABASES"), before)


class RelayLogApiTests(HostApiCase):
    async def test_relay_log_endpoints(self):
        replica = MariaDB.create(self, server_id=2)
        self.db.sql("CREATE USER repl@'127.0.0.1' IDENTIFIED BY 'pw';"
                    "GRANT REPLICATION SLAVE ON *.* TO repl@'127.0.0.1';"
                    "CREATE DATABASE shop; CREATE TABLE shop.t (id INT PRIMARY KEY); INSERT INTO shop.t VALUES (5)")
        replica.sql(f"CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={self.db.port}, "
                    "MASTER_USER='repl', MASTER_PASSWORD='pw', MASTER_USE_GTID=no; START SLAVE")
        waited = 0.0
        while replica.sql("SELECT COUNT(*) FROM information_schema.tables WHERE table_schema='shop'") != [("1",)] \
                or replica.sql("SELECT COUNT(*) FROM shop.t") != [("1",)]:
            await task.deferLater(reactor, 0.05, lambda: None)
            waited += 0.05
            self.assertLess(waited, 30)
        http = StubTreq(AgentAPI(build_agent(Config(**dict(
            replica.agent_settings(), state_dir=os.path.abspath(self.mktemp()))),
            reactor, token=Token(TOKEN))).resource())
        index = os.path.join(replica.datadir, "mysqld-relay-bin.index")
        self.assertEqual(await self.call("/api/mysql-relay-log-index-file", http=http), (200, index))
        code, files = await self.call("/api/mysql-relay-log-files", http=http)
        self.assertEqual(code, 200)
        self.assertTrue(files and all(f.startswith(replica.datadir + "/mysqld-relay-bin.") for f in files))
        code, end = await self.call("/api/mysql-relay-log-end-coordinates", http=http)
        self.assertEqual((code, end), (200, {"LogFile": files[-1], "LogPos": os.path.getsize(files[-1]),
                                             "Type": 1}))
        name = os.path.basename(files[0])
        code, tail = await self.call(f"/api/mysql-relaylog-contents-tail/{name}/0", http=http)
        self.assertEqual(code, 200)
        with open(files[0], "rb") as fh:
            self.assertTrue(gzip.decompress(base64.b64decode(tail)).startswith(fh.read()))
        await self.assert_error(f"/api/mysql-relaylog-contents-tail/{name}/x", "start", http=http)
        await self.assert_error("/api/mysql-relaylog-contents-tail/nothere.000001/0", "not in the server's index",
                                http=http)
        for value in self.hostile():
            if "/" not in value:
                await self.assert_error(f"/api/mysql-relaylog-contents-tail/{quote(value)}/0", "relay log", http=http)
        self.assert_unchanged()
