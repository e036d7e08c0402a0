"""The stand-in orchestrator's v1 seed sequence, in memory against simulated hosts.

These pin the sequence itself (order, refusals, clean-up), so that the end-to-end drop-in
proof (test_e2e_seed) runs exactly orchestrator's steps against real agents.
"""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial import unittest

from tests.support.fake_agents import FakeNetwork
from tests.support.orchestrator import (BAILING_OUT, GET_AGENT_CALLS, StandInOrchestrator,
                                        Submission, V1Seed)

SNAPSHOT = {"ibdata1": 600, "db/t.ibd": 400}


def get_agent(hostname):
    return [f"{hostname} {endpoint}" for endpoint, _ in GET_AGENT_CALLS]


class V1SequenceTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.net = FakeNetwork(self.clock, token="tok", bytes_per_second=100)
        self.db1 = self.net.add("db1", running=True, files={"ibdata1": 5},
                                snapshots=[("snap-2", 0.0, SNAPSHOT), ("snap-1", 0.0, {})])
        self.db2 = self.net.add("db2", files={"ibdata1": 300})
        self.orchestrator = StandInOrchestrator()

    def seed(self, **options):
        options.setdefault("wait_before_send", 2.0)
        options.setdefault("poll_interval", 1.0)
        seeder = self.seeder = V1Seed(
            self.orchestrator, Submission("db2.example", 3002, "tok"), Submission("db1.example", 3002, "tok"),
            77, http_client=self.net.client(), reactor=self.clock, **options)
        d = defer.ensureDeferred(seeder.run())
        while not d.called and self.clock.seconds() < 600:
            self.clock.advance(0.25)
        return self.successResultOf(d)

    def test_sequence(self):
        outcome = self.seed()
        self.assertTrue(outcome.ok, outcome.reason)
        self.assertEqual(outcome.problems, ())
        calls = list(outcome.calls)
        head = (get_agent("db2.example") + get_agent("db1.example")
                + ["db1.example mountlv?lv=%2Fsnapshots%2Fsnap-2"] + get_agent("db1.example")
                + ["db2.example delete-mysql-datadir"] + get_agent("db2.example")
                + ["db2.example receive-mysql-seed-data/77",
                   "db1.example send-mysql-seed-data/db2.example/77"])
        self.assertEqual(calls[:len(head)], head)
        tail = ["db2.example seed-command-completed/77", "db2.example seed-command-succeeded/77",
                "db2.example post-copy/?sourceHost=db1.example", "db1.example umount",
                "db2.example mysql-start"]
        self.assertEqual(calls[-len(tail):], tail)
        polls = calls[len(head):-len(tail)]
        # 1000 bytes at 100 B/s polled every second: about ten polls of GetAgent + completed.
        self.assertEqual(len(polls) % 10, 9)
        self.assertTrue(9 <= (len(polls) + 1) // 10 <= 12, len(polls))
        self.assertEqual((self.db2.datadir, self.db2.running, self.db1.mounted), (SNAPSHOT, True, None))
        self.assertEqual(self.db2.post_copy_sources, ["db1.example"])

    def test_waits_before_send(self):
        sent_at = []
        self.db1.on_change = lambda change: change[0] == "send" and sent_at.append(self.clock.seconds())
        received_at = []
        self.db2.on_change = lambda change: change[0] == "receive" and received_at.append(self.clock.seconds())
        self.assertTrue(self.seed(wait_before_send=2.0).ok)
        self.assertEqual(sent_at[0] - received_at[0], 2.0)

    def test_refuses_a_running_target(self):
        self.db2.running = True
        outcome = self.seed()
        self.assertFalse(outcome.ok)
        self.assertIn("MySQL is running on target host db2.example", outcome.reason)
        self.assertEqual(list(outcome.calls), get_agent("db2.example") + get_agent("db1.example"))
        self.assertEqual((self.db1.changes, self.db2.changes), ([], []))

    def test_refuses_without_snapshots(self):
        self.db1.snapshots = []
        outcome = self.seed()
        self.assertIn("no snapshots found on source host db1.example", outcome.reason)
        self.assertEqual((self.db1.changes, self.db2.changes), ([], []))

    def test_not_enough_space_unmounts(self):
        self.db2.available = 100
        outcome = self.seed()
        self.assertIn("not enough space on db2.example: 1000 needed, 400 available", outcome.reason)
        self.assertEqual(self.db1.mutations, ["mountlv", "umount"])
        self.assertEqual(self.db2.mutations, ["delete-mysql-datadir"], "v1 deletes before it checks")

    def test_stalled_seed_is_aborted(self):
        self.db1.on_change = lambda change: change[0] == "send" and self.db1.kill()
        outcome = self.seed(max_stalled_polls=3)
        self.assertEqual(outcome.reason, BAILING_OUT)
        self.assertEqual(self.seeder.stale_polls, 4, "aborted past the limit, as orchestrator")
        self.assertEqual(self.db2.seeds["77"].state, "aborted")
        self.assertEqual(outcome.calls[-3:], ("db1.example abort-seed/77", "db2.example abort-seed/77",
                                             "db1.example umount"))
        self.assertEqual(len(outcome.problems), 2, "the dead source answered neither")

    def test_stale_polls_are_counted_and_never_reset(self):
        # mysql-du stalls for a poll or two, then grows, over and over: never ten polls in
        # a row, but orchestrator's count is never reset, so the eleventh equal poll ends it.
        script = iter([100, 100, 100, 200, 200, 300, 300, 300, 400, 400, 500, 500, 500,
                       600, 600, 700, 700, 700, 800, 800, 900, 900] + [950] * 50)

        async def usage():
            return next(script) if "77" in self.db2.seeds else None

        self.patch(self.db2.agent.seeds, "datadir_usage", usage)
        self.net.bytes_per_second = 10
        outcome = self.seed()
        self.assertEqual(outcome.reason, BAILING_OUT)
        self.assertEqual(self.seeder.polled_usage, [100, 100, 100, 200, 200, 300, 300, 300, 400, 400,
                                                    500, 500, 500, 600, 600, 700, 700, 700])
        self.assertEqual(self.seeder.stale_polls, 11)

    def test_completed_but_failed_aborts_at_once(self):
        def fail_receive(change):
            if change[0] == "send":
                side = self.db2.seeds["77"]
                side.state, side.error = "failed", "refused"
        self.db1.on_change = fail_receive
        outcome = self.seed()
        self.assertEqual(outcome.reason, BAILING_OUT)
        self.assertEqual(len(self.seeder.polled_usage), 1)
