"""An inode's xattrs (its ibody: shared ids, inline entries), and the long xattr name
prefixes (INCOMPAT_XATTR_PREFIXES, Linux 6.4+): the table an xattr entry with
e_name_index bit 7 set points into, read as the kernel reads it.

The table is, unless the image says PLAIN_XATTR_PFX, in the metabox's data when the
image has one (metadata compression, mkfs.erofs 1.9 -m: reader/metabox.py), else in the
packed inode's when it has one (what mkfs.erofs 1.9 writes with -E fragments); else at
an absolute offset of the image (xattr_prefix_start * 4, usually right after the
superblock). Every
byte is untrusted: at most `count` entries of at most 261 bytes are read.
"""
from __future__ import annotations

from typing import Any

from erofs_tools.format import erofs as E
from erofs_tools.fsutil import round_up
from erofs_tools.reader.zdata import is_compressed, read_range


def _xattr_entry(img: Any, buf: Any, off: int, end: int, what: str
                 ) -> tuple[bytes, bytes, int]:
    if off + E.XattrEntry.SIZE > end:
        raise img._err(f"{what}: xattr entry truncated")
    e = E.XattrEntry.decode(buf, off)
    nstart = off + E.XattrEntry.SIZE
    vend = nstart + e.e_name_len + e.e_value_size
    if vend > end:
        raise img._err(f"{what}: xattr entry runs past its area")
    if e.e_name_index & E.XATTR_LONG_PREFIX:
        longs = img.long_xattr_prefixes()
        i = e.e_name_index & E.XATTR_LONG_PREFIX_MASK
        prefix = longs[i] if i < len(longs) else None
    else:
        prefix = E.XATTR_PREFIXES.get(e.e_name_index)
    if prefix is None:
        raise img._err(f"{what}: unsupported xattr name index {e.e_name_index:#x}")
    suffix = bytes(buf[nstart:nstart + e.e_name_len])
    if b"\0" in suffix:
        raise img._err(f"{what}: xattr name contains NUL")
    value = bytes(buf[nstart + e.e_name_len:vend])
    return prefix + suffix, value, round_up(vend, 4)


def read_xattrs(img: Any, ino: Any) -> list[tuple[bytes, bytes]]:
    """[(name, value)] of inode `ino` of the Image `img`, shared ones first, as stored."""
    if ino.xattr_icount == 0:
        return []
    what = f"inode {ino.nid}"
    if ino.xattr_icount == 1:
        raise img._err(f"{what}: xattr icount 1 (header only) is not supported")
    buf = img.space_of(ino).read(ino.offset + ino.inode_size, ino.xattr_isize, f"{what} xattrs")
    hdr = E.XattrIbodyHeader.decode(buf, 0)
    off = E.XattrIbodyHeader.SIZE
    out = []
    if off + 4 * hdr.h_shared_count > len(buf):
        raise img._err(f"{what}: {hdr.h_shared_count} shared xattr ids do not fit")
    shared = img.shared_xattr_space() if hdr.h_shared_count else img
    for _ in range(hdr.h_shared_count):
        xid = int.from_bytes(buf[off:off + 4], "little")
        off += 4
        pos = img.xattr_off + 4 * xid
        if pos >= shared.size:
            raise img._err(f"{what}: shared xattr {xid} outside the image")
        sw = f"{what} shared xattr {xid}"
        he = E.XattrEntry.decode(shared.read(pos, E.XattrEntry.SIZE, sw))
        sbuf = shared.read(pos, E.XattrEntry.SIZE + he.e_name_len + he.e_value_size, sw)
        name, value, _ = _xattr_entry(img, sbuf, 0, len(sbuf), sw)
        out.append((name, value))
    while off < len(buf):
        if not any(buf[off:off + E.XattrEntry.SIZE]):
            # an entry of no name (index 0): padding the kernel skips, as mkfs
            # --root-xattr-isize (and mkfs.erofs's) leaves after the root's xattrs
            off += E.XattrEntry.SIZE
            continue
        name, value, off = _xattr_entry(img, buf, off, len(buf), what)
        out.append((name, value))
    return out


def read_long_prefixes(img: Any) -> list[bytes]:
    """The full long prefixes of the Image `img` (bytes), [] without the feature."""
    sb = img.sb
    count = sb.xattr_prefix_count
    if not count or not sb.feature_incompat & E.FEATURE_INCOMPAT_XATTR_PREFIXES:
        return []
    pos = sb.xattr_prefix_start * 4
    most = count * (2 + 1 + E.NAME_MAX + 3)      # the largest table of `count` entries
    plain = sb.feature_compat & E.FEATURE_COMPAT_PLAIN_XATTR_PFX
    if img.metabox is not None and not plain:
        box = img.metabox
        if pos >= box.size:
            raise img._err(f"long xattr prefixes at {pos} beyond the metabox")
        table = box.read(pos, min(most, box.size - pos), "long xattr prefixes")
    elif sb.packed_nid and not plain:
        packed = img.inode(sb.packed_nid)
        if not packed.is_reg():
            raise img._err(f"packed inode {sb.packed_nid} is not a regular file")
        if pos >= packed.size:
            raise img._err(f"long xattr prefixes at {pos} beyond the packed inode")
        n = min(most, packed.size - pos)
        if is_compressed(packed):
            # the extents there only: xattr_prefix_start may be GiBs into it (its data
            # before the table was decoded and dropped, 1 MiB at a time)
            table = read_range(img, packed, pos, n)
        else:
            buf = bytearray()
            for off, data, k in img.iter_data(packed):
                if off + k <= pos:
                    continue
                piece = data if data is not None else bytes(k)
                buf += piece[max(0, pos - off):]
                if len(buf) >= most:
                    break
            table = bytes(buf[:n])
    else:
        if pos >= img.size:
            raise img._err(f"long xattr prefixes at {pos} beyond the image")
        table = img.read(pos, min(most, img.size - pos), "long xattr prefixes")
    got = E.decode_long_prefixes(table, count)
    if isinstance(got, str):
        raise img._err(got)
    return got
