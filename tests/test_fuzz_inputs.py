"""Property tests: arbitrary input never crashes the config loader or the API.

The config loader either builds a Config or raises ConfigError naming the file; the API
answers every request with JSON — a v1 value or the v1 error body — never a traceback.
"""

from __future__ import annotations

import json
import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.trial import unittest

from orchagent import config
from orchagent.errors import ConfigError
from tests.test_api_core import TOKEN, make_api

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)
config_docs = st.dictionaries(
    st.sampled_from([f.key for f in config.FIELDS] + ["Unknown", ""]), json_values, max_size=8)


class ConfigFuzzTests(unittest.TestCase):
    @settings(max_examples=300, deadline=None)
    @given(doc=config_docs | json_values)
    def test_loader_accepts_or_names_the_problem(self, doc):
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
            json.dump(doc, fh)
        try:
            try:
                c = config.load(fh.name)
            except ConfigError as e:
                self.assertIn(fh.name, e.message)
            else:
                self.assertIsInstance(c.http_port, int)
        finally:
            os.unlink(fh.name)

    @settings(max_examples=100, deadline=None)
    @given(raw=st.binary(max_size=200))
    def test_loader_survives_arbitrary_bytes(self, raw):
        with tempfile.NamedTemporaryFile("wb", suffix=".json", delete=False) as fh:
            fh.write(raw)
        try:
            try:
                config.load(fh.name)
            except ConfigError:
                pass
        finally:
            os.unlink(fh.name)


ROUTES = ["/api/lvs", "/api/lvs/{x}", "/api/lv", "/api/lv/{x}", "/api/mountlv", "/api/removelv",
          "/api/du", "/api/receive-mysql-seed-data/{x}", "/api/send-mysql-seed-data/{x}/{y}",
          "/api/abort-seed/{x}", "/api/seed-status/{x}", "/api/seed-rate-limit/{x}",
          "/api/custom-commands/{x}", "/api/mysql-binlog-contents",
          "/api/mysql-relaylog-contents-tail/{x}/{y}", "/api/post-copy/", "/api/{x}", "/{x}"]
segment = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)
query = st.dictionaries(st.sampled_from(["lv", "path", "sourceHost", "binlog", "start", "stop",
                                          "key", "source", "bytesPerSec", "token", "x"]),
                        st.text(max_size=30), max_size=4)


class ApiFuzzTests(unittest.TestCase):
    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(route=st.sampled_from(ROUTES), x=segment, y=segment, params=query,
           with_token=st.booleans())
    def test_every_answer_is_json(self, route, x, y, params, with_token):
        agent, http = make_api()
        path = route.replace("{x}", x.replace("/", "_")).replace("{y}", y.replace("/", "_"))
        if with_token:
            params = dict(params, token=TOKEN)

        async def request():
            response = await http.get("http://agent" + _quote(path), params=params)
            return response.code, await response.content()

        code, body = _run(defer.ensureDeferred(request()))
        self.assertIn(code, (200, 404, 500))
        value = json.loads(body)
        if code != 200:
            self.assertEqual(value["Code"], "ERROR")
            self.assertNotIn("Traceback", value["Message"])
            self.assertNotIn("internal error", value["Message"])


def _quote(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="/")


def _run(d: defer.Deferred):
    """StubTreq answers synchronously once flushed; take the result out of the Deferred."""
    results = []
    d.addBoth(results.append)
    if not results:
        raise AssertionError("request did not finish synchronously")
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]
