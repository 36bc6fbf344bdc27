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
 * bytes in all, 0.0007 % of the blob). So is one of at most 64 KiB that starts as an xz
 * stream or a bzip2 stream (its first block's or end's magic after the header), and a
 * PNG file of at most 4 KiB (/usr/share's icons: 4,789 such pieces, 0.030 CPU s of
 * zstd; 408 of them had shrunk, by 16,338 bytes in all, 0.006 % of the blob; the 111
 * PNGs of 4-64 KiB would have given up 76 KB for 0.006 s, so not those; /usr/share has
 * no small xz or bzip2 file: 4,000 of its small files compressed by xz -6 and bzip2 -9,
 * 0 and 111 of them shrank, by 0 and 4,954 bytes). Not a zstd frame (this repository's
 * tests/data/nydus, a Nydus blob and its TOC: frames back to back with other bytes, 12,560
 * of their 24,588 bytes given up), nor JPEG (both of /usr/share's shrank, by 30 %), nor a
 * gzip file over 64 KiB (8 of 203 shrank, by 302 KB). The rule looks at the bytes only,
 * so the blob is as reproducible as before; Compressor.compress applies the same one. */
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

/* the piece is stored raw without trying zstd (top) */
static int stored_raw(const uint8_t *p, uint32_t n)
{
    static const uint8_t xz[6] = {0xfd, '7', 'z', 'X', 'Z', 0};
    static const uint8_t bz_block[6] = {0x31, 0x41, 0x59, 0x26, 0x53, 0x59};
    static const uint8_t bz_end[6] = {0x17, 0x72, 0x45, 0x38, 0x50, 0x90};
    static const uint8_t png[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};

    if (n > ERN_ZSTD_GZIP_RAW_MAX || n < 3)
        return 0;
    if (p[0] == 0x1f && p[1] == 0x8b && p[2] == 8)
        return 1;
    if (n >= 8 && n <= ERN_ZSTD_PNG_RAW_MAX && !memcmp(p, png, 8))
        return 1;
    if (n >= 6 && !memcmp(p, xz, 6))
        return 1;
    return n >= 10 && p[0] == 'B' && p[1] == 'Z' && p[2] == 'h' && p[3] >= '1'
        && p[3] <= '9' && (!memcmp(p + 4, bz_block, 6) || !memcmp(p + 4, bz_end, 6));
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
        if (stored_raw(p, len[i]))
            r = len[i];             /* a small gzip, xz, bzip2 or PNG file (top) */
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
