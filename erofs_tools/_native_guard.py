"""Checked wrapper of the reader's SIGBUS guard (csrc/imageguard.c): a mapped image
file that shrinks while it is read gives zero pages and a flag instead of killing the
process. Apart from _native.py only to keep each module small; the cffi module still
comes through it."""
from __future__ import annotations

import mmap
import weakref

from erofs_tools._native import ffi, lib

__all__ = ["MapGuard", "guard_flags"]


def guard_flags():
    """The flag table, indexed by a MapGuard's slot (a load and a compare per check)."""
    return lib.ern_guard_hit


class MapGuard:
    """The guard of one mmap: `hit()` is True once a load from it faulted (the file
    shrank under it, or its pages could not be read) and zeros were mapped there.

    The range is released when `release()` is called before the mmap is closed, or
    else when the mmap object is freed (a buffer still exported keeps it mapped)."""

    __slots__ = ("slot", "_fin", "__weakref__")

    def __init__(self, mm: mmap.mmap) -> None:
        self.slot = -1
        n = len(mm)
        if n == 0:
            return
        buf = ffi.from_buffer(mm)
        try:
            addr = ffi.cast("uintptr_t", buf)
            slot = int(lib.ern_guard_add(ffi.cast("void *", addr), n))
        finally:
            ffi.release(buf)    # no export left: mmap.close() works
        if slot < 0:
            raise OSError("no room to guard another mapped image")
        self.slot = slot
        self._fin = weakref.finalize(mm, lib.ern_guard_remove, slot)

    def hit(self) -> bool:
        return self.slot >= 0 and lib.ern_guard_hit[self.slot] != 0

    def release(self) -> None:
        if self.slot >= 0:
            self._fin()         # ern_guard_remove once, then never again
            self.slot = -1
