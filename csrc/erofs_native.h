/* erofs-tools C core: EROFS image builder (node graph -> layout -> write) and crc32c.
 *
 * The API only; the on-disk structs are in erofs_fs.h, the builder's internals in
 * builder_int.h (nodes.c, datastream.c, layout.c, write.c).
 *
 * This header is ALSO the cffi cdef (csrc/build_native.py strips lines starting with
 * '#'), so it may only hold plain C declarations: no macros, no inline code.
 *
 * Use:
 *   b = erofs_builder_new(&opts)
 *   n = erofs_node_add(b, mode, uid, gid, mtime, nsec, size, rdev)   (node ids 0,1,2...)
 *   erofs_node_add_xattr(b, n, "user.foo", 8, value, vlen)
 *   erofs_dir_add(b, dir, name, namelen, child)       (a node under two names = hardlink)
 *   erofs_node_set_file(b, n, path, pathlen, offset, flags)  (data copied at write time)
 *   erofs_node_set_bytes(b, n, data, len)             (symlink target, small data)
 *   erofs_node_set_chunks(b, n, format, entries, count) (caller's chunk indexes, RAFS;
 *   erofs_nodes_set_chunks: many nodes in one call)
 *   erofs_builder_set_root(b, n); erofs_builder_layout(b, &info);
 *   erofs_node_nid(b, n); erofs_builder_write(b, fd) or write_begin/write_step/write_end
 * Every function returning int returns ERN_OK (0) or a negative ERN_* code; the message
 * is then in erofs_builder_error(b).
 */
#ifndef EROFS_NATIVE_H
#define EROFS_NATIVE_H
#include <stdint.h>
#include <stddef.h>

enum {
    ERN_OK = 0,
    ERN_EINVAL = -1,   /* API misuse / bad argument */
    ERN_ELIMIT = -2,   /* the format cannot hold this (name, xattr, size, count) */
    ERN_EIO = -3,      /* reading a source or writing the image failed */
    ERN_ENOMEM = -4
};

/* erofs_opts.compress_alg (mkfs.erofs -z names) */
enum {
    ERN_Z_NONE = 0, ERN_Z_LZ4 = 1, ERN_Z_LZ4HC = 2, ERN_Z_LZMA = 3, ERN_Z_DEFLATE = 4,
    ERN_Z_ZSTD = 5
};

enum {
    ERN_FILE_SPARSE = 1     /* erofs_node_set_file: scan holes (SEEK_DATA) -> chunk-based */
};

struct erofs_opts {
    uint32_t blkszbits;        /* 12 (4 KiB); 9..12 accepted */
    uint32_t meta_blkaddr;     /* block holding nid 0 */
    uint32_t first_nid;        /* nid of the root (first inode); 0 = right after the sb */
    uint32_t feature_compat;   /* written as is, plus SB_CHKSUM when sb_checksum */
    uint32_t feature_incompat; /* written as is, plus CHUNKED_FILE when chunk files exist */
    int32_t sb_checksum;       /* 1: crc32c over [1024, blksz) and set SB_CHKSUM */
    int32_t shared_xattrs;     /* 1: an xattr carried by >= shared_xattr_min inodes goes
                                  to the shared area */
    uint32_t shared_xattr_min; /* 0: 2 (mkfs.erofs -x N: N + 1) */
    uint32_t root_xattr_isize; /* the root's xattr ibody at least this many bytes (16 ..
                                  65532, 4-byte multiple; 0: as its xattrs need), zero
                                  padded (mkfs.erofs --root-xattr-isize) */
    int32_t inline_data;       /* 1: files' FLAT_INLINE tails when they fit (0: FLAT_PLAIN;
                                * directories and symlinks still inline, as mkfs.erofs) */
    int32_t xattr_filter;      /* 1: xattr name filters in the inodes' xattr headers (as
                                  mkfs.erofs 1.9 writes them; Nydus's bootstraps have none) */
    int32_t force_extended;    /* 1: every inode extended (64 bytes) */
    int32_t ignore_mtime;      /* 1: an inode that would be extended only for its mtime
                                  is compact, its mtime the build time (mkfs.erofs
                                  --ignore-mtime) */
    int32_t force_compact;     /* 1: an inode that cannot be compact (uid, gid, links
                                  or size too large) is an error (-E force-inode-compact,
                                  with ignore_mtime) */
    int32_t auto_build_time;   /* 1: build_time = most common (mtime, nsec) of the tree */
    int64_t build_time;
    uint32_t build_time_nsec;
    uint8_t uuid[16];
    uint8_t volume_name[16];   /* <= 15 bytes, NUL padded */
    uint32_t devt_slotoff;     /* device table at devt_slotoff*128; written to the sb
                                  even without devices (RAFS wants 11 always) */
    uint64_t sb_blocks;        /* 0: image size in blocks; else written as sb.blocks */
    int32_t stream_data;       /* 1: file data is copied while nodes are added (a worker
                                  thread; needs erofs_builder_set_output first); data
                                  blocks come first, the inode area follows them */
    uint32_t tail_budget_mib;  /* stream mode: memory for inline tails read early */
    int32_t compress_alg;      /* ERN_Z_*; stream mode only: regular files compressed
                                  (stored plain where that saves nothing) */
    int32_t compress_level;    /* -1: the algorithm's default */
    uint32_t pcluster_size;    /* bytes of a physical cluster; 0: one block */
    uint32_t compress_threads; /* 0: one per online CPU; the image is the same */
    int32_t compress_full_index; /* 1: full (8-byte) lcluster indexes; 0: compact */
    int32_t ztailpacking;      /* 1: a compressed file's last extent inline after its
                                  index (mkfs.erofs -Eztailpacking) */
    int32_t fragments;         /* 1: a compressed file's last extent (or a whole small
                                  file) in the packed inode (-Efragments) */
    uint32_t packed_pcluster_size; /* the packed inode's pcluster (-Efragments=SIZE);
                                  0: pcluster_size */
    int32_t dedupe;            /* 1: identical pclusters shared between files (-Ededupe) */
    int32_t compress_alt_alg[3];   /* more algorithms of the -z list (ERN_Z_*; 0: none),
                                  chosen per file by erofs_node_set_zhint */
    int32_t compress_alt_level[3]; /* their levels (-1: default) */
    uint32_t compress_dict_size[4]; /* per -z algorithm (the first, then the others):
                                  dictsize= in bytes (lzma, zstd, deflate); 0: the
                                  algorithm's default, from the largest pcluster */
    int8_t compress_lzma_lc[4];    /* per -z algorithm, lzma's lc= / lp= / pb= (literal */
    int8_t compress_lzma_lp[4];    /* context, literal position and position bits); */
    int8_t compress_lzma_pb[4];    /* -1: the preset's */
    uint32_t pcluster_max;     /* the largest per-file pcluster (0: pcluster_size) */
    int32_t plain_xattr_pfx;   /* 1: the long xattr prefix table after the superblock
                                  even with fragments (-Eplain-xattr-prefixes) */
    int32_t all_fragments;     /* 1: every compressed file whole in the packed inode
                                  (-Eall-fragments; implies fragments) */
    int32_t fragdedupe;        /* fragments equal to (the end of) an earlier one shared:
                                  0 always (-Efragdedupe=full, the default), 1 only a
                                  whole file's (=inode), 2 never (^fragdedupe) */
    int32_t sb_48bit;          /* 1: the 48-bit layout (-E48bit, Linux 6.15+): the root nid
                                  in rootnid_8b, compact inodes with their own mtimes
                                  (from the superblock's epoch; nsec its fixed one) */
    int32_t dot_omitted;       /* 1: no "." entry in directories (-Edot-omitted; needs
                                  sb_48bit) */
    uint32_t max_extent;       /* at most this many input bytes per compressed extent
                                  (--max-extent-bytes, >= the block size); 0: no cap */
    uint32_t chunkbits;        /* stream mode, uncompressed: every non-empty regular file
                                  chunk-based with chunks of 2^chunkbits bytes (>= the
                                  block size; mkfs.erofs --chunksize), identical chunks
                                  stored once, all-zero ones holes (chunked.c); 0: off */
    int32_t chunk_indexes;     /* with chunkbits: 8-byte chunk indexes (else a 4-byte
                                  block map; -E force-chunk-indexes; always with a blob) */
    int32_t chunk_nodedupe;    /* with chunkbits: no chunk shared, none made a hole
                                  (mkfs.erofs -E ^dedupe) */
    int32_t compress_dirs;     /* 1: every directory whole in the packed inode (--zD;
                                  stream mode; without compress_alg stored plain), as
                                  mkfs.erofs 1.9 */
    uint32_t metabox;          /* metadata compression's metabox (mkfs.erofs -m#, Linux
                                  6.17+; needs sb_48bit): every inode record in the
                                  metabox inode's data (metabox.c), compressed with the
                                  first -z algorithm in pclusters of this many bytes,
                                  stored plain without compress_alg; 0: off */
    uint32_t metabox_alg;      /* its algorithm: this index in the -z list (-m#:X) */
    uint32_t metazone;         /* mkfs --MZ (metazone.c): ERN_MZ_* bits, set by
                                  erofs_builder_set_metazone; 0: off */
};

struct erofs_layout_info {
    uint64_t inodes;
    uint64_t root_nid;
    uint32_t meta_blkaddr;     /* block of nid 0 (after the data in stream mode) */
    uint64_t meta_start;       /* byte offset of nid 0 */
    uint64_t meta_end;         /* end of the inode area (bytes) */
    uint32_t xattr_blkaddr;    /* 0 when no shared xattrs */
    uint32_t shared_xattr_bytes;
    uint64_t data_start;       /* byte offset of the first data block */
    uint64_t image_size;       /* bytes written by erofs_builder_write (block multiple) */
    int64_t build_time;
    uint32_t build_time_nsec;
    uint32_t feature_compat;
    uint32_t feature_incompat;
    uint64_t data_bytes;       /* file/dir bytes copied into data blocks and tails */
};

typedef struct erofs_builder erofs_builder;

void erofs_default_opts(struct erofs_opts *o);
erofs_builder *erofs_builder_new(const struct erofs_opts *o);
void erofs_builder_free(erofs_builder *b);
const char *erofs_builder_error(erofs_builder *b);

int64_t erofs_node_add(erofs_builder *b, uint32_t mode, uint32_t uid, uint32_t gid,
                       int64_t mtime, uint32_t mtime_nsec, uint64_t size,
                       uint32_t rdev_major, uint32_t rdev_minor);
int erofs_node_add_xattr(erofs_builder *b, uint32_t node, const char *name, size_t namelen,
                         const char *value, size_t valuelen);
/* the long xattr name prefix table (encoded entries, `count` of them, written after the
 * superblock and compression records, PLAIN_XATTR_PFX; with fragments, unless
 * plain_xattr_pfx, at the packed inode's start instead); ishare_id: the entry whose
 * xattrs are content fingerprints (ISHARE_XATTRS), or -1 */
int erofs_builder_set_xattr_prefixes(erofs_builder *b, const char *table, size_t len,
                                     uint32_t count, int32_t ishare_id);
/* an xattr under long prefix `prefix_id` (its table index): name is the suffix after it */
int erofs_node_add_xattr_long(erofs_builder *b, uint32_t node, uint32_t prefix_id,
                              const char *name, size_t namelen,
                              const char *value, size_t valuelen);
int erofs_dir_add(erofs_builder *b, uint32_t dir, const char *name, size_t namelen,
                  uint32_t child);
int erofs_node_set_file(erofs_builder *b, uint32_t node, const char *path, size_t pathlen,
                        uint64_t offset, int flags);
int erofs_node_set_bytes(erofs_builder *b, uint32_t node, const char *data, size_t len);
int erofs_node_set_chunks(erofs_builder *b, uint32_t node, uint32_t chunk_format,
                          const uint64_t *entries, uint32_t count);
/* the same for n nodes at once: counts[i] entries of nodes[i], back to back in entries */
int erofs_nodes_set_chunks(erofs_builder *b, uint32_t chunk_format, const uint32_t *nodes,
                           const uint32_t *counts, uint32_t n, const uint64_t *entries,
                           uint64_t nentries);
/* compressed images (--compress-hints), before erofs_node_set_file: this file's pcluster
 * size (0: store it uncompressed) and algorithm (index in the -z list) */
int erofs_node_set_zhint(erofs_builder *b, uint32_t node, uint32_t pcluster_size,
                         uint32_t alg);
int erofs_builder_set_root(erofs_builder *b, uint32_t node);
/* plain stream mode, a walk about to add the entries of directory `node`: their names
 * (NUL-terminated, back to back, bytewise sorted), so that the directory's inode and
 * blocks are placed before its files' (smeta.c); a hint (the layout checks it) */
int erofs_builder_dir_names(erofs_builder *b, uint32_t node, const char *names, size_t len,
                            uint32_t count);
int erofs_builder_add_device(erofs_builder *b, const char *tag, size_t taglen,
                             uint64_t blocks, uint32_t mapped_blkaddr);
/* raw bytes written at image offset when writing: before layout, only below the inode
 * area; after layout, also appended at/after the image end (the image grows, block
 * aligned), e.g. the RAFS chunk-info table. Never over the superblock. data NULL
 * (appended after layout only): the range is reserved, zeros in the image, for the
 * caller to write into the file after write(). */
int erofs_builder_put_bytes(erofs_builder *b, uint64_t offset, const char *data, size_t len);
/* change a device slot (1-based id) or sb.blocks until the image is written, e.g. the
 * RAFS mapped_blkaddr that depends on the final bootstrap size; 0 is written as 0 */
int erofs_builder_set_device(erofs_builder *b, uint32_t device_id, uint64_t blocks,
                             uint32_t mapped_blkaddr);
int erofs_builder_set_sb_blocks(erofs_builder *b, uint64_t blocks);
/* after layout, before write: `base` added to every block address (not holes) of the
 * 4-byte block maps given by erofs_node_set_chunks (8-byte indexes untouched) */
int erofs_builder_rebase_chunks(erofs_builder *b, uint64_t base);

/* stream mode: the image fd, before any erofs_node_set_file(); the same fd must be
 * passed to erofs_builder_write(). Xattrs of a file must be added before its data. */
int erofs_builder_set_output(erofs_builder *b, int fd);
/* before set_output / write: the image goes at byte `base` of the output (the bytes
 * before are kept: a file is truncated to base, not 0); device 1: a block device with
 * `limit` bytes from base, never truncated, a write past them failing before it is
 * made, the bytes the image leaves unwritten zero-filled and the device flushed before
 * the superblock is written (last). filled: the zero bytes written so. dsunit > 1: each
 * file's data (uncompressed, stream mode) starts on a multiple of dsunit blocks, as
 * mkfs.erofs --dsunit aligns it. */
int erofs_builder_set_target(erofs_builder *b, uint64_t base, uint64_t limit, int device,
                             uint32_t dsunit);
int erofs_builder_target_filled(erofs_builder *b, uint64_t *bytes);
/* with chunkbits, before the first file: the chunks' data goes to fd (mkfs.erofs
 * --blobdev, device 1: chunk indexes with device_id 1, blocks counted from the blob's
 * start) instead of the image; *blocks (erofs_builder_blob_blocks): its size so far */
int erofs_builder_set_blob(erofs_builder *b, int fd);
/* mkfs.erofs 1.9 --MZ (metazone.c), before the first node: ERN_MZ_INODES, the inode
 * records in a zone after the data (the root first there, nids counted from the block
 * before it, meta_blkaddr); with ERN_MZ_DIRS too, the directories' blocks after them.
 * With the metabox the records are in it already: ERN_MZ_DIRS puts the blocks right
 * before its data */
enum { ERN_MZ_INODES = 1, ERN_MZ_DIRS = 2 };
int erofs_builder_set_metazone(erofs_builder *b, uint32_t flags);

/* mkfs --tar=i,MAPFILE -m -z: `blocks` blocks left unwritten right before the metabox's
 * blocks (which are compressed in place at the image's end), for a data region whose
 * block maps are then moved there with erofs_builder_rebase_chunks; before layout. After
 * layout, erofs_builder_gap_blk gives the region's first block (only with a compressed
 * metabox: otherwise the region goes at the image's end and no gap is left). */
int erofs_builder_set_gap(erofs_builder *b, uint64_t blocks);
int64_t erofs_builder_gap_blk(erofs_builder *b);
int erofs_builder_blob_blocks(erofs_builder *b, uint64_t *blocks);
int erofs_builder_stream_progress(erofs_builder *b, uint64_t *bytes_done);

/* -- directory walk (walk.c): a source tree into nodes, as mkfs's TreeWalker ---------- */
struct erofs_walk_opts {
    int32_t fixed_mtime_set;   /* 1: every inode gets fixed_mtime (nsec 0) */
    int64_t fixed_mtime;
    int32_t clamp_mtime;       /* with fixed_mtime_set: only mtimes at or after
                                * fixed_mtime become it (SOURCE_DATE_EPOCH) */
    int32_t mark_whiteout_dirs; /* 1: a directory holding an overlayfs whiteout (char
                                * 0:0) gets trusted.overlay.origin="" (as mkfs.erofs
                                * 1.9: overlayfs then never iterates it directly, which
                                * would list its whiteouts) */
    int32_t ovlfs_strip;       /* 1: whiteouts and trusted.overlay.opaque left out
                                * (mkfs.erofs --ovlfs-strip=1) */
    int64_t force_uid;         /* -1: the file's own */
    int64_t force_gid;
    uint32_t uid_offset;       /* added to every uid (after force_uid), as mkfs.erofs
                                * --uid-offset; a sum past 2^32-1 is an error */
    uint32_t gid_offset;
    int32_t hard_dereference;  /* 1: every link of a file its own inode (mkfs.erofs
                                * --hard-dereference) */
    int32_t no_xattrs;         /* 1: the source's xattrs left out (mkfs.erofs -x -1);
                                * whiteout marks are still made */
    int32_t list_files;        /* 1: regular files (of every size) are listed for the
                                * caller (erofs_walk_files), not given file data */
};
typedef struct erofs_walk erofs_walk;
/* NULL: out of memory. The root is added by the first step. */
erofs_walk *erofs_walk_new(erofs_builder *b, const char *src, size_t srclen,
                           const struct erofs_walk_opts *o);
/* walk at most max_entries more entries: 1 more to come, 0 done, < 0 ERN_* (message in
 * erofs_builder_error); *entries, *bytes: inodes added and their file bytes so far */
int erofs_walk_step(erofs_walk *w, uint32_t max_entries, uint64_t *entries, uint64_t *bytes);
int64_t erofs_walk_root(erofs_walk *w);
/* list_files: the regular files met by the last step, records back to back, each
 * u32 node, u32 path length | 1 << 31 if sparse (st_blocks * 512 < size), u64 size,
 * the path, zeros to a multiple of 8 bytes; -> their length in bytes (*buf valid until
 * the next step). *xattrs: xattrs added so far. */
size_t erofs_walk_files(erofs_walk *w, const uint8_t **buf, uint64_t *xattrs);
void erofs_walk_free(erofs_walk *w);

int erofs_builder_layout(erofs_builder *b, struct erofs_layout_info *info);
/* current layout info (image_size grows with appended put_bytes) */
int erofs_builder_info(erofs_builder *b, struct erofs_layout_info *info);
int64_t erofs_node_nid(erofs_builder *b, uint32_t node);
uint32_t erofs_node_count(erofs_builder *b);

int erofs_builder_write(erofs_builder *b, int fd);
int erofs_builder_write_begin(erofs_builder *b, int fd);
int64_t erofs_builder_write_step(erofs_builder *b, uint32_t max_nodes, uint64_t *bytes_done);
int erofs_builder_write_end(erofs_builder *b);
/* start writing fd's dirty pages back to the disk, waiting neither for that nor
 * dropping them (Linux: sync_file_range(SYNC_FILE_RANGE_WRITE)), so that an fsync that
 * follows waits for less; advice only: 0, or -errno (-ENOSYS without it) */
int ern_start_writeback(int fd);

/* the on-disk structs of erofs_fs.h as the core compiled them: one row per named field
 * (struct name, field name, offset, field size, struct size), and the format constants
 * it writes; for the test that C and erofs_tools/format agree */
struct erofs_fs_field {
    const char *structure;
    const char *field;
    uint32_t offset;
    uint32_t size;
    uint32_t struct_size;
};
struct erofs_fs_const {
    const char *name;
    uint64_t value;
};
const struct erofs_fs_field *erofs_fs_fields(uint32_t *count);
const struct erofs_fs_const *erofs_fs_consts(uint32_t *count);

/* raw reflected CRC-32C update: no initial or final inversion */
uint32_t erofs_crc32c_update(uint32_t crc, const uint8_t *buf, size_t len);
/* EROFS superblock checksum of one block buffer (its checksum field treated as zero) */
uint32_t erofs_sb_checksum(const uint8_t *block, size_t blksz);
/* xxHash32 of data (xattrs.c: the xattr name filters hash names with it) */
uint32_t ern_xxh32(const void *data, size_t len, uint32_t seed);

/* -- decompression (decompress.c): one EROFS pcluster -------------------------------- */
/* erofs_z_decompress alg: the on-disk algorithm numbers */
enum {
    ERN_ZD_LZ4 = 0, ERN_ZD_LZMA = 1, ERN_ZD_DEFLATE = 2, ERN_ZD_ZSTD = 3
};
/* erofs_z_decompress flags */
enum {
    ERN_ZD_PARTIAL = 1,        /* the pcluster may decode to more than outlen: stop there */
    ERN_ZD_ZERO_PADDING = 2    /* skip the zero bytes before the compressed stream */
};
/* decode `in` (one pcluster) into exactly `outlen` bytes at `out`; dict_size: MicroLZMA's
 * dictionary; ERN_OK or a negative ERN_* with a one-line message in err */
int erofs_z_decompress(int alg, const uint8_t *in, size_t inlen, uint8_t *out, size_t outlen,
                       int flags, uint32_t dict_size, char *err, size_t errlen);

/* --- zran (zran.c): random access into gzip streams --------------------------------
 * Index: b = ern_zran_builder_new(span); loop { ern_zran_builder_feed(b, in, out, ...);
 * while (ern_zran_builder_next_point(b, &p)) keep p; } -- feed stops right after it
 * records a point (at a deflate block boundary >= span output bytes after the previous
 * one; the first is at output 0) and does nothing more until that point is taken.
 * ern_zran_builder_totals: bytes consumed/produced so far, and whether the last gzip
 * member's trailer was read (the stream may end there).
 * Extract: ern_zran_extract(point's bits, byte, window, compressed bytes from the
 * point's in_offset, skip = range start - point's out_offset, out, out_len): ERN_OK,
 * ERN_EIO (corrupt data), ERN_ELIMIT (input ended first), ERN_EINVAL (bits > 7, window
 * > 32 KiB). */
struct ern_zran_point {
    uint64_t in_offset;
    uint64_t out_offset;
    uint32_t window_size;
    uint8_t bits;
    uint8_t byte;
    uint8_t window[32768];
};
typedef struct ern_zran_builder ern_zran_builder;
ern_zran_builder *ern_zran_builder_new(uint64_t span);
void ern_zran_builder_free(ern_zran_builder *z);
int ern_zran_builder_feed(ern_zran_builder *z, const uint8_t *in, size_t in_len,
                          uint8_t *out, size_t out_cap, size_t *consumed, size_t *produced);
int ern_zran_builder_next_point(ern_zran_builder *z, struct ern_zran_point *p);
void ern_zran_builder_totals(ern_zran_builder *z, uint64_t *total_in, uint64_t *total_out,
                             int *member_done);
int ern_zran_extract(uint8_t bits, uint8_t byte, const uint8_t *window, uint32_t window_size,
                     const uint8_t *in, size_t in_len, uint64_t skip,
                     uint8_t *out, size_t out_len);
/* the window bytes the stream after a point copies (used[i] = 1), from the compressed
 * bytes after the point; *made = output examined (32 KiB + 258 unless the input ended) */
int ern_zran_window_use(uint8_t bits, uint8_t byte, uint32_t window_size,
                        const uint8_t *in, size_t in_len, uint8_t *used, size_t *made);

/* --- zinfo (zinfo.c): mkfs --gzinfo=FILE's checkpoints, as mkfs.erofs 1.9 records them
 * for an AWS SOCI zinfo v2: z = ern_zinfo_new(span); loop { ern_zinfo_feed(z, compressed
 * bytes, &consumed) (ERN_OK, ERN_EIO corrupt, ERN_ENOMEM); if (ern_zinfo_next(z, rec,
 * &read_start)) keep rec (one zinfo record: le64 input offset, le64 output offset, u8
 * bits, the 32 KiB window) and the output offset of the 32 KiB read it belongs to } --
 * feed stops right after recording a point and consumes nothing until it is taken;
 * ern_zinfo_totals: bytes consumed/produced, whether the last member's trailer was read. */
enum { ERN_ZINFO_RECORD = 17 + 32768 };
typedef struct ern_zinfo ern_zinfo;
ern_zinfo *ern_zinfo_new(uint64_t span);
void ern_zinfo_free(ern_zinfo *z);
int ern_zinfo_feed(ern_zinfo *z, const uint8_t *in, size_t in_len, size_t *consumed);
int ern_zinfo_next(ern_zinfo *z, uint8_t *rec, uint64_t *read_start);
void ern_zinfo_totals(ern_zinfo *z, uint64_t *total_in, uint64_t *total_out,
                      int *member_done);

/* ---- the daemon's cold path (coldpath.c): a fetched range of a RAFS v6 blob ----
 * ern_cold_decode decodes every chunk of the range (zstd, lz4 raw block, or stored),
 * setting each chunk's status; the caller checks the digests of the good ones (blake3
 * has no C library on Debian 12: the Python package's SIMD code hashes, without the
 * GIL) and sets `verified`; ern_cold_store then writes the verified chunks into the cache
 * file (runs adjacent in the file in one pwritev), writes the bitmap's changed bytes with
 * their bits to state_fd at state_off (if state_fd >= 0), then sets the bits in the
 * bitmap (atomically; *newly = bits that were clear): a bit others can see set is in the
 * record already. A chunk not verified is never written.
 * Stored chunks (alg NONE) are used in place in src; the others are decoded into
 * dst + dst_off. ern_cold_store returns the number of chunks written; a failed write
 * marks its chunks ERN_COLD_EWRITE and leaves -errno in *werr (else 0).
 * ern_cold_store is ern_cold_write (the data: the same checks, the same statuses,
 * *werr; needs no lock, the kernel orders writes to one file) then ern_cold_mark (the
 * record and the bits of the chunks still verified and OK; -errno of a failed record
 * write or 0; under the bitmap's lock): a caller that holds that lock only for the
 * mark does not hold it through the write, nor while it waits for the GIL after it. */
enum { ERN_COLD_NONE = 0, ERN_COLD_ZSTD = 1, ERN_COLD_LZ4 = 2 };
enum {
    ERN_COLD_OK = 0, ERN_COLD_EBOUNDS = 1, ERN_COLD_EFRAME = 2, ERN_COLD_ESIZE = 3,
    ERN_COLD_EDATA = 4, ERN_COLD_ENOMEM = 5, ERN_COLD_EALG = 6, ERN_COLD_EWRITE = 7
};
struct ern_cold_chunk {
    uint64_t src_off;       /* its stored bytes: src[src_off, src_off + src_len) */
    uint64_t dst_off;       /* its decoded bytes: dst[dst_off, dst_off + ulen) */
    uint64_t file_off;      /* its uncompressed offset in the cache file */
    uint32_t src_len;
    uint32_t ulen;
    uint32_t index;         /* its bit in the chunk-state bitmap */
    uint8_t alg;            /* ERN_COLD_NONE / ZSTD / LZ4 */
    uint8_t verified;       /* set by the caller after its digest matched */
    int16_t status;         /* ERN_COLD_OK or why it failed */
};
int ern_cold_decode(const uint8_t *src, size_t srclen, uint8_t *dst, size_t dstlen,
                    struct ern_cold_chunk *chunks, uint32_t n);
int64_t ern_cold_store(int fd, uint64_t file_size, const uint8_t *src, size_t srclen,
                       const uint8_t *dst, size_t dstlen, struct ern_cold_chunk *chunks,
                       uint32_t n, uint8_t *bitmap, uint32_t nbits, int state_fd,
                       uint64_t state_off, uint32_t *newly, int *werr);
int64_t ern_cold_write(int fd, uint64_t file_size, const uint8_t *src, size_t srclen,
                       const uint8_t *dst, size_t dstlen, struct ern_cold_chunk *chunks,
                       uint32_t n, uint32_t nbits, int *werr);
int ern_cold_mark(struct ern_cold_chunk *chunks, uint32_t n, uint8_t *bitmap,
                  uint32_t nbits, int state_fd, uint64_t state_off, uint32_t *newly);
/* zran blobs (zran.c): the chunks of one access point's context in a fetched range.
 * ern_cold_zran inflates src[src_off, src_off + src_len) from the point (bits, byte,
 * window), discards `skip` bytes of output and writes the next out_len into dst at
 * dst_off; each of the n chunks is the slice dst[dst_off, dst_off + ulen) of that output
 * (its own dst_off, inside the context's) and gets ERN_COLD_OK when all its bytes came
 * out before any error (alg set to ERN_COLD_ZRAN: ern_cold_store takes it from dst).
 * Returns the number of chunks that came out. */
enum { ERN_COLD_ZRAN = 3 };
struct ern_cold_zctx {
    uint64_t src_off;
    uint64_t src_len;
    uint64_t skip;
    uint64_t dst_off;
    uint64_t out_len;
    const uint8_t *window;
    uint32_t window_size;
    uint8_t bits;
    uint8_t byte;
};
int ern_cold_zran(const uint8_t *src, size_t srclen, uint8_t *dst, size_t dstlen,
                  const struct ern_cold_zctx *ctx, struct ern_cold_chunk *chunks, uint32_t n);
/* one raw LZ4 block (Nydus lz4_block chunks): its size, 0 if it does not fit in cap */
int64_t ern_lz4_block_compress(const uint8_t *src, size_t n, uint8_t *dst, size_t cap);

/* ---- pack's chunk reader (chunkread.c): a batch of file pieces into one buffer ----
 * Chunk i: len[i] bytes at file_off[i] of the file named by the NUL-terminated string
 * at names + name_off[i] (opened O_NOFOLLOW; consecutive chunks of one name share the
 * open file), read to buf + buf_off[i]; with digests, a chunk of at most hash_max bytes
 * also hashed (ern_blake3) into digests + 32 * i (the others' 32 bytes left as they
 * are). ERN_CHUNKS_OK, or why chunk *fail_index failed (errno in *fail_errno for
 * EOPEN/EREAD; ESHORT: the file ended before the chunk). */
enum {
    ERN_CHUNKS_OK = 0, ERN_CHUNKS_EOPEN = 1, ERN_CHUNKS_EREAD = 2, ERN_CHUNKS_ESHORT = 3,
    ERN_CHUNKS_EINVAL = 4
};
int ern_chunks_read(const char *names, const uint32_t *name_off, const uint64_t *file_off,
                    const uint32_t *len, const uint64_t *buf_off, uint32_t n, uint8_t *buf,
                    uint64_t cap, uint32_t hash_max, uint8_t *digests,
                    uint32_t *fail_index, int32_t *fail_errno);
/* BLAKE3 (hash mode) of len bytes at in: its 32-byte digest (blake3.c; portable C) */
void ern_blake3(const uint8_t *in, uint64_t len, uint8_t out[32]);
/* the same of two inputs, a and b, into aout and bout: side by side when both are of at
 * most 1 KiB (one BLAKE3 chunk each), else one after the other */
void ern_blake3_2(const uint8_t *a, uint32_t alen, uint8_t aout[32], const uint8_t *b,
                  uint32_t blen, uint8_t bout[32]);
/* pack's batch read buffers (--compressor none: a batch's chunks are views of its
 * buffer until the blob writer has copied them): ern_batchbuf_get(size) -> a buffer of
 * at least size bytes, not zeroed, or NULL; ern_batchbuf_put gives it back. Up to
 * ern_batchbuf_keep(n) idle buffers are kept for the next batches (the rest freed), so
 * a pack does not map, fault in, zero and unmap ~1 MiB per batch. Thread-safe. */
void *ern_batchbuf_get(size_t size);
void ern_batchbuf_put(void *p);
void ern_batchbuf_keep(uint32_t n);
/* pack's zstd chunks (chunkzstd.c): piece i of src (len[i] bytes at off[i]) compressed
 * into one zstd frame by compress2 (a ZSTD_compress2) with cctx, whose errors is_error
 * (a ZSTD_isError) tells, the frames back to back into dst, each piece's stored size in
 * out_len[i]: a frame that does not shrink its piece is replaced by the piece itself
 * (stored raw), and so is, without compressing it, a piece of at most
 * ERN_ZSTD_GZIP_RAW_MAX bytes that starts as a gzip member (1f 8b 08), an xz stream or
 * a bzip2 stream does, or one of at most ERN_ZSTD_PNG_RAW_MAX bytes that
 * starts with PNG's signature (chunkzstd.c's stored_raw). dst needs
 * ern_zstd_chunks_bound(len, n) bytes. ERN_CHUNKS_OK, ERN_CHUNKS_EINVAL (a piece
 * outside src, dst too small) or ERN_ZSTD_ERROR (zstd failed), for piece *fail_index. */
enum { ERN_ZSTD_ERROR = 5, ERN_ZSTD_GZIP_RAW_MAX = 65536, ERN_ZSTD_PNG_RAW_MAX = 4096 };
uint64_t ern_zstd_chunks_bound(const uint32_t *len, uint32_t n);
int ern_zstd_chunks(void *compress2, void *is_error, void *cctx, const uint8_t *src,
                    uint64_t srclen, const uint64_t *off, const uint32_t *len, uint32_t n,
                    uint8_t *dst, uint64_t cap, uint32_t *out_len, uint32_t *fail_index);
/* the n pieces src[i] (len[i] bytes each) back to back into dst (cap bytes): the blob
 * writer's group of stored chunks made one buffer to hash and write, copied without the
 * GIL. ERN_CHUNKS_OK, or ERN_CHUNKS_EINVAL if they do not fit. */
int ern_gather(uint8_t *const *src, const uint64_t *len, uint32_t n, uint8_t *dst,
               uint64_t cap);
/* the blob writer's placement of n chunks appended in a row: chunk i stored as csize[i]
 * bytes at *pos, its data usize[i] bytes at *upos (then rounded up to 4096); its
 * compressed and uncompressed offsets to coff[i], uoff[i], its 16-byte CI v1 entry to
 * ci + 16 i; *pos and *upos advanced past them. -> 0, or -1 with *fail_index set: a
 * stored size of 0 or over its data's (nothing past that chunk written). */
int ern_ci_v1_append(const uint32_t *csize, const uint32_t *usize, uint32_t n,
                     uint64_t *pos, uint64_t *upos, uint64_t *coff, uint64_t *uoff,
                     uint8_t *ci, uint32_t *fail_index);
/* pack's chunk info table (the new blob's chunks, each digest once): ern_ci_order puts
 * the indexes i < n with used[i] into order, sorted by their 32-byte digests (digests +
 * 32 i), -> how many; ern_ci_entries writes the 80-byte RafsV5ChunkInfo entries of
 * order[start .. start + count) to out: chunk i of blob `blob_index`, compressed
 * (flag 1) when csize[i] != usize[i], file_off[i] the offset of its first use. */
uint32_t ern_ci_order(const uint8_t *digests, const uint8_t *used, uint32_t n,
                      uint32_t *order);
void ern_ci_entries(const uint8_t *digests, const uint32_t *order, uint32_t start,
                    uint32_t count, uint32_t blob_index, const uint64_t *coff,
                    const uint32_t *csize, const uint64_t *uoff, const uint32_t *usize,
                    const uint64_t *file_off, uint8_t *out);
/* pack's 8-byte chunk indexes of n references to the new blob's chunks (CI indexes
 * refs[k] < nchunks): advise = index bits 0-15, device_id = dev | index bits 16-23 << 8,
 * blkaddr = uoff[index] / 4096, into out[k]; used[index] = 1. -> 0, -1: a bad index. */
int ern_chunk_indexes(const uint32_t *refs, uint32_t n, const uint64_t *uoff,
                      uint32_t nchunks, uint32_t dev, uint64_t *out, uint8_t *used);

/* ---- a blob's chunk map from a bootstrap's chunk-info table (chunkmap.c) ----
 * ern_ci_pins: the pins of blob `blob` among the nrows 80-byte rows of `table`, as
 * 61-byte records <IQIQI32s? (CI index, uncompressed offset and size, compressed offset
 * and size, digest, compressed flag) in index order, exact repeats dropped; out has room
 * for nrows records. Returns their count, -1 (a row names blob *detail >= nblobs), -2
 * (index *detail pinned twice differently) or -3 (no memory).
 * ern_ci_table_text: the text storage/image.py's table digest hashes for these pins
 * ("index:uoff:usize:coff:csize:" + digest each); its length or -1 (cap too small).
 * ern_ci_map: when the pins cover the blob's chunk_count chunks and pass BlobMeta's
 * checks, the chunk map's entries in uncompressed order (map_out: the map file's
 * <IQIQIB32s records; chunks_out: 77-byte <IQIQI32s?qQ records, reader/blob.py's
 * BlobChunk fields with zran index -1 and offset 0) and 0; else a reason code > 0. */
int64_t ern_ci_pins(const uint8_t *table, uint64_t nrows, uint32_t nblobs, uint32_t blob,
                    uint8_t *out, uint64_t *detail);
int64_t ern_ci_table_text(const uint8_t *pins, uint64_t count, uint8_t *out, uint64_t cap);
int ern_ci_map(const uint8_t *pins, uint64_t count, uint64_t chunk_count, uint64_t usize,
               uint64_t csize, uint32_t chunk_size, int raw_only, uint8_t *map_out,
               uint8_t *chunks_out);

/* ---- the data runs of a bootstrap's regular files (fileruns.c) ----
 * ern_file_runs: walk the tree of the EROFS image `image` (size bytes; metadata at
 * meta_off, 2^blkszbits blocks, root_nid, device ids masked by devmask, ndevices extra
 * devices) as the reader's Image.walk does, up to max_inodes regular files; *out (free
 * with ern_file_runs_free) gets the paths of the regular files with runs, each ended by
 * a NUL (*paths_len bytes), then their runs: u32 file number, u32 blob, u64 start, u64
 * end. Returns the bytes in *out, -1 (the tree holds something the reader refuses, or
 * its directories' paths pass 16 x size + 16 MiB: use its walk) or -3 (no memory). */
int64_t ern_file_runs(const uint8_t *image, uint64_t size, uint64_t meta_off,
                      uint32_t blkszbits, uint64_t root_nid, uint32_t devmask,
                      uint32_t ndevices, uint64_t max_inodes, uint8_t **out,
                      uint64_t *paths_len);
void ern_file_runs_free(uint8_t *p);

/* ---- the fanotify fd holder's fast path (fanhold.c) ----
 * ern_fan_allow_filled: the events of one read(2) of a fanotify group (buf, len bytes),
 * walked whole first (-1 if malformed: nothing answered). Each event with an fd and a
 * range record whose range (clamped to the file's size, non-empty) is wholly set in
 * the bitmap of its file (maps: by fstat's st_dev/st_ino; one bit per 4 KiB block, bit
 * b & 7 of byte b >> 3) is answered FAN_ALLOW on group_fd and its fd closed:
 * done[i] = 1 for it (i: its place in the buffer; done has ndone bytes, -1 if fewer
 * than the events) and allowed[k] = (its map, offset, count). Returns the number
 * allowed; *nevents gets the number of events. */
struct ern_fan_map {
    uint64_t dev, ino;
    uint64_t size;              /* the file's size */
    uint64_t nblocks;           /* bits in the map */
    const uint8_t *bits;
    /* the file's first-touch log (fanotify_marks.TouchLog), or seen NULL for none: an
     * answered event whose range (clamped to size) has a block not yet set in seen
     * (nblocks bits) sets them and appends (first block << 24 | blocks, at most
     * 2^24 - 1; CLOCK_MONOTONIC ns) at tlog[2 * *tlen], *tlen += 1, while *tlen <
     * tcap records (a record has a new block: nblocks records at most) */
    uint8_t *seen;
    uint64_t *tlog;
    uint64_t *tlen;
    uint64_t tcap;
};
struct ern_fan_allowed {
    uint32_t map, pad;
    uint64_t offset, count;
};
int64_t ern_fan_allow_filled(int group_fd, const uint8_t *buf, size_t len,
                             const struct ern_fan_map *maps, uint32_t nmaps, uint8_t *done,
                             uint32_t ndone, struct ern_fan_allowed *allowed,
                             uint32_t *nevents);

/* ern_fan_serve: the holder's poll loop while only filled events come (a cold sequential
 * read: nearly all of them), without returning to Python per event. poll(2) on fds
 * (struct pollfd's layout; timeout_ms < 0: none); while the group (group_fd, one of
 * fds) is the only one ready, read it into buf (cap bytes) and answer its filled events
 * as ern_fan_allow_filled does, appending them to log (log_ns: CLOCK_MONOTONIC of each
 * answer), *nlog entries in all. Returns 0 (timed out), 1 (fds ready: revents set; if
 * the group was read and some of its events were not answered, *used = the bytes read
 * and done[] / *nevents are that read's, *nevents = 0 if it is malformed: nothing in
 * it answered), 2 (interrupted by a signal), 3 (the log has less than ndone entries
 * left), or -errno of poll. */
struct ern_fan_pollfd {
    int32_t fd;
    int16_t events, revents;
};
int ern_fan_serve(int group_fd, struct ern_fan_pollfd *fds, uint32_t nfds, int timeout_ms,
                  uint8_t *buf, size_t cap, size_t *used, const struct ern_fan_map *maps,
                  uint32_t nmaps, uint8_t *done, uint32_t ndone, uint32_t *nevents,
                  struct ern_fan_allowed *log, uint64_t *log_ns, uint32_t log_cap,
                  uint32_t *nlog);

/* ---- SHA-256 for pack's blob id (sha256.c) ----
 * hashlib's without libcrypto (~3.5 MiB of pack's RSS): the x86 SHA extensions when
 * the CPU has them (ern_sha256_accelerated), else portable C (also when init is given
 * portable != 0: the tests check both). final leaves the state usable (a copy is
 * finished). */
struct ern_sha256 {
    uint32_t h[8];
    uint64_t len;
    uint8_t buf[64];
    uint32_t nbuf;
    int portable;
};
int ern_sha256_accelerated(void);
void ern_sha256_init(struct ern_sha256 *s, int portable);
void ern_sha256_update(struct ern_sha256 *s, const uint8_t *p, uint64_t n);
void ern_sha256_final(const struct ern_sha256 *s, uint8_t out[32]);

/* ern_heap_bound: glibc's mallopt(M_ARENA_MAX, arenas) and (M_MMAP_THRESHOLD,
 * mmap_threshold) for pack's process (builder/heap.py, without ctypes: ~0.5 MiB of
 * its RSS); 1 if both applied, 0 (either refused, or not glibc). In sha256.c. */
int ern_heap_bound(int arenas, int mmap_threshold);

/* ---- a blob's own chunk-info table as pin records (chunkmap.c) ----
 * ern_ci_blob_pins: the n entries of CI table `ci` (v2 != 0: 24-byte entries, else
 * 16-byte v1) as 61-byte pin records in index order into out (n records), each with
 * the digest of the bootstrap's pin of that index (pins: npins records in index order,
 * as ern_ci_pins makes them; the pin must give the entry's place) or else the blob's
 * own (digests: n x 32 bytes, or NULL). Returns 0, or a reason > 0 (a pin past the
 * table, unknown flags, a pin placed elsewhere, a chunk without a digest). */
int ern_ci_blob_pins(const uint8_t *ci, uint64_t n, int v2, const uint8_t *digests,
                     const uint8_t *pins, uint64_t npins, uint8_t *out);

/* ---- the reader's SIGBUS guard over mapped image files (imageguard.c) ----
 * ern_guard_add: register the mapping [addr, addr + len) of an image file; returns its
 * slot (0..1023), or -1 (table full, or the handler could not be installed: then the
 * caller must not map). A fault in a registered range (the file shrank) is answered
 * with anonymous zero pages from the faulting page to the range's end, and
 * ern_guard_hit[slot] set to 1 before them: the reader checks it after each copy.
 * Other SIGBUSes go to the handler installed before (or the default action).
 * ern_guard_install puts the handler back on top if another one (faulthandler) was
 * installed since; ern_guard_add calls it. ern_guard_remove: before the munmap. */
extern uint32_t ern_guard_hit[1024];
int ern_guard_install(void);
int ern_guard_add(const void *addr, uint64_t len);
void ern_guard_remove(int slot);

#endif
