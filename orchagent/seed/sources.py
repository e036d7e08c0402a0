"""Who may send a plain v1 seed (no key, no seed TLS): the source orchestrator named.

orchestrator knows each seed it runs: its API answers ``/api/agent-seed-details/{id}``
with the seed's ``SourceHostname`` and ``TargetHostname``.  With ``OrchestratorURL`` set,
the receiver asks it once per seed (when it starts listening for the seed, so the answer
is there before the sender connects), resolves the source's name to its addresses, and
accepts a stream of that seed only from one of them.  Without ``OrchestratorURL``, or for a
seed orchestrator does not know (one started by hand), ``SeedAllowedNetworks`` decides
(empty: any peer, as the original's ``tar | nc``, warned about).  SeedAllowedNetworks, when
set, applies in every case.  When orchestrator cannot answer (unreachable, an error body),
the stream is refused: a configured check that cannot be made fails closed.

Only the receiver's log says why a stream was refused (see :data:`orchagent.seed.auth.REFUSED`).
"""

from __future__ import annotations

import base64
import json
import socket
from typing import Any, Callable
from urllib.parse import quote, urlsplit, urlunsplit

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from orchagent.seed import auth
from orchagent.seed.auth import Rejected

log = Logger()

#: The route of orchestrator's API that names a seed's hosts.
SEED_DETAILS = "/api/agent-seed-details/"


def _normal(host: str) -> str:
    address = auth.address_of(host.split("%", 1)[0])
    return host if address is None else str(address)


def resolve(name: str) -> frozenset[str]:
    """Every address ``name`` resolves to (blocking: run in a thread)."""
    infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    return frozenset(_normal(info[4][0]) for info in infos)


def source_hostname(details: Any, seed_id: str) -> str | None:
    """The source host in orchestrator's answer for ``seed_id``; None when orchestrator
    does not know the seed.  Raises ValueError for an answer that is neither (an ERROR body,
    another shape).  Versions of orchestrator answer a list of seeds or a single one."""
    if isinstance(details, dict) and "SourceHostname" not in details:
        raise ValueError(f"orchestrator answered {str(details.get('Message', details))[:200]!r}")
    seeds = details if isinstance(details, list) else [details]
    for seed in seeds:
        if not isinstance(seed, dict):
            raise ValueError("orchestrator's answer is not a list of seeds")
        if str(seed.get("SeedId")) == seed_id or len(seeds) == 1:
            name = seed.get("SourceHostname")
            if not isinstance(name, str) or not name:
                raise ValueError("orchestrator's seed has no SourceHostname")
            return name
    return None


class SeedSources:
    """The peer check of plain v1 seeds (see the module docstring).

    ``fetch`` (``url -> Deferred[bytes]``) and ``resolver`` (``name -> frozenset``, run in
    a thread) are for tests; by default an HTTP client of orchestrator and getaddrinfo."""

    def __init__(self, config, reactor, networks: tuple,
                 fetch: Callable[[str], defer.Deferred] | None = None,
                 resolver: Callable[[str], frozenset[str]] = resolve):
        self.config = config
        self.reactor = reactor
        self.networks = networks
        self.url, self._authorization = _split_credentials(config.orchestrator_url)
        self._fetch = fetch
        self._resolve = resolver
        #: seed id -> orchestrator's answer once known, as a 1-tuple of (source name, its
        #: addresses) or None (orchestrator does not know the seed); a list of waiters
        #: while asked.  An answer that failed is dropped, to be asked again.
        self._asked: dict[str, Any] = {}

    def prefetch(self, seed_id: str) -> None:
        """Ask orchestrator now, before any stream of the seed arrives."""
        if self.url:
            self._lookup(seed_id).addErrback(lambda _: None)  # logged by _lookup

    def check(self, seed_id: str, host: str):
        """None when ``host`` may send ``seed_id``; raises Rejected, or returns a Deferred
        (firing None, or failing with Rejected) when orchestrator's answer is awaited."""
        if not auth.peer_allowed(host, self.networks):
            raise Rejected(f"{host} is not in SeedAllowedNetworks")
        if not self.url:
            return None
        peer = _normal(host)

        def decide(answer) -> None:
            if answer is None:
                log.warn("seed {seed}: orchestrator does not know this seed; accepting {peer} "
                         "(SeedAllowedNetworks: {networks})", seed=seed_id, peer=peer,
                         networks=", ".join(self.config.seed_allowed_networks) or "any")
            elif peer not in answer[1]:
                name, addresses = answer
                raise Rejected(f"{peer} is not {name}, the source orchestrator named for seed "
                               f"{seed_id} ({', '.join(sorted(addresses))})")

        def failed(failure):
            if failure.check(Rejected):
                return failure
            raise Rejected(f"cannot learn the source of seed {seed_id} from orchestrator: "
                           f"{failure.getErrorMessage()}")

        return self._lookup(seed_id).addCallback(decide).addErrback(failed)

    def _lookup(self, seed_id: str) -> defer.Deferred:
        """A new Deferred of the cached (or started) answer for ``seed_id``."""
        asked = self._asked.get(seed_id)
        if isinstance(asked, tuple):
            return defer.succeed(asked[0])
        d = defer.Deferred()
        if asked is not None:
            asked.append(d)
            return d
        self._asked[seed_id] = [d]
        defer.ensureDeferred(self._ask(seed_id)).addBoth(self._settle, seed_id)
        return d

    def _settle(self, result, seed_id: str) -> None:
        """Fire every waiter of ``seed_id`` with orchestrator's answer (or failure)."""
        waiters = self._asked.pop(seed_id)
        if isinstance(result, Failure):  # not kept: asked again by the next stream
            log.warn("seed {seed}: cannot learn its source from orchestrator: {error}",
                     seed=seed_id, error=result.getErrorMessage())
        else:
            self._asked[seed_id] = (result,)
        for waiter in waiters:
            waiter.errback(result) if isinstance(result, Failure) else waiter.callback(result)

    async def _ask(self, seed_id: str):
        body = await self._get(f"{self.url}{SEED_DETAILS}{quote(seed_id, safe='')}")
        try:
            details = json.loads(body)
        except ValueError:
            raise ValueError("orchestrator's answer is not JSON") from None
        name = source_hostname(details, seed_id)
        if name is None:
            return None
        addresses = await threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                                    self._resolve, name)
        log.info("seed {seed}: orchestrator names {name} ({addresses}) as its source",
                 seed=seed_id, name=name, addresses=", ".join(sorted(addresses)))
        return name, addresses

    async def _get(self, url: str) -> bytes:
        if self._fetch is not None:
            return await self._fetch(url)
        import treq

        client = _http_client(self.config, self.reactor, url)
        headers = {b"Authorization": [self._authorization]} if self._authorization else {}
        response = await client.get(url, headers=headers,
                                    timeout=max(1, self.config.http_timeout_seconds))
        if response.code != 200:
            await treq.content(response)
            raise ValueError(f"orchestrator answered HTTP {response.code}")
        return await treq.content(response)


def _split_credentials(url: str) -> tuple[str, bytes | None]:
    """``OrchestratorURL`` without user:password@ (given as basic auth instead)."""
    url = url.rstrip("/")
    if not url:
        return "", None
    parts = urlsplit(url)
    if parts.username is None:
        return url, None
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    credentials = f"{parts.username}:{parts.password or ''}".encode()
    return (urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)),
            b"Basic " + base64.b64encode(credentials))


def _http_client(config, reactor, url: str):
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    from orchagent.registration.http import _QuietClientFactory

    pool = HTTPConnectionPool(reactor, persistent=False)
    pool._factory = _QuietClientFactory
    tls = {}
    if url.lower().startswith("https:"):
        from orchagent.registration.tls import OrchestratorTLSPolicy

        tls["contextFactory"] = OrchestratorTLSPolicy.from_config(config)
    agent = Agent(reactor, connectTimeout=max(1, config.http_timeout_seconds), pool=pool, **tls)
    return HTTPClient(agent)
