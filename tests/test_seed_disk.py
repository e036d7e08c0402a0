"""Seeds onto real small file systems (loop devices): full disks, mount points, subvolumes."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

from twisted.trial import unittest

from orchagent import durable
from orchagent.seed import sender, staging, tree, tree_receive
from orchagent.seed.staging import Staging
from tests import seed_support as S
from tests.support import lossy_disk

CHUNK = 256 * 1024


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


class LoopFileSystemCase(unittest.TestCase):
    timeout = 60

    def setUp(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("loop devices and mounts need root")
        for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
            if shutil.which(tool) is None:
                raise unittest.SkipTest(f"{tool} is not installed")
        self.base = os.path.abspath(self.mktemp())
        self.src = os.path.join(self.base, "src")
        os.makedirs(self.src)
        self.port = S.free_port()
        self.patch(sender, "BACKOFF_FIRST", 0.05)

    def loop_fs(self, kind: str = "ext4", size_mib: int = 64, *mkfs_args: str) -> str:
        """A fresh file system of ``size_mib`` on a loop device, mounted; all undone at cleanup."""
        image = os.path.join(self.base, f"{kind}.img")
        mnt = os.path.join(self.base, f"{kind}-mnt")
        os.makedirs(mnt)
        with open(image, "wb") as fh:
            fh.truncate(size_mib << 20)
        if kind == "btrfs":
            _run("mkfs.btrfs", "-q", "-f", *mkfs_args, image)
        else:
            _run("mkfs.ext4", "-q", "-F", *mkfs_args, image)
        device = _run("losetup", "--find", "--show", image)
        self.addCleanup(_run, "losetup", "-d", device)
        _run("mount", device, mnt)
        self.addCleanup(_run, "umount", mnt)
        return mnt

    def managers(self, datadir: str, **sender_overrides):
        r = S.make_manager(self, os.path.join(self.base, "r"), datadir, self.port)
        sender_overrides.setdefault("chunk_size", CHUNK)
        s = S.make_manager(self, os.path.join(self.base, "s"), self.src, self.port,
                           snapshot=self.src, **sender_overrides)
        return r, s

    def write(self, name: str, size: int) -> bytes:
        data = os.urandom(size)
        with open(os.path.join(self.src, name), "wb") as fh:
            fh.write(data)
        return data


class FullDiskTests(LoopFileSystemCase):
    async def test_seed_larger_than_the_disk_fails_fast_with_both_numbers(self):
        mnt = self.loop_fs()
        datadir = os.path.join(mnt, "mysql")
        os.makedirs(datadir)
        with open(os.path.join(datadir, "keep"), "w") as fh:
            fh.write("old")
        before = S.snapshot_tree(datadir)
        self.write("big.ibd", 100 << 20)
        r, s = self.managers(datadir)
        await r.receive("1")
        await s.send(f"127.0.0.1:{self.port}", "1", source="datadir")
        status = await S.finished(r, "1")
        self.assertEqual(status["State"], "failed")
        self.assertRegex(status["Error"], r"not enough space for seed 1 in .*/mysql: it needs "
                                          r"\d+ bytes, \d+ bytes are free")
        self.assertEqual(status["BytesDone"], 0)
        sent = await S.finished(s, "1")
        self.assertIn("not enough space", sent["Error"])
        self.assertEqual(s.jobs.get("1"), None)
        self.assertEqual(S.snapshot_tree(datadir), before)
        self.assertEqual(sorted(os.listdir(mnt)), ["lost+found", "mysql"])

    async def test_seed_of_more_files_than_free_inodes_fails_fast(self):
        mnt = self.loop_fs("ext4", 64, "-N", "128")
        datadir = os.path.join(mnt, "mysql")
        os.makedirs(datadir)
        free = os.statvfs(mnt).f_favail
        for i in range(free + 10):
            self.write(f"t{i}.frm", 100)
        r, s = self.managers(datadir)
        await r.receive("1")
        await s.send(f"127.0.0.1:{self.port}", "1", source="datadir")
        status = await S.finished(r, "1")
        self.assertEqual(status["State"], "failed")
        self.assertRegex(status["Error"], rf"not enough inodes for seed 1 in .*/mysql: it needs "
                                          rf"{free + 10} files and directories, {free} inodes are free")
        self.assertEqual(status["BytesDone"], 0)
        self.assertEqual(os.listdir(datadir), [])
        self.assertEqual(sorted(os.listdir(mnt)), ["lost+found", "mysql"])

    async def test_disk_filling_up_during_the_seed_fails_cleanly(self):
        mnt = self.loop_fs()
        datadir = os.path.join(mnt, "mysql")
        os.makedirs(datadir)
        with open(os.path.join(datadir, "keep"), "w") as fh:
            fh.write("old")
        before = S.snapshot_tree(datadir)
        # The receiver reserves each large file's blocks when its first chunk arrives:
        # the space is taken while a.ibd is being received, so big.ibd finds none.
        self.write("a.ibd", 20 << 20)
        self.write("big.ibd", 20 << 20)
        r, s = self.managers(datadir, seed_rate_limit_bytes_per_sec=8 << 20)
        await r.receive("2")
        await s.send(f"127.0.0.1:{self.port}", "2", source="datadir")
        await S.wait_for(lambda: r.records["2"].bytes_done > 0)
        # Something else takes all the space that was free when the seed started.
        st = os.statvfs(mnt)
        _run("fallocate", "-l", str(st.f_bavail * st.f_frsize), os.path.join(mnt, "filler"))
        status = await S.finished(r, "2")
        self.assertEqual(status["State"], "failed")
        self.assertIn("No space left on device while writing big.ibd at offset", status["Error"])
        await S.wait_for(lambda: "2" not in r.jobs)
        self.assertEqual(S.snapshot_tree(datadir), before)
        self.assertEqual(sorted(os.listdir(mnt)), ["filler", "lost+found", "mysql"])
        self.assertEqual((await S.finished(s, "2"))["State"], "failed")

    async def test_running_out_of_inodes_fails_cleanly(self):
        # As if the inodes went to another writer after the check (which fails fast:
        # test_seed_of_more_files_than_free_inodes_fails_fast): the seed runs out part-way.
        self.patch(tree_receive, "free_inodes", lambda path: None)
        mnt = self.loop_fs("ext4", 64, "-N", "64")
        datadir = os.path.join(mnt, "mysql")
        os.makedirs(datadir)
        before = S.snapshot_tree(datadir)
        for i in range(150):
            self.write(f"t{i:03}.frm", 1000)
        r, s = self.managers(datadir)
        await r.receive("3")
        await s.send(f"127.0.0.1:{self.port}", "3", source="datadir")
        status = await S.finished(r, "3")
        self.assertEqual(status["State"], "failed")
        self.assertIn("No space left on device while writing t", status["Error"])
        await S.wait_for(lambda: "3" not in r.jobs)
        self.assertEqual(S.snapshot_tree(datadir), before)
        self.assertEqual(sorted(os.listdir(mnt)), ["lost+found", "mysql"])


class LostWriteTests(LoopFileSystemCase):
    """Staging on a disk whose writes are lost on their way to it (a real writeback
    error: tests.support.lossy_disk): the seed fails naming it, the datadir as it was.
    The kernel reports a writeback error to one syncfs only: the background write-back
    must fail the seed on it too (tests.test_seed_transfer,
    test_a_write_error_that_a_background_pass_met_fails_the_seed)."""

    async def test_a_seed_onto_a_disk_losing_writes_fails(self):
        self.patch(tree_receive, "WRITEBACK_BYTES", 256 << 10)
        mnt = lossy_disk.make_lossy_disk(self, 16 << 20)
        datadir = os.path.join(mnt, "mysql")
        os.makedirs(datadir)
        with open(os.path.join(datadir, "keep"), "w") as fh:
            fh.write("old")
        lossy_disk.limit(mnt, 0)
        before = S.snapshot_tree(datadir)
        for i in range(100):
            self.write(f"t{i:03}.frm", 32 << 10)
        r, s = self.managers(datadir)
        await r.receive("4")
        await s.send(f"127.0.0.1:{self.port}", "4", source="datadir")
        status = await S.finished(r, "4")
        self.assertEqual(status["State"], "failed")
        self.assertRegex(status["Error"], r"the file system of .*/\.mysql\.orchagent-seed-4 reported "
                         r"a write error \((EIO|ENOSPC): .*\) while the seed's staged copy was "
                         "written: it may not be on disk")
        await S.wait_for(lambda: "4" not in r.jobs)
        self.assertEqual(S.snapshot_tree(datadir), before)
        self.assertEqual(sorted(os.listdir(mnt)), ["lost+found", "mysql"])

    async def test_a_write_error_another_process_met_first_still_fails_the_seed(self):
        """A syncfs of the same file system by someone else (here `sync -f`) between
        the writes and the seed's last sync: the kernel reports the error to a descriptor
        opened before it, and to that caller; a descriptor opened after would hear nothing.
        So staging counts the errors from the moment it is made."""
        self.patch(tree_receive, "WRITEBACK_BYTES", 1 << 40)  # no background pass
        mnt = lossy_disk.make_lossy_disk(self, 16 << 20)
        datadir = os.path.join(mnt, "mysql")
        os.makedirs(datadir)
        lossy_disk.limit(mnt, 0)
        before = S.snapshot_tree(datadir)
        for i in range(100):
            self.write(f"t{i:03}.frm", 32 << 10)
        met = []
        last_sync = staging.Staging.sync

        def someone_syncs_first(staged):
            met.append(subprocess.run(["sync", "-f", staged.root], capture_output=True).returncode)
            last_sync(staged)

        self.patch(staging.Staging, "sync", someone_syncs_first)
        r, s = self.managers(datadir)
        await r.receive("4")
        await s.send(f"127.0.0.1:{self.port}", "4", source="datadir")
        status = await S.finished(r, "4")
        self.assertEqual(met, [1])  # the other process was told of the error
        self.assertEqual(status["State"], "failed")
        self.assertRegex(status["Error"], r"reported a write error \((EIO|ENOSPC): .*\) while the "
                         "seed's staged copy was written")
        await S.wait_for(lambda: "4" not in r.jobs)
        self.assertEqual(S.snapshot_tree(datadir), before)


class MovedIntoPlaceTests(LoopFileSystemCase):
    async def _seed_into(self, datadir: str):
        # Staging cannot live beside this datadir (another file system): it goes inside.
        self.assertTrue(Staging(datadir, "4").inside)
        data = self.write("ibdata1", 3 << 20)
        os.makedirs(os.path.join(self.src, "db"))
        self.write("db/t.ibd", 100_000)
        r, s = self.managers(datadir)
        await r.receive("4")
        await s.send(f"127.0.0.1:{self.port}", "4", source="datadir")
        status = await S.finished(r, "4")
        self.assertEqual(status["State"], "completed", status["Error"])
        self.assertEqual(S.snapshot_tree(datadir), S.snapshot_tree(self.src) | {
            k: v for k, v in S.snapshot_tree(datadir).items() if k == "lost+found"})
        with open(os.path.join(datadir, "ibdata1"), "rb") as fh:
            self.assertEqual(fh.read(), data)
        self.assertFalse([n for n in os.listdir(datadir) if n.startswith(".orchagent")])

    async def test_datadir_that_is_a_mount_point(self):
        mnt = self.loop_fs()
        await self._seed_into(mnt)

    async def test_datadir_that_is_a_btrfs_subvolume(self):
        if shutil.which("mkfs.btrfs") is None:
            raise unittest.SkipTest("btrfs-progs is not installed")
        mnt = self.loop_fs("btrfs", 128)
        datadir = os.path.join(mnt, "mysql")
        _run("btrfs", "subvolume", "create", datadir)
        self.assertNotEqual(os.stat(mnt).st_dev, os.stat(datadir).st_dev)
        await self._seed_into(datadir)


class NeededSpaceTests(LoopFileSystemCase):
    """The free-space check's estimate against what a tree really takes on ext4 and
    btrfs: never less, and at most half again as much, for the tree where per-file
    metadata weighs most (small files)."""

    def _check(self, mnt: str) -> None:
        for i in range(2000):
            directory = os.path.join(self.src, f"db{i // 500}")
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, f"table_number_{i:05d}.ibd"), "wb") as fh:
                fh.write(os.urandom(4096))

        def used() -> int:
            durable.syncfs(mnt)
            st = os.statvfs(mnt)
            return (st.f_blocks - st.f_bfree) * st.f_frsize

        before = used()
        shutil.copytree(self.src, os.path.join(mnt, "mysql"))
        taken = used() - before
        needed = tree.walk(self.src).needed_space(os.statvfs(mnt).f_bsize)
        self.assertGreaterEqual(needed, taken)
        self.assertLessEqual(needed, taken * 1.5)

    def test_ext4(self):
        self._check(self.loop_fs("ext4", 64))

    def test_btrfs(self):
        if shutil.which("mkfs.btrfs") is None:
            raise unittest.SkipTest("btrfs-progs is not installed")
        self._check(self.loop_fs("btrfs", 256))


def _resident_bytes(path: str) -> int:
    """Bytes of ``path`` in the page cache (util-linux fincore)."""
    return int(_run("fincore", "--bytes", "--noheadings", "--output", "RES", path))


class DirectWriteTests(LoopFileSystemCase):
    """Large chunks are written with O_DIRECT where the file system takes it, buffered
    where it doesn't; the unaligned tail of a file is written buffered either way."""

    SIZE = (4 << 20) + 1000

    async def _seed(self, datadir: str, seed_id: str) -> tuple[int, int]:
        """Seed one file; the bytes of it left in the page cache (before it is read back),
        and the bytes the receiver counted as written through it (for its write-backs)."""
        data = self.write("ibdata1", self.SIZE)
        r = S.make_manager(self, os.path.join(self.base, "r"), datadir, self.port)
        s = S.make_manager(self, os.path.join(self.base, "s"), self.src, self.port,
                           snapshot=self.src, chunk_size=1 << 20)
        await r.receive(seed_id)
        staged = r.jobs[seed_id].staging
        await s.send(f"127.0.0.1:{self.port}", seed_id, source="datadir")
        status = await S.finished(r, seed_id)
        self.assertEqual(status["State"], "completed", status["Error"])
        path = os.path.join(datadir, "ibdata1")
        resident = _resident_bytes(path)
        with open(path, "rb") as fh:
            self.assertEqual(fh.read(), data)
        return resident, staged.buffered_bytes

    def setUp(self):
        super().setUp()
        if shutil.which("fincore") is None:
            raise unittest.SkipTest("fincore (util-linux) is not installed")
        mnt = self.loop_fs()
        self.datadir = os.path.join(mnt, "mysql")
        os.makedirs(self.datadir)

    async def test_large_chunks_bypass_the_page_cache(self):
        resident, buffered = await self._seed(self.datadir, "5")
        # Only the 1000-byte tail went through the page cache; the 4 MiB before it did not.
        self.assertLessEqual(resident, 64 << 10)
        self.assertEqual(buffered, 1000)

    async def test_a_file_system_refusing_o_direct_gets_buffered_writes(self):
        # Every file system here takes O_DIRECT (tmpfs too, since Linux 6.6); some FUSE
        # and network file systems answer EINVAL, as this stand-in does.
        def refuse(path, flags, *mode):
            if flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument", path)
            return real_open(path, flags, *mode)

        real_open = os.open
        self.patch(staging.os, "open", refuse)
        resident, buffered = await self._seed(self.datadir, "6")
        self.assertGreaterEqual(resident, 4 << 20)
        self.assertEqual(buffered, self.SIZE)
