/* erofs-tools C core, metadata compression's metabox (mkfs.erofs 1.9 -m, Linux 6.17+:
 * INCOMPAT_METABOX), the plain form.
 *
 * The superblock grows by one 16-byte extension slot (sb_extslots 1) whose le64 at 0x80
 * is the metabox inode's nid. That inode is a regular file whose data hold every other
 * inode record (with its xattrs, inline tail, chunk indexes); an inode there has a nid
 * with bit 63 set, the rest of it counting 32-byte slots from the start of that data.
 * Directory blocks and file data stay in the image; so does the shared xattr area (no
 * COMPAT_SHARED_EA_IN_METABOX). The root's nid has bit 63 too, so the superblock is the
 * 48-bit layout's (rootnid_8b), as mkfs.erofs 1.9.4 writes it.
 *
 * Here the layout places the inode area as ever (inline tails inside one block, as the
 * kernel reads them through the metabox's page cache), from a block boundary after the
 * metabox inode's record (compact, 32 bytes, right after the superblock area in block
 * 0, nid counted from byte 0: meta_blkaddr 0), and the metabox inode's data is that
 * area, block aligned, stored plain (FLAT_PLAIN) where it lies: the records are written
 * by the write phase at their place as usual.
 *
 * With -z (stream mode) the metabox is compressed with the first -z algorithm in
 * pclusters of -m's size, as mkfs.erofs 1.9.4 does by default: the inode area is laid
 * out last (the shared xattr area before it), written as above, then read back,
 * compressed like a file (no inline tail, fragment or dedupe) and its pclusters written
 * over it from its first block; the metabox's record (a COMPRESSED_FULL inode and its
 * full lcluster index) is in block 0 after the superblock area when it fits there,
 * else after them (it may span blocks), its nid counted from byte 0. A metabox that compression would not shrink stays plain.
 */
#include "compress_int.h"

uint64_t metabox_rec_off(const erofs_builder *b)
{
    return align_up(sb_area_end(b), EROFS_SLOT_SIZE);
}

/* the inode area's start outside stream mode: the block after the metabox's record */
uint64_t metabox_meta_start(const erofs_builder *b)
{
    return align_up(metabox_rec_off(b) + sizeof(struct erofs_inode_compact), b->blksz);
}

/* the inode area [meta_start, meta_end) is the metabox's data */
int metabox_laid_out(erofs_builder *b, uint64_t meta_start, uint64_t meta_end)
{
    uint32_t bs = b->blksz;
    if (!b->o.sb_48bit)
        return fail(b, ERN_EINVAL, "the metabox needs the 48-bit layout (sb_48bit)");
    if (b->o.metabox % bs)
        return fail(b, ERN_EINVAL, "metabox pcluster size not a multiple of the block size");
    b->mbox_rec = metabox_rec_off(b);
    if (!b->o.compress_alg && metabox_rec_off(b) + sizeof(struct erofs_inode_compact) > align_up(SB_END, bs) ||
        meta_start % bs || meta_start < align_up(SB_END, bs))
        return fail(b, ERN_EINVAL, "no room for the metabox inode after the superblock");
    b->mbox_blk = meta_start / bs;
    b->mbox_size = align_up(meta_end, bs) - meta_start;
    if (b->mbox_size > 0xFFFFFFFFull)
        return fail(b, ERN_ELIMIT, "metabox larger than 4 GiB");
    return 0;
}

/* the metabox inode's record and the superblock's slot naming it (before the
 * superblock's checksum is taken over block 0) */
int metabox_write(erofs_builder *b, int (*pw)(erofs_builder *, const void *, size_t, uint64_t))
{
    struct erofs_inode_compact c;
    memset(&c, 0, sizeof(c));
    c.i_format = cpu_to_le16(EROFS_I_FORMAT(EROFS_INODE_COMPACT, L_PLAIN));
    c.i_mode = cpu_to_le16(S_IFREG | 0644);
    c.i_nlink = cpu_to_le16(1);
    c.i_size = cpu_to_le32((uint32_t)b->mbox_size);
    /* its mtime: the build time (counted from the 48-bit layout's epoch) */
    c.i_mtime = cpu_to_le32((uint32_t)(b->info.build_time - sb_epoch(b, b->info.build_time)));
    c.i_u = cpu_to_le32((uint32_t)b->mbox_blk);
    c.i_ino = cpu_to_le32((uint32_t)b->info.inodes);    /* (counted last) */
    uint64_t nid = cpu_to_le64(b->mbox_rec / EROFS_SLOT_SIZE);
    int r = b->o.compress_alg ? 0 : pw(b, &c, sizeof(c), b->mbox_rec);  /* (else written) */
    return r ? r : pw(b, &nid, sizeof(nid), EROFS_SUPER_OFFSET + EROFS_SB_METABOX_NID_OFFSET);
}

uint64_t metabox_area(erofs_builder *b, uint32_t shared_bytes, uint64_t *blk, uint32_t *xblk)
{
    uint32_t bs = b->blksz;
    if (!b->o.metabox || !b->o.compress_alg)
        return *blk;
    /* (mkfs --tar=i,MAPFILE: the data region, before what is compressed in place) */
    b->gap_blk = *blk;
    *blk += b->gap_blocks;
    if (shared_bytes) {
        *xblk = (uint32_t)*blk;
        *blk += (shared_bytes + bs - 1) / bs;
    }
    if (b->packed_node != NONE32) {
        /* -Efragments: the packed inode's record stays in the image (its nid without
         * bit 63, as mkfs.erofs 1.9.4 keeps it), in blocks of its own before the
         * inode area (place_inodes skips it) */
        struct node *n = &b->nodes[b->packed_node];
        int may_cross;
        uint64_t len = mpack_record_len(b, n, &may_cross);
        uint64_t off = *blk * bs;
        if (NXR(b, n)->ztail_len)
            off = ztail_fit(b, n, off, bs);
        n->meta_off = off;
        n->nid = off / EROFS_SLOT_SIZE;
        *blk = (off + len + bs - 1) / bs;
    }
    return *blk;
}

/* --zD with -z: the packed inode (the directories, compressed) is laid out once the
 * records are placed (their nids in its dirents), after them; but the compressed
 * metabox ends the image (metabox_compress), so there its data and record (in the
 * image, a block of its own: zdir_place_packed) go where the inode area began and the
 * inode area moves after them by whole blocks: its nids count from its start, its
 * inline tails and indexes keep their place in their blocks. -> the block to pack from */
uint64_t metabox_late_blk(const erofs_builder *b, uint64_t blk, uint64_t meta_start)
{
    return b->o.metabox && b->o.compress_alg ? meta_start / b->blksz : blk;
}

void metabox_after_packed(erofs_builder *b, uint64_t pblk, uint64_t *meta_start,
                          uint64_t *meta_end, uint64_t *blk)
{
    if (!(b->o.metabox && b->o.compress_alg)) {
        *blk = pblk;
        return;
    }
    uint64_t delta = pblk * b->blksz - *meta_start;
    for (uint32_t i = 0; i < b->norder; i++) {
        struct node *n = &b->nodes[b->order[i]];
        if (b->order[i] != b->packed_node && n->nid >> EROFS_DIRENT_NID_METABOX_BIT)
            n->meta_off += delta;
    }
    *meta_start += delta;
    *meta_end += delta;
    *blk += delta / b->blksz;
}

static int mbox_pwrite(erofs_builder *b, struct xfer *x, const void *buf, size_t len,
                       uint64_t off)
{
    int r = x_pwrite(x, buf, len, off);
    return r ? fail(b, r, "%s", x->err) : 0;
}

int metabox_compress(erofs_builder *b)
{
    uint32_t bs = b->blksz;
    if (b->o.metabox_alg >= b->zc[0].nalgs)
        return fail(b, ERN_EINVAL, "metabox algorithm %u not in the -z list",
                    b->o.metabox_alg);
    struct zconf mz = b->zc[b->o.metabox_alg];
    mz.big = b->zc[0].big;          /* (image-wide) */
    mz.pclustersize = b->o.metabox;
    mz.pclusterblks = b->o.metabox / bs;
    mz.ztail = mz.frags = mz.allfrags = mz.dedupe = mz.roll = 0;
    mz.max_ext = 0;
    if (mz.pclusterblks > 1 && !mz.big)
        return fail(b, ERN_EINVAL, "metabox pcluster size over the largest pcluster (-C)");
    struct xfer x;
    uint64_t dummy = 0;
    stream_xfer(b, &x, &dummy);
    x.out = b->fd;
    struct zctx c;
    struct zfile zf;
    memset(&zf, 0, sizeof(zf));
    uint8_t *idx = NULL;
    int r = zctx_init(&c, &mz);
    if (r || !x.buf) {
        r = r ? fail(b, r, "%s", c.err) : fail(b, ERN_ENOMEM, "out of memory");
        goto out;
    }
    uint64_t start = b->mbox_blk * bs, end = start + b->mbox_size;
    r = zfile_compress(&c, &x, b->fd, "metabox", ot_base(b->ot) + start, b->mbox_size, 0,
                       b->mbox_size, &zf, NULL, NULL);
    if (r) {
        r = fail(b, r, "metabox: %s", x.err[0] ? x.err : c.err);
        goto out;
    }
    struct erofs_inode_compact ci;
    memset(&ci, 0, sizeof(ci));
    uint32_t ilen = 0;
    if (!zf.plain) {
        for (uint32_t i = 0; i < zf.next; i++)
            zf.ext[i].blk = (uint32_t)(b->mbox_blk + zf.ext[i].pblk);
        idx = zfile_index(&zf, &mz, b->o.blkszbits, &ilen);
        /* as a file's (compact_zindex; -m is the 48-bit layout): extent records where
         * smaller than the full index (512-byte blocks), else the compact index, as
         * mkfs.erofs 1.9.4 writes its metabox's */
        uint32_t xl = 0, layout = L_ZFULL;
        uint8_t *alt = idx ? zindex_extents(idx, ilen, b->mbox_size, sizeof(ci),
                                            b->o.blkszbits, &xl) : NULL;
        if (idx && !alt && !xl) {
            alt = zindex_compact(idx, ilen, (uint32_t)(sizeof(ci) +
                                 sizeof(struct z_erofs_map_header)), mz.big, &xl);
            layout = L_ZCOMPACT;
        }
        if (alt) {
            free(idx);
            idx = alt;
            ilen = xl;
        }
        if (!idx || !alt) {
            r = fail(b, ERN_ENOMEM, "out of memory");
            goto out;
        }
        if ((r = mbox_pwrite(b, &x, zf.data, (size_t)zf.dlen, start)))
            goto out;
        end = start + (uint64_t)zf.nblocks * bs;
        ci.i_format = cpu_to_le16(EROFS_I_FORMAT(EROFS_INODE_COMPACT, layout));
        ci.i_u = cpu_to_le32(zf.nblocks);
    } else {
        ci.i_format = cpu_to_le16(EROFS_I_FORMAT(EROFS_INODE_COMPACT, L_PLAIN));
        ci.i_u = cpu_to_le32((uint32_t)b->mbox_blk);
    }
    ci.i_mode = cpu_to_le16(S_IFREG | 0644);
    ci.i_nlink = cpu_to_le16(1);
    ci.i_size = cpu_to_le32((uint32_t)b->mbox_size);
    ci.i_mtime = cpu_to_le32((uint32_t)(b->info.build_time - sb_epoch(b, b->info.build_time)));
    ci.i_ino = cpu_to_le32((uint32_t)b->info.inodes);
    /* the record: in block 0 after the superblock area when it fits before the first
     * data block (as mkfs.erofs 1.9.4 puts it), else after the pclusters */
    b->mbox_rec = metabox_rec_off(b);
    if (b->mbox_rec + sizeof(ci) + ilen > align_up(sb_area_end(b), bs))
        b->mbox_rec = align_up(end, EROFS_SLOT_SIZE);
    if ((r = mbox_pwrite(b, &x, &ci, sizeof(ci), b->mbox_rec)) ||
        (ilen && (r = mbox_pwrite(b, &x, idx, ilen, b->mbox_rec + sizeof(ci)))))
        goto out;
    uint64_t old_blocks = b->info.image_size / bs;
    b->info.image_size = align_up(end > b->mbox_rec ? end : b->mbox_rec + sizeof(ci) + ilen, bs);
    /* a device mapped right after the image (the --tar=i tar, the --blobdev blob) still
     * follows its end, so that the image and the device appended are one address space */
    for (uint32_t i = 0; i < b->ndevs; i++)
        if (b->devs[i].mapped == old_blocks)
            b->devs[i].mapped = (uint32_t)(b->info.image_size / bs);
out:
    free(idx);
    zfile_free(&zf);
    zctx_fini(&c);
    free(x.buf);
    return r;
}

int erofs_builder_set_gap(erofs_builder *b, uint64_t blocks)
{
    int r = check_mutable(b);
    if (r)
        return r;
    if (blocks >> 32)
        return fail(b, ERN_ELIMIT, "gap of %llu blocks", (unsigned long long)blocks);
    b->gap_blocks = blocks;
    return 0;
}

int64_t erofs_builder_gap_blk(erofs_builder *b)
{
    if (!b->laid_out || !b->o.metabox || !b->o.compress_alg)
        return fail(b, ERN_EINVAL, "gap_blk: after layout, with a compressed metabox");
    return (int64_t)b->gap_blk;
}
