"""The interface between the daemon and a kernel front end, and the no-kernel one."""

from __future__ import annotations

import errno
from concurrent.futures import Executor
from typing import Any, Protocol

from fscache_daemon import mounts
from fscache_daemon.errors import MountBusyError, MountError


# What a front end sees of the daemon and its images (the daemon layer sits above the
# front ends: they know these shapes, not the classes)
class ImageView(Protocol):
    mountpoint: str
    bootstrap: str          # the daemon's copy: the mount source
    blob_ids: list[str]
    blob_keys: list[str]    # per blob, the daemon's cache key (blob id or a variant)
    domain: str | None
    fsid: str
    instances: list[str]    # set by Frontend.mount
    readahead_restore: tuple[str, int] | None


class DaemonView(Protocol):
    blobs: dict[str, Any]   # cache key -> storage.blobcache.BlobManager (mgr.key)
    images: dict[str, Any]  # canonical mount point -> ImageView

    @property               # read-only here: the daemon's may be any Executor subclass
    def pool(self) -> Executor: ...

    def fill(self, key: str, offset: int, length: int) -> None: ...

    def fast_path(self, key: str, offset: int, length: int) -> bool: ...

    def all_images(self) -> list[Any]: ...


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
            raise MountBusyError(f"umount {target}: target is busy (open files or a "
                                 f"process inside); close them, or use --lazy") from None
        raise MountError(f"umount {target}: {e.strerror}") from None


class Frontend:
    """What the daemon needs from a kernel front end.

    start(daemon)          begin serving; call daemon.fill(mgr.key, off, len) (blocking,
                           raises on failure -> EIO for that reader) and may use
                           daemon.fast_path(mgr.key, off, len) -> bool and daemon.pool
    prepare_blob(mgr)      before mounting an image that uses the blob (fanotify: mark the
                           cache file and hand the manager a writer fd)
    blob_complete(mgr, keep_mark)  every chunk of the blob is cached (fanotify: remove
                           the mark, unless keep_mark: readers have chunks still to read
                           for the first time, which access traces must see)
    withhold(mgr, chunk)   readahead marker: let the first access to this chunk reach
    publish(mgr, chunk)    the daemon even once cached (fanotify with the fd holder: keep
                           its filled bits back); publish() ends that
    release_blob(mgr)      no superblock uses the blob any more (the kernel let go of
                           every image naming it, not just their mount points)
    release_unused()       let go of what an earlier daemon left for blobs this one does
                           not serve, once nothing uses it (fanotify: the holder's marks
                           of cache files nobody has open); the names of what went
    mount(image)           mount image.bootstrap on image.mountpoint with its blobs and
                           set image.instances to the names of the EROFS superblock it
                           made (/sys/fs/erofs/<name>; see mounts.erofs_instance_of)
    umount(image, lazy)    unmount it
    stop()                 stop serving; mounts stay (readers of uncached ranges wait for
                           the next daemon)
    """

    name = "none"

    def start(self, daemon: DaemonView) -> None:
        pass

    def prepare_blob(self, mgr) -> None:
        pass

    def blob_complete(self, mgr, keep_mark: bool = False) -> None:
        pass

    def withhold(self, mgr, chunk) -> None:
        pass

    def publish(self, mgr, chunk) -> None:
        pass

    def release_blob(self, mgr) -> None:
        pass

    def release_unused(self) -> list[str]:
        return []

    def mount(self, image: ImageView) -> None:
        pass

    def umount(self, image: ImageView, lazy: bool = False) -> None:
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
