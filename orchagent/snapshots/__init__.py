"""Snapshots of the MySQL datadir: LVM, btrfs and cold-copy backends behind one front.

:func:`build_backend` returns the :class:`Snapshots` front the API and the seed manager
use.  It chooses the backend named by ``SnapshotBackend`` (``auto`` detects it from the
datadir's file system on first use, see :mod:`orchagent.snapshots.detect`), lets
``CreateSnapshotCommand``, when set, win over the backend for creating snapshots (the
original agent's do-it-yourself hook), and runs one changing operation at a time (create,
mount, unmount, remove, restore), so that two requests never race on the mount point or
the datadir.  Restores a crash interrupted are settled before anything else
(:meth:`Snapshots.recover`, at agent start and before each restore).  Nothing is
unmounted, mounted over, removed or restored while a seed sends what it would change
(:meth:`Snapshots.refuse_while_sent`).
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from twisted.internet.defer import DeferredLock
from twisted.logger import Logger
from zope.interface import implementer

from orchagent.errors import Refused
from orchagent.interfaces import ICommandRunner, ISnapshotBackend
from orchagent.snapshots import mountinfo
from orchagent.snapshots.model import LogicalVolume, Mount, seed_order
from orchagent.snapshots.restore import recover_restores, restore_journal

log = Logger()


@implementer(ISnapshotBackend)
class Snapshots:
    """The snapshot backend as the rest of the agent sees it."""

    def __init__(self, config: Any, runner: ICommandRunner, backends: dict[str, Any],
                 detect: Callable[[], Awaitable[str]], backups: Any = None,
                 service: Any = None):
        self.config = config
        #: The MySQL service: recovery renames nothing while MySQL runs.
        self.service = service
        self.runner = runner
        self.backends = backends
        self.detect = detect
        #: orchagent.backups.Backups: backups are listed with the snapshots, and a name
        #: that is a backup's goes to it (a backup wins over a snapshot of the same name).
        self.backups = backups
        self.lock = DeferredLock()
        self.chosen = None if config.snapshot_backend == "auto" else backends[config.snapshot_backend]
        #: The sends that may still read their source (the seed manager's
        #: ``reading_sources``, wired by build_agent); None: seeds are not this object's care.
        self.seed_readers: Callable[[], Awaitable[list[dict]]] | None = None

    async def refuse_while_sent(self, doing: str, mount_point: bool = True,
                                datadir: bool = False) -> None:
        """Refused, naming the seed, while a send reads the snapshot mount point
        (``mount_point``) or the datadir (``datadir``): unmounting or replacing either
        under it would send a mix of two trees.  A send that has read everything (it
        waits for the receiver's verdict), or was aborted, no longer counts."""
        if self.seed_readers is None:
            return
        readers = await self.seed_readers()
        if not readers:
            return
        mount = mountinfo.normalize(self.config.snapshot_mount_point) \
            if self.config.snapshot_mount_point else None
        for reader in readers:
            path = reader.get("SourcePath", "")
            on_mount = reader.get("Source") == "snapshot" or (
                mount is not None and (path == mount or path.startswith(mount.rstrip("/") + "/")))
            if (mount_point and on_mount) or (datadir and reader.get("Source") == "datadir"):
                seed = reader.get("SeedId")
                raise Refused(f"cannot {doing}: seed {seed} is sending {path or 'it'}; abort the "
                              f"seed (abort-seed/{seed}) or wait for it to end")

    @property
    def name(self) -> str:
        return self.chosen.name if self.chosen is not None else "auto"

    async def backend(self):
        if self.chosen is None:
            name = await self.detect()
            log.info("snapshots: SnapshotBackend auto chose {name}", name=name)
            self.chosen = self.backends[name]
        return self.chosen

    async def _backup(self, name: str):
        return await self.backups.find(name) if self.backups is not None else None

    async def list_volumes(self, pattern: str = "") -> list[LogicalVolume]:
        volumes = await (await self.backend()).list_volumes(pattern)
        if self.backups is not None:
            volumes += await self.backups.volumes(pattern)
        return volumes

    async def list_snapshots(self) -> list[LogicalVolume]:
        """Valid snapshots and usable backups newest first, then invalid ones
        (:func:`~orchagent.snapshots.model.seed_order`): orchestrator seeds from the first."""
        snapshots = await (await self.backend()).list_snapshots()
        if self.backups is not None:
            snapshots = snapshots + await self.backups.snapshot_volumes()
        return seed_order(snapshots)

    async def get_volume(self, name: str) -> LogicalVolume:
        backup = await self._backup(name)
        if backup is not None:
            return backup.as_volume()
        return await (await self.backend()).get_volume(name)

    async def mount_state(self) -> Mount:
        if self.backups is not None and self.backups.mounted() is not None:
            return await self.backups.mount_state()
        return await (await self.backend()).mount_state()

    async def create_snapshot(self) -> bool:
        async with self.lock:
            command = self.config.create_snapshot_command
            if command:
                log.info("snapshots: running CreateSnapshotCommand")
                await self.runner.shell(command)
                return True
            return await (await self.backend()).create_snapshot()

    async def mount(self, name: str) -> Mount:
        async with self.lock:
            await self.refuse_while_sent(f"mount {name} on the snapshot mount point")
            if await self._backup(name) is not None:
                return await self.backups.mount(name)
            return await (await self.backend()).mount(name)

    async def unmount(self) -> Mount:
        async with self.lock:
            await self.refuse_while_sent("unmount the snapshot mount point")
            if self.backups is not None and self.backups.mounted() is not None:
                return await self.backups.unmount()
            answer = await (await self.backend()).unmount()
            if self.backups is not None:
                # A backup's work copy that a failed mountlv could not remove.
                await self.backups.discard_stale()
            return answer

    async def remove(self, name: str) -> bool:
        async with self.lock:
            if self.seed_readers is not None and await self.seed_readers():
                mount = await self.mount_state()
                if mount.is_mounted and mount.lv_path and \
                        mount.lv_path == (await self.get_volume(name)).path:
                    await self.refuse_while_sent(f"remove {name}, which is mounted")
            if await self._backup(name) is not None:
                return await self.backups.remove(name)
            return await (await self.backend()).remove(name)

    async def recover(self) -> list[str]:
        """Settle the restores a crash interrupted (:func:`recover_restores`); what was
        done.  SwapStuck names each one that could not be."""
        async with self.lock:
            return await recover_restores(restore_journal(self.config, self.runner), self.service)

    async def restore(self, name: str) -> bool:
        async with self.lock:
            await self.refuse_while_sent(f"restore {name} over the datadir", mount_point=False,
                                         datadir=True)
            await recover_restores(restore_journal(self.config, self.runner), self.service)
            if await self._backup(name) is not None:
                return await self.backups.restore(name)
            return await (await self.backend()).restore(name)


def build_backend(config: Any, runner: ICommandRunner, reactor: Any, host: Any,
                  service: Any, backups: Any = None) -> Snapshots:
    """The agent's snapshot front, with every backend ready and ``auto`` detection."""
    from orchagent.snapshots.btrfs import BtrfsBackend
    from orchagent.snapshots.copy import CopyBackend
    from orchagent.snapshots.detect import detect_backend
    from orchagent.snapshots.lvm import LVMBackend

    backends = {
        "lvm": LVMBackend(config, runner, reactor, host, service),
        "btrfs": BtrfsBackend(config, runner, reactor, host, service),
        "copy": CopyBackend(config, runner, reactor, host, service),
    }
    return Snapshots(config, runner, backends, lambda: detect_backend(host, backends["lvm"]),
                     backups=backups, service=service)
