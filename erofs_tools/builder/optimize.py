"""`erofs-tools optimize`: a RAFS v6 image reordered for a recorded access trace.

Input: a bootstrap, the directory holding its blobs, and an access trace
(`fscache-daemon trace`, fscache_daemon/trace.py: files and chunks in the order a
workload first read them). Output: a bootstrap for the same tree whose

- prefetch table lists the traced files, in first-access order (the table nydus-image
  writes: one u32 nid per entry, format/rafs.py), so a daemon fetches them first;
- data of the traced chunks lives in one new blob, in first-access order and back to
  back (the separated prefetch blob of nydusify's optimizer), so fetching what a start
  needs is a few large sequential range reads;
- every other chunk is referenced where it already is: the source blobs are kept in the
  blob table unchanged (the chunk-dict idea: nothing else is copied or re-uploaded).

No file data is decompressed except to verify it: a traced chunk's stored bytes are
copied from its source blob after its digest was checked. The tree (inodes, xattrs,
hardlinks, whiteouts, mtimes) is copied from the source bootstrap as it is, every inode
extended (merge.py does the same). Chunks with holes are not supported (our packer
never writes them).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from erofs_tools.builder import rafs as RP
from erofs_tools.builder.blob import BlobWriter, StoredChunk
from erofs_tools.builder.merge import _chunks, _compressor_of, _Layer, copy_inode
from erofs_tools.builder.node_chunks import ChunkRun, FileChunks
from erofs_tools.errors import CorruptImageError, ErofsToolsError, InputError
from erofs_tools.reader import blob as rblob
from erofs_tools.reader.image import Inode

MAX_TRACE = 256 << 20          # bytes of trace JSON read at most
# JSON values a trace may hold, counted before parsing (at most one per separator: ',',
# ':' or '['). Python pays ~80 bytes for the smallest (an empty object: 16 MiB of "{},"
# parsed into 445 MiB, so 256 MiB of it into ~7 GiB); a real trace holds one per ~12
# bytes (a chunk record is ~190 bytes and 16 values), so 8M is a ~100 MiB trace, some
# 600,000 traced chunks, and bounds a bomb to roughly what such a trace costs.
MAX_VALUES = 8_000_000


class Trace:
    """What optimize needs of an access trace: the files in first-access order and the
    chunks, each as (blob id, uncompressed offset), in first-access order."""

    def __init__(self, paths: list[bytes], chunks: list[tuple[str, int]],
                 blob_ids: list[str]) -> None:
        self.paths = paths
        self.chunks = chunks
        self.blob_ids = blob_ids

    @classmethod
    def load(cls, path: str) -> Trace:
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_TRACE + 1)
        except OSError as e:
            raise InputError(f"cannot read trace {path}: {e.strerror}") from None
        if len(raw) > MAX_TRACE:
            raise InputError(f"trace {path}: larger than {MAX_TRACE} bytes")
        if sum(raw.count(c) for c in (b",", b":", b"[")) >= MAX_VALUES:
            raise InputError(f"trace {path}: more than {MAX_VALUES} JSON values")
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError(f"trace {path}: not JSON ({e})") from None
        except RecursionError:
            raise InputError(f"trace {path}: not a trace (JSON nested too deeply)") from None
        try:
            return cls.from_json(doc)
        except InputError as e:
            raise InputError(f"trace {path}: {e}") from None

    @classmethod
    def from_json(cls, doc: Any) -> Trace:
        def bad(why: str) -> InputError:
            return InputError(f"not an access trace: {why}")
        if not isinstance(doc, dict) or doc.get("version") != 1:
            raise bad("no version 1 trace object")
        image = doc.get("image")
        blob_ids = image.get("blobs") if isinstance(image, dict) else None
        if not isinstance(blob_ids, list) or not all(isinstance(b, str) for b in blob_ids):
            raise bad("image.blobs is not a list of blob ids")
        entries = doc.get("entries")
        if not isinstance(entries, list):
            raise bad("entries is not a list")
        paths: dict[bytes, None] = {}       # in first-access order, each once
        timed: list[tuple[float, int, str, int]] = []
        for n, e in enumerate(entries):
            if not isinstance(e, dict) or not isinstance(e.get("path"), str) \
                    or not isinstance(e.get("chunks"), list):
                raise bad(f"entry {n} has no path and chunks")
            try:
                paths.setdefault(os.fsencode(e["path"]), None)
            except UnicodeError:    # a lone surrogate no file name decodes to
                raise bad(f"entry {n}: its path is no file name") from None
            for c in e["chunks"]:
                try:
                    b, off, t = c["blob"], c["uncompressed_offset"], c["first_access"]
                    # a time as float (an integer of 400 digits raised OverflowError
                    # out of here), finite (json reads NaN and Infinity: unsortable)
                    ok = (isinstance(b, int) and isinstance(off, int) and
                          isinstance(t, (int, float)) and 0 <= b < len(blob_ids) and
                          off >= 0 and math.isfinite(t := float(t)))
                except (TypeError, KeyError, OverflowError):
                    ok = False
                if not ok:
                    raise bad(f"entry {n} ({e['path']}) has a malformed chunk")
                timed.append((t, len(timed), blob_ids[b], off))
        timed.sort()
        seen: set[tuple[str, int]] = set()
        chunks = []
        for _t, _n, bid, off in timed:
            if (bid, off) not in seen:
                seen.add((bid, off))
                chunks.append((bid, off))
        return cls(list(paths), chunks, blob_ids)


def optimize(source: str, output: str, blob_dir: str, trace: Trace,
             out_blob_dir: str | None = None) -> RP.PackResult:
    """Write OUTPUT: SOURCE with the prefetch table and prefetch blob of `trace`. The
    source blobs are read from BLOB_DIR (named by blob id); the new blob is written to
    OUT_BLOB_DIR (default BLOB_DIR). -> summary dict."""
    if os.path.abspath(output) == os.path.abspath(source):
        raise InputError(f"{output}: output would overwrite the source bootstrap")
    layer = _Layer(0, source)
    try:
        return _optimize(layer, output, blob_dir, out_blob_dir or blob_dir, trace)
    except ErofsToolsError:
        layer.img.check_unchanged()     # an error from bytes that changed: that change
        raise
    finally:
        layer.close()


def _optimize(L: _Layer, output: str, blob_dir: str, out_dir: str,
              trace: Trace) -> RP.PackResult:
    t = L.tables
    blobs = list(t.blobs)
    by_id = {b.blob_id: i for i, b in enumerate(blobs)}
    strangers = [b for b in trace.blob_ids if b not in by_id]
    if strangers:
        raise InputError(f"{L.path}: the trace was recorded on another image (blob "
                         f"{strangers[0][:16]} is not in its blob table)")
    L.blob_map = {i: i for i in range(len(blobs))}
    chunk_size = t.ext.s_chunk_size
    compressor = _compressor_of(t.ext.s_flags)
    nprefetch = len(trace.paths)
    nb = RP.bootstrap_nodes(len(blobs) + 1, nprefetch, L.img.sb.build_time,
                            force_extended=True)
    tree = _Tree(L, nb, chunk_size.bit_length() - 1)
    tree.copy()

    # -- the prefetch table: the traced files, first access first ------------------------
    prefetch_nodes: list[int] = []
    for p in trace.paths:
        n = tree.nodes_by_path.get(b"/" + p.strip(b"/"))
        if n is None:
            raise InputError(f"{L.path}: traced file {os.fsdecode(p)} is not in the image")
        if n not in prefetch_nodes:
            prefetch_nodes.append(n)

    # -- the prefetch blob: traced chunks, verified, in first-access order ----------------
    placed = {(sc.blob_index, sc.uncompressed_offset): sc for sc in tree.scs.values()}
    todo: list[StoredChunk] = []
    for bid, off in trace.chunks:
        sc = placed.get((by_id[bid], off))
        if sc is None:
            raise InputError(f"{L.path}: traced chunk at {off} of blob {bid[:16]} belongs "
                             "to no file of the image")
        todo.append(sc)
    if not todo:
        raise InputError("the trace lists no chunk: nothing to put first")
    algos = {blobs[sc.blob_index].compressor for sc in todo}
    if len(algos) != 1:
        raise InputError(f"{L.path}: traced chunks come from blobs with different "
                         f"compressors ({', '.join(sorted(algos))}); not supported")
    writer = BlobWriter(out_dir, chunk_size, algos.pop(), t.digester, blob_index=-1)
    moved: dict[int, StoredChunk] = {}          # id(source chunk) -> its copy
    try:
        _copy_chunks(todo, blobs, blob_dir, L, writer, moved)
        new_info = writer.finish(commit=False)
        for node, chunks in tree.per_node.items():
            tree.per_node[node] = _relocated(chunks, moved, tree.file_off)
        opts = RP.PackOptions(chunk_size=chunk_size, digester=t.digester,
                              compressor=compressor)
        L.img.check_unchanged()     # truncated or rewritten while read: no output
        result = RP.write_bootstrap(nb, RP.TreeInfo(tree.regular, tree.has_xattrs), output,
                                    opts, None, new_info, tree.per_node, tree.file_off,
                                    prefetch_nodes, L.img.sb.build_time, blob_list=blobs)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    result.update(source=L.path, prefetch_files=len(prefetch_nodes),
                  prefetch_chunks=len(todo),
                  prefetch_bytes=sum(sc.compressed_size for sc in todo),
                  reused_chunks=len(tree.scs) - len(todo),
                  prefetch_blob=new_info.blob_id if new_info else None)
    return result


def _copy_chunks(todo: Sequence[StoredChunk], blobs: list, blob_dir: str, L: _Layer,
                 writer: BlobWriter, moved: dict[int, StoredChunk]) -> None:
    """Append the stored bytes of `todo` to `writer`, each checked against its digest."""
    metas: dict[int, rblob.BlobMeta] = {}
    files: dict[int, Any] = {}
    try:
        for sc in todo:
            bi = sc.blob_index
            if bi not in files:
                path = os.path.join(blob_dir, blobs[bi].blob_id)
                metas[bi] = blobs[bi].read_meta(path, L.tables.chunk_digests(bi))
                files[bi] = open(path, "rb")
            meta = metas[bi]
            c = meta.chunk_by_index(sc.index)
            if (c.uncompressed_offset, c.compressed_offset, c.compressed_size) != \
                    (sc.uncompressed_offset, sc.compressed_offset, sc.compressed_size):
                raise CorruptImageError(f"blob {blobs[bi].blob_id[:16]}: chunk {sc.index} "
                                        "differs from the bootstrap's chunk table")
            raw = os.pread(files[bi].fileno(), c.compressed_size, c.compressed_offset)
            rblob.decode_chunk(meta, c, raw)       # raises on a digest mismatch
            moved[id(sc)] = writer.add_chunk(raw, sc.uncompressed_size, sc.digest)
    finally:
        for f in files.values():
            f.close()


def _relocated(chunks: FileChunks, moved: dict[int, StoredChunk],
               file_off: dict[int, int]) -> FileChunks:
    out: FileChunks = []
    for c in chunks:
        old = c.chunk if isinstance(c, ChunkRun) else c
        new = moved.get(id(old))
        if new is None:
            out.append(c)
            continue
        file_off.setdefault(id(new), file_off.get(id(old), 0))
        out.append(ChunkRun(new, c.count) if isinstance(c, ChunkRun) else new)
    return out


class _Tree:
    """The source tree copied into a new node graph, as it is (no whiteout handling:
    one image, not layers)."""

    def __init__(self, L: _Layer, nb: RP.BootstrapNodes, chunk_bits: int) -> None:
        self.L = L
        self.nb = nb
        self.chunk_bits = chunk_bits
        self.ids: dict[int, int] = {}                  # source nid -> node (hardlinks)
        self.scs: dict[tuple[int, int], StoredChunk] = {}
        self.per_node: dict[int, FileChunks] = {}
        self.file_off: dict[int, int] = {}
        self.regular: set[int] = set()
        self.nodes_by_path: dict[bytes, int] = {}      # regular files, b"/a/b"
        self.has_xattrs = False

    def _add(self, ino: Inode, path: bytes) -> int:
        img, nb = self.L.img, self.nb
        if not ino.is_dir():
            n = self.ids.get(ino.nid)
            if n is not None:
                return n
        try:
            n, has_x = copy_inode(nb, img, ino)
            self.has_xattrs |= has_x
            if ino.is_reg():
                self.regular.add(n)
                self.per_node[n] = _chunks(self.L, ino, self.chunk_bits, self.scs,
                                           self.file_off, path)
        except (CorruptImageError, InputError) as e:
            raise type(e)(f"{self.L.path}: {os.fsdecode(path)}: {e}") from None
        if not ino.is_dir():
            self.ids[ino.nid] = n
        return n

    def copy(self) -> None:
        img = self.L.img
        root = img.inode(img.root_nid)
        rid = self._add(root, b"/")
        self.nb.set_root(rid)
        stack = [(root, rid, b"")]
        seen = {img.root_nid}
        while stack:
            dino, did, path = stack.pop()
            for d in sorted(img.listdir(dino), key=lambda d: d.name):
                ino = img.inode(d.nid)
                cpath = path + b"/" + d.name
                if ino.is_dir():
                    if d.nid in seen:
                        raise CorruptImageError(f"{self.L.path}: {os.fsdecode(cpath)}: "
                                                "directory linked twice")
                    seen.add(d.nid)
                cid = self._add(ino, cpath)
                self.nb.add_child(did, d.name, cid)
                if ino.is_reg():
                    self.nodes_by_path.setdefault(cpath, cid)
                if ino.is_dir():
                    stack.append((ino, cid, cpath))
