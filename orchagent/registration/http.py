"""The HTTP client that talks to orchestrator's agents server."""

from __future__ import annotations

from treq.client import HTTPClient
from twisted.web import client
from twisted.web.client import Agent, HTTPConnectionPool

from orchagent.config import Config, agents_server_over_https


class _QuietClientFactory(client._HTTP11ClientFactory):
    """Twisted's HTTP client factory without its two log lines per connection."""

    noisy = False


def orchestrator_http_client(config: Config, reactor) -> HTTPClient:
    """A treq client for orchestrator's agents server, with our TLS policy when the server
    is reached over HTTPS (:mod:`orchagent.registration.tls`).  Over plain HTTP the policy
    is not even imported: the daemon then runs without pyOpenSSL (:mod:`orchagent.pyopenssl`).

    Connections are not kept: we talk to orchestrator about once a minute, and a pool of
    idle connections would only be something left behind at shutdown.  The pool's
    factory is made quiet so that the log keeps one line per change of state.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    pool._factory = _QuietClientFactory
    tls = {}
    if agents_server_over_https(config):
        from orchagent.registration.tls import OrchestratorTLSPolicy

        tls["contextFactory"] = OrchestratorTLSPolicy.from_config(config)
    agent = Agent(reactor, connectTimeout=max(1, config.http_timeout_seconds), pool=pool, **tls)
    return HTTPClient(agent)
