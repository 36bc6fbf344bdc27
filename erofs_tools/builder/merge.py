"""`erofs-tools merge`: flatten RAFS v6 layer bootstraps into one bootstrap.

Layers are applied lowest first, as overlayfs would show them (docs/tar.md):

- a whiteout (char device 0:0) in a layer removes NAME from the layers below and is not
  itself shown; with whiteout_spec "oci", entries named `.wh.NAME` do the same and
  `.wh..wh..opq` makes its directory opaque;
- a directory with `trusted.overlay.opaque=y` hides everything below it (only the
  layer's own children remain); the xattr itself is not kept in the merged image;
- a directory over a directory merges the two, with the upper one's metadata and
  xattrs, unless the upper one is implied (marked IMPLIED_XATTR by the tar source: the
  layer has no entry of its own for it), which keeps the metadata from below, as
  extracting the layers in order does; an implied directory over a symlink that leads
  to a directory below puts its entries into that directory (the symlink stays), as
  containerd and umoci resolve an entry's parents; anything else replaces what was
  below (a file over a directory drops the directory's subtree, a directory over a file
  replaces the file);
- hardlinks inside one layer stay hardlinks (one inode, nlink = links that survive).

No data is read or copied: every regular file keeps its chunk indexes, only the device
ids change. The blob table is the union of every layer's blob table in layer order (a
blob listed by several layers, e.g. through a chunk dict, appears once), so the merged
image references every layer's blob, including those whose files were all whited out.
`blob_ids` renames blobs (old id -> new id), e.g. to the sha256 of the blob file, which
is how a blob is named in a registry (rafs-v6.md §11).
"""
from __future__ import annotations

import copy
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from erofs_tools.builder import rafs as RP
from erofs_tools.builder.blob import BlobInfo, StoredChunk
from erofs_tools.builder.chunk_dict import BootstrapTables
from erofs_tools.builder.node_chunks import ChunkRun, FileChunks
from erofs_tools.builder.tar_reader import _show
from erofs_tools.builder.whiteout import IMPLIED_XATTR as IMPLIED
from erofs_tools.builder.whiteout import OPAQUE_XATTR as OPAQUE
from erofs_tools.builder.whiteout import classify, is_implied, is_opaque, is_overlay_whiteout
from erofs_tools.errors import CorruptImageError, ErofsToolsError, InputError
from erofs_tools.format import erofs as E
from erofs_tools.format import rafs as R
from erofs_tools.reader.image import Image, Inode

if TYPE_CHECKING:
    from _typeshed import StrPath

    from erofs_tools._native import NativeBuilder

MERGE_WHITEOUT_SPECS = ("overlayfs", "oci")


def _is_hex_id(s: str) -> bool:
    return len(s) == 64 and all(c in "0123456789abcdef" for c in s)


class _M:
    """A merged entry: metadata source (layer, inode) and, for directories, children."""
    __slots__ = ("layer", "ino", "children")

    def __init__(self, layer: _Layer, ino: Inode, children: dict[bytes, _M] | None = None
                 ) -> None:
        self.layer = layer
        self.ino = ino
        self.children = children


def _kids(m: _M) -> dict[bytes, _M]:
    """The children of `m`, an entry the caller knows to be a directory."""
    assert m.children is not None, "not a directory"
    return m.children


def _is_whiteout(ino: Inode) -> bool:
    return is_overlay_whiteout(ino.mode, ino.rdev if ino.is_dev() else (1, 1))


def _compressor_of(flags: int) -> str:
    for name, bit in R.COMPRESSION_FLAGS.items():
        if flags & bit:
            return name
    return "none"


class _Layer:
    def __init__(self, index: int, path: str) -> None:
        self.index = index
        self.path = path
        self.img = Image(path)      # first: its check before the commit covers the tables
        try:
            self.tables = BootstrapTables.read(path)
            if not self.img.is_rafs:
                raise InputError(f"{path}: not a RAFS v6 bootstrap")
        except BaseException:
            self.img.close()
            raise
        self.chunks = {(c.blob_index, c.index): c for c in self.tables.chunks}
        self.blob_map: dict[int, int] = {}          # local blob index -> merged index

    def close(self) -> None:
        self.img.close()


def merge(bootstraps: Sequence[StrPath], output: str, blob_ids: Mapping[str, str] | None = None,
          whiteout_spec: str = "overlayfs", timestamp: int | None = None) -> RP.PackResult:
    """Write OUTPUT merged from BOOTSTRAPS (lowest first); -> summary dict."""
    if not bootstraps:
        raise InputError("merge needs at least one bootstrap")
    if whiteout_spec not in MERGE_WHITEOUT_SPECS:
        raise InputError(f"unknown whiteout spec {whiteout_spec!r} (choose overlayfs or oci)")
    blob_ids = dict(blob_ids or {})
    for old, new in blob_ids.items():
        if not _is_hex_id(new):
            raise InputError(f"blob id {new!r} for {old} is not 64 lowercase hex digits")
    out_abs = os.path.abspath(output)
    layers: list[_Layer] = []
    try:
        for i, p in enumerate(bootstraps):
            if os.path.abspath(p) == out_abs:
                raise InputError(f"{output}: output would overwrite an input bootstrap")
            layers.append(_Layer(i, os.fspath(p)))
        return _merge(layers, output, blob_ids, whiteout_spec, timestamp)
    except ErofsToolsError:
        for L in layers:        # an error from bytes that changed under us: that change
            L.img.check_unchanged()
        raise
    finally:
        for L in layers:
            L.close()


def _physical(b: BlobInfo) -> tuple:
    """What every description of one blob must agree on."""
    return (b.chunk_size, b.chunk_count, b.compressor, b.digester, b.compressed_size,
            b.uncompressed_size)


def _merge(layers: list[_Layer], output: str, blob_ids: dict[str, str], whiteout_spec: str,
           timestamp: int | None) -> RP.PackResult:
    # -- common parameters ---------------------------------------------------------------
    params: tuple[int, str, str] | None = None      # chunk size, digester, compressor
    for L in layers:
        ext = L.tables.ext
        dg = L.tables.digester
        if L.tables.blobs or L.tables.chunks:
            if params is None:
                params = (ext.s_chunk_size, dg, _compressor_of(ext.s_flags))
            elif ext.s_chunk_size != params[0]:
                raise InputError(f"{L.path}: chunk size {ext.s_chunk_size} differs from "
                                 f"{params[0]} of the layers below")
            elif dg != params[1]:
                raise InputError(f"{L.path}: {dg} chunk digests differ from the {params[1]} "
                                 "of the layers below")
    if params is None:
        top_t = layers[-1].tables
        params = (top_t.ext.s_chunk_size or R.CHUNK_SIZE_DEFAULT, top_t.digester,
                  _compressor_of(top_t.ext.s_flags))
    chunk_size, digester, compressor = params

    # -- blob table: union in layer order --------------------------------------------------
    blobs: list[BlobInfo] = []
    by_id: dict[str, int] = {}          # blob id -> merged index
    for L in layers:
        for i, b in enumerate(L.tables.blobs):
            new_id = blob_ids.get(b.blob_id, b.blob_id)
            g = by_id.get(new_id)
            if g is None:
                g = by_id[new_id] = len(blobs)
                nb_ = copy.copy(b)
                nb_.blob_id = new_id
                blobs.append(nb_)
            elif _physical(blobs[g]) != _physical(b):
                # one id, two blobs: the chunks of the second would index the first
                raise CorruptImageError(
                    f"{L.path}: blob {i} ({new_id[:16]}) is described differently by "
                    "another blob-table entry of the same id (sizes, chunk count or "
                    "algorithms)")
            L.blob_map[i] = g
    if len(blobs) > R.MAX_BLOBS:
        raise InputError(f"merged image would reference {len(blobs)} blobs "
                         f"(at most {R.MAX_BLOBS})")

    # -- the merged tree -----------------------------------------------------------------
    top = layers[-1]
    root = _M(top, top.img.inode(top.img.root_nid), {})
    for li, L in enumerate(layers):
        img = L.img
        rino = img.inode(img.root_nid)
        rx = img.xattrs(rino)
        if li == 0 or not is_implied(rx):
            root.layer, root.ino = L, rino
        if is_opaque(rx):
            _kids(root).clear()
        # (merged directory, the layer's inode, path in the layer, where the merged
        # directory is in the merged tree: differs from the path through a symlink)
        stack: list[tuple[_M, Inode, bytes, list[bytes]]] = [(root, rino, b"/", [])]
        seen_dirs = {img.root_nid}
        while stack:
            mdir, dino, path, real = stack.pop()
            kids = _kids(mdir)
            ents = img.listdir(dino)
            whiteouts: list[bytes] = []
            opaque = False
            keep = []
            for d in ents:
                ino = img.inode(d.nid)
                if _is_whiteout(ino):
                    whiteouts.append(d.name)
                elif whiteout_spec == "oci" and classify(d.name)[0] is not None:
                    kind, target = classify(d.name)
                    if kind == "opaque":
                        opaque = True
                    elif kind == "whiteout" and target is not None:   # always set then
                        whiteouts.append(target)
                else:
                    keep.append((d, ino))
            if opaque:
                kids.clear()
            for name in whiteouts:
                kids.pop(name, None)
            for d, ino in keep:
                cpath = path + d.name if path.endswith(b"/") else path + b"/" + d.name
                old = kids.get(d.name)
                if ino.is_dir():
                    if d.nid in seen_dirs:
                        raise CorruptImageError(f"{L.path}: {_show(cpath)}: directory "
                                                "linked twice")
                    seen_dirs.add(d.nid)
                    xs = img.xattrs(ino)
                    op = is_opaque(xs)
                    if old is not None and old.children is None and is_implied(xs) \
                            and not op and stat.S_ISLNK(old.ino.mode):
                        # the layer has entries below a path a layer below has as a
                        # symlink, and no entry of its own for it: containerd's applier
                        # and umoci resolve an entry's parents in the rootfs, symlinks
                        # followed inside it, so the entries land in the directory the
                        # symlink leads to (merged /usr: lib -> usr/lib) and the symlink
                        # stays; missing directories on its way are made, with the
                        # metadata of the layer's implied directory. Leading to a
                        # non-directory: replaced, as before; so is an opaque one (the layer whited the symlink out:
                        # `.wh.lib` then `lib/x` is a new directory lib)
                        found = _resolve(root, real, old.layer.img.readlink(old.ino),
                                         _maker(L, ino))
                        if found is not None:
                            stack.append((found[0], ino, cpath, found[1]))
                            continue
                    # the directory below, if what is below is one
                    below = old if old is not None and old.children is not None else None
                    if below is not None and not op:
                        if not is_implied(xs):
                            below.layer, below.ino = L, ino
                        node = below
                    else:
                        # an implied directory over one below keeps its metadata, as
                        # containerd's applier copies it up (docs/tar.md)
                        meta = ((below.layer, below.ino) if below is not None and is_implied(xs)
                                else (L, ino))
                        node = _M(meta[0], meta[1], {})
                        kids[d.name] = node
                    stack.append((node, ino, cpath, real + [d.name]))
                else:
                    kids[d.name] = _M(L, ino)

    # -- emit ----------------------------------------------------------------------------
    build_time = timestamp if timestamp is not None else max(
        L.img.sb.build_time for L in layers)
    nb = RP.bootstrap_nodes(len(blobs), 0, build_time, force_extended=True)
    chunk_bits = chunk_size.bit_length() - 1
    ids: dict[tuple[int, int], int] = {}     # (layer, nid) of non-directories -> node
    scs: dict[tuple[int, int], StoredChunk] = {}     # (merged blob, ci index) -> chunk
    per_node: dict[int, FileChunks] = {}
    file_off: dict[int, int] = {}
    regular: set[int] = set()
    has_x = False

    def add(m: _M, path: bytes) -> tuple[int, bool]:
        nonlocal has_x
        L, ino = m.layer, m.ino
        key = (L.index, ino.nid)
        if m.children is None:
            n = ids.get(key)
            if n is not None:
                return n, False
        try:
            # a merged directory drops its layer's opaque and implied-parent markers
            n, x = copy_inode(nb, L.img, ino,
                              _MARKERS if m.children is not None else frozenset())
            has_x |= x
            if ino.is_reg():
                regular.add(n)
                per_node[n] = _chunks(L, ino, chunk_bits, scs, file_off, path)
        except (CorruptImageError, InputError) as e:
            raise type(e)(f"{L.path}: {_show(path)}: {e}") from None
        if m.children is None:
            ids[key] = n
        return n, True

    rid, _ = add(root, b"/")
    nb.set_root(rid)
    estack = [(root, rid, b"")]
    while estack:
        m, mid, path = estack.pop()
        kids = _kids(m)
        for name in sorted(kids):
            c = kids[name]
            cpath = path + b"/" + name
            cid, new = add(c, cpath)
            nb.add_child(mid, name, cid)
            if c.children is not None:
                estack.append((c, cid, cpath))

    opts = RP.PackOptions(chunk_size=chunk_size, digester=digester, compressor=compressor)
    for L in layers:    # truncated or rewritten while read (reader/mapped.py): no output
        L.img.check_unchanged()
    result = RP.write_bootstrap(nb, RP.TreeInfo(regular, has_x), output, opts, None, None,
                                per_node, file_off, [], build_time, blob_list=blobs)
    result["layers"] = [L.path for L in layers]
    return result


_MARKERS = frozenset((OPAQUE, IMPLIED))
_MAX_SYMLINK_HOPS = 40          # as the kernel's path walk (ELOOP)


def _maker(layer: _Layer, ino: Inode) -> Callable[[], _M]:
    """-> a maker of new, empty merged directories with this metadata (each its own)."""
    return lambda: _M(layer, ino, {})


def _resolve(root: _M, base: list[bytes], target: bytes, make: Callable[[], _M]
             ) -> tuple[_M, list[bytes]] | None:
    """The merged directory a symlink in directory `base` (components from the root)
    with `target` leads to, resolved inside the merged tree as containerd's and umoci's
    appliers resolve inside the rootfs: an absolute target starts at the root, '..'
    stops at it, symlinks on the way are followed, and missing directories are made
    (`make()`, as their MkdirAll does for a dangling symlink). -> (directory, its
    components), or None when it leads to a non-directory or loops (nothing made)."""
    chain: list[_M | None] = [root]      # None: a directory to make
    parts: list[bytes] = []
    for c in base:
        cur = chain[-1]
        nxt = _kids(cur).get(c) if cur is not None else None
        if nxt is None or nxt.children is None:
            return None
        chain.append(nxt)
        parts.append(c)
    pending = list(reversed(target.split(b"/")))
    if target.startswith(b"/"):
        del chain[1:], parts[:]
    hops = 0
    while pending:
        c = pending.pop()
        if c in (b"", b"."):
            continue
        if c == b"..":
            if parts:
                chain.pop()
                parts.pop()
            continue
        cur = chain[-1]
        nxt = _kids(cur).get(c) if cur is not None else None
        if nxt is None or nxt.children is not None:
            chain.append(nxt)
            parts.append(c)
            continue
        if not stat.S_ISLNK(nxt.ino.mode):
            return None
        hops += 1
        if hops > _MAX_SYMLINK_HOPS:
            return None
        link = nxt.layer.img.readlink(nxt.ino)
        if link.startswith(b"/"):
            del chain[1:], parts[:]
        pending.extend(reversed(link.split(b"/")))
    made = chain[0]
    assert made is not None, "the root is never made"
    for c, m in zip(parts, chain[1:]):
        if m is None:
            m = _kids(made)[c] = make()
        made = m
    return made, parts


def copy_inode(nb: NativeBuilder, img: Image, ino: Inode,
               skip_xattrs: frozenset[bytes] = frozenset()) -> tuple[int, bool]:
    """A node of `nb` with inode `ino` of `img`'s metadata: mode, owner, times, size,
    device numbers, symlink target and xattrs (but `skip_xattrs`); data and directory
    entries are the caller's. -> (node, whether it got an xattr)."""
    rdev = ino.rdev if ino.is_dev() else (0, 0)
    size = ino.size if (ino.is_reg() or ino.is_lnk()) else 0
    n = nb.add_node(ino.mode, ino.uid, ino.gid, ino.mtime, ino.mtime_nsec, size,
                    rdev[0], rdev[1])
    if ino.is_lnk():
        nb.set_bytes(n, img.readlink(ino))
    has_x = False
    for xn, xv in img.xattrs(ino):
        if xn not in skip_xattrs:
            nb.add_xattr(n, xn, xv)
            has_x = True
    return n, has_x


def _chunks(L: _Layer, ino: Inode, chunk_bits: int, scs: dict[tuple[int, int], StoredChunk],
            file_off: dict[int, int], path: bytes) -> FileChunks:
    out: FileChunks = []
    size = ino.size
    if size == 0:
        return out
    if ino.layout != E.LAYOUT_CHUNK_BASED:
        raise CorruptImageError("regular file is not chunk-based")
    for ref in L.img.chunks(ino, chunk_bits=chunk_bits):
        if ref.hole:
            raise InputError("files with chunk holes cannot be merged")
        local = (ref.raw_device_id & 0xFF) - 1
        g = L.blob_map.get(local)
        if g is None:
            raise CorruptImageError(f"chunk on device {local + 1}, the image has "
                                    f"{len(L.blob_map)} blobs")
        ci = L.chunks.get((local, ref.ci_index))
        if ci is None:
            raise CorruptImageError(f"chunk {ref.ci_index} of blob {local} is not in the "
                                    "chunk info table")
        k = (g, ci.index)
        sc = scs.get(k)
        if sc is None:
            sc = scs[k] = StoredChunk(ci.digest, g, ci.index, ci.compressed_offset,
                                      ci.compressed_size, ci.uncompressed_offset,
                                      ci.uncompressed_size)
            file_off[id(sc)] = ci.file_offset
        # a run of one chunk (the zero chunk of a sparse file's hole) stays one object
        prev = out[-1] if out else None
        if prev is sc:
            out[-1] = ChunkRun(sc, 2)
        elif type(prev) is ChunkRun and prev.chunk is sc:
            prev.count += 1
        else:
            out.append(sc)
    return out
