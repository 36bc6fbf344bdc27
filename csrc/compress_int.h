/* Internal header of the C core's compression: the algorithms (compress_lz4.c,
 * compress_zstd.c, compress_lzma.c, compress_deflate.c), the per-file extent compressor
 * and index builder (compress.c) and the compression thread pool with its ordered
 * commit (zstream.c).
 *
 * EROFS compresses to a fixed output size: each physical cluster (pcluster, 1 block or
 * -C bytes) is filled with as much input as its compressed form fits in, so every
 * algorithm here offers "destsize": compress a prefix of the input into at most dstcap
 * bytes and say how much input that took. A call depends only on its arguments (no
 * history kept between calls), so the image is the same whatever thread compressed what.
 */
#ifndef EROFS_COMPRESS_INT_H
#define EROFS_COMPRESS_INT_H
#include "builder_int.h"

struct zctx;

#define ZALG_MAX 4       /* algorithms of one image (-z A:B:C:D) */

struct zalg {
    const char *name;        /* as mkfs.erofs -z names it */
    int id;                  /* Z_EROFS_COMPRESSION_* */
    int min_level, max_level, default_level;   /* has_level 0: no level accepted */
    int has_level;
    int (*init)(struct zctx *c);
    /* compress a prefix of src[0, *srclen) into dst (<= dstcap bytes): -> compressed
     * size, *srclen set to the input it took; 0 = nothing fits; < 0 = error (c->err) */
    long (*destsize)(struct zctx *c, const uint8_t *src, uint32_t *srclen, uint8_t *dst,
                     uint32_t dstcap);
    void (*fini)(struct zctx *c);
};

/* the compression settings (from erofs_opts): one per algorithm of the -z list, the
 * first also holding what is image-wide (records, feature bits) */
struct zconf {
    const struct zalg *alg;
    int level;
    uint32_t pclusterblks;   /* 1: one block per pcluster */
    uint32_t pclustersize;
    uint32_t dict_size;      /* lzma/zstd/deflate window */
    int8_t lc, lp, pb;       /* lzma's literal context/position and position bits; -1:
                                the preset's */
    uint32_t threads;
    uint8_t cfgs[64];        /* records written after the superblock (COMPR_CFGS) */
    uint32_t cfgs_len;
    uint16_t sb_u1;          /* available algorithms, or lz4 max distance */
    uint32_t incompat;       /* feature bits compression adds */
    int ztail;               /* -Eztailpacking: a file's last extent inline */
    int frags;               /* -Efragments: a file's last extent in the packed inode */
    int allfrags;            /* -Eall-fragments: every compressed file whole in it */
    int fragdedupe;          /* 0 full, 1 inode (whole files only), 2 off (erofs_opts) */
    uint32_t packed_ps;      /* pcluster size of the packed inode (-Efragments=SIZE) */
    int big;                 /* big pcluster indexes (any pcluster over one block) */
    int dedupe;              /* -Ededupe (and -Efragments): identical pclusters shared */
    int roll;                /* -Ededupe: repeated data matched at any offset (dedupe.c) */
    uint32_t nalgs;          /* algorithms in the -z list (zconf[0..nalgs)) */
    uint32_t max_ps;         /* the largest pcluster of any file (-C, --compress-hints) */
    uint32_t max_ext;        /* --max-extent-bytes: input of one extent at most (0: any) */
};

/* an inline tail is at most this many bytes: then, the index being 8-byte aligned,
 * some 32-byte aligned inode position keeps it inside one block (the kernel's rule) */
#define ZTAIL_MAX(blksz) ((blksz) - 32u)

/* one thread's compressor state */
struct zctx {
    const struct zconf *zc;
    void *priv;
    uint8_t *scratch;        /* algorithm's own trial buffer */
    uint32_t scratch_len;
    uint8_t *in;             /* input window of zfile_compress */
    uint64_t in_len;
    uint8_t *out;            /* one pcluster of output */
    uint8_t *out2;           /* a second one (recompressing a file's last extent) */
    uint32_t hint;           /* input the last extent of this file took (0: none yet);
                                reset per file, so results never depend on the thread */
    struct zroll *roll;      /* -Ededupe: matches against earlier pclusters (NULL: none) */
    uint64_t stop_at;        /* zfile_compress stops once its extents reach this file
                                offset (0: at the end; -Eall-fragments' deduped ends) */
    char err[200];
};

/* one extent: decompressed bytes [start, next extent's start) in a pcluster of nblk
 * blocks at block pblk (relative to the file's first pcluster block) */
struct zext {
    uint64_t start;
    uint32_t pblk;
    uint16_t nblk;
    uint8_t raw;             /* stored uncompressed (a PLAIN lcluster) */
    uint8_t inl;             /* the inline tail (zfile.idata), no block of its own */
    uint8_t frag;            /* the fragment (zfile.frag), in the packed inode */
    uint8_t dup;             /* a pcluster of an earlier file (dedupe) */
    uint8_t ref;             /* -Ededupe: the start of an earlier pcluster's output, blk
                                and nblk set when found (no pcluster of its own) */
    uint16_t aoff;           /* -Ededupe: the anchor's offset in the first block (0: none) */
    uint32_t dlen;           /* what its pcluster decodes to (more than the extent: a
                                partial reference) */
    uint64_t ahash, winhash; /* -Ededupe: the anchor's hash, the first block's hash */
    uint32_t blk;            /* its block in the image (set when the file is placed) */
};

/* a compressed file before its blocks are placed: the pclusters back to back (each a
 * block multiple) and its extents; the index is built once the blocks are placed */
struct zfile {
    uint64_t size;
    uint8_t *data;
    uint64_t dlen, dcap;
    uint64_t flushed;        /* bytes of data dropped (written at the final place) */
    uint32_t placed;         /* extents whose pclusters have their block (zstream.c) */
    uint32_t hold;           /* the last extents not to place yet (-Ededupe may shorten
                                the last one) */
    uint32_t refs;           /* -Ededupe: extents referencing (parts of) pclusters */
    uint32_t wblocks;        /* blocks written at the file's place so far */
    struct zext *ext;
    uint32_t next, cap_ext;
    uint32_t nblocks;        /* pcluster blocks */
    int plain;               /* compression saves nothing: store the file uncompressed */
    uint8_t *idata;          /* ztailpacking: the last extent's bytes, after the index */
    uint32_t idata_len;
    uint8_t *frag;           /* fragments: the last extent's bytes (uncompressed) */
    uint64_t frag_len;
    int frag_src;            /* -Eall-fragments: 1 the fragment is the whole source file
                                (frag NULL), copied to the packed inode at its commit;
                                2 it is the file's end, already there at fragoff */
    uint64_t fragoff;        /* where they are in the packed inode (set at commit) */
};

/* dedupe.c: the pclusters written so far, by content */
struct zdedupe {
    struct zdupent *tab;     /* open-addressing table */
    uint32_t cap, n;
};
/* pclusters placed but not written yet: nblk blocks from block blk, bytes at mem */
struct zrun {
    const uint8_t *mem;
    uint32_t blk, nblk;
};
INTERNAL uint64_t zhash64(const uint8_t *p, size_t len);
/* 1: an identical pcluster (nblk blocks at d of kind: the algorithm, -1 stored plain)
 * is at *blk (in the image or in run); 0: none (*hash is then d's hash, for
 * zdedupe_insert); < 0: error (x->err) */
INTERNAL int zdedupe_find(struct zdedupe *dd, struct xfer *x, int imgfd, const struct zrun *run,
                          const uint8_t *d, uint32_t nblk, int kind, uint32_t *blk,
                          uint64_t *hash);
INTERNAL int zdedupe_insert(struct zdedupe *dd, uint64_t hash, uint32_t blk, uint32_t nblk,
                            int kind);
INTERNAL void zdedupe_free(struct zdedupe *dd);

/* dedupe.c, -Ededupe: earlier pclusters found by an anchor (a content-defined position
 * in the first block of their output); the input scanned for the same anchors */
struct zroll {
    struct zrollent *tab;    /* open-addressing table by anchor hash */
    uint32_t cap, n;
    uint64_t scan, valid;    /* the next file offset to scan; anchors valid from */
    uint64_t g;              /* the scan's gear hash (of the last 64 bytes) */
    struct zanchor *anc;     /* anchors found, in file order, from a0 on */
    uint32_t nanc, canc, a0;
    uint8_t *pbuf, *dbuf;    /* a pcluster read back, its output */
    uint32_t pcap, dcap;
};
/* a match: an earlier pcluster whose output's first len bytes are the input at q */
struct zmatch {
    uint64_t q;
    uint32_t len, dlen, blk;
    uint16_t nblk;
    int kind;                /* the algorithm, -1: stored plain */
};
INTERNAL void zroll_free(struct zroll *r);
/* the anchor of a pcluster output's first block p[0, blksz): its offset (0: none) */
INTERNAL uint16_t zroll_anchor(const uint8_t *p, uint32_t blksz, uint64_t *ahash);
INTERNAL int zroll_insert(struct zroll *r, const struct zext *e, uint32_t blk, int kind);
/* a new scan of a file (or segment) from file offset pos */
INTERNAL void zroll_reset(struct zroll *r, uint64_t pos);
/* the latest q in [lo, h] (or q == h) at which the input (buf holds file offsets [wbase,
 * end)) starts the output of an earlier pcluster of kind alg or stored plain, for at
 * least one block and beyond h -> 1 (m set), 0 none, < 0 error (x->err) */
INTERNAL int zroll_find(struct zroll *r, struct xfer *x, int imgfd, const uint8_t *buf,
                        uint64_t wbase, uint64_t end, uint64_t lo, uint64_t h, int alg,
                        uint32_t dict_size, struct zmatch *m);
/* 1: a match a block after the extent before is worth the block stored plain before it */
INTERNAL int zroll_mid_pays(const struct zmatch *m, uint32_t bs);

/* fragments.c: the packed inode's data while files come in (a temporary file), each
 * fragment appended once: one that ends an earlier fragment points into it */
struct zpacked {
    int fd;
    uint64_t len;
    uint64_t bare;           /* the prefix table's end before its last padding (or 0) */
    struct zfragent *tab;    /* open-addressing table of fragments by tail hash */
    uint32_t cap, n;
};
INTERNAL int zpacked_open(struct zpacked *pk);
INTERNAL void zpacked_close(struct zpacked *pk);

#define Z_INDEX_START 16u  /* full index: map header + 8 reserved bytes before the entries */

/* algorithms (compress_*.c) */
extern const struct zalg zalg_lz4, zalg_lz4hc, zalg_zstd, zalg_lzma, zalg_deflate;

/* compress.c */
/* destsize for algorithms without one: the largest input prefix whose compressed form
 * fits, searched with trial(c, src, n, out, cap) -> size, 0 (does not fit), < 0 error */
typedef long (*ztrial_fn)(struct zctx *c, const uint8_t *src, uint32_t n, uint8_t *out,
                          uint32_t cap);
INTERNAL long zsearch_destsize(struct zctx *c, const uint8_t *src, uint32_t *srclen,
                               uint8_t *dst, uint32_t dstcap, ztrial_fn trial);
INTERNAL const struct zalg *zalg_by_id(int32_t which);
INTERNAL int zconf_setup(erofs_builder *b, struct zconf *zc);   /* zc[ZALG_MAX] */
INTERNAL int zctx_init(struct zctx *c, const struct zconf *zc);
INTERNAL void zctx_fini(struct zctx *c);
/* a file is cut in segments of this size compressed independently (as mkfs.erofs 1.9):
 * the segments of a large file are compressed by different threads (zstream.c) */
#define SEGMENT_SIZE (16ull << 20)
/* compress the segments [from, to) (multiples of SEGMENT_SIZE; to clipped to size) of
 * the size bytes of fd from offset: extents start at their file offset, pclusters count
 * from the first of from's segment; flush(arg, zf) is called when the buffered output
 * grows over the limit (it may write zf->data[zf->flushed..] out and advance
 * zf->flushed, dropping those bytes from memory). zf->plain is decided for a whole file
 * (from 0 to size) only */
INTERNAL int zfile_compress(struct zctx *c, struct xfer *x, int fd, const char *path,
                            uint64_t offset, uint64_t size, uint64_t from, uint64_t to,
                            struct zfile *zf, int (*flush)(void *arg, struct zfile *zf),
                            void *arg);
/* a segment's extents (placed) appended to those of the file's segments before it;
 * its inline tail or fragment moved over */
INTERNAL int zfile_gather(struct zfile *acc, struct zfile *seg);
/* 1: the file's pclusters and index would not be smaller than the file (store it plain) */
INTERNAL int zfile_plain(const struct zfile *zf, uint32_t bs);
INTERNAL void zfile_free(struct zfile *zf);
INTERNAL void zfile_drop_output(struct zfile *zf);

/* zindex.c: the map header and full index of a compressed file whose extents have
 * their blocks (zext.blk) -> malloc'ed bytes (NULL: out of memory) */
INTERNAL uint8_t *zfile_index(const struct zfile *zf, const struct zconf *zc, uint32_t blkszbits,
                              uint32_t *len);

/* the 48-bit layout's extent records (map header, records) from a full index, if smaller;
 * NULL: keep the index (*len 0) or out of memory (*len 1) */
INTERNAL uint8_t *zindex_extents(const uint8_t *full, uint32_t full_len, uint64_t size,
                                 uint32_t hend, uint32_t blkszbits, uint32_t *len);

/* zstream.c: the compression thread pool, its jobs (a file, or a segment of one) */
/* submitted jobs not yet committed: a file stored plain holds no output, so only this
 * bounds the finished ones waiting behind a slow one (without it /usr/share's 20,000
 * small man pages waited at once, ~20 MiB of peak memory) */
#define ZQMAX 4096
#define PENDING_MAX (32ull << 20)   /* output held by finished, uncommitted files */
/* files whose records known at submit are packed together (best fit decreasing) */
#define ZWIN 256

struct zjob {
    struct zjob *next;
    uint32_t node;
    char *path;
    uint64_t offset, size;
    uint32_t tail;            /* inline tail if stored plain (0: none) */
    int state;                /* 0 queued, 1 taken, 2 finished */
    int direct;               /* writing at its final place since base */
    uint64_t base;
    uint64_t held;            /* output bytes counted in pending */
    struct zfile zf;
    const struct zconf *zc;   /* its algorithm's settings (the packed inode: its own) */
    uint32_t ccfg, ps;        /* --compress-hints: algorithm index, pcluster size */
    int nocomp, packed;       /* stored uncompressed (a hint); the packed inode */
    int srcfd;                /* the packed inode's data: read from this fd (if > 0) */
    /* a file over SEGMENT_SIZE is one job per segment, taken by any worker and
     * committed in order like files; the first job gathers their extents (acc), the
     * last one finishes the file and carries its result */
    uint64_t from, to;        /* the part of the file this job compresses */
    struct zjob *first;       /* a later segment: the file's first job */
    struct zfile *acc;        /* the first job of a file in segments: its extents */
    int midseg;               /* a segment but the last: no result of its own */
    /* result */
    int plain, zfull;
    uint32_t chunks1;         /* --chunksize: stored plain as chunks, b->chunks[chunks1 - 1] */
    uint32_t startblk, nblocks, meta_len;
    uint8_t *meta, *tailbuf;
    uint8_t *idata;           /* ztailpacking: inline tail after the index */
    uint32_t idata_len;
    /* records among the data (zsmeta.c): those queued before this file, placed at its
     * commit before its data, then its own (ilen: inode and xattrs, upper bound) */
    struct smitem *pre, own;
    uint32_t npre, ilen;
    int smdone;
    int dsdone;               /* --dsunit: its data start aligned (zsm_commit) */
    struct zjob **win;        /* the first of a window: its files, packed at its commit */
    uint32_t nwin;
};

struct zpool {
    erofs_builder *b;
    struct zconf *zc;           /* the builder's (b->zc[ZALG_MAX]) */
    pthread_t th[64];
    uint32_t nth;
    pthread_mutex_t mu;
    pthread_cond_t cv_job, cv_space, cv_turn;
    struct zjob *head, *tail;       /* uncommitted, oldest first */
    struct zjob *claim;             /* next one to take */
    struct zjob *dhead, *dtail;     /* committed, for zpool_stop */
    uint32_t queued;
    uint64_t pending;
    int committing, stop, abort;
    int err_code;
    char err[600];
    struct zpacked pk;            /* -Efragments: the packed inode's data */
    struct zdedupe dd;            /* -Ededupe: the pclusters written so far */
    struct zroll roll;            /* -Ededupe: the same, by their output's first block */
    /* files submitted but held back until their window is full (zsmeta.c), chained */
    struct zjob *hhead, *htail;
    uint32_t hjobs, nwin;
    struct zjob *win[ZWIN];
};

/* zstream.c, for zdir.c: a job compressed (run_zjob) and committed (commit) by the
 * caller's thread; a file's gathered segments dropped */
INTERNAL int run_zjob(struct zpool *p, struct zctx *c, struct xfer *x, struct zjob *j);
INTERNAL int commit(struct zpool *p, struct zjob *j, struct xfer *x);
INTERNAL void zjob_drop_acc(struct zjob *f);
/* fragments.c, --zD: len bytes appended to the packed inode's data (never shared, as
 * mkfs.erofs 1.9 appends each directory) -> their offset there */
INTERNAL int zpacked_append(struct zpacked *pk, struct xfer *x, const uint8_t *data,
                            uint64_t len, uint64_t *off);

/* zsmeta.c: records among the data for compressed images */
INTERNAL void zsm_submit(erofs_builder *b, struct zjob *j);
INTERNAL int zsm_commit(struct zpool *p, struct zjob *j, struct xfer *x);
INTERNAL void zsm_done(erofs_builder *b, struct zjob *j, int ok);
INTERNAL void zsm_finish(erofs_builder *b, struct zpool *p, int abort);
INTERNAL int zjob_small_plain(const struct zjob *j, uint32_t bs);
INTERNAL int zsm_hold(erofs_builder *b, struct zjob *j, struct zjob *last, uint32_t njobs);
INTERNAL int zsm_release(erofs_builder *b, int abort);
INTERNAL int zpool_link(erofs_builder *b, struct zjob *j, struct zjob *last, uint32_t njobs);
INTERNAL void zpool_drop(erofs_builder *b, struct zjob *j);
INTERNAL int zjob_open_source(struct xfer *x, struct zjob *j, int *pfd);
/* -Efragments, at the commit of a file (zf: its extents, a segmented one's gathered):
 * its fragment's offset in the packed inode (appended unless -Efragdedupe lets it
 * point into an earlier one) */
INTERNAL int zpacked_commit(struct zpool *p, struct zjob *j, struct zfile *zf,
                            struct xfer *x);
/* -Eall-fragments: the job's whole file is its fragment (1), or 0: compressed as usual
 * (-1: out of memory) */
INTERNAL int zfrag_whole(const struct zpool *p, struct zjob *j);
/* -Eall-fragments (after zfrag_whole): with -Efragdedupe=full, an end of the file that
 * ends an earlier fragment points there, the rest compressed with c (fd: the source;
 * flush as zfile_compress's, also making the job the oldest) */
INTERNAL int zfrag_tail(struct zpool *p, struct zctx *c, struct xfer *x, struct zjob *j,
                        int fd, int (*flush)(void *arg, struct zfile *zf), void *arg);

#endif
