"""``python -m reliability.run --cases all --repeat N --seed S [--json FILE]``

Runs every chosen fault case N times against one World (two real agents in two network
namespaces), prints one line per run and a summary, and exits 1 if any run broke the
invariant (see reliability.matrix).  Needs root.  Everything made is removed at the end,
also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time

from twisted.internet import defer, task

from reliability import matrix


def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m reliability.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="all", help="comma-separated case names, or all: "
                        + ", ".join(matrix.CASES))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=None, help="random seed (timing, sizes)")
    parser.add_argument("--size-mib", type=int, default=40, help="size of the big file in the tree")
    parser.add_argument("--json", default=None, help="write the results here")
    return parser.parse_args(argv)


async def main(reactor, argv) -> None:
    args = parse(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    names = list(matrix.CASES) if args.cases == "all" else args.cases.split(",")
    unknown = [n for n in names if n not in matrix.CASES]
    if unknown:
        raise SystemExit(f"unknown cases: {unknown}")
    if os.geteuid() != 0:
        raise SystemExit("the fault matrix needs root (namespaces, loop devices, mounts)")
    rnd = random.Random(seed)
    base = matrix.base_dir()
    world = matrix.World(base, rnd, args.size_mib)
    results = []
    started = time.monotonic()
    print(f"fault matrix: seed {seed}, cases {', '.join(names)}, repeat {args.repeat}", flush=True)
    try:
        await world.start()
        order = [(n, i) for i in range(args.repeat) for n in names]
        for name, i in order:
            outcome = await matrix.run_case_safely(world, name, i)
            results.append(outcome)
            print(f"{outcome.verdict:13} {name:18} run {i} fault@{outcome.fault_at:<10} "
                  f"{outcome.seconds:5.1f}s {outcome.detail[:300]}", flush=True)
    finally:
        await world.stop()
        shutil.rmtree(base, ignore_errors=True)
    summary = matrix.summarize(results, seed, time.monotonic() - started)
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"summary": summary, "runs": [vars(r) if not hasattr(r, "__attrs_attrs__") else
                                                    {a.name: getattr(r, a.name) for a in r.__attrs_attrs__}
                                                    for r in results]}, fh, indent=2)
    if summary["broken"]:
        raise SystemExit(1)


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, sys.argv[1:])))
