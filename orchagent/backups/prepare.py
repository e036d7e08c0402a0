"""Turning a backup into MySQL data on a writable copy; the backup itself is never written.

``--prepare`` rewrites the files it works on (it applies the redo log to the data files,
and applying an incremental backup even deletes the increment's ``.delta`` files), so it
only ever runs on copies.  A *work directory* holds ``data/`` (the copy of the full
backup that becomes MySQL data) and ``inc-1/``, ``inc-2/``... (copies of the incremental
backups applied on it, removed once applied).

Where the work directory goes: a reflinked copy costs almost nothing and no space, so
the first directory where ``cp --reflink=always`` works wins (``StateDir``, then beside
the backup under a hidden name); else a full copy under ``StateDir``.  The space needed
is checked before anything is copied.

The steps, each named in the error when it fails (and then the work directory is
removed, so a failure leaves nothing behind): copy, decrypt and decompress (when the
backup is encoded), prepare (and apply each increment), verify, own, sync.

``--prepare`` exits 0 when its Aria recovery could not open a table (it prints a
``***WARNING: ... could not be opened: Error: N`` line and leaves the table unrecovered),
and when a sync of a file it wrote fails after its first (``Can't sync file ... to disk``):
such a line fails the step.

Verify, first the Aria tables: ``--prepare``'s Aria recovery also exits 0, with no
message, when a write of a table fails; ``aria_chk`` tells (:meth:`Tools.aria_damage`).

Then the InnoDB pages: ``--prepare`` only reads the pages its redo log touches, so a page that rotted
on disk after the backup was taken passes it unseen.  Every InnoDB file of the prepared
copy is therefore read by ``innochecksum``, which checks each page's checksum; the
system tablespace's doublewrite buffer (two extents whose pages are scratch copies with
no valid checksum of their own, located through the TRX_SYS page) is left out.  Hot
backups skip this step: mariabackup and xtrabackup check every page's checksum as they
copy it, and fail the backup on a bad one.

Own: the copy gets the owner (and, at its top, the mode) of the MySQL datadir, so that
``mysqld`` can open what is mounted, restored or sent.

Sync: the copy on disk, through a descriptor opened before it was made
(:class:`orchagent.durable.Writes`): no tool syncs all it writes (``cp`` nothing, and
``--prepare`` goes on after a failed ``fdatasync`` of an Aria table), and a restore puts
the copy in the datadir's place.  A write error reported for its file system since the
copy began fails the step: what the checks read came from the page cache.
"""

from __future__ import annotations

import os
import pwd
import re
import struct
from typing import Any

import attrs
from twisted.internet import defer, threads
from twisted.logger import Logger

from orchagent.backups.discovery import CHECKPOINTS_FILES, COMPRESSORS, XTRABACKUP, checkpoints_file
from orchagent.backups.model import Backup
from orchagent.backups.tools import INNOCHECKSUM, Tools
from orchagent.durable import Writes
from orchagent.errors import CommandFailed, NotAvailable, Refused, StepFailed, reason_of
from orchagent.host.diskusage import free_bytes
from orchagent.host.mysql_options import read_options
from orchagent.process import output_tail

log = Logger()

#: Space a reflinked copy is given on top of the redo it applies (pages the redo log
#: rewrites stop sharing their blocks).
REFLINK_MARGIN = 64 << 20
#: innochecksum processes run at once.
VERIFY_PARALLEL = 2
FSP_TRX_SYS_PAGE_NO = 5
DOUBLEWRITE_MAGIC = 536853855


@attrs.frozen
class Place:
    """Where a work directory goes: ``root`` does not exist yet."""

    root: str
    reflink: bool


def _redo_bytes(path: str) -> int:
    total = 0
    for name in os.listdir(path):
        if name.startswith("ib_logfile") or name == "xtrabackup_logfile":
            total += os.lstat(os.path.join(path, name)).st_size
    return total


def innodb_files(data: str) -> list[tuple[str, int, int | None]]:
    """``(path, first page, last page or None)`` ranges to check in a prepared copy:
    every ``.ibd``, the undo tablespaces, and the system tablespace files around the
    doublewrite buffer (blocking)."""
    options = read_options([os.path.join(data, "backup-my.cnf")], ["mysqld"]) \
        if os.path.isfile(os.path.join(data, "backup-my.cnf")) else []
    settings = {o.name.replace("-", "_"): o.value for o in options}
    page_size = int(settings.get("innodb_page_size") or 16384)
    system = [spec.split(":")[0] for spec in
              (settings.get("innodb_data_file_path") or "ibdata1:12M:autoextend").split(";") if spec]
    ranges: list[tuple[str, int, int | None]] = []
    for index, name in enumerate(system):
        path = os.path.join(data, name)
        if not os.path.isfile(path):
            continue
        skip = _doublewrite(path, page_size) if index == 0 else None
        if skip is None:
            ranges.append((path, 0, None))
        else:
            first, last = skip
            pages = os.path.getsize(path) // page_size
            if first > 0:
                ranges.append((path, 0, first - 1))
            if last + 1 < pages:
                ranges.append((path, last + 1, None))
    undo = re.compile(r"^undo\d{3}$")
    for directory, dirs, files in os.walk(data):
        for name in sorted(files):
            if name.endswith(".ibd") or (directory == data and undo.match(name)):
                ranges.append((os.path.join(directory, name), 0, None))
    return ranges


def _doublewrite(path: str, page_size: int) -> tuple[int, int] | None:
    """First and last page of the doublewrite buffer, from the TRX_SYS page."""
    with open(path, "rb") as fh:
        fh.seek(FSP_TRX_SYS_PAGE_NO * page_size)
        page = fh.read(page_size)
    if len(page) < page_size:
        return None
    at = page_size - 200 + 10
    magic, block1, block2 = struct.unpack(">III", page[at:at + 12])
    if magic != DOUBLEWRITE_MAGIC or not 0 < block1 < block2:
        return None
    extent = block2 - block1
    return block1, block2 + extent - 1


class Preparer:
    """Makes prepared copies of backups; see the module docstring."""

    def __init__(self, config: Any, runner: Any, tools: Tools, host: Any, thread=threads.deferToThread):
        self.config = config
        self.runner = runner
        self.tools = tools
        self.host = host
        self.thread = thread
        #: How the copies, tools and checks of a work copy run: as root, as long as they
        #: need, unless they hang (ToolStallSeconds; see orchagent.process._StallWatch).
        self.unbounded = {"privileged": True, "timeout": 0, "stall": config.tool_stall_seconds}

    # --- where -----------------------------------------------------------------------------

    async def reflinks(self, sample: str, directory: str) -> bool:
        """Whether ``cp --reflink=always`` from ``sample``'s file system into ``directory``
        works (tried with one small file, removed again)."""
        probe = os.path.join(directory, ".orchagent-reflink-probe")
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError:
            return False
        result = await self.runner.run(["cp", "--reflink=always", "--", sample, probe],
                                       check=False, privileged=True)
        if os.path.lexists(probe):
            await self.runner.run(["rm", "-f", "--", probe], check=False, privileged=True)
        return result.ok

    async def choose(self, chain: list[Backup], candidates: list[tuple[str, bool]],
                     what: str) -> Place:
        """The first candidate ``(work directory, reflink only)`` whose parent takes a
        reflinked copy, else the first that takes a full copy; with enough space there,
        else Refused."""
        first = chain[0]
        sample = os.path.join(first.path, checkpoints_file(first.path) or CHECKPOINTS_FILES[0])
        total = sum(b.size_bytes for b in chain)
        redo = sum([await self.thread(_redo_bytes, b.path) for b in chain])
        chosen: Place | None = None
        for root, _reflink_only in candidates:
            if await self.reflinks(sample, os.path.dirname(root)):
                chosen = Place(root, True)
                break
        if chosen is None:
            plain = [root for root, reflink_only in candidates if not reflink_only]
            if not plain:
                raise NotAvailable(f"backup {chain[-1].name}: no place for {what}")
            chosen = Place(plain[0], False)
        need = min(total, REFLINK_MARGIN + redo) if chosen.reflink else total + redo + REFLINK_MARGIN
        parent = os.path.dirname(chosen.root)
        os.makedirs(parent, mode=0o700, exist_ok=True)
        free = free_bytes(parent)
        if free < need:
            kind = "reflinked" if chosen.reflink else "full"
            raise Refused(f"backup {chain[-1].name}: not enough space for {what} in {parent}: "
                          f"a {kind} copy needs about {need} bytes and {free} are free; "
                          "nothing was changed")
        if os.path.lexists(chosen.root):
            await self.remove(chosen.root)
        return chosen

    # --- the steps -------------------------------------------------------------------------

    async def make(self, chain: list[Backup], place: Place, owner_of: str | None) -> str:
        """A prepared, verified, owned copy of ``chain`` (a full backup, then the
        increments to apply) in ``place``; returns its data directory."""
        backup = chain[-1]
        data = os.path.join(place.root, "data")
        # Opened before the copy is made: the sync step reports any write of it that
        # failed, whichever tool wrote it and whether or not it looked (orchagent.durable).
        writes = await self.thread(Writes, os.path.dirname(place.root), f"the copy {place.root}")
        steps = [("copy", self._copy, (chain, place.root)),
                 ("decode", self._decode, (chain, place.root)),
                 ("prepare", self.prepare, (chain[0].tool, data, self._targets(chain, place.root)[1:])),
                 ("verify", self.verify, (data,)),
                 ("own", self.own, (data, owner_of)),
                 ("sync", self.thread, (writes.sync,))]
        try:
            await self.thread(os.makedirs, place.root, 0o700)
            for step, function, args in steps:
                log.info("backup {backup}: {step} in {root}", backup=backup.name, step=step,
                         root=place.root)
                try:
                    await function(*args)
                except Exception as e:
                    reason = reason_of(e)
                    copy = await self._discard(place.root)
                    raise StepFailed(f"backup {backup.name}: step {step} failed: {reason}; "
                                     f"the backup is unchanged and {copy}") from e
        except StepFailed:
            raise
        except BaseException:
            await self.remove(place.root)
            raise
        finally:
            writes.close()
        return data

    async def _discard(self, root: str) -> str:
        """Remove a failed step's work copy; what became of it, said in the step's error.
        A removal that fails too (the error that failed the step often fails ``rm`` as
        well) does not hide the step's reason.  The copy is recorded before it is made:
        mountlv's record, which the next umount or mountlv reads; a restore's journal,
        whose roll-back tries again and, failing, stays for the next start to settle."""
        try:
            await self.remove(root)
        except Exception as e:
            return (f"its work copy {root} could not be removed ({reason_of(e)}); it is "
                    "recorded and removed by the agent's next attempt")
        return "its work copy was removed"

    @staticmethod
    def _targets(chain: list[Backup], root: str) -> list[str]:
        """Where each backup of ``chain`` is copied: ``data``, then ``inc-1``, ``inc-2``..."""
        return [os.path.join(root, "data")] + [os.path.join(root, f"inc-{i}") for i in range(1, len(chain))]

    async def _copy(self, chain: list[Backup], root: str) -> None:
        for backup, target in zip(chain, self._targets(chain, root)):
            await self.runner.run(["cp", "-a", "--reflink=auto", "-T", "--", backup.path, target],
                                  **self.unbounded)

    async def _decode(self, chain: list[Backup], root: str) -> None:
        """Decrypt, then decompress, each copy that needs it (the tool's own options)."""
        for backup, target in zip(chain, self._targets(chain, root)):
            if backup.encrypted:
                algorithm, where = self.tools.decryption(backup.tool)
                if not algorithm:
                    raise NotAvailable(f"decryption is not configured: {where}")
                await self._tool(backup.tool, [*self.tools.defaults_args(), f"--decrypt={algorithm}",
                                               "--remove-original", f"--target-dir={target}"], "--decrypt")
            if backup.compressed:
                if backup.compressed not in COMPRESSORS.values() or not self.tools.installed(backup.compressed):
                    raise NotAvailable(f"{backup.compressed} is not installed")
                await self._tool(backup.tool, [*self.tools.defaults_args(), "--decompress",
                                               "--remove-original", f"--target-dir={target}"], "--decompress")

    async def _tool(self, tool: str, args: list[str], what: str) -> None:
        if not self.tools.installed(tool):
            raise NotAvailable(f"{tool} is not installed")
        result = await self.runner.run([tool, *args], check=False, **self.unbounded)
        if not result.ok:
            raise CommandFailed(result.tool_failure(f"{tool} {what}"), result)
        if "--prepare" in args:
            ignored = Tools.ignored_failure(result.stdout + result.stderr)
            if ignored:
                raise CommandFailed(f"{tool} {what} exited 0, but {ignored}", result)

    async def prepare(self, tool: str, data: str, increments: list[str]) -> None:
        """``--prepare`` of ``data``, then each increment applied on it.  xtrabackup needs
        ``--apply-log-only`` on every prepare but the last when increments follow."""
        defaults = await self.thread(self.tools.prepare_defaults, data)
        only = ["--apply-log-only"] if tool == XTRABACKUP and increments else []
        await self._tool(tool, [*defaults, "--prepare", *only, f"--target-dir={data}"], "--prepare")
        for number, increment in enumerate(increments, 1):
            only = ["--apply-log-only"] if tool == XTRABACKUP and number < len(increments) else []
            await self._tool(tool, [*defaults, "--prepare", *only, f"--target-dir={data}",
                                    f"--incremental-dir={increment}"],
                             f"--prepare --incremental-dir ({os.path.basename(increment)})")
            await self.remove(increment)
        problem = await self.thread(Tools.unprepared, data, tool)
        if problem:
            raise Refused(f"{tool} --prepare exited 0, but {problem}: a write of it failed")

    async def verify(self, data: str) -> None:
        """Every Aria table of the copy as a correct prepare leaves it
        (:meth:`Tools.aria_damage`), then every page checksum of every InnoDB file (see
        the module docstring)."""
        damage = await self.tools.aria_damage(data)
        if damage:
            raise Refused(f"the prepare left an Aria table damaged ({damage}); its Aria "
                          "recovery exits 0 when a write of a table fails: an I/O error on "
                          "the copy's file system?")
        if not self.tools.installed(INNOCHECKSUM):
            raise NotAvailable(f"{INNOCHECKSUM} is not installed (it checks the pages of the copy)")
        ranges = await self.thread(innodb_files, data)
        limit = defer.DeferredSemaphore(VERIFY_PARALLEL)
        bad: list[str] = []

        async def check(path: str, first: int, last: int | None) -> None:
            argv = [INNOCHECKSUM]
            if first:
                argv += ["-s", str(first)]
            if last is not None:
                argv += ["-e", str(last)]
            result = await self.runner.run([*argv, path], check=False, **self.unbounded)
            if not result.ok:
                relative = os.path.relpath(path, data)
                bad.append(f"{relative} ({output_tail(result.stdout + result.stderr, 2) or 'failed'})")

        await defer.gatherResults([
            limit.run(lambda r=r: defer.ensureDeferred(check(*r))) for r in ranges],
            consumeErrors=True)
        if bad:
            raise Refused(f"the backup is corrupt: page checksum mismatch in {len(bad)} file(s): "
                          + "; ".join(sorted(bad)[:3]))

    async def own(self, data: str, owner_of: str | None) -> None:
        """Give ``data`` the owner of ``owner_of`` (the datadir), else of the mysql user."""
        if os.geteuid() != 0 and not self.config.exec_with_sudo:
            return
        if owner_of and os.path.exists(owner_of):
            await self.runner.run(["chown", "-R", f"--reference={owner_of}", "--", data], **self.unbounded)
            await self.runner.run(["chmod", f"--reference={owner_of}", "--", data], privileged=True)
            return
        try:
            pwd.getpwnam("mysql")
        except KeyError:
            return
        await self.runner.run(["chown", "-R", "mysql:mysql", "--", data], **self.unbounded)

    async def remove(self, path: str) -> None:
        if os.path.lexists(path):
            await self.runner.run(["rm", "-rf", "--one-file-system", "--", path], **self.unbounded)
