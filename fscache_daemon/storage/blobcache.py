"""Per-blob cache: the sparse cache file, the persistent chunk-state record, the chunk
map cached on disk, and the BlobManager that fills ranges on demand.

Files in the cache directory, per cache key (the blob id, or a variant of it): `<id>.blob`
(the sparse cache file the kernel reads, every chunk at its 4 KiB aligned uncompressed
offset), `<id>.chunks` (the chunk-state record: header, *live* and *durable* bitmaps; a
set bit means verified data in the cache file) and `<id>.map` (the chunk map), as
docs/daemon.md's "Cache directory" table describes them.

A record that does not match the map or the cache file (different digest, size, or a set
bit whose chunk start is a hole per SEEK_DATA) is reset to "nothing cached" rather than
trusted, and the cache file is emptied.

Poisoning: a blob id is public, so a chunk map is used for a bootstrap only if it agrees
with every chunk that bootstrap's chunk-info table pins (`pin_mismatch`; its digests then
replace the blob's own); a bootstrap whose table disagrees with the blob's cache gets a
cache of its own, the *cache key* `<id>@<table digest prefix>` (`chunkmap.variant_key`;
docs/daemon.md, "A borrowed blob id").
"""

from __future__ import annotations

import _thread
import array
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from erofs_tools.errors import CorruptImageError, ErofsToolsError
from erofs_tools.fsutil import atomic_write_bytes
from erofs_tools.reader import blob as rblob
from erofs_tools.reader import coldpath

from . import BackendError, StorageError, iobuf, pipeline
from .cachefile import BlobCache, ReleasedError, cache_path, state_path  # noqa: F401

# the chunk map and its ties to bootstraps live in chunkmap; re-exported for callers
from .chunkmap import (  # noqa: F401
    MAP_HEADER,
    MAP_MAGIC,
    check_shareable,
    key_blob_id,
    key_variant,
    load_or_fetch_meta,
    map_path,
    pin_mismatch,
    share_mismatch,
    variant_key,
)

# the chunk-state record; re-exported for callers and tests
from .chunkstate import (  # noqa: F401
    STATE_HEADER,
    STATE_MAGIC,
    STATE_VERSION,
    ChunkState,
    state_bits,
)
from .planner import DEFAULT_BATCH_SIZE, chunks_in_range, clamp_range, plan
from .rawkeep import RawKeep
from .stats import FILL_TIMES, BlobStats, add_fill_time  # noqa: F401

log = logging.getLogger(__name__)


def _write_atomic(path: str, data: bytes) -> None:
    """A private file (0600) replaced atomically (erofs_tools.fsutil, O_EXCL temp)."""
    atomic_write_bytes(path, data, mode=0o600)


class _Flight:
    """One chunk being fetched: waiters block until it is resolved (raw lock: cheaper
    than an Event, one per fetched chunk)."""
    __slots__ = ("_lock", "done", "error")

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._lock.acquire()
        self.done = False
        self.error: BaseException | None = None

    def set(self) -> None:
        if not self.done:       # resolved once (under the manager's lock)
            self.done = True
            self._lock.release()

    def wait(self) -> None:
        self._lock.acquire()
        self._lock.release()


class FillError(StorageError):
    """Some chunk of a requested range could not be fetched or verified."""


class BlobManager:
    """Fills ranges of one blob's cache file; thread-safe; one fetch per chunk at a time
    (requests for a chunk in flight wait for it)."""

    def __init__(self, meta, cache: BlobCache, backend, *, batch_size: int = DEFAULT_BATCH_SIZE,
                 on_complete=None, pipeline: bool = False):
        self.meta = meta
        self.blob_id = meta.blob_id     # what the backend is asked for
        self.key = cache.key            # what the daemon and front ends name it by
        self.cache = cache
        self.backend = backend
        # the other backends of the images sharing this blob (the daemon keeps them, its
        # users': a blob is the same bytes in every repository), asked in turn when
        # `backend` fails: that of the mount that opened the cache may be a repository
        # gone from its registry while another image's still has the blob
        self.alternates: list = []
        self.batch_size = batch_size
        self.on_complete = on_complete
        self.stats = BlobStats()
        self.meta_bytes_fetched = 0     # what opening it fetched of the chunk map (daemon)
        self.listed_whole = False       # by its image's prefetch table (prefetch.py)
        # what the daemon does once the mount that opened it is made (its map file)
        self.after_mount: list[Callable[[], None]] = []
        # zran: requests start at access points, often inside the last range fetched
        self._rawkeep = RawKeep() if getattr(meta, "zran", None) is not None else None
        self._lock = threading.Lock()
        self._inflight: dict[int, _Flight] = {}
        self._completed_reported = cache.complete()
        self._dirty = False
        # the C core's cold path (default) or the Python one (FSCACHE_DAEMON_COLDPATH=
        # python, to compare). `pipeline`: the next backend request read by the reader
        # threads (pipeline.py) while a batch is decoded, if the daemon asks (a process
        # that cannot start threads must not) and Backend.pipelined; "serial" turns it off
        mode = os.environ.get("FSCACHE_DAEMON_COLDPATH", "native")
        self.native = "python" not in mode
        self.pipeline = pipeline and self.native and "serial" not in mode and (
            getattr(backend, "pipelined", True))
        # cold-path reads into reused buffers (iobuf; O_DIRECT on localfs): zran's are kept
        self._pooled = self.native and meta.zran is None and hasattr(backend, "read_pooled")
        # per chunk position: end of the longest file run starting at or covering it
        self._run_end: array.array | None = None
        self._cold: bytearray | None = None     # per chunk position: add_file_runs

    def run_after_mount(self) -> None:
        """Run (once) what waits in after_mount; a second caller at the same time may
        run it again (the map file, written whole again)."""
        work, self.after_mount = self.after_mount, []
        for fn in work:
            fn()

    def add_file_runs(self, runs, cold=()) -> None:
        """Learn where files' data runs end (image.file_runs) for file-aware readahead,
        and which of them (`cold`, a subset) belong to files a start rarely reads: a chunk
        is cold when every run it is in is (a chunk deduplicated into a read file is not)."""
        chunks = self.meta.chunks
        ends = self._run_end or array.array("Q", bytes(8 * len(chunks)))
        cold_set = set(cold)
        flags = self._cold or bytearray(len(chunks))   # 1 cold, 2 in some other file
        for start, end in runs:
            mark = 1 if (start, end) in cold_set else 2
            for c in self.meta.chunks_for_range(start, max(1, end - start)):
                pos = c.index
                if pos < len(ends):
                    if end > ends[pos]:
                        ends[pos] = end
                    flags[pos] |= mark
        self._cold = flags
        self._run_end = ends        # last: readers of both look at this one first

    def is_cold(self, chunk) -> bool:
        """Whether only files a start rarely reads hold `chunk` (add_file_runs)."""
        flags = self._cold
        return flags is not None and chunk.index < len(flags) and flags[chunk.index] == 1

    def run_end(self, chunk) -> int:
        """End of the file data run that `chunk` belongs to (0 if unknown)."""
        ends = self._run_end
        return ends[chunk.index] if ends is not None and chunk.index < len(ends) else 0

    @property
    def size(self) -> int:
        return self.meta.uncompressed_size

    def complete(self) -> bool:
        return self.cache.complete()

    def missing(self, offset: int = 0, length: int | None = None) -> list:
        if length is None:
            length = self.size - offset
        return [c for c in chunks_in_range(self.meta, offset, length) if not self.cache.has(c)]

    def absent(self, offset: int, length: int) -> list:
        """Chunks of the range neither cached nor being fetched (what readahead adds)."""
        length = min(length, self.size - offset)
        with self._lock:
            return [c for c in chunks_in_range(self.meta, offset, length)
                    if not self.cache.has(c) and c.index not in self._inflight]

    def will_fetch(self, offset: int, length: int) -> bool:
        """Whether fill(offset, length) would fetch now: some chunk of the range is
        neither cached nor in flight."""
        start, n = clamp_range(offset, length, self.size)
        return bool(self.absent(start, n)) if n else False

    def will_need(self, offset: int, length: int) -> None:
        """Tell the backend the stored range [offset, offset+length) will be read soon
        (readahead), unless its reads bypass the page cache anyway."""
        if self._pooled and self.backend.reads_direct(self.blob_id):
            return
        self.backend.will_need(self.blob_id, offset, length)

    def is_cached(self, offset: int, length: int) -> bool:
        start, n = clamp_range(offset, length, self.size)
        return all(self.cache.has(c) for c in chunks_in_range(self.meta, start, n))

    def fill(self, offset: int, length: int, *, prefetch: bool = False, along=(),
             max_gap: int = 0) -> int:
        """Make [offset, offset+length) present in the cache file. Returns the number of
        backend bytes this call fetched. Raises FillError (after storing every good chunk)
        if any chunk of the range failed; BackendError/DigestMismatchError are its cause.
        `along`: chunks to fetch with it (if not cached or in flight), gaps <= `max_gap`."""
        t0 = time.monotonic()
        start, n = clamp_range(offset, length, self.size)
        chunks = chunks_in_range(self.meta, start, n)
        error = None
        fetched = 0
        try:
            fetched = self._ensure(chunks, prefetch, demand=not prefetch, along=along,
                                   max_gap=max_gap if along else 0)
        except FillError as e:
            error = e
        if not prefetch:
            cached = fetched == 0 and error is None
            self.stats.record_request(n, cached, time.monotonic() - t0, error is not None)
        if error is not None:
            raise error
        return fetched

    def fill_chunks(self, chunks, *, prefetch: bool = True, batch_size: int | None = None,
                    max_gap: int = 0) -> int:
        """Fetch `chunks` (those missing) in backend requests of at most `batch_size`
        bytes (default: the manager's), one request across gaps of up to `max_gap`
        stored bytes between them (fetched and dropped: fewer round trips)."""
        return self._ensure(chunks, prefetch, batch_size, max_gap=max_gap)

    def _ensure(self, chunks, prefetch: bool, batch_size: int | None = None, *,
                demand: bool = False, max_gap: int = 0, along=()) -> int:
        mine = []
        waits = []
        with self._lock:
            for c in chunks:
                if self.cache.has(c):
                    continue
                f = self._inflight.get(c.index)
                if f is not None:
                    waits.append((c, f))
                else:
                    f = _Flight()
                    self._inflight[c.index] = f
                    mine.append((c, f))
            # along: only beside a fetch of the caller's own; a failure is not the caller's
            extra = {c.index for c in along if mine and not self.cache.has(c)
                     and c.index not in self._inflight}
            mine += [(c, self._inflight.setdefault(c.index, _Flight())) for c in along
                     if c.index in extra]
        if not mine and not waits:
            return 0
        fetched = 0
        failures: list[tuple[Any, BaseException]] = []
        flights = dict((c.index, f) for c, f in mine)
        try:
            batches = plan([c for c, _ in mine], batch_size or self.batch_size, max_gap)
            for batch, got in self._reads(batches):
                try:
                    fetched += self._process(batch, got, flights, failures, prefetch)
                finally:
                    if got[2] is not None:      # nothing uses its bytes any more
                        iobuf.POOL.put(got[2])
        finally:
            # resolve anything left unresolved by an unexpected exception
            leftover = [(i, f) for i, f in flights.items() if not f.done]
            if leftover:
                err = StorageError(f"blob {self.blob_id[:12]}: fill aborted")
                with self._lock:
                    for i, f in leftover:
                        f.error = err
                        self._inflight.pop(i, None)
                        f.set()
        t_wait = time.monotonic()
        for c, f in waits:
            f.wait()
            if f.error is not None:
                failures.append((c, f.error))
        if waits:
            add_fill_time("flight", time.monotonic() - t_wait)
        if waits and demand:
            self.stats.record_flight_wait(time.monotonic() - t_wait)
        if self._completed_now():
            self._report_complete()
        if extra:       # readahead that came along (the daemon's window)
            self.stats.add(readahead_bytes=sum(c.compressed_size for c, f in mine
                                               if c.index in extra and f.error is None))
            failures = [(c, e) for c, e in failures if c.index not in extra]
        if failures:
            first, cause = failures[0]
            raise FillError(f"blob {self.blob_id[:12]}: {len(failures)} chunk(s) failed, "
                            f"first chunk {first.index} at {first.uncompressed_offset}: "
                            f"{cause}") from cause
        return fetched

    def _read(self, batch):
        """(stored bytes of the batch, None, its iobuf buffer or None) or (None, the
        error, None); counted in stats."""
        t0 = time.monotonic()
        buf = None
        try:
            if self._rawkeep is not None:
                raw, batch.fetched = self._rawkeep.read(
                    lambda off, n: self.backend.read(self.blob_id, off, n), batch.offset,
                    batch.length)
            elif self._pooled and hasattr(self.backend, "read_pooled"):  # (another's)
                raw, buf = self.backend.read_pooled(self.blob_id, batch.offset,
                                                    batch.length, iobuf.POOL)
            else:
                raw = self.backend.read(self.blob_id, batch.offset, batch.length)
            self.stats.record_backend_read(time.monotonic() - t0)
            add_fill_time("backend", time.monotonic() - t0)
        except (BackendError, ErofsToolsError, OSError) as e:
            err = e if isinstance(e, ErofsToolsError) else BackendError(str(e))
            log.error("blob %s: backend read %d+%d failed: %s", self.blob_id[:12],
                      batch.offset, batch.length, err)
            self.stats.add(backend_errors=1)
            for alt in list(self.alternates):
                if self._rawkeep is not None:
                    break       # a zran blob's kept range is its backend's; no mixing
                try:
                    raw = alt.read(self.blob_id, batch.offset, batch.length)
                except (BackendError, ErofsToolsError, OSError) as e2:
                    log.error("blob %s: its other backend %s failed too: %s",
                              self.blob_id[:12], getattr(alt, "reference", alt), e2)
                    continue
                log.warning("blob %s: read %d+%d through another image's backend %s",
                            self.blob_id[:12], batch.offset, batch.length,
                            getattr(alt, "reference", alt))
                self.stats.record_backend_read(time.monotonic() - t0)
                return raw, None, None
            return None, err, None
        return raw, None, buf

    def _reads(self, batches):
        """(batch, _read(batch)) in order; with more than one batch, a reader thread
        (storage/pipeline.py) reads batch j+1 while the caller decodes and writes batch
        j, asked for once batch j was taken: at most two batches' bytes held per fill.
        Where no reader thread can be had the batches are read one after another."""
        n = len(batches)
        ahead = None
        if self.pipeline and n > 1:
            ahead = pipeline.READS.submit(self._read, batches[1], self._read_failed)
        if ahead is None:
            for b in batches:
                yield b, self._read(b)
            return
        try:
            yield batches[0], self._read(batches[0])
            for j in range(1, n):
                got = ahead.get() if ahead is not None else self._read(batches[j])
                ahead = None
                if j + 1 < n:
                    ahead = pipeline.READS.submit(self._read, batches[j + 1],
                                                  self._read_failed)
                yield batches[j], got
        finally:
            # a fill given up: a read still in flight is dropped (its buffer unmapped
            # once done); one that is in goes back to the pool
            if ahead is not None and ahead.ready() and ahead.result[2] is not None:
                iobuf.POOL.put(ahead.result[2])

    def _read_failed(self, e: BaseException):
        return None, StorageError(f"blob {self.blob_id[:12]}: read failed: {e}"), None

    def _process(self, batch, got, flights, failures, prefetch) -> int:
        raw, err, _buf = got
        if err is not None:
            self._resolve(batch.chunks, flights, failures, err)
            return 0
        # (zran: what the backend delivered; a kept prefix was not fetched again)
        n = len(raw) if batch.fetched is None else batch.fetched
        self.stats.add(bytes_fetched=n, backend_requests=1 if n else 0,
                       prefetch_bytes=n if prefetch else 0)
        # zran chunks are inflated from their access point by the C core too
        # (reader/coldpath.py: ern_cold_zran)
        t0 = time.monotonic()
        if self.native:
            self._decode_store(batch, raw, flights, failures)
        else:
            self._decode_store_py(batch, raw, flights, failures)
        add_fill_time("decode", time.monotonic() - t0)
        return len(raw)

    def _verify_failed(self, c, e, flights, failures) -> None:
        log.error("blob %s: chunk %d (uncompressed offset %d) failed verification: %s",
                  self.blob_id[:12], c.index, c.uncompressed_offset, e)
        self.stats.add(verify_failures=1)
        if self._rawkeep is not None:   # never decode those bytes again
            self._rawkeep.clear()
        self._resolve([c], flights, failures, e)

    def _decode_store(self, batch, raw, flights, failures) -> None:
        """The C core's cold path: decode the batch in one call, verify, write the good
        chunks and set their bits in another (erofs_tools.reader.coldpath). Zran: one
        access point's chunks at a time, so the decode buffer holds one context's output
        (at most a span and a chunk or so), not a whole merged request's."""
        for chunks in coldpath.by_context(self.meta, batch.chunks + self._zran_extra(batch)):
            self._decode_store_chunks(chunks, raw, batch.offset, flights, failures)

    def _decode_store_chunks(self, chunks, raw, raw_offset, flights, failures) -> None:
        decoded = coldpath.decode_range(self.meta, chunks, raw, raw_offset)
        for c, why in decoded.failed:
            self._verify_failed(c, why, flights, failures)
        try:
            res = self.cache.store_range(decoded)
        except (OSError, ErofsToolsError) as e:
            err = e if isinstance(e, StorageError) else \
                StorageError(f"{self.cache.path}: write failed: {e}")
            # released: a fetch that outlived its blob's mount (cachefile.py)
            (log.debug if isinstance(e, ReleasedError) else log.error)("%s", err)
            bad = {c.index for c, _ in decoded.failed}
            self._resolve([c for c in chunks if c.index not in bad], flights,
                          failures, err)
            return
        for c, why in res.failed[len(decoded.failed):]:
            err = StorageError(f"{self.cache.path}: chunk {c.index} not stored: {why}")
            log.error("%s", err)
            self._resolve([c], flights, failures, err)
        if res.stored:
            self._dirty = True
            self.stats.add(chunks_fetched=len(res.stored))
            self._resolve(res.stored, flights, failures, None)

    def _zran_extra(self, batch) -> list:
        """Zran: the chunks not cached nor in flight whose output comes out anyway when
        the batch's chunks are inflated from their access points; stored with them, at
        no extra fetch or inflate (the neighbours of a read file are often read next)."""
        if self.meta.zran is None:
            return []
        extra = self.meta.zran.inflated_with(batch.chunks)
        if not extra:
            return []
        with self._lock:
            return [c for c in extra if c.index not in self._inflight and not self.cache.has(c)]

    def _decode_store_py(self, batch, raw, flights, failures) -> None:
        """The Python cold path (FSCACHE_DAEMON_COLDPATH=python: for comparison)."""
        good = []
        for c in batch.chunks:
            try:
                data = rblob.decode_chunk(self.meta, c, batch.slice_of(raw, c))
            except CorruptImageError as e:
                self._verify_failed(c, e, flights, failures)
                continue
            good.append((c, data))
        if good:
            try:
                self.cache.store(good)
            except (OSError, StorageError) as e:
                err = e if isinstance(e, StorageError) else \
                    StorageError(f"{self.cache.path}: write failed: {e.strerror}")
                (log.debug if isinstance(e, ReleasedError) else log.error)("%s", err)
                self._resolve([c for c, _ in good], flights, failures, err)
                return
            self._dirty = True
            self.stats.add(chunks_fetched=len(good))
            self._resolve([c for c, _ in good], flights, failures, None)

    def _resolve(self, chunks, flights, failures, error) -> None:
        with self._lock:
            for c in chunks:
                f = flights.get(c.index)
                if f is None:
                    continue
                f.error = error
                self._inflight.pop(c.index, None)
                f.set()
                if error is not None:
                    failures.append((c, error))

    def _completed_now(self) -> bool:
        return not self._completed_reported and self.cache.complete()

    def _report_complete(self) -> None:
        with self._lock:
            if self._completed_reported:
                return
            self._completed_reported = True
        log.info("blob %s: every chunk cached", self.blob_id[:12])
        # No sync here: the record is made durable by the daemon's syncer (SYNC_INTERVAL)
        # or at close, like any other fill's. An fdatasync now wrote the whole cache file
        # back (1 GiB: 0.2-1 s) in the fill's worker while the reader was still reading
        # the last windows (the last ~10 % of a cold sequential read), and held the
        # completion hook (unmark, readahead restore) until it was done. A crash before
        # the next sync costs a refetch of what the record does not yet hold, as it does
        # before completion.
        if self.on_complete:
            try:
                self.on_complete(self)
            except Exception:  # noqa: BLE001 - a front end hook must not break fills
                log.exception("blob %s: completion hook failed", self.blob_id[:12])

    def sync(self) -> None:
        """Flush the chunk-state record (periodic and at shutdown)."""
        if self._dirty:
            self._dirty = False
            self.cache.sync_state()

    def close(self) -> None:
        self.cache.close()
