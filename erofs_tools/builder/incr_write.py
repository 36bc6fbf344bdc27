"""mkfs --incremental, the writing half: the new inodes laid out after the base image's
last block and written, the base image itself left as it is but for the few bytes the
new tree needs there (builder/incremental.py has the rules and the tree).

Layout, as mkfs.erofs 1.9.4 appends: the new files' data (whole blocks) from the first
block after the base image, then the new inode records (inode, inline xattrs, inline
tail) packed best fit decreasing into whole blocks, 32-byte aligned, a record with a
tail never across a block. nids count from the base's meta_blkaddr, which stays. In the
base image only these change: the superblock (block count, root nid, inode count,
checksum); the `..` entry of each base directory whose parent was rewritten; the nlink
of a base inode that lost links (incremental.py); and, when the new root's nid would not
fit the superblock's 16-bit field, the root inode written over the base root's record
(it must fit there, as in mkfs.erofs 1.9.4; its xattr area padded to the whole place).
"""
from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from erofs_tools._native_sums import xxh32
from erofs_tools.errors import FormatLimitError, InputError
from erofs_tools.format import erofs as E
from erofs_tools.reader.image import Image


@dataclass(eq=False)
class Out:
    """A new inode of the incremental image."""
    mode: int
    uid: int
    gid: int
    mtime: int
    nsec: int
    xattrs: dict[bytes, bytes]
    size: int = 0
    rdev: tuple[int, int] = (0, 0)
    nlink: int = 0
    data: bytes | tuple[str, int] | None = None     # bytes, or (file, offset) to read
    reserve: bool = False                           # rvsp: blocks kept, never written
    # directories: name -> a base nid or a new Out, and its file type
    entries: dict[bytes, tuple[int | Out, int]] | None = None
    parent: Out | None = None
    base: int | None = None                         # the base directory merged into it
    # layout
    nid: int = -1
    ino: int = 0
    isize: int = 0
    xbody: bytes = b""
    layout: int = E.LAYOUT_FLAT_PLAIN
    blkaddr: int = 0
    nblocks: int = 0
    tail: int = 0                                   # bytes inline after the record
    offset: int = -1                                # byte offset of the record
    extra: list[bytes] = field(default_factory=list)
    z: Any = None                                   # -z: its incr_z.ZFile
    path: bytes = b""                               # its path in the layer (-z hints)
    chunks: tuple[int, bytes] | None = None         # --tar=i: chunk format, indexes

    @property
    def zpad(self) -> int:
        """-z, --tar=i: zeros before the map header or chunk indexes (8-byte aligned;
        records are 32)."""
        if self.z is None and self.chunks is None:
            return 0
        return -(self.isize + len(self.xbody)) % 8

    @property
    def record(self) -> int:
        if self.z is not None:
            return self.isize + len(self.xbody) + self.zpad + self.z.length
        if self.chunks is not None:
            return self.isize + len(self.xbody) + self.zpad + len(self.chunks[1])
        return self.isize + len(self.xbody) + self.tail


def _xattr_body(xattrs: dict[bytes, bytes], with_filter: bool) -> bytes:
    if not xattrs:
        return b""
    body = bytearray()
    bits = 0
    for name in sorted(xattrs):
        split = E.split_xattr_name(name)
        if split is None:
            raise InputError(f"xattr {name.decode(errors='replace')}: no namespace prefix "
                             "this mkfs can store with --incremental")
        index, suffix = split
        value = xattrs[name]
        body += E.XattrEntry(e_name_len=len(suffix), e_name_index=index,
                             e_value_size=len(value)).encode() + suffix + value
        body += bytes(-len(body) % 4)
        bits |= 1 << (xxh32(suffix, E.XATTR_FILTER_SEED + index) & (E.XATTR_FILTER_BITS - 1))
    filt = (~bits & 0xFFFFFFFF) if with_filter else 0
    out = E.XattrIbodyHeader(h_name_filter=filt, h_shared_count=0).encode() + bytes(body)
    if (len(out) - E.XattrIbodyHeader.SIZE) // 4 + 1 > 0xFFFF:
        raise FormatLimitError("xattrs of one inode exceed the inline limit")
    return out


def dirent_blocks(names: Sequence[bytes], blksz: int) -> list[list[bytes]]:
    """Sorted names cut into directory blocks, as mkfs fills them."""
    blocks: list[list[bytes]] = [[]]
    used = 0
    for name in names:
        need = E.Dirent.SIZE + len(name)
        if used + need > blksz:
            blocks.append([])
            used = 0
        blocks[-1].append(name)
        used += need
    return blocks


def _dir_size(names: Sequence[bytes], blksz: int) -> int:
    blocks = dirent_blocks(names, blksz)
    last = sum(E.Dirent.SIZE + len(n) for n in blocks[-1])
    return (len(blocks) - 1) * blksz + last


def _dir_names(o: Out) -> list[bytes]:
    assert o.entries is not None
    return sorted([b".", b"..", *o.entries])


@dataclass
class Plan:
    """Where the new image's pieces go."""
    blksz: int
    start: int                       # first new block
    outs: list[Out]
    root: Out
    root_in_place: bool
    total_blocks: int = 0
    run: Any = None                  # -z: the scratch image's blocks (incr_z.ZRun)


def plan(img: Image, outs: list[Out], root: Out, start: int, inline_data: bool,
         force_extended: bool, ignore_mtime: bool = False, run: Any = None) -> Plan:
    """Sizes, inode formats and layouts, data blocks, then the records' places."""
    bs = img.blksz
    sb = img.sb
    with_filter = bool(sb.feature_compat & E.FEATURE_COMPAT_XATTR_FILTER)
    for i, o in enumerate(outs):
        o.ino = sb.inos + 1 + i
        if o.entries is not None:
            o.size = _dir_size(_dir_names(o), bs)
        o.xbody = _xattr_body(o.xattrs, with_filter)
        if img.is_48bit:        # compact inodes keep their seconds from the epoch
            mtime_ok = 0 <= o.mtime - img.epoch < 1 << 32 and o.nsec == img.fixed_nsec
        else:
            mtime_ok = (o.mtime, o.nsec) == (img.epoch, img.fixed_nsec)
        compact = (not force_extended and o.uid <= 0xFFFF and o.gid <= 0xFFFF
                   and o.nlink <= 0xFFFF and o.size < 1 << 32)
        if compact and not mtime_ok and ignore_mtime:   # (--ignore-mtime, as mkfs)
            o.mtime, o.nsec, mtime_ok = img.build_time, img.fixed_nsec, True
        compact = compact and mtime_ok
        o.isize = E.CompactInode.SIZE if compact else E.ExtendedInode.SIZE

    def decide(o: Out, may_inline: bool) -> None:
        tail = o.size % bs
        o.tail = 0
        o.layout = E.LAYOUT_FLAT_PLAIN
        o.nblocks = -(-o.size // bs)
        if o.z is not None:         # (its pclusters are in the run)
            o.z.prepare(o.isize + len(o.xbody), bs)
            o.layout = o.z.layout
            o.nblocks = 0
            return
        if o.chunks is not None:    # (its data stays in the tar)
            o.layout = E.LAYOUT_CHUNK_BASED
            o.nblocks = 0
            return
        if o.reserve or not tail or not may_inline:
            return
        if o.isize + len(o.xbody) + tail <= bs:
            o.layout = E.LAYOUT_FLAT_INLINE
            o.tail = tail
            o.nblocks = o.size // bs

    for o in outs:
        has_data = stat.S_ISREG(o.mode) or stat.S_ISDIR(o.mode) or stat.S_ISLNK(o.mode)
        if not has_data:
            o.size = 0
        decide(o, o is not root and (inline_data or not stat.S_ISREG(o.mode)))
    # the root: its nid must fit the superblock's 16 bits, else it takes the place of the
    # base root's record (stored plain there, as mkfs.erofs 1.9.4 writes it)
    zblocks = run.nblocks if run is not None else 0
    blocks = start + zblocks + sum(o.nblocks for o in outs)
    root_nid_new = (blocks * bs - img.meta_off) // E.SLOT_SIZE
    in_place = not img.is_48bit and root_nid_new > 0xFFFF
    if not in_place:
        decide(root, True)
    if run is not None:                 # the compressed data first, from the first block
        run.base = start
    cur = start + zblocks
    for o in outs:
        if o.nblocks:
            o.blkaddr = cur
            cur += o.nblocks
    p = Plan(bs, start, outs, root, in_place, run=run)
    cur = _place_records(img, p, cur)
    p.total_blocks = cur
    if in_place:
        _fit_root(img, root)
    return p


def _fit_root(img: Image, root: Out) -> None:
    """The root over the base root's record. Its xattr area is padded (zeros, which the
    kernel skips, as --root-xattr-isize leaves) to the whole place, so that a later
    build has the same room, as mkfs.erofs 1.9.4 keeps the base root's xattr size."""
    old = img.inode(img.root_nid)
    cap = old.inode_size + old.xattr_isize
    if old.layout == E.LAYOUT_FLAT_INLINE:
        cap += old.size % img.blksz
    if root.record > cap or old.nid >> E.NID_METABOX_BIT:
        raise InputError(f"{img.name}: the new root inode ({root.record} bytes) does not fit "
                         f"the base root's place ({cap} bytes), as mkfs.erofs 1.9.4 needs too")
    room = (cap - root.isize) // 4 * 4
    if not root.xbody and room >= E.XattrIbodyHeader.SIZE:
        with_filter = bool(img.sb.feature_compat & E.FEATURE_COMPAT_XATTR_FILTER)
        root.xbody = E.XattrIbodyHeader(h_name_filter=0xFFFFFFFF if with_filter else 0,
                                        h_shared_count=0).encode()
    if root.xbody:
        root.xbody += bytes(min(room, (0xFFFF - 1) * 4 + E.XattrIbodyHeader.SIZE)
                            - len(root.xbody))
    root.offset = old.offset
    root.nid = img.root_nid


def _place_records(img: Image, p: Plan, cur: int) -> int:
    """Best fit decreasing into whole blocks; -> the block after the last record."""
    bs = p.blksz
    slots = bs // E.SLOT_SIZE
    buckets: list[list[int]] = [[] for _ in range(slots + 1)]   # free slots -> blocks
    free: dict[int, int] = {}
    order = [o for o in p.outs if not (p.root_in_place and o is p.root)]
    if not p.root_in_place:             # the root first: the smallest nid
        order.remove(p.root)
        order.sort(key=lambda o: -o.record)
        order.insert(0, p.root)
    else:
        order.sort(key=lambda o: -o.record)
    for o in order:
        need = -(-o.record // E.SLOT_SIZE)
        if need > slots:                # a record over a block: blocks of its own
            shift = _inline_shift(o, bs)
            o.offset = cur * bs + shift
            cur += -(-(shift + o.record) // bs)
            continue
        blk = -1
        for k in range(need, slots + 1):
            if buckets[k]:
                blk = buckets[k].pop()
                break
        if blk < 0:
            blk = cur
            cur += 1
            free[blk] = slots
        left = free[blk]
        o.offset = blk * bs + (slots - left) * E.SLOT_SIZE
        free[blk] = left - need
        buckets[left - need].append(blk)
    for o in p.outs:
        if not (p.root_in_place and o is p.root):
            o.nid = (o.offset - img.meta_off) // E.SLOT_SIZE
    return cur


def _inline_shift(o: Out, bs: int) -> int:
    """-z -E ztailpacking: a 32-byte multiple to start a record over a block at, so
    that its inline tail does not cross a block (as the kernel needs)."""
    if o.z is None or not o.z.inline:
        return 0
    at = o.record - o.z.inline
    for shift in range(0, bs, E.SLOT_SIZE):
        if (shift + at) % bs + o.z.inline <= bs:
            return shift
    raise InputError(f"a compressed tail of {o.z.inline} bytes cannot be laid inline")


def _nid(ref: int | Out) -> int:
    return ref if isinstance(ref, int) else ref.nid


def dir_bytes(o: Out, bs: int) -> bytes:
    assert o.entries is not None
    parent = o.parent if o.parent is not None else o
    refs: dict[bytes, tuple[int, int]] = {b".": (o.nid, E.FT_DIR), b"..": (parent.nid, E.FT_DIR)}
    for name, (ref, ft) in o.entries.items():
        refs[name] = (_nid(ref), ft)
    out = bytearray()
    blocks = dirent_blocks(_dir_names(o), bs)
    for i, names in enumerate(blocks):
        head = bytearray()
        tailn = bytearray()
        nameoff = E.Dirent.SIZE * len(names)
        for name in names:
            nid, ft = refs[name]
            head += E.Dirent(nid=nid, nameoff=nameoff + len(tailn), file_type=ft).encode()
            tailn += name
        blk = bytes(head + tailn)
        if i + 1 < len(blocks):
            blk += bytes(bs - len(blk))
        out += blk
    return bytes(out)


def inode_bytes(o: Out, epoch: int | None = None) -> bytes:
    """The record's inode and xattrs; `epoch`: the 48-bit layout's, compact inodes'
    mtimes count from it."""
    fmt = E.i_format(E.INODE_COMPACT if o.isize == E.CompactInode.SIZE else E.INODE_EXTENDED,
                     o.layout)
    icount = 0 if not o.xbody else (len(o.xbody) - E.XattrIbodyHeader.SIZE) // 4 + 1
    if stat.S_ISCHR(o.mode) or stat.S_ISBLK(o.mode):
        i_u = E.encode_rdev(*o.rdev)
    elif o.z is not None:
        i_u = o.z.cblocks
    elif o.chunks is not None:
        i_u = o.chunks[0]
    elif o.nblocks:
        i_u = o.blkaddr
    else:
        i_u = 0
    if o.isize == E.CompactInode.SIZE:
        rec: E.CompactInode | E.ExtendedInode = E.CompactInode(
            i_format=fmt, i_xattr_icount=icount, i_mode=o.mode, i_nlink=o.nlink,
            i_size=o.size, i_u=i_u, i_mtime=0 if epoch is None else o.mtime - epoch, i_ino=o.ino & 0xFFFFFFFF, i_uid=o.uid, i_gid=o.gid)
    else:
        rec = E.ExtendedInode(
            i_format=fmt, i_xattr_icount=icount, i_mode=o.mode, i_size=o.size, i_u=i_u,
            i_ino=o.ino & 0xFFFFFFFF, i_uid=o.uid, i_gid=o.gid,
            i_mtime=o.mtime & 0xFFFFFFFFFFFFFFFF, i_mtime_nsec=o.nsec, i_nlink=o.nlink)
    return rec.encode() + o.xbody


def _pwrite(fd: int, data: bytes | memoryview, off: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, off)
        view = view[n:]
        off += n


def _copy_file(fd: int, src: str, src_off: int, size: int, dst_off: int) -> None:
    """Copy `size` bytes of `src` from src_off to fd at dst_off."""
    with open(src, "rb") as f:
        sfd = f.fileno()
        done = 0
        while done < size:
            n = os.copy_file_range(sfd, fd, size - done, src_off + done, dst_off + done)
            if n == 0:
                raise InputError(f"{src}: shorter than expected ({done} of {size} bytes)")
            done += n


def _read_at(src: str, off: int, size: int) -> bytes:
    with open(src, "rb") as f:
        data = os.pread(f.fileno(), size, off)
    if len(data) != size:
        raise InputError(f"{src}: shorter than expected")
    return data


def write(img: Image, p: Plan, fd: int) -> None:
    """Write the new pieces into fd, a copy of the base image."""
    bs = p.blksz
    if p.run is not None:
        for sblk, i, n in p.run.ranges():
            _copy_file(fd, p.run.path, sblk * bs, n * bs, (p.run.base + i) * bs)
    for o in p.outs:
        full = o.nblocks * bs if o.layout == E.LAYOUT_FLAT_PLAIN else o.size - o.tail
        payload: bytes | None = None
        if o.z is not None:
            _pwrite(fd, inode_bytes(o, img.epoch if img.is_48bit else None)
                    + bytes(o.zpad) + o.z.relocated(), o.offset)
            continue
        if o.chunks is not None:
            _pwrite(fd, inode_bytes(o, img.epoch if img.is_48bit else None)
                    + bytes(o.zpad) + o.chunks[1], o.offset)
            continue
        if o.entries is not None:
            payload = dir_bytes(o, bs)
        elif isinstance(o.data, bytes):
            payload = o.data
        if payload is not None:
            body, tail = payload[:len(payload) - o.tail], payload[len(payload) - o.tail:]
            if body:
                _pwrite(fd, body, o.blkaddr * bs)
        elif isinstance(o.data, tuple) and not o.reserve:
            path, off = o.data
            whole = min(full, o.size)
            if whole:
                _copy_file(fd, path, off, whole, o.blkaddr * bs)
            tail = _read_at(path, off + o.size - o.tail, o.tail) if o.tail else b""
        else:
            tail = b""
        _pwrite(fd, inode_bytes(o, img.epoch if img.is_48bit else None) + tail, o.offset)


def fix_parents(img: Image, fixups: list[tuple[int, Out]], fd: int) -> None:
    """The `..` entry of each kept base directory whose parent is new."""
    bs = img.blksz
    for nid, parent in fixups:
        ino = img.inode(nid)
        if ino.layout not in (E.LAYOUT_FLAT_PLAIN, E.LAYOUT_FLAT_INLINE) or nid >> E.NID_METABOX_BIT:
            raise InputError(f"{img.name}: directory nid {nid} is stored "
                             f"{ino.layout_name}: its '..' cannot be updated in place")
        nblk = -(-ino.size // bs)
        for b in range(nblk):
            used = min(bs, ino.size - b * bs)
            if ino.layout == E.LAYOUT_FLAT_INLINE and b == nblk - 1 and ino.size % bs:
                where = ino.offset + ino.inode_size + ino.xattr_isize
            else:
                where = (ino.startblk + b) * bs
            blk = img.read(where, used, "directory block")
            first = E.Dirent.decode(blk, 0)
            count = first.nameoff // E.Dirent.SIZE
            for i in range(count):
                de = E.Dirent.decode(blk, i * E.Dirent.SIZE)
                end = (E.Dirent.decode(blk, (i + 1) * E.Dirent.SIZE).nameoff
                       if i + 1 < count else used)
                name = blk[de.nameoff:end].rstrip(b"\0") if i + 1 == count else blk[de.nameoff:end]
                if name == b"..":
                    _pwrite(fd, parent.nid.to_bytes(8, "little"), where + i * E.Dirent.SIZE)
                    break
            else:
                continue
            break
        else:
            raise InputError(f"{img.name}: directory nid {nid} has no '..' entry")
