"""Zran meta blobs fetched and parsed before their mount (fscache_daemon/zranwarm.py):
the mount gets exactly the map it would have fetched, through the same backend object
and blob entry only; a warm that failed leaves the mount to fetch and report; bounded
count and lifetime. The snapshotter's use (warm at the bootstrap layer's commit, taken
by the container's lazy mount) runs in tests/test_zran_snapshotter.py."""
import os
import threading

import pytest
from test_storage_support import CountingBackend
from test_zran_coldpath import zran_blob  # noqa: F401

from fscache_daemon import zranwarm
from fscache_daemon.storage import StorageError
from fscache_daemon.storage import blobcache as bc
from fscache_daemon.storage.chunkmap import fetch_zran_meta
from fscache_daemon.zranwarm import ZranWarm


@pytest.fixture
def zblob(zran_blob):
    bdir, hexd, entry, _gz, _tar = zran_blob
    return bdir, hexd, entry


class _Holds:
    """hold()/release() of a backend, counted; `gone` set when every hold is given back."""

    def __init__(self):
        self.n = 0
        self.gone = threading.Event()
        self.lock = threading.Lock()

    def hold(self):
        with self.lock:
            self.n += 1

    def release(self):
        with self.lock:
            self.n -= 1
            if self.n == 0:
                self.gone.set()


def test_mount_takes_the_warmed_map(tmp_path, zblob):
    bdir, hexd, entry = zblob
    be = CountingBackend(bdir)
    h = _Holds()
    w = ZranWarm()
    assert w.start(be, hexd, entry, h.hold, h.release)
    assert not w.start(be, hexd, entry, h.hold, h.release)      # one warm per key
    meta_hex = bytes(entry.blob_meta_digest).hex()
    # the mount's path: load_or_fetch_meta with the warm's take
    meta, fetched = bc.load_or_fetch_meta(str(tmp_path / "c"), hexd, be, entry=entry,
                                          warm=lambda e: w.take(be, hexd, e))
    assert h.gone.wait(10) and h.n == 0                  # the backend given back once
    assert fetched == entry.blob_meta_size
    assert [r[0] for r in be.reads] == [meta_hex]        # fetched once, by the warm
    fresh, _ = fetch_zran_meta(hexd, CountingBackend(bdir), entry, None)
    assert meta.to_bytes() == fresh.to_bytes()
    assert [c.zran_index for c in meta.chunks] == [c.zran_index for c in fresh.chunks]
    assert w.stats() == {"started": 1, "taken": 1, "failed": 0, "held": 0}
    assert w.take(be, hexd, entry) is None               # taken once
    # and it serves: the chunks read through it verify against their digests
    cache = bc.BlobCache(str(tmp_path / "c"), meta)
    cache.verify_now()
    mgr = bc.BlobManager(meta, cache, be)
    try:
        mgr.fill(0, meta.uncompressed_size)
        assert mgr.complete()
    finally:
        mgr.close()


def test_only_the_same_backend_and_entry(zblob):
    bdir, hexd, entry = zblob
    be, other = CountingBackend(bdir), CountingBackend(bdir)
    h = _Holds()
    w = ZranWarm()
    assert w.start(be, hexd, entry, h.hold, h.release)
    assert w.take(other, hexd, entry) is None
    changed = type(entry).decode(entry.encode())
    changed.blob_meta_size = entry.blob_meta_size + 1
    assert w.take(be, hexd, changed) is None
    assert w.take(be, "0" * 64, entry) is None
    assert w.take(be, hexd, entry) is not None
    assert h.gone.wait(10)


def test_failed_warm_leaves_the_mount_to_report(tmp_path, zblob):
    bdir, hexd, entry = zblob
    meta_path = os.path.join(bdir, bytes(entry.blob_meta_digest).hex())
    data = bytearray(open(meta_path, "rb").read())
    data[len(data) // 2] ^= 1
    with open(meta_path, "wb") as f:
        f.write(data)
    be = CountingBackend(bdir)
    h = _Holds()
    w = ZranWarm()
    assert w.start(be, hexd, entry, h.hold, h.release)
    with pytest.raises(StorageError, match="does not match its digest"):
        bc.load_or_fetch_meta(str(tmp_path / "c"), hexd, be, entry=entry,
                              warm=lambda e: w.take(be, hexd, e))
    assert h.gone.wait(10)
    assert w.stats()["failed"] == 1
    assert len(be.reads) == 2        # the warm's read, then the mount's own


def test_bounded_and_expiring(zblob, monkeypatch):
    bdir, hexd, entry = zblob
    gate = threading.Event()

    class GatedBackend(CountingBackend):
        def read(self, blob_id, offset, length):
            assert gate.wait(120)
            return super().read(blob_id, offset, length)
    # the warm's fetch is held while the bound is checked: its TTL runs from the fetch's
    # end, and 0.05 s of it could pass before the second start on a loaded machine (the
    # slot then free again: "full" not seen)
    be = GatedBackend(bdir)
    monkeypatch.setattr(zranwarm, "MAX_WARM", 1)
    monkeypatch.setattr(zranwarm, "TTL", 0.05)
    h = _Holds()
    w = ZranWarm()
    assert w.start(be, hexd, entry, h.hold, h.release)
    assert not w.start(CountingBackend(bdir), hexd, entry, h.hold, h.release)  # full
    gate.set()
    assert h.gone.wait(120)         # nobody took it: dropped after TTL, backend released
    assert w.stats()["held"] == 0 and w.take(be, hexd, entry) is None
    monkeypatch.setattr(zranwarm, "MAX_WARM_AREA", entry.ci_uncompressed_size - 1)
    assert not w.start(CountingBackend(bdir), hexd, entry, h.hold, h.release)  # area


def test_no_warm_after_the_mount_took(zblob, monkeypatch):
    """A mount's own warm that starts after that mount took its map (or found none and
    fetched itself) would fetch for nobody and hold the backend for TTL: refused."""
    bdir, hexd, entry = zblob
    be = CountingBackend(bdir)
    h = _Holds()
    w = ZranWarm()
    assert w.take(be, hexd, entry) is None              # the mount fetches itself
    assert not w.start(be, hexd, entry, h.hold, h.release)
    assert w.stats() == {"started": 0, "taken": 0, "failed": 0, "held": 0}
    assert be.reads == [] and h.n == 0
    monkeypatch.setattr(zranwarm, "TAKEN_FOR", 0.0)       # a later mount warms again
    assert w.start(be, hexd, entry, h.hold, h.release)
    assert w.take(be, hexd, entry) is not None
    assert h.gone.wait(10)


def test_not_zran_is_not_warmed(zblob):
    bdir, hexd, entry = zblob
    plain = type(entry).decode(entry.encode())
    plain.features = 0
    h = _Holds()
    assert not ZranWarm().start(CountingBackend(bdir), hexd, plain, h.hold, h.release)
    assert h.n == 0
