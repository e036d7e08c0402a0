"""The fault matrix: two real agents in two network namespaces seed real data while faults hit.

One :class:`World` holds a source host (namespace A: agent, a datadir-like tree, a copy
snapshot of it mounted by the agent on its SnapshotMountPoint) and a target host
(namespace B: agent, a datadir on its own small ext4 loop file system with old data in
it).  Each case resets the target, drives a seed through the v1 API as orchestrator does
(mountlv, receive, send, poll, umount), injects its fault at a random moment, and then
checks the invariant:

* the target holds a tree identical to the snapshot, and its old data was kept aside; or
* the seed failed or was aborted with an error message, the datadir is exactly as it was
  and the staging is gone;
* and nothing leaked: agents' open file descriptors, listening ports in the namespaces,
  mounts, loop devices, child processes.

Blocking helpers (``subprocess``) are set-up and checks between seeds; the agents are
separate processes, so they never wait on them.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import attrs
from twisted.internet import defer, reactor, task

from tests.support import netns
from tests.support.daemon import REPO_ROOT, Daemon

KEY = "matrix-seed-key"
RATE = 16 << 20
TIMEOUT = 90.0


class Cleanups:
    """What tests.support expects of a test case: addCleanup, run last-in first-out."""

    def __init__(self):
        self.calls: list = []

    def addCleanup(self, fn, *args, **kwargs):
        self.calls.append((fn, args, kwargs))

    async def run(self):
        while self.calls:
            fn, args, kwargs = self.calls.pop()
            try:
                result = fn(*args, **kwargs)
                if isinstance(result, defer.Deferred) or hasattr(result, "__await__"):
                    await result
            except Exception as e:  # cleanup goes on whatever one step did
                print(f"cleanup step failed: {e}", file=sys.stderr)


def sh(*argv: str, check: bool = True) -> str:
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and result.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")
    return result.stdout


def manifest(top: str, skip=("lost+found",)) -> dict[str, tuple]:
    out = {}
    for d, dirs, files in os.walk(top):
        rel_d = os.path.relpath(d, top)
        if rel_d == "." :
            dirs[:] = [x for x in dirs if x not in skip and not x.startswith(".")]
            files = [x for x in files if not x.startswith(".")]
        for name in dirs:
            p = os.path.join(d, name)
            out[os.path.relpath(p, top)] = ("d", os.lstat(p).st_mode)
        for name in files:
            p = os.path.join(d, name)
            st = os.lstat(p)
            if os.path.islink(p):
                out[os.path.relpath(p, top)] = ("l", os.readlink(p))
                continue
            h = hashlib.blake2b()
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            out[os.path.relpath(p, top)] = ("f", st.st_mode, st.st_size, st.st_mtime_ns, h.hexdigest())
    return out


def make_source_tree(root: str, rnd: random.Random, big_mib: int) -> None:
    os.makedirs(os.path.join(root, "db", "sub"))
    with open(os.path.join(root, "ibdata1"), "wb") as fh:
        fh.write(os.urandom(big_mib << 20))
    for i in range(60):
        size = rnd.choice([0, 1, 4096, 65537, rnd.randrange(300_000)])
        with open(os.path.join(root, "db" if i % 2 else "db/sub", f"t{i}.ibd"), "wb") as fh:
            fh.write(os.urandom(size // 2) + bytes(size - size // 2))
    with open(os.path.join(root, "db", "sparse.ibd"), "wb") as fh:
        fh.truncate(8 << 20)
        fh.seek(3 << 20)
        fh.write(os.urandom(100_000))
    os.symlink("db/sub", os.path.join(root, "link"))


@attrs.define
class Outcome:
    case: str
    run: int
    fault_at: float
    verdict: str  # "verified" | "failed-clean" | "BROKEN"
    detail: str = ""
    seconds: float = 0.0
    faults: int = 1


class World:
    def __init__(self, base: str, rnd: random.Random, big_mib: int = 40):
        self.base = base
        self.rnd = rnd
        self.big_mib = big_mib
        self.cleanups = Cleanups()
        self.seq = 0
        self.extra_procs: list = []

    # --- set-up ----------------------------------------------------------------------------

    async def start(self) -> None:
        self.pair = netns.create_pair(self.cleanups)
        self.a, self.b = self.pair.a, self.pair.b
        self.seed_port = 21234
        token_file = os.path.join(self.base, "token")
        with open(token_file, "w") as fh:
            fh.write(os.urandom(24).hex())
        os.chmod(token_file, 0o600)
        # Source: datadir tree, a copy snapshot of it, a mount point.
        src = os.path.join(self.base, "src")
        self.src_datadir = os.path.join(src, "mysql")
        self.snapdir = os.path.join(src, "snapshots")
        self.mount_point = os.path.join(src, "mnt")
        os.makedirs(self.src_datadir)
        os.makedirs(self.snapdir)
        os.makedirs(self.mount_point)
        make_source_tree(self.src_datadir, self.rnd, self.big_mib)
        self.snapshot = os.path.join(self.snapdir, "snap1")
        sh("cp", "-a", self.src_datadir, self.snapshot)
        self.expected = manifest(self.snapshot)
        # Target: an ext4 loop file system holding the datadir.
        dst = os.path.join(self.base, "dst")
        os.makedirs(dst)
        image = os.path.join(dst, "fs.img")
        with open(image, "wb") as fh:
            fh.truncate((self.big_mib * 2 + 96) << 20)
        sh("mkfs.ext4", "-q", "-F", image)
        self.loop = sh("losetup", "--find", "--show", image).strip()
        self.cleanups.addCleanup(sh, "losetup", "-d", self.loop, check=False)
        self.fs = os.path.join(dst, "fs")
        os.makedirs(self.fs)
        sh("mount", self.loop, self.fs)
        self.cleanups.addCleanup(sh, "umount", "-l", self.fs, check=False)
        self.dst_datadir = os.path.join(self.fs, "mysql")
        os.makedirs(self.dst_datadir)
        common = {"TokenFile": token_file, "SeedTransferPort": self.seed_port,
                  "MySQLServiceStatusCommand": "false", "CommandTimeoutSeconds": 30}
        self.src_config = dict(common, AgentHostname=self.a.address, HTTPBindAddress=self.a.address,
                               MySQLDatadirCommand=f"echo {self.src_datadir}", SnapshotBackend="copy",
                               SnapshotDirectory=self.snapdir, SnapshotMountPoint=self.mount_point,
                               SnapshotVolumesFilter="snap", SeedRateLimitBytesPerSec=RATE,
                               SeedCompression="none")
        self.dst_config = dict(common, AgentHostname=self.b.address, HTTPBindAddress=self.b.address,
                               MySQLDatadirCommand=f"echo {self.dst_datadir}")
        self.sender = await self._start(self.a, self.src_config, "sender")
        self.receiver = await self._start(self.b, self.dst_config, "receiver")
        # Warm-up seed: lazily opened files and threads exist from here on.
        self.reset_target()
        outcome = await self.run_case("warmup", 0, lambda w, sid: _no_fault(w, sid))
        if outcome.verdict != "verified":
            raise RuntimeError(f"the warm-up seed did not verify: {outcome.detail}")
        self.baseline = self.resources()

    async def _start(self, ns, config, name, port=None) -> Daemon:
        config = dict(config)
        if port:
            config["HTTPPort"] = port
        daemon = Daemon(os.path.join(self.base, name), config, prefix=ns.prefix, address=ns.address)
        await daemon.start()
        self.cleanups.addCleanup(lambda: defer.Deferred.fromCoroutine(daemon.stop()))
        return daemon

    async def restart(self, which: str, sig: str) -> None:
        daemon = getattr(self, which)
        daemon._transport.signalProcess(sig)
        await daemon.wait_exit()
        ns, config = (self.a, self.src_config) if which == "sender" else (self.b, self.dst_config)
        setattr(self, which, await self._start(ns, config, which, port=daemon.port))

    async def stop(self) -> None:
        for proc in self.extra_procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        await self.cleanups.run()

    # --- API -------------------------------------------------------------------------------

    async def api(self, daemon: Daemon, path: str, **params) -> tuple[int, Any]:
        return await daemon.get(path, **params)

    async def status(self, daemon: Daemon, seed: str) -> dict | None:
        try:
            code, body = await daemon.get(f"/api/seed-status/{seed}")
        except Exception:
            return None
        return body if code == 200 else None

    # --- state -----------------------------------------------------------------------------

    def reset_target(self) -> None:
        for name in os.listdir(self.fs):
            if name in ("lost+found", "mysql"):
                continue
            path = os.path.join(self.fs, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
        for name in os.listdir(self.dst_datadir):
            path = os.path.join(self.dst_datadir, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
        os.makedirs(os.path.join(self.dst_datadir, "olddb"))
        with open(os.path.join(self.dst_datadir, "olddb", "keep.ibd"), "wb") as fh:
            fh.write(b"the target's own data " * 1000)
        with open(os.path.join(self.dst_datadir, "ibdata1"), "wb") as fh:
            fh.write(b"old ibdata")
        if not os.path.isdir(self.snapshot):
            sh("cp", "-a", self.src_datadir, self.snapshot)

    def resources(self) -> dict:
        def fds(daemon):
            return len(os.listdir(f"/proc/{daemon._transport.pid}/fd"))

        def children(daemon):
            # By name: an agent's seed engine process is a child whose pid changes on restart.
            return sorted(sh("ps", "-o", "comm=", "--ppid", str(daemon._transport.pid), check=False).split("\n"))

        def listening(ns):
            return sorted(line.split()[3] for line in sh("ip", "netns", "exec", ns.name, "ss", "-ltnH").splitlines())

        mounts = sorted(line.split()[1] for line in open("/proc/mounts") if self.base in line.split()[1])
        loops = sorted(line for line in sh("losetup", "-a").splitlines() if self.base in line)
        return {"sender_fds": fds(self.sender), "receiver_fds": fds(self.receiver),
                "sender_children": [c for c in children(self.sender) if c.strip()],
                "receiver_children": [c for c in children(self.receiver) if c.strip()],
                "listen_a": listening(self.a), "listen_b": listening(self.b),
                "mounts": mounts, "loops": loops}

    def leaks(self) -> list[str]:
        now = self.resources()
        problems = []
        for key, before in self.baseline.items():
            after = now[key]
            if key.endswith("_fds"):
                if after > before:
                    problems.append(f"{key}: {before} -> {after}")
            elif key.startswith("listen"):
                # The agent's HTTP port is stable across restarts; the seed port must be closed.
                if any(p.endswith(f":{self.seed_port}") for p in after):
                    problems.append(f"{key}: seed port still listening: {after}")
            elif after != before:
                problems.append(f"{key}: {before} -> {after}")
        return problems

    async def settled_leaks(self) -> list[str]:
        """Leaks still there once closing streams had their LINGER (10 s) to end."""
        for _ in range(30):
            problems = self.leaks()
            if not problems:
                return []
            await task.deferLater(reactor, 0.5, lambda: None)
        return problems

    # --- one case --------------------------------------------------------------------------

    async def run_case(self, name: str, run: int, fault: Callable) -> Outcome:
        self.seq += 1
        seed = f"m{self.seq}"
        started = time.monotonic()
        self.reset_target()
        before = manifest(self.dst_datadir)
        before_old = manifest(os.path.join(self.dst_datadir, "olddb"))
        code, body = await self.api(self.sender, "/api/mountlv", lv="snap1")
        if code != 200:
            return Outcome(name, run, 0, "BROKEN", f"mountlv: {body}")
        code, body = await self.api(self.receiver, f"/api/receive-mysql-seed-data/{seed}", key=KEY)
        if code != 200:
            return Outcome(name, run, 0, "BROKEN", f"receive: {body}")
        target = f"{self.b.address}:{self.seed_port}"
        context = {"seed": seed, "target": target, "notes": []}
        fault_at = await fault(self, context)
        record = await self.settle(context)
        await self.api(self.sender, "/api/umount")
        detail, verdict = "", "BROKEN"
        rstate = (record.get("receiver") or {}).get("State")
        rerror = (record.get("receiver") or {}).get("Error", "")
        staging = [n for n in os.listdir(self.fs) + os.listdir(self.dst_datadir) if "orchagent-seed" in n]
        if rstate == "completed":
            got = manifest(self.dst_datadir)
            aside = [n for n in os.listdir(self.fs) if "orchagent-previous" in n]
            kept = manifest(os.path.join(self.fs, aside[0], "olddb")) if aside else {}
            if got != self.expected:
                diff = sorted(set(got.items()) ^ set(self.expected.items()))[:3]
                detail = f"target differs from the snapshot: {diff}"
            elif kept != before_old:
                detail = "the target's old data was not kept aside"
            elif staging:
                detail = f"staging left: {staging}"
            else:
                verdict = "verified"
        elif rstate in ("failed", "aborted"):
            if not rerror:
                detail = "failed without an error message"
            elif manifest(self.dst_datadir) != before:
                detail = "the datadir changed although the seed failed"
            elif staging:
                detail = f"staging left: {staging}"
            else:
                verdict, detail = "failed-clean", rerror
        else:
            detail = f"no final state after {TIMEOUT:.0f}s: {record}"
        leaks = await self.settled_leaks() if hasattr(self, "baseline") else []
        if leaks:
            verdict, detail = "BROKEN", f"leaked: {leaks}; {detail}"
        if context["notes"]:
            detail = f"{detail} [{'; '.join(context['notes'])}]"
        return Outcome(name, run, fault_at, verdict, detail, time.monotonic() - started,
                       context.get("faults", 1))

    async def settle(self, context) -> dict:
        """Poll both sides until terminal; act as the controller would on a one-sided end."""
        seed = context["seed"]
        deadline = reactor.seconds() + TIMEOUT
        aborted = False
        while reactor.seconds() < deadline:
            s = await self.status(self.sender, seed) or {}
            r = await self.status(self.receiver, seed) or {}
            s_end = s.get("State") in ("completed", "failed", "aborted")
            r_end = r.get("State") in ("completed", "failed", "aborted")
            if r_end and (s_end or r.get("State") != "completed" or s == {}):
                # Let the receiver's job settle (staging removal) before checking.
                await self._jobs_gone(seed)
                return {"sender": s, "receiver": r}
            if s_end and s.get("State") != "completed" and not aborted and not r_end:
                # orchestrator aborts both sides once one side failed.
                await self.api(self.receiver, f"/api/abort-seed/{seed}")
                aborted = True
            await task.deferLater(reactor, 0.2, lambda: None)
        await self.api(self.receiver, f"/api/abort-seed/{seed}")
        await self.api(self.sender, f"/api/abort-seed/{seed}")
        await self._jobs_gone(seed)
        return {"sender": await self.status(self.sender, seed),
                "receiver": await self.status(self.receiver, seed), "timeout": True}

    async def _jobs_gone(self, seed) -> None:
        for _ in range(100):
            code, seeds = await self.api(self.receiver, "/api/seeds")
            code2, seeds2 = await self.api(self.sender, "/api/seeds")
            running = [x for x in (seeds or []) + (seeds2 or [])
                       if isinstance(x, dict) and x.get("State") in ("pending", "running")]
            if not running and not any(p.endswith(f":{self.seed_port}") for p in self.resources()["listen_b"]):
                return
            await task.deferLater(reactor, 0.1, lambda: None)


# --- faults ----------------------------------------------------------------------------------

async def _send(world: World, context) -> None:
    code, body = await world.api(world.sender, f"/api/send-mysql-seed-data/{context['target']}/{context['seed']}",
                                 key=KEY, source="snapshot")
    if code != 200:
        context["notes"].append(f"send: {body}")


async def _pause(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


def _when(world: World) -> float:
    """A random moment inside the transfer (about 2.5 s at the matrix's rate)."""
    return round(world.rnd.uniform(0.05, (world.big_mib << 20) / RATE * 0.9), 3)


async def _no_fault(world: World, context) -> float:
    await _send(world, context)
    return 0.0


def _kill(which: str, sig: str):
    async def fault(world: World, context) -> float:
        at = _when(world)
        await _send(world, context)
        await _pause(at)
        await world.restart(which, sig)
        if which == "sender":
            await _send(world, context)  # the controller's resume: send the same seed again
        return at
    return fault


async def _link_down(world: World, context) -> float:
    at = _when(world)
    dev = _dev(world.a)
    await _send(world, context)
    await _pause(at)
    sh("ip", "-n", world.a.name, "link", "set", dev, "down")
    try:
        await _pause(10)
    finally:
        sh("ip", "-n", world.a.name, "link", "set", dev, "up")
    return at


async def _lossy(world: World, context) -> float:
    """Tail-drop loss on the A-B link (tbf with a tiny queue; netem is not in this kernel)."""
    dev = _dev(world.a)
    rate = world.rnd.choice(["30mbit", "60mbit", "100mbit"])
    sh("ip", "netns", "exec", world.a.name, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
       "rate", rate, "burst", "6kb", "limit", "12kb")
    context["notes"].append(f"tbf {rate}")
    try:
        await _send(world, context)
        for _ in range(int(TIMEOUT / 0.5)):
            st = await world.status(world.receiver, context["seed"]) or {}
            if st.get("State") in ("completed", "failed", "aborted"):
                break
            await _pause(0.5)
    finally:
        sh("ip", "netns", "exec", world.a.name, "tc", "qdisc", "del", "dev", dev, "root", check=False)
    drops = 0
    return 0.0 if drops else 0.0


async def _flip(world: World, context) -> float:
    port = 31000 + world.rnd.randrange(2000)
    flip_after = world.rnd.randrange(64 << 10, (world.big_mib << 20) // 2)
    proc = subprocess.Popen(
        world.a.prefix + [sys.executable, "-m", "reliability.flipproxy", str(port), world.b.address,
                          str(world.seed_port), str(flip_after)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    world.extra_procs.append(proc)
    await _pause(0.8)
    context["target"] = f"127.0.0.1:{port}"
    await _send(world, context)
    context["after"] = lambda: (proc.kill(), proc.wait())
    # Stop the proxy once the seed has ended (the matrix's settle polls for that).
    async def reap():
        for _ in range(int(TIMEOUT / 0.5)):
            st = await world.status(world.receiver, context["seed"]) or {}
            if st.get("State") in ("completed", "failed", "aborted"):
                break
            await _pause(0.5)
        proc.kill()
        out = proc.communicate()[0]
        if "flipped" not in out:
            context["notes"].append("no byte was flipped (stream shorter than the flip point)")
        world.extra_procs.remove(proc)
    await reap()
    return float(flip_after)


async def _disk_full(world: World, context) -> float:
    at = _when(world)
    await _send(world, context)
    await _pause(at)
    st = os.statvfs(world.fs)
    filler = os.path.join(world.fs, "filler")
    sh("fallocate", "-l", str(max(st.f_bavail * st.f_frsize - 4096, 4096)), filler, check=False)
    for _ in range(int(TIMEOUT / 0.5)):
        s = await world.status(world.receiver, context["seed"]) or {}
        if s.get("State") in ("completed", "failed", "aborted"):
            break
        await _pause(0.5)
    await world._jobs_gone(context["seed"])
    os.unlink(filler)
    return at


async def _snapshot_gone(world: World, context) -> float:
    at = _when(world)
    how = world.rnd.choice(["umount", "remove"])
    context["notes"].append(how)
    await _send(world, context)
    await _pause(at)
    if how == "umount":
        sh("umount", "-l", world.mount_point, check=False)
    else:
        shutil.rmtree(world.snapshot, ignore_errors=True)
    return at


async def _abort(world: World, context) -> float:
    at = _when(world)
    side = world.rnd.choice(["sender", "receiver"])
    context["notes"].append(f"abort at {side}")
    await _send(world, context)
    await _pause(at)
    await world.api(getattr(world, side), f"/api/abort-seed/{context['seed']}")
    return at


async def _race(world: World, context) -> float:
    """A second seed for the same target datadir, started at a random moment."""
    at = _when(world)
    other = context["seed"] + "x"
    await _send(world, context)
    await _pause(at)
    code, body = await world.api(world.receiver, f"/api/receive-mysql-seed-data/{other}", key=KEY)
    if code == 200:
        context["notes"].append("the second receive was ACCEPTED")
        code, body = await world.api(world.sender, f"/api/send-mysql-seed-data/{context['target']}/{other}",
                                     key=KEY, source="snapshot")
        for _ in range(int(TIMEOUT / 0.5)):
            s = await world.status(world.receiver, other) or {}
            if s.get("State") in ("completed", "failed", "aborted"):
                break
            await _pause(0.5)
        context["notes"].append(f"second seed ended {s.get('State')}: {s.get('Error')}")
    else:
        context["notes"].append(f"second receive refused: {body.get('Message') if isinstance(body, dict) else body}")
    return at


def _dev(ns) -> str:
    out = sh("ip", "-n", ns.name, "-o", "addr", "show", "to", ns.address)
    return out.split()[1]


CASES: dict[str, Callable] = {
    "kill9_sender": _kill("sender", "KILL"),
    "kill9_receiver": _kill("receiver", "KILL"),
    "restart_sender": _kill("sender", "TERM"),
    "restart_receiver": _kill("receiver", "TERM"),
    "link_down_10s": _link_down,
    "lossy_link": _lossy,
    "byte_flip": _flip,
    "target_disk_full": _disk_full,
    "snapshot_gone": _snapshot_gone,
    "abort": _abort,
    "racing_seeds": _race,
}


def base_dir() -> str:
    base = tempfile.mkdtemp(prefix="orchagent-matrix-")
    os.chmod(base, 0o755)
    return base


async def run_case_safely(world: World, name: str, run: int) -> Outcome:
    """One case; an exception of the harness itself is reported as BROKEN, not raised."""
    try:
        return await world.run_case(name, run, CASES[name])
    except Exception as e:
        await world.api(world.sender, "/api/umount")
        return Outcome(name, run, 0.0, "BROKEN", f"harness error: {type(e).__name__}: {e}")


def summarize(results: list[Outcome], seed: int, seconds: float) -> dict:
    by_case: dict[str, dict[str, int]] = {}
    for r in results:
        by_case.setdefault(r.case, {}).setdefault(r.verdict, 0)
        by_case[r.case][r.verdict] += 1
    return {"seed": seed, "runs": len(results), "faults_injected": sum(r.faults for r in results),
            "verified": sum(r.verdict == "verified" for r in results),
            "failed_clean": sum(r.verdict == "failed-clean" for r in results),
            "broken": sum(r.verdict == "BROKEN" for r in results),
            "seconds": round(seconds, 1), "by_case": by_case}
