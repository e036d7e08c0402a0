"""Starting, stopping and checking the MySQL service.

The operator's commands win (``MySQLServiceStartCommand`` / ``StopCommand`` /
``StatusCommand``, shell text as in the original agent).  Without them the agent uses
systemd directly, as argv without a shell: ``systemctl is-active --quiet UNIT``,
``systemctl stop UNIT``, ``systemctl start UNIT``.  UNIT is ``MySQLServiceName``, else
the first of ``mariadb``, ``mysql``, ``mysqld`` that has a unit file (the file is looked
for, so no systemd bus call is needed to decide).
"""

from __future__ import annotations

import os
from typing import Sequence

from orchagent.errors import CommandFailed, NotAvailable

#: Where unit files live, in systemd's order of precedence.
UNIT_DIRECTORIES = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
                    "/lib/systemd/system", "/usr/lib/systemd/system")
UNIT_CANDIDATES = ("mariadb", "mysql", "mysqld")


class MySQLService:
    """The MySQL service of this host."""

    def __init__(self, config, runner, unit_directories: Sequence[str] = UNIT_DIRECTORIES):
        self.config = config
        self.runner = runner
        self.unit_directories = tuple(unit_directories)

    def unit(self) -> str:
        """The systemd unit the built-in commands act on."""
        if self.config.mysql_service_name:
            return self.config.mysql_service_name
        for name in UNIT_CANDIDATES:
            for directory in self.unit_directories:
                if os.path.exists(os.path.join(directory, name + ".service")):
                    return name
        raise NotAvailable(
            "no MySQL systemd unit found (" + ", ".join(n + ".service" for n in UNIT_CANDIDATES)
            + "): set MySQLServiceName or the MySQLService*Command keys")

    async def is_running(self) -> bool:
        """True when the status command (or ``systemctl is-active``) exits 0, false when
        it exits with another status.  A command that exits with no status (killed at
        CommandTimeoutSeconds, by a signal, for its output) answers nothing: that raises
        CommandFailed.  Read as "stopped", it let a seed move its tree into a datadir,
        or a restore replace one, under a server that might be running."""
        command = self.config.mysql_service_status_command
        if command:
            result = await self.runner.shell(command, check=False)
        else:
            result = await self.runner.run(["systemctl", "is-active", "--quiet", self.unit()], check=False)
        stopped = result.timed_out or result.stalled is not None or result.output_overflow
        if result.exit_code is None or stopped:
            raise CommandFailed(f"cannot tell whether MySQL is running: {result.describe_failure()}", result)
        return result.exit_code == 0

    async def stop(self) -> bool:
        await self._act("stop", self.config.mysql_service_stop_command)
        return True

    async def start(self) -> bool:
        await self._act("start", self.config.mysql_service_start_command)
        return True

    async def _act(self, verb: str, command: str) -> None:
        if command:
            result = await self.runner.shell(command, check=False)
        else:
            result = await self.runner.run(["systemctl", verb, self.unit()], check=False, privileged=True)
        if not result.ok:
            raise CommandFailed(f"cannot {verb} MySQL: {result.describe_failure()}", result)
