"""Eager local mounting of RAFS v6 images (and umount).

`mount_rafs()` expands every blob the bootstrap lists into its uncompressed cache file
(builder.cache), then mounts the bootstrap read-only with the kernel's file-backed EROFS
mode, one `device=` option per blob in device-table order. mount(2) and umount2(2) are
called through ctypes so no util-linux parsing sits in between. Kernels without
file-backed EROFS mounts (before 6.12) get read-only auto-clearing loop devices instead.
"""
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct
import time

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


LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
# struct loop_config: u32 fd, u32 block_size, struct loop_info64 (232 bytes), u64[8].
# In loop_info64, lo_flags is the u32 at offset 52.
_LOOP_CONFIG_SIZE = 304
_LO_FLAGS_OFFSET = 8 + 52


def attach_loop(path):
    """A read-only loop device over `path` that detaches itself when its last user goes.

    -> (device path, fd). Keep the fd open until the mount holds the device, then close
    it; from then on the mount's reference alone keeps the device (LO_FLAGS_AUTOCLEAR).
    """
    backing = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        os.close(backing)
        raise MountError(f"no loop devices for {path}: {e.strerror}") from None
    try:
        for _ in range(16):  # another process may take the free device first
            n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            dev = f"/dev/loop{n}"
            fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
            cfg = bytearray(_LOOP_CONFIG_SIZE)
            struct.pack_into("<II", cfg, 0, backing, 0)
            struct.pack_into("<I", cfg, _LO_FLAGS_OFFSET,
                             LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR)
            try:
                fcntl.ioctl(fd, LOOP_CONFIGURE, bytes(cfg))
                return dev, fd
            except OSError as e:
                os.close(fd)
                if e.errno != errno.EBUSY:
                    raise MountError(f"loop device for {path}: {e.strerror}") from None
                time.sleep(0.01)
        raise MountError(f"loop device for {path}: every free device was taken")
    finally:
        os.close(ctl)
        os.close(backing)


def _device_options(paths):
    opts = []
    for p in paths:
        if "," in p or "=" in p:
            raise MountError(f"cache path {p} contains ',' or '=' and cannot be a device= option")
        opts.append(f"device={p}")
    return ",".join(opts)


def mount_erofs(image, mountpoint, devices=(), flags=MS_RDONLY | MS_NODEV, loop=None):
    """mount(2) an EROFS image file read-only with extra devices, file-backed or on loops.

    loop=None tries a file-backed mount first and falls back to loop devices where the
    kernel has none (ENOTBLK); loop=True goes straight to loop devices.
    """
    image = os.path.abspath(image)
    devices = [os.path.abspath(p) for p in devices]
    if not loop:
        try:
            sys_mount(image, mountpoint, "erofs", flags, _device_options(devices))
            return
        except OSError as e:
            if e.errno != errno.ENOTBLK:
                hint = " (erofs not available in this kernel)" if e.errno == errno.ENODEV else ""
                raise MountError(f"mount {image} on {mountpoint}: {e.strerror}{hint}") from None
    # No file-backed mounts (kernel < 6.12): put every file on a loop device.
    with contextlib.ExitStack() as stack:
        loops = []
        for p in [image, *devices]:
            dev, fd = attach_loop(p)
            stack.callback(os.close, fd)
            loops.append(dev)
        try:
            sys_mount(loops[0], mountpoint, "erofs", flags, _device_options(loops[1:]))
        except OSError as e:
            raise MountError(f"mount {image} on {mountpoint} (loop {loops[0]}): "
                             f"{e.strerror}") from None


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
    mount_erofs(bootstrap, mountpoint, devices)
    return devices


def umount(mountpoint, lazy=False):
    if _lib().umount2(os.fsencode(mountpoint), MNT_DETACH if lazy else 0) != 0:
        e = ctypes.get_errno()
        raise MountError(f"umount {mountpoint}: {os.strerror(e)}")
