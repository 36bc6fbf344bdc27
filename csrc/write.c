/* erofs-tools C core, write: serialize a laid-out builder into the image fd.
 *
 * Inodes, inline xattrs, inline tails and chunk indexes go through a 1 MiB window
 * buffer over the metadata area (flushed when an offset falls outside it); file and
 * directory blocks are written in place; the shared xattr area, the caller's reserved
 * bytes, the device table and last the superblock (with its checksum over the block it
 * sits in) follow at write_end. Inodes are visited in offset order (b->worder), so the
 * window moves forward only.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE               /* sync_file_range */
#endif
#include <errno.h>
#include <fcntl.h>

#include "builder_int.h"

/* pwrite of the whole buffer (the copy code's, with the error put on the builder) */
static int pwrite_all(erofs_builder *b, const void *buf, size_t len, uint64_t off)
{
    struct xfer x;
    main_xfer(b, &x);
    int r = x_pwrite(&x, buf, len, off);
    return r ? fail(b, r, "%s", x.err) : 0;
}

static int win_flush(erofs_builder *b)
{
    if (b->win_hi > b->win_start && b->sm) {
        /* records among the data (smeta.c): only the blocks written to, clipped to
         * the window, so the data between them stays */
        uint64_t bs = b->blksz, first = b->win_start / bs, last = (b->win_hi - 1) / bs;
        for (uint64_t k = first; k <= last;) {
            if (!b->wdirty[k - first]) {
                k++;
                continue;
            }
            uint64_t e = k;
            while (e + 1 <= last && b->wdirty[e + 1 - first])
                e++;
            uint64_t lo = k * bs > b->win_start ? k * bs : b->win_start;
            uint64_t hi = (e + 1) * bs < b->win_hi ? (e + 1) * bs : b->win_hi;
            int r = pwrite_all(b, b->win + (lo - b->win_start), hi - lo, lo);
            if (r)
                return r;
            k = e + 1;
        }
        memset(b->wdirty, 0, WIN_SIZE / 512 + 2);
    } else if (b->win_hi > b->win_start) {
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
    /* (inodes in block 0, after the superblock: the file data follows that block in
     * stream mode, so the window moves on to the inode area rather than spanning it) */
    if (off < b->win_start || off + len > b->win_start + WIN_SIZE ||
        (b->late_off && off >= b->late_off && b->win_start < b->late_off) ||
        (b->win_start < b->blksz && off >= b->blksz && b->info.meta_start == 0 &&
         b->o.stream_data)) {
        if (win_flush(b))
            return NULL;
        b->win_start = off;
        b->win_hi = b->win_start;
    }
    if (off + len > b->win_hi)
        b->win_hi = off + len;
    if (b->sm && len)
        for (uint64_t k = off / b->blksz; k <= (off + len - 1) / b->blksz; k++)
            b->wdirty[k - b->win_start / b->blksz] = 1;
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


static int write_inline_xattrs(erofs_builder *b, const struct node *n, uint64_t off);

/* the inode (compact or extended) and its inline xattrs */
static int write_inode(erofs_builder *b, struct node *n)
{
    const uint32_t hdr = (uint32_t)sizeof(struct erofs_xattr_ibody_header);
    uint32_t icount = n->xattr_isize ? (n->xattr_isize - hdr) / 4 + 1 : 0;
    uint32_t fmt = n->mode & S_IFMT;
    uint32_t iu = 0;
    if (n->layout == L_CHUNK)
        iu = n->dkind == D_SPARSE ? (b->chunks[n->aux].format & EROFS_CHUNK_FORMAT_BLKBITS_MASK)
                                  : b->chunks[n->aux].format;
    else if (fmt == S_IFCHR || fmt == S_IFBLK)
        iu = n->rdev;
    else if (fmt == S_IFIFO || fmt == S_IFSOCK)
        iu = 0;
    else if (n->layout == L_ZFULL || n->layout == L_ZCOMPACT)
        iu = NXR(b, n)->zblocks;    /* compressed inodes: blocks of their pclusters */
    else
        iu = n->startblk;
    union {
        struct erofs_inode_compact c;
        struct erofs_inode_extended x;
    } ib;
    memset(&ib, 0, sizeof(ib));
    if (n->extended) {
        ib.x.i_format = cpu_to_le16(EROFS_I_FORMAT(EROFS_INODE_EXTENDED, n->layout));
        ib.x.i_xattr_icount = cpu_to_le16(icount);
        ib.x.i_mode = cpu_to_le16(n->mode);
        ib.x.i_size = cpu_to_le64(n->size);
        ib.x.i_u = cpu_to_le32(iu);
        ib.x.i_ino = cpu_to_le32(n->ino);
        ib.x.i_uid = cpu_to_le32(n->uid);
        ib.x.i_gid = cpu_to_le32(n->gid);
        ib.x.i_mtime = cpu_to_le64(n->mtime);
        ib.x.i_mtime_nsec = cpu_to_le32(n->mtime_nsec);
        ib.x.i_nlink = cpu_to_le32(n->nlink);
    } else {
        /* compact: the mtime is the build time, i_mtime stays 0; with -E48bit its own,
         * from the epoch */
        ib.c.i_format = cpu_to_le16(EROFS_I_FORMAT(EROFS_INODE_COMPACT, n->layout));
        if (b->o.sb_48bit)
            ib.c.i_mtime = cpu_to_le32((uint32_t)(n->mtime - sb_epoch(b, b->info.build_time)));
        ib.c.i_xattr_icount = cpu_to_le16(icount);
        ib.c.i_mode = cpu_to_le16(n->mode);
        ib.c.i_nlink = cpu_to_le16(n->nlink);
        ib.c.i_size = cpu_to_le32(n->size);
        ib.c.i_u = cpu_to_le32(iu);
        ib.c.i_ino = cpu_to_le32(n->ino);
        ib.c.i_uid = cpu_to_le16(n->uid);
        ib.c.i_gid = cpu_to_le16(n->gid);
    }
    if (b->o.dot_omitted && fmt == S_IFDIR)
        ib.c.i_format |= cpu_to_le16(EROFS_I_DOT_OMITTED);    /* (both forms: first field) */
    uint32_t isz = inode_size(n);
    int r = win_write(b, n->meta_off, &ib, isz);
    if (r || !n->xattr_isize)
        return r;
    return write_inline_xattrs(b, n, n->meta_off + isz);
}

/* ibody header, then the shared ids, then the inline entries */
static int write_inline_xattrs(erofs_builder *b, const struct node *n, uint64_t off)
{
    int r;
    uint32_t nshared = 0;
    for (uint32_t k = 0; k < n->xa_count; k++)
        if (b->xas[n->xa_first + k].shared_id != NONE32)
            nshared++;
    if (nshared > 255)
        return fail(b, ERN_ELIMIT, "more than 255 shared xattrs on one inode");
    struct erofs_xattr_ibody_header hdr;
    memset(&hdr, 0, sizeof(hdr));
    hdr.h_shared_count = (uint8_t)nshared;
    if (b->o.xattr_filter)
        hdr.h_name_filter = cpu_to_le32(xattr_name_filter(b, n));
    if ((r = win_write(b, off, &hdr, sizeof(hdr))))
        return r;
    off += sizeof(hdr);
    for (uint32_t k = 0; k < n->xa_count; k++) {
        struct xattr_rec *x = &b->xas[n->xa_first + k];
        if (x->shared_id == NONE32)
            continue;
        uint32_t id = cpu_to_le32(x->shared_id);
        if ((r = win_write(b, off, &id, sizeof(id))))
            return r;
        off += sizeof(id);
    }
    for (uint32_t k = 0; k < n->xa_count; k++) {
        struct xattr_rec *x = &b->xas[n->xa_first + k];
        if (x->shared_id != NONE32)
            continue;
        struct erofs_xattr_entry eh = {
            .e_name_len = x->name_len, .e_name_index = x->index,
            .e_value_size = cpu_to_le16(x->val_len),
        };
        uint64_t name_at = off + sizeof(eh);
        if ((r = win_write(b, off, &eh, sizeof(eh))) ||
            (r = win_write(b, name_at, b->arena + x->name_off, x->name_len)) ||
            (r = win_write(b, name_at + x->name_len, b->arena + x->val_off, x->val_len)))
            return r;
        off += xentry_size(x);
    }
    return 0;
}

/* the caller's chunk entries (advise | device_id << 16 | blkaddr << 32): 8-byte chunk
 * indexes, or a 4-byte block map of the low 32 bits */
static int write_chunk_indexes(erofs_builder *b, const struct chunkset *cs, uint64_t tail_off)
{
    int indexes = (cs->format & EROFS_CHUNK_FORMAT_INDEXES) != 0;
    uint32_t unit = indexes ? (uint32_t)sizeof(struct erofs_inode_chunk_index) : 4;
    uint64_t off = align_up(tail_off, unit);
    for (uint32_t c = 0; c < cs->count; c++) {
        uint64_t e = cs->entries[c];
        struct erofs_inode_chunk_index ci = {
            .advise = cpu_to_le16(e & 0xFFFF),
            .device_id = cpu_to_le16((e >> 16) & 0xFFFF),
            .blkaddr = cpu_to_le32(e >> 32),
        };
        uint32_t blkaddr = cpu_to_le32(e);
        int r = indexes ? win_write(b, off, &ci, sizeof(ci)) : win_write(b, off, &blkaddr, 4);
        if (r)
            return r;
        off += unit;
    }
    return 0;
}

static int write_node_data(erofs_builder *b, struct node *n)
{
    uint32_t blksz = b->blksz;
    uint32_t fmt = n->mode & S_IFMT;
    uint64_t tail_off = n->meta_off + inode_size(n) + n->xattr_isize;
    if (n->layout == L_CHUNK) {
        struct chunkset *cs = &b->chunks[n->aux];
        if (n->dkind == D_CHUNKS)
            return write_chunk_indexes(b, cs, tail_off);
        /* D_SPARSE: block map + copy of the data extents only */
        uint64_t off = align_up(tail_off, 4);
        for (uint32_t c = 0; c < cs->count; c++) {
            uint32_t e = cpu_to_le32((cs->entries[c] & 1) ? (uint32_t)(cs->entries[c] >> 32)
                                                          : EROFS_NULL_ADDR);
            int r = win_write(b, off, &e, 4);
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
        uint64_t csz = (uint64_t)blksz << (cs->format & EROFS_CHUNK_FORMAT_BLKBITS_MASK);
        struct xfer x;
        main_xfer(b, &x);
        int r = x_copy_sparse(&x, fd, path, n->size, cs->entries, cs->count, csz);
        if (r)
            r = fail(b, r, "%s", x.err);
        close(fd);
        free(path);
        return r;
    }
    if (NXR(b, n)->zmeta) {   /* pclusters written by the compression pool */
        uint64_t mo = align_up(tail_off, 8);
        int r = win_write(b, mo, NXR(b, n)->zmeta, NXR(b, n)->zmeta_len);
        if (!r && NXR(b, n)->ztail_len)
            r = win_write(b, mo + NXR(b, n)->zmeta_len, NXR(b, n)->ztail, NXR(b, n)->ztail_len);
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
        dir_pack(b, n, buf);
        int r = 0;
        if (full)
            r = pwrite_all(b, buf, full, data_pos);
        if (!r && n->tail)
            r = win_write(b, tail_off, buf + full, n->tail);
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
        if (NXR(b, n)->tailbuf) {
            int r = win_write(b, tail_off, NXR(b, n)->tailbuf, n->tail);
            free(NX(b, n)->tailbuf);
            NX(b, n)->tailbuf = NULL;
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
    if (b->sm && !b->wdirty)
        b->wdirty = calloc(1, WIN_SIZE / 512 + 2);
    if (b->sm && !b->wdirty)
        return fail(b, ERN_ENOMEM, "out of memory");
    if (!b->cbuf)
        b->cbuf = malloc(CBUF_SIZE);
    if (!b->win || !b->cbuf)
        return fail(b, ERN_ENOMEM, "out of memory");
    memset(b->win, 0, WIN_SIZE);
    /* the window never covers data written elsewhere (stream mode: data precedes) */
    b->win_start = metazone_win(b);    /* (--MZ: nid 0 a block before the records) */
    b->win_hi = b->win_start;
    if (b->sfd >= 0 && fd != b->sfd)
        return fail(b, ERN_EINVAL, "stream mode: write() needs the fd given to set_output");
    uint64_t base = ot_base(b->ot);
    if (b->ot && b->ot->device) {
        if (b->info.image_size > b->ot->limit)
            return fail(b, ERN_ELIMIT, "the image (%llu bytes) does not fit on the device "
                        "(%llu bytes)", (unsigned long long)b->info.image_size,
                        (unsigned long long)b->ot->limit);
    } else if ((b->sfd < 0 && ftruncate(fd, (off_t)base) < 0) ||
               ftruncate(fd, (off_t)(base + b->info.image_size)) < 0) {
        return fail(b, ERN_EIO, "sizing the image: %s", strerror(errno));
    }
    return 0;
}

int erofs_builder_set_target(erofs_builder *b, uint64_t base, uint64_t limit, int device,
                             uint32_t dsunit)
{
    if (b->fd >= 0 || b->sfd >= 0 || b->ot)
        return fail(b, ERN_EINVAL, "set_target must come before set_output and write");
    b->ot = calloc(1, sizeof(*b->ot));
    if (!b->ot)
        return fail(b, ERN_ENOMEM, "out of memory");
    b->ot->base = base;
    b->ot->limit = limit;
    b->ot->device = device;
    b->ot->dsunit = dsunit;
    pthread_mutex_init(&b->ot->mu, NULL);
    return 0;
}

void ot_free(erofs_builder *b)
{
    if (b->ot) {
        pthread_mutex_destroy(&b->ot->mu);
        free(b->ot->w);
        free(b->ot);
        b->ot = NULL;
    }
}

static int range_cmp(const void *a, const void *b)
{
    const struct outrange *x = a, *y = b;
    return x->off < y->off ? -1 : x->off > y->off;
}

/* a device: zeros where the image wrote nothing (a file has them from its truncation),
 * then everything flushed, so that the superblock, written next, is the last write */
static int ot_fill(erofs_builder *b)
{
    struct outtarget *ot = b->ot;
    if (!ot || !ot->device)
        return 0;
    if (ot->oom)
        return fail(b, ERN_ENOMEM, "out of memory");
    qsort(ot->w, ot->nw, sizeof(*ot->w), range_cmp);
    static const uint8_t zeros[65536];
    uint64_t pos = 0, end = b->info.image_size;
    for (size_t i = 0; i <= ot->nw && pos < end; i++) {
        uint64_t next = i < ot->nw ? ot->w[i].off : end;
        if (next > end)
            next = end;
        while (pos < next) {
            size_t n = next - pos > sizeof(zeros) ? sizeof(zeros) : (size_t)(next - pos);
            ssize_t w = pwrite(b->fd, zeros, n, (off_t)(ot->base + pos));
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0)
                return fail(b, ERN_EIO, "writing the image: %s",
                            w < 0 ? strerror(errno) : "short write");
            pos += (uint64_t)w;
            ot->filled += (uint64_t)w;
        }
        if (i < ot->nw && ot->w[i].off + ot->w[i].len > pos)
            pos = ot->w[i].off + ot->w[i].len;
    }
    if (fsync(b->fd) < 0)
        return fail(b, ERN_EIO, "flushing the device: %s", strerror(errno));
    return 0;
}

int erofs_builder_target_filled(erofs_builder *b, uint64_t *bytes)
{
    *bytes = b->ot ? b->ot->filled : 0;
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

/* the shared xattr area: entries back to back in id order (id = offset / 4) */
static int write_shared_xattrs(erofs_builder *b)
{
    uint64_t off = (uint64_t)b->info.xattr_blkaddr * b->blksz;
    for (uint32_t i = 0; i < b->nshared; i++) {
        struct xattr_rec *x = &b->xas[b->shared_order[i]];
        uint32_t sz = xentry_size(x);
        uint8_t e[sizeof(struct erofs_xattr_entry) + 255 + 65535 + 4];
        memset(e, 0, sz);
        struct erofs_xattr_entry eh = {
            .e_name_len = x->name_len, .e_name_index = x->index,
            .e_value_size = cpu_to_le16(x->val_len),
        };
        memcpy(e, &eh, sizeof(eh));
        memcpy(e + sizeof(eh), b->arena + x->name_off, x->name_len);
        memcpy(e + sizeof(eh) + x->name_len, b->arena + x->val_off, x->val_len);
        int r = pwrite_all(b, e, sz, off);
        if (r)
            return r;
        off += sz;
    }
    return 0;
}

static int write_device_table(erofs_builder *b)
{
    for (uint32_t i = 0; i < b->ndevs; i++) {
        struct erofs_deviceslot slot;
        memset(&slot, 0, sizeof(slot));
        memcpy(slot.tag, b->devs[i].tag, sizeof(slot.tag));
        slot.blocks = cpu_to_le32((uint32_t)b->devs[i].blocks);
        slot.blocks_hi = cpu_to_le16((uint16_t)(b->devs[i].blocks >> 32));
        slot.mapped_blkaddr = cpu_to_le32(b->devs[i].mapped);
        uint64_t off = (uint64_t)b->o.devt_slotoff * EROFS_DEVT_SLOT_SIZE +
                       (uint64_t)EROFS_DEVT_SLOT_SIZE * i;
        int r = pwrite_all(b, &slot, sizeof(slot), off);
        if (r)
            return r;
    }
    return 0;
}

/* last: the superblock, its checksum over the block it sits in as written so far */
static int write_superblock(erofs_builder *b)
{
    uint32_t blksz = b->blksz;
    uint8_t blk0[4096 + EROFS_SUPER_OFFSET];
    size_t b0len = blksz > EROFS_SUPER_OFFSET ? blksz : EROFS_SUPER_OFFSET + blksz;
    memset(blk0, 0, sizeof(blk0));
    uint32_t cfgs_len;
    const uint8_t *cfgs = zconf_cfgs(b, &cfgs_len);
    if (cfgs_len) {
        int r = pwrite_all(b, cfgs, cfgs_len, sb_end(b));
        if (r)
            return r;
    }
    if (b->xpfx_count && !b->xpfx_packed) {
        int r = pwrite_all(b, b->xpfx, b->xpfx_len, xpfx_start(b));
        if (r)
            return r;
    }
    int fr = b->o.metabox ? metabox_write(b, pwrite_all) : 0;
    if (fr || (fr = ot_fill(b)))
        return fr;
    ssize_t got = pread(b->fd, blk0, b0len, (off_t)ot_base(b->ot));
    if (got < 0)
        return fail(b, ERN_EIO, "reading back the image: %s", strerror(errno));
    struct erofs_super_block sb;
    memset(&sb, 0, sizeof(sb));
    sb.magic = cpu_to_le32(EROFS_SUPER_MAGIC);
    sb.feature_compat = cpu_to_le32(b->info.feature_compat);
    sb.blkszbits = (uint8_t)b->o.blkszbits;
    sb.sb_extslots = b->o.metabox ? 1 : 0;     /* (-m: the metabox nid's slot) */
    sb.root_nid = cpu_to_le16(b->info.root_nid);
    sb.inos = cpu_to_le64(b->info.inodes);
    sb.build_time = cpu_to_le64(b->info.build_time);
    sb.build_time_nsec = cpu_to_le32(b->info.build_time_nsec);
    if (b->o.sb_48bit) {
        /* the 48-bit layout: the le16 root nid is blocks_hi (0: fewer than 2^32 blocks),
         * the root nid is le64 rootnid_8b (0x70); the epoch (0x18) and le32 build_time
         * (0x6C) from it give the build time */
        int64_t epoch = sb_epoch(b, b->info.build_time);
        uint32_t bt = cpu_to_le32((uint32_t)(b->info.build_time - epoch));
        uint64_t root = cpu_to_le64(b->info.root_nid);
        sb.root_nid = 0;
        sb.build_time = cpu_to_le64(epoch);
        memcpy(sb.reserved2 + 2, &bt, sizeof(bt));
        memcpy(sb.reserved2 + 6, &root, sizeof(root));
    }
    sb.blocks = cpu_to_le32(b->sb_blocks_set ? (uint32_t)b->sb_blocks_val
                            : b->o.sb_blocks ? (uint32_t)b->o.sb_blocks
                                             : (uint32_t)(b->info.image_size / blksz));
    sb.meta_blkaddr = cpu_to_le32(b->info.meta_blkaddr);
    sb.xattr_blkaddr = cpu_to_le32(b->info.xattr_blkaddr);
    memcpy(sb.uuid, b->o.uuid, sizeof(sb.uuid));
    memcpy(sb.volume_name, b->o.volume_name, sizeof(sb.volume_name) - 1);
    sb.feature_incompat = cpu_to_le32(b->info.feature_incompat);
    sb.u1 = cpu_to_le16(zconf_sb_u1(b));
    sb.extra_devices = cpu_to_le16(b->ndevs);
    sb.devt_slotoff = cpu_to_le16(b->o.devt_slotoff);
    if (b->packed_node != NONE32)
        sb.packed_nid = cpu_to_le64(b->nodes[b->packed_node].nid);
    if (b->xpfx_count) {
        sb.xattr_prefix_count = (uint8_t)b->xpfx_count;
        /* (the packed inode's start: offset 0) */
        sb.xattr_prefix_start = b->xpfx_packed ? 0 :
                                cpu_to_le32((uint32_t)(xpfx_start(b) >> 2));
        if (b->xpfx_ishare >= 0)
            sb.ishare_xattr_prefix_id = (uint8_t)b->xpfx_ishare;
    }
    memcpy(blk0 + EROFS_SUPER_OFFSET, &sb, sizeof(sb));
    if (b->o.sb_checksum)
        sb.checksum = cpu_to_le32(erofs_sb_checksum(blk0, b0len));
    return pwrite_all(b, &sb, sizeof(sb), EROFS_SUPER_OFFSET);
}

int erofs_builder_write_end(erofs_builder *b)
{
    if (b->fd < 0 || b->wfailed || b->wpos != b->norder)
        return fail(b, ERN_EINVAL, "write not complete");
    int r = win_flush(b);
    if (r || (b->nshared && (r = write_shared_xattrs(b))) ||
        (b->o.metabox && b->o.compress_alg && (r = metabox_compress(b))))
        return r;
    /* caller's reserved and appended bytes, device table */
    if ((!b->ot || !b->ot->device) &&
        ftruncate(b->fd, (off_t)(ot_base(b->ot) + b->info.image_size)) < 0)
        return fail(b, ERN_EIO, "sizing the image: %s", strerror(errno));
    for (uint32_t i = 0; i < b->nputs; i++)
        if (b->puts[i].data &&
            (r = pwrite_all(b, b->puts[i].data, b->puts[i].len, b->puts[i].off)))
            return r;
    if ((r = write_device_table(b)) || (r = write_superblock(b)))
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

int ern_start_writeback(int fd)
{
#ifdef SYNC_FILE_RANGE_WRITE
    return sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE) ? -errno : 0;
#else
    (void)fd;
    return -ENOSYS;
#endif
}
