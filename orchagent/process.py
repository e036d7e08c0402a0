"""Running OS commands: a thin ProcessProtocol and the runner that owns everything else.

:class:`_CollectingProtocol` only collects output (bounded) and reports the exit.  The
:class:`ProcessRunner` owns the decisions: argv construction (setsid, sudo, bash for
configured shell text), the timeout with SIGTERM then SIGKILL of the whole process group,
the stall limit of a command that runs without one (:class:`_StallWatch`), and turning
the outcome into a :class:`CommandResult` or a :class:`CommandFailed`.
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
    #: The stall limit (seconds) that stopped the command, if one did.
    stalled: float | None = None

    @property
    def ok(self) -> bool:
        return (self.exit_code == 0 and not self.timed_out and not self.output_overflow
                and self.stalled is None)

    @property
    def name(self) -> str:
        return command_label(self.argv)

    def outcome(self) -> str:
        """How the command ended, as words that follow its name ("exited with status 2")."""
        if self.timed_out:
            return f"timed out after {self.duration:.0f}s and was killed"
        if self.stalled is not None:
            return f"made no progress (no CPU time, no I/O) for {self.stalled:g}s and was killed"
        if self.output_overflow:
            return "produced too much output and was killed"
        if self.signal is not None:
            return f"was killed by signal {self.signal}"
        if self.exit_code is None:
            return "was killed"
        return f"exited with status {self.exit_code}"

    def describe_failure(self) -> str:
        head = f"command {self.name} {self.outcome()}"
        err = self.stderr.decode("utf-8", "replace").strip()
        return f"{head}: {err}" if err else head

    def tool_failure(self, what: str = "") -> str:
        """``what`` (the tool and its step), how it ended, and the lines of its error
        output worth a message (see :func:`output_tail`)."""
        head = f"{what} {self.outcome()}" if what else self.outcome()
        tail = output_tail(self.stderr)
        return f"{head}: {tail}" if tail else head


def output_tail(data: bytes, lines: int = 3) -> str:
    """The lines of a tool's output worth an error message: its [ERROR] lines when it
    printed any (InnoDB says there what went wrong), else its last lines."""
    text = [line.strip() for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
    errors = [line for line in text if "[ERROR]" in line or "error:" in line.lower()]
    return " | ".join((errors or text)[-lines:])


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
              check=True, max_output=None, exited: defer.Deferred | None = None):
        if args:
            text = f'{text} "$@"'
        argv = ["bash", "-c", text, "orchagent", *[str(a) for a in args]]
        return self.run(argv, timeout=timeout, stdin=stdin, check=check, max_output=max_output,
                        exited=exited)

    def run(self, argv: Sequence[str], timeout=None, stdin: bytes | None = None, env=None,
            privileged: bool = False, check: bool = True, max_output: int | None = None,
            cwd: str | None = None, stdin_fd: int | None = None,
            stdout_fd: int | None = None, exited: defer.Deferred | None = None,
            stall: float = 0) -> defer.Deferred:
        """``stdin_fd``/``stdout_fd``: a descriptor of ours the child reads its standard
        input from / writes its standard output to (the read or write end of a pipe whose
        other end a worker thread serves with large blocking reads or writes) instead of
        the pipes the reactor serves; the caller closes its copy after the call.
        ``exited`` is fired (with None) when the child has really exited: cancelling the
        returned Deferred fires it at once, while the process group is still dying.
        ``stall``: seconds the process group may go without CPU time or I/O before it is
        stopped (see :class:`_StallWatch`); 0 = no limit."""
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
        watch = _StallWatch(self.reactor, killer, stall) if stall else None
        self._running.add(killer)

        def finished(status):
            exit_code, sig = status
            if timer is not None and timer.active():
                timer.cancel()
            if watch is not None:
                watch.cancel()
            killer.ended()
            self._running.discard(killer)
            if exited is not None and not exited.called:
                exited.callback(None)
            result = CommandResult(
                argv=tuple(full), exit_code=exit_code, signal=sig,
                stdout=b"".join(proto.out), stderr=bytes(proto.err),
                duration=time.monotonic() - started, timed_out=state["timed_out"],
                output_overflow=proto.overflow, stalled=watch.stalled if watch is not None else None,
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


def group_activity(pgid: int) -> int | None:
    """A count that grows while process group ``pgid`` works: the CPU ticks (user and
    system) of its processes, every thread's included, plus the bytes they passed to
    read and write calls (``/proc/PID/io``, when we may read it); None when the group
    has no process left.  Read from procfs, which never waits for a disk."""
    total, found = 0, False
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(b")") + 2:].split()  # from field 3, the state
        if int(fields[2]) != pgid:
            continue
        found = True
        total += int(fields[11]) + int(fields[12])  # utime, stime
        try:
            with open(f"/proc/{name}/io", "rb") as f:
                io = dict(line.split(b": ") for line in f.read().splitlines())
            total += int(io[b"rchar"]) + int(io[b"wchar"])
        except (OSError, KeyError, ValueError):
            pass  # another user's process (sudo), or gone meanwhile
    return total if found else None


class _StallWatch:
    """Stops a command that runs without a time limit once it has made no progress
    for ``limit`` seconds: its process group used no CPU time and read and wrote
    nothing.

    A tool that works on local files (``mariabackup --prepare``, a copy, aria_chk) is
    never idle that long; one that is has hung, as ``mariabackup --prepare`` does when
    the first write of its Aria log fails (its threads wait on each other forever), and
    the call that waits for it would wait with it.  Not for tools that wait on a peer
    (a stream's backup tool blocks on a full pipe while the target is slow)."""

    def __init__(self, reactor, killer: "_GroupKiller", limit: float):
        self.reactor = reactor
        self.killer = killer
        self.limit = limit
        self.stalled: float | None = None
        self.seen: int | None = None
        self.since = reactor.seconds()
        self.call = reactor.callLater(self._interval(), self._sample)

    def _interval(self) -> float:
        return min(max(self.limit / 4, 0.1), 30.0)

    def _sample(self) -> None:
        now = self.reactor.seconds()
        activity = group_activity(self.killer.pid)
        if activity is None or activity != self.seen:
            self.seen, self.since = activity, now
        elif now - self.since >= self.limit:
            log.warn("command in process group {pgid} made no progress for {seconds:.0f}s: "
                     "stopping it", pgid=self.killer.pid, seconds=now - self.since)
            self.stalled = self.limit
            self.call = None
            self.killer.stop()
            return
        self.call = self.reactor.callLater(self._interval(), self._sample)

    def cancel(self) -> None:
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None


class CommandGroup:
    """The commands one job runs, stopped as a whole.

    :meth:`cancel` stops every one still running (the runner stops its process group:
    SIGTERM, then SIGKILL), and their Deferreds fail with CancelledError; :meth:`ended`
    waits until each has really exited.  A job that removes what its commands write (a
    backup's work directory, a staging tree an extractor fills) waits for that, not for
    the cancellation, or a dying tool would write on after the removal."""

    def __init__(self, runner):
        self.runner = runner
        self.running: set[defer.Deferred] = set()
        self.exits: set[defer.Deferred] = set()

    def _exited(self) -> defer.Deferred:
        exited = defer.Deferred()
        self.exits.add(exited)
        exited.addBoth(lambda _: self.exits.discard(exited))
        return exited

    def _track(self, d: defer.Deferred) -> defer.Deferred:
        self.running.add(d)

        def forget(result):
            self.running.discard(d)
            return result

        return d.addBoth(forget)

    def _start(self, start, *args, **kwargs) -> defer.Deferred:
        exited = self._exited()
        try:
            d = start(*args, exited=exited, **kwargs)
        except BaseException:
            exited.callback(None)  # never started (spawning failed)
            raise
        return self._track(d)

    def run(self, argv: Sequence[str], **kwargs) -> defer.Deferred:
        """The runner's ``run``, remembered until it ends."""
        return self._start(self.runner.run, argv, **kwargs)

    def shell(self, text: str, args: Sequence[str] = (), **kwargs) -> defer.Deferred:
        """The runner's ``shell``, remembered until it ends."""
        return self._start(self.runner.shell, text, args=args, **kwargs)

    def cancel(self) -> None:
        for d in list(self.running):
            d.cancel()

    async def ended(self) -> None:
        while self.exits:
            await defer.DeferredList(list(self.exits), consumeErrors=True)
