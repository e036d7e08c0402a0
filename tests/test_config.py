"""The configuration loader: the original's format, defaults, search order and errors."""

from __future__ import annotations

import json
import os

from twisted.trial import unittest

from orchagent import config, pyopenssl
from orchagent.errors import ConfigError


class LoadTests(unittest.TestCase):
    def write(self, doc, name="agent.conf.json"):
        path = os.path.join(self.mktemp())
        os.makedirs(path)
        path = os.path.join(path, name)
        with open(path, "w") as fh:
            fh.write(doc if isinstance(doc, str) else json.dumps(doc))
        return path

    def test_defaults_are_the_original_agents(self):
        c = config.load(search_path=[])
        self.assertEqual(c.http_port, 3002)
        self.assertEqual(c.continuous_poll_seconds, 60)
        self.assertEqual(c.resubmit_agent_interval_minutes, 60)
        self.assertEqual(c.status_endpoint, "/api/status")
        self.assertEqual(c.status_bad_seconds, 300)
        self.assertEqual(c.http_timeout_seconds, 10)
        self.assertEqual(c.mysql_client_command, "mysql")
        self.assertEqual(c.custom_commands, {})
        self.assertEqual(c.ssl_valid_ous, [])
        self.assertEqual(c.seed_transfer_port, 21234)
        self.assertEqual(c.source_files, ())

    def test_every_original_key_is_known(self):
        original = """SnapshotMountPoint ContinuousPollSeconds ResubmitAgentIntervalMinutes
        CreateSnapshotCommand AvailableLocalSnapshotHostsCommand AvailableSnapshotHostsCommand
        SnapshotVolumesFilter MySQLDatadirCommand MySQLPortCommand
        MySQLDeleteDatadirContentCommand MySQLServiceStopCommand MySQLServiceStartCommand
        MySQLServiceStatusCommand ReceiveSeedDataCommand SendSeedDataCommand PostCopyCommand
        MySQLClientCommand AgentsServer AgentsServerPort HTTPPort HTTPAuthUser
        HTTPAuthPassword UseSSL UseMutualTLS SSLSkipVerify SSLPrivateKeyFile SSLCertFile
        SSLCAFile SSLValidOUs StatusEndpoint StatusOUVerify StatusBadSeconds
        HttpTimeoutSeconds ExecWithSudo CustomCommands TokenHintFile TokenHttpHeader""".split()
        known = {f.key for f in config.FIELDS if not f.ours}
        self.assertEqual(set(original), known)

    def test_file_values_and_unknown_key_warning(self):
        path = self.write({"HTTPPort": 4000, "CustomCommands": {"a": "echo a"},
                           "SSLValidOUs": ["dba"], "NoSuchKey": 1})
        warnings = []
        c = config.load(path, warn=warnings.append)
        self.assertEqual(c.http_port, 4000)
        self.assertEqual(c.custom_commands, {"a": "echo a"})
        self.assertEqual(c.ssl_valid_ous, ["dba"])
        self.assertEqual(c.source_files, (path,))
        self.assertEqual(len(warnings), 1)
        self.assertIn("NoSuchKey", warnings[0])
        self.assertIn(path, warnings[0])

    def test_wrong_type_names_file_and_key(self):
        for doc, key in [({"HTTPPort": "3002"}, "HTTPPort"), ({"UseSSL": 1}, "UseSSL"),
                         ({"SSLValidOUs": "dba"}, "SSLValidOUs"),
                         ({"CustomCommands": {"a": 1}}, "CustomCommands"),
                         ({"ContinuousPollSeconds": -1}, "ContinuousPollSeconds"),
                         ({"SnapshotBackend": "zfs"}, "SnapshotBackend")]:
            path = self.write(doc)
            e = self.assertRaises(ConfigError, config.load, path)
            self.assertIn(path, e.message)
            self.assertIn(key, e.message)

    def test_unreadable_and_malformed_files(self):
        missing = os.path.join(self.mktemp(), "nope.json")
        e = self.assertRaises(ConfigError, config.load, missing)
        self.assertIn(missing, e.message)
        bad = self.write("{not json")
        e = self.assertRaises(ConfigError, config.load, bad)
        self.assertIn(bad, e.message)
        array = self.write("[1, 2]")
        self.assertRaises(ConfigError, config.load, array)

    def test_search_path_reads_all_in_order_later_wins(self):
        first = self.write({"HTTPPort": 4001, "Datacenter": "dc1"})
        second = self.write({"HTTPPort": 4002})
        c = config.load(search_path=[first, "/nonexistent/x.json", second])
        self.assertEqual(c.http_port, 4002)
        self.assertEqual(c.datacenter, "dc1")
        self.assertEqual(c.source_files, (first, second))

    def test_explicit_path_ignores_search_path_and_overrides_win(self):
        searched = self.write({"HTTPPort": 4001})
        chosen = self.write({"HTTPPort": 4002, "Datacenter": "x"})
        c = config.load(chosen, search_path=[searched], overrides={"http_port": 4003})
        self.assertEqual(c.http_port, 4003)
        self.assertEqual(c.source_files, (chosen,))

    def test_ssl_needs_certificate(self):
        path = self.write({"UseSSL": True})
        e = self.assertRaises(ConfigError, config.load, path)
        self.assertIn("SSLCertFile", e.message)

    def test_agents_server_url(self):
        c = config.Config(agents_server="http://orch:", agents_server_port="3001")
        self.assertEqual(config.agents_server_url(c), "http://orch:3001")
        c = config.Config(agents_server="http://orch:3001/", agents_server_port="")
        self.assertEqual(config.agents_server_url(c), "http://orch:3001")

    def test_which_configurations_need_pyopenssl(self):
        """Only a daemon with some TLS to do loads pyOpenSSL (orchagent.pyopenssl)."""
        self.assertFalse(pyopenssl.needed_by_daemon(config.Config()))
        self.assertFalse(pyopenssl.needed_by_daemon(
            config.Config(agents_server="http://orch", agents_server_port=":3001")))
        for values in ({"use_ssl": True}, {"use_mutual_tls": True},
                       {"agents_server": "HTTPS://orch", "agents_server_port": ":3001"},
                       {"seed_tls_ca_file": "/etc/orchagent/seed-ca.pem"}):
            self.assertTrue(pyopenssl.needed_by_daemon(config.Config(**values)), values)
