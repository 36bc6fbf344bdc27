"""mkfs --incremental --tar=i: a tar layer indexed in place, as mkfs.erofs 1.9.4 lays
one over a base image without extra devices.

The layer's regular files stay in the tar: each is CHUNK_BASED with 8-byte chunk
indexes naming device 1 (the tar) at block tar offset / block size, so every file's
data must start on a block boundary of the base (any tar on a 512-byte-block base; on
a 4 KiB one only a tar whose data is 4 KiB-aligned: refused otherwise, as 1.9.4 does).
The base gains one device slot, appended after the new metadata (the superblock names
it by a 16-bit slot offset: it must lie in the image's first 8 MiB) with the tar's
size in blocks and, as mapped_blkaddr, the image's own size. A base that already has
devices is refused: its files name device 1 by number, and mkfs.erofs 1.9.4, which
replaces the device table, leaves them reading the new tar's bytes.
"""
from __future__ import annotations

import os
from typing import Any

from erofs_tools.errors import InputError
from erofs_tools.format import erofs as E

SLOTOFF_MAX = 0xFFFF


def chunks(d: Any, size: int, bits: int, path: bytes) -> tuple[int, bytes]:
    """(chunk format, chunk index bytes) of a layer file whose data is at d (a tar
    offset, or mkfs_tar's _Data of a sparse entry)."""
    from erofs_tools.builder.mkfs_tar import _chunk_entries, _Data
    data = d if isinstance(d, _Data) else _Data(int(d))
    regions = [data.offset] if data.sparse is None else []
    if data.sparse is not None:
        toff = data.offset
        for _off, ln in data.sparse:
            if ln:
                regions.append(toff)
            toff += ln
    for off in regions:
        if off % (1 << bits):
            raise InputError(f"{os.fsdecode(path)}: data at tar offset {off} is not aligned "
                             f"to the base image's {1 << bits}-byte blocks (--tar=i "
                             "indexes the tar in place; use --tar=f)")
    fmt, ents = _chunk_entries(data, size, path, bits)
    return fmt, b"".join(e.to_bytes(8, "little") for e in ents)


def device_slot(tar_size: int, blksz: int, primary_blocks: int) -> bytes:
    blocks = -(-tar_size // blksz)
    return E.DeviceSlot(tag=b"", blocks=blocks & 0xFFFFFFFF, mapped_blkaddr=primary_blocks,
                        blocks_hi=blocks >> 32).encode()


def slot_place(outs: list[Any], blksz: int, total_blocks: int) -> int | None:
    """A 128-byte-aligned place for the slot in the last block's room after the new
    records, if there is one."""
    last = (total_blocks - 1) * blksz
    ends = [o.offset + o.record for o in outs if o.offset >= 0 and o.offset + o.record > last]
    if not ends:
        return None
    at = max(last, -(-max(ends) // E.DEVICE_SLOT_SIZE) * E.DEVICE_SLOT_SIZE)
    return at if at + E.DEVICE_SLOT_SIZE <= last + blksz else None


def slot_offset(at: int, name: str) -> int:
    """The device table's slot offset of byte `at`, or one line."""
    slot = at // E.DEVICE_SLOT_SIZE
    if slot > SLOTOFF_MAX:
        raise InputError(f"{name}: --incremental --tar=i: the device table would start at "
                         f"byte {at}, past the 8 MiB a superblock can point to")
    return slot
