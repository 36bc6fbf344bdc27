"""Prefetch at mount: the files of the bootstrap's prefetch table, streamed at once.

What a start needs first is listed in the prefetch table (`erofs-tools pack
--prefetch-list`, or `erofs-tools optimize --trace`, which also puts those chunks back
to back in a prefetch blob). Right after the mount the daemon fetches them:

- in large backend requests (PREFETCH_REQUEST, 4 MiB: a few requests for the traced
  region of an optimized image, instead of one per 1 MiB batch);
- PREFETCH_INFLIGHT requests in flight at once (decoding one while the next arrives);
- at readahead priority in the worker pool: after every on-demand read (a reader's
  request queued meanwhile is taken first by the next free worker), before background
  prefetch (`--prefetch`, paced by the token bucket; this stream is not paced: it is
  bounded by the table);
- through the blob's single-flight table: a reader needing a chunk of a request in
  flight waits for that request instead of fetching the chunk again, and a chunk a
  reader fetched first is skipped.

A blob the table lists whole (an optimized image's prefetch blob: every chunk of it is
the data of a table file) is unmarked as soon as the stream completed it, not kept
marked for the access trace (`Daemon._blob_complete`): the start reads most of its data
right after, and on a marked cache file each of those reads waits for the fd holder's
answer (~30 % slower warm reads, docs/daemon.md). The trace of such an image then lacks
the reads of that blob after its completion; FSCACHE_DAEMON_TRACE_PREFETCH_BLOB=1 keeps it
marked (to trace an optimized image for another `optimize`).
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import CancelledError, Future
from typing import TYPE_CHECKING, Any

from fscache_daemon.storage.planner import chunks_in_range, plan

if TYPE_CHECKING:
    from fscache_daemon.storage.blobcache import BlobManager

log = logging.getLogger(__name__)

PREFETCH_REQUEST = 4 << 20
PREFETCH_INFLIGHT = 4
# FSCACHE_DAEMON_TRACE_PREFETCH_BLOB=1: blobs the table lists whole stay marked when
# complete, like any other blob completed ahead of its readers (the trace sees them)
TRACE_TABLE_BLOBS = os.environ.get("FSCACHE_DAEMON_TRACE_PREFETCH_BLOB", "") == "1"


def listed_whole(mgr: Any) -> bool:
    """Whether `mgr`'s blob is listed whole by a prefetch table streamed for it (its
    completion then unmarks it at once, see the module doc)."""
    # the flag lives on the manager (BlobManager.listed_whole): a blob released and
    # opened again is a new manager, not listed until its own table's stream says so
    return not TRACE_TABLE_BLOBS and bool(getattr(mgr, "listed_whole", False))


def _still_open(blobs: Mapping, key: str, mgr: Any) -> bool:
    return blobs.get(key) is mgr      # else unmounted (or released and opened again)


# how often a wait for a request looks at the stop event (a result is taken as soon as it
# is there: this bounds only how late a stop is seen while a request is slow)
STOP_POLL = 0.05


def wait_stoppable(fut: Future, stop: threading.Event, poll: float = STOP_POLL) -> bool:
    """Wait until `fut` is done (-> True) or `stop` is set (-> False, `fut` cancelled if
    it did not begin: a request in flight is left to its worker)."""
    while True:
        try:
            fut.exception(timeout=poll)
            return True
        except TimeoutError:
            if stop.is_set():
                fut.cancel()
                return fut.done() and not fut.cancelled()
        except CancelledError:
            return False


def stream_table(pool, blobs: Mapping, jobs: Iterable[tuple[str, int, int]],
                 stop: threading.Event, request: int = PREFETCH_REQUEST,
                 inflight: int = PREFETCH_INFLIGHT, image_table: bool = False) -> int:
    """Fetch the missing chunks of `jobs` ((cache key, offset, length) of the prefetch
    table's files) from `blobs` (cache key -> BlobManager); -> bytes fetched.
    `image_table`: the jobs are the image's own prefetch table, so a blob they list whole
    is an optimized image's prefetch blob (listed_whole). Other callers (the start set,
    whose guessed files can cover a tiny image's only blob) leave it False: their blobs
    stay marked for the access trace. `stop` ends the stream at once, its waits too:
    requests not begun are cancelled, those in flight are not waited for."""
    per_key: dict[str, tuple[Any, list]] = {}
    listed: dict[str, set[int]] = {}
    for key, off, length in jobs:
        m = blobs.get(key)
        if m is not None:
            per_key.setdefault(key, (m, []))[1].extend(m.absent(off, length))
            n = min(length, m.size - off)
            listed.setdefault(key, set()).update(c.index for c in chunks_in_range(m.meta, off, n))
    for key, (m, _chunks) in per_key.items():
        if image_table and len(listed[key]) >= len(m.meta.chunks):
            m.listed_whole = True       # before any fill of the stream can complete it
    fetched = 0
    pending: deque[Future] = deque()

    def wait_one() -> int:
        fut = pending.popleft()
        if not wait_stoppable(fut, stop):
            return 0
        try:
            return fut.result()
        except Exception as e:  # noqa: BLE001 - a reader's own request will retry
            log.warning("prefetch request failed: %s", e)
            return 0

    for key, (mgr, chunks) in per_key.items():
        for batch in plan(chunks, request):
            if stop.is_set() or not _still_open(blobs, key, mgr):
                break
            while len(pending) >= inflight and not stop.is_set():
                fetched += wait_one()
            if stop.is_set():
                break
            pending.append(pool.submit_readahead(mgr.fill_chunks, batch.chunks,
                                                 prefetch=True, batch_size=request))
    while pending:
        if stop.is_set():
            for fut in pending:
                fut.cancel()
            break
        fetched += wait_one()
    return fetched


class PrefetchLoops:
    """The Daemon's prefetch after a mount, on two threads of its own:

    - the table streamer: each image's prefetch table (stream_table), in mount order;
    - the prefetcher: `--prefetch`, every blob of the image whole, paced by the token
      bucket, behind on-demand work; an image's blobs after its own table was streamed.

    One thread did both: an image's table (what its start needs first) then waited behind
    every whole-blob prefetch queued before it (minutes for a large image at the default
    64 MB/s), and its after-mount work waited STREAM_WAIT for it."""
    # What this mixin uses of the Daemon (declared for the type checker)
    pool: Any
    blobs: dict[str, BlobManager]
    images: dict[str, Any]
    bucket: Any
    batch_size: int
    prefetch_bytes: int
    _stop: threading.Event
    _streams: dict[str, threading.Event]     # mount point -> its table streamed
    _prefetch_q: queue.Queue
    _table_q: queue.Queue
    _prefetch_count: threading.Lock

    def _queue_prefetch(self, img: Any) -> None:
        table = [(img.blob_keys[b], off, length) for b, off, length in img.prefetch_ranges
                 if 0 <= b < len(img.blob_keys)]
        streamed = None
        if table:
            streamed = self._streams[img.mountpoint] = threading.Event()
            self._table_q.put((img.mountpoint, table, streamed))
        if img.prefetch:
            self._prefetch_q.put((img.mountpoint, list(img.blob_keys), streamed))

    def _count_prefetched(self, n: int) -> None:
        with self._prefetch_count:
            self.prefetch_bytes += n

    def _table_streamer(self) -> None:
        while (item := self._table_q.get()) is not None:
            mountpoint, table, streamed = item
            try:
                if mountpoint in self.images and not self._stop.is_set():
                    self._count_prefetched(stream_table(self.pool, self.blobs, table,
                                                        self._stop, image_table=True))
            except Exception:  # noqa: BLE001 - prefetch is best effort
                log.exception("prefetch of %s's prefetch table failed", mountpoint)
            finally:
                if self._streams.get(mountpoint) is streamed:
                    self._streams.pop(mountpoint, None)
                streamed.set()

    def _prefetcher(self) -> None:
        while (item := self._prefetch_q.get()) is not None:
            mountpoint, keys, streamed = item
            # this image's table first: its blobs whole would only compete with it
            while streamed is not None and not streamed.wait(STOP_POLL):
                if self._stop.is_set():
                    return
            for key in keys:
                if self._stop.is_set() or mountpoint not in self.images:
                    break
                mgr = self.blobs.get(key)
                if mgr is None:
                    continue
                try:
                    self._prefetch_range(mgr, 0, None)
                except Exception:  # noqa: BLE001 - prefetch is best effort
                    log.exception("prefetch of blob %s failed", key[:12])
            log.info("prefetch for %s done", mountpoint)

    def _prefetch_range(self, mgr: BlobManager, off: int, length: int | None) -> None:
        missing = mgr.missing(off, length)
        for batch in plan(missing, self.batch_size):
            if self._stop.is_set() or self.blobs.get(mgr.key) is not mgr:
                return
            # on-demand work first: back off while any is queued or running
            while self.pool.ondemand_pending() and not self._stop.is_set():
                self._stop.wait(0.002)
            self.bucket.take(batch.length, self._stop)
            fut = self.pool.submit_prefetch(self._prefetch_batch, mgr, batch.chunks)
            try:
                self._count_prefetched(fut.result())
            except Exception as e:  # noqa: BLE001
                log.warning("prefetch batch of blob %s failed: %s", mgr.blob_id[:12], e)

    @staticmethod
    def _prefetch_batch(mgr: Any, chunks: Any) -> int:
        return mgr.fill_chunks(chunks, prefetch=True)
