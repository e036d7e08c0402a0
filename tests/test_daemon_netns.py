"""The daemon harness runs the agent inside a network namespace the test made."""

from __future__ import annotations

from twisted.trial import unittest

from tests.support.daemon import start_daemon
from tests.support.netns import create_pair


class NetworkNamespaceTests(unittest.TestCase):
    async def test_agent_in_a_namespace(self):
        host = create_pair(self).a
        agent = await start_daemon(self, {"AgentHostname": "in-namespace", "Datacenter": "dc9"},
                                   prefix=host.prefix, address=host.address)
        self.assertEqual(await agent.get("/api/hostname", token=False), (200, "in-namespace"))
        self.assertEqual(await agent.get("/api/datacenter"), (200, "dc9"))
        self.assertIn(f'"{host.gateway}"', agent.output())  # the access log names the peer
        await agent.stop()
        self.assertIn("Server Shut Down.", agent.output())
