"""The controller's client of one agent's HTTP API (treq).

Every call is ``GET {url}/api/{path}?token=...``: the v1 surface, nothing private.  A
failure of any kind becomes :class:`AgentCallFailed` naming the host and the endpoint, with
the agent's own message when it sent the v1 error body, so the operator reads exactly
what the agent said.  The treq client is injected: the controller's tests hand in a
``StubTreq`` wrapping real :class:`~orchagent.api.resource.AgentAPI` objects.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from twisted.internet import defer, ssl
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from orchagent.cli.settings import AgentAddress, SettingsError

#: Seconds a quick call (facts, status, seed control) may take.
DEFAULT_TIMEOUT = 60.0
#: Seconds for calls that run OS commands that may be slow (stop/start MySQL, delete the
#: datadir, mount, post-copy): the agent kills its command after CommandTimeoutSeconds.
SLOW_TIMEOUT = 900.0


class AgentCallFailed(Exception):
    """A call to an agent did not succeed.

    ``unreachable`` is true when no HTTP answer came at all (connection refused, timeout):
    the agent may be down, and a seed in flight may still be resumable.
    """

    def __init__(self, host: str, endpoint: str, message: str, unreachable: bool = False):
        super().__init__(f"{host}: {endpoint}: {message}")
        self.host = host
        self.endpoint = endpoint
        self.message = message
        self.unreachable = unreachable


def segment(value: str) -> str:
    """One URL path segment (seed id, host name), percent-encoded."""
    return quote(value, safe="")


class AgentClient:
    """Calls to one agent; ``http`` is a treq ``HTTPClient`` (or ``StubTreq``)."""

    def __init__(self, address: AgentAddress, http, reactor, timeout: float = DEFAULT_TIMEOUT):
        self.address = address
        self.http = http
        self.reactor = reactor
        self.timeout = timeout

    @property
    def name(self) -> str:
        return self.address.name

    async def call(self, path: str, timeout: float | None = None, **params: str) -> Any:
        """``GET /api/{path}`` with ``params`` and the token → the parsed JSON answer."""
        endpoint = "/api/" + path
        code, body = await self._get(endpoint, timeout, params)
        try:
            value = json.loads(body)
        except ValueError:
            value = None
            if code == 200:
                raise AgentCallFailed(self.name, endpoint, f"answer is not JSON: {body[:200]!r}")
        if code == 200:
            return value
        if isinstance(value, dict) and value.get("Code") == "ERROR":
            message = str(value.get("Message"))
            if message == "Invalid token":
                message += " (the controller's token file does not hold this agent's token)"
            raise AgentCallFailed(self.name, endpoint, message)
        if code == 401:
            raise AgentCallFailed(self.name, endpoint, "HTTP 401: basic auth refused (HTTPAuthUser)")
        raise AgentCallFailed(self.name, endpoint, f"HTTP {code}: {body[:200]!r}")

    async def _get(self, endpoint: str, timeout: float | None, params: dict) -> tuple[int, bytes]:
        timeout = timeout or self.timeout
        query = dict(params, token=self.address.token)
        try:
            response = await self.http.get(
                self.address.url + endpoint, params=query, auth=self.address.auth,
                reactor=self.reactor, timeout=timeout)
            return response.code, await response.content()
        except defer.CancelledError:
            raise AgentCallFailed(self.name, endpoint, f"no answer within {timeout:.0f}s",
                                  unreachable=True) from None
        except Exception as e:  # connection refused, reset, DNS, TLS: all mean "no answer"
            reason = str(e) or e.__class__.__name__
            raise AgentCallFailed(self.name, endpoint, f"cannot reach the agent: {reason}",
                                  unreachable=True) from None


@implementer(IPolicyForHTTPS)
class _TLSPolicy:
    """Verify the agent against our CA (or the system's), present our certificate if any."""

    def __init__(self, trust_root, client_certificate):
        self.trust_root = trust_root
        self.client_certificate = client_certificate

    def creatorForNetloc(self, hostname: bytes, port: int):
        return ssl.optionsForClientTLS(hostname.decode("ascii"), trustRoot=self.trust_root,
                                       clientCertificate=self.client_certificate)


def tls_policy(address: AgentAddress) -> _TLSPolicy:
    from orchagent.api.tls import load_certificates, load_private_key
    from orchagent.errors import ConfigError

    try:
        trust_root = (ssl.trustRootFromCertificates(load_certificates(address.ca_file, "SSLCAFile"))
                      if address.ca_file else ssl.platformTrust())
        client_certificate = None
        if address.cert_file or address.key_file:
            cert = load_certificates(address.cert_file, "SSLCertFile")[0]
            key = load_private_key(address.key_file, "SSLPrivateKeyFile")
            client_certificate = ssl.PrivateCertificate.fromCertificateAndKeyPair(cert, key)
    except ConfigError as e:
        raise SettingsError(f"host {address.name}: {e.message}") from None
    return _TLSPolicy(trust_root, client_certificate)


def make_http_client(reactor, address: AgentAddress):
    """A treq client for ``address``: plain HTTP, or HTTPS verified as configured."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=False)
    if address.is_https:
        return HTTPClient(Agent(reactor, contextFactory=tls_policy(address), pool=pool))
    return HTTPClient(Agent(reactor, pool=pool))
