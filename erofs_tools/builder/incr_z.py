"""mkfs --incremental -z: the new layer's regular files compressed.

The files are compressed by our own mkfs (the C core's -z path) into a scratch image
of just them, built with full (8-byte) lcluster indexes; each compressed file's
pclusters (one contiguous run of blocks) are then copied after the base image's end
and its map header, indexes and inline tail (-E ztailpacking) go into its new inode
record, the indexes' block addresses moved by where the run now lies
(incr_write.py). A file the scratch build stores uncompressed stays plain.

The superblock's algorithm bits and per-algorithm config records stay where the base
has them: an algorithm (or -C pcluster size, lzma dictionary, zstd/deflate window)
the base's records do not cover is refused, as the records cannot grow in place (a
plain base, whose inode records start right after the superblock, takes lz4 and
lz4hc with one-block pclusters only). mkfs.erofs 1.9.4 refuses a new algorithm on a
compressed base too, and on a plain base writes an image the kernel will not mount.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from typing import Any

from erofs_tools.errors import InputError
from erofs_tools.format import erofs as E
from erofs_tools.reader.image import Image, open_image
from erofs_tools.reader.zmap import INLINE, PCLUSTER, ZMap

_NAMES = ("lz4", "lzma", "deflate", "zstd")
_ADDED = (E.FEATURE_INCOMPAT_ZERO_PADDING | E.FEATURE_INCOMPAT_BIG_PCLUSTER
          | E.FEATURE_INCOMPAT_ZTAILPACKING)


@dataclass(eq=False)
class ZFile:
    """One new file's compressed form in the scratch image."""
    path: str            # the scratch image
    first: int           # its first pcluster block there
    nblocks: int         # blocks of its pclusters (a contiguous run)
    cblocks: int         # i_u: the compressed blocks (not the inline tail)
    blob: bytes          # map header, indexes, inline tail: copied after the xattrs
    index_at: int        # where the full indexes start in blob
    nlc: int             # how many
    inline: int          # bytes of the inline tail at the blob's end

    def relocated(self, blkaddr: int) -> bytes:
        """The blob with the indexes' block addresses moved to start at blkaddr."""
        out = bytearray(self.blob)
        delta = blkaddr - self.first
        for i in range(self.nlc):
            pos = self.index_at + 8 * i
            adv = int.from_bytes(out[pos:pos + 2], "little")
            if adv & E.LI_TYPE_MASK == E.LCLUSTER_TYPE_NONHEAD:
                continue
            blk = int.from_bytes(out[pos + 4:pos + 8], "little")
            if self.first <= blk < self.first + self.nblocks:
                out[pos + 4:pos + 8] = (blk + delta).to_bytes(4, "little")
        return bytes(out)


def refuse(z: Any, img: Image) -> None:
    """What -z with --incremental does not build: one line."""
    if z.fragments or z.all_fragments:
        raise InputError("--incremental -z: -E fragments is not supported")
    if z.dedupe:
        raise InputError("--incremental -z: -E dedupe is not supported")
    if z.max_extent:
        raise InputError("--incremental -z: --max-extent-bytes is not supported")
    if img.is_48bit:
        raise InputError(f"{img.name}: --incremental -z: a base of the 48-bit layout "
                         "is not supported")


def compress_new(img: Image, outs: list[Any], opts: Any, directory: str,
                 stack: contextlib.ExitStack) -> int:
    """Give each new regular file that compresses its ZFile (o.z); -> the superblock's
    feature_incompat bits to add."""
    z = opts.compress
    if z is None:
        return 0
    refuse(z, img)
    cands = [o for o in outs if stat.S_ISREG(o.mode) and o.size and o.entries is None
             and o.data is not None and not o.reserve]
    if not cands:
        return 0
    tmp = tempfile.mkdtemp(prefix=".erofs-incrz-", dir=directory)
    stack.callback(shutil.rmtree, tmp, True)
    src = os.path.join(tmp, "src")
    os.mkdir(src)
    for i, o in enumerate(cands):
        _spill(o, os.path.join(src, str(i)))
    from erofs_tools.builder.mkfs import mkfs as build_image
    from erofs_tools.builder.options import MkfsOptions
    zimg = os.path.join(tmp, "z.img")
    zopts = MkfsOptions(timestamp=0, uuid=bytes(16), all_root=True, xattrs=False,
                        blkszbits=img.blkszbits, workers=opts.workers,
                        compress=dataclasses.replace(z, full_index=True))
    build_image(zimg, src, zopts)
    for name in os.listdir(src):
        os.unlink(os.path.join(src, name))
    t = open_image(zimg)
    try:
        add = _check_config(img, t)
        bs = t.blksz
        for i, o in enumerate(cands):
            ino = t.lookup(f"/{i}")
            if ino.layout != E.LAYOUT_COMPRESSED_FULL:
                continue                # (stored plain: incompressible)
            zm = ZMap(t, ino)
            pcl = [e for e in zm.extents if e.kind == PCLUSTER]
            inl = [e for e in zm.extents if e.kind == INLINE]
            if len(pcl) + len(inl) != len(zm.extents) or zm.fragment:
                continue
            first = min((e.pa for e in pcl), default=0) // bs
            end = -(-max((e.pa + e.plen for e in pcl), default=0) // bs)
            nblocks = end - first if pcl else 0
            if nblocks != ino.i_u:
                continue                # (not one run: left plain)
            index_at = zm.ibase - zm.hpos
            blob = t.read(zm.hpos, index_at + 8 * zm.nlc + zm.idata_size, "indexes")
            o.z = ZFile(zimg, first, nblocks, ino.i_u, bytes(blob), index_at, zm.nlc,
                        zm.idata_size)
    finally:
        t.close()
    return add


def _spill(o: Any, path: str) -> None:
    from erofs_tools.builder.incr_write import _copy_file
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        if isinstance(o.data, bytes):
            os.write(fd, o.data)
        else:
            src, off = o.data
            _copy_file(fd, src, off, o.size, 0)
    finally:
        os.close(fd)


def _records(img: Image) -> dict[int, bytes]:
    """The superblock's per-algorithm config records (COMPR_CFGS)."""
    out: dict[int, bytes] = {}
    if not img.sb.feature_incompat & E.FEATURE_INCOMPAT_COMPR_CFGS:
        return out
    off = E.SUPER_OFFSET + img.sb_size
    for alg in range(4):
        if img.sb.u1 & (1 << alg):
            off = -(-off // 4) * 4
            n = int.from_bytes(img.read(off, 2, "compression config"), "little")
            out[alg] = bytes(img.read(off + 2, n, "compression config"))
            off += 2 + n
    return out


def _check_config(img: Image, t: Image) -> int:
    """The scratch image's compression settings against the base's: refused unless the
    base's superblock covers them; -> the feature bits to add."""
    name = img.name
    binc, tinc = img.sb.feature_incompat, t.sb.feature_incompat
    bcfg, tcfg = _records(img), _records(t)
    if binc & E.FEATURE_INCOMPAT_COMPR_CFGS:
        talgs = tcfg.keys() if tinc & E.FEATURE_INCOMPAT_COMPR_CFGS else {E.COMPRESSION_LZ4}
        for alg in talgs:
            if alg not in bcfg:
                raise InputError(f"{name}: --incremental -z {_NAMES[alg]}: the base image "
                                 f"has no {_NAMES[alg]} config record (it cannot be added "
                                 "in place)")
            b, n = bcfg[alg], tcfg.get(alg, b"")
            if alg == E.COMPRESSION_LZ4 and n and len(b) > 2 and n[2] > b[2]:
                raise InputError(f"{name}: --incremental -z: -C {n[2] * t.blksz}: the base "
                                 f"image's lz4 pclusters are at most {b[2] * t.blksz} bytes")
            if alg == E.COMPRESSION_LZMA and n and (int.from_bytes(n[:4], "little")
                                                    > int.from_bytes(b[:4], "little")):
                raise InputError(f"{name}: --incremental -z lzma: a larger dictionary "
                                 "than the base image's")
            if alg in (E.COMPRESSION_DEFLATE, E.COMPRESSION_ZSTD) and n:
                k = 0 if alg == E.COMPRESSION_DEFLATE else 1
                if len(b) <= k or len(n) <= k or n[k] > b[k]:
                    raise InputError(f"{name}: --incremental -z {_NAMES[alg]}: a larger "
                                     "window than the base image's")
    elif tinc & E.FEATURE_INCOMPAT_COMPR_CFGS:
        algs = ", ".join(_NAMES[a] for a in tcfg) or "lz4"
        raise InputError(f"{name}: --incremental -z: the base image has no compression "
                         f"config records, so {algs} (or -C over one block) cannot be "
                         "added in place (lz4/lz4hc with one-block pclusters only)")
    elif binc & E.FEATURE_INCOMPAT_ZERO_PADDING and img.sb.u1 and t.sb.u1 > img.sb.u1:
        raise InputError(f"{name}: --incremental -z: the base image's lz4 distance is "
                         "smaller")
    if not binc & E.FEATURE_INCOMPAT_ZERO_PADDING and _has_compressed(img):
        # the bit changes how the kernel finds lz4 data in every pcluster: the base's
        # own compressed files (written without it) would read wrong bytes
        raise InputError(f"{name}: --incremental -z: the base image's compressed files "
                         "are written without zero padding (lz4_0padding)")
    return tinc & _ADDED


def _has_compressed(img: Image) -> bool:
    from erofs_tools.reader.zdata import is_compressed
    return any(is_compressed(ino) for _p, _d, ino in img.walk())
