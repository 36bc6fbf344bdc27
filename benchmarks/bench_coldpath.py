#!/usr/bin/env python3
"""The daemon's cold path, side by side in one run (root; Linux 6.14+, fanotify):

    python3 benchmarks/bench_coldpath.py [--mib 1024] [--repeat 3] [--threads 4]
                                         [--workdir DIR] [--json out.json]

One image packed by `erofs-tools pack` (zstd, 1 MiB chunks, blake3) from the generated
tree of bench_daemon (half random, half text), served from a localfs backend. Rounds
alternate, each starting from the same cold state (`settle`: nothing dirty or under
writeback, the blob's disk idle, then `drop_caches`; a native round's cache directory
is deleted as soon as it ends, so its ~1 GiB of dirty cache-file pages are dropped, not
written back under the next round, which made the direct rounds of quiet runs 14-15
bimodal):

  direct    read the blob's chunks straight from the file and decode + verify them with
            the C cold path in this process, at its best: the daemon's own localfs
            reads (O_DIRECT into reused aligned buffers, ~1 MiB ranges) by one thread
            reading 4 ranges ahead, decode + verify in the other: the goal's baseline
            for a cold read (the same chunks and verification; no cache file written,
            no bytes handed to a reader, no events)
  direct1   the same with buffered preads, one thread (the baseline up to quiet run 15:
            the page cache's copy costs it CPU, and it waits for every read the
            kernel's readahead did not cover)
  native    cold sequential read of every file through a fresh daemon (fanotify front
            end, real kernel mount, fresh cache): the C cold path, pipelined requests
  python    the same with FSCACHE_DAEMON_COLDPATH=python (the cold path before: Python
            decode per chunk, requests one after another)

and once, in this process, the **floor**: the same chunks already in memory decoded in
C (libzstd, one call per ~1 MiB range) and hashed (blake3, the package's SIMD code),
nothing else, its CPU time per GiB fetched.

Per cold round: wall time, the daemon's CPU seconds during the read (utime + stime of
its process from /proc, before and after), the fd holder's the same way and the reader
thread's (getrusage; kernel copies out of the mount mostly), bytes fetched, peak RSS
(VmHWM; a fresh daemon per round), and per chunk: each one's read/write-class syscalls
(/proc/PID/io) and context switches, the pre-content events and how many the holder
forwarded, and the reader's wall split three ways (its schedstat: on a CPU, runnable but
waiting for a CPU, asleep: blocked on pre-content events or reads) beside the daemon's
threads' summed runnable wait. Per way the rounds' spread (slowest / fastest). The three CPUs together
bound the wall time: with every CPU busy all along (and the direct way taking just its
CPU time), cold / direct is at most the direct way's CPU / (their CPU / CPUs), printed
beside the measured one. Goals (issue 15): daemon CPU per fetched GiB <= 2.0 x the
floor, daemon peak RSS <= 96 MiB, cold (native) / direct >= 0.9 (medians).
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time

from bench_daemon import drop_caches, packed_tree, read_all, timed
from benchlib import (  # noqa: E402
    REPO,
    announce_anchors,
    close_report,
    goal,
    holder_pid,
    is_root,
    work_dir,
)

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

RANGE = 1 << 20
# ranges the direct way reads ahead of its decoder
DIRECT_DEPTH = 4
TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def thread_cpu() -> float:
    """CPU seconds of the calling thread so far (the reader's, system time mostly)."""
    r = resource.getrusage(resource.RUSAGE_THREAD)
    return r.ru_utime + r.ru_stime


def thread_sched(path: str = "/proc/thread-self/schedstat") -> tuple[float, float, int]:
    """(seconds on a CPU, seconds runnable but waiting for one, timeslices) of a thread so
    far (its schedstat): over a read, what is left of the wall is time asleep (the
    reader: blocked on pre-content events or its reads)."""
    with open(path) as f:
        run, wait, slices = f.read().split()[:3]
    return int(run) / 1e9, int(wait) / 1e9, int(slices)


def proc_sched(pid: int, skip: int = 0) -> tuple[float, float]:
    """(on-CPU, runnable-waiting) seconds of a process's live threads so far, all but
    thread `skip`."""
    run = wait = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        if int(tid) == skip:
            continue
        try:
            r, w, _ = thread_sched(f"/proc/{pid}/task/{tid}/schedstat")
        except (OSError, ValueError):
            continue
        run += r
        wait += w
    return run, wait


def proc_hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def meminfo_kib(*keys: str) -> int:
    """The sum of /proc/meminfo's `keys` (kB)."""
    total = 0
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in keys:
                total += int(rest.split()[0])
    return total


def device_inflight(path: str) -> int:
    """Requests in flight on the block device holding `path` (0 if unknown)."""
    st = os.stat(path)
    try:
        with open(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/inflight") as f:
            return sum(int(x) for x in f.read().split())
    except OSError:
        return 0


def settle(path: str, timeout: float = 60.0) -> float:
    """The same cold state before every round of every way: nothing dirty or under
    writeback, the disk holding `path` idle, then the page cache dropped. Without
    this a direct round right after a native one started while the previous round's
    1 GiB cache file was being written back (drop_caches' sync), and read its blob
    at half speed: the bimodal direct rounds of quiet runs 14 and 15. Seconds waited."""
    t0 = time.monotonic()
    os.sync()
    while time.monotonic() - t0 < timeout:
        if meminfo_kib("Dirty", "Writeback") < 16 << 10 and device_inflight(path) == 0:
            break
        time.sleep(0.05)
    drop_caches()
    return time.monotonic() - t0


def proc_counts(pid: int) -> tuple[int, int]:
    """(read + write syscalls, context switches) of a process so far: /proc/PID/io
    counts every thread's, dead ones too; context switches of its live threads."""
    sysc = 0
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("syscr", "syscw"):
                sysc += int(v)
    cs = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if "ctxt_switches" in line:     # voluntary + involuntary
                        cs += int(line.split()[1])
        except OSError:
            pass
    return sysc, cs


def thread_counts() -> tuple[int, int]:
    """(read + write syscalls, context switches) of the calling thread so far."""
    sysc = 0
    with open("/proc/thread-self/io") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("syscr", "syscw"):
                sysc += int(v)
    r = resource.getrusage(resource.RUSAGE_THREAD)
    return sysc, r.ru_nvcsw + r.ru_nivcsw


def ranges(meta, size=RANGE):
    """The blob's chunks in compressed order, grouped into ranges of ~size bytes."""
    out, cur, start = [], [], None
    for c in sorted(meta.chunks, key=lambda c: c.compressed_offset):
        if cur and c.compressed_offset + c.compressed_size - start > size:
            out.append(cur)
            cur = []
        if not cur:
            start = c.compressed_offset
        cur.append(c)
    if cur:
        out.append(cur)
    return out


def direct1(blob_path: str, blob_id: str) -> int:
    """Read + decode + verify every chunk from the blob file, C cold path, one thread,
    buffered preads (the baseline before the benchmark's settling: see `direct`)."""
    from erofs_tools.reader import blob as rblob
    from erofs_tools.reader import coldpath
    meta = rblob.open_blob(blob_path, blob_id=blob_id)
    n = 0
    fd = os.open(blob_path, os.O_RDONLY)
    try:
        for group in ranges(meta):
            off = group[0].compressed_offset
            end = group[-1].compressed_offset + group[-1].compressed_size
            raw = os.pread(fd, end - off, off)
            dec = coldpath.decode_range(meta, group, raw, off)
            if dec.failed:
                raise SystemExit(f"direct: {dec.failed[0][1]}")
            n += sum(c.uncompressed_size for c in group)
    finally:
        os.close(fd)
    return n


def direct(blob_path: str, blob_id: str, depth: int = DIRECT_DEPTH) -> int:
    """Read + decode + verify every chunk from the blob, at its best: the daemon's own
    localfs reads (O_DIRECT into reused aligned buffers, no page-cache copy), `depth`
    ranges read ahead by one thread while this one decodes + verifies with the C cold
    path (the disk never waits for the decoder, the decoder seldom for the disk)."""
    import concurrent.futures

    from erofs_tools.reader import blob as rblob
    from erofs_tools.reader import coldpath
    from fscache_daemon.storage.backends import LocalFsBackend
    from fscache_daemon.storage.iobuf import BufferPool
    meta = rblob.open_blob(blob_path, blob_id=blob_id)
    backend = LocalFsBackend(os.path.dirname(blob_path))
    pool = BufferPool()
    groups = ranges(meta)

    def fetch(group):
        off = group[0].compressed_offset
        end = group[-1].compressed_offset + group[-1].compressed_size
        return off, *backend.read_pooled(blob_id, off, end - off, pool)

    n = 0
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        inflight = [ex.submit(fetch, g) for g in groups[:depth]]
        for i, group in enumerate(groups):
            off, raw, buf = inflight.pop(0).result()
            if i + depth < len(groups):
                inflight.append(ex.submit(fetch, groups[i + depth]))
            dec = coldpath.decode_range(meta, group, raw, off)
            if dec.failed:
                raise SystemExit(f"direct: {dec.failed[0][1]}")
            n += sum(c.uncompressed_size for c in group)
            del raw
            if buf is not None:
                pool.put(buf)
    backend.close()
    return n


def floor(blob_path: str, blob_id: str) -> tuple[float, int]:
    """CPU seconds to decode + hash every chunk already in memory; compressed bytes."""
    from erofs_tools.reader import blob as rblob
    from erofs_tools.reader import coldpath
    meta = rblob.open_blob(blob_path, blob_id=blob_id)
    with open(blob_path, "rb") as f:
        data = f.read()
    groups = ranges(meta)
    t0 = time.process_time()
    for group in groups:
        off = group[0].compressed_offset
        end = group[-1].compressed_offset + group[-1].compressed_size
        dec = coldpath.decode_range(meta, group, memoryview(data)[off:end], off)
        if dec.failed:
            raise SystemExit(f"floor: {dec.failed[0][1]}")
    cpu = time.process_time() - t0
    return cpu, sum(c.compressed_size for c in meta.chunks)


DIRECT_WAYS = {"direct": direct, "direct1": direct1}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=1024, help="source tree size (MiB)")
    ap.add_argument("--workdir", help="keep the tree and image here (default: a temp dir "
                    "on /var/tmp)")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3, help="rounds of each way")
    ap.add_argument("--ways", default="direct,native,python")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if not is_root("bench_coldpath"):
        return 2
    from test_daemon_support import DaemonProc, pack, release_holder

    work = work_dir(args.workdir, "bench-coldpath-")
    anchor = announce_anchors()
    files, boot, blobs, b, blob_id, blob_path = packed_tree(work, args.mib, pack)
    res: dict = {"mib": args.mib, "kernel": os.uname().release, "cpus": os.cpu_count(),
                 "anchors": anchor, "files": len(files), "chunks": b["chunk_count"],
                 "blob_compressed": b["compressed_size"],
                 "blob_uncompressed": b["uncompressed_size"], "threads": args.threads}

    floor_cpu, floor_bytes = floor(blob_path, blob_id)
    res["floor_cpu_s"] = floor_cpu
    res["floor_cpu_s_per_GiB"] = floor_cpu / (floor_bytes / 2**30)

    mnt = str(work / "mnt")
    os.makedirs(mnt, exist_ok=True)
    ways = args.ways.split(",")
    runs: dict[str, list] = {w: [] for w in ways}
    holder_sock = str(work / "daemon" / "cache" / "fdholder.sock")

    def holder_events() -> dict:
        from fscache_daemon.frontend.fdholder import HolderChannel
        ch = HolderChannel(holder_sock, timeout=10)
        try:
            return ch.status().get("stats", {})
        finally:
            ch.close()

    def cold(mode: str) -> dict:
        ddir = work / "daemon"
        shutil.rmtree(ddir, ignore_errors=True)
        old = os.environ.get("FSCACHE_DAEMON_COLDPATH")
        os.environ["FSCACHE_DAEMON_COLDPATH"] = mode
        try:
            d = DaemonProc(str(ddir), threads=args.threads,
                          extra=["--log-level", "INFO"]).start()
        finally:
            if old is None:
                os.environ.pop("FSCACHE_DAEMON_COLDPATH", None)
            else:
                os.environ["FSCACHE_DAEMON_COLDPATH"] = old
        try:
            d.mount(boot, mnt, f"localfs:{blobs}")
            waited = settle(blob_path)
            pid = d.proc.pid
            hpid = holder_pid(holder_sock)
            ev0 = holder_events()
            u0, s0 = proc_cpu(pid)
            h0 = sum(proc_cpu(hpid)) if hpid else 0.0
            dc0, hc0 = proc_counts(pid), proc_counts(hpid) if hpid else (0, 0)
            r0, rc0 = thread_cpu(), thread_counts()
            ds0, rs0 = proc_sched(pid), thread_sched()
            t, n = timed(read_all, mnt, files)
            rs1, ds1 = thread_sched(), proc_sched(pid)
            r1, rc1 = thread_cpu(), thread_counts()
            u1, s1 = proc_cpu(pid)
            h1 = sum(proc_cpu(hpid)) if hpid else 0.0
            dc1, hc1 = proc_counts(pid), proc_counts(hpid) if hpid else (0, 0)
            ev1 = holder_events()
            hwm = proc_hwm_mib(pid)
            m = d.blob_metrics(blob_id)
            d.umount(mnt)
        finally:
            d.cleanup()
            release_holder(holder_sock)
            # at once: the cache file's ~1 GiB of dirty pages are dropped with it instead
            # of written back under the next round
            shutil.rmtree(ddir, ignore_errors=True)
        return {"s": t, "bytes": n, "cpu": (u1 - u0) + (s1 - s0), "hwm": hwm,
                "fetched": m["bytes_fetched"], "requests": m["backend_requests"],
                "verify_failures": m["verify_failures"], "user": u1 - u0, "sys": s1 - s0,
                "holder_cpu": h1 - h0, "reader_cpu": r1 - r0, "settle_s": waited,
                "daemon_syscalls": dc1[0] - dc0[0], "daemon_cs": dc1[1] - dc0[1],
                "holder_syscalls": hc1[0] - hc0[0], "holder_cs": hc1[1] - hc0[1],
                "reader_syscalls": rc1[0] - rc0[0], "reader_cs": rc1[1] - rc0[1],
                "reader_run": rs1[0] - rs0[0], "reader_wait": rs1[1] - rs0[1],
                "reader_sleep": t - (rs1[0] - rs0[0]) - (rs1[1] - rs0[1]),
                "daemon_wait": ds1[1] - ds0[1],
                "events": ev1.get("events", 0) - ev0.get("events", 0),
                "forwarded": ev1.get("forwarded", 0) - ev0.get("forwarded", 0)}

    def direct_round(fn) -> dict:
        waited = settle(blob_path)
        c0 = resource.getrusage(resource.RUSAGE_SELF)
        t, n = timed(fn, blob_path, blob_id)
        c1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
        return {"s": t, "bytes": n, "cpu": cpu, "settle_s": waited}

    for i in range(args.repeat):
        order = ways if i % 2 == 0 else ways[::-1]
        for w in order:
            if w in DIRECT_WAYS:
                r = direct_round(DIRECT_WAYS[w])
            else:
                r = cold(w)
            runs[w].append(r)
            print(f"round {i + 1} {w}: {r['s']:.2f} s, CPU {r['cpu']:.2f} s" + (
                f" (user {r['user']:.2f}, sys {r['sys']:.2f}), peak RSS {r['hwm']:.1f} MiB; "
                f"holder CPU {r['holder_cpu']:.2f} s, reader CPU {r['reader_cpu']:.2f} s; "
                f"events {r['events']} ({r['forwarded']} forwarded); reader on a CPU "
                f"{r['reader_run']:.2f} s, waiting for one {r['reader_wait']:.2f} s, asleep "
                f"{r['reader_sleep']:.2f} s"
                if w not in DIRECT_WAYS else "") + f"; settled in {r['settle_s']:.2f} s",
                file=sys.stderr, flush=True)

    def med(rs: list[dict], key: str) -> float:
        v = sorted(r[key] for r in rs)
        return v[(len(v) - 1) // 2]

    nchunks = res["chunks"]
    gib = res["blob_uncompressed"] / 2**30
    for w, rs in runs.items():
        t = med(rs, "s")
        res[f"{w}_s"], res[f"{w}_MBps"] = t, rs[0]["bytes"] / t / 1e6
        res[f"{w}_runs_s"] = [round(r["s"], 3) for r in rs]
        # how far the rounds of one way agree: slowest / fastest
        res[f"{w}_spread"] = max(r["s"] for r in rs) / min(r["s"] for r in rs)
        res[f"{w}_cpu_runs_s"] = [round(r["cpu"], 2) for r in rs]
        res[f"{w}_cpu_s"] = med(rs, "cpu")
        if w in DIRECT_WAYS:
            continue
        fetched = med(rs, "fetched")
        res[f"{w}_user_runs_s"] = [round(r["user"], 2) for r in rs]
        res[f"{w}_sys_runs_s"] = [round(r["sys"], 2) for r in rs]
        res[f"{w}_holder_cpu_runs_s"] = [round(r["holder_cpu"], 2) for r in rs]
        res[f"{w}_reader_cpu_runs_s"] = [round(r["reader_cpu"], 2) for r in rs]
        for r in rs:
            r["total_cpu"] = r["cpu"] + r["holder_cpu"] + r["reader_cpu"]
        res[f"{w}_total_cpu_s"] = med(rs, "total_cpu")
        # per component: CPU s per cold GiB, syscalls and context switches per chunk
        res[f"{w}_per_GiB_cpu_s"] = {k: med(rs, c) / gib for k, c in (
            ("daemon", "cpu"), ("holder", "holder_cpu"), ("reader", "reader_cpu"),
            ("all", "total_cpu"))}
        # the reader's wall split: on a CPU, runnable but waiting for one (the daemon's
        # threads and others had them), asleep (pre-content events answered, reads);
        # and how long the daemon's threads waited runnable, summed
        res[f"{w}_reader_split_s"] = {k: med(rs, "reader_" + k) for k in (
            "run", "wait", "sleep")}
        res[f"{w}_daemon_wait_s"] = med(rs, "daemon_wait")
        res[f"{w}_per_chunk"] = {k: med(rs, k) / nchunks for k in (
            "daemon_syscalls", "daemon_cs", "holder_syscalls", "holder_cs",
            "reader_syscalls", "reader_cs", "events", "forwarded")}
        res[f"{w}_fetched_bytes"] = fetched
        res[f"{w}_backend_requests"] = med(rs, "requests")
        res[f"{w}_cpu_s_per_GiB"] = res[f"{w}_cpu_s"] / (fetched / 2**30)
        res[f"{w}_cpu_vs_floor"] = res[f"{w}_cpu_s_per_GiB"] / res["floor_cpu_s_per_GiB"]
        res[f"{w}_peak_rss_MiB"] = max(r["hwm"] for r in rs)
        res[f"{w}_verify_failures"] = sum(r["verify_failures"] for r in rs)
        if "direct" in runs:
            res[f"{w}_vs_direct"] = res[f"{w}_MBps"] / res["direct_MBps"]
            # the best cold / direct the CPU work allows: the direct way taking
            # its CPU time, the cold one every CPU busy all along
            res[f"{w}_vs_direct_cpu_bound"] = res["direct_cpu_s"] / (
                res[f"{w}_total_cpu_s"] / (os.cpu_count() or 1))
    print(f"\nimage: {res['files']} files, {b['uncompressed_size'] / 2**20:.0f} MiB "
          f"uncompressed, {b['compressed_size'] / 2**20:.0f} MiB blob, {res['chunks']} chunks;"
          f" kernel {res['kernel']}, {res['cpus']} CPUs, daemon threads {args.threads}")
    print(f"  floor (in memory: C decode + blake3)     {res['floor_cpu_s_per_GiB']:.2f} "
          "CPU s per fetched GiB")
    for w in ways:
        spread = (f"; rounds {' '.join(f'{x:.2f}' for x in res[w + '_runs_s'])} s, "
                  f"spread {res[w + '_spread']:.2f}")
        if w in DIRECT_WAYS:
            what = ("O_DIRECT reads 4 ahead" if w == "direct" else "buffered preads")
            print(f"  {w:<8} (read + C decode + verify; {what}) {res[w + '_MBps']:.0f} MB/s, "
                  f"CPU {res[w + '_cpu_s']:.2f} s" + spread)
            continue
        print(f"  cold {w:<7} {res[w + '_MBps']:.0f} MB/s"
              + (f" ({res[w + '_vs_direct']:.2f} x direct)" if "direct" in runs else "")
              + f", daemon CPU {res[w + '_cpu_s']:.2f} s = {res[w + '_cpu_s_per_GiB']:.2f} "
              f"s/GiB = {res[w + '_cpu_vs_floor']:.2f} x floor, peak RSS "
              f"{res[w + '_peak_rss_MiB']:.1f} MiB, {res[w + '_backend_requests']} requests; "
              f"daemon + holder + reader CPU {res[w + '_total_cpu_s']:.2f} s"
              + (f" (cold / direct at best {res[w + '_vs_direct_cpu_bound']:.2f} on "
                 f"{res['cpus']} CPUs)" if "direct" in runs else "") + spread)
        g = res[w + "_per_GiB_cpu_s"]
        pc = res[w + "_per_chunk"]
        print("    CPU s per cold GiB: " + ", ".join(f"{k} {v:.2f}" for k, v in g.items())
              + "; per chunk: " + ", ".join(f"{k} {v:.2f}" for k, v in pc.items()))
        sp = res[w + "_reader_split_s"]
        print(f"    reader's wall: on a CPU {sp['run']:.2f} s, runnable waiting "
              f"{sp['wait']:.2f} s, asleep {sp['sleep']:.2f} s; daemon threads runnable "
              f"waiting {res[w + '_daemon_wait_s']:.2f} s (summed)")
    res["goals"] = []
    if "native" in runs:
        res["goals"].append(goal("daemon CPU per fetched GiB / floor", res["native_cpu_vs_floor"],
                                 "<=", 2.0))
        res["goals"].append(goal("daemon peak RSS, MiB", res["native_peak_rss_MiB"], "<=", 96))
        if "direct" in runs:
            res["goals"].append(goal("cold / direct, medians", res["native_vs_direct"], ">=",
                                     0.9))
    return close_report(res, args.json, anchor)


if __name__ == "__main__":
    sys.exit(main())
