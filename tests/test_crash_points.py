"""Crash points and I/O errors on the durable path (issue #17).

The findings of ``python3 -m reliability.crashpoints``, each at unit level, then a fast
slice of the enumerator itself (root, strace): a few crash points and I/O errors of a
datadir seed and of a copy restore, and one point of the btrfs restore, of backup mountlv
and of a restore from a backup (``reliability.crashops``), none of which may end broken.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from unittest import mock

from twisted.internet import defer
from twisted.trial import unittest

from orchagent import swap
from orchagent.host import facts
from orchagent.seed import promotion
from orchagent.seed.staging import Staging


def write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


def tree_of(top: str) -> dict[str, bytes | None]:
    found: dict[str, bytes | None] = {}
    for directory, dirs, files in os.walk(top):
        for name in dirs:
            found[os.path.relpath(os.path.join(directory, name), top)] = None
        for name in files:
            with open(os.path.join(directory, name), "rb") as fh:
                found[os.path.relpath(os.path.join(directory, name), top)] = fh.read()
    return found


class Stop(Exception):
    """An I/O error (or a crash) at the n-th removal."""


class InterruptedEmptyingTests(unittest.TestCase):
    """delete-mysql-datadir stopped half-way must be repeatable (the crash points found
    the repeat refused: "does not look like a MySQL datadir", the datadir half empty)."""

    def make(self) -> str:
        datadir = os.path.abspath(self.mktemp())
        for name in ("ibdata1", "auto.cnf", "master.info", "host-relay-bin.000001", "zz.log",
                     "aa.txt", "db/t1.ibd", "db/t2.frm", "mysql/user.frm", "mysql/db.opt"):
            write(os.path.join(datadir, name), b"x")
        return datadir

    def test_every_interruption_leaves_a_recognised_datadir(self):
        real_unlink, real_rmtree = os.unlink, shutil.rmtree
        for stop_at in range(1, 12):  # more removals than the tree has
            datadir = self.make()
            seen = [0]

            def stopping(path, *a, _real=real_unlink, **kw):
                seen[0] += 1
                if seen[0] == stop_at:
                    raise Stop(path)
                return _real(path, *a, **kw)

            def stopping_tree(path, *a, **kw):
                seen[0] += 1
                if seen[0] == stop_at:
                    raise Stop(path)
                return real_rmtree(path, *a, **kw)

            with mock.patch.object(facts.os, "unlink", stopping), \
                    mock.patch.object(facts.shutil, "rmtree", stopping_tree):
                try:
                    facts._empty_directory(datadir)
                except Stop:
                    pass
            names = set(os.listdir(datadir))
            self.assertTrue(not names or facts._holds_datadir_markers(datadir, names),
                            f"stopped at removal {stop_at}: {sorted(names)} is no longer a datadir")
            facts._empty_directory(datadir)
            self.assertEqual(os.listdir(datadir), [])


class RecordWithoutStagingTests(unittest.TestCase):
    """A promotion record that outlived a seed which failed before its promotion began
    (the record renamed in place, then the directory fsync failed: EDQUOT/EIO at that
    fsync) was settled forward at the next start: the old tree moved aside, nothing moved
    in, an empty datadir and a seed reported completed."""

    def test_forward_without_staging_undoes_instead(self):
        base = os.path.abspath(self.mktemp())
        datadir = os.path.join(base, "data")
        for name in ("ibdata1", "db/t.ibd", "mysql/user.MAD"):
            write(os.path.join(datadir, name), b"old " + name.encode())
        staging = Staging(datadir, "5")
        for name in ("ibdata1", "db/t.ibd"):
            write(os.path.join(staging.root, name), b"new " + name.encode())
        old = tree_of(datadir)
        record = os.path.join(base, "5.promotion")
        planned = promotion.plan(staging)
        promotion.write_record(record, planned)
        shutil.rmtree(staging.root)  # the failed seed's staging, discarded
        with self.assertRaises(promotion.Undone):
            promotion.settle(record, promotion.read_record(record))
        self.assertEqual(tree_of(datadir), old)
        self.assertFalse(os.path.exists(staging.aside))

    def test_a_finished_promotion_settles_forward_again(self):
        base = os.path.abspath(self.mktemp())
        datadir = os.path.join(base, "data")
        write(os.path.join(datadir, "ibdata1"), b"old")
        staging = Staging(datadir, "6")
        write(os.path.join(staging.root, "ibdata1"), b"new")
        record = os.path.join(base, "6.promotion")
        planned = promotion.plan(staging)
        promotion.write_record(record, planned)
        self.assertEqual(promotion.settle(record, planned), promotion.FORWARD)
        self.assertEqual(promotion.settle(record, promotion.read_record(record)), promotion.FORWARD)
        self.assertEqual(tree_of(datadir), {"ibdata1": b"new"})


class UnfinishedRecordWriteTests(unittest.TestCase):
    """A restore killed while its swap record was being written (the crash point at the
    write of ``restore-*.json.tmp``) left that temporary file in StateDir/restores for
    good: recovery only read ``*.json``."""

    async def test_recovery_removes_a_record_write_cut_short(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        write(os.path.join(directory, "restore-20260101T000000Z.json.tmp"), b'{"key": "rest')
        write(os.path.join(directory, "unrelated.txt"), b"kept")
        journal = swap.SwapJournal(directory, runner=None, thread=defer.maybeDeferred)
        self.assertEqual(await journal.recover(lambda: defer.succeed(None)), [])
        self.assertEqual(os.listdir(directory), ["unrelated.txt"])


class FailedRecordWriteTests(unittest.TestCase):
    """A restore whose first swap record could not be written (ENOSPC/EDQUOT/EROFS at
    the write, the fsync or the rename of ``restore-*.json.tmp``, or at the fsync of
    StateDir/restores once renamed) failed as it should, but left the temporary file or
    the record behind: nothing had begun, yet the next restore was refused until an
    agent start settled it."""

    def journal(self) -> swap.SwapJournal:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        return swap.SwapJournal(directory, runner=None, thread=defer.maybeDeferred)

    async def fail_open_at(self, target, name: str) -> list[str]:
        journal = self.journal()
        opened = journal.swap("restore-20260101T000000Z", "restore",
                              [("/nowhere/datadir", "/nowhere/datadir.replaced")])
        real = getattr(target, name)
        calls = [0]

        def failing(*a, **kw):
            calls[0] += 1
            if calls[0] == 1:
                raise OSError(28, "No space left on device")
            return real(*a, **kw)

        with mock.patch.object(target, name, failing):
            with self.assertRaises(OSError):
                await opened.open()
        return os.listdir(journal.directory)

    async def test_the_temporary_record_goes_when_its_fsync_fails(self):
        self.assertEqual(await self.fail_open_at(swap.os, "fsync"), [])

    async def test_the_temporary_record_goes_when_its_rename_fails(self):
        self.assertEqual(await self.fail_open_at(swap.os, "replace"), [])

    async def test_the_record_goes_when_the_directory_fsync_fails(self):
        self.assertEqual(await self.fail_open_at(swap, "_fsync_dir"), [])


class UnsyncedSwapTests(unittest.TestCase):
    """EIO/EROFS at the fsync of the datadir's parent once a restore's renames were made
    answered "internal error: [Errno 5] Input/output error": no file, no call, nothing
    said of the datadir already swapped or of the record kept."""

    async def renamed(self) -> tuple[str, "swap.SwapJournal", "swap.Swap"]:
        """A swap whose one rename is made (by hand: no runner here), not yet closed."""
        base = os.path.abspath(self.mktemp())
        journal = swap.SwapJournal(os.path.join(base, "restores"), runner=None,
                                   thread=defer.maybeDeferred)
        opened = journal.swap("restore-20260101T000000Z", "restore of s1",
                              [(os.path.join(base, "data", "d"), os.path.join(base, "data", "d.old"))])
        await opened.open()
        opened.begun = 1
        return base, journal, opened

    async def test_a_failed_fsync_at_close_names_it_and_keeps_the_record(self):
        base, _, opened = await self.renamed()

        def failing(path):
            raise OSError(5, "Input/output error")

        with mock.patch.object(swap, "_fsync_dir", failing):
            with self.assertRaises(swap.SwapStuck) as caught:
                await opened.close()
        self.assertIn(os.path.join(base, "data"), caught.exception.message)
        self.assertIn("fsync", caught.exception.message)
        self.assertTrue(os.path.exists(opened.path))

    async def test_a_record_removal_not_known_durable_fails_nothing(self):
        """ENOSPC at the fsync of StateDir/restores once the record of a complete swap
        was removed (restore_copy error point #67): the restore answered "internal
        error: [Errno 28] No space left on device" with the datadir already new.  A
        record that came back would be settled again: the restore succeeded, said with
        a warning."""
        base, journal, opened = await self.renamed()
        os.makedirs(os.path.join(base, "data"))
        real, said = swap._fsync_dir, []

        def failing_for_the_journal(path):
            if path == journal.directory:
                raise OSError(28, "No space left on device")
            real(path)

        self.patch(swap.log, "warn", lambda text, **kw: said.append(text.format(**kw)))
        with mock.patch.object(swap, "_fsync_dir", failing_for_the_journal):
            await opened.close()
        self.assertEqual(os.listdir(journal.directory), [])
        self.assertEqual(len(said), 1)
        self.assertIn("restore of s1: settled, but the removal of its record", said[0])
        self.assertIn("No space left on device", said[0])


class SeedStateWriteTests(unittest.TestCase):
    """EIO at the write of ``<seed>.manifest.tmp`` (ENOSPC at its rename) failed the seed
    cleanly but left the temporary file in StateDir/seeds for good, the write's error
    naming no file; and a short write was renamed in as the whole file."""

    def store(self):
        from orchagent.seed.state import StateStore
        store = StateStore(os.path.abspath(self.mktemp()))
        store.open()
        store.write("s1", "manifest", b"before")
        return store

    def test_a_failed_write_leaves_the_file_and_no_temporary(self):
        for name in ("write", "replace"):
            store = self.store()
            with mock.patch.object(os, name, mock.Mock(side_effect=OSError(5, "Input/output error"))):
                with self.assertRaises(OSError) as caught:
                    store.write("s1", "manifest", b"after")
            self.assertEqual(sorted(os.listdir(store.root)), ["s1.manifest"], name)
            self.assertIn("s1.manifest.tmp", str(caught.exception), name)
            self.assertEqual(store.read("s1", "manifest"), b"before")

    def test_a_short_write_is_continued(self):
        store = self.store()
        real = os.write
        with mock.patch.object(os, "write", lambda fd, data: real(fd, bytes(data[:3]))):
            store.write("s1", "manifest", b"0123456789")
        self.assertEqual(store.read("s1", "manifest"), b"0123456789")


class CutPromotionRecordWriteTests(unittest.TestCase):
    """A crash while the promotion record was being written (the write or the rename of
    ``<id>.promotion.tmp``) left that temporary file in StateDir/seeds for good when the
    seed then failed instead of resuming: a streamed hot seed, which a restart fails
    (hot_seed crash points #26 and #28), or any seed failed or aborted after its resume."""

    async def test_a_failed_seed_leaves_no_promotion_record_write(self):
        from tests import seed_support as S

        base = os.path.abspath(self.mktemp())
        datadir = os.path.join(base, "data")
        write(os.path.join(datadir, "ibdata1"), b"old")
        manager = S.make_manager(self, os.path.join(base, "r"), datadir, S.free_port())
        await manager.receive("7")
        cut = manager.store.path("7", promotion.SUFFIX) + ".tmp"
        write(cut, b'{"datadir": "')  # what the crash left
        await manager.abort("7")
        await S.wait_for(lambda: manager.records["7"].terminal)
        await S.wait_for(lambda: "7" not in manager.jobs)
        self.assertFalse(os.path.exists(cut), os.listdir(manager.store.root))
        self.assertEqual(tree_of(datadir), {"ibdata1": b"old"})


def stubbed_backups(case: unittest.TestCase, make, runner=None):
    """orchagent.backups.Backups over a temporary StateDir whose backup "full1" needs no
    tool: its work copy goes to StateDir/backups/mounted-full1 and ``make`` makes it.
    Returns the backups, StateDir, the work copy's root and the mount point."""
    from orchagent import backups as backups_module
    from orchagent.backups.prepare import Place
    from orchagent.config import Config

    base = os.path.abspath(case.mktemp())
    state_dir, mnt = os.path.join(base, "state"), os.path.join(base, "mnt")
    os.makedirs(mnt)
    config = Config(state_dir=state_dir, snapshot_mount_point=mnt,
                    backup_directories=[os.path.join(base, "backups")])
    backups = backups_module.Backups(config, runner=runner, reactor=None, host=None, service=None)
    root = os.path.join(state_dir, "backups", "mounted-full1")
    backup = mock.Mock(path=os.path.join(base, "backups", "full1"))
    backup.name = "full1"

    async def usable(name):
        return backup, [backup]

    async def choose(chain, candidates, what):
        return Place(root, False)

    async def remove(path):
        shutil.rmtree(path, ignore_errors=True)

    async def nothing(*args):
        return None

    backups._usable, backups._datadir = usable, nothing
    backups.preparer.choose, backups.preparer.make, backups.preparer.remove = choose, make, remove
    backups.mount_point.require_free = lambda: mnt
    return backups, state_dir, root, mnt


async def make_prepared(chain, place, owner_of):
    write(os.path.join(place.root, "data", "ibdata1"), b"prepared")
    return os.path.join(place.root, "data")


class UnrecordedBackupWorkCopyTests(unittest.TestCase):
    """mountlv whose record of the mounted copy could not be written (EIO at the write of
    ``StateDir/backups/mounted.json.tmp``: backup_mount error point #488) failed with an
    internal error and left the prepared work copy, a whole copy of the backup, under
    StateDir, and the temporary record: umount found no record and removed nothing."""

    async def test_the_work_copy_goes_when_its_record_cannot_be_written(self):
        import errno

        from orchagent import backups as backups_module
        from orchagent.errors import AgentError

        backups, state_dir, root, _ = stubbed_backups(self, make_prepared)

        def failing(*args, **kwargs):
            raise OSError(errno.EIO, "Input/output error")

        with mock.patch.object(backups_module.json, "dump", failing):
            with self.assertRaises(AgentError) as caught:
                await backups.mount("full1")
        self.assertIn("mounted.json.tmp", caught.exception.message)
        self.assertFalse(os.path.exists(root))
        self.assertEqual(os.listdir(os.path.join(state_dir, "backups")), [])


class FailedWorkCopyRemovalTests(unittest.TestCase):
    """A failed mountlv whose work copy could not be removed either (backup_mount error
    point #485 with every errno: strace counts per process, so the error that failed
    ``cp`` hit the ``rm -rf`` of the copy too) left the copy under StateDir with no
    record: umount did not know of it.  Then, recorded, it was still left: umount goes
    to the backups only while a backup is mounted."""

    async def test_umount_removes_a_copy_the_failed_mountlv_could_not(self):
        from orchagent.errors import CommandFailed
        from orchagent.snapshots import Snapshots

        async def make(chain, place, owner_of):
            write(os.path.join(place.root, "data", "bk", "t.ibd"), b"half copied")
            raise CommandFailed("command rm exited with status 1: cannot remove ...")

        async def nothing(*args):
            return None

        class Backend:
            unmount = staticmethod(nothing)

        backups, state_dir, root, _ = stubbed_backups(self, make)
        backups.mount_point.entry = lambda: None
        backups.mount_point.unmount, backups.mount_point.state = nothing, nothing
        with self.assertRaises(CommandFailed):
            await backups.mount("full1")
        self.assertTrue(os.path.exists(root))
        # /api/umount, with no backup mounted: the snapshot backend's unmount, and the
        # stale copy removed (it went to the backend alone: backup_mount error points
        # #489-#491 with every errno, the copy left after umount answered success).
        snapshots = Snapshots(backups.config, runner=None, backends={"copy": Backend()},
                              detect=lambda: defer.succeed("copy"), backups=backups)
        await snapshots.unmount()
        self.assertFalse(os.path.exists(root))
        self.assertEqual(os.listdir(os.path.join(state_dir, "backups")), [])


class UnreadableMountRecordTests(unittest.TestCase):
    """umount when the record of the mounted copy cannot be read (EIO, EDQUOT at its
    openat: backup_mount error points #729, #731) took it for no record: it answered
    success, the backup still mounted and its copy in place."""

    async def test_umount_fails_naming_the_record(self):
        import builtins
        import errno

        from orchagent.errors import AgentError

        backups, state_dir, root, _ = stubbed_backups(self, make_prepared)
        record = os.path.join(state_dir, "backups", "mounted.json")
        write(record, json.dumps({"name": "full1", "root": root, "data": os.path.join(root, "data")}).encode())
        write(os.path.join(root, "data", "ibdata1"), b"prepared")
        real_open = builtins.open

        def failing(path, *args, **kwargs):
            if path == record:
                raise OSError(errno.EIO, "Input/output error", path)
            return real_open(path, *args, **kwargs)

        with mock.patch.object(builtins, "open", failing):
            with self.assertRaises(AgentError) as caught:
                await backups.unmount()
        self.assertEqual(caught.exception.message, f"cannot read {record}, the record of the mounted "
                                                   "backup's work copy: Input/output error")
        self.assertTrue(os.path.exists(os.path.join(root, "data", "ibdata1")))
        self.assertTrue(os.path.exists(record))


class MountAnsweredFailedTests(unittest.TestCase):
    """mountlv whose answer could not be made once the copy was mounted (ENOSPC, EDQUOT,
    EROFS at the openat of the mount point, reading its disk usage: backup_mount error
    point #491 in a run with every errno) failed, and left the backup's copy mounted
    and its work copy in place."""

    async def test_a_failed_answer_unmounts_and_removes_the_copy(self):
        from orchagent.errors import AgentError

        mounted = []

        class Runner:
            async def run(self, argv, **kwargs):
                mounted.append(argv[-2])

        backups, state_dir, root, mnt = stubbed_backups(self, make_prepared, Runner())

        async def unmount():
            mounted.clear()

        async def state(lv_path=""):
            raise AgentError(f"cannot read directory {mnt}: No space left on device")

        backups.mount_point.entry = lambda: mock.Mock(read_only=True) if mounted else None
        backups.mount_point.unmount, backups.mount_point.state = unmount, state
        with self.assertRaises(AgentError) as caught:
            await backups.mount("full1")
        self.assertIn("cannot read directory", caught.exception.message)
        self.assertEqual(mounted, [], "unmounted")
        self.assertFalse(os.path.exists(root))
        self.assertEqual(os.listdir(os.path.join(state_dir, "backups")), [])


class SkippedAriaRecoveryTests(unittest.TestCase):
    """``mariabackup --prepare`` that cannot open an Aria table (EDQUOT/EROFS at the openat
    of the copy's ``bk`` directory: backup_mount error points #454 and #471) prints
    ``***WARNING: ./bk/a could not be opened: Error: 122``, skips that table's recovery and
    exits 0: the agent mounted (or would restore, or promote as a hot seed) a copy whose
    Aria table differed from the prepared backup."""

    async def test_a_table_the_recovery_could_not_open_fails_the_prepare(self):
        from orchagent.backups.prepare import Preparer
        from orchagent.config import Config
        from orchagent.errors import AgentError
        from orchagent.process import CommandResult

        output = (b"[00] 2026-12-05 02:59:59 Renaming ./bk/t.new to ./bk/t.ibd\n"
                  b"***WARNING: ./bk/a could not be opened: Error: 122\n"
                  b"[00] 2026-12-05 02:59:59 completed OK!\n")

        class Runner:
            async def run(self, argv, **kwargs):
                return CommandResult(tuple(argv), 0, None, b"", output, 0.1)

        class Tools:
            def installed(self, tool):
                return True

            @staticmethod
            def prepare_defaults(data):
                return []

        preparer = Preparer(Config(), Runner(), Tools(), None, thread=lambda f, *a: defer.succeed(f(*a)))
        with self.assertRaises(AgentError) as caught:
            await preparer.prepare("mariabackup", "/nowhere/data", [])
        self.assertIn("./bk/a could not be opened: Error: 122", caught.exception.message)
        self.assertIn("--prepare", caught.exception.message)


class SkippedAriaRecoveryHotSeedTests(unittest.TestCase):
    """The same ``--prepare`` of a streamed hot seed, in the target's staging: the seed
    was promoted with the table unrecovered.  Real servers and managers
    (tests.test_backups_hot_stream), the target's mariabackup wrapped to print that
    warning after a real, successful prepare."""

    timeout = 180

    def setUp(self):
        from tests.test_backups_hot_stream import StreamedHotSeedTests, wrap_mariabackup

        StreamedHotSeedTests.setUp(self)
        wrap_mariabackup(self, '{real} "$@"; code=$?; '
                               "echo '***WARNING: ./bk/a could not be opened: Error: 122' >&2; "
                               "exit $code")

    def our_processes(self, seed: str) -> list[str]:
        from tests.test_backups_hot_stream import StreamedHotSeedTests

        return StreamedHotSeedTests.our_processes(self, seed)

    async def test_the_hot_seed_fails_and_the_datadir_is_untouched(self):
        from tests.test_backups_hot_stream import StreamedHotSeedTests as T

        T.servers(self)
        self.source = T.manager(self, "source", self.source_db)
        self.target = T.manager(self, "target", self.target_db)
        await T.start_seed(self, "s9")
        sent, received = await T.ended(self, "s9")
        self.assertEqual(received["State"], "failed", received)
        self.assertIn("hot seed s9: step prepare failed: mariabackup --prepare exited 0, but its "
                      "Aria recovery left a table unrecovered: ./bk/a could not be opened: Error: 122",
                      received["Error"])
        self.assertNotEqual(sent["State"], "completed")
        await T.assert_target_untouched(self, "s9")


class SeedVerdictTests(unittest.TestCase):
    """The enumerator's verdicts on a seed's end (no agent, no strace: a world of
    directories and a fake agent).  Its rerun of 2026-12-04 called broken a completed seed
    whose completion could not be saved and whose promotion record was therefore kept
    (cb511df: the next start settles it), and a receive refused at an error point then
    repeated, after the restart meant to read the same end, as a new seed."""

    def world(self):
        from reliability import crashpoints
        base = os.path.abspath(self.mktemp())
        world = crashpoints.World(base, 1)
        world.fs = os.path.join(base, "fs")
        world.datadir = os.path.join(world.fs, "mysql")
        world.state_dir = os.path.join(world.fs, "state")
        os.makedirs(os.path.join(world.state_dir, "seeds"))
        new = os.path.join(base, "new")
        crashpoints.make_tree(new, 1, b"new")
        world.new = crashpoints.manifest(new)
        world.reset()
        return world, new

    def completed_with_record(self, world, new):
        from reliability import crashpoints
        op = crashpoints.DatadirSeed(world)
        op.prepare()
        os.rename(world.datadir, os.path.join(world.fs, f".mysql.orchagent-previous-{op.seed}"))
        shutil.copytree(new, world.datadir, symlinks=True)
        record = os.path.join(world.state_dir, "seeds", f"{op.seed}.promotion")
        write(record, b"{}")
        end = {"sender": {"State": "completed"}, "receiver": {"State": "completed"}}
        point = crashpoints.Point(97, "openat", "x", 4, True, "openat x", "error")
        return op, end, point, record

    def test_a_completion_not_saved_is_recovering_then_settled(self):
        world, new = self.world()
        op, end, point, record = self.completed_with_record(world, new)
        self.assertEqual(op.check(end, point, "EIO").verdict, "recovering")
        self.assertEqual(op.check(end, None, None).verdict, "BROKEN")  # no fault: a leftover
        os.unlink(record)  # what the next start does
        self.assertEqual(op.check(end, point, "EIO").verdict, "verified")

    def test_a_refused_receive_is_not_repeated_after_the_restart(self):
        from reliability import crashpoints
        world, _ = self.world()
        asked = []

        class Agent:
            async def get(self, path, **params):
                asked.append(path)
                return 404, {"Error": "no such seed"}

        world.source = world.target = Agent()
        op = crashpoints.DatadirSeed(world)
        op.prepare()
        op.sent, op.refused = False, "receive: the seed engine process has not been ready for 30 s"
        end = defer.Deferred.fromCoroutine(op.finish(None, crashed=True, restarted=True))
        self.assertEqual(self.successResultOf(end), {"refused": op.refused})
        self.assertNotIn(f"/api/receive-mysql-seed-data/{op.seed}", asked)
        self.assertEqual(op.check({"refused": op.refused}, None, "ENOSPC").verdict, "failed-clean")


class UnreadableSavedIdentitiesTests(unittest.TestCase):
    """The identities a sender's walk saved (``<id>.pins`` in its StateDir) unreadable
    when the seed is sent again (sender_seed error points at their ``openat``): the seed
    failed saying "cannot read the seed source", blaming the source for a file of the
    agent's own."""

    async def test_the_error_names_the_saved_identities_not_the_source(self):
        import errno

        from twisted.internet import reactor

        from orchagent.seed import state
        from tests import seed_support as S

        base = os.path.abspath(self.mktemp())
        src = os.path.join(base, "src")
        S.make_tree(src, files=3)
        port = S.free_port()  # nothing listens: the send walks, saves and keeps trying
        sender = S.make_manager(self, os.path.join(base, "s"), src, port, snapshot=src)
        pins = sender.store.path("p1", "pins")
        await sender.send(f"127.0.0.1:{port}", "p1", key="k", source="datadir")
        await S.wait_for(lambda: os.path.exists(pins))
        await sender.stopService()
        read = state.StateStore.read

        def failing(store, seed_id, suffix):
            if suffix == "pins":  # as the enumerator's EIO at its openat
                raise OSError(errno.EIO, "Input/output error", store.path(seed_id, suffix))
            return read(store, seed_id, suffix)

        self.patch(state.StateStore, "read", failing)
        again = S.make_manager(self, os.path.join(base, "s"), src, port, snapshot=src)
        status = await S.finished(again, "p1")
        self.assertEqual(status["State"], "failed")
        self.assertIn("cannot read the source's identities that this seed's walk saved", status["Error"])
        self.assertIn(pins, status["Error"])
        self.assertNotIn("cannot read the seed source", status["Error"])
        # The connection attempt the failure cancelled lets go of its timer a moment later.
        await S.wait_for(lambda: not [c for c in reactor.getDelayedCalls()
                                      if "HostnameEndpoint" in repr(c)])


class EnumeratorSliceTests(unittest.TestCase):
    """A few points of the enumerator, for real: agents on loopback, strace, a loop ext4."""

    timeout = 240

    def setUp(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root (strace, loop devices, mounts)")
        if shutil.which("strace") is None or shutil.which("mkfs.ext4") is None:
            raise unittest.SkipTest("needs strace and mkfs.ext4")

    async def test_a_slice_of_points_is_never_broken(self):
        from reliability import crashpoints

        base = tempfile.mkdtemp(prefix="orchagent-crashpoints-")
        os.chmod(base, 0o755)
        self.addCleanup(shutil.rmtree, base, True)
        world = crashpoints.World(base, 2)
        self.addCleanup(lambda: __import__("twisted.internet.defer", fromlist=["x"]).Deferred
                        .fromCoroutine(world.stop()))
        await world.start()
        tallies = []
        for cls, crashes, errors in ((crashpoints.DatadirSeed, 3, 2), (crashpoints.CopyRestore, 2, 1)):
            tallies.append(await crashpoints.run_operation(world, cls, quick=False, max_points=None,
                                                           limits=(crashes, errors)))
        for tally in tallies:
            self.assertEqual(tally.outcomes.get("BROKEN", 0), 0, tally.broken)
            self.assertGreater(tally.crash_points, 10)
        self.assertGreaterEqual(sum(t.crashes + t.errors for t in tallies), 5)


class WorldsOfTheirOwnSliceTests(unittest.TestCase):
    """One point of the btrfs restore, of mountlv of a backup and of a restore from it
    (reliability.crashops), for real: a btrfs target, then a real MariaDB and its
    mariabackup backup in BackupDirectories.  (The hot seed and the sender's crashes, at
    10-20 s a point, are left to the command.)"""

    timeout = 240

    def setUp(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root (strace, loop devices, mounts)")
        for tool in ("strace", "mkfs.ext4", "mkfs.btrfs", "mariabackup", "mbstream", "mariadbd"):
            if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
                raise unittest.SkipTest(f"needs {tool}")

    async def run_in(self, world_class, slices):
        from reliability import crashpoints

        base = tempfile.mkdtemp(prefix="orchagent-crashpoints-")
        os.chmod(base, 0o755)
        self.addCleanup(shutil.rmtree, base, True)
        world = world_class(base, 1)
        try:
            await world.start()
            tallies = [await crashpoints.run_operation(world, cls, quick=False, max_points=None,
                                                       limits=limits)
                       for cls, limits in slices]
        finally:
            await world.stop()
        for tally in tallies:
            self.assertEqual(tally.outcomes.get("BROKEN", 0), 0, tally.broken)
            self.assertGreater(tally.crash_points, 10)
            self.assertEqual(tally.crashes + tally.errors, 1, tally)
        return tallies

    async def test_one_point_of_each_is_never_broken(self):
        from reliability import crashops

        await self.run_in(crashops.BtrfsWorld, [(crashops.BtrfsRestore, (1, 0))])
        await self.run_in(crashops.MariaWorld, [(crashops.BackupMount, (0, 1)),
                                                (crashops.BackupRestore, (0, 1))])
