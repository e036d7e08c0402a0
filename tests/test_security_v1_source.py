"""#16 item 10: the seed-id oracle of plain v1 seeds (no key, no seed TLS).

A stranger at 127.0.0.2 (an address of loopback the test binds) probes a real receiving
agent's seed port: every refusal — an id the agent is not receiving, the right id from the
wrong host, a key where none is expected — must be the same frames, the same text and
the same delay.  The right id sent first by the stranger must be refused when orchestrator
(the stand-in, serving its API's agent-seed-details) names another source, and the seed
then completes from the named source; without orchestrator, SeedAllowedNetworks decides.
"""

from __future__ import annotations

import os

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from orchagent.seed import auth, frames
from orchagent.seed.frames import FrameType
from orchagent.seed.sources import SeedSources, source_hostname
from tests import seed_support as S
from tests.support.daemon import start_daemon, wait_until
from tests.support.orchestrator import StandInOrchestrator

STRANGER = "127.0.0.2"


class Probe(protocol.Protocol):
    """One handshake as a sender would make it; records what the receiver answers."""

    def __init__(self, seed: str, key: str | None):
        self.handshake = auth.ClientHandshake(seed, "probe", "control", 0,
                                              auth.derive_auth_key(key, seed) if key else None)
        self.splitter = frames.FrameSplitter()
        self.answers: list[FrameType] = []
        self.message = None
        self.auth_sent_at = None
        self.answered_in = None
        self.ended = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.handshake.hello())

    def dataReceived(self, data):
        for frame in self.splitter.feed(data):
            self.answers.append(frame.type)
            if frame.type == FrameType.CHALLENGE:
                self.transport.write(self.handshake.receive(frame))
                self.auth_sent_at = reactor.seconds()
                continue
            if self.auth_sent_at is not None:
                self.answered_in = reactor.seconds() - self.auth_sent_at
            if frame.type == FrameType.REJECT:
                self.message = frames.open_json(frame).get("message")
            self.transport.loseConnection()

    def connectionLost(self, reason=protocol.connectionDone):
        self.ended.callback(None)


async def probe(port: int, seed: str, key: str | None = None, source: str = STRANGER) -> Probe:
    p = Probe(seed, key)
    factory = protocol.ClientFactory.forProtocol(lambda: p)
    reactor.connectTCP("127.0.0.1", port, factory, bindAddress=(source, 0))
    await p.ended.addTimeout(30, reactor)
    return p


class _Seeds:
    async def agents(self, receiver_config: dict):
        base = os.path.abspath(self.mktemp())
        self.src, self.dst = os.path.join(base, "src"), os.path.join(base, "dst")
        os.makedirs(self.src)
        os.makedirs(self.dst)
        with open(os.path.join(self.src, "ibdata1"), "wb") as fh:
            fh.write(os.urandom(3 << 20))
        self.seed_port = S.free_port()
        common = {"MySQLServiceStatusCommand": "false", "SeedTransferPort": self.seed_port}
        self.receiver = await start_daemon(self, {**common, "MySQLDatadirCommand": f"echo {self.dst}",
                                                  **receiver_config},
                                           directory=os.path.join(base, "receiver"))
        self.sender = await start_daemon(self, {**common, "MySQLDatadirCommand": f"echo {self.src}"},
                                         directory=os.path.join(base, "sender"))

    def assert_refused_alike(self, probes: list[Probe]) -> None:
        seen = [(p.answers, p.message) for p in probes]
        self.assertEqual(seen, [([FrameType.CHALLENGE, FrameType.REJECT], auth.REFUSED)] * len(probes))
        times = [p.answered_in for p in probes]
        self.assertTrue(all(0.9 <= t <= 1.6 for t in times), times)

    async def assert_seed_completes(self, seed: str) -> None:
        self.assertEqual(await self.sender.get(
            f"/api/send-mysql-seed-data/127.0.0.1:{self.seed_port}/{seed}", source="datadir"), (200, True))

        async def ended():
            return (await self.receiver.get(f"/api/seed-command-completed/{seed}"))[1]

        await wait_until(ended, timeout=60, interval=0.2)
        code, status = await self.receiver.get(f"/api/seed-status/{seed}")
        self.assertEqual((status["State"], status["Error"]), ("completed", ""), status)
        with open(os.path.join(self.src, "ibdata1"), "rb") as a, \
                open(os.path.join(self.dst, "ibdata1"), "rb") as b:
            self.assertTrue(a.read() == b.read(), "the seeded file differs")


class OracleTests(_Seeds, unittest.TestCase):
    timeout = 120

    async def test_a_stranger_learns_nothing_and_cannot_send_first(self):
        orchestrator = StandInOrchestrator()
        url = await orchestrator.serve(self)
        # orchestrator's SubmitSeedEntry: target db2, source "localhost" (127.0.0.1 here).
        orchestrator.add_seed("7", target="db2", source="localhost")
        await self.agents({"OrchestratorURL": url})
        self.assertEqual(await self.receiver.get("/api/receive-mysql-seed-data/7"), (200, True))
        # The stranger sends first, with the right id: refused like every wrong id.
        probes = [await probe(self.seed_port, "7")]
        for seed in ("1", "6", "8", "70", "07"):
            probes.append(await probe(self.seed_port, seed))
        probes.append(await probe(self.seed_port, "7", key="guessed"))
        probes.append(await probe(self.seed_port, "9", key="guessed"))
        self.assert_refused_alike(probes)
        self.assertEqual(orchestrator.count("agent-seed-details"), 1)  # asked once, at receive
        code, status = await self.receiver.get("/api/seed-status/7")
        self.assertEqual((status["State"], status["BytesDone"]), ("pending", 0))
        self.assertEqual(os.listdir(self.dst), [])
        await self.assert_seed_completes("7")
        self.assertIn("is not localhost, the source orchestrator named for seed 7",
                      self.receiver.output())
        self.assertIn("not receiving seed 70", self.receiver.output())


class AllowedNetworksTests(_Seeds, unittest.TestCase):
    timeout = 120

    async def test_without_orchestrator_only_allowed_networks_may_send(self):
        await self.agents({"SeedAllowedNetworks": ["127.0.0.1/32"]})
        self.assertEqual(await self.receiver.get("/api/receive-mysql-seed-data/12"), (200, True))
        self.assert_refused_alike([await probe(self.seed_port, "12"), await probe(self.seed_port, "13")])
        await self.assert_seed_completes("12")
        self.assertIn("127.0.0.2 is not in SeedAllowedNetworks", self.receiver.output())


class SourcesUnitTests(unittest.TestCase):
    """SeedSources' decisions without sockets (orchestrator's answer and DNS faked)."""

    def sources(self, answer, networks=()):
        from orchagent.config import Config

        calls = []

        def fetch(url):
            calls.append(url)
            if isinstance(answer, Exception):
                return defer.fail(answer)
            return defer.succeed(answer)

        config = Config(orchestrator_url="http://u:p@orch:3000/")
        sources = SeedSources(config, reactor, auth.parse_networks(list(networks)), fetch=fetch,
                              resolver=lambda name: frozenset({"10.0.0.5"}))
        return sources, calls

    async def test_named_source_only(self):
        sources, calls = self.sources(b'[{"SeedId": 3, "SourceHostname": "db1", "TargetHostname": "db2"}]')
        self.assertEqual(sources.url, "http://orch:3000")
        await sources.check("3", "10.0.0.5")
        await sources.check("3", "::ffff:10.0.0.5")
        with self.assertRaises(auth.Rejected):
            await sources.check("3", "10.0.0.6")
        self.assertEqual(calls, ["http://orch:3000/api/agent-seed-details/3"])

    async def test_unknown_seed_falls_back_to_networks(self):
        sources, _ = self.sources(b"[]", networks=["10.1.0.0/16"])
        self.assertIsNone(await sources.check("3", "10.1.2.3"))
        with self.assertRaises(auth.Rejected):
            sources.check("3", "10.2.0.1")

    async def test_orchestrator_that_cannot_answer_refuses_and_is_asked_again(self):
        for answer in (b'{"Code": "ERROR", "Message": "Agents not served"}', b"<html>",
                       ConnectionRefusedError("down")):
            sources, calls = self.sources(answer)
            for _ in range(2):
                with self.assertRaises(auth.Rejected):
                    await sources.check("3", "10.0.0.5")
            self.assertEqual(len(calls), 2)

    def test_source_hostname_shapes(self):
        self.assertEqual(source_hostname({"SeedId": 1, "SourceHostname": "a"}, "1"), "a")
        self.assertEqual(source_hostname([{"SeedId": 1, "SourceHostname": "a"}], "1"), "a")
        self.assertIsNone(source_hostname([], "1"))
        with self.assertRaises(ValueError):
            source_hostname({"Code": "ERROR", "Message": "Unauthorized"}, "1")
