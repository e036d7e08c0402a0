"""Load: 200 concurrent API clients for 60 s while seeds run at full speed.

``python bench/load.py [--clients 200] [--seconds 60] [--size-mib 256] [--json FILE]
[--engine process|inprocess] [--api-nice N] [--link-rate RATE]``

1. Starts two real agents (``twistd -n orchestrator-agent``) and seeds a ``--size-mib``
   datadir from one to the other with no load: the idle throughput.
2. Starts ``--clients`` keep-alive HTTP clients (a separate process, asyncio) that call
   ``/api/status`` on the receiving agent (and ``/api/seeds`` there, one call in ten) as
   fast as they are answered, for ``--seconds``; meanwhile seeds run back to back.
3. Reports errors, ``/api/status`` latency percentiles and the loaded throughput against
   the idle one.  Targets: zero errors, p99 < 50 ms, throughput within 10 %.

A seed's time runs from the send call to the sender's seed-status saying completed (the
sender completes once the receiver verified everything), polled every 5 ms on the
sender, which carries no load: the loaded receiver's API latency is not counted as seed
time.  The receiver's status is checked afterwards.

Where the CPU goes: each phase reports the cores (CPU seconds per wall second, from
``/proc/PID/stat``) of every process (each agent's API process and seed engine process,
the load generator) and of the whole machine (``/proc/stat``; ``other`` is the rest:
kernel threads doing our network and disk work, and other work on the machine, whose
busiest processes are listed), the API's and the load generator's CPU per request, and
from those the cores both targets need together.

Variants:

* ``--engine inprocess`` runs seeds in the agent's process (``SeedEngineProcess``
  false), as before the engine process existed.
* ``--api-nice N`` renices the agents' API processes (not their engines) by N.
* ``--link-rate 1gbit`` (root) puts each agent in a network namespace of its own, joined
  by a veth pair shaped with ``tc tbf`` to that rate, as hosts on a real network are: the
  seed is bound by the link, not the CPU.  The API clients reach the receiver over its
  own management link, which is not shaped.  Default: both agents on 127.0.0.1.

Bounded: the load stops after ``--seconds``; each seed has a time limit.  Everything
(agents, namespaces, files) is stopped and removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from mariadb_hosts import REPO, Cleanups

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- CPU accounting ---------------------------------------------------------------------------

def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of process ``pid`` so far; 0 once gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


_STAT_COLUMNS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def machine_times() -> dict[str, float]:
    """CPU seconds of the whole machine so far, by /proc/stat column."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:9]]
    return {name: value / CLK_TCK for name, value in zip(_STAT_COLUMNS, values)}


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far."""
    times = machine_times()
    total = sum(times.values())
    return total - times["idle"] - times["iowait"], total


def all_processes_cpu() -> dict[int, tuple[str, float]]:
    """{pid: (name, CPU seconds)} of every process now, kernel threads included."""
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    stat = fh.read()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            found[int(name)] = (comm, (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return found


class CpuMeter:
    """Cores each named process used between :meth:`start` and :meth:`stop`; of the rest,
    the busiest other processes by name (kernel threads such as ksoftirqd and kworker do
    the network and disk work of our own traffic; anything else is someone else's)."""

    def __init__(self, pids: dict[str, int]):
        self.pids = {name: pid for name, pid in pids.items() if pid}

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.cpu0 = {name: process_cpu(pid) for name, pid in self.pids.items()}
        self.machine0 = machine_cpu()
        self.times0 = machine_times()
        self.all0 = all_processes_cpu()

    def stop(self) -> dict:
        wall = time.monotonic() - self.t0
        used = {name: process_cpu(pid) - self.cpu0[name] for name, pid in self.pids.items()}
        busy = machine_cpu()[0] - self.machine0[0]
        others: dict[str, float] = {}
        ours = set(self.pids.values())
        for pid, (comm, seconds) in all_processes_cpu().items():
            if pid not in ours:
                comm = "this benchmark" if pid == os.getpid() else comm.split("/")[0]  # ksoftirqd/1...
                others[comm] = others.get(comm, 0.0) + seconds - self.all0.get(pid, (comm, 0.0))[1]
        cores = {name: round(seconds / wall, 3) for name, seconds in used.items()}
        cores["ours"] = round(sum(used.values()) / wall, 3)
        cores["machine_busy"] = round(busy / wall, 3)
        cores["other"] = round((busy - sum(used.values())) / wall, 3)
        busiest = sorted(others.items(), key=lambda item: -item[1])[:6]
        times = machine_times()
        return {"wall_s": round(wall, 2), "cores": cores,
                "machine_cores_by_kind": {name: round((times[name] - self.times0[name]) / wall, 3)
                                          for name in _STAT_COLUMNS if name not in ("idle", "iowait")},
                "cpu_seconds": {name: round(s, 2) for name, s in used.items()},
                "other_busiest_cores": {name: round(s / wall, 3) for name, s in busiest if s > 0}}


# --- network namespaces (--link-rate) ----------------------------------------------------------

def shaped_pair(cleanups: Cleanups, rate: str):
    """Two namespaces joined by a veth pair, A's end shaped to ``rate`` (tbf)."""
    from tests.support.netns import create_pair

    pair = create_pair(cleanups)
    dev = f"oa{pair.a.name[2:-1]}ab"  # create_pair's name of A's end of the A-B link
    subprocess.run(["tc", "-n", pair.a.name, "qdisc", "add", "dev", dev, "root", "tbf",
                    "rate", rate, "burst", "1mb", "latency", "50ms"], check=True)
    return pair


# --- the agents --------------------------------------------------------------------------------

class Agent:
    def __init__(self, base: str, name: str, config: dict, prefix=(), address="127.0.0.1"):
        self.dir = os.path.join(base, name)
        os.makedirs(self.dir)
        self.address = address
        self.port = free_port()
        config = dict(config, HTTPPort=self.port, HTTPBindAddress=address,
                      TokenHintFile=os.path.join(self.dir, "token"), StateDir=os.path.join(self.dir, "state"))
        path = os.path.join(self.dir, "agent.json")
        with open(path, "w") as fh:
            json.dump(config, fh)
        log = open(os.path.join(self.dir, "daemon.log"), "wb")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
             "--pidfile=", "orchestrator-agent", "--config", path], cwd=self.dir, stdout=log,
            stderr=log, env=dict(os.environ, PYTHONPATH=REPO))
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://{address}:{self.port}/api/hostname", timeout=1).read()
                break
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"agent {name} did not start")
                time.sleep(0.1)
        with open(os.path.join(self.dir, "token")) as fh:
            self.token = fh.read().strip()

    def engine_pid(self) -> int | None:
        """The seed engine process (the agent's child named orchagent-seed), if any."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for name in os.listdir("/proc"):
                if not name.isdigit():
                    continue
                try:
                    with open(f"/proc/{name}/stat") as fh:
                        stat = fh.read()
                except OSError:
                    continue
                comm = stat[stat.index("(") + 1:stat.rindex(")")]
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid == self.proc.pid and comm == "orchagent-seed":
                    return int(name)
            time.sleep(0.1)
        return None

    def get(self, path: str, **params):
        from urllib.parse import urlencode

        params["token"] = self.token
        url = f"http://{self.address}:{self.port}{path}?{urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def seed_once(sender: Agent, receiver: Agent, dst: str, target: str, seed_id: str) -> float:
    """One full seed; returns bytes per second (see the module docstring)."""
    for name in os.listdir(dst):
        path = os.path.join(dst, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    for name in os.listdir(os.path.dirname(dst)):
        if "orchagent-previous" in name:
            shutil.rmtree(os.path.join(os.path.dirname(dst), name))
    assert receiver.get(f"/api/receive-mysql-seed-data/{seed_id}", key="bench") == (200, True)
    started = time.monotonic()
    code, body = sender.get(f"/api/send-mysql-seed-data/{target}/{seed_id}", key="bench",
                            source="datadir")
    assert code == 200, body
    while True:
        code, status = sender.get(f"/api/seed-status/{seed_id}")
        if status["State"] in ("completed", "failed", "aborted"):
            break
        if time.monotonic() - started > 300:
            raise RuntimeError("seed took more than 300 s")
        time.sleep(0.005)
    seconds = time.monotonic() - started
    if status["State"] != "completed":
        raise RuntimeError(f"seed {seed_id} {status['State']}: {status['Error']}")
    deadline = time.monotonic() + 30
    while True:
        code, received = receiver.get(f"/api/seed-status/{seed_id}")
        if received["State"] == "completed":
            break
        if received["State"] in ("failed", "aborted") or time.monotonic() > deadline:
            raise RuntimeError(f"receiver of seed {seed_id} {received['State']}: {received['Error']}")
        time.sleep(0.01)
    return status["BytesTotal"] / seconds


# --- the load generator (its own process) -------------------------------------------------

async def _client(address: str, port: int, token: str, stop_at: float, out: dict) -> None:
    reader, writer = await asyncio.open_connection(address, port)
    n = 0
    try:
        while time.monotonic() < stop_at:
            n += 1
            if n % 10 == 0:
                path, target = f"/api/seeds?token={token}", None
            else:
                path, target = "/api/status", "status"
            started = time.monotonic()
            writer.write(f"GET {path} HTTP/1.1\r\nHost: agent\r\n\r\n".encode())
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            code = int(head.split(b" ", 2)[1])
            if b"chunked" in head.lower():
                body = b""
                while True:
                    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                    body += await reader.readexactly(size + 2)
                    if size == 0:
                        break
            else:
                length = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
                await reader.readexactly(length)
            elapsed = time.monotonic() - started
            if code != 200:
                out["errors"] += 1
            if target:
                out["status"].append(elapsed)
            out["requests"] += 1
    except Exception as e:
        out["errors"] += 1
        out["exceptions"].append(repr(e)[:200])
    finally:
        writer.close()


async def _load(address: str, port: int, token: str, clients: int, seconds: float) -> dict:
    out = {"errors": 0, "requests": 0, "status": [], "exceptions": []}
    stop_at = time.monotonic() + seconds
    await asyncio.gather(*(_client(address, port, token, stop_at, out) for _ in range(clients)))
    lat = sorted(out["status"])

    def pct(p):
        return round(lat[min(len(lat) - 1, int(len(lat) * p))] * 1000, 2) if lat else None

    return {"requests": out["requests"], "errors": out["errors"], "exceptions": out["exceptions"][:5],
            "status_p50_ms": pct(0.50), "status_p99_ms": pct(0.99), "status_max_ms": pct(1.0),
            "rps": round(out["requests"] / seconds, 1)}


def _feasibility(result: dict, idle_cpu: dict, load_cpu: dict, clients: int) -> dict:
    """The cores both targets need at once: the seeds as fast as idle, and the API fast
    enough for a p99 under 50 ms.  With a fixed number of closed-loop clients every latency
    scales as 1 / requests per second (Little's law: mean latency = clients / rps), so the
    rate that brings the measured p99 to 50 ms is rps * p99 / 50; the API and the load
    generator need their measured CPU per request at that rate.  The seeds' cores are
    their engines' in the idle phase (both agents' with ``--engine inprocess``)."""
    requests = max(result["requests"], 1)
    api_us = load_cpu["cpu_seconds"].get("receiver_api", 0) / requests * 1e6
    gen_us = load_cpu["cpu_seconds"].get("load_generator", 0) / requests * 1e6
    p99 = result["status_p99_ms"] or 0.0
    rps_needed = result["rps"] * p99 / 50.0
    cores = idle_cpu["cores"]
    engines = [cores[name] for name in ("sender_engine", "receiver_engine") if name in cores]
    seed_cores = round(sum(engines), 3) if engines else cores["ours"]
    api_cores = (api_us + gen_us) * rps_needed / 1e6
    return {"receiver_api_cpu_us_per_request": round(api_us, 1),
            "load_generator_cpu_us_per_request": round(gen_us, 1),
            "rps_for_mean_latency_50ms": round(clients / 0.050),
            "rps_for_p99_50ms": round(rps_needed),
            "api_and_load_cores_at_that_rps": round(api_cores, 2),
            "idle_seed_cores": seed_cores,
            "cores_needed_for_both_targets": round(seed_cores + api_cores, 2),
            "cores_available": os.cpu_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--json", default=None)
    parser.add_argument("--engine", choices=("process", "inprocess"), default="process",
                        help="where seeds run (SeedEngineProcess true/false); default process")
    parser.add_argument("--api-nice", type=int, default=0,
                        help="renice the agents' API processes (not their engines) by this")
    parser.add_argument("--load-nice", type=int, default=0,
                        help="renice the load generator by this (it stands for clients on "
                             "other machines, which use none of this host's CPU)")
    parser.add_argument("--link-rate", default=None,
                        help="agents in two network namespaces, the seed link shaped to this "
                             "rate (tc tbf, e.g. 1gbit); default: both on 127.0.0.1")
    parser.add_argument("--load-only", nargs=4, metavar=("ADDRESS", "PORT", "TOKEN", "OTHER"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_only:
        address, port, token, _ = args.load_only
        print(json.dumps(asyncio.run(_load(address, int(port), token, args.clients, args.seconds))))
        return
    base = tempfile.mkdtemp(prefix="orchagent-load-")
    agents = []
    cleanups = Cleanups()
    try:
        src, dst = os.path.join(base, "src"), os.path.join(base, "dst", "mysql")
        os.makedirs(src)
        os.makedirs(dst)
        with open(os.path.join(src, "ibdata1"), "wb") as fh:
            for _ in range(args.size_mib):
                fh.write(os.urandom(1 << 20))
        seed_port = free_port()
        common = {"MySQLServiceStatusCommand": "false", "SeedTransferPort": seed_port,
                  "SeedEngineProcess": args.engine == "process"}
        if args.link_rate:
            pair = shaped_pair(cleanups, args.link_rate)
            where = {"sender": (pair.a.prefix, pair.a.address), "receiver": (pair.b.prefix, pair.b.address)}
        else:
            where = {"sender": ((), "127.0.0.1"), "receiver": ((), "127.0.0.1")}
        sender = Agent(base, "sender", dict(common, MySQLDatadirCommand=f"echo {src}"), *where["sender"])
        agents.append(sender)
        receiver = Agent(base, "receiver", dict(common, MySQLDatadirCommand=f"echo {dst}"), *where["receiver"])
        agents.append(receiver)
        for agent in agents:
            if args.api_nice:
                os.setpriority(os.PRIO_PROCESS, agent.proc.pid, args.api_nice)
        pids = {"sender_api": sender.proc.pid, "receiver_api": receiver.proc.pid}
        if args.engine == "process":
            pids.update(sender_engine=sender.engine_pid(), receiver_engine=receiver.engine_pid())
        target = f"{receiver.address}:{seed_port}"
        seed_once(sender, receiver, dst, target, "warm")
        meter = CpuMeter(pids)
        meter.start()
        idle = [seed_once(sender, receiver, dst, target, f"idle{i}") for i in range(2)]
        idle_cpu = meter.stop()
        load = subprocess.Popen([sys.executable, __file__, "--clients", str(args.clients), "--seconds",
                                 str(args.seconds), "--load-only", receiver.address, str(receiver.port),
                                 receiver.token, str(sender.port)], stdout=subprocess.PIPE, text=True)
        if args.load_nice:
            os.setpriority(os.PRIO_PROCESS, load.pid, args.load_nice)
        meter = CpuMeter(dict(pids, load_generator=load.pid))
        time.sleep(2)
        meter.start()
        loaded = []
        started = time.monotonic()
        while time.monotonic() - started < args.seconds - 4 and load.poll() is None:
            loaded.append(seed_once(sender, receiver, dst, target, f"load{len(loaded)}"))
        load_cpu = meter.stop()
        out, _ = load.communicate(timeout=args.seconds + 60)
        result = json.loads(out)
        idle_rate = max(idle)
        loaded_rate = sum(loaded) / len(loaded) if loaded else 0.0
        result.update({
            "clients": args.clients, "seconds": args.seconds, "size_mib": args.size_mib,
            "engine": args.engine, "api_nice": args.api_nice, "load_nice": args.load_nice, "link_rate": args.link_rate or "loopback",
            "idle_mib_s": round(idle_rate / (1 << 20), 1), "loaded_mib_s": round(loaded_rate / (1 << 20), 1),
            "seeds_under_load": len(loaded),
            "throughput_ratio": round(loaded_rate / idle_rate, 3) if idle_rate else None,
            "cpu_idle_seeds": idle_cpu, "cpu_under_load": load_cpu,
        })
        result["feasibility"] = _feasibility(result, idle_cpu, load_cpu, args.clients)
        result["targets_met"] = {
            "zero_errors": result["errors"] == 0,
            "status_p99_under_50ms": result["status_p99_ms"] is not None and result["status_p99_ms"] < 50,
            "throughput_within_10pct": result["throughput_ratio"] is not None and result["throughput_ratio"] >= 0.9,
        }
        print(json.dumps(result, indent=2))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=2)
    finally:
        for agent in agents:
            agent.stop()
        cleanups.run()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
