"""The CI slice of the fault matrix (reliability/): one run of a few cases on real agents.

The full matrix (every case, many runs, random timing) is ``python -m reliability.run``;
see RELIABILITY.md.  This slice keeps CI honest about the harness and the invariant: the
target is verified identical or the seed failed cleanly (datadir as before, staging
gone), and nothing leaked (fds, ports, mounts, loop devices, child processes).
"""

from __future__ import annotations

import random
import shutil

from twisted.internet import defer
from twisted.trial import unittest

from reliability import matrix
from tests.support import netns

#: case -> verdicts accepted (a fault that lands after the last byte may still verify).
SLICE = {
    "kill9_sender": {"verified"},
    "kill9_receiver": {"verified"},
    "byte_flip": {"verified"},
    "abort": {"failed-clean", "verified"},
    "target_disk_full": {"failed-clean", "verified"},
    "snapshot_gone": {"failed-clean", "verified"},
    # The second seed into the busy datadir is refused; the first one is not disturbed.
    "racing_seeds": {"verified"},
}


class FaultSliceTests(unittest.TestCase):
    timeout = 400

    async def test_slice(self):
        reason = netns.unavailable_reason()
        if reason:
            raise unittest.SkipTest(reason)
        if shutil.which("mkfs.ext4") is None or shutil.which("losetup") is None:
            raise unittest.SkipTest("mkfs.ext4 and losetup are needed")
        base = matrix.base_dir()
        self.addCleanup(shutil.rmtree, base, True)
        world = matrix.World(base, random.Random(7), big_mib=16)
        self.addCleanup(lambda: defer.ensureDeferred(world.stop()))
        await world.start()
        outcomes = []
        for name, accepted in SLICE.items():
            outcome = await matrix.run_case_safely(world, name, 0)
            outcomes.append(outcome)
            self.assertIn(outcome.verdict, accepted, f"{name}: {outcome.detail}")
        self.assertEqual(matrix.summarize(outcomes, 7, 0)["broken"], 0)
