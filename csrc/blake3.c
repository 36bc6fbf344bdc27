/* erofs-tools C core: BLAKE3 (hash mode, 32-byte digests), written from the BLAKE3
 * specification (Aumasson, Neves, O'Connor, Wilcox-O'Hearn, 2020): portable C, one
 * compression at a time. For pack's small chunks (a batch's reads and digests in one
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

static inline uint32_t rotr(uint32_t x, unsigned n)
{
    return (x >> n) | (x << (32 - n));
}

static inline uint32_t load32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

#define G(a, b, c, d, x, y) do {                                   \
        v[a] = v[a] + v[b] + (x); v[d] = rotr(v[d] ^ v[a], 16);    \
        v[c] = v[c] + v[d];       v[b] = rotr(v[b] ^ v[c], 12);    \
        v[a] = v[a] + v[b] + (y); v[d] = rotr(v[d] ^ v[a], 8);     \
        v[c] = v[c] + v[d];       v[b] = rotr(v[b] ^ v[c], 7);     \
    } while (0)

/* one round: the columns, then the diagonals, message words m[s0], m[s1], ... */
#define ROUND(s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15) do { \
        G(0, 4, 8, 12, m[s0], m[s1]);                              \
        G(1, 5, 9, 13, m[s2], m[s3]);                              \
        G(2, 6, 10, 14, m[s4], m[s5]);                             \
        G(3, 7, 11, 15, m[s6], m[s7]);                             \
        G(0, 5, 10, 15, m[s8], m[s9]);                             \
        G(1, 6, 11, 12, m[s10], m[s11]);                           \
        G(2, 7, 8, 13, m[s12], m[s13]);                            \
        G(3, 4, 9, 14, m[s14], m[s15]);                            \
    } while (0)

/* the compression function, its first 8 output words (a CV) into cv */
static void compress(uint32_t cv[8], const uint8_t block[BLOCK_LEN], uint64_t counter,
                     uint32_t len, uint32_t flags)
{
    uint32_t m[16], v[16];

    for (int i = 0; i < 16; i++)
        m[i] = load32(block + 4 * i);
    memcpy(v, cv, 32);
    memcpy(v + 8, IV, 16);
    v[12] = (uint32_t)counter;
    v[13] = (uint32_t)(counter >> 32);
    v[14] = len;
    v[15] = flags;
    /* round r reads the message words in the order of the permutation (2, 6, 3, 10,
     * 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8) applied r times to 0..15 */
    ROUND(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    ROUND(2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8);
    ROUND(3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1);
    ROUND(10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6);
    ROUND(12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4);
    ROUND(9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7);
    ROUND(11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13);
    for (int i = 0; i < 8; i++)
        cv[i] = v[i] ^ v[i + 8];
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

/* the CV of the subtree over `len` bytes (more than 0) whose first chunk is number
 * `counter` of the input */
static void subtree_cv(const uint8_t *in, size_t len, uint64_t counter, uint32_t root,
                       uint32_t cv[8])
{
    if (len <= CHUNK_LEN) {
        chunk_cv(in, len, counter, root, cv);
        return;
    }
    /* the left subtree: the largest power of two of whole chunks below len */
    size_t left = CHUNK_LEN;
    while (2 * left < len)
        left *= 2;
    uint32_t pair[16];
    subtree_cv(in, left, counter, 0, pair);
    subtree_cv(in + left, len - left, counter + left / CHUNK_LEN, 0, pair + 8);
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

void ern_blake3(const uint8_t *in, uint64_t len, uint8_t out[32])
{
    uint32_t cv[8];

    subtree_cv(in, (size_t)len, 0, ROOT, cv);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)cv[i];
        out[4 * i + 1] = (uint8_t)(cv[i] >> 8);
        out[4 * i + 2] = (uint8_t)(cv[i] >> 16);
        out[4 * i + 3] = (uint8_t)(cv[i] >> 24);
    }
}
