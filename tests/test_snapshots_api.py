"""The v1 snapshot endpoints over LVM, in memory (treq StubTreq), with the real Snapshots
front and LVM backend on an expectation fake runner: the JSON orchestrator sees, and bad
input refused before any command runs."""

from __future__ import annotations

import json
import os
import tempfile

import attrs

from treq.testing import StubTreq
from twisted.internet import task
from twisted.trial import unittest

from orchagent import config as config_module
from orchagent.agent import Agent, build_agent
from orchagent.api.resource import AgentAPI
from orchagent.config import Config
from orchagent.snapshots import build_backend
from orchagent.snapshots.lvm import LVS_ARGV
from orchagent.token import Token
from tests.support.daemon import REPO_ROOT
from tests.support.fakes import FakeHost, FakeMounts, FakeRunner, FakeSeeds, FakeService

DATA = os.path.join(os.path.dirname(__file__), "data")
TOKEN = "tok"


def report() -> bytes:
    with open(os.path.join(DATA, "lvs-snapshots.json"), "rb") as fh:
        return fh.read()


class LVMApiTests(unittest.TestCase):
    def setUp(self):
        self.mount_point = tempfile.mkdtemp(prefix="orchagent-api-mp-")
        self.addCleanup(os.rmdir, self.mount_point)
        config = Config(snapshot_backend="lvm", snapshot_mount_point=self.mount_point,
                        snapshot_volumes_filter="mysql-snap")
        self.runner = FakeRunner(self)
        self.service = FakeService(running=True)
        self.mounts = FakeMounts()
        self.mounts.mount("/dev/mapper/vgmysql-mysql", "/var/lib/mysql", "xfs", "253:0")
        host = FakeHost("/var/lib/mysql")
        clock = task.Clock()
        snapshots = build_backend(config, self.runner, clock, host, self.service)
        for backend in snapshots.backends.values():
            backend.read_mounts = backend.mount_point.read_mounts = self.mounts
        agent = Agent(config=config, reactor=clock, runner=self.runner, hostname="db1",
                      token=Token(TOKEN), service=self.service, host=host, binlogs=None,
                      snapshots=snapshots, snapshot_hosts=None, seeds=FakeSeeds(), registration=None)
        self.http = StubTreq(AgentAPI(agent).resource())

    async def get(self, path, **params):
        params["token"] = TOKEN
        response = await self.http.get("http://agent" + path, params=params)
        return response.code, json.loads(await response.content())

    async def test_lvs_snapshots_json(self):
        self.runner.expect(LVS_ARGV, stdout=report())
        code, body = await self.get("/api/lvs-snapshots")
        self.assertEqual(code, 200)
        self.assertEqual(body[-1], {
            "Name": "mysql-snap-20240430T020000Z", "GroupName": "vgmysql",
            "Path": "/dev/vgmysql/mysql-snap-20240430T020000Z", "IsSnapshot": True,
            "SnapshotPercent": 100.0})
        self.assertEqual([v["Name"] for v in body],
                         ["mysql-snap-20240502T020000Z", "mysql-snap-20240501T020000Z",
                          "mysql-snap-20240430T020000Z"])

    async def test_lv_by_path_route(self):
        self.runner.expect(LVS_ARGV, stdout=report())
        code, body = await self.get("/api/lv/vgmysql/mysql")
        self.assertEqual((code, body[0]["Path"], body[0]["IsSnapshot"]), (200, "/dev/vgmysql/mysql", False))

    async def test_overflowed_snapshot_is_neither_mounted_nor_restored(self):
        for path in ("/api/mountlv", "/api/restore-snapshot"):
            self.runner.expect(LVS_ARGV, stdout=report())
            code, body = await self.get(path, lv="mysql-snap-20240430T020000Z")
            self.assertEqual(code, 500)
            self.assertEqual(body["Code"], "ERROR")
            self.assertIn("overflowed (100% used) and is invalid", body["Message"])
        self.assertEqual({a[0] for a in self.runner.argvs}, {"lvs"})
        self.assertEqual(self.service.calls, [])

    async def test_malicious_names_never_reach_a_command(self):
        names = ["x;reboot", "a b", "$(id)", "`id`", "../vgmysql/mysql", "vg/../../etc",
                 "a|b", "a&b", "a>b", "\"q\"", "'q'", "*", "a\\b", "a\nb", "mysql-snap\n", ""]
        for path in ("/api/mountlv", "/api/removelv", "/api/restore-snapshot", "/api/lv"):
            for name in names:
                code, body = await self.get(path, lv=name)
                self.assertEqual(code, 500, (path, name))
                self.assertRegex(body["Message"], "invalid volume name|is empty", (path, name))
        self.assertEqual(self.runner.calls, [])

    async def test_unknown_volume(self):
        self.runner.expect(LVS_ARGV, stdout=report())
        code, body = await self.get("/api/removelv", lv="vgmysql/nope")
        self.assertEqual((code, body["Message"]), (500, "no logical volume 'vgmysql/nope'"))

    async def test_mount_point_busy(self):
        self.mounts.mount("/dev/sdz1", self.mount_point, "ext4", "8:1")
        code, body = await self.get("/api/mountlv", lv="mysql-snap-20240502T020000Z")
        self.assertEqual(code, 500)
        self.assertEqual(body["Message"], f"cannot mount: /dev/sdz1 is already mounted on "
                                          f"{self.mount_point}; unmount it first")
        self.assertEqual(self.runner.calls, [])


class StandaloneTests(unittest.TestCase):
    """tap-config/standalone.conf.json on a fresh machine: no snapshot made yet, so no
    SnapshotDirectory either (it is made with the first snapshot)."""

    def setUp(self):
        standalone = config_module.load(os.path.join(REPO_ROOT, "tap-config", "standalone.conf.json"))
        self.assertEqual(standalone.snapshot_backend, "copy")
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        self.snapshot_dir = os.path.join(base, "snapshots")
        config = attrs.evolve(standalone, snapshot_directory=self.snapshot_dir,
                              snapshot_mount_point=os.path.join(base, "mnt"),
                              state_dir=os.path.join(base, "state"), token_hint_file="")
        agent = build_agent(config, task.Clock(), runner=FakeRunner(self), token=Token(TOKEN))
        self.http = StubTreq(AgentAPI(agent).resource())

    async def get(self, path):
        response = await self.http.get("http://agent" + path, params={"token": TOKEN})
        return response.code, json.loads(await response.content())

    async def test_no_snapshot_directory_means_no_snapshots(self):
        self.assertEqual(await self.get("/api/lvs-snapshots"), (200, []))

    async def test_something_else_there_is_still_an_error(self):
        with open(self.snapshot_dir, "w"):
            pass
        code, body = await self.get("/api/lvs-snapshots")
        self.assertEqual(code, 500)
        self.assertEqual(body["Message"], f"SnapshotDirectory {self.snapshot_dir} is not a directory")
