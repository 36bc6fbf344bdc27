/* erofs-tools C core, pack's chunk reader: the data of a batch of chunks (fixed-size
 * pieces of regular files) read into one buffer in one call. cffi releases the GIL
 * around it, so the pack's workers read in parallel and a batch costs one GIL hand-off
 * instead of an open, a pread and a close per chunk (most files of a tree are one small
 * chunk). The chunks of one file come one after another: the file stays open between
 * them. Also pack's other per-chunk loops that need no Python: the blob writer's group
 * gathered into one buffer, the bootstrap's chunk info table sorted and encoded. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE               /* qsort_r */
#endif
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "erofs_native.h"

static int read_full(int fd, uint8_t *dst, uint32_t len, uint64_t off)
{
    while (len) {
        ssize_t r = pread(fd, dst, len, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return 1;           /* the file ended early: it shrank */
        dst += r;
        len -= (uint32_t)r;
        off += (uint64_t)r;
    }
    return 0;
}

/* The directory of the file opened last (an O_PATH fd), for the next file of the batch
 * in the same directory: a batch's files come in walk order, most of them small files
 * of one directory, and an open by the whole path looked every component of it up
 * again (the path walk was ~a quarter of the kernel time of the workers' opens). */
struct dir_cache {
    int fd;
    const char *name;           /* its path: the first `len` bytes of this name */
    size_t len;
};

/* O_NOATIME: pack leaves the source's access times alone. A file read for the first
 * time since it was written (a tree just unpacked or copied) otherwise had its atime
 * updated by the read (relatime: atime not after mtime), an inode made dirty per file:
 * on ext4 ~0.1 s of kernel time more for the first pack of a fresh copy of /usr/share/man
 * (17.6k files) than for the next. Only the owner (or CAP_FOWNER) may ask for it: on
 * EPERM the open goes again without it, and so do all later ones of the process. */
static int noatime_denied;

static int open_noatime(int dfd, const char *name)
{
    const int flags = O_RDONLY | O_NOFOLLOW | O_CLOEXEC;

    if (!__atomic_load_n(&noatime_denied, __ATOMIC_RELAXED)) {
        int fd = openat(dfd, name, flags | O_NOATIME);
        if (fd >= 0 || errno != EPERM)
            return fd;
        __atomic_store_n(&noatime_denied, 1, __ATOMIC_RELAXED);
    }
    return openat(dfd, name, flags);
}

/* open(path, O_RDONLY | O_NOFOLLOW) as the chunks' files always were (O_NOATIME above),
 * through the cached directory when `path` is in it; errors are the file's own: a
 * directory that cannot be opened so leaves the whole path to open(), which says why */
static int open_in_dir(const char *path, struct dir_cache *d)
{
    const char *slash = strrchr(path, '/');
    size_t len = slash ? (size_t)(slash - path) : 0;

    if (!len || !slash[1] || len >= PATH_MAX)
        return open_noatime(AT_FDCWD, path);
    if (d->fd < 0 || d->len != len || memcmp(d->name, path, len)) {
        char dirname[PATH_MAX];

        if (d->fd >= 0)
            close(d->fd);
        memcpy(dirname, path, len);
        dirname[len] = 0;
        d->fd = open(dirname, O_PATH | O_DIRECTORY | O_CLOEXEC);
        d->name = path;
        d->len = len;
        if (d->fd < 0)
            return open_noatime(AT_FDCWD, path);
    }
    return open_noatime(d->fd, slash + 1);
}

int ern_chunks_read(const char *names, const uint32_t *name_off, const uint64_t *file_off,
                    const uint32_t *len, const uint64_t *buf_off, uint32_t n, uint8_t *buf,
                    uint64_t cap, uint32_t hash_max, uint8_t *digests,
                    uint32_t *fail_index, int32_t *fail_errno)
{
    int fd = -1, rc = ERN_CHUNKS_OK;
    uint32_t cur = UINT32_MAX, i, held = UINT32_MAX;     /* held: a small chunk not hashed yet */
    struct dir_cache dir = {.fd = -1};

    *fail_errno = 0;
    for (i = 0; i < n; i++) {
        if (buf_off[i] > cap || len[i] > cap - buf_off[i]) {
            rc = ERN_CHUNKS_EINVAL;
            break;
        }
        if (name_off[i] != cur) {
            if (fd >= 0)
                close(fd);
            cur = name_off[i];
            fd = open_in_dir(names + cur, &dir);
            if (fd < 0) {
                *fail_errno = errno;
                rc = ERN_CHUNKS_EOPEN;
                break;
            }
        }
        int r = read_full(fd, buf + buf_off[i], len[i], file_off[i]);
        if (r) {
            *fail_errno = r < 0 ? -r : 0;
            rc = r < 0 ? ERN_CHUNKS_EREAD : ERN_CHUNKS_ESHORT;
            break;
        }
        /* hashed while its bytes are still in the cache the read left them in; one of
         * at most 1 KiB waits for the next such one, and the two are hashed side by
         * side (ern_blake3_2: two of 1 KiB ~1.3x as fast as one after the other) */
        if (digests && len[i] <= hash_max) {
            if (len[i] > 1024)
                ern_blake3(buf + buf_off[i], len[i], digests + (size_t)i * 32);
            else if (held == UINT32_MAX)
                held = i;
            else {
                ern_blake3_2(buf + buf_off[held], len[held], digests + (size_t)held * 32,
                             buf + buf_off[i], len[i], digests + (size_t)i * 32);
                held = UINT32_MAX;
            }
        }
    }
    if (held != UINT32_MAX)         /* read (and checked) before any failure */
        ern_blake3(buf + buf_off[held], len[held], digests + (size_t)held * 32);
    if (fd >= 0)
        close(fd);
    if (dir.fd >= 0)
        close(dir.fd);
    *fail_index = i;
    return rc;
}

/* ---- the batch buffer pool ---- */

#define BATCHBUF_MAX 8              /* idle buffers kept at most, whatever keep says */
#define BATCHBUF_HDR 64             /* a header before the buffer: its capacity */
#define BATCHBUF_ROUND ((size_t)1 << 20)

static pthread_mutex_t batchbuf_mu = PTHREAD_MUTEX_INITIALIZER;
static void *batchbuf_idle[BATCHBUF_MAX];
static uint32_t batchbuf_nidle, batchbuf_keep = 1;

static size_t batchbuf_cap(const void *base)
{
    size_t cap;
    memcpy(&cap, base, sizeof(cap));
    return cap;
}

void *ern_batchbuf_get(size_t size)
{
    void *best = NULL;
    uint32_t at = 0;

    pthread_mutex_lock(&batchbuf_mu);
    for (uint32_t i = 0; i < batchbuf_nidle; i++) {
        size_t cap = batchbuf_cap(batchbuf_idle[i]);
        if (cap >= size && (!best || cap < batchbuf_cap(best))) {
            best = batchbuf_idle[i];
            at = i;
        }
    }
    if (best)
        batchbuf_idle[at] = batchbuf_idle[--batchbuf_nidle];
    pthread_mutex_unlock(&batchbuf_mu);
    if (!best) {
        /* whole MiBs: a batch is a little over BATCH_BYTES, and a buffer of the next
         * size serves the next batches (only its touched pages are resident) */
        if (size > SIZE_MAX - BATCHBUF_HDR - BATCHBUF_ROUND)
            return NULL;
        size_t cap = (size + BATCHBUF_ROUND - 1) & ~(BATCHBUF_ROUND - 1);
        if (cap == 0)
            cap = BATCHBUF_ROUND;
        best = malloc(BATCHBUF_HDR + cap);
        if (!best)
            return NULL;
        memcpy(best, &cap, sizeof(cap));
    }
    return (uint8_t *)best + BATCHBUF_HDR;
}

void ern_batchbuf_put(void *p)
{
    if (!p)
        return;
    void *base = (uint8_t *)p - BATCHBUF_HDR;
    pthread_mutex_lock(&batchbuf_mu);
    if (batchbuf_nidle < batchbuf_keep) {
        batchbuf_idle[batchbuf_nidle++] = base;
        base = NULL;
    }
    pthread_mutex_unlock(&batchbuf_mu);
    free(base);
}

void ern_batchbuf_keep(uint32_t n)
{
    void *drop[BATCHBUF_MAX];
    uint32_t ndrop = 0;

    pthread_mutex_lock(&batchbuf_mu);
    batchbuf_keep = n < BATCHBUF_MAX ? n : BATCHBUF_MAX;
    while (batchbuf_nidle > batchbuf_keep)
        drop[ndrop++] = batchbuf_idle[--batchbuf_nidle];
    pthread_mutex_unlock(&batchbuf_mu);
    while (ndrop)
        free(drop[--ndrop]);
}

int ern_gather(uint8_t *const *src, const uint64_t *len, uint32_t n, uint8_t *dst,
               uint64_t cap)
{
    uint64_t pos = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (len[i] > cap - pos)
            return ERN_CHUNKS_EINVAL;
        memcpy(dst + pos, src[i], len[i]);
        pos += len[i];
    }
    return ERN_CHUNKS_OK;
}

/* ---- the chunk info table: sorted by digest, entries in the on-disk layout ---- */

static int digest_cmp(const void *a, const void *b, void *ctx)
{
    const uint8_t *d = ctx;
    return memcmp(d + (size_t)*(const uint32_t *)a * 32, d + (size_t)*(const uint32_t *)b * 32,
                  32);
}

uint32_t ern_ci_order(const uint8_t *digests, const uint8_t *used, uint32_t n,
                      uint32_t *order)
{
    uint32_t m = 0;
    for (uint32_t i = 0; i < n; i++)
        if (used[i])
            order[m++] = i;
    qsort_r(order, m, sizeof(*order), digest_cmp, (void *)digests);
    return m;
}

static void put32(uint8_t *p, uint32_t v)
{
    v = htole32(v);
    memcpy(p, &v, 4);
}

static void put64(uint8_t *p, uint64_t v)
{
    v = htole64(v);
    memcpy(p, &v, 8);
}

int ern_ci_v1_append(const uint32_t *csize, const uint32_t *usize, uint32_t n,
                     uint64_t *pos, uint64_t *upos, uint64_t *coff, uint64_t *uoff,
                     uint8_t *ci, uint32_t *fail_index)
{
    uint64_t p = *pos, u = *upos;

    for (uint32_t i = 0; i < n; i++, ci += 16) {
        uint64_t c1 = (uint64_t)csize[i] - 1, u1 = (uint64_t)usize[i] - 1;
        if (!csize[i] || csize[i] > usize[i]) {
            *fail_index = i;
            *pos = p;
            *upos = u;
            return -1;
        }
        /* CI v1 (format/rafs.py encode_ci_v1): sizes minus one, offsets 4 KiB aligned */
        put64(ci, (((u1 >> 20) & 0xF) << 8) | (u & 0x0FFFFFFFF000ull)
                  | ((u1 & 0xFFFFF) << 44));
        put64(ci + 8, (p & 0xFFFFFFFFFFull) | (((c1 >> 20) & 0xF) << 40)
                      | ((c1 & 0xFFFFF) << 44));
        coff[i] = p;
        uoff[i] = u;
        p += csize[i];
        u += ((uint64_t)usize[i] + 4095) & ~(uint64_t)4095;
    }
    *pos = p;
    *upos = u;
    return 0;
}

void ern_ci_entries(const uint8_t *digests, const uint32_t *order, uint32_t start,
                    uint32_t count, uint32_t blob_index, const uint64_t *coff,
                    const uint32_t *csize, const uint64_t *uoff, const uint32_t *usize,
                    const uint64_t *file_off, uint8_t *out)
{
    for (uint32_t k = 0; k < count; k++, out += 80) {
        uint32_t i = order[start + k];
        memcpy(out, digests + (size_t)i * 32, 32);          /* digest */
        put32(out + 32, blob_index);
        put32(out + 36, csize[i] != usize[i] ? 1 : 0);      /* flags: compressed */
        put32(out + 40, csize[i]);
        put32(out + 44, usize[i]);
        put64(out + 48, coff[i]);
        put64(out + 56, uoff[i]);
        put64(out + 64, file_off[i]);
        put32(out + 72, i);                                 /* index in the blob */
        put32(out + 76, 0);                                 /* crc32: none */
    }
}

int ern_chunk_indexes(const uint32_t *refs, uint32_t n, const uint64_t *uoff,
                      uint32_t nchunks, uint32_t dev, uint64_t *out, uint8_t *used)
{
    for (uint32_t k = 0; k < n; k++) {
        uint32_t r = refs[k];
        if (r >= nchunks || r >= (1u << 24))
            return -1;
        uint64_t devid = (dev & 0xFF) | (((r >> 16) & 0xFF) << 8);
        out[k] = (r & 0xFFFF) | (devid << 16) | ((uoff[r] / 4096) << 32);
        used[r] = 1;
    }
    return 0;
}
