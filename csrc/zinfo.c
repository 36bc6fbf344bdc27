/* zinfo: the checkpoints of a gzip stream as mkfs.erofs 1.9 `--gzinfo=FILE` records
 * them for its AWS SOCI-compatible zinfo (version 2), the same technique as zran.c's
 * builder (inflate with Z_BLOCK, a point at a deflate block boundary) with that
 * writer's own rules, so the file comes out byte for byte the same:
 *
 * - a point at a block boundary (not in a member's last block) that is the first since a
 *   gzip member's header, or more than `span` bytes of output after the previous point;
 * - its window is not inflateGetDictionary's but the decoder's 32 KiB output buffer
 *   turned so that the byte before the point comes last: that buffer is refilled from
 *   its start for every read of 32 KiB of output, and a read also ends early at the end
 *   of a member, so after one the bytes past the fill are older output (never copied
 *   from: a member does not reach back into the one before) and, before 32 KiB came out,
 *   zeros.
 *
 * Each point is given with the output offset of the read it was recorded in, so that the
 * caller can drop those past what mkfs.erofs reads of the stream (it stops at the tar's
 * end). Input is fed in any pieces; the output is only kept in the window. feed() stops
 * right after recording a point and does nothing more until it is taken: one 32 KiB
 * record held at a time, however many points a piece of input holds (a stream of tiny
 * gzip members has one per member).
 */
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "erofs_native.h"

#define WINDOW 32768u
#define GZIP_BITS 31
#define DT_BLOCK_END 128
#define DT_LAST 64

struct ern_zinfo {
    z_stream strm;
    uint64_t span;
    uint64_t totin, totout;
    uint64_t last_out;        /* the previous point's output offset (0 before any) */
    uint64_t read_start;      /* output offset where the current 32 KiB read began */
    uint32_t fill;            /* bytes of the current read in buf */
    int initial;              /* no point yet since the current member's start */
    int member_done, padding;
    int have_pending;         /* rec holds a point not taken yet (feed waits for it) */
    uint64_t rec_read;        /* its read start */
    uint8_t buf[WINDOW];
    uint8_t rec[ERN_ZINFO_RECORD];
};

ern_zinfo *ern_zinfo_new(uint64_t span)
{
    ern_zinfo *z = calloc(1, sizeof(*z));   /* buf zeroed: the window before output */
    if (!z)
        return NULL;
    z->span = span;
    z->initial = 1;
    if (inflateInit2(&z->strm, GZIP_BITS) != Z_OK) {
        free(z);
        return NULL;
    }
    return z;
}

void ern_zinfo_free(ern_zinfo *z)
{
    if (!z)
        return;
    inflateEnd(&z->strm);
    free(z);
}

static void put_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void record(ern_zinfo *z)
{
    uint8_t *r = z->rec;

    put_le64(r, z->totin);                          /* the next whole input byte */
    put_le64(r + 8, z->totout);
    r[16] = (uint8_t)(z->strm.data_type & 7);       /* bits of the byte before it */
    memcpy(r + 17, z->buf + z->fill, WINDOW - z->fill);
    memcpy(r + 17 + (WINDOW - z->fill), z->buf, z->fill);
    z->rec_read = z->read_start;
    z->have_pending = 1;
    z->last_out = z->totout;
    z->initial = 0;
}

int ern_zinfo_feed(ern_zinfo *z, const uint8_t *in, size_t in_len, size_t *consumed)
{
    z_stream *s = &z->strm;
    size_t pos = 0;
    int rc = ERN_OK;

    *consumed = 0;
    if (in_len > UINT32_MAX)
        return ERN_EINVAL;
    while (pos < in_len && !z->have_pending) {
        uInt ain, aout;
        int ret;

        if (z->member_done && (z->padding || in[pos] == 0)) {
            /* zeros after the last member (as the tar reader accepts them), nothing else */
            for (; pos < in_len && in[pos] == 0; pos++)
                z->totin++;
            z->padding = 1;
            if (pos < in_len)
                rc = ERN_EIO;
            break;
        }
        if (z->member_done) {
            if (inflateReset(s) != Z_OK) {
                rc = ERN_EIO;
                break;
            }
            z->member_done = 0;
        }
        if (z->fill == WINDOW) {            /* that read is done: the next one */
            z->fill = 0;
            z->read_start = z->totout;
        }
        s->next_in = (Bytef *)(in + pos);
        s->avail_in = ain = (uInt)(in_len - pos);
        s->next_out = z->buf + z->fill;
        s->avail_out = aout = WINDOW - z->fill;
        ret = inflate(s, Z_BLOCK);
        pos += ain - s->avail_in;
        z->totin += ain - s->avail_in;
        z->totout += aout - s->avail_out;
        z->fill += aout - s->avail_out;
        if (ret == Z_STREAM_END) {
            z->member_done = 1;
            z->initial = 1;
            if (z->fill) {                  /* a read ends with its member */
                z->fill = 0;
                z->read_start = z->totout;
            }
            continue;
        }
        if (ret == Z_BUF_ERROR)
            break;                          /* no progress: more input needed */
        if (ret != Z_OK) {
            rc = ret == Z_MEM_ERROR ? ERN_ENOMEM : ERN_EIO;
            break;
        }
        if ((s->data_type & DT_BLOCK_END) && !(s->data_type & DT_LAST)
            && (z->initial || z->totout - z->last_out > z->span))
            record(z);      /* and return: the caller takes it before feeding on */
    }
    *consumed = pos;
    return rc;
}

int ern_zinfo_next(ern_zinfo *z, uint8_t *rec, uint64_t *read_start)
{
    if (!z->have_pending)
        return 0;
    memcpy(rec, z->rec, ERN_ZINFO_RECORD);
    *read_start = z->rec_read;
    z->have_pending = 0;
    return 1;
}

void ern_zinfo_totals(ern_zinfo *z, uint64_t *total_in, uint64_t *total_out,
                      int *member_done)
{
    *total_in = z->totin;
    *total_out = z->totout;
    *member_done = z->member_done;
}
