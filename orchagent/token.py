"""The per-process access token orchestrator presents on every call."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import stat

from orchagent.errors import ConfigError


class Token:
    """A secret compared in constant time; its value never appears in reprs or logs."""

    def __init__(self, value: str):
        if not value or any(c.isspace() for c in value):
            raise ValueError("a token must be non-empty and without white space")
        self._value = value

    @classmethod
    def random(cls) -> "Token":
        """Like the original agent: the hex SHA-256 of a random secret."""
        return cls(hashlib.sha256(secrets.token_bytes(32)).hexdigest())

    @classmethod
    def from_file(cls, path: str) -> "Token":
        with open(path, encoding="utf-8") as fh:
            return cls(fh.read().strip())

    @property
    def value(self) -> str:
        return self._value

    def matches(self, given: bytes | str) -> bool:
        if isinstance(given, str):
            given = given.encode("utf-8", "replace")
        return hmac.compare_digest(given, self._value.encode())

    def write_hint(self, path: str) -> None:
        """Write the token to ``path`` with mode 0600, replacing the file atomically.

        The file is made under an unpredictable name with ``O_CREAT|O_EXCL|O_NOFOLLOW``
        (a name or symlink made there in advance is never opened), then renamed over
        ``path`` (a symlink at ``path`` is replaced, not followed).  A directory that
        another user could write to is refused with a :class:`ConfigError` naming it
        (see :func:`check_hint_directory`): such a user could still rename the token away
        or put their own file in its place for the local tools that read it."""
        directory, name = os.path.split(os.path.abspath(path))
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"TokenHintFile {path}: cannot open its directory: {e.strerror}") from None
        try:
            check_hint_directory(path, directory, os.fstat(dir_fd))
            for _ in range(100):
                tmp = f".{name}.{secrets.token_hex(8)}.tmp"
                try:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
                    break
                except FileExistsError:
                    continue
            else:
                raise ConfigError(f"TokenHintFile {path}: no free temporary name in {directory}")
            try:
                try:
                    os.fchmod(fd, 0o600)
                    os.write(fd, self._value.encode() + b"\n")
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
                raise
        finally:
            os.close(dir_fd)

    def __repr__(self) -> str:
        return "<Token ***>"


def check_hint_directory(path: str, directory: str, st: os.stat_result) -> None:
    """Refuse (ConfigError naming it) a token hint directory that someone other than
    root and this process's user could write to: owned by another user, writable by
    others (``/tmp`` too: the sticky bit does not stop others from making names first),
    or writable by a group other than root's."""
    problem = None
    if st.st_uid not in (0, os.geteuid()):
        problem = f"is owned by uid {st.st_uid}"
    elif st.st_mode & stat.S_IWOTH:
        problem = f"is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
    elif st.st_mode & stat.S_IWGRP and st.st_gid != 0:
        problem = f"is writable by group {st.st_gid} (mode {stat.S_IMODE(st.st_mode):04o})"
    if problem:
        raise ConfigError(f"TokenHintFile {path}: its directory {directory} {problem}; "
                          "another user could take or replace the token there: use a "
                          "directory only root writes to, such as /run/orchestrator-agent")
