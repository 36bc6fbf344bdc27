"""The chunk map a cold mount makes in the C core (csrc/chunkmap.c through
reader.bootstrap.PinTable) is the one the Python path makes: the same pins, table digest,
chunks and map bytes, the same errors for a corrupt chunk-info table, the same refusals;
and a read right after a mount returns the source's bytes."""

from __future__ import annotations

import os
import struct

import helpers
import pytest
from test_daemon_support import (
    DaemonProc,
    drop_caches,
    pack,
    regular_files,
    require_lazy_kernel,
    write_tree,
)

from erofs_tools.errors import CorruptImageError
from erofs_tools.reader.bootstrap import PinTable, chunk_pin_tables, chunk_pins
from erofs_tools.reader.image import open_image
from fscache_daemon.storage import chunkmap
from fscache_daemon.storage.image import load_image, table_digest

ROW = 80


def _image(tmp_path, compressor="zstd"):
    src = write_tree(str(tmp_path / "src"), seed=9, nfiles=40, big=(3 << 20, 1 << 20))
    boot, blobs = str(tmp_path / "boot"), str(tmp_path / "blobs")
    pack(src, boot, blobs, "--compressor", compressor, "--chunk-size", "0x40000")
    return src, boot, blobs


def _both(boot):
    """(Python pins, C pin tables) of the bootstrap, or the error each raised."""
    out = []
    for fn in (chunk_pins, chunk_pin_tables):
        img = open_image(boot)
        try:
            out.append(fn(img))
        except CorruptImageError as e:
            out.append(str(e))
        finally:
            img.close()
    return out


def _maps(boot):
    img = open_image(boot)
    try:
        e, blob_id = img.blob_entries[0], img.blob_id(1)
    finally:
        img.close()
    py, c = _both(boot)
    assert isinstance(c[0], PinTable) and dict(c[0]) == py[0]
    # the offsets alone (the mount's prefetch-blob test), without making the pins
    assert list(c[0].uncompressed_offsets()) == \
        [py[0][i].uncompressed_offset for i in sorted(py[0])]
    assert table_digest(e, c[0]) == table_digest(e, py[0])
    return (chunkmap._meta_from_pins(blob_id, e, e.compressed_size, py[0]),
            chunkmap._meta_from_pins(blob_id, e, e.compressed_size, c[0]))


def _patch_row(boot, row, off, fmt, value):
    img = open_image(boot)
    base = img.rafs.s_chunk_table_offset
    img.close()
    with open(boot, "r+b") as f:
        f.seek(base + row * ROW + off)
        f.write(struct.pack(fmt, value))


@pytest.mark.parametrize("compressor", ["none", "zstd"])
def test_c_chunk_map_equals_python(tmp_path, compressor):
    _src, boot, _blobs = _image(tmp_path, compressor)
    py, c = _maps(boot)
    assert py is not None and c is not None and len(c.chunks) > 10
    assert c.chunks == py.chunks and c.to_bytes() == py.to_bytes()
    assert c.chunk_at(c.chunks[3].uncompressed_offset) == py.chunks[3]
    ref = load_image(boot).blobs[0]
    assert isinstance(ref.pins, PinTable)
    assert ref.digests == {k: p.digest for k, p in chunk_pins(open_image(boot))[0].items()}


def test_corrupt_tables_fail_alike(tmp_path):
    _src, boot, _blobs = _image(tmp_path)
    good = open(boot, "rb").read()

    def fresh():
        with open(boot, "wb") as f:
            f.write(good)
    # a row naming a blob the bootstrap does not have
    _patch_row(boot, 2, 32, "<I", 7)
    py, c = _both(boot)
    assert isinstance(py, str) and py == c and "names blob 7" in py
    # an index pinned twice, differently
    fresh()
    img = open_image(boot)
    rows = list(img.chunk_info_rows())
    img.close()
    assert rows[0][8] != rows[1][8]
    _patch_row(boot, 1, 72, "<I", rows[0][8])
    py, c = _both(boot)
    assert isinstance(py, str) and py == c and "twice, differently" in py
    # chunks that overlap, or a missing chunk: no map from the pins, either way
    fresh()
    _patch_row(boot, 1, 56, "<Q", rows[0][6])
    assert _maps(boot) == (None, None)
    fresh()
    _patch_row(boot, 1, 72, "<I", 1 << 20)
    assert _maps(boot) == (None, None)
    # a stored chunk whose sizes differ
    fresh()
    _patch_row(boot, 0, 36, "<I", rows[0][2] & ~1)
    _patch_row(boot, 0, 40, "<I", rows[0][4] + 4096)
    py, c = _maps(boot)
    assert py is None and c is None


@pytest.mark.root
def test_read_right_after_mount_returns_the_source(tmp_path):
    """No pause between the mount's return and the reads: every file, page cache
    dropped, equals its source (the chunk map is ready before the mount returns)."""
    helpers.require_root_kernel()
    require_lazy_kernel()
    src, boot, blobs = _image(tmp_path)
    d = DaemonProc(str(tmp_path / "d"), threads=2).start()
    try:
        mnt = str(tmp_path / "mnt")
        drop_caches()
        d.mount(boot, mnt, f"localfs:{blobs}")
        for rel in regular_files(src):
            with open(os.path.join(mnt, rel), "rb") as a, open(os.path.join(src, rel), "rb") as b:
                assert a.read() == b.read(), rel
    finally:
        d.cleanup()


def test_cold_mount_defers_chunks_and_checks_the_blob_before_the_kernel(tmp_path):
    """A map made from the pins: its chunk objects are made after the mount (not in it);
    the blob's check still fails the mount for a blob cut short, before anything is
    mounted or cached as its map; the blob whole again, it mounts and its map file is
    written (after the mount, by its after-mount thread)."""
    from fscache_daemon.daemon import Daemon
    from fscache_daemon.errors import DaemonError
    _src, boot, blobs = _image(tmp_path)
    blob = os.path.join(blobs, os.listdir(blobs)[0])
    good = open(blob, "rb").read()
    with open(blob, "r+b") as f:
        f.truncate(len(good) - 1)
    d = Daemon(str(tmp_path / "cache"), frontend="none", threads=2, prefetch_rate=0)
    d.start()
    try:
        mnt = str(tmp_path / "mnt")
        with pytest.raises(DaemonError, match="shorter than|short read"):
            d.mount(boot, mnt, f"localfs:{blobs}")
        assert d.images == {} and d.blobs == {}
        assert not [n for n in os.listdir(d.blob_dir) if n.endswith(".map")]
        with open(blob, "wb") as f:
            f.write(good)
        made = []
        real = PinTable.chunk_map

        def spy(self, *a):
            got = real(self, *a)
            made.append(got[1])
            return got
        PinTable.chunk_map = spy    # type: ignore[method-assign]
        try:
            d.mount(boot, mnt, f"localfs:{blobs}")
        finally:
            PinTable.chunk_map = real   # type: ignore[method-assign]
        assert len(made) == 1
        (mgr,) = d.blobs.values()
        # the map file is written after the mount, by its after-mount thread
        helpers.wait_until(lambda: os.path.exists(chunkmap.map_path(d.blob_dir, mgr.key)),
                           30, "the chunk map file")
        # the after-mount thread makes the chunks; a reader would make them itself
        chunks = mgr.meta.chunks
        assert len(chunks) == mgr.meta.chunk_count == mgr.cache.total_chunks
        assert chunks == made[0]()
        d.fill(mgr.key, 0, mgr.size)        # every chunk fetched and verified
        assert mgr.complete()
    finally:
        d.shutdown()


class _FileBackend:
    """The one blob file of a directory, read as the daemon's backends read."""

    def __init__(self, blobs):
        self.path = os.path.join(blobs, os.listdir(blobs)[0])
        self.reads = 0

    def reader(self, _blob_id):
        from erofs_tools.reader.blob import file_reader
        f = open(self.path, "rb")
        read = file_reader(f)

        def counted(off, n):
            self.reads += 1
            return read(off, n)
        return counted


@pytest.mark.parametrize("compressor", ["none", "zstd"])
def test_blob_table_map_in_c_equals_python(tmp_path, compressor):
    """A blob the pins do not cover (an optimized image's original blobs): its own CI
    table made into the chunk map by the C core equals the Python path's (the table
    decoded, the pins' places checked and digests taken); a pin placed elsewhere is
    refused by both, the Python path naming it."""
    _src, boot, blobs = _image(tmp_path, compressor)
    ref = load_image(boot).blobs[0]
    be = _FileBackend(blobs)
    size = os.path.getsize(be.path)
    recs = ref.pins.records
    n = len(ref.pins)
    half = PinTable(b"".join(recs[i * 61:(i + 1) * 61] for i in range(0, n, 2)))
    c, _ = chunkmap._fetch_meta(ref.blob_id, be, ref.entry, size, half.digests(), half)
    py, _ = chunkmap._fetch_meta(ref.blob_id, be, ref.entry, size, dict(half.digests()),
                                 dict(half))
    assert callable(c._chunks) and not callable(py._chunks)     # the C core's, made lazily
    assert len(c.chunks) == n and c.chunks == py.chunks and c.to_bytes() == py.to_bytes()
    assert c.digest_region == py.digest_region is not None
    # one pin placed one block further: refused, by the Python path's words
    r = bytearray(recs[2 * 61:3 * 61])
    struct.pack_into("<Q", r, 4, struct.unpack_from("<Q", r, 4)[0] + 4096)
    bad = PinTable(recs[:2 * 61] + bytes(r))
    assert PinTable.of_blob_table(b"", 0, True, None, None) is not None
    with pytest.raises(chunkmap.StorageError, match="lies elsewhere"):
        chunkmap._fetch_meta(ref.blob_id, be, ref.entry, size, bad.digests(), bad)
