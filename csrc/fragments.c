/* erofs-tools C core, -Efragments: the packed inode's contents while the image is built.
 *
 * A compressed file's last extent (at most a pcluster of input) may go to the packed
 * inode, a file of its own reached only through sb.packed_nid, compressed once every
 * other file is placed; the file's map header then holds the fragment's offset in it.
 * Fragments are appended in commit order (the walk order), so the packed inode, and the
 * image, do not depend on the thread count. A fragment equal to one already appended
 * (same length and bytes: duplicate small files, common tails) is not appended again;
 * its offset is shared.
 */
#include "compress_int.h"

struct zfragent {
    uint64_t hash;           /* 0: free slot */
    uint64_t off;
    uint32_t len;
};

int zpacked_open(struct zpacked *pk)
{
    memset(pk, 0, sizeof(*pk));
    const char *dir = getenv("TMPDIR");
    pk->fd = open(dir && *dir ? dir : "/var/tmp", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (pk->fd < 0)
        pk->fd = open("/tmp", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    return pk->fd < 0 ? ERN_EIO : 0;
}

void zpacked_close(struct zpacked *pk)
{
    if (pk->fd >= 0)
        close(pk->fd);
    free(pk->tab);
    memset(pk, 0, sizeof(*pk));
    pk->fd = -1;
}

static int same_bytes(struct zpacked *pk, struct xfer *x, uint64_t off, const uint8_t *data,
                      uint32_t len)
{
    uint8_t buf[4096];
    for (uint32_t done = 0; done < len;) {
        uint32_t n = len - done < sizeof(buf) ? len - done : (uint32_t)sizeof(buf);
        if (x_read(x, pk->fd, buf, n, off + done, "packed file"))
            return -1;
        if (memcmp(buf, data + done, n))
            return 0;
        done += n;
    }
    return 1;
}

static int write_at(struct zpacked *pk, struct xfer *x, const uint8_t *p, uint32_t len,
                    uint64_t off)
{
    while (len) {
        ssize_t w = pwrite(pk->fd, p, len, (off_t)off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return xfail(x, ERN_EIO, "writing the packed file: %s", strerror(errno));
        p += w;
        len -= (uint32_t)w;
        off += (uint64_t)w;
    }
    return 0;
}

static int grow_table(struct zpacked *pk)
{
    uint32_t nc = pk->cap ? pk->cap * 2 : 1024;
    struct zfragent *t = calloc(nc, sizeof(*t));
    if (!t)
        return ERN_ENOMEM;
    for (uint32_t i = 0; i < pk->cap; i++) {
        if (!pk->tab[i].hash)
            continue;
        uint32_t k = (uint32_t)pk->tab[i].hash & (nc - 1);
        while (t[k].hash)
            k = (k + 1) & (nc - 1);
        t[k] = pk->tab[i];
    }
    free(pk->tab);
    pk->tab = t;
    pk->cap = nc;
    return 0;
}

int zpacked_add(struct zpacked *pk, struct xfer *x, const uint8_t *data, uint32_t len,
                uint64_t *off)
{
    if ((pk->n + 1) * 2 > pk->cap && grow_table(pk))
        return xfail(x, ERN_ENOMEM, "out of memory");
    uint64_t h = zhash64(data, len);
    uint32_t k = (uint32_t)h & (pk->cap - 1);
    for (; pk->tab[k].hash; k = (k + 1) & (pk->cap - 1)) {
        struct zfragent *e = &pk->tab[k];
        if (e->hash != h || e->len != len)
            continue;
        int same = same_bytes(pk, x, e->off, data, len);
        if (same < 0)
            return x->code ? x->code : ERN_EIO;
        if (same) {
            *off = e->off;
            return 0;
        }
    }
    int r = write_at(pk, x, data, len, pk->len);
    if (r)
        return r;
    pk->tab[k] = (struct zfragent){ .hash = h, .off = pk->len, .len = len };
    pk->n++;
    *off = pk->len;
    pk->len += len;
    return 0;
}
