"""The tree being seeded: walking the source, the manifest, the chunk plan, path safety.

The sender walks the source once (in a worker thread) into a :class:`Manifest`: every
directory, regular file and symlink with its relative path, size, mode, mtime and owner
(by name, with the numeric id as a fallback), and for sparse files the data extents found
with SEEK_DATA/SEEK_HOLE; beside it, never sent, each entry's identity (:class:`Pins`).
Sockets, FIFOs and devices cannot be copied and are left out (a MySQL socket in the
datadir is the usual case).

The receiver trusts none of it: :func:`validate` rejects absolute paths, ``..``,
duplicate names, entries under anything but a directory of the manifest, and symlinks
that lead out of the tree, followed through the tree's other links as the kernel would
(:func:`check_links`; the sender's walk refuses them too) — before anything is written.

The chunk plan is a pure function of the manifest and the chunk size, so both sides
agree on chunk identities ``(file index, offset)`` without sending the plan.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import os
import posixpath
import pwd
import re
import stat
from array import array
from collections.abc import Sequence
from typing import Callable, Iterable, Iterator

from itertools import accumulate, compress, count, islice, repeat
from operator import is_not

import attrs
import blake3
import zstandard

from orchagent.errors import BadRequest
from orchagent.seed import spill
from orchagent.seed.frames import MAX_CHUNK

DIR, FILE, LINK = "d", "f", "l"
DEFAULT_CHUNK = 2 << 20
#: Entries the walk gathers before it adds them to the manifest and reports it grown.
WALK_BATCH = 4096
#: Space an entry takes besides its data blocks, for the target's free-space check: its
#: inode and directory entry.  ext4 takes inodes from tables made at mkfs (a directory
#: entry is tens of bytes) and xfs allocates 512-byte inodes, but btrfs writes its items
#: twice (metadata is DUP by default): 1.1 KiB per 4 KiB file measured, more with long
#: names (tests/test_seed_disk.py, NeededSpaceTests).
ENTRY_OVERHEAD = 1536


@attrs.frozen
class Entry:
    """One thing in the tree.  ``extents`` is None for a file without holes."""

    path: str
    kind: str
    size: int = 0
    mode: int = 0o644
    mtime_ns: int = 0
    user: str = ""
    group: str = ""
    uid: int = 0
    gid: int = 0
    target: str = ""
    extents: tuple[tuple[int, int], ...] | None = None

    def to_wire(self) -> list:
        return [self.path, self.kind, self.size, self.mode, self.mtime_ns, self.user,
                self.group, self.uid, self.gid, self.target,
                None if self.extents is None else [list(e) for e in self.extents]]

    @classmethod
    def from_wire(cls, item) -> "Entry":
        """An entry from its wire form, checked as :meth:`Manifest.add_wire` checks it."""
        manifest = Manifest()
        manifest.add_wire(item)
        return manifest.entry(0)


def _encode(path: str) -> bytes:
    """A path's bytes on disk: UTF-8, with the bytes the walk could not decode (escaped
    as lone surrogates by ``os.fsdecode``) given back as they were."""
    return path.encode("utf-8", "surrogateescape")


def _decode(data) -> str:
    return str(data, "utf-8", "surrogateescape")  # bytes, or a view of a spilled column


class PathColumn(Sequence):
    """The manifest's paths as one byte string, each path's bytes followed by a NUL, and
    where each starts: 9 bytes per path beside its own instead of a str object and a list
    slot (80 bytes or more), so that a million paths take tens of MB, not a hundred.

    It reads like the list of str it replaces (``column[i]``, slices, ``len``, iteration,
    ``append``/``extend``).  A path is stored as its bytes on disk (:func:`_encode`) and
    comes back as the same str, non-UTF-8 names included (a str whose escaped bytes make
    valid UTF-8 together, which ``os.fsdecode`` never makes, comes back as that name).
    No path holds a NUL (no file name can): ``append``/``extend`` refuse one with
    ValueError, and a str that has no bytes on disk (a lone surrogate, which
    ``os.fsdecode`` never makes) with UnicodeEncodeError."""

    __slots__ = ("blob", "starts", "_grow")

    def __init__(self, paths: Iterable[str] = (), grow: Callable | None = None):
        self.blob = bytearray()
        #: Where each path starts, and one past the last one's NUL.
        self.starts = array("Q", [0])
        #: How a column takes more: in place, or as its manifest says (Manifest._extend).
        self._grow = grow or _extend_in_place
        self.extend(paths)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            return self._decoded(start, stop) if start < stop else []
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("path index out of range")
        return _decode(self.blob[self.starts[index]:self.starts[index + 1] - 1])

    def _decoded(self, start: int, stop: int) -> list[str]:
        """Paths ``start`` to ``stop`` (start < stop), decoded and split in one C call each."""
        return _decode(self.blob[self.starts[start]:self.starts[stop] - 1]).split("\x00")

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self), WALK_BATCH):
            yield from self._decoded(start, min(start + WALK_BATCH, len(self)))
            spill.drop_all()  # a pass over every path and its entry's columns

    def __eq__(self, other):
        if isinstance(other, PathColumn):
            return self.blob == other.blob and self.starts == other.starts
        return list(self) == list(other) if isinstance(other, (list, tuple)) else NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def span(self, start: int, stop: int) -> bytearray:
        """The bytes of paths ``start`` to ``stop``, each followed by its NUL."""
        return bytearray(memoryview(self.blob)[self.starts[start]:self.starts[stop]])

    def append(self, path: str) -> None:
        self.extend_encoded([_encode(path)])

    def extend(self, paths: Iterable[str]) -> None:
        self.extend_encoded(list(map(_encode, paths)))

    def extend_encoded(self, encoded: list[bytes]) -> None:
        """Append paths given as their bytes (see :func:`_encode`)."""
        if not encoded:
            return
        joined = b"\0".join(encoded)
        if joined.count(0) != len(encoded) - 1:
            raise ValueError("a path holds a NUL")
        self._grow(self, "starts", array("Q", islice(accumulate(map((1).__add__, map(len, encoded)),
                                                                initial=len(self.blob)), 1, None)))
        self._grow(self, "blob", joined + b"\0")


def _extend_in_place(owner, name: str, values) -> None:
    column = getattr(owner, name)
    column += values


#: The manifest's columns that grow in a file once it is large (all but the kinds).
_GROWING = ("sizes", "modes", "mtimes", "uids", "gids", "users", "groups")


class Manifest:
    """The tree as columns rather than objects, so that 50,000 entries cost a few MB;
    built from wire entries (:meth:`add_wire`, :meth:`add_wire_many`) or :class:`Entry`
    values (given back by :attr:`entries`).  The digest covers the chunk size and the
    JSON text of the batches the manifest travels in (see :func:`pack_batches`), so
    neither side serialises an entry twice; a manifest that never travelled digests as
    one batch.  Given a ``directory`` (StateDir), its columns grow in files there once it
    holds :data:`~orchagent.seed.spill.SPILL_FROM` entries (orchagent.seed.spill)."""

    def __init__(self, entries: Iterable[Entry] = (), chunk_size: int = DEFAULT_CHUNK,
                 directory: str | None = None):
        self.chunk_size = chunk_size
        self.directory = directory
        self._growing: dict[str, spill.Growing] = {}
        self.paths = PathColumn(grow=self._extend)
        self.kinds = bytearray()
        self.sizes = array("Q")
        self.modes = array("I")
        self.mtimes = array("q")
        self.uids = array("I")
        self.gids = array("I")
        self.users = array("I")
        self.groups = array("I")
        self.names: list[str] = []
        self._name_index: dict[str, int] = {}
        self.targets: dict[int, str] = {}
        self.extents: dict[int, tuple[tuple[int, int], ...]] = {}
        #: Set once the manifest was packed or unpacked as batches.
        self.wire_digest: bytes | None = None
        for entry in entries:
            self.add_wire(entry.to_wire())

    def _extend(self, owner, name: str, values) -> None:
        """Append ``values`` to column ``name`` of ``owner`` (this manifest or its paths):
        in place, or in its file once the manifest is large (StateDir refusing one keeps
        it in memory)."""
        grower = self._growing.get(name)
        if grower is None:
            if self.directory is None or len(self.kinds) < spill.SPILL_FROM:
                return _extend_in_place(owner, name, values)
            column = getattr(owner, name)
            try:
                grower = self._growing[name] = spill.Growing(self.directory, getattr(column, "typecode", "B"))
            except OSError:
                self.directory = None
                return _extend_in_place(owner, name, values)
            grower.extend(column)
        setattr(owner, name, grower.extend(values))

    def _add_columns(self, kinds, *columns) -> None:
        """The kinds, then the columns of :data:`_GROWING`, of entries appended."""
        for name, values in zip(_GROWING, columns):
            self._extend(self, name, values)
        self.kinds += kinds

    def seal(self) -> None:
        """No more entries: the files its columns grew in are closed (what was mapped of
        them stays, see orchagent.seed.spill)."""
        for grower in self._growing.values():
            grower.close()
        self._growing.clear()

    def _name(self, name: str) -> int:
        index = self._name_index.get(name)
        if index is None:
            index = self._name_index[name] = len(self.names)
            self.names.append(name)
        return index

    def add_wire(self, item) -> None:
        """Append one entry in its wire form; anything malformed is a BadRequest (and a
        path with a NUL or without bytes on disk, see :class:`PathColumn`, at once)."""
        try:
            path, kind, size, mode, mtime_ns, user, group, uid, gid, target, extents = item
        except (TypeError, ValueError):
            raise BadRequest(f"malformed manifest entry {item!r:.200}") from None
        if not all(type(value) is str for value in (path, kind, user, group, target)):
            raise BadRequest(f"malformed manifest entry {item!r:.200}")
        if kind not in _KINDS:
            raise BadRequest(f"unknown entry kind {kind!r:.20} in the seed manifest")
        for name, value, low, high in (("size", size, 0, 2**63), ("mode", mode, 0, 0o10000),
                                       ("mtime_ns", mtime_ns, -2**63, 2**63),
                                       ("uid", uid, 0, 2**32), ("gid", gid, 0, 2**32)):
            if type(value) is not int or not low <= value < high:
                raise BadRequest(f"manifest entry {path!r:.200}: bad {name} {value!r:.40}")
        try:
            encoded = _encode(path)
        except UnicodeEncodeError:
            raise BadRequest(f"manifest entry {path!r:.200}: the path is no file name") from None
        if 0 in encoded:
            raise BadRequest(f"unsafe path {path!r:.200} in the seed manifest")
        index = len(self.kinds)
        self.paths.extend_encoded([encoded])
        self._add_columns(bytes([_KINDS[kind]]), array("Q", [size]), array("I", [mode]),
                          array("q", [mtime_ns]), array("I", [uid]), array("I", [gid]),
                          array("I", [self._name(user)]), array("I", [self._name(group)]))
        if target:
            self.targets[index] = target
        if extents is not None:
            try:
                self.extents[index] = tuple((a, b) for a, b in extents)
            except (TypeError, ValueError):
                raise BadRequest(f"bad extents for {path!r:.200} in the seed manifest") from None

    def add_wire_many(self, items: list) -> None:
        """Append entries in their wire form, many at once (a manifest batch, a stretch
        of the walk), the columns built and range-checked by C loops (``map``, ``zip``,
        ``array``, ``max``): entry by entry, a 50,000-entry manifest took 0.2 s.
        Anything those checks reject goes through :meth:`add_wire` entry by entry, whose
        BadRequest names the bad entry; nothing is appended before every check passed."""
        start = len(self.kinds)
        try:
            columns = self._checked_columns(items)
            if columns is not None:  # a path with a NUL: ValueError, appending nothing
                self.paths.extend_encoded(columns[0])
        except (TypeError, ValueError, KeyError, OverflowError):
            columns = None
        if columns is None:
            for item in items:
                self.add_wire(item)
            return
        _, kinds, sizes, modes, mtimes, users, groups, uids, gids, targets, extents = columns
        for name in set(users).union(groups):
            self._name(name)
        self._add_columns(kinds, sizes, modes, mtimes, uids, gids,
                          array("I", map(self._name_index.__getitem__, users)),
                          array("I", map(self._name_index.__getitem__, groups)))
        self.targets.update(compress(zip(count(start), targets), targets))
        self.extents.update((start + offset, value) for offset, value in extents)

    @staticmethod
    def _checked_columns(items: list):
        """The columns of wire entries, or None when a fast check fails (see
        :meth:`add_wire_many`; the exceptions it catches also mean "check one by one")."""
        if not set(map(type, items)) <= {list, tuple} or set(map(len, items)) != {11}:
            return None  # an empty list too (no length 11 in it)
        paths, kinds, sizes, modes, mtimes, users, groups, uids, gids, targets, extents = zip(*items)
        for column in (paths, users, groups, targets):
            if set(map(type, column)) != {str}:
                return None
        for column in (sizes, modes, mtimes, uids, gids):
            if set(map(type, column)) != {int}:
                return None
        sizes, modes = array("Q", sizes), array("I", modes)  # OverflowError below 0
        if max(sizes) >= 2**63 or max(modes) >= 0o10000:
            return None
        # UnicodeEncodeError is a ValueError; a NUL, PathColumn.extend_encoded refuses.
        encoded = list(map(str.encode, paths, repeat("utf-8"), repeat("surrogateescape")))
        sparse = [(offset, tuple((a, b) for a, b in value))
                  for offset, value in compress(enumerate(extents), map(is_not, extents, repeat(None)))]
        return (encoded, bytes(map(_KINDS.__getitem__, kinds)), sizes, modes,
                array("q", mtimes), users, groups, array("I", uids), array("I", gids), targets,
                sparse)

    def wire_rows(self, start: int, end: int) -> list[tuple]:
        """Entries ``start`` to ``end`` in wire form (tuples: JSON writes them as lists);
        built column by column (C loops), not entry by entry."""
        names = self.names.__getitem__
        indexes = range(start, end)
        extents = [None if e is None else [list(x) for x in e]
                   for e in map(self.extents.get, indexes)] if self.extents else repeat(None)
        return list(zip(self.paths[start:end], map(chr, self.kinds[start:end]),
                        self.sizes[start:end], self.modes[start:end], self.mtimes[start:end],
                        map(names, self.users[start:end]), map(names, self.groups[start:end]),
                        self.uids[start:end], self.gids[start:end],
                        map(self.targets.get, indexes, repeat("")), extents))

    def wire(self, index: int) -> list:
        return list(self.wire_rows(index, index + 1)[0])

    def __len__(self) -> int:
        return len(self.kinds)

    def entry(self, index: int) -> Entry:
        return Entry(path=self.paths[index], kind=chr(self.kinds[index]), size=self.sizes[index],
                     mode=self.modes[index], mtime_ns=self.mtimes[index],
                     user=self.names[self.users[index]], group=self.names[self.groups[index]],
                     uid=self.uids[index], gid=self.gids[index],
                     target=self.targets.get(index, ""), extents=self.extents.get(index))

    @property
    def entries(self) -> list[Entry]:
        return [self.entry(i) for i in range(len(self))]

    def data_extents(self, index: int) -> tuple[tuple[int, int], ...]:
        if self.kinds[index] != _FILE:
            return ()
        extents = self.extents.get(index)
        if extents is None:
            size = self.sizes[index]
            return ((0, size),) if size else ()
        return extents

    def data_sizes(self) -> Iterator[int]:
        """Each file's data bytes (its extents' where sparse), in manifest order."""
        files = map(_FILE.__eq__, self.kinds)
        if not self.extents:
            return compress(self.sizes, files)
        return (sum(b - a for a, b in self.data_extents(i)) for i in compress(count(), files))

    @property
    def total_bytes(self) -> int:
        return sum(self.data_sizes())

    def tally(self, start: int, end: int) -> tuple[int, int]:
        """Files and data bytes of entries ``start`` to ``end``: the totals of a manifest
        still growing (a seed's progress while it is walked), equal in sum to
        :attr:`file_count` and :attr:`total_bytes` (sparse files count their extents)."""
        kinds = self.kinds[start:end]
        files = map(_FILE.__eq__, kinds)
        size = sum(compress(self.sizes[start:end], files))
        extents = self.extents
        for index in filter(extents.__contains__, range(start, end)) if extents else ():
            size += sum(b - a for a, b in extents[index]) - self.sizes[index]
        return kinds.count(_FILE), size

    @property
    def file_count(self) -> int:
        return self.kinds.count(_FILE)

    def file_indexes(self, directory: str | None = None) -> array | memoryview:
        """The indexes of the regular files, in manifest order (with ``directory``, in
        a mapped file there when many: see :func:`spill.column`)."""
        kinds, count = self.kinds, len(self)
        parts = (array("I", compress(range(start, min(start + _STRETCH, count)),
                                     map(_FILE.__eq__, kinds[start:start + _STRETCH])))
                 for start in range(0, count, _STRETCH))
        return spill.column(directory, "I", kinds.count(_FILE), parts)

    def digest(self) -> bytes:
        """BLAKE3 over each batch's JSON text and a newline, then the chunk size (last:
        the receiver learns it from MANIFEST_END, after the batches)."""
        if self.wire_digest is None:
            text = json.dumps(self.wire_rows(0, len(self)), separators=(",", ":")).encode()
            self.wire_digest = blake3.blake3(text + b"\n" + _digest_tail(self.chunk_size)).digest()
        return self.wire_digest

    def chunks(self) -> Iterator[tuple[int, int, int]]:
        """Every (file index, offset, length) of the plan, in manifest order."""
        size = self.chunk_size
        for index in range(len(self)):
            for start, end in self.data_extents(index):
                for offset in range(start, end, size):
                    yield index, offset, min(size, end - offset)

    def needed_space(self, block: int = 4096) -> int:
        """Bytes the tree takes on a file system with ``block``-sized blocks, an estimate
        on the high side: every file's data rounded up to whole blocks, a block per
        directory and :data:`ENTRY_OVERHEAD` per entry (a whole block per entry would
        ask twice the space of a tree of 4 KiB files, and refuse seeds that fit)."""
        rounded = sum(-(-data // block) for data in self.data_sizes())
        directories = self.kinds.count(_KINDS[DIR])
        return (rounded + directories) * block + len(self) * ENTRY_OVERHEAD


_FILE = ord(FILE)
_FILE_RUNS = re.compile(re.escape(FILE.encode()) + b"+")
_KINDS = {DIR: ord(DIR), FILE: ord(FILE), LINK: ord(LINK)}


def _digest_tail(chunk_size: int) -> bytes:
    return f"chunk size {chunk_size}\n".encode()


def _name_of(table, ident: int) -> str:
    try:
        return table(ident)[0]
    except KeyError:
        return ""


def _sparse_extents(name: str, dir_fd: int, size: int) -> tuple[tuple[int, int], ...] | None:
    """The data extents of file ``name`` of ``dir_fd`` by SEEK_DATA/SEEK_HOLE, None when
    it has no hole."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    extents = []
    offset = 0
    try:
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            if end > start:
                extents.append((start, end))
            offset = end
    finally:
        os.close(fd)
    return None if extents == [(0, size)] else tuple(extents)


class Pins:
    """What the sender's walk saw of each entry beyond the manifest's size and mtime: its
    device, inode and ctime, in manifest order, and the source directory's (device,
    inode).  Never sent: the sender checks every file it opens against them
    (:meth:`check`), so a file replaced, rewritten or seen through another mount since
    the walk fails the seed instead of sending a mix of two trees."""

    def __init__(self, directory: str | None = None):
        self.root: tuple[int, int] = (0, 0)
        self.devices = array("Q")
        self.inodes = array("Q")
        self.ctimes = array("q")
        #: Given a directory (StateDir), the walk's pins go to files there every
        #: SPILL_FROM entries (orchagent.seed.spill), and :meth:`seal` makes the columns.
        self.directory = directory
        self._growing: list[spill.Growing] = []

    def add(self, st: os.stat_result) -> None:
        self.devices.append(st.st_dev)
        self.inodes.append(st.st_ino)
        self.ctimes.append(st.st_ctime_ns)
        if self.directory is not None and len(self.devices) >= spill.SPILL_FROM:
            self._move_out()

    def _move_out(self) -> list:
        """The pins held in memory appended to the files; the columns so far."""
        held = [self.devices, self.inodes, self.ctimes]
        try:
            self._growing = self._growing or [spill.Growing(self.directory, c.typecode) for c in held]
        except OSError:
            self.directory = None  # StateDir refused a file: in memory from here
            return held
        self.devices, self.inodes, self.ctimes = array("Q"), array("Q"), array("q")
        return [grower.extend(column) for grower, column in zip(self._growing, held)]

    def seal(self) -> None:
        """The walk is over: the columns whole (the files they grew in closed)."""
        if self._growing:
            self.devices, self.inodes, self.ctimes = self._move_out()
            for grower in self._growing:
                grower.close()
            self._growing = []

    def check(self, manifest: Manifest, index: int, st: os.stat_result, path: str) -> None:
        """BadRequest naming ``path`` when entry ``index`` (``st``: as it is now) is no
        longer what the walk saw, and what differs."""
        what = changes(st, self.devices[index], self.inodes[index], manifest.sizes[index],
                       manifest.mtimes[index], self.ctimes[index])
        if what:
            raise BadRequest(f"seed source file {path} changed while it was being sent "
                             f"({'; '.join(what)})")

    def _columns(self, manifest: Manifest) -> tuple[array, ...]:
        """The columns :meth:`pack` keeps, whole (every entry, not only the files)."""
        return self.devices, self.inodes, manifest.sizes, manifest.mtimes, self.ctimes

    def pack(self, manifest: Manifest) -> Iterator[bytes]:
        """The files' identities, to be compared after a restart (:meth:`compare`), as
        the pieces of one zstd frame: a JSON head, their device, inode, size, mtime and
        ctime columns, their paths separated by NULs.  Made straight from the manifest's
        columns, :data:`_STRETCH` files at a time, and written out as they come:
        made whole first, the body took 220 bytes per file at its peak (220 MB for a
        million files), and each whole column 8 MB more."""
        files = manifest.file_indexes(self.directory)
        head = json.dumps({"root": list(self.root), "count": len(files)}).encode()
        out = zstandard.ZstdCompressor(level=1).compressobj()
        yield out.compress(len(head).to_bytes(4, "big") + head)
        for code, column in zip(_PIN_CODES, self._columns(manifest)):
            for start in range(0, len(files), _STRETCH):
                stretch = files[start:start + _STRETCH]
                yield out.compress(array(code, map(column.__getitem__, stretch)))
                spill.drop_all()
        yield from map(out.compress, _file_paths(manifest))
        yield out.flush()

    def compare(self, manifest: Manifest, packed: bytes, source: str) -> None:
        """BadRequest naming the first file of ``packed`` (an earlier walk of the same
        seed's source, before the agent restarted) that is gone or not the same file now,
        or the source directory itself when it is another one.

        When the same files came in the same order (the walk sorts: the usual case),
        whole columns are compared; only a difference is looked for file by file."""
        body = zstandard.ZstdDecompressor().decompress(packed, max_output_size=1 << 31)
        size = int.from_bytes(body[:4], "big")
        head = json.loads(body[4:4 + size])
        if tuple(head["root"]) != self.root:
            raise BadRequest(f"seed source {source} is not the directory the seed began with "
                             f"(device/inode {self.root[0]}/{self.root[1]}, was "
                             f"{head['root'][0]}/{head['root'][1]}): it changed while the agent was down")
        count, position = head["count"], 4 + size
        columns = [array(code, body[position + 8 * count * n:position + 8 * count * (n + 1)])
                   for n, code in enumerate(_PIN_CODES)]
        position += 8 * count * len(_PIN_CODES)
        files = manifest.file_indexes()
        same = len(files) == count and b"".join(_file_paths(manifest)) == body[position:]
        if same and all(array(code, map(column.__getitem__, files)) == was for code, column, was
                        in zip(_PIN_CODES, self._columns(manifest), columns)):
            return
        if same:
            found = zip(files, map(manifest.paths.__getitem__, files))
        else:
            now = {path: index for index, path in enumerate(manifest.paths)}
            paths = _decode(body[position:]).split("\x00") if count else []
            found = zip(map(now.get, paths), paths)
        for (index, path), *was in zip(found, *columns):
            full = os.path.join(source, path)
            if index is None or manifest.kinds[index] != _FILE:
                raise BadRequest(f"seed source file {full} changed while it was being sent "
                                 "(it is gone since the agent restarted)")
            is_ = [column[index] for column in self._columns(manifest)]
            if was != is_:
                fields = ("device", "inode", "size", "mtime", "ctime")
                what = "; ".join(f"{name} {b}, was {a}" for name, a, b in zip(fields, was, is_) if a != b)
                raise BadRequest(f"seed source file {full} changed while it was being sent "
                                 f"({what}; seen after the agent restarted)")


_PIN_CODES = "QQQqq"
#: Entries a pass that makes a column handles at a time (0.5 MB of a column of 8 bytes).
_STRETCH = 65_536


def changes(st: os.stat_result, device: int, inode: int, size: int, mtime: int,
            ctime: int) -> list[str]:
    """How a file as it is now (``st``) differs from what a walk saw of it."""
    what = ["removed or replaced"] if st.st_nlink == 0 else []
    if st.st_dev != device or st.st_ino != inode:
        what.append(f"device/inode {st.st_dev}/{st.st_ino}, was {device}/{inode}")
    if st.st_size != size:
        what.append(f"size {st.st_size}, was {size}")
    if st.st_mtime_ns != mtime:
        what.append(f"mtime {st.st_mtime_ns}, was {mtime}")
    if st.st_ctime_ns != ctime:
        what.append(f"ctime {st.st_ctime_ns}, was {ctime}")
    return what


def _file_paths(manifest: Manifest) -> Iterator[bytes]:
    """The paths of the manifest's regular files as bytes, separated by NULs, in pieces
    (a run of files side by side in the manifest is one piece of its path column)."""
    separator = b""
    for run in spill.dropping(_FILE_RUNS.finditer(manifest.kinds)):
        span = manifest.paths.span(run.start(), run.end())
        del span[-1]
        yield separator
        yield span
        separator = b"\0"


def walk(root: str, chunk_size: int = DEFAULT_CHUNK,
         grown: Callable[[Manifest], None] | None = None, pins: Pins | None = None,
         directory: str | None = None) -> Manifest:
    """Walk ``root`` (blocking: call in a worker thread) into a manifest; ``grown`` is
    called with it every few thousand entries and at the end (the sender packs and sends
    them while the walk goes on).  ``pins``, when given, gets every entry's identity.
    ``directory``: where a large manifest's columns grow (see :class:`Manifest`).

    Raises BadRequest when ``root`` is not a directory or holds a symlink leaving it.
    """
    if not os.path.isdir(root):
        raise BadRequest(f"seed source {root} is not a directory")
    if pins is not None:
        st = os.stat(root)
        pins.root = (st.st_dev, st.st_ino)
    pin = pins.add if pins is not None else (lambda st: None)
    users: dict[int, str] = {}
    groups: dict[int, str] = {}
    manifest = Manifest(chunk_size=chunk_size, directory=directory)
    rows: list[list] = []
    add = rows.append

    def flush(last: bool = False) -> None:
        manifest.add_wire_many(rows)
        rows.clear()
        if last:
            check_links(manifest)
        if grown is not None:
            grown(manifest)

    def visit(rel: str, path: str) -> None:
        # Listed through a descriptor: each lstat is then relative to the directory
        # (fstatat), not a walk of the whole path again (15% of a 50,000-file walk).
        # The root may be a symlink (a datadir often is); below it nothing is followed.
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (os.O_NOFOLLOW if rel else 0)
        fd = os.open(path, flags)
        try:
            with os.scandir(fd) as it:
                items = sorted(it, key=lambda d: d.name)
            for item in items:
                if len(rows) >= WALK_BATCH:
                    flush()
                child_rel = f"{rel}/{item.name}" if rel else item.name
                st = item.stat(follow_symlinks=False)
                size, target, extents = 0, "", None
                if stat.S_ISDIR(st.st_mode):
                    kind = DIR
                elif stat.S_ISREG(st.st_mode):
                    kind, size = FILE, st.st_size
                    if size and st.st_blocks * 512 < size:
                        extents = _sparse_extents(item.name, fd, size)
                elif stat.S_ISLNK(st.st_mode):
                    kind, target = LINK, os.readlink(item.name, dir_fd=fd)
                    check_link(child_rel, target)
                else:
                    continue  # a socket, FIFO or device: not copied
                if st.st_uid not in users:
                    users[st.st_uid] = _name_of(pwd.getpwuid, st.st_uid)
                if st.st_gid not in groups:
                    groups[st.st_gid] = _name_of(grp.getgrgid, st.st_gid)
                add([child_rel, kind, size, stat.S_IMODE(st.st_mode), st.st_mtime_ns,
                     users[st.st_uid], groups[st.st_gid], st.st_uid, st.st_gid, target, extents])
                pin(st)
                if kind == DIR:
                    visit(child_rel, os.path.join(path, item.name))
        finally:
            os.close(fd)

    visit("", root)
    flush(last=True)
    manifest.seal()
    return manifest


def _paths_safe(paths: PathColumn) -> bool:
    """Every path passes :func:`check_path`, tested on all of them at once: with each
    path's NUL turned into ``/\x00/`` and a ``/`` in front, an empty, absolute, ``.`` or
    ``..`` part of any of them shows as ``//``, ``/./`` or ``/../`` in the whole (no path
    holds a NUL, see :class:`PathColumn`).  A stretch of paths at a time: the whole
    column at once would be copied twice over."""
    for start in range(0, len(paths), 65536):
        whole = b"/" + paths.span(start, min(start + 65536, len(paths))).replace(b"\0", b"/\0/")
        spill.drop_all()
        if b"//" in whole or b"/./" in whole or b"/../" in whole:
            return False
    return True


def check_path(path: str) -> None:
    """A manifest path must be relative, normalised, and stay inside the tree (an empty
    path, or one starting with ``/``, has an empty part)."""
    if "\x00" in path or any(p in ("", ".", "..") for p in path.split("/")):
        raise BadRequest(f"unsafe path {path!r:.200} in the seed manifest")


def check_link(path: str, target: str) -> None:
    """A symlink's target must be relative and resolve inside the tree."""
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    if (not target or target.startswith("/") or "\x00" in target
            or resolved == ".." or resolved.startswith("../")):
        raise BadRequest(f"symlink {path!r:.200} points outside the seeded tree ({target!r:.200})")


#: Symlinks followed one inside another in resolving a link, at most (Linux's MAXSYMLINKS).
MAX_LINK_DEPTH = 40


class _LinkOutside(Exception):
    """The link whose own target leaves the tree or nests too deep, and which it is."""


class _LinkNowhere(Exception):
    """A link whose resolution comes back to itself: the kernel would stop (ELOOP)."""


def check_links(manifest: Manifest) -> None:
    """Refuse (BadRequest naming it) a symlink that leads outside the tree when the
    kernel follows it.  Each link is resolved part by part against the manifest's own
    entries, following the links it passes through (with ``s -> .``, ``s/..`` climbs a
    level, which the lexical test of :func:`check_link` takes for no move at all); a
    part the manifest lacks is taken lexically, the stricter way.  A link whose
    resolution comes back to itself leads nowhere, and is let be (the kernel refuses to
    follow it); links nested more than :data:`MAX_LINK_DEPTH` deep are refused.

    Only a target with a ``..`` part can climb: when no link has one, every link leads
    down from its own directory, and the whole check is one string test (a 50,000-entry
    manifest pays nothing)."""
    link_kind = _KINDS[LINK]
    kinds = manifest.kinds
    links = {manifest.paths[i]: t for i, t in manifest.targets.items() if kinds[i] == link_kind}
    if not links or "/../" not in "/" + "/\x00/".join(links.values()) + "/":
        return
    #: None: the link leads nowhere, or is being followed (coming back to it is a loop).
    resolved: dict[str, list[str] | None] = {}

    def follow(link: str, depth: int) -> list[str]:
        """Where ``link`` leads, as path parts from the root of the tree."""
        if link in resolved:
            if resolved[link] is None:
                raise _LinkNowhere
            return resolved[link]
        if depth > MAX_LINK_DEPTH:
            raise _LinkOutside(link, f"through more than {MAX_LINK_DEPTH} nested symlinks")
        target = links[link]
        if not target or target.startswith("/"):
            raise _LinkOutside(link, "outside the seeded tree")
        here = link.split("/")[:-1]
        resolved[link] = None
        for part in target.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if not here:
                    raise _LinkOutside(link, "outside the seeded tree")
                here.pop()
                continue
            here.append(part)
            path = "/".join(here)
            if path in links:
                here = list(follow(path, depth + 1))
            # Past a directory, a file or a path the tree lacks, go on lexically (past the
            # last two the kernel would stop: lexically is the stricter).
        resolved[link] = here
        return here

    for link in links:
        try:
            follow(link, 0)
        except _LinkNowhere:
            continue
        except _LinkOutside as e:
            inner, where = e.args
            through = "" if inner == link else f", through symlink {inner!r:.200} ({links[inner]!r:.200})"
            raise BadRequest(f"symlink {link!r:.200} points {where} when followed "
                             f"({links[link]!r:.200}){through}") from None


def validate(manifest: Manifest) -> None:
    """Reject a manifest that could write outside the target or is inconsistent."""
    if not 4096 <= manifest.chunk_size <= MAX_CHUNK:
        raise BadRequest(f"bad chunk size {manifest.chunk_size} in the seed manifest")
    paths = manifest.paths
    if not _paths_safe(paths):
        for path in paths:
            check_path(path)
    # Each entry must be under a directory of the manifest, and no path may come twice.
    # The walk lists a directory's entries in order of their names: when every
    # directory's entries come in increasing order, none comes twice, which takes a
    # name per directory to know instead of a set of every path (a million paths,
    # 100 MB); in any other order, the set.
    dirs: set[str] = set()
    last_name: dict[str, str] = {}
    ordered = True
    directory, link = _KINDS[DIR], _KINDS[LINK]
    for path, kind in zip(paths, manifest.kinds):
        slash = path.rfind("/")
        parent = path[:slash] if slash > 0 else ""
        if slash > 0 and parent not in dirs:
            raise BadRequest(f"{path!r:.200} in the seed manifest is not under a directory of it")
        if kind == directory:
            dirs.add(path)
        name = path[slash + 1:]
        if ordered and last_name.get(parent, "") >= name:
            ordered = False
        last_name[parent] = name
    if not ordered:
        seen: set[str] = set()
        for path in paths:
            if path in seen:
                raise BadRequest(f"duplicate path {path!r:.200} in the seed manifest")
            seen.add(path)
    for index in spill.dropping(compress(count(), map(link.__eq__, manifest.kinds))):
        check_link(paths[index], manifest.targets.get(index, ""))
    check_links(manifest)
    for index in sorted(manifest.extents):
        last, size = 0, manifest.sizes[index]
        for start, end in manifest.extents[index]:
            if not (type(start) is int and type(end) is int and last <= start < end <= size):
                raise BadRequest(f"bad extents for {paths[index]!r:.200} in the seed manifest")
            last = end


class ManifestReader:
    """The manifest rebuilt from its MANIFEST batches as they arrive (worker thread, one
    batch at a time, in order), so that parsing overlaps the sender's walk; :meth:`finish`
    checks it against MANIFEST_END.  Anything wrong is a BadRequest naming it: a malformed
    or unsafe entry, a wrong count or digest (the manifest arrived incomplete or altered).
    """

    def __init__(self, directory: str | None = None):
        self.manifest = Manifest(directory=directory)
        #: Files and data bytes read so far (the receiver's totals while they arrive).
        self.files = self.bytes = 0
        self._hash = blake3.blake3()
        self._decompressor = zstandard.ZstdDecompressor()

    def feed(self, body: bytes) -> None:
        try:
            text = self._decompressor.decompress(body, max_output_size=256 << 20)
            items = json.loads(text)
        except (zstandard.ZstdError, ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"a seed manifest batch is not packed JSON: {e}") from None
        if not isinstance(items, list):
            raise BadRequest("a seed manifest batch is not a list")
        self._hash.update(text)
        self._hash.update(b"\n")
        del text
        start = len(self.manifest)
        self.manifest.add_wire_many(items)
        files, size = self.manifest.tally(start, len(self.manifest))
        self.files, self.bytes = self.files + files, self.bytes + size

    def finish(self, chunk_size: int, count: int, digest: str) -> Manifest:
        if type(chunk_size) is not int or not 4096 <= chunk_size <= MAX_CHUNK:
            raise BadRequest(f"bad chunk size {chunk_size!r:.40} in the seed manifest")
        manifest = self.manifest
        manifest.chunk_size = chunk_size
        self._hash.update(_digest_tail(chunk_size))
        if len(manifest) != count or self._hash.hexdigest() != digest:
            raise BadRequest("the seed manifest arrived incomplete or altered")
        manifest.wire_digest = bytes.fromhex(digest)
        manifest.seal()
        validate(manifest)
        return manifest


def manifest_from_batches(batches: list[bytes], chunk_size: int, count: int, digest: str,
                          directory: str | None = None) -> Manifest:
    """Rebuild and check a whole manifest from its packed batches (worker thread)."""
    reader = ManifestReader(directory)
    for body in batches:
        reader.feed(body)
    return reader.finish(chunk_size, count, digest)


class ManifestPacker:
    """A growing manifest as packed JSON batches, as MANIFEST frames carry it (worker
    thread): :meth:`pack_new` packs the entries added since its last call, so that the
    batches travel while the walk goes on; :meth:`finish` sets the manifest's digest."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.packed = 0
        self._hash = blake3.blake3()
        self._compressor = zstandard.ZstdCompressor(level=3)

    def pack_new(self, batch: int = 4096) -> list[bytes]:
        bodies = []
        end = len(self.manifest)
        for start in range(self.packed, end, batch):
            text = json.dumps(self.manifest.wire_rows(start, min(start + batch, end)),
                              separators=(",", ":")).encode()
            self._hash.update(text)
            self._hash.update(b"\n")
            # compress() returns its output in a buffer sized for the worst case (the
            # text's size, ten times the output here), which the sender would keep for the
            # whole seed: a copy of the exact size instead.
            bodies.append(bytes(memoryview(self._compressor.compress(text))))
        self.packed = end
        return bodies

    def finish(self) -> None:
        self._hash.update(_digest_tail(self.manifest.chunk_size))
        self.manifest.wire_digest = self._hash.digest()


def pack_batches(manifest: Manifest, batch: int = 4096) -> list[bytes]:
    """The whole manifest as packed batches (worker thread); sets its digest to theirs."""
    packer = ManifestPacker(manifest)
    bodies = packer.pack_new(batch)
    packer.finish()
    return bodies


def local_owner(entry: Entry) -> tuple[int, int]:
    """The local uid/gid for an entry's owner: by name when known here, else the number."""
    uid, gid = entry.uid, entry.gid
    with contextlib.suppress(KeyError):
        uid = pwd.getpwnam(entry.user).pw_uid if entry.user else uid
    with contextlib.suppress(KeyError):
        gid = grp.getgrnam(entry.group).gr_gid if entry.group else gid
    return uid, gid
