"""How a hot backup's tool is started: its option files, and the server's socket and port
when the tool's own groups name none (a [client] without the socket)."""

from __future__ import annotations

import os
import shutil
import subprocess

from twisted.trial import unittest

from orchagent.backups.tools import Tools
from orchagent.config import Config
from tests.support import mariadb as mariadb_support
from tests.support.mariadb import MariaDB


class ConnectionArgsTests(unittest.TestCase):
    def argv(self, text: str, tool: str = "mariabackup") -> list[str]:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as fh:
            fh.write(text)
        argv = Tools(Config(mysql_options_file=path), runner=None).backup_argv(tool)
        self.assertEqual(argv[:2], [tool, f"--defaults-file={path}"])
        self.assertEqual(argv[-1], "--backup")
        return argv[2:-1]

    def test_server_socket_and_port_when_the_client_names_none(self):
        text = "[client]\nuser=root\n[mysqld]\nsocket=/srv/db/mysqld.sock\nport=3307\n"
        self.assertEqual(self.argv(text), ["--socket=/srv/db/mysqld.sock", "--port=3307"])
        self.assertEqual(self.argv(text, "xtrabackup"),
                         ["--socket=/srv/db/mysqld.sock", "--port=3307"])

    def test_each_only_when_the_tools_groups_name_none(self):
        server = "[mysqld]\nsocket=/srv/db/mysqld.sock\nport=3307\n"
        self.assertEqual(self.argv("[client]\nsocket=/run/other.sock\n" + server), ["--port=3307"])
        self.assertEqual(self.argv("[mariabackup]\nport=3308\n" + server),
                         ["--socket=/srv/db/mysqld.sock"])
        self.assertEqual(self.argv("[mariadb-backup]\nsocket=/a.sock\nport=1\n" + server), [])
        self.assertEqual(self.argv("[xtrabackup]\nsocket=/a.sock\nport=1\n" + server), [])
        self.assertEqual(self.argv("[client-server]\nsocket=/a.sock\nport=1\n" + server), [])
        # [mariabackup] is mariabackup's, not xtrabackup's.
        self.assertEqual(self.argv("[mariabackup]\nsocket=/a.sock\n" + server, "xtrabackup"),
                         ["--socket=/srv/db/mysqld.sock", "--port=3307"])

    def test_slave_info_for_a_replica_only(self):
        """--slave-info only when asked (a replica's backup): it needs the right to read
        SHOW SLAVE STATUS, which a primary's backup user need not have."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as fh:
            fh.write("[client]\nsocket=/a.sock\n")
        tools = Tools(Config(mysql_options_file=path), runner=None)
        for tool in ("mariabackup", "xtrabackup"):
            self.assertEqual(tools.backup_argv(tool, slave_info=True),
                             [tool, f"--defaults-file={path}", "--backup", "--slave-info"])
            self.assertNotIn("--slave-info", tools.backup_argv(tool))
            self.assertNotIn("--safe-slave-backup", tools.backup_argv(tool, slave_info=True))

    def test_other_server_groups(self):
        self.assertEqual(self.argv("[mariadb]\nsocket=/m.sock\n[server]\nport=3310\n"),
                         ["--socket=/m.sock", "--port=3310"])

    def test_nothing_when_the_server_names_nothing(self):
        self.assertEqual(self.argv("[client]\nuser=root\n[mysqld]\ndatadir=/var/lib/mysql\n"), [])
        # A file the server would refuse: the tool says so itself.
        self.assertEqual(self.argv("socket=/x.sock\n[mysqld]\nsocket=/s.sock\n"), [])


class RealServerTests(unittest.TestCase):
    """mariabackup against a real server whose [client] lacks the socket."""

    def setUp(self):
        reason = mariadb_support.unavailable_reason()
        if reason is None and shutil.which("mariabackup") is None:
            reason = "mariabackup is not installed (apt-get install mariadb-backup)"
        if reason:
            raise unittest.SkipTest(reason)
        self.db = MariaDB.create(self, client_socket=False)

    def backup(self, argv: list[str]) -> subprocess.CompletedProcess:
        target = os.path.abspath(self.mktemp())
        return subprocess.run([*argv, f"--target-dir={target}"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=300)

    def test_hot_backup_finds_the_servers_socket(self):
        without = self.backup(["mariabackup", f"--defaults-file={self.db.option_file}", "--backup"])
        self.assertNotEqual(without.returncode, 0)
        self.assertIn(b"Can't connect to local server through socket", without.stdout)
        tools = Tools(Config(**self.db.agent_settings()), runner=None)
        result = self.backup(tools.backup_argv("mariabackup"))
        self.assertEqual(result.returncode, 0, result.stdout.decode(errors="replace")[-3000:])
