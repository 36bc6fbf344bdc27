/* erofs-tools C core: BLAKE3 (hash mode, 32-byte digests), written from the BLAKE3
 * specification (Aumasson, Neves, O'Connor, Wilcox-O'Hearn, 2020): portable C, one
 * compression at a time, or two independent ones side by side (two chunks of one input,
 * or two inputs of at most one chunk: compress2). For pack's small chunks (a batch's reads and digests in one
 * C call without the GIL, chunkread.c); bigger ones are hashed by the `blake3` package,
 * whose SIMD compresses several 1 KiB chunks at once. tests/test_blake3_native.py
 * checks it against that package for every input length 0..4200 and others.
 *
 * The spec in brief: the input is cut into 1024-byte chunks, a chunk into 64-byte
 * blocks (the last one zero-padded; an empty input is one empty block). Each block is
 * compressed into the chunk's chaining value (CV), starting from the IV; the flags
 * say the chunk's first and last block. The chunks' CVs are combined in a binary tree
 * whose left subtree holds the largest power of two of chunks that leaves at least one
 * byte to the right; a parent node compresses the 64 bytes of its children's CVs. The
 * root node (a parent, or the only chunk's last block) is compressed with ROOT set,
 * and its first 32 output bytes are the digest. */
#include <string.h>

#include "erofs_native.h"

enum {
    CHUNK_START = 1, CHUNK_END = 2, PARENT = 4, ROOT = 8,
    BLOCK_LEN = 64, CHUNK_LEN = 1024,
};

static const uint32_t IV[8] = {
    0x6A09E667u, 0xBB67AE85u, 0x3C6EF372u, 0xA54FF53Au,
    0x510E527Fu, 0x9B05688Cu, 0x1F83D9ABu, 0x5BE0CD19u,
};

static inline uint32_t load32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* The compression function on the state as four rows of four words (v0..v3, v4..v7,
 * v8..v11, v12..v15; GCC's vector extensions: SSE2 on any x86-64): the column step is
 * one G on the four columns at once; the rows turned by 1, 2 and 3 words make the
 * diagonals columns for the diagonal step, then turned back. ~25 % less CPU than one
 * word at a time (1 KiB: 1.2 against 1.6 us here); an AVX-512 build of the same (its
 * rotate instruction, the message permuted in one register) gained only 2 %: a
 * chunk's blocks are one chain, whose latency is the bound. */
typedef uint32_t v4u __attribute__((vector_size(16)));

#ifdef __clang__
#define TURN(x, a, b, c, d) __builtin_shufflevector(x, x, a, b, c, d)
#else
#define TURN(x, a, b, c, d) __builtin_shuffle(x, (v4u){a, b, c, d})
#endif
#define ROTV(x, n) (((x) >> (n)) | ((x) << (32 - (n))))
#define GV(r0, r1, r2, r3, mx, my) do {                            \
        r0 = r0 + r1 + (mx); r3 = ROTV(r3 ^ r0, 16);               \
        r2 = r2 + r3;        r1 = ROTV(r1 ^ r2, 12);               \
        r0 = r0 + r1 + (my); r3 = ROTV(r3 ^ r0, 8);                \
        r2 = r2 + r3;        r1 = ROTV(r1 ^ r2, 7);                \
    } while (0)

/* one round on the state r0..r3, message words m[s0], m[s1], ...: the columns
 * (s0..s7), then the diagonals (s8..s15) */
#define ROUND(m, r0, r1, r2, r3, s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, \
              s13, s14, s15) do {                                  \
        GV(r0, r1, r2, r3, ((v4u){m[s0], m[s2], m[s4], m[s6]}),   \
           ((v4u){m[s1], m[s3], m[s5], m[s7]}));                   \
        r1 = TURN(r1, 1, 2, 3, 0);                                 \
        r2 = TURN(r2, 2, 3, 0, 1);                                 \
        r3 = TURN(r3, 3, 0, 1, 2);                                 \
        GV(r0, r1, r2, r3, ((v4u){m[s8], m[s10], m[s12], m[s14]}), \
           ((v4u){m[s9], m[s11], m[s13], m[s15]}));                \
        r1 = TURN(r1, 3, 0, 1, 2);                                 \
        r2 = TURN(r2, 2, 3, 0, 1);                                 \
        r3 = TURN(r3, 1, 2, 3, 0);                                 \
    } while (0)

/* round r reads the message words in the order of the permutation (2, 6, 3, 10, 7, 0,
 * 4, 13, 1, 11, 12, 5, 9, 14, 15, 8) applied r times to 0..15; R(n, ...) is round n */
#define ROUNDS(R)                                                       \
    R(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);            \
    R(2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8);            \
    R(3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1);            \
    R(10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6);            \
    R(12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4);            \
    R(9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7);            \
    R(11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13)

/* one block's compression as it starts: its message words and the state's rows */
#define LOAD(m, r0, r1, r2, r3, cv, block, counter, len, flags) do {              \
        for (int i_ = 0; i_ < 16; i_++)                                            \
            m[i_] = load32((block) + 4 * i_);                                      \
        memcpy(&r0, cv, 16);                                                       \
        memcpy(&r1, (cv) + 4, 16);                                                 \
        memcpy(&r2, IV, 16);                                                       \
        r3 = (v4u){(uint32_t)(counter), (uint32_t)((counter) >> 32), len, flags}; \
    } while (0)

/* the CV: the first half of the state xor its second */
#define STORE(cv, r0, r1, r2, r3) do {                             \
        r0 ^= r2;                                                  \
        r1 ^= r3;                                                  \
        memcpy(cv, &r0, 16);                                       \
        memcpy((cv) + 4, &r1, 16);                                 \
    } while (0)

/* the compression function, its first 8 output words (a CV) into cv */
static void compress(uint32_t cv[8], const uint8_t block[BLOCK_LEN], uint64_t counter,
                     uint32_t len, uint32_t flags)
{
    uint32_t m[16];
    v4u r0, r1, r2, r3;

    LOAD(m, r0, r1, r2, r3, cv, block, counter, len, flags);
#define R1(...) ROUND(m, r0, r1, r2, r3, __VA_ARGS__)
    ROUNDS(R1);
#undef R1
    STORE(cv, r0, r1, r2, r3);
}

/* Two independent compressions (two chunks' chains), round by round side by side: one
 * chain's steps wait for each other's results (the bound, above), so a core runs the
 * other chain's in those waits. Alone (ern_blake3 here, called in a loop): a 2 KiB
 * input 2.72 -> 2.04 us, 4 KiB 5.5 -> 4.2, two of 1 KiB 2.85 -> 2.17 (ern_blake3_2).
 * In pack's read call over /usr/share's 38,991 files of at most 4 KiB the hashing took
 * ~5-15 % less CPU (0.071 -> 0.060-0.067 s): most of them are small, and the reads'
 * kernel work between them leaves less to overlap (docs/performance.md, helper run
 * packz). */
static void compress2(uint32_t cva[8], const uint8_t *ba, uint64_t ca, uint32_t la,
                      uint32_t fa, uint32_t cvb[8], const uint8_t *bb, uint64_t cb,
                      uint32_t lb, uint32_t fb)
{
    uint32_t ma[16], mb[16];
    v4u a0, a1, a2, a3, b0, b1, b2, b3;

    LOAD(ma, a0, a1, a2, a3, cva, ba, ca, la, fa);
    LOAD(mb, b0, b1, b2, b3, cvb, bb, cb, lb, fb);
#define R2(...) do {                                               \
        ROUND(ma, a0, a1, a2, a3, __VA_ARGS__);                    \
        ROUND(mb, b0, b1, b2, b3, __VA_ARGS__);                    \
    } while (0)
    ROUNDS(R2);
#undef R2
    STORE(cva, a0, a1, a2, a3);
    STORE(cvb, b0, b1, b2, b3);
}

/* One chunk (1..1024 bytes, or 0 for an empty input) block by block: block k's bytes
 * (the last one zero-padded into pad), length and flags; nblocks() of them */
struct chunk {
    const uint8_t *in;
    size_t len;
    uint64_t counter;
    uint32_t root;
    uint32_t *cv;
    uint8_t pad[BLOCK_LEN];
};

static size_t nblocks(const struct chunk *c)
{
    return c->len ? (c->len + BLOCK_LEN - 1) / BLOCK_LEN : 1;
}

static const uint8_t *block_at(struct chunk *c, size_t k, uint32_t *len, uint32_t *flags)
{
    size_t last = nblocks(c) - 1;

    *flags = k ? 0 : CHUNK_START;
    if (k < last) {
        *len = BLOCK_LEN;
        return c->in + k * BLOCK_LEN;
    }
    *flags |= CHUNK_END | c->root;
    *len = (uint32_t)(c->len - last * BLOCK_LEN);
    memset(c->pad, 0, BLOCK_LEN);
    memcpy(c->pad, c->in + last * BLOCK_LEN, *len);
    return c->pad;
}

/* the CVs of two chunks, their blocks side by side as long as both have some */
static void chunk_cv2(struct chunk *a, struct chunk *b)
{
    size_t na = nblocks(a), nb = nblocks(b);
    uint32_t la, lb, fa, fb;

    memcpy(a->cv, IV, 32);
    memcpy(b->cv, IV, 32);
    for (size_t k = 0; k < na || k < nb; k++) {
        if (k < na && k < nb) {
            const uint8_t *pa = block_at(a, k, &la, &fa), *pb = block_at(b, k, &lb, &fb);
            compress2(a->cv, pa, a->counter, la, fa, b->cv, pb, b->counter, lb, fb);
        } else if (k < na) {
            const uint8_t *pa = block_at(a, k, &la, &fa);
            compress(a->cv, pa, a->counter, la, fa);
        } else {
            const uint8_t *pb = block_at(b, k, &lb, &fb);
            compress(b->cv, pb, b->counter, lb, fb);
        }
    }
}

/* the CV of one chunk (1..1024 bytes, or 0 for an empty input) */
static void chunk_cv(const uint8_t *in, size_t len, uint64_t counter, uint32_t root,
                     uint32_t cv[8])
{
    uint32_t flags = CHUNK_START;

    memcpy(cv, IV, 32);
    while (len > BLOCK_LEN) {
        compress(cv, in, counter, BLOCK_LEN, flags);
        flags = 0;
        in += BLOCK_LEN;
        len -= BLOCK_LEN;
    }
    uint8_t last[BLOCK_LEN] = {0};
    memcpy(last, in, len);
    compress(cv, last, counter, (uint32_t)len, flags | CHUNK_END | root);
}

/* a parent node's CV from its children's (pair: left's 8 words, then right's) */
static void parent_cv(const uint32_t pair[16], uint32_t root, uint32_t cv[8])
{
    uint8_t block[BLOCK_LEN];
    for (int i = 0; i < 16; i++) {
        uint32_t w = pair[i];
        block[4 * i] = (uint8_t)w;
        block[4 * i + 1] = (uint8_t)(w >> 8);
        block[4 * i + 2] = (uint8_t)(w >> 16);
        block[4 * i + 3] = (uint8_t)(w >> 24);
    }
    memcpy(cv, IV, 32);
    compress(cv, block, 0, BLOCK_LEN, PARENT | root);
}

/* the CV of the subtree over `len` bytes (more than 0) whose first chunk is number
 * `counter` of the input */
static void subtree_cv(const uint8_t *in, size_t len, uint64_t counter, uint32_t root,
                       uint32_t cv[8])
{
    uint32_t pair[16];

    if (len <= CHUNK_LEN) {
        chunk_cv(in, len, counter, root, cv);
        return;
    }
    if (len <= 2 * CHUNK_LEN) {     /* two chunks: their chains side by side */
        struct chunk a = {in, CHUNK_LEN, counter, 0, pair, {0}};
        struct chunk b = {in + CHUNK_LEN, len - CHUNK_LEN, counter + 1, 0, pair + 8, {0}};
        chunk_cv2(&a, &b);
        parent_cv(pair, root, cv);
        return;
    }
    /* the left subtree: the largest power of two of whole chunks below len */
    size_t left = CHUNK_LEN;
    while (2 * left < len)
        left *= 2;
    subtree_cv(in, left, counter, 0, pair);
    subtree_cv(in + left, len - left, counter + left / CHUNK_LEN, 0, pair + 8);
    parent_cv(pair, root, cv);
}

static void digest_out(const uint32_t cv[8], uint8_t out[32])
{
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)cv[i];
        out[4 * i + 1] = (uint8_t)(cv[i] >> 8);
        out[4 * i + 2] = (uint8_t)(cv[i] >> 16);
        out[4 * i + 3] = (uint8_t)(cv[i] >> 24);
    }
}

void ern_blake3(const uint8_t *in, uint64_t len, uint8_t out[32])
{
    uint32_t cv[8];

    subtree_cv(in, (size_t)len, 0, ROOT, cv);
    digest_out(cv, out);
}

void ern_blake3_2(const uint8_t *a, uint32_t alen, uint8_t aout[32], const uint8_t *b,
                  uint32_t blen, uint8_t bout[32])
{
    uint32_t acv[8], bcv[8];

    if (alen > CHUNK_LEN || blen > CHUNK_LEN) {
        ern_blake3(a, alen, aout);
        ern_blake3(b, blen, bout);
        return;
    }
    struct chunk ca = {a, alen, 0, ROOT, acv, {0}}, cb = {b, blen, 0, ROOT, bcv, {0}};
    chunk_cv2(&ca, &cb);
    digest_out(acv, aout);
    digest_out(bcv, bout);
}
