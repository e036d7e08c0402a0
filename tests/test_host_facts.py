"""MySQL host facts and datadir chores against real MariaDB servers.

What the agent derives from the option files is compared with what the running server
reports about itself (``@@datadir``, ``@@log_error``, ...), for the harness's settings
and for configurations that leave names to the server's defaults.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import subprocess

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from orchagent.config import Config
from orchagent.errors import NotAvailable, Refused
from orchagent.host.facts import MySQLHost
from orchagent.host.mysql_options import ServerOptions
from orchagent.host.service import MySQLService
from orchagent.process import ProcessRunner
from tests import seed_support as S
from tests.support.fakes import FakeRunner
from tests.support.mariadb import MariaDB


def make_host(db: MariaDB | None = None, **config) -> MySQLHost:
    settings = db.agent_settings() if db is not None else {}
    settings.update(config)
    config = Config(**settings)
    runner = ProcessRunner(reactor)
    return MySQLHost(config, runner, reactor, MySQLService(config, runner))


def server_variable(db: MariaDB, name: str) -> str:
    return db.sql(f"SELECT @@{name}")[0][0]


class FactsTests(unittest.TestCase):
    def setUp(self):
        self.db = MariaDB.create(self)
        self.host = make_host(self.db)

    async def test_facts_match_the_running_server(self):
        self.assertEqual(await self.host.datadir(), server_variable(self.db, "datadir").rstrip("/"))
        self.assertEqual(await self.host.port(), int(server_variable(self.db, "port")))
        self.assertEqual(await self.host.port(), self.db.port)
        self.assertEqual(await self.host.error_log_path(), server_variable(self.db, "log_error"))
        self.assertEqual(await self.host.pid_file_path(), server_variable(self.db, "pid_file"))
        self.assertEqual(await self.host.binlog_index_path(), server_variable(self.db, "log_bin_index"))
        self.assertEqual(await self.host.server_version(),
                         ".".join(server_variable(self.db, "version").split(".")[:2]))

    async def test_error_log_tail_of_the_real_log(self):
        # The server goes on logging for a while after it is ready (the buffer pool load,
        # late on a loaded machine): compare once its log is still.
        await self._log_settled()
        tail = await self.host.error_log_tail()
        expected = subprocess.run(["tail", "-n", "20", self.db.error_log], check=True,
                                  stdout=subprocess.PIPE).stdout.decode().splitlines()
        self.assertEqual(len(tail), 20)
        self.assertEqual(tail, expected)
        self.assertTrue(any("ready for connections" in line for line in tail), tail)

    async def _log_settled(self, still: float = 1.0, limit: float = 30.0) -> None:
        """Wait until the error log has not grown for ``still`` seconds."""
        size, since = -1, reactor.seconds()
        deadline = since + limit
        while reactor.seconds() < deadline:
            now = os.stat(self.db.error_log).st_size
            if now != size:
                size, since = now, reactor.seconds()
            elif reactor.seconds() - since >= still:
                return
            await task.deferLater(reactor, 0.1, lambda: None)

    async def test_disk_usage_and_space_of_the_datadir(self):
        used = await self.host.mysql_disk_usage()
        du = subprocess.run(["du", "-sbx", self.db.datadir], check=True, stdout=subprocess.PIPE).stdout
        self.assertEqual(used, int(du.split()[0]))
        self.assertGreater(used, 1_000_000)
        st = os.statvfs(self.db.datadir)
        free = await self.host.datadir_available_space()
        self.assertAlmostEqual(free, st.f_bavail * st.f_frsize, delta=64 * 1024 * 1024)

    async def test_datadir_and_port_commands(self):
        host = make_host(self.db, mysql_datadir_command=f"echo ' {self.db.datadir}/ '",
                         mysql_port_command="printf '3307\\n'")
        self.assertEqual(await host.datadir(), self.db.datadir)
        self.assertEqual(await host.port(), 3307)
        for command, message in (("echo relative/dir", "not an absolute path"),
                                 ("true", "printed nothing")):
            host = make_host(self.db, mysql_datadir_command=command)
            e = await self.assertFailure(defer.ensureDeferred(host.datadir()), NotAvailable)
            self.assertIn(message, e.message)
        for command in ("echo 99999", "echo 33o6", "echo 0"):
            host = make_host(self.db, mysql_port_command=command)
            e = await self.assertFailure(defer.ensureDeferred(host.port()), NotAvailable)
            self.assertIn("not a TCP port", e.message)


class VersionGroupTests(unittest.TestCase):
    """``[mariadb-X.Y]`` groups count for the installed version only."""

    def write(self, text: str) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as fh:
            fh.write(text)
        return path

    async def test_the_installed_versions_group_counts(self):
        db = MariaDB.create(self)
        version = ".".join(server_variable(db, "version").split(".")[:2])
        path = self.write(f"!include {db.option_file}\n[mariadb-{version}]\nport=4444\n"
                          "[mariadb-9.9]\nport=9999\n")
        self.assertEqual(await make_host(db, mysql_options_file=path).port(), 4444)
        path = self.write(f"!include {db.option_file}\n[mariadb-9.9]\nport=9999\n")
        self.assertEqual(await make_host(db, mysql_options_file=path).port(), db.port)

    async def test_the_version_is_asked_only_when_needed(self):
        runner = FakeRunner(self)
        plain = self.write("[mysqld]\nport=3310\n")
        host = MySQLHost(Config(mysql_options_file=plain), runner, reactor, None)
        self.assertEqual(await host.port(), 3310)
        self.assertEqual(runner.calls, [])
        runner.expect(["mariadbd", "--version"], stdout="mariadbd  Ver 10.11.19-MariaDB-0+deb12u1 for debian-linux-gnu\n")
        versioned = self.write("[mysqld]\nport=3310\n[mysqld-10.11]\nport=3311\n")
        host = MySQLHost(Config(mysql_options_file=versioned), runner, reactor, None)
        self.assertEqual(await host.port(), 3311)
        self.assertEqual(await host.port(), 3311)
        self.assertEqual(len(runner.calls), 1)


class DefaultNamesTests(unittest.TestCase):
    """Names the server derives itself, compared with the server's own answer."""

    async def check(self, options: dict, hostname: str | None = None) -> MySQLHost:
        db = MariaDB.create(self, options=options)
        host = make_host(db)
        if hostname:
            host.hostname = hostname
        self.assertEqual(await host.error_log_path(), os.path.normpath(
            os.path.join(db.datadir, server_variable(db, "log_error"))))
        self.assertEqual(await host.pid_file_path(), server_variable(db, "pid_file"))
        self.assertEqual(await host.binlog_index_path(), server_variable(db, "log_bin_index"))
        self.assertTrue(os.path.exists(await host.error_log_path()))
        db.sql("CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT=1, MASTER_USER='nobody'")
        self.assertTrue(os.path.exists(await host.relay_log_index_path()),
                        (await host.relay_log_index_path(), os.listdir(db.datadir)))
        return host

    async def test_names_from_the_pid_file(self):
        host = await self.check({"log-error": None, "log-bin": None})
        self.assertTrue((await host.error_log_path()).endswith("/mysqld.err"))
        self.assertTrue((await host.relay_log_index_path()).endswith("/mysqld-relay-bin.index"))

    async def test_names_from_the_host_name(self):
        host = await self.check({"pid-file": False, "log-error": None, "log-bin": None})
        stem = host.hostname.split(".")[0]
        self.assertEqual(await host.error_log_path(), f"{await host.datadir()}/{stem}.err")

    async def test_names_from_log_basename(self):
        host = await self.check({"pid-file": False, "log-error": None, "log-bin": None, "log-basename": "lb"})
        self.assertTrue((await host.relay_log_index_path()).endswith("/lb-relay-bin.index"))

    async def test_explicit_names_with_extensions(self):
        host = await self.check({"log-bin": "binlogs.log", "relay-log": "relay.log", "log-error": "errors"})
        datadir = await host.datadir()
        self.assertEqual(await host.error_log_path(), f"{datadir}/errors.err")
        self.assertEqual(await host.relay_log_index_path(), f"{datadir}/relay.index")
        self.assertEqual(await host.binlog_index_path(), f"{datadir}/binlogs.index")

    async def test_without_log_error_the_tail_is_not_available(self):
        db = MariaDB.create(self, options={"log-error": False})
        e = await self.assertFailure(defer.ensureDeferred(make_host(db).error_log_tail()), NotAvailable)
        self.assertIn("log-error is not set", e.message)
        self.assertIn(db.option_file, e.message)

    def test_dotted_host_name_is_cut_at_the_first_dot(self):
        """MariaDB names ``db1.example.com``'s files ``db1.*`` (seen with a real server)."""
        host = MySQLHost(Config(), None, reactor, None, hostname="db1.example.com")
        d = defer.ensureDeferred(host.default_log_stem(ServerOptions([]), "/data"))
        self.assertEqual(self.successResultOf(d), "/data/db1")


class DeleteDatadirTests(unittest.TestCase):
    def setUp(self):
        self.db = MariaDB.create(self)
        self.host = make_host(self.db)

    async def refused(self, host: MySQLHost, *words: str, kind=Refused):
        e = await self.assertFailure(defer.ensureDeferred(host.delete_datadir()), kind)
        for word in words:
            self.assertIn(word, e.message)
        return e

    async def test_refused_while_mysql_runs(self):
        await self.refused(self.host, "MySQL is running")
        self.assertIn("ibdata1", os.listdir(self.db.datadir))
        self.assertEqual(self.db.sql("SELECT 1"), [("1",)])

    async def test_refused_for_dangerous_or_foreign_directories(self):
        self.db.stop()
        foreign = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(foreign, "docs"))
        open(os.path.join(foreign, "notes.txt"), "w").close()
        cases = [
            ("echo /", ["system directory"]),
            ("echo /etc/", ["system directory"]),
            ("echo /usr/../", ["system directory"]),
            (f"echo {foreign}", ["does not look like a MySQL datadir"]),
            (f"echo {foreign}/missing", ["does not exist"]),
            (f"echo {foreign}/notes.txt", ["not a directory"]),
        ]
        for command, words in cases:
            await self.refused(make_host(self.db, mysql_datadir_command=command), *words)
        await self.refused(make_host(self.db, mysql_datadir_command="echo"), "printed nothing",
                           kind=NotAvailable)
        await self.refused(make_host(self.db, mysql_datadir_command="echo data"),
                           "not an absolute path", kind=NotAvailable)
        self.assertEqual(sorted(os.listdir(foreign)), ["docs", "notes.txt"])
        self.assertIn("ibdata1", os.listdir(self.db.datadir))

    async def test_a_mysql_subdirectory_alone_is_not_a_datadir(self):
        """#16 item 13: a directory whose only marker is ``mysql/`` is refused, its tree
        untouched: ``/usr/local``-like (an install in ``mysql/`` and random files), and
        ``/data``-like (``mysql/`` is the whole datadir, a copy of the real one).  Names
        any program may use (``auto.cnf``, ``performance_schema/``) do not count either.
        The real datadir and an empty directory stay deletable."""
        self.db.stop()
        rnd = random.Random(13)
        local = os.path.abspath(self.mktemp())
        for sub in ("mysql/bin", "mysql/share/english", "mysql/lib", "bin", "share/man"):
            os.makedirs(os.path.join(local, sub))
            for _ in range(rnd.randint(1, 4)):
                name = "".join(rnd.choice("abcdefghij_.") for _ in range(8)) + rnd.choice(("", ".so", ".sys"))
                with open(os.path.join(local, sub, name), "wb") as fh:
                    fh.write(rnd.randbytes(rnd.randint(0, 5000)))
        data = os.path.abspath(self.mktemp())
        os.makedirs(data)
        shutil.copytree(self.db.datadir, os.path.join(data, "mysql"), symlinks=True)
        weak = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(weak, "performance_schema"))
        for name in ("auto.cnf", "master.info", "notes.txt"):
            open(os.path.join(weak, name), "w").close()
        for directory in (local, data, weak):
            before = S.snapshot_tree(directory)
            host = make_host(self.db, mysql_datadir_command=f"echo {directory}")
            await self.refused(host, f"{directory} does not look like a MySQL datadir",
                               "ibdata1", "system tables in mysql/")
            await self.assertFailure(defer.ensureDeferred(host.post_copy()), Refused)
            self.assertEqual(S.snapshot_tree(directory), before, directory)
        empty = os.path.abspath(self.mktemp())
        os.makedirs(empty)
        self.assertIs(await make_host(self.db, mysql_datadir_command=f"echo {empty}").delete_datadir(), True)
        self.assertIs(await self.host.delete_datadir(), True)
        self.assertEqual(os.listdir(self.db.datadir), [])

    async def test_system_trees_are_refused_whatever_they_hold(self):
        """The deleting is a harmless command here, should the refusal ever fail (MariaDB
        installed puts a ``mysql/`` in /usr/share)."""
        self.db.stop()
        for directory in ("/usr/local", "/usr/local/", "/opt", "/srv", "/home", "/usr/share", "/var/cache"):
            await self.refused(make_host(self.db, mysql_datadir_command=f"echo {directory}",
                                         mysql_delete_datadir_content_command="true"),
                               "a system directory")
        self.assertIn("ibdata1", os.listdir(self.db.datadir))

    async def test_empties_the_datadir_but_keeps_it(self):
        self.db.stop()
        outside = os.path.abspath(self.mktemp())
        os.makedirs(outside)
        open(os.path.join(outside, "keep.txt"), "w").close()
        os.symlink(outside, os.path.join(self.db.datadir, "linked"))
        stat_before = os.stat(self.db.datadir)
        self.assertIs(await self.host.delete_datadir(), True)
        self.assertEqual(os.listdir(self.db.datadir), [])
        self.assertEqual(os.stat(self.db.datadir).st_ino, stat_before.st_ino)
        self.assertEqual(os.listdir(outside), ["keep.txt"])
        # an empty datadir is still a datadir: deleting again is fine
        self.assertIs(await self.host.delete_datadir(), True)

    async def test_configured_command_runs_after_the_checks(self):
        marker = os.path.abspath(self.mktemp())
        host = make_host(self.db, mysql_delete_datadir_content_command=f"echo ran > {marker}")
        await self.refused(host, "MySQL is running")
        self.assertFalse(os.path.exists(marker))
        self.db.stop()
        self.assertIs(await host.delete_datadir(), True)
        with open(marker) as fh:
            self.assertEqual(fh.read(), "ran\n")
        self.assertIn("ibdata1", os.listdir(self.db.datadir))


class PostCopyTests(unittest.TestCase):
    async def test_copied_replica_starts_clean_and_owned_by_mysql(self):
        """A copy of a stopped replica's datadir starts here as a non-replicating server."""
        source = MariaDB.create(self, server_id=1)
        source.sql("CREATE USER repl@'127.0.0.1' IDENTIFIED BY 'pw';"
                   "GRANT REPLICATION SLAVE ON *.* TO repl@'127.0.0.1';"
                   "CREATE DATABASE shop; CREATE TABLE shop.t (id INT PRIMARY KEY);"
                   "INSERT INTO shop.t VALUES (1), (2)")
        replica = MariaDB.create(self, server_id=2)
        replica.sql(f"CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={source.port}, "
                    "MASTER_USER='repl', MASTER_PASSWORD='pw', MASTER_USE_GTID=no; START SLAVE")
        await wait_for(lambda: replica.sql("SELECT COUNT(*) FROM information_schema.tables "
                                           "WHERE table_schema='shop'") == [("1",)]
                       and replica.sql("SELECT COUNT(*) FROM shop.t") == [("2",)])
        replica.sql("STOP SLAVE")
        replica.stop()
        self.assertIn("master.info", os.listdir(replica.datadir))

        target = MariaDB.create(self, server_id=3, install=False, start=False)
        shutil.copytree(replica.datadir, target.datadir, symlinks=True)  # owned by root now
        os.chmod(target.datadir, 0o755)
        # As a hot seed leaves them: the backup's coordinates, true of its own moment only.
        for name in ("xtrabackup_binlog_info", "mariadb_backup_slave_info"):
            with open(os.path.join(target.datadir, name), "w") as fh:
                fh.write("mysql-bin.000001\t342\t0-1-5\n")
        host = make_host(target)
        self.assertIs(await host.post_copy("replica.example"), True)

        names = os.listdir(target.datadir)
        self.assertIn("master.info.from-replica.example", names)
        self.assertIn("relay-log.info.from-replica.example", names)
        self.assertIn("xtrabackup_binlog_info.from-replica.example", names)
        self.assertIn("mariadb_backup_slave_info.from-replica.example", names)
        self.assertNotIn("xtrabackup_binlog_info", names)
        self.assertNotIn("master.info", names)
        self.assertFalse([n for n in names if "relay-bin" in n], names)
        self.assertIn("mysql-bin.000001", names)
        for directory, dirs, files in os.walk(target.datadir):
            for name in [directory] + [os.path.join(directory, f) for f in files]:
                self.assertEqual(os.lstat(name).st_uid, pwd.getpwnam("mysql").pw_uid, name)

        target.start()
        self.assertEqual(target.sql("SELECT id FROM shop.t ORDER BY id"), [("1",), ("2",)])
        self.assertEqual(target.sql("SHOW SLAVE STATUS"), [])

    async def test_refused_while_running(self):
        db = MariaDB.create(self)
        e = await self.assertFailure(defer.ensureDeferred(make_host(db).post_copy(None)), Refused)
        self.assertIn("MySQL is running", e.message)

    async def test_configured_command_gets_the_source_host(self):
        out = os.path.abspath(self.mktemp())
        script = out + ".sh"
        with open(script, "w") as fh:
            fh.write(f'printf "%s|%s\\n" "$#" "$1" > {out}\n')
        host = make_host(post_copy_command=f"bash {script}")
        self.assertIs(await host.post_copy("db2.example:3306"), True)
        with open(out) as fh:
            self.assertEqual(fh.read(), "1|db2.example:3306\n")
        self.assertIs(await host.post_copy(None), True)
        with open(out) as fh:
            self.assertEqual(fh.read(), "0|\n")


async def wait_for(condition, timeout: float = 30.0, interval: float = 0.1) -> None:
    from twisted.internet import task
    waited = 0.0
    while not condition():
        if waited > timeout:
            raise AssertionError(f"condition not met after {timeout}s")
        await task.deferLater(reactor, interval, lambda: None)
        waited += interval

