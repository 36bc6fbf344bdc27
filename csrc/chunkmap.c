/* erofs-tools C core: a blob's chunk map from a RAFS v6 bootstrap's chunk-info table,
 * for the daemon's cold mount (fscache_daemon/storage/chunkmap.py). A 1 GiB image has
 * ~27,000 rows; made in Python (a pin record per row, a chunk record per pin, the
 * validation, the table digest's text and the map file's encoding) it took ~0.15 s of a
 * 0.25 s mount. Here: one pass per blob into packed records that Python turns into its
 * tuples with one struct.iter_unpack.
 *
 * Every byte of the table is untrusted: rows naming a blob past the device table and an
 * index pinned twice differently are refused (with the offending value in *detail), and
 * ern_ci_map repeats reader/blob.py's BlobMeta checks (any failure: the caller takes
 * its Python path, which names the problem).
 */
#include <stdlib.h>
#include <string.h>
#include <stdio.h>

#include "erofs_native.h"

#define CI_ROW 80
#define PIN_REC 61          /* <IQIQI32s? : index, uoff, usize, coff, csize, digest, comp */
#define MAP_REC 61          /* <IQIQIB32s : index, uoff, usize, coff, csize, flags, digest */
#define CHUNK_REC 77        /* <IQIQI32s?qQ : a pin record, zran index -1, zran offset 0 */
#define BLK 4096u

struct pin {
    uint32_t index, usize, csize, row;
    uint64_t uoff, coff;
    const uint8_t *digest;
    uint8_t comp;
};

static uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static void st32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void st64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

static int by_index(const void *a, const void *b)
{
    const struct pin *x = a, *y = b;
    if (x->index != y->index)
        return x->index < y->index ? -1 : 1;
    return x->row < y->row ? -1 : x->row > y->row;      /* stable: first row first */
}

static int by_uoff(const void *a, const void *b)
{
    const struct pin *x = a, *y = b;
    if (x->uoff != y->uoff)
        return x->uoff < y->uoff ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

static int by_coff(const void *a, const void *b)
{
    const struct pin *x = a, *y = b;
    if (x->coff != y->coff)
        return x->coff < y->coff ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

static int same_pin(const struct pin *a, const struct pin *b)
{
    return a->uoff == b->uoff && a->usize == b->usize && a->coff == b->coff &&
           a->csize == b->csize && a->comp == b->comp && !memcmp(a->digest, b->digest, 32);
}

static void put_pin(uint8_t *o, const struct pin *p)
{
    st32(o, p->index);
    st64(o + 4, p->uoff);
    st32(o + 12, p->usize);
    st64(o + 16, p->coff);
    st32(o + 24, p->csize);
    memcpy(o + 28, p->digest, 32);
    o[60] = p->comp;
}

static void get_pin(const uint8_t *o, struct pin *p)
{
    p->index = ld32(o);
    p->uoff = ld64(o + 4);
    p->usize = ld32(o + 12);
    p->coff = ld64(o + 16);
    p->csize = ld32(o + 24);
    p->digest = o + 28;
    p->comp = o[60];
}

static void row_pin(const uint8_t *r, uint64_t row, struct pin *p)
{
    p->digest = r;
    p->comp = ld32(r + 36) & 1;                 /* CHUNK_FLAG_COMPRESSED */
    p->csize = ld32(r + 40);
    p->usize = ld32(r + 44);
    p->coff = ld64(r + 48);
    p->uoff = ld64(r + 56);
    p->index = ld32(r + 72);
    p->row = (uint32_t)row;
}

/* ern_ci_pins when every index of the blob is below the row count (pack numbers a blob's
 * chunks 0..n-1): each row straight to the slot of its index, the first row of an index
 * kept and any later one compared with it; the same records and errors as the sort
 * (which cost ~3 ms of a 27,000-row table on the mount's path). */
static int64_t pins_by_slot(const uint8_t *table, uint64_t nrows, uint32_t blob,
                            uint32_t maxi, uint8_t *out, uint64_t *detail)
{
    uint64_t i, kept = 0, bad = UINT64_MAX;
    struct pin *slot = malloc(((uint64_t)maxi + 1) * sizeof(*slot));
    uint8_t *used = calloc((uint64_t)maxi + 1, 1);

    if (!slot || !used) {
        free(slot);
        free(used);
        return -3;
    }
    for (i = 0; i < nrows; i++) {
        const uint8_t *r = table + i * CI_ROW;
        struct pin p;
        if (ld32(r + 32) != blob)
            continue;
        row_pin(r, i, &p);
        if (used[p.index]) {
            if (p.index < bad && !same_pin(&p, &slot[p.index]))
                bad = p.index;      /* the sort reports the lowest such index */
            continue;
        }
        slot[p.index] = p;
        used[p.index] = 1;
    }
    if (bad == UINT64_MAX)
        for (i = 0; i <= maxi; i++)
            if (used[i])
                put_pin(out + kept++ * PIN_REC, &slot[i]);
    free(slot);
    free(used);
    if (bad != UINT64_MAX) {
        *detail = bad;
        return -2;
    }
    return (int64_t)kept;
}

int64_t ern_ci_pins(const uint8_t *table, uint64_t nrows, uint32_t nblobs, uint32_t blob,
                    uint8_t *out, uint64_t *detail)
{
    uint64_t i, n = 0, kept = 0;
    uint32_t maxi = 0;
    struct pin *v;

    for (i = 0; i < nrows; i++) {
        const uint8_t *r = table + i * CI_ROW;
        uint32_t b = ld32(r + 32);
        if (b >= nblobs) {
            *detail = b;
            return -1;
        }
        if (b == blob) {
            n++;
            if (ld32(r + 72) > maxi)
                maxi = ld32(r + 72);
        }
    }
    if (n && maxi < nrows)
        return pins_by_slot(table, nrows, blob, maxi, out, detail);
    v = malloc((n ? n : 1) * sizeof(*v));
    if (!v)
        return -3;
    for (i = 0, n = 0; i < nrows; i++) {
        const uint8_t *r = table + i * CI_ROW;
        if (ld32(r + 32) != blob)
            continue;
        row_pin(r, i, &v[n++]);
    }
    qsort(v, n, sizeof(*v), by_index);
    for (i = 0; i < n; i++) {
        if (kept && v[i].index == v[kept - 1].index) {
            if (!same_pin(&v[i], &v[kept - 1])) {
                *detail = v[i].index;
                free(v);
                return -2;
            }
            continue;
        }
        v[kept++] = v[i];
    }
    for (i = 0; i < kept; i++)
        put_pin(out + i * PIN_REC, &v[i]);
    free(v);
    return (int64_t)kept;
}

int64_t ern_ci_table_text(const uint8_t *pins, uint64_t count, uint8_t *out, uint64_t cap)
{
    uint64_t i, len = 0;
    struct pin p;

    for (i = 0; i < count; i++) {
        char num[112];
        int k;
        get_pin(pins + i * PIN_REC, &p);
        k = snprintf(num, sizeof(num), "%u:%llu:%u:%llu:%u:", p.index,
                     (unsigned long long)p.uoff, p.usize, (unsigned long long)p.coff,
                     p.csize);
        if (k < 0 || (uint64_t)k + 32 > cap - len)
            return -1;
        memcpy(out + len, num, (size_t)k);
        memcpy(out + len + k, p.digest, 32);
        len += (uint64_t)k + 32;
    }
    return (int64_t)len;
}

/* qsort, unless already in that order (a packed blob's chunks by index are by place:
 * one pass instead of a sort, ~1.5 ms each of a 27,000-chunk mount) */
static void sort_unless_sorted(struct pin *v, uint64_t n,
                               int (*cmp)(const void *, const void *))
{
    uint64_t i;
    for (i = 1; i < n; i++)
        if (cmp(&v[i - 1], &v[i]) > 0) {
            qsort(v, n, sizeof(*v), cmp);
            return;
        }
}

int ern_ci_map(const uint8_t *pins, uint64_t count, uint64_t chunk_count, uint64_t usize,
               uint64_t csize, uint32_t chunk_size, int raw_only, uint8_t *map_out,
               uint8_t *chunks_out)
{
    uint64_t i, prev_end = 0;
    struct pin *v;
    int why = 0;

    if (count != chunk_count || count == 0 || count > (1u << 24))
        return 1;
    v = malloc(count * sizeof(*v));
    if (!v)
        return 2;
    for (i = 0; i < count; i++)
        get_pin(pins + i * PIN_REC, &v[i]);
    /* sorted by index without repeats (ern_ci_pins): all of 0..n-1 iff the last is n-1 */
    if (v[count - 1].index != count - 1) {
        why = 3;
        goto out;
    }
    sort_unless_sorted(v, count, by_uoff);
    for (i = 0; i < count && !why; i++) {
        const struct pin *c = &v[i];
        uint64_t end;
        if (c->usize == 0 || c->usize > chunk_size || c->uoff % BLK || c->uoff < prev_end)
            why = 4;
        end = c->uoff + ((c->usize + (uint64_t)BLK - 1) & ~(uint64_t)(BLK - 1));
        if (end < c->uoff || end > usize)
            why = 5;
        prev_end = end;
        if (c->csize == 0 || c->coff > csize || c->csize > csize - c->coff)
            why = 6;
        if ((!c->comp && c->csize != c->usize) || (c->comp && raw_only))
            why = 7;
        if (!why) {
            uint8_t *m = map_out + i * MAP_REC;
            st32(m, c->index);
            st64(m + 4, c->uoff);
            st32(m + 12, c->usize);
            st64(m + 16, c->coff);
            st32(m + 24, c->csize);
            m[28] = (uint8_t)(c->comp | 2);     /* compressed, has a digest */
            memcpy(m + 29, c->digest, 32);
            put_pin(chunks_out + i * CHUNK_REC, c);
            st64(chunks_out + i * CHUNK_REC + PIN_REC, UINT64_MAX);
            st64(chunks_out + i * CHUNK_REC + PIN_REC + 8, 0);
        }
    }
    if (why)
        goto out;
    /* the chunks' stored bytes must not overlap either */
    sort_unless_sorted(v, count, by_coff);
    for (i = 1; i < count; i++)
        if (v[i - 1].coff + v[i - 1].csize > v[i].coff) {
            why = 8;
            break;
        }
out:
    free(v);
    return why;
}

/* A blob's own CI table (v1: 16-byte entries, v2: 24), decoded as format/rafs.py's
 * decode_ci_table does, into pin records that ern_ci_map checks and orders: what the
 * daemon's mount of an image whose pins do not cover a blob (an optimized image's
 * original blobs: ~45,000 chunks) did in Python per chunk (reader/blob.py's from_blob,
 * then the bootstrap's pins applied). */
int ern_ci_blob_pins(const uint8_t *ci, uint64_t n, int v2, const uint8_t *digests,
                     const uint8_t *pins, uint64_t npins, uint8_t *out)
{
    uint64_t i, j = 0;
    struct pin c, p;

    if (npins && ld32(pins + (npins - 1) * PIN_REC) >= n)
        return 1;                       /* a pin names a chunk the blob has not */
    for (i = 0; i < n; i++) {
        uint64_t uncomp, comp;
        if (v2) {
            uncomp = ld64(ci + i * 24);
            comp = ld64(ci + i * 24 + 8);
            if ((uncomp >> 56) & ~(uint64_t)0x11)
                return 2;               /* flags other than compressed, has-crc32 */
            c.uoff = (uncomp & 0xFFFFFFFFull) << 12;
            c.usize = (uint32_t)(((uncomp >> 32) & 0xFFFFFF) + 1);
            c.coff = comp & 0xFFFFFFFFFFull;
            c.csize = (uint32_t)((comp >> 40) & 0xFFFFFF);
            c.comp = (uint8_t)((uncomp >> 56) & 1);
        } else {
            uncomp = ld64(ci + i * 16);
            comp = ld64(ci + i * 16 + 8);
            c.uoff = uncomp & 0x0FFFFFFFF000ull;
            c.usize = (uint32_t)(((((uncomp >> 8) & 0xF) << 20) |
                                  ((uncomp >> 44) & 0xFFFFF)) + 1);
            c.coff = comp & 0xFFFFFFFFFFull;
            c.csize = (uint32_t)(((((comp >> 40) & 0xF) << 20) |
                                  ((comp >> 44) & 0xFFFFF)) + 1);
            c.comp = c.csize != c.usize;
        }
        c.index = (uint32_t)i;
        c.digest = digests ? digests + i * 32 : NULL;
        if (j < npins && ld32(pins + j * PIN_REC) == i) {
            get_pin(pins + j * PIN_REC, &p);
            if (p.uoff != c.uoff || p.usize != c.usize || p.coff != c.coff ||
                p.csize != c.csize)
                return 3;               /* pinned elsewhere than the blob says */
            c.digest = p.digest;        /* the bootstrap's digest is the one served */
            j++;
        }
        if (!c.digest)
            return 4;                   /* nothing to verify the chunk against */
        put_pin(out + i * PIN_REC, &c);
    }
    return 0;
}
