"""The API's own behaviour, in memory: access control, error mapping, routing, parameters.

Components are small recording fakes: these tests are about the HTTP layer, and each
component has its own tests against real MariaDB, btrfs and TCP.
"""

from __future__ import annotations

import base64
import gzip
import json
import socket

from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet import task
from twisted.trial import unittest
from twisted.web.client import readBody
from twisted.web.http_headers import Headers

from orchagent.agent import Agent, build_agent
from orchagent.api.resource import AgentAPI
from orchagent.config import Config
from orchagent.errors import NotFound, Refused
from orchagent.token import Token

TOKEN = "t0ken"


class Recorder:
    """Answers any async method with a canned value and records the call."""

    def __init__(self, **answers):
        self.answers = answers
        self.calls = []

    def __getattr__(self, name):
        if name.startswith("_") or name in ("answers", "calls"):
            raise AttributeError(name)

        async def method(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            answer = self.answers.get(name)
            if isinstance(answer, Exception):
                raise answer
            return answer

        return method


class SeedsRecorder(Recorder):
    """The seed surface: its one synchronous method answers from memory, as the real one."""

    def all_status(self):
        return []


class Registration:
    healthy = True

    def is_healthy(self):
        return self.healthy


def make_api(**config_values):
    config = Config(**config_values)
    runner = Recorder()
    agent = Agent(
        config=config, reactor=task.Clock(), runner=runner, hostname="db1.example",
        token=Token(TOKEN), service=Recorder(is_running=True, stop=True, start=True),
        host=Recorder(port=3306, disk_usage=42, post_copy=True),
        binlogs=Recorder(apply_relaylog_contents=None, binlog_contents="", relaylog_contents_tail=""),
        snapshots=Recorder(remove=True, get_volume=NotFound("no volume named 'x'"),
                           list_volumes=[], list_snapshots=[], mount=NotFound("no volume")),
        snapshot_hosts=Recorder(local=["a"], anywhere=["a", "b"]),
        seeds=SeedsRecorder(receive=True, abort=None, send=Refused("snapshot not mounted"),
                       status=NotFound("no such seed"), set_rate_limit=NotFound("no such seed")),
        registration=Registration(),
    )
    api = AgentAPI(agent)
    return agent, StubTreq(api.resource())


class ApiTestCase(unittest.TestCase):
    def setUp(self):
        self.agent, self.http = make_api()

    async def get(self, path, http=None, **kwargs):
        response = await (http or self.http).get("http://agent" + path, **kwargs)
        body = await response.content()
        return response.code, json.loads(body)

    def assertError(self, outcome, text, codes=(500,)):
        code, body = outcome
        self.assertIn(code, codes)
        self.assertEqual(set(body), {"Code", "Message", "Details"})
        self.assertEqual(body["Code"], "ERROR")
        self.assertIsNone(body["Details"])
        self.assertIn(text, body["Message"])


class AccessTests(ApiTestCase):
    async def test_hostname_needs_no_token(self):
        self.assertEqual(await self.get("/api/hostname"), (200, "db1.example"))

    async def test_default_hostname_is_the_kernels(self):
        # The Go agent's os.Hostname(): the kernel's name, not a reverse-DNS one, which on a
        # host whose name maps to 127.0.1.1 is "localhost".
        self.patch(socket, "getfqdn", lambda name="": "localhost")
        self.patch(socket, "gethostname", lambda: "db7")
        agent = build_agent(Config(), task.Clock(), runner=Recorder(), token=Token(TOKEN))
        self.assertEqual(agent.hostname, "db7")
        self.assertEqual(agent.registration.hostname, "db7")
        http = StubTreq(AgentAPI(agent).resource())
        self.assertEqual(await self.get("/api/hostname", http=http), (200, "db7"))
        agent = build_agent(Config(agent_hostname="db7.dc1"), task.Clock(), runner=Recorder(),
                            token=Token(TOKEN))
        self.assertEqual(agent.hostname, "db7.dc1")

    async def test_token_required_everywhere_else(self):
        for path in ["/api/mysql-port", "/api/lvs", "/api/mount", "/api/mysql-status",
                     "/api/abort-seed/1", "/api/custom-commands/x", "/api/datacenter"]:
            self.assertError(await self.get(path), "Invalid token")
            self.assertError(await self.get(path + "?token=wrong"), "Invalid token")
        self.assertEqual(await self.get(f"/api/mysql-port?token={TOKEN}"), (200, 3306))

    async def test_token_header_when_configured(self):
        _, http = make_api(token_http_header="X-Agent-Token")
        ok = await self.get("/api/mysql-port", http=http, headers={"X-Agent-Token": TOKEN})
        self.assertEqual(ok, (200, 3306))
        self.assertError(await self.get("/api/mysql-port", http=http,
                                        headers={"X-Agent-Token": "nope"}), "Invalid token")
        # Without the key configured the header means nothing.
        self.assertError(await self.get("/api/mysql-port", headers={"X-Agent-Token": TOKEN}),
                         "Invalid token")

    async def test_basic_auth(self):
        _, http = make_api(http_auth_user="orc", http_auth_password="pw")
        response = await http.get(f"http://agent/api/mysql-port?token={TOKEN}")
        self.assertEqual(response.code, 401)
        await response.content()
        ok = await self.get(f"/api/mysql-port?token={TOKEN}", http=http, auth=("orc", "pw"))
        self.assertEqual(ok, (200, 3306))
        response = await http.get("http://agent/api/hostname", auth=("orc", "bad"))
        self.assertEqual(response.code, 401)
        await response.content()

    async def test_status_endpoint_flips(self):
        self.assertEqual(await self.get("/api/status"), (200, "OK"))
        self.agent.registration.healthy = False
        self.assertEqual(await self.get("/api/status"), (500, "BAD"))

    async def test_status_endpoint_is_configurable(self):
        _, http = make_api(status_endpoint="/health")
        self.assertEqual(await self.get("/health", http=http), (200, "OK"))
        code, _ = await self.get("/api/status", http=http)
        self.assertEqual(code, 404)


class RoutingTests(ApiTestCase):
    async def test_unknown_endpoint_is_json_404(self):
        code, body = await self.get(f"/api/nope?token={TOKEN}")
        self.assertEqual(code, 404)
        self.assertIn("/api/nope", body["Message"])

    async def test_post_copy_with_orchestrators_trailing_slash(self):
        for path in ["/api/post-copy/", "/api/post-copy"]:
            code, body = await self.get(f"{path}?token={TOKEN}&sourceHost=db2.example")
            self.assertEqual((code, body), (200, True))
        self.assertEqual(self.agent.host.calls[-1], ("post_copy", ("db2.example",), {}))

    async def test_errors_of_components_become_v1_errors(self):
        self.assertError(await self.get(f"/api/lv?lv=x&token={TOKEN}"), "no volume named 'x'")
        self.assertError(await self.get(f"/api/send-mysql-seed-data/db2/7?token={TOKEN}"),
                         "snapshot not mounted")

    async def test_unknown_custom_command(self):
        self.assertError(await self.get(f"/api/custom-commands/nope?token={TOKEN}"),
                         "unknown custom command 'nope'")

    async def test_bad_custom_command_names_are_v1_errors(self):
        # Never a 404: orchestrator calls custom-commands/{name} with the configured name.
        for raw, name in [("a;b", "a;b"), ("a%3Bb", "a;b"), ("a%2Fb", "a/b"), ("a/b", "a/b"),
                          ("a;b/", "a;b/"), ("a%20b", "a b")]:
            self.assertError(await self.get(f"/api/custom-commands/{raw}?token={TOKEN}"),
                             f"invalid command name {name!r}")

    async def test_lists_and_values(self):
        self.assertEqual(await self.get(f"/api/available-snapshots?token={TOKEN}"), (200, ["a", "b"]))
        self.assertEqual(await self.get(f"/api/mysql-status?token={TOKEN}"), (200, True))
        self.assertEqual(await self.get(f"/api/abort-seed/12?token={TOKEN}"), (200, True))
        self.assertEqual(self.agent.seeds.calls[-1], ("abort", ("12",), {}))


class GzipTests(ApiTestCase):
    """Answers are gzip-encoded when the client asks, as the Go agent's (orchestrator
    always sends Accept-Encoding: gzip); read here raw, without treq's decoding."""

    async def raw_get(self, path, accept_encoding=None):
        headers = Headers({b"Accept-Encoding": [accept_encoding]} if accept_encoding else {})
        agent = RequestTraversalAgent(self.api.resource())
        response = await agent.request(b"GET", b"http://agent" + path, headers)
        return response, await readBody(response)

    def setUp(self):
        super().setUp()
        self.api = AgentAPI(self.agent)

    async def test_gzip_only_when_asked(self):
        for path, code in [(f"/api/mysql-port?token={TOKEN}".encode(), 200),
                           (b"/api/mysql-port", 500), (b"/api/no-such-thing", 404),
                           (b"/api/status", 200)]:
            plain_response, plain = await self.raw_get(path)
            self.assertEqual(plain_response.code, code, path)
            self.assertIsNone(plain_response.headers.getRawHeaders(b"Content-Encoding"), path)
            for accept in (b"gzip", b"deflate, gzip", b"gzip, deflate, br"):
                response, body = await self.raw_get(path, accept)
                self.assertEqual(response.code, code, path)
                self.assertEqual(response.headers.getRawHeaders(b"Content-Encoding"), [b"gzip"])
                self.assertEqual(body[:2], b"\x1f\x8b")
                self.assertEqual(json.loads(gzip.decompress(body)), json.loads(plain), path)
        # Each counted once for /metrics, under the route it matched.
        body, _ = self.api.metrics.exposition(b"text/plain")
        for counted in [b'{code="200",endpoint="/api/mysql-port",method="GET"} 4.0',
                        b'{code="500",endpoint="/api/mysql-port",method="GET"} 4.0',
                        b'{code="404",endpoint="other",method="GET"} 4.0']:
            self.assertIn(counted, body)


class BadInputTests(ApiTestCase):
    """Hostile or malformed input is refused before any component sees it."""

    hostile = ["a;touch /tmp/x", "$(id)", "`id`", "../../etc/passwd", "a b", "x|y"]

    async def test_volume_names(self):
        for value in self.hostile:
            self.assertError(await self.get(f"/api/removelv?token={TOKEN}", params={"lv": value}),
                             "invalid volume name")
        self.assertError(await self.get(f"/api/removelv?token={TOKEN}"), "missing parameter lv")
        self.assertEqual(self.agent.snapshots.calls, [])

    async def test_seed_ids_and_hosts(self):
        for value in self.hostile:
            quoted = value.replace("/", "%2F").replace(" ", "%20")
            # A '/' makes another path: no such endpoint (404), still the v1 error body.
            codes = (404,) if "/" in value else (500,)
            self.assertError(await self.get(f"/api/receive-mysql-seed-data/{quoted}?token={TOKEN}"),
                             "seed" if "/" not in value else "no such endpoint", codes)
            self.assertError(await self.get(f"/api/send-mysql-seed-data/{quoted}/1?token={TOKEN}"),
                             "host" if "/" not in value else "no such endpoint", codes)
        self.assertError(await self.get(f"/api/post-copy/?token={TOKEN}", params={"sourceHost": "a;b"}),
                         "invalid host")
        self.assertEqual(self.agent.seeds.calls, [])
        self.assertEqual(self.agent.host.calls, [])

    async def test_du_path(self):
        self.assertError(await self.get(f"/api/du?token={TOKEN}&path=relative"), "absolute path")
        self.assertError(await self.get(f"/api/du?token={TOKEN}&path=/var/../etc"), "'..'")
        self.assertError(await self.get(f"/api/du?token={TOKEN}"), "missing parameter path")
        self.assertEqual(await self.get(f"/api/du?token={TOKEN}&path=/var/lib"), (200, 42))

    async def test_repeated_parameter(self):
        self.assertError(await self.get(f"/api/removelv?token={TOKEN}&lv=a&lv=b"), "more than once")

    async def test_binlog_parameters(self):
        self.assertError(await self.get(f"/api/mysql-binlog-contents?token={TOKEN}"), "binlog")
        self.assertError(await self.get(
            f"/api/mysql-binlog-contents?token={TOKEN}&binlog=b.1&start=-4"), "non-negative integer")

    async def test_apply_relaylog_contents_body(self):
        url = f"http://agent/api/apply-relaylog-contents?token={TOKEN}"
        response = await self.http.post(url, data=b"%%% not base64")
        self.assertError((response.code, json.loads(await response.content())), "base64")
        response = await self.http.post(url, data=b"")
        self.assertError((response.code, json.loads(await response.content())), "empty")
        payload = base64.b64encode(b"\x1f\x8bdata")
        response = await self.http.post(url, data=payload)
        self.assertEqual((response.code, json.loads(await response.content())), (200, "OK"))
        self.assertEqual(self.agent.binlogs.calls, [("apply_relaylog_contents", (b"\x1f\x8bdata",), {})])

    async def test_rate_limit_parameter(self):
        self.assertError(await self.get(f"/api/seed-rate-limit/1?token={TOKEN}&bytesPerSec=fast"),
                         "non-negative integer")
