"""Which backups the agent can serve, and why not the others (pure: no I/O).

A backup is usable when the agent can turn it into MySQL data on a copy: the tool that
made it is installed here in the same major version (``--prepare`` cannot read another
version's redo log), whatever opens it is configured (a compressed backup needs its
decompressor program, an encrypted one the ``encrypt`` algorithm and key in the tool's
option group), it is a whole backup (not ``--tables``/``--databases``), its name can be
given to ``mountlv``, and, for an incremental backup, every backup down to its full base
is present and usable.  The first reason found is reported.
"""

from __future__ import annotations

import re
from typing import Callable

import attrs

from orchagent.backups.discovery import MARIABACKUP, XTRABACKUP
from orchagent.backups.model import Backup
from orchagent.backups.tools import major_version

#: What ``mountlv?lv=`` accepts (orchagent.api.params.volume_name) minus '/'.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.+@:-]{1,255}$")
FULL_TYPES = ("full-backuped", "full-prepared", "log-applied")


@attrs.frozen
class HostTools:
    """What this host has to open backups with."""

    installed: Callable[[str], bool]
    #: tool -> installed ``X.Y`` version ("" when unknown)
    versions: dict[str, str]
    #: tool -> (algorithm, where) from :meth:`Tools.decryption`
    decryption: Callable[[str], tuple[str, str]]


def _own_reason(backup: Backup, host: HostTools) -> str:
    name = backup.name
    if not _SAFE_NAME.fullmatch(name):
        return (f"the name {name!r} cannot be given to mountlv (letters, digits and "
                "'_.+@:-' only); rename the directory")
    if backup.partial:
        return f"backup {name} is partial (some tables only): it cannot serve as a datadir"
    if backup.tool not in (MARIABACKUP, XTRABACKUP):
        return f"cannot tell which tool made backup {name} (no readable info file)"
    if backup.backup_type not in FULL_TYPES + ("incremental",):
        return f"backup {name} has an unknown backup_type {backup.backup_type!r}"
    if not host.installed(backup.tool):
        return f"backup {name} was made by {backup.tool}, which is not installed here"
    made, here = major_version(backup.tool_version), host.versions.get(backup.tool, "")
    if made and here and made != here:
        return (f"backup {name} was made by {backup.tool} {made} and the installed "
                f"{backup.tool} is {here}: --prepare needs the same version")
    if backup.encrypted:
        if backup.tool != XTRABACKUP:
            return f"backup {name} is encrypted (.xbcrypt files), which {backup.tool} cannot open"
        algorithm, where = host.decryption(backup.tool)
        if not algorithm:
            return f"backup {name} is encrypted (.xbcrypt files) and decryption is not configured: {where}"
    if backup.compressed and not host.installed(backup.compressed):
        return (f"backup {name} is compressed ({backup.compressed}) and {backup.compressed} "
                f"is not installed here ({backup.tool} --decompress needs it)")
    return ""


def _find_base(backup: Backup, candidates: list[Backup]) -> Backup | None:
    """The backup an incremental one applies on: same tool, its to_lsn equal to our
    from_lsn, not made after us; the newest of them when several match."""
    matches = [c for c in candidates
               if c.name != backup.name and c.tool == backup.tool and not c.partial
               and c.to_lsn == backup.from_lsn and c.backup_type in FULL_TYPES + ("incremental",)
               and (c.created_at is None or backup.created_at is None
                    or c.created_at <= backup.created_at)]
    return max(matches, key=lambda c: (c.created_at or 0.0, c.name)) if matches else None


def assess(found: list[tuple[str, Backup]], host: HostTools) -> list[Backup]:
    """``found`` (directory, backup) in configuration order, each judged; newest first."""
    first_dir: dict[str, str] = {}
    judged: dict[str, Backup] = {}
    order: list[Backup] = []
    for directory, backup in found:
        if backup.name in first_dir:
            order.append(backup.unusable(f"another backup named {backup.name} is in "
                                         f"{first_dir[backup.name]}, which is listed first"))
            continue
        first_dir[backup.name] = directory
        reason = _own_reason(backup, host)
        if reason:
            backup = backup.unusable(reason)
        judged[backup.name] = backup
        order.append(backup)
    candidates = list(judged.values())

    def chained(backup: Backup, seen: tuple[str, ...]) -> Backup:
        if not backup.incremental:
            return attrs.evolve(backup, chain=(backup.name,))
        base = _find_base(backup, candidates)
        if base is None:
            return attrs.evolve(backup, chain=(backup.name,)).unusable(
                f"incremental backup {backup.name}: its base (a backup with to_lsn = "
                f"{backup.from_lsn}) is not in BackupDirectories")
        backup = attrs.evolve(backup, base=base.name)
        if base.name in seen:
            return backup.unusable(f"incremental backup {backup.name}: its chain of bases loops")
        base = chained(base, seen + (backup.name,))
        backup = attrs.evolve(backup, chain=base.chain + (backup.name,))
        if not base.usable:
            return backup.unusable(f"incremental backup {backup.name}: its base {base.name} "
                                   f"is not usable ({base.reason})")
        if backup.tool == XTRABACKUP and base.backup_type == "full-prepared":
            return backup.unusable(f"incremental backup {backup.name}: its base {base.name} "
                                   "was fully prepared; xtrabackup cannot apply increments to it")
        return backup

    result = [chained(b, ()) if b.name in judged and judged[b.name] is b else b for b in order]
    return sorted(result, key=lambda b: (b.created_at or 0.0, b.name), reverse=True)
