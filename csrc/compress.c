/* erofs-tools C core, compression: the per-file extent compressor and the full lcluster
 * index of a compressed file (the settings it works with: zconf.c).
 *
 * Extents (as mkfs.erofs cuts them): from the current position, the algorithm fills one
 * pcluster with as much input as fits. The extent is kept compressed when its pcluster,
 * rounded up to blocks, is smaller than the input it took; otherwise one block of input
 * is stored as is (a PLAIN extent). Compressed bytes sit at the END of their pcluster
 * (0padding: the reader skips the leading zeros to find the exact compressed size). A
 * file whose pclusters plus index would not be smaller than the file is stored
 * uncompressed instead. Every decision depends on the file's bytes and the settings
 * only, so the result does not depend on which thread compressed it. The indexes of the
 * extents are built in zindex.c.
 */
#include "compress_int.h"
#include <sys/mman.h>

#define QUEUE_SIZE (8000u << 10)    /* the input window */
#define REFILL_AT (4000u << 10)
/* the prefix search (zstd, deflate) stops when the output is within ZSTOP_BYTES of the
 * pcluster or the input is known within 1/ZSTOP_FRAC: on Python's library with zstd this
 * took 0.6 of the CPU time of 8 bytes / 1/512 for 0.5 % more output; a smaller pcluster
 * stops within 1/64 of it */
#define ZSTOP_BYTES 64u
#define ZSTOP_FRAC 128u
#define FLUSH_LIMIT (8u << 20)     /* buffered output of one file before flushing */
/* output buffers from this size on are mapped memory: grown by mremap and returned to
 * the system when freed. Through malloc they were grown and freed by different threads
 * and held on to by malloc's arenas (peak RSS 150-190 MiB on /usr/share with two
 * workers against 100 MiB with one). */
#define MAP_MIN (256u << 10)

int zctx_init(struct zctx *c, const struct zconf *zc)
{
    memset(c, 0, sizeof(*c));
    c->zc = zc;
    c->in_len = QUEUE_SIZE;
    c->in = malloc(c->in_len);
    c->out = malloc(zc->max_ps);
    c->out2 = malloc(zc->max_ps);
    if (!c->in || !c->out || !c->out2) {
        snprintf(c->err, sizeof(c->err), "out of memory");
        return ERN_ENOMEM;
    }
    return zc->alg->init(c);
}

void zctx_fini(struct zctx *c)
{
    if (c->zc && c->zc->alg->fini)
        c->zc->alg->fini(c);
    free(c->in);
    free(c->out);
    free(c->out2);
    free(c->scratch);
    memset(c, 0, sizeof(*c));
}

long zsearch_destsize(struct zctx *c, const uint8_t *src, uint32_t *srclen, uint8_t *dst,
                      uint32_t dstcap, ztrial_fn trial)
{
    if (c->scratch_len < dstcap) {
        free(c->scratch);
        c->scratch = malloc(dstcap);
        c->scratch_len = c->scratch ? dstcap : 0;
        if (!c->scratch) {
            snprintf(c->err, sizeof(c->err), "out of memory");
            return ERN_ENOMEM;
        }
    }
    uint32_t len = *srclen;
    uint32_t fit = 0, nofit = len + 1;   /* prefix lengths known to fit / not to fit */
    /* (a pcluster under 4 KiB, --tar=i's 512 bytes: the same 1/64 of it) */
    uint32_t zstop = dstcap < 64 * ZSTOP_BYTES ? dstcap / 64 : ZSTOP_BYTES;
    long fit_size = 0;
    /* first guess: what the file's previous extent took (else a typical 4:1); then
     * extrapolate from the last ratio that fitted, bisect after a miss; stop within
     * 1/ZSTOP_FRAC of the answer or with the output nearly full */
    uint64_t m = c->hint ? c->hint : (uint64_t)dstcap * 4;
    if (m > len)
        m = len;
    for (int iter = 0; iter < 32; iter++) {
        long r = trial(c, src, (uint32_t)m, c->scratch, dstcap);
        if (r < 0)
            return r;
        uint64_t next;
        if (r > 0) {
            fit = (uint32_t)m;
            fit_size = r;
            memcpy(dst, c->scratch, (size_t)r);
            if (fit == len || (uint32_t)r + zstop >= dstcap)
                break;
            next = m * dstcap / (uint64_t)r;
            if (next >= nofit)
                next = fit + (nofit - fit) / 2;
        } else {
            nofit = (uint32_t)m;
            next = fit + (nofit - fit) / 2;
        }
        if (nofit - fit <= 1 + fit / ZSTOP_FRAC)
            break;
        if (next <= fit)
            next = fit + 1;
        if (next >= nofit)
            next = nofit - 1;
        m = next;
    }
    *srclen = fit;
    c->hint = fit;
    return fit ? fit_size : 0;
}

static void out_release(uint8_t *p, uint64_t cap)
{
    if (cap >= MAP_MIN)
        munmap(p, cap);
    else
        free(p);
}

void zfile_free(struct zfile *zf)
{
    if (zf->data)
        out_release(zf->data, zf->dcap);
    free(zf->ext);
    free(zf->idata);
    free(zf->frag);
    memset(zf, 0, sizeof(*zf));
}

/* a whole file stored plain: its output and extents dropped (the commit copies the
 * source; thousands of small files may wait for their commits at once) */
void zfile_drop_output(struct zfile *zf)
{
    uint64_t size = zf->size;
    zfile_free(zf);
    zf->plain = 1;
    zf->size = size;
}

/* room for len more bytes of output */
static int out_reserve(struct zfile *zf, uint64_t len)
{
    uint64_t have = zf->dlen - zf->flushed;
    if (have + len <= zf->dcap)
        return 0;
    /* (the first buffer no larger than the file's blocks: most files are small, and
     * thousands may wait for their commit at once) */
    uint64_t first = zf->size < 65536 ? (zf->size + 4095) / 4096 * 4096 : 65536;
    uint64_t nc = zf->dcap ? zf->dcap * 2 : (first ? first : 4096);
    while (nc < have + len)
        nc *= 2;
    uint8_t *p;
    if (nc < MAP_MIN) {
        p = realloc(zf->data, nc);
    } else if (zf->dcap >= MAP_MIN) {
        p = mremap(zf->data, zf->dcap, nc, MREMAP_MAYMOVE);
        p = p == MAP_FAILED ? NULL : p;
    } else {
        p = mmap(NULL, nc, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        p = p == MAP_FAILED ? NULL : p;
        if (p && zf->data) {
            memcpy(p, zf->data, have);
            free(zf->data);
        }
    }
    if (!p)
        return ERN_ENOMEM;
    zf->data = p;
    zf->dcap = nc;
    return 0;
}

static int add_extent(struct zfile *zf, uint64_t start, uint32_t nblk, int raw, int inl,
                      int frag)
{
    if (zf->next == zf->cap_ext) {
        uint32_t nc = zf->cap_ext ? zf->cap_ext * 2 : 16;
        struct zext *p = realloc(zf->ext, (size_t)nc * sizeof(*p));
        if (!p)
            return ERN_ENOMEM;
        zf->ext = p;
        zf->cap_ext = nc;
    }
    /* the inline tail counts as one block in the index (its address is never read)
     * but takes none */
    zf->ext[zf->next++] = (struct zext){ .start = start, .pblk = zf->nblocks,
                                         .nblk = (uint16_t)nblk, .raw = (uint8_t)raw,
                                         .inl = (uint8_t)inl, .frag = (uint8_t)frag };
    if (!inl)
        zf->nblocks += nblk;
    return 0;
}

/* the file's last extent kept inline after its index (compressed or raw) */
static long inline_tail(struct xfer *x, struct zfile *zf, const uint8_t *src, uint32_t len,
                        uint64_t done, int raw, uint32_t took)
{
    zf->idata = malloc(len ? len : 1);
    if (!zf->idata || add_extent(zf, done, 1, raw, 1, 0))
        return xfail(x, ERN_ENOMEM, "out of memory");
    memcpy(zf->idata, src, len);
    zf->idata_len = len;
    return took;
}

/* the file's last extent kept for the packed inode (uncompressed: the packed inode is
 * compressed as a whole); its index entry takes no block */
static long fragment(struct xfer *x, struct zfile *zf, const uint8_t *src, uint32_t len,
                     uint64_t done)
{
    zf->frag = malloc(len ? len : 1);
    if (!zf->frag || add_extent(zf, done, 0, 0, 0, 1))
        return xfail(x, ERN_ENOMEM, "out of memory");
    memcpy(zf->frag, src, len);
    zf->frag_len = len;
    return len;
}

/* a last extent that ends in a partly used block: compressed again into one block
 * less, when that leaves less to store after it than the block saved (the rest then
 * becomes the inline tail) -> the input taken (and c->out holding the result) */
static uint32_t retry_smaller(struct zctx *c, const uint8_t *src, uint32_t took, long *csz,
                              uint32_t bs)
{
    uint32_t cap = (uint32_t)*csz / bs * bs;
    if (!cap || (uint32_t)*csz % bs == 0)
        return took;
    uint32_t t2 = took;
    long r = c->zc->alg->destsize(c, src, &t2, c->out2, cap);
    if (r <= 0 || (uint64_t)r + (took - t2) >= align_up((uint64_t)*csz, bs))
        return took;
    memcpy(c->out, c->out2, (size_t)r);
    *csz = r;
    return t2;
}

/* one extent from the input window c->in[head, head + len): compressed into one
 * pcluster, or stored as plain blocks -> input bytes taken (or < 0) */
static long one_extent(struct zctx *c, struct xfer *x, struct zfile *zf, const char *path,
                       uint64_t head, uint32_t len, int final, uint64_t done, int inl, int frag)
{
    const struct zconf *zc = c->zc;
    const uint32_t bs = x->blksz, ps = zc->pclustersize;
    long csz = 0;
    uint32_t took = len;
    /* fragments (frag: the file's last input): the rest of the file, if at most a
     * pcluster or compressible into less than one, goes to the packed inode */
    if (frag && len <= ps)
        return fragment(x, zf, c->in + head, len, done);
    if (!(final && len <= bs) || inl) {
        /* --max-extent-bytes: as mkfs.erofs, the input offered to one pcluster (not
         * that of a fragment, nor a raw inline tail: under a block) */
        if (zc->max_ext && took > zc->max_ext)
            took = zc->max_ext;
        csz = zc->alg->destsize(c, c->in + head, &took, c->out, ps);
        if (csz < 0)
            return xfail(x, ERN_EIO, "%s: %s compression failed: %s", path,
                         zc->alg->name, c->err);
    }
    /* ztailpacking (inl: the file's last input): the rest of the file whole, in less
     * than a block, stays inline compressed; a rest that does not compress but is
     * small stays inline raw (as mkfs.erofs decides) */
    if (frag && took == len && csz > 0 && align_up((uint64_t)csz, bs) < took &&
        (uint32_t)csz < ps)
        return fragment(x, zf, c->in + head, len, done);
    int whole = inl && took == len;
    if (whole && csz > 0 && (uint64_t)csz < took && (uint32_t)csz <= ZTAIL_MAX(bs))
        return inline_tail(x, zf, c->out, (uint32_t)csz, done, 0, took);
    uint64_t plen = align_up((uint64_t)csz, bs);
    if (inl && len <= ZTAIL_MAX(bs) && (csz <= 0 || plen >= took))
        return inline_tail(x, zf, c->in + head, len, done, 1, len);
    if (whole && csz > 0 && plen < took) {
        took = retry_smaller(c, c->in + head, took, &csz, bs);
        plen = align_up((uint64_t)csz, bs);
    }
    if (csz > 0 && plen < took) {
        if (out_reserve(zf, plen) || add_extent(zf, done, (uint32_t)(plen / bs), 0, 0, 0))
            return xfail(x, ERN_ENOMEM, "out of memory");
        uint8_t *d = zf->data + (zf->dlen - zf->flushed);
        memset(d, 0, plen - (uint64_t)csz);
        memcpy(d + plen - (uint64_t)csz, c->out, (size_t)csz);
        zf->dlen += plen;
        return took;
    }
    /* stored: one block per extent, as many blocks as the failed pcluster covered (so
     * incompressible data is not tried again block by block); -Ededupe: one block, then
     * compressed again from the next (as mkfs.erofs, where a match may start there) */
    uint32_t tried = took < ps ? took : ps;
    uint32_t nraw = tried / bs && !zc->roll ? tried / bs : 1;
    took = 0;
    for (uint32_t k = 0; k < nraw && len > took; k++) {
        uint32_t n = len - took < bs ? len - took : bs;
        if (out_reserve(zf, bs) || add_extent(zf, done + took, 1, 1, 0, 0))
            return xfail(x, ERN_ENOMEM, "out of memory");
        uint8_t *d = zf->data + (zf->dlen - zf->flushed);
        memcpy(d, c->in + head + took, n);
        memset(d + n, 0, bs - n);
        zf->dlen += bs;
        took += n;
    }
    return took;
}

/* the extents from `first` on, just cut from the input at c->in + head (file offset
 * done): what each pcluster decodes to and, with -Ededupe, its first block's anchor */
static void describe_extents(struct zctx *c, struct zfile *zf, uint32_t first, uint64_t head,
                             uint64_t done, uint64_t took, uint32_t bs)
{
    for (uint32_t k = first; k < zf->next; k++) {
        struct zext *e = &zf->ext[k];
        if (e->inl || e->frag)
            continue;
        uint64_t end = k + 1 < zf->next ? zf->ext[k + 1].start : done + took;
        e->dlen = (uint32_t)(end - e->start);
        if (c->roll && e->dlen >= bs) {
            const uint8_t *p = c->in + head + (e->start - done);
            e->aoff = zroll_anchor(p, bs, &e->ahash);
            e->winhash = e->aoff ? zhash64(p, bs) : 0;
        }
    }
}

/* -Ededupe: the extent pe (the last one) cut at file offset cut: compressed again on its
 * own when that is not larger, else it keeps its pcluster (a partial reference) */
static int cut_extent(struct zctx *c, struct xfer *x, struct zfile *zf, struct zext *pe,
                      uint64_t cut, uint64_t wbase)
{
    const uint32_t bs = x->blksz;
    zf->refs++;
    if (pe->ref || pe->raw || pe->start < wbase)
        return 0;
    uint32_t t2 = (uint32_t)(cut - pe->start), hint = c->hint;
    long csz = c->zc->alg->destsize(c, c->in + (pe->start - wbase), &t2, c->out2,
                                    (uint32_t)pe->nblk * bs);
    c->hint = hint;
    if (csz < 0)
        return xfail(x, ERN_EIO, "%s compression failed: %s", c->zc->alg->name, c->err);
    uint64_t plen = align_up((uint64_t)csz, bs);
    if (csz > 0 && t2 == cut - pe->start && plen < t2 && pe->pblk + pe->nblk == zf->nblocks &&
        (uint64_t)pe->pblk * bs >= zf->flushed) {
        uint8_t *d = zf->data + ((uint64_t)pe->pblk * bs - zf->flushed);
        memset(d, 0, plen - (uint64_t)csz);
        memcpy(d + plen - (uint64_t)csz, c->out2, (size_t)csz);
        uint32_t nb = (uint32_t)(plen / bs);
        zf->dlen -= (uint64_t)(pe->nblk - nb) * bs;
        zf->nblocks -= pe->nblk - nb;
        pe->nblk = (uint16_t)nb;
        pe->dlen = t2;
        zf->refs--;                           /* whole again */
    }
    return 0;
}

/* -Ededupe, before the next extent at c->in[head] (file offset done): the input from
 * there (or from inside the previous extent, which is then cut) repeats the output of
 * an earlier pcluster: an extent referencing it -> the input taken after head (0: no
 * match, < 0: error). *prev: the extent a match may cut (-1: none) */
static long roll_step(struct zctx *c, struct xfer *x, struct zfile *zf, uint64_t head,
                      uint64_t tail, uint64_t done, int64_t *prev)
{
    const uint32_t bs = x->blksz;
    const uint64_t wbase = done - head, mask = bs - 1;
    uint64_t lo = done + 1;                   /* no start before done */
    struct zext *pe = *prev >= 0 ? &zf->ext[*prev] : NULL;
    if (pe) {
        /* the cut extent keeps its own head lcluster (no start before the next
         * lcluster), with several blocks its block count's lcluster too. It may keep
         * less than a block of input: a block after its start, as before, left copies
         * shifted a few bytes against each other's cuts without a match all along */
        lo = (pe->start & ~mask) + bs;
        if (pe->nblk > 1 && lo < (pe->start & ~mask) + 2ull * bs)
            lo = (pe->start & ~mask) + 2ull * bs;
    }
    struct zmatch m;
    const int alg = c->zc->alg->id;
    int r = zroll_find(c->roll, x, x->out, c->in, wbase, wbase + tail, lo, done, alg,
                       c->zc->dict_size, &m);
    if (r < 0)
        return r;
    uint64_t mid = 0;                         /* a block of input kept before the match */
    if (!r && pe && !pe->raw) {
        /* a start less than a block after done (two copies shifted by a few bytes whose
         * extents are cut alike): the extent before is cut a block before it and that
         * block stored on its own, when the match is worth more than that block */
        uint64_t lo2 = lo + bs > done + 1 ? lo + bs : done + 1;
        r = zroll_find(c->roll, x, x->out, c->in, wbase, wbase + tail, lo2, done + bs - 1,
                       alg, c->zc->dict_size, &m);
        if (r < 0)
            return r;
        if (r && (m.q <= done || m.q - bs < wbase || !zroll_mid_pays(&m, bs)))
            r = 0;
        if (r)
            mid = bs;
    }
    if (!r)
        return 0;
    uint64_t cut = m.q - mid;
    if (cut < done && (r = cut_extent(c, x, zf, pe, cut, wbase)))
        return r;
    if (mid) {
        uint32_t first = zf->next;
        if (out_reserve(zf, bs) || add_extent(zf, cut, 1, 1, 0, 0))
            return xfail(x, ERN_ENOMEM, "out of memory");
        memcpy(zf->data + (zf->dlen - zf->flushed), c->in + (cut - wbase), bs);
        zf->dlen += bs;
        describe_extents(c, zf, first, cut - wbase, cut, bs, bs);
    }
    if (add_extent(zf, m.q, m.nblk, m.kind < 0, 0, 0))
        return xfail(x, ERN_ENOMEM, "out of memory");
    struct zext *e = &zf->ext[zf->next - 1];
    zf->nblocks -= m.nblk;                    /* no pcluster of its own */
    e->ref = 1;
    e->blk = m.blk;
    e->dlen = m.dlen;
    zf->refs++;
    *prev = zf->next - 1;
    /* the prefix search (zstd, deflate) goes on from what the referenced extent took,
     * as the file it came from did: a copy then gets the same cuts after it */
    c->hint = m.dlen;
    return (long)(m.q + m.len - done);
}

/* As mkfs.erofs 1.9 cuts a file: in 16 MiB segments compressed independently (its
 * multi-threaded default), each read through an 8000 KiB window that is shifted and
 * refilled once half of it is used; an extent may take all the input in the window.
 * Same cuts, same extents: with the same library the data takes the same blocks. */
int zfile_compress(struct zctx *c, struct xfer *x, int fd, const char *path,
                   uint64_t offset, uint64_t size, uint64_t from, uint64_t to,
                   struct zfile *zf, int (*flush)(void *arg, struct zfile *zf), void *arg)
{
    const uint32_t bs = x->blksz, ps = c->zc->pclustersize;
    uint64_t done = from;          /* file bytes put into extents */
    int r;
    memset(zf, 0, sizeof(*zf));
    zf->size = size;
    if (to > size)
        to = size;
    for (uint64_t seg = from; seg < to; seg += SEGMENT_SIZE) {
        uint64_t remaining = size - seg < SEGMENT_SIZE ? size - seg : SEGMENT_SIZE;
        uint64_t head = 0, tail = 0, readpos = seg;
        int64_t prev = -1;            /* -Ededupe: the extent a match may cut */
        c->hint = 0;
        if (c->roll)
            zroll_reset(c->roll, seg);
        while (remaining) {
            uint64_t rx = c->in_len - tail < remaining ? c->in_len - tail : remaining;
            if ((r = x_read(x, fd, c->in + tail, (size_t)rx, offset + readpos, path)))
                return r;
            tail += rx;
            readpos += rx;
            remaining -= rx;
            while (tail > head) {
                uint32_t len = (uint32_t)(tail - head);
                int final = remaining == 0;
                if (len <= ps && !final)
                    break;         /* too little left for a pcluster: read more */
                /* mkfs.erofs's may_inline: all input read, last segment */
                int last = final && seg + SEGMENT_SIZE >= size;
                int frag = last && c->zc->frags;
                int inl = last && c->zc->ztail && !frag;
                long took = 0;
                if (c->roll) {
                    zf->hold = 1;
                    took = roll_step(c, x, zf, head, tail, done, &prev);
                    if (took < 0)
                        return (int)took;
                }
                if (!took) {
                    uint32_t first = zf->next;
                    took = one_extent(c, x, zf, path, head, len, final, done, inl, frag);
                    if (took < 0)
                        return (int)took;
                    describe_extents(c, zf, first, head, done, (uint64_t)took, bs);
                    const struct zext *le = &zf->ext[zf->next - 1];
                    prev = zf->next > first && !le->raw && !le->inl && !le->frag
                               ? (int64_t)zf->next - 1 : -1;
                }
                head += (uint64_t)took;
                done += (uint64_t)took;
                /* -Ededupe: every extent placed at once (but the last, which a match
                 * may still cut), so that later ones can be matched against it */
                if (flush && (c->roll || zf->dlen - zf->flushed > FLUSH_LIMIT) &&
                    (r = flush(arg, zf)))
                    return r;
                if (c->stop_at && done >= c->stop_at)
                    return 0;
                if (!final && head >= REFILL_AT) {
                    uint64_t keep = head / bs * bs;
                    memmove(c->in, c->in + keep, tail - keep);
                    tail -= keep;
                    head -= keep;
                    break;
                }
            }
        }
    }
    zf->hold = 0;
    if (from == 0 && to == size)
        zf->plain = zfile_plain(zf, bs);
    return 0;
}
