/* CRC-32C (Castagnoli, reflected polynomial 0x82F63B78): slicing-by-8 tables and an
 * SSE4.2 path picked at run time. erofs_crc32c_update() applies no inversion; callers add
 * the conventions they need (EROFS superblock: init ~0, no final xor). */
#include <stdint.h>
#include <string.h>
#include "erofs_fs.h"
#include "erofs_native.h"

static uint32_t crc_tab[8][256];
static int crc_ready;
static int crc_hw = -1;

static void crc_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_tab[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = crc_tab[0][n];
        for (int k = 1; k < 8; k++) {
            c = crc_tab[0][c & 0xff] ^ (c >> 8);
            crc_tab[k][n] = c;
        }
    }
    crc_ready = 1;
}

static uint32_t crc_sw(uint32_t crc, const uint8_t *p, size_t len)
{
    if (!crc_ready)
        crc_init();
    while (len && ((uintptr_t)p & 7)) {
        crc = crc_tab[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
        len--;
    }
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        uint32_t lo = (uint32_t)v ^ crc, hi = (uint32_t)(v >> 32);
        crc = crc_tab[7][lo & 0xff] ^ crc_tab[6][(lo >> 8) & 0xff] ^
              crc_tab[5][(lo >> 16) & 0xff] ^ crc_tab[4][lo >> 24] ^
              crc_tab[3][hi & 0xff] ^ crc_tab[2][(hi >> 8) & 0xff] ^
              crc_tab[1][(hi >> 16) & 0xff] ^ crc_tab[0][hi >> 24];
        p += 8;
        len -= 8;
    }
    while (len--)
        crc = crc_tab[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("sse4.2")))
static uint32_t crc_hw_update(uint32_t crc, const uint8_t *p, size_t len)
{
    uint64_t c = crc;
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        len -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (len--)
        c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}
#endif

uint32_t erofs_crc32c_update(uint32_t crc, const uint8_t *buf, size_t len)
{
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (crc_hw < 0) {
        __builtin_cpu_init();
        crc_hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
    }
    if (crc_hw)
        return crc_hw_update(crc, buf, len);
#endif
    return crc_sw(crc, buf, len);
}

/* crc32c (init ~0, no final xor) of the superblock's block from the superblock on, the
 * checksum field counted as zero; `blksz` is the length of `block` (for blocks below
 * 1 KiB: the superblock offset plus one block) */
uint32_t erofs_sb_checksum(const uint8_t *block, size_t blksz)
{
    static const uint8_t zero[sizeof(((struct erofs_super_block *)0)->checksum)];
    const size_t at = offsetof(struct erofs_super_block, checksum);
    const size_t after = at + sizeof(zero);
    size_t len = blksz > EROFS_SUPER_OFFSET ? blksz - EROFS_SUPER_OFFSET : blksz;
    const uint8_t *sb = block + EROFS_SUPER_OFFSET;
    uint32_t crc = 0xFFFFFFFFu;
    crc = erofs_crc32c_update(crc, sb, at);
    crc = erofs_crc32c_update(crc, zero, sizeof(zero));
    crc = erofs_crc32c_update(crc, sb + after, len - after);
    return crc;
}
