"""Which chunks of a seed are done, and the digests built from them.

Both sides keep a :class:`ChunkTable` over the same plan (see
:meth:`~orchagent.seed.tree.Manifest.chunks`).  A file's digest is BLAKE3 over its
chunks' (offset, length, content digest) in offset order; the tree digest is BLAKE3 over
the manifest digest and every file's digest in manifest order.  The receiver builds them
from chunks it verified and wrote; the sender from chunks it read.  Equal tree digests
mean the same metadata and the same bytes at the same places, whichever stream or
session carried each chunk.
"""

from __future__ import annotations

import struct

import blake3

from orchagent.seed.tree import FILE, Manifest

_PART = struct.Struct(">QI32s")
_INDEX = struct.Struct(">I")


class ChunkTable:
    """The plan's chunks with their state; all methods are cheap (reactor thread)."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.length: dict[tuple[int, int], int] = {}
        self.remaining: dict[int, set[int]] = {}
        self.digests: dict[int, dict[int, bytes]] = {}
        for index, offset, length in manifest.chunks():
            self.length[(index, offset)] = length
            self.remaining.setdefault(index, set()).add(offset)
        self.files = [i for i, e in enumerate(manifest.entries) if e.kind == FILE]
        self.bytes_total = sum(self.length.values())
        self.bytes_done = 0
        self.files_done = sum(1 for i in self.files if not self.remaining.get(i))

    def expected_length(self, index: int, offset: int) -> int | None:
        return self.length.get((index, offset))

    def is_done(self, index: int, offset: int) -> bool:
        return offset in self.digests.get(index, ())

    def mark_done(self, index: int, offset: int, digest: bytes) -> bool:
        """Record a verified chunk; returns True when that completed its file."""
        done = self.digests.setdefault(index, {})
        if offset in done:
            done[offset] = digest
            return False
        done[offset] = digest
        self.bytes_done += self.length[(index, offset)]
        left = self.remaining[index]
        left.discard(offset)
        if not left:
            self.files_done += 1
            return True
        return False

    def forget(self, index: int, offset: int) -> None:
        """A chunk thought done is not (its bytes did not match on re-check)."""
        done = self.digests.get(index, {})
        if offset in done:
            del done[offset]
            if not self.remaining[index]:
                self.files_done -= 1
            self.remaining[index].add(offset)
            self.bytes_done -= self.length[(index, offset)]

    @property
    def complete(self) -> bool:
        return self.bytes_done == self.bytes_total and self.files_done == len(self.files)

    def todo(self) -> list[tuple[int, int, int]]:
        """The chunks not done yet, in plan order."""
        return [(i, o, n) for (i, o), n in self.length.items() if not self.is_done(i, o)]

    def done_list(self) -> list[tuple[int, int, int, bytes]]:
        return [(i, o, self.length[(i, o)], d)
                for i, offsets in self.digests.items() for o, d in offsets.items()]

    def file_digest(self, index: int) -> bytes:
        h = blake3.blake3()
        for offset in sorted(self.digests.get(index, {})):
            h.update(_PART.pack(offset, self.length[(index, offset)], self.digests[index][offset]))
        return h.digest()

    def file_digests(self) -> dict[int, bytes]:
        return {i: self.file_digest(i) for i in self.files}

    def tree_digest(self, file_digests: dict[int, bytes] | None = None) -> bytes:
        digests = self.file_digests() if file_digests is None else file_digests
        h = blake3.blake3(self.manifest.digest())
        for index in self.files:
            h.update(_INDEX.pack(index) + digests[index])
        return h.digest()


def pack_digests(digests: dict[int, bytes]) -> bytes:
    return b"".join(_INDEX.pack(i) + d for i, d in sorted(digests.items()))


def unpack_digests(data: bytes) -> dict[int, bytes]:
    if len(data) % 36:
        raise ValueError("digest list has a partial entry")
    return {_INDEX.unpack_from(data, p)[0]: data[p + 4:p + 36] for p in range(0, len(data), 36)}
