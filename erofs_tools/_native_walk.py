"""Checked wrapper of the C core's directory walk (csrc/walk.c): a source tree into the
nodes of a NativeBuilder, the same image as erofs_tools.builder.tree.TreeWalker gives
for the options it supports (no per-entry Python). Apart from _native.py only to keep
each module small; the cffi module still comes through it."""
from __future__ import annotations

import os
import struct
from collections.abc import Callable

from erofs_tools._native import NativeBuilder, _raise, ffi, lib

__all__ = ["FileWalk", "native_walk"]

# entries per C call: the walk returns to Python this often (progress, signals)
_STEP = 2048
# what the walk does with overlayfs whiteouts (char 0:0) and opaque xattrs: keep them
# as they are (pack), "mark" a directory holding one trusted.overlay.origin="" (mkfs, as
# mkfs.erofs 1.9), or "strip" them (--ovlfs-strip)
WHITEOUT_MODES = ("keep", "mark", "strip")


def _walk_new(b, source: str | bytes, fixed_mtime: int | None, force_uid: int | None,
              force_gid: int | None, list_files: bool, clamp_mtime: bool = False,
              whiteouts: str = "keep", uid_offset: int = 0, gid_offset: int = 0,
              hard_dereference: bool = False, no_xattrs: bool = False):
    """A C walk of `source` into builder `b` with these options (freed by the caller)."""
    src = os.fsencode(source)
    o = ffi.new("struct erofs_walk_opts *")
    o.fixed_mtime_set = fixed_mtime is not None
    o.fixed_mtime = fixed_mtime or 0
    o.clamp_mtime = int(clamp_mtime)
    if whiteouts not in WHITEOUT_MODES:
        raise ValueError(f"whiteouts: one of {WHITEOUT_MODES}")
    o.mark_whiteout_dirs = int(whiteouts == "mark")
    o.ovlfs_strip = int(whiteouts == "strip")
    o.force_uid = -1 if force_uid is None else force_uid
    o.force_gid = -1 if force_gid is None else force_gid
    if not (0 <= uid_offset < 1 << 32 and 0 <= gid_offset < 1 << 32):
        raise ValueError("uid/gid offsets: 0 .. 2^32-1")
    o.uid_offset = uid_offset
    o.gid_offset = gid_offset
    o.hard_dereference = int(hard_dereference)
    o.no_xattrs = int(no_xattrs)
    o.list_files = int(list_files)
    w = lib.erofs_walk_new(b, src, len(src), o)
    if w == ffi.NULL:
        raise MemoryError("erofs_walk_new failed")
    return w


def native_walk(builder: NativeBuilder, source: str | bytes, *,
                fixed_mtime: int | None = None, force_uid: int | None = None,
                force_gid: int | None = None,
                on_entry: Callable[[int, int], object] | None = None,
                clamp_mtime: bool = False, whiteouts: str = "keep", uid_offset: int = 0,
                gid_offset: int = 0, hard_dereference: bool = False,
                no_xattrs: bool = False) -> int:
    """Walk directory `source` into `builder` (depth first, names in byte order) and
    set its root; -> the root node. on_entry(entries, bytes) after each step."""
    b = builder._b
    w = _walk_new(b, source, fixed_mtime, force_uid, force_gid, list_files=False,
                  clamp_mtime=clamp_mtime, whiteouts=whiteouts, uid_offset=uid_offset,
                  gid_offset=gid_offset, hard_dereference=hard_dereference,
                  no_xattrs=no_xattrs)
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


_REC = struct.Struct("<IIQ")         # node, path length | sparse << 31, size


class FileWalk:
    """The C walk for pack: regular files are listed, not given file data. Each
    `step()` walks at most `max_entries` more entries and returns the regular files it
    met, (node, path, size, sparse) in walk order (every size: a file of size 0 has a
    node but no chunks)."""

    def __init__(self, builder: NativeBuilder, source: str | bytes, *,
                 fixed_mtime: int | None = None, force_uid: int | None = None,
                 force_gid: int | None = None, clamp_mtime: bool = False) -> None:
        self._b = builder._b
        w = _walk_new(self._b, source, fixed_mtime, force_uid, force_gid, list_files=True,
                      clamp_mtime=clamp_mtime)
        self._w = ffi.gc(w, lib.erofs_walk_free)
        self._out = ffi.new("uint64_t[3]")       # entries, bytes, xattrs
        self._buf = ffi.new("const uint8_t **")
        self.done = False
        self.entries = self.bytes = self.xattrs = 0

    def step(self, max_entries: int = _STEP) -> list[tuple[int, bytes, int, bool]]:
        """Walk on; -> the regular files met. Sets `done` after the last entry."""
        out = self._out
        r = lib.erofs_walk_step(self._w, max_entries, out, out + 1)
        if r < 0:
            _raise(self._b, r)
        self.done = r == 0
        n = lib.erofs_walk_files(self._w, self._buf, out + 2)
        self.entries, self.bytes, self.xattrs = out[0], out[1], out[2]
        if not n:
            return []
        data = ffi.buffer(self._buf[0], n)[:]
        files = []
        unpack = _REC.unpack_from
        pos = 0
        while pos < n:
            node, plen, size = unpack(data, pos)
            sparse = plen >> 31
            plen &= 0x7FFFFFFF
            files.append((node, data[pos + 16:pos + 16 + plen], size, bool(sparse)))
            pos += 16 + ((plen + 7) & ~7)
        return files

    @property
    def root(self) -> int:
        return int(lib.erofs_walk_root(self._w))

    def close(self) -> None:
        """Free the C walk now (its open directory, buffers)."""
        ffi.release(self._w)
