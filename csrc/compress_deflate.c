/* erofs-tools C core, compression: raw DEFLATE (libdeflate), EROFS algorithm 2 (Linux
 * 6.6+). libdeflate compresses whole buffers only, so the input prefix that fits a
 * pcluster is searched (compress.c). */
#include <libdeflate.h>
#include "compress_int.h"

static int deflate_init(struct zctx *c)
{
    c->priv = libdeflate_alloc_compressor(c->zc->level);
    if (!c->priv) {
        snprintf(c->err, sizeof(c->err), "cannot set up level %d", c->zc->level);
        return ERN_EINVAL;
    }
    return 0;
}

static long deflate_trial(struct zctx *c, const uint8_t *src, uint32_t n, uint8_t *out,
                          uint32_t cap)
{
    size_t r = libdeflate_deflate_compress(c->priv, src, n, out, cap);
    /* The reader finds the start of the compressed bytes by skipping the pcluster's
     * leading zeros, so the stream must not start with a zero byte. Only a first stored
     * block that is not the last one does (BFINAL 0, BTYPE 00, then padding bits to the
     * byte end): setting one of those padding bits, which decoders ignore, fixes it. */
    if (r && out[0] == 0)
        out[0] = 0x08;
    return (long)r;
}

static long deflate_destsize(struct zctx *c, const uint8_t *src, uint32_t *srclen,
                             uint8_t *dst, uint32_t dstcap)
{
    return zsearch_destsize(c, src, srclen, dst, dstcap, deflate_trial);
}

static void deflate_fini(struct zctx *c)
{
    if (c->priv)
        libdeflate_free_compressor(c->priv);
    c->priv = NULL;
}

const struct zalg zalg_deflate = {
    .name = "deflate", .id = Z_EROFS_COMPRESSION_DEFLATE, .has_level = 1,
    .min_level = 1, .max_level = 12, .default_level = 1,
    .init = deflate_init, .destsize = deflate_destsize, .fini = deflate_fini,
};
