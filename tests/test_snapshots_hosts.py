"""available-snapshots(-local) and datacenter: configured commands and the inventory."""

from __future__ import annotations

import json
import os

from treq.testing import StubTreq
from twisted.internet import task
from twisted.trial import unittest

from orchagent.agent import Agent
from orchagent.api.resource import AgentAPI
from orchagent.config import Config
from orchagent.errors import CommandFailed, NotAvailable
from orchagent.snapshots.hosts import SnapshotHosts
from orchagent.token import Token
from tests.support.fakes import FakeRunner

INVENTORY = {"hosts": [
    {"host": "db-a1.dc1", "datacenter": "dc1", "cluster": "main", "snapshotAt": "2024-05-01T02:00:00Z"},
    {"host": "db-a2.dc1", "datacenter": "dc1", "cluster": "main", "snapshotAt": "2024-05-02T02:00:00+00:00"},
    {"host": "db-a3.dc1", "datacenter": "dc1", "cluster": "main"},
    {"host": "db-b1.dc2", "datacenter": "dc2", "cluster": "main", "snapshotAt": "2024-05-03T02:00:00Z"},
    {"host": "db-x1.dc1", "datacenter": "dc1", "cluster": "other", "snapshotAt": "2024-05-04T02:00:00Z"},
    {"host": "db-a1.dc1", "datacenter": "dc1", "cluster": "main", "snapshotAt": "2024-04-01T02:00:00Z"},
]}


class HostsTests(unittest.TestCase):
    def inventory(self, doc) -> str:
        path = self.mktemp()
        with open(path, "w") as fh:
            fh.write(doc if isinstance(doc, str) else json.dumps(doc))
        return path

    def hosts(self, me="db-a9.dc1", **config) -> SnapshotHosts:
        self.runner = FakeRunner(self)
        return SnapshotHosts(Config(**config), self.runner, hostname=me)

    async def test_configured_commands_win(self):
        hosts = self.hosts(available_local_snapshot_hosts_command="list-local",
                           available_snapshot_hosts_command="list-all",
                           snapshot_inventory_file="/nonexistent")
        self.runner.expect_shell("list-local", stdout=b"a.dc1\n\n  b.dc1 \n")
        self.runner.expect_shell("list-all", stdout=b"a.dc1\nc.dc2\n")
        self.assertEqual(await hosts.local(), ["a.dc1", "b.dc1"])
        self.assertEqual(await hosts.anywhere(), ["a.dc1", "c.dc2"])

    async def test_failing_command(self):
        hosts = self.hosts(available_snapshot_hosts_command="list-all")
        self.runner.expect_shell("list-all", exit_code=2, stderr=b"no such host list")
        with self.assertRaisesRegex(CommandFailed, "no such host list"):
            await hosts.anywhere()

    async def test_nothing_configured_means_no_hosts(self):
        hosts = self.hosts()
        self.assertEqual((await hosts.local(), await hosts.anywhere()), ([], []))

    async def test_inventory_same_cluster_when_this_host_is_listed(self):
        path = self.inventory(INVENTORY)
        hosts = self.hosts(me="db-a3.dc1", datacenter="dc1", snapshot_inventory_file=path)
        self.assertEqual(await hosts.local(), ["db-a2.dc1", "db-a1.dc1", "db-a3.dc1"])
        self.assertEqual(await hosts.anywhere(),
                         ["db-b1.dc2", "db-a2.dc1", "db-a1.dc1", "db-a3.dc1"])

    async def test_inventory_every_cluster_for_an_unlisted_host(self):
        path = self.inventory(INVENTORY)
        hosts = self.hosts(datacenter="dc1", snapshot_inventory_file=path)
        self.assertEqual(await hosts.local(), ["db-x1.dc1", "db-a2.dc1", "db-a1.dc1", "db-a3.dc1"])
        self.assertEqual(len(await hosts.anywhere()), 5)

    async def test_datacenter_from_the_inventory(self):
        path = self.inventory(INVENTORY)
        hosts = self.hosts(me="db-b1.dc2", snapshot_inventory_file=path)
        self.assertEqual(await hosts.local(), ["db-b1.dc2"])
        unknown = self.hosts(me="elsewhere", snapshot_inventory_file=path)
        self.assertEqual(await unknown.local(), [])

    async def test_bad_inventories_are_errors_naming_the_problem(self):
        cases = [
            ("not json", "is not valid JSON"),
            ({"host": []}, "must be an object with a list 'hosts'"),
            ({"hosts": ["db1"]}, r"hosts\[0\] must be an object"),
            ({"hosts": [{"host": "ok"}, {"datacenter": "dc1"}]}, r"hosts\[1\]: host '' is not a host name"),
            ({"hosts": [{"host": "a;reboot"}]}, "is not a host name"),
            ({"hosts": [{"host": "a\n"}]}, "is not a host name"),
            ({"hosts": [{"host": "a", "snapshotAt": "yesterday"}]}, "not an ISO 8601 time"),
            ({"hosts": [{"host": "a", "cluster": 3}]}, "cluster must be a string"),
        ]
        for doc, message in cases:
            hosts = self.hosts(datacenter="dc1", snapshot_inventory_file=self.inventory(doc))
            with self.assertRaisesRegex(NotAvailable, message):
                await hosts.local()
        missing = self.hosts(snapshot_inventory_file="/nonexistent/inventory.json")
        with self.assertRaisesRegex(NotAvailable, "cannot read snapshot inventory /nonexistent/inventory.json"):
            await missing.anywhere()


class DatacenterApiTests(unittest.TestCase):
    async def test_datacenter_and_hosts_over_http(self):
        path = self.mktemp()
        with open(path, "w") as fh:
            json.dump(INVENTORY, fh)
        config = Config(datacenter="dc2", snapshot_inventory_file=path)
        agent = Agent(config=config, reactor=task.Clock(), runner=FakeRunner(self),
                      hostname="db-b1.dc2", token=Token("tok"), service=None, host=None,
                      binlogs=None, snapshots=None,
                      snapshot_hosts=SnapshotHosts(config, None, hostname="db-b1.dc2"),
                      seeds=None, registration=None)
        http = StubTreq(AgentAPI(agent).resource())

        async def get(path):
            response = await http.get("http://agent" + path, params={"token": "tok"})
            return response.code, json.loads(await response.content())

        self.assertEqual(await get("/api/datacenter"), (200, "dc2"))
        self.assertEqual(await get("/api/available-snapshots-local"), (200, ["db-b1.dc2"]))
        self.assertEqual(await get("/api/available-snapshots"),
                         (200, ["db-b1.dc2", "db-a2.dc1", "db-a1.dc1", "db-a3.dc1"]))
        os.unlink(path)
        code, body = await get("/api/available-snapshots")
        self.assertEqual(code, 500)
        self.assertIn("cannot read snapshot inventory", body["Message"])
