"""Names of snapshots and of the data a restore sets aside.

A snapshot's name is ``SnapshotVolumesFilter`` plus a UTC timestamp, so that the filter
(which is how orchestrator and the v1 API recognise snapshots) always matches what we
create, and names sort by age.  The names are also valid LVM volume names and plain file
names: letters, digits, ``-``, ``_``, ``.`` and ``+`` only.
"""

from __future__ import annotations

import datetime
import re

from orchagent.errors import BadRequest

TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
_TIMESTAMP = re.compile(r"(\d{8}T\d{6}Z)")
_SAFE = re.compile(r"^[A-Za-z0-9_.+-]{1,127}$")
#: Prefix of snapshots when SnapshotVolumesFilter is empty.
DEFAULT_PREFIX = "orchagent-snapshot"
#: What a restore appends to the name of the data it replaced, before the timestamp.
REPLACED_MARK = "replaced"


def timestamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime(TIMESTAMP_FORMAT)


def parse_timestamp(name: str) -> float | None:
    """The epoch seconds of the last timestamp in ``name``, or None."""
    found = _TIMESTAMP.findall(name)
    if not found:
        return None
    when = datetime.datetime.strptime(found[-1], TIMESTAMP_FORMAT)
    return when.replace(tzinfo=datetime.timezone.utc).timestamp()


def snapshot_name(volumes_filter: str, seconds: float) -> str:
    """``<filter>[-]<timestamp>``: a ``-`` is added when the filter ends in a letter or digit."""
    prefix = volumes_filter or DEFAULT_PREFIX
    if prefix[-1].isalnum():
        prefix += "-"
    name = prefix + timestamp(seconds)
    check_safe(name, "snapshot name")
    return name


def replaced_name(base: str, seconds: float, separator: str = ".") -> str:
    """The name the current data gets when a restore sets it aside, e.g.
    ``mysql.replaced-20240501T020000Z``."""
    return f"{base}{separator}{REPLACED_MARK}-{timestamp(seconds)}"


def matches_filter(name: str, volumes_filter: str) -> bool:
    return volumes_filter in name


def check_safe(name: str, what: str = "volume name") -> str:
    """Refuse anything that is not a plain name: no path separators, no shell syntax,
    no leading dot (hidden work-in-progress names start with one)."""
    if not _SAFE.fullmatch(name) or name.startswith("."):
        raise BadRequest(f"invalid {what} {name!r}: letters, digits, '.', '_', '+' and '-' only")
    return name
