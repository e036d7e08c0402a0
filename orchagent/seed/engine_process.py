"""The seed engine process: the agent's seed manager, in a child process of its own.

A seed moves hundreds of MB/s through the reactor and the worker threads; the API serves
thousands of small requests.  In one process they share one reactor thread and one GIL,
so a flood of API requests starves the seed.  With ``SeedEngineProcess`` (the default)
the agent spawns this module once at startup (:mod:`orchagent.seed.remote`)::

    python -P -m orchagent.seed --parent-pid PID [--without-tls]

The child reads the agent's whole configuration as JSON on standard input (the exact
:class:`~orchagent.config.Config` the agent runs with, command-line overrides included,
nothing written to disk), builds the real :class:`~orchagent.seed.manager.SeedManager`
with its own reactor, thread pool and command runner exactly as the agent would
(:func:`orchagent.agent.build_seed_manager`), starts it (seeds left running by a previous
engine or agent resume from StateDir), and serves the agent over the socket pair on
file descriptor :data:`~orchagent.seed.channel.CHANNEL_FD` (see
:mod:`orchagent.seed.channel`).

It stops with its parent, and never outlives it: SIGTERM stops the manager cleanly; the
kernel sends SIGKILL when the parent dies (``PR_SET_PDEATHSIG``), so a killed agent
leaves no engine holding the seed port or the state directory for its successor; EOF on
the channel (the portable fallback) stops it cleanly.  SIGINT is ignored: a Ctrl-C at a
terminal reaches the whole process group, and the agent decides when its engine stops.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import signal
import socket
import sys
from typing import Any

from twisted.internet import defer, protocol, task
from twisted.logger import Logger, globalLogBeginner
from twisted.protocols import amp

from orchagent.errors import AgentError
from orchagent.seed import channel
from orchagent.seed.state import cancelled

#: Named for the module even when it runs as ``__main__``.
log = Logger(namespace="orchagent.seed.engine_process")

#: Seconds between status pushes while nothing asks for one sooner (the rate and the
#: bytes done of running seeds); state changes and calls push at once.
PUSH_INTERVAL = 0.5
#: How long an engine that cannot start waits for its last words to reach the agent.
FLUSH_TIMEOUT = 5.0
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
#: The engine's name in ps/top (comm, at most 15 bytes).
PROCESS_NAME = b"orchagent-seed"


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL us when the parent dies, and name the process.

    Called first thing: the parent may have died before the call, so the parent pid is
    checked after it (a child whose parent died has been re-parented).  The signal comes
    when the thread that forked us ends: the agent's reactor (main) thread.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(PROCESS_NAME), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: EOF on the channel still stops us
    if os.getppid() != parent_pid:
        raise SystemExit(f"seed engine: the agent (pid {parent_pid}) is gone")


def config_from_json(data: bytes):
    """The agent's Config from what :func:`orchagent.seed.remote.config_to_json` wrote."""
    from orchagent.config import Config

    values = json.loads(data)
    values["source_files"] = tuple(values.get("source_files") or ())
    return Config(**values)


class Engine:
    """The manager, and what it tells the agent: statuses, log events, commands run.

    ``send`` is the channel's ``callRemote`` (or a test's recorder); nothing here needs a
    socket, so the pushing logic is tested in memory.
    """

    def __init__(self, manager: Any, send, clock):
        self.manager = manager
        self.send = send
        self.clock = clock
        #: The status of each seed as the parent last saw it.
        self.pushed: dict[str, dict] = {}
        self._soon = None
        self._pusher: task.LoopingCall | None = None
        watchers = getattr(manager, "watchers", None)
        if isinstance(watchers, list):
            watchers.append(self._touched)
        observers = getattr(manager.runner, "observers", None)
        if isinstance(observers, list):
            observers.append(self._command_ran)

    def start(self) -> None:
        """Start the manager (resuming seeds), tell the parent everything, then Ready."""
        self.manager.startService()
        self.push(replace=True)
        self.send(channel.Ready, pid=os.getpid())
        self._pusher = task.LoopingCall(self.push)
        self._pusher.clock = self.clock
        self._pusher.start(PUSH_INTERVAL, now=False)

    async def stop(self) -> None:
        if self._pusher is not None and self._pusher.running:
            self._pusher.stop()
        cancelled(self._soon)
        if self.manager.running:
            await self.manager.stopService()
        self.push()

    # --- what the parent is told -------------------------------------------------------------

    def _touched(self, record) -> None:
        """A record was touched (progress or a change of state): push soon when its state
        is not the one the parent has; progress alone waits for the next periodic push."""
        seen = self.pushed.get(record.seed_id)
        if seen is None or seen.get("State") != record.state or seen.get("Error") != record.error:
            if self._soon is None or not self._soon.active():
                self._soon = self.clock.callLater(0, self.push)

    def push(self, replace: bool = False) -> None:
        """Send the statuses that changed since the last push (all with ``replace``)."""
        try:
            current = {s["SeedId"]: s for s in self.manager.all_status()}
        except Exception:
            log.failure("seed engine: cannot read the seeds' status")
            return
        pushed = {} if replace else self.pushed
        changed = [s for seed_id, s in current.items() if pushed.get(seed_id) != s]
        removed = [seed_id for seed_id in pushed if seed_id not in current]
        self.pushed = current
        if not (changed or removed or replace):
            return
        for n, batch in enumerate(channel.status_batches(changed)):
            try:
                self.send(channel.Statuses, changed=batch, removed=removed if n == 0 else [],
                          replace=replace and n == 0)
            except Exception:
                # One status too big for a box must not stop the pushes of all the others.
                log.failure("seed engine: cannot push {count} seed statuses", count=len(batch))

    def _command_ran(self, result) -> None:
        self.send(channel.CommandRan, name=result.name, duration=float(result.duration),
                  ok=bool(result.ok))

    # --- calls from the parent ---------------------------------------------------------------

    async def call(self, method: str, args: dict) -> dict:
        """Run one manager method; its result or its error, after the statuses it changed."""
        try:
            if method not in channel.CALLS:
                raise channel.SeedEngineFailure(f"the seed engine has no call {method!r}")
            value = getattr(self.manager, method)(*args.get("args", ()), **args.get("kwargs", {}))
            if isinstance(value, defer.Deferred) or hasattr(value, "__await__"):
                value = await value
            answer = {"ok": value}
        except Exception as e:
            if not isinstance(e, AgentError):
                log.failure("seed engine: {method} failed unexpectedly", method=method)
            answer = {"error": channel.error_to_wire(e)}
        self.push()
        return answer


class EngineChannel(channel.QuietAMP):
    """The child's end of the channel: calls go to the Engine; EOF stops the process."""

    def __init__(self, on_lost):
        super().__init__()
        self.engine: Engine | None = None
        self.on_lost = on_lost

    @channel.Call.responder
    def call(self, method: str, args: dict):
        if self.engine is None:
            return {"result": {"error": {"type": "NotAvailable",
                                         "message": "the seed engine is still starting"}}}
        d = defer.ensureDeferred(self.engine.call(method, args))
        return d.addCallback(lambda answer: {"result": answer})

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.on_lost()


class LogForwarder:
    """The child's only log observer: each event crosses the channel to the agent's
    observers.  Without the channel (it is gone: the agent stopped or died) warnings and
    errors become plain lines on stderr, which the agent logs if it still can."""

    def __init__(self):
        self.channel: amp.AMP | None = None

    def __call__(self, event: dict) -> None:
        wire = channel.event_to_wire(event)
        if self.channel is not None and self.channel.transport is not None and not getattr(
                self.channel.transport, "disconnected", False):
            with contextlib.suppress(Exception):
                self.channel.callRemote(channel.Log, event=wire)
                return
        if wire["level"] in ("debug", "info") and not wire["failure"]:
            return
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(f"[{wire['namespace']}#{wire['level']}] {wire['text']}\n")
            if wire["failure"]:
                sys.stderr.write(wire["failure"] + "\n")
            sys.stderr.flush()


def main(parent_pid: int) -> None:
    """Run the engine until the agent stops it (started by :mod:`orchagent.seed.__main__`)."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = config_from_json(sys.stdin.buffer.read())

    from twisted.internet import reactor

    from orchagent.agent import build_seed_manager

    forwarder = LogForwarder()
    globalLogBeginner.beginLoggingTo([forwarder], redirectStandardIO=False)

    def lost() -> None:
        if reactor.running:
            log.info("seed engine: the agent closed the channel; stopping")
            reactor.stop()

    amp_channel = EngineChannel(lost)
    forwarder.channel = amp_channel
    factory = protocol.Factory()
    factory.buildProtocol = lambda addr: amp_channel
    reactor.adoptStreamConnection(channel.CHANNEL_FD, socket.AF_UNIX, factory)
    os.close(channel.CHANNEL_FD)

    def send(command, **kwargs):
        if amp_channel.transport is not None and not amp_channel.transport.disconnected:
            amp_channel.callRemote(command, **kwargs)

    def start() -> None:
        try:
            manager = build_seed_manager(config, reactor)
            engine = Engine(manager, send, reactor)
            engine.start()
        except BaseException:
            log.failure("seed engine: cannot start the seed manager")
            failed.append(True)
            # The failure above is queued on the channel: close it once written (its loss
            # stops the reactor), so the agent logs why; stopping now would lose it.
            transport = amp_channel.transport
            if transport is None or getattr(transport, "disconnected", False):
                reactor.stop()
            else:
                transport.loseConnection()
                reactor.callLater(FLUSH_TIMEOUT, lambda: reactor.running and reactor.stop())
            return
        amp_channel.engine = engine
        gc.freeze()  # as the agent does (orchagent.service.HeapFreeze): short full collections
        reactor.addSystemEventTrigger("before", "shutdown",
                                      lambda: defer.ensureDeferred(engine.stop()))
        log.info("seed engine: running as pid {pid}", pid=os.getpid())

    failed: list[bool] = []
    reactor.callWhenRunning(start)
    reactor.run()
    if failed:
        raise SystemExit(1)
