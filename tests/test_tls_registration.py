"""Registration over HTTPS to the stand-in orchestrator on real loopback sockets.

The important property: when orchestrator's certificate does not check out, the agent
never sends the request, so its token never reaches an impostor.
"""

from __future__ import annotations

import os

from twisted.internet import reactor, ssl, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from orchagent.config import Config
from orchagent.errors import ConfigError
from orchagent.registration.client import Registration
from orchagent.token import Token
from tests.support.certs import TestCA
from tests.support.orchestrator import StandInOrchestrator

TOKEN = "f" * 64


class HTTPSRegistrationTests(unittest.TestCase):
    def setUp(self):
        self.dir = self.mktemp()
        self.ca = TestCA(os.path.join(self.dir, "ca"))
        self.agent_cert = self.ca.issue("agent", ou="dba", client=True)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    async def serve_orchestrator(self, dns=("localhost",), ips=("127.0.0.1",), ca=None,
                                 require_client_ca=None, url_host="localhost"):
        """The stand-in over HTTPS with a certificate for ``dns``/``ips`` from ``ca``."""
        issued = (ca or self.ca).issue("orchestrator", dns=dns, ips=ips)
        with open(issued.cert_path, "rb") as c, open(issued.key_path, "rb") as k:
            server = ssl.PrivateCertificate.loadPEM(c.read() + k.read())
        options = {}
        if require_client_ca is not None:
            with open(require_client_ca.cert_path, "rb") as fh:
                options = dict(verify=True, requireCertificate=True,
                               caCerts=[ssl.Certificate.loadPEM(fh.read()).original])
        tls = ssl.CertificateOptions(privateKey=server.privateKey.original,
                                     certificate=server.original, **options)
        self.orchestrator = StandInOrchestrator()
        return await self.orchestrator.serve(self, tls_options=tls, url_host=url_host)

    async def register(self, url, **settings) -> Registration:
        values = dict(agents_server=url, http_port=3002, ssl_ca_file=self.ca.cert_path,
                      continuous_poll_seconds=60, http_timeout_seconds=5)
        values.update(settings)
        registration = Registration(Config(**values), reactor, "db1.example", Token(TOKEN))
        registration.startService()
        self.addCleanup(registration.stopService)
        for _ in range(500):
            if registration.state != "registering":
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        return registration

    def log_text(self) -> str:
        return "\n".join(formatEvent(e) for e in self.events)

    async def test_verified_host_name(self):
        registration = await self.register(await self.serve_orchestrator())
        self.assertEqual(registration.state, "registered")
        self.assertEqual(self.orchestrator.submissions[0].token, TOKEN)

    async def test_verified_ip_address(self):
        url = await self.serve_orchestrator(url_host="127.0.0.1")
        registration = await self.register(url)
        self.assertEqual(registration.state, "registered")

    async def test_refuses_a_certificate_for_another_host_name(self):
        url = await self.serve_orchestrator(dns=("orchestrator.elsewhere",), ips=())
        registration = await self.register(url)
        self.assertEqual(registration.state, "unreachable")
        self.assertEqual(self.orchestrator.calls, [])
        self.assertIn("VerificationError", self.log_text())
        self.assertNotIn(TOKEN, self.log_text())

    async def test_refuses_a_certificate_from_another_ca(self):
        other = TestCA(os.path.join(self.dir, "other"), name="other CA")
        registration = await self.register(await self.serve_orchestrator(ca=other))
        self.assertEqual(registration.state, "unreachable")
        self.assertEqual(self.orchestrator.calls, [])
        self.assertIn("certificate verify failed", self.log_text())

    async def test_platform_trust_when_no_ca_file(self):
        registration = await self.register(await self.serve_orchestrator(), ssl_ca_file="")
        self.assertEqual(registration.state, "unreachable")
        self.assertEqual(self.orchestrator.calls, [])

    async def test_skip_verify_accepts_any_certificate_and_warns(self):
        other = TestCA(os.path.join(self.dir, "other"), name="other CA")
        url = await self.serve_orchestrator(dns=("orchestrator.elsewhere",), ips=(), ca=other)
        registration = await self.register(url, ssl_skip_verify=True)
        self.assertEqual(registration.state, "registered")
        warnings = [formatEvent(e) for e in self.events
                    if e.get("log_namespace") == "orchagent.registration.client"
                    and e["log_level"].name == "warn"]
        self.assertEqual(len(warnings), 1)
        self.assertIn("SSLSkipVerify", warnings[0])

    async def test_client_certificate_under_mutual_tls(self):
        url = await self.serve_orchestrator(require_client_ca=self.ca)
        registration = await self.register(
            url, use_mutual_tls=True, ssl_cert_file=self.agent_cert.cert_path,
            ssl_private_key_file=self.agent_cert.key_path)
        self.assertEqual(registration.state, "registered")

    async def test_no_client_certificate_without_mutual_tls(self):
        url = await self.serve_orchestrator(require_client_ca=self.ca)
        registration = await self.register(url)
        self.assertEqual(registration.state, "unreachable")
        self.assertEqual(self.orchestrator.calls, [])


class ClientFileTests(unittest.TestCase):
    """orchestrator-side TLS files are read when the agent is built: a bad one stops the start."""

    def test_missing_ca_file(self):
        missing = os.path.abspath(os.path.join(self.mktemp(), "ca.pem"))
        with self.assertRaises(ConfigError) as caught:
            Registration(Config(agents_server="https://orch:3001", ssl_ca_file=missing),
                         reactor, "db1", Token(TOKEN))
        self.assertIn(f"{missing} (key SSLCAFile): cannot read", caught.exception.message)

    def test_client_key_of_another_certificate(self):
        ca = TestCA(self.mktemp())
        mine, other = ca.issue("agent", client=True), ca.issue("other", client=True)
        with self.assertRaises(ConfigError) as caught:
            Registration(Config(agents_server="https://orch:3001", use_mutual_tls=True,
                                ssl_ca_file=ca.cert_path, ssl_cert_file=mine.cert_path,
                                ssl_private_key_file=other.key_path),
                         reactor, "db1", Token(TOKEN))
        self.assertIn("does not match", caught.exception.message)

    def test_standalone_reads_no_files(self):
        registration = Registration(Config(ssl_ca_file="/nonexistent/ca.pem"), reactor, "db1", Token(TOKEN))
        self.assertEqual(registration.state, "standalone")
