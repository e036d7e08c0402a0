"""Replication of a seeded server: pointed at its master, started, reported.

With ``SeedStartReplication``, once MySQL has been started on a seeded datadir (the
``mysql-start`` that ends orchestrator's v1 sequence, or the controller's), the agent
takes the newest completed seed this host received whose ``Replication`` names a master,
and runs, through the host's own client (``MySQLClientCommand`` with its option groups:
``[client]``, socket authentication as the OS user; the agent holds no database
credentials of its own):

    STOP SLAVE;
    SET GLOBAL gtid_slave_pos = '<GTID>';            -- MariaDB, a primary's copy or a backup
    CHANGE MASTER TO MASTER_HOST=..., MASTER_PORT=..., MASTER_USER=..., MASTER_PASSWORD=...,
        MASTER_USE_GTID=slave_pos;                   -- else MASTER_LOG_FILE/MASTER_LOG_POS
    START SLAVE;

The statements go on the client's standard input, never its command line.  The
replication user and password are those of the copied master.info (kept in StateDir by
the receive, removed once used), else those of the ``[client]`` group of
``ReplicationCredentialsFile``.  Whatever the client answers is stripped of the password
before it is logged or shown.  A seed is applied once (``StateDir/replication.json``); a
failure changes nothing else: the datadir stays, replication stays stopped, and
``/api/replication-status`` says why.

``/api/start-replication/{id}`` applies a named seed the same way whatever
``SeedStartReplication`` says (``orchagent seed --replicate``): the controller asks, the
agent applies with the same credentials, so no key needs to be set for it and the v1
``mysql-start`` is unchanged with the keys unset.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import attrs
from twisted.logger import Logger

from orchagent.errors import AgentError, NotAvailable, NotFound
from orchagent.host.mysql_options import read_options
from orchagent.seed.state import StateStore

log = Logger()

#: SHOW SLAVE STATUS columns reported, by the name /api/replication-status gives them.
STATUS_COLUMNS = {
    "Slave_IO_Running": "IORunning", "Slave_SQL_Running": "SQLRunning",
    "Seconds_Behind_Master": "SecondsBehindMaster", "Master_Host": "MasterHost",
    "Master_Port": "MasterPort", "Master_User": "MasterUser",
    "Master_Log_File": "MasterLogFile", "Read_Master_Log_Pos": "ReadMasterLogPos",
    "Relay_Master_Log_File": "RelayMasterLogFile", "Exec_Master_Log_Pos": "ExecMasterLogPos",
    "Gtid_IO_Pos": "GTIDIOPos", "Using_Gtid": "UsingGTID",
    "Last_IO_Errno": "LastIOErrno", "Last_IO_Error": "LastIOError",
    "Last_SQL_Errno": "LastSQLErrno", "Last_SQL_Error": "LastSQLError",
}
_NUMBERS = {"SecondsBehindMaster", "MasterPort", "ReadMasterLogPos", "ExecMasterLogPos",
            "LastIOErrno", "LastSQLErrno"}
MARKER = "replication.json"


def sql_string(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def change_master(coordinates: dict[str, Any], user: str, password: str | None) -> str:
    """The statements that point this server at the seed's master (see the module
    docstring); the password is in them, so they only ever go to the client's stdin."""
    parts = [f"MASTER_HOST={sql_string(coordinates['MasterHost'])}"]
    if coordinates.get("MasterPort"):
        parts.append(f"MASTER_PORT={int(coordinates['MasterPort'])}")
    if user:
        parts.append(f"MASTER_USER={sql_string(user)}")
    if password is not None:
        parts.append(f"MASTER_PASSWORD={sql_string(password)}")
    lines = ["STOP SLAVE;"]
    gtid = coordinates.get("GTID")
    if gtid and coordinates.get("GTIDMode") == "slave_pos":
        # A replica's copy holds its position in mysql.gtid_slave_pos, crash-safe and
        # possibly ahead of the seed's (the server may have replicated since it started):
        # it stays.  A primary's copy or a backup has none of its own: it is set.
        if "gtid_slave_pos" not in str(coordinates.get("From", "")).split(", "):
            lines.append(f"SET GLOBAL gtid_slave_pos = {sql_string(gtid)};")
        parts.append("MASTER_USE_GTID=slave_pos")
    elif coordinates.get("BinlogFile"):
        parts.append(f"MASTER_LOG_FILE={sql_string(coordinates['BinlogFile'])}")
        parts.append(f"MASTER_LOG_POS={int(coordinates.get('BinlogPos') or 4)}")
    else:
        raise NotAvailable("the seed's coordinates name neither a GTID nor a binlog position")
    lines.append("CHANGE MASTER TO " + ", ".join(parts) + ";")
    lines.append("START SLAVE;")
    return "\n".join(lines) + "\n"


def parse_slave_status(stdout: bytes) -> dict[str, Any] | None:
    """``SHOW SLAVE STATUS`` in batch mode (a header line, a value line): the columns of
    :data:`STATUS_COLUMNS`; None when this server is no replica."""
    lines = stdout.decode("utf-8", "replace").splitlines()
    if len(lines) < 2:
        return None
    row = dict(zip(lines[0].split("\t"), lines[1].split("\t")))
    found: dict[str, Any] = {}
    for column, name in STATUS_COLUMNS.items():
        value: Any = row.get(column)
        if value == "NULL":
            value = None
        if name in _NUMBERS and value not in (None, ""):
            try:
                value = int(value)
            except ValueError:
                pass
        if name in ("IORunning", "SQLRunning") and value is not None:
            value = value == "Yes"
        found[name] = value
    return found


@attrs.frozen
class ThisServersMaster:
    """The master this host's server replicates from (its SHOW SLAVE STATUS)."""

    host: str
    port: int | None
    user: str

    def announce(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "user": self.user}

    @classmethod
    def from_announce(cls, value: Any) -> "ThisServersMaster | None":
        """What a hot seed's sender announced (checked: it comes over the wire), or None."""
        if not isinstance(value, dict):
            return None
        host, port, user = value.get("host"), value.get("port"), value.get("user")
        if not isinstance(host, str) or not host or len(host) > 255 or any(c.isspace() for c in host):
            return None
        if port is not None and (not isinstance(port, int) or isinstance(port, bool)
                                 or not 0 < port < 65536):
            return None
        if not isinstance(user, str) or len(user) > 128:
            return None
        return cls(host, port, user)


async def master_of_this_server(config, runner) -> ThisServersMaster | None:
    """This host's server's master, None when it replicates from none (SHOW SLAVE STATUS
    is empty or names no host), through ``MySQLClientCommand`` as every statement of the
    agent's (its option groups: the agent holds no credentials).  A hot seed of a
    replica needs it: the backup holds the replica's position in its master's binlog
    (``--slave-info``) but names no master (mariabackup copies no master.info).  Raises
    NotAvailable when the client cannot say (not configured, refused, no privilege)."""
    if not config.mysql_client_command:
        raise NotAvailable("MySQLClientCommand is not configured")
    result = await runner.shell(config.mysql_client_command, args=["--batch"],
                                stdin=b"SHOW SLAVE STATUS\n", check=False)
    if not result.ok:
        raise NotAvailable("SHOW SLAVE STATUS through MySQLClientCommand failed: "
                           + ReplicationControl._clean(result.stderr, None))
    found = parse_slave_status(result.stdout)
    if not found or not found.get("MasterHost"):
        return None
    port = found.get("MasterPort")
    return ThisServersMaster(str(found["MasterHost"]), port if isinstance(port, int) else None,
                             str(found.get("MasterUser") or ""))


class ReplicationControl:
    """The agent's side of the seeded server's replication (the API's)."""

    def __init__(self, config, runner):
        self.config = config
        self.runner = runner
        self.store = StateStore(config.state_dir)
        #: The last apply: {"SeedId", "Error"} (Error empty when it went through).
        self.last: dict[str, str] = {}

    async def _client(self, statements: str, secret: str | None = None,
                      column_names: bool = False):
        args = ["--batch"] + ([] if column_names else ["--skip-column-names"])
        result = await self.runner.shell(self.config.mysql_client_command, args=args,
                                         stdin=statements.encode(), check=False)
        return result, self._clean(result.stderr, secret)

    @staticmethod
    def _clean(stderr: bytes, secret: str | None) -> str:
        text = stderr.decode("utf-8", "replace").strip()
        if secret:
            text = text.replace(secret, "<password>")
        lines = [line for line in text.splitlines() if line.startswith("ERROR")] or text.splitlines()
        return " ".join(lines)[-800:]

    async def status(self) -> dict[str, Any]:
        """/api/replication-status: SHOW SLAVE STATUS in short, the seed applied last, the
        error of that apply, if any, and ``Problem``: what stops replication, restated
        with the seed's coordinates (:func:`diagnose`)."""
        result, error = await self._client("SHOW SLAVE STATUS\n", column_names=True)
        if not result.ok:
            raise NotAvailable(f"cannot read the replication status through the MySQL client: {error}")
        parsed = parse_slave_status(result.stdout)
        found = parsed or {"IORunning": False, "SQLRunning": False}
        marker = self._marker()
        found["SeedId"] = self.last.get("SeedId") or str(marker.get("SeedId", ""))
        found["Error"] = self.last.get("Error", "")
        found["Problem"] = diagnose(found, marker.get("Replication")) if parsed else ""
        return found

    def _marker(self) -> dict[str, Any]:
        try:
            with open(os.path.join(self.config.state_dir, MARKER)) as fh:
                value = json.load(fh)
            return value if isinstance(value, dict) else {}
        except (OSError, ValueError):
            return {}

    def _applied(self) -> str:
        return str(self._marker().get("SeedId", ""))

    def _credentials(self, seed_id: str, user: str | None) -> tuple[str, str | None]:
        data = self.store.read(seed_id, "master-password")
        if data is not None and user:
            return user, data.decode()
        path = self.config.replication_credentials_file
        if path:
            options = {o.name.replace("-", "_"): o.value for o in read_options([path], ["client"], True)}
            return options.get("user") or user or "", options.get("password")
        return user or "", None

    async def after_start(self, statuses) -> bool:
        """MySQL was started: apply the newest completed received seed's coordinates,
        once (see the module docstring).  False when there was nothing to apply."""
        if not self.config.seed_start_replication:
            return False
        candidates = [s for s in statuses if _replicable(s)]
        if not candidates:
            return False
        seed = max(candidates, key=lambda s: s.get("UpdatedAt") or "")
        if self._applied() == seed["SeedId"]:
            return False
        return await self._apply(seed)

    async def start(self, seed_id: str, statuses) -> dict[str, Any]:
        """/api/start-replication/{id} (the controller's ``seed --replicate``): apply the
        named seed's coordinates unless they already were (by SeedStartReplication at
        mysql-start, or an earlier call), whatever SeedStartReplication says, then the
        status.  The credentials are the same as at mysql-start: the agent holds none of
        its own.  A failed apply is the status's ``Error``."""
        seed = next((s for s in statuses if s.get("SeedId") == seed_id), None)
        if seed is None:
            raise NotFound(f"this host knows no seed {seed_id}")
        if not _replicable(seed):
            raise NotAvailable(
                f"seed {seed_id} has no master to replicate from "
                f"(Role {seed.get('Role')}, State {seed.get('State')}, Replication {seed.get('Replication')})")
        if self._applied() != seed_id:
            await self._apply(seed)
        return await self.status()

    async def _apply(self, seed: dict[str, Any]) -> bool:
        seed_id = seed["SeedId"]
        coordinates = seed["Replication"]
        self.last = {"SeedId": seed_id, "Error": ""}
        try:
            user, password = self._credentials(seed_id, coordinates.get("MasterUser"))
            statements = change_master(coordinates, user, password)
        except AgentError as e:
            self.last["Error"] = f"replication for seed {seed_id} not started: {e.message}"
            log.error("{error}", error=self.last["Error"])
            return False
        result, error = await self._client(statements, secret=password)
        if not result.ok:
            self.last["Error"] = (f"pointing MySQL at {coordinates['MasterHost']} for seed {seed_id} "
                                  f"failed: {error}")
            log.error("{error}", error=self.last["Error"])
            return False
        applied = {k: v for k, v in coordinates.items() if k != "From"}
        applied["MasterUser"] = user or coordinates.get("MasterUser")
        with open(os.path.join(self.config.state_dir, MARKER + ".tmp"), "w") as fh:
            json.dump({"SeedId": seed_id, "Replication": applied}, fh)
        os.replace(os.path.join(self.config.state_dir, MARKER + ".tmp"),
                   os.path.join(self.config.state_dir, MARKER))
        self.store.remove(seed_id, "master-password")
        log.info("seed {seed}: replication started from {host}:{port} ({how})", seed=seed_id,
                 host=coordinates["MasterHost"], port=coordinates.get("MasterPort"),
                 how=("GTID " + coordinates["GTID"]) if "MASTER_USE_GTID" in statements else
                 f"{coordinates.get('BinlogFile')}:{coordinates.get('BinlogPos')}")
        return True


def _replicable(seed: dict[str, Any]) -> bool:
    return (seed.get("Role") == "receiver" and seed.get("State") == "completed"
            and bool((seed.get("Replication") or {}).get("MasterHost")))


#: MariaDB's and MySQL's 1236 texts when the binlog a replica asks for is gone.
_PURGED = re.compile(r"could not find first log file name|purged|not in the master's binlog"
                     r"|could not find gtid state", re.IGNORECASE)
#: MySQL's GTID variant names what the master lacks.
_MISSING = re.compile(r"the missing transactions are '([^']*)'", re.IGNORECASE)


def _position(coordinates: dict[str, Any]) -> str:
    where = []
    if coordinates.get("BinlogFile"):
        where.append(f"binlog {coordinates['BinlogFile']} at position {coordinates.get('BinlogPos') or 4}")
    if coordinates.get("GTID"):
        where.append(f"GTID {coordinates['GTID']}")
    return " / ".join(where) or "an unknown position"


def diagnose(found: dict[str, Any], coordinates: dict[str, Any] | None) -> str:
    """What stops replication, in words that name the master, the seed's position and
    what to fix; empty when nothing does (an error of a thread that runs again is past).
    The server's own text is quoted; ``coordinates`` are the seed's, as applied."""
    coordinates = coordinates or {}
    master = (f"{found.get('MasterHost') or coordinates.get('MasterHost')}:"
              f"{found.get('MasterPort') or coordinates.get('MasterPort') or 3306}")
    # An error left from before a thread (re)connected is history, not a stop.
    io_errno = 0 if found.get("IORunning") else found.get("LastIOErrno") or 0
    io_error = found.get("LastIOError") or ""
    if io_errno == 1236:
        if _PURGED.search(io_error):
            needed = (f"{coordinates['BinlogFile']} (from position {coordinates.get('BinlogPos') or 4})"
                      if coordinates.get("BinlogFile") else "the binlog holding the seed's position")
            if coordinates.get("GTID"):
                needed += f" holding the transactions after GTID {coordinates['GTID']}"
            missing = _MISSING.search(io_error)
            has_text = (f"; the master lacks the transactions {missing.group(1)}" if missing else
                        "; the master's answer does not list the binlogs it still has "
                        "(SHOW BINARY LOGS on the master does)")
            return (f"the master {master} no longer has the binlog this seed needs: {needed}, "
                    f"purged past the seed's position{has_text} (error 1236: {io_error}). "
                    "Seed again from a newer snapshot or backup, or give the master those "
                    "binlogs back; replication stays stopped, the datadir is kept")
        return (f"the master {master} refused to send its binlog from the seed's {_position(coordinates)} "
                f"(error 1236: {io_error}); replication stays stopped, the datadir is kept")
    if io_errno in (1045, 1698):
        return (f"the master {master} refused the replication user "
                f"{found.get('MasterUser') or coordinates.get('MasterUser') or '?'} (error {io_errno}: {io_error}). "
                "Check that user's grants (REPLICATION SLAVE) and its password, as master.info "
                "or ReplicationCredentialsFile's [client] gave it; nothing replicates meanwhile "
                "(the server retries the connection on its own), the datadir is kept")
    if io_errno in (2003, 2005, 2002, 2013):
        return (f"cannot reach the master {master} (error {io_errno}: {io_error}). Check that "
                "MySQL runs there, listens on that address and port and lets this host in; "
                f"replication would start from the seed's {_position(coordinates)}; nothing "
                "replicates meanwhile (the server retries the connection on its own), the datadir is kept")
    if io_errno:
        return f"replication from {master} stopped on an IO error {io_errno}: {io_error}"
    sql_errno = 0 if found.get("SQLRunning") else found.get("LastSQLErrno") or 0
    sql_error = found.get("LastSQLError") or ""
    if sql_errno:
        return (f"replication from {master} stopped on an SQL error {sql_errno} at "
                f"{found.get('RelayMasterLogFile')}:{found.get('ExecMasterLogPos')}: {sql_error}")
    return ""
