#!/usr/bin/env python3
"""Side-by-side benchmark: `erofs-tools mkfs --tar=f` vs `mkfs.erofs --tar=f` on one
layer tar.

    python benchmarks/bench_mkfs_tar.py [--trees /usr/share /usr/lib/gcc ...] [--tar FILE]
                                        [--rounds 5] [--mode f|i] [--stdin] [-z ALG]
                                        [--out DIR] [--json] [--anchor PATH/TO/mkfs.erofs]

The layer tar (default: GNU tar, PAX format, of /usr/share, /usr/lib/gcc,
/usr/lib/python3 and /usr/lib/python3.11, about 1 GB; or an existing --tar FILE) is
written once to DIR (default: a temp dir under /var/tmp). Both tools then build the
same kind of image from it (`--tar=f`, or `--tar=i` with --mode i; with -z both
compress), the tar given as a path, or on stdin with --stdin. One warm-up run of each
fills the page cache; the rounds alternate the tools (mkfs.erofs first in odd rounds)
so both see the same machine state. Wall time around the child, peak RSS of the
child (GNU time %M, benchlib.run_child). Reported: median and minimum per tool, the load
average per round, and the ratios erofs-tools / mkfs.erofs with the goals (time <= 1.0,
memory <= 1.0, image size <= 1.0) as met or not. Both run with -T 0 and quiet.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from benchlib import (
    REPO,
    anchor_line,
    anchors,
    child_env,
    default_anchor_mkfs,
    goal,
    goal_line,
    run_child,
)

TREES = ["/usr/share", "/usr/lib/gcc", "/usr/lib/python3", "/usr/lib/python3.11"]


def make_tar(trees, path):
    trees = [t for t in trees if os.path.isdir(t)]
    subprocess.run(["tar", "--format=pax", "--numeric-owner", "--xattrs",
                    "--xattrs-include=*", "-cf", path, "-C", "/",
                    *[os.path.relpath(t, "/") for t in trees]],
                   check=True, stderr=subprocess.DEVNULL)
    return trees


def run(cmd, stdin_path=None):
    if stdin_path is None:
        r = run_child(cmd, stdout=subprocess.DEVNULL, env=child_env(), cwd=REPO)
    else:
        with open(stdin_path, "rb") as f:
            r = run_child(cmd, stdout=subprocess.DEVNULL, env=child_env(), cwd=REPO, stdin=f)
    return r["wall"], r["maxrss_mib"] * 1024, r["cpu"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", nargs="+", default=TREES)
    ap.add_argument("--tar", help="an existing layer tar (instead of --trees)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mode", choices=["f", "i"], default="f")
    ap.add_argument("--stdin", action="store_true", help="feed the tar on stdin")
    ap.add_argument("-z", dest="compress", help="-z ALG[,level=N] given to both tools")
    ap.add_argument("--anchor")
    ap.add_argument("--out")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    mkfs_erofs = os.path.abspath(args.anchor) if args.anchor else default_anchor_mkfs()
    anchor = anchors(mkfs_erofs)
    out = args.out or tempfile.mkdtemp(prefix="bench-mkfs-tar-", dir="/var/tmp")
    os.makedirs(out, exist_ok=True)
    tar_path = args.tar or os.path.join(out, "layer.tar")
    trees = None
    if not args.tar:
        trees = make_tar(args.trees, tar_path)
    src = "-" if args.stdin else tar_path
    stdin = tar_path if args.stdin else None
    zargs = ["-z", args.compress] if args.compress else []
    images = {"mkfs.erofs": os.path.join(out, "ref.img"),
              "erofs-tools": os.path.join(out, "ours.img")}
    tools = {
        "mkfs.erofs": [mkfs_erofs, "--quiet", f"--tar={args.mode}", "-T", "0", *zargs,
                       images["mkfs.erofs"]] + ([] if args.stdin else [src]),
        "erofs-tools": [sys.executable, "-m", "erofs_tools", "mkfs", "-q",
                        f"--tar={args.mode}", "-T", "0", *zargs, images["erofs-tools"], src],
    }
    results = {k: {"seconds": [], "maxrss_kib": [], "cpu": []} for k in tools}
    loads = []
    try:
        for cmd in tools.values():
            run(cmd, stdin)
        for i in range(args.rounds):
            loads.append(round(os.getloadavg()[0], 2))
            order = list(tools.items()) if i % 2 == 0 else list(tools.items())[::-1]
            for name, cmd in order:
                if os.path.exists(images[name]):
                    os.unlink(images[name])
                dt, rss, cpu = run(cmd, stdin)
                results[name]["seconds"].append(dt)
                results[name]["maxrss_kib"].append(rss)
                results[name]["cpu"].append(cpu)
        sizes = {k: os.path.getsize(v) for k, v in images.items()}
        tar_bytes = os.path.getsize(tar_path)
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    summary = {"tar_bytes": tar_bytes, "trees": trees, "mode": args.mode,
               "stdin": args.stdin, "compress": args.compress, "rounds": args.rounds,
               "nproc": os.cpu_count(), "anchors": anchor, "loadavg_rounds": loads,
               "loadavg": os.getloadavg()}
    for name, r in results.items():
        summary[name] = {
            "median_s": round(statistics.median(r["seconds"]), 3),
            "min_s": round(min(r["seconds"]), 3),
            "median_cpu_s": round(statistics.median(r["cpu"]), 3),
            "peak_rss_mib": round(max(r["maxrss_kib"]) / 1024, 1),
            "image_bytes": sizes[name],
            "runs_s": [round(x, 3) for x in r["seconds"]],
        }
    ours, ref = summary["erofs-tools"], summary["mkfs.erofs"]
    summary["time_ratio_median"] = round(ours["median_s"] / ref["median_s"], 3)
    summary["time_ratio_min"] = round(ours["min_s"] / ref["min_s"], 3)
    summary["cpu_ratio"] = round(ours["median_cpu_s"] / max(ref["median_cpu_s"], 1e-3), 3)
    summary["memory_ratio"] = round(ours["peak_rss_mib"] / ref["peak_rss_mib"], 3)
    size_ratio = ours["image_bytes"] / ref["image_bytes"]
    summary["size_ratio"] = round(size_ratio, 7)
    summary["goals"] = [goal("time ratio (median)", summary["time_ratio_median"], "<=", 1.0),
                        goal("peak memory ratio", summary["memory_ratio"], "<=", 1.0),
                        goal("image size ratio", size_ratio, "<=", 1.0)]
    if args.json:
        print(anchor_line(anchor), file=sys.stderr)
        print(json.dumps(summary, indent=2))
        return 0
    print(anchor_line(anchor))
    print(f"tar {tar_bytes / 2**20:.0f} MiB ({' '.join(trees or [tar_path])}), --tar={args.mode}"
          f"{' on stdin' if args.stdin else ''}, -z {args.compress}, {args.rounds} rounds, "
          f"loadavg per round {loads}, after {summary['loadavg'][0]:.2f}")
    print(f"{'tool':<12} {'median s':>9} {'min s':>7} {'cpu s':>7} {'peak RSS MiB':>13} "
          f"{'image MiB':>10}")
    for name in ("mkfs.erofs", "erofs-tools"):
        r = summary[name]
        print(f"{name:<12} {r['median_s']:>9.2f} {r['min_s']:>7.2f} {r['median_cpu_s']:>7.2f} "
              f"{r['peak_rss_mib']:>13.1f} {r['image_bytes'] / 2**20:>10.1f}")
    print(f"time ratio (median) {summary['time_ratio_median']:.2f}  (min) "
          f"{summary['time_ratio_min']:.2f}  cpu ratio {summary['cpu_ratio']:.2f}  memory ratio "
          f"{summary['memory_ratio']:.2f}  size ratio {summary['size_ratio']}")
    for g in summary["goals"]:
        print(goal_line(g))
    return 0


if __name__ == "__main__":
    sys.exit(main())
