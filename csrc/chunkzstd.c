/* erofs-tools C core, pack's zstd chunks: the pieces of a batch compressed one zstd
 * frame each, back to back into one buffer, in one call (cffi releases the GIL around
 * it). The compressor is a ZSTD_compress2 and a ZSTD_isError that the caller hands over
 * as function pointers with a compression context of the same library: python-
 * zstandard's bundled zstd (1.5.7), whose frames are the ones pack has always written
 * (Debian 12's libzstd 1.5.4, which this core links, writes other frames for the same
 * level, so every blob id would change, and compressed ~13 % slower). One context per
 * worker thread, kept for the whole pack: python-zstandard's multi_compress_to_buffer
 * made a new one per call (per batch), whose tables were mapped, faulted in, zeroed and
 * unmapped again each time: ~0.8 CPU s of a /usr/share pack.
 *
 * A piece of at most 64 KiB that starts as a gzip member (1f 8b 08: most of them are
 * whole small .gz files, man pages and changelogs) is stored raw without trying zstd:
 * deflate's output does not shrink, and zstd spent ~5 us of set-up, match search and
 * entropy analysis on each such piece only to store it raw after all (/usr/share: 23,236
 * such pieces, ~0.1 CPU s of a pack's ~2.3 s of zstd; 22 of them had shrunk, by 2,122
 * bytes in all, 0.0007 % of the blob). The rule looks at the bytes only, so the blob is
 * as reproducible as before; Compressor.compress applies the same one. */
#include <string.h>

#include "erofs_native.h"

typedef size_t (*zstd_compress2_fn)(void *cctx, void *dst, size_t cap, const void *src,
                                    size_t n);
typedef unsigned (*zstd_is_error_fn)(size_t code);

/* zstd.h's ZSTD_COMPRESSBOUND: the most a frame of n bytes takes (with this much room,
 * zstd never bends its output to the room it has) */
static uint64_t bound(uint64_t n)
{
    return n + (n >> 8) + (n < (128u << 10) ? ((128u << 10) - n) >> 11 : 0);
}

uint64_t ern_zstd_chunks_bound(const uint32_t *len, uint32_t n)
{
    uint64_t total = 0;
    for (uint32_t i = 0; i < n; i++)
        total += bound(len[i]);
    return total;
}

int ern_zstd_chunks(void *compress2, void *is_error, void *cctx, const uint8_t *src,
                    uint64_t srclen, const uint64_t *off, const uint32_t *len, uint32_t n,
                    uint8_t *dst, uint64_t cap, uint32_t *out_len, uint32_t *fail_index)
{
    zstd_compress2_fn comp = (zstd_compress2_fn)compress2;
    zstd_is_error_fn err = (zstd_is_error_fn)is_error;
    uint64_t pos = 0;

    if (!comp || !err || !cctx)
        return ERN_CHUNKS_EINVAL;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t b = bound(len[i]);
        *fail_index = i;
        if (off[i] > srclen || len[i] > srclen - off[i] || b > cap - pos)
            return ERN_CHUNKS_EINVAL;
        const uint8_t *p = src + off[i];
        size_t r;
        if (len[i] <= ERN_ZSTD_GZIP_RAW_MAX && len[i] >= 3 && p[0] == 0x1f && p[1] == 0x8b
                && p[2] == 8)
            r = len[i];             /* a small gzip file: stored raw (top) */
        else
            r = comp(cctx, dst + pos, (size_t)b, p, len[i]);
        if (err(r))
            return ERN_ZSTD_ERROR;
        if (r >= len[i]) {          /* does not shrink: stored as it is */
            memcpy(dst + pos, src + off[i], len[i]);
            r = len[i];
        }
        out_len[i] = (uint32_t)r;
        pos += r;
    }
    return ERN_CHUNKS_OK;
}
