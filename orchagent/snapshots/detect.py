"""``SnapshotBackend: auto``: pick the backend from the file system holding the datadir.

A datadir that is the root of a btrfs subvolume gets btrfs snapshots; one on a
device-mapper device that ``lvs`` knows as a logical volume gets LVM snapshots; anything
else gets cold copies.  The answer needs only the mount table, one ``lstat``, a sysfs
lookup and at most one ``lvs``.
"""

from __future__ import annotations

import os
from typing import Any

from orchagent.errors import CommandFailed, NotAvailable
from orchagent.snapshots import mountinfo
from orchagent.snapshots.btrfs import SUBVOLUME_ROOT_INODE

SYS_DEV_BLOCK = "/sys/dev/block"


async def detect_backend(host: Any, lvm: Any, read_mounts=mountinfo.read,
                         sys_dev_block: str = SYS_DEV_BLOCK) -> str:
    """'btrfs', 'lvm' or 'copy' for this host's datadir.  ``lvm`` is an LVMBackend, asked
    whether the datadir's device is one of its volumes."""
    datadir = mountinfo.normalize(await host.datadir())
    entry = mountinfo.containing(read_mounts(), datadir)
    if entry is None:
        return "copy"
    if entry.fs_type == "btrfs":
        try:
            if os.lstat(datadir).st_ino == SUBVOLUME_ROOT_INODE:
                return "btrfs"
        except OSError:
            pass
    if os.path.isdir(os.path.join(sys_dev_block, entry.device_number, "dm")):
        try:
            await lvm.datadir_origin()
            return "lvm"
        except (NotAvailable, CommandFailed):
            pass
    return "copy"
