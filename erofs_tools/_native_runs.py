"""Checked wrapper of the C core's bootstrap walk for file runs (csrc/fileruns.c): each
regular file's path and the contiguous ranges its data takes in the blobs, the reader's
walk done in one C call with the GIL released (the daemon's file-aware readahead walks
a 50,000-file bootstrap while a container's start reads through it). Apart from
_native.py only to keep each module small; the cffi module still comes through it."""
from __future__ import annotations

import struct

from erofs_tools._native import ffi, lib

__all__ = ["RUN_FORMAT", "file_runs_lists", "file_runs_raw", "file_runs_walk"]

RUN_FORMAT = "<IIQQ"            # file number, blob index, start, end


def file_runs_walk(data, meta_off: int, blkszbits: int, root_nid: int, devmask: int,
                   ndevices: int, max_inodes: int
                   ) -> tuple[list[bytes], list[tuple[int, int, int, int]]] | None:
    """(paths, runs) of the regular files with data in a blob, in the reader's walk order
    (Image.walk, a file at its first link), for the image bytes `data`: runs are (file
    number in paths, blob index, start, end); None where the tree holds something the
    reader refuses (its walk decides what to skip then)."""
    raw = file_runs_raw(data, meta_off, blkszbits, root_nid, devmask, ndevices, max_inodes)
    return None if raw is None else file_runs_lists(*raw)


def file_runs_raw(data, meta_off: int, blkszbits: int, root_nid: int, devmask: int,
                  ndevices: int, max_inodes: int) -> tuple[bytes, int] | None:
    """file_runs_walk's C walk alone: its output and where the paths end in it, for
    file_runs_lists (None as there). The lists are the part that holds the GIL (~12 ms
    for 28,000 files), which the daemon makes after a mount rather than beside it."""
    out = ffi.new("uint8_t **")
    plen = ffi.new("uint64_t *")
    n = lib.ern_file_runs(ffi.from_buffer(data), len(data), meta_off, blkszbits, root_nid,
                          devmask, ndevices, max_inodes, out, plen)
    if n == -1:
        return None
    if n < 0:
        raise MemoryError("file_runs_walk: out of memory")
    try:
        raw = bytes(ffi.buffer(out[0], n)) if n else b""
    finally:
        lib.ern_file_runs_free(out[0])
    return raw, int(plen[0])


def file_runs_lists(raw: bytes, cut: int
                    ) -> tuple[list[bytes], list[tuple[int, int, int, int]]]:
    """(paths, runs) of file_runs_raw's output."""
    paths = raw[:cut].split(b"\0")[:-1]
    return paths, list(struct.iter_unpack(RUN_FORMAT, memoryview(raw)[cut:]))
