"""Serving TLS: UseSSL, mutual TLS with OU checks, StatusOUVerify, bad certificate files.

The agent's service tree is built in-process by makeService and serves on real loopback
sockets; clients are real TLS clients with certificates from a throwaway CA.
"""

from __future__ import annotations

import json
import os

from twisted.internet import reactor
from twisted.trial import unittest
from twisted.web.client import ResponseNeverReceived

from orchagent.api.tls import server_tls_options
from orchagent.config import Config
from orchagent.errors import ConfigError
from orchagent.service import makeService
from orchagent.tap import Options
from tests.support.certs import TestCA, https_client
from tests.support.daemon import free_port


class ServedAgent:
    def __init__(self, root, port):
        self.root = root
        self.port = port
        self.token = root.agent.token.value

    async def get(self, client, path, token=True, host="localhost"):
        url = f"https://{host}:{self.port}{path}"
        params = {"token": self.token} if token else None
        response = await client.get(url, params=params)
        return response.code, json.loads(await response.content())


class TLSServerTests(unittest.TestCase):
    def setUp(self):
        self.dir = self.mktemp()
        self.ca = TestCA(os.path.join(self.dir, "ca"))
        self.server_cert = self.ca.issue("agent", dns=["localhost"], ips=["127.0.0.1"])
        self.dba = self.ca.issue("orchestrator-dba", ou="dba", client=True)
        self.web = self.ca.issue("orchestrator-web", ou="web", client=True)
        self.rogue_ca = TestCA(os.path.join(self.dir, "rogue"), name="rogue CA")
        self.rogue = self.rogue_ca.issue("rogue-dba", ou="dba", client=True)

    def serve(self, **settings) -> ServedAgent:
        port = free_port()
        config = {"HTTPPort": port, "HTTPBindAddress": "127.0.0.1", "UseSSL": True,
                  "SSLCertFile": self.server_cert.cert_path,
                  "SSLPrivateKeyFile": self.server_cert.key_path,
                  "SSLCAFile": self.ca.cert_path, "StateDir": os.path.join(self.dir, "state"),
                  "Datacenter": "dc1"}
        config.update(settings)
        path = os.path.join(self.dir, f"agent-{port}.json")
        with open(path, "w") as fh:
            json.dump(config, fh)
        options = Options()
        options.parseOptions(["--config", path])
        root = makeService(options, reactor)
        root.startService()
        self.addCleanup(root.stopService)
        return ServedAgent(root, port)

    async def test_use_ssl_serves_https(self):
        agent = self.serve()
        self.assertEqual(await agent.get(https_client(self.ca), "/api/hostname", token=False),
                         (200, agent.root.agent.hostname))
        self.assertEqual(await agent.get(https_client(self.ca), "/api/datacenter"), (200, "dc1"))

    async def test_use_ssl_refuses_plain_http(self):
        agent = self.serve()
        plain = https_client(None)
        with self.assertRaises(ResponseNeverReceived):
            await plain.get(f"http://127.0.0.1:{agent.port}/api/hostname")

    async def test_mutual_tls_accepts_a_valid_ou(self):
        agent = self.serve(UseMutualTLS=True, SSLValidOUs=["dba", "ops"])
        client = https_client(self.ca, self.dba)
        self.assertEqual(await agent.get(client, "/api/datacenter"), (200, "dc1"))
        status, _ = await agent.get(client, "/api/hostname", token=False)
        self.assertEqual(status, 200)

    async def test_mutual_tls_refuses_a_client_without_certificate(self):
        agent = self.serve(UseMutualTLS=True, SSLValidOUs=["dba"])
        status, body = await agent.get(https_client(self.ca), "/api/datacenter")
        self.assertEqual(status, 500)
        self.assertEqual(body, {"Code": "ERROR", "Message": "client certificate required (UseMutualTLS)",
                                "Details": None})
        status, body = await agent.get(https_client(self.ca), "/api/hostname", token=False)
        self.assertEqual(status, 500)

    async def test_mutual_tls_refuses_a_certificate_from_an_untrusted_ca(self):
        agent = self.serve(UseMutualTLS=True)
        with self.assertRaises(ResponseNeverReceived) as caught:
            await agent.get(https_client(self.ca, self.rogue), "/api/datacenter")
        self.assertIn("unknown ca", str(caught.exception.reasons[0].value))

    async def test_mutual_tls_refuses_a_wrong_ou(self):
        agent = self.serve(UseMutualTLS=True, SSLValidOUs=["dba"])
        status, body = await agent.get(https_client(self.ca, self.web), "/api/datacenter")
        self.assertEqual(status, 500)
        self.assertIn("Invalid OU", body["Message"])
        self.assertIn("'web'", body["Message"])

    async def test_mutual_tls_without_valid_ous_accepts_any_ca_signed_certificate(self):
        agent = self.serve(UseMutualTLS=True)
        self.assertEqual(await agent.get(https_client(self.ca, self.web), "/api/datacenter"), (200, "dc1"))
        status, _ = await agent.get(https_client(self.ca), "/api/datacenter")
        self.assertEqual(status, 500)

    async def test_status_endpoint_skips_the_ou_check_unless_status_ou_verify(self):
        agent = self.serve(UseMutualTLS=True, SSLValidOUs=["dba"])
        for client in (https_client(self.ca), https_client(self.ca, self.web)):
            self.assertEqual(await agent.get(client, "/api/status", token=False), (200, "OK"))

    async def test_status_ou_verify(self):
        agent = self.serve(UseMutualTLS=True, SSLValidOUs=["dba"], StatusOUVerify=True,
                           StatusEndpoint="/health")
        status, body = await agent.get(https_client(self.ca, self.web), "/health", token=False)
        self.assertEqual(status, 500)
        self.assertIn("Invalid OU", body["Message"])
        status, body = await agent.get(https_client(self.ca), "/health", token=False)
        self.assertEqual((status, body["Message"]), (500, "client certificate required (UseMutualTLS)"))
        self.assertEqual(await agent.get(https_client(self.ca, self.dba), "/health", token=False),
                         (200, "OK"))


class CertificateFileTests(unittest.TestCase):
    """A bad file is a ConfigError naming the file and the key, before anything listens."""

    def setUp(self):
        self.dir = self.mktemp()
        self.ca = TestCA(self.dir)
        self.cert = self.ca.issue("agent", dns=["localhost"])
        self.other = self.ca.issue("other", dns=["localhost"])

    def config(self, **settings):
        values = dict(use_ssl=True, ssl_cert_file=self.cert.cert_path,
                      ssl_private_key_file=self.cert.key_path)
        values.update(settings)
        return Config(**values)

    def assert_refused(self, config, *names):
        with self.assertRaises(ConfigError) as caught:
            server_tls_options(config)
        for name in names:
            self.assertIn(name, caught.exception.message)

    def test_good_files(self):
        options = server_tls_options(self.config(use_mutual_tls=True, ssl_ca_file=self.ca.cert_path))
        self.assertIsNotNone(options.getContext())

    def test_missing_certificate_file(self):
        missing = os.path.join(self.dir, "nope.pem")
        self.assert_refused(self.config(ssl_cert_file=missing), missing, "SSLCertFile", "No such file")

    def test_certificate_file_without_a_certificate(self):
        garbage = os.path.join(self.dir, "garbage.pem")
        with open(garbage, "w") as fh:
            fh.write("not a certificate\n")
        self.assert_refused(self.config(ssl_cert_file=garbage), garbage, "SSLCertFile")

    def test_key_file_holding_a_certificate(self):
        self.assert_refused(self.config(ssl_private_key_file=self.cert.cert_path),
                            self.cert.cert_path, "SSLPrivateKeyFile")

    def test_key_of_another_certificate(self):
        self.assert_refused(self.config(ssl_private_key_file=self.other.key_path),
                            self.other.key_path, self.cert.cert_path, "does not match")

    def test_missing_ca_file_under_mutual_tls(self):
        missing = os.path.join(self.dir, "ca-nope.pem")
        self.assert_refused(self.config(use_mutual_tls=True, ssl_ca_file=missing), missing, "SSLCAFile")

    def test_make_service_refuses_to_start(self):
        path = os.path.join(self.dir, "agent.json")
        with open(path, "w") as fh:
            json.dump({"UseSSL": True, "SSLCertFile": os.path.join(self.dir, "nope.pem"),
                       "SSLPrivateKeyFile": self.cert.key_path, "HTTPPort": free_port(),
                       "StateDir": os.path.join(self.dir, "state")}, fh)
        options = Options()
        options.parseOptions(["--config", path])
        with self.assertRaises(SystemExit) as caught:
            makeService(options, reactor)
        self.assertIn("nope.pem", str(caught.exception))
        self.assertIn("SSLCertFile", str(caught.exception))

