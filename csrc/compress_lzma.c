/* erofs-tools C core, compression: MicroLZMA (liblzma), EROFS algorithm 1. liblzma's
 * MicroLZMA encoder stops when its output buffer is full and reports the input it
 * took: the fixed-output mode EROFS needs. Levels 0-9 are xz presets, 100-109 the same
 * presets with the "extreme" flag (as mkfs.erofs). */
#include <lzma.h>
#include "compress_int.h"

struct lzma_state {
    lzma_stream strm;
    lzma_options_lzma opt;
};

static int lzma_init(struct zctx *c)
{
    struct lzma_state *s = calloc(1, sizeof(*s));
    if (!s) {
        snprintf(c->err, sizeof(c->err), "out of memory");
        return ERN_ENOMEM;
    }
    c->priv = s;
    s->strm = (lzma_stream)LZMA_STREAM_INIT;
    int level = c->zc->level;
    uint32_t preset = level >= 100 ? (uint32_t)(level - 100) | LZMA_PRESET_EXTREME
                                   : (uint32_t)level;
    if (lzma_lzma_preset(&s->opt, preset)) {
        snprintf(c->err, sizeof(c->err), "bad preset %d", level);
        return ERN_EINVAL;
    }
    s->opt.dict_size = c->zc->dict_size;
    if (c->zc->lc >= 0)
        s->opt.lc = (uint32_t)c->zc->lc;
    if (c->zc->lp >= 0)
        s->opt.lp = (uint32_t)c->zc->lp;
    if (c->zc->pb >= 0)
        s->opt.pb = (uint32_t)c->zc->pb;
    return 0;
}

static long lzma_destsize(struct zctx *c, const uint8_t *src, uint32_t *srclen, uint8_t *dst,
                          uint32_t dstcap)
{
    struct lzma_state *s = c->priv;
    lzma_ret r = lzma_microlzma_encoder(&s->strm, &s->opt);
    if (r != LZMA_OK) {
        snprintf(c->err, sizeof(c->err), "encoder setup failed (%d)", (int)r);
        return ERN_EIO;
    }
    s->strm.next_in = src;
    s->strm.avail_in = *srclen;
    s->strm.next_out = dst;
    s->strm.avail_out = dstcap;
    r = lzma_code(&s->strm, LZMA_FINISH);
    if (r != LZMA_STREAM_END) {
        snprintf(c->err, sizeof(c->err), "encoder failed (%d)", (int)r);
        return ERN_EIO;
    }
    *srclen = (uint32_t)s->strm.total_in;
    return (long)s->strm.total_out;
}

static void lzma_fini(struct zctx *c)
{
    struct lzma_state *s = c->priv;
    if (s) {
        lzma_end(&s->strm);
        free(s);
    }
    c->priv = NULL;
}

const struct zalg zalg_lzma = {
    .name = "lzma", .id = Z_EROFS_COMPRESSION_LZMA, .has_level = 1,
    .min_level = 0, .max_level = 109, .default_level = 6,
    .init = lzma_init, .destsize = lzma_destsize, .fini = lzma_fini,
};
