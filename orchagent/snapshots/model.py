"""The v1 value types of snapshots, with the Go field names on the wire."""

from __future__ import annotations

import attrs


@attrs.frozen
class LogicalVolume:
    """A volume or snapshot.  ``snapshot_percent`` 100 means an overflowed, invalid snapshot."""

    name: str
    group_name: str
    path: str
    is_snapshot: bool
    snapshot_percent: float = 0.0
    #: Creation time (epoch seconds) where the backend knows it; not part of the v1 JSON.
    created_at: float | None = None

    @property
    def is_valid_snapshot(self) -> bool:
        return self.is_snapshot and self.snapshot_percent < 100.0

    def to_json(self) -> dict:
        return {
            "Name": self.name,
            "GroupName": self.group_name,
            "Path": self.path,
            "IsSnapshot": self.is_snapshot,
            "SnapshotPercent": float(self.snapshot_percent),
        }


def seed_order(volumes: list[LogicalVolume]) -> list[LogicalVolume]:
    """Snapshots in the order ``/api/lvs-snapshots`` lists them: valid ones newest first,
    then invalid (overflowed) ones newest first.  orchestrator seeds from the first entry
    without looking at SnapshotPercent, so an invalid snapshot is first only when no valid
    one exists."""
    return sorted(volumes, key=lambda v: (v.is_valid_snapshot, v.created_at or 0.0, v.name),
                  reverse=True)


@attrs.frozen
class Mount:
    """The state of SnapshotMountPoint."""

    path: str
    device: str = ""
    lv_path: str = ""
    file_system: str = ""
    is_mounted: bool = False
    disk_usage: int = 0
    mysql_data_path: str = ""
    mysql_disk_usage: int = 0

    def to_json(self) -> dict:
        return {
            "Path": self.path,
            "Device": self.device,
            "LVPath": self.lv_path,
            "FileSystem": self.file_system,
            "IsMounted": self.is_mounted,
            "DiskUsage": int(self.disk_usage),
            "MySQLDataPath": self.mysql_data_path,
            "MySQLDiskUsage": int(self.mysql_disk_usage),
        }
