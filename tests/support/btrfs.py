"""A real btrfs file system on a loop file, for one test.

Example (blocking, in ``setUp`` or at the start of a test)::

    from tests.support.btrfs import make_btrfs

    fs = make_btrfs(self)                       # mounted; cleanup registered
    datadir = fs.subvolume("datadir")           # <mount>/datadir, a subvolume
    snapshots = fs.directory("snapshots")       # a plain directory on the same fs
    mount_point = fs.scratch("mnt")             # a directory outside the fs (mount target)

:func:`make_btrfs` makes a sparse file in a fresh temp dir, attaches it to a free loop
device, runs ``mkfs.btrfs`` and mounts it in the temp dir.  The cleanup (``addCleanup``,
so it also runs when the test fails) unmounts every mount of that loop device (deepest
first, anywhere: bind mounts of its subvolumes included), detaches the loop device and
removes the temp dir.  It raises SkipTest when not root or without loop devices or
btrfs-progs.

Everything here is blocking (``subprocess``); it is test set-up, run before the reactor
work of the test, and each command takes milliseconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

DEFAULT_SIZE = 512 * 1024 * 1024


def unavailable_reason() -> str | None:
    """Why a loop-file btrfs cannot be made here (for SkipTest), or None."""
    if os.geteuid() != 0:
        return "a loop-file btrfs needs root (losetup, mount)"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices (/dev/loop-control is missing)"
    for tool in ("mkfs.btrfs", "btrfs", "losetup", "mount", "umount"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}") \
                and not os.path.exists(f"/sbin/{tool}"):
            return f"{tool} is not installed (apt-get install btrfs-progs util-linux)"
    try:
        with open("/proc/filesystems") as fh:
            if "btrfs" not in fh.read():
                return "the kernel has no btrfs"
    except OSError:
        pass
    return None


def _run(*argv: str) -> str:
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def _mounts_of(device: str) -> list[str]:
    """Mount points whose source is ``device``, deepest first."""
    from orchagent.snapshots import mountinfo

    points = [e.mount_point for e in mountinfo.read() if e.source == device]
    return sorted(points, key=lambda p: p.count("/"), reverse=True)


class BtrfsFS:
    """A mounted loop-file btrfs; see the module docstring."""

    def __init__(self, base: str, image: str, device: str, mount_point: str, label: str):
        #: The temp dir holding the image, the mount point and scratch directories.
        self.base = base
        self.image = image
        self.device = device
        self.mount_point = mount_point
        self.label = label

    def path(self, relative: str) -> str:
        return os.path.join(self.mount_point, relative)

    def subvolume(self, relative: str) -> str:
        """Create a subvolume at ``relative`` below the mount point; its path."""
        path = self.path(relative)
        _run("btrfs", "subvolume", "create", path)
        return path

    def directory(self, relative: str) -> str:
        """Create a plain directory on the file system; its path."""
        path = self.path(relative)
        os.makedirs(path)
        return path

    def scratch(self, name: str) -> str:
        """A directory next to (not on) the file system, e.g. a mount target."""
        path = os.path.join(self.base, name)
        os.makedirs(path, exist_ok=True)
        return path

    def is_subvolume(self, path: str) -> bool:
        return os.lstat(path).st_ino == 256

    def cleanup(self) -> None:
        """Unmount everything of the device, detach it, remove the temp dir."""
        if not self.device:
            shutil.rmtree(self.base, ignore_errors=True)
            return
        for point in _mounts_of(self.device):
            for _ in range(50):
                if subprocess.run(["umount", point], stderr=subprocess.DEVNULL).returncode == 0:
                    break
                time.sleep(0.1)
            else:
                subprocess.run(["umount", "-l", point], stderr=subprocess.DEVNULL)
        subprocess.run(["losetup", "-d", self.device], stderr=subprocess.DEVNULL)
        shutil.rmtree(self.base, ignore_errors=True)


def _attach(image: str) -> str:
    """``losetup --find --show`` with retries: another test may take the same free device."""
    last = None
    for _ in range(10):
        try:
            return _run("losetup", "--find", "--show", image).strip()
        except RuntimeError as e:
            last = e
            time.sleep(0.1)
    raise RuntimeError(f"cannot attach a loop device: {last}")


def make_btrfs(testcase, size: int = DEFAULT_SIZE, label: str = "orchtest") -> BtrfsFS:
    """A fresh btrfs for ``testcase``, mounted, with its cleanup registered."""
    from twisted.trial.unittest import SkipTest

    reason = unavailable_reason()
    if reason:
        raise SkipTest(reason)
    base = tempfile.mkdtemp(prefix="orchagent-btrfs-")
    os.chmod(base, 0o755)
    image = os.path.join(base, "image")
    mount_point = os.path.join(base, "fs")
    os.mkdir(mount_point)
    with open(image, "wb") as fh:
        fh.truncate(size)
    fs = BtrfsFS(base, image, "", mount_point, label)
    testcase.addCleanup(fs.cleanup)
    fs.device = _attach(image)
    _run("mkfs.btrfs", "-q", "-f", "-L", label, fs.device)
    _run("mount", "-t", "btrfs", fs.device, mount_point)
    return fs
