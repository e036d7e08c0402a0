"""btrfs snapshots: the datadir is a subvolume, snapshots are read-only subvolumes.

A snapshot (``btrfs subvolume snapshot -r``) is atomic, so one taken while MySQL writes is
crash-consistent, like a power cut: InnoDB recovers it on start.  That holds when all of
MySQL's files (data, redo and undo logs, binlogs if wanted) are in the datadir subvolume.
Like a power cut, it keeps only what had reached the disk: with ``sync_binlog`` other than
1, InnoDB's commit (written directly) can be in it while the commit's binlog event (a
buffered write) is not, so the copy's binlog end, its replication coordinates as a
primary's copy, lags its data (three snapshots in ten under a write loop, none with
``sync_binlog=1``).  A snapshot of a server whose option files enable the binlog without
``sync_binlog=1`` is taken with a warning.
Snapshots go to ``SnapshotDirectory``, which must be on the same btrfs file system.

Mounting uses a read-only bind mount of the snapshot's directory rather than a second
``mount -o ro,subvol=...`` of the device: it needs neither the device (a multi-device or
LUKS file system has several candidates) nor the subvolume's path from the file system's
top level (which differs from the visible path whenever a subvolume, not the top level,
is mounted), and it shows exactly the directory listed by ``/api/lvs``.  The snapshot is
read-only twice over: the subvolume's own flag, and the mount's.

Restore, with the datadir a subvolume at a fixed path: make a writable snapshot of the
chosen snapshot beside the datadir (hidden name ``.<name>.restoring-<UTC time>``), stop
MySQL, rename the datadir subvolume aside (``<datadir>.replaced-<UTC time>``, same parent
directory, so a plain rename), rename the new subvolume to the datadir, start MySQL.  The
renames are journaled (:mod:`orchagent.swap`): a restore killed half-way is rolled
forward or back at the next agent start.  The old subvolume stays (listed by ``/api/lvs``) until the operator deletes it with
``btrfs subvolume delete``.  A datadir that is itself a mount point (mounted with
``subvol=``) cannot be renamed and is refused.
"""

from __future__ import annotations

import os

from twisted.logger import Logger
from zope.interface import implementer

from orchagent.errors import NotAvailable, Refused
from orchagent.host.mysql_options import load_server_options
from orchagent.interfaces import ISnapshotBackend
from orchagent.snapshots import mountinfo, naming
from orchagent.snapshots.directory import DirectorySnapshots
from orchagent.swap import SUBVOLUME

log = Logger()

#: The inode number of every btrfs subvolume's root directory.
SUBVOLUME_ROOT_INODE = 256
SYSFS_BTRFS = "/sys/fs/btrfs"


def file_system_name(source: str, sysfs: str = SYSFS_BTRFS) -> str:
    """The label of the btrfs file system on device ``source``, else its UUID, else the
    device: read from sysfs, where each file system lists its devices."""
    device = os.path.basename(os.path.realpath(source))
    try:
        uuids = os.listdir(sysfs)
    except OSError:
        return source
    for uuid in uuids:
        if os.path.exists(os.path.join(sysfs, uuid, "devices", device)):
            try:
                with open(os.path.join(sysfs, uuid, "label"), encoding="utf-8") as fh:
                    label = fh.read().strip()
            except OSError:
                label = ""
            return label or uuid
    return source


@implementer(ISnapshotBackend)
class BtrfsBackend(DirectorySnapshots):
    """Snapshots of a datadir that is a btrfs subvolume."""

    name = "btrfs"

    def _on_btrfs(self, path: str) -> mountinfo.MountEntry | None:
        entry = mountinfo.containing(self.read_mounts(), path)
        return entry if entry is not None and entry.fs_type == "btrfs" else None

    def is_subvolume(self, path: str) -> bool:
        try:
            inode = os.lstat(path).st_ino
        except OSError:
            return False
        return inode == SUBVOLUME_ROOT_INODE and self._on_btrfs(path) is not None

    def is_snapshot_dir(self, path: str) -> bool:
        """A subvolume (SnapshotDirectory itself is known to be on btrfs)."""
        try:
            return os.lstat(path).st_ino == SUBVOLUME_ROOT_INODE
        except OSError:
            return False

    @property
    def snapshot_dir(self) -> str:
        path = super().snapshot_dir
        if self._on_btrfs(path) is None:
            raise NotAvailable(f"SnapshotDirectory {path} is not on a btrfs file system")
        return path

    def group_name(self, path: str) -> str:
        entry = self._on_btrfs(path)
        return file_system_name(entry.source) if entry is not None else ""

    async def creation_times(self, paths: list[str]) -> list[float | None]:
        """Each subvolume's creation time (btrfs otime, which stat reports as birth)."""
        result = await self.runner.run(["stat", "--printf", "%W\\n", "--", *paths])
        times: list[float | None] = []
        lines = result.stdout.decode("ascii", "replace").split("\n")
        for path, line in zip(paths, lines):
            seconds = int(line) if line.strip().isdigit() else 0
            times.append(float(seconds) if seconds > 0 else naming.parse_timestamp(os.path.basename(path)))
        return times

    async def require_subvolume_datadir(self) -> str:
        datadir = await self.datadir()
        if not self.is_subvolume(datadir):
            raise NotAvailable(f"the datadir {datadir} is not a btrfs subvolume")
        return datadir

    async def create_snapshot(self) -> bool:
        datadir = await self.require_subvolume_datadir()
        name = naming.snapshot_name(self.config.snapshot_volumes_filter, self.now())
        target = os.path.join(self.snapshot_dir, name)
        if os.path.lexists(target):
            raise Refused(f"{target} already exists; try again in a second")
        log.info("btrfs: snapshot of {datadir} as {target}", datadir=datadir, target=target)
        self._warn_unsynced_binlog(datadir)
        await self.runner.run(["btrfs", "subvolume", "snapshot", "-r", datadir, target],
                              privileged=True)
        return True

    def _warn_unsynced_binlog(self, datadir: str) -> None:
        """The module docstring's binlog caveat, when the option files call for it."""
        try:
            options = load_server_options(self.config.mysql_options_file)
        except Exception:  # unreadable option files: the snapshot does not depend on them
            return
        if "log_bin" in options and (options.value("sync_binlog") or "0").strip() != "1":
            log.warn("btrfs: snapshot of {datadir} with the binlog on and sync_binlog="
                     "{value} in the option files: a copy of this primary may hold commits "
                     "its binlog lacks, and replicate from a position behind its data; "
                     "set sync_binlog=1 on a primary snapshotted under writes",
                     datadir=datadir, value=options.value("sync_binlog") or "0 (the default)")

    async def delete_snapshot(self, path: str) -> None:
        await self.runner.run(["btrfs", "subvolume", "delete", path], privileged=True)

    async def restore(self, name: str) -> bool:
        snapshot = await self.find_snapshot(name)
        self.require_mysql_data(snapshot)
        datadir = await self.require_subvolume_datadir()

        async def clone(incoming: str) -> None:
            await self.runner.run(["btrfs", "subvolume", "snapshot", snapshot.path, incoming],
                                  privileged=True)

        await self.swap_in(snapshot, datadir, "snapshot {snapshot} as {work}", clone, SUBVOLUME)
        return True
