/* erofs-tools C core, layout: decide every position before anything is written.
 *
 * erofs_builder_layout() runs these phases in order:
 *   check_data_sources  regular files and symlinks have their bytes
 *   index_dirents       sort entries by (parent, name), per-directory ranges, nlink
 *   order_nids          nid order: root, then breadth first, children in name order
 *   size_dirs           directory sizes from packing their dirent blocks
 *   pack_xattrs         per-node ranges; xattrs on >= 2 inodes go to the shared area
 *   pick_build_time     given, or the most common (mtime, nsec) of the tree
 *   choose_formats      compact/extended inodes, FLAT_PLAIN / FLAT_INLINE / CHUNK_BASED
 *   place_stream_data   stream mode: the data not streamed follows the streamed data
 *                       (metazone.c: that placement, and --MZ's data before the inodes)
 *   place_inodes        inode offsets (nids), packed best fit; write order by offset
 *   place_after_inodes  (--MZ=id: directory blocks,) shared xattr area, device table
 *                       check, data blocks, puts check
 *   fill_info           the erofs_layout_info handed back
 */
#include "builder_int.h"

/* what the phases hand each other */
struct layout_state {
    uint32_t shared_bytes;      /* size of the shared xattr area */
    int64_t bt;                 /* build time */
    uint32_t btn;
    int have_chunks;
    uint64_t data_bytes;
    uint64_t blk;               /* next free block */
    uint64_t data_start;
    uint64_t meta_start;        /* byte offset of nid 0 */
    uint64_t first_nid;
    uint64_t meta_end;          /* end of the last inode */
    uint32_t xattr_blkaddr;
    int xattr_filter;           /* some inode's xattr name filter is not 0 */
    int flat_after;             /* stream mode, nothing streamed: data after the inodes */
};

static int cmp_dirent(const void *pa, const void *pb, void *ctx)
{
    erofs_builder *sort_ctx = ctx;
    const struct dirent_rec *a = pa, *b2 = pb;
    if (a->parent != b2->parent)
        return a->parent < b2->parent ? -1 : 1;
    return namecmp(sort_ctx->arena + a->name_off, a->name_len,
                   sort_ctx->arena + b2->name_off, b2->name_len);
}

struct mt { int64_t s; uint32_t ns; };

static int cmp_mt(const void *pa, const void *pb)
{
    const struct mt *a = pa, *b2 = pb;
    if (a->s != b2->s)
        return a->s < b2->s ? -1 : 1;
    return a->ns < b2->ns ? -1 : a->ns > b2->ns;
}

static int cmp_meta_off(const void *pa, const void *pb, void *ctx)
{
    erofs_builder *b = ctx;
    uint64_t a = b->nodes[*(const uint32_t *)pa].meta_off;
    uint64_t c = b->nodes[*(const uint32_t *)pb].meta_off;
    return a < c ? -1 : a > c;
}

int is_flat_data(const struct node *n)
{
    uint32_t fmt = n->mode & S_IFMT;
    return fmt == S_IFDIR || fmt == S_IFLNK || (fmt == S_IFREG && n->dkind != D_CHUNKS &&
                                                 n->dkind != D_SPARSE);
}

/* end of the superblock and the compression records, and of a device table right after
 * them (mkfs --tar=i's; RAFS's is further on and stays out of this) */
static uint64_t sb_devt_end(const erofs_builder *b)
{
    uint32_t cfgs_len;
    zconf_cfgs(b, &cfgs_len);
    uint64_t s = sb_end(b) + cfgs_len;
    uint64_t d = (uint64_t)b->o.devt_slotoff * EROFS_DEVT_SLOT_SIZE;
    if (b->ndevs && d >= s && d <= align_up(s, EROFS_DEVT_SLOT_SIZE))
        s = d + (uint64_t)EROFS_DEVT_SLOT_SIZE * b->ndevs;
    return s;
}

/* the long xattr prefix table: after those (with a device table, after it, where
 * mkfs.erofs 1.9 puts it), 4-byte aligned */
uint64_t xpfx_start(const erofs_builder *b)
{
    return (sb_devt_end(b) + 3) & ~(uint64_t)3;
}

/* end of the superblock, the compression records, an adjacent device table and the
 * long xattr prefixes after them */
uint64_t sb_area_end(const erofs_builder *b)
{
    return b->xpfx_count && !b->xpfx_packed ? xpfx_start(b) + b->xpfx_len : sb_devt_end(b);
}

/* regular files and symlinks need a data source unless empty */
static int check_data_sources(erofs_builder *b)
{
    for (uint32_t i = 0; i < b->nnodes; i++) {
        struct node *n = &b->nodes[i];
        uint32_t fmt = n->mode & S_IFMT;
        if ((fmt == S_IFREG || fmt == S_IFLNK) && n->size && n->dkind == D_NONE)
            return fail(b, ERN_EINVAL, "node %u has size %llu but no data source", i,
                        (unsigned long long)n->size);
        if (fmt == S_IFLNK && n->size == 0)
            return fail(b, ERN_ELIMIT, "empty symlink target");
    }
    return 0;
}

/* directory entries: sort by (parent, name), find ranges, nlink, duplicates */
static int index_dirents(erofs_builder *b)
{
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
    return 0;
}

/* nid order: root, then breadth first, children in name order; i_ino follows it */
static int order_nids(erofs_builder *b)
{
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
    /* the packed inode (-Efragments) is in no directory */
    if (b->packed_node != NONE32 && !b->nodes[b->packed_node].placed) {
        b->nodes[b->packed_node].placed = 1;
        b->order[no++] = b->packed_node;
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
    return 0;
}

static void size_dirs(erofs_builder *b)
{
    for (uint32_t i = 0; i < b->nnodes; i++) {
        struct node *n = &b->nodes[i];
        if ((n->mode & S_IFMT) == S_IFDIR)
            n->size = dir_pack(b, n, NULL);
    }
}

/* the shared xattr area: an xattr with the same content on >= 2 inodes is stored once,
 * in content order; its id is its offset / 4 */
/* build time: the given one, or the most common (mtime, nsec) so that most inodes can
 * be compact (a compact inode's mtime is the build time) */
static int pick_build_time(erofs_builder *b, struct layout_state *st)
{
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
    st->bt = bt;
    /* -E48bit: compact inodes' nsec is the superblock's, 0 as mkfs.erofs 1.9 sets it */
    st->btn = b->o.sb_48bit ? 0 : btn;
    return 0;
}

/* inode formats and data layouts (independent of positions) */
/* a path of `node` in the image ("/a/b", the first link found; control bytes as \xNN,
 * long paths cut at the front), for a message: a linear search, for errors only */
static void node_path(const erofs_builder *b, uint32_t node, char *out, size_t cap)
{
    if (node == b->packed_node) {
        snprintf(out, cap, "the packed inode");
        return;
    }
    char tmp[1024];
    size_t pos = sizeof(tmp) - 1;
    tmp[pos] = 0;
    for (uint32_t depth = 0; node != b->root && depth < 4096; depth++) {
        const struct dirent_rec *d = NULL;
        for (uint32_t i = 0; i < b->nde && !d; i++)
            if (b->des[i].child == node)
                d = &b->des[i];
        if (!d)
            break;
        const uint8_t *name = b->arena + d->name_off;
        for (uint32_t k = d->name_len; k-- > 0 && pos > 8;) {
            if (name[k] < 0x20 || name[k] == 0x7f) {
                static const char hex[] = "0123456789abcdef";
                tmp[--pos] = hex[name[k] & 15];
                tmp[--pos] = hex[name[k] >> 4];
                tmp[--pos] = 'x';
                tmp[--pos] = '\\';
            } else {
                tmp[--pos] = (char)name[k];
            }
        }
        if (pos > 8)
            tmp[--pos] = '/';
        node = d->parent;
    }
    if (pos == sizeof(tmp) - 1)
        tmp[--pos] = '/';
    size_t len = sizeof(tmp) - 1 - pos;
    snprintf(out, cap, "%s%s", len >= cap ? "..." : "",
             tmp + pos + (len >= cap ? len - cap + 4 : 0));
}

static int choose_format(erofs_builder *b, struct layout_state *st, uint32_t oi)
{
    uint32_t blksz = b->blksz;
    {
        struct node *n = &b->nodes[b->order[oi]];
        uint32_t fmt = n->mode & S_IFMT;
        n->extended = b->o.force_extended || n->uid > 0xFFFF || n->gid > 0xFFFF ||
                      n->nlink > 0xFFFF || n->size > 0xFFFFFFFFull;
        if (b->o.sb_48bit) {
            /* compact inodes keep their mtime (seconds from the epoch; nsec the
             * superblock's), as mkfs.erofs 1.9 -E48bit writes them */
            n->extended |= !mtime48_fits(b, n->mtime, sb_epoch(b, st->bt));
        } else if (!n->extended && (n->mtime != st->bt || n->mtime_nsec != st->btn)) {
            if (b->o.ignore_mtime) {      /* --ignore-mtime: compact, at the build time */
                n->mtime = st->bt;
                n->mtime_nsec = st->btn;
            } else {
                n->extended = 1;
            }
        }
        if (n->extended && b->o.force_compact) {
            char path[256];
            node_path(b, b->order[oi], path, sizeof(path));
            return fail(b, ERN_ELIMIT, "-E force-inode-compact: %s cannot be compact (uid %u, "
                        "gid %u, %u links, %llu bytes)", path, n->uid, n->gid, n->nlink,
                        (unsigned long long)n->size);
        }
        uint64_t base = inode_size(n) + n->xattr_isize;
        n->tail = 0;
        st->data_bytes += n->size;
        if (fmt == S_IFREG && (n->dkind == D_CHUNKS || n->dkind == D_SPARSE)) {
            n->layout = L_CHUNK;
            st->have_chunks = 1;
        } else if (NXR(b, n)->zmeta) {
            n->layout = L_ZFULL;
            if (compact_zindex(b, n))
                return ERN_ENOMEM;
        } else if (is_flat_data(n)) {
            uint64_t tail = n->size % blksz;
            n->layout = L_PLAIN;
            if (NXR(b, n)->sdir && (n->size != NXR(b, n)->sdir_size || (n->stream_inline && base + tail > blksz)))
                NX(b, n)->sdir = NX(b, n)->sres = 0;      /* not as reserved (smeta.c): after the data */
            if (n->streamed || NXR(b, n)->sdir) {
                if (n->stream_inline) {
                    /* streamed as a compact inode with its tail inline; only a link
                     * count over 65535 (not known then) can make it extended now */
                    if (base + tail > blksz)
                        return fail(b, ERN_ELIMIT, "a file with an inline tail of %llu bytes "
                                    "has more than 65535 links", (unsigned long long)tail);
                    n->layout = L_INLINE;
                    n->tail = (uint32_t)tail;
                }
            } else if (tail && (b->o.inline_data || fmt != S_IFREG) && base + tail <= blksz) {
                /* -E noinline_data: regular files only, as mkfs.erofs */
                n->layout = L_INLINE;
                n->tail = (uint32_t)tail;
            }
        } else {
            n->layout = L_PLAIN;
        }
    }
    return 0;
}

static int choose_formats(erofs_builder *b, struct layout_state *st)
{
    st->have_chunks = 0;
    st->data_bytes = 0;
    int r = 0;
    for (uint32_t oi = 0; oi < b->norder && !r; oi++)
        r = choose_format(b, st, oi);
    return r;
}

/* stream mode: file data already sits from the first block after the superblock up to
 * scur; the other data (directories, symlinks, in-memory files) follows it, then the
 * inode area. Otherwise the inode area starts at meta_blkaddr. */
static int place_stream_data(erofs_builder *b, struct layout_state *st)
{
    uint32_t blksz = b->blksz;
    st->blk = 0;
    st->data_start = 0;
    st->meta_start = b->o.metabox ? metabox_meta_start(b) : (uint64_t)b->o.meta_blkaddr * blksz;
    if (!b->o.stream_data || (b->o.metazone && index_layout(b)))   /* (--MZ: the data first,
                                                                  metazone.c) */
        return b->o.metazone ? metazone_first(b, &st->blk, &st->data_start, &st->meta_start) : 0;
    if (index_layout(b))
        return st->flat_after = 1, 0;       /* (the inode area first, as without stream mode) */
    /* (a device table, --blobdev's: between the superblock and the first data block) */
    if (b->nputs || (b->ndevs && sb_area_end(b) > align_up(SB_END, blksz)))
        return fail(b, ERN_EINVAL, "stream mode does not take reserved bytes, nor devices "
                    "past the first data block");
    if (!b->worker_on && b->scur == 0)
        b->scur = (sb_area_end(b) + blksz - 1) / blksz;
    st->data_start = (uint64_t)((sb_area_end(b) + blksz - 1) / blksz) * blksz;
    st->blk = b->scur;
    int r = alloc_flat_data(b, &st->blk);
    if (r)
        return r;
    st->meta_start = metabox_area(b, st->shared_bytes, &st->blk, &st->xattr_blkaddr) * blksz;
    st->meta_start = metazone_nid0(b, st->meta_start);
    return 0;
}

struct zfit_ctx { const erofs_builder *b; const struct node *n; uint32_t blksz; };

static uint64_t zfit(const void *ctx, uint64_t off)
{
    const struct zfit_ctx *z = ctx;
    return ztail_fit(z->b, z->n, off, z->blksz);
}

/* a record to place: its length and its node's position in nid order */
struct prec { uint64_t len; uint32_t oi; };

static int cmp_prec(const void *pa, const void *pb)
{
    const struct prec *a = pa, *c = pb;
    if (a->len != c->len)
        return a->len > c->len ? -1 : 1;
    return a->oi < c->oi ? -1 : a->oi > c->oi;
}

/* Inode offsets, each 32-byte aligned, through the best-fit packer (metapack.c), larger
 * records first: a record goes to the fullest block of the inode area with room for it.
 * An inline record (inode, xattrs and tail) never crosses a block: the fast-symlink path
 * measures the tail from the inode's block; a compressed inode's inline pcluster stays in
 * one block (ztail_fit). Stream mode: block 0's room after the superblock is a bin too
 * when the root fits there. The write phase then walks inodes in offset order (b->worder). */
static int place_inodes(erofs_builder *b, struct layout_state *st)
{
    uint32_t blksz = b->blksz;
    uint64_t meta_start = st->meta_start;
    uint64_t first_nid = b->o.metabox ? 0 : b->o.first_nid;     /* (-m: from the metabox's start) */
    if (!first_nid && !b->o.metabox)
        first_nid = meta_start >= sb_area_end(b) ? 1
                  : (sb_area_end(b) - meta_start + EROFS_SLOT_SIZE - 1) / EROFS_SLOT_SIZE;
    uint64_t area_start = meta_start + first_nid * EROFS_SLOT_SIZE;
    /* stream mode: the room after the superblock is used too when the root fits there
     * (its nid must fit in 16 bits); nids then count from block 0 */
    uint32_t pre_lo = 0;
    if (!b->sm && b->o.stream_data && !b->o.first_nid && !b->o.metabox && meta_start >= blksz) {
        uint64_t lo = align_up(sb_area_end(b), EROFS_SLOT_SIZE);
        int mc;
        if (lo < blksz && mpack_record_len(b, &b->nodes[b->root], &mc) <= blksz - lo) {
            pre_lo = (uint32_t)lo;
            area_start = meta_start;
            meta_start = st->meta_start = 0;
            first_nid = lo / EROFS_SLOT_SIZE;
        }
    }
    if (b->sm) {
        /* records among the data (smeta.c): nids count from block 0 */
        uint64_t lo = align_up(sb_area_end(b), EROFS_SLOT_SIZE);
        pre_lo = smeta_pre_lo(b, lo);
        if (pre_lo == UINT32_MAX)
            return ERN_EINVAL;
        area_start = meta_start;
        meta_start = st->meta_start = 0;
        first_nid = lo / EROFS_SLOT_SIZE;
    }
    st->first_nid = first_nid;
    struct mpack m;
    if (mpack_init(&m, area_start, blksz, pre_lo)) {
        mpack_free(&m);
        return fail(b, ERN_ENOMEM, "out of memory");
    }
    m.seq = b->o.metabox && b->o.compress_alg;     /* (in nid order, one after another) */
    struct prec *pr = malloc((size_t)(b->norder ? b->norder : 1) * sizeof(*pr));
    if (!pr) {
        mpack_free(&m);
        return fail(b, ERN_ENOMEM, "out of memory");
    }
    for (uint32_t oi = 0; oi < b->norder; oi++) {
        int mc;
        pr[oi].len = mpack_record_len(b, &b->nodes[b->order[oi]], &mc);
        pr[oi].oi = oi;
    }
    /* best fit decreasing: the larger records first (then nid order), the root first of
     * all (its nid must stay small); packs tighter than nid order (Python's library, -z
     * lz4hc: 9 blocks under mkfs.erofs 1.9.4's image, 2 over in nid order) */
    if (b->norder > 1 && !(b->o.metabox && b->o.compress_alg))    /* (-m -z: nid order) */
        qsort(pr + 1, b->norder - 1, sizeof(*pr), cmp_prec);
    for (uint32_t pi = 0; pi < b->norder; pi++) {
        struct node *n = &b->nodes[b->order[pr[pi].oi]];
        if (b->o.metabox && b->order[pr[pi].oi] == b->packed_node)
            continue;       /* (-m: in the image, metabox_area) */
        int may_cross;
        uint64_t len = mpack_record_len(b, n, &may_cross);
        if (NXR(b, n)->sres && len <= NXR(b, n)->slen) {
            n->meta_off = smeta_off(b, n);
            n->nid = n->meta_off / EROFS_SLOT_SIZE;
            continue;
        }
        if (b->nx)
            NX(b, n)->sres = 0;
        struct zfit_ctx zc = { b, n, blksz };
        uint64_t off;
        if (b->sm && (pi || !pre_lo) && !NXR(b, n)->ztail_len && !smeta_fill(b, n, len))
            continue;       /* (room left among the data; the root: when block 0 is there) */
        int r = mpack_place(&m, len, may_cross, NXR(b, n)->ztail_len ? zfit : NULL, &zc, &off);
        if (r) {
            mpack_free(&m);
            free(pr);
            return r == ERN_ENOMEM ? fail(b, r, "out of memory")
                                   : fail(b, r, "inode area too large");
        }
        n->meta_off = off;
        n->nid = (off - meta_start) / EROFS_SLOT_SIZE | nid_mbox_bit(b);
    }
    uint64_t cur = align_up(m.end, EROFS_SLOT_SIZE);
    mpack_free(&m);
    free(pr);
    st->meta_end = cur;
    /* write order: by inode offset */
    free(b->worder);
    b->worder = malloc((size_t)(b->norder ? b->norder : 1) * sizeof(uint32_t));
    if (!b->worder)
        return fail(b, ERN_ENOMEM, "out of memory");
    memcpy(b->worder, b->order, (size_t)b->norder * sizeof(uint32_t));
    qsort_r(b->worder, b->norder, sizeof(uint32_t), cmp_meta_off, b);
    if (b->nodes[b->root].nid > 0xFFFF && !b->o.sb_48bit)    /* (48-bit: rootnid_8b) */
        return fail(b, ERN_ELIMIT, "root nid %llu does not fit in 16 bits",
                    (unsigned long long)b->nodes[b->root].nid);
    if (b->nodes[b->root].nid == 0 && !b->o.metabox)
        return fail(b, ERN_EINVAL, "root would get nid 0 (set first_nid)");
    return 0;
}

/* after the inode area: the shared xattr area, then (not stream mode) the data blocks;
 * the device table and the caller's reserved bytes must sit below the first inode */
static int place_after_inodes(erofs_builder *b, struct layout_state *st)
{
    uint32_t blksz = b->blksz;
    uint64_t first_inode_off = b->o.metabox ? metabox_rec_off(b)
                                            : st->meta_start + st->first_nid * EROFS_SLOT_SIZE;
    uint64_t pos = align_up(st->meta_end, blksz);
    int rz = metazone_dirs(b, &pos);        /* (--MZ=id: the directories' blocks) */
    if (rz)
        return rz;
    if (st->shared_bytes && !st->xattr_blkaddr) {      /* (-m -z: before the inodes) */
        st->xattr_blkaddr = (uint32_t)(pos / blksz);
        pos = align_up(pos + st->shared_bytes, blksz);
    }
    if (b->ndevs && b->o.devt_slotoff) {
        uint64_t dstart = (uint64_t)b->o.devt_slotoff * EROFS_DEVT_SLOT_SIZE;
        uint64_t dend = dstart + (uint64_t)EROFS_DEVT_SLOT_SIZE * b->ndevs;
        uint32_t cfgs_len;
        zconf_cfgs(b, &cfgs_len);
        uint64_t xs = xpfx_start(b), xe = b->xpfx_count && !b->xpfx_packed ? xs + b->xpfx_len
                                                                           : xs;
        if (dstart < SB_END + cfgs_len || dend > first_inode_off || (dstart < xe && xs < dend))
            return fail(b, ERN_EINVAL, "device table does not fit before the inodes");
    } else if (b->ndevs) {
        return fail(b, ERN_EINVAL, "devices given without devt_slotoff");
    }
    if ((!b->o.stream_data || st->flat_after) && !b->o.metazone) {
        st->data_start = pos;
        st->blk = pos / blksz;
        int r = alloc_flat_data(b, &st->blk);
        if (r)
            return r;
    } else {
        st->blk = pos / blksz;
    }
    if (st->blk > 0xFFFFFFFFull)
        return fail(b, ERN_ELIMIT, "image larger than 2^32 blocks");
    for (uint32_t i = 0; i < b->nputs; i++) {
        struct putbytes *p = &b->puts[i];
        if (p->off + p->len > first_inode_off)
            return fail(b, ERN_EINVAL, "reserved bytes at %llu overlap the inode area",
                        (unsigned long long)p->off);
    }
    b->first_inode_off = first_inode_off;
    return 0;
}

/* --zD, once every other record is placed: the directories into the packed inode,
 * compressed after the rest, its record placed last (zdir.c) */
static int place_packed_late(erofs_builder *b, struct layout_state *st)
{
    uint64_t pblk = metabox_late_blk(b, st->blk, st->meta_start);   /* (-m -z: before it) */
    int r = zdir_pack(b, &pblk);
    if (r || b->packed_node == NONE32)
        return r;
    uint32_t *o = realloc(b->order, (size_t)(b->norder + 1) * sizeof(*o));
    uint32_t *w = o ? realloc(b->worder, (size_t)(b->norder + 1) * sizeof(*w)) : NULL;
    b->order = o ? o : b->order;
    b->worder = w ? w : b->worder;
    if (!o || !w)
        return fail(b, ERN_ENOMEM, "out of memory");
    struct node *n = &b->nodes[b->packed_node];
    n->placed = 1;
    b->order[b->norder] = b->worder[b->norder] = b->packed_node;
    n->ino = ++b->norder;
    if ((r = choose_format(b, st, b->norder - 1)) ||
        (r = zdir_place_packed(b, st->meta_start, &st->meta_end, &pblk)))
        return r;
    metabox_after_packed(b, pblk, &st->meta_start, &st->meta_end, &st->blk);
    qsort_r(b->worder, b->norder, sizeof(uint32_t), cmp_meta_off, b);
    return 0;
}

static void fill_info(erofs_builder *b, const struct layout_state *st)
{
    uint32_t blksz = b->blksz;
    memset(&b->info, 0, sizeof(b->info));
    b->info.inodes = b->norder + !!b->o.metabox;
    b->info.meta_blkaddr = b->o.metabox ? 0 : (uint32_t)(st->meta_start / blksz);
    b->info.root_nid = b->nodes[b->root].nid;
    b->info.meta_start = st->meta_start;
    b->info.meta_end = st->meta_end;
    b->info.xattr_blkaddr = st->xattr_blkaddr;
    b->info.shared_xattr_bytes = st->shared_bytes;
    b->info.data_start = st->data_start;
    b->info.image_size = st->blk * blksz;
    /* a tiny image is still one 4 KiB page (or one block, if larger) */
    if (b->info.image_size < 2 * (uint64_t)blksz && b->info.image_size < 4096)
        b->info.image_size = 4096 > blksz ? 4096 : blksz;
    b->info.build_time = st->bt;
    b->info.build_time_nsec = st->btn;
    b->info.feature_compat = b->o.feature_compat |
                             (st->xattr_filter ? EROFS_FEATURE_COMPAT_XATTR_FILTER : 0) |
                             (b->o.sb_checksum ? EROFS_FEATURE_COMPAT_SB_CHKSUM : 0) |
                             (b->xpfx_count && !b->xpfx_packed ?
                              EROFS_FEATURE_COMPAT_PLAIN_XATTR_PFX : 0) |
                             (b->xpfx_ishare >= 0 ? EROFS_FEATURE_COMPAT_ISHARE_XATTRS : 0);
    b->info.feature_incompat = b->o.feature_incompat |
                               (b->o.sb_48bit ? EROFS_FEATURE_INCOMPAT_48BIT : 0) |
                               (b->o.metabox ? EROFS_FEATURE_INCOMPAT_METABOX : 0) |
                               (b->xpfx_count ? EROFS_FEATURE_INCOMPAT_XATTR_PREFIXES : 0) |
                               (st->have_chunks ? EROFS_FEATURE_INCOMPAT_CHUNKED_FILE : 0) |
                               (b->ndevs ? EROFS_FEATURE_INCOMPAT_DEVICE_TABLE : 0) |
                               (b->o.compress_dirs ? EROFS_FEATURE_INCOMPAT_FRAGMENTS : 0) |
                               zconf_incompat(b);
    b->info.data_bytes = st->data_bytes;
}

int erofs_builder_layout(erofs_builder *b, struct erofs_layout_info *info)
{
    if (b->laid_out)
        return fail(b, ERN_EINVAL, "builder already laid out");
    if (b->root == NONE32)
        return fail(b, ERN_EINVAL, "no root directory set");
    int r = 0;
    if (b->o.stream_data && (r = stream_stop(b, 0)))
        return r;
    struct layout_state st;
    memset(&st, 0, sizeof(st));
    if ((r = check_data_sources(b)) || (r = index_dirents(b)) || (r = order_nids(b)))
        return r;
    size_dirs(b);
    if ((r = zdir_prepare(b)) || (r = pack_xattrs(b, &st.shared_bytes, &st.xattr_filter)) || (r = pick_build_time(b, &st)))
        return r;
    if ((r = choose_formats(b, &st)))
        return r;
    if ((r = place_stream_data(b, &st)) || (r = place_inodes(b, &st)) ||
        (r = place_after_inodes(b, &st)) ||
        ((b->o.compress_dirs || b->zlate) && (r = place_packed_late(b, &st))) ||
        (b->o.metabox && (r = metabox_laid_out(b, st.meta_start, st.meta_end))))
        return r;
    fill_info(b, &st);
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
