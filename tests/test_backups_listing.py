"""Backups found in BackupDirectories: what /api/backups and the v1 volume lists say.

Backup directories here are written by the test with the files mariabackup and
xtrabackup leave (checkpoints, info, data files), so every case (incremental chains,
compressed, encrypted, partial, another tool's, another version's) is cheap to make; a
real ``mariabackup --backup`` is in tests/test_backups_mariadb.py.  The agent is the
real one (build_agent, real command runner) behind the HTTP API in memory (StubTreq).
"""

from __future__ import annotations

import json
import os
import shutil
import time

from treq.testing import StubTreq
from twisted.internet import reactor, task
from twisted.python.failure import Failure
from twisted.trial import unittest

from orchagent.agent import build_agent
from orchagent.api.resource import AgentAPI
from orchagent.backups.tools import Tools
from orchagent.config import Config
from orchagent.token import Token

TOKEN = "tok"
INSTALLED = Tools(Config(), None).path("mariabackup") is not None


def write_backup(root: str, name: str, *, backup_type: str = "full-backuped", from_lsn: int = 0,
                 to_lsn: int = 5000, tool: str = "mariabackup", version: str = "",
                 start: str = "2024-05-01 02:00:00", checkpoints: str = "xtrabackup_checkpoints",
                 info: str = "xtrabackup_info", partial: str = "N", files: dict | None = None) -> str:
    """A backup directory as the tools leave it (sizes only matter, not contents)."""
    if not version:
        version = Tools(Config(), None).path(tool) and _installed_version() or "10.11.19-MariaDB"
    path = os.path.join(root, name)
    os.makedirs(os.path.join(path, "db1"))
    with open(os.path.join(path, checkpoints), "w") as fh:
        fh.write(f"backup_type = {backup_type}\nfrom_lsn = {from_lsn}\nto_lsn = {to_lsn}\n"
                 f"last_lsn = {to_lsn + 10}\nrecover_binlog_info = 0\n")
    if info:
        with open(os.path.join(path, info), "w") as fh:
            fh.write(f"uuid = 1\nname = \ntool_name = {tool}\ntool_version = {version}\n"
                     f"start_time = {start}\nend_time = {start}\npartial = {partial}\n"
                     "incremental = N\nformat = file\ncompressed = N\n")
    for relative, size in (files or {"ibdata1": 12 << 10, "db1/t.ibd": 3000, "ib_logfile0": 100}).items():
        with open(os.path.join(path, relative), "wb") as fh:
            fh.write(b"\x01" * size)
    return path


_VERSION: list[str] = []


def _installed_version() -> str:
    if not _VERSION:
        import subprocess

        out = subprocess.run(["mariabackup", "--version"], capture_output=True, text=True)
        text = out.stdout + out.stderr
        _VERSION.append(text.split("server ")[1].split()[0] if "server " in text else "10.11.0")
    return _VERSION[0]


async def api_get(http: StubTreq, path: str, **params):
    """GET through StubTreq while the handler waits on real threads and processes: the
    in-memory transport only delivers the answer when flushed."""
    params["token"] = TOKEN

    async def settled(d):
        box = []
        d.addBoth(lambda result: box.append(result))
        while not box:
            await task.deferLater(reactor, 0.01, http.flush)
        if isinstance(box[0], Failure):
            box[0].raiseException()
        return box[0]

    response = await settled(http.get("http://agent" + path, params=params))
    body = await settled(response.content())
    return response.code, json.loads(body)


def local(text: str) -> str:
    """A start_time (server local time) as the API's RFC 3339 UTC."""
    seconds = time.mktime(time.strptime(text, "%Y-%m-%d %H:%M:%S"))
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


class ListingTests(unittest.TestCase):
    def setUp(self):
        if not INSTALLED:
            raise unittest.SkipTest("mariabackup is not installed (apt-get install mariadb-backup)")
        base = os.path.abspath(self.mktemp())
        self.backups = os.path.join(base, "backups")
        self.other = os.path.join(base, "other")
        self.datadir = os.path.join(base, "data")
        self.mount_point = os.path.join(base, "mnt")
        for path in (self.backups, self.other, self.datadir, self.mount_point):
            os.makedirs(path)
        self.options = os.path.join(base, "my.cnf")
        self.write_options("")
        self.make_agent()

    def write_options(self, extra: str) -> None:
        with open(self.options, "w") as fh:
            fh.write(f"[mysqld]\ndatadir={self.datadir}\n{extra}")

    def make_agent(self, **overrides) -> None:
        values = dict(backup_directories=[self.backups, self.other, self.backups + "-missing"],
                      snapshot_backend="copy", snapshot_mount_point=self.mount_point,
                      mysql_options_file=self.options, state_dir=self.mktemp(),
                      mysql_service_status_command="false")
        values.update(overrides)
        self.agent = build_agent(Config(**values), reactor, token=Token(TOKEN))
        self.http = StubTreq(AgentAPI(self.agent).resource())

    async def get(self, path, **params):
        return await api_get(self.http, path, **params)

    async def listed(self) -> dict[str, dict]:
        code, body = await self.get("/api/backups")
        self.assertEqual(code, 200, body)
        return {b["Name"]: b for b in body}

    async def test_fields_and_newest_first(self):
        write_backup(self.backups, "nightly-1", start="2024-05-01 02:00:00", to_lsn=1000)
        write_backup(self.backups, "nightly-2", start="2024-05-02 02:00:00", to_lsn=2000,
                     backup_type="log-applied", checkpoints="mariadb_backup_checkpoints",
                     info="mariadb_backup_info")
        os.makedirs(os.path.join(self.backups, "not-a-backup", "db1"))
        write_backup(self.backups, ".hidden-work", start="2024-05-03 02:00:00")
        code, body = await self.get("/api/backups")
        self.assertEqual(code, 200)
        self.assertEqual([b["Name"] for b in body], ["nightly-2", "nightly-1"])
        self.assertEqual(body[1], {
            "Name": "nightly-1", "Path": os.path.join(os.path.realpath(self.backups), "nightly-1"),
            "Tool": "mariabackup", "BackupType": "full-backuped", "Prepared": False,
            "FromLSN": 0, "ToLSN": 1000, "CreatedAt": local("2024-05-01 02:00:00"),
            "SizeBytes": os.path.getsize(os.path.join(self.backups, "nightly-1", "xtrabackup_checkpoints"))
            + os.path.getsize(os.path.join(self.backups, "nightly-1", "xtrabackup_info"))
            + (12 << 10) + 3000 + 100,
            "Usable": True, "Reason": "", "Base": ""})
        self.assertEqual((body[0]["BackupType"], body[0]["Prepared"]), ("log-applied", True))

    async def test_in_the_v1_volume_lists(self):
        write_backup(self.backups, "good", start="2024-05-02 02:00:00")
        write_backup(self.backups, "partial", start="2024-05-03 02:00:00", partial="Y")
        code, snapshots = await self.get("/api/lvs-snapshots")
        self.assertEqual((code, snapshots), (200, [
            {"Name": "good", "GroupName": "backup", "Path": "good", "IsSnapshot": True,
             "SnapshotPercent": 0.0}]))
        code, volumes = await self.get("/api/lvs")
        self.assertEqual(code, 200, volumes)
        by_name = {v["Name"]: v for v in volumes}
        self.assertEqual(by_name["partial"]["SnapshotPercent"], 100.0)
        self.assertEqual(by_name["good"]["GroupName"], "backup")
        self.assertIn(os.path.basename(self.datadir), by_name)
        code, one = await self.get("/api/lv", lv="good")
        self.assertEqual((code, one[0]["Path"], one[0]["IsSnapshot"]), (200, "good", True))
        code, matching = await self.get("/api/lvs/part")
        self.assertEqual([v["Name"] for v in matching], ["partial"])
        listed = await self.listed()
        self.assertIn("partial (some tables only)", listed["partial"]["Reason"])

    async def test_incremental_names_its_base(self):
        write_backup(self.backups, "full", to_lsn=1000, start="2024-05-01 02:00:00")
        write_backup(self.backups, "inc1", backup_type="incremental", from_lsn=1000, to_lsn=2000,
                     start="2024-05-01 03:00:00")
        write_backup(self.other, "inc2", backup_type="incremental", from_lsn=2000, to_lsn=3000,
                     start="2024-05-01 04:00:00")
        write_backup(self.other, "orphan", backup_type="incremental", from_lsn=777, to_lsn=3000,
                     start="2024-05-01 05:00:00")
        listed = await self.listed()
        self.assertEqual((listed["inc1"]["Base"], listed["inc2"]["Base"], listed["full"]["Base"]),
                         ("full", "inc1", ""))
        self.assertTrue(listed["inc2"]["Usable"])
        self.assertFalse(listed["orphan"]["Usable"])
        self.assertIn("its base (a backup with to_lsn = 777) is not in BackupDirectories",
                      listed["orphan"]["Reason"])
        chain = [b.name for b in await self.agent.backups.list() if b.name == "inc2"]
        self.assertEqual(chain, ["inc2"])
        inc2 = await self.agent.backups.find("inc2")
        self.assertEqual(inc2.chain, ("full", "inc1", "inc2"))
        shutil.rmtree(os.path.join(self.backups, "full"))
        listed = await self.listed()
        self.assertFalse(listed["inc2"]["Usable"])
        self.assertIn("its base inc1 is not usable", listed["inc2"]["Reason"])

    async def test_compressed_needs_its_decompressor(self):
        write_backup(self.backups, "squeezed", files={"ibdata1.qp": 100, "db1/t.ibd.qp": 50})
        listed = await self.listed()
        self.assertFalse(listed["squeezed"]["Usable"])
        self.assertEqual(listed["squeezed"]["Reason"],
                         "backup squeezed is compressed (qpress) and qpress is not installed here "
                         "(mariabackup --decompress needs it)")
        self.agent.backups.tools.which = lambda name: f"/opt/{name}" if name == "qpress" else shutil.which(name)
        self.assertTrue((await self.listed())["squeezed"]["Usable"])

    async def test_encrypted_needs_its_key_configured(self):
        write_backup(self.backups, "secret", tool="xtrabackup", version="8.0.35-30",
                     files={"ibdata1.xbcrypt": 100})
        self.agent.backups.tools.which = lambda name: f"/opt/{name}" if name == "xtrabackup" else shutil.which(name)
        self.agent.backups.tools._versions["xtrabackup"] = "8.0"
        listed = await self.listed()
        self.assertFalse(listed["secret"]["Usable"])
        self.assertIn("backup secret is encrypted (.xbcrypt files) and decryption is not "
                      f"configured: no encrypt and encrypt-key-file in the [xtrabackup] group of "
                      f"{self.options}", listed["secret"]["Reason"])
        self.write_options("[xtrabackup]\nencrypt=AES256\nencrypt-key-file=/etc/mysql/backup.key\n")
        self.assertTrue((await self.listed())["secret"]["Usable"])

    async def test_tool_missing_or_other_version(self):
        write_backup(self.backups, "percona", tool="xtrabackup", version="8.0.35-30")
        write_backup(self.backups, "old", version="10.6.18-MariaDB")
        write_backup(self.backups, "bad name", version="")
        listed = await self.listed()
        self.assertEqual(listed["percona"]["Reason"],
                         "backup percona was made by xtrabackup, which is not installed here")
        self.assertRegex(listed["old"]["Reason"],
                         r"^backup old was made by mariabackup 10\.6 and the installed mariabackup "
                         r"is \d+\.\d+: --prepare needs the same version$")
        self.assertIn("cannot be given to mountlv", listed["bad name"]["Reason"])
        code, body = await self.get("/api/mountlv", lv="percona")
        self.assertEqual(code, 500)
        self.assertEqual(body["Message"], "backup percona is not usable: backup percona was made "
                         "by xtrabackup, which is not installed here; nothing was changed")
        self.assertEqual(os.listdir(self.mount_point), [])

    async def test_same_name_in_two_directories(self):
        write_backup(self.backups, "nightly")
        write_backup(self.other, "nightly")
        code, body = await self.get("/api/backups")
        self.assertEqual([b["Usable"] for b in body], [True, False])
        self.assertIn(f"another backup named nightly is in {os.path.realpath(self.backups)}",
                      body[1]["Reason"])

    async def test_removelv_refuses_a_backup(self):
        path = write_backup(self.backups, "keep-me")
        before = sorted(os.listdir(path))
        code, body = await self.get("/api/removelv", lv="keep-me")
        self.assertEqual(code, 500)
        self.assertEqual(body, {"Code": "ERROR", "Details": None, "Message":
                                f"refusing to remove backup keep-me ({os.path.realpath(path)}): the "
                                "agent uses backups but never deletes them; remove it with your "
                                "backup tooling"})
        self.assertEqual(sorted(os.listdir(path)), before)

    async def test_no_backup_directories(self):
        self.make_agent(backup_directories=[])
        self.assertEqual(await self.get("/api/backups"), (200, []))
        self.assertEqual(await self.get("/api/lvs-snapshots"), (200, []))


class DecodeTests(unittest.TestCase):
    """Opening an encrypted or compressed backup on its work copy.  Neither xtrabackup nor
    qpress can be installed here (no Debian package), so the commands are checked against
    an expectation fake: decrypt first, then decompress, with the tool's own options."""

    async def test_decrypt_then_decompress_with_the_tools_options(self):
        from orchagent.backups.model import Backup
        from orchagent.backups.prepare import Preparer
        from tests.support.fakes import FakeRunner

        options = os.path.abspath(self.mktemp())
        with open(options, "w") as fh:
            fh.write("[xtrabackup]\nencrypt=AES256\nencrypt-key-file=/etc/mysql/backup.key\n")
        config = Config(mysql_options_file=options)
        runner = FakeRunner(self)
        tools = Tools(config, runner, which=lambda name: f"/opt/bin/{name}")
        preparer = Preparer(config, runner, tools, host=None)
        backup = Backup(name="secret", path="/backups/secret", tool="xtrabackup",
                        backup_type="full-backuped", prepared=False, from_lsn=0, to_lsn=9,
                        created_at=None, size_bytes=1, compressed="zstd", encrypted=True)
        data = "/work/w/data"
        runner.expect(["xtrabackup", f"--defaults-file={options}", "--decrypt=AES256",
                       "--remove-original", f"--target-dir={data}"], privileged=True)
        runner.expect(["xtrabackup", f"--defaults-file={options}", "--decompress",
                       "--remove-original", f"--target-dir={data}"], privileged=True)
        await preparer._decode([backup], "/work/w")

    async def test_a_failing_decompress_names_the_tool_and_its_error(self):
        from orchagent.backups.model import Backup
        from orchagent.backups.prepare import Preparer
        from orchagent.errors import CommandFailed
        from tests.support.fakes import FakeRunner

        config = Config()
        runner = FakeRunner(self)
        tools = Tools(config, runner, which=lambda name: f"/opt/bin/{name}")
        preparer = Preparer(config, runner, tools, host=None)
        backup = Backup(name="squeezed", path="/b/squeezed", tool="mariabackup",
                        backup_type="full-backuped", prepared=False, from_lsn=0, to_lsn=9,
                        created_at=None, size_bytes=1, compressed="qpress")
        runner.expect(["mariabackup", "--decompress", "--remove-original", "--target-dir=/w/data"],
                      exit_code=1, stderr="[00] error: cannot open ./ibdata1.qp\n")
        with self.assertRaises(CommandFailed) as caught:
            await preparer._decode([backup], "/w")
        self.assertEqual(caught.exception.message, "mariabackup --decompress exited with status 1: "
                         "[00] error: cannot open ./ibdata1.qp")
