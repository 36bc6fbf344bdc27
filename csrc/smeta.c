/* erofs-tools C core: inode records among the data (plain stream mode).
 *
 * A kernel reading a mounted image reads inodes, inline tails and directories through
 * the backing file's page cache one block at a time, without readahead; only file data
 * reads ahead. With every record in an area after the data, a reader walking the tree
 * (os.walk, tar, cp -a) pays one synchronous 4 KiB read per metadata block (/usr/share:
 * 17,500 blocks of inodes and inline tails, 26,000-40,000 device reads against
 * mkfs.erofs's 1,500-2,300). So in plain stream mode each record gets its room when the
 * caller reaches its node, in the order a reader walking the tree meets it: a
 * directory's inode and blocks when the walk opens it (smeta_dir), a file's inode
 * (with its inline tail) right before its data (stream_file), other inodes before the
 * next of these (the walks make a directory's symlinks, devices, fifos and sockets
 * first, walk.c's bare_first: a listing stats them). The records of a directory's files
 * wait in a window (up to SM_WINDOW, until the next directory opens) and are packed
 * best fit decreasing into blocks (metapack.c over a virtual area whose blocks map to
 * stream blocks); then, in walk order, a record's block is taken from the stream right
 * before its file's data unless an earlier record's took it, so the blocks a reader needs
 * next are those the data's readahead has just brought in.
 * Reservations are upper bounds decided on the caller's thread in call order (the
 * image does not depend on threads); the layout keeps a record where it was reserved
 * when it fits, else places it in the inode area after the data, as before.
 */
#include "builder_int.h"

struct smeta {
    struct mpack m;             /* virtual area: block v is stream block blk[v] */
    uint64_t *blk;
    uint32_t nblk, cap;
    uint32_t next;              /* nodes below it were looked at by smeta_pending */
    uint64_t root_off;          /* the root's record in block 0, after the superblock */
    struct smwin *w;            /* the window: records waiting to be packed together */
    uint32_t nw, capw;
    int err;                    /* a flush from smeta_pending failed */
};

/* a record waiting in the window: a file's (with its copy job and data blocks, placed
 * when the window is packed) or one that gets no data (job NULL) */
struct smwin {
    struct job *j;
    uint64_t nblk;
    uint32_t node, len;
};

/* records packed together at most: the records of a directory's files are known one
 * file at a time, and best fit decreasing over a window packs them tighter than best
 * fit in walk order: /usr/share 17,326 -> ~17,190 blocks of records, each one 4 KiB
 * read of a reader walking the tree */
#define SM_WINDOW 256

/* on once the walk (walk.c) announced the root directory: other sources (tar, the
 * Python walk) keep every record in the inode area */
int smeta_on(const erofs_builder *b)
{
    return b->sm != NULL;
}

static struct smeta *sm_new(erofs_builder *b)
{
    struct smeta *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    if (mpack_init(&s->m, 0, b->blksz, 0)) {
        mpack_free(&s->m);
        free(s);
        return NULL;
    }
    b->sm = s;
    b->szero = b->scur;
    return s;
}

void smeta_free(erofs_builder *b)
{
    if (!b->sm)
        return;
    mpack_free(&b->sm->m);
    for (uint32_t i = 0; i < b->sm->nw; i++)     /* (a build given up) */
        if (b->sm->w[i].j)
            stream_job_free(b->sm->w[i].j);
    free(b->sm->w);
    free(b->sm->blk);
    free(b->smq);
    b->smq = NULL;
    free(b->sm);
    b->sm = NULL;
}

/* room for len bytes (one block at most, not crossing one) for node; a new block of
 * the virtual area is the stream's next block. -> 0, or 1 when not reserved */
int smeta_reserve(erofs_builder *b, uint32_t node, uint32_t len)
{
    struct node *n = &b->nodes[node];
    uint64_t off;
    if (NX(b, n)->sres || smeta_room(b, len, &off))
        return 1;
    NX(b, n)->soff = off;
    NX(b, n)->slen = len;
    NX(b, n)->sres = 1;
    return 0;
}

/* room for len bytes in the virtual area (without a node: the compression pool's
 * commit reserves through it, zsmeta.c) -> 0, or 1 when none. map: a new block of the
 * area is the stream's next block now; else it stays unmapped until smeta_map (a
 * window of records packed ahead of the commits that place their blocks) */
int smeta_vroom(erofs_builder *b, uint32_t len, int map, uint64_t *poff)
{
    uint32_t blksz = b->blksz;
    struct smeta *s = b->sm;
    if (!s || len == 0 || len > blksz)
        return 1;
    uint64_t off;
    if (mpack_place(&s->m, len, 0, NULL, NULL, &off))
        return 1;
    uint64_t v = off / blksz;
    while (s->nblk <= v) {
        if (s->nblk == s->cap) {
            uint32_t ncap = s->cap ? s->cap * 2 : 1024;
            uint64_t *p = realloc(s->blk, (size_t)ncap * sizeof(*p));
            if (!p)
                return 1;       /* (the virtual block stays unused) */
            s->blk = p;
            s->cap = ncap;
        }
        s->blk[s->nblk++] = SM_UNMAPPED;
    }
    *poff = off;
    if (map)
        smeta_map(b, off);
    return 0;
}

int smeta_room(erofs_builder *b, uint32_t len, uint64_t *poff)
{
    return smeta_vroom(b, len, 1, poff);
}

/* the virtual block holding off: the stream's next block if it has none yet */
void smeta_map(erofs_builder *b, uint64_t off)
{
    struct smeta *s = b->sm;
    uint64_t v = off / b->blksz;
    if (s && v < s->nblk && s->blk[v] == SM_UNMAPPED)
        s->blk[v] = b->scur++;
}

/* a record into the window (job: a file's copy job, its data nblk blocks after the
 * record); packed, and the files placed, when the window is full, a directory opens,
 * a sparse file comes or the stream ends (smeta_flush). -> 0, or an error code (the
 * job freed) */
int smeta_defer(erofs_builder *b, uint32_t node, struct job *j, uint32_t len, uint64_t nblk)
{
    struct smeta *s = b->sm;
    if (!s)
        return j ? stream_place(b, node, j, nblk) : 1;
    if (s->nw == s->capw) {
        uint32_t ncap = s->capw ? s->capw * 2 : 64;
        struct smwin *p = realloc(s->w, (size_t)ncap * sizeof(*p));
        if (!p) {
            if (!j)
                return 1;
            int r = smeta_flush(b);     /* (out of memory: this one alone) */
            if (!r)
                smeta_reserve(b, node, len);
            return r ? (stream_job_free(j), r) : stream_place(b, node, j, nblk);
        }
        s->w = p;
        s->capw = ncap;
    }
    s->w[s->nw++] = (struct smwin){.j = j, .nblk = nblk, .node = node, .len = len};
    return s->nw >= SM_WINDOW ? smeta_flush(b) : 0;
}

static int win_cmp(const void *pa, const void *pb)
{
    const uint64_t a = *(const uint64_t *)pa, c = *(const uint64_t *)pb;
    return a < c ? -1 : a > c;
}

/* the window packed: its records best fit decreasing (equal lengths in walk order) into
 * the virtual area; then, in walk order, each record's block gets the stream's next
 * block unless an earlier record's gave it one, and each file's data follows: a
 * record's block still comes before its file's data, as a reader walking the tree
 * needs them. -> 0 or an error code */
int smeta_flush(erofs_builder *b)
{
    struct smeta *s = b->sm;
    if (s && s->err)
        return s->err;
    if (!s || !s->nw)
        return 0;
    uint32_t nw = s->nw;
    uint64_t *ord = malloc((size_t)nw * sizeof(*ord));
    if (ord) {
        /* key: (blksz - len) << 32 | index, ascending: longest first, walk order within */
        for (uint32_t i = 0; i < nw; i++)
            ord[i] = (uint64_t)(b->blksz - (s->w[i].len < b->blksz ? s->w[i].len
                                                                    : b->blksz)) << 32 | i;
        qsort(ord, nw, sizeof(*ord), win_cmp);
    }
    for (uint32_t k = 0; k < nw; k++) {
        uint32_t i = ord ? (uint32_t)ord[k] : k;
        struct smwin *e = &s->w[i];
        struct node *n = &b->nodes[e->node];
        uint64_t off;
        if (!e->len || NX(b, n)->sres || smeta_vroom(b, e->len, 0, &off))
            continue;
        NX(b, n)->soff = off;
        NX(b, n)->slen = e->len;
        NX(b, n)->sres = 1;
    }
    free(ord);
    s->nw = 0;
    int r = 0;
    for (uint32_t i = 0; i < nw; i++) {
        struct smwin *e = &s->w[i];
        struct node *n = &b->nodes[e->node];
        if (r) {
            if (e->j)
                stream_job_free(e->j);
            continue;
        }
        if (NX(b, n)->sres == 1)
            smeta_map(b, NX(b, n)->soff);
        if (e->j)
            r = stream_place(b, e->node, e->j, e->nblk);
    }
    return r;
}

/* the record of a node that gets no data now, upper bound: inode, every xattr inline,
 * a symlink's target inline when it fits */
static uint32_t bare_len(const erofs_builder *b, const struct node *n)
{
    uint64_t base = stream_inode_size(b, n) + n->xa_max;
    uint32_t fmt = n->mode & S_IFMT;
    if (fmt == S_IFLNK && n->size < b->blksz &&
        base + n->size <= b->blksz)
        base += n->size;
    else if (fmt == S_IFLNK && n->size % b->blksz)
        return 0;               /* a block of its own: left to the layout */
    if (fmt == S_IFREG && n->size)
        return 0;
    return (uint32_t)align_up(base, EROFS_SLOT_SIZE);
}

/* nodes made since the last call and below `upto` that get no data from the stream
 * (symlinks, devices, empty files): their records before what comes next */
void smeta_pending(erofs_builder *b, uint32_t upto)
{
    struct smeta *s = b->sm;
    if (!s)
        return;
    if (upto > b->nnodes)
        upto = b->nnodes;
    for (uint32_t i = s->next; i < upto; i++) {
        struct node *n = &b->nodes[i];
        if (NX(b, n)->sres || (n->mode & S_IFMT) == S_IFDIR || n->dkind == D_FILE ||
            n->dkind == D_SPARSE || n->dkind == D_CHUNKS)
            continue;
        uint32_t len = bare_len(b, n);
        int r = 0;
        if (len && b->zp)
            zsm_push(b, i, len, 0);     /* placed at the pool's next commit */
        else if (len && (r = smeta_defer(b, i, NULL, len, 0)) == 1)
            smeta_reserve(b, i, len);   /* (out of memory: now, unpacked) */
        else if (r < 0 && !s->err)
            s->err = r;                 /* (a window's files not placed: said at the next
                                           flush) */
    }
    if (upto > s->next)
        s->next = upto;
}

/* block 0's room after the root's record (ending at end) is virtual block 0 (a pre bin
 * of the virtual area: filled best fit, as mkfs.erofs fills it) mapped to stream block
 * 0; the other virtual blocks map to stream blocks as before. Only while nothing is
 * placed yet (the root comes first) */
static int sm_block0(erofs_builder *b, uint64_t end)
{
    struct smeta *s = b->sm;
    uint32_t blksz = b->blksz;
    if (s->nblk || s->m.end || s->m.pre)
        return 0;
    mpack_free(&s->m);
    if (mpack_init(&s->m, blksz, blksz, (uint32_t)align_up(end, EROFS_SLOT_SIZE)))
        return 1;
    s->blk = malloc(1024 * sizeof(*s->blk));
    if (!s->blk)
        return 1;
    s->cap = 1024;
    s->blk[0] = 0;
    s->nblk = 1;
    return 0;
}

/* a directory about to be filled with the n entries names + offs[i] (sorted): its size
 * is known from the names, so its record and blocks go here, before its files */
int smeta_dir(erofs_builder *b, uint32_t node, const char *names, const uint32_t *offs,
              uint32_t cnt)
{
    if (!b->sm && node == b->root && b->worker_on && b->o.stream_data &&
        !b->o.first_nid && !b->o.meta_blkaddr && !b->ndevs && !b->nputs && !b->o.metabox)
        sm_new(b);
    if (!b->sm || node >= b->nnodes || (cnt > 65000 && node != b->root))
        return 0;
    uint32_t blksz = b->blksz;
    smeta_pending(b, b->nnodes);
    int r = b->zp ? 0 : smeta_flush(b);
    if (r)
        return r;
    struct node *n = &b->nodes[node];
    uint64_t size = dir_size_sorted(blksz, names, offs, cnt, b->o.dot_omitted != 0);
    uint64_t tail = size % blksz;
    /* (over 65,000 entries its link count may need the extended inode: the root's room
     * is taken that large, so that it stays near the start, its nid in 16 bits) */
    uint64_t base = (cnt > 65000 ? (uint64_t)sizeof(struct erofs_inode_extended)
                                 : stream_inode_size(b, n)) + n->xa_max;
    int inl = tail && base + tail <= blksz;     /* noinline_data: files only */
    uint64_t len = align_up(inl ? base + tail : base, EROFS_SLOT_SIZE);
    uint64_t nblk = inl ? size / blksz : (size + blksz - 1) / blksz;
    int zdir = b->o.compress_dirs != 0;
    if (zdir) {
        /* --zD: its record only (inode, xattrs, the fragment's map header), no blocks:
         * its entries go to the packed inode (zdir.c) */
        len = align_up(align_up(base, 8) + ZDIR_HDR, EROFS_SLOT_SIZE);
        inl = 0;
        nblk = 0;
    }
    uint64_t lo = align_up(sb_area_end(b), EROFS_SLOT_SIZE);
    if (node == b->root && !NX(b, n)->sres && lo + len <= blksz) {
        /* the room after the superblock, as mkfs.erofs (nid 36 with 4 KiB blocks) */
        b->sm->root_off = lo;
        if (sm_block0(b, lo + len))
            return fail(b, ERN_ENOMEM, "out of memory");
        NX(b, n)->soff = 0;
        NX(b, n)->slen = (uint32_t)len;
        NX(b, n)->sres = 2;
        if (b->zp && zsm_push(b, node, 0, (uint32_t)nblk))
            return 0;
    } else if (b->zp) {
        /* compressed: the record and blocks at the pool's next commit (zsmeta.c) */
        if (zsm_push(b, node, (uint32_t)(len <= blksz ? len : 0), (uint32_t)nblk))
            return 0;
    } else if (smeta_reserve(b, node, (uint32_t)(len <= blksz ? len : 0))) {
        return 0;
    }
    if (zdir)
        return 0;
    n = &b->nodes[node];
    NX(b, n)->sdir = 1;
    NX(b, n)->sdir_size = size;
    n->stream_inline = (uint8_t)inl;
    /* (compressed: a directory's first block is set when the pool placed it) */
    n->startblk = nblk && !b->zp ? (uint32_t)b->scur : (inl ? EROFS_NULL_ADDR : 0);
    if (!b->zp)
        b->scur += nblk;
    if (b->scur > 0xFFFFFFFFull)
        return fail(b, ERN_ELIMIT, "image larger than 2^32 blocks");
    return 0;
}

/* where block 0's room after the superblock (from lo) is free for the inode area after
 * the data: after the root's record if it sits there (0: none; UINT32_MAX: failed) */
uint32_t smeta_pre_lo(erofs_builder *b, uint64_t lo)
{
    struct node *rt = &b->nodes[b->root];
    if (b->sm->m.pre) {
        /* block 0 is the virtual area's (sm_block0): smeta_fill fills it; its records
         * start after the superblock area known when the walk began */
        if (b->sm->root_off < lo) {
            fail(b, ERN_EINVAL, "the superblock area grew over block 0's inodes");
            return UINT32_MAX;
        }
        return 0;
    }
    if (NX(b, rt)->sres == 2 && b->sm->root_off < lo)
        NX(b, rt)->sres = 0;               /* (the superblock area grew since) */
    uint64_t pre = NX(b, rt)->sres == 2 ? b->sm->root_off + NX(b, rt)->slen : lo;
    return pre < b->blksz ? (uint32_t)pre : 0;
}

/* at the layout, a record not reserved (or grown past its room): into the room left
 * free in the blocks taken among the data, if some has it -> 0 (n's offset and nid set).
 * Packed online in walk order those blocks keep ~2 % free (/usr/share -z lz4hc); what
 * went to the inode area after the data (files written in place while compressed,
 * records that outgrew their room) fills part of it */
int smeta_fill(erofs_builder *b, struct node *n, uint64_t len)
{
    struct smeta *s = b->sm;
    uint64_t off;
    if (!s || mpack_fill(&s->m, len, &off))
        return 1;
    if (s->blk[off / b->blksz] == SM_UNMAPPED)
        return 1;       /* (cannot happen: every block packed holds a placed record) */
    n->meta_off = s->blk[off / b->blksz] * b->blksz + off % b->blksz;
    n->nid = n->meta_off / EROFS_SLOT_SIZE;     /* (nids count from block 0) */
    return 0;
}

/* the image offset of a reserved record */
uint64_t smeta_off(const erofs_builder *b, const struct node *n)
{
    const struct smeta *s = b->sm;
    if (NX(b, n)->sres == 2)
        return s->root_off;
    return s->blk[NX(b, n)->soff / b->blksz] * b->blksz + NX(b, n)->soff % b->blksz;
}

/* the size of a directory with these entries (bytewise sorted, without "." and "..")
 * as dir_pack packs them: as many (dirent + name) per block as fit; no "." with
 * -Edot-omitted (else every directory's size differed from its reservation's) */
uint64_t dir_size_sorted(uint32_t blksz, const char *names, const uint32_t *offs,
                         uint32_t cnt, int no_dot)
{
    const uint32_t desz = (uint32_t)sizeof(struct erofs_dirent);
    static const uint8_t dot[2] = {'.', '.'};
    uint64_t blk_start = 0;
    uint32_t used = 0;
    int dot_done = no_dot, dd_done = 0;
    uint32_t ci = 0;
    while (ci < cnt || !dot_done || !dd_done) {
        const uint8_t *nm = ci < cnt ? (const uint8_t *)names + offs[ci] : NULL;
        size_t ml = nm ? strlen((const char *)nm) : 0;
        uint32_t nl;
        if (!dot_done && (!nm || namecmp(dot, 1, nm, ml) < 0)) {
            nl = 1;
            dot_done = 1;
        } else if (!dd_done && (!nm || namecmp(dot, 2, nm, ml) < 0)) {
            nl = 2;
            dd_done = 1;
        } else {
            nl = (uint32_t)ml;
            ci++;
        }
        if (used + desz + nl > blksz) {
            blk_start += blksz;
            used = 0;
        }
        used += desz + nl;
    }
    return blk_start + used;
}

int erofs_builder_dir_names(erofs_builder *b, uint32_t node, const char *names, size_t len,
                            uint32_t count)
{
    if (len > 0xFFFFFFFFu || (len && names[len - 1]))
        return fail(b, ERN_EINVAL, "bad directory names");
    uint32_t *offs = malloc(((size_t)count + 1) * sizeof(*offs));
    if (!offs)
        return fail(b, ERN_ENOMEM, "out of memory");
    uint32_t n = 0;
    for (size_t i = 0; i < len && n < count; i += strlen(names + i) + 1)
        offs[n++] = (uint32_t)i;
    int r = n == count ? smeta_dir(b, node, names, offs, n)
                       : fail(b, ERN_EINVAL, "bad directory names");
    free(offs);
    return r;
}
