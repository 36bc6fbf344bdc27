"""File-system helpers shared by every layer: alignment and atomic, race-free output files.

Bottom layer (beside errors.py): imports nothing from erofs_tools but errors. Every tool
and the daemon write their outputs through `atomic_output` so that a failure, a signal or
a planted symlink never leaves a half-written file at the final name nor writes through
a name an attacker controls: the temporary file is created with O_EXCL|O_NOFOLLOW in the
target's own directory (so the final rename stays on one file system), fsynced, renamed
over the target and the directory fsynced.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

__all__ = ["round_up", "create_exclusive", "atomic_output", "atomic_write_bytes", "fsync_dir",
           "refuse_special", "is_block_device", "ImageTarget", "image_output",
           "invalidate_old_image", "open_device"]


def round_up(n: int, a: int) -> int:
    """n rounded up to a multiple of a (a > 0, not necessarily a power of two)."""
    return -(-n // a) * a


def fsync_dir(path: str) -> None:
    """fsync a directory so a rename or unlink in it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_exclusive(directory: str, prefix: str, suffix: str = ".tmp",
                     mode: int = 0o600) -> tuple[int, str]:
    """A new file in `directory` that did not exist before (O_EXCL|O_NOFOLLOW): (fd, path).

    The name is random, so nobody can plant a symlink there in advance; O_EXCL makes the
    open fail rather than follow one that appears anyway.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        # os.urandom, not secrets: importing secrets costs every tool ~4 ms and memory
        path = os.path.join(directory, f"{prefix}{os.urandom(6).hex()}{suffix}")
        try:
            return os.open(path, flags, mode), path
        except FileExistsError:
            continue
        except OSError as e:
            # one line for the programs, not a traceback (a missing directory, /proc)
            from erofs_tools.errors import CreateFileError
            raise CreateFileError(e.errno or 0, f"{directory}: cannot create a file there: "
                                           f"{e.strerror}") from None
    raise FileExistsError(f"{directory}: could not create a temporary file")


_SPECIAL = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
            (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def _special_kind(path: str) -> str | None:
    """What `path` is if it exists and is neither a regular file nor a directory (the
    name followed, as open(2) follows it), else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return next((what for test, what in _SPECIAL if test(mode)), None)


def is_block_device(path: str) -> bool:
    """`path` names (through symlinks) an existing block device."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def refuse_special(path: str, what: str = "", block_ok: bool = False) -> None:
    """One line (InputError) if `path` is an existing device, FIFO or socket: an output
    that atomic_output would refuse, checked before the work rather than after it
    (block_ok: an image written to a block device by image_output)."""
    special = _special_kind(path)
    if special is not None and not (block_ok and special == "a block device"):
        from erofs_tools.errors import InputError
        raise InputError(f"{what or path}: is {special}, not a file: give a file name "
                         + ("or a block device" if block_ok else
                            "(an image is written to a regular file)"))


def check_new_output(path: str, what: str) -> None:
    """One line (InputError) before any work if an extra output written at the end (a
    zinfo, a VMDK descriptor) could not be: a directory, a device or FIFO, a missing
    parent directory. `what`: how the user named it (e.g. "--gzinfo=FILE")."""
    from erofs_tools.errors import InputError
    if os.path.isdir(path):
        raise InputError(f"{what}: is a directory")
    refuse_special(path, what)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InputError(f"{what}: directory {parent} does not exist")


@contextlib.contextmanager
def atomic_output(path: str, mode: int = 0o644, fsync: bool = True,
                  unlink_first: bool = False, stream: bool = False) -> Iterator[BinaryIO]:
    """Write `path` atomically: yields a binary file open on a fresh temporary file beside
    it; on normal exit it is flushed, fsynced, given `mode` and renamed over `path`; on an
    exception it is removed and `path` is left as it was.

    An existing `path` that is a device, a FIFO or a socket is never replaced (renaming a
    file over /dev/null, as root, broke the machine's /dev/null): an output written front
    to back (`stream`: a tar) is written into it in place, any other is refused with one
    line (an image is written with seeks and truncation that a device does not take).

    unlink_first (for big outputs written without fsync): an existing `path` is unlinked
    just before the rename, so the rename does not replace a file. ext4 (auto_da_alloc)
    starts writeback of all of a file's dirty pages when it is renamed over another one,
    which cost mkfs a third of its time on /usr/share. The price: for the instant between
    the two calls `path` does not exist (never a partial file)."""
    special = _special_kind(path)
    if special is not None:
        if not stream:
            refuse_special(path)
        with open(path, "wb") as f:
            yield f
        return
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    fd, tmp = create_exclusive(directory, f".{base}.", ".tmp")
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
            os.fchmod(f.fileno(), mode)
        if unlink_first:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(path)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(directory)


def atomic_write_bytes(path: str, data: bytes, mode: int = 0o644, fsync: bool = True,
                       stream: bool = False) -> None:
    """Replace `path` with `data` atomically (see atomic_output)."""
    with atomic_output(path, mode=mode, fsync=fsync, stream=stream) as f:
        f.write(data)


@dataclass
class ImageTarget:
    """Where image_output writes: `file` with the image at byte `base` of it; `device`:
    a block device written in place, with `limit` bytes from base."""
    file: BinaryIO
    base: int = 0
    device: bool = False
    limit: int = 0


_ZEROS = bytes(4096)


@contextlib.contextmanager
def image_output(path: str, mode: int = 0o644, offset: int = 0,
                 unlink_first: bool = True) -> Iterator[ImageTarget]:
    """An image output (mkfs, mkfs --tar): the image is written at `offset` of `path`.

    A regular file (or a new name) is written atomically (atomic_output, no fsync, as
    mkfs.erofs): with an offset, its first `offset` bytes are copied into the new file
    (zeros where it was shorter or did not exist). A block device is written in place,
    as mkfs.erofs does: opened O_EXCL (refused with one line when mounted or held), its
    first block at `offset` zeroed and flushed before anything else (a device written
    halfway then holds no image rather than an old one with new blocks; the builder
    writes the superblock last, after a flush), fsynced at the end. The caller checks
    that the image fits in `limit` and says the device was partly written on failure."""
    if not is_block_device(path):
        with atomic_output(path, mode=mode, fsync=False, unlink_first=unlink_first) as f:
            if offset:
                _copy_prefix(path, f.fileno(), offset)
            yield ImageTarget(f, offset)
        return
    from erofs_tools.errors import InputError
    with os.fdopen(open_device(path), "r+b", buffering=0) as f:
        size = os.lseek(f.fileno(), 0, os.SEEK_END)
        if offset + len(_ZEROS) > size:
            raise InputError(f"{path}: the device holds {size} bytes, too few for an image "
                             f"at offset {offset}: nothing written")
        yield ImageTarget(f, offset, True, size - offset)
        try:
            os.fsync(f.fileno())
        except OSError as e:
            raise InputError(f"{path}: flushing the device: {e.strerror} (it may hold a "
                             "partly written image)") from None


def open_device(path: str) -> int:
    """A block device opened for writing, exclusively (O_EXCL: EBUSY when it is mounted
    or held): the fd, or one line (InputError) saying nothing was written."""
    try:
        return os.open(path, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        from erofs_tools.errors import InputError
        why = (" (mounted, or held by another user of the device)" if e.errno == errno.EBUSY
               else "")
        raise InputError(f"{path}: {e.strerror}{why}: nothing written") from None


def invalidate_old_image(target: ImageTarget) -> None:
    """A device: zero the block that holds the superblock and flush it, before the image
    is written (see image_output)."""
    os.pwrite(target.file.fileno(), _ZEROS, target.base)
    os.fsync(target.file.fileno())


def _copy_prefix(path: str, out: int, n: int) -> None:
    """The first n bytes of `path` (as far as it has them) into `out`, which then has n."""
    try:
        src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        src = -1
    try:
        done = 0
        while src >= 0 and done < n:
            try:
                got = os.copy_file_range(src, out, n - done, done, done)
            except OSError:
                data = os.pread(src, min(n - done, 1 << 20), done)
                got = os.pwrite(out, data, done) if data else 0
            if not got:
                break
            done += got
        os.ftruncate(out, n)
    finally:
        if src >= 0:
            os.close(src)
