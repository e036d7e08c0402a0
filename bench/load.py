"""Load: 200 concurrent API clients for 60 s while seeds run at full speed (loopback only).

``python bench/load.py [--clients 200] [--seconds 60] [--size-mib 256] [--json FILE]``

1. Starts two real agents (``twistd -n orchestrator-agent``) on 127.0.0.1 and seeds a
   ``--size-mib`` datadir from one to the other with no load: the idle throughput.
2. Starts ``--clients`` keep-alive HTTP clients (a separate process, asyncio) that call
   ``/api/status`` on the receiving agent (and ``/api/seed-status`` on both, one call in
   ten) as fast as they are answered, for ``--seconds``; meanwhile seeds run back to back.
3. Reports errors, ``/api/status`` latency percentiles and the loaded throughput against
   the idle one.  Targets: zero errors, p99 < 50 ms, throughput within 10 %.

Bounded: the load stops after ``--seconds``; each seed has a time limit.  Everything is
stopped and removed at the end.
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
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agent:
    def __init__(self, base: str, name: str, config: dict):
        self.dir = os.path.join(base, name)
        os.makedirs(self.dir)
        self.port = free_port()
        config = dict(config, HTTPPort=self.port, HTTPBindAddress="127.0.0.1",
                      TokenHintFile=os.path.join(self.dir, "token"), StateDir=os.path.join(self.dir, "state"))
        path = os.path.join(self.dir, "agent.json")
        with open(path, "w") as fh:
            json.dump(config, fh)
        log = open(os.path.join(self.dir, "daemon.log"), "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
             "orchestrator-agent", "--config", path], cwd=self.dir, stdout=log, stderr=log,
            env=dict(os.environ, PYTHONPATH=REPO))
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/hostname", timeout=1).read()
                break
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"agent {name} did not start")
                time.sleep(0.1)
        with open(os.path.join(self.dir, "token")) as fh:
            self.token = fh.read().strip()

    def get(self, path: str, **params):
        from urllib.parse import urlencode

        params["token"] = self.token
        url = f"http://127.0.0.1:{self.port}{path}?{urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def seed_once(sender: Agent, receiver: Agent, dst: str, seed_port: int, seed_id: str) -> float:
    """One full seed; returns bytes per second (receiver's view, wall clock)."""
    for name in os.listdir(dst):
        path = os.path.join(dst, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    for name in os.listdir(os.path.dirname(dst)):
        if "orchagent-previous" in name:
            shutil.rmtree(os.path.join(os.path.dirname(dst), name))
    assert receiver.get(f"/api/receive-mysql-seed-data/{seed_id}", key="bench") == (200, True)
    started = time.monotonic()
    code, body = sender.get(f"/api/send-mysql-seed-data/127.0.0.1:{seed_port}/{seed_id}",
                            key="bench", source="datadir")
    assert code == 200, body
    while True:
        code, status = receiver.get(f"/api/seed-status/{seed_id}")
        if status["State"] in ("completed", "failed", "aborted"):
            break
        if time.monotonic() - started > 300:
            raise RuntimeError("seed took more than 300 s")
        time.sleep(0.05)
    seconds = time.monotonic() - started
    if status["State"] != "completed":
        raise RuntimeError(f"seed {seed_id} {status['State']}: {status['Error']}")
    return status["BytesTotal"] / seconds


# --- the load generator (its own process) -------------------------------------------------

async def _client(port: int, token: str, other_port: int, stop_at: float, out: dict) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
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


async def _load(port: int, token: str, other_port: int, clients: int, seconds: float) -> dict:
    out = {"errors": 0, "requests": 0, "status": [], "exceptions": []}
    stop_at = time.monotonic() + seconds
    await asyncio.gather(*(_client(port, token, other_port, stop_at, out) for _ in range(clients)))
    lat = sorted(out["status"])

    def pct(p):
        return round(lat[min(len(lat) - 1, int(len(lat) * p))] * 1000, 2) if lat else None

    return {"requests": out["requests"], "errors": out["errors"], "exceptions": out["exceptions"][:5],
            "status_p50_ms": pct(0.50), "status_p99_ms": pct(0.99), "status_max_ms": pct(1.0),
            "rps": round(out["requests"] / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--json", default=None)
    parser.add_argument("--load-only", nargs=3, metavar=("PORT", "TOKEN", "OTHER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_only:
        port, token, other = args.load_only
        print(json.dumps(asyncio.run(_load(int(port), token, int(other), args.clients, args.seconds))))
        return
    base = tempfile.mkdtemp(prefix="orchagent-load-")
    agents = []
    try:
        src, dst = os.path.join(base, "src"), os.path.join(base, "dst", "mysql")
        os.makedirs(src)
        os.makedirs(dst)
        with open(os.path.join(src, "ibdata1"), "wb") as fh:
            for _ in range(args.size_mib):
                fh.write(os.urandom(1 << 20))
        seed_port = free_port()
        common = {"MySQLServiceStatusCommand": "false", "SeedTransferPort": seed_port}
        sender = Agent(base, "sender", dict(common, MySQLDatadirCommand=f"echo {src}"))
        agents.append(sender)
        receiver = Agent(base, "receiver", dict(common, MySQLDatadirCommand=f"echo {dst}"))
        agents.append(receiver)
        seed_once(sender, receiver, dst, seed_port, "warm")
        idle = [seed_once(sender, receiver, dst, seed_port, f"idle{i}") for i in range(2)]
        load = subprocess.Popen([sys.executable, __file__, "--clients", str(args.clients), "--seconds",
                                 str(args.seconds), "--load-only", str(receiver.port), receiver.token,
                                 str(sender.port)], stdout=subprocess.PIPE, text=True)
        time.sleep(2)
        loaded = []
        started = time.monotonic()
        while time.monotonic() - started < args.seconds - 2 and load.poll() is None:
            loaded.append(seed_once(sender, receiver, dst, seed_port, f"load{len(loaded)}"))
        out, _ = load.communicate(timeout=args.seconds + 60)
        result = json.loads(out)
        idle_rate = max(idle)
        loaded_rate = sum(loaded) / len(loaded) if loaded else 0.0
        result.update({
            "clients": args.clients, "seconds": args.seconds, "size_mib": args.size_mib,
            "idle_mib_s": round(idle_rate / (1 << 20), 1), "loaded_mib_s": round(loaded_rate / (1 << 20), 1),
            "seeds_under_load": len(loaded),
            "throughput_ratio": round(loaded_rate / idle_rate, 3) if idle_rate else None,
        })
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
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
