"""The file digests at the end of a tree seed (36 bytes a file): the sender makes and
sends them a piece at a time as its control stream takes them, the receiver keeps them
in an unnamed file in StateDir and compares from there.  Held whole in memory they were
each engine's peak at a million files (BENCHMARKS.md)."""

from __future__ import annotations

import errno
import os
import time

from twisted.internet import defer

from orchagent.seed import plan, receiver, sender, tree_receive
from orchagent.seed.frames import FrameType
from tests import seed_support as S
from tests.test_seed_transfer import SeedCase

#: Files in the tree: with DIGEST_PIECE below, three pieces of 72,000 bytes, each over
#: a transport's 64 KiB buffer.
FILES = 6000
PIECE = 2000


class DigestTests(SeedCase):
    def setUp(self):
        super().setUp()
        for i in range(FILES):
            with open(os.path.join(self.src, f"t{i:05d}.frm"), "wb") as fh:
                fh.write(b"%d" % i)
        self.patch(plan, "DIGEST_PIECE", PIECE)

    async def seed(self, seed_id: str) -> dict:
        """The seed's status on the receiver, once it ended and cleaned up."""
        r = self.receiver()
        s = self.sender(seed_streams=1)
        await r.receive(seed_id)
        await s.send(f"127.0.0.1:{self.port}", seed_id, source="datadir")
        status = await S.finished(r, seed_id)
        await r.stopService()
        return status

    async def test_the_sender_sends_a_piece_once_the_control_stream_took_the_last(self):
        """No DIGESTS piece is written while the transport asks the sender to pause (a
        piece fills it), and every piece arrives: the seed completes."""
        sent = []
        send = sender.SenderStream.send

        def recording(stream, frame_type, body):
            if frame_type == FrameType.DIGESTS:
                sent.append(stream.blocked)
            return send(stream, frame_type, body)

        self.patch(sender.SenderStream, "send", recording)
        status = await self.seed("paced")
        self.assertEqual(status["State"], "completed", status["Error"])
        self.assertEqual(sent, [False] * (FILES // PIECE))
        self.assertEqual(S.snapshot_tree(self.dst), S.snapshot_tree(self.src))

    async def test_the_receiver_compares_what_it_kept_on_disk(self):
        """The comparison reads the kept file: a byte changed there (after the last
        piece was written) fails the seed naming the file, and the datadir keeps what it
        had."""
        before = S.snapshot_tree(self.dst)
        compare = tree_receive._DigestSpool._compare
        kept = []

        def altered(spool, table):
            fd = spool.kept.file.fileno()
            kept.append(os.fstat(fd).st_size)
            byte = os.pread(fd, 1, 36 * 5 + 10)
            os.pwrite(fd, bytes([byte[0] ^ 1]), 36 * 5 + 10)
            return compare(spool, table)

        self.patch(tree_receive._DigestSpool, "_compare", altered)
        status = await self.seed("altered")
        self.assertEqual(status["State"], "failed")
        self.assertEqual(kept, [36 * FILES])
        self.assertIn("t00005.frm does not match the sender's file digest", status["Error"])
        self.assert_untouched(before)

    async def test_digests_that_cannot_be_kept_fail_the_seed(self):
        """StateDir without room for them: the seed fails saying so, the datadir keeps
        what it had."""
        before = S.snapshot_tree(self.dst)

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        init = tree_receive._DigestSpool.__init__

        def without_room(spool, *args):
            init(spool, *args)
            spool.kept.add = full

        self.patch(tree_receive._DigestSpool, "__init__", without_room)
        status = await self.seed("full")
        self.assertEqual(status["State"], "failed")
        self.assertIn("cannot keep the sender's file digests in ", status["Error"])
        self.assertIn("No space left on device", status["Error"])
        self.assert_untouched(before)

    async def test_an_abort_after_the_digests_is_heard(self):
        """The last piece and FINISH read at once (TCP may deliver them so; here the
        sender writes them in one go): the comparison then waits on the spool behind
        the last piece's write.  The control stream must read again once that piece is
        written, so a sender aborted while the receiver installs the verified tree is
        heard and both sides end aborted.  Kept paused behind the comparison, the
        receiver missed the ABORT and moved the tree in (a CI run), or the sender waited
        its RESULT_WAIT out and ended unknown."""
        before = S.snapshot_tree(self.dst)
        self.patch(sender, "RESULT_WAIT", 10.0)
        send, held_piece = sender.SenderStream.send, []

        def coalescing(stream, frame_type, body):
            if frame_type == FrameType.DIGESTS and len(body) < 36 * PIECE:
                held_piece.append(body)  # the last, short piece: sent with FINISH
                return None
            if frame_type == FrameType.FINISH:
                self.assertEqual(len(held_piece), 1)
                send(stream, FrameType.DIGESTS, held_piece[0])
            return send(stream, frame_type, body)

        self.patch(sender.SenderStream, "send", coalescing)
        init = tree_receive._DigestSpool.__init__

        def writing_once_compared(spool, *args):
            # The last piece's write ends only once the comparison waits behind it.
            init(spool, *args)
            write = spool.kept.add

            def held(piece):
                deadline = time.monotonic() + 10
                while len(piece) < 36 * PIECE and not spool.lock.waiting and time.monotonic() < deadline:
                    time.sleep(0.005)
                return write(piece)

            spool.kept.add = held

        self.patch(tree_receive._DigestSpool, "__init__", writing_once_compared)
        with open(os.path.join(self.src, "last.frm"), "wb") as fh:
            fh.write(b"one file more: a last piece of one digest")
        reached, held = defer.Deferred(), defer.Deferred()
        install = receiver.ReceiveJob.install

        async def holding(job):
            reached.callback(None)
            await held
            return await install(job)

        self.patch(receiver.ReceiveJob, "install", holding)
        r, s = self.receiver(), self.sender(seed_streams=1)
        await r.receive("heard")
        await s.send(f"127.0.0.1:{self.port}", "heard", source="datadir")
        await reached
        await s.abort("heard")
        held.callback(None)
        target, source = await S.finished(r, "heard"), await S.finished(s, "heard")
        await r.stopService()
        self.assertEqual((target["State"], source["State"]), ("aborted", "aborted"), (target, source))
        self.assert_untouched(before)
