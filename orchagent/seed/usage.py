"""What ``/api/mysql-du`` shows while this host receives a seed into its datadir.

orchestrator measures a seed's progress only as growth of the target's mysql-du between
its polls, 30 s apart, and counts every poll whose value equals the one before; the count
is never reset, and past ten it aborts the seed ("10 iterations have passed without
progress").  The Go agent's ``tar | nc`` wrote straight into the datadir, so its mysql-du
grew all the time.  A seed of ours lands in a staging directory first — beside the
datadir, where mysql-du does not see it, or inside it with files preallocated, so that
their apparent size jumps ahead of the data and then stays flat — and only moves in once
verified.  Read as it is, the datadir would look stalled for the whole seed.

So while an engine seed is being received into the datadir, mysql-du is

    kept + progress

* ``kept``: the apparent bytes of what the datadir keeps through the promotion — its own
  directory entry, ``lost+found``, and when staging is inside the datadir everything else
  there (the previous contents are moved aside inside it); never the staging directory.
* ``progress`` (:func:`visible_progress`): the seed's data bytes verified and written,
  plus those that arrived and wait to be written (before the receiver is ready, the
  manifest's bytes as they arrive: the sender walks the source meanwhile, minutes for
  millions of files), then a small step for each final phase (verified, synced, moved
  aside ...), so that the figure grows whenever the seed moves at all.  It stays below
  the tree's total, so after the seed mysql-du, the datadir's real usage again, is larger
  than any figure shown before.

A seed that makes no progress at all shows the same figure at every poll, and orchestrator
aborts it, as it should.  Receives run by ``ReceiveSeedDataCommand`` (the original's
``tar | nc``) write into the datadir themselves and are read as they are.
"""

from __future__ import annotations

from orchagent.errors import NotAvailable

#: Final phases a receive can show a step for (more than any receive has), and the size
#: of one step; the last step is never shown, so the figure stays below the total.
FINAL_STEPS = 10
STEP = 4096


def visible_progress(total: int, moved: int, steps: int, within: float = 0.0) -> int:
    """Bytes of a seed of ``total`` bytes to show, ``moved`` of them arrived, ``steps``
    final phases done and the share ``within`` (0 to 1) of a long one under way (reading
    the staged data back): never more than ``moved`` plus the steps, always less than
    ``total`` (unless it is 0), growing with any of them."""
    step = min(STEP, total // (FINAL_STEPS + 1))
    transfer = max(0, min(moved, total - FINAL_STEPS * step))
    done = min(steps, FINAL_STEPS - 2)
    return transfer + done * step + int(max(0.0, min(within, 1.0)) * step)


async def mysql_disk_usage(host, seeds) -> int:
    """``/api/mysql-du``: the datadir's apparent usage, as the seed shows it while this
    host receives one into it (see the module docstring).  ``seeds`` is the seed surface
    (the manager, or the engine process's proxy)."""
    try:
        shown = await seeds.datadir_usage()
    except NotAvailable:
        shown = None  # the seed engine is restarting: its seed resumes, the disk is real
    return await host.mysql_disk_usage() if shown is None else shown
