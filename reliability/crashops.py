"""The operations of the crash-point enumerator (:mod:`reliability.crashpoints`) that need a
world of their own: a btrfs target, a real MariaDB and a real mariabackup backup.

* **restore_btrfs**: ``/api/restore-snapshot`` with the btrfs backend.  The target's file
  system is a btrfs on a loop file; the datadir is a subvolume, ``snap1`` a read-only
  snapshot subvolume in SnapshotDirectory on the same file system.  Invariant: the datadir
  is exactly the old tree or exactly the snapshot's, the old one kept whole as
  ``<datadir>.replaced-<time>`` when the new one is in, no work subvolume or swap record
  left once the next start has settled it.
* **backup_mount**: ``mountlv`` of a mariabackup backup in BackupDirectories (a real
  ``mariabackup --backup`` of a real MariaDB, made once per world): the agent copies it
  under StateDir (a full copy: the target's file system is ext4, no reflinks), prepares,
  checks every page and bind-mounts it read-only; then ``umount``.  After a crash the
  agent is restarted and the controller's calls repeated (``umount``, ``mountlv``).
  Invariant: the backup directory's files exactly as before (contents, modes, mtimes);
  the mount, once answered, is read-only and holds the prepared backup; a failed
  ``mountlv`` leaves no work copy and no mount; after ``umount`` nothing is left.
* **restore_backup**: ``/api/restore-snapshot`` naming that backup: a prepared copy beside
  the datadir, then the journaled swap.  Invariant: the backup unchanged, the datadir
  exactly the old tree or exactly the prepared backup (contents and modes: the prepare
  rewrites files, so mtimes differ run to run), no work copy left.
* **hot_seed**: ``send-mysql-seed-data?source=hot``: the source agent streams
  ``mariabackup --backup --stream=xbstream`` of its running MariaDB; the target (traced)
  extracts it with ``mbstream`` into staging, prepares it there and promotes it.
  Invariant as for datadir_seed: the datadir exactly the old tree or the new one (a hot
  backup's contents differ from run to run: the new tree is the clean run's names,
  types and modes), staging gone, the seed completed or failed with a message.
  A streamed hot seed is not resumable (README): a target crash fails it on both sides.
* **sender_seed**: a datadir seed with the crashes and errors on the sending side: the
  source agent traced on its StateDir (the pins of the files it sends, its seed states),
  killed at each point and started again, then the same seed sent again as
  ``orchagent seed --resume`` does; the target checked as for datadir_seed.
* **early_seed**: a datadir seed whose source holds :data:`EARLY_FILES` small files
  besides the usual tree, so that the receiver is sent files while the sender still
  walks (orchagent.seed.early): the points of the files written early, of the staging an
  attempt lost before MANIFEST_END left (emptied by the next attempt), of the settling
  at MANIFEST_END.  Checked as for datadir_seed; the clean run must have sent files
  early (else the operation would test nothing of it).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import tempfile
from typing import Any

import attrs
from twisted.internet import defer

from orchagent.config import FIELDS
from orchagent.snapshots import mountinfo
from reliability.crashpoints import (SYNC_CALLS, CopyRestore, DatadirSeed, Operation, Point, Result,
                                     World, _call, _diff, manifest, tree)
from reliability.matrix import sh

BACKUP = "full1"
#: orchagent.backups.prepare.Preparer.reflinks's probe file, in the directory it tries.
PROBE = ".orchagent-reflink-probe"
_KEY = {f.attr: f.key for f in FIELDS}


def shape(found: dict | None, sizes: bool = True) -> dict | None:
    """A manifest without mtimes (and without sizes and hashes when ``sizes`` is false)."""
    if found is None:
        return None
    out = {}
    for name, entry in found.items():
        if entry[0] == "f":
            out[name] = entry[:3] + entry[4:] if sizes else entry[:2]
        else:
            out[name] = entry
    return out


# --- worlds ------------------------------------------------------------------------------------

class BtrfsWorld(World):
    """The target's file system a btrfs; the datadir a subvolume, snap1 a read-only one."""

    def target_fs(self) -> str:
        return self._mount("fs", "btrfs", max(256, self.size_mib * 6 + 64))

    def make_snapshot(self, tree: str, path: str) -> None:
        sh("btrfs", "subvolume", "create", path)
        sh("cp", "-a", "-T", tree, path)
        sh("btrfs", "property", "set", "-ts", path, "ro", "true")

    async def more_fixtures(self) -> None:
        self.dst_config["SnapshotBackend"] = "btrfs"

    def make_datadir(self) -> None:
        sh("btrfs", "subvolume", "create", self.datadir)

    def remove_entry(self, path: str) -> None:
        if os.path.isdir(path) and not os.path.islink(path) and os.lstat(path).st_ino == 256:
            sh("btrfs", "subvolume", "delete", path)
        else:
            super().remove_entry(path)


class _Cleanups:
    """What tests.support.mariadb wants of a test case: addCleanup (into the world's)."""

    def __init__(self, world: World):
        self.world = world

    def addCleanup(self, function, *args, **kwargs):
        self.world.cleanups.append(lambda: function(*args, **kwargs))


class MariaWorld(World):
    """An ext4 target with room for a backup and its copies, a running MariaDB (the hot
    seed's source, behind a third agent) and a mariabackup backup of it in the target's
    BackupDirectories (``backups/full1``)."""

    FIXTURES = World.FIXTURES | {"backups"}

    def target_fs(self) -> str:
        return self._mount("fs", "ext4", 448)

    async def more_fixtures(self) -> None:
        from tests.support.mariadb import MariaDB

        self.db = MariaDB.create(_Cleanups(self))
        self.db.sql("CREATE DATABASE bk")
        self.db.sql("CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(40)) ENGINE=InnoDB; "
                    "INSERT INTO t SELECT seq, MD5(seq) FROM seq_1_to_3000; "
                    "CREATE TABLE a (id INT PRIMARY KEY, v VARCHAR(40)) ENGINE=Aria; "
                    "INSERT INTO a SELECT seq, MD5(seq) FROM seq_1_to_300", "bk")
        self.backups = os.path.join(self.fs, "backups")
        os.makedirs(self.backups)
        self.backup = os.path.join(self.backups, BACKUP)
        result = subprocess.run(["mariabackup", f"--defaults-file={self.db.option_file}", "--backup",
                                 f"--target-dir={self.backup}"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, timeout=300)
        if result.returncode:
            raise RuntimeError("mariabackup --backup failed: " + result.stdout.decode(errors="replace")[-2000:])
        self.backup_files = manifest(self.backup)
        # The prepared backup, as the agent's copies must hold it (modes and contents).
        scratch = tempfile.mkdtemp(prefix="prepared-", dir=self.base)
        prepared = os.path.join(scratch, "data")
        sh("cp", "-a", "-T", self.backup, prepared)
        sh("mariabackup", f"--defaults-file={os.path.join(prepared, 'backup-my.cnf')}", "--prepare",
           f"--target-dir={prepared}")
        self.prepared = shape(manifest(prepared))
        shutil.rmtree(scratch)
        self.dst_config["BackupDirectories"] = [self.backups]
        self.dst_config["CommandTimeoutSeconds"] = 120
        hot_config = {_KEY[k]: v for k, v in self.db.agent_settings().items()}
        hot_config.update(TokenFile=self.token, SeedTransferPort=self.seed_port, SnapshotBackend="copy",
                          CommandTimeoutSeconds=120, SeedCompression="none")
        self.hot = await self._daemon("hot", hot_config)

    def reset(self, with_old: bool = True) -> None:
        mnt = os.path.join(self.fs, "mnt")
        if mountinfo.at(mountinfo.read(), mnt) is not None:
            sh("umount", mnt)
        shutil.rmtree(os.path.join(self.state_dir, "backups"), ignore_errors=True)
        super().reset(with_old)

    async def stop(self) -> None:
        hot = getattr(self, "hot", None)
        if hot is not None:
            await hot.stop()
        await super().stop()

    def backup_changed(self) -> str | None:
        """How the backup directory differs from what it held at the start, or None."""
        now = manifest(self.backup)
        if now == self.backup_files:
            return None
        return f"the backup {BACKUP} changed: {_diff(now, self.backup_files)}"


# --- operations --------------------------------------------------------------------------------

class BtrfsRestore(CopyRestore):
    """/api/restore-snapshot with the btrfs backend: a writable snapshot of snap1 beside the
    datadir subvolume, then the journaled swap of the two subvolumes."""

    name = "restore_btrfs"
    world_class = BtrfsWorld


class BackupRestore(CopyRestore):
    """/api/restore-snapshot of a mariabackup backup: a prepared copy, then the swap."""

    name = "restore_backup"
    world_class = MariaWorld

    async def begin(self) -> Any:
        return {"call": defer.ensureDeferred(_call(self.world.target, "/api/restore-snapshot", lv=BACKUP))}

    def expected_new(self) -> dict:
        return self.world.prepared

    def is_new(self, got: dict | None) -> bool:
        return shape(got) == self.world.prepared

    def check(self, end: dict, injected: Point | None, errno: str | None) -> Result:
        changed = self.world.backup_changed()
        if changed:
            return Result("BROKEN", changed)
        probe = os.path.join(self.world.fs, PROBE)
        if end["body"] == "crashed" and os.path.lexists(probe):
            # Killed between the reflink probe's cp and its rm: an empty file beside the
            # datadir, replaced and removed by the next restore's (or mountlv's) probe
            # there; not a work copy.  Counted, then removed as the next probe would.
            os.unlink(probe)
            result = super().check(end, injected, errno)
            return attrs.evolve(result, detail=f"{result.detail} (the reflink probe left: "
                                               "removed by the next probe)")
        return super().check(end, injected, errno)


class BackupMount(Operation):
    """mountlv of a backup (a prepared, checked work copy under StateDir, mounted
    read-only), then umount.  After a crash the controller calls umount, then mountlv
    again."""

    name = "backup_mount"
    world_class = MariaWorld
    retried = True

    @property
    def mount_point(self) -> str:
        return os.path.join(self.world.fs, "mnt")

    @property
    def work_root(self) -> str:
        return os.path.join(self.world.state_dir, "backups")

    def expected_new(self) -> dict:
        return self.world.prepared

    async def begin(self) -> Any:
        return {"call": defer.ensureDeferred(self.sequence())}

    async def sequence(self) -> dict:
        """mountlv, what it left, umount, what that left."""
        code, body = await _call(self.world.target, "/api/mountlv", lv=BACKUP)
        end = self.seen(code, body)
        await self.unmount(end)
        return end

    def mounted(self) -> tuple[bool, bool]:
        """(something mounted on the mount point, read-only)"""
        entry = mountinfo.at(mountinfo.read(), self.mount_point)
        return entry is not None, bool(entry is not None and entry.read_only)

    def stray(self) -> list[str]:
        """Leftovers, but the work copy of a mounted backup and its record."""
        own = os.path.relpath(os.path.join(self.work_root, f"mounted-{BACKUP}"), self.world.fs)
        return [n for n in self.world.leftovers() if not n.startswith(own + "/")]

    def work(self) -> list[str]:
        return sorted(os.listdir(self.work_root)) if os.path.isdir(self.work_root) else []

    def seen(self, code: int, body: Any) -> dict:
        mounted, read_only = self.mounted()
        return {"code": code, "body": body, "mounted": mounted, "read_only": read_only,
                "stray": self.stray(), "datadir": manifest(self.world.datadir),
                "contents": shape(manifest(self.mount_point)) if mounted else None,
                "work": self.work()}

    async def unmount(self, end: dict) -> None:
        ucode, ubody = await _call(self.world.target, "/api/umount")
        if ucode != 200:
            # A failed umount said: the controller asks again (the tracer stopped first:
            # strace counts per thread, the repeat's call could be hit too).
            if self.tracer is not None:
                self.tracer.stop()
            again = await _call(self.world.target, "/api/umount")
            ubody = f"{ubody}; the repeat: {again}"
            ucode = again[0]
        end["umount"] = (ucode, str(ubody)[:300])
        end["after_umount"] = {"mounted": self.mounted()[0], "stray": self.world.leftovers(),
                               "work": self.work()}

    async def finish(self, started: Any, crashed: bool, restarted: bool = False) -> dict:
        end = await started["call"]
        if crashed:
            if self.tracer is not None:
                self.tracer.stop()
            # The controller after a crash: clean up the failed attempt, then again.
            await _call(self.world.target, "/api/umount")
            code, body = await _call(self.world.target, "/api/mountlv", lv=BACKUP)
            end = self.seen(code, f"{body} (after the crash: {str(end['body'])[:80]})")
            await self.unmount(end)
        return end

    def check(self, end: dict, injected: Point | None, errno: str | None) -> Result:
        w = self.world
        changed = w.backup_changed()
        if changed:
            return Result("BROKEN", changed)
        if end["datadir"] != w.old:
            return Result("BROKEN", f"mountlv changed the datadir: {_diff(end['datadir'], w.old)}")
        after = end["after_umount"]
        if after["mounted"] or after["stray"] or after["work"]:
            return Result("BROKEN", f"left after umount (answered {end['umount']}): {after}")
        if end["code"] == 200:
            if not end["mounted"] or not end["read_only"]:
                return Result("BROKEN", f"mountlv answered success, mounted={end['mounted']} "
                                        f"read-only={end['read_only']}")
            if end["contents"] != w.prepared:
                return Result("BROKEN", f"the mounted copy is not the prepared backup: "
                                        f"{_diff(end['contents'], w.prepared)}")
            if end["stray"]:
                return Result("BROKEN", f"mounted, and left: {end['stray']}")
            if errno and injected and injected.name in SYNC_CALLS:
                return Result("BROKEN", f"{injected.name} failed with {errno} yet mountlv succeeded")
            return Result("verified")
        # A work copy whose removal failed too (the injected error hits each new process,
        # the ``rm`` after the ``cp``) stays, recorded, said in the answer: the umount
        # above removed it, checked before.
        recorded = "mounted.json" in end["work"] and "could not be removed" in str(end["body"])
        left = [n for n in end["work"] if n not in ("mounted.json", *([f"mounted-{BACKUP}"] if recorded else []))]
        if end["mounted"] or end["stray"] or left:
            return Result("BROKEN", f"mountlv failed ({str(end['body'])[:120]}) and left: mounted="
                                    f"{end['mounted']} {end['stray']} {end['work']}")
        return Result("failed-clean", str(end["body"])[:200])


class HotSeed(DatadirSeed):
    """A streamed hot seed into the traced target: mbstream into staging, prepare there,
    promote."""

    name = "hot_seed"
    source = "hot"
    world_class = MariaWorld

    @property
    def sender(self):
        return self.world.hot

    def expected_new(self) -> dict:
        return getattr(self.world, "hot_new", {})

    def is_new(self, got: dict | None) -> bool:
        if got is None:
            return False
        if not hasattr(self.world, "hot_new"):
            # The clean run, which the enumeration makes first: a prepared backup of the
            # source holding its tables; later runs must give the same names, types, modes.
            if not {"ibdata1", "bk/t.ibd", "bk/a.MAD", "mysql/global_priv.MAD"} <= set(got):
                return False
            self.world.hot_new = shape(got, sizes=False)
        return shape(got, sizes=False) == self.world.hot_new

    def check(self, end: dict, injected: Point | None, errno: str | None) -> Result:
        result = super().check(end, injected, errno)
        if result.verdict == "verified":
            damage = self.damage()
            if damage:
                return Result("BROKEN", f"completed, and the new datadir's bytes are damaged: {damage}")
        return result

    def damage(self) -> str:
        """What is wrong with the bytes of the promoted datadir (which differ run to run,
        so they are checked, not compared): every page checksum of every InnoDB file
        (innochecksum, the doublewrite buffer left out as the product's verify does) and
        every Aria table as a clean shutdown leaves it (aria_chk --check --read-only)."""
        from orchagent.backups.prepare import innodb_files
        from orchagent.backups.tools import aria_tables

        data = self.world.datadir
        for path, first, last in innodb_files(data):
            argv = ["innochecksum", *(["-s", str(first)] if first else []),
                    *(["-e", str(last)] if last is not None else []), path]
            result = subprocess.run(argv, capture_output=True, text=True)
            if result.returncode:
                return f"{' '.join(argv)}: {(result.stdout + result.stderr).strip()[-200:]}"
        tables = aria_tables(data)
        result = subprocess.run(["aria_chk", "--check", "--read-only", "--silent", f"--datadir={data}",
                                 *(os.path.join(data, t) for t in tables)], capture_output=True, text=True)
        if tables and (result.returncode or result.stderr.strip()):
            return f"aria_chk: {result.stderr.strip()[-200:]}"
        return ""


class SenderCrash(DatadirSeed):
    """A datadir seed with the faults on the sending side: the source agent (daemon, seed
    engine) traced on its StateDir (pins, states), killed at a point and started again,
    then the seed sent again, as ``orchagent seed --resume`` does.  The target is checked
    as for datadir_seed."""

    name = "sender_seed"

    @property
    def state(self) -> str:
        return self.world.source.config["StateDir"]

    def traced_pids(self) -> list[int]:
        return tree(self.world.source.pid)

    def roots(self) -> tuple[tuple[str, ...], str]:
        return (self.state,), self.state

    async def restart_agent(self, tracer=None) -> None:
        w = self.world
        await w.kill(w.source, tree(w.source.pid), tracer)
        w.source = await w._daemon("source", w.src_config)

    def check(self, end: dict, injected: Point | None, errno: str | None) -> Result:
        # A failed fsync of the sender's own state (pins, seed state) loses none of the
        # seed's data: the target checks every byte and syncs its own; a seed that goes
        # on to complete is verified like any other.
        if injected is not None and injected.name in SYNC_CALLS:
            injected = None
        return super().check(end, injected, errno)

    async def finish(self, started: Any, crashed: bool, restarted: bool = False) -> dict:
        if crashed and not restarted:
            # The controller's resume: the same seed sent again by the fresh source agent.
            self.refused = None
            await self.send()
        return await super().finish(started, crashed=False, restarted=restarted)


#: Small files besides the usual tree in early_seed's source: a walk long enough that
#: the receiver is sent some before it ends, even with the target traced.
EARLY_FILES = 20_000


class ManyFilesWorld(World):
    """The source holds EARLY_FILES small files in 20 directories; the target's ext4 has
    room and inodes for them three times over (a snapshot, staging, a datadir)."""

    def make_source(self, root: str) -> None:
        super().make_source(root)
        rnd = random.Random(20)
        for i in range(EARLY_FILES):
            where = os.path.join(root, f"tables{i % 20:02d}")
            os.makedirs(where, exist_ok=True)
            with open(os.path.join(where, f"t{i:05d}.frm"), "wb") as fh:
                fh.write(b"new" + rnd.randbytes(rnd.randrange(100, 1500)))

    def target_fs(self) -> str:
        return self._mount("fs", "ext4", self.size_mib * 6 + 400, ("-i", "4096"))


class EarlySeed(DatadirSeed):
    """A datadir seed of many small files: some are sent while the sender still walks."""

    name = "early_seed"
    world_class = ManyFilesWorld

    def check(self, end: dict, injected: Point | None, errno: str | None) -> Result:
        result = super().check(end, injected, errno)
        if injected is None and result.verdict == "verified":
            found = re.findall(rf"seed {self.seed}: ready for \d+ bytes in \d+ files \((\d+) bytes already here\)",
                               self.world.target.output())
            if not found or not int(found[-1]):
                return Result("BROKEN", "no file was sent early: the operation tests nothing of early data")
        return result


class SenderSnapshotCrash(SenderCrash):
    """sender_seed from a snapshot: the source's copy snapshot mounted (``mountlv``) and
    sent; after the source agent's crash the mount is still there (kernel state), the
    controller's ``mountlv`` again is answered as it may be, and the restarted send's
    walk must find the files the first one saw."""

    name = "sender_snapshot_seed"
    source = "snapshot"


OPERATIONS = {op.name: op for op in (BtrfsRestore, BackupMount, BackupRestore, HotSeed, SenderCrash,
                                     SenderSnapshotCrash, EarlySeed)}
