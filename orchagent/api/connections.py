"""The API's connections: a reserve of descriptors for token-authenticated callers.

Every open connection holds a file descriptor, and a daemon started by systemd has a
soft limit of 1024 of them unless its unit says otherwise.  A flood of idle connections
(opened, then silent) used to take them all: every API call, orchestrator's included,
was then reset until the flood ended.  :class:`ReservedSite` bounds the connections that
have not yet made a token-authenticated call: above :func:`untrusted_cap` a new
connection closes the oldest of them that has no request being answered.  A connection
whose request passed the token check (see :func:`trust`) no longer counts and is never
closed for this, so orchestrator's calls get through during the flood.
"""

from __future__ import annotations

import resource

from twisted.web import server

#: The untrusted connections' share of the descriptor limit, and its bounds.
SHARE = 4
MIN_CAP = 32
MAX_CAP = 4096


def untrusted_cap(limit: int | None = None) -> int:
    """How many connections without a token call may be open at once: a quarter of the
    soft RLIMIT_NOFILE (256 of systemd's default 1024), within MIN_CAP..MAX_CAP.  The
    rest stays for token callers, the seed engine's channel, files and commands."""
    if limit is None:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = soft if soft != resource.RLIM_INFINITY else MAX_CAP * SHARE
    return max(MIN_CAP, min(MAX_CAP, limit // SHARE))


def trust(request) -> None:
    """The request passed the token check: its connection leaves the bounded set."""
    channel = getattr(request, "channel", None)
    if channel is not None and not getattr(channel, "orchagent_trusted", False):
        channel.orchagent_trusted = True
        site = getattr(channel, "site", None)
        if isinstance(site, ReservedSite):
            site.untrusted.pop(channel, None)


def _busy(channel) -> bool:
    return any(getattr(r, "orchagent_processing", False) for r in getattr(channel, "requests", ()))


class ReservedSite(server.Site):
    """A Site that bounds connections not yet trusted (see the module docstring)."""

    def __init__(self, *args, cap: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.cap = untrusted_cap() if cap is None else cap
        #: Inner HTTP channels of untrusted connections, oldest first.
        self.untrusted: dict = {}
        self.closed_for_reserve = 0

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        channel = getattr(protocol, "_channel", protocol)
        if len(self.untrusted) >= self.cap:
            self._make_room()
        self.untrusted[channel] = True
        lost = channel.connectionLost

        def connection_lost(reason, channel=channel, lost=lost):
            self.untrusted.pop(channel, None)
            return lost(reason)

        channel.connectionLost = connection_lost
        return protocol

    def _make_room(self) -> None:
        """Close the oldest untrusted connections with no request being answered until
        there is room for one more (none when all are answering: they end soon)."""
        for channel in list(self.untrusted):
            if len(self.untrusted) < self.cap:
                return
            if _busy(channel):
                continue
            del self.untrusted[channel]
            self.closed_for_reserve += 1
            transport = channel.transport
            if transport is not None:
                transport.abortConnection()
