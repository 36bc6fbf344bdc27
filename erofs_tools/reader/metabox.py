"""Metadata compression (FEATURE_INCOMPAT_METABOX: mkfs.erofs 1.9 -m, Linux 6.17+).

The superblock (144 bytes: one extension slot) names the metabox inode, a regular file
in the metadata area whose data, usually compressed, holds the inodes of every nid with
bit 63 set and what follows each of them (xattrs, inline tails, chunk or lcluster
indexes, inline pclusters); with FEATURE_COMPAT_SHARED_EA_IN_METABOX the shared xattr
area is in it too (at xattr_blkaddr's offset). Directory blocks, file data and the
metabox's own pclusters stay in the image.

The reader decodes the metabox once, when the image is opened, into a MetaSpace: the
bytes the inodes in it are read from (Image.space_of). Every byte is
untrusted: the metabox's nid must not have bit 63 (it would hold itself), it must be a
regular file of at most MAX_METABOX bytes, and reads in it are bounds-checked like reads
of the image.

A compressed metabox may share pclusters: mkfs.erofs 1.9 -Ededupe compresses it like
any file, so extents that repeat earlier ones (whole or their start, PARTIAL_REF) use
the same stored bytes; 300 files with one 12 KiB xattr give a metabox whose pclusters
are used 148 times each. The decoded bytes of such extents are held once, per pcluster,
not once per extent: the memory held is what the stored bytes decode to, not the
metabox's size (1 GiB from a few KiB of records that all name one block). Two extents
name either the same stored bytes or disjoint ones, as mkfs writes them: overlapping
ones would be decoded twice from one stored byte.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import Any

from erofs_tools.format import erofs as E
from erofs_tools.reader.zdata import decode_extent, is_compressed, state
from erofs_tools.reader.zmap import ALG_INTERLACED, FRAGMENT, HOLE, ZExtent

# The decoded metabox is held in memory: ~100 bytes per inode (its record, xattrs,
# inline tail), so 1 GiB is some 10 million inodes; a larger one is refused
MAX_METABOX = 1 << 30


class MetaSpace:
    """The metabox's decoded data: the space an in-metabox inode's bytes are read from
    (as the Image is for the others: `size`, `read`). `data` holds it flat when it is
    stored uncompressed; a compressed one is held as its extents' decoded pieces
    (`pieces`: (file offset, length, bytes whose start is the extent's data), those of
    extents sharing a pcluster one object), `data` then None."""

    def __init__(self, img: Any, nid: int, data: bytes | None, size: int | None = None,
                 pieces: list[tuple[int, int, bytes]] | None = None) -> None:
        self.img = img
        self.nid = nid
        self.data = data
        self.size = len(data) if data is not None else size or 0
        self.name = img.name
        self.pieces = pieces or []
        self._starts = [p[0] for p in self.pieces]

    def read(self, offset: int, length: int, what: str = "metadata") -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self.img._err(
                f"{what} at [{offset}, {offset + length}) is outside the metabox "
                f"(nid {self.nid}, {self.size} bytes)")
        if self.data is not None:
            return self.data[offset:offset + length]
        i = bisect_right(self._starts, offset) - 1
        la, n, buf = self.pieces[i]
        if offset + length <= la + n:       # (the usual read: inside one extent)
            return buf[offset - la:offset - la + length]
        out = bytearray()
        end = offset + length
        while offset < end:
            la, n, buf = self.pieces[i]
            stop = min(end, la + n)
            out += buf[offset - la:stop - la]
            offset = stop
            i += 1
        return bytes(out)


def metabox_nid(img: Any) -> int | None:
    """The metabox inode's nid from the superblock, None without the feature."""
    sb = img.sb
    if not sb.feature_incompat & E.FEATURE_INCOMPAT_METABOX:
        if sb.feature_compat & E.FEATURE_COMPAT_SHARED_EA_IN_METABOX:
            raise img._err("shared xattrs in the metabox, but no metabox (feature 0x100)")
        return None
    if E.SuperBlock.SIZE + sb.sb_extslots * E.SB_EXTSLOT_SIZE <= E.SB_METABOX_NID_OFFSET:
        raise img._err(f"metabox feature with a {E.SuperBlock.SIZE}-byte superblock "
                       "(sb_extslots 0): no metabox nid")
    at = E.SUPER_OFFSET + E.SB_METABOX_NID_OFFSET
    nid = int.from_bytes(img.read(at, 8, "metabox nid"), "little")
    if nid >> E.NID_METABOX_BIT:
        raise img._err(f"metabox nid {nid:#x} has bit 63 set: the metabox would hold "
                       "itself")
    return nid


def load_metabox(img: Any, nid: int) -> MetaSpace:
    """The decoded data of metabox inode `nid` of Image `img`."""
    ino = img.inode(nid)
    if not ino.is_reg():
        raise img._err(f"metabox inode {nid} is not a regular file")
    if ino.size > MAX_METABOX:
        raise img._err(f"metabox inode {nid}: {ino.size} bytes, more than the "
                       f"{MAX_METABOX >> 20} MiB read")
    if ino.size < E.SLOT_SIZE:
        raise img._err(f"metabox inode {nid}: {ino.size} bytes hold no inode")
    # the decoded bytes are held: bounded by what the image stores, not only by
    # MAX_METABOX (a 4 KiB image would otherwise cost 1 GiB, 3 while it is read)
    if not is_compressed(ino):
        # plain or chunk-based: its bytes are the image's (chunks may repeat a block)
        if ino.size > img.size:
            raise img._err(f"metabox inode {nid}: {ino.size} bytes stored uncompressed "
                           f"in a {img.size}-byte image")
        return MetaSpace(img, nid, img.read_data(ino))
    return MetaSpace(img, nid, None, ino.size, _decoded_pieces(img, nid, ino))


def _decoded_pieces(img: Any, nid: int, ino: Any) -> list[tuple[int, int, bytes]]:
    """The compressed metabox's extents decoded, each pcluster once (its uses' longest
    decoded length: the others are its start)."""
    what = f"metabox inode {nid}"
    uses: dict[tuple[int, int, int, int], list[ZExtent]] = {}
    for ext in state(img).zmap(ino).extents:
        if ext.kind == HOLE:
            # zeros: no inode is stored there (mkfs never leaves one)
            raise img._err(f"{what}: a hole of {ext.llen} bytes at {ext.la}: the "
                           "metabox stores its inodes")
        if ext.kind == FRAGMENT:
            raise img._err(f"{what}: its data at {ext.la} is a fragment: mkfs never "
                           "packs the metabox into the packed inode")
        skip = ext.la % img.blksz if ext.alg == ALG_INTERLACED else 0
        uses.setdefault((ext.pa, ext.plen, ext.alg, skip), []).append(ext)
    # one stored byte decodes for one pcluster: shared pclusters name the same bytes
    end, last, last_alg = -1, (-1, -1), 0
    for pa, plen, alg, _skip in sorted(uses):
        if pa < end and (pa, plen) != last:
            raise img._err(f"{what}: pcluster [{pa}, {pa + plen}) overlaps "
                           f"[{last[0]}, {end}): two pclusters share stored bytes")
        if (pa, plen) == last and alg != last_alg:
            raise img._err(f"{what}: pcluster [{pa}, {pa + plen}) is decoded with two "
                           "formats")
        end, last, last_alg = max(end, pa + plen), (pa, plen), alg
    pieces = []
    for group in uses.values():
        longest = max(e.llen for e in group)
        # a compressed pcluster decodes to one length (PARTIAL_REF: a start of it); a
        # plain one is copied, any extent its start
        whole = {e.llen for e in group if not e.partial} if group[0].alg >= 0 else set()
        if len(whole) > 1 or whole and longest not in whole:
            raise img._err(f"{what}: the pcluster at {group[0].pa} decodes to "
                           f"{sorted(whole)[0]} bytes and to {longest}")
        one = group[0]._replace(llen=longest, partial=not whole)
        buf = decode_extent(img, one, what)
        pieces += [(e.la, e.llen, buf) for e in group]
    pieces.sort(key=lambda p: p[0])
    return pieces
