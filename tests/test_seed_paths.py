"""The manifest's path column (tree.PathColumn): any file name, UTF-8 or not, comes back
as it was, through the column, the manifest's wire form and the sender's pins."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.trial import unittest

from orchagent.errors import BadRequest
from orchagent.seed import tree

#: A file name as the kernel takes it: any bytes but NUL and "/", not "." or "..".
_names = st.binary(min_size=1, max_size=12).filter(
    lambda b: b"\0" not in b and b"/" not in b and b not in (b".", b".."))
#: Paths of any bytes but NUL, "/" included.
_raw_paths = st.lists(st.binary(max_size=20).filter(lambda b: b"\0" not in b), max_size=30)


def _wire(path: str, kind: str = tree.FILE, size: int = 0) -> list:
    return [path, kind, size, 0o640, 0, "mysql", "mysql", 27, 27, "", None]


def _tree(top: list[bytes], inside: list[bytes], ordered: bool) -> tree.Manifest:
    """A directory ``d`` holding ``inside`` beside the files ``top``, in walk order (the
    names sorted as str, as the walk sorts them) or as given."""
    names = [os.fsdecode(n) for n in dict.fromkeys(top) if n != b"d"]
    below = [os.fsdecode(n) for n in dict.fromkeys(inside)]
    if ordered:
        names, below = sorted(names), sorted(below)
    manifest = tree.Manifest(chunk_size=65536)
    manifest.add_wire_many([_wire("d", tree.DIR)] + [_wire(f"d/{n}", size=3) for n in below]
                           + [_wire(n, size=1) for n in names])
    return manifest


class PathColumnTests(unittest.TestCase):
    @settings(max_examples=200, deadline=None)
    @given(_raw_paths, st.integers(0, 3))
    def test_bytes_come_back_exactly(self, raw, split):
        paths = [os.fsdecode(p) for p in raw]
        column = tree.PathColumn(paths[:split])
        for path in paths[split:split + 2]:
            column.append(path)
        column.extend(paths[split + 2:])
        self.assertEqual(len(column), len(paths))
        self.assertEqual(list(column), paths)
        self.assertEqual(column, paths)
        self.assertEqual([os.fsencode(column[i]) for i in range(len(raw))], raw)
        if paths:
            self.assertEqual(column[-1], paths[-1])
            self.assertEqual(column[1:-1], paths[1:-1])
            self.assertEqual(column[::2], paths[::2])
        self.assertEqual(column, tree.PathColumn(paths))

    def test_a_nul_or_a_name_without_bytes_is_refused(self):
        column = tree.PathColumn(["a"])
        with self.assertRaises(ValueError):
            column.extend(["b", "c\x00d"])
        with self.assertRaises(UnicodeEncodeError):
            column.append("\ud800")
        self.assertEqual(list(column), ["a"])
        manifest = tree.Manifest()
        for path, words in (("c\x00d", "unsafe path"), ("\ud800", "no file name")):
            for add in (manifest.add_wire, lambda item: manifest.add_wire_many([item])):
                with self.assertRaises(BadRequest) as caught:
                    add(_wire(path))
                self.assertIn(words, caught.exception.message)
        self.assertEqual(len(manifest), 0)


class NamesThroughTheWireTests(unittest.TestCase):
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(_names, max_size=10), st.lists(_names, max_size=10), st.booleans())
    def test_any_names_round_trip(self, top, inside, ordered):
        manifest = _tree(top, inside, ordered)
        batches = tree.pack_batches(manifest, batch=3)
        again = tree.manifest_from_batches(batches, 65536, len(manifest), manifest.digest().hex())
        self.assertEqual(again.paths, manifest.paths)
        self.assertEqual(list(again.entries), list(manifest.entries))
        self.assertEqual({os.fsencode(p) for p in again.paths},
                         {b"d"} | {b"d/" + n for n in inside} | set(top))

    @settings(max_examples=150, deadline=None)
    @given(st.lists(_names, min_size=1, max_size=8), st.data())
    def test_a_path_that_comes_twice_is_refused_in_any_order(self, names, data):
        manifest = _tree([], names, ordered=data.draw(st.booleans()))
        twice = data.draw(st.sampled_from(list(manifest.paths)))
        where = data.draw(st.integers(0, len(manifest)))
        items = [manifest.wire(i) for i in range(len(manifest))]
        items.insert(where, _wire(twice, tree.DIR if twice == "d" else tree.FILE))
        tree.validate(manifest)
        with self.assertRaises(BadRequest) as caught:
            tree.validate(tree.Manifest([tree.Entry.from_wire(i) for i in items], 65536))
        self.assertRegex(caught.exception.message, "duplicate path|not under a directory")


class WalkedNamesTests(unittest.TestCase):
    def test_non_utf8_names_are_walked_pinned_and_compared(self):
        root = self.mktemp().encode()
        names = [b"caf\xe9", b"\xff\xfe.ibd", "é.frm".encode(), b"ok"]
        os.makedirs(root + b"/db\x80")
        for name in names:
            with open(root + b"/db\x80/" + name, "wb") as fh:
                fh.write(name)
        pins = tree.Pins()
        manifest = tree.walk(os.fsdecode(root), pins=pins)
        self.assertEqual(sorted(os.fsencode(p) for p in manifest.paths),
                         sorted([b"db\x80"] + [b"db\x80/" + n for n in names]))
        packed = b"".join(pins.pack(manifest))
        again = tree.Pins()
        again.compare(tree.walk(os.fsdecode(root), pins=again), packed, os.fsdecode(root))
        os.utime(root + b"/db\x80/caf\xe9", ns=(1, 1))
        changed = tree.Pins()
        with self.assertRaises(BadRequest) as caught:
            changed.compare(tree.walk(os.fsdecode(root), pins=changed), packed, os.fsdecode(root))
        self.assertIn(os.fsdecode(b"caf\xe9"), caught.exception.message)
        self.assertIn("mtime 1, was", caught.exception.message)
        fresh = tree.Pins()
        packed = b"".join(fresh.pack(tree.walk(os.fsdecode(root), pins=fresh)))
        os.unlink(root + b"/db\x80/\xff\xfe.ibd")
        gone = tree.Pins()
        with self.assertRaises(BadRequest) as caught:
            gone.compare(tree.walk(os.fsdecode(root), pins=gone), packed, os.fsdecode(root))
        self.assertIn(os.fsdecode(b"\xff\xfe.ibd"), caught.exception.message)
        self.assertIn("gone", caught.exception.message)
