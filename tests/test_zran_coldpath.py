"""Zran chunks through the daemon's C cold path (csrc/zran.c: ern_cold_zran,
erofs_tools/reader/coldpath.py, fscache_daemon/storage/blobcache.py): exact bytes, each
context inflated from its access point in one C call, the chunks its output completes
anyway stored with the requested ones (no extra request later), the same cache file as
the Python path, and a flipped gzip byte never stored."""
import gzip
import hashlib
import io
import os
import random
import tarfile

import pytest
from test_storage_support import CountingBackend

from erofs_tools.builder.zran import pack_zran_layer
from erofs_tools.reader.image import Image
from fscache_daemon.storage import blobcache as bc
from fscache_daemon.storage.blobcache import FillError


def _layer() -> tuple[bytes, bytes]:
    """A gzip layer of 60 small text files and 3 bigger ones -> (gzip, tar)."""
    rnd = random.Random(7)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(63):
            n = 200_000 + i if i % 20 == 19 else rnd.randrange(100, 9000)
            data = bytes(rnd.choice(b"abcdefghij \n") for _ in range(n))
            ti = tarfile.TarInfo(f"d/f{i:02d}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    tar = buf.getvalue()
    return gzip.compress(tar), tar


@pytest.fixture
def zran_blob(tmp_path):
    gz, tar = _layer()
    hexd = hashlib.sha256(gz).hexdigest()
    bdir = tmp_path / "blobs"
    bdir.mkdir()
    (bdir / hexd).write_bytes(gz)
    pack_zran_layer(io.BytesIO(gz), "sha256:" + hexd, len(gz), str(tmp_path / "l.boot"),
                    str(bdir), chunk_size=0x10000, span=128 << 10)
    with Image(str(tmp_path / "l.boot")) as img:
        entry = img.blob_entries[0]
    return str(bdir), hexd, entry, gz, tar


def _mgr(cdir, be, blob_id, entry):
    meta, _ = bc.load_or_fetch_meta(cdir, blob_id, be, entry=entry)
    cache = bc.BlobCache(cdir, meta)
    cache.verify_now()
    return bc.BlobManager(meta, cache, be)


def _tar_bytes(tar: bytes, meta, c) -> bytes:
    # a chunk's bytes are the decompressed layer's from its context's output offset on
    ctx = meta.zran.contexts[c.zran_index]
    start = ctx.point.out_offset + c.zran_offset
    return tar[start:start + c.uncompressed_size]


def test_c_path_exact_bytes_and_neighbours_stored(tmp_path, zran_blob, monkeypatch):
    monkeypatch.delenv("FSCACHE_DAEMON_COLDPATH", raising=False)
    bdir, hexd, entry, gz, tar = zran_blob
    be = CountingBackend(bdir)
    mgr = _mgr(str(tmp_path / "c"), be, hexd, entry)
    meta = mgr.meta
    assert mgr.native and len(meta.zran.contexts) >= 3
    # the last-ending chunk of a context with several chunks
    by_ctx: dict[int, list] = {}
    for c in meta.chunks:
        by_ctx.setdefault(c.zran_index, []).append(c)
    k, cs = max(by_ctx.items(), key=lambda kv: len(kv[1]))
    assert len(cs) >= 5
    last = max(cs, key=lambda c: c.zran_offset + c.uncompressed_size)
    be.reads.clear()
    fetched = mgr.fill(last.uncompressed_offset, 1)
    # one request: from the access point to where the chunk has come out
    assert be.reads == [(hexd, last.compressed_offset, last.compressed_size)]
    assert fetched == last.compressed_size
    # every chunk of that context came out with it and is cached, with its exact bytes
    with open(mgr.cache.path, "rb") as f:
        for c in cs:
            assert mgr.cache.has(c), c.index
            f.seek(c.uncompressed_offset)
            assert f.read(c.uncompressed_size) == _tar_bytes(tar, meta, c)
    be.reads.clear()
    for c in cs:
        assert mgr.fill(c.uncompressed_offset, c.uncompressed_size) == 0
    assert not be.reads
    # the rest, in requests of the planner's size: the whole cache file as the Python
    # path writes it
    mgr.fill(0, mgr.size)
    assert mgr.cache.complete()
    with open(mgr.cache.path, "rb") as f:
        native_file = f.read()
    mgr.close()
    monkeypatch.setenv("FSCACHE_DAEMON_COLDPATH", "python")
    mgr2 = _mgr(str(tmp_path / "py"), CountingBackend(bdir), hexd, entry)
    assert not mgr2.native
    mgr2.fill(0, mgr2.size)
    with open(mgr2.cache.path, "rb") as f:
        assert f.read() == native_file
    for c in meta.chunks:
        got = native_file[c.uncompressed_offset:c.uncompressed_offset + c.uncompressed_size]
        assert got == _tar_bytes(tar, meta, c)
    mgr2.close()


def test_flipped_gzip_byte_is_never_stored(tmp_path, zran_blob, monkeypatch):
    monkeypatch.delenv("FSCACHE_DAEMON_COLDPATH", raising=False)
    bdir, hexd, entry, gz, tar = zran_blob
    path = os.path.join(bdir, hexd)
    bad = bytearray(gz)
    bad[len(bad) // 2] ^= 0x40
    with open(path, "wb") as f:
        f.write(bad)
    be = CountingBackend(bdir)
    mgr = _mgr(str(tmp_path / "c"), be, hexd, entry)
    failed = 0
    for c in mgr.meta.chunks:
        try:
            mgr.fill(c.uncompressed_offset, c.uncompressed_size)
        except FillError:
            failed += 1
            assert not mgr.cache.has(c)
    assert failed >= 1 and mgr.stats.snapshot()["verify_failures"] >= 1
    # bad bytes are not kept for the next request (storage/rawkeep.py)
    c = next(c for c in mgr.meta.chunks if not mgr.cache.has(c))
    be.reads.clear()
    with pytest.raises(FillError):
        mgr.fill(c.uncompressed_offset, c.uncompressed_size)
    assert be.reads and be.reads[0][1] == c.compressed_offset
    # whatever was stored is exact
    with open(mgr.cache.path, "rb") as f:
        data = f.read()
    good = 0
    for c in mgr.meta.chunks:
        if mgr.cache.has(c):
            got = data[c.uncompressed_offset:c.uncompressed_offset + c.uncompressed_size]
            assert got == _tar_bytes(tar, mgr.meta, c)
            good += 1
    assert good >= 5
    mgr.close()


def test_kept_prefix_is_not_fetched_again(tmp_path, zran_blob, monkeypatch):
    """A request that starts at an access point inside the range fetched before it
    (storage/rawkeep.py) fetches only the rest; the bytes are exact."""
    monkeypatch.delenv("FSCACHE_DAEMON_COLDPATH", raising=False)
    bdir, hexd, entry, gz, tar = zran_blob
    be = CountingBackend(bdir)
    mgr = _mgr(str(tmp_path / "c"), be, hexd, entry)
    meta = mgr.meta
    by_ctx: dict[int, list] = {}
    for c in meta.chunks:
        by_ctx.setdefault(c.zran_index, []).append(c)
    cs = max(by_ctx.values(), key=len)
    cs.sort(key=lambda c: c.compressed_size)
    first, last = cs[0], cs[-1]
    assert first.compressed_size < last.compressed_size
    be.reads.clear()
    assert mgr.fill(first.uncompressed_offset, 1) == first.compressed_size
    assert mgr.fill(last.uncompressed_offset, 1) == last.compressed_size
    p = first.compressed_offset
    assert be.reads == [(hexd, p, first.compressed_size),
                        (hexd, p + first.compressed_size,
                         last.compressed_size - first.compressed_size)]
    assert mgr.stats.snapshot()["bytes_fetched"] == last.compressed_size
    with open(mgr.cache.path, "rb") as f:
        for c in (first, last):
            f.seek(c.uncompressed_offset)
            assert f.read(c.uncompressed_size) == _tar_bytes(tar, meta, c)
    mgr.close()
