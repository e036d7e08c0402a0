"""Promotion: the verified tree moves into the datadir as one journaled step (blocking:
worker threads).

The datadir itself is never replaced (it may be a mount point or a btrfs subvolume; its
inode, owner, mode and labels stay), so promotion is a sequence of renames of top-level
entries: first what the datadir holds goes aside (``Staging.aside``; nothing is ever
deleted), then every staged entry moves in, then the empty staging directory goes.  A
process killed between two of those renames would leave a datadir that is neither the
old tree nor the new one, so before the first rename a :class:`Promotion` record is
written durably to ``StateDir/seeds/<id>.promotion`` (temporary file, fsync, rename,
directory fsync): the datadir, staging and aside directories, the names to move aside,
the names to move in, and the direction.

Written, the record is the commit point.  The new tree was complete, verified and synced
before it was written, so from then on the seed is finished by rolling **forward**, in
the process (an abort arriving then is too late: the seed completes) and at the next
start after a crash.  Only when a rename fails (an I/O error, a full file system's
directory, someone else's file in the way) is the record turned **back** — durably,
before anything is undone — and everything moved is returned where it was.

Both directions are idempotent and decide each name by what exists, so running either
again after a crash at any instant ends in the same place:

* forward: an old name still in the datadir, and not yet in aside, moves to aside (all
  of them, with both directories fsynced, before any new name moves in); then each new
  name still in staging moves in; then staging goes and the datadir's parent is fsynced.
* back: a new name in the datadir, not in staging, whose old namesake (if any) has been
  set aside already, moves back to staging; then each old name in aside and not in the
  datadir moves back; aside goes if it is left empty.

After either, the datadir holds exactly the new tree (plus ``lost+found`` and, when
staging is inside the datadir, the aside directory) or exactly the old one.
"""

from __future__ import annotations

import json
import os

import attrs

from orchagent.durable import fsync_dir
from orchagent.seed.staging import Staging
from orchagent.swap import remove_durably, write_durably

FORWARD = "forward"
BACK = "back"
SUFFIX = "promotion"


class PromotionError(Exception):
    """A rename of the promotion failed; the message names it."""


class Undone(PromotionError):
    """Going forward failed and the promotion was undone: the datadir is the old one."""


@attrs.define
class Promotion:
    """One seed's promotion record; see the module docstring."""

    datadir: str
    staging: str
    aside: str
    old: list[str]
    new: list[str]
    direction: str = FORWARD

    def to_bytes(self) -> bytes:
        return json.dumps(attrs.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Promotion":
        fields = json.loads(data)
        return cls(**{f.name: fields[f.name] for f in attrs.fields(cls)})


def plan(staging: Staging) -> Promotion:
    """What promoting ``staging`` moves: every name in the datadir but staging, aside and an
    unrelated ``lost+found``; every name in staging."""
    new = sorted(os.listdir(staging.root))
    old = [name for name in sorted(os.listdir(staging.datadir))
           if not staging.ours(name) and not (name == "lost+found" and name not in new)]
    return Promotion(staging.datadir, staging.root, staging.aside, old, new)


def write_record(path: str, promotion: Promotion) -> None:
    """The record, durably: on disk before this returns."""
    write_durably(path, promotion.to_bytes())


def read_record(path: str) -> Promotion | None:
    try:
        with open(path, "rb") as fh:
            return Promotion.from_bytes(fh.read())
    except FileNotFoundError:
        return None


def remove_record(path: str) -> None:
    remove_durably(path)


_exists = os.path.lexists


def _moved_in(p: Promotion, old: set, name: str) -> bool:
    """New name ``name`` is in the datadir, and its old namesake (if any) in aside."""
    return _exists(os.path.join(p.datadir, name)) and (
        name not in old or _exists(os.path.join(p.aside, name)))


def _rename(source: str, target: str) -> None:
    if _exists(target):
        raise PromotionError(f"cannot move {source} to {target}: {target} exists")
    try:
        os.rename(source, target)
    except OSError as e:
        raise PromotionError(f"cannot move {source} to {target}: {e.strerror}") from e


def roll_forward(p: Promotion) -> None:
    """Finish the promotion (see the module docstring); PromotionError naming a rename.
    Staging gone before every new name is in the datadir (a record that outlived a seed
    which failed before its promotion began) is a PromotionError too, before anything
    moves: going forward would leave the datadir without the new tree."""
    old = set(p.old)
    if not os.path.isdir(p.staging) and not all(_moved_in(p, old, name) for name in p.new):
        raise PromotionError(f"cannot move {p.staging} into {p.datadir}: the staging directory is gone")
    moved_aside = False
    for name in p.old:
        current, kept = os.path.join(p.datadir, name), os.path.join(p.aside, name)
        if _exists(current) and not _exists(kept):
            os.makedirs(p.aside, mode=0o700, exist_ok=True)
            _rename(current, kept)
            moved_aside = True
    if moved_aside:
        fsync_dir(p.aside)
        fsync_dir(p.datadir)
    for name in p.new:
        staged = os.path.join(p.staging, name)
        if _exists(staged):
            _rename(staged, os.path.join(p.datadir, name))
    fsync_dir(p.datadir)
    if os.path.isdir(p.staging):
        try:
            os.rmdir(p.staging)
        except OSError as e:
            raise PromotionError(f"cannot remove the emptied staging {p.staging}: {e.strerror}") from e
        fsync_dir(os.path.dirname(p.staging))


def roll_back(p: Promotion) -> None:
    """Undo the promotion (see the module docstring); PromotionError naming a rename."""
    old = set(p.old)
    if _exists(p.datadir) and not os.path.isdir(p.staging):
        os.makedirs(p.staging, mode=0o700)
    for name in p.new:
        staged = os.path.join(p.staging, name)
        if _moved_in(p, old, name) and not _exists(staged):
            _rename(os.path.join(p.datadir, name), staged)
    fsync_dir(p.staging)
    for name in p.old:
        kept, current = os.path.join(p.aside, name), os.path.join(p.datadir, name)
        if _exists(kept) and not _exists(current):
            _rename(kept, current)
    fsync_dir(p.datadir)
    if os.path.isdir(p.aside) and not os.listdir(p.aside):
        os.rmdir(p.aside)
        fsync_dir(os.path.dirname(p.aside))


def settle(path: str, promotion: Promotion) -> str:
    """Run ``promotion`` to its end in its direction and return that direction.  Going
    forward, a failed rename turns it back (the record rewritten first) and undoes it:
    :class:`Undone`.  Any other PromotionError or OSError means even going back failed.
    The record stays: the caller removes it once the seed's end is saved, so that a crash
    in between settles it again, to the same end."""
    if promotion.direction == FORWARD:
        try:
            roll_forward(promotion)
        except (PromotionError, OSError) as e:
            promotion.direction = BACK
            write_record(path, promotion)
            roll_back(promotion)
            raise Undone(str(e)) from e
        return FORWARD
    roll_back(promotion)
    return BACK
