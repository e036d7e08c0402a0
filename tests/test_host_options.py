"""The option-file reader, checked against the server's own reader (``my_print_defaults``)."""

from __future__ import annotations

import os
import shutil
import subprocess

from twisted.trial import unittest

from orchagent.host.mysql_options import (
    OptionFileError, load_server_options, read_options, server_groups,
)

GROUPS = server_groups("10.11")


def write(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
    return path


class OptionFileTests(unittest.TestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def file(self, name: str, text: str) -> str:
        return write(os.path.join(self.dir, name), text)

    def pairs(self, path: str, groups=GROUPS):
        return [(o.name, o.value) for o in read_options([path], groups)]

    def assert_like_server(self, path: str) -> None:
        """Our reading of ``path`` equals my_print_defaults' for the server groups."""
        tool = shutil.which("my_print_defaults")
        if tool is None:
            raise unittest.SkipTest("my_print_defaults is not installed")
        out = subprocess.run([tool, f"--defaults-file={path}", *GROUPS], check=True,
                             stdout=subprocess.PIPE, cwd="/").stdout.decode()
        expected = []
        for line in out.splitlines():
            name, eq, value = line[2:].partition("=")
            expected.append((name, value if eq else None))
        self.assertEqual(self.pairs(path), expected)

    def test_groups_quotes_comments_and_escapes(self):
        path = self.file("my.cnf", """# comment
; another comment
[client]
port=1
[mysqld]
port = 3307 # trailing comment
datadir="/var/lib/my sql" # quoted
log-error = '/x/#y.log'
skip-name-resolve
innodb_x = a\\tb\\sc\\\\d\\qe
hashed=ab#cd
foo = "a b" c
q1 = 'a'b'
[ mysqld ]
port=2
[MYSQLD ]
port=3308
[mariadb-10.11]
port=3309
[mariadb-10.12]
port=1
[embedded]
port=1
[server]
relay-log=r1
""")
        self.assertEqual(self.pairs(path), [
            ("port", "3307"), ("datadir", "/var/lib/my sql"), ("log-error", "/x/#y.log"),
            ("skip-name-resolve", None), ("innodb_x", "a\tb c\\d\\qe"), ("hashed", "ab"),
            ("foo", '"a b" c'), ("q1", "a'b"), ("port", "3308"), ("port", "3309"),
            ("relay-log", "r1"),
        ])
        self.assert_like_server(path)

    def test_include_and_includedir(self):
        inc = os.path.join(self.dir, "conf.d")
        write(os.path.join(inc, "20-b.cnf"), "[mysqld]\nport=4000\n")
        write(os.path.join(inc, "10-a.cnf"), "[mysqld]\nport=3999\ndatadir=/data/a\n")
        write(os.path.join(inc, "30-c.conf"), "[mysqld]\nport=9999\n")
        other = self.file("other.cnf", "[mariadb]\nlog_error=/var/log/e.log\n")
        path = self.file("my.cnf", f"""[mysqld]
port=3306
!include {os.path.join(self.dir, 'missing.cnf')}
!include {other}
!includedir {inc}
[mysqld]
datadir=/data/b
""")
        options = load_server_options(path, "10.11")
        self.assertEqual(options.value("port"), "4000")
        self.assertEqual(options.value("datadir"), "/data/b")
        self.assertEqual(options.value("log-error"), "/var/log/e.log")
        self.assertEqual(options.get("port").where, os.path.join(inc, "20-b.cnf") + ":2")
        self.assert_like_server(path)

    def test_relative_include_resolves_from_root_like_the_server(self):
        self.file("b.cnf", "[mysqld]\nport=7\n")
        path = self.file("my.cnf", "[mysqld]\nport=6\n!include b.cnf\n")
        self.assertEqual(load_server_options(path).value("port"), "6")
        self.assert_like_server(path)

    def test_missing_includedir_is_fatal_like_the_server(self):
        path = self.file("my.cnf", f"[mysqld]\n!includedir {self.dir}/nowhere\n")
        e = self.assertRaises(OptionFileError, load_server_options, path)
        self.assertIn(f"{self.dir}/nowhere", e.message)

    def test_option_before_any_group_is_fatal(self):
        path = self.file("my.cnf", "port=1\n[mysqld]\nport=2\n")
        e = self.assertRaises(OptionFileError, load_server_options, path)
        self.assertIn("my.cnf:1", e.message)

    def test_include_loop_is_refused(self):
        a = os.path.join(self.dir, "a.cnf")
        self.file("a.cnf", f"[mysqld]\n!include {a}\n")
        self.assertRaises(OptionFileError, load_server_options, a)

    def test_configured_file_must_exist(self):
        e = self.assertRaises(OptionFileError, load_server_options, os.path.join(self.dir, "none.cnf"))
        self.assertIn("none.cnf does not exist", e.message)

    def test_names_prefixes_and_overrides(self):
        path = self.file("my.cnf", """[mysqld]
log-bin=first
log_error=/a.err
[server]
log_bin=second
loose-relay-log=relay
skip-log-error
enable-general-log
""")
        options = load_server_options(path)
        self.assertEqual(options.value("log-bin"), "second")
        self.assertEqual(options.value("relay_log"), "relay")
        self.assertNotIn("log_error", options)
        self.assertIsNone(options.get("log-error"))
        self.assertIn("general-log", options)
        self.assertIsNone(options.value("general_log", "unset"))

    def test_version_groups_only_with_a_known_version(self):
        path = self.file("my.cnf", "[mysqld]\nport=1\n[mysqld-10.11]\nport=2\n")
        self.assertEqual(load_server_options(path).value("port"), "1")
        self.assertEqual(load_server_options(path, "10.11").value("port"), "2")

    def test_default_files_are_the_servers(self):
        """Without MySQLOptionsFile, /etc/mysql/my.cnf (Debian's, with its includes)."""
        if not os.path.exists("/etc/mysql/my.cnf"):
            raise unittest.SkipTest("no /etc/mysql/my.cnf on this host")
        options = load_server_options("", "10.11")
        self.assertEqual(options.files[0], "/etc/mysql/my.cnf")
        self.assert_like_server("/etc/mysql/my.cnf")
