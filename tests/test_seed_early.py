"""Early data (orchagent.seed.early): small files sent while the sender still walks,
between two real SeedManagers over real TCP on loopback."""

from __future__ import annotations

import errno
import os
import random
import threading

from twisted.internet import defer, protocol, reactor, task
from twisted.trial import unittest

from orchagent.errors import BadRequest
from orchagent.seed import early, frames, plan, sender, spill
from orchagent.seed.session import Session
from orchagent.seed.staging import Staging
from tests import seed_support as S
from tests.test_seed_transfer import FlippingProxy, SeedCase



def make_small_files(root: str, count: int = 600) -> None:
    """``count`` small files over nested directories with their own modes, one with a
    name that is not UTF-8, and the entries early data never carries (make_tree: empty,
    sparse, hole-only and large files, a symlink)."""
    S.make_tree(root, files=20)
    rnd = random.Random(7)
    for i in range(count):
        where = os.path.join(root, f"db{i % 3}", "part" if i % 5 == 0 else "")
        os.makedirs(where, exist_ok=True)
        with open(os.path.join(where, f"t{i:04d}.ibd"), "wb") as fh:
            fh.write(os.urandom(rnd.randrange(1, 6000)) + bytes(rnd.randrange(3000)))
    os.chmod(os.path.join(root, "db1"), 0o750)
    with open(os.path.join(os.fsencode(root), b"db2", b"t\xe9\xff.ibd"), "wb") as fh:
        fh.write(b"a name that is not UTF-8")


class EarlyCase(SeedCase):
    def setUp(self):
        super().setUp()
        make_small_files(self.src)
        # A walk of seconds, as a large tree's is: 50 entries a batch, 50 ms apart.
        S.slow_walk(self, batch=50, pause=0.05)
        #: Files each early bundle written on the receiver held, and whether the sender
        #: was still walking then.
        self.written_early: list[tuple[int, bool]] = []
        self.first_early = defer.Deferred()
        write_bundle = early.write_bundle

        #: Whether the receive job still existed as each early write began.
        self.write_starts: list[bool] = []

        def counting(staging, manifest, bundle, kept, made):
            self.write_starts.append(self.seed in self.r.jobs)
            result = write_bundle(staging, manifest, bundle, kept, made)
            reactor.callFromThread(self._written_early, len(bundle.items))
            return result

        self.patch(early, "write_bundle", counting)
        #: (file, offset) of every chunk the sender sealed, whole small files in bundles
        #: (early or not) or alone, the rest chunk by chunk.
        self.sealed: list[tuple[int, int]] = []
        seal_bundle, seal_chunk = frames.seal_bundle, frames.seal_chunk
        self.patch(frames, "seal_bundle", lambda files, *args, **kw: self.sealed.extend(
            (index, 0) for index, _ in files) or seal_bundle(files, *args, **kw))
        self.patch(frames, "seal_chunk", lambda index, offset, *args, **kw: self.sealed.append(
            (index, offset)) or seal_chunk(index, offset, *args, **kw))

    def _written_early(self, files: int) -> None:
        job = self.s.jobs.get(self.seed)
        self.written_early.append((files, job is not None and job.table is None))
        if not self.first_early.called:
            self.first_early.callback(None)

    def managers(self, seed: str, **sender_overrides):
        self.seed = seed
        self.r, self.s = self.receiver(), self.sender(**sender_overrides)
        return self.r, self.s


class EarlyDataTests(EarlyCase):
    async def test_small_files_go_while_the_walk_goes_on(self):
        """Keyed without TLS (BLAKE3 content digests): bundles are written on the
        receiver while the sender still walks; once READY, the sender counts them done
        without reading them again, so every file is sealed once; the tree is the same."""
        rechecked = []
        recheck = sender._recheck_source
        self.patch(sender, "_recheck_source", lambda *args: rechecked.append(1) or recheck(*args))
        r, s = self.managers("e1")
        await r.receive("e1", key="k")
        await s.send(f"127.0.0.1:{self.port}", "e1", key="k", source="datadir")
        status = await S.finished(r, "e1")
        self.assertEqual(status["State"], "completed", status["Error"])
        self.assertEqual(S.snapshot_tree(self.dst), S.snapshot_tree(self.src))
        self.assertTrue(any(walking for _, walking in self.written_early), self.written_early)
        self.assertGreater(sum(files for files, _ in self.written_early), 50)
        self.assertEqual(status["Resumes"], 0)
        self.assertEqual(rechecked, [])
        # Nothing was read and sent twice.
        self.assertEqual(len(self.sealed), len(set(self.sealed)))
        self.assertEqual(status["FilesDone"], status["FilesTotal"])

    async def test_the_sender_keeps_within_what_the_receiver_allows(self):
        """The receiver allows five files early: five go early, the rest after READY."""
        self.patch(early, "allowance", lambda free, inodes: (1 << 30, 5))
        r, s = self.managers("e2")
        await r.receive("e2")
        await s.send(f"127.0.0.1:{self.port}", "e2", source="datadir")
        status = await S.finished(r, "e2")
        self.assertEqual(status["State"], "completed", status["Error"])
        self.assertEqual(sum(files for files, _ in self.written_early), 5)
        self.assertEqual(S.snapshot_tree(self.dst), S.snapshot_tree(self.src))

    async def test_more_than_allowed_ends_the_attempt(self):
        """A sender that sends more than the receiver allowed (here it believes it may
        send a hundred times more) has its attempt ended; the next one, without early
        data, completes the seed."""
        self.patch(early, "allowance", lambda free, inodes: (1 << 30, 20))
        start = early.Feed.start
        self.patch(early.Feed, "start",
                   lambda feed, session, allowed: start(feed, session, dict(allowed, files=2000)))
        r, s = self.managers("e3")
        await r.receive("e3")
        await s.send(f"127.0.0.1:{self.port}", "e3", source="datadir")
        status = await S.finished(r, "e3")
        self.assertEqual(status["State"], "completed", status["Error"])
        self.assertGreaterEqual(status["Resumes"], 1)
        self.assertLessEqual(sum(files for files, _ in self.written_early), 20)
        self.assertEqual(S.snapshot_tree(self.dst), S.snapshot_tree(self.src))

    async def test_a_file_that_fails_its_digest_ends_the_attempt(self):
        """Unkeyed (XXH3), compressed bundles: a file whose bytes were altered after its
        digest was taken fails its digest on the receiver, which ends the attempt (its
        sender counts every file it sent early as arrived); the next attempt sends it
        again and the tree is the same."""
        read_bundle, altered = early.read_bundle, []

        def altering(root, items, key, compress, kind, kept):
            pieces, size, compressed = read_bundle(root, items, key, compress, kind, kept)
            if not altered and compressed:
                altered.append(items[0][0])
                whole = bytearray(b"".join(pieces))
                # The digests are in the head; the compressed payload follows it.
                head = frames.HEADER.size + frames.BUNDLE_HEAD.size + len(items) * frames.BUNDLE_ITEM.size
                payload = frames._decompressor().decompress(bytes(whole[head:len(whole) - frames.TAG_SIZE]),
                                                              max_output_size=1 << 24)
                changed = bytearray(payload)
                changed[0] ^= 0x40
                repacked = frames._compressor().compress(bytes(changed))
                body = bytes(whole[frames.HEADER.size:head]) + repacked
                pieces = [frames.seal(frames.FrameType.BUNDLE, body, key)]
            return pieces, size, compressed

        self.patch(early, "read_bundle", altering)
        r, s = self.managers("e4", seed_compression="zstd")
        await r.receive("e4")
        await s.send(f"127.0.0.1:{self.port}", "e4", source="datadir")
        status = await S.finished(r, "e4")
        self.assertEqual(status["State"], "completed", status["Error"])
        self.assertEqual(len(altered), 1)
        self.assertGreaterEqual(status["Resumes"], 1)
        self.assertEqual(S.snapshot_tree(self.dst), S.snapshot_tree(self.src))


class EarlyAbortTests(EarlyCase):
    async def test_an_abort_while_early_bundles_wait_to_be_written_leaves_nothing(self):
        """The receiver aborted while an early write is held in its worker thread and
        more bundles wait behind it in the manifest's chain, the sender still walking:
        the held write ends before staging goes, no waiting one begins, both sides end
        aborted, the datadir as it was."""
        counting, release, held = early.write_bundle, threading.Event(), defer.Deferred()
        aborted, begun_after_abort = threading.Event(), []

        def holding(*args):
            if aborted.is_set():
                begun_after_abort.append(args[2].items[0][0])
            if self.written_early and not release.is_set():
                reactor.callFromThread(lambda: held.called or held.callback(None))
                release.wait(10)
            return counting(*args)

        self.patch(early, "write_bundle", holding)
        self.addCleanup(release.set)
        before = S.snapshot_tree(self.dst)
        r, s = self.managers("e7")
        await r.receive("e7")
        await s.send(f"127.0.0.1:{self.port}", "e7", source="datadir")
        await held
        session = r.jobs["e7"].payload.session
        await S.wait_for(lambda: session.early_queued > 2 * early.BUNDLE_BYTES)
        self.assertIsNone(s.jobs["e7"].table, "the sender still walks")
        aborted.set()
        self.assertTrue(await r.abort("e7"))
        release.set()
        mine, theirs = await S.finished(r, "e7"), await S.finished(s, "e7")
        self.assertEqual(mine["State"], "aborted")
        self.assertIn(theirs["State"], ("aborted", "failed"))
        self.assertIn("aborted", theirs["Error"])
        await S.wait_for(lambda: "e7" not in r.jobs)
        await task.deferLater(reactor, 1.0, lambda: None)
        self.assertEqual(begun_after_abort, [], "early writes began after the abort")
        self.assertTrue(all(self.write_starts), "an early write began after the seed was cleaned up")
        self.assert_untouched(before)


class EarlyWriteErrorTests(EarlyCase):
    async def test_a_write_error_of_early_data_fails_the_seed_naming_the_file(self):
        """A file system full under an early write fails the seed as any write does (no
        resume would fare better): the message names the file, the datadir is as it was,
        staging is gone."""
        write_small, failed_walking = Staging._write_small, []

        def full(staging, manifest, index, data, length):
            if self.written_early:
                failed_walking.append(self.s.jobs["e6"].table is None)
                raise OSError(errno.ENOSPC, f"No space left on device while writing "
                                            f"{manifest.paths[index]} at offset 0")
            return write_small(staging, manifest, index, data, length)

        self.patch(Staging, "_write_small", full)
        before = S.snapshot_tree(self.dst)
        r, s = self.managers("e6")
        await r.receive("e6")
        await s.send(f"127.0.0.1:{self.port}", "e6", source="datadir")
        status = await S.finished(r, "e6")
        self.assertEqual(status["State"], "failed")
        self.assertRegex(status["Error"], r"^seed e6 could not be written: No space left on device while "
                                          r"writing db\d/(part/)?t\d{4}\.ibd at offset 0 \(the file system "
                                          r"had \d+ bytes free at the start\)$")
        self.assertEqual(failed_walking[:1], [True], "the write that failed was one of early data")
        await S.wait_for(lambda: "e6" not in r.jobs)
        self.assert_untouched(before)


class _Cut(FlippingProxy):
    """A proxy to the receiver (flipping nothing) whose connections the test can cut."""

    def connectionMade(self):
        super().connectionMade()
        self.factory.conns.append(self)


class LostAttemptTests(EarlyCase):
    async def test_files_of_an_attempt_lost_before_the_manifest_ended_are_never_promoted(self):
        """The first attempt writes files early, then its connection is lost before
        MANIFEST_END: nothing records them.  A file staged then that the source no
        longer has (planted here, as an earlier walk of a source that lost it since
        would have sent it) must not reach the datadir: the next attempt, which is never
        early, empties staging before it prepares it."""
        factory = protocol.Factory.forProtocol(_Cut)
        factory.target, factory.conns, factory.count, factory.times = self.port, [], 0, 0
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        r, s = self.managers("e5", seed_streams=1)
        await r.receive("e5")
        await s.send(f"127.0.0.1:{port.getHost().port}", "e5", source="datadir")
        await self.first_early
        staging = Staging(self.dst, "e5")
        factory.conns[0].transport.abortConnection()
        await S.wait_for(lambda: r.jobs["e5"].payload.session is None
                         or r.jobs["e5"].payload.sessions > 1)
        with open(os.path.join(staging.root, "stale.ibd"), "wb") as fh:
            fh.write(b"a file the source no longer has")
        status = await S.finished(r, "e5")
        self.assertEqual(status["State"], "completed", status["Error"])
        self.assertGreaterEqual(status["Resumes"], 1)
        self.assertFalse(os.path.exists(os.path.join(self.dst, "stale.ibd")))
        self.assertEqual(S.snapshot_tree(self.dst), S.snapshot_tree(self.src))


class FeedTests(unittest.TestCase):
    """The sender's choice of files to send early (no I/O)."""

    def candidates(self, first: int, sizes: list[int]) -> list[tuple]:
        return [(first + n, f"f{first + n}", size, 0, 0, 0, 0) for n, size in enumerate(sizes)]

    def test_only_files_of_batches_already_sent_within_what_is_allowed(self):
        feed = early.Feed(self.mktemp())
        os.makedirs(feed.directory)
        self.addCleanup(feed.close)
        feed.start(Session("a"), {"bytes": 10_000, "files": 10})
        feed.offer(1, self.candidates(0, [4000, 4000, 4000]))
        self.assertEqual(feed.take(0, 1 << 20, 100), [], "its MANIFEST batch was not sent yet")
        taken = feed.take(1, 1 << 20, 100)
        self.assertEqual([item[0] for item in taken], [0, 1])
        self.assertFalse(feed.open, "the third file does not fit what is allowed: no more early data")
        self.assertEqual(feed.take(1, 1 << 20, 100), [])

    def test_a_bundle_stays_within_its_bytes_and_files(self):
        feed = early.Feed(self.mktemp())
        os.makedirs(feed.directory)
        self.addCleanup(feed.close)
        feed.start(Session("a"), {"bytes": 1 << 30, "files": 1000})
        feed.offer(1, self.candidates(0, [300] * 10))
        self.assertEqual(len(feed.take(1, 1000, 100)), 3)
        self.assertEqual(len(feed.take(1, 1 << 20, 4)), 4)
        self.assertEqual(len(feed.take(1, 1 << 20, 100)), 3)
        self.assertTrue(feed.open)

    def test_the_walk_finds_no_more_than_it_keeps(self):
        feed = early.Feed(self.mktemp())
        os.makedirs(feed.directory)
        self.addCleanup(feed.close)
        self.assertFalse(feed.hungry, "no early data allowed yet")
        feed.start(Session("a"), {"bytes": 1 << 30, "files": 1000})
        self.assertTrue(feed.hungry)
        for batch in range(1, early.KEEP_BATCHES + 1):
            feed.offer(batch, self.candidates(batch * 10, [100]))
        self.assertFalse(feed.hungry)
        feed.offer(9, self.candidates(90, [100]))
        self.assertEqual(len(feed.batches), early.KEEP_BATCHES)
        self.assertEqual(feed.batches[-1][0], 9, "the oldest batch is the one let go")

    def test_a_malformed_allowance_is_a_protocol_error(self):
        feed = early.Feed(self.mktemp())
        with self.assertRaises(frames.ProtocolError):
            feed.start(Session("a"), {"bytes": "many", "files": 3})
        self.assertFalse(feed.open)


class ReadBundleTests(unittest.TestCase):
    """The sender's early reads, checked against what the walk saw."""

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.root, "db"))
        self.path = os.path.join(self.root, "db", "t.frm")
        with open(self.path, "wb") as fh:
            fh.write(b"walked")
        st = os.lstat(self.path)
        self.item = (3, "db/t.frm", st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino, st.st_ctime_ns)
        self.kept = spill.Spool(self.root)
        self.addCleanup(self.kept.close)

    def test_a_file_as_walked_is_framed_and_its_digest_kept(self):
        pieces, size, compressed = early.read_bundle(self.root, [self.item], b"k" * 32, False,
                                                     frames.Digest.XXH3, self.kept)
        self.assertEqual((size, compressed), (6, False))
        frame, = frames.iter_frames([b"".join(pieces)])
        bundle = frames.open_bundle(frame, b"k" * 32, frames.Digest.XXH3)
        self.assertEqual([(i, bytes(data)) for i, data in frames.unpack_bundle(bundle)], [(3, b"walked")])
        self.assertEqual(list(plan.RECORD.iter_unpack(self.kept.read(0, self.kept.size))),
                         [(3, 0, 6, frames.content_digest(b"walked", frames.Digest.XXH3))])

    def test_a_file_replaced_since_the_walk_fails_naming_it(self):
        os.rename(self.path, self.path + ".old")
        with open(self.path, "wb") as fh:
            fh.write(b"walked")
        with self.assertRaises(BadRequest) as caught:
            early.read_bundle(self.root, [self.item], b"k" * 32, False, frames.Digest.XXH3, self.kept)
        self.assertRegex(caught.exception.message, rf"^seed source file {self.path} changed while it "
                                                   r"was being sent \(device/inode \d+/\d+, was \d+/\d+")
        self.assertEqual(self.kept.size, 0)

    def test_a_file_of_another_size_than_walked_fails_naming_it(self):
        item = (3, "db/t.frm", 100, *self.item[3:])
        with self.assertRaises(BadRequest) as caught:
            early.read_bundle(self.root, [item], b"k" * 32, False, frames.Digest.XXH3, self.kept)
        self.assertIn(f"seed source file {self.path} changed while it was being sent", caught.exception.message)
