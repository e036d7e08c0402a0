"""A session: one attempt of a sender at a seed, as either side holds it.

A tree seed's sender connects a control stream, then data streams; any stream failing
ends the attempt and the next one resumes from the chunks verified (orchagent.seed.sender,
orchagent.seed.tree_receive).  Everything the attempt started must end with it: its
streams, their flow state, and the work still waiting for a worker thread or a
connection, whose result belongs to an attempt that no longer exists.  A session ends as
a whole: :meth:`end` closes its streams, and work that awaits through :meth:`wait` stops
at its next step instead of comparing attempt ids after every ``await``.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer


class Ended(Exception):
    """The session this work belongs to ended while it waited (not an error)."""


class Session:
    def __init__(self, session_id: str):
        self.id = session_id
        #: The control stream, then the data streams (orchagent.interfaces.ISeedStream).
        self.control: Any = None
        self.streams: list = []
        #: Each stream's flow state, kept by the job (bytes queued, reads ahead...).
        self.flows: dict = {}
        self.ended = False

    def add(self, stream, flow: Any = None) -> None:
        if self.control is None:
            self.control = stream
        self.streams.append(stream)
        self.flows[stream] = flow

    def discard(self, stream) -> bool:
        """Forget ``stream`` (it was lost); True if it was one of ours."""
        if stream not in self.flows:
            return False
        self.streams.remove(stream)
        del self.flows[stream]
        return True

    def end(self, abort: bool = False, close: bool = True) -> None:
        """End the attempt: its waiting work stops at its next step, and its streams
        close (unless ``close`` is false: the caller had them say a last word)."""
        self.ended = True
        streams, self.streams, self.flows = self.streams, [], {}
        for stream in streams if close else ():
            stream.close(abort=abort)

    def check(self) -> None:
        """Raise :class:`Ended` if the session ended."""
        if self.ended:
            raise Ended()

    async def wait(self, d: defer.Deferred):
        """``await d`` for this session: its result, or :class:`Ended` if the session
        ended meanwhile."""
        result = await d
        self.check()
        return result

    def run(self, work, errback: Callable) -> defer.Deferred:
        """Run ``work`` (a coroutine) for this session: an :class:`Ended` stops it quietly,
        any other failure goes to ``errback``."""
        d = defer.ensureDeferred(work)
        d.addErrback(lambda failure: failure.trap(Ended) and None)
        return d.addErrback(errback)
