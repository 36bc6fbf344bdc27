"""One on-disk inode decoded (compact or extended), and a directory's "." and "..".

The 48-bit layout (FEATURE_INCOMPAT_48BIT, mkfs.erofs 1.9 -E48bit, Linux 6.15+) is read
as the kernel reads it: an extended inode's le16 at 6 holds its block address's bits
32-47, a compact non-directory with i_format bit 4 (NLINK_1) too, its nlink then 1; a
whole-file hole (FLAT_PLAIN) is the address with every bit of its width set (48 bits,
or 32 where the inode holds only those). Compact inodes' mtimes count from the
superblock's epoch (signed), nsec its fixed one: also right for older images, whose
compact inodes hold 0 there and whose epoch is the build time. A directory with
i_format bit 4 (-Edot-omitted) has no "." entry. Without the feature, bit 4 is refused
and an extended inode's le16 at 6 is reserved (check reports it when not 0).

Metadata compression (FEATURE_INCOMPAT_METABOX, mkfs.erofs 1.9 -m, Linux 6.17+): a nid
with bit 63 set names an inode inside the metabox inode's data (reader/metabox.py), at
(nid & NID_MASK) * 32 there. `Image.space_of(ino)` is what holds its bytes (the Image,
or the metabox's MetaSpace) and `offset` / `data_end` count in it: everything read after
the inode itself (xattrs, inline tail, chunk or lcluster indexes, inline pcluster) is
read from that space, as the kernel reads it through the metabox inode's mapping.
"""
from __future__ import annotations

import stat as _stat
from typing import NamedTuple

from erofs_tools.format import erofs as E


class Inode:
    """A decoded on-disk inode (compact or extended)."""

    __slots__ = ("nid", "offset", "version", "layout", "i_format", "mode", "nlink", "size",
                 "uid", "gid", "mtime", "mtime_nsec", "ino", "i_u", "startblk", "dot_omitted",
                 "xattr_icount", "xattr_isize", "inode_size", "reserved_ok", "raw")
    nid: int
    offset: int                 # byte offset in Image.space_of(it): image or metabox
    version: int
    layout: int
    i_format: int
    mode: int
    nlink: int
    size: int
    uid: int
    gid: int
    mtime: int                  # seconds, signed
    mtime_nsec: int
    ino: int
    i_u: int
    startblk: int               # flat layouts' first block (48 bits); NULL_ADDR: none
    dot_omitted: bool           # a directory without its "." entry
    xattr_icount: int
    xattr_isize: int
    inode_size: int
    reserved_ok: bool
    raw: E.CompactInode | E.ExtendedInode

    @property
    def ftype(self):
        return _stat.S_IFMT(self.mode)

    def is_dir(self):
        return self.ftype == _stat.S_IFDIR

    def is_reg(self):
        return self.ftype == _stat.S_IFREG

    def is_lnk(self):
        return self.ftype == _stat.S_IFLNK

    def is_dev(self):
        return self.ftype in (_stat.S_IFCHR, _stat.S_IFBLK)

    @property
    def rdev(self):
        return E.decode_rdev(self.i_u) if self.is_dev() else (0, 0)

    @property
    def data_end(self):
        """Offset right after the inode and its inline xattrs (inline tail / index array)."""
        return self.offset + self.inode_size + self.xattr_isize

    @property
    def layout_name(self):
        return E.LAYOUT_NAMES.get(self.layout, f"layout{self.layout}")

    def as_dict(self):
        d = {"nid": self.nid, "version": "extended" if self.version else "compact",
             "layout": self.layout_name, "mode": f"{self.mode:o}", "nlink": self.nlink,
             "size": self.size, "uid": self.uid, "gid": self.gid, "mtime": self.mtime,
             "mtime_nsec": self.mtime_nsec, "ino": self.ino, "xattr_icount": self.xattr_icount}
        if self.is_dev():
            d["rdev"] = list(self.rdev)
        if self.dot_omitted:
            d["dot_omitted"] = True
        return d


class Dirent(NamedTuple):
    name: bytes
    nid: int
    file_type: int


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >> 63 else v


def read_inode(img, nid: int) -> Inode:
    """Inode `nid` of open image `img`, every field checked as image.py says."""
    if nid < 0:
        raise img._err(f"nid {nid} is outside the image")
    if nid >> E.NID_METABOX_BIT:
        sp, base, where = img.metabox_space(nid), 0, "metabox"
    else:
        sp, base, where = img, img.meta_off, "image"
    slot = nid & E.NID_MASK
    if slot > (sp.size - base) // E.SLOT_SIZE:
        raise img._err(f"nid {nid} is outside the {where}")
    off = base + slot * E.SLOT_SIZE
    if off + E.CompactInode.SIZE > sp.size:
        raise img._err(f"inode {nid} truncated")
    if sp is img:
        data, at = img.data, off
    else:       # the metabox's decoded data: the record's bytes (no flat copy of it)
        data, at = sp.read(off, min(E.ExtendedInode.SIZE, sp.size - off), "inode"), 0
    fmt = int.from_bytes(data[at:at + 2], "little")
    b48 = img.is_48bit
    if fmt & ~(E.I_FORMAT_BITS | (E.I_FORMAT_BIT4 if b48 else 0)):
        raise img._err(f"inode {nid}: unsupported i_format {fmt:#x}")
    ino = Inode()
    ino.nid = nid
    ino.offset = off
    ino.i_format = fmt
    ino.version = E.i_format_version(fmt)
    ino.layout = E.i_format_layout(fmt)
    r: E.CompactInode | E.ExtendedInode
    if ino.version == E.INODE_EXTENDED:
        if off + E.ExtendedInode.SIZE > sp.size:
            raise img._err(f"inode {nid} truncated")
        r = E.ExtendedInode.decode(data, at)
        ino.inode_size = E.ExtendedInode.SIZE
        ino.nlink = r.i_nlink
        ino.size = r.i_size
        ino.mtime = _signed64(r.i_mtime)          # the kernel's time64_t
        ino.mtime_nsec = r.i_mtime_nsec
        hi, width = (r.i_nb, 48) if b48 else (0, 32)
        ino.reserved_ok = b48 or r.i_nb == 0
    else:
        r = E.CompactInode.decode(data, at)
        ino.inode_size = E.CompactInode.SIZE
        ino.size = r.i_size
        if b48 and fmt & E.I_NLINK_1 and _stat.S_IFMT(r.i_mode) != _stat.S_IFDIR:
            ino.nlink, hi, width = 1, r.i_nlink, 48
        else:
            ino.nlink, hi, width = r.i_nlink, 0, 32
        # 6.15+ semantics (also right for older images, which write 0 at 0x0C)
        ino.mtime = img.epoch + r.i_mtime
        ino.mtime_nsec = img.fixed_nsec
        ino.reserved_ok = True
    ino.raw = r
    ino.mode = r.i_mode
    ino.uid = r.i_uid
    ino.gid = r.i_gid
    ino.ino = r.i_ino
    ino.i_u = r.i_u
    ino.xattr_icount = r.i_xattr_icount
    ino.xattr_isize = E.xattr_ibody_size(r.i_xattr_icount)
    ino.dot_omitted = bool(b48 and fmt & E.I_DOT_OMITTED) and ino.is_dir()
    blk = hi << 32 | r.i_u
    if ino.layout == E.LAYOUT_FLAT_PLAIN and blk == (1 << width) - 1:
        blk = E.NULL_ADDR                   # a whole-file hole
    ino.startblk = blk
    if ino.ftype not in E._FT_BY_IFMT:
        raise img._err(f"inode {nid}: bad file mode {ino.mode:#o}")
    if ino.layout not in E.LAYOUT_NAMES:
        raise img._err(f"inode {nid}: unsupported data layout {ino.layout_name}")
    if ino.data_end > sp.size:
        raise img._err(f"inode {nid}: inline xattrs run past the {where} end")
    if ino.ftype in (_stat.S_IFREG, _stat.S_IFDIR, _stat.S_IFLNK) and ino.size >= 1 << 63:
        raise img._err(f"inode {nid}: negative size")
    return ino


def check_dots(img, dino: Inode, ents, parent_nid: int) -> None:
    """Raise unless directory `dino`'s entries hold one "." naming itself (none under
    -Edot-omitted) and one ".." naming `parent_nid`."""
    dots = [d.nid for d in ents if d.name == b"."]
    if dino.dot_omitted:
        if dots:
            raise img._err(f"directory {dino.nid}: a '.' entry, but its format says "
                           "omitted")
    elif dots != [dino.nid]:
        raise img._err(f"directory {dino.nid}: missing or wrong '.'")
    if [d.nid for d in ents if d.name == b".."] != [parent_nid]:
        raise img._err(f"directory {dino.nid}: missing or wrong '..'")
