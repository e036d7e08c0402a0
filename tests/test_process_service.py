"""The agent's command children do not outlive it."""

from __future__ import annotations

import os
import subprocess

from twisted.internet import reactor
from twisted.trial import unittest

from orchagent.config import Config
from orchagent.service import build_service
from tests.support.daemon import free_port, wait_until

MARKER = "307.25"


def running() -> bool:
    return subprocess.run(["pgrep", "-f", f"sleep {MARKER}"], capture_output=True).returncode == 0


class ChildrenAtStopTests(unittest.TestCase):
    timeout = 60

    async def test_a_command_still_running_is_stopped_with_the_agent(self):
        self.addCleanup(subprocess.run, ["pkill", "-f", f"sleep {MARKER}"])
        base = os.path.abspath(self.mktemp())
        root = build_service(Config(http_port=free_port(), http_bind_address="127.0.0.1",
                                    state_dir=os.path.join(base, "state"),
                                    seed_engine_process=False), {}, reactor)
        root.startService()
        # A command nobody waits for any more (its caller gave up without cancelling).
        ended = root.agent.runner.shell(f"sleep {MARKER}")
        ended.addErrback(lambda _: None)
        await wait_until(running, timeout=15)
        await root.stopService()
        await wait_until(lambda: not running(), timeout=15)
        await ended
