/* erofs-tools C core: packing inode records into the blocks of the inode area.
 *
 * Every block of the area is a bin with one free range (records start 32-byte aligned):
 * at first its end; the range before a record that had to start later (so that its
 * inline tail stays in one block) and then runs into the next block, or the larger of
 * the two ranges a record splits. A record that fits in one block goes to the fullest
 * block it fits in (best fit); a record that fits in none starts at the end of the area
 * (in a new block if it may not run over a block boundary). With a pre bin, the room
 * after the superblock in block 0 is one more bin (as mkfs.erofs, whose inodes start
 * there). The bins sit
 * in buckets by free 32-byte slots with a bitmap of non-empty buckets, so a search is a
 * scan of blksz / 32 / 64 words. Everything depends on the records and their order
 * only: the same tree gives the same offsets.
 */
#include "builder_int.h"

#define NOBLK UINT32_MAX

static int grow_blocks(struct mpack *m, uint64_t upto);
static void link_blk(struct mpack *m, uint32_t blk);

/* block number <-> index of the per-block arrays (index 0 is block 0 with a pre bin) */
static uint64_t blk_of(const struct mpack *m, uint64_t i)
{
    return m->pre ? (i == 0 ? 0 : m->base + i - 1) : m->base + i;
}

static uint64_t idx_of(const struct mpack *m, uint64_t blk)
{
    return m->pre ? (blk == 0 ? 0 : blk - m->base + 1) : blk - m->base;
}

/* the area starts at `start`; pre_lo: block 0 from pre_lo on is free too (0: not) */
int mpack_init(struct mpack *m, uint64_t start, uint32_t blksz, uint32_t pre_lo)
{
    memset(m, 0, sizeof(*m));
    m->blksz = blksz;
    m->nbuckets = blksz / EROFS_SLOT_SIZE + 1;
    m->head = malloc((size_t)m->nbuckets * sizeof(uint32_t));
    m->bits = calloc((m->nbuckets + 63) / 64, sizeof(uint64_t));
    if (!m->head || !m->bits)
        return ERN_ENOMEM;
    for (uint32_t k = 0; k < m->nbuckets; k++)
        m->head[k] = NOBLK;
    m->base = start / blksz;
    m->end = start;
    m->pre = pre_lo != 0;
    if (grow_blocks(m, m->pre))
        return ERN_ENOMEM;
    m->lo[m->pre] = (uint32_t)(start % blksz);
    if (m->pre) {
        m->lo[0] = pre_lo;
        link_blk(m, 0);
    }
    return 0;
}

void mpack_free(struct mpack *m)
{
    free(m->head);
    free(m->bits);
    free(m->lo);
    free(m->hi);
    free(m->next);
    free(m->prev);
    memset(m, 0, sizeof(*m));
}

static uint32_t bucket_of(const struct mpack *m, uint32_t blk)
{
    return (m->hi[blk] - m->lo[blk]) / EROFS_SLOT_SIZE;
}

static void unlink_blk(struct mpack *m, uint32_t blk)
{
    uint32_t k = bucket_of(m, blk);
    if (m->prev[blk] == NOBLK && m->head[k] != blk)
        return;     /* in no bucket (full) */
    if (m->prev[blk] != NOBLK)
        m->next[m->prev[blk]] = m->next[blk];
    else
        m->head[k] = m->next[blk];
    if (m->next[blk] != NOBLK)
        m->prev[m->next[blk]] = m->prev[blk];
    if (m->head[k] == NOBLK)
        m->bits[k / 64] &= ~(1ull << (k % 64));
}

/* a block with free room goes into its bucket (a full one into none) */
static void link_blk(struct mpack *m, uint32_t blk)
{
    uint32_t k = bucket_of(m, blk);
    m->prev[blk] = m->next[blk] = NOBLK;
    if (k == 0)
        return;
    m->next[blk] = m->head[k];
    if (m->head[k] != NOBLK)
        m->prev[m->head[k]] = blk;
    m->head[k] = blk;
    m->bits[k / 64] |= 1ull << (k % 64);
}

/* blocks [0, upto] of the area exist */
static int grow_blocks(struct mpack *m, uint64_t upto)
{
    if (upto < m->nblk)
        return 0;
    if (upto >= m->cap) {
        uint64_t cap = m->cap ? m->cap * 2 : 1024;
        while (cap <= upto)
            cap *= 2;
        if (cap > UINT32_MAX - 1)
            return ERN_ELIMIT;
        uint32_t *f = realloc(m->lo, cap * sizeof(uint32_t));
        if (!f)
            return ERN_ENOMEM;
        m->lo = f;
        f = realloc(m->hi, cap * sizeof(uint32_t));
        if (!f)
            return ERN_ENOMEM;
        m->hi = f;
        uint32_t *nx = realloc(m->next, cap * sizeof(uint32_t));
        if (!nx)
            return ERN_ENOMEM;
        m->next = nx;
        uint32_t *pv = realloc(m->prev, cap * sizeof(uint32_t));
        if (!pv)
            return ERN_ENOMEM;
        m->prev = pv;
        m->cap = cap;
    }
    for (uint64_t i = m->nblk; i <= upto; i++) {
        m->lo[i] = 0;
        m->hi[i] = m->blksz;
        m->prev[i] = m->next[i] = NOBLK;
    }
    m->nblk = upto + 1;
    return 0;
}

/* the space [off, off + len) is taken; the blocks it touches leave or change bucket */
static int take(struct mpack *m, uint64_t off, uint64_t len)
{
    uint64_t last = idx_of(m, (off + len - 1) / m->blksz);
    uint64_t first = idx_of(m, off / m->blksz);
    uint64_t oldn = m->nblk;
    int r = grow_blocks(m, last);
    if (r)
        return r;
    for (uint64_t i = first; i <= last; i++) {
        if (i < oldn)
            unlink_blk(m, (uint32_t)i);
        /* [s, e) of this block is taken: the larger free range left stays */
        uint64_t bstart = blk_of(m, i) * m->blksz;
        uint32_t s = off > bstart ? (uint32_t)(off - bstart) : 0;
        uint64_t e = off + len - bstart;
        e = e > m->blksz ? m->blksz : align_up(e, EROFS_SLOT_SIZE);
        uint32_t lo = m->lo[i], hi = m->hi[i];
        uint32_t before = s > lo ? (s < hi ? s : hi) - lo : 0;
        uint32_t after = hi > e ? hi - (e > lo ? (uint32_t)e : lo) : 0;
        if (before > after) {
            m->hi[i] = lo + before;
        } else {
            m->lo[i] = hi - after;
        }
        link_blk(m, (uint32_t)i);
    }
    if (off + len > m->end)
        m->end = off + len;
    return 0;
}

/* the fullest block with at least `len` bytes free; NOBLK if none */
static uint32_t best_fit(const struct mpack *m, uint64_t len)
{
    uint64_t k = (len + EROFS_SLOT_SIZE - 1) / EROFS_SLOT_SIZE;
    if (k == 0)
        k = 1;
    if (k >= m->nbuckets)
        return NOBLK;
    uint32_t nw = (m->nbuckets + 63) / 64;
    for (uint32_t w = (uint32_t)(k / 64); w < nw; w++) {
        uint64_t bits = m->bits[w];
        if (w == k / 64)
            bits &= ~0ull << (k % 64);
        if (bits)
            return m->head[w * 64 + (uint32_t)__builtin_ctzll(bits)];
    }
    return NOBLK;
}

/* where a record of `len` bytes goes. may_cross: it may run over a block boundary
 * (no inline tail); fit(ctx, off) -> the offset at or after off where the record's
 * constraints hold (NULL: off itself). */
int mpack_place(struct mpack *m, uint64_t len, int may_cross,
                uint64_t (*fit)(const void *ctx, uint64_t off), const void *ctx,
                uint64_t *pout)
{
    uint64_t off;
    uint32_t blk = len <= m->blksz && !m->seq ? best_fit(m, len) : NOBLK;
    if (blk != NOBLK) {
        off = blk_of(m, blk) * m->blksz + m->lo[blk];
    } else {
        /* the end of the area: the free room of the last block if the record may run
         * over into the next, else a new block */
        off = align_up(m->end, EROFS_SLOT_SIZE);
        if (fit)
            off = fit(ctx, off);
        else if (!may_cross && off % m->blksz + len > m->blksz)
            off = align_up(off, m->blksz);
    }
    int r = take(m, off, len ? len : 1);
    if (r)
        return r;
    *pout = off;
    return 0;
}

/* a record of len bytes into the free room of a block taken so far only (best fit; not
 * at the area's end) -> 0 and *pout, or 1 when none has the room */
int mpack_fill(struct mpack *m, uint64_t len, uint64_t *pout)
{
    uint32_t blk = len && len <= m->blksz ? best_fit(m, len) : NOBLK;
    if (blk == NOBLK)
        return 1;
    uint64_t off = blk_of(m, blk) * m->blksz + m->lo[blk];
    if (take(m, off, len))
        return 1;
    *pout = off;
    return 0;
}

/* the bytes of a node's record in the inode area; *may_cross: it may run over a block
 * boundary (no inline tail) */
uint64_t mpack_record_len(const erofs_builder *b, const struct node *n, int *may_cross)
{
    uint64_t base = inode_size(n) + n->xattr_isize;
    *may_cross = 1;
    if (n->layout == L_CHUNK) {
        const struct chunkset *cs = &b->chunks[n->aux];
        uint32_t unit = n->dkind == D_SPARSE ? 4
                      : ((cs->format & EROFS_CHUNK_FORMAT_INDEXES)
                         ? (uint32_t)sizeof(struct erofs_inode_chunk_index) : 4);
        /* (records start 32-byte aligned: the padding depends on base only) */
        return align_up(base, unit) + (uint64_t)unit * cs->count;
    }
    if (n->layout == L_INLINE) {
        *may_cross = 0;
        return base + n->tail;
    }
    if (n->layout == L_ZFULL || n->layout == L_ZCOMPACT)
        return base + zmeta_extra(b, n);
    return base;
}
