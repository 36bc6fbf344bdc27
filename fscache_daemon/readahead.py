"""Readahead: which chunks of a blob to fetch before the kernel asks for them.

One policy, decided per request that reaches the daemon, in this order:

1. Marker hit. The first chunk each sequential window fetches is its marker. With the
   fanotify front end the marker's "filled" bits are withheld from the fd holder, so the
   reader's first access to it comes to the daemon although the data is already there:
   that access means the reader has entered the window, and the next one (twice the size,
   up to the maximum; not grown after a stretch of small files) is started at once. This
   is the kernel's PG_readahead scheme: a sequential reader stays a window ahead and never
   waits for a fetch, while a reader that stops costs at most the window in flight.
2. A request that fetched nothing plans nothing more.
3. A miss is then classified by what came before it (the chunk before the range, past
   cold chunks, `_previous`) and by the file it is in (its data run, `_run_end`):
   - sequential: the chunk before is cached and a reader asked for it lately (one of the
     last RECENT_REQUESTS requests; several readers interleave). Inside or at the end of
     the window in flight it starts the next window, larger (without marker hits --
     cachefiles asks only for what is missing -- this is how a window grows); elsewhere
     a first window of `initial` bytes after the range.
     A chunk before that is cached only because a window or another file brought it
     does not make a reader sequential: that is a program's start reading scattered
     small files, and windows there fetched several times what was read (issue 15's
     startup set).
   - a small file (its run at most SMALL_FILES_CHUNK from the miss): the rest of it,
     and its neighbours, the small files (chunks under SMALL_FILES_CHUNK) that are not
     cold within NEIGHBOURS after it and NEIGHBOURS_BEFORE before it. A program's start
     reads a package's modules together, in import order, not blob order: without
     neighbours 204 of 333 misses of the ML cold start were first reads of .pyc files
     (88 with those after; the ones before take ~17 % of the rest, simulated on its
     access trace). Before the cold files are known, NEIGHBOURS_BEFORE on both sides:
     with 1 MiB after, a quarter of those windows' bytes were read (the files beside
     /etc/group, a locale, a .pth file are no modules).
     Once the bootstrap is walked, only a miss in a Python module (a .pyc or .py file:
     storage.image.is_module decides, the walk flags the chunks) brings neighbours: those of other small files (entry_points.txt of
     each dist-info, /etc/group, a .pth file, small libraries) were 5.6 of 22.6 MB of
     neighbours fetched on the ML cold start, and a tenth of them was read.
   - a file read whole (its run no bigger than the largest window): the rest of it. The
     files beside a bigger file (a shared library, an executable) were rarely read: 9
     neighbour windows of such files on the ML cold start fetched 10.6 MB, half unread.
   - a big file (a large shared library, whose mmap'ed pages fault in at random places):
     only AROUND after the range. When each such miss got 16 MiB of its file, 15 misses
     fetched 54 of the 129 MB of readahead of the ML cold start.

The file runs come from the bootstrap (image.walk_file_runs, then group_file_runs), walked as the mount begins and
applied once it is done; the walk is the C core's (~0.01 s for the ML image's 50,000
files, the GIL released; ~0.07 s in all with the Python that files the runs; the
reader's walk took ~0.7 s), but the program's start may read before it is applied. Until then a run is guessed from the chunk map
alone: a file's chunks are full-sized (the blob's chunk size) but its last, so the run
ends at the first chunk shorter than that (`_run_end`); a file of an exact multiple of
the chunk size is taken for one with the next file, which at worst fetches that file.

Windows leave out the chunks of files a program's start rarely reads (the manager's
`is_cold`: sources beside their compiled Python, headers, stubs; image.group_file_runs), except
the rest of the file being read, and except for a reader in a cold file (a tree read
whole): for it the sequential test does not skip cold chunks and its windows take them: they were 45 % of what the windows fetched on the ML
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
# ... and within this many bytes before it (imports do not follow blob order; simulated
# on the ML cold start's trace: 161 -> 133 first reads missing, +9.5 MB of files fetched
# that were never read, against +14 MB for 1 MiB more after it)
NEIGHBOURS_BEFORE = 256 << 10
# requests remembered to tell a sequential reader's miss from a random one
RECENT_REQUESTS = 32
# A miss in a file of at most this much after it brings the rest of the file, in a bigger
# one only AROUND (see "a big file" above; capped by the largest window). Kept apart from
# that largest window, which only sequential windows reach: they grow to 64 MiB by
# default (daemon.DEFAULT_READAHEAD) while a file miss still fetches at most 16 MiB of
# its file, as when both were 16 MiB (a shared library's random page faults).
WHOLE_FILE = 16 << 20


# A window is fetched in tasks of about this many stored bytes (backend requests of at
# most --batch-size; Daemon._submit_window): a task claims its chunks when it starts, and
# a reader needing one waits for the task's requests before it (tasks of 4 MiB made 44-53
# reads of the ML cold start wait 0.6 s in all). 1 MiB: one request per task.
TASK_BYTES = 1 << 20
# ... but a long sequential stream's windows (SEQUENTIAL_KINDS, of at least LONG_WINDOW
# bytes: the fourth window of a stream on) go in tasks of STREAM_TASK_BYTES. A task's
# next request is then read (storage/pipeline.py) while its last is decoded, so a worker
# seldom blocks in a read; with one request per task each worker read, then decoded, and
# the CPUs idled while the reader waited for the window. The reader of such a stream wants
# a task's first request first anyway. Cold GiB, 4 MiB tasks against 1 MiB (all sequential
# windows), alternated rounds at load 2-6 (branch coldrd): wall 0.86-0.93 (medians of 4-8
# pairs), the reader's blocked time 0.7-0.9, daemon CPU 0.94-0.98. Short windows keep
# 1 MiB tasks: a program's start reads a library or a data file sequentially but waits
# for each chunk it misses.
STREAM_TASK_BYTES = 4 << 20
LONG_WINDOW = 16 << 20
SEQUENTIAL_KINDS = ("sequential", "marker")


def task_bytes(kind: str, chunks) -> int:
    """The task size for a window of `kind` (Window.kind) holding `chunks`."""
    if kind in SEQUENTIAL_KINDS and \
            sum(c.uncompressed_size for c in chunks) >= LONG_WINDOW:
        return STREAM_TASK_BYTES
    return TASK_BYTES


class Window(NamedTuple):
    chunks: list          # chunks to fetch: neither cached nor in flight
    marker: object        # the chunk whose first access starts the next window, or None
    kind: str = "file"    # why: "file", "neighbours", "sequential", "marker" (logs, tasks)


class BlobReadahead:
    """The readahead state of one blob (thread-safe).

    `mgr` is the blob's BlobManager (meta, cache.has, absent, run_end, size, and
    is_cold if it knows cold files); `withhold` and `publish` are called with a chunk when
    it becomes, or stops being, the marker.
    """

    def __init__(self, mgr, initial: int, maximum: int,
                 withhold: Callable[[object], None] = lambda c: None,
                 publish: Callable[[object], None] = lambda c: None, *,
                 around: int = AROUND, neighbours: int = NEIGHBOURS,
                 neighbours_before: int = NEIGHBOURS_BEFORE, whole_file: int = WHOLE_FILE):
        self.mgr = mgr
        self.maximum = max(0, maximum)
        self.whole_file = min(max(0, whole_file), self.maximum)
        self.initial = min(max(0, initial), self.maximum)
        self.around = min(max(0, around), self.maximum)
        self.neighbours = min(max(0, neighbours), self.maximum)
        self.neighbours_before = min(max(0, neighbours_before), self.maximum)
        self._withhold = withhold
        self._publish = publish
        self._lock = threading.Lock()
        self.marker = None        # chunk
        self.win_start = 0        # the latest sequential window: [win_start, win_end)
        self.win_end = 0
        self.size = 0
        self.small = False        # the latest window was a stretch of small files
        self._keep_until = 0      # end of the file run the current request is in
        self._in_cold = False     # the current request reads a cold file
        # per chunk position, 1 if a Python module holds it (add_modules); None: not known
        self._modules: bytearray | None = None
        # the last chunks of the latest requests that reached us: a miss right after
        # one of them is a sequential reader's (several readers interleave)
        self._recent: deque[int] = deque(maxlen=RECENT_REQUESTS)
        # shared objects' first chunks (add_libraries): a miss there is told to libchase
        self._libs: dict[int, str] = {}
        self._on_library: Callable[[str], None] = lambda path: None

    def on_request(self, offset: int, length: int, fetched: bool) -> Window | None:
        """The daemon served [offset, offset+length) (`fetched`: it had to fetch some of
        it). Returns what to fetch next, if anything (the policy: module docstring)."""
        if not self.maximum:
            return None
        meta = self.mgr.meta
        chunks = meta.chunks_for_range(offset, max(1, length))
        if not chunks:
            return None
        first, last = chunks[0], chunks[-1]
        run_end = self._run_end(last)
        is_cold = getattr(self.mgr, "is_cold", None)
        in_cold = is_cold is not None and is_cold(first)
        with self._lock:
            self._keep_until = run_end
            self._in_cold = in_cold
            self._recent.append(last.index)
            # 1. marker hit
            m = self.marker
            if m is not None and first.index <= m.index <= last.index:
                self._set_marker(None)
                size = self.size if self.small else 2 * self.size
                return self._sequential(self.win_end, min(size, self.maximum), "marker")
            # 2. nothing fetched
            if not fetched:
                return None
            lib = self._libs.get(first.uncompressed_offset) if self._libs else None
            if lib is not None:     # the loader opens a library: its needs go ahead
                self._on_library(lib)
            # 3. a miss: sequential ...
            prev = self._previous(first)
            if prev is not None and self.mgr.cache.has(prev):
                pos = first.uncompressed_offset
                if self.size and self.win_start <= pos <= self.win_end:
                    # caught up with the window in flight, or just finished it
                    return self._sequential(max(self.win_end, last.uncompressed_end),
                                            min(2 * self.size, self.maximum))
                if prev.index in self._recent:
                    return self._sequential(last.uncompressed_end, self.initial)
            # ... a file read whole, or a big file
            start = last.uncompressed_end
            if run_end - start > self.whole_file:
                end = start + self.around
            elif run_end - first.uncompressed_offset <= SMALL_FILES_CHUNK and \
                    self.neighbours and self._module(first):
                return self._with_neighbours(first.uncompressed_offset, start, run_end,
                                             guessed=not self.mgr.run_end(last))
            else:
                end = run_end
            if end <= start:
                return None
            return Window(self.mgr.absent(start, end - start), None)

    def add_modules(self, runs) -> None:
        """Learn which chunks Python modules hold (image.file_runs `modules`): from then
        on only a miss in one of them brings its neighbours."""
        flags = bytearray(len(self.mgr.meta.chunks))
        for start, end in runs:
            for c in self.mgr.meta.chunks_for_range(start, max(1, end - start)):
                if c.index < len(flags):
                    flags[c.index] = 1
        self._modules = flags

    def add_libraries(self, starts: dict[int, str],
                      on_library: Callable[[str], None]) -> None:
        """Learn where shared objects begin ({offset: path}, libchase.library_starts):
        a miss in the first chunk of one calls `on_library(path)` (it must not block)."""
        self._libs, self._on_library = dict(starts), on_library

    def _module(self, chunk) -> bool:
        """Whether `chunk` may be a Python module's (True while that is not known)."""
        flags = self._modules
        return flags is None or (chunk.index < len(flags) and flags[chunk.index] == 1)

    def _run_end(self, chunk) -> int:
        """End of the file data run `chunk` is in: the bootstrap's (mgr.run_end) once the
        walk is done, before that guessed from the chunk map (module docstring)."""
        end = self.mgr.run_end(chunk)
        if end:
            return end
        meta = self.mgr.meta
        full = getattr(meta, "chunk_size", 0)
        if not full:
            return 0
        c, end = chunk, chunk.uncompressed_end
        limit = chunk.uncompressed_end + self.whole_file + full   # past it: a big file
        while c.uncompressed_size == full and end < limit:
            nxt = [x for x in meta.chunks_for_range(end, full) if x.uncompressed_offset >= end]
            if not nxt:
                break
            c = nxt[0]
            end = c.uncompressed_end
        return end

    def _with_neighbours(self, miss: int, start: int, end: int,
                         guessed: bool = False) -> Window | None:
        """The rest of a small file read whole, and the small files around it that are
        not cold: NEIGHBOURS after it, NEIGHBOURS_BEFORE before the miss (`guessed`, the
        cold files not known yet: NEIGHBOURS_BEFORE on both sides)."""
        chunks = self.mgr.absent(start, end - start) if end > start else []
        is_cold = getattr(self.mgr, "is_cold", None)
        lo = max(0, miss - self.neighbours_before)
        after = self.neighbours_before if guessed else self.neighbours
        around = (self.mgr.absent(lo, miss - lo) if miss > lo else []) + \
            self.mgr.absent(end, after)
        chunks += [c for c in around if c.uncompressed_size < SMALL_FILES_CHUNK
                   and (is_cold is None or not is_cold(c))]
        return Window(chunks, None, "neighbours") if chunks else None

    def _previous(self, chunk):
        """The chunk before `chunk`, past chunks the windows leave out (the cold files
        between two files a sequential reader reads are never fetched)."""
        meta = self.mgr.meta
        # a reader in a cold file itself reads cold files: none is skipped for it
        is_cold = None if self._in_cold else getattr(self.mgr, "is_cold", None)
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
                if is_cold is not None and not self._in_cold:
                    # cold files out, but not the rest of the one being read; a reader
                    # going through cold files in blob order (a tree read whole) gets
                    # them all (left out, each of them was a miss of its own: a 300 MiB
                    # /usr tree read 1,100 misses, 48 MB/s)
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
