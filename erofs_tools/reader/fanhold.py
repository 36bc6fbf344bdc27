"""The fanotify fd holder's fast path in the C core (csrc/fanhold.c), for the daemon's
front end as coldpath.py is for its fills: the events of one read of the group whose
ranges are wholly filled in their cache file's bitmap, answered FAN_ALLOW and their fds
closed in one call (the holder's Python did ~30 us of work per event, one event per
~170 KiB a cold reader reads). The cffi module comes through _native.py."""
from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import Any

from erofs_tools._native import ffi, lib

__all__ = ["FilledAnswerer", "pin", "unpin"]


def pin(buf) -> Any:
    """A C pointer to `buf`'s bytes (a bitmap mapping), held until unpin(): the buffer
    cannot be closed meanwhile (mmap.close raises BufferError)."""
    return ffi.from_buffer("uint8_t[]", buf)


def unpin(ptr) -> None:
    ffi.release(ptr)


class FilledAnswerer:
    """One holder's call state: the table of maps and the per-read result arrays."""

    def __init__(self, max_events: int) -> None:
        self.max_events = max_events
        self._done = ffi.new("uint8_t[]", max_events)
        self._allowed = ffi.new("struct ern_fan_allowed[]", max_events)
        self._nevents = ffi.new("uint32_t *")
        self._maps = ffi.new("struct ern_fan_map[]", 1)
        self._nmaps = 0
        self._pins: list = []       # the pointers the table holds, kept alive with it

    def set_maps(self, maps: Sequence[tuple[int, int, int, int, Any]]) -> None:
        """The table: (st_dev, st_ino, file size, bits in the map, pin(map)) each."""
        arr = ffi.new("struct ern_fan_map[]", max(1, len(maps)))
        for i, (dev, ino, size, nblocks, ptr) in enumerate(maps):
            arr[i].dev, arr[i].ino, arr[i].size, arr[i].nblocks = dev, ino, size, nblocks
            arr[i].bits = ptr
        self._maps, self._nmaps, self._pins = arr, len(maps), [m[4] for m in maps]

    def allow(self, group_fd: int, buf) -> tuple[int, int] | None:
        """Answer the filled events of `buf` (one read of group_fd): (allowed, events),
        or None if the stream is malformed (nothing answered)."""
        if not self._nmaps:
            return None
        n = lib.ern_fan_allow_filled(group_fd, ffi.from_buffer(buf), len(buf), self._maps,
                                     self._nmaps, self._done, self.max_events,
                                     self._allowed, self._nevents)
        if n < 0:
            return None
        return n, self._nevents[0]

    def done(self, i: int) -> bool:
        """Whether event i of the last buffer was answered (and its fd closed) here."""
        return bool(self._done[i])

    def allowed(self, n: int) -> Iterator[tuple[int, int, int, int]]:
        """(map index, pad, offset, count) of each of the n events answered by the last
        call (n: what it returned)."""
        return _ALLOWED.iter_unpack(ffi.buffer(self._allowed, _ALLOWED.size * n))


_ALLOWED = struct.Struct("=IIQQ")        # struct ern_fan_allowed
