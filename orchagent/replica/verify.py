"""The verified start: a throwaway server on a received copy, before it replaces anything.

A seed's tree can be byte-for-byte what the source had and still not start: a snapshot
taken while the source wrote, a backup prepared by a tool of another version, a page
corrupted on the source's own disk.  So once staging is verified, synced and checked on
disk (the commit point, :meth:`ReceiveJob.promote`, is still ahead), :class:`StartCheck`
starts the installed server on the staging directory:

* the host's option files (``MySQLOptionsFile``, else the server's default files), then
  ``--datadir=<staging>``, a socket, pid file, error log and tmpdir in a private
  directory of its own, ``--skip-networking``, ``--skip-slave-start``,
  ``--event-scheduler=OFF``, ``--skip-grant-tables`` (the agent holds no credentials, and
  needs none for a server nobody else can reach), general and slow logs off, the buffer
  pool small and neither loaded nor dumped (the copy's ``ib_buffer_pool`` stays as the
  source left it), as the datadir's owner;
* files the option files put outside the datadir would be the *host's* files: binary logs
  there become ``--skip-log-bin``, relay logs go to the private directory, InnoDB and Aria
  directories are pointed at the copy;
* InnoDB and Aria recover (the binlog in the copy coordinates the prepared transactions),
  the system tables are read (``mysql.user``, ``mysql.db``), then a bounded sample of user
  tables: each opened (``SELECT 1 ... LIMIT 1``), and read in full (``CHECK TABLE ...
  QUICK``) when its file is small, all in one client session (a client per statement
  cost 10-20 ms each, up to 64 of them); the replication position is read
  (:mod:`orchagent.replica.coordinates`); and the server is shut down cleanly.

A step that fails raises :class:`StartCheckFailed` naming the step and the last lines of
the server's error log; the caller fails the seed, the datadir untouched.  The server is
a child of the agent's command runner (its own process group): :meth:`StartCheck.cancel`
stops it (SIGTERM, then SIGKILL) when the seed is aborted meanwhile, and
:meth:`StartCheck.ended` waits until it is gone.

What the check leaves in the copy is what a first start leaves: recovered InnoDB and Aria
logs, a new binlog file when binary logging is on; the copy's ``ibtmp1`` (which the
server deletes at shutdown) is kept as received, and the redo log keeps its size, so the
promoted tree is never smaller than the one received.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import tempfile
from typing import Any, Callable

from twisted.internet import defer, task
from twisted.logger import Logger

from orchagent.errors import AgentError
from orchagent.host.mysql_options import ServerOptions, load_server_options
from orchagent.process import CommandResult

log = Logger()

SERVER_PROGRAMS = ("mariadbd", "mysqld")
CLIENT_PROGRAMS = ("mariadb", "mysql")
#: Seconds the copy has to recover and accept connections, to shut down, and each query.
START_TIMEOUT = 3600.0
SHUTDOWN_TIMEOUT = 600.0
QUERY_TIMEOUT = 600.0
#: User tables opened, and the largest table file also read in full (CHECK TABLE).
SAMPLE_TABLES = 32
CHECK_MAX_BYTES = 64 << 20
#: Files of the server's system tables; a tree with one of them is a server's datadir.
SYSTEM_TABLES = ("mysql/global_priv.frm", "mysql/user.frm", "mysql.ibd")
#: Files a server removes at shutdown that the check keeps as received, and the suffix
#: they wait under meanwhile.
KEEP_AS_RECEIVED = ("ibtmp1",)
KEPT_SUFFIX = ".orchagent-kept"
#: Error-log lines quoted when a step fails.
LOG_LINES = 8
BUFFER_POOL = "64M"
#: Seconds between two looks at the starting server (its socket file; a client only once
#: the socket exists) and at the stopping one (its exit): looking costs next to nothing,
#: and each look saved is time the seed waits.
POLL = 0.05
#: The check's steps, in order (a failure names one; progress counts them).
STEPS = ("start", "system tables", "user tables", "position", "shutdown")
#: InnoDB's hex dump of a corrupted page: many lines that say nothing in a message.
_PAGE_DUMP = re.compile(r"InnoDB: (?:[0-9a-f]{16,}|Page dump|End of page dump)")
_SYSTEM_SCHEMAS = ("mysql", "information_schema", "performance_schema", "sys")


class StartCheckFailed(AgentError):
    """The staged copy did not start, or failed a check; the message says which step."""


def which(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}", f"/usr/local/sbin/{name}",
                     f"/usr/local/bin/{name}") if os.access(p, os.X_OK)), None)


def server_program() -> str | None:
    """The installed server binary (mariadbd first), None when there is none."""
    return next(filter(None, map(which, SERVER_PROGRAMS)), None)


def wanted(setting: str, root: str) -> bool:
    """Whether SeedVerifyStart (``on``/``off``/``auto``) asks for a check of the staged
    tree at ``root`` (blocking: lists it).  ``auto``: when the server is installed and the
    tree holds the server's system tables (a tree without them cannot start; ``on``
    fails it)."""
    if setting == "off":
        return False
    if setting == "on":
        return True
    return server_program() is not None and holds_system_tables(root)


def holds_system_tables(root: str) -> bool:
    """Whether ``root`` holds the server's own tables (``mysql/global_priv`` or
    ``mysql/user`` of MariaDB and MySQL 5.x, ``mysql.ibd`` of MySQL 8): a datadir a
    server can start on, not just files that look like one."""
    return any(os.path.isfile(os.path.join(root, name)) for name in SYSTEM_TABLES)


def private_directory() -> str:
    """A new directory of the check's own (socket, pid file, error log, tmpdir): in the
    system's temporary directory, as a socket's path must stay short."""
    return tempfile.mkdtemp(prefix="orchagent-check-")


def _quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _inside(path: str, root: str) -> bool:
    return not os.path.isabs(path) or os.path.normpath(path) == os.path.normpath(root) or \
        os.path.normpath(path).startswith(os.path.normpath(root) + os.sep)


def server_arguments(options: ServerOptions, root: str, datadir: str, private: str,
                     user: str | None) -> list[str]:
    """The server's command-line options for a check of ``root`` (the staged copy of
    ``datadir``), after the option files: see the module docstring."""
    args = [f"--datadir={root}", f"--socket={private}/mysqld.sock",
            f"--pid-file={private}/mysqld.pid", f"--log-error={private}/error.log",
            f"--tmpdir={private}", "--skip-networking", "--skip-slave-start",
            "--event-scheduler=OFF", "--skip-grant-tables", "--general-log=OFF",
            "--slow-query-log=OFF", f"--innodb-buffer-pool-size={BUFFER_POOL}",
            "--innodb-buffer-pool-load-at-startup=OFF", "--innodb-buffer-pool-dump-at-shutdown=OFF",
            "--loose-wsrep-on=OFF"]
    if user:
        args.append(f"--user={user}")

    def outside(name: str) -> bool:
        value = options.value(name)
        return bool(value) and not _inside(value, datadir) and not _inside(value, root)

    if "log_bin" in options and (outside("log_bin") or outside("log_bin_index")):
        args.append("--skip-log-bin")
    for name in ("relay_log", "relay_log_index"):
        if outside(name):
            base = os.path.basename(options.value(name))
            args.append(f"--{name.replace('_', '-')}={private}/{base}")
    for name in ("innodb_data_home_dir", "innodb_log_group_home_dir", "innodb_undo_directory",
                 "aria_log_dir_path"):
        if outside(name):
            args.append(f"--loose-{name.replace('_', '-')}={root}")
    return args


class StartCheck:
    """One throwaway server on one staged copy (see the module docstring).

    ``runner`` is the agent's command runner; ``progress`` is called with each step as it
    starts.  :meth:`run` returns what the copy says of its replication position:
    ``gtid_binlog_pos``, ``gtid_slave_pos``, ``gtid_executed``, ``gtid_mode``,
    ``binlog_file``, ``binlog_pos`` (those the server has)."""

    def __init__(self, config, runner, reactor, root: str, datadir: str, label: str,
                 thread: Callable[..., defer.Deferred],
                 progress: Callable[[str], None] = lambda step: None):
        self.config = config
        self.runner = runner
        self.reactor = reactor
        self.root = root
        self.datadir = datadir
        self.label = label
        self.thread = thread
        self.progress = progress
        self.step = ""
        self.private = ""
        self.server: defer.Deferred | None = None
        self.exited: defer.Deferred | None = None
        self.result = None
        self.cancelled = False
        self.finished: defer.Deferred | None = None
        self.sleeping: defer.Deferred | None = None
        self.program = ""
        self.client = ""
        self.kept: list[str] = []
        self.log_size = 0

    # --- running ---------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        self.finished = defer.Deferred()
        try:
            self._step("start")
            await self.thread(self._prepare)
            self._start()
            await self._ready()
            self._step("system tables")
            await self._system_tables()
            self._step("user tables")
            await self._user_tables()
            self._step("position")
            position = await self._position()
            self._step("shutdown")
            await self._shutdown()
            await self.thread(self._restore_kept)
            return position
        finally:
            if self.server is not None and self.result is None:
                self.server.cancel()
            if self.exited is not None and not self.exited.called:
                await self.exited
            if self.private:
                shutil.rmtree(self.private, ignore_errors=True)  # a socket, a pid file, a log
            self.finished.callback(None)

    def _step(self, step: str) -> None:
        if self.cancelled:
            raise defer.CancelledError()
        self.step = step
        self.progress(step)

    def _prepare(self) -> None:
        """(worker thread) The programs, the private directory, the staged root's owner."""
        self.program = server_program() or ""
        if not self.program:
            raise StartCheckFailed(self._message(
                f"no server binary ({', '.join(SERVER_PROGRAMS)}) is installed", log=False))
        self.client = next(filter(None, map(which, CLIENT_PROGRAMS)), "")
        if not self.client:
            raise StartCheckFailed(self._message(
                f"no client ({', '.join(CLIENT_PROGRAMS)}) is installed", log=False))
        self.options = load_server_options(self.config.mysql_options_file)
        owner = os.stat(self.datadir)
        self.private = private_directory()
        self.user = None
        if os.geteuid() == 0:
            # The staged root is never promoted itself (its entries move into the datadir);
            # the server must enter it, as it enters the datadir.
            os.chown(self.root, owner.st_uid, owner.st_gid)
            os.chmod(self.root, owner.st_mode & 0o7777 | 0o700)
            os.chown(self.private, owner.st_uid, owner.st_gid)
            try:
                self.user = pwd.getpwuid(owner.st_uid).pw_name
            except KeyError:
                self.user = str(owner.st_uid)
        try:
            self.log_size = os.stat(os.path.join(self.root, "ib_logfile0")).st_size
        except OSError:
            self.log_size = 0
        self._keep_aside()

    def _keep_aside(self) -> None:
        """(worker thread) Files the server deletes at its shutdown (InnoDB's temporary
        tablespace) wait under another name, so the promoted tree is never smaller than
        the one received (mysql-du promised as much, see orchagent.seed.usage)."""
        self.kept = []
        for name in KEEP_AS_RECEIVED:
            path = os.path.join(self.root, name)
            if os.path.isfile(path) and not os.path.islink(path):
                os.rename(path, path + KEPT_SUFFIX)
                self.kept.append(name)

    def _restore_kept(self) -> None:
        for name in self.kept:
            path = os.path.join(self.root, name)
            os.replace(path + KEPT_SUFFIX, path)

    def _argv(self) -> list[str]:
        defaults = ([f"--defaults-file={self.config.mysql_options_file}"]
                    if self.config.mysql_options_file else [])
        # The redo log as it came (no resize to this host's size: the real start does it).
        size = [f"--innodb-log-file-size={self.log_size}"] if self.log_size > (1 << 20) else []
        return [self.program, *defaults, *server_arguments(
            self.options, self.root, self.datadir, self.private, self.user), *size]

    def _start(self) -> None:
        self.exited = defer.Deferred()
        self.server = self.runner.run(self._argv(), timeout=0, check=False, privileged=True,
                                      exited=self.exited)

        def ended(result):
            self.result = result if result is not None else False
            return None

        self.server.addBoth(ended)
        log.info("{label}: checking that the staged copy starts: {program} on {root}",
                 label=self.label, program=os.path.basename(self.program), root=self.root)

    async def _ready(self) -> None:
        deadline = self.reactor.seconds() + START_TIMEOUT
        while True:
            if self.cancelled:
                raise defer.CancelledError()
            if self.result is not None:
                raise StartCheckFailed(self._message(f"the server {self._how_ended()} before "
                                                     "accepting connections"))
            # The server makes its socket once it accepts connections (after recovery).
            if os.path.exists(self._socket):
                result = await self._sql("SELECT 1", check=False)
                if result is not None and result.ok:
                    return
            if self.reactor.seconds() > deadline:
                raise StartCheckFailed(self._message(
                    f"the server did not accept connections within {START_TIMEOUT:.0f} s"))
            await self._sleep()

    async def _sleep(self) -> None:
        self.sleeping = task.deferLater(self.reactor, POLL, lambda: None)
        try:
            await self.sleeping
        finally:
            self.sleeping = None

    async def _system_tables(self) -> None:
        for table in ("mysql.user", "mysql.db"):
            await self._sql(f"SELECT COUNT(*) FROM {table}", what=f"reading {table}")

    async def _user_tables(self) -> None:
        schemas = ", ".join(f"'{s}'" for s in _SYSTEM_SCHEMAS)
        rows = await self._rows(
            "SELECT TABLE_SCHEMA, TABLE_NAME FROM information_schema.TABLES WHERE TABLE_TYPE = "
            f"'BASE TABLE' AND TABLE_SCHEMA NOT IN ({schemas}) ORDER BY TABLE_SCHEMA, TABLE_NAME "
            f"LIMIT {SAMPLE_TABLES}", what="listing the user tables")
        tables = [(row[0], row[1]) for row in rows if len(row) >= 2]
        small = await self.thread(lambda: [self._small(schema, name) for schema, name in tables])
        # One statement a line: the client names the line of the statement that failed.
        statements, whats = [], []
        for (schema, name), read_in_full in zip(tables, small):
            table = f"{_quote(schema)}.{_quote(name)}"
            statements.append(f"SELECT 1 FROM {table} LIMIT 1;")
            whats.append(f"reading {schema}.{name}")
            if read_in_full:
                statements.append(f"CHECK TABLE {table} QUICK;")
                whats.append(f"checking {schema}.{name}")
        if not statements:
            return
        result = await self._sql("\n".join(statements), check=False)
        if not result.ok:
            line = re.search(rb"^ERROR \d+ \(\w+\) at line (\d+)", result.stderr, re.MULTILINE)
            number = int(line.group(1)) if line else 0
            what = whats[number - 1] if 0 < number <= len(whats) else "reading the user tables"
            raise StartCheckFailed(self._message(f"{what} failed: {self._error(result)}"))
        checked = [row for row in _parse(result.stdout) if len(row) >= 4 and row[1] == "check"]
        bad = [row for row in checked if row[2].lower() == "error"
               or (row[2].lower() == "status" and row[3] != "OK")]
        if bad:
            raise StartCheckFailed(self._message(
                f"CHECK TABLE {bad[0][0]} says: " + "; ".join(row[3] for row in bad)[:500]))

    def _small(self, schema: str, name: str) -> bool:
        """(worker thread) The table's data file exists and is small enough to read."""
        for suffix in (".ibd", ".MAD", ".MYD"):
            try:
                return os.stat(os.path.join(self.root, schema, name + suffix)).st_size <= CHECK_MAX_BYTES
            except OSError:
                continue
        return False

    async def _position(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        result = await self._sql("SELECT @@global.gtid_binlog_pos, @@global.gtid_slave_pos",
                                 check=False)
        if result is not None and result.ok:
            row = _parse(result.stdout)[:1]
            if row and len(row[0]) >= 2:
                found["gtid_binlog_pos"], found["gtid_slave_pos"] = row[0][0], row[0][1]
        else:
            row = await self._rows("SELECT @@global.gtid_executed, @@global.gtid_mode",
                                   what="reading the GTID position")
            if row and len(row[0]) >= 2:
                found["gtid_executed"], found["gtid_mode"] = row[0][0].replace("\\n", ""), row[0][1]
        bin_on = await self._rows("SELECT @@global.log_bin", what="reading log_bin")
        if bin_on and bin_on[0][0] in ("1", "ON"):
            logs = await self._rows("SHOW BINARY LOGS", what="listing the binary logs")
            # The last one was made by this start: the one before it is where the copy's
            # own binlog ended after recovery.
            if len(logs) >= 2 and len(logs[-2]) >= 2:
                found["binlog_file"], found["binlog_pos"] = logs[-2][0], int(logs[-2][1])
        return found

    async def _shutdown(self) -> None:
        await self._sql("SHUTDOWN", check=False)
        deadline = self.reactor.seconds() + SHUTDOWN_TIMEOUT
        while self.result is None:
            if self.cancelled:
                raise defer.CancelledError()
            if self.reactor.seconds() > deadline:
                raise StartCheckFailed(self._message(
                    f"the server did not shut down within {SHUTDOWN_TIMEOUT:.0f} s"))
            await self._sleep()
        result = self.result
        if not result or result.exit_code != 0:
            raise StartCheckFailed(self._message(f"the server {self._how_ended()} while shutting down"))
        log.info("{label}: the staged copy started, passed its checks and shut down cleanly",
                 label=self.label)

    # --- the client --------------------------------------------------------------------

    @property
    def _socket(self) -> str:
        return f"{self.private}/mysqld.sock"

    async def _sql(self, statement: str, check: bool = True, what: str = ""):
        argv = [self.client, "--no-defaults", f"--socket={self._socket}",
                "--user=root", "--batch", "--skip-column-names", "--connect-timeout=5",
                "-e", statement]
        result = await self.runner.run(argv, timeout=QUERY_TIMEOUT, check=False)
        if check and not result.ok:
            raise StartCheckFailed(self._message(f"{what or statement} failed: {self._error(result)}"))
        return result

    def _error(self, result) -> str:
        """The client's error, without the line of its input the statement was on."""
        lines = result.stderr.decode("utf-8", "replace").splitlines()
        # In batch mode the client echoes the failed statement between dashes.
        error = " ".join(line.strip() for line in lines if line.startswith("ERROR")) or \
            " ".join(line.strip() for line in lines if line.strip())
        error = re.sub(r"^(ERROR \d+ \(\w+\)) at line \d+", r"\1", error)[-500:]
        if self.result is not None:
            error += f" (the server {self._how_ended()})"
        return error

    async def _rows(self, statement: str, what: str) -> list[list[str]]:
        return _parse((await self._sql(statement, what=what)).stdout)

    # --- ending ------------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop the server (the seed was aborted or the agent stops)."""
        self.cancelled = True
        if self.server is not None and self.result is None:
            self.server.cancel()
        if self.sleeping is not None:
            self.sleeping.cancel()

    async def ended(self) -> None:
        """Once :meth:`run` has ended: the server (if started) exited, the private
        directory removed."""
        if self.finished is not None and not self.finished.called:
            await defer.DeferredList([self.finished], consumeErrors=True)

    def _how_ended(self) -> str:
        result = self.result
        return result.outcome() if isinstance(result, CommandResult) else "was stopped"

    def _message(self, why: str, log: bool = True) -> str:
        text = f"the staged copy failed its start check at step {self.step}: {why}"
        if log:
            tail = self.log_tail()
            text += (f"; the server's error log ends: {tail}" if tail
                     else "; the server's error log is empty")
        return text

    def log_tail(self) -> str:
        path = os.path.join(self.private, "error.log") if self.private else ""
        try:
            with open(path, "rb") as fh:
                fh.seek(max(0, os.fstat(fh.fileno()).st_size - 16384))
                lines = fh.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return ""
        lines = [line.strip() for line in lines if line.strip() and not _PAGE_DUMP.search(line)]
        return " | ".join(lines[-LOG_LINES:])


def _parse(stdout: bytes) -> list[list[str]]:
    return [line.split("\t") for line in stdout.decode("utf-8", "replace").splitlines()]
