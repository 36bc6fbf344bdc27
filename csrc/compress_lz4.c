/* erofs-tools C core, compression: LZ4 and LZ4HC (liblz4), both EROFS algorithm 0.
 * liblz4 has the fixed-output call EROFS needs (destSize). Each pcluster starts a new
 * HC stream, so no history carries from one pcluster to the next: the fast reset
 * (LZ4_resetStreamHC_fast) moves the stream's index window past everything its tables
 * hold, which then can never match, so the output is the one of a fresh state; a full
 * reset (LZ4_compress_HC_destSize's) clears 256 KiB of tables for every pcluster, 3 %
 * of an lz4hc build's CPU. A stream left in doubt by a failed call is cleared (liblz4
 * marks it dirty). */
#include <lz4.h>
#include <lz4hc.h>
#include "compress_int.h"

static int lz4_init(struct zctx *c)
{
    (void)c;
    return 0;
}

static long lz4_destsize(struct zctx *c, const uint8_t *src, uint32_t *srclen, uint8_t *dst,
                         uint32_t dstcap)
{
    (void)c;
    int n = (int)*srclen;
    int r = LZ4_compress_destSize((const char *)src, (char *)dst, &n, (int)dstcap);
    if (r <= 0)
        return 0;
    *srclen = (uint32_t)n;
    return r;
}

static int lz4hc_init(struct zctx *c)
{
    c->priv = LZ4_createStreamHC();
    if (!c->priv) {
        snprintf(c->err, sizeof(c->err), "out of memory");
        return ERN_ENOMEM;
    }
    return 0;
}

static long lz4hc_destsize(struct zctx *c, const uint8_t *src, uint32_t *srclen, uint8_t *dst,
                           uint32_t dstcap)
{
    int n = (int)*srclen;
    LZ4_resetStreamHC_fast(c->priv, c->zc->level);
    int r = LZ4_compress_HC_continue_destSize(c->priv, (const char *)src, (char *)dst, &n,
                                              (int)dstcap);
    if (r <= 0)
        return 0;
    *srclen = (uint32_t)n;
    return r;
}

static void lz4hc_fini(struct zctx *c)
{
    if (c->priv)
        LZ4_freeStreamHC(c->priv);
    c->priv = NULL;
}

const struct zalg zalg_lz4 = {
    .name = "lz4", .id = Z_EROFS_COMPRESSION_LZ4, .has_level = 0,
    .init = lz4_init, .destsize = lz4_destsize,
};

const struct zalg zalg_lz4hc = {
    .name = "lz4hc", .id = Z_EROFS_COMPRESSION_LZ4, .has_level = 1,
    .min_level = 0, .max_level = LZ4HC_CLEVEL_MAX, .default_level = LZ4HC_CLEVEL_DEFAULT,
    .init = lz4hc_init, .destsize = lz4hc_destsize, .fini = lz4hc_fini,
};
