"""Seeds between two real SeedManagers over real TCP on loopback."""

from __future__ import annotations

import errno
import os
import stat
import threading
import time

from twisted.internet import defer, protocol, reactor, task, threads
from twisted.trial import unittest

from orchagent import durable
from orchagent.errors import NotAvailable, NotFound, Refused
from orchagent.process import ProcessRunner
from orchagent.seed import auth, frames, sender, tree, tree_receive
from orchagent.seed.frames import FrameType
from orchagent.seed.manager import SeedManager
from orchagent.seed.staging import Staging
from orchagent.seed.stream import Stream
from tests import seed_support as S
from tests.support.certs import TestCA, seed_tls

STATUS_KEYS = {"SeedId", "Role", "State", "BytesTotal", "BytesDone", "FilesTotal", "FilesDone",
               "RateBytesPerSec", "EtaSeconds", "Resumes", "Error", "StartedAt", "UpdatedAt",
               "Totals"}
CHUNK = 64 * 1024


class SeedCase(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        self.src = os.path.join(self.base, "src")
        self.dst = os.path.join(self.base, "dst")
        os.makedirs(self.src)
        os.makedirs(self.dst)
        self.port = S.free_port()
        self.patch(sender, "BACKOFF_FIRST", 0.05)

    def receiver(self, name="r", **overrides) -> SeedManager:
        return S.make_manager(self, os.path.join(self.base, name), self.dst, self.port, **overrides)

    def sender(self, name="s", **overrides) -> SeedManager:
        overrides.setdefault("chunk_size", CHUNK)
        return S.make_manager(self, os.path.join(self.base, name), self.src, self.port,
                              snapshot=self.src, **overrides)

    def assert_untouched(self, before: dict) -> None:
        self.assertEqual(S.snapshot_tree(self.dst), before)
        leftovers = [n for n in os.listdir(self.base) if "orchagent-seed" in n]
        self.assertEqual(leftovers, [])

    def big_file(self, name="big.ibd", size=1_500_000, compressible=False):
        data = bytes(size) if compressible else os.urandom(size)
        with open(os.path.join(self.src, name), "wb") as fh:
            fh.write(data)
        return data


class HappyPathTests(SeedCase):
    async def test_a_manifest_batch_that_fills_the_transport_while_the_walk_goes_on(self):
        """A batch over the transport's 64 KiB buffer pauses the control stream at once
        and resumes it when the socket took it, while the walk is still going (here held
        up after the first batch): the resumed stream has no chunk table yet, and the
        session goes on (trial fails a test that logs an error)."""
        for i in range(6000):
            with open(os.path.join(self.src, f"{os.urandom(24).hex()}.ibd"), "wb") as fh:
                fh.write(b"x")
        self.patch(tree, "WALK_BATCH", 3000)
        pack_new = tree.ManifestPacker.pack_new
        calls = []

        def slow_after_the_first(packer, batch=4096):
            bodies = pack_new(packer, batch)
            calls.append(len(bodies[0]) if bodies else 0)
            if len(calls) == 1:
                time.sleep(0.3)  # worker thread: the walk is held up, not the reactor
            return bodies

        self.patch(tree.ManifestPacker, "pack_new", slow_after_the_first)
        r = self.receiver()
        s = self.sender(seed_streams=1)
        await r.receive("big-manifest")
        await s.send(f"127.0.0.1:{self.port}", "big-manifest", source="datadir")
        status = await S.finished(r, "big-manifest")
        self.assertEqual(status["State"], "completed", status["Error"])
        self.assertEqual(status["Resumes"], 0)
        self.assertGreater(calls[0], 64 << 10)
        self.assertEqual(S.snapshot_tree(self.dst), S.snapshot_tree(self.src))

    async def test_staging_is_written_back_while_the_seed_goes_on(self):
        """Every WRITEBACK_BYTES received, one background syncfs of staging (not two at
        once); the tree is the same."""
        S.make_tree(self.src, files=30)
        passes, running = [], []

        def counting_syncfs(path):
            self.assertEqual(running, [], "two write-backs at once")
            running.append(path)
            try:
                passes.append(path)
            finally:
                running.pop()

        self.patch(tree_receive, "WRITEBACK_BYTES", 256 << 10)
        self.patch(Staging, "write_back", lambda staging: counting_syncfs(staging.root))
        r = self.receiver()
        s = self.sender()
        await r.receive("wb")
        staging = r.jobs["wb"].staging.root
        await s.send(f"127.0.0.1:{self.port}", "wb", source="datadir")
        status = await S.finished(r, "wb")
        self.assertEqual(status["State"], "completed", status["Error"])
        self.assertGreaterEqual(len(passes), 3)
        self.assertLessEqual(len(passes), status["BytesTotal"] // (256 << 10) + 1)
        self.assertEqual(set(passes), {staging})
        self.assertEqual(S.snapshot_tree(self.dst), S.snapshot_tree(self.src))

    async def test_seed_reproduces_the_tree(self):
        S.make_tree(self.src)
        r = self.receiver()
        s = self.sender(seed_streams=3, seed_compression="zstd")
        self.assertTrue(await r.receive("7", key="k3y"))
        self.assertTrue(await s.send(f"127.0.0.1:{self.port}", "7", key="k3y", source="snapshot"))
        status = await S.finished(r, "7")
        self.assertEqual(status["State"], "completed", status["Error"])
        sent = await S.finished(s, "7")
        self.assertEqual(set(status), STATUS_KEYS | {"Replication"})
        self.assertEqual((sent["Role"], status["Role"]), ("sender", "receiver"))
        self.assertEqual(status["BytesDone"], status["BytesTotal"])
        self.assertEqual(status["FilesDone"], status["FilesTotal"])
        self.assertTrue(await r.completed("7") and await r.succeeded("7"))
        self.assertTrue(await s.completed("7") and await s.succeeded("7"))
        self.assertEqual(S.snapshot_tree(self.dst), S.snapshot_tree(self.src))
        sparse = os.stat(os.path.join(self.dst, "db1", "sparse.ibd"))
        self.assertLess(sparse.st_blocks * 512, sparse.st_size // 2, "the sparse file was filled")
        self.assertEqual(os.stat(os.path.join(self.dst, "hole_only")).st_blocks, 0)
        self.assertEqual([n for n in os.listdir(self.base) if "orchagent" in n], [])
        # The receiver keeps the key until it sees the sender close after reading RESULT,
        # which can come after the sender's own end (its connectionLost is the next event).
        seeds = os.path.join(self.base, "r", "state", "seeds")
        await S.wait_for(lambda: "7" not in r.completed_receives, timeout=5)
        self.assertEqual(sorted(os.listdir(seeds)), ["7.json"])
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.base, "r", "state")).st_mode), 0o700)

    async def test_many_small_files_travel_in_bundles(self):
        os.makedirs(os.path.join(self.src, "db"))
        for i in range(300):
            data = os.urandom(700) + bytes(i * 7) if i % 2 else os.urandom(1500 + i)
            with open(os.path.join(self.src, "db", f"t{i:03d}.frm"), "wb") as fh:
                fh.write(data)
            os.chmod(os.path.join(self.src, "db", f"t{i:03d}.frm"), 0o640 if i % 3 else 0o600)
        bundles = []
        original = frames.seal_bundle
        self.patch(frames, "seal_bundle", lambda *a: bundles.append(a[0]) or original(*a))
        r = self.receiver()
        s = self.sender(seed_streams=2, seed_compression="zstd")
        await r.receive("15", key="k")
        await s.send(f"127.0.0.1:{self.port}", "15", key="k", source="datadir")
        status = await S.finished(r, "15")
        self.assertEqual(status["State"], "completed", status["Error"])
        self.assertEqual(status["FilesDone"], 300)
        self.assertEqual(S.snapshot_tree(self.dst), S.snapshot_tree(self.src))
        self.assertEqual(sum(len(b) for b in bundles), 300)
        self.assertLess(len(bundles), 20)

    async def test_large_file_is_split_between_streams(self):
        data = self.big_file(size=2_000_000)
        r = self.receiver()
        s = self.sender(seed_streams=3)
        await r.receive("8")
        await s.send(f"127.0.0.1:{self.port}", "8", source="datadir")
        job = s.jobs["8"]
        self.assertEqual((await S.finished(r, "8"))["State"], "completed")
        used = [i for i, n in job.stream_bytes.items() if n]
        self.assertGreaterEqual(len(used), 2, job.stream_bytes)
        with open(os.path.join(self.dst, "big.ibd"), "rb") as fh:
            self.assertEqual(fh.read(), data)

    async def test_compression_shrinks_the_wire_and_auto_skips_loopback(self):
        self.big_file(size=1_000_000, compressible=True)
        counted = {}
        original = frames.seal_chunk

        def counting(*args, **kwargs):
            result = original(*args, **kwargs)
            counted.setdefault("wire", 0)
            counted["wire"] += sum(len(p) for p in result[0])
            return result

        self.patch(frames, "seal_chunk", counting)
        for seed, setting in (("c1", "zstd"), ("c2", "auto")):
            counted["wire"] = 0
            for name in os.listdir(self.dst):
                os.unlink(os.path.join(self.dst, name))
            r = self.receiver(name=f"r{seed}")
            s = self.sender(name=f"s{seed}", seed_compression=setting)
            await r.receive(seed)
            await s.send(f"127.0.0.1:{self.port}", seed, source="datadir")
            self.assertEqual((await S.finished(r, seed))["State"], "completed")
            await r.stopService()
            await s.stopService()
            if setting == "zstd":
                self.assertLess(counted["wire"], 100_000)
            else:
                self.assertGreater(counted["wire"], 1_000_000)

    async def test_rate_limit_changes_during_the_seed(self):
        self.big_file(size=1_200_000)
        r = self.receiver()
        s = self.sender(seed_rate_limit_bytes_per_sec=200_000)
        await r.receive("9")
        await s.send(f"127.0.0.1:{self.port}", "9", source="datadir")
        await task.deferLater(reactor, 1.0, lambda: None)
        status = await r.status("9")
        self.assertEqual(status["State"], "running")
        self.assertLess(status["BytesDone"], 600_000)
        self.assertTrue(await s.set_rate_limit("9", 0))
        started = reactor.seconds()
        self.assertEqual((await S.finished(r, "9"))["State"], "completed")
        self.assertLess(reactor.seconds() - started, 3)

    async def test_rate_limit_on_the_receiving_side(self):
        self.big_file(size=1_200_000)
        r = self.receiver()
        s = self.sender()
        await r.receive("16")
        self.assertTrue(await r.set_rate_limit("16", 200_000))
        await s.send(f"127.0.0.1:{self.port}", "16", source="datadir")
        await task.deferLater(reactor, 1.0, lambda: None)
        self.assertLess((await r.status("16"))["BytesDone"], 600_000)
        await r.set_rate_limit("16", 0)
        self.assertEqual((await S.finished(r, "16"))["State"], "completed")

    async def test_datadir_not_empty_is_kept_aside(self):
        self.big_file(size=10_000)
        with open(os.path.join(self.dst, "old.cnf"), "w") as fh:
            fh.write("keep me")
        r = self.receiver()
        s = self.sender()
        await r.receive("10")
        await s.send(f"127.0.0.1:{self.port}", "10", source="datadir")
        self.assertEqual((await S.finished(r, "10"))["State"], "completed")
        self.assertEqual(sorted(os.listdir(self.dst)), ["big.ibd"])
        aside = os.path.join(self.base, ".dst.orchagent-previous-10", "old.cnf")
        with open(aside) as fh:
            self.assertEqual(fh.read(), "keep me")

    async def test_restarted_agent_still_reports_finished_seeds(self):
        self.big_file(size=10_000)
        r = self.receiver()
        s = self.sender()
        await r.receive("11")
        await s.send(f"127.0.0.1:{self.port}", "11", source="datadir")
        await S.finished(r, "11")
        await r.stopService()
        again = self.receiver()
        self.assertTrue(await again.succeeded("11"))
        self.assertEqual((await again.status("11"))["BytesTotal"], 10_000)


class RefusalTests(SeedCase):
    async def test_receive_refuses_while_mysql_runs(self):
        r = self.receiver()
        r.mysql.running = True
        with self.assertRaises(Refused) as caught:
            await r.receive("1")
        self.assertIn("MySQL is running", caught.exception.message)
        # Nothing started; the refusal is remembered so that orchestrator, which never reads
        # the error status, sees the seed completed and failed at its next poll.
        status = await r.status("1")
        self.assertEqual((status["State"], status["Role"], status["BytesTotal"]), ("failed", "receiver", 0))
        self.assertIn("refused: MySQL is running", status["Error"])
        self.assertEqual((await r.completed("1"), await r.succeeded("1")), (True, False))
        self.assertFalse(r.jobs)

    async def test_a_refusal_leaves_a_running_seed_alone(self):
        r = self.receiver()
        self.assertTrue(await r.receive("1"))
        with self.assertRaises(Refused):
            await r.send("127.0.0.1", "1", source="datadir")
        self.assertEqual((await r.status("1"))["State"], "pending")
        await r.abort("1")

    async def test_send_sources(self):
        s = self.sender()
        with self.assertRaises(NotAvailable) as caught:
            await s.send("127.0.0.1", "1", source="hot")
        self.assertIn("hot seeds are not available", caught.exception.message)
        s.snapshots.mount = S.Snapshots(self.src, mounted=False).mount
        with self.assertRaises(Refused) as caught:
            await s.send("127.0.0.1", "1", source="snapshot")
        self.assertIn("no snapshot is mounted", caught.exception.message)
        s.mysql.running = True
        with self.assertRaises(Refused) as caught:
            await s.send("127.0.0.1", "1", source="datadir")
        self.assertIn("MySQL is running", caught.exception.message)

    async def test_unknown_seed_is_not_found(self):
        s = self.sender()
        with self.assertRaises(NotFound) as caught:
            await s.status("nope")
        self.assertIn("no seed nope", caught.exception.message)
        with self.assertRaises(NotFound):
            await s.set_rate_limit("nope", 5)
        # The v1 calls answer as the original did for a seed it never heard of.
        self.assertEqual((await s.completed("nope"), await s.succeeded("nope"), await s.abort("nope")),
                         (False, False, True))
        self.assertEqual(s.all_status(), [])


class AuthTests(SeedCase):
    async def _refused(self, r, s, send_key=None, expect=auth.REFUSED):
        """Every refusal gives the sender the same answer (the receiver logs the reason)."""
        self.big_file(size=300_000)
        before = S.snapshot_tree(self.dst)
        await s.send(f"127.0.0.1:{self.port}", "5", key=send_key, source="datadir")
        status = await S.finished(s, "5")
        self.assertEqual(status["State"], "failed")
        self.assertIn(expect, status["Error"])
        self.assert_untouched(before)
        self.assertEqual((await r.status("5"))["BytesDone"], 0)
        self.assertFalse(await r.completed("5"))
        return status

    async def test_wrong_key_writes_nothing(self):
        r = self.receiver()
        await r.receive("5", key="right")
        await self._refused(r, self.sender(), send_key="wrong")

    async def test_missing_key_writes_nothing(self):
        r = self.receiver()
        await r.receive("5", key="right")
        await self._refused(r, self.sender())

    async def test_peer_outside_allowed_networks_writes_nothing(self):
        r = self.receiver(seed_allowed_networks=["192.0.2.0/24"])
        await r.receive("5")
        await self._refused(r, self.sender())

    async def test_mutual_tls(self):
        ca = TestCA(os.path.join(self.base, "ca"))
        data = self.big_file(size=500_000)
        r = self.receiver(**seed_tls(ca, "r"))
        s = self.sender(**seed_tls(ca, "s"))
        await r.receive("6")
        await s.send(f"127.0.0.1:{self.port}", "6", source="datadir")
        self.assertEqual((await S.finished(r, "6"))["State"], "completed")
        with open(os.path.join(self.dst, "big.ibd"), "rb") as fh:
            self.assertEqual(fh.read(), data)

    async def test_certificate_from_another_ca_writes_nothing(self):
        ca = TestCA(os.path.join(self.base, "ca"))
        other = TestCA(os.path.join(self.base, "other"), name="someone else")
        r = self.receiver(**seed_tls(ca, "r"))
        await r.receive("5")
        await self._refused(r, self.sender(**seed_tls(other, "s")), expect="")

    async def test_garbage_and_unknown_seeds_are_refused(self):
        r = self.receiver()
        await r.receive("5", key="k")
        replies = []

        class Client(protocol.Protocol):
            def connectionMade(self):
                self.splitter = frames.FrameSplitter()
                self.transport.write(self.factory.payload)

            def dataReceived(self, data):
                for frame in self.splitter.feed(data):
                    replies.append(frame)
                    if frame.type == FrameType.CHALLENGE:
                        self.transport.write(self.factory.handshake.receive(frame))

            def connectionLost(self, reason):
                self.factory.done.callback(None)

        # An unknown seed is answered CHALLENGE like any other, and refused after AUTH.
        unknown = auth.ClientHandshake("99", "x", "control", 0, auth.derive_auth_key("k", "99"))
        for payload in (b"GET / HTTP/1.0\r\n\r\n" * 3, unknown.hello()):
            factory = protocol.ClientFactory.forProtocol(Client)
            factory.payload, factory.done, factory.handshake = payload, defer.Deferred(), unknown
            reactor.connectTCP("127.0.0.1", self.port, factory)
            await factory.done
        self.assertEqual([f.type for f in replies], [FrameType.CHALLENGE, FrameType.REJECT])
        self.assertEqual(frames.open_json(replies[-1])["message"], auth.REFUSED)
        self.assertEqual((await r.status("5"))["State"], "pending")
        self.assertEqual(os.listdir(self.dst), [])


class FlippingProxy(protocol.Protocol):
    """Forwards to the receiver, flipping the byte at ``flip_at`` of each client stream
    (only in the first ``times`` connections)."""

    def connectionMade(self):
        self.transport.pauseProducing()
        self.seen = 0
        self.factory.count += 1
        self.flip = self.factory.count <= self.factory.times
        self.peer = None
        client = protocol.ClientCreator(reactor, _Back, self)
        client.connectTCP("127.0.0.1", self.factory.target).addCallbacks(
            self._connected, lambda failure: self.transport.loseConnection())

    def _connected(self, back):
        self.peer = back
        self.transport.resumeProducing()

    def dataReceived(self, data):
        if self.flip and self.seen <= self.factory.flip_at < self.seen + len(data):
            data = bytearray(data)
            data[self.factory.flip_at - self.seen] ^= 0x40
            data = bytes(data)
            self.factory.flipped += 1
        self.seen += len(data)
        self.peer.transport.write(data)

    def connectionLost(self, reason):
        if self.peer is not None:
            self.peer.transport.loseConnection()


class _Back(protocol.Protocol):
    def __init__(self, front):
        self.front = front

    def dataReceived(self, data):
        self.front.transport.write(data)

    def connectionLost(self, reason):
        self.front.transport.loseConnection()


class FailureTests(SeedCase):
    def proxy(self, times: int, flip_at: int = 4000) -> int:
        factory = protocol.Factory.forProtocol(FlippingProxy)
        factory.target, factory.count, factory.times = self.port, 0, times
        factory.flip_at, factory.flipped = flip_at, 0
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.proxy_factory = factory
        return port.getHost().port

    async def test_a_write_error_that_a_background_pass_met_fails_the_seed(self):
        """The kernel reports a writeback error to one syncfs only (the file system's
        error sequence is marked seen): when a background pass meets it, the final
        syncfs of staging finds nothing.  The pass ignored it, and the seed completed
        with data that never reached the disk; now the pass fails the seed.  (The
        once-only report is the kernel's; aimed here by failing the first syncfs of
        staging, as tests.test_seed_disk's lossy disk cannot be made to stop failing
        at the right moment.)"""
        S.make_tree(self.src, files=30)
        real, calls = durable._syncfs, []

        def reported_once(fd, path):
            calls.append(path)
            if len(calls) == 1:
                raise OSError(errno.EIO, "Input/output error", path)
            real(fd, path)

        self.patch(tree_receive, "WRITEBACK_BYTES", 256 << 10)
        self.patch(durable, "_syncfs", reported_once)
        before = S.snapshot_tree(self.dst)
        r = self.receiver()
        s = self.sender()
        await r.receive("lost")
        await s.send(f"127.0.0.1:{self.port}", "lost", source="datadir")
        status = await S.finished(r, "lost")
        self.assertEqual(status["State"], "failed")
        self.assertRegex(status["Error"], r"^the file system of .*orchagent-seed-lost reported a write "
                         r"error \(EIO: Input/output error\) while the seed's staged copy was "
                         "written: it may not be on disk$")
        await S.wait_for(lambda: "lost" not in r.jobs)
        self.assertEqual(S.snapshot_tree(self.dst), before)

    async def test_a_source_that_cannot_be_walked_aborts_the_receiver_too(self):
        """The walk fails (a symlink out of the source) before or after the control
        stream's handshake; either way the sender tells the receiver, which ends aborted
        with the reason instead of waiting for a resume, and writes nothing."""
        walk = tree.walk
        for name, delay in (("early", 0.0), ("late", 0.3)):
            with self.subTest(name):
                os.symlink("/etc/passwd", os.path.join(self.src, f"escape-{name}"))

                def slow_walk(*args, delay=delay, **kwargs):
                    time.sleep(delay)  # worker thread: the handshake is done by then
                    return walk(*args, **kwargs)

                self.patch(tree, "walk", slow_walk)
                before = S.snapshot_tree(self.dst)
                r = self.receiver(f"r-{name}")
                s = self.sender(f"s-{name}", seed_streams=1)
                await r.receive(name, key="k")
                await s.send(f"127.0.0.1:{self.port}", name, key="k", source="datadir")
                sent = await S.finished(s, name)
                self.assertEqual(sent["State"], "failed")
                self.assertIn("symlink", sent["Error"])
                got = await S.finished(r, name, timeout=10)
                self.assertEqual(got["State"], "aborted", got["Error"])
                self.assertIn("symlink", got["Error"])
                self.assert_untouched(before)
                await r.stopService()
                await s.stopService()
                os.unlink(os.path.join(self.src, f"escape-{name}"))

    async def test_flipped_byte_is_sent_again(self):
        data = self.big_file(size=600_000)
        proxy_port = self.proxy(times=1)
        r = self.receiver()
        s = self.sender(seed_streams=1)
        await r.receive("3", key="k")
        await s.send(f"127.0.0.1:{proxy_port}", "3", key="k", source="datadir")
        status = await S.finished(r, "3")
        self.assertEqual(status["State"], "completed", status["Error"])
        self.assertEqual(self.proxy_factory.flipped, 1)
        self.assertGreaterEqual(status["Resumes"], 1)
        with open(os.path.join(self.dst, "big.ibd"), "rb") as fh:
            self.assertEqual(fh.read(), data)

    async def test_manifest_broken_mid_way_is_sent_again_whole(self):
        """The manifest travels in many batches while the source is walked; a flipped
        byte in one of them ends the session before MANIFEST_END, and the next session
        sends every batch again (the receiver drops what it had read), read back from
        where the sender keeps them a few at a time."""
        S.make_tree(self.src, files=40, max_size=20_000)
        self.patch(tree, "WALK_BATCH", 4)
        self.patch(sender, "MANIFEST_BATCH", 3)
        self.patch(sender, "RESEND_BATCHES", 2)
        batches = []
        read_batch = tree_receive.TreeReceive._read_batch
        self.patch(tree_receive.TreeReceive, "_read_batch",
                   lambda payload, stream, session, body: (batches.append(body),
                                                           read_batch(payload, stream, session, body)))
        # The flip must land in a MANIFEST batch, not in a bundle sent early.
        self.patch(tree_receive.TreeReceive, "_allow_early", lambda *args: None)
        proxy_port = self.proxy(times=1, flip_at=1500)
        r = self.receiver()
        s = self.sender(seed_streams=1)
        await r.receive("9", key="k")
        await s.send(f"127.0.0.1:{proxy_port}", "9", key="k", source="datadir")
        job = s.jobs["9"]
        status = await S.finished(r, "9")
        self.assertEqual(status["State"], "completed", status["Error"])
        self.assertEqual(self.proxy_factory.flipped, 1)
        self.assertGreaterEqual(status["Resumes"], 1)
        whole = len(job.batch_ends)
        self.assertGreater(whole, 10)
        # The first session broke part-way through the manifest, the second sent it whole.
        self.assertTrue(whole < len(batches) < 2 * whole, (len(batches), whole))
        self.assertEqual(S.snapshot_tree(self.dst), S.snapshot_tree(self.src))

    async def test_a_manifest_read_slower_than_it_comes_holds_the_control_stream(self):
        """Batches wait to be kept and read in a worker thread: past MANIFEST_AHEAD the
        control stream stops reading (the sender's batches wait in TCP, not in the
        receiver), and it reads again as they are read: the seed completes."""
        S.make_tree(self.src, files=40, max_size=20_000)
        self.patch(tree, "WALK_BATCH", 4)
        self.patch(sender, "MANIFEST_BATCH", 3)
        self.patch(tree_receive, "MANIFEST_AHEAD", 2)
        feed = tree.ManifestReader.feed
        self.patch(tree.ManifestReader, "feed", lambda reader, body: (time.sleep(0.02), feed(reader, body))[1])
        held = []
        pause = Stream.pause

        def pausing(stream, reason):
            if reason == "manifest":
                held.append(stream.role)
            return pause(stream, reason)

        self.patch(Stream, "pause", pausing)
        r, s = self.receiver(), self.sender(seed_streams=1)
        await r.receive("ahead")
        await s.send(f"127.0.0.1:{self.port}", "ahead", source="datadir")
        status = await S.finished(r, "ahead")
        self.assertEqual(status["State"], "completed", status["Error"])
        self.assertIn("control", held)
        self.assertEqual(S.snapshot_tree(self.dst), S.snapshot_tree(self.src))

    async def test_a_connection_lost_while_the_manifest_is_saved_resumes(self):
        """The attempt ends (its connection dropped) while the receiver saves the manifest
        from the spool the attempt kept it in: the spool is closed under the save, and the
        seed resumes with the next attempt instead of failing."""
        S.make_tree(self.src, files=40, max_size=20_000)
        save, dropped = tree_receive._save_manifest, []
        r, s = self.receiver(), self.sender(seed_streams=1)

        def drop() -> None:
            r.jobs["cut"].payload.session.control.transport.abortConnection()

        def saving(store, seed_id, batches, end):
            if not dropped:
                dropped.append(True)
                threads.blockingCallFromThread(reactor, drop)
                deadline = time.monotonic() + 10
                while not batches.closed and time.monotonic() < deadline:
                    time.sleep(0.01)
            return save(store, seed_id, batches, end)

        self.patch(tree_receive, "_save_manifest", saving)
        await r.receive("cut")
        await s.send(f"127.0.0.1:{self.port}", "cut", source="datadir")
        status = await S.finished(r, "cut")
        self.assertEqual(status["State"], "completed", status["Error"])
        self.assertEqual(dropped, [True])
        self.assertGreaterEqual(status["Resumes"], 1)
        self.assertEqual(S.snapshot_tree(self.dst), S.snapshot_tree(self.src))

    async def test_a_manifest_that_statedir_cannot_keep_fails_the_seed_saying_so(self):
        before = S.snapshot_tree(self.dst)
        S.make_tree(self.src, files=5, max_size=20_000)

        def full(*args):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(tree_receive, "_save_manifest", full)
        r, s = self.receiver(), self.sender(seed_streams=1)
        await r.receive("full")
        await s.send(f"127.0.0.1:{self.port}", "full", source="datadir")
        status = await S.finished(r, "full")
        self.assertEqual(status["State"], "failed")
        self.assertIn("cannot keep the seed manifest in ", status["Error"])
        self.assertIn("No space left on device", status["Error"])
        self.assert_untouched(before)

    async def test_flipped_byte_on_an_unkeyed_stream_is_caught_by_xxh3(self):
        # No key, no TLS: chunk contents carry XXH3-128, which still catches corruption.
        data = self.big_file(size=600_000)
        proxy_port = self.proxy(times=1)
        r = self.receiver()
        s = self.sender(seed_streams=1)
        await r.receive("8")
        await s.send(f"127.0.0.1:{proxy_port}", "8", source="datadir")
        self.assertEqual(s.jobs["8"].digest_kind, frames.Digest.XXH3)
        status = await S.finished(r, "8")
        self.assertEqual(status["State"], "completed", status["Error"])
        self.assertEqual(self.proxy_factory.flipped, 1)
        self.assertGreaterEqual(status["Resumes"], 1)
        with open(os.path.join(self.dst, "big.ibd"), "rb") as fh:
            self.assertEqual(fh.read(), data)

    async def test_keyed_receiver_refuses_a_weaker_content_digest(self):
        # A key without TLS is the only authentication: the receiver insists on BLAKE3.
        self.big_file(size=300_000)
        before = S.snapshot_tree(self.dst)
        r = self.receiver()
        s = self.sender()
        await r.receive("9", key="k")
        await s.send(f"127.0.0.1:{self.port}", "9", key="k", source="datadir")
        self.assertEqual(s.jobs["9"].digest_kind, frames.Digest.BLAKE3)
        s.jobs["9"].digest_kind = frames.Digest.XXH3
        status = await S.finished(r, "9")
        self.assertEqual(status["State"], "failed")
        self.assertIn("refused xxh3-128 content digests", status["Error"])
        self.assertEqual(status["BytesDone"], 0)
        self.assertEqual((await S.finished(s, "9"))["State"], "failed")
        self.assert_untouched(before)

    async def test_chunk_that_keeps_failing_fails_the_seed_naming_it(self):
        self.big_file(size=600_000)
        before = S.snapshot_tree(self.dst)
        proxy_port = self.proxy(times=100)
        r = self.receiver()
        s = self.sender(seed_streams=1)
        await r.receive("4", key="k")
        await s.send(f"127.0.0.1:{proxy_port}", "4", key="k", source="datadir")
        status = await S.finished(r, "4")
        self.assertEqual(status["State"], "failed")
        self.assertRegex(status["Error"], r"big\.ibd at offset \d+ failed verification 3 times")
        sent = await S.finished(s, "4")
        self.assertEqual(sent["State"], "failed")
        self.assertIn("failed verification", sent["Error"])
        await r.stopService()
        self.assert_untouched(before)

    async def test_sender_killed_mid_stream_resumes_where_it_stopped(self):
        total = 1_500_000
        data = self.big_file(size=total)
        r = self.receiver()
        s = self.sender(seed_streams=2, seed_rate_limit_bytes_per_sec=800_000)
        await r.receive("12", key="k")
        await s.send(f"127.0.0.1:{self.port}", "12", key="k", source="datadir")
        await S.wait_for(lambda: r.records["12"].bytes_done > 400_000)
        sent_before = s.jobs["12"].bytes_sent
        await s.stopService()
        await r.jobs["12"].drain()
        have = r.records["12"].bytes_done
        self.assertLess(have, total)
        # The same agent comes back (same state dir) and picks the seed up by itself.
        again = self.sender(seed_streams=2)
        await again.set_rate_limit("12", 0)
        job = again.jobs["12"]
        status = await S.finished(r, "12")
        self.assertEqual(status["State"], "completed", status["Error"])
        self.assertGreaterEqual(status["Resumes"], 1)
        self.assertEqual(job.bytes_sent, total - have)
        self.assertLessEqual(sent_before - have, 2 * CHUNK, "more than a chunk per stream was lost")
        with open(os.path.join(self.dst, "big.ibd"), "rb") as fh:
            self.assertEqual(fh.read(), data)

    async def test_restarted_sender_refuses_an_unmounted_snapshot(self):
        self.big_file(size=1_500_000)
        r = self.receiver()
        s = self.sender(seed_rate_limit_bytes_per_sec=800_000)
        await r.receive("17")
        await s.send(f"127.0.0.1:{self.port}", "17", source="snapshot")
        await S.wait_for(lambda: r.records["17"].bytes_done > 200_000)
        await s.stopService()
        await r.jobs["17"].drain()
        have = r.records["17"].bytes_done
        # The snapshot was unmounted meanwhile: walking the bare mount point would send
        # an empty tree and the receiver would start over from nothing.
        again = self.sender(start=False)
        again.snapshots.mount = S.Snapshots(self.src, mounted=False).mount
        again.startService()
        self.addCleanup(again.stopService)
        status = await S.finished(again, "17")
        self.assertEqual(status["State"], "failed")
        self.assertIn("no snapshot is mounted", status["Error"])
        self.assertEqual(r.records["17"].bytes_done, have)
        self.assertEqual(r.records["17"].state, "running")

    async def test_receiver_restart_resumes_from_its_journal(self):
        total = 1_500_000
        data = self.big_file(size=total)
        r = self.receiver()
        s = self.sender(seed_streams=2, seed_rate_limit_bytes_per_sec=800_000)
        await r.receive("13")
        await s.send(f"127.0.0.1:{self.port}", "13", source="datadir")
        await S.wait_for(lambda: r.records["13"].bytes_done > 400_000)
        await r.stopService()
        have = r.records["13"].bytes_done
        job = s.jobs["13"]
        again = self.receiver()
        await s.set_rate_limit("13", 0)
        status = await S.finished(again, "13")
        self.assertEqual(status["State"], "completed", status["Error"])
        self.assertGreaterEqual(status["Resumes"], 1)
        self.assertEqual((await S.finished(s, "13"))["State"], "completed")
        # The restarted receiver re-checked its journal against the staged bytes and
        # offered all of them: the last session only sent the rest.
        self.assertEqual(job.have_at_ready, have)
        with open(os.path.join(self.dst, "big.ibd"), "rb") as fh:
            self.assertEqual(fh.read(), data)

    async def _abort(self, side: str):
        self.big_file(size=1_500_000)
        before = S.snapshot_tree(self.dst)
        r = self.receiver()
        s = self.sender(seed_rate_limit_bytes_per_sec=500_000)
        await r.receive("14")
        await s.send(f"127.0.0.1:{self.port}", "14", source="datadir")
        await S.wait_for(lambda: r.records["14"].bytes_done > 100_000)
        self.assertTrue(await (r if side == "receiver" else s).abort("14"))
        mine = await S.finished(r if side == "receiver" else s, "14")
        theirs = await S.finished(s if side == "receiver" else r, "14")
        self.assertEqual(mine["State"], "aborted")
        self.assertEqual(mine["Error"], "aborted through the API")
        self.assertIn(theirs["State"], ("aborted", "failed"))
        self.assertIn("aborted", theirs["Error"])
        self.assertTrue(await r.completed("14"))
        self.assertFalse(await r.succeeded("14"))
        await S.wait_for(lambda: "14" not in r.jobs)
        self.assert_untouched(before)

    async def test_abort_at_the_receiver(self):
        await self._abort("receiver")

    async def test_abort_at_the_sender(self):
        await self._abort("sender")

    async def test_an_abort_reaches_a_receiver_not_reading_its_control_stream(self):
        """The receiver reads a stream only while it can write what came in: here it reads
        nothing of the control stream when the sender aborts, and sees a data stream end
        first.  That end carries the ABORT too, so the receiver ends aborted, not waiting
        for a resume that never comes (the window a loaded CI machine hit)."""
        self.big_file(size=1_500_000)
        before = S.snapshot_tree(self.dst)
        r = self.receiver()
        s = self.sender(seed_rate_limit_bytes_per_sec=500_000, seed_streams=2)
        await r.receive("15")
        await s.send(f"127.0.0.1:{self.port}", "15", source="datadir")
        await S.wait_for(lambda: r.records["15"].bytes_done > 100_000)
        session = r.jobs["15"].payload.session
        self.assertGreater(len(session.streams), 1)
        session.control.transport.stopReading()
        self.assertTrue(await s.abort("15"))
        got = await S.finished(r, "15", timeout=15)
        self.assertEqual(got["State"], "aborted", got["Error"])
        self.assertIn("the sender aborted the seed: aborted through the API", got["Error"])
        await S.wait_for(lambda: "15" not in r.jobs)
        self.assert_untouched(before)

    async def test_an_abort_while_staging_is_prepared_leaves_no_staging(self):
        """An abort that arrives while a worker thread makes the staging directory waits
        for it, then removes staging: none is made after the seed ended."""
        self.big_file(size=300_000)
        before = S.snapshot_tree(self.dst)
        entered, go = threading.Event(), threading.Event()
        real = Staging.prepare

        def prepare(staging, manifest):
            entered.set()
            go.wait(10)
            real(staging, manifest)

        self.patch(Staging, "prepare", prepare)
        r, s = self.receiver(), self.sender()
        await r.receive("16")
        await s.send(f"127.0.0.1:{self.port}", "16", source="datadir")
        self.assertTrue(await threads.deferToThread(entered.wait, 10))
        reactor.callLater(0.3, go.set)
        self.assertTrue(await r.abort("16"))
        self.assertTrue(go.is_set(), "the abort waited for staging to be made")
        got = await S.finished(r, "16")
        self.assertEqual(got["State"], "aborted", got["Error"])
        await S.wait_for(lambda: "16" not in r.jobs)
        self.assertIsNone(r.jobs.get("16"))
        self.assert_untouched(before)
        self.assertEqual(os.listdir(r.store.root), ["16.json"])


class CommandModeTests(SeedCase):
    def manager(self, **overrides):
        manager = self.receiver(**overrides)
        manager.runner = ProcessRunner(reactor)
        return manager

    async def test_receive_command_gets_datadir_and_port(self):
        out = os.path.join(self.base, "args")
        m = self.manager(receive_seed_data_command=f"printf '%s\\n' > {out}")
        self.assertTrue(await m.receive("20"))
        status = await S.finished(m, "20")
        self.assertEqual(status["State"], "completed")
        self.assertTrue(await m.succeeded("20"))
        with open(out) as fh:
            self.assertEqual(fh.read().split(), [self.dst, str(self.port)])

    async def test_failing_send_command(self):
        m = self.manager(send_seed_data_command="sh -c 'echo nope >&2; exit 3'")
        await m.send("db2:4000", "21", source="snapshot")
        status = await S.finished(m, "21")
        self.assertEqual(status["State"], "failed")
        self.assertFalse(await m.succeeded("21"))
        self.assertIn("exited with status 3: nope", status["Error"])

    async def test_abort_stops_the_command(self):
        pidfile = os.path.join(self.base, "pid")
        m = self.manager(receive_seed_data_command=f"echo $$ > {pidfile}; exec sleep 30 #")
        await m.receive("22")
        await S.wait_for(lambda: os.path.exists(pidfile) and open(pidfile).read().strip())
        pid = int(open(pidfile).read())
        await m.abort("22")
        self.assertEqual((await m.status("22"))["State"], "aborted")
        await S.wait_for(lambda: not os.path.exists(f"/proc/{pid}") or
                         open(f"/proc/{pid}/stat").read().split()[2] == "Z", timeout=10)
