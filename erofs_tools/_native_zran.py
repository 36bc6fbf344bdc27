"""Checked wrappers of the C core's zran functions (csrc/zran.c): access points into a
gzip stream, recorded while inflating it once, and inflating from them. Apart from
_native.py only to keep each module small; the cffi module still comes through it."""
from __future__ import annotations

from collections.abc import Iterator

from erofs_tools._native import NativeError, ZranPoint, ffi, lib
from erofs_tools.errors import CorruptImageError, InputError

__all__ = ["ZINFO_RECORD", "ZRAN_WINDOW", "ZinfoBuilder", "ZranIndexer", "ZranPoint",
           "zran_extract", "zran_window_use"]

# --- zran: random access into gzip streams (csrc/zran.c) ---------------------------------
ZRAN_WINDOW = 32768
_ZRAN_IN_PIECE = 1 << 14        # input per C call: a chunk's recorded need is exact to it


class ZranIndexer:
    """Inflates one gzip stream fed in pieces, records access points every `span` bytes
    of output (at deflate block boundaries). `feed()` yields the decompressed bytes in
    pieces of at most `out_cap`; after each piece `total_in`/`total_out` say how much
    was consumed/produced so far; new points are appended to `points`."""

    def __init__(self, span: int, out_cap: int = 1 << 20) -> None:
        if span <= 0 or out_cap <= 0:
            raise NativeError("zran: span and out_cap must be positive")
        z = lib.ern_zran_builder_new(span)
        if z == ffi.NULL:
            raise MemoryError("zran: cannot allocate an inflater")
        self._z = ffi.gc(z, lib.ern_zran_builder_free)
        self._out = ffi.new("uint8_t[]", out_cap)
        self._cap = out_cap
        self._point = ffi.new("struct ern_zran_point *")
        self._used, self._made = ffi.new("size_t *"), ffi.new("size_t *")
        self.points: list[ZranPoint] = []
        self.total_in = 0
        self.total_out = 0

    def _drain(self) -> None:
        p = self._point
        while lib.ern_zran_builder_next_point(self._z, p):
            self.points.append(ZranPoint(p.in_offset, p.out_offset, p.bits, p.byte,
                                         bytes(ffi.buffer(p.window, p.window_size))))

    def feed(self, data: bytes | memoryview) -> Iterator[bytes]:
        view = memoryview(data).cast("B")
        pos = 0
        while pos < len(view):
            piece = view[pos:pos + _ZRAN_IN_PIECE]
            src = ffi.from_buffer(piece)
            r = lib.ern_zran_builder_feed(self._z, src, len(piece), self._out, self._cap,
                                          self._used, self._made)
            if r:
                raise InputError(f"gzip stream corrupt near compressed offset "
                                 f"{self.total_in + self._used[0]}")
            pos += self._used[0]
            self.total_in += self._used[0]
            self.total_out += self._made[0]
            before = len(self.points)
            self._drain()
            if not (self._used[0] or self._made[0] or len(self.points) > before):
                # zlib made no progress with input and room for output: never loop on it
                raise InputError(f"gzip stream stuck at compressed offset {self.total_in}")
            if self._made[0]:
                yield bytes(ffi.buffer(self._out, self._made[0]))

    def finish(self) -> None:
        """The stream must have ended with a complete gzip member."""
        tin, tout, done = ffi.new("uint64_t *"), ffi.new("uint64_t *"), ffi.new("int *")
        lib.ern_zran_builder_totals(self._z, tin, tout, done)
        if not done[0]:
            raise InputError(f"gzip stream truncated at compressed offset {tin[0]}")


_ZRAN_ERRORS = {lib.ERN_EIO: "corrupt deflate data", lib.ERN_ELIMIT: "compressed data ends "
                "before the range", lib.ERN_EINVAL: "bad access point"}


def zran_extract(point: ZranPoint, compressed: bytes | memoryview, skip: int,
                 length: int) -> bytes:
    """`length` uncompressed bytes starting `skip` bytes after `point`, inflated from
    `compressed` (the stream's bytes from `point.in_offset` on). Raises
    CorruptImageError (a one-line message) on bad data or a bad point."""
    if not 0 <= point.bits <= 7 or not 0 <= point.byte <= 255 \
            or len(point.window) > ZRAN_WINDOW or skip < 0 or length < 0:
        raise CorruptImageError("zran: bad access point (bits, byte or window size)")
    out, src = ffi.new("uint8_t[]", max(length, 1)), ffi.from_buffer(compressed)
    # the window may be a view into a parsed index (reader/zran.py), not bytes
    r = lib.ern_zran_extract(point.bits, point.byte, ffi.from_buffer("uint8_t[]", point.window),
                             len(point.window),
                             src, len(compressed), skip, out, length)
    if r:
        if r == lib.ERN_ENOMEM:
            raise MemoryError("zran: out of memory")
        raise CorruptImageError(f"zran: {_ZRAN_ERRORS.get(r, 'inflate failed')} "
                                f"(access point at compressed offset {point.in_offset})")
    return bytes(ffi.buffer(out, length))


def zran_window_use(point: ZranPoint, compressed: bytes | memoryview) -> tuple[bytes, int]:
    """(1 per window byte the stream after `point` copies, else 0; output bytes examined)"""
    used, made, n = ffi.new("uint8_t[]", max(1, len(point.window))), ffi.new("size_t *"), \
        len(point.window)
    r = lib.ern_zran_window_use(point.bits, point.byte, n, ffi.from_buffer(compressed),
                                len(compressed), used, made)
    if r:
        raise CorruptImageError(f"zran: {_ZRAN_ERRORS.get(r, 'inflate failed')}")
    return bytes(ffi.buffer(used, n)), int(made[0])


# --- zinfo: mkfs --gzinfo=FILE's checkpoints, as mkfs.erofs 1.9 (csrc/zinfo.c) ----------
ZINFO_RECORD = 17 + ZRAN_WINDOW


class ZinfoBuilder:
    """Inflates a gzip stream fed in pieces of compressed bytes (the output is dropped)
    into the AWS SOCI zinfo v2 records mkfs.erofs 1.9 writes: `feed()` yields the new
    ones as (output offset of the 32 KiB read it was recorded in, the record's bytes)."""

    def __init__(self, span: int) -> None:
        z = lib.ern_zinfo_new(span)
        if z == ffi.NULL:
            raise MemoryError("zinfo: cannot allocate an inflater")
        self._z = ffi.gc(z, lib.ern_zinfo_free)
        self._rec = ffi.new("uint8_t[]", ZINFO_RECORD)
        self._read = ffi.new("uint64_t *")
        self._used = ffi.new("size_t *")

    def feed(self, data: bytes | memoryview) -> Iterator[tuple[int, bytes]]:
        """The new records, one at a time (the C core holds one)."""
        view = memoryview(data).cast("B")
        pos = 0
        while pos < len(view):
            piece = view[pos:pos + (1 << 30)]
            r = lib.ern_zinfo_feed(self._z, ffi.from_buffer(piece), len(piece), self._used)
            pos += self._used[0]
            got = lib.ern_zinfo_next(self._z, self._rec, self._read)
            if got:
                yield int(self._read[0]), bytes(ffi.buffer(self._rec))
            if r == lib.ERN_ENOMEM:
                raise MemoryError("zinfo: out of memory")
            if r:
                raise InputError(f"gzip stream corrupt near compressed offset "
                                 f"{self.totals()[0]}")
            if not (self._used[0] or got):
                raise InputError(f"gzip stream stuck at compressed offset {self.totals()[0]}")

    def totals(self) -> tuple[int, int, bool]:
        """(compressed bytes consumed, bytes of output, the last member ended)"""
        tin, tout, done = ffi.new("uint64_t *"), ffi.new("uint64_t *"), ffi.new("int *")
        lib.ern_zinfo_totals(self._z, tin, tout, done)
        return int(tin[0]), int(tout[0]), bool(done[0])
