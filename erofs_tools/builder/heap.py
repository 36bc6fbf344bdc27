"""The C heap of a pack process: one malloc arena for every thread.

Pack's threads (the walk, the hash/compress workers, the blob writer, the consumer)
allocate and free chunk buffers of up to the chunk size, and glibc gives each thread
that allocates an arena of its own, each keeping what it freed for that thread's next
allocations: on /usr/share with --compressor none that was ~25 MiB of free heap held
over pack's peak (its RSS 1.3x what it is with one arena). The threads allocate with the
GIL held, so one arena costs no measurable lock contention.
"""
from __future__ import annotations

import ctypes

M_ARENA_MAX = -8        # glibc's mallopt(3) parameter


def bound_heap_arenas(arenas: int = 1) -> bool:
    """Cap the malloc arenas of this process (glibc only; before threads start, or
    arenas already made stay); True if applied."""
    try:
        # the symbols already loaded (libc's among them): no find_library, which runs
        # ldconfig in a subprocess
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    except OSError:
        mallopt = None
    return mallopt is not None and mallopt(M_ARENA_MAX, arenas) == 1
