/* erofs-tools C core, compression: the lcluster indexes of a compressed file.
 *
 * The full index (COMPRESSED_FULL) is built from the file's extents once its pclusters
 * have blocks: one 8-byte entry per lcluster (a block here). The compact index
 * (COMPRESSED_COMPACT, mkfs.erofs's default) is derived from it when the inode's size is
 * known: the same entries squeezed to 16 bits (packs of 2 in 8 bytes) or 14 bits (packs
 * of 16 in 32 bytes), each pack ending with a le32 block address from which the reader
 * counts the blocks of the pack's pclusters. 4-byte packs come first until the 2-byte
 * packs are 32-byte aligned, then as many 2-byte packs as fit, then 4-byte packs again.
 * Also the extents of a file's segments gathered, compressed by different threads, and
 * the 48-bit layout's extent records derived from the full index (zindex_extents).
 */
#include "compress_int.h"

uint8_t *zfile_index(const struct zfile *zf, const struct zconf *zc, uint32_t blkszbits,
                     uint32_t *len)
{
    const uint32_t lb = blkszbits;     /* lcluster = one block */
    const uint64_t mask = (1ull << lb) - 1;
    uint64_t nlc = (zf->size + mask) >> lb;
    *len = (uint32_t)(Z_INDEX_START + nlc * sizeof(struct z_erofs_lcluster_index));
    uint8_t *meta = calloc(1, *len);
    if (!meta)
        return NULL;
    struct z_erofs_map_header h;
    memset(&h, 0, sizeof(h));
    const int frag = zf->frag || zf->frag_src;
    if (frag && zf->next == 1) {
        /* the whole file is a fragment: le64 offset | 1 << 63 (bit 7 of h_clusterbits) */
        uint64_t v = htole64(zf->fragoff | 1ull << 63);
        memcpy(meta, &v, sizeof(v));
        *len = Z_INDEX_START;
        return meta;
    }
    int big = zc->big;
    h.h_advise = cpu_to_le16((big ? Z_EROFS_ADVISE_BIG_PCLUSTER_1 : 0) |
                             (zf->idata ? Z_EROFS_ADVISE_INLINE_PCLUSTER : 0) |
                             (frag ? Z_EROFS_ADVISE_FRAGMENT_PCLUSTER : 0));
    h.h_idata_size = cpu_to_le16(zf->idata_len);
    h.h_algorithmtype = (uint8_t)zc->alg->id;
    h.h_clusterbits = 0;
    memcpy(meta, &h, sizeof(h));
    if (frag) {
        /* h_fragmentoff: le32 over h_reserved1 and h_idata_size (the high 32 bits go to
         * the fragment extent's head, full indexes only) */
        uint32_t lo = htole32((uint32_t)zf->fragoff);
        memcpy(meta, &lo, 4);
    }
    struct z_erofs_lcluster_index *idx = (struct z_erofs_lcluster_index *)(meta + Z_INDEX_START);
    for (uint32_t i = 0; i < zf->next; i++) {
        const struct zext *e = &zf->ext[i];
        int last = i + 1 == zf->next;
        uint64_t end = last ? zf->size : zf->ext[i + 1].start;
        uint64_t hl = e->start >> lb, nh = end >> lb;
        /* an extent that is the start of its pcluster's output only (-Ededupe) */
        int partial = e->dlen && end - e->start < e->dlen;
        idx[hl].di_advise = cpu_to_le16((e->raw ? Z_EROFS_LCLUSTER_TYPE_PLAIN
                                                : Z_EROFS_LCLUSTER_TYPE_HEAD1) |
                                        (partial ? Z_EROFS_LI_PARTIAL_REF : 0));
        idx[hl].di_clusterofs = cpu_to_le16(e->start & mask);
        idx[hl].di_u = cpu_to_le32(e->frag ? (uint32_t)(zf->fragoff >> 32) : e->blk);
        for (uint64_t l = hl + 1; l < nh && l < nlc; l++) {
            uint32_t d0 = l - hl > 0x7FF ? 0x7FF : (uint32_t)(l - hl);
            if (l == hl + 1 && big)
                d0 = e->nblk | Z_EROFS_LI_D0_CBLKCNT;
            uint32_t d1 = nh - l > 0xFFFF ? 0xFFFF : (uint32_t)(nh - l);
            idx[l].di_advise = cpu_to_le16(Z_EROFS_LCLUSTER_TYPE_NONHEAD);
            idx[l].di_clusterofs = 0;
            idx[l].di_u = cpu_to_le32(d0 | d1 << 16);
        }
        /* the file ends inside a later lcluster: a PLAIN head there marks the end */
        if (last && nh > hl && nh < nlc) {
            idx[nh].di_advise = cpu_to_le16(Z_EROFS_LCLUSTER_TYPE_PLAIN);
            idx[nh].di_clusterofs = cpu_to_le16(zf->size & mask);
            idx[nh].di_u = 0;
        }
    }
    return meta;
}

#define LOBITS 12u           /* the low bits of a compact entry (lcluster bits, >= 12) */

/* one full-index entry, decoded */
struct lent {
    uint32_t type, clusterofs, blkaddr, d0, d1;
};

static struct lent get_entry(const uint8_t *full, uint32_t i)
{
    struct z_erofs_lcluster_index di;
    memcpy(&di, full + Z_INDEX_START + (size_t)i * sizeof(di), sizeof(di));
    struct lent e;
    e.type = le16toh(di.di_advise) & 3u;
    e.clusterofs = le16toh(di.di_clusterofs);
    e.blkaddr = le32toh(di.di_u);
    e.d0 = e.blkaddr & 0xFFFF;
    e.d1 = e.blkaddr >> 16;
    return e;
}

/* put v's low `bits` bits at bit position pos (little-endian bit stream) */
static void put_bits(uint8_t *out, uint32_t pos, uint32_t v, uint32_t bits)
{
    for (uint32_t k = 0; k < bits; k++)
        if (v >> k & 1)
            out[(pos + k) / 8] |= (uint8_t)(1u << ((pos + k) % 8));
}

/* one pack of vcnt entries from entry p on (unit bytes per entry) at out; *nextblk is
 * the block of the next pcluster (non-big pclusters: one block per extent) */
static void put_pack(uint8_t *out, const uint8_t *full, uint32_t n, uint32_t p, uint32_t vcnt,
                     uint32_t unit, int big, uint32_t *nextblk)
{
    uint32_t encodebits = (vcnt * unit * 8 - 32) / vcnt;
    uint32_t base = 0, sub = 0;
    int have_base = 0;
    if (!big)
        base = *nextblk - 1;     /* the reader adds 1 + the heads before in the pack */
    for (uint32_t k = 0; k < vcnt; k++) {
        uint32_t i = p + k;
        if (i >= n)
            break;               /* padding entries stay zero */
        struct lent e = get_entry(full, i);
        uint32_t lo;
        if (e.type == Z_EROFS_LCLUSTER_TYPE_NONHEAD) {
            if (e.d0 & Z_EROFS_LI_D0_CBLKCNT) {
                lo = e.d0;
                if (!have_base)
                    sub = e.d0 & ~Z_EROFS_LI_D0_CBLKCNT;
            } else if (k + 1 == vcnt) {
                lo = e.d1 < Z_EROFS_LI_D0_CBLKCNT ? e.d1 : Z_EROFS_LI_D0_CBLKCNT - 1;
            } else {
                lo = e.d0;
            }
        } else {
            lo = e.clusterofs;
            if (!big) {
                *nextblk += 1;
            } else if (!have_base && e.blkaddr) {
                /* the reader counts the blocks of the extent before the first head
                 * when its block count entry is in this pack */
                base = e.blkaddr - sub;
                have_base = 1;
            }
            if (big && e.blkaddr)
                *nextblk = e.blkaddr;
        }
        put_bits(out, k * encodebits, e.type << LOBITS | lo, encodebits);
    }
    if (big && !have_base)
        base = *nextblk;
    uint32_t le = htole32(base);
    memcpy(out + vcnt * unit - 4, &le, 4);
}

uint8_t *zindex_compact(const uint8_t *full, uint32_t full_len, uint32_t mpos, int big,
                        uint32_t *len)
{
    uint32_t n = (full_len - Z_INDEX_START) / (uint32_t)sizeof(struct z_erofs_lcluster_index);
    uint32_t init4 = (32 - mpos % 32) / 4;
    if (init4 == 8)
        init4 = 0;
    uint32_t n2b, end4;
    if (init4 > n) {
        init4 = n2b = 0;
        end4 = n;
    } else {
        n2b = (n - init4) / 16 * 16;
        end4 = n - init4 - n2b;
    }
    *len = (uint32_t)sizeof(struct z_erofs_map_header) + init4 * 4 + n2b * 2 +
           (end4 + 1) / 2 * 8;
    uint8_t *out = calloc(1, *len);
    if (!out)
        return NULL;
    struct z_erofs_map_header h;
    memcpy(&h, full, sizeof(h));
    uint16_t advise = le16toh(h.h_advise) | Z_EROFS_ADVISE_COMPACTED_2B;
    if (big)
        advise |= Z_EROFS_ADVISE_BIG_PCLUSTER_1 | Z_EROFS_ADVISE_BIG_PCLUSTER_2;
    h.h_advise = htole16(advise);
    memcpy(out, &h, sizeof(h));
    uint8_t *o = out + sizeof(h);
    uint32_t nextblk = n ? get_entry(full, 0).blkaddr : 0;
    uint32_t p = 0;
    for (; p < init4; p += 2, o += 8)
        put_pack(o, full, n, p, 2, 4, big, &nextblk);
    for (uint32_t e = p + n2b; p < e; p += 16, o += 32)
        put_pack(o, full, n, p, 16, 2, big, &nextblk);
    for (; p < n; p += 2, o += 8)
        put_pack(o, full, n, p, 2, 4, big, &nextblk);
    return out;
}

int zfile_gather(struct zfile *acc, struct zfile *seg)
{
    if (acc->next + seg->next > acc->cap_ext) {
        uint32_t nc = acc->cap_ext ? acc->cap_ext * 2 : 16;
        while (nc < acc->next + seg->next)
            nc *= 2;
        struct zext *p = realloc(acc->ext, (size_t)nc * sizeof(*p));
        if (!p)
            return ERN_ENOMEM;
        acc->ext = p;
        acc->cap_ext = nc;
    }
    for (uint32_t k = 0; k < seg->next; k++) {
        acc->ext[acc->next] = seg->ext[k];
        acc->ext[acc->next++].pblk += acc->nblocks;
    }
    acc->size = seg->size;
    acc->nblocks += seg->nblocks;
    acc->wblocks += seg->wblocks;
    acc->refs += seg->refs;
    if (seg->idata) {
        acc->idata = seg->idata;
        acc->idata_len = seg->idata_len;
        seg->idata = NULL;
    }
    if (seg->frag) {
        acc->frag = seg->frag;
        acc->frag_len = seg->frag_len;
        seg->frag = NULL;
    }
    return 0;
}

int zfile_plain(const struct zfile *zf, uint32_t bs)
{
    uint64_t nlc = (zf->size + bs - 1) / bs;
    return !zf->frag && !zf->frag_src &&
           (uint64_t)zf->nblocks * bs + Z_INDEX_START + nlc * 8 + zf->idata_len >= zf->size;
}

/* the 48-bit layout: a file's extents as records (struct z_erofs_extent) from its full
 * index, as mkfs.erofs 1.9 lists them: 16 bytes each (32 for files over 4 GiB) with their
 * own file and pcluster offsets, or, when every extent but the last takes 2^k bytes of
 * input, one record per lcluster of 2^k bytes: 4 bytes (the pcluster lengths only) when
 * the pclusters lie back to back from a le64 offset written first, else 8 (length and
 * 32-bit offset). NULL (*len 0) when the records would not be smaller than the full
 * index (the caller keeps the lcluster indexes), or the file has an inline tail or is one
 * fragment; out of memory: NULL, *len 1. hend: the inode's and its xattrs' bytes (the
 * records start at the first multiple of their size after the map header). */
uint8_t *zindex_extents(const uint8_t *full, uint32_t full_len, uint64_t size, uint32_t hend,
                        uint32_t blkszbits, uint32_t *len)
{
    const uint32_t n_lc = (full_len - Z_INDEX_START) / (uint32_t)sizeof(struct z_erofs_lcluster_index);
    struct z_erofs_map_header h;
    *len = 0;
    memcpy(&h, full, sizeof(h));
    if (full[7] >> Z_EROFS_FRAGMENT_INODE_BIT || full_len < Z_INDEX_START + 8 || !size)
        return NULL;
    uint16_t adv = le16toh(h.h_advise);
    if (adv & Z_EROFS_ADVISE_INLINE_PCLUSTER)
        return NULL;
    const int big = !!(adv & Z_EROFS_ADVISE_BIG_PCLUSTER_1);
    const int frag = !!(adv & Z_EROFS_ADVISE_FRAGMENT_PCLUSTER);
    uint32_t fraglo;
    memcpy(&fraglo, full, 4);
    fraglo = le32toh(fraglo);
    /* the heads: file offset, pcluster offset and length, plen's flag bits */
    struct xrec { uint64_t la, pa; uint32_t plen; } *r = malloc((size_t)n_lc * sizeof(*r));
    if (!r) {
        *len = 1;
        return NULL;
    }
    uint32_t n = 0;
    for (uint32_t i = 0; i < n_lc; i++) {
        struct lent e = get_entry(full, i);
        if (e.type == Z_EROFS_LCLUSTER_TYPE_NONHEAD)
            continue;
        uint64_t la = ((uint64_t)i << blkszbits) + e.clusterofs;
        if (la >= size)
            break;
        uint32_t nblk = 1;
        if (big && i + 1 < n_lc) {
            struct lent nx = get_entry(full, i + 1);
            if (nx.type == Z_EROFS_LCLUSTER_TYPE_NONHEAD && nx.d0 & Z_EROFS_LI_D0_CBLKCNT)
                nblk = nx.d0 & ~Z_EROFS_LI_D0_CBLKCNT;
        }
        uint16_t di_adv;
        memcpy(&di_adv, full + Z_INDEX_START + (size_t)i * 8, 2);
        uint32_t fmt = e.type == Z_EROFS_LCLUSTER_TYPE_PLAIN ? 0
                     : (uint32_t)(e.type == Z_EROFS_LCLUSTER_TYPE_HEAD1 ? h.h_algorithmtype & 15u
                                                                        : h.h_algorithmtype >> 4) + 1;
        r[n].la = la;
        r[n].pa = (uint64_t)e.blkaddr << blkszbits;
        r[n].plen = (nblk << blkszbits) | fmt << Z_EROFS_EXTENT_PLEN_FMT_BIT |
                    (le16toh(di_adv) & Z_EROFS_LI_PARTIAL_REF ? Z_EROFS_EXTENT_PLEN_PARTIAL : 0);
        n++;
    }
    if (!n || r[0].la) {
        free(r);
        return NULL;
    }
    if (frag) {      /* the last extent: the fragment's offset, high bits in its head */
        r[n - 1].plen = fraglo;
        r[n - 1].pa >>= blkszbits;
    }
    /* mkfs.erofs's choice: lcluster records when the extents but the last take 2^k
     * bytes (k from the first, at least the block bits), 4 bytes when back to back */
    uint64_t len0 = (n > 1 ? r[1].la : size) - r[0].la;
    uint32_t lcb = blkszbits;
    while (lcb < 63 && (1ull << lcb) < len0)
        lcb++;
    int contig = 1, hi = 0;
    uint64_t pend = r[0].pa;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t el = (i + 1 < n ? r[i + 1].la : size) - r[i].la;
        int isfrag = frag && i + 1 == n;
        hi |= !isfrag && r[i].pa > UINT32_MAX;
        if (!isfrag) {
            if (contig && pend == r[i].pa)
                pend += r[i].plen & Z_EROFS_EXTENT_PLEN_MASK;
            else
                contig = 0;
        }
        if (el != 1ull << lcb && (i + 1 < n || el > 1ull << lcb))
            lcb = 0;
    }
    uint32_t recsz = size > UINT32_MAX ? 32 : 16;
    if (lcb && lcb - blkszbits <= 15) {
        if (contig)
            recsz = 4;
        else if (recsz <= 16 && !hi)
            recsz = 8;
    }
    uint32_t hstart = (uint32_t)align_up(hend, 8);
    uint32_t moff = (uint32_t)align_up(hstart + 8, recsz) - hstart;
    uint64_t msz = moff + (uint64_t)recsz * n + (recsz <= 4 ? 8 : 0);
    if (msz > full_len) {
        free(r);
        return NULL;
    }
    uint8_t *out = calloc(1, msz);
    if (!out) {
        free(r);
        *len = 1;
        return NULL;
    }
    uint16_t nadv = (uint16_t)((adv & (Z_EROFS_ADVISE_FRAGMENT_PCLUSTER)) | Z_EROFS_ADVISE_EXTENTS |
                               (uint32_t)(recsz == 4 ? 0 : recsz == 8 ? 1 : recsz == 16 ? 2 : 3)
                                   << Z_EROFS_ADVISE_EXTRECSZ_BIT);
    uint8_t hb[8] = {0};
    uint16_t le16 = htole16(nadv);
    memcpy(hb + 4, &le16, 2);
    if (recsz > 8) {
        uint32_t lo = htole32(n);
        memcpy(hb, &lo, 4);
    } else {
        hb[7] = (uint8_t)(lcb - blkszbits);
    }
    memcpy(out, hb, 8);
    uint8_t *o = out + moff;
    if (recsz == 4) {
        uint64_t p0 = htole64(r[0].pa);
        memcpy(o, &p0, 8);
        o += 8;
    }
    for (uint32_t i = 0; i < n; i++, o += recsz) {
        struct z_erofs_extent x;
        memset(&x, 0, sizeof(x));
        x.plen = htole32(r[i].plen);
        x.pstart_lo = htole32((uint32_t)r[i].pa);
        x.pstart_hi = htole32((uint32_t)(r[i].pa >> 32));
        x.lstart_lo = htole32((uint32_t)r[i].la);
        x.lstart_hi = htole32((uint32_t)(r[i].la >> 32));
        memcpy(o, &x, recsz);
    }
    free(r);
    *len = (uint32_t)msz;
    return out;
}
