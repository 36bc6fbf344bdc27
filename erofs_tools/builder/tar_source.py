"""Tar layers as a tree source: `erofs-tools pack --type tar|targz SOURCE`.

The tar stream (a file or stdin, plain or gzip) is read once, front to back, by a small
parser of our own (so every size is bounded before anything is allocated) and never
extracted: entries build an in-memory tree (`TarTree`), regular file data is cut into
chunks as it streams past and handed to the chunk pipeline (chunker.ChunkPipeline, the
same as for directories: hash + compress in worker threads, then the blob writer), and
when the stream ends the tree is emitted into the C node-graph builder exactly like
the directory walk does for `pack`, with chunk indexes
from the chunks stored. Nothing of the layer is written to disk except the blob.

Modules: `tar_stream` (input streams and decompression), `tar_reader` (the bounded
tar parser and the formats it reads), `tar_tree` (the in-memory tree and its rules),
this one (cutting streamed file data into chunks, and the pack driver).

Hostile input (see docs/tar.md): leading '/' and '.' components are dropped, '..' is an
error, paths never traverse symlinks or files (error), duplicate entries: the later one
wins (a directory over a directory updates its metadata and keeps the children),
hardlinks must name an earlier non-directory entry, truncated streams and bad
checksums are errors, and the bytes read from the (decompressed) stream are bounded by
`max_size`, so a gzip bomb ends with an error instead of filling memory or disk.

Whiteouts (`whiteout_spec`): "oci" turns `.wh.NAME` into an overlayfs whiteout (char
device 0:0 NAME, unless NAME itself is in the same layer, which the OCI spec says wins)
and `.wh..wh..opq` into `trusted.overlay.opaque=y` on its directory; other `.wh..wh.*`
entries (aufs metadata) are dropped. "overlayfs" and "none" keep every entry as it is.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, BinaryIO

from erofs_tools.builder.chunk_dict import ChunkDict
from erofs_tools.builder.chunker import StreamItem
from erofs_tools.builder.rafs_walk import normalize_prefetch
from erofs_tools.builder.tar_reader import DEFAULT_MAX_SIZE, TarReader, _err, _show  # noqa: F401
from erofs_tools.builder.tar_stream import (  # noqa: F401
    SOURCE_TYPES,
    _Prefetch,
    detect_type,
    drain,
    open_source,
    open_stream,
)
from erofs_tools.builder.tar_tree import WHITEOUT_SPECS, TarTree  # noqa: F401
from erofs_tools.errors import InputError

if TYPE_CHECKING:
    from _typeshed import StrOrBytesPath, StrPath

    from erofs_tools.builder.options import Progress
    from erofs_tools.builder.rafs import PackOptions, PackResult
    from erofs_tools.builder.tar_reader import Entry

# the pack driver, plus the names callers have always taken from here
__all__ = ["pack_tar", "stream_chunks", "TarReader",
           "TarTree", "open_stream", "open_source", "detect_type", "DEFAULT_MAX_SIZE",
           "SOURCE_TYPES", "WHITEOUT_SPECS"]


# --- file data cut into chunk items for chunker.ChunkPipeline.run_stream ---------------

def stream_chunks(reader: TarReader, tree: TarTree, chunk_size: int,
                  on_entry: Callable[[Entry], object] | None = None) -> Iterator[StreamItem]:
    """Generator: read every entry, build `tree`, yield chunk items of regular files."""
    cs = chunk_size
    apparent = 0
    for e in reader:
        node = tree.add(e)
        if on_entry is not None:
            on_entry(e)
        if node is None or node.key is None:        # add() returns only keyed nodes
            continue
        size = node.size
        apparent += size          # sparse holes count too: they cost chunk indexes
        if apparent > reader.r.limit:
            raise _err(f"{_show(e.name)}: file sizes add up to more than the limit of "
                       f"{reader.r.limit} bytes (--max-size)")
        key = node.key
        if e.sparse is None:
            off = 0
            while off < size:
                n = min(cs, size - off)
                yield key, off, reader.read_data(n), n, 1
                off += n
            continue
        regions = e.sparse
        ri = 0
        off = 0
        while off < size:
            n = min(cs, size - off)
            end = off + n
            while ri < len(regions) and regions[ri][0] + regions[ri][1] <= off:
                ri += 1
            if ri >= len(regions) or regions[ri][0] >= end:
                # in a hole: every whole chunk up to the next data region is one item
                hole_end = min(regions[ri][0] if ri < len(regions) else size, size)
                run = (hole_end - off) // cs if n == cs else 1
                yield key, off, None, n, run
                off += n * run
                continue
            else:
                buf = bytearray(n)
                j = ri
                while j < len(regions) and regions[j][0] < end:
                    a, ln = regions[j]
                    lo, hi = max(a, off), min(a + ln, end)
                    if hi > lo:
                        buf[lo - off:hi - off] = reader.read_data(hi - lo)
                    if a + ln > end:
                        break
                    j += 1
                yield key, off, bytes(buf), n, 1
            off = end
    tree.finish()


# --- pack driver ---------------------------------------------------------------------------

def pack_tar(source: StrOrBytesPath | BinaryIO, bootstrap: StrPath, blob_dir: StrPath,
             opts: PackOptions | None = None, source_type: str = "auto",
             whiteout_spec: str = "oci", max_size: int = DEFAULT_MAX_SIZE,
             progress: Progress | None = None, mark_implied: bool = False) -> PackResult:
    """Build BOOTSTRAP and one blob in BLOB_DIR from a tar stream; -> summary dict.

    `source`: a path, '-' (stdin) or a binary file object; `source_type`: tar, targz,
    tarzst or auto (by magic). `mark_implied`: give directories that have no entry of
    their own the IMPLIED_XATTR marker, so that `merge` keeps the lower layers' metadata
    for them (what `convert` does for every layer)."""
    from erofs_tools.builder import rafs as RP
    opts = opts or RP.PackOptions()
    opts.check()
    t0 = time.monotonic()
    bootstrap, blob_dir = os.fspath(bootstrap), os.fspath(blob_dir)
    try:                      # like pack (and nydus-image): create a missing blob dir
        os.makedirs(blob_dir, exist_ok=True)
    except OSError as e:
        raise InputError(f"blob directory {blob_dir}: {e.strerror}") from None
    if whiteout_spec not in WHITEOUT_SPECS:
        raise InputError(f"unknown whiteout spec {whiteout_spec!r} "
                         "(choose oci, overlayfs or none)")
    cdict = ChunkDict(opts.chunk_dicts, opts.digester, opts.chunk_size)
    prefetch = normalize_prefetch(opts.prefetch)
    from erofs_tools.builder.options import MkfsOptions
    mtimes = MkfsOptions(timestamp=opts.timestamp).inode_mtimes()
    ts = mtimes.time if mtimes is not None else None

    if isinstance(source, (str, bytes, os.PathLike)):
        raw, close = open_source(source)
        name = os.fsdecode(source)
    else:
        raw, close, name = source, (lambda: None), getattr(source, "name", "<stream>")
    tree = TarTree(whiteout_spec, timestamp=ts, mark_implied=mark_implied,
                   clamp=mtimes is not None and mtimes.clamp)
    stream = None
    placer = RP.ChunkPlacer(opts, blob_dir, cdict)
    writer = placer.writer
    try:
        try:
            stream = open_stream(raw, source_type)
            reader = TarReader(stream, max_size, oci=whiteout_spec == "oci")
            for r in placer.pipe.run_stream(stream_chunks(reader, tree, opts.chunk_size)):
                placer.place(r)
            if isinstance(stream, _Prefetch):   # on to the gzip/zstd checks (tar_stream)
                drain(stream, max_size - reader.r.offset)
        finally:
            if hasattr(stream, "close") and isinstance(stream, _Prefetch):
                stream.close()
            close()
        new_info = writer.finish(commit=False)
    except BaseException:
        writer.abort()
        raise

    try:
        nb = RP.bootstrap_nodes(len(cdict.blobs) + 1, len(prefetch), ts,
                                force_extended=True)
        ids, keys, has_x = tree.emit(nb)
        walker = RP.TreeInfo(set(keys.values()), has_x)
        prefetch_nodes = []
        for rel in prefetch:
            n = tree._lookup(rel.split(b"/")) if rel else tree.root
            if n is None:
                raise InputError(f"prefetch path /{os.fsdecode(rel)} is not in the archive")
            if ids[id(n)] not in prefetch_nodes:
                prefetch_nodes.append(ids[id(n)])
        result = RP.write_bootstrap(nb, walker, bootstrap, opts, cdict, new_info,
                                    placer.refs, {}, prefetch_nodes, ts, node_of=keys)
        if new_info is not None:
            writer.commit()
    except BaseException:
        writer.abort()
        raise
    result.update(placer.stats)
    result["entries"] = tree.entries
    result["tar_bytes"] = reader.r.offset
    result["seconds"] = round(time.monotonic() - t0, 3)
    result["source"] = name
    result["whiteout_spec"] = whiteout_spec
    return result
