/* erofs-tools C core, directory walk: a source tree into builder nodes (mkfs's own walk).
 *
 * The same walk as erofs_tools/builder/tree.py (TreeWalker), without a Python object per
 * entry: depth first (each directory's files, then its subdirectories, as os.walk and
 * mkfs.erofs place the data), each directory's entries in bytewise name order; one
 * fstatat per entry relative to its directory's fd; llistxattr + lgetxattr (names in
 * byte order), readlinkat for symlinks; hardlinks found by (st_dev, st_ino). Regular
 * file data goes through erofs_node_set_file (the stream worker copies it meanwhile).
 * The walk runs in steps of a bounded number of entries, so the caller can show progress
 * and take signals between them. Error messages have the Python walk's form:
 * "PATH: reason", PATH at most its last 300 bytes.
 */
#include "builder_int.h"
#include <dirent.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>

/* listxattrat(2) (Linux 6.13): the names relative to the directory fd, without
 * resolving the whole path again; glibc has no wrapper yet. The number is the same on
 * every architecture with the generic syscall table. */
#if defined(SYS_listxattrat)
#define NR_LISTXATTRAT SYS_listxattrat
#elif defined(__x86_64__) || defined(__aarch64__)
#define NR_LISTXATTRAT 465
#endif

#define SHOWN 300                 /* bytes of a path shown in a message */
#define XVAL_MAX 65536            /* XATTR_SIZE_MAX */
#define DENTS_BUF 32768           /* getdents64 buffer */
#define OVL_OPAQUE "trusted.overlay.opaque"
#define OVL_ORIGIN "trusted.overlay.origin"

struct wdir {                     /* a directory waiting for its entries to be read */
    char *path;
    size_t len;
    uint32_t node;
};

struct link {                     /* an inode with more than one link */
    uint64_t dev, ino;
    uint32_t node, left;          /* left: links not seen yet */
    uint32_t used;                /* 0: free slot (slots are never freed) */
};

struct erofs_walk {
    erofs_builder *b;
    struct erofs_walk_opts o;
    char *src;
    size_t srclen;
    int started;
    int64_t root;
    /* directories still to walk, a stack (q[qhead + i], i < qlen; the ring's head
     * stays put): those a directory found, pushed in name order, are reversed when it
     * is done so that the first one is walked next */
    struct wdir *q;
    uint32_t qhead, qlen, qcap;
    uint32_t qmark;               /* qlen when the current directory was taken */
    /* the directory being walked: its fd, entries sorted, the next one */
    struct wdir cur;
    int dfd;
    char *names;                  /* NUL-terminated names back to back, each followed by
                                   * its d_type byte */
    size_t names_len, names_cap;
    uint32_t *offs;
    uint32_t nnames, cap_names, next;
    /* the entry's path: cur.path + '/' + name */
    char *pbuf;
    size_t pcap;
    /* hardlinks: open addressing on (dev, ino) */
    struct link *links;
    uint32_t nlinks, cap_links;
    char *xnames, *xval, *lnk;
    const char **xlist;           /* the names of one llistxattr */
    char *dents;                  /* getdents64 buffer */
    size_t xcap, lcap;
    uint64_t entries, bytes, xattrs;
    /* list_files: this step's regular files (erofs_walk_files) */
    uint8_t *files;
    size_t files_len, files_cap;
};

static const char *shown(const char *path)
{
    size_t n = strlen(path);
    return n > SHOWN ? path + n - SHOWN : path;
}

static int werr(erofs_walk *w, const char *path, int e)
{
    size_t n = strlen(path);
    return fail(w->b, ERN_EIO, "%s%s: %s", n > SHOWN ? "..." : "", shown(path), strerror(e));
}

/* an error of the builder about this path: the path in front of its message */
static int wrap(erofs_walk *w, const char *path, int code)
{
    char msg[sizeof(w->b->err)];
    memcpy(msg, w->b->err, sizeof(msg));
    size_t n = strlen(path);
    return fail(w->b, code, "%s%s: %s", n > SHOWN ? "..." : "", shown(path), msg);
}

erofs_walk *erofs_walk_new(erofs_builder *b, const char *src, size_t srclen,
                           const struct erofs_walk_opts *o)
{
    erofs_walk *w = calloc(1, sizeof(*w));
    if (!w)
        return NULL;
    w->b = b;
    w->o = *o;
    w->dfd = -1;
    w->root = -1;
    w->src = strndup(src, srclen);
    w->xnames = malloc(XVAL_MAX);
    w->xval = malloc(XVAL_MAX);
    w->xlist = malloc(XVAL_MAX / 2 * sizeof(*w->xlist));
    w->dents = malloc(DENTS_BUF);
    w->xcap = XVAL_MAX;
    if (!w->src || !w->xnames || !w->xval || !w->xlist || !w->dents) {
        erofs_walk_free(w);
        return NULL;
    }
    w->srclen = strlen(w->src);
    return w;
}

void erofs_walk_free(erofs_walk *w)
{
    if (!w)
        return;
    if (w->dfd >= 0)
        close(w->dfd);
    for (uint32_t i = 0; i < w->qlen; i++)
        free(w->q[(w->qhead + i) % w->qcap].path);
    free(w->q);
    free(w->cur.path);
    free(w->names);
    free(w->offs);
    free(w->pbuf);
    free(w->links);
    free(w->xnames);
    free(w->xval);
    free(w->xlist);
    free(w->dents);
    free(w->lnk);
    free(w->src);
    free(w->files);
    free(w);
}

int64_t erofs_walk_root(erofs_walk *w)
{
    return w->root;
}

static int nomem(erofs_walk *w)
{
    return fail(w->b, ERN_ENOMEM, "out of memory");
}

static int push_dir(erofs_walk *w, const char *path, size_t len, uint32_t node)
{
    if (w->qlen == w->qcap) {
        uint32_t ncap = w->qcap ? w->qcap * 2 : 256;
        struct wdir *nq = malloc(ncap * sizeof(*nq));
        if (!nq)
            return nomem(w);
        for (uint32_t i = 0; i < w->qlen; i++)
            nq[i] = w->q[(w->qhead + i) % w->qcap];
        free(w->q);
        w->q = nq;
        w->qcap = ncap;
        w->qhead = 0;
    }
    char *p = malloc(len + 1);
    if (!p)
        return nomem(w);
    memcpy(p, path, len + 1);
    w->q[(w->qhead + w->qlen) % w->qcap] = (struct wdir){p, len, node};
    w->qlen++;
    return 0;
}

/* ---------------------------------------------------------------- hardlinks ---- */

static uint32_t link_slot(const erofs_walk *w, uint64_t dev, uint64_t ino)
{
    uint64_t h = (ino * 0x9E3779B97F4A7C15ull) ^ (dev * 0xC2B2AE3D27D4EB4Full);
    uint32_t mask = w->cap_links - 1;
    uint32_t i = (uint32_t)(h >> 32) & mask;
    while (w->links[i].used && (w->links[i].dev != dev || w->links[i].ino != ino))
        i = (i + 1) & mask;
    return i;
}

static int link_put(erofs_walk *w, uint64_t dev, uint64_t ino, uint32_t node, uint32_t left)
{
    /* slots are never freed (that would break the probe chains): a table of every
     * multiply linked inode, 32 bytes each; a key seen again once its links are used up
     * gets a new inode, as in the Python walk */
    if (w->cap_links) {
        struct link *l = &w->links[link_slot(w, dev, ino)];
        if (l->used) {
            l->node = node;
            l->left = left;
            return 0;
        }
    }
    if ((w->nlinks + 1) * 2 > w->cap_links) {
        uint32_t ncap = w->cap_links ? w->cap_links * 2 : 1024;
        struct link *old = w->links;
        uint32_t ocap = w->cap_links;
        w->links = calloc(ncap, sizeof(*w->links));
        if (!w->links) {
            w->links = old;
            return nomem(w);
        }
        w->cap_links = ncap;
        for (uint32_t i = 0; i < ocap; i++)
            if (old[i].used)
                w->links[link_slot(w, old[i].dev, old[i].ino)] = old[i];
        free(old);
    }
    struct link *l = &w->links[link_slot(w, dev, ino)];
    *l = (struct link){dev, ino, node, left, 1};
    w->nlinks++;
    return 0;
}

/* ------------------------------------------------------------------ entries ---- */

static int no_listxattrat;

static ssize_t list_names(erofs_walk *w, int dfd, const char *name, const char *path)
{
#ifdef NR_LISTXATTRAT
    if (!no_listxattrat && dfd != AT_FDCWD) {
        long n = syscall(NR_LISTXATTRAT, dfd, name, AT_SYMLINK_NOFOLLOW, w->xnames,
                         (size_t)XVAL_MAX);
        if (n >= 0 || (errno != ENOSYS && errno != EPERM))
            return n;
        no_listxattrat = 1;      /* an older kernel (or a seccomp filter) */
    }
#else
    (void)dfd;
    (void)name;
#endif
    return llistxattr(path, w->xnames, XVAL_MAX);
}

static int add_xattrs(erofs_walk *w, int dfd, const char *name, const char *path,
                      uint32_t node)
{
    ssize_t n = list_names(w, dfd, name, path);
    if (n < 0) {
        if (errno == ENOTSUP || errno == EOPNOTSUPP)
            return 0;
        return werr(w, path, errno);
    }
    if (n == 0)
        return 0;
    /* names in byte order, as the Python walk sorts them */
    const char **names = w->xlist;
    uint32_t cnt = 0;
    for (ssize_t i = 0; i < n; i += (ssize_t)strlen(w->xnames + i) + 1)
        if (w->xnames[i])
            names[cnt++] = w->xnames + i;
    for (uint32_t i = 1; i < cnt; i++)       /* insertion sort: a few names */
        for (uint32_t j = i; j > 0 && strcmp(names[j - 1], names[j]) > 0; j--) {
            const char *t = names[j];
            names[j] = names[j - 1];
            names[j - 1] = t;
        }
    for (uint32_t i = 0; i < cnt; i++) {
        if (w->o.ovlfs_strip && !strcmp(names[i], OVL_OPAQUE))
            continue;
        ssize_t v = lgetxattr(path, names[i], w->xval, XVAL_MAX);
        if (v < 0) {
            if (errno == ENODATA)
                continue;                    /* removed meanwhile */
            return werr(w, path, errno);
        }
        int r = erofs_node_add_xattr(w->b, node, names[i], strlen(names[i]), w->xval,
                                     (size_t)v);
        if (r)
            return wrap(w, path, r);
        w->xattrs++;
    }
    return 0;
}

/* a regular file for the caller (list_files): its record appended to w->files */
static int list_file(erofs_walk *w, uint32_t node, const char *path, uint64_t size,
                     int sparse)
{
    size_t plen = strlen(path);
    if (plen >= (1u << 31))
        return werr(w, path, ENAMETOOLONG);
    size_t rec = 16 + ((plen + 7) & ~(size_t)7);
    if (w->files_len + rec > w->files_cap) {
        size_t ncap = w->files_cap ? w->files_cap * 2 : 65536;
        while (ncap < w->files_len + rec)
            ncap *= 2;
        uint8_t *p = realloc(w->files, ncap);
        if (!p)
            return nomem(w);
        w->files = p;
        w->files_cap = ncap;
    }
    uint8_t *p = w->files + w->files_len;
    uint32_t lenf = (uint32_t)plen | (sparse ? 1u << 31 : 0);
    memcpy(p, &node, 4);
    memcpy(p + 4, &lenf, 4);
    memcpy(p + 8, &size, 8);
    memcpy(p + 16, path, plen);
    memset(p + 16 + plen, 0, rec - 16 - plen);
    w->files_len += rec;
    return 0;
}

size_t erofs_walk_files(erofs_walk *w, const uint8_t **buf, uint64_t *xattrs)
{
    *buf = w->files;
    if (xattrs)
        *xattrs = w->xattrs;
    return w->files_len;
}

/* readlinkat of the entry: its target in w->lnk, -> length or < 0 */
static ssize_t read_link(erofs_walk *w, int dfd, const char *name, const char *path)
{
    for (;;) {
        if (w->lcap == 0 || w->lcap > (1u << 24)) {
            if (w->lcap)
                return werr(w, path, ENAMETOOLONG);
            w->lcap = 4096;
            w->lnk = malloc(w->lcap);
            if (!w->lnk)
                return nomem(w);
        }
        ssize_t n = readlinkat(dfd, name, w->lnk, w->lcap);
        if (n < 0)
            return werr(w, path, errno);
        if ((size_t)n < w->lcap)
            return n;
        char *p = realloc(w->lnk, w->lcap * 2);
        if (!p)
            return nomem(w);
        w->lnk = p;
        w->lcap *= 2;
    }
}

/* one inode for the entry (dfd, name) at path with stat st; -> node id or < 0 */
static int64_t add_inode(erofs_walk *w, int dfd, const char *name, const char *path,
                         const struct stat *st)
{
    uint32_t fmt = st->st_mode & S_IFMT;
    uint64_t uid = (w->o.force_uid >= 0 ? (uint64_t)w->o.force_uid : st->st_uid) +
                   w->o.uid_offset;
    uint64_t gid = (w->o.force_gid >= 0 ? (uint64_t)w->o.force_gid : st->st_gid) +
                   w->o.gid_offset;
    /* mkfs.erofs reports the overflow and goes on with the wrapped id (another owner):
     * an error here */
    if (uid > 0xFFFFFFFFu || gid > 0xFFFFFFFFu) {
        size_t n = strlen(path);
        return fail(w->b, ERN_ELIMIT, "%s%s: %s overflows with the offset (%llu)",
                    n > SHOWN ? "..." : "", shown(path), uid > 0xFFFFFFFFu ? "uid" : "gid",
                    (unsigned long long)(uid > 0xFFFFFFFFu ? uid : gid));
    }
    int fix = w->o.fixed_mtime_set &&
              (!w->o.clamp_mtime || st->st_mtim.tv_sec >= w->o.fixed_mtime);
    int64_t sec = fix ? w->o.fixed_mtime : st->st_mtim.tv_sec;
    uint32_t nsec = fix ? 0 : (uint32_t)st->st_mtim.tv_nsec;
    uint64_t size = 0;
    uint32_t maj = 0, mnr = 0;
    ssize_t tlen = -1;
    if (fmt == S_IFREG) {
        size = (uint64_t)st->st_size;
    } else if (fmt == S_IFLNK) {
        tlen = read_link(w, dfd, name, path);
        if (tlen < 0)
            return tlen;
        size = (uint64_t)tlen;
    } else if (fmt == S_IFCHR || fmt == S_IFBLK) {
        maj = major(st->st_rdev);
        mnr = minor(st->st_rdev);
    }
    int64_t node = erofs_node_add(w->b, st->st_mode, (uint32_t)uid, (uint32_t)gid, sec, nsec,
                                  size, maj, mnr);
    if (node < 0)
        return wrap(w, path, (int)node);
    int r = w->o.no_xattrs ? 0 : add_xattrs(w, dfd, name, path, (uint32_t)node);
                                                        /* before the data */
    if (r)
        return r;
    if (fmt == S_IFREG && w->o.list_files) {
        r = list_file(w, (uint32_t)node, path, size, (uint64_t)st->st_blocks * 512 < size);
        if (r)
            return r;
    } else if (fmt == S_IFREG && size) {
        int sparse = (uint64_t)st->st_blocks * 512 < size;
        r = erofs_node_set_file(w->b, (uint32_t)node, path, strlen(path), 0,
                                sparse ? ERN_FILE_SPARSE : 0);
    } else if (tlen >= 0) {
        r = erofs_node_set_bytes(w->b, (uint32_t)node, w->lnk, (size_t)tlen);
    }
    if (r)
        return wrap(w, path, r);
    w->entries++;
    w->bytes += size;
    return node;
}

static int namesort_cmp(const void *a, const void *b2, void *arg)
{
    const char *names = arg;
    return strcmp(names + *(const uint32_t *)a, names + *(const uint32_t *)b2);
}

/* an entry that is neither a directory nor a regular file (symlinks, devices, fifos,
 * sockets), by d_type; lstat when the source fs gives none (as Python's DirEntry) */
static int bare_entry(erofs_walk *w, const char *nm)
{
    unsigned char t = (unsigned char)nm[strlen(nm) + 1];
    if (t == DT_UNKNOWN) {
        struct stat st;
        if (fstatat(w->dfd, nm, &st, AT_SYMLINK_NOFOLLOW) < 0)
            return 0;       /* (walk_entry reports it) */
        return !S_ISDIR(st.st_mode) && !S_ISREG(st.st_mode);
    }
    return t != DT_DIR && t != DT_REG;
}

/* a directory's symlinks (and devices, fifos, sockets) walked before its other entries,
 * names in order within each group (TreeWalker.walk does the same), so that in plain
 * stream mode their records go right after the directory's (smeta.c places records in
 * the order nodes are made). A reader
 * listing a directory stats them there: os.walk's is_dir() and ls -l/--color follow
 * each symlink when they list, before reading any file; walked in name order their
 * records landed after the last file's data (or among it), ahead of the data's
 * readahead, one 4 KiB read each (/usr/share's cold os.walk read of every file: 339
 * 4 KiB reads outside the readahead stream -> 99, 1205 block requests -> 867;
 * mkfs.erofs's image 121 and 827). */
static int bare_first(erofs_walk *w)
{
    uint32_t nb = 0;
    for (uint32_t i = 0; i < w->nnames; i++) {
        char *nm = w->names + w->offs[i];
        int bare = bare_entry(w, nm);
        nm[strlen(nm) + 1] = (char)bare;    /* (the d_type byte is not needed after) */
        nb += (uint32_t)bare;
    }
    if (!nb || nb == w->nnames)
        return 0;
    uint32_t *t = malloc((size_t)w->nnames * sizeof(*t));
    if (!t)
        return nomem(w);
    uint32_t a = 0, c = nb;
    for (uint32_t i = 0; i < w->nnames; i++) {
        const char *nm = w->names + w->offs[i];
        if (nm[strlen(nm) + 1])
            t[a++] = w->offs[i];
        else
            t[c++] = w->offs[i];
    }
    memcpy(w->offs, t, (size_t)w->nnames * sizeof(*t));
    free(t);
    return 0;
}

/* entry nm of the current directory is an overlayfs whiteout (char 0:0); d_type first */
static int is_whiteout(erofs_walk *w, const char *nm)
{
    unsigned char t = (unsigned char)nm[strlen(nm) + 1];
    struct stat st;
    if (t != DT_CHR && t != DT_UNKNOWN)
        return 0;
    if (fstatat(w->dfd, nm, &st, AT_SYMLINK_NOFOLLOW) < 0)
        return 0;       /* (walk_entry reports it) */
    return S_ISCHR(st.st_mode) && st.st_rdev == 0;
}

/* the whiteouts of the directory just read: dropped (--ovlfs-strip), or its node marked
 * trusted.overlay.origin="" unless the source has it (mkfs.erofs 1.9 does both the
 * same way). Before smeta_dir: the directory's names and xattrs size its record. */
static int whiteouts(erofs_walk *w)
{
    uint32_t kept = 0, found = 0;
    for (uint32_t i = 0; i < w->nnames; i++) {
        int wh = is_whiteout(w, w->names + w->offs[i]);
        found += (uint32_t)wh;
        if (!wh || !w->o.ovlfs_strip)
            w->offs[kept++] = w->offs[i];
    }
    w->nnames = kept;
    if (!found || w->o.ovlfs_strip || !w->o.mark_whiteout_dirs ||
            (!w->o.no_xattrs && lgetxattr(w->cur.path, OVL_ORIGIN, NULL, 0) >= 0))
        return 0;
    int r = erofs_node_add_xattr(w->b, w->cur.node, OVL_ORIGIN, strlen(OVL_ORIGIN), "", 0);
    return r ? wrap(w, w->cur.path, r) : 0;
}

/* read the next queued directory's names (sorted); -> 1 read, 0 queue empty, < 0 */
static int open_next_dir(erofs_walk *w)
{
    if (w->dfd >= 0) {
        close(w->dfd);
        w->dfd = -1;
    }
    free(w->cur.path);
    w->cur.path = NULL;
    if (!w->qlen)
        return 0;
    for (uint32_t i = w->qmark, k = w->qlen - 1; i < k; i++, k--) {
        struct wdir t = w->q[(w->qhead + i) % w->qcap];
        w->q[(w->qhead + i) % w->qcap] = w->q[(w->qhead + k) % w->qcap];
        w->q[(w->qhead + k) % w->qcap] = t;
    }
    w->qlen--;
    w->cur = w->q[(w->qhead + w->qlen) % w->qcap];
    w->qmark = w->qlen;
    int fd = open(w->cur.path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return werr(w, w->cur.path, errno);
    w->dfd = fd;                  /* kept for fstatat/readlinkat of the entries */
    w->nnames = 0;
    w->names_len = 0;
    w->next = 0;
    /* getdents64 straight into our buffer: no DIR (its 32 KiB buffer, fcntl, dup) */
    for (;;) {
        ssize_t got = getdents64(fd, w->dents, DENTS_BUF);
        if (got < 0)
            return werr(w, w->cur.path, errno);
        if (got == 0)
            break;
        for (ssize_t pos = 0; pos < got;) {
            const struct dirent64 *de = (const struct dirent64 *)(w->dents + pos);
            pos += de->d_reclen;
            const char *nm = de->d_name;
            if (nm[0] == '.' && (!nm[1] || (nm[1] == '.' && !nm[2])))
                continue;
            size_t l = strlen(nm) + 2;     /* (name, NUL, d_type) */
            if (w->names_len + l > w->names_cap) {
                size_t ncap = w->names_cap ? w->names_cap * 2 : 65536;
                while (ncap < w->names_len + l)
                    ncap *= 2;
                if (ncap > 0xFFFFFFFFu)
                    return nomem(w);
                char *p = realloc(w->names, ncap);
                if (!p)
                    return nomem(w);
                w->names = p;
                w->names_cap = ncap;
            }
            uint32_t *offs = grow(w->offs, &w->cap_names, w->nnames + 1, sizeof(*offs));
            if (!offs)
                return nomem(w);
            w->offs = offs;
            memcpy(w->names + w->names_len, nm, l - 1);
            w->names[w->names_len + l - 1] = (char)de->d_type;
            w->offs[w->nnames++] = (uint32_t)w->names_len;
            w->names_len += l;
        }
    }
    qsort_r(w->offs, w->nnames, sizeof(*w->offs), namesort_cmp, w->names);
    int r = w->o.ovlfs_strip || w->o.mark_whiteout_dirs ? whiteouts(w) : 0;
    /* plain stream mode: the directory's inode and blocks before its files' */
    if (!r)
        r = smeta_dir(w->b, w->cur.node, w->names, w->offs, w->nnames);
    if (!r)
        r = bare_first(w);
    return r ? r : 1;
}

static int entry_path(erofs_walk *w, const char *name)
{
    size_t dl = w->cur.len, nl = strlen(name);
    int slash = dl && w->cur.path[dl - 1] != '/';
    size_t need = dl + (size_t)slash + nl + 1;
    if (need > w->pcap) {
        size_t ncap = w->pcap ? w->pcap : 4096;
        while (ncap < need)
            ncap *= 2;
        char *p = realloc(w->pbuf, ncap);
        if (!p)
            return nomem(w);
        w->pbuf = p;
        w->pcap = ncap;
    }
    memcpy(w->pbuf, w->cur.path, dl);
    if (slash)
        w->pbuf[dl] = '/';
    memcpy(w->pbuf + dl + slash, name, nl + 1);
    return 0;
}

static int walk_entry(erofs_walk *w, const char *name)
{
    int r = entry_path(w, name);
    if (r)
        return r;
    const char *path = w->pbuf;
    struct stat st;
    if (fstatat(w->dfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
        return werr(w, path, errno);
    int64_t node;
    if (!S_ISDIR(st.st_mode) && st.st_nlink > 1 && !w->o.hard_dereference) {
        struct link *l = w->cap_links ? &w->links[link_slot(w, st.st_dev, st.st_ino)] : NULL;
        if (l && l->used && l->left) {
            l->left--;
            r = erofs_dir_add(w->b, w->cur.node, name, strlen(name), l->node);
            return r ? wrap(w, path, r) : 0;
        }
        node = add_inode(w, w->dfd, name, path, &st);
        if (node < 0)
            return (int)node;
        r = link_put(w, st.st_dev, st.st_ino, (uint32_t)node, (uint32_t)(st.st_nlink - 1));
        if (r)
            return r;
    } else {
        node = add_inode(w, w->dfd, name, path, &st);
        if (node < 0)
            return (int)node;
    }
    r = erofs_dir_add(w->b, w->cur.node, name, strlen(name), (uint32_t)node);
    if (r)
        return wrap(w, path, r);
    if (S_ISDIR(st.st_mode))
        return push_dir(w, path, strlen(path), (uint32_t)node);
    return 0;
}

int erofs_walk_step(erofs_walk *w, uint32_t max_entries, uint64_t *entries, uint64_t *bytes)
{
    int r = 0;
    w->files_len = 0;             /* the last step's files were taken */
    if (!w->started) {
        w->started = 1;
        struct stat st;
        if (lstat(w->src, &st) < 0)
            return werr(w, w->src, errno);
        if (!S_ISDIR(st.st_mode))
            return fail(w->b, ERN_EIO, "%s: not a directory", shown(w->src));
        int64_t root = add_inode(w, AT_FDCWD, w->src, w->src, &st);
        if (root < 0)
            return (int)root;
        w->root = root;
        r = erofs_builder_set_root(w->b, (uint32_t)root);
        if (!r)
            r = push_dir(w, w->src, w->srclen, (uint32_t)root);
    }
    for (uint32_t done = 0; !r && done < max_entries; done++) {
        while (!r && (w->dfd < 0 || w->next >= w->nnames)) {
            r = open_next_dir(w);
            if (r == 0)
                goto out;          /* walked everything */
            r = r < 0 ? r : 0;
        }
        if (!r)
            r = walk_entry(w, w->names + w->offs[w->next++]);
    }
out:
    if (entries)
        *entries = w->entries;
    if (bytes)
        *bytes = w->bytes;
    if (r)
        return r;
    return w->dfd >= 0 || w->qlen ? 1 : 0;
}
