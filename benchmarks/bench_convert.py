#!/usr/bin/env python3
"""Benchmark `erofs-tools convert` against `tar -x` of the same layers, in one run.

    python3 benchmarks/bench_convert.py [TREE ...] [--rounds N] [--registry] [--json FILE]

Each TREE (default: /usr/share/doc, /usr/lib/python3.11, /usr/share/perl) becomes one
gzip layer of an OCI image layout (prepared once, untimed; the layout is on disk and
read from the page cache; tar -x reads the same gzip blobs). Each round runs, in alternating order:

  C  erofs-tools convert oci:SRC DST  (every layer streamed, gunzipped, chunked,
     hashed, zstd-compressed into a blob; bootstraps merged; image written to DST:
     an OCI layout, or with --registry a local docker-registry over HTTP)
  X  tar -xzf LAYER -C DIR for every layer in order, DIR on tmpfs (/dev/shm)

Throughput = MB (10^6 bytes) of uncompressed layer tar per second of wall time;
medians over the rounds, with the child CPU time and the load average, because the
machine may be shared. The anchors (kernel; the cached erofs-utils anchor, not compared
here) are printed with the results.
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import REPO, anchor_line, anchors

sys.path.insert(0, os.fspath(REPO))
sys.path.insert(0, os.path.join(REPO, "tests"))

DEFAULT_TREES = ["/usr/share/doc", "/usr/lib/python3.11", "/usr/share/perl"]


def run(cmd, **kw):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, **kw)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if p.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed: {p.stderr.decode(errors='replace')[-2000:]}")
    return wall, cpu, p


def prepare(trees, work):
    """Layer tars (plain, for sizes) and an OCI layout with their gzip forms."""
    from test_tar_helpers import make_oci_layout
    tars = []
    raw_bytes = 0
    for i, tree in enumerate(trees):
        t = os.path.join(work, f"layer{i}.tar")
        subprocess.run(["tar", "--numeric-owner", "-cf", t, "-C", os.path.dirname(tree),
                        os.path.basename(tree)], check=True, capture_output=True)
        raw_bytes += os.path.getsize(t)
        tars.append(t)
    lay, m = make_oci_layout(os.path.join(work, "src"), tars, gz=True)
    # tar -x reads the very gzip blobs that convert reads
    gz = [lay.blob_path(d.digest) for d in m.layers()]
    for t in tars:
        os.unlink(t)
    return tars, gz, raw_bytes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trees", nargs="*", default=DEFAULT_TREES)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--registry", action="store_true",
                    help="push to a local docker-registry (needs docker-registry)")
    ap.add_argument("--json", help="write results here")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench-convert-", dir="/var/tmp")
    server = None
    try:
        tars, gz, raw_bytes = prepare(a.trees, work)
        gz_bytes = sum(os.path.getsize(g) for g in gz)
        if a.registry:
            from registry_fixtures import start_registry
            server = start_registry(os.path.join(work, "reg"), "none")
        shm = tempfile.mkdtemp(prefix="bench-convert-x-", dir="/dev/shm")
        res = {"C": [], "X": [], "Ccpu": [], "Xcpu": []}
        for r in range(a.rounds):
            order = ("C", "X") if r % 2 == 0 else ("X", "C")
            for what in order:
                if what == "C":
                    if server is not None:
                        dst = f"{server.host}/bench/img:r{r}"
                        extra = ["--insecure"]
                    else:
                        d = os.path.join(work, f"dst{r}")
                        dst, extra = f"oci:{d}:nydus", []
                    wall, cpu, _ = run([sys.executable, "-m", "erofs_tools", "convert",
                                        f"oci:{work}/src:v1", dst, "-q",
                                        "--work-dir", work, *extra], cwd=REPO)
                    if server is None:
                        shutil.rmtree(d)
                else:
                    dest = os.path.join(shm, f"r{r}")
                    os.makedirs(dest)
                    t = time.perf_counter()
                    cpu = 0.0
                    for g in gz:
                        _, c, _ = run(["tar", "--numeric-owner", "-xzf", g, "-C", dest])
                        cpu += c
                    wall = time.perf_counter() - t
                    shutil.rmtree(dest)
                res[what].append(wall)
                res[what + "cpu"].append(cpu)
                print(f"round {r} {what}: {wall:.2f} s wall, {cpu:.2f} s cpu, "
                      f"{raw_bytes / 1e6 / wall:.1f} MB/s", flush=True)
        shutil.rmtree(shm, ignore_errors=True)
        c, x = statistics.median(res["C"]), statistics.median(res["X"])
        out = {"trees": a.trees, "layers": len(tars), "tar_bytes": raw_bytes,
               "gzip_bytes": gz_bytes, "rounds": a.rounds,
               "destination": "registry" if server else "oci-layout",
               "convert_s": round(c, 3), "tar_x_s": round(x, 3),
               "convert_MBps": round(raw_bytes / 1e6 / c, 1),
               "tar_x_MBps": round(raw_bytes / 1e6 / x, 1),
               "convert_cpu_s": round(statistics.median(res["Ccpu"]), 2),
               "tar_x_cpu_s": round(statistics.median(res["Xcpu"]), 2),
               "ratio_convert_over_tar_x": round(c / x, 2),
               "cpus": os.cpu_count(), "loadavg": os.getloadavg(), "anchors": anchors()}
        print(json.dumps(out, indent=1))
        print(anchor_line(out["anchors"]))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
