"""What a seed job needs of the agent around it, handed to every job as one object.

The seed manager builds the jobs (receive, send, streamed, command, hot) and owns their
registry, the listener and the persisted records.  Handing jobs this context instead of
the manager keeps them from reaching into the manager (and the seed modules from
importing it), and says in one place what a job may use.

``pool`` is set while the seed service runs (the manager starts and stops it).  What a
job may use of a connection is orchagent.interfaces.ISeedStream.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from orchagent.seed.state import SeedRecord, StateStore


@attrs.define(eq=False)
class SeedContext:
    #: The reactor (connections, processes) and the clock (every time and timer); a test
    #: passes a Clock as the latter.
    reactor: Any
    clock: Any
    #: orchagent.config.Config.
    config: Any
    store: StateStore
    #: orchagent.process.ICommandRunner, or None where no command may run.
    runner: Any
    #: The MySQL service (``is_running``), or None where MySQL is not watched.
    mysql: Any
    #: Whether seed TLS is configured (SeedTLS*).
    tls: bool
    chunk_size: int
    #: ``touch(record, force=False)``: the record changed (watchers told; saved at most
    #: every few seconds unless ``force``).  ``save(record) -> bool``: write it now.
    touch: Callable[..., None]
    save: Callable[[SeedRecord], bool]
    #: ``job_ended(job)``: the job is over (the manager forgets it, closes an idle
    #: listener).
    job_ended: Callable[[Any], None]
    #: ``forget_completed(seed_id)``: the sender of a completed receive read its result.
    forget_completed: Callable[[str], None]
    #: orchagent.backups.hot.HotSeeds (its backup tools), where hot seeds are configured.
    hot: Any = None
    pool: Any = None

    def thread(self, fn, *args, **kwargs) -> defer.Deferred:
        """``fn(*args, **kwargs)`` on a worker thread of the seed pool."""
        return deferToThreadPool(self.reactor, self.pool, fn, *args, **kwargs)
