/* erofs-tools C core, -Efragments: the packed inode's contents while the image is built.
 *
 * A compressed file's last extent (at most a pcluster of input) may go to the packed
 * inode, a file of its own reached only through sb.packed_nid, compressed once every
 * other file is placed; the file's map header then holds the fragment's offset in it.
 * Fragments are appended in commit order (the walk order), so the packed inode, and the
 * image, do not depend on the thread count. A fragment equal to the end of one already
 * appended (duplicate small files, common tails, a short file that is the tail of a
 * longer one) is not appended again: it points into that one. Fragments are found by
 * a hash of their last TAIL_KEY bytes (all of them when shorter), so a match is a
 * suffix of an earlier fragment at least as long.
 *
 * With long xattr name prefixes, the packed inode's data starts with their table, as
 * mkfs.erofs 1.9 writes it with -Efragments (xattr_prefix_start 0, no PLAIN_XATTR_PFX:
 * every kernel since 6.4 reads the table there when the image has a packed inode).
 */
#include "compress_int.h"

#define TAIL_KEY 32u             /* bytes at a fragment's end that its key hashes */
#define MAX_PROBES 64u           /* candidates compared per fragment (common tails) */

struct zfragent {
    uint64_t hash;           /* 0: free slot; the hash of the last TAIL_KEY bytes */
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
    uint32_t kl = len < TAIL_KEY ? len : TAIL_KEY;
    uint64_t h = zhash64(data + (len - kl), kl);
    uint32_t k = (uint32_t)h & (pk->cap - 1);
    uint32_t probes = 0;
    for (; pk->tab[k].hash; k = (k + 1) & (pk->cap - 1)) {
        struct zfragent *e = &pk->tab[k];
        /* the same key: an earlier fragment ending in these kl bytes; only as long or
         * longer ones can hold this one at their end (a key over fewer than TAIL_KEY
         * bytes is the whole fragment: then only the same length) */
        if (e->hash != h || e->len < len || (kl < TAIL_KEY && e->len != len))
            continue;
        if (probes++ >= MAX_PROBES)
            break;
        uint64_t at = e->off + e->len - len;
        int same = same_bytes(pk, x, at, data, len);
        if (same < 0)
            return x->code ? x->code : ERN_EIO;
        if (same) {
            *off = at;
            return 0;
        }
    }
    while (pk->tab[k].hash)         /* after a MAX_PROBES stop: the free slot */
        k = (k + 1) & (pk->cap - 1);
    int r = write_at(pk, x, data, len, pk->len);
    if (r)
        return r;
    pk->tab[k] = (struct zfragent){ .hash = h, .off = pk->len, .len = len };
    pk->n++;
    *off = pk->len;
    pk->len += len;
    return 0;
}

int zpacked_prefixes(erofs_builder *b)
{
    struct zpool *p = b->zp;
    if (!p || !b->xpfx_packed || p->pk.fd < 0)
        return 0;               /* (the pool not started yet: its start calls this) */
    if (p->pk.len)
        return fail(b, ERN_EINVAL, "long xattr prefixes set after a fragment");
    struct xfer x;
    memset(&x, 0, sizeof(x));
    int r = write_at(&p->pk, &x, b->xpfx, b->xpfx_len, 0);
    if (r)
        return fail(b, r, "%s", x.err);
    p->pk.len = b->xpfx_len;
    for (uint32_t i = 0, off = 0; i < b->xpfx_count; i++) {
        uint32_t sz = (uint32_t)b->xpfx[off] | (uint32_t)b->xpfx[off + 1] << 8;
        p->pk.bare = off + 2 + sz;
        off = (off + 2 + sz + 3) & ~3u;
    }
    p->zc->incompat |= EROFS_FEATURE_INCOMPAT_FRAGMENTS;
    return 0;
}
