/* zran: random access into gzip streams (the technique of zlib's examples/zran.c).
 *
 * Index building inflates a gzip stream once, fed in pieces, with Z_BLOCK so inflate()
 * returns at every deflate block boundary; at a boundary at least `span` bytes of output
 * after the previous access point it records a new one: the compressed offset of the next
 * whole input byte, the 0..7 bits of the byte before it that the next block still needs,
 * the uncompressed offset and the 32 KiB window (inflateGetDictionary). Extraction starts a
 * raw inflater at a point: inflatePrime() feeds those bits, inflateSetDictionary() the
 * window, then the compressed bytes from the point on; a gzip member boundary met on the
 * way is crossed by letting zlib parse the next member (header, data, trailer) itself.
 *
 * No callbacks into Python: cffi's API mode releases the GIL around these calls.
 */
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "erofs_native.h"

#define WINDOW 32768u
#define GZIP_BITS 31      /* windowBits: gzip wrapper only */
#define RAW_BITS (-15)    /* windowBits: raw deflate */
#define DT_BLOCK_END 128  /* data_type: returned at a block boundary or after the header */
#define DT_LAST 64        /* data_type: the current block is the member's last */

struct ern_zran_builder {
    z_stream strm;
    uint64_t span;
    uint64_t total_in;
    uint64_t total_out;
    uint64_t last_point_out;
    uint32_t npoints;
    int member_done;      /* the current member's trailer was read */
    int padding;          /* zero bytes after the last member (tar writers pad) */
    int have_pending;
    uint8_t last_byte;    /* the last input byte consumed by an earlier feed call */
    struct ern_zran_point pending;
};

ern_zran_builder *ern_zran_builder_new(uint64_t span)
{
    ern_zran_builder *z = calloc(1, sizeof(*z));
    if (!z)
        return NULL;
    z->span = span ? span : 1;
    if (inflateInit2(&z->strm, GZIP_BITS) != Z_OK) {
        free(z);
        return NULL;
    }
    return z;
}

void ern_zran_builder_free(ern_zran_builder *z)
{
    if (!z)
        return;
    inflateEnd(&z->strm);
    free(z);
}

static void record_point(ern_zran_builder *z, const uint8_t *in, size_t used)
{
    struct ern_zran_point *p = &z->pending;
    unsigned bits = (unsigned)z->strm.data_type & 7;
    uInt len = 0;

    p->in_offset = z->total_in;
    p->out_offset = z->total_out;
    p->bits = (uint8_t)bits;
    /* the byte holding the unread bits: the last one consumed */
    p->byte = bits ? (used ? in[used - 1] : z->last_byte) : 0;
    if (inflateGetDictionary(&z->strm, p->window, &len) != Z_OK)
        len = 0;
    p->window_size = len;
    z->have_pending = 1;
    z->last_point_out = z->total_out;
    z->npoints++;
}

int ern_zran_builder_feed(ern_zran_builder *z, const uint8_t *in, size_t in_len,
                          uint8_t *out, size_t out_cap, size_t *consumed, size_t *produced)
{
    z_stream *s = &z->strm;
    size_t used = 0, made = 0;
    int rc = ERN_OK;

    *consumed = 0;
    *produced = 0;
    if (in_len > UINT32_MAX || out_cap > UINT32_MAX)
        return ERN_EINVAL;
    if (z->have_pending)   /* the caller drains points first: one at a time */
        return ERN_OK;
    while (used < in_len && made < out_cap) {
        uInt ain, aout;
        int ret;

        if (z->member_done && (z->padding || in[used] == 0)) {
            /* zero padding after the last member, as gzip(1) accepts it; anything
             * but zeros after that is an error */
            for (; used < in_len && in[used] == 0; used++)
                z->total_in++;
            z->padding = 1;
            if (used < in_len) {
                rc = ERN_EIO;
                break;
            }
            continue;
        }
        if (z->member_done) {
            /* another member follows: zlib reads its header as it did the first */
            if (inflateReset2(s, GZIP_BITS) != Z_OK) {
                rc = ERN_EIO;
                break;
            }
            z->member_done = 0;
        }
        s->next_in = (Bytef *)(in + used);
        s->avail_in = ain = (uInt)(in_len - used);
        s->next_out = out + made;
        s->avail_out = aout = (uInt)(out_cap - made);
        ret = inflate(s, Z_BLOCK);
        used += ain - s->avail_in;
        made += aout - s->avail_out;
        z->total_in += ain - s->avail_in;
        z->total_out += aout - s->avail_out;
        if (ret == Z_STREAM_END) {
            z->member_done = 1;
            continue;
        }
        if (ret == Z_BUF_ERROR)
            break;
        if (ret != Z_OK) {
            rc = ret == Z_MEM_ERROR ? ERN_ENOMEM : ERN_EIO;
            break;
        }
        if ((s->data_type & DT_BLOCK_END) && !(s->data_type & DT_LAST)
            && (z->npoints == 0 || z->total_out - z->last_point_out >= z->span)) {
            record_point(z, in, used);
            break;
        }
    }
    if (used)
        z->last_byte = in[used - 1];
    *consumed = used;
    *produced = made;
    return rc;
}

int ern_zran_builder_next_point(ern_zran_builder *z, struct ern_zran_point *p)
{
    if (!z->have_pending)
        return 0;
    memcpy(p, &z->pending, sizeof(*p));
    z->have_pending = 0;
    return 1;
}

void ern_zran_builder_totals(ern_zran_builder *z, uint64_t *total_in, uint64_t *total_out,
                             int *member_done)
{
    *total_in = z->total_in;
    *total_out = z->total_out;
    *member_done = z->member_done;
}

/* Inflate into out[0..want) (or discard it when out is NULL); the stream state persists
 * across calls; *made = the bytes that came out (also when it fails). Returns ERN_OK, ERN_EIO for corrupt data, ERN_ELIMIT when the input ran
 * out first. */
static int pump(z_stream *s, int *gzip_mode, uint8_t *out, size_t want, uint8_t *scratch,
                size_t *made)
{
    *made = 0;
    while (want) {
        /* a discarded prefix goes through the window-sized scratch buffer */
        size_t cap = out ? (want > UINT32_MAX ? UINT32_MAX : want)
                         : (want < WINDOW ? want : WINDOW);
        uInt aout = (uInt)cap;
        int ret;

        s->next_out = out ? out : scratch;
        s->avail_out = aout;
        ret = inflate(s, Z_NO_FLUSH);
        if (out)
            out += aout - s->avail_out;
        want -= aout - s->avail_out;
        *made += aout - s->avail_out;
        if (ret == Z_STREAM_END) {
            if (!want)      /* done: what follows (trailer, next member) is not needed */
                return ERN_OK;
            if (!*gzip_mode) {
                /* a raw member ended: skip its 8-byte trailer, then zlib parses the
                 * next member's header */
                if (s->avail_in < 8)
                    return ERN_ELIMIT;
                s->next_in += 8;
                s->avail_in -= 8;
            }
            if (inflateReset2(s, GZIP_BITS) != Z_OK)
                return ERN_EIO;
            *gzip_mode = 1;
            if (!s->avail_in && want)
                return ERN_ELIMIT;
            continue;
        }
        if (ret == Z_BUF_ERROR || (ret == Z_OK && !s->avail_in && s->avail_out))
            return want ? ERN_ELIMIT : ERN_OK;
        if (ret != Z_OK)
            return ret == Z_MEM_ERROR ? ERN_ENOMEM : ERN_EIO;
    }
    return ERN_OK;
}

/* a raw inflater at a point: ERN_OK or an ERN_* error (inflateEnd it either way) */
static int start_at(z_stream *s, uint8_t bits, uint8_t byte, const uint8_t *window,
                    uint32_t window_size, const uint8_t *in, size_t in_len)
{
    memset(s, 0, sizeof(*s));
    if (inflateInit2(s, RAW_BITS) != Z_OK)
        return ERN_ENOMEM;
    if (bits && inflatePrime(s, bits, byte >> (8 - bits)) != Z_OK)
        return ERN_EIO;
    if (window_size && inflateSetDictionary(s, window, window_size) != Z_OK)
        return ERN_EIO;
    s->next_in = (Bytef *)in;
    s->avail_in = (uInt)in_len;
    return ERN_OK;
}

/* skip bytes of output discarded, then out_len bytes into out; *made = those of them
 * that came out before an error */
static int inflate_from(uint8_t bits, uint8_t byte, const uint8_t *window,
                        uint32_t window_size, const uint8_t *in, size_t in_len, uint64_t skip,
                        uint8_t *out, size_t out_len, size_t *made)
{
    z_stream s;
    uint8_t *scratch = NULL;
    int gzip_mode = 0, rc;
    size_t skipped;

    *made = 0;
    if (bits > 7 || window_size > WINDOW || in_len > UINT32_MAX)
        return ERN_EINVAL;
    rc = start_at(&s, bits, byte, window, window_size, in, in_len);
    if (rc)
        goto out;
    if (skip) {
        scratch = malloc(WINDOW);
        if (!scratch) {
            rc = ERN_ENOMEM;
            goto out;
        }
        rc = pump(&s, &gzip_mode, NULL, skip, scratch, &skipped);
        if (rc)
            goto out;
    }
    rc = pump(&s, &gzip_mode, out, out_len, scratch, made);
out:
    free(scratch);
    inflateEnd(&s);
    return rc;
}

int ern_zran_extract(uint8_t bits, uint8_t byte, const uint8_t *window, uint32_t window_size,
                     const uint8_t *in, size_t in_len, uint64_t skip,
                     uint8_t *out, size_t out_len)
{
    size_t made;
    return inflate_from(bits, byte, window, window_size, in, in_len, skip, out, out_len,
                        &made);
}

/* The daemon's cold path for zran blobs (see erofs_native.h): one context inflated into
 * dst, its chunks judged by what came out. Everything is untrusted: the context's and
 * every chunk's place are checked against src and dst. */
int ern_cold_zran(const uint8_t *src, size_t srclen, uint8_t *dst, size_t dstlen,
                  const struct ern_cold_zctx *ctx, struct ern_cold_chunk *chunks, uint32_t n)
{
    size_t made = 0;
    int rc = ERN_EINVAL, ok = 0;
    int fits = ctx->src_off <= srclen && ctx->src_len <= srclen - ctx->src_off &&
               ctx->dst_off <= dstlen && ctx->out_len <= dstlen - ctx->dst_off;

    if (fits)
        rc = inflate_from(ctx->bits, ctx->byte, ctx->window, ctx->window_size,
                          src + ctx->src_off, ctx->src_len, ctx->skip, dst + ctx->dst_off,
                          ctx->out_len, &made);
    for (uint32_t i = 0; i < n; i++) {
        struct ern_cold_chunk *c = &chunks[i];
        c->verified = 0;
        c->alg = ERN_COLD_ZRAN;
        /* a chunk is a slice of the context's output: [dst_off, dst_off + ulen) */
        if (!fits || c->ulen == 0 || c->dst_off < ctx->dst_off ||
            c->dst_off - ctx->dst_off > ctx->out_len ||
            c->ulen > ctx->out_len - (c->dst_off - ctx->dst_off)) {
            c->status = ERN_COLD_EBOUNDS;
            continue;
        }
        if (c->dst_off - ctx->dst_off + c->ulen <= made) {
            c->status = ERN_COLD_OK;    /* came out before any error; digest still checked */
            ok++;
        } else if (rc == ERN_ENOMEM) {
            c->status = ERN_COLD_ENOMEM;
        } else if (rc == ERN_ELIMIT) {
            c->status = ERN_COLD_ESIZE;
        } else {
            c->status = ERN_COLD_EDATA;
        }
    }
    return ok;
}

/* Which bytes of a point's window the stream after it copies. Only output within 32 KiB
 * + 258 bytes of the point can reach into the window (deflate distances are at most
 * 32 KiB, matches at most 258 bytes), so that output is inflated three times from the
 * point with made-up windows: byte i holding i & 255, then ~i & 255, then i >> 8. An
 * output byte that differs between the first two came from the window (a copy, or a copy
 * of a copy), and the three values name the window byte; literals are the same in all.
 * The symbols deflate decodes do not depend on the window's contents, so the three runs
 * take the same path as a run with the real window. used[i] = 1 for every byte copied;
 * *made = output bytes examined (less than the reach only when the input ran out). */
#define WINDOW_REACH (WINDOW + 258)
int ern_zran_window_use(uint8_t bits, uint8_t byte, uint32_t window_size,
                        const uint8_t *in, size_t in_len, uint8_t *used, size_t *made)
{
    uint8_t *buf = NULL, *win, *out[3];
    size_t got[3];
    int rc = ERN_OK;

    *made = 0;
    if (window_size > WINDOW || bits > 7)
        return ERN_EINVAL;
    memset(used, 0, window_size);
    if (!window_size)
        return ERN_OK;
    buf = malloc(window_size + 3 * (size_t)WINDOW_REACH);
    if (!buf)
        return ERN_ENOMEM;
    win = buf;
    for (int k = 0; k < 3; k++)
        out[k] = buf + window_size + (size_t)k * WINDOW_REACH;
    for (int k = 0; k < 3; k++) {
        for (uint32_t i = 0; i < window_size; i++)
            win[i] = (uint8_t)(k == 0 ? i : k == 1 ? ~i : i >> 8);
        int r = inflate_from(bits, byte, win, window_size, in, in_len, 0, out[k],
                             WINDOW_REACH, &got[k]);
        if (r && r != ERN_ELIMIT) {
            rc = r;
            goto out;
        }
    }
    size_t n = got[0] < got[1] ? got[0] : got[1];
    n = n < got[2] ? n : got[2];
    for (size_t p = 0; p < n; p++) {
        if (out[0][p] != out[1][p]) {
            uint32_t i = out[0][p] | (uint32_t)out[2][p] << 8;
            if (i < window_size)
                used[i] = 1;
        }
    }
    *made = n;
out:
    free(buf);
    return rc;
}
