/* The C side of the format agreement check: every field of every on-disk struct in
 * erofs_fs.h with its offset and size, and the format constants the core writes, so
 * tests/test_format_agreement.py can compare them with erofs_tools/format. Reserved
 * fields are left out (the Python records do not name them). */
#include "erofs_fs.h"
#include "erofs_native.h"

#define FIELD(type, f) \
    {#type, #f, (uint32_t)offsetof(struct type, f), \
     (uint32_t)sizeof(((struct type *)0)->f), (uint32_t)sizeof(struct type)}

static const struct erofs_fs_field fields[] = {
    FIELD(erofs_super_block, magic), FIELD(erofs_super_block, checksum),
    FIELD(erofs_super_block, feature_compat), FIELD(erofs_super_block, blkszbits),
    FIELD(erofs_super_block, sb_extslots), FIELD(erofs_super_block, root_nid),
    FIELD(erofs_super_block, inos), FIELD(erofs_super_block, build_time),
    FIELD(erofs_super_block, build_time_nsec), FIELD(erofs_super_block, blocks),
    FIELD(erofs_super_block, meta_blkaddr), FIELD(erofs_super_block, xattr_blkaddr),
    FIELD(erofs_super_block, uuid), FIELD(erofs_super_block, volume_name),
    FIELD(erofs_super_block, feature_incompat), FIELD(erofs_super_block, u1),
    FIELD(erofs_super_block, extra_devices), FIELD(erofs_super_block, devt_slotoff),
    FIELD(erofs_super_block, dirblkbits), FIELD(erofs_super_block, xattr_prefix_count),
    FIELD(erofs_super_block, xattr_prefix_start), FIELD(erofs_super_block, packed_nid),
    FIELD(erofs_super_block, xattr_filter_reserved),
    FIELD(erofs_super_block, ishare_xattr_prefix_id),

    FIELD(erofs_inode_compact, i_format), FIELD(erofs_inode_compact, i_xattr_icount),
    FIELD(erofs_inode_compact, i_mode), FIELD(erofs_inode_compact, i_nlink),
    FIELD(erofs_inode_compact, i_size), FIELD(erofs_inode_compact, i_mtime),
    FIELD(erofs_inode_compact, i_u), FIELD(erofs_inode_compact, i_ino),
    FIELD(erofs_inode_compact, i_uid), FIELD(erofs_inode_compact, i_gid),

    FIELD(erofs_inode_extended, i_format), FIELD(erofs_inode_extended, i_xattr_icount),
    FIELD(erofs_inode_extended, i_mode), FIELD(erofs_inode_extended, i_nb),
    FIELD(erofs_inode_extended, i_size), FIELD(erofs_inode_extended, i_u),
    FIELD(erofs_inode_extended, i_ino), FIELD(erofs_inode_extended, i_uid),
    FIELD(erofs_inode_extended, i_gid), FIELD(erofs_inode_extended, i_mtime),
    FIELD(erofs_inode_extended, i_mtime_nsec), FIELD(erofs_inode_extended, i_nlink),

    FIELD(erofs_xattr_ibody_header, h_name_filter),
    FIELD(erofs_xattr_ibody_header, h_shared_count),
    FIELD(erofs_xattr_entry, e_name_len), FIELD(erofs_xattr_entry, e_name_index),
    FIELD(erofs_xattr_entry, e_value_size),

    FIELD(erofs_inode_chunk_index, advise), FIELD(erofs_inode_chunk_index, device_id),
    FIELD(erofs_inode_chunk_index, blkaddr),

    FIELD(erofs_dirent, nid), FIELD(erofs_dirent, nameoff), FIELD(erofs_dirent, file_type),

    FIELD(erofs_deviceslot, tag), FIELD(erofs_deviceslot, blocks),
    FIELD(erofs_deviceslot, mapped_blkaddr), FIELD(erofs_deviceslot, blocks_hi),

    FIELD(z_erofs_map_header, h_reserved1), FIELD(z_erofs_map_header, h_idata_size),
    FIELD(z_erofs_map_header, h_advise), FIELD(z_erofs_map_header, h_algorithmtype),
    FIELD(z_erofs_map_header, h_clusterbits),
    FIELD(z_erofs_lcluster_index, di_advise), FIELD(z_erofs_lcluster_index, di_clusterofs),
    FIELD(z_erofs_lcluster_index, di_u),
    FIELD(z_erofs_extent, plen), FIELD(z_erofs_extent, pstart_lo),
    FIELD(z_erofs_extent, pstart_hi), FIELD(z_erofs_extent, lstart_lo),
    FIELD(z_erofs_extent, lstart_hi),
    FIELD(z_erofs_lz4_cfgs, max_distance), FIELD(z_erofs_lz4_cfgs, max_pclusterblks),
    FIELD(z_erofs_lzma_cfgs, dict_size), FIELD(z_erofs_lzma_cfgs, format),
    FIELD(z_erofs_deflate_cfgs, windowbits),
    FIELD(z_erofs_zstd_cfgs, format), FIELD(z_erofs_zstd_cfgs, windowlog),
};

#define CONST(name) {#name, (uint64_t)(name)}

static const struct erofs_fs_const consts[] = {
    CONST(EROFS_SUPER_MAGIC), CONST(EROFS_SUPER_OFFSET), CONST(EROFS_SLOT_SIZE),
    CONST(EROFS_NULL_ADDR), CONST(EROFS_NAME_MAX),
    CONST(EROFS_FEATURE_COMPAT_SB_CHKSUM), CONST(EROFS_FEATURE_COMPAT_MTIME),
    CONST(EROFS_FEATURE_INCOMPAT_CHUNKED_FILE), CONST(EROFS_FEATURE_INCOMPAT_DEVICE_TABLE),
    CONST(EROFS_INODE_COMPACT), CONST(EROFS_INODE_EXTENDED),
    CONST(EROFS_INODE_FLAT_PLAIN), CONST(EROFS_INODE_FLAT_INLINE),
    CONST(EROFS_INODE_CHUNK_BASED),
    CONST(EROFS_CHUNK_FORMAT_BLKBITS_MASK), CONST(EROFS_CHUNK_FORMAT_INDEXES),
    CONST(EROFS_CHUNK_FORMAT_SUPPORTED),
    CONST(EROFS_FT_UNKNOWN), CONST(EROFS_FT_REG_FILE), CONST(EROFS_FT_DIR),
    CONST(EROFS_FT_CHRDEV), CONST(EROFS_FT_BLKDEV), CONST(EROFS_FT_FIFO),
    CONST(EROFS_FT_SOCK), CONST(EROFS_FT_SYMLINK),
    CONST(EROFS_FEATURE_INCOMPAT_ZERO_PADDING), CONST(EROFS_FEATURE_INCOMPAT_COMPR_CFGS),
    CONST(EROFS_INODE_COMPRESSED_FULL), CONST(EROFS_INODE_COMPRESSED_COMPACT),
    CONST(Z_EROFS_COMPRESSION_LZ4), CONST(Z_EROFS_COMPRESSION_LZMA),
    CONST(Z_EROFS_COMPRESSION_DEFLATE), CONST(Z_EROFS_COMPRESSION_ZSTD),
    CONST(Z_EROFS_LCLUSTER_TYPE_PLAIN), CONST(Z_EROFS_LCLUSTER_TYPE_HEAD1),
    CONST(Z_EROFS_LCLUSTER_TYPE_NONHEAD), CONST(Z_EROFS_LI_D0_CBLKCNT),
    CONST(Z_EROFS_ADVISE_COMPACTED_2B), CONST(Z_EROFS_ADVISE_BIG_PCLUSTER_1),
    CONST(Z_EROFS_ADVISE_BIG_PCLUSTER_2), CONST(Z_EROFS_ADVISE_EXTENTS),
    CONST(Z_EROFS_ADVISE_EXTRECSZ_BIT), CONST(Z_EROFS_ADVISE_EXTRECSZ_MASK),
    CONST(Z_EROFS_EXTENT_PLEN_PARTIAL), CONST(Z_EROFS_EXTENT_PLEN_FMT_BIT),
    CONST(Z_EROFS_EXTENT_PLEN_MASK), CONST(EROFS_FEATURE_INCOMPAT_48BIT),
    CONST(EROFS_FEATURE_COMPAT_PLAIN_XATTR_PFX), CONST(EROFS_FEATURE_COMPAT_ISHARE_XATTRS),
    CONST(EROFS_FEATURE_INCOMPAT_XATTR_PREFIXES), CONST(EROFS_XATTR_LONG_PREFIX),
    CONST(EROFS_XATTR_LONG_PREFIX_MASK), CONST(EROFS_FEATURE_COMPAT_XATTR_FILTER),
    CONST(EROFS_XATTR_FILTER_BITS), CONST(EROFS_XATTR_FILTER_SEED),
    CONST(Z_EROFS_PCLUSTER_MAX_SIZE), CONST(Z_EROFS_LZMA_MAX_DICT_SIZE),
    CONST(Z_EROFS_ZSTD_MAX_DICT_SIZE), CONST(Z_EROFS_DEFLATE_MAX_DICT_SIZE),
    CONST(EROFS_FEATURE_INCOMPAT_METABOX), CONST(EROFS_FEATURE_COMPAT_SHARED_EA_IN_METABOX),
    CONST(EROFS_SB_EXTSLOT_SIZE), CONST(EROFS_SB_METABOX_NID_OFFSET),
    CONST(EROFS_DIRENT_NID_METABOX_BIT),
};

const struct erofs_fs_field *erofs_fs_fields(uint32_t *count)
{
    *count = (uint32_t)(sizeof(fields) / sizeof(fields[0]));
    return fields;
}

const struct erofs_fs_const *erofs_fs_consts(uint32_t *count)
{
    *count = (uint32_t)(sizeof(consts) / sizeof(consts[0]));
    return consts;
}
