/* erofs-tools C core, compression thread pool (stream mode with opts.compress_alg).
 *
 * The caller adds files in walk order (zpool_submit); worker threads take them in that
 * order and compress each into memory (compress.c); the oldest finished file is then
 * committed: its blocks are placed at the next free block (b->scur) and written, one
 * commit at a time, in submission order. So block positions, and the image, are the
 * same whatever the number of threads. A file whose output grows large waits until it
 * is the oldest, then writes straight to its final place (bounded memory). Results are
 * moved to the nodes by zpool_stop in the caller's thread (nodes may be reallocated
 * by the caller meanwhile, so workers never touch b->nodes).
 */
#include "compress_int.h"

struct flush_arg {
    struct zpool *p;
    struct zjob *j;
    struct xfer *x;
};

static void set_err(struct zpool *p, int code, const char *msg)
{
    if (!p->err_code) {
        p->err_code = code;
        snprintf(p->err, sizeof(p->err), "%s", msg);
    }
    pthread_cond_broadcast(&p->cv_job);
    pthread_cond_broadcast(&p->cv_space);
    pthread_cond_broadcast(&p->cv_turn);
}

/* Place the pclusters of the extents not placed yet (zf->placed on), back to back
 * after the ones written so far (zf->wblocks) from block base, and write them; one
 * that an earlier pcluster already holds (dedupe) is referenced instead. Their bytes
 * are then dropped from the buffer (zf->flushed: bytes dropped from its front). Runs
 * while the file is the oldest (a large file while compressed, in place, else at its
 * commit), so the dedupe table has one user at a time. */
static int place_pclusters(struct zpool *p, struct zjob *j, struct xfer *x)
{
    struct zfile *zf = &j->zf;
    const uint32_t bs = x->blksz;
    const uint64_t base = j->base;
    int dedupe = p->zc->dedupe;   /* (the packed inode's too, as mkfs.erofs's) */
    int roll = p->zc->roll && !j->packed;
    int alg = j->zc->alg->id;     /* compressed pclusters match only with the same algorithm */
    uint64_t run = zf->flushed, runlen = 0;    /* data bytes to write before base+wblocks */
    int r;
    for (; zf->placed + zf->hold < zf->next; zf->placed++) {
        struct zext *e = &zf->ext[zf->placed];
        uint64_t off = (uint64_t)e->pblk * bs;
        if (e->inl || e->frag) {
            e->blk = (uint32_t)(base + zf->wblocks);   /* never read (as mkfs.erofs) */
            continue;
        }
        if (e->ref)
            continue;                /* an earlier pcluster, blk set when matched */
        const uint8_t *d = zf->data + (off - zf->flushed);
        uint64_t hash = 0;
        uint32_t blk;
        if (dedupe) {
            struct zrun pending = { zf->data + (run - zf->flushed),
                                    (uint32_t)(base + zf->wblocks - runlen / bs),
                                    (uint32_t)(runlen / bs) };
            r = zdedupe_find(&p->dd, x, p->b->sfd, &pending, d, e->nblk, e->raw ? -1 : alg,
                             &blk, &hash);
            if (r < 0)
                return r;
            if (r == 1) {
                if (runlen && (r = x_pwrite(x, zf->data + (run - zf->flushed), runlen,
                                            (base + zf->wblocks) * bs - runlen)))
                    return r;
                run = off + (uint64_t)e->nblk * bs;
                runlen = 0;
                e->blk = blk;
                e->dup = 1;
                j->zfull = 1;
                p->zc->incompat |= EROFS_FEATURE_INCOMPAT_DEDUPE;
                continue;
            }
        }
        e->blk = (uint32_t)(base + zf->wblocks);
        if (dedupe && zdedupe_insert(&p->dd, hash, e->blk, e->nblk, e->raw ? -1 : alg))
            return xfail(x, ERN_ENOMEM, "out of memory");
        if (roll && zroll_insert(&p->roll, e, e->blk, e->raw ? -1 : alg))
            return xfail(x, ERN_ENOMEM, "out of memory");
        zf->wblocks += e->nblk;
        runlen += (uint64_t)e->nblk * bs;
    }
    if (runlen && (r = x_pwrite(x, zf->data + (run - zf->flushed), runlen,
                                (base + zf->wblocks) * bs - runlen)))
        return r;
    /* drop the bytes placed; those of the extents held stay, moved to the front */
    uint64_t keep = zf->placed < zf->next ? (uint64_t)zf->ext[zf->placed].pblk * bs : zf->dlen;
    if (keep < zf->dlen)
        memmove(zf->data, zf->data + (keep - zf->flushed), zf->dlen - keep);
    zf->flushed = keep;
    return 0;
}

/* a file whose buffered output is large: become the file being placed now (wait until
 * it is the oldest) and write what it has at its final place */
static int become_oldest(struct flush_arg *fa)
{
    struct zpool *p = fa->p;
    struct zjob *j = fa->j;
    erofs_builder *b = p->b;
    if (!j->direct) {
        pthread_mutex_lock(&p->mu);
        while ((p->head != j || p->committing) && !p->err_code && !p->abort)
            pthread_cond_wait(&p->cv_turn, &p->mu);
        int bad = p->err_code || p->abort;
        j->direct = !bad;           /* (before zsm_commit: --dsunit aligns its start) */
        if (!bad && !(bad = zsm_commit(p, j, fa->x)))
            j->base = b->scur;      /* nobody allocates blocks while it is unfinished */
        pthread_mutex_unlock(&p->mu);
        if (bad)
            return xfail(fa->x, ERN_EIO, "stopped");
    }
    return 0;
}

/* a file's output grew large: written at its final place once it is the oldest file
 * (waiting for that); a segment of a large file does not wait but keeps its output in
 * memory until it is the oldest (it holds at most SEGMENT_SIZE of input, and waiting
 * would leave a core idle behind the file's earlier segments) */
static int zflush(void *arg, struct zfile *zf)
{
    struct flush_arg *fa = arg;
    struct zpool *p = fa->p;
    (void)zf;
    if (!fa->j->direct && (fa->j->first || fa->j->acc)) {
        pthread_mutex_lock(&p->mu);
        int oldest = p->head == fa->j && !p->committing;
        pthread_mutex_unlock(&p->mu);
        if (!oldest)
            return 0;
    }
    int r = become_oldest(fa);
    return r ? r : place_pclusters(p, fa->j, fa->x);
}

int zjob_open_source(struct xfer *x, struct zjob *j, int *pfd)
{
    if (j->srcfd > 0) {
        *pfd = fcntl(j->srcfd, F_DUPFD_CLOEXEC, 0);
        return *pfd < 0 ? xfail(x, ERN_EIO, "%s: %s", j->path, strerror(errno)) : 0;
    }
    int fd = open(j->path, O_RDONLY | O_NOCTTY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return xfail(x, ERN_EIO, "%s: %s", j->path, strerror(errno));
    struct stat st;
    if (j->offset == 0 && fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
        (uint64_t)st.st_size != j->size) {
        close(fd);
        return xfail(x, ERN_EIO, "%s: size changed while building the image", j->path);
    }
    *pfd = fd;
    return 0;
}

/* compress one file into memory (or plain when it cannot save a block) with c, the
 * context of its algorithm */
int run_zjob(struct zpool *p, struct zctx *c, struct xfer *x, struct zjob *j)
{
    if (zjob_small_plain(j, p->b->blksz)) {
        j->zf.plain = 1;
        j->zf.size = j->size;
        return 0;
    }
    int whole = zfrag_whole(p, j);       /* -Eall-fragments */
    if (whole < 0)
        return xfail(x, ERN_ENOMEM, "out of memory");
    int fd;
    int r = zjob_open_source(x, j, &fd);
    if (r)
        return r;
    /* a pcluster size of its own (--compress-hints): the settings with it, this once */
    const struct zconf *keep = c->zc;
    struct zconf own;
    if (j->ps && j->ps != c->zc->pclustersize) {
        own = *c->zc;
        own.pclustersize = j->ps;
        own.pclusterblks = j->ps / p->b->blksz;
        c->zc = &own;
    }
    struct flush_arg fa = { p, j, x };
    if (whole) {
        r = zfrag_tail(p, c, x, j, fd, zflush, &fa);
        c->zc = keep;
        close(fd);
        return r;
    }
    /* -Ededupe: a file's extents depend on the pclusters of every file before it, so
     * files are compressed one at a time, in order, each in place (as mkfs.erofs,
     * whose -Ededupe is single-threaded): the image stays the same whatever the
     * thread count */
    c->roll = p->zc->roll && !j->packed ? &p->roll : NULL;
    if (c->roll && (r = become_oldest(&fa)) != 0) {
        c->zc = keep;
        close(fd);
        return r;
    }
    r = zfile_compress(c, x, fd, j->path, j->offset, j->size, j->from,
                       j->to ? j->to : j->size, &j->zf, zflush, &fa);
    c->roll = NULL;
    c->zc = keep;
    close(fd);
    return r;
}

/* place and write the oldest finished file (only one commit runs at a time) */
int commit(struct zpool *p, struct zjob *j, struct xfer *x)
{
    erofs_builder *b = p->b;
    uint32_t bs = b->blksz;
    int r = zsm_commit(p, j, x);      /* records before the data (zsmeta.c) */
    if (r)
        return r;
    uint64_t base = j->direct ? j->base : b->scur;
    struct zfile *zf = &j->zf;
    if (!zf->plain) {
        if (base + zf->nblocks > 0xFFFFFFFFull)
            return xfail(x, ERN_ELIMIT, "image larger than 2^32 blocks");
        j->base = base;
        if ((r = place_pclusters(p, j, x)))
            return r;
        b->scur = base + zf->wblocks;
    }
    struct zjob *f = j->first ? j->first : j;
    if (f->acc) {
        /* a segment: its extents join the file's, which its last segment finishes
         * (from the first one's block on, the segments being placed back to back) */
        if (zfile_gather(f->acc, zf))
            return xfail(x, ERN_ENOMEM, "out of memory");
        f->zfull |= j->zfull;
        if (j->midseg)
            return 0;
        j->zfull = f->zfull;
        zf = f->acc;
        base = f->base;
        zf->plain = zfile_plain(zf, bs);
    }
    if (!zf->plain) {
        uint32_t nblocks = zf->wblocks;
        if (zf->refs) {
            /* partial references and pclusters of other files: the full index */
            j->zfull = 1;
            p->zc->incompat |= EROFS_FEATURE_INCOMPAT_DEDUPE;
        }
        /* appended in commit order: the packed inode does not depend on threads */
        if ((zf->frag || zf->frag_src) && (r = zpacked_commit(p, j, zf, x)))
            return r;
        j->meta = zfile_index(zf, j->zc, b->o.blkszbits, &j->meta_len);
        if (!j->meta)
            return xfail(x, ERN_ENOMEM, "out of memory");
        j->nblocks = nblocks;
        j->startblk = (uint32_t)base;
        j->idata = zf->idata;
        j->idata_len = zf->idata_len;
        zf->idata = NULL;
        if (j->idata)
            p->zc->incompat |= EROFS_FEATURE_INCOMPAT_ZTAILPACKING;
        b->scur = base + nblocks;
    } else if (b->o.chunkbits && j->size && !j->packed) {
        j->plain = 1;               /* (as mkfs.erofs: chunks, what it stores plain) */
        r = zchunk_commit(b, x, j->path, j->offset, j->size, base, &j->chunks1);
    } else {
        j->plain = 1;
        uint64_t full = j->size - j->tail;
        uint64_t nblk = (full + bs - 1) / bs;
        if (base + nblk > 0xFFFFFFFFull)
            return xfail(x, ERN_ELIMIT, "image larger than 2^32 blocks");
        j->startblk = nblk ? (uint32_t)base : (j->tail ? EROFS_NULL_ADDR : 0);
        b->scur = base + nblk;
        if (j->size) {
            int fd;
            if ((r = zjob_open_source(x, j, &fd)))
                return r;
            if (full)
                r = x_copy(x, fd, j->offset, base * bs, full, j->path);
            uint64_t budget = (uint64_t)(b->o.tail_budget_mib ? b->o.tail_budget_mib : 64) << 20;
            if (!r && j->tail && b->tail_mem + j->tail <= budget) {
                j->tailbuf = malloc(j->tail);
                if (j->tailbuf) {
                    b->tail_mem += j->tail;
                    r = x_read(x, fd, j->tailbuf, j->tail, j->offset + full, j->path);
                }
            }
            close(fd);
        }
    }
    b->sbytes += j->size;
    return r;
}

void zjob_drop_acc(struct zjob *f)
{
    if (f->acc) {
        zfile_free(f->acc);
        free(f->acc);
        f->acc = NULL;
    }
}

/* with p->mu held: commit finished files from the oldest on */
static void commit_ready(struct zpool *p, struct xfer *x)
{
    while (!p->committing && p->head && p->head->state == 2) {
        struct zjob *j = p->head;
        p->committing = 1;
        int skip = p->err_code || p->abort;
        pthread_mutex_unlock(&p->mu);
        int r = skip ? 0 : commit(p, j, x);
        zfile_free(&j->zf);
        if (j->first && !j->midseg)
            zjob_drop_acc(j->first);
        free(j->path);
        j->path = NULL;
        pthread_mutex_lock(&p->mu);
        p->pending -= j->held;
        p->queued--;
        p->head = j->next;
        if (!p->head)
            p->tail = NULL;
        j->next = NULL;
        if (p->dtail)
            p->dtail->next = j;
        else
            p->dhead = j;
        p->dtail = j;
        p->committing = 0;
        if (r)
            set_err(p, r, x->err);
        pthread_cond_broadcast(&p->cv_turn);
        pthread_cond_broadcast(&p->cv_job);
        pthread_cond_signal(&p->cv_space);
    }
}

static void *zworker(void *arg)
{
    struct zpool *p = arg;
    struct zctx cs[ZALG_MAX];      /* one per algorithm, set up when first needed */
    memset(cs, 0, sizeof(cs));
    struct zctx *c = &cs[0];
    struct xfer x;
    uint64_t dummy = 0;
    stream_xfer(p->b, &x, &dummy);
    int init = zctx_init(c, p->zc);
    pthread_mutex_lock(&p->mu);
    if (init || !x.buf)
        set_err(p, ERN_ENOMEM, init ? c->err : "out of memory");
    for (;;) {
        while (!p->err_code && !p->abort &&
               ((!p->claim && !p->stop) || (p->claim && p->pending > PENDING_MAX)))
            pthread_cond_wait(&p->cv_job, &p->mu);
        struct zjob *j = p->claim;
        if (!j || p->abort)
            break;
        p->claim = j->next;
        j->state = 1;
        int skip = p->err_code != 0;
        pthread_mutex_unlock(&p->mu);
        c = &cs[j->ccfg];
        int r = 0;
        if (!skip && !c->zc && zctx_init(c, &p->zc[j->ccfg]))
            r = xfail(&x, ERN_ENOMEM, "%s", c->err);
        if (!skip && !r)
            r = run_zjob(p, c, &x, j);
        if (j->zf.plain && !j->first && !j->acc)
            zfile_drop_output(&j->zf);      /* now, not after waiting for its commit */
        pthread_mutex_lock(&p->mu);
        if (r)
            set_err(p, r, x.err);
        j->state = 2;
        j->held = j->zf.dlen - j->zf.flushed;
        p->pending += j->held;
        commit_ready(p, &x);
    }
    /* an error: the finished files still go through commit_ready (skipped) to be freed */
    commit_ready(p, &x);
    pthread_mutex_unlock(&p->mu);
    for (uint32_t k = 0; k < ZALG_MAX; k++)
        if (cs[k].zc)
            zctx_fini(&cs[k]);
    free(x.buf);
    return NULL;
}

int zpool_start(erofs_builder *b)
{
    struct zpool *p = calloc(1, sizeof(*p));
    if (!p)
        return fail(b, ERN_ENOMEM, "out of memory");
    p->b = b;
    if (!b->zc && !(b->zc = calloc(ZALG_MAX, sizeof(*b->zc)))) {
        free(p);
        return fail(b, ERN_ENOMEM, "out of memory");
    }
    p->zc = b->zc;
    int r = zconf_setup(b, p->zc);
    if (r) {
        free(p);
        return r;
    }
    p->pk.fd = -1;
    if ((p->zc->frags || b->o.compress_dirs) && zpacked_open(&p->pk)) {
        free(p);
        return fail(b, ERN_EIO, "cannot create the packed file: %s", strerror(errno));
    }
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv_job, NULL);
    pthread_cond_init(&p->cv_space, NULL);
    pthread_cond_init(&p->cv_turn, NULL);
    b->zp = p;
    if ((r = zpacked_prefixes(b))) {
        zpool_stop(b, 1);
        return r;
    }
    for (uint32_t i = 0; i < p->zc->threads; i++) {
        if (pthread_create(&p->th[i], NULL, zworker, p) != 0)
            break;
        p->nth++;
    }
    if (!p->nth) {
        zpool_stop(b, 1);
        return fail(b, ERN_ENOMEM, "cannot start the compression threads");
    }
    b->worker_on = 1;
    return 0;
}

/* a large file: one job per segment after j (its first), chained by next, so that
 * both cores work on it (as mkfs.erofs 1.9's workers take segments); not with
 * -Ededupe, whose files are compressed one at a time -> the chain's last job (NULL: out
 * of memory, the chain freed) */
static struct zjob *split_segments(struct zpool *p, struct zjob *j, uint32_t *njobs)
{
    *njobs = 1;
    if (j->nocomp || p->zc->roll || p->zc->allfrags || j->size <= SEGMENT_SIZE)
        return j;
    if (!(j->acc = calloc(1, sizeof(*j->acc))))
        return NULL;
    j->to = SEGMENT_SIZE;
    j->midseg = 1;
    struct zjob *last = j;
    for (uint64_t from = SEGMENT_SIZE; from < j->size; from += SEGMENT_SIZE) {
        struct zjob *s = malloc(sizeof(*s));
        if (!s || !(*s = *j, s->path = strdup(j->path))) {
            free(s);
            for (struct zjob *k = j->next; k;) {
                struct zjob *nx = k->next;
                free(k->path);
                free(k);
                k = nx;
            }
            j->next = NULL;
            zjob_drop_acc(j);
            return NULL;
        }
        s->acc = NULL;
        s->next = NULL;
        s->first = j;
        s->from = from;
        s->to = from + SEGMENT_SIZE;
        s->midseg = s->to < j->size;
        last->next = s;
        last = s;
        ++*njobs;
    }
    return last;
}

int zpool_submit(erofs_builder *b, uint32_t node, const char *path, size_t pathlen,
                 uint64_t offset)
{
    struct zpool *p = b->zp;
    struct node *n = &b->nodes[node];
    uint32_t bs = b->blksz;
    struct zjob *j = calloc(1, sizeof(*j));
    if (!j || !(j->path = strndup(path, pathlen))) {
        free(j);
        return fail(b, ERN_ENOMEM, "out of memory");
    }
    j->node = node;
    j->offset = offset;
    j->size = n->size;
    j->zc = p->zc;
    if (NX(b, n)->zhint) {
        if (NX(b, n)->zalg >= p->zc->nalgs || NX(b, n)->zps > p->zc->max_ps) {
            free(j->path);
            free(j);
            return fail(b, ERN_EINVAL, "node %u: compression hint (algorithm %u, pcluster "
                        "%u) beyond the configured ones", node, NX(b, n)->zalg, NX(b, n)->zps);
        }
        j->ccfg = NX(b, n)->zalg;
        j->zc = &p->zc[NX(b, n)->zalg];
        j->ps = NX(b, n)->zps;
        j->nocomp = NX(b, n)->zps == 0;
    }
    uint64_t tail = n->size % bs;
    /* if stored plain: decided before the layout, with the inode size as far as known
     * now (as stream_file) */
    if (b->o.inline_data && tail && !b->o.chunkbits &&     /* (chunks: no tail) */
        stream_inode_size(b, n) + n->xa_max + tail <= bs)
        j->tail = (uint32_t)tail;
    n->streamed = 1;
    uint32_t njobs;
    struct zjob *last = split_segments(p, j, &njobs);
    if (!last) {
        free(j->path);
        free(j);
        return fail(b, ERN_ENOMEM, "out of memory");
    }
    zsm_submit(b, j);      /* (on the first job only: not copied to the segments) */
    return zsm_hold(b, j, last, njobs);     /* (queued with its window, zsmeta.c) */
}

/* the jobs j..last (njobs of them, chained) to the queue, in order; on an error they
 * are freed */
int zpool_link(erofs_builder *b, struct zjob *j, struct zjob *last, uint32_t njobs)
{
    struct zpool *p = b->zp;
    pthread_mutex_lock(&p->mu);
    while (p->queued >= ZQMAX && !p->err_code)
        pthread_cond_wait(&p->cv_space, &p->mu);
    int err = p->err_code;
    if (!err) {
        if (p->tail)
            p->tail->next = j;
        else
            p->head = j;
        p->tail = last;
        if (!p->claim)
            p->claim = j;
        p->queued += njobs;
        pthread_cond_broadcast(&p->cv_job);
    } else {
        memcpy(b->err, p->err, sizeof(b->err));
    }
    pthread_mutex_unlock(&p->mu);
    if (err)
        zpool_drop(b, j);
    return err;
}

/* jobs never queued, from j on (chained) */
void zpool_drop(erofs_builder *b, struct zjob *j)
{
    while (j) {
        struct zjob *nx = j->next;
        zjob_drop_acc(j);
        zsm_done(b, j, 0);
        free(j->path);
        free(j);
        j = nx;
    }
}
