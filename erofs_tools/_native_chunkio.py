"""Checked wrapper of pack's chunk reader (csrc/chunkread.c): the pieces of a batch of
chunks read into one buffer in one C call, without the GIL. Apart from _native.py only
to keep each module small; the cffi module still comes through it."""
from __future__ import annotations

import array
import os
from collections.abc import Sequence

from erofs_tools._native import ffi, lib

__all__ = ["ChunkInfoTable", "ChunkReadError", "batch_buffer", "batch_buffers_kept",
           "blake3_digest", "blake3_digest_pair", "chunk_indexes", "ci_v1_append", "gather", "read_chunks",
           "zstd_chunks"]

# cdata of the C pool's buffers: freed (given back to the pool) when the last view of
# them is gone; not zeroed (read_chunks overwrites every byte a chunk covers)
_batch_alloc = ffi.new_allocator(alloc=lib.ern_batchbuf_get, free=lib.ern_batchbuf_put,
                                 should_clear_after_alloc=False)


def batch_buffer(size: int) -> memoryview:
    """A writable buffer of `size` bytes (not zeroed) from the C core's pool: back in
    the pool, for a later batch, once no view of it is left."""
    return memoryview(ffi.buffer(_batch_alloc("uint8_t[]", max(size, 1))))[:size]


class ChunkReadError(OSError):
    """Reading chunk `index` of a batch failed: errno set for open/read errors, 0 when
    the file ended before the chunk (it shrank)."""

    def __init__(self, index: int, err: int, what: str) -> None:
        super().__init__(err, os.strerror(err) if err else what)
        self.index = index
        self.what = what


def read_chunks(names: bytes, name_off: array.array[int], file_off: array.array[int],
                lengths: array.array[int], buf_off: array.array[int],
                buf: bytearray | memoryview, hash_max: int = 0,
                digests: bytearray | None = None) -> None:
    """Read chunk i (lengths[i] bytes at file_off[i] of the file whose NUL-terminated
    name starts at names[name_off[i]]) into buf[buf_off[i]:]; raises ChunkReadError.
    digests (32 bytes per chunk): each chunk of at most hash_max bytes also hashed
    (BLAKE3, the C core's own: csrc/blake3.c) into digests[32 * i:32 * i + 32] in the
    same call; the others' bytes are left as they are."""
    n = len(lengths)
    if not (len(name_off) == len(file_off) == len(buf_off) == n):
        raise ValueError("read_chunks: arrays of different lengths")
    if name_off.itemsize != 4 or lengths.itemsize != 4 or file_off.itemsize != 8 \
            or buf_off.itemsize != 8:
        raise ValueError("read_chunks: arrays of the wrong item size")
    if n and (not names.endswith(b"\0") or max(name_off) >= len(names)):
        raise ValueError("read_chunks: names not NUL-terminated where the offsets say")
    if digests is not None and len(digests) < 32 * n:
        raise ValueError("read_chunks: no room for the digests")
    if n == 0:
        return
    fail = ffi.new("uint32_t *")
    err = ffi.new("int32_t *")
    rc = lib.ern_chunks_read(
        ffi.from_buffer("char[]", names), ffi.from_buffer("uint32_t[]", name_off),
        ffi.from_buffer("uint64_t[]", file_off), ffi.from_buffer("uint32_t[]", lengths),
        ffi.from_buffer("uint64_t[]", buf_off), n, ffi.from_buffer("uint8_t[]", buf),
        len(buf), min(max(hash_max, 0), 0xFFFFFFFF),
        ffi.NULL if digests is None else ffi.from_buffer("uint8_t[]", digests), fail, err)
    if rc == lib.ERN_CHUNKS_OK:
        return
    if rc == lib.ERN_CHUNKS_EINVAL:
        raise ValueError("read_chunks: a chunk does not fit in the buffer")
    what = {lib.ERN_CHUNKS_EOPEN: "open", lib.ERN_CHUNKS_EREAD: "read",
            lib.ERN_CHUNKS_ESHORT: "short"}.get(rc, "read")
    raise ChunkReadError(fail[0], err[0] if rc != lib.ERN_CHUNKS_ESHORT else 0, what)



def blake3_digest(data: bytes | bytearray | memoryview) -> bytes:
    """BLAKE3 of `data` by the C core's own portable code (csrc/blake3.c), 32 bytes:
    what read_chunks's digests hold (tests check it against the blake3 package)."""
    out = bytearray(32)
    lib.ern_blake3(ffi.from_buffer("uint8_t[]", data), len(data),
                   ffi.from_buffer("uint8_t[]", out))
    return bytes(out)


def blake3_digest_pair(a: bytes | bytearray | memoryview,
                       b: bytes | bytearray | memoryview) -> tuple[bytes, bytes]:
    """blake3_digest of `a` and of `b` in one call (csrc/blake3.c's ern_blake3_2, which
    read_chunks uses for two chunks of at most 1 KiB: both hashed side by side)."""
    out_a, out_b = bytearray(32), bytearray(32)
    lib.ern_blake3_2(ffi.from_buffer("uint8_t[]", a), len(a),
                     ffi.from_buffer("uint8_t[]", out_a), ffi.from_buffer("uint8_t[]", b),
                     len(b), ffi.from_buffer("uint8_t[]", out_b))
    return bytes(out_a), bytes(out_b)


def batch_buffers_kept(n: int) -> None:
    """Keep up to `n` idle buffers of batch_buffer's pool for the next batches (the C
    core's default: 1)."""
    lib.ern_batchbuf_keep(max(0, n))


def zstd_chunks(compress2: int, is_error: int, cctx: int, src: bytearray | memoryview,
                off: array.array[int], lengths: array.array[int]
                ) -> tuple[memoryview, array.array[int]]:
    """Piece i of `src` (lengths[i] bytes at off[i]) compressed into one zstd frame by
    `compress2` (the address of a ZSTD_compress2) with context `cctx` (an address of
    that library's ZSTD_CCtx, used by one thread at a time), `is_error` its
    ZSTD_isError, in one C call without the GIL; -> (a buffer of batch_buffer's pool
    holding the stored pieces back to back, their stored sizes). A piece that does not
    shrink is stored as it is."""
    n = len(lengths)
    if len(off) != n or off.itemsize != 8 or lengths.itemsize != 4:
        raise ValueError("zstd_chunks: bad arrays")
    if not (compress2 and is_error and cctx):
        raise ValueError("zstd_chunks: no compressor")
    out_len = array.array("I", bytes(4 * n))
    c_len = ffi.from_buffer("uint32_t[]", lengths)
    out = batch_buffer(int(lib.ern_zstd_chunks_bound(c_len, n)))
    if n == 0:
        return out, out_len
    fail = ffi.new("uint32_t *")
    rc = lib.ern_zstd_chunks(
        ffi.cast("void *", compress2), ffi.cast("void *", is_error), ffi.cast("void *", cctx),
        ffi.from_buffer("uint8_t[]", src), len(src), ffi.from_buffer("uint64_t[]", off),
        c_len, n, ffi.from_buffer("uint8_t[]", out), len(out),
        ffi.from_buffer("uint32_t[]", out_len), fail)
    if rc == lib.ERN_ZSTD_ERROR:
        raise ValueError(f"zstd_chunks: zstd failed on piece {fail[0]}")
    if rc != lib.ERN_CHUNKS_OK:
        raise ValueError(f"zstd_chunks: piece {fail[0]} outside the source, or no room")
    return out, out_len


def ci_v1_append(csize: array.array[int], usize: array.array[int], pos: int, upos: int
                 ) -> tuple[array.array[int], array.array[int], bytearray, int, int]:
    """The blob writer's placement of chunks appended in a row (ern_ci_v1_append):
    chunk i stored as csize[i] bytes from `pos`, its data usize[i] bytes from `upos`
    (4 KiB aligned); -> (compressed offsets, uncompressed offsets, CI v1 entries, pos
    and upos after them), in one C call instead of a Python step per chunk."""
    n = len(usize)
    if len(csize) != n or csize.itemsize != 4 or usize.itemsize != 4:
        raise ValueError("ci_v1_append: bad arrays")
    coff = array.array("Q", bytes(8 * n))
    uoff = array.array("Q", bytes(8 * n))
    ci = bytearray(16 * n)
    cpos = ffi.new("uint64_t *", pos)
    cupos = ffi.new("uint64_t *", upos)
    fail = ffi.new("uint32_t *")
    if n and lib.ern_ci_v1_append(
            ffi.from_buffer("uint32_t[]", csize), ffi.from_buffer("uint32_t[]", usize), n,
            cpos, cupos, ffi.from_buffer("uint64_t[]", coff),
            ffi.from_buffer("uint64_t[]", uoff), ffi.from_buffer("uint8_t[]", ci), fail):
        raise ValueError(f"stored chunk larger than its data, or empty (chunk {fail[0]})")
    return coff, uoff, ci, int(cpos[0]), int(cupos[0])


def gather(pieces: Sequence[bytes | bytearray | memoryview], dst: bytearray) -> int:
    """Copy `pieces` back to back to the start of `dst` in one C call (no GIL while it
    copies); -> the bytes copied."""
    n = len(pieces)
    srcs = ffi.new("uint8_t *[]", n)
    lens = array.array("Q", bytes(8 * n))
    keep = []           # the cdata views must live until the call returns
    total = 0
    for i, p in enumerate(pieces):
        c = ffi.from_buffer("uint8_t[]", p)
        keep.append(c)
        srcs[i] = c
        lens[i] = k = len(c)
        total += k
    if total > len(dst):
        raise ValueError("gather: the pieces do not fit in the buffer")
    if n and lib.ern_gather(srcs, ffi.from_buffer("uint64_t[]", lens), n,
                            ffi.from_buffer("uint8_t[]", dst), len(dst)):
        raise ValueError("gather: the pieces do not fit in the buffer")
    return total


class ChunkInfoTable:
    """pack's chunk info table of the new blob's chunks (each digest once), made in C:
    the used chunks sorted by digest, then their 80-byte entries a piece at a time.
    digests: 32 bytes per chunk, back to back; the arrays one item per chunk (coff,
    uoff, file_off: "Q"; csize, usize: "I"); used: one byte per chunk."""

    def __init__(self, digests: bytearray, used: bytearray, coff: array.array[int],
                 csize: array.array[int], uoff: array.array[int],
                 usize: array.array[int], file_off: array.array[int],
                 blob_index: int) -> None:
        n = len(usize)
        if not (len(digests) == 32 * n and len(used) == len(coff) == len(csize)
                == len(uoff) == len(file_off) == n):
            raise ValueError("ChunkInfoTable: arrays of different lengths")
        if coff.itemsize != 8 or uoff.itemsize != 8 or file_off.itemsize != 8 \
                or csize.itemsize != 4 or usize.itemsize != 4:
            raise ValueError("ChunkInfoTable: arrays of the wrong item size")
        self._keep = (digests, coff, csize, uoff, usize, file_off)
        self._c = (ffi.from_buffer("uint8_t[]", digests), ffi.from_buffer("uint64_t[]", coff),
                   ffi.from_buffer("uint32_t[]", csize), ffi.from_buffer("uint64_t[]", uoff),
                   ffi.from_buffer("uint32_t[]", usize),
                   ffi.from_buffer("uint64_t[]", file_off))
        self._order = array.array("I", bytes(4 * n))
        self.count = int(lib.ern_ci_order(self._c[0], ffi.from_buffer("uint8_t[]", used), n,
                                          ffi.from_buffer("uint32_t[]", self._order)))
        self.blob_index = blob_index

    def entries(self, start: int, count: int) -> bytearray:
        """The entries of sorted positions [start, start + count)."""
        if start < 0 or count < 0 or start + count > self.count:
            raise ValueError("ChunkInfoTable: entries out of range")
        out = bytearray(80 * count)
        d, coff, csize, uoff, usize, foff = self._c
        lib.ern_ci_entries(d, ffi.from_buffer("uint32_t[]", self._order), start, count,
                           self.blob_index, coff, csize, uoff, usize, foff,
                           ffi.from_buffer("uint8_t[]", out))
        return out


def chunk_indexes(refs: array.array[int], uoff: array.array[int], dev: int,
                  used: bytearray) -> array.array[int]:
    """The 8-byte chunk indexes of `refs` (CI indexes of the new blob, whose
    uncompressed offsets are `uoff`) on device `dev`; marks each index in `used`."""
    n = len(refs)
    if refs.itemsize != 4 or uoff.itemsize != 8 or len(used) != len(uoff) \
            or not 0 < dev < 256:
        raise ValueError("chunk_indexes: bad arguments")
    out = array.array("Q", bytes(8 * n))
    if n and lib.ern_chunk_indexes(
            ffi.from_buffer("uint32_t[]", refs), n, ffi.from_buffer("uint64_t[]", uoff),
            len(uoff), dev, ffi.from_buffer("uint64_t[]", out),
            ffi.from_buffer("uint8_t[]", used)):
        raise ValueError("chunk_indexes: a reference past the blob's chunks")
    return out
