"""The stand-in orchestrator's own checks: a shape checker that lets mistakes through
would make the daemon-level GetAgent test worthless."""

from __future__ import annotations

import json

from klein import Klein
from twisted.trial import unittest
from treq.testing import StubTreq

from tests.support.orchestrator import (
    GET_AGENT_CALLS, INT, LOGICAL_VOLUME, MOUNT, StandInOrchestrator, Submission, shape_problems)

GOOD_MOUNT = {"Path": "/mnt/s", "Device": "", "LVPath": "", "FileSystem": "", "IsMounted": False,
              "DiskUsage": 0, "MySQLDataPath": "", "MySQLDiskUsage": 0}


class ShapeTests(unittest.TestCase):
    def test_matching_values(self):
        self.assertEqual(shape_problems(GOOD_MOUNT, MOUNT), [])
        volume = {"Name": "s1", "GroupName": "vg", "Path": "/dev/vg/s1", "IsSnapshot": True,
                  "SnapshotPercent": 3}
        self.assertEqual(shape_problems([volume, dict(volume, SnapshotPercent=2.5)], [LOGICAL_VOLUME]), [])
        self.assertEqual(shape_problems([], [str]), [])

    def test_bool_is_not_an_integer_and_int_is_not_a_bool(self):
        self.assertEqual(shape_problems(True, INT), ["answer: expected an integer, got True"])
        self.assertEqual(shape_problems(1, bool), ["answer: expected bool, got 1"])
        self.assertEqual(shape_problems(1.5, INT), ["answer: expected an integer, got 1.5"])

    def test_object_fields_exactly(self):
        bad = dict(GOOD_MOUNT, DiskUsage="0", Extra=1)
        del bad["Path"]
        self.assertEqual(sorted(shape_problems(bad, MOUNT, "mount")),
                         ["mount.DiskUsage: expected an integer, got '0'",
                          "mount: missing field Path", "mount: unexpected field Extra"])

    def test_list_items(self):
        self.assertEqual(shape_problems(["a", 2], [str], "tail"), ["tail[1]: expected str, got 2"])
        self.assertEqual(shape_problems("a", [str]), ["answer: expected a list, got 'a'"])


class FakeAgent:
    """Answers every GetAgent call with a wrong type or an error, and records the calls."""

    app = Klein()

    def __init__(self):
        self.seen = []

    @app.route("/api/<name>")
    def any_call(self, request, name):
        self.seen.append((name, request.args.get(b"token")))
        if name == "mysql-port":
            request.setResponseCode(500)
            return json.dumps({"Code": "ERROR", "Message": "no port", "Details": None})
        return json.dumps("x")


class GetAgentTests(unittest.TestCase):
    async def test_calls_in_order_with_the_token_and_reports_every_mismatch(self):
        fake = FakeAgent()
        result = await StandInOrchestrator().get_agent(
            Submission("db1", 3002, "tok/en"), http_client=StubTreq(fake.app.resource()))
        self.assertEqual(fake.seen, [(name, [b"tok/en"]) for name, _ in GET_AGENT_CALLS])
        problems = result.problems()
        self.assertEqual(len(problems), 9)
        self.assertIn("mysql-port: HTTP 500", result["mysql-port"].problems[0])
        with self.assertRaises(AssertionError):
            result.assert_shapes()
