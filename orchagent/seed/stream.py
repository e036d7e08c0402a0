"""What both ends of a seed connection share: ISeedStream over a Twisted transport.

A job (orchagent.seed.sender, tree_receive, streamed) says what to send and when to stop
reading; the stream seals frames with its key, writes them, pauses and resumes its
transport, and owns the one timed call a job may ask of it (a rate limit's wait), which
dies with the connection.  The handshake and what a side does at the end of a connection
are the subclasses': orchagent.seed.listener.ReceiverStream and
orchagent.seed.sender.SenderStream.
"""

from __future__ import annotations

from twisted.internet import protocol
from zope.interface import implementer

from orchagent.interfaces import ISeedStream
from orchagent.seed import frames
from orchagent.seed.state import cancelled


@implementer(ISeedStream)
class Stream(protocol.Protocol):
    def __init__(self, clock):
        self.clock = clock
        self.splitter = frames.FrameSplitter()
        self.peer = ""
        self.key: bytes | None = None
        self.closed = False
        #: Why reading is paused: it resumes when no reason is left.
        self.reasons: set[str] = set()
        #: The job's timed call (later), and the stream's own deadline (handshake, linger).
        self.call = None
        self.timer = None

    @property
    def buffered(self) -> int:
        return self.splitter.buffered

    def send(self, frame_type: int, body: bytes | dict) -> None:
        if not self.closed:
            self.transport.write(frames.seal_body(frame_type, body, self.key))

    def write(self, pieces: list) -> None:
        if not self.closed:
            self.transport.writeSequence(pieces)

    def pause(self, reason: str) -> None:
        if not self.reasons and not self.closed:
            self.transport.pauseProducing()
        self.reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self.reasons:
            self.reasons.discard(reason)
            if not self.reasons and not self.closed:
                self.transport.resumeProducing()

    def later(self, delay: float, fn, *args) -> None:
        self._cancel("call")
        if not self.closed:
            self.call = self.clock.callLater(delay, fn, *args)

    def set_timer(self, delay: float, fn, *args) -> None:
        """The stream's own deadline (instead of the one before)."""
        self._cancel("timer")
        self.timer = self.clock.callLater(delay, fn, *args)

    def stop_timers(self) -> None:
        self._cancel("timer")
        self._cancel("call")

    def _cancel(self, name: str) -> None:
        setattr(self, name, cancelled(getattr(self, name)))

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.stop_timers()
        (self.transport.abortConnection if abort else self.transport.loseConnection)()
