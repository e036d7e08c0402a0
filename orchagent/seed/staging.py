"""The receiver's staging area (blocking: worker threads).

Staging lives beside the datadir (``<parent>/.<name>.orchagent-seed-<id>``) when the
parent is on the same file system, else (the datadir is a mount point or a btrfs
subvolume) inside it (``<datadir>/.orchagent-seed-<id>``): either way its entries can be
renamed into the datadir.  What a non-empty datadir held goes aside next to it
(``.<name>.orchagent-previous-<id>``, or inside it likewise).

Nothing leaves staging before the whole tree is verified and synced (syncfs: every file
and directory of that file system in one call, instead of one fsync per file); then
:mod:`orchagent.seed.promotion` moves it in.  A failed or aborted seed only removes
staging.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import shutil
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from itertools import compress, islice
from operator import eq

from orchagent.durable import Writes
from orchagent.host.diskusage import disk_usage
from orchagent.seed import frames, plan, spill
from orchagent.seed.state import JOURNAL_RECORD
from orchagent.seed.tree import DIR, FILE, LINK, Entry, Manifest, local_owner

_libc = ctypes.CDLL(None, use_errno=True)
_SYNC_FILE_RANGE_WRITE = 2
_IS_ROOT = os.geteuid() == 0
_FILE, _LINK, _DIR = ord(FILE), ord(LINK), ord(DIR)
_SELF = (os.geteuid(), os.getegid())


def _umask() -> int:
    """The process umask, read without changing it (other threads may be creating files)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o777


_UMASK = _umask()
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC

#: Chunks of at least this many bytes go to disk with O_DIRECT, from a per-thread aligned
#: buffer.  A seed is written once and read by MySQL later (InnoDB itself reads with
#: O_DIRECT): through the page cache it would cost a copy into freshly allocated cache
#: pages (the receiver's largest cost, and on a VM whose host reclaims free guest memory
#: three times larger when those pages come back), then evict the host's hot data, then
#: write back anyway.  Small files and each file's unaligned tail stay buffered: one
#: synchronous device write per small file would be slower than the page cache.
DIRECT_MIN = 1 << 20
#: Threads reading staging back before promotion (SeedVerifyOnDisk): a tree of small
#: files costs one synchronous read per file, which several threads overlap.
READ_BACK_THREADS = 4
#: Offset, length and memory alignment used for O_DIRECT: the largest logical block
#: size in use, so it is valid on every device without asking.
DIRECT_ALIGN = 4096
_DIRECT_FLAGS = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_DIRECT", 0)


class _DirectBuffer(threading.local):
    """Each worker thread's page-aligned buffer (anonymous mmap), made on first use and
    reused for every chunk: no fresh memory per chunk."""

    view: memoryview | None = None

    def get(self, size: int) -> memoryview:
        if self.view is None or len(self.view) < size:
            step = 2 << 20
            self.view = memoryview(mmap.mmap(-1, -(-size // step) * step))
        return self.view


_direct_buffer = _DirectBuffer()


def _allocate(fd: int, size: int) -> bool:
    """Reserve a dense file's blocks before its chunks arrive (fallocate, mode 0; False
    where the file system can't).  The chunks then overwrite allocated blocks, which ext4
    and xfs let several threads write with O_DIRECT at once, where writes into a hole
    each take the file's lock alone; the file also ends up in few extents, and a disk
    that fills up fails here, before the data is sent."""
    if _libc.fallocate(fd, 0, ctypes.c_int64(0), ctypes.c_int64(size)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


class StagedDamage(Exception):
    """A staged entry is not what was received; the message names it."""


class Staging:
    """One seed's staging directory for datadir ``datadir``."""

    def __init__(self, datadir: str, seed_id: str):
        self.datadir = os.path.abspath(datadir)
        parent, name = os.path.split(self.datadir.rstrip("/") or "/")
        self.inside = os.stat(parent).st_dev != os.stat(self.datadir).st_dev
        where, prefix = (self.datadir, ".") if self.inside else (parent, f".{name}.")
        self.root = os.path.join(where, f"{prefix}orchagent-seed-{seed_id}")
        self.aside = os.path.join(where, f"{prefix}orchagent-previous-{seed_id}")
        self._fds: dict[int, int] = {}
        #: Files this process created (or found) in staging, never created again: a byte
        #: per entry up to the last such file (a set took 60-90 bytes a file).
        self._created = bytearray()
        #: O_DIRECT descriptors of the files being written in chunks, beside ``_fds``.
        self._direct_fds: dict[int, int] = {}
        #: False once the file system refused O_DIRECT (some FUSE and network file
        #: systems): buffered only from then on.  ``_direct_worked``: a write succeeded.
        self.direct = hasattr(os, "O_DIRECT")
        self._direct_worked = False
        self._lock = threading.Lock()
        #: Bytes written through the page cache so far (small files, tails, file systems
        #: without O_DIRECT): what a background write-back has to flush.
        self.buffered_bytes = 0
        #: Local (uid, gid) by the manifest's (user, group, uid, gid).
        self._owners: dict[tuple, tuple[int, int]] = {}
        #: The file system's write errors, counted from the moment staging is made
        #: (orchagent.durable.Writes): a sync reports each one, even one that another
        #: process's syncfs met first (a fresh descriptor would not).
        self._writes: Writes | None = None

    # --- preparing -----------------------------------------------------------------------

    def exists(self) -> bool:
        return os.path.isdir(self.root)

    def make(self) -> None:
        """Staging made (if it is not) and watched."""
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self.watch()

    def prepare(self, manifest: Manifest) -> None:
        self.make()
        directories = compress(range(len(manifest)), map(_DIR.__eq__, manifest.kinds))
        for index in spill.dropping(directories):
            path = os.path.join(self.root, manifest.paths[index])
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    raise

    def make_empty(self) -> None:
        """Staging empty and watched, for a tool to fill (a hot seed's extraction)."""
        self.discard()
        os.makedirs(self.root, mode=0o700)
        self.watch()

    def watch(self) -> Writes:
        """Count the write errors of staging's file system from now on (see _writes)."""
        if self._writes is None:
            self._writes = Writes(self.root, "the seed's staged copy")
        return self._writes

    def unwatch(self) -> None:
        writes, self._writes = self._writes, None
        if writes is not None:
            writes.close()

    def _path(self, entry: Entry) -> str:
        return os.path.join(self.root, entry.path)

    # --- writing -------------------------------------------------------------------------

    def _open(self, index: int, entry: Entry) -> int:
        """The staged file, sized; created only the first time: a file that vanished
        after that (deleted under the seed) is an error naming it, never a new file that
        would hold only the chunks written from then on."""
        if index < len(self._created) and self._created[index]:
            try:
                fd = os.open(self._path(entry), _OPEN_FLAGS & ~os.O_CREAT)
            except FileNotFoundError:
                raise OSError(errno.ENOENT, f"{entry.path} disappeared from staging while the "
                                            "seed was being written", self._path(entry)) from None
        else:
            fd = os.open(self._path(entry), _OPEN_FLAGS, 0o600)
            if index >= len(self._created):
                self._created += bytes(index + 1 - len(self._created))
            self._created[index] = 1
        try:
            if os.fstat(fd).st_size != entry.size and (
                    entry.extents is not None or not _allocate(fd, entry.size)):
                os.ftruncate(fd, entry.size)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _fd(self, index: int, entry: Entry) -> int:
        with self._lock:
            fd = self._fds.get(index)
            if fd is None:
                fd = self._fds[index] = self._open(index, entry)
            return fd

    def _direct_fd(self, index: int, entry: Entry) -> int | None:
        """The file's O_DIRECT descriptor (after ``_fd`` made and sized the file), or None
        when this file system does not take O_DIRECT."""
        self._fd(index, entry)
        with self._lock:
            fd = self._direct_fds.get(index)
            if fd is None and self.direct:
                try:
                    fd = self._direct_fds[index] = os.open(self._path(entry), _DIRECT_FLAGS)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self.direct = False
            return fd

    def write_batch(self, manifest: Manifest, items: list, journal_fd: int | None) -> list:
        """Verify, write and journal chunks and bundles (worker thread).

        ``items`` are ``(Chunk, whole_file)`` or ``(Bundle, None)``; a whole file is
        written, given its metadata and closed at once.  Returns ``[((file, offset),
        digest or IntegrityError)]``.  An OSError (e.g. ENOSPC) propagates with the file
        and offset in its message.
        """
        results, records, buffered = [], [], 0
        for item, whole in items:
            if isinstance(item, frames.Bundle):
                try:
                    files = frames.unpack_bundle(item)
                except frames.IntegrityError as e:
                    results += [((index, 0), e) for index, _, _ in item.items]
                    continue
                # Threads write bundles side by side, mostly into the same directory: the
                # kernel serialises the creations, but the writes, times and closes
                # overlap (one lock per bundle was 0.4 s slower on 50,000 files).
                for (index, outcome), (_, length, digest) in zip(files, item.items):
                    if not isinstance(outcome, frames.IntegrityError):
                        self._write_small(manifest, index, [outcome], length)
                        buffered += length
                        records.append(JOURNAL_RECORD.pack(index, 0, length, digest))
                        outcome = digest
                    results.append(((index, 0), outcome))
                continue
            try:
                data = frames.unpack_chunk(item)
            except frames.IntegrityError as e:
                results.append((item.where, e))
                continue
            if self._write(manifest, item.file, item.offset, item.length, data, whole):
                buffered += item.length
            results.append((item.where, item.digest))
            records.append(JOURNAL_RECORD.pack(item.file, item.offset, item.length, item.digest))
        if records and journal_fd is not None:
            os.write(journal_fd, b"".join(records))
        if buffered:
            with self._lock:
                self.buffered_bytes += buffered
        return results

    def _write_small(self, manifest: Manifest, index: int, data: list, length: int) -> None:
        """A small file (bundled, or a whole file's one chunk) in one go: create (with its
        mode), write, owner, times, close; straight from the manifest's columns (this runs
        once per small file: no Entry object, as few system calls as can be)."""
        path = manifest.paths[index]
        mode = manifest.modes[index]
        key = (manifest.users[index], manifest.groups[index], manifest.uids[index], manifest.gids[index])
        owner = self._owners.get(key)
        try:
            if owner is None:
                owner = self._owners[key] = local_owner(manifest.entry(index))
            fd = os.open(os.path.join(self.root, path), _OPEN_FLAGS | os.O_TRUNC, mode & 0o777)
            try:
                _pwrite_all(fd, data, 0, length)
                if owner != _SELF and _IS_ROOT:
                    os.fchown(fd, *owner)
                if mode & (_UMASK | 0o7000) or owner != _SELF:
                    os.fchmod(fd, mode)
                mtime = manifest.mtimes[index]
                os.utime(fd, ns=(mtime, mtime))
            finally:
                os.close(fd)
        except OSError as e:
            raise OSError(e.errno, f"{e.strerror} while writing {path} at offset 0") from None

    def _write(self, manifest: Manifest, index: int, offset: int, length: int, data: list,
               whole: bool) -> bool:
        """Write a chunk; True when it went through the page cache (not O_DIRECT)."""
        if whole:
            self._write_small(manifest, index, data, length)
            return True
        entry = manifest.entry(index)
        try:
            if length >= DIRECT_MIN and offset % DIRECT_ALIGN == 0 and self.direct \
                    and self._write_direct(index, entry, data, offset, length):
                return False
            else:
                fd = self._fd(index, entry)
                _pwrite_all(fd, data, offset, length)
                if length >= (1 << 20):
                    _libc.sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(length),
                                          _SYNC_FILE_RANGE_WRITE)
        except OSError as e:
            raise OSError(e.errno, f"{e.strerror} while writing {entry.path} at offset {offset}") from None
        return True

    def _write_direct(self, index: int, entry: Entry, data: list, offset: int, length: int) -> bool:
        """Write a chunk with O_DIRECT (its unaligned tail, if any, buffered).  False when
        the file system refused O_DIRECT: the caller writes it buffered instead."""
        fd = self._direct_fd(index, entry)
        if fd is None:
            return False
        buffer = _direct_buffer.get(length)
        position = 0
        for piece in data:
            buffer[position:position + len(piece)] = piece
            position += len(piece)
        if position != length:
            raise OSError(errno.EIO, f"the chunk's buffers hold {position} bytes, not {length}")
        aligned = length - length % DIRECT_ALIGN
        try:
            _pwrite_rest(fd, buffer[:aligned], offset)
        except OSError as e:
            if e.errno != errno.EINVAL or self._direct_worked:
                raise
            # The file system opened with O_DIRECT but refuses to write that way.
            self.direct = False
            return False
        self._direct_worked = True
        if aligned < length:
            _pwrite_rest(self._fd(index, entry), buffer[aligned:length], offset + aligned)
        return True

    def finish_file(self, index: int, entry: Entry) -> None:
        """All chunks of a multi-chunk file are written: metadata, close."""
        with self._lock:
            fd = self._fds.pop(index, None)
            direct = self._direct_fds.pop(index, None)
        if direct is not None:
            os.close(direct)
        if fd is None:
            fd = self._open(index, entry)
        try:
            self._apply_meta(fd, entry)
        finally:
            os.close(fd)

    def _owner(self, entry: Entry) -> tuple[int, int]:
        key = (entry.user, entry.group, entry.uid, entry.gid)
        owner = self._owners.get(key)
        if owner is None:
            owner = self._owners[key] = local_owner(entry)
        return owner

    def _apply_meta(self, fd: int, entry: Entry) -> None:
        """Owner, mode and times of a file made earlier (its mode as the umask left it)."""
        owner = self._owner(entry)
        if _IS_ROOT and owner != _SELF:
            os.fchown(fd, *owner)
        os.fchmod(fd, entry.mode)
        os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))

    def close_files(self) -> None:
        with self._lock:
            fds = [*self._fds.values(), *self._direct_fds.values()]
            self._fds, self._direct_fds = {}, {}
        for fd in fds:
            os.close(fd)

    # --- checking, finishing, promoting ----------------------------------------------------

    def recheck(self, manifest: Manifest, table, records, kind: int) -> plan.ChunkDigests:
        """The chunk ids and digests of the journal records whose staged bytes still
        hash to their digest (of ``kind``)."""
        good = plan.ChunkDigests()
        for index, offset, length, digest in records:
            cid = table.chunk_id(index, offset)
            if cid is None or table.length[cid] != length:
                continue
            if plan.range_matches(os.path.join(self.root, manifest.paths[index]), offset, length,
                                  digest, kind):
                good.append(cid, digest)
        return good

    def finalize(self, manifest: Manifest, table) -> None:
        self.complete(manifest, table)
        self.sync()

    def sync(self) -> None:
        """Sync the whole file system staging is on (every file and directory at once);
        NotDurable on any write error met since staging was made (see ``_writes``)."""
        self.watch().sync()

    #: A tree receive's background pass (TreeReceive._write_back): the same sync, named
    #: apart so that tests can count the passes.
    write_back = sync

    def complete(self, manifest: Manifest, table) -> None:
        """Create what had no data (empty and hole-only files), symlinks, directory
        metadata."""
        self.close_files()
        kinds, first = manifest.kinds, table.first
        # Entries by kind with C loops: a tree of 50,000 files has few of these.
        chunkless = map(eq, first, islice(first, 1, None))  # no copies of the column
        special = map(lambda kind, none: (kind == _FILE and none) or kind == _LINK, kinds, chunkless)
        for index in spill.dropping(compress(range(len(manifest)), special)):
            entry = manifest.entry(index)
            if kinds[index] == _FILE:
                self.finish_file(index, entry)
            else:
                path = self._path(entry)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                os.symlink(entry.target, path)
                if _IS_ROOT:
                    os.chown(path, *self._owner(entry), follow_symlinks=False)
                os.utime(path, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)
        directories = list(compress(range(len(manifest)), map(_DIR.__eq__, kinds)))
        for index in spill.dropping(reversed(directories)):
            entry = manifest.entry(index)
            path = self._path(entry)
            if _IS_ROOT:
                os.chown(path, *self._owner(entry))
            os.chmod(path, entry.mode)
            os.utime(path, ns=(entry.mtime_ns, entry.mtime_ns))

    def check_on_disk(self, manifest: Manifest, table, kind: int, reread: bool, progress) -> None:
        """Before promotion: every staged entry is there as the manifest says (a file of
        its size, a directory, a link to its target); with ``reread``, every data chunk is
        read back and hashed against the digest it arrived with (``progress`` is given the
        bytes read as it goes).  StagedDamage naming the first entry that differs: the
        tree digest covered the wire, this covers the disk."""
        root, kinds, sizes = self.root, manifest.kinds, manifest.sizes
        for index, path in enumerate(manifest.paths):
            where = os.path.join(root, path)
            try:
                st = os.lstat(where)
            except FileNotFoundError:
                raise StagedDamage(f"{path} is missing from staging ({self.root})") from None
            entry_kind = kinds[index]
            if entry_kind == _FILE:
                if not stat.S_ISREG(st.st_mode):
                    raise StagedDamage(f"{path} in staging is no longer a regular file")
                if st.st_size != sizes[index]:
                    raise StagedDamage(f"{path} in staging holds {st.st_size} bytes, not the "
                                       f"{sizes[index]} received")
            elif entry_kind == _DIR and not stat.S_ISDIR(st.st_mode):
                raise StagedDamage(f"{path} in staging is no longer a directory")
            elif entry_kind == _LINK and (not stat.S_ISLNK(st.st_mode)
                                    or os.readlink(where) != manifest.targets[index]):
                raise StagedDamage(f"{path} in staging is no longer the link received")
        if not reread:
            return
        count = len(table.file)
        bounds = [count * part // READ_BACK_THREADS for part in range(READ_BACK_THREADS + 1)]
        with ThreadPoolExecutor(READ_BACK_THREADS, thread_name_prefix="orchagent-readback") as pool:
            slices = [pool.submit(self._read_back_chunks, manifest, table, kind, start, end, progress)
                      for start, end in zip(bounds, bounds[1:]) if start < end]
            for done in slices:
                done.result()

    def _read_back_chunks(self, manifest: Manifest, table, kind: int, start: int, end: int,
                          progress) -> None:
        """Chunks ``start`` to ``end`` read back in order (one of READ_BACK_THREADS)."""
        fd, open_index, direct = -1, -1, False
        try:
            for cid in range(start, end):
                index, offset, length = table.file[cid], table.offset[cid], table.length[cid]
                if index != open_index:
                    if fd >= 0:
                        os.close(fd)
                    fd, direct = _open_for_reading(os.path.join(self.root, manifest.paths[index]))
                    open_index = index
                data = _read_back(fd, direct, offset, length)
                if len(data) != length or frames.content_digest(data, kind) != table.known(cid):
                    raise StagedDamage(f"{manifest.paths[index]} at offset {offset} in staging "
                                       "differs from what was received and verified")
                progress(length)
        finally:
            if fd >= 0:
                os.close(fd)

    def kept_usage(self) -> int:
        """Apparent bytes of what the datadir keeps through promotion, staging left out
        (orchagent.seed.usage): everything in it when staging is inside (move_aside keeps
        the previous contents inside too), else its own entry and lost+found."""
        if self.inside:
            return disk_usage(self.datadir, frozenset((self.root,)))
        kept = os.lstat(self.datadir).st_size
        lost = os.path.join(self.datadir, "lost+found")
        if os.path.isdir(lost) and not os.path.islink(lost):
            kept += disk_usage(lost)
        return kept

    def ours(self, name: str) -> bool:
        return name in (os.path.basename(self.root), os.path.basename(self.aside))

    def discard(self) -> None:
        self.close_files()
        self.unwatch()
        self._created = bytearray()
        shutil.rmtree(self.root, ignore_errors=True)
        if os.path.exists(self.root):
            shutil.rmtree(self.root)


def _open_for_reading(path: str) -> tuple[int, bool]:
    """A staged file opened to be read back, and whether with O_DIRECT: from the disk
    itself, past the page cache (which it neither fills nor trusts); buffered where the
    file system refuses O_DIRECT."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    if hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return os.open(path, flags), False


def _read_back(fd: int, direct: bool, offset: int, length: int):
    """``length`` bytes at ``offset``; fewer at the end of the file."""
    if not direct or offset % DIRECT_ALIGN:
        # A sparse file's extent may start off the alignment: read that one buffered.
        buffered = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC) if direct else fd
        try:
            return os.pread(buffered, length, offset)
        finally:
            if buffered != fd:
                os.close(buffered)
    view = _direct_buffer.get(-(-length // DIRECT_ALIGN) * DIRECT_ALIGN)
    got = os.preadv(fd, [view[:-(-length // DIRECT_ALIGN) * DIRECT_ALIGN]], offset)
    return view[:min(got, length)]


#: The most buffers one pwritev() takes (Linux refuses more with EINVAL): a chunk that
#: came over a slow or lossy link can arrive in thousands of small reads.
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024


def _pwrite_all(fd: int, buffers: list, offset: int, length: int) -> None:
    """Write the buffers at ``offset``: pwritev of at most IOV_MAX buffers at a time; what a
    short write left of a batch is written again."""
    total = 0
    for start in range(0, len(buffers), _IOV_MAX):
        batch = buffers[start:start + _IOV_MAX]
        size = sum(len(b) for b in batch)
        written = os.pwritev(fd, batch, offset + total)
        if written != size:
            _pwrite_rest(fd, memoryview(b"".join(batch))[written:], offset + total + written)
        total += size
    if total != length:
        raise OSError(errno.EIO, f"the chunk's buffers hold {total} bytes, not {length}")


def _pwrite_rest(fd: int, rest: memoryview, offset: int) -> None:
    while rest:
        n = os.pwrite(fd, rest, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        rest = rest[n:]
        offset += n
