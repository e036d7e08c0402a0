"""Disk usage walks and log tails on real files."""

from __future__ import annotations

import os
import subprocess

from twisted.trial import unittest

from orchagent.errors import NotFound
from orchagent.host.diskusage import available_space, disk_usage, tail_lines


def make_file(path: str, size: int) -> None:
    with open(path, "wb") as fh:
        fh.write(b"x" * size)


class DiskUsageTests(unittest.TestCase):
    def setUp(self):
        self.top = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.top, "a", "b"))
        make_file(os.path.join(self.top, "one"), 1000)
        make_file(os.path.join(self.top, "a", "two"), 20000)
        make_file(os.path.join(self.top, "a", "b", "three"), 300000)
        os.link(os.path.join(self.top, "a", "two"), os.path.join(self.top, "a", "b", "two-again"))
        outside = os.path.abspath(self.mktemp())
        os.makedirs(outside)
        make_file(os.path.join(outside, "big"), 5_000_000)
        os.symlink(outside, os.path.join(self.top, "link-to-outside"))

    def du(self, *flags) -> int:
        out = subprocess.run(["du", "-sb", *flags, self.top], check=True, stdout=subprocess.PIPE).stdout
        return int(out.split()[0])

    def test_apparent_bytes_like_du_sb(self):
        directories = sum(os.lstat(p).st_size for p in (
            self.top, os.path.join(self.top, "a"), os.path.join(self.top, "a", "b")))
        link = os.lstat(os.path.join(self.top, "link-to-outside")).st_size
        expected = 1000 + 20000 + 300000 + directories + link
        self.assertEqual(disk_usage(self.top), expected)
        self.assertEqual(disk_usage(self.top), self.du())

    def test_a_file(self):
        self.assertEqual(disk_usage(os.path.join(self.top, "a", "two")), 20000)

    def test_missing_path(self):
        e = self.assertRaises(NotFound, disk_usage, os.path.join(self.top, "nope"))
        self.assertIn("nope", e.message)

    def test_other_file_systems_are_not_entered(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("mounting a tmpfs needs root")
        mount_point = os.path.join(self.top, "a", "mnt")
        os.mkdir(mount_point)
        before = disk_usage(self.top)
        empty_directory = os.lstat(mount_point).st_size
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", mount_point], check=True)
        self.addCleanup(subprocess.run, ["umount", mount_point], check=True)
        make_file(os.path.join(mount_point, "elsewhere"), 4_000_000)
        # the mount point's entry is now the tmpfs root: neither it nor its contents count
        self.assertEqual(disk_usage(self.top), before - empty_directory)
        self.assertEqual(disk_usage(mount_point), 4_000_000 + os.lstat(mount_point).st_size)

    def test_available_space_is_statvfs(self):
        # On a tmpfs of its own: on the shared root file system, anything else writing
        # between the two reads changed the figure (a CI run met it).
        if os.geteuid() != 0:
            raise unittest.SkipTest("mounting a tmpfs needs root")
        private = os.path.join(self.top, "a", "private")
        os.mkdir(private)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", private], check=True)
        self.addCleanup(subprocess.run, ["umount", private], check=True)
        make_file(os.path.join(private, "some"), 1_000_000)
        st = os.statvfs(private)
        self.assertEqual(available_space(private), st.f_bavail * st.f_frsize)
        self.assertLess(available_space(private), 16 << 20)
        self.assertRaises(NotFound, available_space, os.path.join(self.top, "nope"))


class TailTests(unittest.TestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def write(self, data: bytes) -> str:
        path = os.path.join(self.dir, "error.log")
        with open(path, "wb") as fh:
            fh.write(data)
        return path

    def test_last_lines_of_a_big_log_exactly(self):
        path = os.path.join(self.dir, "big.log")
        with open(path, "wb") as fh:
            for block in range(200):
                fh.write(b"".join(b"2024-01-01 00:00:00 0 [Note] line %d\n" % (block * 10000 + i)
                                  for i in range(10000)))
        self.assertGreater(os.path.getsize(path), 50_000_000)
        tail = tail_lines(path, 20)
        self.assertEqual(tail, [f"2024-01-01 00:00:00 0 [Note] line {n}" for n in range(1999980, 2000000)])
        expected = subprocess.run(["tail", "-n", "20", path], check=True, stdout=subprocess.PIPE).stdout
        self.assertEqual(tail, expected.decode().splitlines())

    def test_without_final_newline_and_short_files(self):
        self.assertEqual(tail_lines(self.write(b"a\nb\nc"), 2), ["b", "c"])
        self.assertEqual(tail_lines(self.write(b"a\n\nb\n"), 20), ["a", "", "b"])
        self.assertEqual(tail_lines(self.write(b""), 20), [])
        self.assertEqual(tail_lines(self.write(b"only\n"), 20), ["only"])

    def test_memory_is_bounded_for_huge_lines(self):
        path = self.write(b"start\n" + b"y" * 3_000_000 + b"\nlast\n")
        tail = tail_lines(path, 20, max_bytes=100_000)
        self.assertEqual(tail[-1], "last")
        self.assertEqual(len(tail[0]), 100_000 - len(b"\nlast\n"))

    def test_invalid_utf8_is_replaced(self):
        self.assertEqual(tail_lines(self.write(b"ok\n\xff\xfe bad\n"), 2), ["ok", "\ufffd\ufffd bad"])

    def test_missing_log(self):
        e = self.assertRaises(NotFound, tail_lines, os.path.join(self.dir, "none.err"), 20)
        self.assertIn("none.err", e.message)

