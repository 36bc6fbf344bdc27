"""Extract an image to a directory or a tar stream, with full metadata, safely.

Directory extraction never follows anything from the image: every file is created
relative to a directory fd that we created ourselves (O_NOFOLLOW, O_EXCL), names are
validated by the reader (no '/', no NUL, not '.' or '..'), symlinks are created as
symlinks and never traversed. The tree is built in a temporary directory beside the
target and renamed into place at the end; on any error the temporary tree is removed.
"""
from __future__ import annotations

import errno
import functools
import io
import os
import stat as _stat
import tarfile
import tempfile
from typing import Any

from erofs_tools.errors import (
    CorruptImageError,
    ErofsToolsError,
    ImageChangedError,
    InputError,
    shown_path,
)
from erofs_tools.reader.fsck import MAX_MTIME
from erofs_tools.reader.image import Image
from erofs_tools.reader.inode import check_dots

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _is_root():
    return os.geteuid() == 0


def _set_xattrs(img, ino, target, follow=True, warnings=None, where=None):
    """`where`: a callable giving the entry's path for a warning."""
    for name, value in img.xattrs(ino):
        try:
            os.setxattr(target, name, value, follow_symlinks=follow)
        except OSError as e:
            if warnings is not None:
                shown = _show(where()) if where is not None else "?"
                warnings.append(f"{shown}: cannot set xattr "
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
        try:
            _extract(img, tmp, warnings if warnings is not None else [], Budget(limit))
        except (ErofsToolsError, OSError) as e:
            raise img.changed() or e    # errors from bytes that changed: that change
        # a shrink inside the last page or a rewrite in place faults nothing: the file's
        # size, mtime and ctime, before the tree is committed
        img.check_unchanged()
        if os.path.lexists(target):
            os.rmdir(target)
        os.rename(tmp, target)
        ok = True
    except OSError as e:
        raise InputError(f"{target}: {e.strerror or e}") from None
    finally:
        if not ok:
            remove_tree(tmp)


def remove_tree(path: str) -> None:
    """Remove the directory tree at `path` (our own partial extraction) iteratively,
    one name at a time relative to directory fds: trees deeper than PATH_MAX or than
    the recursion limit go too. Best effort: errors stop it quietly."""
    try:
        fd = os.open(path, O_DIR)
    except OSError:
        return
    names = []
    try:
        while True:
            sub = None
            for e in list(os.scandir(fd)):
                if e.is_dir(follow_symlinks=False):
                    sub = e.name
                    break
                os.unlink(e.name, dir_fd=fd)
            if sub is not None:
                try:        # a directory already given its mode may be 0o000
                    os.chmod(f"/proc/self/fd/{fd}/{sub}", 0o700)
                except OSError:
                    pass
                nfd = os.open(sub, O_DIR, dir_fd=fd)
                os.close(fd)
                fd = nfd
                names.append(sub)
                continue
            if not names:
                break
            pfd = os.open("..", O_DIR, dir_fd=fd)
            os.close(fd)
            fd = pfd
            os.rmdir(names.pop(), dir_fd=fd)
    except OSError:
        pass
    finally:
        os.close(fd)
    try:
        os.rmdir(path)
    except OSError:
        pass


def _mtime_ns(img, ino):
    """The inode's mtime in ns: any time the kernel holds (seconds below 2^63, year 2400
    included; the target file system clamps what it cannot store, as it does for tar)."""
    if ino.mtime_nsec >= 10**9 or ino.mtime > MAX_MTIME:
        raise CorruptImageError(f"{img.name}: inode {ino.nid}: mtime "
                                f"{ino.mtime}.{ino.mtime_nsec:09d} "
                                "out of range")
    return ino.mtime * 10**9 + ino.mtime_nsec


def _show(path: bytes) -> str:
    return shown_path(path, 200)


def _with_path(img, path, e):
    if isinstance(e, ImageChangedError):
        return e                # about the whole file, not one entry
    msg = str(e)
    if msg.startswith(img.name + ": "):
        msg = msg[len(img.name) + 2:]
    return type(e)(f"{img.name}: {_show(path)}: {msg}")


# Directory fds kept open on the way down; deeper trees reopen a parent through '..' of
# its child on the way up (every directory is our own, in a private temporary tree).
FD_WINDOW = 64
# Directories opened in all to reach first links of inodes whose nlink said 1 (~4 s)
MAX_WALKED = 1 << 20


class _Frame:
    """One directory on the current path of the depth-first extraction."""
    __slots__ = ("ino", "key", "ents", "pos", "fd", "name")

    def __init__(self, ino, key, ents, fd, name):
        self.ino = ino
        self.key = key          # index in the directory table
        self.ents = ents        # its entries, without '.' and '..'
        self.pos = 0
        self.fd = fd            # None: closed to bound the open fds
        self.name = name


class _Extraction:
    """Depth-first, iterative extraction relative to directory fds: no recursion, no
    path longer than one name is ever passed to the kernel (trees deeper than
    PATH_MAX work), memory linear in the tree (one name per directory, the entry
    lists of the directories on the current path, one record per hardlinked inode)."""

    def __init__(self, img: Image, tmp: str, warnings: list, budget):
        self.img = img
        self.warnings = warnings
        self.budget = budget
        self.root = _is_root()
        self.root_fd = os.open(tmp, O_DIR)
        self.dirs = [(-1, b"")]     # directory key -> (parent key, name)
        self.links: dict[int, tuple[int, bytes] | None] = {}
        # nid -> (dir key, name) of its 1st link, None once staged (every non-directory:
        # an image's nlink is not trusted to find hardlinks)
        # A file the image says has more links gets one more, by nid, in a flat staging
        # directory beside the tree: its later links cost one link() each, however deep
        # the first one is (reaching it by its path cost its depth: a file 2,000 levels
        # down and 5,000 links at the top took 43 s from a 344 KB image).
        self.stage = tempfile.mkdtemp(prefix=os.path.basename(tmp) + ".links-",
                                      dir=os.path.dirname(tmp))
        self.stage_fd = os.open(self.stage, O_DIR)
        self.walked = 0             # directories opened to reach unannounced first links
        self.frames: list[_Frame] = []

    def _children(self, ino, parent_nid):
        ents = self.img.dirents(ino)
        check_dots(self.img, ino, ents, parent_nid)       # (no '.' under dot-omitted)
        return [d for d in ents if d.name not in (b".", b"..")]

    def path(self, name=None) -> bytes:
        """The image path of the current directory (or of NAME in it): built only for
        messages."""
        parts = [f.name for f in self.frames[1:]]
        if name is not None:
            parts.append(name)
        return b"/" + b"/".join(parts)

    def _dir_fd(self, key):
        """An fd of extracted directory KEY, opened one name at a time from the root."""
        names = []
        while key > 0:
            key, name = self.dirs[key]
            names.append(name)
        self.walked += len(names)
        if self.walked > MAX_WALKED:
            raise self.img._err(f"hard links its inodes' nlink does not announce cost more "
                                f"than {MAX_WALKED} directory lookups (a crafted image?)")
        fd = os.dup(self.root_fd)
        try:
            for name in reversed(names):
                nfd = os.open(name, O_DIR, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def run(self):
        img = self.img
        rino = img.inode(img.root_nid)
        visited = {img.root_nid}
        frames = self.frames
        frames.append(_Frame(rino, 0, self._children(rino, img.root_nid),
                             os.dup(self.root_fd), b""))
        while frames:
            f = frames[-1]
            if f.pos < len(f.ents):
                d = f.ents[f.pos]
                f.pos += 1
                try:
                    ino = img.inode(d.nid)
                    if ino.is_dir():
                        if d.nid in visited:
                            raise img._err(f"directory nid {d.nid} linked more than once "
                                           "(loop or hard-linked directory)")
                        visited.add(d.nid)
                        self._enter(f, d.name, ino)
                    else:
                        self._extract_one(f, d.name, ino)
                except ErofsToolsError as e:
                    raise _with_path(img, self.path(d.name), e) from None
                continue
            # every child done: up to the parent first (needs search permission on f),
            # then the directory's own metadata, mtime last
            frames.pop()
            if frames and frames[-1].fd is None:
                frames[-1].fd = os.open("..", O_DIR, dir_fd=f.fd)
            try:
                # partial binds this frame's name now (the call is synchronous either way)
                self._apply_meta(f.ino, f.fd, functools.partial(self.path, f.name))
                os.utime(f.fd, ns=(_mtime_ns(img, f.ino),) * 2)
            except ErofsToolsError as e:
                raise _with_path(img, self.path(f.name), e) from None
            finally:
                os.close(f.fd)

    def _enter(self, f, name, ino):
        os.mkdir(name, 0o700, dir_fd=f.fd)
        fd = os.open(name, O_DIR, dir_fd=f.fd)
        try:
            ents = self._children(ino, f.ino.nid)
        except BaseException:
            os.close(fd)
            raise
        key = len(self.dirs)
        self.dirs.append((f.key, name))
        self.frames.append(_Frame(ino, key, ents, fd, name))
        if len(self.frames) > FD_WINDOW:
            old = self.frames[-FD_WINDOW - 1]
            if old.fd is not None:
                os.close(old.fd)
                old.fd = None

    def _apply_meta(self, ino, fd, where):
        if self.root:
            try:
                os.fchown(fd, ino.uid, ino.gid)
            except OSError as e:
                self.warnings.append(f"{_show(where())}: chown failed ({e.strerror})")
        os.fchmod(fd, _stat.S_IMODE(ino.mode))
        _set_xattrs(self.img, ino, fd, True, self.warnings, where)

    def _extract_one(self, f, name, ino):
        pfd = f.fd
        nid = ino.nid
        if nid in self.links:
            first = self.links[nid]
            if first is None:
                os.link(str(nid), name, src_dir_fd=self.stage_fd, dst_dir_fd=pfd,
                        follow_symlinks=False)
                return
            sfd = self._dir_fd(first[0])
            try:
                os.link(first[1], name, src_dir_fd=sfd, dst_dir_fd=pfd,
                        follow_symlinks=False)
            finally:
                os.close(sfd)
            self._stage(nid, name, pfd)
            return
        self.links[nid] = (f.key, name)
        self._create(f, name, ino)
        if ino.nlink > 1 and nid in self.links:     # (not a skipped device node)
            self._stage(nid, name, pfd)

    def _stage(self, nid, name, pfd):
        os.link(name, str(nid), src_dir_fd=pfd, dst_dir_fd=self.stage_fd,
                follow_symlinks=False)
        self.links[nid] = None

    def _create(self, f, name, ino):
        img, pfd, root = self.img, f.fd, self.root
        where = lambda: self.path(name)  # noqa: E731
        mode = _stat.S_IMODE(ino.mode)
        if ino.is_reg():
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=pfd)
            try:
                _write_file(img, ino, fd, self.budget)
                self._apply_meta(ino, fd, where)
                os.utime(fd, ns=(_mtime_ns(img, ino),) * 2)
            finally:
                os.close(fd)
        elif ino.is_lnk():
            target = img.readlink(ino)
            os.symlink(target, name, dir_fd=pfd)
            if root:
                os.chown(name, ino.uid, ino.gid, dir_fd=pfd, follow_symlinks=False)
            _set_xattrs(img, ino, f"/proc/self/fd/{pfd}/{os.fsdecode(name)}", False,
                        self.warnings, where)
            os.utime(name, ns=(_mtime_ns(img, ino),) * 2, dir_fd=pfd,
                     follow_symlinks=False)
        else:
            if ino.is_dev():
                if not root:
                    self.warnings.append(f"{_show(where())}: device node skipped (not root)")
                    self.links.pop(ino.nid, None)
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
                _set_xattrs(img, ino, proc, True, self.warnings, where)
                os.utime(proc, ns=(_mtime_ns(img, ino),) * 2)
            finally:
                os.close(fd)

    def close(self):
        for f in self.frames:
            if f.fd is not None:
                os.close(f.fd)
        self.frames.clear()
        os.close(self.root_fd)
        os.close(self.stage_fd)
        remove_tree(self.stage)


def _extract(img: Image, tmp, warnings, budget):
    x = _Extraction(img, tmp, warnings, budget)
    try:
        x.run()
    except OSError as e:
        if e.errno in (errno.EEXIST,):
            raise ErofsToolsError(f"{img.name}: duplicate name while extracting "
                                  f"({e.strerror})") from None
        raise
    finally:
        x.close()


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
    done: dict[int, str] = {}          # nid -> tar name of its first link
    out: Any = _CheckedOut(img, fileobj)     # (a file object to tarfile: write only)
    # an error inside the with block leaves the stream without its end blocks: a
    # consumer sees it cut short, whatever was written
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        try:
            for path, _de, ino in img.walk():
                try:
                    _tar_one(img, tf, path, ino, done, warnings, budget)
                except ErofsToolsError as e:
                    raise _with_path(img, path, e) from None
                # tarfile keeps every TarInfo written (for getmembers); a stream writer
                # never needs them, and a deep tree's names add up quadratically
                tf.members.clear()  # type: ignore[attr-defined]  # (not in the stubs)
        except ErofsToolsError as e:
            raise img.changed() or e from None
    out.flush_checked()         # the last members and the end blocks
    return warnings


class _CheckedOut:
    """The tar stream's bytes held back until the image file was checked unchanged
    since they were read (Image.check_unchanged: size, mtime, ctime, a fault; reader/mapped.py):
    a stream cannot be taken back, and a shrink inside a page or a rewrite in place
    faults nothing. One check per MiB written: per member and data piece it cost 3% of
    a /usr/share image's `unpack --tar` (docs/performance.md, helper run readsafe)."""

    HOLD = 1 << 20

    def __init__(self, img: Image, out) -> None:
        # the pieces themselves, not one buffer: a bytearray grown to 1 MiB and cleared
        # took fresh pages from the kernel every MiB (+0.5 s of system time)
        self.img, self.out, self.size = img, out, 0
        self.held: list[bytes] = []

    def write(self, b) -> int:
        self.held.append(b if type(b) is bytes else bytes(b))
        self.size += len(b)
        if self.size >= self.HOLD:
            self.flush_checked()
        return len(b)

    def flush_checked(self) -> None:
        self.img.check_unchanged()
        self.out.writelines(self.held)
        self.held.clear()
        self.size = 0


def _tar_one(img, tf, path, ino, done, warnings, budget):
    rel = path.lstrip(b"/")
    name = os.fsdecode(rel) if rel else "."
    ti = tarfile.TarInfo(name)
    ti.mode = _stat.S_IMODE(ino.mode)
    ti.uid, ti.gid = ino.uid, ino.gid
    ti.uname = ti.gname = ""
    ns = _mtime_ns(img, ino)
    ti.mtime = ino.mtime
    # (before 1970 too: -1.5 s is mtime -2, nsec 500000000)
    pax = {"mtime": f"{'-' if ns < 0 else ''}{abs(ns) // 10**9}.{abs(ns) % 10**9:09d}"}
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
    if not ino.is_dir() and ino.nlink > 1:     # names of deep trees are long: only
        done.setdefault(ino.nid, name)           # what a later hardlink can name
    ti.pax_headers = pax
    tf.addfile(ti, fobj)
