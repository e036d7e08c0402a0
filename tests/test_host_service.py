"""The MySQL service: configured commands against a real MariaDB; systemd defaults.

systemd is not running on the test machine, so the built-in ``systemctl`` commands are
checked with the expectation fake runner; the configured-command path runs for real.
"""

from __future__ import annotations

import os

from twisted.internet import defer, reactor
from twisted.trial import unittest

from orchagent.config import Config
from orchagent.errors import CommandFailed, NotAvailable
from orchagent.host.service import MySQLService
from orchagent.process import ProcessRunner
from tests.support.fakes import FakeRunner
from tests.support.mariadb import MariaDB


class ConfiguredCommandsTests(unittest.TestCase):
    """MySQLService*Command against a real server."""

    def setUp(self):
        self.db = MariaDB.create(self)
        self.service = MySQLService(Config(**self.db.agent_settings()), ProcessRunner(reactor))

    async def test_status_flips_with_stop_and_start(self):
        self.assertTrue(await self.service.is_running())
        self.assertIs(await self.service.stop(), True)
        self.assertFalse(self.db.is_running())
        self.assertFalse(await self.service.is_running())
        self.assertIs(await self.service.start(), True)
        self.assertTrue(self.db.is_running())
        self.assertTrue(await self.service.is_running())
        self.assertEqual(self.db.sql("SELECT 40 + 2"), [("42",)])

    async def test_failing_start_names_the_reason(self):
        await self.service.stop()
        os.rename(self.db.datadir, self.db.datadir + ".moved")
        self.addCleanup(os.rename, self.db.datadir + ".moved", self.db.datadir)
        e = await self.assertFailure(defer.ensureDeferred(self.service.start()), CommandFailed)
        self.assertIn("cannot start MySQL", e.message)
        self.assertIn("exited with status", e.message)
        self.assertIn("before it was ready", e.message)
        self.assertFalse(await self.service.is_running())

    async def test_failing_stop_carries_stderr(self):
        config = Config(mysql_service_stop_command="echo 'permission denied: mysqld' >&2; exit 4")
        e = await self.assertFailure(defer.ensureDeferred(MySQLService(config, ProcessRunner(reactor)).stop()), CommandFailed)
        self.assertIn("cannot stop MySQL", e.message)
        self.assertIn("status 4", e.message)
        self.assertIn("permission denied: mysqld", e.message)


class SystemdDefaultTests(unittest.TestCase):
    def setUp(self):
        self.units = os.path.abspath(self.mktemp())
        os.makedirs(self.units)
        self.runner = FakeRunner(self)

    def service(self, **config) -> MySQLService:
        return MySQLService(Config(**config), self.runner, unit_directories=[self.units])

    def add_unit(self, name: str) -> None:
        open(os.path.join(self.units, name + ".service"), "w").close()

    async def test_detects_mariadb_before_mysql(self):
        self.add_unit("mysql")
        self.add_unit("mariadb")
        self.runner.expect(["systemctl", "is-active", "--quiet", "mariadb"], exit_code=3)
        self.runner.expect(["systemctl", "stop", "mariadb"], privileged=True)
        self.runner.expect(["systemctl", "start", "mariadb"], privileged=True)
        self.runner.expect(["systemctl", "is-active", "--quiet", "mariadb"])
        service = self.service()
        self.assertFalse(await service.is_running())
        self.assertTrue(await service.stop())
        self.assertTrue(await service.start())
        self.assertTrue(await service.is_running())

    async def test_mysql_unit_and_configured_name(self):
        self.add_unit("mysql")
        self.runner.expect(["systemctl", "is-active", "--quiet", "mysql"])
        self.runner.expect(["systemctl", "start", "mysql@main"])
        self.assertTrue(await self.service().is_running())
        self.assertTrue(await self.service(mysql_service_name="mysql@main").start())

    async def test_no_unit(self):
        e = await self.assertFailure(defer.ensureDeferred(self.service().is_running()), NotAvailable)
        self.assertIn("MySQLServiceName", e.message)

    async def test_systemctl_failure_is_command_failed(self):
        self.add_unit("mariadb")
        self.runner.expect(["systemctl", "stop", "mariadb"], exit_code=1,
                           stderr="Failed to stop mariadb.service: Access denied")
        e = await self.assertFailure(defer.ensureDeferred(self.service().stop()), CommandFailed)
        self.assertIn("Access denied", e.message)

    async def test_configured_commands_win(self):
        self.runner.expect_shell("my-status")
        self.runner.expect_shell("my-stop")
        service = self.service(mysql_service_status_command="my-status",
                               mysql_service_stop_command="my-stop")
        self.assertTrue(await service.is_running())
        self.assertTrue(await service.stop())


class UnansweredStatusTests(unittest.TestCase):
    """A status command that ends with no exit status of its own tells nothing."""

    async def test_a_status_command_killed_at_its_time_limit_raises(self):
        service = MySQLService(Config(mysql_service_status_command="exec sleep 30"),
                               ProcessRunner(reactor, default_timeout=0.3))
        e = await self.assertFailure(defer.ensureDeferred(service.is_running()), CommandFailed)
        self.assertIn("cannot tell whether MySQL is running: command ", e.message)
        self.assertIn("timed out after 0s and was killed", e.message)

    async def test_a_status_command_killed_by_a_signal_raises(self):
        service = MySQLService(Config(mysql_service_status_command="kill -KILL $$"), ProcessRunner(reactor))
        e = await self.assertFailure(defer.ensureDeferred(service.is_running()), CommandFailed)
        self.assertIn("was killed by signal 9", e.message)

    async def test_any_exit_status_is_an_answer(self):
        for text, running in (("exit 0", True), ("exit 1", False), ("exit 3", False)):
            service = MySQLService(Config(mysql_service_status_command=text), ProcessRunner(reactor))
            self.assertIs(await service.is_running(), running, text)
