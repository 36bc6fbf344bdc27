"""The fanotify front end's adapter: file-backed EROFS mounts whose blob devices are
cache files marked for pre-content events, with the group kept in the fd holder."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fscache_daemon import mounts
from fscache_daemon.errors import FrontendError, HolderError, MountError, check_unix_socket_path
from fscache_daemon.frontend.base import DaemonView, Frontend, ImageView, sys_mount, sys_umount

if TYPE_CHECKING:   # imported when started: only a daemon using this front end loads it
    from fscache_daemon.frontend.fanotify import PreContentWatcher
    from fscache_daemon.frontend.fanotify_marks import FilledMap

log = logging.getLogger(__name__)


# Every read EROFS makes of a marked cache file raises a pre-content event that the reader
# waits on, and EROFS reads in readahead windows (128 KiB by default): a larger window
# for our mounts means fewer, larger events. On 6.18, whose readahead grows its folios
# window by window (EROFS's file-backed request is 16 folios), 256 KiB gives as few
# events per cold GiB as 1 MiB on a tree of small and mid-sized files (3.5-3.8 per 1 MiB
# chunk against 3.5-4.4; 5.4 at 128 KiB) while the reader's copies cost it ~0.1 CPU s
# less per cold GiB (median 0.40 against 0.49 s; probably the bytes it copies are still
# in the CPU's caches), and quiet run 17 read the cold GiB through the daemon in 0.89 s
# against 0.94 s. A big file read whole pays: one event per window once its folios are
# large (docs/daemon.md; docs/performance.md, branches coldcpu, coldseq). Once every
# blob of the image is complete and unmarked (no more events; one completed ahead of its
# readers stays marked for the access trace, and its reads still raise events) the
# default is put back: it reads a complete cache file faster (best warm runs 0.49 s vs
# 0.57 s per GiB).
# FSCACHE_DAEMON_MOUNT_READAHEAD_KB=N sets another window; 0 leaves the kernel's alone.
DEFAULT_MOUNT_READAHEAD_KB = 256


def _mount_readahead_kb() -> int:
    v = os.environ.get("FSCACHE_DAEMON_MOUNT_READAHEAD_KB", str(DEFAULT_MOUNT_READAHEAD_KB))
    return int(v) if v.isdigit() and int(v) <= 1 << 20 else DEFAULT_MOUNT_READAHEAD_KB


MOUNT_READAHEAD_KB = _mount_readahead_kb()


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


def find_holder(sock: str) -> int | None:
    """The pid of a live fd holder started for `sock`, found by its command line (its
    socket file may be gone: the cache directory was deleted while mounted)."""
    want = ["-m", "fscache_daemon.frontend.fdholder", "--sock", sock]
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if argv[1:] == want:
            return int(name)
    return None


def reattach_holder(sock: str, timeout: float = 10.0) -> int | None:
    """Ask a holder whose socket vanished to listen again (SIGUSR1); its pid if it
    answers, None if there is none."""
    pid = find_holder(sock)
    if pid is None:
        return None
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if holder_running(sock):
            log.warning("fanotify fd holder pid %d had lost its socket %s (cache directory "
                        "deleted?); using it again: its marks and waiting readers are not "
                        "orphaned", pid, sock)
            return pid
        time.sleep(0.05)
    raise FrontendError(f"fanotify fd holder pid {pid} serves {sock} but does not answer; "
                        f"not starting a second one")


def _last_line(log_path: str) -> str:
    """': <the holder's last log line>' (why it exited, e.g. fanotify_init's error), or
    '' if there is none to read."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return f": {lines[-1][:300]}" if lines else ""


def spawn_holder(sock: str, log_path: str, timeout: float = 60.0) -> int:
    """Start the fanotify fd holder in its own session (it must outlive us). It is
    waited for as long as it lives without answering, up to `timeout` s: a python
    process whose imports took 1.4 s of wall clock (0.2 s of CPU) at load 16, ten times
    that on an emulated VM; the bound is for a hang only (was 10 s)."""
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
            raise FrontendError(f"fanotify fd holder exited with status {p.returncode}"
                                f"{_last_line(log_path)}; see {log_path}")
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
        self.holder_sock = check_unix_socket_path(
            holder_sock or os.path.join(cache_dir, "fdholder.sock"), "fd holder socket")
        self.watcher: PreContentWatcher | None = None
        # cache key -> the manager whose cache file is marked under it: an unmark is of
        # that manager's mark only. A fill's completion hook may run for a manager after
        # its blob was released (its store ended just before the close), its file
        # evicted and the blob opened again in a new file under the same key: unmarking
        # "the key" then took the new file's mark, and its mount read zeros
        self._marked: dict[str, Any] = {}
        self._marked_inode: dict[str, tuple[int, int]] = {}   # cache key -> its file's
        # Keyed by cache key (mgr.key: the blob id, or a variant `<id>@<table digest>`
        # with a cache file of its own), never by blob id alone: two images naming one
        # blob id with different chunk tables have two cache files, each with its own
        # mark and filled bitmap.
        # cache key -> (FilledMap shared with the fd holder, its store listener)
        self._filled: dict[str, tuple[FilledMap, Callable]] = {}
        # cache key -> indexes of readahead markers whose filled bits are kept back
        self._withheld: dict[str, set[int]] = {}
        # cache key -> (next holder record, first accesses the holder allowed itself:
        # [(offset, length, monotonic ns)]), for access traces (fscache_daemon/trace.py)
        self._touches: dict[str, tuple[int, list]] = {}
        self._lock = threading.Lock()
        self._holder_sweeps: bool | None = None    # False: the holder cannot sweep

    def start(self, daemon: DaemonView) -> None:
        from fscache_daemon.frontend import fanotify_abi as abi
        abi.raise_nofile_limit()
        self._daemon = daemon
        self._stopping = False
        if self.holder and not holder_running(self.holder_sock) and \
                reattach_holder(self.holder_sock) is None:
            spawn_holder(self.holder_sock, os.path.join(self.cache_dir, "fdholder.log"))
        self.watcher = self._new_watcher()

    def _new_watcher(self) -> PreContentWatcher:
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
        self._watcher().start()
        if self.holder:
            t = threading.Thread(target=self._supervise, name="fanotify-supervisor",
                                 daemon=True)
            t.start()

    def _watcher(self) -> PreContentWatcher:
        # None after stop(): a blob completing in a fill that outlived stop() lands here
        if self.watcher is None:
            raise FrontendError("fanotify front end is stopped")
        return self.watcher

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

    def _new_filled(self, mgr) -> tuple[FilledMap, Callable]:
        """The blob's FilledMap for the fd holder, empty, with its listener: chunks
        stored from now on are set by it, those already cached by _publish_cached."""
        from fscache_daemon.frontend.fanotify import FilledMap
        fm = FilledMap.for_file(mgr.cache.fileno())

        withheld = self._withheld.setdefault(mgr.key, set())

        def stored(chunks):
            for c in chunks:
                if c.index not in withheld:
                    fm.set_range(c.uncompressed_offset, c.uncompressed_size)

        mgr.cache.add_store_listener(stored)
        return fm, stored

    def _publish_cached(self, mgr, fm: FilledMap) -> None:
        """Set the chunks already cached (and verified) in the holder's FilledMap."""
        if not mgr.cache.cached_chunks:
            return      # a cold mount: no walk over its 27,000 chunks (stored ones from
            # now on reach the map through the store listener)
        withheld = self._withheld.get(mgr.key, set())
        for c in mgr.meta.chunks:
            if mgr.cache.has(c) and c.index not in withheld:
                fm.set_range(c.uncompressed_offset, c.uncompressed_size)

    def withhold(self, mgr, chunk) -> None:
        self._withheld.setdefault(mgr.key, set()).add(chunk.index)

    def publish(self, mgr, chunk) -> None:
        withheld = self._withheld.get(mgr.key)
        if withheld is None:
            return
        withheld.discard(chunk.index)
        item = self._filled.get(mgr.key)
        if item is not None and mgr.cache.has(chunk):
            item[0].set_range(chunk.uncompressed_offset, chunk.uncompressed_size)

    def _drop_filled(self, mgr) -> None:
        item = self._filled.pop(mgr.key, None)
        self._withheld.pop(mgr.key, None)
        if item is not None:
            mgr.cache.remove_store_listener(item[1])
            item[0].close()

    def _marks_this(self, mgr) -> bool:
        """Whether mgr's cache file is marked for mgr itself (under self._lock)."""
        return self._marked.get(mgr.key) is mgr

    def prepare_blob(self, mgr) -> None:
        with self._lock:
            if self._marks_this(mgr):
                return
            fm = None
            if self.holder and self.filled_map:
                self._drop_filled(mgr)
                self._filled[mgr.key] = item = self._new_filled(mgr)
                fm = item[0]
            try:
                wfd = self._watcher().mark(mgr.cache.path, mgr.key, filled=fm)
            except BaseException:
                self._drop_filled(mgr)
                raise
            self._marked[mgr.key] = mgr
            st = os.fstat(wfd)
            self._marked_inode[mgr.key] = (st.st_dev, st.st_ino)
        # the writer fd raises no events: the cache verifies its chunks through it
        # (a restart's deferred check) before they are published to the holder
        mgr.cache.use_write_fd(wfd)
        if fm is not None:
            self._publish_cached(mgr, fm)
        if mgr.complete():
            self.blob_complete(mgr)

    def blob_complete(self, mgr, keep_mark: bool = False) -> None:
        if keep_mark:
            # fetched ahead of its readers (readahead, prefetch): without the mark their
            # first reads would raise no event and be missing from the access trace; the
            # holder answers them from the filled bitmap and logs them (release unmarks)
            log.info("blob %s complete: cache file stays marked, chunks still unread",
                     mgr.blob_id[:12])
        elif self._unmark(mgr):
            log.info("blob %s complete: cache file unmarked, reads stay in the kernel",
                     mgr.blob_id[:12])
        if keep_mark:
            # still marked: the reader's reads still raise events, the larger window
            # still halves them; put back when the mark goes (the daemon calls this
            # again then)
            return
        d = self._daemon
        for img in list(d.images.values()):
            if img.readahead_restore and mgr.key in img.blob_keys and \
                    all(b in d.blobs and d.blobs[b].complete() and b not in self._marked
                        for b in img.blob_keys):
                # no more events: the kernel's default window reads faster from the cache
                mounts.set_readahead(*img.readahead_restore)
                img.readahead_restore = None

    def release_blob(self, mgr) -> None:
        if self._unmark(mgr):
            log.info("blob %s no longer mounted: cache file unmarked", mgr.blob_id[:12])
        with self._lock:
            self._touches.pop(mgr.key, None)

    def touches(self, mgr) -> list[tuple[int, int, int]]:
        """First accesses to `mgr`'s cache file that the fd holder allowed from the
        filled bitmap (the daemon never saw them): [(offset, length, monotonic ns)]."""
        with self._lock:
            self._pull_touches(mgr)
            return list(self._touches.get(mgr.key, (0, []))[1])

    def rearm_touches(self, mgr) -> None:
        """The holder records the next touch of every block of mgr's file again
        (trace.TraceRecorder.rearm), after handing over what it has."""
        with self._lock:
            self._pull_touches(mgr, rearm=True)

    def _pull_touches(self, mgr, rearm: bool = False) -> None:
        """Fetch the holder's new records for mgr (under self._lock): before an unmark
        too, since the holder forgets the file's log with its bitmap."""
        from fscache_daemon.frontend.fanotify_marks import TouchLog
        # Only for the manager marked under its key, by the inode marked: a released
        # manager's descriptor is closed, its number maybe another file's (a late
        # completion hook asked; the records of another blob's cache file were taken
        # into this key's trace, and its position in the holder's log lost)
        inode = self._marked_inode.get(mgr.key)
        if mgr.key not in self._filled or self.watcher is None or \
                not self._marks_this(mgr) or inode is None:
            return
        nxt, recs = self._touches.get(mgr.key, (0, []))
        while True:
            try:
                # HolderChannel's request/reply call (no public wrapper: fdholder.py
                # is at the module size limit)
                reply, _ = self.watcher.channel._call(
                    {"op": "touches", "inode": list(inode), "since": nxt,
                     "rearm": rearm})
            except (FrontendError, OSError) as e:
                log.debug("fd holder touches of %s: %s", mgr.key[:12], e)
                break
            got = reply.get("records") or []
            recs.extend((int(o), int(n), int(t)) for o, n, t in got)
            nxt = int(reply.get("next", nxt))
            if len(got) < TouchLog.PAGE:
                break
        self._touches[mgr.key] = (nxt, recs)

    def _unmark(self, mgr) -> bool:
        with self._lock:
            if not self._marks_this(mgr):
                return False            # not marked, or marked for another manager
            watcher = self._watcher()   # stopped: nothing to unmark through
            self._pull_touches(mgr)     # the holder forgets them with the mark
            del self._marked[mgr.key]
            self._marked_inode.pop(mgr.key, None)
            mgr.cache.use_write_fd(None)
            # Remove the kernel mark through the channel but keep the watcher's mapping
            # of this cache file: events queued before the mark went away still arrive
            # and must map to the blob (then the fast path allows them); watcher.unmark()
            # would forget the inode and deny them with EIO.
            watcher.channel.unmark(mgr.cache.path)
            self._drop_filled(mgr)
        return True

    def release_unused(self) -> list[str]:
        """Have the fd holder unmark the cache files it marked for no blob of ours that
        nothing else has open (fdholder's sweep): those of mounts a restart forgot, or
        did not take back, whose last user the kernel let go since. Kept while any
        superblock (any mount namespace) or reader has them open: unmarked, their holes
        would read as zeros; kept forever, they held their marks, their writer fds and,
        once evicted, their disk space for the holder's life, and the holder (which exits
        only without marks) itself."""
        if not self.holder or self._holder_sweeps is False:
            return []
        with self._lock:        # no mark of ours is made or removed meanwhile
            w = self.watcher
            if w is None:
                return []
            try:
                done = w.channel.release_unused(self._marked_inode.values())
            except HolderError as e:
                if "unknown op" not in str(e):
                    raise
                # a holder started by an older version (it outlives upgrades): asked
                # once, not every few seconds for the daemon's life
                log.warning("fanotify: the fd holder predates releasing unused marks "
                            "(%s); a mark a restart forgot stays until it is restarted", e)
                self._holder_sweeps = False
                return []
        for path in done:
            log.info("fanotify: %s was marked for no mount of ours and nobody has it "
                     "open; unmarked", path)
        return done

    def mount(self, image: ImageView) -> None:
        devs = [self._daemon.blobs[k].cache.path for k in image.blob_keys]
        for d in devs:
            if "," in d:
                raise MountError(f"{d}: cache file paths must not contain ','")
        before = mounts.erofs_instances()
        flags = mounts.MS_RDONLY | mounts.MS_NODEV | mounts.MS_NOSUID
        sys_mount(image.bootstrap, image.mountpoint, "erofs", flags,
                  ",".join(f"device={d}" for d in devs))
        # the kernel names our superblock itself (6.10+); else the diff, normally
        # exactly one: ours. More only if someone else mounted EROFS at the same moment
        # (containers starting together); then all are kept, and the blobs stay served
        # until every one is gone (later than needed, never too early).
        ours = mounts.erofs_instance_of(image.mountpoint)
        new = {ours} if ours else mounts.erofs_instances() - before
        image.instances = sorted(new)
        blobs = [self._daemon.blobs[k] for k in image.blob_keys]
        if all(m.complete() for m in blobs):
            return
        if MOUNT_READAHEAD_KB and len(new) == 1:
            # else (no window asked for, or another erofs mount raced with ours) the
            # kernel's window is left alone
            inst = next(iter(new))
            default = mounts.get_readahead(inst)
            if default is not None:
                image.readahead_restore = (inst, default)
                mounts.set_readahead(inst, MOUNT_READAHEAD_KB)
                if all(m.complete() for m in blobs):   # completed meanwhile
                    mounts.set_readahead(inst, default)
                    image.readahead_restore = None

    def umount(self, image: ImageView, lazy: bool = False) -> None:
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
        if not self.holder and self._daemon.all_images():
            # the group dies with us: every hole of these mounts will read as zeros
            log.critical("fanotify-local: stopping with %d images the kernel still uses; "
                         "their uncached ranges now read as zeros (use the fd holder)",
                         len(self._daemon.all_images()))
        if self.holder and not self._daemon.all_images():
            # nothing mounted: let the holder go too (it exits only without marks)
            try:
                self.release_unused()
                ch = self.watcher.channel
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
