"""What the agent knows about one physical backup, and how it shows on the wire.

A :class:`Backup` is read from a backup directory's own files (see
:mod:`orchagent.backups.discovery`); it is a value, recomputed on every listing, so a
backup that appears, disappears or gets prepared by an operator shows at once.
"""

from __future__ import annotations

import attrs

from orchagent.seed.state import rfc3339
from orchagent.snapshots.model import LogicalVolume

#: The GroupName backups have among the v1 volumes, so orchestrator's UI tells them apart.
GROUP_NAME = "backup"


@attrs.frozen
class Backup:
    """One mariabackup/xtrabackup backup directory.

    ``usable`` says whether ``mountlv``/``restore-snapshot`` can serve it as MySQL data;
    when not, ``reason`` says why in words an operator can act on.  ``base`` is, for an
    incremental backup, the name of the backup it applies on (empty when not found), and
    ``chain`` the names from the full backup up to and including this one.
    """

    name: str
    path: str
    tool: str
    backup_type: str
    prepared: bool
    from_lsn: int
    to_lsn: int
    created_at: float | None
    size_bytes: int
    usable: bool = True
    reason: str = ""
    base: str = ""
    tool_version: str = ""
    compressed: str = ""
    encrypted: bool = False
    partial: bool = False
    chain: tuple[str, ...] = ()

    @property
    def incremental(self) -> bool:
        return self.backup_type == "incremental"

    def unusable(self, reason: str) -> "Backup":
        """This backup marked not usable; the first reason found is kept."""
        return attrs.evolve(self, usable=False, reason=reason) if self.usable else self

    def to_json(self) -> dict:
        return {
            "Name": self.name,
            "Path": self.path,
            "Tool": self.tool,
            "BackupType": self.backup_type,
            "Prepared": self.prepared,
            "FromLSN": self.from_lsn,
            "ToLSN": self.to_lsn,
            "CreatedAt": rfc3339(self.created_at),
            "SizeBytes": self.size_bytes,
            "Usable": self.usable,
            "Reason": self.reason,
            "Base": self.base,
        }

    def as_volume(self) -> LogicalVolume:
        """The backup as a v1 snapshot volume: Name and Path are its name (what
        ``mountlv?lv=`` takes); one that is not usable reads as an invalid snapshot
        (SnapshotPercent 100), which is what orchestrator and its UI understand."""
        return LogicalVolume(name=self.name, group_name=GROUP_NAME, path=self.name,
                             is_snapshot=True, snapshot_percent=0.0 if self.usable else 100.0,
                             created_at=self.created_at)
