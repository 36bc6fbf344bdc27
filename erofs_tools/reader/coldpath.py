"""The daemon's cold path: the chunks of one fetched range of a blob decoded, verified
and written into a cache file, with the C core doing the bytes.

`store_range` takes the stored bytes of a range (one backend request) and the chunks in
it, and
1. decodes them all in one C call (`ern_cold_decode`: zstd, lz4 raw blocks or stored
   chunks; every frame checked as strictly as `blob.decode_chunk` does), without the GIL,
   into a buffer this thread reuses (no fresh allocation, so no page faults, per chunk);
2. checks each decoded chunk's digest: blake3 has no C library on Debian 12, and the
   `blake3` package the project uses hashes with SIMD code and without the GIL, several
   times faster than portable C would;
3. writes the verified chunks into the cache file and sets their bits in the chunk-state
   bitmap in a second C call (`ern_cold_store`: pwritev per run of chunks adjacent in
   the file, the bitmap bytes to the state file). A chunk that failed to decode or to
   verify is never written.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

from erofs_tools import _native
from erofs_tools.errors import CorruptImageError, DigestMismatchError
from erofs_tools.fsutil import round_up
from erofs_tools.reader.blob import BlobChunk, BlobMeta, _blob_name

# a thread keeps a decode buffer of this size between ranges (8 threads: 64 MiB at
# most, but only touched pages count: a range of 1 MiB touches 1 MiB)
KEEP_BUFFER = 8 << 20
_tls = threading.local()


def _buffer(size: int) -> memoryview:
    """This thread's decode buffer for `size` bytes: a private anonymous mapping of
    KEEP_BUFFER bytes made once per thread (a one-off one for a larger range). Its
    pages are faulted in by the decoder, without the GIL; a bytearray would be zeroed
    page by page first, holding the GIL (measured: the daemon's costliest line under
    the GIL on a cold GiB, its workers' buffers growing 1 -> 2 -> 4 MiB)."""
    if size > KEEP_BUFFER:
        return memoryview(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE))
    buf = getattr(_tls, "buf", None)
    if buf is None:
        buf = _tls.buf = memoryview(mmap.mmap(-1, KEEP_BUFFER, flags=mmap.MAP_PRIVATE))
    return buf


_DIGESTERS: dict[str, Callable[[memoryview], bytes]] = {}


def digester(name: str) -> Callable[[memoryview], bytes]:
    d = _DIGESTERS.get(name)     # made once: asked for once per fetched range
    if d is not None:
        return d
    if name == "blake3":
        import blake3
        b3 = blake3.blake3
        d = _DIGESTERS[name] = lambda data: b3(data).digest()
        return d
    if name == "sha256":
        sha = hashlib.sha256
        d = _DIGESTERS[name] = lambda data: sha(data).digest()
        return d
    raise CorruptImageError(f"unsupported chunk digest algorithm {name!r}")


class StoreTarget(NamedTuple):
    """Where verified chunks go: the cache file and its chunk-state bitmap."""
    fd: int             # the cache file, written at each chunk's uncompressed offset
    size: int           # its size (the blob's uncompressed size)
    bitmap: bytearray   # one bit per chunk index (bit i & 7 of byte i >> 3)
    nbits: int
    state_fd: int = -1  # the changed bitmap bytes are written here at state_off + byte
    state_off: int = 0


class StoreResult(NamedTuple):
    stored: list            # chunks written and recorded
    failed: list            # (chunk, CorruptImageError | OSError)
    newly: int              # bits that were clear before


class DecodedRange:
    """The chunks of one range, decoded and verified (`decode_range`), ready to store.
    Holds this thread's decode buffer: store it from the same thread, before the next
    decode_range."""

    def __init__(self, meta: BlobMeta, chunks: Sequence[BlobChunk],
                 cc: _native.ColdChunks, failed: list) -> None:
        self.meta = meta
        self.chunks = chunks
        self.cc = cc
        self.failed = failed      # (chunk, CorruptImageError): never stored

    def store(self, target: StoreTarget) -> StoreResult:
        """Write the verified chunks into target.fd and set their bits (one C call)."""
        _written, newly, werr = self.cc.store(target.fd, target.size, target.bitmap,
                                              target.nbits, target.state_fd, target.state_off)
        return self.result(newly, werr)

    def write(self, target: StoreTarget) -> int:
        """store() in two steps, for a caller that locks the bitmap only for the second:
        the verified chunks' bytes into target.fd (no lock needed); -errno of a failed
        write or 0. Then mark()."""
        return self.cc.write(target.fd, target.size, target.nbits)[1]

    def mark(self, target: StoreTarget, werr: int) -> StoreResult:
        """After write(werr = what it returned): the written chunks' bits, the record
        first (under the bitmap's lock)."""
        newly, err = self.cc.mark(target.bitmap, target.nbits, target.state_fd,
                                  target.state_off)
        return self.result(newly, werr or err)

    def result(self, newly: int, werr: int) -> StoreResult:
        """The StoreResult of a store (chunks stored, failed with why)."""
        cc = self.cc
        stored = []
        failed = list(self.failed)
        ok = _native.COLD_OK
        for i, c in enumerate(self.chunks):
            if not cc.verified(i):
                continue
            st = cc.status(i)
            if st == ok:
                stored.append(c)
                continue
            name = _blob_name(self.meta.blob_id)
            if st == _native.COLD_EWRITE:
                failed.append((c, OSError(-werr, f"{os.strerror(-werr)} (writing chunk "
                                                  f"{c.index} into the cache file)")))
            else:
                failed.append((c, CorruptImageError(
                    f"blob {name}: chunk {c.index}: {_native.COLD_ERRORS.get(st, st)}")))
        return StoreResult(stored, failed, newly)


def _decode_zran(meta: BlobMeta, chunks: Sequence[BlobChunk], raw: bytes | memoryview,
                 raw_offset: int) -> tuple[list[BlobChunk], _native.ColdChunks]:
    """The chunks of a zran blob: per access point, one C call inflates its context from
    the point to the furthest of its chunks here (`ern_cold_zran`), the output before
    the first of them discarded, into this thread's buffer; the chunks are slices of it.
    -> (the chunks in the order of the C entries, the entries)."""
    zc = meta.zran
    groups: dict[int, list[BlobChunk]] = {}
    for c in chunks:
        groups.setdefault(c.zran_index, []).append(c)
    ordered: list[BlobChunk] = []
    plan = []
    dsize = 0
    for k, cs in groups.items():
        first = min(c.zran_offset for c in cs)
        end = max(c.zran_offset + c.uncompressed_size for c in cs)
        plan.append((k, len(ordered), cs, first, end, dsize))
        ordered.extend(cs)
        dsize += round_up(end - first, 4096)
    cc = _native.ColdChunks(len(ordered), raw, _buffer(dsize))
    for k, at, cs, first, end, base in plan:
        ctx = zc.contexts[k]
        for j, c in enumerate(cs):
            cc.set(at + j, _native.COLD_ALGS["none"], 0, c.compressed_size,
                   c.uncompressed_size, base + c.zran_offset - first, c.uncompressed_offset,
                   c.index)
        src_off = ctx.point.in_offset - raw_offset
        if src_off < 0:
            # the access point before the fetched bytes (a planner bug or a hostile
            # index): a place the C core refuses, so every chunk of it fails
            src_off = len(raw) + 1
        # inflating stops at `end` or where the fetched bytes (or the context) end
        cc.zran(at, len(cs), ctx.point, (src_off, max(0, min(ctx.in_len, len(raw) - src_off)),
                                         first, base, end - first))
    return ordered, cc


def by_context(meta: BlobMeta, chunks: Sequence[BlobChunk]) -> list[list[BlobChunk]]:
    """The chunks of one range as decode_range calls: all at once, or for a zran blob one
    access point's chunks per call (the decode buffer then holds one context's output)."""
    if meta.zran is None:
        return [list(chunks)]
    groups: dict[int, list[BlobChunk]] = {}
    for c in chunks:
        groups.setdefault(c.zran_index, []).append(c)
    return list(groups.values())


def decode_range(meta: BlobMeta, chunks: Sequence[BlobChunk], raw: bytes | memoryview,
                 raw_offset: int, verify: bool = True) -> DecodedRange:
    """Decode and verify `chunks`, whose stored bytes are in `raw` (the blob's bytes from
    `raw_offset` on). Chunks without a digest are refused (never stored) unless verify
    is False. Zran chunks (meta.zran) are inflated from their access points; their
    DecodedRange.chunks are in another order than `chunks`."""
    name = _blob_name(meta.blob_id)
    if meta.zran is not None:
        chunks, cc = _decode_zran(meta, chunks, raw, raw_offset)
        return _verify(meta, chunks, cc, verify, name)
    n = len(chunks)
    # decoded chunks laid out one after the other, 4 KiB aligned; stored ones stay in raw
    dsize = 0
    offs = []
    for c in chunks:
        offs.append(dsize)
        if c.compressed:
            dsize += round_up(c.uncompressed_size, 4096)
    comp = _native.COLD_ALGS.get(meta.compressor)
    if comp is None:
        comp = 255          # refused by the C core as an unknown compressor
    stored = _native.COLD_ALGS["none"]
    cc = _native.ColdChunks(n, raw, _buffer(dsize))
    for i, c in enumerate(chunks):
        cc.set(i, comp if c.compressed else stored, c.compressed_offset - raw_offset,
               c.compressed_size, c.uncompressed_size, offs[i], c.uncompressed_offset,
               c.index)
    cc.decode()
    return _verify(meta, chunks, cc, verify, name)


def _verify(meta: BlobMeta, chunks: Sequence[BlobChunk], cc: _native.ColdChunks,
            verify: bool, name: str) -> DecodedRange:
    failed: list = []
    hasher = digester(meta.digester) if verify else None
    ok = _native.COLD_OK
    for i, c in enumerate(chunks):
        st = cc.status(i)
        if st != ok:
            failed.append((c, CorruptImageError(f"blob {name}: chunk {c.index}: "
                                                f"{_native.COLD_ERRORS.get(st, st)}")))
            continue
        if hasher is not None:
            if c.digest is None:
                failed.append((c, CorruptImageError(f"blob {name}: chunk {c.index}: no "
                                                    "digest to verify it")))
                continue
            if hasher(cc.data(i)) != c.digest:
                failed.append((c, DigestMismatchError(
                    f"blob {name}: chunk {c.index}: digest mismatch ({meta.digester})")))
                continue
        cc.mark_verified(i)
    return DecodedRange(meta, chunks, cc, failed)


def store_range(meta: BlobMeta, chunks: Sequence[BlobChunk], raw: bytes | memoryview,
                raw_offset: int, target: StoreTarget, verify: bool = True) -> StoreResult:
    """decode_range, then store: the whole cold path of one range."""
    return decode_range(meta, chunks, raw, raw_offset, verify).store(target)
