"""``orchagent``: the operator's command line for a fleet of agents.

    orchagent seed --target HOST [--source HOST] [--stop-target] [--rate-limit 50M]
    orchagent seed --target HOST --source HOST --hot
    orchagent seed --resume ID
    orchagent status HOST [--json]
    orchagent snapshots HOST [--json]
    orchagent abort ID [--host HOST ...] [--json]

How it finds and authenticates to agents: :mod:`orchagent.cli.settings`.  What a seed does,
in which order: :mod:`orchagent.cli.seed`.

Exit status: 0 done; 1 failed (a resumable seed says how to resume); 2 bad usage or
settings; 3 refused by the checks (nothing was changed); 130 interrupted (the seed was
aborted and cleaned up).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from typing import Any, Callable, Sequence, TextIO

from twisted.internet import defer

from orchagent.cli.client import AgentCallFailed, AgentClient, make_http_client, segment
from orchagent.cli.render import (Reporter, format_bytes, key_values, progress_line, replication_line,
                                  table, to_json)
from orchagent.cli.seed import (ReplicationFailed, SeedFailed, SeedInterrupted, SeedOptions, SeedRefused,
                                Seeder)
from orchagent.cli.settings import Settings, SettingsError, load_settings
from orchagent.cli.state import SeedStore

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
#: The seed is done but its replication failed or did not catch up (--replicate).
EXIT_REPLICATION = 4

_SIZE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"50M"`` → 52428800 (binary units; a bare number is bytes)."""
    match = _SIZE.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1048576, 512K, 50M, 1G)")
    power = " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * 1024 ** power)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse that reports through our streams and exit codes instead of sys.exit."""

    def error(self, message):
        raise SettingsError(f"{message} (see {self.prog} --help)")

    def exit(self, status=0, message=None):
        raise _Exit(status, message)


class _Exit(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="controller config (default ~/.orchagent/config.json)")
    common.add_argument("--token-file", help="file holding the agents' token "
                        "(default: $ORCHAGENT_TOKEN_FILE, then TokenFile of the config)")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")

    parser = _Parser(prog="orchagent", description=(
        "Drive orchestrator agents: seed a replica from a snapshot of another host, show a "
        "host's state and snapshots, abort a seed."))
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    seed = commands.add_parser(
        "seed", parents=[common], help="seed a replica (the whole job)",
        description="Copy the newest snapshot of the source into the target's datadir and start "
                    "MySQL there.  Everything is checked before anything changes; Ctrl-C aborts "
                    "both sides cleanly; a seed that failed mid-way continues with --resume ID.",
        epilog="Exit status: 0 done, 1 failed, 2 usage, 3 refused (nothing changed), 4 seeded but "
               "replication failed (--replicate), 130 interrupted.")
    seed.add_argument("--target", help="the host to seed (its data is replaced)")
    seed.add_argument("--source", help="the host whose newest snapshot is copied (default: "
                      "the first the target suggests, same datacenter first)")
    seed.add_argument("--resume", metavar="ID", help="continue the interrupted seed ID")
    seed.add_argument("--stop-target", action="store_true",
                      help="stop MySQL on the target instead of refusing")
    seed.add_argument("--hot", action="store_true",
                      help="copy a fresh backup of the source's running server (mariabackup or "
                           "xtrabackup on the source) instead of its newest snapshot; needs --source")
    seed.add_argument("--rate-limit", type=parse_size, default=0, metavar="SIZE",
                      help="send at most SIZE bytes per second (e.g. 50M)")
    seed.add_argument("--poll-interval", type=_positive_float, default=1.0, metavar="SECONDS",
                      help="seconds between progress queries (default 1)")
    seed.add_argument("--unreachable-timeout", type=_positive_float, default=60.0, metavar="SECONDS",
                      help="give up (resumably) when an agent does not answer this long")
    seed.add_argument("--stall-timeout", type=_positive_float, default=600.0, metavar="SECONDS",
                      help="give up (resumably) when no byte moved this long")
    seed.add_argument("--start-timeout", type=_positive_float, default=600.0, metavar="SECONDS",
                      help="how long MySQL may take to answer after it is started")
    seed.add_argument("--replicate", action="store_true",
                      help="then have the target replicate from the seed's master (the agent applies "
                           "the coordinates it recorded) and wait until it has caught up")
    seed.add_argument("--max-lag", type=_non_negative_float, default=10.0, metavar="SECONDS",
                      help="with --replicate: caught up when at most this many seconds behind (default 10)")

    status = commands.add_parser("status", parents=[common], help="a host's MySQL, space, mount, seeds")
    status.add_argument("host")
    snapshots = commands.add_parser("snapshots", parents=[common], help="a host's snapshots")
    snapshots.add_argument("host")
    abort = commands.add_parser("abort", parents=[common], help="abort a seed on both sides")
    abort.add_argument("seed_id", metavar="ID")
    abort.add_argument("--host", action="append", default=[],
                       help="a host of the seed, when it was not started from here (repeat)")
    return parser


class Controller:
    """One invocation: settings, a client per host, the streams; commands as methods."""

    def __init__(self, settings: Settings, reactor, out: TextIO, err: TextIO,
                 http_factory: Callable | None = None):
        self.settings = settings
        self.reactor = reactor
        self.out = out
        self.err = err
        self.http_factory = http_factory or (lambda address: make_http_client(reactor, address))
        self.store = SeedStore(settings.seeds_dir)
        self._clients: dict[str, AgentClient] = {}
        self.seeder: Seeder | None = None

    def connect(self, host: str) -> AgentClient:
        if host not in self._clients:
            address = self.settings.resolve(host)
            self._clients[host] = AgentClient(address, self.http_factory(address), self.reactor)
        return self._clients[host]

    def print(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    # --- status / snapshots --------------------------------------------------------------

    async def status(self, host: str, as_json: bool) -> int:
        client = self.connect(host)
        facts: dict[str, Any] = {"Host": host, "URL": client.address.url,
                                 "Hostname": await client.call("hostname"),
                                 "MySQLRunning": await client.call("mysql-status")}
        for key, path in (("MySQLPort", "mysql-port"), ("MySQLDiskUsage", "mysql-du"),
                          ("DatadirAvailableSpace", "mysql-datadir-available-space"),
                          ("Mount", "mount"), ("Snapshots", "lvs-snapshots"),
                          ("Datacenter", "datacenter")):
            try:
                facts[key] = await client.call(path)
            except AgentCallFailed as e:
                if e.unreachable:
                    raise
                facts[key] = {"CallFailed": e.message}
        if facts["MySQLRunning"] is True:
            try:
                facts["Replication"] = await client.call("replication-status")
            except AgentCallFailed as e:
                if e.unreachable:
                    raise
                facts["Replication"] = {"CallFailed": e.message}
        facts["Seeds"] = await self._local_seeds(client)
        if as_json:
            self.print(to_json(facts))
        else:
            self.print(key_values(_status_rows(facts)))
        return EXIT_OK

    async def _local_seeds(self, client: AgentClient) -> list[dict]:
        """Seeds recorded here in which ``client`` takes part, with their seed-status."""
        seeds = []
        for record in self.store.all():
            roles = [role for role, name in (("target", record.target), ("source", record.source))
                     if self._same_agent(name, client)]
            if not roles:
                continue
            try:
                status = await client.call(f"seed-status/{segment(record.seed_id)}")
            except AgentCallFailed as e:
                status = {"CallFailed": e.message}
            seeds.append({"SeedId": record.seed_id, "Role": roles[0], "Phase": record.phase,
                          "Target": record.target, "Source": record.source, "Status": status})
        return seeds

    def _same_agent(self, name: str, client: AgentClient) -> bool:
        try:
            return self.settings.resolve(name).url == client.address.url
        except SettingsError:
            return False

    async def snapshots(self, host: str, as_json: bool) -> int:
        volumes = await self.connect(host).call("lvs-snapshots")
        if as_json:
            self.print(to_json(volumes))
            return EXIT_OK
        if not volumes:
            self.print(f"{host}: no snapshots")
            return EXIT_OK
        rows = [(v.get("Name"), v.get("Path"), v.get("GroupName"),
                 f"{float(v.get('SnapshotPercent', 0)):.1f}%",
                 "yes" if v.get("IsSnapshot") and float(v.get("SnapshotPercent", 0)) < 100 else "NO (overflowed)")
                for v in volumes]
        self.print(table(("NAME", "PATH", "GROUP", "USED", "VALID"), rows))
        self.print("(newest first; a seed copies the first)")
        return EXIT_OK

    # --- seeds -------------------------------------------------------------------------------

    def make_seeder(self, args) -> Seeder:
        options = SeedOptions(
            stop_target=args.stop_target, rate_limit=args.rate_limit,
            poll_interval=args.poll_interval, unreachable_timeout=args.unreachable_timeout,
            stall_timeout=args.stall_timeout, start_timeout=args.start_timeout, hot=args.hot,
            replicate=args.replicate, max_lag=args.max_lag)
        reporter = Reporter(self.err if args.json else self.out, self.err,
                            live=False if args.json else None, clock=self.reactor)
        self.seeder = Seeder(self.connect, self.store, self.reactor, reporter, options)
        return self.seeder

    async def seed(self, args) -> int:
        seeder = self.make_seeder(args)
        started = self.reactor.seconds()
        try:
            if args.resume:
                if args.target or args.source:
                    raise SettingsError("--resume takes its hosts from the seed's record: "
                                        "give no --target or --source")
                record = await seeder.resume(args.resume)
            else:
                if not args.target:
                    raise SettingsError("seed needs --target HOST (or --resume ID)")
                if args.hot and not args.source:
                    raise SettingsError("--hot needs --source HOST (the running server to copy)")
                record = await seeder.seed(args.target, args.source)
        except SeedRefused as e:
            self.err.write("refused, nothing was changed:\n" + "".join(f"  - {p}\n" for p in e.problems))
            return EXIT_REFUSED
        except SeedInterrupted:
            self.err.write("interrupted: the seed was aborted\n")
            return EXIT_INTERRUPTED
        except ReplicationFailed as e:
            self.err.write(f"seed {e.seed_id} done (MySQL runs on the copy), but replication failed: {e}\n"
                           "  nothing was undone: the datadir stays, as do the target's replication "
                           "settings; fix the cause above, then START SLAVE on the target (a purged "
                           "binlog needs a new seed)\n")
            return EXIT_REPLICATION
        except SeedFailed as e:
            self.err.write(f"seed failed: {e}\n")
            if e.resumable and e.seed_id and self.store.exists(e.seed_id):
                self.err.write(f"  resume with:  orchagent seed --resume {e.seed_id}\n"
                               f"  or clean up:  orchagent abort {e.seed_id}\n")
            return EXIT_FAILED
        if args.json:
            self.print(to_json({"SeedId": record.seed_id, "Target": record.target,
                                "Source": record.source, "Snapshot": record.snapshot,
                                "Seconds": round(self.reactor.seconds() - started, 3),
                                **({"Replication": seeder.replication} if seeder.replication else {})}))
        return EXIT_OK

    async def abort(self, seed_id: str, hosts: Sequence[str], as_json: bool) -> int:
        seeder = Seeder(self.connect, self.store, self.reactor, Reporter(self.out, self.err, live=False))
        try:
            problems = await seeder.abort(seed_id, list(hosts))
        except SeedFailed as e:
            self.err.write(f"abort failed: {e}\n")
            return EXIT_FAILED
        if as_json:
            self.print(to_json({"SeedId": seed_id, "Aborted": not problems, "Problems": problems}))
        elif not problems:
            self.print(f"seed {seed_id} aborted")
        return EXIT_FAILED if problems else EXIT_OK

    def on_signal(self) -> None:
        """First Ctrl-C: abort the seed cleanly.  Second: quit at once."""
        if self.seeder is not None and self.seeder.interrupt():
            self.err.write("\ninterrupted: aborting both sides (Ctrl-C again quits without cleaning up)\n")
            self.err.flush()
            return
        os._exit(EXIT_INTERRUPTED)


def _replication_text(status: dict[str, Any]) -> str:
    """/api/replication-status in a line: what stops it, else where from and how far."""
    failure = status.get("Error") or status.get("Problem")
    if failure:
        return f"STOPPED: {failure}"
    if not status.get("MasterHost"):
        return "not a replica"
    return f"from {status['MasterHost']}:{status.get('MasterPort')}  {replication_line(status)}"


def _status_rows(facts: dict[str, Any]) -> list[tuple[str, Any]]:
    def err(value):
        return isinstance(value, dict) and "CallFailed" in value

    def show(key, render):
        value = facts.get(key)
        return f"error: {value['CallFailed']}" if err(value) else render(value)

    mount = facts.get("Mount")
    snaps = facts.get("Snapshots")
    rows = [
        ("host", f"{facts['Host']} ({facts['URL']})"),
        ("hostname", facts["Hostname"]),
        ("mysql", ("running" if facts["MySQLRunning"] else "stopped")
         + ("" if err(facts.get("MySQLPort")) else f", port {facts.get('MySQLPort')}")),
        ("datadir usage", show("MySQLDiskUsage", format_bytes)),
        ("free space", show("DatadirAvailableSpace", format_bytes)),
        ("snapshot mount", "error: " + mount["CallFailed"] if err(mount) else (
            f"{mount.get('Path')}: {mount.get('LVPath') or mount.get('Device')} mounted, "
            f"MySQL data {format_bytes(mount.get('MySQLDiskUsage'))}" if mount.get("IsMounted")
            else f"{mount.get('Path') or '(none configured)'}: not mounted")),
        ("snapshots", "error: " + snaps["CallFailed"] if err(snaps) else (
            f"{len(snaps)}, newest {snaps[0].get('Name')}"
            + ("" if float(snaps[0].get("SnapshotPercent", 0)) < 100 else " (OVERFLOWED)")
            if snaps else "none")),
        ("datacenter", show("Datacenter", lambda v: v or "(not set)")),
    ]
    if "Replication" in facts:
        rows.append(("replication", show("Replication", _replication_text)))
    for seed in facts.get("Seeds", []):
        status = seed["Status"]
        text = f"error: {status['CallFailed']}" if err(status) else (
            f"{status.get('State')}  {progress_line(status, width=10)}")
        rows.append((f"seed {seed['SeedId']}", f"{seed['Role']} ({seed['Source']} -> {seed['Target']}): {text}"))
    return rows


async def run(argv: Sequence[str], reactor, environ: dict[str, str] | None = None,
              out: TextIO | None = None, err: TextIO | None = None,
              http_factory: Callable | None = None, install_signals: bool = False) -> int:
    """One invocation; returns the exit status.  Tests call this with in-memory agents."""
    environ = dict(os.environ if environ is None else environ)
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        args = build_parser().parse_args(list(argv))
        settings = load_settings(environ, args.config, args.token_file)
        controller = Controller(settings, reactor, out, err, http_factory)
        if args.command == "seed" and install_signals:
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, lambda *_: reactor.callFromThread(controller.on_signal))
        if args.command == "seed":
            return await controller.seed(args)
        if args.command == "status":
            return await controller.status(args.host, args.json)
        if args.command == "snapshots":
            return await controller.snapshots(args.host, args.json)
        return await controller.abort(args.seed_id, args.host, args.json)
    except _Exit as e:
        if e.message:
            (out if e.status == 0 else err).write(e.message)
        return EXIT_OK if e.status == 0 else EXIT_USAGE
    except SettingsError as e:
        err.write(f"orchagent: {e}\n")
        return EXIT_USAGE
    except AgentCallFailed as e:
        err.write(f"orchagent: {e}\n")
        return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: run in the reactor, exit with the command's status."""
    from twisted.internet import task

    def start(reactor):
        d = defer.ensureDeferred(run(sys.argv[1:] if argv is None else argv, reactor,
                                     install_signals=True))

        def done(code):
            if code:
                raise SystemExit(code)

        return d.addCallback(done)

    task.react(start)


if __name__ == "__main__":
    main()
