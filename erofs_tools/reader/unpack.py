"""Extract an image to a directory or a tar stream, with full metadata, safely.

Directory extraction never follows anything from the image: every file is created
relative to a directory fd that we created ourselves (O_NOFOLLOW, O_EXCL), names are
validated by the reader (no '/', no NUL, not '.' or '..'), symlinks are created as
symlinks and never traversed. The tree is built in a temporary directory beside the
target and renamed into place at the end; on any error the temporary tree is removed.
"""
from __future__ import annotations

import errno
import io
import os
import shutil
import stat as _stat
import tarfile
import tempfile
from collections import OrderedDict

from erofs_tools.errors import CorruptImageError, ErofsToolsError, InputError
from erofs_tools.reader.image import Image

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _is_root():
    return os.geteuid() == 0


class _DirFds:
    """A small LRU of directory fds by relative path (components are our own dirs)."""

    def __init__(self, root_fd, size=64):
        self.root = root_fd
        self.size = size
        self.fds = OrderedDict()

    def get(self, rel):
        if rel == b"":
            return self.root
        fd = self.fds.get(rel)
        if fd is not None:
            self.fds.move_to_end(rel)
            return fd
        parent, _, name = rel.rpartition(b"/")
        pfd = self.get(parent)
        fd = os.open(name, O_DIR, dir_fd=pfd)
        self.fds[rel] = fd
        while len(self.fds) > self.size:
            _, old = self.fds.popitem(last=False)
            os.close(old)
        return fd

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _set_xattrs(img, ino, target, follow=True, warnings=None, path=b""):
    for name, value in img.xattrs(ino):
        try:
            os.setxattr(target, name, value, follow_symlinks=follow)
        except OSError as e:
            if warnings is not None:
                warnings.append(f"{os.fsdecode(path)}: cannot set xattr "
                                f"{os.fsdecode(name)} ({e.strerror})")


def _write_file(img, ino, fd, budget):
    end = 0
    for off, data, n in img.iter_data(ino):
        if data is None:
            end = off + n
            continue
        budget.take(n)
        os.lseek(fd, off, os.SEEK_SET)
        view = memoryview(data)
        while view:
            w = os.write(fd, view)
            view = view[w:]
        end = off + n
    os.ftruncate(fd, ino.size)
    del end


def unpack_to_dir(img: Image, target, warnings=None, limit=None):
    """Extract the whole image to `target` (must not exist, or be an empty directory).
    `limit` caps the file bytes written (InputError beyond it; holes are free)."""
    target = os.path.abspath(os.fspath(target))
    parent = os.path.dirname(target) or "/"
    if os.path.lexists(target):
        if not os.path.isdir(target) or os.path.islink(target) or os.listdir(target):
            raise InputError(f"{target}: exists and is not an empty directory")
    if not os.path.isdir(parent):
        raise InputError(f"{parent}: no such directory")
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(target) + ".unpack-", dir=parent)
    ok = False
    try:
        _extract(img, tmp, warnings if warnings is not None else [], Budget(limit))
        if os.path.lexists(target):
            os.rmdir(target)
        os.rename(tmp, target)
        ok = True
    except OSError as e:
        raise InputError(f"{target}: {e.strerror or e}") from None
    finally:
        if not ok:
            shutil.rmtree(tmp, ignore_errors=True)


def _apply_meta(img, ino, fd, path, warnings, root):
    if root:
        try:
            os.fchown(fd, ino.uid, ino.gid)
        except OSError as e:
            warnings.append(f"{os.fsdecode(path)}: chown failed ({e.strerror})")
    os.fchmod(fd, _stat.S_IMODE(ino.mode))
    _set_xattrs(img, ino, fd, True, warnings, path)


def _mtime_ns(img, ino):
    if ino.mtime_nsec >= 10**9 or ino.mtime * 10**9 + ino.mtime_nsec >= 1 << 63:
        raise CorruptImageError(f"{img.name}: inode {ino.nid}: mtime {ino.mtime}.{ino.mtime_nsec:09d} "
                                "out of range")
    return ino.mtime * 10**9 + ino.mtime_nsec


def _with_path(img, path, e):
    msg = str(e)
    if msg.startswith(img.name + ": "):
        msg = msg[len(img.name) + 2:]
    return type(e)(f"{img.name}: {os.fsdecode(path)}: {msg}")


def _extract_one(img, path, ino, dfds, root_fd, done, dirs, warnings, root, budget):
    rel = path.lstrip(b"/")
    prel, _, name = rel.rpartition(b"/")
    pfd = dfds.get(prel)
    if not ino.is_dir() and ino.nid in done:
        os.link(done[ino.nid], name, src_dir_fd=root_fd, dst_dir_fd=pfd,
                follow_symlinks=False)
        return
    done.setdefault(ino.nid, rel)
    mode = _stat.S_IMODE(ino.mode)
    if ino.is_dir():
        os.mkdir(name, 0o700, dir_fd=pfd)
        dirs.append((rel, ino))
    elif ino.is_reg():
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600, dir_fd=pfd)
        try:
            _write_file(img, ino, fd, budget)
            _apply_meta(img, ino, fd, path, warnings, root)
            os.utime(fd, ns=(_mtime_ns(img, ino),) * 2)
        finally:
            os.close(fd)
    elif ino.is_lnk():
        target = img.readlink(ino)
        os.symlink(target, name, dir_fd=pfd)
        if root:
            os.chown(name, ino.uid, ino.gid, dir_fd=pfd, follow_symlinks=False)
        _set_xattrs(img, ino, f"/proc/self/fd/{pfd}/{os.fsdecode(name)}", False,
                    warnings, path)
        os.utime(name, ns=(_mtime_ns(img, ino),) * 2, dir_fd=pfd,
                 follow_symlinks=False)
    else:
        if ino.is_dev():
            if not root:
                warnings.append(f"{os.fsdecode(path)}: device node skipped (not root)")
                done.pop(ino.nid, None)
                return
            dev = os.makedev(*ino.rdev)
        else:
            dev = 0
        os.mknod(name, ino.ftype | 0o600, dev, dir_fd=pfd)
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            proc = f"/proc/self/fd/{fd}"
            if root:
                os.chown(proc, ino.uid, ino.gid)
            os.chmod(proc, mode)
            _set_xattrs(img, ino, proc, True, warnings, path)
            os.utime(proc, ns=(_mtime_ns(img, ino),) * 2)
        finally:
            os.close(fd)


def _extract(img: Image, tmp, warnings, budget):
    root = _is_root()
    root_fd = os.open(tmp, O_DIR)
    dfds = _DirFds(root_fd)
    done = {}          # nid -> rel path of the first extracted link
    dirs = []          # (rel, inode) to finish after their children
    try:
        for path, de, ino in img.walk():
            if de is None:
                dirs.append((b"", ino))
                continue
            try:
                _extract_one(img, path, ino, dfds, root_fd, done, dirs, warnings, root, budget)
            except ErofsToolsError as e:
                raise _with_path(img, path, e) from None
        # directories: children first (deepest paths last in walk order -> reverse)
        for rel, ino in reversed(dirs):
            fd = os.open(rel or ".", O_DIR, dir_fd=root_fd) if rel else os.dup(root_fd)
            try:
                _apply_meta(img, ino, fd, b"/" + rel, warnings, root)
                os.utime(fd, ns=(_mtime_ns(img, ino),) * 2)
            finally:
                os.close(fd)
    except OSError as e:
        if e.errno in (errno.EEXIST,):
            raise ErofsToolsError(f"{img.name}: duplicate name while extracting ({e})") from None
        raise
    finally:
        dfds.close()
        os.close(root_fd)


class _DataReader(io.RawIOBase):
    """A file object over an inode's data (holes as zeros) for tarfile."""

    ZERO = bytes(1 << 20)

    def __init__(self, img, ino, budget):
        self.it = img.iter_data(ino)
        self.buf = b""
        self.zeros = 0
        self.budget = budget

    def readable(self):
        return True

    def readinto(self, b):
        while not self.buf and not self.zeros:
            try:
                _off, data, n = next(self.it)
            except StopIteration:
                return 0
            if data is None:
                self.zeros = n
            else:
                self.buf = data
        if self.buf:
            n = min(len(b), len(self.buf))
            b[:n] = self.buf[:n]
            self.buf = self.buf[n:]
        else:
            n = min(len(b), self.zeros, len(self.ZERO))
            b[:n] = self.ZERO[:n]
            self.zeros -= n
        self.budget.take(n)
        return n


class Budget:
    """Caps the bytes an extraction writes (a small image can describe huge files)."""

    def __init__(self, limit=None):
        self.limit = limit
        self.used = 0

    def take(self, n):
        self.used += n
        if self.limit is not None and self.used > self.limit:
            raise InputError(f"extraction exceeds the limit of {self.limit} bytes")


def unpack_to_tar(img: Image, fileobj, warnings=None, limit=None):
    """Write the tree as a PAX tar stream (xattrs as SCHILY.xattr, ns mtimes).
    `limit` caps the file bytes written (InputError beyond it)."""
    warnings = warnings if warnings is not None else []
    budget = Budget(limit)
    done = {}
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        for path, de, ino in img.walk():
            try:
                _tar_one(img, tf, path, ino, done, warnings, budget)
            except ErofsToolsError as e:
                raise _with_path(img, path, e) from None
    return warnings


def _tar_one(img, tf, path, ino, done, warnings, budget):
    rel = path.lstrip(b"/")
    name = os.fsdecode(rel) if rel else "."
    ti = tarfile.TarInfo(name)
    ti.mode = _stat.S_IMODE(ino.mode)
    ti.uid, ti.gid = ino.uid, ino.gid
    ti.uname = ti.gname = ""
    _mtime_ns(img, ino)
    ti.mtime = ino.mtime
    pax = {"mtime": f"{ino.mtime}.{ino.mtime_nsec:09d}"}
    for xn, xv in img.xattrs(ino):
        try:
            key = "SCHILY.xattr." + xn.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"xattr name {xn!r} is not UTF-8 and cannot be stored in a "
                             "tar stream (unpack to a directory instead)") from None
        pax[key] = xv.decode("utf-8", "surrogateescape")
    fobj = None
    if not ino.is_dir() and ino.nid in done:
        ti.type = tarfile.LNKTYPE
        ti.linkname = done[ino.nid]
    elif ino.is_dir():
        ti.type = tarfile.DIRTYPE
    elif ino.is_reg():
        ti.type = tarfile.REGTYPE
        ti.size = ino.size
        fobj = io.BufferedReader(_DataReader(img, ino, budget), 1 << 20)
    elif ino.is_lnk():
        ti.type = tarfile.SYMTYPE
        ti.linkname = os.fsdecode(img.readlink(ino))
    elif ino.is_dev():
        ti.type = tarfile.CHRTYPE if ino.ftype == _stat.S_IFCHR else tarfile.BLKTYPE
        ti.devmajor, ti.devminor = ino.rdev
    elif ino.ftype == _stat.S_IFIFO:
        ti.type = tarfile.FIFOTYPE
    else:
        warnings.append(f"{os.fsdecode(path)}: socket skipped (tar cannot hold it)")
        return
    if not ino.is_dir():
        done.setdefault(ino.nid, name)
    ti.pax_headers = pax
    tf.addfile(ti, fobj)
