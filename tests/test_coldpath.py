"""The daemon's cold path in the C core (csrc/coldpath.c, erofs_tools/reader/coldpath.py):
exact bytes for zstd, lz4_block and stored blobs, corrupted chunks never written (EIO
through a real mount, nothing in the cache file, no bit), hostile frames refused by the
decoder, a real write failure (RLIMIT_FSIZE) reported, pipelined backend requests
fetching every byte once, and localfs reads with O_DIRECT into reused buffers (exact
bytes at any offset, short reads refused, a file system without O_DIRECT read through
its page cache)."""

import errno
import os
import random
import resource
import signal
import threading
import time

import blake3
import pytest
import zstandard
from helpers import is_root, require, sys_mount, sys_umount
from test_daemon_support import (
    corrupt_blob_copy,
    drop_caches,
    file_sha,
    lazy_daemon,
    pack,
    regular_files,
    write_tree,
)
from test_storage_support import CountingBackend, chunk_bytes

from erofs_tools import _native
from erofs_tools.builder.blob import BlobWriter
from erofs_tools.errors import ErofsToolsError
from erofs_tools.reader import coldpath
from fscache_daemon.storage import BackendUnavailableError, iobuf
from fscache_daemon.storage import blobcache as bc
from fscache_daemon.storage.backends import LocalFsBackend

COMPRESSORS = ("zstd", "lz4_block", "none")


def make_blob(directory, nchunks, compressor, chunk_size=65536, seed=3):
    """A blob of `nchunks` chunks (half text, half random: each compresses a little; the
    last one short) -> (blob_id, [chunk data], [compressed?])."""
    os.makedirs(directory, exist_ok=True)
    rng = random.Random(seed)
    w = BlobWriter(directory, chunk_size, compressor=compressor)
    cctx = zstandard.ZstdCompressor(level=3)
    datas, comp = [], []
    for i in range(nchunks):
        data = chunk_bytes(rng, chunk_size if i < nchunks - 1 else chunk_size // 2 + 123)
        stored = data
        if compressor == "zstd":
            stored = cctx.compress(data)
        elif compressor == "lz4_block":
            stored = _native.lz4_block_compress(data) or data
        if len(stored) >= len(data):
            stored = data
        w.add_chunk(stored, len(data), blake3.blake3(data).digest())
        datas.append(data)
        comp.append(stored is not data)
    return w.finish().blob_id, datas, comp


def open_mgr(cdir, be, blob_id, **kw):
    meta, _ = bc.load_or_fetch_meta(cdir, blob_id, be)
    cache = bc.BlobCache(cdir, meta)
    cache.verify_now()
    return bc.BlobManager(meta, cache, be, **kw)


def expected(meta, datas):
    img = bytearray(meta.uncompressed_size)
    for c in meta.chunks:
        img[c.uncompressed_offset:c.uncompressed_offset + c.uncompressed_size] = datas[c.index]
    return bytes(img)


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_exact_bytes_and_every_byte_fetched_once(tmp_path, compressor, monkeypatch):
    monkeypatch.delenv("FSCACHE_DAEMON_COLDPATH", raising=False)
    bdir, cdir = str(tmp_path / "b"), str(tmp_path / "c")
    blob_id, datas, comp = make_blob(bdir, 24, compressor)
    if compressor != "none":
        assert sum(comp) >= 20      # the compressed path is the one exercised
    be = CountingBackend(bdir)
    be.pipelined = True     # as a registry backend: the next request read ahead
    # requests of at most 200 KiB: several batches, each read ahead of the decode
    mgr = open_mgr(cdir, be, blob_id, batch_size=200 << 10, pipeline=True)
    assert mgr.native and mgr.pipeline
    be.reads.clear()
    fetched = mgr.fill(0, mgr.size)
    with open(mgr.cache.path, "rb") as f:
        assert f.read() == expected(mgr.meta, datas)
    assert mgr.cache.complete() and mgr.cache.cached_chunks == 24
    # the stored chunks' bytes, each once, in more than one request
    stored = sum(c.compressed_size for c in mgr.meta.chunks)
    assert fetched == be.bytes_read == stored and len(be.reads) > 2
    assert len({r[1] for r in be.reads}) == len(be.reads)
    mgr.close()
    # the record on disk says the same after a reopen (live bits written by the C core)
    mgr2 = open_mgr(cdir, be, blob_id)
    assert mgr2.cache.cached_chunks == 24
    be.reads.clear()
    assert mgr2.fill(0, mgr2.size) == 0 and not be.reads
    mgr2.close()


class OverlapBackend(CountingBackend):
    """The first read waits (up to 20 s) until a second one has started: it returns
    only if the manager had two requests in flight at once."""
    pipelined = True

    def __init__(self, directory):
        super().__init__(directory)
        self.armed = False

    def arm(self):
        self.second = threading.Event()
        self.n = 0
        self.overlapped = None
        self.armed = True

    def read(self, blob_id, offset, length):
        if not self.armed:      # the chunk map's reads
            return super().read(blob_id, offset, length)
        with self._rl:
            self.n += 1
            first = self.n == 1
        if first:
            self.overlapped = self.second.wait(20)
        else:
            self.second.set()
        return super().read(blob_id, offset, length)


def test_next_request_in_flight_while_decoding(tmp_path, monkeypatch):
    monkeypatch.delenv("FSCACHE_DAEMON_COLDPATH", raising=False)
    bdir, cdir = str(tmp_path / "b"), str(tmp_path / "c")
    blob_id, datas, _ = make_blob(bdir, 16, "zstd")
    be = OverlapBackend(bdir)
    mgr = open_mgr(cdir, be, blob_id, batch_size=100 << 10, pipeline=True)
    be.arm()
    mgr.fill(0, mgr.size)
    assert be.n > 2 and be.overlapped, "the second request did not start before the first returned"
    with open(mgr.cache.path, "rb") as f:
        assert f.read() == expected(mgr.meta, datas)
    # a manager not asked to pipeline (the default) starts no thread
    assert not open_mgr(str(tmp_path / "c2"), be, blob_id).pipeline
    mgr.close()


@pytest.mark.parametrize("direct", [False, True], ids=["read", "direct"])
@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_corrupted_chunk_is_never_written(tmp_path, compressor, monkeypatch, direct):
    monkeypatch.delenv("FSCACHE_DAEMON_COLDPATH", raising=False)
    bdir, cdir = str(tmp_path / "b"), str(tmp_path / "c")
    blob_id, datas, _ = make_blob(bdir, 12, compressor)
    # direct: the daemon's own localfs backend (O_DIRECT where the file system takes
    # it); else a wrapper whose read() is used as is
    be = LocalFsBackend(bdir) if direct else CountingBackend(bdir)
    mgr = open_mgr(cdir, be, blob_id)
    assert mgr._pooled
    victim = mgr.meta.chunk_by_index(5)
    # one byte flipped in the middle of the chunk's stored bytes: for zstd and lz4 a
    # decode error or a digest mismatch, for a stored chunk a digest mismatch. Written
    # through the page cache just before the fill: an O_DIRECT read must see it too
    with open(os.path.join(bdir, blob_id), "r+b") as f:
        pos = victim.compressed_offset + victim.compressed_size // 2
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x55]))
    with pytest.raises(bc.FillError) as ei:
        mgr.fill(0, mgr.size)
    assert f"chunk {victim.index}" in str(ei.value)
    assert not mgr.cache.has(victim) and mgr.cache.cached_chunks == 11
    assert mgr.stats.counters["verify_failures"] == 1
    with open(mgr.cache.path, "rb") as f:
        img = f.read()
    want = expected(mgr.meta, datas)
    lo, hi = victim.uncompressed_offset, victim.uncompressed_end
    assert img[lo:hi] == bytes(hi - lo), "a corrupted chunk reached the cache file"
    assert img[:lo] == want[:lo] and img[hi:] == want[hi:]
    # nothing was written there at all: the chunk's slot is still a hole
    fd = mgr.cache.fileno()
    try:
        data_at = os.lseek(fd, lo, os.SEEK_DATA)
    except OSError as e:
        assert e.errno == errno.ENXIO
        data_at = mgr.size
    assert data_at >= hi
    mgr.close()
    state = bc.state_bits(bc.state_path(cdir, blob_id))
    assert not state[victim.index >> 3] & (1 << (victim.index & 7))


def test_store_writes_the_data_before_the_bits_and_outside_the_records_lock(tmp_path,
                                                                            monkeypatch):
    """ChunkState.store_decoded: the bytes go into the cache file without the record's
    lock (ern_cold_write), the bits are set under it (ern_cold_mark) and only after the
    bytes are in the file: while another thread holds the lock the data is there and no
    bit is set; once it lets go, the bits follow."""
    monkeypatch.delenv("FSCACHE_DAEMON_COLDPATH", raising=False)
    bdir, cdir = str(tmp_path / "b"), str(tmp_path / "c")
    blob_id, datas, _ = make_blob(bdir, 6, "zstd")
    mgr = open_mgr(cdir, CountingBackend(bdir), blob_id)
    meta, cache = mgr.meta, mgr.cache
    chunks = sorted(meta.chunks, key=lambda c: c.compressed_offset)
    off = chunks[0].compressed_offset
    with open(os.path.join(bdir, blob_id), "rb") as f:
        f.seek(off)
        raw = f.read(chunks[-1].compressed_offset + chunks[-1].compressed_size - off)
    decoded = coldpath.decode_range(meta, chunks, raw, off)
    assert not decoded.failed
    want = expected(meta, datas)
    got: list = []
    state = cache.state
    with state._lock:
        t = threading.Thread(target=lambda: got.append(
            state.store_decoded(decoded, cache.write_fd, cache.size)))
        t.start()
        deadline = time.monotonic() + 30
        while os.pread(cache.fileno(), meta.uncompressed_size, 0) != want:
            assert time.monotonic() < deadline, "the data waited for the record's lock"
            time.sleep(0.01)
        assert t.is_alive() and state.count == 0
        assert not any(cache.has(c) for c in chunks)
    t.join(30)
    assert got and len(got[0].stored) == 6 and not got[0].failed
    assert state.count == 6 and all(cache.has(c) for c in chunks)
    mgr.close()


def _direct_works(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def test_localfs_direct_reads_exact_bytes_into_reused_buffers(tmp_path):
    bdir = str(tmp_path / "b")
    blob_id, _, _ = make_blob(bdir, 8, "zstd")
    path = os.path.join(bdir, blob_id)
    with open(path, "rb") as f:
        raw = f.read()
    be = LocalFsBackend(bdir)
    pool = iobuf.BufferPool()
    assert be.reads_direct(blob_id) == _direct_works(path)
    size = len(raw)
    rng = random.Random(7)
    cases = [(0, size), (1, 4095), (4095, 2), (4096, 4096), (size - 1, 1),
             (size - 5000, 5000), (size - size % 4096, size % 4096), (100, 0)]
    cases += [(o, rng.randrange(0, size - o + 1)) for o in
              (rng.randrange(0, size) for _ in range(40))]
    bufs = set()
    for off, n in cases:
        data, buf = be.read_pooled(blob_id, off, n, pool)
        assert bytes(data) == raw[off:off + n], (off, n)
        del data
        if buf is not None:
            bufs.add(id(buf))
            pool.put(buf)
    if be.reads_direct(blob_id):
        # one buffer served every read (the pool hands back a free one first)
        assert len(bufs) == 1
    else:
        assert not bufs
    # past the end: the backend's short-read error, the buffer back in the pool
    kept = len(pool._free)
    with pytest.raises(BackendUnavailableError, match="short read"):
        be.read_pooled(blob_id, size - 10, 20, pool)
    assert len(pool._free) == kept
    be.close()
    # a subclass that overrides read() (fault injection, counting) sees every read
    cb = CountingBackend(bdir)
    assert not cb.reads_direct(blob_id)
    data, buf = cb.read_pooled(blob_id, 10, 100, pool)
    assert buf is None and bytes(data) == raw[10:110] and cb.reads == [(blob_id, 10, 100)]


def test_buffer_pool_aligned_and_bounded():
    import ctypes
    pool = iobuf.BufferPool(keep_bytes=2 << 20)
    a, b = pool.get(1 << 20), pool.get((1 << 20) + 8192)
    for x in (a, b):
        assert ctypes.addressof(ctypes.c_char.from_buffer(x.mm)) % 4096 == 0
    assert a.size >= 1 << 20 and b.size >= (1 << 20) + 8192
    # whole huge pages: an O_DIRECT read pins one folio, not hundreds of small pages
    assert a.size % iobuf.GRANULE == 0 and iobuf.GRANULE == 2 << 20
    pool.put(a)
    pool.put(b)
    assert pool._free == [a]    # b would pass the 2 MiB kept
    assert pool.get(4096) is a and pool.get(4096) is not a
    # the smallest free buffer that fits is handed out: a large one waits for large reads
    pool = iobuf.BufferPool(keep_bytes=8 << 20)
    big, small = pool.get(4 << 20), pool.get(1 << 20)
    pool.put(big)
    pool.put(small)
    assert pool.get(4096) is small and pool.get(3 << 20) is big


@pytest.mark.root
def test_localfs_without_o_direct_reads_through_the_page_cache(tmp_path, monkeypatch):
    """ramfs refuses O_DIRECT opens: the same fill, read through the page cache."""
    require(is_root(), "needs root (mounts a ramfs)")
    monkeypatch.delenv("FSCACHE_DAEMON_COLDPATH", raising=False)
    bdir, cdir = str(tmp_path / "ramfs"), str(tmp_path / "c")
    os.makedirs(bdir)
    sys_mount("none", bdir, "ramfs", 0)
    try:
        blob_id, datas, _ = make_blob(bdir, 12, "zstd")
        be = LocalFsBackend(bdir)
        assert not be.reads_direct(blob_id)
        mgr = open_mgr(cdir, be, blob_id, batch_size=100 << 10, pipeline=True)
        mgr.fill(0, mgr.size)
        with open(mgr.cache.path, "rb") as f:
            assert f.read() == expected(mgr.meta, datas)
        mgr.close()
        be.close()
    finally:
        sys_umount(bdir)


def test_digest_mismatch_of_a_valid_frame_is_never_written(tmp_path):
    """A well-formed frame of other bytes (what a hostile backend would serve): decodes,
    fails its digest, and store() writes nothing even when asked to."""
    bdir = str(tmp_path / "b")
    blob_id, datas, _ = make_blob(bdir, 4, "zstd")
    meta = bc.load_or_fetch_meta(str(tmp_path / "c"), blob_id, CountingBackend(bdir))[0]
    c = meta.chunk_by_index(1)
    other = zstandard.ZstdCompressor().compress(bytes(c.uncompressed_size))
    c = c._replace(compressed_offset=0, compressed_size=len(other), compressed=True)
    dec = coldpath.decode_range(meta, [c], other, 0)
    assert len(dec.failed) == 1 and "digest mismatch" in str(dec.failed[0][1])
    path = str(tmp_path / "cache.bin")
    with open(path, "wb") as f:
        f.truncate(meta.uncompressed_size)
    fd = os.open(path, os.O_RDWR)
    try:
        bits = bytearray(1)
        res = dec.store(coldpath.StoreTarget(fd, meta.uncompressed_size, bits, 4))
        assert not res.stored and bits == bytearray(1)
        assert os.pread(fd, meta.uncompressed_size, 0) == bytes(meta.uncompressed_size)
    finally:
        os.close(fd)


def _decode_one(alg, raw, ulen):
    return _native.cold_decode_one(alg, raw, ulen)


def test_decoder_refuses_hostile_frames():
    data = b"erofs cold path " * 4096
    z = zstandard.ZstdCompressor().compress(data)
    assert _decode_one("zstd", z, len(data)) == data
    assert _decode_one("zstd", z + b"\0", len(data)) is None            # trailing bytes
    assert _decode_one("zstd", z + z, len(data)) is None                # two frames
    assert _decode_one("zstd", z[:-3], len(data)) is None               # truncated
    assert _decode_one("zstd", z, len(data) - 1) is None                # declares more
    assert _decode_one("zstd", z, len(data) + 1) is None                # declares less
    bad = bytearray(z)
    bad[4] |= 0x08                                                      # reserved bit
    assert _decode_one("zstd", bytes(bad), len(data)) is None
    assert _decode_one("zstd", b"\x28\xb5\x2f\xfd", len(data)) is None
    # a frame that does not declare its content size (streamed) still decodes exactly
    big = zstandard.ZstdCompressor(write_content_size=False, level=1).compressobj()
    unsized = big.compress(data) + big.flush()
    assert _decode_one("zstd", unsized, len(data)) == data
    l4 = _native.lz4_block_compress(data)
    assert l4 is not None and len(l4) < len(data)
    assert _decode_one("lz4_block", l4, len(data)) == data
    assert _decode_one("lz4_block", l4[:-2], len(data)) is None
    assert _decode_one("lz4_block", l4, len(data) - 1) is None
    assert _decode_one("lz4_block", l4, len(data) + 1) is None
    assert _decode_one("none", data, len(data)) == data
    assert _decode_one("none", data, len(data) - 1) is None
    # chunk places outside the fetched range or the output buffer
    cc = _native.ColdChunks(2, z, bytearray(len(data)))
    cc.set(0, _native.COLD_ALGS["zstd"], 1, len(z), len(data), 0, 0, 0)
    cc.set(1, _native.COLD_ALGS["zstd"], 0, len(z), len(data), 4096, 0, 1)
    assert cc.decode() == 0 and cc.status(0) == cc.status(1) != _native.COLD_OK


def test_write_failure_through_the_c_path(tmp_path, monkeypatch):
    """A real write failure (EFBIG past RLIMIT_FSIZE): the fill fails naming it, the
    chunks beyond the limit have no bit, those written before it are kept, and with the
    limit lifted the next fill completes with the right bytes."""
    monkeypatch.delenv("FSCACHE_DAEMON_COLDPATH", raising=False)
    bdir, cdir = str(tmp_path / "b"), str(tmp_path / "c")
    blob_id, datas, _ = make_blob(bdir, 8, "zstd")
    mgr = open_mgr(cdir, CountingBackend(bdir), blob_id)
    limit = mgr.meta.chunk_by_index(4).uncompressed_offset
    old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
    try:
        with pytest.raises(ErofsToolsError) as ei:
            mgr.fill(0, mgr.size)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_sig)
    assert "too large" in str(ei.value)
    for c in mgr.meta.chunks:
        assert mgr.cache.has(c) == (c.uncompressed_end <= limit), c.index
    mgr.fill(0, mgr.size)
    with open(mgr.cache.path, "rb") as f:
        assert f.read() == expected(mgr.meta, datas)
    mgr.close()


# -- through a real kernel mount (fanotify front end) ------------------------------------

@pytest.fixture
def daemon(tmp_path):
    yield from lazy_daemon(tmp_path)


@pytest.mark.root
@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_mount_reads_exact_bytes(daemon, tmp_path, compressor):
    src = write_tree(str(tmp_path / "src"), seed=11, big=(3 << 20,))
    boot, blobs = str(tmp_path / "boot"), str(tmp_path / "blobs")
    info = pack(src, boot, blobs, "--compressor", compressor, "--chunk-size", "0x40000")
    assert info["blobs"][0]["compressor"] == compressor
    mnt = str(tmp_path / "mnt")
    daemon.mount(boot, mnt, f"localfs:{blobs}")
    drop_caches()
    for rel in regular_files(src):
        assert file_sha(os.path.join(mnt, rel)) == file_sha(os.path.join(src, rel)), rel
    m = daemon.blob_metrics(info["blobs"][0]["blob_id"])
    assert m["verify_failures"] == 0 and m["chunks_fetched"] > 0


@pytest.mark.root
def test_mount_corrupted_chunk_gives_eio_and_nothing_cached(daemon, tmp_path):
    src = write_tree(str(tmp_path / "src"), seed=12, big=(1 << 20,))
    boot, good = str(tmp_path / "boot"), str(tmp_path / "good")
    pack(src, boot, good, "--chunk-size", "0x10000")
    bad = str(tmp_path / "bad")
    victim = "d1/big0.bin"
    blob_id, chunk = corrupt_blob_copy(boot, good, bad, victim, 0x10000 * 3)
    mnt = str(tmp_path / "mnt")
    daemon.mount(boot, mnt, f"localfs:{bad}")
    with open(os.path.join(mnt, victim), "rb") as f:
        head = f.read(0x10000 * 3)      # the chunks before the bad one read fine
        with pytest.raises(OSError) as ei:
            f.read(0x10000)
    assert ei.value.errno == errno.EIO
    with open(os.path.join(src, victim), "rb") as f:
        assert head == f.read(0x10000 * 3)
    assert daemon.blob_metrics(blob_id)["verify_failures"] >= 1
    cache = os.path.join(daemon.cache_dir, "blobs", blob_id + ".blob")
    fd = os.open(cache, os.O_RDONLY)
    try:
        lo, hi = chunk.uncompressed_offset, chunk.uncompressed_end
        try:
            data_at = os.lseek(fd, lo, os.SEEK_DATA)
        except OSError as e:
            assert e.errno == errno.ENXIO
            data_at = hi
        assert data_at >= hi, "the corrupted chunk's slot holds data"
    finally:
        os.close(fd)
    bits = bc.state_bits(os.path.join(daemon.cache_dir, "blobs", blob_id + ".chunks"))
    assert not bits[chunk.index >> 3] & (1 << (chunk.index & 7))


def test_pack_lz4_block_checks_and_unpacks(tmp_path):
    """`pack --compressor lz4_block` (Nydus's raw LZ4 blocks): the blob records lz4_block,
    `check` verifies every chunk, `unpack` gives the tree back byte for byte."""
    import subprocess
    import sys
    src = write_tree(str(tmp_path / "src"), seed=13, nfiles=10, big=(600_000,))
    boot, blobs = str(tmp_path / "boot"), str(tmp_path / "blobs")
    info = pack(src, boot, blobs, "--compressor", "lz4_block", "--chunk-size", "0x10000")
    b = info["blobs"][0]
    assert b["compressor"] == "lz4_block" and b["compressed_size"] < b["uncompressed_size"]
    run = [sys.executable, "-m", "erofs_tools"]
    subprocess.run(run + ["check", boot, "--blob-dir", blobs], check=True,
                   capture_output=True)
    out = str(tmp_path / "out")
    subprocess.run(run + ["unpack", boot, "--blob-dir", blobs, "-o", out], check=True,
                   capture_output=True)
    for rel in regular_files(src):
        assert file_sha(os.path.join(out, rel)) == file_sha(os.path.join(src, rel)), rel
