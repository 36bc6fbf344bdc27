"""Eager local mounting of RAFS v6 images (and umount).

`mount_rafs()` expands every blob the bootstrap lists into its uncompressed cache file,
then mounts the bootstrap read-only, nosuid and nodev (unless asked otherwise) with the
kernel's file-backed EROFS mode, one `device=` option per blob in device-table order.
mount(2) and umount2(2) are called through ctypes so no util-linux parsing sits in
between. Kernels without file-backed EROFS mounts (before 6.12) get read-only
auto-clearing loop devices instead.

Cache files and poisoning: a cache file is named by blob id, and a blob id is public: a
bootstrap may name another image's blob and bring a blob of other bytes under that id
(its own blob directory). So a cache file serves a bootstrap only if it was made for the
same chunk map: the blob's chunk-info table with the bootstrap's own chunk digests
(which replace the blob's), every chunk verified against it while expanding. The map's
sha256 is kept in an xattr of the cache file; without it (a file system without user
xattrs) every chunk of an existing cache file is verified again before it is reused. A
cache file that does not fit is replaced by a new one (a new inode, so mounts of the
image it was made for keep their bytes).
"""
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import os
import struct
import time

from erofs_tools.errors import CorruptImageError, InputError, MountError
from erofs_tools.fsutil import atomic_output
from erofs_tools.reader import blob as rblob
from erofs_tools.reader import zran as rzran
from erofs_tools.reader.bootstrap import chunk_pins
from erofs_tools.reader.image import open_image

DEFAULT_CACHE_DIR = "/var/cache/erofs-tools"
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
# what `erofs-tools mount` uses unless told otherwise: a setuid file or a device node in
# an image must not give its user more than the image's owner meant
DEFAULT_FLAGS = MS_RDONLY | MS_NOSUID | MS_NODEV
MAP_XATTR = "user.erofs-tools.chunk-map"
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


def mount_erofs(image, mountpoint, devices=(), flags=DEFAULT_FLAGS, loop=None):
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


def _read_bootstrap(path):
    """[(blob id, BlobEntry, {CI index: ChunkPin})] in device order, through the reader
    (which treats every byte as untrusted)."""
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise InputError(f"cannot read bootstrap {path}: {e.strerror}") from None
    img = open_image(path)
    try:
        if not img.is_rafs:
            raise CorruptImageError(f"bootstrap {path}: not a RAFS v6 bootstrap")
        n = len(img.devices)
        if len(img.blob_entries) != n:
            raise CorruptImageError(f"bootstrap {path}: blob table holds "
                                    f"{len(img.blob_entries)} blobs, device table {n}")
        pins = chunk_pins(img)
        out = []
        for i, entry in enumerate(img.blob_entries):
            blob_id = img.blob_id(i + 1)
            if len(blob_id) != 64 or any(c not in "0123456789abcdef" for c in blob_id) \
                    or entry.blob_index != i:
                raise CorruptImageError(f"bootstrap {path}: blob {i} has an invalid id or index")
            if entry.uncompressed_size % 4096 or entry.uncompressed_size == 0 \
                    or img.devices[i].blocks * 4096 != entry.uncompressed_size:
                raise CorruptImageError(f"bootstrap {path}: blob {i} size does not match "
                                        "its device")
            out.append((blob_id, entry, pins[i]))
        return out
    finally:
        img.close()


def find_blob(blob_dir, blob_id):
    p = os.path.join(blob_dir, blob_id)
    if not os.path.isfile(p):
        raise InputError(f"blob {blob_id} not found in {blob_dir}")
    return p


def blob_chunk_map(blob_path, blob_id, entry, pins):
    """The chunk map this bootstrap needs of the blob: the blob's chunk-info table with
    the bootstrap's digests; CorruptImageError if the blob places a pinned chunk
    elsewhere or a chunk has no digest to verify it with."""
    digests = {k: pin.digest for k, pin in pins.items()}
    if rzran.is_zran_entry(entry):
        # a gzip layer; its index is the meta blob beside it (docs/zran.md), and a pin
        # places a zran chunk by its uncompressed range only
        meta = rzran.open_meta(os.path.dirname(os.path.abspath(blob_path)), entry, blob_id,
                               digests)
        if os.path.getsize(blob_path) != entry.compressed_size:
            raise CorruptImageError(f"blob {blob_id}: layer size differs from the bootstrap's")
    else:
        meta = rblob.open_blob(blob_path, blob_id=blob_id, entry=entry, digests=digests)
    n = 2 if meta.zran is not None else 4
    for k, pin in pins.items():
        c = meta.chunk_by_index(k)
        if (c.uncompressed_offset, c.uncompressed_size, c.compressed_offset,
                c.compressed_size)[:n] != pin[:n]:
            raise CorruptImageError(f"blob {blob_id}: chunk {k} lies elsewhere in the blob "
                                    "than the bootstrap's chunk table says")
    meta = meta.with_digests({k: pin.digest for k, pin in pins.items()})
    if any(c.digest is None for c in meta.chunks):
        raise CorruptImageError(f"blob {blob_id}: chunks without digests cannot be verified")
    if meta.uncompressed_size != entry.uncompressed_size:
        raise CorruptImageError(f"blob {blob_id}: {meta.uncompressed_size} bytes "
                                f"uncompressed, the bootstrap says {entry.uncompressed_size}")
    return meta


def _map_tag(meta):
    return hashlib.sha256(meta.to_bytes()).hexdigest().encode()


def _fits(path, meta):
    """True if the cache file at `path` was made for `meta` (xattr), or every chunk in it
    verifies against `meta` (then the xattr is added where the file system allows)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise MountError(f"cannot open cache file {path}: {e.strerror}") from None
    try:
        if os.fstat(fd).st_size != meta.uncompressed_size:
            return False
        tag = _map_tag(meta)
        try:
            if os.getxattr(fd, MAP_XATTR) == tag:
                return True
        except OSError:
            pass
        for c in meta.chunks:
            data = os.pread(fd, c.uncompressed_size, c.uncompressed_offset)
            try:
                rblob.decode_chunk(meta, c._replace(compressed=False,
                                                    compressed_size=c.uncompressed_size), data)
            except CorruptImageError:
                return False
        with contextlib.suppress(OSError):
            os.setxattr(fd, MAP_XATTR, tag)
        return True
    finally:
        os.close(fd)


def expand_blob(blob_path, meta, cache_dir):
    """The cache file of one blob for chunk map `meta` (blob_chunk_map): reused if it
    fits, else written anew beside it, every chunk verified, and renamed into place."""
    dest = os.path.join(cache_dir, meta.blob_id)
    if _fits(dest, meta):
        return dest
    with open(blob_path, "rb") as src, atomic_output(dest, mode=0o644) as out:
        read_at = rblob.file_reader(src)
        fd = out.fileno()
        os.ftruncate(fd, meta.uncompressed_size)
        for c in sorted(meta.chunks, key=lambda c: c.compressed_offset):
            data = rblob.read_chunk(meta, c, read_at)
            view = memoryview(data)
            off = c.uncompressed_offset
            while view:
                n = os.pwrite(fd, view, off)
                view, off = view[n:], off + n
        with contextlib.suppress(OSError):
            os.setxattr(fd, MAP_XATTR, _map_tag(meta))
    return dest


@contextlib.contextmanager
def _cache_lock(cache_dir):
    """Exclusive use of a cache directory from checking its cache files until mount(2)
    has opened them, so that another `erofs-tools mount` (of an image with another chunk
    map for the same blob id) cannot replace a checked file in between."""
    os.makedirs(cache_dir, mode=0o755, exist_ok=True)
    fd = os.open(cache_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)   # no lock file
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _plan(bootstrap, blob_dir):
    """[(blob path, chunk map)] in device order: every input checked before any output."""
    plans = []
    for blob_id, entry, pins in _read_bootstrap(bootstrap):
        path = find_blob(blob_dir, blob_id)
        plans.append((path, blob_chunk_map(path, blob_id, entry, pins)))
    return plans


def prepare_caches(bootstrap, blob_dir, cache_dir=DEFAULT_CACHE_DIR):
    """Expand each blob of `bootstrap` into cache_dir; -> cache file paths in device order."""
    cache_dir = os.fspath(cache_dir)
    plans = _plan(os.fspath(bootstrap), os.fspath(blob_dir))
    if not plans:
        return []
    with _cache_lock(cache_dir):
        return [expand_blob(path, meta, cache_dir) for path, meta in plans]


def mount_rafs(bootstrap, mountpoint, blob_dir, cache_dir=DEFAULT_CACHE_DIR,
               allow_suid_dev=False):
    """Expand the blobs and mount (nosuid,nodev unless `allow_suid_dev`); -> list of
    cache files used as devices."""
    bootstrap = os.path.abspath(bootstrap)
    if not os.path.isdir(mountpoint):
        raise MountError(f"mount point {mountpoint} is not a directory")
    cache_dir = os.fspath(cache_dir)
    plans = _plan(bootstrap, os.fspath(blob_dir))
    flags = MS_RDONLY if allow_suid_dev else DEFAULT_FLAGS
    with _cache_lock(cache_dir):
        devices = [expand_blob(path, meta, cache_dir) for path, meta in plans]
        mount_erofs(bootstrap, mountpoint, devices, flags=flags)
    return devices


def umount(mountpoint, lazy=False):
    if _lib().umount2(os.fsencode(mountpoint), MNT_DETACH if lazy else 0) != 0:
        e = ctypes.get_errno()
        raise MountError(f"umount {mountpoint}: {os.strerror(e)}")
