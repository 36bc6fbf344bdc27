"""Libraries chased at their first read: when a miss is a shared object's first bytes (the
dynamic loader opening it, for dlopen or as another library's DT_NEEDED), the libraries
it needs are fetched side by side at once, and theirs, round after round.

Without it the loader's chain is one miss per library, each known only once the one before
is fetched: on the ML cold start over the emulated link, `import torch` loaded ~28 small
libraries that way (_ctypes -> libffi, _ssl -> libssl -> libcrypto, torch's _C ->
libtorch_python -> libtorch, libshm, libc10, libgomp, libstdc++, libgcc_s; numpy ->
openblas -> gfortran -> quadmath), each a serial registry request.

The same bytes the start set reads (startset.py: the ELF headers, DT_NEEDED, RUNPATH with
$ORIGIN, ld.so.cache, the loader's default directories), for any library a miss opens
instead of the command's executable alone. Bounded: only libraries a loaded ELF file
names (the loader maps every one of them unless it is loaded already, then nothing is
missing), each fetched whole up to the readahead's largest window (what a first miss in
it would fetch anyway), a bigger one only its headers, its dynamic section and the
needed names' bytes (what the loader reads of it before its relocations), at most
MAX_FILES per mount. A wrong guess costs bytes, never data: the reader's own requests go
first (the fetches go through the pool's readahead priority).

The same hook serves one Python convention: a miss on a distribution's entry points
(X.dist-info/entry_points.txt) fetches those of every distribution of its site
directory side by side (each under MAX_ENTRY_POINTS, MAX_GROUP in all):
importlib.metadata's entry_points() reads them all, one after another (on the ML cold
start 18 of the 19 the image has, 16 of them serial misses).

Tied to its mount: the image's stop event (Image.stop, set when the daemon releases the
image's blobs or stops) ends the chase between two fetches and any wait for one (a fetch
in flight is left to its worker, its result unused), and `close()` wakes an idle thread
and waits for it briefly; the thread's bootstrap fd (its planner's) is closed as it ends.
Before, an unmounted image's chase kept its thread and the bootstrap open until its idle
timeout (IDLE), or as long as a fetch hung.

Off with `FSCACHE_DAEMON_LIB_CHASE=0` (to compare); FSCACHE_DAEMON_LIB_CHASE_IDLE sets IDLE.
"""
from __future__ import annotations

import _thread
import logging
import os
import queue
import struct
import threading
import time
from concurrent.futures import Future

from erofs_tools.errors import ErofsToolsError
from fscache_daemon import mounts, startset
from fscache_daemon.prefetch import stream_table, wait_stoppable

log = logging.getLogger(__name__)

ENABLED = os.environ.get("FSCACHE_DAEMON_LIB_CHASE", "1") != "0"
MAX_FILES = 256
MAX_ROUNDS = 8
# the chase's thread (and its planner's open bootstrap) ends after this long idle, or
# at once when its image is released (FSCACHE_DAEMON_LIB_CHASE_IDLE: seconds)
IDLE = float(os.environ.get("FSCACHE_DAEMON_LIB_CHASE_IDLE", "30"))
# how long close() waits for the thread to end: it sees the stop within prefetch.STOP_POLL
# in a wait for a fetch, or once the bootstrap lookup or ELF parsing it is in returns
# (CPU, no I/O wait); a thread still running after it ends on its own
CLOSE_WAIT = 2.0
# a big library's writable segment fetched at most this much (libtorch_cpu's: 3.3 MB)
MAX_SEGMENT = 8 << 20
# a site directory's entry points fetched together: files up to this size, this much in all
MAX_ENTRY_POINTS = 64 << 10
MAX_GROUP = 2 << 20


def is_library(path: bytes) -> bool:
    """Whether an image path names a shared object by its name (libX.so, libX.so.1.2,
    a Python extension's X.cpython-311-x86_64-linux-gnu.so)."""
    base = path.rsplit(b"/", 1)[-1]
    return base.endswith(b".so") or b".so." in base


def is_entry_points(path: bytes) -> bool:
    """Whether an image path is a Python distribution's entry points (X.dist-info/
    entry_points.txt): importlib.metadata's entry_points() reads every one of a site
    directory, one after another."""
    head, _, base = path.rpartition(b"/")
    return base == b"entry_points.txt" and head.endswith(b".dist-info")


def library_starts(paths: list[bytes], found: list
                   ) -> tuple[dict[int, dict[int, str]], dict[str, startset.Runs]]:
    """({blob index: {uncompressed offset of its first data run: path}} of the shared
    objects and entry points among the bootstrap walk's files (storage.image.
    walk_file_runs), {site directory: the data runs of its entry points})."""
    out: dict[int, dict[int, str]] = {}
    groups: dict[str, startset.Runs] = {}
    sizes: dict[str, int] = {}
    seen: set[int] = set()
    for f, b, start, end in found:
        p = paths[f]
        if is_entry_points(p):
            site = os.fsdecode(p.rsplit(b"/", 2)[0])
            if end - start <= MAX_ENTRY_POINTS and \
                    sizes.get(site, 0) + end - start <= MAX_GROUP:
                groups.setdefault(site, []).append((b, start, end - start))
                sizes[site] = sizes.get(site, 0) + end - start
        elif not is_library(p):
            continue
        if f not in seen:
            seen.add(f)
            out.setdefault(b, {})[start] = os.fsdecode(p)
    return out, groups


def writable_segments(read) -> list[tuple[int, int]]:
    """(file offset, length) of an ELF file's writable PT_LOAD segments (relocation
    targets: .data.rel.ro, .got, .data), each cut to MAX_SEGMENT; [] if not ELF. The
    loader writes through all of them before the library's first instruction runs."""
    head = read(0, 64)
    if not head or len(head) < 52 or head[:4] != b"\x7fELF" or head[5] not in (1, 2):
        return []
    end = "<" if head[5] == 1 else ">"
    if head[4] == 2:
        phoff, = struct.unpack_from(end + "Q", head, 32)
        fmt, size = end + "IIQQQQQQ", 56
    elif head[4] == 1:
        phoff, = struct.unpack_from(end + "I", head, 28)
        fmt, size = end + "IIIIIIII", 32
    else:
        return []
    phentsize, phnum = struct.unpack_from(end + "HH", head, 54 if head[4] == 2 else 42)
    if phentsize < size or phnum > 512 or phoff + phnum * phentsize > startset.ELF_HEAD:
        return []
    table = read(phoff, phnum * phentsize)
    if table is None:
        return []
    out = []
    for i in range(phnum):
        f = struct.unpack_from(fmt, table, i * phentsize)
        ptype, flags, off, filesz = (f[0], f[1], f[2], f[5]) if head[4] == 2 else \
            (f[0], f[6], f[1], f[4])
        if ptype == 1 and flags & 2 and filesz:
            out.append((off, min(filesz, MAX_SEGMENT)))
    return out


def file_slice(runs: startset.Runs, off: int, n: int) -> startset.Runs:
    """The blob runs of bytes [off, off+n) of a file laid out as `runs`."""
    out: startset.Runs = []
    pos = 0
    for b, phys, length in runs:
        lo, hi = max(off, pos), min(off + n, pos + length)
        if lo < hi:
            out.append((b, phys + lo - pos, hi - lo))
        pos += length
    return out


def _fill(fut: Future, m, off: int, n: int) -> None:
    """LibraryChase._pread's fill, on its own thread (ends with the fill even when the
    chase stopped waiting: a released blob's fill fails or ends at the backend's)."""
    try:
        fut.set_result(m.fill(off, n, prefetch=True))
    except BaseException as e:  # noqa: BLE001 - delivered to the waiter
        fut.set_exception(e)


class _Stopped(Exception):
    """The chase's mount was released while it waited for a fetch."""


class LibraryChase:
    """One mount's chase: `on_library(path)` (from the readahead plan, at a miss on a
    library's first chunk) queues it; one thread works the queue until `stop` (the
    mount's) is set or it is idle for IDLE."""

    def __init__(self, owner, img, keys: list[str], whole: int, stop: threading.Event,
                 groups: dict[str, startset.Runs] | None = None):
        self.owner, self.img, self.keys = owner, img, keys
        self.groups = groups or {}
        self.whole = min(max(0, whole), startset.WHOLE_LIMIT)
        self.stop = stop
        self.seen: set[str] = set()
        self.cache: dict[str, str] | None = None
        self._q: queue.SimpleQueue[str | None] = queue.SimpleQueue()   # None: wake up
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def on_library(self, path: str) -> None:
        if path in self.seen or self.stop.is_set():
            return
        self._q.put(path)
        with self._lock:
            # under the lock: close() sets the stop before it looks for a thread
            if self._thread is None and not self.stop.is_set():
                self._thread = threading.Thread(target=self._run, name="lib-chase",
                                                daemon=True)
                self._thread.start()

    def close(self, timeout: float = CLOSE_WAIT) -> bool:
        """The mount is released: stop the chase and wait up to `timeout` for its thread
        (its bootstrap fd closed); -> whether no thread is left."""
        self.stop.set()
        with self._lock:
            t = self._thread
        if t is None:
            return True
        self._q.put(None)       # an idle thread waits on the queue: wake it
        if t is not threading.current_thread():
            t.join(timeout)
        return not t.is_alive()

    def _run(self) -> None:
        mounts.name_thread("lib-chase")
        # one planner while the thread runs (chase), its own: a thread started after this
        # one went idle never shares it
        planners: list[startset.Planner] = []
        try:
            self._work(planners)
        finally:
            for p in planners:
                p.close()
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None     # stopped (idle: cleared in _work)
            log.debug("%s: library chase thread ended", self.img.mountpoint)

    def _work(self, planners: list[startset.Planner]) -> None:
        while not self.stop.is_set():
            try:
                path = self._q.get(timeout=IDLE)
            except queue.Empty:
                with self._lock:
                    # with the check: a path queued after it starts a new thread
                    if self._q.empty():
                        self._thread = None
                        return
                continue
            if path is None:
                continue
            try:
                if path.endswith("/entry_points.txt"):
                    self.entry_points(path)
                else:
                    self.chase(path, planners)
            except _Stopped:
                log.debug("%s: library chase of %s stopped: the image was released",
                          self.img.mountpoint, path)
                return
            except Exception as e:  # noqa: BLE001 - an optimisation: readers fetch on demand
                log.debug("%s: library chase of %s: %s", self.img.mountpoint, path, e)

    def _pread(self, b: int, off: int, n: int) -> bytes | None:
        """Bytes of blob `b`, fetched first where missing (waits for chunks in flight).
        The fill runs on a thread of its own while this one waits for it or for the
        stop: a fill's waits (the backend, chunks others fetch) cannot be interrupted.
        Not on the pool: the round's first read waits for the reader's own fetch, and a
        worker would sit out that wait (or the chase queue behind the readers)."""
        if self.stop.is_set():
            raise _Stopped
        m = self.owner.blobs.get(self.keys[b]) if 0 <= b < len(self.keys) else None
        if m is None:
            return None
        try:
            if not m.is_cached(off, n):
                fut: Future = Future()
                _thread.start_new_thread(_fill, (fut, m, off, n))
                if not wait_stoppable(fut, self.stop):
                    raise _Stopped
                fut.result()
            return m.cache.pread(n, off)
        except (OSError, ErofsToolsError):
            return None

    def _fetch(self, jobs: startset.Runs) -> int:
        return stream_table(self.owner.pool, self.owner.blobs,
                            [(self.keys[b], off, n) for b, off, n in jobs
                             if 0 <= b < len(self.keys)], self.stop)

    def entry_points(self, path: str) -> None:
        """A distribution's entry points read: those of the other distributions of its
        site directory are read next (importlib.metadata), fetch them side by side."""
        site = path.rsplit("/", 2)[0]
        if site in self.seen:
            return
        self.seen.add(site)
        n = self._fetch(self.groups.get(site, []))
        log.debug("%s: entry points of %s: %d files, %d bytes", self.img.mountpoint,
                  site, len(self.groups.get(site, [])), n)

    def chase(self, path: str, planners: list[startset.Planner]) -> None:
        """The rounds from library `path` (already being fetched by the reader's miss).
        `planners`: the thread's planner, if it made one (closed as the thread ends)."""
        if path in self.seen or len(self.seen) >= MAX_FILES:
            return
        t0 = time.monotonic()
        # one planner while the thread runs: its directories (the loader's, thousands of
        # entries) and ld.so.cache decoded once, not at every library
        if not planners:
            planners.append(startset.Planner(self.img.bootstrap, len(self.keys)))
        planner = planners[0]
        planner.seen = self.seen
        if self.cache is None:
            got = planner.runs("/etc/ld.so.cache")
            self.cache = {}
            if got is not None:
                planner.learn_cache(startset.file_reader(got[1], got[2], self._pread),
                                    got[2])
                self.cache = planner.cache
        planner.cache = self.cache
        todo = [path]
        files: list[str] = []
        fetched = 0
        data: startset.Runs = []    # the writable segments of the files parsed
        for i in range(MAX_ROUNDS):
            round_files = []
            for p in todo:
                got = planner.runs(p)
                if got is not None:
                    real, runs, size = got
                    head = runs if size <= self.whole else \
                        startset._head(runs, startset.AROUND)
                    round_files.append((real, runs, head, size))
            # round 0 is the reader's own library: its miss fetches its head
            jobs = [r for f in round_files for r in f[2]] if i else []
            if jobs or data:
                fetched += self._fetch(jobs + data)
            data = []
            if self.stop.is_set():
                raise _Stopped
            todo = []
            for real, runs, head, size in round_files:
                files.append(real)
                read = startset.file_reader(runs, size, self._pread)
                try:
                    todo += planner.after(real, read, size)
                    if head is not runs:
                        data += [r for off, n in writable_segments(read)
                                 for r in file_slice(runs, off, n)]
                except (struct.error, ErofsToolsError, ValueError) as e:
                    log.debug("library chase: %s: %s", real, e)
            if not todo and not data:
                break
        log.debug("%s: library chase from %s: %d files, %d bytes in %.3f s: %s",
                  self.img.mountpoint, path, len(files), fetched, time.monotonic() - t0,
                  " ".join(files[1:]))
