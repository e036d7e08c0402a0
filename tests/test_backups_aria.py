"""The Aria tables of a prepared copy (issue #17, backup_mount error points at the
``pwrite64`` of ``bk/a.MAI`` inside ``mariabackup --prepare``).

``--prepare``'s Aria recovery ignores a failed write of a table: no message, exit
status 0, the table left "not closed properly" as the backup copied it.  The agent's
verify step checks every Aria table of the copy with ``aria_chk --check --read-only``
(``Tools.aria_damage``).  One real backup of a real MariaDB (an InnoDB and an Aria
table in ``bk``, plus the mysql schema's Aria tables) per class; each test prepares its
own copy of it, for real, with the agent's runner.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import types

from twisted.internet import defer, reactor
from twisted.trial import unittest

from orchagent.backups.prepare import Place, Preparer
from orchagent.backups.tools import Tools, aria_tables
from orchagent.config import Config
from orchagent.errors import CommandFailed, StepFailed
from orchagent.process import ProcessRunner
from tests.support import lossy_disk
from tests.support import mariadb as mariadb_support


class _Cleanups:
    def __init__(self):
        self.calls = []

    def addCleanup(self, function, *args, **kwargs):
        self.calls.append((function, args, kwargs))

    def run(self):
        for function, args, kwargs in reversed(self.calls):
            function(*args, **kwargs)


class _PrepareUnderStrace(ProcessRunner):
    """The agent's runner, with ``--prepare`` run under ``strace -e inject=``:
    ``inject`` on the file ``name`` of its target directory (what the enumerator
    injects)."""

    inject = ""
    name = ""

    def run(self, argv, **kwargs):
        if "--prepare" in argv:
            target = next(a for a in argv if a.startswith("--target-dir=")).split("=", 1)[1]
            argv = ["strace", "-f", "-o", "/dev/null", "-e", f"inject={self.inject}",
                    "-P", os.path.join(target, self.name), *argv]
        return super().run(argv, **kwargs)


class _FailingAriaWrites(_PrepareUnderStrace):
    """Every ``pwrite64`` of ``bk/a.MAI`` fails with EIO."""

    inject, name = "pwrite64:error=EIO", "bk/a.MAI"


class _FailingPrepareWrite(_PrepareUnderStrace):
    """Every write of the file ``name`` fails with EIO."""

    inject = "write:error=EIO"


class _FailingAriaLog(_PrepareUnderStrace):
    """The first ``pwrite64`` of the Aria log ``aria_log.00000001`` fails with EIO: the
    tool's threads then wait on each other forever (no CPU time, no I/O)."""

    inject, name = "pwrite64:error=EIO:when=1", "aria_log.00000001"


class _FailingAriaLogSync(_PrepareUnderStrace):
    """The second ``fdatasync`` of the Aria log fails with EDQUOT (backup_mount error
    point #471): the tool says so and exits 0."""

    inject, name = "fdatasync:error=EDQUOT:when=2", "aria_log.00000001"


class _LosingPrepareWrites(ProcessRunner):
    """The agent's runner; before ``--prepare`` runs, the lossy disk at ``mount`` has
    no room left for a new block (tests.support.lossy_disk.limit), and after it a MiB
    is written into the copy, as a tool's last write.  (The prepare's own new blocks are
    lost too, but how many it needs varies: the allocator may give a file it rewrites
    the blocks it just freed.)"""

    mount = ""

    def run(self, argv, **kwargs):
        if "--prepare" in argv:
            lossy_disk.limit(self.mount, 0)
            target = next(a for a in argv if a.startswith("--target-dir=")).split("=", 1)[1]
            argv = ["sh", "-c", '"$@"; code=$?; head -c 1048576 /dev/urandom > "$0/last-write"; '
                    'exit $code', target, *argv]
        return super().run(argv, **kwargs)


_made: dict[str, str] = {}


def _backup_unavailable() -> str | None:
    reason = mariadb_support.unavailable_reason()
    for tool in ("mariabackup", "aria_chk", "innochecksum", "strace"):
        if reason is None and shutil.which(tool) is None:
            reason = f"{tool} is not installed"
    return reason


def _shared_backup() -> str:
    """The backup, made once per process (its server destroyed at once, the backup
    removed when the process exits)."""
    if "backup" not in _made:
        cleanups = _Cleanups()
        base = tempfile.mkdtemp(prefix="aria-damage-")
        atexit.register(shutil.rmtree, base, True)
        try:
            db = mariadb_support.MariaDB.create(cleanups)
            db.sql("CREATE DATABASE bk")
            db.sql("CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(40)) ENGINE=InnoDB; "
                   "INSERT INTO t SELECT seq, MD5(seq) FROM seq_1_to_300; "
                   "CREATE TABLE a (id INT PRIMARY KEY, v VARCHAR(40)) ENGINE=Aria; "
                   "INSERT INTO a SELECT seq, MD5(seq) FROM seq_1_to_300", "bk")
            backup = os.path.join(base, "full1")
            result = subprocess.run(["mariabackup", f"--defaults-file={db.option_file}", "--backup",
                                     f"--target-dir={backup}"], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, timeout=120)
        finally:
            cleanups.run()
        if result.returncode:
            raise RuntimeError("mariabackup --backup failed: " + result.stdout.decode(errors="replace")[-2000:])
        _made["backup"] = backup
    return _made["backup"]


class _FailingRemoval(ProcessRunner):
    """The agent's runner, whose ``rm`` of a work copy fails (the error that failed a step
    often fails the removal too: backup_mount error points #491-#544 and #717-#744)."""

    def run(self, argv, **kwargs):
        if argv[0] == "rm":
            return defer.fail(CommandFailed(f"command rm exited with status 1: rm: cannot remove "
                                            f"'{argv[-1]}/data': Input/output error"))
        return super().run(argv, **kwargs)


class AriaDamageTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        reason = _backup_unavailable()
        if reason:
            raise unittest.SkipTest(reason)
        self.backup = _shared_backup()
        self.home = os.path.abspath(self.mktemp())
        os.makedirs(self.home)

    def preparer(self, runner: ProcessRunner) -> Preparer:
        return Preparer(Config(), runner, Tools(Config(), runner), host=None)

    async def make(self, runner: ProcessRunner) -> str:
        chain = [types.SimpleNamespace(name="full1", path=self.backup, tool="mariabackup",
                                       encrypted=False, compressed=None)]
        return await self.preparer(runner).make(chain, Place(os.path.join(self.home, "work"), False), None)

    async def test_a_failed_write_of_an_aria_table_fails_the_verify_step(self):
        runner = _FailingAriaWrites(reactor)
        # The tool says nothing and exits 0 (why the agent checks the tables itself).
        copy = os.path.join(self.home, "by-hand")
        subprocess.run(["cp", "-a", "-T", self.backup, copy], check=True)
        result = await runner.run(["mariabackup", f"--defaults-file={copy}/backup-my.cnf", "--prepare",
                                   f"--target-dir={copy}"], check=False, timeout=120)
        self.assertTrue(result.ok, result.tool_failure("mariabackup --prepare"))
        self.assertEqual(Tools.ignored_failure(result.stdout + result.stderr), "")
        damage = await Tools(Config(), runner).aria_damage(copy)
        self.assertIn("bk/a.MAI: warning: 1 client is using or hasn't closed the table properly", damage)

        with self.assertRaises(StepFailed) as caught:
            await self.make(runner)
        message = caught.exception.message
        self.assertIn("backup full1: step verify failed", message)
        self.assertIn("aria_chk --check", message)
        self.assertIn("bk/a.MAI", message)
        self.assertIn("hasn't closed the table properly", message)
        self.assertFalse(os.path.exists(os.path.join(self.home, "work")))  # the copy removed

    async def test_a_work_copy_that_cannot_be_removed_keeps_the_steps_reason(self):
        """A failed step whose work copy could not be removed either answered the
        removal's error alone ("command rm exited with status 1"), the step's own reason
        lost; both are said now, and where the copy is."""
        class Both(_FailingRemoval, _FailingAriaWrites):
            pass

        runner = Both(reactor)
        work = os.path.join(self.home, "work")
        with self.assertRaises(StepFailed) as caught:
            await self.make(runner)
        message = caught.exception.message
        self.assertIn("backup full1: step verify failed: the prepare left an Aria table damaged", message)
        self.assertIn(f"the backup is unchanged and its work copy {work} could not be removed "
                      f"(command rm exited with status 1: rm: cannot remove '{work}/data': "
                      "Input/output error); it is recorded and removed by the agent's next attempt",
                      message)
        self.assertTrue(os.path.exists(work))

    async def test_a_prepare_whose_sync_failed_fails_its_step(self):
        """``--prepare`` whose second ``fdatasync`` of its Aria log fails prints "Can't
        sync file" and exits 0: the copy was mounted, a failed fsync ending in success
        (what the file held may be gone from the page cache)."""
        with self.assertRaises(StepFailed) as caught:
            await self.make(_FailingAriaLogSync(reactor))
        self.assertIn("backup full1: step prepare failed: mariabackup --prepare exited 0, but it "
                      "could not sync a file it wrote: mariabackup: Can't sync file "
                      "'./aria_log.00000001' to disk (Errcode: 122", caught.exception.message)
        self.assertFalse(os.path.exists(os.path.join(self.home, "work")))

    async def test_a_prepare_that_hangs_is_stopped_and_its_step_fails(self):
        """``mariabackup --prepare`` whose first write of its Aria log fails never ends;
        the agent runs it with no time limit, so mountlv (or a restore) waited with it.
        Stopped once it made no progress for ToolStallSeconds: the step fails saying so,
        the work copy and the tool are gone."""
        runner = _FailingAriaLog(reactor)
        preparer = Preparer(Config(tool_stall_seconds=2), runner,
                            Tools(Config(tool_stall_seconds=2), runner), host=None)
        chain = [types.SimpleNamespace(name="full1", path=self.backup, tool="mariabackup",
                                       encrypted=False, compressed=None)]
        work = os.path.join(self.home, "work")
        with self.assertRaises(StepFailed) as caught:
            await preparer.make(chain, Place(work, False), None)
        self.assertIn("backup full1: step prepare failed: mariabackup --prepare made no progress "
                      "(no CPU time, no I/O) for 2s and was killed", caught.exception.message)
        self.assertFalse(os.path.exists(work))
        self.assertNotIn(work.encode(), subprocess.run(["ps", "-eo", "args"], stdout=subprocess.PIPE).stdout)

    async def test_a_prepare_whose_writes_are_lost_fails_its_sync_step(self):
        """The copy made, then every new block the prepare and the tool after it write
        lost on their way to the disk (a real writeback error: tests.support.lossy_disk):
        mariabackup exits 0 and every check passes, reading the page cache; the sync
        step, through a descriptor opened before the copy began, is what sees it."""
        mount = lossy_disk.make_lossy_disk(self, 64 << 20)
        runner = _LosingPrepareWrites(reactor)
        runner.mount = mount
        preparer = Preparer(Config(), runner, Tools(Config(), runner), host=None)
        chain = [types.SimpleNamespace(name="full1", path=self.backup, tool="mariabackup",
                                       encrypted=False, compressed=None)]
        work = os.path.join(mount, "work")
        with self.assertRaises(StepFailed) as caught:
            await preparer.make(chain, Place(work, False), None)
        self.assertRegex(caught.exception.message,
                         r"^backup full1: step sync failed: the file system of .* reported a write "
                         r"error \((EIO|ENOSPC): .*\) while the copy .*/work was written: it may "
                         "not be on disk; the backup is unchanged and its work copy was removed$")
        self.assertFalse(os.path.exists(work))

    async def test_a_prepare_that_could_not_write_its_own_files_fails(self):
        """``--prepare`` whose write of ``xtrabackup_checkpoints`` or of
        ``xtrabackup_binlog_pos_innodb`` fails leaves the file empty and exits 0
        (backup_mount error points #448 and #452, every errno): the copy was mounted
        saying it was not prepared, its binlog position gone."""
        for name, said in (("xtrabackup_checkpoints", "its checkpoints file xtrabackup_checkpoints "
                                                      "says 'nothing', not prepared"),
                           ("xtrabackup_binlog_pos_innodb", "it left xtrabackup_binlog_pos_innodb empty")):
            runner = _FailingPrepareWrite(reactor)
            runner.name = name
            with self.assertRaises(StepFailed) as caught:
                await self.make(runner)
            self.assertIn(f"backup full1: step prepare failed: mariabackup --prepare exited 0, but {said}: "
                          "a write of it failed", caught.exception.message)
            self.assertFalse(os.path.exists(os.path.join(self.home, "work")))

    async def test_a_correct_prepare_passes(self):
        """Every Aria table of a correct prepare passes: bk/a (recovered) and the mysql
        schema's (no recovery work)."""
        runner = ProcessRunner(reactor)
        data = await self.make(runner)
        tables = aria_tables(data)
        self.assertIn("bk/a.MAI", tables)
        self.assertGreater(len([t for t in tables if t.startswith("mysql/")]), 10)
        self.assertEqual(await Tools(Config(), runner).aria_damage(data), "")

    async def test_no_aria_chk_warns_once_and_skips(self):
        runner = ProcessRunner(reactor)
        copy = os.path.join(self.home, "copy")
        subprocess.run(["cp", "-a", "-T", self.backup, copy], check=True)
        tools = Tools(Config(), runner)
        tools.path = lambda tool: None
        said = []
        from orchagent.backups import tools as tools_module
        self.patch(tools_module.log, "warn", lambda text, **kw: said.append(text.format(**kw)))
        self.patch(Tools, "_aria_chk_missing_said", False)
        self.assertEqual(await tools.aria_damage(copy), "")
        self.assertEqual(await tools.aria_damage(copy), "")
        self.assertEqual(len(said), 1)
        self.assertIn("aria_chk is not installed", said[0])


class _HotSeedWithWrappedPrepare(unittest.TestCase):
    """Real servers and managers (tests.test_backups_hot_stream) whose target runs its
    ``--prepare`` as ``PREPARE`` says (tests.test_backups_hot_stream.wrap_mariabackup),
    and a source with an Aria table (``bk.a``) for its Aria recovery to work on."""

    timeout = 180
    PREPARE = ""

    def setUp(self):
        from tests.test_backups_hot_stream import StreamedHotSeedTests, wrap_mariabackup

        if shutil.which("strace") is None or shutil.which("aria_chk") is None:
            raise unittest.SkipTest("strace and aria_chk are needed")
        StreamedHotSeedTests.setUp(self)
        wrap_mariabackup(self, self.PREPARE)

    def our_processes(self, seed: str) -> list[str]:
        from tests.test_backups_hot_stream import StreamedHotSeedTests

        return StreamedHotSeedTests.our_processes(self, seed)

    async def seed(self, seed: str, **target_overrides) -> tuple[dict, dict]:
        """Both sides' status once the hot seed ``seed`` ended."""
        from tests.test_backups_hot_stream import StreamedHotSeedTests as T

        T.servers(self)
        self.source_db.sql("CREATE DATABASE IF NOT EXISTS bk")
        self.source_db.sql("CREATE TABLE a (id INT PRIMARY KEY, v VARCHAR(40)) ENGINE=Aria; "
                           "INSERT INTO a SELECT seq, MD5(seq) FROM seq_1_to_300", "bk")
        self.source = T.manager(self, "source", self.source_db)
        self.target = T.manager(self, "target", self.target_db, **target_overrides)
        await T.start_seed(self, seed)
        return await T.ended(self, seed)


class HotSeedAriaDamageTests(_HotSeedWithWrappedPrepare):
    """The same failed write inside a streamed hot seed's ``--prepare`` in the target's
    staging: the seed fails at its prepare step, the datadir untouched.  The target's
    mariabackup runs under strace failing the ``pwrite64`` of ``bk/a.MAI`` in its
    ``--target-dir``."""

    PREPARE = 'exec strace -f -o /dev/null -e inject=pwrite64:error=EIO -P "$dir/bk/a.MAI" {real} "$@"'

    async def test_the_hot_seed_fails_and_the_datadir_is_untouched(self):
        from tests.test_backups_hot_stream import StreamedHotSeedTests as T

        sent, received = await self.seed("s7")
        self.assertEqual(received["State"], "failed", received)
        self.assertIn("hot seed s7: step prepare failed: mariabackup --prepare exited 0, but left "
                      "an Aria table damaged: aria_chk --check", received["Error"])
        self.assertIn("bk/a.MAI: warning: 1 client is using or hasn't closed the table properly",
                      received["Error"])
        self.assertNotEqual(sent["State"], "completed")
        await T.assert_target_untouched(self, "s7")


class HotSeedHungPrepareTests(_HotSeedWithWrappedPrepare):
    """A hot seed's ``--prepare`` in the target's staging that hangs (the first write of
    its Aria log failing, as in AriaDamageTests) is stopped after ToolStallSeconds: the
    seed fails at its prepare step saying so, the datadir untouched, no tool left."""

    PREPARE = ('exec strace -f -o /dev/null -e inject=pwrite64:error=EIO:when=1 '
               '-P "$dir/aria_log.00000001" {real} "$@"')

    async def test_the_hot_seed_fails_at_its_prepare_and_the_datadir_is_untouched(self):
        from tests.test_backups_hot_stream import StreamedHotSeedTests as T

        sent, received = await self.seed("s8", tool_stall_seconds=2)
        self.assertEqual(received["State"], "failed", received)
        self.assertIn("hot seed s8: step prepare failed: mariabackup --prepare made no progress "
                      "(no CPU time, no I/O) for 2s and was killed", received["Error"])
        self.assertNotEqual(sent["State"], "completed")
        await T.assert_target_untouched(self, "s8")
        self.assertEqual(self.our_processes("s8"), [])
