"""Every crash point and every I/O error on the durable path, enumerated (issue #17).

``python3 -m reliability.crashpoints --ops datadir_seed,restore_copy,... [--quick]`` (root)
``python3 -m reliability.crashpoints --ops datadir_seed --points crash:53,error:96`` (single
points of a run, by their number in its output, re-run)

The operations here run in one world (an ext4 target, a copy snapshot); those that need a
world of their own (a btrfs target; a real MariaDB with a mariabackup backup and a
hot-seeding source) and the sending side's crashes are in :mod:`reliability.crashops`
(restore_btrfs, backup_mount, restore_backup, hot_seed, sender_seed); ``--ops`` takes
both, each world made in turn.

For each operation, the target agent (its daemon and its seed engine, and any command they
run) is traced once with ``strace -f`` while the operation runs from a known state.  The
trace lists, in order, every call that decides what survives a crash, made on the
target's file system (one loop-mounted ext4 holding the datadir, staging, StateDir and
snapshots): ``rename``/``renameat``/``renameat2``, ``fsync``/``fdatasync``/``syncfs``,
``unlink``/``unlinkat``/``rmdir``, ``mkdir``/``mkdirat``, ``fallocate``, ``ftruncate``,
and writes to StateDir (journals, records, states).  Then, for each point, the same
operation runs again from the same state with strace attached to inject at that call:

* **crash**: the call is held at its entry (``delay_enter``), and once held every process
  of the agent is killed with SIGKILL, so the call and everything that depends on it never
  happen (a process-level crash of the whole host at that instant; this kernel has no
  device-mapper, so no dm-flakey power cut and no loss of unsynced pages).  A fresh agent
  is started; it recovers (promotions, swaps) and the sender resumes the seed; the
  operations the controller would repeat (delete-mysql-datadir, post-copy) are repeated.
* **I/O error**: the call fails with EIO, ENOSPC, EDQUOT or EROFS (in turn) on the
  ``write``/``pwrite64``/``pwritev``, ``fsync``/``fdatasync``/``syncfs``, ``rename*`` and
  ``openat`` calls on the target's file system; the agent is not restarted.

strace counts ``when=N`` per system call and per tracee (thread), and the seed engine
works in a thread pool, so a point is named by the call, a path it touches (the ``-P``
filter, which also limits what is counted) and its occurrence among the calls of that
name touching that path: exact whenever those occurrences were made by one thread (a
point where they were not is marked approximate, and one that a run never reaches is
counted "not reached").

Then the invariant: the datadir is exactly the old tree or exactly the new one (every
entry's type, mode, size, mtime and content hash), never a mix, never missing; staging,
set-aside and work copies are either resumable or gone; a seed ends completed or failed
with a message (a completed seed whose completion could not be saved keeps its promotion
record, and the agent restarted then must settle it: completed, no record); an fsync that failed never ends in a success; and no mount, loop device,
agent child process, listening seed port or descriptor into the target's file system is
left.  Outcomes: verified (the new tree), failed-clean (the old tree, the failure said),
broken (anything else).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from typing import Any

import attrs
from twisted.internet import defer, reactor, task

from orchagent.seed.manager import COMPLETED_GRACE
from reliability import matrix
from reliability.matrix import sh
from tests.support.daemon import Daemon, free_port

CRASH_CALLS = ("rename", "renameat", "renameat2", "fsync", "fdatasync", "syncfs", "unlink",
               "unlinkat", "rmdir", "mkdir", "mkdirat", "fallocate", "ftruncate")
WRITE_CALLS = ("write", "pwrite64", "pwritev", "pwritev2")
ERROR_CALLS = WRITE_CALLS + ("fsync", "fdatasync", "syncfs", "rename", "renameat", "renameat2", "openat")
TRACED = sorted(set(CRASH_CALLS + ERROR_CALLS))
SYNC_CALLS = ("fsync", "fdatasync", "syncfs")
ERRNOS = ("EIO", "ENOSPC", "EDQUOT", "EROFS")
#: x86_64 numbers, to recognise the held call in /proc/TID/syscall.
NR = {"write": 1, "pwrite64": 18, "fsync": 74, "fdatasync": 75, "ftruncate": 77, "rename": 82,
      "mkdir": 83, "rmdir": 84, "unlink": 87, "openat": 257, "mkdirat": 258, "unlinkat": 263,
      "renameat": 264, "fallocate": 285, "pwritev": 296, "syncfs": 306, "renameat2": 316,
      "pwritev2": 328}
PATH_ARG_CALLS = ("rename", "renameat", "renameat2", "unlink", "unlinkat", "rmdir", "mkdir",
                  "mkdirat", "openat")
HOLD_US = 120_000_000
#: Bookkeeping of a durable operation that is over once this is removed (a seed's
#: promotion record, a restore's swap record): calls after its removal are "late".
DONE_MARKERS = (re.compile(r"/state/seeds/[^/]*\.promotion$"), re.compile(r"/state/restores/[^/]*\.json$"))


def manifest(top: str) -> dict[str, tuple]:
    """:func:`reliability.matrix.manifest` with lstat semantics throughout: a symbolic
    link to a directory (which ``os.walk`` lists among directories while its target
    exists) is a link, whatever its target."""
    found = matrix.manifest(top)
    for name, entry in found.items():
        if entry[0] == "d" and stat.S_ISLNK(entry[1]):
            found[name] = ("l", os.readlink(os.path.join(top, name)))
    return found
SETTLE_TIMEOUT = 45.0


# --- traces ------------------------------------------------------------------------------------

@attrs.define
class Call:
    """One traced call: its time, thread, name, the paths it touches (fd paths and absolute
    path arguments, as strace's -P matches them) and its return."""

    ts: float
    tid: int
    name: str
    paths: list[str]
    ret: str
    line: str


_LINE = re.compile(r"^(\d+\.\d+) (\w+)\((.*)\) += (.*)$")
_FD = re.compile(r"\d+<([^>]*)>")
_STR = re.compile(r'"((?:[^"\\]|\\.)*)"')


def parse_line(tid: int, line: str) -> Call | None:
    m = _LINE.match(line.rstrip("\n"))
    if not m:
        return None
    ts, name, args, ret = m.groups()
    paths = _FD.findall(args)
    if name in PATH_ARG_CALLS:
        paths += [s for s in _STR.findall(args) if s.startswith("/")]
        if name in ("unlinkat", "mkdirat", "renameat", "renameat2", "openat"):
            # For classification only: a name relative to its directory fd.
            rel = [s for s in _STR.findall(args) if not s.startswith("/")]
            fds = _FD.findall(args)
            if rel and fds:
                paths.append(os.path.join(fds[0], rel[0]) + "\0rel")
    return Call(float(ts), tid, name, paths, ret, line.strip())


def read_trace(prefix: str) -> list[Call]:
    calls = []
    directory, stem = os.path.split(prefix)
    for name in os.listdir(directory):
        if not name.startswith(stem + "."):
            continue
        tid = int(name.rsplit(".", 1)[1])
        with open(os.path.join(directory, name), errors="replace") as fh:
            for line in fh:
                call = parse_line(tid, line)
                if call:
                    calls.append(call)
    calls.sort(key=lambda c: c.ts)
    return calls


@attrs.define
class Point:
    """A call to inject at: ``name`` on ``match`` (strace -P), occurrence ``when`` (per
    tracee); ``exact`` when every earlier such occurrence was made by the same thread."""

    number: int
    name: str
    match: str
    when: int
    exact: bool
    shown: str
    kind: str  # "crash" | "error"
    #: Made after the operation's record was removed (see DONE_MARKERS): the data was
    #: durable before, what is left is bookkeeping the next start settles.
    late: bool = False


def _under(path: str, roots: tuple[str, ...]) -> bool:
    path = path.split("\0")[0]
    return any(path == r or path.startswith(r + "/") for r in roots)


_TS = re.compile(r"\d{8}T\d{6}Z")


def generalize(path: str, token: str | None) -> str:
    """A path with the run's own names (seed id, restore timestamp) as placeholders."""
    if token:
        path = path.replace(token, "{token}")
    return _TS.sub("{ts}", path)


def expand(match: str, token: str | None, since: float) -> list[str]:
    """The -P paths of a generalized path for a run that starts at ``since``."""
    if token:
        match = match.replace("{token}", token)
    if "{ts}" not in match:
        return [match]
    stamps = [time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(since + i)) for i in range(-1, 5)]
    return [match.replace("{ts}", stamp) for stamp in stamps]


def points(calls: list[Call], roots: tuple[str, ...], state_dir: str, kind: str,
           token: str | None = None) -> list[Point]:
    """The crash (or error) points of a trace, in order."""
    found: list[Point] = []
    seen: dict[tuple[str, str], list[int]] = {}
    done_at = max((c.ts for c in calls if c.name in ("unlink", "unlinkat") and not c.ret.startswith("-")
                   and any(m.search(p.split("\0")[0]) for p in c.paths for m in DONE_MARKERS)),
                  default=None)
    for call in calls:
        call.paths = [generalize(p, token) for p in call.paths]
        real = [p for p in call.paths if not p.endswith("\0rel")]
        if not any(_under(p, roots) for p in call.paths):
            for p in real:
                seen.setdefault((call.name, p), []).append(call.tid)
            continue
        if kind == "crash":
            wanted = call.name in CRASH_CALLS or (
                call.name in WRITE_CALLS and any(_under(p, (state_dir,)) for p in real))
        else:
            wanted = call.name in ERROR_CALLS
        match = next((p for p in real if _under(p, roots)), None)
        for p in real:
            seen.setdefault((call.name, p), []).append(call.tid)
        if not wanted or match is None:
            continue
        tids = seen[(call.name, match)]
        exact = all(t == call.tid for t in tids)
        when = sum(1 for t in tids if t == call.tid)
        shown = f"{call.name} {' '.join(p.split(chr(0))[0] for p in call.paths if _under(p, roots))}"
        late = done_at is not None and call.ts > done_at
        found.append(Point(len(found) + 1, call.name, match, when, exact, shown, kind, late))
    return found


class Strace:
    """strace attached to a set of processes (every thread, and children they start)."""

    def __init__(self, pids: list[int], args: list[str], prefix: str | None):
        argv = ["strace", "-f", "-qq", "-ttt", "-y", "-s", "256"]
        argv += ["-ff", "-o", prefix] if prefix else ["-o", "/dev/null"]
        argv += args
        for pid in pids:
            argv += ["-p", str(pid)]
        self.pids = pids
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)

    async def attached(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"strace exited: {self.proc.stderr.read()}")
            if all(_all_traced(pid) for pid in self.pids):
                return
            await pause(0.02)
        raise RuntimeError("strace did not attach")

    def stop(self) -> None:
        if self.proc.stderr.closed:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()


def _all_traced(pid: int) -> bool:
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/status") as fh:
                if "TracerPid:\t0\n" in fh.read():
                    return False
        return True
    except (FileNotFoundError, ProcessLookupError):  # gone, or going
        return True


def _gone(pid: int) -> bool:
    """No process ``pid`` is left, or only its zombie, reaped here if it is our child: an
    orphaned seed engine becomes ours (tests.support.mariadb makes this process a child
    subreaper), and its /proc entry stays until it is reaped."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            zombie = fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    if zombie:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    return zombie


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def held(pids: list[int], name: str) -> int | None:
    """A thread of ``pids`` stopped by its tracer inside call ``name``, or None."""
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except (FileNotFoundError, ProcessLookupError):  # gone, or going
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                    st = fh.read().rsplit(")", 1)[1].split()[0]
                with open(f"/proc/{pid}/task/{tid}/syscall") as fh:
                    nr = fh.read().split()[0]
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if st == "t" and nr == str(NR[name]):
                return int(tid)
    return None


async def pause(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


# --- the world: a target file system, a source agent, a target agent ------------------------------

class World:
    """A loop-mounted ext4 (the target's disk), a source agent and a target agent on loopback."""

    def __init__(self, base: str, size_mib: int):
        self.base = base
        self.size_mib = size_mib
        self.cleanups: list = []
        self.seq = 0

    #: Names on the target's file system that are fixtures, not leftovers.
    FIXTURES = {"lost+found", "snapshots", "mnt", "mysql", "state"}

    async def start(self, btrfs: bool = False) -> None:
        self.token = os.path.join(self.base, "token")
        with open(self.token, "w") as fh:
            fh.write(os.urandom(16).hex())
        os.chmod(self.token, 0o600)
        self.fs = self.target_fs()
        self.datadir = os.path.join(self.fs, "mysql")
        self.state_dir = os.path.join(self.fs, "state")
        self.snapdir = os.path.join(self.fs, "snapshots")
        self.src_datadir = os.path.join(self.base, "src", "mysql")
        os.makedirs(self.src_datadir)
        os.makedirs(self.snapdir)
        os.makedirs(os.path.join(self.base, "src", "snapshots"))
        os.makedirs(os.path.join(self.base, "src", "mnt"))
        os.makedirs(os.path.join(self.fs, "mnt"))
        self.make_source(self.src_datadir)
        sh("cp", "-a", self.src_datadir, os.path.join(self.base, "src", "snapshots", "snap1"))
        self.make_snapshot(self.src_datadir, os.path.join(self.snapdir, "snap1"))
        self.new = manifest(self.src_datadir)
        self.seed_port = free_port()
        # A tool that hangs (mariabackup --prepare when the first write of its Aria log
        # fails) is stopped well within SETTLE_TIMEOUT.
        common = {"TokenFile": self.token, "SeedTransferPort": self.seed_port,
                  "MySQLServiceStatusCommand": "false", "CommandTimeoutSeconds": 60,
                  "SeedCompression": "none", "ToolStallSeconds": 20}
        self.src_config = dict(common, MySQLDatadirCommand=f"echo {self.src_datadir}",
                               SnapshotBackend="copy",
                               SnapshotDirectory=os.path.join(self.base, "src", "snapshots"),
                               SnapshotMountPoint=os.path.join(self.base, "src", "mnt"),
                               SnapshotVolumesFilter="snap", HTTPPort=free_port())
        self.dst_config = dict(common, MySQLDatadirCommand=f"echo {self.datadir}",
                               StateDir=self.state_dir, SnapshotBackend="copy",
                               SeedVerifyStart="off", MySQLServiceStartCommand="true",
                               MySQLServiceStopCommand="true",
                               SnapshotDirectory=self.snapdir,
                               SnapshotMountPoint=os.path.join(self.fs, "mnt"),
                               SnapshotVolumesFilter="snap", HTTPPort=free_port())
        await self.more_fixtures()
        self.source = await self._daemon("source", self.src_config)
        self.target = await self._daemon("target", self.dst_config)
        self.btrfs = self._mount("btrfs", "btrfs", 256) if btrfs else None

    # --- what a kind of world changes (reliability.crashops) -------------------------------

    def target_fs(self) -> str:
        """The target's file system, mounted: its mount point."""
        return self._mount("fs", "ext4", self.size_mib * 6 + 64)

    def make_source(self, root: str) -> None:
        """The tree the operations bring in (the source's datadir)."""
        make_tree(root, self.size_mib, b"new")

    def make_snapshot(self, tree: str, path: str) -> None:
        """The target's snapshot ``snap1`` of ``tree`` at ``path``."""
        sh("cp", "-a", tree, path)

    async def more_fixtures(self) -> None:
        """More of the world, made before the agents start (configs may still change)."""

    def make_datadir(self) -> None:
        os.makedirs(self.datadir)

    def remove_entry(self, path: str) -> None:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)

    def _mount(self, name: str, fstype: str, mib: int, options: tuple[str, ...] = ()) -> str:
        image = os.path.join(self.base, f"{name}.img")
        with open(image, "wb") as fh:
            fh.truncate(mib << 20)
        sh(f"mkfs.{fstype}", "-q", *(["-F"] if fstype == "ext4" else ["-f"]), *options, image)
        loop = sh("losetup", "--find", "--show", image).strip()
        self.cleanups.append(lambda: sh("losetup", "-d", loop, check=False))
        point = os.path.join(self.base, name)
        os.makedirs(point)
        sh("mount", loop, point)
        self.cleanups.append(lambda: sh("umount", "-l", point, check=False))
        return point

    async def _daemon(self, name: str, config: dict) -> Daemon:
        daemon = Daemon(os.path.join(self.base, name), config)
        await daemon.start()
        return daemon

    async def restart_target(self, tracer: "Strace | None" = None) -> None:
        """SIGKILL every process of the target agent, then start a fresh one."""
        await self.kill(self.target, self.target_pids_before, tracer)
        self.target = await self._daemon("target", self.dst_config)

    async def kill(self, daemon, before: list[int], tracer: "Strace | None" = None) -> None:
        """SIGKILL every process of ``daemon`` and wait until ``before`` (its processes as
        they were) are gone.  The tracer holding a thread is stopped after the kill: a
        held tracee dies once let go."""
        for pid in reversed(tree(daemon.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if tracer is not None:
            tracer.stop()
        await daemon.wait_exit()
        await self._wait_gone(before)

    async def _wait_gone(self, pids: list[int]) -> None:
        for _ in range(200):
            if all(map(_gone, pids)):
                return
            await pause(0.05)

    def target_pids(self) -> list[int]:
        return tree(self.target.pid)

    async def stop(self) -> None:
        for daemon in (getattr(self, "target", None), getattr(self, "source", None)):
            if daemon is not None:
                await daemon.stop()
        while self.cleanups:
            try:
                self.cleanups.pop()()
            except Exception as e:  # cleanup goes on
                print(f"cleanup step failed: {e}", file=sys.stderr)

    # --- state of the target -----------------------------------------------------------------

    def reset(self, with_old: bool = True) -> None:
        """The target's file system back to its starting state: the old datadir only."""
        for directory, _, files in os.walk(self.state_dir):
            for name in files:
                os.unlink(os.path.join(directory, name))
        for name in os.listdir(self.fs):
            if name in self.FIXTURES - {"mysql"}:
                continue
            self.remove_entry(os.path.join(self.fs, name))
        self.make_datadir()
        if with_old:
            make_tree(self.datadir, 1, b"old")
        self.old = manifest(self.datadir)

    def leftovers(self) -> list[str]:
        """Names on the target's file system that are not the datadir or its fixtures."""
        names = [n for n in os.listdir(self.fs) if n not in self.FIXTURES]
        if os.path.isdir(self.datadir):
            names += [f"mysql/{n}" for n in os.listdir(self.datadir) if n.startswith(".")]
        for directory, _, files in os.walk(self.state_dir):
            names += [os.path.relpath(os.path.join(directory, n), self.fs) for n in files
                      if not n.endswith(".json") or "restores" in directory]
        return names

    async def leaks(self) -> list[str]:
        """Processes, descriptors, ports and mounts the run left (waits out linger).  The
        seed port alone may stay open longer: an agent started after a seed completed
        listens up to COMPLETED_GRACE for a sender that has not read the result yet."""
        deadline = time.monotonic() + 20
        port_deadline = time.monotonic() + COMPLETED_GRACE + 5
        agents = [("", self.target, self.fs)]
        if getattr(self, "source", None) is not None:
            # The sending agent too: no tool left, no descriptor into what it sends.
            agents.append(("source ", self.source, os.path.join(self.base, "src")))
        while True:
            problems = []
            for who, daemon, root in agents:
                problems += _agent_leaks(who, daemon.pid, tree(daemon.pid), root)
            listening = sh("ss", "-ltnH", check=False)
            if f":{self.seed_port} " in listening:
                problems.append(f"seed port {self.seed_port} listening")
            mounts = [line.split()[1] for line in open("/proc/mounts") if self.base in line.split()[1]]
            expected = {self.fs} | ({self.btrfs} if self.btrfs else set())
            if set(mounts) - expected:
                problems.append(f"mounts: {sorted(set(mounts) - expected)}")
            strays = [p for p in os.listdir("/proc") if p.isdigit() and _is_strace(p)]
            if strays:
                problems.append(f"strace left: {strays}")
            if not problems:
                return []
            now = time.monotonic()
            port_only = problems == [f"seed port {self.seed_port} listening"]
            if now > (port_deadline if port_only else deadline):
                return problems
            await pause(0.5)


def _agent_leaks(who: str, leader: int, pids: list[int], root: str) -> list[str]:
    """An agent's processes (``leader`` and its tree ``pids``) beyond its daemon and
    seed engine, and their descriptors into ``root``."""
    problems = []
    for pid in pids:
        try:
            comm = open(f"/proc/{pid}/comm").read().strip()
        except FileNotFoundError:
            continue
        if pid != leader and "seed" not in comm and "python" not in comm:
            problems.append(f"{who}process {pid} {comm}")
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith(root + "/") or link == root:
                    problems.append(f"{who}pid {pid} fd {fd} -> {link}")
        except FileNotFoundError:
            pass
    if len(pids) > 2:
        problems.append(f"{who}agent processes: {pids}")
    return problems


def _is_strace(pid: str) -> bool:
    try:
        return open(f"/proc/{pid}/comm").read().strip() == "strace" and \
            os.getppid() == int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ValueError, IndexError):
        return False


def make_tree(root: str, size_mib: int, tag: bytes) -> None:
    """A small datadir-like tree: a big ibdata1, a few tables, a sparse file, a link,
    replication files post-copy handles."""
    rnd = __import__("random").Random(tag)
    os.makedirs(os.path.join(root, "db", "sub"), exist_ok=True)
    os.makedirs(os.path.join(root, "mysql"), exist_ok=True)
    with open(os.path.join(root, "ibdata1"), "wb") as fh:
        fh.write(tag + rnd.randbytes(size_mib << 20))
    for i in range(8):
        size = rnd.choice([0, 1, 4096, 65537, 300_000])
        with open(os.path.join(root, "db" if i % 2 else "db/sub", f"t{i}.ibd"), "wb") as fh:
            fh.write(tag + rnd.randbytes(size))
    with open(os.path.join(root, "mysql", "user.MAD"), "wb") as fh:
        fh.write(tag + b" users")
    with open(os.path.join(root, "db", "sparse.ibd"), "wb") as fh:
        fh.truncate(4 << 20)
        fh.seek(1 << 20)
        fh.write(tag + rnd.randbytes(50_000))
    for name in ("auto.cnf", "master.info", "relay-log.info", "host-relay-bin.000001", "mysqld.pid"):
        with open(os.path.join(root, name), "wb") as fh:
            fh.write(tag + b" " + name.encode())
    os.symlink("db/sub", os.path.join(root, "link"))


# --- operations --------------------------------------------------------------------------------

@attrs.define
class Result:
    verdict: str  # "verified" | "failed-clean" | "BROKEN" | "not reached"
    detail: str = ""


class Operation:
    """One durable operation of the target agent: set up, start, finish, check."""

    name = ""
    #: The controller repeats the call after a crash (idempotent, not atomic operations).
    retried = False
    #: The kind of world the operation runs in (a World subclass: reliability.crashops).
    world_class: "type[World] | None" = None

    def __init__(self, world: World):
        self.world = world

    #: A name of this run that appears in paths (a seed id), replaced run by run.
    token: str | None = None
    #: The tracer of the run (stopped before a repeat: strace counts calls per thread,
    #: so an injection could otherwise hit the repeat's call too).
    tracer: "Strace | None" = None

    def prepare(self) -> None:
        self.world.reset()

    async def begin(self) -> Any:
        """Start the operation; returns what :meth:`finish` needs (a Deferred of the call)."""
        raise NotImplementedError

    async def finish(self, started: Any, crashed: bool, restarted: bool = False) -> dict:
        """The operation's end.  ``crashed``: the agent was killed under it and restarted
        (the controller repeats what it would); ``restarted``: the agent was restarted
        after the operation had ended (the same operation's end read again, nothing
        repeated)."""
        raise NotImplementedError

    def expected_new(self) -> dict:
        return self.world.new

    def is_new(self, got: dict | None) -> bool:
        """Whether ``got`` (a datadir's manifest) is the operation's new tree."""
        return got == self.expected_new()

    async def over(self, started: Any) -> bool:
        """Whether the operation has ended by itself."""
        return started["call"].called

    # The agent traced, crashed and restarted: the target's, but for the sender's crashes.

    def traced_pids(self) -> list[int]:
        return self.world.target_pids()

    def roots(self) -> tuple[tuple[str, ...], str]:
        """The file systems whose calls are points, and the StateDir among them."""
        return (self.world.fs,), self.world.state_dir

    async def restart_agent(self, tracer: "Strace | None" = None) -> None:
        """SIGKILL the traced agent (every process), start it again."""
        self.world.target_pids_before = self.world.target_pids()
        await self.world.restart_target(tracer)

    def check(self, end: dict, injected: Point | None, errno: str | None) -> Result:
        raise NotImplementedError


async def _call(daemon: Daemon, path: str, **params) -> tuple[int, Any]:
    try:
        return await daemon.get(path, **params)
    except Exception as e:  # the agent died under the call
        return 0, f"{type(e).__name__}: {e}"


class DatadirSeed(Operation):
    """Receive + promote of a datadir seed (source=datadir), the receiver traced."""

    name = "datadir_seed"
    source = "datadir"

    @property
    def sender(self) -> Daemon:
        """The sending agent."""
        return self.world.source

    def prepare(self) -> None:
        self.world.reset()
        self.world.seq += 1
        self.seed = self.token = f"qz{self.world.seq:05d}q"

    async def begin(self) -> Any:
        """receive, then send (as orchestrator does); a refusal is remembered, not raised."""
        w = self.world
        self.sent, self.refused = False, None
        code, body = await _call(w.target, f"/api/receive-mysql-seed-data/{self.seed}")
        if code != 200:
            self.refused = f"receive: {body}"
            return None
        await self.send()
        return None

    async def send(self) -> None:
        if self.source == "snapshot":
            await _call(self.sender, "/api/mountlv", lv="snap1")
        code, body = await _call(self.sender, f"/api/send-mysql-seed-data/127.0.0.1/{self.seed}",
                                 source=self.source)
        self.sent = True
        if code != 200:
            self.refused = f"send: {body}"

    async def over(self, started: Any) -> bool:
        s, r = await self.status(self.sender), await self.status(self.world.target)
        return s.get("State") in ("completed", "failed", "aborted") and \
            r.get("State") in ("completed", "failed", "aborted")

    async def status(self, daemon: Daemon) -> dict:
        code, body = await _call(daemon, f"/api/seed-status/{self.seed}")
        return body if code == 200 and isinstance(body, dict) else {}

    async def finish(self, started: Any, crashed: bool, restarted: bool = False) -> dict:
        w = self.world
        if crashed and not self.sent and not restarted:
            # The agent died under the receive call: the controller asks again, then sends.
            await _call(w.target, f"/api/receive-mysql-seed-data/{self.seed}")
            self.refused = None
            await self.send()
        if self.refused:
            await _call(w.target, f"/api/abort-seed/{self.seed}")
            if not await self.status(w.target):
                return {"refused": self.refused}
        deadline = time.monotonic() + SETTLE_TIMEOUT
        aborted = False
        end = {}
        while time.monotonic() < deadline:
            s, r = await self.status(self.sender), await self.status(w.target)
            s_end = s.get("State") in ("completed", "failed", "aborted")
            r_end = r.get("State") in ("completed", "failed", "aborted")
            if r_end and s_end:
                end = {"sender": s, "receiver": r}
                break
            if r_end and self.refused and not s:
                # The send was refused and the sender holds no such seed: the receiver's
                # end is the seed's.
                end = {"sender": {"refused": self.refused}, "receiver": r}
                break
            if s_end and s.get("State") != "completed" and not r_end and not aborted:
                await _call(w.target, f"/api/abort-seed/{self.seed}")  # as orchestrator does
                aborted = True
            if r_end and r.get("State") != "completed" and not s_end and not aborted:
                await _call(self.sender, f"/api/abort-seed/{self.seed}")
                aborted = True
            await pause(0.1)
        else:
            await _call(w.target, f"/api/abort-seed/{self.seed}")
            await _call(self.sender, f"/api/abort-seed/{self.seed}")
            end = {"timeout": True, "sender": await self.status(self.sender),
                   "receiver": await self.status(w.target)}
        if self.source == "snapshot":
            await _call(self.sender, "/api/umount")
        # The receiver removes staging after saving its end, and a restarted one settles
        # a promotion record after reporting the seed completed: give it that moment (the
        # previous datadir kept aside stays).
        for _ in range(100):
            if not [n for n in w.leftovers() if "orchagent-previous" not in n]:
                break
            await pause(0.05)
        return end

    def check(self, end: dict, injected: Point | None, errno: str | None) -> Result:
        w = self.world
        if end.get("timeout"):
            return Result("BROKEN", f"no end within {SETTLE_TIMEOUT:.0f}s: {end}")
        if "refused" in end:
            if manifest(w.datadir) != w.old or w.leftovers():
                return Result("BROKEN", f"refused ({end['refused']}) and the target changed: {w.leftovers()}")
            return Result("failed-clean", end["refused"])
        r = end["receiver"]
        state, error = r.get("State"), r.get("Error", "")
        got = manifest(w.datadir) if os.path.isdir(w.datadir) else None
        left = w.leftovers()
        if state == "completed":
            aside = [n for n in left if "orchagent-previous" in n]
            if not self.is_new(got):
                return Result("BROKEN", f"completed but the datadir is not the new tree: "
                                        f"{_diff(got, self.expected_new())}")
            if len(aside) != 1 or manifest(os.path.join(w.fs, aside[0])) != w.old:
                return Result("BROKEN", f"the old datadir is not kept whole aside: {left}")
            record = os.path.join("state", "seeds", f"{self.seed}.promotion")
            if errno and set(left) - set(aside) == {record}:
                # The completion could not be saved (the state on disk says promoting):
                # the promotion record is kept for the next start to settle forward.
                return Result("recovering", f"completed, its state not saved: {record} kept")
            if set(left) - set(aside):
                return Result("BROKEN", f"left on the target: {sorted(set(left) - set(aside))}")
            if errno and injected and injected.name in SYNC_CALLS and not injected.late:
                return Result("BROKEN", f"{injected.name} failed with {errno} yet the seed completed")
            return Result("verified")
        if state in ("failed", "aborted"):
            if not error:
                return Result("BROKEN", "failed without a message")
            if got != w.old:
                return Result("BROKEN", f"failed and the datadir is not the old tree: {_diff(got, w.old)}")
            if left:
                return Result("BROKEN", f"failed and left: {left}")
            return Result("failed-clean", error)
        return Result("BROKEN", f"receiver ended {state!r}: {r}")


class SnapshotSeed(DatadirSeed):
    """Receive + promote of a snapshot seed (copy backend on the source: mountlv, send)."""

    name = "snapshot_seed"
    source = "snapshot"


def _diff(got: dict | None, want: dict) -> str:
    if got is None:
        return "no datadir"
    d = sorted(set(got.items()) ^ set(want.items()))
    return f"{len(d)} entries differ, e.g. {d[:2]}"


class CopyRestore(Operation):
    """/api/restore-snapshot with the copy backend: a work copy, then a journaled swap."""

    name = "restore_copy"

    answers: dict = {}

    async def begin(self) -> Any:
        return {"call": defer.ensureDeferred(_call(self.world.target, "/api/restore-snapshot", lv="snap1"))}

    async def finish(self, started: Any, crashed: bool, restarted: bool = False) -> dict:
        if "answer" not in started:
            started["answer"] = await started["call"]
        code, body = started["answer"]
        if crashed:
            # The fresh agent settles the swap at its start (its recovery runs beside the
            # API, under the snapshots lock); nothing more is asked of it.
            code, body = 0, "crashed"
            await self.recovered()
        return {"code": code, "body": body}

    async def recovered(self) -> None:
        """Wait (at most SETTLE_TIMEOUT) for the restores directory to hold no record."""
        journal = os.path.join(self.world.state_dir, "restores")
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while time.monotonic() < deadline:
            if not os.path.isdir(journal) or not os.listdir(journal):
                return
            await pause(0.1)

    def check(self, end: dict, injected: Point | None, errno: str | None) -> Result:
        w = self.world
        got = manifest(w.datadir) if os.path.isdir(w.datadir) else None
        left = w.leftovers()
        replaced = [n for n in left if ".replaced-" in n]
        journal = os.path.join(w.state_dir, "restores")
        records = os.listdir(journal) if os.path.isdir(journal) else []
        others = [n for n in left if n not in replaced and n != "state"]
        if records and errno and end["code"] not in (200, 0) and all(r.endswith(".json") for r in records):
            # The swap could not be closed (its parents' fsync, its record's removal):
            # the failure is said and the record kept for the next start to settle.
            return Result("recovering", f"record kept: {records}; answered {str(end['body'])[:160]}")
        if records:
            return Result("BROKEN", f"swap records left: {records}")
        if others:
            return Result("BROKEN", f"work copies left: {others}")
        if self.is_new(got):
            if len(replaced) != 1 or manifest(os.path.join(w.fs, replaced[0])) != w.old:
                return Result("BROKEN", f"the old datadir is not kept whole: {replaced}")
            if end["code"] not in (200, 0):
                return Result("BROKEN", f"the restore answered {end} and the datadir is new")
            if errno and injected and injected.name in SYNC_CALLS and end["code"] == 200 \
                    and not injected.late:
                return Result("BROKEN", f"{injected.name} failed with {errno} yet the restore succeeded")
            return Result("verified")
        if got == w.old:
            if replaced:
                return Result("BROKEN", f"old datadir and a replaced copy: {replaced}")
            if end["code"] == 200:
                return Result("BROKEN", "the restore answered success and the datadir is old")
            return Result("failed-clean", str(end["body"])[:200])
        return Result("BROKEN", f"the datadir is neither old nor new: {_diff(got, self.expected_new())}")


class EmptyDatadir(Operation):
    """delete-mysql-datadir: not atomic by definition (the v1 call empties the directory);
    after a crash every entry left must be whole and the controller's repeat must finish."""

    name = "delete_datadir"
    path = "/api/delete-mysql-datadir"
    retried = True

    def expected_new(self) -> dict:
        return {}

    async def begin(self) -> Any:
        return {"call": defer.ensureDeferred(_call(self.world.target, self.path))}

    async def finish(self, started: Any, crashed: bool, restarted: bool = False) -> dict:
        code, body = await started["call"]
        partial = manifest(self.world.datadir)
        retry = None
        if crashed or code != 200:
            if self.tracer is not None:
                self.tracer.stop()
            retry = await _call(self.world.target, self.path)
            if retry[0] != 200:
                return {"code": code, "body": f"{body}; the repeat: {retry[1]}", "partial": partial,
                        "retry": retry}
        return {"code": code, "body": body, "partial": partial, "retry": retry}

    def check(self, end: dict, injected: Point | None, errno: str | None) -> Result:
        w = self.world
        new = self.expected_new()
        torn = [k for k, v in end["partial"].items() if w.old.get(k) != v and new.get(k) != v]
        if torn:
            return Result("BROKEN", f"entries neither old nor new after the fault: {torn[:3]}")
        got = manifest(w.datadir)
        if got != new:
            return Result("BROKEN", f"the datadir after the repeat is not the expected tree: {_diff(got, new)}; "
                                    f"answers: {str(end['body'])[:300]}")
        if end["code"] != 200 and end["code"] != 0:
            if injected and injected.match.split("\0")[0].rsplit("/", 1)[-1] not in str(end["body"]) \
                    and injected.match not in str(end["body"]):
                return Result("failed-clean", f"(file not named) {str(end['body'])[:160]}")
            return Result("failed-clean", str(end["body"])[:200])
        return Result("verified")


class PostCopy(EmptyDatadir):
    name = "post_copy"
    path = "/api/post-copy"

    def expected_new(self) -> dict:
        new = {}
        for k, v in self.world.old.items():
            if k in ("auto.cnf", "mysqld.pid", "host-relay-bin.000001"):
                continue
            if k in ("master.info", "relay-log.info"):
                new[k + ".from-source"] = v
                continue
            new[k] = v
        return new


OPERATIONS = {op.name: op for op in (DatadirSeed, CopyRestore, EmptyDatadir, PostCopy, SnapshotSeed)}


def all_operations() -> dict:
    """These operations and those of reliability.crashops (btrfs restore, backups, hot seed)."""
    from reliability import crashops
    return {**OPERATIONS, **crashops.OPERATIONS}


# --- the runner --------------------------------------------------------------------------------

@attrs.define
class Tally:
    op: str
    crash_points: int = 0
    error_points: int = 0
    crashes: int = 0
    errors: int = 0
    outcomes: dict = attrs.Factory(dict)
    approximate: int = 0
    seconds: float = 0.0
    broken: list = attrs.Factory(list)
    unnamed: int = 0

    def add(self, verdict: str) -> None:
        self.outcomes[verdict] = self.outcomes.get(verdict, 0) + 1


async def enumerate_points(world: World, op: Operation) -> tuple[list[Point], list[Point], Result]:
    op.prepare()
    prefix = os.path.join(world.base, "trace", op.name)
    shutil.rmtree(os.path.dirname(prefix), ignore_errors=True)
    os.makedirs(os.path.dirname(prefix))
    tracer = Strace(op.traced_pids(), ["-e", "trace=" + ",".join(TRACED)], prefix)
    op.tracer = tracer
    await tracer.attached()
    try:
        started = await op.begin()
        end = await op.finish(started, crashed=False)
    finally:
        tracer.stop()
    result = op.check(end, None, None)
    calls = read_trace(prefix)
    roots, state_dir = op.roots()
    return (points(calls, roots, state_dir, "crash", op.token),
            points(calls, roots, state_dir, "error", op.token), result)


async def inject(world: World, op: Operation, point: Point, errno: str | None) -> Result:
    """One run with one fault; the outcome."""
    op.prepare()
    if errno:
        spec = f"inject={point.name}:error={errno}:when={point.when}"
    else:
        spec = f"inject={point.name}:delay_enter={HOLD_US}:when={point.when}"
    filters = []
    for path in expand(point.match, op.token, time.time()):
        filters += ["-P", path]
    tracer = Strace(op.traced_pids(), ["-e", f"trace={point.name}", *filters, "-e", spec], None)
    op.tracer = tracer
    await tracer.attached()
    crashed = False
    try:
        if errno:
            started = await op.begin()
            end = await op.finish(started, crashed=False)
        else:
            beginning = defer.ensureDeferred(op.begin())
            hit = await _wait_held(world, op, point, beginning)
            if hit:
                crashed = True
                await op.restart_agent(tracer)
            started = await beginning
            end = await op.finish(started, crashed=crashed)
    finally:
        tracer.stop()
    result = op.check(end, point, errno)
    if result.verdict == "recovering":
        # A record kept after a failure said: the fresh agent must settle it.
        await op.restart_agent()
        again = op.check(await op.finish(started, crashed=True, restarted=True), point, errno)
        return Result(again.verdict if again.verdict != "recovering" else "BROKEN",
                      f"after a restart: {again.detail[:120]} ({result.detail})")
    if errno and not op.retried and result.verdict != "BROKEN":
        # The agent restarted after the failure must leave the outcome as it was.
        await op.restart_agent()
        again = op.check(await op.finish(started, crashed=True, restarted=True), point, errno)
        if again.verdict != result.verdict:
            result = Result("BROKEN", f"{result.verdict} ({result.detail[:120]}), then after a "
                                      f"restart {again.verdict}: {again.detail}")
    if not errno and not crashed and result.verdict != "BROKEN":
        result = Result("not reached", result.verdict)
    return result


async def _wait_held(world: World, op: Operation, point: Point, started: Any) -> bool:
    """Whether a thread of the target agent is held at the point (the seed or call may end
    first: the point was not reached)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    seen = None
    while time.monotonic() < deadline:
        tid = held(op.traced_pids(), point.name)
        if tid is not None and tid == seen:
            return True
        seen = tid
        if started.called and await op.over(started.result):
            return False
        await pause(0.05 if tid is None else 0.15)
    return False


def parse_points(spec: str) -> list[tuple[str, int, str | None]]:
    """``crash:53,error:96,error:97:EROFS`` -> [("crash", 53, None), ("error", 96, None), ...]:
    points chosen by their number in the enumeration (an error point without an errno gets
    the one a full run gives it: EIO, ENOSPC, EDQUOT, EROFS by number, in turn)."""
    chosen = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if len(parts) not in (2, 3) or parts[0] not in ("crash", "error") or not parts[1].isdigit() \
                or (len(parts) == 3 and (parts[0] == "crash" or parts[2] not in ERRNOS)):
            raise SystemExit(f"bad point {item!r}: crash:N, error:N or error:N:{'|'.join(ERRNOS)}")
        chosen.append((parts[0], int(parts[1]), parts[2] if len(parts) == 3 else None))
    return chosen


async def run_operation(world: World, cls, quick: bool, max_points: int | None,
                        errnos: tuple = ERRNOS, all_errnos: bool = False,
                        limits: tuple[int, int] | None = None,
                        chosen: list[tuple[str, int, str | None]] | None = None,
                        listing: bool = False) -> Tally:
    """Enumerate the operation's points, inject at each (or at a spread of them: ``quick``,
    ``max_points``, ``limits`` = (crashes, errors); or at the ``chosen`` ones, see
    :func:`parse_points`) and tally the outcomes."""
    op = cls(world)
    tally = Tally(cls.name)
    began = time.monotonic()
    crash_points, error_points, first = await enumerate_points(world, op)
    tally.crash_points, tally.error_points = len(crash_points), len(error_points)
    print(f"\n== {cls.name}: {len(crash_points)} crash points, {len(error_points)} error points "
          f"(clean run: {first.verdict} {first.detail[:80]})", flush=True)
    if listing:
        for point in crash_points + error_points:
            mark = "" if point.exact else "~"
            print(f"  {point.kind:5} #{point.number:<3}{mark} {point.shown} [when={point.when}]", flush=True)
        chosen = []
    if first.verdict == "BROKEN":
        tally.broken.append(("clean run", first.detail))
        tally.add("BROKEN")
    rotation = {p.number: errnos[i % len(errnos)] for i, p in enumerate(error_points)}
    if chosen is not None:
        crashes = {n for kind, n, _ in chosen if kind == "crash"}
        picked = {n: e for kind, n, e in chosen if kind == "error"}
        crash_points = [p for p in crash_points if p.number in crashes]
        error_points = [p for p in error_points if p.number in picked]
        rotation.update({n: e for n, e in picked.items() if e})
        missing = sorted(crashes - {p.number for p in crash_points}) + \
            sorted(set(picked) - {p.number for p in error_points})
        if missing:
            print(f"  no such points in this enumeration: {missing}", flush=True)
    elif limits:
        # The slices of tests.test_crash_points: exact points only, each reached whatever
        # the threads do (an approximate pick, restore_btrfs's mkdir of StateDir when
        # the enumeration lists 21 points, was sometimes not reached: no fault injected).
        crash_points, error_points = (_spread([p for p in points if p.exact] or points, n)
                                      for points, n in ((crash_points, limits[0]),
                                                        (error_points, limits[1])))
    elif quick:
        crash_points = _spread(crash_points, 4)
        error_points = _spread(error_points, 3)
    elif max_points:
        crash_points = _spread(crash_points, max_points)
        error_points = _spread(error_points, max_points)
    for point in crash_points:
        tally.approximate += not point.exact
        result = await _safely(world, op, point, None)
        tally.crashes += result.verdict != "not reached"
        _record(tally, point, None, result)
    for i, point in enumerate(error_points):
        if all_errnos:
            chosen_errnos = errnos
        elif chosen is not None:
            chosen_errnos = (rotation[point.number],)
        else:
            chosen_errnos = (errnos[i % len(errnos)],)
        for errno in chosen_errnos:
            result = await _safely(world, op, point, errno)
            tally.errors += 1
            _record(tally, point, errno, result)
    # What every run of the operation left behind, at its end (per run would cost the
    # seed streams' linger each time): processes, descriptors into the target's file
    # system, the seed port, mounts, tracers.
    problems = await world.leaks()
    print(f"  leaks after {cls.name}: {problems or 'none'}", flush=True)
    if problems:
        tally.add("BROKEN")
        tally.broken.append(("leaks", "; ".join(problems)))
    tally.seconds = time.monotonic() - began
    return tally


async def _safely(world: World, op: Operation, point: Point, errno: str | None) -> Result:
    try:
        return await inject(world, op, point, errno)
    except Exception as e:
        if not world.target.running():
            world.target = await world._daemon("target", world.dst_config)
        return Result("BROKEN", f"harness: {type(e).__name__}: {e}")


def _record(tally: Tally, point: Point, errno: str | None, result: Result) -> None:
    tally.add(result.verdict)
    if "(file not named)" in result.detail:
        tally.unnamed += 1
    fault = errno or "crash"
    mark = "" if point.exact else "~"
    print(f"  {result.verdict:12} {fault:7} #{point.number:<3}{mark} {point.shown[:90]} "
          f"[when={point.when}] {result.detail[:160]}", flush=True)
    if result.verdict == "BROKEN":
        tally.broken.append((f"{fault} #{point.number} {point.shown}", result.detail))


def _spread(items: list, n: int) -> list:
    if len(items) <= n:
        return items
    # Centred picks: the first and last points of a trace are the least telling (the
    # StateDir made once, the last key removed after the outcome is saved).
    return [items[int((i + 0.5) * len(items) / n)] for i in range(n)]


def table(tallies: list[Tally]) -> str:
    head = ("| operation | crash points | crashes injected | error points | errors injected | "
            "verified | failed-clean | not reached | broken | time |\n|---|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    for t in tallies:
        o = t.outcomes
        rows.append(f"| {t.op} | {t.crash_points} | {t.crashes} | {t.error_points} | {t.errors} | "
                    f"{o.get('verified', 0)} | {o.get('failed-clean', 0)} | {o.get('not reached', 0)} | "
                    f"{o.get('BROKEN', 0)} | {t.seconds:.0f} s |")
    return "\n".join(rows)


def parse(argv):
    parser = argparse.ArgumentParser(prog="python3 -m reliability.crashpoints", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default="datadir_seed,restore_copy,delete_datadir,post_copy",
                        help="comma-separated: " + ", ".join(all_operations()))
    parser.add_argument("--quick", action="store_true", help="a few points of each operation")
    parser.add_argument("--max-points", type=int, default=None, help="at most this many points of each kind")
    parser.add_argument("--errnos", default="rotate", help="rotate (one errno per point, in turn) or all")
    parser.add_argument("--points", default=None,
                        help="only these points, by their number in the enumeration: "
                             "crash:N, error:N (the errno a full run gives it) or error:N:ERRNO, "
                             "comma-separated (to re-run single points of a run)")
    parser.add_argument("--list", action="store_true",
                        help="print each operation's points (for --points) and inject none")
    parser.add_argument("--size-mib", type=int, default=3)
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


async def main(argv) -> int:
    args = parse(argv)
    names = args.ops.split(",")
    operations = all_operations()
    unknown = [n for n in names if n not in operations]
    if unknown:
        raise SystemExit(f"unknown operations: {unknown}")
    chosen = parse_points(args.points) if args.points else None
    if os.geteuid() != 0:
        raise SystemExit("the crash-point enumerator needs root (strace, loop devices, mounts)")
    base = tempfile.mkdtemp(prefix="orchagent-crashpoints-")
    os.chmod(base, 0o755)
    tallies: list[Tally] = []
    started = time.monotonic()
    world = None
    try:
        for name in names:
            cls = operations[name]
            kind = cls.world_class or World
            if type(world) is not kind:
                # Each kind of world in turn (an ext4 target, a btrfs one, one with MariaDB).
                if world is not None:
                    await world.stop()
                directory = os.path.join(base, f"w{len(tallies)}")
                os.makedirs(directory, mode=0o755)
                world = kind(directory, args.size_mib)
                await world.start()
            tally = await run_operation(world, cls, args.quick, args.max_points,
                                        all_errnos=args.errnos == "all",
                                        chosen=chosen, listing=args.list)
            tallies.append(tally)
    finally:
        if world is not None:
            await world.stop()
        shutil.rmtree(base, ignore_errors=True)
    print()
    print(table(tallies))
    total_faults = sum(t.crashes + t.errors for t in tallies)
    broken = sum(t.outcomes.get("BROKEN", 0) for t in tallies)
    print(f"\n{total_faults} faults injected, {broken} broken, {time.monotonic() - started:.0f} s")
    for t in tallies:
        for where, detail in t.broken:
            print(f"BROKEN {t.op} {where}: {detail}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([attrs.asdict(t) for t in tallies], fh, indent=2)
    return 1 if broken else 0


if __name__ == "__main__":
    code = []
    task.react(lambda r: defer.ensureDeferred(main(sys.argv[1:])).addCallback(code.append))
    sys.exit(code[0] if code else 1)
