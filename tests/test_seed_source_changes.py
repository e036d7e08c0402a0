"""The source changing under a running send (#16, item 2), between two real agents.

* The snapshot API refuses to unmount, mount over or remove the snapshot a send reads,
  naming the seed; orchestrator's own sequence (umount after the seed, or after
  abort-seed) still works.
* The sender pins what it reads: a source file rewritten in place, or replaced through a
  rename, while the seed runs (or while the sending agent was down) fails the seed naming
  the file, and the target's datadir is left as it was.
* A datadir seed fails once MySQL is seen running on its source.

Each seed is rate-limited so that the test acts while the send is under way.
"""

from __future__ import annotations

import os
import subprocess

from twisted.internet import defer
from twisted.trial import unittest

from tests import seed_support as S
from tests.support.daemon import Daemon, start_daemon, wait_until

KEY = "source-change-key"
MIB = 1 << 20
#: Bytes per second the sender may send: 16 MiB take 8 s.
RATE = 2 * MIB


def _write(path: str, data: bytes, mtime_ns: int | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _replace_by_rename(path: str, data: bytes) -> None:
    """Put ``data`` (same size) at ``path`` through a rename, with the old mtime."""
    st = os.stat(path)
    assert len(data) == st.st_size
    _write(path + ".new", data, st.st_mtime_ns)
    os.rename(path + ".new", path)


def _tree(root: str) -> dict[str, bytes]:
    found = {}
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            found[os.path.relpath(path, root)] = _read(path)
    return found


class SourceChangeCase(unittest.TestCase):
    timeout = 120
    #: SeedEngineProcess of the sending agent.
    engine_process = True

    async def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        self.dst = os.path.join(self.base, "dst")
        _write(os.path.join(self.dst, "keep.me"), b"the target's old datadir\n")
        self.seed_port = S.free_port()
        self.receiver = await start_daemon(
            self, {"MySQLServiceStatusCommand": "false", "SeedTransferPort": self.seed_port,
                   "MySQLDatadirCommand": f"echo {self.dst}"},
            directory=os.path.join(self.base, "receiver"))

    async def start_sender(self, **config) -> Daemon:
        settings = {"MySQLServiceStatusCommand": "false", "SeedTransferPort": self.seed_port,
                    "SeedRateLimitBytesPerSec": RATE, "SeedEngineProcess": self.engine_process,
                    **config}
        self.sender_config = settings
        return await start_daemon(self, settings, directory=os.path.join(self.base, "sender"))

    async def ok(self, agent: Daemon, path: str, **params):
        code, body = await agent.get(path, **params)
        self.assertEqual(code, 200, f"{path}: {body}")
        return body

    async def start_seed(self, sender: Daemon, seed: str, source: str = "snapshot") -> None:
        self.assertIs(await self.ok(self.receiver, f"/api/receive-mysql-seed-data/{seed}", key=KEY), True)
        self.assertIs(await self.ok(sender, f"/api/send-mysql-seed-data/127.0.0.1:{self.seed_port}/{seed}",
                                    key=KEY, source=source), True)

        async def under_way():
            status = await self.ok(sender, f"/api/seed-status/{seed}")
            self.assertNotIn(status["State"], ("failed", "aborted", "completed"), status)
            return status["BytesDone"] > 0

        await wait_until(under_way, timeout=30)

    async def ended(self, agent: Daemon, seed: str, timeout: float = 60) -> dict:
        async def terminal():
            status = await self.ok(agent, f"/api/seed-status/{seed}")
            return status["State"] in ("failed", "aborted", "completed", "unknown")

        await wait_until(terminal, timeout=timeout)
        return await self.ok(agent, f"/api/seed-status/{seed}")

    async def assert_failed_untouched(self, sender: Daemon, seed: str, *needles: str) -> dict:
        """The sender failed saying each of ``needles``; the receiver ended without
        success; the target's datadir holds what it held."""
        status = await self.ended(sender, seed)
        self.assertEqual(status["State"], "failed", status)
        for needle in needles:
            self.assertIn(needle, status["Error"])
        theirs = await self.ended(self.receiver, seed)
        self.assertIn(theirs["State"], ("failed", "aborted"), theirs)
        self.assertIs(await self.ok(self.receiver, f"/api/seed-command-succeeded/{seed}"), False)
        self.assertEqual(_tree(self.dst), {"keep.me": b"the target's old datadir\n"})
        return status


class SnapshotMountTests(SourceChangeCase):
    """A snapshot seed (copy backend: snapshots are directories, bind-mounted read-only)."""

    async def setUp(self):
        await super().setUp()
        self.snapshots = os.path.join(self.base, "snapshots")
        self.mount_point = os.path.join(self.base, "mnt")
        os.makedirs(self.mount_point)
        self.addCleanup(self._unmount)
        # Two snapshots with the same names, sizes and mtimes, different bytes.
        self.data = {}
        for name in ("mysql-snap-20260101T000000Z", "mysql-snap-20260102T000000Z"):
            files = {"ibdata1": os.urandom(16 * MIB), "db/t1.ibd": os.urandom(MIB)}
            for rel, data in files.items():
                _write(os.path.join(self.snapshots, name, rel), data, 1_700_000_000_000_000_000)
            self.data[name] = files
        self.first, self.second = sorted(self.data)
        datadir = os.path.join(self.base, "src-datadir")
        _write(os.path.join(datadir, "ibdata1"), b"live")
        self.sender = await self.start_sender(
            MySQLDatadirCommand=f"echo {datadir}", SnapshotBackend="copy",
            SnapshotDirectory=self.snapshots, SnapshotMountPoint=self.mount_point)
        mount = await self.ok(self.sender, "/api/mountlv", lv=self.first)
        self.assertTrue(mount["IsMounted"], mount)
        self.first_path = mount["LVPath"]

    def _unmount(self):
        # A bind mount of the same file system is no mount to os.path.ismount: umount
        # until there is nothing left to unmount.
        for _ in range(5):
            if subprocess.run(["umount", "-l", self.mount_point], capture_output=True).returncode:
                break

    async def refused(self, path: str, seed: str, **params) -> str:
        code, body = await self.sender.get(path, **params)
        self.assertEqual(code, 500, f"{path} was not refused: {body}")
        self.assertEqual((body["Code"], body["Details"]), ("ERROR", None))
        self.assertIn(f"seed {seed}", body["Message"])
        return body["Message"]

    async def assert_still_first(self) -> None:
        mount = await self.ok(self.sender, "/api/mount")
        self.assertEqual((mount["IsMounted"], mount["LVPath"]), (True, self.first_path), mount)
        self.assertEqual(_read(os.path.join(self.mount_point, "ibdata1")), self.data[self.first]["ibdata1"])

    async def test_umount_mountlv_removelv_refused_while_sending(self):
        """umount, mountlv of another snapshot (same names and sizes) and removelv of the
        mounted one are refused naming the seed, and change nothing; the seed then
        completes with the first snapshot's bytes, and orchestrator's umount after it
        works."""
        await self.start_seed(self.sender, "41")
        message = await self.refused("/api/umount", "41")
        self.assertIn("abort-seed/41", message)
        await self.refused("/api/mountlv", "41", lv=self.second)
        await self.refused("/api/removelv", "41", lv=self.first)
        await self.assert_still_first()
        self.assertTrue(os.path.isdir(os.path.join(self.snapshots, self.first)))

        self.assertIs(await self.ok(self.sender, "/api/seed-rate-limit/41", bytesPerSec=0), True)
        self.assertEqual((await self.ended(self.receiver, "41"))["State"], "completed")
        self.assertEqual((await self.ended(self.sender, "41"))["State"], "completed")
        self.assertEqual(_tree(self.dst), self.data[self.first])
        mount = await self.ok(self.sender, "/api/umount")
        self.assertFalse(mount["IsMounted"], mount)

    async def test_orchestrator_abort_order_unmounts(self):
        """Refused while the send runs; orchestrator's abort (source, then target), then
        its umount of the source: the umount works, the target is untouched."""
        await self.start_seed(self.sender, "42")
        await self.refused("/api/umount", "42")
        self.assertIs(await self.ok(self.sender, "/api/abort-seed/42"), True)
        self.assertIs(await self.ok(self.receiver, "/api/abort-seed/42"), True)
        mount = await self.ok(self.sender, "/api/umount")
        self.assertFalse(mount["IsMounted"], mount)
        self.assertEqual((await self.ended(self.sender, "42"))["State"], "aborted")
        self.assertIn((await self.ended(self.receiver, "42"))["State"], ("aborted", "failed"))
        self.assertEqual(_tree(self.dst), {"keep.me": b"the target's old datadir\n"})

    async def test_file_swapped_in_the_mounted_snapshot(self):
        """The snapshot directory's ibdata1 replaced (rename, same size and mtime) under
        the bind mount while it is sent: the seed fails naming it."""
        await self.start_seed(self.sender, "43")
        _replace_by_rename(os.path.join(self.snapshots, self.first, "ibdata1"),
                           self.data[self.second]["ibdata1"])
        await self.assert_failed_untouched(
            self.sender, "43", os.path.join(self.mount_point, "ibdata1"),
            "changed while it was being sent")


class InProcessSnapshotMountTests(SnapshotMountTests):
    """The same with seeds in the agent's own process (SeedEngineProcess false)."""

    engine_process = False


class DatadirSourceTests(SourceChangeCase):
    """A datadir seed (source=datadir) from a tree the test changes."""

    async def setUp(self):
        await super().setUp()
        self.src = os.path.join(self.base, "src")
        self.flag = os.path.join(self.base, "mysql-is-running")
        self.files = {"ibdata1": os.urandom(16 * MIB), "zz/last.ibd": os.urandom(2 * MIB)}
        for rel, data in self.files.items():
            _write(os.path.join(self.src, rel), data, 1_700_000_000_000_000_000)
        self.sender = await self.start_sender(
            MySQLDatadirCommand=f"echo {self.src}", MySQLServiceStatusCommand=f"test -e {self.flag}")

    async def test_file_rewritten_in_place_fails_naming_it(self):
        """Bytes of ibdata1 not sent yet rewritten in place (its mtime put back)."""
        await self.start_seed(self.sender, "51", source="datadir")
        path = os.path.join(self.src, "ibdata1")
        st = os.stat(path)
        with open(path, "r+b") as fh:
            fh.seek(12 * MIB)
            fh.write(os.urandom(MIB))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        await self.assert_failed_untouched(self.sender, "51", f"{path} changed while it was being sent",
                                           "ctime")

    async def test_file_being_sent_replaced_by_rename_fails_naming_it(self):
        """ibdata1, being read, replaced through a rename by a file of the same size and
        mtime."""
        await self.start_seed(self.sender, "52", source="datadir")
        path = os.path.join(self.src, "ibdata1")
        _replace_by_rename(path, os.urandom(16 * MIB))
        await self.assert_failed_untouched(self.sender, "52", f"{path} changed while it was being sent")

    async def test_file_not_yet_sent_replaced_by_rename_fails_naming_it(self):
        """zz/last.ibd, not opened yet, replaced the same way: its inode and ctime
        differ from the walk's."""
        await self.start_seed(self.sender, "53", source="datadir")
        path = os.path.join(self.src, "zz", "last.ibd")
        _replace_by_rename(path, os.urandom(2 * MIB))
        await self.assert_failed_untouched(self.sender, "53", f"{path} changed while it was being sent",
                                           "device/inode")

    async def test_file_replaced_while_the_sender_was_down(self):
        """The sending agent killed (SIGKILL) mid-send, a file replaced meanwhile, the
        agent started again: the resumed seed fails naming the file."""
        await self.start_seed(self.sender, "54", source="datadir")
        self.sender._transport.signalProcess("KILL")
        await self.sender.wait_exit()
        path = os.path.join(self.src, "zz", "last.ibd")
        _replace_by_rename(path, os.urandom(2 * MIB))
        again = Daemon(os.path.join(self.base, "sender"), {**self.sender_config, "HTTPPort": self.sender.port})
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(again.stop()))
        await again.start()
        status = await self.assert_failed_untouched(again, "54", f"{path} changed while it was being sent")
        self.assertIn("restarted", status["Error"])

    async def test_mysql_started_on_the_source_fails_the_seed(self):
        """MySQL seen running (the status command the test flips) while the datadir is
        sent."""
        await self.start_seed(self.sender, "55", source="datadir")
        _write(self.flag, b"")
        status = await self.assert_failed_untouched(self.sender, "55", "MySQL started")
        self.assertIn(self.src, status["Error"])
