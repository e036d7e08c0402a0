"""Bytes per file of what each side of a seed keeps, by structure, in process:
``python3 bench/seed_memory.py --files 200000 1000000``.

No daemon, no disk: the sender's structures are built as its walk builds them (the
manifest a walk batch at a time, the pins, the packed batches it keeps for a resend, the
chunk plan, the pins packed for a restart, the file digests of the end), the receiver's
from the sender's packed batches (read one by one, checked, the chunk plan, the chunk
list of READY, the file digests).  Python's allocator is traced (tracemalloc): for each
step, the bytes its result holds (``kept``; the agent holds all of them but the pins
packed, the chunk list and the file digests, which are written out and dropped) and its
peak over what was held before it (``peak``), per file.  The tree is many small files,
1000 per directory, named like a many-table datadir's (``db0001/t0001234.ibd``); every
file is one chunk.  The names and inodes are regular, so the packed forms are smaller
than a real tree's.  Only the interpreter's heap is counted: a real agent adds its code
and libraries (about 40 MB per process, see BENCHMARKS.md) and what the allocator does
not give back after a peak.  It runs against an older checkout too (copied into its
bench/), for figures before and after a change.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orchagent.seed import plan, tree  # noqa: E402


def rows(count: int, per_dir: int = 1000):
    """The walk's rows (wire form) of ``count`` files, ``per_dir`` to a directory."""
    batch = []
    for i in range(count):
        if i % per_dir == 0:
            batch.append([f"db{i // per_dir:04d}", tree.DIR, 0, 0o750, 1_700_000_000_000_000_000,
                          "mysql", "mysql", 27, 27, "", None])
        batch.append([f"db{i // per_dir:04d}/t{i:07d}.ibd", tree.FILE, 4096, 0o640,
                      1_700_000_000_000_000_000 + i, "mysql", "mysql", 27, 27, "", None])
        if len(batch) >= tree.WALK_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


class Steps:
    def __init__(self, files: int):
        self.files = files
        self.lines = []

    def run(self, name: str, fn):
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = fn()
        gc.collect()
        now, peak = tracemalloc.get_traced_memory()
        self.lines.append((name, (now - before) / self.files, (peak - before) / self.files))
        return result


def sender_side(files: int, steps: Steps) -> tuple[list[bytes], tuple]:
    """The sender's structures; its packed batches and what MANIFEST_END says of them."""

    def walk():
        manifest = tree.Manifest()
        for batch in rows(files):
            manifest.add_wire_many(batch)
        return manifest

    def pin():
        pins = tree.Pins()
        for index in range(len(manifest)):
            pins.devices.append(2049)
            pins.inodes.append(1000 + index)
            pins.ctimes.append(manifest.mtimes[index])
        return pins

    def pack():
        packer = tree.ManifestPacker(manifest)
        batches = packer.pack_new(tree.WALK_BATCH)
        packer.finish()
        return batches

    manifest = steps.run("manifest (walk)", walk)
    pins = steps.run("pins", pin)
    batches = steps.run("manifest packed (kept for a resend)", pack)
    table = steps.run("chunk table", lambda: plan.ChunkTable(manifest))
    steps.run("pins packed for a restart", lambda: pins.pack(manifest))
    steps.run("file digests (FINISH)", lambda: list(table.digest_pieces())
              if hasattr(table, "digest_pieces") else table.file_digests())
    return batches, (manifest.chunk_size, len(manifest), manifest.wire_digest.hex())


def receiver_side(batches: list[bytes], end: tuple, steps: Steps) -> None:
    def read():
        reader = tree.ManifestReader()
        for body in batches:
            reader.feed(body)
        return reader

    reader = steps.run("manifest read from the batches", read)
    manifest = steps.run("manifest checked (finish, validate)", lambda: reader.finish(*end))
    reader.manifest = None
    table = steps.run("chunk table", lambda: plan.ChunkTable(manifest))
    steps.run("chunk list (READY)", table.done_records)
    for cid in range(len(table)):
        table.mark_done(cid, b"\1" * 32)
    if hasattr(table, "digest_pieces"):
        pieces = list(table.digest_pieces())
        theirs = bytearray()
    else:  # an older checkout: bytes, and the frames cut from them whole
        whole = table.file_digests()
        pieces = [whole[at:at + 3_600_000] for at in range(0, len(whole), 3_600_000)]
        theirs = b""
        del whole

    def arrive():
        nonlocal theirs
        for piece in pieces:
            theirs += piece
        return theirs

    steps.run("the sender's file digests (DIGESTS)", arrive)
    pieces.clear()  # the sender let go of them
    if hasattr(table, "check_digests"):
        steps.run("file digests checked (end)", lambda: table.check_digests(theirs))
    else:
        steps.run("file digests checked (end)",
                  lambda: (table.file_digests() == theirs, table.tree_digest(theirs)))


def measure(files: int) -> list[tuple[str, str, float, float]]:
    tracemalloc.start()
    sender, receiver = Steps(files), Steps(files)
    batches, end = sender_side(files, sender)
    receiver_side(batches, end, receiver)
    tracemalloc.stop()
    return [("sender", *line) for line in sender.lines] + [("receiver", *line) for line in receiver.lines]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, nargs="+", default=[200_000, 1_000_000])
    args = parser.parse_args()
    for files in args.files:
        print(f"{files} files: bytes per file (kept / peak while it runs)")
        for side, name, kept, peak in measure(files):
            print(f"  {side:8} {name:42} {kept:8.1f} {peak:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
