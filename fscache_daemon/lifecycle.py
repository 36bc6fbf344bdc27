"""Mount, unmount, restart: when the daemon may let a blob go.

The rule: a blob's cache file is served (marked, filled on demand) until no EROFS
superblock that reads it is alive, whatever happened to the mount point. umount2(2) of
our mount point succeeds while overlayfs (its private clone of the lower mount), another
mount namespace, or a lazily detached mount still hold the superblock; each live
superblock has /sys/fs/erofs/<name> (mounts.erofs_instances), so after the umount an image
whose superblock lives on is *detached*: no longer at its mount point, still served, and
released by the reaper thread once the kernel dropped the superblock (EROFS puts its
device files when it does). Only then are the cache files unmarked.

Mounts are identified by mount id and canonical path: `umount` refuses when another
mount covers the image's mount point (it would remove the foreign mount and the image
would lose its blobs), and never acts on a mount it did not make. mounts.json records a
mount's intent before mount(2), so a daemon killed between mount(2) and the state save
finds the mount again in /proc/self/mountinfo when it restarts.

Lives in its own module as a mixin of `Daemon` (daemon.py) to keep the daemon's modules
small; it uses the Daemon's attributes (images, detached, blobs, blob_users, frontend).
"""

from __future__ import annotations

import _thread
import contextlib
import functools
import gc
import logging
import os
import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING

from fscache_daemon import libchase, mounts, startset
from fscache_daemon.blobopen import EarlyChecks, open_side_by_side
from fscache_daemon.errors import (
    ConflictError,
    DaemonError,
    FrontendError,
    MountBusyError,
    NotFoundError,
)
from fscache_daemon.eviction import CacheEviction
from fscache_daemon.images import DETACHED, MOUNTED, MOUNTING, Image
from fscache_daemon.keyedlock import KeyedLock
from fscache_daemon.restore import MountRestore
from fscache_daemon.state import copy_bootstrap, save_state
from fscache_daemon.storage.backends import parse_backend_spec
from fscache_daemon.storage.chunkmap import key_blob_id
from fscache_daemon.storage.image import (
    ImageInfo,
    group_file_runs,
    load_image,
    walk_file_runs,
)
from fscache_daemon.warming import MountWarmer, WarmRoute

if TYPE_CHECKING:
    from fscache_daemon.frontend.base import Frontend
    from fscache_daemon.readahead import BlobReadahead
    from fscache_daemon.storage.backends import Backend
    from fscache_daemon.storage.blobcache import BlobManager
    from fscache_daemon.trace import TraceRecorder

log = logging.getLogger(__name__)

# How often the reaper looks whether the kernel let go of a detached image's superblock
REAP_INTERVAL = 0.2

# Threads of a mount (the backend's warming, the bootstrap walk, what follows the mount)
# are started with _thread: threading.Thread.start() waits for the new thread to run, a
# few ms each when the GIL is busy (the walk's Python parts, other mounts)


class MountLifecycle(CacheEviction, WarmRoute, MountRestore):
    # What this mixin uses of the Daemon, declared for the type checker (no values:
    # daemon.py sets the attributes in __init__ and defines the methods)
    cache_dir: str
    boot_dir: str
    readahead: int
    frontend: Frontend
    images: dict[str, Image]
    detached: list[Image]
    blobs: dict[str, BlobManager]
    blob_users: dict[str, set[str]]
    backends: dict[tuple, Backend]
    traces: TraceRecorder
    _ra: dict[str, BlobReadahead]
    _walks: dict[tuple[str, str], Future]    # (bootstrap copy, mount point) -> its walk
    _streams: dict[str, threading.Event]     # mount point -> its prefetch table streamed
    _lock: threading.RLock
    _mount_lock: threading.Lock
    _mountpoints: KeyedLock
    _blob_opening: KeyedLock
    _state_lock: threading.Lock
    _state_behind: threading.Event
    _boot_lock: threading.Lock
    _boot_inflight: dict[str, int]
    _stop: threading.Event

    if TYPE_CHECKING:
        def describe(self, img: Image) -> dict: ...
        def _backend(self, spec: str, options: dict) -> Backend: ...
        def _open_blob(self, ref, backend, key: str | None = None,
                       early: EarlyChecks | None = None) -> BlobManager: ...
        def _queue_prefetch(self, img: Image) -> None: ...
        def _drop_unused_backends(self) -> None: ...
        @staticmethod
        def _backend_key(spec: str, options: dict | None) -> tuple: ...
        def _release_backend(self, be: Backend) -> None: ...

    # -- state file ---------------------------------------------------------------------
    @property
    def state_path(self) -> str:
        return os.path.join(self.cache_dir, "mounts.json")

    def all_images(self) -> list[Image]:
        """Mounted images and detached ones (the kernel still reads their blobs)."""
        with self._lock:
            return list(self.images.values()) + list(self.detached)

    def _save_state(self) -> None:
        # mounts of different images save concurrently: each write is of the state as
        # it is when the write starts, so the last one written is the latest
        with self._state_lock:
            save_state(self.state_path, self.frontend.name,
                       [img.to_json() for img in self.all_images()]
                       + self.unpicked_records())

    def save_state_later(self) -> None:
        """The save a mount made with `state_later` left behind, unless another save
        (of the state as it is then) came after it."""
        if self._state_behind.is_set():
            self._state_behind.clear()      # before the save: it writes the state now
            self._save_state()

    # -- mount --------------------------------------------------------------------------
    def _drop_unused_bootstrap(self, boot_copy: str) -> None:
        """Remove our copy of a bootstrap no image uses and no mount is about to use (a
        failed mount must leave nothing behind in the cache directory)."""
        if not boot_copy or os.path.dirname(boot_copy) != self.boot_dir:
            return
        with self._boot_lock:
            if self._boot_inflight.get(boot_copy) or \
                    any(i.bootstrap == boot_copy for i in self.all_images()) or \
                    self.uses_bootstrap_unpicked(boot_copy):
                return
            try:
                os.unlink(boot_copy)
            except OSError:
                pass

    def _take_bootstrap(self, bootstrap: str) -> str:
        """Our copy of `bootstrap` (named by its content), kept from `_drop_unused_
        bootstrap` until `_done_with_bootstrap`: another mount of the same bytes that
        fails meanwhile must not remove it."""
        with self._boot_lock:
            boot_copy = copy_bootstrap(bootstrap, self.boot_dir)
            self._boot_inflight[boot_copy] = self._boot_inflight.get(boot_copy, 0) + 1
            return boot_copy

    def _done_with_bootstrap(self, boot_copy: str) -> None:
        with self._boot_lock:
            n = self._boot_inflight.get(boot_copy, 0) - 1
            if n > 0:
                self._boot_inflight[boot_copy] = n
            else:
                self._boot_inflight.pop(boot_copy, None)

    def _validate_copy(self, boot_copy: str, given: str) -> ImageInfo:
        """Parse the copy (the bytes that will be mounted), naming the user's path."""
        try:
            return load_image(boot_copy)
        except DaemonError as e:
            msg = str(e).replace(boot_copy, given)
            if given not in msg:
                msg = f"{given}: {msg}"
            raise type(e)(msg) from None

    def mount(self, bootstrap: str, mountpoint: str, backend: str, *, prefetch: bool = False,
              domain: str | None = None, options: dict | None = None,
              state_later: bool = False) -> dict:
        """Mount the image; its record in mounts.json is saved as an intent before
        mount(2) and as made after it. With `state_later` the second save is left to
        save_state_later() (the API calls it once its answer is sent: ~0.5 ms of a
        quiet mount, tens of ms when the disk is busy, as ext4 starts writing back a
        file renamed over another); a daemon that dies before then finds the mount again
        from its intent (_reconcile), as one killed right after mount(2) does."""
        if not isinstance(bootstrap, str) or not isinstance(mountpoint, str) or \
                not isinstance(backend, str):
            raise DaemonError("mount needs string bootstrap, mountpoint and backend")
        parse_backend_spec(backend)
        log.debug("mount request: %s on %s (backend %s)", bootstrap, mountpoint, backend)
        given = mountpoint
        mountpoint = os.path.realpath(mountpoint)
        bootstrap = os.path.abspath(bootstrap)
        if not os.path.isfile(bootstrap):
            raise NotFoundError(f"{bootstrap}: no such bootstrap file")
        if self.frontend.name != "none" and not os.path.isdir(mountpoint):
            raise NotFoundError(f"{mountpoint}: mount point is not a directory")
        # the backend's first round trips (a registry's manifest) run while the
        # bootstrap is copied and parsed; errors are left to the mount's own use of it
        warm = MountWarmer(self, backend, options or {}, bootstrap)
        try:
            return self._mount(bootstrap, mountpoint, backend, given, prefetch, domain,
                               options, warm.checks, state_later)
        finally:
            warm.done()

    def _mount(self, bootstrap, mountpoint, backend, given, prefetch, domain,
               options, early: EarlyChecks | None = None, state_later: bool = False) -> dict:
        # Mounts of different mount points run side by side up to the kernel's part
        # (the slow part, opening the blobs, may wait seconds for a registry); that part
        # takes the one mount lock
        with self._mountpoints.hold(mountpoint):
            if mountpoint in self.images:
                alias = f" (given as {given})" if os.path.abspath(given) != mountpoint else ""
                raise ConflictError(f"{mountpoint}: already mounted by this daemon{alias}")
            boot_copy = self._take_bootstrap(bootstrap)
            try:
                # parsed once: a big bootstrap (50,000 files) costs ~0.1 s a parse
                info = self._validate_copy(boot_copy, bootstrap)
                self._walk_early(boot_copy, mountpoint, info)
                img = self._register(boot_copy, mountpoint, backend, prefetch, domain,
                                     options, bootstrap, state=MOUNTING, info=info,
                                     early=early)
                try:
                    with self._mount_lock:
                        self._save_state()      # the intent, before mount(2)
                        self.frontend.mount(img)
                        img.mount_id = self._mount_id_of(img)
                        img.state = MOUNTED
                except BaseException:
                    self._unregister(img)
                    self._save_state()
                    raise
            except BaseException:
                self._walks.pop((boot_copy, mountpoint), None)
                self._done_with_bootstrap(boot_copy)
                self._drop_unused_bootstrap(boot_copy)
                self._drop_unused_backends()
                raise
            self._done_with_bootstrap(boot_copy)
            if state_later:
                self._state_behind.set()
            else:
                self._save_state()
        log.info("mounted %s on %s (%d blobs, backend %s, mount id %s, superblock %s)",
                 bootstrap, mountpoint, len(img.blob_ids), backend, img.mount_id,
                 ",".join(img.instances) or "?")
        return self.describe(img)

    def _mount_id_of(self, img: Image) -> int | None:
        if self.frontend.name == "none":
            return None
        entries = mounts.mountinfo()
        top = mounts.top_mount(img.mountpoint, entries)
        if top is not None and top.fstype == "erofs" and (
                top.source in (img.bootstrap, "none") or
                os.path.realpath(top.source) == img.bootstrap):
            return top.mount_id
        # someone mounted on top of ours at once: ours is the one EROFS mount of our copy
        # there (a second one of the same copy would be refused as already mounted)
        ours = [e for e in entries if e.mountpoint == img.mountpoint and e.fstype == "erofs"
                and os.path.realpath(e.source) == img.bootstrap]
        if len(ours) == 1:
            return ours[0].mount_id
        log.warning("%s: our mount is not in /proc/self/mountinfo", img.mountpoint)
        return None

    def _register(self, boot_copy, mountpoint, backend_spec, prefetch, domain, options,
                  source_bootstrap, mounted_at=None, state=MOUNTED, mount_id=None,
                  instances=(), blob_keys=None, info: ImageInfo | None = None,
                  early: EarlyChecks | None = None) -> Image:
        """Open the image's blobs and make it known. `blob_keys` (from mounts.json) are
        the cache keys a restarted mount was served under: the kernel keeps reading the
        files it opened at mount time, so each blob goes back to exactly that cache."""
        options = dict(options or {})
        if info is None:
            info = load_image(boot_copy)
        if blob_keys is not None and (not isinstance(blob_keys, list) or
                                      len(blob_keys) != len(info.blobs) or
                                      not all(isinstance(k, str) for k in blob_keys)):
            raise DaemonError(f"{mountpoint}: recorded cache keys do not match its bootstrap")
        # pinned: the cache size limit (eviction.py) leaves these blobs' files alone from
        # before the cache directory is looked at until they are open (then in use)
        with self.pinned(r.blob_id for r in info.blobs):
            img, mgrs = self._open_blobs(info, boot_copy, mountpoint, backend_spec, prefetch,
                                         domain, options, source_bootstrap, mounted_at,
                                         state, mount_id, instances, blob_keys, early)
        try:
            for m in mgrs:
                # a blob two mounts share is ready (marked, writer fd) for both once
                # either returns from here
                with self._blob_opening.hold(m.blob_id):
                    self.frontend.prepare_blob(m)
                    m.cache.verify_now()    # front ends without a writer fd: our own fd
                if state == MOUNTING and len(self.blob_users.get(m.key, ())) > 1:
                    self.traces.rearm(m)    # its trace starts afresh for this image
        except BaseException:
            self._unregister(img)
            raise
        if state != DETACHED:
            self._queue_prefetch(img)
            if state == MOUNTING and startset.ENABLED and not info.prefetch:
                _thread.start_new_thread(self._start_set, (img, mgrs))
        _thread.start_new_thread(self._after_mount, (img, mgrs))
        return img

    def _start_set(self, img: Image, mgrs: list[BlobManager]) -> None:
        try:    # what the container's first instructions read (startset.py)
            startset.run(self, img, mgrs, img.stop)
        except Exception:  # noqa: BLE001 - an optimisation: readers fetch on demand
            log.exception("%s: start set failed", img.mountpoint)

    def _after_mount(self, img: Image, mgrs: list[BlobManager]) -> None:
        """What the blobs need before their first reads but not before the mount: the
        chunk lists of maps made by the C core (BlobMeta.chunks), then file-aware
        readahead's runs (_learn_runs). An image with a prefetch table gets them once
        the table was streamed: its start reads what the stream brings (the holder
        answers, no miss needs a chunk list or a run), and on two cores this CPU
        (~0.2-0.3 s for the ML image's 50,000 files and 45,000 chunks) was taken from
        the container's start; a miss before then makes the chunk list itself."""
        for _ in range(3000):
            if img.state != MOUNTING:
                break
            time.sleep(0.01)
        for m in mgrs:
            # the blob's map file (daemon._open_blob), under the lock an umount takes to
            # run the same work and then drop the blob: taken here and left to wait for
            # that lock in the write's hold, it found the blob gone and was never written
            with self._lock:
                m.run_after_mount()
        stream = self._streams.get(img.mountpoint)
        if stream is not None:
            stream.wait(STREAM_WAIT)
        for m in mgrs:
            m.meta.chunks   # noqa: B018 - made now, not on the first read's path
        if self.readahead:
            self._learn_runs(img, mgrs)
        # the mount's tables (chunk lists, runs) live as long as it: out of the cyclic
        # collector's full passes, as what the daemon's start made (cli); _unregister
        # gives them back to it
        gc.freeze()

    def _open_blobs(self, info, boot_copy, mountpoint, backend_spec, prefetch, domain,
                    options, source_bootstrap, mounted_at, state, mount_id, instances,
                    blob_keys, early=None) -> tuple[Image, list[BlobManager]]:
        be = self._backend(backend_spec, options)
        calls = [functools.partial(self._open_blob, ref, be,
                                   blob_keys[i] if blob_keys else None, early)
                 for i, ref in enumerate(info.blobs)]
        try:
            # e.g. a later blob's table collides: none kept
            mgrs = open_side_by_side(calls, self._close_unused)
            while True:
                with self._lock:
                    # A manager shared with another image (or opened by a mount that
                    # failed since) has no user of ours until below: that image's umount
                    # (or _close_unused) may have released it meanwhile, and a mount
                    # served by a closed manager fails every read. Checked and made a
                    # user in one hold of the lock the releases take; else opened again
                    gone = [i for i, m in enumerate(mgrs) if self.blobs.get(m.key) is not m]
                    if not gone:
                        img = Image(mountpoint, boot_copy, source_bootstrap, backend_spec,
                                    [r.blob_id for r in info.blobs], bool(prefetch), domain,
                                    options, info.prefetch, mounted_at, state=state,
                                    mount_id=mount_id, instances=instances,
                                    blob_keys=[m.key for m in mgrs])
                        if state == DETACHED:
                            self.detached.append(img)
                        else:
                            self.images[mountpoint] = img
                        for m in mgrs:
                            self.blob_users.setdefault(m.key, set()).add(img.user)
                            if m.backend is not be and be not in m.alternates:
                                m.alternates.append(be)     # see BlobManager.alternates
                        return img, mgrs
                log.info("%s: %d blob(s) released while the mount opened them; opening "
                         "them again", mountpoint, len(gone))
                try:
                    again = open_side_by_side([calls[i] for i in gone], self._close_unused)
                except BaseException:
                    self._close_unused(mgrs)
                    raise
                for i, m in zip(gone, again):
                    mgrs[i] = m
        finally:
            self._release_backend(be)

    def _close_unused(self, mgrs: list[BlobManager]) -> None:
        """Close the managers of a failed registration that no image uses."""
        for m in mgrs:
            with self._blob_opening.hold(m.blob_id):    # closed before opened again
                with self._lock:
                    if self.blob_users.get(m.key) or self.blobs.get(m.key) is not m:
                        continue
                    del self.blobs[m.key]
                    ra = self._ra.pop(m.key, None)
                if ra is not None:
                    ra.reset()
                m.close()

    def _walk_early(self, boot_copy: str, mountpoint: str, info: ImageInfo) -> None:
        """Start the bootstrap walk of file-aware readahead (_learn_runs) at once, beside
        the rest of the mount: most of a mount is waiting (the registry, mount(2)), and
        a program's start reads before a walk begun after it ends (the ML cold start:
        2-3 s after the mount on a loaded machine, 40-65 of its misses before it). Only
        the C walk (the GIL released); its Python part waits for the mount to be made
        (_learn_runs). Not for an image with a prefetch table: its start reads the
        table's stream, and the walk waits for that (_after_mount)."""
        if not self.readahead or info.prefetch:
            return
        fut: Future = Future()

        def walk() -> None:
            try:
                found = walk_file_runs(boot_copy, pause_every=64)
            except BaseException as e:  # noqa: BLE001 - delivered to _learn_runs
                fut.set_exception(e)
            else:
                fut.set_result(found)

        self._walks[(boot_copy, mountpoint)] = fut
        _thread.start_new_thread(walk, ())

    def _learn_runs(self, img: Image, mgrs: list[BlobManager]) -> None:
        # the bootstrap walk begun with the mount (_walk_early), or else (a restored
        # mount) now; grouped and applied once the mount is done (the managers are the
        # mount's)
        fut = self._walks.pop((img.bootstrap, img.mountpoint), None)
        try:
            lists = fut.result() if fut is not None else \
                walk_file_runs(img.bootstrap, pause_every=64)
            paths, found = lists()
            runs, cold, modules = _group_runs(paths, found)
            libs, groups = libchase.library_starts(paths, found) if libchase.ENABLED \
                else ({}, {})
            # ends with the image (img.stop: _unregister, the daemon's shutdown)
            chase = libchase.LibraryChase(self, img, list(img.blob_keys), self.readahead,
                                          img.stop, groups)
            img.chase = chase
            for i, m in enumerate(mgrs):
                ra = self._ra.get(m.key)
                if ra is not None:      # before the runs: a module's miss is told apart
                    ra.add_modules(modules.get(i, ()))
                    ra.add_libraries(libs.get(i, {}), chase.on_library)
                if runs.get(i):
                    m.add_file_runs(runs[i], cold=cold.get(i, ()))
        except Exception as e:  # noqa: BLE001 - readahead is an optimisation
            log.warning("%s: no file-aware readahead: %s", img.mountpoint, e)
            return
        log.debug("%s: file runs known for readahead", img.mountpoint)

    def _unregister(self, img: Image) -> None:
        """Forget `img`; release (unmark, close) every blob no other image uses. The
        image's workers are stopped first (img.stop) and its library chase waited for,
        briefly: none of them reads a blob or the bootstrap after their release."""
        img.stop.set()
        chase = img.chase
        if chase is not None and not chase.close():
            log.warning("%s: library chase still running after its release (ends on its "
                        "own)", img.mountpoint)
        # A blob's release (out of Daemon.blobs, then the front end's unmark, the close)
        # ends before a mount opens the blob again, which it does under the same hold
        # (_open_blob): opened in between, the new manager found its cache file still
        # marked under the same key, so the fanotify front end left it unprepared, and
        # the release's unmark then took the mark it needed: the kernel read the file's
        # holes as zeros. Sorted: one order for every thread taking more than one
        with contextlib.ExitStack() as holds:
            for blob_id in sorted({key_blob_id(k) for k in img.blob_keys}):
                holds.enter_context(self._blob_opening.hold(blob_id))
            released = []
            with self._lock:
                if self.images.get(img.mountpoint) is img:
                    del self.images[img.mountpoint]
                if img in self.detached:
                    self.detached.remove(img)
                rebacked = False
                for b in set(img.blob_keys):
                    users = self.blob_users.get(b)
                    if users is None:
                        continue
                    users.discard(img.user)
                    if users:
                        rebacked |= self._backends_of_users(b)
                    if not users:
                        del self.blob_users[b]
                        self.blob_released(b)
                        mgr = self.blobs.get(b)
                        if mgr is not None:
                            # its map file if the mount's after-mount thread has not written
                            # it yet (a quick umount): after the pop below it never will
                            mgr.run_after_mount()
                        mgr = self.blobs.pop(b, None)
                        ra = self._ra.pop(b, None)
                        if ra is not None:
                            ra.reset()
                        if mgr is not None:
                            released.append(mgr)
            if released:
                gc.unfreeze()   # cycles among what the blobs leave are collected again
            for mgr in released:
                try:
                    self.frontend.release_blob(mgr)
                except (FrontendError, OSError) as e:
                    log.warning("blob %s: release failed: %s", mgr.key[:12], e)
                mgr.sync()
                mgr.close()
        if released or rebacked:
            self._drop_unused_backends()

    def _backends_of_users(self, key: str) -> bool:
        """Blob `key`'s backends again those of the images still using it (the caller
        holds the lock): the one that opened it may have gone with its image (its
        repository deleted since), while another image of the blob goes on reading it.
        -> whether a backend was dropped from it."""
        mgr = self.blobs.get(key)
        if mgr is None:
            return False
        bes: list = []
        for i in self.all_images():
            be = self.backends.get(self._backend_key(i.backend_spec, i.options))
            if key in i.blob_keys and be is not None and be not in bes:
                bes.append(be)
        if not bes:
            return False
        before = [mgr.backend, *mgr.alternates]
        if mgr.backend not in bes:
            mgr.backend = bes[0]
        mgr.alternates = [b for b in bes if b is not mgr.backend]
        return any(b not in bes for b in before)

    # -- umount -------------------------------------------------------------------------
    def umount(self, mountpoint: str, lazy: bool = False) -> dict:
        mountpoint = os.path.realpath(mountpoint)
        with self._mountpoints.hold(mountpoint), self._mount_lock:
            img = self.images.get(mountpoint)
            if img is None:
                done = self.umount_unpicked(mountpoint, lazy)
                if done is None:
                    raise NotFoundError(f"{mountpoint}: not mounted by this daemon")
                return done
            if self.frontend.name == "none":
                self._unregister(img)
                self._save_state()
                return {"mountpoint": mountpoint, "unmounted": True, "released": True}
            before = mounts.erofs_instances()
            if self._still_ours(img):
                if not img.instances:   # a mount recorded only as an intent: ask now
                    ours = mounts.erofs_instance_of(img.mountpoint)
                    img.instances = [ours] if ours else []
                self.frontend.umount(img, lazy)
            else:
                log.warning("%s: the image was unmounted behind the daemon's back",
                            mountpoint)
            if not img.instances:
                # superblock not known (the kernel cannot name it, or it was unmounted
                # behind our back): ours is the one that went away, if one did; else
                # keep all that could be it
                gone = before - mounts.erofs_instances()
                img.instances = sorted(gone or self._unclaimed_instances(img))
            in_use = self._superblock_alive(img)
            if in_use:
                self._detach(img)
            else:
                self._unregister(img)
            self._save_state()
        if in_use:
            log.warning("unmounted %s, but the kernel still uses its superblock %s "
                        "(another mount namespace, an overlay, a lazily detached mount or "
                        "open files): its blobs stay served until it lets go", mountpoint,
                        ",".join(img.instances))
        else:
            log.info("unmounted %s", mountpoint)
        return {"mountpoint": mountpoint, "unmounted": True, "released": not in_use}

    def _still_ours(self, img: Image) -> bool:
        """True if our mount is on img.mountpoint and nothing covers it; False if it is
        gone from our namespace; refuses (MountBusyError) if a foreign mount covers it:
        umount2 would remove that one instead."""
        if img.mount_id is None:
            return True     # recorded by an older daemon: unmount by path as it did
        entries = mounts.mountinfo()
        ours = mounts.find_mount(img.mount_id, entries)
        if ours is None or ours.mountpoint != img.mountpoint or ours.fstype != "erofs":
            return False
        top = mounts.top_mount(img.mountpoint, entries)
        if top is not None and top.mount_id != img.mount_id:
            raise MountBusyError(f"{img.mountpoint}: another mount ({top.fstype} "
                                 f"{top.source}, mount id {top.mount_id}) covers the "
                                 f"image; unmount it first")
        return True

    def _unclaimed_instances(self, img: Image) -> set[str]:
        claimed = {i for other in self.all_images() if other is not img
                   for i in other.instances}
        return mounts.erofs_instances() - claimed

    def _superblock_alive(self, img: Image) -> bool:
        live = mounts.erofs_instances()
        return any(i in live for i in img.instances)

    def _detach(self, img: Image) -> None:
        """img left its mount point but the kernel still reads its blobs: keep serving
        them under a detached name until the reaper sees the superblock go."""
        with self._lock:
            if self.images.get(img.mountpoint) is img:
                del self.images[img.mountpoint]
            old = img.user
            img.state, img.mount_id = DETACHED, None
            for b in img.blob_keys:
                users = self.blob_users.setdefault(b, set())
                users.discard(old)
                users.add(img.user)
            self.detached.append(img)

    def _reaper(self) -> None:
        while not self._stop.wait(REAP_INTERVAL):
            if not self.detached:
                continue
            live = mounts.erofs_instances()
            for img in list(self.detached):
                if any(i in live for i in img.instances):
                    continue
                with self._mount_lock:
                    if img not in self.detached:
                        continue
                    self._unregister(img)
                    self._save_state()
                log.info("%s: the kernel released superblock %s; its blobs are released",
                         img.mountpoint, ",".join(img.instances))


_Runs = dict[int, list[tuple[int, int]]]


def _group_runs(paths: list[bytes], found: list) -> tuple[_Runs, _Runs, _Runs]:
    """(runs, cold runs, module runs) by blob index: what file-aware readahead learns from
    the bootstrap walk (storage.image.walk_file_runs, the C core's, ~0.1 s for 50,000
    files; then group_file_runs, Python)."""
    cold: _Runs = {}
    modules: _Runs = {}
    runs = group_file_runs(paths, found, cold=cold, modules=modules)
    return runs, cold, modules


# how long the after-mount work waits for an image's prefetch table to be streamed
STREAM_WAIT = 30.0
