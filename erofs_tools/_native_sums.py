"""Checked wrappers of the C core's checksums: CRC-32C, the EROFS superblock checksum
and xxHash32 (the xattr name filters' hash). Apart from _native.py only to keep each
module small; the cffi module still comes through it."""
from __future__ import annotations

from erofs_tools._native import NativeError, lib
from erofs_tools.format import erofs as E

__all__ = ["crc32c", "sb_checksum", "xxh32"]


def crc32c(data: bytes, crc: int = 0) -> int:
    """Standard CRC-32C (as zlib-style crc32c libraries: init ~0, final xor)."""
    data = bytes(data)
    return lib.erofs_crc32c_update(crc ^ 0xFFFFFFFF, data, len(data)) ^ 0xFFFFFFFF


def sb_checksum(block: bytes) -> int:
    """EROFS superblock checksum of an image's first 4 KiB block (checksum field ignored)."""
    block = bytes(block)
    if len(block) < E.BLKSZ:
        raise NativeError(f"need the first {E.BLKSZ} bytes of the image")
    return lib.erofs_sb_checksum(block, E.BLKSZ)


def xxh32(data: bytes, seed: int = 0) -> int:
    """xxHash32 of data (the hash of EROFS's xattr name filters)."""
    data = bytes(data)
    if not 0 <= seed < 1 << 32:
        raise NativeError(f"xxh32 seed {seed} out of range")
    return int(lib.ern_xxh32(data, len(data), seed))
