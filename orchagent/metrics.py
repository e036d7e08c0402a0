"""Prometheus metrics of one agent, served as text at ``/metrics``.

Each :class:`AgentMetrics` has a registry of its own (never prometheus_client's global
one), so several agents in one process, as in tests, don't mix.  Two kinds of metric:

* counted as things happen: OS commands (fed by the :class:`~orchagent.process.ProcessRunner`
  observer hook) and API requests (fed by :class:`CountingResource`);
* read at scrape time from the component that owns the state: seeds
  (``agent.seeds.all_status()``) and registration with orchestrator
  (``agent.registration.state`` / ``last_ping_at``), so they can never drift from it.

Label values are bounded: a command is its program's name (``CommandResult.name``, no
arguments, no credentials), an API request is its route pattern (``/api/lv/<path:lv>``),
never the raw path.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from twisted.web.resource import Resource
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map

#: Command durations range from milliseconds (lvs) to many minutes (snapshots, copies).
COMMAND_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, float("inf"))
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
#: The label of requests no route of ours matched.
OTHER = "other"


class AgentMetrics:
    """The metrics of one agent; see the module docstring."""

    def __init__(self, agent):
        self.agent = agent
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "orchagent_http_requests", "API requests by route, method and status code.",
            ["endpoint", "method", "code"], registry=self.registry)
        self.command_runs = Counter(
            "orchagent_commands", "OS commands run, by program.", ["command"],
            registry=self.registry)
        self.command_failures = Counter(
            "orchagent_command_failures",
            "OS commands that failed (non-zero exit, signal, timeout, too much output).",
            ["command"], registry=self.registry)
        self.command_seconds = Histogram(
            "orchagent_command_duration_seconds", "Run time of OS commands, by program.",
            ["command"], buckets=COMMAND_BUCKETS, registry=self.registry)
        self.registry.register(_ComponentCollector(agent))
        observers = getattr(agent.runner, "observers", None)
        if isinstance(observers, list):
            observers.append(self.observe_command)

    def observe_command(self, result) -> None:
        """ProcessRunner observer: count one finished command."""
        self.command_runs.labels(result.name).inc()
        self.command_seconds.labels(result.name).observe(result.duration)
        if not result.ok:
            self.command_failures.labels(result.name).inc()

    def count_request(self, endpoint: str, method: str, code: int) -> None:
        if method not in _METHODS:
            method = OTHER
        self.requests.labels(endpoint, method, str(code)).inc()

    def exposition(self, accept: bytes | None) -> tuple[bytes, str]:
        """The scrape body and its content type, in the format the Accept header prefers."""
        encoder, content_type = choose_encoder((accept or b"").decode("latin-1"))
        return encoder(self.registry), content_type

    def counting(self, wrapped: Resource, url_map: Map, status_endpoint: str) -> "CountingResource":
        """``wrapped`` (the Klein app's resource), counting each request it serves."""
        return CountingResource(
            wrapped, lambda request: route_label(url_map, request, status_endpoint),
            self.count_request)


def route_label(url_map: Map, request, status_endpoint: str) -> str:
    """The route pattern ``request`` matches, ``status_endpoint`` for the status route, or
    ``other`` for anything no route of ours serves (the catch-all 404)."""
    try:
        path = "/" + "/".join(segment.decode("utf-8") for segment in request.postpath)
    except UnicodeDecodeError:
        return OTHER
    if path.rstrip("/") == status_endpoint.rstrip("/"):
        return status_endpoint
    method = request.method.decode("ascii", "replace")
    try:
        rule, _ = url_map.bind("agent").match(path, method=method, return_rule=True)
    except HTTPException:
        return OTHER
    if "__rest__" in rule.arguments or rule.rule == "/":
        return OTHER
    return rule.rule


class CountingResource(Resource):
    """Serves everything through the wrapped leaf resource and counts each response."""

    isLeaf = True

    def __init__(self, wrapped: Resource, label: Callable[[Any], str],
                 count: Callable[[str, str, int], None]):
        super().__init__()
        self.wrapped = wrapped
        self.label = label
        self.count = count

    def render(self, request):
        endpoint = self.label(request)
        method = request.method.decode("ascii", "replace")
        request.notifyFinish().addBoth(lambda _: self.count(endpoint, method, request.code))
        return self.wrapped.render(request)


class _ComponentCollector:
    """Seed and registration metrics, read from their components at each scrape."""

    def __init__(self, agent):
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        yield from self._seeds()
        yield from self._registration()

    def _seeds(self) -> Iterator[Metric]:
        all_status = getattr(self.agent.seeds, "all_status", None)
        statuses = all_status() if all_status is not None else []
        if not isinstance(statuses, (list, tuple)):
            # Not the engine's contract (a list of dicts): report no seeds rather than guess.
            getattr(statuses, "close", lambda: None)()
            statuses = []
        by_state = GaugeMetricFamily(
            "orchagent_seeds", "Seeds this agent knows, by role and state.",
            labels=["role", "state"])
        sent = GaugeMetricFamily(
            "orchagent_seed_sent_bytes", "Bytes sent so far, per seed this agent sends.",
            labels=["seed_id"])
        received = GaugeMetricFamily(
            "orchagent_seed_received_bytes",
            "Bytes received so far, per seed this agent receives.", labels=["seed_id"])
        expected = GaugeMetricFamily(
            "orchagent_seed_expected_bytes", "Bytes a seed moves in all (0 while unknown).",
            labels=["seed_id", "role"])
        rate = GaugeMetricFamily(
            "orchagent_seed_rate_bytes_per_second", "Current transfer rate, per seed.",
            labels=["seed_id", "role"])
        tally = collections.Counter()
        for status in statuses:
            seed_id, role = str(status.get("SeedId", "")), str(status.get("Role", ""))
            tally[role, str(status.get("State", ""))] += 1
            done = float(status.get("BytesDone") or 0)
            if role == "sender":
                sent.add_metric([seed_id], done)
            elif role == "receiver":
                received.add_metric([seed_id], done)
            expected.add_metric([seed_id, role], float(status.get("BytesTotal") or 0))
            rate.add_metric([seed_id, role], float(status.get("RateBytesPerSec") or 0))
        for (role, state), count in sorted(tally.items()):
            by_state.add_metric([role, state], count)
        yield from (by_state, sent, received, expected, rate)

    def _registration(self) -> Iterator[Metric]:
        registration = self.agent.registration
        state = getattr(registration, "state", None)
        if isinstance(state, str):
            current = GaugeMetricFamily(
                "orchagent_registration_state",
                "1 for the current state of registration with orchestrator.", labels=["state"])
            current.add_metric([state], 1)
            yield current
        last_ping = getattr(registration, "last_ping_at", None)
        if isinstance(last_ping, (int, float)) and not isinstance(last_ping, bool):
            yield GaugeMetricFamily(
                "orchagent_registration_last_ping_timestamp_seconds",
                "Unix time of the last successful ping of orchestrator.", value=last_ping)
