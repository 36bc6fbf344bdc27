"""mkfs --vmdk-desc FILE: a VMDK descriptor ("twoGbMaxExtentFlat") that joins an image
and its extra devices (the --blobdev blob, the --tar=i tar) into one flat disk, as
mkfs.erofs 1.9 writes it. The kernel mounts such a disk as one device: with no
device= option, extra devices are read at their mapped_blkaddr in the primary device.

Read back from the finished image, not from the builder's state, so that what the
descriptor says is what the image's superblock and device table say."""
from __future__ import annotations

import struct
from collections.abc import Sequence

from erofs_tools.errors import InputError
from erofs_tools.fsutil import atomic_output, check_new_output
from erofs_tools.reader.image import open_image

SECTOR_SHIFT = 9
EXTENT_MAX_SECTORS = 0x8000_0000 >> SECTOR_SHIFT   # a FLAT extent of at most 2 GiB
HEADS, SECTORS_PER_TRACK = 16, 63


def _extents(sectors: int, name: str) -> list[str]:
    """The FLAT extent lines of one file of `sectors`: 2 GiB each, offsets in sectors."""
    out, offset = [], 0
    while sectors:
        n = min(sectors, EXTENT_MAX_SECTORS)
        out.append(f'RW {n} FLAT "{name}" {offset}')
        offset += n
        sectors -= n
    return out


def descriptor(uuid: bytes, parts: Sequence[tuple[str, int]]) -> str:
    """The descriptor text for `parts` ((file name, size in sectors), the image first);
    CID is the xor of the uuid's four little-endian words, as mkfs.erofs makes it."""
    cid = 0
    for word in struct.unpack("<4I", uuid):
        cid ^= word
    for name, _ in parts:
        if '"' in name or "\n" in name:
            raise InputError(f"--vmdk-desc: a device name a descriptor cannot quote: {name!r}")
    lines = ["# Disk DescriptorFile", "version=1", f"CID={cid:x}", "parentCID=ffffffff",
             'createType="twoGbMaxExtentFlat"', "", "# Extent description"]
    for name, sectors in parts:
        lines += _extents(sectors, name)
    total = sum(sectors for _, sectors in parts)
    cylinders = -(-total // (SECTORS_PER_TRACK * HEADS))
    lines += ["", "# The Disk Data Base", "#DDB", "", 'ddb.virtualHWVersion = "4"',
              f'ddb.geometry.cylinders = "{cylinders}"', f'ddb.geometry.heads = "{HEADS}"',
              f'ddb.geometry.sectors = "{SECTORS_PER_TRACK}"', 'ddb.adapterType = "ide"']
    return "\n".join(lines) + "\n"


def check_vmdk_path(path: str) -> None:
    """Refused before any work: a directory, a device or FIFO, a missing parent."""
    check_new_output(path, f"--vmdk-desc={path}")


def write_vmdk_desc(path: str, image: str, device_names: Sequence[str]) -> None:
    """Write the descriptor of `image` (named in it as given) and its extra devices,
    named by `device_names` in the device table's order, to `path` (atomically)."""
    with open_image(image) as img:
        shift = img.blkszbits - SECTOR_SHIFT
        if len(img.devices) != len(device_names):
            raise InputError(f"--vmdk-desc: the image has {len(img.devices)} extra "
                             f"device(s), {len(device_names)} named")
        parts = [(image, img.blocks << shift)]
        parts += [(name, dev.blocks << shift) for name, dev in zip(device_names, img.devices)]
        text = descriptor(img.sb.uuid, parts)
    with atomic_output(path) as f:
        f.write(text.encode())
