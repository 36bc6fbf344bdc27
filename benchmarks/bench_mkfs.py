#!/usr/bin/env python3
"""Side-by-side benchmark: `erofs-tools mkfs` vs `mkfs.erofs` on the same tree.

    python benchmarks/bench_mkfs.py [--tree /usr/share] [--rounds 5] [--out DIR] [--json]

Both tools build an uncompressed image of TREE into DIR (default: a temp dir on the
filesystem of /tmp). One warm-up run of each fills the page cache; then the rounds
alternate the two tools (mkfs.erofs first, then erofs-tools) so both see the same machine
state. Wall time is measured around the child process, peak memory is the child's
ru_maxrss (os.wait4). Reported: median and minimum per tool and the ratios
erofs-tools / mkfs.erofs (goal: time <= 1.0, memory <= 1.0). mkfs.erofs's per-file
progress output goes to /dev/null; erofs-tools runs with -q.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def run(cmd):
    """Run cmd with output to /dev/null; -> (seconds, peak RSS KiB)."""
    with open(os.devnull, "wb") as null:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=null, stderr=null)
        _, status, ru = os.wait4(p.pid, 0)
        dt = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}")
    return dt, ru.ru_maxrss


def count_files(tree):
    n = 0
    for _, dirs, files in os.walk(tree):
        n += len(dirs) + len(files)
    return n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", default="/usr/share")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None, help="directory for the images")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    mkfs_erofs = shutil.which("mkfs.erofs")
    if not mkfs_erofs:
        raise SystemExit("mkfs.erofs not found (apt-get install erofs-utils)")
    out = args.out or tempfile.mkdtemp(prefix="bench-mkfs-", dir="/tmp")
    ref_img = os.path.join(out, "ref.img")
    our_img = os.path.join(out, "ours.img")
    ours_cmd = [sys.executable, "-m", "erofs_tools", "mkfs", "-q", "-T", "0", our_img, args.tree]
    ref_cmd = [mkfs_erofs, "-T", "0", ref_img, args.tree]
    tools = {"mkfs.erofs": ref_cmd, "erofs-tools": ours_cmd}
    images = {"mkfs.erofs": ref_img, "erofs-tools": our_img}
    results = {k: {"seconds": [], "maxrss_kib": []} for k in tools}
    try:
        for cmd in tools.values():      # warm-up: page cache, pyc files
            run(cmd)
        for _ in range(args.rounds):
            for name, cmd in tools.items():
                if os.path.exists(images[name]):
                    os.unlink(images[name])
                dt, rss = run(cmd)
                results[name]["seconds"].append(dt)
                results[name]["maxrss_kib"].append(rss)
        sizes = {"mkfs.erofs": os.path.getsize(ref_img), "erofs-tools": os.path.getsize(our_img)}
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    summary = {"tree": args.tree, "entries": count_files(args.tree), "rounds": args.rounds,
               "nproc": os.cpu_count(), "loadavg": os.getloadavg()}
    for name, r in results.items():
        summary[name] = {
            "median_s": round(statistics.median(r["seconds"]), 3),
            "min_s": round(min(r["seconds"]), 3),
            "peak_rss_mib": round(max(r["maxrss_kib"]) / 1024, 1),
            "image_bytes": sizes[name],
        }
    ours, ref = summary["erofs-tools"], summary["mkfs.erofs"]
    summary["time_ratio_median"] = round(ours["median_s"] / ref["median_s"], 3)
    summary["time_ratio_min"] = round(ours["min_s"] / ref["min_s"], 3)
    summary["memory_ratio"] = round(ours["peak_rss_mib"] / ref["peak_rss_mib"], 3)
    summary["size_ratio"] = round(ours["image_bytes"] / ref["image_bytes"], 3)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"tree {summary['tree']}: {summary['entries']} entries, {args.rounds} rounds, "
              f"loadavg {summary['loadavg'][0]:.2f}")
        print(f"{'tool':<12} {'median s':>9} {'min s':>7} {'peak RSS MiB':>13} {'image MiB':>10}")
        for name in ("mkfs.erofs", "erofs-tools"):
            r = summary[name]
            print(f"{name:<12} {r['median_s']:>9.2f} {r['min_s']:>7.2f} {r['peak_rss_mib']:>13.1f}"
                  f" {r['image_bytes'] / 2**20:>10.1f}")
        print(f"time ratio (median) {summary['time_ratio_median']:.2f}  (min) "
              f"{summary['time_ratio_min']:.2f}  memory ratio {summary['memory_ratio']:.2f}  "
              f"size ratio {summary['size_ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
