"""Expectation fakes for what cannot run here (LVM snapshots need device-mapper).

:class:`FakeRunner` is an :class:`~orchagent.interfaces.ICommandRunner` that knows, in
order, the exact commands the code under test must run, and what each one answers::

    runner = FakeRunner(self)                       # verifies at cleanup: all expected ran
    runner.expect(["lvs", "--reportformat", "json", ...], stdout=REPORT)
    runner.expect(["lvremove", "-f", "vg/snap"], exit_code=5, stderr=b"in use")
    runner.expect_shell("my-snapshot-script")       # configured shell text

An unexpected command (or one out of order) fails the test: the call raises
:class:`UnexpectedCommand`, which also records it so the cleanup check reports it even
when the code under test swallowed the exception.  ``effect`` (a callable) runs when the
command "runs", for fakes that must change something a later step looks at.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Sequence

import attrs
from twisted.internet import defer
from zope.interface import implementer

from orchagent.errors import CommandFailed
from orchagent.interfaces import ICommandRunner
from orchagent.process import CommandResult


class UnexpectedCommand(AssertionError):
    """The code ran a command the test did not expect (or not at that point)."""


@attrs.define
class Expectation:
    argv: tuple[str, ...]
    stdout: bytes = b""
    stderr: bytes = b""
    exit_code: int = 0
    privileged: bool | None = None
    effect: Callable[[], None] | None = None


@attrs.frozen
class Call:
    """A command the code ran, with the options it gave."""

    argv: tuple[str, ...]
    privileged: bool = False
    timeout: float | None = None
    env: dict | None = None
    stdin: bytes | None = None


@implementer(ICommandRunner)
class FakeRunner:
    def __init__(self, testcase=None):
        self.expected: deque[Expectation] = deque()
        self.calls: list[Call] = []
        self.unexpected: list[str] = []
        if testcase is not None:
            testcase.addCleanup(self.verify)

    def expect(self, argv: Sequence[str], stdout: bytes | str = b"", stderr: bytes | str = b"",
               exit_code: int = 0, privileged: bool | None = None,
               effect: Callable[[], None] | None = None) -> "FakeRunner":
        """Expect ``argv`` next.  ``privileged`` None = not checked."""
        if isinstance(stdout, str):
            stdout = stdout.encode()
        if isinstance(stderr, str):
            stderr = stderr.encode()
        self.expected.append(Expectation(tuple(str(a) for a in argv), stdout, stderr,
                                         exit_code, privileged, effect))
        return self

    def expect_shell(self, text: str, args: Sequence[str] = (), **answer) -> "FakeRunner":
        """Expect configured shell text run through :meth:`shell` (with ``args``)."""
        return self.expect(self.shell_argv(text, args), **answer)

    @staticmethod
    def shell_argv(text: str, args: Sequence[str] = ()) -> tuple[str, ...]:
        if args:
            text = f'{text} "$@"'
        return ("bash", "-c", text, "orchagent", *[str(a) for a in args])

    def run(self, argv, timeout=None, stdin=None, env=None, privileged=False, check=True,
            max_output=None, cwd=None, stdin_fd=None, stdout_fd=None, exited=None, stall=0):
        if exited is not None:
            exited.callback(None)  # a fake command has no process to outlive its answer
        argv = tuple(str(a) for a in argv)
        self.calls.append(Call(argv, privileged, timeout, env, stdin))
        if not self.expected:
            return self._unexpected(f"unexpected command {list(argv)}: no more commands expected")
        expectation = self.expected[0]
        if expectation.argv != argv:
            return self._unexpected(
                f"unexpected command {list(argv)}; expected {list(expectation.argv)}")
        if expectation.privileged is not None and expectation.privileged != privileged:
            return self._unexpected(
                f"command {list(argv)} ran with privileged={privileged}, expected "
                f"{expectation.privileged}")
        self.expected.popleft()
        if expectation.effect is not None:
            expectation.effect()
        result = CommandResult(argv=argv, exit_code=expectation.exit_code, signal=None,
                               stdout=expectation.stdout, stderr=expectation.stderr,
                               duration=0.0)
        if check and not result.ok:
            return defer.fail(CommandFailed(result.describe_failure(), result))
        return defer.succeed(result)

    def shell(self, text, args=(), timeout=None, stdin=None, check=True, max_output=None,
              exited=None):
        return self.run(self.shell_argv(text, args), timeout=timeout, stdin=stdin, check=check,
                        exited=exited)

    def stop_all(self) -> None:
        """Nothing runs on after its answer."""

    def _unexpected(self, message: str):
        self.unexpected.append(message)
        return defer.fail(UnexpectedCommand(message))

    @property
    def argvs(self) -> list[tuple[str, ...]]:
        return [c.argv for c in self.calls]

    def verify(self) -> None:
        """Every expected command ran, and nothing else did."""
        problems = list(self.unexpected)
        if self.expected:
            problems.append("expected commands that did not run: "
                            + "; ".join(str(list(e.argv)) for e in self.expected))
        if problems:
            raise AssertionError("\n".join(problems))


class FakeService:
    """The MySQL service, as a flag: ``running``; ``fail`` maps a verb to an exception."""

    def __init__(self, running: bool = False):
        self.running = running
        self.fail: dict[str, Exception] = {}
        self.calls: list[str] = []

    async def is_running(self) -> bool:
        return self.running

    async def stop(self) -> bool:
        self.calls.append("stop")
        if "stop" in self.fail:
            raise self.fail.pop("stop")
        self.running = False
        return True

    async def start(self) -> bool:
        self.calls.append("start")
        if "start" in self.fail:
            raise self.fail.pop("start")
        self.running = True
        return True


class FakeSeeds:
    """A host that receives and sends no seed (what the API asks before it lets the
    datadir change)."""

    def all_status(self) -> list[dict]:
        return []


class FakeHost:
    """MySQLHost facts a test decides: the datadir, and disk usage per path."""

    def __init__(self, datadir: str = "/var/lib/mysql", usage: dict[str, int] | None = None):
        self._datadir = datadir
        self.usage = dict(usage or {})

    async def datadir(self) -> str:
        return self._datadir

    async def disk_usage(self, path: str) -> int:
        return self.usage.get(path, 0)


class FakeMounts:
    """A mount table for code that takes ``read_mounts``: ``mount``/``unmount`` edit it."""

    def __init__(self):
        self.entries: list = []
        self._next = 100

    def mount(self, source: str, target: str, fs_type: str = "ext4", device: str = "253:0",
              options: str = "rw,relatime", root: str = "/") -> None:
        from orchagent.snapshots.mountinfo import parse

        self._next += 1
        line = f"{self._next} 1 {device} {root} {target} {options} - {fs_type} {source} rw"
        self.entries.extend(parse(line))

    def unmount(self, target: str) -> None:
        for entry in reversed(self.entries):
            if entry.mount_point == target:
                self.entries.remove(entry)
                return
        raise AssertionError(f"nothing mounted on {target}")

    def __call__(self) -> list:
        return list(self.entries)


@implementer(ICommandRunner)
class FailingRunner:
    """A real runner that fails the commands ``fails(argv)`` picks, without running them:
    for tests of what happens when a step breaks halfway on a real system."""

    def __init__(self, runner, fails: Callable[[tuple[str, ...]], bool],
                 stderr: bytes = b"injected failure"):
        self.runner = runner
        self.fails = fails
        self.stderr = stderr
        self.failed: list[tuple[str, ...]] = []

    def run(self, argv, timeout=None, stdin=None, env=None, privileged=False, check=True,
            max_output=None, cwd=None, stdin_fd=None, stdout_fd=None, exited=None, stall=0):
        argv = tuple(str(a) for a in argv)
        if self.fails(argv):
            if exited is not None:
                exited.callback(None)
            self.failed.append(argv)
            result = CommandResult(argv=argv, exit_code=1, signal=None, stdout=b"",
                                   stderr=self.stderr, duration=0.0)
            if check:
                return defer.fail(CommandFailed(result.describe_failure(), result))
            return defer.succeed(result)
        return self.runner.run(argv, timeout=timeout, stdin=stdin, env=env,
                               privileged=privileged, check=check, max_output=max_output, cwd=cwd,
                               stdin_fd=stdin_fd, stdout_fd=stdout_fd, exited=exited, stall=stall)

    def shell(self, text, args=(), timeout=None, stdin=None, check=True, max_output=None,
              exited=None):
        return self.run(FakeRunner.shell_argv(text, args), timeout=timeout, stdin=stdin,
                        check=check, max_output=max_output, exited=exited)

    def stop_all(self) -> None:
        self.runner.stop_all()
