"""Streamed hot seeds between two real seed managers: real MariaDB, mariabackup, mbstream.

Each test has a running source MariaDB (tests.support.mariadb, tables from
test_backups_mariadb) and a stopped target MariaDB whose datadir is emptied, and two real
seed managers built as the seed engine builds them (:func:`orchagent.agent.build_seed_manager`:
real command runner, host facts, service commands, hot seeds) talking over real TCP on
loopback.  The source runs ``mariabackup --backup --stream=xbstream``; the target runs
``mbstream -x`` and ``mariabackup --prepare``.  A seed is right when the target server
starts on the seeded datadir with the source's rows and CHECKSUM TABLEs; a failed one
leaves the target datadir empty, no staging directory and no tool process behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading

from twisted.internet import protocol, reactor, task
from twisted.trial import unittest

from orchagent.agent import build_seed_manager
from orchagent.config import Config
from orchagent.seed import state, streamed
from tests import seed_support as S
from tests.support.mariadb import MariaDB
from tests.test_backups_mariadb import (DATABASE, ROWS_UP_TO, mariabackup_unavailable, populated,
                                        table_checksums)
from tests.test_seed_transfer import FlippingProxy

KEY = "streamed-hot-seed-key"
TERMINAL = ("completed", "failed", "aborted")


def wrap_mariabackup(case: unittest.TestCase, on_prepare: str) -> None:
    """Put first on PATH, for the rest of ``case``, a ``mariabackup`` that runs the shell
    line ``on_prepare`` for a ``--prepare`` (``$dir``: its ``--target-dir``; ``{real}``:
    the real tool) and the real tool for everything else."""
    real = shutil.which("mariabackup")
    wrapped = os.path.join(case.mktemp(), "bin")
    os.makedirs(wrapped)
    with open(os.path.join(wrapped, "mariabackup"), "w") as fh:
        fh.write(f"""#!/bin/sh
case " $* " in
*" --prepare "*)
    for arg; do case $arg in --target-dir=*) dir=${{arg#--target-dir=}} ;; esac; done
    {on_prepare.format(real=real)} ;;
esac
exec {real} "$@"
""")
    os.chmod(os.path.join(wrapped, "mariabackup"), 0o755)
    path = os.environ["PATH"]
    os.environ["PATH"] = f"{wrapped}:{path}"
    case.addCleanup(os.environ.__setitem__, "PATH", path)


class _Proxy(FlippingProxy):
    """The flipping proxy, closing what it still holds when the test ends."""

    def connectionMade(self):
        self.factory.fronts.append(self)
        super().connectionMade()

    @staticmethod
    def close_all(factory):
        for front in factory.fronts:
            front.transport.abortConnection()
            if front.peer is not None:
                front.peer.transport.abortConnection()
        return task.deferLater(reactor, 0.05, lambda: None)


class StreamedHotSeedTests(unittest.TestCase):
    timeout = 180

    def setUp(self):
        reason = mariabackup_unavailable()
        if reason:
            raise unittest.SkipTest(reason)
        self.home = os.path.abspath(self.mktemp())
        os.makedirs(self.home)
        self.port = S.free_port()

    def servers(self) -> None:
        self.source_db = populated(self)
        self.target_db = MariaDB.create(self, start=False)
        for name in os.listdir(self.target_db.datadir):
            path = os.path.join(self.target_db.datadir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)

    def manager(self, name: str, db: MariaDB, **overrides):
        values = dict(db.agent_settings(), state_dir=os.path.join(self.home, name, "state"),
                      seed_transfer_port=self.port, command_timeout_seconds=120)
        values.update(overrides)
        manager = build_seed_manager(Config(**values), reactor)
        manager.startService()
        self.addCleanup(lambda: manager.stopService() if manager.running else None)
        return manager

    def managers(self, **source_overrides):
        self.source = self.manager("source", self.source_db, **source_overrides)
        self.target = self.manager("target", self.target_db)

    async def start_seed(self, seed: str, port: int | None = None) -> None:
        self.assertTrue(await self.target.receive(seed, key=KEY))
        self.assertTrue(await self.source.send(f"127.0.0.1:{port or self.port}", seed, key=KEY,
                                               source="hot"))

    async def ended(self, seed: str) -> tuple[dict, dict]:
        """Both sides' status once both jobs ended (a failed job's cleanup done)."""
        await S.wait_for(lambda: all(seed in m.records and m.records[seed].terminal
                                     and seed not in m.jobs for m in (self.source, self.target)),
                         timeout=120)
        return await self.source.status(seed), await self.target.status(seed)

    def our_processes(self, seed: str) -> list[str]:
        """Tool processes of this test still running (the source's backup names its option
        file, the target's extractor and prepare the staging directory)."""
        staging = self.target.jobs[seed].staging.root if seed in self.target.jobs else \
            f".orchagent-seed-{seed}"
        found = []
        for pattern in (f"mariabackup --defaults-file={self.source_db.option_file}",
                        f"mbstream -x -C {os.path.dirname(self.target_db.datadir)}",
                        f"--target-dir={os.path.dirname(self.target_db.datadir)}/.data.orchagent-seed",
                        staging):
            out = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout
            found += [line for line in out.splitlines() if "pgrep" not in line]
        return found

    async def assert_target_untouched(self, seed: str) -> None:
        await S.wait_for(lambda: not self.our_processes(seed), timeout=15)
        self.assertEqual(os.listdir(self.target_db.datadir), [])
        leftovers = [n for n in os.listdir(os.path.dirname(self.target_db.datadir)) if "orchagent" in n]
        self.assertEqual(leftovers, [], "staging was removed")
        self.assertEqual(os.listdir(os.path.join(self.home, "source", "state", "hot")), [])

    # --- tests -----------------------------------------------------------------------------

    async def test_seed_under_writes_equal_checksums(self):
        """A seed taken while the writer inserts: the target starts with every row committed
        before the seed and the source's CHECKSUM TABLEs (writes over for the comparison)."""
        self.servers()
        self.managers()
        writer = subprocess.Popen(self.source_db.client_argv(DATABASE) + ["-e", "CALL writer(2.0)"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(writer.wait)
        marker = 0
        while marker < 200:
            await task.deferLater(reactor, 0.05, lambda: None)
            marker = int(self.source_db.sql(f"SELECT COALESCE(MAX(id), 0) FROM {DATABASE}.w")[0][0])
        await self.start_seed("s1")
        samples = []

        async def sample():
            while not self.target.records["s1"].terminal:
                samples.append(((await self.source.status("s1"))["BytesDone"],
                                (await self.target.status("s1"))["BytesDone"]))
                await task.deferLater(reactor, 0.02, lambda: None)

        await sample()
        sent, received = await self.ended("s1")
        self.assertEqual((sent["State"], received["State"]), ("completed", "completed"),
                         (sent["Error"], received["Error"]))
        self.assertEqual(sent["BytesTotal"], received["BytesTotal"])
        self.assertEqual(received["BytesDone"], received["BytesTotal"])
        self.assertGreater(received["FilesTotal"], 10)
        self.assertTrue(any(0 < target < received["BytesTotal"] for _, target in samples),
                        "progress was seen during the stream")
        await task.deferLater(reactor, 0, writer.wait)
        self.assertEqual(writer.returncode, 0)
        await self.assert_target_untouched_but_seeded("s1")
        await self.target_db.start_async()
        last = int(self.target_db.sql(f"SELECT MAX(id) FROM {DATABASE}.w")[0][0])
        self.assertGreaterEqual(last, marker, "every row committed before the seed is there")
        self.assertEqual(self.target_db.sql(ROWS_UP_TO.format(marker=last)),
                         self.source_db.sql(ROWS_UP_TO.format(marker=last)))
        self.assertEqual(table_checksums(self.target_db), table_checksums(self.source_db))

    async def assert_target_untouched_but_seeded(self, seed: str) -> None:
        """After a good seed: the tools are gone, staging too; the datadir is the mysql
        user's, ready for mysqld."""
        await S.wait_for(lambda: not self.our_processes(seed), timeout=15)
        parent = os.path.dirname(self.target_db.datadir)
        self.assertEqual([n for n in os.listdir(parent) if "orchagent" in n], [])
        owner = os.stat(self.target_db.datadir).st_uid
        ibdata = os.stat(os.path.join(self.target_db.datadir, "ibdata1"))
        self.assertEqual(ibdata.st_uid, owner)
        self.assertTrue(os.path.exists(os.path.join(self.target_db.datadir, DATABASE, "t1.ibd")))

    async def test_flipped_byte_fails_the_seed(self):
        """One byte flipped in transit: the chunk's digest catches it; both sides fail with
        the reason, the target datadir stays empty, staging and tools are gone."""
        self.servers()
        self.managers()
        factory = protocol.Factory.forProtocol(_Proxy)
        factory.target, factory.count, factory.times = self.port, 0, 1
        factory.flip_at, factory.flipped, factory.fronts = 400_000, 0, []
        proxy = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(proxy.stopListening)
        self.addCleanup(_Proxy.close_all, factory)
        await self.start_seed("s2", port=proxy.getHost().port)
        sent, received = await self.ended("s2")
        self.assertEqual(factory.flipped, 1)
        self.assertEqual((sent["State"], received["State"]), ("failed", "failed"))
        self.assertIn("hot seed s2: step receive failed: the stream failed verification",
                      received["Error"])
        self.assertIn("the receiver reports: hot seed s2: step receive failed", sent["Error"])
        await self.assert_target_untouched("s2")

    async def test_backup_tool_failing(self):
        """mariabackup cannot connect (a user the server does not know, in its own option
        group): the seed fails naming the step and the tool's error; nothing changed."""
        self.servers()
        options = os.path.join(self.home, "bad.cnf")
        with open(self.source_db.option_file) as fh:
            text = fh.read()
        with open(options, "w") as fh:
            fh.write(text + "\n[mariabackup]\nuser=nobody_at_all\npassword=wrong\n")
        self.managers(mysql_options_file=options)
        await self.start_seed("s3")
        sent, received = await self.ended("s3")
        self.assertEqual((sent["State"], received["State"]), ("failed", "failed"))
        self.assertIn("hot seed s3: step backup failed: mariabackup --backup --stream exited with "
                      "status 1", sent["Error"])
        self.assertIn("Access denied", sent["Error"])
        self.assertIn("the sender stopped the seed: hot seed s3: step backup failed", received["Error"])
        await self.assert_target_untouched("s3")

    async def abort_mid_stream(self, seed: str, side: str) -> tuple[dict, dict]:
        self.servers()
        self.managers(seed_rate_limit_bytes_per_sec=4 << 20)
        await self.start_seed(seed)
        await S.wait_for(lambda: self.target.records[seed].bytes_done > (2 << 20), timeout=60)
        self.assertFalse(self.target.records[seed].terminal)
        self.assertTrue(self.our_processes(seed), "the tools run while streaming")
        manager = self.source if side == "source" else self.target
        self.assertTrue(await manager.abort(seed))
        sent, received = await self.ended(seed)
        await self.assert_target_untouched(seed)
        return sent, received

    async def test_abort_on_the_source_mid_stream(self):
        sent, received = await self.abort_mid_stream("s4", "source")
        self.assertEqual((sent["State"], sent["Error"]), ("aborted", "aborted through the API"))
        self.assertEqual((received["State"], received["Error"]),
                         ("aborted", "the sender stopped the seed: aborted through the API"))

    async def test_abort_on_the_source_before_the_stream_is_open(self):
        """Aborted at once, while the stream to the target is still in its handshake: the
        sender says so when the handshake is done, and the target ends aborted too
        instead of waiting for a stream."""
        self.servers()
        self.managers()
        await self.start_seed("s9")
        self.assertIsNone(self.source.jobs["s9"].stream.key)
        self.assertTrue(await self.source.abort("s9"))
        sent, received = await self.ended("s9")
        self.assertEqual((sent["State"], sent["Error"]), ("aborted", "aborted through the API"))
        self.assertEqual((received["State"], received["Error"]),
                         ("aborted", "the sender stopped the seed: aborted through the API"))
        await self.assert_target_untouched("s9")

    async def test_abort_on_the_target_mid_stream(self):
        sent, received = await self.abort_mid_stream("s5", "target")
        self.assertEqual((received["State"], received["Error"]), ("aborted", "aborted through the API"))
        self.assertEqual((sent["State"], sent["Error"]),
                         ("aborted", "the receiver reports: aborted through the API"))

    async def test_target_agent_stop_mid_stream(self):
        """The target's seed engine stops mid-stream: a stream cannot resume, so both sides
        fail, and staging and the extractor are gone."""
        self.servers()
        self.managers(seed_rate_limit_bytes_per_sec=4 << 20)
        await self.start_seed("s6")
        await S.wait_for(lambda: self.target.records["s6"].bytes_done > (2 << 20), timeout=60)
        await self.target.stopService()
        await S.wait_for(lambda: self.source.records["s6"].terminal, timeout=30)
        sent = await self.source.status("s6")
        self.assertEqual(sent["State"], "failed")
        self.assertIn("the agent stopped while receiving a streamed hot seed", sent["Error"])
        self.assertIn("cannot resume", self.target.records["s6"].error)
        await S.wait_for(lambda: not self.our_processes("s6"), timeout=15)
        self.assertEqual(os.listdir(self.target_db.datadir), [])
        parent = os.path.dirname(self.target_db.datadir)
        self.assertEqual([n for n in os.listdir(parent) if "orchagent" in n], [])


    async def test_source_agent_stop_mid_stream(self):
        """The source's seed engine stops mid-stream: the backup tool is stopped, both sides
        fail, the target is left as it was."""
        self.servers()
        self.managers(seed_rate_limit_bytes_per_sec=4 << 20)
        await self.start_seed("s7")
        await S.wait_for(lambda: self.target.records["s7"].bytes_done > (2 << 20), timeout=60)
        await self.source.stopService()
        self.assertIn("the agent stopped while the hot backup was streaming",
                      self.source.records["s7"].error)
        await S.wait_for(lambda: self.target.records["s7"].terminal and "s7" not in self.target.jobs,
                         timeout=30)
        received = await self.target.status("s7")
        self.assertEqual(received["State"], "failed")
        self.assertIn("the agent stopped while the hot backup was streaming", received["Error"])
        await self.assert_target_untouched("s7")


class RestartTests(unittest.TestCase):
    """A target agent killed mid-stream (no clean stop): on its next start the seed is
    failed, not resumed, and what the extractor left in staging is removed."""

    async def test_restarted_target_fails_a_streamed_receive(self):
        from orchagent.backups.hot import HotSeeds
        from orchagent.backups.tools import Tools
        from orchagent.process import ProcessRunner
        from orchagent.seed.manager import SeedManager
        from orchagent.seed.staging import Staging

        base = os.path.abspath(self.mktemp())
        datadir = os.path.join(base, "data")
        os.makedirs(datadir)
        config = Config(state_dir=os.path.join(base, "state"), seed_transfer_port=S.free_port())
        store = state.StateStore(config.state_dir)
        store.open()
        store.save(state.SeedRecord(seed_id="r1", role="receiver", state=state.RUNNING,
                                    datadir=datadir, source="hot", bytes_done=5 << 20))
        staging = Staging(datadir, "r1")
        os.makedirs(os.path.join(staging.root, "db"))
        with open(os.path.join(staging.root, "db", "t.ibd"), "wb") as fh:
            fh.write(b"half of a table")
        runner = ProcessRunner(reactor)
        host, service = S.Host(datadir), S.Service()
        manager = SeedManager(config, reactor, runner, host, service, S.Snapshots(datadir),
                              hot=HotSeeds(config, runner, host, service, Tools(config, runner)))
        manager.startService()
        self.addCleanup(lambda: manager.stopService() if manager.running else None)
        await S.wait_for(lambda: manager.records["r1"].terminal and "r1" not in manager.jobs)
        status = await manager.status("r1")
        self.assertEqual((status["State"], status["Error"]),
                         ("failed", "the agent restarted while receiving a streamed hot seed; a "
                                    "stream cannot resume: start the seed again"))
        self.assertFalse(os.path.exists(staging.root))
        self.assertEqual(os.listdir(datadir), [])


class ChunkTests(unittest.TestCase):
    """The source's pipe reader: chunks in order, the stream digest over all of them."""

    def test_chunks_and_digest(self):
        import blake3

        from orchagent.seed import frames

        read_end, write_end = os.pipe()
        data = os.urandom(streamed.CHUNK * 2 + 12345)
        writer = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=write_end)
        os.close(write_end)
        self.addCleanup(os.close, read_end)
        feeder = threading.Thread(target=lambda: (writer.stdin.write(data), writer.stdin.close()))
        feeder.start()
        self.addCleanup(feeder.join)
        reader = streamed._PipeReader(read_end, bytes(32))
        got = []
        while True:
            item = reader.read()
            if item is None:
                break
            pieces, length = item
            frame, = frames.iter_frames([b"".join(pieces)])
            chunk = frames.open_data(frame, bytes(32))
            self.assertEqual(chunk.offset, sum(len(g) for g in got))
            got.append(b"".join(bytes(p) for p in frames.unpack_chunk(chunk)))
        writer.wait()
        self.assertEqual(b"".join(got), data)
        self.assertEqual([len(g) for g in got[:2]], [streamed.CHUNK, streamed.CHUNK])
        records = blake3.blake3()
        for number, piece in enumerate(got):
            records.update(streamed.STREAM_RECORD.pack(number * streamed.CHUNK, len(piece),
                                                       blake3.blake3(piece).digest()))
        self.assertEqual(reader.hasher.hexdigest(), records.hexdigest())
