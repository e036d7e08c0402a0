"""Cold copies of the datadir: the snapshot backend that works on any file system.

A snapshot is ``cp -a --reflink=auto`` of the datadir into ``SnapshotDirectory``: on a file
system that shares blocks (btrfs, XFS with reflink) it is nearly free, elsewhere it is a
full copy.  A copy is only consistent when nothing writes the datadir while it is made,
so the backend refuses while MySQL runs, and checks again once the copy is done.  The copy
is made under a hidden name (``.<name>.partial``), synced, and renamed when complete: a
failed or interrupted copy never looks like a snapshot.  Removal renames to a hidden name first for
the same reason.

Restore copies the snapshot next to the datadir (hidden name, while MySQL still runs, so
the downtime is two renames), stops MySQL, renames the datadir to
``<datadir>.replaced-<UTC time>`` (kept, listed by ``/api/lvs``, until the operator deletes
it), renames the copy to the datadir and starts MySQL.  The renames are journaled
(:mod:`orchagent.swap`): a restore killed half-way is rolled forward or back at the next
agent start, and its copy removed.  A datadir that is itself a mount
point cannot be renamed and is refused.
"""

from __future__ import annotations

import os

from twisted.internet import threads
from twisted.logger import Logger
from zope.interface import implementer

from orchagent.durable import Writes
from orchagent.errors import Refused
from orchagent.interfaces import ISnapshotBackend
from orchagent.snapshots import mountinfo, naming
from orchagent.snapshots.directory import DirectorySnapshots

log = Logger()

RUNNING_REFUSAL = ("MySQL is running: a copy of a running datadir is not consistent; stop "
                   "MySQL first, or use the lvm or btrfs snapshot backend")


@implementer(ISnapshotBackend)
class CopyBackend(DirectorySnapshots):
    """Snapshots as reflinked (or plain) copies of a stopped datadir."""

    name = "copy"

    def is_snapshot_dir(self, path: str) -> bool:
        return True

    def group_name(self, path: str) -> str:
        configured = self.config.snapshot_directory
        return mountinfo.normalize(configured) if configured else ""

    async def creation_times(self, paths: list[str]) -> list[float | None]:
        """The time in the name we gave it; else the last change of the directory (the
        rename that completed it)."""
        times: list[float | None] = []
        for path in paths:
            when = naming.parse_timestamp(os.path.basename(path))
            if when is None:
                try:
                    when = os.stat(path).st_ctime
                except OSError:
                    when = None
            times.append(when)
        return times

    async def copy_tree(self, source: str, target: str) -> None:
        """Copy ``source`` to the new directory ``target``, on disk before this returns
        (``cp`` syncs nothing; a write error reported for the file system since the copy
        began fails it: :class:`orchagent.durable.Writes`); on failure remove what was
        copied.  No time limit: a large datadir takes as long as it takes."""
        writes = await threads.deferToThread(Writes, os.path.dirname(target), f"the copy {target}")
        try:
            await self.runner.run(["cp", "-a", "--reflink=auto", "-T", "--", source, target],
                                  privileged=True, timeout=0)
            await threads.deferToThread(writes.sync)
        except Exception:
            await self.remove_tree(target)
            raise
        finally:
            writes.close()

    async def remove_tree(self, path: str) -> None:
        if os.path.lexists(path):
            await self.runner.run(["rm", "-rf", "--one-file-system", "--", path],
                                  privileged=True, timeout=0)

    async def create_snapshot(self) -> bool:
        if await self.service.is_running():
            raise Refused(RUNNING_REFUSAL)
        datadir = await self.datadir()
        name = naming.snapshot_name(self.config.snapshot_volumes_filter, self.now())
        base = self.snapshot_dir
        target = os.path.join(base, name)
        partial = os.path.join(base, f".{name}.partial")
        if os.path.lexists(target) or os.path.lexists(partial):
            raise Refused(f"{target} already exists; try again in a second")
        log.info("copy: copying {datadir} to {target}", datadir=datadir, target=target)
        await self.copy_tree(datadir, partial)
        if await self.service.is_running():
            await self.remove_tree(partial)
            raise Refused("MySQL was started while the datadir was being copied; the copy "
                          "was discarded. " + RUNNING_REFUSAL)
        await self.move(partial, target)
        return True

    async def delete_snapshot(self, path: str) -> None:
        parent, name = os.path.split(path)
        doomed = os.path.join(parent, f".{name}.removing")
        await self.move(path, doomed)
        await self.remove_tree(doomed)

    async def restore(self, name: str) -> bool:
        snapshot = await self.find_snapshot(name)
        self.require_mysql_data(snapshot)
        datadir = await self.datadir()

        async def copy_in(incoming: str) -> None:
            await self.copy_tree(snapshot.path, incoming)

        await self.swap_in(snapshot, datadir, "copy {snapshot} to {work}", copy_in)
        return True
