#!/usr/bin/env python3
"""Side-by-side benchmark: `erofs-tools mkfs` vs `mkfs.erofs` on the same tree.

    python benchmarks/bench_mkfs.py [--tree /usr/share] [--rounds 5] [--out DIR] [--json]
                                    [--anchor PATH/TO/mkfs.erofs] [-z ALG[,level=N]] [-C SIZE]
                                    [-E OPT[,...]]...

mkfs.erofs is the anchor: erofs-utils 1.9.x built from Debian sid's source package by
benchmarks/anchor.py (the default), or the binary given with --anchor; its version
(`mkfs.erofs -V`) and the kernel are printed with the results.

Both tools build an uncompressed image (or with -z/-C, the same compressed one) of TREE into DIR (default: a temp dir on the
filesystem of /tmp). One warm-up run of each fills the page cache; then the rounds
alternate the two tools (mkfs.erofs first in odd rounds, erofs-tools first in even
ones) so both see the same machine state. Wall time is measured around the child process, peak memory is the child's
peak RSS (GNU time's %M: see benchlib.run_child). Reported: median and minimum per
tool, the load average before each round, and the ratios erofs-tools / mkfs.erofs with
each goal (time <= 1.0, memory <= 1.0, image size <= 1.0) stated as met or not. mkfs.erofs's output goes to
/dev/null; erofs-tools runs with -q.

With --read-rounds N (root): both images of the last round are mounted by the kernel
(`mount -t erofs IMAGE`: mount(8) attaches a loop device to a regular file, the same for
both), and N alternating rounds read every regular file of each whole, the page cache
dropped before each read; reported: median seconds per image and the ratio erofs-tools /
mkfs.erofs (goal <= 1.0: our image is read at least as fast), and per image the rounds
during which another process dropped the page cache (`read_rounds_disturbed`, from
/proc/vmstat's drop_pagecache: such a round re-reads what it had cached, and two copies of
one image differed by +/-10 % on a machine where that happened; judge only a run with none).
Beside the times, per image, the read requests the kernel sent to its loop device and
the sectors they read (median per round, from the loop device's /sys/block stat: that
image's reads alone, whatever else the machine does): counts that move by a few tenths
of a percent from round to round where the times move by tens of percent, so a layout
that makes the kernel read more shows here first.
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

from benchlib import (
    REPO,
    anchor_line,
    anchors,
    child_env,
    default_anchor_mkfs,
    goal,
    goal_line,
    is_root,
    run_child,
)


def run(cmd):
    """Run cmd with output to /dev/null; -> (seconds, peak RSS KiB)."""
    r = run_child(cmd, stdout=subprocess.DEVNULL, env=child_env(), cwd=REPO)
    return r["wall"], r["maxrss_mib"] * 1024


def count_files(tree):
    n = 0
    for _, dirs, files in os.walk(tree):
        n += len(dirs) + len(files)
    return n


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def page_cache_drops():
    """How many times the page cache was dropped since boot, by anyone (/proc/vmstat)."""
    with open("/proc/vmstat") as f:
        for line in f:
            if line.startswith("drop_pagecache "):
                return int(line.split()[1])
    return 0


def device_reads(mountpoint):
    """(read requests completed, sectors read) so far by the block device mounted at
    mountpoint (the loop device mount(8) attached to the image file), or None when the
    mount has none (a file-backed EROFS mount)."""
    dev = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mountpoint:
                dev = fields[2]                     # major:minor; the last mount wins
    if dev is None:
        raise SystemExit(f"{mountpoint}: not a mount point")
    try:
        with open(f"/sys/dev/block/{dev}/stat") as f:
            st = f.read().split()
    except FileNotFoundError:
        return None
    return int(st[0]), int(st[2])


def read_all(root):
    """Read every regular file under root whole; -> bytes read."""
    total = 0
    buf = bytearray(1 << 20)
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                while n := os.readv(fd, [buf]):
                    total += n
            finally:
                os.close(fd)
    return total


def kernel_reads(images, rounds, out):
    """Mount each image and time whole-tree reads, page cache dropped before each, rounds
    alternating; -> {tool: [seconds]}, {tool: bytes}, {tool: rounds during which another
    process dropped the page cache}, {tool: [(read requests, sectors) of its device]}."""
    mps = {name: os.path.join(out, f"mnt-{i}") for i, name in enumerate(images)}
    times = {name: [] for name in images}
    ios = {name: [] for name in images}
    disturbed = dict.fromkeys(images, 0)
    sizes = {}
    mounted = []
    try:
        for name, img in images.items():
            os.makedirs(mps[name], exist_ok=True)
            subprocess.run(["mount", "-t", "erofs", "-o", "ro", img, mps[name]], check=True)
            mounted.append(mps[name])
        for i in range(rounds):
            order = list(images) if i % 2 == 0 else list(images)[::-1]
            for name in order:
                drop_caches()
                drops = page_cache_drops()
                before = device_reads(mps[name])
                t0 = time.perf_counter()
                sizes[name] = read_all(mps[name])
                times[name].append(time.perf_counter() - t0)
                after = device_reads(mps[name])
                disturbed[name] += page_cache_drops() != drops
                if before and after:
                    ios[name].append((after[0] - before[0], after[1] - before[1]))
    finally:
        for mp in mounted:
            subprocess.run(["umount", mp], check=False)
    if len(set(sizes.values())) != 1:
        raise SystemExit(f"the two images read back different byte counts: {sizes}")
    if any(disturbed.values()):
        print(f"warning: another process dropped the page cache during {disturbed} read "
              "rounds: the read ratio is not to be judged", file=sys.stderr)
    return times, sizes, disturbed, ios


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", default="/usr/share")
    ap.add_argument("--rounds", "--repeat", type=int, default=5,
                    help="alternating rounds (medians reported)")
    ap.add_argument("--anchor", help="the mkfs.erofs to compare with (default: the "
                    "erofs-utils 1.9.x build of benchmarks/anchor.py)")
    ap.add_argument("--out", default=None, help="directory for the images")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("-z", dest="compress", help="-z ALG[,level=N] given to both tools")
    ap.add_argument("-C", dest="pcluster", help="-C SIZE given to both tools")
    ap.add_argument("-E", dest="extended", action="append", default=[],
                    help="-E OPT (ztailpacking, fragments, dedupe, ...) given to both tools")
    ap.add_argument("--read-rounds", type=int, default=0,
                    help="also time the kernel's read of each whole mounted image, page "
                    "cache dropped (root), in this many alternating rounds")
    args = ap.parse_args(argv)
    if args.read_rounds and not is_root("bench_mkfs --read-rounds"):
        return 2
    mkfs_erofs = os.path.abspath(args.anchor) if args.anchor else default_anchor_mkfs()
    if not os.access(mkfs_erofs, os.X_OK):
        raise SystemExit(f"{mkfs_erofs}: not an executable mkfs.erofs")
    anchor = anchors(mkfs_erofs)
    out = args.out or tempfile.mkdtemp(prefix="bench-mkfs-", dir="/tmp")
    ref_img = os.path.join(out, "ref.img")
    our_img = os.path.join(out, "ours.img")
    zargs = (["-z", args.compress] if args.compress else []) + \
        (["-C", args.pcluster] if args.pcluster else []) + \
        [f"-E{e}" for e in args.extended]
    ours_cmd = [sys.executable, "-m", "erofs_tools", "mkfs", "-q", "-T", "0", *zargs, our_img,
                args.tree]
    ref_cmd = [mkfs_erofs, "-T", "0", *zargs, ref_img, args.tree]
    tools = {"mkfs.erofs": ref_cmd, "erofs-tools": ours_cmd}
    images = {"mkfs.erofs": ref_img, "erofs-tools": our_img}
    results = {k: {"seconds": [], "maxrss_kib": []} for k in tools}
    loads = []
    try:
        for cmd in tools.values():      # warm-up: page cache, pyc files
            run(cmd)
        for i in range(args.rounds):
            loads.append(round(os.getloadavg()[0], 2))
            for name, cmd in (list(tools.items()) if i % 2 == 0 else
                              list(tools.items())[::-1]):
                if os.path.exists(images[name]):
                    os.unlink(images[name])
                dt, rss = run(cmd)
                results[name]["seconds"].append(dt)
                results[name]["maxrss_kib"].append(rss)
        sizes = {"mkfs.erofs": os.path.getsize(ref_img), "erofs-tools": os.path.getsize(our_img)}
        read_times, read_bytes, disturbed, read_ios = (
            kernel_reads(images, args.read_rounds, out) if args.read_rounds
            else ({}, {}, {}, {}))
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    summary = {"tree": args.tree, "compress": args.compress, "pcluster": args.pcluster,
               "extended": args.extended,
               "entries": count_files(args.tree), "rounds": args.rounds,
               "nproc": os.cpu_count(), "anchors": anchor, "loadavg_rounds": loads,
               "loadavg": os.getloadavg()}
    for name, r in results.items():
        summary[name] = {
            "median_s": round(statistics.median(r["seconds"]), 3),
            "min_s": round(min(r["seconds"]), 3),
            "peak_rss_mib": round(max(r["maxrss_kib"]) / 1024, 1),
            "image_bytes": sizes[name],
            "runs_s": [round(x, 3) for x in r["seconds"]],
        }
    ours, ref = summary["erofs-tools"], summary["mkfs.erofs"]
    summary["time_ratio_median"] = round(ours["median_s"] / ref["median_s"], 3)
    summary["time_ratio_min"] = round(ours["min_s"] / ref["min_s"], 3)
    summary["memory_ratio"] = round(ours["peak_rss_mib"] / ref["peak_rss_mib"], 3)
    size_ratio = ours["image_bytes"] / ref["image_bytes"]
    summary["size_ratio"] = round(size_ratio, 7)
    summary["goals"] = [goal("time ratio (median)", summary["time_ratio_median"], "<=", 1.0),
                        goal("peak memory ratio", summary["memory_ratio"], "<=", 1.0),
                        goal("image size ratio", size_ratio, "<=", 1.0)]
    if read_times:
        for name, ts in read_times.items():
            summary[name]["read_median_s"] = round(statistics.median(ts), 3)
            summary[name]["read_runs_s"] = [round(x, 3) for x in ts]
            if read_ios[name]:
                summary[name]["read_requests"] = statistics.median(r for r, _ in read_ios[name])
                summary[name]["read_sectors"] = statistics.median(s for _, s in read_ios[name])
        summary["read_bytes"] = read_bytes["erofs-tools"]
        summary["read_rounds_disturbed"] = disturbed
        summary["read_ratio"] = round(ours["read_median_s"] / ref["read_median_s"], 3)
        summary["goals"].append(goal("kernel read time ratio (median, cold)",
                                     summary["read_ratio"], "<=", 1.0))
    if args.json:
        print(anchor_line(anchor), file=sys.stderr)
        print(json.dumps(summary, indent=2))
    else:
        print(anchor_line(anchor))
        print(f"tree {summary['tree']}: {summary['entries']} entries, -z {args.compress} "
              f"-C {args.pcluster} -E {','.join(args.extended)}, {args.rounds} rounds, "
              f"loadavg per round {loads}, after {summary['loadavg'][0]:.2f}")
        print(f"{'tool':<12} {'median s':>9} {'min s':>7} {'peak RSS MiB':>13} {'image MiB':>10}")
        for name in ("mkfs.erofs", "erofs-tools"):
            r = summary[name]
            print(f"{name:<12} {r['median_s']:>9.2f} {r['min_s']:>7.2f} {r['peak_rss_mib']:>13.1f}"
                  f" {r['image_bytes'] / 2**20:>10.1f}")
        if read_times:
            print(f"kernel read of the mounted image, cold, {summary['read_bytes']} B: "
                  f"mkfs.erofs {ref['read_median_s']:.2f} s, erofs-tools "
                  f"{ours['read_median_s']:.2f} s")
            if "read_requests" in ours and "read_requests" in ref:
                print(f"read requests to the loop device (median per read): mkfs.erofs "
                      f"{ref['read_requests']:.0f} ({ref['read_sectors'] / 2048:.1f} MiB), "
                      f"erofs-tools {ours['read_requests']:.0f} "
                      f"({ours['read_sectors'] / 2048:.1f} MiB)")
        print(f"time ratio (median) {summary['time_ratio_median']:.2f}  (min) "
              f"{summary['time_ratio_min']:.2f}  memory ratio {summary['memory_ratio']:.2f}  "
              f"size ratio {summary['size_ratio']}")
        for g in summary["goals"]:
            print(goal_line(g))
    return 0


if __name__ == "__main__":
    sys.exit(main())
