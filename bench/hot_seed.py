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
import os
import shutil
import statistics
import subprocess
import sys
import time

from mariadb_hosts import (DATABASE, Agent, StreamedCopy, agent_settings, du, empty, populate,
                           run_directory)
from tests.support.mariadb import MariaDB, free_port

KEY = "hot-seed-bench"


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
    copy = StreamedCopy(db, target_dir)
    copy.listen()
    started = time.monotonic()
    copy.send()
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
    base = run_directory(args.dir, ("mariabackup", "mbstream", "nc"))
    if base is None:
        return 2
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
        source_agent = Agent(os.path.join(base, "agent-source"), agent_settings(source_db))
        agents.append(source_agent)
        target_agent = Agent(os.path.join(base, "agent-target"),
                             dict(agent_settings(target_db), SeedTransferPort=seed_port))
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
