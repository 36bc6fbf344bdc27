"""`convert --oci-ref`: a gzip tar layer indexed where it is (Nydus's zran mode).

The layer is read once, front to back: the C core inflates it (`_native_zran.ZranIndexer`) and
records an access point at a deflate block boundary every `span` bytes of output; the
decompressed bytes feed the tar ingestion (tar_reader, tar_tree, tar_source.stream_chunks)
unchanged. A regular file's data in a tar is contiguous in the decompressed stream, so
each chunk of it is a range of that stream: the chunk is digested (blake3) and recorded
with the access point at or before its start (its "context") and its offset in that
context's output. Nothing of the layer is stored; the outputs are the layer's bootstrap
(chunks in a blob named by the layer digest, the gzip layer itself) and the layer's zran
meta blob, a Nydus "RAFS blob for ZRAN" (docs/zran.md):

    CI area (zstd if smaller): CI v2 table | context table | dictionary table
    BlobCompressionContextHeader (4096 bytes, ctx_offset/size/count set)
    tar header "blob.meta"
    chunk digests (32 bytes each) + tar header "blob.digest"
    TOC (blob.meta, blob.meta.header, blob.digest) + tar header "rafs.blob.toc"

named by its sha256, which the blob table records as blob_meta_digest / blob_meta_size.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import time
from collections.abc import Callable
from typing import Any

import zstandard

from erofs_tools._native_zran import ZranIndexer, ZranPoint, zran_extract, zran_window_use
from erofs_tools.builder import rafs as RP
from erofs_tools.builder.blob import BLKSZ, BlobInfo, StoredChunk
from erofs_tools.builder.chunker import check_chunk_size, digest_function
from erofs_tools.builder.tar_reader import DEFAULT_MAX_SIZE, Entry, ReadStream, TarReader, _show
from erofs_tools.builder.tar_source import stream_chunks
from erofs_tools.builder.tar_tree import TarTree
from erofs_tools.errors import CorruptImageError, InputError
from erofs_tools.format import rafs as R
from erofs_tools.fsutil import create_exclusive, round_up

# 512 KiB: with trimmed windows (~2 KB each compressed) the ML image's index is 2.3 %
# of it (2 MiB: 1.6 %, 256 KiB: 2.8 %); a small read inflates a quarter of what 2 MiB cost
SPAN_DEFAULT = 512 << 10
SPAN_MIN = 64 << 10
# a context's output is at most one span (plus a deflate block) before a chunk's start
# and the chunk: within nydusd's 16 MiB per context
MAX_SPAN_PLUS_CHUNK = 8 << 20
_IN_PIECE = 256 << 10


ZRAN_WINDOW_REACH = 32768 + 258     # output after a point that can copy from its window
_USED_TO_MASK = bytes([0, 255] + [0] * 254)


def trim_window(point: ZranPoint, compressed: bytes | memoryview,
                stream_ends: bool) -> bytes | None:
    """`point`'s window reduced to the bytes the stream after it copies (the others
    zeroed, the unused front cut off: a dictionary table that compresses far better and
    inflates the same; `_native_zran.zran_window_use`), from `compressed` (the stream's bytes
    from `point.in_offset` on; `stream_ends`: nothing follows them). None when that
    cannot be told: too little input, or the stream does not inflate."""
    w = point.window
    if not w:
        return b""
    try:
        used, n = zran_window_use(point, compressed)
    except CorruptImageError:
        return None
    if (n < ZRAN_WINDOW_REACH and not stream_ends) or n == 0:
        return None
    first = used.find(1)
    if first < 0:
        trimmed = b""
    else:
        mask = used[first:].translate(_USED_TO_MASK)
        trimmed = (int.from_bytes(w[first:], "big") & int.from_bytes(mask, "big")).to_bytes(
            len(mask), "big")
    # the output the window can reach, inflated both ways, must agree
    try:
        want = zran_extract(point, compressed, 0, n)
        got = zran_extract(ZranPoint(point.in_offset, point.out_offset, point.bits,
                                     point.byte, trimmed), compressed, 0, n)
    except CorruptImageError:
        return None
    return trimmed if got == want else None


def check_span(span: int, chunk_size: int) -> None:
    check_chunk_size(chunk_size)
    if span < SPAN_MIN or span + chunk_size > MAX_SPAN_PLUS_CHUNK:
        raise InputError(f"zran span {span} must be at least {SPAN_MIN} and, with the chunk "
                         f"size, at most {MAX_SPAN_PLUS_CHUNK} bytes")


class GzipIndexStream:
    """read(n) over the decompressed layer for the tar reader, indexing as it goes.

    `marks` maps output positions to input consumed: (total_out, total_in) after each
    decompressed piece, so `in_end(x)` (the input that suffices to produce output x) and
    `in_at(x)` (interpolated: where output x came out) are known for positions not yet
    pruned."""

    def __init__(self, raw: ReadStream, span: int, trim: bool = True) -> None:
        self.raw = raw
        self.ix = ZranIndexer(span)
        self._gen: Any = None
        self.eof = False
        self.marks: collections.deque[tuple[int, int]] = collections.deque([(0, 0)])
        # window trimming (`window_of`): the compressed input not yet past the points
        # waiting for it, and those points
        self.trim = trim
        self._raw: collections.deque[tuple[int, bytes]] = collections.deque()
        self._raw_end = 0
        self._waiting: collections.deque[ZranPoint] = collections.deque()
        self._last_seen = -1
        self.windows: dict[int, bytes] = {}     # point out_offset -> trimmed window
        self.window_bytes = [0, 0]              # before and after trimming

    def read(self, n: int = -1) -> bytes:
        while True:
            if self._gen is not None:
                piece = next(self._gen, None)
                if piece is not None:
                    self.marks.append((self.ix.total_out, self.ix.total_in))
                    self._trim_ready()
                    return piece
                self._gen = None
            if self.eof:
                return b""
            data = self.raw.read(_IN_PIECE)
            if not data:
                self.ix.finish()
                self.eof = True
                self._trim_ready()
                return b""
            if self.trim:
                self._raw.append((self._raw_end, data))
            self._raw_end += len(data)
            self._gen = self.ix.feed(data)

    def _trim_ready(self) -> None:
        """Trim the windows of the points the stream has gone far enough past: only the
        bytes the output within a window's reach copies are kept (`trim_window`; typically a quarter of a window's compressed size: the
        dictionary table is most of an index)."""
        if not self.trim:
            return
        for p in self.ix.points:            # the new points, in order
            if p.out_offset > self._last_seen:
                self._waiting.append(p)
                self._last_seen = p.out_offset
        w = self._waiting
        while w and (self.eof or self.ix.total_out >= w[0].out_offset + ZRAN_WINDOW_REACH):
            p = w.popleft()
            t = trim_window(p, self._input_from(p.in_offset), self.eof)
            self.window_bytes[0] += len(p.window)
            if t is not None:
                self.windows[p.out_offset] = t
            self.window_bytes[1] += len(p.window if t is None else t)
        # keep the input from the oldest waiting point on (or from now on)
        keep = w[0].in_offset if w else self.ix.total_in
        while self._raw and self._raw[0][0] + len(self._raw[0][1]) <= keep:
            self._raw.popleft()

    def _input_from(self, off: int) -> bytes:
        parts = [d[max(0, off - o):] for o, d in self._raw if o + len(d) > off]
        return b"".join(parts)

    def window_of(self, p: ZranPoint) -> bytes:
        """The window to store for point p: trimmed when that could be told."""
        t = self.windows.get(p.out_offset)
        return t if t is not None else bytes(p.window)     # the indexer's: bytes already

    def prune(self, before: int) -> None:
        """Forget marks only positions < `before` need (keep one at or before it)."""
        m = self.marks
        while len(m) >= 2 and m[1][0] <= before:
            m.popleft()

    def in_at(self, out_pos: int) -> int:
        """The input position where output `out_pos` came out, interpolated between
        the marks around it (informative: the chunk's own part of the layer)."""
        prev = (0, 0)
        for o, i in self.marks:
            if o >= out_pos:
                if o == prev[0]:
                    return i
                return prev[1] + (i - prev[1]) * (out_pos - prev[0]) // (o - prev[0])
            prev = (o, i)
        return prev[1]

    def in_end(self, out_pos: int) -> int:
        for o, i in self.marks:
            if o >= out_pos:
                return i
        raise AssertionError(f"output position {out_pos} not produced yet")


class _Context:
    __slots__ = ("point", "out_end", "in_end")

    def __init__(self, point: ZranPoint) -> None:
        self.point = point
        self.out_end = point.out_offset
        self.in_end = point.in_offset


class ZranPlacer:
    """Chunks of one layer: digest, dedup (same digest and size: stored once), the
    context of each, the CI v2 table and each file's chunk list (for write_bootstrap)."""

    def __init__(self, stream: GzipIndexStream, reader: TarReader, digester: str) -> None:
        self.stream = stream
        self.reader = reader
        self.digest = digest_function(digester)
        self.contexts: list[_Context] = []
        self._ctx_of: dict[int, int] = {}     # point out_offset -> context index
        self._untrimmed: collections.deque[int] = collections.deque()
        self.stored: dict[tuple[bytes, int], StoredChunk] = {}
        self.ci = bytearray()
        self.digests = bytearray()
        self.upos = 0
        self.per_file: dict[int, list[Any]] = {}
        self.file_off: dict[int, int] = {}
        self.stats = {"chunks_total": 0, "chunks_new": 0, "chunks_dedup": 0,
                      "bytes_total": 0, "bytes_new": 0}

    def _last_point(self, pos: int) -> int:
        """Index in the indexer's point list of the last point at or before `pos`; the
        points before it can never start a later chunk, so they are dropped (their
        windows are the memory an index takes while it is built)."""
        points = self.stream.ix.points
        j = 0
        while j + 1 < len(points) and points[j + 1].out_offset <= pos:
            j += 1
        if j:
            for p in points[:j]:
                if p.out_offset not in self._ctx_of:   # no chunk starts after it: not stored
                    self.stream.windows.pop(p.out_offset, None)
            del points[:j]
        return 0

    def _swap_trimmed(self) -> None:
        """Contexts whose point's window was trimmed since: keep only the trimmed one
        (an untrimmed window is 32 KiB of memory per context while the layer is read)."""
        w = self.stream.windows
        while self._untrimmed:
            ctx = self.contexts[self._untrimmed[0]]
            t = w.pop(ctx.point.out_offset, None)
            if t is None:
                if self.stream._waiting and \
                        self.stream._waiting[0].out_offset <= ctx.point.out_offset:
                    return          # not yet: the stream is not far enough past it
            else:
                ctx.point = dataclasses.replace(ctx.point, window=t)
            self._untrimmed.popleft()

    def _context(self, start: int) -> int:
        p = self.stream.ix.points[self._last_point(start)]
        k = self._ctx_of.get(p.out_offset)
        if k is None:
            k = self._ctx_of[p.out_offset] = len(self.contexts)
            self.contexts.append(_Context(p))
            if self.stream.trim:
                self._untrimmed.append(k)
        return k

    def place(self, key: int, off: int, data: bytes | None, n: int, run: int) -> None:
        if data is None or run != 1:
            raise InputError("zran: holes are not stored data")       # sparse: refused
        end = self.reader.r.offset          # the chunk's data was just read
        start = end - n
        st = self.stats
        st["chunks_total"] += 1
        st["bytes_total"] += n
        dg = self.digest(data)
        sc = self.stored.get((dg, n))
        if sc is None:
            sc = self._new_chunk(dg, start, end)
            self.stored[(dg, n)] = sc
            self.file_off[id(sc)] = off
            st["chunks_new"] += 1
            st["bytes_new"] += n
        else:
            st["chunks_dedup"] += 1
        self.per_file.setdefault(key, []).append(sc)
        self.stream.prune(end)
        self._last_point(end)
        self._swap_trimmed()

    def _new_chunk(self, digest: bytes, start: int, end: int) -> StoredChunk:
        index = len(self.digests) // 32
        if index >= R.MAX_CHUNKS_PER_BLOB:
            raise InputError("zran: too many distinct chunks in one layer (2^24)")
        k = self._context(start)
        ctx = self.contexts[k]
        s = self.stream
        in_end = s.in_end(end)
        ctx.out_end = max(ctx.out_end, end)
        ctx.in_end = max(ctx.in_end, in_end)
        p = ctx.point
        if ctx.out_end - p.out_offset > R.ZRAN_MAX_CONTEXT_OUT \
                or ctx.in_end - p.in_offset > 0xFFFF_FFFF:
            raise InputError(f"zran: a deflate block of the layer near byte {p.in_offset} is "
                             "too long for an access point before this chunk")
        # coff: where the chunk's data starts coming out (interpolated, informative);
        # coff + csize: input that suffices for all of it (readers inflate from the
        # access point up to there)
        coff = max(p.in_offset, min(s.in_at(start), in_end - 1))
        csize = in_end - coff
        if csize > R.CI_V2_MAX_SIZE:
            raise InputError(f"zran: chunk at layer byte {start} needs {csize} compressed "
                             "bytes, more than a CI entry holds")
        usize = end - start
        flags = R.CI_V2_FLAG_COMPRESSED | R.CI_V2_FLAG_ZRAN
        self.ci += R.encode_ci_v2(self.upos, usize, coff, csize, flags,
                                  (k << 32) | (start - p.out_offset))
        self.digests += digest
        sc = StoredChunk(digest, -1, index, coff, csize, self.upos, usize)
        self.upos += round_up(usize, BLKSZ)
        return sc

    def context_table(self) -> bytes:
        """Context table | dictionary table (Nydus's order)."""
        recs, dicts, doff = [], [], 0
        for c in self.contexts:
            p = c.point
            window = self.stream.window_of(p)
            recs.append(R.ZranContext(
                in_offset=p.in_offset, out_offset=p.out_offset, dict_offset=doff,
                in_len=c.in_end - p.in_offset, out_len=c.out_end - p.out_offset,
                dict_size=len(window), ctx_byte=p.byte if p.bits else 0,
                ctx_bits=p.bits).encode())
            dicts.append(window)
            doff += len(window)
        return b"".join(recs) + b"".join(dicts)


def write_meta_blob(meta_dir: str, placer: ZranPlacer, layer_hex: str, layer_size: int,
                    chunk_size: int, digester: str) -> BlobInfo:
    """Write the layer's zran meta blob into META_DIR (named by its sha256) -> the blob
    table entry of the layer."""
    n = len(placer.digests) // 32
    ctx = placer.context_table()
    ci_raw = bytes(placer.ci) + ctx
    z = zstandard.ZstdCompressor(level=3).compress(ci_raw)
    ci_stored, ci_comp = (z, R.COMPRESSOR_CODES["zstd"]) if len(z) < len(ci_raw) \
        else (ci_raw, 0)
    features = R.BLOB_FEATURES_ZRAN
    hdr = R.BlobMetaHeader(
        magic=R.BLOB_META_MAGIC, features=features, ci_compressor=ci_comp, ci_entries=n,
        ci_offset=0, ci_compressed_size=len(ci_stored), ci_uncompressed_size=len(ci_raw),
        ctx_offset=len(placer.ci), ctx_size=len(ctx), ctx_count=len(placer.contexts),
        magic2=R.BLOB_META_MAGIC).encode()
    digests = bytes(placer.digests)
    parts = [ci_stored, hdr, R.tar_header(R.TOC_NAME_BLOB_META, len(ci_stored) + len(hdr))]
    dig_off = sum(map(len, parts))
    parts += [digests, R.tar_header(R.TOC_NAME_BLOB_DIGEST, len(digests))]
    sha = hashlib.sha256

    def entry(flags: int, name: bytes, data: bytes, off: int, size: int) -> R.TocEntry:
        return R.TocEntry(flags=flags, name=name, uncompressed_digest=sha(data).digest(),
                          compressed_offset=off, compressed_size=size,
                          uncompressed_size=len(data))

    toc = [entry(R.TOC_FLAG_ZSTD if ci_comp else R.TOC_FLAG_NONE, R.TOC_NAME_BLOB_META,
                 ci_raw, 0, len(ci_stored)),
           entry(R.TOC_FLAG_NONE, R.TOC_NAME_BLOB_META_HEADER, hdr, len(ci_stored),
                 len(hdr)),
           entry(R.TOC_FLAG_NONE, R.TOC_NAME_BLOB_DIGEST, digests, dig_off, len(digests))]
    toc_bytes = b"".join(e.encode() for e in toc)
    toc_bytes += R.tar_header(R.TOC_NAME_TOC, len(toc_bytes))
    parts.append(toc_bytes)
    blob = b"".join(parts)
    meta_hex = sha(blob).hexdigest()
    fd, tmp = create_exclusive(meta_dir, ".zran-meta-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, os.path.join(meta_dir, meta_hex))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return BlobInfo(
        blob_id=layer_hex, path=None, chunk_size=chunk_size, chunk_count=n,
        compressor="gzip", digester=digester, features=features,
        compressed_size=layer_size, uncompressed_size=placer.upos,
        toc_size=len(toc_bytes), toc_digest=sha(toc_bytes).digest(),
        ci_compressor=ci_comp, ci_offset=0, ci_compressed_size=len(ci_stored),
        ci_uncompressed_size=len(ci_raw), meta_digest=bytes.fromhex(meta_hex),
        meta_size=len(blob))


def _refuse_sparse(e: Entry) -> None:
    if e.sparse is not None:
        raise InputError(f"{_show(e.name)}: sparse file: its data is not one range of the "
                         "layer, which a zran index needs")


def pack_zran_layer(raw: ReadStream, layer_digest: str, layer_size: int, bootstrap: str,
                    meta_dir: str, *, chunk_size: int = R.CHUNK_SIZE_DEFAULT,
                    span: int = SPAN_DEFAULT, digester: str = "blake3",
                    max_size: int = DEFAULT_MAX_SIZE, whiteout_spec: str = "oci",
                    mark_implied: bool = True,
                    log: Callable[[str], object] | None = None) -> dict[str, Any]:
    """Index one gzip layer read from `raw` (its bytes, front to back): write its
    bootstrap and its zran meta blob (into META_DIR); -> summary dict."""
    t0 = time.monotonic()
    check_span(span, chunk_size)
    layer_hex = layer_digest.split(":", 1)[-1]
    stream = GzipIndexStream(raw, span)
    reader = TarReader(stream, max_size, oci=whiteout_spec == "oci")
    tree = TarTree(whiteout_spec, mark_implied=mark_implied)
    placer = ZranPlacer(stream, reader, digester)
    for item in stream_chunks(reader, tree, chunk_size, on_entry=_refuse_sparse):
        placer.place(*item)
    while stream.read(1 << 20):        # the tar's end blocks, gzip trailer, padding
        pass
    if stream.ix.total_in != layer_size:
        raise InputError(f"layer {layer_digest}: {stream.ix.total_in} bytes read, "
                         f"descriptor says {layer_size}")
    info = None
    if placer.digests:
        info = write_meta_blob(meta_dir, placer, layer_hex, layer_size, chunk_size, digester)
    opts = RP.PackOptions(chunk_size=chunk_size, digester=digester, compressor="gzip")
    nb = RP.bootstrap_nodes(1, 0, None, force_extended=True)
    _ids, keys, has_x = tree.emit(nb)
    per_node = {keys[k]: v for k, v in placer.per_file.items() if k in keys}
    walker = RP.TreeInfo(set(keys.values()), has_x)
    result = RP.write_bootstrap(nb, walker, bootstrap, opts, None, info, per_node,
                                placer.file_off, [], None)
    result.update(placer.stats)
    result.update(window_bytes=stream.window_bytes[0], window_bytes_trimmed=sum(
        len(stream.window_of(c.point)) for c in placer.contexts))
    result.update(entries=tree.entries, tar_bytes=reader.r.offset, contexts=len(
        placer.contexts), meta_blob=info.meta_digest.hex() if info else None,
        meta_size=info.meta_size if info else 0, seconds=round(time.monotonic() - t0, 3))
    return result
