"""Progress at scale (#20, item 4): FilesTotal, BytesTotal and the ETA while the manifest
is still walked (sender) or received (receiver), on both sides, and the controller's
progress line.

The ETA tests run a job's own progress (``JobIdentity.progress``) on an injected clock
(``task.Clock``): a walk of a million files that takes 20 s, then the data; the seed
tests run two real SeedManagers on loopback with a walk slowed down enough to be seen.
"""

from __future__ import annotations

import io
import os
import re
import time

from twisted.internet import reactor, task
from twisted.trial import unittest

from orchagent.cli import render
from orchagent.cli.main import EXIT_OK
from orchagent.seed import state, tree
from tests import seed_support as S
from tests import test_cli_seed

FILE = 4096
MB = 1_000_000


class _Job(state.JobIdentity):
    """The progress side of a seed job: a record and a meter on the test's clock."""

    def __init__(self, clock, role="sender"):
        self.record = state.SeedRecord(seed_id="p1", role=role, state=state.RUNNING)
        self.meter = state.RateMeter(clock)

    def status(self) -> dict:
        return self.record.status(*self.progress())


def walk_then_send(clock, job, files=1_000_000, walk_seconds=20, rate=100 * MB):
    """A seed of ``files`` files of 4 KiB, its status read every second: the walk finds
    them at an even pace over ``walk_seconds`` (the totals grow), then the data moves at
    ``rate``.  The statuses, in order."""
    record, statuses = job.record, []
    for second in range(1, walk_seconds + 1):
        clock.advance(1)
        found = files * second // walk_seconds
        record.files_total, record.bytes_total = found, found * FILE
        statuses.append(job.status())
    record.totals = state.FINAL
    statuses.append(job.status())
    while record.bytes_done < record.bytes_total:
        clock.advance(1)
        record.bytes_done = min(record.bytes_total, record.bytes_done + rate)
        record.files_done = record.bytes_done // FILE
        statuses.append(job.status())
    return statuses


class EtaTests(unittest.TestCase):
    def test_no_eta_while_the_totals_grow_and_none_that_jumps_back_after(self):
        """While the walk goes on, the totals are marked walking and there is no ETA (a
        figure from totals still growing falls and then jumps back up: it did, 0 s for
        the whole walk, then minutes); after it, the ETA never rises at a steady rate."""
        clock = task.Clock()
        statuses = walk_then_send(clock, _Job(clock))
        walking = [s for s in statuses if s["Totals"] == state.WALKING]
        self.assertEqual(len(walking), 20)
        self.assertEqual({s["EtaSeconds"] for s in walking}, {None})
        totals = [s["FilesTotal"] for s in walking]
        self.assertEqual(totals, sorted(totals), "the count so far only grows")
        etas = [s["EtaSeconds"] for s in statuses if s["EtaSeconds"] is not None]
        self.assertTrue(etas)
        for before, after in zip(etas, etas[1:]):
            self.assertLessEqual(after, before, etas)
        self.assertEqual(etas[-1], 0)
        self.assertNotIn(0, etas[:-1], "0 s left only when the bytes are all there")

    def test_the_first_eta_is_measured_from_the_first_byte_moved(self):
        """A walk of 20 s moves no data: counted at 0 B/s in the rate's window it made
        the first ETA several times too long (4 GB at 100 MB/s: 40 s, not 200)."""
        clock = task.Clock()
        statuses = walk_then_send(clock, _Job(clock))
        first = next(s for s in statuses if s["BytesDone"] > 0 and s["EtaSeconds"] is not None)
        left = (first["BytesTotal"] - first["BytesDone"]) / (100 * MB)
        self.assertLessEqual(abs(first["EtaSeconds"] - left), 1, (first, left))
        self.assertLessEqual(abs(first["RateBytesPerSec"] - 100 * MB), MB, first)

    def test_the_totals_at_the_end_are_the_files(self):
        clock = task.Clock()
        statuses = walk_then_send(clock, _Job(clock), files=50_000, walk_seconds=5)
        last = statuses[-1]
        self.assertEqual((last["FilesTotal"], last["FilesDone"]), (50_000, 50_000))
        self.assertEqual((last["BytesTotal"], last["Totals"]), (50_000 * FILE, state.FINAL))

    def test_an_estimate_gives_an_eta_below_it_and_none_past_it(self):
        """A streamed hot seed: BytesTotal is the source datadir's size.  Once the stream
        passes it the bytes left are unknown: no ETA, where it used to say 0 s."""
        clock = task.Clock()
        job = _Job(clock)
        job.record.totals, job.record.bytes_total = state.ESTIMATE, 1000 * MB
        job.status()  # the first poll, as the stream starts
        seen = []
        for _ in range(15):
            clock.advance(1)
            job.record.bytes_done += 100 * MB
            job.record.bytes_total = max(job.record.bytes_total, job.record.bytes_done)
            seen.append(job.status()["EtaSeconds"])
        self.assertEqual(seen[:3], [9, 8, 7])
        self.assertEqual(seen[9:], [None] * 6)

    def test_no_eta_when_nothing_counts_the_bytes(self):
        self.assertIsNone(state.eta(state.UNCOUNTED, 100, 10.0))
        self.assertIsNone(state.eta(state.WALKING, 100, 10.0))
        self.assertIsNone(state.eta(state.FINAL, 100, 0.0))
        self.assertEqual(state.eta(state.FINAL, 0, 0.0), 0.0)
        self.assertEqual(state.eta(state.FINAL, 100, 10.0), 10.0)

    def test_records_saved_before_the_field(self):
        old = state.SeedRecord(seed_id="o", role="receiver", state=state.COMPLETED).to_json()
        del old["totals"]
        self.assertEqual(state.SeedRecord.from_json(old).status(0, 0)["Totals"], state.FINAL)
        old["state"] = state.RUNNING
        self.assertEqual(state.SeedRecord.from_json(old).totals, state.WALKING)


class ManifestTallyTests(unittest.TestCase):
    def test_tallies_of_a_growing_manifest_add_up_to_its_totals(self):
        root = os.path.abspath(self.mktemp())
        S.make_tree(root, files=40)
        seen = []

        def grown(manifest):
            start = seen[-1][0] if seen else 0
            seen.append((len(manifest), *manifest.tally(start, len(manifest))))

        self.patch(tree, "WALK_BATCH", 7)
        manifest = tree.walk(root, 64 * 1024, grown)
        self.assertEqual(sum(f for _, f, _ in seen), manifest.file_count)
        self.assertEqual(sum(b for _, _, b in seen), manifest.total_bytes)
        self.assertTrue(manifest.extents, "the tree has sparse files (counted by their extents)")


class SeedTotalsTests(unittest.TestCase):
    """Both sides of a real seed on loopback, their status read every 10 ms."""

    timeout = 60

    async def test_both_sides_count_while_the_walk_goes_on_and_end_with_the_files(self):
        base = os.path.abspath(self.mktemp())
        src, dst = os.path.join(base, "src"), os.path.join(base, "dst")
        os.makedirs(dst)
        S.make_tree(src)
        for i in range(600):
            directory = os.path.join(src, f"db{i // 100}")
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, f"t{i:04d}.frm"), "wb") as fh:
                fh.write(os.urandom(1 + i % 3000))
        walked = tree.walk(src)
        S.slow_walk(self, 50, 0.03)
        port = S.free_port()
        r = S.make_manager(self, os.path.join(base, "r"), dst, port)
        s = S.make_manager(self, os.path.join(base, "s"), src, port, snapshot=src, chunk_size=64 * 1024)
        await r.receive("t1")
        await s.send(f"127.0.0.1:{port}", "t1", source="datadir")
        seen = {"sender": [], "receiver": []}

        async def poll() -> bool:
            for side, manager in (("sender", s), ("receiver", r)):
                seen[side].append(await manager.status("t1"))
            return r.records["t1"].terminal

        deadline = time.monotonic() + 30
        while not await poll():
            self.assertLess(time.monotonic(), deadline)
            await task.deferLater(reactor, 0.01, lambda: None)
        end = await S.finished(s, "t1")
        self.assertEqual(seen["receiver"][-1]["State"], "completed", seen["receiver"][-1]["Error"])
        for side, statuses in seen.items():
            walking = [st for st in statuses if st["Totals"] == state.WALKING]
            counted = [st["FilesTotal"] for st in walking]
            self.assertTrue([n for n in counted if 0 < n < walked.file_count],
                            f"{side}: no count seen while the walk went on: {counted}")
            self.assertEqual(counted, sorted(counted), side)
            self.assertEqual({st["EtaSeconds"] for st in walking}, {None}, side)
            self.assertTrue(all(st["BytesTotal"] <= walked.total_bytes for st in walking), side)
            final = statuses[-1] if side == "receiver" else end
            self.assertEqual((final["FilesTotal"], final["FilesDone"], final["BytesTotal"],
                              final["Totals"]),
                             (walked.file_count, walked.file_count, walked.total_bytes, state.FINAL),
                             side)
            after = [st for st in statuses if st["Totals"] == state.FINAL]
            self.assertEqual({(st["FilesTotal"], st["BytesTotal"]) for st in after},
                             {(walked.file_count, walked.total_bytes)}, side)


class ProgressLineTests(unittest.TestCase):
    """The controller's bar (orchagent seed) shows files and bytes, and what its totals are."""

    def test_walking(self):
        line = render.progress_line({"State": "running", "BytesDone": 0, "BytesTotal": 3 << 30,
                                     "FilesDone": 0, "FilesTotal": 412_000, "Totals": "walking",
                                     "EtaSeconds": None, "RateBytesPerSec": 0}, width=10)
        self.assertEqual(line, "[??????????]      ?%  0 B / 3.0 GiB+  files 0/412,000+  0 B/s  "
                               "ETA ? (walking the source)")

    def test_final(self):
        line = render.progress_line({"State": "running", "BytesDone": 1 << 30, "BytesTotal": 4 << 30,
                                     "FilesDone": 250_000, "FilesTotal": 1_000_000, "Totals": "final",
                                     "EtaSeconds": 75, "RateBytesPerSec": 40 << 20}, width=10)
        self.assertEqual(line, "[##........]   25.0%  1.0 GiB / 4.0 GiB  files 250,000/1,000,000  "
                               "40.0 MiB/s  ETA 1:15")

    def test_estimate(self):
        line = render.progress_line({"State": "running", "BytesDone": 300 << 20, "BytesTotal": 600 << 20,
                                     "FilesDone": 0, "FilesTotal": 0, "Totals": "estimate",
                                     "EtaSeconds": 3, "RateBytesPerSec": 100 << 20}, width=10)
        self.assertEqual(line, "[#####.....]  ~50.0%  300.0 MiB / ~600.0 MiB  files 0/?  "
                               "100.0 MiB/s  ETA ~0:03")

    def test_a_log_shows_the_walk_then_the_copy(self):
        out = io.StringIO()
        reporter = render.Reporter(out, io.StringIO(), live=False, clock=task.Clock())
        reporter.progress({"State": "running", "FilesTotal": 4096, "BytesTotal": 1 << 24,
                           "Totals": "walking"})
        reporter.progress({"State": "verifying", "FilesDone": 9000, "FilesTotal": 9000,
                           "BytesDone": 1 << 25, "BytesTotal": 1 << 25, "Totals": "final",
                           "EtaSeconds": 0})
        first, second = out.getvalue().splitlines()
        self.assertIn("files 0/4,096+", first)
        self.assertIn("16.0 MiB+", first)
        self.assertIn("files 9,000/9,000", second)
        self.assertIn("32.0 MiB / 32.0 MiB", second)


class ControllerWalkTests(test_cli_seed.ControllerTestCase):
    """``orchagent seed`` against fake agents whose source takes 30 s to walk (its
    totals growing, no byte moving) and a stall timeout of 10 s."""

    def test_files_found_while_walking_are_progress_and_the_bar_says_so(self):
        self.net.walk_seconds = 30
        self.add_source(), self.add_target()
        code, out, err = self.cli("seed", "--target", "db2", "--source", "db1", "--stall-timeout", "10")
        self.assertEqual(code, EXIT_OK, err)
        lines = [line for line in out.splitlines() if line.startswith("progress:")]
        walking = [line for line in lines if "ETA ? (walking the source)" in line]
        self.assertTrue(walking, lines)
        self.assertTrue(any(re.search(r"  0 B / [1-9]\d* B\+  files 0/1\+  ", line) for line in walking),
                        walking)
        self.assertIn("1000 B / 1000 B  files 2/2", lines[-1])
