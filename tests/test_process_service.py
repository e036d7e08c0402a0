"""The agent's command children do not outlive it."""

from __future__ import annotations

import subprocess

from twisted.internet import defer
from twisted.trial import unittest

from tests.support.daemon import start_daemon, wait_until

MARKER = "307.25"


def running() -> bool:
    return subprocess.run(["pgrep", "-f", f"sleep {MARKER}"], capture_output=True).returncode == 0


class ChildrenAtStopTests(unittest.TestCase):
    timeout = 60

    async def test_a_command_still_running_is_stopped_with_the_agent(self):
        self.addCleanup(subprocess.run, ["pkill", "-f", f"sleep {MARKER}"])
        agent = await start_daemon(self, {"CustomCommands": {"nap": f"sleep {MARKER}"},
                                          "CommandTimeoutSeconds": 600})
        calling = defer.ensureDeferred(agent.get("/api/custom-commands/nap"))
        calling.addErrback(lambda _: None)  # the agent goes away under the call
        await wait_until(running, timeout=15)
        await agent.stop()
        await wait_until(lambda: not running(), timeout=15)
        await calling
