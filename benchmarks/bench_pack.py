#!/usr/bin/env python3
"""Benchmark `erofs-tools pack` side by side with mkfs.erofs and zstd, in one run.

    python3 benchmarks/bench_pack.py [TREE] [--rounds N] [--out DIR] [--json FILE]
                                     [--anchor PATH/TO/mkfs.erofs]

TREE defaults to /usr/share. Each round runs, in alternating order:
  A  mkfs.erofs --chunksize=1048576 --blobdev=BLOB IMG TREE, mkfs.erofs being the
     anchor: erofs-utils 1.9.x built by benchmarks/anchor.py (default) or --anchor
  B  erofs-tools pack TREE --compressor none
     (goals: time(B) / time(A) <= 1.0, peak memory(B) / peak memory(A) <= 1.0)
  C  erofs-tools pack TREE --compressor zstd
  Z  zstd alone on the same bytes over all cores: `zstd -3 -T<ncpu>` on the
     concatenation of every regular file of TREE (prepared once, read from the page
     cache); the same chunks (1 MiB cuts per file) compressed in-process with
     python-zstandard on a thread per core, read from the page cache ("inproc") and
     already in memory ("mem", the floor; goal: throughput(C) / throughput(mem) >= 0.7)
Throughput = input bytes (sum of regular file sizes) / wall time. The median of the
rounds is the figure the goals are judged on (the best run is shown too), with CPU time
and peak RSS of each child (GNU time, see benchlib.run_child), the load average before each round and the anchor's
version (`mkfs.erofs -V`) and kernel. The zstd CLI is measured writing its output
to a file beside the blobs (as pack must) and to /dev/null. The page cache is warmed
with one untimed pass first.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

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


def regular_files(tree):
    out = []
    for dp, dn, fn in os.walk(tree):
        dn.sort()
        for n in sorted(fn):
            p = os.path.join(dp, n)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if os.path.isfile(p) and not os.path.islink(p):
                out.append((p, st.st_size))
    return out


def concat(files, dest):
    with open(dest, "wb") as out:
        for p, _ in files:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)


def zstd_inprocess(files, workers, chunk=1 << 20, level=3):
    """Compress every 1 MiB cut of every file (data from the page cache) on all cores."""
    import zstandard

    local = __import__("threading").local()

    def comp(batch):
        c = getattr(local, "c", None)
        if c is None:
            c = local.c = zstandard.ZstdCompressor(level=level)
        n = 0
        for data in batch:
            n += len(c.compress(data))
        return n

    t = time.perf_counter()
    total = 0
    with ThreadPoolExecutor(workers) as pool:
        futs = []
        batch, size = [], 0
        for p, _ in files:
            with open(p, "rb") as f:
                while True:
                    data = f.read(chunk)
                    if not data:
                        break
                    batch.append(data)
                    size += len(data)
                    if size >= chunk:
                        futs.append(pool.submit(comp, batch))
                        batch, size = [], 0
                    if len(futs) > workers * 3:
                        total += futs.pop(0).result()
        if batch:
            futs.append(pool.submit(comp, batch))
        for f in futs:
            total += f.result()
    return time.perf_counter() - t, total


def load_chunks(files, chunk=1 << 20):
    """Every 1 MiB cut of every file, in memory (for the in-memory zstd floor)."""
    out = []
    for p, _ in files:
        with open(p, "rb") as f:
            while data := f.read(chunk):
                out.append(data)
    return out


def zstd_in_memory(chunks, workers, level=3):
    """Compress chunks already in memory on a thread per core: zstd -3's floor."""
    import zstandard

    local = threading.local()

    def comp(lo):
        c = getattr(local, "c", None)
        if c is None:
            c = local.c = zstandard.ZstdCompressor(level=level)
        return sum(len(c.compress(chunks[i])) for i in range(lo, min(lo + 16, len(chunks))))

    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        total = sum(pool.map(comp, range(0, len(chunks), 16)))
    return time.perf_counter() - t, total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tree", nargs="?", default="/usr/share")
    ap.add_argument("--rounds", "--repeat", type=int, default=3)
    ap.add_argument("--anchor", help="the mkfs.erofs to compare with (default: the "
                    "erofs-utils 1.9.x build of benchmarks/anchor.py)")
    ap.add_argument("--out", help="scratch directory (default: a temp dir in /var/tmp)")
    ap.add_argument("--json", help="write the results here as JSON")
    ap.add_argument("--skip-mkfs", action="store_true")
    args = ap.parse_args()

    ncpu = os.cpu_count() or 1
    scratch = args.out or tempfile.mkdtemp(prefix="bench-pack-", dir="/var/tmp")
    os.makedirs(scratch, exist_ok=True)
    env = child_env()
    # the package byte-compiled first, as an install leaves it: with
    # PYTHONDONTWRITEBYTECODE set (this machine's environment) every pack child compiled
    # its modules at start, ~0.07 s of serial CPU per run that no user pays twice
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.fspath(REPO / "erofs_tools")],
                   stdout=subprocess.DEVNULL, check=False)
    mkfs_erofs = None
    if not args.skip_mkfs:
        mkfs_erofs = os.path.abspath(args.anchor) if args.anchor else default_anchor_mkfs()
    anchor = anchors(mkfs_erofs)
    print(anchor_line(anchor), flush=True)
    files = regular_files(args.tree)
    nbytes = sum(s for _, s in files)
    nentries = sum(len(dn) + len(fn) for _, dn, fn in os.walk(args.tree)) + 1
    print(f"tree {args.tree}: {nentries} entries, {len(files)} regular files, "
          f"{nbytes / 2**20:.1f} MiB; {ncpu} CPUs; scratch {scratch}", flush=True)

    cat = os.path.join(scratch, "all-bytes")
    concat(files, cat)       # also warms the page cache for the tree
    pack = [sys.executable, "-m", "erofs_tools", "pack", args.tree, "--json", "-q"]

    def do_mkfs():
        img, blob = os.path.join(scratch, "mkfs.img"), os.path.join(scratch, "mkfs.blob")
        for f in (img, blob):
            if os.path.exists(f):
                os.unlink(f)
        r = run_child([mkfs_erofs, "--chunksize=1048576", f"--blobdev={blob}", img,
                       args.tree], stdout=subprocess.DEVNULL)
        return {"wall": r["wall"], "cpu": r["cpu"], "rss_mib": r["maxrss_mib"],
                "blob": os.path.getsize(blob), "meta": os.path.getsize(img)}

    def do_pack(comp):
        d = os.path.join(scratch, f"pack-{comp}")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        r = run_child(pack + ["-B", os.path.join(d, "boot"), "-D", d,
                              "--compressor", comp], env=env, cwd=REPO)
        j = json.loads(r["stdout"])
        new = [b for b in j["blobs"] if b["new"]]
        return {"wall": r["wall"], "cpu": r["cpu"], "rss_mib": r["maxrss_mib"],
                "blob": new[0]["compressed_size"] if new else 0,
                "meta": j["bootstrap_size"], "bytes_total": j["bytes_total"],
                "chunks": j["chunks_total"], "chunks_new": j["chunks_new"]}

    def do_zstd_cli(to_file):
        if to_file:    # writes its output like pack writes its blob
            out = os.path.join(scratch, "all-bytes.zst")
            with open(out, "wb") as f:
                r = run_child(["zstd", "-3", f"-T{ncpu}", "-q", "-c", cat], stdout=f)
        else:
            r = run_child(["zstd", "-3", f"-T{ncpu}", "-q", "-c", cat],
                          stdout=subprocess.DEVNULL)
        return {"wall": r["wall"], "cpu": r["cpu"]}

    results = {"A_mkfs": [], "B_pack_none": [], "C_pack_zstd": [], "Z_zstd_cli": [],
               "Z_zstd_cli_devnull": [], "Z_zstd_inproc": [], "Z_zstd_mem": [], "load": []}
    chunks = load_chunks(files)
    do_pack("none")        # untimed warm-up (imports, page cache)
    for r in range(args.rounds):
        results["load"].append(os.getloadavg()[0])
        order = ["A", "B", "C", "Z"] if r % 2 == 0 else ["Z", "C", "B", "A"]
        for k in order:
            if k == "A" and not args.skip_mkfs:
                results["A_mkfs"].append(do_mkfs())
            elif k == "B":
                results["B_pack_none"].append(do_pack("none"))
            elif k == "C":
                results["C_pack_zstd"].append(do_pack("zstd"))
            elif k == "Z":
                results["Z_zstd_cli"].append(do_zstd_cli(True))
                results["Z_zstd_cli_devnull"].append(do_zstd_cli(False))
                w, _ = zstd_inprocess(files, ncpu)
                results["Z_zstd_inproc"].append({"wall": w})
                w, _ = zstd_in_memory(chunks, ncpu)
                results["Z_zstd_mem"].append({"wall": w})
        print(f"round {r + 1}/{args.rounds} done (loadavg before it "
              f"{results['load'][-1]:.2f})", flush=True)

    summary = {"tree": args.tree, "entries": nentries, "files": len(files), "bytes": nbytes,
               "cpus": ncpu, "rounds": args.rounds, "anchors": anchor,
               "load_avg_1min": results["load"]}
    for k in ("A_mkfs", "B_pack_none", "C_pack_zstd", "Z_zstd_cli", "Z_zstd_cli_devnull",
              "Z_zstd_inproc", "Z_zstd_mem"):
        rows = results[k]
        if not rows:
            continue
        walls = [x["wall"] for x in rows]
        s = {"wall_s_median": round(statistics.median(walls), 2),
             "wall_s_best": round(min(walls), 2)}
        if "cpu" in rows[0]:
            s["cpu_s_median"] = round(statistics.median(x["cpu"] for x in rows), 2)
        if "rss_mib" in rows[0]:
            s["peak_rss_mib"] = round(max(x["rss_mib"] for x in rows), 1)
        if "blob" in rows[0]:
            s["blob_bytes"] = rows[0]["blob"]
            s["meta_bytes"] = rows[0]["meta"]
        s["throughput_MiBps"] = round(nbytes / 2**20 / s["wall_s_median"], 1)
        summary[k] = s

    def ratio(a, b, key="wall_s_median"):
        return round(summary[a][key] / summary[b][key], 3)

    goals = []
    if summary.get("A_mkfs"):
        summary["ratio_time_pack_none_vs_mkfs"] = ratio("B_pack_none", "A_mkfs")
        summary["ratio_time_pack_none_vs_mkfs_best"] = ratio("B_pack_none", "A_mkfs",
                                                             "wall_s_best")
        summary["ratio_cpu_pack_none_vs_mkfs"] = ratio("B_pack_none", "A_mkfs",
                                                       "cpu_s_median")
        summary["ratio_memory_pack_none_vs_mkfs"] = ratio("B_pack_none", "A_mkfs",
                                                          "peak_rss_mib")
        goals += [goal("time pack none / mkfs.erofs (median)",
                       summary["ratio_time_pack_none_vs_mkfs"], "<=", 1.0),
                  goal("peak memory pack none / mkfs.erofs",
                       summary["ratio_memory_pack_none_vs_mkfs"], "<=", 1.0)]
    for z in ("Z_zstd_cli", "Z_zstd_cli_devnull", "Z_zstd_inproc", "Z_zstd_mem"):
        summary[f"ratio_throughput_pack_zstd_vs_{z[2:]}"] = ratio(z, "C_pack_zstd")
    goals.append(goal("throughput pack zstd / in-memory zstd -3 (median)",
                      summary["ratio_throughput_pack_zstd_vs_zstd_mem"], ">=", 0.7))
    summary["goals"] = goals
    print(json.dumps(summary, indent=1))
    print(anchor_line(anchor))
    for g in goals:
        print(goal_line(g))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "raw": results}, f, indent=1)
    if not args.out:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
