"""Seeds at fleet scale (#20), side by side with tar|nc: ``sudo .venv/bin/python bench/seed_scale.py``.

Scenarios (e)-(g), next to :mod:`seed_bench`'s (a)-(d) and run with its harness: two
real agents (daemon + seed engine each) driven over their HTTP API, ``tar -cf - | nc``
into ``nc -l | tar -xf -`` on the same data in the same run, every run into a fresh ext4
on a loop device (:class:`seed_bench.FreshTarget`), the order alternating every round,
medians; peak PSS (daemon + engine, sampled every 50 ms) and peak RSS (summed, and of the
largest process) of each agent.

* **(e)** ``--files`` files of 4 KiB (default 1,000,000), 1000 to a directory, into an
  ext4 with an inode per 4 KiB: memory and time.
* **(f)** a many-table datadir: ``--tables`` tables (default 100,000), each an ``.ibd``
  of 96 KiB (six 16 KiB pages: InnoDB-like rows with free space, one page in ten random,
  so partly compressible) and an ``.frm`` of 1 KiB, 100 tables to a database directory.
* **(g)** ``--g-sizes`` (default ``1G,10G``): files of 16 KiB pages, half random and half
  compressible (:func:`seed_bench.make_mixed`), the smaller tree hard links to the first
  files of the larger (no second copy on disk), both seeded in the same run; every PSS
  sample of each orchagent seed is kept and the run with the median time is drawn as a
  text sparkline per agent (and as a PNG under ``bench/out/`` when matplotlib can be
  imported: it is not installed for this), with the time ratio against ``size ratio x``
  the smaller seed's (the target: within 10 %).

Disk at the defaults, source + what a run writes into its target's image (a sparse
file, sized with a margin): (e) 4 + 5 GB, (f) 10 + 10 GB, (g) 10.7 + 10.7 GB (the 1 GiB
tree is links into the 10 GiB one).  Only one target exists at a time and each
scenario's source is removed once it ran (unless ``--keep``), so a run stays within
25 GB; a scenario refuses to start without room for it.  Nothing at full scale is
quick: (e) takes minutes per run, generating (f) and (g) some minutes each.  A small
smoke run::

    sudo .venv/bin/python bench/seed_scale.py --files 20000 --tables 2000 --g-sizes 64M,256M --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import seed_bench  # noqa: E402
from seed_files_memory import make_tiny  # noqa: E402

BLOCK = 4096
#: The receiver's free-space check asks this much per entry besides its data blocks
#: (orchagent.seed.tree's entry overhead, rounded up).
ENTRY = 1536
IBD_PAGES = 6  # 96 KiB
FRM_SIZE = 1024
TABLES_PER_DB = 100
SPARK = "▁▂▃▄▅▆▇█"


# --- data --------------------------------------------------------------------------------------

def make_many_tables(root: str, tables: int) -> None:
    """(f): ``tables`` ``.ibd`` files of 96 KiB and as many ``.frm`` of 1 KiB.

    Making each page row by row (:func:`seed_bench.innodb_page`) would take hours for
    600,000 pages: pages are drawn from a pool of 512 (one in ten random) and each gets
    a header of its own (table, page number, a random LSN), as InnoDB's pages do, so no
    two pages of the tree are the same and a file compresses as its pages do."""
    rnd = random.Random(20)
    pool = [seed_bench.random_page() if i % 10 == 0 else seed_bench.innodb_page(rnd)
            for i in range(512)]
    frm = bytearray(os.urandom(96) + b"".join(rnd.choices(seed_bench.WORDS, k=200)))
    frm = bytes(frm[:FRM_SIZE].ljust(FRM_SIZE, b"\0"))
    for t in range(tables):
        directory = os.path.join(root, f"db{t // TABLES_PER_DB:04d}")
        if t % TABLES_PER_DB == 0:
            os.makedirs(directory, exist_ok=True)
        pages = [struct.pack(">IIQ", t, p, rnd.getrandbits(64)) + rnd.choice(pool)[16:]
                 for p in range(IBD_PAGES)]
        name = os.path.join(directory, f"t{t % TABLES_PER_DB:02d}")
        with open(name + ".ibd", "wb") as fh:
            fh.write(b"".join(pages))
        with open(name + ".frm", "wb") as fh:
            fh.write(struct.pack(">I", t) + frm[4:])


def make_sized_pair(root: str, small: int, large: int) -> tuple[str, str]:
    """(g): ``large`` bytes of mixed pages, and the ``small`` tree as hard links to its
    first files (the same bytes, no more disk)."""
    file_size = max(seed_bench.PAGE, min(64 << 20, small // 4))
    big, little = os.path.join(root, "large"), os.path.join(root, "small")
    if not os.path.isdir(big):
        seed_bench.make_mixed(big + ".part", large, file_size)
        os.rename(big + ".part", big)
    if not os.path.isdir(little):
        os.makedirs(little + ".part")
        for name in sorted(os.listdir(big))[:small // file_size]:
            os.link(os.path.join(big, name), os.path.join(little + ".part", name))
        os.rename(little + ".part", little)
    return little, big


def size_arg(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().rstrip("IB")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def label(size: int) -> str:
    """``1 << 30`` → ``"1 GiB"``, ``64 << 20`` → ``"64 MiB"``."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):g} {unit}"
    return f"{size} B"


def target_for(base: str, entries: int, data_blocks: int, mkfs_options=()) -> seed_bench.FreshTarget:
    """A fresh ext4 with room for the data's blocks and the receiver's per-entry ask."""
    size = int((data_blocks + entries * ENTRY) * 1.3) + (512 << 20)
    return seed_bench.FreshTarget(os.path.join(base, "target"), os.path.join(base, "target.img"),
                                  size, mkfs_options=mkfs_options)


def need_room(base: str, needed: int, what: str) -> None:
    free = shutil.disk_usage(base).free
    if free < needed + (2 << 30):
        raise SystemExit(f"{what} needs about {needed / 1e9:.1f} GB and 2 GB to spare under {base}; "
                         f"{free / 1e9:.1f} GB are free")


# --- memory over time --------------------------------------------------------------------------

def sparkline(values: list[float], low: float, high: float, width: int = 60) -> str:
    """``values`` in ``width`` columns (the largest of each), one of eight levels from
    ``low`` to ``high``."""
    if not values:
        return ""
    step = max(1, -(-len(values) // width))
    columns = [max(values[i:i + step]) for i in range(0, len(values), step)]
    span = (high - low) or 1.0
    return "".join(SPARK[max(0, min(len(SPARK) - 1, int((v - low) / span * len(SPARK))))]
                   for v in columns)


def memory_over_time(series_by_label: dict) -> list[str]:
    """Lines drawing each agent's PSS over each seed, all on one scale (so the larger
    seed's line compares with the smaller's), with the range and how much it grew over
    the seed's second half (memory flat with the data: about 0)."""
    values = {(name, side): [sample[side] for _, sample in series]
              for name, series in series_by_label.items() for side in ("receiver", "sender")}
    everything = [v for line in values.values() for v in line]
    if not everything:
        return []
    low, high = min(everything), max(everything)
    lines = [f"scale: {SPARK[0]} {low:.0f} MB to {SPARK[-1]} {high:.0f} MB"]
    for (name, side), line in values.items():
        if not line:
            continue
        seconds = series_by_label[name][-1][0]
        half = len(line) // 2
        growth = max(line[half:]) - max(line[:half] or line)
        lines.append(f"{name:>7s} {side:8s} {min(line):4.0f}-{max(line):4.0f} MB over {seconds:6.1f}s, "
                     f"second half {growth:+4.0f} MB  {sparkline(line, low, high)}")
    return lines


def plot(series_by_label: dict, path: str) -> str | None:
    """A PNG of every series, when matplotlib can be imported (it is not a dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        return None
    figure, axes = pyplot.subplots(figsize=(9, 4))
    for label, series in series_by_label.items():
        for side in ("receiver", "sender"):
            axes.plot([t for t, _ in series], [s[side] for _, s in series], label=f"{label} {side}")
    axes.set_xlabel("seconds")
    axes.set_ylabel("PSS, daemon + engine (MB)")
    axes.legend()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


# --- the scenarios -----------------------------------------------------------------------------

def scenario_files(args, base: str, work: str) -> dict:
    """(e): many files of 4 KiB, into an ext4 with an inode per 4 KiB (the default, one
    per 16 KiB, runs out first)."""
    count = args.files
    src = os.path.join(base, f"tiny-{count}")
    need_room(base, count * (BLOCK + ENTRY) * 3, "(e)")
    if not os.path.isdir(src):
        print(f"generating {count:,} files of 4 KiB ...", flush=True)
        make_tiny(src + ".part", count, BLOCK)
        os.rename(src + ".part", src)
    try:
        return seed_bench.scenario("e", src, base, work, args.rounds, with_cat=False,
                                   make_target=lambda: target_for(base, count + count // 1000, count * BLOCK,
                                                             ("-i", "4096")))
    finally:
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)


def scenario_tables(args, base: str, work: str) -> dict:
    """(f): the many-table datadir."""
    tables = args.tables
    src = os.path.join(base, f"tables-{tables}")
    blocks = tables * (IBD_PAGES * seed_bench.PAGE + BLOCK)
    need_room(base, int(blocks * 2.4), "(f)")
    if not os.path.isdir(src):
        print(f"generating {tables:,} tables (.ibd of 96 KiB, .frm of 1 KiB) ...", flush=True)
        make_many_tables(src + ".part", tables)
        os.rename(src + ".part", src)
    try:
        entries = 2 * tables + tables // TABLES_PER_DB + 1
        return seed_bench.scenario("f", src, base, work, args.rounds, with_cat=False,
                                   make_target=lambda: target_for(base, entries, blocks))
    finally:
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)


def scenario_linear(args, base: str, work: str) -> dict:
    """(g): the smaller and the larger seed in the same run, alternating, with tar|nc on
    each; every orchagent seed's PSS samples kept."""
    small, large = sorted(size_arg(s) for s in args.g_sizes.split(","))
    root = os.path.join(base, "linear")
    need_room(base, int(large * 2.4), "(g)")
    if not os.path.isdir(os.path.join(root, "large")):
        print(f"generating {label(large)} of mixed pages ...", flush=True)
    os.makedirs(root, exist_ok=True)
    trees = dict(zip(("small", "large"), make_sized_pair(root, small, large)))
    runs: dict[tuple[str, str], list[dict]] = {}
    kinds = [(size, kind) for size in ("small", "large") for kind in ("orchagent", "tar_nc")]
    try:
        for round_ in range(args.rounds):
            for size, kind in (kinds if round_ % 2 == 0 else kinds[::-1]):
                src = trees[size]
                total = seed_bench.tree_bytes(src)
                files = len(os.listdir(src))
                with target_for(base, files, total) as dst:
                    if kind == "orchagent":
                        result = seed_bench.run_orchagent(work, src, dst, target="127.0.0.1", series=True)
                    else:
                        result = seed_bench.run_tar_nc(src, dst)
                result["bytes"] = total
                runs.setdefault((size, kind), []).append(result)
                print(f"  g round {round_ + 1} {size} {kind}: {result['seconds']:.2f}s "
                      f"({total / result['seconds'] / 1e6:.0f} MB/s)", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report = {"sizes": {"small": small, "large": large}}
    for (size, kind), results in runs.items():
        keys = [k for k in results[0] if k != "pss_series"]
        summary = {k: seed_bench.median([r[k] for r in results]) for k in keys}
        if kind == "orchagent":
            ordered = sorted(results, key=lambda r: r["seconds"])
            summary["pss_series"] = ordered[len(ordered) // 2]["pss_series"]
        report.setdefault(size, {})[kind] = summary
    return report


# --- report ------------------------------------------------------------------------------------

def markdown(report: dict, args) -> str:
    lines = [f"Medians of {args.rounds} alternating round(s); MB/s = data bytes / seconds.", "",
             "| scenario | orchagent | first data | tar\\|nc | tar\\|nc + sync | × tar\\|nc "
             "| × tar\\|nc+sync | peak PSS r / s (MB) | peak RSS r / s: sum (largest process) (MB) |",
             "|---|---|---|---|---|---|---|---|---|"]

    def row(title: str, n: int, ours: dict, tar: dict) -> str:
        def rate(seconds):
            return f"{seconds:.2f}s ({n / seconds / 1e6:.0f} MB/s)"

        return "| " + " | ".join([
            title, rate(ours["seconds"]), f"{ours['first_data']:.1f}s", rate(tar["seconds"]),
            rate(tar["seconds_synced"]),
            f"{tar['seconds'] / ours['seconds']:.2f}", f"{tar['seconds_synced'] / ours['seconds']:.2f}",
            f"{ours['pss_receiver']:.0f} / {ours['pss_sender']:.0f}",
            f"{ours['rss_receiver']:.0f} ({ours['rss_receiver_process']:.0f}) / "
            f"{ours['rss_sender']:.0f} ({ours['rss_sender_process']:.0f})"]) + " |"

    if "e" in report:
        r = report["e"]
        lines.append(row(f"(e) {args.files:,} × 4 KiB", r["bytes"], r["orchagent"], r["tar_nc"]))
    if "f" in report:
        r = report["f"]
        lines.append(row(f"(f) {args.tables:,} tables (.ibd 96 KiB + .frm 1 KiB)", r["bytes"],
                         r["orchagent"], r["tar_nc"]))
    if "g" in report:
        g = report["g"]
        small, large = g["sizes"]["small"], g["sizes"]["large"]
        for size in ("small", "large"):
            if size in g:
                lines.append(row(f"(g) {label(g['sizes'][size])} mixed", g[size]["orchagent"]["bytes"],
                                 g[size]["orchagent"], g[size]["tar_nc"]))
        if "small" in g and "large" in g:
            ratio = large / small
            ours = g["large"]["orchagent"]["seconds"] / (ratio * g["small"]["orchagent"]["seconds"])
            tar = g["large"]["tar_nc"]["seconds"] / (ratio * g["small"]["tar_nc"]["seconds"])
            lines += ["", f"(g) linearity, time of the larger / ({ratio:g} × the smaller): orchagent "
                          f"{ours:.2f}, tar|nc {tar:.2f} (target for orchagent: ≤ 1.10)", "",
                      "(g) PSS of each agent (daemon + engine, every 50 ms) over the seed with the "
                      "median time:", "```"]
            series = {label(g["sizes"][s]): g[s]["orchagent"]["pss_series"] for s in ("small", "large")}
            lines += memory_over_time(series)
            lines.append("```")
            png = plot(series, os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                                            "seed_scale_g.png"))
            lines.append(f"(g) plot: {png}" if png else "(g) no plot: matplotlib is not installed")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/var/tmp/orchagent-seed-scale")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="e,f,g", help="comma-separated scenarios")
    parser.add_argument("--files", type=int, default=1_000_000, help="(e): files of 4 KiB")
    parser.add_argument("--tables", type=int, default=100_000, help="(f): .ibd + .frm pairs")
    parser.add_argument("--g-sizes", default="1G,10G", help="(g): the two sizes, e.g. 1G,10G")
    parser.add_argument("--keep", action="store_true",
                        help="keep the generated data (with --only one scenario: they do not fit together)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (loop devices, mounts)", file=sys.stderr)
        return 2
    only = set(args.only.split(","))
    base = args.dir
    os.makedirs(base, exist_ok=True)
    work = os.path.join(base, "work")
    report: dict = {}
    try:
        for key, run in (("e", scenario_files), ("f", scenario_tables), ("g", scenario_linear)):
            if key in only:
                report[key] = run(args, base, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print()
    print(markdown(report, args))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
