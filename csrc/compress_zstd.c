/* erofs-tools C core, compression: Zstandard (libzstd), EROFS algorithm 3 (Linux 6.10+).
 * libzstd has no fixed-output mode: the largest input prefix that fits a pcluster is
 * searched (compress.c). The window is the configured dictionary size, which the
 * superblock's zstd record announces to the reader. */
/* ZSTD_c_literalCompressionMode is in the experimental section: libzstd has taken it
 * through setParameter since 1.4.5 (a version without it refuses it: an error here) */
#define ZSTD_STATIC_LINKING_ONLY
#include <zstd.h>
#include <zstd_errors.h>
#include "compress_int.h"

static uint32_t log2u(uint32_t v)
{
    uint32_t r = 0;
    while (v >>= 1)
        r++;
    return r;
}

static int zstd_init(struct zctx *c)
{
    ZSTD_CCtx *cc = ZSTD_createCCtx();
    if (!cc) {
        snprintf(c->err, sizeof(c->err), "out of memory");
        return ERN_ENOMEM;
    }
    c->priv = cc;
    size_t r = ZSTD_CCtx_setParameter(cc, ZSTD_c_compressionLevel, c->zc->level);
    if (!ZSTD_isError(r))
        r = ZSTD_CCtx_setParameter(cc, ZSTD_c_windowLog, (int)log2u(c->zc->dict_size));
    if (!ZSTD_isError(r))
        r = ZSTD_CCtx_setParameter(cc, ZSTD_c_checksumFlag, 0);
    if (!ZSTD_isError(r) && c->zc->level == 0)
        r = ZSTD_CCtx_setParameter(cc, ZSTD_c_literalCompressionMode, ZSTD_ps_disable);
    if (ZSTD_isError(r)) {
        snprintf(c->err, sizeof(c->err), "%s", ZSTD_getErrorName(r));
        return ERN_EINVAL;
    }
    return 0;
}

static long zstd_trial(struct zctx *c, const uint8_t *src, uint32_t n, uint8_t *out,
                       uint32_t cap)
{
    size_t r = ZSTD_compress2(c->priv, out, cap, src, n);
    if (ZSTD_isError(r)) {
        if (ZSTD_getErrorCode(r) == ZSTD_error_dstSize_tooSmall)
            return 0;
        snprintf(c->err, sizeof(c->err), "%s", ZSTD_getErrorName(r));
        return ERN_EIO;
    }
    return (long)r;
}

static long zstd_destsize(struct zctx *c, const uint8_t *src, uint32_t *srclen, uint8_t *dst,
                          uint32_t dstcap)
{
    return zsearch_destsize(c, src, srclen, dst, dstcap, zstd_trial);
}

static void zstd_fini(struct zctx *c)
{
    ZSTD_freeCCtx(c->priv);
    c->priv = NULL;
}

const struct zalg zalg_zstd = {
    .name = "zstd", .id = Z_EROFS_COMPRESSION_ZSTD, .has_level = 1,
    /* -z zstd without a level: 0, libzstd's default (level 3), with its literals stored
     * rather than Huffman-coded (zstd_init). The kernel decodes each 4 KiB pcluster as a
     * frame of its own, and a frame's Huffman table and literal decoding cost its read
     * more (on /usr/share ~20 % more zstd CPU) than the few percent of image they save;
     * mkfs.erofs 1.9's -z zstd also writes raw literals (it runs libzstd at level -1),
     * here with level 3's matches, so fewer pclusters. An explicit level (1..22) is
     * plain libzstd at that level. */
    .min_level = 1, .max_level = 22, .default_level = 0,
    .init = zstd_init, .destsize = zstd_destsize, .fini = zstd_fini,
};
