#!/usr/bin/env python3
"""fscache-daemon with the fanotify front end on this machine's kernel, side by side in
one run (root; Linux 6.14+ with file-backed EROFS):

    python3 benchmarks/bench_daemon.py [--mib 1024] [--repeat 5] [--warm-rounds 9]
                                       [--startup-rounds 5] [--frontends] [--json out.json]

One image packed by `erofs-tools pack` (zstd, 1 MiB chunks, blake3) from a generated
tree of MIB MiB (half random, half compressible text), served from a localfs backend.
Every measurement starts with `drop_caches`; measurements compared with each other run
in alternating rounds and their medians are compared (best runs shown too).

  direct    read and decompress + verify every chunk straight from the blob in one
            single-threaded Python loop (the work the daemon cannot avoid, without the
            kernel round trip; the daemon has worker threads, this baseline has one)
  cold      read every file once, sequentially, through a fresh lazy mount and a fresh
            daemon (it fetches, verifies, decompresses and writes every chunk);
            rounds alternate direct and cold. goal: cold >= 0.7 x direct
  --frontends  also cold reads with the daemon inside the benchmark process, three ways:
            fd holder with the filled map (shipped), fd holder without it (every event
            goes to the daemon), fanotify group in the daemon (not crash-safe)
  warm      after the cold pass (blob complete, its fanotify mark removed) everything
            again through the same mount: the kernel alone serves it
  warm-new  the same through a second mount made after the cache was complete
  native    the bootstrap mounted file-backed with a copy of the complete cache file (no
            daemon); rounds alternate warm, warm-new and native. goal: warm >= 0.95 x native
  startup   read a 5% sample of the files: lazily through the daemon (mount + read)
            against pulling everything first (copy the blob from the backend, expand it
            with `erofs-tools mount`, then read the sample), in alternating rounds
            (--startup-rounds, medians); goal lazy <= 0.2 x full
  latency   per-request daemon latency p50/p99 (fanotify events that needed a fetch, and
            all events) from the daemon's metrics of the median cold round

The anchors (kernel; the cached erofs-utils anchor, not compared here) are printed with
the results. Prints a table, each goal met or not, and one JSON document.
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
from typing import NamedTuple

from benchlib import REPO, announce_anchors, close_report, drop_caches, goal, is_root, work_dir  # noqa: E402

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

READ_BUF = 1 << 20


def make_tree(root: Path, mib: int, seed: int = 7) -> int:
    rnd = random.Random(seed)
    words = [rnd.randbytes(rnd.randint(2, 8)).hex().encode() for _ in range(4000)]
    root.mkdir(parents=True)
    total, i = 0, 0
    target = mib << 20
    while total < target:
        size = min(target - total, rnd.choice([16 << 10, 64 << 10, 256 << 10, 1 << 20,
                                               3 << 20]))
        half = size // 2
        text = bytearray()
        while len(text) < size - half:
            text += b" ".join(rnd.choices(words, k=16)) + b"\n"
        d = root / f"dir{i % 32:02d}"
        d.mkdir(exist_ok=True)
        (d / f"file{i:05d}").write_bytes(rnd.randbytes(half) + bytes(text[:size - half]))
        total += size
        i += 1
    return i


def files_of(root: Path) -> list[str]:
    out = []
    for d, _ds, fs in os.walk(root):
        for n in fs:
            out.append(os.path.relpath(os.path.join(d, n), root))
    return sorted(out)


def read_all(root: str, rels) -> int:
    n = 0
    buf = bytearray(READ_BUF)
    for rel in rels:
        with open(os.path.join(root, rel), "rb", buffering=0) as f:
            while True:
                k = f.readinto(buf)
                if not k:
                    break
                n += k
    return n


def timed(fn, *a):
    t0 = time.perf_counter()
    r = fn(*a)
    return time.perf_counter() - t0, r


class Packed(NamedTuple):
    files: list[str]       # the tree's files, relative
    boot: str
    blobs: str             # the blob directory
    blob: dict             # pack's record of the (one) blob
    blob_id: str
    blob_path: str


def packed_tree(work: Path, mib: int, pack) -> Packed:
    """The benchmark's tree of `mib` MiB under work/src and its image packed with `pack`
    (test_daemon_support's): made once per work directory, reused by a kept --workdir."""
    src = work / "src"
    if not src.exists():
        t, nfiles = timed(make_tree, src, mib)
        print(f"tree: {nfiles} files, {mib} MiB in {t:.1f}s", file=sys.stderr)
    files = files_of(src)
    boot, blobs = str(work / "boot"), str(work / "blobs")
    if not os.path.exists(boot):
        shutil.rmtree(blobs, ignore_errors=True)
        t, info = timed(pack, str(src), boot, blobs)
        (work / "pack.json").write_text(json.dumps(info))
        print(f"pack: {t:.1f}s", file=sys.stderr)
    b = json.loads((work / "pack.json").read_text())["blobs"][0]
    return Packed(files, boot, blobs, b, b["blob_id"], os.path.join(blobs, b["blob_id"]))


def median(runs):
    """The median run of (seconds, ...) tuples (the lower middle one for even counts)."""
    return sorted(runs, key=lambda r: r[0])[(len(runs) - 1) // 2]


def direct_decode(blob_path: str, blob_id: str) -> int:
    from erofs_tools.reader import blob as rblob
    meta = rblob.open_blob(blob_path, blob_id=blob_id)
    n = 0
    with open(blob_path, "rb", buffering=0) as f:
        fd = f.fileno()
        for c in sorted(meta.chunks, key=lambda c: c.compressed_offset):
            raw = os.pread(fd, c.compressed_size, c.compressed_offset)
            n += len(rblob.decode_chunk(meta, c, raw))
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=1024, help="source tree size (MiB)")
    ap.add_argument("--workdir", help="keep everything here (default: a temp dir on /var/tmp)")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5,
                    help="cold/direct rounds (alternating); medians are reported")
    ap.add_argument("--warm-rounds", type=int, default=9,
                    help="warm/native rounds (alternating); medians are reported")
    ap.add_argument("--startup-rounds", type=int, default=5,
                    help="lazy/full startup rounds (alternating); medians are reported")
    ap.add_argument("--frontends", action="store_true",
                    help="also measure cold reads with in-process daemons: fd holder with "
                         "and without the filled map, and the group in the daemon")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if not is_root("bench_daemon"):
        return 2

    import helpers
    from test_daemon_support import DaemonProc, pack, release_holder

    work = work_dir(args.workdir, "bench-daemon-")
    anchor = announce_anchors()
    res = {"mib": args.mib, "kernel": os.uname().release, "cpus": os.cpu_count(),
           "anchors": anchor}
    files, boot, blobs, b, blob_id, blob_path = packed_tree(work, args.mib, pack)
    res.update(files=len(files), blob_compressed=b["compressed_size"],
               blob_uncompressed=b["uncompressed_size"], chunks=b["chunk_count"])
    ubytes = b["uncompressed_size"]

    d = None
    mounts = []
    try:
        # -- direct decode and cold reads through the daemon, alternating rounds ---------
        mnt = str(work / "mnt")
        os.makedirs(mnt, exist_ok=True)
        ddir = work / "daemon"
        runs, cold = [], []
        for _ in range(args.repeat):
            drop_caches()
            runs.append(timed(direct_decode, blob_path, blob_id))
            if d is not None:
                d.umount(mnt)
                mounts.remove(mnt)
                d.cleanup()
            shutil.rmtree(ddir, ignore_errors=True)
            d = DaemonProc(str(ddir), threads=args.threads, extra=["--log-level", "INFO"])
            d.start()
            drop_caches()
            d.mount(boot, mnt, f"localfs:{blobs}")
            mounts.append(mnt)
            t, n = timed(read_all, mnt, files)
            # this round's own daemon: its metrics are this round's alone
            cold.append((t, n, d.blob_metrics(blob_id), d.metrics()))
        t, n = median(runs)
        res["direct_s"], res["direct_MBps"] = t, n / t / 1e6
        res["direct_runs_s"] = [round(r[0], 3) for r in runs]
        res["cold_runs_s"] = [round(c[0], 3) for c in cold]
        # latencies, request counts, RSS and front-end stats of the median round
        t, n, m, dm = median(cold)
        res["cold_median_round"] = cold.index(median(cold)) + 1
        res["cold_s"], res["cold_MBps"] = t, n / t / 1e6
        res["cold_complete"] = m["complete"]
        res["cold_requests"] = m["requests"]
        res["cold_fetch_requests"] = m["requests"] - m["requests_from_cache"]
        res["cold_readahead_bytes"] = m.get("readahead_bytes", 0)
        res["latency_p50_ms"], res["latency_p99_ms"] = m["latency_p50_ms"], m["latency_p99_ms"]
        res["latency_max_ms"] = m["latency_max_ms"]
        res["fetch_latency_p50_ms"] = m["fetch_latency_p50_ms"]
        res["fetch_latency_p99_ms"] = m["fetch_latency_p99_ms"]
        res["daemon_rss_MiB"] = dm["process"]["rss_bytes"] / 2**20
        res["cold_vs_direct"] = res["cold_MBps"] / res["direct_MBps"]
        res["cold_vs_direct_best"] = min(runs)[0] / min(cold)[0]

        fs = dm["frontend_stats"]
        res["cold_holder_events"] = fs.get("holder_events")
        res["cold_holder_allowed_filled"] = fs.get("holder_allowed_filled")

        # -- cold, daemons inside this process (like for like): the shipped setup (fd
        # holder with the filled map), the fd holder without the filled map (every event
        # goes to the daemon, as before the holder fast path), and the fanotify group in
        # the daemon process (no fd holder; not crash-safe, fail-open): measured only to
        # show what the holder hop costs
        from fscache_daemon.daemon import Daemon, FanotifyFrontend
        mnt_l = str(work / "mnt-local")
        os.makedirs(mnt_l, exist_ok=True)
        variants = (("cold_inproc_holder", {}),
                    ("cold_holder_nomap", {"filled_map": False}),
                    ("cold_local_group", {"holder": False})) if args.frontends else ()
        for name, kw in variants:
            local = []
            for _ in range(args.repeat):
                lc = str(work / "local-cache")
                shutil.rmtree(lc, ignore_errors=True)
                dl = Daemon(lc, frontend=FanotifyFrontend(lc, **kw), threads=args.threads)
                dl.start()
                try:
                    drop_caches()
                    dl.mount(boot, mnt_l, f"localfs:{blobs}")
                    local.append(timed(read_all, mnt_l, files))
                    dl.umount(mnt_l)
                finally:
                    dl.shutdown()  # with nothing mounted it stops its fd holder too
            t, n = median(local)
            res[f"{name}_s"], res[f"{name}_MBps"] = t, n / t / 1e6
            res[f"{name}_vs_direct"] = res[f"{name}_MBps"] / res["direct_MBps"]
            res[f"{name}_runs_s"] = [round(r[0], 3) for r in local]

        # -- warm reads: the same mount (mark removed after completion), a new mount of
        # the complete cache, and a native file-backed mount of a copy of it, in
        # alternating rounds (page cache dropped before each; medians reported)
        mnt2 = str(work / "mnt2")
        os.makedirs(mnt2, exist_ok=True)
        d.mount(boot, mnt2, f"localfs:{blobs}")
        mounts.append(mnt2)
        # a fresh copy each run: as new on disk as the cache file it is compared with
        native_dev = str(work / "native.blob")
        shutil.copyfile(os.path.join(d.cache_dir, "blobs", blob_id + ".blob"), native_dev)
        mnt3 = str(work / "mnt3")
        os.makedirs(mnt3, exist_ok=True)
        helpers.sys_mount(boot, mnt3, "erofs", 1, f"device={native_dev}")
        mounts.append(mnt3)
        before = d.blob_metrics(blob_id)["requests"]
        warm = {"warm": [], "warm_new": [], "native": []}
        for i in range(args.warm_rounds):
            order = [("warm", mnt), ("warm_new", mnt2), ("native", mnt3)]
            for key, mp in (order if i % 2 == 0 else order[::-1]):
                drop_caches()
                warm[key].append(timed(read_all, mp, files))
        helpers.sys_umount(mnt3)
        mounts.remove(mnt3)
        res["warm_daemon_requests"] = d.blob_metrics(blob_id)["requests"] - before
        for key, rs in warm.items():
            t, n = median(rs)
            res[f"{key}_s"], res[f"{key}_MBps"] = t, n / t / 1e6
            res[f"{key}_runs_s"] = [round(r[0], 3) for r in rs]
        res["warm_vs_native"] = res["warm_MBps"] / res["native_MBps"]
        res["warm_new_vs_native"] = res["warm_new_MBps"] / res["native_MBps"]
        res["warm_vs_native_best"] = min(warm["native"])[0] / min(warm["warm"])[0]
        res["warm_new_vs_native_best"] = min(warm["native"])[0] / min(warm["warm_new"])[0]

        for mp in list(mounts):
            d.umount(mp)
            mounts.remove(mp)
        d.cleanup()
        d = None

        # -- startup set: 5% of the files, lazily and after a full pull, alternating
        # rounds (a fresh daemon and cache per lazy round; medians compared) ----------
        sample = random.Random(5).sample(files, max(1, len(files) // 20))
        res["startup_files"] = len(sample)

        def startup_lazy():
            nonlocal d
            shutil.rmtree(ddir, ignore_errors=True)
            d = DaemonProc(str(ddir), threads=args.threads, extra=["--log-level", "INFO"])
            d.start()
            drop_caches()
            t0 = time.perf_counter()
            d.mount(boot, mnt, f"localfs:{blobs}")
            mounts.append(mnt)
            read_all(mnt, sample)
            t = time.perf_counter() - t0
            fetched = d.blob_metrics(blob_id)["bytes_fetched"]
            d.umount(mnt)
            mounts.remove(mnt)
            d.cleanup()
            d = None
            return t, fetched

        def startup_full():
            pulled = work / "pulled"
            cache = work / "eager-cache"
            shutil.rmtree(pulled, ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)
            pulled.mkdir()
            drop_caches()
            t0 = time.perf_counter()
            shutil.copyfile(blob_path, pulled / blob_id)               # "pull" the blob
            subprocess.run([sys.executable, "-m", "erofs_tools", "mount", boot, mnt,
                            "--blob-dir", str(pulled), "--cache-dir", str(cache)],
                           check=True, cwd=REPO)
            mounts.append(mnt)
            read_all(mnt, sample)
            t = time.perf_counter() - t0
            helpers.sys_umount(mnt)
            mounts.remove(mnt)
            return (t,)

        lazy, full = [], []
        for i in range(args.startup_rounds):
            order = [(lazy, startup_lazy), (full, startup_full)]
            for runs_, fn in (order if i % 2 == 0 else order[::-1]):
                runs_.append(fn())
        res["startup_lazy_s"], res["startup_lazy_fetched"] = median(lazy)
        res["startup_full_s"] = median(full)[0]
        res["startup_lazy_runs_s"] = [round(r[0], 3) for r in lazy]
        res["startup_full_runs_s"] = [round(r[0], 3) for r in full]
        res["startup_lazy_vs_full"] = res["startup_lazy_s"] / res["startup_full_s"]
        res["startup_lazy_vs_full_best"] = min(lazy)[0] / min(full)[0]
    finally:
        for mp in mounts:
            try:
                helpers.sys_umount(mp, lazy=True)
            except Exception:  # noqa: BLE001
                pass
        if d is not None:
            d.mounts.clear()
            d.cleanup()
        release_holder(str(work / "daemon" / "cache" / "fdholder.sock"))

    rows = [
        ("cold read through daemon", f"{res['cold_MBps']:.0f} MB/s",
         f"{res['cold_holder_allowed_filled']} of {res['cold_holder_events']} events "
         "allowed by the fd holder"),
        ("direct read+decode+verify, 1 thread", f"{res['direct_MBps']:.0f} MB/s",
         f"cold/direct = {res['cold_vs_direct']:.2f} (goal >= 0.7; best runs "
         f"{res['cold_vs_direct_best']:.2f}; the baseline is a single-threaded loop)"),
        ("warm read, same mount", f"{res['warm_MBps']:.0f} MB/s",
         f"warm/native = {res['warm_vs_native']:.2f} (goal >= 0.95; best runs "
         f"{res['warm_vs_native_best']:.2f}); "
         f"daemon requests {res['warm_daemon_requests']}"),
        ("warm read, new mount", f"{res['warm_new_MBps']:.0f} MB/s",
         f"warm-new/native = {res['warm_new_vs_native']:.2f} (best runs "
         f"{res['warm_new_vs_native_best']:.2f})"),
        ("native file-backed mount", f"{res['native_MBps']:.0f} MB/s", ""),
        (f"startup set ({res['startup_files']} files) lazy", f"{res['startup_lazy_s']:.2f} s",
         f"fetched {res['startup_lazy_fetched'] / 2**20:.1f} MiB"),
        ("startup set after full pull", f"{res['startup_full_s']:.2f} s",
         f"lazy/full = {res['startup_lazy_vs_full']:.3f} (goal <= 0.2; medians of "
         f"{args.startup_rounds}; best runs {res['startup_lazy_vs_full_best']:.3f})"),
        (f"daemon latency (cold round {res['cold_median_round']}, the median), all",
         f"p50 {res['latency_p50_ms']:.3f} ms",
         f"p99 {res['latency_p99_ms']:.2f} ms, max {res['latency_max_ms']:.1f} ms, "
         f"{res['cold_requests']} requests"),
        ("  requests that fetched", f"p50 {res['fetch_latency_p50_ms']:.2f} ms",
         f"p99 {res['fetch_latency_p99_ms']:.2f} ms, {res['cold_fetch_requests']} requests"),
    ]
    for name, what in (("cold_inproc_holder", "cold, in-process daemon, holder + map"),
                       ("cold_holder_nomap", "cold, holder without filled map"),
                       ("cold_local_group", "cold, group in daemon (no holder)")):
        if f"{name}_MBps" in res:
            rows.insert(2, (what, f"{res[name + '_MBps']:.0f} MB/s",
                            f"/direct = {res[name + '_vs_direct']:.2f}"))
    print(f"\nimage: {res['files']} files, {ubytes / 2**20:.0f} MiB uncompressed, "
          f"{res['blob_compressed'] / 2**20:.0f} MiB blob, {res['chunks']} chunks; "
          f"kernel {res['kernel']}, {res['cpus']} CPUs")
    for name, val, note in rows:
        print(f"  {name:<38} {val:>12}  {note}")
    res["goals"] = [
        goal("cold / direct (single-threaded loop), medians", res["cold_vs_direct"], ">=", 0.7),
        goal("warm / native, medians", res["warm_vs_native"], ">=", 0.95),
        goal("startup lazy / full, medians", res["startup_lazy_vs_full"], "<=", 0.2)]
    return close_report(res, args.json, anchor)


if __name__ == "__main__":
    sys.exit(main())
