"""Bytes handed to the C builder straight from a Python buffer (no intermediate bytes
copy): a pack's chunk info table is ~4 MiB (80 bytes per chunk), and NativeBuilder.
put_bytes would copy it once more before the C core takes its own copy. Apart from
_native.py only to keep each module small; the cffi module still comes through it."""
from __future__ import annotations

from erofs_tools._native import NativeBuilder, _raise, ffi, lib

__all__ = ["blob_blocks", "put_buffer", "rebase_chunks", "reserve_bytes", "set_blob",
           "set_metazone", "start_writeback", "set_gap", "gap_blk"]


def put_buffer(nb: NativeBuilder, offset: int, data: bytearray | memoryview) -> None:
    """NativeBuilder.put_bytes(offset, data) without copying `data` in Python."""
    if nb._b is None:
        raise ValueError("builder closed")
    n = len(data) if isinstance(data, bytearray) else data.nbytes
    r = lib.erofs_builder_put_bytes(nb._b, offset, ffi.from_buffer(data), n)
    if r:
        _raise(nb._b, r)


def reserve_bytes(nb: NativeBuilder, offset: int, length: int) -> None:
    """Grow the image by `length` bytes at `offset` (at or after its end, after layout)
    without handing them over: zeros in the written image, for the caller to pwrite into
    the file after NativeBuilder.write (pack's chunk info table, so that the C core
    keeps no copy of it)."""
    if nb._b is None:
        raise ValueError("builder closed")
    r = lib.erofs_builder_put_bytes(nb._b, offset, ffi.NULL, length)
    if r:
        _raise(nb._b, r)


def rebase_chunks(nb: NativeBuilder, base: int) -> None:
    """After layout, before NativeBuilder.write: add `base` to every block address of
    the 4-byte block maps given by set_chunks (holes and 8-byte indexes untouched):
    mkfs --tar=i,MAPFILE's data region, placed after the metadata."""
    if nb._b is None:
        raise ValueError("builder closed")
    if not 0 <= base < 1 << 32:
        raise ValueError(f"rebase_chunks: base {base} out of range")
    r = lib.erofs_builder_rebase_chunks(nb._b, base)
    if r:
        _raise(nb._b, r)


def start_writeback(fd: int) -> None:
    """Start writing what `fd` holds so far back to the disk, without waiting for it
    (pack's bootstrap: its fsync then waits for less). Advice only: a file system or
    kernel without it is left alone."""
    lib.ern_start_writeback(fd)


def set_blob(nb: NativeBuilder, fd: int) -> None:
    """mkfs --blobdev (BuildOptions.chunkbits set), before the first file: the chunks'
    data goes to fd, device 1, instead of the image."""
    r = lib.erofs_builder_set_blob(nb._b, fd)
    if r:
        _raise(nb._b, r)


def set_metazone(nb: NativeBuilder, flags: int) -> None:
    """mkfs --MZ, before the first node: ERN_MZ_INODES (1), the inode records in a zone
    after the data; with ERN_MZ_DIRS (2) too, the directories' blocks after them
    (csrc/metazone.c)."""
    if nb._b is None:
        raise ValueError("builder closed")
    r = lib.erofs_builder_set_metazone(nb._b, flags)
    if r:
        _raise(nb._b, r)


def blob_blocks(nb: NativeBuilder) -> int:
    """The blocks written to the blob of set_blob so far."""
    n = ffi.new("uint64_t *")
    lib.erofs_builder_blob_blocks(nb._b, n)
    return int(n[0])


def set_gap(nb: NativeBuilder, blocks: int) -> None:
    """Before layout, with -m -z: `blocks` blocks left unwritten right before the
    metabox's (compressed in place at the image's end): mkfs --tar=i,MAPFILE's region."""
    if nb._b is None:
        raise ValueError("builder closed")
    r = lib.erofs_builder_set_gap(nb._b, blocks)
    if r:
        _raise(nb._b, r)


def gap_blk(nb: NativeBuilder) -> int:
    """After layout, with -m -z: the first block of the gap set_gap left."""
    if nb._b is None:
        raise ValueError("builder closed")
    r = lib.erofs_builder_gap_blk(nb._b)
    if r < 0:
        _raise(nb._b, r)
    return int(r)
