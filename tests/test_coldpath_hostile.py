"""Hostile chunks against the daemon's cold path (csrc/coldpath.c): a zstd frame whose
header asks for a window past the chunk bound is refused as the reader refuses it
(found by tools/fuzz_native.py, docs/fuzzing.md)."""
from __future__ import annotations

import pytest
import zstandard

from erofs_tools import _native
from erofs_tools.errors import CorruptImageError
from erofs_tools.reader.chunkcodec import ZSTD_MAX_WINDOW
from erofs_tools.reader.chunkcodec import decompress as _decompress


def _frame(window_log: int, data: bytes) -> bytes:
    # no content size: the header then carries a window descriptor (byte 5: exponent
    # in its top 5 bits, 2^(10 + exponent)), which a writer may set as large as it likes
    frame = bytearray(zstandard.ZstdCompressor(write_content_size=False).compress(data))
    assert not frame[4] & 0x20          # not single-segment: byte 5 is the descriptor
    frame[5] = (window_log - 10) << 3
    return bytes(frame)


@pytest.mark.parametrize("window_log", [25, 26, 31])
def test_the_cold_path_takes_the_zstd_windows_the_reader_takes(window_log):
    data = b"hello cold path " * 300
    frame = _frame(window_log, data)
    assert zstandard.get_frame_parameters(frame).window_size == 1 << window_log
    dst = bytearray(len(data))
    cc = _native.ColdChunks(1, frame, dst)
    cc.set(0, _native.COLD_ALGS["zstd"], 0, len(frame), len(data), 0, 0, 0)
    cc.decode()
    if 1 << window_log <= ZSTD_MAX_WINDOW:
        assert _decompress("zstd", frame, len(data), "t") == data
        assert cc.status(0) == _native.COLD_OK and bytes(cc.data(0)) == data
    else:
        with pytest.raises(CorruptImageError):
            _decompress("zstd", frame, len(data), "t")
        # it decoded (one shot into its buffer) before: a chunk the reader refuses
        assert cc.status(0) == _native.lib.ERN_COLD_EFRAME
