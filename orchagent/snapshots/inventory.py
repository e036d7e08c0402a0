"""The snapshot inventory: which hosts have a snapshot, in which datacenter and cluster.

``SnapshotInventoryFile`` is a JSON file that a nightly snapshot job publishes (the same
file on every host, e.g. from configuration management or a shared mount)::

    {
      "hosts": [
        {"host": "db-a1.dc1.example", "datacenter": "dc1", "cluster": "main",
         "snapshotAt": "2024-05-01T02:00:00Z"},
        {"host": "db-b1.dc2.example", "datacenter": "dc2", "cluster": "main",
         "snapshotAt": "2024-05-01T02:10:00+00:00"}
      ]
    }

``host`` (required) is the name orchestrator knows the agent by; ``datacenter`` and
``cluster`` are free text (empty or absent = unknown); ``snapshotAt`` (optional) is the ISO
8601 time of the host's newest snapshot, used to list the newest first.  A host listed
twice counts once, with its newest time.

Which hosts count, for the host asking:

* the cluster: when the inventory lists this host (by AgentHostname / host name) with a
  cluster, only hosts of that cluster count (a snapshot of another cluster's data is no
  seed for this one); otherwise every cluster counts.
* the datacenter (``available-snapshots-local``): ``Datacenter`` of the configuration, else
  the datacenter the inventory gives this host; with neither, no host is local.

A file that cannot be read or does not have this shape is an error naming the file and
the entry, never an empty list: an empty answer would read as "no snapshots anywhere".
"""

from __future__ import annotations

import datetime
import json
import re

import attrs

from orchagent.errors import NotAvailable

#: An inventory larger than this is refused rather than read on the reactor thread.
MAX_INVENTORY_BYTES = 4 * 1024 * 1024
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


@attrs.frozen
class InventoryHost:
    host: str
    datacenter: str = ""
    cluster: str = ""
    snapshot_at: float | None = None


def _time(value: str, where: str) -> float:
    try:
        when = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise NotAvailable(f"{where}: snapshotAt {value!r} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def _text(entry: dict, key: str, where: str) -> str:
    value = entry.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise NotAvailable(f"{where}: {key} must be a string, not {value!r}")
    return value


def parse(raw: bytes, source: str) -> list[InventoryHost]:
    """The hosts of an inventory document; ``source`` names it in errors."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise NotAvailable(f"snapshot inventory {source} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("hosts"), list):
        raise NotAvailable(f"snapshot inventory {source} must be an object with a list 'hosts'")
    found: dict[str, InventoryHost] = {}
    for index, entry in enumerate(doc["hosts"]):
        where = f"snapshot inventory {source}: hosts[{index}]"
        if not isinstance(entry, dict):
            raise NotAvailable(f"{where} must be an object")
        host = _text(entry, "host", where)
        if not _HOST.fullmatch(host):
            raise NotAvailable(f"{where}: host {host!r} is not a host name")
        at = _text(entry, "snapshotAt", where)
        item = InventoryHost(
            host=host, datacenter=_text(entry, "datacenter", where),
            cluster=_text(entry, "cluster", where),
            snapshot_at=_time(at, where) if at else None)
        known = found.get(host)
        if known is None or (item.snapshot_at or 0.0) > (known.snapshot_at or 0.0):
            found[host] = item
    return list(found.values())


def read(path: str) -> list[InventoryHost]:
    """Read and parse the inventory file (small: read inline, size bounded)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_INVENTORY_BYTES + 1)
    except OSError as e:
        raise NotAvailable(f"cannot read snapshot inventory {path}: {e.strerror}") from None
    if len(raw) > MAX_INVENTORY_BYTES:
        raise NotAvailable(f"snapshot inventory {path} is larger than {MAX_INVENTORY_BYTES} bytes")
    return parse(raw, path)


def newest_first(hosts: list[InventoryHost]) -> list[str]:
    ordered = sorted(hosts, key=lambda h: (h.snapshot_at is not None, h.snapshot_at or 0.0),
                     reverse=True)
    return [h.host for h in ordered]


def select(hosts: list[InventoryHost], me: str, datacenter: str, local: bool) -> list[str]:
    """Host names with a snapshot that count for host ``me``, newest first (see module)."""
    mine = next((h for h in hosts if h.host == me), None)
    if mine is not None and mine.cluster:
        hosts = [h for h in hosts if h.cluster == mine.cluster]
    if local:
        where = datacenter or (mine.datacenter if mine is not None else "")
        if not where:
            return []
        hosts = [h for h in hosts if h.datacenter == where]
    return newest_first(hosts)
