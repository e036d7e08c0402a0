"""The backup tools on this host: which are installed, their versions, their argv.

The agent never holds MySQL credentials: a tool that must connect to the server (a hot
backup) reads them from its own option-file groups (``[mariabackup]``,
``[xtrabackup]``, ``[client]``); only the server's socket and port are passed on its
command line, when those groups name none (:meth:`Tools.connection_args`).  When ``MySQLOptionsFile`` is set, the agent reads that
file instead of ``/etc/mysql/my.cnf``, and so does the tool: it gets
``--defaults-file=MySQLOptionsFile``.  Preparing needs no server and no credentials: it
reads only the backup's own ``backup-my.cnf`` (``--defaults-file``), so nothing in the
host's option files (a log or undo directory of the live server, for one) can point it
anywhere but the work copy.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Callable

from twisted.internet import defer, threads
from twisted.logger import Logger

from orchagent.backups.discovery import (CHECKPOINTS_FILES, MARIABACKUP, XTRABACKUP, checkpoints_file,
                                        read_key_values)
from orchagent.host.mysql_options import (DEFAULT_OPTION_FILES, OptionFileError, ServerOptions,
                                          load_server_options, read_options)

log = Logger()

#: The tools in the order a hot backup prefers them.
TOOLS = (MARIABACKUP, XTRABACKUP)
#: The option groups each tool takes its connection options (socket, port, user) from.
CLIENT_GROUPS = {
    MARIABACKUP: ("client", "client-server", "client-mariadb", "xtrabackup", "mariabackup",
                  "mariadb-backup"),
    XTRABACKUP: ("client", "xtrabackup"),
}
INNOCHECKSUM = "innochecksum"
#: What ``--prepare``'s Aria recovery prints, exiting 0 all the same, for a table it could
#: not open (an I/O error on the copy): that table is left unrecovered.
ARIA_SKIPPED = re.compile(r"^\*\*\*WARNING: (.*(?:could not be opened|Error: \d+).*)$", re.MULTILINE)
#: What it prints, exiting 0 all the same, when a sync of a file it wrote fails (mysys;
#: the second ``fdatasync`` of ``aria_log.00000001`` failing: backup_mount error point
#: #471): what that file held may be gone from the page cache.
SYNC_FAILED = re.compile(r"^\W*(\S+: Can't sync file .*)$", re.MULTILINE)
_VERSION = re.compile(r"\b(\d+\.\d+)\.\d+")
ARIA_CHK = "aria_chk"
#: Files ``--prepare`` writes beside the data, which it leaves empty, exiting 0, when its
#: write of them fails: the binlog position InnoDB recorded (what a replica of the copy
#: starts from).
PREPARE_WRITES = ("xtrabackup_binlog_pos_innodb",)
#: Aria tables per aria_chk process (argv stays far below the kernel's limit).
ARIA_CHK_BATCH = 256


def major_version(text: str) -> str:
    """``X.Y`` of a version text (``10.11.19-MariaDB`` -> ``10.11``), or ""."""
    match = _VERSION.search(text or "")
    return match.group(1) if match else ""


def aria_tables(data: str) -> list[str]:
    """The Aria tables (``.MAI`` index files) of a datadir, relative, sorted (blocking)."""
    found = []
    for directory, dirs, files in os.walk(data):
        dirs.sort()
        found.extend(os.path.relpath(os.path.join(directory, name), data)
                     for name in sorted(files) if name.endswith(".MAI"))
    return found


def _aria_findings(stderr: bytes, data: str) -> list[str]:
    """aria_chk's error output, one entry per table it spoke of: ``bk/a.MAI: warning: ...``."""
    findings: list[str] = []
    table = ""
    prefix = data.rstrip("/") + "/"
    for line in stderr.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if line.startswith("aria_chk: "):
            line = line[len("aria_chk: "):]
        if not line:
            continue
        if line.startswith("Aria file "):
            table = line[len("Aria file "):].replace(prefix, "", 1)
            continue
        line = line.replace(prefix, "")
        if findings and table and findings[-1].startswith(f"{table}: "):
            findings[-1] += f"; {line}"
        else:
            findings.append(f"{table}: {line}" if table else line)
    return findings


class Tools:
    """What is installed (``which`` is looked up each time: installing a tool counts at
    once) and each tool's version (asked once per process)."""

    def __init__(self, config, runner, which: Callable[[str], str | None] = shutil.which):
        self.config = config
        self.runner = runner
        self.which = which
        self._versions: dict[str, str] = {}

    def path(self, tool: str) -> str | None:
        return self.which(tool) or next(
            (p for p in (f"/usr/bin/{tool}", f"/usr/sbin/{tool}") if os.path.exists(p)), None)

    def installed(self, tool: str) -> bool:
        return self.path(tool) is not None

    def hot_tool(self) -> str | None:
        """mariabackup or xtrabackup, whichever is installed (mariabackup first)."""
        return next((t for t in TOOLS if self.installed(t)), None)

    async def version(self, tool: str) -> str:
        """``X.Y`` of the installed tool's server version, "" when unknown.  mariabackup
        says ``based on MariaDB server 10.11.19``; xtrabackup ``version 8.0.35-30``."""
        if tool not in self._versions:
            version = ""
            if self.installed(tool):
                result = await self.runner.run([tool, "--version"], check=False, timeout=30)
                text = (result.stdout + result.stderr).decode("utf-8", "replace")
                server = re.search(r"server\s+(\d+\.\d+\.\d+)", text)
                version = major_version(server.group(1) if server else text)
            self._versions[tool] = version
        return self._versions[tool]

    def defaults_args(self) -> list[str]:
        """How a tool finds its option files: MySQLOptionsFile when set, else its own
        defaults (the same files the agent reads)."""
        options_file = self.config.mysql_options_file
        return [f"--defaults-file={options_file}"] if options_file else []

    def backup_argv(self, tool: str, slave_info: bool = False) -> list[str]:
        """``tool --backup`` with its option files and, where they leave it out, the
        server's socket and port (:meth:`connection_args`); the caller adds the rest.

        ``slave_info``: the server is a replica, so ``--slave-info``: the tool writes the
        replica's position in its master's binlog at the backup's consistent point
        (``mariadb_backup_slave_info``/``xtrabackup_slave_info``), where a copy of a
        replica continues from.  Only then: it needs the backup user's right to read
        SHOW SLAVE STATUS, which a primary's backup user need not have.  (Not
        ``--safe-slave-backup``: it stops the replica's SQL thread for the backup's last
        phase, and a tool killed meanwhile, a seed aborted, leaves it stopped.)"""
        return [tool, *self.defaults_args(), *self.connection_args(tool), "--backup",
                *(["--slave-info"] if slave_info else [])]

    def connection_args(self, tool: str) -> list[str]:
        """``--socket``/``--port`` of the server for a tool whose own groups name none.

        The tools connect with the client options of their own groups (CLIENT_GROUPS) and
        fall back to the compiled-in socket, not to the server's ``[mysqld]`` one: a host
        whose ``[client]`` names no socket but whose server listens elsewhere fails a hot
        backup with "Can't connect to local server through socket".  Each of the two is
        passed only when the tool's groups name none and the server's groups
        (``[mysqld]``, ``[mariadb]``, ``[server]``...) do."""
        files = self._files()
        try:
            own = ServerOptions(read_options(files, CLIENT_GROUPS[tool]), files)
            server = load_server_options(self.config.mysql_options_file)
        except OptionFileError:
            return []
        return [f"--{name}={server.value(name)}" for name in ("socket", "port")
                if own.get(name) is None and server.value(name)]

    def _files(self) -> tuple[str, ...]:
        """The option files the tool reads: MySQLOptionsFile (its --defaults-file), else
        the default files and the user's ~/.my.cnf."""
        if self.config.mysql_options_file:
            return (self.config.mysql_options_file,)
        candidates = (*DEFAULT_OPTION_FILES, os.path.expanduser("~/.my.cnf"))
        return tuple(p for p in candidates if os.path.exists(p))

    def tool_options(self, tool: str) -> ServerOptions:
        """The ``[xtrabackup]`` (and for mariabackup ``[mariabackup]``) options the tool
        itself will read: used to tell whether decryption is configured."""
        groups = ["xtrabackup"] + (["mariabackup", "mariadb-backup"] if tool == MARIABACKUP else [])
        files = self._files()
        try:
            return ServerOptions(read_options(files, groups), files)
        except OptionFileError:
            return ServerOptions((), files)

    def decryption(self, tool: str) -> tuple[str, str]:
        """(algorithm, where) when the tool's option groups say how to decrypt (``encrypt``
        and ``encrypt-key-file`` or ``encrypt-key``), else ("", what is missing)."""
        options = self.tool_options(tool)
        algorithm = options.value("encrypt") or ""
        has_key = options.value("encrypt-key-file") or options.value("encrypt-key")
        where = f"the [xtrabackup] group of {options.describe()}"
        if algorithm and has_key:
            return algorithm, where
        return "", f"no encrypt and encrypt-key-file in {where}"

    @staticmethod
    def ignored_failure(output: bytes) -> str:
        """What a ``--prepare`` that exited 0 says failed and went on after, from its
        output; "" when nothing: a table its Aria recovery left unrecovered
        (ARIA_SKIPPED), a file it could not sync (SYNC_FAILED)."""
        text = output.decode("utf-8", "replace")
        for found, said in ((ARIA_SKIPPED, "its Aria recovery left a table unrecovered"),
                            (SYNC_FAILED, "it could not sync a file it wrote")):
            lines = found.findall(text)[:3]
            if lines:
                return f"{said}: {' | '.join(lines)}"
        return ""

    @staticmethod
    def unprepared(data: str, tool: str) -> str:
        """What says a prepare of ``data`` that exited 0 did not finish writing (blocking):
        its checkpoints file not saying prepared, or a file it writes left empty; ""."""
        name = checkpoints_file(data)
        try:
            kind = read_key_values(os.path.join(data, name)).get("backup_type", "") if name else ""
        except OSError as e:
            return f"its checkpoints file {name} cannot be read ({e.strerror})"
        if kind != "full-prepared" and not (tool == MARIABACKUP and kind == "log-applied"):
            return f"its checkpoints file {name or CHECKPOINTS_FILES[0]} says {kind or 'nothing'!r}, not prepared"
        for written in PREPARE_WRITES:
            path = os.path.join(data, written)
            if os.path.isfile(path) and os.path.getsize(path) == 0:
                return f"it left {written} empty"
        return ""

    async def aria_damage(self, data: str, run: Callable | None = None, **kwargs) -> str:
        """What ``aria_chk --check`` finds wrong with the Aria tables of a prepared copy,
        "" when nothing (or when the copy has no Aria table).

        ``--prepare``'s Aria recovery ignores a failed write of a table (the ``pwrite64``
        of ``bk/a.MAI``'s state header failing with EIO, ENOSPC, EDQUOT or EROFS): no
        message, exit status 0, and the table is left as the backup copied it, "not
        closed properly" (open count 1), where a correct prepare closes every table.
        ``aria_chk --check --read-only`` (it writes nothing, not even the checked mark)
        of every ``.MAI`` of the copy says so on its error output, exiting 0 for a
        warning: any line there, or a non-zero exit, is a finding.  A correct prepare
        leaves no line (tables with and without recovery work, the mysql schema's
        Aria tables).  ``--datadir`` is the copy, so each table is checked against
        the copy's own ``aria_log_control`` (a table whose LSNs or transaction ids are
        ahead of it is reported too).

        ``run`` (the caller's runner's ``run``, default this one's) and ``kwargs`` start
        each aria_chk (privileged, like the backup tools); a run answering None (stopped
        by its owner) raises CancelledError.  When aria_chk is not installed (it comes
        with the server package, which a host restoring backups may lack) the check is
        skipped with a warning in the log, once per process."""
        tables = await threads.deferToThread(aria_tables, data)
        if not tables:
            return ""
        path = self.path(ARIA_CHK)
        if path is None:
            if not Tools._aria_chk_missing_said:
                Tools._aria_chk_missing_said = True
                log.warn("{tool} is not installed: the Aria tables of prepared backups are "
                         "not checked (mariabackup --prepare ignores a failed write of one); "
                         "install the MariaDB server package for it", tool=ARIA_CHK)
            return ""
        run = run or self.runner.run
        options = {"check": False, "privileged": True, "timeout": 0,
                   "stall": self.config.tool_stall_seconds, **kwargs}
        found: list[str] = []
        for start in range(0, len(tables), ARIA_CHK_BATCH):
            batch = tables[start:start + ARIA_CHK_BATCH]
            result = await run([path, "--check", "--read-only", "--silent", f"--datadir={data}",
                                *(os.path.join(data, t) for t in batch)], **options)
            if result is None:
                raise defer.CancelledError()
            said = _aria_findings(result.stderr, data)
            if said:
                found.extend(said)
            elif not result.ok:
                found.append(result.tool_failure(ARIA_CHK))
        if not found:
            return ""
        return (f"{ARIA_CHK} --check of the {len(tables)} Aria table(s) of the prepared copy: "
                + " | ".join(found[:3]) + (f" (and {len(found) - 3} more)" if len(found) > 3 else ""))

    _aria_chk_missing_said = False

    @staticmethod
    def prepare_defaults(data_dir: str) -> list[str]:
        cnf = os.path.join(data_dir, "backup-my.cnf")
        return [f"--defaults-file={cnf}"] if os.path.isfile(cnf) else ["--no-defaults"]
