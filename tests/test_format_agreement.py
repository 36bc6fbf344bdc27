"""The C core and erofs_tools/format describe the same on-disk structs.

csrc/erofs_fs.h is the C definition of each EROFS struct, erofs_tools/format/erofs.py the
Python one; the C core reports its compiled offsets and sizes (erofs_fs_fields) and its
format constants (erofs_fs_consts), and both must agree field by field. A last check
decodes an image written by the C core through the Python records.
"""
import os
import stat

import pytest

from erofs_tools import _native
from erofs_tools._native import BuildOptions, NativeBuilder
from erofs_tools.format import erofs as E

# C struct -> its Python record
TWINS = {
    "erofs_super_block": E.SuperBlock,
    "erofs_inode_compact": E.CompactInode,
    "erofs_inode_extended": E.ExtendedInode,
    "erofs_xattr_ibody_header": E.XattrIbodyHeader,
    "erofs_xattr_entry": E.XattrEntry,
    "erofs_inode_chunk_index": E.ChunkIndex,
    "erofs_dirent": E.Dirent,
    "erofs_deviceslot": E.DeviceSlot,
    "z_erofs_map_header": E.MapHeader,
    "z_erofs_lcluster_index": E.LclusterIndex,
    "z_erofs_extent": E.Extent,
    "z_erofs_lz4_cfgs": E.Lz4Cfgs,
    "z_erofs_lzma_cfgs": E.LzmaCfgs,
    "z_erofs_deflate_cfgs": E.DeflateCfgs,
    "z_erofs_zstd_cfgs": E.ZstdCfgs,
}

# C macro -> Python constant
CONSTANTS = {
    "EROFS_SUPER_MAGIC": E.MAGIC,
    "EROFS_SUPER_OFFSET": E.SUPER_OFFSET,
    "EROFS_SLOT_SIZE": E.SLOT_SIZE,
    "EROFS_NULL_ADDR": E.NULL_ADDR,
    "EROFS_NAME_MAX": E.NAME_MAX,
    "EROFS_FEATURE_COMPAT_SB_CHKSUM": E.FEATURE_COMPAT_SB_CHKSUM,
    "EROFS_FEATURE_COMPAT_MTIME": E.FEATURE_COMPAT_MTIME,
    "EROFS_FEATURE_INCOMPAT_CHUNKED_FILE": E.FEATURE_INCOMPAT_CHUNKED_FILE,
    "EROFS_FEATURE_INCOMPAT_DEVICE_TABLE": E.FEATURE_INCOMPAT_DEVICE_TABLE,
    "EROFS_INODE_COMPACT": E.INODE_COMPACT,
    "EROFS_INODE_EXTENDED": E.INODE_EXTENDED,
    "EROFS_INODE_FLAT_PLAIN": E.LAYOUT_FLAT_PLAIN,
    "EROFS_INODE_FLAT_INLINE": E.LAYOUT_FLAT_INLINE,
    "EROFS_INODE_CHUNK_BASED": E.LAYOUT_CHUNK_BASED,
    "EROFS_CHUNK_FORMAT_BLKBITS_MASK": E.CHUNK_FORMAT_BLKBITS_MASK,
    "EROFS_CHUNK_FORMAT_INDEXES": E.CHUNK_FORMAT_INDEXES,
    "EROFS_CHUNK_FORMAT_SUPPORTED": E.CHUNK_FORMAT_SUPPORTED,
    "EROFS_FT_UNKNOWN": E.FT_UNKNOWN,
    "EROFS_FT_REG_FILE": E.FT_REG,
    "EROFS_FT_DIR": E.FT_DIR,
    "EROFS_FT_CHRDEV": E.FT_CHR,
    "EROFS_FT_BLKDEV": E.FT_BLK,
    "EROFS_FT_FIFO": E.FT_FIFO,
    "EROFS_FT_SOCK": E.FT_SOCK,
    "EROFS_FT_SYMLINK": E.FT_SYMLINK,
    "EROFS_FEATURE_INCOMPAT_ZERO_PADDING": E.FEATURE_INCOMPAT_ZERO_PADDING,
    "EROFS_FEATURE_INCOMPAT_COMPR_CFGS": E.FEATURE_INCOMPAT_COMPR_CFGS,
    "EROFS_INODE_COMPRESSED_FULL": E.LAYOUT_COMPRESSED_FULL,
    "EROFS_INODE_COMPRESSED_COMPACT": E.LAYOUT_COMPRESSED_COMPACT,
    "Z_EROFS_COMPRESSION_LZ4": E.COMPRESSION_LZ4,
    "Z_EROFS_COMPRESSION_LZMA": E.COMPRESSION_LZMA,
    "Z_EROFS_COMPRESSION_DEFLATE": E.COMPRESSION_DEFLATE,
    "Z_EROFS_COMPRESSION_ZSTD": E.COMPRESSION_ZSTD,
    "Z_EROFS_LCLUSTER_TYPE_PLAIN": E.LCLUSTER_TYPE_PLAIN,
    "Z_EROFS_LCLUSTER_TYPE_HEAD1": E.LCLUSTER_TYPE_HEAD1,
    "Z_EROFS_LCLUSTER_TYPE_NONHEAD": E.LCLUSTER_TYPE_NONHEAD,
    "Z_EROFS_LI_D0_CBLKCNT": E.LI_D0_CBLKCNT,
    "Z_EROFS_ADVISE_COMPACTED_2B": E.ADVISE_COMPACTED_2B,
    "Z_EROFS_ADVISE_BIG_PCLUSTER_1": E.ADVISE_BIG_PCLUSTER_1,
    "Z_EROFS_ADVISE_BIG_PCLUSTER_2": E.ADVISE_BIG_PCLUSTER_2,
    "Z_EROFS_ADVISE_EXTENTS": E.ADVISE_EXTENTS,
    "Z_EROFS_ADVISE_EXTRECSZ_BIT": E.ADVISE_EXTRECSZ_BIT,
    "Z_EROFS_ADVISE_EXTRECSZ_MASK": E.ADVISE_EXTRECSZ_MASK,
    "Z_EROFS_EXTENT_PLEN_PARTIAL": E.EXTENT_PLEN_PARTIAL,
    "Z_EROFS_EXTENT_PLEN_FMT_BIT": E.EXTENT_PLEN_FMT_BIT,
    "Z_EROFS_EXTENT_PLEN_MASK": E.EXTENT_PLEN_MASK,
    "EROFS_FEATURE_INCOMPAT_48BIT": E.FEATURE_INCOMPAT_48BIT,
    "EROFS_FEATURE_COMPAT_PLAIN_XATTR_PFX": E.FEATURE_COMPAT_PLAIN_XATTR_PFX,
    "EROFS_FEATURE_COMPAT_ISHARE_XATTRS": E.FEATURE_COMPAT_ISHARE_XATTRS,
    "EROFS_FEATURE_INCOMPAT_XATTR_PREFIXES": E.FEATURE_INCOMPAT_XATTR_PREFIXES,
    "EROFS_XATTR_LONG_PREFIX": E.XATTR_LONG_PREFIX,
    "EROFS_XATTR_LONG_PREFIX_MASK": E.XATTR_LONG_PREFIX_MASK,
    "EROFS_FEATURE_COMPAT_XATTR_FILTER": E.FEATURE_COMPAT_XATTR_FILTER,
    "EROFS_XATTR_FILTER_BITS": E.XATTR_FILTER_BITS,
    "EROFS_XATTR_FILTER_SEED": E.XATTR_FILTER_SEED,
    "Z_EROFS_PCLUSTER_MAX_SIZE": E.PCLUSTER_MAX_SIZE,
    "Z_EROFS_LZMA_MAX_DICT_SIZE": E.LZMA_MAX_DICT_SIZE,
    "Z_EROFS_ZSTD_MAX_DICT_SIZE": E.ZSTD_MAX_DICT_SIZE,
    "Z_EROFS_DEFLATE_MAX_DICT_SIZE": E.DEFLATE_MAX_DICT_SIZE,
    "EROFS_FEATURE_INCOMPAT_METABOX": E.FEATURE_INCOMPAT_METABOX,
    "EROFS_FEATURE_COMPAT_SHARED_EA_IN_METABOX": E.FEATURE_COMPAT_SHARED_EA_IN_METABOX,
    "EROFS_SB_EXTSLOT_SIZE": E.SB_EXTSLOT_SIZE,
    "EROFS_SB_METABOX_NID_OFFSET": E.SB_METABOX_NID_OFFSET,
    "EROFS_DIRENT_NID_METABOX_BIT": E.NID_METABOX_BIT,
}


def test_every_c_struct_has_a_python_twin():
    assert set(_native.format_fields()) == set(TWINS)


@pytest.mark.parametrize("cname", sorted(TWINS))
def test_struct_sizes_and_offsets_agree(cname):
    c = dict(_native.format_fields()[cname])
    py = TWINS[cname]
    assert c.pop("")[1] == py.SIZE, f"sizeof(struct {cname}) != {py.__name__}.SIZE"
    assert c == py.field_layout(), f"struct {cname} and {py.__name__} differ"


def test_constants_agree():
    c = _native.format_constants()
    assert set(c) == set(CONSTANTS)
    for name, value in CONSTANTS.items():
        assert c[name] == value, name


def test_native_constants_come_from_the_format_layer():
    assert _native.CHUNK_INDEXES == E.CHUNK_FORMAT_INDEXES
    assert _native.FEATURE_COMPAT_MTIME == BuildOptions().feature_compat == E.FEATURE_COMPAT_MTIME
    assert _native.FEATURE_INCOMPAT_DEVICE_TABLE == E.FEATURE_INCOMPAT_DEVICE_TABLE


def test_c_written_image_decodes_through_the_python_records(tmp_path):
    """Every struct the C core writes, read back with erofs_tools/format at the places
    the format puts them."""
    b = NativeBuilder(BuildOptions(build_time=1000, uuid=bytes(range(16)),
                                   volume_name=b"agree", devt_slotoff=10, meta_blkaddr=1,
                                   sb_checksum=True))
    root = b.add_node(stat.S_IFDIR | 0o755, 0, 0, 1000)
    f = b.add_node(stat.S_IFREG | 0o600, 70000, 5, 1234, 5, size=3)   # extended inode
    b.set_bytes(f, b"abc")
    b.add_xattr(f, b"user.k", b"v1")
    c = b.add_node(stat.S_IFREG | 0o644, 1, 2, 1000, size=8192)        # compact, chunked
    b.set_chunks(c, E.CHUNK_FORMAT_INDEXES, [7 | 1 << 16 | 3 << 32, 8 | 1 << 16 | 4 << 32])
    b.add_child(root, b"f", f)
    b.add_child(root, b"c", c)
    b.set_root(root)
    dev = b.add_device(b"blob0", 16, 0)
    info = b.layout()
    out = tmp_path / "img"
    fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        b.write(fd)
    finally:
        os.close(fd)
    img = out.read_bytes()

    sb = E.SuperBlock.decode(img, E.SUPER_OFFSET)
    assert (sb.magic, sb.blkszbits, sb.root_nid, sb.inos) == (E.MAGIC, 12, info.root_nid, 3)
    assert sb.checksum == E.superblock_checksum(img[:E.BLKSZ])
    assert (sb.uuid, sb.volume_name.rstrip(b"\0")) == (bytes(range(16)), b"agree")
    assert (sb.extra_devices, sb.devt_slotoff, sb.build_time) == (1, 10, 1000)
    assert sb.feature_incompat == E.FEATURE_INCOMPAT_CHUNKED_FILE | E.FEATURE_INCOMPAT_DEVICE_TABLE

    slot = E.DeviceSlot.decode(img, sb.devt_slotoff * E.DEVICE_SLOT_SIZE + (dev - 1) * 128)
    assert (slot.tag.rstrip(b"\0"), slot.blocks) == (b"blob0", 16)

    meta = sb.meta_blkaddr * E.BLKSZ
    fi = E.ExtendedInode.decode(img, meta + b.nid(f) * E.SLOT_SIZE)
    assert E.i_format_version(fi.i_format) == E.INODE_EXTENDED
    assert (fi.i_uid, fi.i_gid, fi.i_mtime, fi.i_mtime_nsec, fi.i_size, fi.i_nlink) == \
        (70000, 5, 1234, 5, 3, 1)
    xoff = meta + b.nid(f) * E.SLOT_SIZE + E.ExtendedInode.SIZE
    hdr = E.XattrIbodyHeader.decode(img, xoff)
    # header + one 8-byte entry (4 + "k" + "v1", padded)
    assert hdr.h_shared_count == 0 and E.xattr_ibody_size(fi.i_xattr_icount) == 12 + 8
    xe = E.XattrEntry.decode(img, xoff + E.XattrIbodyHeader.SIZE)
    assert (xe.e_name_index, xe.e_name_len, xe.e_value_size) == (E.XATTR_INDEX_USER, 1, 2)

    ci = E.CompactInode.decode(img, meta + b.nid(c) * E.SLOT_SIZE)
    assert E.i_format_layout(ci.i_format) == E.LAYOUT_CHUNK_BASED
    assert (ci.i_uid, ci.i_gid, ci.i_size, ci.i_u) == (1, 2, 8192, E.CHUNK_FORMAT_INDEXES)
    idx_off = meta + b.nid(c) * E.SLOT_SIZE + E.CompactInode.SIZE
    idx = [E.ChunkIndex.decode(img, idx_off + k * E.ChunkIndex.SIZE) for k in range(2)]
    assert [(i.advise, i.device_id, i.blkaddr) for i in idx] == [(7, 1, 3), (8, 1, 4)]

    ri = E.CompactInode.decode(img, meta + info.root_nid * E.SLOT_SIZE)
    assert E.i_format_layout(ri.i_format) == E.LAYOUT_FLAT_INLINE
    dirs = img[meta + info.root_nid * E.SLOT_SIZE + E.CompactInode.SIZE:][:ri.i_size]
    first = E.Dirent.decode(dirs, 0)
    n = first.nameoff // E.Dirent.SIZE
    ents = [E.Dirent.decode(dirs, k * E.Dirent.SIZE) for k in range(n)]
    ends = [e.nameoff for e in ents[1:]] + [ri.i_size]
    names = [dirs[e.nameoff:end] for e, end in zip(ents, ends)]
    assert names == [b".", b"..", b"c", b"f"]
    assert [(e.nid, e.file_type) for e in ents] == [
        (info.root_nid, E.FT_DIR), (info.root_nid, E.FT_DIR), (b.nid(c), E.FT_REG),
        (b.nid(f), E.FT_REG)]
