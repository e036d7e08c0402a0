"""The seed port: listening, accepting, admitting, and handing each connection to its job.

A receiving host opens SeedTransferPort while it receives a seed (or completed one lately
that its sender may not know of yet) and closes it when none is left: :class:`SeedListener`.
Each accepted connection is a :class:`ReceiverStream`, which only cuts frames and runs the
handshake (:mod:`orchagent.seed.auth`; what it must prove: :meth:`SeedListener.admission`).
Once admitted, the connection joins its seed's receive job, which takes it as a tree's
control or data stream or as a hot seed's backup stream (or refuses it), and everything
after goes to that job.  :class:`ReceiverFactory` bounds the connections still in their
handshake.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer, endpoints, error, protocol
from twisted.logger import Logger

from orchagent.errors import BadRequest
from orchagent.seed import auth, frames, state
from orchagent.seed.auth import REFUSED, Admission, Rejected, ServerHandshake, reject_frame
from orchagent.seed.frames import FrameType, ProtocolError
from orchagent.seed.stream import Stream

log = Logger()

#: Socket read size: larger reads than Twisted's 64 KiB cost less per byte; larger
#: still cost memory (each read is a fresh buffer) for little gain.
READ_SIZE = 256 << 10
#: Seconds a new connection has to complete the handshake (a sender answers in one round
#: trip; an idle connection holds a descriptor, see ReceiverFactory).
HANDSHAKE_TIMEOUT = 8
#: Seconds from the frame that decided a refusal to the REJECT: every refusal, whatever
#: its reason (unknown seed, wrong key, a peer that may not send), answers alike.
REFUSAL_DELAY = 1.0
#: Connections still in their handshake, from one address and in all (ReceiverFactory).
MAX_PENDING_PER_PEER = 16
MAX_PENDING = 64
#: Seconds the sender has to close a stream after our last frame.
LINGER = 10


class ReceiverStream(Stream):
    """One accepted connection: frames in, handshake, then hand-off to the job."""

    def __init__(self, acceptor: "SeedListener"):
        super().__init__(acceptor.clock)
        self.acceptor = acceptor
        self.handshake: ServerHandshake | None = None
        #: The receive job it joined (orchagent.seed.receiver), once admitted.
        self.job = None
        self.role = ""
        self.lingering = False
        #: Our last word was a frame the peer was connected to read (RESULT, a refusal).
        self.told = False
        #: When the frame being handled arrived (refusals are timed from it).
        self.frame_at = 0.0
        #: Waiting for the manager's verdict on this peer (plain v1 seeds, see admission).
        self.checking = False
        #: Fields the job that admitted the stream adds to its ACCEPT.
        self.offer: dict = {}

    def connectionMade(self):
        if hasattr(self.transport, "bufferSize") and not hasattr(self.transport, "transport"):
            self.transport.bufferSize = READ_SIZE  # TCP's own transport (not TLS's wrapper)
        self.peer = self.transport.getPeer().host
        self.handshake = ServerHandshake(self.acceptor.admission, self.peer)
        self.acceptor.streams.add(self)
        self.set_timer(HANDSHAKE_TIMEOUT, self.fail, "no handshake within the time limit")

    def dataReceived(self, data):
        if not (self.closed or self.lingering):
            self.frame_at = self.clock.seconds()
            self._refusing(self._frames, data)

    def _refusing(self, fn, *args) -> None:
        """``fn(*args)``: a Rejected refuses the stream, a broken protocol breaks it."""
        try:
            fn(*args)
        except Rejected as e:
            self.reject(str(e))
        except (ProtocolError, BadRequest) as e:
            self.fail(str(e))

    def _frames(self, data) -> None:
        for frame in self.splitter.feed(data):
            if self.closed or self.lingering:
                return
            if self.checking:
                raise ProtocolError("a frame before the handshake's answer")
            if self.key is None:
                self._handshake(frame)
            else:
                self.job.frame(self, frame)
        if self.key is not None:
            self.job.flush(self)

    def _handshake(self, frame):
        reply = self.handshake.receive(frame)
        if reply is not None:
            self.transport.write(reply)
            return
        check = self.handshake.peer_check
        if isinstance(check, defer.Deferred):
            self.checking = True
            check.addCallbacks(self._peer_checked, self._peer_refused)
            return
        self._admitted()

    def _peer_checked(self, _=None) -> None:
        self.checking = False
        if not (self.closed or self.lingering):
            self._refusing(self._admitted)

    def _peer_refused(self, failure) -> None:
        self.checking = False
        why = failure.getErrorMessage()
        self.reject(why if failure.check(Rejected) else f"checking the sender failed: {why}")

    def _admitted(self) -> None:
        hello = self.handshake.hello
        job = self.acceptor.receive_job(hello["seed"])
        if job is None:
            raise Rejected(f"this host is not receiving seed {hello['seed']}")
        job.attach(self, hello)
        if self.factory is not None:
            self.factory.handshake_done(self)
        self.job, self.role = job, hello["role"]
        self.key = self.handshake.key
        self.stop_timers()
        self.transport.write(self.handshake.accept(**self.offer))
        if job.record.state == state.COMPLETED:
            # The sender reconnected because it lost the control stream before our RESULT.
            self.last_word(FrameType.RESULT, {"ok": True})

    def reject(self, message: str) -> None:
        """Refuse the stream: the reason goes to the log, the peer gets :data:`REFUSED`,
        REFUSAL_DELAY after the frame that decided it, whatever the reason was."""
        log.warn("seed connection from {peer} refused: {message}", peer=self.peer, message=message)
        wait = max(0.0, self.frame_at + REFUSAL_DELAY - self.clock.seconds())
        self._last(reject_frame(REFUSED), wait)

    def last_word(self, frame_type: int | None = None, body: bytes | dict = b"") -> None:
        """Send a final frame (none without ``frame_type``) and let the sender close:
        closing with its unread data in our socket would reset the connection and could
        destroy that frame in flight.  Whatever still arrives is ignored; LINGER seconds
        after the frame the connection is cut."""
        self._last(None if frame_type is None else frames.seal_body(frame_type, body, self.key))

    def _last(self, data: bytes | None, wait: float = 0.0) -> None:
        if self.closed or self.lingering:
            return
        self.lingering = True
        if wait > 0:
            self.set_timer(wait, self._say_last, data)
            return
        self._say_last(data)

    def _say_last(self, data: bytes | None) -> None:
        if self.closed:
            return
        if data:
            self.told = True
            self.transport.write(data)
        if self.reasons:
            self.reasons.clear()
            self.transport.resumeProducing()
        self.stop_timers()
        self.set_timer(LINGER, self.close, True)

    def fail(self, message: str) -> None:
        log.warn("seed stream from {peer} broken: {message}", peer=self.peer, message=message)
        self.close(abort=True)

    def connectionLost(self, reason=protocol.connectionDone):
        self.closed = True
        self.stop_timers()
        if self.factory is not None:
            self.factory.handshake_done(self)
        self.acceptor.streams.discard(self)
        if self.job is not None:
            self.job.stream_lost(self)
            if self.told and reason.check(error.ConnectionDone):
                # The sender closes when it has read our RESULT.
                self.job.result_read()


class ReceiverFactory(protocol.Factory):
    """Builds streams, and bounds the connections still in their handshake.

    Each holds a descriptor until its HANDSHAKE_TIMEOUT; a flood of idle connections would
    otherwise take every descriptor the seed engine has and fail the seed it serves
    ("Too many open files").  Above MAX_PENDING_PER_PEER from one address a new
    connection from it is closed at once (a sender opens SeedStreams + 1); above
    MAX_PENDING in all the oldest is closed, so a sender's fresh connection, which
    completes its handshake within a round trip, still gets in."""

    noisy = False

    def __init__(self, acceptor: "SeedListener"):
        self.acceptor = acceptor
        #: Streams in their handshake, oldest first (a dict keeps insertion order).
        self.pending: dict[ReceiverStream, str] = {}
        self.per_peer: dict[str, int] = {}

    def buildProtocol(self, addr):
        host = getattr(addr, "host", "")
        if self.per_peer.get(host, 0) >= MAX_PENDING_PER_PEER:
            return None
        while len(self.pending) >= MAX_PENDING:
            oldest = next(iter(self.pending))
            self.handshake_done(oldest)
            oldest.close(abort=True)
        stream = ReceiverStream(self.acceptor)
        stream.factory = self
        self.pending[stream] = host
        self.per_peer[host] = self.per_peer.get(host, 0) + 1
        return stream

    def handshake_done(self, stream: ReceiverStream) -> None:
        """The stream passed its handshake, or is gone: it no longer counts as pending."""
        host = self.pending.pop(stream, None)
        if host is not None:
            self.per_peer[host] -= 1
            if not self.per_peer[host]:
                del self.per_peer[host]


class SeedListener:
    """The seed port and the connections on it (see the module docstring).

    ``receive_job(seed_id)``: the seed's receive job, running or lately completed, or
    None: an admitted connection joins it.  ``sources``: who may send a plain v1 seed
    (orchagent.seed.sources.SeedSources)."""

    def __init__(self, config: Any, reactor: Any, clock: Any, tls: bool, sources: Any,
                 receive_job: Callable[[str], Any]):
        self.config = config
        self.reactor = reactor
        self.clock = clock
        self.tls = tls
        self.sources = sources
        self.receive_job = receive_job
        #: Every accepted connection still open (closed at stop).
        self.streams: set[ReceiverStream] = set()
        self.port = None
        self._lock = defer.DeferredLock()

    def admission(self, seed_id: str) -> Admission:
        """What a stream for ``seed_id`` must prove (called by the handshake).  A plain v1
        seed (no key, no TLS) is taken only from the source orchestrator names for it, else
        from SeedAllowedNetworks (:mod:`orchagent.seed.sources`)."""
        job = self.receive_job(seed_id)
        if job is None or not (job.active or job.record.state == state.COMPLETED):
            raise Rejected(f"this host is not receiving seed {seed_id}")
        if job.auth_key is not None or self.tls:
            return Admission(job.auth_key)
        return Admission(None, lambda host: self.sources.check(seed_id, host))

    async def listen(self, unkeyed: list[str] = ()) -> None:
        """Open the port unless it is open; ``unkeyed``: the plain v1 seeds received, whose
        sources to look up now (orchestrator is asked before their sender connects)."""
        async with self._lock:
            if self.port is None:
                port = self.config.seed_transfer_port
                interface = self.config.seed_bind_address
                if self.tls:
                    endpoint = endpoints.SSL4ServerEndpoint(
                        self.reactor, port, auth.tls_server_options(self.config), interface=interface)
                else:
                    endpoint = endpoints.TCP4ServerEndpoint(self.reactor, port, interface=interface)
                self.port = await endpoint.listen(ReceiverFactory(self))
                log.info("listening for seed streams on {address}:{port}",
                         address=interface or "*", port=port)
        if not self.tls:
            for seed_id in unkeyed:
                self.sources.prefetch(seed_id)

    async def close(self) -> None:
        """Stop listening (the connections accepted stay until they end)."""
        async with self._lock:
            port, self.port = self.port, None
            if port is not None:
                await port.stopListening()

    def close_streams(self) -> None:
        for stream in list(self.streams):
            stream.close(abort=True)
