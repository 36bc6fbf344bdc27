"""The cache size limit (`fscache-daemon run --cache-size`): blobs no image uses are
removed from the cache directory, least recently used first, until it fits.

In use, and never removed: every blob open in the daemon (`Daemon.blobs`: the blobs of
mounted images and of unmounted ones the kernel still reads) and every blob a mount is
about to open (pinned by blob id before the mount looks at the cache directory, see
`MountLifecycle._register`). The check and the renames that take a blob's files away
happen under the daemon's lock, the same one pinning takes, so a mount finds either
the whole cache of a blob or nothing of it (then it fetches again). When the blobs in
use alone exceed the limit the cache stays over it: status and metrics say so.

An evictor thread checks once a second and at once when a blob is released. Lives in
its own module as a base of `MountLifecycle` (lifecycle.py), itself a mixin of `Daemon`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from fscache_daemon.storage import cachedir
from fscache_daemon.storage.chunkmap import Hold, key_blob_id

if TYPE_CHECKING:
    from fscache_daemon.storage.blobcache import BlobManager

log = logging.getLogger(__name__)

EVICT_INTERVAL = 1.0


class CacheEviction:
    blob_dir: str
    blobs: dict[str, BlobManager]
    _lock: threading.RLock
    _stop: threading.Event

    def _init_eviction(self, cache_size: int | None) -> None:
        self.cache_size = cache_size
        self._pins: dict[str, int] = {}            # blob id -> mounts pinning it
        self._evict_now = threading.Event()
        self.evicted_blobs = 0
        self.evicted_bytes = 0
        self._over_warned = False

    @contextlib.contextmanager
    def pinned(self, blob_ids: Iterable[str]) -> Iterator[None]:
        """Keep these blobs' cache files while a mount opens them."""
        ids = list(blob_ids)
        with self._lock:
            for b in ids:
                self._pins[b] = self._pins.get(b, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                for b in ids:
                    n = self._pins.get(b, 0) - 1
                    if n > 0:
                        self._pins[b] = n
                    else:
                        self._pins.pop(b, None)

    def _in_use(self, key: str) -> bool:
        """Under self._lock."""
        return key in self.blobs or key_blob_id(key) in self._pins

    def while_open(self, mgr: BlobManager) -> Hold:
        """A context manager factory: each one holds the lock eviction takes and says
        whether `mgr` is still the open manager of its key (a file written under it, e.g.
        the blob's map, never outlives an eviction of the blob: no stray `<key>.map`)."""
        @contextlib.contextmanager
        def hold() -> Iterator[bool]:
            with self._lock:
                yield self.blobs.get(mgr.key) is mgr
        return hold

    def blob_released(self, key: str) -> None:
        """A blob left use now (under self._lock): its LRU time, and a prompt check."""
        cachedir.touch(self.blob_dir, key)
        self._evict_now.set()

    def evict_once(self) -> int:
        """Remove unused blobs, least recently used first, until the cache fits its
        limit (or only blobs in use are left): -> bytes freed."""
        if self.cache_size is None:
            return 0
        entries = cachedir.scan(self.blob_dir)
        total = sum(e.bytes for e in entries.values())
        if total <= self.cache_size:
            self._over_warned = False
            return 0
        with self._lock:
            chosen = cachedir.victims(entries, self.cache_size, self._in_use)
        freed = 0
        for e in chosen:
            with self._lock:
                if self._in_use(e.key):     # mounted or pinned since the scan
                    continue
                moved = cachedir.set_aside(self.blob_dir, e.key)
            cachedir.unlink_all(moved)
            freed += e.bytes
            self.evicted_blobs += 1
            self.evicted_bytes += e.bytes
            log.info("cache over %d bytes: evicted blob %s (%d bytes, unused)",
                     self.cache_size, e.key[:16], e.bytes)
        if total - freed > self.cache_size and not self._over_warned:
            self._over_warned = True
            log.warning("cache holds %d bytes, over its limit of %d: the rest is in use "
                        "by mounted images", total - freed, self.cache_size)
        return freed

    def _evictor(self) -> None:
        cachedir.sweep(self.blob_dir)
        while not self._stop.is_set():
            self._evict_now.wait(EVICT_INTERVAL)
            self._evict_now.clear()
            if self._stop.is_set():
                return
            try:
                self.evict_once()
            except OSError as e:
                log.error("cache eviction failed: %s", e)

    def cache_status(self) -> dict:
        """Bytes the blob cache occupies (allocated, as du counts), its limit, how much
        of it is in use, and what was evicted."""
        entries = cachedir.scan(self.blob_dir)
        total = sum(e.bytes for e in entries.values())
        with self._lock:
            in_use = sum(e.bytes for e in entries.values() if self._in_use(e.key))
        return {"dir": self.blob_dir, "bytes": total, "limit": self.cache_size,
                "in_use_bytes": in_use, "blobs": len(entries),
                "over_limit": self.cache_size is not None and total > self.cache_size,
                "evicted_blobs": self.evicted_blobs, "evicted_bytes": self.evicted_bytes}
