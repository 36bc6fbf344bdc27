"""Pack's batch path: the C chunk reader (csrc/chunkread.c), the batch compressor and
the pipeline built on them (one read and one compress call per batch, each worker
reusing its read buffer): the same digests and stored bytes as hashing and compressing
each chunk alone, whatever the worker count."""
import array
import errno
import os

import blake3
import pytest
import zstandard

from erofs_tools._native import cold_decode_one
from erofs_tools._native_chunkio import ChunkReadError, read_chunks
from erofs_tools.builder import chunker, compressor
from erofs_tools.builder.chunker import ChunkPipeline, Compressor
from erofs_tools.errors import InputError


def _args(pieces):
    """pieces: [(path, file offset, length)] -> read_chunks arguments, buffer gaps of 3
    bytes between pieces (offsets need not be contiguous)."""
    names = bytearray()
    where = {}
    name_off, file_off = array.array("I"), array.array("Q")
    lengths, buf_off = array.array("I"), array.array("Q")
    pos = 0
    for path, off, n in pieces:
        p = os.fsencode(path)
        if p not in where:
            where[p] = len(names)
            names += p + b"\0"
        name_off.append(where[p])
        file_off.append(off)
        lengths.append(n)
        buf_off.append(pos)
        pos += n + 3
    return bytes(names), name_off, file_off, lengths, buf_off, bytearray(b"\xee" * pos)


def test_read_chunks_reads_each_piece_where_asked(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    da, db = os.urandom(100_000), os.urandom(5000)
    a.write_bytes(da)
    b.write_bytes(db)
    pieces = [(a, 0, 65536), (a, 65536, 100_000 - 65536), (b, 0, 5000), (a, 10, 7)]
    args = _args(pieces)
    read_chunks(*args)
    buf, buf_off = args[5], args[4]
    for i, (path, off, n) in enumerate(pieces):
        want = (da if path == a else db)[off:off + n]
        assert bytes(buf[buf_off[i]:buf_off[i] + n]) == want
        assert bytes(buf[buf_off[i] + n:buf_off[i] + n + 3]) == b"\xee" * 3   # gap intact


def test_pack_leaves_the_sources_access_times_alone(tmp_path):
    """pack reads its files with O_NOATIME: a file whose atime is before its mtime (one
    never read since it was written: relatime would update it on this read, an inode
    made dirty per file) keeps its atime through a pack (fails before: the read set it
    to now)."""
    from erofs_tools.builder.rafs import pack
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    files = [src / "a", src / "d" / "b", src / "d" / "c"]
    for i, f in enumerate(files):
        f.write_bytes(os.urandom(3000 + i) * (1 + 400 * i))     # one small, two chunked
    old = 1_000_000_000
    for f in files:
        st = f.stat()
        os.utime(f, ns=(old * 10**9, st.st_mtime_ns))
    pack(src, tmp_path / "boot", tmp_path / "blobs")
    assert [f.stat().st_atime_ns for f in files] == [old * 10**9] * 3
    # a plain read of one does set it: relatime is on here, the check above means something
    files[0].read_bytes()
    assert files[0].stat().st_atime_ns > old * 10**9


def _drop_fowner() -> None:
    """This process without CAP_FOWNER in its effective set (capset(2) by ctypes): its
    O_NOATIME opens of a file it does not own get EPERM."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)          # _LINUX_CAPABILITY_VERSION_3
    data = (ctypes.c_uint32 * 6)()                      # 2 x (effective, permitted, inh)
    if libc.capget(hdr, data) or data[0] & 1 << 3 == 0:
        raise OSError(ctypes.get_errno(), "capget: no CAP_FOWNER to drop")
    data[0] &= ~(1 << 3)
    if libc.capset(hdr, data):
        raise OSError(ctypes.get_errno(), "capset")


@pytest.mark.root
def test_read_chunks_of_another_users_file_without_o_noatime(tmp_path):
    """O_NOATIME is only for the file's owner (or CAP_FOWNER): a reader that may not
    ask for it gets EPERM and reads the file without it (and so every later file of
    the process), as before; the bytes are the same, read with the kernel's own refusal
    (a child process without CAP_FOWNER, the files another user's)."""
    from helpers import require
    require(os.geteuid() == 0, "root (files of another user, capset)")
    f, g = tmp_path / "f", tmp_path / "g"
    data = os.urandom(10_000)
    f.write_bytes(data)
    g.write_bytes(data[::-1])
    for p in (f, g):
        os.chown(p, 65534, 65534)
    args = _args([(f, 0, 10_000), (g, 0, 10_000)])
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                # the child reads without CAP_FOWNER, hands the bytes back
        try:
            _drop_fowner()
            try:
                os.close(os.open(f, os.O_RDONLY | os.O_NOATIME))
                os.write(w, b"O_NOATIME allowed")
            except PermissionError:
                read_chunks(*args)
                buf = args[5]
                os.write(w, bytes(buf[0:10_000]) + bytes(buf[10_003:20_003]))
        finally:
            os._exit(0)
    os.close(w)
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    os.waitpid(pid, 0)
    assert out == data + data[::-1]


def test_read_chunks_errors_name_the_chunk(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"x" * 100)
    (tmp_path / "link").symlink_to(f)
    with pytest.raises(ChunkReadError) as e:
        read_chunks(*_args([(f, 0, 100), (tmp_path / "gone", 0, 10)]))
    assert e.value.index == 1 and e.value.errno == errno.ENOENT
    with pytest.raises(ChunkReadError) as e:         # never follows a symlink
        read_chunks(*_args([(tmp_path / "link", 0, 10)]))
    assert e.value.index == 0 and e.value.errno == errno.ELOOP
    with pytest.raises(ChunkReadError) as e:         # the file is shorter than the chunk
        read_chunks(*_args([(f, 0, 50), (f, 50, 51)]))
    assert e.value.index == 1 and e.value.what == "short"


def test_read_chunks_opens_in_and_out_of_each_directory(tmp_path, monkeypatch):
    """Files of one directory are opened through that directory (csrc/chunkread.c's
    dir cache): files of other directories, back again, a directory reached through a
    symlink (followed, as an open by the whole path does), a relative path, a missing
    directory (the file's own error) all read or fail as opening the path would."""
    data = {}
    for d in ("a", "b", "a/sub"):
        (tmp_path / d).mkdir(exist_ok=True)
    for name in ("a/x", "a/y", "b/x", "a/sub/z", "a/z"):
        data[name] = os.urandom(3000 + len(data))
        (tmp_path / name).write_bytes(data[name])
    (tmp_path / "via").symlink_to(tmp_path / "a")
    monkeypatch.chdir(tmp_path)
    order = ["a/x", "a/y", "b/x", "a/z", "a/sub/z", "via/y", "a/x"]
    pieces = [(tmp_path / n if i % 2 else n, 0, len(data[n.replace("via", "a")]))
              for i, n in enumerate(order)]
    args = _args(pieces)
    read_chunks(*args)
    buf, buf_off = args[5], args[4]
    for i, n in enumerate(order):
        want = data[n.replace("via", "a")]
        assert bytes(buf[buf_off[i]:buf_off[i] + len(want)]) == want
    with pytest.raises(ChunkReadError) as e:
        read_chunks(*_args([(tmp_path / "a/x", 0, 10), (tmp_path / "nodir/x", 0, 10)]))
    assert e.value.index == 1 and e.value.errno == errno.ENOENT
    with pytest.raises(ChunkReadError) as e:        # a file, not a directory, on the way
        read_chunks(*_args([(tmp_path / "a/x", 0, 10), (tmp_path / "a/x/y", 0, 10)]))
    assert e.value.index == 1 and e.value.errno == errno.ENOTDIR


def test_read_chunks_rejects_bad_arguments(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"x" * 100)
    names, no, fo, ln, bo, buf = _args([(f, 0, 100)])
    with pytest.raises(ValueError, match="NUL"):
        read_chunks(names[:-1], no, fo, ln, bo, buf)
    with pytest.raises(ValueError, match="lengths"):
        read_chunks(names, no, fo, ln, array.array("Q"), buf)
    with pytest.raises(ValueError, match="fit"):
        read_chunks(names, no, fo, ln, bo, bytearray(99))
    with pytest.raises(ValueError, match="item size"):
        read_chunks(names, no, fo, array.array("Q", [100]), bo, buf)


@pytest.mark.parametrize("name", ["zstd", "lz4_block", "none"])
def test_compress_many_is_compress_one_by_one(name):
    text = b"the quick brown fox jumps over the lazy dog " * 2000
    buf = bytearray(text + os.urandom(30_000) + bytes(50_000))
    pieces = [(0, 88_000), (88_000, 30_000), (118_000, 50_000), (5, 1), (100, 4096)]
    c = Compressor(name)
    many = c.compress_many(buf, pieces)
    one = [c.compress(bytes(buf[o:o + n])) for o, n in pieces]
    assert [bytes(x) for x in many] == [bytes(x) for x in one]
    assert bytes(many[1]) == bytes(buf[88_000:118_000])     # incompressible: raw
    if name == "zstd":
        assert zstandard.ZstdDecompressor().decompress(bytes(many[0])) == text[:88_000]
    if name == "lz4_block":
        assert cold_decode_one("lz4_block", bytes(many[0]), 88_000) == text[:88_000]
    if name != "none":
        buf[:] = bytes(len(buf))         # the caller reuses its buffer: results own theirs
        assert [bytes(x) for x in many] == [bytes(x) for x in one]


def test_zstd_batches_are_python_zstandards_frames_whatever_came_before():
    """pack's zstd batches go through the C core (csrc/chunkzstd.c) with python-
    zstandard's own zstd and one static context per thread for the whole pack: each
    frame is python-zstandard's compress() of the piece alone, whatever the pieces
    compressed before it on that context (many small ones, then big ones, which the
    context's fixed workspace must hold), and a piece that does not shrink is stored
    as it is."""
    c = Compressor("zstd")
    assert c._fns is not None and c.pooled       # the C path is the one under test
    ref = zstandard.ZstdCompressor(level=3)
    text = b"".join(b"line %d of some text, " % i for i in range(200_000))
    rnd = os.urandom(300_000)
    buf = bytearray(text[:4 << 20] + rnd)
    small = [((i * 7919) % 1_000_000, 1 + (i * 131) % 5000) for i in range(300)]
    big = [(0, 1 << 20), (1 << 20, 3 << 20), (4 << 20, 300_000), (100, 200_000)]
    for pieces in (small, big, small + big + small):
        many = c.compress_many(buf, pieces)
        for (o, n), got in zip(pieces, many):
            z = ref.compress(bytes(buf[o:o + n]))
            assert bytes(got) == (z if len(z) < n else bytes(buf[o:o + n]))
    assert bytes(c.compress_many(buf, [(4 << 20, 300_000)])[0]) == rnd   # raw
    buf[:] = bytes(len(buf))         # the results are the pool's buffer, not `buf`
    assert zstandard.ZstdDecompressor().decompress(bytes(many[300])) == text[:1 << 20]


def test_zstd_batches_without_the_c_path_are_the_same_frames(monkeypatch):
    """Without zstandard's cffi module (another build of it) pack falls back to
    multi_compress_to_buffer: the same frames."""
    buf = bytearray(b"abc " * 100_000 + os.urandom(5000))
    pieces = [(0, 65536), (65536, 200_000), (400_000, 5000), (3, 10)]
    native = [bytes(x) for x in Compressor("zstd").compress_many(buf, pieces)]
    monkeypatch.setattr(compressor, "_zstd_fns", lambda level: None)
    c = Compressor("zstd")
    assert c._fns is None and not c.pooled
    assert [bytes(x) for x in c.compress_many(buf, pieces)] == native


def test_every_zstd_fallback_gives_the_c_paths_bytes_and_says_which_it_is(monkeypatch,
                                                                        caplog):
    """python-zstandard without its cffi module (its import fails: no C core batches),
    then without multi_compress_to_buffer too (one call per chunk): the same stored
    bytes as the C path, and a debug line naming the path each one took."""
    import logging
    import sys
    buf = bytearray(b"abc " * 100_000 + os.urandom(5000))
    pieces = [(0, 65536), (65536, 200_000), (400_000, 5000), (3, 10), (17, 70_000)]
    caplog.set_level(logging.DEBUG, logger=compressor.__name__)
    c_path = Compressor("zstd")
    assert c_path._fns is not None and "C core" in c_path.batch_path()
    native = [bytes(x) for x in c_path.compress_many(buf, pieces)]
    assert "zstd batches: C core" in caplog.text
    caplog.clear()
    monkeypatch.delattr(zstandard, "_cffi", raising=False)     # its import fails
    monkeypatch.setitem(sys.modules, "zstandard._cffi", None)
    multi = Compressor("zstd")
    assert multi._fns is None and not multi.pooled
    assert "no C core batches" in caplog.text
    if compressor._multi_compress():     # python-zstandard's C backend (Debian's)
        assert "zstd batches: python-zstandard multi_compress_to_buffer" in caplog.text
        assert [bytes(x) for x in multi.compress_many(buf, pieces)] == native
    caplog.clear()
    monkeypatch.setattr(compressor, "_multi_compress", lambda: False)
    single = Compressor("zstd")
    assert "zstd batches: python-zstandard, one call per chunk" in caplog.text
    assert [bytes(x) for x in single.compress_many(buf, pieces)] == native


def _every_zstd_path_gives(monkeypatch, buf, pieces, want):
    """Assert that the C core's batches, multi_compress_to_buffer (where this
    python-zstandard has it) and the one-by-one path (compress_many and compress) all
    turn the `pieces` of `buf` into `want`."""
    import sys
    outs = [[bytes(x) for x in Compressor("zstd").compress_many(buf, pieces)]]
    monkeypatch.delattr(zstandard, "_cffi", raising=False)     # no C core batches
    monkeypatch.setitem(sys.modules, "zstandard._cffi", None)
    if compressor._multi_compress():
        outs.append([bytes(x) for x in Compressor("zstd").compress_many(buf, pieces)])
    monkeypatch.setattr(compressor, "_multi_compress", lambda: False)
    one = Compressor("zstd")
    outs.append([bytes(x) for x in one.compress_many(buf, pieces)])
    outs.append([bytes(one.compress(bytes(buf[o:o + n]))) for o, n in pieces])
    for out in outs:
        assert out == want


def test_small_gzip_chunks_are_stored_raw_without_zstd_on_every_path(monkeypatch):
    """zstd: a chunk of at most 64 KiB that starts as a gzip member is stored raw
    without trying zstd (deflate's output does not shrink; zstd's set-up and analysis
    of each small .gz file was ~0.1 CPU s of a /usr/share pack), even where zstd would
    shrink it; a bigger one, or one that only looks like gzip later, is compressed as
    before. The C core, multi_compress_to_buffer and the one-by-one path agree."""
    import gzip

    from erofs_tools._native import lib
    assert lib.ERN_ZSTD_GZIP_RAW_MAX == compressor.GZIP_RAW_MAX
    # gzip -0: stored deflate blocks, which zstd would shrink a lot
    text = b"some text that compresses well " * 4000
    small = gzip.compress(text[:60_000], compresslevel=0)
    big = gzip.compress(text, compresslevel=0)
    assert len(small) <= compressor.GZIP_RAW_MAX < len(big)
    ref = zstandard.ZstdCompressor(level=3)
    assert len(ref.compress(small)) < len(small) // 10      # zstd would shrink it
    buf = bytearray(small + big + b"x" + small)
    pieces = [(0, len(small)), (len(small), len(big)),
              (len(small) + len(big), 1 + len(small)), (0, 2), (len(small), 65536),
              (len(small), 65537)]
    want = [small, ref.compress(big), ref.compress(b"x" + small), small[:2], big[:65536],
            ref.compress(big[:65537])]
    _every_zstd_path_gives(monkeypatch, buf, pieces, want)


def _compressible_png(n):
    """A PNG file of about n bytes whose zstd frame is far smaller: its signature and
    one uncompressed-looking chunk of repeated text (the rule looks at the bytes only)."""
    import struct
    import zlib
    body = (b"tEXtComment\x00" + b"a line of text that zstd shrinks well " * n)[:n - 16]
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(body) - 4) + body + \
        struct.pack(">I", zlib.crc32(body))


def test_small_xz_bzip2_png_chunks_are_stored_raw_on_every_path(monkeypatch):
    """zstd: like a small gzip file, a chunk of at most 64 KiB that starts as an xz
    stream or a bzip2 stream (its block's or end's magic after the header), or of at
    most 4 KiB as a PNG file, is stored raw without trying zstd, even where zstd would
    shrink it (csrc/chunkzstd.c: the evidence); a PNG over 4 KiB, a JPEG, a 'BZh' text,
    any of them over 64 KiB and a zstd frame (a Nydus blob's frames back to back: zstd
    halves them) are compressed as before. The C core, multi_compress_to_buffer and the
    one-by-one path agree."""
    import bz2
    import lzma

    from erofs_tools._native import lib
    assert lib.ERN_ZSTD_PNG_RAW_MAX == compressor.PNG_RAW_MAX == 4096
    text = b"some text that compresses well " * 4000
    # each format's header and then bytes that zstd would shrink a lot
    xz = lzma.compress(os.urandom(100)) + text[:50_000]
    zst = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(
        text[:30_000]) + text[:20_000]
    assert zst.startswith(b"\x28\xb5\x2f\xfd")
    bz = bz2.compress(os.urandom(100)) + text[:20_000]
    bz_empty = bz2.compress(b"") + text[:20_000]
    png_small, png_big = _compressible_png(4096), _compressible_png(4097)
    jpeg = b"\xff\xd8\xff\xe0" + text[:3000]
    bz_text = b"BZh9 is not a stream " + text[:3000]
    xz_big = b"\xfd7zXZ\x00" + text[:65531]
    raw_parts = [xz, bz, bz_empty, png_small, xz_big[:65536]]
    zstd_parts = [png_big, jpeg, bz_text, xz_big, png_small[:7] + text[:100], zst]
    ref = zstandard.ZstdCompressor(level=3)
    for part in raw_parts:
        assert len(part) <= 65536 and len(ref.compress(part)) < len(part) * 0.9, part[:8]
    assert len(png_small) == 4096 and len(png_big) == 4097 and len(xz_big) == 65537
    parts = raw_parts + zstd_parts
    assert [compressor.stored_raw(p) for p in parts] == \
        [True] * len(raw_parts) + [False] * len(zstd_parts)
    buf = bytearray()
    pieces = []
    for part in parts:
        pieces.append((len(buf), len(part)))
        buf += part + b"gap"
    want = raw_parts + [ref.compress(p) for p in zstd_parts]
    _every_zstd_path_gives(monkeypatch, buf, pieces, want)


def test_zstd_fallback_batches_never_hand_small_gzip_chunks_to_zstd(monkeypatch):
    """The multi_compress_to_buffer fallback (no C core batches) skips the small gzip
    chunks before compressing, as `compress` and the C core do: zstd gets only the
    other pieces (none at all: no call), and each piece's stored bytes are still what
    `compress` gives it alone, in order."""
    import gzip

    from helpers import require
    monkeypatch.setattr(compressor, "_zstd_fns", lambda level: None)
    c = Compressor("zstd")
    require(c._fns is None and "multi_compress_to_buffer" in c.batch_path(),
            "python-zstandard without its C backend (no multi_compress_to_buffer)")
    text = b"some text that compresses well, line after line " * 3000
    gz = [gzip.compress(text[:n], compresslevel=lvl)
          for n, lvl in ((40_000, 0), (1000, 9), (60_000, 0))]
    rnd = os.urandom(20_000)
    big_gz = gzip.compress(text + rnd, compresslevel=0)        # over 64 KiB: compressed
    parts = [gz[0], text[:50_000], gz[1], rnd, b"\x1f\x8b", gz[2], big_gz, text[7:9000]]
    buf = bytearray()
    pieces = []
    for part in parts:
        pieces.append((len(buf), len(part)))
        buf += part + b"gap"
    raw = [compressor.stored_raw(part) for part in parts]
    assert raw == [True, False, True, False, False, True, False, False]
    handed = []
    real = zstandard.BufferWithSegments

    def recording(data, segments):
        segs = array.array("Q", segments)
        handed.append(list(zip(segs[0::2], segs[1::2])))
        return real(data, segments)
    monkeypatch.setattr(zstandard, "BufferWithSegments", recording)
    one = [c.compress(part) for part in parts]
    assert one[0] == gz[0] and len(one[1]) < 50_000     # raw; compressed
    assert [bytes(x) for x in c.compress_many(buf, pieces)] == one
    assert handed == [[p for p, r in zip(pieces, raw) if not r]]
    handed.clear()
    only_gz = [p for p, r in zip(pieces, raw) if r]
    assert [bytes(x) for x in c.compress_many(buf, only_gz)] == gz
    assert handed == []
    no_gz = [p for p, r in zip(pieces, raw) if not r]
    assert [bytes(x) for x in c.compress_many(buf, compressor.Pieces.of(no_gz))] == \
        [o for o, r in zip(one, raw) if not r]
    assert handed == [no_gz]


def test_compress_many_takes_the_callers_arrays_as_pairs():
    """The batch's own offset/length arrays (Pieces) give the same bytes as the same
    pieces as (offset, length) pairs, on every path."""
    buf = bytearray(b"xyz " * 50_000 + os.urandom(3000) + bytes(9000))
    pairs = [(0, 4096), (4096, 100_000), (200_000, 3000), (203_000, 9000), (1, 1)]
    arrays = compressor.Pieces(array.array("Q", [o for o, _ in pairs]),
                            array.array("I", [n for _, n in pairs]))
    of = compressor.Pieces.of(pairs)
    assert list(of.off) == list(arrays.off) and list(of.lengths) == list(arrays.lengths)
    assert list(of.segments()) == [x for p in pairs for x in p]
    for name in ("zstd", "lz4_block", "none"):
        c = Compressor(name)
        assert [bytes(x) for x in c.compress_many(buf, arrays)] == \
            [bytes(x) for x in c.compress_many(buf, pairs)]
    with pytest.raises(ValueError, match="as many"):
        compressor.Pieces(array.array("Q", [0]), array.array("I"))


def test_zstd_chunks_rejects_bad_arguments():
    from erofs_tools._native_chunkio import zstd_chunks
    fns = Compressor("zstd")._fns
    assert fns is not None
    cctx = fns.cctx()
    src = bytearray(1000)
    ok = (array.array("Q", [0, 500]), array.array("I", [500, 500]))
    stored, sizes = zstd_chunks(fns.compress2, fns.is_error, cctx, src, *ok)
    assert list(sizes) == [len(zstandard.ZstdCompressor(level=3).compress(bytes(500)))] * 2
    assert bytes(stored[:sizes[0]]) == bytes(stored[sizes[0]:sizes[0] + sizes[1]])
    with pytest.raises(ValueError, match="outside"):
        zstd_chunks(fns.compress2, fns.is_error, cctx, src, array.array("Q", [600]),
                    array.array("I", [500]))
    with pytest.raises(ValueError, match="bad arrays"):
        zstd_chunks(fns.compress2, fns.is_error, cctx, src, array.array("I", [0]),
                    array.array("I", [5]))
    with pytest.raises(ValueError, match="no compressor"):
        zstd_chunks(0, fns.is_error, cctx, src, *ok)


def _tree(tmp_path):
    """Files of many sizes (so batches close on bytes and on chunk count), duplicates,
    incompressible and sparse ones."""
    rnd = os.urandom(200_000)
    files = []
    for i in range(300):
        p = tmp_path / f"f{i:03d}"
        if i % 7 == 0:
            data = rnd[:(i * 997) % 150_000 + 1]             # incompressible
        elif i % 11 == 0:
            data = b"dup" * 30_000                            # the same in several files
        else:
            data = (b"%d-" % i) * ((i * 131) % 40_000 + 1)
        p.write_bytes(data)
        files.append(p)
    sp = tmp_path / "sparse"
    with open(sp, "wb") as f:
        f.truncate(1 << 20)
        f.seek(300_000)
        f.write(b"data" * 100)
    files.append(sp)
    out = []
    for k, p in enumerate(files):
        st = os.stat(p)
        out.append((k, os.fsencode(p), st.st_size, st.st_blocks * 512 < st.st_size))
    return out


def _run(pipe, files):
    stored, order = {}, []
    for r in pipe.run(files):
        order.append((r.file_key, r.file_offset, r.size, r.digest))
        # bytes come with a claim (compressed) or with the result itself ("none")
        if (r.claim is not None or r.data is not None) and r.key not in stored:
            stored[r.key] = bytes(r.stored_bytes())
    return order, stored


@pytest.mark.parametrize("name", ["zstd", "none"])
def test_pipeline_same_result_whatever_the_workers(tmp_path, monkeypatch, name):
    monkeypatch.setattr(chunker, "BATCH_BYTES", 100_000)     # many batches per worker
    monkeypatch.setattr(chunker, "BATCH_CHUNKS", 9)
    files = _tree(tmp_path)
    first = None
    for workers, window in ((1, 1), (2, 4), (5, 3)):
        got = _run(ChunkPipeline(65536, "blake3", name, workers=workers, window=window),
                   files)
        if first is None:
            first = got
        assert got == first
    order, stored = first
    c = Compressor(name)
    for k, path, size, _sparse in files:
        data = open(path, "rb").read()
        rs = [o for o in order if o[0] == k]
        assert [o[1] for o in rs] == list(range(0, size, 65536))
        for _k, off, n, digest in rs:
            piece = data[off:off + n]
            assert digest == blake3.blake3(piece).digest()
            assert stored[(digest, n)] == c.compress(piece)      # the per-chunk frames


def test_pipeline_symlink_swapped_in_is_not_followed(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"x" * 100)
    (tmp_path / "l").symlink_to(f)
    pipe = ChunkPipeline(4096)
    with pytest.raises(InputError, match="cannot read .*l"):
        list(pipe.run([(0, str(tmp_path / "l"), 100, False)]))


@pytest.mark.parametrize("name", ["zstd", "none"])
@pytest.mark.parametrize("batched", [False, True])
def test_claims_of_stored_chunks_are_dropped(tmp_path, monkeypatch, name, batched):
    """A worker that claims a key just before the consumer stores its first copy (its
    `known` said no) compresses it again; the consumer then finds the key stored and
    must drop that claim, or its bytes stay held to the end. Forced here: the workers'
    `known` always says no. ("none" makes no claims: each result carries its bytes.)"""
    from erofs_tools.builder.chunk_dict import ChunkDict
    from erofs_tools.builder.rafs import ChunkPlacer, PackOptions
    monkeypatch.setattr(chunker, "BATCH_CHUNKS", 4)
    files = _tree(tmp_path)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    placer = ChunkPlacer(PackOptions(chunk_size=65536, compressor=name, workers=2),
                         str(blobs), ChunkDict())
    placer.pipe._known = lambda key: False
    placer.pipe._known_many = None        # the batch's lookups: `known` of each
    try:
        _place_all(placer, files, batched)
        assert placer.stats["chunks_dedup"] > 0
        assert placer.pipe._claims == {}
    finally:
        placer.writer.abort()


def test_known_many_is_known_of_each(tmp_path):
    """The workers' lookups a batch at a time (ChunkPlacer.known_many) answer what
    known() answers chunk by chunk: stored, the same digest with another size, a
    digest stored under two sizes (ChunkRefs.other), a chunk dict's, absent; a hole's
    digest (None) is False; across digest-table growth."""
    from erofs_tools.builder.chunk_dict import ChunkDict
    from erofs_tools.builder.rafs import ChunkPlacer, PackOptions
    placer = ChunkPlacer(PackOptions(chunk_size=65536, compressor="zstd", workers=1),
                         str(tmp_path), ChunkDict())
    try:
        refs = placer.refs
        digests = [i.to_bytes(4, "little") * 8 for i in range(70000)]
        for i, d in enumerate(digests[:40000]):     # past the first table's growth
            refs.add_new(d, 4096 + i % 3, i, 0, 1, 0)
        refs.add_new(digests[7], 777, 40000, 0, 1, 0)       # digests[7] with two sizes
        placer.cdict.chunks[(digests[50000], 100)] = object()   # type: ignore[assignment]
        keys = [(d, 4096 + i % 3) for i, d in enumerate(digests[:40000:7])]
        keys += [(digests[7], 777), (digests[7], 778), (digests[8], 4096),
                 (digests[50000], 100), (digests[50000], 101), (digests[60000], 4096)]
        got = placer.known_many([d for d, _ in keys] + [None], [n for _, n in keys] + [9])
        assert got == [placer.known(k) for k in keys] + [False]
        assert got[-7:] == [True, False, False, True, False, False, False]
    finally:
        placer.writer.abort()


def _place_all(placer, files, batched):
    """Every chunk of `files` through the placer: a batch at a time or one by one."""
    if batched:
        for batch in placer.pipe.run_batches(files):
            placer.place_batch(batch)
    else:
        for r in placer.pipe.run(files):
            placer.place(r)


def _place_finished(blobs, files, batched, compressor, workers):
    """A ChunkPlacer writing into the new directory `blobs` given every chunk of `files`
    (_place_all), its blob finished (aborted on a failure) -> (placer, BlobInfo)."""
    from erofs_tools.builder.chunk_dict import ChunkDict
    from erofs_tools.builder.rafs import ChunkPlacer, PackOptions
    blobs.mkdir()
    placer = ChunkPlacer(PackOptions(chunk_size=65536, compressor=compressor,
                                     workers=workers), str(blobs), ChunkDict())
    try:
        _place_all(placer, files, batched)
        info = placer.writer.finish()
    except BaseException:
        placer.writer.abort()
        raise
    return placer, info


@pytest.mark.parametrize("name", ["zstd", "none"])
def test_place_batch_is_place_one_by_one(tmp_path, monkeypatch, name):
    """The consumer's batch placement (ChunkPlacer.place_batch: lookups inlined, the
    new chunks handed to BlobWriter.append_chunks in one call) records what place()
    records chunk by chunk: the same chunk records, file references, counters, blob
    bytes and blob id; also across digest-table growth (small tables forced) and for a
    digest met with two sizes."""
    from erofs_tools.builder.chunk_refs import DigestTable
    monkeypatch.setattr(chunker, "BATCH_CHUNKS", 5)
    orig_init = DigestTable.__init__

    def small_init(self):
        orig_init(self)
        self._slots = array.array("i", [-1]) * 8      # grown many times over the run
        self._mask = 7
    monkeypatch.setattr(DigestTable, "__init__", small_init)
    files = _tree(tmp_path)
    # a digest collision cannot be made: give one chunk's digest to a chunk of
    # another size, as placement sees them (ChunkRefs.other)
    seen: dict[bytes, int] = {}
    orig_run = ChunkPipeline._run_batch

    def run_batch(self, seq, batch):
        out = orig_run(self, seq, batch)
        for r in out:
            if r.size != 65536 and r.size % 2 and seen.setdefault(b"odd", r.size) != r.size:
                r.digest = seen.setdefault(b"d", r.digest)
        return out
    monkeypatch.setattr(ChunkPipeline, "_run_batch", run_batch)
    got = []
    for batched in (False, True):
        seen.clear()
        blobs = tmp_path / f"blobs{int(batched)}"
        placer, info = _place_finished(blobs, files, batched, name, 1)
        refs = placer.refs
        got.append((dict(placer.stats), bytes(refs.new.digests), refs.other, refs.coff,
                    refs.csize, refs.uoff, refs.usize, refs.files, refs.nrefs, refs.refs,
                    refs.file_off, [refs.new.get(refs.new.digest(i))
                                    for i in range(refs.new.n)],
                    info.blob_id, (blobs / info.blob_id).read_bytes()))
    assert got[0][2], "no digest met with two sizes: the test lost its point"
    assert got[0][0]["chunks_dedup"] > 0 and got[0][0]["chunks_new"] > 0
    assert got[1] == got[0]


def test_batch_buffers_come_back_to_the_pool_when_no_view_is_left():
    """pack's batch read buffers (csrc/chunkread.c ern_batchbuf_*): a buffer whose last
    view is gone serves the next batch as it is (not zeroed, not unmapped); one still
    viewed is not handed out again."""
    from erofs_tools._native import ffi
    from erofs_tools._native_chunkio import batch_buffer

    def addr(mv):
        return int(ffi.cast("uintptr_t", ffi.from_buffer(mv)))
    b = batch_buffer(1 << 20)
    b[:4] = b"\xaa\xbb\xcc\xdd"
    first = addr(b)
    del b
    b = batch_buffer(700_000)           # a smaller batch fits the idle buffer
    assert addr(b) == first and bytes(b[:4]) == b"\xaa\xbb\xcc\xdd" and len(b) == 700_000
    view = b[100:200]
    del b
    other = batch_buffer(1 << 20)       # the first is still viewed: not reused
    assert addr(other) != first
    del other
    view[:2] = b"ok"                    # still the first buffer's memory, still valid
    assert bytes(view[:2]) == b"ok" and len(batch_buffer(0)) == 0


def test_gather_copies_pieces_back_to_back():
    """The blob writer's group copy (csrc/chunkread.c ern_gather): bytes, views of
    bytearrays and empty pieces, in order; a buffer too small is refused, not overrun."""
    from erofs_tools._native_chunkio import gather
    src = bytearray(os.urandom(5000))
    pieces = [b"abc", memoryview(src)[100:4100], b"", memoryview(b"xyz")[1:], bytes(src[:7])]
    want = b"".join(bytes(p) for p in pieces)
    dst = bytearray(b"\xee" * (len(want) + 10))
    assert gather(pieces, dst) == len(want)
    assert dst[:len(want)] == want and dst[len(want):] == b"\xee" * 10
    with pytest.raises(ValueError):
        gather(pieces, bytearray(len(want) - 1))
    assert gather([], bytearray()) == 0


def test_chunk_info_table_in_c_is_the_format_encoding():
    """The C chunk info table (ern_ci_order + ern_ci_entries): the used chunks sorted by
    digest, each entry R.ChunkInfo's encoding; pieces whole blocks but the last."""
    from erofs_tools.builder.chunk_refs import TABLE_PIECE, ChunkRefs
    from erofs_tools.format import rafs as R
    refs = ChunkRefs()
    n = 30_000                          # three pieces
    for i in range(n):
        d = blake3.blake3(b"%d" % i).digest()
        us = 4096 * (1 + i % 7)
        refs.add_new(d, us, i, 1000 * i, us - (i % 3), 4096 * 8 * i, absent=True)
        if i % 5 == 1:
            refs.file_off[i] = 65536 * (i % 11)
    used = bytearray(b"\1" * n)
    used[7] = used[12_345] = 0
    pieces = list(refs.chunk_info_table((used, bytearray()), {-1: 3}))
    assert len(pieces) == 3 and all(len(p) % 4096 == 0 for p in pieces[:-1])
    assert all(len(p) <= TABLE_PIECE for p in pieces)
    want = b"".join(
        R.ChunkInfo.pack(refs.new.digest(i), 3,
                         R.CHUNK_FLAG_COMPRESSED if refs.csize[i] != refs.usize[i] else 0,
                         refs.csize[i], refs.usize[i], refs.coff[i], refs.uoff[i],
                         refs.file_off.get(i, 0), i, 0)
        for i in sorted((i for i in range(n) if used[i]), key=refs.new.digest))
    assert b"".join(pieces) == want


@pytest.mark.parametrize("compressor", ["zstd", "none"])
def test_finish_imports_come_while_chunking_only_when_compressed(tmp_path, compressor):
    """A compressed pack imports what the blob's finish needs (the reader layer) while
    its workers still compress, not after the last chunk when a core idles; without
    compression not before the finish (the modules would count in its peak memory).
    A fresh interpreter: the test session has imported the reader long ago."""
    import subprocess
    import sys
    src = tmp_path / "src"
    src.mkdir()
    for i in range(24):         # 24 batches of one 1 MiB chunk each
        (src / f"f{i:02d}").write_bytes(bytes([i]) * 4096 + os.urandom((1 << 20) - 4096))
    (tmp_path / "blobs").mkdir()
    code = (
        "import sys\n"
        "from erofs_tools.builder import blob, rafs\n"
        "seen = []\n"
        "orig = blob.BlobWriter.finish\n"
        "def finish(self, *a, **k):\n"
        "    seen.append('erofs_tools.reader.bootstrap' in sys.modules)\n"
        "    return orig(self, *a, **k)\n"
        "blob.BlobWriter.finish = finish\n"
        "assert 'erofs_tools.reader.bootstrap' not in sys.modules\n"
        f"rafs.pack({str(src)!r}, {str(tmp_path / 'boot')!r}, {str(tmp_path / 'blobs')!r},"
        f" rafs.PackOptions(compressor={compressor!r}, workers=2))\n"
        "print(seen)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("[True]" if compressor == "zstd" else "[False]")


@pytest.mark.parametrize("name", ["zstd", "lz4_block", "none"])
def test_compress_batch_runs_lie_back_to_back_in_its_base(name):
    """Compressor.compress_batch: compress_many's stored pieces; with the C core's zstd
    they lie back to back, in order, in the one buffer it gives as base (a run of them
    is then one piece for the blob writer); other compressors give no base."""
    text = b"the quick brown fox jumps over the lazy dog " * 2000
    buf = bytearray(text + os.urandom(30_000) + bytes(50_000))
    pieces = [(0, 88_000), (88_000, 30_000), (118_000, 50_000), (5, 1), (100, 4096)]
    c = Compressor(name)
    off = array.array("Q", [o for o, _ in pieces])
    lengths = array.array("I", [n for _, n in pieces])
    base, stored = c.compress_batch(buf, compressor.Pieces(off, lengths))
    assert [bytes(x) for x in stored] == [bytes(x) for x in c.compress_many(buf, pieces)]
    if name == "zstd" and c._fns is not None:
        assert base is not None
        assert bytes(base[:sum(map(len, stored))]) == b"".join(bytes(x) for x in stored)
    else:
        assert base is None
    assert c.compress_batch(buf, compressor.Pieces.of([]))[1] == []


def test_compressed_batches_go_to_the_writer_in_runs(tmp_path, monkeypatch):
    """place_batch hands the blob writer a compressed batch's new chunks as runs of its
    stored buffer (fewer pieces than chunks, each cut by csizes), and the blob is the
    one the writer makes of the chunks one by one (test_place_batch_is_place_one_by_one
    compares the whole records)."""
    from erofs_tools.builder.blob import BlobWriter
    files = _tree(tmp_path)
    calls = []
    orig = BlobWriter.append_chunks

    def spy(self, stored, sizes, coff, csize, uoff, raw=False, csizes=None):
        calls.append((len(stored), len(sizes), csizes is not None))
        return orig(self, stored, sizes, coff, csize, uoff, raw=raw, csizes=csizes)
    monkeypatch.setattr(BlobWriter, "append_chunks", spy)
    out = {}
    for batched in (True, False):
        blobs = tmp_path / f"blobs-{batched}"
        _, info = _place_finished(blobs, files, batched, "zstd", 2)
        out[batched] = (info.blob_id, (blobs / info.blob_id).read_bytes())
    assert out[True] == out[False]
    if Compressor("zstd")._fns is not None:
        assert calls and all(runs for _, _, runs in calls)
        assert sum(p for p, _, _ in calls) < sum(n for _, n, _ in calls)


def test_regular_files_without_chunks_as_a_node_set_masks_them():
    """The bootstrap's regular files that get no chunk indexes (chunk_refs._without):
    through NodeSet.without's big-int mask the same nodes, in the same (ascending)
    order, as asking each node, whatever the lengths of the set and the mask."""
    import random

    from erofs_tools.builder.chunk_refs import _without
    from erofs_tools.builder.rafs_walk import NodeSet

    rnd = random.Random(7)
    for size, mask_len in [(0, 0), (1, 0), (5000, 100), (5000, 9000), (70_000, 70_000)]:
        nodes = rnd.sample(range(size), size // 3) if size else []
        regular = NodeSet(nodes)
        mask = bytearray(rnd.getrandbits(1) for _ in range(mask_len))
        want = [n for n in sorted(nodes) if n >= len(mask) or not mask[n]]
        assert list(regular.without(mask)) == want
        assert list(_without(regular, mask)) == want
        assert list(_without(sorted(nodes), mask)) == want       # any iterable
    assert list(NodeSet([0, 3, 8]).without(b"\x01\x00\x00\x01")) == [8]


def test_ci_v1_append_places_chunks_as_encode_ci_v1_does():
    """The blob writer's C placement: each chunk's offsets and CI v1 entry as
    format/rafs.py's encode_ci_v1 gives them, the positions advanced past the run, and
    a stored size of 0 or over its data's refused."""
    from erofs_tools._native_chunkio import ci_v1_append
    from erofs_tools.format import rafs as R
    cs = array.array("I", [10, 4096, 1 << 20, 1, 70_000, (1 << 24) - 1])
    us = array.array("I", [20, 4096, 1 << 20, 5000, 1 << 20, 1 << 24])
    coff, uoff, ci, pos, upos = ci_v1_append(cs, us, (1 << 40) - 7, 8192)
    want, p, u = b"", (1 << 40) - 7, 8192
    for c, n in zip(cs, us):
        assert coff[len(want) // 16] == p and uoff[len(want) // 16] == u
        want += R.encode_ci_v1(u, n, p, c)
        p, u = p + c, u + (n + 4095) // 4096 * 4096
    assert bytes(ci) == want and (pos, upos) == (p, u)
    assert [R.decode_ci_v1(ci, 16 * i)[1::2] for i in range(len(cs))] == \
        [(n, c) for c, n in zip(cs, us)]
    for bad in ([5, 0], [5, 21]):
        with pytest.raises(ValueError, match=r"larger than its data, or empty \(chunk 1\)"):
            ci_v1_append(array.array("I", bad), array.array("I", [20, 20]), 0, 0)


def test_nodeset_add_many_is_add_of_each():
    """The C walk's step of nodes added at once: the same members and count as add() of
    each, repeats and nodes already in the set counted once, the table grown past them."""
    import random

    from erofs_tools.builder.rafs_walk import NodeSet
    rnd = random.Random(7)
    one, many = NodeSet(), NodeSet()
    for _ in range(50):
        step = [rnd.randrange(0, 20_000) for _ in range(rnd.randrange(1, 300))]
        for n in step:
            one.add(n)
        many.add_many(step)
        assert len(many) == len(one)
    assert list(many) == list(one) and len(set(one)) == len(one)
    assert 19_999 not in NodeSet() and 5 in NodeSet([5])


def test_compressed_window_lets_workers_pass_a_slow_head_batch(tmp_path, monkeypatch):
    """Compressed, the pipeline keeps three batches per worker in flight: while the
    batch at the head of the consumer's order is slow, the other worker goes on with
    the next five (with two per worker it idled after three, nothing queued); the
    results stay in order. Without compression the window stays max(2, workers)."""
    import threading

    from helpers import HANG

    monkeypatch.setattr(chunker, "BATCH_BYTES", 100_000)     # many batches
    monkeypatch.setattr(chunker, "BATCH_CHUNKS", 2)
    files = _tree(tmp_path)
    pipe = ChunkPipeline(65536, "blake3", "zstd", workers=2)
    assert pipe.window == 6
    assert ChunkPipeline(65536, "blake3", "none", workers=2).window == 2
    started: list[int] = []
    passed = []             # the batches the head saw run beside it
    lock = threading.Lock()
    others = threading.Semaphore(0)
    orig = pipe._run_batch

    def run_batch(seq, batch):
        with lock:
            started.append(seq)
        if seq == 0:
            # the head waits until the other worker has run every batch the window
            # lets it take meanwhile (or gives up: the assertion below says how many)
            for _ in range(5):
                if not others.acquire(timeout=HANG / 10):
                    break
                passed.append(1)
        else:
            others.release()
        return orig(seq, batch)
    monkeypatch.setattr(pipe, "_run_batch", run_batch)
    got = [(r.file_key, r.file_offset) for r in pipe.run(files)]
    want = [(k, off) for k, _p, size, _s in files for off in range(0, size, 65536)]
    assert got == want
    assert len(started) > 6
    assert len(passed) == 5                 # batches 1-5 ran beside batch 0
    assert sorted(started[:6]) == list(range(6))
