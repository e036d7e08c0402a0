"""The controller's memory of seeds it started: one JSON file per seed, mode 0600.

A seed outlives the controller process that started it (the copy runs agent to agent),
so what ``--resume`` and ``abort`` need — both hosts, the snapshot mounted on the source,
the per-seed key — is written down before the first change to either host and removed
once the seed is finished or aborted.  The key is a secret: the directory is 0700 and the
file 0600, replaced atomically so a crash never leaves half a record.
"""

from __future__ import annotations

import json
import os
import re

import attrs

from orchagent.cli.settings import SettingsError

_SEED_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

#: Where a seed is: snapshot mounted, nothing else changed / data moving / data verified
#: in place, only post-copy, unmount and MySQL start left.
PHASES = ("prepared", "copying", "finishing")


@attrs.define
class SeedRecord:
    seed_id: str
    key: str = attrs.field(repr=False)
    #: Hosts as the operator named them (resolved again through the settings on resume).
    target: str
    source: str
    #: What the source agent connects to for the stream (the target URL's host part).
    target_host: str
    #: The source's /api/hostname, passed to post-copy as sourceHost (as orchestrator does).
    source_hostname: str
    #: Path of the snapshot mounted on the source.
    snapshot: str
    phase: str = "prepared"
    created_at: float = 0.0
    rate_limit: int = 0
    #: The controller stopped the target's MySQL (so an abort before any erase restarts it).
    stopped_mysql: bool = False
    #: The target's datadir was emptied before the copy (there was no room to keep it).
    deleted_datadir: bool = False
    #: The source sends a hot backup of its running server (``--hot``): nothing is mounted.
    hot: bool = False

    def to_json(self) -> dict:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, doc: dict) -> "SeedRecord":
        names = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in names})


class SeedStore:
    """Seed records under ``directory`` (``~/.orchagent/seeds``)."""

    def __init__(self, directory: str):
        self.directory = directory

    def _path(self, seed_id: str) -> str:
        if not _SEED_ID.match(seed_id):
            raise SettingsError(f"invalid seed id {seed_id!r}: letters, digits, '.', '_' and '-' only")
        return os.path.join(self.directory, seed_id + ".json")

    def save(self, record: SeedRecord) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)
        path = self._path(record.seed_id)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(record.to_json(), indent=2).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)

    def load(self, seed_id: str) -> SeedRecord:
        path = self._path(seed_id)
        try:
            with open(path, encoding="utf-8") as fh:
                return SeedRecord.from_json(json.load(fh))
        except FileNotFoundError:
            raise SettingsError(f"no seed {seed_id} started from here ({path} does not exist)") from None
        except (OSError, ValueError, TypeError) as e:
            raise SettingsError(f"{path}: unreadable seed record: {e}") from None

    def exists(self, seed_id: str) -> bool:
        return os.path.exists(self._path(seed_id))

    def remove(self, seed_id: str) -> None:
        try:
            os.unlink(self._path(seed_id))
        except FileNotFoundError:
            pass

    def all(self) -> list[SeedRecord]:
        """Every readable record (unreadable ones are skipped: they are reported on use)."""
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        records = []
        for name in names:
            if name.endswith(".json"):
                try:
                    records.append(self.load(name[:-5]))
                except SettingsError:
                    continue
        return records
