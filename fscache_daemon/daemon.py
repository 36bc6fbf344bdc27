"""The daemon core: images, shared blobs, the worker pool, prefetch, and the front end.

Threads:
  - the front end's poller (fanotify: PreContentWatcher's loop; cachefiles: its poller)
    reads kernel requests and answers ranges already cached at once (fast path);
  - a worker pool (`--threads`) runs everything else from one priority queue: on-demand
    fills first, prefetch batches only when no on-demand work is queued, and at most
    `prefetch_workers` of them at a time, so prefetch never holds every worker;
  - one prefetcher thread plans prefetch batches and paces them with a token bucket
    (`prefetch_rate` bytes/s);
  - a syncer thread flushes chunk-state records once a second;
  - the API server thread (api.py).

Images and blobs: an image is a mounted bootstrap; its data blobs are BlobManagers keyed
by blob id, shared by every image that names the same blob (one cache file per blob, in
the cache directory, whatever image brought it). `mounts.json` in the cache directory
records the mounts so that a restarted daemon picks them up (the kernel mounts survive a
daemon restart; see docs/daemon.md).

Front ends implement the small interface of `Frontend` below; the daemon never touches
fanotify or /dev/cachefiles itself.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import Executor, Future

import psutil

from fscache_daemon import __version__, mounts
from fscache_daemon.errors import DaemonError, FrontendError
from fscache_daemon.readahead import BlobReadahead
from fscache_daemon.storage import StorageError
from fscache_daemon.storage import blobcache as bc
from fscache_daemon.storage.backends import open_backend, parse_backend_spec
from fscache_daemon.storage.image import file_runs, load_image
from fscache_daemon.storage.planner import DEFAULT_BATCH_SIZE, plan

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "/var/lib/fscache-daemon"
DEFAULT_API_SOCK = "/run/fscache-daemon/api.sock"
DEFAULT_PREFETCH_RATE = 64 << 20          # bytes/s
DEFAULT_READAHEAD = 16 << 20              # largest readahead window (bytes)
INITIAL_READAHEAD = 2 << 20               # a sequential reader's first window
# How often the cache files are fdatasync'ed and their chunks recorded as durable. Only a
# power loss needs this (within one boot the live bitmap is trusted), and the kernel
# writes dirty data back after ~30 s by itself: syncing every second instead made a
# cold read's cache writes compete with its backend reads for the disk (1 GiB image:
# ~2 s of iowait).
SYNC_INTERVAL = 30.0
# A readahead window is split into tasks of about this many stored bytes (each still
# fetched in backend requests of at most --batch-size): enough tasks for every worker,
# few enough that per-task overhead stays small (4 MiB: cold reads ~10 % faster than
# one task per 1 MiB request on the benchmark image)
READAHEAD_TASK_BYTES = 4 << 20
PRIO_ONDEMAND = 0
PRIO_READAHEAD = 5                        # after the reader's own requests, before prefetch
PRIO_PREFETCH = 10


class MountError(DaemonError):
    """mount(2)/umount(2) or the image setup around them failed."""


class NotFoundError(DaemonError):
    """No such mount or blob."""


class ConflictError(DaemonError):
    """The request conflicts with the daemon's state (already mounted, busy)."""


# --------------------------------------------------------------------------- syscalls
def sys_mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    try:
        mounts.mount(source, target, fstype, flags, data)
    except OSError as e:
        raise MountError(f"mount {source} on {target} ({fstype}, {data}): "
                         f"{e.strerror}") from None


def sys_umount(target: str, lazy: bool = False) -> None:
    try:
        mounts.umount(target, lazy)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise ConflictError(f"umount {target}: target is busy") from None
        raise MountError(f"umount {target}: {e.strerror}") from None


# --------------------------------------------------------------------------- worker pool
class PriorityPool(Executor):
    """A fixed pool of threads serving one priority queue (lower value first).

    `submit()` (the Executor API the front ends use) queues on-demand work;
    `submit_readahead()` work a reader will need soon (after on-demand work, any number
    of threads); `submit_prefetch()` background work that waits behind both and never
    occupies more than `prefetch_workers` threads at once.
    """

    def __init__(self, threads: int, prefetch_workers: int = 1):
        self.threads = max(1, threads)
        self.prefetch_workers = max(1, min(prefetch_workers, self.threads))
        self._q: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._prefetch_slots = threading.Semaphore(self.prefetch_workers)
        self._shutdown = False
        self.active_ondemand = 0
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._run, name=f"worker-{i}", daemon=True)
                         for i in range(self.threads)]
        for t in self._workers:
            t.start()

    def _put(self, prio, fn, args, kwargs) -> Future:
        if self._shutdown:
            raise RuntimeError("pool is shut down")
        fut = Future()
        self._q.put((prio, next(self._seq), fut, fn, args, kwargs))
        return fut

    def submit(self, fn, /, *args, **kwargs) -> Future:
        return self._put(PRIO_ONDEMAND, fn, args, kwargs)

    def submit_readahead(self, fn, /, *args, **kwargs) -> Future:
        return self._put(PRIO_READAHEAD, fn, args, kwargs)

    def submit_prefetch(self, fn, /, *args, **kwargs) -> Future:
        self._prefetch_slots.acquire()
        try:
            fut = self._put(PRIO_PREFETCH, fn, args, kwargs)
        except BaseException:
            self._prefetch_slots.release()
            raise
        fut.add_done_callback(lambda _f: self._prefetch_slots.release())
        return fut

    def try_submit_prefetch(self, fn, /, *args, **kwargs) -> Future | None:
        """submit_prefetch() if a prefetch slot is free now, else None (never blocks)."""
        if not self._prefetch_slots.acquire(blocking=False):
            return None
        try:
            fut = self._put(PRIO_PREFETCH, fn, args, kwargs)
        except BaseException:
            self._prefetch_slots.release()
            raise
        fut.add_done_callback(lambda _f: self._prefetch_slots.release())
        return fut

    def ondemand_pending(self) -> int:
        """On-demand and readahead tasks running (the prefetcher backs off while > 0)."""
        with self._lock:
            return self.active_ondemand

    def _run(self) -> None:
        while True:
            prio, _, fut, fn, args, kwargs = self._q.get()
            if fn is None:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            ondemand = prio < PRIO_PREFETCH
            if ondemand:
                with self._lock:
                    self.active_ondemand += 1
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - delivered to the submitter
                fut.set_exception(e)
            finally:
                if ondemand:
                    with self._lock:
                        self.active_ondemand -= 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True
        for _ in self._workers:
            self._q.put((1 << 30, next(self._seq), None, None, None, None))
        if wait:
            for t in self._workers:
                t.join(timeout=30)


class TokenBucket:
    """Paces prefetch to `rate` bytes/s (0 = unlimited) with a one-second burst."""

    def __init__(self, rate: int):
        self.rate = rate
        self._tokens = float(rate)
        self._t = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int, stop: threading.Event) -> None:
        if self.rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.rate, self._tokens + (now - self._t) * self.rate)
            self._t = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            stop.wait(wait)


# --------------------------------------------------------------------------- front ends
class Frontend:
    """What the daemon needs from a kernel front end.

    start(daemon)          begin serving; call daemon.fill(blob_id, off, len) (blocking,
                           raises on failure -> EIO for that reader) and may use
                           daemon.fast_path(blob_id, off, len) -> bool and daemon.pool
    prepare_blob(mgr)      before mounting an image that uses the blob (fanotify: mark the
                           cache file and hand the manager a writer fd)
    blob_complete(mgr)     every chunk of the blob is cached (fanotify: remove the mark)
    withhold(mgr, chunk)   readahead marker: let the first access to this chunk reach
    publish(mgr, chunk)    the daemon even once cached (fanotify with the fd holder: keep
                           its filled bits back); publish() ends that
    release_blob(mgr)      no mounted image uses the blob any more
    mount(image)           mount image.bootstrap on image.mountpoint with its blobs
    umount(image, lazy)    unmount it
    stop()                 stop serving; mounts stay (readers of uncached ranges wait for
                           the next daemon)
    """

    name = "none"

    def start(self, daemon: "Daemon") -> None:
        pass

    def prepare_blob(self, mgr) -> None:
        pass

    def blob_complete(self, mgr) -> None:
        pass

    def withhold(self, mgr, chunk) -> None:
        pass

    def publish(self, mgr, chunk) -> None:
        pass

    def release_blob(self, mgr) -> None:
        pass

    def mount(self, image: "Image") -> None:
        pass

    def umount(self, image: "Image", lazy: bool = False) -> None:
        pass

    def stats(self) -> dict:
        return {}

    def stop(self) -> None:
        pass


class NullFrontend(Frontend):
    """No kernel: images are registered but nothing is mounted (tests, dry runs)."""

    name = "none"


# Every read EROFS makes of a marked cache file raises a pre-content event that the reader
# waits on, and EROFS reads in readahead windows (128 KiB by default): a larger window
# for our mounts means fewer, larger events (1 MiB: 2.4x fewer on the benchmark image).
# Once every blob of the image is complete (no more events) the default is put back: it
# reads a complete cache file faster (best warm runs 0.49 s vs 0.57 s per GiB).
MOUNT_READAHEAD_KB = 1024


def holder_running(sock: str) -> bool:
    import socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.settimeout(2)
        s.connect(sock)
        return True
    except OSError:
        return False
    finally:
        s.close()


def spawn_holder(sock: str, log_path: str, timeout: float = 10.0) -> int:
    """Start the fanotify fd holder in its own session (it must outlive us)."""
    os.makedirs(os.path.dirname(sock), exist_ok=True)
    logf = open(log_path, "ab")
    try:
        p = subprocess.Popen([sys.executable, "-m", "fscache_daemon.frontend.fdholder",
                              "--sock", sock], stdin=subprocess.DEVNULL, stdout=logf,
                             stderr=logf, start_new_session=True, close_fds=True)
    finally:
        logf.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if holder_running(sock):
            log.info("fanotify fd holder started: pid %d, %s", p.pid, sock)
            return p.pid
        if p.poll() is not None:
            raise FrontendError(f"fanotify fd holder exited with status {p.returncode}; "
                                f"see {log_path}")
        time.sleep(0.05)
    raise FrontendError(f"fanotify fd holder did not answer on {sock} within {timeout}s")


class FanotifyFrontend(Frontend):
    """File-backed EROFS mounts whose blob devices are cache files marked for
    FAN_PRE_ACCESS (fanotify.py). The group lives in the fd holder process unless
    `holder=False` (then a daemon exit fails open, so it unmounts everything first).
    With the holder, each marked blob's FilledMap is shared with it so it allows events
    on filled ranges itself (`filled_map=False`: every event comes to us, for comparison)."""

    name = "fanotify"

    def __init__(self, cache_dir: str, holder_sock: str | None = None, holder: bool = True,
                 filled_map: bool = True):
        self.cache_dir = cache_dir
        self.holder = holder
        self.filled_map = filled_map
        self.holder_sock = holder_sock or os.path.join(cache_dir, "fdholder.sock")
        self.watcher = None
        self._marked: set[str] = set()
        # blob id -> (FilledMap shared with the fd holder, its store listener)
        self._filled: dict[str, tuple] = {}
        # blob id -> indexes of readahead markers whose filled bits are kept back
        self._withheld: dict[str, set[int]] = {}
        self._lock = threading.Lock()

    def start(self, daemon: "Daemon") -> None:
        from fscache_daemon.frontend import fanotify_abi as abi
        abi.raise_nofile_limit()
        self._daemon = daemon
        self._stopping = False
        if self.holder and not holder_running(self.holder_sock):
            spawn_holder(self.holder_sock, os.path.join(self.cache_dir, "fdholder.log"))
        self.watcher = self._new_watcher()

    def _new_watcher(self):
        from fscache_daemon.frontend.fanotify import PreContentWatcher
        d = self._daemon
        if self.holder:
            return PreContentWatcher.from_holder(self.holder_sock, d.fill, executor=d.pool,
                                                 fast_path=d.fast_path)
        return PreContentWatcher(d.fill, executor=d.pool, fast_path=d.fast_path)

    def run_loop(self) -> None:
        """Start the event loop: after every known blob was prepared (marks are the keys
        the loop maps events with; a restarted daemon gets the holder's pending events
        as soon as it subscribes). A supervisor re-subscribes if the holder drops us."""
        self.watcher.start()
        if self.holder:
            t = threading.Thread(target=self._supervise, name="fanotify-supervisor",
                                 daemon=True)
            t.start()

    def _supervise(self) -> None:
        while not self._stopping:
            time.sleep(0.05)
            w = self.watcher
            if self._stopping or w is None or w.running:
                continue
            log.warning("fanotify: event loop ended; re-subscribing to the fd holder")
            try:
                if not holder_running(self.holder_sock):
                    log.critical("fanotify: fd holder is gone; mounts fail open")
                    return
                nw = self._new_watcher()
                with self._lock:
                    ids = set(self._marked)
                    for b in ids:
                        mgr = self._daemon.blobs.get(b)
                        if mgr is not None:
                            fm = self._filled.get(b)
                            mgr.cache.use_write_fd(nw.mark(mgr.cache.path, b,
                                                           filled=fm and fm[0]))
                    self.watcher = nw
                nw.start()
            except (FrontendError, OSError) as e:
                log.error("fanotify: re-subscribe failed: %s", e)
                time.sleep(1)
                continue
            # in-flight fills may still write through the old writer fds: close later
            threading.Timer(60.0, self._close_quietly, args=(w,)).start()

    @staticmethod
    def _close_quietly(w) -> None:
        try:
            w.close()
        except (FrontendError, OSError):
            pass

    def _new_filled(self, mgr):
        """The blob's FilledMap for the fd holder: listener first, then the chunks
        already cached, so a chunk stored meanwhile is set by one or the other."""
        from fscache_daemon.frontend.fanotify import FilledMap
        fm = FilledMap.for_file(mgr.cache.fileno())

        withheld = self._withheld.setdefault(mgr.blob_id, set())

        def stored(chunks):
            for c in chunks:
                if c.index not in withheld:
                    fm.set_range(c.uncompressed_offset, c.uncompressed_size)

        mgr.cache.add_store_listener(stored)
        for c in mgr.meta.chunks:
            if mgr.cache.has(c) and c.index not in withheld:
                fm.set_range(c.uncompressed_offset, c.uncompressed_size)
        return fm, stored

    def withhold(self, mgr, chunk) -> None:
        self._withheld.setdefault(mgr.blob_id, set()).add(chunk.index)

    def publish(self, mgr, chunk) -> None:
        withheld = self._withheld.get(mgr.blob_id)
        if withheld is None:
            return
        withheld.discard(chunk.index)
        item = self._filled.get(mgr.blob_id)
        if item is not None and mgr.cache.has(chunk):
            item[0].set_range(chunk.uncompressed_offset, chunk.uncompressed_size)

    def _drop_filled(self, mgr) -> None:
        item = self._filled.pop(mgr.blob_id, None)
        self._withheld.pop(mgr.blob_id, None)
        if item is not None:
            mgr.cache.remove_store_listener(item[1])
            item[0].close()

    def prepare_blob(self, mgr) -> None:
        with self._lock:
            if mgr.blob_id in self._marked:
                return
            fm = None
            if self.holder and self.filled_map:
                self._drop_filled(mgr)
                self._filled[mgr.blob_id] = item = self._new_filled(mgr)
                fm = item[0]
            try:
                wfd = self.watcher.mark(mgr.cache.path, mgr.blob_id, filled=fm)
            except BaseException:
                self._drop_filled(mgr)
                raise
            self._marked.add(mgr.blob_id)
        mgr.cache.use_write_fd(wfd)
        if mgr.complete():
            self.blob_complete(mgr)

    def blob_complete(self, mgr) -> None:
        if self._unmark(mgr):
            log.info("blob %s complete: cache file unmarked, reads stay in the kernel",
                     mgr.blob_id[:12])
        d = self._daemon
        for img in list(d.images.values()):
            if img.readahead_restore and mgr.blob_id in img.blob_ids and \
                    all(b in d.blobs and d.blobs[b].complete() for b in img.blob_ids):
                # no more events: the kernel's default window reads faster from the cache
                mounts.set_readahead(*img.readahead_restore)
                img.readahead_restore = None

    def release_blob(self, mgr) -> None:
        if self._unmark(mgr):
            log.info("blob %s no longer mounted: cache file unmarked", mgr.blob_id[:12])

    def _unmark(self, mgr) -> bool:
        with self._lock:
            if mgr.blob_id not in self._marked:
                return False
            self._marked.discard(mgr.blob_id)
            mgr.cache.use_write_fd(None)
            # Remove the kernel mark through the channel but keep the watcher's mapping
            # of this cache file: events queued before the mark went away still arrive
            # and must map to the blob (then the fast path allows them); watcher.unmark()
            # would forget the inode and deny them with EIO.
            self.watcher.channel.unmark(mgr.cache.path)
            self._drop_filled(mgr)
        return True

    def mount(self, image: "Image") -> None:
        devs = [self._daemon.blobs[b].cache.path for b in image.blob_ids]
        for d in devs:
            if "," in d:
                raise MountError(f"{d}: cache file paths must not contain ','")
        before = mounts.erofs_instances()
        flags = mounts.MS_RDONLY | mounts.MS_NODEV | mounts.MS_NOSUID
        sys_mount(image.bootstrap, image.mountpoint, "erofs", flags,
                  ",".join(f"device={d}" for d in devs))
        new = mounts.erofs_instances() - before
        blobs = [self._daemon.blobs[b] for b in image.blob_ids]
        if all(m.complete() for m in blobs):
            return
        if len(new) == 1:   # else another erofs mount raced with ours: leave it alone
            inst = new.pop()
            default = mounts.get_readahead(inst)
            if default is not None:
                image.readahead_restore = (inst, default)
                mounts.set_readahead(inst, MOUNT_READAHEAD_KB)
                if all(m.complete() for m in blobs):   # completed meanwhile
                    mounts.set_readahead(inst, default)
                    image.readahead_restore = None

    def umount(self, image: "Image", lazy: bool = False) -> None:
        sys_umount(image.mountpoint, lazy)

    def stats(self) -> dict:
        if self.watcher is None:
            return {}
        out = dict(self.watcher.stats)
        if self.holder:
            try:  # events the holder allowed itself (filled ranges) never reach us
                hs = self.watcher.channel.status().get("stats", {})
                out["holder_events"] = hs.get("events", 0)
                out["holder_allowed_filled"] = hs.get("allowed_filled", 0)
            except (FrontendError, OSError) as e:
                log.debug("fd holder status failed: %s", e)
        return out

    def stop(self) -> None:
        self._stopping = True
        if self.watcher is None:
            return
        holder_pid = None
        if self.holder and not self._daemon.images:
            # nothing mounted: let the holder go too (it exits only without marks)
            try:
                ch = self.watcher._channel
                if not ch.status().get("marks"):
                    holder_pid = ch.holder_pid
            except (FrontendError, OSError, AttributeError):
                holder_pid = None
        self.watcher.close()  # the holder drops the filled maps this daemon sent
        self.watcher = None
        with self._lock:
            for fm, _ in self._filled.values():
                fm.close()  # a later store finds it closed: set_range does nothing
            self._filled.clear()
        if holder_pid:
            try:
                os.kill(holder_pid, 15)
                log.info("fd holder (pid %d) stopped: no mounts, no marks", holder_pid)
            except OSError:
                pass


class CachefilesAdapter(Frontend):
    """EROFS over fscache: the cachefiles front end asks for the bootstrap (cookie = fsid)
    and blobs (cookie = blob id) through a resolver."""

    name = "cachefiles"

    def __init__(self, cache_dir: str, threads: int, holder_sock: str | None = None):
        self.cache_dir = cache_dir
        self.threads = threads
        self.holder_sock = holder_sock or os.path.join(cache_dir, "cachefiles-holder.sock")
        self.fe = None

    def start(self, daemon: "Daemon") -> None:
        from fscache_daemon.frontend import cachefiles as cf
        self._cf = cf
        self._daemon = daemon
        self.fe = cf.CachefilesFrontend(self._resolve, os.path.join(self.cache_dir, "fscache"),
                                        threads=self.threads, holder_sock=self.holder_sock)
        self.fe.start()

    def _resolve(self, volume: str, cookie: str):
        d = self._daemon
        for img in list(d.images.values()):
            if cookie == img.fsid:
                return self._cf.FileSource(img.bootstrap)
        mgr = d.blobs.get(cookie)
        if mgr is None:
            return None

        def read(off, length):
            d.fill(cookie, off, length)
            return os.pread(mgr.cache._own_fd, length, off)

        return self._cf.CallbackSource(mgr.size, read)

    def mount(self, image: "Image") -> None:
        self._cf.mount_fscache(image.fsid, image.mountpoint, image.domain)

    def umount(self, image: "Image", lazy: bool = False) -> None:
        self._cf.umount(image.mountpoint, lazy)

    def stats(self) -> dict:
        return self.fe.stats.as_dict() if self.fe else {}

    def stop(self) -> None:
        if self.fe is not None:
            self.fe.stop()


def fanotify_available() -> str | None:
    """None if pre-content fanotify works here, else why not."""
    try:
        from fscache_daemon.frontend import fanotify_abi as abi
        fd = abi.fanotify_init(abi.FAN_CLASS_PRE_CONTENT | abi.FAN_CLOEXEC,
                               os.O_RDWR | os.O_LARGEFILE)
    except (FrontendError, OSError) as e:
        return str(e)
    os.close(fd)
    return None


def make_frontend(kind: str, cache_dir: str, threads: int) -> Frontend:
    if kind == "auto":
        why = fanotify_available()
        if why is None:
            kind = "fanotify"
        else:
            from fscache_daemon.frontend import cachefiles as cf
            if cf.unavailable_reason() is None:
                kind = "cachefiles"
            else:
                raise FrontendError(f"no usable front end: fanotify: {why}; cachefiles: "
                                    f"{cf.unavailable_reason()}")
    if kind == "fanotify":
        return FanotifyFrontend(cache_dir)
    if kind == "fanotify-local":
        return FanotifyFrontend(cache_dir, holder=False)
    if kind == "cachefiles":
        return CachefilesAdapter(cache_dir, threads)
    if kind == "none":
        return NullFrontend()
    raise DaemonError(f"unknown front end {kind!r}")


# --------------------------------------------------------------------------- images
class Image:
    def __init__(self, mountpoint, bootstrap, source_bootstrap, backend_spec, blob_ids,
                 prefetch, domain, options, prefetch_ranges=(), mounted_at=None):
        self.mountpoint = mountpoint
        self.bootstrap = bootstrap              # the daemon's copy, in the cache dir
        self.source_bootstrap = source_bootstrap
        self.backend_spec = backend_spec
        self.blob_ids = list(blob_ids)
        self.prefetch = prefetch
        self.domain = domain
        self.options = dict(options or {})
        self.prefetch_ranges = list(prefetch_ranges)
        self.mounted_at = mounted_at or time.time()
        self.fsid = os.path.basename(bootstrap).split(".")[0]
        # (EROFS instance, its default read_ahead_kb) while a larger window is set
        self.readahead_restore = None

    def to_json(self) -> dict:
        return {"mountpoint": self.mountpoint, "bootstrap": self.bootstrap,
                "source_bootstrap": self.source_bootstrap, "backend": self.backend_spec,
                "blobs": self.blob_ids, "prefetch": self.prefetch, "domain": self.domain,
                "options": self.options, "mounted_at": self.mounted_at}


class Daemon:
    def __init__(self, cache_dir: str = DEFAULT_CACHE_DIR, *, frontend: str | Frontend = "auto",
                 threads: int = 8, batch_size: int = DEFAULT_BATCH_SIZE,
                 prefetch_rate: int = DEFAULT_PREFETCH_RATE, durable: bool = True,
                 readahead: int = DEFAULT_READAHEAD, fetch_deadline: float | None = None):
        self.cache_dir = os.path.abspath(cache_dir)
        self.fetch_deadline = fetch_deadline  # registry retrying per fetch (None: default)
        self.blob_dir = os.path.join(self.cache_dir, "blobs")
        self.boot_dir = os.path.join(self.cache_dir, "bootstraps")
        for d in (self.cache_dir, self.blob_dir, self.boot_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self.threads = threads
        self.batch_size = batch_size
        self.durable = durable
        self.readahead = readahead
        self.frontend = frontend if isinstance(frontend, Frontend) else \
            make_frontend(frontend, self.cache_dir, threads)
        self.pool = PriorityPool(threads, prefetch_workers=max(1, threads // 4))
        self.bucket = TokenBucket(prefetch_rate)
        self.images: dict[str, Image] = {}
        self.blobs: dict[str, bc.BlobManager] = {}
        self._ra: dict[str, BlobReadahead] = {}
        self.blob_users: dict[str, set[str]] = {}
        self.backends: dict[tuple, object] = {}
        self._lock = threading.RLock()        # images/blobs/backends
        self._mount_lock = threading.Lock()   # one mount/umount at a time
        self._stop = threading.Event()
        self._prefetch_q: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self.started_at = time.time()
        self.proc = psutil.Process()
        self.proc.cpu_percent(None)
        self.meta_bytes_fetched = 0
        self.prefetch_bytes = 0

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self.frontend.start(self)
        self._restore()
        run_loop = getattr(self.frontend, "run_loop", None)
        if run_loop:
            run_loop()
        for name, target in (("prefetcher", self._prefetcher), ("syncer", self._syncer)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("daemon %s up: front end %s, cache %s, %d workers", __version__,
                 self.frontend.name, self.cache_dir, self.pool.threads)

    def shutdown(self) -> None:
        """Stop serving. Mounts stay in the kernel (recorded in mounts.json); with the
        fanotify holder their readers of uncached ranges wait for the next daemon."""
        if self._stop.is_set():
            return
        log.info("daemon shutting down (%d mounts stay)", len(self.images))
        self._stop.set()
        self._prefetch_q.put(None)
        self.frontend.stop()
        self.pool.shutdown(wait=True)
        for t in self._threads:
            t.join(timeout=10)
        with self._lock:
            for mgr in self.blobs.values():
                try:
                    mgr.sync()
                    mgr.close()
                except OSError as e:
                    log.warning("blob %s: close failed: %s", mgr.blob_id[:12], e)
            for be in self.backends.values():
                be.close()
        log.info("daemon stopped")

    # -- state file ---------------------------------------------------------------------
    @property
    def state_path(self) -> str:
        return os.path.join(self.cache_dir, "mounts.json")

    def _save_state(self) -> None:
        with self._lock:
            data = {"version": 1, "frontend": self.frontend.name,
                    "mounts": [img.to_json() for img in self.images.values()]}
        bc._write_atomic(self.state_path, json.dumps(data, indent=1).encode())

    def _restore(self) -> None:
        try:
            with open(self.state_path) as f:
                state = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.error("%s: unreadable (%s); starting without mounts", self.state_path, e)
            return
        saved = state.get("frontend")
        if saved and saved != self.frontend.name and state.get("mounts"):
            # another front end cannot serve them: their readers would wait forever
            raise DaemonError(f"{self.state_path}: {len(state['mounts'])} mount(s) made with "
                              f"front end {saved}, this daemon runs {self.frontend.name}; "
                              f"restart with --frontend {saved} or unmount them first")
        live = mounts.mounted_erofs() if self.frontend.name != "none" else None
        for m in state.get("mounts", []):
            mp = m.get("mountpoint")
            if live is not None and mp not in live:
                log.info("%s is no longer mounted; forgetting it", mp)
                continue
            try:
                self._register(m["bootstrap"], mp, m["backend"], m.get("prefetch", False),
                               m.get("domain"), m.get("options"), m.get("source_bootstrap"),
                               restoring=True, mounted_at=m.get("mounted_at"))
                log.info("picked up mount %s", mp)
            except (DaemonError, KeyError, OSError) as e:
                log.error("cannot pick up mount %s: %s", mp, e)
        self._save_state()

    # -- blobs --------------------------------------------------------------------------
    def _backend(self, spec: str, options: dict):
        key = (spec, options.get("proxy"), options.get("mirror"), options.get("insecure"))
        with self._lock:
            be = self.backends.get(key)
            if be is None:
                kw = {k: options[k] for k in ("proxy", "mirror", "insecure") if
                      options.get(k) is not None}
                if self.fetch_deadline is not None:
                    kw["deadline"] = self.fetch_deadline
                be = open_backend(spec, **kw)
                self.backends[key] = be
            return be

    def _open_blob(self, ref, backend) -> bc.BlobManager:
        with self._lock:
            mgr = self.blobs.get(ref.blob_id)
            if mgr is not None:
                return mgr
        backend.register_blob(ref.blob_id, ref.compressed_size)
        meta, fetched = bc.load_or_fetch_meta(self.blob_dir, ref.blob_id, backend,
                                              entry=ref.entry, blob_size=ref.compressed_size,
                                              digests=ref.digests)
        if meta.uncompressed_size != ref.uncompressed_size:
            raise StorageError(f"blob {ref.blob_id[:12]}: chunk map says "
                               f"{meta.uncompressed_size} bytes, bootstrap "
                               f"{ref.uncompressed_size}")
        cache = bc.BlobCache(self.blob_dir, meta, durable=self.durable)
        mgr = bc.BlobManager(meta, cache, backend, batch_size=self.batch_size,
                             on_complete=self._blob_complete)
        mgr.meta_bytes_fetched = fetched
        with self._lock:
            other = self.blobs.get(ref.blob_id)
            if other is not None:        # lost a race with another mount
                mgr.close()
                return other
            self.blobs[ref.blob_id] = mgr
            self._ra[ref.blob_id] = BlobReadahead(
                mgr, min(INITIAL_READAHEAD, self.readahead), self.readahead,
                withhold=lambda c, m=mgr: self.frontend.withhold(m, c),
                publish=lambda c, m=mgr: self.frontend.publish(m, c))
            self.meta_bytes_fetched += fetched
        return mgr

    def _blob_complete(self, mgr) -> None:
        try:
            self.frontend.blob_complete(mgr)
        except (FrontendError, OSError) as e:
            log.error("blob %s: front end completion failed: %s", mgr.blob_id[:12], e)

    # -- front end callbacks --------------------------------------------------------------
    def fill(self, blob_id: str, offset: int, length: int) -> None:
        mgr = self.blobs.get(blob_id)
        if mgr is None:
            raise NotFoundError(f"no blob {blob_id!r} is open")
        fetched = mgr.fill(offset, length)
        self._readahead(blob_id, mgr, offset, length, fetched > 0)

    def _readahead(self, blob_id: str, mgr, offset: int, length: int, fetched: bool) -> None:
        """Queue what the readahead plan (fscache_daemon.readahead) says the reader will
        need next, in tasks of about READAHEAD_TASK_BYTES so that workers fetch and
        decode in parallel."""
        ra = self._ra.get(blob_id)
        if ra is None:
            return
        w = ra.on_request(offset, length, fetched)
        if w is None or not w.chunks:
            return
        start = min(c.compressed_offset for c in w.chunks)
        end = max(c.compressed_offset + c.compressed_size for c in w.chunks)
        mgr.backend.will_need(blob_id, start, end - start)
        task, size = [], 0
        for batch in plan(w.chunks, self.batch_size):
            task += batch.chunks
            size += batch.length
            if size >= READAHEAD_TASK_BYTES:
                self.pool.submit_readahead(self._readahead_batch, mgr, task)
                task, size = [], 0
        if task:
            self.pool.submit_readahead(self._readahead_batch, mgr, task)

    def _readahead_batch(self, mgr, chunks) -> int:
        try:
            n = mgr.fill_chunks(chunks, prefetch=True)
        except Exception as e:  # noqa: BLE001 - the reader's own request will retry
            log.debug("readahead of blob %s failed: %s", mgr.blob_id[:12], e)
            return 0
        mgr.stats.add(readahead_bytes=n)
        return n

    def fast_path(self, blob_id: str, offset: int, length: int) -> bool:
        t0 = time.perf_counter()
        mgr = self.blobs.get(blob_id)
        if mgr is None or not mgr.is_cached(offset, length):
            return False
        mgr.stats.record_request(length, True, time.perf_counter() - t0, False)
        self._readahead(blob_id, mgr, offset, length, False)
        return True

    # -- mount / umount -----------------------------------------------------------------
    def _copy_bootstrap(self, path: str) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        dst = os.path.join(self.boot_dir, h.hexdigest()[:32] + ".boot")
        if not os.path.exists(dst):
            tmp = dst + f".tmp.{os.getpid()}"
            shutil.copyfile(path, tmp)
            os.chmod(tmp, 0o600)
            os.replace(tmp, dst)
        return dst

    def _drop_unused_bootstrap(self, boot_copy: str) -> None:
        """Remove our copy of a bootstrap no mounted image uses (a failed mount must
        leave nothing behind in the cache directory)."""
        with self._lock:
            if any(i.bootstrap == boot_copy for i in self.images.values()):
                return
        try:
            os.unlink(boot_copy)
        except OSError:
            pass

    def mount(self, bootstrap: str, mountpoint: str, backend: str, *, prefetch: bool = False,
              domain: str | None = None, options: dict | None = None) -> dict:
        if not isinstance(bootstrap, str) or not isinstance(mountpoint, str) or \
                not isinstance(backend, str):
            raise DaemonError("mount needs string bootstrap, mountpoint and backend")
        parse_backend_spec(backend)
        mountpoint = os.path.abspath(mountpoint)
        bootstrap = os.path.abspath(bootstrap)
        if not os.path.isfile(bootstrap):
            raise NotFoundError(f"{bootstrap}: no such bootstrap file")
        if self.frontend.name != "none" and not os.path.isdir(mountpoint):
            raise NotFoundError(f"{mountpoint}: mount point is not a directory")
        with self._mount_lock:
            if mountpoint in self.images:
                raise ConflictError(f"{mountpoint}: already mounted by this daemon")
            load_image(bootstrap)   # a bad bootstrap is named as the user gave it
            boot_copy = self._copy_bootstrap(bootstrap)
            try:
                img = self._register(boot_copy, mountpoint, backend, prefetch, domain,
                                     options, bootstrap)
                try:
                    self.frontend.mount(img)
                except BaseException:
                    self._unregister(img)
                    raise
            except BaseException:
                self._drop_unused_bootstrap(boot_copy)
                raise
            self._save_state()
        log.info("mounted %s on %s (%d blobs, backend %s)", bootstrap, mountpoint,
                 len(img.blob_ids), backend)
        return self.describe(img)

    def _register(self, boot_copy, mountpoint, backend_spec, prefetch, domain, options,
                  source_bootstrap, restoring=False, mounted_at=None) -> Image:
        options = dict(options or {})
        info = load_image(boot_copy)
        be = self._backend(backend_spec, options)
        mgrs = []
        for ref in info.blobs:
            mgrs.append(self._open_blob(ref, be))
        img = Image(mountpoint, boot_copy, source_bootstrap, backend_spec,
                    [r.blob_id for r in info.blobs], bool(prefetch), domain, options,
                    info.prefetch, mounted_at)
        with self._lock:
            self.images[mountpoint] = img
            for m in mgrs:
                self.blob_users.setdefault(m.blob_id, set()).add(mountpoint)
        try:
            for m in mgrs:
                self.frontend.prepare_blob(m)
        except BaseException:
            self._unregister(img)
            raise
        self._queue_prefetch(img)
        if self.readahead:
            threading.Thread(target=self._learn_runs, args=(img, mgrs), daemon=True,
                             name="file-runs").start()
        return img

    def _learn_runs(self, img: Image, mgrs) -> None:
        try:
            runs = file_runs(img.bootstrap)
        except Exception as e:  # noqa: BLE001 - readahead is an optimisation
            log.warning("%s: no file-aware readahead: %s", img.mountpoint, e)
            return
        for i, m in enumerate(mgrs):
            if runs.get(i):
                m.add_file_runs(runs[i])
        log.debug("%s: file runs known for readahead", img.mountpoint)

    def _unregister(self, img: Image) -> None:
        released = []
        with self._lock:
            self.images.pop(img.mountpoint, None)
            for b in img.blob_ids:
                users = self.blob_users.get(b)
                if users is None:
                    continue
                users.discard(img.mountpoint)
                if not users:
                    del self.blob_users[b]
                    mgr = self.blobs.pop(b, None)
                    ra = self._ra.pop(b, None)
                    if ra is not None:
                        ra.reset()
                    if mgr is not None:
                        released.append(mgr)
        for mgr in released:
            try:
                self.frontend.release_blob(mgr)
            except (FrontendError, OSError) as e:
                log.warning("blob %s: release failed: %s", mgr.blob_id[:12], e)
            mgr.sync()
            mgr.close()

    def umount(self, mountpoint: str, lazy: bool = False) -> dict:
        mountpoint = os.path.abspath(mountpoint)
        with self._mount_lock:
            img = self.images.get(mountpoint)
            if img is None:
                raise NotFoundError(f"{mountpoint}: not mounted by this daemon")
            self.frontend.umount(img, lazy)
            self._unregister(img)
            self._save_state()
        log.info("unmounted %s", mountpoint)
        return {"mountpoint": mountpoint, "unmounted": True}

    # -- prefetch -----------------------------------------------------------------------
    def _queue_prefetch(self, img: Image) -> None:
        jobs = []
        for bindex, off, length in img.prefetch_ranges:
            if 0 <= bindex < len(img.blob_ids):
                jobs.append((img.blob_ids[bindex], off, length))
        if img.prefetch:
            for b in img.blob_ids:
                jobs.append((b, 0, None))
        if jobs:
            self._prefetch_q.put((img.mountpoint, jobs))

    def _prefetcher(self) -> None:
        while not self._stop.is_set():
            item = self._prefetch_q.get()
            if item is None:
                return
            mountpoint, jobs = item
            for blob_id, off, length in jobs:
                if self._stop.is_set() or mountpoint not in self.images:
                    break
                mgr = self.blobs.get(blob_id)
                if mgr is None:
                    continue
                try:
                    self._prefetch_range(mgr, off, length)
                except Exception:  # noqa: BLE001 - prefetch is best effort
                    log.exception("prefetch of blob %s failed", blob_id[:12])
            log.info("prefetch for %s done", mountpoint)

    def _prefetch_range(self, mgr, off: int, length: int | None) -> None:
        missing = mgr.missing(off, length)
        for batch in plan(missing, self.batch_size):
            if self._stop.is_set() or mgr.blob_id not in self.blobs:
                return
            # on-demand work first: back off while any is queued or running
            while self.pool.ondemand_pending() and not self._stop.is_set():
                self._stop.wait(0.002)
            self.bucket.take(batch.length, self._stop)
            fut = self.pool.submit_prefetch(self._prefetch_batch, mgr, batch.chunks)
            try:
                self.prefetch_bytes += fut.result()
            except Exception as e:  # noqa: BLE001
                log.warning("prefetch batch of blob %s failed: %s", mgr.blob_id[:12], e)

    @staticmethod
    def _prefetch_batch(mgr, chunks) -> int:
        return mgr.fill_chunks(chunks, prefetch=True)

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
        blobs = []
        for b in img.blob_ids:
            mgr = self.blobs.get(b)
            if mgr is None:
                continue
            blobs.append({"blob_id": b, "cache_file": mgr.cache.path,
                          "cached_chunks": mgr.cache.cached_chunks,
                          "total_chunks": mgr.cache.total_chunks,
                          "complete": mgr.complete()})
        d["blobs"] = blobs
        return d

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
            s.update(cached_chunks=m.cache.cached_chunks, total_chunks=m.cache.total_chunks,
                     uncompressed_size=m.size, compressed_size=m.meta.compressed_size,
                     complete=m.complete(), meta_bytes_fetched=getattr(m, "meta_bytes_fetched", 0),
                     mounts=users.get(b, []))
            blobs[b] = s
        with self.proc.oneshot():
            mem = self.proc.memory_info()
            cpu = self.proc.cpu_times()
            process = {"pid": self.proc.pid, "rss_bytes": mem.rss, "vms_bytes": mem.vms,
                       "cpu_user_s": cpu.user, "cpu_system_s": cpu.system,
                       "cpu_percent": self.proc.cpu_percent(None),
                       "threads": self.proc.num_threads(), "open_fds": self.proc.num_fds()}
        totals = {k: sum(v[k] for v in blobs.values()) for k in
                  ("requests", "bytes_fetched", "bytes_served_from_cache", "verify_failures",
                   "requests_failed", "prefetch_bytes")}
        return {"version": __version__, "frontend": self.frontend.name,
                "uptime_s": round(time.time() - self.started_at, 3),
                "mounts": len(self.images), "blobs": blobs, "totals": totals,
                "meta_bytes_fetched": self.meta_bytes_fetched,
                "frontend_stats": self.frontend.stats(), "process": process}


PROM_COUNTERS = {
    "requests": ("fscache_daemon_blob_requests_total", "Kernel read requests for the blob"),
    "requests_failed": ("fscache_daemon_blob_requests_failed_total",
                        "Requests answered with an I/O error"),
    "bytes_fetched": ("fscache_daemon_blob_backend_bytes_total",
                      "Bytes fetched from the backend (stored, compressed)"),
    "bytes_served_from_cache": ("fscache_daemon_blob_cache_bytes_total",
                                "Requested bytes already in the cache"),
    "prefetch_bytes": ("fscache_daemon_blob_prefetch_bytes_total",
                       "Backend bytes fetched by prefetch"),
    "verify_failures": ("fscache_daemon_blob_verify_failures_total",
                        "Chunks that failed digest verification"),
    "backend_errors": ("fscache_daemon_blob_backend_errors_total", "Failed backend requests"),
    "chunks_fetched": ("fscache_daemon_blob_chunks_fetched_total", "Chunks fetched and stored"),
}


def prometheus_text(m: dict) -> str:
    out = []

    def esc(v: str) -> str:
        return v.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")

    for key, (name, help_) in PROM_COUNTERS.items():
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} counter")
        for b, s in m["blobs"].items():
            out.append(f'{name}{{blob="{esc(b)}"}} {s[key]}')
    out.append("# HELP fscache_daemon_blob_request_latency_seconds Request latency quantiles")
    out.append("# TYPE fscache_daemon_blob_request_latency_seconds summary")
    for b, s in m["blobs"].items():
        out.append(f'fscache_daemon_blob_request_latency_seconds{{blob="{esc(b)}",'
                   f'quantile="0.5"}} {s["latency_p50_ms"] / 1000:.6f}')
        out.append(f'fscache_daemon_blob_request_latency_seconds{{blob="{esc(b)}",'
                   f'quantile="0.99"}} {s["latency_p99_ms"] / 1000:.6f}')
        out.append(f'fscache_daemon_blob_request_latency_seconds_sum{{blob="{esc(b)}"}} '
                   f'{s["latency_sum_s"]}')
        out.append(f'fscache_daemon_blob_request_latency_seconds_count{{blob="{esc(b)}"}} '
                   f'{s["requests"]}')
    out.append("# HELP fscache_daemon_blob_cached_ratio Fraction of the blob's chunks cached")
    out.append("# TYPE fscache_daemon_blob_cached_ratio gauge")
    for b, s in m["blobs"].items():
        ratio = s["cached_chunks"] / s["total_chunks"] if s["total_chunks"] else 1.0
        out.append(f'fscache_daemon_blob_cached_ratio{{blob="{esc(b)}"}} {ratio:.6f}')
    p = m["process"]
    for name, help_, typ, val in (
            ("fscache_daemon_mounts", "Mounted images", "gauge", m["mounts"]),
            ("fscache_daemon_process_resident_memory_bytes", "Resident set size", "gauge",
             p["rss_bytes"]),
            ("fscache_daemon_process_cpu_seconds_total", "User and system CPU time",
             "counter", round(p["cpu_user_s"] + p["cpu_system_s"], 6)),
            ("fscache_daemon_process_open_fds", "Open file descriptors", "gauge",
             p["open_fds"]),
            ("fscache_daemon_uptime_seconds", "Seconds since start", "gauge", m["uptime_s"])):
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {typ}", f"{name} {val}"]
    return "\n".join(out) + "\n"
