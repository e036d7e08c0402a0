"""Registration with orchestrator: submit-agent, agent-ping, and the health they imply.

orchestrator learns of an agent only from ``GET {server}/api/submit-agent/{host}/{port}/{token}``
and judges it alive from the agent's own ``GET {server}/api/agent-ping`` calls.  This
service makes both calls on the injected clock:

* submit at start, again every ``ResubmitAgentIntervalMinutes``; a failed submit is retried
  with doubling delays (1 s up to 60 s) until one succeeds;
* ping every ``ContinuousPollSeconds``, the first one right after the first successful
  submit; a failed ping is retried with doubling delays capped at the poll interval.
  Each successful ping is the "last talkback" (:attr:`Registration.last_ping_at`).

As in the original agent, an interval of 0 turns that call off (the original's ticker
never fired).  An empty ``AgentsServer`` means standalone: no calls, always healthy.

Health (:meth:`Registration.is_healthy`, the status endpoint): BAD when the last
successful ping is older than ``StatusBadSeconds``.  Before the first ping the agent gets
the same allowance counted from start, so a freshly started agent reports OK while it
registers, and BAD once ``StatusBadSeconds`` pass without orchestrator answering.  With
pings turned off that is for good, as with the original, whose talkback then never moved.

The log has one line per change of :attr:`Registration.state`, not one per failed try.
The token is part of the submit URL, so URLs are only ever logged with it masked.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from orchagent.config import Config, agents_server_url
from orchagent.token import Token

log = Logger()

STANDALONE = "standalone"
REGISTERING = "registering"
REGISTERED = "registered"
UNREACHABLE = "unreachable"

#: First retry delay and largest delay between retries of a failed submit-agent.
RETRY_INITIAL_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0


class OrchestratorError(Exception):
    """orchestrator did not accept a call (error status or an ERROR answer)."""


class Backoff:
    """Doubling delays for retries, capped; :meth:`reset` after a success."""

    def __init__(self, initial: float, maximum: float):
        self.initial = initial
        self.maximum = maximum
        self._next = initial

    def next_delay(self) -> float:
        delay = min(self._next, self.maximum)
        self._next = min(self._next * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self._next = self.initial


class Registration(service.Service):
    """Keeps this agent registered with orchestrator and knows whether orchestrator answers.

    ``reactor`` is the clock (and, without ``http_client``, the reactor the HTTPS client
    connects with).  ``http_client`` is a treq ``HTTPClient`` (tests pass a StubTreq).
    """

    name = "registration"

    def __init__(self, config: Config, reactor, hostname: str, token: Token, http_client=None):
        self._config = config
        self._clock = reactor
        self.hostname = hostname
        self._token = token
        self.server = agents_server_url(config)
        self.standalone = not config.agents_server
        if http_client is None and not self.standalone:
            from orchagent.registration.http import orchestrator_http_client

            http_client = orchestrator_http_client(config, reactor)
        self._client = http_client
        self.state = STANDALONE if self.standalone else REGISTERING
        self.started_at: float | None = None
        self.last_ping_at: float | None = None
        self.last_submit_at: float | None = None
        self._ok: dict[str, bool | None] = {"submit": None, "ping": None}
        self._intervals = {
            "submit": 60.0 * config.resubmit_agent_interval_minutes,
            "ping": float(config.continuous_poll_seconds),
        }
        self._backoff = {
            "submit": Backoff(RETRY_INITIAL_SECONDS, RETRY_MAX_SECONDS),
            "ping": Backoff(RETRY_INITIAL_SECONDS,
                            min(RETRY_MAX_SECONDS, self._intervals["ping"] or RETRY_MAX_SECONDS)),
        }
        self._timers: dict[str, Any] = {}
        self._in_flight: set[defer.Deferred] = set()

    # --- what the status endpoint and metrics read ----------------------------------------

    def is_healthy(self) -> bool:
        """False once the last successful ping (or the start) is older than StatusBadSeconds."""
        if self.standalone:
            return True
        now = self._clock.seconds()
        since = self.last_ping_at if self.last_ping_at is not None else self.started_at
        if since is None:
            return True
        return now - since <= self._config.status_bad_seconds

    # --- service ---------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.started_at = self._clock.seconds()
        if self.standalone:
            log.info("AgentsServer is empty: standalone, not registering with orchestrator")
            return
        if self._config.ssl_skip_verify:
            log.warn("SSLSkipVerify is set: orchestrator's TLS certificate and host name are "
                     "NOT verified; anyone on the path can pose as orchestrator")
        log.info("registering with orchestrator at {server} as {hostname}:{port}",
                 server=self.server, hostname=self.hostname, port=self._config.http_port)
        self._start_call("submit")

    def stopService(self):
        super().stopService()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        pending = list(self._in_flight)
        for d in pending:
            d.cancel()
        if pending:
            return defer.DeferredList(pending, consumeErrors=True)
        return None

    # --- the calls -------------------------------------------------------------------------

    def _url(self, kind: str) -> str:
        if kind == "submit":
            return (f"{self.server}/api/submit-agent/{quote(self.hostname, safe='')}/"
                    f"{self._config.http_port}/{quote(self._token.value, safe='')}")
        return f"{self.server}/api/agent-ping"

    def _start_call(self, kind: str) -> None:
        self._timers.pop(kind, None)
        d = defer.Deferred.fromCoroutine(self._call(kind))
        self._in_flight.add(d)

        def done(result):
            self._in_flight.discard(d)
            return result

        d.addBoth(done)

    def _schedule(self, kind: str, delay: float) -> None:
        if self.running and kind not in self._timers:
            self._timers[kind] = self._clock.callLater(delay, self._start_call, kind)

    async def _call(self, kind: str) -> None:
        timeout = max(1, self._config.http_timeout_seconds)
        request = defer.Deferred.fromCoroutine(self._get(self._url(kind)))
        expired = []

        def expire():
            expired.append(True)
            request.cancel()

        timer = self._clock.callLater(timeout, expire)
        try:
            await request
        except Exception as e:
            if not self.running:
                return
            reason = f"no answer within {timeout}s" if expired else self._describe(e)
            self._record(kind, False, reason)
            self._schedule(kind, self._backoff[kind].next_delay())
            return
        finally:
            if timer.active():
                timer.cancel()
        first_submit = kind == "submit" and self.last_submit_at is None
        self._backoff[kind].reset()
        self._record(kind, True)
        if self._intervals[kind]:
            self._schedule(kind, self._intervals[kind])
        if first_submit and self._intervals["ping"] and self.running:
            self._start_call("ping")

    async def _get(self, url: str) -> Any:
        response = await self._client.get(url)
        body = await response.content()
        if response.code != 200:
            raise OrchestratorError(f"HTTP {response.code}")
        try:
            answer = json.loads(body)
        except ValueError:
            return body
        if isinstance(answer, dict) and answer.get("Code") == "ERROR":
            raise OrchestratorError(f"orchestrator answered ERROR: {answer.get('Message')}")
        return answer

    def _describe(self, error: Exception) -> str:
        reasons = getattr(error, "reasons", None)
        if isinstance(error, OrchestratorError):
            text = str(error)
        elif reasons:
            text = "; ".join(f"{r.type.__name__}: {r.getErrorMessage()}" for r in reasons)
        else:
            text = f"{type(error).__name__}: {error}"
        return text.replace(self._token.value, "***")

    # --- state -----------------------------------------------------------------------------

    def _record(self, kind: str, ok: bool, reason: str | None = None) -> None:
        now = self._clock.seconds()
        self._ok[kind] = ok
        if ok and kind == "ping":
            self.last_ping_at = now
        if ok and kind == "submit":
            self.last_submit_at = now
        if False in self._ok.values():
            state = UNREACHABLE
        elif self._ok["submit"]:
            state = REGISTERED
        else:
            state = REGISTERING
        if state == self.state:
            return
        previous, self.state = self.state, state
        if state == UNREACHABLE:
            log.warn("orchestrator at {server} unreachable ({kind} failed: {reason}); "
                     "retrying with backoff", server=self.server,
                     kind="submit-agent" if kind == "submit" else "agent-ping", reason=reason)
        elif previous == UNREACHABLE:
            log.info("orchestrator at {server} answers again; registered as {hostname}:{port}",
                     server=self.server, hostname=self.hostname, port=self._config.http_port)
        else:
            log.info("registered with orchestrator at {server} as {hostname}:{port}",
                     server=self.server, hostname=self.hostname, port=self._config.http_port)
