"""The C core's zran (csrc/zran.c through erofs_tools._native): an index built from a
gzip stream fed in odd pieces, every range extracted from its nearest access point equals
the same bytes of the whole stream; hostile points and data end in one clean error."""
from __future__ import annotations

import gzip
import os
import random
import zlib

import pytest

from erofs_tools._native import ZranIndexer, ZranPoint, zran_extract
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
