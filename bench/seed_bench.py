"""Seed throughput, side by side: ``sudo python3 bench/seed_bench.py`` (root: netns, tc).

On the same data, in the same run, alternating, several rounds, medians:

* **orchagent** — two real agents (``twistd -n orchestrator-agent``), driven over their
  HTTP API: ``receive-mysql-seed-data`` then ``send-mysql-seed-data?source=datadir``;
  timed from the send call until the receiver reports ``completed`` (verified, synced with
  syncfs, moved into place).  Checksums are always on: XXH3-128 per chunk on the plain
  runs (no key, as orchestrator starts seeds), BLAKE3 on the keyed runs of (a).  Peak
  RSS and peak PSS are the agent's daemon and seed engine processes together (RSS counts
  the libraries the two interpreters share twice, PSS once: see :class:`PssSampler`); the
  largest process's peak RSS is shown too.  ``first_data`` is the time until the
  receiver's status first shows data bytes done (the daemon's copy of it is pushed every
  half second, so it can be up to that late): the walk, the manifest and staging before
  it.
* **tar|nc** — ``nc -l | tar -xf -`` on the target, ``tar -cf - | nc -N`` on the source;
  timed until the receiving tar exits (reported with and without a ``sync`` after it: the
  agent's time includes making the data durable, tar's does not).
* **write limit** — ``cat <files> > one file`` on the target disk (+ ``sync``).

Scenarios: (a) 1 GiB of InnoDB-like 16 KiB pages, half of them compressible, loopback;
(b) 50,000 files of 16 KiB, loopback; (c) two network namespaces joined by a veth pair
throttled with tc (tbf) to 200 Mbit/s, 256 MiB of pages with InnoDB-like compressibility;
(d) peak RSS and PSS of both agents for 1 GiB and 4 GiB (one run each); (v), only when
asked (``--only v``), the data of (a) and (b) seeded with ``SeedVerifyOnDisk`` on and off.

Every run writes to a fresh ext4 file system on a loop device (direct I/O) over a file on
the root disk (see :class:`FreshTarget` for why).  Source data lives under ``--dir``
(default /var/tmp/orchagent-seed-bench, page cache warm) and is removed at the end unless
``--keep``.  Namespaces, daemons, mounts, loop devices and tc are removed whatever
happens.  The figures go to stdout as a Markdown table (pasted into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PAGE = 16 * 1024
WORDS = [w.encode() for w in (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
    "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu customer "
    "order invoice paid shipped pending returned warehouse berlin paris lisbon oslo madrid "
    "rome vienna prague dublin athens null true false 2024-01-01 2025-06-30 EUR USD GBP").split()]


# --- data --------------------------------------------------------------------------------------

def random_page() -> bytes:
    return os.urandom(PAGE)


def half_page() -> bytes:
    """Hex text and free space: compresses about 4:1."""
    return os.urandom(PAGE // 4).hex().encode() + bytes(PAGE // 2)


def innodb_page(rnd: random.Random) -> bytes:
    """Rows of words and numbers, 60-90 % full, the rest free: zstd -1 gets 3-5:1."""
    fill = int(PAGE * rnd.uniform(0.6, 0.9))
    parts = [os.urandom(38)]
    size = 38
    while size < fill:
        row = b"|".join([str(rnd.getrandbits(24)).encode()] + rnd.choices(WORDS, k=6)) + b"\n"
        parts.append(row)
        size += len(row)
    page = b"".join(parts)[:fill]
    return page + bytes(PAGE - len(page))


def write_pages_file(path: str, size: int, page_maker) -> None:
    with open(path, "wb") as fh:
        for _ in range(size // PAGE):
            fh.write(page_maker())


def make_mixed(root: str, total: int, file_size: int = 64 << 20) -> None:
    """(a)/(d): files of 16 KiB pages, alternately random and compressible."""
    os.makedirs(root, exist_ok=True)
    counter = [0]

    def page():
        counter[0] += 1
        return random_page() if counter[0] % 2 else half_page()

    for i in range(total // file_size):
        write_pages_file(os.path.join(root, f"t{i:03d}.ibd"), file_size, page)


def make_small(root: str, count: int = 50_000) -> None:
    """(b): ``count`` files of 16 KiB, 1000 per directory, half of them compressible."""
    for i in range(count):
        directory = os.path.join(root, f"db{i // 1000:03d}")
        if i % 1000 == 0:
            os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"t{i:05d}.frm"), "wb") as fh:
            fh.write(random_page() if i % 2 else half_page())


def make_realistic(root: str, total: int, file_size: int = 32 << 20) -> None:
    """(c): InnoDB-like pages; one page in ten is random (compressed blobs)."""
    os.makedirs(root, exist_ok=True)
    rnd = random.Random(7)
    for i in range(total // file_size):
        write_pages_file(os.path.join(root, f"t{i:03d}.ibd"), file_size,
                         lambda: random_page() if rnd.random() < 0.1 else innodb_page(rnd))


def tree_bytes(root: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)


class FreshTarget:
    """A new ext4 file system for every run, on a loop device over a file of the root disk
    (direct I/O: one page cache, as on a real disk), mounted at ``path``.

    Deleting the previous run's files instead would bias the next run: ext4 skips inodes
    freed in the last minute when it allocates (a 50,000-file run right after another
    spends most of its time scanning them), and the freed blocks are being discarded.
    """

    def __init__(self, path: str, image: str, size: int, mkfs_options: tuple[str, ...] = ()):
        self.path, self.image, self.size = path, image, size
        #: More options for mkfs.ext4 (``("-i", "4096")``: an inode per 4 KiB, for trees
        #: of many tiny files).
        self.mkfs_options = mkfs_options
        self.device = None

    def __enter__(self) -> str:
        os.makedirs(self.path, exist_ok=True)
        with open(self.image, "wb") as fh:
            fh.truncate(self.size)
        subprocess.run(["mkfs.ext4", "-q", "-F", *self.mkfs_options, "-E", "nodiscard,lazy_itable_init=0",
                        self.image], check=True)
        self.device = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", self.image],
                                     check=True, capture_output=True, text=True).stdout.strip()
        subprocess.run(["mount", self.device, self.path], check=True)
        target = os.path.join(self.path, "datadir")
        os.makedirs(target)
        subprocess.run(["sync"], check=True)
        return target

    def __exit__(self, *exc) -> None:
        subprocess.run(["umount", self.path], check=False)
        if self.device:
            subprocess.run(["losetup", "-d", self.device], check=False)
        os.unlink(self.image)


# --- agents ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agent:
    """One real agent daemon (optionally inside a network namespace)."""

    def __init__(self, directory: str, datadir: str, seed_port: int, prefix=(),
                 address: str = "127.0.0.1", extra: dict | None = None):
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory)
        self.address = address
        self.port = free_port()
        config = {"HTTPPort": self.port, "HTTPBindAddress": address,
                  "MySQLDatadirCommand": f"echo {datadir}", "MySQLServiceStatusCommand": "false",
                  "SeedTransferPort": seed_port, "StateDir": os.path.join(directory, "state"),
                  "TokenHintFile": os.path.join(directory, "token")}
        config.update(extra or {})
        path = os.path.join(directory, "agent.conf.json")
        with open(path, "w") as fh:
            json.dump(config, fh)
        env = dict(os.environ, PYTHONPATH=REPO)
        self.log = open(os.path.join(directory, "agent.log"), "w")
        self.process = subprocess.Popen(
            [*prefix, sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "orchestrator-agent", "--config", path],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=directory)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection((address, self.port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"agent in {directory} did not start")
                time.sleep(0.05)
        with open(config["TokenHintFile"]) as fh:
            self.token = fh.read().strip()
        self._wait_for_engine(deadline)

    def _wait_for_engine(self, deadline: float) -> None:
        """The seed engine runs in a child process that starts beside the HTTP port: a
        running agent has it ready long before a seed, so the timing starts after it."""
        while True:
            with open(self.log.name) as fh:
                if any("seed engine process" in line and "is ready" in line for line in fh):
                    return
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("the agent's seed engine did not start")
            time.sleep(0.05)

    def get(self, path: str):
        sep = "&" if "?" in path else "?"
        url = f"http://{self.address}:{self.port}{path}{sep}token={self.token}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.load(response)

    def _pids(self) -> list[int]:
        """The agent's processes: the daemon and its seed engine (inside a namespace the
        daemon is nsenter's child)."""
        pids, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo += [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                     text=True).stdout.split()]
        return [p for p in pids if _is_python(p)]

    def pids(self) -> list[int]:
        return self._pids()

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU seconds the agent's processes used so far, in the interpreter and its
        libraries (user) and in the kernel (system), with the commands they waited for."""
        user = system = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        for pid in self._pids():
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            # utime, stime, cutime, cstime: fields 14-17 of proc(5), 12-15 after the name.
            user += (int(fields[11]) + int(fields[13])) / tick
            system += (int(fields[12]) + int(fields[14])) / tick
        return user, system

    def peak_rss_mb(self) -> list[float]:
        """Peak resident memory of each of the agent's processes (daemon, seed engine)."""
        peaks = []
        for pid in self._pids():
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        peaks.append(int(line.split()[1]) / 1024)
        return peaks

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


class PssSampler:
    """Peak PSS of a set of processes together, sampled every 50 ms in a thread.

    RSS counts a shared page in full in every process that maps it, so the RSS of an
    agent's two interpreters counts their common libraries twice; PSS shares each page
    among the processes that map it, and summed over the agent it is the memory the
    agent takes.  The kernel keeps no peak of it, hence the sampling.  With ``series``
    every sample is kept too (:attr:`series`: ``(seconds since start, {group: MB})``), to
    show how memory goes over a whole seed."""

    def __init__(self, groups: dict[str, list[int]], series: bool = False):
        self.groups = groups
        self.peak = {name: 0.0 for name in groups}
        self.series: list[tuple[float, dict[str, float]]] | None = [] if series else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        started = time.monotonic()
        while True:
            now = {name: sum(map(_pss_mb, pids)) for name, pids in self.groups.items()}
            for name, value in now.items():
                self.peak[name] = max(self.peak[name], value)
            if self.series is not None:
                self.series.append((time.monotonic() - started, now))
            if self._stop.wait(0.05):
                return


def _pss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _is_python(pid: int) -> bool:
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")).startswith("python")
    except OSError:
        return False


def run_orchagent(work: str, src: str, dst: str, *, target: str, ns=None, key: str = "",
                  receiver_extra: dict | None = None, series: bool = False) -> dict:
    """One seed between two fresh agents; ``series`` adds ``pss_series``, every PSS
    sample of the run (see :class:`PssSampler`)."""
    seed_port = free_port()
    a_prefix = ns.a.prefix if ns else ()
    b_prefix = ns.b.prefix if ns else ()
    receiver = Agent(os.path.join(work, "agent-r"), dst, seed_port, b_prefix,
                     ns.b.address if ns else "127.0.0.1", extra=receiver_extra)
    sender = Agent(os.path.join(work, "agent-s"), src, seed_port, a_prefix,
                   ns.a.address if ns else "127.0.0.1")
    try:
        with PssSampler({"receiver": receiver.pids(), "sender": sender.pids()}, series) as pss:
            assert receiver.get("/api/receive-mysql-seed-data/1" + (f"?key={key}" if key else "")) is True
            cpu_before = receiver.cpu_seconds(), sender.cpu_seconds()
            started = time.monotonic()
            assert sender.get(f"/api/send-mysql-seed-data/{target}:{seed_port}/1?source=datadir"
                              + (f"&key={key}" if key else "")) is True
            first_data = None
            while True:
                status = receiver.get("/api/seed-status/1")
                if first_data is None and status.get("BytesDone"):
                    first_data = time.monotonic() - started
                if status["State"] in ("completed", "failed", "aborted"):
                    break
                time.sleep(0.02)
            elapsed = time.monotonic() - started
            cpu = {f"cpu_{side}_{kind}": round(after - before, 2)
                   for side, agent, was in zip(("receiver", "sender"), (receiver, sender), cpu_before)
                   for kind, after, before in zip(("user", "sys"), agent.cpu_seconds(), was)}
        if status["State"] != "completed":
            raise RuntimeError(f"seed failed: {status['Error']}")
        rss_receiver, rss_sender = receiver.peak_rss_mb(), sender.peak_rss_mb()
        result = {"seconds": elapsed, "rss_receiver": sum(rss_receiver), "rss_sender": sum(rss_sender),
                  "rss_receiver_process": max(rss_receiver), "rss_sender_process": max(rss_sender),
                  "pss_receiver": pss.peak["receiver"], "pss_sender": pss.peak["sender"],
                  "bytes": status["BytesTotal"], "first_data": first_data or elapsed, **cpu}
        if series:
            result["pss_series"] = pss.series
        return result
    finally:
        receiver.stop()
        sender.stop()


def run_tar_nc(src: str, dst: str, *, address: str = "127.0.0.1", ns=None) -> dict:
    port = free_port()
    a_prefix = list(ns.a.prefix) if ns else []
    b_prefix = list(ns.b.prefix) if ns else []
    listener = subprocess.Popen(b_prefix + ["sh", "-c", f"nc -l {address} {port} | tar -xf - -C {dst}"])
    time.sleep(0.3)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    subprocess.run(a_prefix + ["sh", "-c", f"tar -cf - -C {src} . | nc -N {address} {port}"], check=True)
    listener.wait()
    elapsed = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(["sync"], check=True)
    # Both pipelines together (tar and nc on each side): user / system CPU seconds.
    return {"seconds": elapsed, "seconds_synced": time.monotonic() - started,
            "cpu_both_user": round(after.ru_utime - before.ru_utime, 2),
            "cpu_both_sys": round(after.ru_stime - before.ru_stime, 2)}


def run_cat(src: str, dst: str) -> dict:
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs)
    started = time.monotonic()
    with open(os.path.join(dst, "one"), "wb") as out:
        for path in files:
            with open(path, "rb") as fh:
                shutil.copyfileobj(fh, out, 1 << 20)
    elapsed = time.monotonic() - started
    subprocess.run(["sync"], check=True)
    return {"seconds": elapsed, "seconds_synced": time.monotonic() - started}


# --- network namespaces --------------------------------------------------------------------------

class Cleanups:
    """Stands in for a test case's addCleanup (tests.support.netns needs one)."""

    def __init__(self):
        self.calls = []

    def addCleanup(self, fn, *args):
        self.calls.append((fn, args))

    def run(self):
        while self.calls:
            fn, args = self.calls.pop()
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - cleanup goes on
                print(f"cleanup failed: {e}", file=sys.stderr)


def throttled_pair(cleanups: Cleanups, rate: str = "200mbit"):
    from tests.support.netns import create_pair

    pair = create_pair(cleanups)
    for host in (pair.a, pair.b):
        links = subprocess.run(["ip", "-n", host.name, "-o", "link"], capture_output=True,
                               text=True, check=True).stdout
        for line in links.splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            if name.endswith(("ab", "ba")):
                subprocess.run(["ip", "netns", "exec", host.name, "tc", "qdisc", "add", "dev", name,
                                "root", "tbf", "rate", rate, "burst", "256kb", "latency", "50ms"],
                               check=True)
    return pair


# --- the runs ----------------------------------------------------------------------------------

def fresh_target(base: str, data_bytes: int) -> FreshTarget:
    size = int(data_bytes * 1.3) + (512 << 20)
    return FreshTarget(os.path.join(base, "target"), os.path.join(base, "target.img"), size)


def median(values):
    return statistics.median(values) if values else float("nan")


def scenario(name: str, src: str, base: str, work: str, rounds: int, *, ns=None,
             with_cat: bool = True, keyed: bool = False, make_target=None) -> dict:
    """``keyed`` adds runs with a per-seed key and no TLS, the mode whose chunk digests are
    BLAKE3 (the plain runs, like orchestrator's, use XXH3-128).  ``make_target`` makes each
    run's :class:`FreshTarget` (default: :func:`fresh_target` for the data's size)."""
    results = {"orchagent": [], "orchagent_keyed": [], "tar_nc": [], "cat": []}
    total = tree_bytes(src)
    kinds = ["orchagent"] + (["orchagent_keyed"] if keyed else []) + ["tar_nc"] + (["cat"] if with_cat else [])
    for round_ in range(rounds):
        order = kinds if round_ % 2 == 0 else kinds[::-1]
        for kind in order:
            with (make_target() if make_target else fresh_target(base, total)) as dst:
                if kind.startswith("orchagent"):
                    target = ns.b.address if ns else "127.0.0.1"
                    result = run_orchagent(work, src, dst, target=target, ns=ns,
                                           key="bench-key" if kind == "orchagent_keyed" else "")
                elif kind == "tar_nc":
                    result = run_tar_nc(src, dst, address=ns.b.address if ns else "127.0.0.1", ns=ns)
                else:
                    result = run_cat(src, dst)
            results[kind].append(result)
            cpu = "".join(f", CPU {side} user / sys {result[f'cpu_{side}_user']:.2f} / "
                          f"{result[f'cpu_{side}_sys']:.2f} s" for side in ("receiver", "sender", "both")
                          if f"cpu_{side}_user" in result)
            first = f", first data {result['first_data']:.1f}s" if "first_data" in result else ""
            print(f"  {name} round {round_ + 1} {kind}: {result['seconds']:.2f}s "
                  f"({total / result['seconds'] / 1e6:.0f} MB/s){first}{cpu}", flush=True)
    summary = {"bytes": total}
    for kind, runs in results.items():
        if runs:
            summary[kind] = {key: median([r[key] for r in runs]) for key in runs[0]}
    return summary


def verify_on_disk(name: str, src: str, base: str, work: str, rounds: int) -> dict:
    """(v) What SeedVerifyOnDisk costs: the same seed with the staged data read back
    before promotion (on) and without (off), alternating."""
    runs = {"off": [], "on": []}
    total = tree_bytes(src)
    for round_ in range(rounds):
        for setting in (("off", "on") if round_ % 2 == 0 else ("on", "off")):
            with fresh_target(base, total) as dst:
                result = run_orchagent(work, src, dst, target="127.0.0.1",
                                       receiver_extra={"SeedVerifyOnDisk": setting})
            runs[setting].append(result["seconds"])
            print(f"  v {name} round {round_ + 1} SeedVerifyOnDisk={setting}: "
                  f"{result['seconds']:.2f}s", flush=True)
    return {"bytes": total, "off": median(runs["off"]), "on": median(runs["on"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/var/tmp/orchagent-seed-bench")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default="a,b,c,d", help="comma-separated scenarios (and v: "
                        "the cost of SeedVerifyOnDisk)")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (network namespaces, tc, sync)", file=sys.stderr)
        return 2
    only = set(args.only.split(","))
    base = args.dir
    os.makedirs(base, exist_ok=True)
    work = os.path.join(base, "work")
    report = {}
    cleanups = Cleanups()
    try:
        if "a" in only:
            src = os.path.join(base, "mixed-1g")
            if not os.path.isdir(src):
                print("generating 1 GiB of mixed pages ...", flush=True)
                make_mixed(src, 1 << 30)
            report["a"] = scenario("a", src, base, work, args.rounds, keyed=True)
        if "b" in only:
            src = os.path.join(base, "small-50k")
            if not os.path.isdir(src):
                print("generating 50,000 files of 16 KiB ...", flush=True)
                make_small(src)
            report["b"] = scenario("b", src, base, work, args.rounds)
        if "c" in only:
            src = os.path.join(base, "innodb-256m")
            if not os.path.isdir(src):
                print("generating 256 MiB of InnoDB-like pages ...", flush=True)
                make_realistic(src, 256 << 20)
            pair = throttled_pair(cleanups)
            report["c"] = scenario("c", src, base, work, args.rounds, ns=pair, with_cat=False)
        if "v" in only:
            report["v"] = {}
            for label, name, make in (("1 GiB mixed", "mixed-1g", lambda p: make_mixed(p, 1 << 30)),
                                      ("50,000 × 16 KiB", "small-50k", make_small)):
                src = os.path.join(base, name)
                if not os.path.isdir(src):
                    print(f"generating {label} ...", flush=True)
                    make(src)
                report["v"][label] = verify_on_disk(label, src, base, work, args.rounds)
        if "d" in only:
            report["d"] = {}
            for label, size in (("1 GiB", 1 << 30), ("4 GiB", 4 << 30)):
                src = os.path.join(base, f"mixed-{size >> 30}g")
                if not os.path.isdir(src):
                    print(f"generating {label} of mixed pages ...", flush=True)
                    make_mixed(src, size)
                with fresh_target(base, tree_bytes(src)) as dst:
                    result = run_orchagent(work, src, dst, target="127.0.0.1")
                report["d"][label] = result
                print(f"  d {label}: {result['seconds']:.1f}s, {memory(result)}", flush=True)
    finally:
        cleanups.run()
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print()
    print(markdown(report, args.rounds))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0


def markdown(report: dict, rounds: int) -> str:
    lines = [f"Medians of {rounds} alternating rounds; MB/s = data bytes / seconds.", "",
             "| scenario | orchagent | tar\\|nc | tar\\|nc + sync | cat | cat + sync "
             "| × tar\\|nc | × tar\\|nc+sync | × cat+sync | peak PSS r / s (MB) "
             "| peak RSS r / s: sum (largest process) (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    titles = {"a": "(a) 1 GiB mixed, loopback", "b": "(b) 50,000 × 16 KiB, loopback",
              "c": "(c) 256 MiB InnoDB-like, 200 Mbit/s veth"}
    for key in ("a", "b", "c"):
        if key not in report:
            continue
        r = report[key]
        n, ours, tar, cat = r["bytes"], r["orchagent"], r["tar_nc"], r.get("cat")

        def rate(seconds):
            return f"{seconds:.2f}s ({n / seconds / 1e6:.0f} MB/s)"

        variants = [(titles[key], ours)]
        if "orchagent_keyed" in r:
            variants.append((titles[key] + ", keyed (BLAKE3)", r["orchagent_keyed"]))
        for title, ours in variants:
            cells = [title, rate(ours["seconds"]), rate(tar["seconds"]), rate(tar["seconds_synced"]),
                     rate(cat["seconds"]) if cat else "–", rate(cat["seconds_synced"]) if cat else "–",
                     f"{tar['seconds'] / ours['seconds']:.2f}",
                     f"{tar['seconds_synced'] / ours['seconds']:.2f}",
                     f"{cat['seconds_synced'] / ours['seconds']:.2f}" if cat else "–",
                     f"{ours['pss_receiver']:.0f} / {ours['pss_sender']:.0f}",
                     f"{ours['rss_receiver']:.0f} ({ours['rss_receiver_process']:.0f}) / "
                     f"{ours['rss_sender']:.0f} ({ours['rss_sender_process']:.0f})"]
            lines.append("| " + " | ".join(cells) + " |")
    if "v" in report:
        lines += ["", "| SeedVerifyOnDisk | off | on | on / off |", "|---|---|---|---|"]
        for label, r in report["v"].items():
            lines.append(f"| {label} | {r['off']:.2f}s | {r['on']:.2f}s | {r['on'] / r['off']:.2f} |")
    if "d" in report:
        lines.append("")
        for label, result in report["d"].items():
            lines.append(f"- {label}: {result['seconds']:.1f}s, {memory(result)}")
    return "\n".join(lines)


def memory(result: dict) -> str:
    """An agent run's memory, receiver / sender: PSS summed over the agent's processes
    (what it takes), RSS summed (shared pages counted in each), and its largest process."""
    return (f"peak PSS {result['pss_receiver']:.0f} / {result['pss_sender']:.0f} MB; peak RSS "
            f"summed {result['rss_receiver']:.0f} / {result['rss_sender']:.0f} MB, of the largest "
            f"process {result['rss_receiver_process']:.0f} / {result['rss_sender_process']:.0f} MB")


if __name__ == "__main__":
    sys.exit(main())
