"""The daemon core: images, shared blobs, prefetch, and their lifecycle.

Threads:
  - the front end's poller (fanotify: PreContentWatcher's loop; cachefiles: its poller)
    reads kernel requests and answers ranges already cached at once (fast path);
  - a worker pool (`--threads`, pool.py) runs everything else from one priority queue:
    on-demand fills first, prefetch batches only when no on-demand work is queued, and at
    most `prefetch_workers` of them at a time, so prefetch never holds every worker;
  - one prefetcher thread plans prefetch batches and paces them with a token bucket
    (`prefetch_rate` bytes/s);
  - a syncer thread flushes chunk-state records every SYNC_INTERVAL;
  - a reaper thread releases the blobs of unmounted images once the kernel let go of
    their superblock (see `umount`);
  - the API server thread (api.py).

Images and blobs: an image is a mounted bootstrap; its data blobs are BlobManagers keyed
by cache key, shared by every image that names the same blob with an agreeing chunk
table (one cache file per blob, in the cache directory, whatever image brought it). An
image whose chunk table for a blob id disagrees with the one in use gets a variant of
its own (key `<id>@<table digest prefix>`, its own cache file; see `_open_blob`).
`mounts.json` in the cache directory records the mounts (with their cache keys, and a
mount about to be made) so that a restarted daemon picks them
up (the kernel mounts survive a daemon restart; see docs/daemon.md).

Front ends implement the small interface of `frontend.base.Frontend`; the daemon never
touches fanotify or /dev/cachefiles itself.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from fscache_daemon import __version__
from fscache_daemon.blobopen import EarlyChecks
from fscache_daemon.errors import (
    ConflictError,
    DaemonError,
    FrontendError,
    MountBusyError,
    MountError,
    NotFoundError,
)
from fscache_daemon.frontend.base import Frontend, NullFrontend
from fscache_daemon.frontend.cachefiles_adapter import CachefilesAdapter
from fscache_daemon.frontend.factory import fanotify_available, make_frontend
from fscache_daemon.frontend.fanotify_adapter import FanotifyFrontend
from fscache_daemon.images import Image
from fscache_daemon.keyedlock import KeyedLock
from fscache_daemon.lifecycle import MountLifecycle
from fscache_daemon.metrics import ProcessSampler, prometheus_text
from fscache_daemon.pool import (
    PRIO_ONDEMAND,
    PRIO_PREFETCH,
    PRIO_READAHEAD,
    TASK,
    PriorityPool,
    TokenBucket,
)
from fscache_daemon.prefetch import PrefetchLoops, listed_whole
from fscache_daemon.readahead import BlobReadahead, task_bytes
from fscache_daemon.restore import Unpicked
from fscache_daemon.state import CacheDirLock
from fscache_daemon.storage import StorageError
from fscache_daemon.storage import blobcache as bc
from fscache_daemon.storage.backends import Backend, open_backend
from fscache_daemon.storage.keychain import Keychain
from fscache_daemon.storage.planner import (
    DEFAULT_BATCH_SIZE,
    chunks_in_range,
    clamp_range,
    plan,
    tasks_of,
)
from fscache_daemon.trace import TraceRecorder, find_image
from fscache_daemon.zranwarm import ZranWarm

# names that moved out of this module, kept importable from here
__all__ = ["Daemon", "Frontend", "NullFrontend", "FanotifyFrontend", "CachefilesAdapter",
           "Image", "PriorityPool", "TokenBucket",
           "prometheus_text", "fanotify_available", "make_frontend", "DaemonError", "MountError",
           "MountBusyError", "NotFoundError", "ConflictError", "PRIO_ONDEMAND",
           "PRIO_READAHEAD", "PRIO_PREFETCH"]

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "/var/lib/fscache-daemon"
DEFAULT_API_SOCK = "/run/fscache-daemon/api.sock"
DEFAULT_PREFETCH_RATE = 64 << 20          # bytes/s
# Largest readahead window: a sequential reader's windows double up to it. With 16 MiB
# the workers idled until the reader reached a window's marker (cold GiB 0.80-0.85 s
# against 0.75-0.78 s, docs/daemon.md); a file miss still brings <= readahead.WHOLE_FILE.
DEFAULT_READAHEAD = 64 << 20
INITIAL_READAHEAD = 2 << 20               # a sequential reader's first window
# How often the cache files are fdatasync'ed and their chunks recorded as durable. Only a
# power loss needs this (within one boot the live bitmap is trusted), and the kernel
# writes dirty data back after ~30 s by itself: syncing every second instead made a
# cold read's cache writes compete with its backend reads for the disk (1 GiB image:
# ~2 s of iowait).
SYNC_INTERVAL = 30.0
# A blob completed ahead of its readers stays marked for its access trace; this often the
# daemon looks whether every chunk was read since (then it is unmarked: warm reads of a
# marked cache file each raise an event, ~30 % slower measured on 128 MiB)
TRACE_UNMARK_INTERVAL = 2.0
# ... and at most this long after completion (run --trace-window): a trace is for the
# cold start, while warm reads of a blob nobody reads whole must end up served by the
# kernel alone
TRACE_KEEP_MARKED = 120.0
# A readahead request spans gaps of up to this many stored bytes between the chunks it
# wants (fetched and dropped): without this the cold files windows leave out split them
# into a request per file (ML cold start: 864 registry requests instead of 597). On a
# 1 Gbit/s link 16 KiB take 0.13 ms, a request's round trip 2-3 ms.
READAHEAD_MAX_GAP = 16 << 10
# A miss's window chunks whose stored bytes lie next to the missing chunks' come in the
# miss's own backend request, growing it by at most this many stored bytes (1 ms on a
# 1 Gbit/s link, against a round trip of 10-15 ms to the registry for a small request
# on the ML cold start): the import that reads a package's __init__ reads a sibling
# module next, and on that start 39-60 reads waited for such a chunk while the window's
# request was still in flight, 3-10 ms each; 23 with this (one run, load 11). The
# sibling read next mostly lies within ~50 KB; 256 KiB along left 10 waits in one run,
# not compared for time (each request's transfer and decode grow with it).
ALONG_BYTES = 128 << 10
# Where a miss's window is queued: 0 before the miss's own fetch (other workers fetch it
# beside it; a reader going on into it finds it sooner); 1 after it (the registry serves
# the miss's request alone: a small range GET on the ML cold start took p50 4.0 ms alone,
# 6.0 beside one other request, 8.5 beside two); 2 after it for a module miss's
# neighbours only (a reader goes on into the rest of a file or a sequential window at
# once: with 1, ~35 more reads waited for a window chunk in flight, with 2 ~7). Under load
# 5-18 the time could not be judged (docs/performance.md, branch linkmiss): 0 until a
# quiet run decides; FSCACHE_DAEMON_WINDOW_AFTER_MISS=1/2 to compare.
_AFTER = os.environ.get("FSCACHE_DAEMON_WINDOW_AFTER_MISS", "0")
WINDOW_AFTER_MISS = int(_AFTER) if _AFTER in ("0", "1", "2") else 0


class Daemon(MountLifecycle, PrefetchLoops):
    def __init__(self, cache_dir: str = DEFAULT_CACHE_DIR, *, frontend: str | Frontend = "auto",
                 threads: int = 8, batch_size: int = DEFAULT_BATCH_SIZE,
                 prefetch_rate: int = DEFAULT_PREFETCH_RATE, durable: bool = True,
                 readahead: int = DEFAULT_READAHEAD, fetch_deadline: float | None = None,
                 hosts_dir: str | None = None, cache_size: int | None = None,
                 trace_window: float = TRACE_KEEP_MARKED,
                 containerd_config: str | None = None):
        self.trace_window = trace_window
        self.cache_dir = os.path.realpath(cache_dir)   # mount sources are recorded by it
        self.fetch_deadline = fetch_deadline  # registry retrying per fetch (None: default)
        # containerd's hosts directory: mirrors, plain HTTP, TLS per registry host
        self.hosts_dir = hosts_dir
        # containerd's config.toml: registry credentials per host (read per backend)
        self.containerd_config = containerd_config
        self.blob_dir = os.path.join(self.cache_dir, "blobs")
        self.boot_dir = os.path.join(self.cache_dir, "bootstraps")
        for d in (self.cache_dir, self.blob_dir, self.boot_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        # before anything else touches the cache directory (and before a front end starts
        # an fd holder for it): one daemon per cache directory
        self._dir_lock = CacheDirLock(self.cache_dir)
        # kubelet's pull secrets, recorded by the CRI image-service proxy if it runs
        self.keychain = Keychain(self.cache_dir)
        self.threads = threads
        self.batch_size = batch_size
        self.durable = durable
        self.readahead = readahead
        try:
            self.frontend = frontend if isinstance(frontend, Frontend) else \
                make_frontend(frontend, self.cache_dir, threads)
        except BaseException:
            self._dir_lock.release()
            raise
        self.pool = PriorityPool(threads, prefetch_workers=max(1, threads // 4))
        self.bucket = TokenBucket(prefetch_rate)
        self.images: dict[str, Image] = {}     # canonical mount point -> mounted image
        self.detached: list[Image] = []         # unmounted, superblock still alive
        self.unpicked: list[Unpicked] = []      # the kernel has them, not served yet
        self.blobs: dict[str, bc.BlobManager] = {}      # cache key -> manager
        self._ra: dict[str, BlobReadahead] = {}         # cache key -> readahead plan
        self._walks: dict[tuple[str, str], Future] = {}  # bootstrap walks begun at mount
        self.blob_users: dict[str, set[str]] = {}       # cache key -> image users
        self.backends: dict[tuple, Backend] = {}
        self._lock = threading.RLock()        # images/blobs/backends
        # the kernel side of mount/umount, one at a time: where the kernel cannot name
        # the EROFS superblock a mount made (mounts.erofs_instance_of), a front end names
        # it by what appeared in /sys/fs/erofs meanwhile. Opening an
        # image's blobs (chunk maps from a registry: seconds when it is slow) happens
        # outside it, so that one image's slow registry never delays another's mount
        self._mount_lock = threading.Lock()
        self._mountpoints = KeyedLock()       # one mount/umount of a mount point at a time
        self._blob_opening = KeyedLock()      # per blob id: its cache file opened, marked
        self._state_lock = threading.Lock()   # mounts.json writes, each of the state now
        self._state_behind = threading.Event()  # a save left to save_state_later
        self._boot_lock = threading.Lock()    # bootstrap copies made vs. dropped
        self._boot_inflight: dict[str, int] = {}    # copy -> mounts between copy and use
        self._backend_inflight: dict[int, int] = {}  # id(backend) -> mounts opening blobs
        self._stop = threading.Event()
        self._prefetch_q: queue.Queue = queue.Queue()   # --prefetch: whole blobs
        self._table_q: queue.Queue = queue.Queue()      # prefetch tables, streamed
        self._prefetch_count = threading.Lock()         # prefetch_bytes: two threads add
        # mount point -> set once its prefetch table was streamed (lifecycle._after_mount)
        self._streams: dict[str, threading.Event] = {}
        self._threads: list[threading.Thread] = []
        self.started_at = time.time()
        self.sampler = ProcessSampler()
        self.meta_bytes_fetched = 0
        self.prefetch_bytes = 0
        self.zran_warm = ZranWarm()     # zran chunk maps fetched before their mount
        self._init_eviction(cache_size)     # bytes (None: no limit)
        # other services in this process add their metrics here (name -> callable), e.g.
        # the snapshotter's per-call latency under "snapshotter"
        self.metric_sources: dict[str, Callable[[], dict]] = {"zran_warm": self.zran_warm.stats}
        self.traces = TraceRecorder(self)       # first accesses, per cache key (trace.py)
        # complete, still marked: key -> (manager, monotonic time to unmark it anyway)
        self._kept_marked: dict[str, tuple[bc.BlobManager, float]] = {}

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        # imported now, not midway through a first mount (from disk after a drop of
        # the page cache): getaddrinfo's host name codec (~5-60 ms of the first registry
        # request), blake3 (the first miss's digest, ~0.05 s CPU), open_image, hosts.toml
        import encodings.idna  # noqa: F401

        import blake3  # noqa: F401

        import erofs_tools.reader.data  # noqa: F401
        import erofs_tools.registry.hosts  # noqa: F401
        from fscache_daemon import mounts
        mounts.load_libc()      # not in the first mount, just before its mount(2)
        self.frontend.start(self)
        self._restore()
        run_loop = getattr(self.frontend, "run_loop", None)
        if run_loop:
            run_loop()
        loops = [("prefetcher", self._prefetcher), ("table-streamer", self._table_streamer),
                 ("syncer", self._syncer),
                 ("reaper", self._reaper), ("trace-unmarker", self._trace_unmarker),
                 ("restorer", self._restorer)]
        if self.cache_size is not None:
            loops.append(("evictor", self._evictor))
        for name, target in loops:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("daemon %s up: front end %s, cache %s, %d workers", __version__,
                 self.frontend.name, self.cache_dir, self.pool.threads)

    def shutdown(self) -> None:
        """Stop serving. Mounts stay in the kernel, and so do the marks of every blob a
        live superblock reads (mounted or detached images, recorded in mounts.json): with
        the fanotify holder their readers of uncached ranges wait for the next daemon."""
        if self._stop.is_set():
            return
        log.info("daemon shutting down (%d mounts, %d detached stay)", len(self.images),
                 len(self.detached))
        self._stop.set()
        self._evict_now.set()
        self._prefetch_q.put(None)
        self._table_q.put(None)
        for ev in list(self._streams.values()):
            ev.set()
        for img in self.all_images():
            img.stop.set()      # its start set and library chase end (they hold no lock)
        self.frontend.stop()
        self.pool.shutdown(wait=True)
        for t in self._threads:
            t.join(timeout=10)
        self.zran_warm.close()
        with self._lock:
            for mgr in self.blobs.values():
                try:
                    mgr.run_after_mount()   # what its mount's thread did not do yet
                    mgr.sync()
                    mgr.close()
                except OSError as e:
                    log.warning("blob %s: close failed: %s", mgr.blob_id[:12], e)
            for be in self.backends.values():
                be.close()
        self._dir_lock.release()
        log.info("daemon stopped")

    # -- blobs --------------------------------------------------------------------------
    @staticmethod
    def _backend_key(spec: str, options: dict | None) -> tuple:
        options = options or {}
        return (spec, options.get("proxy"), options.get("mirror"), options.get("insecure"))

    def _backend(self, spec: str, options: dict) -> Backend:
        """The backend for `spec`, held for a mount opening its blobs (no other mount's
        failure closes it meanwhile) until `_release_backend`."""
        key = self._backend_key(spec, options)
        with self._lock:
            be = self.backends.get(key)
            if be is None:
                kw = {k: options[k] for k in ("proxy", "mirror", "insecure") if
                      options.get(k) is not None}
                if self.fetch_deadline is not None:
                    kw["deadline"] = self.fetch_deadline
                    # one read that hangs must not outlast the deadline either (the
                    # client's default socket timeout is 30 s per attempt)
                    kw["timeout"] = min(30.0, self.fetch_deadline)
                if not options.get("mirror"):
                    kw["hosts_dir"] = self.hosts_dir
                kw["containerd_config"] = self.containerd_config
                be = open_backend(spec, keychain=self.keychain, **kw)
                self.backends[key] = be
            self._backend_inflight[id(be)] = self._backend_inflight.get(id(be), 0) + 1
            return be

    def _release_backend(self, be: Backend) -> None:
        with self._lock:
            n = self._backend_inflight.get(id(be), 0) - 1
            if n > 0:
                self._backend_inflight[id(be)] = n
            else:
                self._backend_inflight.pop(id(be), None)

    def _drop_unused_backends(self) -> None:
        """Close the backends no open blob reads through and no mount is opening blobs
        with, so that the next mount of their image reads the credentials and hosts.toml
        as they are then."""
        with self._lock:
            used = {id(m.backend) for m in self.blobs.values()} | set(self._backend_inflight)
            used |= {id(a) for m in self.blobs.values() for a in m.alternates}
            unused = [k for k, be in self.backends.items() if id(be) not in used]
            dropped = [self.backends.pop(k) for k in unused]
        for be in dropped:
            be.close()

    def _open_blob(self, ref, backend, key: str | None = None,
                   early: EarlyChecks | None = None) -> bc.BlobManager:
        """The manager serving blob `ref` for one bootstrap. With `key` (recorded in
        mounts.json) exactly that cache; else an open cache of the blob whose chunk map
        agrees with the bootstrap, or a new one: the plain `<id>` files if nothing else
        uses them and their map (if any) fits, else the variant `<id>@<table digest>` so
        that another table's cache is neither refused nor overwritten. `early`: the
        mount's blob checks started before its bootstrap was parsed (blobopen.py)."""
        if key is not None and bc.key_blob_id(key) != ref.blob_id:
            raise StorageError(f"cache key {key!r} is not one of blob {ref.blob_id[:12]}")
        share = dict(entry=ref.entry, blob_size=ref.compressed_size, digests=ref.digests,
                     pins=ref.pins)
        with self._lock:
            open_now = [m for m in self.blobs.values() if m.blob_id == ref.blob_id]
        open_now.sort(key=lambda m: m.key != ref.blob_id)     # the plain cache first
        for mgr in open_now:
            if key is not None and mgr.key != key:
                continue
            if key is not None:
                bc.check_shareable(mgr.meta, ref.blob_id, backend, **share)
                return mgr
            if bc.share_mismatch(mgr.meta, ref.blob_id, backend, **share) is None:
                return mgr
        backend.register_blob(ref.blob_id, ref.compressed_size)
        taken = {m.key for m in open_now}
        # the table digest only for a map written (after the blob's check, off the
        # mount's thread) or a variant's key
        load = dict(share, table=lambda: ref.table_digest,
                    early=None if early is None else
                    lambda end: early.waiter(backend, ref.blob_id, end),
                    warm=lambda entry: self.zran_warm.take(backend, ref.blob_id, entry))
        pending: list = []      # the blob's check (chunkmap.PendingCheck)
        res = None
        if key is None and ref.blob_id not in taken:
            res = bc.load_or_fetch_meta(self.blob_dir, ref.blob_id, backend,
                                        key=ref.blob_id, rebuild=False, pending=pending,
                                        **load)
            if res is not None:
                key = ref.blob_id
        if res is None:
            if key is None:
                key = bc.variant_key(ref.blob_id, ref.table_digest)
            if key in taken:    # a table digest prefix shared by two disagreeing tables
                raise StorageError(f"blob {ref.blob_id[:12]}: cache {key} is in use by an "
                                   "image whose chunk table differs from this bootstrap's")
            res = bc.load_or_fetch_meta(self.blob_dir, ref.blob_id, backend, key=key,
                                        pending=pending, **load)
        meta, fetched = res
        assert key is not None
        # the blob's check ends before its cache is open to other mounts: a blob whose
        # registry hangs must not hold up another image sharing it (that mount opens the
        # blob itself meanwhile, with its own backend); its map file is written after
        for p in pending:
            p.wait()
        if meta.uncompressed_size != ref.uncompressed_size:
            raise StorageError(f"blob {ref.blob_id[:12]}: chunk map says "
                               f"{meta.uncompressed_size} bytes, bootstrap "
                               f"{ref.uncompressed_size}")
        # The chunk map above may have taken seconds (a slow registry) and ran beside
        # other mounts of this blob; the cache file is opened by one mount at a time
        with self._blob_opening.hold(ref.blob_id):
            with self._lock:
                other = self.blobs.get(key)
            if other is not None:        # another mount opened it meanwhile
                bc.check_shareable(other.meta, ref.blob_id, backend, **share)
                return other
            cache = bc.BlobCache(self.blob_dir, meta, durable=self.durable, key=key)
            mgr = bc.BlobManager(meta, cache, backend, batch_size=self.batch_size,
                                 on_complete=self._blob_complete, pipeline=True)
            mgr.meta_bytes_fetched = fetched
            # its map file, by the mount's after-mount thread while the blob is open
            mgr.after_mount.extend(p.writer(self.while_open(mgr)) for p in pending)
            with self._lock:
                self.blobs[mgr.key] = mgr
                self._ra[mgr.key] = BlobReadahead(
                    mgr, min(INITIAL_READAHEAD, self.readahead), self.readahead,
                    withhold=lambda c: self.frontend.withhold(mgr, c),  # mgr not rebound
                    publish=lambda c: self.frontend.publish(mgr, c))
                self.meta_bytes_fetched += fetched
        if mgr.key != ref.blob_id:
            log.warning("blob %s: this bootstrap's chunk table differs from the one "
                        "cached under its id; served from its own cache %s",
                        ref.blob_id[:12], cache.path)
        return mgr

    def _blob_complete(self, mgr: bc.BlobManager) -> None:
        # A fill that outlived the blob's release completes it late (its store ended just
        # before the close): by then the blob may be open again under the same key, in a
        # new manager that completed and is kept marked. The released one's entry took
        # the successor's place, was dropped as released, and the successor stayed
        # marked until its own release (every warm read an event). Its release unmarked
        # the released one; nothing is left to do for it.
        if self.blobs.get(mgr.key) is not mgr:
            return
        try:
            # completed by fetching: keep the front end watching while some chunk was never
            # read (for the trace), unless the prefetch table lists it whole (prefetch.py)
            keep = self.frontend.name == "fanotify" and self.trace_window > 0 and \
                not self.traces.fully_read(mgr) and not listed_whole(mgr)
            if keep:
                with self._lock:    # released meanwhile: its entry is not set
                    if self.blobs.get(mgr.key) is mgr:
                        self._kept_marked[mgr.key] = (mgr, time.monotonic() +
                                                      self.trace_window)
            self.frontend.blob_complete(mgr, keep_mark=keep)
        except (FrontendError, OSError) as e:
            log.error("blob %s: front end completion failed: %s", mgr.blob_id[:12], e)

    # -- front end callbacks --------------------------------------------------------------
    def fill(self, key: str, offset: int, length: int) -> None:
        """Make a range of the blob cache named `key` (mgr.key: a blob id or a variant)
        present."""
        mgr = self.blobs.get(key)
        if mgr is None:
            raise NotFoundError(f"no blob {key!r} is open")
        self.traces.note(key, mgr, offset, length)
        t0 = time.monotonic()
        debug = log.isEnabledFor(logging.DEBUG)
        if debug:
            bc.FILL_TIMES.__dict__.clear()
        # The window the plan gives for this request is queued before the request's own
        # fetch, not after it: other workers fetch it beside that fetch, so a reader that
        # goes on into the window finds it there (or in flight) one backend round trip
        # earlier. Its chunks next to the requested ones in the blob (ALONG_BYTES at most)
        # come in the request's own backend request instead (_along): a package's first
        # module and the sibling the import reads next cost one round trip, not two.
        # The window never holds the requested chunks (it starts after them).
        fetch = mgr.will_fetch(offset, length)
        rest, kind = self._readahead(key, mgr, offset, length, fetch)
        along = self._along(mgr, offset, length, rest) \
            if fetch and rest and kind == "neighbours" else []
        if along:
            taken = {c.index for c in along}
            rest = [c for c in rest if c.index not in taken]
        after = fetch and (WINDOW_AFTER_MISS == 1 or
                           (WINDOW_AFTER_MISS == 2 and kind == "neighbours"))
        if not after:
            self._submit_window(mgr, rest, kind)
        t1 = time.monotonic()
        try:
            fetched = mgr.fill(offset, length, along=along, max_gap=READAHEAD_MAX_GAP)
        finally:
            if after:
                self._submit_window(mgr, rest, kind)
        if debug:
            times = bc.FILL_TIMES.__dict__
            log.debug("fill %s %d+%d: fetched %d in %.2f ms (queued %.2f, plan %.2f, "
                      "backend %.2f, decode %.2f, flight wait %.2f)", key[:12], offset,
                      length, fetched, (time.monotonic() - t0) * 1000,
                      getattr(TASK, "waited", 0.0) * 1000, (t1 - t0) * 1000,
                      times.get("backend", 0.0) * 1000, times.get("decode", 0.0) * 1000,
                      times.get("flight", 0.0) * 1000)

    def _readahead(self, key: str, mgr, offset: int, length: int,
                   fetched: bool) -> tuple[list, str]:
        """The chunks the readahead plan (fscache_daemon.readahead) says the reader will
        need next (to be queued with _submit_window), and the window's kind."""
        ra = self._ra.get(key)
        if ra is None:
            return [], ""
        w = ra.on_request(offset, length, fetched)
        if w is None or not w.chunks:
            return [], ""
        start = min(c.compressed_offset for c in w.chunks)
        end = max(c.compressed_offset + c.compressed_size for c in w.chunks)
        if log.isEnabledFor(logging.DEBUG):
            first = w.chunks[0]
            log.debug("readahead %s %s at %d: %d chunks, %d stored bytes (file run end %d)"
                      " after %d+%d: %s", key[:12], w.kind, first.uncompressed_offset,
                      len(w.chunks), sum(c.compressed_size for c in w.chunks),
                      mgr.run_end(first), offset, length,
                      ",".join(str(c.uncompressed_offset) for c in w.chunks))
        mgr.will_need(start, end - start)
        return w.chunks, w.kind

    def _along(self, mgr, offset: int, length: int, window: list) -> list:
        """The chunks of `window` whose stored bytes lie next to the requested chunks'
        (gaps of at most READAHEAD_MAX_GAP), growing the request's one backend request by
        at most ALONG_BYTES and never past --batch-size."""
        if getattr(mgr.meta, "zran", None) is not None:
            # zran: the chunks beside come out of the inflate anyway when they share the
            # access point (BlobManager._zran_extra); the next access point's would cost
            # inflating its span before the reader's answer (ML cold start: a miss's
            # decode 2.7 -> 6.9 ms, twice the wall time)
            return []
        start, n = clamp_range(offset, length, mgr.size)
        own = [c for c in chunks_in_range(mgr.meta, start, n) if not mgr.cache.has(c)]
        if not own:
            return []
        lo = min(c.compressed_offset for c in own)
        hi = max(c.compressed_offset + c.compressed_size for c in own)
        limit = min(max(self.batch_size, hi - lo), hi - lo + ALONG_BYTES)
        ordered = sorted(window, key=lambda c: c.compressed_offset)
        after = [c for c in ordered if c.compressed_offset >= lo]
        before = [c for c in reversed(ordered) if c.compressed_offset < lo]
        along = []
        for c in after:                     # outward from the request, first after it
            c_end = c.compressed_offset + c.compressed_size
            if c.compressed_offset - hi > READAHEAD_MAX_GAP or max(hi, c_end) - lo > limit:
                break
            along.append(c)
            hi = max(hi, c_end)
        for c in before:
            c_end = c.compressed_offset + c.compressed_size
            if lo - c_end > READAHEAD_MAX_GAP or hi - c.compressed_offset > limit:
                break
            along.append(c)
            lo = c.compressed_offset
        return along

    def _submit_window(self, mgr, chunks, kind: str = "") -> None:
        size = task_bytes(kind, chunks)     # readahead.py: a long stream's are larger
        for task in tasks_of(plan(chunks, self.batch_size, READAHEAD_MAX_GAP), size):
            self.pool.submit_readahead(self._readahead_batch, mgr, task)

    def _readahead_batch(self, mgr, chunks) -> int:
        try:
            # prefetch=False: counted as readahead below, not as prefetch
            n = mgr.fill_chunks(chunks, prefetch=False, max_gap=READAHEAD_MAX_GAP)
        except Exception as e:  # noqa: BLE001 - the reader's own request will retry
            log.debug("readahead of blob %s failed: %s", mgr.blob_id[:12], e)
            return 0
        mgr.stats.add(readahead_bytes=n)
        return n

    def fast_path(self, key: str, offset: int, length: int) -> bool:
        t0 = time.perf_counter()
        mgr = self.blobs.get(key)
        if mgr is None:
            return False
        self.traces.note(key, mgr, offset, length)
        if not mgr.is_cached(offset, length):
            return False
        mgr.stats.record_request(length, True, time.perf_counter() - t0, False)
        self._submit_window(mgr, *self._readahead(key, mgr, offset, length, False))
        return True

    def _trace_unmarker(self) -> None:
        """Complete blobs kept marked (see _blob_complete): unmarked once fully read or
        trace_window seconds after completion, forgotten once released."""
        while not self._stop.wait(TRACE_UNMARK_INTERVAL):
            for key, (mgr, until) in list(self._kept_marked.items()):
                try:
                    if self.blobs.get(key) is not mgr:
                        self._drop_kept(key, mgr)        # released: unmarked then
                    elif time.monotonic() >= until or self.traces.fully_read(mgr):
                        self._drop_kept(key, mgr)
                        self.frontend.blob_complete(mgr)
                except (FrontendError, OSError) as e:
                    log.error("blob %s: unmarking failed: %s", mgr.blob_id[:12], e)

    def _drop_kept(self, key: str, mgr: bc.BlobManager) -> None:
        """Forget mgr's kept-marked entry, not a successor's set since it was read."""
        with self._lock:
            if self._kept_marked.get(key, (None,))[0] is mgr:
                del self._kept_marked[key]

    def _syncer(self) -> None:
        while not self._stop.wait(SYNC_INTERVAL):
            with self._lock:
                mgrs = list(self.blobs.values())
            for m in mgrs:
                try:
                    m.sync()
                except (OSError, ValueError):
                    pass

    # -- introspection --------------------------------------------------------------------
    def describe(self, img: Image) -> dict:
        d = img.to_json()
        if d["options"].get("proxy"):
            # the API's answer (status, status --json) names the proxy without the
            # user name and password its URL may carry (mounts.json keeps the user
            # only: images.persisted_options)
            from erofs_tools.registry.transport import safe_url
            d["options"] = {**d["options"], "proxy": safe_url(str(d["options"]["proxy"]))}
        blobs = []
        for b, key in zip(img.blob_ids, img.blob_keys):
            mgr = self.blobs.get(key)
            if mgr is None:
                continue
            # "variant": the chunk-table digest prefix when served apart (bc.variant_key)
            blobs.append({"blob_id": b, "key": key, "variant": bc.key_variant(key),
                          "cache_file": mgr.cache.path,
                          "cached_chunks": mgr.cache.cached_chunks,
                          "total_chunks": mgr.cache.total_chunks,
                          "complete": mgr.complete()})
        d["blobs"] = blobs
        # where the bytes come from (hosts.toml mirrors first), from the blobs' backend
        mgr = next((self.blobs.get(k) for k in img.blob_keys if k in self.blobs), None)
        d["endpoints"] = list(getattr(mgr.backend, "endpoints", [])) if mgr else []
        return d

    def trace(self, mountpoint: str | None = None, bootstrap: str | None = None) -> dict:
        """The access trace of the image mounted at `mountpoint` or from `bootstrap`."""
        img = find_image(self.all_images(), mountpoint, bootstrap)
        if img is None:
            raise NotFoundError(f"{mountpoint or bootstrap}: no image mounted there by "
                                "this daemon")
        return self.traces.export(img)

    def list(self) -> list[dict]:
        with self._lock:
            imgs = list(self.images.values())
        return [self.describe(i) for i in imgs]

    def metrics(self) -> dict:
        with self._lock:
            mgrs = list(self.blobs.items())
            users = {b: sorted(u) for b, u in self.blob_users.items()}
        blobs = {}
        for b, m in mgrs:
            s = m.stats.snapshot()
            s.update(blob_id=m.blob_id, variant=bc.key_variant(b),
                     cached_chunks=m.cache.cached_chunks, total_chunks=m.cache.total_chunks,
                     uncompressed_size=m.size, compressed_size=m.meta.compressed_size,
                     complete=m.complete(), meta_bytes_fetched=m.meta_bytes_fetched,
                     mounts=users.get(b, []))
            blobs[b] = s
        process = self.sampler.sample()
        totals = {k: sum(v[k] for v in blobs.values()) for k in
                  ("requests", "bytes_fetched", "bytes_served_from_cache", "verify_failures",
                   "requests_failed", "prefetch_bytes", "readahead_bytes")}
        out = {"version": __version__, "frontend": self.frontend.name,
               "uptime_s": round(time.time() - self.started_at, 3),
               "mounts": len(self.images), "detached": len(self.detached),
               "blobs": blobs, "totals": totals,
               "meta_bytes_fetched": self.meta_bytes_fetched,
               "cache": self.cache_status(),
               "frontend_stats": self.frontend.stats(), "pool": self.pool.stats(),
               "process": process}
        for name, source in list(self.metric_sources.items()):
            out[name] = source()
        return out
