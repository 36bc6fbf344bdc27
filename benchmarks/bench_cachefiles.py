#!/usr/bin/env python3
"""Benchmarks of the cachefiles front end; run INSIDE the vm-tests guest (QEMU TCG):

    vm-tests/run --kernel 6.12 -- python3 benchmarks/bench_cachefiles.py [--mib 96]

Side by side in one run, on one image packed by `erofs-tools pack` (zstd, 1 MiB chunks)
and served by `fscache-daemon run --frontend cachefiles` from a localfs backend:

  cold    read every file once through the lazy mount (daemon fetches, verifies,
          decompresses, writes into the fscache object)
  direct  read and decompress the same chunks straight from the backend blob (the work
          the daemon cannot avoid), no kernel involved, in one single-threaded loop
          (the cold/direct baseline; the daemon has worker threads)
  warm    drop caches and read everything again (median of --repeat runs) through the fscache mount (the kernel
          serves from the cachefiles cache file, no daemon)
  native  the same bootstrap mounted natively with the expanded (uncompressed) blob as
          its device (file-backed on 6.12, loop devices on 6.1), caches dropped

Prints one JSON document (also written to $VMTEST_OUT/bench_cachefiles.json when set).
All figures come from an emulated (TCG) machine: compare ratios, not absolute speeds.
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

from benchlib import REPO, anchor_line, anchors, drop_caches  # noqa: E402

sys.path.insert(0, str(REPO))


def make_tree(root: Path, mib: int, seed: int = 42):
    """Compressible, varied data (text-like lines plus some random blocks)."""
    rnd = random.Random(seed)
    words = [rnd.randbytes(rnd.randint(2, 9)).hex().encode() for _ in range(2000)]
    root.mkdir(parents=True)
    total, i = 0, 0
    target = mib << 20
    while total < target:
        size = rnd.choice([4096, 40_000, 300_000, 1 << 20, 3 << 20])
        size = min(size, target - total)
        parts, n = [], 0
        while n < size:
            if rnd.random() < 0.03:
                b = rnd.randbytes(4096)
            else:
                b = b" ".join(rnd.choice(words) for _ in range(12)) + b"\n"
            parts.append(b)
            n += len(b)
        d = root / f"d{i % 8}"
        d.mkdir(exist_ok=True)
        (d / f"f{i:04d}").write_bytes(b"".join(parts)[:size])
        total += size
        i += 1
    return total


def read_tree(root: Path) -> int:
    n = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            with open(os.path.join(dirpath, name), "rb", buffering=0) as f:
                while True:
                    b = f.read(1 << 20)
                    if not b:
                        break
                    n += len(b)
    return n


def timed(fn):
    t0 = time.perf_counter()
    r = fn()
    return time.perf_counter() - t0, r


def direct_read(boot: Path, blob_dir: Path) -> int:
    """Read and decompress every chunk of every blob straight from the backend files."""
    from erofs_tools.reader import blob as rblob
    from fscache_daemon.storage.image import load_image
    n = 0
    for ref in load_image(str(boot)).blobs:
        path = blob_dir / ref.blob_id
        meta = rblob.open_blob(str(path), ref.blob_id, ref.entry)
        with open(path, "rb") as f:
            read_at = rblob.file_reader(f)
            for c in meta.chunks:
                n += len(rblob.read_chunk(meta, c, read_at))
    return n


def api(sock, method, path, body=None):
    from fscache_daemon.api import ApiClient
    return ApiClient(sock).call(method, path, body)


def native_mount(boot: Path, blob_dir: Path, cache: Path, mnt: Path, loops: list):
    from erofs_tools import mount as emount
    try:
        emount.mount_rafs(str(boot), str(mnt), str(blob_dir), str(cache))
        return "file-backed"
    except Exception as e:  # 6.1: no file-backed mounts; use loop devices
        if "file-backed" not in str(e) and "ENOTBLK" not in str(e) and \
                "block device" not in str(e):
            raise
    devs = emount.prepare_caches(str(boot), str(blob_dir), str(cache))

    def losetup(p):
        dev = subprocess.run(["losetup", "-f", "--show", "-r", str(p)], check=True,
                             capture_output=True, text=True).stdout.strip()
        loops.append(dev)
        return dev
    primary = losetup(boot)
    opts = ",".join(f"device={losetup(p)}" for p in devs)
    emount.sys_mount(primary, str(mnt), "erofs", emount.MS_RDONLY, opts)
    return "loop"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=96, help="size of the test tree")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3, help="runs of warm and native (median)")
    ap.add_argument("--workdir", default=os.environ.get("VMTEST_SCRATCH", "/var/tmp") +
                    "/bench-cachefiles")
    args = ap.parse_args(argv)
    if os.environ.get("VMTEST_GUEST") != "1":
        print("run this inside the vm-tests guest: vm-tests/run --kernel 6.12 -- "
              "python3 benchmarks/bench_cachefiles.py", file=sys.stderr)
        return 2
    from fscache_daemon.api import socket_answers
    from fscache_daemon.frontend import cachefiles as cf
    from fscache_daemon.frontend import cachefiles_holder

    w = Path(args.workdir)
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)
    src, blobs, boot = w / "src", w / "blobs", w / "image.boot"
    size = make_tree(src, args.mib)
    blobs.mkdir()
    t_pack, _ = timed(lambda: subprocess.run(
        ["erofs-tools", "pack", "-q", "-B", str(boot), "-D", str(blobs), str(src)],
        check=True))
    compressed = sum(p.stat().st_size for p in blobs.iterdir())
    res = {"kernel": os.uname().release, "emulated": "QEMU TCG (no KVM): compare ratios",
           "tree_bytes": size, "blob_bytes": compressed, "pack_s": round(t_pack, 3),
           "threads": args.threads}

    # direct: decompress from the backend (page cache of the blob file dropped first)
    drop_caches()
    t_direct, n = timed(lambda: direct_read(boot, blobs))
    res["direct_s"] = round(t_direct, 3)

    sock, cache = str(w / "api.sock"), w / "cache"
    logf = open(w / "daemon.log", "ab")
    p = subprocess.Popen(["fscache-daemon", "run", "--cache-dir", str(cache), "--api-sock",
                          sock, "--frontend", "cachefiles", "--threads", str(args.threads),
                          "--log-level", "WARNING"], stdout=logf, stderr=subprocess.STDOUT)
    mnt, nmnt, loops = w / "mnt", w / "native", []
    try:
        deadline = time.monotonic() + 900
        while not socket_answers(sock):
            if p.poll() is not None or time.monotonic() > deadline:
                sys.stderr.write((w / "daemon.log").read_text(errors="replace")[-4000:])
                raise SystemExit("fscache-daemon did not come up")
            time.sleep(0.2)
        mnt.mkdir()
        t_mount, _ = timed(lambda: api(sock, "POST", "/api/v1/mounts", {
            "bootstrap": str(boot), "mountpoint": str(mnt), "backend": f"localfs:{blobs}",
            "prefetch": False, "domain": None, "options": {}}))
        res["lazy_mount_s"] = round(t_mount, 3)
        drop_caches()
        t_cold, n_cold = timed(lambda: read_tree(mnt))
        assert n_cold == size, (n_cold, size)
        m = api(sock, "GET", "/api/v1/metrics")
        warm = []
        for _ in range(args.repeat):
            drop_caches()
            warm.append(timed(lambda: read_tree(mnt))[0])
        t_warm = sorted(warm)[len(warm) // 2]
        m2 = api(sock, "GET", "/api/v1/metrics")
        blob_m = next(iter(m["blobs"].values()))
        res.update({
            "cold_s": round(t_cold, 3), "warm_s": round(t_warm, 3),
            "cold_MBps": round(size / t_cold / 1e6, 2), "warm_MBps": round(size / t_warm / 1e6, 2),
            "direct_MBps": round(size / t_direct / 1e6, 2),
            "cold_vs_direct": round(t_direct / t_cold, 3),
            "direct_baseline": "single-threaded loop",
            "daemon_requests": m["totals"]["requests"],
            "kernel_reads": m["frontend_stats"]["reads"],
            "warm_kernel_reads": m2["frontend_stats"]["reads"] - m["frontend_stats"]["reads"],
            "latency_p50_ms": blob_m.get("latency_p50_ms"),
            "latency_p99_ms": blob_m.get("latency_p99_ms"),
            "bytes_fetched": m["totals"]["bytes_fetched"],
            "daemon_rss_bytes": m["process"]["rss_bytes"],
            "daemon_cpu_s": round(m["process"]["cpu_user_s"] + m["process"]["cpu_system_s"], 2),
        })
        nmnt.mkdir()
        res["native_mode"] = native_mount(boot, blobs, w / "native-cache", nmnt, loops)
        read_tree(nmnt)          # not timed: same conditions (page cache dropped below)
        native = []
        for _ in range(args.repeat):
            drop_caches()
            native.append(timed(lambda: read_tree(nmnt))[0])
        t_native = sorted(native)[len(native) // 2]
        res["warm_runs_s"] = [round(x, 3) for x in warm]
        res["native_runs_s"] = [round(x, 3) for x in native]
        res["native_s"] = round(t_native, 3)
        res["native_MBps"] = round(size / t_native / 1e6, 2)
        res["warm_vs_native"] = round(t_native / t_warm, 3)
    finally:
        for m_ in (nmnt, mnt):
            try:
                cf.umount(str(m_))
            except Exception:
                pass
        for dev in loops:
            subprocess.run(["losetup", "-d", dev])
        p.terminate()
        p.wait(60)
        cachefiles_holder.release(str(cache / "cachefiles-holder.sock"))
        logf.close()
    res["anchors"] = anchors()
    out = json.dumps(res, indent=1)
    print(out)
    print(anchor_line(res["anchors"]))
    if os.environ.get("VMTEST_OUT"):
        Path(os.environ["VMTEST_OUT"], "bench_cachefiles.json").write_text(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
