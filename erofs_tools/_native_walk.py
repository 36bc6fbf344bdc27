"""Checked wrapper of the C core's directory walk (csrc/walk.c): a source tree into the
nodes of a NativeBuilder, the same image as erofs_tools.builder.tree.TreeWalker gives
for the options it supports (no per-entry Python). Apart from _native.py only to keep
each module small; the cffi module still comes through it."""
from __future__ import annotations

import os
from collections.abc import Callable

from erofs_tools._native import NativeBuilder, _raise, ffi, lib

__all__ = ["native_walk"]

# entries per C call: the walk returns to Python this often (progress, signals)
_STEP = 2048


def native_walk(builder: NativeBuilder, source: str | bytes, *,
                fixed_mtime: int | None = None, force_uid: int | None = None,
                force_gid: int | None = None,
                on_entry: Callable[[int, int], object] | None = None) -> int:
    """Walk directory `source` into `builder` (breadth first, names in byte order) and
    set its root; -> the root node. on_entry(entries, bytes) after each step."""
    src = os.fsencode(source)
    o = ffi.new("struct erofs_walk_opts *")
    o.fixed_mtime_set = fixed_mtime is not None
    o.fixed_mtime = fixed_mtime or 0
    o.force_uid = -1 if force_uid is None else force_uid
    o.force_gid = -1 if force_gid is None else force_gid
    b = builder._b
    w = lib.erofs_walk_new(b, src, len(src), o)
    if w == ffi.NULL:
        raise MemoryError("erofs_walk_new failed")
    entries = ffi.new("uint64_t *")
    nbytes = ffi.new("uint64_t *")
    try:
        while True:
            r = lib.erofs_walk_step(w, _STEP, entries, nbytes)
            if r < 0:
                _raise(b, r)
            if on_entry is not None:
                on_entry(entries[0], nbytes[0])
            if r == 0:
                return int(lib.erofs_walk_root(w))
    finally:
        lib.erofs_walk_free(w)
