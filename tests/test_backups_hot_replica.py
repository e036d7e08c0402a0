"""A hot seed of a replica (orchagent.backups.hot.HotSeeds.source): the backup is taken
with --slave-info and the replica's master is announced to the target, because the
backup holds the replica's position in its master's binlog but names no master.  A
primary's, or a server the client cannot ask, is backed up as before.  (The whole path,
with real servers: tests/test_e2e_seed.py, the hot seed of a replica.)"""

from __future__ import annotations

import os

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from orchagent.backups.hot import HotSeeds, StreamedBackup
from orchagent.backups.tools import Tools
from orchagent.config import Config
from tests.support.fakes import FakeRunner

CLIENT = "mysql --defaults-file=/etc/db.cnf"
REPLICA_STATUS = (b"Slave_IO_State\tMaster_Host\tMaster_User\tMaster_Port\tSlave_IO_Running\n"
                  b"Waiting for master to send event\t10.0.0.5\trepl\t3307\tYes\n")


class _Host:
    async def mysql_disk_usage(self) -> int:
        return 5 << 20


class _Service:
    async def is_running(self) -> bool:
        return True


class HotSeedOfAReplicaTests(unittest.TestCase):

    def hot(self) -> tuple[HotSeeds, FakeRunner]:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        options = os.path.join(base, "my.cnf")
        with open(options, "w") as fh:
            fh.write("[client]\nsocket=/run/db.sock\n")
        config = Config(state_dir=os.path.join(base, "state"), mysql_options_file=options,
                        mysql_client_command=CLIENT)
        runner = FakeRunner(self)
        runner.expect(["mariabackup", "--version"],
                      stderr="mariabackup based on MariaDB server 10.11.19-MariaDB debian-linux-gnu")
        tools = Tools(config, runner, which=lambda t: f"/usr/bin/{t}" if t == "mariabackup" else None)
        return HotSeeds(config, runner, _Host(), _Service(), tools), runner

    async def test_a_replica_is_backed_up_with_slave_info_and_its_master_announced(self):
        hot, runner = self.hot()
        runner.expect_shell(CLIENT, ["--batch"], stdout=REPLICA_STATUS)
        source = await hot.source("s1", {})
        self.assertIsInstance(source, StreamedBackup)
        self.assertEqual(source.command[-3:], ["--backup", "--slave-info", "--stream=xbstream"])
        self.assertEqual(source.announce, {"tool": "mariabackup", "version": "10.11", "estimate": 5 << 20,
                                           "master": {"host": "10.0.0.5", "port": 3307, "user": "repl"}})

    async def test_a_primary_is_backed_up_as_before(self):
        hot, runner = self.hot()
        runner.expect_shell(CLIENT, ["--batch"], stdout=b"")
        source = await hot.source("s2", {})
        self.assertEqual(source.command[-2:], ["--backup", "--stream=xbstream"])
        self.assertNotIn("master", source.announce)

    async def test_a_server_the_client_cannot_ask_is_backed_up_as_a_primary(self):
        """A client without the right to read SHOW SLAVE STATUS: the seed goes on as a
        primary's (its copy replicates from this host, as before), and the log says why."""
        hot, runner = self.hot()
        runner.expect_shell(CLIENT, ["--batch"], exit_code=1,
                            stderr=b"ERROR 1227 (42000): Access denied; you need (at least one of) "
                                   b"the SLAVE MONITOR privilege(s) for this operation")
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        source = await hot.source("s3", {})
        self.assertNotIn("--slave-info", source.command)
        self.assertNotIn("master", source.announce)
        self.assertTrue(any("cannot tell whether this server is a replica" in formatEvent(e)
                            and "SLAVE MONITOR" in formatEvent(e) for e in logged), logged)
