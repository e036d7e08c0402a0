"""The LVM backend: lvs JSON parsing, and the exact argv of every LVM command.

LVM snapshots need device-mapper, which this kernel lacks, so commands run against an
expectation fake (tests.support.fakes.FakeRunner) answering with lvs reports: two
recorded from real ``lvs`` on a loop-device volume group (tests/data/lvs-plain.json,
lvs-empty.json; ``lvs --driverloaded n --reportformat json --units b --nosuffix -o
<LVS_FIELDS>`` after ``pvcreate``/``vgcreate``/``lvcreate -an -Zn`` with ``--driverloaded
n``) and two written in the same format for snapshots (snap_percent 0.01, 12.50 and an
overflowed 100.00 with state I) and thin volumes (lvs-snapshots.json, lvs-thin.json).  ``RealLvsTests`` runs the backend's own ``lvs``
command for real on a loop-device volume group.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import tempfile
import uuid

from twisted.internet import reactor, task
from twisted.trial import unittest

from orchagent.config import Config
from orchagent.errors import BadRequest, CommandFailed, NotAvailable, NotFound, Refused
from orchagent.process import ProcessRunner
from orchagent.snapshots import Snapshots
from orchagent.snapshots.lvm import LVS_ARGV, LVMBackend, parse_lvs, parse_size
from orchagent.snapshots.restore import RestoreFailed
from tests.support.fakes import FakeHost, FakeMounts, FakeRunner, FakeService

DATA = os.path.join(os.path.dirname(__file__), "data")
NOW = datetime.datetime(2024, 5, 3, 2, 0, 0, tzinfo=datetime.timezone.utc).timestamp()
STAMP = "20240503T020000Z"


def report(name: str) -> bytes:
    with open(os.path.join(DATA, name), "rb") as fh:
        return fh.read()


class ParseTests(unittest.TestCase):
    def test_real_plain_report(self):
        volumes = parse_lvs(report("lvs-plain.json"))
        self.assertEqual([(v.vg, v.name, v.path) for v in volumes],
                         [("orchtestvg", "mysql", "/dev/orchtestvg/mysql"),
                          ("orchtestvg", "other", "/dev/orchtestvg/other")])
        mysql = volumes[0]
        self.assertFalse(mysql.is_snapshot)
        self.assertFalse(mysql.is_active)
        self.assertEqual(mysql.size, 41943040)
        self.assertEqual(mysql.created_at, datetime.datetime(
            2026, 11, 25, 10, 18, 46, tzinfo=datetime.timezone.utc).timestamp())
        self.assertEqual(mysql.logical_volume().to_json(), {
            "Name": "mysql", "GroupName": "orchtestvg", "Path": "/dev/orchtestvg/mysql",
            "IsSnapshot": False, "SnapshotPercent": 0.0})

    def test_real_empty_report(self):
        self.assertEqual(parse_lvs(report("lvs-empty.json")), [])

    def test_snapshot_validity_from_snap_percent(self):
        volumes = {v.name: v for v in parse_lvs(report("lvs-snapshots.json"))}
        overflowed = volumes["mysql-snap-20240430T020000Z"]
        self.assertTrue(overflowed.is_snapshot)
        self.assertTrue(overflowed.overflowed)
        self.assertEqual(overflowed.logical_volume().snapshot_percent, 100.0)
        self.assertFalse(overflowed.logical_volume().is_valid_snapshot)
        good = volumes["mysql-snap-20240501T020000Z"]
        self.assertEqual((good.is_snapshot, good.overflowed, good.origin), (True, False, "mysql"))
        self.assertEqual(good.logical_volume().to_json()["SnapshotPercent"], 12.5)
        self.assertTrue(good.logical_volume().is_valid_snapshot)
        self.assertFalse(volumes["mysql"].is_snapshot)
        self.assertFalse(volumes["mysql-snap-lookalike"].is_snapshot)

    def test_overflow_seen_in_attr_even_without_percent(self):
        text = report("lvs-snapshots.json").replace(b'"swi-I-s---", "origin":"mysql", "snap_percent":"100.00"',
                                                     b'"swi-I-s---", "origin":"mysql", "snap_percent":""')
        volumes = {v.name: v for v in parse_lvs(text)}
        self.assertEqual(volumes["mysql-snap-20240430T020000Z"].snapshot_percent, 100.0)

    def test_thin_snapshot_never_overflows(self):
        volumes = {v.name: v for v in parse_lvs(report("lvs-thin.json"))}
        thin = volumes["mysql-snap-20240503T020000Z"]
        self.assertTrue(thin.is_snapshot)
        self.assertEqual(thin.snapshot_percent, 0.0)
        self.assertFalse(volumes["pool"].is_snapshot)

    def test_garbage_is_an_error(self):
        for text in (b"", b"not json", b'{"report": 3}', b'{"report":[{"lv":[{"lv_name":"x"}]}]}'):
            self.assertRaises(CommandFailed, parse_lvs, text)

    def test_sizes(self):
        self.assertEqual(parse_size("10G"), 10 * 1024 ** 3)
        self.assertEqual(parse_size("512"), 512 * 1024 ** 2)
        self.assertEqual(parse_size("1.5g"), int(1.5 * 1024 ** 3))
        self.assertEqual(parse_size("4096b"), 4096)
        for bad in ("", "10 G", "-1G", "10GB", "1G;reboot"):
            self.assertRaises(NotAvailable, parse_size, bad)


class LVMCase(unittest.TestCase):
    """A backend on vgmysql/mysql (253:0) mounted at /var/lib/mysql."""

    volumes_filter = "mysql-snap"

    def setUp(self):
        self.mount_point = tempfile.mkdtemp(prefix="orchagent-lvm-mp-")
        self.addCleanup(os.rmdir, self.mount_point)
        self.config = Config(snapshot_mount_point=self.mount_point, snapshot_backend="lvm",
                             snapshot_volumes_filter=self.volumes_filter, lvm_snapshot_size="10G")
        self.runner = FakeRunner(self)
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.mounts = FakeMounts()
        self.mounts.mount("/dev/mapper/vgmysql-mysql", "/var/lib/mysql", "xfs", "253:0",
                          options="rw,noatime")
        self.host = FakeHost("/var/lib/mysql", usage={self.mount_point: 7000,
                                                      self.mount_point + "/mysql": 5000})
        self.service = FakeService(running=True)
        self.backend = LVMBackend(self.config, self.runner, self.clock, self.host, self.service,
                                  read_mounts=self.mounts)

    def expect_lvs(self, name="lvs-snapshots.json"):
        self.runner.expect(LVS_ARGV, stdout=report(name), privileged=True)

    def assertNothingChanged(self):
        changing = [a for a in self.runner.argvs if a[0] not in ("lvs", "blkid")]
        self.assertEqual(changing, [])
        self.assertEqual(self.service.calls, [])


class ReadTests(LVMCase):
    async def test_lvs_argv_and_pattern(self):
        self.expect_lvs()
        volumes = await self.backend.list_volumes("scratch")
        self.assertEqual([(v.group_name, v.name) for v in volumes],
                         [("vgmysql", "scratch"), ("vgdata", "scratch")])
        self.assertEqual(self.runner.calls[0].env["LC_ALL"], "C")

    async def test_snapshots_newest_first_with_invalid_ones(self):
        self.expect_lvs()
        snapshots = await self.backend.list_snapshots()
        self.assertEqual([(v.name, v.snapshot_percent) for v in snapshots], [
            ("mysql-snap-20240502T020000Z", 0.01),
            ("mysql-snap-20240501T020000Z", 12.5),
            ("mysql-snap-20240430T020000Z", 100.0),
        ])

    async def test_overflowed_newest_snapshot_comes_after_the_valid_ones(self):
        # orchestrator seeds from lvs-snapshots[0] without looking at SnapshotPercent.
        text = report("lvs-snapshots.json").replace(
            b'"swi-a-s---", "origin":"mysql", "snap_percent":"0.01"',
            b'"swi-I-s---", "origin":"mysql", "snap_percent":"100.00"')
        self.runner.expect(LVS_ARGV, stdout=text, privileged=True)
        snapshots = await self.backend.list_snapshots()
        self.assertEqual([(v.name, v.snapshot_percent) for v in snapshots], [
            ("mysql-snap-20240501T020000Z", 12.5),
            ("mysql-snap-20240502T020000Z", 100.0),
            ("mysql-snap-20240430T020000Z", 100.0),
        ])

    async def test_get_volume_by_name_vg_name_and_path(self):
        for name in ("mysql-snap-20240501T020000Z", "vgmysql/mysql-snap-20240501T020000Z",
                     "/dev/vgmysql/mysql-snap-20240501T020000Z"):
            self.expect_lvs()
            volume = await self.backend.get_volume(name)
            self.assertEqual(volume.path, "/dev/vgmysql/mysql-snap-20240501T020000Z")

    async def test_unknown_and_ambiguous(self):
        self.expect_lvs()
        with self.assertRaisesRegex(NotFound, "no logical volume 'nope'"):
            await self.backend.get_volume("nope")
        self.expect_lvs()
        with self.assertRaisesRegex(BadRequest, "vgmysql/scratch, vgdata/scratch"):
            await self.backend.get_volume("scratch")

    async def test_lvs_failure_is_reported(self):
        self.runner.expect(LVS_ARGV, exit_code=5, stderr=b"  Volume group not found")
        with self.assertRaisesRegex(CommandFailed, "lvs exited with status 5: Volume group not found"):
            await self.backend.list_volumes()

    async def test_mount_state_unmounted(self):
        state = await self.backend.mount_state()
        self.assertEqual(state.to_json(), {
            "Path": self.mount_point, "Device": "", "LVPath": "", "FileSystem": "",
            "IsMounted": False, "DiskUsage": 0, "MySQLDataPath": "", "MySQLDiskUsage": 0})


class CreateTests(LVMCase):
    async def test_create_snapshot_of_the_datadir_volume(self):
        self.expect_lvs()
        self.runner.expect(["lvcreate", "--snapshot", "--size", "10G", "--name",
                            f"mysql-snap-{STAMP}", "vgmysql/mysql"], privileged=True)
        self.assertIs(await self.backend.create_snapshot(), True)

    async def test_name_clash_is_refused(self):
        self.clock.advance(datetime.datetime(2024, 5, 2, 2, 0, 0, tzinfo=datetime.timezone.utc).timestamp() - NOW)
        self.expect_lvs()
        with self.assertRaisesRegex(Refused, "already exists"):
            await self.backend.create_snapshot()
        self.assertNothingChanged()

    async def test_datadir_not_on_a_logical_volume(self):
        self.mounts.entries.clear()
        self.mounts.mount("/dev/vda1", "/", "ext4", "254:1")
        self.expect_lvs()
        with self.assertRaisesRegex(NotAvailable, "/var/lib/mysql is on /dev/vda1 .* not an LVM logical volume"):
            await self.backend.create_snapshot()
        self.assertNothingChanged()

    async def test_create_snapshot_command_wins(self):
        config = Config(snapshot_backend="lvm", create_snapshot_command="/usr/local/bin/snap --now")
        front = Snapshots(config, self.runner, {"lvm": self.backend}, detect=None)
        self.runner.expect_shell("/usr/local/bin/snap --now")
        self.assertIs(await front.create_snapshot(), True)

    async def test_create_snapshot_command_failure(self):
        config = Config(snapshot_backend="lvm", create_snapshot_command="false")
        front = Snapshots(config, self.runner, {"lvm": self.backend}, detect=None)
        self.runner.expect_shell("false", exit_code=1)
        with self.assertRaisesRegex(CommandFailed, "shell exited with status 1"):
            await front.create_snapshot()


class MountTests(LVMCase):
    snap = "/dev/vgmysql/mysql-snap-20240501T020000Z"

    def mounted(self):
        self.mounts.mount("/dev/mapper/vgmysql-mysql--snap--20240501T020000Z", self.mount_point,
                          "xfs", "253:4", options="ro,relatime")

    async def test_xfs_is_mounted_read_only_with_nouuid(self):
        self.expect_lvs()
        self.runner.expect(["blkid", "-o", "value", "-s", "TYPE", self.snap], stdout=b"xfs\n",
                           privileged=True)
        self.runner.expect(["mount", "-t", "xfs", "-o", "ro,nouuid", self.snap, self.mount_point],
                           privileged=True, effect=self.mounted)
        self.expect_lvs()
        os.mkdir(self.mount_point + "/mysql")
        self.addCleanup(os.rmdir, self.mount_point + "/mysql")
        with open(self.mount_point + "/mysql/ibdata1", "w"):
            pass
        self.addCleanup(os.unlink, self.mount_point + "/mysql/ibdata1")
        state = await self.backend.mount("mysql-snap-20240501T020000Z")
        self.assertEqual(state.to_json(), {
            "Path": self.mount_point,
            "Device": "/dev/mapper/vgmysql-mysql--snap--20240501T020000Z",
            "LVPath": self.snap, "FileSystem": "xfs", "IsMounted": True, "DiskUsage": 7000,
            "MySQLDataPath": self.mount_point + "/mysql", "MySQLDiskUsage": 5000})

    async def test_ext4_is_mounted_read_only(self):
        self.expect_lvs()
        self.runner.expect(["blkid", "-o", "value", "-s", "TYPE", self.snap], stdout=b"ext4\n")
        self.runner.expect(["mount", "-t", "ext4", "-o", "ro", self.snap, self.mount_point],
                           effect=self.mounted)
        self.expect_lvs()
        state = await self.backend.mount(self.snap)
        self.assertTrue(state.is_mounted)
        self.assertEqual(state.mysql_data_path, "")

    async def test_busy_mount_point_is_refused_before_anything_runs(self):
        self.mounted()
        with self.assertRaisesRegex(Refused, f"already mounted on {self.mount_point}"):
            await self.backend.mount("mysql-snap-20240502T020000Z")
        self.assertEqual(self.runner.calls, [])

    async def test_overflowed_snapshot_is_not_mounted(self):
        self.expect_lvs()
        with self.assertRaisesRegex(Refused, "overflowed"):
            await self.backend.mount("mysql-snap-20240430T020000Z")
        self.assertNothingChanged()

    async def test_origin_is_not_mounted(self):
        self.expect_lvs()
        with self.assertRaisesRegex(Refused, "vgmysql/mysql is not a snapshot"):
            await self.backend.mount("vgmysql/mysql")
        self.assertNothingChanged()

    async def test_no_file_system(self):
        self.expect_lvs()
        self.runner.expect(["blkid", "-o", "value", "-s", "TYPE", self.snap], exit_code=2)
        with self.assertRaisesRegex(NotAvailable, "no file system found on"):
            await self.backend.mount(self.snap)
        self.assertNothingChanged()

    async def test_unmount(self):
        self.mounted()
        self.runner.expect(["umount", self.mount_point], privileged=True,
                           effect=lambda: self.mounts.unmount(self.mount_point))
        state = await self.backend.unmount()
        self.assertFalse(state.is_mounted)

    async def test_unmount_when_nothing_is_mounted_runs_nothing(self):
        state = await self.backend.unmount()
        self.assertFalse(state.is_mounted)
        self.assertEqual(self.runner.calls, [])

    async def test_mount_point_not_configured(self):
        backend = LVMBackend(Config(), self.runner, self.clock, self.host, self.service,
                             read_mounts=self.mounts)
        with self.assertRaisesRegex(NotAvailable, "SnapshotMountPoint is not configured"):
            await backend.mount("x")
        self.assertEqual((await backend.mount_state()).to_json()["IsMounted"], False)


class RemoveTests(LVMCase):
    async def test_remove_snapshot(self):
        self.expect_lvs()
        self.runner.expect(["lvremove", "-f", "vgmysql/mysql-snap-20240502T020000Z"], privileged=True)
        self.assertIs(await self.backend.remove("mysql-snap-20240502T020000Z"), True)

    async def test_overflowed_snapshot_can_be_removed(self):
        self.expect_lvs()
        self.runner.expect(["lvremove", "-f", "vgmysql/mysql-snap-20240430T020000Z"])
        await self.backend.remove("/dev/vgmysql/mysql-snap-20240430T020000Z")

    async def test_refuses_non_snapshots_even_when_the_name_matches(self):
        for name in ("vgdata/mysql-snap-lookalike", "vgmysql/mysql"):
            self.expect_lvs()
            with self.assertRaisesRegex(Refused, "only snapshots whose name contains"):
                await self.backend.remove(name)
        self.assertNothingChanged()

    async def test_refuses_mounted_snapshot(self):
        self.mounts.mount("/dev/mapper/x", self.mount_point, "xfs", "253:4")
        self.expect_lvs()
        with self.assertRaisesRegex(Refused, f"mounted on {self.mount_point}"):
            await self.backend.remove("mysql-snap-20240501T020000Z")
        self.assertNothingChanged()

    async def test_unknown_volume(self):
        self.expect_lvs()
        with self.assertRaises(NotFound):
            await self.backend.remove("mysql-snap-29990101T000000Z")
        self.assertNothingChanged()


class OtherFilterTests(LVMCase):
    volumes_filter = "nightly"

    async def test_refuses_snapshot_outside_the_filter(self):
        self.expect_lvs()
        with self.assertRaisesRegex(Refused, "SnapshotVolumesFilter 'nightly'"):
            await self.backend.remove("mysql-snap-20240501T020000Z")
        self.assertNothingChanged()

    async def test_lvs_snapshots_uses_the_filter(self):
        self.expect_lvs()
        self.assertEqual(await self.backend.list_snapshots(), [])


class RestoreTests(LVMCase):
    snap = "vgmysql/mysql-snap-20240501T020000Z"
    replaced = f"mysql-replaced-{STAMP}"
    mount_back = ["mount", "-t", "xfs", "-o", "rw,noatime", "/dev/vgmysql/mysql", "/var/lib/mysql"]

    def expect_until_merge(self):
        self.expect_lvs()
        self.expect_lvs()
        self.runner.expect(["lvcreate", "--snapshot", "--size", f"{10737418240 + 10 * 1024 ** 3}b",
                            "--name", self.replaced, "vgmysql/mysql"], privileged=True)
        self.runner.expect(["umount", "/var/lib/mysql"], privileged=True,
                           effect=lambda: self.mounts.unmount("/var/lib/mysql"))

    def remount(self):
        self.mounts.mount("/dev/mapper/vgmysql-mysql", "/var/lib/mysql", "xfs", "253:0")

    async def test_restore_merges_after_keeping_the_current_state(self):
        self.expect_until_merge()
        self.runner.expect(["lvconvert", "--merge", self.snap], privileged=True)
        self.runner.expect(self.mount_back, privileged=True, effect=self.remount)
        self.assertIs(await self.backend.restore("mysql-snap-20240501T020000Z"), True)
        self.assertEqual(self.service.calls, ["stop", "start"])
        self.assertTrue(self.service.running)
        merge = [c for c in self.runner.calls if c.argv[0] == "lvconvert"][0]
        self.assertEqual(merge.timeout, 0)

    async def test_failed_merge_puts_everything_back(self):
        self.expect_until_merge()
        self.runner.expect(["lvconvert", "--merge", self.snap], exit_code=5, stderr=b"  Unable to merge")
        self.runner.expect(["lvconvert", "--merge", f"vgmysql/{self.replaced}"])
        self.runner.expect(self.mount_back, effect=self.remount)
        with self.assertRaises(RestoreFailed) as caught:
            await self.backend.restore(self.snap)
        message = caught.exception.message
        self.assertIn("failed at step 4/6 (merge vgmysql/mysql-snap-20240501T020000Z into vgmysql/mysql)", message)
        self.assertIn("Unable to merge", message)
        self.assertIn("rolled back", message)
        self.assertEqual(self.service.calls, ["stop", "start"])

    async def test_failed_unmount_drops_the_unused_copy(self):
        self.expect_lvs()
        self.expect_lvs()
        self.runner.expect(["lvcreate", "--snapshot", "--size", f"{10737418240 + 10 * 1024 ** 3}b",
                            "--name", self.replaced, "vgmysql/mysql"])
        self.runner.expect(["umount", "/var/lib/mysql"], exit_code=32, stderr=b"target is busy")
        with_replaced = report("lvs-snapshots.json").replace(
            b'"lv_name":"scratch", "vg_name":"vgmysql"',
            f'"lv_name":"{self.replaced}", "vg_name":"vgmysql"'.encode())
        self.runner.expect(LVS_ARGV, stdout=with_replaced)
        self.runner.expect(["lvremove", "-f", f"vgmysql/{self.replaced}"], privileged=True)
        with self.assertRaisesRegex(RestoreFailed, r"step 3/6 .*target is busy.*rolled back"):
            await self.backend.restore(self.snap)
        self.assertEqual(self.service.calls, ["stop", "start"])

    async def test_failed_start_merges_the_old_state_back(self):
        self.service.fail["start"] = CommandFailed("cannot start MySQL: exit 1")
        self.expect_until_merge()
        self.runner.expect(["lvconvert", "--merge", self.snap])
        self.runner.expect(self.mount_back, effect=self.remount)
        self.runner.expect(["umount", "/var/lib/mysql"], effect=lambda: self.mounts.unmount("/var/lib/mysql"))
        self.runner.expect(["lvconvert", "--merge", f"vgmysql/{self.replaced}"])
        self.runner.expect(self.mount_back, effect=self.remount)
        with self.assertRaisesRegex(RestoreFailed, r"step 6/6 \(start MySQL\): cannot start MySQL.*rolled back"):
            await self.backend.restore(self.snap)
        self.assertEqual(self.service.calls, ["stop", "start", "start"])
        self.assertTrue(self.service.running)

    async def test_failed_undo_stops_the_undo_and_says_where_the_data_is(self):
        self.service.fail["start"] = CommandFailed("cannot start MySQL")
        self.expect_until_merge()
        self.runner.expect(["lvconvert", "--merge", self.snap])
        self.runner.expect(self.mount_back, effect=self.remount)
        self.runner.expect(["umount", "/var/lib/mysql"], effect=lambda: self.mounts.unmount("/var/lib/mysql"))
        self.runner.expect(["lvconvert", "--merge", f"vgmysql/{self.replaced}"], exit_code=5)
        with self.assertRaisesRegex(RestoreFailed, f"ROLLBACK INCOMPLETE.*kept at LVM snapshot vgmysql/{self.replaced}"):
            await self.backend.restore(self.snap)
        self.assertEqual(self.service.calls, ["stop", "start"])

    async def test_refuses_overflowed_snapshot(self):
        self.expect_lvs()
        with self.assertRaisesRegex(Refused, "overflowed"):
            await self.backend.restore("mysql-snap-20240430T020000Z")
        self.assertNothingChanged()

    async def test_refuses_a_volume_that_is_no_snapshot_of_the_datadir(self):
        for name in ("vgmysql/scratch", "vgdata/mysql-snap-lookalike"):
            self.expect_lvs()
            with self.assertRaisesRegex(Refused, "is not a snapshot of the datadir's volume vgmysql/mysql"):
                await self.backend.restore(name)
        self.assertNothingChanged()

    async def test_refuses_mounted_snapshot(self):
        self.mounts.mount("/dev/mapper/x", self.mount_point, "xfs", "253:4")
        self.expect_lvs()
        with self.assertRaisesRegex(Refused, "unmount it first"):
            await self.backend.restore(self.snap)
        self.assertNothingChanged()

    async def test_refuses_root_file_system(self):
        self.mounts.entries.clear()
        self.mounts.mount("/dev/mapper/vgmysql-mysql", "/", "xfs", "253:0")
        self.expect_lvs()
        with self.assertRaisesRegex(Refused, "root file system"):
            await self.backend.restore(self.snap)
        self.assertNothingChanged()


class RealLvsTests(unittest.TestCase):
    """The backend's own lvs command, run for real against a loop-device volume group
    (plain volumes only: creating them needs ``--driverloaded n`` here)."""

    def setUp(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root (losetup, LVM)")
        if not os.path.exists("/dev/loop-control") or subprocess.run(
                ["which", "lvs"], stdout=subprocess.DEVNULL).returncode != 0:
            raise unittest.SkipTest("needs loop devices and lvm2")
        env = dict(os.environ, LVM_SUPPRESS_FD_WARNINGS="1")

        def lvm(*argv):
            subprocess.run([argv[0], "--driverloaded", "n", *argv[1:]], check=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        base = tempfile.mkdtemp(prefix="orchagent-lvm-")
        self.addCleanup(subprocess.run, ["rm", "-rf", base])
        image = os.path.join(base, "pv")
        with open(image, "wb") as fh:
            fh.truncate(64 * 1024 * 1024)
        device = subprocess.run(["losetup", "--find", "--show", image], check=True,
                                stdout=subprocess.PIPE, text=True).stdout.strip()
        self.addCleanup(subprocess.run, ["losetup", "-d", device])
        self.vg = "orchtest" + uuid.uuid4().hex[:8]
        lvm("pvcreate", device)
        self.addCleanup(lvm, "pvremove", "-ff", "-y", device)
        lvm("vgcreate", self.vg, device)
        self.addCleanup(lvm, "vgremove", "-f", self.vg)
        lvm("lvcreate", "-an", "-Zn", "-L", "8M", "-n", "mysql-snap-lookalike", self.vg)
        lvm("lvcreate", "-an", "-Zn", "-L", "4M", "-n", "data", self.vg)

    async def test_real_lvs_report(self):
        backend = LVMBackend(Config(snapshot_volumes_filter="mysql-snap"),
                             ProcessRunner(reactor), reactor, FakeHost(), FakeService())
        volumes = [v for v in await backend.volumes() if v.vg == self.vg]
        self.assertEqual(sorted((v.name, v.size, v.is_snapshot) for v in volumes),
                         [("data", 4 * 1024 * 1024, False),
                          ("mysql-snap-lookalike", 8 * 1024 * 1024, False)])
        self.assertFalse([v for v in await backend.list_snapshots() if v.group_name == self.vg])
        volume = await backend.get_volume(f"/dev/{self.vg}/data")
        self.assertEqual((volume.name, volume.group_name), ("data", self.vg))
