"""The long xattr name prefix table read from a compressed packed inode (-E fragments:
mkfs writes it at the head of the packed inode's data, xattr_prefix_start 0) is read
from the extents holding it: the packed inode was decoded from its start up to
xattr_prefix_start * 4 (up to 16 GiB, 1 MiB at a time), so an extent before the table
that does not decode failed the image's xattrs, and a crafted one made each image's
first long-prefix xattr read seconds of decoding."""
from __future__ import annotations

import os
import struct

from helpers import run_mkfs
from image_edits import append_records_inode, no_checksum

from erofs_tools.errors import CorruptImageError
from erofs_tools.format import erofs as E
from erofs_tools.reader.image import Image
from erofs_tools.reader.zdata import state
from erofs_tools.reader.zmap import ALG_SHIFTED, PCLUSTER


def test_prefix_table_after_an_extent_that_does_not_decode(tmp_path):
    t = tmp_path / "t"
    t.mkdir()
    for i in range(8):          # small files: a packed inode of more than a block
        (t / f"f{i}").write_bytes(os.urandom(1000) * 2)
    img = tmp_path / "p.img"
    run_mkfs(img, t, "-zlz4", "-Efragments", "--xattr-prefix", "user.myapp.")
    data = bytearray(img.read_bytes())
    im = Image(bytes(data))
    assert im.long_xattr_prefixes() == [b"user.myapp."] and im.sb.xattr_prefix_start == 0
    packed = im.inode(im.sb.packed_nid)
    head = state(im).zmap(packed).extents[0]
    assert head.kind == PCLUSTER and not head.partial
    fmt = 0 if head.alg == ALG_SHIFTED else head.alg + 1
    # a new packed inode, two 16-byte records: 1 MiB that is no lz4 (block 0: the
    # superblock's), then the old head extent, the table at its start
    skip = 1 << 20
    recs = struct.pack("<IIII", 1 << E.EXTENT_PLEN_FMT_BIT | im.blksz, 0, 0, 0)
    recs += struct.pack("<IIII", fmt << E.EXTENT_PLEN_FMT_BIT | head.plen, head.pa, 0, skip)
    nid = append_records_inode(data, im, packed, skip + head.llen,
                               E.ADVISE_EXTENTS | 2 << E.ADVISE_EXTRECSZ_BIT, 2, recs,
                               im.blksz)
    struct.pack_into("<Q", data, E.SUPER_OFFSET + 96, nid)           # packed_nid
    struct.pack_into("<I", data, E.SUPER_OFFSET + 92, skip // 4)     # xattr_prefix_start
    no_checksum(data)
    bad = Image(bytes(data))
    assert bad.sb.packed_nid == nid
    assert bad.sb.xattr_prefix_start == skip // 4
    assert bad.long_xattr_prefixes() == [b"user.myapp."]
    try:
        bad.read_data(bad.inode(bad.sb.packed_nid))
        raise AssertionError("the extent before the table decoded")
    except CorruptImageError as e:
        assert "\n" not in str(e)
