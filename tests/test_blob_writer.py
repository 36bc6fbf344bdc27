"""Blob writer, blob meta reader, cache-file expansion and the chunker pipeline.

The Nydus test vector is the model: feeding its stored chunks into our writer must give
the same data area, CI table, meta header, digest array and TOC layout, and a blob id
computed by the same rule.
"""
import hashlib
import os
import threading

import blake3
import pytest
import zstandard
from helpers import HANG, NYDUS_VECTORS, wait_until

from erofs_tools.builder.blob import BlobInfo, BlobMeta, BlobWriter, read_toc
from erofs_tools.builder.cache import expand_blob
from erofs_tools.builder.chunk_dict import BootstrapTables
from erofs_tools.builder.chunker import ChunkPipeline, check_chunk_size, digest_function
from erofs_tools.errors import CorruptImageError, DigestMismatchError, InputError
from erofs_tools.format import rafs as R

VEC = str(NYDUS_VECTORS)
VEC_BOOT = os.path.join(VEC, "rafs-v6-2.2.boot")
VEC_ID = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
VEC_BLOB = os.path.join(VEC, "blobs", VEC_ID)



def _vector_chunks():
    t = BootstrapTables.read(VEC_BOOT)
    info = t.blobs[0]
    meta = BlobMeta.read(VEC_BLOB, info)
    raw = open(VEC_BLOB, "rb").read()
    out = []
    for k, (_uoff, us, coff, cs) in enumerate(meta.entries):
        stored = raw[coff:coff + cs]
        data = zstandard.ZstdDecompressor().decompress(stored, max_output_size=us)
        out.append((stored, us, meta.digests[k], data))
    return t, info, meta, raw, out


def _toc_by_name(path):
    with open(path, "rb") as f:
        return read_toc(f, os.path.getsize(path))


def test_vector_tables_read():
    t = BootstrapTables.read(VEC_BOOT)
    assert len(t.blobs) == 1 and t.blobs[0].blob_id == VEC_ID
    b = t.blobs[0]
    assert (b.chunk_count, b.compressed_size, b.uncompressed_size) == (2, 14554, 36864)
    assert b.features == 0x7000_0021 == R.BLOB_FEATURES_DEFAULT
    assert len(t.chunks) == 2 and t.digester == "blake3"


def test_writer_matches_vector_layout(tmp_path):
    t, vinfo, vmeta, vraw, chunks = _vector_chunks()
    w = BlobWriter(str(tmp_path), 1 << 20, "zstd", "blake3")
    for stored, us, digest, data in chunks:
        assert blake3.blake3(data).digest() == digest
        w.add_chunk(stored, us, digest)
    info = w.finish()
    mine = open(info.path, "rb").read()
    assert os.listdir(tmp_path) == [info.blob_id]
    # same sizes and table positions as nydus-image
    for field in ("compressed_size", "uncompressed_size", "chunk_count", "toc_size",
                  "ci_offset", "ci_compressed_size", "ci_uncompressed_size", "ci_compressor",
                  "features"):
        assert getattr(info, field) == getattr(vinfo, field), field
    data_end = vinfo.ci_offset - 512
    assert mine[:data_end] == vraw[:data_end]
    ci = slice(vinfo.ci_offset, vinfo.ci_offset + vinfo.ci_compressed_size + 4096)
    assert mine[ci] == vraw[ci]          # CI table + BlobMetaHeader byte-identical
    vtoc, mtoc = _toc_by_name(VEC_BLOB), _toc_by_name(info.path)
    assert list(vtoc) == list(mtoc) == [b"image.blob", b"blob.meta", b"blob.meta.header",
                                        b"blob.digest"]
    for name in vtoc:
        v, m = vtoc[name], mtoc[name]
        assert (v.flags, v.compressed_offset, v.compressed_size, v.uncompressed_size) == \
            (m.flags, m.compressed_offset, m.compressed_size, m.uncompressed_size), name
        if name != b"image.blob":   # covers our own tar header, which differs in mode bits
            assert v.uncompressed_digest == m.uncompressed_digest, name
    d = vtoc[b"blob.digest"]
    assert mine[d.compressed_offset:d.compressed_offset + 64] == \
        vraw[d.compressed_offset:d.compressed_offset + 64]
    # blob id rule (§11): sha256 over everything but the digest payload
    def excl(b):
        return b[:d.compressed_offset] + b[d.compressed_offset + d.compressed_size:]
    assert hashlib.sha256(excl(vraw)).hexdigest() == VEC_ID
    assert hashlib.sha256(excl(mine)).hexdigest() == info.blob_id
    assert hashlib.sha256(mine).hexdigest() != info.blob_id
    # image.blob digest: running blob hash after its tar header, as nydus does
    assert mtoc[b"image.blob"].uncompressed_digest == \
        hashlib.sha256(mine[:data_end + 512]).digest()
    assert hashlib.sha256(vraw[:data_end + 512]).digest() == \
        vtoc[b"image.blob"].uncompressed_digest
    # the TOC digest/size recorded in the blob table
    assert info.toc_digest == hashlib.sha256(mine[-info.toc_size:]).digest()
    assert vinfo.toc_digest == hashlib.sha256(vraw[-vinfo.toc_size:]).digest()
    # every tar header parses and the sections chain back to offset 0
    off = len(mine)
    names = []
    while off > 0:
        name, size = R.parse_tar_header(mine[off - 512:off])
        names.append(name)
        off -= 512 + size
    assert off == 0
    assert names == [b"rafs.blob.toc", b"blob.digest", b"blob.meta", b"image.blob"]


def test_cache_expansion_of_vector(tmp_path):
    t = BootstrapTables.read(VEC_BOOT)
    p = expand_blob(VEC_BLOB, t.blobs[0], str(tmp_path), t.chunk_digests(0))
    data = open(p, "rb").read()
    assert len(data) == 36864
    assert hashlib.sha256(data).hexdigest() == \
        "66c3387eb172d604c659d25771cf8979953613d89970f66264d435dbbc17c763"
    # complete file is reused, not rewritten
    st = os.stat(p)
    assert expand_blob(VEC_BLOB, t.blobs[0], str(tmp_path)) == p
    assert os.stat(p).st_mtime_ns == st.st_mtime_ns


def test_cache_expansion_detects_corruption(tmp_path):
    t = BootstrapTables.read(VEC_BOOT)
    raw = bytearray(open(VEC_BLOB, "rb").read())
    bad = tmp_path / "blobs"
    bad.mkdir()
    # flip one byte inside the second (zstd) chunk's literal data
    raw[5000] ^= 0x40
    (bad / VEC_ID).write_bytes(raw)
    cache = tmp_path / "cache"
    with pytest.raises((DigestMismatchError, CorruptImageError)):
        expand_blob(str(bad / VEC_ID), t.blobs[0], str(cache), t.chunk_digests(0))
    assert os.listdir(cache) == []


def _roundtrip(tmp_path, chunks, compressor):
    blobs = tmp_path / "blobs"
    blobs.mkdir(exist_ok=True)
    w = BlobWriter(str(blobs), 1 << 20, compressor, "blake3")
    z = zstandard.ZstdCompressor(level=3)
    scs = []
    for data in chunks:
        stored = data
        if compressor == "zstd":
            c = z.compress(data)
            stored = c if len(c) < len(data) else data
        scs.append(w.add_chunk(stored, len(data), blake3.blake3(data).digest()))
    return w.finish(), scs


@pytest.mark.parametrize("compressor", ["zstd", "none"])
def test_roundtrip_many_chunks(tmp_path, compressor):
    rnd = os.urandom
    chunks = [rnd(5000), b"a" * 4096, b"b" * 9000, rnd(1), bytes(70000), rnd(4096) * 3]
    chunks += [rnd(100) * (i + 1) for i in range(300)]   # CI table compresses
    info, scs = _roundtrip(tmp_path, chunks, compressor)
    assert info.chunk_count == len(chunks)
    if compressor == "zstd":
        assert info.ci_compressor == 3 and info.ci_compressed_size < info.ci_uncompressed_size
    else:
        assert info.ci_compressor == 0
    assert info.uncompressed_size == sum((len(c) + 4095) // 4096 * 4096 for c in chunks)
    assert info.compressed_size == os.path.getsize(info.path)
    meta = BlobMeta.read(info.path, info)
    assert [d for d in meta.digests] == [blake3.blake3(c).digest() for c in chunks]
    p = expand_blob(info.path, info, str(tmp_path / "cache"))
    cache = open(p, "rb").read()
    for sc, data in zip(scs, chunks):
        assert cache[sc.uncompressed_offset:sc.uncompressed_offset + len(data)] == data
        idx = sc.chunk_index_bytes()
        assert int.from_bytes(idx[4:8], "little") * 4096 == sc.uncompressed_offset
        assert idx[2] == 1 and int.from_bytes(idx[0:2], "little") == sc.index & 0xFFFF
    # an independent implementation (the reader) agrees
    import erofs_tools.reader as reader
    m2 = reader.open_blob(info.path, blob_id=info.blob_id, entry=info.blob_entry(0))
    assert len(m2.chunks) == len(chunks)


def test_roundtrip_is_deterministic(tmp_path):
    chunks = [bytes([i]) * (1000 * i + 1) for i in range(40)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, _ = _roundtrip(tmp_path / "a", chunks, "zstd")
    b, _ = _roundtrip(tmp_path / "b", chunks, "zstd")
    assert a.blob_id == b.blob_id
    assert open(a.path, "rb").read() == open(b.path, "rb").read()


def _finish_threads():
    return [t for t in threading.enumerate() if t.name == "erofs-blob-finish"]


def test_finish_on_a_thread_is_finish(tmp_path, monkeypatch):
    """finish_started (pack: the blob finished while the bootstrap sets the chunk
    indexes) gives finish()'s blob; abort() while it runs waits for it and leaves
    nothing; with no chunk it finishes at once (None); its error comes out of the
    wait (finish() aborts on its own thread then: abort's wait for the finish thread
    must not wait for itself). No finish thread outlives its wait."""
    chunks = [bytes([i]) * (1000 * i + 1) for i in range(40)]

    def writer(d):
        d.mkdir()
        w = BlobWriter(str(d), 1 << 20)
        for c in chunks:
            w.add_chunk(c, len(c), bytes(32))
        return w
    a = writer(tmp_path / "a").finish(commit=False)
    wb = writer(tmp_path / "b")
    job = wb.finish_started()
    assert job is not None
    b = job.result()
    assert job.result() is b            # the same, any number of times
    assert not _finish_threads()
    wb.commit()
    assert a is not None and b.blob_id == a.blob_id
    assert os.listdir(tmp_path / "b") == [b.blob_id]
    wc = writer(tmp_path / "c")
    assert wc.finish_started() is not None
    wc.abort()
    assert not _finish_threads()
    assert os.listdir(tmp_path / "c") == []
    assert BlobWriter(str(tmp_path / "c"), 1 << 20).finish_started() is None
    assert os.listdir(tmp_path / "c") == []
    wd = writer(tmp_path / "d")
    aborts = []
    real_abort = BlobWriter.abort
    gate = threading.Event()

    def abort(self):
        aborts.append(self._finishing.running_here())
        real_abort(self)

    def fail(self):
        gate.wait(HANG)         # until finish_started has returned (its Started kept)
        raise InputError("disk full, say")
    monkeypatch.setattr(BlobWriter, "_finish", fail)
    monkeypatch.setattr(BlobWriter, "abort", abort)
    job = wd.finish_started()
    assert job is not None
    gate.set()
    # finish() aborts on the finish thread: that abort must not wait for its own thread
    wait_until(lambda: not _finish_threads(), what="the failed finish thread's end")
    with pytest.raises(InputError, match="disk full"):
        job.result()
    assert aborts == [True]
    assert os.listdir(tmp_path / "d") == []
    wd.abort()                  # the caller's abort after the failure: nothing to do
    assert aborts == [True, False]
    assert os.listdir(tmp_path / "d") == []


def test_empty_writer_leaves_nothing(tmp_path):
    w = BlobWriter(str(tmp_path), 1 << 20)
    assert w.finish() is None
    assert os.listdir(tmp_path) == []
    w = BlobWriter(str(tmp_path), 1 << 20)
    w.add_chunk(b"x", 1, bytes(32))
    w.abort()
    assert os.listdir(tmp_path) == []
    with pytest.raises(InputError):
        BlobWriter(str(tmp_path / "missing"), 1 << 20)


def test_blob_info_entry_roundtrip(tmp_path):
    info, _ = _roundtrip(tmp_path, [b"hello" * 1000], "zstd")
    e = info.blob_entry(3)
    assert e.blob_index == 3 and len(e.encode()) == 256
    back = BlobInfo.from_entry(R.BlobEntry.decode(e.encode()))
    assert back.blob_id == info.blob_id and back.toc_digest == info.toc_digest


# --- chunker --------------------------------------------------------------------------

def _files(paths):
    out = []
    for i, p in enumerate(paths):
        st = os.stat(p)
        out.append((i, p, st.st_size, st.st_blocks * 512 < st.st_size))
    return out


def _consume(pipe, files):
    stored = {}
    per_file = {}
    for r in pipe.run(files):
        if r.key not in stored:
            stored[r.key] = r.stored_bytes()
        per_file.setdefault(r.file_key, []).append(r)
    return stored, per_file


@pytest.mark.parametrize("digester", ["blake3", "sha256"])
def test_chunker_dedup_and_order(tmp_path, digester):
    a = os.urandom(300_000)
    paths = []
    for i in range(20):
        p = tmp_path / f"f{i}"
        p.write_bytes(a if i % 2 else a[:100_000] + bytes(200_000))
        paths.append(str(p))
    pipe = ChunkPipeline(65536, digester, "zstd", workers=4, window=3)
    known = set()
    pipe._known = lambda k: k in known
    stored, per_file = _consume(pipe, _files(paths))
    dg = digest_function(digester)
    # every result carries the right digest and offsets, in order
    for i, p in enumerate(paths):
        data = open(p, "rb").read()
        rs = per_file[i]
        assert [r.file_offset for r in rs] == list(range(0, len(data), 65536))
        for r in rs:
            assert r.digest == dg(data[r.file_offset:r.file_offset + r.size])
    distinct = {(dg(open(p, "rb").read()[o:o + 65536]),
                 len(open(p, "rb").read()[o:o + 65536]))
                for p in paths for o in range(0, 300_000, 65536)}
    assert set(stored) == distinct
    for (_d, size), s in stored.items():
        assert len(s) <= size


def test_chunker_sparse_file_holes_not_read(tmp_path):
    p = tmp_path / "sparse"
    with open(p, "wb") as f:
        f.truncate(64 << 20)
        f.seek(10 << 20)
        f.write(b"data" * 1000)
    pipe = ChunkPipeline(1 << 20, "blake3", "zstd")
    stored, per_file = _consume(pipe, _files([str(p)]))
    assert len(per_file[0]) == 64
    assert pipe.bytes_read <= 1 << 20          # only the one data chunk was read
    assert len(stored) == 2                     # the data chunk and one zero chunk
    zero = (blake3.blake3(bytes(1 << 20)).digest(), 1 << 20)
    assert zero in stored and len(stored[zero]) < 1000


def test_chunker_incompressible_stored_raw(tmp_path):
    p = tmp_path / "r"
    data = os.urandom(50_000)
    p.write_bytes(data)
    stored, _ = _consume(ChunkPipeline(65536, "blake3", "zstd"), _files([str(p)]))
    assert list(stored.values()) == [data]


def test_chunker_rejects_bad_options(tmp_path):
    for cs in (0, 1000, 2048, 3 << 12, 32 << 20):
        with pytest.raises(InputError):
            check_chunk_size(cs)
    with pytest.raises(InputError):
        ChunkPipeline(4096, "md5")
    with pytest.raises(InputError):
        ChunkPipeline(4096, "blake3", "lz4")


def test_chunker_missing_file(tmp_path):
    pipe = ChunkPipeline(4096)
    with pytest.raises(InputError, match="cannot read"):
        list(pipe.run([(0, str(tmp_path / "gone"), 10, False)]))


def test_chunker_file_shrank(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x" * 100)
    pipe = ChunkPipeline(4096)
    with pytest.raises(InputError, match="changed size"):
        list(pipe.run([(0, str(p), 5000, False)]))


def test_compressed_runs_are_placed_in_one_call_at_finish(tmp_path, monkeypatch):
    """append_chunks with csizes (pack's placement of compressed batches) places the
    runs (offsets, CI entries) in one C call when something first needs them -- the
    finish, a single append_chunk -- not one per batch (each let go of the GIL on the
    consumer's thread); the blob, the offsets and the sizes are those of appending the
    chunks one by one, single appends in between included, and finish_started's caller
    finds the offsets complete."""
    import array

    import erofs_tools.builder.blob as B

    rnd = __import__("random").Random(5)
    chunks = []
    for i in range(40):
        size = rnd.choice([1, 100, 4096, 5000, 70_000])
        stored = bytes(rnd.getrandbits(8) for _ in range(min(size, 50 + i)))
        chunks.append((stored, size, hashlib.sha256(b"%d" % i).digest()))
    calls = []
    orig = B.ci_v1_append

    def spy(*a):
        calls.append(len(a[1]))
        return orig(*a)
    monkeypatch.setattr(B, "ci_v1_append", spy)

    def one_by_one(d):
        w = BlobWriter(str(d), 1 << 20, "zstd", "blake3")
        offs = [w.append_chunk(s, us, dg)[1:] for s, us, dg in chunks]
        return w.finish(), offs

    def in_runs(d, threaded):
        digests = bytearray()
        w = BlobWriter(str(d), 1 << 20, "zstd", "blake3", digests=digests)
        coff, csize, uoff = array.array("Q"), array.array("I"), array.array("Q")
        i = 0
        for n in (7, 9, 1, 0, 5, 3):            # runs of a few batches, one single
            if n == 1:
                s, us, dg = chunks[i]
                digests.extend(dg)
                index, co, uo = w.append_chunk(s, us, dg)
                assert (index, len(coff)) == (i, i)     # the runs before it placed
                coff.append(co)
                csize.append(len(s))
                uoff.append(uo)
                i += 1
                continue
            part = chunks[i:i + n]
            for _s, _us, dg in part:
                digests.extend(dg)
            w.append_chunks([b"".join(s for s, _, _ in part)] if part else [],
                            [us for _, us, _ in part], coff, csize, uoff,
                            csizes=[len(s) for s, _, _ in part])
            i += n
        rest = chunks[i:]
        for _s, _us, dg in rest:
            digests.extend(dg)
        w.append_chunks([s for s, _, _ in rest], [us for _, us, _ in rest], coff, csize,
                        uoff, csizes=[len(s) for s, _, _ in rest])
        assert w.count == len(chunks)
        if threaded:
            job = w.finish_started()
            offs = list(zip(coff, uoff))        # complete before the thread's finish
            info = job.result()
            w.commit()
        else:
            info = w.finish()
            offs = list(zip(coff, uoff))
        assert list(csize) == [len(s) for s, _, _ in chunks]
        return info, offs

    (tmp_path / "a").mkdir()
    want, want_offs = one_by_one(tmp_path / "a")
    for threaded in (False, True):
        d = tmp_path / f"b{threaded}"
        d.mkdir()
        calls.clear()
        info, offs = in_runs(d, threaded)
        assert offs == want_offs
        assert info.blob_id == want.blob_id
        assert (d / info.blob_id).read_bytes() == (tmp_path / "a" / want.blob_id).read_bytes()
        # three placements: the runs before the single chunk, the ones after it, and
        # none per batch; none for the empty run
        assert calls == [16, 23], calls


def test_compressed_run_bigger_than_its_data_refused_at_placement(tmp_path):
    """A stored size over its chunk's data (a compressor bug) still fails the blob,
    now when the runs are placed (ValueError), and leaves no file behind."""
    import array

    w = BlobWriter(str(tmp_path), 1 << 20, "zstd", "blake3", digests=bytearray(64))
    coff, csize, uoff = array.array("Q"), array.array("I"), array.array("Q")
    w.append_chunks([b"x" * 30], [20, 10], coff, csize, uoff, csizes=[20, 10])
    w.append_chunks([b"y" * 12], [10], coff, csize, uoff, csizes=[12])
    with pytest.raises(ValueError, match="larger than its data"):
        w.finish()
    assert os.listdir(tmp_path) == []
