"""csrc/decompress.c through _native.z_decompress: exact lengths, partial decoding of a
shared pcluster, zero padding, and one-line errors for everything else (raw deflate
streams made with the standard library's zlib; the other algorithms are covered by the
images of tests/test_reader_compressed.py)."""
import random
import zlib

import pytest

from erofs_tools import _native
from erofs_tools.errors import CorruptImageError


def raw_deflate(data, level=6):
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


DATA = b"".join(random.Random(3).choice([b"erofs ", b"inode ", b"block\n"])
                for _ in range(3000))


def test_deflate_exact_and_padded():
    s = raw_deflate(DATA)
    assert _native.z_decompress(_native.Z_DEFLATE, s, len(DATA), zero_padding=False) == DATA
    padded = bytes(4096 - len(s) % 4096) + s           # right-aligned in its pcluster
    assert _native.z_decompress(_native.Z_DEFLATE, padded, len(DATA)) == DATA


def test_deflate_partial_reads_a_prefix():
    s = raw_deflate(DATA)
    assert _native.z_decompress(_native.Z_DEFLATE, s, 1000, partial=True) == DATA[:1000]
    with pytest.raises(CorruptImageError, match="holds more than 1000 bytes"):
        _native.z_decompress(_native.Z_DEFLATE, s, 1000)


@pytest.mark.parametrize("alg", [_native.Z_LZ4, _native.Z_LZMA, _native.Z_DEFLATE,
                                 _native.Z_ZSTD])
def test_garbage_and_wrong_lengths_are_one_line_errors(alg):
    rnd = random.Random(alg)
    for n in (1, 7, 100, 4096):
        junk = bytes([0xA5]) + rnd.randbytes(n)
        for partial in (False, True):
            try:
                out = _native.z_decompress(alg, junk, 4096, partial=partial)
            except CorruptImageError as e:
                assert "\n" not in str(e)
            else:
                assert len(out) == 4096
    with pytest.raises(CorruptImageError, match="zero bytes"):
        _native.z_decompress(alg, bytes(4096), 10)


def test_argument_bounds():
    s = raw_deflate(DATA)
    with pytest.raises(CorruptImageError, match="unknown compression algorithm"):
        _native.z_decompress(9, s, 10)
    for n in (0, -1, _native.Z_MAX_DECODED + 1):
        with pytest.raises(CorruptImageError, match="out of range"):
            _native.z_decompress(_native.Z_DEFLATE, s, n)
    with pytest.raises(CorruptImageError, match="too large"):
        _native.z_decompress(_native.Z_DEFLATE, bytes(_native.Z_MAX_INPUT + 1), 10)
    with pytest.raises(CorruptImageError, match="dictionary"):
        _native.z_decompress(_native.Z_LZMA, b"\xa5" * 64, 10, dict_size=1 << 30)


def test_deflate_bomb_is_bounded():
    """A pcluster of a few KiB that inflates to far more than the extent: the partial
    decode's scratch space stops at 16 MiB, the full decode at the extent length."""
    s = raw_deflate(bytes(64 << 20), 9)
    assert len(s) < 100_000
    with pytest.raises(CorruptImageError, match="more than"):
        _native.z_decompress(_native.Z_DEFLATE, s, 4096, partial=True)
    with pytest.raises(CorruptImageError, match="more than 4096"):
        _native.z_decompress(_native.Z_DEFLATE, s, 4096)
