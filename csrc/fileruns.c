/* erofs-tools C core: the data runs of a bootstrap's regular files, for the daemon's
 * file-aware readahead (fscache_daemon/storage/image.py file_runs). Walked in Python
 * through the reader (an Inode object and a record decode per entry, a ChunkRef per
 * chunk) it took ~1 s of CPU for the 50,000 files of the ML cold start's image, holding
 * the GIL right while the container's start was reading; here one pass over the
 * image's bytes, the GIL released (cffi), in a few milliseconds.
 *
 * The walk is the reader's (erofs_tools/reader/image.py Image.walk): directories depth
 * first, each directory's entries in stored order, its subdirectories after it in that
 * order; a regular file counted once (its first link). Every byte is untrusted, and
 * anything the reader would refuse in the tree (a bad inode, dirent, '.' or '..', a
 * directory linked twice) makes this return -1: the caller then takes the reader's
 * walk, which skips what it refuses. A regular file whose data does not map (as the
 * reader's map_data would raise) has no runs, as in the reader's walk.
 *
 * Output: the paths of the regular files with at least one run, in walk order, each
 * ended by a NUL (absolute, bytes; a name holds no NUL); then the runs, 24 bytes each:
 * u32 file (its number in that list), u32 blob index (device - 1), u64 start, u64 end
 * (uncompressed offsets in the blob), little endian. The Python side turns each part
 * into its objects with one call (bytes.split, struct.iter_unpack).
 */
#include <stdlib.h>
#include <string.h>

#include "erofs_native.h"

#define SLOT 32u
#define NULLADDR 0xFFFFFFFFu
#define MAXCHUNKBITS 48u
#define S_FMT 0170000u
#define S_REG 0100000u
#define S_DIR 0040000u
#define S_LNK 0120000u

static uint16_t ld16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

struct img {
    const uint8_t *d;
    uint64_t size, meta_off, bs, maxnid;
    uint32_t bits, devmask, ndev;
};

struct ino {
    uint64_t nid, size, data_end;
    uint32_t i_u, mode;
    unsigned layout;
};

/* reader/image.py _read_inode's checks; -1 where it raises */
static int read_inode(const struct img *im, uint64_t nid, struct ino *o)
{
    if (nid > im->maxnid)
        return -1;
    uint64_t off = im->meta_off + nid * SLOT;
    if (off + 32 > im->size)
        return -1;
    const uint8_t *p = im->d + off;
    uint16_t fmt = ld16(p);
    if (fmt & ~0xFu)
        return -1;
    uint64_t isize = 32;
    if (fmt & 1) {
        if (off + 64 > im->size)
            return -1;
        isize = 64;
        o->size = ld64(p + 8);
    } else {
        o->size = ld32(p + 8);
    }
    uint16_t icount = ld16(p + 2);
    o->mode = ld16(p + 4);
    o->i_u = ld32(p + 16);
    o->layout = (fmt >> 1) & 7u;
    o->nid = nid;
    switch (o->mode & S_FMT) {
    case S_REG: case S_DIR: case S_LNK: case 0020000u: case 0060000u: case 0010000u:
    case 0140000u:
        break;
    default:
        return -1;
    }
    if (o->layout > 4)
        return -1;
    o->data_end = off + isize + (icount ? 12u + 4u * ((uint64_t)icount - 1) : 0);
    if (o->data_end > im->size)
        return -1;
    uint32_t t = o->mode & S_FMT;
    if ((t == S_REG || t == S_DIR || t == S_LNK) && o->size >= (1ull << 63))
        return -1;
    return 0;
}

struct buf {
    uint8_t *p;
    uint64_t len, cap;
};

static int reserve(struct buf *b, uint64_t n)
{
    if (b->len + n > b->cap) {
        uint64_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n)
            cap *= 2;
        uint8_t *q = realloc(b->p, cap);
        if (!q)
            return -1;
        b->p = q;
        b->cap = cap;
    }
    return 0;
}

static int put(struct buf *b, const void *src, uint64_t n)
{
    if (reserve(b, n))
        return -1;
    memcpy(b->p + b->len, src, n);
    b->len += n;
    return 0;
}

/* The directory's bytes: the reader's read_data of a flat (plain or inline) inode; -1
 * for anything else (the reader's walk decides) */
static int dir_data(const struct img *im, const struct ino *o, const uint8_t **full,
                    uint64_t *nfull, const uint8_t **tail, uint64_t *ntail)
{
    uint64_t size = o->size, bs = im->bs;
    if (size > im->size)
        return -1;
    *full = *tail = NULL;
    *nfull = *ntail = 0;
    if (o->layout == 0) {               /* flat plain */
        if (size == 0)
            return 0;
        if (o->i_u == NULLADDR || (uint64_t)o->i_u * bs + size > im->size)
            return -1;
        *full = im->d + (uint64_t)o->i_u * bs;
        *nfull = size;
        return 0;
    }
    if (o->layout != 2)
        return -1;
    if (size == 0)
        return 0;
    uint64_t nblocks = (size + bs - 1) / bs, fullsz = (nblocks - 1) * bs, t = size - fullsz;
    if (fullsz) {
        if (o->i_u == NULLADDR || (uint64_t)o->i_u * bs + fullsz > im->size)
            return -1;
        *full = im->d + (uint64_t)o->i_u * bs;
        *nfull = fullsz;
    }
    if (o->data_end % bs + t > bs || o->data_end + t > im->size)
        return -1;
    *tail = im->d + o->data_end;
    *ntail = t;
    return 0;
}

struct ent {
    uint64_t nid;
    const uint8_t *name;
    uint32_t len;
};

/* The entries of one directory block (reader/image.py dirents' checks) appended */
static int block_ents(const uint8_t *blk, uint64_t used, uint64_t bs, struct buf *ents)
{
    if (used < 12)
        return -1;
    uint64_t n0 = ld16(blk + 8);
    if (n0 < 12 || n0 >= bs || n0 % 12 || n0 > used)
        return -1;
    uint64_t count = n0 / 12;
    for (uint64_t i = 0; i < count; i++) {
        uint64_t start = ld16(blk + 12 * i + 8), end;
        if (i + 1 < count) {
            end = ld16(blk + 12 * (i + 1) + 8);
        } else {
            end = used;
            if (start < used) {
                const uint8_t *nul = memchr(blk + start, 0, used - start);
                if (nul)
                    end = (uint64_t)(nul - blk);
            }
        }
        if (start < n0 || end > used || end <= start || end - start > 255)
            return -1;
        if (memchr(blk + start, '/', end - start) || memchr(blk + start, 0, end - start))
            return -1;
        struct ent e = {ld64(blk + 12 * i), blk + start, (uint32_t)(end - start)};
        if (put(ents, &e, sizeof(e)))
            return -3;
    }
    return 0;
}

static int dir_ents(const struct img *im, const struct ino *o, struct buf *ents)
{
    const uint8_t *full, *tail;
    uint64_t nfull, ntail;
    ents->len = 0;
    if (dir_data(im, o, &full, &nfull, &tail, &ntail))
        return -1;
    uint64_t bs = im->bs;
    for (uint64_t b = 0; b < nfull; b += bs) {
        int r = block_ents(full + b, nfull - b < bs ? nfull - b : bs, bs, ents);
        if (r)
            return r;
    }
    if (ntail) {
        int r = block_ents(tail, ntail, bs, ents);
        if (r)
            return r;
    }
    return 0;
}

/* A regular file's runs appended to out (as map_data's extents merged by file_runs);
 * nothing when its data does not map */
static int put_run(struct buf *runs, uint32_t file, uint32_t b, uint64_t s, uint64_t e)
{
    uint8_t r[24];
    memcpy(r, &file, 4); memcpy(r + 4, &b, 4); memcpy(r + 8, &s, 8); memcpy(r + 16, &e, 8);
    return put(runs, r, 24);
}

/* A regular file's runs appended to runs (map_data's extents merged as file_runs
 * merges them), as file number `file`; *any set if there was one. Nothing when its
 * data does not map (the reader's map_data would raise). */
static int file_runs_of(const struct img *im, const struct ino *o, uint32_t file,
                        struct buf *runs, int *any)
{
    *any = 0;
    if (o->layout != 4 || o->size == 0)
        return 0;
    uint32_t fmt = o->i_u & 0xFFFFu;
    if (fmt & ~0x3Fu)
        return 0;
    uint32_t bits = im->bits + (fmt & 0x1Fu);
    if (bits > MAXCHUNKBITS)
        return 0;
    uint64_t csize = 1ull << bits, count = (o->size + csize - 1) >> bits;
    uint64_t unit = (fmt & 0x20u) ? 8 : 4;
    uint64_t start = (o->data_end + unit - 1) / unit * unit;
    if (start > im->size || count > (im->size - start) / unit)
        return 0;
    const uint8_t *idx = im->d + start;
    uint64_t mark = runs->len;
    uint32_t cb = 0;
    uint64_t cs = 0, ce = 0;
    int have = 0;
    for (uint64_t k = 0; k < count; k++) {
        uint64_t fo = k << bits, len = o->size - fo < csize ? o->size - fo : csize;
        uint32_t dev, blk;
        if (unit == 8) {
            dev = ld16(idx + 8 * k + 2) & im->devmask;
            blk = ld32(idx + 8 * k + 4);
        } else {
            dev = 0;
            blk = ld32(idx + 4 * k);
        }
        if (blk == NULLADDR)
            continue;
        uint64_t base = (uint64_t)blk * im->bs;
        if (dev > im->ndev || (dev == 0 && base + len > im->size)) {
            runs->len = mark;           /* the whole file is skipped */
            return 0;
        }
        if (dev == 0)
            continue;
        if (have && cb == dev - 1 && ce == base) {
            ce = base + len;
            continue;
        }
        if (have && put_run(runs, file, cb, cs, ce))
            return -3;
        have = 1;
        cb = dev - 1;
        cs = base;
        ce = base + len;
    }
    if (have && put_run(runs, file, cb, cs, ce))
        return -3;
    *any = have;
    return 0;
}

struct frame {
    uint64_t nid, parent, path_off;
    uint32_t path_len;
};

int64_t ern_file_runs(const uint8_t *image, uint64_t size, uint64_t meta_off,
                      uint32_t blkszbits, uint64_t root_nid, uint32_t devmask,
                      uint32_t ndevices, uint64_t max_inodes, uint8_t **out,
                      uint64_t *paths_len)
{
    *out = NULL;
    if (blkszbits < 9 || blkszbits > 16 || meta_off > size)
        return -1;
    struct img im = {image, size, meta_off, 1ull << blkszbits, (size - meta_off) / SLOT,
                     blkszbits, devmask, ndevices};
    /* The directories' paths stay in `paths` for the whole walk: a deep chain of
     * directories costs the sum of their path lengths, quadratic in the depth (1.1 MB
     * image, 12,000 levels: 138 MiB). Past this budget the reader's walk, which holds
     * only the pending directories' paths, takes the image (-1). */
    uint64_t path_budget = 16 * size + (16u << 20);
    uint64_t nbits = im.maxnid + 1;
    uint8_t *dirseen = calloc(nbits / 8 + 1, 1), *regseen = calloc(nbits / 8 + 1, 1);
    struct buf res = {0}, ents = {0}, runs = {0}, paths = {0}, stack = {0}, subs = {0};
    int64_t rc = -1;
    uint64_t nseen = 0;
    uint32_t nfiles = 0;
    if (!dirseen || !regseen) {
        rc = -3;
        goto done;
    }
    struct ino root, o;
    if (read_inode(&im, root_nid, &root) || (root.mode & S_FMT) != S_DIR)
        goto done;
    if (nseen >= max_inodes)
        goto ok;
    dirseen[root_nid / 8] |= (uint8_t)(1u << (root_nid % 8));
    struct frame f0 = {root_nid, root_nid, 0, 1};
    if (put(&paths, "/", 1) || put(&stack, &f0, sizeof(f0))) {
        rc = -3;
        goto done;
    }
    while (stack.len) {
        struct frame f;
        stack.len -= sizeof(f);
        memcpy(&f, stack.p + stack.len, sizeof(f));
        struct ino d;
        if (read_inode(&im, f.nid, &d))
            goto done;
        int r = dir_ents(&im, &d, &ents);
        if (r) {
            rc = r == -3 ? -3 : -1;
            goto done;
        }
        const struct ent *e = (const struct ent *)ents.p;
        uint64_t ne = ents.len / sizeof(struct ent), ndot = 0, ndotdot = 0;
        for (uint64_t i = 0; i < ne; i++) {
            if (e[i].len == 1 && e[i].name[0] == '.') {
                if (e[i].nid != f.nid)
                    goto done;
                ndot++;
            } else if (e[i].len == 2 && e[i].name[0] == '.' && e[i].name[1] == '.') {
                if (e[i].nid != f.parent)
                    goto done;
                ndotdot++;
            }
        }
        if (ndot != 1 || ndotdot != 1)
            goto done;
        subs.len = 0;
        for (uint64_t i = 0; i < ne; i++) {
            if ((e[i].len == 1 && e[i].name[0] == '.') ||
                    (e[i].len == 2 && e[i].name[0] == '.' && e[i].name[1] == '.'))
                continue;
            if (read_inode(&im, e[i].nid, &o))
                goto done;
            /* the child's path: the parent's, '/' unless it is the root, the name */
            uint64_t poff = paths.len;
            uint32_t plen = f.path_len + (f.path_len > 1 ? 1u : 0u) + e[i].len;
            if (poff + plen > path_budget)
                goto done;
            if (reserve(&paths, plen)) {
                rc = -3;
                goto done;
            }
            memcpy(paths.p + poff, paths.p + f.path_off, f.path_len);
            uint64_t at = poff + f.path_len;
            if (f.path_len > 1)
                paths.p[at++] = '/';
            memcpy(paths.p + at, e[i].name, e[i].len);
            paths.len = poff + plen;
            uint32_t t = o.mode & S_FMT;
            if (t == S_DIR) {
                if (dirseen[o.nid / 8] & (1u << (o.nid % 8)))
                    goto done;
                dirseen[o.nid / 8] |= (uint8_t)(1u << (o.nid % 8));
                struct frame s = {o.nid, f.nid, poff, plen};
                if (put(&subs, &s, sizeof(s))) {
                    rc = -3;
                    goto done;
                }
            }
            /* only a directory's path is needed later: the others' bytes are given back
             * (they stay readable at poff until the next entry's path is written) */
            if (t != S_DIR)
                paths.len = poff;
            /* the reader's walk yields the entry here: file_runs stops at max_inodes */
            if (nseen >= max_inodes)
                goto ok;
            if (t != S_REG || (regseen[o.nid / 8] & (1u << (o.nid % 8))))
                continue;
            regseen[o.nid / 8] |= (uint8_t)(1u << (o.nid % 8));
            nseen++;
            int any;
            if (file_runs_of(&im, &o, nfiles, &runs, &any)) {
                rc = -3;
                goto done;
            }
            if (any) {
                if (put(&res, paths.p + poff, plen) || put(&res, "", 1)) {
                    rc = -3;
                    goto done;
                }
                nfiles++;
            }
        }
        /* subdirectories popped in stored order */
        const struct frame *s = (const struct frame *)subs.p;
        for (uint64_t i = subs.len / sizeof(struct frame); i-- > 0;) {
            if (put(&stack, &s[i], sizeof(s[i]))) {
                rc = -3;
                goto done;
            }
        }
    }
ok:
    /* paths, then the runs: the caller splits at *paths_len */
    *paths_len = res.len;
    if (runs.len && put(&res, runs.p, runs.len)) {
        rc = -3;
        goto done;
    }
    rc = (int64_t)res.len;
    *out = res.p;
    res.p = NULL;
done:
    free(dirseen);
    free(regseen);
    free(res.p);
    free(ents.p);
    free(runs.p);
    free(paths.p);
    free(stack.p);
    free(subs.p);
    return rc;
}

void ern_file_runs_free(uint8_t *p)
{
    free(p);
}
