"""The C core's zran (csrc/zran.c through erofs_tools._native): an index built from a
gzip stream fed in odd pieces, every range extracted from its nearest access point equals
the same bytes of the whole stream; hostile points and data end in one clean error."""
from __future__ import annotations

import gzip
import os
import random
import zlib

import pytest

from erofs_tools._native_zran import ZranIndexer, ZranPoint, zran_extract
from erofs_tools.errors import CorruptImageError, InputError


def _data(n: int, seed: int = 1) -> bytes:
    rnd = random.Random(seed)
    words = [os.urandom(rnd.randint(1, 12)).hex().encode() for _ in range(300)]
    out = bytearray()
    while len(out) < n:
        out += rnd.choice(words) + (b"\n" if rnd.random() < 0.1 else b" ")
        if rnd.random() < 0.001:
            out += os.urandom(rnd.randint(1, 5000))     # stored/incompressible stretches
    return bytes(out[:n])


def _index(gz: bytes, span: int, piece: int = 7777) -> tuple[ZranIndexer, bytes]:
    ix = ZranIndexer(span, out_cap=50_000)
    out = bytearray()
    for i in range(0, len(gz), piece):
        for part in ix.feed(gz[i:i + piece]):
            out += part
    ix.finish()
    return ix, bytes(out)


def _read(ix: ZranIndexer, gz: bytes, start: int, length: int) -> bytes:
    p = max((q for q in ix.points if q.out_offset <= start), key=lambda q: q.out_offset)
    return zran_extract(p, gz[p.in_offset:], start - p.out_offset, length)


@pytest.mark.parametrize("level", [1, 6, 9])
def test_index_and_extract(level):
    raw = _data(3_000_000)
    gz = gzip.compress(raw, compresslevel=level)
    ix, out = _index(gz, span=256 * 1024)
    assert out == raw
    assert ix.total_in == len(gz) and ix.total_out == len(raw)
    assert ix.points[0].out_offset == 0
    assert len(ix.points) >= 3_000_000 // (1 << 20)
    assert any(p.bits for p in ix.points), "no point inside a byte: bits path untested"
    for p in ix.points[1:]:
        assert len(p.window) == 32768
    rnd = random.Random(5)
    for _ in range(60):
        start = rnd.randrange(len(raw))
        length = min(rnd.randrange(1, 300_000), len(raw) - start)
        assert _read(ix, gz, start, length) == raw[start:start + length]
    # a range across every point at once
    assert _read(ix, gz, 10, len(raw) - 10) == raw[10:]


def test_multi_member_stream():
    a, b = _data(700_000, 2), _data(900_000, 3)
    gz = gzip.compress(a) + gzip.compress(b)
    ix, out = _index(gz, span=100_000)
    assert out == a + b
    raw = a + b
    start = len(a) - 5000            # from a point in member 1 across into member 2
    assert _read(ix, gz, start, 20_000) == raw[start:start + 20_000]
    start = len(a) + 400_000
    assert _read(ix, gz, start, 1000) == raw[start:start + 1000]


def test_zero_padding_after_the_last_member():
    raw = _data(200_000)
    gz = gzip.compress(raw) + bytes(5000)
    ix, out = _index(gz, span=1 << 20, piece=1000)
    assert out == raw and ix.total_in == len(gz)
    with pytest.raises(InputError):
        _index(gz + b"x", span=1 << 20)


def test_truncated_and_corrupt_streams():
    raw = _data(500_000)
    gz = gzip.compress(raw)
    ix = ZranIndexer(1 << 20)
    for _ in ix.feed(gz[:-20]):
        pass
    with pytest.raises(InputError, match="truncated"):
        ix.finish()
    bad = bytearray(gz)
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(InputError):
        _index(bytes(bad), 1 << 20)


def test_hostile_points():
    raw = _data(600_000)
    gz = gzip.compress(raw)
    ix, _ = _index(gz, span=100_000)
    p = ix.points[2]
    with pytest.raises(CorruptImageError, match="bad access point"):
        zran_extract(ZranPoint(p.in_offset, p.out_offset, 8, p.byte, p.window), gz, 0, 10)
    with pytest.raises(CorruptImageError, match="bad access point"):
        zran_extract(ZranPoint(p.in_offset, p.out_offset, p.bits, p.byte, p.window * 2),
                     gz, 0, 10)
    with pytest.raises(CorruptImageError):
        zran_extract(p, gz[p.in_offset:p.in_offset + 100], 0, 1_000_000)
    # a wrong window gives wrong bytes only if nothing checks: zlib itself notices a
    # back reference beyond a short window
    short = ZranPoint(p.in_offset, p.out_offset, p.bits, p.byte, p.window[-10:])
    with pytest.raises(CorruptImageError):
        zran_extract(short, gz[p.in_offset:], 0, 100_000)
    # a huge skip with little input ends quickly in an error, not a long inflate
    with pytest.raises(CorruptImageError):
        zran_extract(p, gz[p.in_offset:p.in_offset + 1000], 1 << 60, 10)
    # garbage at a point: an error, never a hang
    rnd = random.Random(9)
    for _ in range(50):
        junk = bytes(rnd.randrange(256) for _ in range(2000))
        try:
            zran_extract(p, junk, 0, 50_000)
        except CorruptImageError:
            pass


def test_zlib_agrees_on_raw_deflate_start():
    # sanity: the first point sits right after the gzip header (a raw deflate start)
    raw = _data(100_000)
    gz = gzip.compress(raw)
    ix, _ = _index(gz, span=1 << 30)
    p0 = ix.points[0]
    assert (p0.in_offset, p0.out_offset, p0.bits, p0.window) == (10, 0, 0, b"")
    assert zlib.decompressobj(-15).decompress(gz[10:])[:100] == raw[:100]


def _cold(gz: bytes, p: ZranPoint, chunks: list[tuple[int, int]], skip: int, end: int,
          src: bytes | None = None, dst_extra: int = 0, ctx_dst: int = 0):
    """ern_cold_zran over `chunks` ((offset after the point, size)) -> (the entries,
    the buffer)."""
    from erofs_tools import _native
    src = gz[p.in_offset:] if src is None else src
    dst = bytearray(end - skip + dst_extra + ctx_dst)
    cc = _native.ColdChunks(len(chunks), src, dst)
    for i, (off, size) in enumerate(chunks):
        cc.set(i, 0, 0, 1, size, ctx_dst + off - skip, 0, i)
    ok = cc.zran(0, len(chunks), p, (0, len(src), skip, ctx_dst, end - skip))
    return cc, ok


def test_cold_zran_slices_a_context():
    """The daemon's zran cold path: one C call inflates a context from its point,
    discarding the output before the first chunk; each chunk is its slice."""
    from erofs_tools import _native
    raw = _data(1_500_000)
    gz = gzip.compress(raw)
    ix, _ = _index(gz, span=400_000)
    p = ix.points[1]
    base = p.out_offset
    chunks = [(5000, 70_000), (75_000, 4096), (300_000, 123_457)]
    cc, ok = _cold(gz, p, chunks, 5000, 423_457)
    assert ok == 3
    for i, (off, size) in enumerate(chunks):
        assert cc.status(i) == _native.COLD_OK
        assert bytes(cc.data(i)) == raw[base + off:base + off + size]


def test_cold_zran_corruption_and_hostile_places():
    from erofs_tools import _native
    raw = _data(1_500_000)
    gz = gzip.compress(raw)
    ix, _ = _index(gz, span=400_000)
    p = ix.points[1]
    src = bytearray(gz[p.in_offset:])
    # a flipped byte near the end of the context: the chunks that came out before it
    # are fine (their digests are still checked), the later ones fail, none is OK by luck
    cut = len(gzip.compress(raw[p.out_offset:p.out_offset + 300_000])) - 2000
    src[cut] ^= 0x55
    chunks = [(0, 50_000), (50_000, 350_000)]
    cc, ok = _cold(gz, p, chunks, 0, 400_000, src=bytes(src))
    assert cc.status(0) == _native.COLD_OK
    assert bytes(cc.data(0)) == raw[p.out_offset:p.out_offset + 50_000]
    # the chunk over the flipped byte's output: failed, or wrong bytes (its digest
    # fails), never right by luck
    assert cc.status(1) != _native.COLD_OK or \
        bytes(cc.data(1)) != raw[p.out_offset + 50_000:p.out_offset + 400_000]
    # input that ends before a chunk came out
    cc, ok = _cold(gz, p, [(0, 1000), (390_000, 10_000)], 0, 400_000,
                   src=gz[p.in_offset:p.in_offset + 20_000])
    assert ok == 1 and cc.status(1) == _native.lib.ERN_COLD_ESIZE
    # chunks outside the context's output, before it, or of size 0: EBOUNDS, no inflate
    cc, ok = _cold(gz, p, [(0, 1000), (399_000, 2000), (0, 0)], 0, 400_000, dst_extra=8192)
    assert ok == 1 and [cc.status(i) for i in (1, 2)] == [_native.lib.ERN_COLD_EBOUNDS] * 2
    cc, ok = _cold(gz, p, [(10, 100)], 0, 1000, ctx_dst=4096)
    assert ok == 1
    cc.arr[0].dst_off = 100          # before the context's place in dst
    cc2 = cc.zran(0, 1, p, (0, 10_000, 0, 4096, 1000))
    assert cc2 == 0 and cc.status(0) == _native.lib.ERN_COLD_EBOUNDS
    # the context's own place outside src or dst: every chunk EBOUNDS
    cc, ok = _cold(gz, p, [(0, 100)], 0, 1000)
    assert cc.zran(0, 1, p, (len(gz) + 5, 10, 0, 0, 1000)) == 0
    assert cc.status(0) == _native.lib.ERN_COLD_EBOUNDS
    assert cc.zran(0, 1, p, (0, 1000, 0, 0, 1 << 30)) == 0
    # a point the C core refuses (bits > 7): nothing comes out
    assert cc.zran(0, 1, ZranPoint(p.in_offset, p.out_offset, 9, 0, b""),
                   (0, 1000, 0, 0, 1000)) == 0 and cc.status(0) != _native.COLD_OK


@pytest.mark.parametrize("level", [1, 6, 9])
def test_trimmed_windows_inflate_the_same(level):
    """A window cut to the bytes the stream after the point copies (the rest zeroed)
    inflates every range exactly as the whole window does, and compresses far better."""
    import zstandard

    from erofs_tools.builder.zran import trim_window as zran_trim_window
    raw = _data(2_000_000, 4)
    gz = gzip.compress(raw, compresslevel=level)
    ix, _ = _index(gz, span=200_000)
    trimmed = []
    for p in ix.points[1:]:
        t = zran_trim_window(p, gz[p.in_offset:], True)
        assert t is not None and len(t) <= len(p.window)
        q = ZranPoint(p.in_offset, p.out_offset, p.bits, p.byte, t)
        for start, n in ((0, 40_000), (100, 250_000), (33_000, 5000)):
            n = min(n, len(raw) - p.out_offset - start)
            assert zran_extract(q, gz[p.in_offset:], start, n) == \
                raw[p.out_offset + start:p.out_offset + start + n]
        trimmed.append(t)
    z = zstandard.ZstdCompressor(level=3)
    whole = len(z.compress(b"".join(p.window for p in ix.points[1:])))
    assert len(z.compress(b"".join(trimmed))) < whole * 0.8
    # too little input to see the window's whole reach: not trimmed (unless at the end)
    p = ix.points[3]
    assert zran_trim_window(p, gz[p.in_offset:p.in_offset + 2000], False) is None
    # a window the data contradicts (shifted by one byte): refused, or the same output
    q = ZranPoint(p.in_offset, p.out_offset, p.bits, p.byte, p.window[1:] + b"x")
    t = zran_trim_window(q, gz[p.in_offset:], True)
    assert t is None or zran_extract(ZranPoint(p.in_offset, p.out_offset, p.bits, p.byte, t),
                                     gz[p.in_offset:], 0, 40_000) == \
        zran_extract(q, gz[p.in_offset:], 0, 40_000)
