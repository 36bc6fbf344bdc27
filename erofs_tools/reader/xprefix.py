"""Long xattr name prefixes (INCOMPAT_XATTR_PREFIXES, Linux 6.4+): the table an xattr
entry with e_name_index bit 7 set points into, read as the kernel reads it.

The table is in the packed inode's data when the image has one and does not say
PLAIN_XATTR_PFX (what mkfs.erofs 1.9 writes with -E fragments), else at an absolute
offset of the image (xattr_prefix_start * 4, usually right after the superblock). Every
byte is untrusted: at most `count` entries of at most 261 bytes are read.
"""
from __future__ import annotations

from typing import Any

from erofs_tools.format import erofs as E


def read_long_prefixes(img: Any) -> list[bytes]:
    """The full long prefixes of the Image `img` (bytes), [] without the feature."""
    sb = img.sb
    count = sb.xattr_prefix_count
    if not count or not sb.feature_incompat & E.FEATURE_INCOMPAT_XATTR_PREFIXES:
        return []
    pos = sb.xattr_prefix_start * 4
    most = count * (2 + 1 + E.NAME_MAX + 3)      # the largest table of `count` entries
    plain = sb.feature_compat & E.FEATURE_COMPAT_PLAIN_XATTR_PFX
    if sb.packed_nid and not plain:
        packed = img.inode(sb.packed_nid)
        if not packed.is_reg():
            raise img._err(f"packed inode {sb.packed_nid} is not a regular file")
        if pos >= packed.size:
            raise img._err(f"long xattr prefixes at {pos} beyond the packed inode")
        buf = bytearray()
        for off, data, n in img.iter_data(packed):
            if off + n <= pos:
                continue
            piece = data if data is not None else bytes(n)
            buf += piece[max(0, pos - off):]
            if len(buf) >= most:
                break
        table = bytes(buf[:most])
    else:
        if pos >= img.size:
            raise img._err(f"long xattr prefixes at {pos} beyond the image")
        table = bytes(img.data[pos:pos + most])
    got = E.decode_long_prefixes(table, count)
    if isinstance(got, str):
        raise img._err(got)
    return got
