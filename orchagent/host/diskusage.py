"""Disk usage and file tails: blocking file-system work, meant to run in a thread.

:func:`disk_usage` answers what the original agent's ``du -sb PATH`` answered, with two
deliberate differences:

* It counts **apparent** bytes (``st_size``), like ``du -b``: orchestrator compares the
  target's datadir usage with the source's to show seed progress, and the apparent size
  of a copied file equals the original's whatever the file systems' block sizes,
  compression or sparseness.  Hard-linked files count once; directories and symbolic
  links count their own size; symbolic links are never followed.
* It stays on the file system of PATH (like ``du -x``): a walk of ``/`` must not descend
  into ``/proc``, and a network mount below the datadir must not stall it.

Entries that vanish during the walk (MySQL creates and drops temporary files) are
skipped; anything else unreadable is an error naming the path.
"""

from __future__ import annotations

import os
import stat

from orchagent.errors import AgentError, NotFound

#: Bytes read from the end of a log at most, whatever the line lengths: bounded memory.
MAX_TAIL_BYTES = 1024 * 1024
_BLOCK = 64 * 1024


def disk_usage(path: str, leave_out: frozenset[str] = frozenset()) -> int:
    """Apparent bytes used by ``path`` and everything below it on the same file system,
    without the subtrees at the paths in ``leave_out`` (as ``os.path.join`` spells them
    from ``path``)."""
    try:
        top = os.lstat(path)
    except FileNotFoundError:
        raise NotFound(f"no such file or directory: {path}") from None
    except OSError as e:
        raise AgentError(f"cannot examine {path}: {e.strerror}") from e
    total = top.st_size
    if not stat.S_ISDIR(top.st_mode):
        return total
    device = top.st_dev
    seen: set[tuple[int, int]] = set()
    pending = [path]
    while pending:
        directory = pending.pop()
        try:
            entries = os.scandir(directory)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise AgentError(f"cannot read directory {directory}: {e.strerror}") from e
        with entries:
            for entry in entries:
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    raise AgentError(f"cannot examine {entry.path}: {e.strerror}") from e
                if info.st_dev != device or entry.path in leave_out:
                    continue
                is_dir = stat.S_ISDIR(info.st_mode)
                if info.st_nlink > 1 and not is_dir:
                    key = (info.st_dev, info.st_ino)
                    if key in seen:
                        continue
                    seen.add(key)
                total += info.st_size
                if is_dir:
                    pending.append(entry.path)
    return total


def free_bytes(path: str) -> int:
    """Bytes an unprivileged writer may still use on the file system of ``path``
    (OSError when it cannot be examined)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def free_inodes(path: str) -> int | None:
    """Inodes a new file can still take, or None where the file system has no fixed
    number of them (btrfs reports none)."""
    st = os.statvfs(path)
    return st.f_favail if st.f_files else None


def block_size(path: str) -> int:
    return os.statvfs(path).f_bsize or 4096


def available_space(path: str) -> int:
    """:func:`free_bytes`, its failures said as the API says them."""
    try:
        return free_bytes(path)
    except FileNotFoundError:
        raise NotFound(f"no such file or directory: {path}") from None
    except OSError as e:
        raise AgentError(f"cannot examine the file system of {path}: {e.strerror}") from e


def tail_lines(path: str, count: int, max_bytes: int = MAX_TAIL_BYTES) -> list[str]:
    """The last ``count`` lines of a text file, read backwards from its end.

    Like ``tail -n``: a final newline does not make an empty last line.  At most
    ``max_bytes`` are read, so when the last lines are longer than that together the
    first line returned is the end of a longer one.  Invalid UTF-8 is replaced.
    """
    if count <= 0:
        return []
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise NotFound(f"the MySQL error log {path} does not exist") from None
    except OSError as e:
        raise AgentError(f"cannot read the MySQL error log {path}: {e.strerror}") from e
    with fh:
        end = fh.seek(0, os.SEEK_END)
        data = b""
        position = end
        while position > 0 and len(data) < max_bytes:
            step = min(_BLOCK, position, max_bytes - len(data))
            position -= step
            fh.seek(position)
            data = fh.read(step) + data
            # count + 1 newlines: the last may end the final line, one more starts ours.
            if data.count(b"\n") > count:
                break
    if data.endswith(b"\n"):
        data = data[:-1]
    if not data and position == 0:
        return []
    lines = data.split(b"\n")[-count:]
    return [line.decode("utf-8", "replace") for line in lines]
