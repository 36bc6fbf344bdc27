"""Storage layer: backends, chunk maps, blob cache files, chunk state, planner, fetcher."""

import os
import threading

import pytest
from test_storage_support import (
    NYDUS_BLOB,
    NYDUS_BLOB_ID,
    CountingBackend,
    copy_backend_dir,
    corrupt,
    make_blob,
)

from erofs_tools.reader import blob as rblob
from fscache_daemon.storage import BackendError, StorageError
from fscache_daemon.storage import blobcache as bc
from fscache_daemon.storage.backends import LocalFsBackend, open_backend, parse_backend_spec
from fscache_daemon.storage.planner import OVERLAP_MAX, Batch, clamp_range, plan


def open_manager(cache_dir, backend, blob_id, **kw):
    meta, fetched = bc.load_or_fetch_meta(cache_dir, blob_id, backend)
    cache = bc.BlobCache(cache_dir, meta)
    return bc.BlobManager(meta, cache, backend, **kw), fetched


def expected_cache_image(meta, datas_by_index):
    img = bytearray(meta.uncompressed_size)
    for c in meta.chunks:
        img[c.uncompressed_offset:c.uncompressed_offset + c.uncompressed_size] = \
            datas_by_index[c.index]
    return bytes(img)


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def nydus(tmp_path):
    bdir = tmp_path / "backend"
    copy_backend_dir(NYDUS_BLOB, str(bdir))
    return str(bdir), str(tmp_path / "cache")


@pytest.fixture
def synth(tmp_path):
    bdir = str(tmp_path / "backend")
    blob_id, datas = make_blob(bdir, 48, chunk_size=65536)
    return bdir, str(tmp_path / "cache"), blob_id, datas


# -- nydus vector -------------------------------------------------------------------------
def test_nydus_vector_full_fill(nydus):
    bdir, cdir = nydus
    be = CountingBackend(bdir)
    mgr, meta_bytes = open_manager(cdir, be, NYDUS_BLOB_ID)
    assert 0 < meta_bytes < 14554
    meta = mgr.meta
    assert mgr.size == 36864 and len(meta.chunks) == 2
    be.reads.clear()
    fetched = mgr.fill(0, mgr.size)
    assert fetched == sum(c.compressed_size for c in meta.chunks)
    assert mgr.complete()
    with open(NYDUS_BLOB, "rb") as f:
        read_at = rblob.file_reader(f)
        want = {c.index: rblob.read_chunk(meta, c, read_at) for c in meta.chunks}
    assert read_file(mgr.cache.path) == expected_cache_image(meta, want)
    # the two chunks are neighbours in the blob: one backend request
    assert len(be.reads) == 1
    # again: served from the cache, nothing fetched
    assert mgr.fill(0, mgr.size) == 0
    s = mgr.stats.snapshot()
    assert s["requests"] == 2 and s["requests_from_cache"] == 1
    assert s["bytes_fetched"] == fetched and s["verify_failures"] == 0
    mgr.close()


def test_nydus_vector_partial_fill_fetches_one_chunk(nydus):
    bdir, cdir = nydus
    be = CountingBackend(bdir)
    mgr, _ = open_manager(cdir, be, NYDUS_BLOB_ID)
    be.reads.clear()
    c1 = mgr.meta.chunks[1]
    mgr.fill(c1.uncompressed_offset + 4096, 100)      # inside chunk 1 only
    assert be.reads == [(NYDUS_BLOB_ID, c1.compressed_offset, c1.compressed_size)]
    assert not mgr.cache.has(mgr.meta.chunks[0]) and mgr.cache.has(c1)
    assert not mgr.complete()
    # chunk 0's slot is still a hole
    assert os.lseek(mgr.cache.fd if hasattr(mgr.cache, "fd") else mgr.cache._own_fd, 0,
                    os.SEEK_DATA) == c1.uncompressed_offset
    mgr.close()


def test_chunk_map_cached_on_disk(nydus):
    bdir, cdir = nydus
    be = CountingBackend(bdir)
    m1, fetched1 = bc.load_or_fetch_meta(cdir, NYDUS_BLOB_ID, be)
    assert fetched1 > 0 and os.path.exists(bc.map_path(cdir, NYDUS_BLOB_ID))
    be.reads.clear()
    m2, fetched2 = bc.load_or_fetch_meta(cdir, NYDUS_BLOB_ID, be)
    assert fetched2 == 0 and be.reads == []
    assert m2.to_bytes() == m1.to_bytes()
    # a damaged map is refetched, not trusted
    with open(bc.map_path(cdir, NYDUS_BLOB_ID), "r+b") as f:
        f.write(b"garbage!")
    m3, fetched3 = bc.load_or_fetch_meta(cdir, NYDUS_BLOB_ID, be)
    assert fetched3 > 0 and m3.to_bytes() == m1.to_bytes()


def test_nydus_vector_corrupt_chunk(nydus):
    bdir, cdir = nydus
    be = CountingBackend(bdir)
    meta, _ = bc.load_or_fetch_meta(cdir, NYDUS_BLOB_ID, be)   # map from the good blob
    c0, c1 = meta.chunks
    corrupt(os.path.join(bdir, NYDUS_BLOB_ID), c1.compressed_offset + c1.compressed_size // 2, 4)
    mgr = bc.BlobManager(meta, bc.BlobCache(cdir, meta), be)
    with pytest.raises(bc.FillError) as ei:
        mgr.fill(0, mgr.size)
    assert "chunk 1" in str(ei.value)
    assert mgr.cache.has(c0) and not mgr.cache.has(c1)
    data = read_file(mgr.cache.path)
    assert data[c1.uncompressed_offset:] == bytes(mgr.size - c1.uncompressed_offset)
    assert mgr.stats.snapshot()["verify_failures"] == 1
    # the good chunk keeps being served; the bad one fails again (never cached)
    assert mgr.fill(0, 4096) == 0
    with pytest.raises(bc.FillError):
        mgr.fill(c1.uncompressed_offset, 4096)
    assert mgr.stats.snapshot()["verify_failures"] == 2
    assert not mgr.complete()
    mgr.close()
    # nothing bad was persisted
    mgr2, _ = open_manager(cdir, be, NYDUS_BLOB_ID)
    assert mgr2.cache.has(c0) and not mgr2.cache.has(c1)
    mgr2.close()


# -- synthetic blobs ----------------------------------------------------------------------
def test_synthetic_full_fill_matches(synth):
    bdir, cdir, blob_id, datas = synth
    mgr, _ = open_manager(cdir, CountingBackend(bdir), blob_id)
    mgr.fill(0, mgr.size)
    assert read_file(mgr.cache.path) == expected_cache_image(mgr.meta, dict(enumerate(datas)))
    assert mgr.cache.cached_chunks == 48
    mgr.close()


def test_none_compressor(tmp_path):
    bdir = str(tmp_path / "b")
    blob_id, datas = make_blob(bdir, 9, chunk_size=16384, compressor="none")
    mgr, _ = open_manager(str(tmp_path / "c"), CountingBackend(bdir), blob_id)
    mgr.fill(0, mgr.size)
    assert read_file(mgr.cache.path) == expected_cache_image(mgr.meta, dict(enumerate(datas)))
    mgr.close()


def test_range_maps_to_whole_chunks_and_skips_cached(synth):
    bdir, cdir, blob_id, datas = synth
    be = CountingBackend(bdir)
    mgr, _ = open_manager(cdir, be, blob_id, batch_size=1 << 30)
    meta = mgr.meta
    be.reads.clear()
    mgr.fill(65536 * 3 + 10, 65536)          # touches chunks 3 and 4
    assert [c.index for c in meta.chunks if mgr.cache.has(c)] == [3, 4]
    assert len(be.reads) == 1                # neighbours merged
    be.reads.clear()
    mgr.fill(65536 * 2, 65536 * 4)           # chunks 2..5: 3,4 cached
    cs = {c.index: c for c in meta.chunks}
    assert sorted(be.reads) == sorted([(blob_id, cs[2].compressed_offset, cs[2].compressed_size),
                                       (blob_id, cs[5].compressed_offset, cs[5].compressed_size)])


def test_batch_size_limits_merging(synth):
    bdir, cdir, blob_id, datas = synth
    be = CountingBackend(bdir)
    mgr, _ = open_manager(cdir, be, blob_id, batch_size=100_000)
    be.reads.clear()
    mgr.fill(0, mgr.size)
    assert all(r[2] <= 100_000 or r[2] == max(c.compressed_size for c in mgr.meta.chunks)
               for r in be.reads)
    assert 1 < len(be.reads) < 48
    total = sum(c.compressed_size for c in mgr.meta.chunks)
    assert be.bytes_read == total


def test_planner_unit():
    from erofs_tools.reader.blob import BlobChunk

    def ch(i, coff, csize):
        return BlobChunk(i, i * 4096, 4096, coff, csize, None, True)

    chunks = [ch(0, 0, 100), ch(1, 100, 100), ch(2, 200, 100), ch(3, 1000, 50), ch(1, 100, 100)]
    b = plan(chunks, batch_size=250)
    assert [[c.index for c in x.chunks] for x in b] == [[0, 1], [2], [3]]
    assert (b[0].offset, b[0].length) == (0, 200)
    b = plan(chunks, batch_size=10_000)
    assert [[c.index for c in x.chunks] for x in b] == [[0, 1, 2], [3]]
    b = plan([ch(5, 0, 999)], batch_size=10)       # oversize chunk still fetched alone
    assert len(b) == 1 and b[0].length == 999
    assert clamp_range(5000, 10, 1 << 20) == (4096, 4096)
    assert clamp_range(0, 1 << 30, 8192) == (0, 8192)
    assert clamp_range(9000, 10, 8192) == (8192, 0)
    raw = bytes(range(200))
    assert Batch([ch(0, 0, 100), ch(1, 100, 100)]).slice_of(raw, ch(1, 100, 100)) == raw[100:]
    # zran: chunks of one access point share its compressed range (one request, even when
    # it is larger than a batch); a later point's range overlapping it joins the request
    # while the batch size allows
    z = [ch(0, 0, 5000), ch(1, 0, 5000), ch(2, 0, 4000), ch(3, 4500, 1000),
         ch(4, 9000, 800), ch(5, 0, 5200)]
    b = plan(z, batch_size=1000)
    assert [[c.index for c in x.chunks] for x in b] == [[0, 1, 2, 5, 3], [4]]
    assert (b[0].offset, b[0].length) == (0, 5500)
    b = plan(z, batch_size=6000)
    assert [[c.index for c in x.chunks] for x in b] == [[0, 1, 2, 5, 3], [4]]
    assert (b[0].offset, b[0].length) == (0, 5500)
    # a range starting inside the request (the next access point before the previous
    # chunk's end) joins it whatever the batch size: the overlap is fetched once
    seq = [ch(i, i * 200_000, 900_000) for i in range(5)]
    b = plan(seq, batch_size=1 << 20)
    assert len(b) == 1 and b[0].length == 4 * 200_000 + 900_000
    # up to OVERLAP_MAX: a reader waiting on a chunk in it waits for all of it
    seq = [ch(i, i * 300_000, 900_000) for i in range(12)]
    b = plan(seq, batch_size=1 << 20)
    assert len(b) > 1 and all(x.length <= OVERLAP_MAX for x in b)
    assert sorted(c.index for x in b for c in x.chunks) == list(range(12))
    far = [ch(0, 0, 900_000), ch(1, 900_000 + 10, 900_000)]     # no overlap: two
    assert len(plan(far, batch_size=1 << 20)) == 2


def test_restart_reloads_state_and_never_refetches(synth):
    bdir, cdir, blob_id, datas = synth
    be = CountingBackend(bdir)
    mgr, _ = open_manager(cdir, be, blob_id)
    for i in (0, 7, 8, 30):
        mgr.fill(i * 65536, 1)
    mgr.close()
    be2 = CountingBackend(bdir)
    mgr2, meta_fetch = open_manager(cdir, be2, blob_id)
    assert meta_fetch == 0
    assert sorted(c.index for c in mgr2.meta.chunks if mgr2.cache.has(c)) == [0, 7, 8, 30]
    mgr2.fill(0, mgr2.size)
    fetched_offsets = {r[1] for r in be2.reads}
    cs = {c.index: c for c in mgr2.meta.chunks}
    for i in (0, 7, 8, 30):
        assert cs[i].compressed_offset not in fetched_offsets
    assert read_file(mgr2.cache.path) == expected_cache_image(mgr2.meta, dict(enumerate(datas)))
    mgr2.close()


def test_state_without_data_is_not_trusted(synth):
    bdir, cdir, blob_id, datas = synth
    mgr, _ = open_manager(cdir, CountingBackend(bdir), blob_id)
    mgr.fill(0, mgr.size)
    mgr.close()
    path = bc.cache_path(cdir, blob_id)
    size = os.path.getsize(path)
    # punch the data out behind the daemon's back: truncate and re-extend
    os.truncate(path, 65536 * 10)
    os.truncate(path, size)
    be = CountingBackend(bdir)
    mgr2, _ = open_manager(cdir, be, blob_id)
    assert mgr2.cache.cached_chunks == 10
    mgr2.fill(0, mgr2.size)
    assert read_file(path) == expected_cache_image(mgr2.meta, dict(enumerate(datas)))
    mgr2.close()
    # wrong-size cache file: everything reset
    os.truncate(path, 4096)
    mgr3, _ = open_manager(cdir, CountingBackend(bdir), blob_id)
    assert mgr3.cache.cached_chunks == 0 and os.path.getsize(path) == size
    mgr3.close()


def test_damaged_state_record_resets(synth):
    bdir, cdir, blob_id, datas = synth
    mgr, _ = open_manager(cdir, CountingBackend(bdir), blob_id)
    mgr.fill(0, mgr.size)
    mgr.close()
    with open(bc.state_path(cdir, blob_id), "r+b") as f:
        f.write(b"NOTMAGIC")
    mgr2, _ = open_manager(cdir, CountingBackend(bdir), blob_id)
    assert mgr2.cache.cached_chunks == 0
    mgr2.close()


def test_single_flight_under_concurrency(synth):
    bdir, cdir, blob_id, datas = synth
    be = CountingBackend(bdir, delay=0.01)
    mgr, _ = open_manager(cdir, be, blob_id, batch_size=65536 * 2)
    be.reads.clear()
    errors = []
    barrier = threading.Barrier(16)

    def reader(k):
        try:
            barrier.wait()
            # overlapping ranges, different starting points
            for j in range(8):
                off = ((k * 5 + j * 7) % 48) * 65536
                mgr.fill(off, 65536 * 3)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=reader, args=(k,)) for k in range(16)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    # every chunk fetched at most once
    offsets = []
    cs = sorted(mgr.meta.chunks, key=lambda c: c.compressed_offset)
    for _, off, length in be.reads:
        offsets += [c.index for c in cs if off <= c.compressed_offset < off + length]
    assert len(offsets) == len(set(offsets))
    mgr.fill(0, mgr.size)
    assert read_file(mgr.cache.path) == expected_cache_image(mgr.meta, dict(enumerate(datas)))
    mgr.close()


def test_backend_failure_then_recovery(synth):
    bdir, cdir, blob_id, datas = synth
    be = CountingBackend(bdir)
    mgr, _ = open_manager(cdir, be, blob_id)
    be.fail = BackendError("network down")
    with pytest.raises(bc.FillError, match="network down"):
        mgr.fill(0, 65536 * 2)
    assert mgr.cache.cached_chunks == 0
    assert mgr.stats.snapshot()["backend_errors"] >= 1
    be.fail = None
    mgr.fill(0, 65536 * 2)
    assert mgr.cache.cached_chunks == 2
    mgr.close()


def test_waiters_see_the_fetchers_failure(synth):
    bdir, cdir, blob_id, datas = synth
    be = CountingBackend(bdir, delay=0.2)
    mgr, _ = open_manager(cdir, be, blob_id)
    be.reads.clear()
    be.fail = BackendError("boom")
    errs = []

    def go():
        try:
            mgr.fill(0, 4096)
        except bc.FillError as e:
            errs.append(e)

    ts = [threading.Thread(target=go) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(errs) == 4
    assert len(be.reads) < 4       # the waiters did not fetch themselves


def test_completion_hook_called_once(synth):
    bdir, cdir, blob_id, datas = synth
    calls = []
    mgr, _ = open_manager(cdir, CountingBackend(bdir), blob_id, on_complete=calls.append)
    mgr.fill(0, mgr.size // 2)
    assert calls == []
    mgr.fill(0, mgr.size)
    mgr.fill(0, mgr.size)
    assert calls == [mgr]
    mgr.close()


def test_localfs_backend_errors(tmp_path):
    with pytest.raises(BackendError):
        LocalFsBackend(str(tmp_path / "nope"))
    be = LocalFsBackend(str(tmp_path))
    with pytest.raises(BackendError, match="not found"):
        be.read("a" * 64, 0, 1)
    with pytest.raises(BackendError, match="invalid blob id"):
        be.read("../etc/passwd", 0, 1)
    (tmp_path / ("b" * 64)).write_bytes(b"12345")
    assert be.read("b" * 64, 1, 3) == b"234"
    assert be.blob_size("b" * 64) == 5
    with pytest.raises(BackendError, match="short read"):
        be.read("b" * 64, 3, 10)
    be.close()


def test_backend_spec_parsing(tmp_path):
    assert parse_backend_spec("localfs:/x") == ("localfs", "/x")
    assert parse_backend_spec("registry:host:5000/repo:tag") == ("registry", "host:5000/repo:tag")
    for bad in ("", "localfs", "ftp:/x", "localfs:"):
        with pytest.raises(BackendError):
            parse_backend_spec(bad)
    assert open_backend(f"localfs:{tmp_path}").spec == f"localfs:{tmp_path}"


def test_store_rejects_oversized_chunk(synth):
    bdir, cdir, blob_id, datas = synth
    mgr, _ = open_manager(cdir, CountingBackend(bdir), blob_id)
    c = mgr.meta.chunks[0]
    with pytest.raises(StorageError):
        mgr.cache.store([(c, b"x" * (c.uncompressed_size + 1))])
    assert not mgr.cache.has(c)
    mgr.close()


def test_state_survives_process_crash_and_reboot_rules(synth):
    """Live bits are trusted within a boot; after a reboot only synced (durable) bits."""
    bdir, cdir, blob_id, datas = synth
    mgr, _ = open_manager(cdir, CountingBackend(bdir), blob_id)
    mgr.fill(0, 65536 * 4)                  # chunks 0..3, synced below
    mgr.sync()
    mgr.fill(65536 * 10, 65536)             # chunk 10: live only (no sync yet)
    # simulate a crash: drop the objects without close()
    os.close(mgr.cache.state.fd)
    os.close(mgr.cache._own_fd)
    live = bc.state_bits(bc.state_path(cdir, blob_id))
    assert live[0] == 0x0F and live[1] & 0x04
    # same boot: everything recorded is trusted
    mgr2, _ = open_manager(cdir, CountingBackend(bdir), blob_id)
    assert sorted(c.index for c in mgr2.meta.chunks if mgr2.cache.has(c)) == [0, 1, 2, 3, 10]
    os.close(mgr2.cache.state.fd)
    os.close(mgr2.cache._own_fd)
    # pretend the host rebooted: a different boot id in the header
    path = bc.state_path(cdir, blob_id)
    with open(path, "r+b") as f:
        f.seek(8 + 4 + 4 + 8 + 32)
        f.write(b"\x01" * 16)
    mgr3, _ = open_manager(cdir, CountingBackend(bdir), blob_id)
    assert sorted(c.index for c in mgr3.meta.chunks if mgr3.cache.has(c)) == [0, 1, 2, 3]
    mgr3.close()


def test_bits_set_only_once_in_the_record(tmp_path, monkeypatch):
    """A chunk's bit is seen set (and the chunk served) only once the record holds it:
    a daemon killed right after serving it never fetches it again after a restart.
    (The C core's store, ern_cold_store, writes the record before the bits the same
    way; vm-tests' test_sigkill_restart_restore checks what the record holds at a kill.)"""
    from fscache_daemon.storage import chunkstate
    st = chunkstate.ChunkState(str(tmp_path / "x.chunks"), 20, 20 * 65536, bytes(32))
    seen = []
    real = os.pwrite

    def spy(fd, data, off):
        n = real(fd, data, off)
        rec = chunkstate.state_bits(st.path)
        seen.append(([st.has(i) for i in (3, 17)],
                     [bool(rec[i >> 3] & (1 << (i & 7))) for i in (3, 17)]))
        return n
    monkeypatch.setattr(chunkstate.os, "pwrite", spy)
    st.set([3, 17])
    assert seen == [([False, False], [True, True])]
    assert st.has(3) and st.has(17) and st.count == 2
    st.close()


def test_completion_leaves_the_cache_file_sync_to_the_syncer(synth, monkeypatch):
    """The fill that completes a blob calls its hook without an fdatasync of the cache
    file first (a whole blob's writeback, 0.2-1 s a GiB, in the worker during the cold
    read's last windows); the syncer's sync() makes the record durable afterwards."""
    from fscache_daemon.storage import cachefile
    bdir, cdir, blob_id, datas = synth
    synced = []
    real = os.fdatasync

    def spy(fd):
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(cachefile.os, "fdatasync", spy)
    calls = []
    mgr, _ = open_manager(cdir, CountingBackend(bdir), blob_id,
                          on_complete=lambda m: calls.append(list(synced)))
    mgr.fill(0, mgr.size)
    assert len(calls) == 1 and calls[0] == []      # the hook ran, nothing synced before it
    assert synced == []                            # nor in the fill at all
    mgr.sync()                                     # the daemon's syncer (or close)
    assert synced
    mgr.close()
    cache = bc.BlobCache(cdir, mgr.meta)           # the record says complete
    assert cache.complete()
    cache.close()
