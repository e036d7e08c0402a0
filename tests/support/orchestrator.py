"""A stand-in for orchestrator: its agents server, and its way of calling an agent back.

Example::

    from tests.support.orchestrator import StandInOrchestrator

    orchestrator = StandInOrchestrator()
    url = await orchestrator.serve(self)                 # http://127.0.0.1:PORT, closed at cleanup
    agent = await start_daemon(self, {"AgentsServer": url, "ContinuousPollSeconds": 1})
    await orchestrator.wait_for("agent-ping")            # submit-agent came first
    submission = orchestrator.submissions[-1]            # hostname, port, token as submitted
    result = await orchestrator.get_agent(submission)    # the 9 GetAgent calls, in order
    result.assert_shapes()                               # every answer has the v1 JSON type

In memory (no socket): ``StubTreq(orchestrator.resource())`` as the registration
client's ``http_client``.

What it answers: submit-agent with the host name (as orchestrator does), agent-ping with
``"OK"``, and agent-seed-details (of orchestrator's own API) for the seeds given to
:meth:`StandInOrchestrator.add_seed`.  Set :attr:`StandInOrchestrator.failing` to an HTTP status to make both fail with an
ERROR body (200 is what orchestrator itself answers when a submit fails), or
:attr:`StandInOrchestrator.hanging` to never answer.

The agent-side checks are data: :data:`GET_AGENT_CALLS` lists (endpoint, expected shape)
in orchestrator's order, shapes written with :data:`LOGICAL_VOLUME`, :data:`MOUNT`,
:data:`INT`, ``[shape]`` for a list and plain ``str``/``bool``.  Longer scripts (the seed
sequence) add their own lists of calls and reuse :meth:`StandInOrchestrator.call_agent`
and :func:`shape_problems`.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import attrs
from klein import Klein
from twisted.internet import defer, endpoints
from twisted.web import server


class IntShape:
    """JSON integer (int64 in Go): a Python int that is not a bool."""


class FloatShape:
    """JSON number (float64 in Go): int or float, not bool."""


INT = IntShape
FLOAT = FloatShape

LOGICAL_VOLUME = {"Name": str, "GroupName": str, "Path": str, "IsSnapshot": bool,
                  "SnapshotPercent": FLOAT}
MOUNT = {"Path": str, "Device": str, "LVPath": str, "FileSystem": str, "IsMounted": bool,
         "DiskUsage": INT, "MySQLDataPath": str, "MySQLDiskUsage": INT}

#: orchestrator's GetAgent, in its order.
GET_AGENT_CALLS: tuple[tuple[str, Any], ...] = (
    ("available-snapshots-local", [str]),
    ("available-snapshots", [str]),
    ("lvs-snapshots", [LOGICAL_VOLUME]),
    ("mount", MOUNT),
    ("mysql-status", bool),
    ("mysql-port", INT),
    ("mysql-du", INT),
    ("mysql-datadir-available-space", INT),
    ("mysql-error-log-tail", [str]),
)


def shape_problems(value: Any, shape: Any, where: str = "answer") -> list[str]:
    """What about ``value`` does not match ``shape`` (empty when it matches exactly)."""
    if shape is INT:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return [] if ok else [f"{where}: expected an integer, got {value!r}"]
    if shape is FLOAT:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return [] if ok else [f"{where}: expected a number, got {value!r}"]
    if shape in (str, bool):
        return [] if type(value) is shape else [f"{where}: expected {shape.__name__}, got {value!r}"]
    if isinstance(shape, list):
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {value!r}"]
        problems = []
        for i, item in enumerate(value):
            problems += shape_problems(item, shape[0], f"{where}[{i}]")
        return problems
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {value!r}"]
        problems = [f"{where}: missing field {k}" for k in shape if k not in value]
        problems += [f"{where}: unexpected field {k}" for k in value if k not in shape]
        for k, s in shape.items():
            if k in value:
                problems += shape_problems(value[k], s, f"{where}.{k}")
        return problems
    raise TypeError(f"unknown shape {shape!r}")


@attrs.frozen
class Submission:
    """One submit-agent call: what orchestrator would store about the agent."""

    hostname: str
    port: int
    token: str


@attrs.frozen
class Answer:
    """One call to the agent: endpoint, HTTP status, parsed body, shape problems."""

    endpoint: str
    status: int
    body: Any
    problems: tuple[str, ...]


@attrs.frozen
class CallResult:
    """The answers to a sequence of calls, in order."""

    answers: tuple[Answer, ...]

    def __getitem__(self, endpoint: str) -> Answer:
        return next(a for a in self.answers if a.endpoint == endpoint)

    def problems(self) -> list[str]:
        return [problem for answer in self.answers for problem in answer.problems]

    def assert_shapes(self) -> None:
        """AssertionError listing every answer that is not a 200 of the expected shape."""
        problems = self.problems()
        if problems:
            raise AssertionError("agent answers do not match the v1 surface:\n  " + "\n  ".join(problems))


class StandInOrchestrator:
    """orchestrator's agents server (records calls) and its agent client (checks answers)."""

    app = Klein()

    def __init__(self):
        self.submissions: list[Submission] = []
        self.pings = 0
        self.calls: list[str] = []
        #: The Host header of every call, to check the agents-server URL an agent used.
        self.hosts: list[str] = []
        #: HTTP status to answer with instead of success (None: succeed).
        self.failing: int | None = None
        #: Never answer (the request stays open until the client gives up).
        self.hanging = False
        self._waiters: list[tuple[str, int, defer.Deferred]] = []
        self._hung: list[defer.Deferred] = []
        #: Seeds orchestrator runs, by id: what its API's agent-seed-details answers.
        self.seeds: dict[str, dict] = {}

    def add_seed(self, seed_id: str, target: str, source: str) -> None:
        """Record a seed as orchestrator's SubmitSeedEntry does (before it drives the agents)."""
        self.seeds[str(seed_id)] = {
            "SeedId": int(seed_id), "TargetHostname": target, "SourceHostname": source,
            "StartTimestamp": "2026-01-01 00:00:00", "EndTimestamp": "", "IsComplete": False,
            "IsSuccessful": False}

    # --- agents server ---------------------------------------------------------------------

    def resource(self):
        return self.app.resource()

    def _answer(self, request, kind: str, value: Any):
        self.calls.append(kind)
        self.hosts.append((request.getHeader(b"host") or b"").decode("ascii", "replace"))
        self._notify()
        if self.hanging:
            d = defer.Deferred()
            self._hung.append(d)
            return d
        request.setHeader(b"Content-Type", b"application/json")
        if self.failing is not None:
            request.setResponseCode(self.failing)
            return json.dumps({"Code": "ERROR", "Message": "stand-in failing", "Details": None}).encode()
        return json.dumps(value).encode()

    @app.route("/api/submit-agent/<hostname>/<int:port>/<token>", methods=["GET"])
    def submit_agent(self, request, hostname, port, token):
        if self.failing is None and not self.hanging:
            self.submissions.append(Submission(hostname, port, token))
        return self._answer(request, "submit-agent", hostname)

    @app.route("/api/agent-ping", methods=["GET"])
    def agent_ping(self, request):
        if self.failing is None and not self.hanging:
            self.pings += 1
        return self._answer(request, "agent-ping", "OK")

    @app.route("/api/agent-seed-details/<seed_id>", methods=["GET"])
    def agent_seed_details(self, request, seed_id):
        """orchestrator's main API (port 3000 there, the same port here): the seeds with that
        id, as a list of SeedOperation (empty for an id it does not know)."""
        seed = self.seeds.get(seed_id)
        return self._answer(request, "agent-seed-details", [seed] if seed else [])

    def count(self, kind: str) -> int:
        """How many calls of ``kind`` ("submit-agent" or "agent-ping") arrived, failed ones too."""
        return self.calls.count(kind)

    def wait_for(self, kind: str, count: int = 1, timeout: float = 15.0, reactor=None) -> defer.Deferred:
        """Fires once ``count`` calls of ``kind`` arrived (TimeoutError after ``timeout``)."""
        if reactor is None:
            from twisted.internet import reactor
        d = defer.Deferred()
        self._waiters.append((kind, count, d))
        self._notify()
        return d.addTimeout(timeout, reactor)

    def _notify(self) -> None:
        for waiter in list(self._waiters):
            kind, count, d = waiter
            if d.called:
                self._waiters.remove(waiter)
            elif self.count(kind) >= count:
                self._waiters.remove(waiter)
                d.callback(self.count(kind))

    async def serve(self, testcase, reactor=None, tls_options=None, interface: str = "127.0.0.1",
                    url_host: str | None = None) -> str:
        """Listen on a free loopback port (HTTPS with ``tls_options``); the agents-server URL.

        ``url_host`` is the host written in the URL (default ``interface``), e.g.
        "localhost" to test certificate host names.  Stops listening, and drops hung
        requests, at the test's cleanup.
        """
        if reactor is None:
            from twisted.internet import reactor
        if tls_options is None:
            endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface=interface)
            scheme = "http"
        else:
            endpoint = endpoints.SSL4ServerEndpoint(reactor, 0, tls_options, interface=interface)
            scheme = "https"
        site = server.Site(self.resource())
        site.noisy = False
        port = await endpoint.listen(site)
        testcase.addCleanup(port.stopListening)
        testcase.addCleanup(self._drop_hung)
        return f"{scheme}://{url_host or interface}:{port.getHost().port}"

    def _drop_hung(self) -> None:
        for d in self._hung:
            if not d.called:
                d.callback(b"")
        self._hung.clear()

    # --- calling an agent, as orchestrator does ---------------------------------------------

    async def call_agent(self, submission: Submission, calls, http_client=None,
                         scheme: str = "http", host: str | None = None) -> CallResult:
        """Make ``calls`` ((endpoint, shape) pairs) in order against the submitted agent.

        Like orchestrator: ``{scheme}://{hostname}:{port}/api/{endpoint}?token={token}``
        (``&token=`` when the endpoint already has a query), ``host`` overriding the
        submitted name.  Every answer is recorded; a 200 is checked against its shape, and
        anything else is a problem.
        """
        if http_client is None:
            http_client = _plain_client()
        base = f"{scheme}://{host or submission.hostname}:{submission.port}/api/"
        answers = []
        for endpoint, shape in calls:
            separator = "&" if "?" in endpoint else "?"
            url = f"{base}{endpoint}{separator}token={quote(submission.token, safe='')}"
            response = await http_client.get(url)
            raw = await response.content()
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
                problems = [f"{endpoint}: not JSON: {body[:200]!r}"]
            else:
                if response.code == 200:
                    problems = shape_problems(body, shape, endpoint)
                else:
                    problems = [f"{endpoint}: HTTP {response.code}: {body!r}"]
            answers.append(Answer(endpoint, response.code, body, tuple(problems)))
        return CallResult(tuple(answers))

    async def get_agent(self, submission: Submission | None = None, **options) -> CallResult:
        """orchestrator's GetAgent against ``submission`` (default: the latest)."""
        if submission is None:
            submission = self.submissions[-1]
        return await self.call_agent(submission, GET_AGENT_CALLS, **options)


def _plain_client():
    from twisted.internet import reactor
    from twisted.web.client import Agent, HTTPConnectionPool
    from treq.client import HTTPClient

    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


# --- orchestrator's seed sequence (v1), for the drop-in proof ------------------------------


class SeedAborted(Exception):
    """The v1 seed sequence stopped; the message says where, as orchestrator would log it."""


@attrs.frozen
class SeedOutcome:
    """What :class:`V1Seed` did: every call as ``"host endpoint"`` (token omitted), in order."""

    ok: bool
    reason: str
    calls: tuple[str, ...]
    problems: tuple[str, ...]


#: What orchestrator logs for a seed it gives up on, stalled or failed alike.
BAILING_OUT = "10 iterations have passed without progress. Bailing out."


class V1Seed:
    """orchestrator's seed of ``target`` from ``source``, exactly its v1 sequence.

    The steps of the reference ("How orchestrator drives an agent"): GetAgent of both;
    refuse when MySQL runs on the target, the source has no snapshot volume or its mount
    point is taken; mountlv of the first snapshot's Path and GetAgent(source) for its
    MySQLDiskUsage; delete-mysql-datadir and GetAgent(target), failing (and unmounting)
    when the target has less free space than that; receive, wait ``wait_before_send``
    (orchestrator's SeedWaitSecondsBeforeSend, 2 s), send; then the poll loop, finally
    post-copy/?sourceHost=, umount on the source, mysql-start on the target.

    The poll loop is orchestrator's, flaws included: poll at once, then every
    ``poll_interval`` (30 s in orchestrator): GetAgent(target); a poll whose mysql-du
    **equals** the previous poll's (the first compares with 0) adds one to the stale
    count, which is never reset; seed-command-completed, and once completed
    seed-command-succeeded; completed-but-not-succeeded, or a stale count above
    ``max_stalled_polls`` (10), aborts both sides and unmounts, with the same message
    either way (:data:`BAILING_OUT`).  A stale count past the limit fails even the poll
    that saw the seed complete.

    Like orchestrator, it never reads an HTTP error status: an error answer is recorded
    in ``problems`` and read as the zero value (false, 0, nothing), and the sequence goes
    on.  Agents are reached as orchestrator does: by the hostname and port they
    submitted, with the token they submitted.  No call of orchagent's own extensions is
    made.
    """

    def __init__(self, orchestrator: StandInOrchestrator, target: Submission, source: Submission,
                 seed_id: int, *, wait_before_send: float = 2.0, poll_interval: float = 30.0,
                 max_stalled_polls: int = 10, http_client=None, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.orchestrator = orchestrator
        self.target = target
        self.source = source
        self.seed_id = seed_id
        self.wait_before_send = wait_before_send
        self.poll_interval = poll_interval
        self.max_stalled_polls = max_stalled_polls
        self.http_client = http_client
        self.reactor = reactor
        self.calls: list[str] = []
        self.problems: list[str] = []
        #: The target's mysql-du at each poll, and the stale count at the end.
        self.polled_usage: list[int] = []
        self.stale_polls = 0

    async def _calls(self, agent: Submission, calls) -> CallResult:
        result = await self.orchestrator.call_agent(agent, calls, http_client=self.http_client)
        for answer in result.answers:
            self.calls.append(f"{agent.hostname} {answer.endpoint}")
            self.problems += answer.problems
        return result

    async def _call(self, agent: Submission, endpoint: str, shape: Any = bool) -> Any:
        """One call; its body, or None for an error answer (orchestrator never sees one)."""
        answer = (await self._calls(agent, [(endpoint, shape)])).answers[0]
        return answer.body if answer.status == 200 else None

    async def get_agent(self, agent: Submission) -> dict[str, Any]:
        """GetAgent: the nine calls; the answers by endpoint (a failed call is None)."""
        result = await self._calls(agent, GET_AGENT_CALLS)
        return {a.endpoint: (a.body if a.status == 200 else None) for a in result.answers}

    async def _sleep(self, seconds: float) -> None:
        from twisted.internet import task

        await task.deferLater(self.reactor, seconds, lambda: None)

    async def run(self) -> SeedOutcome:
        try:
            await self._seed()
        except SeedAborted as e:
            return SeedOutcome(False, str(e), tuple(self.calls), tuple(self.problems))
        return SeedOutcome(True, "", tuple(self.calls), tuple(self.problems))

    async def _abort(self, reason: str) -> None:
        """Abort both sides and unmount; like orchestrator, go on when an agent is down."""
        for agent, endpoint, shape in ((self.source, f"abort-seed/{self.seed_id}", bool),
                                       (self.target, f"abort-seed/{self.seed_id}", bool),
                                       (self.source, "umount", MOUNT)):
            try:
                await self._calls(agent, [(endpoint, shape)])
            except Exception as e:
                self.calls.append(f"{agent.hostname} {endpoint}")
                self.problems.append(f"{agent.hostname} {endpoint}: no answer: {e}")
        raise SeedAborted(reason)

    async def _seed(self) -> None:
        target, source = self.target, self.source
        target_agent = await self.get_agent(target)
        source_agent = await self.get_agent(source)
        if target_agent["mysql-status"]:
            raise SeedAborted(f"MySQL is running on target host {target.hostname}; stop it first")
        if not source_agent["lvs-snapshots"]:
            raise SeedAborted(f"no snapshots found on source host {source.hostname}")
        if (source_agent["mount"] or {}).get("IsMounted"):
            raise SeedAborted(f"snapshot mount point on {source.hostname} is already in use")

        await self._call(source, f"mountlv?lv={quote(source_agent['lvs-snapshots'][0]['Path'], safe='')}",
                         MOUNT)
        source_agent = await self.get_agent(source)
        needed = (source_agent["mount"] or {}).get("MySQLDiskUsage", 0)

        await self._call(target, "delete-mysql-datadir")
        target_agent = await self.get_agent(target)
        available = target_agent["mysql-datadir-available-space"] or 0
        if needed > available:
            await self._calls(source, [("umount", MOUNT)])
            raise SeedAborted(f"not enough space on {target.hostname}: {needed} needed, "
                              f"{available} available")

        await self._call(target, f"receive-mysql-seed-data/{self.seed_id}")
        await self._sleep(self.wait_before_send)
        await self._call(source, f"send-mysql-seed-data/{quote(target.hostname, safe='')}/{self.seed_id}")

        bytes_copied = 0
        while True:
            target_agent = await self.get_agent(target)
            usage = target_agent["mysql-du"] or 0
            self.polled_usage.append(usage)
            if usage == bytes_copied:
                self.stale_polls += 1
            bytes_copied = usage
            complete = failed = False
            if await self._call(target, f"seed-command-completed/{self.seed_id}"):
                complete = True
                if not await self._call(target, f"seed-command-succeeded/{self.seed_id}"):
                    failed = True
            if self.stale_polls > self.max_stalled_polls:
                failed = True
            if failed:
                await self._abort(BAILING_OUT)
            if complete:
                break
            await self._sleep(self.poll_interval)

        await self._call(target, f"post-copy/?sourceHost={quote(source.hostname, safe='')}")
        await self._call(source, "umount", MOUNT)
        await self._call(target, "mysql-start")
