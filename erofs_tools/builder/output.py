"""Where mkfs and mkfs --tar write an image other than a new regular file: at --offset of
a file, or into a block device (fsutil.image_output opens them).

A block device is written in place, as mkfs.erofs does, with what a file gets for free
made explicit: the C core writes at `base` + the image offset, fails a write past the
device's end before making it, zero-fills the bytes the image leaves unwritten (a file
has them from its truncation; a device keeps its old bytes) and flushes before it
writes the superblock, last. Before anything is written the device is refused, with
nothing written, when a lower bound of the image does not fit (the data of a directory
or tar is streamed into the image before its final size is known, so the exact check
comes later: a build that outgrows the device then fails with the device partly
written, which the message says); then the block of the old superblock is zeroed and
flushed, so a device written halfway holds no image rather than an old one with some
new blocks.
"""
from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from typing import Protocol

from erofs_tools.errors import ErofsToolsError, InputError, Terminated
from erofs_tools.fsutil import ImageTarget, invalidate_old_image

__all__ = ["prepare", "partly_written", "tree_data_bound"]


class _Builder(Protocol):
    def set_target(self, base: int, limit: int, device: bool, dsunit: int = 0) -> None: ...


def prepare(nb: _Builder, target: ImageTarget, need: int, image: str, dsunit: int = 0) -> None:
    """Tell the builder where the image goes (and --dsunit, the data alignment); a
    device: refused (nothing written) when `need` bytes, a lower bound of the image, do
    not fit; else its old superblock is zeroed."""
    if not (target.base or target.device or dsunit > 1):
        return
    nb.set_target(target.base, target.limit, target.device, dsunit)
    if target.device:
        if need > target.limit:
            after = f" after --offset={target.base}" if target.base else ""
            raise InputError(f"{image}: the image needs at least {need} bytes, the device "
                             f"holds {target.limit}{after}: nothing written")
        invalidate_old_image(target)


@contextlib.contextmanager
def partly_written(target: ImageTarget, image: str) -> Iterator[None]:
    """A device: an error after the first write says the device no longer holds an
    image (one line; the old one is gone, the new one incomplete)."""
    try:
        yield
    except ErofsToolsError as e:
        if not target.device or "nothing written" in str(e):
            raise
        raise InputError(f"{image}: {e} (the device was partly written and holds no EROFS "
                         "image now)") from None
    except (KeyboardInterrupt, Terminated) as e:
        if target.device:
            e.add_note(f"{image} was partly written and holds no EROFS image now")
        raise


def tree_data_bound(source: str, blksz: int, stop: int) -> int:
    """A lower bound of the data bytes an uncompressed image of the tree `source` takes:
    the whole blocks of each regular file (once per inode), counting allocated bytes
    only (a sparse file's holes take none); stops counting once past `stop`."""
    total = 0
    seen: set[tuple[int, int]] = set()
    stack = [source]
    while stack and total <= stop:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            continue                # (the build says what is wrong with it)
        with it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    stack.append(e.path)
                elif stat.S_ISREG(st.st_mode) and st.st_size >= blksz:
                    if st.st_nlink > 1:
                        if (st.st_dev, st.st_ino) in seen:
                            continue
                        seen.add((st.st_dev, st.st_ino))
                    total += min(st.st_size, st.st_blocks * 512) // blksz * blksz
    return total
