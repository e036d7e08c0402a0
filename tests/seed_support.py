"""Helpers for the seed tests: two real SeedManagers on loopback, trees to seed."""

from __future__ import annotations

import os
import random
import socket

from twisted.internet import reactor, task

from orchagent import config as config_module
from orchagent.seed.manager import SeedManager
from orchagent.snapshots.model import Mount


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Host:
    """The one host fact a seed needs: where the datadir is."""

    def __init__(self, datadir: str):
        self.path = datadir

    async def datadir(self) -> str:
        return self.path


class Service:
    def __init__(self, running: bool = False):
        self.running = running

    async def is_running(self) -> bool:
        return self.running


class Snapshots:
    def __init__(self, path: str, mounted: bool = True):
        self.mount = Mount(path="/mnt/snap", is_mounted=mounted, mysql_data_path=path)

    async def mount_state(self) -> Mount:
        return self.mount


def make_manager(test, base: str, datadir: str, port: int, start: bool = True,
                 snapshot: str | None = None, chunk_size: int | None = None, **overrides):
    os.makedirs(base, exist_ok=True)
    values = {"state_dir": os.path.join(base, "state"), "seed_transfer_port": port}
    values.update(overrides)
    config = config_module.Config(**values)
    kwargs = {} if chunk_size is None else {"chunk_size": chunk_size}
    manager = SeedManager(config, reactor, None, Host(datadir), Service(),
                          Snapshots(snapshot or datadir), **kwargs)
    if start:
        manager.startService()
        test.addCleanup(lambda: manager.stopService() if manager.running else None)
    return manager


def slow_walk(test, batch: int, pause: float) -> None:
    """Make a source walk take a while: ``batch`` entries a batch of the manifest, the
    walk's worker thread waiting ``pause`` seconds before packing each."""
    import time

    from orchagent.seed import tree

    test.patch(tree, "WALK_BATCH", batch)
    pack_new = tree.ManifestPacker.pack_new

    def slowly(packer, size=4096):
        time.sleep(pause)
        return pack_new(packer, size)

    test.patch(tree.ManifestPacker, "pack_new", slowly)


async def wait_for(predicate, timeout: float = 30.0, step: float = 0.02):
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
        await task.deferLater(reactor, step, lambda: None)


async def finished(manager: SeedManager, seed: str, timeout: float = 30.0) -> dict:
    await wait_for(lambda: seed in manager.records and manager.records[seed].terminal, timeout)
    return await manager.status(seed)


def make_tree(root: str, seed: int = 1, files: int = 12, max_size: int = 300_000) -> None:
    """A datadir-like tree: nested dirs, sizes around chunk boundaries, empty and sparse
    files, a symlink, odd modes."""
    rnd = random.Random(seed)
    os.makedirs(os.path.join(root, "db1", "sub"), exist_ok=True)
    os.makedirs(os.path.join(root, "empty_dir"), exist_ok=True)
    for i in range(files):
        where = rnd.choice(["", "db1", "db1/sub"])
        size = rnd.choice([0, 1, 4095, 4096, 65536, 65537, rnd.randrange(max_size)])
        half = os.urandom(size // 2) + bytes(size - size // 2)
        with open(os.path.join(root, where, f"f{i}.ibd"), "wb") as fh:
            fh.write(half)
    with open(os.path.join(root, "db1", "sparse.ibd"), "wb") as fh:
        fh.truncate(1 << 20)
        fh.seek(300_000)
        fh.write(os.urandom(70_000))
    with open(os.path.join(root, "hole_only"), "wb") as fh:
        fh.truncate(200_000)
    os.chmod(os.path.join(root, "db1", "sparse.ibd"), 0o600)
    os.chmod(os.path.join(root, "db1"), 0o750)
    os.symlink("db1/sub", os.path.join(root, "link_in"))


def snapshot_tree(root: str) -> dict:
    """Everything a seed must reproduce: per path (type, mode, size, mtime, bytes/target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if os.path.islink(path):
                out[rel] = ("l", os.readlink(path), st.st_mtime_ns)
            elif os.path.isdir(path):
                out[rel] = ("d", st.st_mode, st.st_mtime_ns, st.st_uid)
            else:
                with open(path, "rb") as fh:
                    data = fh.read()
                out[rel] = ("f", st.st_mode, st.st_size, st.st_mtime_ns, st.st_uid, data)
    return out
