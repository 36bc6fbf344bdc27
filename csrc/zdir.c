/* erofs-tools C core, the compression pool's end: the packed inode, and compressed
 * directories (--zD).
 *
 * zpool_stop stops the pool once every file is committed. With -Efragments the packed
 * inode (the fragments appended in commit order) is compressed then, before the
 * layout. With --zD (as mkfs.erofs 1.9) every directory goes whole into the packed
 * inode, its inode a COMPRESSED_FULL one whose map header holds the fragment's offset
 * (the FRAGMENT_INODE bit, 63): its entries are still packed in whole dirent blocks,
 * the blocks back to back there (the last one short), read by the kernel through the
 * packed inode. A directory's entries hold the nids of its children, known only once
 * the layout has placed every record, so the pool is kept (b->zlate) until then: the
 * layout places the other records, the directories' of a known length (inode, xattrs,
 * the 8-byte map header), then zdir_pack appends the directories after the fragments
 * (depth first, as mkfs.erofs 1.9.4 orders them) and compresses the packed inode after
 * everything else (its record last, zdir_place_packed: in room left free among the
 * data, else at the end of the inode area's last block, else in a block after its
 * data), so that no other nid depends on its size. mkfs.erofs 1.9.4 appends no
 * directory to an earlier one's bytes (nor shares them), and stores the packed inode
 * uncompressed when compression saves nothing, as any file. Without -z (no pool) the
 * directories still go to the packed inode, stored plain (FLAT_INLINE), as mkfs.erofs
 * 1.9.4 writes them; so in an index (--tar=i, not stream mode) too. An index with -z
 * (stream mode, nothing streamed: index_layout) keeps the packed inode late as well, with
 * -Efragments alone too (the long xattr prefix table, its tail inline), as 1.9.4 does.
 */
#include "compress_int.h"

/* -Efragments, once every file is committed: the packed inode, a node of its own (in
 * no directory), compressed like a file with its own pcluster size and committed
 * after the others (so it is written in place as it is compressed). tail: stored plain,
 * its tail inline (an index's: the prefix table alone, as mkfs.erofs 1.9.4 keeps it) */
static int flush_packed(erofs_builder *b, struct zpool *p, int tail)
{
    struct zconf pz = *p->zc;
    pz.pclustersize = pz.packed_ps;
    pz.pclusterblks = pz.packed_ps / b->blksz;
    pz.frags = 0;
    if (p->pk.bare && p->pk.len == b->xpfx_len)
        p->pk.len = p->pk.bare;     /* the table alone: unpadded, as mkfs.erofs's */
    int64_t node = erofs_node_add(b, S_IFREG | 0600, 0, 0, 0, 0, p->pk.len, 0, 0);
    if (node < 0)
        return (int)node;
    struct node *n = &b->nodes[node];
    n->nlink = 1;
    n->dkind = D_FILE;
    n->streamed = 1;
    b->packed_node = (uint32_t)node;
    struct zjob *j = calloc(1, sizeof(*j));
    struct xfer x;
    uint64_t dummy = 0;
    stream_xfer(b, &x, &dummy);
    struct zctx c;
    int r = zctx_init(&c, &pz);
    if (!j || !x.buf || r || !(j->path = strdup("packed file"))) {
        r = r ? fail(b, r, "%s", c.err) : fail(b, ERN_ENOMEM, "out of memory");
        goto out;
    }
    j->node = (uint32_t)node;
    j->size = p->pk.len;
    j->srcfd = p->pk.fd;
    j->zc = &pz;
    j->packed = 1;
    j->state = 1;
    if (tail && b->o.inline_data && p->pk.len % b->blksz &&
        sizeof(struct erofs_inode_compact) + p->pk.len % b->blksz <= b->blksz)
        j->tail = (uint32_t)(p->pk.len % b->blksz);
    p->head = p->tail = j;       /* the oldest file: zflush may write it in place */
    r = run_zjob(p, &c, &x, j);
    if (!r)
        r = commit(p, j, &x);
    p->head = p->tail = NULL;
    if (r)
        fail(b, r, "%s", x.err);
    zfile_free(&j->zf);
    if (p->dtail)
        p->dtail->next = j;
    else
        p->dhead = j;
    p->dtail = j;
    j = NULL;
out:
    if (j) {
        free(j->path);
        free(j);
    }
    zctx_fini(&c);
    free(x.buf);
    return r;
}

/* the committed jobs' results to their nodes (ok: the build goes on), the jobs freed */
static void results_to_nodes(erofs_builder *b, struct zpool *p, int ok)
{
    for (struct zjob *j = p->dhead; j;) {
        struct zjob *nx = j->next;
        zjob_drop_acc(j);
        zsm_done(b, j, ok);
        if (ok && !j->midseg) {
            struct node *n = &b->nodes[j->node];
            n->startblk = j->startblk;
            if (j->chunks1) {
                n->dkind = D_CHUNKS;
                n->aux = j->chunks1 - 1;
            } else if (j->plain) {
                n->stream_inline = j->tail != 0;
                NX(b, n)->tailbuf = j->tailbuf;
                j->tailbuf = NULL;
            } else {
                NX(b, n)->zmeta = j->meta;
                NX(b, n)->zmeta_len = j->meta_len;
                NX(b, n)->zblocks = j->nblocks;
                NX(b, n)->ztail = j->idata;
                NX(b, n)->ztail_len = j->idata_len;
                NX(b, n)->zfull_only = (uint8_t)j->zfull;
                j->meta = NULL;
                j->idata = NULL;
            }
        }
        free(j->meta);
        free(j->idata);
        free(j->tailbuf);
        free(j->path);
        free(j);
        j = nx;
    }
    p->dhead = p->dtail = NULL;
}

static void pool_free(erofs_builder *b, struct zpool *p)
{
    if (p->pk.fd >= 0)
        zpacked_close(&p->pk);
    zdedupe_free(&p->dd);
    zroll_free(&p->roll);
    results_to_nodes(b, p, 0);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv_job);
    pthread_cond_destroy(&p->cv_space);
    pthread_cond_destroy(&p->cv_turn);
    free(p);
}

/* stop the pool (after every file is committed, or dropping them when abort) and move
 * the results to the nodes; with --zD the pool stays (b->zlate) for zdir_pack */
int zpool_stop(erofs_builder *b, int abort)
{
    struct zpool *p = b->zp;
    if (!p)
        return 0;
    zsm_release(b, abort);          /* the last window to the queue (or dropped) */
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    p->abort = abort;
    pthread_cond_broadcast(&p->cv_job);
    pthread_cond_broadcast(&p->cv_turn);
    pthread_mutex_unlock(&p->mu);
    for (uint32_t i = 0; i < p->nth; i++)
        pthread_join(p->th[i], NULL);
    b->worker_on = 0;
    zsm_finish(b, p, abort);        /* records queued after the last file */
    int code = p->err_code;
    int late = 0;
    if (!code && !abort && p->head)
        code = fail(b, ERN_EINVAL, "compression stopped with files left");
    else if (code && !abort)
        fail(b, code, "%s", p->err);
    else if (!abort && (b->o.compress_dirs || (p->pk.len && index_layout(b))))
        late = 1;                   /* the packed inode after the layout (zdir_pack) */
    else if (!abort && p->pk.len)
        code = flush_packed(b, p, 0);
    results_to_nodes(b, p, !code && !abort);
    for (struct zjob *j = p->head; j;) {
        struct zjob *nx = j->next;
        zfile_free(&j->zf);
        zjob_drop_acc(j);
        zsm_done(b, j, 0);
        free(j->path);
        free(j);
        j = nx;
    }
    p->head = p->tail = NULL;
    b->zp = NULL;          /* b->zc stays for layout and write */
    if (late)
        b->zlate = p;
    else
        pool_free(b, p);
    return code;
}

void zdir_drop(erofs_builder *b)
{
    if (b->zlate)
        pool_free(b, b->zlate);
    b->zlate = NULL;
}

int zdir_prepare(erofs_builder *b)
{
    if (!b->o.compress_dirs)
        return 0;
    if (!b->nx || (b->o.compress_alg && !b->zlate))
        return fail(b, ERN_EINVAL, "compressed directories need stream mode");
    for (uint32_t i = 0; i < b->nnodes; i++) {
        struct node *n = &b->nodes[i];
        if ((n->mode & S_IFMT) != S_IFDIR)
            continue;
        /* (every directory: at least "." and "..", over the map header's 8 bytes,
         * mkfs.erofs's limit) */
        free(NX(b, n)->zmeta);
        NX(b, n)->zmeta = calloc(1, ZDIR_HDR);
        if (!NX(b, n)->zmeta)
            return fail(b, ERN_ENOMEM, "out of memory");
        NX(b, n)->zmeta_len = ZDIR_HDR;
        NX(b, n)->zfull_only = 1;
        NX(b, n)->zblocks = 0;
        NX(b, n)->ztail_len = 0;
    }
    return 0;
}

int zdir_pack(erofs_builder *b, uint64_t *blk)
{
    struct zpool *p = b->zlate;
    uint32_t bs = b->blksz;
    struct xfer x;
    uint64_t dummy = 0;
    stream_xfer(b, &x, &dummy);
    uint8_t *buf = NULL, *all = NULL;
    uint64_t cap = 0, all_len = 0, all_cap = 0;
    /* depth first, children in name order: the order mkfs.erofs 1.9.4 writes them in */
    uint32_t *stack = malloc((size_t)(b->nnodes ? b->nnodes : 1) * sizeof(*stack)), sp = 0;
    int r = x.buf && stack ? 0 : fail(b, ERN_ENOMEM, "out of memory");
    if (stack && b->o.compress_dirs)    /* (an index's -Efragments: the packed inode only) */
        stack[sp++] = b->root;
    while (!r && sp) {
        struct node *n = &b->nodes[stack[--sp]];
        for (uint32_t k = n->de_count; k-- > 0;) {
            uint32_t c = b->des[n->de_first + k].child;
            if ((b->nodes[c].mode & S_IFMT) == S_IFDIR && sp < b->nnodes)
                stack[sp++] = c;
        }
        uint64_t need = align_up(n->size, bs), off;
        if (need > cap) {
            uint8_t *nb = realloc(buf, need);
            if (!nb) {
                r = fail(b, ERN_ENOMEM, "out of memory");
                break;
            }
            buf = nb;
            cap = need;
        }
        memset(buf, 0, need);
        dir_pack(b, n, buf);
        if (!p) {
            /* without -z: the packed inode stored plain, its bytes gathered here */
            if (all_len + n->size > all_cap) {
                uint64_t nc = (all_len + n->size) * 2;
                uint8_t *na = realloc(all, nc);
                if (!na) {
                    r = fail(b, ERN_ENOMEM, "out of memory");
                    break;
                }
                all = na;
                all_cap = nc;
            }
            memcpy(all + all_len, buf, n->size);
            off = all_len;
            all_len += n->size;
        } else if ((r = zpacked_append(&p->pk, &x, buf, n->size, &off))) {
            r = fail(b, r, "%s", x.err);
            break;
        }
        uint64_t h = cpu_to_le64(off | 1ull << 63);     /* Z_EROFS_FRAGMENT_INODE_BIT */
        memcpy(NX(b, n)->zmeta, &h, ZDIR_HDR);
    }
    free(buf);
    free(stack);
    free(x.buf);
    if (!p) {
        int64_t node = r ? -1 : erofs_node_add(b, S_IFREG | 0600, 0, 0, 0, 0, all_len, 0, 0);
        if (!r && node < 0)
            r = (int)node;
        if (!r && !(r = erofs_node_set_bytes(b, (uint32_t)node, (const char *)all, all_len))) {
            b->nodes[node].nlink = 1;
            b->packed_node = (uint32_t)node;
            b->late_off = *blk * bs;    /* (its blocks: zdir_place_packed) */
        }
        free(all);
        return r;
    }
    if (!r) {
        p->zc->incompat |= EROFS_FEATURE_INCOMPAT_FRAGMENTS;
        b->late_off = *blk * bs;    /* (write.c: the inode window stops before it) */
        int tail = index_layout(b);
        b->scur = *blk;
        r = flush_packed(b, p, tail);
        *blk = b->scur;
    }
    results_to_nodes(b, p, !r);
    b->zlate = NULL;
    pool_free(b, p);
    return r;
}

int zdir_place_packed(erofs_builder *b, uint64_t meta_start, uint64_t *meta_end,
                      uint64_t *blk)
{
    struct node *n = &b->nodes[b->packed_node];
    uint32_t bs = b->blksz;
    int may_cross;
    uint64_t len = mpack_record_len(b, n, &may_cross);
    uint64_t off;
    if (!n->streamed) {
        /* without -z: its data stored plain from *blk on (the tail inline if it fits) */
        uint64_t nblk = n->layout == L_INLINE ? n->size / bs : (n->size + bs - 1) / bs;
        n->startblk = nblk ? (uint32_t)*blk : (n->layout == L_INLINE ? EROFS_NULL_ADDR : 0);
        *blk += nblk;
        if (*blk > 0xFFFFFFFFull)
            return fail(b, ERN_ELIMIT, "image larger than 2^32 blocks");
    }
    if (b->sm && !NXR(b, n)->ztail_len && !smeta_fill(b, n, len))
        return 0;                   /* room left among the data */
    uint64_t end = *meta_end;
    off = align_up(end, EROFS_SLOT_SIZE);
    if (NXR(b, n)->ztail_len)
        off = ztail_fit(b, n, off, bs);
    if (!may_cross && off % bs + len > bs)
        off = align_up(off, bs);    /* (an inline tail stays in its inode's block) */
    if (b->o.metabox || end % bs == 0 || off + len > align_up(end, bs) || off < meta_start) {
        /* (-m: its record in the image, not the metabox: nid without bit 63, counted
         * from byte 0, as mkfs.erofs 1.9.4 keeps it) */
        /* a block of its own after its data */
        off = *blk * bs;
        if (NXR(b, n)->ztail_len)
            off = ztail_fit(b, n, off, bs);
        *blk = (off + len + bs - 1) / bs;
        if (*blk > 0xFFFFFFFFull)
            return fail(b, ERN_ELIMIT, "image larger than 2^32 blocks");
    } else {
        *meta_end = align_up(off + len, EROFS_SLOT_SIZE);   /* the inode area's end */
    }
    n->meta_off = off;
    n->nid = (off - (b->o.metabox ? 0 : meta_start)) / EROFS_SLOT_SIZE;
    return 0;
}
