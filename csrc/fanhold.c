/* erofs-tools C core, the fanotify fd holder's fast path: the pre-content events of one
 * read(2) of the group whose ranges are wholly filled in their cache file's bitmap,
 * answered FAN_ALLOW and their fds closed in one call.
 *
 * On a cold sequential read almost every event is such a one (the daemon's readahead
 * filled the range before the reader got there: 6,232 of 6,320 events per cold GiB),
 * and each one holds its reader until the holder answers it. In Python the holder spent
 * ~30 us of CPU per event (parsing, fstat, the bitmap test, the answer, the close),
 * ~0.2 s per cold GiB on the 2 CPUs the reader and the daemon's workers share.
 *
 * The buffer is the kernel's, but the stream is walked once before anything is
 * answered: a malformed stream answers nothing here and is left to the caller's parser
 * (which reports it). An event is answered here only with an fd, a well-formed range
 * record and a map for its inode; every other one is left to the caller, as is any
 * event whose answer failed for another reason than ENOENT (answered already).
 */
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <time.h>
#include <sys/stat.h>
#include <unistd.h>

#include "erofs_native.h"

#define FAN_META_LEN 24         /* struct fanotify_event_metadata */
#define FAN_META_VERSION 3
#define FAN_INFO_HDR_LEN 4      /* struct fanotify_event_info_header */
#define FAN_INFO_RANGE 6        /* FAN_EVENT_INFO_TYPE_RANGE (Linux 6.14) */
#define FAN_RANGE_LEN 24        /* struct fanotify_event_info_range */
#define FAN_ALLOW_RESPONSE 0x01
#define FILLED_BLOCK_BITS 12    /* one bit per 4 KiB block (fanotify_marks.FILLED_BLOCK) */

static uint32_t rd32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static uint16_t rd16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static uint64_t rd64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static uint64_t now_ns(void);

/* every block of [start, end) (end > start) set in bits */
static int covers(const uint8_t *bits, uint64_t nblocks, uint64_t start, uint64_t end)
{
    uint64_t first = start >> FILLED_BLOCK_BITS, last = (end - 1) >> FILLED_BLOCK_BITS;
    if (last >= nblocks)
        return 0;
    for (uint64_t b = first; b <= last;) {
        if ((b & 7) == 0 && last - b >= 7) {        /* a whole byte at once */
            if (bits[b >> 3] != 0xff)
                return 0;
            b += 8;
            continue;
        }
        if (!(bits[b >> 3] & (1u << (b & 7))))
            return 0;
        b++;
    }
    return 1;
}

/* The first touch of an answered range in its file's log (struct ern_fan_map): the
 * holder's Python did this per event (TouchLog.note, 3-5 us each, ~6,300 events per cold
 * GiB). */
static void note_touch(const struct ern_fan_map *m, uint64_t off, uint64_t cnt, uint64_t ns)
{
    if (!m->seen)
        return;
    uint64_t start = off < m->size ? off : m->size;
    uint64_t end = cnt > m->size - start ? m->size : start + cnt;
    if (end <= start || covers(m->seen, m->nblocks, start, end) || *m->tlen >= m->tcap)
        return;
    uint64_t first = start >> FILLED_BLOCK_BITS, last = (end - 1) >> FILLED_BLOCK_BITS;
    if (last >= m->nblocks)
        last = m->nblocks - 1;
    for (uint64_t b = first; b <= last; b++)
        m->seen[b >> 3] |= (uint8_t)(1u << (b & 7));
    uint64_t n = last - first + 1;
    if (n > (1u << 24) - 1)
        n = (1u << 24) - 1;
    uint64_t *rec = m->tlog + 2 * *m->tlen;
    rec[0] = first << 24 | n;
    rec[1] = ns;
    *m->tlen += 1;
}

/* the event's range record, as fanotify_abi.parse_events reads it: 1 and *off, *cnt, or
 * 0 (none, or a record of the wrong size) */
static int event_range(const uint8_t *ev, uint32_t meta_len, uint32_t event_len,
                       uint64_t *off, uint64_t *cnt)
{
    int found = 0;
    uint32_t pos = meta_len;
    while (pos + FAN_INFO_HDR_LEN <= event_len) {
        uint8_t type = ev[pos];
        uint16_t rec_len = rd16(ev + pos + 2);
        if (rec_len < FAN_INFO_HDR_LEN || pos + rec_len > event_len)
            break;              /* the rest ignored: no range unless one came before */
        if (type == FAN_INFO_RANGE) {
            if (rec_len == FAN_RANGE_LEN) {
                *off = rd64(ev + pos + 8);
                *cnt = rd64(ev + pos + 16);
                found = 1;
            } else {
                found = 0;      /* stricter than parse_events, which keeps an earlier good
                                 * record: such an event goes to the daemon */
            }
        }
        pos += rec_len;
    }
    return found;
}

static int answer_allow(int group_fd, int32_t fd)
{
    struct {
        int32_t fd;
        uint32_t response;
    } r = {fd, FAN_ALLOW_RESPONSE};
    for (;;) {
        ssize_t w = write(group_fd, &r, sizeof(r));
        if (w == (ssize_t)sizeof(r))
            return 0;
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && errno == ENOENT)
            return 0;           /* no longer pending (answered): still ours to close */
        return -1;
    }
}

int64_t ern_fan_allow_filled(int group_fd, const uint8_t *buf, size_t len,
                             const struct ern_fan_map *maps, uint32_t nmaps, uint8_t *done,
                             uint32_t ndone, struct ern_fan_allowed *allowed,
                             uint32_t *nevents)
{
    uint32_t n = 0;
    /* the whole stream well formed first (what parse_events checks), or nothing done */
    for (size_t off = 0; off < len; n++) {
        if (len - off < FAN_META_LEN)
            return -1;
        uint32_t event_len = rd32(buf + off);
        uint8_t vers = buf[off + 4];
        uint16_t meta_len = rd16(buf + off + 6);
        if (vers != FAN_META_VERSION || event_len < FAN_META_LEN || event_len > len - off ||
            meta_len < FAN_META_LEN || meta_len > event_len)
            return -1;
        off += event_len;
    }
    *nevents = n;
    if (n > ndone)
        return -1;
    memset(done, 0, n);
    int64_t k = 0;
    uint64_t ns = 0;
    uint32_t i = 0;
    for (size_t off = 0; off < len; i++) {
        const uint8_t *ev = buf + off;
        uint32_t event_len = rd32(ev);
        uint16_t meta_len = rd16(ev + 6);
        int32_t fd = (int32_t)rd32(ev + 16);
        uint64_t roff, rcnt;
        off += event_len;
        if (fd < 0 || !event_range(ev, meta_len, event_len, &roff, &rcnt))
            continue;
        struct stat st;
        if (fstat(fd, &st))
            continue;
        const struct ern_fan_map *m = NULL;
        uint32_t j;
        for (j = 0; j < nmaps; j++) {
            if (maps[j].dev == (uint64_t)st.st_dev && maps[j].ino == (uint64_t)st.st_ino) {
                m = &maps[j];
                break;
            }
        }
        if (!m || !m->bits)
            continue;
        /* clamped to the file's size, as FilledView.covers does */
        uint64_t start = roff < m->size ? roff : m->size;
        uint64_t end = rcnt > m->size - start ? m->size : start + rcnt;
        if (end <= start || !covers(m->bits, m->nblocks, start, end))
            continue;
        if (answer_allow(group_fd, fd))
            continue;           /* the caller forwards it (and logs why) */
        close(fd);
        if (m->seen) {
            if (!ns)
                ns = now_ns();
            note_touch(m, roff, rcnt, ns);
        }
        done[i] = 1;
        allowed[k].map = j;
        allowed[k].pad = 0;
        allowed[k].offset = roff;
        allowed[k].count = rcnt;
        k++;
    }
    return k;
}

_Static_assert(sizeof(struct ern_fan_pollfd) == sizeof(struct pollfd),
               "struct ern_fan_pollfd is struct pollfd");

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Per event the Python loop cost a wake-up of the interpreter: poll's list of tuples,
 * the handler's dispatch, the read, the call here, the notes; ~60 % of the holder's CPU
 * on a cold read (perf). Here the loop stays in C as long as nothing but filled events
 * comes; everything else (a control message, an unfilled event, a signal, the
 * timeout) goes back to the caller, whose state cannot change meanwhile: it is
 * single-threaded and waiting in this call. */
int ern_fan_serve(int group_fd, struct ern_fan_pollfd *fds, uint32_t nfds, int timeout_ms,
                  uint8_t *buf, size_t cap, size_t *used, const struct ern_fan_map *maps,
                  uint32_t nmaps, uint8_t *done, uint32_t ndone, uint32_t *nevents,
                  struct ern_fan_allowed *log, uint64_t *log_ns, uint32_t log_cap,
                  uint32_t *nlog)
{
    struct pollfd *pfd = (struct pollfd *)fds;
    uint64_t deadline = timeout_ms >= 0 ? now_ns() + (uint64_t)timeout_ms * 1000000u : 0;
    *used = 0;
    *nlog = 0;
    *nevents = 0;
    for (int round = 0;; round++) {
        int wait = -1;
        if (timeout_ms >= 0) {
            uint64_t t = now_ns();
            if (t >= deadline && round)
                return 0;       /* the caller's timer is due, however busy the group is */
            wait = t >= deadline ? 0 : (int)((deadline - t + 999999u) / 1000000u);
        }
        int r = poll(pfd, nfds, wait);
        if (r < 0)
            return errno == EINTR ? 2 : -errno;
        if (r == 0)
            return 0;
        int64_t g = -1;
        int others = 0;
        for (uint32_t i = 0; i < nfds; i++) {
            if (pfd[i].fd == group_fd)
                g = i;
            else if (pfd[i].revents)
                others = 1;
        }
        if (others || g < 0 || pfd[g].revents != POLLIN || !nmaps)
            return 1;
        if (log_cap - *nlog < ndone)
            return 3;
        ssize_t n = read(group_fd, buf, cap);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
            pfd[g].revents = 0;
            continue;
        }
        if (n <= 0)
            return 1;           /* the caller reads it again and reports the error */
        uint32_t nev = 0;
        int64_t k = ern_fan_allow_filled(group_fd, buf, (size_t)n, maps, nmaps, done, ndone,
                                         log + *nlog, &nev);
        if (k > 0) {
            uint64_t t = now_ns();
            for (int64_t j = 0; j < k; j++)
                log_ns[*nlog + j] = t;
            *nlog += (uint32_t)k;
        }
        if (k < 0 || (uint64_t)k != nev) {     /* some (or a malformed stream) for it */
            *used = (size_t)n;
            /* 0 events: nothing answered, the caller's parser takes the whole read */
            *nevents = k < 0 ? 0 : nev;
            return 1;
        }
        pfd[g].revents = 0;
    }
}
