"""Restores killed with SIGKILL at each step of the datadir swap, then a fresh agent start.

Each test runs one ``/api/restore-snapshot`` in a child process (tests.support.crash_restore)
that kills itself with SIGKILL right before or right after an exact command (the work
copy, the first or second rename, a rename of the undo), on real file systems with real
commands.  Then an agent starts as the daemon does (``build_service`` + ``startService``)
and must leave the datadir exactly the old tree or exactly the new one (every file's
name, type, mode and content compared), no ``.restoring-*`` work copy, a
``.replaced-*`` holding the old tree only when it rolled forward, no record left, an
``lvs`` whose every path exists, and a retry that works and leaves no extra copy.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from twisted.internet import reactor, task
from twisted.trial import unittest

from orchagent.config import Config
from orchagent.service import build_service
from tests.support.btrfs import make_btrfs
from tests.support.daemon import REPO_ROOT

SNAPSHOT = "mysql-snap-20260101T000000Z"
OLD, NEW = "old", "new"


def write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


def tree(top: str) -> dict[str, tuple]:
    """Every entry under ``top``: type, mode and content (files) or target (links)."""
    found: dict[str, tuple] = {}
    for directory, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            relative = os.path.relpath(path, top)
            if os.path.islink(path):
                found[relative] = ("link", os.readlink(path))
            elif name in files:
                with open(path, "rb") as fh:
                    found[relative] = ("file", st.st_mode, fh.read())
            else:
                found[relative] = ("dir", st.st_mode)
    return found


def fill(datadir: str, version: str) -> None:
    """A datadir-like tree; ``version`` changes contents, adds and removes files."""
    write(os.path.join(datadir, "ibdata1"), (version.encode() * 3000)[:12288])
    write(os.path.join(datadir, "db", "t.ibd"), f"rows of {version}\n".encode())
    write(os.path.join(datadir, "mysql", "user.MYD"), b"users")
    write(os.path.join(datadir, f"only-in-{version}"), version.encode())
    os.symlink("db/t.ibd", os.path.join(datadir, f"link-{version}"))


class CrashCase:
    """A datadir (old tree) and a snapshot of another (new tree); subclasses say where
    (and are the TestCases)."""

    timeout = 120
    backend = ""
    copy_command = ""
    restore_name = SNAPSHOT

    def setUp(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("restores rename datadirs and mount: they need root")
        self.make_places()
        self.config_values = dict(
            snapshot_backend=self.backend, snapshot_directory=self.snapshot_dir,
            snapshot_mount_point=self.mount_point, snapshot_volumes_filter="mysql-snap",
            mysql_datadir_command=f"echo {shlex.quote(self.datadir)}", state_dir=self.state_dir,
            mysql_service_start_command="true", mysql_service_stop_command="true",
            mysql_service_status_command="false", http_port=0, http_bind_address="127.0.0.1",
            seed_engine_process=False, token_hint_file="")
        self.parent = os.path.dirname(self.datadir)
        self.expected = {OLD: tree(self.datadir), NEW: tree(self.snapshot)}
        self.assertNotEqual(self.expected[OLD], self.expected[NEW])

    def make_places(self) -> None:
        raise NotImplementedError

    # --- the crash and the fresh start -------------------------------------------------

    def crash(self, at: str, expect_killed: bool = True, **overrides) -> str:
        """Run the restore in a child that kills itself at ``at``; its output."""
        values = dict(self.config_values, **overrides)
        path = os.path.join(self.state_dir, f"crash-{len(os.listdir(self.state_dir))}.json")
        with open(path, "w") as fh:
            json.dump(values, fh)
        env = dict(os.environ, PYTHONPATH=REPO_ROOT)
        result = subprocess.run([sys.executable, "-m", "tests.support.crash_restore", path,
                                 self.restore_name, at], cwd=REPO_ROOT, env=env, timeout=300,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if expect_killed:
            self.assertEqual(result.returncode, -signal.SIGKILL,
                             f"the restore did not reach {at}:\n{result.stdout[-3000:]}")
        return result.stdout

    async def start_agent(self, **overrides):
        """An agent started as the daemon is; returns it once its start-up recovery ran."""
        root = build_service(Config(**dict(self.config_values, **overrides)), {}, reactor)
        root.startService()
        self.addCleanup(root.stopService)
        await root.agent.snapshots.lock.run(lambda: None)
        return root.agent

    # --- what must hold ----------------------------------------------------------------

    def names(self, mark: str) -> list[str]:
        return sorted(n for n in os.listdir(self.parent) if mark in n)

    def records(self) -> list[str]:
        directory = os.path.join(self.state_dir, "restores")
        return sorted(os.listdir(directory)) if os.path.isdir(directory) else []

    def assert_settled(self, wanted: str, replaced_before: int = 0) -> None:
        self.assertTrue(os.path.isdir(self.datadir), f"no datadir {self.datadir}")
        current = tree(self.datadir)
        if current != self.expected[wanted]:
            other = OLD if wanted == NEW else NEW
            state = "the other tree" if current == self.expected[other] else "neither tree"
            self.fail(f"the datadir is {state}, not the {wanted} one: "
                      f"{sorted(current)} vs {sorted(self.expected[wanted])}")
        self.assertEqual(self.names(".restoring-"), [])
        replaced = self.names(".replaced-")
        if wanted == NEW:
            self.assertEqual(len(replaced), replaced_before + 1, replaced)
            self.assertEqual(tree(os.path.join(self.parent, replaced[-1])), self.expected[OLD])
        else:
            self.assertEqual(len(replaced), replaced_before, replaced)
        self.assertEqual(self.records(), [])

    async def check_lvs_and_retry(self, agent) -> None:
        volumes = await agent.snapshots.list_volumes()
        for volume in volumes:
            self.assertTrue(os.path.lexists(volume.path), f"lvs lists {volume.path}, which does not exist")
        self.assertIn(self.datadir, [v.path for v in volumes])
        replaced = len(self.names(".replaced-"))
        # names carry the second: the retry must not be in the crashed restore's second
        await task.deferLater(reactor, 1.05 - time.time() % 1.0, lambda: None)
        self.assertIs(await agent.snapshots.restore(SNAPSHOT), True)
        self.assertEqual(tree(self.datadir), self.expected[NEW])
        self.assertEqual(self.names(".restoring-"), [])
        self.assertEqual(len(self.names(".replaced-")), replaced + 1)
        self.assertEqual(self.records(), [])

    def assert_journaled(self, direction: str, begun: int) -> None:
        """The record the killed restore left: its swap's direction and renames begun."""
        (name,) = self.records()
        with open(os.path.join(self.state_dir, "restores", name)) as fh:
            record = json.load(fh)
        self.assertEqual((record["direction"], record["begun"]), (direction, begun), record)

    async def crash_then_recover(self, at: str, wanted: str, journaled: tuple[str, int],
                                 **overrides) -> None:
        self.crash(at, **overrides)
        self.assert_journaled(*journaled)
        agent = await self.start_agent()
        self.assert_settled(wanted)
        await self.check_lvs_and_retry(agent)

    # --- the steps ---------------------------------------------------------------------

    async def test_killed_once_the_work_copy_is_made(self):
        await self.crash_then_recover(f"{self.copy_command}:1:after", OLD, ("forward", 0))

    async def test_killed_right_before_the_datadir_is_renamed_aside(self):
        await self.crash_then_recover("mv:1:before", OLD, ("forward", 1))

    async def test_killed_once_the_datadir_is_renamed_aside(self):
        await self.crash_then_recover("mv:1:after", NEW, ("forward", 1))

    async def test_killed_right_before_the_new_tree_is_renamed_in(self):
        await self.crash_then_recover("mv:2:before", NEW, ("forward", 2))

    async def test_killed_once_the_new_tree_is_renamed_in(self):
        await self.crash_then_recover("mv:2:after", NEW, ("forward", 2))

    async def test_killed_while_undoing_a_failed_start(self):
        # MySQL does not start on the new tree: the undo renames it back to the work
        # name (mv 3), and is killed before the old datadir is renamed back (mv 4).
        await self.crash_then_recover("mv:3:after", OLD, ("back", 2),
                                      mysql_service_start_command="false")

    async def test_crashed_retries_leave_one_work_copy_at_most(self):
        for _ in range(3):
            self.crash(f"{self.copy_command}:1:after")
            self.assertLessEqual(len(self.names(".restoring-")), 1, self.names(".restoring-"))
        agent = await self.start_agent()
        self.assert_settled(OLD)
        await self.check_lvs_and_retry(agent)

    async def test_a_failed_retry_leaves_no_copy(self):
        self.crash("mv:1:after")
        output = self.crash("none", expect_killed=False, mysql_service_start_command="false")
        self.assertIn("failed: ", output)
        self.assert_settled(NEW)
        agent = await self.start_agent()
        self.assert_settled(NEW)
        await self.check_lvs_and_retry(agent)

    async def test_recovery_renames_nothing_while_mysql_runs(self):
        self.crash("mv:1:after")
        await self.start_agent(mysql_service_status_command="true")
        self.assertFalse(os.path.exists(self.datadir))
        self.assertEqual(len(self.records()), 1)
        agent = await self.start_agent()
        self.assert_settled(NEW)
        await self.check_lvs_and_retry(agent)


class CopyCrashTests(CrashCase, unittest.TestCase):
    backend = "copy"
    copy_command = "cp"

    def make_places(self) -> None:
        base = tempfile.mkdtemp(prefix="orchagent-crash-")
        self.addCleanup(shutil.rmtree, base, True)
        self.datadir = os.path.join(base, "data", "mysql")
        fill(self.datadir, OLD)
        self.snapshot_dir = os.path.join(base, "snapshots")
        self.snapshot = os.path.join(self.snapshot_dir, SNAPSHOT)
        fill(self.snapshot, NEW)
        self.mount_point = os.path.join(base, "mnt")
        self.state_dir = os.path.join(base, "state")
        for path in (self.mount_point, self.state_dir):
            os.makedirs(path)


class BtrfsCrashTests(CrashCase, unittest.TestCase):
    backend = "btrfs"
    copy_command = "btrfs"

    def make_places(self) -> None:
        fs = make_btrfs(self)
        self.datadir = fs.subvolume("mysql")
        fill(self.datadir, NEW)
        self.snapshot_dir = fs.directory("snapshots")
        self.snapshot = os.path.join(self.snapshot_dir, SNAPSHOT)
        subprocess.run(["btrfs", "-q", "subvolume", "snapshot", "-r", self.datadir, self.snapshot],
                       check=True)
        shutil.rmtree(os.path.join(self.datadir, "db"))
        os.unlink(os.path.join(self.datadir, f"only-in-{NEW}"))
        os.unlink(os.path.join(self.datadir, f"link-{NEW}"))
        os.unlink(os.path.join(self.datadir, "ibdata1"))
        fill(self.datadir, OLD)
        self.mount_point = fs.scratch("mnt")
        self.state_dir = fs.scratch("state")

    def assert_settled(self, wanted: str, replaced_before: int = 0) -> None:
        super().assert_settled(wanted, replaced_before)
        self.assertEqual(os.lstat(self.datadir).st_ino, 256, "the datadir is not a subvolume")


class MariaBackupCrashTests(unittest.TestCase):
    """A mariabackup backup of a real MariaDB restored by a child killed at a step; the
    fresh agent leaves a datadir MariaDB starts on, holding the old data or the backup's."""

    timeout = 300
    restore_name = "nightly"
    crash = CrashCase.crash
    start_agent = CrashCase.start_agent
    records = CrashCase.records
    assert_journaled = CrashCase.assert_journaled

    def setUp(self):
        from tests.test_backups_mariadb import DATABASE, backup, mariabackup_unavailable, populated

        reason = mariabackup_unavailable()
        if reason:
            raise unittest.SkipTest(reason)
        self.home = tempfile.mkdtemp(prefix="orchagent-crash-mdb-")
        self.addCleanup(shutil.rmtree, self.home, True)
        self.state_dir = os.path.join(self.home, "state")
        backups = os.path.join(self.home, "backups")
        mount_point = os.path.join(self.home, "mnt")
        for path in (self.state_dir, backups, mount_point):
            os.makedirs(path)
        self.db = populated(self)
        backup(self.db, os.path.join(backups, "nightly"))
        self.after_backup = f"SELECT COUNT(*) FROM {DATABASE}.t1 WHERE id = 99999999"
        self.db.sql(f"INSERT INTO {DATABASE}.t1 VALUES (99999999, 'after the backup', 0)")
        self.old_inode = os.stat(self.db.datadir).st_ino
        self.config_values = dict(
            self.db.agent_settings(), backup_directories=[backups], snapshot_backend="copy",
            snapshot_mount_point=mount_point, state_dir=self.state_dir, http_port=0,
            http_bind_address="127.0.0.1", seed_engine_process=False, token_hint_file="")
        self.parent = os.path.dirname(self.db.datadir)

    def names(self, mark: str) -> list[str]:
        return sorted(n for n in os.listdir(self.parent) if mark in n)

    async def crash_then_recover(self, at: str, wanted: str, journaled: tuple[str, int]) -> None:
        self.crash(at)
        self.assert_journaled(*journaled)
        # the work copy is made while MySQL runs; it is stopped right before the renames
        self.assertEqual(self.db.is_running(), not at.startswith("mv:"))
        agent = await self.start_agent()
        self.assertTrue(os.path.isdir(self.db.datadir), "no datadir after recovery")
        self.assertEqual(self.names(".restoring-"), [])
        self.assertEqual(self.records(), [])
        replaced = self.names(".replaced-")
        if wanted == NEW:
            self.assertEqual(len(replaced), 1, replaced)
            self.assertEqual(os.stat(os.path.join(self.parent, replaced[0])).st_ino, self.old_inode)
            self.assertNotEqual(os.stat(self.db.datadir).st_ino, self.old_inode)
        else:
            self.assertEqual(replaced, [])
            self.assertEqual(os.stat(self.db.datadir).st_ino, self.old_inode)
        if not self.db.is_running():
            self.db.start()
        self.assertEqual(self.db.sql(self.after_backup), [("0",)] if wanted == NEW else [("1",)])
        for volume in await agent.snapshots.list_volumes():
            if volume.group_name != "backup":  # a backup's Path is its name
                self.assertTrue(os.path.lexists(volume.path), f"lvs lists {volume.path}, which does not exist")
        await task.deferLater(reactor, 1.05 - time.time() % 1.0, lambda: None)
        self.assertIs(await agent.snapshots.restore("nightly"), True)
        self.assertTrue(self.db.is_running())
        self.assertEqual(self.db.sql(self.after_backup), [("0",)])
        self.assertEqual(self.names(".restoring-"), [])
        self.assertEqual(len(self.names(".replaced-")), len(replaced) + 1)

    async def test_killed_while_the_prepared_copy_is_verified(self):
        await self.crash_then_recover("innochecksum:1:after", OLD, ("forward", 0))

    async def test_killed_right_before_the_datadir_is_renamed_aside(self):
        await self.crash_then_recover("mv:1:before", OLD, ("forward", 1))

    async def test_killed_once_the_datadir_is_renamed_aside(self):
        await self.crash_then_recover("mv:1:after", NEW, ("forward", 1))
