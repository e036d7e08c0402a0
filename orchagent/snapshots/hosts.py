"""Hosts with snapshots: ``/api/available-snapshots-local`` and ``/api/available-snapshots``.

As in the original agent, ``AvailableLocalSnapshotHostsCommand`` and
``AvailableSnapshotHostsCommand``, when configured, answer: their output, one host per
line.  Without them the answer comes from ``SnapshotInventoryFile``
(:mod:`orchagent.snapshots.inventory`).  With neither, no host is known and the lists are
empty (orchestrator asks on every agent page, so this must not fail).
"""

from __future__ import annotations

from typing import Any

from orchagent.interfaces import ICommandRunner
from orchagent.config import local_hostname
from orchagent.snapshots import inventory


class SnapshotHosts:
    def __init__(self, config: Any, runner: ICommandRunner, hostname: str | None = None):
        self.config = config
        self.runner = runner
        self._hostname = hostname

    @property
    def hostname(self) -> str:
        if self._hostname is None:
            self._hostname = local_hostname(self.config)
        return self._hostname

    async def local(self) -> list[str]:
        """Hosts in this host's datacenter with a snapshot, newest first."""
        return await self._hosts(self.config.available_local_snapshot_hosts_command, local=True)

    async def anywhere(self) -> list[str]:
        """Hosts in any datacenter with a snapshot, newest first."""
        return await self._hosts(self.config.available_snapshot_hosts_command, local=False)

    async def _hosts(self, command: str, local: bool) -> list[str]:
        if command:
            result = await self.runner.shell(command)
            lines = result.stdout.decode("utf-8", "replace").splitlines()
            return [line.strip() for line in lines if line.strip()]
        if not self.config.snapshot_inventory_file:
            return []
        hosts = inventory.read(self.config.snapshot_inventory_file)
        return inventory.select(hosts, self.hostname, self.config.datacenter, local)
