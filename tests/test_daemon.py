"""The real daemon: ``twistd -n orchestrator-agent`` as a child process on loopback."""

from __future__ import annotations

import gzip
import json
import os
import socket
import stat

from twisted.internet import endpoints, protocol, reactor, utils
from twisted.internet.error import ConnectionRefusedError
from twisted.trial import unittest

from orchagent.config import DEFAULT_SEARCH_PATH
from tests.support.certs import TestCA, https_client
from tests.support.daemon import (REPO_ROOT, TWISTD, free_port, loaded_cryptography, start_daemon,
                                  wait_until)
from tests.support.orchestrator import StandInOrchestrator


class StartupTests(unittest.TestCase):
    async def test_serves_hostname_and_status(self):
        agent = await start_daemon(self)
        self.assertEqual(await agent.get("/api/hostname", token=False), (200, socket.gethostname()))
        self.assertEqual(await agent.get("/api/status", token=False), (200, "OK"))
        self.assertIn("standalone", agent.output())
        # No TLS configured: the daemon runs without pyOpenSSL (orchagent.pyopenssl).
        self.assertFalse(loaded_cryptography(agent.pid))

    async def test_twistd_help_lists_the_plugin(self):
        env = dict(os.environ, PYTHONPATH=REPO_ROOT)
        out, err, code = await utils.getProcessOutputAndValue(
            TWISTD[0], [*TWISTD[1:], "--help"], env=env, path="/")
        self.assertEqual(code, 0, err)
        self.assertIn(b"orchestrator-agent", out)
        out, err, code = await utils.getProcessOutputAndValue(
            TWISTD[0], [*TWISTD[1:], "orchestrator-agent", "--help"], env=env, path="/")
        self.assertEqual(code, 0, err)
        self.assertIn(b"--config", out)
        self.assertIn(b"--port", out)

    async def refused(self, config=None, **options):
        agent = await start_daemon(self, config, wait=False, **options)
        code = await agent.wait_exit()
        self.assertNotEqual(code, 0)
        return agent.output()

    async def test_wrong_type_refuses_to_start(self):
        output = await self.refused({"ContinuousPollSeconds": "60"})
        self.assertIn("agent.conf.json: key ContinuousPollSeconds must be an integer", output)

    async def test_missing_config_file_refuses_to_start(self):
        missing = os.path.join(os.path.abspath(self.mktemp()), "absent.conf.json")
        output = await self.refused(config_path=missing)
        self.assertIn(f"{missing}: cannot read configuration", output)

    async def test_invalid_json_refuses_to_start(self):
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as fh:
            fh.write('{"HTTPPort": 3002,')
        output = await self.refused(config_path=path)
        self.assertIn(f"{path}: not valid JSON", output)

    async def test_bad_certificate_file_refuses_to_start(self):
        ca = TestCA(os.path.abspath(self.mktemp()))
        cert = ca.issue("agent", dns=["localhost"])
        output = await self.refused({"UseSSL": True, "SSLCertFile": cert.key_path,
                                     "SSLPrivateKeyFile": cert.key_path})
        self.assertIn(f"{cert.key_path} (key SSLCertFile): no PEM certificate", output)

    async def test_unknown_key_is_a_warning(self):
        agent = await start_daemon(self, {"SnapshotMountPiont": "/mnt/x"})
        self.assertIn("unknown configuration key 'SnapshotMountPiont' ignored", agent.output())
        status, _ = await agent.get("/api/hostname", token=False)
        self.assertEqual(status, 200)

    async def test_port_option_overrides_http_port(self):
        config_port = free_port()
        agent = await start_daemon(self, {"HTTPPort": config_port}, port_option=True)
        self.assertNotEqual(agent.port, config_port)
        status, _ = await agent.get("/api/hostname", token=False)
        self.assertEqual(status, 200)
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", config_port)
        with self.assertRaises(ConnectionRefusedError):
            await endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))

    def skip_if_etc_config(self):
        if os.path.exists(DEFAULT_SEARCH_PATH[0]):
            raise unittest.SkipTest(f"{DEFAULT_SEARCH_PATH[0]} exists on this machine")

    async def test_search_path_in_working_directory(self):
        self.skip_if_etc_config()
        agent = await start_daemon(self, {"AgentHostname": "from-search-path"}, config_file="search-path")
        self.assertEqual(await agent.get("/api/hostname", token=False), (200, "from-search-path"))

    async def test_config_option_overrides_search_path(self):
        self.skip_if_etc_config()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(directory, "orchestrator-agent.conf.json"), "w") as fh:
            json.dump({"AgentHostname": "from-search-path", "Datacenter": "dc-search"}, fh)
        agent = await start_daemon(self, {"AgentHostname": "from-option"}, directory=directory)
        self.assertEqual(await agent.get("/api/hostname", token=False), (200, "from-option"))
        self.assertEqual(await agent.get("/api/datacenter"), (200, ""))

    async def test_agent_hostname(self):
        agent = await start_daemon(self, {"AgentHostname": "db7.dc1.example"})
        self.assertEqual(await agent.get("/api/hostname", token=False), (200, "db7.dc1.example"))

    async def test_gzip_when_asked(self):
        # orchestrator sends Accept-Encoding: gzip and the Go agent answered gzip-encoded;
        # read raw here (treq would decode), on the status fast path and through the app.
        from twisted.web.client import Agent, HTTPConnectionPool, readBody
        from twisted.web.http_headers import Headers

        agent = await start_daemon(self)
        raw = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        for path in ["/api/status", "/api/hostname", f"/api/mysql-port?token={agent.token}",
                     "/api/mysql-port?token=wrong"]:
            url = (agent.base_url + path).encode()
            plain_response = await raw.request(b"GET", url)
            plain = await readBody(plain_response)
            self.assertIsNone(plain_response.headers.getRawHeaders(b"Content-Encoding"), path)
            response = await raw.request(b"GET", url, Headers({b"Accept-Encoding": [b"gzip"]}))
            body = await readBody(response)
            self.assertEqual(response.code, plain_response.code, path)
            self.assertEqual(response.headers.getRawHeaders(b"Content-Encoding"), [b"gzip"], path)
            self.assertEqual(json.loads(gzip.decompress(body)), json.loads(plain), path)


class AccessTests(unittest.TestCase):
    async def test_token_hint_file_and_token_kept_out_of_the_log(self):
        agent = await start_daemon(self, {"Datacenter": "dc1"})
        mode = os.stat(agent.config["TokenHintFile"]).st_mode
        self.assertEqual(stat.S_IMODE(mode), 0o600)
        self.assertEqual(len(agent.token), 64)
        self.assertEqual(await agent.get("/api/datacenter"), (200, "dc1"))
        self.assertEqual(await agent.get("/api/datacenter", token=False),
                         (500, {"Code": "ERROR", "Message": "Invalid token", "Details": None}))
        self.assertEqual((await agent.get("/api/datacenter", token="wrong" + agent.token[5:]))[0], 500)
        await wait_until(lambda: agent.output().count('"GET /api/datacenter') >= 3)
        output = agent.output()
        self.assertIn("/api/datacenter?token=*** HTTP/1.1\" 200", output)
        self.assertNotIn(agent.token, output)

    async def test_token_http_header(self):
        agent = await start_daemon(self, {"TokenHttpHeader": "X-Agent-Token", "Datacenter": "dc1"})
        self.assertEqual(await agent.get("/api/datacenter", token=False,
                                         headers={"X-Agent-Token": agent.token}), (200, "dc1"))
        status, body = await agent.get("/api/datacenter", token=False, headers={"X-Agent-Token": "nope"})
        self.assertEqual((status, body["Message"]), (500, "Invalid token"))
        status, body = await agent.get("/api/datacenter", token=False)
        self.assertEqual((status, body["Message"]), (500, "Invalid token"))

    async def test_basic_auth(self):
        agent = await start_daemon(self, {"HTTPAuthUser": "orc", "HTTPAuthPassword": "s3cret",
                                          "Datacenter": "dc1"})
        for path in ("/api/hostname", "/api/status", "/api/datacenter"):
            status, body = await agent.get(path)
            self.assertEqual((status, body["Message"]), (401, "Unauthorized"), path)
            status, _ = await agent.get(path, auth=("orc", "wrong"))
            self.assertEqual(status, 401, path)
        self.assertEqual(await agent.get("/api/datacenter", auth=("orc", "s3cret")), (200, "dc1"))
        self.assertEqual(await agent.get("/api/status", auth=("orc", "s3cret")), (200, "OK"))

    async def test_https_with_mutual_tls(self):
        ca = TestCA(os.path.abspath(self.mktemp()))
        server = ca.issue("agent", dns=["localhost"], ips=["127.0.0.1"])
        agent = await start_daemon(self, {
            "UseSSL": True, "UseMutualTLS": True, "SSLValidOUs": ["dba"], "Datacenter": "dc1",
            "SSLCertFile": server.cert_path, "SSLPrivateKeyFile": server.key_path,
            "SSLCAFile": ca.cert_path}, address="127.0.0.1",
            http_client=https_client(ca, ca.issue("orc", ou="dba", client=True)))
        self.assertTrue(agent.base_url.startswith("https://"))
        self.assertTrue(loaded_cryptography(agent.pid))
        self.assertEqual(await agent.get("/api/datacenter"), (200, "dc1"))
        anonymous = https_client(ca)
        response = await anonymous.get(agent.base_url + "/api/datacenter", params={"token": agent.token})
        self.assertEqual(response.code, 500)
        response = await anonymous.get(agent.base_url + "/api/status")
        self.assertEqual(response.code, 200)


class RegistrationTests(unittest.TestCase):
    def facts_config(self) -> dict:
        """Host facts from real files and commands, so GetAgent has real answers."""
        base = os.path.abspath(self.mktemp())
        datadir = os.path.join(base, "datadir")
        os.makedirs(os.path.join(datadir, "mysql"))
        with open(os.path.join(datadir, "ibdata1"), "wb") as fh:
            fh.write(b"\0" * 65536)
        error_log = os.path.join(base, "error.log")
        with open(error_log, "w") as fh:
            fh.writelines(f"line {i}\n" for i in range(30))
        options_file = os.path.join(base, "my.cnf")
        with open(options_file, "w") as fh:
            fh.write(f"[mysqld]\ndatadir={datadir}\nport=3307\nlog-error={error_log}\n")
        os.makedirs(os.path.join(base, "mnt"))
        os.makedirs(os.path.join(base, "snapshots"))
        return {
            "MySQLOptionsFile": options_file,
            "MySQLServiceStatusCommand": "true",
            "AvailableLocalSnapshotHostsCommand": "echo db2.dc1.example",
            "AvailableSnapshotHostsCommand": "printf 'db2.dc1.example\\ndb9.dc2.example\\n'",
            "SnapshotMountPoint": os.path.join(base, "mnt"),
            "SnapshotBackend": "copy",
            "SnapshotDirectory": os.path.join(base, "snapshots"),
        }

    async def test_registers_pings_and_answers_get_agent(self):
        orchestrator = StandInOrchestrator()
        url = await orchestrator.serve(self)
        config = {"AgentsServer": url, "ContinuousPollSeconds": 1, "AgentHostname": "localhost",
                  **self.facts_config()}
        agent = await start_daemon(self, config)
        await orchestrator.wait_for("agent-ping", 2)
        self.assertEqual(orchestrator.calls[:2], ["submit-agent", "agent-ping"])
        submission = orchestrator.submissions[0]
        self.assertEqual((submission.hostname, submission.port, submission.token),
                         ("localhost", agent.port, agent.token))
        self.assertEqual(await agent.get("/api/status", token=False), (200, "OK"))

        result = await orchestrator.get_agent()
        self.assertEqual([a.endpoint for a in result.answers],
                         ["available-snapshots-local", "available-snapshots", "lvs-snapshots",
                          "mount", "mysql-status", "mysql-port", "mysql-du",
                          "mysql-datadir-available-space", "mysql-error-log-tail"])
        result.assert_shapes()
        self.assertEqual(result["available-snapshots-local"].body, ["db2.dc1.example"])
        self.assertEqual(result["available-snapshots"].body, ["db2.dc1.example", "db9.dc2.example"])
        self.assertEqual(result["lvs-snapshots"].body, [])
        self.assertEqual(result["mount"].body["IsMounted"], False)
        self.assertEqual(result["mysql-status"].body, True)
        self.assertEqual(result["mysql-port"].body, 3307)
        self.assertGreaterEqual(result["mysql-du"].body, 65536)
        self.assertGreater(result["mysql-datadir-available-space"].body, 0)
        self.assertEqual(result["mysql-error-log-tail"].body, [f"line {i}" for i in range(10, 30)])
        output = agent.output()
        self.assertIn("registered with orchestrator at " + url, output)
        self.assertNotIn(agent.token, output)

    async def test_status_bad_while_orchestrator_is_unreachable(self):
        nobody = f"http://127.0.0.1:{free_port()}"
        agent = await start_daemon(self, {"AgentsServer": nobody, "StatusBadSeconds": 1,
                                          "ContinuousPollSeconds": 1, "HttpTimeoutSeconds": 1})
        await wait_until(lambda: _is_bad(agent))
        output = agent.output()
        self.assertEqual(output.count(f"orchestrator at {nobody} unreachable"), 1, output)


async def _is_bad(agent) -> bool:
    return await agent.get("/api/status", token=False) == (500, "BAD")

