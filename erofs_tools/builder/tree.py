"""Directory walk: turns a source tree into nodes of the C builder.

One lstat per entry (os.scandir + DirEntry.stat), listxattr/getxattr, readlink for
symlinks. The tree is walked depth first, each directory's files before its
subdirectories, each directory in name order (as mkfs.erofs places the data, and as
os.walk reads it back; whatever the source fs's readdir order).
Regular file data is not read here (the C core copies it when writing), except
for --xattr-inode-digest: its sha256 is read here, before the data is queued.
Hardlinks are detected by (st_dev, st_ino); the table only keeps inodes with links not
yet seen. Excluded paths are matched against the path relative to SOURCE (no leading
'/'): --exclude-path exactly, --exclude-regex with re.search.
"""
import errno
import os
import stat
from collections.abc import Callable, Iterable

from erofs_tools._native import NativeBuilder
from erofs_tools._native_walk import native_walk
from erofs_tools.builder.options import MkfsOptions
from erofs_tools.builder.whiteout import OPAQUE_XATTR, ORIGIN_XATTR
from erofs_tools.errors import ErofsToolsError, InputError, shown_path  # noqa: F401 (re-exported)
from erofs_tools.format.erofs import encode_long_prefix

# the C walk when the options allow (tests turn it off to reach the Python walk)
NATIVE_WALK = True

_S_IFMT = 0o170000
_OPAQUE_NAME = OPAQUE_XATTR.decode()     # as os.listxattr names it
_S_IFDIR = stat.S_IFDIR
_S_IFREG = stat.S_IFREG
_S_IFLNK = stat.S_IFLNK
_S_IFCHR = stat.S_IFCHR
_S_IFBLK = stat.S_IFBLK


def _oserr(e: OSError, path: str | bytes) -> InputError:
    return InputError(f"{shown_path(path)}: {e.strerror or e}")


def _with_path(e: ErofsToolsError, path: str | bytes) -> ErofsToolsError:
    """Re-raise an ErofsToolsError from the C core with the offending path in front."""
    return type(e)(f"{shown_path(path)}: {e}")


def file_sha256(path: bytes, offset: int, size: int) -> bytes:
    """The sha256 of `size` bytes of the file `path` from `offset` (a source file, or a
    file's data inside a tar or its spool); one line if it is shorter or unreadable."""
    import hashlib  # here: plain mkfs never needs it (3 ms of startup)
    h = hashlib.sha256()
    try:
        with open(path, "rb", buffering=0) as f:
            if offset:
                f.seek(offset)
            left = size
            while left:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    raise InputError(f"{shown_path(path)}: file shrank while reading")
                h.update(chunk)
                left -= len(chunk)
    except OSError as e:
        raise _oserr(e, path) from None
    return h.digest()


class TreeWalker:
    """Feed the tree under `source` into a NativeBuilder according to MkfsOptions.

    Without per-entry choices (excludes, skip, compress hints, digests) and unless
    `native` is False, the walk runs in the C core (csrc/walk.c: the same nodes in the
    same order, without a Python object per entry); subclasses that override the
    per-entry methods always get this Python walk."""

    def __init__(self, builder: NativeBuilder, options: MkfsOptions,
                 skip: Iterable[str | bytes] = (),
                 on_entry: Callable[[int, int], object] | None = None,
                 native: bool = True) -> None:
        self.native = native
        self.b = builder
        self.o = options
        self.skip = {os.fsencode(s) for s in skip}   # absolute paths never to add
        self.on_entry = on_entry
        # entries of each directory in name order: the walk order is then the same on
        # every filesystem (pack streams regular files to its chunker in walk order)
        self.entries = 0
        self.bytes = 0
        self.mtimes = options.inode_mtimes()
        self.fixed_mtime = self.mtimes.time if self.mtimes is not None else None
        self.clamp_mtime = self.mtimes is not None and self.mtimes.clamp
        self.whiteouts = options.whiteouts
        self.force_uid = 0 if options.all_root else options.force_uid
        self.force_gid = 0 if options.all_root else options.force_gid
        self.uid_offset = options.uid_offset
        self.gid_offset = options.gid_offset
        self.hard_dereference = options.hard_dereference
        self.xattrs = options.xattrs       # -x -1: the source's xattrs left out
        self.excl_paths = set(options.exclude_paths)
        self.excl_regex = list(options.exclude_regex)
        self.hints = list(options.compress_hints) if options.compress else []
        self.digest = options.inode_digest is not None
        self.digest_name = options.inode_digest
        self.digest_id = set_long_prefixes(builder, options)

    def _excluded(self, rel: bytes) -> bool:
        if rel in self.excl_paths:
            return True
        for rx in self.excl_regex:
            if rx.search(rel):
                return True
        return False

    def _add(self, path: bytes, st: os.stat_result, rel: bytes = b"") -> int:
        """Add one inode for `path` (lstat result st, `rel` relative to the source);
        -> node id."""
        b = self.b
        mode = st.st_mode
        fmt = mode & _S_IFMT
        uid = (st.st_uid if self.force_uid is None else self.force_uid) + self.uid_offset
        gid = (st.st_gid if self.force_gid is None else self.force_gid) + self.gid_offset
        if uid >= 1 << 32 or gid >= 1 << 32:
            # mkfs.erofs reports it and goes on with the wrapped id: an error here
            what, v = ("uid", uid) if uid >= 1 << 32 else ("gid", gid)
            raise InputError(f"{shown_path(path)}: {what} overflows with the offset ({v})")
        sec, nsec = divmod(st.st_mtime_ns, 1_000_000_000)
        if self.mtimes is not None:
            sec, nsec = self.mtimes.apply(sec, nsec)
        size = 0
        target = None
        maj = mnr = 0
        if fmt == _S_IFREG:
            size = st.st_size
        elif fmt == _S_IFLNK:
            try:
                target = os.readlink(path)
            except OSError as e:
                raise _oserr(e, path) from None
            size = len(target)
        elif fmt == _S_IFCHR or fmt == _S_IFBLK:
            maj, mnr = os.major(st.st_rdev), os.minor(st.st_rdev)
        try:
            node = b.add_node(mode, uid, gid, sec, nsec, size, maj, mnr)
            if self.xattrs:                  # before the data (stream mode needs them first)
                self._xattrs(path, node, self.digest and fmt == _S_IFREG and size > 0)
            if self.digest and fmt == _S_IFREG and size:
                b.add_xattr_long(node, self.digest_id, b"",
                                 b"sha256:" + self._sha256(path, size))
            if fmt == _S_IFREG and size:
                for h in self.hints:      # --compress-hints: the first match
                    if h.regex.search(rel):
                        b.set_zhint(node, h.pcluster_size, h.algorithm)
                        break
                b.set_file(node, path, 0, st.st_blocks * 512 < size)
            elif target is not None:
                b.set_bytes(node, target)
        except ErofsToolsError as e:
            raise _with_path(e, path) from None
        self.entries += 1
        self.bytes += size
        return node

    @staticmethod
    def _sha256(path: bytes, size: int) -> bytes:
        """The content fingerprint of a regular file (its first `size` bytes, the size
        the inode records: the C core copies no more than that)."""
        return file_sha256(path, 0, size)

    def _xattrs(self, path: bytes, node: int, fingerprinted: bool = False) -> None:
        """The source's xattrs of `path` (fingerprinted: not the one of the fingerprint's
        name, which the content's digest replaces; mkfs.erofs 1.9.4 writes both, the
        digest first, which the kernel finds first)."""
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return
            raise _oserr(e, path) from None
        if not names:
            return
        for name in sorted(names):
            if self.whiteouts == "strip" and name == _OPAQUE_NAME:
                continue
            if fingerprinted and os.fsencode(name) == self.digest_name:
                continue
            try:
                value = os.getxattr(path, name, follow_symlinks=False)
            except OSError as e:
                if e.errno == errno.ENODATA:
                    continue       # removed meanwhile
                raise _oserr(e, path) from None
            self.b.add_xattr(node, os.fsencode(name), value)

    def walk(self, source: str | bytes) -> int:
        """Walk `source` (a directory); -> root node id."""
        src = os.fsencode(source)
        if (self.native and NATIVE_WALK and type(self) is TreeWalker and not self.skip and not self.hints
                and not self.digest and not self.excl_paths and not self.excl_regex):
            on_entry = self.on_entry

            def counted(entries: int, nbytes: int) -> None:
                self.entries, self.bytes = entries, nbytes
                if on_entry is not None:
                    on_entry(entries, nbytes)
            return native_walk(self.b, src, fixed_mtime=self.fixed_mtime,
                               force_uid=self.force_uid, force_gid=self.force_gid,
                               on_entry=counted, clamp_mtime=self.clamp_mtime,
                               whiteouts=self.whiteouts, uid_offset=self.uid_offset,
                               gid_offset=self.gid_offset,
                               hard_dereference=self.hard_dereference,
                               no_xattrs=not self.xattrs)
        try:
            st = os.lstat(src)
        except OSError as e:
            raise _oserr(e, src) from None
        if not stat.S_ISDIR(st.st_mode):
            raise InputError(f"{os.fsdecode(src)}: not a directory")
        root = self._add(src, st)
        self.b.set_root(root)
        links: dict[tuple[int, int], list[int]] = {}   # (dev, ino) -> [node, links still expected]
        # depth first: each directory's files, then its subdirectories in name order
        # (as os.walk reads them and mkfs.erofs places the data): a stack, the
        # subdirectories a directory found reversed once it is done
        pending = [(src, b"", root)]
        add_child = self.b.add_child
        excluding = bool(self.excl_paths or self.excl_regex)
        skip = self.skip
        on_entry = self.on_entry
        while pending:
            dpath, drel, dnode = pending.pop()
            mark = len(pending)
            try:
                # in name order, not readdir's: the data (and -Efragments' packed
                # inode) then follow the names as in mkfs.erofs, whatever the source fs
                # (names only kept: DirEntry objects for man1's 18k entries, all alive
                # until it is done, were the walk's peak at 4 MiB)
                names, bare = _list_dir(dpath)
            except OSError as e:
                raise _oserr(e, dpath) from None
            sep = b"" if dpath.endswith(b"/") else b"/"
            if excluding or skip:
                names = [n for n in names if dpath + sep + n not in skip and not (
                    excluding and self._excluded(drel + b"/" + n if drel else n))]
            if self.whiteouts != "keep" and bare:
                names, bare = self._whiteouts(dpath, sep, dnode, names, bare)
            # stream mode: the directory's inode and blocks go before its files'
            self.b.dir_names(dnode, names)
            if bare and len(bare) < len(names):
                # symlinks, devices, fifos, sockets first (as csrc/walk.c's bare_first):
                # their records then sit right after the directory's, where a listing
                # that follows symlinks (os.walk, ls -l) reads them
                names = [n for n in names if n in bare] + [n for n in names if n not in bare]
            for name in names:
                path = dpath + sep + name
                rel = drel + b"/" + name if drel else name
                try:
                    st = os.lstat(path)
                except OSError as e:
                    raise _oserr(e, path) from None
                mode = st.st_mode
                if ((mode & _S_IFMT) != _S_IFDIR and st.st_nlink > 1
                        and not self.hard_dereference):
                    key = (st.st_dev, st.st_ino)
                    hit = links.get(key)
                    if hit is not None:
                        self._link(dnode, name, hit[0], path)
                        hit[1] -= 1
                        if hit[1] <= 0:
                            del links[key]
                        continue
                    node = self._add(path, st, rel)
                    links[key] = [node, st.st_nlink - 1]
                else:
                    node = self._add(path, st, rel)
                try:
                    add_child(dnode, name, node)
                except ErofsToolsError as e:
                    raise _with_path(e, path) from None
                if (mode & _S_IFMT) == _S_IFDIR:
                    pending.append((path, rel, node))
                if on_entry is not None:
                    on_entry(self.entries, self.bytes)
            pending[mark:] = reversed(pending[mark:])
        return root

    def _whiteouts(self, dpath: bytes, sep: bytes, dnode: int, names: list[bytes],
                   bare: set[bytes]) -> tuple[list[bytes], set[bytes]]:
        """A directory's overlayfs whiteouts (char 0:0): left out (--ovlfs-strip), or the
        directory marked trusted.overlay.origin="" unless the source has it (as
        mkfs.erofs 1.9 and csrc/walk.c). Before dir_names: they size its record."""
        found = set()
        for n in bare:
            try:
                st = os.lstat(dpath + sep + n)
            except OSError:
                continue                  # (the walk reports it)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                found.add(n)
        if not found:
            return names, bare
        if self.whiteouts == "strip":
            return [n for n in names if n not in found], bare - found
        try:
            if not self.xattrs:
                raise OSError         # (the source's own is not copied)
            os.getxattr(dpath, ORIGIN_XATTR, follow_symlinks=False)
        except OSError:
            try:
                self.b.add_xattr(dnode, ORIGIN_XATTR, b"")
            except ErofsToolsError as e:
                raise _with_path(e, dpath) from None
        return names, bare

    def _link(self, dnode: int, name: bytes, node: int, path: bytes) -> None:
        try:
            self.b.add_child(dnode, name, node)
        except ErofsToolsError as e:
            raise _with_path(e, path) from None


def set_long_prefixes(builder: NativeBuilder, options: MkfsOptions) -> int:
    """The long xattr name prefixes: those of --xattr-prefix (xattrs starting with one
    are stored with the rest of their name after it, as mkfs.erofs) and the content
    fingerprints' (--xattr-inode-digest) where the command line had it (or last) -> its
    id (-1: none)."""
    prefixes = list(options.xattr_prefixes)
    digest_id = -1
    if options.inode_digest is not None:
        # one long prefix, the whole name; each fingerprint is stored with an empty
        # suffix after it, as erofs-utils 1.9 writes them
        pos = options.inode_digest_pos
        digest_id = len(prefixes) if pos is None else min(max(pos, 0), len(prefixes))
        prefixes.insert(digest_id, options.inode_digest)
    if not prefixes:
        return -1
    # with -E fragments the C core puts the table at the packed inode's start, as
    # mkfs.erofs 1.9 does (every kernel since 6.4 reads it there then), else after the
    # superblock (PLAIN_XATTR_PFX)
    table = b"".join(encode_long_prefix(p)[1] for p in prefixes)
    builder.set_xattr_prefixes(table, len(prefixes), ishare_id=digest_id)
    return digest_id


def _list_dir(dpath: bytes) -> tuple[list[bytes], set[bytes]]:
    """A directory's names sorted, and those neither a directory nor a regular file (by
    d_type; lstat where the fs has none). The DirEntry objects are not kept: one per
    entry of a big directory, all alive until it is done, was the walk's peak."""
    names: list[bytes] = []
    bare: set[bytes] = set()
    with os.scandir(dpath) as it:
        for e in it:
            names.append(e.name)
            if not e.is_dir(follow_symlinks=False) and not e.is_file(follow_symlinks=False):
                bare.add(e.name)
    names.sort()
    return names, bare
