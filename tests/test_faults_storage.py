"""Storage-level faults without a kernel (run everywhere): a backend failing at random
under concurrent fills, a cache file corrupted between two daemon runs, a daemon killed
between a chunk's write and its bit, ENOSPC while storing. The property: a chunk marked
cached holds its verified bytes; every fill either succeeds with the right bytes or
raises FillError; nothing wrong is ever kept.

FAULTS_STORAGE_ROUNDS (default 200) sets the fills of the random-failure test."""

import os
import random
import threading

import pytest
from faults import env_int
from test_storage_support import CountingBackend, make_blob

from erofs_tools.errors import ErofsToolsError
from fscache_daemon.storage import BackendError
from fscache_daemon.storage import blobcache as bc

ROUNDS = env_int("FAULTS_STORAGE_ROUNDS", 200)


def _open(cdir, be, blob_id):
    meta, _ = bc.load_or_fetch_meta(cdir, blob_id, be)
    cache = bc.BlobCache(cdir, meta)
    cache.verify_now()      # what the daemon does once its front end prepared the blob
    return bc.BlobManager(meta, cache, be)


def _expected(meta, datas):
    img = bytearray(meta.uncompressed_size)
    for c in meta.chunks:
        img[c.uncompressed_offset:c.uncompressed_offset + c.uncompressed_size] = datas[c.index]
    return bytes(img)


class FlakyBackend(CountingBackend):
    """Fails, truncates or garbles a random share of reads."""

    def __init__(self, directory, rate, seed):
        super().__init__(directory)
        self.rate = rate
        self.rnd = random.Random(seed)
        self.injected = {"error": 0, "short": 0, "garbled": 0}
        self.lock = threading.Lock()

    def read(self, blob_id, offset, length):
        data = super().read(blob_id, offset, length)
        with self.lock:
            r = self.rnd.random()
            kind = None
            if r < self.rate:
                kind = self.rnd.choice(["error", "short", "garbled"])
                self.injected[kind] += 1
        if kind == "error":
            raise BackendError("injected failure")
        if kind == "short":
            return data[: len(data) // 2]
        if kind == "garbled":
            b = bytearray(data)
            b[self.rnd.randrange(len(b))] ^= 0xFF
            return bytes(b)
        return data


def test_random_backend_failures_under_concurrent_fills(tmp_path):
    bdir, cdir = str(tmp_path / "backend"), str(tmp_path / "cache")
    blob_id, datas = make_blob(bdir, 64, chunk_size=65536)
    be = FlakyBackend(bdir, 0.3, 1)
    meta, _ = bc.load_or_fetch_meta(cdir, blob_id, CountingBackend(bdir))
    mgr = bc.BlobManager(meta, bc.BlobCache(cdir, meta), be, batch_size=256 << 10)
    expected = _expected(meta, dict(enumerate(datas)))
    bad, outcomes = [], {"ok": 0, "error": 0}
    olock = threading.Lock()

    def worker(k):
        rnd = random.Random(k)
        for _ in range(ROUNDS // 8):
            off = rnd.randrange(meta.uncompressed_size)
            n = rnd.choice([1, 4096, 65536, 300_000])
            try:
                mgr.fill(off, n)
                kind = "ok"
                got = os.pread(mgr.cache._own_fd, n, off)
                if got != expected[off:off + n]:
                    bad.append((off, n))
            except ErofsToolsError:
                kind = "error"
            with olock:
                outcomes[kind] += 1

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not bad, bad[:5]
    assert outcomes["error"] > 0 and outcomes["ok"] > 0, outcomes
    assert sum(be.injected.values()) > 0
    # every chunk marked cached holds the right bytes
    for c in meta.chunks:
        if mgr.cache.has(c):
            assert os.pread(mgr.cache._own_fd, c.uncompressed_size, c.uncompressed_offset) \
                == datas[c.index], c.index
    be.rate = 0
    mgr.fill(0, meta.uncompressed_size)
    with open(mgr.cache.path, "rb") as f:
        assert f.read() == expected
    print(f"flaky backend: {outcomes}, injected {be.injected}")
    mgr.close()


@pytest.mark.parametrize("keep_mtime", [False, True])
def test_corruption_between_runs_is_reverified(tmp_path, keep_mtime):
    """keep_mtime: the corrupter sets the cache file's mtime back (`touch -d`); its ctime
    still moved. Before the ctime was compared, the two chunks were served corrupt."""
    bdir, cdir = str(tmp_path / "backend"), str(tmp_path / "cache")
    blob_id, datas = make_blob(bdir, 32, chunk_size=65536)
    mgr = _open(cdir, CountingBackend(bdir), blob_id)
    mgr.fill(0, mgr.size)
    mgr.close()
    # a clean restart re-verifies nothing and fetches nothing
    be = CountingBackend(bdir)
    mgr = _open(cdir, be, blob_id)
    assert mgr.cache.cached_chunks == 32 and not mgr.cache._verify_pending
    mgr.fill(0, mgr.size)
    assert be.reads == []
    mgr.close()
    # corrupt two chunks while "stopped" (later than the record's last write: the check
    # compares mtimes, and a write within the same timestamp tick would look as old)
    import time
    time.sleep(0.05)
    path = bc.cache_path(cdir, blob_id)
    meta = mgr.meta
    victims = [meta.chunks[3], meta.chunks[20]]
    before = os.stat(path)
    with open(path, "r+b") as f:
        for c in victims:
            f.seek(c.uncompressed_offset + 10)
            f.write(b"garbage")
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    be = CountingBackend(bdir)
    mgr = _open(cdir, be, blob_id)
    assert mgr.cache.cached_chunks == 30
    assert not any(mgr.cache.has(c) for c in victims)
    mgr.fill(0, mgr.size)
    assert sorted(r[1] for r in be.reads) == sorted(c.compressed_offset for c in victims)
    with open(path, "rb") as f:
        assert f.read() == _expected(meta, dict(enumerate(datas)))
    mgr.close()


def test_killed_between_write_and_bit(tmp_path):
    """A daemon killed after pwrite of a chunk but before its bit: the chunk is simply
    missing (fetched again); the cache file being newer than the record triggers a
    re-verification of what is recorded, which all passes."""
    bdir, cdir = str(tmp_path / "backend"), str(tmp_path / "cache")
    blob_id, datas = make_blob(bdir, 16, chunk_size=65536)
    mgr = _open(cdir, CountingBackend(bdir), blob_id)
    mgr.fill(0, 5 * 65536)
    mgr.sync()
    c = mgr.meta.chunks[9]
    import time
    time.sleep(0.05)
    # the write of a sixth chunk lands, the process dies before ChunkState.set
    os.pwrite(mgr.cache._own_fd, datas[c.index], c.uncompressed_offset)
    os.close(mgr.cache.state.fd)              # no close(): nothing else is written
    os.close(mgr.cache._own_fd)
    be = CountingBackend(bdir)
    mgr2 = _open(cdir, be, blob_id)
    assert mgr2.cache.cached_chunks == 5 and not mgr2.cache.has(c)
    mgr2.fill(0, mgr2.size)
    with open(mgr2.cache.path, "rb") as f:
        assert f.read() == _expected(mgr2.meta, dict(enumerate(datas)))
    assert len(be.reads) >= 1
    mgr2.close()


def test_store_failure_keeps_nothing(tmp_path, monkeypatch):
    """pwrite failing (ENOSPC) mid-batch: the fill fails, no bit is set for the batch,
    and the next fill (space back) stores the right bytes. (The Python cold path, whose
    os.pwrite can fail on demand; the C path's: test_coldpath.)"""
    import errno
    monkeypatch.setenv("FSCACHE_DAEMON_COLDPATH", "python")
    bdir, cdir = str(tmp_path / "backend"), str(tmp_path / "cache")
    blob_id, datas = make_blob(bdir, 8, chunk_size=65536)
    mgr = _open(cdir, CountingBackend(bdir), blob_id)
    real = os.pwrite
    calls = {"n": 0}

    def failing(fd, data, off):
        if fd == mgr.cache.write_fd:
            calls["n"] += 1
            if calls["n"] >= 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, off)

    monkeypatch.setattr(bc.os, "pwrite", failing)
    try:
        mgr.fill(0, mgr.size)
        raise AssertionError("fill should have failed")
    except ErofsToolsError as e:
        assert "No space left" in str(e)
    monkeypatch.setattr(bc.os, "pwrite", real)
    assert mgr.cache.cached_chunks == 0
    mgr.fill(0, mgr.size)
    with open(mgr.cache.path, "rb") as f:
        assert f.read() == _expected(mgr.meta, dict(enumerate(datas)))
    mgr.close()


def test_chunk_state_reset_is_synced_whenever_bits_could_come_back(tmp_path, monkeypatch):
    """A reset that clears bits a crash could bring back (set, stored, committed, or read
    from an existing record) is fsynced before it returns; a new record's resets, which
    clear nothing on disk, are not (a cold mount's two)."""
    from fscache_daemon.storage import chunkstate
    synced = []
    monkeypatch.setattr(chunkstate.os, "fsync", lambda fd: synced.append(fd))
    path = str(tmp_path / "blob.chunks")
    st = chunkstate.ChunkState(path, 64, 64 << 12, b"d" * 32)
    st.reset()
    assert synced == []
    st.set([3, 5])
    st.reset()
    assert synced == [st.fd] and st.count == 0
    st.reset()
    assert synced == [st.fd]
    st.set([7])
    fd = st.fd
    st.close()
    # an existing record with a bit set: its reset (another map) must be durable
    again = chunkstate.ChunkState(path, 64, 64 << 12, b"e" * 32)
    assert again.mismatched and again.count == 0
    assert len(synced) == 2 and synced[0] == fd
    again.close()
