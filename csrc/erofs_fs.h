/* EROFS on-disk structures as the C core writes them: the one C definition of each.
 *
 * Internal header (NOT the cffi cdef: that is erofs_native.h). Every multi-byte field is
 * little-endian on disk; writers fill a zeroed struct with the cpu_to_le* helpers below.
 * The Python twin of each struct is in erofs_tools/format/erofs.py (same field names);
 * tests/test_format_agreement.py compares both through erofs_fs_fields(). Offsets are
 * those of the kernel's erofs_fs.h; learned from it, not copied.
 */
#ifndef EROFS_FS_H
#define EROFS_FS_H
#include <endian.h>
#include <stddef.h>
#include <stdint.h>

#define EROFS_SUPER_MAGIC 0xE0F5E1E2u
#define EROFS_SUPER_OFFSET 1024u
#define EROFS_SLOT_SIZE 32u            /* nid unit: inode slots of 32 bytes */
#define EROFS_NULL_ADDR 0xFFFFFFFFu    /* hole / "no block" */
#define EROFS_NAME_MAX 255u

#define EROFS_FEATURE_COMPAT_SB_CHKSUM 0x1u
#define EROFS_FEATURE_COMPAT_MTIME 0x2u
#define EROFS_FEATURE_COMPAT_XATTR_FILTER 0x4u  /* xattr name Bloom filters (xattrs.c) */
#define EROFS_FEATURE_COMPAT_PLAIN_XATTR_PFX 0x10u  /* long prefixes in metadata, not packed */
#define EROFS_FEATURE_COMPAT_ISHARE_XATTRS 0x20u    /* per-inode content fingerprints */
#define EROFS_FEATURE_INCOMPAT_ZERO_PADDING 0x1u   /* compressed data right-aligned */
#define EROFS_FEATURE_INCOMPAT_COMPR_CFGS 0x2u     /* per-algorithm records after the sb */
#define EROFS_FEATURE_INCOMPAT_BIG_PCLUSTER 0x2u   /* same bit: pclusters over 1 block */
#define EROFS_FEATURE_INCOMPAT_CHUNKED_FILE 0x4u
#define EROFS_FEATURE_INCOMPAT_DEVICE_TABLE 0x8u
#define EROFS_FEATURE_INCOMPAT_ZTAILPACKING 0x10u  /* compressed tails inline (h_idata_size) */
#define EROFS_FEATURE_INCOMPAT_FRAGMENTS 0x20u     /* tails in the packed inode */
#define EROFS_FEATURE_INCOMPAT_DEDUPE 0x20u        /* same bit: pclusters shared by files */
#define EROFS_FEATURE_INCOMPAT_XATTR_PREFIXES 0x40u /* long xattr name prefix table */
#define EROFS_FEATURE_INCOMPAT_48BIT 0x80u /* 48-bit layout (Linux 6.15+): see write.c */
/* metadata compression (Linux 6.17+): a 144-byte superblock whose le64 at 0x80 is the
 * metabox inode's nid; an inode whose nid has bit 63 set is in that inode's data */
#define EROFS_FEATURE_INCOMPAT_METABOX 0x100u
#define EROFS_FEATURE_COMPAT_SHARED_EA_IN_METABOX 0x8u
#define EROFS_SB_EXTSLOT_SIZE 16u
#define EROFS_SB_METABOX_NID_OFFSET 0x80u
#define EROFS_DIRENT_NID_METABOX_BIT 63u
#define EROFS_I_DOT_OMITTED (1u << 4)     /* a directory without its "." entry */

/* e_name_index with this bit: the low 7 bits index the long prefix table, whose entries
 * (at xattr_prefix_start * 4, each 4-byte aligned) are a le16 size, then `size` bytes:
 * the short prefix index the long one extends (0: none) and the rest of the prefix */
#define EROFS_XATTR_LONG_PREFIX 0x80u
#define EROFS_XATTR_LONG_PREFIX_MASK 0x7fu
#define EROFS_XATTR_FILTER_BITS 32u
#define EROFS_XATTR_FILTER_SEED 0x25BBE08Fu

/* i_format: bit 0 version, bits 1..3 data layout */
#define EROFS_INODE_COMPACT 0u
#define EROFS_INODE_EXTENDED 1u
#define EROFS_INODE_FLAT_PLAIN 0u
#define EROFS_INODE_FLAT_INLINE 2u
#define EROFS_INODE_CHUNK_BASED 4u
#define EROFS_INODE_COMPRESSED_FULL 1u     /* 8-byte lcluster indexes */
#define EROFS_INODE_COMPRESSED_COMPACT 3u  /* packs of 2/4-byte lcluster indexes */
#define EROFS_I_FORMAT(version, layout) ((uint16_t)((version) | ((layout) << 1)))

/* chunk format (low 16 bits of i_u of a CHUNK_BASED inode) */
#define EROFS_CHUNK_FORMAT_BLKBITS_MASK 0x1Fu
#define EROFS_CHUNK_FORMAT_INDEXES 0x20u
#define EROFS_CHUNK_FORMAT_SUPPORTED 0x3Fu
#define EROFS_CHUNK_FORMAT_48BIT 0x40u  /* (48-bit layout) an index's le16 at 0: block bits 32-47 */

/* dirent file types */
enum { EROFS_FT_UNKNOWN, EROFS_FT_REG_FILE, EROFS_FT_DIR, EROFS_FT_CHRDEV, EROFS_FT_BLKDEV,
       EROFS_FT_FIFO, EROFS_FT_SOCK, EROFS_FT_SYMLINK };

/* superblock: 128 bytes at EROFS_SUPER_OFFSET */
struct erofs_super_block {
    uint32_t magic;
    uint32_t checksum;              /* crc32c of [1024, blksz) with this field zero */
    uint32_t feature_compat;
    uint8_t blkszbits;
    uint8_t sb_extslots;
    uint16_t root_nid;
    uint64_t inos;
    uint64_t build_time;
    uint32_t build_time_nsec;
    uint32_t blocks;
    uint32_t meta_blkaddr;
    uint32_t xattr_blkaddr;
    uint8_t uuid[16];
    uint8_t volume_name[16];
    uint32_t feature_incompat;
    uint16_t u1;                    /* available_compr_algs / lz4_max_distance */
    uint16_t extra_devices;
    uint16_t devt_slotoff;          /* device table at devt_slotoff * 128 */
    uint8_t dirblkbits;
    uint8_t xattr_prefix_count;
    uint32_t xattr_prefix_start;
    uint64_t packed_nid;
    uint8_t xattr_filter_reserved;
    uint8_t ishare_xattr_prefix_id; /* long prefix (its table index) of the fingerprints */
    uint8_t reserved2[22];
} __attribute__((packed));

/* compact inode: 32 bytes; mtime is the superblock's build time (+ i_mtime on 6.x) */
struct erofs_inode_compact {
    uint16_t i_format;
    uint16_t i_xattr_icount;
    uint16_t i_mode;
    uint16_t i_nlink;
    uint32_t i_size;
    uint32_t i_mtime;
    uint32_t i_u;                   /* startblk / rdev / chunk format */
    uint32_t i_ino;
    uint16_t i_uid;
    uint16_t i_gid;
    uint32_t i_reserved;
} __attribute__((packed));

/* extended inode: 64 bytes */
struct erofs_inode_extended {
    uint16_t i_format;
    uint16_t i_xattr_icount;
    uint16_t i_mode;
    uint16_t i_nb;
    uint64_t i_size;
    uint32_t i_u;
    uint32_t i_ino;
    uint32_t i_uid;
    uint32_t i_gid;
    uint64_t i_mtime;
    uint32_t i_mtime_nsec;
    uint32_t i_nlink;
    uint8_t i_reserved2[16];
} __attribute__((packed));

/* inline xattr area: this header, then i_xattr_icount - 1 words (shared ids, entries) */
struct erofs_xattr_ibody_header {
    uint32_t h_name_filter;
    uint8_t h_shared_count;
    uint8_t h_reserved2[7];
} __attribute__((packed));

/* xattr entry: this header, name suffix, value, padded to 4 bytes */
struct erofs_xattr_entry {
    uint8_t e_name_len;
    uint8_t e_name_index;
    uint16_t e_value_size;
} __attribute__((packed));

/* chunk index of CHUNK_BASED inodes with EROFS_CHUNK_FORMAT_INDEXES (else a 4-byte
 * block map of blkaddrs) */
struct erofs_inode_chunk_index {
    uint16_t advise;
    uint16_t device_id;
    uint32_t blkaddr;
} __attribute__((packed));

/* directory block: nameoff-sorted dirents, then the names (not NUL terminated) */
struct erofs_dirent {
    uint64_t nid;
    uint16_t nameoff;
    uint8_t file_type;
    uint8_t reserved;
} __attribute__((packed));

/* device table slot: 128 bytes at devt_slotoff * 128 + 128 * (device_id - 1) */
struct erofs_deviceslot {
    uint8_t tag[64];
    uint32_t blocks;
    uint32_t mapped_blkaddr;
    uint16_t blocks_hi;     /* the block count's bits 32-47 (a device over 2^32 blocks) */
    uint8_t reserved[54];
} __attribute__((packed));

/* ---- compressed files ------------------------------------------------------------
 * A compressed inode (COMPRESSED_FULL) is followed, at the next 8-byte boundary after
 * its inline xattrs, by a map header, 8 reserved bytes, then one lcluster index per
 * logical cluster (lcluster = 1 block here) of the file. An extent starts in a HEAD
 * (or PLAIN) lcluster at di_clusterofs and runs to the next head; its pcluster
 * (physical cluster) starts at di_u.blkaddr. NONHEAD lclusters hold delta[0] (distance
 * back to their head) and delta[1] (distance on to the next head); with big pclusters
 * the first NONHEAD's delta[0] carries the pcluster's block count | LI_D0_CBLKCNT. */
enum { Z_EROFS_COMPRESSION_LZ4 = 0, Z_EROFS_COMPRESSION_LZMA = 1,
       Z_EROFS_COMPRESSION_DEFLATE = 2, Z_EROFS_COMPRESSION_ZSTD = 3 };
enum { Z_EROFS_LCLUSTER_TYPE_PLAIN = 0, Z_EROFS_LCLUSTER_TYPE_HEAD1 = 1,
       Z_EROFS_LCLUSTER_TYPE_NONHEAD = 2, Z_EROFS_LCLUSTER_TYPE_HEAD2 = 3 };
#define Z_EROFS_LI_D0_CBLKCNT 0x800u
/* full index HEAD/PLAIN di_advise: the extent is a part (the start) of its pcluster's output */
#define Z_EROFS_LI_PARTIAL_REF 0x8000u
#define Z_EROFS_ADVISE_COMPACTED_2B 0x1u    /* compact: 2-byte packs in the middle */
#define Z_EROFS_ADVISE_BIG_PCLUSTER_1 0x2u
#define Z_EROFS_ADVISE_BIG_PCLUSTER_2 0x4u
#define Z_EROFS_ADVISE_INLINE_PCLUSTER 0x8u   /* last extent inline after the index */
#define Z_EROFS_ADVISE_FRAGMENT_PCLUSTER 0x20u /* last extent in the packed inode */
/* the 48-bit layout (mkfs.erofs 1.9, Linux 6.15+): a COMPRESSED_FULL inode may list its
 * extents as records instead of lcluster indexes (bit 0, COMPACTED_2B's for compact
 * inodes); bits 1-2 give the record size, 4 << n bytes (4, 8, 16 or 32: the leading
 * bytes of struct z_erofs_extent). 16 and 32: the map header's first 4 bytes and its last
 * 2 hold the record count (le32 lo, le16 hi), each record its own lstart, looked up by
 * binary search; 4 and 8: every extent but the last 2^lclusterbits bytes of input
 * (h_clusterbits), one record per lcluster; 4: the pclusters back to back from a le64
 * start after the header, a record only plen. The records start at the first multiple
 * of the record size after the header. */
#define Z_EROFS_ADVISE_EXTENTS 0x1u
#define Z_EROFS_ADVISE_EXTRECSZ_BIT 1u
#define Z_EROFS_ADVISE_EXTRECSZ_MASK 0x3u
/* plen: bits 0-26 the pcluster's bytes (any byte length and offset: not block aligned
 * with unaligned compression), bit 27 a partial reference, bits 28-31 the format (0:
 * stored plain, else the algorithm + 1); the last record of an inode with a fragment
 * holds the fragment's offset instead (plen: its low 32 bits, pstart_lo: the high) */
#define Z_EROFS_EXTENT_PLEN_PARTIAL (1u << 27)
#define Z_EROFS_EXTENT_PLEN_FMT_BIT 28u
#define Z_EROFS_EXTENT_PLEN_MASK ((Z_EROFS_PCLUSTER_MAX_SIZE << 1) - 1)
/* h_clusterbits bit 7: the whole file is a fragment; the 8-byte map header is then
 * le64 (fragment offset | 1 << 63) and no index follows */
#define Z_EROFS_FRAGMENT_INODE_BIT 7u
#define Z_EROFS_PCLUSTER_MAX_SIZE (1024u * 1024u)
/* the largest windows the kernel takes: its lzma and zstd configuration records are
 * refused above these; DEFLATE's window is at most 32 KiB by the format */
#define Z_EROFS_LZMA_MAX_DICT_SIZE (8u * Z_EROFS_PCLUSTER_MAX_SIZE)
#define Z_EROFS_ZSTD_MAX_DICT_SIZE Z_EROFS_PCLUSTER_MAX_SIZE
#define Z_EROFS_DEFLATE_MAX_DICT_SIZE 32768u

struct z_erofs_map_header {
    uint16_t h_reserved1;           /* with a fragment: h_fragmentoff, le32 over both */
    uint16_t h_idata_size;          /* tail-packed pcluster size (ztailpacking) */
    uint16_t h_advise;
    uint8_t h_algorithmtype;        /* bits 0-3: HEAD1 algorithm, 4-7: HEAD2 */
    uint8_t h_clusterbits;          /* bits 0-2: lcluster bits - blkszbits */
} __attribute__((packed));

struct z_erofs_extent {
    uint32_t plen;                  /* bytes | PARTIAL | format << 28 (see above) */
    uint32_t pstart_lo;             /* the pcluster's byte offset in the image */
    uint32_t pstart_hi;
    uint32_t lstart_lo;             /* the extent's file offset */
    uint32_t lstart_hi;             /* (32-byte records: files over 4 GiB) */
    uint8_t reserved[12];
} __attribute__((packed));

struct z_erofs_lcluster_index {
    uint16_t di_advise;             /* bits 0-1: lcluster type */
    uint16_t di_clusterofs;         /* HEAD/PLAIN: where the extent starts in it */
    uint32_t di_u;                  /* HEAD/PLAIN: blkaddr; NONHEAD: delta[0] | delta[1]<<16 */
} __attribute__((packed));

/* compression configuration records after the superblock (COMPR_CFGS): for each bit of
 * sb.u1 (available algorithms) in order, a le16 length, then the record */
struct z_erofs_lz4_cfgs {
    uint16_t max_distance;
    uint16_t max_pclusterblks;
    uint8_t reserved[10];
} __attribute__((packed));

struct z_erofs_lzma_cfgs {
    uint32_t dict_size;
    uint16_t format;
    uint8_t reserved[8];
} __attribute__((packed));

struct z_erofs_deflate_cfgs {
    uint8_t windowbits;
    uint8_t reserved[5];
} __attribute__((packed));

struct z_erofs_zstd_cfgs {
    uint8_t format;
    uint8_t windowlog;              /* window log - 10 */
    uint8_t reserved[4];
} __attribute__((packed));

#define EROFS_DEVT_SLOT_SIZE ((uint32_t)sizeof(struct erofs_deviceslot))

#define EROFS_ASSERT_AT(type, field, off) \
    _Static_assert(offsetof(struct type, field) == (off), #type "." #field " offset")

_Static_assert(sizeof(struct erofs_super_block) == 128, "superblock size");
EROFS_ASSERT_AT(erofs_super_block, checksum, 0x04);
EROFS_ASSERT_AT(erofs_super_block, blkszbits, 0x0C);
EROFS_ASSERT_AT(erofs_super_block, root_nid, 0x0E);
EROFS_ASSERT_AT(erofs_super_block, inos, 0x10);
EROFS_ASSERT_AT(erofs_super_block, build_time_nsec, 0x20);
EROFS_ASSERT_AT(erofs_super_block, blocks, 0x24);
EROFS_ASSERT_AT(erofs_super_block, meta_blkaddr, 0x28);
EROFS_ASSERT_AT(erofs_super_block, xattr_blkaddr, 0x2C);
EROFS_ASSERT_AT(erofs_super_block, uuid, 0x30);
EROFS_ASSERT_AT(erofs_super_block, volume_name, 0x40);
EROFS_ASSERT_AT(erofs_super_block, feature_incompat, 0x50);
EROFS_ASSERT_AT(erofs_super_block, extra_devices, 0x56);
EROFS_ASSERT_AT(erofs_super_block, devt_slotoff, 0x58);
EROFS_ASSERT_AT(erofs_super_block, xattr_prefix_start, 0x5C);
EROFS_ASSERT_AT(erofs_super_block, packed_nid, 0x60);
_Static_assert(sizeof(struct erofs_inode_compact) == 32, "compact inode size");
EROFS_ASSERT_AT(erofs_inode_compact, i_size, 0x08);
EROFS_ASSERT_AT(erofs_inode_compact, i_u, 0x10);
EROFS_ASSERT_AT(erofs_inode_compact, i_uid, 0x18);
_Static_assert(sizeof(struct erofs_inode_extended) == 64, "extended inode size");
EROFS_ASSERT_AT(erofs_inode_extended, i_size, 0x08);
EROFS_ASSERT_AT(erofs_inode_extended, i_u, 0x10);
EROFS_ASSERT_AT(erofs_inode_extended, i_uid, 0x18);
EROFS_ASSERT_AT(erofs_inode_extended, i_mtime, 0x20);
EROFS_ASSERT_AT(erofs_inode_extended, i_nlink, 0x2C);
_Static_assert(sizeof(struct erofs_xattr_ibody_header) == 12, "xattr ibody header size");
EROFS_ASSERT_AT(erofs_xattr_ibody_header, h_shared_count, 0x04);
_Static_assert(sizeof(struct erofs_xattr_entry) == 4, "xattr entry size");
EROFS_ASSERT_AT(erofs_xattr_entry, e_value_size, 0x02);
_Static_assert(sizeof(struct erofs_inode_chunk_index) == 8, "chunk index size");
EROFS_ASSERT_AT(erofs_inode_chunk_index, blkaddr, 0x04);
_Static_assert(sizeof(struct erofs_dirent) == 12, "dirent size");
EROFS_ASSERT_AT(erofs_dirent, file_type, 0x0A);
_Static_assert(sizeof(struct erofs_deviceslot) == 128, "device slot size");
EROFS_ASSERT_AT(erofs_deviceslot, mapped_blkaddr, 0x44);

_Static_assert(sizeof(struct z_erofs_map_header) == 8, "map header size");
EROFS_ASSERT_AT(z_erofs_map_header, h_idata_size, 0x02);
EROFS_ASSERT_AT(z_erofs_map_header, h_advise, 0x04);
EROFS_ASSERT_AT(z_erofs_map_header, h_algorithmtype, 0x06);
EROFS_ASSERT_AT(z_erofs_map_header, h_clusterbits, 0x07);
_Static_assert(sizeof(struct z_erofs_lcluster_index) == 8, "lcluster index size");
_Static_assert(sizeof(struct z_erofs_extent) == 32, "extent record size");
EROFS_ASSERT_AT(z_erofs_extent, pstart_lo, 0x04);
EROFS_ASSERT_AT(z_erofs_extent, pstart_hi, 0x08);
EROFS_ASSERT_AT(z_erofs_extent, lstart_lo, 0x0C);
EROFS_ASSERT_AT(z_erofs_extent, lstart_hi, 0x10);
EROFS_ASSERT_AT(z_erofs_lcluster_index, di_clusterofs, 0x02);
EROFS_ASSERT_AT(z_erofs_lcluster_index, di_u, 0x04);
_Static_assert(sizeof(struct z_erofs_lz4_cfgs) == 14, "lz4 cfgs size");
_Static_assert(sizeof(struct z_erofs_lzma_cfgs) == 14, "lzma cfgs size");
EROFS_ASSERT_AT(z_erofs_lzma_cfgs, format, 0x04);
_Static_assert(sizeof(struct z_erofs_deflate_cfgs) == 6, "deflate cfgs size");
_Static_assert(sizeof(struct z_erofs_zstd_cfgs) == 6, "zstd cfgs size");
EROFS_ASSERT_AT(z_erofs_zstd_cfgs, windowlog, 0x01);

/* little-endian stores into the packed structs (no-ops on little-endian hosts) */
#define cpu_to_le16(v) htole16((uint16_t)(v))
#define cpu_to_le32(v) htole32((uint32_t)(v))
#define cpu_to_le64(v) htole64((uint64_t)(v))

#endif
