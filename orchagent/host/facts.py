"""What the agent knows about the local MySQL server, and the datadir chores of a seed.

Where values come from (each call reads afresh, so an edited my.cnf counts at once):

* datadir: ``MySQLDatadirCommand`` when set (its trimmed output, an absolute path), else
  ``datadir`` of the option files, else ``/var/lib/mysql``.
* port: ``MySQLPortCommand`` when set, else ``port`` of the option files, else 3306.
* option files: ``MySQLOptionsFile`` when set, else ``/etc/mysql/my.cnf`` then
  ``/etc/my.cnf`` (see :mod:`orchagent.host.mysql_options`).
* file names the server derives when an option names none, as MariaDB 10.11 does (checked
  with a real server): everything starts from the pid file, ``pid-file`` or else
  ``<datadir>/<log-basename or host name up to its first dot>.pid``.  A bare
  ``log-error`` is the pid file's path with ``.err``; ``log-error=NAME`` without an
  extension gets ``.err``; relative names are inside the datadir.  Without any
  ``log-error`` the server writes to stderr (the journal), and the error-log tail answers
  that it is not available.

Blocking work (walking the datadir, statvfs, reading a log's end, deleting and chowning
files) runs in the reactor's thread pool; commands run through the runner.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import stat
from typing import Any

from twisted.internet import threads

from orchagent.errors import AgentError, NotAvailable, Refused
from orchagent.host import diskusage
from orchagent.host.mysql_options import ServerOptions, has_versioned_groups, load_server_options

DEFAULT_DATADIR = "/var/lib/mysql"
DEFAULT_PORT = 3306
ERROR_LOG_LINES = 20

#: Files that only a MySQL/MariaDB datadir (or a physical backup of one) has at its top;
#: one of them, a regular file, is enough to recognise it.  Names any program might use
#: (``auto.cnf``, ``master.info``, a ``mysql/`` or ``performance_schema/`` directory
#: alone) are not: ``/data`` holding the datadir ``/data/mysql``, or ``/usr/local``
#: holding an install in ``mysql/``, has them too.
DATADIR_MARKERS = frozenset({
    "ibdata1", "ib_logfile0", "ib_logfile1", "aria_log_control", "mysql.ibd", "ibtmp1",
    "undo001", "undo002", "undo_001", "undo_002", "ddl_recovery.log", "xtrabackup_checkpoints",
})
#: Also recognised: any ``*.ibd`` file at the top, ``#innodb_redo/#ib_redo*`` (MySQL
#: 8.0.30+), or a ``mysql/`` directory holding one of these system tables' files.
SYSTEM_TABLE_FILES = frozenset({
    "db.opt", "user.frm", "user.MYD", "user.MAD", "db.frm", "db.MYD", "db.MAD",
    "global_priv.frm", "global_priv.MYD", "global_priv.MAD", "proc.frm", "proc.MYD",
    "proc.MAD", "general_log.CSM", "general_log.CSV", "slow_log.CSM", "slow_log.CSV",
    "innodb_table_stats.ibd", "innodb_index_stats.ibd",
})

#: Directories whose contents the agent never deletes, whatever they hold and whatever
#: the configuration says: the system's own trees.
PROTECTED_DIRECTORIES = frozenset({
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32",
    "/media", "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/snap", "/srv", "/sys",
    "/tmp", "/usr", "/usr/bin", "/usr/include", "/usr/lib", "/usr/lib64", "/usr/libexec",
    "/usr/local", "/usr/local/bin", "/usr/local/etc", "/usr/local/lib", "/usr/local/sbin",
    "/usr/local/share", "/usr/local/src", "/usr/sbin", "/usr/share", "/usr/src", "/var",
    "/var/backups", "/var/cache", "/var/lib", "/var/local", "/var/log", "/var/mail",
    "/var/opt", "/var/spool", "/var/tmp", "/var/www", "/etc/mysql", "/lost+found",
})

#: Replication state that belongs to the source of a copy, or to the moment a backup was
#: taken (see :meth:`MySQLHost.post_copy`).
_REPLICATION_INFO = re.compile(r"^(master\.info|relay-log\.info|multi-master\.info|master-.+\.info|relay-log-.+\.info"
                               r"|(xtrabackup|mariadb_backup)_(binlog|slave)_info)$")
_RELAY_LOG = re.compile(r"^.+-relay-bin(-.+)?\.([0-9]{6,}|index)$")


def _with_extension(path: str, extension: str) -> str:
    """``path`` with ``extension`` added when its last component has none (fn_format)."""
    return path if "." in os.path.basename(path) else path + extension


def _replace_extension(path: str, extension: str) -> str:
    head, name = os.path.split(path)
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return os.path.join(head, stem + extension)


class MySQLHost:
    """Facts about the local MySQL server, read from its configuration and its files."""

    def __init__(self, config, runner, reactor, service, hostname: str | None = None):
        self.config = config
        self.runner = runner
        self.reactor = reactor
        self.service = service
        #: The host name the server derives default file names from (``gethostname()``).
        self.hostname = hostname or socket.gethostname()
        self._version: str | None = None
        self._version_known = False

    # --- configuration ---------------------------------------------------------------

    async def server_version(self) -> str | None:
        """``X.Y`` of the installed server (for ``[mysqld-X.Y]`` groups), None if unknown."""
        if not self._version_known:
            for program in ("mariadbd", "mysqld"):
                result = await self.runner.run([program, "--version"], check=False, timeout=30)
                match = re.search(rb"\bVer\s+(\d+\.\d+)", result.stdout)
                if result.exit_code == 0 and match:
                    self._version = match.group(1).decode()
                    break
            self._version_known = True
        return self._version

    async def options(self) -> ServerOptions:
        """The server's option-file settings (small local files: read inline).

        The server binary is asked for its version only when the files have
        version-specific groups such as ``[mariadb-10.11]``.
        """
        groups: set[str] = set()
        options = load_server_options(self.config.mysql_options_file, None, groups)
        if has_versioned_groups(groups):
            version = await self.server_version()
            if version:
                options = load_server_options(self.config.mysql_options_file, version)
        return options

    async def _command_output(self, command: str, key: str) -> str:
        result = await self.runner.shell(command)
        text = result.stdout.decode("utf-8", "replace").strip()
        if not text:
            raise NotAvailable(f"{key} printed nothing")
        return text

    async def datadir(self) -> str:
        """The absolute path of the datadir, without a trailing slash."""
        if self.config.mysql_datadir_command:
            value = await self._command_output(self.config.mysql_datadir_command, "MySQLDatadirCommand")
            where = "MySQLDatadirCommand"
        else:
            options = await self.options()
            option = options.get("datadir")
            value = DEFAULT_DATADIR if option is None else (option.value or "")
            where = f"datadir in {option.where}" if option else "the default datadir"
        if not value.startswith("/") or "\n" in value or "\x00" in value:
            raise NotAvailable(f"{where} is {value!r}, not an absolute path")
        return os.path.normpath(value)

    async def port(self) -> int:
        if self.config.mysql_port_command:
            value = await self._command_output(self.config.mysql_port_command, "MySQLPortCommand")
            where = "MySQLPortCommand"
        else:
            option = (await self.options()).get("port")
            if option is None:
                return DEFAULT_PORT
            value, where = option.value or "", f"port in {option.where}"
        if not value.isdigit() or not 0 < int(value) < 65536:
            raise NotAvailable(f"{where} is {value!r}, not a TCP port")
        return int(value)

    def _in_datadir(self, datadir: str, name: str) -> str:
        return os.path.normpath(os.path.join(datadir, name))

    async def pid_file_path(self, options: ServerOptions | None = None, datadir: str | None = None) -> str:
        """Where the server writes its pid; every default log name starts from it."""
        options = options if options is not None else await self.options()
        datadir = datadir or await self.datadir()
        value = options.value("pid_file")
        if value:
            return self._in_datadir(datadir, value)
        base = options.value("log_basename") or self.hostname.split(".", 1)[0]
        return self._in_datadir(datadir, os.path.basename(base) + ".pid")

    async def default_log_stem(self, options: ServerOptions | None = None, datadir: str | None = None) -> str:
        """``<datadir>/<pid file name without extension>``: the base of default log names."""
        options = options if options is not None else await self.options()
        datadir = datadir or await self.datadir()
        pid_file = await self.pid_file_path(options, datadir)
        name = os.path.basename(pid_file)
        return os.path.join(datadir, name.rsplit(".", 1)[0] if "." in name else name)

    async def error_log_path(self) -> str:
        options = await self.options()
        option = options.get("log_error")
        if option is None:
            raise NotAvailable(
                f"log-error is not set in the MySQL option files ({options.describe()}): "
                "the server writes its error log to stderr (the journal)")
        datadir = await self.datadir()
        if not option.value:
            return _replace_extension(await self.pid_file_path(options, datadir), ".err")
        return self._in_datadir(datadir, _with_extension(option.value, ".err"))

    async def binlog_index_path(self) -> str:
        """The binary log index: ``log-bin-index``, else ``<log-bin base>.index``."""
        options = await self.options()
        option = options.get("log_bin")
        if option is None:
            raise NotAvailable(f"binary logging is off: log-bin is not set in the MySQL option files ({options.describe()})")
        return await self._index_path(options, option.value, "log_bin_index", "-bin")

    async def relay_log_index_path(self) -> str:
        """The relay log index: ``relay-log-index``, else ``<relay-log base>.index``."""
        options = await self.options()
        return await self._index_path(options, options.value("relay_log"), "relay_log_index", "-relay-bin")

    async def _index_path(self, options: ServerOptions, base: str | None, index_key: str, suffix: str) -> str:
        datadir = await self.datadir()
        index = options.value(index_key)
        if index:
            return self._in_datadir(datadir, _with_extension(index, ".index"))
        if base:
            return _replace_extension(self._in_datadir(datadir, base), ".index")
        return await self.default_log_stem(options, datadir) + suffix + ".index"

    # --- files and space -------------------------------------------------------------

    def _in_thread(self, function, *args) -> Any:
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), function, *args)

    async def error_log_tail(self, lines: int = ERROR_LOG_LINES) -> list[str]:
        """The last ``lines`` lines of the error log, read from its end."""
        path = await self.error_log_path()
        return await self._in_thread(diskusage.tail_lines, path, lines)

    async def disk_usage(self, path: str) -> int:
        """Apparent bytes under ``path`` on its file system (see :mod:`.diskusage`)."""
        return await self._in_thread(diskusage.disk_usage, path)

    async def mysql_disk_usage(self) -> int:
        return await self.disk_usage(await self.datadir())

    async def datadir_available_space(self) -> int:
        """Free bytes (for unprivileged writers, ``f_bavail``) on the datadir's file system."""
        return await self._in_thread(diskusage.available_space, await self.datadir())

    # --- seed chores -----------------------------------------------------------------

    async def _checked_datadir(self, action: str) -> str:
        """The datadir, after every check that makes changing it safe; else Refused."""
        if await self.service.is_running():
            raise Refused(f"MySQL is running: refusing to {action}")
        datadir = await self.datadir()
        return await self._in_thread(_check_datadir, datadir, action)

    async def delete_datadir(self) -> bool:
        """Empty the datadir: its contents go, the directory itself stays.

        The directory may be a mount point or a btrfs subvolume, so it is never removed.
        Refused while MySQL runs, and unless the datadir is an absolute, existing,
        non-system directory (not one of :data:`PROTECTED_DIRECTORIES`, whatever it
        holds) that is empty or looks like a MySQL datadir: ibdata1, a redo log, aria's
        control file, an ``*.ibd``... at its top, or system tables in its ``mysql/``
        (:func:`_holds_datadir_markers`).  ``MySQLDeleteDatadirContentCommand``, when
        configured, does the deleting instead, after the same checks (without arguments,
        as the original ran it).  Symbolic links inside are removed, never followed.
        """
        datadir = await self._checked_datadir("delete the datadir")
        command = self.config.mysql_delete_datadir_content_command
        if command:
            await self.runner.shell(command)
        else:
            await self._in_thread(_empty_directory, datadir)
        return True

    async def post_copy(self, source_host: str | None = None) -> bool:
        """Prepare a freshly copied datadir for its first start on this host.

        ``PostCopyCommand``, when configured, runs instead, with the source host as
        ``"$1"`` when given.  Built in, after the checks of :meth:`delete_datadir`:

        * ``auto.cnf`` is removed: it holds MySQL's server UUID, which must differ between
          a source and its new replica (MySQL makes a new one at start; MariaDB has none).
        * The source's replication state is set aside, renamed with ``.from-<source>``:
          ``master.info``, ``relay-log.info``, ``multi-master.info`` and their per-connection
          ``master-*.info`` / ``relay-log-*.info``.  Left in place, the new server would
          start replicating from the source's master with the source's relay position
          and relay log names, which do not exist here.  The renamed files keep the
          coordinates for the operator; MariaDB's GTID position (``mysql.gtid_slave_pos``)
          lives in the data and is consistent with it.  So are a backup's coordinate
          files (``xtrabackup_binlog_info``, ``mariadb_backup_slave_info``...): true of
          the moment the backup was taken, they would otherwise stay in this datadir for
          good and be read as the coordinates of a later copy of it.
        * The source's relay logs and their index (``*-relay-bin.NNNNNN``/``.index``) go:
          they are the source's downloaded copy of its master's binlog.
        * Stale ``*.pid`` files at the top of the datadir go (MySQL is not running here).
        * Binary logs are kept on purpose: crash recovery of a copied live datadir uses
          the last binlog to finish or roll back prepared transactions.
        * Everything is given to the server's user (``user`` in the option files, else
          ``mysql``), so data written by a root-run receiver is readable by the server.
          Skipped when the agent is not root (it could not chown).
        """
        command = self.config.post_copy_command
        if command:
            await self.runner.shell(command, args=[source_host] if source_host else [])
            return True
        datadir = await self._checked_datadir("run post-copy")
        user = (await self.options()).value("user") or "mysql"
        suffix = ".from-" + (source_host or "source").replace("/", "_")
        relay_stem = os.path.basename(await self.relay_log_index_path()).rsplit(".", 1)[0]
        await self._in_thread(_post_copy, datadir, suffix, user, relay_stem)
        return True


def _check_datadir(datadir: str, action: str) -> str:
    if not datadir or not os.path.isabs(datadir):
        raise Refused(f"the datadir {datadir!r} is not an absolute path: refusing to {action}")
    real = os.path.realpath(datadir)
    if real in PROTECTED_DIRECTORIES or os.path.normpath(datadir) in PROTECTED_DIRECTORIES:
        raise Refused(f"the datadir {datadir} is {real}, a system directory: refusing to {action}")
    try:
        if not stat.S_ISDIR(os.lstat(real).st_mode):
            raise Refused(f"the datadir {datadir} is not a directory: refusing to {action}")
        names = set(os.listdir(real))
    except FileNotFoundError:
        raise Refused(f"the datadir {datadir} does not exist: refusing to {action}") from None
    except OSError as e:
        raise AgentError(f"cannot read the datadir {datadir}: {e.strerror}") from e
    if names and not _holds_datadir_markers(real, names):
        raise Refused(
            f"{datadir} does not look like a MySQL datadir: it holds none of ibdata1, "
            f"ib_logfile0, aria_log_control, mysql.ibd, *.ibd, #innodb_redo/ at its top, nor "
            f"system tables in mysql/ (mysql/user.frm, mysql/db.opt, ...): refusing to {action}")
    return real


def _holds_datadir_markers(directory: str, names: set[str]) -> bool:
    """Whether ``directory`` (listed as ``names``) has a marker of a datadir at its top:
    one of :data:`DATADIR_MARKERS` or a ``*.ibd`` as a regular file, ``#innodb_redo/``
    with a redo log, or ``mysql/`` with one of :data:`SYSTEM_TABLE_FILES`."""

    def regular(*parts: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(os.path.join(directory, *parts)).st_mode)
        except OSError:
            return False

    def listing(name: str) -> list[str]:
        path = os.path.join(directory, name)
        try:
            return os.listdir(path) if not os.path.islink(path) else []
        except OSError:
            return []

    if any(regular(n) for n in names if n in DATADIR_MARKERS or n.endswith(".ibd")):
        return True
    if "#innodb_redo" in names and any(n.startswith("#ib_redo") and regular("#innodb_redo", n)
                                       for n in listing("#innodb_redo")):
        return True
    return "mysql" in names and any(regular("mysql", n) for n in
                                    SYSTEM_TABLE_FILES.intersection(listing("mysql")))


def _empty_directory(directory: str) -> None:
    """Remove what ``directory`` holds, what marks it as a datadir last (``mysql/``, then
    the marker files at its top): emptying stopped half-way (a crash, an I/O error) leaves
    a directory that is still recognised as a datadir, so repeating the call finishes it."""
    with os.scandir(directory) as entries:
        names = [(e.path, e.is_dir(follow_symlinks=False)) for e in entries]

    def last(entry: tuple[str, bool]) -> int:
        name = os.path.basename(entry[0])
        if name in DATADIR_MARKERS or name.endswith(".ibd"):
            return 2
        return 1 if name in ("mysql", "#innodb_redo") else 0

    names.sort(key=last)
    for path, is_dir in names:
        try:
            if is_dir:
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise AgentError(f"cannot delete {path}: {e.strerror}") from e


def _post_copy(datadir: str, suffix: str, user: str, relay_stem: str) -> None:
    own_relay_log = re.compile(re.escape(relay_stem) + r"\.([0-9]{6,}|index)$")
    for name in sorted(os.listdir(datadir)):
        path = os.path.join(datadir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            continue
        try:
            if (name == "auto.cnf" or name.endswith(".pid") or _RELAY_LOG.match(name)
                    or own_relay_log.match(name)):
                os.unlink(path)
            elif _REPLICATION_INFO.match(name):
                os.replace(path, path + suffix)
        except OSError as e:
            raise AgentError(f"post-copy cannot handle {path}: {e.strerror}") from e
    if os.geteuid() != 0:
        return
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        raise Refused(f"post-copy: the MySQL user {user!r} does not exist on this host") from None
    try:
        _chown_tree(datadir, account.pw_uid, account.pw_gid)
    except OSError as e:
        raise AgentError(f"post-copy cannot give {e.filename or datadir} to {user}: {e.strerror}") from e


def _chown_tree(top: str, uid: int, gid: int) -> None:
    """Give ``top`` and everything below it (same file system, no symlinks followed) away."""
    device = os.lstat(top).st_dev
    os.lchown(top, uid, gid)
    pending = [top]
    while pending:
        directory = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                info = entry.stat(follow_symlinks=False)
                if info.st_dev != device:
                    continue
                if info.st_uid != uid or info.st_gid != gid:
                    os.lchown(entry.path, uid, gid)
                if stat.S_ISDIR(info.st_mode):
                    pending.append(entry.path)
