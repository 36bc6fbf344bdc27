"""Load: many concurrent readers over several lazily mounted images through one
fscache-daemon (fanotify front end, host kernel, localfs backend), sequential and random
access patterns for a bounded time. One file per image is never read, so no blob
completes and every page-cache miss (page caches are dropped every 4 s) goes through
the daemon for the whole run. Every byte read is compared with the source; the
daemon's RSS is sampled with psutil and must stay under a stated bound; the daemon's
request latency p99 (its metrics API) and the readers' own p99 are recorded.

FAULTS_LOAD_READERS (default 64), FAULTS_LOAD_SECONDS (default 20) and
FAULTS_LOAD_RSS_MB (the bound, default 128) tune it; docs/reliability.md has a longer run.
"""

import os
import random
import threading
import time

import helpers
import psutil
import pytest
from faults import env_int, percentile
from test_daemon_support import DaemonProc, drop_caches, pack, regular_files, require_lazy_kernel

pytestmark = pytest.mark.root

READERS = env_int("FAULTS_LOAD_READERS", 64)
SECONDS = env_int("FAULTS_LOAD_SECONDS", 20)
RSS_BOUND = env_int("FAULTS_LOAD_RSS_MB", 128) << 20


def _tree(root, seed):
    r = random.Random(seed)
    for d in range(4):
        os.makedirs(os.path.join(root, f"d{d}"), exist_ok=True)
        for i in range(25):
            size = r.choice([0, 100, 4096, 50_000, 200_000, 700_000])
            data = r.randbytes(size // 2) + b"text %d " % i * (size // 16)
            with open(os.path.join(root, f"d{d}", f"f{i:02d}"), "wb") as f:
                f.write(data[:size])
    for i in range(3):
        with open(os.path.join(root, f"big{i}"), "wb") as f:
            f.write(r.randbytes(3 << 20) + bytes(1 << 20))
    # never read by the readers: the blob stays incomplete, so its cache file stays
    # marked and every page-cache miss keeps going through the daemon
    with open(os.path.join(root, "unread.bin"), "wb") as f:
        f.write(r.randbytes(1 << 20))
    return root


def test_many_readers_over_several_images(tmp_path):
    require_lazy_kernel()
    blobs = str(tmp_path / "blobs")
    images = []
    for k, extra in enumerate((["--chunk-size", "0x10000"],
                               ["--chunk-size", "0x40000", "--compressor", "none"],
                               ["--chunk-size", "0x100000"],
                               ["--chunk-size", "0x10000"])):
        src = _tree(str(tmp_path / f"s{k}"), 100 + k)
        boot = str(tmp_path / f"b{k}")
        pack(src, boot, blobs, *extra)
        images.append((src, boot))
    # readahead off: it would fetch the unread file too and let the blobs complete
    d = DaemonProc(str(tmp_path / "d"), threads=8, extra=["--readahead", "0"]).start()
    try:
        mnts = []
        for k, (_src, boot) in enumerate(images):
            mnt = str(tmp_path / f"m{k}")
            d.mount(boot, mnt, f"localfs:{blobs}")
            mnts.append(mnt)
        work = []          # (source path, mounted path, size)
        for (src, _), mnt in zip(images, mnts):
            for rel in regular_files(src):
                if rel == "unread.bin":
                    continue
                sp = os.path.join(src, rel)
                work.append((sp, os.path.join(mnt, rel), os.path.getsize(sp)))
        nonempty = [w for w in work if w[2] > 0]
        proc = psutil.Process(d.proc.pid)
        rss = [proc.memory_info().rss]
        stop = threading.Event()
        bad, lat, counts = [], [], {"seq": 0, "rand": 0, "bytes": 0}
        lock = threading.Lock()

        def reader(k):
            rnd = random.Random(k)
            mine_lat = []
            n_seq = n_rand = nbytes = 0
            while not stop.is_set():
                sp, mp, size = rnd.choice(nonempty)
                t0 = time.monotonic()
                try:
                    if k % 2 == 0:                   # sequential: the whole file
                        with open(mp, "rb") as f, open(sp, "rb") as g:
                            while True:
                                a = f.read(1 << 17)
                                b = g.read(1 << 17)
                                if a != b:
                                    bad.append((mp, "sequential", f.tell()))
                                    break
                                if not a:
                                    break
                                nbytes += len(a)
                        n_seq += 1
                    else:                            # random preads
                        fd = os.open(mp, os.O_RDONLY)
                        sfd = os.open(sp, os.O_RDONLY)
                        try:
                            for _ in range(8):
                                off = rnd.randrange(size)
                                n = rnd.choice([1, 512, 4096, 65536, 300_000])
                                a = os.pread(fd, n, off)
                                if a != os.pread(sfd, n, off):
                                    bad.append((mp, "random", off, n))
                                nbytes += len(a)
                        finally:
                            os.close(fd)
                            os.close(sfd)
                        n_rand += 1
                except OSError as e:
                    bad.append((mp, "error", e))
                mine_lat.append(time.monotonic() - t0)
            with lock:
                lat.extend(mine_lat)
                counts["seq"] += n_seq
                counts["rand"] += n_rand
                counts["bytes"] += nbytes

        threads = [threading.Thread(target=reader, args=(k,), daemon=True)
                   for k in range(READERS)]
        t_start = time.monotonic()
        for t in threads:
            t.start()
        next_drop = t_start + 4
        drops = 0
        while time.monotonic() - t_start < SECONDS:
            time.sleep(0.25)
            rss.append(proc.memory_info().rss)
            if time.monotonic() >= next_drop:        # the kernel asks the daemon again
                drop_caches()
                drops += 1
                next_drop += 4
        stop.set()
        for t in threads:
            t.join(120)
        elapsed = time.monotonic() - t_start
        assert not any(t.is_alive() for t in threads), "a reader is stuck"
        m = d.metrics()
        rss.append(m["process"]["rss_bytes"])
        p99_daemon = max(b["latency_p99_ms"] for b in m["blobs"].values())
        p50_daemon = max(b["latency_p50_ms"] for b in m["blobs"].values())
        max_daemon = max(b["latency_max_ms"] for b in m["blobs"].values())
        requests = m["totals"]["requests"]
        print(f"load: {READERS} readers x {elapsed:.1f}s over {len(images)} images "
              f"({len(work)} files): {counts['seq']} sequential file reads, "
              f"{counts['rand']} random-read rounds, {counts['bytes'] / 2**20:.0f} MiB read; "
              f"daemon requests {requests}, fetched {m['totals']['bytes_fetched'] / 2**20:.1f} "
              f"MiB; daemon latency p50 {p50_daemon} ms p99 {p99_daemon} ms max {max_daemon} "
              f"ms; reader op p99 {percentile(lat, 99) * 1000:.1f} ms; daemon RSS max "
              f"{max(rss) / 2**20:.1f} MiB (start {rss[0] / 2**20:.1f} MiB, bound "
              f"{RSS_BOUND >> 20} MiB); threads {m['process']['threads']}, fds "
              f"{m['process']['open_fds']}; page caches dropped {drops} times")
        assert not bad, bad[:10]
        assert counts["seq"] > 0 and counts["rand"] > 0
        assert requests > 0
        assert max(rss) < RSS_BOUND, f"daemon RSS {max(rss)} >= {RSS_BOUND}"
        assert m["totals"]["verify_failures"] == 0 and m["totals"]["requests_failed"] == 0
        for (src, _), mnt in zip(images, mnts):
            helpers.assert_same_tree(src, mnt)
    finally:
        d.cleanup()
