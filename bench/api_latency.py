"""API latency of a real agent on loopback: ``python bench/api_latency.py``.

(a) orchestrator's GetAgent (the 9 calls, in order, one after the other, as orchestrator
    makes them) against a datadir of ordinary size: median and p90 of the whole sequence.
    Target: median < 50 ms.
(b) ``/api/status`` latency while ``/api/mysql-du`` walks a 100k-file datadir over and
    over (two walks in flight at all times): p50/p99 of the status calls.  Target: p99 < 20 ms.

The agent is the real daemon (``twistd -n orchestrator-agent``, started with
tests/support/daemon.py); its datadir comes from ``MySQLDatadirCommand`` (``cat`` of a file
this script rewrites between the two parts).  The client keeps its connections open, as
orchestrator's Go client does.  Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool  # noqa: E402
from treq.client import HTTPClient  # noqa: E402

from tests.support.daemon import Daemon  # noqa: E402
from tests.support.orchestrator import GET_AGENT_CALLS, shape_problems  # noqa: E402

GET_AGENT_TARGET_MS = 50.0
STATUS_P99_TARGET_MS = 20.0


def make_tree(root: str, files: int, per_directory: int = 1000) -> None:
    """``files`` small files (100 bytes each) in directories of ``per_directory``."""
    payload = b"x" * 100
    for i in range(files):
        directory = os.path.join(root, f"db{i // per_directory:04d}")
        if i % per_directory == 0:
            os.makedirs(directory)
        with open(os.path.join(directory, f"t{i:06d}.ibd"), "wb") as fh:
            fh.write(payload)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


class Client:
    def __init__(self, reactor, base_url: str, token: str):
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 8
        self.http = HTTPClient(Agent(reactor, pool=self.pool))
        self.base_url = base_url
        self.token = token

    async def get(self, path: str) -> tuple[int, bytes]:
        response = await self.http.get(f"{self.base_url}{path}", params={"token": self.token})
        return response.code, await response.content()


async def get_agent_sequence(client: Client) -> float:
    """Seconds for the 9 GetAgent calls; every answer must be a 200 of the right shape."""
    started = time.perf_counter()
    for endpoint, shape in GET_AGENT_CALLS:
        code, body = await client.get(f"/api/{endpoint}")
        problems = shape_problems(json.loads(body), shape, endpoint) if code == 200 else [f"{endpoint}: HTTP {code} {body!r}"]
        if problems:
            raise SystemExit(f"bad answer: {problems}")
    return time.perf_counter() - started


async def status_under_du(reactor, client: Client, samples: int, interval: float) -> tuple[list[float], list[float]]:
    """Status latencies (s) sampled every ``interval`` while two du walks run back to back."""
    walks: list[float] = []
    stop = [False]

    async def walker():
        while not stop[0]:
            started = time.perf_counter()
            code, body = await client.get("/api/mysql-du")
            if code != 200:
                raise SystemExit(f"mysql-du failed: {body!r}")
            walks.append(time.perf_counter() - started)

    running = [defer.Deferred.fromCoroutine(walker()) for _ in range(2)]
    await task.deferLater(reactor, 0.5, lambda: None)
    latencies = []
    try:
        for _ in range(samples):
            started = time.perf_counter()
            code, body = await client.get("/api/status")
            latencies.append(time.perf_counter() - started)
            if code != 200:
                raise SystemExit(f"status answered {code} {body!r}")
            await task.deferLater(reactor, interval, lambda: None)
    finally:
        stop[0] = True
        await defer.DeferredList(running)
    return latencies, walks


async def main(reactor, args) -> None:
    workdir = tempfile.mkdtemp(prefix="orchagent-bench-")
    daemon = None
    client = None
    try:
        small = os.path.join(workdir, "datadir-small")
        large = os.path.join(workdir, "datadir-100k")
        os.makedirs(small)
        make_tree(small, 300, per_directory=100)
        started = time.perf_counter()
        os.makedirs(large)
        make_tree(large, args.files)
        print(f"made {args.files} files in {time.perf_counter() - started:.1f}s")
        datadir_file = os.path.join(workdir, "datadir-path")
        with open(datadir_file, "w") as fh:
            fh.write(small)
        error_log = os.path.join(workdir, "error.log")
        with open(error_log, "w") as fh:
            fh.writelines(f"2024-01-01 0:00:00 0 [Note] line {i}\n" for i in range(200))
        options_file = os.path.join(workdir, "my.cnf")
        with open(options_file, "w") as fh:
            fh.write(f"[mysqld]\nport=3306\nlog-error={error_log}\n")
        os.makedirs(os.path.join(workdir, "mnt"))
        os.makedirs(os.path.join(workdir, "snapshots"))
        daemon = Daemon(os.path.join(workdir, "agent"), {
            "MySQLDatadirCommand": f"cat {datadir_file}",
            "MySQLOptionsFile": options_file,
            "MySQLServiceStatusCommand": "true",
            "AvailableLocalSnapshotHostsCommand": "echo db2.dc1.example",
            "AvailableSnapshotHostsCommand": "printf 'db2.dc1.example\\ndb9.dc2.example\\n'",
            "SnapshotMountPoint": os.path.join(workdir, "mnt"),
            "SnapshotBackend": "copy",
            "SnapshotDirectory": os.path.join(workdir, "snapshots"),
        }, reactor=reactor)
        await daemon.start()
        client = Client(reactor, daemon.base_url, daemon.token)

        for _ in range(3):
            await get_agent_sequence(client)
        sequences = [await get_agent_sequence(client) for _ in range(args.sequences)]
        median_ms = statistics.median(sequences) * 1000
        print(f"(a) GetAgent, 9 calls, {len(sequences)} runs: median {median_ms:.1f} ms, "
              f"p90 {percentile(sequences, 90) * 1000:.1f} ms, max {max(sequences) * 1000:.1f} ms "
              f"(target median < {GET_AGENT_TARGET_MS:.0f} ms)")

        with open(datadir_file, "w") as fh:
            fh.write(large)
        latencies, walks = await status_under_du(reactor, client, args.samples, args.interval)
        p99_ms = percentile(latencies, 99) * 1000
        print(f"(b) /api/status during mysql-du of {args.files} files, {len(latencies)} samples: "
              f"p50 {percentile(latencies, 50) * 1000:.1f} ms, p99 {p99_ms:.1f} ms, "
              f"max {max(latencies) * 1000:.1f} ms (target p99 < {STATUS_P99_TARGET_MS:.0f} ms); "
              f"{len(walks)} du walks, median {statistics.median(walks):.2f} s each")
        ok = median_ms < GET_AGENT_TARGET_MS and p99_ms < STATUS_P99_TARGET_MS
        print("targets met" if ok else "TARGET MISSED")
        if not ok:
            raise SystemExit(1)
    finally:
        if client is not None:
            await client.pool.closeCachedConnections()
        if daemon is not None:
            await daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000, help="files in the big datadir")
    parser.add_argument("--sequences", type=int, default=50, help="GetAgent runs to time")
    parser.add_argument("--samples", type=int, default=500, help="status calls to time")
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between status calls")
    args = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, args)))


if __name__ == "__main__":
    run()
