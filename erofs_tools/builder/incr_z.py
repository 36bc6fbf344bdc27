"""mkfs --incremental -z: the new layer's regular files compressed.

The files are compressed by our own mkfs (the C core's -z path) into a scratch image
of just them, each at its path in the layer (so that --compress-hints match as in a
full build; -E dedupe shares repeated data among them), built with full (8-byte)
lcluster indexes. The scratch blocks the taken files' pclusters use (a pcluster shared
by -E dedupe once) are then copied, in order and gaps closed, to one run after the base
image's end (incr_write.py), and each file's map header, indexes and inline tail (-E
ztailpacking) go into its new inode record, the block addresses moved to the run's:
compact indexes (mkfs.erofs's default) once the record's layout is known, where the
file's pclusters lie back to back and the blocks are at most 4 KiB, else the full
ones. A file the scratch build stores uncompressed stays plain. With -E fragments
(over a base without a packed inode only: the base's fragments are offsets into its
own, which cannot grow in place) the scratch image's packed inode is taken too, as a
new inode the superblock names; the layer's fragment offsets hold as they are.

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
from dataclasses import dataclass, field
from typing import Any

from erofs_tools.errors import InputError
from erofs_tools.format import erofs as E
from erofs_tools.reader.image import Image, open_image
from erofs_tools.reader.zmap import FRAGMENT, INLINE, PCLUSTER, ZMap

_NAMES = ("lz4", "lzma", "deflate", "zstd")
_ADDED = (E.FEATURE_INCOMPAT_ZERO_PADDING | E.FEATURE_INCOMPAT_BIG_PCLUSTER
          | E.FEATURE_INCOMPAT_ZTAILPACKING | E.FEATURE_INCOMPAT_FRAGMENTS)


@dataclass(eq=False)
class ZRun:
    """The scratch image's blocks the taken files use (their pclusters, shared ones with
    -E dedupe once), copied in order, gaps closed, to one run from block `base` on."""
    path: str                                   # the scratch image
    blocks: list[int] = field(default_factory=list)     # scratch blocks, sorted
    rank: dict[int, int] = field(default_factory=dict)  # scratch block -> run index
    base: int = 0                               # first block of the run in the new image

    @property
    def nblocks(self) -> int:
        return len(self.blocks)

    def add(self, first: int, end: int) -> None:
        self.blocks.extend(b for b in range(first, end) if b not in self.rank)
        for b in range(first, end):
            self.rank.setdefault(b, -1)

    def seal(self) -> None:
        self.blocks.sort()
        self.rank = {b: i for i, b in enumerate(self.blocks)}

    def moved(self, blk: int) -> int:
        return self.base + self.rank[blk]

    def ranges(self) -> list[tuple[int, int, int]]:
        """(scratch block, run index, count) of each stretch of consecutive blocks."""
        out: list[tuple[int, int, int]] = []
        for i, b in enumerate(self.blocks):
            if out and out[-1][0] + out[-1][2] == b:
                s, r, n = out[-1]
                out[-1] = (s, r, n + 1)
            else:
                out.append((b, i, 1))
        return out


@dataclass(eq=False)
class ZFile:
    """One new file's compressed form in the scratch image."""
    run: ZRun
    cblocks: int         # i_u: the compressed blocks (not the inline tail)
    blob: bytes          # map header, full indexes, inline tail (the scratch's)
    index_at: int        # where the full indexes start in blob
    nlc: int             # how many
    inline: int          # bytes of the inline tail at the blob's end
    heads: frozenset[int]   # the lclusters whose entries are pcluster heads
    compactable: bool    # pclusters back to back, none partial: compact indexes fit
    mpos: int | None = None  # compact: the index's offset in the record (else full)

    def prepare(self, ipos: int, blksz: int) -> None:
        """Compact indexes (as mkfs.erofs writes by default) once the inode and xattr
        sizes are known (their byte position mod 32 shapes the packs), when the
        pclusters allow them and the lcluster (a block) is at most 4 KiB (2-byte
        packs); else the full indexes."""
        if self.compactable and blksz <= 4096 and self.nlc:
            self.mpos = -(-ipos // 8) * 8 + E.MapHeader.SIZE
        else:
            self.mpos = None

    @property
    def layout(self) -> int:
        return E.LAYOUT_COMPRESSED_FULL if self.mpos is None else E.LAYOUT_COMPRESSED_COMPACT

    @property
    def length(self) -> int:
        if self.mpos is None:
            return len(self.blob)
        init4, n2b, end4 = _packs(self.nlc, self.mpos)
        return E.MapHeader.SIZE + init4 * 4 + n2b * 2 + (end4 + 1) // 2 * 8 + self.inline

    def relocated(self) -> bytes:
        """The map header and indexes (full or compact) with the pclusters' block
        addresses where the run put them, then the inline tail."""
        full = bytearray(self.blob)
        for i in range(self.nlc):
            pos = self.index_at + 8 * i
            adv = int.from_bytes(full[pos:pos + 2], "little")
            if adv & E.LI_TYPE_MASK == E.LCLUSTER_TYPE_NONHEAD:
                continue
            if i in self.heads:     # (not a fragment's head: its offset's high bits)
                blk = int.from_bytes(full[pos + 4:pos + 8], "little")
                full[pos + 4:pos + 8] = self.run.moved(blk).to_bytes(4, "little")
        if self.mpos is None:
            return bytes(full)
        tail = bytes(full[len(full) - self.inline:]) if self.inline else b""
        return _compact(bytes(full[:self.index_at + 8 * self.nlc]), self.index_at,
                        self.nlc, self.mpos) + tail


def _packs(n: int, mpos: int) -> tuple[int, int, int]:
    """How many 4-byte entries lead (up to the 32-byte alignment of the 2-byte packs),
    how many 2-byte ones follow (whole packs of 16), how many 4-byte ones end."""
    init4 = (32 - mpos % 32) // 4 % 8
    if init4 > n:
        return 0, 0, n
    n2b = (n - init4) // 16 * 16
    return init4, n2b, n - init4 - n2b


def _compact(full: bytes, index_at: int, n: int, mpos: int) -> bytes:
    """The full index squeezed into compact packs (as the C core's zindex_compact: each
    entry the type over 12 bits of cluster offset or delta, 16 bits in 4-byte packs of
    2, 14 in 2-byte packs of 16; each pack ends with the block its heads count from)."""
    adv = int.from_bytes(full[4:6], "little")        # (h_advise, after le32 at 0)
    big = bool(adv & E.ADVISE_BIG_PCLUSTER_1)
    adv |= E.ADVISE_COMPACTED_2B | (E.ADVISE_BIG_PCLUSTER_1 | E.ADVISE_BIG_PCLUSTER_2
                                   if big else 0)
    ents = []
    for i in range(n):
        pos = index_at + 8 * i
        ents.append((int.from_bytes(full[pos:pos + 2], "little") & E.LI_TYPE_MASK,
                     int.from_bytes(full[pos + 2:pos + 4], "little"),
                     int.from_bytes(full[pos + 4:pos + 8], "little")))
    out = bytearray(full[:4] + adv.to_bytes(2, "little") + full[6:E.MapHeader.SIZE])
    nextblk = ents[0][2] if ents else 0
    init4, n2b, _end4 = _packs(n, mpos)
    p = 0
    while p < n:
        if p < init4 or p >= init4 + n2b:
            vcnt, unit = 2, 4
        else:
            vcnt, unit = 16, 2
        bits = (vcnt * unit * 8 - 32) // vcnt
        base = 0 if big else nextblk - 1
        sub, have_base, word = 0, False, 0
        for k in range(min(vcnt, n - p)):
            t, cofs, u = ents[p + k]
            if t == E.LCLUSTER_TYPE_NONHEAD:
                d0, d1 = u & 0xFFFF, u >> 16
                if d0 & E.LI_D0_CBLKCNT:
                    lo = d0
                    if not have_base:
                        sub = d0 & ~E.LI_D0_CBLKCNT
                elif k + 1 == vcnt:
                    lo = min(d1, E.LI_D0_CBLKCNT - 1)
                else:
                    lo = d0
            else:
                lo = cofs
                if not big:
                    nextblk += 1
                elif not have_base and u:
                    base, have_base = u - sub, True
                if big and u:
                    nextblk = u
            word |= ((t << 12 | lo) & ((1 << bits) - 1)) << (k * bits)
        if big and not have_base:
            base = nextblk
        out += word.to_bytes(vcnt * unit - 4, "little") + (base & 0xFFFFFFFF).to_bytes(4, "little")
        p += vcnt
    return bytes(out)


@dataclass
class ZResult:
    bits: int = 0                # superblock feature_incompat bits to add
    run: ZRun | None = None
    packed: Any = None           # -E fragments: the new packed inode (an Out)


def refuse(z: Any, img: Image) -> None:
    """What -z with --incremental does not build: one line."""
    if (z.fragments or z.all_fragments) and (
            img.sb.packed_nid or img.sb.feature_incompat & E.FEATURE_INCOMPAT_FRAGMENTS):
        # the base's fragments are byte offsets into its packed inode, which a layer's
        # cannot be added to in place (mkfs.erofs 1.9.4 rewrites it, and the base's and
        # earlier layers' fragment files then read wrong bytes)
        raise InputError(f"{img.name}: --incremental -E fragments: the base image has a "
                         "packed inode (it cannot take a layer's fragments in place)")
    if z.max_extent:
        raise InputError("--incremental -z: --max-extent-bytes is not supported")
    if img.is_48bit:
        raise InputError(f"{img.name}: --incremental -z: a base of the 48-bit layout "
                         "is not supported")


def compress_new(img: Image, outs: list[Any], opts: Any, directory: str,
                 stack: contextlib.ExitStack) -> ZResult:
    """Give each new regular file that compresses its ZFile (o.z); -> the superblock's
    feature_incompat bits to add and the run of scratch blocks to copy."""
    z = opts.compress
    if z is None:
        return ZResult()
    refuse(z, img)
    cands = [o for o in outs if stat.S_ISREG(o.mode) and o.size and o.entries is None
             and o.data is not None and not o.reserve]
    if not cands:
        return ZResult()
    tmp = tempfile.mkdtemp(prefix=".erofs-incrz-", dir=directory)
    stack.callback(shutil.rmtree, tmp, True)
    src = os.path.join(tmp, "src")
    os.mkdir(src)
    # each file at its path in the layer: --compress-hints match it as in a full build
    paths = [os.fsdecode(o.path) if o.path else str(i) for i, o in enumerate(cands)]
    for o, rel in zip(cands, paths, strict=True):
        os.makedirs(os.path.dirname(os.path.join(src, rel)), exist_ok=True)
        _spill(o, os.path.join(src, rel))
    from erofs_tools.builder.mkfs import mkfs as build_image
    from erofs_tools.builder.options import MkfsOptions
    zimg = os.path.join(tmp, "z.img")
    zopts = MkfsOptions(timestamp=0, uuid=bytes(16), all_root=True, xattrs=False,
                        blkszbits=img.blkszbits, workers=opts.workers,
                        compress=dataclasses.replace(z, full_index=True),
                        compress_hints=list(opts.compress_hints))
    build_image(zimg, src, zopts)
    shutil.rmtree(src)
    t = open_image(zimg)
    run = ZRun(zimg)
    packed = None
    try:
        add = _check_config(img, t)
        for o, rel in zip(cands, paths, strict=True):
            ino = t.lookup("/" + rel)
            if ino.layout == E.LAYOUT_COMPRESSED_FULL:  # (else plain: incompressible)
                o.z = _take(t, ino, run)
        if t.sb.packed_nid:
            packed = _packed(img, t, run)
    finally:
        t.close()
    run.seal()
    return ZResult(add, run if run.blocks else None, packed)


def _take(t: Image, ino: Any, run: ZRun) -> ZFile | None:
    """The ZFile of a compressed scratch inode, its pclusters added to the run."""
    bs = t.blksz
    zm = ZMap(t, ino)
    if zm.extents and zm.extents[0].kind == FRAGMENT:     # (the whole file a fragment)
        head = bytes(t.read(zm.hpos, E.MapHeader.SIZE, "map header"))
        return ZFile(run, 0, head, E.MapHeader.SIZE, 0, 0, frozenset(), False)
    pcl = [e for e in zm.extents if e.kind == PCLUSTER]
    if any(e.kind not in (PCLUSTER, INLINE, FRAGMENT) for e in zm.extents):
        return None
    seen: dict[int, int] = {}
    for e in pcl:
        seen.setdefault(e.pa, e.plen)
    order = sorted(seen.items())
    back_to_back = all(a + n == b for (a, n), (b, _m) in zip(order, order[1:]))
    in_order = [e.pa for e in pcl if not e.partial]
    # (a fragment tail's head carries its offset's high bits: full indexes)
    compactable = (back_to_back and not any(e.partial for e in pcl)
                   and in_order == sorted(in_order) and not zm.fragment)
    for pa, plen in order:
        run.add(pa // bs, -(-(pa + plen) // bs))
    index_at = zm.ibase - zm.hpos
    blob = t.read(zm.hpos, index_at + 8 * zm.nlc + zm.idata_size, "indexes")
    return ZFile(run, ino.i_u, bytes(blob), index_at, zm.nlc, zm.idata_size,
                 frozenset(e.la >> zm.lbits for e in pcl), compactable)


def _packed(img: Image, t: Image, run: ZRun) -> Any:
    """-E fragments over a base without a packed inode: the scratch image's packed
    inode as a new inode (the layer's fragment offsets stay valid: the same bytes)."""
    from erofs_tools.builder.incr_write import Out
    pino = t.inode(t.sb.packed_nid)
    o = Out(pino.mode, 0, 0, img.epoch, img.fixed_nsec, {}, size=pino.size, nlink=1)
    if pino.layout == E.LAYOUT_COMPRESSED_FULL:
        o.z = _take(t, pino, run)
        if o.z is None:
            raise InputError(f"{img.name}: --incremental -E fragments: the layer's packed "
                             "inode is not in a form this build can take")
    else:
        o.data = bytes(t.read_data(pino))
    return o


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
