"""A chunk-based inode's index array as the kernel maps it: ChunkRef, one entry, and
ChunkList, the whole array decoded on access (bounded memory for huge sparse files)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from erofs_tools.format import erofs as E


class ChunkRef(NamedTuple):
    """One entry of a chunk-based inode's index array, as the kernel maps it."""
    index: int  # type: ignore[assignment]  # chunk number within the file
    # (shadows tuple.index on purpose: the name the formats use)
    file_offset: int       # logical start in the file
    length: int            # logical bytes (the last chunk is short)
    device: int            # 0 primary, N = device-table slot N-1 (masked as the kernel does)
    blkaddr: int           # block address on that device; NULL_ADDR = hole
    raw_device_id: int     # device_id field as stored (nydus packs CI index bits in it)
    advise: int            # advise field as stored (nydus: CI index bits 0-15)

    @property
    def hole(self):
        return self.blkaddr == E.NULL_ADDR

    @property
    def ci_index(self):
        """Nydus chunk-info index packed in advise + device_id high byte."""
        return self.advise | ((self.raw_device_id >> 8) << 16)


class ChunkList(Sequence):
    """A chunk-based inode's index array, decoded on access: a sparse file can have
    millions of indexes, and one ChunkRef object each would cost ~200 bytes apiece
    (a 16 GiB hole at 4 KiB chunks: 800 MB) where the raw array costs 8."""

    def __init__(self, img, ino, raw: bytes, unit: int, bits: int, count: int,
                 wide: bool = False):
        self._img, self._ino, self._raw = img, ino, raw
        self._unit, self._bits, self._count = unit, bits, count
        self._wide = wide       # CHUNK_FORMAT_48BIT: le16 at 0 holds address bits 32-47

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self._at(i) for i in range(*k.indices(self._count))]
        if k < 0:
            k += self._count
        if not 0 <= k < self._count:
            raise IndexError(k)
        return self._at(k)

    def __iter__(self):
        for k in range(self._count):
            yield self._at(k)

    def _at(self, k: int) -> ChunkRef:
        img, raw, fo = self._img, self._raw, k << self._bits
        length = min(1 << self._bits, self._ino.size - fo)
        if self._unit == 8:
            advise = int.from_bytes(raw[8 * k:8 * k + 2], "little")
            devid = int.from_bytes(raw[8 * k + 2:8 * k + 4], "little")
            blk = int.from_bytes(raw[8 * k + 4:8 * k + 8], "little")
            dev = devid & img.device_id_mask
            if self._wide:
                # (a hole: all 48 bits set, NULL_ADDR as the 32-bit indexes' holes)
                blk = E.NULL_ADDR if advise == 0xFFFF and blk == E.NULL_ADDR \
                    else advise << 32 | blk
        else:
            advise = devid = dev = 0
            blk = int.from_bytes(raw[4 * k:4 * k + 4], "little")
        if blk != E.NULL_ADDR and dev > len(img.devices):
            raise img._err(f"inode {self._ino.nid}: chunk {k} on device {dev}, "
                           f"image has {len(img.devices)}")
        return ChunkRef(k, fo, length, dev, blk, devid, advise)
