"""Blob meta reader on the Nydus test vectors and on hostile variants of them."""
import hashlib

import blake3
import pytest
import zstandard
from helpers import NYDUS_VECTORS as NYDUS

from erofs_tools.errors import CorruptImageError, DigestMismatchError, ErofsToolsError
from erofs_tools.format import rafs
from erofs_tools.reader.blob import (
    BlobChunk,
    BlobMeta,
    decode_chunk,
    open_blob,
    read_chunk,
    read_toc,
    read_toc_section,
)
from erofs_tools.reader.blobid import compute_blob_id

BLOB_ID = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
BLOB = NYDUS / "blobs" / BLOB_ID
BOOT = NYDUS / "rafs-v6-2.2.boot"
TOC_BLOB = NYDUS / "toc" / "2fa78cad554b75ac91a4a125ed148d0ddeb25efa4aaa8bd80e5dc292690a4dca"


def reader(data):
    def read_at(off, n):
        return bytes(data[off:off + n])
    return read_at


def entry():
    boot = BOOT.read_bytes()
    ext = rafs.ExtSuperBlock.decode(boot, rafs.EXT_SUPER_OFFSET)
    return rafs.BlobEntry.decode(boot, ext.s_blob_table_offset)


def test_vector_from_toc():
    m = open_blob(BLOB)
    assert m.blob_id == BLOB_ID
    assert m.compressor == "zstd" and m.digester == "blake3"
    assert m.uncompressed_size == 36864 and m.compressed_size == 14554
    assert [(c.index, c.uncompressed_offset, c.uncompressed_size, c.compressed_offset,
             c.compressed_size) for c in m.chunks] == [(0, 0, 16931, 0, 4828),
                                                     (1, 20480, 13400, 4828, 2974)]
    assert all(c.compressed and c.digest is not None for c in m.chunks)
    data = BLOB.read_bytes()
    for c in m.chunks:
        out = read_chunk(m, c, reader(data))
        assert len(out) == c.uncompressed_size
        assert blake3.blake3(out).digest() == c.digest


def test_vector_from_entry_matches_toc():
    m1 = open_blob(BLOB)
    m2 = open_blob(BLOB, entry=entry())
    assert m2.chunks == m1.chunks
    assert m2.chunk_size == 1 << 20 and m2.blob_id == BLOB_ID
    # the bootstrap chunk info table has the same digests
    boot = BOOT.read_bytes()
    ext = rafs.ExtSuperBlock.decode(boot, rafs.EXT_SUPER_OFFSET)
    for i in range(ext.s_chunk_table_size // 80):
        ci = rafs.ChunkInfo.decode(boot, ext.s_chunk_table_offset + 80 * i)
        assert m2.chunk_by_index(ci.index).digest == ci.digest


def test_blob_id_excludes_digest_payload():
    data = BLOB.read_bytes()
    m = open_blob(BLOB)
    assert m.digest_region == (12954, 64)
    assert compute_blob_id(reader(data), len(data), m.digest_region) == BLOB_ID
    assert hashlib.sha256(data).hexdigest() != BLOB_ID


def test_cache_form_round_trip():
    m = open_blob(BLOB, entry=entry())
    m2 = BlobMeta.from_bytes(m.to_bytes())
    for attr in ("blob_id", "chunks", "uncompressed_size", "compressed_size", "compressor",
                 "digester", "chunk_size", "features", "digest_region"):
        assert getattr(m2, attr) == getattr(m, attr), attr
    raw = m.to_bytes()
    for bad in (raw[:-1], raw[:10], b"X" + raw[1:], raw + b"\0"):
        with pytest.raises(CorruptImageError):
            BlobMeta.from_bytes(bad)


def test_chunks_for_range():
    m = open_blob(BLOB)
    c0, c1 = m.chunks
    assert m.chunks_for_range(0, 1) == [c0]
    assert m.chunks_for_range(16930, 2) == [c0]          # padding of chunk 0's slot
    assert m.chunks_for_range(20479, 2) == [c0, c1]
    assert m.chunks_for_range(20480, 4096) == [c1]
    assert m.chunks_for_range(0, 1 << 30) == [c0, c1]
    assert m.chunks_for_range(36864, 10) == []
    assert m.chunks_for_range(5, 0) == []
    assert m.chunk_at(20480) == c1 and m.chunk_at(4096) is None


def test_toc_blob_inline_bootstrap_and_bootstrap_digests():
    data = TOC_BLOB.read_bytes()
    toc = read_toc(reader(data), len(data))
    boot = read_toc_section(reader(data), len(data), toc, rafs.TOC_NAME_BOOTSTRAP)
    assert len(boot) == 20480
    ext = rafs.ExtSuperBlock.decode(boot, rafs.EXT_SUPER_OFFSET)
    be = rafs.BlobEntry.decode(boot, ext.s_blob_table_offset)
    digests = {}
    for i in range(ext.s_chunk_table_size // 80):
        ci = rafs.ChunkInfo.decode(boot, ext.s_chunk_table_offset + 80 * i)
        digests[ci.index] = ci.digest
    m = BlobMeta.from_blob(reader(data), len(data), entry=be, digests=digests)
    assert len(m.chunks) == 3
    assert compute_blob_id(reader(data), len(data), m.digest_region) == TOC_BLOB.name
    for c in m.chunks:
        assert c.digest is not None
        read_chunk(m, c, reader(data))
    # without a bootstrap there are no digests, but the layout is the same
    m0 = open_blob(TOC_BLOB)
    assert [c._replace(digest=None) for c in m.chunks] == m0.chunks


def test_every_chunk_byte_flip_detected():
    """Inverting any byte of a chunk's compressed data fails that chunk's decode, or (for
    the rare zstd bytes whose change leaves the output identical) the blob id check."""
    data = BLOB.read_bytes()
    m = open_blob(BLOB)
    only_blob_id = 0
    for c in m.chunks:
        for off in range(c.compressed_offset, c.compressed_offset + c.compressed_size):
            raw = bytearray(data[c.compressed_offset:c.compressed_offset + c.compressed_size])
            raw[off - c.compressed_offset] ^= 0xFF
            try:
                decode_chunk(m, c, bytes(raw))
            except CorruptImageError as e:
                assert f"chunk {c.index}" in str(e)
                continue
            d = bytearray(data)
            d[off] ^= 0xFF
            assert compute_blob_id(reader(d), len(d), m.digest_region) != BLOB_ID
            only_blob_id += 1
    assert only_blob_id <= 2


def test_digest_mismatch_message():
    m = open_blob(BLOB)
    c = m.chunks[0]._replace(digest=b"\0" * 32)
    raw = BLOB.read_bytes()[:4828]
    with pytest.raises(DigestMismatchError) as ei:
        decode_chunk(m, c, raw)
    msg = str(ei.value)
    assert BLOB_ID in msg and "chunk 0" in msg and "\n" not in msg


def test_zstd_bomb_bounded():
    m = open_blob(BLOB)
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))
    c = BlobChunk(0, 0, 4096, 0, len(bomb), None, True)
    with pytest.raises(CorruptImageError):
        decode_chunk(m, c, bomb)
    # no content size in the frame header either
    cobj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    bomb2 = cobj.compress(b"\0" * (64 << 20)) + cobj.flush()
    c = BlobChunk(0, 0, 4096, 0, len(bomb2), None, True)
    with pytest.raises(CorruptImageError):
        decode_chunk(m, c, bomb2)


def test_raw_chunk():
    m = open_blob(BLOB)
    payload = b"hello world"
    c = BlobChunk(0, 0, len(payload), 0, len(payload), blake3.blake3(payload).digest(), False)
    assert decode_chunk(m, c, payload) == payload
    with pytest.raises(CorruptImageError):
        decode_chunk(m, c, payload[:-1])


def test_truncations_and_flips_of_meta_are_clean():
    data = BLOB.read_bytes()
    be = entry()
    meta_start = 7802  # everything after the chunk data
    cases = 0
    for cut in list(range(0, len(data), 97)) + [len(data) - 1]:
        with pytest.raises(ErofsToolsError):
            BlobMeta.from_blob(reader(data[:cut]), cut)
        cases += 1
    for off in range(meta_start, len(data)):
        for bit in (0x01, 0x80):
            d = bytearray(data)
            d[off] ^= bit
            for e in (None, be):
                try:
                    m = BlobMeta.from_blob(reader(d), len(d), entry=e)
                except ErofsToolsError:
                    continue
                # if it parsed, it must still be internally consistent
                assert len(m.chunks) <= 2
                for c in m.chunks:
                    assert c.compressed_offset + c.compressed_size <= len(d)
                cases += 1
    assert cases > 100


def test_hostile_counts_rejected():
    data = bytearray(BLOB.read_bytes())
    # claim 2^24 CI entries in the header (ci_entries at header offset 12)
    hdr = 8346
    data[hdr + 12:hdr + 16] = (1 << 24).to_bytes(4, "little")
    with pytest.raises(CorruptImageError):
        BlobMeta.from_blob(reader(data), len(data))
    be = entry()
    be.chunk_count = 1 << 24
    with pytest.raises(CorruptImageError):
        BlobMeta.from_blob(reader(BLOB.read_bytes()), len(data), entry=be)
    be = entry()
    be.compressed_size = 1
    with pytest.raises(CorruptImageError):
        BlobMeta.from_blob(reader(BLOB.read_bytes()), len(data), entry=be)
