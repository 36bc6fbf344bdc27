/* erofs-tools C core, directories: names in on-disk order and directory blocks.
 *
 * A directory's entries are sorted bytewise by name with '.' and '..' merged in; each
 * block holds as many (struct erofs_dirent + name) as fit, the dirents first and then
 * the names they point to. layout.c sizes directories with dir_pack(), write.c fills
 * their blocks with it.
 */
#include "builder_int.h"

/* bytewise name order (a prefix sorts first) */
int namecmp(const uint8_t *a, size_t al, const uint8_t *b2, size_t bl)
{
    int c = memcmp(a, b2, al < bl ? al : bl);
    if (c)
        return c;
    return al < bl ? -1 : al > bl;
}

static uint8_t ftype_of(uint32_t mode)
{
    switch (mode & S_IFMT) {
    case S_IFREG: return EROFS_FT_REG_FILE;
    case S_IFDIR: return EROFS_FT_DIR;
    case S_IFCHR: return EROFS_FT_CHRDEV;
    case S_IFBLK: return EROFS_FT_BLKDEV;
    case S_IFIFO: return EROFS_FT_FIFO;
    case S_IFSOCK: return EROFS_FT_SOCK;
    case S_IFLNK: return EROFS_FT_SYMLINK;
    }
    return EROFS_FT_UNKNOWN;
}

/* Walk the directory entries of d in on-disk order ('.' and '..' merged in) and
 * return the directory size; when out != NULL also fill dirent blocks (size rounded up
 * to blocks, zeroed by the caller). A block holds as many (dirent + name) as fit, the
 * dirents first, then the names they point to. */
uint64_t dir_pack(erofs_builder *b, struct node *d, uint8_t *out)
{
    const uint32_t desz = (uint32_t)sizeof(struct erofs_dirent);
    uint32_t blksz = b->blksz;
    uint64_t blk_start = 0;
    uint32_t used = 0, nent = 0;
    uint64_t size = 0;
    uint32_t total = d->de_count + 2 - (b->o.dot_omitted != 0);
    uint32_t i = 0;          /* position in the merged sequence */
    static const uint8_t dot[2] = {'.', '.'};
    uint32_t ci = 0; int dot_done = b->o.dot_omitted != 0, dotdot_done = 0;
    /* per block: count what fits, then emit it from a saved cursor */
    while (i < total) {
        uint32_t save_ci = ci; int save_dot = dot_done, save_dd = dotdot_done;
        used = 0; nent = 0;
        uint32_t j = i;
        uint32_t c2 = ci; int d2 = dot_done, dd2 = dotdot_done;
        while (j < total) {
            uint32_t nl;
            int which; /* 0 dot, 1 dotdot, 2 child */
            const struct dirent_rec *de = c2 < d->de_count ? &b->des[d->de_first + c2] : NULL;
            if (!d2 && (!de || namecmp(dot, 1, b->arena + de->name_off, de->name_len) < 0)) {
                nl = 1; which = 0;
            } else if (!dd2 && (!de || namecmp(dot, 2, b->arena + de->name_off, de->name_len) < 0)) {
                nl = 2; which = 1;
            } else {
                nl = de->name_len; which = 2;
            }
            if (used + desz + nl > blksz)
                break;
            used += desz + nl;
            nent++;
            if (which == 0) d2 = 1; else if (which == 1) dd2 = 1; else c2++;
            j++;
        }
        if (out) {
            uint8_t *blk = out + blk_start;
            uint32_t nameoff = desz * nent;
            ci = save_ci; dot_done = save_dot; dotdot_done = save_dd;
            for (uint32_t k = 0; k < nent; k++) {
                const uint8_t *nm; uint32_t nl; uint64_t nid; uint8_t ft;
                const struct dirent_rec *de = ci < d->de_count ? &b->des[d->de_first + ci] : NULL;
                if (!dot_done && (!de || namecmp(dot, 1, b->arena + de->name_off, de->name_len) < 0)) {
                    nm = dot; nl = 1; nid = d->nid; ft = EROFS_FT_DIR; dot_done = 1;
                } else if (!dotdot_done && (!de || namecmp(dot, 2, b->arena + de->name_off, de->name_len) < 0)) {
                    struct node *p = d->parent == NONE32 ? d : &b->nodes[d->parent];
                    nm = dot; nl = 2; nid = p->nid; ft = EROFS_FT_DIR; dotdot_done = 1;
                } else {
                    struct node *c = &b->nodes[de->child];
                    nm = b->arena + de->name_off; nl = de->name_len; nid = c->nid;
                    ft = ftype_of(c->mode); ci++;
                }
                struct erofs_dirent e = {
                    .nid = cpu_to_le64(nid), .nameoff = cpu_to_le16(nameoff), .file_type = ft,
                };
                memcpy(blk + desz * k, &e, desz);
                memcpy(blk + nameoff, nm, nl);
                nameoff += nl;
            }
        }
        ci = c2; dot_done = d2; dotdot_done = dd2;
        i = j;
        size = blk_start + used;
        blk_start += blksz;
    }
    return size;
}
