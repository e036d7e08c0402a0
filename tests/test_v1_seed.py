"""orchestrator's v1 seed, exactly as orchestrator drives it, against two real agents.

Two ``twistd`` agents on loopback, each in a mount namespace of its own (the source's
snapshot mount lives and dies with its agent): the source has a copy-backend snapshot of
a datadir of incompressible files, the target a plain datadir directory (staging beside
it, out of mysql-du's sight).  The stand-in orchestrator (:class:`V1Seed`) polls with
orchestrator's own stall counter — equal mysql-du at two polls counts, never reset,
abort past ten — at a poll interval scaled down from 30 s, with the source's rate limit
scaled so that several chunks arrive between two polls, as they do 30 s apart.
"""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.trial import unittest

from orchagent.host.diskusage import disk_usage
from tests.support.daemon import free_port, start_daemon, wait_until
from tests.support.orchestrator import BAILING_OUT, StandInOrchestrator, Submission, V1Seed

FILES = 5
FILE_SIZE = 16 << 20
RATE = 4 << 20
POLL = 1.0
PRIVATE_MOUNTS = ["unshare", "--mount", "--propagation", "private"]


class V1SeedTests(unittest.TestCase):
    timeout = 180

    async def agents(self, source_extra=None):
        base = os.path.abspath(self.mktemp())
        self.snapshot = os.path.join(base, "snapshots", "orchagent-snap-1")
        self.source_datadir = os.path.join(base, "source-data")
        self.datadir = os.path.join(base, "target-data")
        for path in (self.snapshot, self.source_datadir, self.datadir, os.path.join(base, "mnt")):
            os.makedirs(path)
        for i in range(FILES):
            with open(os.path.join(self.snapshot, "ibdata1" if i == 0 else f"t{i}.ibd"), "wb") as fh:
                fh.write(os.urandom(FILE_SIZE))
        os.makedirs(os.path.join(self.snapshot, "mysql"))
        with open(os.path.join(self.snapshot, "mysql", "db.opt"), "w") as fh:
            fh.write("default-character-set=latin1\n")
        with open(os.path.join(self.datadir, "old.ibd"), "wb") as fh:
            fh.write(b"x" * 5000)
        options = os.path.join(base, "my.cnf")
        with open(options, "w") as fh:
            fh.write(f"[mysqld]\nlog-error = {base}/error.log\n")
        with open(os.path.join(base, "error.log"), "w") as fh:
            fh.write("[Note] mariadbd: Shutdown complete\n")
        self.seed_port = free_port()
        common = {"MySQLServiceStatusCommand": "false", "MySQLServiceStartCommand": "true",
                  "SeedTransferPort": self.seed_port,
                  "AgentHostname": "127.0.0.1", "MySQLOptionsFile": options}
        self.source = await start_daemon(self, {
            **common, "MySQLDatadirCommand": f"echo {self.source_datadir}",
            "SnapshotBackend": "copy", "SnapshotDirectory": os.path.join(base, "snapshots"),
            "SnapshotMountPoint": os.path.join(base, "mnt"), "SnapshotVolumesFilter": "orchagent-snap",
            "SeedRateLimitBytesPerSec": RATE, **(source_extra or {})},
            directory=os.path.join(base, "source"), prefix=PRIVATE_MOUNTS)
        self.target = await start_daemon(self, {**common, "MySQLDatadirCommand": f"echo {self.datadir}"},
                                         directory=os.path.join(base, "target"), prefix=PRIVATE_MOUNTS)

    def v1_seed(self, seed_id: int, poll_interval: float = POLL) -> V1Seed:
        return V1Seed(StandInOrchestrator(), Submission("127.0.0.1", self.target.port, self.target.token),
                      Submission("127.0.0.1", self.source.port, self.source.token), seed_id,
                      wait_before_send=0.5, poll_interval=poll_interval)

    async def test_a_seed_longer_than_ten_polls_completes(self):
        await self.agents()
        seed = self.v1_seed(41)
        outcome = await seed.run()
        self.assertTrue(outcome.ok, f"{outcome.reason}; polled {seed.polled_usage}")
        self.assertEqual(outcome.problems, ())
        self.assertGreaterEqual(len(seed.polled_usage), 15, "the seed crossed the old stall line")
        self.assertLessEqual(seed.stale_polls, 1, seed.polled_usage)
        final = disk_usage(self.datadir)
        self.assertEqual((await self.target.get("/api/mysql-du"))[1], final, "real usage again")
        # Never more than the promoted datadir holds; the last poll saw it complete.
        self.assertTrue(all(u < final for u in seed.polled_usage[:-1]), (seed.polled_usage, final))
        self.assertEqual(seed.polled_usage[-1], final)
        total = FILES * FILE_SIZE
        self.assertGreater(final, total)
        # Growth came from the data, not from the emptied datadir: the middle poll shows a part.
        middle = seed.polled_usage[len(seed.polled_usage) // 2]
        self.assertTrue(total // 5 < middle < total, (middle, total))

    async def test_a_seed_that_stalls_is_aborted(self):
        await self.agents()
        seed = self.v1_seed(42, poll_interval=0.3)
        running = defer.ensureDeferred(seed.run())

        async def moving():
            code, status = await self.target.get("/api/seed-status/42")
            return code == 200 and status["BytesDone"] > 0

        await wait_until(moving, timeout=30)
        self.assertEqual(await self.source.get("/api/seed-rate-limit/42", bytesPerSec=1), (200, True))
        outcome = await running
        self.assertFalse(outcome.ok)
        self.assertEqual(outcome.reason, BAILING_OUT)
        self.assertEqual(seed.stale_polls, 11)
        self.assertEqual(outcome.calls[-3:], ("127.0.0.1 abort-seed/42",) * 2 + ("127.0.0.1 umount",))
        code, status = await self.target.get("/api/seed-status/42")
        self.assertEqual(status["State"], "aborted")
        self.assertEqual(sorted(os.listdir(self.datadir)), [], "emptied by delete, left empty")
        self.assertEqual([n for n in os.listdir(os.path.dirname(self.datadir)) if "orchagent" in n], [])

    async def test_a_refused_receive_ends_at_the_first_poll(self):
        await self.agents()
        # Another seed holds the datadir: the receive of ours is refused after orchestrator's
        # own checks passed, and orchestrator never reads the error status.
        self.assertEqual(await self.target.get("/api/receive-mysql-seed-data/900"), (200, True))
        self.addCleanup(lambda: defer.ensureDeferred(self.target.get("/api/abort-seed/900")))
        seed = self.v1_seed(43)
        outcome = await seed.run()
        self.assertEqual(outcome.reason, BAILING_OUT)
        self.assertEqual(len(seed.polled_usage), 1, "stopped at the first poll, not after ten")
        self.assertIn("127.0.0.1 receive-mysql-seed-data/43", outcome.calls)
        self.assertEqual(await self.target.get("/api/seed-command-completed/43"), (200, True))
        self.assertEqual(await self.target.get("/api/seed-command-succeeded/43"), (200, False))
        code, status = await self.target.get("/api/seed-status/43")
        self.assertEqual(status["State"], "failed")
        self.assertIn("seed 900 is still being received", status["Error"])
        # The seed that held the datadir was not disturbed.
        code, status = await self.target.get("/api/seed-status/900")
        self.assertEqual(status["State"], "pending")

    async def test_a_refused_send_is_completed_and_failed(self):
        await self.agents()
        # Nothing mounted: the source refuses to send.
        code, body = await self.source.get("/api/send-mysql-seed-data/127.0.0.1/44")
        self.assertEqual(code, 500)
        self.assertIn("no snapshot is mounted", body["Message"])
        self.assertEqual(await self.source.get("/api/seed-command-completed/44"), (200, True))
        self.assertEqual(await self.source.get("/api/seed-command-succeeded/44"), (200, False))

    async def test_unknown_seed_ids_answer_as_the_original(self):
        await self.agents()
        for agent in (self.source, self.target):
            self.assertEqual(await agent.get("/api/seed-command-completed/77"), (200, False))
            self.assertEqual(await agent.get("/api/seed-command-succeeded/77"), (200, False))
            self.assertEqual(await agent.get("/api/abort-seed/77"), (200, True))
            code, _ = await agent.get("/api/seed-status/77")
            self.assertEqual(code, 500, "orchagent's own status endpoint still says it is unknown")

