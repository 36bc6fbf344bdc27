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
    uint64_t len;
};

/* a fragment's bytes: in memory (mem), or len bytes of fd from off (-Eall-fragments:
 * a whole file, read when needed) */
struct zfsrc {
    const uint8_t *mem;
    int fd;
    uint64_t off;
    const char *path;
};

static int src_read(struct xfer *x, const struct zfsrc *s, uint8_t *buf, uint32_t n,
                    uint64_t pos)
{
    if (s->mem) {
        memcpy(buf, s->mem + pos, n);
        return 0;
    }
    return x_read(x, s->fd, buf, n, s->off + pos, s->path);
}

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

#define CMP_CHUNK 16384u

/* 1: the packed inode's bytes at off are the fragment's len bytes, 0: not, < 0 error */
static int same_bytes(struct zpacked *pk, struct xfer *x, uint64_t off,
                      const struct zfsrc *s, uint64_t len)
{
    uint8_t buf[2][CMP_CHUNK];
    for (uint64_t done = 0; done < len;) {
        uint32_t n = len - done < CMP_CHUNK ? (uint32_t)(len - done) : CMP_CHUNK;
        if (x_read(x, pk->fd, buf[0], n, off + done, "packed file") ||
            src_read(x, s, buf[1], n, done))
            return -1;
        if (memcmp(buf[0], buf[1], n))
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

static int append(struct zpacked *pk, struct xfer *x, const struct zfsrc *s, uint64_t len)
{
    if (s->mem)
        return len <= UINT32_MAX ? write_at(pk, x, s->mem, (uint32_t)len, pk->len)
                                 : xfail(x, ERN_ELIMIT, "fragment too large");
    uint8_t buf[CMP_CHUNK * 4];
    for (uint64_t done = 0; done < len;) {
        uint32_t n = len - done < sizeof(buf) ? (uint32_t)(len - done) : (uint32_t)sizeof(buf);
        int r = src_read(x, s, buf, n, done);
        if (r || (r = write_at(pk, x, buf, n, pk->len + done)))
            return r;
        done += n;
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

/* the offset of the fragment's len bytes in the packed inode: appended, unless share
 * and an earlier fragment ends in them (then they point into it) */
static int zpacked_add(struct zpacked *pk, struct xfer *x, const struct zfsrc *s,
                       uint64_t len, int share, uint64_t *off)
{
    if ((pk->n + 1) * 2 > pk->cap && grow_table(pk))
        return xfail(x, ERN_ENOMEM, "out of memory");
    uint8_t key[TAIL_KEY];
    uint32_t kl = len < TAIL_KEY ? (uint32_t)len : TAIL_KEY;
    if (src_read(x, s, key, kl, len - kl))
        return x->code ? x->code : ERN_EIO;
    uint64_t h = zhash64(key, kl);
    h += !h;                        /* (0 marks a free slot) */
    uint32_t k = (uint32_t)h & (pk->cap - 1);
    uint32_t probes = 0;
    for (; share && pk->tab[k].hash; k = (k + 1) & (pk->cap - 1)) {
        struct zfragent *e = &pk->tab[k];
        /* the same key: an earlier fragment ending in these kl bytes; only as long or
         * longer ones can hold this one at their end (a key over fewer than TAIL_KEY
         * bytes is the whole fragment: then only the same length) */
        if (e->hash != h || e->len < len || (kl < TAIL_KEY && e->len != len))
            continue;
        if (probes++ >= MAX_PROBES)
            break;
        uint64_t at = e->off + e->len - len;
        int same = same_bytes(pk, x, at, s, len);
        if (same < 0)
            return x->code ? x->code : ERN_EIO;
        if (same) {
            *off = at;
            return 0;
        }
    }
    while (pk->tab[k].hash)         /* after a MAX_PROBES stop: the free slot */
        k = (k + 1) & (pk->cap - 1);
    int r = append(pk, x, s, len);
    if (r)
        return r;
    pk->tab[k] = (struct zfragent){ .hash = h, .off = pk->len, .len = len };
    pk->n++;
    *off = pk->len;
    pk->len += len;
    return 0;
}

int zpacked_append(struct zpacked *pk, struct xfer *x, const uint8_t *data, uint64_t len,
                   uint64_t *off)
{
    struct zfsrc s = { data, -1, 0, "directory" };
    int r = append(pk, x, &s, len);
    if (r)
        return r;
    *off = pk->len;
    pk->len += len;
    return 0;
}

int zfrag_whole(const struct zpool *p, struct zjob *j)
{
    struct zfile *zf = &j->zf;
    if (!p->zc->allfrags || j->packed || j->nocomp || !j->size)
        return 0;
    /* as mkfs.erofs -Eall-fragments: the whole file goes to the packed inode (which
     * is compressed as a whole), its inode a map header with the fragment's offset */
    memset(zf, 0, sizeof(*zf));
    zf->size = j->size;
    zf->ext = calloc(1, sizeof(*zf->ext));
    if (!zf->ext)
        return -1;
    zf->cap_ext = 1;
    zf->ext[0] = (struct zext){ .start = 0, .frag = 1 };
    zf->next = 1;
    zf->frag_src = 1;
    zf->frag_len = j->size;
    return 1;
}

#define TAIL_MIN 64u             /* the shortest end of a file matched (as mkfs.erofs) */

/* how many bytes before the end of fragment e the source's first len bytes end in:
 * compared backwards */
static int common_end(struct zpacked *pk, struct xfer *x, const struct zfsrc *s, uint64_t len,
                      const struct zfragent *e, uint64_t *m)
{
    uint8_t buf[2][CMP_CHUNK];
    uint64_t max = len < e->len ? len : e->len;
    *m = 0;
    while (*m < max) {
        uint32_t n = max - *m < CMP_CHUNK ? (uint32_t)(max - *m) : CMP_CHUNK;
        if (x_read(x, pk->fd, buf[0], n, e->off + e->len - *m - n, "packed file") ||
            src_read(x, s, buf[1], n, len - *m - n))
            return x->code ? x->code : ERN_EIO;
        uint32_t k = 0;
        while (k < n && buf[0][n - 1 - k] == buf[1][n - 1 - k])
            k++;
        *m += k;
        if (k < n)
            break;
    }
    return 0;
}

int zfrag_tail(struct zpool *p, struct zctx *c, struct xfer *x, struct zjob *j, int fd,
               int (*flush)(void *arg, struct zfile *zf), void *arg)
{
    struct zpacked *pk = &p->pk;
    struct zfile *zf = &j->zf;
    const uint32_t bs = x->blksz;
    if (p->zc->fragdedupe != 0 || j->size <= TAIL_MIN)
        return 0;
    /* -Efragdedupe=full: the longest end of the file that ends an earlier fragment
     * (not all of it: then the whole file points into that one, at its commit) stays
     * there; the rest is compressed as a file of its own. So that the fragments before
     * are all known, the file waits to be the oldest (flush, with nothing to place) */
    int r = flush(arg, zf);
    if (r || !pk->n)
        return r;
    struct zfsrc s = { NULL, fd, j->offset, j->path };
    uint8_t key[TAIL_KEY];
    if (src_read(x, &s, key, TAIL_KEY, j->size - TAIL_KEY))
        return x->code ? x->code : ERN_EIO;
    uint64_t h = zhash64(key, TAIL_KEY), best = 0, at = 0;
    h += !h;
    uint32_t probes = 0;
    for (uint32_t k = (uint32_t)h & (pk->cap - 1); pk->tab[k].hash; k = (k + 1) & (pk->cap - 1)) {
        const struct zfragent *e = &pk->tab[k];
        if (e->hash != h || e->len < TAIL_KEY)
            continue;
        if (probes++ >= MAX_PROBES)
            break;
        uint64_t m;
        if ((r = common_end(pk, x, &s, j->size, e, &m)))
            return r;
        if (m > best) {
            best = m;
            at = e->off + e->len - m;
        }
    }
    if (best < TAIL_MIN || best == j->size)
        return 0;
    /* as mkfs.erofs: the file compressed from its start until its extents cover the
     * part before the match (the last one may take some of the match); the rest of
     * the match is the fragment */
    uint64_t head = j->size - best;
    struct zconf hz = *c->zc;          /* no fragment, no inline tail */
    hz.frags = 0;
    hz.ztail = 0;
    const struct zconf *keep = c->zc;
    c->zc = &hz;
    c->stop_at = head;
    zfile_free(zf);
    r = zfile_compress(c, x, fd, j->path, j->offset, j->size, 0, j->size, zf, flush, arg);
    c->zc = keep;
    c->stop_at = 0;
    if (r)
        return r;
    struct zext *le = zf->next ? &zf->ext[zf->next - 1] : NULL;
    uint64_t done = le ? le->start + le->dlen : 0;
    int append = 0;
    if (le && done >= j->size && zf->placed < zf->next &&
        (uint64_t)le->nblk * bs <= align_up(head - le->start, bs)) {
        /* the last pcluster took the rest of the file in no more blocks than the head
         * left for it needed: the rest goes to the packed inode instead (mkfs.erofs's
         * "fix_dedupedfrag" way) */
        zf->dlen -= (uint64_t)le->nblk * bs;
        zf->nblocks -= le->nblk;
        done = le->start;
        zf->next--;
        append = 1;
    } else if (done >= j->size) {
        return 0;                      /* compressed to its end */
    }
    zf->plain = 0;
    if (zf->next == zf->cap_ext) {
        struct zext *ne = realloc(zf->ext, (zf->cap_ext + 1) * sizeof(*ne));
        if (!ne)
            return xfail(x, ERN_ENOMEM, "out of memory");
        zf->ext = ne;
        zf->cap_ext++;
    }
    zf->ext[zf->next++] = (struct zext){ .start = done, .pblk = zf->nblocks, .frag = 1 };
    zf->frag_src = append ? 1 : 2;     /* 2: its place known, nothing to append */
    zf->frag_len = j->size - done;
    zf->fragoff = append ? 0 : at + (done - head);
    return 0;
}

int zpacked_commit(struct zpool *p, struct zjob *j, struct zfile *zf, struct xfer *x)
{
    struct zfsrc s = { zf->frag, -1, j->offset + (j->size - zf->frag_len), j->path };
    /* -Efragdedupe=inode: only a whole file's fragment is shared; ^fragdedupe: none */
    int whole = zf->next == 1;
    int share = p->zc->fragdedupe == 0 || (p->zc->fragdedupe == 1 && whole);
    int r = 0;
    if (zf->frag_src == 1 && (r = zjob_open_source(x, j, &s.fd)))
        return r;
    if (zf->frag_src != 2)
        r = zpacked_add(&p->pk, x, &s, zf->frag_len, share, &zf->fragoff);
    if (s.fd >= 0)
        close(s.fd);
    if (r)
        return r;
    p->zc->incompat |= EROFS_FEATURE_INCOMPAT_FRAGMENTS;
    /* compact indexes hold 32 bits of the offset; a whole-file fragment has its own
     * (full) form */
    j->zfull |= whole || zf->fragoff >> 32;
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
