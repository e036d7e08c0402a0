"""The snapshot mount point: the one place a snapshot is mounted, and its v1 Mount state.

Every backend mounts on ``SnapshotMountPoint`` and reports it the same way, so the rules
live here: the mount point must be configured and be a directory, nothing may already be
mounted on it, and the Mount state carries the original agent's ``MySQLDataPath``
heuristic and the disk usage of the mounted tree and of the MySQL data in it.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.logger import Logger

from orchagent.errors import AgentError, NotAvailable, Refused
from orchagent.interfaces import ICommandRunner
from orchagent.snapshots import mountinfo
from orchagent.snapshots.model import Mount

log = Logger()

#: The file whose presence marks a MySQL datadir (the original agent's heuristic).
DATADIR_MARKER = "ibdata1"


class SnapshotMountPoint:
    """``SnapshotMountPoint`` of the configuration, checked and normalised."""

    def __init__(self, configured: str, runner: ICommandRunner, host: Any,
                 read_mounts=mountinfo.read):
        self.configured = configured
        self.runner = runner
        self.host = host
        self.read_mounts = read_mounts

    @property
    def path(self) -> str:
        """The mount point, symlinks resolved; NotAvailable when it is not configured."""
        if not self.configured:
            raise NotAvailable("SnapshotMountPoint is not configured")
        return mountinfo.normalize(self.configured)

    def entry(self) -> mountinfo.MountEntry | None:
        """What is mounted on the mount point, or None."""
        return mountinfo.at(self.read_mounts(), self.path)

    def require_free(self) -> str:
        """The mount point's path, once it is sure a mount there would be welcome."""
        path = self.path
        if not os.path.isdir(path):
            raise NotAvailable(f"SnapshotMountPoint {path} is not a directory")
        entry = self.entry()
        if entry is not None:
            raise Refused(
                f"cannot mount: {entry.source} is already mounted on {path}; unmount it first")
        return path

    async def unmount(self) -> None:
        """Unmount whatever is on the mount point; nothing mounted is not an error, so
        that clean-up paths (an aborted seed) can always call it."""
        path = self.path
        if self.entry() is None:
            log.info("umount: nothing is mounted on {path}", path=path)
            return
        await self.runner.run(["umount", path], privileged=True)
        log.info("umount: unmounted {path}", path=path)

    async def state(self, lv_path: str = "") -> Mount:
        """The v1 Mount of the mount point.  ``lv_path`` is what the backend knows the
        mounted device or directory as (its volume's Path)."""
        if not self.configured:
            return Mount(path="")
        path = self.path
        entry = self.entry()
        if entry is None:
            return Mount(path=path)
        datadir = await self._datadir()
        data_path = mysql_data_path(path, datadir)
        disk_usage = await self.host.disk_usage(path)
        if data_path == path:
            data_usage = disk_usage
        elif data_path:
            data_usage = await self.host.disk_usage(data_path)
        else:
            data_usage = 0
        return Mount(
            path=path, device=entry.source, lv_path=lv_path, file_system=entry.fs_type,
            is_mounted=True, disk_usage=disk_usage, mysql_data_path=data_path,
            mysql_disk_usage=data_usage,
        )

    async def _datadir(self) -> str:
        """The MySQL datadir for the heuristic; without one only the mount point's own
        top level is searched (a snapshot of the datadir itself)."""
        try:
            return await self.host.datadir()
        except AgentError as e:
            log.warn("MySQLDataPath: datadir unknown ({error}); looking at the top level only",
                     error=e.message)
            return ""


def mysql_data_path(mount_point: str, datadir: str) -> str:
    """Where under ``mount_point`` the MySQL data lives, or "" when no ``ibdata1`` is found.

    A snapshot of a whole file system holds the datadir at its path below the file
    system's mount point, which the agent cannot know; so, as the original agent did, try
    ``mount_point + datadir`` and then strip leading components of the datadir one at a
    time, ending with the mount point itself (a snapshot of the datadir alone).
    """
    parts = [p for p in datadir.split("/") if p]
    for i in range(len(parts) + 1):
        candidate = os.path.join(mount_point, *parts[i:]) if parts[i:] else mount_point
        if os.path.isfile(os.path.join(candidate, DATADIR_MARKER)):
            return candidate
    return ""


class BackendParts:
    """What every snapshot backend is built from: the configuration, the command runner,
    MySQL's host facts and service, and the one SnapshotMountPoint it serves."""

    def __init__(self, config: Any, runner: ICommandRunner, reactor: Any, host: Any,
                 service: Any, read_mounts=mountinfo.read):
        self.config = config
        self.runner = runner
        self.reactor = reactor
        self.host = host
        self.service = service
        self.read_mounts = read_mounts
        self.mount_point = SnapshotMountPoint(config.snapshot_mount_point, runner, host, read_mounts)
