"""Running OS commands: a thin ProcessProtocol and the runner that owns everything else.

:class:`_CollectingProtocol` only collects output (bounded) and reports the exit.  The
:class:`ProcessRunner` owns the decisions: argv construction (setsid, sudo, bash for
configured shell text), the timeout with SIGTERM then SIGKILL of the whole process group,
and turning the outcome into a :class:`CommandResult` or a :class:`CommandFailed`.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Sequence

import attrs
from twisted.internet import defer, error, protocol
from twisted.logger import Logger
from zope.interface import implementer

from orchagent.errors import CommandFailed
from orchagent.interfaces import ICommandRunner

log = Logger()

#: Seconds between SIGTERM and SIGKILL when a command is stopped.
KILL_GRACE_SECONDS = 5.0
DEFAULT_MAX_OUTPUT = 64 * 1024 * 1024
MAX_STDERR = 64 * 1024


@attrs.frozen
class CommandResult:
    """What a finished command did.  ``name`` is a short label for logs and metrics."""

    argv: tuple[str, ...]
    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    duration: float
    timed_out: bool = False
    output_overflow: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.output_overflow

    @property
    def name(self) -> str:
        return command_label(self.argv)

    def describe_failure(self) -> str:
        what = self.name
        if self.timed_out:
            head = f"command {what} timed out after {self.duration:.0f}s and was killed"
        elif self.output_overflow:
            head = f"command {what} produced too much output and was killed"
        elif self.signal is not None:
            head = f"command {what} was killed by signal {self.signal}"
        else:
            head = f"command {what} exited with status {self.exit_code}"
        err = self.stderr.decode("utf-8", "replace").strip()
        return f"{head}: {err}" if err else head


def command_label(argv: Sequence[str]) -> str:
    """A short, credential-free name of a command: the program, or 'shell' for bash -c."""
    args = list(argv)
    while args and args[0] in ("setsid", "sudo", "-n"):
        args.pop(0)
    if not args:
        return "?"
    if os.path.basename(args[0]) == "bash" and len(args) > 1 and args[1] == "-c":
        return "shell"
    return os.path.basename(args[0])


class _CollectingProtocol(protocol.ProcessProtocol):
    """Collects stdout/stderr up to a bound and fires ``ended`` with the exit status."""

    def __init__(self, stdin: bytes | None, max_output: int):
        self.stdin = stdin
        self.max_output = max_output
        self.out: list[bytes] = []
        self.out_size = 0
        self.err = bytearray()
        self.overflow = False
        self.ended: defer.Deferred = defer.Deferred()
        self.on_overflow = lambda: None

    def connectionMade(self):
        if self.stdin:
            self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes):
        if self.overflow:
            return
        self.out_size += len(data)
        if self.out_size > self.max_output:
            self.overflow = True
            self.on_overflow()
            return
        self.out.append(data)

    def errReceived(self, data: bytes):
        self.err += data
        if len(self.err) > MAX_STDERR:
            del self.err[: len(self.err) - MAX_STDERR]

    def processEnded(self, reason):
        value = reason.value
        self.ended.callback((getattr(value, "exitCode", None), getattr(value, "signal", None)))


@implementer(ICommandRunner)
class ProcessRunner:
    """Runs commands as children in their own session, so a kill reaches all of them."""

    def __init__(self, reactor, default_timeout: float = 300.0, sudo: bool = False,
                 env: dict[str, str] | None = None):
        self.reactor = reactor
        self.default_timeout = default_timeout
        self.sudo = sudo
        self.env = dict(env if env is not None else os.environ)
        self.observers: list = []
        self._running: set = set()

    def shell(self, text: str, args: Sequence[str] = (), timeout=None, stdin=None,
              check=True, max_output=None):
        if args:
            text = f'{text} "$@"'
        argv = ["bash", "-c", text, "orchagent", *[str(a) for a in args]]
        return self.run(argv, timeout=timeout, stdin=stdin, check=check, max_output=max_output)

    def run(self, argv: Sequence[str], timeout=None, stdin: bytes | None = None, env=None,
            privileged: bool = False, check: bool = True, max_output: int | None = None,
            cwd: str | None = None, stdin_fd: int | None = None,
            stdout_fd: int | None = None, exited: defer.Deferred | None = None) -> defer.Deferred:
        """``stdin_fd``/``stdout_fd``: a descriptor of ours the child reads its standard
        input from / writes its standard output to (the read or write end of a pipe whose
        other end a worker thread serves with large blocking reads or writes) instead of
        the pipes the reactor serves; the caller closes its copy after the call.
        ``exited`` is fired (with None) when the child has really exited: cancelling the
        returned Deferred fires it at once, while the process group is still dying."""
        argv = [str(a) for a in argv]
        if not argv:
            raise ValueError("empty argv")
        full = (["sudo", "-n"] if (privileged and self.sudo) else []) + argv
        full = ["setsid"] + full
        timeout = self.default_timeout if timeout is None else timeout
        proto = _CollectingProtocol(stdin, max_output or DEFAULT_MAX_OUTPUT)
        child_env = dict(self.env)
        child_env.update(env or {})
        started = time.monotonic()
        child_fds = {0: "w" if stdin_fd is None else stdin_fd,
                     1: "r" if stdout_fd is None else stdout_fd, 2: "r"}
        transport = self.reactor.spawnProcess(
            proto, "/usr/bin/env", ["env", *full], env=child_env, path=cwd, childFDs=child_fds
        )
        # /usr/bin/env resolves the program through PATH without a shell.
        state = {"timed_out": False}
        killer = _GroupKiller(self.reactor, transport)
        proto.on_overflow = killer.stop

        def on_timeout():
            state["timed_out"] = True
            killer.stop()

        timer = self.reactor.callLater(timeout, on_timeout) if timeout else None
        self._running.add(killer)

        def finished(status):
            exit_code, sig = status
            if timer is not None and timer.active():
                timer.cancel()
            killer.ended()
            self._running.discard(killer)
            if exited is not None and not exited.called:
                exited.callback(None)
            result = CommandResult(
                argv=tuple(full), exit_code=exit_code, signal=sig,
                stdout=b"".join(proto.out), stderr=bytes(proto.err),
                duration=time.monotonic() - started, timed_out=state["timed_out"],
                output_overflow=proto.overflow,
            )
            for observer in self.observers:
                observer(result)
            if check and not result.ok:
                log.warn("{failure}", failure=result.describe_failure(), command=result.name)
                raise CommandFailed(result.describe_failure(), result)
            return result

        # Cancelling the returned Deferred stops the command (SIGTERM, then SIGKILL).
        outer = defer.Deferred(lambda _: killer.stop())

        def forward(result):
            if not outer.called:
                outer.callback(result)

        proto.ended.addCallback(finished).addBoth(forward)
        return outer

    def stop_all(self) -> None:
        """Stop every running child (service shutdown)."""
        for killer in list(self._running):
            killer.stop()


class _GroupKiller:
    """SIGTERM to the child's process group, SIGKILL after a grace period."""

    def __init__(self, reactor, transport):
        self.reactor = reactor
        self.transport = transport
        self.pid = transport.pid
        self._escalation = None
        self._done = False

    def _signal(self, sig):
        if self._done or self.pid is None:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            try:
                self.transport.signalProcess(sig)
            except error.ProcessExitedAlready:
                pass

    def stop(self):
        self._signal(signal.SIGTERM)
        if self._escalation is None and not self._done:
            self._escalation = self.reactor.callLater(KILL_GRACE_SECONDS, self._signal, signal.SIGKILL)

    def ended(self):
        if self._escalation is not None and self._escalation.active():
            self._escalation.cancel()
        # Children of the group that outlived the leader are reaped here too.
        if not self._done:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError, TypeError):
                pass
        self._done = True
