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
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.logger import Logger

from orchagent.errors import AgentError, NotAvailable
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
        """/api/replication-status: SHOW SLAVE STATUS in short, the seed applied last and
        the error of that apply, if any."""
        result, error = await self._client("SHOW SLAVE STATUS\n", column_names=True)
        if not result.ok:
            raise NotAvailable(f"cannot read the replication status through the MySQL client: {error}")
        found = parse_slave_status(result.stdout) or {"IORunning": False, "SQLRunning": False}
        found["SeedId"] = self.last.get("SeedId") or self._applied()
        found["Error"] = self.last.get("Error", "")
        return found

    def _applied(self) -> str:
        try:
            with open(os.path.join(self.config.state_dir, MARKER)) as fh:
                return str(json.load(fh).get("SeedId", ""))
        except (OSError, ValueError):
            return ""

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
        candidates = [s for s in statuses if s.get("Role") == "receiver" and s.get("State") == "completed"
                      and (s.get("Replication") or {}).get("MasterHost")]
        if not candidates:
            return False
        seed = max(candidates, key=lambda s: s.get("UpdatedAt") or "")
        seed_id = seed["SeedId"]
        if self._applied() == seed_id:
            return False
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
        with open(os.path.join(self.config.state_dir, MARKER + ".tmp"), "w") as fh:
            json.dump({"SeedId": seed_id}, fh)
        os.replace(os.path.join(self.config.state_dir, MARKER + ".tmp"),
                   os.path.join(self.config.state_dir, MARKER))
        self.store.remove(seed_id, "master-password")
        log.info("seed {seed}: replication started from {host}:{port} ({how})", seed=seed_id,
                 host=coordinates["MasterHost"], port=coordinates.get("MasterPort"),
                 how=("GTID " + coordinates["GTID"]) if "MASTER_USE_GTID" in statements else
                 f"{coordinates.get('BinlogFile')}:{coordinates.get('BinlogPos')}")
        return True
