"""A real, throwaway MariaDB server for tests.

Each :class:`MariaDB` is one ``mariadbd`` with its own option file, datadir, unix socket,
TCP port on 127.0.0.1, pid file and error log.  It runs as the ``mysql`` user (tests run
as root), with binary logging on, so the relay-log/binlog code has real files to read.

Example (blocking, in ``setUp``)::

    from tests.support.mariadb import MariaDB

    def setUp(self):
        self.db = MariaDB.create(self)          # installed, started, cleanup registered
        self.db.sql("CREATE DATABASE d")
        rows = self.db.sql("SELECT 1, 'a'")     # [("1", "a")]
        config = Config(**self.db.agent_settings())   # MySQLOptionsFile + service commands

    # datadir of your own (e.g. a btrfs subvolume), not started yet:
    db = MariaDB.create(self, datadir="/mnt/x/data", start=False)
    await db.start_async()                      # Deferred variants for reactor-driven tests

Service commands: :attr:`MariaDB.start_command`, :attr:`stop_command` and
:attr:`status_command` are shell text for MySQLServiceStartCommand / StopCommand /
StatusCommand.  They run this file as a script
(``python mariadb.py start|stop|status --defaults-file FILE``): ``start`` exits 0 once the
server accepts connections (non-zero with the error log's tail if it dies), ``stop`` exits
0 once it is gone (also when it was not running), ``status`` exits 0 only while it runs.

Processes: this module makes the test process a "child subreaper" (Linux prctl), because
a ``mariadbd`` started by the service command outlives the short-lived script that started
it, and PID 1 of this machine does not reap orphans.  Known server pids are reaped here.

Speed: the first :meth:`MariaDB.install` of a process runs ``mariadb-install-db`` into a
template (about 0.6 s); later ones copy the template with ``cp -a`` (about 0.05 s).  The
template is removed when the process exits.  Starting takes about 0.2 s.

Only the standard library is imported at module level: this file also runs as a script
from the agent's service commands.
"""

from __future__ import annotations

import atexit
import configparser
import ctypes
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

SCRIPT = os.path.abspath(__file__)
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
PR_SET_CHILD_SUBREAPER = 36


def _tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None)


def unavailable_reason() -> str | None:
    """Why a server cannot run here (for ``SkipTest``), or None when it can."""
    if os.geteuid() != 0:
        return "a throwaway MariaDB needs root (it runs mariadbd as the mysql user)"
    for tool in ("mariadbd", "mariadb-install-db", "mariadb"):
        if _tool(tool) is None:
            return f"{tool} is not installed (apt-get install mariadb-server)"
    try:
        import pwd
        pwd.getpwnam("mysql")
    except KeyError:
        return "there is no mysql user"
    return None


def become_subreaper() -> None:
    """Orphaned descendants (a mariadbd started by a service command) become our children."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- process helpers shared by the harness and the script ---------------------------------

def _proc_state(pid: int) -> str | None:
    """The /proc state letter of ``pid`` ('Z' for a zombie), None when there is no such pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    return data[data.rindex(")") + 2:].split(" ", 1)[0]


def _is_our_server(pid: int, defaults_file: str) -> bool:
    """``pid`` is a live mariadbd started with ``defaults_file`` (guards against pid reuse)."""
    state = _proc_state(pid)
    if state is None or state in ("Z", "X"):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            args = fh.read().split(b"\0")
    except OSError:
        return False
    return (bool(args) and os.path.basename(args[0]) in (b"mariadbd", b"mysqld")
            and f"--defaults-file={defaults_file}".encode() in args)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _read_options(defaults_file: str) -> dict[str, str]:
    """The [mysqld] group of an option file written by :class:`MariaDB`.

    Without ``pid-file`` the server's default is filled in: ``<datadir>/<log-basename or
    host name up to its first dot>.pid``.
    """
    parser = configparser.ConfigParser(allow_no_value=True, strict=False, interpolation=None)
    parser.read(defaults_file)
    options = {k.replace("_", "-"): (v or "") for k, v in parser["mysqld"].items()}
    if "pid-file" not in options:
        stem = options.get("log-basename") or socket.gethostname().split(".", 1)[0]
        options["pid-file"] = os.path.join(options["datadir"], stem + ".pid")
    return options


def _read_pid(pid_file: str) -> int | None:
    try:
        with open(pid_file) as fh:
            return int(fh.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _accepts_connections(sock_path: str) -> bool:
    """The server sent its protocol-10 handshake on the unix socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2.0)
            s.connect(sock_path)
            data = s.recv(5)
    except OSError:
        return False
    return len(data) == 5 and data[4] == 10


def _log_tail(path: str, size: int = 4000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - size))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return "(no error log)"


def server_status(defaults_file: str) -> int | None:
    """The pid of the running server of ``defaults_file``, or None."""
    options = _read_options(defaults_file)
    pid = _read_pid(options["pid-file"])
    if pid is not None and _is_our_server(pid, defaults_file):
        return pid
    return None


def server_start(defaults_file: str, timeout: float = READY_TIMEOUT) -> tuple[int, subprocess.Popen | None]:
    """Start the server (if it is not running) and wait until it accepts connections.

    Returns ``(pid, popen)``; popen is None when it was already running.  Raises
    RuntimeError with the error log's tail when it dies or does not get ready in time.
    """
    options = _read_options(defaults_file)
    pid = server_status(defaults_file)
    if pid is not None:
        wait_ready(defaults_file, timeout)
        return pid, None
    base = os.path.dirname(defaults_file)
    with open(os.path.join(base, "mariadbd.out"), "ab") as out, open(os.devnull, "rb") as null:
        proc = subprocess.Popen(
            [_tool("mariadbd") or "mariadbd", f"--defaults-file={defaults_file}"],
            stdin=null, stdout=out, stderr=out, start_new_session=True, close_fds=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"mariadbd ({defaults_file}) exited with status {proc.returncode} before it was "
                f"ready; error log:\n{_log_tail(options.get('log-error', ''))}")
        if _accepts_connections(options["socket"]):
            return proc.pid, proc
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"mariadbd ({defaults_file}) not ready after {timeout}s; error log:\n"
                       f"{_log_tail(options.get('log-error', ''))}")


def wait_ready(defaults_file: str, timeout: float = READY_TIMEOUT) -> None:
    options = _read_options(defaults_file)
    deadline = time.monotonic() + timeout
    while not _accepts_connections(options["socket"]):
        if time.monotonic() > deadline:
            raise RuntimeError(f"mariadbd ({defaults_file}) not ready after {timeout}s")
        if server_status(defaults_file) is None:
            raise RuntimeError(f"mariadbd ({defaults_file}) is not running; error log:\n"
                               f"{_log_tail(options.get('log-error', ''))}")
        time.sleep(0.02)


def server_stop(defaults_file: str, timeout: float = STOP_TIMEOUT) -> int | None:
    """SIGTERM the server, SIGKILL after ``timeout``; wait until it is gone.  Returns its pid."""
    pid = server_status(defaults_file)
    if pid is None:
        return None
    _kill_and_wait(pid, defaults_file, timeout)
    return pid


def _kill_and_wait(pid: int, defaults_file: str, timeout: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _is_our_server(pid, defaults_file):
        _reap(pid)
        if time.monotonic() > deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
        time.sleep(0.02)
    _reap(pid)


# --- the harness ------------------------------------------------------------------------

_template_lock = threading.Lock()
_template: dict[str, str] = {}


def _remove_template() -> None:
    root = _template.pop("root", None)
    if root:
        shutil.rmtree(root, ignore_errors=True)


class MariaDB:
    """One throwaway server.  Build it with :meth:`create` (which registers the cleanup)."""

    def __init__(self, base_dir: str, datadir: str | None = None, port: int | None = None,
                 server_id: int = 1, options: dict[str, str | None | bool] | None = None,
                 client_socket: bool = True):
        #: Socket, pid file, error log and option file live here (short path: socket limit).
        self.base_dir = base_dir
        self.datadir = os.path.abspath(datadir or os.path.join(base_dir, "data"))
        self.port = port or free_port()
        self.server_id = server_id
        self.socket = os.path.join(base_dir, "mysqld.sock")
        self.pid_file = os.path.join(base_dir, "mysqld.pid")
        self.error_log = os.path.join(base_dir, "error.log")
        self.option_file = os.path.join(base_dir, "my.cnf")
        #: Extra [mysqld] settings; they override the defaults.  None writes a bare option,
        #: False leaves a default setting out (e.g. ``{"pid-file": False}``).
        self.options = dict(options or {})
        #: Whether [client] names the socket; without it only [mysqld] does, and clients
        #: that read just [client] (mariabackup) need --socket (client_argv passes it).
        self.client_socket = client_socket
        self._pids: set[int] = set()
        self._popens: list[subprocess.Popen] = []
        self.write_option_file()
        # What the server will really use once options changed the defaults:
        self.pid_file = _read_options(self.option_file)["pid-file"]
        log_error = self.options.get("log-error", self.error_log)
        if log_error is None:
            log_error = os.path.splitext(self.pid_file)[0] + ".err"
        self.error_log = log_error or None

    # construction --------------------------------------------------------------------

    @classmethod
    def create(cls, testcase, datadir: str | None = None, start: bool = True,
               install: bool = True, **kwargs) -> "MariaDB":
        """A new server for ``testcase``: temp base dir, install, start; cleanup registered.

        ``datadir`` (an existing empty directory or a path to create) is where the data
        goes, e.g. a btrfs subvolume; by default a directory inside the temp base dir.
        Raises SkipTest when a server cannot run here.
        """
        from twisted.trial.unittest import SkipTest

        reason = unavailable_reason()
        if reason:
            raise SkipTest(reason)
        become_subreaper()
        base = tempfile.mkdtemp(prefix="mdb-")
        server = cls(base, datadir=datadir, **kwargs)
        testcase.addCleanup(server.destroy, remove_datadir=datadir is None)
        os.chmod(base, 0o755)
        shutil.chown(base, "mysql", "mysql")
        if install:
            server.install()
        if start:
            server.start()
        return server

    def write_option_file(self) -> None:
        settings: dict[str, str | None | bool] = {
            "user": "mysql",
            "datadir": self.datadir,
            "socket": self.socket,
            "port": str(self.port),
            "bind-address": "127.0.0.1",
            "pid-file": self.pid_file,
            "log-error": self.error_log,
            "server-id": str(self.server_id),
            "log-bin": "mysql-bin",
            "innodb-log-file-size": "8M",
            "innodb-buffer-pool-size": "32M",
            "performance-schema": "OFF",
            "skip-name-resolve": None,
        }
        settings.update(self.options)
        client = [f"socket={self.socket}"] if self.client_socket else []
        lines = ["[client]", *client, "user=root", "", "[mysqld]"]
        lines += [k if v is None else f"{k}={v}" for k, v in settings.items() if v is not False]
        with open(self.option_file, "w") as fh:
            fh.write("\n".join(lines) + "\n")

    def install(self) -> None:
        """Make the datadir a fresh, empty MariaDB datadir owned by mysql (blocking)."""
        os.makedirs(self.datadir, exist_ok=True)
        if os.listdir(self.datadir):
            raise RuntimeError(f"datadir {self.datadir} is not empty")
        template = self._template()
        subprocess.run(["cp", "-a", "--", template + "/.", self.datadir + "/"], check=True)
        shutil.chown(self.datadir, "mysql", "mysql")
        os.chmod(self.datadir, 0o755)

    @staticmethod
    def _template() -> str:
        with _template_lock:
            if "data" in _template:
                return _template["data"]
            root = tempfile.mkdtemp(prefix="mdb-template-")
            _template["root"] = root
            atexit.register(_remove_template)
            os.chmod(root, 0o755)
            data = os.path.join(root, "data")
            os.mkdir(data)
            shutil.chown(data, "mysql", "mysql")
            maker = MariaDB(root, datadir=data, port=1)
            result = subprocess.run(
                [_tool("mariadb-install-db"), f"--defaults-file={maker.option_file}",
                 "--auth-root-authentication-method=socket", "--skip-test-db"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            if result.returncode != 0:
                raise RuntimeError("mariadb-install-db failed:\n" + result.stdout.decode(errors="replace"))
            _template["data"] = data
            return data

    # lifecycle (blocking) ------------------------------------------------------------

    def start(self, timeout: float = READY_TIMEOUT) -> None:
        """Start and wait until it accepts connections (blocking)."""
        pid, popen = server_start(self.option_file, timeout)
        self._pids.add(pid)
        if popen is not None:
            self._popens.append(popen)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop and wait until the process is gone (blocking); fine when not running."""
        pid = server_stop(self.option_file, timeout)
        if pid is not None:
            self._pids.add(pid)
        self.reap()

    def is_running(self) -> bool:
        self.reap()
        pid = server_status(self.option_file)
        if pid is not None:
            self._pids.add(pid)
        return pid is not None

    def wait_until_ready(self, timeout: float = READY_TIMEOUT) -> None:
        wait_ready(self.option_file, timeout)
        self.is_running()

    def reap(self) -> None:
        """Collect the exit status of servers of ours that ended (no zombies left)."""
        for popen in list(self._popens):
            if popen.poll() is not None:
                self._popens.remove(popen)
        for pid in list(self._pids):
            if not _is_our_server(pid, self.option_file):
                _reap(pid)

    def destroy(self, remove_datadir: bool = True) -> None:
        """Stop it, kill leftovers, remove its files (the cleanup :meth:`create` registers)."""
        pid = server_status(self.option_file)
        if pid is not None:
            self._pids.add(pid)
        for pid in self._pids:
            if _is_our_server(pid, self.option_file):
                _kill_and_wait(pid, self.option_file, 10.0)
            _reap(pid)
        for popen in self._popens:
            if popen.poll() is None:
                popen.kill()
            popen.wait()
        self._popens.clear()
        shutil.rmtree(self.base_dir, ignore_errors=True)
        if remove_datadir:
            shutil.rmtree(self.datadir, ignore_errors=True)

    # lifecycle (Deferred) ------------------------------------------------------------

    def start_async(self):
        from twisted.internet import threads
        return threads.deferToThread(self.start)

    def stop_async(self):
        from twisted.internet import threads
        return threads.deferToThread(self.stop)

    def sql_async(self, statement: str, database: str | None = None):
        from twisted.internet import threads
        return threads.deferToThread(self.sql, statement, database)

    # SQL -------------------------------------------------------------------------------

    def client_argv(self, database: str | None = None) -> list[str]:
        """The ``mariadb`` client connected as root over the socket."""
        argv = [_tool("mariadb") or "mariadb", f"--defaults-file={self.option_file}"]
        if not self.client_socket:
            argv.append(f"--socket={self.socket}")
        return argv + ([database] if database else [])

    def sql(self, statement: str, database: str | None = None) -> list[tuple[str | None, ...]]:
        """Run SQL with the ``mariadb`` client (blocking); the result rows as tuples of str.

        NULL comes back as None.  Raises RuntimeError with the client's message on error.
        """
        argv = self.client_argv(database)
        argv[2:2] = ["--batch", "--skip-column-names"]
        result = subprocess.run(argv, input=statement.encode(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"SQL failed ({result.returncode}): {result.stderr.decode(errors='replace').strip()}")
        rows = []
        for line in result.stdout.decode("utf-8", "replace").splitlines():
            rows.append(tuple(None if f == "NULL" else _unescape(f) for f in line.split("\t")))
        return rows

    # the agent's configuration ---------------------------------------------------------

    def _script(self, verb: str) -> str:
        return " ".join(shlex.quote(a) for a in (
            sys.executable, SCRIPT, verb, "--defaults-file", self.option_file))

    @property
    def start_command(self) -> str:
        return self._script("start")

    @property
    def stop_command(self) -> str:
        return self._script("stop")

    @property
    def status_command(self) -> str:
        return self._script("status")

    @property
    def client_command(self) -> str:
        """Shell text for MySQLClientCommand: the client as root over this server's socket."""
        return " ".join(shlex.quote(a) for a in self.client_argv())

    def agent_settings(self) -> dict[str, Any]:
        """Config attributes that point an agent at this server (``Config(**...)``)."""
        return {
            "mysql_options_file": self.option_file,
            "mysql_service_start_command": self.start_command,
            "mysql_service_stop_command": self.stop_command,
            "mysql_service_status_command": self.status_command,
            "mysql_client_command": self.client_command,
        }


def _unescape(field: str) -> str:
    if "\\" not in field:
        return field
    out, i = [], 0
    table = {"n": "\n", "t": "\t", "\\": "\\", "0": "\0"}
    while i < len(field):
        c = field[i]
        if c == "\\" and i + 1 < len(field):
            out.append(table.get(field[i + 1], field[i + 1]))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def main(argv: list[str]) -> int:
    """``mariadb.py start|stop|status --defaults-file FILE`` (the agent's service commands)."""
    if len(argv) != 3 or argv[0] not in ("start", "stop", "status") or argv[1] != "--defaults-file":
        print("usage: mariadb.py start|stop|status --defaults-file FILE", file=sys.stderr)
        return 2
    verb, defaults_file = argv[0], os.path.abspath(argv[2])
    try:
        if verb == "status":
            return 0 if server_status(defaults_file) is not None else 3
        if verb == "start":
            server_start(defaults_file)
        else:
            server_stop(defaults_file)
    except (RuntimeError, OSError, KeyError) as e:
        print(f"mariadb.py {verb}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
