"""What the btrfs and copy backends share: snapshots as directories of SnapshotDirectory.

Each snapshot is an entry of ``SnapshotDirectory`` (a read-only subvolume, or a copied
directory).  Names starting with ``.`` are work in progress (a copy being made or
removed) and are never reported.  A snapshot is mounted on ``SnapshotMountPoint`` with a
read-only bind mount, and recognised there by its (device, inode) identity, which the
bind mount shows unchanged.

The volumes reported are the datadir itself (IsSnapshot false), the data that restores
set aside next to it (``<datadir>.replaced-<UTC time>``, IsSnapshot false, kept until the
operator deletes them), and the snapshots (IsSnapshot true; ``/api/lvs-snapshots`` keeps
those whose name contains ``SnapshotVolumesFilter``).
"""

from __future__ import annotations

import os
from typing import Awaitable, Callable

from twisted.logger import Logger

from orchagent.errors import NotAvailable, NotFound, Refused
from orchagent.snapshots import mountinfo, naming
from orchagent.snapshots.model import LogicalVolume, Mount, seed_order
from orchagent.snapshots.mountpoint import DATADIR_MARKER, BackendParts
from orchagent.snapshots.restore import (Step, mysql_start_step, mysql_stop_step, rename_steps,
                                         restore_journal, run_steps)
from orchagent.swap import TREE, Work

log = Logger()


def identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of ``path``, or None when it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class DirectorySnapshots(BackendParts):
    """Base of the btrfs and copy backends; subclasses make, remove and restore."""

    name = ""

    # --- to be provided by the backend ---------------------------------------------------

    def is_snapshot_dir(self, path: str) -> bool:
        raise NotImplementedError

    async def creation_times(self, paths: list[str]) -> list[float | None]:
        raise NotImplementedError

    def group_name(self, path: str) -> str:
        raise NotImplementedError

    # --- places --------------------------------------------------------------------------

    @property
    def snapshot_dir(self) -> str:
        configured = self.config.snapshot_directory
        if not configured:
            raise NotAvailable(f"SnapshotDirectory is not configured (needed by the {self.name} backend)")
        path = mountinfo.normalize(configured)
        if not os.path.isdir(path):
            raise NotAvailable(f"SnapshotDirectory {path} is not a directory")
        return path

    async def datadir(self) -> str:
        datadir = mountinfo.normalize(await self.host.datadir())
        if datadir == "/":
            raise NotAvailable("the MySQL datadir is /")
        return datadir

    def now(self) -> float:
        return self.reactor.seconds()

    # --- reading -------------------------------------------------------------------------

    def _snapshot_paths(self) -> list[str]:
        """Every snapshot's path; none when SnapshotDirectory is not configured or does not
        exist yet (there can be none, and orchestrator asks on every agent page); something
        there that is not a directory is still an error."""
        configured = self.config.snapshot_directory
        if not configured or not os.path.lexists(configured):
            return []
        base = self.snapshot_dir
        paths = []
        with os.scandir(base) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                    continue
                path = os.path.join(base, entry.name)
                if self.is_snapshot_dir(path):
                    paths.append(path)
        return sorted(paths)

    def _replaced_paths(self, datadir: str) -> list[str]:
        parent, base = os.path.split(datadir)
        prefix = f"{base}.{naming.REPLACED_MARK}-"
        try:
            names = os.listdir(parent)
        except OSError:
            return []
        return sorted(os.path.join(parent, n) for n in names
                      if n.startswith(prefix) and os.path.isdir(os.path.join(parent, n)))

    async def _volumes(self, paths: list[str], is_snapshot: bool) -> list[LogicalVolume]:
        if not paths:
            return []
        times = await self.creation_times(paths)
        return [
            LogicalVolume(name=os.path.basename(p), group_name=self.group_name(p), path=p,
                          is_snapshot=is_snapshot, snapshot_percent=0.0, created_at=t)
            for p, t in zip(paths, times)
        ]

    async def snapshots(self) -> list[LogicalVolume]:
        """Every snapshot, newest first."""
        found = await self._volumes(self._snapshot_paths(), True)
        return sorted(found, key=lambda v: (v.created_at or 0.0, v.name), reverse=True)

    async def list_volumes(self, pattern: str = "") -> list[LogicalVolume]:
        datadir = await self.datadir()
        others = await self._volumes([datadir, *self._replaced_paths(datadir)], False)
        return [v for v in others + await self.snapshots() if pattern in v.name]

    async def list_snapshots(self) -> list[LogicalVolume]:
        volumes_filter = self.config.snapshot_volumes_filter
        return seed_order([v for v in await self.snapshots()
                           if naming.matches_filter(v.name, volumes_filter)])

    async def get_volume(self, name: str) -> LogicalVolume:
        wanted = name.rstrip("/") or name
        for volume in await self.list_volumes():
            if wanted in (volume.name, volume.path):
                return volume
        raise NotFound(f"no {self.name} snapshot or volume {name!r}")

    async def find_snapshot(self, name: str) -> LogicalVolume:
        """The snapshot called ``name`` (or with that path) in SnapshotDirectory."""
        wanted = name.rstrip("/") or name
        for volume in await self.snapshots():
            if wanted in (volume.name, volume.path):
                return volume
        try:
            volume = await self.get_volume(name)
        except NotFound:
            raise NotFound(f"no {self.name} snapshot {name!r} in {self.snapshot_dir}") from None
        raise Refused(f"{volume.path} is not a snapshot")

    def require_mysql_data(self, volume: LogicalVolume) -> None:
        if not os.path.isfile(os.path.join(volume.path, DATADIR_MARKER)):
            raise Refused(f"snapshot {volume.name} holds no MySQL data "
                          f"(no {DATADIR_MARKER} at its top level); refusing to restore it")

    def mounted_snapshot_path(self, entry: mountinfo.MountEntry | None) -> str:
        if entry is None:
            return ""
        mounted = identity(entry.mount_point)
        for path in self._snapshot_paths():
            if identity(path) == mounted:
                return path
        return ""

    async def mount_state(self) -> Mount:
        lv_path = ""
        if self.config.snapshot_mount_point and self.config.snapshot_directory:
            lv_path = self.mounted_snapshot_path(self.mount_point.entry())
        return await self.mount_point.state(lv_path)

    # --- mounting and removing -----------------------------------------------------------

    async def mount(self, name: str) -> Mount:
        path = self.mount_point.require_free()
        snapshot = await self.find_snapshot(name)
        log.info("{backend}: bind-mounting {snapshot} read-only on {path}",
                 backend=self.name, snapshot=snapshot.path, path=path)
        await self.runner.run(["mount", "-o", "bind,ro", snapshot.path, path], privileged=True)
        entry = self.mount_point.entry()
        if entry is None or not entry.read_only:
            if entry is not None:
                await self.mount_point.unmount()
            raise Refused(f"mounting {snapshot.path} on {path} did not give a read-only mount; "
                          "unmounted again")
        return await self.mount_state()

    async def unmount(self) -> Mount:
        await self.mount_point.unmount()
        return await self.mount_state()

    async def remove(self, name: str) -> bool:
        volume = await self.find_snapshot(name)
        volumes_filter = self.config.snapshot_volumes_filter
        if not naming.matches_filter(volume.name, volumes_filter):
            raise Refused(f"refusing to remove {volume.path}: only snapshots whose name "
                          f"contains SnapshotVolumesFilter {volumes_filter!r} are removed")
        if self.config.snapshot_mount_point and \
                self.mounted_snapshot_path(self.mount_point.entry()) == volume.path:
            raise Refused(f"refusing to remove {volume.path}: it is mounted on "
                          f"{self.mount_point.path}")
        log.info("{backend}: removing snapshot {path}", backend=self.name, path=volume.path)
        await self.delete_snapshot(volume.path)
        return True

    async def delete_snapshot(self, path: str) -> None:
        raise NotImplementedError

    # --- helpers for restores ------------------------------------------------------------

    async def move(self, source: str, target: str) -> None:
        """rename(2) through ``mv -T``, never onto something that exists."""
        if os.path.lexists(target):
            raise Refused(f"cannot move {source} to {target}: {target} exists")
        await self.runner.run(["mv", "-T", "--", source, target], privileged=True)

    def refuse_mount_point_datadir(self, datadir: str) -> None:
        """A datadir that is itself a mount point cannot be renamed aside."""
        if mountinfo.at(self.read_mounts(), datadir) is not None:
            raise Refused(f"the datadir {datadir} is a mount point; a {self.name} restore "
                          "renames the datadir aside, which a mount point cannot be")

    async def swap_in(self, snapshot: LogicalVolume, datadir: str, making: str,
                      make_tree: Callable[[str], Awaitable[None]], work_kind: str = TREE) -> None:
        """Restore ``snapshot`` into ``datadir``: ``make_tree(incoming)`` builds the new tree
        under a hidden work name while MySQL still runs (the step ``making`` names, with
        ``{snapshot}`` and ``{work}``), then MySQL stops, two journaled renames swap it in (orchagent.swap: a crash
        between them is settled at the next start) and MySQL starts; the replaced datadir is
        kept as ``<datadir>.replaced-<time>``."""
        self.refuse_mount_point_datadir(datadir)
        parent, base = os.path.split(datadir)
        now = self.now()
        replaced = os.path.join(parent, naming.replaced_name(base, now))
        incoming = os.path.join(parent, f".{base}.restoring-{naming.timestamp(now)}")
        for path in (replaced, incoming):
            if os.path.lexists(path):
                raise Refused(f"{path} already exists; try again in a second")
        was_running = bool(await self.service.is_running())
        swap = restore_journal(self.config, self.runner).swap(
            f"restore-{naming.timestamp(now)}", f"restore of {snapshot.name} into {datadir}",
            [(datadir, replaced), (incoming, datadir)], [Work(incoming, work_kind)],
            {"snapshot": snapshot.path, "mysql_was_running": was_running})

        async def build():
            await swap.open()
            await make_tree(incoming)

        steps = [
            Step(making.format(snapshot=snapshot.path, work=incoming), build, swap.roll_back),
            mysql_stop_step(self.service, was_running),
            *rename_steps(swap, [f"rename the datadir {datadir} to {replaced}",
                                 f"rename {incoming} to {datadir}"]),
            mysql_start_step(self.service),
        ]
        await run_steps(f"restore of {snapshot.name}", steps, kept=replaced)
        await swap.close()
        log.info("{backend}: restored {snap}; the replaced datadir is kept as {replaced}",
                 backend=self.name, snap=snapshot.path, replaced=replaced)

