"""An image file's bytes for the reader: mapped, and guarded against the file changing
under the mapping.

A file mapped read-only that someone truncates meanwhile used to kill the reading
process with SIGBUS (exit 135, `unpack -o`'s temporary tree left behind). Three ways
out were weighed (docs/reliability.md, "Bugs found and fixed"):

- reading with pread instead of mapping: every decode of the reader works on one
  buffer (struct decoders, the C walk of csrc/fileruns.c), so a bootstrap would be
  read whole into memory (and a plain image of gigabytes could not be), or every
  field access would become a system call; and `Image.read` and the data pieces
  alone through pread were no cheaper than the mapping (docs/performance.md, helper
  run readsafe);
- a private copy of the file first: a whole extra read and write of the image;
- keeping the mapping and answering the fault (chosen): csrc/imageguard.c's SIGBUS
  handler maps zero pages over the lost range and sets this mapping's flag; the reader
  checks the flag after each copy out of the mapping (`Image.read`, the data pieces,
  inodes, lcluster indexes) and raises ImageChangedError before any byte read after
  the shrink reaches an output. While the file stays as it is, that is one load of
  the flag per copy (36 ns).

A shrink to a size inside a page is not a fault (the page's tail reads as zeros), and
neither is a rewrite in place: `changed()` compares the file's size, mtime and ctime
with those at open time; the tools call it before they commit an output (and before
each MiB of an `unpack --tar` stream, each 512 lines of `inspect`), so such a change
fails the command instead of being written. The ctime is what catches a writer that
sets the mtime back (utime): no user can set a ctime, and every write moves it. It
also moves on chmod, chown, xattr and link changes, which fail the command too
(rather a refusal than a mix of old and new bytes).
"""
from __future__ import annotations

import mmap
import os
import weakref

from erofs_tools._native_guard import MapGuard, guard_flags
from erofs_tools.errors import CorruptImageError, ImageChangedError

UNGUARDED = b"\0"               # the flags of a source that cannot change: never set


class MappedFile:
    """The bytes of the regular file at `fd` (`data`: an mmap, or bytes when its size
    is 0 or no guard slot is left), `flags[slot]` set once the mapping faulted."""

    def __init__(self, fd: int, name: str) -> None:
        self.name = name
        self.guard: MapGuard | None = None
        self.mm: mmap.mmap | None = None
        self.flags, self.slot = guard_flags(), 0
        st = os.fstat(fd)
        self.stamp = _stamp(st)
        self.stat_fd = os.dup(fd)
        # closed with the object too: an Image whose parse failed is not closed (its
        # mapping goes with the mmap object; this descriptor would stay open for good)
        self._fin = weakref.finalize(self, os.close, self.stat_fd)
        try:
            if st.st_size == 0:
                self.data: bytes | mmap.mmap = b""
                self.flags = UNGUARDED
                return
            try:
                self.mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise CorruptImageError(f"{name}: cannot map ({e})") from None
            try:
                self.guard = MapGuard(self.mm)
                self.slot = self.guard.slot
                self.data = self.mm
            except OSError:         # every slot taken: a copy in memory then
                self.mm.close()
                self.mm = None
                self.data = _read_all(fd, st.st_size, name)
                self.flags = UNGUARDED
            if len(self.data) != st.st_size:
                raise self.changed() or ImageChangedError(
                    f"{name}: the image file changed while it was opened")
        except BaseException:
            self.close()
            raise

    def changed(self) -> ImageChangedError | None:
        """The error to raise when the file is no longer what was opened (its size,
        mtime or ctime moved, or a load from the mapping faulted), else None."""
        if self.stat_fd < 0:
            return None
        try:
            st = os.fstat(self.stat_fd)
        except OSError as e:
            return ImageChangedError(f"{self.name}: cannot stat the image file ({e.strerror})")
        if _stamp(st) != self.stamp:
            return ImageChangedError(f"{self.name}: the image file changed while it was read "
                                     f"(now {st.st_size} bytes)")
        if self.flags[self.slot]:
            return ImageChangedError(f"{self.name}: the image file could not be read through "
                                     "its mapping (an I/O error, or it shrank and grew back)")
        return None

    def close(self) -> None:
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                pass            # still exported: the guard stays until the mmap is freed
            else:
                if self.guard is not None:
                    self.guard.release()
            self.mm = None
        if self.stat_fd >= 0:
            self._fin()         # os.close, once
            self.stat_fd = -1


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _read_all(fd: int, size: int, name: str) -> bytes:
    out = bytearray(size)
    view = memoryview(out)
    pos = 0
    while pos < size:
        n = os.preadv(fd, [view[pos:]], pos)
        if n <= 0:
            raise ImageChangedError(f"{name}: the image file changed while it was read "
                                    f"(now {pos} bytes)")
        pos += n
    return bytes(out)
