/* erofs-tools C core, compression settings: the -z list checked (levels, dictionary
 * sizes, lzma's lc/lp/pb), each algorithm's window, and the image-wide parts: feature
 * bits, the available-algorithms mask and the configuration records written after the
 * superblock (one per algorithm, the widest window of its -z entries, as mkfs.erofs).
 * The per-file compressor is compress.c. */
#include "compress_int.h"

const struct zalg *zalg_by_id(int32_t which)
{
    switch (which) {
    case ERN_Z_LZ4: return &zalg_lz4;
    case ERN_Z_LZ4HC: return &zalg_lz4hc;
    case ERN_Z_ZSTD: return &zalg_zstd;
    case ERN_Z_LZMA: return &zalg_lzma;
    case ERN_Z_DEFLATE: return &zalg_deflate;
    default: return NULL;
    }
}

static uint32_t log2_floor(uint32_t v)
{
    uint32_t r = 0;
    while (v >>= 1)
        r++;
    return r;
}

/* append one configuration record: le16 length, then the record */
static void put_cfg(struct zconf *zc, const void *rec, uint16_t len)
{
    uint16_t le = cpu_to_le16(len);
    memcpy(zc->cfgs + zc->cfgs_len, &le, 2);
    memcpy(zc->cfgs + zc->cfgs_len + 2, rec, len);
    zc->cfgs_len += 2u + len;
}

/* the dictionary size `d` (dictsize=) asked of algorithm a, checked: 0 if a has none */
static int dict_conf(erofs_builder *b, const struct zalg *a, uint32_t d)
{
    switch (a->id) {
    case Z_EROFS_COMPRESSION_LZMA:
        /* as mkfs.erofs: the kernel refuses a larger record, liblzma a smaller window */
        if (d < 4096 || d > Z_EROFS_LZMA_MAX_DICT_SIZE)
            return fail(b, ERN_EINVAL, "lzma dictionary size %u is not in 4096..%u", d,
                        Z_EROFS_LZMA_MAX_DICT_SIZE);
        return 0;
    case Z_EROFS_COMPRESSION_ZSTD:
        /* the record holds log2(window) - 10, and zstd's smallest window is 1 KiB */
        if (d < 1024 || d > Z_EROFS_ZSTD_MAX_DICT_SIZE || (d & (d - 1)))
            return fail(b, ERN_EINVAL, "zstd dictionary size %u is not a power of two in "
                        "1024..%u", d, Z_EROFS_ZSTD_MAX_DICT_SIZE);
        return 0;
    case Z_EROFS_COMPRESSION_DEFLATE:
        /* libdeflate always looks back over the whole 32 KiB window, and the record
         * must not promise a smaller one than the streams use */
        if (d != Z_EROFS_DEFLATE_MAX_DICT_SIZE)
            return fail(b, ERN_EINVAL, "deflate dictionary size %u: only %u (libdeflate's "
                        "window) is supported", d, Z_EROFS_DEFLATE_MAX_DICT_SIZE);
        return 0;
    }
    return fail(b, ERN_EINVAL, "%s takes no dictionary size", a->name);
}

/* lzma's lc= / lp= / pb= (-1: the preset's), checked as liblzma and the kernel's
 * MicroLZMA decoder take them */
static int lzma_props_conf(erofs_builder *b, const struct zalg *a, int lc, int lp, int pb)
{
    if (lc < 0 && lp < 0 && pb < 0)
        return 0;
    if (a->id != Z_EROFS_COMPRESSION_LZMA)
        return fail(b, ERN_EINVAL, "%s takes no lc, lp or pb (lzma only)", a->name);
    /* every xz preset has lc 3, lp 0 and pb 2: what an unset one stays at */
    int elc = lc < 0 ? 3 : lc, elp = lp < 0 ? 0 : lp, epb = pb < 0 ? 2 : pb;
    if (elc > 4 || elp > 4 || epb > 4 || elc + elp > 4)
        return fail(b, ERN_EINVAL, "lzma lc=%d lp=%d pb=%d: each at most 4, lc + lp at "
                    "most 4", elc, elp, epb);
    return 0;
}

/* one algorithm of the -z list: its level checked, its window dict (dictsize=) or the
 * default from the largest pcluster of the image, lzma's lc/lp/pb */
static int alg_conf(erofs_builder *b, struct zconf *zc, int32_t which, int32_t level,
                    uint32_t dict, const int8_t props[3], uint32_t max_ps)
{
    const struct zalg *a = zalg_by_id(which);
    if (!a)
        return fail(b, ERN_EINVAL, "unknown compressor %d", which);
    if (level < 0) {
        level = a->default_level;
    } else if (!a->has_level) {
        return fail(b, ERN_EINVAL, "%s takes no compression level", a->name);
    } else if (a->id == Z_EROFS_COMPRESSION_LZMA && level > 9 && level < 100) {
        /* xz presets 0-9, and 100-109 for the same with the extreme flag */
        return fail(b, ERN_EINVAL, "lzma compression level %d is not in 0..9 or 100..109",
                    level);
    } else if (level < a->min_level || level > a->max_level) {
        return fail(b, ERN_EINVAL, "%s compression level %d is not in %d..%d", a->name,
                    level, a->min_level, a->max_level);
    }
    int r;
    if (dict && (r = dict_conf(b, a, dict)))
        return r;
    if ((r = lzma_props_conf(b, a, props[0], props[1], props[2])))
        return r;
    zc->alg = a;
    zc->level = level;
    zc->lc = props[0];
    zc->lp = props[1];
    zc->pb = props[2];
    uint32_t d = 0;
    switch (a->id) {
    case Z_EROFS_COMPRESSION_LZMA:
        d = max_ps << 2 < Z_EROFS_LZMA_MAX_DICT_SIZE ? max_ps << 2
                                                     : Z_EROFS_LZMA_MAX_DICT_SIZE;
        d = d < 32768 ? 32768 : d;
        break;
    case Z_EROFS_COMPRESSION_DEFLATE:
        d = Z_EROFS_DEFLATE_MAX_DICT_SIZE;
        break;
    case Z_EROFS_COMPRESSION_ZSTD:
        d = max_ps << 3 < Z_EROFS_ZSTD_MAX_DICT_SIZE ? max_ps << 3
                                                     : Z_EROFS_ZSTD_MAX_DICT_SIZE;
        d = 1u << log2_floor(d);
        break;
    }
    zc->dict_size = dict ? dict : d;
    return 0;
}

/* the configuration record of algorithm a (le16 length, then the record) */
static void put_alg_record(struct zconf *zc, const struct zconf *a, uint32_t max_pclusterblks)
{
    switch (a->alg->id) {
    case Z_EROFS_COMPRESSION_LZ4: {
        struct z_erofs_lz4_cfgs r;
        memset(&r, 0, sizeof(r));
        r.max_distance = cpu_to_le16(65535);
        r.max_pclusterblks = cpu_to_le16(max_pclusterblks);
        put_cfg(zc, &r, sizeof(r));
        break;
    }
    case Z_EROFS_COMPRESSION_LZMA: {
        struct z_erofs_lzma_cfgs r;
        memset(&r, 0, sizeof(r));
        r.dict_size = cpu_to_le32(a->dict_size);
        put_cfg(zc, &r, sizeof(r));
        break;
    }
    case Z_EROFS_COMPRESSION_DEFLATE: {
        struct z_erofs_deflate_cfgs r;
        memset(&r, 0, sizeof(r));
        r.windowbits = (uint8_t)log2_floor(a->dict_size);
        put_cfg(zc, &r, sizeof(r));
        break;
    }
    case Z_EROFS_COMPRESSION_ZSTD: {
        struct z_erofs_zstd_cfgs r;
        memset(&r, 0, sizeof(r));
        r.windowlog = (uint8_t)(log2_floor(a->dict_size) - 10);
        put_cfg(zc, &r, sizeof(r));
        break;
    }
    }
}

/* zc: ZALG_MAX entries, one per algorithm of the -z list (zc[0] also holds the
 * image-wide settings and records; the others are copies with their own algorithm) */
int zconf_setup(erofs_builder *b, struct zconf *zc)
{
    memset(zc, 0, sizeof(*zc) * ZALG_MAX);
    if (!b->o.stream_data)
        return fail(b, ERN_EINVAL, "compression needs stream mode");
    uint32_t blksz = b->blksz;
    uint32_t ps = b->o.pcluster_size ? b->o.pcluster_size : blksz;
    uint32_t max_ps = b->o.pcluster_max > ps ? b->o.pcluster_max : ps;
    if (ps % blksz || max_ps % blksz || max_ps > Z_EROFS_PCLUSTER_MAX_SIZE)
        return fail(b, ERN_EINVAL, "pcluster size %u is not a multiple of the block size "
                    "%u up to %u", max_ps % blksz ? max_ps : ps, blksz,
                    Z_EROFS_PCLUSTER_MAX_SIZE);
    int32_t ids[ZALG_MAX] = { b->o.compress_alg, b->o.compress_alt_alg[0],
                              b->o.compress_alt_alg[1], b->o.compress_alt_alg[2] };
    int32_t levels[ZALG_MAX] = { b->o.compress_level, b->o.compress_alt_level[0],
                                 b->o.compress_alt_level[1], b->o.compress_alt_level[2] };
    uint32_t nalgs = 1;
    while (nalgs < ZALG_MAX && ids[nalgs])
        nalgs++;
    int r;
    for (uint32_t k = 0; k < nalgs; k++)
        if ((r = alg_conf(b, &zc[k], ids[k], levels[k], b->o.compress_dict_size[k],
                          (const int8_t[3]){ b->o.compress_lzma_lc[k], b->o.compress_lzma_lp[k],
                                             b->o.compress_lzma_pb[k] }, max_ps)))
            return r;
    zc->nalgs = nalgs;
    zc->pclustersize = ps;
    zc->max_ps = max_ps;
    zc->max_ext = b->o.max_extent;
    if (zc->max_ext && zc->max_ext < blksz)
        return fail(b, ERN_EINVAL, "maximum compressed extent size %u is under the block "
                    "size %u", zc->max_ext, blksz);
    zc->ztail = b->o.ztailpacking != 0;
    zc->frags = b->o.fragments || b->o.all_fragments;
    zc->allfrags = b->o.all_fragments != 0;
    zc->fragdedupe = b->o.fragdedupe;
    /* as mkfs.erofs 1.9, whose fragments mode shares identical pclusters too */
    zc->dedupe = b->o.dedupe || zc->frags;
    zc->roll = b->o.dedupe != 0;
    zc->packed_ps = b->o.packed_pcluster_size ? b->o.packed_pcluster_size : ps;
    if (zc->packed_ps % blksz || zc->packed_ps > max_ps)
        return fail(b, ERN_EINVAL, "packed file pcluster size %u is not a multiple of the "
                    "block size %u up to the pcluster size %u", zc->packed_ps, blksz, max_ps);
    zc->pclusterblks = ps / blksz;
    zc->big = max_ps > blksz;
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    zc->threads = b->o.compress_threads ? b->o.compress_threads : (n > 0 ? (uint32_t)n : 1);
    if (zc->threads > 64)
        zc->threads = 64;

    /* records for each algorithm used, in algorithm order (sb.u1 is their bit mask) */
    uint32_t mask = 0;
    for (uint32_t k = 0; k < nalgs; k++)
        mask |= 1u << zc[k].alg->id;
    int cfgs = mask != 1u << Z_EROFS_COMPRESSION_LZ4 || zc->big;
    zc->incompat = EROFS_FEATURE_INCOMPAT_ZERO_PADDING |
                   (cfgs ? EROFS_FEATURE_INCOMPAT_COMPR_CFGS : 0) |
                   (zc->big ? EROFS_FEATURE_INCOMPAT_BIG_PCLUSTER : 0);
    for (int id = 0; cfgs && id < 16; id++) {
        /* one record per algorithm: the largest window any of its -z entries uses, so
         * the kernel's decoder is big enough for every one of them (as mkfs.erofs) */
        struct zconf widest = { 0 };
        for (uint32_t k = 0; k < nalgs; k++)
            if (zc[k].alg->id == id && (!widest.alg || zc[k].dict_size > widest.dict_size))
                widest = zc[k];
        if (widest.alg)
            put_alg_record(zc, &widest, max_ps / blksz);
    }
    zc->sb_u1 = cfgs ? (uint16_t)mask : 65535;
    /* a device table asked for right after the superblock (mkfs --tar=i) follows the
     * records, as mkfs.erofs puts it */
    uint64_t rec_end = sb_end(b) + zc->cfgs_len;
    if (b->o.devt_slotoff && (uint64_t)b->o.devt_slotoff * EROFS_DEVT_SLOT_SIZE < rec_end)
        b->o.devt_slotoff = (uint32_t)(align_up(rec_end, EROFS_DEVT_SLOT_SIZE) /
                                       EROFS_DEVT_SLOT_SIZE);
    /* the others: the image-wide settings with their own algorithm */
    for (uint32_t k = 1; k < nalgs; k++) {
        struct zconf own = zc[k];
        zc[k] = zc[0];
        zc[k].alg = own.alg;
        zc[k].level = own.level;
        zc[k].dict_size = own.dict_size;
        zc[k].lc = own.lc;
        zc[k].lp = own.lp;
        zc[k].pb = own.pb;
    }
    /* try each algorithm once here, so a missing feature fails before any work */
    for (uint32_t k = 0; k < nalgs; k++) {
        struct zctx c;
        if (zctx_init(&c, &zc[k])) {
            r = fail(b, ERN_EINVAL, "%s: %s", zc[k].alg->name, c.err);
            zctx_fini(&c);
            return r;
        }
        zctx_fini(&c);
    }
    return 0;
}

uint32_t zconf_incompat(const erofs_builder *b)
{
    return b->zc ? b->zc->incompat : 0;
}

uint16_t zconf_sb_u1(const erofs_builder *b)
{
    return b->zc ? b->zc->sb_u1 : 0;
}

const uint8_t *zconf_cfgs(const erofs_builder *b, uint32_t *len)
{
    *len = b->zc ? b->zc->cfgs_len : 0;
    return b->zc ? b->zc->cfgs : NULL;
}
