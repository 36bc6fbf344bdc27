/* The reader's SIGBUS guard over mapped image files (erofs_tools/reader/image.py).
 *
 * The reader maps an image file read-only. When someone truncates the file meanwhile,
 * a load from a page past the new end raises SIGBUS, whose default action ends the
 * process at once (exit 135): no error message, and `unpack -o`'s temporary tree left
 * behind. Python cannot catch a synchronous fault (its handler only runs after the
 * faulting instruction, which faults again), so the answer is here: a SIGBUS handler
 * that, for a fault inside a registered mapping, maps anonymous zero pages over the
 * mapping from the faulting page to its end (MAP_FIXED: the same addresses, so the
 * interrupted copy goes on and reads zeros) and sets that range's flag first. The
 * reader checks the flag after each copy out of the mapping and raises "the image
 * file changed while it was read" before any byte read after the fault reaches an
 * output. Every other SIGBUS (another mapping, kill -BUS) goes to the handler that was
 * installed before this one, or takes the default action.
 *
 * Only async-signal-safe work in the handler: loads of the slot table, one store, the
 * mmap system call. Slots are claimed and freed under a mutex (never in the handler);
 * `end` is written last on claim and cleared first on release, so the handler sees a
 * slot either whole or free.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "erofs_native.h"

#define GUARD_SLOTS 1024        /* ern_guard_hit's size in erofs_native.h */

struct slot {
    uintptr_t start, end;       /* end == 0: free */
};

uint32_t ern_guard_hit[GUARD_SLOTS];
static struct slot slots[GUARD_SLOTS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct sigaction previous;
static uintptr_t page_size;

/* Not ours. A fault goes to the handler that was there before (faulthandler prints its
 * traceback), then the default action is put back, so that the fault ends the process
 * when it repeats (a handler that returns without curing it cannot loop: faulthandler
 * once disabled, or one that calls back into this one). A sent SIGBUS (kill) takes the
 * default action. */
static void chain(int sig, siginfo_t *si, void *ctx)
{
    struct sigaction prev = previous, dfl;
    if (si != NULL && si->si_code > 0) {
        if (prev.sa_flags & SA_SIGINFO) {
            if (prev.sa_sigaction != NULL)
                prev.sa_sigaction(sig, si, ctx);
        } else if (prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN) {
            prev.sa_handler(sig);
        }
    }
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
    if (si == NULL || si->si_code <= 0)
        raise(sig);
}

static void on_sigbus(int sig, siginfo_t *si, void *ctx)
{
    int saved = errno;
    if (si != NULL && si->si_code == BUS_ADRERR) {      /* a load past the end, or EIO */
        uintptr_t a = (uintptr_t)si->si_addr;
        for (int i = 0; i < GUARD_SLOTS; i++) {
            uintptr_t end = __atomic_load_n(&slots[i].end, __ATOMIC_ACQUIRE);
            uintptr_t start = __atomic_load_n(&slots[i].start, __ATOMIC_RELAXED);
            if (end == 0 || a < start || a >= end)
                continue;
            /* the flag before the zeros: whoever reads a zero page sees it set */
            __atomic_store_n(&ern_guard_hit[i], 1, __ATOMIC_SEQ_CST);
            uintptr_t from = a & ~(page_size - 1);
            uintptr_t to = (end + page_size - 1) & ~(page_size - 1);
            void *r = mmap((void *)from, to - from, PROT_READ,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
            if (r != MAP_FAILED) {
                errno = saved;
                return;
            }
            break;
        }
    }
    chain(sig, si, ctx);
    errno = saved;
}

int ern_guard_install(void)
{
    struct sigaction cur, ours;
    if (page_size == 0)
        page_size = (uintptr_t)sysconf(_SC_PAGESIZE);
    pthread_mutex_lock(&lock);
    int rc = 0;
    if (sigaction(SIGBUS, NULL, &cur) != 0) {
        rc = -errno;
    } else if (!((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_sigbus)) {
        /* not ours on top (first use, or faulthandler.enable() came later): chain to it */
        memset(&ours, 0, sizeof ours);
        ours.sa_sigaction = on_sigbus;
        ours.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
        sigemptyset(&ours.sa_mask);
        previous = cur;
        if (sigaction(SIGBUS, &ours, NULL) != 0)
            rc = -errno;
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

int ern_guard_add(const void *addr, uint64_t len)
{
    if (len == 0 || ern_guard_install() != 0)
        return -1;
    int got = -1;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < GUARD_SLOTS; i++) {
        if (slots[i].end != 0)
            continue;
        __atomic_store_n(&ern_guard_hit[i], 0, __ATOMIC_SEQ_CST);
        __atomic_store_n(&slots[i].start, (uintptr_t)addr, __ATOMIC_RELAXED);
        __atomic_store_n(&slots[i].end, (uintptr_t)addr + len, __ATOMIC_RELEASE);
        got = i;
        break;
    }
    pthread_mutex_unlock(&lock);
    return got;
}

void ern_guard_remove(int slot)
{
    if (slot < 0 || slot >= GUARD_SLOTS)
        return;
    pthread_mutex_lock(&lock);
    __atomic_store_n(&slots[slot].end, 0, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&lock);
}
