"""The sender's handshake deadline and its rate limit's wait are two timers, not one."""

from __future__ import annotations

import os

from twisted.internet import endpoints, protocol, reactor, task
from twisted.trial import unittest

from orchagent.config import Config
from orchagent.seed import sender
from orchagent.seed.manager import SeedManager
from tests import seed_support as S


class Silent(protocol.Protocol):
    """A receiver that accepts the connection and never answers the handshake."""


class HandshakeDeadlineTests(unittest.TestCase):
    async def test_a_rate_limit_change_during_the_handshake_keeps_its_deadline(self):
        port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory.forProtocol(Silent))
        self.addCleanup(port.stopListening)
        base = os.path.abspath(self.mktemp())
        src = os.path.join(base, "src")
        S.make_tree(src, files=3)
        clock = task.Clock()
        config = Config(state_dir=os.path.join(base, "state"), seed_transfer_port=port.getHost().port)
        manager = SeedManager(config, reactor, None, S.Host(src), S.Service(), S.Snapshots(src),
                              clock=clock)
        manager.startService()
        self.addCleanup(manager.stopService)
        await manager.send(f"127.0.0.1:{port.getHost().port}", "1", source="datadir")
        job = manager.jobs["1"]
        await S.wait_for(lambda: job.session is not None and job.session.control.transport is not None)
        control = job.session.control
        self.assertIsNotNone(control.timer, "the handshake has its deadline")
        await manager.set_rate_limit("1", 1000)
        clock.advance(sender.HANDSHAKE_TIMEOUT + 1)
        # The deadline fired: the stream was given up and a new attempt is due.
        self.assertTrue(control.closed)
        await control.lost
        self.assertEqual(job.attempts, 1)
        await manager.abort("1")
