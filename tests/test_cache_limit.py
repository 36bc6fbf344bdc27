"""The blob cache size limit (`fscache-daemon run --cache-size`): unused blobs evicted
least recently used first, blobs in use or being mounted never; in process (no kernel)
and through real lazy mounts (fanotify front end) from the real docker-registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import helpers
import pytest
from registry_fixtures import registry  # noqa: F401
from test_daemon_support import DaemonProc, pack, require_lazy_kernel, write_tree
from test_lazy_registry import push_blobs

from fscache_daemon.daemon import Daemon
from fscache_daemon.storage import cachedir


def du(path: str) -> int:
    """Allocated bytes under `path`, as du(1) counts them."""
    out = subprocess.run(["du", "-s", "-B1", path], check=True, capture_output=True,
                         text=True).stdout
    return int(out.split()[0])


def blob_files(cache_dir: str, blob_id: str) -> list[str]:
    d = os.path.join(cache_dir, "blobs")
    return sorted(n for n in os.listdir(d) if n.startswith(blob_id))


def _image(tmp_path, name, seed, size):
    src = write_tree(str(tmp_path / f"src-{name}"), seed=seed, nfiles=4, big=(size,),
                     text=False)
    boot, blobs = str(tmp_path / f"boot-{name}"), str(tmp_path / f"blobs-{name}")
    info = pack(src, boot, blobs)
    return src, boot, blobs, info["blobs"][0]["blob_id"]


def test_lru_eviction_in_process(tmp_path):
    """No kernel: mounts open blobs, fill makes them take space; only unused ones go,
    least recently used first; a pinned blob (a mount opening it) stays."""
    imgs = [_image(tmp_path, n, 40 + i, 1 << 20) for i, n in enumerate("abc")]
    # no limit at start: no evictor thread, the test calls evict_once itself
    d = Daemon(str(tmp_path / "cache"), frontend="none", threads=2, readahead=0)
    d.start()
    try:
        for i, (_src, boot, blobs, bid) in enumerate(imgs):
            mp = str(tmp_path / f"m{i}")
            d.mount(boot, mp, f"localfs:{blobs}")
            d.fill(bid, 0, d.blobs[bid].size)
            d.umount(mp)
            time.sleep(0.05)        # distinct LRU times (mtime resolution is ns here)
        sizes = {bid: e.bytes for bid, e in cachedir.scan(d.blob_dir).items()}
        a, b, c = (x[3] for x in imgs)
        assert sizes[a] > 1 << 20 and set(sizes) == {a, b, c}
        # a mounted blob (c) and a pinned one (a) stay even with a limit of 0
        d.mount(imgs[2][1], str(tmp_path / "m2"), f"localfs:{imgs[2][2]}")
        d.cache_size = 0
        with d.pinned([a]):
            freed = d.evict_once()
            assert freed == sizes[b]
            assert set(cachedir.scan(d.blob_dir)) == {a, c}
        st = d.cache_status()
        assert st["over_limit"] and st["in_use_bytes"] == sizes[c] and st["limit"] == 0
        assert d.evict_once() == sizes[a]              # unpinned now: goes
        assert set(cachedir.scan(d.blob_dir)) == {c}
        assert d.metrics()["cache"]["evicted_blobs"] == 2
        # LRU order: with room for one unused blob, the older one goes
        d.umount(str(tmp_path / "m2"))
        d.cache_size = 1 << 40
        d.mount(imgs[0][1], str(tmp_path / "m0"), f"localfs:{imgs[0][2]}")
        d.fill(a, 0, d.blobs[a].size)
        d.umount(str(tmp_path / "m0"))          # a is now newer than c
        d.cache_size = sizes[a] + 8192
        d.evict_once()
        assert set(cachedir.scan(d.blob_dir)) == {a}
        # the re-fetched blob reads correctly after its first cache was evicted
        d.mount(imgs[0][1], str(tmp_path / "m0"), f"localfs:{imgs[0][2]}")
        assert d.blobs[a].cache.cached_chunks == d.blobs[a].cache.total_chunks
    finally:
        d.shutdown()


def test_evictor_thread_runs_on_release(tmp_path):
    _src, boot, blobs, bid = _image(tmp_path, "x", 50, 1 << 20)
    d = Daemon(str(tmp_path / "cache"), frontend="none", threads=2, readahead=0,
               cache_size=64 << 10)
    d.start()
    try:
        mp = str(tmp_path / "m")
        d.mount(boot, mp, f"localfs:{blobs}")
        d.fill(bid, 0, d.blobs[bid].size)
        time.sleep(1.5)            # the evictor ran at least once: in use, kept
        assert bid in cachedir.scan(d.blob_dir) and d.cache_status()["over_limit"]
        d.umount(mp)
        helpers.wait_until(lambda: bid not in cachedir.scan(d.blob_dir), 30,
                           "the released blob evicted")
        assert not d.cache_status()["over_limit"]
    finally:
        d.shutdown()


def test_cache_size_option_errors():
    p = subprocess.run([sys.executable, "-m", "fscache_daemon.cli", "run", "--cache-size",
                        "lots", "--frontend", "none", "--cache-dir", "/nonexistent/x"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "not a size: 'lots'" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.root
@pytest.mark.registry
def test_lazy_mounts_evict_past_the_limit(registry, tmp_path):  # noqa: F811
    """Real kernel and registry: image A read and unmounted stays cached while it fits;
    image B pushes the cache past --cache-size and A's blob goes (du shows it), B reads
    right; two images in use over the limit both stay and status says so."""
    require_lazy_kernel()
    imgs = {}
    for i, n in enumerate("ABC"):
        src, boot, blobs, bid = _image(tmp_path, n, 60 + i, 3 << 20)
        push_blobs(registry, f"cache/{n.lower()}", "v1", blobs, [bid])
        imgs[n] = (src, boot, bid, f"registry:{registry.host}/cache/{n.lower()}:v1")
    limit = 4 << 20
    daemon = DaemonProc(str(tmp_path / "d"), extra=("--cache-size", "4M")).start()
    blob_dir = os.path.join(daemon.cache_dir, "blobs")

    def status():
        p = subprocess.run([sys.executable, "-m", "fscache_daemon.cli", "status", "--json",
                            "--api-sock", daemon.sock], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    try:
        def mount_and_read(n):
            src, boot, _bid, backend = imgs[n]
            mp = str(tmp_path / f"mnt-{n}")
            daemon.mount(boot, mp, backend)
            helpers.assert_same_tree(src, mp)
            return mp

        mp_a = mount_and_read("A")
        a = imgs["A"][2]
        daemon.umount(mp_a)
        st = status()
        assert st["daemon"]["cache_size"] == limit and st["metrics"]["cache"]["limit"] == limit
        used_a = st["metrics"]["cache"]["bytes"]
        assert (3 << 20) * 0.9 < used_a <= limit, st["metrics"]["cache"]
        assert blob_files(daemon.cache_dir, a)            # fits: kept

        mp_b = mount_and_read("B")
        helpers.wait_until(lambda: not blob_files(daemon.cache_dir, a), 60,
                           "A's blob evicted")
        assert du(blob_dir) <= limit
        helpers.assert_same_tree(imgs["B"][0], mp_b)       # B untouched
        st = status()["metrics"]["cache"]
        assert st["evicted_blobs"] == 1 and st["evicted_bytes"] >= used_a * 0.9
        assert not st["over_limit"] and st["in_use_bytes"] == st["bytes"]

        mp_c = mount_and_read("C")               # B and C in use: over the limit, kept
        time.sleep(2.5)                          # evictor rounds pass
        st = status()["metrics"]["cache"]
        assert st["over_limit"] and st["bytes"] > limit and st["evicted_blobs"] == 1
        assert blob_files(daemon.cache_dir, imgs["B"][2])
        text = subprocess.run([sys.executable, "-m", "fscache_daemon.cli", "status",
                               "--api-sock", daemon.sock], capture_output=True, text=True,
                              timeout=60).stdout
        assert "OVER THE LIMIT (in use)" in text and "limit 4.0 MiB" in text
        daemon.umount(mp_b)
        helpers.wait_until(lambda: not blob_files(daemon.cache_dir, imgs["B"][2]), 60,
                           "B's blob evicted once unmounted")
        assert du(blob_dir) <= limit
        helpers.assert_same_tree(imgs["C"][0], mp_c)
        print(f"cache after A: {used_a} bytes; du after evictions {du(blob_dir)} "
              f"(limit {limit})")
    finally:
        daemon.cleanup()


MIN_ROUNDS = 8


def test_eviction_races_mounts(tmp_path):
    """An evictor looping with a limit of 0 while images are mounted, filled and
    unmounted again and again: a mounted blob's files are always in place and complete
    once filled (the pin covers the window between reading the cache directory and the
    blob being open); unused ones go."""
    import threading
    imgs = [_image(tmp_path, n, 70 + i, 256 << 10) for i, n in enumerate("pq")]
    d = Daemon(str(tmp_path / "cache"), frontend="none", threads=2, readahead=0)
    d.start()
    d.cache_size = 0
    stop = threading.Event()
    rounds = [0]

    def evictor():
        while not stop.is_set():
            d.evict_once()
            rounds[0] += 1
    t = threading.Thread(target=evictor, daemon=True)
    t.start()
    try:
        # mount rounds for 4 s and at least MIN_ROUNDS (a count, not "4 of them within
        # 4 s": a bound a loaded machine could miss), each with evictor rounds seen
        # while the blob is mounted and filled
        deadline = time.monotonic() + 4
        n = 0
        while n < MIN_ROUNDS or time.monotonic() < deadline:
            _src, boot, blobs, bid = imgs[n % 2]
            mp = str(tmp_path / f"m{n}")
            d.mount(boot, mp, f"localfs:{blobs}")
            mgr = d.blobs[bid]
            mgr.fill(0, mgr.size)
            assert mgr.cache.cached_chunks == mgr.cache.total_chunks
            seen = rounds[0]
            helpers.wait_until(lambda s=seen: rounds[0] >= s + 2,
                               what=f"round {n}: the evictor running over the mounted blob")
            for suffix in (".blob", ".chunks"):
                assert os.path.exists(os.path.join(d.blob_dir, bid + suffix)), (n, suffix)
            assert mgr.cache.cached_chunks == mgr.cache.total_chunks
            # the map file is written by the mount's after-mount thread, just after it
            map_file = os.path.join(d.blob_dir, bid + ".map")
            helpers.wait_until(lambda f=map_file: os.path.exists(f),
                               what=f"round {n}: the blob's map file")
            d.umount(mp)
            n += 1
        stop.set()
        t.join(10)
        assert n >= MIN_ROUNDS and rounds[0] > 2 * n
        d.evict_once()
        assert cachedir.scan(d.blob_dir) == {}
        assert d.evicted_blobs >= 2
    finally:
        stop.set()
        d.shutdown()


def test_map_file_not_written_for_an_evicted_blob(tmp_path):
    """The map file the mount's after-mount thread writes (daemon._open_blob): a mount
    unmounted at once, its blob evicted, gets no `<key>.map` written after the eviction
    (one stray file would be a cache entry of its own); unmounted before that thread
    wrote it, the map is written at the release instead (the next mount reads it)."""
    _src, boot, blobs, bid = _image(tmp_path, "s", 90, 256 << 10)
    d = Daemon(str(tmp_path / "cache"), frontend="none", threads=2, readahead=0)
    started = []
    # the after-mount thread held back: the test plays its part at the chosen moments
    d._after_mount = lambda img, mgrs: started.append(mgrs)     # type: ignore[method-assign]
    d.start()
    map_file = os.path.join(d.blob_dir, bid + ".map")
    try:
        # 1. the thread took the map's write just before the umount, and runs it after
        # the blob was released and evicted: nothing is written
        mp = str(tmp_path / "m1")
        d.mount(boot, mp, f"localfs:{blobs}")
        mgr = d.blobs[bid]
        d.fill(bid, 0, mgr.size)
        taken, mgr.after_mount = mgr.after_mount, []
        assert len(taken) == 1 and not os.path.exists(map_file)
        d.umount(mp)
        d.cache_size = 0
        assert d.evict_once() > 0
        assert cachedir.scan(d.blob_dir) == {}
        for fn in taken:
            fn()
        assert cachedir.scan(d.blob_dir) == {}, "a stray map file of an evicted blob"
        assert mgr.run_after_mount() is None and cachedir.scan(d.blob_dir) == {}
        # 2. unmounted before the thread ran: the release writes the map, with the blob
        d.cache_size = None
        mp = str(tmp_path / "m2")
        d.mount(boot, mp, f"localfs:{blobs}")
        mgr2 = d.blobs[bid]
        assert mgr2 is not mgr and mgr2.after_mount and not os.path.exists(map_file)
        d.umount(mp)
        assert os.path.exists(map_file) and not mgr2.after_mount
        assert sorted(blob_files(str(tmp_path / "cache"), bid)) == \
            sorted(bid + s for s in cachedir.SUFFIXES)
        # each mount started its after-mount thread (the stand-in above): on a thread of
        # its own, which may not have run yet when umount returned (seen under load 11)
        helpers.wait_until(lambda: len(started) >= 2, what="both after-mount threads")
        assert len(started) == 2
    finally:
        d.shutdown()
