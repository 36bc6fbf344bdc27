/* erofs-tools C core, compression in the layout: a compressed inode's compact index or,
 * in the 48-bit layout, its extent records (built once its inode and xattr sizes are known) and where an inode with an inline
 * tail (ztailpacking) may sit.
 *
 * The kernel reads an inline tail as one piece of the block it starts in, so the tail
 * (right after the index) must not cross a block boundary. The index is 8-byte aligned
 * and a tail at most ZTAIL_MAX bytes, so moving the inode on by 32-byte steps always
 * finds a place within the next block.
 *
 * Also a node's own compression settings (--compress-hints), checked against the
 * pool's when its file is submitted (zstream.c).
 */
#include "compress_int.h"

int compact_zindex(erofs_builder *b, struct node *n)
{
    if (b->o.sb_48bit) {
        /* -E48bit: extent records where smaller than the full index (as mkfs.erofs 1.9) */
        uint32_t xl;
        uint8_t *x = zindex_extents(NX(b, n)->zmeta, NX(b, n)->zmeta_len, n->size,
                                    inode_size(n) + n->xattr_isize, b->o.blkszbits, &xl);
        if (!x && xl)
            return fail(b, ERN_ENOMEM, "out of memory");
        if (x) {
            free(NX(b, n)->zmeta);
            NX(b, n)->zmeta = x;
            NX(b, n)->zmeta_len = xl;
            return 0;            /* (COMPRESSED_FULL) */
        }
    }
    if (NX(b, n)->zfull_only || b->o.compress_full_index)
        return 0;
    uint32_t mpos = (uint32_t)align_up(inode_size(n) + n->xattr_isize, 8) +
                    (uint32_t)sizeof(struct z_erofs_map_header);
    uint32_t len;
    uint8_t *c = zindex_compact(NX(b, n)->zmeta, NX(b, n)->zmeta_len, mpos, b->zc->big,
                                &len);
    if (!c)
        return fail(b, ERN_ENOMEM, "out of memory");
    free(NX(b, n)->zmeta);
    NX(b, n)->zmeta = c;
    NX(b, n)->zmeta_len = len;
    n->layout = L_ZCOMPACT;
    return 0;
}

uint64_t ztail_fit(const erofs_builder *b, const struct node *n, uint64_t off,
                   uint32_t blksz)
{
    uint64_t rel = inode_size(n) + n->xattr_isize + zmeta_extra(b, n) - NX(b, n)->ztail_len;
    uint64_t t = off + rel;
    if (t % blksz + NX(b, n)->ztail_len <= blksz)
        return off;
    /* the next tail start in the next block that keeps the inode 32-byte aligned */
    uint64_t t2 = align_up(t, blksz) + rel % EROFS_SLOT_SIZE;
    return t2 - rel;
}

int erofs_node_set_zhint(erofs_builder *b, uint32_t node, uint32_t pcluster_size,
                         uint32_t alg)
{
    if (node >= b->nnodes)
        return fail(b, ERN_EINVAL, "no such node %u", node);
    if (b->laid_out || b->nodes[node].streamed || !b->o.stream_data)
        return fail(b, ERN_EINVAL, "node %u: compression hint after its data (or not "
                    "in stream mode)", node);
    if (alg >= ZALG_MAX || pcluster_size % b->blksz || pcluster_size > Z_EROFS_PCLUSTER_MAX_SIZE)
        return fail(b, ERN_EINVAL, "node %u: bad compression hint (algorithm %u, pcluster "
                    "%u)", node, alg, pcluster_size);
    struct node *n = &b->nodes[node];
    NX(b, n)->zhint = 1;
    NX(b, n)->zalg = (uint8_t)alg;
    NX(b, n)->zps = pcluster_size;
    return 0;
}
