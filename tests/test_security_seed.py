"""The seed port against a hostile sender that holds the right key.

Streams are crafted frame by frame with the engine's own encoder (``frames``, ``auth``):
a sender that passed the handshake sends manifests with absolute paths, ``..``, symlinks
leaving the tree or entries under a symlink, and DATA frames for places the manifest
does not have.  The receiver is a real SeedManager listening on loopback.  Refusals of
unauthenticated and wrong-key senders are in tests/test_seed_transfer.py (AuthTests).
"""

from __future__ import annotations

import os

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from orchagent.seed import auth, frames, tree
from orchagent.seed.frames import FrameType
from tests import seed_support as S

KEY = "hostile-but-keyed"
SEED = "66"


class CraftedSender(protocol.Protocol):
    """Handshake with the engine's ClientHandshake, then send whatever the test says."""

    def __init__(self, seed: str, key: str | None):
        self.handshake = auth.ClientHandshake(seed, "sess-1", "control", 0,
                                              auth.derive_auth_key(key, seed) if key else None)
        self.splitter = frames.FrameSplitter()
        self.accepted = defer.Deferred()
        self.frames: list = []
        self.waiters: list = []
        self.ended = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.handshake.hello())

    def dataReceived(self, data):
        for frame in self.splitter.feed(data):
            if self.handshake.key is None:
                reply = self.handshake.receive(frame)
                if reply is not None:
                    self.transport.write(reply)
                else:
                    self.accepted.callback(self.handshake.key)
                continue
            self.frames.append(frame)
            for waiter in list(self.waiters):
                self.waiters.remove(waiter)
                waiter.callback(frame)

    def next_frame(self) -> defer.Deferred:
        d = defer.Deferred()
        self.waiters.append(d)
        return d.addTimeout(15, reactor)

    def connectionLost(self, reason=protocol.connectionDone):
        self.ended.callback(None)

    def send_manifest(self, entries: list, chunk_size: int = 65536) -> None:
        key = self.handshake.key
        manifest = tree.Manifest(tuple(tree.Entry.from_wire(e) for e in entries), chunk_size)
        self.transport.write(frames.seal_packed(FrameType.MANIFEST, entries, key))
        self.transport.write(frames.seal_json(FrameType.MANIFEST_END, {
            "count": len(entries), "chunk_size": chunk_size, "digest": manifest.digest().hex(),
            "bytes": sum(e[2] for e in entries if e[1] == "f")}, key))


def entry(path, kind="f", size=0, target="", mode=None):
    mode = mode if mode is not None else (0o755 if kind == "d" else 0o644)
    return [path, kind, size, mode, 0, "", "", 0, 0, target, None]


class HostileStreamTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        self.dst = os.path.join(self.base, "data", "mysql")
        os.makedirs(self.dst)
        with open(os.path.join(self.dst, "old.ibd"), "wb") as fh:
            fh.write(b"old data")
        self.outside = os.path.join(self.base, "outside")
        os.makedirs(self.outside)
        self.port = S.free_port()
        self.receiver = S.make_manager(self, os.path.join(self.base, "r"), self.dst, self.port)

    async def connect(self, key=KEY) -> CraftedSender:
        await self.receiver.receive(SEED, key=KEY)
        client = CraftedSender(SEED, key)
        endpoint = f"tcp:127.0.0.1:{self.port}"
        from twisted.internet.endpoints import clientFromString, connectProtocol

        await connectProtocol(clientFromString(reactor, endpoint), client)
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
        await client.accepted
        return client

    def assert_untouched(self):
        self.assertEqual(os.listdir(self.outside), [], "something was written outside the datadir")
        self.assertEqual(sorted(os.listdir(self.dst)), ["old.ibd"])
        with open(os.path.join(self.dst, "old.ibd"), "rb") as fh:
            self.assertEqual(fh.read(), b"old data")
        leftovers = [n for n in os.listdir(os.path.dirname(self.dst)) if "orchagent" in n]
        self.assertEqual(leftovers, [], "staging was left behind")
        self.assertFalse(os.path.exists(os.path.join(self.base, "pwned")))

    async def refused(self, entries, expect: str):
        client = await self.connect()
        client.send_manifest(entries)
        status = await S.finished(self.receiver, SEED)
        self.assertEqual(status["State"], "failed")
        self.assertIn(expect, status["Error"])
        await S.wait_for(lambda: SEED not in self.receiver.jobs)
        self.assert_untouched()
        return status

    async def test_absolute_paths_are_refused(self):
        for path in (os.path.join(self.outside, "f"), "/etc/cron.d/pwned"):
            await self.refused([entry("db", "d"), entry(path, size=4)], "unsafe path")
            self.receiver.records.pop(SEED)

    async def test_dot_dot_is_refused(self):
        for path in ("../pwned", "db/../../pwned", "../../outside/f", "db/./../x"):
            await self.refused([entry("db", "d"), entry(path, size=4)], "unsafe path")
            self.receiver.records.pop(SEED)

    async def test_symlinks_out_of_the_tree_are_refused(self):
        for target in (self.outside, "../../outside", "db/../../.."):
            await self.refused([entry("db", "d"), entry("db/l", "l", target=target)], "points outside")
            self.receiver.records.pop(SEED)

    async def test_entry_under_a_symlink_is_refused(self):
        await self.refused([entry("l", "l", target="db"), entry("db", "d"), entry("l/f", size=3)],
                           "not under a directory")

    async def test_data_for_places_the_manifest_lacks(self):
        """After READY: DATA for a file index that does not exist, beyond a file's end, or
        for a directory entry; none may create or grow anything."""
        for file_index, offset, payload in ((7, 0, b"zzzz"), (1, 1 << 40, b"zzzz"),
                                            (0, 0, b"zzzz"), (1, 2, b"zzzzzzz")):
            client = await self.connect()
            client.send_manifest([entry("db", "d"), entry("db/t.ibd", size=4)])
            ready = await client.next_frame()
            self.assertEqual(ready.type, FrameType.READY)
            pieces, _, _ = frames.seal_chunk(file_index, offset, payload, client.handshake.key, False)
            client.transport.write(b"".join(bytes(p) for p in pieces))
            await client.ended
            status = await self.receiver.status(SEED)
            self.assertEqual(status["BytesDone"], 0, (file_index, offset))
            staged = [os.path.join(d, f) for d, _, fs in os.walk(os.path.dirname(self.dst)) for f in fs]
            self.assertTrue(all(os.path.getsize(p) <= 4 for p in staged if "orchagent-seed" in p), staged)
            await self.receiver.abort(SEED)
            await S.wait_for(lambda: SEED not in self.receiver.jobs)
            self.assert_untouched()
            self.receiver.records.pop(SEED)

    async def test_frames_before_the_handshake_write_nothing(self):
        await self.receiver.receive(SEED, key=KEY)
        replies = []

        class Raw(protocol.Protocol):
            def connectionMade(self):
                key = bytes(32)
                self.transport.write(frames.seal_packed(FrameType.MANIFEST, [entry("x", size=1)], key))
                pieces, _, _ = frames.seal_chunk(0, 0, b"x", key, False)
                self.transport.write(b"".join(bytes(p) for p in pieces))

            def dataReceived(self, data):
                replies.append(data)

            def connectionLost(self, reason):
                self.factory.done.callback(None)

        factory = protocol.ClientFactory.forProtocol(Raw)
        factory.done = defer.Deferred()
        reactor.connectTCP("127.0.0.1", self.port, factory)
        await factory.done
        self.assertEqual((await self.receiver.status(SEED))["State"], "pending")
        self.assertEqual(sorted(os.listdir(self.dst)), ["old.ibd"])
        self.assertEqual([n for n in os.listdir(os.path.dirname(self.dst)) if "orchagent" in n], [])
