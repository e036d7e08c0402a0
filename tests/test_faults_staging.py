"""Faults found by the fault matrix, pinned down at the depth where they live.

The lossy-link case of ``python -m reliability.run`` failed a seed with "Invalid argument
while writing ibdata1": over a slow, lossy link a 2 MiB chunk arrives in more socket
reads than one pwritev() may take (IOV_MAX, 1024 on Linux), and the kernel refuses the
whole call with EINVAL.  The racing-seeds case accepted a second seed into a busy
datadir.  And a control connection lost at the very end left the sender "failed" although
the receiver had completed.
"""

from __future__ import annotations

import os

import blake3
from twisted.trial import unittest

from orchagent.seed import frames, tree
from orchagent.seed.staging import Staging

KEY = bytes(range(32))


class ManyPiecesTests(unittest.TestCase):
    def test_chunk_arriving_in_more_pieces_than_iov_max_is_written(self):
        base = os.path.abspath(self.mktemp())
        datadir = os.path.join(base, "mysql")
        os.makedirs(datadir)
        data = os.urandom(2 << 20)
        manifest = tree.Manifest((tree.Entry(path="ibdata1", kind="f", size=len(data)),), 2 << 20)
        staging = Staging(datadir, "t1")
        staging.prepare(manifest)
        self.addCleanup(staging.discard)
        pieces, digest, _ = frames.seal_chunk(0, 0, data, KEY, False)
        wire = b"".join(bytes(p) for p in pieces)
        # As a lossy link delivers it: 1448-byte TCP segments, one read each.
        splitter = frames.FrameSplitter()
        got = []
        for i in range(0, len(wire), 1448):
            got += splitter.feed(wire[i:i + 1448])
        chunk = frames.open_data(got[0], KEY)
        self.assertGreater(len(chunk.payload), os.sysconf("SC_IOV_MAX"))
        results = staging.write_batch(manifest, [(chunk, True)], None)
        self.assertEqual(results, [(chunk.where, digest)])
        with open(os.path.join(staging.root, "ibdata1"), "rb") as fh:
            self.assertEqual(blake3.blake3(fh.read()).digest(), blake3.blake3(data).digest())


    def test_short_pwritev_is_completed(self):
        # The kernel may write less than asked (a signal, a nearly full quota); the rest
        # of each IOV_MAX batch must still land at the right offset.
        from orchagent.seed import staging

        calls = []

        def half(fd, buffers, offset):
            calls.append(len(buffers))
            size = sum(len(b) for b in buffers)
            return os.pwrite(fd, b"".join(buffers)[:size // 2], offset)

        self.patch(os, "pwritev", half)
        pieces = [os.urandom(7) for _ in range(staging._IOV_MAX * 2 + 5)]
        path = os.path.abspath(self.mktemp())
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, fd)
        staging._pwrite_all(fd, pieces, 3, 7 * len(pieces))
        self.assertEqual(calls, [staging._IOV_MAX, staging._IOV_MAX, 5])
        self.assertEqual(os.pread(fd, 7 * len(pieces) + 10, 0), b"\0" * 3 + b"".join(pieces))


class RacingSeedsTests(unittest.TestCase):
    """The racing-seeds case: a second seed into a datadir that one is already receiving
    was accepted, and the later promote moved the first seed's result aside."""

    async def test_second_seed_for_the_same_datadir_is_refused(self):
        from orchagent.errors import Refused
        from tests import seed_support as S

        base = os.path.abspath(self.mktemp())
        datadir = os.path.join(base, "mysql")
        os.makedirs(datadir)
        receiver = S.make_manager(self, os.path.join(base, "r"), datadir, S.free_port())
        self.assertTrue(await receiver.receive("1", key="k"))
        with self.assertRaises(Refused) as caught:
            await receiver.receive("2", key="k")
        self.assertIn("seed 1", caught.exception.message)
        self.assertTrue(await receiver.receive("1", key="k"), "the same seed again is idempotent")
        await receiver.abort("1")


class DroppedControlTests(unittest.TestCase):
    """The control connection drops at the very end: the sender reconnects and must learn
    the receiver's verdict, not fail because the receiver finished without it."""

    timeout = 60

    def setUp(self):
        from orchagent.seed import sender
        from tests import seed_support as S

        self.S = S
        self.patch(sender, "BACKOFF_FIRST", 0.05)
        self.base = base = os.path.abspath(self.mktemp())
        self.src, self.dst = os.path.join(base, "src"), os.path.join(base, "dst")
        os.makedirs(self.dst)
        S.make_tree(self.src)
        self.port = port = S.free_port()
        self.target = f"127.0.0.1:{port}"
        self.r = S.make_manager(self, os.path.join(base, "r"), self.dst, port)
        self.s = S.make_manager(self, os.path.join(base, "s"), self.src, port, snapshot=self.src,
                                chunk_size=64 * 1024)

    async def seed(self, seed: str) -> tuple[dict, dict]:
        S = self.S
        await self.r.receive(seed, key="k")
        await self.s.send(self.target, seed, key="k", source="snapshot")
        theirs, ours = await S.finished(self.r, seed), await S.finished(self.s, seed)
        self.assertEqual(theirs["State"], "completed", theirs["Error"])
        self.assertEqual(ours["State"], "completed", ours["Error"])
        self.assertGreaterEqual(ours["Resumes"], 1, "the sender never reconnected")
        self.assertEqual(S.snapshot_tree(self.dst), S.snapshot_tree(self.src))
        return theirs, ours

    async def test_sender_reconnecting_after_completion_learns_the_success(self):
        from orchagent.seed import listener

        real = listener.ReceiverStream._last
        dropped = []

        def drop_first_result(stream, data, wait=0.0):
            # The connection breaks just as the receiver finished: the RESULT is lost.
            if data is not None and stream.role == "control" and not dropped:
                dropped.append(stream)
                stream.close(abort=True)
                return
            real(stream, data, wait)

        self.patch(listener.ReceiverStream, "_last", drop_first_result)
        await self.seed("21")
        self.assertEqual(len(dropped), 1)
        # Once the sender has read the RESULT, nothing is kept and the seed port closes.
        await self.S.wait_for(lambda: not self.r.completed_receives and self.r.listener.port is None)

    async def test_receiver_restarted_after_completion_still_tells_a_late_keyed_sender(self):
        from orchagent.seed import listener, sender

        S = self.S
        real = listener.ReceiverStream._last

        def drop_result(stream, data, wait=0.0):
            if data is not None and stream.role == "control":
                stream.close(abort=True)
                return
            real(stream, data, wait)

        # The RESULT is lost and the receiving agent restarts before the sender is back.
        self.patch(listener.ReceiverStream, "_last", drop_result)
        self.patch(sender, "BACKOFF_FIRST", 1.5)
        await self.r.receive("23", key="k")
        await self.s.send(self.target, "23", key="k", source="snapshot")
        await S.wait_for(lambda: self.r.records["23"].state == "completed")
        await self.r.stopService()
        self.patch(listener.ReceiverStream, "_last", real)
        key_file = self.r.store.path("23", "key")
        self.assertTrue(os.path.exists(key_file), "the key went before the sender learned the result")
        restarted = S.make_manager(self, os.path.join(self.base, "r"), self.dst, self.port)
        ours = await S.finished(self.s, "23")
        self.assertEqual(ours["State"], "completed", ours["Error"])
        self.assertGreaterEqual(ours["Resumes"], 1)
        self.assertEqual((await restarted.status("23"))["State"], "completed")
        self.assertEqual(S.snapshot_tree(self.dst), S.snapshot_tree(self.src))
        # Told: the key is gone from disk and the seed port closes.
        await S.wait_for(lambda: not restarted.completed_receives and restarted.listener.port is None)
        self.assertFalse(os.path.exists(key_file))
        self.assertFalse(os.path.exists(self.s.store.path("23", "key")))

    async def test_sender_reconnecting_while_the_receiver_verifies_waits_for_the_result(self):
        from orchagent.seed import tree_receive

        real = tree_receive.TreeReceive._finalize

        async def drop_then_finalize(payload, session):
            # The control stream breaks after FINISH; the sender's new control stream
            # arrives while the tree is still being verified.
            session.control.close(abort=True)
            await self.S.wait_for(lambda: payload.waiting)
            await real(payload, session)

        self.patch(tree_receive.TreeReceive, "_finalize", drop_then_finalize)
        await self.seed("22")
