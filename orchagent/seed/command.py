"""The original agent's command mode: ReceiveSeedDataCommand / SendSeedDataCommand.

When the operator configured those commands, a seed runs them exactly as the Go agent
did (receiver: ``<datadir> <port>``; sender: ``<source dir> <target host> <port>``, as
"$@", never interpolated) and the seed is tracked by id like an engine seed: completed
when the command exits, succeeded when it exited 0, aborted by stopping its process
group.  There is nothing to verify or resume in this mode; the status reports no bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.logger import Logger

from orchagent.seed import state

if TYPE_CHECKING:
    from orchagent.seed.context import SeedContext

log = Logger()


class CommandJob(state.JobIdentity):
    def __init__(self, context: "SeedContext", record: state.SeedRecord, command: str, args: list[str]):
        super().__init__(context, record)
        self.command = command
        self.args = args
        self.running: defer.Deferred | None = None

    def start(self) -> None:
        self.record.state = state.RUNNING
        self.context.touch(self.record, force=True)
        log.info("seed {seed}: running the configured {role} command", seed=self.seed_id,
                 role=self.record.role)
        # timeout=0: a seed takes as long as it takes; abort stops it.
        self.running = defer.maybeDeferred(
            self.context.runner.shell, self.command, args=self.args, timeout=0, check=False)
        self.running.addCallbacks(self._ended, self._crashed)

    def _ended(self, result) -> None:
        if self.active and result.ok:
            self.record.state = state.COMPLETED
            log.info("seed {seed}: the {role} command succeeded", seed=self.seed_id, role=self.record.role)
            self._settle()
        elif self.active:
            log.error("seed {seed}: {error}", seed=self.seed_id, error=result.describe_failure())
            self.fail(result.describe_failure())

    def _crashed(self, failure) -> None:
        if not failure.check(defer.CancelledError):
            self.fail(f"the {self.record.role} command could not run: {failure.getErrorMessage()}")

    def _settle(self) -> None:
        self.context.touch(self.record, force=True)
        super()._settle()

    def fail(self, message: str, final_state: str = state.FAILED) -> defer.Deferred:
        if self.active:
            self.record.state = final_state
            self.record.error = message
            if self.running is not None and not self.running.called:
                self.running.cancel()
            self._settle()
        return defer.succeed(None)

    async def stop(self) -> None:
        self.fail("the agent stopped while the seed command ran")
