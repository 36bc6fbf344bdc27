"""Decoded data of compressed inodes: each extent of reader/zmap.py decompressed by the
C core (plain extents copied, shifted or un-rotated), fragments read from the packed
inode.

Memory stays bounded: an extent decodes to at most 12 MiB (zmap rejects more), a few
decoded extents are cached per image (the packed inode's are read again and again by the
files whose tails they hold), and a fragment is read in pieces.
"""
from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict

from erofs_tools import _native
from erofs_tools.errors import CorruptImageError
from erofs_tools.format import erofs as E
from erofs_tools.reader.zmap import (
    ALG_INTERLACED,
    ALG_SHIFTED,
    FRAGMENT,
    HOLE,
    INLINE,
    PCLUSTER,
    ZExtent,
    ZMap,
)

CACHE_BYTES = 32 << 20          # decoded extents kept per image
CACHE_MAPS = 64                 # inode maps kept per image


def is_compressed(ino) -> bool:
    return ino.layout in (E.LAYOUT_COMPRESSED_FULL, E.LAYOUT_COMPRESSED_COMPACT)


class ZState:
    """Per-image caches of maps and decoded extents."""

    def __init__(self, img) -> None:
        self.img = img
        self.maps: OrderedDict[int, ZMap] = OrderedDict()
        self.decoded: OrderedDict[tuple, bytes] = OrderedDict()
        self.decoded_bytes = 0
        self._packed = None
        # lcluster entries read by first builds of inode maps: sound images hold at most
        # one per 2 index bytes, so more than one per image byte means inodes share
        # index bytes (a crafted image whose maps would take quadratic time)
        self.entries_left = img.size + 4096
        self.built: set[int] = set()

    def charge(self, nid, entries):
        if nid in self.built:
            return          # a map evicted from the cache and built again
        self.built.add(nid)
        self.entries_left -= entries
        if self.entries_left < 0:
            raise self.img._err(f"inode {nid}: the compressed inodes' lcluster indexes add "
                                "up to more than the image holds")

    def zmap(self, ino) -> ZMap:
        m = self.maps.get(ino.nid)
        if m is not None and m.ino is ino:
            self.maps.move_to_end(ino.nid)
            return m
        m = ZMap(self.img, ino, self)
        self.maps[ino.nid] = m
        if len(self.maps) > CACHE_MAPS:
            self.maps.popitem(last=False)
        return m

    def packed(self):
        """The packed inode (fragments) and its map."""
        if self._packed is None:
            img = self.img
            nid = img.sb.packed_nid
            if not img.sb.feature_incompat & E.FEATURE_INCOMPAT_FRAGMENTS or nid == 0:
                raise img._err("fragment without a packed inode")
            ino = img.inode(nid)
            if not ino.is_reg():
                raise img._err(f"packed inode {nid} is not a regular file")
            self._packed = ino
        return self._packed

    def decode(self, ext: ZExtent, what: str) -> bytes:
        """The `ext.llen` decoded bytes of one PCLUSTER or INLINE extent."""
        key = (ext.pa, ext.plen, ext.alg, ext.llen, ext.la % self.img.blksz
               if ext.alg == ALG_INTERLACED else 0, ext.partial, ext.in_meta)
        d = self.decoded.get(key)
        if d is not None:
            self.decoded.move_to_end(key)
            return d
        d = decode_extent(self.img, ext, what)
        self.decoded[key] = d
        self.decoded_bytes += len(d)
        while self.decoded_bytes > CACHE_BYTES and len(self.decoded) > 1:
            _k, old = self.decoded.popitem(last=False)
            self.decoded_bytes -= len(old)
        return d


def state(img) -> ZState:
    z = img._zstate
    if z is None:
        z = img._zstate = ZState(img)
    return z


def decode_extent(img, ext: ZExtent, what: str) -> bytes:
    src = img.metabox_space(-1) if ext.in_meta else img
    raw = src.read(ext.pa, ext.plen, f"{what} pcluster")
    n = ext.llen
    if ext.alg == ALG_SHIFTED:
        return raw[:n]
    if ext.alg == ALG_INTERLACED:
        # stored rotated: the extent's first bytes sit at its offset inside the block
        skip = ext.la % img.blksz
        right = min(img.blksz - skip, n)
        if skip + right > len(raw) or n - right > len(raw):
            raise CorruptImageError(f"{img.name}: {what}: interlaced extent at {ext.la} "
                                    "does not fit its pcluster")
        return raw[skip:skip + right] + raw[:n - right]
    try:
        return _native.z_decompress(ext.alg, raw, n, partial=ext.partial,
                                    zero_padding=img.zconfig.zero_padding,
                                    dict_size=img.zconfig.lzma_dict_size)
    except CorruptImageError as e:
        raise CorruptImageError(f"{img.name}: {what}: extent at {ext.la} ({ext.plen} -> "
                                f"{n} bytes): {e}") from None


def _fragment_pieces(img, ino, ext, start, end, piece):
    """Yield (file offset, bytes) of [start, end) of a FRAGMENT extent."""
    z = state(img)
    packed = z.packed()
    if packed.nid == ino.nid:
        raise img._err(f"inode {ino.nid}: the packed inode holds a fragment itself")
    base = ext.pa
    if base + ext.llen > packed.size:
        raise img._err(f"inode {ino.nid}: fragment [{base}, {base + ext.llen}) beyond the "
                       f"packed inode ({packed.size} bytes)")
    pos = start
    while pos < end:
        n = min(piece, end - pos)
        if is_compressed(packed):
            yield pos, read_range(img, packed, base + pos - ext.la, n, depth=1)
        else:
            yield pos, _read_flat(img, packed, base + pos - ext.la, n)
        pos += n


def _read_flat(img, ino, offset, length) -> bytes:
    """Bytes of an uncompressed inode (a small packed inode is stored plain or inline)."""
    out = bytearray(length)
    end = offset + length
    for fo, n, dev, phys in img.map_data(ino):
        a, b = max(offset, fo), min(end, fo + n)
        if b <= a or dev is None:
            continue
        if dev != 0:
            raise img._err(f"inode {ino.nid}: packed data on device {dev}")
        out[a - offset:b - offset] = img.read(phys + a - fo, b - a, f"inode {ino.nid} data")
    return bytes(out)


def iter_compressed(img, ino, piece=1 << 20):
    """Yield (file_offset, bytes, length) covering a compressed inode's data."""
    z = state(img)
    m = z.zmap(ino)
    what = f"inode {ino.nid}"
    for ext in m.extents:
        if ext.kind == FRAGMENT:
            for pos, data in _fragment_pieces(img, ino, ext, ext.la, ext.la + ext.llen, piece):
                yield pos, data, len(data)
            continue
        if ext.kind == HOLE:        # (any length: zeros a piece at a time)
            for pos in range(0, ext.llen, piece):
                n = min(piece, ext.llen - pos)
                yield ext.la + pos, bytes(n), n
            continue
        data = z.decode(ext, what)
        for pos in range(0, len(data), piece):
            chunk = data[pos:pos + piece]
            yield ext.la + pos, chunk, len(chunk)


def check_unshared(img, ino, what: str) -> None:
    """Raise unless each stored byte a compressed directory's data is decoded from
    serves one of its extents (those of the packed inode inside its fragment included).
    Names are unique in a directory, so no block of its data repeats and a pcluster
    whose decoded bytes start one extent of it (mkfs -Ededupe's shared pclusters and
    partial references match a block at least) starts no other: extents that all name
    one stored block made a directory of MAX_ZDIR bytes out of 512 KiB of records, its
    dirents (millions of them) listed before anything saw the repeats."""
    z = state(img)
    spans = []
    for ext in z.zmap(ino).extents:
        if ext.kind == FRAGMENT:
            packed = z.packed()
            if packed.nid == ino.nid or not is_compressed(packed):
                continue        # (refused as it is read; a plain one is the image's bytes)
            pext = z.zmap(packed).extents
            end = ext.pa + ext.llen
            # those inside its range (the two at its ends hold others' bytes as well)
            i = bisect_right(pext, ext.pa - 1, key=lambda x: x.la)
            while i < len(pext) and pext[i].la + pext[i].llen <= end:
                if pext[i].kind in (PCLUSTER, INLINE):
                    spans.append((pext[i].in_meta, pext[i].pa, pext[i].plen))
                i += 1
        elif ext.kind in (PCLUSTER, INLINE):
            spans.append((ext.in_meta, ext.pa, ext.plen))
    spans.sort()
    end, where = -1, None
    for meta, pa, n in spans:
        if meta == where and pa < end:
            raise img._err(f"{what}: two of its extents decode the stored bytes at "
                           f"{pa}: a directory repeats no block")
        end = max(end, pa + n) if meta == where else pa + n
        where = meta


def read_range(img, ino, offset, length, depth=0) -> bytes:
    """Bytes [offset, offset+length) of a compressed inode (extents decoded whole and
    cut: a read starting inside an extent skips its head)."""
    if offset < 0 or length < 0 or offset + length > ino.size:
        raise img._err(f"inode {ino.nid}: range [{offset}, {offset + length}) beyond its "
                       f"size {ino.size}")
    if depth > 1:
        raise img._err(f"inode {ino.nid}: fragments nest")
    z = state(img)
    m = z.zmap(ino)
    exts = m.extents
    starts = [x.la for x in exts]
    out = bytearray()
    pos = offset
    end = offset + length
    i = bisect_right(starts, pos) - 1
    what = f"inode {ino.nid}"
    while pos < end:
        if i < 0 or i >= len(exts):
            raise img._err(f"{what}: offset {pos} not mapped")
        ext = exts[i]
        stop = min(end, ext.la + ext.llen)
        if ext.kind == FRAGMENT:
            if depth:
                raise img._err(f"{what}: the packed inode holds a fragment itself")
            for _p, data in _fragment_pieces(img, ino, ext, pos, stop, 1 << 20):
                out += data
        elif ext.kind == HOLE:
            out += bytes(stop - pos)
        else:
            data = z.decode(ext, what)
            out += data[pos - ext.la:stop - ext.la]
        pos = stop
        i += 1
    return bytes(out)


class ZChecker:
    """`check`'s side: every extent of a compressed inode decodes to exactly its length
    (each distinct pcluster use once: dedupe shares them), every fragment lies inside
    the packed inode. Decoding stops after `budget` bytes: an index costs at least 2
    bytes per lcluster, so no sound image decodes to more than a few thousand times its
    size, and a crafted one whose inodes share index bytes would otherwise decode
    without end."""

    def __init__(self, img, budget=None) -> None:
        self.img = img
        self.seen: set[tuple] = set()
        self.left = budget if budget is not None else 4096 * img.size + (256 << 20)
        self.exhausted = False

    def check_inode(self, ino, verify_data=True):
        """Raise CorruptImageError at the first problem of `ino`'s compressed data."""
        img = self.img
        z = state(img)
        m = z.zmap(ino)
        what = f"inode {ino.nid}"
        for ext in m.extents:
            if ext.kind == FRAGMENT:
                packed = z.packed()
                if packed.nid == ino.nid:
                    raise img._err(f"{what}: the packed inode holds a fragment itself")
                if ext.pa + ext.llen > packed.size:
                    raise img._err(f"{what}: fragment [{ext.pa}, {ext.pa + ext.llen}) "
                                   f"beyond the packed inode ({packed.size} bytes)")
                continue
            if not verify_data or ext.kind == HOLE:
                continue
            key = (ext.pa, ext.plen, ext.alg, ext.llen, ext.la % img.blksz, ext.partial,
                   ext.in_meta)
            if key in self.seen:
                continue
            if ext.llen > self.left:
                self.exhausted = True
                return
            self.left -= ext.llen
            decode_extent(img, ext, what)
            self.seen.add(key)
