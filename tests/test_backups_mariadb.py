"""Real mariabackup backups of a real MariaDB, served through the v1 API.

Each test has a throwaway MariaDB (tests.support.mariadb) holding a few tables, restarted
once so that its checkpoint is recent (the tables' pages are then in the data files, not
only in the redo log), then written to by a procedure while ``mariabackup --backup``
copies it into a BackupDirectories directory.  The agent is the real one (build_agent,
real commands) behind the HTTP API in memory.

A backup is right when a throwaway server started on what the agent made of it (the
mounted work copy, or the restored datadir) holds every row committed before the backup
started, and the tables nobody wrote to have the source's CHECKSUM TABLE.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.trial import unittest

from orchagent.agent import build_agent
from orchagent.api.resource import AgentAPI
from orchagent.config import Config
from orchagent.snapshots import mountinfo
from orchagent.token import Token
from tests.support import mariadb as mariadb_support
from tests.support.btrfs import make_btrfs
from tests.support.mariadb import MariaDB
from tests.test_backups_listing import api_get

DATABASE = "bk"
POPULATE = f"""
CREATE DATABASE {DATABASE};
USE {DATABASE};
CREATE TABLE t1 (id INT PRIMARY KEY, v VARCHAR(64) NOT NULL, n BIGINT NOT NULL, KEY (n)) ENGINE=InnoDB;
INSERT INTO t1 SELECT seq, MD5(seq), seq * 7919 % 100003 FROM seq_1_to_30000;
CREATE TABLE t3 (id INT PRIMARY KEY, label VARCHAR(32)) ENGINE=Aria;
INSERT INTO t3 SELECT seq, CONCAT('label-', seq) FROM seq_1_to_3000;
CREATE TABLE w (id INT AUTO_INCREMENT PRIMARY KEY, k INT NOT NULL, note VARCHAR(40)) ENGINE=InnoDB;
DELIMITER //
CREATE PROCEDURE writer(secs DOUBLE)
BEGIN
  DECLARE stop_at DOUBLE DEFAULT UNIX_TIMESTAMP(NOW(6)) + secs;
  DECLARE i INT DEFAULT 0;
  WHILE UNIX_TIMESTAMP(NOW(6)) < stop_at DO
    INSERT INTO w (k, note) VALUES (i, CONCAT('row ', i));
    SET i = i + 1;
  END WHILE;
END //
DELIMITER ;
"""
#: Rows of w committed before a backup: their count and a checksum of their contents.
ROWS_UP_TO = ("SELECT COUNT(*), COALESCE(SUM(CRC32(CONCAT_WS(',', id, k, note))), 0) "
              f"FROM {DATABASE}.w WHERE id <= {{marker}}")


def mariabackup_unavailable() -> str | None:
    reason = mariadb_support.unavailable_reason()
    if reason:
        return reason
    if shutil.which("mariabackup") is None:
        return "mariabackup is not installed (apt-get install mariadb-backup)"
    return None


def populated(testcase) -> MariaDB:
    """A running server with the test tables, restarted once (recent checkpoint)."""
    db = MariaDB.create(testcase)
    db.sql(POPULATE)
    db.stop()
    db.start()
    return db


def backup(db: MariaDB, target: str, *extra: str) -> None:
    """``mariabackup --backup`` of ``db`` into ``target`` (blocking; test set-up)."""
    result = subprocess.run(["mariabackup", f"--defaults-file={db.option_file}", "--backup",
                             f"--target-dir={target}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    if result.returncode != 0:
        raise RuntimeError("mariabackup --backup failed:\n" + result.stdout.decode(errors="replace")[-3000:])


def backup_under_writes(db: MariaDB, target: str, *extra: str) -> int:
    """Back ``db`` up while the writer inserts; the last id of w committed before the
    backup started."""
    writer = subprocess.Popen(db.client_argv(DATABASE) + ["-e", "CALL writer(2.0)"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        marker = 0
        while marker < 200:
            marker = int(db.sql(f"SELECT COALESCE(MAX(id), 0) FROM {DATABASE}.w")[0][0])
        backup(db, target, *extra)
    finally:
        _, err = writer.communicate(timeout=120)
    if writer.returncode != 0:
        raise RuntimeError(f"the writer failed: {err.decode(errors='replace')}")
    after = int(db.sql(f"SELECT MAX(id) FROM {DATABASE}.w")[0][0])
    assert after > marker, "the writer kept writing while the backup ran"
    return marker


def table_checksums(db: MariaDB, tables=("t1", "t3")) -> dict[str, str]:
    return {t: db.sql(f"CHECKSUM TABLE {DATABASE}.{t} EXTENDED")[0][1] for t in tables}


def tree_digest(top: str) -> str:
    """Names, sizes, modes and contents of everything under ``top``."""
    digest = hashlib.sha256()
    for directory, dirs, files in sorted(os.walk(top)):
        dirs.sort()
        for name in sorted(files) + dirs:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            digest.update(f"{os.path.relpath(path, top)}:{st.st_mode}:{st.st_size}\n".encode())
            if name in files:
                with open(path, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(block)
    return digest.hexdigest()


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        value = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([value[0] ^ 0xFF]))


def server_on_copy(testcase, data: str) -> MariaDB:
    """A throwaway server started on a writable copy of ``data`` (owned by mysql)."""
    base = tempfile.mkdtemp(prefix="mdb-copy-")
    testcase.addCleanup(shutil.rmtree, base, True)
    os.chmod(base, 0o755)
    copy = os.path.join(base, "data")
    subprocess.run(["cp", "-a", "--", data, copy], check=True)
    subprocess.run(["chown", "-R", "mysql:mysql", "--", copy], check=True)
    return MariaDB.create(testcase, datadir=copy, install=False)


class BackupTestCase(unittest.TestCase):
    timeout = 240

    def setUp(self):
        reason = mariabackup_unavailable()
        if reason:
            raise unittest.SkipTest(reason)
        self.home = os.path.abspath(self.mktemp())
        self.backups = os.path.join(self.home, "backups")
        self.mount_point = os.path.join(self.home, "mnt")
        self.state_dir = os.path.join(self.home, "state")
        for path in (self.backups, self.mount_point, self.state_dir):
            os.makedirs(path)
        self.addCleanup(self.unmount_leftover)
        self.db = populated(self)
        self.checksums = table_checksums(self.db)

    def unmount_leftover(self) -> None:
        if mountinfo.at(mountinfo.read(), os.path.realpath(self.mount_point)) is not None:
            subprocess.run(["umount", self.mount_point], check=False)

    def make_agent(self, **overrides) -> None:
        values = dict(self.db.agent_settings(), backup_directories=[self.backups],
                      snapshot_backend="copy", snapshot_mount_point=self.mount_point,
                      state_dir=self.state_dir)
        values.update(overrides)
        self.agent = build_agent(Config(**values), reactor, token=Token("tok"))
        self.http = StubTreq(AgentAPI(self.agent).resource())

    async def get(self, path, **params):
        return await api_get(self.http, path, **params)

    async def ok(self, path, **params):
        code, body = await self.get(path, **params)
        self.assertEqual(code, 200, body)
        return body

    def rows_up_to(self, db: MariaDB, marker: int) -> tuple:
        return db.sql(ROWS_UP_TO.format(marker=marker))[0]

    def work_dirs(self) -> list[str]:
        root = os.path.join(self.state_dir, "backups")
        return [n for n in os.listdir(root) if n.startswith("mounted-")] if os.path.isdir(root) else []


class MountTests(BackupTestCase):
    async def test_listed_then_mounted_then_served(self):
        fs = make_btrfs(self, size=640 << 20)
        self.backups = fs.directory("backups")
        self.state_dir = fs.directory("state")
        target = os.path.join(self.backups, "nightly")
        marker = backup_under_writes(self.db, target)
        expected_rows = self.rows_up_to(self.db, marker)
        before = tree_digest(target)
        self.make_agent()

        listed = await self.ok("/api/backups")
        self.assertEqual(len(listed), 1)
        entry = listed[0]
        with open(os.path.join(target, "xtrabackup_checkpoints")) as fh:
            to_lsn = int(dict(l.split(" = ") for l in fh.read().splitlines())["to_lsn"])
        self.assertEqual({k: entry[k] for k in ("Name", "Path", "Tool", "BackupType", "Prepared",
                                                "FromLSN", "ToLSN", "Usable", "Reason")},
                         {"Name": "nightly", "Path": target, "Tool": "mariabackup",
                          "BackupType": "full-backuped", "Prepared": False, "FromLSN": 0,
                          "ToLSN": to_lsn, "Usable": True, "Reason": ""})
        self.assertEqual(entry["SizeBytes"], sum(
            os.path.getsize(os.path.join(d, f)) for d, _, fs_ in os.walk(target) for f in fs_))
        self.assertEqual(await self.ok("/api/lvs-snapshots"), [
            {"Name": "nightly", "GroupName": "backup", "Path": "nightly", "IsSnapshot": True,
             "SnapshotPercent": 0.0}])

        mount = await self.ok("/api/mountlv", lv="nightly")
        self.assertEqual((mount["IsMounted"], mount["LVPath"], mount["MySQLDataPath"]),
                         (True, "nightly", self.mount_point))
        self.assertGreater(mount["MySQLDiskUsage"], 10 << 20)
        self.assertEqual(mount, await self.ok("/api/mount"))
        self.assertTrue(mountinfo.at(mountinfo.read(), self.mount_point).read_only)
        self.assertEqual(os.stat(os.path.join(self.mount_point, "ibdata1")).st_uid,
                         os.stat(self.db.datadir).st_uid, "the copy belongs to the datadir's owner")
        [work] = self.work_dirs()
        table = os.path.join(self.state_dir, "backups", work, "data", DATABASE, "t1.ibd")
        total, exclusive = [int(n) for n in subprocess.run(
            ["btrfs", "filesystem", "du", "--raw", table],
            capture_output=True, text=True, check=True).stdout.split("\n")[1].split()[:2]]
        self.assertEqual((exclusive, total > 5 << 20), (0, True),
                         "the work copy of a table nobody wrote shares all its blocks with the backup (reflink)")

        copy = server_on_copy(self, self.mount_point)
        self.assertEqual(self.rows_up_to(copy, marker), expected_rows)
        self.assertEqual(table_checksums(copy), self.checksums)
        copy.stop()

        state = await self.ok("/api/umount")
        self.assertFalse(state["IsMounted"])
        self.assertEqual(self.work_dirs(), [])
        self.assertEqual(tree_digest(target), before, "the backup itself was never written")

    async def test_incremental_backup_mounted(self):
        full = os.path.join(self.backups, "full")
        backup(self.db, full)
        self.db.sql("INSERT INTO t1 SELECT seq, 'after', 1 FROM seq_30001_to_31000", DATABASE)
        increment = os.path.join(self.backups, "inc")
        marker = backup_under_writes(self.db, increment, f"--incremental-basedir={full}")
        expected = (self.rows_up_to(self.db, marker), table_checksums(self.db))
        before = (tree_digest(full), tree_digest(increment))
        self.make_agent()
        listed = {b["Name"]: b for b in await self.ok("/api/backups")}
        self.assertEqual((listed["inc"]["BackupType"], listed["inc"]["Base"], listed["inc"]["Usable"]),
                         ("incremental", "full", True))
        mount = await self.ok("/api/mountlv", lv="inc")
        self.assertEqual(mount["MySQLDataPath"], self.mount_point)
        copy = server_on_copy(self, self.mount_point)
        self.assertEqual((self.rows_up_to(copy, marker), table_checksums(copy)), expected)
        copy.stop()
        await self.ok("/api/umount")
        self.assertEqual((tree_digest(full), tree_digest(increment)), before,
                         "applying the increment (which deletes its .delta files) ran on copies")

    async def test_no_space_for_the_work_copy(self):
        backup(self.db, os.path.join(self.backups, "nightly"))
        small = os.path.join(self.home, "small")
        os.makedirs(small)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", small], check=True)
        self.addCleanup(subprocess.run, ["umount", small], check=False)
        self.make_agent(state_dir=small)
        code, body = await self.get("/api/mountlv", lv="nightly")
        self.assertEqual(code, 500)
        self.assertRegex(body["Message"], r"^backup nightly: not enough space for the work copy in "
                         + small + r"/backups: a full copy needs about \d+ bytes and \d+ are free; "
                         r"nothing was changed$")
        self.assertFalse((await self.ok("/api/mount"))["IsMounted"])
        self.assertEqual(os.listdir(os.path.join(small, "backups")), [])

    async def test_prepare_failing(self):
        target = os.path.join(self.backups, "broken")
        backup(self.db, target)
        os.truncate(os.path.join(target, "ib_logfile0"), 0)
        before = tree_digest(target)
        self.make_agent()
        code, body = await self.get("/api/mountlv", lv="broken")
        self.assertEqual(code, 500)
        self.assertRegex(body["Message"],
                         r"^backup broken: step prepare failed: mariabackup --prepare exited with "
                         r"status \d+: .*ib_logfile0 is too small.*; the backup is unchanged and "
                         r"its work copy was removed$")
        self.assertFalse((await self.ok("/api/mount"))["IsMounted"])
        self.assertEqual(self.work_dirs(), [])
        self.assertEqual(tree_digest(target), before)

    async def test_tool_missing(self):
        backup(self.db, os.path.join(self.backups, "nightly"))
        self.make_agent()
        real = self.agent.backups.tools.which
        self.agent.backups.tools.which = lambda name: None if name == "mariabackup" else real(name)
        self.agent.backups.tools.path = lambda name: self.agent.backups.tools.which(name)
        listed = await self.ok("/api/backups")
        self.assertEqual((listed[0]["Usable"], listed[0]["Reason"]),
                         (False, "backup nightly was made by mariabackup, which is not installed here"))
        self.assertEqual(await self.ok("/api/lvs-snapshots"), [])
        code, body = await self.get("/api/restore-snapshot", lv="nightly")
        self.assertEqual((code, body["Message"]), (500, "backup nightly is not usable: backup "
                         "nightly was made by mariabackup, which is not installed here; nothing "
                         "was changed"))
        self.assertTrue(self.db.is_running())


class CorruptionTests(BackupTestCase):
    async def test_flipped_byte_in_an_ibd_is_refused(self):
        target = os.path.join(self.backups, "rotten")
        backup(self.db, target)
        ibd = os.path.join(target, DATABASE, "t1.ibd")
        flip_byte(ibd, 12 * 16384 + 5000)
        before = tree_digest(target)
        datadir_before = (os.stat(self.db.datadir).st_ino, sorted(os.listdir(self.db.datadir)))
        self.make_agent()
        self.assertTrue((await self.ok("/api/backups"))[0]["Usable"],
                        "a listing does not read every page; mountlv and restore do")

        code, body = await self.get("/api/mountlv", lv="rotten")
        self.assertEqual(code, 500)
        self.assertEqual(body["Message"].split(" (")[0],
                         "backup rotten: step verify failed: the backup is corrupt: page checksum "
                         f"mismatch in 1 file(s): {DATABASE}/t1.ibd")
        self.assertIn("page::12 invalid", body["Message"])
        self.assertTrue(body["Message"].endswith("the backup is unchanged and its work copy was removed"))
        self.assertFalse((await self.ok("/api/mount"))["IsMounted"])
        self.assertEqual(self.work_dirs(), [])

        code, body = await self.get("/api/restore-snapshot", lv="rotten")
        self.assertEqual(code, 500)
        self.assertRegex(body["Message"], r"^restore of backup rotten failed at step 1/5 \(prepare a "
                         r"copy of backup rotten in .*\): backup rotten: step verify failed: the "
                         r"backup is corrupt: page checksum mismatch in 1 file\(s\): bk/t1.ibd .*; "
                         r"rolled back: the previous datadir is back in place$")
        self.assertTrue(self.db.is_running())
        self.assertEqual((os.stat(self.db.datadir).st_ino, sorted(os.listdir(self.db.datadir))),
                         datadir_before)
        self.assertEqual([n for n in os.listdir(self.db.base_dir) if "restoring" in n or "replaced" in n], [])
        self.assertEqual(tree_digest(target), before)
        code, body = await self.get("/api/removelv", lv="rotten")
        self.assertEqual(code, 500)
        self.assertIn("never deletes them", body["Message"])
        self.assertEqual(tree_digest(target), before)


class RestoreTests(BackupTestCase):
    async def test_restore_from_a_backup(self):
        target = os.path.join(self.backups, "nightly")
        marker = backup_under_writes(self.db, target)
        expected = (self.rows_up_to(self.db, marker), self.checksums)
        self.db.sql(f"INSERT INTO {DATABASE}.t1 VALUES (99999999, 'after the backup', 0)")
        old_inode = os.stat(self.db.datadir).st_ino
        self.make_agent()
        self.assertIs(await self.ok("/api/restore-snapshot", lv="nightly"), True)
        self.assertTrue(self.db.is_running())
        self.assertEqual((self.rows_up_to(self.db, marker), table_checksums(self.db)), expected)
        self.assertEqual(self.db.sql(f"SELECT COUNT(*) FROM {DATABASE}.t1 WHERE id = 99999999"), [("0",)])
        [replaced] = [n for n in os.listdir(self.db.base_dir) if ".replaced-" in n]
        self.assertEqual(os.stat(os.path.join(self.db.base_dir, replaced)).st_ino, old_inode)
        self.assertEqual([n for n in os.listdir(self.db.base_dir) if "restoring" in n], [])
        volumes = {v["Name"]: v for v in await self.ok("/api/lvs")}
        self.assertFalse(volumes[replaced]["IsSnapshot"])
