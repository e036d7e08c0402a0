"""The ``orchagent`` controller against simulated hosts behind the real agent API, in memory.

Every host is a real AgentAPI (token, paths, parameters, v1 errors) with modelled
components (tests.support.fake_agents); time is a task.Clock, so a seed of ten simulated
seconds runs in milliseconds.  The end-to-end tests (test_e2e_seed) run the same
commands against real agents, MariaDB and btrfs in network namespaces.
"""

from __future__ import annotations

import io
import json
import os

from twisted.internet import defer, task
from twisted.trial import unittest

from orchagent.cli.main import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_REFUSED,
                                EXIT_REPLICATION, EXIT_USAGE, Controller, build_parser, run)
from orchagent.cli.settings import load_settings
from orchagent.errors import CommandFailed
from tests.support.fake_agents import FakeNetwork

SNAPSHOT = {"ibdata1": 600, "db/t.ibd": 400}
OLD_DATA = {"ibdata1": 300, "db/old.ibd": 200}
STEP = 0.25


class ControllerTestCase(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.net = FakeNetwork(self.clock, token="fleet-token", bytes_per_second=100)
        self.home = os.path.abspath(self.mktemp())
        os.makedirs(self.home)
        self.token_file = os.path.join(self.home, "token")
        with open(self.token_file, "w") as fh:
            fh.write("fleet-token\n")
        self.env = {"ORCHAGENT_HOME": self.home, "ORCHAGENT_TOKEN_FILE": self.token_file}

    def add_source(self, name="db1", snapshots=None, **kwargs):
        if snapshots is None:
            snapshots = [("snap-2", 0.0, SNAPSHOT), ("snap-1", 0.0, {"ibdata1": 10})]
        return self.net.add(name, running=True, files={"ibdata1": 900}, snapshots=snapshots, **kwargs)

    def add_target(self, name="db2", **kwargs):
        kwargs.setdefault("files", OLD_DATA)
        return self.net.add(name, **kwargs)

    def drive(self, d, until=3600.0, at=None):
        """Advance the clock until ``d`` fires; ``at`` maps a time to a callable run then."""
        pending = dict(at or {})
        while not d.called and self.clock.seconds() < until:
            for when in sorted(pending):
                if self.clock.seconds() >= when:
                    pending.pop(when)()
            self.clock.advance(STEP)
        self.assertTrue(d.called, "the command did not finish")
        return self.successResultOf(d)

    def cli(self, *argv, at=None):
        out, err = io.StringIO(), io.StringIO()
        d = defer.ensureDeferred(run(list(argv), self.clock, self.env, out, err,
                                     http_factory=self.net.http_for))
        code = self.drive(d, at=at)
        return code, out.getvalue(), err.getvalue()

    def controller(self):
        """A Controller as the console script builds it, for tests that press Ctrl-C."""
        out, err = io.StringIO(), io.StringIO()
        controller = Controller(load_settings(self.env), self.clock, out, err, self.net.http_for)
        return controller, out, err

    def records(self):
        directory = os.path.join(self.home, "seeds")
        return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


class SeedTests(ControllerTestCase):
    def test_whole_seed(self):
        db1, db2 = self.add_source(), self.add_target()
        code, out, err = self.cli("seed", "--target", "db2", "--source", "db1")
        self.assertEqual(code, EXIT_OK, err)
        self.assertEqual(db2.datadir, SNAPSHOT)
        self.assertTrue(db2.running)
        self.assertEqual(db2.aside, [OLD_DATA], "the kept datadir was swapped out, not lost")
        self.assertIsNone(db1.mounted)
        seed_id = next(iter(db2.seeds))
        self.assertEqual(db1.changes, [("mountlv", "/snapshots/snap-2"), ("send", "db2", seed_id),
                                       ("umount",)])
        self.assertEqual(db2.changes, [("receive", seed_id), ("post-copy", "db1.example"),
                                       ("mysql-start",)])
        # One random key, the same on both sides, never printed.
        key = db2.seeds[seed_id].key
        self.assertEqual(db1.seeds[seed_id].key, key)
        self.assertGreaterEqual(len(key), 40)
        self.assertNotIn(key, out + err)
        self.assertIn(f"seed {seed_id}: db1 (db1.example) -> db2 (db2.example), snapshot snap-2", out)
        self.assertIn("100.0%", out)
        self.assertIn("1000 B / 1000 B", out)
        self.assertIn(f"seed {seed_id} done: MySQL answers on db2", out)
        self.assertEqual(self.records(), [], "a finished seed leaves no record")

    def test_progress_lines_are_spaced_in_a_log(self):
        self.add_source(), self.add_target()
        code, out, _ = self.cli("seed", "--target", "db2", "--source", "db1")
        self.assertEqual(code, EXIT_OK)
        lines = [line for line in out.splitlines() if line.startswith("progress:")]
        # A 10 s copy polled every second: a line at the start, every 5 s, and on completion.
        self.assertTrue(2 <= len(lines) <= 4, lines)
        self.assertIn("completed", lines[-1])

    def test_json_summary(self):
        self.add_source(), self.add_target()
        code, out, err = self.cli("seed", "--target", "db2", "--source", "db1", "--json")
        self.assertEqual(code, EXIT_OK, err)
        summary = json.loads(out)
        self.assertEqual((summary["Target"], summary["Source"], summary["Snapshot"]),
                         ("db2", "db1", "/snapshots/snap-2"))
        self.assertIn("progress:", err, "steps go to stderr when stdout is for JSON")

    def test_rate_limit_reaches_the_sender(self):
        db1, _ = self.add_source(), self.add_target()
        code, _, err = self.cli("seed", "--target", "db2", "--source", "db1", "--rate-limit", "50")
        self.assertEqual(code, EXIT_OK, err)
        seed_id = next(iter(db1.seeds))
        self.assertIn(("seed-rate-limit", seed_id, 50), db1.changes)
        self.assertGreaterEqual(self.clock.seconds(), 20, "1000 bytes at 50 B/s take 20 s")

    def test_source_chosen_from_target_suggestions(self):
        bad = self.add_source("db3", snapshots=[("snap-9", 100.0, SNAPSHOT)])
        good = self.add_source("db1")
        self.add_target(local=["db2.example", "db3"], anywhere=["db1"])
        code, out, err = self.cli("seed", "--target", "db2")
        self.assertEqual(code, EXIT_OK, err)
        self.assertIn("source: db1 (suggested by db2 available-snapshots)", out)
        self.assertEqual(bad.changes, [])
        self.assertIn(("umount",), good.changes)

    def test_local_suggestion_wins(self):
        local = self.add_source("db1")
        far = self.add_source("db7")
        self.add_target(local=["db1"], anywhere=["db7"])
        code, out, err = self.cli("seed", "--target", "db2")
        self.assertEqual(code, EXIT_OK, err)
        self.assertIn("source: db1 (suggested by db2 available-snapshots-local)", out)
        self.assertEqual(far.changes, [])
        self.assertTrue(local.changes)

    def test_no_suggestion_refused(self):
        self.add_target()
        code, _, err = self.cli("seed", "--target", "db2")
        self.assertEqual(code, EXIT_REFUSED)
        self.assertIn("give --source HOST", err)

    def test_tight_space_empties_the_datadir_first(self):
        # 1000 bytes to copy, 700 free + 500 in the datadir: fits only after emptying it.
        _, db2 = self.add_source(), self.add_target(available=700)
        code, _, err = self.cli("seed", "--target", "db2", "--source", "db1")
        self.assertEqual(code, EXIT_OK, err)
        self.assertEqual(db2.mutations[:2], ["delete-mysql-datadir", "receive"])
        self.assertIn("emptied before the copy", err)
        self.assertEqual((db2.datadir, db2.aside), (SNAPSHOT, []))

    def test_stop_target(self):
        _, db2 = self.add_source(), self.add_target(running=True)
        code, _, err = self.cli("seed", "--target", "db2", "--source", "db1", "--stop-target")
        self.assertEqual(code, EXIT_OK, err)
        self.assertEqual(db2.mutations, ["mysql-stop", "receive", "post-copy", "mysql-start"])
        self.assertTrue(db2.running)

    def test_waits_for_mysql_status_when_the_log_is_unreadable(self):
        _, db2 = self.add_source(), self.add_target(error_log=False)
        code, _, err = self.cli("seed", "--target", "db2", "--source", "db1")
        self.assertEqual(code, EXIT_OK, err)
        self.assertIn("cannot show its error log: waiting for mysql-status only", err)
        self.assertTrue(db2.running)


def replica(lag, io=True, sql=True, read=1000, problem="", error=""):
    return {"IORunning": io, "SQLRunning": sql, "SecondsBehindMaster": lag,
            "MasterHost": "db1.example", "MasterPort": 3306,
            "MasterLogFile": "mysql-bin.000007", "ReadMasterLogPos": read,
            "RelayMasterLogFile": "mysql-bin.000007", "ExecMasterLogPos": read - 100,
            "LastIOErrno": 0, "LastIOError": "", "LastSQLErrno": 0, "LastSQLError": "",
            "SeedId": "", "Error": error, "Problem": problem}


class ReplicateTests(ControllerTestCase):
    """seed --replicate: the target applies the seed's coordinates (start-replication),
    the controller waits for both threads and --max-lag, drawing lag and relay position."""

    def test_waits_until_within_max_lag(self):
        self.add_source()
        db2 = self.add_target()
        db2.replication_statuses = [replica(None, io=False), replica(None), replica(40, read=2000),
                                    replica(12, read=3000), replica(4, read=4000)]
        # Polled every 5 s: each poll is a line in a log (lines are 5 s apart at most).
        code, out, err = self.cli("seed", "--target", "db2", "--source", "db1", "--replicate",
                                  "--max-lag", "5", "--poll-interval", "5")
        self.assertEqual(code, EXIT_OK, err)
        seed_id = next(iter(db2.seeds))
        self.assertEqual(db2.changes[-2:], [("mysql-start",), ("start-replication", seed_id)])
        lines = [line for line in out.splitlines() if line.startswith("replication:")]
        self.assertEqual(lines[0], "replication: lag ?  relay mysql-bin.000007:1000  "
                                   "executed mysql-bin.000007:900  IO no  SQL yes")
        self.assertIn("replication: lag 40 s  relay mysql-bin.000007:2000", out)
        self.assertIn("replication: lag 12 s  relay mysql-bin.000007:3000", out)
        self.assertIn("db2 replicates from db1.example:3306, 4 s behind (at most 5 s asked)", out)
        self.assertEqual(db2.replication_statuses, [replica(4, read=4000)], "stopped polling at 4 s")

    def test_json_summary_holds_the_replication(self):
        self.add_source()
        db2 = self.add_target()
        db2.replication_statuses = [replica(0)]
        code, out, err = self.cli("seed", "--target", "db2", "--source", "db1", "--replicate", "--json")
        self.assertEqual(code, EXIT_OK, err)
        self.assertEqual(json.loads(out)["Replication"]["SecondsBehindMaster"], 0)

    def test_a_problem_fails_with_its_own_exit_status_and_undoes_nothing(self):
        self.add_source()
        db2 = self.add_target()
        problem = ("the master db1.example:3306 no longer has the binlog this seed needs: "
                   "mysql-bin.000003 (from position 4), purged past the seed's position")
        db2.replication_statuses = [replica(None), replica(None, io=False, problem=problem)]
        code, out, err = self.cli("seed", "--target", "db2", "--source", "db1", "--replicate")
        self.assertEqual(code, EXIT_REPLICATION, err)
        seed_id = next(iter(db2.seeds))
        self.assertIn(f"seed {seed_id} done (MySQL runs on the copy), but replication failed: "
                      f"db2: {problem}", err)
        self.assertIn("nothing was undone", err)
        self.assertEqual(db2.datadir, SNAPSHOT)
        self.assertTrue(db2.running)
        self.assertEqual(db2.mutations[-1], "start-replication", "nothing after it: no stop, no delete")
        self.assertEqual(self.records(), [], "the seed itself is done")

    def test_an_apply_error_fails_at_once(self):
        self.add_source()
        db2 = self.add_target()
        db2.replication_statuses = [replica(None, io=False, sql=False,
                                            error="replication for seed x not started: no GTID")]
        code, _, err = self.cli("seed", "--target", "db2", "--source", "db1", "--replicate")
        self.assertEqual(code, EXIT_REPLICATION)
        self.assertIn("replication for seed x not started: no GTID", err)

    def test_without_replicate_nothing_is_asked(self):
        self.add_source()
        db2 = self.add_target()
        db2.replication_statuses = [replica(0)]
        code, out, err = self.cli("seed", "--target", "db2", "--source", "db1")
        self.assertEqual(code, EXIT_OK, err)
        self.assertNotIn("start-replication", db2.mutations)
        self.assertNotIn("replication:", out)

    def test_max_lag_is_not_negative(self):
        code, _, err = self.cli("seed", "--target", "db2", "--replicate", "--max-lag", "-1")
        self.assertEqual(code, EXIT_USAGE)
        self.assertIn("--max-lag", err)


class RefusalTests(ControllerTestCase):
    """Every refusal changes nothing on either host (except a mount it undoes)."""

    def assertRefused(self, argv, *texts, source_changes=()):
        code, _, err = self.cli(*argv)
        self.assertEqual(code, EXIT_REFUSED, err)
        self.assertIn("refused, nothing was changed", err)
        for text in texts:
            self.assertIn(text, err)
        for host in self.net.hosts.values():
            expected = list(source_changes) if host.name == "db1" else []
            self.assertEqual(host.changes, expected, host.name)
        self.assertEqual(self.records(), [])
        return err

    def test_target_running(self):
        self.add_source(), self.add_target(running=True)
        self.assertRefused(["seed", "--target", "db2", "--source", "db1"],
                           "MySQL is running on the target db2", "--stop-target")

    def test_all_problems_reported_at_once(self):
        self.add_source(snapshots=[]), self.add_target(running=True)
        self.assertRefused(["seed", "--target", "db2", "--source", "db1"],
                           "MySQL is running on the target db2", "has no snapshot")

    def test_overflowed_snapshot(self):
        self.add_source(snapshots=[("snap-3", 100.0, SNAPSHOT), ("snap-2", 3.0, SNAPSHOT)])
        self.add_target()
        self.assertRefused(["seed", "--target", "db2", "--source", "db1"],
                           "newest snapshot snap-3 of the source db1 is invalid", "overflowed")

    def test_no_snapshot(self):
        self.add_source(snapshots=[]), self.add_target()
        self.assertRefused(["seed", "--target", "db2", "--source", "db1"],
                           "the source db1 has no snapshot (lvs-snapshots is empty)")

    def test_source_already_mounted(self):
        db1, _ = self.add_source(), self.add_target()
        db1.mounted = "snap-1"
        self.assertRefused(["seed", "--target", "db2", "--source", "db1"],
                           "already has /snapshots/snap-1 mounted")

    def test_same_host(self):
        self.add_source()
        self.net.add("db1b", hostname="db1.example")
        self.assertRefused(["seed", "--target", "db1b", "--source", "db1"],
                           "source and target are the same host (db1.example)")

    def test_not_enough_space(self):
        _, db2 = self.add_source(), self.add_target(available=499)
        self.assertRefused(["seed", "--target", "db2", "--source", "db1"],
                           "not enough space on the target db2", "1000 bytes", "499 B free",
                           source_changes=[("mountlv", "/snapshots/snap-2"), ("umount",)])
        self.assertEqual(db2.datadir, OLD_DATA)

    def test_target_busy_with_another_seed(self):
        _, db2 = self.add_source(), self.add_target()
        from tests.support.fake_agents import FakeSeedSide

        side = FakeSeedSide("4711", "receiver", None, 0.0)
        side.state = "running"
        db2.seeds["4711"] = side
        self.assertRefused(["seed", "--target", "db2", "--source", "db1"],
                           "db2 is busy with another seed (1 receiver running)")

    def test_unfinished_seed_recorded_here(self):
        db1, db2 = self.add_source(), self.add_target()
        code, _, _ = self.cli("seed", "--target", "db2", "--source", "db1",
                              "--unreachable-timeout", "2", at={3.0: db1.kill})
        self.assertEqual(code, EXIT_FAILED)
        seed_id = next(iter(db2.seeds))
        db1.revive()
        self.add_source("db4")
        self.clock.advance(60)
        changes = list(db2.changes)
        code, _, err = self.cli("seed", "--target", "db2", "--source", "db4")
        self.assertEqual(code, EXIT_REFUSED)
        self.assertIn(f"seed {seed_id} (db1 -> db2, copying) is unfinished: "
                      f"orchagent seed --resume {seed_id}", err)
        self.assertIn("db2 is busy with another seed (1 receiver running)", err)
        self.assertEqual((db2.changes, self.net.hosts["db4"].changes), (changes, []))


class InterruptionTests(ControllerTestCase):
    def start_seed(self, *argv, before=lambda controller: None):
        controller, out, err = self.controller()
        before(controller)
        args = build_parser().parse_args(["seed", "--target", "db2", "--source", "db1", *argv])
        return controller, defer.ensureDeferred(controller.seed(args)), out, err

    def test_ctrl_c_mid_copy_aborts_both_sides(self):
        db1, db2 = self.add_source(), self.add_target(running=True)
        controller, d, out, err = self.start_seed("--stop-target")
        code = self.drive(d, at={4.0: controller.on_signal})
        self.assertEqual(code, EXIT_INTERRUPTED)
        seed_id = next(iter(db2.seeds))
        self.assertGreater(db2.seeds[seed_id].bytes_done, 0, "interrupted mid-copy")
        self.assertEqual((db1.seeds[seed_id].state, db2.seeds[seed_id].state), ("aborted", "aborted"))
        self.assertIsNone(db1.mounted)
        self.assertEqual((db2.datadir, db2.aside), (OLD_DATA, []), "the target's datadir is as before")
        self.assertTrue(db2.running, "MySQL we stopped runs again on its kept datadir")
        self.assertEqual(db2.mutations, ["mysql-stop", "receive", "abort-seed", "mysql-start"])
        self.assertEqual(self.records(), [])
        # The seed stays aborted: nothing moves any more.
        self.clock.advance(60)
        self.assertLess(db2.seeds[seed_id].bytes_done, 1000)

    def test_ctrl_c_while_catching_up_undoes_nothing(self):
        self.add_source()
        db2 = self.add_target()
        db2.replication_statuses = [replica(100)]
        controller, d, out, err = self.start_seed("--replicate")
        code = self.drive(d, at={40.0: controller.on_signal})
        self.assertEqual(code, EXIT_REPLICATION)
        self.assertIn("replication: lag 100 s", out.getvalue())
        self.assertIn("interrupted while db2 was catching up; the seed is done and replication goes on",
                      err.getvalue())
        self.assertEqual(db2.datadir, SNAPSHOT)
        self.assertEqual(db2.mutations[-2:], ["mysql-start", "start-replication"], "no abort, no stop")
        self.assertEqual(self.records(), [])

    def test_ctrl_c_after_mounting_unmounts(self):
        db1, db2 = self.add_source(), self.add_target()

        def hook(controller):
            db1.on_change = lambda change: change[0] == "mountlv" and controller.on_signal()

        controller, d, _, _ = self.start_seed(before=hook)
        self.assertEqual(self.drive(d), EXIT_INTERRUPTED)
        self.assertEqual((db1.mounted, db1.mutations), (None, ["mountlv", "umount"]))
        self.assertEqual((db2.mutations, db2.seeds), ([], {}))
        self.assertEqual(self.records(), [])

    def test_ctrl_c_after_stopping_mysql_starts_it_again(self):
        db1, db2 = self.add_source(), self.add_target(running=True)

        def hook(controller):
            db2.on_change = lambda change: change[0] == "mysql-stop" and controller.on_signal()

        controller, d, _, _ = self.start_seed("--stop-target", before=hook)
        self.assertEqual(self.drive(d), EXIT_INTERRUPTED)
        self.assertEqual(db2.mutations, ["mysql-stop", "mysql-start"])
        self.assertTrue(db2.running)
        self.assertEqual((db1.mounted, db2.datadir), (None, OLD_DATA))

    def test_second_interrupt_is_not_a_second_abort(self):
        self.add_source(), self.add_target()
        controller, d, _, _ = self.start_seed()
        self.assertTrue(controller.seeder.interrupt())
        self.assertFalse(controller.seeder.interrupt())
        self.assertEqual(self.drive(d), EXIT_INTERRUPTED)


class ResumeTests(ControllerTestCase):
    def test_source_agent_dies_then_resume(self):
        db1, db2 = self.add_source(), self.add_target()
        code, out, err = self.cli("seed", "--target", "db2", "--source", "db1",
                                  "--unreachable-timeout", "5", at={4.0: db1.kill})
        self.assertEqual(code, EXIT_FAILED)
        seed_id = next(iter(db2.seeds))
        self.assertIn(f"orchagent seed --resume {seed_id}", err)
        self.assertIn("cannot reach the agent", err)
        self.assertEqual(self.records(), [seed_id + ".json"])
        mode = os.stat(os.path.join(self.home, "seeds", seed_id + ".json")).st_mode & 0o777
        self.assertEqual(mode, 0o600)
        done_before = db2.seeds[seed_id].bytes_done
        self.assertTrue(0 < done_before < 1000)

        db1.revive()
        code, out, err = self.cli("seed", "--resume", seed_id)
        self.assertEqual(code, EXIT_OK, err)
        self.assertIn(f"re-sending seed {seed_id}", out)
        self.assertEqual(db2.datadir, SNAPSHOT)
        self.assertTrue(db2.running)
        self.assertGreaterEqual(db2.seeds[seed_id].resumes, 1)
        self.assertEqual(db2.mutations.count("receive"), 2)
        self.assertEqual(db2.mutations.count("mysql-start"), 1)
        self.assertIsNone(db1.mounted)
        self.assertEqual(self.records(), [])

    def test_resume_after_the_copy_only_finishes(self):
        db1, db2 = self.add_source(), self.add_target()
        db2.post_copy_error = CommandFailed("command shell exited with status 1: post-copy broke")
        code, _, err = self.cli("seed", "--target", "db2", "--source", "db1")
        self.assertEqual(code, EXIT_FAILED)
        self.assertIn("post-copy broke", err)
        seed_id = next(iter(db2.seeds))
        code, out, err = self.cli("seed", "--resume", seed_id)
        self.assertEqual(code, EXIT_OK, err)
        self.assertEqual(db2.mutations.count("receive"), 1, "a verified copy is not sent again")
        self.assertEqual(db2.mutations[-2:], ["post-copy", "mysql-start"])
        self.assertIsNone(db1.mounted)

    def test_resume_unknown_seed(self):
        code, _, err = self.cli("seed", "--resume", "s0000")
        self.assertEqual(code, EXIT_USAGE)
        self.assertIn("no seed s0000 started from here", err)

    def test_abort_command_uses_the_record(self):
        db1, db2 = self.add_source(), self.add_target()
        code, _, _ = self.cli("seed", "--target", "db2", "--source", "db1",
                              "--unreachable-timeout", "3", at={3.0: db1.kill})
        self.assertEqual(code, EXIT_FAILED)
        seed_id = next(iter(db2.seeds))
        db1.revive()
        code, out, err = self.cli("abort", seed_id)
        self.assertEqual(code, EXIT_OK, err)
        self.assertIn(f"seed {seed_id} aborted", out)
        self.assertEqual(db2.seeds[seed_id].state, "aborted")
        self.assertIn(("abort-seed", seed_id), db1.changes)
        self.assertIsNone(db1.mounted)
        self.assertEqual(db2.datadir, OLD_DATA)
        self.assertEqual(self.records(), [])

    def test_abort_by_hosts(self):
        db1, db2 = self.add_source(), self.add_target()
        code, _, err = self.cli("abort", "4711")
        self.assertEqual(code, EXIT_FAILED)
        self.assertIn("name the hosts with --host", err)
        code, out, _ = self.cli("abort", "4711", "--host", "db1", "--host", "db2", "--json")
        self.assertEqual(code, EXIT_OK)
        self.assertEqual(json.loads(out), {"SeedId": "4711", "Aborted": True, "Problems": []})
        self.assertEqual((db1.changes, db2.changes), ([("abort-seed", "4711")], [("abort-seed", "4711")]))


class CommandTests(ControllerTestCase):
    def test_status_table(self):
        db1 = self.add_source()
        db1.mounted = "snap-2"
        code, out, err = self.cli("status", "db1")
        self.assertEqual(code, EXIT_OK, err)
        self.assertIn("host            db1 (http://db1:3002)", out)
        self.assertIn("mysql           running, port 3306", out)
        self.assertIn("snapshot mount  /mnt/snapshot: /snapshots/snap-2 mounted, MySQL data 1000 B", out)
        self.assertIn("snapshots       2, newest snap-2", out)
        self.assertIn("datacenter      dc1", out)

    def test_status_shows_replication_and_what_stops_it(self):
        db2 = self.add_target(running=True)
        code, out, _ = self.cli("status", "db2")
        self.assertEqual(code, EXIT_OK)
        self.assertIn("replication     not a replica", out)
        db2.replication_statuses = [replica(3)]
        _, out, _ = self.cli("status", "db2")
        self.assertIn("replication     from db1.example:3306  lag 3 s  relay mysql-bin.000007:1000", out)
        db2.replication_statuses = [replica(None, io=False, problem="cannot reach the master db1.example:3306")]
        _, out, _ = self.cli("status", "db2")
        self.assertIn("replication     STOPPED: cannot reach the master db1.example:3306", out)
        _, out, _ = self.cli("status", "db2", "--json")
        self.assertEqual(json.loads(out)["Replication"]["Problem"], "cannot reach the master db1.example:3306")
        db2.running = False
        _, out, _ = self.cli("status", "db2")
        self.assertNotIn("replication", out, "asked only while MySQL runs")

    def test_status_json(self):
        self.add_source()
        code, out, _ = self.cli("status", "db1", "--json")
        self.assertEqual(code, EXIT_OK)
        facts = json.loads(out)
        self.assertEqual((facts["Hostname"], facts["MySQLRunning"], facts["MySQLDiskUsage"]),
                         ("db1.example", True, 900))
        self.assertEqual(facts["Mount"]["IsMounted"], False)
        self.assertEqual([s["Name"] for s in facts["Snapshots"]], ["snap-2", "snap-1"])

    def test_status_shows_our_unfinished_seed(self):
        db1, db2 = self.add_source(), self.add_target()
        self.cli("seed", "--target", "db2", "--source", "db1", "--unreachable-timeout", "2",
                 at={3.0: db1.kill})
        seed_id = next(iter(db2.seeds))
        code, out, _ = self.cli("status", "db2")
        self.assertEqual(code, EXIT_OK)
        self.assertRegex(out, rf"seed {seed_id} +target \(db1 -> db2\): running")

    def test_snapshots(self):
        self.add_source(snapshots=[("snap-3", 100.0, SNAPSHOT), ("snap-2", 12.5, SNAPSHOT)])
        code, out, _ = self.cli("snapshots", "db1")
        self.assertEqual(code, EXIT_OK)
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), ["NAME", "PATH", "GROUP", "USED", "VALID"])
        self.assertEqual(lines[2].split(), ["snap-3", "/snapshots/snap-3", "snaps", "100.0%", "NO", "(overflowed)"])
        self.assertEqual(lines[3].split(), ["snap-2", "/snapshots/snap-2", "snaps", "12.5%", "yes"])
        code, out, _ = self.cli("snapshots", "db1", "--json")
        self.assertEqual([v["SnapshotPercent"] for v in json.loads(out)], [100.0, 12.5])

    def test_wrong_token(self):
        self.add_source()
        with open(self.token_file, "w") as fh:
            fh.write("not-the-token\n")
        code, _, err = self.cli("status", "db1")
        self.assertEqual(code, EXIT_FAILED)
        self.assertIn("db1: /api/mysql-status: Invalid token (the controller's token file", err)

    def test_unreachable_agent(self):
        self.add_source().kill()
        code, _, err = self.cli("snapshots", "db1")
        self.assertEqual(code, EXIT_FAILED)
        self.assertIn("db1: /api/lvs-snapshots: cannot reach the agent", err)

    def test_usage_errors(self):
        for argv, text in ((["seed"], "seed needs --target HOST"),
                           (["seed", "--resume", "x", "--target", "db2"], "--resume takes its hosts"),
                           (["seed", "--target", "db2", "--rate-limit", "fast"], "not a size"),
                           (["frobnicate"], "invalid choice")):
            code, _, err = self.cli(*argv)
            self.assertEqual(code, EXIT_USAGE, argv)
            self.assertIn(text, err)
