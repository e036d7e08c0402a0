"""Seed to caught-up replica against the operator's path: ``sudo .venv/bin/python bench/replica_bench.py``.

Two hosts in network namespaces joined by a veth pair (tests.support.netns), each with a
MariaDB 10.11 on the same port and a real agent (``twistd -n orchestrator-agent``) in its
namespace: a primary holding ``--rows`` InnoDB rows and an Aria table (bench/mariadb_hosts.py)
under a steady write load for the whole run (``--writes-per-sec`` iterations of an insert
and an update, each its own transaction), and a target.  Alternating, ``--rounds`` times
each, medians; each timed from "seed requested" until the target replicates from the
primary within ``--max-lag`` seconds (both threads running, Seconds_Behind_Master known
and at most that), replication looked at every 0.1 s on both sides:

* **orchagent** — ``orchagent seed --target T --source P --hot --replicate --max-lag 10``
  (the controller as a child process, as an operator types it), with every check on:
  the controller's checks before anything changes, a per-seed key (keyed tag and BLAKE3
  digest of every chunk, BLAKE3 stream digest), the streamed backup prepared, owned and
  synced on the target, then ``SeedVerifyStart: on`` (a throwaway server started on the
  staged copy: InnoDB recovery, system tables and a sample of user tables read, the
  backup's coordinates recorded, clean shutdown) before it is moved into the datadir;
  post-copy, MySQL started and waited for ("ready for connections"), the coordinates
  applied by the agent (``start-replication``: gtid_slave_pos, CHANGE MASTER with the
  ReplicationCredentialsFile user, START SLAVE), replication-status followed; the
  controller polls every 0.1 s (``--poll-interval``).
* **by hand** — ``nc -l | mbstream -x`` into the target's datadir, ``mariabackup --backup
  --stream=xbstream | nc -N`` on the primary, ``mariabackup --prepare``, ``chown -R
  mysql:mysql``, MySQL started (the same service command the agent runs), the GTID read
  from ``xtrabackup_binlog_info`` (``mariadb_backup_binlog_info`` on 11.x), ``SET GLOBAL
  gtid_slave_pos``, ``CHANGE MASTER TO ... MASTER_USE_GTID=slave_pos``, ``START SLAVE``,
  ``SHOW SLAVE STATUS`` until caught up.  No check at all: no digest, no verified start,
  no sync.

Before every round (untimed) the target's MySQL is stopped, its datadir emptied and
every dirty page flushed.  After the last round of each method (untimed) the writes are
paused, the target must reach the primary's ``gtid_binlog_pos`` and every table's
CHECKSUM TABLE must equal the primary's; then the writes resume.  Everything is under
``--dir`` and removed at the end (``--keep`` keeps the files); servers, agents, the
writer and the namespaces are stopped and removed whatever happens.  The figures are
printed as Markdown (pasted into BENCHMARKS.md).  Exit status 1 when orchagent's median
is slower than the operator's.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time

from mariadb_hosts import (DATABASE, REPO, Agent, Cleanups, StreamedCopy, agent_settings, du,
                           empty, populate, run_directory)
from tests.support.mariadb import MariaDB, free_port
from tests.support.netns import create_pair

REPL_USER = "repl"
#: Seconds between two looks at the target's replication, on both sides.
POLL = 0.1
#: Longest a round may take before the bench gives up.
ROUND_LIMIT = 600

STEADY_WRITES = f"""
USE {DATABASE};
CREATE TABLE control (running INT NOT NULL) ENGINE=InnoDB;
INSERT INTO control VALUES (1);
CREATE TABLE writes (id BIGINT AUTO_INCREMENT PRIMARY KEY, k INT NOT NULL, note VARCHAR(60),
  at DATETIME(6)) ENGINE=InnoDB;
DELIMITER //
CREATE PROCEDURE steady_writes(per_sec INT, order_rows INT)
BEGIN
  DECLARE i INT DEFAULT 0;
  WHILE (SELECT running FROM control) = 1 DO
    INSERT INTO writes (k, note, at) VALUES (i, CONCAT('write ', i), NOW(6));
    UPDATE orders SET amount = amount + 1 WHERE id = 1 + (i * 7919) % order_rows;
    SET i = i + 1;
    DO SLEEP(1 / per_sec);
  END WHILE;
END //
DELIMITER ;
"""


class Writer:
    """The primary's steady write load: ``steady_writes`` in a client of its own, until
    ``control.running`` is set to 0 (:meth:`pause`)."""

    def __init__(self, db: MariaDB, per_sec: int, rows: int):
        self.db = db
        self.per_sec = per_sec
        self.rows = rows
        self.client: subprocess.Popen | None = None

    def start(self) -> None:
        self.db.sql("UPDATE control SET running = 1", DATABASE)
        self.client = subprocess.Popen(
            self.db.client_argv(DATABASE) + ["-e", f"CALL steady_writes({self.per_sec}, {self.rows})"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def pause(self) -> None:
        if self.client is None:
            return
        self.db.sql("UPDATE control SET running = 0", DATABASE)
        _, err = self.client.communicate(timeout=60)
        if self.client.returncode != 0:
            raise RuntimeError(f"the writer failed: {err.decode(errors='replace').strip()}")
        self.client = None

    def stop(self) -> None:
        """Whatever happened: end the client (the server goes down with the bench)."""
        if self.client is not None and self.client.poll() is None:
            self.client.kill()
            self.client.wait()


def slave_status(db: MariaDB) -> dict[str, str]:
    """SHOW SLAVE STATUS as {column: value}; empty when the server is no replica."""
    argv = db.client_argv()
    argv[2:2] = ["--batch"]
    out = subprocess.run(argv, input=b"SHOW SLAVE STATUS", stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, check=True, timeout=30).stdout.decode()
    lines = out.splitlines()
    return dict(zip(lines[0].split("\t"), lines[1].split("\t"))) if len(lines) > 1 else {}


def caught_up(status: dict[str, str], max_lag: float) -> bool:
    """What the controller calls caught up: both threads run, the lag known and small."""
    lag = status.get("Seconds_Behind_Master", "NULL")
    return (status.get("Slave_IO_Running") == "Yes" and status.get("Slave_SQL_Running") == "Yes"
            and lag != "NULL" and int(lag) <= max_lag)


def service_settings(db: MariaDB) -> dict:
    """An agent's keys for ``db``, its status asked as a service manager answers it (is
    the pid file's process alive), not by the test suite's Python script: the agents ask
    it several times a seed, the operator never, and a Python start costs 50-70 ms."""
    return dict(agent_settings(db), MySQLServiceStatusCommand=(
        f'kill -0 "$(cat {shlex.quote(db.pid_file)} 2>/dev/null)" 2>/dev/null'))


def binlog_info(datadir: str) -> tuple[str, str, str]:
    """(file, position, GTID) of the backup's consistent point."""
    for name in ("mariadb_backup_binlog_info", "xtrabackup_binlog_info"):
        path = os.path.join(datadir, name)
        if os.path.exists(path):
            with open(path) as fh:
                file, position, gtid = fh.read().split()
            return file, position, gtid
    raise RuntimeError(f"no binlog info file in {datadir}")


class Bench:
    """The two hosts, their servers and agents, and one round of each method."""

    def __init__(self, args, base: str):
        self.args = args
        self.base = base
        self.servers: list[MariaDB] = []
        self.agents: list[Agent] = []
        self.writer: Writer | None = None
        self.password = hashlib.sha256(os.urandom(16)).hexdigest()[:20]

    def set_up(self, cleanups: Cleanups) -> None:
        """The namespaces, both servers (the primary populated), both agents; what is
        made is stopped by :meth:`close` (the namespaces by ``cleanups``), also when this
        fails half-way."""
        self.pair = create_pair(cleanups)
        args, base = self.args, self.base
        port = free_port()
        self.primary = self._server("primary", port, 1)
        self.target = self._server("target", port, 2)
        self.primary.install()
        self.target.install()
        self._start_in(self.pair.a, self.primary)
        print(f"populating {args.rows} rows ...", file=sys.stderr)
        populate(self.primary, args.rows)
        self.primary.sql(STEADY_WRITES)
        self.primary.sql(f"CREATE USER {REPL_USER}@'%' IDENTIFIED BY '{self.password}';"
                         f"GRANT REPLICATION SLAVE ON *.* TO {REPL_USER}@'%'")
        # A recent checkpoint: the tables' pages are in the data files, not only in the redo.
        self.primary.stop()
        self._start_in(self.pair.a, self.primary)
        self.size = du(self.primary.datadir)
        self.token_file = self._private("fleet-token", hashlib.sha256(os.urandom(32)).hexdigest())
        credentials = self._private("repl.cnf",
                                    f"[client]\nuser={REPL_USER}\npassword={self.password}\n")
        # One seed port for the fleet: the source connects to the target's on its own's number.
        seed_port = free_port()
        self.source_agent = self._agent("agent-source", self.pair.a,
                                        dict(service_settings(self.primary), SeedTransferPort=seed_port))
        self.target_agent = self._agent(
            "agent-target", self.pair.b,
            dict(service_settings(self.target), SeedTransferPort=seed_port, SeedVerifyStart="on",
                 ReplicationCredentialsFile=credentials))
        self.controller_env = dict(os.environ, ORCHAGENT_HOME=os.path.join(base, "controller"),
                                   ORCHAGENT_TOKEN_FILE=self.token_file, PYTHONPATH=REPO,
                                   PYTHONUNBUFFERED="1")

    def _server(self, name: str, port: int, server_id: int) -> MariaDB:
        home = os.path.join(self.base, name)
        os.makedirs(home)
        os.chmod(home, 0o755)
        shutil.chown(home, "mysql", "mysql")
        server = MariaDB(home, port=port, server_id=server_id, options={"bind-address": "0.0.0.0"})
        self.servers.append(server)
        return server

    @staticmethod
    def _start_in(host, server: MariaDB) -> None:
        """Start ``server`` inside ``host``'s namespace (listening on its address), with
        the service command the agent runs."""
        subprocess.run([*host.prefix, "sh", "-c", server.start_command], check=True,
                       stdout=subprocess.DEVNULL)

    def _private(self, name: str, text: str) -> str:
        path = os.path.join(self.base, name)
        with open(path, "w") as fh:
            fh.write(text + ("" if text.endswith("\n") else "\n"))
        os.chmod(path, 0o600)
        return path

    def _agent(self, name: str, host, settings: dict) -> Agent:
        agent = Agent(os.path.join(self.base, name),
                      dict(settings, TokenFile=self.token_file, AgentHostname=host.address),
                      prefix=host.prefix, address=host.address)
        self.agents.append(agent)
        return agent

    def start_writes(self) -> None:
        self.writer = Writer(self.primary, self.args.writes_per_sec, self.args.rows)
        self.writer.start()

    def reset_target(self) -> None:
        """Untimed: MySQL stopped on the target, its datadir empty, dirty pages flushed."""
        self.target.stop()
        empty(self.target.datadir)

    # --- the two methods --------------------------------------------------------------------

    def run_orchagent(self) -> dict:
        self.reset_target()
        argv = [sys.executable, "-m", "orchagent.cli.main", "seed", "--target", self.target_agent.host,
                "--source", self.source_agent.host, "--hot", "--replicate",
                "--max-lag", f"{self.args.max_lag:g}", "--poll-interval", f"{POLL:g}"]
        started = time.monotonic()
        controller = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      env=self.controller_env, cwd=self.base)
        marks, output = {}, []
        for line in iter(controller.stdout.readline, b""):
            now = time.monotonic() - started
            text = line.decode(errors="replace").rstrip("\n")
            output.append(text)
            for mark, pattern in (("seeded", r"^post-copy on "), ("answers", r" done: MySQL answers on "),
                                  ("caught_up", r" replicates from ")):
                if re.search(pattern, text):
                    marks.setdefault(mark, now)
        code = controller.wait(ROUND_LIMIT)
        total = time.monotonic() - started
        if code != 0 or "caught_up" not in marks:
            raise RuntimeError(f"orchagent seed exited {code}:\n" + "\n".join(output[-20:]))
        seed_id = re.search(r"seed (s[0-9a-f]+) done", "\n".join(output)).group(1)
        status = self.target_agent.get(f"/api/seed-status/{seed_id}")
        return {"seconds": total, "seeded": marks["seeded"], "check": self._check_seconds(seed_id),
                "start": marks["answers"] - marks["seeded"], "catch_up": total - marks["answers"],
                "bytes": status["BytesTotal"], "from": status["Replication"]["From"]}

    def _check_seconds(self, seed_id: str) -> float:
        """The verified start's seconds, from the target agent's log of the seed's steps."""
        with open(os.path.join(self.target_agent.directory, "agent.log"), errors="replace") as fh:
            log = fh.read()
        steps = re.findall(rf"seed {seed_id}: received .* \(after the stream: ([^)]*)\)", log)
        found = re.search(r"\bcheck ([0-9.]+)s", steps[-1]) if steps else None
        if found is None:
            raise RuntimeError(f"the target's log does not show seed {seed_id}'s verified start")
        return float(found.group(1))

    def run_by_hand(self) -> dict:
        self.reset_target()
        datadir = self.target.datadir
        copy = StreamedCopy(self.primary, datadir, self.pair.b.address,
                            source_prefix=self.pair.a.prefix, target_prefix=self.pair.b.prefix)
        started = time.monotonic()
        copy.listen()
        copy.send()
        copied = time.monotonic() - started
        subprocess.run(["mariabackup", "--prepare", f"--target-dir={datadir}"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["chown", "-R", "mysql:mysql", datadir], check=True)
        prepared = time.monotonic() - started
        self._start_in(self.pair.b, self.target)
        answers = time.monotonic() - started
        _, _, gtid = binlog_info(datadir)
        self.target.sql(
            f"SET GLOBAL gtid_slave_pos = '{gtid}'; CHANGE MASTER TO "
            f"MASTER_HOST='{self.pair.a.address}', MASTER_PORT={self.primary.port}, "
            f"MASTER_USER='{REPL_USER}', MASTER_PASSWORD='{self.password}', "
            "MASTER_USE_GTID=slave_pos; START SLAVE")
        while not caught_up(slave_status(self.target), self.args.max_lag):
            if time.monotonic() - started > ROUND_LIMIT:
                raise RuntimeError(f"by hand: not caught up after {ROUND_LIMIT} s: "
                                   f"{slave_status(self.target)}")
            time.sleep(POLL)
        total = time.monotonic() - started
        return {"seconds": total, "copy": copied, "prepare": prepared - copied,
                "start": answers - prepared, "catch_up": total - answers}

    # --- the check -----------------------------------------------------------------------------

    def check_target(self) -> str:
        """Untimed: writes paused, the target at the primary's GTID holds the same tables."""
        self.writer.pause()
        try:
            (gtid,), = self.primary.sql("SELECT @@gtid_binlog_pos")
            deadline = time.monotonic() + 120
            while self.target.sql("SELECT @@gtid_slave_pos") != [(gtid,)]:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the target did not reach {gtid}: {slave_status(self.target)}")
                time.sleep(POLL)
            status = slave_status(self.target)
            if status.get("Master_Host") != self.pair.a.address:
                raise RuntimeError(f"the target replicates from {status.get('Master_Host')}")
            tables = ("orders", "labels", "writes")
            sums = [{t: db.sql(f"CHECKSUM TABLE {DATABASE}.{t} EXTENDED")[0][1] for t in tables}
                    for db in (self.primary, self.target)]
            if sums[0] != sums[1]:
                raise RuntimeError(f"CHECKSUM TABLE differs: primary {sums[0]}, target {sums[1]}")
            (rows,), = self.target.sql(f"SELECT COUNT(*) FROM {DATABASE}.writes")
        finally:
            self.writer.start()
        return f"at {gtid}, CHECKSUM TABLE equal ({rows} rows written under the load)"

    def close(self) -> None:
        if self.writer is not None:
            self.writer.stop()
        for agent in self.agents:
            agent.stop()
        for server in self.servers:
            server.destroy(remove_datadir=True)


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def markdown(args, bench: Bench, ours: list[dict], by_hand: list[dict], checks: dict,
             writes: float) -> str:
    def row(name, runs, key):
        values = [r[key] for r in runs]
        return f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |"

    lines = [
        f"Primary datadir {bench.size / 2**20:.0f} MiB ({args.rows} InnoDB rows + an Aria table), "
        f"{writes:.0f} write transactions/s on it throughout, two network namespaces over a veth "
        f"pair, {os.cpu_count()} cores, {args.rounds} rounds of each alternating; seconds from the "
        f"seed's request until the target replicates within {args.max_lag:g} s.",
        "",
        "| until caught up | median | min | max |",
        "|---|---|---|---|",
        row("orchagent seed --hot --replicate (every check on)", ours, "seconds"),
        row("  of which the seed (checks, backup streamed, prepared, synced, verified start, moved)",
            ours, "seeded"),
        row("    of which the verified start (SeedVerifyStart on)", ours, "check"),
        row("  of which post-copy and MySQL started until it answers", ours, "start"),
        row("  of which replication started until caught up", ours, "catch_up"),
        row("by hand: mariabackup --stream \\| nc \\| mbstream, --prepare, start, CHANGE MASTER", by_hand,
            "seconds"),
        row("  of which the streamed copy", by_hand, "copy"),
        row("  of which --prepare and chown", by_hand, "prepare"),
        row("  of which MySQL started until it answers", by_hand, "start"),
        row("  of which CHANGE MASTER, START SLAVE until caught up", by_hand, "catch_up"),
        "",
        f"Ratio orchagent / by hand (medians): "
        f"**{median(ours, 'seconds') / median(by_hand, 'seconds'):.2f}**. "
        f"orchagent's coordinates read from: {ours[-1]['from']}. Checked after the last round "
        f"of each (writes paused): orchagent {checks['orchagent']}; by hand {checks['by hand']}.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--writes-per-sec", type=int, default=100,
                        help="iterations per second of the write load (an insert and an update)")
    parser.add_argument("--max-lag", type=float, default=10.0)
    parser.add_argument("--dir", default="/var/tmp/orchagent-replica-bench")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    base = run_directory(args.dir, ("mariabackup", "mbstream", "nc", "ss", "nsenter"))
    if base is None:
        return 2
    cleanups = Cleanups()
    bench = Bench(args, base)
    try:
        bench.set_up(cleanups)
        bench.start_writes()
        (writes_before,), = bench.primary.sql(f"SELECT COUNT(*) FROM {DATABASE}.writes")
        load_started = time.monotonic()
        ours, by_hand, checks = [], [], {}
        writes = 0.0
        methods = {"orchagent": (bench.run_orchagent, ours), "by hand": (bench.run_by_hand, by_hand)}
        for number in range(args.rounds):
            for name in (("orchagent", "by hand") if number % 2 else ("by hand", "orchagent")):
                run, runs = methods[name]
                runs.append(run())
                print(f"round {number}: {name} {runs[-1]['seconds']:.2f} s", file=sys.stderr)
                if number == args.rounds - 1:
                    if not checks:
                        # The load's rate up to the first pause of the writes.
                        (written,), = bench.primary.sql(f"SELECT COUNT(*) FROM {DATABASE}.writes")
                        writes = 2 * (int(written) - int(writes_before)) / (time.monotonic() - load_started)
                    checks[name] = bench.check_target()
        print(markdown(args, bench, ours, by_hand, checks, writes))
        return 0 if median(ours, "seconds") <= median(by_hand, "seconds") else 1
    finally:
        bench.close()
        cleanups.run()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
