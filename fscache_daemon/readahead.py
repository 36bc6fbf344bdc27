"""Readahead: which chunks of a blob to fetch before the kernel asks for them.

The daemon sees only the requests that reach it, so readahead is driven by two kinds:

- a miss (the range had to be fetched).
  - A reader that is not sequential, in a file no bigger than the largest window (the
    file runs come from the bootstrap), gets the rest of that file (readers mostly read
    whole files) and the small files after it, up to NEIGHBOURS: a program's start reads
    a package's modules together, and without this each of them was a miss of its own
    (ML cold start: 204 of 333 misses were first reads of .pyc files; 88 with it).
  - In a bigger file (a large shared library, whose mmap'ed pages fault in at random
    places) it gets only AROUND after the range: when each such miss got 16 MiB of its
    file, 15 misses fetched 54 of the 129 MB of readahead of the ML cold start.
  - A sequential reader (the chunk before the range is cached, past cold files) starts a
    window beyond the range, or, when it caught up with the window in flight, a window
    twice as large after it.
- a marker hit. The first chunk each sequential window fetches is its marker. With the
  fanotify front end the marker's "filled" bits are withheld from the fd holder, so the
  reader's first access to it comes to the daemon although the data is already there:
  that access means the reader has entered the window, and the next one (twice the size,
  up to the maximum; not grown after a stretch of small files) is started at once. This
  is the kernel's PG_readahead scheme: a sequential reader stays a window ahead and never
  waits for a fetch, while a reader that stops costs at most the window in flight.
  Without a marker hit (cachefiles only asks for what is missing) a sequential reader
  still gets a window per miss.

Windows leave out the chunks of files a program's start rarely reads (the manager's
`is_cold`: sources beside their compiled Python, headers, stubs; image.file_runs), except
the rest of the file being read: they were 45 % of what the windows fetched on the ML
cold start, and 12 of their 2,400 chunks were ever read.

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
# A window whose chunks average less than this is a stretch of small files. A reader
# entering it says little about the files after it: on the ML cold start 10 % of the
# bytes of the windows such marker hits started were ever read, against 54 % in big
# files. The next window after a small-file window is not grown.
SMALL_FILES_CHUNK = 256 << 10
# the sequential test looks back past at most this many chunks of cold files
MAX_COLD_SKIP = 64
# A random miss in a file bigger than the largest window: this much after it (the first
# 1 MiB after such misses was 90 % read, the second 48 %, beyond 4 MiB nothing)
AROUND = 1 << 20
# A random miss in a file read whole: the small files (chunks under SMALL_FILES_CHUNK)
# within this many bytes after it come too
NEIGHBOURS = 1 << 20
# requests remembered to tell a sequential reader's miss from a random one
RECENT_REQUESTS = 32


class Window(NamedTuple):
    chunks: list          # chunks to fetch: neither cached nor in flight
    marker: object        # the chunk whose first access starts the next window, or None
    kind: str = "file"    # why: "file", "neighbours", "sequential", "marker" (for logs)


class BlobReadahead:
    """The readahead state of one blob (thread-safe).

    `mgr` is the blob's BlobManager (meta, cache.has, absent, run_end, size, and
    is_cold if it knows cold files); `withhold` and `publish` are called with a chunk when
    it becomes, or stops being, the marker.
    """

    def __init__(self, mgr, initial: int, maximum: int,
                 withhold: Callable[[object], None] = lambda c: None,
                 publish: Callable[[object], None] = lambda c: None, *,
                 around: int = AROUND, neighbours: int = NEIGHBOURS):
        self.mgr = mgr
        self.maximum = max(0, maximum)
        self.initial = min(max(0, initial), self.maximum)
        self.around = min(max(0, around), self.maximum)
        self.neighbours = min(max(0, neighbours), self.maximum)
        self._withhold = withhold
        self._publish = publish
        self._lock = threading.Lock()
        self.marker = None        # chunk
        self.win_start = 0        # the latest sequential window: [win_start, win_end)
        self.win_end = 0
        self.size = 0
        self.small = False        # the latest window was a stretch of small files
        self._keep_until = 0      # end of the file run the current request is in
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
        keep_until = self.mgr.run_end(last)
        with self._lock:
            self._keep_until = keep_until
            self._recent.append(last.index)
            m = self.marker
            if m is not None and first.index <= m.index <= last.index:
                self._set_marker(None)
                size = self.size if self.small else 2 * self.size
                return self._sequential(self.win_end, min(size, self.maximum), "marker")
            if not fetched:
                return None
            pos = first.uncompressed_offset
            prev = self._previous(first)
            if prev is not None and self.mgr.cache.has(prev):
                if self.size and self.win_start <= pos <= self.win_end:
                    # caught up with the window in flight, or (no marker hit: cachefiles
                    # asks only for what is missing) just finished it: the next one,
                    # larger, now
                    return self._sequential(max(self.win_end, last.uncompressed_end),
                                            min(2 * self.size, self.maximum))
                if prev.index in self._recent:
                    return self._sequential(last.uncompressed_end, self.initial)
                # the chunk before is there, but no reader asked for it lately (another
                # window or reader brought it): a random read (a program's start reading
                # scattered small files), not the next step of a sequential one; windows
                # there would fetch several times what is read (issue 15's startup set)
            start = last.uncompressed_end
            end = self.mgr.run_end(last)
            if end - start > self.maximum:
                # a big file read at random: read around the miss, not the file
                end = start + self.around
            elif end and self.neighbours:
                return self._with_neighbours(start, end)
            if end <= start:
                return None
            return Window(self.mgr.absent(start, end - start), None)

    def _with_neighbours(self, start: int, end: int) -> Window | None:
        """The rest of a file read whole, and the small files after it that are not cold."""
        chunks = self.mgr.absent(start, end - start) if end > start else []
        is_cold = getattr(self.mgr, "is_cold", None)
        chunks += [c for c in self.mgr.absent(end, self.neighbours)
                   if c.uncompressed_size < SMALL_FILES_CHUNK
                   and (is_cold is None or not is_cold(c))]
        return Window(chunks, None, "neighbours") if chunks else None

    def _previous(self, chunk):
        """The chunk before `chunk`, past chunks the windows leave out (the cold files
        between two files a sequential reader reads are never fetched)."""
        meta = self.mgr.meta
        is_cold = getattr(self.mgr, "is_cold", None)
        pos = chunk.uncompressed_offset
        for _ in range(MAX_COLD_SKIP):
            prev = meta.chunks_for_range(pos - 1, 1) if pos else []
            if not prev:
                return None
            if is_cold is None or not is_cold(prev[0]):
                return prev[0]
            pos = prev[0].uncompressed_offset
        return None

    def _sequential(self, start: int, size: int, kind: str = "sequential") -> Window | None:
        size = max(size, self.initial, 1)
        chunks = []
        is_cold = getattr(self.mgr, "is_cold", None)
        for _ in range(MAX_SKIPPED_WINDOWS):
            if start >= self.mgr.size:
                break
            chunks = self.mgr.absent(start, size)
            if chunks:
                if is_cold is not None:
                    # cold files out, but not the rest of the one being read
                    keep = self._keep_until
                    chunks = [c for c in chunks
                              if c.uncompressed_offset < keep or not is_cold(c)]
                break
            start += size   # all there or on its way: look further
        self.win_start, self.win_end, self.size = start, start + size, size
        if not chunks:
            return None
        self.small = sum(c.uncompressed_size for c in chunks) < SMALL_FILES_CHUNK * len(chunks)
        self._set_marker(chunks[0])
        return Window(chunks, chunks[0], kind)

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
