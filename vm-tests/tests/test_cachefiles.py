"""The cachefiles on-demand front end against a real kernel, inside the QEMU guest.

Run:  vm-tests/run --kernel 6.12 -- python3 -m pytest -q vm-tests/tests/test_cachefiles.py
Outside the guest (VMTEST_GUEST unset) every test skips; inside it none may skip.

Two layers:
- "raw" tests drive CachefilesFrontend in-process with a trivial resolver over an
  mkfs.erofs --blobdev image (uncompressed blob, pread): the protocol itself.
- "daemon" tests run `fscache-daemon run --frontend cachefiles` and
  `fscache-daemon mount` on RAFS v6 images (the Nydus vector, `erofs-tools pack`
  output) with the localfs backend: the whole product.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import select
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

IN_GUEST = os.environ.get("VMTEST_GUEST") == "1"
KERNEL = os.environ.get("VMTEST_KERNEL", "")
pytestmark = pytest.mark.skipif(not IN_GUEST, reason="runs only inside the vm-tests guest")

if IN_GUEST:
    from fscache_daemon.frontend import cachefiles as cf

REPO = Path(__file__).resolve().parents[2]
NYDUS = REPO / "tests" / "data" / "nydus"
log = logging.getLogger("test_cachefiles")


def kernel_version():
    rel = os.uname().release.split("-")[0]
    return tuple(int(x) for x in rel.split(".")[:2])


# --- helpers ---------------------------------------------------------------------------
@pytest.fixture
def scratch(request):
    base = Path(os.environ["VMTEST_SCRATCH"]) / "t" / request.node.name.replace("/", "_")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    yield base


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def read_all(root: Path) -> dict:
    """path -> sha256 of content for every regular file under root (follows nothing)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath, name)
            if p.is_symlink() or not p.is_file():
                continue
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def tree_meta(root: Path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            entry = (st.st_mode, st.st_uid, st.st_gid, st.st_size if not p.is_dir() else 0)
            if p.is_symlink():
                entry += (os.readlink(p),)
            out[rel] = entry
    return out


def make_tree(root: Path, nfiles=24, seed=1, big=(1 << 20)):
    rnd = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "small.txt").write_text("hello from a lazily loaded image\n")
    (root / "sub" / "deeper").mkdir(parents=True)
    for i in range(nfiles):
        size = rnd.choice([0, 1, 100, 4095, 4096, 4097, 65536 + 17, 300_000, big + 123])
        d = root / "sub" / "deeper" if i % 5 == 0 else root / "sub" if i % 3 == 0 else root
        (d / f"f{i:03d}.bin").write_bytes(rnd.randbytes(size))
    os.symlink("small.txt", root / "link")
    os.chmod(root / "small.txt", 0o640)


class RawResolver:
    """bootstrap = the mkfs.erofs image file, blob1 = the --blobdev file, read as is."""

    def __init__(self, fsid, img, blob, corrupt=()):
        self.fsid, self.img, self.blob = fsid, str(img), str(blob)
        self.corrupt = list(corrupt)        # (start, end) blob ranges that fail
        self.lock = threading.Lock()
        self.blob_reads = []

    def __call__(self, volume, cookie):
        if cookie == self.fsid:
            return cf.FileSource(self.img)
        if cookie == "blob1":
            return cf.CallbackSource(os.path.getsize(self.blob), self.read_blob)
        return None

    def read_blob(self, off, length):
        with self.lock:
            self.blob_reads.append((off, length))
        for s, e in self.corrupt:
            if off < e and s < off + length:
                raise OSError(errno.EIO, f"injected corruption at [{s}, {e})")
        with open(self.blob, "rb") as f:
            return os.pread(f.fileno(), length, off)


@pytest.fixture
def raw_image(scratch):
    src = scratch / "src"
    make_tree(src)
    img, blob = scratch / "img", scratch / "blob1"
    subprocess.run(["mkfs.erofs", "--chunksize=65536", f"--blobdev={blob}", str(img),
                    str(src)], check=True, capture_output=True)
    return src, img, blob


class Frontend:
    """An in-process front end plus its mounts; torn down in the right order."""

    def __init__(self, scratch, resolver, **kw):
        self.scratch = scratch
        self.fe = cf.CachefilesFrontend(resolver, str(scratch / "fscache"), **kw)
        self.mounts = []

    def __enter__(self):
        self.fe.start()
        return self

    def mount(self, fsid, name="mnt", domain=None, devices=("blob1",)):
        mnt = self.scratch / name
        mnt.mkdir(exist_ok=True)
        cf.mount_fscache(fsid, str(mnt), domain=domain, devices=devices)
        self.mounts.append(mnt)
        return mnt

    def __exit__(self, *exc):
        for m in reversed(self.mounts):
            try:
                cf.umount(str(m))
            except Exception as e:
                log.warning("umount %s: %s", m, e)
        self.fe.stop(release=True)


# --- raw protocol tests ------------------------------------------------------------------
def test_raw_lazy_correct_and_kernel_only(scratch, raw_image):
    src, img, blob = raw_image
    res = RawResolver("rawimg", img, blob)
    with Frontend(scratch, res) as f:
        mnt = f.mount("rawimg")
        st = f.fe.stats
        # Mounting reads metadata only: the bootstrap is prefetched, no blob READ yet.
        assert st.reads_by_cookie.get(("rawimg", "blob1"), 0) == 0
        assert (mnt / "small.txt").read_text() == (src / "small.txt").read_text()
        # small.txt is inline or one chunk: at most one 64 KiB chunk worth of READs
        assert sum(n for _, n in res.blob_reads) <= 65536
        assert read_all(mnt) == read_all(src)
        assert tree_meta(mnt) == tree_meta(src)
        before = st.reads
        drop_caches()
        assert read_all(mnt) == read_all(src)
        assert st.reads == before, "reads after warm-up must never leave the kernel"


def test_raw_failed_fill_is_eio_for_that_file_only(scratch, raw_image):
    src, img, blob = raw_image
    res = RawResolver("rawcorrupt", img, blob)
    with Frontend(scratch, res) as f:
        mnt = f.mount("rawcorrupt")
        # find the biggest file and fail the blob range of its second 64 KiB chunk
        big = max((p for p in src.rglob("*.bin")), key=lambda p: p.stat().st_size)
        want = big.read_bytes()
        # locate the chunk in the blob by content (chunks are stored whole, 4K-aligned)
        data = blob.read_bytes()
        pos = data.find(want[65536:65536 + 4096])
        assert pos >= 0 and pos % 4096 == 0
        res.corrupt.append((pos, pos + 65536))
        with pytest.raises(OSError) as ei:
            (mnt / big.relative_to(src)).read_bytes()
        assert ei.value.errno == errno.EIO
        others = {k: v for k, v in read_all(src).items() if k != str(big.relative_to(src))
                  and (src / k).read_bytes().find(want[65536:65536 + 4096]) < 0}
        got = {k: hashlib.sha256((mnt / k).read_bytes()).hexdigest() for k in others}
        assert got == others
        assert f.fe.stats.read_errors >= 1
        # the front end keeps serving: fix the backend, the file reads fine now
        res.corrupt.clear()
        assert (mnt / big.relative_to(src)).read_bytes() == want


# --- the daemon: fscache-daemon run --frontend cachefiles ---------------------------------
class DaemonProc:
    """`fscache-daemon run --frontend cachefiles` as a child process, plus API calls."""

    def __init__(self, scratch: Path, threads: int = 4):
        self.scratch = scratch
        self.cache = scratch / "cache"
        self.sock = str(scratch / "api.sock")
        self.logpath = scratch / "daemon.log"
        self.holder_sock = str(self.cache / "cachefiles-holder.sock")
        self.threads = threads
        self.p = None
        self.mounts = []

    def start(self, timeout=120):
        from fscache_daemon.api import socket_answers
        logf = open(self.logpath, "ab")
        self.p = subprocess.Popen(
            ["fscache-daemon", "run", "--cache-dir", str(self.cache), "--api-sock", self.sock,
             "--frontend", "cachefiles", "--threads", str(self.threads),
             "--log-level", "DEBUG"],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
        logf.close()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if socket_answers(self.sock):
                return self
            if self.p.poll() is not None:
                raise AssertionError(f"daemon exited {self.p.returncode}:\n{self.log()}")
            time.sleep(0.1)
        raise AssertionError(f"daemon did not come up:\n{self.log()}")

    def log(self):
        try:
            return self.logpath.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def api(self, method, path, body=None):
        from fscache_daemon.api import ApiClient
        return ApiClient(self.sock).call(method, path, body)

    def mount(self, boot, mnt: Path, blob_dir, domain=None, cli=False):
        mnt.mkdir(parents=True, exist_ok=True)
        if cli:
            cmd = ["fscache-daemon", "mount", str(boot), str(mnt), "--backend",
                   f"localfs:{blob_dir}", "--api-sock", self.sock]
            if domain:
                cmd += ["--domain", domain]
            r = subprocess.run(cmd, capture_output=True, text=True)
            assert r.returncode == 0, r.stderr + "\n" + self.log()
        else:
            self.api("POST", "/api/v1/mounts", {
                "bootstrap": str(boot), "mountpoint": str(mnt),
                "backend": f"localfs:{blob_dir}", "prefetch": False, "domain": domain,
                "options": {}})
        self.mounts.append(mnt)
        return mnt

    def metrics(self):
        return self.api("GET", "/api/v1/metrics")

    def fetched(self, blob_id=None):
        m = self.metrics()
        if blob_id is None:
            return m["totals"]["bytes_fetched"]
        return m["blobs"][blob_id]["bytes_fetched"]

    def requests(self):
        return self.metrics()["totals"]["requests"]

    def kill(self):
        self.p.kill()
        self.p.wait(30)

    def teardown(self):
        for m in reversed(self.mounts):
            try:
                cf.umount(str(m))
            except Exception:
                try:
                    cf.umount(str(m), lazy=True)
                except Exception as e:
                    log.warning("umount %s: %s", m, e)
        if self.p and self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        # let the device go so that the next test binds afresh: wait until it is free
        # (single opener: open() fails with EBUSY while the holder still has it)
        from fscache_daemon.frontend import cachefiles_holder
        cachefiles_holder.release(self.holder_sock)
        wait_device_free()


def wait_device_free(timeout=30.0):
    """Block until /dev/cachefiles can be opened (no daemon or holder has it)."""
    end = time.monotonic() + timeout
    while True:
        try:
            fd = os.open("/dev/cachefiles", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > end:
                raise
            time.sleep(0.01)
            continue
        os.close(fd)
        return


def wait_request_pending(holder_sock, timeout=120.0):
    """Block until the held /dev/cachefiles fd has a new read request (POLLIN): a reader
    is then provably waiting for a daemon, not merely slow to start."""
    from fscache_daemon.frontend import cachefiles_holder
    fd = cachefiles_holder.fetch_fd(holder_sock)
    assert fd is not None, f"no cachefiles holder answers on {holder_sock}"
    try:
        p = select.poll()
        p.register(fd, select.POLLIN)
        return bool(p.poll(int(timeout * 1000)))
    finally:
        os.close(fd)


@pytest.fixture
def daemon(scratch):
    d = DaemonProc(scratch)
    try:
        yield d
    finally:
        d.teardown()


def pack(src: Path, boot: Path, blob_dir: Path, *extra):
    blob_dir.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["erofs-tools", "pack", "-q", "-B", str(boot), "-D", str(blob_dir),
                        *extra, str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return boot


def blob_ids(blob_dir: Path):
    return sorted(p.name for p in blob_dir.iterdir() if len(p.name) == 64)


@pytest.fixture
def packed(scratch):
    src = scratch / "src"
    make_tree(src, nfiles=30, seed=7)
    boot = pack(src, scratch / "image.boot", scratch / "blobs", "--chunk-size", "64K")
    return src, boot, scratch / "blobs"


NYDUS_FILES = {"lib.rs": 16931, "sync_io.rs": 13400}


def test_nydus_vector_through_daemon(daemon, scratch):
    daemon.start()
    mnt = daemon.mount(NYDUS / "rafs-v6-2.2.boot", scratch / "mnt", NYDUS / "blobs", cli=True)
    # mounted: metadata only, no blob data fetched yet
    assert daemon.fetched() == 0
    names = sorted(os.listdir(mnt))
    assert names == sorted(NYDUS_FILES)
    for name, size in NYDUS_FILES.items():
        st = os.stat(mnt / name)
        assert (st.st_size, st.st_mode & 0o7777, st.st_uid, st.st_gid) == (size, 0o644, 0, 0)
    data = {n: (mnt / n).read_bytes() for n in NYDUS_FILES}
    assert [len(v) for v in data.values()] == list(NYDUS_FILES.values())
    assert b"fn " in data["lib.rs"]
    assert daemon.fetched() > 0


def test_lazy_correct_and_kernel_only(daemon, scratch, packed):
    src, boot, blobs = packed
    daemon.start()
    mnt = daemon.mount(boot, scratch / "mnt", blobs)
    assert daemon.fetched() == 0, "mount must fetch no blob data"
    total = sum(p.stat().st_size for p in blobs.iterdir())
    # one small file: at most its chunk plus one batch of neighbours
    assert (mnt / "small.txt").read_text() == (src / "small.txt").read_text()
    small = daemon.fetched()
    assert small <= (1 << 20) + 65536, f"small file fetched {small} of {total} bytes"
    assert small < total
    # everything, with metadata
    assert tree_meta(mnt) == tree_meta(src)
    assert read_all(mnt) == read_all(src)
    fetched = daemon.fetched()
    reqs = daemon.requests()
    fe_reads = daemon.metrics()["frontend_stats"]["reads"]
    drop_caches()
    assert read_all(mnt) == read_all(src)
    m = daemon.metrics()
    assert m["totals"]["requests"] == reqs, "warm reads reached the daemon"
    assert m["frontend_stats"]["reads"] == fe_reads, "warm reads left the kernel"
    assert m["totals"]["bytes_fetched"] == fetched


def _corrupt_chunk_of(path_in_tree, boot, blob_dir):
    """Flip a byte inside the stored (compressed) data of the file's first chunk."""
    from erofs_tools.reader import blob as rblob
    from fscache_daemon.storage.image import load_image
    info = load_image(str(boot))
    content = path_in_tree.read_bytes()
    import blake3
    digest = blake3.blake3(content[:65536]).digest()
    for ref in info.blobs:
        meta = rblob.open_blob(str(blob_dir / ref.blob_id), ref.blob_id, ref.entry)
        for c in meta.chunks:
            d = c.digest or (ref.digests or {}).get(c.index)
            if d == digest:
                p = blob_dir / ref.blob_id
                raw = bytearray(p.read_bytes())
                raw[c.compressed_offset + c.compressed_size // 2] ^= 0xFF
                p.chmod(0o644)
                p.write_bytes(bytes(raw))
                return ref.blob_id, c
    raise AssertionError("chunk not found")


def test_corrupted_chunk_eio_only_for_that_file(daemon, scratch):
    src = scratch / "src"
    make_tree(src, nfiles=12, seed=3)
    victim = src / "victim.bin"
    victim.write_bytes(random.Random(5).randbytes(200_000))
    boot = pack(src, scratch / "image.boot", scratch / "blobs", "--chunk-size", "64K",
                "--compressor", "none")
    _corrupt_chunk_of(victim, boot, scratch / "blobs")
    daemon.start()
    mnt = daemon.mount(boot, scratch / "mnt", scratch / "blobs")
    with pytest.raises(OSError) as ei:
        (mnt / "victim.bin").read_bytes()
    assert ei.value.errno == errno.EIO
    want = read_all(src)
    del want["victim.bin"]
    got = {k: v for k, v in read_all_tolerant(mnt).items() if k != "victim.bin"}
    assert got == want
    m = daemon.metrics()
    assert m["totals"]["verify_failures"] >= 1
    assert daemon.p.poll() is None, "daemon died"
    # still EIO (nothing bad was cached), and the daemon still answers
    with pytest.raises(OSError):
        (mnt / "victim.bin").read_bytes()


def read_all_tolerant(root: Path) -> dict:
    out = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath, name)
            if p.is_symlink():
                continue
            try:
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
            except OSError as e:
                out[str(p.relative_to(root))] = f"error {e.errno}"
    return out


def test_concurrent_readers(daemon, scratch, packed):
    src, boot, blobs = packed
    src2 = scratch / "src2"
    make_tree(src2, nfiles=20, seed=11)
    boot2 = pack(src2, scratch / "image2.boot", scratch / "blobs2", "--chunk-size", "128K")
    daemon.start()
    mnt1 = daemon.mount(boot, scratch / "mnt1", blobs)
    mnt2 = daemon.mount(boot2, scratch / "mnt2", scratch / "blobs2")
    want1, want2 = read_all(src), read_all(src2)
    jobs = [(mnt1, k, v) for k, v in want1.items()] + [(mnt2, k, v) for k, v in want2.items()]
    errors = []

    def reader(i):
        mine = jobs[i::16] + jobs[(i * 7) % len(jobs)::23]
        for mnt, k, v in mine:
            try:
                got = hashlib.sha256((mnt / k).read_bytes()).hexdigest()
                if got != v:
                    errors.append(f"{mnt}/{k}: wrong data")
            except OSError as e:
                errors.append(f"{mnt}/{k}: {e}")
    threads = [threading.Thread(target=reader, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors[:5]
    assert read_all(mnt1) == want1 and read_all(mnt2) == want2


def test_two_images_one_domain_share_blob(daemon, scratch):
    src_a = scratch / "a"
    make_tree(src_a, nfiles=16, seed=21)
    boot_a = pack(src_a, scratch / "a.boot", scratch / "blobs", "--chunk-size", "64K")
    blob_a = blob_ids(scratch / "blobs")
    assert len(blob_a) == 1
    src_b = scratch / "b"
    shutil.copytree(src_a, src_b, symlinks=True)
    (src_b / "only-in-b.bin").write_bytes(random.Random(99).randbytes(150_000))
    boot_b = pack(src_b, scratch / "b.boot", scratch / "blobs", "--chunk-size", "64K",
                  "--chunk-dict", str(boot_a))
    assert len(blob_ids(scratch / "blobs")) == 2
    daemon.start()
    mnt_a = daemon.mount(boot_a, scratch / "mnt-a", scratch / "blobs", domain="shared")
    want_a = read_all(src_a)
    assert read_all(mnt_a) == want_a
    fetched_a = daemon.fetched()
    key_a = f"shared/{blob_a[0]}"
    reads_a = daemon.metrics()["frontend_stats"]["reads_by_cookie"].get(key_a, 0)
    assert reads_a > 0
    mnt_b = daemon.mount(boot_b, scratch / "mnt-b", scratch / "blobs", domain="shared",
                         cli=True)
    # every file B shares with A: no backend bytes and not even a kernel request
    got = {k: hashlib.sha256((mnt_b / k).read_bytes()).hexdigest() for k in want_a}
    assert got == want_a
    assert daemon.fetched() == fetched_a, "shared chunks were fetched again"
    # (B's bootstrap may see a few READs before its prefill lands; blob A sees none)
    assert daemon.metrics()["frontend_stats"]["reads_by_cookie"].get(key_a, 0) == reads_a
    # B's own file comes from its own blob
    assert read_all(mnt_b) == read_all(src_b)
    assert daemon.fetched() > fetched_a
    # (cachefiles keeps new objects as unlinked tmpfiles while in use, so the domain
    # volume's directory cannot show the sharing; the zero READs above prove it)


def _recorded_chunks(daemon, blob_id: str) -> set:
    """The chunk indexes the blob's chunk-state record (live bitmap) holds as verified."""
    from fscache_daemon.storage.chunkstate import state_bits
    bits = state_bits(str(daemon.cache / "blobs" / (blob_id + ".chunks")))
    return {i for i in range(len(bits) * 8) if bits[i >> 3] & (1 << (i & 7))}


def _chunks_of_files(boot: Path, meta, names) -> set:
    """The chunk indexes holding the data of the image files `names` (relative paths)."""
    from fscache_daemon.storage.image import walk_file_runs
    paths, runs = walk_file_runs(str(boot))()
    want = {os.fsencode(n) for n in names}
    out = set()
    for f, _b, start, end in runs:
        if paths[f].lstrip(b"/") in want:
            out |= {c.index for c in meta.chunks_for_range(start, max(1, end - start))}
    return out


def test_sigkill_restart_restore(daemon, scratch, packed):
    from erofs_tools.reader import blob as rblob
    from fscache_daemon.storage.image import load_image
    src, boot, blobs = packed
    (ref,) = load_image(str(boot)).blobs
    meta = rblob.open_blob(str(blobs / ref.blob_id), ref.blob_id, ref.entry)
    daemon.start()
    mnt = daemon.mount(boot, scratch / "mnt", blobs)
    want = read_all(src)
    files = sorted(want)
    half = files[: len(files) // 2]
    for k in half:
        assert hashlib.sha256((mnt / k).read_bytes()).hexdigest() == want[k]
    daemon.kill()
    # What the record holds at the kill: every chunk served before it (the reads above
    # returned only once their chunks were verified, written and recorded). Readahead
    # may have had chunks in flight (fetched, counted in bytes_fetched, not yet written
    # or recorded): those, and only those, are fetched again by the next daemon.
    recorded = _recorded_chunks(daemon, ref.blob_id)
    served = _chunks_of_files(boot, meta, half)
    assert served and served <= recorded, sorted(served - recorded)
    # cached data is served by the kernel alone while no daemon runs
    drop_caches()
    for k in half:
        assert hashlib.sha256((mnt / k).read_bytes()).hexdigest() == want[k]
    # an uncached read now waits for the next daemon (never zeros, never EIO with restore)
    rest = [k for k in files[len(files) // 2:] if (src / k).stat().st_size > 8192]
    assert rest
    results = {}

    def reader():
        for k in rest:
            try:
                results[k] = hashlib.sha256((mnt / k).read_bytes()).hexdigest()
            except OSError as e:
                results[k] = f"error {e.errno}"
    t = threading.Thread(target=reader)
    t.start()
    pending = wait_request_pending(daemon.holder_sock)
    waiting = pending and t.is_alive()
    daemon.start()                  # takes the held fd, writes `restore`
    t.join(300)
    assert not t.is_alive()
    if kernel_version() >= (6, 8) or KERNEL == "6.1":
        assert waiting, "an uncached read completed while no daemon was running"
        assert results == {k: want[k] for k in rest}
        assert daemon.metrics()["frontend_stats"]["restored"] is True
        assert read_all(mnt) == want
        # every chunk is read now; the restarted daemon fetched exactly the ones the
        # record lacked at the kill: none recorded before is fetched again
        b = daemon.metrics()["blobs"][ref.blob_id]
        assert b["complete"] and b["total_chunks"] == len(meta.chunks)
        assert b["chunks_fetched"] == len(meta.chunks) - len(recorded), (b, len(recorded))
        # and their bytes: the stored bytes of the chunks the record lacked, plus what a
        # request may span between them (gaps of recorded chunks, fetched and dropped)
        from fscache_daemon.daemon import READAHEAD_MAX_GAP
        lacked = sum(c.compressed_size for c in meta.chunks if c.index not in recorded)
        assert b["bytes_fetched"] <= lacked + b["backend_requests"] * READAHEAD_MAX_GAP, \
            (b, lacked)
    else:
        pytest.fail(f"kernel {os.uname().release}: restore behaviour not covered")
