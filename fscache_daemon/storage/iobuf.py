"""Reused, page-aligned buffers for backend reads (localfs reads them with O_DIRECT).

A cold read fetches every stored byte once: reading it through the blob file's page
cache would insert each page there and copy it out again (measured: 9-12 % of the
daemon's CPU per cold GiB), for a copy nobody reads a second time. An O_DIRECT read
needs an aligned buffer; a fresh mapping per request costs a page fault per 4 KiB
(tried: no less CPU), so buffers are kept and handed out again.

Thread-safe. Only touched pages count against RSS; the pool keeps at most
`keep_bytes` of free buffers (the rest are unmapped when the last view of them goes).
"""
from __future__ import annotations

import mmap
import threading

from erofs_tools.fsutil import round_up

# Buffers are sized in steps of this: 1 MiB requests + alignment slack share one size,
# and that size is one transparent huge page. An O_DIRECT read pins its buffer's pages
# for the I/O: one 2 MiB folio instead of 256-320 small pages halved the kernel's CPU
# for the O_DIRECT reads of a cold GiB's blob (0.07 -> 0.03 s, 6.18); the THP is
# faulted in once per buffer, the buffers are reused.
GRANULE = 2 << 20


class IOBuffer:
    """One anonymous, page-aligned mapping and a writable view of all of it."""

    __slots__ = ("mm", "view", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        # private: shared anonymous memory would be shmem pages (slower faults). A
        # mapping of whole huge pages is placed on a huge-page boundary by the kernel
        # (6.7+); MADV_HUGEPAGE asks for THPs where they are only given on request
        self.mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
        if size % GRANULE == 0 and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self.mm.madvise(mmap.MADV_HUGEPAGE)
            except OSError:     # THP not configured: small pages
                pass
        self.view = memoryview(self.mm)


class BufferPool:
    def __init__(self, keep_bytes: int = 24 << 20) -> None:
        self.keep_bytes = keep_bytes
        self._free: list[IOBuffer] = []
        self._free_bytes = 0
        self._lock = threading.Lock()

    def get(self, n: int) -> IOBuffer:
        """A buffer of at least n bytes (reused when one is free)."""
        with self._lock:
            # the smallest that fits: a large one-off buffer kept stays for large reads
            best = None
            for i, b in enumerate(self._free):
                if b.size >= n and (best is None or b.size < self._free[best].size):
                    best = i
            if best is not None:
                b = self._free.pop(best)
                self._free_bytes -= b.size
                return b
        return IOBuffer(round_up(max(n, 1), GRANULE))

    def put(self, buf: IOBuffer) -> None:
        """Give a buffer back: every view of its bytes handed out must be dead by now."""
        with self._lock:
            if self._free_bytes + buf.size <= self.keep_bytes:
                self._free.append(buf)
                self._free_bytes += buf.size


# the daemon's one pool: every blob's fills share it (a handful of requests in flight)
POOL = BufferPool()
