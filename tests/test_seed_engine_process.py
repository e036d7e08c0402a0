"""Seeds in a process of their own: the channel, the engine, the agent's proxy, real daemons.

* The wire (:mod:`orchagent.seed.channel`): errors keep type and message, statuses fit
  AMP's value limit, log events reach text and JSON observers with secrets masked.
* The engine (:class:`orchagent.seed.engine_process.Engine`) around a real SeedManager:
  what it pushes, when, and that a call's effect is pushed before its answer.
* The agent's proxy (:class:`orchagent.seed.remote.SeedEngineProcess`) in this process
  with a real engine child: calls, errors, statuses, log events and commands coming back,
  a SIGKILLed engine restarted with its seed resumed, stop leaving no process.
* Real ``twistd`` agents: a seed between two of them through their engines; an engine
  killed mid-seed on either side and the seed still completing, identical; the agent
  killed and its engine gone with it; the engine's errors as the v1 error body.
* The status endpoint's fast path answers exactly as the app does.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import signal

from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet import defer, reactor, task
from twisted.logger import Logger, LogLevel, eventAsText, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from orchagent import errors
from orchagent.agent import Agent
from orchagent.api.resource import AgentAPI
from orchagent.config import Config
from orchagent.logging import json_lines_observer
from orchagent.seed import channel, engine_process, remote
from orchagent.service import StatusFastPath
from orchagent.token import Token
from tests import seed_support as S
from tests.support.certs import TestCA, seed_tls
from tests.support.daemon import loaded_cryptography, start_daemon, wait_until

KEY = "engine-seed-key-6161"
_PR_SET_CHILD_SUBREAPER = 36


def children_named(parent_pid: int, comm: str = "orchagent-seed") -> list[int]:
    """Live (not zombie) processes whose parent is ``parent_pid`` and name is ``comm``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if (stat[stat.index("(") + 1:stat.rindex(")")] == comm and int(fields[1]) == parent_pid
                and fields[0] != "Z"):
            found.append(int(name))
    return found


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def engine_of(daemon, timeout: float = 15.0, other_than: int | None = None) -> int:
    """The pid of the daemon's seed engine process (a new one when ``other_than``)."""
    found: list[int] = []

    def check():
        found[:] = [p for p in children_named(daemon._transport.pid) if p != other_than]
        return bool(found)

    await wait_until(check, timeout=timeout)
    return found[0]


# --- the wire --------------------------------------------------------------------------------

class ChannelTests(unittest.TestCase):
    def test_errors_cross_with_their_type_and_message(self):
        for error in (errors.BadRequest("invalid port in target 'h:0'"), errors.NotFound("no seed x"),
                      errors.Refused("MySQL is running"), errors.NotAvailable("no hot seeds"),
                      errors.CommandFailed("cp exited with 1"), errors.AgentError("plain")):
            back = channel.error_from_wire(json.loads(json.dumps(channel.error_to_wire(error))))
            self.assertIs(type(back), type(error))
            self.assertEqual(back.message, error.message)

    def test_unknown_agent_error_subclass_travels_as_its_base(self):
        class HotRefused(errors.Refused):
            pass

        back = channel.error_from_wire(channel.error_to_wire(HotRefused("backup too big")))
        self.assertEqual((type(back), back.message), (errors.Refused, "backup too big"))

    def test_unexpected_error_is_an_internal_error(self):
        back = channel.error_from_wire(channel.error_to_wire(KeyError("seed")))
        self.assertIsInstance(back, channel.SeedEngineFailure)
        self.assertNotIsInstance(back, errors.AgentError)
        self.assertEqual(str(back), "'seed'")
        back = channel.error_from_wire(channel.error_to_wire(RuntimeError()))
        self.assertEqual(str(back), "RuntimeError")

    def test_status_batches_stay_under_the_amp_limit(self):
        statuses = [{"SeedId": f"seed-{i}", "Error": "x" * 500, "State": "failed"} for i in range(400)]
        batches = list(channel.status_batches(statuses))
        self.assertGreater(len(batches), 2)
        self.assertEqual([s for b in batches for s in b], statuses)
        for batch in batches:
            self.assertLess(len(channel.JSON().toString(batch)), 65535)
        self.assertEqual(list(channel.status_batches([])), [[]])

    def test_log_event_reaches_text_and_json_observers_masked(self):
        events = []
        Logger(namespace="orchagent.seed.sender", observer=events.append).warn(
            "seed {seed}: to {target}?key={key} failed", seed="s9", target="db2", key="hunter2",
            log_failure=Failure(ValueError("boom")))
        wire = json.loads(json.dumps(channel.event_to_wire(events[0])))
        self.assertEqual(wire["fields"]["key"], "***")
        event = channel.event_from_wire(wire)
        self.assertEqual((event["log_level"], event["log_namespace"]),
                         (LogLevel.warn, "orchagent.seed.sender"))
        text = eventAsText(event)
        self.assertIn("[orchagent.seed.sender#warn] seed s9: to db2?key=hunter2 failed", text)
        self.assertIn("ValueError: boom", text)
        out = io.StringIO()
        json_lines_observer(out)(event)
        record = json.loads(out.getvalue())
        self.assertEqual(record["message"], "seed s9: to db2?key=*** failed")
        self.assertEqual((record["key"], record["seed_id"], record["level"]), ("***", "s9", "warn"))
        self.assertNotIn("hunter2", out.getvalue())
        self.assertIn("ValueError: boom", record["failure"])


# --- the engine around a real manager --------------------------------------------------------

class EngineTests(unittest.TestCase):
    def setUp(self):
        base = os.path.abspath(self.mktemp())
        self.datadir = os.path.join(base, "datadir")
        os.makedirs(self.datadir)
        self.manager = S.make_manager(self, base, self.datadir, S.free_port(), start=False)
        self.manager.runner = _Runner()
        self.sent: list[tuple] = []
        self.clock = task.Clock()
        self.engine = engine_process.Engine(
            self.manager, lambda command, **kw: self.sent.append((command, kw)), self.clock)
        self.engine.start()
        self.addCleanup(lambda: defer.ensureDeferred(self.engine.stop()))

    def pushed(self) -> list[dict]:
        return [kw for command, kw in self.sent if command is channel.Statuses]

    async def test_start_pushes_everything_then_ready(self):
        self.assertEqual([c for c, _ in self.sent], [channel.Statuses, channel.Ready])
        self.assertEqual(self.sent[0][1], {"changed": [], "removed": [], "replace": True})
        self.assertEqual(self.sent[1][1], {"pid": os.getpid()})

    async def test_call_pushes_what_it_changed_before_answering(self):
        self.sent.clear()
        answer = await self.engine.call("receive", {"args": ["s1"], "kwargs": {"key": KEY}})
        self.assertEqual(answer, {"ok": True})
        (push,) = self.pushed()
        self.assertEqual([(s["SeedId"], s["State"]) for s in push["changed"]], [("s1", "pending")])
        self.sent.clear()
        answer = await self.engine.call("status", {"args": ["nope"], "kwargs": {}})
        self.assertEqual(answer, {"error": {"type": "NotFound", "message": "no seed nope on this host"}})
        self.assertEqual(self.pushed(), [])

    async def test_change_of_state_is_pushed_at_once_progress_waits(self):
        await self.engine.call("receive", {"args": ["s1"], "kwargs": {}})
        self.sent.clear()
        self.clock.advance(0)
        self.assertEqual(self.pushed(), [], "the call pushed it all already")
        record = self.manager.records["s1"]
        record.bytes_done = 1234
        self.manager.touch(record)
        self.clock.advance(0)
        self.assertEqual(self.pushed(), [], "progress alone waits for the periodic push")
        self.clock.advance(engine_process.PUSH_INTERVAL)
        (push,) = self.pushed()
        self.assertEqual(push["changed"][0]["BytesDone"], 1234)
        self.sent.clear()
        await self.manager.abort("s1")
        self.clock.advance(0)
        (push,) = self.pushed()
        self.assertEqual((push["changed"][0]["State"], push["changed"][0]["Error"]),
                         ("aborted", "aborted through the API"))
        self.sent.clear()
        self.clock.advance(engine_process.PUSH_INTERVAL)
        self.assertEqual(self.pushed(), [], "nothing changed, nothing pushed")

    async def test_forgotten_seed_is_pushed_as_removed(self):
        await self.engine.call("receive", {"args": ["s1"], "kwargs": {}})
        await self.manager.abort("s1")
        self.manager.records.pop("s1")
        self.sent.clear()
        self.engine.push()
        self.assertEqual(self.pushed(), [{"changed": [], "removed": ["s1"], "replace": False}])

    async def test_only_the_listed_calls(self):
        answer = await self.engine.call("_listen", {"args": [], "kwargs": {}})
        self.assertEqual(answer["error"]["type"], None)
        self.assertIn("no call '_listen'", answer["error"]["message"])
        self.assertFalse(self.manager.listener.port)
        self.flushLoggedErrors(channel.SeedEngineFailure)

    async def test_commands_run_are_reported(self):
        self.manager.runner.observers[0](_Result("mysqladmin", 0.25, False))
        self.assertEqual(self.sent[-1], (channel.CommandRan, {"name": "mysqladmin", "duration": 0.25,
                                                              "ok": False}))


class _Runner:
    def __init__(self):
        self.observers = []


class _Result:
    def __init__(self, name, duration, ok):
        self.name, self.duration, self.ok = name, duration, ok


# --- the agent's proxy with a real engine child ------------------------------------------------

class ProxyTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        base = os.path.abspath(self.mktemp())
        self.datadir = os.path.join(base, "datadir")
        os.makedirs(self.datadir)
        self.values = {"state_dir": os.path.join(base, "state"), "seed_transfer_port": S.free_port(),
                       "mysql_service_status_command": "false",
                       "mysql_datadir_command": f"echo {self.datadir}"}
        self.events: list[dict] = []
        self.commands: list = []
        # The agent's own lines (remote.py) go to the global publisher, the engine's to
        # ``publish``: both end up here.
        globalLogPublisher.addObserver(self.own_event)
        self.addCleanup(globalLogPublisher.removeObserver, self.own_event)

    def own_event(self, event: dict) -> None:
        if event.get("log_namespace") == "orchagent.seed.remote":
            self.events.append(event)

    async def start(self, **values) -> remote.SeedEngineProcess:
        config = Config(**{**self.values, **values})
        seeds = remote.SeedEngineProcess(config, reactor, command_observers=[self.commands.append],
                                         publish=self.events.append)
        seeds.startService()
        self.addCleanup(lambda: seeds.stopService() if seeds.running else None)
        await wait_until(lambda: seeds.ready, timeout=30)
        return seeds

    def logged(self) -> str:
        return "\n".join(eventAsText(e, includeTimestamp=False) for e in self.events)

    async def test_calls_statuses_errors_logs_and_commands(self):
        seeds = await self.start()
        self.assertTrue(running(seeds.pid))
        self.assertEqual(seeds.all_status(), [])
        self.assertIs(await seeds.receive("s1", key=KEY), True)
        status = await seeds.status("s1")  # from the pushed copy, pushed before the answer
        self.assertEqual((status["SeedId"], status["Role"], status["State"]), ("s1", "receiver", "pending"))
        self.assertEqual([s["SeedId"] for s in seeds.all_status()], ["s1"])
        self.assertIs(await seeds.completed("s1"), False)
        with self.assertRaises(errors.Refused) as raised:
            await seeds.send("127.0.0.1", "s1", key=KEY, source="datadir")
        self.assertEqual(raised.exception.message, "seed s1 is already active on this host as receiver")
        with self.assertRaises(errors.NotFound) as raised:
            await seeds.status("nope")
        self.assertEqual(raised.exception.message, "no seed nope on this host")
        with self.assertRaises(errors.BadRequest) as raised:
            await seeds.send("127.0.0.1:0", "s2", source="datadir")
        self.assertEqual(raised.exception.message, "invalid port in target '127.0.0.1:0'")
        self.assertIs(await seeds.abort("s1"), True)
        self.assertEqual(((await seeds.status("s1"))["State"], await seeds.completed("s1"),
                          await seeds.succeeded("s1")), ("aborted", True, False))
        self.assertIn("[orchagent.seed.manager#info] seed s1: waiting for the sender on port", self.logged())
        self.assertNotIn(KEY, self.logged())
        self.assertTrue(self.commands, "the engine's commands reach the agent's observers")
        self.assertTrue(all(isinstance(c.name, str) and c.duration >= 0 for c in self.commands))

    async def test_mysql_running_is_refused_as_in_process(self):
        seeds = await self.start(mysql_service_status_command="true")
        with self.assertRaises(errors.Refused) as raised:
            await seeds.receive("s1")
        self.assertEqual(raised.exception.message,
                         "MySQL is running on this host: stop it before receiving seed s1")

    async def test_killed_engine_is_restarted_and_its_seed_resumed(self):
        seeds = await self.start()
        await seeds.receive("s1", key=KEY)
        first = seeds.pid
        os.kill(first, signal.SIGKILL)
        await wait_until(lambda: seeds.pid not in (None, first) and seeds.ready, timeout=30)
        self.assertFalse(running(first))
        self.assertEqual(seeds.restarts, 1)
        self.assertIn(f"seed engine process {first} was killed by signal 9; starting a new one",
                      self.logged())
        self.assertIn("seed s1: resuming as receiver after a restart", self.logged())
        self.assertEqual((await seeds.status("s1"))["State"], "pending")
        self.assertIs(await seeds.receive("s1", key=KEY), True)  # still the one listening
        self.assertIs(await seeds.abort("s1"), True)
        self.assertEqual((await seeds.status("s1"))["State"], "aborted")

    async def test_an_engine_that_cannot_start_says_why_in_the_agents_log(self):
        # The crash points (#17): an I/O error listing StateDir/seeds at the engine's
        # start refused the seed with "see the agent's log", and the log said only that
        # the engine closed its channel: the reason went down with the child's reactor.
        seeds = await self.start()
        first = seeds.pid
        seeds_dir = os.path.join(self.values["state_dir"], "seeds")
        os.rmdir(seeds_dir)
        with open(seeds_dir, "w"):  # the next engine's StateStore.open() fails
            pass
        os.kill(first, signal.SIGKILL)
        await wait_until(lambda: "cannot start the seed manager" in self.logged(), timeout=20)
        logged = self.logged()
        self.assertIn("[orchagent.seed.engine_process#critical] seed engine: cannot start the "
                      "seed manager", logged)
        self.assertIn(f"FileExistsError: [Errno 17] File exists: '{seeds_dir}'", logged)
        self.assertFalse(seeds.ready)

    async def test_stop_ends_the_engine(self):
        seeds = await self.start()
        pid = seeds.pid
        await seeds.stopService()
        self.assertFalse(running(pid))
        self.assertIsNone(seeds.process)
        self.assertIn(f"seed engine process {pid} exited with status 0", self.logged())
        with self.assertRaises(errors.NotAvailable):
            await seeds.receive("s1")

    async def test_statuses_known_from_state_dir_before_the_engine_is_up(self):
        seeds = await self.start()
        await seeds.receive("s1")
        await seeds.abort("s1")
        await seeds.stopService()
        again = remote.SeedEngineProcess(Config(**self.values), reactor, publish=self.events.append)
        again.startService()
        self.addCleanup(again.stopService)
        self.assertFalse(again.ready)
        self.assertEqual([(s["SeedId"], s["State"]) for s in again.all_status()], [("s1", "aborted")])
        self.assertIs(await again.completed("s1"), True)

    async def test_without_seed_tls_the_engine_never_loads_openssl(self):
        seeds = await self.start()
        self.assertFalse(loaded_cryptography(seeds.pid))

    async def test_seed_over_mutual_tls_between_two_engines(self):
        """With seed TLS configured the engine loads pyOpenSSL (see orchagent.seed.__main__)
        and a seed runs over mutual TLS between two engine processes."""
        ca = TestCA(self.mktemp())
        source = os.path.abspath(self.mktemp())
        S.make_tree(source, files=4)
        receiver = await self.start(**seed_tls(ca, "r"))
        sender = await self.start(**seed_tls(ca, "s"), state_dir=os.path.abspath(self.mktemp()),
                                  mysql_datadir_command=f"echo {source}")
        self.assertTrue(loaded_cryptography(receiver.pid) and loaded_cryptography(sender.pid))
        self.assertIs(await receiver.receive("t1"), True)
        self.assertIs(await sender.send(f"127.0.0.1:{self.values['seed_transfer_port']}", "t1",
                                        source="datadir"), True)
        await wait_until(lambda: receiver.all_status()[0]["State"] in ("completed", "failed"), timeout=30)
        self.assertEqual(receiver.all_status()[0]["State"], "completed", receiver.all_status())
        self.assertEqual(S.snapshot_tree(self.datadir), S.snapshot_tree(source))

    def test_a_bad_seed_setting_stops_the_agent_not_the_engine(self):
        config = Config(**self.values, seed_allowed_networks=["10.0.0.0/33"])
        with self.assertRaises(errors.ConfigError):
            remote.SeedEngineProcess(config, reactor)


# --- real daemons ----------------------------------------------------------------------------

class DaemonTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        self.src, self.dst = os.path.join(self.base, "src"), os.path.join(self.base, "dst")
        os.makedirs(self.src)
        os.makedirs(self.dst)
        S.make_tree(self.src)
        with open(os.path.join(self.src, "ibdata1"), "wb") as fh:
            fh.write(os.urandom(24 << 20))
        self.seed_port = S.free_port()

    async def agents(self, rate: int = 0, **extra):
        common = {"MySQLServiceStatusCommand": "false", "SeedTransferPort": self.seed_port, **extra}
        receiver = await start_daemon(self, {**common, "MySQLDatadirCommand": f"echo {self.dst}"},
                                      directory=os.path.join(self.base, "receiver"))
        sender = await start_daemon(self, {**common, "MySQLDatadirCommand": f"echo {self.src}",
                                           "SeedRateLimitBytesPerSec": rate},
                                    directory=os.path.join(self.base, "sender"))
        return sender, receiver

    async def seed(self, sender, receiver, seed_id: str) -> None:
        self.assertEqual(await receiver.get(f"/api/receive-mysql-seed-data/{seed_id}", key=KEY), (200, True))
        self.assertEqual(await sender.get(f"/api/send-mysql-seed-data/127.0.0.1:{self.seed_port}/{seed_id}",
                                          key=KEY, source="datadir"), (200, True))

    async def finished(self, sender, receiver, seed_id: str) -> None:
        async def done(agent):
            return (await agent.get(f"/api/seed-command-completed/{seed_id}"))[1] is True

        await wait_until(lambda: done(receiver), timeout=60)
        await wait_until(lambda: done(sender), timeout=30)
        for agent in (receiver, sender):
            code, status = await agent.get(f"/api/seed-status/{seed_id}")
            self.assertEqual((code, status["State"], status["Error"]), (200, "completed", ""))
        self.assertEqual(S.snapshot_tree(self.dst), S.snapshot_tree(self.src))

    async def test_seed_between_two_daemons_through_their_engines(self):
        sender, receiver = await self.agents()
        engines = [await engine_of(sender), await engine_of(receiver)]
        await self.seed(sender, receiver, "e1")
        await self.finished(sender, receiver, "e1")
        code, text = await receiver.get("/metrics")
        total = (await receiver.get("/api/seed-status/e1"))[1]["BytesTotal"]
        self.assertGreater(total, 24 << 20)
        values = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                  for family in text_string_to_metric_families(text) for sample in family.samples}
        self.assertEqual(values["orchagent_seed_received_bytes", (("seed_id", "e1"),)], total)
        self.assertEqual(values["orchagent_seeds", (("role", "receiver"), ("state", "completed"))], 1)
        code, seeds = await sender.get("/api/seeds")
        self.assertEqual([(s["SeedId"], s["Role"], s["State"]) for s in seeds], [("e1", "sender", "completed")])
        # The engine's log lines are in the agent's log, the key in neither.
        self.assertIn("[orchagent.seed.manager#info] seed e1: waiting for the sender", receiver.output())
        self.assertIn("seed engine process", receiver.output())
        for agent in (sender, receiver):
            self.assertNotIn(KEY, agent.output())
            await agent.stop()
        self.assertEqual([running(pid) for pid in engines], [False, False])

    async def test_receiver_engine_killed_mid_seed(self):
        await self._engine_killed_mid_seed("receiver")

    async def test_sender_engine_killed_mid_seed(self):
        await self._engine_killed_mid_seed("sender")

    async def _engine_killed_mid_seed(self, side: str) -> None:
        sender, receiver = await self.agents(rate=8 << 20)
        victim = sender if side == "sender" else receiver
        await self.seed(sender, receiver, "k1")

        async def received():
            return (await receiver.get("/api/seed-status/k1"))[1]["BytesDone"] > (4 << 20)

        await wait_until(received, timeout=30)
        old = await engine_of(victim)
        os.kill(old, signal.SIGKILL)
        new = await engine_of(victim, other_than=old)
        self.assertNotEqual(new, old)
        code, status = await receiver.get("/api/seed-status/k1")
        self.assertLess(status["BytesDone"], 24 << 20, "killed before the end")
        await self.finished(sender, receiver, "k1")
        self.assertIn(f"seed engine process {old} was killed by signal 9; starting a new one",
                      victim.output())
        self.assertIn("seed k1: resuming as", victim.output())

    async def test_killed_agent_takes_its_engine_along(self):
        _enter_subreaper(self)
        sender, _ = await self.agents()
        engine = await engine_of(sender)
        sender._transport.signalProcess("KILL")
        await sender.wait_exit()
        # The engine was re-parented to this process (a subreaper), so it can be reaped here.
        exited = await _wait_reaped(engine)
        self.assertTrue(os.WIFSIGNALED(exited) and os.WTERMSIG(exited) == signal.SIGKILL, exited)

    async def test_engine_errors_are_the_v1_error_body(self):
        receiver = await start_daemon(self, {
            "MySQLServiceStatusCommand": "true", "MySQLDatadirCommand": f"echo {self.dst}",
            "SeedTransferPort": self.seed_port}, directory=os.path.join(self.base, "receiver"))
        self.assertEqual(await receiver.get("/api/receive-mysql-seed-data/r1"), (500, {
            "Code": "ERROR", "Message": "MySQL is running on this host: stop it before receiving seed r1",
            "Details": None}))
        self.assertEqual(await receiver.get("/api/seed-status/r2"), (500, {
            "Code": "ERROR", "Message": "no seed r2 on this host", "Details": None}))
        self.assertEqual(await receiver.get("/api/seed-rate-limit/r2", bytesPerSec="10"), (500, {
            "Code": "ERROR", "Message": "no seed r2 on this host", "Details": None}))
        # The refused receive is remembered as failed (orchestrator reads completed, not
        # the error); an unknown seed is aborted as the original did it: true.
        self.assertEqual(await receiver.get("/api/abort-seed/r2"), (200, True))
        code, seeds = await receiver.get("/api/seeds")
        self.assertEqual([(s["SeedId"], s["State"]) for s in seeds], [("r1", "failed")])
        self.assertEqual(os.listdir(self.dst), [])

    async def test_in_process_mode_has_no_engine(self):
        sender, receiver = await self.agents(SeedEngineProcess=False)
        await self.seed(sender, receiver, "p1")
        await self.finished(sender, receiver, "p1")
        self.assertEqual(children_named(sender._transport.pid) + children_named(receiver._transport.pid), [])


def _enter_subreaper(testcase) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise unittest.SkipTest("cannot become a child subreaper")
    testcase.addCleanup(libc.prctl, _PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


async def _wait_reaped(pid: int, timeout: float = 15.0) -> int:
    deadline = reactor.seconds() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            raise AssertionError(f"process {pid} was not re-parented to the test") from None
        if done:
            return status
        if reactor.seconds() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the engine {pid} outlived its agent by {timeout} s")
        await task.deferLater(reactor, 0.05, lambda: None)


# --- the status endpoint's fast path ---------------------------------------------------------

class _Registration:
    def __init__(self, healthy: bool):
        self.healthy = healthy

    def is_healthy(self) -> bool:
        return self.healthy


class StatusFastPathTests(unittest.TestCase):
    def make(self, healthy: bool = True, **values):
        agent = Agent(config=Config(**values), reactor=task.Clock(), runner=_Runner(),
                      hostname="db1", token=Token("t0ken"), service=None, host=None, binlogs=None,
                      snapshots=None, snapshot_hosts=None, seeds=None,
                      registration=_Registration(healthy))
        api = AgentAPI(agent)
        return api, StubTreq(StatusFastPath(api, api.resource())), StubTreq(AgentAPI(agent).resource())

    async def answer(self, http, path, **kwargs):
        response = await http.get("http://agent" + path, **kwargs)
        return (response.code, response.headers.getRawHeaders("content-type"),
                json.loads(await response.content()))

    async def test_same_answers_as_the_app(self):
        for healthy, values, path, kwargs, expected in (
                (True, {}, "/api/status", {}, (200, "OK")),
                (False, {}, "/api/status", {}, (500, "BAD")),
                (True, {}, "/api/status/", {}, (200, "OK")),
                (True, {"status_endpoint": "/health"}, "/health", {}, (200, "OK")),
                (True, {"status_endpoint": "/health"}, "/api/status", {},
                 (404, {"Code": "ERROR", "Message": "no such endpoint: /api/status", "Details": None})),
                (True, {"http_auth_user": "orc", "http_auth_password": "pw"}, "/api/status", {},
                 (401, {"Code": "ERROR", "Message": "Unauthorized", "Details": None})),
                (True, {"http_auth_user": "orc", "http_auth_password": "pw"}, "/api/status",
                 {"auth": ("orc", "pw")}, (200, "OK"))):
            api, fast, app = self.make(healthy, **values)
            got = await self.answer(fast, path, **kwargs)
            self.assertEqual((got[0], got[2]), expected, (values, path))
            self.assertEqual(got, await self.answer(app, path, **kwargs), (values, path))
            exposition = api.metrics.exposition(None)[0].decode()
            label = values.get("status_endpoint", "/api/status") if expected[0] != 404 else "other"
            self.assertIn(f'orchagent_http_requests_total{{code="{expected[0]}",endpoint="{label}",'
                          'method="GET"} 1.0', exposition)

    async def test_everything_else_goes_to_the_app(self):
        _, fast, _ = self.make()
        self.assertEqual(await self.answer(fast, "/api/hostname"),
                         (200, ["application/json; charset=utf-8"], "db1"))
        response = await fast.post("http://agent/api/status")
        self.assertEqual(response.code, 405)
