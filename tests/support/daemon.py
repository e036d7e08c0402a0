"""Run the real agent (``twistd -n orchestrator-agent``) as a child process, for tests.

Example (trial, ``async def`` test)::

    from tests.support.daemon import start_daemon

    async def test_hostname(self):
        agent = await start_daemon(self, {"AgentHostname": "db1.example"})
        status, body = await agent.get("/api/hostname", token=False)
        self.assertEqual((status, body), (200, "db1.example"))
        status, body = await agent.get("/api/mysql-port")        # ?token= added for you
        self.assertNotIn(agent.token, agent.output())            # the child's whole output

:func:`start_daemon` writes the config dict as JSON, picks a free port (``HTTPPort``,
unless the dict has one), puts ``TokenHintFile`` and ``StateDir`` in the test's temp dir,
starts the child with this interpreter (repo root on ``PYTHONPATH``), waits until the port
answers, reads the token, and registers :meth:`Daemon.stop` (SIGTERM, then SIGKILL) with
``addCleanup``.  If the child exits before listening, :class:`DaemonExited` carries its
exit code and output; tests of refused configs use ``wait=False`` and
:meth:`Daemon.wait_exit`.

Network namespaces: ``prefix=["ip", "netns", "exec", NAME]`` runs the child inside one;
give ``address`` (where the test reaches it, e.g. the namespace's veth address) and set
``HTTPBindAddress`` in the config if needed.  HTTPS: the scheme follows ``UseSSL``; pass
``http_client=tests.support.certs.https_client(...)`` to talk to it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any, Sequence

from twisted.internet import defer, endpoints, protocol, task
from twisted.internet.error import ProcessDone, ProcessTerminated

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TWISTD = (sys.executable, "-c", "from twisted.scripts.twistd import run; run()")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class DaemonExited(Exception):
    """The child exited while it was expected to run."""

    def __init__(self, exit_code: int | None, output: str):
        super().__init__(f"orchestrator-agent exited with {exit_code}:\n{output}")
        self.exit_code = exit_code
        self.output = output


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


class _ExitWatcher(protocol.ProcessProtocol):
    """Output goes straight to the log file (child fds); this only reports the exit."""

    def __init__(self):
        self.ended = defer.Deferred()
        self.exit_code: int | None = None

    def processEnded(self, reason):
        if isinstance(reason.value, (ProcessDone, ProcessTerminated)):
            status = reason.value
            self.exit_code = status.exitCode if status.signal is None else -status.signal
        self.ended.callback(self.exit_code)


class Daemon:
    """One agent child process; see the module docstring."""

    def __init__(self, directory: str, config: dict[str, Any] | None = None, *,
                 config_file: str = "option", config_path: str | None = None,
                 port_option: bool = False, args: Sequence[str] = (),
                 prefix: Sequence[str] = (), address: str = "127.0.0.1",
                 env: dict[str, str] | None = None, http_client=None, reactor=None):
        """``config_file``: "option" passes ``--config FILE``; "search-path" writes
        ``orchestrator-agent.conf.json`` in the child's working directory (``directory``)
        instead; ``config_path`` passes that path as ``--config`` unchanged (and writes
        nothing).  ``port_option`` passes the port as ``--port`` rather than in the file.
        """
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.config = dict(config or {})
        self.address = address
        self.port = free_port() if port_option or "HTTPPort" not in self.config else self.config["HTTPPort"]
        if not port_option:
            self.config.setdefault("HTTPPort", self.port)
        self.config.setdefault("TokenHintFile", os.path.join(self.directory, "token"))
        self.config.setdefault("StateDir", os.path.join(self.directory, "state"))
        self.log_path = os.path.join(self.directory, "daemon.log")
        self.token: str | None = None
        self.scheme = "https" if self.config.get("UseSSL") else "http"
        self.base_url = f"{self.scheme}://{address}:{self.port}"
        self._prefix = list(prefix)
        self._extra_args = list(args)
        self._port_option = port_option
        self._config_file = config_file
        self._config_path = config_path
        self._env = env or {}
        self._http_client = http_client
        self._watcher: _ExitWatcher | None = None
        self._transport = None

    # --- lifecycle -------------------------------------------------------------------------

    def argv(self) -> list[str]:
        argv = [*self._prefix, *TWISTD, "-n", "--pidfile=", "orchestrator-agent"]
        if self._config_path is not None:
            argv += ["--config", self._config_path]
        elif self._config_file == "option":
            argv += ["--config", self.write_config("agent.conf.json")]
        else:
            self.write_config("orchestrator-agent.conf.json")
        if self._port_option:
            argv += ["--port", str(self.port)]
        return argv + self._extra_args

    def write_config(self, name: str) -> str:
        path = os.path.join(self.directory, name)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.config, fh, indent=2)
        return path

    async def start(self, wait: bool = True) -> "Daemon":
        """Start the child; with ``wait``, return once its port answers and the token is known."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self._env)
        argv = self.argv()
        self._watcher = _ExitWatcher()
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        try:
            self._transport = self.reactor.spawnProcess(
                self._watcher, argv[0], argv, env=env, path=self.directory,
                childFDs={0: null_fd, 1: log_fd, 2: log_fd})
        finally:
            os.close(log_fd)
            os.close(null_fd)
        if wait:
            await self._wait_listening()
            self.token = self._read_token()
        return self

    @property
    def pid(self) -> int:
        return self._transport.pid

    def running(self) -> bool:
        return self._watcher is not None and not self._watcher.ended.called

    async def wait_exit(self, timeout: float = START_TIMEOUT) -> int | None:
        """The child's exit status (see :meth:`stop`) once it exits; TimeoutError after ``timeout``."""
        assert self._watcher is not None
        ended = defer.Deferred()
        self._watcher.ended.addBoth(lambda r: (ended.called or ended.callback(r), r)[1])
        return await ended.addTimeout(timeout, self.reactor)

    async def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after ``STOP_TIMEOUT``; returns the exit status.

        As with subprocess, a negative status is the signal that ended the process (after
        a clean shutdown on SIGTERM, twistd ends itself with that same signal).
        """
        if not self.running():
            return self._watcher.exit_code if self._watcher else None
        for sig, grace in (("TERM", STOP_TIMEOUT), ("KILL", STOP_TIMEOUT)):
            if not self.running():
                break
            try:
                self._transport.signalProcess(sig)
            except OSError:
                pass
            try:
                return await self.wait_exit(grace)
            except defer.TimeoutError:
                continue
        raise RuntimeError(f"orchestrator-agent pid {self._transport.pid} did not die")

    async def _wait_listening(self) -> None:
        deadline = self.reactor.seconds() + START_TIMEOUT
        endpoint = endpoints.TCP4ClientEndpoint(self.reactor, self.address, self.port, timeout=1)
        while True:
            if not self.running():
                raise DaemonExited(self._watcher.exit_code, self.output())
            try:
                connected = await endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))
            except Exception:
                if self.reactor.seconds() > deadline:
                    raise DaemonExited(None, "not listening after "
                                       f"{START_TIMEOUT:.0f}s:\n{self.output()}") from None
                await task.deferLater(self.reactor, 0.05, lambda: None)
                continue
            connected.transport.abortConnection()
            return

    def _read_token(self) -> str | None:
        path = self.config.get("TokenFile") or self.config.get("TokenHintFile")
        if not path:
            return None
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()

    def output(self) -> str:
        """Everything the child wrote (twistd's log and stderr)."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

    # --- HTTP ------------------------------------------------------------------------------

    @property
    def http_client(self):
        if self._http_client is None:
            from twisted.web.client import Agent, HTTPConnectionPool
            from treq.client import HTTPClient

            self._http_client = HTTPClient(Agent(
                self.reactor, pool=HTTPConnectionPool(self.reactor, persistent=False)))
        return self._http_client

    async def get(self, path: str, *, token: bool | str = True, headers: dict | None = None,
                  auth: tuple[str, str] | None = None, **params: Any) -> tuple[int, Any]:
        """GET ``path`` → (status, parsed JSON); a body that is not JSON comes back as text.

        ``?token=`` is the agent's token, none with ``token=False``, or the given string.
        """
        if isinstance(token, str):
            params["token"] = token
        elif token and self.token is not None:
            params["token"] = self.token
        response = await self.http_client.get(
            self.base_url + path, params=params or None, headers=headers, auth=auth)
        body = await response.content()
        try:
            return response.code, json.loads(body)
        except ValueError:
            return response.code, body.decode("utf-8", "replace")


def loaded_cryptography(pid: int) -> bool:
    """Whether the process has cryptography's compiled bindings (pyOpenSSL's OpenSSL) mapped."""
    with open(f"/proc/{pid}/maps") as fh:
        return "/cryptography/" in fh.read()


async def wait_until(predicate, timeout: float = 15.0, interval: float = 0.05, reactor=None) -> None:
    """Poll ``predicate()`` (may be async) until true; AssertionError after ``timeout``."""
    if reactor is None:
        from twisted.internet import reactor
    deadline = reactor.seconds() + timeout
    while True:
        value = predicate()
        if hasattr(value, "__await__"):
            value = await value
        if value:
            return
        if reactor.seconds() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        await task.deferLater(reactor, interval, lambda: None)


async def start_daemon(testcase, config: dict[str, Any] | None = None, *,
                       wait: bool = True, directory: str | None = None, **options: Any) -> Daemon:
    """A :class:`Daemon` in ``directory`` (default: a fresh temp dir of ``testcase``),
    started, and stopped at cleanup.  ``options`` are :class:`Daemon`'s."""
    daemon = Daemon(directory or testcase.mktemp(), config, **options)
    testcase.addCleanup(lambda: defer.Deferred.fromCoroutine(daemon.stop()))
    await daemon.start(wait=wait)
    return daemon
