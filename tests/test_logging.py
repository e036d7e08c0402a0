"""Log formats: JSON lines (by --logger or LogFormat), their fields, and secrets kept out.

The end-to-end tests run the real daemon (tests.support.daemon) and read everything it
wrote: no token, wrong token, seed key or basic-auth password may appear, in either
format, while the access log lines themselves must be there (masked).
"""

from __future__ import annotations

import io
import json
import os

from twisted.application import service
from twisted.internet import reactor
from twisted.logger import ILogObserver, LogLevel, Logger, LogPublisher
from twisted.python.failure import Failure
from twisted.scripts._twistd_unix import ServerOptions
from twisted.trial import unittest
from twisted.web.http_headers import Headers

from orchagent import logging as agent_logging
from orchagent import service as agent_service
from orchagent import tap
from orchagent.config import Config
from tests.support.daemon import start_daemon


def emit(observer, *args, **kwargs):
    publisher = LogPublisher(observer)
    Logger(namespace="orchagent.test", observer=publisher).info(*args, **kwargs)


class RecordTestCase(unittest.TestCase):
    def test_fields_message_level(self):
        out = io.StringIO()
        emit(agent_logging.json_lines_observer(out),
             "seed {seed_id}: sent {count} bytes", seed_id="42", count=1000, command="mysqlbinlog")
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 1)
        record = json.loads(lines[0])
        self.assertEqual(record["message"], "seed 42: sent 1000 bytes")
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["namespace"], "orchagent.test")
        self.assertEqual((record["seed_id"], record["count"], record["command"]), ("42", 1000, "mysqlbinlog"))
        self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")

    def test_seed_id_under_other_names(self):
        for name in ("SeedId", "seed"):
            record = agent_logging.event_record({"log_format": "x", name: "17"})
            self.assertEqual(record["seed_id"], "17", name)

    def test_secrets_masked(self):
        record = agent_logging.event_record({
            "log_format": "GET /api/receive-mysql-seed-data/1?key=K3Y&token=T0K HTTP/1.1 {path}",
            "log_level": LogLevel.warn,
            "path": b"/api/x?token=T0K",
            "token": "T0K", "seed_key": "K3Y", "http_auth_password": "PW", "monkey": "ok",
        })
        text = json.dumps(record)
        for secret in ("T0K", "K3Y", "PW"):
            self.assertNotIn(secret, text)
        self.assertEqual(record["message"],
                         "GET /api/receive-mysql-seed-data/1?key=***&token=*** HTTP/1.1 b'/api/x?token=***'")
        self.assertEqual((record["token"], record["seed_key"], record["http_auth_password"]), ("***",) * 3)
        self.assertEqual(record["monkey"], "ok")
        self.assertEqual(record["level"], "warn")

    def test_failure_traceback_and_non_scalars(self):
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        record = agent_logging.event_record({
            "log_format": "boom", "log_failure": failure, "request": object(), "ratio": 0.5})
        self.assertIn("ZeroDivisionError", record["failure"])
        self.assertNotIn("request", record)
        self.assertEqual(record["ratio"], 0.5)

    def test_redact(self):
        self.assertEqual(agent_logging.redact('"GET /a?token=abc&x=1&key=k%20y HTTP/1.1"'),
                         '"GET /a?token=***&x=1&key=*** HTTP/1.1"')
        self.assertEqual(agent_logging.redact("/a?tokens=1&monkey=2"), "/a?tokens=1&monkey=2")

    def test_redact_names_as_the_api_decodes_them(self):
        """#16 item 11: a name percent-encoded (or with ``+``) still names the token or the
        key for Twisted's query parser, so it is masked too; other names are left alone."""
        for name in ("t%6Fken", "%74oken", "%74%6F%6B%65%6E", "k%65y", "%6B%65%79", "Token", "KEY"):
            line = f'"GET /api/x?a=1&{name}=s3cret&b=2 HTTP/1.1"'
            self.assertEqual(agent_logging.redact(line), f'"GET /api/x?a=1&{name}=***&b=2 HTTP/1.1"', name)
        for name in ("t%6Fkens", "to+ken", "%2574oken", "x%26token"):
            line = f"/api/x?{name}=v"
            self.assertEqual(agent_logging.redact(line), line, name)


class TwistdLoggerOptionTestCase(unittest.TestCase):
    def test_logger_option_resolves_to_a_json_observer(self):
        """``twistd --logger orchagent.logging.json_observer`` names a usable factory."""
        options = ServerOptions()
        options.parseOptions(["--nodaemon", "--logger", "orchagent.logging.json_observer",
                              "orchestrator-agent", "--port", "3002"])
        self.assertIs(options["logger"], agent_logging.json_observer)
        out = io.StringIO()
        self.patch(agent_logging.sys, "stdout", out)
        observer = options["logger"]()
        self.assertTrue(ILogObserver.providedBy(observer))
        emit(observer, "hello {who}", who="world")
        self.assertEqual(json.loads(out.getvalue())["message"], "hello world")


class LogFormatConfigTestCase(unittest.TestCase):
    def make_service(self, config: dict, twistd: dict | None = None):
        path = os.path.join(self.mktemp())
        os.makedirs(path)
        config = dict({"HTTPPort": 1, "StateDir": os.path.join(path, "state")}, **config)
        with open(os.path.join(path, "agent.json"), "w") as fh:
            json.dump(config, fh)
        options = tap.Options()
        options.parseOptions(["--config", os.path.join(path, "agent.json")])
        options.parent = twistd
        return agent_service.makeService(options, reactor=None), path

    def test_json_observer_handed_to_twistds_application(self):
        root, _ = self.make_service({"LogFormat": "json"})
        application = service.Application("orchestrator-agent")
        root.setServiceParent(application)
        observer = application.getComponent(ILogObserver)
        self.assertIsNotNone(observer)
        self.assertIs(observer, root.log_observer)
        self.assertIn(root, list(service.IServiceCollection(application)))

    def test_text_leaves_twistds_observer(self):
        root, _ = self.make_service({})
        application = service.Application("orchestrator-agent")
        root.setServiceParent(application)
        self.assertIsNone(application.getComponent(ILogObserver))

    def test_json_to_twistds_logfile(self):
        directory = self.mktemp()
        os.makedirs(directory)
        logfile = os.path.join(directory, "agent.log")
        observer = agent_logging.configured_observer(
            Config(log_format="json"), type("O", (), {"parent": {"logfile": logfile, "nodaemon": True}})())
        emit(observer, "to the file {n}", n=1)
        with open(logfile) as fh:
            self.assertEqual(json.loads(fh.read())["message"], "to the file 1")


class DaemonLogsTestCase(unittest.TestCase):
    """The real daemon: requests carrying every kind of secret, then its whole output."""

    secrets = {"wrong": "wrong-t0ken-5ecret", "key": "seed-k3y-5ecret", "password": "pa55-5ecret"}

    async def exercise(self, config: dict) -> str:
        config = dict(config, TokenHttpHeader="X-Agent-Token", HTTPAuthUser="orch",
                      HTTPAuthPassword=self.secrets["password"])
        agent = await start_daemon(self, config)
        auth = ("orch", self.secrets["password"])
        self.assertEqual((await agent.get("/api/hostname", token=False, auth=auth))[0], 200)
        status, body = await agent.get("/api/datacenter", auth=auth)
        self.assertEqual(status, 200, body)
        status, body = await agent.get("/api/datacenter", token=False, auth=auth,
                                       headers={"X-Agent-Token": agent.token})
        self.assertEqual(status, 200, body)
        response = await agent.http_client.get(
            agent.base_url + "/api/datacenter", params={"token": self.secrets["wrong"]}, auth=auth)
        self.assertEqual((response.code, (await response.json())["Message"]), (500, "Invalid token"))
        status, _ = await agent.get("/api/seed-command-completed/999", auth=auth,
                                    key=self.secrets["key"])
        status, _ = await agent.get("/api/datacenter", auth=("orch", self.secrets["password"] + "x"))
        self.assertEqual(status, 401)
        await agent.stop()
        output = agent.output()
        for secret in (agent.token, *self.secrets.values()):
            self.assertNotIn(secret, output)
        self.assertIn("GET /api/datacenter?token=*** HTTP/1.1", output)
        self.assertIn("/api/seed-command-completed/999?", output)
        self.assertIn("key=***", output)
        return output

    async def test_encoded_parameter_names_are_masked(self):
        """#16 item 11: ``t%6Fken=`` and ``%74oken=`` authenticate and ``k%65y=`` gives a
        seed its key, as ``token=``/``key=`` do; none of their values reaches the log, nor
        the token sent in the header."""
        from twisted.web.client import Agent, HTTPConnectionPool, readBody

        agent = await start_daemon(self, {"TokenHttpHeader": "X-Agent-Token"})
        client = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        base = agent.base_url.encode()
        key = self.secrets["key"].encode()
        token = agent.token.encode()
        for query in (b"t%6Fken=" + token, b"%74oken=" + token, b"x=1&%74%6F%6B%65%6E=" + token):
            response = await client.request(b"GET", base + b"/api/datacenter?" + query)
            body = await readBody(response)
            self.assertEqual(response.code, 200, (query, body))
        response = await client.request(b"GET", base + b"/api/datacenter",
                                        Headers({b"X-Agent-Token": [token]}))
        self.assertEqual(response.code, 200, await readBody(response))
        response = await client.request(
            b"GET", base + b"/api/receive-mysql-seed-data/41?t%6Fken=" + token + b"&k%65y=" + key)
        await readBody(response)
        response = await client.request(b"GET", base + b"/api/abort-seed/41?token=" + token)
        await readBody(response)
        await agent.stop()
        output = agent.output()
        for secret in (agent.token, self.secrets["key"]):
            self.assertNotIn(secret, output)
        self.assertIn("GET /api/datacenter?t%6Fken=*** HTTP/1.1", output)
        self.assertIn("GET /api/datacenter?%74oken=*** HTTP/1.1", output)
        self.assertIn("GET /api/datacenter?x=1&%74%6F%6B%65%6E=*** HTTP/1.1", output)
        self.assertIn("/api/receive-mysql-seed-data/41?t%6Fken=***&k%65y=*** HTTP/1.1", output)

    async def test_text(self):
        output = await self.exercise({})
        self.assertIn("[orchagent.service#info] orchestrator-agent for", output)

    async def test_json(self):
        output = await self.exercise({"LogFormat": "json"})
        records = [json.loads(line) for line in output.splitlines() if line.strip()]
        namespaces = {r["namespace"] for r in records}
        self.assertIn("orchagent.service", namespaces)
        access = [r for r in records if "GET /api/datacenter?token=***" in r["message"]]
        self.assertEqual(len(access), 3)  # good token, wrong token, bad password
