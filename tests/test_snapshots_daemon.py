"""Snapshots end to end: a real MariaDB whose datadir is a btrfs subvolume on a loop file,
driven through the HTTP API of the real agent daemon (``twistd`` child process).

``SnapshotBackend`` is left at ``auto``: the daemon must find the btrfs subvolume itself.
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from urllib.parse import quote

from twisted.internet import defer, protocol, reactor, task
from twisted.trial import unittest

from orchagent.config import FIELDS
from tests.support.btrfs import make_btrfs
from tests.support.daemon import start_daemon, wait_until
from tests.support.mariadb import MariaDB

KEYS = {f.attr: f.key for f in FIELDS}


class SQLWriter(protocol.ProcessProtocol):
    """One ``mariadb`` client inserting rows 1, 2, 3... with autocommit.  Each INSERT is
    followed by ``SELECT <id>``, so a line ``<id>`` on stdout means that INSERT returned."""

    def __init__(self):
        self.acked = 0
        self.buffer = b""
        self.ended = defer.Deferred()

    def connectionMade(self):
        statements = "".join(f"INSERT INTO t VALUES ({i}, REPEAT('x', 200)); SELECT {i};\n"
                             for i in range(1, 200001))
        self.transport.write(statements.encode())

    def outReceived(self, data):
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            if line.strip().isdigit():
                self.acked = int(line)

    def processEnded(self, reason):
        self.ended.callback(None)

    def stop(self):
        if not self.ended.called:
            self.transport.signalProcess("KILL")
        return self.ended


class DaemonCase(unittest.TestCase):
    timeout = 120

    async def setUp(self):
        self.fs = make_btrfs(self)
        self.datadir = self.fs.subvolume("mysql")
        self.snapshot_dir = self.fs.directory("snapshots")
        self.mount_point = self.fs.scratch("mnt")
        self.db = MariaDB.create(self, datadir=self.datadir, start=False)
        await self.db.start_async()
        await self.db.sql_async("CREATE DATABASE w; CREATE TABLE w.t (id INT PRIMARY KEY, "
                                "pad VARCHAR(200)) ENGINE=InnoDB")
        config = {KEYS[attr]: value for attr, value in self.db.agent_settings().items()}
        config.update({
            "SnapshotDirectory": self.snapshot_dir, "SnapshotMountPoint": self.mount_point,
            "SnapshotVolumesFilter": "mysql-snap",
        })
        self.agent = await start_daemon(self, config)

    async def get(self, endpoint, **params):
        return await self.agent.get(endpoint, **params)

    async def ok(self, endpoint, **params):
        code, body = await self.get(endpoint, **params)
        self.assertEqual(code, 200, f"{endpoint}: {body}")
        return body

    async def rows(self, db=None) -> list[int]:
        rows = await (db or self.db).sql_async("SELECT id FROM w.t ORDER BY id")
        return [int(r[0]) for r in rows]

    async def snapshot(self) -> dict:
        """Create a snapshot through the API; its LogicalVolume.  Names have a resolution
        of one second, so a second snapshot waits for the next second."""
        now = time.time()
        if int(now) == getattr(self, "last_snapshot", None):
            await task.deferLater(reactor, math.ceil(now) - now + 0.01, lambda: None)
        self.last_snapshot = int(time.time())
        before = {v["Name"] for v in await self.ok("/api/lvs-snapshots")}
        self.assertIs(await self.ok("/api/create-snapshot"), True)
        new = [v for v in await self.ok("/api/lvs-snapshots") if v["Name"] not in before]
        self.assertEqual(len(new), 1)
        return new[0]


class WriteLoadTests(DaemonCase):
    async def test_snapshot_under_write_load_holds_every_committed_row(self):
        writer = SQLWriter()
        argv = self.db.client_argv("w")
        argv[2:2] = ["--batch", "--skip-column-names", "--unbuffered"]
        reactor.spawnProcess(writer, argv[0], argv, env=os.environ)
        self.addCleanup(writer.stop)
        await wait_until(lambda: writer.acked >= 300, timeout=60)

        committed = writer.acked
        snapshot = await self.snapshot()
        after = writer.acked
        await wait_until(lambda: writer.acked >= after + 100, timeout=60)
        await writer.stop()
        self.assertGreater(after, committed, "no INSERT returned while the snapshot was made")

        clone = self.fs.path("clone")
        subprocess.run(["btrfs", "subvolume", "snapshot", snapshot["Path"], clone], check=True,
                       stdout=subprocess.DEVNULL)
        copy = MariaDB.create(self, datadir=clone, install=False, start=False, server_id=2)
        await copy.start_async()
        ids = await self.rows(copy)
        self.assertEqual(ids[:committed], list(range(1, committed + 1)))
        self.assertEqual(ids, list(range(1, len(ids) + 1)))
        with open(copy.error_log) as fh:
            self.assertIn("crash recovery", fh.read().lower())


class MountTests(DaemonCase):
    async def test_mount_state_umount_and_remove(self):
        await self.db.sql_async("INSERT INTO w.t VALUES (1, 'a'), (2, 'b')")
        snapshot = await self.snapshot()
        self.assertEqual(snapshot["GroupName"], "orchtest")
        self.assertEqual(os.path.dirname(snapshot["Path"]), self.snapshot_dir)

        state = await self.ok("/api/mountlv", lv=snapshot["Path"])
        du = await self.ok(f"/api/du?path={quote(self.mount_point)}")
        self.assertEqual(state, {
            "Path": self.mount_point, "Device": self.fs.device, "LVPath": snapshot["Path"],
            "FileSystem": "btrfs", "IsMounted": True, "DiskUsage": du,
            "MySQLDataPath": self.mount_point, "MySQLDiskUsage": du})
        self.assertGreater(du, 1024 * 1024)
        self.assertTrue(os.path.exists(os.path.join(self.mount_point, "w", "t.ibd")))
        self.assertEqual(await self.ok("/api/mount"), state)

        code, body = await self.get("/api/removelv", lv=snapshot["Name"])
        self.assertEqual(code, 500)
        self.assertIn(f"it is mounted on {self.mount_point}", body["Message"])

        state = await self.ok("/api/umount")
        self.assertEqual(state["IsMounted"], False)
        self.assertFalse(os.path.exists(os.path.join(self.mount_point, "w")))
        self.assertIs(await self.ok("/api/removelv", lv=snapshot["Name"]), True)
        self.assertEqual(await self.ok("/api/lvs-snapshots"), [])
        self.assertEqual(os.listdir(self.snapshot_dir), [])

    async def test_bad_input_is_refused_and_changes_nothing(self):
        snapshot = await self.snapshot()
        self.fs.subvolume("snapshots/weekly-1")
        await self.ok("/api/mountlv", lv=snapshot["Name"])
        other = await self.snapshot()
        cases = [
            ("/api/mountlv", "mysql-snap-29990101T000000Z", "already mounted"),
            ("/api/removelv", "mysql-snap-29990101T000000Z", "no btrfs snapshot"),
            ("/api/removelv", "weekly-1", "SnapshotVolumesFilter 'mysql-snap'"),
            ("/api/removelv", "mysql", "is not a snapshot"),
            ("/api/removelv", self.datadir, "is not a snapshot"),
            ("/api/removelv", "x; rm -rf /", "invalid volume name"),
            ("/api/removelv", "$(touch /tmp/orchagent-pwned)", "invalid volume name"),
            ("/api/removelv", f"{self.snapshot_dir}/../mysql", "invalid volume name"),
            ("/api/removelv", "../../mysql", "invalid volume name"),
            ("/api/restore-snapshot", "weekly-1", "holds no MySQL data"),
            ("/api/restore-snapshot", "nope", "no btrfs snapshot 'nope'"),
            ("/api/lv", "`reboot`", "invalid volume name"),
            ("/api/lv", "nope", "no btrfs snapshot or volume 'nope'"),
        ]
        for path, name, message in cases:
            code, body = await self.get(path, lv=name)
            self.assertEqual((code, body["Code"], body["Details"]), (500, "ERROR", None), (path, name))
            self.assertIn(message, body["Message"], (path, name))
        code, body = await self.get("/api/mountlv", lv=other["Name"])
        self.assertIn("already mounted", body["Message"])
        self.assertEqual((await self.ok("/api/mount"))["LVPath"], snapshot["Path"])
        self.assertEqual(sorted(os.listdir(self.snapshot_dir)),
                         sorted([snapshot["Name"], other["Name"], "weekly-1"]))
        self.assertFalse(os.path.exists("/tmp/orchagent-pwned"))
        self.assertIs(await self.ok("/api/mysql-status"), True)
        self.assertIs(self.fs.is_subvolume(self.datadir), True)
        await self.ok("/api/umount")


class RestoreTests(DaemonCase):
    async def test_local_restore_to_the_snapshot(self):
        await self.db.sql_async("INSERT INTO w.t VALUES (1, 'a'), (2, 'b')")
        snapshot = await self.snapshot()
        await self.db.sql_async("INSERT INTO w.t VALUES (3, 'c'); DELETE FROM w.t WHERE id = 1")
        self.assertEqual(await self.rows(), [2, 3])

        self.assertIs(await self.ok("/api/restore-snapshot", lv=snapshot["Name"]), True)
        self.assertIs(await self.ok("/api/mysql-status"), True)
        self.assertEqual(await self.rows(), [1, 2])
        await self.db.sql_async("INSERT INTO w.t VALUES (4, 'd')")

        volumes = {v["Name"]: v for v in await self.ok("/api/lvs")}
        (replaced,) = [n for n in volumes if n.startswith("mysql.replaced-")]
        self.assertEqual(volumes[replaced]["IsSnapshot"], False)
        self.assertEqual(volumes[replaced]["Path"], self.fs.path(replaced))
        self.assertIn(snapshot["Name"], volumes)
        code, body = await self.get("/api/removelv", lv=replaced)
        self.assertIn("is not a snapshot", body["Message"])
        log = self.agent.output()
        # The new tree is made under a work name while MySQL still runs, then two renames
        # (journaled: a crash between them is settled at the next start).
        for step in ("step 1/5: snapshot", "step 2/5: stop MySQL", "step 3/5: rename the datadir",
                     "step 4/5: rename", "step 5/5: start MySQL"):
            self.assertIn(step, log)

        # The replaced datadir still holds the newer state: start a server on a clone of it.
        clone = self.fs.path("old")
        subprocess.run(["btrfs", "subvolume", "snapshot", self.fs.path(replaced), clone],
                       check=True, stdout=subprocess.DEVNULL)
        old = MariaDB.create(self, datadir=clone, install=False, start=False, server_id=3)
        await old.start_async()
        self.assertEqual(await self.rows(old), [2, 3])
