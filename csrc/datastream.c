/* erofs-tools C core, data stream: moving file data into the image.
 *
 * A struct xfer carries what one thread needs to copy (output fd, buffer, progress
 * counter, its own error text), so the same copy code runs in the writer and in the
 * stream workers: copy_file_range with a pread/pwrite fallback, holes of sparse files
 * never read. In stream mode (opts.stream_data) copy threads (two on two CPUs) copy
 * each file's data while the caller keeps adding nodes; its blocks are allocated here,
 * in call order, so the image does not depend on which thread copies what.
 */
#include "builder_int.h"

int xfail(struct xfer *x, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(x->err, sizeof(x->err), fmt, ap);
    va_end(ap);
    x->code = code;
    return code;
}

uint64_t ot_base(const struct outtarget *ot)
{
    return ot ? ot->base : 0;
}

int ot_note(struct xfer *x, uint64_t off, uint64_t len)
{
    struct outtarget *ot = x->ot;
    if (!ot || !ot->device || !len)
        return 0;
    if (off > ot->limit || len > ot->limit - off)
        return xfail(x, ERN_ELIMIT, "the image does not fit on the device: it needs more "
                     "than the %llu bytes there", (unsigned long long)ot->limit);
    pthread_mutex_lock(&ot->mu);
    struct outrange *last = ot->nw ? &ot->w[ot->nw - 1] : NULL;
    if (last && last->off + last->len == off) {
        last->len += len;               /* (most writes continue the previous one) */
    } else if (ot->nw < ot->capw || !ot->oom) {
        if (ot->nw == ot->capw) {
            size_t cap = ot->capw ? ot->capw * 2 : 4096;
            struct outrange *w = realloc(ot->w, cap * sizeof(*w));
            if (w) {
                ot->w = w;
                ot->capw = cap;
            } else {
                ot->oom = 1;
            }
        }
        if (ot->nw < ot->capw)
            ot->w[ot->nw++] = (struct outrange){off, len};
    }
    pthread_mutex_unlock(&ot->mu);
    return 0;
}

int x_pwrite(struct xfer *x, const void *buf, size_t len, uint64_t off)
{
    const uint8_t *p = buf;
    int r = ot_note(x, off, len);
    if (r)
        return r;
    off += ot_base(x->ot);
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

int x_read(struct xfer *x, int fd, uint8_t *buf, size_t len, uint64_t off,
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

int x_copy(struct xfer *x, int in, uint64_t in_off, uint64_t out_off, uint64_t len,
                  const char *path)
{
    if (no_cfr < 0)
        no_cfr = getenv("EROFS_NATIVE_NO_COPY_FILE_RANGE") != NULL;
    int nr = ot_note(x, out_off, len);
    if (nr)
        return nr;
    while (len && !no_cfr) {
        loff_t io = (loff_t)in_off, oo = (loff_t)(out_off + ot_base(x->ot));
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
        __atomic_fetch_add(x->bytes, (uint64_t)r, __ATOMIC_RELAXED);
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
        __atomic_fetch_add(x->bytes, (uint64_t)n, __ATOMIC_RELAXED);
    }
    return 0;
}

/* copy the data extents (SEEK_DATA) of a sparse file into its non-hole chunks */
int x_copy_sparse(struct xfer *x, int fd, const char *path, uint64_t size,
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

void main_xfer(erofs_builder *b, struct xfer *x)
{
    x->out = b->fd;
    x->ot = b->ot;
    x->blksz = b->blksz;
    x->buf = b->cbuf;
    x->bytes = &b->bytes_done;
    x->code = 0;
    x->err[0] = 0;
}

/* a worker's transfer context writing into the image from its own buffer (NULL if out
 * of memory: the caller fails), its bytes counted in *bytes */
void stream_xfer(erofs_builder *b, struct xfer *x, uint64_t *bytes)
{
    memset(x, 0, sizeof(*x));
    x->out = b->sfd;
    x->ot = b->ot;
    x->blksz = b->blksz;
    x->bytes = bytes;
    x->buf = malloc(CBUF_SIZE);
}

int read_exact(erofs_builder *b, int fd, uint8_t *buf, size_t len, uint64_t off,
                      const char *path)
{
    struct xfer x;
    main_xfer(b, &x);
    int r = x_read(&x, fd, buf, len, off, path);
    return r ? fail(b, r, "%s", x.err) : 0;
}

int copy_range(erofs_builder *b, int in, uint64_t in_off, uint64_t out_off,
                      uint64_t len, const char *path)
{
    struct xfer x;
    main_xfer(b, &x);
    int r = x_copy(&x, in, in_off, out_off, len, path);
    return r ? fail(b, r, "%s", x.err) : 0;
}


/* ---------------------------------------------------------- stream worker ---- */

#define QMAX 4096
#define COPY_THREADS 2       /* at most (see erofs_builder_set_output) */

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
    /* the blocks for records and directories before the data (smeta.c): written now,
     * in file order with the data, so the image file is not left with holes that the
     * writer fills later elsewhere on disk */
    static const uint8_t zeros[65536];
    for (uint64_t o = j->zero_off, e = j->zero_off + j->zero_len; !r && o < e;) {
        size_t n = e - o > sizeof(zeros) ? sizeof(zeros) : (size_t)(e - o);
        r = x_pwrite(x, zeros, n, o);
        o += n;
    }
    if (!r && j->sparse) {
        r = x_copy_sparse(x, fd, j->path, j->size, j->sparse, j->nchunks, j->csz);
    } else {
        if (!r && j->full)
            r = x_copy(x, fd, j->src_off, j->out_off, j->full, j->path);
        if (!r && j->tail && j->tailbuf) {
            r = x_read(x, fd, j->tailbuf, j->tail, j->tail_src_off, j->path);
            __atomic_fetch_add(x->bytes, (uint64_t)j->tail, __ATOMIC_RELAXED);
        }
    }
    close(fd);
    return r;
}

static void *worker_main(void *arg)
{
    erofs_builder *b = arg;
    struct xfer x;
    stream_xfer(b, &x, &b->sbytes);
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
int stream_stop(erofs_builder *b, int abort)
{
    if (b->zp)
        return zpool_stop(b, abort);
    if (!b->worker_on)
        return 0;
    int fr = abort ? 0 : smeta_flush(b);     /* (the last window's files) */
    if (fr)
        abort = 1;
    pthread_mutex_lock(&b->mu);
    b->qstop = 1;
    b->qabort = abort;
    pthread_cond_broadcast(&b->cv_job);
    pthread_mutex_unlock(&b->mu);
    for (int i = 0; i < b->nworkers; i++)
        pthread_join(b->workers[i], NULL);
    b->nworkers = 0;
    b->worker_on = 0;
    pthread_mutex_destroy(&b->mu);
    pthread_cond_destroy(&b->cv_job);
    pthread_cond_destroy(&b->cv_space);
    pthread_cond_destroy(&b->cv_idle);
    if (fr)
        return fr;
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
    /* only a file with bytes in it: on ext4 truncating to 0 (even an empty file) marks
     * the file for a flush of all its dirty pages at close (auto_da_alloc, for files
     * replaced by truncate and rewrite), a third of mkfs's time on /usr/share */
    struct stat st;
    if (b->ot && b->ot->device)
        ;                                   /* a device: written over, never resized */
    else if ((fstat(fd, &st) < 0 || (uint64_t)st.st_size != ot_base(b->ot)) &&
             ftruncate(fd, (off_t)ot_base(b->ot)) < 0)
        return fail(b, ERN_EIO, "truncating the image: %s", strerror(errno));
    b->sfd = fd;
    b->scur = (SB_END + b->blksz - 1) / b->blksz;
    if (b->o.compress_alg)
        return zpool_start(b);     /* compression threads instead of the copy thread */
    pthread_mutex_init(&b->mu, NULL);
    pthread_cond_init(&b->cv_job, NULL);
    pthread_cond_init(&b->cv_space, NULL);
    pthread_cond_init(&b->cv_idle, NULL);
    b->qstop = b->qabort = 0;
    /* copying is mostly the kernel's memcpy: on two or more CPUs two threads keep the
     * copy from being the build's critical path (each job has its own blocks, so the
     * order they finish in does not matter); compress_threads caps them */
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    int want = ncpu >= 2 ? COPY_THREADS : 1;
    if (b->o.compress_threads && (int)b->o.compress_threads < want)
        want = (int)b->o.compress_threads;
    b->nworkers = 0;
    for (int i = 0; i < want; i++) {
        if (pthread_create(&b->workers[i], NULL, worker_main, b) != 0)
            break;
        b->nworkers++;
    }
    if (!b->nworkers) {
        pthread_mutex_destroy(&b->mu);
        pthread_cond_destroy(&b->cv_job);
        pthread_cond_destroy(&b->cv_space);
        pthread_cond_destroy(&b->cv_idle);
        return fail(b, ERN_ENOMEM, "cannot start the copy thread");
    }
    b->worker_on = 1;
    return 0;
}

int erofs_builder_stream_progress(erofs_builder *b, uint64_t *bytes_done)
{
    if (bytes_done)
        *bytes_done = b->sbytes;
    return b->werr_code;
}

void stream_job_free(struct job *j)
{
    free(j->path);
    free(j);
}

/* the stream past the 2^32 blocks an image's block addresses reach: the job dropped */
static int stream_past_limit(erofs_builder *b, struct job *j)
{
    if (b->scur <= 0xFFFFFFFFull)
        return 0;
    stream_job_free(j);
    return fail(b, ERN_ELIMIT, "image larger than 2^32 blocks");
}

/* a file's data placed at the stream's next block (after the blocks records took since
 * the last data: the job zeroes them first) and queued for the copy threads */
int stream_place(erofs_builder *b, uint32_t node, struct job *j, uint64_t nblk)
{
    uint32_t blksz = b->blksz;
    struct node *n = &b->nodes[node];
    int sm = smeta_on(b);
    if (nblk && b->ot && b->ot->dsunit > 1)
        b->scur = align_up(b->scur, b->ot->dsunit);
    n->startblk = nblk ? (uint32_t)b->scur : (n->stream_inline ? EROFS_NULL_ADDR : 0);
    if (sm && nblk && b->szero && b->szero < b->scur) {
        j->zero_off = b->szero * blksz;
        j->zero_len = (b->scur - b->szero) * blksz;
    }
    b->scur += nblk;
    if (sm && nblk)
        b->szero = b->scur;
    j->out_off = nblk ? (uint64_t)n->startblk * blksz : 0;
    int r = stream_past_limit(b, j);
    return r ? r : enqueue(b, j);
}

int stream_file(erofs_builder *b, uint32_t node, const char *path, size_t pathlen,
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
    int sm = smeta_on(b);
    if (sm)
        smeta_pending(b, node);
    if (n->dkind == D_SPARSE) {
        int r = sm ? smeta_flush(b) : 0;    /* (its chunks take the stream's blocks now) */
        if (r) {
            stream_job_free(j);
            return r;
        }
        struct chunkset *cs = &b->chunks[n->aux];
        if (b->ot && b->ot->dsunit > 1)
            b->scur = align_up(b->scur, b->ot->dsunit);
        b->scur = place_sparse_chunks(b, cs, n->size, b->scur);
        if (sm)
            b->szero = b->scur;     /* (never zeroed over by a later job) */
        j->sparse = cs->entries;
        j->nchunks = cs->count;
        j->csz = (uint64_t)blksz << (cs->format & EROFS_CHUNK_FORMAT_BLKBITS_MASK);
        r = stream_past_limit(b, j);
        if (r)
            return r;
        n->streamed = 1;
        return enqueue(b, j);
    }
    uint64_t tail = n->size % blksz;
    /* decided before the layout: the inode size as far as known now */
    int inl = b->o.inline_data && tail &&
              stream_inode_size(b, n) + n->xa_max + tail <= blksz;
    uint64_t full = inl ? n->size - tail : n->size;
    uint64_t nblk = (full + blksz - 1) / blksz;
    j->full = full;
    if (inl) {
        uint64_t budget = (uint64_t)(b->o.tail_budget_mib ? b->o.tail_budget_mib : 64) << 20;
        j->tail = (uint32_t)tail;
        j->tail_src_off = offset + full;
        if (b->tail_mem + tail <= budget) {
            NX(b, n)->tailbuf = malloc(tail);
            if (NX(b, n)->tailbuf)
                b->tail_mem += tail;
        }
        j->tailbuf = NX(b, n)->tailbuf;
    }
    n->stream_inline = (uint8_t)inl;
    n->streamed = 1;
    if (sm)     /* the inode (and tail) before the data: with its window's (smeta.c) */
        return smeta_defer(b, node, j, (uint32_t)align_up(stream_inode_size(b, n) + n->xa_max +
                                                          (inl ? tail : 0), EROFS_SLOT_SIZE),
                           nblk);
    return stream_place(b, node, j, nblk);
}
