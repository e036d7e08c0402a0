"""The btrfs backend on a real btrfs (loop file), with real commands.

MySQL itself is a flag here (FakeService); the tests with a real MariaDB are in
test_snapshots_mariadb.py and test_snapshots_daemon.py.
"""

from __future__ import annotations

import errno
import os
import shlex
import subprocess
import time

from twisted.internet import reactor
from twisted.trial import unittest

from orchagent.config import Config
from orchagent.errors import CommandFailed, NotAvailable, NotFound, Refused
from orchagent.host.facts import MySQLHost
from orchagent.process import ProcessRunner
from orchagent.snapshots import build_backend, mountinfo
from orchagent.snapshots.btrfs import BtrfsBackend
from orchagent.snapshots.restore import RestoreFailed
from tests.support.btrfs import make_btrfs
from tests.support.fakes import FailingRunner, FakeService


def write(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


def read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def is_read_only_subvolume(path: str) -> bool:
    out = subprocess.run(["btrfs", "property", "get", "-ts", path, "ro"],
                         stdout=subprocess.PIPE, text=True, check=True).stdout
    return out.strip() == "ro=true"


class BtrfsCase(unittest.TestCase):
    volumes_filter = "mysql-snap"

    def setUp(self):
        self.fs = make_btrfs(self)
        self.datadir = self.fs.subvolume("mysql")
        write(os.path.join(self.datadir, "ibdata1"), "x" * 1000)
        os.mkdir(os.path.join(self.datadir, "db"))
        write(os.path.join(self.datadir, "db", "t.ibd"), "row 1\n")
        self.snapshot_dir = self.fs.directory("snapshots")
        self.mount_point = self.fs.scratch("mnt")
        self.config = Config(
            snapshot_backend="btrfs", snapshot_directory=self.snapshot_dir,
            snapshot_mount_point=self.mount_point, snapshot_volumes_filter=self.volumes_filter,
            mysql_datadir_command=f"echo {shlex.quote(self.datadir)}",
            state_dir=self.fs.scratch("state"))
        self.service = FakeService(running=True)
        self.runner = ProcessRunner(reactor, default_timeout=60)
        self.host = MySQLHost(self.config, self.runner, reactor, self.service)
        self.backend = self.make_backend(self.runner)
        self.clock_offset = 0

    def make_backend(self, runner) -> BtrfsBackend:
        backend = BtrfsBackend(self.config, runner, reactor, self.host, self.service)
        backend.now = lambda: time.time() + self.clock_offset
        return backend

    async def snapshot(self) -> str:
        """Create a snapshot; its name.  Each one a minute later than the last."""
        before = {v.name for v in await self.backend.list_snapshots()}
        self.assertIs(await self.backend.create_snapshot(), True)
        self.clock_offset += 60
        (name,) = {v.name for v in await self.backend.list_snapshots()} - before
        return name

    def mounted(self) -> mountinfo.MountEntry | None:
        return mountinfo.at(mountinfo.read(), self.mount_point)


class CreateAndListTests(BtrfsCase):
    async def test_snapshot_is_a_read_only_subvolume_named_by_filter_and_time(self):
        started = time.time()
        name = await self.snapshot()
        self.assertRegex(name, r"^mysql-snap-\d{8}T\d{6}Z$")
        path = os.path.join(self.snapshot_dir, name)
        self.assertTrue(self.fs.is_subvolume(path))
        self.assertTrue(is_read_only_subvolume(path))
        self.assertEqual(read(os.path.join(path, "db", "t.ibd")), "row 1\n")
        (volume,) = await self.backend.list_snapshots()
        self.assertEqual(volume.to_json(), {"Name": name, "GroupName": "orchtest", "Path": path,
                                            "IsSnapshot": True, "SnapshotPercent": 0.0})
        # otime is the kernel's coarse clock, a tick behind time.time(): a second's slack.
        self.assertGreaterEqual(volume.created_at, int(started) - 1)
        self.assertLessEqual(volume.created_at, time.time() + 1)

    async def test_newest_first_and_lvs_lists_the_datadir_too(self):
        first = await self.snapshot()
        second = await self.snapshot()
        names = [v.name for v in await self.backend.list_snapshots()]
        self.assertEqual(set(names), {first, second})
        volumes = {v.name: v for v in await self.backend.list_volumes("")}
        self.assertEqual(set(volumes), {"mysql", first, second})
        self.assertFalse(volumes["mysql"].is_snapshot)
        self.assertEqual(volumes["mysql"].path, self.datadir)
        self.assertEqual([v.name for v in await self.backend.list_volumes(second)], [second])
        self.assertEqual((await self.backend.get_volume(os.path.join(self.snapshot_dir, first))).name, first)

    async def test_other_things_in_the_snapshot_directory(self):
        await self.snapshot()
        self.fs.subvolume("snapshots/weekly-1")
        os.mkdir(os.path.join(self.snapshot_dir, "plain-dir"))
        self.fs.subvolume("snapshots/.mysql-snap-hidden")
        names = {v.name for v in await self.backend.list_volumes()}
        self.assertIn("weekly-1", names)
        self.assertNotIn("plain-dir", names)
        self.assertNotIn(".mysql-snap-hidden", names)
        self.assertEqual(len(await self.backend.list_snapshots()), 1)

    async def test_a_binlog_not_synced_is_warned_of(self):
        import attrs
        from twisted.logger import globalLogPublisher

        seen: list[str] = []

        def observe(event):
            if event.get("log_level") is not None and event["log_level"].name == "warn":
                seen.append(str(event.get("log_format", "")))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        options = self.fs.path("my.cnf")
        for text, warned in (("[mysqld]\nlog-bin=mysql-bin\n", True),
                             ("[mysqld]\nlog-bin=mysql-bin\nsync-binlog=1\n", False),
                             ("[mysqld]\nskip-name-resolve\n", False)):
            write(options, text)
            self.backend.config = attrs.evolve(self.backend.config, mysql_options_file=options)
            seen.clear()
            await self.snapshot()
            self.assertEqual(any("sync_binlog" in line for line in seen), warned, text)

    async def test_same_second_is_refused(self):
        self.backend.now = lambda: 1714701600.0
        await self.backend.create_snapshot()
        with self.assertRaisesRegex(Refused, "already exists"):
            await self.backend.create_snapshot()
        self.assertEqual(len(os.listdir(self.snapshot_dir)), 1)

    async def test_datadir_that_is_not_a_subvolume(self):
        plain = self.fs.directory("plain")
        self.config = Config(snapshot_backend="btrfs", snapshot_directory=self.snapshot_dir,
                             mysql_datadir_command=f"echo {plain}")
        backend = BtrfsBackend(self.config, self.runner, reactor,
                               MySQLHost(self.config, self.runner, reactor, self.service), self.service)
        with self.assertRaisesRegex(NotAvailable, f"the datadir {plain} is not a btrfs subvolume"):
            await backend.create_snapshot()
        self.assertEqual(os.listdir(self.snapshot_dir), [])

    async def test_snapshot_directory_not_configured(self):
        self.config = Config(snapshot_backend="btrfs",
                             mysql_datadir_command=f"echo {self.datadir}")
        backend = BtrfsBackend(self.config, self.runner, reactor, self.host, self.service)
        with self.assertRaisesRegex(NotAvailable, "SnapshotDirectory is not configured"):
            await backend.create_snapshot()

    async def test_auto_detects_btrfs(self):
        config = Config(snapshot_backend="auto", snapshot_directory=self.snapshot_dir,
                        mysql_datadir_command=f"echo {self.datadir}")
        front = build_backend(config, self.runner, reactor, self.host, self.service)
        self.assertEqual(front.name, "auto")
        self.assertEqual(await front.list_snapshots(), [])
        self.assertEqual(front.name, "btrfs")

    async def test_auto_detects_copy_for_a_plain_directory_on_btrfs(self):
        plain = self.fs.directory("plain")
        config = Config(snapshot_backend="auto", mysql_datadir_command=f"echo {plain}")
        front = build_backend(config, self.runner, reactor,
                              MySQLHost(config, self.runner, reactor, self.service), self.service)
        await front.backend()
        self.assertEqual(front.name, "copy")


class MountTests(BtrfsCase):
    async def test_mount_read_only_and_report(self):
        name = await self.snapshot()
        path = os.path.join(self.snapshot_dir, name)
        state = await self.backend.mount(name)
        entry = self.mounted()
        self.assertIsNotNone(entry)
        self.assertTrue(entry.read_only)
        with self.assertRaises(OSError) as caught:
            write(os.path.join(self.mount_point, "new"), "x")
        self.assertEqual(caught.exception.errno, errno.EROFS)
        usage = 1000 + 6 + sum(os.lstat(p).st_size for p in (path, path + "/db"))
        self.assertEqual(state.to_json(), {
            "Path": self.mount_point, "Device": self.fs.device, "LVPath": path,
            "FileSystem": "btrfs", "IsMounted": True, "DiskUsage": usage,
            "MySQLDataPath": self.mount_point, "MySQLDiskUsage": usage})
        self.assertEqual(await self.backend.mount_state(), state)

        state = await self.backend.unmount()
        self.assertIsNone(self.mounted())
        self.assertEqual(state.to_json()["IsMounted"], False)
        self.assertEqual((await self.backend.unmount()).is_mounted, False)

    async def test_busy_mount_point(self):
        name = await self.snapshot()
        other = await self.snapshot()
        await self.backend.mount(name)
        with self.assertRaisesRegex(Refused, f"already mounted on {self.mount_point}"):
            await self.backend.mount(other)
        self.assertEqual((await self.backend.mount_state()).lv_path,
                         os.path.join(self.snapshot_dir, name))
        await self.backend.unmount()

    async def test_only_snapshots_are_mounted(self):
        with self.assertRaisesRegex(Refused, f"{self.datadir} is not a snapshot"):
            await self.backend.mount("mysql")
        with self.assertRaisesRegex(NotFound, "no btrfs snapshot 'nope'"):
            await self.backend.mount("nope")
        self.assertIsNone(self.mounted())


class RemoveTests(BtrfsCase):
    async def test_remove(self):
        name = await self.snapshot()
        self.assertIs(await self.backend.remove(name), True)
        self.assertEqual(os.listdir(self.snapshot_dir), [])

    async def test_mounted_snapshot_is_not_removed(self):
        name = await self.snapshot()
        await self.backend.mount(name)
        with self.assertRaisesRegex(Refused, f"it is mounted on {self.mount_point}"):
            await self.backend.remove(name)
        await self.backend.unmount()
        await self.backend.remove(os.path.join(self.snapshot_dir, name))
        self.assertEqual(os.listdir(self.snapshot_dir), [])

    async def test_refuses_outside_the_filter_and_the_datadir(self):
        self.fs.subvolume("snapshots/weekly-1")
        with self.assertRaisesRegex(Refused, "SnapshotVolumesFilter 'mysql-snap'"):
            await self.backend.remove("weekly-1")
        with self.assertRaisesRegex(Refused, "is not a snapshot"):
            await self.backend.remove(self.datadir)
        with self.assertRaises(NotFound):
            await self.backend.remove("mysql-snap-29990101T000000Z")
        self.assertTrue(self.fs.is_subvolume(self.datadir))
        self.assertEqual(os.listdir(self.snapshot_dir), ["weekly-1"])


class RestoreTests(BtrfsCase):
    async def prepare(self) -> str:
        name = await self.snapshot()
        write(os.path.join(self.datadir, "db", "t.ibd"), "row 1\nrow 2\n")
        return name

    def replaced_dirs(self) -> list[str]:
        parent = os.path.dirname(self.datadir)
        return sorted(n for n in os.listdir(parent) if n.startswith("mysql.replaced-"))

    async def test_restore_swaps_in_a_writable_copy_and_keeps_the_old_datadir(self):
        name = await self.prepare()
        old = os.stat(self.datadir)
        self.assertIs(await self.backend.restore(name), True)
        self.assertEqual(read(os.path.join(self.datadir, "db", "t.ibd")), "row 1\n")
        self.assertTrue(self.fs.is_subvolume(self.datadir))
        self.assertFalse(is_read_only_subvolume(self.datadir))
        write(os.path.join(self.datadir, "db", "new"), "writable")
        (replaced,) = self.replaced_dirs()
        replaced_path = os.path.join(os.path.dirname(self.datadir), replaced)
        self.assertEqual(read(os.path.join(replaced_path, "db", "t.ibd")), "row 1\nrow 2\n")
        self.assertEqual(os.stat(replaced_path).st_dev, old.st_dev)
        self.assertEqual(self.service.calls, ["stop", "start"])
        volumes = {v.name: v for v in await self.backend.list_volumes()}
        self.assertFalse(volumes[replaced].is_snapshot)
        self.assertIn(name, volumes)

    async def test_failed_snapshot_step_puts_the_datadir_back(self):
        name = await self.prepare()
        old = os.stat(self.datadir)
        failing = FailingRunner(self.runner, lambda argv: argv[:3] == ("btrfs", "subvolume", "snapshot"))
        backend = self.make_backend(failing)
        with self.assertRaises(RestoreFailed) as caught:
            await backend.restore(name)
        self.assertIn("failed at step 1/5 (snapshot ", caught.exception.message)
        self.assertIn("injected failure", caught.exception.message)
        self.assertIn("rolled back", caught.exception.message)
        self.assertEqual(os.stat(self.datadir).st_dev, old.st_dev)
        self.assertEqual(read(os.path.join(self.datadir, "db", "t.ibd")), "row 1\nrow 2\n")
        self.assertEqual(self.replaced_dirs(), [])
        self.assertEqual(self.service.calls, [])
        self.assertTrue(self.service.running)

    async def test_failed_start_puts_the_datadir_back(self):
        name = await self.prepare()
        old = os.stat(self.datadir)
        self.service.fail["start"] = CommandFailed("cannot start MySQL: it crashed")
        with self.assertRaisesRegex(RestoreFailed, r"step 5/5 \(start MySQL\): cannot start MySQL: it crashed.*rolled back"):
            await self.backend.restore(name)
        self.assertEqual(os.stat(self.datadir).st_dev, old.st_dev)
        self.assertEqual(read(os.path.join(self.datadir, "db", "t.ibd")), "row 1\nrow 2\n")
        self.assertEqual(self.replaced_dirs(), [])
        self.assertEqual(sorted(os.listdir(self.snapshot_dir)), [name])
        self.assertTrue(self.service.running)

    async def test_failed_undo_keeps_the_record_and_recovery_finishes_it(self):
        name = await self.prepare()
        self.service.fail["start"] = CommandFailed("cannot start MySQL")
        failing = FailingRunner(self.runner, lambda argv: argv[:3] == ("btrfs", "subvolume", "delete"))
        backend = self.make_backend(failing)
        with self.assertRaises(RestoreFailed) as caught:
            await backend.restore(name)
        self.assertIn("ROLLBACK INCOMPLETE", caught.exception.message)
        self.assertEqual(read(os.path.join(self.datadir, "db", "t.ibd")), "row 1\nrow 2\n")
        self.assertEqual(self.replaced_dirs(), [])
        parent = os.path.dirname(self.datadir)
        (work,) = [n for n in os.listdir(parent) if ".restoring-" in n]
        (record,) = os.listdir(os.path.join(self.config.state_dir, "restores"))
        front = build_backend(self.config, self.runner, reactor, self.host, self.service)
        self.service.running = False
        await front.recover()
        self.assertFalse(os.path.lexists(os.path.join(parent, work)))
        self.assertEqual(os.listdir(os.path.join(self.config.state_dir, "restores")), [])
        self.assertEqual(read(os.path.join(self.datadir, "db", "t.ibd")), "row 1\nrow 2\n")

    async def test_stopped_mysql_is_started_after_the_restore(self):
        name = await self.prepare()
        self.service.running = False
        await self.backend.restore(name)
        self.assertEqual(self.service.calls, ["start"])

    async def test_refuses_a_snapshot_without_mysql_data(self):
        self.fs.subvolume("snapshots/mysql-snap-empty")
        with self.assertRaisesRegex(Refused, "holds no MySQL data"):
            await self.backend.restore("mysql-snap-empty")
        self.assertEqual(self.service.calls, [])
        self.assertEqual(self.replaced_dirs(), [])

    async def test_refuses_a_datadir_that_is_a_mount_point(self):
        name = await self.prepare()
        subprocess.run(["mount", "--bind", self.datadir, self.datadir], check=True)
        self.addCleanup(subprocess.run, ["umount", self.datadir])
        with self.assertRaisesRegex(Refused, "is a mount point"):
            await self.backend.restore(name)
        self.assertEqual(self.service.calls, [])
