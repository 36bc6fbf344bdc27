/* erofs-tools C core: node-graph EROFS image builder.
 *
 * Nodes are added in any order; layout() sorts directory entries bytewise, computes
 * nlink, xattr packing (inline + shared), inode formats, nids (root first, breadth
 * first) and data blocks; write() streams the metadata through a small window buffer
 * and copies file data with copy_file_range (pread/pwrite fallback). No file is read
 * whole into memory; holes of sparse files are never read.
 *
 * Image map (mkfs defaults): block 0 = superblock at 1024, inodes from byte 1152
 * (meta_blkaddr 0, root nid 36), then the shared xattr area (block aligned), then data
 * blocks (directories and files, in nid order).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>
#include "erofs_native.h"

#define EROFS_MAGIC 0xE0F5E1E2u
#define SB_OFFSET 1024
#define FEAT_COMPAT_SB_CHKSUM 0x1u
#define FEAT_INCOMPAT_CHUNKED 0x4u
#define FEAT_INCOMPAT_DEVT 0x8u
#define NULL_ADDR 0xFFFFFFFFu
#define NONE32 0xFFFFFFFFu
#define CHUNK_INDEXES 0x20u

enum { L_PLAIN = 0, L_INLINE = 2, L_CHUNK = 4 };
enum { D_NONE = 0, D_FILE, D_BYTES, D_CHUNKS, D_SPARSE };

struct node {
    uint64_t size;
    int64_t mtime;
    uint64_t nid;
    uint64_t meta_off;      /* absolute byte offset of the inode */
    uint64_t data_off;      /* D_FILE: source offset; D_BYTES: arena offset */
    uint32_t mode, uid, gid, mtime_nsec;
    uint32_t rdev;          /* new encoding */
    uint32_t nlink;
    uint32_t parent;        /* directories: parent node (NONE32 = none yet) */
    uint32_t path_off, path_len; /* D_FILE / D_SPARSE: source path in arena */
    uint32_t aux;           /* D_CHUNKS / D_SPARSE: index into b->chunks */
    uint32_t xa_first, xa_count;  /* after layout: range in sorted xattr array */
    uint32_t de_first, de_count;  /* after layout: range in sorted dirent array */
    uint32_t startblk;
    uint32_t xattr_isize;
    uint32_t tail;          /* inline tail bytes */
    uint32_t ino;           /* i_ino (order + 1) */
    uint32_t xa_max;        /* xattr ibody size if every xattr were inline */
    uint8_t dkind, layout, extended, placed;
    uint8_t streamed, stream_inline;
    uint8_t *tailbuf;       /* stream mode: inline tail read by the worker (or NULL) */
};

/* a copy job for the stream worker: everything it needs, nothing shared */
struct job {
    struct job *next;
    char *path;
    uint64_t src_off, out_off, full, tail_src_off, expect_size;
    uint8_t *tailbuf;
    uint32_t tail;
    uint64_t *sparse;       /* D_SPARSE: chunk entries (1 | blk << 32) or NULL */
    uint32_t nchunks;
    uint64_t csz, size;
};

/* data transfer context: one per thread (own buffer, own error message) */
struct xfer {
    int out;
    uint32_t blksz;
    uint8_t *buf;
    volatile uint64_t *bytes;
    int code;
    char err[600];
};

struct dirent_rec {
    uint32_t parent, child;
    uint32_t name_off;
    uint16_t name_len;
};

struct xattr_rec {
    uint32_t node;
    uint32_t name_off;      /* suffix in arena */
    uint32_t val_off;
    uint16_t val_len;
    uint8_t index, name_len;
    uint32_t shared_id;     /* NONE32 = inline */
};

struct chunkset {
    uint32_t format;        /* i_u low 16 bits */
    uint32_t count;
    uint64_t *entries;      /* D_CHUNKS: raw entries; D_SPARSE: 0 hole / 1 data, then blkaddr */
};

struct device {
    uint8_t tag[64];
    uint32_t blocks, mapped;
};

struct putbytes {
    uint64_t off;
    size_t len;
    uint8_t *data;
};

struct erofs_builder {
    struct erofs_opts o;
    uint32_t blksz;
    char err[600];
    struct node *nodes;
    uint32_t nnodes, cap_nodes;
    struct dirent_rec *des;
    uint32_t nde, cap_de;
    struct xattr_rec *xas;
    uint32_t nxa, cap_xa;
    uint8_t *arena;
    uint64_t arena_len, arena_cap;
    struct chunkset *chunks;
    uint32_t nchunks, cap_chunks;
    struct device *devs;
    uint32_t ndevs;
    struct putbytes *puts;
    uint32_t nputs;
    uint32_t root;
    int laid_out;
    uint32_t *order;        /* nid order of node ids */
    uint32_t *worder;       /* node ids by inode offset (write order) */
    uint32_t norder;
    struct erofs_layout_info info;
    uint32_t *shared_order; /* xattr rec index of each shared xattr, in id order */
    uint32_t nshared;
    /* write state */
    int fd;
    uint32_t wpos;
    uint8_t *win;
    uint64_t win_start, win_hi;
    uint8_t *cbuf;
    uint64_t bytes_done;
    int wfailed;
    uint64_t first_inode_off;
    int wdone, sb_blocks_set;
    uint64_t sb_blocks_val;
    /* stream mode */
    int sfd;
    uint64_t scur;          /* next free data block */
    uint64_t tail_mem;
    int worker_on, qstop, qabort;
    pthread_t worker;
    pthread_mutex_t mu;
    pthread_cond_t cv_job, cv_space, cv_idle;
    struct job *qhead, *qtail;
    uint32_t qlen;
    int werr_code;
    char werr[600];
    volatile uint64_t sbytes;
};

static int xfail(struct xfer *x, int code, const char *fmt, ...);
static int x_read(struct xfer *x, int fd, uint8_t *buf, size_t len, uint64_t off,
                  const char *path);
static int x_copy(struct xfer *x, int in, uint64_t in_off, uint64_t out_off, uint64_t len,
                  const char *path);
static int x_copy_sparse(struct xfer *x, int fd, const char *path, uint64_t size,
                         const uint64_t *entries, uint32_t count, uint64_t csz);
static int stream_stop(erofs_builder *b, int abort);
static uint64_t align_up(uint64_t v, uint64_t a);

#define WIN_SIZE (1u << 20)
#define CBUF_SIZE (1u << 20)

static int fail(erofs_builder *b, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b->err, sizeof(b->err), fmt, ap);
    va_end(ap);
    return code;
}

static void *grow(void *p, uint32_t *cap, uint32_t need, size_t elem)
{
    if (need <= *cap)
        return p;
    uint64_t nc = *cap ? (uint64_t)*cap * 2 : 64;
    while (nc < need)
        nc *= 2;
    if (nc > 0xFFFFFFF0u)
        nc = 0xFFFFFFF0u;
    void *np = realloc(p, nc * elem);
    if (!np)
        return NULL;
    *cap = (uint32_t)nc;
    return np;
}

static int64_t arena_put(erofs_builder *b, const void *data, size_t len)
{
    if (b->arena_len + len > 0xFFFFFFFFull)
        return fail(b, ERN_ELIMIT, "too much name/path data (over 4 GiB)");
    if (b->arena_len + len > b->arena_cap) {
        uint64_t nc = b->arena_cap ? b->arena_cap * 2 : 65536;
        while (nc < b->arena_len + len)
            nc *= 2;
        uint8_t *np = realloc(b->arena, nc);
        if (!np)
            return fail(b, ERN_ENOMEM, "out of memory");
        b->arena = np;
        b->arena_cap = nc;
    }
    uint64_t off = b->arena_len;
    if (len)
        memcpy(b->arena + off, data, len);
    b->arena_len += len;
    return (int64_t)off;
}

void erofs_default_opts(struct erofs_opts *o)
{
    memset(o, 0, sizeof(*o));
    o->blkszbits = 12;
    o->feature_compat = 0x2; /* MTIME, as mkfs.erofs */
    o->sb_checksum = 1;
    o->shared_xattrs = 1;
    o->inline_data = 1;
    o->auto_build_time = 1;
}

erofs_builder *erofs_builder_new(const struct erofs_opts *o)
{
    erofs_builder *b = calloc(1, sizeof(*b));
    if (!b)
        return NULL;
    if (o)
        b->o = *o;
    else
        erofs_default_opts(&b->o);
    if (b->o.blkszbits < 9 || b->o.blkszbits > 12)
        b->o.blkszbits = 12;
    b->blksz = 1u << b->o.blkszbits;
    b->root = NONE32;
    b->fd = -1;
    b->sfd = -1;
    return b;
}

void erofs_builder_free(erofs_builder *b)
{
    if (!b)
        return;
    stream_stop(b, 1);
    for (uint32_t i = 0; i < b->nnodes; i++)
        free(b->nodes[i].tailbuf);
    free(b->nodes);
    free(b->des);
    free(b->xas);
    free(b->arena);
    for (uint32_t i = 0; i < b->nchunks; i++)
        free(b->chunks[i].entries);
    free(b->chunks);
    free(b->devs);
    for (uint32_t i = 0; i < b->nputs; i++)
        free(b->puts[i].data);
    free(b->puts);
    free(b->order);
    free(b->worder);
    free(b->shared_order);
    free(b->win);
    free(b->cbuf);
    free(b);
}

const char *erofs_builder_error(erofs_builder *b)
{
    return b->err;
}

uint32_t erofs_node_count(erofs_builder *b)
{
    return b->nnodes;
}

static int check_mutable(erofs_builder *b)
{
    if (b->laid_out)
        return fail(b, ERN_EINVAL, "builder already laid out");
    return 0;
}

static int check_node(erofs_builder *b, uint32_t n)
{
    if (n >= b->nnodes)
        return fail(b, ERN_EINVAL, "no such node %u", n);
    return 0;
}

int64_t erofs_node_add(erofs_builder *b, uint32_t mode, uint32_t uid, uint32_t gid,
                       int64_t mtime, uint32_t mtime_nsec, uint64_t size,
                       uint32_t rdev_major, uint32_t rdev_minor)
{
    int r = check_mutable(b);
    if (r)
        return r;
    uint32_t fmt = mode & S_IFMT;
    if (fmt != S_IFREG && fmt != S_IFDIR && fmt != S_IFLNK && fmt != S_IFCHR &&
        fmt != S_IFBLK && fmt != S_IFIFO && fmt != S_IFSOCK)
        return fail(b, ERN_EINVAL, "bad file type in mode 0%o", mode);
    if (mode & ~0xFFFFu)
        return fail(b, ERN_EINVAL, "bad mode 0%o", mode);
    if (mtime_nsec >= 1000000000u)
        return fail(b, ERN_EINVAL, "bad mtime nanoseconds %u", mtime_nsec);
    if (b->nnodes >= 0x7FFFFFF0u)
        return fail(b, ERN_ELIMIT, "too many inodes");
    struct node *nn = grow(b->nodes, &b->cap_nodes, b->nnodes + 1, sizeof(*nn));
    if (!nn)
        return fail(b, ERN_ENOMEM, "out of memory");
    b->nodes = nn;
    struct node *n = &b->nodes[b->nnodes];
    memset(n, 0, sizeof(*n));
    n->mode = mode;
    n->uid = uid;
    n->gid = gid;
    n->mtime = mtime;
    n->mtime_nsec = mtime_nsec;
    n->parent = NONE32;
    n->aux = NONE32;
    if (fmt == S_IFDIR || fmt == S_IFCHR || fmt == S_IFBLK || fmt == S_IFIFO ||
        fmt == S_IFSOCK)
        size = 0;     /* directory size is computed; devices have none */
    n->size = size;
    if (fmt == S_IFCHR || fmt == S_IFBLK) {
        if (rdev_major > 0xFFF || rdev_minor > 0xFFFFF)
            return fail(b, ERN_ELIMIT, "device number %u:%u too large", rdev_major, rdev_minor);
        n->rdev = (rdev_minor & 0xff) | (rdev_major << 8) | ((rdev_minor & ~0xffu) << 12);
    }
    return b->nnodes++;
}

static const struct {
    const char *prefix;
    uint8_t len, index, whole;
} xprefixes[] = {
    {"user.", 5, 1, 0},
    {"system.posix_acl_access", 23, 2, 1},
    {"system.posix_acl_default", 24, 3, 1},
    {"trusted.", 8, 4, 0},
    {"lustre.", 7, 5, 0},
    {"security.", 9, 6, 0},
};

int erofs_node_add_xattr(erofs_builder *b, uint32_t node, const char *name, size_t namelen,
                         const char *value, size_t valuelen)
{
    int r = check_mutable(b);
    if (r || (r = check_node(b, node)))
        return r;
    int idx = -1;
    for (unsigned i = 0; i < sizeof(xprefixes) / sizeof(xprefixes[0]); i++) {
        size_t pl = xprefixes[i].len;
        if (xprefixes[i].whole ? (namelen == pl && !memcmp(name, xprefixes[i].prefix, pl))
                               : (namelen > pl && !memcmp(name, xprefixes[i].prefix, pl))) {
            idx = (int)i;
            break;
        }
    }
    if (idx < 0)
        return fail(b, ERN_ELIMIT, "xattr name '%.*s' has a prefix EROFS cannot store",
                    (int)(namelen > 200 ? 200 : namelen), name);
    size_t sl = namelen - xprefixes[idx].len;
    if (sl > 255)
        return fail(b, ERN_ELIMIT, "xattr name too long (%zu bytes)", namelen);
    if (valuelen > 65535)
        return fail(b, ERN_ELIMIT, "xattr value too large (%zu bytes)", valuelen);
    if (memchr(name, 0, namelen))
        return fail(b, ERN_EINVAL, "xattr name contains NUL");
    struct xattr_rec *nx = grow(b->xas, &b->cap_xa, b->nxa + 1, sizeof(*nx));
    if (!nx)
        return fail(b, ERN_ENOMEM, "out of memory");
    b->xas = nx;
    int64_t no = arena_put(b, name + xprefixes[idx].len, sl);
    if (no < 0)
        return (int)no;
    int64_t vo = arena_put(b, value, valuelen);
    if (vo < 0)
        return (int)vo;
    struct node *xn = &b->nodes[node];
    if (xn->streamed)
        return fail(b, ERN_EINVAL, "stream mode: add xattrs before the file data");
    xn->xa_max += (xn->xa_max ? 0 : 12) + (uint32_t)((4 + sl + valuelen + 3) & ~(size_t)3);
    struct xattr_rec *x = &b->xas[b->nxa++];
    x->node = node;
    x->name_off = (uint32_t)no;
    x->name_len = (uint8_t)sl;
    x->val_off = (uint32_t)vo;
    x->val_len = (uint16_t)valuelen;
    x->index = xprefixes[idx].index;
    x->shared_id = NONE32;
    return 0;
}

int erofs_dir_add(erofs_builder *b, uint32_t dir, const char *name, size_t namelen,
                  uint32_t child)
{
    int r = check_mutable(b);
    if (r || (r = check_node(b, dir)) || (r = check_node(b, child)))
        return r;
    if ((b->nodes[dir].mode & S_IFMT) != S_IFDIR)
        return fail(b, ERN_EINVAL, "node %u is not a directory", dir);
    if (namelen < 1 || namelen > 255)
        return fail(b, ERN_ELIMIT, "name of %zu bytes (EROFS allows 1..255)", namelen);
    if (memchr(name, '/', namelen) || memchr(name, 0, namelen))
        return fail(b, ERN_ELIMIT, "name contains '/' or NUL");
    if ((namelen == 1 && name[0] == '.') || (namelen == 2 && name[0] == '.' && name[1] == '.'))
        return fail(b, ERN_EINVAL, "name '.' or '..' cannot be added");
    struct node *c = &b->nodes[child];
    if ((c->mode & S_IFMT) == S_IFDIR) {
        if (child == b->root || c->parent != NONE32)
            return fail(b, ERN_EINVAL, "directory node %u already has a parent", child);
        c->parent = dir;
    }
    struct dirent_rec *nd = grow(b->des, &b->cap_de, b->nde + 1, sizeof(*nd));
    if (!nd)
        return fail(b, ERN_ENOMEM, "out of memory");
    b->des = nd;
    int64_t off = arena_put(b, name, namelen);
    if (off < 0)
        return (int)off;
    struct dirent_rec *d = &b->des[b->nde++];
    d->parent = dir;
    d->child = child;
    d->name_off = (uint32_t)off;
    d->name_len = (uint16_t)namelen;
    return 0;
}

static int check_datanode(erofs_builder *b, uint32_t node, int allow_link)
{
    int r = check_mutable(b);
    if (r || (r = check_node(b, node)))
        return r;
    uint32_t fmt = b->nodes[node].mode & S_IFMT;
    if (fmt != S_IFREG && !(allow_link && fmt == S_IFLNK))
        return fail(b, ERN_EINVAL, "node %u cannot carry data", node);
    if (b->nodes[node].dkind != D_NONE)
        return fail(b, ERN_EINVAL, "node %u already has a data source", node);
    return 0;
}

static int new_chunkset(erofs_builder *b, uint32_t format, uint32_t count)
{
    struct chunkset *nc = grow(b->chunks, &b->cap_chunks, b->nchunks + 1, sizeof(*nc));
    if (!nc)
        return fail(b, ERN_ENOMEM, "out of memory");
    b->chunks = nc;
    struct chunkset *cs = &b->chunks[b->nchunks];
    cs->format = format;
    cs->count = count;
    cs->entries = calloc(count ? count : 1, sizeof(uint64_t));
    if (!cs->entries)
        return fail(b, ERN_ENOMEM, "out of memory");
    return (int)b->nchunks++;
}

/* Sparse scan: chunk size chosen so that a file has at most 64Ki chunks; a chunk is a
 * hole when no data extent touches it. Returns 1 if chunk-based, 0 to stay flat. */
static int sparse_scan(erofs_builder *b, struct node *n, int fd, const char *path)
{
    uint64_t size = n->size;
    unsigned k = 0;
    while (((size + ((uint64_t)b->blksz << k) - 1) >> (b->o.blkszbits + k)) > 65536 && k < 31)
        k++;
    uint64_t csz = (uint64_t)b->blksz << k;
    uint64_t count = (size + csz - 1) / csz;
    if (count == 0)
        return 0;
    uint8_t *has = calloc(count, 1);
    if (!has)
        return fail(b, ERN_ENOMEM, "out of memory");
    off_t pos = 0;
    int any_hole = 0;
    while ((uint64_t)pos < size) {
        off_t d = lseek(fd, pos, SEEK_DATA);
        if (d < 0) {
            if (errno == ENXIO)
                break;
            free(has);
            if (errno == EINVAL || errno == EOPNOTSUPP)
                return 0;  /* no SEEK_DATA here: copy flat */
            return fail(b, ERN_EIO, "%s: seek: %s", path, strerror(errno));
        }
        if ((uint64_t)d >= size)
            break;
        off_t h = lseek(fd, d, SEEK_HOLE);
        if (h < 0 || (uint64_t)h > size)
            h = (off_t)size;
        for (uint64_t c = (uint64_t)d / csz; c * csz < (uint64_t)h && c < count; c++)
            has[c] = 1;
        pos = h;
    }
    for (uint64_t c = 0; c < count; c++)
        if (!has[c])
            any_hole = 1;
    if (!any_hole) {
        free(has);
        return 0;
    }
    int ci = new_chunkset(b, k, (uint32_t)count);
    if (ci < 0) {
        free(has);
        return ci;
    }
    for (uint64_t c = 0; c < count; c++)
        b->chunks[ci].entries[c] = has[c];
    free(has);
    n->aux = (uint32_t)ci;
    return 1;
}

/* ---------------------------------------------------------- stream worker ---- */

#define QMAX 4096

static int run_job(struct xfer *x, struct job *j)
{
    int fd = open(j->path, O_RDONLY | O_NOCTTY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return xfail(x, ERN_EIO, "%s: %s", j->path, strerror(errno));
    int r = 0;
    struct stat st;
    if (j->expect_size != UINT64_MAX && fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
        (uint64_t)st.st_size != j->expect_size)
        r = xfail(x, ERN_EIO, "%s: size changed while building the image", j->path);
    if (!r && j->sparse) {
        r = x_copy_sparse(x, fd, j->path, j->size, j->sparse, j->nchunks, j->csz);
    } else {
        if (!r && j->full)
            r = x_copy(x, fd, j->src_off, j->out_off, j->full, j->path);
        if (!r && j->tail && j->tailbuf) {
            r = x_read(x, fd, j->tailbuf, j->tail, j->tail_src_off, j->path);
            *x->bytes += j->tail;
        }
    }
    close(fd);
    return r;
}

static void *worker_main(void *arg)
{
    erofs_builder *b = arg;
    struct xfer x;
    memset(&x, 0, sizeof(x));
    x.out = b->sfd;
    x.blksz = b->blksz;
    x.bytes = &b->sbytes;
    x.buf = malloc(CBUF_SIZE);
    for (;;) {
        pthread_mutex_lock(&b->mu);
        while (!b->qhead && !b->qstop)
            pthread_cond_wait(&b->cv_job, &b->mu);
        struct job *j = b->qhead;
        if (!j) {
            pthread_mutex_unlock(&b->mu);
            break;
        }
        b->qhead = j->next;
        if (!b->qhead)
            b->qtail = NULL;
        b->qlen--;
        int skip = b->qabort || b->werr_code;
        pthread_cond_signal(&b->cv_space);
        pthread_mutex_unlock(&b->mu);
        if (!skip) {
            int r = x.buf ? run_job(&x, j) : xfail(&x, ERN_ENOMEM, "out of memory");
            if (r) {
                pthread_mutex_lock(&b->mu);
                if (!b->werr_code) {
                    memcpy(b->werr, x.err, sizeof(b->werr));
                    b->werr_code = r;
                }
                pthread_cond_broadcast(&b->cv_space);
                pthread_mutex_unlock(&b->mu);
            }
        }
        free(j->path);
        free(j);
    }
    free(x.buf);
    return NULL;
}

/* stop the worker (after it drained the queue, or dropping it when abort) */
static int stream_stop(erofs_builder *b, int abort)
{
    if (!b->worker_on)
        return 0;
    pthread_mutex_lock(&b->mu);
    b->qstop = 1;
    b->qabort = abort;
    pthread_cond_broadcast(&b->cv_job);
    pthread_mutex_unlock(&b->mu);
    pthread_join(b->worker, NULL);
    b->worker_on = 0;
    pthread_mutex_destroy(&b->mu);
    pthread_cond_destroy(&b->cv_job);
    pthread_cond_destroy(&b->cv_space);
    pthread_cond_destroy(&b->cv_idle);
    if (b->werr_code && !abort)
        return fail(b, b->werr_code, "%s", b->werr);
    return 0;
}

static int enqueue(erofs_builder *b, struct job *j)
{
    pthread_mutex_lock(&b->mu);
    while (b->qlen >= QMAX && !b->werr_code)
        pthread_cond_wait(&b->cv_space, &b->mu);
    int err = b->werr_code;
    if (!err) {
        j->next = NULL;
        if (b->qtail)
            b->qtail->next = j;
        else
            b->qhead = j;
        b->qtail = j;
        b->qlen++;
        pthread_cond_signal(&b->cv_job);
    } else {
        memcpy(b->err, b->werr, sizeof(b->err));
    }
    pthread_mutex_unlock(&b->mu);
    if (err) {
        free(j->path);
        free(j);
        return err;
    }
    return 0;
}

int erofs_builder_set_output(erofs_builder *b, int fd)
{
    int r = check_mutable(b);
    if (r)
        return r;
    if (!b->o.stream_data)
        return fail(b, ERN_EINVAL, "set_output needs stream_data");
    if (b->worker_on)
        return fail(b, ERN_EINVAL, "output already set");
    if (ftruncate(fd, 0) < 0)
        return fail(b, ERN_EIO, "truncating the image: %s", strerror(errno));
    b->sfd = fd;
    b->scur = (SB_OFFSET + 128 + b->blksz - 1) / b->blksz;
    pthread_mutex_init(&b->mu, NULL);
    pthread_cond_init(&b->cv_job, NULL);
    pthread_cond_init(&b->cv_space, NULL);
    pthread_cond_init(&b->cv_idle, NULL);
    b->qstop = b->qabort = 0;
    if (pthread_create(&b->worker, NULL, worker_main, b) != 0)
        return fail(b, ERN_ENOMEM, "cannot start the copy thread");
    b->worker_on = 1;
    return 0;
}

int erofs_builder_stream_progress(erofs_builder *b, uint64_t *bytes_done)
{
    if (bytes_done)
        *bytes_done = b->sbytes;
    return b->werr_code;
}

static int stream_file(erofs_builder *b, uint32_t node, const char *path, size_t pathlen,
                       uint64_t offset)
{
    uint32_t blksz = b->blksz;
    struct node *n = &b->nodes[node];
    struct job *j = calloc(1, sizeof(*j));
    if (!j)
        return fail(b, ERN_ENOMEM, "out of memory");
    j->path = strndup(path, pathlen);
    if (!j->path) {
        free(j);
        return fail(b, ERN_ENOMEM, "out of memory");
    }
    j->src_off = offset;
    j->expect_size = offset == 0 ? n->size : UINT64_MAX;
    j->size = n->size;
    if (n->dkind == D_SPARSE) {
        struct chunkset *cs = &b->chunks[n->aux];
        uint64_t csz = (uint64_t)blksz << (cs->format & 0x1F);
        for (uint32_t c = 0; c < cs->count; c++) {
            if (!(cs->entries[c] & 1))
                continue;
            uint64_t start = (uint64_t)c * csz;
            uint64_t len = n->size - start < csz ? n->size - start : csz;
            cs->entries[c] = 1 | (b->scur << 32);
            b->scur += (len + blksz - 1) / blksz;
        }
        j->sparse = cs->entries;
        j->nchunks = cs->count;
        j->csz = csz;
    } else {
        uint64_t tail = n->size % blksz;
        int inl = b->o.inline_data && tail && 64 + n->xa_max + tail <= blksz;
        uint64_t full = inl ? n->size - tail : n->size;
        uint64_t nblk = (full + blksz - 1) / blksz;
        n->startblk = nblk ? (uint32_t)b->scur : (inl ? NULL_ADDR : 0);
        b->scur += nblk;
        j->out_off = nblk ? (uint64_t)n->startblk * blksz : 0;
        j->full = full;
        if (inl) {
            uint64_t budget = (uint64_t)(b->o.tail_budget_mib ? b->o.tail_budget_mib : 64) << 20;
            j->tail = (uint32_t)tail;
            j->tail_src_off = offset + full;
            if (b->tail_mem + tail <= budget) {
                n->tailbuf = malloc(tail);
                if (n->tailbuf)
                    b->tail_mem += tail;
            }
            j->tailbuf = n->tailbuf;
        }
        n->stream_inline = (uint8_t)inl;
    }
    if (b->scur > 0xFFFFFFFFull) {
        free(j->path);
        free(j);
        return fail(b, ERN_ELIMIT, "image larger than 2^32 blocks");
    }
    n->streamed = 1;
    return enqueue(b, j);
}

int erofs_node_set_file(erofs_builder *b, uint32_t node, const char *path, size_t pathlen,
                        uint64_t offset, int flags)
{
    int r = check_datanode(b, node, 0);
    if (r)
        return r;
    if (pathlen == 0 || pathlen > 65535 || memchr(path, 0, pathlen))
        return fail(b, ERN_EINVAL, "bad source path");
    struct node *n = &b->nodes[node];
    int64_t po = arena_put(b, path, pathlen);
    if (po < 0)
        return (int)po;
    n = &b->nodes[node];
    n->path_off = (uint32_t)po;
    n->path_len = (uint32_t)pathlen;
    n->data_off = offset;
    n->dkind = D_FILE;
    if ((flags & ERN_FILE_SPARSE) && offset == 0 && n->size > b->blksz) {
        char *p = strndup(path, pathlen);
        if (!p)
            return fail(b, ERN_ENOMEM, "out of memory");
        int fd = open(p, O_RDONLY | O_NOCTTY | O_CLOEXEC);
        if (fd < 0) {
            r = fail(b, ERN_EIO, "%s: %s", p, strerror(errno));
            free(p);
            return r;
        }
        r = sparse_scan(b, n, fd, p);
        close(fd);
        free(p);
        if (r < 0)
            return r;
        if (r == 1)
            n->dkind = D_SPARSE;
    }
    if (b->o.stream_data) {
        if (!b->worker_on)
            return fail(b, ERN_EINVAL, "stream mode: call erofs_builder_set_output first");
        return stream_file(b, node, path, pathlen, offset);
    }
    return 0;
}

int erofs_node_set_bytes(erofs_builder *b, uint32_t node, const char *data, size_t len)
{
    int r = check_datanode(b, node, 1);
    if (r)
        return r;
    if (len != b->nodes[node].size)
        return fail(b, ERN_EINVAL, "data length %zu differs from node size %llu", len,
                    (unsigned long long)b->nodes[node].size);
    int64_t off = arena_put(b, data, len);
    if (off < 0)
        return (int)off;
    b->nodes[node].data_off = (uint64_t)off;
    b->nodes[node].dkind = D_BYTES;
    return 0;
}

int erofs_node_set_chunks(erofs_builder *b, uint32_t node, uint32_t chunk_format,
                          const uint64_t *entries, uint32_t count)
{
    int r = check_datanode(b, node, 0);
    if (r)
        return r;
    if (chunk_format & ~0x3Fu)
        return fail(b, ERN_EINVAL, "chunk format 0x%x has unsupported bits", chunk_format);
    unsigned cbits = b->o.blkszbits + (chunk_format & 0x1F);
    if (cbits > 63)
        return fail(b, ERN_EINVAL, "chunk size too large");
    uint64_t size = b->nodes[node].size;
    uint64_t need = cbits >= 63 ? (size ? 1 : 0) : (size + (1ull << cbits) - 1) >> cbits;
    if (need != count)
        return fail(b, ERN_EINVAL, "%u chunk entries given, %llu needed", count,
                    (unsigned long long)need);
    int ci = new_chunkset(b, chunk_format, count);
    if (ci < 0)
        return ci;
    if (count)
        memcpy(b->chunks[ci].entries, entries, (size_t)count * 8);
    b->nodes[node].aux = (uint32_t)ci;
    b->nodes[node].dkind = D_CHUNKS;
    return 0;
}

int erofs_builder_set_root(erofs_builder *b, uint32_t node)
{
    int r = check_mutable(b);
    if (r || (r = check_node(b, node)))
        return r;
    if ((b->nodes[node].mode & S_IFMT) != S_IFDIR)
        return fail(b, ERN_EINVAL, "root must be a directory");
    if (b->nodes[node].parent != NONE32)
        return fail(b, ERN_EINVAL, "root directory has a parent");
    b->root = node;
    return 0;
}

int erofs_builder_add_device(erofs_builder *b, const char *tag, size_t taglen,
                             uint32_t blocks, uint32_t mapped_blkaddr)
{
    int r = check_mutable(b);
    if (r)
        return r;
    if (taglen > 64)
        return fail(b, ERN_EINVAL, "device tag longer than 64 bytes");
    if (b->ndevs >= 65535)
        return fail(b, ERN_ELIMIT, "too many devices");
    struct device *nd = realloc(b->devs, (b->ndevs + 1) * sizeof(*nd));
    if (!nd)
        return fail(b, ERN_ENOMEM, "out of memory");
    b->devs = nd;
    struct device *d = &b->devs[b->ndevs];
    memset(d, 0, sizeof(*d));
    memcpy(d->tag, tag, taglen);
    d->blocks = blocks;
    d->mapped = mapped_blkaddr;
    return (int)++b->ndevs;
}

int erofs_builder_put_bytes(erofs_builder *b, uint64_t offset, const char *data, size_t len)
{
    if (b->wdone)
        return fail(b, ERN_EINVAL, "image already written");
    if (offset < SB_OFFSET + 128 && offset + len > SB_OFFSET)
        return fail(b, ERN_EINVAL, "bytes would overwrite the superblock");
    if (b->laid_out) {
        /* after layout: before the first inode, or appended after the image */
        if (offset + len > b->first_inode_off && offset < b->info.image_size)
            return fail(b, ERN_EINVAL, "bytes at %llu overlap what the builder writes",
                        (unsigned long long)offset);
        if (offset >= b->info.image_size) {
            uint64_t end = align_up(offset + len, b->blksz);
            if (end / b->blksz > 0xFFFFFFFFull)
                return fail(b, ERN_ELIMIT, "image larger than 2^32 blocks");
            b->info.image_size = end;
        }
    }
    struct putbytes *np = realloc(b->puts, (b->nputs + 1) * sizeof(*np));
    if (!np)
        return fail(b, ERN_ENOMEM, "out of memory");
    b->puts = np;
    uint8_t *copy = malloc(len ? len : 1);
    if (!copy)
        return fail(b, ERN_ENOMEM, "out of memory");
    memcpy(copy, data, len);
    b->puts[b->nputs].off = offset;
    b->puts[b->nputs].len = len;
    b->puts[b->nputs].data = copy;
    b->nputs++;
    return 0;
}

int erofs_builder_set_device(erofs_builder *b, uint32_t device_id, uint32_t blocks,
                             uint32_t mapped_blkaddr)
{
    if (b->wdone)
        return fail(b, ERN_EINVAL, "image already written");
    if (device_id < 1 || device_id > b->ndevs)
        return fail(b, ERN_EINVAL, "no device %u", device_id);
    b->devs[device_id - 1].blocks = blocks;
    b->devs[device_id - 1].mapped = mapped_blkaddr;
    return 0;
}

int erofs_builder_set_sb_blocks(erofs_builder *b, uint64_t blocks)
{
    if (b->wdone)
        return fail(b, ERN_EINVAL, "image already written");
    if (blocks > 0xFFFFFFFFull)
        return fail(b, ERN_ELIMIT, "block count does not fit in 32 bits");
    b->sb_blocks_set = 1;
    b->sb_blocks_val = blocks;
    return 0;
}

int erofs_builder_info(erofs_builder *b, struct erofs_layout_info *info)
{
    if (!b->laid_out)
        return fail(b, ERN_EINVAL, "not laid out yet");
    *info = b->info;
    return 0;
}

/* ---------------------------------------------------------------- layout ---- */


static int namecmp(const uint8_t *a, size_t al, const uint8_t *b2, size_t bl)
{
    int c = memcmp(a, b2, al < bl ? al : bl);
    if (c)
        return c;
    return al < bl ? -1 : al > bl;
}

static int cmp_dirent(const void *pa, const void *pb, void *ctx)
{
    erofs_builder *sort_ctx = ctx;
    const struct dirent_rec *a = pa, *b2 = pb;
    if (a->parent != b2->parent)
        return a->parent < b2->parent ? -1 : 1;
    return namecmp(sort_ctx->arena + a->name_off, a->name_len,
                   sort_ctx->arena + b2->name_off, b2->name_len);
}

static int cmp_xattr_name(erofs_builder *sort_ctx, const struct xattr_rec *a, const struct xattr_rec *b2)
{
    if (a->index != b2->index)
        return a->index < b2->index ? -1 : 1;
    return namecmp(sort_ctx->arena + a->name_off, a->name_len,
                   sort_ctx->arena + b2->name_off, b2->name_len);
}

static int cmp_xattr_content(erofs_builder *sort_ctx, const struct xattr_rec *a, const struct xattr_rec *b2)
{
    if (a->index != b2->index)
        return a->index < b2->index ? -1 : 1;
    int c = namecmp(sort_ctx->arena + a->name_off, a->name_len,
                    sort_ctx->arena + b2->name_off, b2->name_len);
    if (c)
        return c;
    return namecmp(sort_ctx->arena + a->val_off, a->val_len,
                   sort_ctx->arena + b2->val_off, b2->val_len);
}

static int cmp_xattr_node(const void *pa, const void *pb, void *ctx)
{
    const struct xattr_rec *a = pa, *b2 = pb;
    if (a->node != b2->node)
        return a->node < b2->node ? -1 : 1;
    return cmp_xattr_content(ctx, a, b2);
}

static int cmp_xattr_idx(const void *pa, const void *pb, void *ctx)
{
    erofs_builder *sort_ctx = ctx;
    uint32_t ia = *(const uint32_t *)pa, ib = *(const uint32_t *)pb;
    int c = cmp_xattr_content(sort_ctx, &sort_ctx->xas[ia], &sort_ctx->xas[ib]);
    if (c)
        return c;
    return ia < ib ? -1 : ia > ib;
}

struct mt { int64_t s; uint32_t ns; };

static int cmp_mt(const void *pa, const void *pb)
{
    const struct mt *a = pa, *b2 = pb;
    if (a->s != b2->s)
        return a->s < b2->s ? -1 : 1;
    return a->ns < b2->ns ? -1 : a->ns > b2->ns;
}

static uint8_t ftype_of(uint32_t mode)
{
    switch (mode & S_IFMT) {
    case S_IFREG: return 1;
    case S_IFDIR: return 2;
    case S_IFCHR: return 3;
    case S_IFBLK: return 4;
    case S_IFIFO: return 5;
    case S_IFSOCK: return 6;
    case S_IFLNK: return 7;
    }
    return 0;
}

static uint32_t xentry_size(const struct xattr_rec *x)
{
    return (4u + x->name_len + x->val_len + 3u) & ~3u;
}

/* Walk the directory entries of d in on-disk order ('.' and '..' merged in) and
 * return the directory size; when out != NULL also fill dirent blocks (size rounded up
 * to blocks, zeroed by the caller). */
static uint64_t dir_pack(erofs_builder *b, struct node *d, uint32_t self, uint8_t *out)
{
    uint32_t blksz = b->blksz;
    uint64_t blk_start = 0;
    uint32_t used = 0, nent = 0;
    uint64_t size = 0;
    /* first pass per block: we need to know N of a block before writing names, so pack
     * greedily block by block over the merged sequence */
    uint32_t total = d->de_count + 2;
    uint32_t i = 0;          /* position in the merged sequence */
    /* merged sequence generator state */
    static const uint8_t dot[2] = {'.', '.'};
    uint32_t ci = 0; int dot_done = 0, dotdot_done = 0;
    /* we iterate twice per block: count, then emit; keep a small cursor copy */
    while (i < total) {
        /* count how many entries fit in this block */
        uint32_t save_ci = ci; int save_dot = dot_done, save_dd = dotdot_done;
        used = 0; nent = 0;
        uint32_t j = i;
        uint32_t c2 = ci; int d2 = dot_done, dd2 = dotdot_done;
        while (j < total) {
            /* next merged entry */
            const uint8_t *nm; uint32_t nl;
            int which; /* 0 dot, 1 dotdot, 2 child */
            const struct dirent_rec *de = c2 < d->de_count ? &b->des[d->de_first + c2] : NULL;
            if (!d2 && (!de || namecmp(dot, 1, b->arena + de->name_off, de->name_len) < 0)) {
                nm = dot; nl = 1; which = 0;
            } else if (!dd2 && (!de || namecmp(dot, 2, b->arena + de->name_off, de->name_len) < 0)) {
                nm = dot; nl = 2; which = 1;
            } else {
                nm = b->arena + de->name_off; nl = de->name_len; which = 2;
            }
            (void)nm;
            if (used + 12 + nl > blksz)
                break;
            used += 12 + nl;
            nent++;
            if (which == 0) d2 = 1; else if (which == 1) dd2 = 1; else c2++;
            j++;
        }
        if (out) {
            uint8_t *blk = out + blk_start;
            uint32_t nameoff = 12 * nent;
            ci = save_ci; dot_done = save_dot; dotdot_done = save_dd;
            for (uint32_t k = 0; k < nent; k++) {
                const uint8_t *nm; uint32_t nl; uint64_t nid; uint8_t ft;
                const struct dirent_rec *de = ci < d->de_count ? &b->des[d->de_first + ci] : NULL;
                if (!dot_done && (!de || namecmp(dot, 1, b->arena + de->name_off, de->name_len) < 0)) {
                    nm = dot; nl = 1; nid = d->nid; ft = 2; dot_done = 1;
                } else if (!dotdot_done && (!de || namecmp(dot, 2, b->arena + de->name_off, de->name_len) < 0)) {
                    struct node *p = d->parent == NONE32 ? d : &b->nodes[d->parent];
                    nm = dot; nl = 2; nid = p->nid; ft = 2; dotdot_done = 1;
                } else {
                    struct node *c = &b->nodes[de->child];
                    nm = b->arena + de->name_off; nl = de->name_len; nid = c->nid;
                    ft = ftype_of(c->mode); ci++;
                }
                uint8_t *e = blk + 12 * k;
                for (int q = 0; q < 8; q++)
                    e[q] = (uint8_t)(nid >> (8 * q));
                e[8] = (uint8_t)nameoff;
                e[9] = (uint8_t)(nameoff >> 8);
                e[10] = ft;
                e[11] = 0;
                memcpy(blk + nameoff, nm, nl);
                nameoff += nl;
            }
        }
        ci = c2; dot_done = d2; dotdot_done = dd2;
        i = j;
        size = blk_start + used;
        blk_start += blksz;
    }
    (void)self;
    return size;
}

#define GAP_MAX 256

static int cmp_meta_off(const void *pa, const void *pb, void *ctx)
{
    erofs_builder *b = ctx;
    uint64_t a = b->nodes[*(const uint32_t *)pa].meta_off;
    uint64_t c = b->nodes[*(const uint32_t *)pb].meta_off;
    return a < c ? -1 : a > c;
}

static uint64_t align_up(uint64_t v, uint64_t a)
{
    return (v + a - 1) / a * a;
}

static int is_flat_data(const struct node *n)
{
    uint32_t fmt = n->mode & S_IFMT;
    return fmt == S_IFDIR || fmt == S_IFLNK || (fmt == S_IFREG && n->dkind != D_CHUNKS &&
                                                 n->dkind != D_SPARSE);
}

/* data blocks of directories, symlinks and files not streamed, in nid order */
static int alloc_flat_data(erofs_builder *b, uint64_t *pblk)
{
    uint32_t blksz = b->blksz;
    uint64_t blk = *pblk;
    for (uint32_t oi = 0; oi < b->norder; oi++) {
        struct node *n = &b->nodes[b->order[oi]];
        if (n->streamed)
            continue;
        if (n->layout == L_CHUNK) {
            if (n->dkind == D_SPARSE) {
                struct chunkset *cs = &b->chunks[n->aux];
                uint64_t csz = (uint64_t)blksz << (cs->format & 0x1F);
                for (uint32_t c = 0; c < cs->count; c++) {
                    if (!(cs->entries[c] & 1))
                        continue;
                    uint64_t start = (uint64_t)c * csz;
                    uint64_t len = n->size - start < csz ? n->size - start : csz;
                    cs->entries[c] = 1 | (blk << 32);
                    blk += (len + blksz - 1) / blksz;
                    if (blk > 0xFFFFFFFFull)
                        return fail(b, ERN_ELIMIT, "image larger than 2^32 blocks");
                }
            }
            continue;
        }
        if (!is_flat_data(n))
            continue;
        uint64_t nblk = n->layout == L_INLINE ? n->size / blksz : (n->size + blksz - 1) / blksz;
        if (nblk) {
            n->startblk = (uint32_t)blk;
            blk += nblk;
        } else {
            n->startblk = n->layout == L_INLINE ? NULL_ADDR : 0;
        }
        if (blk > 0xFFFFFFFFull)
            return fail(b, ERN_ELIMIT, "image larger than 2^32 blocks");
    }
    *pblk = blk;
    return 0;
}

int erofs_builder_layout(erofs_builder *b, struct erofs_layout_info *info)
{
    if (b->laid_out)
        return fail(b, ERN_EINVAL, "builder already laid out");
    if (b->root == NONE32)
        return fail(b, ERN_EINVAL, "no root directory set");
    if (b->o.stream_data) {
        int r = stream_stop(b, 0);
        if (r)
            return r;
    }
    uint32_t blksz = b->blksz;

    /* regular files and symlinks need a data source unless empty */
    for (uint32_t i = 0; i < b->nnodes; i++) {
        struct node *n = &b->nodes[i];
        uint32_t fmt = n->mode & S_IFMT;
        if ((fmt == S_IFREG || fmt == S_IFLNK) && n->size && n->dkind == D_NONE)
            return fail(b, ERN_EINVAL, "node %u has size %llu but no data source", i,
                        (unsigned long long)n->size);
        if (fmt == S_IFLNK && n->size == 0)
            return fail(b, ERN_ELIMIT, "empty symlink target");
    }

    /* directory entries: sort by (parent, name), find ranges, nlink, duplicates */
    qsort_r(b->des, b->nde, sizeof(*b->des), cmp_dirent, b);
    for (uint32_t i = 0; i < b->nnodes; i++) {
        b->nodes[i].de_first = 0;
        b->nodes[i].de_count = 0;
        b->nodes[i].nlink = 0;
    }
    for (uint32_t i = 0; i < b->nde; i++) {
        struct dirent_rec *d = &b->des[i];
        struct node *p = &b->nodes[d->parent];
        if (p->de_count == 0)
            p->de_first = i;
        p->de_count++;
        if (i && d->parent == b->des[i - 1].parent &&
            !namecmp(b->arena + d->name_off, d->name_len, b->arena + b->des[i - 1].name_off,
                     b->des[i - 1].name_len))
            return fail(b, ERN_EINVAL, "duplicate name '%.*s' in a directory",
                        (int)d->name_len, (const char *)b->arena + d->name_off);
        struct node *c = &b->nodes[d->child];
        if ((c->mode & S_IFMT) == S_IFDIR)
            p->nlink++;  /* counted as subdirectories below */
        else
            c->nlink++;
    }
    for (uint32_t i = 0; i < b->nnodes; i++) {
        struct node *n = &b->nodes[i];
        if ((n->mode & S_IFMT) == S_IFDIR)
            n->nlink += 2;
    }

    /* nid order: root, then breadth first, children in name order */
    free(b->order);
    b->order = malloc((size_t)(b->nnodes ? b->nnodes : 1) * sizeof(uint32_t));
    if (!b->order)
        return fail(b, ERN_ENOMEM, "out of memory");
    for (uint32_t i = 0; i < b->nnodes; i++)
        b->nodes[i].placed = 0;
    uint32_t no = 0;
    b->order[no++] = b->root;
    b->nodes[b->root].placed = 1;
    for (uint32_t q = 0; q < no; q++) {
        struct node *d = &b->nodes[b->order[q]];
        if ((d->mode & S_IFMT) != S_IFDIR)
            continue;
        for (uint32_t k = 0; k < d->de_count; k++) {
            uint32_t c = b->des[d->de_first + k].child;
            if (!b->nodes[c].placed) {
                b->nodes[c].placed = 1;
                b->order[no++] = c;
            }
        }
    }
    if (no != b->nnodes) {
        for (uint32_t i = 0; i < b->nnodes; i++)
            if (!b->nodes[i].placed)
                return fail(b, ERN_EINVAL, "node %u is not reachable from the root", i);
    }
    b->norder = no;
    for (uint32_t i = 0; i < no; i++) {
        struct node *n = &b->nodes[b->order[i]];
        if (n->nlink > 0xFFFFFFFEu)
            return fail(b, ERN_ELIMIT, "too many links");
        n->ino = i + 1;
    }

    /* directory sizes */
    for (uint32_t i = 0; i < b->nnodes; i++) {
        struct node *n = &b->nodes[i];
        if ((n->mode & S_IFMT) == S_IFDIR)
            n->size = dir_pack(b, n, i, NULL);
    }

    /* xattrs: group per node; shared ones = same content on >= 2 inodes */
    qsort_r(b->xas, b->nxa, sizeof(*b->xas), cmp_xattr_node, b);
    for (uint32_t i = 0; i < b->nnodes; i++) {
        b->nodes[i].xa_first = 0;
        b->nodes[i].xa_count = 0;
    }
    for (uint32_t i = 0; i < b->nxa; i++) {
        struct xattr_rec *x = &b->xas[i];
        if (i && x->node == b->xas[i - 1].node && !cmp_xattr_name(b, x, &b->xas[i - 1]))
            return fail(b, ERN_EINVAL, "duplicate xattr name on one node");
        struct node *n = &b->nodes[x->node];
        if (n->xa_count == 0)
            n->xa_first = i;
        n->xa_count++;
        x->shared_id = NONE32;
    }
    uint32_t shared_bytes = 0;
    free(b->shared_order);
    b->shared_order = NULL;
    b->nshared = 0;
    if (b->o.shared_xattrs && b->nxa > 1) {
        uint32_t *idx = malloc((size_t)b->nxa * sizeof(uint32_t));
        b->shared_order = malloc((size_t)b->nxa * sizeof(uint32_t));
        if (!idx || !b->shared_order) {
            free(idx);
            return fail(b, ERN_ENOMEM, "out of memory");
        }
        for (uint32_t i = 0; i < b->nxa; i++)
            idx[i] = i;
        qsort_r(idx, b->nxa, sizeof(uint32_t), cmp_xattr_idx, b);
        for (uint32_t i = 0; i < b->nxa;) {
            uint32_t j = i + 1;
            while (j < b->nxa && !cmp_xattr_content(b, &b->xas[idx[i]], &b->xas[idx[j]]))
                j++;
            if (j - i >= 2) {
                uint64_t id = shared_bytes / 4;
                uint32_t sz = xentry_size(&b->xas[idx[i]]);
                if ((uint64_t)shared_bytes + sz > 0xFFFFFFF0ull)
                    return fail(b, ERN_ELIMIT, "shared xattr area too large");
                for (uint32_t k = i; k < j; k++)
                    b->xas[idx[k]].shared_id = (uint32_t)id;
                b->shared_order[b->nshared++] = idx[i];
                shared_bytes += sz;
            }
            i = j;
        }
        free(idx);
    }
    for (uint32_t i = 0; i < b->nnodes; i++) {
        struct node *n = &b->nodes[i];
        n->xattr_isize = 0;
        if (!n->xa_count)
            continue;
        uint64_t sz = 12;
        for (uint32_t k = 0; k < n->xa_count; k++) {
            struct xattr_rec *x = &b->xas[n->xa_first + k];
            sz += x->shared_id != NONE32 ? 4 : xentry_size(x);
        }
        if ((sz - 12) / 4 + 1 > 0xFFFF)
            return fail(b, ERN_ELIMIT, "xattrs of one inode exceed the inline limit");
        n->xattr_isize = (uint32_t)sz;
    }

    /* build time */
    int64_t bt = b->o.build_time;
    uint32_t btn = b->o.build_time_nsec;
    if (b->o.auto_build_time && b->nnodes) {
        struct mt *m = malloc((size_t)b->nnodes * sizeof(*m));
        if (!m)
            return fail(b, ERN_ENOMEM, "out of memory");
        for (uint32_t i = 0; i < b->nnodes; i++) {
            m[i].s = b->nodes[i].mtime;
            m[i].ns = b->nodes[i].mtime_nsec;
        }
        qsort(m, b->nnodes, sizeof(*m), cmp_mt);
        uint32_t best = 0, bestn = 0;
        for (uint32_t i = 0; i < b->nnodes;) {
            uint32_t j = i + 1;
            while (j < b->nnodes && !cmp_mt(&m[i], &m[j]))
                j++;
            if (j - i > bestn) {
                bestn = j - i;
                best = i;
            }
            i = j;
        }
        bt = m[best].s;
        btn = m[best].ns;
        free(m);
    }
    if (bt < 0)
        bt = 0;

    /* inode formats and data layouts (independent of positions) */
    int have_chunks = 0;
    uint64_t data_bytes = 0;
    for (uint32_t oi = 0; oi < no; oi++) {
        struct node *n = &b->nodes[b->order[oi]];
        uint32_t fmt = n->mode & S_IFMT;
        n->extended = b->o.force_extended || n->uid > 0xFFFF || n->gid > 0xFFFF ||
                      n->nlink > 0xFFFF || n->size > 0xFFFFFFFFull || n->mtime != bt ||
                      n->mtime_nsec != btn;
        uint64_t base = (n->extended ? 64 : 32) + n->xattr_isize;
        n->tail = 0;
        data_bytes += n->size;
        if (fmt == S_IFREG && (n->dkind == D_CHUNKS || n->dkind == D_SPARSE)) {
            n->layout = L_CHUNK;
            have_chunks = 1;
        } else if (is_flat_data(n)) {
            uint64_t tail = n->size % blksz;
            n->layout = L_PLAIN;
            if (n->streamed) {
                if (n->stream_inline) {
                    n->layout = L_INLINE;
                    n->tail = (uint32_t)tail;
                }
            } else if (tail && b->o.inline_data && base + tail <= blksz) {
                n->layout = L_INLINE;
                n->tail = (uint32_t)tail;
            }
        } else {
            n->layout = L_PLAIN;
        }
    }

    /* stream mode: file data already sits from block scur down; the other data
     * (directories, symlinks, in-memory files) follows it, then the inode area */
    uint64_t blk = 0;
    uint64_t data_start = 0;
    uint64_t meta_start = (uint64_t)b->o.meta_blkaddr * blksz;
    if (b->o.stream_data) {
        if (b->ndevs || b->nputs)
            return fail(b, ERN_EINVAL, "stream mode does not take devices or reserved bytes");
        if (!b->worker_on && b->scur == 0)
            b->scur = (SB_OFFSET + 128 + blksz - 1) / blksz;
        data_start = (uint64_t)((SB_OFFSET + 128 + blksz - 1) / blksz) * blksz;
        blk = b->scur;
        int r = alloc_flat_data(b, &blk);
        if (r)
            return r;
        meta_start = blk * blksz;
    }

    /* metadata packing */
    uint64_t first_nid = b->o.first_nid;
    if (!first_nid) {
        uint64_t sb_end = SB_OFFSET + 128;
        first_nid = meta_start >= sb_end ? 1 : (sb_end - meta_start + 31) / 32;
    }
    uint64_t cur = meta_start + first_nid * 32;
    /* Gaps left when an inline inode had to start a new block are reused first-fit by
     * later inodes that fit entirely inside them (deterministic: same tree, same
     * gaps). The write phase then walks inodes in offset order (b->worder). */
    struct { uint64_t start, end; } gaps[GAP_MAX];
    uint32_t ngaps = 0;
    uint64_t maxgap = 0;
    for (uint32_t oi = 0; oi < no; oi++) {
        struct node *n = &b->nodes[b->order[oi]];
        uint64_t base = (n->extended ? 64 : 32) + n->xattr_isize;
        uint64_t off = cur;
        uint64_t extra = 0;
        uint32_t unit = 0;
        if (n->layout == L_CHUNK) {
            struct chunkset *cs = &b->chunks[n->aux];
            unit = n->dkind == D_SPARSE ? 4 : ((cs->format & CHUNK_INDEXES) ? 8 : 4);
        } else if (n->layout == L_INLINE) {
            extra = n->tail;
        }
        /* try a gap (not for the root, which must come first) */
        if (oi && ngaps && base + extra <= maxgap && (!unit || base + unit <= maxgap)) {
            int found = -1;
            for (uint32_t g = 0; g < ngaps; g++) {
                uint64_t o = gaps[g].start;
                uint64_t e = unit ? align_up(o + base, unit) - o +
                                    (uint64_t)unit * b->chunks[n->aux].count
                                  : base + extra;
                if (o + e <= gaps[g].end) {
                    found = (int)g;
                    off = o;
                    extra = e - base;
                    break;
                }
            }
            if (found >= 0) {
                n->meta_off = off;
                n->nid = (off - meta_start) / 32;
                gaps[found].start = align_up(off + base + extra, 32);
                if (gaps[found].end - gaps[found].start < 32 + 12) {
                    gaps[found] = gaps[--ngaps];
                    maxgap = 0;
                    for (uint32_t g = 0; g < ngaps; g++)
                        if (gaps[g].end - gaps[g].start > maxgap)
                            maxgap = gaps[g].end - gaps[g].start;
                } else if (maxgap == gaps[found].end - (off)) {
                    maxgap = 0;
                    for (uint32_t g = 0; g < ngaps; g++)
                        if (gaps[g].end - gaps[g].start > maxgap)
                            maxgap = gaps[g].end - gaps[g].start;
                }
                continue;
            }
        }
        if (unit) {
            extra = align_up(off + base, unit) - (off + base) +
                    (uint64_t)unit * b->chunks[n->aux].count;
        } else if (n->layout == L_INLINE) {
            /* inode, xattrs and tail in one block: the fast-symlink path measures the
             * tail from the inode's block */
            if (off % blksz + base + n->tail > blksz) {
                off = align_up(off, blksz);
                if (off - cur >= 64 && oi) {
                    uint32_t slot = ngaps < GAP_MAX ? ngaps++ : 0;
                    if (slot == 0 && ngaps == GAP_MAX) {
                        /* full: replace the smallest gap */
                        for (uint32_t g = 1; g < ngaps; g++)
                            if (gaps[g].end - gaps[g].start < gaps[slot].end - gaps[slot].start)
                                slot = g;
                    }
                    gaps[slot].start = cur;
                    gaps[slot].end = off;
                    if (off - cur > maxgap)
                        maxgap = off - cur;
                }
            }
        }
        n->meta_off = off;
        n->nid = (off - meta_start) / 32;
        cur = align_up(off + base + extra, 32);
    }
    /* write order: by inode offset */
    free(b->worder);
    b->worder = malloc((size_t)(no ? no : 1) * sizeof(uint32_t));
    if (!b->worder)
        return fail(b, ERN_ENOMEM, "out of memory");
    memcpy(b->worder, b->order, (size_t)no * sizeof(uint32_t));
    qsort_r(b->worder, no, sizeof(uint32_t), cmp_meta_off, b);
    if (b->nodes[b->root].nid > 0xFFFF)
        return fail(b, ERN_ELIMIT, "root nid %llu does not fit in 16 bits",
                    (unsigned long long)b->nodes[b->root].nid);
    if (b->nodes[b->root].nid == 0)
        return fail(b, ERN_EINVAL, "root would get nid 0 (set first_nid)");
    uint64_t meta_end = cur;
    uint64_t pos = align_up(meta_end, blksz);
    uint32_t xattr_blkaddr = 0;
    if (shared_bytes) {
        xattr_blkaddr = (uint32_t)(pos / blksz);
        pos = align_up(pos + shared_bytes, blksz);
    }
    if (b->ndevs && b->o.devt_slotoff) {
        uint64_t dend = (uint64_t)b->o.devt_slotoff * 128 + 128ull * b->ndevs;
        uint64_t dstart = (uint64_t)b->o.devt_slotoff * 128;
        if (dstart < SB_OFFSET + 128 || dend > meta_start + first_nid * 32)
            return fail(b, ERN_EINVAL, "device table does not fit before the inodes");
    } else if (b->ndevs) {
        return fail(b, ERN_EINVAL, "devices given without devt_slotoff");
    }
    if (!b->o.stream_data) {
        data_start = pos;
        blk = pos / blksz;
        int r = alloc_flat_data(b, &blk);
        if (r)
            return r;
    } else {
        blk = pos / blksz;
    }
    if (blk > 0xFFFFFFFFull)
        return fail(b, ERN_ELIMIT, "image larger than 2^32 blocks");
    for (uint32_t i = 0; i < b->nputs; i++) {
        struct putbytes *p = &b->puts[i];
        if (p->off + p->len > meta_start + first_nid * 32)
            return fail(b, ERN_EINVAL, "reserved bytes at %llu overlap the inode area",
                        (unsigned long long)p->off);
    }

    b->first_inode_off = meta_start + first_nid * 32;
    memset(&b->info, 0, sizeof(b->info));
    b->info.inodes = no;
    b->info.meta_blkaddr = (uint32_t)(meta_start / blksz);
    b->info.root_nid = b->nodes[b->root].nid;
    b->info.meta_start = meta_start;
    b->info.meta_end = meta_end;
    b->info.xattr_blkaddr = xattr_blkaddr;
    b->info.shared_xattr_bytes = shared_bytes;
    b->info.data_start = data_start;
    b->info.image_size = blk * blksz;
    if (b->info.image_size < 2 * (uint64_t)blksz && b->info.image_size < 4096)
        b->info.image_size = 4096 > blksz ? 4096 : blksz;
    b->info.build_time = bt;
    b->info.build_time_nsec = btn;
    b->info.feature_compat = b->o.feature_compat | (b->o.sb_checksum ? FEAT_COMPAT_SB_CHKSUM : 0);
    b->info.feature_incompat = b->o.feature_incompat | (have_chunks ? FEAT_INCOMPAT_CHUNKED : 0) |
                               (b->ndevs ? FEAT_INCOMPAT_DEVT : 0);
    b->info.data_bytes = data_bytes;
    b->laid_out = 1;
    if (info)
        *info = b->info;
    return 0;
}

int64_t erofs_node_nid(erofs_builder *b, uint32_t node)
{
    if (!b->laid_out)
        return fail(b, ERN_EINVAL, "not laid out yet");
    if (node >= b->nnodes)
        return fail(b, ERN_EINVAL, "no such node %u", node);
    return (int64_t)b->nodes[node].nid;
}

/* ----------------------------------------------------------------- write ---- */

static void put16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }

static int pwrite_all(erofs_builder *b, const void *buf, size_t len, uint64_t off)
{
    const uint8_t *p = buf;
    while (len) {
        ssize_t w = pwrite(b->fd, p, len, (off_t)off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return fail(b, ERN_EIO, "writing the image: %s", strerror(errno));
        }
        p += w;
        len -= (size_t)w;
        off += (uint64_t)w;
    }
    return 0;
}

static int win_flush(erofs_builder *b)
{
    if (b->win_hi > b->win_start) {
        int r = pwrite_all(b, b->win, b->win_hi - b->win_start, b->win_start);
        if (r)
            return r;
    }
    memset(b->win, 0, WIN_SIZE);
    b->win_hi = b->win_start;
    return 0;
}

/* pointer to [off, off+len) of the metadata stream; len <= WIN_SIZE - blksz */
static uint8_t *win_ptr(erofs_builder *b, uint64_t off, size_t len)
{
    if (off < b->win_start || off + len > b->win_start + WIN_SIZE) {
        if (win_flush(b))
            return NULL;
        b->win_start = off;
        b->win_hi = b->win_start;
    }
    if (off + len > b->win_hi)
        b->win_hi = off + len;
    return b->win + (off - b->win_start);
}

static int win_write(erofs_builder *b, uint64_t off, const void *data, size_t len)
{
    const uint8_t *p = data;
    while (len) {
        size_t n = len > WIN_SIZE / 2 ? WIN_SIZE / 2 : len;
        uint8_t *d = win_ptr(b, off, n);
        if (!d)
            return ERN_EIO;
        memcpy(d, p, n);
        p += n;
        off += n;
        len -= n;
    }
    return 0;
}

static int xfail(struct xfer *x, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(x->err, sizeof(x->err), fmt, ap);
    va_end(ap);
    x->code = code;
    return code;
}

static int x_pwrite(struct xfer *x, const void *buf, size_t len, uint64_t off)
{
    const uint8_t *p = buf;
    while (len) {
        ssize_t w = pwrite(x->out, p, len, (off_t)off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return xfail(x, ERN_EIO, "writing the image: %s", strerror(errno));
        }
        p += w;
        len -= (size_t)w;
        off += (uint64_t)w;
    }
    return 0;
}

static int x_read(struct xfer *x, int fd, uint8_t *buf, size_t len, uint64_t off,
                  const char *path)
{
    while (len) {
        ssize_t r = pread(fd, buf, len, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return xfail(x, ERN_EIO, "%s: read: %s", path, strerror(errno));
        }
        if (r == 0)
            return xfail(x, ERN_EIO, "%s: file shrank while building the image", path);
        buf += r;
        len -= (size_t)r;
        off += (uint64_t)r;
    }
    return 0;
}

static int no_cfr = -1;

static int x_copy(struct xfer *x, int in, uint64_t in_off, uint64_t out_off, uint64_t len,
                  const char *path)
{
    if (no_cfr < 0)
        no_cfr = getenv("EROFS_NATIVE_NO_COPY_FILE_RANGE") != NULL;
    while (len && !no_cfr) {
        loff_t io = (loff_t)in_off, oo = (loff_t)out_off;
        size_t chunk = len > (1u << 30) ? (1u << 30) : (size_t)len;
        ssize_t r = copy_file_range(in, &io, x->out, &oo, chunk, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EXDEV || errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP ||
                errno == EBADF || errno == EPERM) {
                if (errno == ENOSYS)
                    no_cfr = 1;
                break;
            }
            return xfail(x, ERN_EIO, "%s: copy: %s", path, strerror(errno));
        }
        if (r == 0)
            return xfail(x, ERN_EIO, "%s: file shrank while building the image", path);
        in_off += (uint64_t)r;
        out_off += (uint64_t)r;
        len -= (uint64_t)r;
        *x->bytes += (uint64_t)r;
    }
    while (len) {
        size_t n = len > CBUF_SIZE ? CBUF_SIZE : (size_t)len;
        int r = x_read(x, in, x->buf, n, in_off, path);
        if (r)
            return r;
        r = x_pwrite(x, x->buf, n, out_off);
        if (r)
            return r;
        in_off += n;
        out_off += n;
        len -= n;
        *x->bytes += n;
    }
    return 0;
}

/* copy the data extents (SEEK_DATA) of a sparse file into its non-hole chunks */
static int x_copy_sparse(struct xfer *x, int fd, const char *path, uint64_t size,
                         const uint64_t *entries, uint32_t count, uint64_t csz)
{
    off_t pos = 0;
    while ((uint64_t)pos < size) {
        off_t d = lseek(fd, pos, SEEK_DATA);
        if (d < 0) {
            if (errno != ENXIO)
                return xfail(x, ERN_EIO, "%s: seek: %s", path, strerror(errno));
            break;
        }
        if ((uint64_t)d >= size)
            break;
        off_t h = lseek(fd, d, SEEK_HOLE);
        if (h < 0 || (uint64_t)h > size)
            h = (off_t)size;
        uint64_t s = (uint64_t)d;
        while (s < (uint64_t)h) {
            uint64_t c = s / csz;
            uint64_t cend = (c + 1) * csz < (uint64_t)h ? (c + 1) * csz : (uint64_t)h;
            if (c < count && (entries[c] & 1)) {
                uint64_t out = (entries[c] >> 32) * x->blksz + (s - c * csz);
                int r = x_copy(x, fd, s, out, cend - s, path);
                if (r)
                    return r;
            }
            s = cend;
        }
        pos = h;
    }
    return 0;
}

static void main_xfer(erofs_builder *b, struct xfer *x)
{
    x->out = b->fd;
    x->blksz = b->blksz;
    x->buf = b->cbuf;
    x->bytes = &b->bytes_done;
    x->code = 0;
    x->err[0] = 0;
}

static int read_exact(erofs_builder *b, int fd, uint8_t *buf, size_t len, uint64_t off,
                      const char *path)
{
    struct xfer x;
    main_xfer(b, &x);
    int r = x_read(&x, fd, buf, len, off, path);
    return r ? fail(b, r, "%s", x.err) : 0;
}

static int copy_range(erofs_builder *b, int in, uint64_t in_off, uint64_t out_off,
                      uint64_t len, const char *path)
{
    struct xfer x;
    main_xfer(b, &x);
    int r = x_copy(&x, in, in_off, out_off, len, path);
    return r ? fail(b, r, "%s", x.err) : 0;
}

static int write_inode(erofs_builder *b, struct node *n)
{
    uint8_t ib[64];
    memset(ib, 0, sizeof(ib));
    uint32_t isz = n->extended ? 64 : 32;
    uint32_t icount = n->xattr_isize ? (n->xattr_isize - 12) / 4 + 1 : 0;
    uint32_t fmt = n->mode & S_IFMT;
    uint32_t iu = 0;
    if (n->layout == L_CHUNK)
        iu = n->dkind == D_SPARSE ? (b->chunks[n->aux].format & 0x1F) : b->chunks[n->aux].format;
    else if (fmt == S_IFCHR || fmt == S_IFBLK)
        iu = n->rdev;
    else if (fmt == S_IFIFO || fmt == S_IFSOCK)
        iu = 0;
    else
        iu = n->startblk;
    put16(ib + 0, (uint32_t)(n->extended ? 1 : 0) | ((uint32_t)n->layout << 1));
    put16(ib + 2, icount);
    put16(ib + 4, n->mode);
    if (n->extended) {
        put64(ib + 8, n->size);
        put32(ib + 0x10, iu);
        put32(ib + 0x14, n->ino);
        put32(ib + 0x18, n->uid);
        put32(ib + 0x1C, n->gid);
        put64(ib + 0x20, (uint64_t)n->mtime);
        put32(ib + 0x28, n->mtime_nsec);
        put32(ib + 0x2C, n->nlink);
    } else {
        put16(ib + 6, n->nlink);
        put32(ib + 8, (uint32_t)n->size);
        put32(ib + 0x10, iu);
        put32(ib + 0x14, n->ino);
        put16(ib + 0x18, n->uid);
        put16(ib + 0x1A, n->gid);
    }
    int r = win_write(b, n->meta_off, ib, isz);
    if (r)
        return r;
    uint64_t off = n->meta_off + isz;
    if (n->xattr_isize) {
        uint8_t hdr[12];
        memset(hdr, 0, sizeof(hdr));
        uint32_t nshared = 0;
        for (uint32_t k = 0; k < n->xa_count; k++)
            if (b->xas[n->xa_first + k].shared_id != NONE32)
                nshared++;
        hdr[4] = (uint8_t)nshared;
        if (nshared > 255)
            return fail(b, ERN_ELIMIT, "more than 255 shared xattrs on one inode");
        if ((r = win_write(b, off, hdr, 12)))
            return r;
        off += 12;
        for (uint32_t k = 0; k < n->xa_count; k++) {
            struct xattr_rec *x = &b->xas[n->xa_first + k];
            if (x->shared_id == NONE32)
                continue;
            uint8_t idb[4];
            put32(idb, x->shared_id);
            if ((r = win_write(b, off, idb, 4)))
                return r;
            off += 4;
        }
        for (uint32_t k = 0; k < n->xa_count; k++) {
            struct xattr_rec *x = &b->xas[n->xa_first + k];
            if (x->shared_id != NONE32)
                continue;
            uint8_t eh[4] = {x->name_len, x->index, (uint8_t)x->val_len, (uint8_t)(x->val_len >> 8)};
            if ((r = win_write(b, off, eh, 4)) ||
                (r = win_write(b, off + 4, b->arena + x->name_off, x->name_len)) ||
                (r = win_write(b, off + 4 + x->name_len, b->arena + x->val_off, x->val_len)))
                return r;
            off += xentry_size(x);
        }
    }
    return 0;
}

static int write_node_data(erofs_builder *b, struct node *n)
{
    uint32_t blksz = b->blksz;
    uint32_t fmt = n->mode & S_IFMT;
    uint64_t tail_off = n->meta_off + (n->extended ? 64 : 32) + n->xattr_isize;
    if (n->layout == L_CHUNK) {
        struct chunkset *cs = &b->chunks[n->aux];
        if (n->dkind == D_CHUNKS) {
            uint32_t unit = (cs->format & CHUNK_INDEXES) ? 8 : 4;
            uint64_t off = align_up(tail_off, unit);
            for (uint32_t c = 0; c < cs->count; c++) {
                uint8_t e[8];
                put64(e, cs->entries[c]);
                int r = win_write(b, off, e, unit);
                if (r)
                    return r;
                off += unit;
            }
            return 0;
        }
        /* D_SPARSE: block map + copy of the data extents only */
        uint64_t off = align_up(tail_off, 4);
        for (uint32_t c = 0; c < cs->count; c++) {
            uint8_t e[4];
            put32(e, (cs->entries[c] & 1) ? (uint32_t)(cs->entries[c] >> 32) : NULL_ADDR);
            int r = win_write(b, off, e, 4);
            if (r)
                return r;
            off += 4;
        }
        if (n->streamed)
            return 0;     /* the stream worker copied the data */
        char *path = strndup((const char *)b->arena + n->path_off, n->path_len);
        if (!path)
            return fail(b, ERN_ENOMEM, "out of memory");
        int fd = open(path, O_RDONLY | O_NOCTTY | O_CLOEXEC);
        if (fd < 0) {
            int r = fail(b, ERN_EIO, "%s: %s", path, strerror(errno));
            free(path);
            return r;
        }
        uint64_t csz = (uint64_t)blksz << (cs->format & 0x1F);
        struct xfer x;
        main_xfer(b, &x);
        int r = x_copy_sparse(&x, fd, path, n->size, cs->entries, cs->count, csz);
        if (r)
            r = fail(b, r, "%s", x.err);
        close(fd);
        free(path);
        return r;
    }
    if (!is_flat_data(n) || n->size == 0)
        return 0;
    uint64_t full = n->layout == L_INLINE ? n->size / blksz * blksz : n->size;
    uint64_t data_pos = (uint64_t)n->startblk * blksz;
    if (fmt == S_IFDIR) {
        uint64_t bufsz = align_up(n->size, blksz);
        uint8_t *buf = calloc(1, bufsz);
        if (!buf)
            return fail(b, ERN_ENOMEM, "out of memory");
        dir_pack(b, n, 0, buf);
        int r = 0;
        if (full)
            r = pwrite_all(b, buf, full, data_pos);
        if (!r && n->tail)
            r = win_write(b, tail_off, buf + full, n->tail);
        if (!r && n->layout == L_PLAIN && n->size > full) { /* unreachable: full == size */ }
        free(buf);
        return r;
    }
    if (n->dkind == D_BYTES) {
        const uint8_t *src = b->arena + n->data_off;
        int r = 0;
        if (full)
            r = pwrite_all(b, src, full, data_pos);
        if (!r && n->tail)
            r = win_write(b, tail_off, src + full, n->tail);
        return r;
    }
    /* D_FILE */
    if (n->streamed) {
        /* full blocks were copied by the stream worker; the inline tail was read by it
         * too unless over the memory budget */
        if (!n->tail)
            return 0;
        if (n->tailbuf) {
            int r = win_write(b, tail_off, n->tailbuf, n->tail);
            free(n->tailbuf);
            n->tailbuf = NULL;
            b->bytes_done += n->tail;
            return r;
        }
        full = n->size - n->tail;
    }
    char *path = strndup((const char *)b->arena + n->path_off, n->path_len);
    if (!path)
        return fail(b, ERN_ENOMEM, "out of memory");
    int fd = open(path, O_RDONLY | O_NOCTTY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) {
        int r = fail(b, ERN_EIO, "%s: %s", path, strerror(errno));
        free(path);
        return r;
    }
    int r = 0;
    struct stat st;
    if (n->data_off == 0 && fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
        (uint64_t)st.st_size != n->size)
        r = fail(b, ERN_EIO, "%s: size changed while building the image", path);
    if (!r && full && !n->streamed)
        r = copy_range(b, fd, n->data_off, data_pos, full, path);
    if (!r && n->tail) {
        uint8_t *dst = win_ptr(b, tail_off, n->tail);
        if (!dst)
            r = ERN_EIO;
        else
            r = read_exact(b, fd, dst, n->tail, n->data_off + full, path);
        b->bytes_done += n->tail;
    }
    close(fd);
    free(path);
    return r;
}

int erofs_builder_write_begin(erofs_builder *b, int fd)
{
    if (!b->laid_out)
        return fail(b, ERN_EINVAL, "layout() must run before write()");
    b->fd = fd;
    b->wpos = 0;
    b->bytes_done = 0;
    b->wfailed = 0;
    if (!b->win)
        b->win = calloc(1, WIN_SIZE);
    if (!b->cbuf)
        b->cbuf = malloc(CBUF_SIZE);
    if (!b->win || !b->cbuf)
        return fail(b, ERN_ENOMEM, "out of memory");
    memset(b->win, 0, WIN_SIZE);
    /* the window never covers data written elsewhere (stream mode: data precedes) */
    b->win_start = b->info.meta_start;
    b->win_hi = b->win_start;
    if (b->sfd >= 0 && fd != b->sfd)
        return fail(b, ERN_EINVAL, "stream mode: write() needs the fd given to set_output");
    if ((b->sfd < 0 && ftruncate(fd, 0) < 0) ||
        ftruncate(fd, (off_t)b->info.image_size) < 0)
        return fail(b, ERN_EIO, "sizing the image: %s", strerror(errno));
    return 0;
}

int64_t erofs_builder_write_step(erofs_builder *b, uint32_t max_nodes, uint64_t *bytes_done)
{
    if (b->fd < 0 || b->wfailed)
        return fail(b, ERN_EINVAL, "write not started");
    uint32_t end = b->wpos + max_nodes;
    if (end > b->norder || end < b->wpos)
        end = b->norder;
    for (; b->wpos < end; b->wpos++) {
        struct node *n = &b->nodes[b->worder[b->wpos]];
        int r = write_inode(b, n);
        if (!r)
            r = write_node_data(b, n);
        if (r) {
            b->wfailed = 1;
            return r;
        }
    }
    if (bytes_done)
        *bytes_done = b->bytes_done;
    return (int64_t)(b->norder - b->wpos);
}

int erofs_builder_write_end(erofs_builder *b)
{
    if (b->fd < 0 || b->wfailed || b->wpos != b->norder)
        return fail(b, ERN_EINVAL, "write not complete");
    int r = win_flush(b);
    if (r)
        return r;
    uint32_t blksz = b->blksz;
    /* shared xattrs */
    if (b->nshared) {
        uint64_t off = (uint64_t)b->info.xattr_blkaddr * blksz;
        for (uint32_t i = 0; i < b->nshared; i++) {
            struct xattr_rec *x = &b->xas[b->shared_order[i]];
            uint32_t sz = xentry_size(x);
            uint8_t e[4 + 255 + 65535 + 4];
            memset(e, 0, sz);
            e[0] = x->name_len;
            e[1] = x->index;
            put16(e + 2, x->val_len);
            memcpy(e + 4, b->arena + x->name_off, x->name_len);
            memcpy(e + 4 + x->name_len, b->arena + x->val_off, x->val_len);
            if ((r = pwrite_all(b, e, sz, off)))
                return r;
            off += sz;
        }
    }
    /* caller's reserved and appended bytes, device table */
    if (ftruncate(b->fd, (off_t)b->info.image_size) < 0)
        return fail(b, ERN_EIO, "sizing the image: %s", strerror(errno));
    for (uint32_t i = 0; i < b->nputs; i++)
        if ((r = pwrite_all(b, b->puts[i].data, b->puts[i].len, b->puts[i].off)))
            return r;
    for (uint32_t i = 0; i < b->ndevs; i++) {
        uint8_t slot[128];
        memset(slot, 0, sizeof(slot));
        memcpy(slot, b->devs[i].tag, 64);
        put32(slot + 64, b->devs[i].blocks);
        put32(slot + 68, b->devs[i].mapped);
        if ((r = pwrite_all(b, slot, 128, (uint64_t)b->o.devt_slotoff * 128 + 128ull * i)))
            return r;
    }
    /* superblock */
    uint8_t blk0[4096 + 1024];
    size_t b0len = blksz > 1024 ? blksz : 1024 + blksz;
    memset(blk0, 0, sizeof(blk0));
    ssize_t got = pread(b->fd, blk0, b0len, 0);
    if (got < 0)
        return fail(b, ERN_EIO, "reading back the image: %s", strerror(errno));
    uint8_t *sb = blk0 + SB_OFFSET;
    memset(sb, 0, 128);
    put32(sb + 0x00, EROFS_MAGIC);
    put32(sb + 0x08, b->info.feature_compat);
    sb[0x0C] = (uint8_t)b->o.blkszbits;
    sb[0x0D] = 0;
    put16(sb + 0x0E, (uint32_t)b->info.root_nid);
    put64(sb + 0x10, b->info.inodes);
    put64(sb + 0x18, (uint64_t)b->info.build_time);
    put32(sb + 0x20, b->info.build_time_nsec);
    put32(sb + 0x24, b->sb_blocks_set ? (uint32_t)b->sb_blocks_val
                     : b->o.sb_blocks ? (uint32_t)b->o.sb_blocks
                                      : (uint32_t)(b->info.image_size / blksz));
    put32(sb + 0x28, b->info.meta_blkaddr);
    put32(sb + 0x2C, b->info.xattr_blkaddr);
    memcpy(sb + 0x30, b->o.uuid, 16);
    memcpy(sb + 0x40, b->o.volume_name, 15);
    sb[0x40 + 15] = 0;
    put32(sb + 0x50, b->info.feature_incompat);
    put16(sb + 0x56, b->ndevs);
    put16(sb + 0x58, b->o.devt_slotoff);
    if (b->o.sb_checksum)
        put32(sb + 0x04, erofs_sb_checksum(blk0, blksz > 1024 ? blksz : 1024 + blksz));
    if ((r = pwrite_all(b, sb, 128, SB_OFFSET)))
        return r;
    b->fd = -1;
    b->wdone = 1;
    return 0;
}

int erofs_builder_write(erofs_builder *b, int fd)
{
    int r = erofs_builder_write_begin(b, fd);
    if (r)
        return r;
    int64_t left;
    do {
        left = erofs_builder_write_step(b, 0xFFFFFFFFu, NULL);
        if (left < 0)
            return (int)left;
    } while (left > 0);
    return erofs_builder_write_end(b);
}
