/* erofs-tools C core, pack's chunk reader: the data of a batch of chunks (fixed-size
 * pieces of regular files) read into one buffer in one call. cffi releases the GIL
 * around it, so the pack's workers read in parallel and a batch costs one GIL hand-off
 * instead of an open, a pread and a close per chunk (most files of a tree are one small
 * chunk). The chunks of one file come one after another: the file stays open between
 * them. */
#include <errno.h>
#include <fcntl.h>
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

int ern_chunks_read(const char *names, const uint32_t *name_off, const uint64_t *file_off,
                    const uint32_t *len, const uint64_t *buf_off, uint32_t n, uint8_t *buf,
                    uint64_t cap, uint32_t *fail_index, int32_t *fail_errno)
{
    int fd = -1, rc = ERN_CHUNKS_OK;
    uint32_t cur = UINT32_MAX, i;

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
            fd = open(names + cur, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
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
    }
    if (fd >= 0)
        close(fd);
    *fail_index = i;
    return rc;
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
