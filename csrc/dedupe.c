/* erofs-tools C core, -Ededupe: pclusters shared between files.
 *
 * When a file is committed (one at a time, in walk order), each of its pclusters
 * (compressed or stored plain) is looked up by its on-disk bytes among the pclusters
 * already written: an identical one (same bytes, same block count, same kind) is
 * referenced instead of written again. The kernel decodes a pcluster from its bytes
 * alone and caches pclusters by physical address, so files may share one. As the
 * compact index derives a file's pcluster addresses by counting from one base, a file
 * with a shared pcluster keeps the full index. mkfs.erofs 1.9 does this (its
 * "dedupe_ext") with -Efragments; its -Ededupe also matches data shifted against
 * pcluster boundaries, which this does not.
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
        if (x_read(x, imgfd, buf, n, (uint64_t)blk * x->blksz + done, "the image"))
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
