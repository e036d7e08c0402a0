"""Hot seed against the pipeline MariaDB users run today: ``sudo python3 bench/hot_seed.py``.

One source MariaDB (running, ``--rows`` rows of InnoDB data plus an Aria table) and one
target datadir, both on the root file system, on loopback.  Alternating, ``--rounds``
times each, medians:

* **orchagent hot seed** — two real agents (``twistd -n orchestrator-agent``):
  ``receive-mysql-seed-data`` on the target, ``send-mysql-seed-data?source=hot`` on the
  source; timed from the send call until the target reports the seed ``completed``:
  ``mariabackup --backup --stream=xbstream`` on the source, its output sent as it comes
  with verification on (keyed tag and BLAKE3 digest per chunk, a BLAKE3 stream
  digest), extracted by ``mbstream -x`` into the target's staging, ``--prepare``d there,
  owned, synced with syncfs and moved into the datadir.  The target's status tells when
  the stream ended (state ``verifying``), so the part after the stream is reported too
  (polled every 10 ms, so polling adds 5 ms on average where the pipeline is timed to
  its exit; state changes reach the API at once, byte counts only every
  0.5 s, so no "first byte" time is reported).
* **mariabackup | nc** — on the target ``nc -l | mbstream -x``, on the source
  ``mariabackup --backup --stream=xbstream | nc -N``, then ``mariabackup --prepare`` of
  the target directory; timed until the prepare exits (and, separately, after a
  ``sync -f`` of the target file system, since the agent's time includes durability).

The target is emptied and every dirty page flushed (``sync``) before each run.  After the last round of each, a server is
started on the target data and its row count checked (not timed).  Everything is under
``--dir`` and removed at the end unless ``--keep``; servers and agents are stopped
whatever happens.  The figures are printed as Markdown (pasted into BENCHMARKS.md).
Exit status 1 when the hot seed's median is slower than the pipeline's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.support import mariadb as mariadb_support  # noqa: E402
from tests.support.mariadb import MariaDB, free_port  # noqa: E402

DATABASE = "bench"
KEY = "hot-seed-bench"


def populate(db: MariaDB, rows: int) -> None:
    db.sql(f"""
CREATE DATABASE {DATABASE};
USE {DATABASE};
CREATE TABLE orders (id INT PRIMARY KEY, customer VARCHAR(40) NOT NULL, amount DECIMAL(12,2),
  note VARCHAR(120), created DATETIME, KEY (customer)) ENGINE=InnoDB;
INSERT INTO orders SELECT seq, CONCAT('customer-', seq % 50000), seq % 10000 / 7,
  REPEAT(MD5(seq), 3), '2024-01-01' + INTERVAL seq SECOND FROM seq_1_to_{rows};
CREATE TABLE labels (id INT PRIMARY KEY, label VARCHAR(32)) ENGINE=Aria;
INSERT INTO labels SELECT seq, CONCAT('label-', seq) FROM seq_1_to_20000;
""")


def empty(path: str) -> None:
    """Empty the target, then flush every dirty page (untimed): both methods share one
    disk here, and a run must not pay for writing back the previous run's data (the
    agent's syncfs would, the pipeline never syncs)."""
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.unlink(full)
    os.sync()


def du(path: str) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(path) for f in fs)


class Agent:
    """A real agent child process, driven with urllib."""

    def __init__(self, directory: str, config: dict):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.port = free_port()
        self.config = dict(config, HTTPPort=self.port, StateDir=os.path.join(directory, "state"),
                           TokenHintFile=os.path.join(directory, "token"), CommandTimeoutSeconds=600)
        path = os.path.join(directory, "agent.conf.json")
        with open(path, "w") as fh:
            json.dump(self.config, fh)
        env = dict(os.environ, PYTHONPATH=REPO)
        self.log = open(os.path.join(directory, "agent.log"), "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
             "--pidfile=", "orchestrator-agent", "--config", path],
            cwd=directory, env=env, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.config["TokenHintFile"]) or not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent did not start; see {directory}/agent.log")
            time.sleep(0.05)
        with open(self.config["TokenHintFile"]) as fh:
            self.token = fh.read().strip()

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/hostname", timeout=1).read()
            return True
        except OSError:
            return False

    def get(self, path: str, **params):
        params["token"] = self.token
        url = f"http://127.0.0.1:{self.port}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=600) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{path}: {e.code} {e.read().decode(errors='replace')}") from None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def run_hot(source: Agent, target: Agent, target_dir: str, seed_port: int, number: int) -> dict:
    empty(target_dir)
    seed = f"hot{number}"
    target.get(f"/api/receive-mysql-seed-data/{seed}", key=KEY)
    started = time.monotonic()
    source.get(f"/api/send-mysql-seed-data/127.0.0.1:{seed_port}/{seed}", key=KEY, source="hot")
    streamed = None
    while True:
        status = target.get(f"/api/seed-status/{seed}")
        if streamed is None and status["State"] == "verifying":
            streamed = time.monotonic() - started
        if status["State"] in ("completed", "failed", "aborted"):
            break
        time.sleep(0.01)
    total = time.monotonic() - started
    if status["State"] != "completed":
        raise RuntimeError(f"hot seed {seed} ended {status['State']}: {status['Error']}")
    streamed = streamed or total
    return {"seconds": total, "stream": streamed, "after": total - streamed,
            "bytes": status["BytesTotal"]}


def run_pipeline(db: MariaDB, target_dir: str, number: int) -> dict:
    empty(target_dir)
    port = free_port()
    receiver = subprocess.Popen(["bash", "-o", "pipefail", "-c",
                                 f"nc -l 127.0.0.1 {port} | mbstream -x -C {target_dir}"],
                                stderr=subprocess.DEVNULL)
    time.sleep(0.2)
    started = time.monotonic()
    sender = subprocess.run(["bash", "-o", "pipefail", "-c",
                             f"mariabackup --defaults-file={db.option_file} --backup "
                             f"--stream=xbstream | nc -N 127.0.0.1 {port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if receiver.wait(600) != 0 or sender.returncode != 0:
        raise RuntimeError(f"pipeline round {number} failed ({sender.returncode}, {receiver.returncode})")
    copied = time.monotonic() - started
    subprocess.run(["mariabackup", "--prepare", f"--target-dir={target_dir}"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total = time.monotonic() - started
    subprocess.run(["sync", "-f", target_dir], check=True)
    return {"seconds": total, "copy": copied, "synced": time.monotonic() - started}


def check_target(target_db: MariaDB, rows: int, owner: bool) -> str:
    """Start a server on the target data: the row count is the source's."""
    if owner:
        subprocess.run(["chown", "-R", "mysql:mysql", target_db.datadir], check=True)
    target_db.start()
    try:
        count = int(target_db.sql(f"SELECT COUNT(*) FROM {DATABASE}.orders")[0][0])
    finally:
        target_db.stop()
    if count != rows:
        raise RuntimeError(f"the target has {count} rows, not {rows}")
    return f"{count} rows"


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default="/var/tmp/orchagent-hot-bench")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    reason = mariadb_support.unavailable_reason()
    for tool in ("mariabackup", "mbstream", "nc"):
        if shutil.which(tool) is None:
            reason = reason or f"{tool} is not installed"
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    mariadb_support.become_subreaper()
    os.makedirs(args.dir, exist_ok=True)
    base = os.path.join(args.dir, f"run-{os.getpid()}")
    os.makedirs(base)
    os.chmod(base, 0o755)
    shutil.chown(base, "mysql", "mysql")
    servers, agents = [], []
    try:
        for name in ("source", "target"):
            os.makedirs(os.path.join(base, name))
            os.chmod(os.path.join(base, name), 0o755)
            shutil.chown(os.path.join(base, name), "mysql", "mysql")
        source_db = MariaDB(os.path.join(base, "source"))
        target_db = MariaDB(os.path.join(base, "target"))
        servers += [source_db, target_db]
        source_db.install()
        target_db.install()
        source_db.start()
        print(f"populating {args.rows} rows ...", file=sys.stderr)
        populate(source_db, args.rows)
        source_db.stop()
        source_db.start()
        size = du(source_db.datadir)
        seed_port = free_port()
        keys = {"mysql_options_file": "MySQLOptionsFile", "mysql_service_start_command":
                "MySQLServiceStartCommand", "mysql_service_stop_command": "MySQLServiceStopCommand",
                "mysql_service_status_command": "MySQLServiceStatusCommand"}
        source_agent = Agent(os.path.join(base, "agent-source"),
                             {keys[k]: v for k, v in source_db.agent_settings().items() if k in keys})
        agents.append(source_agent)
        target_agent = Agent(os.path.join(base, "agent-target"),
                             dict({keys[k]: v for k, v in target_db.agent_settings().items() if k in keys},
                                  SeedTransferPort=seed_port))
        agents.append(target_agent)
        hot, pipeline = [], []
        for number in range(args.rounds):
            for which in (("hot", "pipe") if number % 2 else ("pipe", "hot")):
                if which == "hot":
                    hot.append(run_hot(source_agent, target_agent, target_db.datadir, seed_port, number))
                    print(f"round {number}: hot seed {hot[-1]['seconds']:.2f} s", file=sys.stderr)
                else:
                    pipeline.append(run_pipeline(source_db, target_db.datadir, number))
                    print(f"round {number}: pipeline {pipeline[-1]['seconds']:.2f} s", file=sys.stderr)
        checks = {}
        run_pipeline(source_db, target_db.datadir, args.rounds)
        checks["pipe"] = check_target(target_db, args.rows, owner=True)
        run_hot(source_agent, target_agent, target_db.datadir, seed_port, args.rounds)
        checks["hot"] = check_target(target_db, args.rows, owner=False)
        hot_median, pipe_median = median(hot, "seconds"), median(pipeline, "seconds")
        print(markdown(args, size, hot, pipeline, checks))
        return 0 if hot_median <= pipe_median else 1
    finally:
        for agent in agents:
            agent.stop()
        for server in servers:
            server.destroy(remove_datadir=True)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


def markdown(args, size: int, hot: list[dict], pipeline: list[dict], checks: dict) -> str:
    def row(name, runs, key):
        values = [r[key] for r in runs]
        return f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |"

    cores = os.cpu_count()
    lines = [
        f"Source datadir {size / 2**20:.0f} MiB ({args.rows} InnoDB rows + an Aria table), "
        f"loopback, {cores} cores, {args.rounds} rounds alternating; seconds.",
        "",
        "| until the target datadir is ready | median | min | max |",
        "|---|---|---|---|",
        row("orchagent hot seed (verified, synced, in place)", hot, "seconds"),
        row("  of which until the stream ended (backup, transfer, extraction)", hot, "stream"),
        row("  of which after it (prepare, chown, syncfs, move in)", hot, "after"),
        row("mariabackup --stream=xbstream \\| nc, mbstream -x, --prepare", pipeline, "seconds"),
        row("  of which the streamed copy", pipeline, "copy"),
        row("  the same, then sync -f of the target", pipeline, "synced"),
        "",
        f"Ratio hot seed / pipeline (medians): "
        f"{median(hot, 'seconds') / median(pipeline, 'seconds'):.2f}. "
        f"Target data checked by starting a server on it: pipeline {checks['pipe']}, "
        f"hot seed {checks['hot']}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
