"""The seed port against a hostile sender that holds the right key.

Streams are crafted frame by frame with the engine's own encoder (``frames``, ``auth``):
a sender that passed the handshake sends manifests with absolute paths, ``..``, symlinks
leaving the tree or entries under a symlink, and DATA frames for places the manifest
does not have.  The receiver is a real SeedManager listening on loopback.  Refusals of
unauthenticated and wrong-key senders are in tests/test_seed_transfer.py (AuthTests).
"""

from __future__ import annotations

import os
import shutil
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from orchagent.errors import BadRequest
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


def chain_entries(levels: int, climbs: int) -> tuple[list, str]:
    """#16 item 8's tree as manifest entries: directories ``x0/.../x<levels-1>`` each
    holding ``s -> .``, a link ``L`` at the bottom climbing ``levels`` times through
    ``s/..`` then ``climbs`` times through ``..`` to ``etc/passwd``, and
    ``mysql/user.MYD -> ../x0/.../L``; and the path of ``L``."""
    entries = [entry("ibdata1", size=0), entry("mysql", "d"), entry("mysql/user.frm")]
    path = ""
    for level in range(levels):
        path = f"{path}/x{level}" if path else f"x{level}"
        entries += [entry(path, "d"), entry(f"{path}/s", "l", target=".")]
    target = "s/../" * levels + "../" * climbs + "etc/passwd"
    entries += [entry(f"{path}/L", "l", target=target), entry("mysql/user.MYD", "l", target=f"../{path}/L")]
    entries.sort(key=lambda e: e[0])
    return entries, f"{path}/L"


def make_chain(root: str, levels: int, climbs: int) -> str:
    """:func:`chain_entries`' tree on disk under ``root``; the path of mysql/user.MYD."""
    for item in chain_entries(levels, climbs)[0]:
        path = os.path.join(root, item[0])
        if item[1] == "d":
            os.makedirs(path, exist_ok=True)
        elif item[1] == "l":
            os.symlink(item[9], path)
        else:
            open(path, "w").close()
    return os.path.join(root, "mysql", "user.MYD")


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

    async def test_a_symlink_chain_climbing_through_links_is_refused(self):
        """#16 item 8: ``s -> .`` in every directory makes ``s/..`` climb a level, which a
        lexical check takes for no move at all; the chain and the link to it are refused."""
        entries, chain_link = chain_entries(7, 7)
        for listed in (entries, [e for e in entries if e[0] != "mysql/user.MYD"]):
            status = await self.refused(listed, "points outside the seeded tree when followed")
            self.assertIn(chain_link, status["Error"])
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


class SymlinkChainSeedTests(unittest.TestCase):
    """#16 item 8 with two real SeedManagers on loopback and the chain on disk."""

    timeout = 60

    async def test_a_seed_of_a_tree_whose_links_escape_is_refused_on_both_sides(self):
        base = os.path.abspath(self.mktemp())
        src, dst = os.path.join(base, "src"), os.path.join(base, "data", "mysql")
        os.makedirs(src)
        os.makedirs(dst)
        with open(os.path.join(dst, "old.ibd"), "wb") as fh:
            fh.write(b"old data")
        levels = max(7, len(os.path.realpath(dst).split("/")))
        user_myd = make_chain(src, levels, levels)
        with open(user_myd) as a, open("/etc/passwd") as b:
            self.assertEqual(a.read(), b.read(), "the chain must really lead to /etc/passwd")
        port = S.free_port()
        r = S.make_manager(self, os.path.join(base, "r"), dst, port)
        s = S.make_manager(self, os.path.join(base, "s"), src, port, snapshot=src)
        await r.receive("8", key=KEY)
        await s.send(f"127.0.0.1:{port}", "8", key=KEY, source="datadir")
        sent = await S.finished(s, "8")
        got = await S.finished(r, "8", timeout=15)
        self.assertFalse(os.path.lexists(os.path.join(dst, "mysql", "user.MYD")),
                         "the datadir got the link to /etc/passwd")
        self.assertEqual(sent["State"], "failed", sent)
        self.assertIn("mysql/user.MYD", sent["Error"])
        self.assertIn("points outside the seeded tree when followed", sent["Error"])
        self.assertNotEqual(got["State"], "completed", got)
        self.assertEqual(sorted(os.listdir(dst)), ["old.ibd"])
        self.assertEqual([n for n in os.listdir(os.path.dirname(dst)) if "orchagent" in n], [])
        with self.assertRaises(BadRequest) as caught:
            tree.walk(src)
        self.assertIn("'mysql/user.MYD' points outside the seeded tree when followed",
                      caught.exception.message)


_NAMES = ["a", "b", "c", "f", "l0", "l1", "l2", "l3", "l4", "..", ".", ".."]
_DIRS = ["", "a", "a/b", "c"]


class LinkResolutionTests(unittest.TestCase):
    """tree.check_links against the kernel: small trees of directories, files and links
    with random relative targets are made on disk and every link followed for real
    (``O_PATH``).  Accepted: no link leads out.  Refused: some link leads out, or some
    link leads nowhere today (dangling, a loop) and the check took the stricter view
    (a part the tree lacks taken lexically, as if a directory were made there later)."""

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.tuples(st.sampled_from(_DIRS), st.lists(st.sampled_from(_NAMES), min_size=1, max_size=6)),
                    min_size=1, max_size=5))
    def test_verdict_matches_the_kernel(self, links):
        base = os.path.realpath(self.mktemp())
        root = os.path.join(base, "o1", "o2", "tree")
        entries = [entry(d, "d") for d in _DIRS[1:]] + [entry("f"), entry("a/f")]
        for number, (directory, parts) in enumerate(links):
            path = f"{directory}/l{number}" if directory else f"l{number}"
            entries.append(entry(path, "l", target="/".join(parts)))
        try:
            for item in entries:
                path = os.path.join(root, item[0])
                if item[1] == "d":
                    os.makedirs(path, exist_ok=True)
                elif item[1] == "l":
                    os.symlink(item[9], path)
                else:
                    open(path, "w").close()
            os.makedirs(root, exist_ok=True)
            inside, all_resolve = True, True
            for item in entries:
                if item[1] != "l":
                    continue
                try:  # where the kernel's own resolution ends, if it does
                    fd = os.open(os.path.join(root, item[0]), os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    all_resolve = False
                    continue
                real = os.readlink(f"/proc/self/fd/{fd}")
                os.close(fd)
                if real != root and not real.startswith(root + "/"):
                    inside = False
            manifest = tree.Manifest(tuple(tree.Entry.from_wire(e) for e in entries), 65536)
            try:
                tree.check_links(manifest)
                accepted = True
            except BadRequest:
                accepted = False
            if accepted:
                self.assertTrue(inside, f"accepted, but a link leads out: {links}")
            elif all_resolve:
                self.assertFalse(inside, f"refused, but every link stays inside: {links}")
        finally:
            shutil.rmtree(base)

    def test_large_manifests(self):
        """50,000 entries: links that do not climb are not resolved at all; 25,000 links
        that do, each through another, are resolved once each (seconds would mean the
        resolution went quadratic)."""
        entries = [tree.Entry(path=f"d{i}", kind="d") for i in range(50)]
        entries += [tree.Entry(path=f"d{i % 50}/f{i}", kind="f") for i in range(25_000)]
        links = [tree.Entry(path=f"d{i % 50}/l{i}", kind="l", target=f"f{i + 50}") for i in range(25_000)]
        tree.check_links(tree.Manifest(entries + links, 65536))
        climbing = [tree.Entry(path=f"d{i % 50}/l{i}", kind="l",
                               target=f"../d{(i + 1) % 50}/l{i + 1}" if i < 24_999 else "../d0/f0")
                    for i in range(25_000)]
        manifest = tree.Manifest(entries + climbing, 65536)
        started = time.monotonic()
        self.assertRaises(BadRequest, tree.check_links, manifest)  # nested over 40 deep
        climbing = [tree.Entry(path=f"d{i % 50}/l{i}", kind="l", target=f"../d{(i + 1) % 50}/f{i + 1}")
                    for i in range(25_000)]
        tree.check_links(tree.Manifest(entries + climbing, 65536))
        self.assertLess(time.monotonic() - started, 5)
