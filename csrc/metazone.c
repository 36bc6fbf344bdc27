/* erofs-tools C core: the data blocks of directories, symlinks and files not streamed
 * (alloc_flat_data, a layout phase), and mkfs --MZ's metadata zone (mkfs.erofs 1.9.4).
 *
 * The zone is no on-disk structure: mkfs.erofs 1.9.4 builds the inode records (with
 * 'd' the directories' blocks too) in a buffer of their own and copies it after
 * everything else, the root's record first; nids count from meta_blkaddr, the block
 * before the zone, so that the root's is blksz / 32, never 0. The kernel reads such an
 * image as any other (an inode at meta_blkaddr * blksz + nid * 32).
 *
 * Here: with ERN_MZ_INODES the inode area follows all the data (streamed or not: in
 * stream mode it does already; --tar=i's index lays the directories' and symlinks' blocks
 * out first, then the records), its nid 0 a block before it (first_nid blksz / 32: the
 * root's record at the zone's start; no records among the data, smeta.c, nor the root
 * in block 0 after the superblock). With ERN_MZ_DIRS too, the directories' blocks follow
 * the records in the zone (mkfs.erofs 1.9.4: among them, in the order it met them; the
 * records first keep the root's nid small). The shared xattr area and --zD's packed
 * inode come after these, as after the records without --MZ.
 *
 * With the metabox (-m) every record is in the metabox inode's data, which already
 * follows the data; ERN_MZ_INODES changes nothing more (mkfs.erofs 1.9.4 puts the
 * metabox inode's own record in its zone, a block of its own: here it stays in block 0
 * after the superblock), ERN_MZ_DIRS puts the directories' blocks right before the
 * metabox's data (its end moves when compressed in place: metabox_compress; mkfs.erofs
 * 1.9.4's own images of -m with 'd' fail its fsck and the kernel: the directories'
 * entries point at zeros).
 */
#include "builder_int.h"

int erofs_builder_set_metazone(erofs_builder *b, uint32_t flags)
{
    int r = check_mutable(b);
    if (r)
        return r;
    if (flags & ~(uint32_t)(ERN_MZ_INODES | ERN_MZ_DIRS) || flags == ERN_MZ_DIRS)
        return fail(b, ERN_EINVAL, "metazone flags %u: directory data needs the inodes", flags);
    if (b->nnodes || b->o.first_nid || b->o.meta_blkaddr)
        return fail(b, ERN_EINVAL, "metazone: before the first node, without first_nid");
    b->o.metazone = flags;
    if (flags && !b->o.metabox)
        b->o.first_nid = b->blksz / EROFS_SLOT_SIZE;    /* (smeta_dir: off) */
    return 0;
}

/* the inode area starts at byte `zone` -> the offset of nid 0 */
uint64_t metazone_nid0(const erofs_builder *b, uint64_t zone)
{
    return b->o.metazone && !b->o.metabox ? zone - b->blksz : zone;
}

/* where the write phase's metadata window starts: the inode area (its nid 0's block
 * holds data with --MZ) */
uint64_t metazone_win(const erofs_builder *b)
{
    return b->info.meta_start + (b->o.metazone && !b->o.metabox ? b->blksz : 0);
}

/* not stream mode (--tar=i's index): the data first, from the first block after the
 * superblock area (and the metabox's record), then the zone */
int metazone_first(erofs_builder *b, uint64_t *blk, uint64_t *data_start,
                   uint64_t *meta_start)
{
    if (b->nputs)
        return fail(b, ERN_EINVAL, "metazone: no reserved bytes before the data");
    *data_start = b->o.metabox ? metabox_meta_start(b) : align_up(sb_area_end(b), b->blksz);
    *blk = *data_start / b->blksz;
    int r = alloc_flat_data(b, blk);
    *meta_start = metazone_nid0(b, *blk * b->blksz);
    return r;
}

/* which: 0 every node, 1 all but directories, 2 directories only */
static int alloc_flat(erofs_builder *b, uint64_t *pblk, int which)
{
    uint32_t blksz = b->blksz;
    uint64_t blk = *pblk;
    for (uint32_t oi = 0; oi < b->norder; oi++) {
        struct node *n = &b->nodes[b->order[oi]];
        if (n->streamed || NXR(b, n)->sdir || (which && (which == 2) != S_ISDIR(n->mode)))
            continue;
        if (n->layout == L_CHUNK) {
            if (n->dkind == D_SPARSE) {
                blk = place_sparse_chunks(b, &b->chunks[n->aux], n->size, blk);
                if (blk > 0xFFFFFFFFull)
                    return fail(b, ERN_ELIMIT, "image larger than 2^32 blocks");
            }
            continue;
        }
        if (!is_flat_data(n) || n->layout == L_ZFULL)
            continue;           /* (--zD: directories in the packed inode) */
        uint64_t nblk = n->layout == L_INLINE ? n->size / blksz : (n->size + blksz - 1) / blksz;
        if (nblk) {
            n->startblk = (uint32_t)blk;
            blk += nblk;
        } else {
            n->startblk = n->layout == L_INLINE ? EROFS_NULL_ADDR : 0;
        }
        if (blk > 0xFFFFFFFFull)
            return fail(b, ERN_ELIMIT, "image larger than 2^32 blocks");
    }
    *pblk = blk;
    return 0;
}

/* data blocks of directories, symlinks and files not streamed, in nid order (--MZ=id:
 * but the directories', in the zone after the records, metazone_dirs; with the metabox
 * the last of them) */
int alloc_flat_data(erofs_builder *b, uint64_t *pblk)
{
    if (!(b->o.metazone & ERN_MZ_DIRS))
        return alloc_flat(b, pblk, 0);
    int r = alloc_flat(b, pblk, 1);
    return r || !b->o.metabox ? r : alloc_flat(b, pblk, 2);
}

/* --MZ=id without the metabox: the directories' blocks from *pos (the block after the
 * records) on -> *pos after them */
int metazone_dirs(erofs_builder *b, uint64_t *pos)
{
    if (!(b->o.metazone & ERN_MZ_DIRS) || b->o.metabox)
        return 0;
    uint64_t blk = *pos / b->blksz;
    int r = alloc_flat(b, &blk, 2);
    *pos = blk * b->blksz;
    return r;
}
