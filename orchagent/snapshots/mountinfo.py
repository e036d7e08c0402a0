"""What is mounted where, read from ``/proc/self/mountinfo``.

Every snapshot backend asks the same questions: is something mounted on the snapshot
mount point, which file system holds the datadir, is this volume mounted anywhere.  The
kernel's mount table answers them without running ``mount`` or ``findmnt`` and with the
fields those tools lose (the mount's root inside its file system, device numbers).  The
file is small and lives in memory, so it is read inline.
"""

from __future__ import annotations

import os
import re

import attrs

MOUNTINFO = "/proc/self/mountinfo"

_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as ``\\ooo``."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


@attrs.frozen
class MountEntry:
    """One line of mountinfo.  ``root`` is the mounted directory inside the file system
    (``/`` for a whole file system, the subvolume or bind source otherwise)."""

    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str
    mount_point: str
    options: tuple[str, ...]
    fs_type: str
    source: str
    super_options: tuple[str, ...]

    @property
    def read_only(self) -> bool:
        return "ro" in self.options

    @property
    def device_number(self) -> str:
        return f"{self.major}:{self.minor}"


def parse(text: str) -> list[MountEntry]:
    """Parse mountinfo text; lines that do not have the documented shape are skipped."""
    entries = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            major, minor = fields[2].split(":")
            entries.append(MountEntry(
                mount_id=int(fields[0]), parent_id=int(fields[1]),
                major=int(major), minor=int(minor),
                root=_unescape(fields[3]), mount_point=_unescape(fields[4]),
                options=tuple(fields[5].split(",")),
                fs_type=fields[sep + 1], source=_unescape(fields[sep + 2]),
                super_options=tuple(fields[sep + 3].split(",")) if len(fields) > sep + 3 else (),
            ))
        except (ValueError, IndexError):
            continue
    return entries


def read(path: str = MOUNTINFO) -> list[MountEntry]:
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        return parse(fh.read())


def normalize(path: str) -> str:
    """An absolute path with symlinks resolved, as the kernel reports mount points."""
    return os.path.realpath(path)


def at(entries: list[MountEntry], path: str) -> MountEntry | None:
    """The mount visible at exactly ``path`` (the last one stacked there), or None."""
    found = None
    for entry in entries:
        if entry.mount_point == path:
            found = entry
    return found


def containing(entries: list[MountEntry], path: str) -> MountEntry | None:
    """The mount whose file system holds ``path``: the longest mount point above it."""
    best = None
    for entry in entries:
        mp = entry.mount_point
        if path == mp or mp == "/" or path.startswith(mp.rstrip("/") + "/"):
            if best is None or len(mp) >= len(best.mount_point):
                best = entry
    return best


def option_value(options: tuple[str, ...], name: str) -> str | None:
    """The value of ``name=value`` in a mount option list, or None."""
    prefix = name + "="
    for option in options:
        if option.startswith(prefix):
            return option[len(prefix):]
    return None
