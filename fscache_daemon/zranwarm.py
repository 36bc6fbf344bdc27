"""Zran meta blobs fetched and parsed before the mount that needs them.

A zran blob's chunk map is its meta blob (docs/zran.md): the ML image's two are 7.2 MB
to fetch, sha256, zstd-decompress (57 MB of CI area) and parse, ~0.2-0.4 s of a cold
mount spent after the bootstrap was copied and parsed. The meta blob is named in the
bootstrap's blob table, so the work can start as soon as a bootstrap is known:

  * at the bootstrap layer's commit (the snapshotter's `POST /api/v1/warm`): a CRI pull
    or rpull ends there, 0.1-0.9 s before containerd's Prepare of the container's
    snapshot asks for the lazy mount;
  * at the start of every mount, beside the bootstrap's copy and parse
    (warming.MountWarmer), when nothing warmed it before.

The mount then takes the parsed map (`take`) instead of fetching it; what it gets is what
`chunkmap.fetch_zran_meta` would have given it at that moment: the same function on the
same backend object (the warm holds the backend open until it is taken, so the mount's
`_backend(spec, options)` finds that very object), the same blob-table entry (bytes
compared), the meta blob checked against its sha256 either way. The bootstrap's pins are
applied by the mount as before. A warm that failed is not reported: the mount fetches
again and reports its own failure. Memory stays bounded: at most MAX_WARM maps
(MAX_WARM_AREA bytes of CI area) are held, each for TTL seconds unless a mount takes it.
"""
from __future__ import annotations

import _thread
import collections
import logging
import threading
import time
from collections.abc import Callable

from erofs_tools.reader import zran as rzran
from fscache_daemon.storage.chunkmap import fetch_zran_meta

log = logging.getLogger(__name__)

MAX_WARM = 16                  # maps held (a hostile bootstrap lists thousands of blobs)
MAX_WARM_AREA = 512 << 20      # their CI areas (the ML image's two: ~70 MB)
TTL = 120.0                    # seconds a map waits for its mount
# a mount's own warm can start after that mount took (or found no) map: it would fetch
# again for nobody and hold the backend for TTL; keys taken this recently are not warmed
TAKEN_FOR = 30.0
MAX_TAKEN = 64


class _Warm:
    __slots__ = ("done", "result", "error", "release", "timer", "area")

    def __init__(self, release: Callable[[], None], area: int) -> None:
        self.done = threading.Event()
        self.result: tuple | None = None
        self.error: BaseException | None = None
        self.release: Callable[[], None] | None = release
        self.timer: threading.Timer | None = None
        self.area = area


class ZranWarm:
    """Zran chunk maps fetched ahead, keyed by (backend object, blob id, blob entry)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: collections.OrderedDict[tuple, _Warm] = collections.OrderedDict()
        self._area = 0
        self._taken: collections.OrderedDict[tuple, float] = collections.OrderedDict()
        self.started = self.taken = self.failed = 0

    @staticmethod
    def _key(backend, blob_id: str, entry) -> tuple:
        return (id(backend), blob_id, entry.encode())

    def start(self, backend, blob_id: str, entry, hold: Callable[[], object],
              release: Callable[[], None]) -> bool:
        """Fetch and parse `entry`'s meta blob through `backend` on a thread of its own
        (nothing if it is not a zran entry, or already warm, or over the bounds).
        `hold()` keeps the backend open until the map is taken or expires (then
        `release()`). -> whether it started."""
        if not rzran.is_zran_entry(entry):
            return False
        key = self._key(backend, blob_id, entry)
        area = int(entry.ci_uncompressed_size)
        with self._lock:
            if key in self._items or len(self._items) >= MAX_WARM or \
                    self._area + area > MAX_WARM_AREA or self._taken_lately(key):
                return False
            w = _Warm(release, area)
            self._items[key] = w
            self._area += area
            self.started += 1
        hold()
        try:
            _thread.start_new_thread(self._run, (key, w, backend, blob_id, entry))
        except BaseException:
            self._drop(key, w)
            raise
        return True

    def _run(self, key: tuple, w: _Warm, backend, blob_id: str, entry) -> None:
        t0 = time.monotonic()
        try:
            w.result = fetch_zran_meta(blob_id, backend, entry, None)
        except BaseException as e:  # noqa: BLE001 - the mount fetches again and reports
            w.error = e
            with self._lock:
                self.failed += 1
            log.debug("blob %s: zran meta not warmed: %s", blob_id[:12], e)
        else:
            log.debug("blob %s: zran meta warmed in %.3f s", blob_id[:12],
                      time.monotonic() - t0)
        finally:
            w.done.set()
        with self._lock:
            if self._items.get(key) is not w:
                return      # taken meanwhile (the taker released the backend)
            t = w.timer = threading.Timer(TTL, self._drop, (key, w))
            t.daemon = True
        t.start()

    def _drop(self, key: tuple, w: _Warm) -> None:
        with self._lock:
            if self._items.get(key) is w:
                del self._items[key]
                self._area -= w.area
            release, w.release = w.release, None
        if release is not None:
            release()

    def take(self, backend, blob_id: str, entry) -> tuple | None:
        """(meta, bytes fetched) of a map warmed for exactly this backend, blob and
        entry, waiting for a warm under way; None if there is none or it failed."""
        key = self._key(backend, blob_id, entry)
        with self._lock:
            self._taken[key] = time.monotonic()
            self._taken.move_to_end(key)
            while len(self._taken) > MAX_TAKEN:
                self._taken.popitem(last=False)
            w = self._items.pop(key, None)      # one mount takes it
            if w is None:
                return None
            self._area -= w.area
            self.taken += 1
        w.done.wait()
        with self._lock:
            t, w.timer = w.timer, None
            release, w.release = w.release, None
        if t is not None:
            t.cancel()
        if release is not None:
            release()
        return w.result if w.error is None else None

    def _taken_lately(self, key: tuple) -> bool:
        t = self._taken.get(key)
        return t is not None and time.monotonic() - t < TAKEN_FOR

    def stats(self) -> dict:
        """Maps warmed (started), taken by a mount, failed, held now (the API's metrics
        under "zran_warm")."""
        with self._lock:
            return {"started": self.started, "taken": self.taken, "failed": self.failed,
                    "held": len(self._items)}

    def close(self) -> None:
        """Drop every map (the daemon stops)."""
        with self._lock:
            items = list(self._items.items())
        for key, w in items:
            with self._lock:
                t, w.timer = w.timer, None
            if t is not None:
                t.cancel()
            self._drop(key, w)
