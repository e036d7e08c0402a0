"""A seed between two real ``twistd`` agents over their HTTP API, with a SIGKILL in the middle."""

from __future__ import annotations

import os
import time

from twisted.internet import defer
from twisted.trial import unittest

from tests import seed_support as S
from tests.support.daemon import Daemon, start_daemon, wait_until

KEY = "s3cr3t-seed-key"


class TwoDaemonsTests(unittest.TestCase):
    timeout = 120

    async def test_keyed_seed_survives_a_killed_sender(self):
        base = os.path.abspath(self.mktemp())
        src, dst = os.path.join(base, "src"), os.path.join(base, "dst")
        os.makedirs(src)
        os.makedirs(dst)
        total = 24 << 20
        with open(os.path.join(src, "ibdata1"), "wb") as fh:
            fh.write(os.urandom(total))
        seed_port = S.free_port()
        common = {"MySQLServiceStatusCommand": "false", "SeedTransferPort": seed_port}
        receiver = await start_daemon(self, {**common, "MySQLDatadirCommand": f"echo {dst}"},
                                      directory=os.path.join(base, "receiver"))
        sender_config = {**common, "MySQLDatadirCommand": f"echo {src}",
                         "SeedRateLimitBytesPerSec": 8 << 20}
        sender = await start_daemon(self, sender_config, directory=os.path.join(base, "sender"))

        self.assertEqual(await receiver.get("/api/receive-mysql-seed-data/31", key=KEY), (200, True))
        self.assertEqual(await sender.get(f"/api/send-mysql-seed-data/127.0.0.1:{seed_port}/31",
                                          key=KEY, source="datadir"), (200, True))

        async def received():
            return (await receiver.get("/api/seed-status/31"))[1]["BytesDone"]

        await wait_until(lambda: _above(received(), 4 << 20), timeout=30)
        # The API answers at once while the seed runs.
        started = time.monotonic()
        code, status = await sender.get("/api/seed-status/31")
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual((code, status["Role"], status["State"]), (200, "sender", "running"))

        sender._transport.signalProcess("KILL")
        await sender.wait_exit()
        code, status = await receiver.get("/api/seed-status/31")
        self.assertEqual(status["State"], "running")
        self.assertLess(status["BytesDone"], total)

        # The same agent starts again and the controller sends the same seed again.
        again = Daemon(os.path.join(base, "sender"), {**sender_config, "HTTPPort": sender.port,
                                                      "SeedRateLimitBytesPerSec": 0})
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(again.stop()))
        await again.start()
        self.assertEqual(await again.get(f"/api/send-mysql-seed-data/127.0.0.1:{seed_port}/31",
                                         key=KEY, source="datadir"), (200, True))

        async def done():
            return (await receiver.get("/api/seed-command-completed/31"))[1]

        await wait_until(done, timeout=60)
        self.assertEqual(await receiver.get("/api/seed-command-succeeded/31"), (200, True))
        code, status = await receiver.get("/api/seed-status/31")
        self.assertEqual((status["State"], status["BytesDone"]), ("completed", total))
        self.assertGreaterEqual(status["Resumes"], 1)
        await wait_until(lambda: _equal(again.get("/api/seed-command-succeeded/31"), (200, True)))
        with open(os.path.join(src, "ibdata1"), "rb") as a, open(os.path.join(dst, "ibdata1"), "rb") as b:
            self.assertTrue(a.read() == b.read(), "the seeded file differs")
        for daemon in (receiver, again):
            self.assertNotIn(KEY, daemon.output())
        self.assertIn("seed 31", receiver.output())


async def _above(value, limit) -> bool:
    return (await value) > limit


async def _equal(value, expected) -> bool:
    return (await value) == expected
