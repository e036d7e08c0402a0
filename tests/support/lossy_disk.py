"""A file system whose writes are accepted and then lost on their way to the disk.

``make_lossy_disk(self, room)`` makes an ext4 (no journal, ``errors=continue``) on a
loop device whose sparse backing file lies on a tmpfs with ``room`` bytes to spare
once the file system is made (:func:`limit` sets it again).  Writes land in the page
cache as on any disk; once the tmpfs is full, their writeback fails (the loop device answers EIO), the kernel
drops the pages and records the error for the file system, exactly as a failing disk
would.  This kernel has no device-mapper (no dm-error, no dm-flakey): this is how a
real writeback error is made here.  ``fdatasync`` of such a file fails; ``syncfs`` on a
descriptor opened before the write reports it (Linux 5.8 and later).

The cleanup (``addCleanup``) unmounts the ext4, detaches the loop device, unmounts the
tmpfs and removes the temp dir.  Blocking (``subprocess``), for set-up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from tests.support.btrfs import _run


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "a loop-file ext4 needs root (losetup, mount)"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices (/dev/loop-control is missing)"
    if shutil.which("mkfs.ext4") is None:
        return "mkfs.ext4 is not installed (e2fsprogs)"
    return None


def make_lossy_disk(case, room: int, size: int = 256 << 20) -> str:
    """Mount point of the ext4 (see the module docstring); ``room``: the bytes its
    writes may take on the backing tmpfs before they start failing."""
    reason = unavailable_reason()
    if reason:
        from twisted.trial.unittest import SkipTest

        raise SkipTest(reason)
    base = tempfile.mkdtemp(prefix="orchagent-lossy-")
    backing, mount_point = os.path.join(base, "backing"), os.path.join(base, "fs")
    os.makedirs(backing)
    os.makedirs(mount_point)
    steps = []

    def cleanup():
        for step in reversed(steps):
            subprocess.run(step, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(base, ignore_errors=True)

    case.addCleanup(cleanup)
    _run("mount", "-t", "tmpfs", "-o", f"size={size + (64 << 20)}", "tmpfs", backing)
    steps.append(("umount", backing))
    image = os.path.join(backing, "disk")
    with open(image, "wb") as fh:
        fh.truncate(size)
    # Inode tables written now, while there is room: only the data and directories
    # written later go missing.
    _run("mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-E", "lazy_itable_init=0", image)
    device = _run("losetup", "--find", "--show", image).strip()
    steps.append(("losetup", "-d", device))
    _run("mount", "-o", "errors=continue", device, mount_point)
    steps.append(("umount", "-l", mount_point))
    limit(mount_point, room)
    return mount_point


def limit(mount_point: str, room: int) -> None:
    """From now on, ``room`` more bytes of newly allocated blocks reach the disk under
    ``mount_point`` (a disk of :func:`make_lossy_disk`); writes in place of blocks in
    use still do.  What is in the page cache now is written first."""
    subprocess.run(["sync", "-f", mount_point], check=True)
    # The file system's free blocks become holes in the backing file (the loop device
    # punches them for a discard): every block it allocates from now on needs room, none
    # is one written before and freed since.
    subprocess.run(["fstrim", mount_point], check=True)
    backing = os.path.join(os.path.dirname(mount_point), "backing")
    filler = os.path.join(backing, "filler")
    if os.path.exists(filler):
        os.unlink(filler)
    free = os.statvfs(backing)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        if free.f_bavail * free.f_frsize > room:
            os.posix_fallocate(fd, 0, free.f_bavail * free.f_frsize - room)
    finally:
        os.close(fd)


def heal(mount_point: str) -> None:
    """Room again for what is written from now on (what was lost stays lost)."""
    os.unlink(os.path.join(os.path.dirname(mount_point), "backing", "filler"))
