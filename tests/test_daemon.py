"""The daemon core and its API without a kernel (front end "none"): images sharing blobs,
fills, metrics, the unix-socket API and its error answers, restart pick-up, the worker
pool's priorities and the prefetch pacing."""

import glob
import json
import os
import shutil
import socket
import threading
import time

import helpers
import pytest
from test_daemon_support import pack, write_tree
from test_storage_support import NYDUS_BLOB, NYDUS_BLOB_ID, NYDUS_BOOT

from fscache_daemon.api import ApiClient, ApiServer
from fscache_daemon.daemon import Daemon, NullFrontend, PriorityPool, TokenBucket, prometheus_text
from fscache_daemon.errors import DaemonError


@pytest.fixture
def images(tmp_path_factory):
    base = tmp_path_factory.mktemp("imgs")
    blobs = str(base / "blobs")
    s1 = write_tree(str(base / "s1"), seed=21, nfiles=10, big=(1 << 20,))
    i1 = pack(s1, str(base / "b1"), blobs, "--chunk-size", "0x10000")
    s2 = str(base / "s2")
    write_tree(s2, seed=22, nfiles=5, big=(1 << 20,))
    i2 = pack(s2, str(base / "b2"), blobs, "--chunk-size", "0x10000", "--chunk-dict",
              str(base / "b1"))
    return {"blobs": blobs, "b1": str(base / "b1"), "b2": str(base / "b2"), "i1": i1, "i2": i2}


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(str(tmp_path / "cache"), frontend="none", threads=4, prefetch_rate=0)
    d.start()
    yield d
    d.shutdown()


@pytest.fixture
def api(daemon, tmp_path):
    srv = ApiServer(daemon, str(tmp_path / "run" / "api.sock")).start()
    yield ApiClient(srv.path, timeout=30)
    srv.stop()


def test_images_share_blobs_by_id(daemon, images, tmp_path):
    be = f"localfs:{images['blobs']}"
    r1 = daemon.mount(images["b1"], str(tmp_path / "m1"), be)
    r2 = daemon.mount(images["b2"], str(tmp_path / "m2"), be)
    b1 = [b["blob_id"] for b in r1["blobs"]]
    b2 = [b["blob_id"] for b in r2["blobs"]]
    assert len(b1) == 1 and len(b2) == 2 and b1[0] in b2
    assert len(daemon.blobs) == 2
    shared = daemon.blobs[b1[0]]
    daemon.fill(b1[0], 0, shared.size)
    # the second image sees the chunks the first one fetched
    d2 = {b["blob_id"]: b for b in daemon.describe(daemon.images[str(tmp_path / "m2")])["blobs"]}
    assert d2[b1[0]]["complete"]
    m = daemon.metrics()
    assert sorted(m["blobs"][b1[0]]["mounts"]) == sorted([str(tmp_path / "m1"),
                                                          str(tmp_path / "m2")])
    daemon.umount(str(tmp_path / "m1"))
    assert b1[0] in daemon.blobs           # still used by m2
    daemon.umount(str(tmp_path / "m2"))
    assert daemon.blobs == {} and daemon.images == {}
    # the cache stays on disk for the next mount
    assert os.path.exists(os.path.join(daemon.blob_dir, b1[0] + ".blob"))


def test_mount_errors(daemon, images, tmp_path):
    be = f"localfs:{images['blobs']}"
    with pytest.raises(DaemonError, match="no such bootstrap"):
        daemon.mount(str(tmp_path / "nope"), str(tmp_path / "m"), be)
    with pytest.raises(DaemonError, match="invalid backend"):
        daemon.mount(images["b1"], str(tmp_path / "m"), "ftp:/x")
    with pytest.raises(DaemonError, match="not found|does not exist"):
        daemon.mount(images["b1"], str(tmp_path / "m"), f"localfs:{tmp_path}")
    junk = tmp_path / "junk.boot"
    junk.write_bytes(b"\0" * 8192)
    with pytest.raises(DaemonError, match=str(junk)):
        daemon.mount(str(junk), str(tmp_path / "m"), be)
    assert os.listdir(daemon.boot_dir) == []        # no copy of the bad bootstrap left
    daemon.mount(images["b1"], str(tmp_path / "m"), be)
    with pytest.raises(DaemonError, match="already mounted"):
        daemon.mount(images["b1"], str(tmp_path / "m"), be)
    with pytest.raises(DaemonError, match="not mounted"):
        daemon.umount(str(tmp_path / "other"))
    assert list(daemon.images) == [str(tmp_path / "m")]


@pytest.fixture
def daemon_no_readahead(tmp_path):
    # what one fill fetches, without readahead (which fetches the blob's other small
    # chunk beside it: run ends are guessed from the chunk map before the bootstrap walk)
    d = Daemon(str(tmp_path / "cache"), frontend="none", threads=4, prefetch_rate=0,
               readahead=0)
    d.start()
    yield d
    d.shutdown()


def test_fill_metrics_and_fast_path(daemon_no_readahead, tmp_path):
    daemon = daemon_no_readahead
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    with open(NYDUS_BLOB, "rb") as f:
        (blobs / NYDUS_BLOB_ID).write_bytes(f.read())
    daemon.mount(NYDUS_BOOT, str(tmp_path / "m"), f"localfs:{blobs}")
    assert not daemon.fast_path(NYDUS_BLOB_ID, 0, 4096)
    daemon.fill(NYDUS_BLOB_ID, 0, 4096)
    assert daemon.fast_path(NYDUS_BLOB_ID, 0, 4096)
    with pytest.raises(DaemonError):
        daemon.fill("f" * 64, 0, 1)
    m = daemon.metrics()
    b = m["blobs"][NYDUS_BLOB_ID]
    assert b["requests"] == 2 and b["requests_from_cache"] == 1
    assert b["bytes_fetched"] == 4828 and b["cached_chunks"] == 1 and b["total_chunks"] == 2
    assert b["latency_p99_ms"] >= b["latency_p50_ms"] >= 0
    assert m["process"]["rss_bytes"] > 0 and m["process"]["cpu_user_s"] >= 0
    text = prometheus_text(m)
    assert f'fscache_daemon_blob_requests_total{{blob="{NYDUS_BLOB_ID}"}} 2' in text
    assert f'fscache_daemon_blob_backend_bytes_total{{blob="{NYDUS_BLOB_ID}"}} 4828' in text
    assert "# TYPE fscache_daemon_blob_request_latency_seconds summary" in text
    assert "fscache_daemon_process_resident_memory_bytes " in text
    for line in text.splitlines():
        assert line.startswith("#") or len(line.rsplit(" ", 1)) == 2


def test_restart_picks_up_mounts_and_cache(images, tmp_path):
    cache = str(tmp_path / "cache")
    be = f"localfs:{images['blobs']}"
    d = Daemon(cache, frontend="none", threads=2, readahead=0)
    d.start()
    d.mount(images["b1"], str(tmp_path / "m1"), be)
    blob = next(iter(d.blobs))
    d.fill(blob, 0, 3 * 65536)
    cached = d.blobs[blob].cache.cached_chunks
    d.shutdown()
    with open(os.path.join(cache, "mounts.json")) as f:
        assert [m["mountpoint"] for m in json.load(f)["mounts"]] == [str(tmp_path / "m1")]
    d2 = Daemon(cache, frontend="none", threads=2, readahead=0)
    d2.start()
    try:
        assert list(d2.images) == [str(tmp_path / "m1")]
        mgr = d2.blobs[blob]
        assert mgr.cache.cached_chunks == cached
        assert mgr.meta_bytes_fetched == 0     # chunk map from disk
        d2.fill(blob, 0, 3 * 65536)
        assert mgr.stats.snapshot()["bytes_fetched"] == 0
    finally:
        d2.shutdown()



def test_restart_retries_a_mount_whose_backend_is_away(images, tmp_path):
    """Without a kernel (front end "none"): the record of a mount whose backend is away
    at the restart stays in mounts.json and in `unpicked`, and the restorer thread takes
    it back once the backend is back (tests/test_daemon_restore.py: the same on the
    kernel)."""
    cache, blobs = str(tmp_path / "cache"), str(tmp_path / "blobs")
    shutil.copytree(images["blobs"], blobs)
    mp = str(tmp_path / "m1")
    d = Daemon(cache, frontend="none", threads=2, readahead=0)
    d.start()
    d.mount(images["b1"], mp, f"localfs:{blobs}")
    d.shutdown()
    for f in glob.glob(os.path.join(cache, "blobs", "*.map")):
        os.unlink(f)
    os.rename(blobs, blobs + ".away")
    d2 = Daemon(cache, frontend="none", threads=2, readahead=0)
    d2.start()
    try:
        assert d2.images == {} and [u.mountpoint for u in d2.unpicked] == [mp]
        with open(os.path.join(cache, "mounts.json")) as f:
            assert [m["mountpoint"] for m in json.load(f)["mounts"]] == [mp]
        os.rename(blobs + ".away", blobs)
        deadline = time.monotonic() + 30
        while mp not in d2.images:
            assert time.monotonic() < deadline, [u.error for u in d2.unpicked]
            time.sleep(0.05)
        assert d2.unpicked == []
        blob = next(iter(d2.blobs))
        d2.fill(blob, 0, 65536)     # served: the backend is read again
        assert d2.blobs[blob].stats.snapshot()["bytes_fetched"] > 0
    finally:
        if os.path.isdir(blobs + ".away"):
            os.rename(blobs + ".away", blobs)
        d2.shutdown()


# -- API --------------------------------------------------------------------------------
def test_api_socket_is_root_only(api):
    st = os.stat(api.path)
    assert st.st_mode & 0o777 == 0o600


def test_api_mount_list_metrics_umount(api, images, tmp_path):
    mnt = str(tmp_path / "m")
    st, res = api.request("POST", "/api/v1/mounts", {
        "bootstrap": images["b1"], "mountpoint": mnt, "backend": f"localfs:{images['blobs']}"})
    assert st == 201, res
    assert res["mountpoint"] == mnt and len(res["blobs"]) == 1
    st, lst = api.request("GET", "/api/v1/mounts")
    assert st == 200 and [m["mountpoint"] for m in lst] == [mnt]
    st, info = api.request("GET", "/api/v1/daemon")
    assert st == 200 and info["frontend"] == "none" and info["mounts"] == 1
    st, m = api.request("GET", "/api/v1/metrics")
    assert st == 200 and res["blobs"][0]["blob_id"] in m["blobs"]
    st, text = api.request("GET", "/metrics")
    assert st == 200 and "fscache_daemon_blob_requests_total" in text
    st, _ = api.request("POST", "/api/v1/mounts", {
        "bootstrap": images["b1"], "mountpoint": mnt, "backend": f"localfs:{images['blobs']}"})
    assert st == 409
    st, res = api.request("DELETE", "/api/v1/mounts?mountpoint=" + mnt)
    assert st == 200 and res["unmounted"]
    st, res = api.request("POST", "/api/v1/umount", {"mountpoint": mnt})
    assert st == 404


def test_api_warm_of_a_plain_image_starts_nothing(api, images):
    # zran images: tests/test_zran_warm.py, tests/test_zran_snapshotter.py
    st, res = api.request("POST", "/api/v1/warm", {
        "bootstrap": images["b1"], "backend": f"localfs:{images['blobs']}"})
    assert st == 202 and res == {"zran_blobs": 0}, res
    st, m = api.request("GET", "/api/v1/metrics")
    assert st == 200 and m["zran_warm"] == {"started": 0, "taken": 0, "failed": 0,
                                            "held": 0}


@pytest.mark.parametrize("method,path,body,status", [
    ("GET", "/nope", None, 404),
    ("PUT", "/api/v1/mounts", {}, 405),
    ("GET", "/api/v1/umount", None, 405),
    ("POST", "/api/v1/mounts", b"{not json", 400),
    ("POST", "/api/v1/mounts", b"[1, 2]", 400),
    ("POST", "/api/v1/mounts", {}, 400),
    ("POST", "/api/v1/mounts", {"bootstrap": 1, "mountpoint": "/x", "backend": "localfs:/"}, 400),
    ("POST", "/api/v1/mounts", {"bootstrap": "/x", "mountpoint": "/x", "backend": "localfs:/",
                                "prefetch": "yes"}, 400),
    ("POST", "/api/v1/mounts", {"bootstrap": "/x", "mountpoint": "/x", "backend": "localfs:/",
                                "bogus": 1}, 400),
    ("POST", "/api/v1/mounts", {"bootstrap": "/x", "mountpoint": "/x", "backend": "localfs:/",
                                "options": {"evil": 1}}, 400),
    ("POST", "/api/v1/mounts", {"bootstrap": "/nonexistent", "mountpoint": "/x",
                                "backend": "localfs:/"}, 404),
    ("POST", "/api/v1/mounts", {"bootstrap": "/etc/hostname", "mountpoint": "/x",
                                "backend": "gopher:/"}, 400),
    ("POST", "/api/v1/umount", {"mountpoint": 5}, 400),
    ("POST", "/api/v1/umount", {"mountpoint": "/x", "lazy": "no"}, 400),
    ("DELETE", "/api/v1/mounts", None, 400),
    ("GET", "/api/v1/warm", None, 405),
    ("POST", "/api/v1/warm", {}, 400),
    ("POST", "/api/v1/warm", {"bootstrap": "x", "backend": "localfs:/"}, 400),
    ("POST", "/api/v1/warm", {"bootstrap": "/x", "backend": "localfs:/", "mountpoint": "/x"},
     400),
    ("POST", "/api/v1/warm", {"bootstrap": "/x", "backend": "localfs:/",
                              "options": {"evil": 1}}, 400),
    ("POST", "/api/v1/warm", {"bootstrap": "/nonexistent", "backend": "localfs:/"}, 404),
    ("POST", "/api/v1/warm", {"bootstrap": "/etc/hostname", "backend": "gopher:/"}, 400),
])
def test_api_malformed_requests(api, method, path, body, status):
    raw = body if isinstance(body, bytes) else None
    st, res = api.request(method, path, None if raw is not None else body, raw=raw)
    assert st == status, res
    assert isinstance(res, dict) and res.get("error")
    assert "\n" not in res["error"]


def test_api_raw_protocol_errors(api):
    def raw(req: bytes) -> bytes:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(api.path)
        s.sendall(req)
        out = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            out += b
            if b"\r\n\r\n" in out and b"Content-Length" in out:
                head, _, body = out.partition(b"\r\n\r\n")
                n = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0]
                        .split(b":")[1])
                if len(body) >= n:
                    break
        s.close()
        return out

    assert raw(b"GARBAGE\r\n\r\n").split(b" ")[1] == b"400"
    r = raw(b"POST /api/v1/mounts HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.split(b" ")[1] == b"411"
    r = raw(b"POST /api/v1/mounts HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n")
    assert r.split(b" ")[1] == b"413"
    r = raw(b"POST /api/v1/mounts HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
    assert r.split(b" ")[1] == b"400"
    # the server is still fine
    st, _ = api.request("GET", "/api/v1/daemon")
    assert st == 200


def test_api_refuses_second_server_on_live_socket(daemon, api):
    with pytest.raises(DaemonError, match="another daemon"):
        ApiServer(daemon, api.path)


def test_api_shutdown_request(daemon, tmp_path):
    srv = ApiServer(daemon, str(tmp_path / "s.sock")).start()
    try:
        st, _ = ApiClient(srv.path).request("POST", "/api/v1/shutdown", {})
        assert st == 202 and srv.shutdown_requested.wait(5)
    finally:
        srv.stop()


# -- pool and pacing ------------------------------------------------------------------------
def test_pool_runs_on_demand_before_queued_prefetch():
    pool = PriorityPool(1, prefetch_workers=1)
    order = []
    gate = threading.Event()
    pool.submit(gate.wait)                       # occupy the only worker
    futs = [pool.submit_prefetch(order.append, "p1")]
    t = threading.Thread(target=lambda: futs.append(pool.submit_prefetch(order.append, "p2")))
    t.start()                                    # blocks: one prefetch slot only
    futs += [pool.submit(order.append, "d1"), pool.submit(order.append, "d2")]
    gate.set()
    t.join(5)
    for f in futs:
        f.result(5)
    assert order[:2] == ["d1", "d2"] and sorted(order[2:]) == ["p1", "p2"]
    err = pool.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        err.result(5)
    pool.shutdown()


def test_pool_counts_unfinished_tasks():
    # stats()["unfinished"]: queued or running, any priority, a cancelled one included
    # until dropped (test_lazy_readahead waits for 0 to order its reader)
    pool = PriorityPool(1, prefetch_workers=1)
    gate = threading.Event()
    busy = pool.submit(gate.wait)
    queued = [pool.submit_readahead(int), pool.submit_prefetch(int)]
    dropped = pool.submit(int)
    assert dropped.cancel()
    assert pool.stats()["unfinished"] == 4
    gate.set()
    for f in [busy, *queued]:
        f.result(helpers.HANG)
    helpers.wait_until(lambda: pool.stats()["unfinished"] == 0, what="the pool idle")
    err = pool.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        err.result(helpers.HANG)
    helpers.wait_until(lambda: pool.stats()["unfinished"] == 0, what="a failed task counted")
    pool.shutdown()


def test_token_bucket_paces():
    # on a clock of its own the waits are exact: the first second's burst, then one
    # second per million bytes (an upper bound on the wall clock was a loaded
    # machine's to break)
    now = [100.0]
    waits = []

    class Stop:
        def wait(self, seconds):
            waits.append(seconds)
            now[0] += seconds
            return False
    tb = TokenBucket(1_000_000, clock=lambda: now[0])
    for _ in range(3):
        tb.take(1_000_000, Stop())
    assert waits == [1.0, 1.0], waits
    now[0] += 0.5                                # half a second's tokens back
    tb.take(1_000_000, Stop())
    assert waits[2:] == [0.5], waits
    # on the wall clock: it really waits (never less than its pacing)
    stop = threading.Event()
    tb = TokenBucket(1_000_000)
    t0 = time.monotonic()
    for _ in range(3):
        tb.take(1_000_000, stop)
    assert time.monotonic() - t0 >= 1.6
    TokenBucket(0).take(1 << 40, stop)           # unlimited


def test_prefetch_rate_limit(images, tmp_path):
    d = Daemon(str(tmp_path / "cache"), frontend="none", threads=2, prefetch_rate=1 << 20)
    d.start()
    try:
        t0 = time.monotonic()
        d.mount(images["b1"], str(tmp_path / "m"), f"localfs:{images['blobs']}",
                prefetch=True)
        mgr = next(iter(d.blobs.values()))
        size = mgr.meta.compressed_size
        while not mgr.complete() and time.monotonic() - t0 < helpers.HANG:
            time.sleep(0.05)
        took = time.monotonic() - t0
        assert mgr.complete()
        # one second of burst, then 1 MiB/s
        assert took >= (size - (1 << 20)) / (1 << 20) * 0.8, (took, size)
        assert mgr.stats.snapshot()["prefetch_bytes"] > 0
    finally:
        d.shutdown()


def _package_image(tmp_path_factory, what, names, seed, pyc_size):
    """An image of package `pkg`: each name's .py and a random .pyc of pyc_size bytes."""
    import random
    base = tmp_path_factory.mktemp(what)
    src = base / "src"
    cache = src / "pkg" / "__pycache__"
    cache.mkdir(parents=True)
    r = random.Random(seed)
    for name in names:
        (src / "pkg" / f"{name}.py").write_bytes(b"x = 1\n" * 10)
        (cache / f"{name}.cpython-311.pyc").write_bytes(r.randbytes(pyc_size))
    blobs = str(base / "blobs")
    pack(str(src), str(base / "boot"), blobs, "--chunk-size", "0x10000")
    return {"boot": str(base / "boot"), "blobs": blobs}


@pytest.fixture
def package(tmp_path_factory):
    """An image of a Python package: its __init__ and sibling modules, compiled."""
    return _package_image(tmp_path_factory, "pkg",
                          ("__init__", "alpha", "beta", "gamma", "delta"), 5, 20_000)


def _module_miss(d, package, tmp_path, size=20_000):
    """Mount `package`; (its manager, the chunk of __init__'s .pyc) once the walk is in."""
    d.mount(package["boot"], str(tmp_path / "m"), f"localfs:{package['blobs']}")
    from fscache_daemon.storage.image import file_runs
    mgr = next(iter(d.blobs.values()))
    runs = sorted(file_runs(package["boot"])[0])
    helpers.wait_until(lambda: d._ra[mgr.key]._modules is not None, what="the walk")
    # the .pyc files: `size` bytes each (the .py sources are 60)
    pycs = [r for r in runs if r[1] - r[0] == size]
    assert len(pycs) >= 5
    return mgr, mgr.meta.chunks_for_range(pycs[0][0], 1)[0]


def test_a_module_miss_brings_its_neighbours_next_to_it_in_its_own_request(
        package, tmp_path):
    """The neighbours a miss in a Python module brings (its window) that lie next to it
    in the blob come in the miss's own backend request (at most ALONG_BYTES more), so
    they are there when the reader's request is answered."""
    from fscache_daemon.daemon import ALONG_BYTES, READAHEAD_MAX_GAP
    d = Daemon(str(tmp_path / "cache"), frontend="none", threads=2, readahead=8 << 20)
    d.start()
    try:
        mgr, first = _module_miss(d, package, tmp_path)
        reads, real = [], mgr._read
        def counting(batch):
            reads.append(([c.index for c in batch.chunks], batch.length))
            return real(batch)
        mgr._read = counting
        d.fill(mgr.blob_id, first.uncompressed_offset, 4096)
        mine = [r for r in reads if first.index in r[0]]
        assert len(mine) == 1 and len(mine[0][0]) > 1, reads
        assert mine[0][1] <= first.compressed_size + ALONG_BYTES + READAHEAD_MAX_GAP
        assert all(mgr.cache.has(mgr.meta.chunks[i]) for i in mine[0][0])
        assert mgr.stats.snapshot()["readahead_bytes"] > 0
    finally:
        d.shutdown()


def test_a_bad_chunk_that_came_along_is_not_the_readers_error(package, tmp_path):
    """A window chunk fetched in a reader's request that fails verification is not
    stored and does not fail that reader's read; its own reader gets the error."""
    d = Daemon(str(tmp_path / "cache"), frontend="none", threads=2, readahead=8 << 20)
    d.start()
    try:
        mgr, first = _module_miss(d, package, tmp_path)
        after = [c for c in mgr.meta.chunks if c.compressed_offset > first.compressed_offset]
        bad = min(after, key=lambda c: c.compressed_offset)
        path = os.path.join(package["blobs"], mgr.blob_id)
        with open(path, "r+b") as f:
            f.seek(bad.compressed_offset + bad.compressed_size // 2)
            b = f.read(1)
            f.seek(bad.compressed_offset + bad.compressed_size // 2)
            f.write(bytes([b[0] ^ 0xFF]))
        d.fill(mgr.blob_id, first.uncompressed_offset, 4096)  # no error: its chunk is good
        assert mgr.cache.has(first) and not mgr.cache.has(bad)
        assert mgr.stats.snapshot()["verify_failures"] == 1  # it came along, and failed
        with pytest.raises(Exception, match="chunk"):
            d.fill(mgr.blob_id, bad.uncompressed_offset, 4096)
    finally:
        d.shutdown()

def test_a_request_served_from_the_cache_still_starts_its_window(images, tmp_path):
    """fast_path (a request the cache serves: a marker hit) queues the window the
    readahead plan gives for it."""
    from fscache_daemon.readahead import Window
    d = Daemon(str(tmp_path / "cache"), frontend="none", threads=2, readahead=8 << 20)
    d.start()
    try:
        d.mount(images["b1"], str(tmp_path / "m"), f"localfs:{images['blobs']}")
        mgr = next(iter(d.blobs.values()))
        d.fill(mgr.blob_id, 0, 4096)
        first = mgr.meta.chunks_for_range(0, 1)[0]
        want = [c for c in mgr.meta.chunks[-3:] if not mgr.cache.has(c)]
        assert want
        d._ra[mgr.key].on_request = lambda off, n, fetched: Window(want, None, "marker")
        assert d.fast_path(mgr.key, first.uncompressed_offset, 4096)
        helpers.wait_until(lambda: all(mgr.cache.has(c) for c in want), what="the window")
    finally:
        d.shutdown()


def test_null_frontend_interface():
    fe = NullFrontend()
    for call in (fe.prepare_blob, fe.blob_complete, fe.release_blob, fe.mount):
        call(None)
    fe.umount(None)
    assert fe.stats() == {}


def test_file_aware_readahead(images, tmp_path):
    """A miss at the start of a file fetches the rest of that file in the background,
    and nothing before it nor further than NEIGHBOURS after it."""
    d = Daemon(str(tmp_path / "cache"), frontend="none", threads=2, readahead=8 << 20)
    d.start()
    try:
        d.mount(images["b1"], str(tmp_path / "m"), f"localfs:{images['blobs']}")
        from fscache_daemon.storage.image import file_runs
        runs = sorted(file_runs(images["b1"])[0])
        big = max(runs, key=lambda r: r[1] - r[0])          # the 1 MiB file: 16 chunks
        mgr = next(iter(d.blobs.values()))
        helpers.wait_until(lambda: mgr.run_end(mgr.meta.chunks_for_range(big[0], 1)[0]),
                           what="the file runs")
        d.fill(mgr.blob_id, big[0], 4096)
        helpers.wait_until(lambda: not mgr.missing(big[0], big[1] - big[0]),
                           what="the rest of the file")
        # readahead finished: no task queued or running, seen on three polls in a row (a
        # task between the queue and the running count is invisible for an instant)
        idle = []
        helpers.wait_until(lambda: idle.append(d.pool._q.empty()
                                               and d.pool.ondemand_pending() == 0)
                           or idle[-3:] == [True] * 3, what="an idle worker pool")
        cached = [c for c in mgr.meta.chunks if mgr.cache.has(c)]
        # the file, and of what follows only small files within NEIGHBOURS after it (a
        # program reads neighbouring modules together: readahead.py)
        from fscache_daemon.readahead import NEIGHBOURS, SMALL_FILES_CHUNK
        assert all(big[0] <= c.uncompressed_offset < big[1] or
                   (big[1] <= c.uncompressed_offset < big[1] + NEIGHBOURS
                    and c.uncompressed_size < SMALL_FILES_CHUNK) for c in cached)
        assert any(big[0] <= c.uncompressed_offset < big[1] for c in cached)
        assert not any(c.uncompressed_offset >= big[1] + NEIGHBOURS or
                       c.uncompressed_offset < big[0] for c in cached)
        assert mgr.stats.snapshot()["readahead_bytes"] > 0
    finally:
        d.shutdown()


@pytest.fixture
def big_package(tmp_path_factory):
    """A package whose modules span more than a miss's request takes along."""
    return _package_image(tmp_path_factory, "bigpkg",
                          ["__init__"] + [f"mod{i:02d}" for i in range(11)], 7, 60_000)


@pytest.mark.parametrize("after", [0, 1, 2])
def test_a_miss_window_is_queued_after_its_own_fetch_when_asked(
        big_package, tmp_path, monkeypatch, after):
    """With WINDOW_AFTER_MISS (1: every window; 2: a module miss's neighbours) the window
    a miss plans reaches the backend only once the miss's own request is answered (the
    registry serves that request alone); either way the window is fetched and the miss's
    request is one."""
    from fscache_daemon import daemon as dmod
    monkeypatch.setattr(dmod, "WINDOW_AFTER_MISS", after)
    d = Daemon(str(tmp_path / "cache"), frontend="none", threads=4, readahead=8 << 20)
    d.start()
    try:
        mgr, first = _module_miss(d, big_package, tmp_path, 60_000)
        events, lock, real = [], threading.Lock(), mgr._read
        def logged(batch):
            idx = [c.index for c in batch.chunks]
            with lock:
                events.append(("start", idx))
            try:
                return real(batch)
            finally:
                with lock:
                    events.append(("end", idx))
        mgr._read = logged
        d.fill(mgr.blob_id, first.uncompressed_offset, 4096)
        # the window: the other modules (each its own chunk), not all along
        pycs = [c for c in mgr.meta.chunks if c.uncompressed_size == 60_000]
        assert len(pycs) == 12
        helpers.wait_until(lambda: all(mgr.cache.has(c) for c in pycs), what="the window")
        with lock:
            seen = list(events)
        starts = [e[1] for e in seen if e[0] == "start"]
        mine = [s for s in starts if first.index in s]
        assert len(mine) == 1 and len(starts) >= 2, [(e, len(i)) for e, i in seen]
        if after:
            # the miss's request began first and ended before any window request began
            assert seen[0] == ("start", mine[0]) and seen[1] == ("end", mine[0]), seen
    finally:
        d.shutdown()
