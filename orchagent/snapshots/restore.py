"""Running a restore as a list of steps that can be put back.

A local restore (stop MySQL, set the current datadir aside, put the snapshot's data in
its place, start MySQL) changes the host in several steps, any of which can fail.  Each
backend describes its restore as :class:`Step` objects; :func:`run_steps` logs every step,
and when one fails it undoes the steps already made, newest first, and reports which step
failed.  An undo must be idempotent: it is called for the failed step too, because a
failed command may have done part of its work.

The renames that swap the datadir are made through a :class:`~orchagent.swap.Swap`
whose record is in ``StateDir/restores`` (:func:`restore_journal`): a restore killed
half-way is rolled forward or back when the agent starts again (:class:`RecoveryService`)
and before the next restore, so the datadir is never left missing.

Undo stops at the first undo that fails: later undos assume the earlier ones worked (one
must not start MySQL on a datadir that was not put back), and the message then says so
and where the data is, so an operator can finish by hand.  No step ever deletes the data
that was set aside.
"""

from __future__ import annotations

import os
from typing import Any, Awaitable, Callable, Sequence

import attrs
from twisted.application import service as application_service
from twisted.internet import defer
from twisted.logger import Logger

from orchagent.errors import AgentError
from orchagent.swap import Swap, SwapJournal

log = Logger()


class RestoreFailed(AgentError):
    """A restore step failed; the message says which, and how the undo went."""


async def _nothing() -> None:
    return None


@attrs.frozen
class Step:
    """One change of a restore.  ``undo`` puts back what ``do`` changed, and does
    nothing when ``do`` changed nothing."""

    name: str
    do: Callable[[], Awaitable[object]]
    undo: Callable[[], Awaitable[object]] = _nothing


def _message(error: BaseException) -> str:
    if isinstance(error, AgentError):
        return error.message
    return f"{type(error).__name__}: {error}"


async def run_steps(what: str, steps: list[Step], kept: str = "") -> None:
    """Run ``steps`` in order; on failure undo and raise :class:`RestoreFailed`.

    ``kept`` names where the replaced data is kept, for the messages.
    """
    total = len(steps)
    for number, step in enumerate(steps, 1):
        log.info("{what}: step {number}/{total}: {step}", what=what, number=number,
                 total=total, step=step.name)
        try:
            await step.do()
        except Exception as error:
            reason = _message(error)
            log.error("{what}: step {number}/{total} ({step}) failed: {reason}", what=what,
                      number=number, total=total, step=step.name, reason=reason)
            outcome = await _undo(what, list(reversed(steps[:number])), kept)
            raise RestoreFailed(
                f"{what} failed at step {number}/{total} ({step.name}): {reason}; {outcome}"
            ) from error
    log.info("{what}: done", what=what)


async def _undo(what: str, steps: list[Step], kept: str) -> str:
    for step in steps:
        log.info("{what}: undoing {step}", what=what, step=step.name)
        try:
            await step.undo()
        except Exception as error:
            reason = _message(error)
            log.critical("{what}: undoing {step} failed: {reason}; undo stopped",
                         what=what, step=step.name, reason=reason)
            where = f"; the replaced data is kept at {kept}" if kept else ""
            return (f"ROLLBACK INCOMPLETE: undoing '{step.name}' failed ({reason}); "
                    f"the later undo steps were not run{where}")
    return "rolled back: the previous datadir is back in place"


def mysql_stop_step(service, was_running: bool) -> Step:
    """Stop MySQL if it ran, and make sure it is down; undo starts it again if it ran."""

    async def stop():
        if was_running:
            await service.stop()
        if await service.is_running():
            raise RestoreFailed("MySQL still runs after the stop command")

    async def start_again():
        if was_running and not await service.is_running():
            await service.start()

    return Step("stop MySQL", stop, start_again)


def mysql_start_step(service) -> Step:
    """Start MySQL on the restored data; undo stops it if it came up at all."""

    async def start():
        await service.start()

    async def stop_again():
        if await service.is_running():
            await service.stop()

    return Step("start MySQL", start, stop_again)


def restore_journal(config: Any, runner: Any) -> SwapJournal:
    """The journal of the datadir swaps restores make: ``StateDir/restores``."""
    return SwapJournal(os.path.join(config.state_dir, "restores"), runner)


def rename_steps(swap: Swap, names: Sequence[str]) -> list[Step]:
    """One step per rename of ``swap``, each journaled before it is made and reversed
    by its undo."""
    return [Step(name, lambda n=number: swap.rename(n), lambda n=number: swap.unrename(n))
            for number, name in enumerate(names, 1)]


async def recover_restores(journal: SwapJournal, service: Any) -> list[str]:
    """Settle the swaps of restores that a crash interrupted (see :mod:`orchagent.swap`);
    never renames a datadir while MySQL runs, and never starts or stops MySQL."""

    async def may_move() -> str | None:
        if service is not None and await service.is_running():
            return "MySQL is running; stop it and restart the agent (or retry the restore)"
        return None

    done = await journal.recover(may_move)
    for line in done:
        log.warn("{line}; MySQL was not started: start it when the datadir is as wanted",
                 line=line)
    return done


class RecoveryService(application_service.Service):
    """At agent start, settles restores a crash interrupted (``recover``, an async
    callable); ``stopService`` waits for it."""

    name = "restore-recovery"

    def __init__(self, recover: Callable[[], Awaitable[object]]):
        self.recover = recover
        self.done: defer.Deferred | None = None

    def startService(self):
        super().startService()
        self.done = defer.ensureDeferred(self.recover())
        self.done.addErrback(self._failed)

    @staticmethod
    def _failed(failure) -> None:
        if failure.check(AgentError):
            return None  # each record kept is logged, critical, by the journal
        log.failure("restores interrupted by a crash could not all be settled", failure)
        return None

    def stopService(self):
        super().stopService()
        return self.done
