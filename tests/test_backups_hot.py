"""Hot seeds: ``send-mysql-seed-data/...?source=hot`` between two real agents.

Two real agents (``twistd -n orchestrator-agent`` children) on loopback, each with its
own real MariaDB: the source's runs (and is written to), the target's is stopped.  By
default the source agent streams ``mariabackup --backup --stream=xbstream`` (with the
server's option file: its ``[client]`` group, socket, user root) to the target, which
extracts, prepares and moves it in; with ``HotBackupCommand`` the source backs up into a
work directory, prepares it and sends it like a snapshot.  The target then runs
post-copy and mysql-start.  (tests/test_backups_hot_stream.py checks the streamed seed's
failures in process.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from twisted.internet import reactor, task, utils
from twisted.trial import unittest

from orchagent.config import FIELDS
from tests.support.daemon import REPO_ROOT, free_port, start_daemon, wait_until
from tests.support.mariadb import MariaDB
from tests.test_backups_mariadb import (DATABASE, ROWS_UP_TO, mariabackup_unavailable, populated,
                                        table_checksums)

_KEY = {f.attr: f.key for f in FIELDS}
SEED_KEY = "hot-seed-test-key"


class HotSeedTests(unittest.TestCase):
    timeout = 240

    def setUp(self):
        reason = mariabackup_unavailable()
        if reason:
            raise unittest.SkipTest(reason)
        self.home = os.path.abspath(self.mktemp())
        os.makedirs(self.home)

    async def agents(self, source_db: MariaDB, target_db: MariaDB, target_extra=None, **source_extra):
        self.seed_port = free_port()
        common = {"CommandTimeoutSeconds": 120, "SnapshotBackend": "copy"}
        source_config = dict(common, **{_KEY[k]: v for k, v in source_db.agent_settings().items()})
        source_config.update(source_extra)
        target_config = dict(common, SeedTransferPort=self.seed_port,
                             **{_KEY[k]: v for k, v in target_db.agent_settings().items()})
        target_config.update(target_extra or {})
        self.source = await start_daemon(self, source_config, directory=os.path.join(self.home, "source"))
        self.target = await start_daemon(self, target_config, directory=os.path.join(self.home, "target"))

    async def api(self, agent, endpoint, **params):
        status, body = await agent.get(endpoint, **params)
        if status != 200:
            raise AssertionError(f"{endpoint}: HTTP {status}: {body}\n{agent.output()[-3000:]}")
        return body

    async def status(self, agent, seed):
        return await self.api(agent, f"/api/seed-status/{seed}")

    async def hot_seed(self, seed: str) -> tuple[dict, dict]:
        """orchestrator's calls for a seed, with source=hot instead of a mounted snapshot."""
        self.assertIs(await self.api(self.target, "/api/delete-mysql-datadir"), True)
        self.assertIs(await self.api(self.target, f"/api/receive-mysql-seed-data/{seed}", key=SEED_KEY), True)
        self.assertIs(await self.api(self.source, f"/api/send-mysql-seed-data/127.0.0.1:{self.seed_port}/{seed}",
                                     key=SEED_KEY, source="hot"), True)
        states = set()

        async def done():
            status = await self.status(self.source, seed)
            states.add(status["State"])
            return status["State"] in ("completed", "failed", "aborted")

        await wait_until(done, timeout=180, interval=0.1)
        await wait_until(lambda: self.api(self.target, f"/api/seed-command-completed/{seed}"), timeout=60)
        source_status, target_status = await self.status(self.source, seed), await self.status(self.target, seed)
        self.assertEqual((source_status["State"], target_status["State"]), ("completed", "completed"),
                         (source_status, target_status))
        self.assertIn("running", states, "the seed shows as running while the backup streams")
        self.assertIs(await self.api(self.target, f"/api/seed-command-succeeded/{seed}"), True)
        await wait_until(lambda: os.listdir(os.path.join(self.home, "source", "state", "hot")) == [],
                         timeout=15)
        self.assertIs(await self.api(self.target, "/api/post-copy/", sourceHost="127.0.0.1"), True)
        self.assertIs(await self.api(self.target, "/api/mysql-start"), True)
        return source_status, target_status

    async def test_hot_seed_equal_checksums(self):
        source_db = populated(self)
        source_db.sql("CALL writer(0.5)", DATABASE)
        target_db = MariaDB.create(self, start=False)
        await self.agents(source_db, target_db)
        source_status, target_status = await self.hot_seed("41")
        self.assertEqual(source_status["BytesTotal"], target_status["BytesTotal"])
        self.assertTrue(target_db.is_running())
        tables = ("t1", "t3", "w")
        self.assertEqual(table_checksums(target_db, tables), table_checksums(source_db, tables))
        self.assertIn((DATABASE,), target_db.sql("SHOW DATABASES"))

    async def test_hot_seed_under_writes(self):
        source_db = populated(self)
        target_db = MariaDB.create(self, start=False)
        await self.agents(source_db, target_db)
        writer = subprocess.Popen(source_db.client_argv(DATABASE) + ["-e", "CALL writer(3.0)"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(writer.wait)
        marker = 0
        while marker < 200:
            await task.deferLater(reactor, 0.05, lambda: None)
            marker = int(source_db.sql(f"SELECT COALESCE(MAX(id), 0) FROM {DATABASE}.w")[0][0])
        await self.hot_seed("42")
        await task.deferLater(reactor, 0, writer.wait)
        last = int(target_db.sql(f"SELECT MAX(id) FROM {DATABASE}.w")[0][0])
        self.assertGreaterEqual(last, marker, "every row committed before the seed is there")
        self.assertGreater(int(source_db.sql(f"SELECT MAX(id) FROM {DATABASE}.w")[0][0]), last,
                           "the source kept writing during the hot backup")
        self.assertEqual(target_db.sql(ROWS_UP_TO.format(marker=last)),
                         source_db.sql(ROWS_UP_TO.format(marker=last)),
                         "the target holds exactly the source's rows up to its last one")
        self.assertEqual(table_checksums(target_db), table_checksums(source_db))

    async def test_directory_mode_send_resumes_after_a_source_restart(self):
        """With HotBackupCommand the send phase is an ordinary engine send: the work
        directory outlives a restart of the source agent, the send resumes from it, and
        it is removed at the end."""
        source_db = populated(self)
        target_db = MariaDB.create(self, start=False)
        await self.agents(source_db, target_db, SeedRateLimitBytesPerSec=6 << 20,
                          HotBackupCommand=f"mariabackup --defaults-file={source_db.option_file} "
                                           "--backup --target-dir")
        self.assertIs(await self.api(self.target, "/api/receive-mysql-seed-data/45", key=SEED_KEY), True)
        self.assertIs(await self.api(self.source, f"/api/send-mysql-seed-data/127.0.0.1:{self.seed_port}/45",
                                     key=SEED_KEY, source="hot"), True)

        async def sending():
            return (await self.status(self.source, "45"))["BytesDone"] > 0

        await wait_until(sending, timeout=60, interval=0.05)
        await self.source.stop()
        work = os.path.join(self.home, "source", "state", "hot")
        self.assertEqual(os.listdir(work), ["45"], "the prepared backup is kept across the restart")
        await self.source.start()

        async def finished():
            return (await self.status(self.target, "45"))["State"] in ("completed", "failed", "aborted")

        await wait_until(finished, timeout=120, interval=0.1)
        target_status = await self.status(self.target, "45")
        self.assertEqual((target_status["State"], target_status["Error"]), ("completed", ""))
        self.assertGreaterEqual(target_status["Resumes"], 1)
        await wait_until(lambda: self.api(self.source, "/api/seed-command-completed/45"), timeout=30)
        self.assertEqual((await self.status(self.source, "45"))["State"], "completed")
        await wait_until(lambda: os.listdir(work) == [], timeout=15)
        self.assertIs(await self.api(self.target, "/api/post-copy/", sourceHost="127.0.0.1"), True)
        self.assertIs(await self.api(self.target, "/api/mysql-start"), True)
        tables = ("t1", "t3", "w")
        self.assertEqual(table_checksums(target_db, tables), table_checksums(source_db, tables))

    async def test_controller_seed_hot(self):
        """``orchagent seed --target T --source S --hot``: the controller's whole seed with a
        hot backup instead of a snapshot, ending with the target's MySQL answering."""
        source_db = populated(self)
        target_db = MariaDB.create(self, start=False)
        token_file = os.path.join(self.home, "fleet-token")
        with open(token_file, "w") as fh:
            fh.write("fleet-token-for-the-hot-test\n")
        os.chmod(token_file, 0o600)
        seed_port = free_port()
        await self.agents(source_db, target_db, dict(TokenFile=token_file, AgentHostname="target.test",
                                                      SeedTransferPort=seed_port),
                          TokenFile=token_file, AgentHostname="source.test", SeedTransferPort=seed_port)
        env = dict(os.environ, ORCHAGENT_HOME=os.path.join(self.home, "controller"),
                   ORCHAGENT_TOKEN_FILE=token_file, PYTHONPATH=REPO_ROOT)
        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable, ["-m", "orchagent.cli.main", "seed", "--target", self.target.base_url,
                             "--source", self.source.base_url, "--hot", "--poll-interval", "0.2"],
            env=env, path=self.home)
        self.assertEqual(code, 0, (out + err).decode(errors="replace"))
        self.assertIn(b"MySQL answers on", out + err)
        self.assertTrue(target_db.is_running())
        tables = ("t1", "t3", "w")
        self.assertEqual(table_checksums(target_db, tables), table_checksums(source_db, tables))

    async def test_abort_during_the_backup(self):
        source_db = MariaDB.create(self)
        target_db = MariaDB.create(self, start=False)
        marker = os.path.join(self.home, "backup-started")
        await self.agents(source_db, target_db,
                          HotBackupCommand=f"touch {marker}; sleep 120; mkdir")
        self.assertIs(await self.api(self.target, "/api/receive-mysql-seed-data/43", key=SEED_KEY), True)
        self.assertIs(await self.api(self.source, f"/api/send-mysql-seed-data/127.0.0.1:{self.seed_port}/43",
                                     key=SEED_KEY, source="hot"), True)
        await wait_until(lambda: os.path.exists(marker), timeout=30)
        work = os.path.join(self.home, "source", "state", "hot")
        self.assertEqual(os.listdir(work), ["43"])
        started = time.monotonic()
        self.assertIs(await self.api(self.source, "/api/abort-seed/43"), True)
        self.assertIs(await self.api(self.target, "/api/abort-seed/43"), True)
        status = await self.status(self.source, "43")
        self.assertEqual((status["State"], status["Error"]), ("aborted", "aborted through the API"))
        self.assertIs(await self.api(self.source, "/api/seed-command-completed/43"), True)
        self.assertIs(await self.api(self.source, "/api/seed-command-succeeded/43"), False)
        await wait_until(lambda: os.listdir(work) == [], timeout=15)
        self.assertLess(time.monotonic() - started, 15)
        sleeping = subprocess.run(["pgrep", "-f", f"touch {marker}"], capture_output=True)
        self.assertEqual(sleeping.returncode, 1, "the backup command was stopped")
        self.assertTrue(source_db.is_running())

    async def test_refused_while_mysql_is_stopped(self):
        source_db = MariaDB.create(self, start=False)
        target_db = MariaDB.create(self, start=False)
        await self.agents(source_db, target_db)
        status, body = await self.source.get(f"/api/send-mysql-seed-data/127.0.0.1:{self.seed_port}/44",
                                             source="hot")
        self.assertEqual((status, body["Message"]), (500, "hot seed 44: MySQL is not running here; "
                         "a hot seed copies the running server (send a snapshot or the datadir instead)"))
        # Remembered as failed, so that orchestrator (which never reads an HTTP error
        # status) stops at its next poll.
        status, body = await self.source.get("/api/seed-status/44")
        self.assertEqual((status, body["State"]), (200, "failed"))
        self.assertTrue(body["Error"].startswith("refused: hot seed 44: MySQL is not running here"))
