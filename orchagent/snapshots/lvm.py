"""LVM snapshots: ``lvs`` JSON reports, ``lvcreate --snapshot``, ``lvremove``, merges.

Volumes are read from ``lvs --reportformat json`` (never its columns) with the fields
listed in :data:`LVS_FIELDS`, sizes in bytes.  A classic (thick) snapshot is invalid once
its copy-on-write area overflowed: ``snap_percent`` 100, or state ``I`` in ``lv_attr``;
it is then reported with SnapshotPercent 100, and is never mounted or restored.

Restore merges the snapshot into the datadir's volume (``lvconvert --merge``), which
takes minutes however large the volume; LVM removes a merged snapshot, so the restored
snapshot is used up.  Before the merge, a new snapshot of the current
state (``<origin>-replaced-<UTC time>``) keeps the replaced data; it is listed by
``/api/lvs`` and stays until the operator removes it.  It is given the copy-on-write size
of the restored snapshot (the merge writes at most that much) plus ``LVMSnapshotSize``
for what MySQL writes afterwards; like any thick snapshot it is lost if that fills up, so
remove or extend it soon.  A merge needs the datadir's file system unmounted: the restore
unmounts it and mounts it again with the options it had.  Once the merge was started, an
undo merges the kept snapshot back rather than removing it.
"""

from __future__ import annotations

import datetime
import json
import re

import attrs
from twisted.logger import Logger
from zope.interface import implementer

from orchagent.errors import BadRequest, CommandFailed, NotAvailable, NotFound, Refused
from orchagent.interfaces import ISnapshotBackend
from orchagent.snapshots import mountinfo, naming
from orchagent.snapshots.model import LogicalVolume, Mount, seed_order
from orchagent.snapshots.mountpoint import BackendParts
from orchagent.snapshots.restore import Step, mysql_start_step, mysql_stop_step, run_steps

log = Logger()

LVS_FIELDS = ("lv_name,vg_name,lv_path,lv_attr,origin,snap_percent,data_percent,lv_time,"
              "lv_size,lv_kernel_major,lv_kernel_minor")
LVS_ARGV = ("lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", LVS_FIELDS)
#: LVM prints numbers in the C locale only when told so.
LVM_ENV = {"LC_ALL": "C", "LVM_SUPPRESS_FD_WARNINGS": "1"}

_SIZE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([bBsSkKmMgGtTpPeE]?)$")
_UNIT_POWER = {"b": None, "s": None, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_FS_TYPE = re.compile(r"^[a-z0-9_.]{1,32}$")


def parse_size(text: str) -> int:
    """Bytes of an lvcreate size: a number with an optional unit, megabytes by default.
    LVM reads sizes in powers of 1024 whatever the unit's case."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise NotAvailable(f"LVMSnapshotSize {text!r} is not a size like 10G or 512M")
    number, unit = float(match.group(1)), (match.group(2) or "m").lower()
    if unit == "b":
        return int(number)
    if unit == "s":
        return int(number * 512)
    return int(number * 1024 ** _UNIT_POWER[unit])


def _percent(text: str) -> float | None:
    text = text.strip()
    return float(text) if text else None


def _time(text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S %z").timestamp()


@attrs.frozen
class LVMVolume:
    """One row of the lvs report."""

    name: str
    vg: str
    path: str
    attr: str
    origin: str
    snap_percent: float | None
    data_percent: float | None
    created_at: float | None
    size: int
    major: int
    minor: int

    @property
    def full_name(self) -> str:
        return f"{self.vg}/{self.name}"

    @property
    def is_snapshot(self) -> bool:
        return self.attr[:1] in ("s", "S") or bool(self.origin)

    @property
    def is_thick_snapshot(self) -> bool:
        return self.attr[:1] in ("s", "S")

    @property
    def overflowed(self) -> bool:
        """An invalid thick snapshot: its copy-on-write area filled up."""
        if not self.is_thick_snapshot:
            return False
        return (self.snap_percent or 0.0) >= 100.0 or self.attr[4:5] == "I"

    @property
    def snapshot_percent(self) -> float:
        if self.overflowed:
            return 100.0
        if not self.is_thick_snapshot:
            return 0.0
        return self.snap_percent or 0.0

    @property
    def is_active(self) -> bool:
        return self.major >= 0

    def logical_volume(self) -> LogicalVolume:
        return LogicalVolume(
            name=self.name, group_name=self.vg, path=self.path, is_snapshot=self.is_snapshot,
            snapshot_percent=self.snapshot_percent, created_at=self.created_at)


def parse_lvs(stdout: bytes) -> list[LVMVolume]:
    """The volumes of an ``lvs --reportformat json`` report made with :data:`LVS_FIELDS`."""
    try:
        report = json.loads(stdout)
        rows = [row for part in report["report"] for row in part.get("lv", [])]
        return [
            LVMVolume(
                name=row["lv_name"], vg=row["vg_name"], path=row["lv_path"],
                attr=row["lv_attr"], origin=row["origin"],
                snap_percent=_percent(row["snap_percent"]),
                data_percent=_percent(row["data_percent"]),
                created_at=_time(row["lv_time"]), size=int(row["lv_size"] or 0),
                major=int(row["lv_kernel_major"] or -1), minor=int(row["lv_kernel_minor"] or -1),
            )
            for row in rows
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CommandFailed(f"lvs printed a report that cannot be read ({type(e).__name__}: {e})") from e


@implementer(ISnapshotBackend)
class LVMBackend(BackendParts):
    """Snapshots of the LVM logical volume that holds the MySQL datadir."""

    name = "lvm"

    # --- reading -------------------------------------------------------------------------

    async def volumes(self) -> list[LVMVolume]:
        result = await self.runner.run(list(LVS_ARGV), env=LVM_ENV, privileged=True)
        return parse_lvs(result.stdout)

    async def list_volumes(self, pattern: str = "") -> list[LogicalVolume]:
        return [v.logical_volume() for v in await self.volumes() if pattern in v.name]

    async def list_snapshots(self) -> list[LogicalVolume]:
        volumes_filter = self.config.snapshot_volumes_filter
        snapshots = [v.logical_volume() for v in await self.volumes()
                     if v.is_snapshot and naming.matches_filter(v.name, volumes_filter)]
        return seed_order(snapshots)

    async def find(self, name: str, volumes: list[LVMVolume] | None = None) -> LVMVolume:
        """The volume called ``name``, ``vg/name`` or by its path."""
        if volumes is None:
            volumes = await self.volumes()
        found = [v for v in volumes if name in (v.name, v.full_name, v.path)]
        if not found:
            raise NotFound(f"no logical volume {name!r}")
        if len(found) > 1:
            raise BadRequest(f"{name!r} names volumes in several volume groups "
                             f"({', '.join(v.full_name for v in found)}); give vg/name")
        return found[0]

    async def get_volume(self, name: str) -> LogicalVolume:
        return (await self.find(name)).logical_volume()

    async def datadir_origin(self, volumes: list[LVMVolume] | None = None
                             ) -> tuple[LVMVolume, mountinfo.MountEntry]:
        """The logical volume holding the datadir, and the mount that shows it."""
        datadir = mountinfo.normalize(await self.host.datadir())
        entry = mountinfo.containing(self.read_mounts(), datadir)
        if entry is None:
            raise NotAvailable(f"no mounted file system holds the datadir {datadir}")
        if volumes is None:
            volumes = await self.volumes()
        for volume in volumes:
            if volume.is_active and (volume.major, volume.minor) == (entry.major, entry.minor):
                return volume, entry
        raise NotAvailable(
            f"the datadir {datadir} is on {entry.source} (device {entry.device_number}), "
            f"which is not an LVM logical volume")

    def _mounted_on(self, volume: LVMVolume) -> str | None:
        if not volume.is_active:
            return None
        for entry in self.read_mounts():
            if (entry.major, entry.minor) == (volume.major, volume.minor):
                return entry.mount_point
        return None

    async def mount_state(self) -> Mount:
        entry = self.mount_point.entry() if self.config.snapshot_mount_point else None
        lv_path = ""
        if entry is not None:
            for volume in await self.volumes():
                if volume.is_active and (volume.major, volume.minor) == (entry.major, entry.minor):
                    lv_path = volume.path
        return await self.mount_point.state(lv_path)

    # --- changing ------------------------------------------------------------------------

    async def create_snapshot(self) -> bool:
        size = self.config.lvm_snapshot_size
        parse_size(size)
        volumes = await self.volumes()
        origin, _ = await self.datadir_origin(volumes)
        name = naming.snapshot_name(self.config.snapshot_volumes_filter, self.reactor.seconds())
        await self._create(origin, name, size, volumes)
        return True

    async def _create(self, origin: LVMVolume, name: str, size: str,
                      volumes: list[LVMVolume]) -> None:
        if any(v.vg == origin.vg and v.name == name for v in volumes):
            raise Refused(f"a volume {origin.vg}/{name} already exists; try again in a second")
        log.info("lvm: creating snapshot {vg}/{name} of {origin} ({size})", vg=origin.vg,
                 name=name, origin=origin.name, size=size)
        await self.runner.run(
            ["lvcreate", "--snapshot", "--size", size, "--name", name, origin.full_name],
            env=LVM_ENV, privileged=True)

    async def mount(self, name: str) -> Mount:
        path = self.mount_point.require_free()
        volume = await self.find(name)
        if not volume.is_snapshot:
            raise Refused(f"{volume.full_name} is not a snapshot; only snapshots are mounted")
        if volume.overflowed:
            raise Refused(f"snapshot {volume.full_name} overflowed (100% used) and is invalid")
        probe = await self.runner.run(["blkid", "-o", "value", "-s", "TYPE", volume.path],
                                      privileged=True, check=False)
        fs_type = probe.stdout.decode("utf-8", "replace").strip()
        if not probe.ok or not _FS_TYPE.fullmatch(fs_type):
            detail = probe.describe_failure() if not probe.ok else repr(fs_type)
            raise NotAvailable(f"no file system found on {volume.path} ({detail})")
        options = "ro,nouuid" if fs_type == "xfs" else "ro"
        log.info("lvm: mounting {lv} ({fs}) on {path} with {options}", lv=volume.path,
                 fs=fs_type, path=path, options=options)
        await self.runner.run(["mount", "-t", fs_type, "-o", options, volume.path, path],
                              privileged=True)
        return await self.mount_state()

    async def unmount(self) -> Mount:
        await self.mount_point.unmount()
        return await self.mount_state()

    async def remove(self, name: str) -> bool:
        volume = await self.find(name)
        volumes_filter = self.config.snapshot_volumes_filter
        if not (volume.is_snapshot and naming.matches_filter(volume.name, volumes_filter)):
            raise Refused(f"refusing to remove {volume.full_name}: only snapshots whose name "
                          f"contains SnapshotVolumesFilter {volumes_filter!r} are removed")
        where = self._mounted_on(volume)
        if where is not None:
            raise Refused(f"refusing to remove {volume.full_name}: it is mounted on {where}")
        log.info("lvm: removing {lv}", lv=volume.full_name)
        await self.runner.run(["lvremove", "-f", volume.full_name], env=LVM_ENV, privileged=True)
        return True

    async def restore(self, name: str) -> bool:
        volumes = await self.volumes()
        snapshot = await self.find(name, volumes)
        origin, entry = await self.datadir_origin(volumes)
        if not snapshot.is_thick_snapshot or snapshot.origin != origin.name or snapshot.vg != origin.vg:
            raise Refused(f"{snapshot.full_name} is not a snapshot of the datadir's volume "
                          f"{origin.full_name}")
        if snapshot.overflowed:
            raise Refused(f"snapshot {snapshot.full_name} overflowed (100% used) and is invalid")
        where = self._mounted_on(snapshot)
        if where is not None:
            raise Refused(f"snapshot {snapshot.full_name} is mounted on {where}; unmount it first")
        if entry.mount_point == "/":
            raise Refused(f"the datadir is on the root file system ({origin.full_name}), "
                          "which cannot be unmounted for a merge")
        extra = parse_size(self.config.lvm_snapshot_size)
        replaced = naming.replaced_name(origin.name, self.reactor.seconds(), separator="-")
        replaced_size = f"{snapshot.size + extra}b"
        was_running = bool(await self.service.is_running())
        mount_argv = ["mount", "-t", entry.fs_type, "-o", ",".join(entry.options),
                      origin.path, entry.mount_point]
        state = {"merge_attempted": False}

        async def keep_current():
            await self._create(origin, replaced, replaced_size, await self.volumes())

        async def drop_replaced_if_unused():
            if state["merge_attempted"]:
                return
            if any(v.vg == origin.vg and v.name == replaced for v in await self.volumes()):
                await self.runner.run(["lvremove", "-f", f"{origin.vg}/{replaced}"],
                                      env=LVM_ENV, privileged=True)

        async def unmount_datadir():
            await self.runner.run(["umount", entry.mount_point], privileged=True)

        async def mount_datadir():
            if mountinfo.at(self.read_mounts(), entry.mount_point) is None:
                await self.runner.run(mount_argv, privileged=True)

        async def merge():
            state["merge_attempted"] = True
            await self.runner.run(["lvconvert", "--merge", snapshot.full_name], env=LVM_ENV,
                                  privileged=True, timeout=0)

        async def merge_back():
            if state["merge_attempted"]:
                await self.runner.run(["lvconvert", "--merge", f"{origin.vg}/{replaced}"],
                                      env=LVM_ENV, privileged=True, timeout=0)

        async def unmount_datadir_again():
            if mountinfo.at(self.read_mounts(), entry.mount_point) is not None:
                await self.runner.run(["umount", entry.mount_point], privileged=True)

        steps = [
            mysql_stop_step(self.service, was_running),
            Step(f"snapshot the current data as {origin.vg}/{replaced}", keep_current,
                 drop_replaced_if_unused),
            Step(f"unmount the datadir's file system {entry.mount_point}", unmount_datadir,
                 mount_datadir),
            Step(f"merge {snapshot.full_name} into {origin.full_name}", merge, merge_back),
            Step(f"mount {origin.path} on {entry.mount_point}", mount_datadir,
                 unmount_datadir_again),
            mysql_start_step(self.service),
        ]
        await run_steps(f"restore of {snapshot.full_name}", steps,
                        kept=f"LVM snapshot {origin.vg}/{replaced}")
        log.info("lvm: restored {snap}; the replaced data is kept as {vg}/{replaced}",
                 snap=snapshot.full_name, vg=origin.vg, replaced=replaced)
        return True
