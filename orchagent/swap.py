"""Swapping directory trees by a sequence of renames, with a durable intent record.

A restore (and a seed's promotion) replaces a datadir by renames: the datadir to a name
that keeps it (``<datadir>.replaced-<time>``), a complete new tree (made under a hidden
work name) to the datadir.  Each rename is atomic, but the sequence is not: an agent
killed between two renames leaves no datadir at all.  A :class:`Swap` therefore writes
its record, ``<directory>/<key>.json``, before every change it makes (written to a
temporary file, fsynced, renamed over the record, the directory fsynced): which renames,
which work trees, how many renames were begun, and the direction (``forward`` while the
swap is being made, ``back`` once it is being undone).  The renames themselves run
``mv -T`` (through the runner, so ``ExecWithSudo`` holds) and are never made onto a name
that exists.

Recovery (:meth:`SwapJournal.recover`, at agent start and before each new swap) settles
every record left by a process that died:

* it finds how many renames were made by comparing which of the swap's paths exist with
  the pattern after 0, 1, … n renames (the patterns are checked to differ when the
  record is made), never more than were begun;
* **forward** when the record says forward and at least one rename was made (the new
  tree is complete before the first rename begins, so it is the new tree that was
  being put in place): the remaining renames are made;
* **back** otherwise: the renames made are reversed, newest first;
* a record write that a crash cut short (``<key>.json.tmp``, never renamed into force) is
  removed;
* then the work trees still there are removed (never a rename's target, so never data
  that was set aside), the parents of the renamed paths are fsynced and the record is
  deleted.

So after recovery every path of the swap holds exactly its old tree or exactly its new
one.  Before it renames anything, recovery asks ``may_move`` (e.g. "is MySQL stopped?");
a record it cannot settle (a refusal, a pattern that matches no step because someone
moved the trees by hand, a failed command) is kept and reported, and new swaps in that
directory are refused until it is settled: an operator finishes it by hand and deletes
the record.

The record names paths, not inodes (a device number can change across a reboot).  All
file work runs in threads (``thread``) or child processes; the reactor never blocks.
"""

from __future__ import annotations

import json
import os
from typing import Any, Awaitable, Callable, Iterable, Sequence

import attrs
from twisted.internet import threads
from twisted.logger import Logger

from orchagent.errors import AgentError, Refused, reason_of

log = Logger()

FORWARD = "forward"
BACK = "back"
#: Kinds of work tree, by how they are removed.
TREE = "tree"
SUBVOLUME = "subvolume"
BTRFS_SUBVOLUME_ROOT_INODE = 256


class SwapStuck(AgentError):
    """A swap's record cannot be settled; the message names the record and why."""


@attrs.frozen
class Work:
    """A tree the swap makes and removes once settled (``kind`` TREE or SUBVOLUME)."""

    path: str
    kind: str = TREE


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # not ours to read (a datadir's parent under ExecWithSudo): best effort
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: str, data: bytes | Iterable[bytes], durable: bool = True) -> None:
    """Replace ``path`` whole with ``data`` (bytes, or its pieces as they are made)
    through a temporary file and a rename (a short write is continued).  ``durable``:
    the temporary file is fsynced before the rename and the directory after it.  A failure before the rename removes the temporary file (the
    file in place, if any, is unchanged) and names it; a failure of the last fsync leaves
    the new file in place, not known durable."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            for piece in (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data:
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.filename is None:
            raise OSError(e.errno, e.strerror, tmp) from e  # name the file written
        raise
    if durable:
        _fsync_dir(os.path.dirname(path))


def write_durably(path: str, data: bytes) -> None:
    """:func:`replace_file`, durable: a record that must survive a crash."""
    replace_file(path, data, durable=True)


def remove_durably(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    _fsync_dir(os.path.dirname(path))


def _patterns(renames: Sequence[tuple[str, str]]) -> list[frozenset[str]]:
    """Which paths exist after 0, 1, … n renames; ValueError when a rename's source
    would not exist or its target would."""
    present: set[str] = set()
    seen: set[str] = set()
    for source, target in renames:
        if source not in seen:
            present.add(source)
            seen.add(source)
        seen.add(target)
    patterns = [frozenset(present)]
    for number, (source, target) in enumerate(renames, 1):
        if source not in present or target in present or source == target:
            raise ValueError(f"rename {number} ({source} -> {target}) cannot follow the ones before")
        present.discard(source)
        present.add(target)
        patterns.append(frozenset(present))
    if len(set(patterns)) != len(patterns):
        raise ValueError("two steps of the swap leave the same paths in place")
    return patterns


class Swap:
    """One swap and its record; see the module docstring.

    In-process use, in this order: :meth:`open` before any work tree is made;
    :meth:`rename` (1…n) once the new tree is complete; :meth:`close` when done.  On
    failure: :meth:`unrename` for renames to undo one at a time, or :meth:`roll_back`
    to undo everything (renames, work trees, record).
    """

    def __init__(self, journal: "SwapJournal", key: str, what: str,
                 renames: Sequence[tuple[str, str]], work: Iterable[Work] = (),
                 notes: dict[str, Any] | None = None, direction: str = FORWARD, begun: int = 0):
        self.journal = journal
        self.key = key
        self.what = what
        self.renames = [(str(s), str(t)) for s, t in renames]
        self.work = list(work)
        self.notes = dict(notes or {})
        self.direction = direction
        self.begun = begun
        #: Whether the record was written (or read): only then is there anything to undo.
        self.opened = False
        self.patterns = _patterns(self.renames)
        targets = {t for _, t in self.renames}
        if any(w.path in targets for w in self.work):
            raise ValueError("a work tree cannot be a rename's target")

    @property
    def path(self) -> str:
        return self.journal.record_path(self.key)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "what": self.what, "direction": self.direction,
                "begun": self.begun, "renames": [list(r) for r in self.renames],
                "work": [attrs.asdict(w) for w in self.work], "notes": self.notes}

    @classmethod
    def from_json(cls, journal: "SwapJournal", record: dict[str, Any]) -> "Swap":
        return cls(journal, record["key"], record["what"],
                   [tuple(r) for r in record["renames"]],
                   [Work(**w) for w in record["work"]], record.get("notes"),
                   record["direction"], int(record["begun"]))._opened()

    def _opened(self) -> "Swap":
        self.opened = True
        return self

    async def _save(self) -> None:
        data = json.dumps(self.to_json(), indent=1).encode()
        await self.journal.thread(self.journal.write, self.path, data)

    async def _forget(self) -> None:
        """Remove the record, settled.  A removal not known durable (its directory's
        fsync failed) fails nothing: a record that comes back after a crash describes a
        swap already made or undone, which the next recovery finds so and removes."""
        try:
            await self.journal.thread(remove_durably, self.path)
        except OSError as e:
            log.warn("{what}: settled, but the removal of its record {path} is not known "
                     "durable ({error}); if it comes back, the next start settles it again",
                     what=self.what, path=self.path, error=e.strerror or e)

    # --- in-process ----------------------------------------------------------------------

    async def open(self) -> None:
        """Write the record (nothing begun), refusing while another record is unsettled."""
        await self.journal.thread(os.makedirs, self.journal.directory, 0o700, True)
        others = [p for p in await self.journal.thread(self.journal.pending) if p != self.path]
        if others:
            raise Refused(f"{self.what}: an earlier swap is not settled (record {others[0]}); "
                          "nothing was changed")
        try:
            await self._save()
        except BaseException:
            # Nothing is begun: a record that reached its place says so, and goes.
            try:
                await self.journal.thread(remove_durably, self.path)
            except OSError:
                pass  # a start settles it: rolled back, nothing to undo
            raise
        self.opened = True

    async def made(self) -> int:
        """How many renames are made, from the paths that exist; SwapStuck when the paths
        match no step up to those begun."""
        paths = {p for r in self.renames for p in r}
        present = await self.journal.thread(
            lambda: frozenset(p for p in paths if os.path.lexists(p)))
        for number in range(min(self.begun, len(self.renames)), -1, -1):
            if self.patterns[number] == present:
                return number
        raise SwapStuck(f"{self.what}: the paths of the swap match none of its steps "
                        f"(present: {', '.join(sorted(present)) or 'none'}); record {self.path} kept")

    async def rename(self, number: int) -> None:
        """Record rename ``number`` (from 1) as begun, then make it."""
        source, target = self.renames[number - 1]
        self.begun = max(self.begun, number)
        self.direction = FORWARD
        await self._save()
        await self.journal.move(source, target)

    async def unrename(self, number: int) -> None:
        """Record the direction back, then reverse rename ``number`` if it is made (the
        later ones must be reversed already)."""
        if self.direction != BACK:
            self.direction = BACK
            await self._save()
        made = await self.made()
        if made > number:
            raise SwapStuck(f"{self.what}: rename {number + 1} is still made; "
                            f"record {self.path} kept")
        if made == number and number > 0:
            source, target = self.renames[number - 1]
            await self.journal.move(target, source)

    async def roll_back(self) -> None:
        """Reverse every rename made, newest first; remove the work trees and the record.
        Nothing to do before :meth:`open`."""
        if not self.opened:
            return
        if self.direction != BACK:
            self.direction = BACK
            await self._save()
        if self.begun:
            for number in range(await self.made(), 0, -1):
                await self.unrename(number)
        await self._finish()

    async def close(self) -> None:
        """The swap is complete: remove the work trees left and the record."""
        await self._finish()

    async def _finish(self) -> None:
        for work in self.work:
            await self.journal.remove(work)
        parents = {os.path.dirname(p) for r in self.renames for p in r}
        for parent in sorted(parents):
            try:
                await self.journal.thread(_fsync_dir, parent)
            except OSError as e:
                # The renames are made but not known durable: the record stays, and the
                # next start (or swap) settles it again, fsync included.
                raise SwapStuck(f"{self.what}: the fsync of {parent} failed ({e.strerror or e}); "
                                f"the trees are in place but not known durable; record {self.path} "
                                "kept, the next start settles it") from e
        await self._forget()

    # --- recovery ------------------------------------------------------------------------

    async def settle(self, may_move: Callable[[], Awaitable[str | None]]) -> str:
        """Roll forward or back (see the module docstring); what was done."""
        made = await self.made() if self.begun else 0
        total = len(self.renames)
        if self.direction == FORWARD and made >= 1:
            if made < total:
                await self._may(may_move)
                for number in range(made + 1, total + 1):
                    await self.rename(number)
            await self._finish()
            return f"rolled forward: the new tree is in place (renames {made}/{total} had been made)"
        if made:
            await self._may(may_move)
        await self.roll_back()
        return f"rolled back: the old tree is in place (renames {made}/{total} had been made)"

    async def _may(self, may_move: Callable[[], Awaitable[str | None]]) -> None:
        refusal = await may_move()
        if refusal:
            raise SwapStuck(f"{self.what}: not settled: {refusal}; record {self.path} kept")


class SwapJournal:
    """The swap records of one directory (e.g. ``StateDir/restores``), and the means to
    make and undo their steps.  ``runner`` runs ``mv``, ``rm`` and ``btrfs``."""

    def __init__(self, directory: str, runner: Any, thread=threads.deferToThread,
                 write: Callable[[str, bytes], None] = write_durably):
        self.directory = directory
        self.runner = runner
        self.thread = thread
        #: Writes a record durably (blocking; in a thread).  Tests wrap it to stop at a step.
        self.write = write

    def record_path(self, key: str) -> str:
        return os.path.join(self.directory, f"{key}.json")

    def swap(self, key: str, what: str, renames: Sequence[tuple[str, str]],
             work: Iterable[Work] = (), notes: dict[str, Any] | None = None) -> Swap:
        """A new swap (nothing written yet: call :meth:`Swap.open`)."""
        return Swap(self, key, what, renames, work, notes)

    def pending(self) -> list[str]:
        """The record files present, oldest name first (blocking, cheap)."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(os.path.join(self.directory, n) for n in names if n.endswith(".json"))

    def _remove_unfinished_writes(self) -> None:
        """Remove ``<key>.json.tmp`` files: a record write that a crash interrupted before
        its rename.  Such a file never took effect (the record in force, if any, is the
        ``.json``; none means the swap had changed nothing yet), so it is only litter."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        for name in names:
            if name.endswith(".json.tmp"):
                try:
                    os.unlink(os.path.join(self.directory, name))
                except FileNotFoundError:
                    pass
                log.warn("{path}: a record write interrupted by a crash; removed",
                         path=os.path.join(self.directory, name))

    def _load(self, path: str) -> Swap:
        with open(path, encoding="utf-8") as fh:
            return Swap.from_json(self, json.load(fh))

    async def recover(self, may_move: Callable[[], Awaitable[str | None]]) -> list[str]:
        """Settle every record; what was done, one line each.  Raises SwapStuck (naming
        each record kept) when any could not be settled; the others are settled."""
        done: list[str] = []
        stuck: list[str] = []
        # A listdir of a small directory, an unlink at most: not worth a thread (and a
        # restore with nothing to settle then never leaves the reactor before it starts).
        self._remove_unfinished_writes()
        for path in self.pending():
            try:
                swap = await self.thread(self._load, path)
            except (OSError, ValueError, KeyError, TypeError) as e:
                stuck.append(f"record {path} cannot be read ({type(e).__name__}: {e}); kept")
                continue
            try:
                outcome = await swap.settle(may_move)
            except Exception as e:
                reason = reason_of(e)
                log.critical("{what}: recovery after a crash failed: {reason}",
                             what=swap.what, reason=reason)
                stuck.append(reason)
                continue
            log.warn("{what}: was interrupted by a crash; {outcome}", what=swap.what,
                     outcome=outcome)
            done.append(f"{swap.what}: {outcome}")
        if stuck:
            raise SwapStuck("; ".join(stuck))
        return done

    async def move(self, source: str, target: str) -> None:
        """rename(2) through ``mv -T``, never onto something that exists."""
        if await self.thread(os.path.lexists, target):
            raise Refused(f"cannot move {source} to {target}: {target} exists")
        if not await self.thread(os.path.lexists, source):
            raise Refused(f"cannot move {source} to {target}: {source} does not exist")
        await self.runner.run(["mv", "-T", "--", source, target], privileged=True)

    async def remove(self, work: Work) -> None:
        """Remove a work tree if it is there (a subvolume with ``btrfs subvolume
        delete``)."""
        try:
            st = await self.thread(os.lstat, work.path)
        except FileNotFoundError:
            return
        if work.kind == SUBVOLUME and st.st_ino == BTRFS_SUBVOLUME_ROOT_INODE:
            await self.runner.run(["btrfs", "subvolume", "delete", work.path], privileged=True)
        else:
            await self.runner.run(["rm", "-rf", "--one-file-system", "--", work.path],
                                  privileged=True, timeout=0)
