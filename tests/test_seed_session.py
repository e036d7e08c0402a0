"""A session (orchagent.seed.session) ends as a whole: its streams close and the work
waiting for it stops at its next step."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from orchagent.seed.session import Ended, Session


class FakeStream:
    def __init__(self):
        self.closed = None

    def close(self, abort=False):
        self.closed = "aborted" if abort else "closed"


class SessionTests(unittest.TestCase):
    def test_work_waiting_when_the_session_ends_stops_at_its_next_step(self):
        session, worker = Session("a"), defer.Deferred()
        steps, failures = [], []

        async def work():
            steps.append(await session.wait(worker))
            steps.append("after")

        session.run(work(), failures.append)
        session.end()
        worker.callback("late result")
        self.assertEqual(steps, [])
        self.assertEqual(failures, [], "an ended session is not an error")

    def test_work_of_a_live_session_goes_on_and_its_errors_are_reported(self):
        session, worker = Session("a"), defer.Deferred()
        steps, failures = [], []

        async def work():
            steps.append(await session.wait(worker))
            raise ValueError("broken")

        session.run(work(), failures.append)
        worker.callback("result")
        self.assertEqual(steps, ["result"])
        self.assertEqual([f.type for f in failures], [ValueError])

    def test_ending_closes_its_streams_unless_they_said_their_last_word(self):
        session, control, data = Session("a"), FakeStream(), FakeStream()
        session.add(control, "flow0")
        session.add(data, "flow1")
        self.assertIs(session.control, control)
        session.end(abort=True)
        self.assertEqual((control.closed, data.closed), ("aborted", "aborted"))
        self.assertEqual((session.streams, session.flows), ([], {}))
        self.assertRaises(Ended, session.check)
        quiet, stream = Session("b"), FakeStream()
        quiet.add(stream)
        quiet.end(close=False)
        self.assertIsNone(stream.closed)
