"""Replication coordinates of a seeded copy: which master, where in its binlog, which GTIDs.

What a copy holds decides where it replicates from:

* a copy of a **replica** (its ``master.info`` names a master): that master, at the
  position the replica had *executed* (``relay-log.info``: the master's binlog file and
  the position of the last event applied), and MariaDB's ``gtid_slave_pos`` (read from
  the started copy: ``mysql.gtid_slave_pos`` is transactional, so after crash recovery it
  is exact where the ``.info`` files, written after each commit, may lag);
* a copy of a **primary**: the source host itself, at the end of its own binlog as crash
  recovery left it, and ``gtid_binlog_pos`` (read from the started copy);
* a **backup** (hot seeds): ``mariadb_backup_binlog_info`` / ``xtrabackup_binlog_info``
  (the source's binlog position at the backup's consistent point), or the
  ``--slave-info`` file when the backup has one (a hot seed of a replica: then the
  source's master, as the sender read it from SHOW SLAVE STATUS, at the position the
  replica had applied at the backup's consistent point).

:class:`Coordinates` is what ``/api/seed-status`` reports as ``Replication``; ``From``
names every file or variable a value was read from.  A password read from master.info
is never part of it: :func:`read_master_info` hands it back apart, and the receive job
keeps it only in StateDir (mode 0600) until it is used.

Parsing is blocking file reading of a few small files: call it in a worker thread.
"""

from __future__ import annotations

import os
import re
from typing import Any

import attrs

#: master.info's fixed lines after the line count, in order (MySQL and MariaDB).
_MASTER_INFO_LINES = ("file", "position", "host", "user", "password", "port")
#: MariaDB's ``using_gtid`` in master.info: 0 no, 1 current_pos, 2 slave_pos.
_USING_GTID = {"0": "no", "1": "current_pos", "2": "slave_pos"}
BINLOG_INFO_FILES = ("mariadb_backup_binlog_info", "xtrabackup_binlog_info")
SLAVE_INFO_FILES = ("mariadb_backup_slave_info", "xtrabackup_slave_info")


@attrs.define
class Coordinates:
    """Where a seeded copy continues replicating (None where the data does not say)."""

    master_host: str | None = None
    master_port: int | None = None
    master_user: str | None = None
    binlog_file: str | None = None
    binlog_pos: int | None = None
    gtid: str | None = None
    gtid_mode: str | None = None
    sources: list[str] = attrs.field(factory=list)
    #: What the copy is of: "replica" (its master.info), "backup" (a backup's files),
    #: "primary" (its own binlog), "" while unknown.  Not reported: ``From`` says it.
    of: str = ""

    def read_from(self, where: str) -> None:
        if where not in self.sources:
            self.sources.append(where)

    def status(self) -> dict[str, Any]:
        return {"MasterHost": self.master_host, "MasterPort": self.master_port,
                "MasterUser": self.master_user, "BinlogFile": self.binlog_file,
                "BinlogPos": self.binlog_pos, "GTID": self.gtid, "GTIDMode": self.gtid_mode,
                "From": ", ".join(self.sources)}

    @classmethod
    def from_status(cls, data: dict | None) -> "Coordinates | None":
        if not isinstance(data, dict):
            return None
        return cls(data.get("MasterHost"), data.get("MasterPort"), data.get("MasterUser"),
                   data.get("BinlogFile"), data.get("BinlogPos"), data.get("GTID"),
                   data.get("GTIDMode"), [s for s in str(data.get("From") or "").split(", ") if s])


@attrs.frozen
class MasterInfo:
    """What a replica's master.info says; ``password`` never leaves the agent's StateDir."""

    host: str
    port: int | None
    user: str
    password: str = attrs.field(repr=False)
    file: str
    position: int | None
    using_gtid: str | None


def _int(text: str | None) -> int | None:
    try:
        return int(str(text).strip())
    except (TypeError, ValueError):
        return None


def parse_master_info(text: str) -> MasterInfo | None:
    """master.info as MySQL (5.1+) and MariaDB write it: a line count first, then the
    master's binlog file, read position, host, user, password, port...; MariaDB adds
    ``name=value`` lines (``using_gtid``) before ``END_MARKER``.  The oldest format
    (no count: the file name first) is read too.  None when no master host is set."""
    lines = text.split("\n")
    if not lines or not lines[0].strip():
        return None
    body = lines[1:] if lines[0].strip().isdigit() else lines
    fields = dict(zip(_MASTER_INFO_LINES, body))
    host = fields.get("host", "").strip()
    if not host:
        return None
    extra = {}
    for line in body[len(_MASTER_INFO_LINES):]:
        name, eq, value = line.partition("=")
        if eq and re.fullmatch(r"[a-z_]+", name):
            extra[name] = value.strip()
    return MasterInfo(host=host, port=_int(fields.get("port")), user=fields.get("user", ""),
                      password=fields.get("password", ""), file=fields.get("file", "").strip(),
                      position=_int(fields.get("position")),
                      using_gtid=_USING_GTID.get(extra.get("using_gtid", ""), None))


def parse_relay_log_info(text: str) -> tuple[str, int | None] | None:
    """relay-log.info: (the master's binlog file, the position executed in it), from
    ``[count,] relay log, relay position, master log file, executed position``."""
    lines = [line.strip() for line in text.split("\n")]
    if lines and lines[0].isdigit() and len(lines) > 1 and not lines[1].isdigit():
        lines = lines[1:]
    if len(lines) < 4 or not lines[2]:
        return None
    return lines[2], _int(lines[3])


def parse_binlog_info(text: str) -> tuple[str, int | None, str | None] | None:
    """``xtrabackup_binlog_info``/``mariadb_backup_binlog_info``: file, position and the
    GTID set (tab-separated; the GTID may be missing, or span lines in MySQL's)."""
    parts = text.strip().split(None, 2)
    if len(parts) < 2:
        return None
    gtid = re.sub(r"\s+", "", parts[2]) if len(parts) > 2 else None
    return parts[0], _int(parts[1]), gtid or None


def parse_slave_info(text: str) -> dict[str, Any]:
    """The ``--slave-info`` file: ``CHANGE MASTER TO MASTER_LOG_FILE='f',
    MASTER_LOG_POS=n`` and/or ``SET GLOBAL gtid_slave_pos = 'g'; CHANGE MASTER TO
    master_use_gtid = slave_pos``: {file, position, gtid}, those present."""
    found: dict[str, Any] = {}
    match = re.search(r"MASTER_LOG_FILE\s*=\s*'([^']*)'", text, re.I)
    if match:
        found["file"] = match.group(1)
    match = re.search(r"MASTER_LOG_POS\s*=\s*(\d+)", text, re.I)
    if match:
        found["position"] = int(match.group(1))
    match = re.search(r"gtid_slave_pos\s*=\s*'([^']*)'", text, re.I)
    if match:
        found["gtid"] = match.group(1)
    return found


def _read(root: str, name: str) -> str | None:
    try:
        with open(os.path.join(root, name), "rb") as fh:
            return fh.read(1 << 20).decode("utf-8", "replace")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def read_master_info(root: str, name: str = "master.info") -> MasterInfo | None:
    """The copy's master.info (blocking), or None when it names no master."""
    text = _read(root, name)
    return None if text is None else parse_master_info(text)


def from_tree(root: str, source_host: str, relay_log_info: str = "relay-log.info",
              master_info: str = "master.info",
              source_master: Any = None) -> tuple[Coordinates, MasterInfo | None]:
    """Coordinates a staged tree holds in files (blocking), and the master.info read (for
    its password).  Completed by :func:`complete` with what the started copy says.

    ``source_master`` (``host``, ``port``, ``user``): the master the source's server
    replicated from, as a hot seed's sender announced it (its SHOW SLAVE STATUS): a
    backup holds its position there (``--slave-info``) but no master.info."""
    found = Coordinates()
    info = read_master_info(root, master_info)
    if info is not None:
        found.master_host, found.master_port, found.master_user = info.host, info.port, info.user
        found.binlog_file, found.binlog_pos = info.file or None, info.position
        found.gtid_mode = info.using_gtid
        found.of = "replica"
        found.read_from(master_info)
        executed = _read(root, relay_log_info)
        executed = parse_relay_log_info(executed) if executed is not None else None
        if executed is not None:
            found.binlog_file, found.binlog_pos = executed
            found.read_from(relay_log_info)
        return found, info
    for name in SLAVE_INFO_FILES:
        text = _read(root, name)
        if text is None:
            continue
        slave = parse_slave_info(text)
        if slave:
            # The backup's source was a replica: the position is its master's, at the
            # backup's consistent point.  The backup names no master: the sender does
            # (else it stays unknown, and the copy is not replicated).
            found.binlog_file, found.binlog_pos = slave.get("file"), slave.get("position")
            if slave.get("gtid"):
                found.gtid, found.gtid_mode = slave["gtid"], "slave_pos"
            found.of = "backup"
            found.read_from(name)
            if source_master is not None:
                found.master_host, found.master_port = source_master.host, source_master.port
                found.master_user = source_master.user or None
                found.read_from("the source's SHOW SLAVE STATUS (seed peer)")
            return found, None
    for name in BINLOG_INFO_FILES:
        text = _read(root, name)
        parsed = parse_binlog_info(text) if text is not None else None
        if parsed is not None:
            found.master_host = source_host or None
            found.binlog_file, found.binlog_pos, gtid = parsed
            if gtid:
                found.gtid, found.gtid_mode = gtid, "slave_pos"
            found.of = "backup"
            found.read_from(name)
            found.read_from("the source host (seed peer)")
            return found, None
    return found, None


def complete(found: Coordinates, server: dict[str, Any], source_host: str,
             port: int | None) -> Coordinates:
    """Add what the started copy said (``server``: ``gtid_binlog_pos``,
    ``gtid_slave_pos``, ``gtid_executed``, ``gtid_mode``, ``binlog_file``,
    ``binlog_pos``) to what its files said.  A copy without a master of its own is a
    primary's: its master is the source host, at its own binlog's end.  ``port``: the
    MySQL port of this host, taken as the source's (the copy does not hold it)."""
    if found.of == "replica":
        slave_pos = server.get("gtid_slave_pos")
        if slave_pos:
            found.gtid = slave_pos
            found.gtid_mode = "slave_pos"
            found.read_from("gtid_slave_pos")
        elif server.get("gtid_executed"):
            found.gtid, found.gtid_mode = server["gtid_executed"], "auto_position"
            found.read_from("gtid_executed")
        return found
    if found.of == "backup":
        if found.master_host and found.master_port is None:
            found.master_port = port
        return found
    if server.get("binlog_file"):
        found.binlog_file, found.binlog_pos = server["binlog_file"], server.get("binlog_pos")
        found.read_from("binlog after crash recovery")
    if server.get("gtid_binlog_pos"):
        found.gtid, found.gtid_mode = server["gtid_binlog_pos"], "slave_pos"
        found.read_from("gtid_binlog_pos")
    elif server.get("gtid_executed") and str(server.get("gtid_mode", "")).upper() == "ON":
        found.gtid, found.gtid_mode = server["gtid_executed"], "auto_position"
        found.read_from("gtid_executed")
    if found.sources:
        found.of = "primary"
        found.master_host, found.master_port = source_host or None, port
        found.read_from("the source host (seed peer)")
    return found
