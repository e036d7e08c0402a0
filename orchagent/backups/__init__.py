"""Physical backups (mariabackup, xtrabackup) as seed sources, through the v1 flow.

Hosts without LVM or btrfs usually take nightly physical backups.  :class:`Backups`
serves those found in ``BackupDirectories`` (see :mod:`.discovery` for what counts as
one, :mod:`.assess` for what makes one usable):

* ``/api/backups`` lists them, newest first, with why one is not usable;
* the snapshot front (:mod:`orchagent.snapshots`) lists them among the volumes
  (GroupName ``backup``, IsSnapshot true, Name and Path the backup's name; usable ones
  in ``lvs-snapshots``) and hands it every request naming one, so orchestrator's seed
  flow and ``orchagent seed`` use backups unchanged;
* ``mountlv`` prepares the backup on a work copy (:mod:`.prepare`) and bind-mounts the
  result read-only on ``SnapshotMountPoint``; ``umount`` unmounts it and removes the
  copy.  Which backup is mounted is kept in ``StateDir/backups/mounted.json``, so it is
  still known after an agent restart;
* ``restore-snapshot`` prepares a copy beside the datadir, then stops MySQL, renames the
  datadir aside (kept as ``<datadir>.replaced-<UTC time>``), renames the copy in and
  starts MySQL, with the undo of :mod:`orchagent.snapshots.restore` and the renames
  journaled (:mod:`orchagent.swap`), so that a restore killed half-way is rolled forward
  or back at the next agent start;
* ``removelv`` refuses: the agent uses backups, it never deletes them.

Hot seeds (a fresh backup of the running server, sent by the seed engine) are in
:mod:`.hot`.  The backup directories themselves are only ever read.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from twisted.internet import threads
from twisted.logger import Logger

from orchagent.backups.assess import HostTools, assess
from orchagent.backups.discovery import Scanner
from orchagent.backups.hot import HotSeeds
from orchagent.backups.model import Backup
from orchagent.backups.prepare import Preparer
from orchagent.backups.tools import Tools
from orchagent.errors import AgentError, NotAvailable, NotFound, Refused, StepFailed
from orchagent.snapshots import mountinfo, naming
from orchagent.snapshots.directory import identity
from orchagent.snapshots.model import LogicalVolume, Mount
from orchagent.snapshots.mountpoint import SnapshotMountPoint
from orchagent.snapshots.restore import (Step, mysql_start_step, mysql_stop_step, rename_steps,
                                         restore_journal, run_steps)
from orchagent.swap import Work

log = Logger()


def _named(backups: list[Backup], name: str) -> Backup | None:
    wanted = name.rstrip("/") or name
    return next((b for b in backups if wanted in (b.name, b.path)), None)


class Backups:
    """The backups of this host; see the module docstring."""

    def __init__(self, config: Any, runner: Any, reactor: Any, host: Any, service: Any,
                 tools: Tools | None = None, read_mounts=mountinfo.read,
                 thread=threads.deferToThread):
        self.config = config
        self.runner = runner
        self.reactor = reactor
        self.host = host
        self.service = service
        self.tools = tools or Tools(config, runner)
        self.read_mounts = read_mounts
        self.thread = thread
        self.scanner = Scanner()
        self.preparer = Preparer(config, runner, self.tools, host, thread)
        self.mount_point = SnapshotMountPoint(config.snapshot_mount_point, runner, host, read_mounts)
        self.hot = HotSeeds(config, runner, host, service, self.tools, thread)

    # --- listing -------------------------------------------------------------------------

    @property
    def directories(self) -> list[str]:
        return [mountinfo.normalize(d) for d in self.config.backup_directories if d]

    async def list(self) -> list[Backup]:
        """Every backup, newest first (``/api/backups``)."""
        directories = self.directories
        if not directories:
            return []
        found = await self.thread(self.scanner.scan, directories)
        versions = {}
        for tool in sorted({b.tool for _, b in found}):
            if self.tools.installed(tool):
                versions[tool] = await self.tools.version(tool)
        return assess(found, HostTools(self.tools.installed, versions, self.tools.decryption))

    async def volumes(self, pattern: str = "") -> list[LogicalVolume]:
        """Every backup as a v1 volume (``/api/lvs``); unusable ones read as invalid."""
        return [b.as_volume() for b in await self.list() if pattern in b.name]

    async def snapshot_volumes(self) -> list[LogicalVolume]:
        """The usable backups as v1 snapshots (``/api/lvs-snapshots``)."""
        return [b.as_volume() for b in await self.list() if b.usable]

    async def find(self, name: str) -> Backup | None:
        """The backup called ``name`` (or in directory ``name``), None if there is none."""
        return _named(await self.list(), name)

    async def _usable(self, name: str) -> tuple[Backup, list[Backup]]:
        """The backup ``name`` and its chain (full backup first), or why not."""
        backups = await self.list()
        by_name = {b.name: b for b in backups}
        backup = _named(backups, name)
        if backup is None:
            raise NotFound(f"no backup {name!r} in BackupDirectories")
        if not backup.usable:
            raise Refused(f"backup {backup.name} is not usable: {backup.reason}; nothing was changed")
        return backup, [by_name[n] for n in backup.chain]

    async def _datadir(self) -> str | None:
        try:
            return mountinfo.normalize(await self.host.datadir())
        except AgentError:
            return None

    # --- mounting ------------------------------------------------------------------------

    @property
    def _record_path(self) -> str:
        return os.path.join(self.config.state_dir, "backups", "mounted.json")

    def _record(self) -> dict | None:
        """The record of the work copy; None when there is none.  One that cannot be read
        is an error, never "none": umount would answer success and leave the backup
        mounted and its copy in place (backup_mount error points #729, #731)."""
        try:
            with open(self._record_path, encoding="utf-8") as fh:
                record = json.load(fh)
        except (FileNotFoundError, ValueError):
            return None
        except OSError as e:
            raise AgentError(f"cannot read {self._record_path}, the record of the mounted backup's "
                             f"work copy: {e.strerror or e}") from e
        return record if isinstance(record, dict) and {"name", "root", "data"} <= set(record) else None

    def _write_record(self, record: dict | None) -> None:
        if record is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._record_path)
            return
        os.makedirs(os.path.dirname(self._record_path), mode=0o700, exist_ok=True)
        tmp = self._record_path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(record, fh)
            os.replace(tmp, self._record_path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if e.filename is None:
                raise OSError(e.errno, e.strerror, tmp) from e  # name the file written
            raise

    def mounted(self) -> str | None:
        """The name of the backup whose work copy is on SnapshotMountPoint, else None."""
        if not self.config.snapshot_mount_point:
            return None
        record = self._record()
        if (record is None or self.mount_point.entry() is None
                or identity(self.mount_point.path) != identity(record["data"])):
            return None
        return record["name"]

    async def mount_state(self) -> Mount:
        return await self.mount_point.state(self.mounted() or "")

    async def mount(self, name: str) -> Mount:
        """Prepare backup ``name`` on a work copy, bind-mount it read-only."""
        path = self.mount_point.require_free()
        backup, chain = await self._usable(name)
        await self.discard_stale()
        state_root = os.path.join(self.config.state_dir, "backups", f"mounted-{backup.name}")
        beside = os.path.join(os.path.dirname(chain[0].path), f".orchagent-work-{backup.name}")
        place = await self.preparer.choose(chain, [(state_root, False), (beside, True)], "the work copy")
        data = os.path.join(place.root, "data")
        # Recorded before it is made: a copy that a crash, or a removal that failed after
        # a failed step, leaves behind is then umount's (or the next mountlv's) to remove.
        try:
            self._write_record({"name": backup.name, "root": place.root, "data": data})
        except OSError as e:
            raise StepFailed(f"backup {backup.name}: step record failed: cannot write "
                             f"{e.filename or self._record_path}: {e.strerror}; nothing was "
                             "copied") from e
        try:
            data = await self.preparer.make(chain, place, await self._datadir())
        except BaseException:
            if not os.path.lexists(place.root):
                self._write_record(None)
            raise
        try:
            log.info("backup {name}: bind-mounting the prepared copy {data} read-only on {path}",
                     name=backup.name, data=data, path=path)
            await self.runner.run(["mount", "-o", "bind,ro", data, path], privileged=True)
            entry = self.mount_point.entry()
            if entry is None or not entry.read_only:
                raise Refused(f"mounting {data} on {path} did not give a read-only mount")
            # Its answer too: a mountlv that fails leaves nothing mounted.
            return await self.mount_state()
        except Exception as e:
            await self.mount_point.unmount()
            await self.discard_stale()
            if isinstance(e, AgentError):
                raise type(e)(f"backup {backup.name}: step mount failed: {e.message}; "
                              "the work copy was removed") from e
            raise

    async def unmount(self) -> Mount:
        """Unmount the backup's work copy and remove it."""
        if self.mounted() is not None:
            await self.mount_point.unmount()
        await self.discard_stale()
        return await self.mount_state()

    async def discard_stale(self) -> None:
        """Remove the work copy of the record when it is no longer mounted."""
        record = self._record()
        if record is None or self.mounted() is not None:
            return
        log.info("backup {name}: removing the work copy {root}", name=record["name"], root=record["root"])
        await self.preparer.remove(record["root"])
        self._write_record(None)

    async def remove(self, name: str) -> bool:
        backup = await self.find(name)
        where = f" ({backup.path})" if backup is not None else ""
        raise Refused(f"refusing to remove backup {name}{where}: the agent uses backups but "
                      "never deletes them; remove it with your backup tooling")

    # --- restoring -------------------------------------------------------------------------

    async def restore(self, name: str) -> bool:
        """Restore this host's datadir from backup ``name`` (see the module docstring)."""
        backup, chain = await self._usable(name)
        datadir = await self._datadir()
        if not datadir or datadir == "/":
            raise NotAvailable(f"restore of backup {backup.name}: the MySQL datadir is unknown or /")
        if mountinfo.at(self.read_mounts(), datadir) is not None:
            raise Refused(f"restore of backup {backup.name}: the datadir {datadir} is a mount "
                          "point; a restore renames the datadir aside, which a mount point cannot be")
        parent, base = os.path.split(datadir)
        now = self.reactor.seconds()
        replaced = os.path.join(parent, naming.replaced_name(base, now))
        root = os.path.join(parent, f".{base}.restoring-{naming.timestamp(now)}")
        for path in (replaced, root):
            if os.path.lexists(path):
                raise Refused(f"{path} already exists; try again in a second")
        journal = restore_journal(self.config, self.runner)
        place = await self.preparer.choose(chain, [(root, False)], "the restored copy")
        was_running = bool(await self.service.is_running())
        swap = journal.swap(
            f"restore-{naming.timestamp(now)}", f"restore of backup {backup.name} into {datadir}",
            [(datadir, replaced), (os.path.join(place.root, "data"), datadir)], [Work(place.root)],
            {"backup": backup.path, "mysql_was_running": was_running})

        async def prepare_copy():
            await swap.open()
            await self.preparer.make(chain, place, datadir)

        steps = [
            Step(f"prepare a copy of backup {backup.name} in {place.root}", prepare_copy,
                 swap.roll_back),
            mysql_stop_step(self.service, was_running),
            *rename_steps(swap, [f"rename the datadir {datadir} to {replaced}",
                                 f"rename the prepared copy to {datadir}"]),
            mysql_start_step(self.service),
        ]
        await run_steps(f"restore of backup {backup.name}", steps, kept=replaced)
        await swap.close()
        log.info("restored backup {name}; the replaced datadir is kept as {replaced}",
                 name=backup.name, replaced=replaced)
        return True
