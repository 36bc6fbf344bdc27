/* Internal header of the C core's builder: the node graph and builder state shared by
 * nodes.c (graph construction), datastream.c (file-data copies and the stream worker),
 * dirs.c (directory blocks), layout.c (nids, xattr packing, block allocation) and write.c
 * (serialization).
 *
 * Not part of the API (that is erofs_native.h, also the cffi cdef). Functions declared
 * here are hidden: they link between the core's objects but are not exported from the
 * extension, so no other library's symbol of the same name can interpose them.
 *
 * Image map (mkfs defaults): block 0 = superblock at 1024, inodes from byte 1152
 * (meta_blkaddr 0, root nid 36), then the shared xattr area (block aligned), then data
 * blocks (directories and files, in nid order). Stream mode puts file data first.
 */
#ifndef EROFS_BUILDER_INT_H
#define EROFS_BUILDER_INT_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>
#include "erofs_fs.h"
#include "erofs_native.h"

#define INTERNAL __attribute__((visibility("hidden")))

#define NONE32 0xFFFFFFFFu        /* "no node / no index" in the builder's own arrays */
#define WIN_SIZE (1u << 20)       /* metadata window of the writer */
#define CBUF_SIZE (1u << 20)      /* copy buffer when copy_file_range cannot be used */
#define SB_END (EROFS_SUPER_OFFSET + sizeof(struct erofs_super_block))

enum { L_PLAIN = EROFS_INODE_FLAT_PLAIN, L_INLINE = EROFS_INODE_FLAT_INLINE,
       L_CHUNK = EROFS_INODE_CHUNK_BASED, L_ZFULL = EROFS_INODE_COMPRESSED_FULL,
       L_ZCOMPACT = EROFS_INODE_COMPRESSED_COMPACT };
/* where a node's data comes from */
enum { D_NONE = 0, D_FILE, D_BYTES, D_CHUNKS, D_SPARSE };

struct node {
    uint64_t size;
    int64_t mtime;
    uint64_t nid;
    uint64_t meta_off;      /* absolute byte offset of the inode */
    uint64_t data_off;      /* D_FILE: source offset; D_BYTES: arena offset */
    uint32_t mode, uid, gid, mtime_nsec;
    uint32_t rdev;          /* new encoding */
    uint32_t nlink;
    uint32_t parent;        /* directories: parent node (NONE32 = none yet) */
    uint32_t path_off, path_len; /* D_FILE / D_SPARSE: source path in arena */
    uint32_t aux;           /* D_CHUNKS / D_SPARSE: index into b->chunks */
    uint32_t xa_first, xa_count;  /* after layout: range in sorted xattr array */
    uint32_t de_first, de_count;  /* after layout: range in sorted dirent array */
    uint32_t startblk;
    uint32_t xattr_isize;
    uint32_t tail;          /* inline tail bytes */
    uint32_t ino;           /* i_ino (order + 1) */
    uint32_t xa_max;        /* xattr ibody size if every xattr were inline */
    uint8_t dkind, layout, extended, placed;
    uint8_t streamed, stream_inline;
};

/* what only stream mode (opts.stream_data: the data copied, or compressed, while nodes
 * are added) keeps per node: b->nx, beside b->nodes at the same index (also with --zD
 * outside stream mode, --tar=i's index: the directories' map headers); NULL otherwise,
 * where NXR() reads every field as 0. Out of struct node, which it made 200 bytes
 * instead of 128: 4 MiB of pack's peak for 56k nodes that never use it */
struct nodex {
    uint8_t *tailbuf;       /* stream mode: inline tail read by the worker (or NULL) */
    uint8_t *zmeta;         /* compressed: map header + lcluster indexes (compress.c) */
    uint8_t *ztail;         /* ztailpacking: the inline last extent, after the index */
    uint32_t zmeta_len, zblocks;
    uint32_t ztail_len;
    uint32_t zps;           /* its pcluster size (0: not compressed) */
    uint8_t zfull_only;     /* compressed, with a fragment the compact index cannot hold */
    uint8_t zhint, zalg;    /* --compress-hints: set; algorithm index */
    /* plain stream mode (smeta.c): the record's room reserved among the data, in the
     * order a reader walking the tree meets it */
    uint8_t sres;           /* soff/slen hold a reservation (2: the root's in block 0) */
    uint8_t sdir;           /* a directory whose blocks were placed in the stream */
    uint32_t slen;          /* bytes reserved (an upper bound of the record) */
    uint64_t soff;          /* offset in the reserved blocks (smeta.c's virtual area) */
    uint64_t sdir_size;     /* sdir: the directory size its blocks were placed for */
};

/* a copy job for the stream worker: everything it needs, nothing shared */
struct job {
    struct job *next;
    char *path;
    uint64_t src_off, out_off, full, tail_src_off, expect_size;
    uint8_t *tailbuf;
    uint32_t tail;
    uint64_t *sparse;       /* D_SPARSE: chunk entries (1 | blk << 32) or NULL */
    uint32_t nchunks;
    uint64_t csz, size;
    uint64_t zero_off, zero_len;  /* smeta: blocks before the data, zeroed first */
};

/* the output when it is not a fresh regular file (erofs_builder_set_target): image
 * offset 0 is at `base` in it; a block device (`device`) is never truncated, holds
 * `limit` bytes from base (a write past them fails before it is made), and the ranges
 * written are noted so that what the image leaves unwritten is zero-filled at the end
 * (a file gets those zeros from its truncation; a device would keep its old bytes);
 * dsunit: the device's data stripe unit, which file data is aligned to */
struct outrange {
    uint64_t off, len;
};
struct outtarget {
    uint64_t base, limit, filled;
    uint64_t dsunit;        /* > 1: each file's data starts on a multiple of it (blocks) */
    int device, oom;
    pthread_mutex_t mu;
    struct outrange *w;
    size_t nw, capw;
};

/* data transfer context: one per thread (own buffer, own error message) */
struct xfer {
    int out;
    struct outtarget *ot;   /* NULL: a fresh file, image offset = file offset */
    uint32_t blksz;
    uint8_t *buf;
    volatile uint64_t *bytes;
    int code;
    char err[600];
};

struct dirent_rec {
    uint32_t parent, child;
    uint32_t name_off;
    uint16_t name_len;
};

struct xattr_rec {
    uint32_t node;
    uint32_t name_off;      /* suffix in arena */
    uint32_t val_off;
    uint16_t val_len;
    uint8_t index, name_len;
    uint32_t shared_id;     /* NONE32 = inline */
};

struct chunkset {
    uint32_t format;        /* i_u low 16 bits */
    uint32_t count;
    uint64_t *entries;      /* D_CHUNKS: raw entries; D_SPARSE: 0 hole / 1 data, then blkaddr */
};

struct device {
    uint8_t tag[64];
    uint64_t blocks;        /* (bits 32-47: the slot's blocks_hi) */
    uint32_t mapped;
};

struct putbytes {
    uint64_t off;
    size_t len;
    uint8_t *data;
};

struct erofs_builder {
    struct erofs_opts o;
    uint32_t blksz;
    char err[600];
    struct node *nodes;
    uint32_t nnodes, cap_nodes;
    struct nodex *nx;       /* stream mode (or --zD): one per node */
    uint32_t cap_nx;
    struct dirent_rec *des;
    uint32_t nde, cap_de;
    struct xattr_rec *xas;
    uint32_t nxa, cap_xa;
    uint8_t *arena;
    uint64_t arena_len, arena_cap;
    struct chunkset *chunks;
    uint32_t nchunks, cap_chunks;
    struct device *devs;
    uint32_t ndevs;
    struct putbytes *puts;
    uint32_t nputs;
    uint32_t root;
    int laid_out;
    uint32_t *order;        /* nid order of node ids */
    uint32_t *worder;       /* node ids by inode offset (write order) */
    uint32_t norder;
    struct erofs_layout_info info;
    uint32_t *shared_order; /* xattr rec index of each shared xattr, in id order */
    uint32_t nshared;
    /* write state */
    struct outtarget *ot;   /* erofs_builder_set_target, else NULL */
    int fd;
    uint32_t wpos;
    uint8_t *win;
    uint8_t *wdirty;        /* smeta: the window's blocks written to */
    uint64_t win_start, win_hi;
    uint8_t *cbuf;
    uint64_t bytes_done;
    int wfailed;
    uint64_t first_inode_off;
    int wdone, sb_blocks_set;
    uint64_t sb_blocks_val;
    /* stream mode */
    int sfd;
    uint64_t scur;          /* next free data block */
    uint64_t tail_mem;
    int worker_on, qstop, qabort;
    pthread_t workers[2];   /* the copy threads (COPY_THREADS) */
    int nworkers;
    pthread_mutex_t mu;
    pthread_cond_t cv_job, cv_space, cv_idle;
    struct job *qhead, *qtail;
    uint32_t qlen;
    int werr_code;
    char werr[600];
    volatile uint64_t sbytes;
    struct smeta *sm;       /* stream mode: records reserved among the data */
    struct smitem *smq;     /* compressed (zsmeta.c): records and directories waiting */
    uint32_t nsmq, capsmq;  /* for the pool's next commit, made on the caller's thread */
    uint64_t szero;         /* smeta: the first block after the last job's data */
    /* compression (compress_int.h): settings and, while files come in, the pool */
    struct zconf *zc;
    struct zpool *zp;
    struct zpool *zlate;    /* --zD: the pool kept from its stop to the layout's end */
    uint64_t mbox_blk, mbox_size;   /* -m: the metabox inode's data (metabox.c) */
    uint64_t gap_blocks, gap_blk;   /* -m -z: blocks left before the metabox (metabox.c) */
    uint64_t mbox_rec;      /* -m: its record's offset */
    uint64_t late_off;      /* --zD: where the packed inode's data starts (bytes) */
    uint32_t packed_node;   /* -Efragments: the packed inode (NONE32: none) */
    uint8_t *xpfx;          /* long xattr name prefix table, encoded */
    uint32_t xpfx_len, xpfx_count;
    int32_t xpfx_ishare;    /* -1: no fingerprint prefix */
    uint8_t xpfx_packed;    /* -Efragments: the table heads the packed inode's data */
    struct chunkdd *cdd;    /* chunkbits: the chunks stored so far, by digest (chunked.c) */
    int bfd;                /* chunkbits with a blob: its fd (-1: chunks in the image) */
    uint64_t bcur;          /* the blob's next free block */
};

/* where the long xattr prefix table starts (4-byte aligned, after the compression
 * records) and where the superblock area ends */
INTERNAL uint64_t xpfx_start(const erofs_builder *b);
/* fragments.c, -Efragments: the table written at the packed inode's start (once the
 * pool runs: set_xattr_prefixes or the pool's start, whichever is later) */
INTERNAL int zpacked_prefixes(erofs_builder *b);

/* nodes.c */
INTERNAL int fail(erofs_builder *b, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
INTERNAL void *grow(void *p, uint32_t *cap, uint32_t need, size_t elem);
INTERNAL int64_t arena_put(erofs_builder *b, const void *data, size_t len);
INTERNAL int check_mutable(erofs_builder *b);

/* datastream.c: data transfers (any thread) and the stream worker */
INTERNAL int xfail(struct xfer *x, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
INTERNAL int x_pwrite(struct xfer *x, const void *buf, size_t len, uint64_t off);
/* a write of [off, off+len) of the image is about to be made: past a device's end it
 * fails (message in x), else it is noted; -> 0 or an ERN_* code */
INTERNAL int ot_note(struct xfer *x, uint64_t off, uint64_t len);
INTERNAL uint64_t ot_base(const struct outtarget *ot);
INTERNAL void ot_free(erofs_builder *b);    /* write.c */
INTERNAL int x_read(struct xfer *x, int fd, uint8_t *buf, size_t len, uint64_t off,
                    const char *path);
INTERNAL int x_copy(struct xfer *x, int in, uint64_t in_off, uint64_t out_off, uint64_t len,
                    const char *path);
INTERNAL int x_copy_sparse(struct xfer *x, int fd, const char *path, uint64_t size,
                           const uint64_t *entries, uint32_t count, uint64_t csz);
INTERNAL void main_xfer(erofs_builder *b, struct xfer *x);
INTERNAL void stream_xfer(erofs_builder *b, struct xfer *x, uint64_t *bytes);
INTERNAL int read_exact(erofs_builder *b, int fd, uint8_t *buf, size_t len, uint64_t off,
                        const char *path);
INTERNAL int copy_range(erofs_builder *b, int in, uint64_t in_off, uint64_t out_off,
                        uint64_t len, const char *path);
INTERNAL int stream_stop(erofs_builder *b, int abort);
INTERNAL int stream_place(erofs_builder *b, uint32_t node, struct job *j, uint64_t nblk);
INTERNAL void stream_job_free(struct job *j);
INTERNAL int stream_file(erofs_builder *b, uint32_t node, const char *path, size_t pathlen,
                         uint64_t offset);

/* chunked.c: a regular file cut into chunks (opts.chunkbits), each new one written at
 * the stream's (or blob's) next block now, on the caller's thread; the chunk table */
INTERNAL int chunked_file(erofs_builder *b, uint32_t node, const char *path, size_t pathlen,
                          uint64_t offset);
INTERNAL void chunked_free(erofs_builder *b);
/* the compression pool's commit of a file it stores uncompressed: chunks (from base on,
 * or in the blob) instead -> the chunk set's index + 1 in *pci; errors in x */
INTERNAL int zchunk_commit(erofs_builder *b, struct xfer *x, const char *path,
                           uint64_t offset, uint64_t size, uint64_t base, uint32_t *pci);

/* zstream.c (compression pool; compress_int.h has the rest) */
INTERNAL int zpool_start(erofs_builder *b);
INTERNAL int zpool_submit(erofs_builder *b, uint32_t node, const char *path, size_t pathlen,
                          uint64_t offset);
INTERNAL int zpool_stop(erofs_builder *b, int abort);
/* zdir.c, --zD: a directory's record holds its map header only (ZDIR_HDR bytes) */
#define ZDIR_HDR 8u
/* before the formats: each directory's map header (filled by zdir_pack) */
INTERNAL int zdir_prepare(erofs_builder *b);
/* once every record but the packed inode's is placed: the directories into the packed
 * inode, compressed from block *blk on (*blk: the block after it), its node added */
INTERNAL int zdir_pack(erofs_builder *b, uint64_t *blk);
/* the packed inode's record: among the data, at the inode area's end or after *blk */
INTERNAL int zdir_place_packed(erofs_builder *b, uint64_t meta_start, uint64_t *meta_end,
                               uint64_t *blk);
INTERNAL void zdir_drop(erofs_builder *b);
/* metabox.c, -m: the metabox inode's record in block 0, the inode area from the block
 * after it (nids with bit 63 set count from there), its data: that area stored plain */
INTERNAL uint64_t metabox_rec_off(const erofs_builder *b);
INTERNAL uint64_t metabox_meta_start(const erofs_builder *b);
INTERNAL int metabox_laid_out(erofs_builder *b, uint64_t meta_start, uint64_t meta_end);
/* -m with -z, stream mode: the shared xattr area from block *blk on (*xblk), before the
 * inode area, which stays last to be compressed in place; -> the inode area's block */
INTERNAL uint64_t metabox_late_blk(const erofs_builder *b, uint64_t blk, uint64_t meta_start);
INTERNAL void metabox_after_packed(erofs_builder *b, uint64_t pblk, uint64_t *meta_start,
                                   uint64_t *meta_end, uint64_t *blk);
INTERNAL uint64_t metabox_area(erofs_builder *b, uint32_t shared_bytes, uint64_t *blk,
                               uint32_t *xblk);
/* -m with -z, once every record is written: the inode area compressed in place, the
 * metabox's record after its pclusters, the image's end moved */
INTERNAL int metabox_compress(erofs_builder *b);
INTERNAL int metabox_write(erofs_builder *b,
                           int (*pw)(erofs_builder *, const void *, size_t, uint64_t));
INTERNAL uint32_t zmeta_extra(const erofs_builder *b, const struct node *n);
/* zlayout.c: a compressed node's compact index (-E48bit: its extent records if smaller
 * than the full index; -E legacy-compress: else the full one); the first inode offset from off on
 * (32-byte steps) at which its inline tail stays inside one block */
INTERNAL int compact_zindex(erofs_builder *b, struct node *n);
INTERNAL uint64_t ztail_fit(const erofs_builder *b, const struct node *n, uint64_t off,
                            uint32_t blksz);
/* compress.c: superblock fields of the compression settings (0 / NULL without) */
INTERNAL uint32_t zconf_incompat(const erofs_builder *b);
INTERNAL uint16_t zconf_sb_u1(const erofs_builder *b);
INTERNAL const uint8_t *zconf_cfgs(const erofs_builder *b, uint32_t *len);
/* zindex.c: a full index (map header, 8 reserved, 8-byte entries) to the compact one
 * (map header, packs of 4-byte and 2-byte entries) of an inode whose index starts mpos
 * bytes (8-aligned, after the map header) after a 32-byte boundary -> malloc'ed bytes */
INTERNAL uint8_t *zindex_compact(const uint8_t *full, uint32_t full_len, uint32_t mpos,
                                 int big, uint32_t *len);

/* dirs.c */
INTERNAL int namecmp(const uint8_t *a, size_t al, const uint8_t *b2, size_t bl);
INTERNAL uint64_t dir_pack(erofs_builder *b, struct node *d, uint8_t *out);

/* metapack.c: inode records packed into the blocks of the inode area, best fit */
struct mpack {
    uint32_t blksz, nbuckets;
    uint64_t base;              /* block number of the area's first block */
    uint64_t end;               /* end of the last record so far */
    uint64_t nblk, cap;
    uint32_t *lo, *hi;          /* per block: its free range, 32-aligned */
    uint32_t *next, *prev;      /* per block: its bucket's list */
    uint32_t *head;             /* per bucket (free 32-byte slots): first block */
    uint64_t *bits;             /* non-empty buckets */
    int pre;                    /* index 0 is block 0 (room after the superblock) */
    int seq;                    /* each record at the end (no best fit): -m -z */
};
INTERNAL int mpack_init(struct mpack *m, uint64_t start, uint32_t blksz, uint32_t pre_lo);
INTERNAL void mpack_free(struct mpack *m);
INTERNAL int mpack_place(struct mpack *m, uint64_t len, int may_cross,
                         uint64_t (*fit)(const void *ctx, uint64_t off), const void *ctx,
                         uint64_t *pout);
INTERNAL int mpack_fill(struct mpack *m, uint64_t len, uint64_t *pout);
INTERNAL uint64_t mpack_record_len(const erofs_builder *b, const struct node *n,
                                   int *may_cross);

/* a record or directory the compression pool places at a commit (zsmeta.c) */
struct smitem {
    uint32_t node, len;     /* len: the record's bytes to reserve (0: none) */
    uint32_t nblk;          /* a directory's blocks */
    uint32_t startblk;      /* result: the first of them */
    uint64_t soff;          /* result: the record's room (smeta.c's virtual area) */
    uint8_t ok;             /* result: soff holds a reservation */
    uint8_t early;          /* packed with its window (zsmeta.c): its block mapped later */
};

/* smeta.c: inode records placed among the streamed data, in tree-walk order */
#define SM_UNMAPPED UINT64_MAX   /* a virtual block without its stream block yet */
INTERNAL int smeta_room(erofs_builder *b, uint32_t len, uint64_t *poff);
INTERNAL int smeta_vroom(erofs_builder *b, uint32_t len, int map, uint64_t *poff);
INTERNAL void smeta_map(erofs_builder *b, uint64_t off);
INTERNAL int zsm_push(erofs_builder *b, uint32_t node, uint32_t len, uint32_t nblk);
INTERNAL int smeta_on(const erofs_builder *b);
INTERNAL int smeta_reserve(erofs_builder *b, uint32_t node, uint32_t len);
INTERNAL void smeta_pending(erofs_builder *b, uint32_t upto);
INTERNAL int smeta_defer(erofs_builder *b, uint32_t node, struct job *j, uint32_t len,
                         uint64_t nblk);
INTERNAL int smeta_flush(erofs_builder *b);
INTERNAL int smeta_dir(erofs_builder *b, uint32_t node, const char *names,
                       const uint32_t *offs, uint32_t n);
INTERNAL int smeta_fill(erofs_builder *b, struct node *n, uint64_t len);
INTERNAL uint64_t smeta_off(const erofs_builder *b, const struct node *n);
INTERNAL uint32_t smeta_pre_lo(erofs_builder *b, uint64_t lo);
INTERNAL void smeta_free(erofs_builder *b);
INTERNAL uint64_t dir_size_sorted(uint32_t blksz, const char *names, const uint32_t *offs,
                                  uint32_t n, int no_dot);

/* metazone.c: the data blocks not streamed (after the streamed data), mkfs --MZ */
INTERNAL int alloc_flat_data(erofs_builder *b, uint64_t *pblk);
INTERNAL uint64_t metazone_nid0(const erofs_builder *b, uint64_t zone);
INTERNAL uint64_t metazone_win(const erofs_builder *b);
INTERNAL int metazone_dirs(erofs_builder *b, uint64_t *pos);
INTERNAL int metazone_first(erofs_builder *b, uint64_t *blk, uint64_t *data_start,
                            uint64_t *meta_start);
/* layout.c */
INTERNAL uint64_t sb_area_end(const erofs_builder *b);
INTERNAL int is_flat_data(const struct node *n);
INTERNAL uint32_t xentry_size(const struct xattr_rec *x);
/* xattrs.c: the inode's xattr name filter (EROFS_FEATURE_COMPAT_XATTR_FILTER), and the
 * layout phase: per-node ranges, the shared area (*shared_bytes), inline sizes;
 * *filtered set when some inode's filter rules a name out */
INTERNAL uint32_t xattr_name_filter(const erofs_builder *b, const struct node *n);
INTERNAL int pack_xattrs(erofs_builder *b, uint32_t *shared_bytes, int *filtered);
INTERNAL int match_long_prefix(const erofs_builder *b, uint8_t base, const char *rest,
                               size_t restlen, uint32_t *infix_len);
INTERNAL uint64_t place_sparse_chunks(erofs_builder *b, struct chunkset *cs, uint64_t size,
                                     uint64_t blk);

static inline uint64_t align_up(uint64_t v, uint64_t a)
{
    return (v + a - 1) / a * a;
}

INTERNAL extern const struct nodex nodex_zero;

/* node n's stream-mode fields, to change (stream mode only: b->nx is there) */
static inline struct nodex *NX(const erofs_builder *b, const struct node *n)
{
    return &b->nx[n - b->nodes];
}

/* ... to read: all 0 outside stream mode */
static inline const struct nodex *NXR(const erofs_builder *b, const struct node *n)
{
    return b->nx ? &b->nx[n - b->nodes] : &nodex_zero;
}

/* -E48bit: the superblock's epoch for build time bt (compact inodes' mtimes count from
 * it, 32 bits), as mkfs.erofs 1.9 sets it; 0 without -E48bit or a given build time */
static inline int64_t sb_epoch(const erofs_builder *b, int64_t bt)
{
    if (!b->o.sb_48bit || b->o.auto_build_time)
        return 0;
    return bt > (int64_t)UINT32_MAX ? bt - (int64_t)UINT32_MAX : 0;
}

static inline int mtime48_fits(const erofs_builder *b, int64_t mtime, int64_t epoch)
{
    (void)b;
    return mtime >= epoch && mtime - epoch <= (int64_t)UINT32_MAX;
}

/* the superblock's end: 16 bytes more with the metabox's extension slot */
static inline uint64_t sb_end(const erofs_builder *b)
{
    return SB_END + (b->o.metabox ? EROFS_SB_EXTSLOT_SIZE : 0);
}

/* stream mode, an index (mkfs --tar=i -z: every file's data on the tar's device, nothing
 * streamed): the inode area right after the superblock area, the data after it, and the
 * packed inode last, as mkfs.erofs 1.9.4 lays out its index */
static inline int index_layout(const erofs_builder *b)
{
    return b->ndevs && !b->o.chunkbits && !b->o.metabox &&
           b->scur == (SB_END + b->blksz - 1) / b->blksz;
}

/* a nid's bit 63: the inode is in the metabox (-m) */
static inline uint64_t nid_mbox_bit(const erofs_builder *b)
{
    return b->o.metabox ? 1ull << EROFS_DIRENT_NID_METABOX_BIT : 0;
}

static inline uint32_t inode_size(const struct node *n)
{
    return n->extended ? (uint32_t)sizeof(struct erofs_inode_extended)
                       : (uint32_t)sizeof(struct erofs_inode_compact);
}

/* the inode size a streamed file will get, decided before the layout: compact when
 * nothing known so far needs the extended inode (the build time is fixed and is the
 * file's mtime, or --ignore-mtime). Only the link count is not known yet:
 * choose_formats checks it. */
static inline uint32_t stream_inode_size(const erofs_builder *b, const struct node *n)
{
    int ext = b->o.force_extended || n->uid > 0xFFFF || n->gid > 0xFFFF ||
              n->size > 0xFFFFFFFFull;
    if (b->o.sb_48bit)          /* (its mtime from the epoch, if in range) */
        ext |= !mtime48_fits(b, n->mtime, sb_epoch(b, b->o.build_time));
    else
        ext |= b->o.auto_build_time ||
               (!b->o.ignore_mtime &&
                (n->mtime != (b->o.build_time < 0 ? 0 : b->o.build_time) ||
                 n->mtime_nsec != b->o.build_time_nsec));
    return ext ? (uint32_t)sizeof(struct erofs_inode_extended)
               : (uint32_t)sizeof(struct erofs_inode_compact);
}

#endif
