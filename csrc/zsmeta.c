/* erofs-tools C core: inode records among the data for compressed images.
 *
 * What smeta.c does for plain stream mode, through the compression pool (zstream.c):
 * there blocks are placed by the in-order commit on a worker thread, so the caller's
 * thread does not reserve anything itself. The records and blocks of the directories
 * it opens and the records of nodes without data (symlinks, devices, empty files) are
 * queued (zsm_push) and handed to the next file submitted (zsm_submit); its commit
 * places them first, then the file's own record (its size known then: the inode with
 * its xattrs as an upper bound, the compact index, the inline tail), then its data. A
 * reader walking the tree then finds each record in a block right before the data it
 * reads next. Files are queued in windows of ZWIN (zsm_hold): at the commit of a
 * window's first file the records known since submit (those queued, and the files
 * stored plain because small) are packed together best fit decreasing; a block so
 * packed gets its place in the stream at the commit of the first file using it, so it
 * still comes before the data of every file whose record it holds. Every placement
 * happens at a commit, in submission order, so the image does not depend on the
 * number of threads. A file written in place while compressed
 * (large outputs, segments), or with an inline pcluster, keeps its record in the inode
 * area after the data. The results go to the nodes in zpool_stop (workers never touch
 * b->nodes).
 */
#include "compress_int.h"

int zsm_push(erofs_builder *b, uint32_t node, uint32_t len, uint32_t nblk)
{
    if (!len && !nblk)
        return 0;
    if (b->nsmq == b->capsmq) {
        uint32_t ncap = b->capsmq ? b->capsmq * 2 : 64;
        struct smitem *q = realloc(b->smq, (size_t)ncap * sizeof(*q));
        if (!q)
            return fail(b, ERN_ENOMEM, "out of memory");
        b->smq = q;
        b->capsmq = ncap;
    }
    struct smitem *it = &b->smq[b->nsmq++];
    memset(it, 0, sizeof(*it));
    it->node = node;
    it->len = len;
    it->nblk = nblk;
    return 0;
}

/* on the caller's thread, before the file's job is queued: what was queued so far
 * goes with it, and its record's inode part as far as known now */
void zsm_submit(erofs_builder *b, struct zjob *j)
{
    if (!b->sm)
        return;
    smeta_pending(b, j->node);
    /* (exactly as long as needed: every committed job keeps its items until the pool
     * stops, and the queue's capacity of 64 items per job was 2 KiB each, ~20 MiB of
     * peak memory on /usr/share) */
    struct smitem *q = b->nsmq ? realloc(b->smq, (size_t)b->nsmq * sizeof(*q)) : NULL;
    j->pre = q ? q : b->smq;        /* (a smaller block cannot fail, but if it did) */
    j->npre = b->nsmq;
    b->smq = NULL;
    b->nsmq = b->capsmq = 0;
    const struct node *n = &b->nodes[j->node];
    j->ilen = stream_inode_size(b, n) + n->xa_max;
}

/* at a commit: the items' records (a block packed with the window gets its stream block
 * now if it has none yet, else best fit now) and directory blocks, in order */
static int place_items(erofs_builder *b, struct smitem *it, uint32_t cnt)
{
    for (uint32_t i = 0; i < cnt; i++) {
        if (it[i].early)
            smeta_map(b, it[i].soff);
        else
            it[i].ok = it[i].len && !smeta_room(b, it[i].len, &it[i].soff);
        it[i].startblk = (uint32_t)b->scur;
        b->scur += it[i].nblk;
    }
    return b->scur > 0xFFFFFFFFull ? ERN_ELIMIT : 0;
}

/* stored plain because small (decided from the size alone, before compressing) */
int zjob_small_plain(const struct zjob *j, uint32_t bs)
{
    uint64_t nlc = (j->size + bs - 1) / bs;
    /* one pcluster + index is already no smaller than the file (with ztailpacking or
     * fragments, a small file may still compress inline or into the packed inode) */
    return j->nocomp || (j->size <= bs + 16 + nlc * 8 && !j->zc->ztail && !j->zc->frags);
}

/* the record of a file stored plain, upper bound: inode and xattrs, then its inline
 * tail, or with --chunksize its one chunk's index; a file of more chunks: unknown (how
 * many merge is known once it is cut), its record goes to the inode area */
static uint64_t plain_len(const erofs_builder *b, const struct zjob *j)
{
    if (!b->o.chunkbits)
        return align_up((uint64_t)j->ilen + j->tail, EROFS_SLOT_SIZE);
    uint32_t unit = b->o.chunk_indexes || b->bfd >= 0 ? 8 : 4;
    if (j->size > 1ull << b->o.chunkbits)
        return UINT64_MAX;
    return align_up(align_up(j->ilen, unit) + unit, EROFS_SLOT_SIZE);
}

/* the job's own record is placed among the data (not in the inode area after it) */
static int own_among(const struct zpool *p, const struct zjob *j)
{
    /* (not with -Ededupe or -Efragments, whose index form is decided later, nor for
     * an inline pcluster (-Eztailpacking): those records go to the inode area, packed
     * best fit decreasing; the online packing here lost 10 blocks of 622 on
     * /usr/lib/python3.11 -Eztailpacking, which went over mkfs.erofs's image) */
    return !j->direct && !j->first && !j->acc && !j->packed && !p->zc->dedupe &&
           !p->zc->frags;
}

struct witem {
    struct smitem *it;
    uint32_t len, seq;
};

static int witem_cmp(const void *pa, const void *pb)
{
    const struct witem *a = pa, *c = pb;
    if (a->len != c->len)
        return a->len > c->len ? -1 : 1;
    return a->seq < c->seq ? -1 : a->seq > c->seq;
}

/* at the commit of a window's first file: the records known since the files' submit
 * (directories, nodes without data, the files stored plain because small) packed
 * together, best fit decreasing, into virtual blocks that get their stream block at
 * the commit of the first file using them. Packed one at a time in walk order, blocks
 * opened by 1-2.6 KiB records (a small file's inode and inline tail) kept 256-700 B
 * that later records rarely filled (/usr/share -z lz4hc: ~850 such blocks). The
 * compressed files' records (their index known at their commit) fill in online */
static void pack_window(struct zpool *p, struct zjob *j)
{
    erofs_builder *b = p->b;
    size_t cnt = 0, n = 0;
    for (uint32_t k = 0; k < j->nwin; k++)
        cnt += j->win[k]->npre + 1;
    struct witem *a = malloc(cnt * sizeof(*a));
    for (uint32_t k = 0; a && k < j->nwin; k++) {
        struct zjob *w = j->win[k];
        for (uint32_t i = 0; i < w->npre; i++)
            if (w->pre[i].len)
                a[n++] = (struct witem){ &w->pre[i], w->pre[i].len, (uint32_t)n };
        uint64_t len = plain_len(b, w);
        if (zjob_small_plain(w, b->blksz) && own_among(p, w) && len <= b->blksz) {
            w->own.node = w->node;
            w->own.len = (uint32_t)len;
            a[n++] = (struct witem){ &w->own, (uint32_t)len, (uint32_t)n };
        }
    }
    if (a)
        qsort(a, n, sizeof(*a), witem_cmp);
    for (size_t i = 0; a && i < n; i++) {
        struct smitem *it = a[i].it;
        /* (else placed online at its commit) */
        it->early = it->ok = !smeta_vroom(b, it->len, 0, &it->soff);
    }
    free(a);
    free(j->win);
    j->win = NULL;
    j->nwin = 0;
}

/* the compact index's length for nlc lclusters starting at mpos (as zindex_compact
 * lays it out: 4-byte packs until the 2-byte ones are 32-byte aligned) */
static uint64_t compact_len(uint64_t nlc, uint32_t mpos)
{
    uint64_t init4 = (32 - mpos % 32) / 4 % 8, n2b = 0, end4 = nlc;
    if (init4 > nlc) {
        init4 = 0;
    } else {
        n2b = (nlc - init4) / 16 * 16;
        end4 = nlc - init4 - n2b;
    }
    return sizeof(struct z_erofs_map_header) + init4 * 4 + n2b * 2 + (end4 + 1) / 2 * 8;
}

/* an upper bound of a finished file's record: inode and xattrs, then the inline tail
 * (stored plain) or the padding to 8, the index and the inline pcluster */
static uint64_t own_len(struct zpool *p, struct zjob *j)
{
    const erofs_builder *b = p->b;
    const struct zfile *zf = &j->zf;
    if (zf->plain)
        return plain_len(b, j);
    uint64_t nlc = (zf->size + b->blksz - 1) / b->blksz;
    int full = b->o.compress_full_index;
    /* (an inode or xattrs of another size than known now move the index: then the
     * record outgrows its room and goes to the inode area) */
    uint32_t mpos = (uint32_t)align_up(j->ilen, 8) + (uint32_t)sizeof(struct z_erofs_map_header);
    uint64_t idx = full ? Z_INDEX_START + nlc * sizeof(struct z_erofs_lcluster_index)
                        : compact_len(nlc, mpos);
    return align_up(align_up(j->ilen, 8) + idx + zf->idata_len, EROFS_SLOT_SIZE);
}

static int write_zeros(struct xfer *x, uint64_t off, uint64_t len)
{
    static const uint8_t zeros[65536];
    for (uint64_t e = off + len; off < e;) {
        size_t n = e - off > sizeof(zeros) ? sizeof(zeros) : (size_t)(e - off);
        int r = x_pwrite(x, zeros, n, off);
        if (r)
            return r;
        off += n;
    }
    return 0;
}

static int zsm_commit_sm(struct zpool *p, struct zjob *j, struct xfer *x);

/* at the file's turn to place blocks (its commit, or when it starts writing in place):
 * the queued records and directories, then its own record when known now. The blocks
 * taken are written with zeros now, so the image file has no holes the final write
 * fills later elsewhere on disk */
int zsm_commit(struct zpool *p, struct zjob *j, struct xfer *x)
{
    erofs_builder *b = p->b;
    if (!j->dsdone && b->ot && b->ot->dsunit > 1) {
        /* --dsunit (direct: writing in place, so blocks come): after the records, the
         * file's data (its first segment's) from a multiple of the unit, as mkfs.erofs
         * maps each file's data, compressed or not; skipped blocks zeroed */
        j->dsdone = 1;
        int blocks = j->direct || (j->zf.plain ? j->size - j->tail >= b->blksz
                                               : j->zf.nblocks > 0);
        int r = j->smdone ? 0 : zsm_commit_sm(p, j, x);
        uint64_t s0 = b->scur;
        if (!r && blocks && !j->first)
            b->scur = (b->scur + b->ot->dsunit - 1) / b->ot->dsunit * b->ot->dsunit;
        return r ? r : write_zeros(x, s0 * b->blksz, (b->scur - s0) * b->blksz);
    }
    return zsm_commit_sm(p, j, x);
}

static int zsm_commit_sm(struct zpool *p, struct zjob *j, struct xfer *x)
{
    erofs_builder *b = p->b;
    if (!b->sm || j->smdone)
        return 0;
    j->smdone = 1;
    uint64_t s0 = b->scur;
    if (j->win)
        pack_window(p, j);
    if (place_items(b, j->pre, j->npre))
        return xfail(x, ERN_ELIMIT, "image larger than 2^32 blocks");
    if (j->own.early) {
        smeta_map(b, j->own.soff);
    } else if (own_among(p, j)) {
        uint64_t len = j->zf.idata_len ? UINT64_MAX : own_len(p, j);
        j->own.node = j->node;
        j->own.len = len <= b->blksz ? (uint32_t)len : 0;
        place_items(b, &j->own, 1);
    }
    return write_zeros(x, s0 * b->blksz, (b->scur - s0) * b->blksz);
}

static void apply(erofs_builder *b, const struct smitem *it, uint32_t cnt)
{
    for (uint32_t i = 0; i < cnt; i++) {
        struct node *n = &b->nodes[it[i].node];
        if (it[i].ok && !NX(b, n)->sres) {
            NX(b, n)->soff = it[i].soff;
            NX(b, n)->slen = it[i].len;
            NX(b, n)->sres = 1;
        }
        if (it[i].nblk)
            n->startblk = it[i].startblk;
    }
}

/* a job leaving the pool: its results to the nodes (if the build goes on) */
void zsm_done(erofs_builder *b, struct zjob *j, int ok)
{
    if (ok && j->smdone) {
        apply(b, j->pre, j->npre);
        apply(b, &j->own, 1);
    }
    free(j->pre);
    j->pre = NULL;
    j->npre = 0;
    free(j->win);
    j->win = NULL;
    j->nwin = 0;
}

/* on the caller's thread, a file submitted (j..last, njobs jobs): held back until its
 * window of ZWIN files is complete, so that the window's first commit knows them all */
int zsm_hold(erofs_builder *b, struct zjob *j, struct zjob *last, uint32_t njobs)
{
    struct zpool *p = b->zp;
    if (!b->sm)
        return zpool_link(b, j, last, njobs);
    if (p->htail)
        p->htail->next = j;
    else
        p->hhead = j;
    p->htail = last;
    p->hjobs += njobs;
    p->win[p->nwin++] = j;
    pthread_mutex_lock(&p->mu);
    int failed = p->err_code != 0;      /* (then zpool_link says so now) */
    pthread_mutex_unlock(&p->mu);
    return p->nwin == ZWIN || failed ? zsm_release(b, 0) : 0;
}

/* the files held back to the queue as a window (its first job knows them), or dropped
 * (abort) */
int zsm_release(erofs_builder *b, int abort)
{
    struct zpool *p = b->zp;
    struct zjob *h = p->hhead, *t = p->htail;
    uint32_t njobs = p->hjobs, nwin = p->nwin;
    p->hhead = p->htail = NULL;
    p->hjobs = p->nwin = 0;
    if (!h)
        return 0;
    struct zjob **w = abort ? NULL : malloc(nwin * sizeof(*w));
    if (!w) {
        zpool_drop(b, h);
        if (abort)
            return 0;
        pthread_mutex_lock(&p->mu);
        if (!p->err_code) {
            p->err_code = ERN_ENOMEM;
            snprintf(p->err, sizeof(p->err), "out of memory");
        }
        pthread_mutex_unlock(&p->mu);
        return fail(b, ERN_ENOMEM, "out of memory");
    }
    memcpy(w, p->win, nwin * sizeof(*w));
    h->win = w;
    h->nwin = nwin;
    return zpool_link(b, h, t, njobs);
}

/* the pool stopped (every file committed): what was queued after the last file, on
 * the caller's thread */
void zsm_finish(erofs_builder *b, struct zpool *p, int abort)
{
    if (b->sm && !abort && !p->err_code) {
        smeta_pending(b, b->nnodes);
        uint64_t s0 = b->scur;
        int r = place_items(b, b->smq, b->nsmq);
        struct xfer x;
        memset(&x, 0, sizeof(x));
        uint64_t dummy = 0;
        x.out = b->sfd;
        x.ot = b->ot;
        x.bytes = &dummy;
        if (!r)
            r = write_zeros(&x, s0 * b->blksz, (b->scur - s0) * b->blksz);
        if (r) {
            p->err_code = r;
            snprintf(p->err, sizeof(p->err), "%s", x.err[0] ? x.err : r == ERN_ELIMIT ?
                     "image larger than 2^32 blocks" : "writing the image failed");
        } else {
            apply(b, b->smq, b->nsmq);
        }
    }
    free(b->smq);
    b->smq = NULL;
    b->nsmq = b->capsmq = 0;
}

/* bytes after the inode and its xattrs: padding to 8, map header, index */
uint32_t zmeta_extra(const erofs_builder *b, const struct node *n)
{
    uint32_t end = inode_size(n) + n->xattr_isize;
    return (uint32_t)(align_up(end, 8) - end) + NXR(b, n)->zmeta_len + NXR(b, n)->ztail_len;
}
