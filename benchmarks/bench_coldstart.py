#!/usr/bin/env python3
"""Cold start with and without an access-trace-optimized image, side by side in one run
(root; Linux 6.14+ with file-backed EROFS; docker-registry):

    python3 benchmarks/bench_coldstart.py [--mib 512] [--rounds 5] [--startup-pct 5]
                                          [--json out.json]

A generated tree (1,500-odd files of 16 KiB .. 3 MiB, half random, half text) packed by
`erofs-tools pack` (zstd, 1 MiB chunks) and pushed to a docker-registry on 127.0.0.1
(loopback: no link emulation). The workload reads a fixed random STARTUP-PCT % of the
files, whole, one after the other, in a fixed random order (what a program's start
does: imports, shared libraries, data files).

1. record: a fresh daemon and cache mount the image, the workload runs, and
   `fscache-daemon trace` exports what it read;
2. `erofs-tools optimize REF REF-fast --trace`: the traced files in the prefetch table,
   their chunks in a prefetch blob (the only blob uploaded);
3. rounds alternating plain / optimized, each with a fresh daemon and cache and the page
   cache dropped: time from the mount request to the end of the workload (the
   optimized mount streams the prefetch blob at once, fscache_daemon/prefetch.py).

Reported: medians (and best runs) of both, their ratio, bytes fetched, backend
requests, daemon CPU seconds, and the kernel reads reaching the daemon.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchlib import REPO, anchor_line, anchors, work_dir

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from bench_daemon import drop_caches, files_of, make_tree, median, read_all  # noqa: E402


def cli(*args) -> str:
    r = subprocess.run([sys.executable, "-m", "erofs_tools", *map(str, args)],
                       capture_output=True, text=True, cwd=REPO)
    if r.returncode:
        raise SystemExit(f"erofs-tools {args[0]} failed: {r.stderr}")
    return r.stdout


def one_round(work: Path, n: int, boot: str, backend: str, sample: list[str],
              trace_to: Path | None = None) -> dict:
    from test_daemon_support import DaemonProc
    d = DaemonProc(str(work / f"d{n}")).start()
    try:
        mnt = str(work / f"mnt{n}")
        drop_caches()
        t0 = time.perf_counter()
        d.mount(boot, mnt, backend)
        nbytes = read_all(mnt, sample)
        secs = time.perf_counter() - t0
        m = d.metrics()
        if trace_to is not None:
            st, trace = d.api.request("GET", "/api/v1/trace?mountpoint=" + mnt)
            assert st == 200, trace
            trace_to.write_text(json.dumps(trace))
        return {"s": secs, "read": nbytes,
                "fetched": m["totals"]["bytes_fetched"],
                "backend_requests": sum(b["backend_requests"] for b in m["blobs"].values()),
                "daemon_requests": m["totals"]["requests"],
                "cpu_s": m["process"]["cpu_user_s"] + m["process"]["cpu_system_s"],
                "rss": m["process"]["rss_bytes"]}
    finally:
        d.cleanup()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=512, help="source tree size (MiB)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of each (alternating)")
    ap.add_argument("--startup-pct", type=float, default=5.0,
                    help="percentage of the files the workload reads")
    ap.add_argument("--workdir", help="keep everything here (default: a temp dir)")
    ap.add_argument("--json", help="write the results here too")
    a = ap.parse_args(argv)
    from registry_fixtures import start_registry
    work = work_dir(a.workdir, "coldstart-")
    server = None
    try:
        server = start_registry(str(work / "reg"), "none")
        src = work / "src"
        nfiles = make_tree(src, a.mib)
        rnd = random.Random(42)
        files = files_of(src)
        sample = rnd.sample(files, max(1, int(len(files) * a.startup_pct / 100)))
        want = sum(os.path.getsize(src / f) for f in sample)
        cli("pack", src, "-B", work / "app.boot", "-D", work / "blobs", "--chunk-size",
            "0x100000")
        ref = f"{server.host}/bench/app"
        cli("push", work / "app.boot", f"{ref}:v1", "-D", work / "blobs")
        cli("pull", f"{ref}:v1", "-o", work / "plain")
        plain_boot = str(work / "plain" / "image.boot")
        backend_plain = f"registry:{ref}:v1"
        trace = work / "trace.json"
        rec = one_round(work, 0, plain_boot, backend_plain, sample, trace_to=trace)
        t0 = time.perf_counter()
        opt = json.loads(cli("optimize", f"{ref}:v1", f"{ref}:fast", "--trace", trace,
                             "--json", "--work-dir", work))
        optimize_s = time.perf_counter() - t0
        cli("pull", f"{ref}:fast", "-o", work / "fast")
        fast_boot = str(work / "fast" / "image.boot")
        plain, fast = [], []
        n = 1
        for i in range(a.rounds):
            order = [(plain, plain_boot, backend_plain),
                     (fast, fast_boot, f"registry:{ref}:fast")]
            for runs, boot, be in (order if i % 2 == 0 else order[::-1]):
                runs.append(one_round(work, n, boot, be, sample))
                n += 1
        mp, mf = median([(r["s"], r) for r in plain])[1], median([(r["s"], r) for r in fast])[1]
        res = {"anchors": anchors(), "files": nfiles, "tree_mib": a.mib,
               "startup_files": len(sample), "startup_bytes": want,
               "trace_files": len(json.loads(trace.read_text())["entries"]),
               "record_round": rec, "optimize_s": round(optimize_s, 3),
               "prefetch_blob_bytes": opt["prefetch_bytes"],
               "plain": plain, "optimized": fast,
               "plain_median_s": mp["s"], "optimized_median_s": mf["s"],
               "optimized_vs_plain": mf["s"] / mp["s"],
               "optimized_vs_plain_best": min(r["s"] for r in fast) /
               min(r["s"] for r in plain),
               "load": os.getloadavg()}
        print(anchor_line(res["anchors"]))
        print(f"tree {a.mib} MiB, {nfiles} files; workload {len(sample)} files, "
              f"{want / 2**20:.1f} MiB; trace {res['trace_files']} files; prefetch blob "
              f"{opt['prefetch_bytes'] / 2**20:.1f} MiB (optimize {optimize_s:.1f} s)")
        for name, m, runs in (("plain lazy", mp, plain), ("optimized", mf, fast)):
            secs = ", ".join(f"{r['s']:.3f}" for r in runs)
            print(f"{name:11s} median {m['s']:.3f} s (runs {secs}); "
                  f"fetched {m['fetched'] / 2**20:.1f} MiB in {m['backend_requests']} "
                  f"requests; {m['daemon_requests']} kernel reads reached the daemon; "
                  f"daemon CPU {m['cpu_s']:.2f} s, RSS {m['rss'] / 2**20:.0f} MiB")
        print(f"optimized / plain: {res['optimized_vs_plain']:.2f} (best runs "
              f"{res['optimized_vs_plain_best']:.2f}); load average {res['load']}")
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))
    finally:
        if server is not None:
            server.stop()
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
