"""/metrics: Prometheus exposition of one agent, its access rule and what it counts.

The API runs in memory (StubTreq); OS commands run for real through the ProcessRunner so
the command metrics come from real exits.  Seeds and registration are small fakes that
follow the components' contracts (``all_status()`` list of dicts; ``state`` and
``last_ping_at``), because what is tested here is the reading at scrape time.
"""

from __future__ import annotations

import json

import prometheus_client
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet import reactor, task
from twisted.trial import unittest

from orchagent.agent import Agent
from orchagent.api.resource import AgentAPI
from orchagent.config import Config
from orchagent.metrics import AgentMetrics
from orchagent.process import ProcessRunner
from orchagent.token import Token

TOKEN = "metrics-t0ken"


class Volumes:
    async def get_volume(self, name):
        from orchagent.snapshots.model import LogicalVolume

        return LogicalVolume(name=name, group_name="vg0", path=f"/dev/vg0/{name}",
                             is_snapshot=True, snapshot_percent=1.0)


class Seeds:
    """The seed manager's status contract, with a list the test changes between scrapes."""

    def __init__(self, statuses=()):
        self.statuses = list(statuses)

    def all_status(self):
        return list(self.statuses)


class Registration:
    def __init__(self, **attributes):
        self.__dict__.update(attributes)

    def is_healthy(self):
        return True


def make_agent(runner=None, seeds=None, registration=None, **config_values) -> Agent:
    return Agent(
        config=Config(**config_values), reactor=task.Clock(),
        runner=runner if runner is not None else ProcessRunner(reactor),
        hostname="db1.example", token=Token(TOKEN), service=None, host=None, binlogs=None,
        snapshots=Volumes(), snapshot_hosts=None, seeds=seeds if seeds is not None else Seeds(),
        registration=registration if registration is not None else Registration(),
    )


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, sorted label items): value} of an exposition."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


class MetricsTestCase(unittest.TestCase):
    def setUp(self):
        self.agent = make_agent()
        self.api = AgentAPI(self.agent)
        self.http = StubTreq(self.api.resource())

    async def get(self, path, http=None, **kwargs):
        response = await (http or self.http).get("http://agent" + path, **kwargs)
        return response.code, response.headers, (await response.content()).decode()

    async def scrape(self, http=None) -> dict[tuple, float]:
        code, _, body = await self.get(f"/metrics?token={TOKEN}", http=http)
        self.assertEqual(code, 200, body)
        return samples(body)

    # --- access ------------------------------------------------------------------------------

    async def test_token_required(self):
        code, _, body = await self.get("/metrics")
        self.assertEqual((code, json.loads(body)["Message"]), (500, "Invalid token"))
        code, _, body = await self.get("/metrics?token=wrong")
        self.assertEqual((code, json.loads(body)["Message"]), (500, "Invalid token"))
        code, headers, body = await self.get(f"/metrics?token={TOKEN}")
        self.assertEqual(code, 200)
        self.assertTrue(headers.getRawHeaders(b"Content-Type")[0].startswith(b"text/plain"))
        self.assertIn("# TYPE orchagent_http_requests_total counter", body)

    async def test_metrics_open_lifts_only_the_token(self):
        api = AgentAPI(make_agent(metrics_open=True, http_auth_user="u", http_auth_password="p"))
        http = StubTreq(api.resource())
        code, _, _ = await self.get("/metrics", http=http)
        self.assertEqual(code, 401)
        code, _, body = await self.get("/metrics", http=http, auth=("u", "p"))
        self.assertEqual(code, 200)
        self.assertIn("orchagent_http_requests_total", body)
        # Every other endpoint still wants the token.
        code, _, body = await self.get("/api/lv/x", http=http, auth=("u", "p"))
        self.assertEqual((code, json.loads(body)["Message"]), (500, "Invalid token"))

    async def test_openmetrics_when_asked(self):
        code, headers, body = await self.get(
            f"/metrics?token={TOKEN}", headers={"Accept": "application/openmetrics-text"})
        self.assertEqual(code, 200)
        self.assertTrue(headers.getRawHeaders(b"Content-Type")[0].startswith(b"application/openmetrics-text"))
        self.assertTrue(body.endswith("# EOF\n"))

    # --- API requests ------------------------------------------------------------------------

    async def test_requests_counted_by_route_pattern_and_status(self):
        await self.get(f"/api/lv/vg0/snap-secret-name?token={TOKEN}")
        await self.get(f"/api/lv/other?token={TOKEN}")
        await self.get("/api/lv/other?token=bad")
        await self.get("/api/hostname")
        await self.get("/api/status")
        await self.get("/api/no-such-thing/42")
        await self.http.request("BREW", "http://agent/api/hostname")
        code, _, body = await self.get(f"/metrics?token={TOKEN}")
        found = samples(body)

        def count(endpoint, code, method="GET"):
            key = ("orchagent_http_requests_total",
                   (("code", code), ("endpoint", endpoint), ("method", method)))
            return found.get(key)

        self.assertEqual(count("/api/lv/<path:lv>", "200"), 2.0)
        self.assertEqual(count("/api/lv/<path:lv>", "500"), 1.0)
        self.assertEqual(count("/api/hostname", "200"), 1.0)
        self.assertEqual(count("/api/status", "200"), 1.0)
        self.assertEqual(count("other", "404"), 1.0)
        self.assertEqual(count("other", "405", method="other"), 1.0)
        # Raw paths (volume names, ids) never become label values.
        self.assertNotIn("snap-secret-name", body)
        self.assertNotIn("no-such-thing", body)

    async def test_configured_status_endpoint_is_its_own_label(self):
        api = AgentAPI(make_agent(status_endpoint="/health/agent"))
        http = StubTreq(api.resource())
        await self.get("/health/agent", http=http)
        found = await self.scrape(http)
        self.assertEqual(found["orchagent_http_requests_total",
                               (("code", "200"), ("endpoint", "/health/agent"), ("method", "GET"))], 1.0)

    # --- commands ----------------------------------------------------------------------------

    async def test_commands_counted_by_program_with_failures_and_durations(self):
        runner = self.agent.runner
        await runner.run(["true"])
        await runner.run(["true"])
        await runner.run(["false"], check=False)
        await runner.shell("exit 3", args=["--password=hunter2"], check=False)
        await runner.run(["sleep", "5"], timeout=0.2, check=False)
        found = await self.scrape()

        def value(name, command):
            return found.get((name, (("command", command),)))

        self.assertEqual(value("orchagent_commands_total", "true"), 2.0)
        self.assertEqual(value("orchagent_commands_total", "false"), 1.0)
        self.assertEqual(value("orchagent_commands_total", "shell"), 1.0)
        self.assertEqual(value("orchagent_command_failures_total", "false"), 1.0)
        self.assertEqual(value("orchagent_command_failures_total", "shell"), 1.0)
        self.assertEqual(value("orchagent_command_failures_total", "sleep"), 1.0)
        self.assertIsNone(value("orchagent_command_failures_total", "true"))
        self.assertEqual(value("orchagent_command_duration_seconds_count", "true"), 2.0)
        sleep_seconds = value("orchagent_command_duration_seconds_sum", "sleep")
        self.assertGreaterEqual(sleep_seconds, 0.2)
        self.assertLess(sleep_seconds, 5.0)
        code, _, body = await self.get(f"/metrics?token={TOKEN}")
        self.assertNotIn("hunter2", body)
        self.assertNotIn("exit 3", body)

    # --- seeds and registration, read at scrape time ------------------------------------------

    async def test_seeds_read_at_scrape_time(self):
        seeds = Seeds([
            {"SeedId": "7", "Role": "sender", "State": "running", "BytesTotal": 1000,
             "BytesDone": 400, "RateBytesPerSec": 100},
            {"SeedId": "8", "Role": "sender", "State": "completed", "BytesTotal": 50,
             "BytesDone": 50, "RateBytesPerSec": 0},
            {"SeedId": "9", "Role": "receiver", "State": "running", "BytesTotal": 0,
             "BytesDone": 123, "RateBytesPerSec": 10},
        ])
        http = StubTreq(AgentAPI(make_agent(seeds=seeds)).resource())
        found = await self.scrape(http)
        self.assertEqual(found["orchagent_seeds", (("role", "sender"), ("state", "running"))], 1.0)
        self.assertEqual(found["orchagent_seeds", (("role", "sender"), ("state", "completed"))], 1.0)
        self.assertEqual(found["orchagent_seeds", (("role", "receiver"), ("state", "running"))], 1.0)
        self.assertEqual(found["orchagent_seed_sent_bytes", (("seed_id", "7"),)], 400.0)
        self.assertEqual(found["orchagent_seed_sent_bytes", (("seed_id", "8"),)], 50.0)
        self.assertEqual(found["orchagent_seed_received_bytes", (("seed_id", "9"),)], 123.0)
        self.assertNotIn(("orchagent_seed_received_bytes", (("seed_id", "7"),)), found)
        self.assertEqual(found["orchagent_seed_expected_bytes", (("role", "sender"), ("seed_id", "7"))], 1000.0)
        self.assertEqual(found["orchagent_seed_rate_bytes_per_second", (("role", "receiver"), ("seed_id", "9"))], 10.0)

        seeds.statuses[0] = dict(seeds.statuses[0], State="completed", BytesDone=1000, RateBytesPerSec=0)
        found = await self.scrape(http)
        self.assertEqual(found["orchagent_seeds", (("role", "sender"), ("state", "completed"))], 2.0)
        self.assertNotIn(("orchagent_seeds", (("role", "sender"), ("state", "running"))), found)
        self.assertEqual(found["orchagent_seed_sent_bytes", (("seed_id", "7"),)], 1000.0)

    async def test_registration_state_and_last_ping(self):
        registration = Registration(state="registered", last_ping_at=1_700_000_000.5)
        http = StubTreq(AgentAPI(make_agent(registration=registration)).resource())
        found = await self.scrape(http)
        self.assertEqual(found["orchagent_registration_state", (("state", "registered"),)], 1.0)
        self.assertEqual(found["orchagent_registration_last_ping_timestamp_seconds", ()], 1_700_000_000.5)
        registration.state, registration.last_ping_at = "unreachable", None
        found = await self.scrape(http)
        self.assertEqual(found["orchagent_registration_state", (("state", "unreachable"),)], 1.0)
        self.assertNotIn(("orchagent_registration_state", (("state", "registered"),)), found)
        self.assertNotIn(("orchagent_registration_last_ping_timestamp_seconds", ()), found)

    async def test_components_without_the_attributes(self):
        """A registration without state (standalone fakes) and seeds without all_status."""

        class NoSeeds:
            pass

        http = StubTreq(AgentAPI(make_agent(seeds=NoSeeds(), registration=Registration())).resource())
        found = await self.scrape(http)
        self.assertFalse([k for k in found if k[0].startswith(("orchagent_seed", "orchagent_registration"))])

    # --- one registry per agent ---------------------------------------------------------------

    async def test_registry_is_per_agent_not_global(self):
        other = AgentMetrics(make_agent())
        await self.get("/api/hostname")
        self.assertEqual(
            self.api.metrics.registry.get_sample_value(
                "orchagent_http_requests_total",
                {"endpoint": "/api/hostname", "method": "GET", "code": "200"}), 1.0)
        self.assertIsNone(other.registry.get_sample_value(
            "orchagent_http_requests_total",
            {"endpoint": "/api/hostname", "method": "GET", "code": "200"}))
        self.assertNotIn(b"orchagent_", prometheus_client.generate_latest(prometheus_client.REGISTRY))
