"""The command runner, with real child processes."""

from __future__ import annotations

import os
import time

from twisted.internet import reactor
from twisted.trial import unittest

from orchagent.errors import CommandFailed
from orchagent.process import ProcessRunner, command_label


class RunnerTests(unittest.TestCase):
    def setUp(self):
        self.runner = ProcessRunner(reactor, default_timeout=30)

    async def test_stdout_and_exit(self):
        result = await self.runner.run(["printf", "a\\nb"])
        self.assertEqual(result.stdout, b"a\nb")
        self.assertEqual(result.exit_code, 0)
        self.assertTrue(result.ok)

    async def test_failure_includes_stderr(self):
        with self.assertRaises(CommandFailed) as caught:
            await self.runner.run(["sh", "-c", "echo broken >&2; exit 3"])
        self.assertIn("status 3", caught.exception.message)
        self.assertIn("broken", caught.exception.message)
        result = await self.runner.run(["sh", "-c", "exit 4"], check=False)
        self.assertEqual(result.exit_code, 4)

    async def test_stdin_is_delivered(self):
        result = await self.runner.run(["cat"], stdin=b"payload")
        self.assertEqual(result.stdout, b"payload")

    async def test_shell_arguments_are_never_interpreted(self):
        canary = os.path.abspath(self.mktemp())
        hostile = f"x; touch {canary}; $(touch {canary}) `touch {canary}`"
        result = await self.runner.shell("printf '%s|' ", args=[hostile, "../.."])
        self.assertEqual(result.stdout.decode(), f"{hostile}|../..|")
        self.assertFalse(os.path.exists(canary))

    async def test_timeout_kills_the_whole_group(self):
        marker = f"orchagent-test-sleep-{os.getpid()}"
        started = time.monotonic()
        with self.assertRaises(CommandFailed) as caught:
            await self.runner.run(["bash", "-c", f"exec -a {marker} sleep 60 & wait"], timeout=0.5)
        self.assertIn("timed out", caught.exception.message)
        self.assertLess(time.monotonic() - started, 10)
        self.assertNotIn(marker.encode(), _process_list())

    async def test_a_command_that_makes_no_progress_is_stopped(self):
        """A group that uses no CPU time and does no I/O for the stall limit (a hung
        tool) is stopped, the grandchild too, and its outcome says why."""
        marker = f"orchagent-test-stall-{os.getpid()}"
        started = time.monotonic()
        result = await self.runner.run(["bash", "-c", f"exec -a {marker} sleep 60 & wait"],
                                       timeout=0, stall=0.5, check=False)
        self.assertFalse(result.ok)
        self.assertEqual(result.stalled, 0.5)
        self.assertEqual(result.outcome(), "made no progress (no CPU time, no I/O) for 0.5s and was killed")
        self.assertLess(time.monotonic() - started, 10)
        self.assertNotIn(marker.encode(), _process_list())

    async def test_a_working_command_outlives_the_stall_limit(self):
        """Busy on the CPU, or writing now and then while its children come and go: not
        stopped, however long it runs past the limit."""
        spin = "import time\nend = time.monotonic() + 2\nwhile time.monotonic() < end: pass"
        result = await self.runner.run(["python3", "-c", spin], timeout=0, stall=0.5)
        self.assertTrue(result.ok)
        self.assertIsNone(result.stalled)
        result = await self.runner.run(["sh", "-c", "for i in 1 2 3 4 5 6 7 8; do echo $i; sleep 0.3; done"],
                                       timeout=0, stall=0.5)
        self.assertTrue(result.ok)
        self.assertEqual(result.stdout.split(), [b"%d" % i for i in range(1, 9)])

    async def test_output_is_bounded(self):
        with self.assertRaises(CommandFailed) as caught:
            await self.runner.run(["yes"], max_output=1024 * 1024)
        self.assertIn("too much output", caught.exception.message)

    async def test_observers_see_every_result(self):
        seen = []
        self.runner.observers.append(seen.append)
        await self.runner.run(["true"])
        await self.runner.run(["false"], check=False)
        self.assertEqual([r.exit_code for r in seen], [0, 1])

    async def test_sudo_prefix_only_for_privileged(self):
        runner = ProcessRunner(reactor, sudo=True)
        result = await runner.run(["true"], check=False)
        self.assertEqual(result.argv, ("setsid", "true"))
        result = await runner.run(["true"], privileged=True, check=False)
        self.assertEqual(result.argv[:3], ("setsid", "sudo", "-n"))

    def test_label_hides_arguments(self):
        self.assertEqual(command_label(["setsid", "sudo", "-n", "/sbin/lvs", "--secret"]), "lvs")
        self.assertEqual(command_label(["setsid", "bash", "-c", "mysql -psecret"]), "shell")


def _process_list() -> bytes:
    out = b""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    out += fh.read() + b"\n"
            except OSError:
                pass
    return out
