/* erofs-tools C core: chunk-based regular files (mkfs --chunksize, --blobdev).
 *
 * With opts.chunkbits every non-empty regular file becomes CHUNK_BASED, as mkfs.erofs
 * 1.9 writes it: the file is cut into chunks of 2^chunkbits bytes (the last one shorter);
 * a chunk no data extent reaches (SEEK_DATA) is a hole, the others are read and hashed
 * (SHA-256): one equal to a chunk stored before points at it, one of all zeros (a whole
 * chunk) is a hole, a new one is written at the next free block, padded to a whole
 * block. A file with no data at all is one chunk as large as the file (a power of two).
 * Then the chunks are made as large as every run of contiguous chunks allows (the
 * lowest set bit of the runs' block counts), so a file stored in one piece has one
 * index. The chunks go into the image's data stream (stream mode: the file's place in
 * the walk), or with a blob (erofs_builder_set_blob) into the blob, device 1, with
 * 8-byte chunk indexes naming it.
 *
 * All on the caller's thread, in call order: the blocks do not depend on threads.
 *
 * erofs_builder_rebase_chunks: the block maps mkfs --tar=i,MAPFILE gives relative to
 * its data region, moved after layout to where the region starts.
 */
#include "builder_int.h"

#define NULL_BLK UINT64_MAX
#define RBUF (1u << 20)

struct chunkdd {
    uint8_t (*key)[32];     /* digest of each stored chunk; slot empty when len == 0 */
    uint64_t *blk;          /* its first block (NULL_BLK: a hole, the zero chunk) */
    uint32_t *len;
    size_t cap, n;
    uint8_t *buf;           /* read buffer, RBUF bytes */
};

void chunked_free(erofs_builder *b)
{
    struct chunkdd *d = b->cdd;
    if (!d)
        return;
    free(d->key);
    free(d->blk);
    free(d->len);
    free(d->buf);
    free(d);
    b->cdd = NULL;
}

static size_t dd_slot(const struct chunkdd *d, const uint8_t key[32], uint32_t len)
{
    uint64_t h;
    memcpy(&h, key, 8);
    size_t i = (size_t)(h ^ len) & (d->cap - 1);
    while (d->len[i] && (d->len[i] != len || memcmp(d->key[i], key, 32)))
        i = (i + 1) & (d->cap - 1);
    return i;
}

static int dd_grow(struct chunkdd *d)
{
    struct chunkdd o = *d;
    size_t cap = o.cap ? o.cap * 2 : 4096;
    d->key = calloc(cap, 32);
    d->blk = calloc(cap, sizeof(*d->blk));
    d->len = calloc(cap, sizeof(*d->len));
    if (!d->key || !d->blk || !d->len) {
        free(d->key);
        free(d->blk);
        free(d->len);
        *d = o;
        return -1;
    }
    d->cap = cap;
    for (size_t i = 0; i < o.cap; i++) {
        if (!o.len[i])
            continue;
        size_t j = dd_slot(d, o.key[i], o.len[i]);
        memcpy(d->key[j], o.key[i], 32);
        d->blk[j] = o.blk[i];
        d->len[j] = o.len[i];
    }
    free(o.key);
    free(o.blk);
    free(o.len);
    return 0;
}

static int dd_add(struct chunkdd *d, const uint8_t key[32], uint32_t len, uint64_t blk)
{
    if ((d->n + 1) * 2 > d->cap && dd_grow(d))
        return -1;
    size_t i = dd_slot(d, key, len);
    memcpy(d->key[i], key, 32);
    d->blk[i] = blk;
    d->len[i] = len;
    d->n++;
    return 0;
}

/* the table, with the zero chunk (a whole chunk of zeros: a hole) in it */
static int dd_init(erofs_builder *b, struct xfer *x)
{
    if (b->o.chunkbits < b->o.blkszbits ||
        b->o.chunkbits > b->o.blkszbits + EROFS_CHUNK_FORMAT_BLKBITS_MASK)
        return xfail(x, ERN_EINVAL, "chunk size 2^%u out of range", b->o.chunkbits);
    struct chunkdd *d = calloc(1, sizeof(*d));
    if (!d || !(d->buf = calloc(1, RBUF)) || dd_grow(d)) {
        if (d)
            free(d->buf);
        free(d);
        return xfail(x, ERN_ENOMEM, "out of memory");
    }
    b->cdd = d;
    uint64_t csz = 1ull << b->o.chunkbits;
    if (csz > UINT32_MAX)
        return 0;               /* (no chunk that large is hashed) */
    struct ern_sha256 s;
    uint8_t key[32];
    ern_sha256_init(&s, 0);
    for (uint64_t done = 0; done < csz; done += RBUF)
        ern_sha256_update(&s, d->buf, csz - done < RBUF ? csz - done : RBUF);
    ern_sha256_final(&s, key);
    return dd_add(d, key, (uint32_t)csz, NULL_BLK) ? xfail(x, ERN_ENOMEM, "out of memory") : 0;
}

/* blocks of a sparse file's data chunks from block `blk` on, in chunk order (a chunk
 * entry becomes 1 | blkaddr << 32; holes stay 0); -> the next free block */
uint64_t place_sparse_chunks(erofs_builder *b, struct chunkset *cs, uint64_t size,
                             uint64_t blk)
{
    uint32_t blksz = b->blksz;
    uint64_t csz = (uint64_t)blksz << (cs->format & EROFS_CHUNK_FORMAT_BLKBITS_MASK);
    for (uint32_t c = 0; c < cs->count; c++) {
        if (!(cs->entries[c] & 1))
            continue;
        uint64_t start = (uint64_t)c * csz;
        uint64_t len = size - start < csz ? size - start : csz;
        cs->entries[c] = 1 | (blk << 32);
        blk += (len + blksz - 1) / blksz;
    }
    return blk;
}

int erofs_builder_set_blob(erofs_builder *b, int fd)
{
    int r = check_mutable(b);
    if (r)
        return r;
    if (!b->o.chunkbits || b->nnodes > 1)
        return fail(b, ERN_EINVAL, "a blob needs chunkbits, before the files");
    b->bfd = fd;
    b->bcur = 0;
    /* its slot right after the superblock and the compression records, as mkfs.erofs */
    uint32_t cfgs_len;
    zconf_cfgs(b, &cfgs_len);
    b->o.devt_slotoff = (uint32_t)(align_up(sb_end(b) + cfgs_len, EROFS_DEVT_SLOT_SIZE) /
                                   EROFS_DEVT_SLOT_SIZE);
    return 0;
}

int erofs_builder_blob_blocks(erofs_builder *b, uint64_t *blocks)
{
    *blocks = b->bcur;
    return 0;
}

static unsigned ilog2_64(uint64_t v)
{
    return v ? 63u - (unsigned)__builtin_clzll(v) : 0;
}

/* per file: where its chunks are, and the runs of contiguous ones */
struct cfile {
    uint64_t *ent;          /* each chunk's block (NULL_BLK: hole) */
    uint64_t last_blk;      /* the previous chunk: its block and length; NULL_BLK: a hole */
    uint32_t last_len;
    int have_last;
    uint64_t run_start;     /* file offset where the current run began */
    uint64_t minext;        /* the lowest set bit of the runs' lengths in blocks */
};

/* chunk (blk, len) after the previous one: a new run unless it continues it */
static void cf_next(struct cfile *cf, uint32_t blkbits, uint64_t pos, uint64_t blk,
                    uint32_t len)
{
    int cont = !cf->have_last ||
               (blk == NULL_BLK && cf->last_blk == NULL_BLK) ||
               (blk != NULL_BLK && cf->last_blk != NULL_BLK &&
                (cf->last_blk << blkbits) + cf->last_len == blk << blkbits);
    if (!cont) {
        uint64_t run = (pos - cf->run_start) >> blkbits;
        uint64_t low = run & -run;
        if (low && low < cf->minext)
            cf->minext = low;
        cf->run_start = pos;
    }
    cf->have_last = 1;
    cf->last_blk = blk;
    cf->last_len = blk == NULL_BLK ? 0 : len;
}

/* hash [off, off + len) of fd, read into the table's buffer */
static int hash_range(erofs_builder *b, struct xfer *x, int fd, const char *path,
                      uint64_t off, uint64_t len, uint8_t key[32])
{
    struct ern_sha256 s;
    ern_sha256_init(&s, 0);
    for (uint64_t done = 0; done < len;) {
        size_t n = len - done < RBUF ? (size_t)(len - done) : RBUF;
        int r = x_read(x, fd, b->cdd->buf, n, off + done, path);
        if (r)
            return r;
        ern_sha256_update(&s, b->cdd->buf, n);
        done += n;
    }
    ern_sha256_final(&s, key);
    return 0;
}

/* a new chunk's bytes written at block blk of the image (or blob): from the buffer
 * when hash_range left it all there, else copied again from the file */
static int put_chunk(erofs_builder *b, struct xfer *x, int fd, const char *path,
                     uint64_t off, uint32_t len, uint64_t blk)
{
    int blob = b->bfd >= 0;
    struct xfer w = *x;
    if (blob) {
        w.out = b->bfd;
        w.ot = NULL;
    }
    uint64_t out = blk << b->o.blkszbits;
    int r;
    if (len <= RBUF) {
        r = x_pwrite(&w, b->cdd->buf, len, out);
        __atomic_fetch_add(w.bytes, (uint64_t)len, __ATOMIC_RELAXED);
    } else {
        r = x_copy(&w, fd, off, out, len, path);
    }
    uint32_t pad = (uint32_t)(-(uint64_t)len & (b->blksz - 1));
    if (!r && pad) {
        static const uint8_t zeros[4096];
        r = x_pwrite(&w, zeros, pad, out + len);    /* (a device keeps its old bytes) */
    }
    if (r)
        xfail(x, r, "%s%s", w.err, blob ? " (the blob, --blobdev)" : "");
    return r;
}

/* the record this file's inode takes (inode, xattrs, indexes), for the stream's
 * metadata room: 0 when more than a block */
static uint32_t record_len(const erofs_builder *b, const struct node *n, uint32_t unit,
                           uint64_t count)
{
    uint64_t len = align_up(align_up(stream_inode_size(b, n) + n->xa_max, unit) +
                            unit * count, EROFS_SLOT_SIZE);
    return len <= b->blksz ? (uint32_t)len : 0;
}

static int cut_file(erofs_builder *b, struct xfer *x, uint64_t size, int fd,
                    const char *path, uint64_t offset, struct cfile *cf, unsigned *pbits,
                    uint64_t *cur)
{
    uint32_t blkbits = b->o.blkszbits, blksz = b->blksz;
    unsigned bits = *pbits;
    uint64_t csz = 1ull << bits;
    int dedupe = !b->o.chunk_nodedupe;
    uint64_t pos = 0, k = 0;
    while (pos < size) {
        off_t d = lseek(fd, (off_t)(offset + pos), SEEK_DATA);
        uint64_t dpos;
        if (d < 0)
            dpos = errno == ENXIO ? size : pos;     /* (no SEEK_DATA: read it) */
        else if ((uint64_t)d - offset >= size)
            dpos = size;
        else
            dpos = ((uint64_t)d - offset) & ~(csz - 1);
        if (dpos > pos) {
            cf_next(cf, blkbits, pos, NULL_BLK, 0);
            while (pos < dpos) {
                cf->ent[k++] = NULL_BLK;
                pos += csz;
            }
            continue;
        }
        uint32_t len = (uint32_t)(size - pos < csz ? size - pos : csz);
        uint8_t key[32];
        int r = hash_range(b, x, fd, path, offset + pos, len, key);
        if (r)
            return r;
        uint64_t blk;
        size_t slot = dedupe ? dd_slot(b->cdd, key, len) : 0;
        if (dedupe && b->cdd->len[slot]) {
            blk = b->cdd->blk[slot];
        } else {
            blk = *cur;
            *cur += (len + blksz - 1) / blksz;
            if (*cur > 0xFFFFFFFFull)
                return xfail(x, ERN_ELIMIT, "%s: %s larger than 2^32 blocks", path,
                             b->bfd >= 0 ? "the blob" : "the image");
            if ((r = put_chunk(b, x, fd, path, offset + pos, len, blk)))
                return r;
            if (dedupe && dd_add(b->cdd, key, len, blk))
                return xfail(x, ERN_ENOMEM, "out of memory");
        }
        cf_next(cf, blkbits, pos, blk, len);
        cf->ent[k++] = blk;
        pos += len;
    }
    /* the last run, then chunks as large as every run allows */
    uint64_t run = (pos - cf->run_start) >> blkbits, low = run & -run;
    if (low && low < cf->minext)
        cf->minext = low;
    unsigned nbits = ilog2_64(cf->minext) + blkbits;
    if (nbits > blkbits + EROFS_CHUNK_FORMAT_BLKBITS_MASK)
        nbits = blkbits + EROFS_CHUNK_FORMAT_BLKBITS_MASK;
    if (nbits > bits) {
        uint64_t cnt = (size + (1ull << nbits) - 1) >> nbits;
        for (uint64_t i = 0; i < cnt; i++)
            cf->ent[i] = cf->ent[i << (nbits - bits)];
        *pbits = nbits;
    }
    return 0;
}

/* [offset, offset + size) of path cut into chunks, the new ones written from the
 * blob's next block, or the image's (*scur) -> the chunk set's index + 1 in *pci;
 * 0 or an error (in x). One call at a time, in the image's order. */
static int chunk_data(erofs_builder *b, struct xfer *x, const char *p, uint64_t offset,
                      uint64_t size, uint64_t *scur, uint32_t *pci)
{
    int r = b->cdd ? 0 : dd_init(b, x);
    if (r)
        return r;
    int fd = open(p, O_RDONLY | O_NOCTTY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return xfail(x, ERN_EIO, "%s: %s", p, strerror(errno));
    uint32_t blkbits = b->o.blkszbits;
    struct stat st;
    if (offset == 0 && fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && (uint64_t)st.st_size != size)
        r = xfail(x, ERN_EIO, "%s: size changed while building the image", p);
    unsigned bits = b->o.chunkbits;
    off_t d = lseek(fd, (off_t)offset, SEEK_DATA);
    if ((d < 0 && errno == ENXIO) || (d >= 0 && (uint64_t)d - offset >= size))
        bits = size > 1 ? ilog2_64(size - 1) + 1 : 0;    /* no data: one chunk */
    if (bits < blkbits)
        bits = blkbits;
    if (bits > blkbits + EROFS_CHUNK_FORMAT_BLKBITS_MASK)
        bits = blkbits + EROFS_CHUNK_FORMAT_BLKBITS_MASK;
    uint64_t count = (size + (1ull << bits) - 1) >> bits;
    if (!r && count > UINT32_MAX)
        r = xfail(x, ERN_ELIMIT, "%s: too many chunks", p);
    struct cfile cf = {.minext = (size + b->blksz - 1) >> blkbits, .last_blk = NULL_BLK};
    if (!r && !(cf.ent = malloc(count * sizeof(*cf.ent))))
        r = xfail(x, ERN_ENOMEM, "out of memory");
    int blob = b->bfd >= 0;
    uint64_t *cur = blob ? &b->bcur : scur;
    /* --dsunit: each file's chunks from a multiple of it, when it is at most a chunk */
    if (!r && b->ot && b->ot->dsunit > 1 && b->ot->dsunit <= (1ull << (bits - blkbits)))
        *cur = align_up(*cur, b->ot->dsunit);
    if (!r)
        r = cut_file(b, x, size, fd, p, offset, &cf, &bits, cur);
    close(fd);
    struct chunkset *nc = r ? NULL : grow(b->chunks, &b->cap_chunks, b->nchunks + 1,
                                          sizeof(*nc));
    if (!r && !nc)
        r = xfail(x, ERN_ENOMEM, "out of memory");
    if (r) {
        free(cf.ent);
        return r;
    }
    b->chunks = nc;
    int indexes = b->o.chunk_indexes || blob;
    count = (size + (1ull << bits) - 1) >> bits;
    /* the entries as the writer takes them: a block map's address, or an index's
     * device_id << 16 | blkaddr << 32 */
    for (uint64_t i = 0; i < count; i++) {
        uint64_t blk = cf.ent[i] == NULL_BLK ? EROFS_NULL_ADDR : cf.ent[i];
        cf.ent[i] = !indexes ? blk
                             : (blk << 32) | (cf.ent[i] != NULL_BLK && blob ? 1u << 16 : 0);
    }
    nc[b->nchunks] = (struct chunkset){
        .format = (bits - blkbits) | (indexes ? EROFS_CHUNK_FORMAT_INDEXES : 0),
        .count = (uint32_t)count, .entries = cf.ent};
    *pci = ++b->nchunks;
    return 0;
}

int chunked_file(erofs_builder *b, uint32_t node, const char *path, size_t pathlen,
                 uint64_t offset)
{
    char *p = strndup(path, pathlen);
    if (!p)
        return fail(b, ERN_ENOMEM, "out of memory");
    struct xfer x;
    memset(&x, 0, sizeof(x));
    x.out = b->sfd;
    x.ot = b->ot;
    x.blksz = b->blksz;
    x.bytes = &b->sbytes;
    int r = b->cdd ? 0 : dd_init(b, &x);
    x.buf = b->cdd ? b->cdd->buf : NULL;    /* (x_copy's, when a chunk is over RBUF) */
    int sm = smeta_on(b);
    if (sm)
        smeta_pending(b, node);
    uint32_t ci = 0;
    if (!r)
        r = chunk_data(b, &x, p, offset, b->nodes[node].size, &b->scur, &ci);
    free(p);
    if (sm)
        b->szero = b->scur;     /* (never zeroed over by a later job) */
    if (r)
        return fail(b, r, "%s", x.err);
    struct node *n = &b->nodes[node];
    n->aux = ci - 1;
    n->dkind = D_CHUNKS;
    n->streamed = 1;
    if (sm) {
        const struct chunkset *cs = &b->chunks[n->aux];
        uint32_t unit = cs->format & EROFS_CHUNK_FORMAT_INDEXES ? 8 : 4;
        uint32_t len = record_len(b, n, unit, cs->count);
        if (len && (r = smeta_defer(b, node, NULL, len, 0)) == 1)
            smeta_reserve(b, node, len);
        return r < 0 ? r : 0;
    }
    return 0;
}

/* the compression pool's commit of a file stored uncompressed (zstream.c): chunks
 * instead, from block base on (mkfs.erofs 1.9 chunks what it does not compress) */
int zchunk_commit(erofs_builder *b, struct xfer *x, const char *path, uint64_t offset,
                  uint64_t size, uint64_t base, uint32_t *pci)
{
    b->scur = base;
    return chunk_data(b, x, path, offset, size, &b->scur, pci);
}

int erofs_builder_rebase_chunks(erofs_builder *b, uint64_t base)
{
    /* the addresses of a 4-byte block map are only known relative to a data region
     * placed after the metadata (mkfs --tar=i,MAPFILE): layout sizes do not depend on
     * them, so they are moved once the region's first block is known */
    if (!b->laid_out || b->wdone)
        return fail(b, ERN_EINVAL, "rebase_chunks: after layout, before write");
    for (uint32_t i = 0; i < b->nnodes; i++) {
        const struct node *n = &b->nodes[i];
        if (n->dkind != D_CHUNKS || (b->chunks[n->aux].format & EROFS_CHUNK_FORMAT_INDEXES))
            continue;
        const struct chunkset *cs = &b->chunks[n->aux];
        for (uint32_t c = 0; c < cs->count; c++)
            if ((uint32_t)cs->entries[c] != EROFS_NULL_ADDR &&
                (uint32_t)cs->entries[c] + base >= EROFS_NULL_ADDR)
                return fail(b, ERN_ELIMIT, "block %llu does not fit in a block map",
                            (unsigned long long)((uint32_t)cs->entries[c] + base));
    }
    for (uint32_t i = 0; i < b->nnodes; i++) {
        const struct node *n = &b->nodes[i];
        if (n->dkind != D_CHUNKS || (b->chunks[n->aux].format & EROFS_CHUNK_FORMAT_INDEXES))
            continue;
        struct chunkset *cs = &b->chunks[n->aux];
        for (uint32_t c = 0; c < cs->count; c++)
            if ((uint32_t)cs->entries[c] != EROFS_NULL_ADDR)
                cs->entries[c] = (uint32_t)cs->entries[c] + base;
    }
    return 0;
}
