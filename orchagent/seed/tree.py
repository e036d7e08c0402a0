"""The tree being seeded: walking the source, the manifest, the chunk plan, path safety.

The sender walks the source once (in a worker thread) into a :class:`Manifest`: every
directory, regular file and symlink with its relative path, size, mode, mtime and owner
(by name, with the numeric id as a fallback), and for sparse files the data extents found
with SEEK_DATA/SEEK_HOLE.  Sockets, FIFOs and devices cannot be copied and are left out
(a MySQL socket in the datadir is the usual case).

The receiver trusts none of it: :func:`validate_entries` rejects absolute paths, ``..``,
duplicate names, entries under anything but a directory of the manifest, and symlinks
whose target leaves the tree — before anything is written.

The chunk plan is a pure function of the manifest and the chunk size, so both sides
agree on chunk identities ``(file index, offset)`` without sending the plan.
"""

from __future__ import annotations

import errno
import grp
import json
import os
import posixpath
import pwd
import stat
from array import array
from collections.abc import Sequence
from typing import Iterable, Iterator

import attrs
import blake3

from orchagent.errors import BadRequest
from orchagent.seed.frames import MAX_CHUNK

DIR, FILE, LINK = "d", "f", "l"
DEFAULT_CHUNK = 2 << 20


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

    def data_extents(self) -> tuple[tuple[int, int], ...]:
        if self.kind != FILE:
            return ()
        if self.extents is None:
            return ((0, self.size),) if self.size else ()
        return self.extents

    def to_wire(self) -> list:
        return [self.path, self.kind, self.size, self.mode, self.mtime_ns, self.user,
                self.group, self.uid, self.gid, self.target,
                None if self.extents is None else [list(e) for e in self.extents]]

    @classmethod
    def from_wire(cls, item) -> "Entry":
        try:
            path, kind, size, mode, mtime_ns, user, group, uid, gid, target, extents = item
            entry = cls(path=path, kind=kind, size=size, mode=mode, mtime_ns=mtime_ns,
                        user=user, group=group, uid=uid, gid=gid, target=target,
                        extents=None if extents is None else tuple((a, b) for a, b in extents))
        except (TypeError, ValueError) as e:
            raise BadRequest(f"malformed manifest entry {item!r:.200}") from e
        for name, low, high in (("size", 0, 2**63), ("mode", 0, 0o7777), ("mtime_ns", -2**63, 2**63),
                                ("uid", 0, 2**32), ("gid", 0, 2**32)):
            value = getattr(entry, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
                raise BadRequest(f"manifest entry {path!r:.200}: bad {name} {value!r:.40}")
        for name in ("path", "kind", "user", "group", "target"):
            if not isinstance(getattr(entry, name), str):
                raise BadRequest(f"manifest entry {path!r:.200}: bad {name}")
        if entry.kind not in (DIR, FILE, LINK):
            raise BadRequest(f"unknown entry kind {entry.kind!r:.20} in the seed manifest")
        return entry


class Manifest:
    """The tree as columns rather than objects, so that 50,000 entries cost a few MB.

    Built entry by entry (:meth:`add`, :meth:`add_wire`), or from entries at once
    (``Manifest(entries, chunk_size)``); :attr:`entries` gives :class:`Entry` values back
    on demand.  The digest covers the chunk size and the JSON text of the batches the
    manifest travels in (see :func:`pack_batches`), so neither side serialises an entry
    twice; a manifest that never travelled digests as one batch.
    """

    def __init__(self, entries: Iterable[Entry] = (), chunk_size: int = DEFAULT_CHUNK):
        self.chunk_size = chunk_size
        self.paths: list[str] = []
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
            self.add(entry)

    def _name(self, name: str) -> int:
        index = self._name_index.get(name)
        if index is None:
            index = self._name_index[name] = len(self.names)
            self.names.append(name)
        return index

    def add(self, entry: Entry) -> None:
        self.add_wire(entry.to_wire())

    def add_wire(self, item) -> None:
        """Append one entry in its wire form; anything malformed is a BadRequest."""
        try:
            path, kind, size, mode, mtime_ns, user, group, uid, gid, target, extents = item
        except (TypeError, ValueError):
            raise BadRequest(f"malformed manifest entry {item!r:.200}") from None
        if not (type(path) is str and type(kind) is str and type(user) is str
                and type(group) is str and type(target) is str):
            raise BadRequest(f"malformed manifest entry {item!r:.200}")
        if kind not in _KINDS:
            raise BadRequest(f"unknown entry kind {kind!r:.20} in the seed manifest")
        for name, value, low, high in (("size", size, 0, 2**63), ("mode", mode, 0, 0o10000),
                                       ("mtime_ns", mtime_ns, -2**63, 2**63),
                                       ("uid", uid, 0, 2**32), ("gid", gid, 0, 2**32)):
            if type(value) is not int or not low <= value < high:
                raise BadRequest(f"manifest entry {path!r:.200}: bad {name} {value!r:.40}")
        index = len(self.paths)
        self.paths.append(path)
        self.kinds.append(_KINDS[kind])
        self.sizes.append(size)
        self.modes.append(mode)
        self.mtimes.append(mtime_ns)
        self.uids.append(uid)
        self.gids.append(gid)
        self.users.append(self._name(user))
        self.groups.append(self._name(group))
        if target:
            self.targets[index] = target
        if extents is not None:
            try:
                self.extents[index] = tuple((a, b) for a, b in extents)
            except (TypeError, ValueError):
                raise BadRequest(f"bad extents for {path!r:.200} in the seed manifest") from None

    def wire(self, index: int) -> list:
        extents = self.extents.get(index)
        return [self.paths[index], chr(self.kinds[index]), self.sizes[index], self.modes[index],
                self.mtimes[index], self.names[self.users[index]], self.names[self.groups[index]],
                self.uids[index], self.gids[index], self.targets.get(index, ""),
                None if extents is None else [list(e) for e in extents]]

    def __len__(self) -> int:
        return len(self.paths)

    def entry(self, index: int) -> Entry:
        return Entry(path=self.paths[index], kind=chr(self.kinds[index]), size=self.sizes[index],
                     mode=self.modes[index], mtime_ns=self.mtimes[index],
                     user=self.names[self.users[index]], group=self.names[self.groups[index]],
                     uid=self.uids[index], gid=self.gids[index],
                     target=self.targets.get(index, ""), extents=self.extents.get(index))

    @property
    def entries(self) -> "_Entries":
        return _Entries(self)

    def kind(self, index: int) -> str:
        return chr(self.kinds[index])

    def data_extents(self, index: int) -> tuple[tuple[int, int], ...]:
        if self.kinds[index] != _FILE:
            return ()
        extents = self.extents.get(index)
        if extents is None:
            size = self.sizes[index]
            return ((0, size),) if size else ()
        return extents

    def is_dense(self, index: int) -> bool:
        return index not in self.extents

    @property
    def total_bytes(self) -> int:
        return sum(b - a for i in range(len(self)) for a, b in self.data_extents(i))

    @property
    def file_count(self) -> int:
        return self.kinds.count(_FILE)

    def digest(self) -> bytes:
        if self.wire_digest is None:
            text = json.dumps([self.wire(i) for i in range(len(self))], separators=(",", ":"))
            self.wire_digest = batches_digest(self.chunk_size, [text.encode()])
        return self.wire_digest

    def chunks(self) -> Iterator[tuple[int, int, int]]:
        """Every (file index, offset, length) of the plan, in manifest order."""
        size = self.chunk_size
        for index in range(len(self)):
            for start, end in self.data_extents(index):
                for offset in range(start, end, size):
                    yield index, offset, min(size, end - offset)

    def needed_space(self, block: int = 4096) -> int:
        """Bytes the tree takes on a file system with ``block``-sized blocks (an estimate
        that counts each entry's rounding and one block of metadata per entry)."""
        total = 0
        for index in range(len(self)):
            data = sum(b - a for a, b in self.data_extents(index))
            total += -(-data // block) * block + block
        return total


class _Entries(Sequence):
    """The manifest's entries as a read-only sequence of :class:`Entry` (made on access)."""

    def __init__(self, manifest: Manifest):
        self._manifest = manifest

    def __len__(self) -> int:
        return len(self._manifest)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._manifest.entry(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._manifest.entry(index)


_FILE = ord(FILE)
_KINDS = {DIR: ord(DIR), FILE: ord(FILE), LINK: ord(LINK)}


def batches_digest(chunk_size: int, texts: Iterable[bytes]) -> bytes:
    h = blake3.blake3(f"{chunk_size}\n".encode())
    for text in texts:
        h.update(text)
        h.update(b"\n")
    return h.digest()


def _name_of(table, ident: int) -> str:
    try:
        return table(ident)[0]
    except KeyError:
        return ""


def data_extents(fd: int, size: int) -> tuple[tuple[int, int], ...]:
    """The data extents of an open file, by SEEK_DATA/SEEK_HOLE."""
    extents = []
    offset = 0
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
    return tuple(extents)


def walk(root: str, chunk_size: int = DEFAULT_CHUNK) -> Manifest:
    """Walk ``root`` (blocking: call in a worker thread) into a manifest.

    Raises BadRequest when ``root`` is not a directory or holds a symlink leaving it.
    """
    if not os.path.isdir(root):
        raise BadRequest(f"seed source {root} is not a directory")
    users: dict[int, str] = {}
    groups: dict[int, str] = {}
    manifest = Manifest(chunk_size=chunk_size)
    add = manifest.add_wire

    def visit(rel: str, path: str) -> None:
        with os.scandir(path) as it:
            items = sorted(it, key=lambda d: d.name)
        for item in items:
            child_rel = f"{rel}/{item.name}" if rel else item.name
            st = item.stat(follow_symlinks=False)
            if st.st_uid not in users:
                users[st.st_uid] = _name_of(pwd.getpwuid, st.st_uid)
            if st.st_gid not in groups:
                groups[st.st_gid] = _name_of(grp.getgrgid, st.st_gid)
            mode = stat.S_IMODE(st.st_mode)
            user, group = users[st.st_uid], groups[st.st_gid]
            if stat.S_ISDIR(st.st_mode):
                add([child_rel, DIR, 0, mode, st.st_mtime_ns, user, group, st.st_uid, st.st_gid, "", None])
                visit(child_rel, item.path)
            elif stat.S_ISREG(st.st_mode):
                extents = None
                if st.st_size and st.st_blocks * 512 < st.st_size:
                    fd = os.open(item.path, os.O_RDONLY | os.O_NOFOLLOW)
                    try:
                        found = data_extents(fd, st.st_size)
                    finally:
                        os.close(fd)
                    if found != ((0, st.st_size),):
                        extents = found
                add([child_rel, FILE, st.st_size, mode, st.st_mtime_ns, user, group, st.st_uid,
                     st.st_gid, "", extents])
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(item.path)
                check_link(child_rel, target)
                add([child_rel, LINK, 0, mode, st.st_mtime_ns, user, group, st.st_uid, st.st_gid,
                     target, None])

    visit("", root)
    return manifest


def check_path(path: str) -> None:
    """A manifest path must be relative, normalised, and stay inside the tree."""
    if not path or path.startswith("/") or "\x00" in path:
        raise BadRequest(f"unsafe path {path!r:.200} in the seed manifest")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise BadRequest(f"unsafe path {path!r:.200} in the seed manifest")


def check_link(path: str, target: str) -> None:
    """A symlink's target must be relative and resolve inside the tree."""
    if not target or target.startswith("/") or "\x00" in target:
        raise BadRequest(f"symlink {path!r:.200} points outside the seeded tree ({target!r:.200})")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    if resolved == ".." or resolved.startswith("../"):
        raise BadRequest(f"symlink {path!r:.200} points outside the seeded tree ({target!r:.200})")


def validate(manifest: Manifest) -> None:
    """Reject a manifest that could write outside the target or is inconsistent."""
    if not 4096 <= manifest.chunk_size <= MAX_CHUNK:
        raise BadRequest(f"bad chunk size {manifest.chunk_size} in the seed manifest")
    dirs: set[str] = set()
    seen: set[str] = set()
    for index, path in enumerate(manifest.paths):
        check_path(path)
        if path in seen:
            raise BadRequest(f"duplicate path {path!r:.200} in the seed manifest")
        seen.add(path)
        slash = path.rfind("/")
        if slash > 0 and path[:slash] not in dirs:
            raise BadRequest(f"{path!r:.200} in the seed manifest is not under a directory of it")
        kind = manifest.kinds[index]
        if kind == _KINDS[DIR]:
            dirs.add(path)
        elif kind == _KINDS[LINK]:
            check_link(path, manifest.targets.get(index, ""))
        elif index in manifest.extents:
            last, size = 0, manifest.sizes[index]
            for start, end in manifest.extents[index]:
                if not (type(start) is int and type(end) is int and last <= start < end <= size):
                    raise BadRequest(f"bad extents for {path!r:.200} in the seed manifest")
                last = end


def validate_entries(entries, chunk_size: int) -> None:
    validate(Manifest(entries, chunk_size))


def manifest_from_batches(batches: list[bytes], chunk_size: int, count: int, digest: str) -> Manifest:
    """Rebuild and check the manifest the sender sent as packed batches (worker thread).

    Raises BadRequest naming what is wrong: a malformed or unsafe entry, a wrong count or
    digest (the manifest arrived incomplete or altered).
    """
    import zstandard

    if type(chunk_size) is not int or not 4096 <= chunk_size <= MAX_CHUNK:
        raise BadRequest(f"bad chunk size {chunk_size!r:.40} in the seed manifest")
    manifest = Manifest(chunk_size=chunk_size)
    decompressor = zstandard.ZstdDecompressor()
    h = blake3.blake3(f"{chunk_size}\n".encode())
    for body in batches:
        try:
            text = decompressor.decompress(body, max_output_size=256 << 20)
            items = json.loads(text)
        except (zstandard.ZstdError, ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"a seed manifest batch is not packed JSON: {e}") from None
        if not isinstance(items, list):
            raise BadRequest("a seed manifest batch is not a list")
        h.update(text)
        h.update(b"\n")
        del text
        for item in items:
            manifest.add_wire(item)
        del items
    if len(manifest) != count or h.hexdigest() != digest:
        raise BadRequest("the seed manifest arrived incomplete or altered")
    manifest.wire_digest = bytes.fromhex(digest)
    validate(manifest)
    return manifest


def pack_batches(manifest: Manifest, batch: int = 4096) -> list[bytes]:
    """The manifest as packed JSON batches, as MANIFEST frames carry it (worker thread);
    sets the manifest's digest to theirs."""
    import zstandard

    compressor = zstandard.ZstdCompressor(level=3)
    h = blake3.blake3(f"{manifest.chunk_size}\n".encode())
    packed = []
    for start in range(0, len(manifest), batch):
        text = json.dumps([manifest.wire(i) for i in range(start, min(start + batch, len(manifest)))],
                          separators=(",", ":")).encode()
        h.update(text)
        h.update(b"\n")
        packed.append(compressor.compress(text))
    manifest.wire_digest = h.digest()
    return packed


def local_owner(entry: Entry) -> tuple[int, int]:
    """The local uid/gid for an entry's owner: by name when known here, else the number."""
    uid, gid = entry.uid, entry.gid
    if entry.user:
        try:
            uid = pwd.getpwnam(entry.user).pw_uid
        except KeyError:
            pass
    if entry.group:
        try:
            gid = grp.getgrnam(entry.group).gr_gid
        except KeyError:
            pass
    return uid, gid
