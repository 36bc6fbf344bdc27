"""Checked wrappers of the C core's chunk-map functions (csrc/chunkmap.c): the pins of a
blob from a RAFS bootstrap's chunk-info table, their table text and the chunk map they
make, in packed records. Apart from _native.py only to keep each module small; the cffi
module still comes through it."""
from __future__ import annotations

from erofs_tools._native import NativeError, ffi, lib
from erofs_tools.errors import CorruptImageError

__all__ = ["CHUNK_FORMAT", "CHUNK_REC", "CI_ROW", "PIN_FORMAT", "PIN_REC", "ci_blob_pins",
           "ci_map", "ci_pins", "ci_table_text"]

CI_ROW = 80                     # format.rafs.ChunkInfo.SIZE
PIN_REC = 61
PIN_FORMAT = "<IQIQI32s?"       # index, uoff, usize, coff, csize, digest, compressed
CHUNK_REC = 77
CHUNK_FORMAT = "<IQIQI32s?qQ"   # reader/blob.py's BlobChunk fields: the pin's, zran -1, 0


def ci_pins(table: bytes, nblobs: int, blob: int, name: str) -> bytes:
    """Blob `blob`'s pins from the chunk-info table rows `table`, packed (PIN_FORMAT) in
    index order, exact repeats dropped. CorruptImageError (naming `name`) for a row that
    names a blob past `nblobs` or an index pinned twice differently."""
    nrows = len(table) // CI_ROW
    if len(table) != nrows * CI_ROW or not 0 <= blob < nblobs:
        raise NativeError("ci_pins: bad table length or blob")
    out = ffi.new("uint8_t[]", max(1, nrows) * PIN_REC)
    detail = ffi.new("uint64_t *")
    n = lib.ern_ci_pins(ffi.from_buffer(table), nrows, nblobs, blob, out, detail)
    if n == -1:
        raise CorruptImageError(f"{name}: chunk table names blob {detail[0]}, "
                                f"the bootstrap has {nblobs}")
    if n == -2:
        raise CorruptImageError(f"{name}: chunk table gives chunk {detail[0]} of blob "
                                f"{blob} twice, differently")
    if n < 0:
        raise MemoryError("ci_pins: out of memory")
    return bytes(ffi.buffer(out, n * PIN_REC))


def ci_table_text(pins: bytes) -> bytes:
    """What storage/image.table_digest hashes for these packed pins."""
    count = len(pins) // PIN_REC
    cap = count * (112 + 32) + 1
    out = ffi.new("uint8_t[]", cap)
    n = lib.ern_ci_table_text(ffi.from_buffer(pins), count, out, cap)
    if n < 0:
        raise NativeError("ci_table_text: buffer too small")
    return bytes(ffi.buffer(out, n))


def ci_map(pins: bytes, chunk_count: int, uncompressed_size: int, compressed_size: int,
           chunk_size: int, raw_only: bool) -> tuple[bytes, bytes] | None:
    """(map file entries, chunk records in CHUNK_FORMAT), both in uncompressed order, when
    the packed pins cover all `chunk_count` chunks and pass BlobMeta's checks; else
    None (the caller's Python path names what is wrong)."""
    count = len(pins) // PIN_REC
    if not count or count != chunk_count or uncompressed_size < 0 or compressed_size < 0 \
            or not 0 < chunk_size < 1 << 32:
        return None
    map_out = ffi.new("uint8_t[]", count * PIN_REC)
    chunks_out = ffi.new("uint8_t[]", count * CHUNK_REC)
    why = lib.ern_ci_map(ffi.from_buffer(pins), count, chunk_count, uncompressed_size,
                         compressed_size, chunk_size, 1 if raw_only else 0, map_out,
                         chunks_out)
    if why:
        return None
    return bytes(ffi.buffer(map_out, count * PIN_REC)), \
        bytes(ffi.buffer(chunks_out, count * CHUNK_REC))


def ci_blob_pins(ci: bytes, n: int, v2: bool, digests: bytes | None,
                 pins: bytes) -> bytes | None:
    """A blob's own CI table (`n` entries, v2 or v1) as packed pins (PIN_FORMAT, index
    order; ci_map makes the chunk map of them), each with its digest from `pins` (the
    bootstrap's packed pins, in index order, which must place it as the table does) or
    else from `digests` (the blob's digest section, n x 32 bytes); None when a pin is
    past the table or placed elsewhere, a flag is unknown or a chunk has no digest (the
    caller's Python path names what is wrong)."""
    if len(ci) < n * (24 if v2 else 16) or len(pins) % PIN_REC or \
            (digests is not None and len(digests) != n * 32):
        raise NativeError("ci_blob_pins: bad table, digest or pin lengths")
    out = ffi.new("uint8_t[]", max(1, n) * PIN_REC)
    why = lib.ern_ci_blob_pins(ffi.from_buffer(ci), n, 1 if v2 else 0,
                               ffi.from_buffer(digests) if digests is not None else ffi.NULL,
                               ffi.from_buffer(pins or b"\0"), len(pins) // PIN_REC, out)
    return None if why else bytes(ffi.buffer(out, n * PIN_REC))
