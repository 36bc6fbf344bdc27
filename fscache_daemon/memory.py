"""How many malloc arenas the daemon's C heap may keep.

The fill path allocates and frees buffers of up to a batch (1 MiB by default) in every
worker thread, and glibc gives each thread that allocates an arena of its own (up to
8 per CPU), each keeping what it freed for its own thread's next allocations. A cold read
of a 1 GiB image (issue 15) so peaked at ~110-125 MiB RSS; with two arenas shared by
all threads it peaks at ~85 MiB (the bound: 96 MiB), with no more system time. (A fixed
128 KiB mmap threshold or a 1 MiB trim threshold bounded it too, but doubled the system
time: every big buffer mapped, faulted in and unmapped again.)
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_ARENA_MAX = -8        # glibc's mallopt(3) parameter
ARENA_MAX = 2


def bound_heap_arenas() -> bool:
    """Cap the malloc arenas through mallopt (glibc only); True if applied."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    except OSError:
        mallopt = None
    if mallopt is None or mallopt(M_ARENA_MAX, ARENA_MAX) != 1:
        log.debug("no glibc mallopt: malloc arenas left as they are")
        return False
    return True
