"""Decoding a Nydus blob's stored bytes (chunks, the CI area): zstd frames checked
strictly and bounded, LZ4 blocks through the C core, stored bytes as they are. Apart
from blob.py only to keep that module small."""
from __future__ import annotations

import threading

from erofs_tools.errors import CorruptImageError

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# zstd window bound for chunk frames: enough for any 16 MiB chunk, small enough that a
# crafted frame header cannot make the decoder allocate much.
ZSTD_MAX_WINDOW = 1 << 25

_tls = threading.local()


def _dctx():
    """This thread's zstd decompression context. A context is reused for every chunk (a
    new one per chunk allocates its window again) and is not thread-safe, hence one per
    thread; the one-shot decompress() below also releases the GIL, so the daemon's workers
    decompress in parallel."""
    d = getattr(_tls, "dctx", None)
    if d is None:
        import zstandard
        d = _tls.dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    return d


def zstd_decompress(data, limit, what):
    """Decompress exactly one zstd frame, producing at most `limit` bytes (else error).

    Strict: the frame must use all of `data` (no trailing bytes, no missing checksum or
    blocks) and its reserved/unused header bits must be clear.
    """
    import zstandard
    if len(data) < 6 or data[:4] != ZSTD_MAGIC:
        raise CorruptImageError(f"{what}: not a zstd frame")
    if data[4] & 0x18:
        raise CorruptImageError(f"{what}: zstd frame header has reserved bits set")
    try:
        params = zstandard.get_frame_parameters(data)
        if params.content_size != zstandard.CONTENTSIZE_UNKNOWN and \
                params.content_size > limit:
            raise CorruptImageError(f"{what}: zstd frame declares {params.content_size} "
                                    f"bytes, more than {limit}")
        # one shot into a buffer of the declared size (or `limit` when undeclared: a frame
        # producing more fails as "did not decompress full frame"); a truncated frame
        # fails the same way and bytes after the frame are refused
        out = _dctx().decompress(data, max_output_size=limit, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise CorruptImageError(f"{what}: bad zstd data ({e})") from None
    return out


def decompress(compressor, data, size, what):
    """`size` bytes of a chunk or table stored with `compressor` (None: zstd if the bytes
    start as a zstd frame, else stored), exactly; anything else is CorruptImageError."""
    if compressor == "zstd" or (compressor is None and data[:4] == ZSTD_MAGIC):
        out = zstd_decompress(data, size, what)
    elif compressor == "lz4_block":
        # a raw LZ4 block (no frame, no size prefix: Nydus's lz4_block); the C core's
        # bounded decoder (csrc/coldpath.c)
        from erofs_tools import _native
        out = _native.cold_decode_one("lz4_block", data, size)
        if out is None:
            raise CorruptImageError(f"{what}: bad lz4 block")
    elif compressor in ("none", None):
        out = bytes(data)
    else:
        raise CorruptImageError(f"{what}: unsupported compressor {compressor!r}")
    if len(out) != size:
        raise CorruptImageError(f"{what}: decompressed to {len(out)} bytes, expected {size}")
    return out
