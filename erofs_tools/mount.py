"""Eager local mounting of RAFS v6 images (and umount).

`mount_rafs()` expands every blob the bootstrap lists into its uncompressed cache file
(builder.cache), then mounts the bootstrap read-only with the kernel's file-backed EROFS
mode, one `device=` option per blob in device-table order. mount(2) and umount2(2) are
called through ctypes so no util-linux parsing sits in between.
"""
import ctypes
import ctypes.util
import errno
import os

from erofs_tools.builder.cache import expand_blob, find_blob
from erofs_tools.builder.chunk_dict import BootstrapTables
from erofs_tools.errors import MountError

DEFAULT_CACHE_DIR = "/var/cache/erofs-tools"
MS_RDONLY = 0x1
MS_NODEV = 0x4
MNT_DETACH = 0x2

_libc = None


def _lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                ctypes.c_ulong, ctypes.c_char_p)
        _libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
    return _libc


def sys_mount(source, target, fstype, flags, data):
    if _lib().mount(os.fsencode(source), os.fsencode(target), fstype.encode(), flags,
                    data.encode() if data else None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def prepare_caches(bootstrap, blob_dir, cache_dir=DEFAULT_CACHE_DIR, tables=None):
    """Expand each blob of `bootstrap` into cache_dir; -> cache file paths in device order."""
    t = tables or BootstrapTables.read(bootstrap)
    paths = []
    for i, info in enumerate(t.blobs):
        src = find_blob(blob_dir, info.blob_id)
        paths.append(expand_blob(src, info, cache_dir, t.chunk_digests(i)))
    return paths


def mount_rafs(bootstrap, mountpoint, blob_dir, cache_dir=DEFAULT_CACHE_DIR):
    """Expand the blobs and mount; -> list of cache files used as devices."""
    bootstrap = os.path.abspath(bootstrap)
    if not os.path.isdir(mountpoint):
        raise MountError(f"mount point {mountpoint} is not a directory")
    t = BootstrapTables.read(bootstrap)
    devices = prepare_caches(bootstrap, blob_dir, cache_dir, t)
    opts = []
    for p in devices:
        p = os.path.abspath(p)
        if "," in p or "=" in p:
            raise MountError(f"cache path {p} contains ',' or '=' and cannot be a device= option")
        opts.append(f"device={p}")
    try:
        sys_mount(bootstrap, mountpoint, "erofs", MS_RDONLY | MS_NODEV, ",".join(opts))
    except OSError as e:
        hint = ""
        if e.errno == errno.ENOTBLK:
            hint = " (kernel lacks file-backed EROFS mounts, 6.12+)"
        elif e.errno == errno.ENODEV:
            hint = " (erofs not available in this kernel)"
        raise MountError(f"mount {bootstrap} on {mountpoint}: {e.strerror}{hint}") from None
    return devices


def umount(mountpoint, lazy=False):
    if _lib().umount2(os.fsencode(mountpoint), MNT_DETACH if lazy else 0) != 0:
        e = ctypes.get_errno()
        raise MountError(f"umount {mountpoint}: {os.strerror(e)}")
