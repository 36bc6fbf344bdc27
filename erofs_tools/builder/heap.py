"""The C heap of a pack process: one malloc arena for every thread, big blocks mapped.

Pack's threads (the walk, the hash/compress workers, the blob writer, the consumer)
allocate and free chunk buffers of up to the chunk size, and glibc gives each thread
that allocates an arena of its own, each keeping what it freed for that thread's next
allocations: on /usr/share with --compressor none that was ~25 MiB of free heap held
over pack's peak (its RSS 1.3x what it is with one arena). The threads allocate with the
GIL held, so one arena costs no measurable lock contention.

Blocks of 256 KiB and more (batch read buffers, compressed batches, the writer's
groups: 0.5-2 MiB each) are mapped on their own and given back when freed. glibc's
default raises that threshold to the largest block freed so far, after which such
buffers came from the heap and left holes in it that later, smaller allocations did not
fill: measured on /usr/share, peak RSS 62 -> 57 MiB with --compressor none and 69 -> 60
MiB with zstd, the CPU time the same or lower (the mapping is one mmap and munmap per
~1 MiB buffer).
"""
from __future__ import annotations

MMAP_THRESHOLD = 256 << 10


def bound_heap_arenas(arenas: int = 1) -> bool:
    """Cap the malloc arenas of this process (glibc only; before threads start, or
    arenas already made stay) and map blocks of MMAP_THRESHOLD and more on their own;
    True if applied. Through the C core's mallopt call (ctypes, for one call, was ~0.5
    MiB of pack's RSS)."""
    from erofs_tools._native_sha256 import heap_bound
    return heap_bound(arenas, MMAP_THRESHOLD)
