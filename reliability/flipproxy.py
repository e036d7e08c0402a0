"""A TCP relay that flips one byte of one connection (run inside a namespace by the matrix).

``python -m reliability.flipproxy LISTEN_PORT TARGET_HOST TARGET_PORT FLIP_AFTER``: the
first connection whose sender->receiver bytes pass FLIP_AFTER gets that byte inverted;
every other byte is relayed unchanged.
"""

from __future__ import annotations

import sys

from twisted.internet import protocol, reactor


class Relay(protocol.Protocol):
    def connectionMade(self):
        self.peer = None
        self.pending = []
        self.seen = 0
        factory = protocol.ClientFactory()
        factory.protocol = Back
        factory.front = self
        self.transport.pauseProducing()
        reactor.connectTCP(self.factory.target_host, self.factory.target_port, factory)

    def attached(self, back):
        self.peer = back
        self.transport.resumeProducing()

    def dataReceived(self, data):
        state = self.factory
        if not state.flipped and self.seen + len(data) > state.flip_after:
            i = max(0, state.flip_after - self.seen)
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
            state.flipped = True
            print(f"flipped byte {self.seen + i}", flush=True)
        self.seen += len(data)
        self.peer.transport.write(data)

    def connectionLost(self, reason):
        if self.peer is not None:
            self.peer.transport.loseConnection()


class Back(protocol.Protocol):
    def connectionMade(self):
        self.factory.front.attached(self)

    def dataReceived(self, data):
        self.factory.front.transport.write(data)

    def connectionLost(self, reason):
        self.factory.front.transport.loseConnection()


def main() -> None:
    listen, host, port, flip_after = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    factory = protocol.Factory()
    factory.protocol = Relay
    factory.target_host, factory.target_port = host, port
    factory.flip_after, factory.flipped = flip_after, False
    reactor.listenTCP(int(listen), factory, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
