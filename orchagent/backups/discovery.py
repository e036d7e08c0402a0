"""Finding backups in BackupDirectories and reading what each one is (blocking: threads).

A backup is a subdirectory of a configured directory holding a checkpoints file, as
mariabackup and xtrabackup write it at the very end of a successful ``--backup``
(``mariadb_backup_checkpoints``, or ``xtrabackup_checkpoints`` for xtrabackup and for
mariabackup before 11.x), so a backup still being written is not listed.  Names
starting with ``.`` are never backups: they are the agent's own work copies.

What is read, all from the backup's own files (``key = value`` lines):

* the checkpoints file: ``backup_type`` (``full-backuped``, ``incremental``, and after
  ``--prepare`` ``log-applied`` or ``full-prepared``), ``from_lsn``, ``to_lsn``;
* the info file (``mariadb_backup_info`` / ``xtrabackup_info``): ``tool_name``,
  ``tool_version``, ``start_time`` (the server's local time), ``partial``,
  ``compressed``, ``encrypted``;
* every file's name and size: ``.qp``/``.zst``/``.lz4`` files mean a compressed backup,
  ``.xbcrypt`` an encrypted one, whatever the info file says (it may itself be encoded).

Reading a backup walks all its files, so results are cached per backup directory,
keyed by the identity and modification time of its checkpoints file and of the
directory: a finished backup does not change, and a prepared one rewrites its
checkpoints file.
"""

from __future__ import annotations

import os
import threading
import time

from orchagent.backups.model import Backup

CHECKPOINTS_FILES = ("mariadb_backup_checkpoints", "xtrabackup_checkpoints")
INFO_FILES = ("mariadb_backup_info", "xtrabackup_info")
#: File suffixes of compressed backups, and the program that opens each.
COMPRESSORS = {".qp": "qpress", ".zst": "zstd", ".lz4": "lz4"}
ENCRYPTED_SUFFIX = ".xbcrypt"
_ENCODED = tuple(COMPRESSORS) + (ENCRYPTED_SUFFIX,)
MARIABACKUP, XTRABACKUP = "mariabackup", "xtrabackup"


def read_key_values(path: str) -> dict[str, str]:
    """``key = value`` lines of a small text file; other lines are ignored."""
    values: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh.read(1 << 20).splitlines():
            key, sep, value = line.partition("=")
            if sep:
                values[key.strip()] = value.strip()
    return values


def checkpoints_file(path: str) -> str | None:
    """The name of the checkpoints file in ``path`` (maybe compressed or encrypted)."""
    for name in CHECKPOINTS_FILES:
        for suffix in ("",) + _ENCODED:
            if os.path.isfile(os.path.join(path, name + suffix)):
                return name + suffix
    return None


def _int(values: dict[str, str], key: str) -> int:
    try:
        return int(values.get(key, "0"))
    except ValueError:
        return 0


def _local_time(text: str) -> float | None:
    try:
        return time.mktime(time.strptime(text.strip(), "%Y-%m-%d %H:%M:%S"))
    except (ValueError, OverflowError):
        return None


def normalize_tool(name: str) -> str:
    name = name.lower()
    if "maria" in name:
        return MARIABACKUP
    if "xtrabackup" in name or "innobackupex" in name:
        return XTRABACKUP
    return name


def _walk(path: str) -> tuple[int, str, bool]:
    """The backup's size, its compressor (or ""), whether it holds encrypted files."""
    size = 0
    compressed = ""
    encrypted = False
    for directory, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(directory, d))]
        for name in files:
            try:
                size += os.lstat(os.path.join(directory, name)).st_size
            except OSError:
                continue
            suffix = os.path.splitext(name)[1]
            if suffix in COMPRESSORS and not compressed:
                compressed = COMPRESSORS[suffix]
            elif suffix == ENCRYPTED_SUFFIX:
                encrypted = True
    return size, compressed, encrypted


def read_backup(path: str, name: str) -> Backup:
    """The backup in directory ``path`` (which holds a checkpoints file), as found on
    disk; the checks that need more than the backup itself come later
    (:func:`orchagent.backups.assess.assess`)."""
    found = checkpoints_file(path)
    size, compressed, encrypted = _walk(path)
    checkpoints: dict[str, str] = {}
    info: dict[str, str] = {}
    problem = ""
    if found in CHECKPOINTS_FILES:
        try:
            checkpoints = read_key_values(os.path.join(path, found))
        except OSError as e:
            problem = f"its checkpoints file {found} cannot be read: {e.strerror}"
    elif found is not None and not (compressed or encrypted):
        problem = f"its checkpoints file {found} is encoded"
    for info_name in INFO_FILES:
        info_path = os.path.join(path, info_name)
        if os.path.isfile(info_path):
            try:
                info = read_key_values(info_path)
            except OSError:
                info = {}
            break
    if info.get("tool_name"):
        tool = normalize_tool(info["tool_name"])
    elif found and found.startswith("mariadb_backup"):
        tool = MARIABACKUP
    elif "compact" in checkpoints or "flushed_lsn" in checkpoints:
        tool = XTRABACKUP
    elif checkpoints:
        tool = MARIABACKUP
    else:
        tool = ""
    backup_type = checkpoints.get("backup_type", "")
    prepared = backup_type == "full-prepared" or (tool == MARIABACKUP and backup_type == "log-applied")
    created = _local_time(info.get("start_time", "")) if info.get("start_time") else None
    if created is None:
        try:
            created = os.stat(os.path.join(path, found or "")).st_mtime
        except OSError:
            created = None
    if not compressed and info.get("compressed", "N").upper() not in ("N", "NO", "0", ""):
        compressed = "qpress" if tool == MARIABACKUP else info["compressed"]
    backup = Backup(
        name=name, path=path, tool=tool, backup_type=backup_type, prepared=prepared,
        from_lsn=_int(checkpoints, "from_lsn"), to_lsn=_int(checkpoints, "to_lsn"),
        created_at=created, size_bytes=size, tool_version=info.get("tool_version", ""),
        compressed=compressed,
        encrypted=encrypted or info.get("encrypted", "N").upper() in ("Y", "YES", "1"),
        partial=info.get("partial", "N").upper() in ("Y", "YES", "1"),
    )
    if problem:
        backup = backup.unusable(f"backup {name}: {problem}")
    return backup


class Scanner:
    """Lists the backups of a set of directories, caching each backup's reading."""

    def __init__(self):
        self._cache: dict[str, tuple[tuple, Backup]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _stamp(path: str, found: str) -> tuple:
        top = os.stat(path)
        st = os.stat(os.path.join(path, found))
        return (top.st_ino, top.st_mtime_ns, st.st_ino, st.st_mtime_ns, st.st_size)

    def scan(self, directories: list[str]) -> list[tuple[str, Backup]]:
        """``(directory, backup)`` for every backup, in directory order then name order.
        A configured directory that is missing or unreadable has no backups (it may be
        a mount that is not there right now); the listing must not fail for it."""
        found: list[tuple[str, Backup]] = []
        seen: set[str] = set()
        for directory in directories:
            try:
                names = sorted(os.listdir(directory))
            except OSError:
                continue
            for name in names:
                path = os.path.join(directory, name)
                if name.startswith(".") or os.path.islink(path) or not os.path.isdir(path):
                    continue
                backup = self._read(path, name)
                if backup is not None:
                    found.append((directory, backup))
                    seen.add(path)
        with self._lock:
            for path in [p for p in self._cache if p not in seen]:
                del self._cache[path]
        return found

    def _read(self, path: str, name: str) -> Backup | None:
        try:
            found = checkpoints_file(path)
            if found is None:
                return None
            stamp = self._stamp(path, found)
        except OSError:
            return None
        with self._lock:
            cached = self._cache.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        backup = read_backup(path, name)
        with self._lock:
            self._cache[path] = (stamp, backup)
        return backup
