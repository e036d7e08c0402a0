"""Small files sent while the sender still walks: a first attempt's early data.

A tree of a million files takes the sender seconds to walk, and until its manifest ends
no chunk plan exists on either side, so data waited for the whole walk (7 s at a million
files).  On the first attempt at a seed the receiver holds nothing of, the ACCEPT of
the sender's control stream (which said in its HELLO that it can) now allows early
data: how many bytes and files it may send before the manifest ends (half of what the
target's file system has free) and the content digest it checks with.  The sender then
sends whole small files of the batches walked so far as BUNDLE frames on its control
stream, each after the MANIFEST batch that lists its files, until the manifest ends;
the files it reads are checked against what the walk saw.

The receiver writes them into staging in the manifest's own chain of worker-thread
steps (:meth:`orchagent.seed.tree_receive.TreeReceive._read_batch`), after the batch
that lists them and before the next one, so the manifest never grows under a write.
What it wrote it keeps in StateDir, not in its journal: nothing early is trusted until
MANIFEST_END checked the whole manifest; then the files are marked done and journaled.
That attempt's READY lists none of them (at a million files the list was 48 MB on each
side): the receiver reaches READY only once every bundle before MANIFEST_END is
written, and a file that fails its digest ends the attempt instead, so the sender counts
every file it sent early as arrived, with the digest it sent, and reads none again.
An attempt that ends before MANIFEST_END leaves files in staging that no record names:
the next attempt (never early) empties staging before it prepares it, so a file the
source has lost since can never be promoted.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any, Callable

from orchagent.errors import BadRequest
from orchagent.seed import frames, plan, spill, tree
from orchagent.seed.frames import ProtocolError
from orchagent.seed.state import JOURNAL_RECORD

#: Batches of files the sender keeps ready to send early (a batch is about 1.5 MB of
#: them); the walk finds no more while this many wait (the files of later batches go
#: after READY, like any other).
KEEP_BATCHES = 1
#: Bytes in an early bundle: the read, its frame and the transport's copy of it are
#: the sender's memory above a seed without early data.
BUNDLE_BYTES = 256 << 10
#: The share of the target's free bytes and inodes that early data may take before the
#: receiver's space check, which needs the whole manifest, has run.
SHARE = 2
_FILE = ord(tree.FILE)


class WalkPins(tree.Pins):
    """The walk's pins, also keeping the identities (device, inode, ctime) added since
    the last batch was packed (:func:`candidates` takes them)."""

    def __init__(self, directory: str | None = None):
        super().__init__(directory)
        self.recent: list[tuple[int, int, int]] = []

    def add(self, st: os.stat_result) -> None:
        super().add(st)
        self.recent.append((st.st_dev, st.st_ino, st.st_ctime_ns))


def candidates(manifest: tree.Manifest, start: int, recent: list) -> list[tuple]:
    """Entries ``start`` to the end of ``manifest`` (walk thread: the batch just walked,
    ``recent`` their identities) that go whole in one bundle: dense files of one chunk
    with data, as ``(index, path, size, mtime, device, inode, ctime)``."""
    end = len(manifest)
    if len(recent) != end - start:
        return []
    kinds, sizes, mtimes, paths, extents = (manifest.kinds, manifest.sizes, manifest.mtimes,
                                            manifest.paths, manifest.extents)
    limit = manifest.chunk_size
    return [(index, paths[index], sizes[index], mtimes[index], *recent[index - start])
            for index in range(start, end)
            if kinds[index] == _FILE and 0 < sizes[index] <= limit and index not in extents]


def read_bundle(root: str, items: list[tuple], key: bytes, compress: bool, kind: int,
                kept: spill.Spool) -> tuple[list, int, bool]:
    """Worker thread: read ``items`` (see :func:`candidates`), each checked against the
    walk, and frame them as one BUNDLE; the digests are kept in ``kept`` as RECORDs.
    Returns (pieces, data bytes, compressed)."""
    def where(item: tuple) -> str:
        return os.path.join(root, item[1])

    def open_checked(item: tuple) -> int:
        _, _, size, mtime, device, inode, ctime = item
        fd = os.open(where(item), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            changes = tree.changes(os.fstat(fd), device, inode, size, mtime, ctime)
            if changes:
                raise BadRequest(f"seed source file {where(item)} changed while it was being sent "
                                 f"({'; '.join(changes)})")
        except BaseException:
            os.close(fd)
            raise
        return fd

    raw = read_whole([(item, item[2]) for item in items], open_checked, where)
    files = [(item[0], item[2]) for item in items]
    pieces, digests, compressed = frames.seal_bundle(files, raw, key, compress, kind)
    kept.add(b"".join(plan.RECORD.pack(index, 0, size, digest)
                      for (index, size), digest in zip(files, digests)))
    return pieces, len(raw), compressed


def read_whole(files: list[tuple], open_checked: Callable[[Any], int],
               name: Callable[[Any], str]) -> bytearray:
    """Worker thread: whole small files one after another in one buffer, for a BUNDLE;
    ``files`` are ``(what, length)``, ``open_checked(what)`` a descriptor checked against
    the walk, ``name(what)`` its path for a short read's error."""
    raw = bytearray(sum(length for _, length in files))
    view = memoryview(raw)
    position = 0
    for what, length in files:
        fd = open_checked(what)
        try:
            if os.preadv(fd, [view[position:position + length]], 0) != length:
                raise BadRequest(f"seed source file {name(what)} changed while it was being "
                                 "sent (short read)")
        finally:
            os.close(fd)
        position += length
    return raw


class Feed:
    """The sender's early data for one send: the batches of candidates walked and not
    sent yet, what the receiver allows, and the digests of what the attempt that was
    allowed early data read (in StateDir: 36 bytes a file)."""

    def __init__(self, directory: str):
        self.directory = directory
        #: The attempt (orchagent.seed.session) allowed early data, and its digests.
        self.session = None
        self.kept: spill.Spool | None = None
        #: ``(batch number, candidates)``, oldest first.
        self.batches: deque = deque()
        self.open = False
        self.reading = False
        #: The control stream whose MANIFEST_END waits for the bundle being read.
        self.ending = None
        self.bytes = self.files = 0

    @property
    def hungry(self) -> bool:
        """Whether the walk should find candidates in its next batch (read by the walk's
        thread: a stale answer costs a batch, nothing else)."""
        return self.open and len(self.batches) < KEEP_BATCHES

    def start(self, session, allowed: dict) -> spill.Spool | None:
        """``session``'s ACCEPT allows early data: send up to what it says.  Returns the
        digests of an earlier attempt, for the caller to close."""
        allowed_bytes, allowed_files = allowed.get("bytes"), allowed.get("files")
        if type(allowed_bytes) is not int or type(allowed_files) is not int:
            raise ProtocolError("malformed early data allowance in ACCEPT")
        old, self.kept = self.kept, spill.Spool(self.directory, fallback=True)
        self.session, self.open = session, True
        self.bytes, self.files = allowed_bytes, allowed_files
        return old

    def offer(self, batch: int, found: list[tuple]) -> None:
        """Candidates of the walk's batch number ``batch`` (1 for the first)."""
        if self.open and found:
            self.batches.append((batch, deque(found)))
            while len(self.batches) > KEEP_BATCHES:
                self.batches.popleft()

    def take(self, sent: int, most_bytes: int, most_files: int) -> list[tuple]:
        """Files for one bundle, from batches the receiver was sent already (the first
        ``sent``), within what it allows; removed from the feed."""
        items, size = [], 0
        while self.batches and self.batches[0][0] <= sent and len(items) < most_files:
            found = self.batches[0][1]
            while found and len(items) < most_files:
                length = found[0][2]
                if size + length > most_bytes and items:
                    return self._taken(items, size)
                if length > self.bytes - size or len(items) >= self.files:
                    self.stop()  # what is left does not fit what the receiver allows
                    return self._taken(items, size)
                items.append(found.popleft())
                size += length
            if not found:
                self.batches.popleft()
        return self._taken(items, size)

    def _taken(self, items: list, size: int) -> list:
        self.bytes -= size
        self.files -= len(items)
        return items

    def stop(self) -> None:
        """No more early data (the manifest ended, or the receiver allows no more)."""
        self.open = False
        self.batches.clear()

    def walked(self) -> None:
        """The walk's thread, once every entry is walked: no more bundles are started
        while the chunk plan is made, and the heap their buffers left is given back
        (with them, the plan was the sender's peak: 98 MB at a million files, not 93)."""
        self.open = False
        spill.trim()

    def settle(self, table: plan.ChunkTable, session) -> None:
        """Worker thread, at READY, the plan reset: when ``session`` is the attempt that
        was allowed early data, every file it sent early marked done with the digest it
        went with.  Its READY lists none of them: it reached READY only after writing
        every bundle before its MANIFEST_END, each file checked (a file that failed its
        digest ended the attempt instead).  The digests are let go either way."""
        kept, self.kept = self.kept, None
        if kept is None:
            return
        try:
            for piece in kept.pieces(plan.RECORD.size * 16_384) if session is self.session else ():
                for index, _, length, digest in spill.dropping(plan.RECORD.iter_unpack(piece), 1024):
                    cid = _chunk_of(table, index, length)
                    if cid is None:
                        raise BadRequest(f"file #{index} was sent early as a file its chunk plan "
                                         "does not have")
                    table.mark_done(cid, digest)
        finally:
            kept.close()

    def close(self) -> None:
        """The digests let go (worker thread; the job stopped the feed)."""
        kept, self.kept = self.kept, None
        if kept is not None:
            kept.close()


def _chunk_of(table: plan.ChunkTable, index: int, length: int) -> int | None:
    """The one chunk of file ``index`` when the plan has it whole, of ``length`` bytes."""
    cid = table.chunk_id(index, 0)
    if cid is None or table.length[cid] != length or not table.whole_file(index):
        return None
    return cid


# --- the receiving side ------------------------------------------------------------------


def allowance(free: int, inodes: int | None) -> tuple[int, int]:
    """Bytes and files a receiver allows early into a file system with ``free`` bytes
    and ``inodes`` free (None: a file system without a fixed number, btrfs)."""
    return free // SHARE, (1 << 31 if inodes is None else inodes) // SHARE


def write_bundle(staging, manifest: tree.Manifest, bundle: frames.Bundle, kept: spill.Spool,
                 made: set) -> tuple[int, int]:
    """Worker thread, in the manifest's chain (the manifest does not grow meanwhile):
    write an early bundle's files into staging (making the directories above them, but
    those of ``made``: the bundle before's, which this one's become), and keep their
    journal records.  A file the manifest read so far does not list as a dense file of
    that size is a BadRequest; one that does not match its digest, an IntegrityError.
    Returns the files and bytes written."""
    kinds, sizes, paths, extents = manifest.kinds, manifest.sizes, manifest.paths, manifest.extents
    parents = set()
    for index, length, _ in bundle.items:
        if not (index < len(manifest) and kinds[index] == _FILE and sizes[index] == length
                and index not in extents):
            raise BadRequest(f"refused the sender's early data: file #{index} is not a whole "
                             "small file of the manifest read so far")
        path = paths[index]
        tree.check_path(path)
        parents.add(path.rpartition("/")[0])
    if not made:
        staging.make()
    for parent in sorted(parents - made - {""}):
        os.makedirs(os.path.join(staging.root, parent), 0o700, exist_ok=True)
    made.clear()
    made.update(parents | {""})
    for _, outcome in staging.write_batch(manifest, [(bundle, None)], None):
        if isinstance(outcome, frames.IntegrityError):
            raise outcome  # the attempt ends: its sender counts every file it sent early as here
    kept.add(b"".join(JOURNAL_RECORD.pack(index, 0, length, digest)
                      for index, length, digest in bundle.items))
    return len(bundle.items), bundle.raw_length


def settle(table: plan.ChunkTable, kept: spill.Spool, journal_fd: int) -> None:
    """Worker thread, at MANIFEST_END (the whole manifest checked, the table new): the
    files written early marked done in ``table`` and journaled, as if an earlier attempt
    had sent them; BadRequest if one is not a whole file of the plan (the sender, which
    counts them done, must agree)."""
    for piece in kept.pieces(JOURNAL_RECORD.size * 16_384):
        for index, _, length, digest in spill.dropping(JOURNAL_RECORD.iter_unpack(piece), 1024):
            cid = _chunk_of(table, index, length)
            if cid is None:
                raise BadRequest(f"refused the sender's early data: file #{index} is not a "
                                 "whole file of the seed's chunk plan")
            table.mark_done(cid, digest)
        os.write(journal_fd, piece)
