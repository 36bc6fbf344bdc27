"""Hostile zran indexes (reader/zran.py): a meta blob whose contexts or chunks point
outside the layer, carry bad windows or bit counts, or overlap wrongly ends in one clean
CorruptImageError when opened or when the chunk is read; never a hang, never wrong bytes.
"""
import gzip
import hashlib
import io
import random
import tarfile

import pytest

from erofs_tools.builder.zran import pack_zran_layer
from erofs_tools.errors import CorruptImageError
from erofs_tools.format import rafs as R
from erofs_tools.reader import blob as rblob
from erofs_tools.reader import zran as rz
from erofs_tools.reader.image import Image


def _layer():
    rnd = random.Random(4)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(4):
            data = bytes(rnd.choice(b"abcdefgh \n") for _ in range(300_000 + i))
            ti = tarfile.TarInfo(f"f{i}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return gzip.compress(buf.getvalue())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("zran")
    gz = _layer()
    digest = "sha256:" + hashlib.sha256(gz).hexdigest()
    r = pack_zran_layer(io.BytesIO(gz), digest, len(gz), str(d / "l.boot"), str(d),
                        chunk_size=0x10000, span=64 << 10)
    meta = (d / r["meta_blob"]).read_bytes()
    with Image(str(d / "l.boot")) as img:
        entry = img.blob_entries[0]
    return gz, meta, entry


def _area(meta, entry):
    z = meta[:entry.ci_compressed_size]
    if entry.ci_compressor:
        return bytearray(rblob._decompress("zstd", z, entry.ci_uncompressed_size, "t"))
    return bytearray(z)


def _rebuild(meta, entry, area, **hdr_changes):
    """A meta blob around CI area `area` (stored raw) and an entry matching it."""
    hdr = R.BlobMetaHeader.decode(meta, entry.ci_compressed_size)
    hdr.ci_compressor, hdr.ci_compressed_size = 0, len(area)
    hdr.ci_uncompressed_size = len(area)
    for k, v in hdr_changes.items():
        setattr(hdr, k, v)
    hb = hdr.encode()
    old = rblob.read_toc(lambda o, n: meta[o:o + n], len(meta)).entries[R.TOC_NAME_BLOB_DIGEST]
    digests = meta[old.compressed_offset:old.compressed_offset + old.compressed_size]
    body = bytes(area) + hb + digests
    toc = [R.TocEntry(flags=R.TOC_FLAG_NONE, name=R.TOC_NAME_BLOB_META,
                      uncompressed_digest=bytes(32), compressed_offset=0,
                      compressed_size=len(area), uncompressed_size=len(area)),
           R.TocEntry(flags=R.TOC_FLAG_NONE, name=R.TOC_NAME_BLOB_DIGEST,
                      uncompressed_digest=hashlib.sha256(digests).digest(),
                      compressed_offset=len(area) + len(hb), compressed_size=len(digests),
                      uncompressed_size=len(digests))]
    tb = b"".join(t.encode() for t in toc)
    tb += R.tar_header(R.TOC_NAME_TOC, len(tb))
    blob = body + tb
    e = R.BlobEntry.decode(entry.encode())
    e.ci_compressor, e.ci_compressed_size, e.ci_uncompressed_size = 0, len(area), len(area)
    e.blob_toc_size = len(tb)
    e.chunk_count = hdr.ci_entries
    return blob, e


def _ctx_off(meta, entry):
    return R.BlobMetaHeader.decode(meta, entry.ci_compressed_size).ctx_offset


def _read_all(gz, m):
    for c in m.chunks:
        rblob.decode_chunk(m, c, gz[c.compressed_offset:c.compressed_offset
                                    + c.compressed_size])


def test_untouched_index_reads(built):
    gz, meta, entry = built
    area = _area(meta, entry)
    blob, e = _rebuild(meta, entry, area)
    m = rz.parse_meta(blob, e, "x" * 64)
    assert len(m.chunks) > 15 and len(m.zran.contexts) > 5
    _read_all(gz, m)


def _ctx_field(name):
    return R.ZranContext.field_layout()[name]


@pytest.mark.parametrize("field,value,match", [
    ("ctx_bits", 8, "bits"),
    ("ctx_bits", 255, "bits"),
    ("dict_size", 0x8001, "window"),
    ("dict_offset", 1 << 40, "window"),
    ("in_offset", 1 << 39, "outside the layer"),
    ("in_len", 0, "outside the layer"),
    ("in_len", 0xFFFF_FFFF, "outside the layer"),
    ("out_len", 0, "output size"),
    ("out_len", (16 << 20) + 1, "output size"),
])
def test_bad_context_fields(built, field, value, match):
    gz, meta, entry = built
    area = _area(meta, entry)
    off, size = _ctx_field(field)
    at = _ctx_off(meta, entry) + R.ZranContext.SIZE * 1 + off
    area[at:at + size] = value.to_bytes(size, "little")
    blob, e = _rebuild(meta, entry, area)
    with pytest.raises(CorruptImageError, match=match):
        rz.parse_meta(blob, e, "x" * 64)


def test_bad_context_table_place(built):
    gz, meta, entry = built
    area = _area(meta, entry)
    hdr = R.BlobMetaHeader.decode(meta, entry.ci_compressed_size)
    for kw in ({"ctx_offset": 3}, {"ctx_count": 0}, {"ctx_count": 1 << 30},
               {"ctx_size": hdr.ctx_size * 50}, {"ctx_offset": len(area)}):
        blob, e = _rebuild(meta, entry, area, **kw)
        with pytest.raises(CorruptImageError):
            rz.parse_meta(blob, e, "x" * 64)


def test_chunks_without_digests_are_refused(built):
    gz, meta, entry = built
    area = _area(meta, entry)
    hdr = R.BlobMetaHeader.decode(meta, entry.ci_compressed_size)
    hdr.ci_compressor, hdr.ci_compressed_size = 0, len(area)
    hdr.ci_uncompressed_size = len(area)
    tb = R.TocEntry(flags=R.TOC_FLAG_NONE, name=R.TOC_NAME_BLOB_META,
                    uncompressed_digest=bytes(32), compressed_offset=0,
                    compressed_size=len(area), uncompressed_size=len(area)).encode()
    tb += R.tar_header(R.TOC_NAME_TOC, len(tb))
    e = R.BlobEntry.decode(entry.encode())
    e.ci_compressor, e.ci_compressed_size, e.ci_uncompressed_size = 0, len(area), len(area)
    e.blob_toc_size = len(tb)
    with pytest.raises(CorruptImageError, match="digest"):
        rz.parse_meta(bytes(area) + hdr.encode() + tb, e, "x" * 64)


def test_chunk_outside_its_context(built):
    gz, meta, entry = built
    area = _area(meta, entry)
    for data in ((1 << 31) << 32, 0xFFFF_FF00):      # context index, offset
        a = bytearray(area)
        a[16:24] = data.to_bytes(8, "little")
        blob, e = _rebuild(meta, entry, a)
        with pytest.raises(CorruptImageError, match="outside its zran context"):
            rz.parse_meta(blob, e, "x" * 64)


def test_wrong_but_plausible_values_never_give_wrong_bytes(built):
    """Points moved within the layer, windows swapped, bits changed: each chunk read
    either raises a one-line error or returns the exact bytes (digest-checked)."""
    gz, meta, entry = built
    area = _area(meta, entry)
    co = _ctx_off(meta, entry)
    n = R.BlobMetaHeader.decode(meta, entry.ci_compressed_size).ctx_count
    rnd = random.Random(7)
    for _trial in range(40):
        a = bytearray(area)
        k = rnd.randrange(n)
        field = rnd.choice(["in_offset", "ctx_bits", "ctx_byte", "dict_offset",
                            "out_offset", "in_len"])
        off, size = _ctx_field(field)
        at = co + R.ZranContext.SIZE * k + off
        cur = int.from_bytes(a[at:at + size], "little")
        new = {"in_offset": max(0, cur + rnd.randint(-500, 500)),
               "ctx_bits": rnd.randrange(8), "ctx_byte": rnd.randrange(256),
               "dict_offset": max(0, cur - rnd.randint(1, 4000)),
               "out_offset": cur + 1, "in_len": max(1, cur // 2)}[field]
        a[at:at + size] = new.to_bytes(size, "little")
        blob, e = _rebuild(meta, entry, a)
        try:
            m = rz.parse_meta(blob, e, "x" * 64)
        except CorruptImageError as err:
            assert "\n" not in str(err)
            continue
        for c in m.chunks:
            raw = gz[c.compressed_offset:c.compressed_offset + c.compressed_size]
            try:
                got = rblob.decode_chunk(m, c, raw)
            except CorruptImageError as err:
                assert "\n" not in str(err)
                continue
            assert rblob._digest("blake3", got) == c.digest
