"""The seed wire format, handshake, manifest checks and meters, without sockets."""

from __future__ import annotations

import ctypes
import errno
import io
import os
import types
from array import array

import zstandard
from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet import task
from twisted.trial import unittest

from orchagent.errors import BadRequest, ConfigError
from orchagent.seed import auth, frames, plan, spill, tree
from orchagent.seed.frames import FrameType
from orchagent.seed.state import RateMeter, TokenBucket

KEY = bytes(range(32))


def _stream(chunks: list[tuple[int, int, bytes]], compress: bool,
            kind=frames.Digest.BLAKE3) -> tuple[bytes, list]:
    """A valid stream: a control frame, DATA frames, a BUNDLE of them, a packed control
    frame."""
    out = [frames.seal_json(FrameType.FINISH, {"tree": "ab"}, KEY)]
    expected = [("FINISH", b'{"tree":"ab"}')]
    for file, offset, data in chunks:
        pieces, digest, _ = frames.seal_chunk(file, offset, data, KEY, compress, kind=kind)
        out.append(b"".join(bytes(p) for p in pieces))
        expected.append(("DATA", file, offset, data))
    if chunks:
        files = [(file, data) for file, _, data in chunks]
        pieces, _, _ = frames.seal_bundle([(f, len(d)) for f, d in files],
                                          b"".join(d for _, d in files), KEY, compress, kind)
        out.append(b"".join(bytes(p) for p in pieces))
        expected.append(("BUNDLE", files))
    out.append(frames.seal_packed(FrameType.READY, {"have": [[1, 2, 3, "00"]]}, KEY))
    expected.append(("READY", {"have": [[1, 2, 3, "00"]]}))
    return b"".join(out), expected


def _decode(pieces, kind=frames.Digest.BLAKE3) -> list:
    """Cut and fully verify a stream (what the receiver does, minus the disk)."""
    decoded = []
    for frame in frames.iter_frames(pieces):
        if frame.type == FrameType.DATA:
            chunk = frames.open_data(frame, KEY, kind)
            decoded.append(("DATA", chunk.file, chunk.offset, b"".join(frames.unpack_chunk(chunk))))
        elif frame.type == FrameType.BUNDLE:
            files = frames.unpack_bundle(frames.open_bundle(frame, KEY, kind))
            for _, outcome in files:
                if isinstance(outcome, Exception):
                    raise outcome
            decoded.append(("BUNDLE", [(index, bytes(data)) for index, data in files]))
        elif frame.type == FrameType.READY:
            decoded.append(("READY", frames.open_packed(frame, KEY)))
        else:
            decoded.append((FrameType(frame.type).name, frames.open_control(frame, KEY)))
    return decoded


_chunk_data = st.one_of(
    st.binary(max_size=3000),
    st.integers(0, 5000).map(lambda n: bytes(n)),
    st.integers(1, 5000).map(lambda n: (b"innodb page " * (n // 12 + 1))[:n]),
)
_kinds = st.sampled_from(list(frames.Digest))
_chunks = st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**63 - 1), _chunk_data),
                   min_size=0, max_size=6)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)])]


class CodecTests(unittest.TestCase):
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_chunks, st.booleans(), st.lists(st.integers(0, 10**6), max_size=40), _kinds)
    def test_any_split_decodes_identically(self, chunks, compress, cuts, kind):
        data, expected = _stream(chunks, compress, kind)
        self.assertEqual(_decode([data], kind), expected)
        self.assertEqual(_decode(_split(data, cuts), kind), expected)
        self.assertEqual(_decode([bytes([b]) for b in data[:300]] + [data[300:]], kind), expected)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_chunks, st.booleans(), st.integers(0, 10**9), st.integers(1, 255), _kinds)
    def test_any_corruption_is_detected(self, chunks, compress, where, flip, kind):
        data, expected = _stream(chunks, compress, kind)
        position = where % len(data)
        corrupt = bytearray(data)
        corrupt[position] ^= flip
        with self.assertRaises(frames.ProtocolError, msg=f"flip {flip:#x} at {position} of {len(data)}: "
                               f"{data[max(0, position - 70):position + 8].hex()}"):
            _decode([bytes(corrupt)], kind)

    def test_truncated_stream_is_an_error(self):
        data, _ = _stream([(1, 0, b"x" * 100)], False)
        with self.assertRaises(frames.ProtocolError) as caught:
            _decode([data[:-1]])
        self.assertIn("left over", str(caught.exception))

    def test_oversized_length_fails_before_buffering(self):
        splitter = frames.FrameSplitter()
        head = frames.HEADER.pack(FrameType.DATA, 0, frames.MAX_BODY + 1)
        with self.assertRaises(frames.ProtocolError) as caught:
            splitter.feed(head)
        self.assertIn("exceeds the limit", str(caught.exception))

    def test_wrong_key_is_detected(self):
        pieces, _, _ = frames.seal_chunk(3, 4096, b"data" * 100, KEY, False)
        frame = next(frames.iter_frames([b"".join(pieces)]))
        with self.assertRaises(frames.IntegrityError) as caught:
            frames.open_data(frame, bytes(32))
        self.assertEqual(caught.exception.where, (3, 4096))

    def test_compression_only_when_it_pays(self):
        text = b"abc" * 10000
        _, _, compressed = frames.seal_chunk(0, 0, text, KEY, True)
        self.assertTrue(compressed)
        _, _, compressed = frames.seal_chunk(0, 0, os.urandom(30000), KEY, True)
        self.assertFalse(compressed)
        pieces, _, _ = frames.seal_chunk(0, 0, text, KEY, True)
        self.assertLess(sum(len(p) for p in pieces), len(text) // 10)

    def test_flipped_payload_names_file_and_offset(self):
        pieces, _, _ = frames.seal_chunk(7, 2 << 20, os.urandom(5000), KEY, False)
        data = bytearray(b"".join(pieces))
        data[100] ^= 1
        chunk = frames.open_data(next(frames.iter_frames([bytes(data)])), KEY)
        with self.assertRaises(frames.IntegrityError) as caught:
            frames.unpack_chunk(chunk)
        self.assertEqual(caught.exception.where, (7, 2 << 20))
        self.assertIn("file #7 at offset 2097152", str(caught.exception))


class HandshakeTests(unittest.TestCase):
    def _handshake(self, client_key, server_key, peer_check=lambda host: None):
        client = auth.ClientHandshake("42", "s1", "control", 0, client_key)
        server = auth.ServerHandshake(lambda seed: auth.Admission(server_key, peer_check), "10.0.0.9")
        frame = lambda data: next(frames.iter_frames([data]))  # noqa: E731
        challenge = server.receive(frame(client.hello()))
        auth_frame = client.receive(frame(challenge))
        self.assertIsNone(server.receive(frame(auth_frame)))
        self.assertIsNone(client.receive(frame(server.accept(extra=1))))
        return client, server

    def test_same_key_gives_same_stream_key(self):
        key = auth.derive_auth_key("secret", "42")
        client, server = self._handshake(key, key)
        self.assertEqual(client.key, server.key)
        self.assertEqual(client.accept["extra"], 1)
        self.assertNotEqual(client.key, frames.ZERO_KEY)

    def test_wrong_key_is_rejected_by_the_receiver(self):
        with self.assertRaises(auth.Rejected) as caught:
            self._handshake(auth.derive_auth_key("wrong", "42"), auth.derive_auth_key("secret", "42"))
        self.assertIn("wrong key for seed 42", str(caught.exception))

    def test_key_is_bound_to_the_seed(self):
        with self.assertRaises(auth.Rejected):
            self._handshake(auth.derive_auth_key("secret", "41"), auth.derive_auth_key("secret", "42"))

    def test_keyed_sender_refuses_unkeyed_receiver_and_back(self):
        with self.assertRaises(auth.Rejected) as caught:
            self._handshake(auth.derive_auth_key("secret", "42"), None)
        self.assertIn("was given none", str(caught.exception))
        with self.assertRaises(auth.Rejected) as caught:
            self._handshake(None, auth.derive_auth_key("secret", "42"))
        self.assertIn("needs a key", str(caught.exception))

    def test_receiver_that_cannot_prove_the_key_is_refused(self):
        key = auth.derive_auth_key("secret", "42")
        frame = lambda data: next(frames.iter_frames([data]))  # noqa: E731
        for impostor_key in (auth.stream_key(None, b"", b""), None):
            client = auth.ClientHandshake("42", "s1", "data", 1, key)
            nonce = os.urandom(auth.NONCE_SIZE)
            client.hello()
            client.receive(frame(frames.seal_json(FrameType.CHALLENGE, {"nonce": nonce.hex()})))
            if impostor_key is None:
                # Right stream key (as if it were guessed), but no proof of the seed key.
                impostor_key = auth.stream_key(key, client.nonce, nonce)
            fake = frames.seal_json(FrameType.ACCEPT, {}, impostor_key)
            with self.assertRaises((auth.Rejected, frames.IntegrityError)):
                client.receive(frame(fake))
            self.assertIsNone(client.key)

    def test_peer_outside_allowed_networks_is_rejected(self):
        networks = auth.parse_networks(["192.168.0.0/16"])

        def check(host):
            if not auth.peer_allowed(host, networks):
                raise auth.Rejected(f"{host} is not in SeedAllowedNetworks")

        with self.assertRaises(auth.Rejected) as caught:
            self._handshake(None, None, check)
        self.assertIn("10.0.0.9 is not in SeedAllowedNetworks", str(caught.exception))

    def test_networks(self):
        nets = auth.parse_networks(["127.0.0.0/8", "fd00::/8"])
        self.assertTrue(auth.peer_allowed("127.0.0.2", nets))
        self.assertTrue(auth.peer_allowed("::ffff:127.0.0.1", nets))
        self.assertFalse(auth.peer_allowed("10.1.1.1", nets))
        self.assertTrue(auth.peer_allowed("10.1.1.1", ()))
        with self.assertRaises(ConfigError) as caught:
            auth.parse_networks(["10.0.0.0/33"])
        self.assertIn("SeedAllowedNetworks", caught.exception.message)


class ManifestTests(unittest.TestCase):
    def _entries(self, *items):
        return tuple(tree.Entry(**item) for item in items)

    def test_unsafe_paths_are_rejected(self):
        for path in ("/etc/passwd", "../x", "a/../../x", "a//b", "./a", ""):
            with self.assertRaises(BadRequest, msg=path):
                tree.validate(tree.Manifest(self._entries({"path": path, "kind": "f"}), 65536))

    def test_entry_under_a_symlink_is_rejected(self):
        entries = self._entries({"path": "d", "kind": "l", "target": "x"},
                                {"path": "d/f", "kind": "f"})
        with self.assertRaises(BadRequest) as caught:
            tree.validate(tree.Manifest(entries, 65536))
        self.assertIn("not under a directory", caught.exception.message)

    def test_symlinks_leaving_the_tree_are_rejected(self):
        for target in ("/etc/passwd", "../../x", "x/../../../y"):
            entries = self._entries({"path": "d", "kind": "d"}, {"path": "d/l", "kind": "l", "target": target})
            with self.assertRaises(BadRequest, msg=target) as caught:
                tree.validate(tree.Manifest(entries, 65536))
            self.assertIn("points outside", caught.exception.message)
        tree.validate(tree.Manifest(self._entries({"path": "d", "kind": "d"},
                                                  {"path": "d/l", "kind": "l", "target": "../d"}), 65536))

    def test_walk_refuses_a_symlink_out_of_the_source(self):
        root = self.mktemp()
        os.makedirs(root)
        os.symlink("/etc", os.path.join(root, "out"))
        with self.assertRaises(BadRequest) as caught:
            tree.walk(root)
        self.assertIn("points outside", caught.exception.message)

    def test_walk_follows_a_symlinked_root_and_nothing_below_it(self):
        """A datadir is often a symlink to its volume; links inside stay links."""
        base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(base, "volume", "db"))
        with open(os.path.join(base, "volume", "db", "t.ibd"), "wb") as fh:
            fh.write(b"x" * 5000)
        os.symlink("t.ibd", os.path.join(base, "volume", "db", "alias"))
        os.symlink("volume", os.path.join(base, "datadir"))
        manifest = tree.walk(os.path.join(base, "datadir"))
        self.assertEqual([(e.path, e.kind, e.size, e.target) for e in manifest.entries],
                         [("db", "d", 0, ""), ("db/alias", "l", 0, "t.ibd"), ("db/t.ibd", "f", 5000, "")])

    def test_walk_finds_sparse_extents_and_plans_chunks(self):
        root = self.mktemp()
        os.makedirs(root)
        with open(os.path.join(root, "sparse"), "wb") as fh:
            fh.truncate(10 << 20)
            fh.seek(4 << 20)
            fh.write(b"x" * 100_000)
        manifest = tree.walk(root, chunk_size=65536)
        (entry,) = manifest.entries
        self.assertEqual(entry.size, 10 << 20)
        self.assertIsNotNone(entry.extents)
        self.assertLess(manifest.total_bytes, 1 << 20)
        self.assertGreaterEqual(manifest.total_bytes, 100_000)
        table = plan.ChunkTable(manifest)
        self.assertEqual(sum(table.length[c] for c in table.todo()), manifest.total_bytes)
        self.assertEqual(table.chunk_id(0, (4 << 20) + 65536), 1)
        self.assertIsNone(table.chunk_id(0, 4096))

    def test_digests_depend_on_every_chunk(self):
        manifest = tree.Manifest(self._entries({"path": "f", "kind": "f", "size": 200000}), 65536)
        a, b = plan.ChunkTable(manifest), plan.ChunkTable(manifest)
        for cid in range(len(a)):
            a.mark_done(cid, b"\x02" * 32)
            b.mark_done(cid, b"\x02" * 32 if cid else b"\x01" * 32)
        self.assertTrue(a.complete)
        self.assertEqual(a.files_done, 1)
        self.assertNotEqual(a.tree_digest(), b.tree_digest())
        self.assertEqual(b.check_digests(io.BytesIO(a.file_digests()))[:2], (False, 0))
        self.assertEqual(a.check_digests(io.BytesIO(a.file_digests())), (True, None, a.tree_digest()))
        a.reset()
        self.assertEqual((a.bytes_done, len(a.todo())), (0, len(a)))
        self.assertEqual(a.known(0), b"\x02" * 32)

    def test_check_digests_names_the_first_file_that_differs(self):
        """Compared a piece of the file digests at a time, across pieces, and theirs
        shorter or longer than ours."""
        self.patch(plan, "DIGEST_PIECE", 2)
        manifest = tree.Manifest(self._entries(*({"path": f"f{i}", "kind": "f", "size": 10}
                                                 for i in range(7))), 65536)
        table = plan.ChunkTable(manifest)
        for cid in range(len(table)):
            table.mark_done(cid, bytes([cid + 1]) * 32)
        mine = table.file_digests()
        self.assertEqual(len(list(table.digest_pieces())), 4)
        self.assertEqual(table.check_digests(io.BytesIO(bytearray(mine))), (True, None, table.tree_digest()))
        for index in range(7):
            theirs = bytearray(mine)
            theirs[36 * index + 9] ^= 1
            self.assertEqual(table.check_digests(io.BytesIO(theirs))[:2], (False, index))
        self.assertEqual(table.check_digests(io.BytesIO(mine[:72]))[:2], (False, 2))
        self.assertEqual(table.check_digests(io.BytesIO(mine + bytes(36)))[:2], (False, 6))
        self.assertEqual(plan.ChunkTable(tree.Manifest([], 65536)).check_digests(io.BytesIO(b"x"))[:2], (False, None))

    def test_manifest_columns_give_entries_back(self):
        entries = self._entries({"path": "d", "kind": "d", "mode": 0o750, "user": "mysql"},
                                {"path": "d/f", "kind": "f", "size": 10, "extents": ((0, 4),)},
                                {"path": "l", "kind": "l", "target": "d/f", "mtime_ns": -5})
        manifest = tree.Manifest(entries, 65536)
        self.assertEqual(list(manifest.entries), list(entries))
        self.assertEqual(manifest.entries[-1].target, "d/f")
        batches = tree.pack_batches(manifest, batch=2)
        again = tree.manifest_from_batches(batches, 65536, 3, manifest.digest().hex())
        self.assertEqual(list(again.entries), list(entries))
        with self.assertRaises(BadRequest) as caught:
            tree.manifest_from_batches(batches[:1], 65536, 3, manifest.digest().hex())
        self.assertIn("incomplete or altered", caught.exception.message)


def _columns(manifest: tree.Manifest) -> tuple:
    return (manifest.paths, bytes(manifest.kinds), list(manifest.sizes), list(manifest.modes),
            list(manifest.mtimes), list(manifest.uids), list(manifest.gids),
            [manifest.names[i] for i in manifest.users], [manifest.names[i] for i in manifest.groups],
            manifest.targets, manifest.extents)


_good_entry = st.tuples(
    st.text("ab/.", min_size=1, max_size=6), st.sampled_from("fdl"), st.integers(0, 2**63 - 1),
    st.integers(0, 0o7777), st.integers(-2**63, 2**63 - 1), st.sampled_from(["root", "mysql", ""]),
    st.sampled_from(["root", "mysql"]), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
    st.sampled_from(["", "x"]), st.one_of(st.none(), st.lists(st.tuples(st.integers(0, 99), st.integers(0, 99)),
                                                            max_size=2)))
#: Anything a JSON batch may hold where a field is expected, out of range or of a wrong type.
_bad_value = st.one_of(st.none(), st.booleans(), st.integers(-2**65, 2**65), st.floats(allow_nan=False),
                       st.text(max_size=3), st.lists(st.integers(), max_size=2))


class BulkManifestTests(unittest.TestCase):
    """Manifest.add_wire_many (columns checked by C loops) against add_wire, entry by
    entry: the same columns for good batches, the same refusal for bad ones."""

    @staticmethod
    def _one_by_one(items):
        manifest = tree.Manifest()
        try:
            for item in items:
                manifest.add_wire(item)
        except BadRequest as e:
            return e.message
        return _columns(manifest)

    @staticmethod
    def _bulk(items):
        manifest = tree.Manifest()
        try:
            manifest.add_wire_many(items)
        except BadRequest as e:
            return e.message
        return _columns(manifest)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(_good_entry.map(list), max_size=12), st.data())
    def test_same_as_entry_by_entry(self, items, data):
        if items and data.draw(st.booleans()):
            where = data.draw(st.integers(0, len(items) - 1))
            field = data.draw(st.integers(0, 11))
            if field == 11:
                items[where] = items[where][:data.draw(st.integers(0, 10))]
            else:
                items[where][field] = data.draw(_bad_value)
        self.assertEqual(self._bulk(items), self._one_by_one(items))

    def test_a_batch_of_the_wrong_shape_is_refused_as_entry_by_entry(self):
        for items in ([{"a": 1}], ["abcdefghijk"], [[1] * 11]):
            self.assertEqual(self._bulk(items), self._one_by_one(items))
            self.assertIsInstance(self._bulk(items), str)


class MeterTests(unittest.TestCase):
    def test_token_bucket_holds_the_average_rate(self):
        clock = task.Clock()
        bucket = TokenBucket(clock, 1000)
        sent = 0
        while clock.seconds() < 10:
            delay = bucket.delay()
            if delay:
                clock.advance(delay)
                continue
            bucket.take(300)
            sent += 300
        self.assertAlmostEqual(sent / clock.seconds(), 1000, delta=100)
        bucket.set_rate(0)
        self.assertEqual(bucket.delay(), 0)

    def test_rate_meter(self):
        clock = task.Clock()
        meter = RateMeter(clock)
        for i in range(5):
            meter.sample(i * 500)
            clock.advance(1)
        self.assertAlmostEqual(meter.rate(), 500)


def _mapped_rss_kb(column) -> int:
    """Resident KiB of the mapping a spilled column is in, from /proc/self/smaps."""
    start = ctypes.addressof(ctypes.c_char.from_buffer(column))
    rss, inside = None, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(x, 16) for x in head.split("-"))
                inside = low <= start < high
            elif inside and head == "Rss:":
                rss = int(line.split()[1])
    return rss


class SpilledTableTests(unittest.TestCase):
    """A large chunk table, manifest and pins keep their columns in unnamed files of the
    directory they are given (the manifest's and the pins' growing there), let the pages
    touched go at each spill.drop_all, and answer as when held in memory."""

    def _manifest(self, files: int, big: bool = False, directory: str | None = None) -> tree.Manifest:
        entries = [tree.Entry(path=f"d/f\udcff{i}", kind="f", size=1000 + i, uid=i, user=f"u{i % 3}")
                   for i in range(files)]
        if big:
            entries.append(tree.Entry(path="big", kind="f", size=5 * 65536 + 7))
            entries.append(tree.Entry(path="sparse", kind="f", size=9 * 65536,
                                      extents=((0, 65536), (4 * 65536, 9 * 65536))))
        return tree.Manifest([tree.Entry(path="d", kind="d"), *entries], 65536, directory)

    def test_the_same_answers_as_in_memory(self):
        directory = self.mktemp()
        os.makedirs(directory)
        self.patch(spill, "SPILL_FROM", 1)
        for big in (False, True):
            memory = plan.ChunkTable(self._manifest(300, big))
            spilled = plan.ChunkTable(self._manifest(300, big, directory), directory)
            self.assertIsInstance(memory.digests, bytearray)
            self.assertIsInstance(spilled.digests, memoryview)
            self.assertIsInstance(spilled.files, memoryview)
            self.assertIsInstance(spilled.manifest.sizes, memoryview)
            self.assertIsInstance(spilled.manifest.paths.blob, memoryview)
            self.assertEqual(os.listdir(directory), [], "the files have no name")
            self.assertEqual(spilled.manifest.entries, memory.manifest.entries)
            self.assertEqual(spilled.manifest.wire_rows(0, 302), memory.manifest.wire_rows(0, 302))
            self.assertEqual(list(spilled.manifest.paths), list(memory.manifest.paths))
            self.assertEqual(spilled.manifest.paths.span(1, 4), memory.manifest.paths.span(1, 4))
            for table in (memory, spilled):
                for cid in range(0, len(table), 2):
                    table.mark_done(cid, cid.to_bytes(32, "big"))
            spill.drop_all()
            for name in ("files", "file", "offset", "length", "first", "remaining", "done", "digests"):
                self.assertEqual(bytes(getattr(spilled, name)), bytes(getattr(memory, name)), name)
            self.assertEqual(list(spilled.todo()), list(memory.todo()))
            self.assertEqual(spilled.done_records(), memory.done_records())
            self.assertEqual((spilled.bytes_done, spilled.files_done), (memory.bytes_done, memory.files_done))
            for index, offset in ((3, 0), (301, 65536), (302, 4 * 65536), (302, 65536)):
                self.assertEqual(spilled.chunk_id(index, offset), memory.chunk_id(index, offset))
            for table in (memory, spilled):
                for cid in range(1, len(table), 2):
                    table.mark_done(cid, b"\x01" * 32)
            self.assertTrue(spilled.complete)
            self.assertEqual(spilled.tree_digest(), memory.tree_digest())
            spilled.reset()
            self.assertEqual((spilled.bytes_done, len(spilled.todo())), (0, len(spilled)))
            self.assertEqual(spilled.known(2), (2).to_bytes(32, "big"))

    def test_pins_answer_as_in_memory(self):
        directory = self.mktemp()
        os.makedirs(directory)
        self.patch(spill, "SPILL_FROM", 1)
        self.patch(spill, "SPILL_FROM", 7)
        manifest, held, grown = self._manifest(50), tree.Pins(), tree.Pins(directory)
        for i in range(len(manifest)):
            for pins in (held, grown):
                pins.add(types.SimpleNamespace(st_dev=3, st_ino=7 + i, st_ctime_ns=11 * i))
        grown.seal()
        self.assertIsInstance(grown.inodes, memoryview)
        self.assertEqual(b"".join(grown.pack(manifest)), b"".join(held.pack(manifest)))
        self.assertEqual(grown.inodes[40], 47)
        self.assertEqual(os.listdir(directory), [])

    def test_pages_touched_are_let_go(self):
        """What stays mapped in after a drop is at most a few pages per column (a fault
        maps the pages around it too) against 4 MB touched."""
        directory = self.mktemp()
        os.makedirs(directory)
        self.patch(spill, "SPILL_FROM", 1)
        table = plan.ChunkTable(self._manifest(200_000), directory)
        spill.drop_all()
        self.assertLess(_mapped_rss_kb(table.digests), 512, "dropped once made")
        for cid in range(100_000):
            table.mark_done(cid, b"\x07" * 32)
        self.assertGreater(_mapped_rss_kb(table.digests), 4000, "100,000 chunks done")
        spill.drop_all()
        self.assertLess(_mapped_rss_kb(table.digests), 512, "dropped")
        self.assertEqual(table.known(100), b"\x07" * 32)

    def test_the_seed_manager_lets_the_pages_go_every_interval(self):
        from twisted.internet import reactor

        from orchagent.config import Config
        from orchagent.seed.manager import SeedManager
        from tests import seed_support as S

        directory = self.mktemp()
        os.makedirs(directory)
        self.patch(spill, "SPILL_FROM", 1)
        clock = task.Clock()
        manager = SeedManager(Config(state_dir=os.path.join(directory, "state")), reactor, None,
                              S.Host(directory), S.Service(), S.Snapshots(directory), clock=clock)
        manager.startService()
        self.addCleanup(manager.stopService)
        table = plan.ChunkTable(self._manifest(200_000), directory)
        for cid in range(100_000):
            table.mark_done(cid, b"\x07" * 32)
        clock.advance(spill.DROP_INTERVAL / 2)
        self.assertGreater(_mapped_rss_kb(table.digests), 4000, "not yet")
        clock.advance(spill.DROP_INTERVAL / 2)
        self.assertLess(_mapped_rss_kb(table.digests), 512, "dropped")

    def test_a_walk_grown_in_files_is_the_walk_in_memory(self):
        """Names that are not UTF-8, links, a sparse file: the same manifest and pins,
        the columns in files from the first entry on."""
        directory, root = self.mktemp(), self.mktemp()
        os.makedirs(directory)
        os.makedirs(os.path.join(root, "db"))
        for i in range(40):
            with open(os.path.join(root.encode(), b"db", b"t\xff%d.ibd" % i), "wb") as fh:
                fh.write(b"x" * i)
        os.symlink("db", os.path.join(root, "link"))
        with open(os.path.join(root, "sparse"), "wb") as fh:
            fh.truncate(1 << 20)
            fh.write(b"y")
        memory_pins, file_pins = tree.Pins(), tree.Pins(directory)
        memory = tree.walk(root, 65536, pins=memory_pins)
        self.patch(spill, "SPILL_FROM", 0)
        grown = tree.walk(root, 65536, pins=file_pins, directory=directory)
        file_pins.seal()
        self.assertIsInstance(grown.paths.blob, memoryview)
        self.assertIsInstance(grown.sizes, memoryview)
        self.assertEqual(grown.entries, memory.entries)
        self.assertEqual(b"".join(file_pins.pack(grown)), b"".join(memory_pins.pack(memory)))
        self.assertEqual(os.listdir(directory), [])

    def test_pins_packed_a_stretch_at_a_time_are_the_pins_packed_whole(self):
        """The pins of a restart are packed a few files at a time: the same body, and a
        later walk compares equal to it (a stretch out of place would not)."""
        root = self.mktemp()
        os.makedirs(os.path.join(root, "db"))
        for i in range(7):
            with open(os.path.join(root, "db", f"t{i}.ibd"), "wb") as fh:
                fh.write(b"x" * i)
        pins = tree.Pins()
        manifest = tree.walk(root, 65536, pins=pins)
        whole = b"".join(pins.pack(manifest))
        self.patch(tree, "_STRETCH", 2)
        pieces = b"".join(pins.pack(manifest))
        unzstd = zstandard.ZstdDecompressor()
        self.assertEqual(unzstd.decompress(pieces, max_output_size=1 << 20),
                         unzstd.decompress(whole, max_output_size=1 << 20))
        again = tree.Pins()
        again.compare(tree.walk(root, 65536, pins=again), pieces, root)
        os.utime(os.path.join(root, "db", "t5.ibd"), ns=(1, 1))
        changed = tree.Pins()
        with self.assertRaises(BadRequest) as caught:
            changed.compare(tree.walk(root, 65536, pins=changed), pieces, root)
        self.assertIn("t5.ibd changed while it was being sent (mtime 1, was", caught.exception.message)

    def test_a_pass_over_entries_far_apart_lets_their_pages_go_as_it_goes(self):
        """Each entry read maps the pages around it (64 KB a column): a pass over a tree's
        directories, far apart in its columns, mapped them whole before the manager's
        next drop (the page cache's large folios map up to 256 KB at a time here).
        spill.dropping lets them go every 8 entries."""
        directory = self.mktemp()
        os.makedirs(directory)
        (column,) = spill.spill(directory, [("B", 64 << 20)])
        column[:] = b"\1" * len(column)  # in the page cache, as a walk leaves it
        spill.drop_all()
        touched = []
        drop = spill.drop_all
        self.patch(spill, "drop_all", lambda: (touched.append(_mapped_rss_kb(column)), drop())[1])
        far_apart = range(0, len(column), 256 << 10)
        self.assertEqual(sum(column[i] for i in spill.dropping(far_apart)), len(far_apart))
        self.assertEqual(len(touched), len(far_apart) // 8)
        self.assertLess(max(touched), 4096, touched)
        self.assertGreater(max(touched), 8 * 4, "each entry read mapped a page at least")
        touched.clear()
        self.assertEqual(sum(column[i] for i in far_apart), len(far_apart))
        spill.drop_all()
        self.assertGreater(touched[0], 8 * 1024, "without the drops, far more stays mapped")

    def test_a_column_that_cannot_grow_goes_on_in_memory(self):
        """StateDir full in the middle of a walk: what the file held and what follows, in
        memory."""
        directory = self.mktemp()
        os.makedirs(directory)
        calls = []
        fallocate = os.posix_fallocate

        def full_after_the_first(fd, offset, length):
            calls.append(length)
            if len(calls) > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return fallocate(fd, offset, length)

        self.patch(spill.os, "posix_fallocate", full_after_the_first)
        column = spill.Growing(directory, "Q")
        first = column.extend(array("Q", range(100)))
        self.assertIsInstance(first, memoryview)
        whole = column.extend(array("Q", range(100, 200_000)))
        self.assertIsInstance(whole, array)
        self.assertEqual(list(whole), list(range(200_000)))
        self.assertEqual(list(column.extend(array("Q", [7]))[-2:]), [199_999, 7])

    def test_a_directory_that_cannot_hold_it_leaves_it_in_memory(self):
        self.patch(spill, "SPILL_FROM", 1)
        missing = os.path.join(self.mktemp(), "missing")
        table = plan.ChunkTable(self._manifest(10, directory=missing), missing)
        self.assertIsInstance(table.digests, bytearray)
        self.assertIsInstance(table.manifest.sizes, array)
        table.mark_done(0, b"\x02" * 32)
        self.assertEqual(table.known(0), b"\x02" * 32)


class SpoolTests(unittest.TestCase):
    """What a seed keeps in StateDir until its end (spill.Spool): read back as written,
    from an unnamed file, or in memory once the file fails a spool with a fallback."""

    def pieces(self) -> list[bytes]:
        return [os.urandom(n) for n in (1, 4096, 70_000, 0, 3)]

    def check(self, spool: spill.Spool, pieces: list[bytes]) -> None:
        whole = b"".join(pieces)
        self.assertEqual(spool.size, len(whole))
        self.assertEqual(spool.read(1, 4097), whole[1:4097])
        self.assertEqual(b"".join(spool.pieces(1000)), whole)
        with spool.open() as reader:
            self.assertEqual(reader.read(), whole)

    def test_pieces_are_read_back_from_an_unnamed_file(self):
        directory = self.mktemp()
        os.makedirs(directory)
        spool = spill.Spool(directory)
        with spool.open() as reader:
            self.assertEqual(reader.read(), b"")
        pieces = self.pieces()
        for piece in pieces:
            spool.add(piece)
        self.assertIsNone(spool.memory)
        self.assertEqual(os.listdir(directory), [])
        self.check(spool, pieces)
        spool.close()
        with self.assertRaises(OSError) as caught:
            spool.add(b"more")
        self.assertIn("is closed", str(caught.exception))

    def full_after(self, calls: int) -> None:
        """pwrite writes half of one piece, then the file system is full."""
        real, count = os.pwrite, [0]

        def pwrite(fd, data, offset):
            count[0] += 1
            if count[0] == calls:
                return real(fd, memoryview(data)[:len(data) // 2], offset)
            if count[0] > calls:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, data, offset)

        self.patch(spill.os, "pwrite", pwrite)

    def test_a_spool_with_a_fallback_goes_on_in_memory(self):
        directory = self.mktemp()
        os.makedirs(directory)
        self.full_after(3)
        spool, pieces = spill.Spool(directory, fallback=True), self.pieces()
        for piece in pieces:
            spool.add(piece)
        self.assertIsNotNone(spool.memory)
        self.check(spool, pieces)

    def test_a_spool_without_one_raises(self):
        directory = self.mktemp()
        os.makedirs(directory)
        self.full_after(3)
        spool, pieces = spill.Spool(directory), self.pieces()
        with self.assertRaises(OSError) as caught:
            for piece in pieces:
                spool.add(piece)
        self.assertEqual(caught.exception.errno, errno.ENOSPC)
