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
