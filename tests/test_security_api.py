"""Security of the HTTP API: access on every route, hostile parameters, secrets, sizes, slow clients.

Routes are enumerated from the Klein app's ``url_map`` and query parameters from the
handlers' source, so a route added later is covered without touching this file.  The
hostile-input cases run against a REAL ``twistd`` agent with real host facts (a MySQL
option file) and a real copy snapshot backend on this machine, and prove with canary
files that nothing reached a shell or a path outside what the operator configured.
"""

from __future__ import annotations

import base64
import gzip
import inspect
import json
import os
import re
import socket
import time
from urllib.parse import quote

from twisted.internet import reactor, task, threads
from twisted.trial import unittest

from orchagent.api import resource
from orchagent.api.resource import AgentAPI
from orchagent.snapshots import mountinfo
from tests.support.daemon import free_port, start_daemon
from tests.test_api_core import TOKEN, make_api

#: Routes anyone may call (the v1 surface: hostname and status; ours: the API description).
PUBLIC = {"/api/hostname", "/api/openapi.json", "/", "/<path:__rest__>"}
_QUERY = re.compile(r"""(?:params\.query|params\.query_list)\(request, ["']([A-Za-z]+)["']""")
_HELPER = re.compile(r"self\.(_[a-z_]+)\(request")


def routes() -> list[dict]:
    """Every route: its rule, methods, path arguments and the query parameters it reads."""
    out = []
    for rule in AgentAPI.app.url_map.iter_rules():
        handler = getattr(AgentAPI, rule.endpoint.removesuffix("_branch"))
        source = inspect.getsource(handler)
        for helper in set(_HELPER.findall(source)):
            if hasattr(AgentAPI, helper):
                source += inspect.getsource(getattr(AgentAPI, helper))
        methods = sorted(m for m in rule.methods if m not in ("HEAD", "OPTIONS"))
        out.append({"rule": rule.rule, "methods": methods, "args": sorted(rule.arguments),
                    "query": sorted(set(_QUERY.findall(source)))})
    return out


def fill(rule: str, values: dict[str, str]) -> str:
    """The rule with each ``<arg>`` / ``<conv:arg>`` replaced by its (quoted) value."""
    return re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", lambda m: quote(values[m.group(1)], safe=""), rule)


#: Benign values: each route must get far enough to reach the parameter under test.
BENIGN = {"pattern": "snap", "lv": "snap1", "seed_id": "901", "target": "127.0.0.1",
          "relaylog": "relay.000001", "start": "4", "cmd": "hello", "path": "/tmp",
          "sourceHost": "db2.example", "binlog": "bin.000001", "stop": "0", "key": "k",
          "source": "datadir", "bytesPerSec": "0", "__rest__": "api/status"}


class RouteEnumerationTests(unittest.TestCase):
    """In memory (StubTreq): every protected route refuses a missing or wrong token."""

    def test_enumeration_finds_the_v1_surface(self):
        rules = {r["rule"] for r in routes()}
        for expected in ("/api/mountlv", "/api/send-mysql-seed-data/<target>/<seed_id>",
                         "/api/apply-relaylog-contents", "/api/custom-commands/<path:cmd>"):
            self.assertIn(expected, rules)
        by_rule = {r["rule"]: r for r in routes()}
        self.assertEqual(by_rule["/api/mysql-binlog-contents"]["query"], ["binlog", "start", "stop"])
        self.assertIn("lv", by_rule["/api/mountlv"]["query"])

    async def test_every_protected_route_refuses_missing_and_wrong_tokens(self):
        agent, http = make_api()
        checked = 0
        for route in routes():
            if route["rule"] in PUBLIC:
                continue
            path = "http://agent" + fill(route["rule"], BENIGN)
            benign_query = {q: BENIGN[q] for q in route["query"]}
            for method in route["methods"]:
                for token in (None, "wrong", TOKEN + "x", TOKEN[:-1], ""):
                    query = dict(benign_query)
                    if token is not None:
                        query["token"] = token
                    response = await http.request(method, path, params=query, data=b"")
                    body = json.loads(await response.content())
                    self.assertEqual((response.code, body), (500, {
                        "Code": "ERROR", "Message": "Invalid token", "Details": None}),
                        f"{method} {route['rule']} token={token!r}")
                    checked += 1
        self.assertGreater(checked, 200)
        # Not one component was reached.
        for component in (agent.host, agent.service, agent.binlogs, agent.snapshots,
                          agent.snapshot_hosts, agent.seeds, agent.runner):
            self.assertEqual(component.calls, [], component)

    async def test_metrics_need_the_token_unless_opened(self):
        _, http = make_api()
        response = await http.get("http://agent/metrics")
        self.assertEqual(response.code, 500)
        self.assertEqual(json.loads(await response.content())["Message"], "Invalid token")


# --- hostile parameters against a real agent -----------------------------------------------

def payloads(canary: str, victim: str) -> list[str]:
    """Shell metacharacters and traversals; any that worked would create ``canary`` or
    touch ``victim``."""
    touch = f"touch {canary}"
    return [
        f";{touch}", f"$({touch})", f"`{touch}`", f"|{touch}", f"&&{touch}", f"\n{touch}",
        f"';{touch};'", f'";{touch};"', f"x$IFS;{touch}", f"$(printf 'x' > {canary})",
        f"{{touch,{canary}}}", f"-oProxyCommand={touch}", f"--version;{touch}",
        "../" * 12 + victim.lstrip("/"), victim, victim + "/../" + os.path.basename(victim),
        "..", "../", "/", "snap1/../../..", "%2e%2e%2f%2e%2e", "\x00" + touch, "x" * 5000,
        "*", "?", "~root", "snap1\r\nX-Injected: 1",
    ]


class HostileInputTests(unittest.TestCase):
    timeout = 240

    async def setUp(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("the copy backend's bind mounts need root")
        base = os.path.abspath(self.mktemp())
        self.base = base
        self.datadir = os.path.join(base, "mysql")
        self.snapshots = os.path.join(base, "snapshots")
        self.mount_point = os.path.join(base, "mnt")
        for d in (self.datadir, self.snapshots, self.mount_point, os.path.join(self.snapshots, "snap1")):
            os.makedirs(d)
        for where in (self.datadir, os.path.join(self.snapshots, "snap1")):
            with open(os.path.join(where, "ibdata1"), "wb") as fh:
                fh.write(b"\0" * 4096)
        self.canary = os.path.join(base, "CANARY")
        self.victim = os.path.join(base, "victim")
        with open(self.victim, "w") as fh:
            fh.write("must survive")
        cnf = os.path.join(base, "my.cnf")
        with open(cnf, "w") as fh:
            fh.write(f"[mysqld]\ndatadir={self.datadir}\nport=3399\nlog-error={base}/error.log\n"
                     f"relay-log={base}/relay\n")
        with open(os.path.join(base, "error.log"), "w") as fh:
            fh.write("2024-01-01 [Note] ready\n")
        self.mounts_before = self._mounts()
        self.agent = await start_daemon(self, {
            "MySQLOptionsFile": cnf, "SnapshotBackend": "copy", "SnapshotDirectory": self.snapshots,
            "SnapshotMountPoint": self.mount_point, "SnapshotVolumesFilter": "snap",
            "MySQLServiceStatusCommand": "false", "MySQLServiceStartCommand": "true",
            "MySQLServiceStopCommand": "true", "PostCopyCommand": "true",
            "MySQLClientCommand": "cat >/dev/null", "CustomCommands": {"hello": "echo hello"},
            "SeedTransferPort": free_port(), "CommandTimeoutSeconds": 20,
        }, directory=os.path.join(base, "agent"))

    def _mounts(self) -> set:
        """Mounts anywhere under this test's directory (other tests may mount elsewhere)."""
        return {(e.mount_point, e.source) for e in mountinfo.read()
                if e.mount_point.startswith(self.base)}

    def _tree(self) -> dict:
        out = {}
        for d, dirs, files in os.walk(self.base):
            if os.path.join(self.base, "agent") in d:
                continue
            for name in dirs + files:
                path = os.path.join(d, name)
                st = os.lstat(path)
                out[os.path.relpath(path, self.base)] = (st.st_mode, st.st_size)
        return out

    async def _send(self, method, path, params, body=b""):
        client = self.agent.http_client
        response = await client.request(method, self.agent.base_url + path, params=params, data=body)
        return response.code, await response.content()

    async def test_metacharacters_and_traversal_change_nothing(self):
        before = self._tree()
        tried = 0
        bodies = []
        for route in routes():
            if not route["args"] and not route["query"] and "POST" not in route["methods"]:
                continue
            names = route["args"] + route["query"]
            for name in names or ["body"]:
                for payload in payloads(self.canary, self.victim):
                    values = dict(BENIGN, **{name: payload})
                    try:
                        path = fill(route["rule"], values)
                    except KeyError as e:
                        self.fail(f"no benign value for {e} of {route['rule']}")
                    query = {q: values[q] for q in route["query"]}
                    query["token"] = self.agent.token
                    for method in route["methods"]:
                        body = b""
                        if method == "POST":
                            body = base64.b64encode(gzip.compress(payload.encode("utf-8", "replace")))
                            if name == "body":
                                body = payload.encode("utf-8", "replace")
                        code, answer = await self._send(method, path, query, body)
                        tried += 1
                        bodies.append(answer)
                        self.assertIn(code, (200, 404, 500), f"{method} {path}")
                        value = json.loads(answer)
                        if code != 200:
                            self.assertEqual(value["Code"], "ERROR")
                            self.assertNotIn("Traceback", value["Message"])
                            self.assertNotIn("internal error", value["Message"], f"{method} {path}")
        await self._send("GET", "/api/abort-seed/901", {"token": self.agent.token})
        self.assertGreater(tried, 800)
        self.assertFalse(os.path.exists(self.canary), "a payload reached a shell")
        with open(self.victim) as fh:
            self.assertEqual(fh.read(), "must survive")
        self.assertEqual(self._mounts(), self.mounts_before, "a payload mounted something")
        after = self._tree()
        changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
        self.assertEqual(changed - {"error.log"}, set(), "files changed under the test's base")
        output = self.agent.output()
        self.assertNotIn(self.agent.token, output)
        for answer in bodies:
            self.assertNotIn(self.agent.token.encode(), answer)
        self.assertNotIn("Traceback", output)

    async def test_token_never_in_error_bodies_or_logs(self):
        token = self.agent.token
        answers = []
        for route in routes():
            for method in route["methods"]:
                for given in (token, token + "x", "x" + token, token.upper()):
                    path = fill(route["rule"], dict(BENIGN, seed_id="9" + token[:3]))
                    code, body = await self._send(method, path, {"token": given, "key": token})
                    answers.append(body)
        for body in answers:
            self.assertNotIn(token.encode(), body)
        await self.agent.stop()
        self.assertNotIn(token, self.agent.output())


class SizeLimitTests(unittest.TestCase):
    """Long URLs, huge headers and huge bodies are refused without the daemon growing."""

    timeout = 120

    async def setUp(self):
        self.agent = await start_daemon(self, {"MySQLClientCommand": "cat >/dev/null"})
        self.pid = self.agent._transport.pid

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as fh:
            return int(re.search(r"VmRSS:\s+(\d+)", fh.read()).group(1)) << 10

    def raw(self, request: bytes, body_bytes: int = 0, chunk: bytes = b"A" * 65536,
            tail: bytes = b"") -> bytes:
        """Send a raw request (and ``body_bytes`` of body) on a blocking socket; the answer."""
        with socket.create_connection(("127.0.0.1", self.agent.port), timeout=20) as s:
            s.sendall(request)
            sent = 0
            try:
                while sent < body_bytes:
                    s.sendall(chunk)
                    sent += len(chunk)
                s.sendall(tail)
            except (BrokenPipeError, ConnectionResetError):
                pass
            answer = b""
            try:
                while True:
                    data = s.recv(65536)
                    if not data:
                        break
                    answer += data
            except (ConnectionResetError, socket.timeout):
                pass
            return answer

    async def test_long_url_and_huge_headers_are_refused(self):
        token = self.agent.token
        long_url = b"GET /api/lv/" + b"a" * 200_000 + f"?token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        answer = await threads.deferToThread(self.raw, long_url)
        self.assertTrue(answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:200])
        headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(2000))
        answer = await threads.deferToThread(
            self.raw, b"GET /api/hostname HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 4"), answer[:200])
        one_huge = b"GET /api/hostname HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 1_000_000 + b"\r\n\r\n"
        answer = await threads.deferToThread(self.raw, one_huge)
        self.assertTrue(answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:200])
        # Still serving.
        self.assertEqual(await self.agent.get("/api/hostname", token=False), (200, self.agent.config.get("AgentHostname") or (await self.agent.get("/api/hostname", token=False))[1]))

    async def test_huge_body_is_refused_before_it_is_read(self):
        before = self.rss()
        size = resource.MAX_BODY_BYTES + (64 << 20)
        head = (f"POST /api/apply-relaylog-contents?token={self.agent.token} HTTP/1.1\r\n"
                f"Host: x\r\nContent-Length: {size}\r\n\r\n").encode()
        started = time.monotonic()
        answer = await threads.deferToThread(self.raw, head, size)
        self.assertLess(time.monotonic() - started, 60)
        self.assertRegex(answer[:40], rb"^HTTP/1.1 (413|500)")
        self.assertIn(b'"Code": "ERROR"', answer)
        self.assertIn(b"larger than", answer)
        grown = self.rss() - before
        self.assertLess(grown, 64 << 20, f"the daemon grew by {grown >> 20} MiB")
        # Chunked bodies are counted too.
        head = (f"POST /api/apply-relaylog-contents?token={self.agent.token} HTTP/1.1\r\n"
                "Host: x\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
        piece = b"10000\r\n" + b"A" * 0x10000 + b"\r\n"
        answer = await threads.deferToThread(self.raw, head, size, piece, b"0\r\n\r\n")
        # The answer may be lost to the reset of a connection cut mid-body; what must hold
        # is that nothing else comes back, the daemon stays small, and it still serves.
        if answer:
            self.assertRegex(answer[:40], rb"^HTTP/1.1 (413|500)")
        self.assertLess(self.rss() - before, 64 << 20)
        self.assertEqual((await self.agent.get("/api/mysql-port"))[0], 200)


class SlowClientTests(unittest.TestCase):
    """Slowloris: hundreds of connections dribbling headers; everyone else is still served."""

    timeout = 120

    async def test_slow_clients_do_not_starve_others(self):
        agent = await start_daemon(self, {})
        slow = []
        for _ in range(300):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", agent.port))
            except BlockingIOError:
                pass
            slow.append(s)
        self.addCleanup(lambda: [s.close() for s in slow])
        await task.deferLater(reactor, 0.3, lambda: None)
        for s in slow:
            try:
                s.send(b"GET /api/status HTTP/1.1\r\nHost: x\r\n")
            except OSError:
                pass
        latencies = []
        for round_ in range(6):
            for s in slow:
                try:
                    s.send(b"X-Slow: %d\r\n" % round_)
                except OSError:
                    pass
            for _ in range(10):
                started = time.monotonic()
                code, body = await agent.get("/api/mysql-port")
                latencies.append(time.monotonic() - started)
                self.assertEqual(code, 200, body)
            await task.deferLater(reactor, 0.2, lambda: None)
        latencies.sort()
        self.assertLess(latencies[int(len(latencies) * 0.99) - 1], 0.5, latencies[-5:])

    def test_idle_connections_time_out(self):
        """The Site's idle timeout: a connection that sends nothing is closed."""
        from orchagent import service

        self.assertIsNotNone(service.HTTP_IDLE_TIMEOUT)
        self.assertLessEqual(service.HTTP_IDLE_TIMEOUT, 60)
        from twisted.internet.testing import StringTransport
        from twisted.internet.task import Clock

        site = service.bounded_site(resource=_Nothing(), reactor=Clock())
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n")
        site.reactor.advance(service.HTTP_IDLE_TIMEOUT + 1)
        self.assertTrue(transport.disconnecting)


class _Nothing:
    isLeaf = True

    def render(self, request):
        return b""
