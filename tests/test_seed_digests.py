"""The file digests at the end of a tree seed (36 bytes a file): the sender makes and
sends them a piece at a time as its control stream takes them, the receiver keeps them
in an unnamed file in StateDir and compares from there.  Held whole in memory they were
each engine's peak at a million files (BENCHMARKS.md)."""

from __future__ import annotations

import errno
import os

from orchagent.seed import plan, sender, tree_receive
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
            kept.append(os.fstat(spool.file.fileno()).st_size)
            spool.file.seek(36 * 5 + 10)
            byte = spool.file.read(1)
            spool.file.seek(36 * 5 + 10)
            spool.file.write(bytes([byte[0] ^ 1]))
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

        self.patch(tree_receive.tempfile, "TemporaryFile", full)
        status = await self.seed("full")
        self.assertEqual(status["State"], "failed")
        self.assertIn("cannot keep the sender's file digests in ", status["Error"])
        self.assertIn("No space left on device", status["Error"])
        self.assert_untouched(before)
