"""`erofs-tools mkfs --tar=f|i IMAGE TARFILE|-`: an EROFS image of a tar layer.

The tar is parsed once, front to back, by the tar source of `pack` (`tar_reader`,
`tar_tree`: the same bounds against hostile archives), building the tree in memory
while file data is *located*, never held: each regular file is remembered as the
byte offset of its data in an uncompressed tar file. Then the tree is emitted into the C
builder like the directory walk does:

- `--tar=f` (full image): every file's data is copied into the image by the C core's
  copy thread (or compressed by its pool with -z) from (tar file, offset), with
  copy_file_range. A plain tar given as a path is read in place: headers are parsed
  and file data is skipped by seeking, so Python never touches it. A stream (stdin, or
  gzip with --ungzip) is first teed, as it is parsed, into a spool file beside IMAGE
  (or into FILE with --ungzip=FILE, which is kept, as mkfs.erofs dumps it), which is
  then the tar file. Sparse entries are expanded into a sparse scratch file each (holes
  stay holes), whose holes become chunk holes.
- `--tar=i` (index image, what containerd's EROFS differ asks of mkfs.erofs): 512-byte
  blocks, one extra device (the tar: a device-table slot with its size in blocks and,
  as mapped_blkaddr, the index's own size, so the tar appended to the index is the same
  address space), and every regular file CHUNK_BASED with 8-byte chunk indexes
  pointing at its data in the tar (device 1, block = tar offset / 512). The kernel
  mounts the index with `-o device=TAR`, or the concatenation index+tar alone.
  With --zD the directories go whole into the packed inode (stored plain), with
  -E48bit/-Edot-omitted the 48-bit layout, as mkfs.erofs 1.9.4 writes them. With -z, as
  mkfs.erofs 1.9.4: the files' data still stays in the tar (chunk indexes) and symlinks
  plain; what -z compresses is the packed inode (the --zD directories; -Eztailpacking
  inlines its last pcluster), the metabox (-m), and the superblock says so (lz4_0padding,
  the algorithm records before the device slot). 1.9.4 reads -C, -m and -E fragments=
  there in 4 KiB units made 512-byte blocks (-m4096: one 512-byte pcluster); so does
  the CLI.

Whiteouts: kept as they are in the archive (overlayfs char 0:0 devices, opaque xattrs),
or converted from aufs `.wh.` files with `--aufs` (tar_tree "aufs", as mkfs.erofs 1.9).
Errors: one line, exit 1; the image (and a --ungzip dump) are written under temporary
names and renamed at the end, so nothing is left behind. A block device IMAGE is written
in place (builder/output.py; the spool and sparse copies then go to TMPDIR).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import time
import uuid as _uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from erofs_tools._native import BuildOptions, NativeBuilder
from erofs_tools._native_put import gap_blk, rebase_chunks, reserve_bytes, set_gap, set_metazone
from erofs_tools.builder.gzinfo import GzinfoTap, check_zinfo_path, zinfo_output
from erofs_tools.builder.mkfs import build_options, chunk_blob, finish_blob, fsalign, start_blob
from erofs_tools.builder.options import MkfsOptions, Progress
from erofs_tools.builder.output import partly_written, prepare
from erofs_tools.builder.tar_map import chunk_map, map_line, map_output, region, write_map
from erofs_tools.builder.tar_reader import DEFAULT_MAX_SIZE, ReadStream, TarReader, _show
from erofs_tools.builder.tar_stream import (
    LZIP_MAGIC,
    XZ_MAGIC,
    _Gunzip,
    _Peek,
    _Prefetch,
    _Unxz,
    detect_type,
    drain,
    is_lzma_alone,
)
from erofs_tools.builder.tar_tree import TarTree, TNode
from erofs_tools.builder.tree import file_sha256, set_long_prefixes
from erofs_tools.errors import InputError
from erofs_tools.format import erofs as E
from erofs_tools.fsutil import (
    create_exclusive,
    image_output,
    is_block_device,
    open_device,
    refuse_special,
)

TAR_MODES = ("f", "i")
INDEX_BLKSZBITS = 9             # --tar=i: 512-byte blocks, the tar's own granularity
_SB_END = E.SUPER_OFFSET + 128  # the device table follows the superblock (slot 9)
_PIECE = 1 << 20
# -z's share of build_options, for --tar=i (what mkfs.erofs 1.9.4 compresses there: the
# directories with --zD, the packed inode, the metabox; the files' data stays in the tar)
_Z_FIELDS = ("compress_alg", "compress_level", "pcluster_size", "compress_full_index",
             "ztailpacking", "fragments", "packed_pcluster_size", "dedupe", "all_fragments",
             "fragdedupe", "max_extent", "compress_alt", "compress_dict_size",
             "compress_lzma_props", "pcluster_max", "compress_threads")


@dataclass
class TarOptions:
    mode: str = "f"                   # "f" full image, "i" index image
    headerball: bool = False          # --tar=headerball: headers only, files read as holes
    aufs: bool = False                # --aufs: convert .wh. files
    ungzip: bool = False              # --ungzip: gzip input accepted (plain too)
    unxz: bool = False                # --unxz: xz or .lzma input accepted (plain too)
    dump: str | None = None           # --ungzip=FILE / --unxz=FILE: the uncompressed tar
                                      # is kept here
    max_size: int = DEFAULT_MAX_SIZE  # bound on the bytes read (gzip bombs)
    gzinfo: bool = False              # --gzinfo: gzip input only (as --ungzip's image)
    zinfo: str | None = None          # --gzinfo=FILE: the AWS SOCI zinfo written here
    mapfile: str | None = None        # --tar=MODE,MAPFILE: the tar map (tar_map.py)


class _SeekableTar:
    """A plain tar file: read() in small pieces (headers), seek_forward() over data."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = os.fstat(fd).st_size
        self.pos = 0

    def read(self, n: int) -> bytes:
        data = os.read(self.fd, min(n, 16 << 10))
        self.pos += len(data)
        return data

    def seek_forward(self, n: int) -> bool:
        self.pos = os.lseek(self.fd, n, os.SEEK_CUR)
        return self.pos <= self.size


class _Tee:
    """Every byte read is also written to `fd` (the spool or --ungzip=FILE)."""

    def __init__(self, inner: ReadStream, fd: int) -> None:
        self.inner = inner
        self.fd = fd

    def read(self, n: int) -> bytes:
        data = self.inner.read(n)
        view = memoryview(data)
        while view:
            try:
                w = os.write(self.fd, view)
            except OSError as e:
                raise InputError(f"writing the uncompressed tar: {e.strerror}") from None
            view = view[w:]
        return data


@dataclass
class _Data:
    offset: int                                  # data start in the uncompressed tar
    sparse: list[tuple[int, int]] | None = None  # data regions of a sparse entry
    scratch: str | None = None                   # --tar=f sparse: expanded copy
    name: bytes = b""                            # sparse: for messages


def _same(a: str, b: str) -> bool:
    """a and b name one file: the same file now, or the same name in the same
    directory (an output not created yet)."""
    if a == "-" or b == "-":
        # stdin redirected from a file: that file
        other = b if a == "-" else a
        try:
            st = os.fstat(0)
        except OSError:
            return False
        return (stat.S_ISREG(st.st_mode) and os.path.exists(other)
                and os.path.samestat(st, os.stat(other)))
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)

    def where(p: str) -> str:
        p = os.path.abspath(p)
        return os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))
    return where(a) == where(b)


def check_tar_paths(image: str, source: str, dump: str | None) -> None:
    parent = os.path.dirname(os.path.abspath(image)) or "."
    if not os.path.isdir(parent):
        raise InputError(f"{image}: directory {parent} does not exist")
    if os.path.isdir(image):
        raise InputError(f"{image}: is a directory")
    refuse_special(image, block_ok=True)
    if is_block_device(image):
        os.close(open_device(image))      # busy: said now, not after reading the tar
    if dump is not None:
        refuse_special(dump, f"--ungzip={dump}")
    for other, what in ((source, "TARFILE"), (dump, "--ungzip FILE")):
        if other and _same(image, other):
            raise InputError(f"{image}: the image would overwrite {what}"
                             + (" (stdin)" if other == "-" else ""))
    if dump is not None and (os.path.isdir(dump) or _same(dump, source)):
        raise InputError(f"--ungzip={dump}: is a directory or the input itself")


def check_map_path(topts: TarOptions, image: str, source: str) -> None:
    """MAPFILE is no directory, nor a file mkfs reads or writes otherwise."""
    if topts.mapfile is None:
        return
    if os.path.isdir(topts.mapfile):
        raise InputError(f"--tar=...,{topts.mapfile}: is a directory")
    for other in (image, source, topts.dump, topts.zinfo):
        if other is not None and _same(topts.mapfile, other):
            raise InputError(f"--tar=...,{topts.mapfile}: is the image, the input, the "
                             "--ungzip FILE or the --gzinfo FILE")


@contextlib.contextmanager
def _scratch(directory: str) -> Iterator[list[str]]:
    """Temporary files beside the image (spool, sparse copies), removed at the end."""
    paths: list[str] = []
    try:
        yield paths
    finally:
        for p in paths:
            with contextlib.suppress(OSError):
                os.unlink(p)


def _new_scratch(directory: str, paths: list[str], what: str) -> int:
    fd, path = create_exclusive(directory, f".erofs-tar-{what}.")
    paths.append(path)
    return fd


def _expand_sparse(reader: TarReader, regions: list[tuple[int, int]], size: int,
                   fd: int) -> None:
    """Write the data regions of the current (sparse) entry at their file offsets."""
    for off, ln in regions:
        while ln:
            n = min(ln, _PIECE)
            data = reader.read_data(n)
            os.pwrite(fd, data, off)
            off += n
            ln -= n
    os.ftruncate(fd, size)


def _same_file_path(source: str, fd: int) -> str | None:
    """A symlink-free path of the open file fd (the C core opens data sources with
    O_NOFOLLOW), or None when SOURCE no longer names it (e.g. /dev/stdin of a deleted
    file): then the input is spooled like a stream."""
    real = os.path.realpath(source)
    try:
        a, b = os.stat(real), os.fstat(fd)
    except OSError:
        return None
    return real if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) else None


def _open_input(source: str, topts: TarOptions, tap: GzinfoTap | None = None
                ) -> tuple[BinaryIO | None, ReadStream, str | None]:
    """-> (file to close, stream of the uncompressed tar, path of the plain tar file
    when it can be read in place, else None). tap (--gzinfo): the gzip input's
    compressed bytes also go through it."""
    if source == "-":
        import sys
        raw: BinaryIO = sys.stdin.buffer
        close = None
    else:
        try:
            raw = close = open(source, "rb")
        except OSError as e:
            raise InputError(f"{source}: {e.strerror}") from None
    peek = _Peek(raw, 6)
    kind = detect_type(peek.head)
    if kind == "tarzst":
        raise InputError(f"{source}: input is zstd-compressed (not supported by mkfs --tar)")
    gzinfo = topts.gzinfo or tap is not None
    if gzinfo and kind != "targz":
        raise InputError(f"{source}: input is not gzip-compressed (--gzinfo)")
    if kind == "targz":
        if not (topts.ungzip or gzinfo):
            raise InputError(f"{source}: input is gzip-compressed: use --ungzip")
        return close, _Prefetch(_Gunzip(peek if tap is None else tap.wrap(peek))), None
    if peek.head.startswith(XZ_MAGIC) or (topts.unxz and is_lzma_alone(peek.head)):
        if not topts.unxz:
            raise InputError(f"{source}: input is xz-compressed: use --unxz")
        # liblzma releases the GIL as zlib does: it decodes ahead on its own thread
        return close, _Prefetch(_Unxz(peek, alone=not peek.head.startswith(XZ_MAGIC))), None
    if peek.head.startswith(LZIP_MAGIC) and topts.unxz:
        raise InputError(f"{source}: input is lzip-compressed (not supported by --unxz here)")
    if close is not None and stat.S_ISREG(os.fstat(close.fileno()).st_mode):
        path = _same_file_path(source, close.fileno())
        if path is not None:
            os.lseek(close.fileno(), 0, os.SEEK_SET)     # the peek read through a buffer
            return close, _SeekableTar(close.fileno()), path
    return close, peek, None


def _entry(blk: int) -> int:
    """a chunk index of device 1 at block `blk` (bits 32-47, past a 2 TiB tar: the
    index's le16 at 0, CHUNK_FORMAT_48BIT)"""
    return (blk >> 32) | 1 << 16 | (blk & 0xFFFFFFFF) << 32


def _wide(fmt: int, ents: list[int]) -> tuple[int, list[int]]:
    """CHUNK_FORMAT_48BIT when a block address needs it (as mkfs.erofs 1.9.4 sets it per
    file): its holes then have all 48 bits set"""
    if not any(e & 0xFFFF and e >> 32 != 0xFFFFFFFF for e in ents):
        return fmt, ents
    return fmt | E.CHUNK_FORMAT_48BIT, [e | 0xFFFF if e >> 32 == 0xFFFFFFFF else e
                                        for e in ents]


def _chunk_entries(d: _Data, size: int, name: bytes,
                   bits: int = INDEX_BLKSZBITS) -> tuple[int, list[int]]:
    """--tar=i: (chunk format, chunk index entries) of a file whose data is at d
    (blocks of 2^bits bytes: 512, or an incremental build's base's)."""
    if d.sparse is None:
        cbits = max(bits, (size - 1).bit_length())
        cbits = min(cbits, bits + E.CHUNK_FORMAT_BLKBITS_MASK)
        csz = 1 << cbits
        blk = d.offset >> bits
        ents = [_entry(blk + (i * csz >> bits)) for i in range(-(-size // csz))]
        return _wide(E.CHUNK_FORMAT_INDEXES | (cbits - bits), ents)
    # sparse: the largest chunk that every region starts on and (but at EOF) ends on;
    # the data is then at 512-aligned tar offsets and each chunk is data or hole
    align = 1 << 40
    toff = d.offset
    for off, ln in d.sparse:
        if not ln:              # GNU's closing (size, 0) region marks the file size
            continue
        for v in (off, toff - d.offset) + ((ln,) if off + ln < size else ()):
            if v:
                align = min(align, v & -v)
        toff += ln
    if align < 1 << bits:
        raise InputError(f"{_show(name)}: sparse file with data regions not aligned to "
                         f"{1 << bits} bytes cannot be indexed (use --tar=f)")
    cbits = min(align.bit_length() - 1, bits + E.CHUNK_FORMAT_BLKBITS_MASK,
                max(bits, (size - 1).bit_length()))
    csz = 1 << cbits
    ents = [0xFFFFFFFF << 32] * (-(-size // csz))       # holes
    toff = d.offset
    for off, ln in d.sparse:
        for c in range(off // csz, -(-(off + ln) // csz) if ln else 0):
            ents[c] = _entry((toff + c * csz - off) >> bits)
        toff += ln
    return _wide(E.CHUNK_FORMAT_INDEXES | (cbits - bits), ents)


def mkfs_tar(image: str, source: str, opts: MkfsOptions | None = None,
             topts: TarOptions | None = None,
             progress: Progress | None = None) -> dict[str, Any]:
    """Build IMAGE from the tar SOURCE (a path or '-'); -> summary dict."""
    opts = opts or MkfsOptions()
    topts = topts or TarOptions()
    if topts.mode not in TAR_MODES:
        raise InputError(f"--tar={topts.mode}: unknown mode (f or i)")
    if opts.exclude_paths or opts.exclude_regex:
        raise InputError("--exclude-path/--exclude-regex do not apply to --tar")
    t0 = time.monotonic()
    check_tar_paths(image, source, topts.dump)
    if topts.zinfo is not None:
        check_zinfo_path(topts.zinfo)
        for other in (image, source, topts.dump):
            if other is not None and _same(topts.zinfo, other):
                raise InputError(f"--gzinfo={topts.zinfo}: is the image, the input or the "
                                 "--ungzip FILE")
    check_map_path(topts, image, source)
    # (the spool and sparse copies beside the image; a device's: in TMPDIR)
    directory = (os.environ.get("TMPDIR") or "/var/tmp" if is_block_device(image)
                 else os.path.dirname(os.path.abspath(image)))
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.ExitStack() as stack:
        scratch = stack.enter_context(_scratch(directory))
        dump_fd = None
        if topts.dump is not None:
            # like atomic_output, but the C core reads it back by name before the rename
            ddir = os.path.dirname(os.path.abspath(topts.dump))
            dump_fd = _new_scratch(ddir, scratch, "dump")
            dump_tmp = scratch[-1]
            stack.callback(os.close, dump_fd)
        map_out = None
        if topts.mapfile is not None:
            # (opened first: an unwritable MAPFILE fails before any work; renamed when
            # the stack ends, after the image, only if it was built)
            map_out = stack.enter_context(map_output(topts.mapfile, umask))
        tap = None
        if topts.zinfo is not None:
            # (renamed when the stack ends: after the image, only if it was built)
            tap = GzinfoTap(stack.enter_context(zinfo_output(topts.zinfo, umask)))
        f, stream, in_place = _open_input(source, topts, tap)
        if f is not None:
            stack.callback(f.close)
        if isinstance(stream, _Prefetch):
            stack.callback(stream.close)
        data_path = in_place or source
        decoded = stream            # (before the tee: what is read after the tar's end)
        if dump_fd is not None:
            stream = _Tee(stream, dump_fd)
            data_path = dump_tmp
        elif topts.mode == "f" and in_place is None:
            fd = _new_scratch(directory, scratch, "spool")
            stack.callback(os.close, fd)
            stream = _Tee(stream, fd)
            data_path = scratch[-1]
        reader = TarReader(stream, topts.max_size, headerball=topts.headerball)
        mtimes = opts.inode_mtimes()
        tree = TarTree("aufs" if topts.aufs else "none",
                       timestamp=mtimes.time if mtimes is not None else None,
                       clamp=mtimes is not None and mtimes.clamp,
                       strip=opts.whiteouts == "strip", negative_mtimes=True)
        files = _parse(reader, tree, topts.mode, directory, scratch, progress)
        tar_end = reader.r.offset
        if dump_fd is not None:      # the dump is the whole uncompressed input
            drain(stream, topts.max_size - tar_end)
        elif isinstance(decoded, _Prefetch):    # to the compressed stream's checks
            drain(decoded, topts.max_size - tar_end)
        if tap is not None:
            tap.finish(tar_end)
        info, uuid = _build(image, tree, files, data_path, tar_end, opts, topts, umask,
                            progress, map_out)
        if dump_fd is not None and topts.dump is not None:
            os.fchmod(dump_fd, 0o666 & ~umask)
            os.replace(dump_tmp, topts.dump)
    if progress:
        progress.done()
    return {
        "image": image, "source": source, "mode": topts.mode,
        "inodes": info.inodes, "blocks": info.image_size >> (
            INDEX_BLKSZBITS if topts.mode == "i" and topts.mapfile is None
            else opts.blkszbits),
        "bytes": info.image_size, "data_bytes": info.data_bytes,
        "tar_bytes": tar_end, "entries": tree.entries, "root_nid": info.root_nid,
        "build_time": info.build_time, "uuid": str(_uuid.UUID(bytes=uuid)),
        "seconds": round(time.monotonic() - t0, 3),
    }


def _parse(reader: TarReader, tree: TarTree, mode: str, directory: str,
           scratch: list[str], progress: Progress | None) -> list[int | _Data]:
    """Read every entry into `tree`; -> per TNode key (0, 1, ... in archive order): the
    tar offset of its data (an int: less memory), or _Data for a sparse entry."""
    files: list[int | _Data] = []
    apparent = 0
    nbytes = 0
    for e in reader:
        node = tree.add(e)
        if node is not None and node.key is not None:
            apparent += node.size          # sparse holes cost chunk indexes
            if apparent > reader.r.limit:
                raise InputError(f"{_show(e.name)}: file sizes add up to more than the "
                                 f"limit of {reader.r.limit} bytes (--max-size)")
            assert node.key == len(files), "keys are given in archive order"
            if e.sparse is None:
                files.append(reader.r.offset)
                nbytes += node.size
                if progress:
                    progress.scan(tree.entries, nbytes)
                continue
            # --tar=f keeps the expanded copy, not the map (a map of 10^6 regions per
            # entry, kept for every entry to the end, was a memory bomb)
            d = _Data(reader.r.offset, e.sparse if mode == "i" else None, None, e.name)
            if mode == "f":
                fd = _new_scratch(directory, scratch, "sparse")
                try:
                    _expand_sparse(reader, e.sparse, node.size, fd)
                finally:
                    os.close(fd)
                d.scratch = scratch[-1]
            files.append(d)
            nbytes += node.size
        if progress:
            progress.scan(tree.entries, nbytes)
    tree.finish()
    return files


def _build(image: str, tree: TarTree, files: list[int | _Data], data_path: str,
           tar_end: int, opts: MkfsOptions, topts: TarOptions, umask: int,
           progress: Progress | None, map_out: BinaryIO | None = None) -> tuple[Any, bytes]:
    # --tar=i,MAPFILE: the block size of -b, no tar device, the data in a region of the
    # image the map says how to fill (tar_map.py)
    mapped = topts.mode == "i" and topts.mapfile is not None
    mbox_z = mapped and bool(opts.metabox) and opts.compress is not None
    index = topts.mode == "i" and not mapped
    if index:
        tar_blocks = -(-tar_end >> INDEX_BLKSZBITS)
        if tar_blocks >> 48:
            raise InputError("tar larger than 2^57 bytes cannot be indexed")
        # a tar over 2 TiB: 48-bit block addresses, as mkfs.erofs 1.9.4 turns them on
        wide = opts.sb_48bit or opts.dot_omitted or tar_blocks > 0xFFFFFFFF
        # (the root right after the device table, or after the long xattr prefixes that
        # follow it: the C core's first_nid 0)
        # -m: the metabox as build_options sets it (the 48-bit superblock, its extension
        # slot before the device table, the long prefix table plain)
        mbox = bool(opts.metabox)
        bo = BuildOptions(blkszbits=INDEX_BLKSZBITS,
                          devt_slotoff=-(-(_SB_END + (16 if mbox else 0)) // E.DEVICE_SLOT_SIZE),
                          uuid=opts.uuid if opts.uuid is not None else _uuid.uuid4().bytes,
                          volume_name=opts.label, build_time=opts.effective_timestamp(),
                          shared_xattrs=opts.shared_xattrs, xattr_filter=opts.xattr_filter,
                          ignore_mtime=opts.ignore_mtime, force_compact=opts.force_compact,
                          root_xattr_isize=opts.root_xattr_isize,
                          sb_48bit=wide or mbox, dot_omitted=opts.dot_omitted,
                          compress_dirs=opts.compress_dirs, plain_xattr_pfx=mbox,
                          metabox=(opts.metabox, opts.metabox_alg))
        if opts.compress is not None:
            # -z: the compression pool (stream mode; with nothing streamed the C core
            # still lays the index out inode area first, index_layout)
            zo = build_options(opts)
            bo = dataclasses.replace(bo, stream_data=True,
                                     **{f: getattr(zo, f) for f in _Z_FIELDS})
    elif mapped:
        # -z: the pool in stream mode (nothing streamed: the files are block maps; what
        # it compresses is the --zD packed inode and the -m metabox, written as laid out)
        bo = dataclasses.replace(build_options(opts), stream_data=opts.compress is not None)
    else:
        bo = build_options(opts)
        # inline tails not read ahead by the copy thread are read back from the one tar
        # at write time (cheap: page cache), so little memory is spent holding them
        bo.tail_budget_mib = 4
    force_uid = 0 if opts.all_root else opts.force_uid
    force_gid = 0 if opts.all_root else opts.force_gid
    with image_output(image, mode=0o666 & ~umask, offset=opts.offset) as target, \
            partly_written(target, image), chunk_blob(opts, umask) as blob:
        fd = target.file.fileno()
        nb = NativeBuilder(bo)
        try:
            if opts.metazone:
                set_metazone(nb, opts.metazone)
            if (index or mapped) and bo.stream_data:    # (-z: the pool writes as it goes)
                prepare(nb, target, 1 << INDEX_BLKSZBITS, image)
                nb.set_output(fd)
            if not index and not mapped:
                # (a device: the data's whole blocks at least, as tree_data_bound)
                need = (1 << bo.blkszbits) + (
                    0 if opts.compress or opts.chunksize or not target.device else sum(
                        n.size >> bo.blkszbits << bo.blkszbits
                        for k, n in enumerate(tree.regular) if isinstance(files[k], int)))
                prepare(nb, target, need, image, opts.dsunit)
                nb.set_output(fd)
                start_blob(nb, blob)
            # --xattr-prefix, --xattr-inode-digest (before any xattr)
            digest_id = set_long_prefixes(nb, opts)
            if (force_uid is not None or force_gid is not None or opts.uid_offset
                    or opts.gid_offset):
                _force_ids(tree, force_uid, force_gid, opts.uid_offset, opts.gid_offset)
            if digest_id >= 0 and not index and not mapped:
                # the fingerprint replaces a file's own xattr of its name (see tree.py)
                for n in tree.regular:
                    if n.size and opts.inode_digest in n.xattrs:
                        n.xattrs = {k: v for k, v in n.xattrs.items() if k != opts.inode_digest}
            _, keys, _ = tree.emit(nb)
            path = os.fsencode(data_path)
            starts: list[int] = []
            nblk = base = 0
            lines: list[tuple[int, int]] = []       # (node, key) of each mapped file
            if mapped:
                for d in files:
                    if isinstance(d, _Data) and d.sparse is not None:
                        raise InputError(f"{_show(d.name)}: a sparse file cannot be mapped "
                                         "(--tar=i,MAPFILE; use --tar=f)")
                starts, nblk = region([n.size for n in tree.regular], bo.blkszbits)
                if mbox_z:
                    # the compressed metabox ends the image, compressed in place once
                    # the records are written: the region goes right before its blocks
                    set_gap(nb, nblk)
            # archive order: the tar is read forward; --chunksize: the tree's (the
            # chunks, and which file keeps a shared one, in mkfs.erofs's order)
            for key in sorted(keys, key=lambda k: keys[k] if opts.chunksize else k):
                d = files[key]
                node = keys[key]
                size = tree.regular[key].size
                if not size:
                    continue
                if isinstance(d, int):
                    d = _Data(d)
                if index:
                    fmt, ents = _chunk_entries(d, size, d.name)
                    nb.set_chunks(node, fmt, ents)
                    continue
                if mapped:
                    fmt, ents = chunk_map(size, starts[key], bo.blkszbits)
                    nb.set_chunks(node, fmt, ents)
                    lines.append((node, key))
                    continue
                src, off = ((os.fsencode(d.scratch), 0) if d.scratch is not None
                            else (path, d.offset))
                if digest_id >= 0:
                    # as mkfs.erofs 1.9 --tar=f: each file's fingerprint (not with
                    # --tar=i, whose data stays in the tar unread, as there)
                    nb.add_xattr_long(node, digest_id, b"", _sha256_of(src, off, size))
                nb.set_file(node, src, off, d.scratch is not None)
            if index:
                nb.add_device(b"", tar_blocks, 0)
            info = nb.layout()
            if mapped:
                # the region right after the metadata, as mkfs.erofs 1.9.4 places it
                base = gap_blk(nb) if mbox_z else -(-info.image_size >> bo.blkszbits)
                rebase_chunks(nb, base)
                if nblk and not mbox_z:
                    reserve_bytes(nb, base << bo.blkszbits, nblk << bo.blkszbits)
                    info = nb.refresh_info()
            info = fsalign(nb, info, opts.fsalignblks, bo.blkszbits)
            finish_blob(nb, blob, info, bo.blkszbits)
            if index:
                nb.set_device(1, tar_blocks, info.image_size >> INDEX_BLKSZBITS)
                if not bo.stream_data:
                    prepare(nb, target, info.image_size, image)
            if mapped and not bo.stream_data:
                prepare(nb, target, info.image_size, image)
            wp = None
            if progress:
                wp = lambda done, left: progress.write(info.inodes - left, info.inodes)  # noqa: E731
            nb.write(fd, progress=wp)
            if map_out is not None:
                nids = nb.nids([node for node, _ in lines]) if lines else []
                write_map(map_out, [(nid, map_line(base + starts[key], tree.regular[key].size,
                                                   _offset(files[key]), bo.blkszbits))
                                    for nid, (_, key) in zip(nids, lines)])
            if opts.metabox:
                info = nb.refresh_info()    # (-m -z: the compressed metabox ends it)
        finally:
            nb.close()
    return info, nb.options.uuid


def _offset(d: int | _Data) -> int:
    return d if isinstance(d, int) else d.offset


def _sha256_of(path: bytes, offset: int, size: int) -> bytes:
    """b"sha256:" + the digest of `size` bytes of the file `path` from `offset`."""
    return b"sha256:" + file_sha256(path, offset, size)


def _force_ids(tree: TarTree, uid: int | None, gid: int | None, uid_offset: int = 0,
               gid_offset: int = 0) -> None:
    """--force-uid/--force-gid/--all-root, then the offsets, as mkfs.erofs: added to the
    archive's entries, not to the root and parents the archive leaves implied (mkfs.erofs
    gives those the builder's own uid/gid, or its parent's)."""
    stack: list[tuple[TNode, bytes]] = [(tree.root, b".")]
    seen = set()
    while stack:
        n, name = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if uid is not None:
            n.uid = uid
        if gid is not None:
            n.gid = gid
        if not n.implied:
            n.uid += uid_offset
            n.gid += gid_offset
            if n.uid >= 1 << 32 or n.gid >= 1 << 32:
                what, v = ("uid", n.uid) if n.uid >= 1 << 32 else ("gid", n.gid)
                raise InputError(f"{_show(name)}: {what} overflows with the offset ({v})")
        if n.children is not None:
            stack.extend((c, k) for k, c in n.children.items())
