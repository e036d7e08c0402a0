"""What /api/mysql-du shows during a receive: the figure's rules, and what the datadir keeps."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from orchagent.seed.staging import Staging
from orchagent.seed.usage import FINAL_STEPS, STEP, visible_progress

sizes = st.integers(min_value=0, max_value=1 << 44)
steps = st.integers(min_value=0, max_value=FINAL_STEPS + 3)


class VisibleProgressTests(unittest.TestCase):
    @given(sizes, sizes, steps, st.floats(0, 1))
    def test_never_ahead_of_the_data_never_the_whole(self, total, moved, done, within):
        shown = visible_progress(total, moved, done, within)
        self.assertGreaterEqual(shown, 0)
        self.assertLessEqual(shown, moved + (done + 1) * STEP)
        self.assertLessEqual(shown, total)
        if total > FINAL_STEPS:
            self.assertLess(shown, total, "the promoted datadir always shows more")

    @given(sizes, sizes, sizes, steps)
    def test_grows_with_the_data(self, total, a, b, done):
        low, high = sorted((a, b))
        self.assertLessEqual(visible_progress(total, low, done), visible_progress(total, high, done))
        if high <= total - FINAL_STEPS * STEP:
            self.assertEqual(visible_progress(total, high, done) - visible_progress(total, low, done),
                             high - low, "every byte that arrived shows")

    @given(st.integers(min_value=FINAL_STEPS + 1, max_value=1 << 44), steps)
    def test_each_final_phase_shows(self, total, done):
        if done < FINAL_STEPS - 2:
            self.assertLess(visible_progress(total, total, done), visible_progress(total, total, done + 1))

    @given(st.integers(min_value=(FINAL_STEPS + 1) * STEP, max_value=1 << 44), steps,
           st.floats(0, 1), st.floats(0, 1))
    def test_a_long_phase_shows_its_share(self, total, done, a, b):
        low, high = sorted((a, b))
        before, after = visible_progress(total, total, done, low), visible_progress(total, total, done, high)
        self.assertLessEqual(before, after)
        self.assertLess(after, total)
        if high - low >= 1 / STEP and done < FINAL_STEPS - 1:
            self.assertLess(before, after)


class KeptUsageTests(unittest.TestCase):
    """What the datadir keeps through promotion, staging left out."""

    def write(self, path: str, size: int) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(b"x" * size)

    def test_beside_only_the_directory_and_lost_found(self):
        base = os.path.abspath(self.mktemp())
        datadir = os.path.join(base, "data")
        self.write(os.path.join(datadir, "old.ibd"), 7000)  # moved aside out of the datadir
        self.write(os.path.join(datadir, "lost+found", "x"), 300)
        staging = Staging(datadir, "5")
        self.assertFalse(staging.inside)
        self.write(os.path.join(staging.root, "ibdata1"), 1 << 20)
        expected = os.lstat(datadir).st_size + os.lstat(os.path.join(datadir, "lost+found")).st_size + 300
        self.assertEqual(staging.kept_usage(), expected)

    def test_inside_everything_but_staging(self):
        base = os.path.abspath(self.mktemp())
        datadir = os.path.join(base, "data")
        self.write(os.path.join(datadir, "old.ibd"), 7000)
        staging = Staging(datadir, "5")
        staging.inside = True  # as on a mount point or a subvolume (tested for real in e2e)
        staging.root = os.path.join(datadir, ".orchagent-seed-5")
        self.write(os.path.join(staging.root, "ibdata1"), 1 << 20)
        self.assertEqual(staging.kept_usage(), os.lstat(datadir).st_size + 7000)


class ManifestPhaseTests(unittest.TestCase):
    """While the sender still walks the source (minutes for millions of files), the
    target's mysql-du must grow between orchestrator's polls, or each poll counts a stall
    that is never forgiven: it grows with the manifest's bytes as they arrive."""

    timeout = 60

    async def test_mysql_du_grows_while_the_manifest_arrives(self):
        import time

        from twisted.internet import reactor, task

        from orchagent.seed import state
        from tests import seed_support as S

        base = os.path.abspath(self.mktemp())
        src, dst = os.path.join(base, "src"), os.path.join(base, "dst")
        os.makedirs(dst)
        for i in range(400):
            path = os.path.join(src, f"db{i // 100}", f"t{i:04d}.ibd")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(os.urandom(16384))
        S.slow_walk(self, 20, 0.05)
        port = S.free_port()
        r = S.make_manager(self, os.path.join(base, "r"), dst, port)
        s = S.make_manager(self, os.path.join(base, "s"), src, port, snapshot=src, chunk_size=64 * 1024)
        await r.receive("m1")
        await s.send(f"127.0.0.1:{port}", "m1", source="datadir")
        walking = []
        deadline = time.monotonic() + 30
        while not r.records["m1"].terminal:
            self.assertLess(time.monotonic(), deadline)
            if r.records["m1"].totals == state.WALKING:
                walking.append(await r.datadir_usage())
            await task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(r.records["m1"].state, state.COMPLETED, r.records["m1"].error)
        kept = walking[0] if walking else None
        grown = sorted(set(walking))
        self.assertGreater(len(grown), 3, f"mysql-du while the manifest arrived: {walking}")
        self.assertEqual(walking, sorted(walking), "it only grows while the manifest arrives")
        self.assertLess(grown[-1] - kept, 400 * 16384, "never the data itself")
