"""The agent: every component built once from the configuration and wired together.

The HTTP API, the registration service and the command-line tests all reach the host
through one :class:`Agent`; tests build one with fakes in place of the runner or a
backend by passing them to :func:`build_agent`.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs

from orchagent.config import Config, local_hostname
from orchagent.interfaces import ICommandRunner
from orchagent.token import Token


@attrs.define
class Agent:
    config: Config
    reactor: Any
    runner: ICommandRunner
    hostname: str
    token: Token
    service: Any
    host: Any
    binlogs: Any
    snapshots: Any
    snapshot_hosts: Any
    seeds: Any
    registration: Any
    #: Called with each request; raises AccessDenied when the client certificate's OU is
    #: not accepted (mutual TLS), else does nothing.
    tls_guard: Callable[[Any], None] = lambda request: None
    #: orchagent.backups.Backups: mariabackup/xtrabackup backups as seed sources.
    backups: Any = None
    #: orchagent.replica.control.ReplicationControl: a seeded server's replication.
    replication: Any = None


def _runner(config: Config, reactor) -> ICommandRunner:
    from orchagent.process import ProcessRunner

    return ProcessRunner(reactor, default_timeout=config.command_timeout_seconds,
                         sudo=config.exec_with_sudo)


def _host_parts(config: Config, reactor, runner: ICommandRunner, part) -> dict[str, Any]:
    """MySQL service, host facts, backups and snapshots: what both the agent and its seed
    manager need, wired the same way wherever the manager runs."""
    from orchagent.backups import Backups
    from orchagent.host.facts import MySQLHost
    from orchagent.host.service import MySQLService
    from orchagent.snapshots import build_backend

    service = part("service", lambda: MySQLService(config, runner))
    host = part("host", lambda: MySQLHost(config, runner, reactor, service))
    backups = part("backups", lambda: Backups(config, runner, reactor, host, service))
    snapshots = part("snapshots", lambda: build_backend(config, runner, reactor, host, service,
                                                        backups=backups))
    return {"service": service, "host": host, "backups": backups, "snapshots": snapshots}


def _seed_manager(config: Config, reactor, runner: ICommandRunner, parts: dict[str, Any]):
    from orchagent.seed.manager import SeedManager

    return SeedManager(config, reactor, runner, parts["host"], parts["service"], parts["snapshots"],
                       hot=getattr(parts["backups"], "hot", None))


def _tls_guard(config: Config) -> Callable[[Any], None]:
    """The API's per-request client-certificate check, which only UseMutualTLS has; the
    TLS module (pyOpenSSL) is imported only then (:mod:`orchagent.pyopenssl`)."""
    if not config.use_mutual_tls:
        return lambda request: None
    from orchagent.api.tls import make_ou_guard

    return make_ou_guard(config)


def build_seed_manager(config: Config, reactor):
    """The seed manager with a runner and host parts of its own, as :func:`build_agent`
    would build it in process: what the seed engine process runs."""
    runner = _runner(config, reactor)
    return _seed_manager(config, reactor, runner, _host_parts(config, reactor, runner,
                                                              lambda name, make: make()))


def build_agent(config: Config, reactor, runner: ICommandRunner | None = None,
                token: Token | None = None, http_client=None, **replace) -> Agent:
    """Build every component; ``replace`` swaps any of them by field name (tests).

    Seeds run in a child process (:class:`~orchagent.seed.remote.SeedEngineProcess`,
    started with the service) when ``SeedEngineProcess`` is set, else in this process.
    """
    from orchagent.host.binlogs import MySQLLogs
    from orchagent.registration.client import Registration
    from orchagent.seed.remote import SeedEngineProcess
    from orchagent.snapshots.hosts import SnapshotHosts

    if runner is None:
        runner = _runner(config, reactor)
    if token is None:
        token = Token.from_file(config.token_file) if config.token_file else Token.random()
    hostname = local_hostname(config)

    def part(name, make):
        return replace[name] if name in replace else make()

    parts = _host_parts(config, reactor, runner, part)
    binlogs = part("binlogs", lambda: MySQLLogs(config, runner, reactor, parts["host"]))
    snapshot_hosts = part("snapshot_hosts", lambda: SnapshotHosts(config, runner))
    if config.seed_engine_process:
        seeds = part("seeds", lambda: SeedEngineProcess(
            config, reactor, command_observers=getattr(runner, "observers", None)))
    else:
        seeds = part("seeds", lambda: _seed_manager(config, reactor, runner, parts))
    if hasattr(parts["snapshots"], "seed_readers"):
        parts["snapshots"].seed_readers = getattr(seeds, "reading_sources", None)
    registration = part("registration", lambda: Registration(
        config, reactor, hostname, token, http_client=http_client))
    return Agent(
        config=config, reactor=reactor, runner=runner, hostname=hostname, token=token,
        service=parts["service"], host=parts["host"], binlogs=binlogs,
        snapshots=parts["snapshots"], snapshot_hosts=snapshot_hosts, seeds=seeds,
        registration=registration, tls_guard=part("tls_guard", lambda: _tls_guard(config)),
        backups=parts["backups"],
        replication=part("replication", lambda: _replication(config, runner)),
    )


def _replication(config: Config, runner: ICommandRunner):
    from orchagent.replica.control import ReplicationControl

    return ReplicationControl(config, runner)
