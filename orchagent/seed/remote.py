"""The agent's side of the seed engine process: the seed manager as the API sees it.

With ``SeedEngineProcess`` (the default) ``agent.seeds`` is a :class:`SeedEngineProcess`:
a service that spawns one long-lived child (:mod:`orchagent.seed.engine_process`, which
says why) at startup and offers the manager's public surface (ISeedSurface), so the API
does not know where seeds run.

Commands (receive, send, abort, rate limit) are calls to the child over
:mod:`orchagent.seed.channel`, their keyword arguments forwarded as they are (a new
option of the manager needs no change here).  Status reads (seed-status, seeds,
seed-command-completed/succeeded, /metrics) are answered from the copy the child keeps
current (every :data:`~orchagent.seed.engine_process.PUSH_INTERVAL` and at once on a
change of state), so a controller polling seed-status under load costs the engine
nothing; before the first push (agent start) the copy is what StateDir holds, and a seed
the copy does not know is asked of the child, so "no seed" is always the manager's own
answer.

When the child dies, the agent logs how, and starts a new one (after a short, growing
delay if it keeps dying); the manager resumes the seeds from StateDir as after an agent
restart.  Calls made meanwhile wait for it (up to :data:`READY_TIMEOUT`).  When the agent
stops, it stops the child: SIGTERM, :data:`STOP_GRACE` seconds, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from typing import Any, Callable

import attrs
from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.logger import Logger, globalLogPublisher
from zope.interface import implementer

import orchagent
from orchagent.config import orchestrator_over_https, seed_tls_configured
from orchagent.errors import NotAvailable
from orchagent.interfaces import ISeedSurface
from orchagent.seed import auth, channel, state

log = Logger()

#: Seconds a call waits for the engine to be (back) up before answering NotAvailable.
READY_TIMEOUT = 30.0
#: Seconds the engine has to stop after SIGTERM before it is killed.
STOP_GRACE = 8.0
#: Delay before restarting an engine that died; doubled while it keeps dying soon after
#: starting, up to MAX_RESTART_DELAY; back to the first after STABLE_SECONDS of running.
RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
STABLE_SECONDS = 60.0
#: Longest line of the child's stray output kept in one log event.
MAX_OUTPUT_LINE = 16 * 1024


def config_to_json(config) -> bytes:
    """The whole configuration for the child (see engine_process.config_from_json)."""
    return json.dumps(attrs.asdict(config)).encode()


def engine_argv(parent_pid: int, tls: bool) -> list[str]:
    """The child's command line: this interpreter, in safe-path mode (``-P``: the working
    directory is not searched for modules); without seed TLS the child does not even load
    pyOpenSSL (:mod:`orchagent.seed.__main__`)."""
    return [sys.executable, "-P", "-m", "orchagent.seed", "--parent-pid", str(parent_pid),
            *(() if tls else ("--without-tls",))]


def engine_env() -> dict[str, str]:
    """The agent's environment, with the directory orchagent is imported from first on
    PYTHONPATH so that the child imports the same code."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(orchagent.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _fire(waiting: list[defer.Deferred], result: Any) -> None:
    """Fire every Deferred of ``waiting`` not fired yet with ``result`` (an exception:
    errback), and empty the list."""
    waiting[:], fired = [], list(waiting)
    for d in fired:
        if not d.called:
            (d.errback if isinstance(result, Exception) else d.callback)(result)


@attrs.frozen
class ForwardedCommand:
    """An OS command the engine ran, as the agent's command observers (metrics) see it."""

    name: str
    duration: float
    ok: bool


class _EngineProcessProtocol(protocol.ProcessProtocol):
    """Hands the child its configuration, turns its stray output into lines, reports the exit."""

    def __init__(self, config_json: bytes, on_line: Callable[[str], None],
                 on_ended: Callable[[Any], None]):
        self.config_json = config_json
        self.on_line = on_line
        self.on_ended = on_ended
        self._partial = b""

    def connectionMade(self):
        self.transport.write(self.config_json)
        self.transport.closeStdin()

    def outReceived(self, data: bytes):
        self._partial += data
        *lines, self._partial = self._partial.split(b"\n")
        if len(self._partial) > MAX_OUTPUT_LINE:
            lines.append(self._partial)
            self._partial = b""
        for line in lines:
            if line.strip():
                self.on_line(line[:MAX_OUTPUT_LINE].decode("utf-8", "replace"))

    errReceived = outReceived

    def processEnded(self, reason):
        if self._partial.strip():
            self.on_line(self._partial.decode("utf-8", "replace"))
        self._partial = b""
        self.on_ended(reason)


class _AgentChannel(channel.QuietAMP):
    """The agent's end of the channel: every box goes to the SeedEngineProcess."""

    def __init__(self, owner: "SeedEngineProcess"):
        super().__init__()
        self.owner = owner

    @channel.Ready.responder
    def ready(self, pid: int):
        self.owner._engine_ready(self, pid)
        return {}

    @channel.Statuses.responder
    def statuses(self, changed: list, removed: list, replace: bool):
        if self.owner.channel is self:
            self.owner._take_statuses(changed, removed, replace)
        return {}

    @channel.Log.responder
    def log_event(self, event: dict):
        self.owner.publish(channel.event_from_wire(event))
        return {}

    @channel.CommandRan.responder
    def command_ran(self, name: str, duration: float, ok: bool):
        self.owner._command_ran(ForwardedCommand(name, duration, ok))
        return {}

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.owner._channel_lost(self)


@implementer(ISeedSurface)
class SeedEngineProcess(service.Service):
    """``agent.seeds`` when seeds run in their own process; see the module docstring.

    ``command_observers`` is the agent's runner's observer list (metrics count the
    engine's commands there); ``publish`` receives the engine's log events (default: the
    global log publisher, i.e. the agent's observers).
    """

    name = "seeds"

    def __init__(self, config: Any, reactor: Any, command_observers: list | None = None,
                 publish: Callable[[dict], None] | None = None):
        self.config = config
        self.reactor = reactor
        self.command_observers = command_observers if command_observers is not None else []
        self.publish = publish or globalLogPublisher
        # What the manager checks when it is built: refuse to start here, not in the child.
        auth.parse_networks(config.seed_allowed_networks)
        if seed_tls_configured(config):
            auth.tls_server_options(config)
        #: The status of each seed, in the manager's order, as the engine last pushed it.
        self.statuses: dict[str, dict] = {}
        self.channel: _AgentChannel | None = None
        self.process = None
        self.pid: int | None = None
        self.ready = False
        self.restarts = 0
        self._waiters: list[defer.Deferred] = []
        self._exits: list[defer.Deferred] = []
        self._restart_call = None
        self._delay = RESTART_DELAY
        self._started_at = 0.0

    # --- service -------------------------------------------------------------------------------

    def startService(self):
        super().startService()
        for record in state.StateStore(self.config.state_dir).load_all():
            eta = 0.0 if record.state == state.COMPLETED else None
            self.statuses[record.seed_id] = record.status(0.0, eta)
        self._spawn()

    def stopService(self):
        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        state.cancelled(self._restart_call)
        _fire(self._waiters, NotAvailable("the agent is stopping"))
        if self.process is None:
            return
        for sig in ("TERM", "KILL"):
            exited = defer.Deferred()
            self._exits.append(exited)
            with contextlib.suppress(OSError, error.ProcessExitedAlready):
                self.process.signalProcess(sig)
            try:
                await exited.addTimeout(STOP_GRACE, self.reactor)
                return
            except defer.TimeoutError:
                if sig == "TERM":
                    log.warn("seed engine process {pid} did not stop within {grace} s of "
                             "SIGTERM; killing it", pid=self.pid, grace=STOP_GRACE)
        log.error("seed engine process {pid} did not die", pid=self.pid)

    # --- the child -----------------------------------------------------------------------------

    def _spawn(self) -> None:
        self._restart_call = None
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        process = None
        try:
            agent_channel = _AgentChannel(self)
            factory = protocol.Factory()
            factory.buildProtocol = lambda addr: agent_channel
            process_protocol = _EngineProcessProtocol(
                config_to_json(self.config), self._child_output, self._ended)
            argv = engine_argv(os.getpid(), seed_tls_configured(self.config)
                               or orchestrator_over_https(self.config))
            process = self.reactor.spawnProcess(
                process_protocol, sys.executable, argv, env=engine_env(),
                childFDs={0: "w", 1: "r", 2: "r", channel.CHANNEL_FD: child_end.fileno()})
            self.reactor.adoptStreamConnection(parent_end.fileno(), socket.AF_UNIX, factory)
        except Exception:
            log.failure("cannot start the seed engine process")
            if process is None:
                self._schedule_restart()
            else:  # spawned without its channel: its end restarts it
                self.process, self.pid, self._started_at = process, process.pid, self.reactor.seconds()
                process.signalProcess("KILL")
            return
        finally:
            parent_end.close()
            child_end.close()
        self.process, self.pid, self.channel, self.ready = process, process.pid, agent_channel, False
        self._started_at = self.reactor.seconds()
        log.info("seed engine process started (pid {pid})", pid=self.pid)

    def _engine_ready(self, agent_channel: _AgentChannel, pid: int) -> None:
        if agent_channel is not self.channel:
            return
        self.ready = True
        log.info("seed engine process {pid} is ready", pid=pid)
        _fire(self._waiters, agent_channel)

    def _take_statuses(self, changed: list, removed: list, replace: bool) -> None:
        if replace:
            self.statuses = {}
        for status in changed:
            self.statuses[status["SeedId"]] = status
        for seed_id in removed:
            self.statuses.pop(seed_id, None)

    def _command_ran(self, result: ForwardedCommand) -> None:
        for observer in list(self.command_observers):
            observer(result)

    def _child_output(self, line: str) -> None:
        log.warn("seed engine process {pid}: {line}", pid=self.pid, line=line)

    def _channel_lost(self, agent_channel: _AgentChannel) -> None:
        """Without its channel the engine is useless: make sure it ends (and restarts)."""
        if agent_channel is not self.channel:
            return
        self.channel, self.ready = None, False
        if self.running and self.process is not None:
            log.warn("seed engine process {pid} closed its channel; killing it", pid=self.pid)
            with contextlib.suppress(OSError, error.ProcessExitedAlready):
                self.process.signalProcess("KILL")

    def _ended(self, reason) -> None:
        status = reason.value
        code, sig = getattr(status, "exitCode", None), getattr(status, "signal", None)
        how = f"was killed by signal {sig}" if sig else f"exited with status {code}"
        pid, ran = self.pid, self.reactor.seconds() - self._started_at
        self.process, self.pid, self.ready = None, None, False
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.loseConnection()
        self.channel = None
        if not self.running:
            log.info("seed engine process {pid} {how}", pid=pid, how=how)
        _fire(self._exits, None)
        if not self.running:
            return
        self._delay = RESTART_DELAY if ran >= STABLE_SECONDS else self._delay
        log.error("seed engine process {pid} {how}; starting a new one in {delay} s "
                  "(its seeds resume from StateDir)", pid=pid, how=how, delay=self._delay)
        self._schedule_restart()

    def _schedule_restart(self) -> None:
        if not self.running:
            return
        self.restarts += 1
        self._restart_call = self.reactor.callLater(self._delay, self._spawn)
        self._delay = min(self._delay * 2, MAX_RESTART_DELAY)

    # --- calls ---------------------------------------------------------------------------------

    async def _ready_channel(self) -> _AgentChannel:
        if self.ready and self.channel is not None:
            return self.channel
        if not self.running:
            raise NotAvailable("the seed engine is not running (the agent is stopping)")
        waiter = defer.Deferred()
        self._waiters.append(waiter)
        try:
            return await waiter.addTimeout(READY_TIMEOUT, self.reactor)
        except defer.TimeoutError:
            raise NotAvailable(f"the seed engine process has not been ready for "
                               f"{READY_TIMEOUT:.0f} s; see the agent's log") from None

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``method`` of the engine's seed manager; its result, or its error raised here."""
        agent_channel = await self._ready_channel()
        try:
            answer = await agent_channel.callRemote(
                channel.Call, method=method, args={"args": list(args), "kwargs": kwargs})
        except error.ConnectionClosed:
            raise NotAvailable(f"the seed engine process ended while running {method}; "
                               "it is being restarted: check the seed's status, then retry") from None
        result = answer["result"]
        if "error" in result:
            raise channel.error_from_wire(result["error"])
        return result["ok"]

    # --- the seed manager's public surface -----------------------------------------------------

    async def receive(self, seed_id: str, key: str | None = None, **options: Any) -> bool:
        return await self._starting(seed_id, "receiver",
                                    self.call("receive", seed_id, key=key, **options))

    async def send(self, target: str, seed_id: str, key: str | None = None,
                   source: str = "snapshot", **options: Any) -> bool:
        return await self._starting(seed_id, "sender", self.call(
            "send", target, seed_id, key=key, source=source, **options))

    async def _starting(self, seed_id: str, role: str, call) -> bool:
        """A seed the engine could not be asked to start (it is restarting) is failed here,
        as the engine fails one it refuses: orchestrator reads completed, not failed."""
        try:
            return await call
        except NotAvailable as e:
            if seed_id not in self.statuses:
                now = self.reactor.seconds()
                self.statuses[seed_id] = state.SeedRecord(
                    seed_id=seed_id, role=role, state=state.FAILED, error=f"refused: {e.message}",
                    started_at=now, updated_at=now).status(0.0, None)
            raise

    async def abort(self, seed_id: str, **options: Any) -> bool:
        return await self.call("abort", seed_id, **options)

    async def set_rate_limit(self, seed_id: str, bytes_per_sec: int, **options: Any) -> bool:
        return await self.call("set_rate_limit", seed_id, bytes_per_sec, **options)

    def _running(self, role: str) -> bool:
        return any(s["Role"] == role and s["State"] not in state.TERMINAL
                   for s in self.statuses.values())

    async def datadir_usage(self) -> int | None:
        """Asked of the engine at every read: a pushed status may be seconds old, and
        orchestrator takes a figure equal to the last one for a stalled seed."""
        return await self.call("datadir_usage") if self._running("receiver") else None

    async def reading_sources(self) -> list[dict]:
        """Asked of the engine when the pushed statuses show a send running (the engine
        pushes them before it answers the call that started one, and before it answers
        an abort): none running, none read."""
        return await self.call("reading_sources") if self._running("sender") else []

    async def _known(self, method: str, seed_id: str, answer: Callable[[dict], Any]) -> Any:
        """``answer`` from the seed's pushed status; a seed the copy lacks is asked of the engine."""
        known = self.statuses.get(seed_id)
        return await self.call(method, seed_id) if known is None else answer(known)

    async def completed(self, seed_id: str) -> bool:
        return await self._known("completed", seed_id, lambda s: s["State"] in state.TERMINAL)

    async def succeeded(self, seed_id: str) -> bool:
        return await self._known("succeeded", seed_id, lambda s: s["State"] == state.COMPLETED)

    async def status(self, seed_id: str) -> dict:
        return await self._known("status", seed_id, dict)

    def all_status(self) -> list[dict]:
        """Every seed's status as last pushed (treat them as read-only)."""
        return list(self.statuses.values())
