"""#16 item 9: floods of idle connections against real agents at systemd's default
descriptor limit (1024, set on the agent with ``prlimit``).

The flood comes from 127.0.0.2 (any 127/8 address is loopback's), opens about 1100 TCP
connections that never send a byte, and opens a new one whenever the agent closes one
(after a pause, so that the test does not spin).  A keyed seed between two agents must
complete through it, and token calls to the API must answer during it.
"""

from __future__ import annotations

import os
import resource
import time

from twisted.internet import defer, protocol, reactor, task
from twisted.trial import unittest

from orchagent.api.connections import ReservedSite, trust, untrusted_cap
from orchagent.seed import listener as R
from tests import seed_support as S
from tests.support.daemon import start_daemon, wait_until

KEY = "flood-proof-seed-key"
FLOOD = 1100
#: systemd's default soft and hard limits... as the issue saw them (soft:hard).
LIMIT = ["prlimit", "--nofile=1024:1024", "--"]
#: Seconds the flood runs before the test's own calls.
SETTLE = 3.0


class _Idle(protocol.Protocol):
    def connectionLost(self, reason=protocol.connectionDone):
        self.factory.lost(self)


class IdleFlood(protocol.ClientFactory):
    """``count`` idle connections to ``port`` from ``source``, kept up until stop()."""

    protocol = _Idle
    noisy = False

    def __init__(self, port: int, count: int = FLOOD, source: str = "127.0.0.2",
                 pause: float = 1.0):
        self.port, self.count, self.source, self.pause = port, count, source, pause
        self.running = False
        self.opened = 0
        self.closed_by_peer = 0
        self.connections: set = set()
        self.connectors: list = []
        self.waiting: set = set()
        self.pacer = None

    def start(self, burst: int = 20, every: float = 0.025) -> None:
        """Open the connections ``burst`` at a time: all at once would overflow the
        agent's listen backlog, and the kernel would hold most of them back for seconds."""
        self.running = True
        left = [self.count]

        def some():
            for _ in range(min(burst, left[0])):
                self._connect()
            left[0] -= burst
            if left[0] <= 0 and self.pacer.running:
                self.pacer.stop()

        self.pacer = task.LoopingCall(some)
        self.pacer.start(every)

    def _connect(self) -> None:
        if self.running:
            self.connectors.append(reactor.connectTCP("127.0.0.1", self.port, self, timeout=5,
                                                      bindAddress=(self.source, 0)))

    def buildProtocol(self, addr):
        self.opened += 1
        p = super().buildProtocol(addr)
        self.connections.add(p)
        return p

    def lost(self, p) -> None:
        self.connections.discard(p)
        if self.running:
            self.closed_by_peer += 1
            self._later()

    def clientConnectionFailed(self, connector, reason):
        if self.running:
            self._later()

    def _later(self) -> None:
        def run():
            self.waiting.discard(call)
            self._connect()

        call = reactor.callLater(self.pause, run)
        self.waiting.add(call)

    def stop(self) -> None:
        self.running = False
        if self.pacer is not None and self.pacer.running:
            self.pacer.stop()
        for call in list(self.waiting):
            call.cancel()
        self.waiting.clear()
        for p in list(self.connections):
            if p.transport is not None:
                p.transport.abortConnection()
        for connector in self.connectors:
            if connector.state == "connecting":
                connector.stopConnecting()


def _open_descriptors(test, wanted: int = 8192) -> None:
    """Let the test process hold the flood (root may raise its own hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
        test.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))


async def _flood(test, port: int) -> IdleFlood:
    _open_descriptors(test)
    flood = IdleFlood(port)
    test.addCleanup(flood.stop)
    flood.start()
    await wait_until(lambda: flood.opened >= FLOOD, timeout=30)
    # The agent takes the connections from its backlog as fast as it can: let it.
    await task.deferLater(reactor, SETTLE, lambda: None)
    return flood


class SeedPortFloodTests(unittest.TestCase):
    timeout = 180

    async def test_keyed_seed_completes_through_a_flood_of_idle_connections(self):
        base = os.path.abspath(self.mktemp())
        src, dst = os.path.join(base, "src"), os.path.join(base, "dst")
        os.makedirs(src)
        os.makedirs(dst)
        total = 32 << 20
        with open(os.path.join(src, "ibdata1"), "wb") as fh:
            fh.write(os.urandom(total))
        for i in range(40):
            with open(os.path.join(src, f"t{i}.ibd"), "wb") as fh:
                fh.write(os.urandom(64 << 10))
        seed_port = S.free_port()
        common = {"MySQLServiceStatusCommand": "false", "SeedTransferPort": seed_port}
        receiver = await start_daemon(self, {**common, "MySQLDatadirCommand": f"echo {dst}"},
                                      directory=os.path.join(base, "receiver"), prefix=LIMIT)
        sender = await start_daemon(self, {**common, "MySQLDatadirCommand": f"echo {src}",
                                           "SeedRateLimitBytesPerSec": 4 << 20},
                                    directory=os.path.join(base, "sender"))
        self.assertEqual(await receiver.get("/api/receive-mysql-seed-data/41", key=KEY), (200, True))
        flood = await _flood(self, seed_port)
        self.assertEqual(await sender.get(f"/api/send-mysql-seed-data/127.0.0.1:{seed_port}/41",
                                          key=KEY, source="datadir"), (200, True))

        async def ended():
            return (await receiver.get("/api/seed-command-completed/41"))[1]

        await wait_until(ended, timeout=90, interval=0.5)
        self.assertTrue(flood.running and flood.opened >= FLOOD)
        code, status = await receiver.get("/api/seed-status/41")
        self.assertEqual((status["State"], status["Error"]), ("completed", ""), status)
        self.assertEqual(await receiver.get("/api/seed-command-succeeded/41"), (200, True))
        with open(os.path.join(src, "ibdata1"), "rb") as a, open(os.path.join(dst, "ibdata1"), "rb") as b:
            self.assertTrue(a.read() == b.read(), "the seeded file differs")
        self.assertNotIn("Too many open files", receiver.output())

    async def test_the_seed_port_listens_only_during_a_receive_and_on_the_bind_address(self):
        base = os.path.abspath(self.mktemp())
        dst = os.path.join(base, "dst")
        os.makedirs(dst)
        seed_port = S.free_port()
        config = {"MySQLServiceStatusCommand": "false", "SeedTransferPort": seed_port,
                  "MySQLDatadirCommand": f"echo {dst}", "SeedBindAddress": "127.0.0.1"}
        agent = await start_daemon(self, config, directory=os.path.join(base, "agent"))

        def listening(address: str) -> bool:
            import socket
            with socket.socket() as s:
                s.settimeout(1)
                return s.connect_ex((address, seed_port)) == 0

        self.assertFalse(listening("127.0.0.1"))
        self.assertEqual(await agent.get("/api/receive-mysql-seed-data/42", key=KEY), (200, True))
        await wait_until(lambda: listening("127.0.0.1"))
        address = _other_address()
        if address is not None:
            self.assertFalse(listening(address), f"the seed port answers on {address}")
        self.assertEqual(await agent.get("/api/abort-seed/42"), (200, True))
        await wait_until(lambda: not listening("127.0.0.1"))
        # After a restart: a receive that was running listens again, and stops with it.
        self.assertEqual(await agent.get("/api/receive-mysql-seed-data/43", key=KEY), (200, True))
        await agent.stop()
        self.assertFalse(listening("127.0.0.1"))
        again = await start_daemon(self, {**config, "HTTPPort": agent.port},
                                   directory=os.path.join(base, "agent"))
        await wait_until(lambda: listening("127.0.0.1"))
        self.assertEqual(await again.get("/api/abort-seed/43"), (200, True))
        await wait_until(lambda: not listening("127.0.0.1"))


def _other_address() -> str | None:
    """An address of this host other than loopback, if it has one."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


class ApiFloodTests(unittest.TestCase):
    timeout = 120

    async def test_token_calls_answer_during_a_flood_of_idle_connections(self):
        agent = await start_daemon(self, {"MySQLPortCommand": "echo 3306"}, prefix=LIMIT)
        flood = await _flood(self, agent.port)
        answered = []
        for _ in range(10):
            started = time.monotonic()
            try:
                code, body = await defer.Deferred.fromCoroutine(
                    agent.get("/api/mysql-port")).addTimeout(10, reactor)
            except Exception as e:
                code, body = None, repr(e)
            answered.append((code, body, time.monotonic() - started))
            await task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual([(c, b) for c, b, _ in answered], [(200, 3306)] * 10, answered)
        self.assertLess(max(t for _, _, t in answered), 5.0, answered)
        self.assertTrue(flood.running and flood.opened >= FLOOD)


class ReserveUnitTests(unittest.TestCase):
    """The bounds themselves, without sockets."""

    def test_caps(self):
        self.assertEqual(untrusted_cap(1024), 256)
        self.assertEqual(untrusted_cap(64), 32)
        self.assertEqual(untrusted_cap(1 << 20), 4096)
        self.assertLessEqual(R.HANDSHAKE_TIMEOUT, 10)

    def test_oldest_idle_untrusted_connection_makes_room(self):
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport
        from twisted.web.resource import Resource

        site = ReservedSite(Resource(), cap=3, timeout=None)
        protocols = []
        for i in range(3):
            p = site.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1000 + i))
            p.makeConnection(StringTransport())
            protocols.append(p)
        trusted = protocols[0]._channel

        class Request:
            channel = trusted

        trust(Request())
        self.assertEqual(len(site.untrusted), 2)
        for i in range(3):
            p = site.buildProtocol(IPv4Address("TCP", "10.0.0.2", 2000 + i))
            p.makeConnection(StringTransport())
        self.assertEqual(site.closed_for_reserve, 2)
        self.assertFalse(protocols[0]._channel.transport.disconnecting)
        self.assertTrue(protocols[1]._channel.transport.disconnecting)
        self.assertEqual(len(site.untrusted), 3)
