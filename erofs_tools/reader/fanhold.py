"""The fanotify fd holder's fast path in the C core (csrc/fanhold.c), for the daemon's
front end as coldpath.py is for its fills: the events of one read of the group whose
ranges are wholly filled in their cache file's bitmap, answered FAN_ALLOW and their fds
closed in one call (the holder's Python did ~30 us of work per event, one event per
~170 KiB a cold reader reads). The cffi module comes through _native.py."""
from __future__ import annotations

import array
import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from typing import Any

from erofs_tools._native import ffi, lib

__all__ = ["FilledAnswerer", "PollSet", "TouchArea", "pin", "unpin", "SERVE_TIMEOUT", "SERVE_READY",
           "SERVE_INTR", "SERVE_FULL"]

# ern_fan_serve's returns
SERVE_TIMEOUT, SERVE_READY, SERVE_INTR, SERVE_FULL = 0, 1, 2, 3


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
        # serve(): what it answered (room for two reads' worth), the read it left
        self._log = ffi.new("struct ern_fan_allowed[]", 2 * max_events)
        self._log_ns = ffi.new("uint64_t[]", 2 * max_events)
        self._nlog = ffi.new("uint32_t *")
        self._used = ffi.new("size_t *")

    def set_maps(self, maps: Sequence[tuple]) -> None:
        """The table: (st_dev, st_ino, file size, bits in the map, pin(map)[, touches])
        each; touches: a TouchArea, whose first-touch log the C core keeps for the
        events it answers."""
        arr = ffi.new("struct ern_fan_map[]", max(1, len(maps)))
        for i, (dev, ino, size, nblocks, ptr, *rest) in enumerate(maps):
            arr[i].dev, arr[i].ino, arr[i].size, arr[i].nblocks = dev, ino, size, nblocks
            arr[i].bits = ptr
            if rest and rest[0] is not None:
                t = rest[0]
                arr[i].seen, arr[i].tlog, arr[i].tlen, arr[i].tcap = \
                    t.seen_ptr, t.log_ptr, t.len_ptr, t.cap
        self._maps, self._nmaps, self._pins = arr, len(maps), list(maps)

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

    def serve(self, group_fd: int, fds: PollSet, timeout_ms: int, buf) -> tuple[int, int, int]:
        """ern_fan_serve: poll `fds`, answering the filled events of the group in C for as
        long as nothing else comes. (status, bytes of buf holding a read with events left
        for the caller (done() tells which were answered), events in that read); the
        answered ones in log(). Raises OSError if poll fails."""
        fds.sync()
        r = lib.ern_fan_serve(group_fd, fds.arr, fds.n, timeout_ms, ffi.from_buffer(buf),
                              len(buf), self._used, self._maps, self._nmaps, self._done,
                              self.max_events, self._nevents, self._log, self._log_ns,
                              2 * self.max_events, self._nlog)
        if r < 0:
            raise OSError(-r, os.strerror(-r))
        return r, self._used[0], self._nevents[0]

    def nlog(self) -> int:
        """Events the last serve() answered."""
        return self._nlog[0]

    def log(self) -> Iterator[tuple[int, int, int, int]]:
        """(map index, offset, count, CLOCK_MONOTONIC ns) of each event the last serve()
        answered."""
        n = self._nlog[0]
        for (j, _, off, count), (ns,) in zip(
                _ALLOWED.iter_unpack(ffi.buffer(self._log, _ALLOWED.size * n)),
                _NS.iter_unpack(ffi.buffer(self._log_ns, 8 * n))):
            yield j, off, count, ns

    def allowed(self, n: int) -> Iterator[tuple[int, int, int, int]]:
        """(map index, pad, offset, count) of each of the n events answered by the last
        call (n: what it returned)."""
        return _ALLOWED.iter_unpack(ffi.buffer(self._allowed, _ALLOWED.size * n))


_ALLOWED = struct.Struct("=IIQQ")        # struct ern_fan_allowed
_NS = struct.Struct("=Q")


class TouchArea:
    """A first-touch log's storage that the C core appends to (struct ern_fan_map's
    seen, tlog, tlen, tcap): `seen` one bit per block, `log` 2 x `cap` uint64 (records
    of two), `count` the records in it. The buffers never move or shrink: the pointers
    stay valid for the object's life."""

    _gen = 0

    def __init__(self, nblocks: int, keep: int = 0, old: TouchArea | None = None) -> None:
        """Room for `keep` records (copied from `old`) and nblocks more: each record has a
        block not seen before, so nblocks between two clearings of seen at most."""
        TouchArea._gen += 1
        self.gen = TouchArea._gen       # a new area is a new table for the C core
        self.cap = keep + nblocks + 1
        self.seen = bytearray(max(1, -(-nblocks // 8)))
        # untouched pages cost nothing: a cold GiB's ~6,300 records touch ~100 KiB
        self._mm = mmap.mmap(-1, 16 * self.cap, flags=mmap.MAP_PRIVATE)
        self.log = memoryview(self._mm).cast("Q")
        self.count = array.array("Q", [0])
        self.seen_ptr = ffi.from_buffer("uint8_t[]", self.seen)
        self.log_ptr = ffi.from_buffer("uint64_t[]", self._mm)
        self.len_ptr = ffi.from_buffer("uint64_t[]", self.count)
        if old is not None and keep:
            self.log[:2 * keep] = old.log[:2 * keep]
            self.count[0] = keep


class PollSet:
    """select.poll's register / modify / unregister over a struct pollfd array that
    FilledAnswerer.serve polls in C; ready() lists what the last serve() found."""

    def __init__(self) -> None:
        self._events: dict[int, int] = {}
        self._stale = True
        self.arr: Any = ffi.new("struct ern_fan_pollfd[]", 1)
        self.n = 0

    def register(self, fd: int, events: int) -> None:
        if self._events.get(fd) != events:     # the holder re-sets its socket's often
            self._events[fd] = events
            self._stale = True

    modify = register

    def unregister(self, fd: int) -> None:
        del self._events[fd]
        self._stale = True

    def sync(self) -> None:
        """The array in step with the registrations (poll(2) sets every revents)."""
        if not self._stale:
            return
        self.arr = ffi.new("struct ern_fan_pollfd[]", max(1, len(self._events)))
        self.n = len(self._events)
        for i, (fd, ev) in enumerate(self._events.items()):
            self.arr[i].fd, self.arr[i].events, self.arr[i].revents = fd, ev, 0
        self._stale = False

    def ready(self) -> list[tuple[int, int]]:
        return [(self.arr[i].fd, self.arr[i].revents) for i in range(self.n)
                if self.arr[i].revents]
