"""The copy backend on real file systems, with real commands (MySQL is a flag here)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import time

import attrs
from twisted.internet import reactor
from twisted.trial import unittest

from orchagent.config import Config
from orchagent.durable import NotDurable
from orchagent.errors import CommandFailed, NotAvailable, NotFound, Refused
from orchagent.host.facts import MySQLHost
from orchagent.process import ProcessRunner
from orchagent.snapshots import mountinfo
from orchagent.snapshots.copy import CopyBackend
from orchagent.snapshots.restore import RestoreFailed
from tests.support import lossy_disk
from tests.support.btrfs import make_btrfs
from tests.support.fakes import FailingRunner, FakeService


def write(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


def read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


class CopyCase(unittest.TestCase):
    def setUp(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("the copy backend's mounts need root")
        self.base = tempfile.mkdtemp(prefix="orchagent-copy-")
        self.addCleanup(shutil.rmtree, self.base, True)
        self.make(self.base)

    def make(self, base: str) -> None:
        self.datadir = os.path.join(base, "mysql")
        os.makedirs(os.path.join(self.datadir, "db"))
        write(os.path.join(self.datadir, "ibdata1"), "x" * 4096)
        write(os.path.join(self.datadir, "db", "t.ibd"), "row 1\n")
        os.chmod(self.datadir, 0o750)
        self.snapshot_dir = os.path.join(base, "snapshots")
        os.mkdir(self.snapshot_dir)
        self.mount_point = os.path.join(base, "mnt")
        os.mkdir(self.mount_point)
        self.config = Config(
            snapshot_backend="copy", snapshot_directory=self.snapshot_dir,
            snapshot_mount_point=self.mount_point, snapshot_volumes_filter="mysql-snap",
            mysql_datadir_command=f"echo {shlex.quote(self.datadir)}",
            state_dir=os.path.join(base, "state"))
        self.service = FakeService(running=False)
        self.runner = ProcessRunner(reactor, default_timeout=60)
        self.host = MySQLHost(self.config, self.runner, reactor, self.service)
        self.offset = 0
        self.backend = self.make_backend(self.runner)

    def make_backend(self, runner) -> CopyBackend:
        backend = CopyBackend(self.config, runner, reactor, self.host, self.service)
        backend.now = lambda: time.time() + self.offset
        return backend

    async def snapshot(self) -> str:
        before = set(os.listdir(self.snapshot_dir))
        await self.backend.create_snapshot()
        self.offset += 60
        (name,) = set(os.listdir(self.snapshot_dir)) - before
        return name


class CreateTests(CopyCase):
    async def test_refused_while_mysql_runs(self):
        self.service.running = True
        with self.assertRaisesRegex(Refused, "MySQL is running: a copy of a running datadir is not consistent"):
            await self.backend.create_snapshot()
        self.assertEqual(os.listdir(self.snapshot_dir), [])

    async def test_copy_keeps_contents_owner_and_mode(self):
        os.chown(os.path.join(self.datadir, "db", "t.ibd"), 1234, 5678)
        name = await self.snapshot()
        self.assertRegex(name, r"^mysql-snap-\d{8}T\d{6}Z$")
        path = os.path.join(self.snapshot_dir, name)
        self.assertEqual(read(os.path.join(path, "db", "t.ibd")), "row 1\n")
        st = os.stat(os.path.join(path, "db", "t.ibd"))
        self.assertEqual((st.st_uid, st.st_gid), (1234, 5678))
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o750)
        (volume,) = await self.backend.list_snapshots()
        self.assertEqual(volume.to_json(), {"Name": name, "GroupName": self.snapshot_dir,
                                            "Path": path, "IsSnapshot": True, "SnapshotPercent": 0.0})
        self.assertLess(abs(volume.created_at - time.time()), 120)

    async def test_failed_copy_leaves_nothing_that_looks_like_a_snapshot(self):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", self.snapshot_dir], check=True)
        self.addCleanup(subprocess.run, ["umount", self.snapshot_dir])
        write(os.path.join(self.datadir, "big"), "y" * 1024 * 1024)
        with self.assertRaisesRegex(CommandFailed, "cp exited with status 1: .*No space left"):
            await self.backend.create_snapshot()
        self.assertEqual(os.listdir(self.snapshot_dir), [])
        self.assertEqual(await self.backend.list_snapshots(), [])

    async def test_a_copy_whose_writes_are_lost_is_no_snapshot(self):
        """``cp`` syncs nothing: a copy whose writeback fails (a real writeback error,
        tests.support.lossy_disk) was a listed snapshot, in the page cache only.  Now
        the copy is synced, and a write error reported for its file system since the
        copy began fails it, leaving nothing."""
        snapshots = os.path.join(lossy_disk.make_lossy_disk(self, 1 << 20), "snapshots")
        os.mkdir(snapshots)
        write(os.path.join(self.datadir, "big"), "y" * 4 * 1024 * 1024)
        backend = CopyBackend(attrs.evolve(self.config, snapshot_directory=snapshots),
                              self.runner, reactor, self.host, self.service)
        with self.assertRaises(NotDurable) as caught:
            await backend.create_snapshot()
        self.assertRegex(caught.exception.message, rf"^the file system of {snapshots} reported a "
                         r"write error \((EIO|ENOSPC): .*\) while the copy .*\.partial was "
                         "written: it may not be on disk$")
        self.assertEqual(os.listdir(snapshots), [])

    async def test_mysql_started_during_the_copy(self):
        service = self.service

        def started():
            service.running = True
            return False

        runner = FailingRunner(self.runner, lambda argv: argv[0] == "cp" and started())
        backend = self.make_backend(runner)
        with self.assertRaisesRegex(Refused, "MySQL was started while the datadir was being copied"):
            await backend.create_snapshot()
        self.assertEqual(os.listdir(self.snapshot_dir), [])

    async def test_without_snapshot_directory_there_are_no_snapshots(self):
        self.config = Config(snapshot_backend="copy",
                             mysql_datadir_command=f"echo {shlex.quote(self.datadir)}")
        backend = CopyBackend(self.config, self.runner, reactor, self.host, self.service)
        self.assertEqual(await backend.list_snapshots(), [])
        self.assertEqual([v.name for v in await backend.list_volumes()], ["mysql"])
        with self.assertRaisesRegex(NotAvailable, "SnapshotDirectory is not configured"):
            await backend.create_snapshot()
        with self.assertRaisesRegex(NotAvailable, "SnapshotDirectory is not configured"):
            await backend.remove("mysql-snap-x")

    async def test_list_newest_first_ignores_hidden_work(self):
        first = await self.snapshot()
        second = await self.snapshot()
        os.mkdir(os.path.join(self.snapshot_dir, ".mysql-snap-x.partial"))
        self.assertEqual([v.name for v in await self.backend.list_snapshots()], [second, first])
        volumes = {v.name: v.is_snapshot for v in await self.backend.list_volumes()}
        self.assertEqual(volumes, {"mysql": False, first: True, second: True})


class ReflinkTests(CopyCase):
    def setUp(self):
        self.fs = make_btrfs(self)
        self.make(self.fs.mount_point)

    async def test_copy_shares_blocks_on_btrfs(self):
        with open(os.path.join(self.datadir, "ibdata1"), "wb") as fh:
            fh.write(os.urandom(4 * 1024 * 1024))
        subprocess.run(["sync"], check=True)
        name = await self.snapshot()
        out = subprocess.run(["btrfs", "filesystem", "du", "--raw", "-s",
                              os.path.join(self.snapshot_dir, name)],
                             stdout=subprocess.PIPE, text=True, check=True).stdout
        total, exclusive, shared = out.splitlines()[1].split()[:3]
        self.assertGreaterEqual(int(shared), 4 * 1024 * 1024)


class MountRemoveTests(CopyCase):
    async def test_mount_report_unmount_remove(self):
        name = await self.snapshot()
        path = os.path.join(self.snapshot_dir, name)
        state = await self.backend.mount(name)
        entry = mountinfo.at(mountinfo.read(), self.mount_point)
        self.assertTrue(entry.read_only)
        self.assertEqual((state.lv_path, state.mysql_data_path, state.is_mounted),
                         (path, self.mount_point, True))
        self.assertGreater(state.mysql_disk_usage, 4096)
        with self.assertRaisesRegex(Refused, "mounted on"):
            await self.backend.remove(name)
        with self.assertRaisesRegex(Refused, "already mounted"):
            await self.backend.mount(name)
        await self.backend.unmount()
        self.assertIs(await self.backend.remove(name), True)
        self.assertEqual(os.listdir(self.snapshot_dir), [])

    async def test_remove_refusals(self):
        os.mkdir(os.path.join(self.snapshot_dir, "weekly"))
        with self.assertRaisesRegex(Refused, "SnapshotVolumesFilter"):
            await self.backend.remove("weekly")
        with self.assertRaisesRegex(Refused, "is not a snapshot"):
            await self.backend.remove("mysql")
        with self.assertRaises(NotFound):
            await self.backend.remove("mysql-snap-nope")
        self.assertTrue(os.path.isdir(self.datadir))
        self.assertEqual(os.listdir(self.snapshot_dir), ["weekly"])


class RestoreTests(CopyCase):
    async def prepare(self) -> str:
        name = await self.snapshot()
        write(os.path.join(self.datadir, "db", "t.ibd"), "row 1\nrow 2\n")
        self.service.running = True
        return name

    def leftovers(self) -> list[str]:
        return sorted(n for n in os.listdir(self.base) if n not in ("mysql", "snapshots", "mnt", "state"))

    async def test_restore(self):
        name = await self.prepare()
        self.assertIs(await self.backend.restore(name), True)
        self.assertEqual(read(os.path.join(self.datadir, "db", "t.ibd")), "row 1\n")
        (replaced,) = self.leftovers()
        self.assertRegex(replaced, r"^mysql\.replaced-\d{8}T\d{6}Z$")
        self.assertEqual(read(os.path.join(self.base, replaced, "db", "t.ibd")), "row 1\nrow 2\n")
        self.assertEqual(self.service.calls, ["stop", "start"])
        self.assertTrue(os.path.isdir(os.path.join(self.snapshot_dir, name)))
        self.assertIn(replaced, {v.name for v in await self.backend.list_volumes()})

    async def test_failed_swap_puts_the_datadir_back(self):
        name = await self.prepare()
        old = os.stat(self.datadir).st_ino
        runner = FailingRunner(self.runner, lambda argv: argv[0] == "mv" and ".restoring-" in argv[3])
        with self.assertRaises(RestoreFailed) as caught:
            await self.make_backend(runner).restore(name)
        self.assertIn("failed at step 4/5 (rename ", caught.exception.message)
        self.assertIn("rolled back", caught.exception.message)
        self.assertEqual(os.stat(self.datadir).st_ino, old)
        self.assertEqual(read(os.path.join(self.datadir, "db", "t.ibd")), "row 1\nrow 2\n")
        self.assertEqual(self.leftovers(), [])
        self.assertEqual(self.service.calls, ["stop", "start"])

    async def test_failed_start_puts_the_datadir_back(self):
        name = await self.prepare()
        self.service.fail["start"] = CommandFailed("cannot start MySQL")
        with self.assertRaisesRegex(RestoreFailed, r"step 5/5 \(start MySQL\).*rolled back"):
            await self.backend.restore(name)
        self.assertEqual(read(os.path.join(self.datadir, "db", "t.ibd")), "row 1\nrow 2\n")
        self.assertEqual(self.leftovers(), [])
        self.assertTrue(self.service.running)

    async def test_a_copy_whose_writes_are_lost_is_never_put_in_place(self):
        """The datadir on a disk whose new blocks stop reaching it: the restore's copy
        beside it is lost on its way to the disk, so the restore fails at its copy,
        the datadir as it was and MySQL never stopped (it put a copy held in the page
        cache only in the datadir's place, and started MySQL on it)."""
        name = await self.prepare()
        disk = lossy_disk.make_lossy_disk(self, 64 << 20)
        datadir = os.path.join(disk, "mysql")
        subprocess.run(["cp", "-a", "-T", self.datadir, datadir], check=True)
        write(os.path.join(self.snapshot_dir, name, "big"), "y" * 4 * 1024 * 1024)
        lossy_disk.limit(disk, 0)
        config = attrs.evolve(self.config, mysql_datadir_command=f"echo {shlex.quote(datadir)}")
        host = MySQLHost(config, self.runner, reactor, self.service)
        backend = CopyBackend(config, self.runner, reactor, host, self.service)
        with self.assertRaises(RestoreFailed) as caught:
            await backend.restore(name)
        self.assertIn("step 1/5 (copy ", caught.exception.message)
        self.assertIn("reported a write error", caught.exception.message)
        self.assertEqual(sorted(os.listdir(disk)), ["lost+found", "mysql"])
        self.assertEqual(read(os.path.join(datadir, "db", "t.ibd")), "row 1\nrow 2\n")
        self.assertEqual(self.service.calls, [])

    async def test_refuses_a_datadir_that_is_a_mount_point(self):
        name = await self.prepare()
        subprocess.run(["mount", "--bind", self.datadir, self.datadir], check=True)
        self.addCleanup(subprocess.run, ["umount", self.datadir])
        with self.assertRaisesRegex(Refused, "is a mount point"):
            await self.backend.restore(name)
        self.assertEqual(self.service.calls, [])
        self.assertEqual(self.leftovers(), [])
