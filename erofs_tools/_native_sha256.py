"""SHA-256 from the C core (csrc/sha256.c), hashlib.sha256's interface as pack uses it:
the blob id of every new blob. hashlib maps libcrypto (~3.5 MiB of pack's RSS, against
the ~45 MiB mkfs.erofs needs for the same tree); this is the x86 SHA extensions when
the CPU has them, else portable C, and drops the GIL for each update like hashlib.
Apart from _native.py only to keep each module small; the cffi module still comes
through it."""
from __future__ import annotations

from typing import TYPE_CHECKING

from erofs_tools._native import ffi, lib

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["Sha256", "accelerated", "heap_bound"]


def accelerated() -> bool:
    """True when the CPU's SHA extensions do the hashing."""
    return bool(lib.ern_sha256_accelerated())


def heap_bound(arenas: int, mmap_threshold: int) -> bool:
    """glibc's mallopt(M_ARENA_MAX, arenas) and (M_MMAP_THRESHOLD, mmap_threshold) for
    pack's process (builder/heap.py says why); True if both applied (False: not glibc).
    Here beside the blob id's hash: pack's own small needs of the C core."""
    if not (1 <= arenas <= 1024 and 0 <= mmap_threshold <= 32 << 20):
        raise ValueError("heap_bound: arenas 1-1024, a threshold of at most 32 MiB")
    return bool(lib.ern_heap_bound(arenas, mmap_threshold))


class Sha256:
    """hashlib.sha256 as far as pack needs it: update, digest, hexdigest, copy.
    portable=True: the portable C code even where the SHA extensions are there."""
    name = "sha256"
    digest_size = 32
    block_size = 64

    def __init__(self, data: Buffer | None = None, portable: bool = False) -> None:
        self._s = ffi.new("struct ern_sha256 *")
        lib.ern_sha256_init(self._s, 1 if portable else 0)
        if data is not None:
            self.update(data)

    def update(self, data: Buffer) -> None:
        mv = memoryview(data)
        if not mv.c_contiguous:
            raise ValueError("Sha256.update: the data is not contiguous")
        n = mv.nbytes
        if n:
            lib.ern_sha256_update(self._s, ffi.from_buffer("uint8_t[]", mv), n)

    def copy(self) -> Sha256:
        other = Sha256.__new__(Sha256)
        other._s = ffi.new("struct ern_sha256 *", self._s[0])
        return other

    def digest(self) -> bytes:
        out = ffi.new("uint8_t[32]")
        lib.ern_sha256_final(self._s, out)
        return bytes(ffi.buffer(out, 32))

    def hexdigest(self) -> str:
        return self.digest().hex()
