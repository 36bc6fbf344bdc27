"""Zran blobs: chunks that live inside an original gzip layer (docs/zran.md).

The blob (the gzip layer, named by its OCI digest) carries no meta of its own; its CI v2
table, zran context table, dictionaries and chunk digests are in a separate meta blob
named by the blob table's `blob_meta_digest`. `open_meta` parses and checks that meta
blob and returns a `blob.BlobMeta` whose chunks each cover the compressed bytes from
their context's access point to where their own data has come out (so
`read_at(compressed_offset, compressed_size)` + `blob.decode_chunk` serve a zran chunk
like any other), with `meta.zran` holding the contexts. Every value is untrusted: offsets beyond the layer,
windows over 32 KiB, bit counts over 7, contexts whose output exceeds 16 MiB or misses a
chunk end in a one-line CorruptImageError.
"""
from __future__ import annotations

import bisect
import collections
import hashlib
import os
import struct
import threading
from typing import NamedTuple

from erofs_tools._native_zran import ZranPoint, zran_extract
from erofs_tools.errors import CorruptImageError, DigestMismatchError, InputError
from erofs_tools.format import rafs
from erofs_tools.reader import blob as rblob

MAX_META_BLOB = 1 << 30
MAX_CI_AREA = 1 << 30
# rafs.ZranContext as one struct (its fields in order, the 2 reserved bytes skipped)
_CTX = struct.Struct("<QQQIIIBB2x")
_CI = struct.Struct("<QQQ")     # a CI v2 entry: rafs.decode_ci_v2 and its data word


def is_zran_entry(entry: rafs.BlobEntry | None) -> bool:
    """A blob-table entry of a zran blob (the blob is a gzip layer, its index elsewhere)."""
    return entry is not None and bool(entry.features & rafs.BLOB_FEATURE_ZRAN)


class ZranContextInfo(NamedTuple):
    point: ZranPoint
    in_len: int
    out_len: int


class _CtxIndex(NamedTuple):
    needs: list[int]
    reach: list[int]
    members: list[rblob.BlobChunk]
    ends: list[int]


class ZranContexts:
    """The contexts of one zran blob, and the chunk decoder over them.

    A chunk needs the compressed bytes from its context's access point to where its own
    data has come out (its BlobChunk range); given more (a request covering several
    chunks of the context, or the whole context), the decoder inflates as far as the
    chunks those bytes complete and keeps that output (48 MiB budget), so the chunks of
    one context are inflated once, not once each."""

    KEEP_BYTES = 48 << 20        # a few contexts (each at most 16 MiB)

    def __init__(self, contexts: list[ZranContextInfo]) -> None:
        self.contexts = contexts
        self._lock = threading.Lock()
        self._kept: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._kept_bytes = 0
        # per context: its chunks (index_chunks), and made from them on first use
        # (_index: a mount parses thousands of contexts, a start reads a few hundred)
        self._chunks_of: list[list[rblob.BlobChunk]] = [[] for _ in contexts]
        self._index_of: list[_CtxIndex | None] = [None] * len(contexts)

    def index_chunks(self, chunks: list[rblob.BlobChunk]) -> None:
        of: list[list[rblob.BlobChunk]] = [[] for _ in self.contexts]
        for c in chunks:
            of[c.zran_index].append(c)
        self._chunks_of = of
        self._index_of = [None] * len(self.contexts)

    def _index(self, k: int) -> _CtxIndex:
        """Context k's chunk input ends (relative to the point, sorted) and the furthest
        output those inputs complete; its chunks by the end of their output, and those
        ends. Two threads may both make it: equal values."""
        ix = self._index_of[k]
        if ix is not None:
            return ix
        cs = self._chunks_of[k]
        ps = sorted((c.compressed_size, c.zran_offset + c.uncompressed_size) for c in cs)
        best, reach = 0, []
        for _need, end in ps:
            best = max(best, end)
            reach.append(best)
        ms = sorted(cs, key=lambda c: (c.zran_offset + c.uncompressed_size, c.index))
        ix = _CtxIndex([n for n, _ in ps], reach, ms,
                       [c.zran_offset + c.uncompressed_size for c in ms])
        self._index_of[k] = ix
        return ix

    def inflated_with(self, chunks: list[rblob.BlobChunk]) -> list[rblob.BlobChunk]:
        """The other chunks whose output comes out anyway when `chunks` are inflated
        from their access points: those of the same contexts ending no later than the
        furthest of `chunks` there (the daemon stores them too, at no extra fetch or
        inflate: the files next to a read one in the layer are often read next)."""
        furthest: dict[int, int] = {}
        for c in chunks:
            e = c.zran_offset + c.uncompressed_size
            if e > furthest.get(c.zran_index, -1):
                furthest[c.zran_index] = e
        have = {c.index for c in chunks}
        out = []
        for k, end in furthest.items():
            ix = self._index(k)
            for c in ix.members[:bisect.bisect_right(ix.ends, end)]:
                if c.index not in have:
                    out.append(c)
        return out

    def _get(self, k: int, end: int) -> bytes | None:
        with self._lock:
            out = self._kept.get(k)
            if out is None or len(out) < end:
                return None
            self._kept.move_to_end(k)
            return out

    def decode(self, meta: rblob.BlobMeta, chunk: rblob.BlobChunk, raw: bytes) -> bytes:
        """`raw`: the layer's bytes from the context's access point on, at least the
        chunk's range (BlobChunk.compressed_size)."""
        k = chunk.zran_index
        end = chunk.zran_offset + chunk.uncompressed_size
        out = self._get(k, end)
        if out is None:
            ctx = self.contexts[k]
            if len(raw) < chunk.compressed_size:
                raise CorruptImageError(f"got {len(raw)} compressed bytes, the chunk needs "
                                        f"{chunk.compressed_size}")
            raw = raw[:ctx.in_len]
            # as far as the given bytes complete chunks of this context
            ix = self._index(k)
            i = bisect.bisect_right(ix.needs, len(raw)) - 1
            target = max(end, ix.reach[i] if i >= 0 else 0)
            out = zran_extract(ctx.point, raw, 0, min(target, ctx.out_len))
            with self._lock:
                old = self._kept.pop(k, None)
                if old is not None:
                    self._kept_bytes -= len(old)
                    out = old if len(old) > len(out) else out
                self._kept[k] = out
                self._kept_bytes += len(out)
                while self._kept_bytes > self.KEEP_BYTES and len(self._kept) > 1:
                    self._kept_bytes -= len(self._kept.popitem(last=False)[1])
        return out[chunk.zran_offset:end]

    def cached(self, chunk: rblob.BlobChunk) -> bytes | None:
        """The chunk's bytes if its context is inflated that far already (callers then
        skip reading compressed bytes; they still verify the digest)."""
        end = chunk.zran_offset + chunk.uncompressed_size
        out = self._get(chunk.zran_index, end)
        return None if out is None else out[chunk.zran_offset:end]

    def context_range(self, chunk: rblob.BlobChunk) -> tuple[int, int]:
        """(offset, size) of the whole context's compressed bytes: what a reader with
        the layer at hand reads, so that the context is inflated once."""
        ctx = self.contexts[chunk.zran_index]
        return ctx.point.in_offset, ctx.in_len


def _ctx_table(name: str, area: bytes, off: int, size: int, count: int, n_chunks: int,
               layer_size: int) -> list[ZranContextInfo]:
    es = rafs.ZranContext.SIZE
    if count == 0 or count > max(n_chunks, 1) or off < n_chunks * rafs.CI_V2_SIZE \
            or size < count * es or off + size > len(area):
        raise CorruptImageError(f"blob {name}: zran context table ({count} at {off}, "
                                f"{size} bytes) does not fit its CI area")
    # the windows stay views into the CI area (no copy of tens of MB at a mount)
    dicts = memoryview(area)[off + count * es:off + size]
    ndicts = len(dicts)
    out = []
    # one table unpack, not a Record per context (a mount parses thousands)
    for i, (in_off, out_off, d_off, in_len, out_len, d_size, byte, bits) in enumerate(
            _CTX.iter_unpack(memoryview(area)[off:off + count * es])):
        what = f"blob {name}: zran context {i}"
        if bits > 7:
            raise CorruptImageError(f"{what}: {bits} bits of a byte")
        if d_size > rafs.ZRAN_WINDOW or d_off + d_size > ndicts:
            raise CorruptImageError(f"{what}: window outside the dictionary table or over "
                                    "32 KiB")
        if in_len == 0 or in_off + in_len > layer_size:
            raise CorruptImageError(f"{what}: compressed range [{in_off}, "
                                    f"{in_off + in_len}) outside the layer "
                                    f"({layer_size} bytes)")
        if out_len == 0 or out_len > rafs.ZRAN_MAX_CONTEXT_OUT:
            raise CorruptImageError(f"{what}: output size {out_len}")
        p = ZranPoint(in_off, out_off, bits, byte, dicts[d_off:d_off + d_size])
        out.append(ZranContextInfo(p, in_len, out_len))
    return out


def parse_meta(blob: bytes, entry: rafs.BlobEntry, blob_id: str,
               digests: dict[int, bytes] | None = None) -> rblob.BlobMeta:
    """BlobMeta of a zran blob from its meta blob's bytes and its blob-table entry."""
    name = blob_id
    size = len(blob)

    def read_at(off: int, n: int) -> bytes:
        return blob[off:off + n]

    layer_size = entry.compressed_size
    if not 0 < layer_size <= rblob.MAX_COMPRESSED_SIZE:
        raise CorruptImageError(f"blob {name}: bad layer size {layer_size}")
    toc = rblob.read_toc(read_at, size, blob_id, entry.blob_toc_size or None)
    if toc is None or rafs.TOC_NAME_BLOB_META not in toc.entries:
        raise CorruptImageError(f"blob {name}: zran meta blob has no TOC with blob.meta")
    ci_off, ci_csize, ci_usize = (entry.ci_offset, entry.ci_compressed_size,
                                  entry.ci_uncompressed_size)
    hraw = rblob._read_exact(read_at, ci_off + ci_csize, rafs.BLOB_META_HEADER_SIZE, size,
                             f"blob {name}: blob meta header")
    hdr = rafs.BlobMetaHeader.decode(hraw)
    if hdr.magic != rafs.BLOB_META_MAGIC or hdr.magic2 != rafs.BLOB_META_MAGIC:
        raise CorruptImageError(f"blob {name}: bad blob meta header magic")
    if (hdr.ci_offset, hdr.ci_compressed_size, hdr.ci_uncompressed_size) != \
            (ci_off, ci_csize, ci_usize) or not hdr.features & rafs.BLOB_FEATURE_ZRAN \
            or not hdr.features & rafs.BLOB_FEATURE_CHUNK_INFO_V2:
        raise CorruptImageError(f"blob {name}: blob meta header disagrees with the "
                                "bootstrap's blob table")
    n = hdr.ci_entries
    if n != entry.chunk_count or n == 0 or n > rafs.MAX_CHUNKS_PER_BLOB \
            or ci_usize > MAX_CI_AREA or ci_usize < n * rafs.CI_V2_SIZE:
        raise CorruptImageError(f"blob {name}: CI area of {ci_usize} bytes for {n} chunks")
    comp = rafs.COMPRESSOR_NAMES.get(hdr.ci_compressor)
    if comp not in ("none", "zstd") or (comp == "none" and ci_csize != ci_usize):
        raise CorruptImageError(f"blob {name}: bad CI compression {hdr.ci_compressor}")
    craw = rblob._read_exact(read_at, ci_off, ci_csize, size, f"blob {name}: CI area")
    area = rblob._decompress(comp, craw, ci_usize, f"blob {name}: CI area")
    ctxs = _ctx_table(name, area, hdr.ctx_offset, hdr.ctx_size, hdr.ctx_count, n, layer_size)
    dig = toc.entries.get(rafs.TOC_NAME_BLOB_DIGEST)
    dig_list: list[bytes | None] = [None] * n
    if dig is not None:
        if dig.compressed_size != n * 32:
            raise CorruptImageError(f"blob {name}: blob.digest size does not fit {n} chunks")
        draw = rblob._read_exact(read_at, dig.compressed_offset, n * 32, size,
                                 f"blob {name}: blob.digest")
        if hashlib.sha256(draw).digest() != dig.uncompressed_digest:
            raise DigestMismatchError(f"blob {name}: blob.digest does not match its TOC")
        dig_list = [bytes(draw[i * 32:i * 32 + 32]) for i in range(n)]
    chunks = []
    allowed = rafs.CI_V2_FLAG_ZRAN | rafs.CI_V2_FLAG_COMPRESSED | rafs.CI_V2_FLAG_HAS_CRC32
    extra = digests or {}
    nctx = len(ctxs)
    make = rblob.BlobChunk
    # rafs.decode_ci_v2's arithmetic on one table unpack (tens of thousands of entries
    # at every cold mount)
    for i, (uncomp, comp, data) in enumerate(
            _CI.iter_unpack(memoryview(area)[:n * rafs.CI_V2_SIZE])):
        flags = (uncomp >> 56) & 0xFF
        if not flags & rafs.CI_V2_FLAG_ZRAN or flags & ~allowed:
            raise CorruptImageError(f"blob {name}: chunk {i} flags {flags:#x} in a zran blob")
        us = ((uncomp >> 32) & 0xFF_FFFF) + 1
        k, zoff = data >> 32, data & 0xFFFF_FFFF
        if k >= nctx or zoff + us > ctxs[k].out_len:
            raise CorruptImageError(f"blob {name}: chunk {i} outside its zran context {k}")
        c = ctxs[k]
        # the chunk's data has come out once the layer is read to coff + cs: its range is
        # from the context's access point to there
        at = c.point.in_offset
        need = (comp & 0xFF_FFFF_FFFF) + ((comp >> 40) & 0xFF_FFFF) - at
        if not 0 < need <= c.in_len:
            raise CorruptImageError(f"blob {name}: chunk {i} ends its compressed range "
                                    f"outside its zran context {k}")
        d = dig_list[i]
        if d is None:
            d = extra.get(i)
            if d is None:     # a chunk nothing verifies is never served
                raise CorruptImageError(f"blob {name}: chunk {i} has no digest")
        chunks.append(make(i, (uncomp & 0xFFFF_FFFF) << 12, us, at, need, d, True, k, zoff))
    zc = ZranContexts(ctxs)
    zc.index_chunks(chunks)
    return rblob.BlobMeta(blob_id, chunks, entry.uncompressed_size, layer_size, "gzip",
                          rafs.DIGESTER_NAMES.get(entry.digest_algo, "?"), entry.chunk_size,
                          entry.features, None, zran=zc)


def open_meta(blob_dir: str, entry: rafs.BlobEntry, blob_id: str,
              digests: dict[int, bytes] | None = None) -> rblob.BlobMeta:
    """The zran meta blob of `entry`, found in BLOB_DIR by its sha256 and checked
    against it."""
    meta_hex = bytes(entry.blob_meta_digest).hex()
    if entry.blob_meta_size <= 0 or entry.blob_meta_size > MAX_META_BLOB:
        raise CorruptImageError(f"blob {blob_id}: zran meta blob size {entry.blob_meta_size}")
    path = os.path.join(blob_dir, meta_hex)
    try:
        with open(path, "rb") as f:
            data = f.read(entry.blob_meta_size + 1)
    except OSError as e:
        raise InputError(f"blob {blob_id}: zran meta blob {meta_hex}: {e.strerror}") from None
    if len(data) != entry.blob_meta_size or hashlib.sha256(data).hexdigest() != meta_hex:
        raise DigestMismatchError(f"blob {blob_id}: zran meta blob {meta_hex} does not match "
                                  "its digest")
    return parse_meta(data, entry, blob_id, digests)
