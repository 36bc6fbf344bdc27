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
 */
#include "builder_int.h"

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
    if (metabox_rec_off(b) + sizeof(struct erofs_inode_compact) > align_up(SB_END, bs) ||
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
    uint64_t off = metabox_rec_off(b);
    uint64_t nid = cpu_to_le64(off / EROFS_SLOT_SIZE);
    int r = pw(b, &c, sizeof(c), off);
    return r ? r : pw(b, &nid, sizeof(nid), EROFS_SUPER_OFFSET + EROFS_SB_METABOX_NID_OFFSET);
}
