"""The controller's settings (addresses, tokens), its state files, its rendering, and the
real thing: ``orchagent status`` against a real agent process over HTTP and mutual TLS."""

from __future__ import annotations

import io
import json
import os

from twisted.trial import unittest

from orchagent.cli import render
from orchagent.cli.main import EXIT_FAILED, EXIT_OK, parse_size, run
from orchagent.cli.settings import SettingsError, load_settings
from orchagent.cli.state import SeedRecord, SeedStore
from tests.support.daemon import start_daemon


def write(path, text, mode=0o600):
    with open(path, "w") as fh:
        fh.write(text)
    os.chmod(path, mode)
    return path


class SettingsTests(unittest.TestCase):
    def setUp(self):
        self.home = os.path.abspath(self.mktemp())
        os.makedirs(self.home)
        self.token = write(os.path.join(self.home, "token"), "fleet-token\n")
        self.env = {"ORCHAGENT_HOME": self.home}

    def config(self, doc):
        write(os.path.join(self.home, "config.json"), json.dumps(doc))
        return load_settings(self.env)

    def test_host_forms(self):
        settings = load_settings(dict(self.env, ORCHAGENT_TOKEN_FILE=self.token))
        cases = {
            "db2": "http://db2:3002",
            "db2.example:4000": "http://db2.example:4000",
            "10.0.0.5": "http://10.0.0.5:3002",
            "[fd00::5]:3003": "http://[fd00::5]:3003",
            "https://db2.example": "https://db2.example:3002",
            "http://db2:81/": "http://db2:81",
        }
        for host, url in cases.items():
            address = settings.resolve(host)
            self.assertEqual(address.url, url, host)
            self.assertEqual(address.token, "fleet-token")
        self.assertEqual(settings.resolve("[fd00::5]:3003").host, "fd00::5")
        for bad in ("db2:port", "ftp://db2", "http://db2/api", "user@db2", ""):
            self.assertRaises(SettingsError, settings.resolve, bad)

    def test_config_file_and_precedence(self):
        other = write(os.path.join(self.home, "db9.token"), "db9-token")
        settings = self.config({
            "Port": 4000, "TokenFile": self.token, "UseSSL": True, "SSLCAFile": "/ca.pem",
            "Hosts": {"db9": {"URL": "https://10.1.1.9:3443", "TokenFile": other},
                      "db8": {"UseSSL": False}}})
        self.assertEqual((settings.resolve("db1").url, settings.resolve("db1").token),
                         ("https://db1:4000", "fleet-token"))
        self.assertEqual(settings.resolve("db1").ca_file, "/ca.pem")
        db9 = settings.resolve("db9")
        self.assertEqual((db9.url, db9.token, db9.host), ("https://10.1.1.9:3443", "db9-token", "10.1.1.9"))
        self.assertEqual(settings.resolve("db8").url, "http://db8:4000")
        # The command line (or environment) wins over every file setting.
        forced = load_settings(self.env, token_file=other)
        self.assertEqual(forced.resolve("db1").token, "db9-token")
        env = load_settings(dict(self.env, ORCHAGENT_TOKEN_FILE=other))
        self.assertEqual(env.resolve("db1").token, "db9-token")

    def test_basic_auth_from_a_password_file(self):
        password = write(os.path.join(self.home, "pw"), "s3cret\n")
        settings = self.config({"TokenFile": self.token, "HTTPAuthUser": "orc",
                                "HTTPAuthPasswordFile": password})
        address = settings.resolve("db1")
        self.assertEqual(address.auth, ("orc", "s3cret"))
        self.assertNotIn("s3cret", repr(address))
        self.assertNotIn("fleet-token", repr(address))

    def test_mistakes_are_named(self):
        for doc, text in (({"Prot": 1}, "unknown key 'Prot'"),
                          ({"Port": "3002"}, "key Port must be an integer"),
                          ({"Hosts": {"db1": {"URL": 5}}}, "Hosts.db1: key URL must be a str"),
                          ([], "must be a JSON object")):
            error = self.assertRaises(SettingsError, self.config, doc)
            self.assertIn(text, str(error))
        write(os.path.join(self.home, "config.json"), "{not json")
        self.assertIn("not valid JSON", str(self.assertRaises(SettingsError, load_settings, self.env)))
        self.assertIn("cannot read", str(self.assertRaises(
            SettingsError, load_settings, self.env, config_path="/nonexistent/x.json")))

    def test_token_problems(self):
        settings = load_settings(self.env)
        self.assertIn("no token for host db1", str(self.assertRaises(SettingsError, settings.resolve, "db1")))
        empty = write(os.path.join(self.home, "empty"), "\n")
        settings = load_settings(self.env, token_file=empty)
        self.assertIn("must hold one word", str(self.assertRaises(SettingsError, settings.resolve, "db1")))
        settings = load_settings(self.env, token_file="/nonexistent")
        self.assertIn("cannot read", str(self.assertRaises(SettingsError, settings.resolve, "db1")))

    def test_sizes(self):
        self.assertEqual([parse_size(s) for s in ("0", "1024", "512K", "50M", "1.5G", "2GiB")],
                         [0, 1024, 512 << 10, 50 << 20, 3 << 29, 2 << 30])


class StateTests(unittest.TestCase):
    def test_records_are_private_and_round_trip(self):
        directory = os.path.join(os.path.abspath(self.mktemp()), "seeds")
        store = SeedStore(directory)
        record = SeedRecord(seed_id="s1", key="k" * 43, target="db2", source="db1",
                            target_host="db2", source_hostname="db1.example", snapshot="/s/x",
                            phase="copying", rate_limit=5)
        store.save(record)
        self.assertEqual(os.stat(directory).st_mode & 0o777, 0o700)
        self.assertEqual(os.stat(os.path.join(directory, "s1.json")).st_mode & 0o777, 0o600)
        self.assertEqual(store.load("s1"), record)
        self.assertNotIn("k" * 43, repr(record))
        self.assertEqual([r.seed_id for r in store.all()], ["s1"])
        store.remove("s1")
        self.assertEqual(store.all(), [])
        self.assertRaises(SettingsError, store.load, "../etc/passwd")


class RenderTests(unittest.TestCase):
    def test_units(self):
        self.assertEqual([render.format_bytes(n) for n in (None, 0, 1023, 1536, 5 << 30)],
                         ["?", "0 B", "1023 B", "1.5 KiB", "5.0 GiB"])
        self.assertEqual([render.format_duration(s) for s in (None, -1, 5, 65, 3725)],
                         ["?", "?", "0:05", "1:05", "1:02:05"])

    def test_progress_line(self):
        line = render.progress_line({"State": "running", "BytesDone": 512 << 20, "BytesTotal": 1 << 30,
                                     "FilesDone": 3, "FilesTotal": 9, "RateBytesPerSec": 64 << 20,
                                     "EtaSeconds": 8, "Resumes": 1}, width=10)
        self.assertEqual(line, "[#####.....]   50.0%  512.0 MiB / 1.0 GiB  files 3/9  64.0 MiB/s"
                               "  ETA 0:08  resumed 1x")
        self.assertIn("    ?%", render.progress_line({"State": "pending"}))

    def test_live_progress_redraws_one_line(self):
        out = io.StringIO()
        reporter = render.Reporter(out, io.StringIO(), live=True)
        reporter.progress({"State": "running", "BytesDone": 1, "BytesTotal": 2})
        reporter.progress({"State": "running", "BytesDone": 2, "BytesTotal": 2})
        reporter.step("done")
        self.assertEqual(out.getvalue().count("\r\x1b[K"), 2)
        self.assertTrue(out.getvalue().endswith("\ndone\n"))

    def test_table(self):
        self.assertEqual(render.table(("A", "BB"), [("x", 1), ("long", None)]),
                         "A     BB\n----  --\nx     1\nlong")


class RealAgentTests(unittest.TestCase):
    """The controller's real HTTP client against a real agent process on loopback."""

    def setUp(self):
        self.home = os.path.abspath(self.mktemp())
        os.makedirs(self.home)
        self.token_file = write(os.path.join(self.home, "token"), "fleet-token-1\n")

    async def cli(self, *argv, env=None):
        out, err = io.StringIO(), io.StringIO()
        from twisted.internet import reactor

        code = await run(list(argv), reactor, dict({"ORCHAGENT_HOME": self.home}, **(env or {})), out, err)
        return code, out.getvalue(), err.getvalue()

    async def test_status_over_http_with_the_shared_token(self):
        agent = await start_daemon(self, {"TokenFile": self.token_file, "HTTPBindAddress": "127.0.0.1",
                                          "AgentHostname": "db1.test", "Datacenter": "dc7",
                                          "HTTPAuthUser": "orc", "HTTPAuthPassword": "pw"})
        write(os.path.join(self.home, "pw"), "pw")
        write(os.path.join(self.home, "config.json"), json.dumps({
            "TokenFile": self.token_file, "HTTPAuthUser": "orc",
            "HTTPAuthPasswordFile": os.path.join(self.home, "pw")}))
        code, out, err = await self.cli("status", f"127.0.0.1:{agent.port}", "--json")
        self.assertEqual(code, EXIT_OK, err)
        facts = json.loads(out)
        self.assertEqual((facts["Hostname"], facts["Datacenter"]), ("db1.test", "dc7"))
        self.assertIsInstance(facts["MySQLRunning"], bool)
        # Another token: refused by the agent, and said so.
        other = write(os.path.join(self.home, "other"), "not-it")
        code, _, err = await self.cli("snapshots", f"127.0.0.1:{agent.port}", "--token-file", other)
        self.assertEqual(code, EXIT_FAILED)
        self.assertIn("Invalid token", err)

    async def test_status_over_mutual_tls(self):
        from tests.support.certs import TestCA

        ca = TestCA(os.path.join(self.home, "ca"))
        server = ca.issue("agent", dns=["localhost"], ips=["127.0.0.1"])
        operator = ca.issue("operator", ou="dba", client=True)
        agent = await start_daemon(self, {
            "TokenFile": self.token_file, "HTTPBindAddress": "127.0.0.1", "AgentHostname": "db1.tls",
            "UseSSL": True, "UseMutualTLS": True, "SSLValidOUs": ["dba"],
            "SSLCertFile": server.cert_path, "SSLPrivateKeyFile": server.key_path,
            "SSLCAFile": ca.cert_path}, http_client=_never_used())
        config = {"TokenFile": self.token_file, "UseSSL": True, "SSLCAFile": ca.cert_path,
                  "SSLCertFile": operator.cert_path, "SSLPrivateKeyFile": operator.key_path}
        write(os.path.join(self.home, "config.json"), json.dumps(config))
        code, out, err = await self.cli("status", f"localhost:{agent.port}", "--json")
        self.assertEqual(code, EXIT_OK, err)
        self.assertEqual(json.loads(out)["Hostname"], "db1.tls")
        # Without our certificate the agent's mutual TLS turns us away.
        del config["SSLCertFile"], config["SSLPrivateKeyFile"]
        write(os.path.join(self.home, "config.json"), json.dumps(config))
        code, _, err = await self.cli("status", f"localhost:{agent.port}")
        self.assertEqual(code, EXIT_FAILED)
        # A CA that did not sign the agent's certificate: no connection at all.
        stranger = TestCA(os.path.join(self.home, "stranger"))
        config.update(SSLCAFile=stranger.cert_path, SSLCertFile=operator.cert_path,
                      SSLPrivateKeyFile=operator.key_path)
        write(os.path.join(self.home, "config.json"), json.dumps(config))
        code, _, err = await self.cli("status", f"localhost:{agent.port}")
        self.assertEqual(code, EXIT_FAILED)
        self.assertIn("cannot reach the agent", err)


def _never_used():
    """start_daemon needs no HTTP client of its own here (it only waits for the port)."""
    return object()
