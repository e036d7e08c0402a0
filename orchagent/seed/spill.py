"""Columns and bytes kept in unnamed files of StateDir rather than in the seed engine's
memory.

At a million files the manifest's, the pins' and the chunk table's columns are some 150
bytes a file on each side: 150 MB held by each engine for the whole seed, on database
hosts whose memory belongs to the buffer pool.  :func:`spill` makes a chunk table's
columns in one unnamed file (O_TMPFILE: gone with the process), preallocated and mapped
shared, as memoryviews that read and write as the arrays they replace; a manifest's and
the pins' columns grow in such files as they are walked or read (:class:`Growing`).
:func:`drop_all`, which the seed manager runs every :data:`DROP_INTERVAL` and the passes
over a whole manifest or table run as they go, lets the pages touched go from the engine
(``madvise(MADV_DONTNEED)``: the page cache keeps their contents, and the kernel writes
them to the file when it wants the memory), so that an engine holds of them what it
touched last.

The file's blocks are allocated up front: a write to a mapped page with no room behind
it would kill the process (SIGBUS) instead of raising ENOSPC.  When the file cannot be
made so (StateDir full, a file system without O_TMPFILE or fallocate), the columns stay
in memory, as below :data:`SPILL_FROM` entries, where a file costs more than it saves.

What a seed keeps whole until its end but reads only in order (the MANIFEST batches, the
sender's file digests) goes to a :class:`Spool`, written and read by system calls.
"""

from __future__ import annotations

import ctypes
import io
import mmap
import os
import tempfile
import threading
import weakref
from array import array

#: Entries (or chunks) from which a structure given a directory spills.
SPILL_FROM = 65_536
#: Seconds between two drops of the pages touched: at 1 s, the passes of a receiver
#: getting ready (the manifest checked, the table built, staging's directories) touched
#: 50 MB of a million-file seed's columns before the next drop.
DROP_INTERVAL = 0.1

_mapped: weakref.WeakSet = weakref.WeakSet()
_lock = threading.Lock()


def _mapped_file(fh, size: int) -> mmap.mmap:
    """``fh`` (an unnamed file) ``size`` bytes long, its blocks allocated, mapped shared
    and among the mappings :func:`drop_all` drops; OSError when the blocks are refused."""
    os.posix_fallocate(fh.fileno(), 0, size)
    mapping = mmap.mmap(fh.fileno(), size)
    with _lock:
        _mapped.add(mapping)
    return mapping


def spill(directory: str | None, layout: list[tuple[str, int]]) -> list:
    """Columns of zeros, one ``(typecode, length)`` each, as memoryviews over one mapped
    file of ``directory``; in memory (arrays, bytearrays for "B") without a directory,
    or when the file cannot be made."""
    sizes = [array(code).itemsize * length for code, length in layout]
    mapping = None
    if directory is not None and sum(sizes):
        try:
            with tempfile.TemporaryFile(dir=directory) as fh:
                mapping = _mapped_file(fh, sum(sizes))
        except OSError:
            mapping = None
    if mapping is None:
        return [bytearray(size) if code == "B" else array(code, bytes(size))
                for (code, _), size in zip(layout, sizes)]
    views, position = [], 0
    for (code, _), size in zip(layout, sizes):
        views.append(memoryview(mapping)[position:position + size].cast(code))
        position += size
    return views


def column(directory: str | None, code: str, length: int, parts) -> array | memoryview:
    """A column of ``length`` values of ``code`` made from ``parts`` (arrays, in order, a
    stretch at a time), in a mapped file of ``directory`` from :data:`SPILL_FROM`
    values (the chunk table's file indexes, the sender's chunks still to send: 4 MB each
    at a million files).  Made whole in memory first and then copied, such a column
    cost twice its size at the peak."""
    (held,) = spill(directory if length >= SPILL_FROM else None, [(code, length)])
    at = 0
    for part in parts:
        held[at:at + len(part)] = part
        at += len(part)
        drop_all()
    return held


class Growing:
    """A column that grows in an unnamed file of ``directory`` (a manifest's while it is
    walked or read): :meth:`extend` appends and returns the column, a memoryview of
    everything in it; the views it returned before stay valid (the same pages).  When
    the file cannot grow (StateDir full), the column goes on in memory: :meth:`extend`
    then returns an array (or a bytearray) holding everything."""

    def __init__(self, directory: str, code: str):
        self.code = code
        self.file = tempfile.TemporaryFile(dir=directory)
        self.length = self.capacity = 0
        self.map: mmap.mmap | None = None
        self.memory = None

    def extend(self, values):
        if self.memory is not None:
            self.memory += values
            return self.memory
        raw = memoryview(values).cast("B")
        end = self.length + len(raw)
        if end > self.capacity or self.map is None:
            try:
                capacity = max(end, 2 * self.capacity, 1 << 20)
                self.map, self.capacity = _mapped_file(self.file, capacity), capacity
            except OSError:
                held = bytes(self.map[:self.length]) if self.map is not None else b""
                self.memory = bytearray(held) if self.code == "B" else array(self.code, held)
                self.file.close()
                return self.extend(values)
        self.map[self.length:end] = raw
        self.length = end
        return memoryview(self.map)[:end].cast(self.code)

    def close(self) -> None:
        """No more growing: the file is closed (its mapping stays)."""
        self.file.close()


class Spool:
    """Bytes written one piece after another into an unnamed file of ``directory`` and
    read back by their place: what a seed keeps until its end (the manifest's batches,
    the sender's file digests) without holding it; at a million files, 8 and 36 MB.
    Blocking: worker threads.  Writes and reads carry their own offsets (pwrite,
    pread), so one thread may read what another wrote while it appends more; each holds
    a lock while it uses the file, so a close never pulls it from under one (a number
    reused by the next file opened would be read or written instead).  Written and read
    by system calls, never mapped, its pages are page cache, not the engine's.

    ``fallback``: when the file cannot be made or written (StateDir full), what it holds
    and what follows go on in memory instead of raising OSError."""

    def __init__(self, directory: str, fallback: bool = False):
        self.directory = directory
        self.file = None
        self.fallback = fallback
        #: Everything written, once the file failed a spool with a fallback.
        self.memory: bytearray | None = None
        self.closed = False
        self.lock = threading.Lock()
        #: Bytes written so far.
        self.size = 0

    def _fileno(self) -> int:
        if self.closed:
            raise OSError(f"an unnamed file of the seed in {self.directory} is closed")
        if self.file is None:
            self.file = tempfile.TemporaryFile(dir=self.directory)
        return self.file.fileno()

    def add(self, piece) -> None:
        with self.lock:
            if self.memory is not None:
                self.memory += piece
                self.size += len(piece)
                return
            try:
                fd = self._fileno()
                view = memoryview(piece)
                while view:
                    written = os.pwrite(fd, view, self.size)
                    self.size += written
                    view = view[written:]
            except OSError:
                if not self.fallback or self.closed:
                    raise
                written = len(piece) - len(view) if self.file is not None else 0
                held = os.pread(self.file.fileno(), self.size, 0) if self.file is not None else b""
                self.memory = bytearray(held)
                self.memory += memoryview(piece)[written:]
                self.size = len(self.memory)
                if self.file is not None:
                    self.file.close()

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` (written before)."""
        pieces = []
        with self.lock:
            if self.memory is not None:
                return bytes(self.memory[start:end])
            fd = self._fileno()
            while start < end:
                piece = os.pread(fd, end - start, start)
                if not piece:
                    raise OSError(f"an unnamed file of the seed in {self.directory} ended at "
                                  f"{start} bytes, {end} were written")
                pieces.append(piece)
                start += len(piece)
        return b"".join(pieces)

    def pieces(self, size: int = 1 << 20):
        """Everything written, ``size`` bytes at a time."""
        return (self.read(start, min(start + size, self.size)) for start in range(0, self.size, size))

    def open(self):
        """A file reading everything written from its start (the caller closes it)."""
        with self.lock:
            if self.memory is not None or self.file is None and not self.closed:
                return io.BytesIO(self.memory or b"")
            reader = os.fdopen(os.dup(self._fileno()), "rb")
        reader.seek(0)
        return reader

    def close(self) -> None:
        with self.lock:
            self.closed, self.memory = True, None
            if self.file is not None:
                self.file.close()


def drop_all() -> None:
    """Let the pages touched of every live spilled column go from this process (their
    contents stay in the files); cheap: the kernel walks the mappings' page tables."""
    with _lock:
        mappings = list(_mapped)
    for mapping in mappings:
        mapping.madvise(mmap.MADV_DONTNEED)


def dropping(items, every: int = 8):
    """``items``, the pages touched let go every ``every`` of them, for a pass over
    entries far apart (a tree's directories, its links).  The kernel maps the pages
    around each one faulted in (64 KB, or the page cache's folio, up to 256 KB seen
    here), so an entry read costs 0.5-2 MB of mapped columns: the directories of a
    million-file tree mapped them all (70 MB) in less time than the seed manager takes
    between two drops.  A drop costs 6-90 microseconds."""
    for n, item in enumerate(items, 1):
        yield item
        if not n % every:
            drop_all()


def trim() -> None:
    """Give the heap's free pages back to the kernel (glibc's ``malloc_trim``), after
    the columns spilled were freed: the engine keeps freed memory for reuse otherwise
    (orchagent.seed.manager sets its trim threshold at 32 MB)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
