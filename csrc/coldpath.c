/* erofs-tools C core, the daemon's cold path: the chunks of one fetched range of a RAFS
 * v6 blob decoded in one call, and after the caller checked their digests, written into
 * the cache file with their chunk-state bits set in another. Both run without the GIL
 * (cffi API mode releases it around every call that takes no callback), so the daemon's
 * workers decode in parallel.
 *
 * Everything in a range is untrusted: every chunk's place in the source and destination
 * buffers is checked, a zstd chunk must be exactly one frame whose window is at most
 * 32 MiB and that decompresses to exactly its uncompressed size, an lz4 chunk exactly one
 * raw block of that size. A chunk that fails is reported in its status and never
 * written: ern_cold_store writes only chunks the caller marked verified.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE               /* fallocate */
#endif
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include <lz4.h>
#define ZSTD_STATIC_LINKING_ONLY   /* ZSTD_d_windowLogMax is stable since 1.4, not here */
#include <zstd.h>
#include <zstd_errors.h>

#include "erofs_native.h"

/* ZSTD_d_windowLogMax: 2^25, enough for any 16 MiB chunk (reader/blob.py's bound) */
#define COLD_WINDOW_LOG 25
#define COLD_IOV_MAX 64

/* one decompression context per thread: a context per chunk would allocate its tables
 * every time; contexts are not thread-safe. Kept for the thread's life (the daemon's
 * workers are long-lived). */
static __thread ZSTD_DCtx *tl_dctx;

static ZSTD_DCtx *dctx(void)
{
    if (!tl_dctx) {
        tl_dctx = ZSTD_createDCtx();
        if (tl_dctx && ZSTD_isError(ZSTD_DCtx_setParameter(tl_dctx, ZSTD_d_windowLogMax,
                                                           COLD_WINDOW_LOG))) {
            ZSTD_freeDCtx(tl_dctx);
            tl_dctx = NULL;
        }
    }
    return tl_dctx;
}

static int in_bounds(uint64_t off, uint64_t len, size_t cap)
{
    return off <= cap && len <= cap - off;
}

static int decode_zstd(const uint8_t *in, size_t inlen, uint8_t *out, size_t ulen)
{
    static const uint8_t magic[4] = {0x28, 0xb5, 0x2f, 0xfd};
    if (inlen < 6 || memcmp(in, magic, 4))
        return ERN_COLD_EFRAME;
    if (in[4] & 0x18)           /* reserved / unused frame header bits */
        return ERN_COLD_EFRAME;
    unsigned long long declared = ZSTD_getFrameContentSize(in, inlen);
    if (declared == ZSTD_CONTENTSIZE_ERROR)
        return ERN_COLD_EFRAME;
    if (declared != ZSTD_CONTENTSIZE_UNKNOWN && declared != ulen)
        return ERN_COLD_ESIZE;
    /* the window bound here: ZSTD_d_windowLogMax binds streaming only, and the one-shot
     * decode below would take a frame the reader refuses (blob.ZSTD_MAX_WINDOW) */
    ZSTD_frameHeader zfh;
    if (ZSTD_getFrameHeader(&zfh, in, inlen) != 0 ||
        zfh.windowSize > (1ull << COLD_WINDOW_LOG))
        return ERN_COLD_EFRAME;
    /* exactly one frame and nothing after it */
    size_t flen = ZSTD_findFrameCompressedSize(in, inlen);
    if (ZSTD_isError(flen) || flen != inlen)
        return ERN_COLD_EFRAME;
    ZSTD_DCtx *d = dctx();
    if (!d)
        return ERN_COLD_ENOMEM;
    /* an output buffer of exactly ulen: a frame producing more fails */
    size_t r = ZSTD_decompressDCtx(d, out, ulen, in, inlen);
    if (ZSTD_isError(r))
        return ZSTD_getErrorCode(r) == ZSTD_error_memory_allocation ? ERN_COLD_ENOMEM
                                                                    : ERN_COLD_EDATA;
    return r == ulen ? ERN_COLD_OK : ERN_COLD_ESIZE;
}

static int decode_lz4(const uint8_t *in, size_t inlen, uint8_t *out, size_t ulen)
{
    if (inlen > INT_MAX || ulen > INT_MAX)
        return ERN_COLD_ESIZE;
    /* LZ4_decompress_safe never writes past ulen and fails on input it does not use */
    int r = LZ4_decompress_safe((const char *)in, (char *)out, (int)inlen, (int)ulen);
    if (r < 0)
        return ERN_COLD_EDATA;
    return (size_t)r == ulen ? ERN_COLD_OK : ERN_COLD_ESIZE;
}

/* where a chunk's decoded bytes are (NULL if its place is out of bounds) */
static const uint8_t *chunk_data(const uint8_t *src, size_t srclen, const uint8_t *dst,
                                 size_t dstlen, const struct ern_cold_chunk *c)
{
    if (c->alg == ERN_COLD_NONE)
        return in_bounds(c->src_off, c->ulen, srclen) ? src + c->src_off : NULL;
    return in_bounds(c->dst_off, c->ulen, dstlen) ? dst + c->dst_off : NULL;
}

int ern_cold_decode(const uint8_t *src, size_t srclen, uint8_t *dst, size_t dstlen,
                    struct ern_cold_chunk *chunks, uint32_t n)
{
    int ok = 0;
    for (uint32_t i = 0; i < n; i++) {
        struct ern_cold_chunk *c = &chunks[i];
        c->verified = 0;
        if (!in_bounds(c->src_off, c->src_len, srclen) || c->ulen == 0 ||
            (c->alg != ERN_COLD_NONE && !in_bounds(c->dst_off, c->ulen, dstlen))) {
            c->status = ERN_COLD_EBOUNDS;
            continue;
        }
        const uint8_t *in = src + c->src_off;
        switch (c->alg) {
        case ERN_COLD_NONE:
            c->status = c->src_len == c->ulen ? ERN_COLD_OK : ERN_COLD_ESIZE;
            break;
        case ERN_COLD_ZSTD:
            c->status = (int16_t)decode_zstd(in, c->src_len, dst + c->dst_off, c->ulen);
            break;
        case ERN_COLD_LZ4:
            c->status = (int16_t)decode_lz4(in, c->src_len, dst + c->dst_off, c->ulen);
            break;
        default:
            c->status = ERN_COLD_EALG;
        }
        ok += c->status == ERN_COLD_OK;
    }
    return ok;
}

/* Whether a run's blocks are allocated (fallocate, the file's size kept) before it is
 * written: on ext4 a buffered write into a hole takes a delayed-allocation reservation
 * and an extent-status entry per 4 KiB block; into blocks already allocated (unwritten
 * extents, read as zeros until written) it only maps them. Measured on a cold GiB of 1 MiB
 * writes (6.18, ext4): 0.20 -> 0.145 CPU s in the writer, the unwritten extents' conversion
 * at writeback no more than delayed allocation's there. Only verified runs are allocated
 * (a failed chunk stays a hole), and a failure (a file system without fallocate, no
 * space) only leaves the write to do it or to fail as it would have.
 * FSCACHE_DAEMON_COLD_FALLOCATE=0 turns it off (to compare). */
static int cold_fallocate = -1;

static int use_fallocate(void)
{
    int v = __atomic_load_n(&cold_fallocate, __ATOMIC_RELAXED);
    if (v < 0) {
        const char *e = getenv("FSCACHE_DAEMON_COLD_FALLOCATE");
        v = !(e && e[0] == '0');
        __atomic_store_n(&cold_fallocate, v, __ATOMIC_RELAXED);
    }
    return v;
}

/* 0 or -errno; *done = bytes written from off on (all of them, or up to the failure) */
static int write_all(int fd, struct iovec *iov, int cnt, uint64_t off, uint64_t *done)
{
    *done = 0;
    while (cnt > 0) {
        ssize_t w = pwritev(fd, iov, cnt, (off_t)off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (w == 0)
            return -EIO;
        off += (uint64_t)w;
        *done += (uint64_t)w;
        while (cnt > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

int64_t ern_cold_write(int fd, uint64_t file_size, const uint8_t *src, size_t srclen,
                       const uint8_t *dst, size_t dstlen, struct ern_cold_chunk *chunks,
                       uint32_t n, uint32_t nbits, int *werr)
{
    struct iovec iov[COLD_IOV_MAX];
    uint32_t run[COLD_IOV_MAX];
    int cnt = 0;
    uint64_t run_off = 0, run_end = 0;
    int64_t written = 0;
    int err = 0;

    /* one pass: runs of verified chunks that follow each other in the cache file go out
     * in one pwritev; a chunk not (wholly) written is marked EWRITE, so it gets no bit */
    for (uint32_t i = 0; i <= n; i++) {
        struct ern_cold_chunk *c = i < n ? &chunks[i] : NULL;
        const uint8_t *data = NULL;
        if (c) {
            if (!c->verified || c->status != ERN_COLD_OK)
                continue;       /* never written: failed, or its digest was not checked */
            data = chunk_data(src, srclen, dst, dstlen, c);
            if (!data || c->index >= nbits || !in_bounds(c->file_off, c->ulen, file_size)) {
                c->status = ERN_COLD_EBOUNDS;
                continue;
            }
        }
        if (cnt && (!c || c->file_off != run_end || cnt == COLD_IOV_MAX)) {
            uint64_t done, end = 0;
            if (use_fallocate())
                (void)fallocate(fd, FALLOC_FL_KEEP_SIZE, (off_t)run_off,
                                (off_t)(run_end - run_off));
            int r = write_all(fd, iov, cnt, run_off, &done);
            for (int k = 0; k < cnt; k++) {
                struct ern_cold_chunk *w = &chunks[run[k]];
                end += w->ulen;
                if (end > done) {       /* not (wholly) written: no bit */
                    w->status = ERN_COLD_EWRITE;
                    err = r ? r : -EIO;
                    continue;
                }
                written++;
            }
            cnt = 0;
        }
        if (!c)
            break;
        if (!cnt)
            run_off = run_end = c->file_off;
        iov[cnt].iov_base = (void *)data;
        iov[cnt].iov_len = c->ulen;
        run[cnt++] = i;
        run_end += c->ulen;
    }
    *werr = err;
    return written;
}

int ern_cold_mark(struct ern_cold_chunk *chunks, uint32_t n, uint8_t *bitmap,
                  uint32_t nbits, int state_fd, uint64_t state_off, uint32_t *newly)
{
    int err = 0;
    uint32_t added = 0;
    uint64_t lo = UINT64_MAX, hi = 0;

    /* the chunks written: verified and still OK after ern_cold_write */
    for (uint32_t i = 0; i < n; i++) {
        struct ern_cold_chunk *c = &chunks[i];
        if (!c->verified || c->status != ERN_COLD_OK)
            continue;
        if (c->index >= nbits) {        /* ern_cold_write refused it already */
            c->status = ERN_COLD_EBOUNDS;
            continue;
        }
        if (c->index >> 3 < lo)
            lo = c->index >> 3;
        if (c->index >> 3 > hi)
            hi = c->index >> 3;
    }
    /* The chunk-state record first, then the bits in memory: another thread that finds
     * a chunk's bit set serves it, and a daemon killed right after that must find it in
     * the record (a served chunk fetched again after a restart). The record's bytes are
     * the bitmap's changed bytes with the new bits (the caller holds the bitmap's lock:
     * no one else changes it meanwhile); no fsync (see fscache_daemon/storage/
     * chunkstate.py: a set bit there is trusted within one boot). */
    if (lo <= hi) {
        uint64_t len = hi - lo + 1;
        uint8_t *rec = state_fd >= 0 ? malloc((size_t)len) : NULL;
        if (rec) {
            memcpy(rec, bitmap + lo, (size_t)len);
            for (uint32_t i = 0; i < n; i++)
                if (chunks[i].verified && chunks[i].status == ERN_COLD_OK)
                    rec[(chunks[i].index >> 3) - lo] |= (uint8_t)(1u << (chunks[i].index & 7));
            ssize_t w;
            do {
                w = pwrite(state_fd, rec, (size_t)len, (off_t)(state_off + lo));
            } while (w < 0 && errno == EINTR);
            if (w < 0)
                err = -errno;
            free(rec);
        }
        for (uint32_t i = 0; i < n; i++) {
            struct ern_cold_chunk *c = &chunks[i];
            if (!c->verified || c->status != ERN_COLD_OK)
                continue;       /* not written */
            uint8_t bit = (uint8_t)(1u << (c->index & 7));
            uint8_t old = __atomic_fetch_or(&bitmap[c->index >> 3], bit, __ATOMIC_RELEASE);
            added += !(old & bit);
        }
        if (state_fd >= 0 && !rec) {    /* no memory for the copy: the bitmap's bytes */
            ssize_t w;
            do {
                w = pwrite(state_fd, bitmap + lo, (size_t)len, (off_t)(state_off + lo));
            } while (w < 0 && errno == EINTR);
            if (w < 0)
                err = -errno;
        }
    }
    *newly = added;
    return err;
}

int64_t ern_cold_store(int fd, uint64_t file_size, const uint8_t *src, size_t srclen,
                       const uint8_t *dst, size_t dstlen, struct ern_cold_chunk *chunks,
                       uint32_t n, uint8_t *bitmap, uint32_t nbits, int state_fd,
                       uint64_t state_off, uint32_t *newly, int *werr)
{
    int64_t written = ern_cold_write(fd, file_size, src, srclen, dst, dstlen, chunks, n,
                                     nbits, werr);
    int err = ern_cold_mark(chunks, n, bitmap, nbits, state_fd, state_off, newly);
    if (err && !*werr)
        *werr = err;
    return written;
}

int64_t ern_lz4_block_compress(const uint8_t *src, size_t n, uint8_t *dst, size_t cap)
{
    if (n > LZ4_MAX_INPUT_SIZE || cap > INT_MAX)
        return ERN_EINVAL;
    return LZ4_compress_default((const char *)src, (char *)dst, (int)n, (int)cap);
}
