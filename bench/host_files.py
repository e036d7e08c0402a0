"""Host file work: ``python bench/host_files.py [--files N]``.

(a) :func:`orchagent.host.diskusage.disk_usage` of a tree of N small files (default
    100000 in 100 directories) against ``du -sbx`` of the same tree: same answer, and
    target: no slower than 2x du.
(b) :func:`orchagent.host.diskusage.tail_lines` of the last 20 lines of a 200 MB log:
    target < 10 ms (it reads from the end, whatever the size).

Exit status 1 when a target is missed or an answer differs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orchagent.host.diskusage import disk_usage, tail_lines  # noqa: E402


def best_of(runs: int, function) -> tuple[float, object]:
    best, answer = float("inf"), None
    for _ in range(runs):
        started = time.perf_counter()
        answer = function()
        best = min(best, time.perf_counter() - started)
    return best, answer


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=100_000)
    args = parser.parse_args()
    top = tempfile.mkdtemp(prefix="bench-host-")
    ok = True
    try:
        per_dir = max(1, args.files // 100)
        for d in range(100):
            directory = os.path.join(top, "tree", f"db{d}")
            os.makedirs(directory)
            for f in range(per_dir):
                with open(os.path.join(directory, f"t{f}.ibd"), "wb") as fh:
                    fh.write(b"x" * (f % 5000))
        tree = os.path.join(top, "tree")
        ours_time, ours = best_of(3, lambda: disk_usage(tree))
        du_time, du = best_of(3, lambda: int(subprocess.run(
            ["du", "-sbx", tree], check=True, stdout=subprocess.PIPE).stdout.split()[0]))
        same = ours == du
        fast = ours_time <= 2 * du_time
        ok &= same and fast
        print(f"(a) disk_usage of {per_dir * 100} files: {ours_time * 1000:.0f} ms, du -sbx "
              f"{du_time * 1000:.0f} ms, same answer: {same} ({ours} bytes) "
              f"[{'ok' if same and fast else 'MISSED'}]")

        log = os.path.join(top, "error.log")
        line = b"2024-01-01 12:00:00 0 [Note] InnoDB: a line of an error log that goes on\n"
        with open(log, "wb") as fh:
            block = line * 10_000
            for _ in range(200 * 1024 * 1024 // len(block)):
                fh.write(block)
        tail_time, tail = best_of(5, lambda: tail_lines(log, 20))
        fast = tail_time < 0.010 and len(tail) == 20
        ok &= fast
        print(f"(b) tail_lines(20) of a {os.path.getsize(log) // (1024 * 1024)} MB log: "
              f"{tail_time * 1000:.2f} ms [{'ok' if fast else 'MISSED'}]")
    finally:
        shutil.rmtree(top)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
