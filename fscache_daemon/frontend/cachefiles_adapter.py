"""The cachefiles front end's adapter: EROFS over fscache, bootstrap and blobs served
through /dev/cachefiles on demand (frontend/cachefiles.py)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from fscache_daemon.errors import MountError, check_unix_socket_path
from fscache_daemon.frontend.base import DaemonView, Frontend, ImageView

if TYPE_CHECKING:   # imported by start(): only a daemon using this front end loads it
    from fscache_daemon.frontend.cachefiles import CachefilesFrontend


class CachefilesAdapter(Frontend):
    """EROFS over fscache: the cachefiles front end asks for the bootstrap (cookie = fsid)
    and blobs (cookie = blob id) through a resolver."""

    name = "cachefiles"

    def __init__(self, cache_dir: str, threads: int, holder_sock: str | None = None):
        self.cache_dir = cache_dir
        self.threads = threads
        self.holder_sock = check_unix_socket_path(
            holder_sock or os.path.join(cache_dir, "cachefiles-holder.sock"), "fd holder socket")
        self.fe: CachefilesFrontend | None = None

    def start(self, daemon: DaemonView) -> None:
        from fscache_daemon.frontend import cachefiles as cf
        self._cf = cf
        self._daemon = daemon
        fe = self.fe = cf.CachefilesFrontend(
            self._resolve, os.path.join(self.cache_dir, "fscache"), threads=self.threads,
            holder_sock=self.holder_sock)
        fe.start()

    def _resolve(self, volume: str, cookie: str):
        d = self._daemon
        # unmounted images whose superblock the kernel still holds are asked for too
        for img in d.all_images():
            if cookie == img.fsid:
                return self._cf.FileSource(img.bootstrap)
        # the volume is the image's fsid or its domain: the cache key (blob id or a
        # variant for a disagreeing chunk table) is the one that image's blob is served by
        key = next((k for img in d.all_images() if volume in (img.fsid, img.domain)
                    for b, k in zip(img.blob_ids, img.blob_keys) if b == cookie), None)
        mgr = d.blobs.get(key) if key is not None else None
        if mgr is None:
            return None

        def read(off, length):
            d.fill(key, off, length)
            return os.pread(mgr.cache._own_fd, length, off)

        return self._cf.CallbackSource(mgr.size, read)

    def mount(self, image: ImageView) -> None:
        if image.domain:
            # images of one domain share the kernel's cookie of a blob id: they cannot be
            # served from two caches (variants of one blob id)
            for other in self._daemon.all_images():
                if other is image or other.domain != image.domain:
                    continue
                mine = dict(zip(image.blob_ids, image.blob_keys))
                for b, k in zip(other.blob_ids, other.blob_keys):
                    if b in mine and mine[b] != k:
                        raise MountError(f"{image.mountpoint}: blob {b[:12]} has another "
                                         f"chunk table in domain {image.domain} (mounted "
                                         f"on {other.mountpoint}); use another domain")
        self._cf.mount_fscache(image.fsid, image.mountpoint, image.domain)
        # EROFS names an fscache-mode superblock's sysfs entry "[domain,]fsid"
        image.instances = [f"{image.domain},{image.fsid}" if image.domain else image.fsid]

    def umount(self, image: ImageView, lazy: bool = False) -> None:
        self._cf.umount(image.mountpoint, lazy)

    def stats(self) -> dict:
        return self.fe.stats.as_dict() if self.fe else {}

    def stop(self) -> None:
        if self.fe is not None:
            self.fe.stop()
