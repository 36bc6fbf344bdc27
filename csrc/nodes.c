/* erofs-tools C core, node graph: builder lifetime, nodes, xattrs, directory entries,
 * data sources (file, bytes, caller's chunks, sparse scan), devices and reserved bytes.
 * Nothing here decides positions; layout.c does, once every node is known. */
#include "builder_int.h"

int fail(erofs_builder *b, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b->err, sizeof(b->err), fmt, ap);
    va_end(ap);
    return code;
}

const struct nodex nodex_zero;

void *grow(void *p, uint32_t *cap, uint32_t need, size_t elem)
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

int64_t arena_put(erofs_builder *b, const void *data, size_t len)
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
    o->feature_compat = EROFS_FEATURE_COMPAT_MTIME; /* as mkfs.erofs */
    o->sb_checksum = 1;
    o->shared_xattrs = 1;
    o->inline_data = 1;
    o->auto_build_time = 1;
    o->compress_level = -1;
    memset(o->compress_lzma_lc, -1, sizeof(o->compress_lzma_lc));
    memset(o->compress_lzma_lp, -1, sizeof(o->compress_lzma_lp));
    memset(o->compress_lzma_pb, -1, sizeof(o->compress_lzma_pb));
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
    b->packed_node = NONE32;
    b->xpfx_ishare = -1;
    b->fd = -1;
    b->sfd = -1;
    b->bfd = -1;
    return b;
}

void erofs_builder_free(erofs_builder *b)
{
    if (!b)
        return;
    stream_stop(b, 1);
    chunked_free(b);
    zdir_drop(b);
    smeta_free(b);
    ot_free(b);
    free(b->wdirty);
    for (uint32_t i = 0; b->nx && i < b->nnodes; i++) {
        free(b->nx[i].tailbuf);
        free(b->nx[i].zmeta);
        free(b->nx[i].ztail);
    }
    free(b->nx);
    free(b->zc);
    free(b->xpfx);
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

int check_mutable(erofs_builder *b)
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
    if (b->o.stream_data || b->o.compress_dirs) {     /* (--zD: the map headers) */
        struct nodex *nx = grow(b->nx, &b->cap_nx, b->nnodes + 1, sizeof(*nx));
        if (!nx)
            return fail(b, ERN_ENOMEM, "out of memory");
        b->nx = nx;
        memset(&nx[b->nnodes], 0, sizeof(*nx));
    }
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

static int add_xattr_rec(erofs_builder *b, uint32_t node, uint8_t index,
                         const char *name, size_t namelen, const char *suffix, size_t sl,
                         const char *value, size_t valuelen)
{
    if (sl > EROFS_NAME_MAX)
        return fail(b, ERN_ELIMIT, "xattr name too long (%zu bytes)", namelen);
    if (valuelen > 65535)
        return fail(b, ERN_ELIMIT, "xattr value too large (%zu bytes)", valuelen);
    if (memchr(name, 0, namelen))
        return fail(b, ERN_EINVAL, "xattr name contains NUL");
    struct xattr_rec *nx = grow(b->xas, &b->cap_xa, b->nxa + 1, sizeof(*nx));
    if (!nx)
        return fail(b, ERN_ENOMEM, "out of memory");
    b->xas = nx;
    int64_t no = arena_put(b, suffix, sl);
    if (no < 0)
        return (int)no;
    int64_t vo = arena_put(b, value, valuelen);
    if (vo < 0)
        return (int)vo;
    struct node *xn = &b->nodes[node];
    if (xn->streamed)
        return fail(b, ERN_EINVAL, "stream mode: add xattrs before the file data");
    xn->xa_max += (xn->xa_max ? 0 : (uint32_t)sizeof(struct erofs_xattr_ibody_header)) +
                  (uint32_t)((sizeof(struct erofs_xattr_entry) + sl + valuelen + 3) & ~(size_t)3);
    struct xattr_rec *x = &b->xas[b->nxa++];
    x->node = node;
    x->name_off = (uint32_t)no;
    x->name_len = (uint8_t)sl;
    x->val_off = (uint32_t)vo;
    x->val_len = (uint16_t)valuelen;
    x->index = index;
    x->shared_id = NONE32;
    return 0;
}

int erofs_node_add_xattr(erofs_builder *b, uint32_t node, const char *name, size_t namelen,
                         const char *value, size_t valuelen)
{
    int r = check_mutable(b);
    if (r || (r = check_node(b, node)))
        return r;
    /* the whole name, prefix included, within XATTR_NAME_MAX: the kernel lists a longer
     * one but getxattr(2) refuses it (ERANGE), so no reader could have its value */
    if (namelen > EROFS_NAME_MAX)
        return fail(b, ERN_ELIMIT, "xattr name too long (%zu bytes, at most 255)", namelen);
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
    size_t pl = xprefixes[idx].len;
    uint32_t il;
    int id = b->xpfx_count && !xprefixes[idx].whole ?
             match_long_prefix(b, xprefixes[idx].index, name + pl, namelen - pl, &il) : -1;
    if (id >= 0)          /* a long prefix of --xattr-prefix: the rest after it stored */
        return add_xattr_rec(b, node, (uint8_t)(EROFS_XATTR_LONG_PREFIX | (uint32_t)id), name,
                             namelen, name + pl + il, namelen - pl - il, value, valuelen);
    return add_xattr_rec(b, node, xprefixes[idx].index, name, namelen,
                         name + xprefixes[idx].len, namelen - xprefixes[idx].len,
                         value, valuelen);
}

int erofs_node_add_xattr_long(erofs_builder *b, uint32_t node, uint32_t prefix_id,
                              const char *name, size_t namelen,
                              const char *value, size_t valuelen)
{
    int r = check_mutable(b);
    if (r || (r = check_node(b, node)))
        return r;
    if (prefix_id >= b->xpfx_count)
        return fail(b, ERN_EINVAL, "no long xattr prefix %u", prefix_id);
    return add_xattr_rec(b, node, (uint8_t)(EROFS_XATTR_LONG_PREFIX | prefix_id), name,
                         namelen, name, namelen, value, valuelen);
}

/* The table is checked entry by entry as the kernel reads it (sizes 1..256, 4-byte
 * aligned), so a caller's mistake cannot make an image the kernel refuses to mount. */
int erofs_builder_set_xattr_prefixes(erofs_builder *b, const char *table, size_t len,
                                     uint32_t count, int32_t ishare_id)
{
    int r = check_mutable(b);
    if (r)
        return r;
    if (b->xpfx_count)
        return fail(b, ERN_EINVAL, "long xattr prefixes already set");
    if (count == 0 || count > EROFS_XATTR_LONG_PREFIX_MASK + 1)
        return fail(b, ERN_ELIMIT, "%u long xattr prefixes (1 to 128)", count);
    if (ishare_id >= (int32_t)count || ishare_id < -1)
        return fail(b, ERN_EINVAL, "fingerprint prefix %d not in the table", ishare_id);
    if (b->nxa)
        return fail(b, ERN_EINVAL, "long xattr prefixes must be set before any xattr");
    size_t off = 0;
    for (uint32_t i = 0; i < count; i++) {
        if (off + 2 > len)
            return fail(b, ERN_EINVAL, "long xattr prefix table truncated");
        size_t sz = (size_t)(uint8_t)table[off] | ((size_t)(uint8_t)table[off + 1] << 8);
        if (sz < 1 || sz > EROFS_NAME_MAX + 1 || off + 2 + sz > len)
            return fail(b, ERN_ELIMIT, "long xattr prefix %u has size %zu", i, sz);
        off = (off + 2 + sz + 3) & ~(size_t)3;
    }
    if (off != len)
        return fail(b, ERN_EINVAL, "long xattr prefix table has %zu stray bytes", len - off);
    /* stream mode starts file data at the first block after the superblock before the
     * table is placed: compression records (< 256 bytes) and table must fit before it */
    if (b->o.stream_data && SB_END + 256 + len > (SB_END + b->blksz - 1) / b->blksz * b->blksz)
        return fail(b, ERN_ELIMIT, "long xattr prefix table too large (%zu bytes)", len);
    b->xpfx = malloc(len);
    if (!b->xpfx)
        return fail(b, ERN_ENOMEM, "out of memory");
    memcpy(b->xpfx, table, len);
    b->xpfx_len = (uint32_t)len;
    b->xpfx_count = count;
    b->xpfx_ishare = ishare_id;
    b->xpfx_packed = (b->o.fragments || b->o.all_fragments) && b->o.compress_alg &&
                     !b->o.plain_xattr_pfx;
    return zpacked_prefixes(b);
}

int erofs_dir_add(erofs_builder *b, uint32_t dir, const char *name, size_t namelen,
                  uint32_t child)
{
    int r = check_mutable(b);
    if (r || (r = check_node(b, dir)) || (r = check_node(b, child)))
        return r;
    if ((b->nodes[dir].mode & S_IFMT) != S_IFDIR)
        return fail(b, ERN_EINVAL, "node %u is not a directory", dir);
    if (namelen < 1 || namelen > EROFS_NAME_MAX)
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

/* Sparse scan: chunk size chosen so that a file has at most 64Ki chunks (one if it has
 * no data at all); a chunk is a hole when no data extent touches it. Returns 1 if chunk-based, 0 to stay flat. */
static int sparse_scan(erofs_builder *b, struct node *n, int fd, const char *path)
{
    uint64_t size = n->size;
    unsigned k = 0;
    /* a file without data (a headerball's): one chunk, or as few as the format allows */
    off_t first = lseek(fd, 0, SEEK_DATA);
    uint64_t most = (first < 0 && errno == ENXIO) || (first >= 0 && (uint64_t)first >= size)
                    ? 1 : 65536;
    while (((size + ((uint64_t)b->blksz << k) - 1) >> (b->o.blkszbits + k)) > most && k < 31)
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
    if (b->o.chunkbits && !b->o.compress_alg && b->o.stream_data && n->size)
        return b->worker_on ? chunked_file(b, node, path, pathlen, offset)
                            : fail(b, ERN_EINVAL, "stream mode: call erofs_builder_set_output first");
    /* compressed images read holes as zeros and compress them (as mkfs.erofs) */
    if ((flags & ERN_FILE_SPARSE) && !b->o.compress_alg && offset == 0 &&
        n->size > b->blksz) {
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
        return b->zp ? zpool_submit(b, node, path, pathlen, offset)
                     : stream_file(b, node, path, pathlen, offset);
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
    /* (-E48bit: 8-byte indexes may hold 48-bit block addresses, a tar over 2 TiB) */
    uint32_t ok = EROFS_CHUNK_FORMAT_SUPPORTED |
                  (b->o.sb_48bit && (chunk_format & EROFS_CHUNK_FORMAT_INDEXES) ?
                   EROFS_CHUNK_FORMAT_48BIT : 0);
    if (chunk_format & ~ok)
        return fail(b, ERN_EINVAL, "chunk format 0x%x has unsupported bits", chunk_format);
    unsigned cbits = b->o.blkszbits + (chunk_format & EROFS_CHUNK_FORMAT_BLKBITS_MASK);
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

int erofs_nodes_set_chunks(erofs_builder *b, uint32_t chunk_format, const uint32_t *nodes,
                           const uint32_t *counts, uint32_t n, const uint64_t *entries,
                           uint64_t nentries)
{
    /* one call for many files (a pack's 48k files: one Python-to-C crossing, not 48k);
     * the counts are checked against the entries before any node is touched */
    uint64_t at = 0;
    for (uint32_t i = 0; i < n; i++)
        at += counts[i];
    if (at != nentries)
        return fail(b, ERN_EINVAL, "%llu chunk entries given, the counts of %u nodes "
                    "add up to %llu", (unsigned long long)nentries, n,
                    (unsigned long long)at);
    at = 0;
    for (uint32_t i = 0; i < n; i++) {
        int r = erofs_node_set_chunks(b, nodes[i], chunk_format, entries + at, counts[i]);
        if (r)
            return r;
        at += counts[i];
    }
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
    /* stream mode reserves records by xa_max: the root's padding on top of it */
    if (b->o.root_xattr_isize && b->root != node)
        b->nodes[node].xa_max += b->o.root_xattr_isize;
    b->root = node;
    return 0;
}

int erofs_builder_add_device(erofs_builder *b, const char *tag, size_t taglen,
                             uint64_t blocks, uint32_t mapped_blkaddr)
{
    int r = check_mutable(b);
    if (r)
        return r;
    if (taglen > sizeof(((struct erofs_deviceslot *)0)->tag))
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
    if (blocks >> 48)
        return fail(b, ERN_ELIMIT, "device of more than 2^48 blocks");
    d->blocks = blocks;
    d->mapped = mapped_blkaddr;
    return (int)++b->ndevs;
}

int erofs_builder_put_bytes(erofs_builder *b, uint64_t offset, const char *data, size_t len)
{
    if (b->wdone)
        return fail(b, ERN_EINVAL, "image already written");
    if (offset < SB_END && offset + len > EROFS_SUPER_OFFSET)
        return fail(b, ERN_EINVAL, "bytes would overwrite the superblock");
    if (!data && (!b->laid_out || offset < b->info.image_size))
        return fail(b, ERN_EINVAL, "only bytes appended after layout can be reserved");
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
    /* data NULL: the range is reserved (zeros from the image's ftruncate); the caller
     * writes it into the image file itself after write(), so no copy is kept here
     * (pack's chunk info table: ~4 MiB while the node graph was still in memory) */
    uint8_t *copy = NULL;
    if (data) {
        copy = malloc(len ? len : 1);
        if (!copy)
            return fail(b, ERN_ENOMEM, "out of memory");
        memcpy(copy, data, len);
    }
    b->puts[b->nputs].off = offset;
    b->puts[b->nputs].len = len;
    b->puts[b->nputs].data = copy;
    b->nputs++;
    return 0;
}

int erofs_builder_set_device(erofs_builder *b, uint32_t device_id, uint64_t blocks,
                             uint32_t mapped_blkaddr)
{
    if (b->wdone)
        return fail(b, ERN_EINVAL, "image already written");
    if (device_id < 1 || device_id > b->ndevs)
        return fail(b, ERN_EINVAL, "no device %u", device_id);
    if (blocks >> 48)
        return fail(b, ERN_ELIMIT, "device of more than 2^48 blocks");
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

