/* erofs-tools C core, decompression of one EROFS physical cluster (the reader's side
 * of compress*.c): LZ4 (liblz4), MicroLZMA (liblzma), raw DEFLATE (libdeflate) and
 * Zstandard (libzstd).
 *
 * Every input is untrusted: the output never exceeds the caller's buffer, the work
 * memory is bounded (zstd window, lzma dictionary, one deflate scratch buffer of at
 * most ERN_ZD_MAX_SCRATCH bytes), and a stream that decodes to another length than the
 * one the index promises is an error. Called through cffi, which releases the GIL. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libdeflate.h>
#include <lz4.h>
#include <lzma.h>
#include <zstd.h>

#include "erofs_native.h"

/* a partial DEFLATE decode has no "stop here" mode in libdeflate: the whole stream is
 * decoded into scratch space this large at most */
#define ERN_ZD_MAX_SCRATCH (16u << 20)
/* 2^27: larger than any window an EROFS pcluster (at most 12 MiB decoded) can need */
#define ERN_ZD_ZSTD_WINDOWLOG_MAX 27
#define ERN_ZD_LZMA_MAX_DICT (64u << 20)

static int fail(char *err, size_t errlen, int code, const char *fmt, const char *what, long v)
{
    if (err && errlen)
        snprintf(err, errlen, fmt, what, v);
    return code;
}

static int dec_lz4(const uint8_t *in, size_t inlen, uint8_t *out, size_t outlen, int partial,
                   char *err, size_t errlen)
{
    if (inlen > 0x7fffffff || outlen > 0x7fffffff)
        return fail(err, errlen, ERN_ELIMIT, "%s: cluster too large (%ld)", "lz4", (long)inlen);
    int r;
    if (partial)
        r = LZ4_decompress_safe_partial((const char *)in, (char *)out, (int)inlen, (int)outlen,
                                        (int)outlen);
    else
        r = LZ4_decompress_safe((const char *)in, (char *)out, (int)inlen, (int)outlen);
    if (r < 0)
        return fail(err, errlen, ERN_EIO, "%s: corrupt stream (%ld)", "lz4", r);
    if ((size_t)r != outlen)
        return fail(err, errlen, ERN_EIO, "%s: stream decodes to %ld bytes", "lz4", r);
    return ERN_OK;
}

static int dec_zstd(const uint8_t *in, size_t inlen, uint8_t *out, size_t outlen, int partial,
                    char *err, size_t errlen)
{
    ZSTD_DCtx *d = ZSTD_createDCtx();
    if (!d)
        return fail(err, errlen, ERN_ENOMEM, "%s: out of memory%ld", "zstd", 0);
    int rc = ERN_OK;
    size_t r = ZSTD_DCtx_setParameter(d, ZSTD_d_windowLogMax, ERN_ZD_ZSTD_WINDOWLOG_MAX);
    if (ZSTD_isError(r)) {
        rc = fail(err, errlen, ERN_EIO, "%s: setup failed%ld", "zstd", 0);
        goto out;
    }
    ZSTD_inBuffer ib = {in, inlen, 0};
    ZSTD_outBuffer ob = {out, outlen, 0};
    for (;;) {
        r = ZSTD_decompressStream(d, &ob, &ib);
        if (ZSTD_isError(r)) {
            if (err && errlen)
                snprintf(err, errlen, "zstd: %s", ZSTD_getErrorName(r));
            rc = ERN_EIO;
            goto out;
        }
        if (r == 0 || ob.pos == ob.size)
            break;              /* frame done, or all the output we want */
        if (ib.pos == ib.size) {
            rc = fail(err, errlen, ERN_EIO, "%s: stream truncated after %ld bytes", "zstd",
                      (long)ob.pos);
            goto out;
        }
    }
    if (ob.pos != outlen) {
        rc = fail(err, errlen, ERN_EIO, "%s: stream decodes to %ld bytes", "zstd", (long)ob.pos);
        goto out;
    }
    if (!partial && r != 0) {
        /* the frame must end exactly where the extent does */
        uint8_t extra;
        ZSTD_outBuffer xb = {&extra, 1, 0};
        r = ZSTD_decompressStream(d, &xb, &ib);
        if (ZSTD_isError(r) || xb.pos || r != 0)
            rc = fail(err, errlen, ERN_EIO, "%s: stream holds more than %ld bytes", "zstd",
                      (long)outlen);
    }
out:
    ZSTD_freeDCtx(d);
    return rc;
}

static int dec_lzma(const uint8_t *in, size_t inlen, uint8_t *out, size_t outlen, int partial,
                    uint32_t dict_size, char *err, size_t errlen)
{
    if (dict_size > ERN_ZD_LZMA_MAX_DICT)
        return fail(err, errlen, ERN_ELIMIT, "%s: dictionary size %ld too large", "lzma",
                    (long)dict_size);
    if (dict_size < 4096)
        dict_size = 4096;
    lzma_stream s = LZMA_STREAM_INIT;
    lzma_ret r = lzma_microlzma_decoder(&s, inlen, outlen, !partial, dict_size);
    if (r != LZMA_OK)
        return fail(err, errlen, r == LZMA_MEM_ERROR ? ERN_ENOMEM : ERN_EIO,
                    "%s: decoder setup failed (%ld)", "lzma", (long)r);
    s.next_in = in;
    s.avail_in = inlen;
    s.next_out = out;
    s.avail_out = outlen;
    r = lzma_code(&s, LZMA_FINISH);
    size_t got = outlen - s.avail_out;
    lzma_end(&s);
    if (r != LZMA_STREAM_END && !(partial && r == LZMA_OK && got == outlen)) {
        if (r == LZMA_OK || r == LZMA_BUF_ERROR)
            return fail(err, errlen, ERN_EIO, "%s: stream ends after %ld bytes", "lzma",
                        (long)got);
        return fail(err, errlen, ERN_EIO, "%s: corrupt stream (%ld)", "lzma", (long)r);
    }
    if (got != outlen)
        return fail(err, errlen, ERN_EIO, "%s: stream decodes to %ld bytes", "lzma", (long)got);
    return ERN_OK;
}

static int dec_deflate(const uint8_t *in, size_t inlen, uint8_t *out, size_t outlen, int partial,
                       char *err, size_t errlen)
{
    struct libdeflate_decompressor *d = libdeflate_alloc_decompressor();
    if (!d)
        return fail(err, errlen, ERN_ENOMEM, "%s: out of memory%ld", "deflate", 0);
    size_t got = 0;
    enum libdeflate_result r = libdeflate_deflate_decompress(d, in, inlen, out, outlen, &got);
    int rc = ERN_OK;
    if (r == LIBDEFLATE_INSUFFICIENT_SPACE && partial) {
        /* the pcluster decodes to more than this extent uses: decode it whole */
        size_t cap = outlen < (1u << 16) ? (1u << 17) : outlen * 2;
        uint8_t *tmp = NULL;
        for (;;) {
            if (cap > ERN_ZD_MAX_SCRATCH)
                cap = ERN_ZD_MAX_SCRATCH;
            free(tmp);
            tmp = malloc(cap);
            if (!tmp) {
                rc = fail(err, errlen, ERN_ENOMEM, "%s: out of memory%ld", "deflate", 0);
                goto out;
            }
            r = libdeflate_deflate_decompress(d, in, inlen, tmp, cap, &got);
            if (r != LIBDEFLATE_INSUFFICIENT_SPACE || cap == ERN_ZD_MAX_SCRATCH)
                break;
            cap *= 2;
        }
        if (r == LIBDEFLATE_SUCCESS && got >= outlen)
            memcpy(out, tmp, outlen);
        free(tmp);
        if (r == LIBDEFLATE_SUCCESS && got >= outlen)
            got = outlen;
        else if (r == LIBDEFLATE_INSUFFICIENT_SPACE) {
            rc = fail(err, errlen, ERN_ELIMIT, "%s: stream decodes to more than %ld bytes",
                      "deflate", (long)ERN_ZD_MAX_SCRATCH);
            goto out;
        }
    }
    if (r == LIBDEFLATE_INSUFFICIENT_SPACE)
        rc = fail(err, errlen, ERN_EIO, "%s: stream holds more than %ld bytes", "deflate",
                  (long)outlen);
    else if (r != LIBDEFLATE_SUCCESS)
        rc = fail(err, errlen, ERN_EIO, "%s: corrupt stream (%ld)", "deflate", (long)r);
    else if (got != outlen)
        rc = fail(err, errlen, ERN_EIO, "%s: stream decodes to %ld bytes", "deflate", (long)got);
out:
    libdeflate_free_decompressor(d);
    return rc;
}

int erofs_z_decompress(int alg, const uint8_t *in, size_t inlen, uint8_t *out, size_t outlen,
                       int flags, uint32_t dict_size, char *err, size_t errlen)
{
    if (err && errlen)
        err[0] = '\0';
    if (!in || !out || outlen == 0)
        return fail(err, errlen, ERN_EINVAL, "%s: empty buffer%ld", "decompress", 0);
    int partial = (flags & ERN_ZD_PARTIAL) != 0;
    size_t margin = 0;
    if (flags & ERN_ZD_ZERO_PADDING) {
        /* compressed bytes are right-aligned in the pcluster: skip the zeros before */
        while (margin < inlen && !in[margin])
            margin++;
        if (margin == inlen)
            return fail(err, errlen, ERN_EIO, "%s: pcluster of %ld zero bytes", "decompress",
                        (long)inlen);
    }
    in += margin;
    inlen -= margin;
    switch (alg) {
    case ERN_ZD_LZ4:
        /* without 0padding, a legacy pcluster may hold more than the extent */
        return dec_lz4(in, inlen, out, outlen, partial || !(flags & ERN_ZD_ZERO_PADDING),
                       err, errlen);
    case ERN_ZD_LZMA:
        return dec_lzma(in, inlen, out, outlen, partial, dict_size, err, errlen);
    case ERN_ZD_DEFLATE:
        return dec_deflate(in, inlen, out, outlen, partial, err, errlen);
    case ERN_ZD_ZSTD:
        return dec_zstd(in, inlen, out, outlen, partial, err, errlen);
    default:
        return fail(err, errlen, ERN_EINVAL, "%s: unknown algorithm %ld", "decompress", alg);
    }
}
