"""Per-chunk compression for pack's chunk pipeline (chunker.py): zstd, lz4_block or
none; zstd batches in one C call through python-zstandard's own zstd (csrc/chunkzstd.c),
so the frames are the ones python-zstandard writes."""
from __future__ import annotations

import array
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from erofs_tools._native_chunkio import zstd_chunks
from erofs_tools.errors import InputError

if TYPE_CHECKING:
    from types import ModuleType

    from typing_extensions import Buffer

COMPRESSORS = ("zstd", "lz4_block", "none")
ZSTD_LEVEL = 3
# zstd: a chunk of at most this many bytes that starts as a gzip member, an xz stream or
# a bzip2 stream, or of at most PNG_RAW_MAX that starts as a PNG file, is
# stored raw without trying (csrc/chunkzstd.c says why; the C core's
# ERN_ZSTD_GZIP_RAW_MAX, ERN_ZSTD_PNG_RAW_MAX and stored_raw)
GZIP_RAW_MAX = 64 << 10
PNG_RAW_MAX = 4 << 10
_RAW_HEADS = (b"\x1f\x8b\x08", b"\xfd7zXZ\x00")
_PNG_HEAD = b"\x89PNG\r\n\x1a\n"
_BZIP2_MAGIC = (b"\x31\x41\x59\x26\x53\x59", b"\x17\x72\x45\x38\x50\x90")


def stored_raw(data: bytes | bytearray | memoryview) -> bool:
    """zstd: `data` is stored raw without trying (a small gzip, xz, bzip2 or PNG file)."""
    n = len(data)
    if n > GZIP_RAW_MAX:
        return False
    head = bytes(data[:10])
    if head.startswith(_RAW_HEADS):
        return True
    if head.startswith(_PNG_HEAD):
        return n <= PNG_RAW_MAX
    return (n >= 10 and head.startswith(b"BZh") and 0x31 <= head[3] <= 0x39
            and head[4:] in _BZIP2_MAGIC)


def _debug(msg: str, *args: object) -> None:  # only if logging is loaded (configured):
    if (lg := sys.modules.get("logging")) is not None:  # importing it: ~1.2 MiB, ~10 ms
        lg.getLogger(__name__).debug(msg, *args)


def _zstandard() -> ModuleType:
    """python-zstandard, imported when first needed (pack --compressor none never
    loads it: ~1 MiB of pack's RSS)."""
    import zstandard
    return zstandard


def _multi_compress() -> bool:
    """python-zstandard's C backend compresses many inputs in one call (its cffi one
    cannot)."""
    return getattr(_zstandard(), "backend", "") == "cext"


class _ZstdFns:
    """python-zstandard's bundled zstd as C function pointers (its cffi module's
    ZSTD_compress2 and ZSTD_isError) and one compression context per thread, for the C
    core's batch compressor (_native_chunkio.zstd_chunks): the same library, so the same
    frames, as its own calls; None of it when that module is missing or holds another
    zstd than the one python-zstandard uses."""

    def __init__(self, level: int) -> None:
        z = _zstandard()
        from zstandard import _cffi  # type: ignore[attr-defined]
        zl, zf = _cffi.lib, _cffi.ffi
        v = zl.ZSTD_versionNumber()
        if (v // 10000, v // 100 % 100, v % 100) != tuple(z.ZSTD_VERSION):
            raise ImportError("zstandard's cffi module bundles another zstd")
        self._lib, self._ffi = zl, zf
        self.level = level
        self.compress2 = int(zf.cast("uintptr_t", zf.addressof(zl, "ZSTD_compress2")))
        self.is_error = int(zf.cast("uintptr_t", zf.addressof(zl, "ZSTD_isError")))
        self._local = threading.local()

    def cctx(self) -> int:
        """This thread's context (its address), made once and freed with the thread.
        A static one, in a workspace of its own for any input at this level: a context
        of ZSTD_createCCtx gives its tables back after ~128 inputs that need far
        smaller ones (most chunks are small files) and maps them again for the next big
        one (~0.2 CPU s of a /usr/share pack in page faults, zeroing and munmap)."""
        addr: int | None = getattr(self._local, "addr", None)
        if addr is None:
            zl, zf = self._lib, self._ffi
            size = zl.ZSTD_estimateCStreamSize(self.level)
            ws = zf.new("char[]", size)
            c = zl.ZSTD_initStaticCCtx(ws, size)
            if c == zf.NULL:
                raise MemoryError("zstd: no compression context")
            # a static context starts with every parameter 0 (no content size in the
            # frame header, unlike ZSTD_createCCtx's and python-zstandard's): the
            # defaults first, then the level
            if zl.ZSTD_isError(zl.ZSTD_CCtx_reset(c, zl.ZSTD_reset_session_and_parameters)) \
                    or zl.ZSTD_isError(zl.ZSTD_CCtx_setParameter(
                        c, zl.ZSTD_c_compressionLevel, self.level)):
                raise InputError(f"zstd: cannot set level {self.level}")
            self._local.ws = ws         # the context lives in it: kept with it
            addr = self._local.addr = int(zf.cast("uintptr_t", c))
        return addr


def _zstd_fns(level: int) -> _ZstdFns | None:
    try:
        return _ZstdFns(level)
    except (ImportError, AttributeError) as e:
        _debug("zstd: no C core batches (python-zstandard's cffi module: %s)", e)
        return None


class Compressor:
    """Per-chunk compression; a chunk that does not shrink is stored raw."""

    def __init__(self, name: str, level: int = ZSTD_LEVEL) -> None:
        if name not in COMPRESSORS:
            raise InputError(f"unknown compressor {name!r} (choose zstd, lz4_block or none)")
        self.name = name
        self.level = level
        self._local = threading.local()
        self._z = _zstandard() if name == "zstd" else None
        self._multi = name == "zstd" and _multi_compress()
        self._fns = _zstd_fns(level) if name == "zstd" else None
        # compress_many's stored chunks are buffers of the C core's pool
        self.pooled = self._fns is not None
        if name == "zstd":      # the same frames each way, not the same speed: say which
            _debug("zstd batches: %s", self.batch_path())

    def batch_path(self) -> str:
        """Which way compress_many compresses zstd batches (each gives the same bytes)."""
        if self._fns is not None:
            return "C core (csrc/chunkzstd.c, python-zstandard's zstd)"
        if self._multi:
            return "python-zstandard multi_compress_to_buffer"
        return "python-zstandard, one call per chunk"

    def compress(self, data: bytes) -> bytes:
        """-> bytes to store (compressed, or the data itself when it does not shrink)."""
        if self.name == "none":
            return data
        if self.name == "lz4_block":
            # a raw LZ4 block, as Nydus stores lz4_block chunks (C core, csrc/coldpath.c)
            from erofs_tools import _native
            out4 = _native.lz4_block_compress(data)
            return data if out4 is None else out4
        if stored_raw(data):
            return data
        c = getattr(self._local, "c", None)
        if c is None:
            assert self._z is not None
            c = self._local.c = self._z.ZstdCompressor(level=self.level)
        out = c.compress(data)
        return out if len(out) < len(data) else data

    def compress_batch(self, buf: bytearray | memoryview, pieces: Pieces
                       ) -> tuple[memoryview | None, Sequence[bytes | memoryview]]:
        """compress_many; -> (base, stored pieces): base is the one buffer in which the
        stored pieces lie back to back in order (the C core's zstd), so that a run of
        them can be written as one piece of it; None when they do not."""
        sized = self.compress_batch_sized(buf, pieces)
        if sized is None:
            return None, self.compress_many(buf, pieces)
        stored, sizes = sized
        views: list[bytes | memoryview] = []
        pos = 0
        for n in sizes:
            views.append(stored[pos:pos + n])
            pos += n
        return stored, views

    def compress_batch_sized(self, buf: bytearray | memoryview, pieces: Pieces
                             ) -> tuple[memoryview, array.array[int]] | None:
        """The C core's zstd batch (compress_batch's base): -> (the buffer with the
        stored pieces back to back, their sizes), so that a caller that needs no list of
        views takes them in its own loop; None when that path is not the one (another
        compressor, no C core batches, no pieces): then compress_batch."""
        fns = self._fns
        if fns is None or not len(pieces.lengths):
            return None
        return zstd_chunks(fns.compress2, fns.is_error, fns.cctx(), buf, pieces.off,
                           pieces.lengths)

    def compress_many(self, buf: bytearray | memoryview,
                      pieces: list[tuple[int, int]] | Pieces) -> list[bytes | memoryview]:
        """Stored forms of the pieces (offset, length) of `buf`, as `compress` gives them
        one by one. zstd: one call for them all, the GIL released once, not once per
        chunk: the C core's (_ZstdFns: python-zstandard's zstd, one context per thread
        for the whole pack; the stored chunks views of one buffer of the C core's pool,
        back in the pool once the writer has copied them), else python-zstandard's
        multi_compress_to_buffer (a new context per call); the same frames as
        `compress`. Only with "none" are they views of `buf`: otherwise the caller may
        reuse `buf` for the next batch. `pieces` as a Pieces: the caller's own arrays,
        taken as they are."""
        p = pieces if isinstance(pieces, Pieces) else Pieces.of(pieces)
        if self.name == "none":
            mv = memoryview(buf)
            return [mv[o:o + n] for o, n in zip(p.off, p.lengths)]
        fns = self._fns
        if fns is not None and len(p.lengths):
            return list(self.compress_batch(buf, p)[1])
        if self._multi and len(p.lengths):
            z = self._z
            assert z is not None
            c = getattr(self._local, "c", None)
            if c is None:
                c = self._local.c = z.ZstdCompressor(level=self.level)
            mv = memoryview(buf)
            # small gzip (xz, ...) files are stored raw without trying, as `compress`
            # and the C core do: only the other pieces go to zstd
            raw = [stored_raw(mv[o:o + n]) for o, n in zip(p.off, p.lengths)]
            todo = p if not any(raw) else Pieces(
                array.array("Q", (o for o, r in zip(p.off, raw) if not r)),
                array.array("I", (n for n, r in zip(p.lengths, raw) if not r)))
            res = c.multi_compress_to_buffer(
                z.BufferWithSegments(buf, todo.segments().tobytes()), threads=1) \
                if len(todo.off) else None
            out: list[bytes | memoryview] = []
            k = 0
            for o, n, r in zip(p.off, p.lengths, raw):
                if not r:
                    assert res is not None
                    zc = res[k]
                    k += 1
                    if len(zc) < n:
                        out.append(memoryview(cast("Buffer", zc)))
                        continue
                # stored raw: the data, copied once from a view (a view kept would hold
                # the batch buffer until this chunk is written; bytes() of a slice: twice)
                out.append(bytes(mv[o:o + n]))
            return out
        return [self.compress(bytes(buf[o:o + n])) for o, n in zip(p.off, p.lengths)]


class Pieces:
    """Pieces of a batch buffer as the C core takes them: offsets (array "Q") and
    lengths (array "I"), i-th piece lengths[i] bytes at off[i]."""
    __slots__ = ("lengths", "off")

    def __init__(self, off: array.array[int], lengths: array.array[int]) -> None:
        if off.typecode != "Q" or lengths.typecode != "I" or len(off) != len(lengths):
            raise ValueError("Pieces: offsets 'Q' and lengths 'I', as many of each")
        self.off = off
        self.lengths = lengths

    @classmethod
    def of(cls, pieces: Sequence[tuple[int, int]]) -> Pieces:
        """From (offset, length) pairs, transposed in one call (for 256 pieces ~15 %
        less time than an append per piece into each array)."""
        if not pieces:
            return cls(array.array("Q"), array.array("I"))
        off, lengths = zip(*pieces)
        return cls(array.array("Q", off), array.array("I", lengths))

    def segments(self) -> array.array[int]:
        """offset, length, offset, length, ... (python-zstandard's BufferWithSegments)."""
        segs = array.array("Q", bytes(16 * len(self.off)))
        segs[0::2] = self.off
        segs[1::2] = array.array("Q", self.lengths)
        return segs
