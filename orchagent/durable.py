"""Making what the agent wrote durable, and knowing when it is not.

A failed fsync does not mean "try again": after a writeback error the kernel marks the
pages clean, so the data they held is gone from the page cache and a second fsync
succeeds with nothing behind it.  And a tool may see the error and ignore it
(``mariabackup --prepare`` goes on after a failed ``fdatasync`` of an Aria table), or
nobody may see it at all (``cp`` never syncs).  What tells the truth is the file
system's own record: ``syncfs(2)`` on a descriptor returns every writeback error
recorded for its file system since that descriptor was opened (Linux 5.8 and later),
whoever wrote the data and whoever saw the error.

So whoever makes a tree that must survive (a snapshot's copy, a backup's prepared copy,
a restored datadir) opens :class:`Writes` on the file system before the tree is
written, and calls :meth:`Writes.sync` once it is complete: every byte is on disk, or
the step fails.  This may report an error of another writer on the same file system;
a tree is then refused that was perhaps whole, the safe side.
"""

from __future__ import annotations

import ctypes
import errno
import os

from orchagent.errors import AgentError

_libc = ctypes.CDLL(None, use_errno=True)


def _syncfs(fd: int, path: str) -> None:
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


def syncfs(path: str) -> None:
    """Flush every dirty file and directory of the file system holding ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _syncfs(fd, path)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class NotDurable(AgentError):
    """What was written may not be on disk: the file system reported a write error."""

    @classmethod
    def of(cls, error: OSError, path: str, what: str) -> "NotDurable":
        name = errno.errorcode.get(error.errno, str(error.errno))
        return cls(f"the file system of {path} reported a write error ({name}: {error.strerror}) "
                   f"while {what} was written: it may not be on disk")


class Writes:
    """The writes to the file system holding the directory ``path`` from now on (see
    the module docstring); ``what`` names them in messages.  Blocking calls: run them in
    a worker thread."""

    def __init__(self, path: str, what: str):
        self.path = path
        self.what = what
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def sync(self) -> None:
        """Make them durable, or NotDurable if any failed to reach the disk, now or since
        this object was made."""
        try:
            _syncfs(self.fd, self.path)
        except OSError as e:
            raise NotDurable.of(e, self.path, self.what) from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
