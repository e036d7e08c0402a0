"""The small parts of the snapshots package: mount table, names, the MySQLDataPath
heuristic, the restore step runner, backend detection and the front's serialisation."""

from __future__ import annotations

import datetime
import os

from twisted.internet import defer
from twisted.trial import unittest

from orchagent.config import Config
from orchagent.errors import BadRequest, CommandFailed, NotAvailable
from orchagent.snapshots import Snapshots, mountinfo, naming
from orchagent.snapshots.detect import detect_backend
from orchagent.snapshots.model import LogicalVolume
from orchagent.snapshots.mountpoint import mysql_data_path
from orchagent.snapshots.restore import RestoreFailed, Step, run_steps
from tests.support.fakes import FakeHost, FakeMounts

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
80 27 253:0 / /var/lib/mysql rw,noatime shared:40 master:2 - xfs /dev/mapper/vg-mysql rw,attr2,inode64
81 27 0:45 /snapshots/s1 /mnt/snap\\040point ro,relatime - btrfs /dev/loop3 rw,space_cache=v2,subvolid=258,subvol=/snapshots/s1
82 27 0:46 / /var/lib/mysql/tmp rw - tmpfs tmpfs rw
this line is not mountinfo
"""


class MountInfoTests(unittest.TestCase):
    def test_parse(self):
        entries = mountinfo.parse(MOUNTINFO)
        self.assertEqual(len(entries), 5)
        mysql = entries[2]
        self.assertEqual((mysql.mount_point, mysql.fs_type, mysql.source, mysql.device_number),
                         ("/var/lib/mysql", "xfs", "/dev/mapper/vg-mysql", "253:0"))
        self.assertFalse(mysql.read_only)
        snap = entries[3]
        self.assertEqual(snap.mount_point, "/mnt/snap point")
        self.assertEqual(snap.root, "/snapshots/s1")
        self.assertTrue(snap.read_only)
        self.assertEqual(mountinfo.option_value(snap.super_options, "subvolid"), "258")

    def test_at_and_containing(self):
        entries = mountinfo.parse(MOUNTINFO)
        self.assertEqual(mountinfo.at(entries, "/mnt/snap point").source, "/dev/loop3")
        self.assertIsNone(mountinfo.at(entries, "/mnt"))
        self.assertEqual(mountinfo.containing(entries, "/var/lib/mysql/db/t.ibd").source, "/dev/mapper/vg-mysql")
        self.assertEqual(mountinfo.containing(entries, "/var/lib/mysql").source, "/dev/mapper/vg-mysql")
        self.assertEqual(mountinfo.containing(entries, "/var/lib/mysqlx").source, "/dev/vda1")
        self.assertEqual(mountinfo.containing(entries, "/var/lib/mysql/tmp/x").fs_type, "tmpfs")

    def test_this_process_sees_its_root(self):
        self.assertEqual(mountinfo.containing(mountinfo.read(), "/etc").mount_point, "/")


class NamingTests(unittest.TestCase):
    when = datetime.datetime(2024, 5, 1, 2, 3, 4, tzinfo=datetime.timezone.utc).timestamp()

    def test_names(self):
        self.assertEqual(naming.snapshot_name("mysql-snap", self.when), "mysql-snap-20240501T020304Z")
        self.assertEqual(naming.snapshot_name("snap_", self.when), "snap_20240501T020304Z")
        self.assertEqual(naming.snapshot_name("", self.when), "orchagent-snapshot-20240501T020304Z")
        self.assertEqual(naming.replaced_name("mysql", self.when), "mysql.replaced-20240501T020304Z")
        self.assertEqual(naming.parse_timestamp("mysql-snap-20240501T020304Z"), self.when)
        self.assertIsNone(naming.parse_timestamp("weekly"))

    def test_unsafe(self):
        for name in ("a/b", "../x", ".hidden", "a b", "x;y", "", "a\n"):
            self.assertRaises(BadRequest, naming.check_safe, name)
        self.assertRaises(BadRequest, naming.snapshot_name, "snap/", self.when)


class DataPathTests(unittest.TestCase):
    def tree(self, *relative: str) -> str:
        root = self.mktemp()
        os.makedirs(root)
        for path in relative:
            os.makedirs(os.path.join(root, path), exist_ok=True)
            open(os.path.join(root, path, "ibdata1"), "w").close()
        return root

    def test_heuristic_strips_leading_components(self):
        for marker, expected in (("var/lib/mysql", "var/lib/mysql"), ("lib/mysql", "lib/mysql"),
                                 ("mysql", "mysql"), (".", "")):
            root = self.tree(marker)
            want = os.path.join(root, expected) if expected else root
            self.assertEqual(mysql_data_path(root, "/var/lib/mysql"), want)

    def test_full_path_wins_and_nothing_found(self):
        root = self.tree("var/lib/mysql", "mysql")
        self.assertEqual(mysql_data_path(root, "/var/lib/mysql"), root + "/var/lib/mysql")
        self.assertEqual(mysql_data_path(self.tree(), "/var/lib/mysql"), "")
        root = self.tree(".")
        self.assertEqual(mysql_data_path(root, ""), root)


class StepTests(unittest.TestCase):
    async def test_undo_in_reverse_including_the_failed_step(self):
        done = []

        def step(name, fail=False):
            async def do():
                done.append(f"do {name}")
                if fail:
                    raise CommandFailed(f"{name} broke")

            async def undo():
                done.append(f"undo {name}")

            return Step(name, do, undo)

        with self.assertRaises(RestoreFailed) as caught:
            await run_steps("restore of s", [step("a"), step("b"), step("c", fail=True), step("d")])
        self.assertEqual(done, ["do a", "do b", "do c", "undo c", "undo b", "undo a"])
        self.assertEqual(caught.exception.message,
                         "restore of s failed at step 3/4 (c): c broke; rolled back: the "
                         "previous datadir is back in place")

    async def test_failed_undo_stops_the_undo(self):
        done = []

        async def fail():
            raise CommandFailed("boom")

        async def record(what):
            done.append(what)

        steps = [Step("a", lambda: record("do a"), lambda: record("undo a")),
                 Step("b", lambda: record("do b"), fail),
                 Step("c", fail)]
        with self.assertRaises(RestoreFailed) as caught:
            await run_steps("restore of s", steps, kept="/data/mysql.replaced-x")
        self.assertEqual(done, ["do a", "do b"])
        self.assertIn("ROLLBACK INCOMPLETE: undoing 'b' failed (boom)", caught.exception.message)
        self.assertIn("kept at /data/mysql.replaced-x", caught.exception.message)


class FakeLVM:
    def __init__(self, error=None):
        self.error = error

    async def datadir_origin(self):
        if self.error:
            raise self.error


class DetectTests(unittest.TestCase):
    def setUp(self):
        self.sys = self.mktemp()
        os.makedirs(os.path.join(self.sys, "253:0", "dm"))
        os.makedirs(os.path.join(self.sys, "8:1"))
        self.mounts = FakeMounts()
        self.mounts.mount("/dev/sda1", "/", "ext4", "8:1")

    async def detect(self, lvm):
        return await detect_backend(FakeHost("/var/lib/mysql"), lvm, self.mounts, self.sys)

    async def test_logical_volume(self):
        self.mounts.mount("/dev/mapper/vg-mysql", "/var/lib/mysql", "xfs", "253:0")
        self.assertEqual(await self.detect(FakeLVM()), "lvm")

    async def test_device_mapper_that_is_not_lvm(self):
        self.mounts.mount("/dev/mapper/crypt", "/var/lib/mysql", "ext4", "253:0")
        self.assertEqual(await self.detect(FakeLVM(NotAvailable("not an LV"))), "copy")
        self.assertEqual(await self.detect(FakeLVM(CommandFailed("lvs: not found"))), "copy")

    async def test_plain_disk(self):
        self.assertEqual(await self.detect(FakeLVM()), "copy")


class FrontTests(unittest.TestCase):
    async def test_changes_run_one_at_a_time(self):
        events = []
        gates = {"a": defer.Deferred(), "b": defer.Deferred()}

        class Backend:
            name = "copy"

            async def mount(self, name):
                events.append(f"start {name}")
                await gates[name]
                events.append(f"end {name}")

            async def mount_state(self):
                events.append("state")

        front = Snapshots(Config(snapshot_backend="copy"), None, {"copy": Backend()}, detect=None)
        first = defer.ensureDeferred(front.mount("a"))
        second = defer.ensureDeferred(front.mount("b"))
        await front.mount_state()
        self.assertEqual(events, ["start a", "state"])
        gates["a"].callback(None)
        await first
        self.assertEqual(events, ["start a", "state", "end a", "start b"])
        gates["b"].callback(None)
        await second
        self.assertEqual(events[-1], "end b")


    async def test_lvs_snapshots_valid_newest_first_then_invalid(self):
        # orchestrator seeds from lvs-snapshots[0]: whatever a backend and the backups
        # answer, no invalid snapshot comes before a valid one.
        def volume(name, at, percent=0.0, group="vg"):
            return LogicalVolume(name=name, group_name=group, path="/s/" + name,
                                 is_snapshot=True, snapshot_percent=percent, created_at=at)

        class Backend:
            async def list_snapshots(self):
                return [volume("snap-4", 400.0, 100.0), volume("snap-3", 300.0, 12.5),
                        volume("snap-1", 100.0, 100.0)]

        class Backups:
            async def snapshot_volumes(self):
                return [volume("backup-2", 200.0, group="backup")]

        for name in ("lvm", "btrfs", "copy"):
            alone = Snapshots(Config(snapshot_backend=name), None, {name: Backend()}, detect=None)
            self.assertEqual([v.name for v in await alone.list_snapshots()],
                             ["snap-3", "snap-4", "snap-1"], name)
            front = Snapshots(Config(snapshot_backend=name), None, {name: Backend()}, detect=None,
                              backups=Backups())
            self.assertEqual([v.name for v in await front.list_snapshots()],
                             ["snap-3", "backup-2", "snap-4", "snap-1"], name)


class InterfaceTests(unittest.TestCase):
    def test_every_backend_and_the_front_provide_the_interface(self):
        from zope.interface.verify import verifyObject

        from orchagent.interfaces import ICommandRunner, ISnapshotBackend
        from orchagent.snapshots import build_backend
        from tests.support.fakes import FailingRunner, FakeRunner, FakeService

        front = build_backend(Config(), FakeRunner(), None, FakeHost(), FakeService())
        for backend in [front, *front.backends.values()]:
            self.assertTrue(verifyObject(ISnapshotBackend, backend))
        self.assertEqual(sorted(b.name for b in front.backends.values()), ["btrfs", "copy", "lvm"])
        self.assertTrue(verifyObject(ICommandRunner, FakeRunner()))
        self.assertTrue(verifyObject(ICommandRunner, FailingRunner(FakeRunner(), lambda argv: False)))
        from twisted.internet import reactor

        from orchagent.process import ProcessRunner
        self.assertTrue(verifyObject(ICommandRunner, ProcessRunner(reactor)))
