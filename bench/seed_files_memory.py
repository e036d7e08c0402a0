"""Peak memory of both agents for a seed of many tiny files, code trees side by side:
``sudo python3 bench/seed_files_memory.py --files 200000 1000000 --tree . --tree /path/to/old``.

Each round seeds the same source (``--files`` files of ``--size`` bytes, 1000 to a
directory) once with the agents of each ``--tree`` (a checkout of orchagent, e.g. a ``git
worktree`` of an older commit), alternating the order every round, into a fresh ext4 made
with one inode per 4 KiB (the default, one per 16 KiB, runs out first), with
:mod:`seed_bench`'s agents and measures: peak PSS of each agent's daemon and seed engine
summed (sampled every 50 ms), their peak RSS summed, and the seed's time.  Source data
lives under ``--dir`` and is removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import seed_bench  # noqa: E402


def make_tiny(root: str, count: int, size: int) -> None:
    data = os.urandom(size)
    for i in range(count):
        directory = os.path.join(root, f"db{i // 1000:04d}")
        if i % 1000 == 0:
            os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"t{i:07d}.ibd"), "wb") as fh:
            fh.write(data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/var/tmp/orchagent-files-bench")
    parser.add_argument("--files", type=int, nargs="+", default=[200_000])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tree", action="append", help="orchagent checkout to run (repeatable)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    trees = [os.path.abspath(t) for t in (args.tree or [seed_bench.REPO])]
    try:
        for count in args.files:
            src = os.path.join(args.dir, f"src-{count}")
            if not os.path.isdir(src):
                make_tiny(src + ".part", count, args.size)
                os.rename(src + ".part", src)
            # The target's free-space check asks for whole blocks and 1.5 KiB per entry.
            blocks = -(-args.size // 4096) * 4096
            image_size = int(count * (blocks + 1536) * 1.3) + (512 << 20)
            for round_ in range(args.rounds):
                order = trees if round_ % 2 == 0 else trees[::-1]
                for tree in order:
                    seed_bench.REPO = tree
                    target = seed_bench.FreshTarget(os.path.join(args.dir, "target"),
                                                    os.path.join(args.dir, "target.img"), image_size,
                                                    mkfs_options=("-i", "4096"))  # tiny files
                    with target as dst:
                        r = seed_bench.run_orchagent(os.path.join(args.dir, "work"), src, dst,
                                                     target="127.0.0.1")
                    print(f"{count} files, {tree}: {r['seconds']:.1f}s, peak PSS receiver "
                          f"{r['pss_receiver']:.0f} MB / sender {r['pss_sender']:.0f} MB, peak RSS "
                          f"summed {r['rss_receiver']:.0f} / {r['rss_sender']:.0f} MB", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
