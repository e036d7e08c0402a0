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
import os
import posixpath
import pwd
import stat
from typing import Iterator

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
        for name in ("size", "mode", "mtime_ns", "uid", "gid"):
            value = getattr(entry, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BadRequest(f"manifest entry {path!r:.200}: bad {name} {value!r}")
        for name in ("path", "kind", "user", "group", "target"):
            if not isinstance(getattr(entry, name), str):
                raise BadRequest(f"manifest entry {path!r:.200}: bad {name}")
        return entry


@attrs.frozen
class Manifest:
    entries: tuple[Entry, ...]
    chunk_size: int = DEFAULT_CHUNK

    @property
    def total_bytes(self) -> int:
        return sum(b - a for e in self.entries for a, b in e.data_extents())

    @property
    def file_count(self) -> int:
        return sum(1 for e in self.entries if e.kind == FILE)

    def digest(self) -> bytes:
        h = blake3.blake3(str(self.chunk_size).encode() + b"\n")
        for entry in self.entries:
            h.update(repr(entry.to_wire()).encode("utf-8", "surrogateescape") + b"\n")
        return h.digest()

    def chunks(self) -> Iterator[tuple[int, int, int]]:
        """Every (file index, offset, length) of the plan, in manifest order."""
        size = self.chunk_size
        for index, entry in enumerate(self.entries):
            for start, end in entry.data_extents():
                for offset in range(start, end, size):
                    yield index, offset, min(size, end - offset)

    def needed_space(self, block: int = 4096) -> int:
        """Bytes the tree takes on a file system with ``block``-sized blocks (an estimate
        that counts each entry's rounding and one block of metadata per entry)."""
        total = 0
        for entry in self.entries:
            data = sum(b - a for a, b in entry.data_extents())
            total += -(-data // block) * block + block
        return total


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
    entries: list[Entry] = []

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
            common = dict(path=child_rel, mode=stat.S_IMODE(st.st_mode), mtime_ns=st.st_mtime_ns,
                          user=users[st.st_uid], group=groups[st.st_gid],
                          uid=st.st_uid, gid=st.st_gid)
            if stat.S_ISDIR(st.st_mode):
                entries.append(Entry(kind=DIR, **common))
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
                entries.append(Entry(kind=FILE, size=st.st_size, extents=extents, **common))
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(item.path)
                check_link(child_rel, target)
                entries.append(Entry(kind=LINK, target=target, **common))

    visit("", root)
    return Manifest(tuple(entries), chunk_size)


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


def validate_entries(entries: tuple[Entry, ...], max_chunk: int) -> None:
    """Reject a manifest that could write outside the target or is inconsistent."""
    dirs: set[str] = set()
    seen: set[str] = set()
    for entry in entries:
        check_path(entry.path)
        if entry.path in seen:
            raise BadRequest(f"duplicate path {entry.path!r:.200} in the seed manifest")
        seen.add(entry.path)
        parent = posixpath.dirname(entry.path)
        if parent and parent not in dirs:
            raise BadRequest(f"{entry.path!r:.200} in the seed manifest is not under a directory of it")
        if entry.mode > 0o7777:
            raise BadRequest(f"bad mode for {entry.path!r:.200} in the seed manifest")
        if entry.kind == DIR:
            dirs.add(entry.path)
        elif entry.kind == LINK:
            check_link(entry.path, entry.target)
        elif entry.kind == FILE:
            if entry.extents is not None:
                last = 0
                for start, end in entry.extents:
                    if not (isinstance(start, int) and isinstance(end, int)
                            and last <= start < end <= entry.size):
                        raise BadRequest(f"bad extents for {entry.path!r:.200} in the seed manifest")
                    last = end
        else:
            raise BadRequest(f"unknown entry kind {entry.kind!r:.20} in the seed manifest")
    if not 4096 <= max_chunk <= MAX_CHUNK:
        raise BadRequest(f"bad chunk size {max_chunk} in the seed manifest")


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
