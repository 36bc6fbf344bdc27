"""`mkfs --tar=MODE,MAPFILE`: the tar map of mkfs.erofs 1.9.4.

With `--tar=i,MAPFILE` (or `0,MAPFILE`) the index keeps the block size of `-b` (no
512-byte blocks, no tar device): every regular file is CHUNK_BASED with a 4-byte block
map into a data region after the metadata, laid out in archive order, each entry's data
rounded up to whole blocks (an entry a later one of the same path replaces keeps its
blocks, unreferenced, as there); with a compressed metabox (-m -z), which is compressed
in place at the image's end, right before its blocks, where mkfs.erofs 1.9.4 has it too.
The region is left unwritten (zeros, sparse): MAPFILE says where each file's blocks come
from in the (uncompressed) tar, one line per file with data, in nid order, as mkfs.erofs
1.9.4 prints them:

    "%08x %8x %08x" image block, block count, tar offset of the data (hex)
    " %08u"         and, when the file's last block is partial, the bytes at its end
                    that are not the file's (decimal): they must read as zeros

A consumer builds the whole image from the index and the tar: copies (or maps, at
512-byte granularity: a tar's data starts on a 512-byte boundary) each line's blocks
from the tar, zeros in place of the last `zeroed` bytes. Nothing is asked of the data's
alignment in the tar. With `f` or `headerball`, whose data is in the image (or absent),
MAPFILE is written empty, as mkfs.erofs 1.9.4 writes it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

from erofs_tools.errors import InputError
from erofs_tools.format import erofs as E
from erofs_tools.fsutil import atomic_output

# --tar's modes as mkfs.erofs 1.9.4 reads them: "0" is "i", "" (as in "--tar=,MAP") "f"
TAR_ALIASES = {"f": "f", "": "f", "i": "i", "0": "i", "headerball": "headerball"}


def parse_tar_arg(value: str) -> tuple[str, str | None]:
    """`--tar=MODE[,MAPFILE]` -> (f|i|headerball, MAPFILE or None). As mkfs.erofs
    1.9.4: everything after the first comma names the map (commas included), an empty
    name is no map; an unknown MODE is refused here (1.9.4 builds a full image)."""
    mode, comma, mapfile = value.partition(",")
    if mode not in TAR_ALIASES:
        raise InputError(f"--tar={value}: unknown mode {mode!r} (f, i, 0 or headerball, "
                         "optionally followed by ,MAPFILE)")
    return TAR_ALIASES[mode], (mapfile or None) if comma else None


def check_map_options(mode: str, mapfile: str | None, given: dict[str, Any]) -> None:
    """One line for an option (CLI name -> its value, truthy when given) that mkfs.erofs
    1.9.4 takes with a map but builds wrong, or that this mode does not build."""
    if mapfile is None:
        return
    # 1.9.4 prints each chunk's size as its tar offset (--tar=f), or writes an image of
    # one block whose block maps point past its end (--tar=i); --blobdev needs it
    refused = ["--chunksize", "--blobdev"]
    for name in refused:
        if given.get(name):
            raise InputError(f"--tar={mode},MAPFILE: {name} is not supported")


def region(sizes: Sequence[int], blkszbits: int) -> tuple[list[int], int]:
    """Each entry's first block in the data region (archive order, -1: no data) and the
    region's length in blocks."""
    starts = []
    at = 0
    for size in sizes:
        if size:
            starts.append(at)
            at += (size + (1 << blkszbits) - 1) >> blkszbits
        else:
            starts.append(-1)
    return starts, at


def chunk_map(size: int, start: int, blkszbits: int) -> tuple[int, list[int]]:
    """(chunk format, block map) of a file whose data is at region block `start`: as
    mkfs.erofs 1.9.4, one chunk of the file's size rounded up to a power of two (at
    most 2^31 blocks a chunk), the blocks contiguous."""
    cbits = max(blkszbits, (size - 1).bit_length())
    cbits = min(cbits, blkszbits + E.CHUNK_FORMAT_BLKBITS_MASK)
    csz = 1 << cbits
    return cbits - blkszbits, [start + (i * csz >> blkszbits) for i in range(-(-size // csz))]


def map_line(blk: int, size: int, offset: int, blkszbits: int) -> bytes:
    nblocks = (size + (1 << blkszbits) - 1) >> blkszbits
    zeroed = (nblocks << blkszbits) - size
    line = f"{blk:08x} {nblocks:8x} {offset:08x}"
    return (line + (f" {zeroed:08d}" if zeroed else "") + "\n").encode()


def write_map(out: BinaryIO, lines: list[tuple[int, bytes]]) -> None:
    """The lines (nid, text) in nid order: the order mkfs.erofs 1.9.4 writes inodes."""
    lines.sort()
    out.write(b"".join(text for _, text in lines))


def reserved_lines(outs: Sequence[Any], data_path: str, blkszbits: int) -> list[bytes]:
    """`--clean=rvsp`/`--incremental=rvsp --tar=f,MAPFILE`: a line for each new file
    (incr_write.Out) whose blocks are reserved, in block order, as mkfs.erofs 1.9.4
    prints them while it reserves them one after another."""
    rows = []
    for o in outs:
        if not (o.reserve and o.nblocks and isinstance(o.data, tuple)):
            continue
        path, offset = o.data
        if path != data_path:           # (a sparse entry's expanded copy)
            raise InputError("a sparse file cannot be mapped (--tar=f,MAPFILE with rvsp)")
        rows.append((o.blkaddr, map_line(o.blkaddr, o.size, offset, blkszbits)))
    rows.sort()
    return [text for _, text in rows]


@contextlib.contextmanager
def map_output(path: str, umask: int) -> Iterator[BinaryIO]:
    """MAPFILE written atomically (a temporary file beside it, O_EXCL, renamed at the
    end); a FIFO or device written in place. One line when it cannot be created."""
    try:
        cm = atomic_output(path, mode=0o666 & ~umask, fsync=False, stream=True)
        f = cm.__enter__()
    except OSError as e:
        raise InputError(f"--tar=...,{path}: {e.strerror}") from None
    try:
        yield f
    except BaseException as e:
        cm.__exit__(type(e), e, e.__traceback__)
        raise
    else:
        try:
            cm.__exit__(None, None, None)
        except OSError as e:
            raise InputError(f"--tar=...,{path}: {e.strerror}") from None
