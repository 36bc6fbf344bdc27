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
"""
from __future__ import annotations

from typing import Any

from erofs_tools.format import erofs as E
from erofs_tools.reader.zdata import HOLE, is_compressed, state

# The decoded metabox is held in memory: ~100 bytes per inode (its record, xattrs,
# inline tail), so 1 GiB is some 10 million inodes; a larger one is refused
MAX_METABOX = 1 << 30


class MetaSpace:
    """The metabox's decoded data: the space an in-metabox inode's bytes are read from
    (as the Image is for the others: `data`, `size`, `read`)."""

    def __init__(self, img: Any, nid: int, data: bytes) -> None:
        self.img = img
        self.nid = nid
        self.data = data
        self.size = len(data)
        self.name = img.name

    def read(self, offset: int, length: int, what: str = "metadata") -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self.img._err(
                f"{what} at [{offset}, {offset + length}) is outside the metabox "
                f"(nid {self.nid}, {self.size} bytes)")
        return self.data[offset:offset + length]


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
    else:
        for ext in state(img).zmap(ino).extents:
            if ext.kind == HOLE:
                # zeros: no inode is stored there (mkfs never leaves one)
                raise img._err(f"metabox inode {nid}: a hole of {ext.llen} bytes at "
                               f"{ext.la}: the metabox stores its inodes")
    return MetaSpace(img, nid, img.read_data(ino))
