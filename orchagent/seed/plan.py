"""Which chunks of a seed are done, and the digests built from them.

Both sides keep a :class:`ChunkTable` over the same plan (see
:meth:`~orchagent.seed.tree.Manifest.chunks`).  A file's digest is its chunk's content
digest when it has one chunk, else BLAKE3 over its chunks' (offset, length, content
digest) in offset order (a lone chunk's offset and length are fixed by the plan, from
the verified manifest); the tree digest is BLAKE3 over the manifest digest and every
file's (index, digest) in manifest order.  The receiver builds them from chunks it
verified and wrote; the sender from chunks it read.  Equal tree digests mean the same
metadata and the same bytes at the same places, whichever stream or session carried
each chunk.

The table is arrays indexed by chunk number (chunks of a file are consecutive), not
objects: a seed of 50,000 small files costs a few MB here, and a larger one given a
directory (StateDir) keeps them in a file there (orchagent.seed.spill): 66 bytes a chunk
on each side, as many as its manifest's columns (which grow in files of their own).
"""

from __future__ import annotations

import bisect
import operator
import os
import struct
from array import array
from itertools import accumulate, compress, islice
from typing import BinaryIO, Iterator

import blake3

from orchagent.seed import frames, spill
from orchagent.seed.tree import Manifest

_PART = struct.Struct(">QI32s")
_INDEX = struct.Struct(">I")
DIGEST = 32
#: One entry of a chunk list on the wire (READY): file, offset, length, digest.
RECORD = struct.Struct(">IQI32s")


#: Files in a piece of the packed file digests (a DIGESTS frame: 590 KB).  Each piece is
#: made, copied and framed on the sender and compared with what the receiver kept: with
#: 100,000 files (3.6 MB) a piece, that took 12-15 MB of each engine at the end of a
#: million-file seed.
DIGEST_PIECE = 16_384
#: Files the columns of a table of small files are made from at a time.
_STRETCH = 65_536


class ChunkTable:
    """The plan's chunks with their state; all methods are cheap (reactor thread).
    ``directory``: where a large table spills (see the module docstring)."""

    def __init__(self, manifest: Manifest, directory: str | None = None):
        self.manifest = manifest
        count = len(manifest)
        self.files = manifest.file_indexes(directory)
        sizes = manifest.sizes
        if not manifest.extents and max(sizes, default=0) <= manifest.chunk_size:
            # Every file is one chunk or none (the common case of many small files): the
            # columns made from the manifest's by C loops, a stretch of files at a time,
            # straight into their place (made whole first, 17 MB more at a million).
            self._make_columns(directory, sum(map(bool, map(sizes.__getitem__, self.files))), count)
            filled = 0
            for start in range(0, len(self.files), _STRETCH):
                stretch = self.files[start:start + _STRETCH]
                part = array("I", compress(stretch, map(sizes.__getitem__, stretch)))
                self.file[filled:filled + len(part)] = part
                self.length[filled:filled + len(part)] = array("I", map(sizes.__getitem__, part))
                filled += len(part)
                spill.drop_all()
            with_data = bytearray(count)
            for index in self.file:
                with_data[index] = 1
            running = accumulate(with_data, initial=0)
            for start in range(0, count + 1, _STRETCH):
                part = array("Q", islice(running, _STRETCH))
                self.first[start:start + len(part)] = part
                spill.drop_all()
            del with_data
        else:
            file, offset, length = array("I"), array("Q"), array("I")
            for index, at, size in manifest.chunks():
                file.append(index)
                offset.append(at)
                length.append(size)
            first = array("Q", [0]) * (count + 1)
            cursor = 0
            for index in range(count + 1):
                while cursor < len(file) and file[cursor] < index:
                    cursor += 1
                first[index] = cursor
            self._make_columns(directory, len(file), count)
            self.file[:], self.offset[:], self.length[:], self.first[:] = file, offset, length, first
            del file, offset, length, first
        if directory is not None and len(self.file) >= spill.SPILL_FROM:
            spill.trim()
            spill.drop_all()  # the manifest's columns read above
        self.bytes_total = sum(self.length)
        self.reset()

    def _make_columns(self, directory: str | None, chunks: int, count: int) -> None:
        """The columns, zeros, in a file of ``directory`` when the table is large."""
        self.file, self.offset, self.length, self.first, self.digests, self.done, self.remaining = \
            spill.spill(directory if chunks >= spill.SPILL_FROM else None, [
                ("I", chunks), ("Q", chunks), ("I", chunks), ("Q", count + 1), ("B", DIGEST * chunks),
                ("B", chunks), ("I", count)])

    def reset(self) -> None:
        """Nothing done (digests are kept: :meth:`known` still answers)."""
        self.done[:] = bytes(len(self.done))
        # In place, from C loops, a stretch at a time (at a million files a list or a copy
        # of a column is 8 MB or more at the peak, and the columns it reads 12 MB more).
        first, count = self.first, len(self.remaining)
        for start in range(0, count, _STRETCH):
            stop = min(start + _STRETCH, count)
            self.remaining[start:stop] = array(
                "I", map(operator.sub, first[start + 1:stop + 1], first[start:stop]))
            spill.drop_all()
        self.bytes_done = 0
        #: Files without chunks (empty or all holes) count as done from the start.
        self.chunkless_files = sum(map(operator.not_, map(self.remaining.__getitem__, self.files)))
        self.files_done = self.chunkless_files

    def __len__(self) -> int:
        return len(self.file)

    def chunk_id(self, index: int, offset: int) -> int | None:
        """The chunk at ``offset`` of entry ``index``, if the plan has one there."""
        if not 0 <= index < len(self.manifest):
            return None
        lo, hi = self.first[index], self.first[index + 1]
        cid = bisect.bisect_left(self.offset, offset, lo, hi)
        return cid if cid < hi and self.offset[cid] == offset else None

    def chunk(self, cid: int) -> tuple[int, int, int]:
        return self.file[cid], self.offset[cid], self.length[cid]

    def whole_file(self, index: int) -> bool:
        """A dense file of one chunk: read, or written and closed, in one go."""
        return self.first[index + 1] - self.first[index] == 1 and index not in self.manifest.extents

    def expected_length(self, index: int, offset: int) -> int | None:
        cid = self.chunk_id(index, offset)
        return None if cid is None else self.length[cid]

    def known(self, cid: int) -> bytes | None:
        """The digest last recorded for chunk ``cid`` (this session or an earlier one)."""
        digest = bytes(self.digests[cid * DIGEST:(cid + 1) * DIGEST])
        return digest if any(digest) else None

    def mark_done(self, cid: int, digest: bytes) -> bool:
        """Record a verified chunk; returns True when that completed its file."""
        self.digests[cid * DIGEST:(cid + 1) * DIGEST] = digest
        if self.done[cid]:
            return False
        self.done[cid] = 1
        self.bytes_done += self.length[cid]
        index = self.file[cid]
        self.remaining[index] -= 1
        if not self.remaining[index]:
            self.files_done += 1
            return True
        return False

    @property
    def complete(self) -> bool:
        return self.bytes_done == self.bytes_total and self.files_done == len(self.files)

    def todo(self, directory: str | None = None) -> array | memoryview:
        """The chunks not done yet, in plan order (no object per chunk; with
        ``directory``, in a mapped file there when many: see :func:`spill.column`)."""
        done, count = self.done, len(self.done)
        parts = (array("I", compress(range(start, min(start + _STRETCH, count)),
                                     map(operator.not_, done[start:start + _STRETCH])))
                 for start in range(0, count, _STRETCH))
        return spill.column(directory, "I", count - sum(done), parts)

    def done_records(self) -> bytes:
        """Every done chunk as packed RECORDs (for READY)."""
        out = bytearray()
        for c in compress(range(len(self.done)), self.done):
            out += RECORD.pack(self.file[c], self.offset[c], self.length[c],
                               bytes(self.digests[c * DIGEST:(c + 1) * DIGEST]))
        return bytes(out)

    def file_digest(self, index: int) -> bytes:
        """A file's digest (see the module docstring)."""
        first, end = self.first[index], self.first[index + 1]
        if end - first == 1:
            return bytes(self.digests[first * DIGEST:end * DIGEST])
        h = blake3.blake3()
        for cid in range(self.first[index], self.first[index + 1]):
            h.update(_PART.pack(self.offset[cid], self.length[cid],
                                bytes(self.digests[cid * DIGEST:(cid + 1) * DIGEST])))
        return h.digest()

    def digest_pieces(self) -> Iterator[bytes]:
        """Every file's (index, digest), packed in manifest order (see DIGESTS frames),
        :data:`DIGEST_PIECE` files to a piece: made whole and copied, they took 72 bytes
        per file at their peak."""
        for start in range(0, len(self.files), DIGEST_PIECE):
            out = bytearray()
            for index in self.files[start:start + DIGEST_PIECE]:
                out += _INDEX.pack(index)
                out += self.file_digest(index)
            spill.drop_all()
            yield bytes(out)
        spill.trim()  # the pieces' heap, given back once they are all made

    def file_digests(self) -> bytes:
        """Every file's (index, digest), packed in manifest order, at once."""
        return b"".join(self.digest_pieces())

    def tree_digest(self) -> bytes:
        """BLAKE3 over the manifest digest and every file's packed (index, digest)."""
        h = blake3.blake3(self.manifest.digest())
        for piece in self.digest_pieces():
            h.update(piece)
        return h.digest()

    def check_digests(self, theirs: BinaryIO) -> tuple[bool, int | None, bytes]:
        """Our file digests against the sender's, read from ``theirs`` (a file holding
        them packed as DIGESTS carry them), made, read and compared a piece at a time:
        whether all are equal, the entry index of the first file that differs (None when
        there is no file to name), and the tree digest of ours."""
        h = blake3.blake3(self.manifest.digest())
        position, differs = 0, None
        for piece in self.digest_pieces():
            h.update(piece)
            got = theirs.read(len(piece))
            if differs is None and got != piece:
                step = _INDEX.size + DIGEST
                at = next(at for at in range(0, len(piece), step) if got[at:at + step] != piece[at:at + step])
                differs = self.files[(position + at) // step]
            position += len(piece)
        same = differs is None and not theirs.read(1)
        if not same and differs is None and len(self.files):
            differs = self.files[-1]
        return same, differs, h.digest()


def unpack_records(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """The records of a chunk list, one at a time (a list of them took about 190 bytes
    a chunk: a resume of a million files, 190 MB)."""
    if len(data) % RECORD.size:
        raise ValueError("chunk list has a partial entry")
    return RECORD.iter_unpack(data)


class ChunkDigests:
    """Chunk ids and a digest for each, as two flat columns (chunks found good on a
    resume, or to be checked): 36 bytes a chunk instead of a tuple and a bytes object."""

    def __init__(self):
        self.cids = array("I")
        self.digests = bytearray()

    def __len__(self) -> int:
        return len(self.cids)

    def append(self, cid: int, digest: bytes) -> None:
        self.cids.append(cid)
        self.digests += digest

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        for at, cid in enumerate(self.cids):
            yield cid, bytes(self.digests[at * DIGEST:(at + 1) * DIGEST])


def range_matches(path: str, offset: int, length: int, digest: bytes,
                  kind: int = frames.Digest.BLAKE3) -> bool:
    """Whether ``length`` bytes of ``path`` at ``offset`` hash to ``digest`` (a content
    digest of ``kind``; worker thread).  On a resume, a chunk the receiver's journal names
    is trusted only when its bytes still match; a missing file or a symlink in its place
    is simply "no match"."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    return len(data) == length and frames.content_digest(data, kind) == digest
