"""The OpenAPI document: valid, complete (every route, no more), served, and true to access.

When this fails after you added or changed a route in orchagent/api/resource.py, describe
it in orchagent/api/openapi.json (path, method, parameters, responses, and
``"security": [{}]`` if it needs no token).
"""

from __future__ import annotations

import copy
import re

from treq.testing import StubTreq
from twisted.internet import task
from twisted.trial import unittest

from orchagent.agent import Agent
from orchagent.api import openapi
from orchagent.api.resource import AgentAPI
from orchagent.config import Config
from orchagent.token import Token

try:
    from openapi_spec_validator import validate as validate_openapi
except ImportError:  # pragma: no cover - the test extra installs it
    validate_openapi = None

TOKEN = "0penapi-t0ken"
#: Handlers of Klein's catch-all route, which serves the configurable StatusEndpoint.
CATCH_ALL = ("status_or_unknown", "status_or_unknown_branch")
_ARGUMENT = re.compile(r"<(?:[a-z]+:)?([A-Za-z_][A-Za-z0-9_]*)>")


class Anything:
    """Answers every component call with a harmless value: access checks are under test."""

    def __getattr__(self, name):
        async def method(*args, **kwargs):
            return True

        return method

    def is_healthy(self):
        return True


def make_http(**config_values):
    agent = Agent(config=Config(**config_values), reactor=task.Clock(), runner=Anything(),
                  hostname="db1.example", token=Token(TOKEN), service=Anything(),
                  host=Anything(), binlogs=Anything(), snapshots=Anything(),
                  snapshot_hosts=Anything(), seeds=Anything(), registration=Anything())
    return StubTreq(AgentAPI(agent).resource())


def routes() -> set[tuple[str, str]]:
    """(OpenAPI path, method) of every route of the Klein app, StatusEndpoint included."""
    found = {("/api/status", "get")}
    for rule in AgentAPI.app.url_map.iter_rules():
        if rule.endpoint in CATCH_ALL:
            continue
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            found.add((_ARGUMENT.sub(r"{\1}", rule.rule), method.lower()))
    return found


def documented(doc) -> set[tuple[str, str]]:
    return {(path, method) for path, operations in doc["paths"].items() for method in operations}


class DocumentTestCase(unittest.TestCase):
    def test_every_route_documented_and_nothing_else(self):
        in_code, in_doc = routes(), documented(openapi.stored_document())
        self.assertEqual(
            (sorted(in_code - in_doc), sorted(in_doc - in_code)), ([], []),
            "(routes missing from orchagent/api/openapi.json, documented paths no route serves)")

    def test_valid_openapi_3(self):
        if validate_openapi is None:
            raise unittest.SkipTest("openapi-spec-validator is not installed (pip install -e .[test])")
        validate_openapi(copy.deepcopy(openapi.stored_document()))
        for config in (Config(), Config(token_http_header="X-T", http_auth_user="u",
                                        status_endpoint="/health", metrics_open=True)):
            validate_openapi(openapi.document(config))

    def test_path_parameters_named_as_in_the_routes(self):
        for path, operations in openapi.stored_document()["paths"].items():
            in_path = set(re.findall(r"{([^}]+)}", path))
            for method, operation in operations.items():
                declared = {p["name"] for p in operation.get("parameters", []) if p.get("in") == "path"}
                self.assertEqual(declared, in_path, f"{method} {path}")


class ConfiguredDocumentTestCase(unittest.TestCase):
    def test_defaults(self):
        doc = openapi.document(Config())
        self.assertIn("/api/status", doc["paths"])
        self.assertNotIn("tokenHeader", doc["components"]["securitySchemes"])
        self.assertEqual(doc["security"], [{"token": []}])
        self.assertEqual(doc["paths"]["/metrics"]["get"].get("security"), None)
        self.assertEqual(doc["paths"]["/api/hostname"]["get"]["security"], [{}])

    def test_adjusted_to_the_configuration(self):
        doc = openapi.document(Config(status_endpoint="/health/agent", token_http_header="X-Agent-Token",
                                      http_auth_user="orch", metrics_open=True))
        self.assertNotIn("/api/status", doc["paths"])
        self.assertEqual(doc["paths"]["/health/agent"]["get"]["operationId"], "status")
        self.assertEqual(doc["components"]["securitySchemes"]["tokenHeader"]["name"], "X-Agent-Token")
        self.assertEqual(doc["security"], [{"token": [], "basicAuth": []}, {"tokenHeader": [], "basicAuth": []}])
        self.assertEqual(doc["paths"]["/metrics"]["get"]["security"], [{"basicAuth": []}])
        self.assertEqual(doc["paths"]["/api/hostname"]["get"]["security"], [{"basicAuth": []}])
        self.assertEqual(openapi.stored_document()["paths"]["/metrics"]["get"].get("security"), None,
                         "the stored document must not change")


class ServedTestCase(unittest.TestCase):
    async def test_served_without_token(self):
        http = make_http(status_endpoint="/health")
        response = await http.get("http://agent/api/openapi.json")
        self.assertEqual(response.code, 200)
        self.assertEqual(await response.json(), openapi.document(Config(status_endpoint="/health")))

    async def test_basic_auth_still_applies(self):
        http = make_http(http_auth_user="u", http_auth_password="p")
        self.assertEqual((await http.get("http://agent/api/openapi.json")).code, 401)
        self.assertEqual((await http.get("http://agent/api/openapi.json", auth=("u", "p"))).code, 200)

    async def test_security_matches_the_running_api(self):
        """Each documented operation, called without a token: the token-free ones answer,
        every other one refuses with "Invalid token"."""
        for metrics_open in (False, True):
            http = make_http(metrics_open=metrics_open)
            doc = openapi.document(Config(metrics_open=metrics_open))
            for path, operations in doc["paths"].items():
                url = "http://agent" + re.sub(r"{[^}]+}", "1", path)
                for method, operation in operations.items():
                    response = await http.request(method.upper(), url)
                    body = await response.text()
                    public = operation.get("security", doc["security"]) == [{}]
                    refused = response.code == 500 and "Invalid token" in body
                    self.assertEqual(public, not refused, f"{method} {path}: {response.code} {body[:200]}")
