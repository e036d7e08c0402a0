"""Promotion is one step: an abort precedes it or follows it, a crash inside it is settled.

The first tests drive :mod:`orchagent.seed.promotion` through every rename it makes,
crashing at each one (an exception no handler takes, as a kill would stop the thread
there) and settling again as the next start does.  The others aim at the same windows
with real agents on loopback: the abort that arrives the instant the datadir's old
contents start moving aside, the abort just before the record is written, a kill -9 of
the receiving agent in the middle of the move, MySQL started while the seed runs.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time

from twisted.internet import defer, threads
from twisted.trial import unittest

from orchagent.seed import promotion, state, tree
from orchagent.seed.staging import Staging
from tests import seed_support as S
from tests.support.daemon import Daemon, free_port, start_daemon, wait_until

OLD_ENTRIES = 3000


def snapshot(top: str) -> dict[str, object]:
    """Every entry under ``top``: a file's bytes, a directory, a link's target."""
    found: dict[str, object] = {}
    for directory, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, top)
            if os.path.islink(path):
                found[rel] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                found[rel] = ("dir",)
            else:
                with open(path, "rb") as fh:
                    found[rel] = fh.read()
    return found


def write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


class Crash(BaseException):
    """Stops a promotion mid-way as a kill would (no handler takes it)."""


class PromotionStepsTests(unittest.TestCase):
    """Every rename of a promotion, crashed at, then settled again."""

    def make(self) -> tuple[Staging, dict, dict]:
        base = os.path.abspath(self.mktemp())
        datadir = os.path.join(base, "data")
        for name in ("ibdata1", "ib_logfile0", "old-only.ibd"):
            write(os.path.join(datadir, name), b"old " + name.encode())
        write(os.path.join(datadir, "mysql", "user.MAD"), b"old user")
        os.makedirs(os.path.join(datadir, "lost+found"))
        staging = Staging(datadir, "7")
        for name in ("ibdata1", "ib_logfile0", "new-only.ibd"):
            write(os.path.join(staging.root, name), b"new " + name.encode())
        write(os.path.join(staging.root, "mysql", "user.MAD"), b"new user")
        os.symlink("ibdata1", os.path.join(staging.root, "link"))
        old = {k: v for k, v in snapshot(datadir).items() if not k.startswith("lost+found")}
        return staging, old, snapshot(staging.root)

    def renames(self) -> int:
        staging, _, _ = self.make()
        planned = promotion.plan(staging)
        return len(planned.old) + len(planned.new)

    def crash_at(self, number: int, direction: str = promotion.FORWARD):
        """Promote (or undo, once fully promoted) and crash at rename ``number``."""
        staging, old, new = self.make()
        record = os.path.join(os.path.dirname(staging.datadir), "7.promotion")
        planned = promotion.plan(staging)
        promotion.write_record(record, planned)
        if direction == promotion.BACK:
            promotion.roll_forward(planned)
            planned.direction = promotion.BACK
            promotion.write_record(record, planned)
        calls = [0]
        real = os.rename

        def rename(a, b):
            calls[0] += 1
            if calls[0] == number:
                raise Crash()
            real(a, b)

        self.patch(os, "rename", rename)
        try:
            promotion.settle(record, promotion.read_record(record))
        except Crash:
            pass
        self.patch(os, "rename", real)
        return staging, old, new, record

    def assertNew(self, staging: Staging, old: dict, new: dict) -> None:
        here = snapshot(staging.datadir)
        aside = os.path.basename(staging.aside)
        self.assertEqual({k: v for k, v in here.items()
                          if not k.startswith(aside) and not k.startswith("lost+found")}, new)
        self.assertEqual(snapshot(staging.aside), old, "the old datadir was kept whole")
        self.assertFalse(os.path.exists(staging.root))

    def assertOld(self, staging: Staging, old: dict) -> None:
        here = snapshot(staging.datadir)
        self.assertEqual({k: v for k, v in here.items() if not k.startswith("lost+found")}, old)
        self.assertFalse(os.path.exists(staging.aside))

    def test_a_crash_at_every_rename_is_rolled_forward(self):
        total = self.renames()
        self.assertEqual(total, 9)
        for number in range(1, total + 1):
            staging, old, new, record = self.crash_at(number)
            settled = promotion.settle(record, promotion.read_record(record))
            self.assertEqual(settled, promotion.FORWARD)
            self.assertNew(staging, old, new)
            # And settled once more (a crash before the record went): the same.
            self.assertEqual(promotion.settle(record, promotion.read_record(record)), promotion.FORWARD)
            self.assertNew(staging, old, new)

    def test_a_crash_at_every_rename_of_an_undo_is_rolled_back(self):
        for number in range(1, self.renames() + 1):
            staging, old, new, record = self.crash_at(number, promotion.BACK)
            self.assertEqual(promotion.settle(record, promotion.read_record(record)), promotion.BACK)
            self.assertOld(staging, old)
            self.assertEqual(snapshot(staging.root), new, "the new tree is back in staging")

    def test_a_failed_rename_undoes_everything(self):
        for number in range(1, self.renames() + 1):
            staging, old, new = self.make()
            record = os.path.join(os.path.dirname(staging.datadir), "7.promotion")
            planned = promotion.plan(staging)
            promotion.write_record(record, planned)
            calls = [0]
            real = os.rename

            def rename(a, b, number=number):
                calls[0] += 1
                if calls[0] == number:
                    raise OSError(5, "Input/output error")
                real(a, b)

            self.patch(os, "rename", rename)
            with self.assertRaises(promotion.Undone) as caught:
                promotion.settle(record, planned)
            self.patch(os, "rename", real)
            self.assertIn("Input/output error", str(caught.exception))
            self.assertEqual(promotion.read_record(record).direction, promotion.BACK)
            self.assertOld(staging, old)


class TwoAgents:
    """A source and a target agent on loopback; the target's datadir a plain directory
    full of old entries, the source's a few files (``files``)."""

    timeout = 120

    async def agents(self, target_status: str = "false", files: dict | None = None,
                     source_extra: dict | None = None, target_extra: dict | None = None):
        base = self.base = os.path.abspath(self.mktemp())
        self.source_dir = os.path.join(base, "source-data")
        self.datadir = os.path.join(base, "target-data")
        if files is None:
            files = {"ibdata1": os.urandom(3 << 20), "mysql/user.MAD": os.urandom(5000),
                     "db/t.ibd": os.urandom(200_000)}
        for name, data in files.items():
            write(os.path.join(self.source_dir, name), data)
        for i in range(OLD_ENTRIES):
            write(os.path.join(self.datadir, f"old-{i:04}.ibd"), b"old %d" % i)
        write(os.path.join(self.datadir, "ibdata1"), b"the old system tablespace")
        self.new = snapshot(self.source_dir)
        self.old = snapshot(self.datadir)
        self.seed_port = free_port()
        common = {"SeedTransferPort": self.seed_port}
        self.source = await start_daemon(self, {
            **common, "MySQLServiceStatusCommand": "false",
            "MySQLDatadirCommand": f"echo {self.source_dir}", **(source_extra or {})},
            directory=os.path.join(base, "source"))
        self.target_config = {**common, "MySQLServiceStatusCommand": target_status,
                              "MySQLDatadirCommand": f"echo {self.datadir}", **(target_extra or {})}
        self.target = await start_daemon(self, self.target_config, directory=os.path.join(base, "target"))
        self.aside = os.path.join(base, ".target-data.orchagent-previous-9")
        self.staging = os.path.join(base, ".target-data.orchagent-seed-9")

    async def start_seed(self) -> None:
        self.assertEqual(await self.target.get("/api/receive-mysql-seed-data/9"), (200, True))
        self.assertEqual(await self.source.get("/api/send-mysql-seed-data/127.0.0.1/9", source="datadir"),
                         (200, True))

    async def ended(self, agent) -> dict:
        async def over():
            code, status = await agent.get("/api/seed-status/9")
            return code == 200 and status["State"] not in ("pending", "running", "verifying")

        await wait_until(over, timeout=60)
        return (await agent.get("/api/seed-status/9"))[1]

    def assertNewTree(self) -> None:
        here = snapshot(self.datadir)
        self.assertEqual(here, self.new)
        self.assertEqual(snapshot(self.aside), self.old, "the old datadir is kept whole, aside")
        self.assertFalse(os.path.exists(self.staging))

    def assertOldTree(self) -> None:
        self.assertEqual(snapshot(self.datadir), self.old)
        self.assertFalse(os.path.exists(self.aside))
        self.assertFalse(os.path.exists(self.staging))


class PromotionWindowTests(TwoAgents, unittest.TestCase):
    """Real agents, the windows aimed at."""

    async def test_an_abort_the_instant_promotion_begins_follows_it(self):
        await self.agents()
        await self.start_seed()
        await threads.deferToThread(_wait_for_path, self.aside, 60)
        # orchestrator's abort: the source, then the target.
        self.assertEqual(await self.source.get("/api/abort-seed/9"), (200, True))
        self.assertEqual(await self.target.get("/api/abort-seed/9"), (200, True))
        target, source = await self.ended(self.target), await self.ended(self.source)
        self.assertEqual((target["State"], source["State"]), ("completed", "completed"), (target, source))
        self.assertEqual(await self.target.get("/api/seed-command-succeeded/9"), (200, True))
        self.assertNewTree()

    async def test_an_abort_just_before_the_record_precedes_it(self):
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        script = os.path.join(base, "status.sh")
        hit, release = os.path.join(base, "hit"), os.path.join(base, "release")
        write(script, b"exit 1\n")
        await self.agents(f"sh {script}")
        # The receiver asks whether MySQL runs right before it records the promotion: hold
        # that question open once every byte is staged (not the one at receive-mysql-seed-
        # data) until both aborts are answered, so the abort lands inside it however slow
        # the machine is (a fixed sleep let a loaded CI machine answer after it).  The wait
        # is capped at 60 s so a broken agent cannot hang the test.
        staged, sent = os.path.join(self.staging, "ibdata1"), os.path.join(self.source_dir, "ibdata1")
        write(script, (f"if cmp -s {staged} {sent}; then touch {hit}; i=0; "
                       f"while [ ! -e {release} ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done; "
                       f"fi; exit 1\n").encode())
        await self.start_seed()
        await threads.deferToThread(_wait_for_path, hit, 60)
        self.assertTrue(os.path.exists(self.staging))
        self.assertEqual(await self.source.get("/api/abort-seed/9"), (200, True))
        self.assertEqual(await self.target.get("/api/abort-seed/9"), (200, True))
        open(release, "w").close()
        target, source = await self.ended(self.target), await self.ended(self.source)
        self.assertEqual((target["State"], source["State"]), ("aborted", "aborted"), (target, source))
        self.assertEqual(await self.target.get("/api/seed-command-succeeded/9"), (200, False))
        await wait_until(lambda: not os.path.exists(self.staging), timeout=15)  # removed after the state
        self.assertOldTree()

    async def test_a_status_command_that_answers_nothing_keeps_the_old_datadir(self):
        """The status command asked right before the promotion hangs and is killed at
        CommandTimeoutSeconds: nobody can say MySQL is stopped, so the verified tree is
        not moved in.  Read as "stopped", the tree went in under a server that might run."""
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        script = os.path.join(base, "status.sh")
        write(script, b"exit 1\n")
        await self.agents(f"sh {script}", target_extra={"CommandTimeoutSeconds": 1})
        staged, sent = os.path.join(self.staging, "ibdata1"), os.path.join(self.source_dir, "ibdata1")
        write(script, f"if cmp -s {staged} {sent}; then exec sleep 60; fi; exit 1\n".encode())
        await self.start_seed()
        target = await self.ended(self.target)
        self.assertEqual(target["State"], "failed")
        self.assertIn("cannot tell whether MySQL is running: command shell timed out after 1s", target["Error"])
        self.assertIn("the verified seed 9 was not moved into", target["Error"])
        await wait_until(lambda: not os.path.exists(self.staging), timeout=15)
        self.assertOldTree()

    async def test_the_receiver_killed_while_moving_aside_then_aborted(self):
        await self.agents()
        await self.start_seed()
        await threads.deferToThread(_wait_for_path, self.aside, 60)
        os.kill(self.target.pid, signal.SIGKILL)
        await self.target.wait_exit()
        partial = len(os.listdir(self.aside))
        again = Daemon(os.path.join(self.base, "target"), {**self.target_config, "HTTPPort": self.target.port})
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(again.stop()))
        await again.start()
        self.assertEqual(await again.get("/api/abort-seed/9"), (200, True))
        target, source = await self.ended(again), await self.ended(self.source)
        self.assertEqual((target["State"], source["State"]), ("completed", "completed"), (target, source))
        self.assertNewTree()
        self.assertIn("settling that first", again.output())
        self.assertLess(partial, OLD_ENTRIES + 1, "the kill landed inside the move")

    async def test_mysql_started_during_a_receive(self):
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        running = os.path.join(base, "running")
        await self.agents(f"test -e {running}")
        self.assertEqual(await self.target.get("/api/receive-mysql-seed-data/9"), (200, True))
        code, body = await self.target.get("/api/mysql-start")
        self.assertEqual(code, 500)
        self.assertEqual(body["Message"], "seed 9 is being received into the datadir: refusing to start "
                                          "MySQL until it ends (abort it, or wait)")
        code, body = await self.target.get("/api/delete-mysql-datadir")
        self.assertIn("seed 9 is being received into the datadir", body["Message"])
        # MySQL starts anyway (by hand, outside the agent): the seed is not swapped under it.
        open(running, "w").close()
        self.assertEqual(await self.source.get("/api/send-mysql-seed-data/127.0.0.1/9", source="datadir"),
                         (200, True))
        target = await self.ended(self.target)
        self.assertEqual(target["State"], "failed")
        self.assertIn("MySQL is running on this host: the verified seed 9 was not moved", target["Error"])
        self.assertEqual(snapshot(self.datadir), self.old)
        self.assertFalse(os.path.exists(self.staging))
        source = await self.ended(self.source)
        self.assertEqual(source["State"], "failed")


class StagedDamageTests(TwoAgents, unittest.TestCase):
    """Staging is checked on disk before it replaces anything (#16, item 6)."""

    FILES = {"a.frm": b"f" * 1000, "ibdata1": os.urandom(24 << 20)}
    SLOW = {"SeedRateLimitBytesPerSec": 6 << 20}

    async def halfway(self) -> str:
        """Wait until half of ibdata1 is staged; its staged path."""
        async def half():
            code, status = await self.target.get("/api/seed-status/9")
            return code == 200 and status["BytesDone"] >= 12 << 20

        await wait_until(half, timeout=60)
        return os.path.join(self.staging, "ibdata1")

    async def assertRefused(self, why: str) -> None:
        target = await self.ended(self.target)
        self.assertEqual(target["State"], "failed", target)
        self.assertRegex(target["Error"], why)
        await wait_until(lambda: not os.path.exists(self.staging), timeout=15)
        self.assertOldTree()
        self.assertEqual((await self.ended(self.source))["State"], "failed")

    async def test_a_staged_file_deleted_fails_the_seed(self):
        await self.agents(files=self.FILES, source_extra=self.SLOW,
                          target_extra={"SeedVerifyOnDisk": "off"})
        await self.start_seed()
        os.unlink(await self.halfway())
        # Written on through the descriptors it holds, the file is found missing before the
        # promotion; a chunk that had to open it again, or the last chunk's finish of the
        # file, finds it gone (never made anew).
        await self.assertRefused(
            re.escape(f"seed 9 was not moved into {self.datadir}: ibdata1 is missing from staging")
            + "|" + re.escape("could not be written: ibdata1 disappeared from staging")
            + "|" + re.escape("cannot finish ibdata1: [Errno 2] ibdata1 disappeared from staging"))

    async def test_a_staged_file_resized_fails_the_seed(self):
        await self.agents(files=self.FILES, source_extra=self.SLOW,
                          target_extra={"SeedVerifyOnDisk": "off"})
        await self.start_seed()
        os.truncate(await self.halfway(), 30 << 20)
        await self.assertRefused(re.escape(
            f"seed 9 was not moved into {self.datadir}: ibdata1 in staging holds {30 << 20} bytes, "
            f"not the {24 << 20} received"))

    async def test_staged_bytes_flipped_are_found_by_reading_back(self):
        await self.agents(files=self.FILES, source_extra=self.SLOW, target_extra={"SeedVerifyOnDisk": "on"})
        await self.start_seed()
        offset = await self.flip(await self.halfway())
        await self.assertRefused(re.escape(
            f"seed 9 was not moved into {self.datadir}: ibdata1 at offset {offset} in staging "
            "differs from what was received and verified"))

    async def test_auto_reads_back_a_seed_that_resumed(self):
        await self.agents(files=self.FILES, source_extra=self.SLOW)
        await self.start_seed()
        offset = await self.flip(await self.halfway())
        # The source's agent dies and comes back: the seed resumes, the flipped chunk is
        # one the receiver already has.
        os.kill(self.source.pid, signal.SIGKILL)
        await self.source.wait_exit()
        again = Daemon(os.path.join(self.base, "source"), {
            "SeedTransferPort": self.seed_port, "MySQLServiceStatusCommand": "false",
            "MySQLDatadirCommand": f"echo {self.source_dir}", "HTTPPort": self.source.port})
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(again.stop()))
        await again.start()
        self.source = again
        target = await self.ended(self.target)
        self.assertGreaterEqual(target["Resumes"], 1)
        await self.assertRefused(re.escape(
            f"seed 9 was not moved into {self.datadir}: ibdata1 at offset {offset} in staging "
            "differs from what was received and verified"))

    async def flip(self, staged: str) -> int:
        """Flip a byte of a chunk the receiver wrote and journaled; its offset."""
        journal = os.path.join(self.base, "target", "state", "seeds", "9.journal")
        with open(journal, "rb") as fh:
            records = state.read_journal(fh.read())
        offset = next(offset for _, offset, length, _ in records if length == 2 << 20)
        with open(staged, "r+b") as fh:  # a chunk that was written and verified
            fh.seek(offset + 100)
            byte = fh.read(1)
            fh.seek(offset + 100)
            fh.write(bytes([byte[0] ^ 0xFF]))
        return offset


def _wait_for_path(path: str, timeout: float) -> None:
    """Spin (in a thread) until ``path`` exists: the windows here last milliseconds."""
    deadline = time.monotonic() + timeout
    while not os.path.lexists(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.0002)



def in_process_pair(testcase):
    """A source tree and two seed managers in this process (receiver, sender) on a free
    port: ``(base, src, dst, port, receiver, sender)``."""
    base = os.path.abspath(testcase.mktemp())
    src, dst = os.path.join(base, "src"), os.path.join(base, "dst")
    os.makedirs(dst)
    S.make_tree(src, files=4)
    port = S.free_port()
    receiver = S.make_manager(testcase, os.path.join(base, "r"), dst, port)
    sender = S.make_manager(testcase, os.path.join(base, "s"), src, port, snapshot=src)
    return base, src, dst, port, receiver, sender


class LeftoverRecordTests(unittest.TestCase):
    """The record of a promotion that finished, but could not be removed (the state
    directory's fsync failed), neither holds the seed nor changes anything later."""

    async def test_a_record_that_cannot_be_removed(self):
        base, src, dst, port, receiver, sender = in_process_pair(self)

        def failing(path):
            raise OSError(errno.EDQUOT, "Disk quota exceeded", path)

        real = promotion.remove_record
        self.patch(promotion, "remove_record", failing)
        await receiver.receive("3")
        await sender.send(f"127.0.0.1:{port}", "3", source="snapshot")
        self.assertEqual((await S.finished(receiver, "3"))["State"], "completed")
        self.assertEqual((await S.finished(sender, "3"))["State"], "completed")
        self.assertEqual(S.snapshot_tree(dst), S.snapshot_tree(src))
        record = receiver.store.path("3", promotion.SUFFIX)
        self.assertTrue(os.path.exists(record))

        # The next start settles it again: forward, where everything already is.
        await receiver.stopService()
        self.patch(promotion, "remove_record", real)
        again = S.make_manager(self, os.path.join(base, "r"), dst, port)
        await S.wait_for(lambda: not os.path.exists(record))
        self.assertEqual((await again.status("3"))["State"], "completed")
        self.assertEqual(S.snapshot_tree(dst), S.snapshot_tree(src))


class VanishedStagedFileTests(unittest.TestCase):
    """A staged file deleted under the seed is never made anew by a later write."""

    def test_a_reopen_of_a_vanished_file_fails_naming_it(self):
        base = os.path.abspath(self.mktemp())
        datadir = os.path.join(base, "data")
        os.makedirs(datadir)
        staging = Staging(datadir, "4")
        os.makedirs(staging.root)
        entry = tree.Entry("ibdata1", tree.FILE, 8 << 20, 0o640, 0, "root", "root", 0, 0)
        os.close(staging._open(0, entry))
        os.unlink(os.path.join(staging.root, "ibdata1"))
        with self.assertRaises(OSError) as caught:
            staging.finish_file(0, entry)
        self.assertIn("ibdata1 disappeared from staging", caught.exception.strerror)
        self.assertFalse(os.path.exists(os.path.join(staging.root, "ibdata1")))


class UnsavedCompletionTests(unittest.TestCase):
    """A seed whose "completed" could not be saved keeps its promotion record, so that the
    next start finds the tree in place and completes it, not fails it."""

    async def test_the_record_stays_until_the_completion_is_saved(self):
        base, src, dst, port, receiver, sender = in_process_pair(self)
        real_save = receiver.store.save

        def save(record):
            if record.state == "completed":
                raise OSError(errno.EIO, "Input/output error", "3.json.tmp")
            real_save(record)

        self.patch(receiver.store, "save", save)
        await receiver.receive("3")
        await sender.send(f"127.0.0.1:{port}", "3", source="snapshot")
        self.assertEqual((await S.finished(receiver, "3"))["State"], "completed")
        self.assertEqual((await S.finished(sender, "3"))["State"], "completed")
        record = receiver.store.path("3", promotion.SUFFIX)
        self.assertTrue(os.path.exists(record), "kept: the state on disk says promoting")

        await receiver.stopService()
        again = S.make_manager(self, os.path.join(base, "r"), dst, port)
        await S.wait_for(lambda: not os.path.exists(record))
        self.assertEqual((await again.status("3"))["State"], "completed")
        self.assertEqual(S.snapshot_tree(dst), S.snapshot_tree(src))
