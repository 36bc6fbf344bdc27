"""`mkfs --incremental[=data|rvsp|0]`: a new layer laid over the EROFS image at IMAGE.

As mkfs.erofs 1.9.4 builds incrementally: the base image's blocks stay where they are
(its data and inodes are referenced, never copied) and the new layer's data and
metadata are appended after them (builder/incr_write.py lays them out), the superblock
rewritten last. The layer is a directory, or a tar (--tar=f; --tar=i: its files' data
left in the tar, builder/incr_tari.py; --aufs: `.wh.` entries as whiteouts) and is applied as overlayfs stacks an upper layer over a lower one:

- a directory of the layer over a base directory is rewritten: the base entries it does
  not name are kept (their nids), unless the layer's directory is opaque
  (`trusted.overlay.opaque=y`, or `.wh..wh..opq` with --aufs); its metadata and xattrs
  are the layer's (xattrs are not merged, as in mkfs.erofs), but for a directory a tar
  only implies (a parent of its entries, the root without `./`), which keeps the base's;
- any other entry replaces the base entry of its name (a file over a directory drops the
  directory's subtree, a directory over a file is a new directory);
- a whiteout (char 0:0) stays in the image, shadowing the base entry, and its directory
  is marked `trusted.overlay.origin` (an overlayfs lower layer, as mkfs.erofs 1.9.4 keeps
  it); with --ovlfs-strip=1 it removes the base entry instead and is not written, and
  the opaque markers are left out;
- hardlinks within the layer stay hardlinks; a base inode that loses links gets its
  nlink lowered in place;
- a kept base directory under a rewritten one gets its `..` updated in place, or when
  that cannot be (compressed, --zD; in a metabox, -m) is rewritten plain itself.

`rvsp` (--tar=f): each regular file's blocks are reserved, not written (they read as
zeros; mkfs.erofs 1.9.4's --incremental=rvsp / --clean=rvsp, for data filled in later);
`data` and `0` write the data (`0` zero-fills only mkfs.erofs's S3 source).

Not as mkfs.erofs 1.9.4, which writes into IMAGE in place: the result is built in a copy
beside IMAGE (the base's bytes, then the new ones) and renamed over it, so a failure at
any point leaves the base image as it was.
"""
from __future__ import annotations

import contextlib
import os
import stat
import time
import uuid as _uuid
from typing import Any

from erofs_tools.builder import incr_tari as T
from erofs_tools.builder import incr_write as W
from erofs_tools.builder.incr_z import compress_new
from erofs_tools.builder.mkfs_tar import (
    TarOptions,
    _force_ids,
    _new_scratch,
    _open_input,
    _parse,
    _scratch,
    _Tee,
    check_map_path,
)
from erofs_tools.builder.options import MkfsOptions
from erofs_tools.builder.tar_map import map_output, reserved_lines
from erofs_tools.builder.tar_reader import TarReader
from erofs_tools.builder.tar_tree import TarTree, TNode
from erofs_tools.builder.whiteout import (
    OPAQUE_VALUE,
    OPAQUE_XATTR,
    ORIGIN_XATTR,
    is_overlay_whiteout,
)
from erofs_tools.errors import CorruptImageError, ErofsToolsError, InputError
from erofs_tools.format import erofs as E
from erofs_tools.fsutil import atomic_output
from erofs_tools.reader.image import Image, open_image
from erofs_tools.reader.metabox import metabox_nid

DATA_MODES = ("data", "rvsp", "0")


def parse_data_mode(text: str | None, flag: str) -> str:
    """--incremental=X / --clean=X as mkfs.erofs 1.9.4 reads X: data (the default),
    rvsp, 0, or a number (2: rvsp; any other: data)."""
    if text is None or text == "" or text == "data":
        return "data"
    if text in ("rvsp", "0"):
        return text
    try:
        n = int(text, 0)
    except ValueError:
        raise InputError(f"invalid --{flag}={text}") from None
    return "rvsp" if n == 2 else "data"


def open_base(image: str) -> Image:
    """The base image, checked: one line for anything this mkfs cannot build on."""
    try:
        st = os.stat(image)
    except OSError as e:
        raise InputError(f"{image}: no base image for --incremental ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{image}: --incremental builds on a regular file only")
    try:
        img = open_image(image)
    except CorruptImageError as e:
        raise InputError(f"{image}: not an EROFS image to build on ({e})") from None
    try:
        sb = img.sb
        why = None
        if img.is_rafs:
            why = "a RAFS v6 bootstrap"
        elif sb.extra_devices:
            why = "an image with extra devices (not supported by --incremental)"
        elif img.blocks * img.blksz > img.size:
            why = f"truncated ({img.size} bytes, its superblock says {img.blocks} blocks)"
        if why is not None:
            raise InputError(f"{image}: the base image is {why}")
        root = img.inode(img.root_nid)
        img.listdir(root)
    except BaseException:
        img.close()
        raise
    return img


# ---------------------------------------------------------------- the layer's tree ----

def _ids(opts: MkfsOptions, uid: int, gid: int, path: str) -> tuple[int, int]:
    if opts.all_root:
        uid = gid = 0
    if opts.force_uid is not None:
        uid = opts.force_uid
    if opts.force_gid is not None:
        gid = opts.force_gid
    uid += opts.uid_offset
    gid += opts.gid_offset
    if uid >= 1 << 32 or gid >= 1 << 32:
        raise InputError(f"{path}: uid/gid overflows with the offset")
    return uid, gid


def walk_dir(source: str, opts: MkfsOptions) -> tuple[TNode, list[tuple[str, int]]]:
    """The directory SOURCE as a layer tree; -> (root, per data key: (file, offset))."""
    policy = opts.inode_mtimes()
    files: list[tuple[str, int]] = []
    links: dict[tuple[int, int], TNode] = {}

    def node(path: str, st: os.stat_result) -> TNode:
        sec, nsec = divmod(st.st_mtime_ns, 10**9)
        if policy is not None:
            sec, nsec = policy.apply(sec, nsec)
        uid, gid = _ids(opts, st.st_uid, st.st_gid, path)
        n = TNode(st.st_mode, uid, gid, sec, nsec)
        if opts.xattrs:
            try:
                names = os.listxattr(path, follow_symlinks=False)
                n.xattrs = {os.fsencode(k): os.getxattr(path, k, follow_symlinks=False)
                            for k in names}
            except OSError as e:
                raise InputError(f"{path}: xattrs: {e.strerror}") from None
        if stat.S_ISREG(st.st_mode):
            n.size = st.st_size
            n.key = len(files)
            files.append((path, 0))
        elif stat.S_ISLNK(st.st_mode):
            n.target = os.fsencode(os.readlink(path))
            n.size = len(n.target)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            n.rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        elif stat.S_ISDIR(st.st_mode):
            n.opaque = n.xattrs.get(OPAQUE_XATTR) == OPAQUE_VALUE
        return n

    excl_paths = set(opts.exclude_paths)
    excl_regex = list(opts.exclude_regex)
    try:
        root = node(source, os.lstat(source))
        stack = [(root, source, b"")]
        while stack:
            d, path, drel = stack.pop()
            kids = d.children
            assert kids is not None
            with os.scandir(path) as it:
                ents = sorted(it, key=lambda e: e.name)
            for e in ents:
                rel = drel + b"/" + os.fsencode(e.name) if drel else os.fsencode(e.name)
                if rel in excl_paths or any(r.search(rel) for r in excl_regex):
                    continue        # (--exclude-path / --exclude-regex, as mkfs's walk)
                st = e.stat(follow_symlinks=False)
                key = (st.st_dev, st.st_ino)
                if (not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1
                        and not opts.hard_dereference and key in links):
                    kids[os.fsencode(e.name)] = links[key]
                    continue
                c = node(e.path, st)
                if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                    links[key] = c
                kids[os.fsencode(e.name)] = c
                if c.is_dir():
                    stack.append((c, e.path, rel))
    except OSError as e:
        raise InputError(f"{e.filename or source}: {e.strerror}") from None
    return root, files


# ------------------------------------------------------------------------- merging ----

class Merge:
    """The layer's tree over the base image: -> the new inodes (Out), the base
    directories whose `..` must name a new parent."""

    def __init__(self, img: Image, files: list[Any], strip: bool, reserve: bool) -> None:
        self.img = img
        self.files = files
        self.strip = strip
        self.reserve = reserve
        self.outs: list[W.Out] = []
        self.by_node: dict[int, W.Out] = {}
        self.fixups: list[tuple[int, W.Out]] = []
        self.unlinked: dict[int, int] = {}

    def _base_whiteout(self, nid: int) -> bool:
        ino = self.img.inode(nid)
        return is_overlay_whiteout(ino.mode, ino.rdev if ino.is_dev() else (1, 1))

    def _new(self, n: TNode, path: bytes) -> W.Out:
        o = self.by_node.get(id(n))
        if o is not None:
            o.nlink += 1
            return o
        o = W.Out(n.mode, n.uid, n.gid, n.mtime, n.nsec, dict(n.xattrs), size=n.size,
                  rdev=tuple(n.rdev), nlink=1, path=path)   # type: ignore[arg-type]
        if n.target is not None:
            o.data = n.target
        elif self.index_bits is not None and stat.S_ISREG(n.mode) and n.size:
            assert n.key is not None
            o.chunks = T.chunks(self.files[n.key], n.size, self.index_bits, path)
        elif stat.S_ISREG(n.mode) and n.size:
            d = self.files[n.key] if n.key is not None else None
            if isinstance(d, tuple):
                o.data = d
            elif isinstance(d, int):
                o.data = (self.data_path, d)
            elif d is not None:
                o.data = (d.scratch, 0)
            o.reserve = self.reserve
        self.by_node[id(n)] = o
        self.outs.append(o)
        return o

    data_path = ""
    index_bits: int | None = None       # --tar=i: the base's block bits

    def _patchable(self, nid: int) -> bool:
        ino = self.img.inode(nid)
        return (ino.layout in (E.LAYOUT_FLAT_PLAIN, E.LAYOUT_FLAT_INLINE)
                and not nid >> E.NID_METABOX_BIT)

    def _drop(self, nid: int, ft: int) -> None:
        """A base entry the new tree no longer has: the links it took from inodes that
        stay linked elsewhere (their nlink is lowered in place, see `nlinks`)."""
        stack = [(nid, ft)]
        while stack:
            nid, ft = stack.pop()
            if ft == E.FT_DIR:
                stack.extend((de.nid, de.file_type)
                             for de in self.img.listdir(self.img.inode(nid)))
            elif self.img.inode(nid).nlink > 1:
                self.unlinked[nid] = self.unlinked.get(nid, 0) + 1

    def nlinks(self) -> list[tuple[int, bytes]]:
        """(offset, bytes) of the i_nlink fields of base inodes that lost links."""
        out = []
        for nid, k in sorted(self.unlinked.items()):
            ino = self.img.inode(nid)
            left = ino.nlink - k
            if left < 1:
                continue                # (no link left: nothing reads it)
            if ino.inode_size == E.CompactInode.SIZE:
                at, raw = ino.offset + 6, left.to_bytes(2, "little")
            else:
                at, raw = ino.offset + 44, left.to_bytes(4, "little")
            if nid >> E.NID_METABOX_BIT:
                mat = self._metabox_at(at)
                if mat is None:
                    continue        # (a compressed metabox: left as mkfs.erofs 1.9.4 does)
                at = mat
            out.append((at, raw))
        return out

    def _metabox_at(self, off: int) -> int | None:
        """The image offset of byte `off` of a plain metabox's data, else None."""
        mnid = metabox_nid(self.img)
        if mnid is None:
            return None
        m = self.img.inode(mnid)
        bs = self.img.blksz
        full = m.size // bs * bs if m.layout == E.LAYOUT_FLAT_INLINE else m.size
        if m.layout not in (E.LAYOUT_FLAT_PLAIN, E.LAYOUT_FLAT_INLINE) or off >= m.size:
            return None
        if off < full:
            return int(m.startblk * bs + off)
        return int(m.offset + m.inode_size + m.xattr_isize + off - full)

    def dir(self, n: TNode, base_nid: int | None, parent: W.Out | None,
            path: bytes = b"") -> W.Out:
        img = self.img
        xattrs = dict(n.xattrs)
        xattrs.pop(ORIGIN_XATTR, None)
        opaque = n.opaque or xattrs.get(OPAQUE_XATTR) == OPAQUE_VALUE
        o = W.Out(n.mode, n.uid, n.gid, n.mtime, n.nsec, xattrs, nlink=2, parent=parent)
        if n.implied and base_nid is not None:
            b = img.inode(base_nid)
            o.mode, o.uid, o.gid, o.mtime, o.nsec = b.mode, b.uid, b.gid, b.mtime, b.mtime_nsec
            o.xattrs = dict(img.xattrs(b))
            o.xattrs.pop(ORIGIN_XATTR, None)
        if self.strip:
            o.xattrs.pop(OPAQUE_XATTR, None)
        elif opaque and not n.implied:
            o.xattrs[OPAQUE_XATTR] = OPAQUE_VALUE
        o.base = base_nid
        self.outs.append(o)
        base_ents: dict[bytes, tuple[int, int]] = {}
        if base_nid is not None:
            base_ents = {de.name: (de.nid, de.file_type)
                         for de in img.listdir(img.inode(base_nid))}
        ents: dict[bytes, tuple[int | W.Out, int]] = {} if opaque else dict(base_ents)
        kids = n.children
        assert kids is not None
        for name in sorted(kids):
            c = kids[name]
            if is_overlay_whiteout(c.mode, c.rdev) and self.strip:
                ents.pop(name, None)
                continue
            prev = ents.get(name)
            if c.is_dir():
                bnid = (prev[0] if prev is not None and isinstance(prev[0], int)
                        and prev[1] == E.FT_DIR else None)
                if bnid is not None and not img.inode(bnid).is_dir():
                    bnid = None
                ents[name] = (self.dir(c, bnid, o, path + name + b"/"), E.FT_DIR)
            else:
                ents[name] = (self._new(c, path + name), E.file_type_of_mode(c.mode))
        for name, (ref, ft) in list(ents.items()):
            if ft == E.FT_DIR and isinstance(ref, int) and not self._patchable(ref):
                # a kept base directory whose `..` cannot be updated in place (--zD:
                # compressed): rewritten plain with its entries, its subdirectories too
                keep = TNode(stat.S_IFDIR | 0o755)
                keep.implied = True
                ents[name] = (self.dir(keep, ref, o), E.FT_DIR)
        o.entries = ents
        for name, (nid, ft) in base_ents.items():
            cur = ents.get(name)
            if cur is not None and (cur[0] == nid or (isinstance(cur[0], W.Out)
                                                     and cur[0].base == nid)):
                continue                # kept, or the directory merged into a new one
            self._drop(nid, ft)
        wh = False
        for ref, ft in ents.values():
            if ft == E.FT_DIR:
                o.nlink += 1
                if isinstance(ref, int):
                    self.fixups.append((ref, o))
            elif ft == E.FT_CHR and not wh:
                wh = (is_overlay_whiteout(ref.mode, ref.rdev) if isinstance(ref, W.Out)
                      else self._base_whiteout(ref))
        if wh and not self.strip:
            o.xattrs.setdefault(ORIGIN_XATTR, b"")
        return o


# -------------------------------------------------------------------------- driver ----

def _tar_layer(source: str, opts: MkfsOptions, topts: TarOptions, directory: str,
               stack: contextlib.ExitStack) -> tuple[TNode, list[Any], str]:
    if topts.dump is not None or topts.zinfo is not None or topts.headerball:
        raise InputError("--incremental: a tar layer is read with --tar=f or --tar=i "
                         "(not --ungzip=FILE or --gzinfo)")
    if opts.exclude_paths or opts.exclude_regex:
        raise InputError("--exclude-path/--exclude-regex do not apply to --tar")
    scratch = stack.enter_context(_scratch(directory))
    f, stream, in_place = _open_input(source, topts)
    if f is not None:
        stack.callback(f.close)
    if hasattr(stream, "close"):       # (a gunzip/unxz thread)
        stack.callback(stream.close)
    data_path = in_place or source
    if topts.mode == "i" and in_place is None:
        raise InputError(f"{source}: --incremental --tar=i indexes a plain tar file in "
                         "place (not stdin or a compressed tar)")
    if in_place is None:
        fd = _new_scratch(directory, scratch, "spool")
        stack.callback(os.close, fd)
        stream = _Tee(stream, fd)
        data_path = scratch[-1]
    mtimes = opts.inode_mtimes()
    tree = TarTree("aufs" if topts.aufs else "none",
                   timestamp=mtimes.time if mtimes is not None else None,
                   clamp=mtimes is not None and mtimes.clamp, strip=False,
                   negative_mtimes=True)
    files = _parse(TarReader(stream, topts.max_size), tree, topts.mode, directory,
                   scratch, None)
    uid = 0 if opts.all_root else opts.force_uid
    gid = 0 if opts.all_root else opts.force_gid
    if uid is not None or gid is not None or opts.uid_offset or opts.gid_offset:
        _force_ids(tree, uid, gid, opts.uid_offset, opts.gid_offset)
    return tree.root, files, data_path


def mkfs_incremental(image: str, source: str, opts: MkfsOptions, mode: str = "data",
                     topts: TarOptions | None = None,
                     block_size: int | None = None,
                     map_lines: list[bytes] | None = None) -> dict[str, Any]:
    """Lay the layer SOURCE (a directory, or with topts a tar) over the image IMAGE.
    topts.mapfile (--tar=f,MAPFILE): written after the image, a line per reserved file
    (rvsp), else empty; or, with `map_lines`, those lines are added to it instead."""
    t0 = time.monotonic()
    if topts is not None and topts.mapfile is not None:
        check_map_path(topts, image, source)
    img = open_base(image)
    directory = os.path.dirname(os.path.abspath(image))
    with contextlib.ExitStack() as stack:
        map_out = None
        if topts is not None and topts.mapfile is not None and map_lines is None:
            # (renamed after the image: the stack ends after atomic_output below)
            umask = os.umask(0)
            os.umask(umask)
            map_out = stack.enter_context(map_output(topts.mapfile, umask))
        stack.callback(img.close)
        if block_size is not None and block_size != img.blksz:
            raise InputError(f"{image}: -b {block_size}: the base image has "
                             f"{img.blksz}-byte blocks")
        if topts is not None:
            root, files, data_path = _tar_layer(source, opts, topts, directory, stack)
        else:
            if mode == "rvsp":
                raise InputError("--incremental=rvsp: with a tar layer (--tar=f) only, "
                                 "as mkfs.erofs 1.9.4 reserves a tar's data")
            if not os.path.isdir(source):
                raise InputError(f"{source}: not a directory")
            root, files = walk_dir(source, opts)
            data_path = ""
        m = Merge(img, files, opts.whiteouts == "strip", mode == "rvsp")
        m.data_path = data_path
        tar_size = None
        if topts is not None and topts.mode == "i":
            if opts.compress is not None or mode == "rvsp":
                raise InputError("--incremental --tar=i: -z and =rvsp are not supported "
                                 "(the files' data stays in the tar)")
            m.index_bits = img.blkszbits
            tar_size = os.path.getsize(data_path)
        try:
            out_root = m.dir(root, img.root_nid, None)
        except CorruptImageError as e:
            raise InputError(f"{image}: the base image: {e}") from None
        zr = compress_new(img, m.outs, opts, directory, stack)
        if zr.packed is not None:       # (-E fragments: named by the superblock only)
            m.outs.append(zr.packed)
        start = -(-img.size // img.blksz)
        p = W.plan(img, m.outs, out_root, start, opts.inline_data, opts.force_extended,
                   opts.ignore_mtime, zr.run)
        devt = None
        if tar_size is not None:        # the tar's device slot: after the last record
            at = T.slot_place(p.outs, img.blksz, p.total_blocks)
            if at is None:              # (no room left there: a block of its own)
                at = p.total_blocks * img.blksz
                p.total_blocks += 1
            devt = T.slot_offset(at, image)
        # (IMAGE a symlink: the image it names is replaced, as mkfs.erofs writes through)
        target = os.path.realpath(image)
        st = os.stat(target)
        with atomic_output(target, mode=stat.S_IMODE(st.st_mode)) as f:
            fd = f.fileno()
            with contextlib.suppress(OSError):      # (the base's owner, when we may)
                os.fchown(fd, st.st_uid, st.st_gid)
            _copy_base(image, fd, img.size)
            os.ftruncate(fd, p.total_blocks * img.blksz)
            W.write(img, p, fd)
            W.fix_parents(img, m.fixups, fd)
            for off, raw in m.nlinks():
                os.pwrite(fd, raw, off)
            if devt is not None:
                assert tar_size is not None
                os.pwrite(fd, T.device_slot(tar_size, img.blksz, p.total_blocks),
                          devt * E.DEVICE_SLOT_SIZE)
            uuid = _superblock(img, p, fd, opts, len(m.outs), zr.bits, devt,
                               zr.packed.nid if zr.packed is not None else None)
            img.check_unchanged()
            lines = (reserved_lines(m.outs, data_path, img.blksz.bit_length() - 1)
                     if map_lines is not None or map_out is not None else [])
        if map_lines is not None:
            map_lines.extend(lines)
        elif map_out is not None:
            map_out.write(b"".join(lines))
    return {
        "image": image, "source": source, "incremental": mode,
        "inodes": len(m.outs), "blocks": p.total_blocks,
        "bytes": p.total_blocks * img.blksz, "base_blocks": start,
        "root_nid": out_root.nid, "uuid": str(_uuid.UUID(bytes=uuid)),
        "seconds": round(time.monotonic() - t0, 3),
    }


def _copy_base(image: str, fd: int, size: int) -> None:
    with open(image, "rb") as src:
        done = 0
        while done < size:
            n = os.copy_file_range(src.fileno(), fd, size - done, done, done)
            if n == 0:
                raise InputError(f"{image}: the base image shrank while it was copied")
            done += n


def _superblock(img: Image, p: W.Plan, fd: int, opts: MkfsOptions, new: int,
                zbits: int = 0, devt: int | None = None,
                packed: int | None = None) -> bytes:
    bs = img.blksz
    end = bs if bs > E.SUPER_OFFSET else E.SUPER_OFFSET + bs
    block0 = bytearray(os.pread(fd, end, 0))
    sb = img.sb
    if p.total_blocks >= 1 << 32 or (p.root.nid > 0xFFFF and not img.is_48bit):
        raise ErofsToolsError(f"{img.name}: the image outgrows 2^32 blocks")
    fields = E.SuperBlock.field_layout()

    def put(name: str, value: int | bytes) -> None:
        at, size = fields[name]
        raw = value if isinstance(value, bytes) else value.to_bytes(size, "little")
        block0[E.SUPER_OFFSET + at:E.SUPER_OFFSET + at + size] = raw.ljust(size, b"\0")

    put("blocks", p.total_blocks)
    big_nid = p.root.nid > 0xFFFF
    put("root_nid", 0 if big_nid else p.root.nid)   # (48-bit: then blocks_hi, 0)
    if img.is_48bit:
        at = E.SUPER_OFFSET + E.SB_ROOTNID_8B_OFFSET
        block0[at:at + 8] = (p.root.nid if big_nid else 0).to_bytes(8, "little")
    put("inos", sb.inos + new)
    if packed is not None:          # -E fragments: the layer's packed inode
        put("packed_nid", packed)
    if devt is not None:            # --tar=i: the tar, device 1
        put("extra_devices", 1)
        put("devt_slotoff", devt)
        zbits |= E.FEATURE_INCOMPAT_DEVICE_TABLE | E.FEATURE_INCOMPAT_CHUNKED_FILE
    if zbits:
        put("feature_incompat", sb.feature_incompat | zbits)
    if opts.uuid is not None:
        put("uuid", opts.uuid)
    if opts.label:
        put("volume_name", opts.label)
    if sb.feature_compat & E.FEATURE_COMPAT_SB_CHKSUM:
        crc = E.superblock_checksum(bytes(block0))
        block0[E.CHECKSUM_FIELD:E.CHECKSUM_FIELD + 4] = crc.to_bytes(4, "little")
    os.pwrite(fd, bytes(block0[E.SUPER_OFFSET:]), E.SUPER_OFFSET)
    at, size = fields["uuid"]
    return bytes(block0[E.SUPER_OFFSET + at:E.SUPER_OFFSET + at + size])


def mkfs_clean_rvsp(image: str, source: str, opts: MkfsOptions,
                    topts: TarOptions) -> dict[str, Any]:
    """--clean=rvsp --tar=f: a full build whose files' blocks are reserved, not written
    (as mkfs.erofs 1.9.4): the layer laid in rvsp mode over an image of an empty root
    built with the same options, in a temporary file renamed over IMAGE at the end."""
    from erofs_tools.builder.mkfs import mkfs as build_image
    from erofs_tools.fsutil import create_exclusive, is_block_device
    if is_block_device(image):
        raise InputError(f"{image}: --clean=rvsp writes a file, not a block device")
    directory = os.path.dirname(os.path.abspath(image))
    check_map_path(topts, image, source)
    with contextlib.ExitStack() as stack:
        map_out = None
        lines: list[bytes] | None = None
        if topts.mapfile is not None:
            # (renamed when the stack ends: after the image)
            umask = os.umask(0)
            os.umask(umask)
            map_out = stack.enter_context(map_output(topts.mapfile, umask))
            lines = []
        empty = stack.enter_context(_temp_dir(directory))
        fd, tmp = create_exclusive(directory, f".{os.path.basename(image)}.", ".rvsp")
        os.close(fd)
        stack.callback(_unlink_quiet, tmp)
        if opts.timestamp is not None:
            os.utime(empty, (opts.timestamp, opts.timestamp))
        build_image(tmp, empty, opts)
        summary = mkfs_incremental(tmp, source, opts, "rvsp", topts, map_lines=lines)
        os.replace(tmp, image)
        if map_out is not None and lines is not None:
            map_out.write(b"".join(lines))
    summary.update(image=image, incremental=None, clean="rvsp")
    return summary


@contextlib.contextmanager
def _temp_dir(directory: str) -> Any:
    import tempfile
    d = tempfile.mkdtemp(prefix=".erofs-empty-", dir=directory)
    try:
        yield d
    finally:
        os.rmdir(d)


def _unlink_quiet(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
