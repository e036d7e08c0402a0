"""Registration with orchestrator, driven by task.Clock against the stand-in in memory."""

from __future__ import annotations

from twisted.internet import task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from treq.testing import StubTreq

from orchagent.config import Config
from orchagent.registration.client import Registration
from orchagent.token import Token
from tests.support.orchestrator import StandInOrchestrator, Submission

TOKEN = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"


class RegistrationTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.orchestrator = StandInOrchestrator()
        self.stub = StubTreq(self.orchestrator.resource())
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def start(self, **settings) -> Registration:
        values = dict(agents_server="http://orch.example", agents_server_port=":3001",
                      http_port=3002, continuous_poll_seconds=60,
                      resubmit_agent_interval_minutes=60, status_bad_seconds=300,
                      http_timeout_seconds=10)
        values.update(settings)
        registration = Registration(Config(**values), self.clock, "db1.example", Token(TOKEN),
                                    http_client=self.stub)
        registration.startService()
        self.stub.flush()
        self.addCleanup(self.stop, registration)
        return registration

    def stop(self, registration):
        if registration.running:
            registration.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def advance(self, seconds: float, step: float = 1.0) -> None:
        """Move the clock in steps, so calls scheduled on the way run at their time."""
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end:
            self.clock.advance(min(step, end - self.clock.seconds()))
            self.stub.flush()

    def messages(self) -> list[str]:
        return [formatEvent(e) for e in self.events
                if e.get("log_namespace") == "orchagent.registration.client"]

    def call_times(self, kind: str, until: float, step: float = 0.5) -> list[float]:
        """Advance to ``until`` in small steps, noting when each call of ``kind`` arrived."""
        times, seen = [], self.orchestrator.count(kind)
        while self.clock.seconds() < until:
            self.advance(step, step)
            while self.orchestrator.count(kind) > seen:
                seen += 1
                times.append(self.clock.seconds())
        return times

    def test_submits_at_start_then_pings(self):
        registration = self.start()
        self.assertEqual(self.orchestrator.submissions, [Submission("db1.example", 3002, TOKEN)])
        self.assertEqual(self.orchestrator.calls, ["submit-agent", "agent-ping"])
        self.assertEqual(set(self.orchestrator.hosts), {"orch.example:3001"})
        self.assertEqual(registration.state, "registered")
        self.assertEqual(registration.last_ping_at, 0)

    def test_resubmits_every_interval(self):
        self.start(resubmit_agent_interval_minutes=5, continuous_poll_seconds=1000)
        self.assertEqual(self.call_times("submit-agent", 16 * 60, step=10), [300, 600, 900])
        self.assertEqual(len(self.orchestrator.submissions), 4)

    def test_pings_every_poll_interval(self):
        registration = self.start(continuous_poll_seconds=15)
        self.assertEqual(self.call_times("agent-ping", 50), [15, 30, 45])
        self.assertEqual(registration.last_ping_at, 45)

    def test_failed_submit_is_retried_with_backoff(self):
        self.orchestrator.failing = 503
        registration = self.start()
        self.assertEqual(registration.state, "unreachable")
        times = self.call_times("submit-agent", 250)
        self.assertEqual(times, [1, 3, 7, 15, 31, 63, 123, 183, 243])
        self.assertEqual(self.orchestrator.count("agent-ping"), 0)
        self.orchestrator.failing = None
        self.advance(60)
        self.assertEqual(registration.state, "registered")
        self.assertEqual(len(self.orchestrator.submissions), 1)
        self.assertEqual(self.orchestrator.count("agent-ping"), 1)
        # Success (at 303) resets the backoff: the next failure is retried after 1 s again.
        self.orchestrator.failing = 503
        times = self.call_times("submit-agent", 303 + 3600 + 4)
        self.assertEqual(times, [3903, 3904, 3906])

    def test_error_answer_with_status_200_is_a_failure(self):
        self.orchestrator.failing = 200
        registration = self.start()
        self.assertEqual(registration.state, "unreachable")
        self.assertIn("orchestrator answered ERROR: stand-in failing", "\n".join(self.messages()))

    def test_failed_ping_is_retried_with_backoff_capped_at_the_poll_interval(self):
        registration = self.start(continuous_poll_seconds=10)
        self.orchestrator.failing = 500
        self.assertEqual(self.call_times("agent-ping", 50), [10, 11, 13, 17, 25, 35, 45])
        self.assertEqual(registration.state, "unreachable")
        self.assertEqual(registration.last_ping_at, 0)
        self.orchestrator.failing = None
        self.advance(10)
        self.assertEqual(registration.state, "registered")
        self.assertEqual(registration.last_ping_at, 55)
        self.assertEqual(self.call_times("agent-ping", 90), [65, 75, 85])

    def test_one_log_line_per_change_of_state(self):
        registration = self.start(continuous_poll_seconds=10)
        self.orchestrator.failing = 500
        self.advance(300)
        self.orchestrator.failing = None
        self.advance(20)
        self.orchestrator.failing = 500
        self.advance(100)
        self.assertEqual(registration.state, "unreachable")
        self.assertGreater(self.orchestrator.count("agent-ping"), 20)
        messages = self.messages()
        self.assertEqual(len(messages), 5, messages)
        self.assertIn("registering with orchestrator at http://orch.example:3001 as db1.example:3002", messages[0])
        self.assertIn("registered with orchestrator", messages[1])
        self.assertIn("unreachable (agent-ping failed: HTTP 500)", messages[2])
        self.assertIn("answers again", messages[3])
        self.assertIn("unreachable", messages[4])

    def test_token_is_never_logged(self):
        self.orchestrator.failing = 404
        self.start(continuous_poll_seconds=10)
        self.advance(100)
        self.orchestrator.failing = None
        self.advance(100)
        text = "\n".join(formatEvent(e) + repr(e) for e in self.events)
        self.assertIn("submit-agent", text)
        self.assertNotIn(TOKEN, text)

    def test_timeout(self):
        self.orchestrator.hanging = True
        registration = self.start(http_timeout_seconds=7)
        self.assertEqual(registration.state, "registering")
        self.advance(7)
        self.assertEqual(registration.state, "unreachable")
        self.assertIn("no answer within 7s", "\n".join(self.messages()))
        self.assertEqual(self.orchestrator.count("submit-agent"), 1)
        self.advance(1)
        self.assertEqual(self.orchestrator.count("submit-agent"), 2)

    def test_status_turns_bad_after_status_bad_seconds_without_a_ping(self):
        registration = self.start(continuous_poll_seconds=10, status_bad_seconds=30)
        self.assertTrue(registration.is_healthy())
        self.orchestrator.failing = 500
        self.advance(30)
        self.assertTrue(registration.is_healthy())
        self.advance(1)
        self.assertFalse(registration.is_healthy())
        self.orchestrator.failing = None
        self.advance(10)
        self.assertEqual(registration.last_ping_at, 35)  # the retry after 25
        self.assertTrue(registration.is_healthy())

    def test_status_before_the_first_ping_counts_from_start(self):
        self.clock.advance(1000)
        self.orchestrator.failing = 500
        registration = self.start(status_bad_seconds=20)
        self.assertIsNone(registration.last_ping_at)
        self.advance(20)
        self.assertTrue(registration.is_healthy())
        self.advance(1)
        self.assertFalse(registration.is_healthy())

    def test_zero_intervals_turn_the_calls_off(self):
        registration = self.start(continuous_poll_seconds=0, resubmit_agent_interval_minutes=0)
        self.assertEqual(registration.state, "registered")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.advance(10_000)
        self.assertEqual(self.orchestrator.calls, ["submit-agent"])

    def test_standalone(self):
        registration = self.start(agents_server="")
        self.assertEqual(registration.state, "standalone")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.advance(100_000)
        self.assertEqual(self.orchestrator.calls, [])
        self.assertTrue(registration.is_healthy())
        self.assertIsNone(registration.last_ping_at)
        self.assertIn("standalone", self.messages()[0])

    def test_stop_cancels_timers_and_requests_in_flight(self):
        registration = self.start(continuous_poll_seconds=10)
        self.orchestrator.hanging = True
        self.advance(10)
        self.assertEqual(self.orchestrator.count("agent-ping"), 2)
        self.assertTrue(self.clock.getDelayedCalls())
        stopped = registration.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.successResultOf(stopped)
        state = registration.state
        self.advance(1000)
        self.assertEqual(self.orchestrator.count("agent-ping"), 2)
        self.assertEqual(registration.state, state)
