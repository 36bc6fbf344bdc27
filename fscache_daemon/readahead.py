"""Readahead: which chunks of a blob to fetch before the kernel asks for them.

The daemon sees only the requests that reach it, so readahead is driven by two kinds:

- a miss (the range had to be fetched). A reader that is not sequential gets the rest of
  the file the range belongs to (readers mostly read whole files; the file runs come from
  the bootstrap). A sequential one (the chunk before the range is cached) starts a window
  beyond the range, or, when it caught up with the window in flight, a window twice as
  large after it.
- a marker hit. The first chunk each sequential window fetches is its marker. With the
  fanotify front end the marker's "filled" bits are withheld from the fd holder, so the
  reader's first access to it comes to the daemon although the data is already there:
  that access means the reader has entered the window, and the next one (twice the size,
  up to the maximum) is started at once. This is the kernel's PG_readahead scheme: a
  sequential reader stays a window ahead and never waits for a fetch, while a reader that
  stops costs at most the window in flight. Without a marker hit (cachefiles only asks
  for what is missing) a sequential reader still gets a window per miss.

Only the plan lives here; the daemon fetches the chunks and the front end withholds and
publishes markers.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

# a sequential window never starts further than this many windows past a cached stretch
MAX_SKIPPED_WINDOWS = 64
# requests remembered to tell a sequential reader's miss from a random one
RECENT_REQUESTS = 32


class Window(NamedTuple):
    chunks: list          # chunks to fetch: neither cached nor in flight
    marker: object        # the chunk whose first access starts the next window, or None


class BlobReadahead:
    """The readahead state of one blob (thread-safe).

    `mgr` is the blob's BlobManager (meta, cache.has, absent, run_end, size); `withhold`
    and `publish` are called with a chunk when it becomes, or stops being, the marker.
    """

    def __init__(self, mgr, initial: int, maximum: int,
                 withhold: Callable[[object], None] = lambda c: None,
                 publish: Callable[[object], None] = lambda c: None):
        self.mgr = mgr
        self.maximum = max(0, maximum)
        self.initial = min(max(0, initial), self.maximum)
        self._withhold = withhold
        self._publish = publish
        self._lock = threading.Lock()
        self.marker = None        # chunk
        self.win_start = 0        # the latest sequential window: [win_start, win_end)
        self.win_end = 0
        self.size = 0
        # the last chunks of the latest requests that reached us: a miss right after
        # one of them is a sequential reader's (several readers interleave)
        self._recent: deque[int] = deque(maxlen=RECENT_REQUESTS)

    def on_request(self, offset: int, length: int, fetched: bool) -> Window | None:
        """The daemon served [offset, offset+length) (`fetched`: it had to fetch some of
        it). Returns what to fetch next, if anything."""
        if not self.maximum:
            return None
        meta = self.mgr.meta
        chunks = meta.chunks_for_range(offset, max(1, length))
        if not chunks:
            return None
        first, last = chunks[0], chunks[-1]
        with self._lock:
            self._recent.append(last.index)
            m = self.marker
            if m is not None and first.index <= m.index <= last.index:
                self._set_marker(None)
                return self._sequential(self.win_end, min(2 * self.size, self.maximum))
            if not fetched:
                return None
            pos = first.uncompressed_offset
            prev = meta.chunks_for_range(pos - 1, 1) if pos else []
            if prev and self.mgr.cache.has(prev[0]):
                if self.size and self.win_start <= pos <= self.win_end:
                    # caught up with the window in flight, or (no marker hit: cachefiles
                    # asks only for what is missing) just finished it: the next one,
                    # larger, now
                    return self._sequential(max(self.win_end, last.uncompressed_end),
                                            min(2 * self.size, self.maximum))
                if prev[0].index in self._recent:
                    return self._sequential(last.uncompressed_end, self.initial)
                # the chunk before is there, but no reader asked for it lately (another
                # window or reader brought it): a random read (a program's start reading
                # scattered small files), not the next step of a sequential one; windows
                # there would fetch several times what is read (issue 15's startup set)
            start = last.uncompressed_end
            end = min(self.mgr.run_end(last), start + self.maximum)
            if end <= start:
                return None
            return Window(self.mgr.absent(start, end - start), None)

    def _sequential(self, start: int, size: int) -> Window | None:
        size = max(size, self.initial, 1)
        chunks = []
        for _ in range(MAX_SKIPPED_WINDOWS):
            if start >= self.mgr.size:
                break
            chunks = self.mgr.absent(start, size)
            if chunks:
                break
            start += size   # all there or on its way: look further
        self.win_start, self.win_end, self.size = start, start + size, size
        if not chunks:
            return None
        self._set_marker(chunks[0])
        return Window(chunks, chunks[0])

    def _set_marker(self, chunk) -> None:
        old, self.marker = self.marker, chunk
        if old is not None:
            self._publish(old)
        if chunk is not None:
            self._withhold(chunk)

    def reset(self) -> None:
        """Forget the window and publish a withheld marker (the blob is going away)."""
        with self._lock:
            self._set_marker(None)
            self.size = self.win_start = self.win_end = 0
