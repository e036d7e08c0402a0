"""The per-process access token orchestrator presents on every call."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets


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
        """Write the token to ``path`` with mode 0600, replacing the file atomically."""
        directory = os.path.dirname(os.path.abspath(path))
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, self._value.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)

    def __repr__(self) -> str:
        return "<Token ***>"
