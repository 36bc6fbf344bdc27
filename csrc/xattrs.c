/* erofs-tools C core, xattrs in the layout: grouped per inode, those carried by two
 * inodes or more moved to the shared area, each inode's inline area sized, and the
 * xattr name filter (EROFS_FEATURE_COMPAT_XATTR_FILTER, Linux 6.6+): a 32-bit Bloom
 * filter in each inode's xattr header, bit i set when no xattr of the inode hashes to
 * i, so the kernel answers a lookup of a name the inode lacks (the security.capability
 * check of every exec and write, ACL lookups) without reading the xattrs. A name hashes
 * as xxHash32 of the name after its short prefix ("user.", "trusted.", ...; for a long
 * prefix, its infix then the stored name), seeded with the filter seed plus the short
 * prefix's index, as the kernel computes it at lookup; a wrong bit would hide an xattr,
 * which the tests' kernel round trips read back. */
#include <string.h>

#include "builder_int.h"

#define P1 2654435761u
#define P2 2246822519u
#define P3 3266489917u
#define P4 668265263u
#define P5 374761393u

static uint32_t rotl(uint32_t v, int r)
{
    return (v << r) | (v >> (32 - r));
}

static uint32_t le32_at(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

/* xxHash32 (the algorithm's published definition) */
uint32_t ern_xxh32(const void *data, size_t len, uint32_t seed)
{
    const uint8_t *p = data, *end = p + len;
    uint32_t h;
    if (len >= 16) {
        uint32_t v[4] = { seed + P1 + P2, seed + P2, seed, seed - P1 };
        for (; end - p >= 16; p += 16)
            for (int i = 0; i < 4; i++)
                v[i] = rotl(v[i] + le32_at(p + 4 * i) * P2, 13) * P1;
        h = rotl(v[0], 1) + rotl(v[1], 7) + rotl(v[2], 12) + rotl(v[3], 18);
    } else {
        h = seed + P5;
    }
    h += (uint32_t)len;
    for (; end - p >= 4; p += 4)
        h = rotl(h + le32_at(p) * P3, 17) * P4;
    for (; p < end; p++)
        h = rotl(h + *p * P5, 11) * P1;
    h ^= h >> 15;
    h *= P2;
    h ^= h >> 13;
    h *= P3;
    h ^= h >> 16;
    return h;
}

/* the long prefix `id` of the table: its short prefix's index and its infix */
static int long_prefix(const erofs_builder *b, uint32_t id, uint8_t *base,
                       const uint8_t **infix, uint32_t *infix_len)
{
    uint32_t off = 0;
    for (uint32_t i = 0; i < b->xpfx_count; i++) {
        uint32_t sz = (uint32_t)b->xpfx[off] | (uint32_t)b->xpfx[off + 1] << 8;
        if (i == id) {
            *base = b->xpfx[off + 2];
            *infix = b->xpfx + off + 3;
            *infix_len = sz - 1;
            return 0;
        }
        off = (off + 2 + sz + 3) & ~3u;
    }
    return -1;
}

/* the first long prefix of the table (mkfs.erofs --xattr-prefix) that a name, short
 * prefix `base` then `rest`, starts with: -> its id (*infix_len: its infix's length), or
 * -1. The first, as mkfs.erofs takes them in order; never the fingerprints' own. */
int match_long_prefix(const erofs_builder *b, uint8_t base, const char *rest,
                      size_t restlen, uint32_t *infix_len)
{
    uint32_t off = 0;
    for (uint32_t i = 0; i < b->xpfx_count; i++) {
        uint32_t sz = (uint32_t)b->xpfx[off] | (uint32_t)b->xpfx[off + 1] << 8;
        if ((int32_t)i != b->xpfx_ishare && b->xpfx[off + 2] == base && sz - 1 <= restlen &&
                !memcmp(b->xpfx + off + 3, rest, sz - 1)) {
            *infix_len = sz - 1;
            return (int)i;
        }
        off = (off + 2 + sz + 3) & ~3u;
    }
    return -1;
}

uint32_t xattr_name_filter(const erofs_builder *b, const struct node *n)
{
    uint32_t bits = 0;
    for (uint32_t k = 0; k < n->xa_count; k++) {
        const struct xattr_rec *x = &b->xas[n->xa_first + k];
        const uint8_t *name = (const uint8_t *)b->arena + x->name_off;
        uint8_t base = x->index;
        uint32_t h;
        if (x->index & EROFS_XATTR_LONG_PREFIX) {
            const uint8_t *infix;
            uint32_t ilen;
            uint8_t buf[2 * 256];
            if (long_prefix(b, x->index & EROFS_XATTR_LONG_PREFIX_MASK, &base, &infix, &ilen) ||
                    ilen + x->name_len > sizeof(buf))
                return 0;       /* (never: the table was checked) no filter, all may exist */
            memcpy(buf, infix, ilen);
            memcpy(buf + ilen, name, x->name_len);
            h = ern_xxh32(buf, ilen + x->name_len, EROFS_XATTR_FILTER_SEED + base);
        } else {
            h = ern_xxh32(name, x->name_len, EROFS_XATTR_FILTER_SEED + base);
        }
        bits |= 1u << (h & (EROFS_XATTR_FILTER_BITS - 1));
    }
    return ~bits;
}

static int cmp_xattr_name(erofs_builder *sort_ctx, const struct xattr_rec *a, const struct xattr_rec *b2)
{
    if (a->index != b2->index)
        return a->index < b2->index ? -1 : 1;
    return namecmp(sort_ctx->arena + a->name_off, a->name_len,
                   sort_ctx->arena + b2->name_off, b2->name_len);
}

static int cmp_xattr_content(erofs_builder *sort_ctx, const struct xattr_rec *a, const struct xattr_rec *b2)
{
    if (a->index != b2->index)
        return a->index < b2->index ? -1 : 1;
    int c = namecmp(sort_ctx->arena + a->name_off, a->name_len,
                    sort_ctx->arena + b2->name_off, b2->name_len);
    if (c)
        return c;
    return namecmp(sort_ctx->arena + a->val_off, a->val_len,
                   sort_ctx->arena + b2->val_off, b2->val_len);
}

static int cmp_xattr_node(const void *pa, const void *pb, void *ctx)
{
    const struct xattr_rec *a = pa, *b2 = pb;
    if (a->node != b2->node)
        return a->node < b2->node ? -1 : 1;
    return cmp_xattr_content(ctx, a, b2);
}

static int cmp_xattr_idx(const void *pa, const void *pb, void *ctx)
{
    erofs_builder *sort_ctx = ctx;
    uint32_t ia = *(const uint32_t *)pa, ib = *(const uint32_t *)pb;
    int c = cmp_xattr_content(sort_ctx, &sort_ctx->xas[ia], &sort_ctx->xas[ib]);
    if (c)
        return c;
    return ia < ib ? -1 : ia > ib;
}

/* an inline or shared xattr entry: header, name suffix, value, 4-byte aligned */
uint32_t xentry_size(const struct xattr_rec *x)
{
    return ((uint32_t)sizeof(struct erofs_xattr_entry) + x->name_len + x->val_len + 3u) & ~3u;
}

static int share_xattrs(erofs_builder *b, uint32_t *shared_bytes)
{
    uint32_t *idx = malloc((size_t)b->nxa * sizeof(uint32_t));
    b->shared_order = malloc((size_t)b->nxa * sizeof(uint32_t));
    if (!idx || !b->shared_order) {
        free(idx);
        return fail(b, ERN_ENOMEM, "out of memory");
    }
    for (uint32_t i = 0; i < b->nxa; i++)
        idx[i] = i;
    qsort_r(idx, b->nxa, sizeof(uint32_t), cmp_xattr_idx, b);
    uint32_t min = b->o.shared_xattr_min ? b->o.shared_xattr_min : 2;
    for (uint32_t i = 0; i < b->nxa;) {
        uint32_t j = i + 1;
        while (j < b->nxa && !cmp_xattr_content(b, &b->xas[idx[i]], &b->xas[idx[j]]))
            j++;
        /* content fingerprints stay inline, as mkfs.erofs 1.9 writes them (it computes
         * them after choosing the shared xattrs): two files of the same content keep
         * their own copy */
        int fingerprint = b->xpfx_ishare >= 0 &&
                          b->xas[idx[i]].index == (EROFS_XATTR_LONG_PREFIX | (uint32_t)b->xpfx_ishare);
        if (j - i >= min && !fingerprint) {
            uint64_t id = *shared_bytes / 4;
            uint32_t sz = xentry_size(&b->xas[idx[i]]);
            if ((uint64_t)*shared_bytes + sz > 0xFFFFFFF0ull) {
                free(idx);
                return fail(b, ERN_ELIMIT, "shared xattr area too large");
            }
            for (uint32_t k = i; k < j; k++)
                b->xas[idx[k]].shared_id = (uint32_t)id;
            b->shared_order[b->nshared++] = idx[i];
            *shared_bytes += sz;
        }
        i = j;
    }
    free(idx);
    return 0;
}

int pack_xattrs(erofs_builder *b, uint32_t *shared_bytes, int *filtered)
{
    qsort_r(b->xas, b->nxa, sizeof(*b->xas), cmp_xattr_node, b);
    for (uint32_t i = 0; i < b->nnodes; i++) {
        b->nodes[i].xa_first = 0;
        b->nodes[i].xa_count = 0;
    }
    for (uint32_t i = 0; i < b->nxa; i++) {
        struct xattr_rec *x = &b->xas[i];
        if (i && x->node == b->xas[i - 1].node && !cmp_xattr_name(b, x, &b->xas[i - 1]))
            return fail(b, ERN_EINVAL, "duplicate xattr name on one node");
        struct node *n = &b->nodes[x->node];
        if (n->xa_count == 0)
            n->xa_first = i;
        n->xa_count++;
        x->shared_id = NONE32;
    }
    *shared_bytes = 0;
    free(b->shared_order);
    b->shared_order = NULL;
    b->nshared = 0;
    if (b->o.shared_xattrs && b->nxa && b->nxa >= b->o.shared_xattr_min) {
        int r = share_xattrs(b, shared_bytes);
        if (r)
            return r;
    }
    const uint32_t hdr = (uint32_t)sizeof(struct erofs_xattr_ibody_header);
    for (uint32_t i = 0; i < b->nnodes; i++) {
        struct node *n = &b->nodes[i];
        n->xattr_isize = 0;
        if (i == b->root && b->o.root_xattr_isize) {
            /* --root-xattr-isize: room kept after the root's xattrs (zeros, which the
             * kernel reads as entries of no name to skip), as mkfs.erofs pads it */
            n->xattr_isize = b->o.root_xattr_isize;
            if (b->o.xattr_filter && !n->xa_count)
                *filtered = 1;      /* (its header's filter: every name absent) */
        }
        if (!n->xa_count)
            continue;
        uint64_t sz = hdr;
        uint32_t nshared = 0;
        for (uint32_t k = 0; k < n->xa_count; k++) {
            struct xattr_rec *x = &b->xas[n->xa_first + k];
            /* an inode lists at most 255 shared ids (a u8 count): the others inline,
             * as mkfs.erofs keeps them */
            if (x->shared_id != NONE32 && ++nshared > 255)
                x->shared_id = NONE32;
            sz += x->shared_id != NONE32 ? 4 : xentry_size(x);
        }
        if ((sz - hdr) / 4 + 1 > 0xFFFF)
            return fail(b, ERN_ELIMIT, "xattrs of one inode exceed the inline limit");
        if (sz > n->xattr_isize)
            n->xattr_isize = (uint32_t)sz;
        /* the feature is on when some filter rules a name out (as mkfs.erofs) */
        if (b->o.xattr_filter && !*filtered && xattr_name_filter(b, n))
            *filtered = 1;
    }
    return 0;
}
