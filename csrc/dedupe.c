/* erofs-tools C core, -Ededupe: pclusters shared between files.
 *
 * When a file is committed (one at a time, in walk order), each of its pclusters
 * (compressed or stored plain) is looked up by its on-disk bytes among the pclusters
 * already written: an identical one (same bytes, same block count, same kind) is
 * referenced instead of written again. The kernel decodes a pcluster from its bytes
 * alone and caches pclusters by physical address, so files may share one. As the
 * compact index derives a file's pcluster addresses by counting from one base, a file
 * with a shared pcluster keeps the full index. mkfs.erofs 1.9 does this (its
 * "dedupe_ext") with -Efragments; with -Ededupe, data shifted against pcluster
 * boundaries is matched too (the second half of this file).
 */
#include "compress_int.h"

struct zdupent {
    uint64_t hash;           /* 0: free slot */
    uint32_t blk;
    uint32_t nblk;           /* blocks | (algorithm + 1, 0: stored plain) << 24 */
};

uint64_t zhash64(const uint8_t *p, size_t len)
{
    uint64_t h = 0x9E3779B97F4A7C15ull ^ len;
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        h = (h ^ w) * 0xFF51AFD7ED558CCDull;
        h ^= h >> 29;
    }
    for (; i < len; i++)
        h = (h ^ p[i]) * 0x100000001B3ull;
    h ^= h >> 32;
    return h ? h : 1;
}

void zdedupe_free(struct zdedupe *dd)
{
    free(dd->tab);
    memset(dd, 0, sizeof(*dd));
}

static int grow_table(struct zdedupe *dd)
{
    uint32_t nc = dd->cap ? dd->cap * 2 : 4096;
    struct zdupent *t = calloc(nc, sizeof(*t));
    if (!t)
        return ERN_ENOMEM;
    for (uint32_t i = 0; i < dd->cap; i++) {
        if (!dd->tab[i].hash)
            continue;
        uint32_t k = (uint32_t)dd->tab[i].hash & (nc - 1);
        while (t[k].hash)
            k = (k + 1) & (nc - 1);
        t[k] = dd->tab[i];
    }
    free(dd->tab);
    dd->tab = t;
    dd->cap = nc;
    return 0;
}

/* 1: the same bytes are at block blk of the image (or of the pending run: blocks not
 * written yet, in memory) */
static int same_on_disk(struct xfer *x, int imgfd, const struct zrun *run, uint32_t blk,
                        const uint8_t *d, uint32_t len)
{
    uint32_t nblk = len / x->blksz;
    if (run && run->nblk && blk >= run->blk && blk + nblk <= run->blk + run->nblk)
        return !memcmp(run->mem + (size_t)(blk - run->blk) * x->blksz, d, len);
    uint8_t buf[16384];
    for (uint32_t done = 0; done < len;) {
        uint32_t n = len - done < sizeof(buf) ? len - done : (uint32_t)sizeof(buf);
        if (x_read(x, imgfd, buf, n, ot_base(x->ot) + (uint64_t)blk * x->blksz + done,
                   "the image"))
            return -1;
        if (memcmp(buf, d + done, n))
            return 0;
        done += n;
    }
    return 1;
}

int zdedupe_find(struct zdedupe *dd, struct xfer *x, int imgfd, const struct zrun *run,
                 const uint8_t *d, uint32_t nblk, int kind, uint32_t *blk, uint64_t *hash)
{
    uint32_t len = nblk * x->blksz;
    uint32_t key = nblk | (uint32_t)(kind + 1) << 24;
    *hash = zhash64(d, len);
    if (!dd->cap)
        return 0;
    for (uint32_t k = (uint32_t)*hash & (dd->cap - 1); dd->tab[k].hash;
         k = (k + 1) & (dd->cap - 1)) {
        const struct zdupent *e = &dd->tab[k];
        if (e->hash != *hash || e->nblk != key)
            continue;
        int same = same_on_disk(x, imgfd, run, e->blk, d, len);
        if (same < 0)
            return x->code ? x->code : ERN_EIO;
        if (same) {
            *blk = e->blk;
            return 1;
        }
    }
    return 0;
}

int zdedupe_insert(struct zdedupe *dd, uint64_t hash, uint32_t blk, uint32_t nblk, int kind)
{
    if ((dd->n + 1) * 2 > dd->cap && grow_table(dd))
        return ERN_ENOMEM;
    uint32_t k = (uint32_t)hash & (dd->cap - 1);
    while (dd->tab[k].hash)
        k = (k + 1) & (dd->cap - 1);
    dd->tab[k] = (struct zdupent){ .hash = hash, .blk = blk,
                                   .nblk = nblk | (uint32_t)(kind + 1) << 24 };
    dd->n++;
    return 0;
}

/* -Ededupe: data repeated at any offset. mkfs.erofs's kind of match: the input is
 * compared with the first bytes of the output of earlier pclusters; where one starts,
 * the extent before is cut (its pcluster then decodes to more than the extent: a
 * partial reference, LI_PARTIAL_REF) and an extent referencing that pcluster (the
 * whole output or a part of it from its start) covers the repeated bytes.
 *
 * Finding the starts without a table lookup at every byte position: a gear hash over
 * the last 64 bytes marks content-defined anchors (about one position in 128); each
 * pcluster is filed under the first anchor of its output's first block (and the
 * anchor's offset there), and the input is scanned once for anchors, each one looked
 * up: a candidate start is the anchor's position minus the filed offset. A candidate
 * is checked on the first block's hash, then on the bytes themselves: the pcluster is
 * read back from the image and decoded, so a reference is only ever made to bytes
 * that are there (the cost is paid on candidates only). */

#define ANCHOR_BITS 7u             /* one anchor in 2^7 positions */
#define ANCHOR_SPAN 64u            /* the gear hash depends on the last 64 bytes */
#define ROLL_PER_KEY 16u           /* pclusters filed under one anchor hash at most */
#define ROLL_CANDS 64u             /* candidates checked per search at most */

struct zrollent {
    uint64_t ahash, winhash;
    uint32_t blk, dlen;            /* dlen 0: free slot */
    uint16_t nblk, aoff;
    int32_t kind;
};

struct zanchor {
    uint64_t pos, h;
};

static uint64_t gear[256];
static pthread_once_t gear_once = PTHREAD_ONCE_INIT;

static void gear_init(void)
{
    uint64_t s = 0x243F6A8885A308D3ull;            /* splitmix64: fixed, so reproducible */
    for (int i = 0; i < 256; i++) {
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        gear[i] = z ^ (z >> 31);
    }
}

static int is_anchor(uint64_t g)
{
    return (g >> (64 - ANCHOR_BITS)) == 0;
}

uint16_t zroll_anchor(const uint8_t *p, uint32_t blksz, uint64_t *ahash)
{
    pthread_once(&gear_once, gear_init);
    uint64_t g = 0;
    for (uint32_t i = 0; i < blksz && i < 0xFFFF; i++) {
        g = (g << 1) + gear[p[i]];
        if (i + 1 >= ANCHOR_SPAN && is_anchor(g)) {
            *ahash = g;
            return (uint16_t)i;
        }
    }
    return 0;
}

void zroll_free(struct zroll *r)
{
    free(r->tab);
    free(r->anc);
    free(r->pbuf);
    free(r->dbuf);
    memset(r, 0, sizeof(*r));
}

static int roll_grow(struct zroll *r)
{
    uint32_t nc = r->cap ? r->cap * 2 : 4096;
    struct zrollent *t = calloc(nc, sizeof(*t));
    if (!t)
        return ERN_ENOMEM;
    for (uint32_t i = 0; i < r->cap; i++) {      /* in slot order: chains keep their order */
        if (!r->tab[i].dlen)
            continue;
        uint32_t k = (uint32_t)(r->tab[i].ahash >> 7) & (nc - 1);
        while (t[k].dlen)
            k = (k + 1) & (nc - 1);
        t[k] = r->tab[i];
    }
    free(r->tab);
    r->tab = t;
    r->cap = nc;
    return 0;
}

int zroll_insert(struct zroll *r, const struct zext *e, uint32_t blk, int kind)
{
    if (!e->aoff || !e->dlen)
        return 0;
    if ((r->n + 1) * 2 > r->cap && roll_grow(r))
        return ERN_ENOMEM;
    uint32_t k = (uint32_t)(e->ahash >> 7) & (r->cap - 1), same = 0;
    for (; r->tab[k].dlen; k = (k + 1) & (r->cap - 1)) {
        const struct zrollent *t = &r->tab[k];
        if (t->ahash != e->ahash)
            continue;
        /* the same first block at the same anchor, no longer: nothing new */
        if (t->winhash == e->winhash && t->aoff == e->aoff && t->dlen >= e->dlen &&
            t->kind == kind)
            return 0;
        if (++same >= ROLL_PER_KEY)
            return 0;
    }
    r->tab[k] = (struct zrollent){ .ahash = e->ahash, .winhash = e->winhash, .blk = blk,
                                   .dlen = e->dlen, .nblk = e->nblk, .aoff = e->aoff,
                                   .kind = kind };
    r->n++;
    return 0;
}

void zroll_reset(struct zroll *r, uint64_t pos)
{
    pthread_once(&gear_once, gear_init);
    r->scan = pos;
    r->valid = pos + ANCHOR_SPAN - 1;
    r->g = 0;
    r->nanc = r->a0 = 0;
}

/* scan the input up to file offset upto for anchors */
static int roll_scan(struct zroll *r, const uint8_t *buf, uint64_t wbase, uint64_t upto)
{
    uint64_t g = r->g;
    for (uint64_t p = r->scan; p < upto; p++) {
        g = (g << 1) + gear[buf[p - wbase]];
        if (p >= r->valid && is_anchor(g)) {
            if (r->nanc == r->canc) {
                if (r->a0) {             /* drop the anchors behind */
                    memmove(r->anc, r->anc + r->a0, (size_t)(r->nanc - r->a0) * sizeof(*r->anc));
                    r->nanc -= r->a0;
                    r->a0 = 0;
                }
                if (r->nanc == r->canc) {
                    uint32_t nc = r->canc ? r->canc * 2 : 1024;
                    struct zanchor *a = realloc(r->anc, (size_t)nc * sizeof(*a));
                    if (!a)
                        return ERN_ENOMEM;
                    r->anc = a;
                    r->canc = nc;
                }
            }
            r->anc[r->nanc++] = (struct zanchor){ p, g };
        }
    }
    r->g = g;
    if (upto > r->scan)
        r->scan = upto;
    return 0;
}

static int grow_buf(uint8_t **p, uint32_t *cap, uint32_t need)
{
    if (*cap >= need)
        return 0;
    uint8_t *n = realloc(*p, need);
    if (!n)
        return ERN_ENOMEM;
    *p = n;
    *cap = need;
    return 0;
}

/* the earlier pcluster's output (NULL: it does not decode: never referenced) */
static const uint8_t *roll_decode(struct zroll *r, struct xfer *x, int imgfd,
                                  const struct zrollent *t, uint32_t dict_size, int *err)
{
    uint32_t plen = (uint32_t)t->nblk * x->blksz;
    *err = 0;
    if (grow_buf(&r->pbuf, &r->pcap, plen) || grow_buf(&r->dbuf, &r->dcap, t->dlen)) {
        *err = xfail(x, ERN_ENOMEM, "out of memory");
        return NULL;
    }
    if (x_read(x, imgfd, r->pbuf, plen, ot_base(x->ot) + (uint64_t)t->blk * x->blksz,
               "the image")) {
        *err = x->code ? x->code : ERN_EIO;
        return NULL;
    }
    if (t->kind < 0)
        return t->dlen <= plen ? r->pbuf : NULL;
    char e[160];
    if (erofs_z_decompress(t->kind, r->pbuf, plen, r->dbuf, t->dlen, ERN_ZD_ZERO_PADDING,
                           dict_size, e, sizeof(e)) != ERN_OK)
        return NULL;
    return r->dbuf;
}

struct cand {
    uint64_t q;
    uint32_t slot;
};

int zroll_find(struct zroll *r, struct xfer *x, int imgfd, const uint8_t *buf, uint64_t wbase,
               uint64_t end, uint64_t lo, uint64_t h, int alg, uint32_t dict_size,
               struct zmatch *m)
{
    const uint32_t bs = x->blksz;
    const uint64_t mask = bs - 1;
    if (!r->cap || h + 1 > end)
        return 0;
    uint64_t from = lo < h ? lo : h;       /* the earliest start considered */
    if (from < wbase)
        from = wbase;
    if (r->scan < from)
        zroll_reset(r, from);
    uint64_t upto = h + bs < end ? h + bs : end;
    if (roll_scan(r, buf, wbase, upto))
        return xfail(x, ERN_ENOMEM, "out of memory");
    while (r->a0 < r->nanc && r->anc[r->a0].pos < from + ANCHOR_SPAN - 1)
        r->a0++;
    struct cand cs[ROLL_CANDS];
    uint32_t nc = 0;
    for (uint32_t i = r->a0; i < r->nanc && nc < ROLL_CANDS; i++) {
        const struct zanchor *a = &r->anc[i];
        for (uint32_t k = (uint32_t)(a->h >> 7) & (r->cap - 1); r->tab[k].dlen && nc < ROLL_CANDS;
             k = (k + 1) & (r->cap - 1)) {
            const struct zrollent *t = &r->tab[k];
            if (t->ahash != a->h || (t->kind >= 0 && t->kind != alg) || t->aoff > a->pos)
                continue;
            uint64_t q = a->pos - t->aoff;
            if (q < from || q > h || (q < h && q < lo) || q + bs > end || q < wbase)
                continue;
            /* at most one candidate per (q, slot); insertion sort on q, latest first */
            uint32_t j = nc;
            while (j && cs[j - 1].q < q)
                j--;
            int seen = 0;
            for (uint32_t z = j; z-- && cs[z].q == q;)
                seen |= cs[z].slot == k;
            if (seen)
                continue;
            memmove(cs + j + 1, cs + j, (nc - j) * sizeof(*cs));
            cs[j] = (struct cand){ q, k };
            nc++;
        }
    }
    uint64_t lastq = UINT64_MAX, qhash = 0;
    for (uint32_t i = 0; i < nc; i++) {
        const struct zrollent *t = &r->tab[cs[i].slot];
        uint64_t q = cs[i].q;
        const uint8_t *in = buf + (q - wbase);
        if (q != lastq) {
            qhash = zhash64(in, bs);
            lastq = q;
        }
        if (qhash != t->winhash)
            continue;
        int err;
        const uint8_t *out = roll_decode(r, x, imgfd, t, dict_size, &err);
        if (err)
            return err;
        if (!out)
            continue;
        uint64_t avail = end - q < t->dlen ? end - q : t->dlen;
        uint32_t len = 0;
        while (len < avail && in[len] == out[len])
            len++;
        if (len < bs || q + len <= h)
            continue;
        /* a pcluster of several blocks is known by the block count in the lcluster
         * after its head: the extent must reach into the next but one lcluster */
        if (t->nblk > 1 && (q & mask) + len < 2ull * bs)
            continue;
        *m = (struct zmatch){ .q = q, .len = len, .dlen = t->dlen, .blk = t->blk,
                              .nblk = t->nblk, .kind = t->kind };
        return 1;
    }
    return 0;
}

/* A match a block after the extent before (compress.c's roll_step, its "mid") is taken
 * when it saves more than the block stored plain in front of it costs, both weighed at
 * the ratio of the pcluster it references: the matched input would take
 * len * plen / dlen bytes compressed, the plain block takes a block instead of
 * bs * plen / dlen. So a pcluster of less than two blocks' output (text that compresses
 * less than 2:1, as zstd's default level with raw literals leaves it) is matched too:
 * copies of such text shifted against each other's cuts sync there, every extent after
 * it then matching at its start. (Before, a match had to reach two blocks.) */
int zroll_mid_pays(const struct zmatch *m, uint32_t bs)
{
    if (m->len >= 2ull * bs)
        return 1;
    uint64_t plen = (uint64_t)m->nblk * bs;
    uint64_t saved = plen * m->len / m->dlen;
    uint64_t packed = plen * bs / m->dlen;          /* the plain block's input compressed */
    return saved > (packed < bs ? bs - packed : 0);
}
