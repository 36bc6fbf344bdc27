"""Thin, checked wrapper around the compiled C core (erofs_tools._native_cffi).

This is the only module that imports the cffi extension. It converts arguments, checks
them, and turns C error codes into ErofsToolsError subclasses with one-line messages.
The C API itself is documented in csrc/erofs_native.h.

    b = NativeBuilder(BuildOptions(uuid=..., volume_name=b"x"))
    root = b.add_node(stat.S_IFDIR | 0o755, 0, 0, mtime, nsec)
    f = b.add_node(stat.S_IFREG | 0o644, 0, 0, mtime, nsec, size=123)
    b.set_file(f, b"/src/f")
    b.add_child(root, b"f", f)
    b.set_root(root)
    info = b.layout()
    b.write(fd)
"""
from __future__ import annotations

import array
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

from erofs_tools.errors import CorruptImageError, ErofsToolsError, FormatLimitError, InputError
from erofs_tools.format import erofs as E

try:
    from erofs_tools._native_cffi import ffi, lib
except ImportError as e:  # pragma: no cover - only when the package was not installed
    raise ImportError(
        "erofs_tools._native_cffi is missing: install the package (pip install .) so that "
        "csrc/ is compiled") from e

ERN_OK = lib.ERN_OK
FILE_SPARSE = lib.ERN_FILE_SPARSE
# format constants come from erofs_tools/format (the C core's agree: test_format_agreement)
CHUNK_INDEXES = E.CHUNK_FORMAT_INDEXES
FEATURE_COMPAT_SB_CHKSUM = E.FEATURE_COMPAT_SB_CHKSUM
FEATURE_COMPAT_MTIME = E.FEATURE_COMPAT_MTIME
FEATURE_INCOMPAT_CHUNKED_FILE = E.FEATURE_INCOMPAT_CHUNKED_FILE
FEATURE_INCOMPAT_DEVICE_TABLE = E.FEATURE_INCOMPAT_DEVICE_TABLE
# -z algorithm names (as mkfs.erofs) -> struct erofs_opts.compress_alg
COMPRESSORS = {"lz4": lib.ERN_Z_LZ4, "lz4hc": lib.ERN_Z_LZ4HC, "lzma": lib.ERN_Z_LZMA,
               "deflate": lib.ERN_Z_DEFLATE, "zstd": lib.ERN_Z_ZSTD}
MIN_BLKSZBITS = 9               # the C core builds 512 B .. 4 KiB blocks
MAX_BLKSZBITS = E.BLKSZ_BITS

BytesLike = bytes | bytearray | memoryview | str


class SizedInts(Protocol):
    """A count and then the ints themselves (set_chunks: a run of hole chunks is never
    one list)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[int]: ...


class NativeError(ErofsToolsError):
    """The C core refused an operation (API misuse); message says why."""


def _raise(b: Any, code: int, what: str | None = None) -> NoReturn:
    msg = ffi.string(lib.erofs_builder_error(b)).decode("utf-8", "replace")
    if what:
        msg = f"{what}: {msg}"
    if code == lib.ERN_ELIMIT:
        raise FormatLimitError(msg)
    if code == lib.ERN_EIO:
        raise InputError(msg)
    if code == lib.ERN_ENOMEM:
        raise MemoryError(msg)
    raise NativeError(msg)


@dataclass
class BuildOptions:
    """Image-wide options of the C core (see struct erofs_opts)."""
    blkszbits: int = 12
    meta_blkaddr: int = 0          # block of nid 0
    first_nid: int = 0             # nid of the root; 0 = right after the superblock
    feature_compat: int = FEATURE_COMPAT_MTIME
    feature_incompat: int = 0
    sb_checksum: bool = True
    shared_xattrs: bool = True
    shared_xattr_min: int = 0      # an xattr on this many inodes is shared; 0: 2
    root_xattr_isize: int = 0      # the root's xattr ibody at least this (16..65532, 4 | it)
    inline_data: bool = True
    xattr_filter: bool = False     # xattr name filters (mkfs, as mkfs.erofs 1.9; not pack)
    force_extended: bool = False
    ignore_mtime: bool = False     # inodes extended only for their mtime: compact, at the
                                   # build time (mkfs.erofs --ignore-mtime)
    force_compact: bool = False    # an inode that must be extended is an error
    build_time: int | None = None  # None: most common (mtime, nsec) of the tree
    build_time_nsec: int = 0
    uuid: bytes = bytes(E.UUID_SIZE)
    volume_name: bytes = b""
    devt_slotoff: int = 0
    sb_blocks: int = 0             # 0: image size in blocks
    stream_data: bool = False      # copy file data while nodes are added (set_output)
    tail_budget_mib: int = 64      # stream mode: memory for early-read inline tails
    compress_alg: int = 0          # a COMPRESSORS value (stream mode only); 0: none
    compress_level: int = -1       # -1: the algorithm's default
    pcluster_size: int = 0         # bytes per physical cluster; 0: one block
    compress_threads: int = 0      # 0: one per CPU (the image does not depend on it)
    compress_full_index: bool = False  # full 8-byte lcluster indexes (else compact)
    ztailpacking: bool = False     # compressed files' last extents inline
    fragments: bool = False        # compressed files' last extents in the packed inode
    packed_pcluster_size: int = 0  # the packed inode's pcluster bytes; 0: pcluster_size
    dedupe: bool = False           # identical pclusters shared between files
    plain_xattr_pfx: bool = False  # long xattr prefixes after the superblock even with
                                   # fragments (else at the packed inode's start)
    all_fragments: bool = False    # every compressed file whole in the packed inode
    fragdedupe: int = 0            # fragments shared: 0 full, 1 whole files only, 2 off
    sb_48bit: bool = False         # the 48-bit layout (Linux 6.15+)
    dot_omitted: bool = False      # no "." entries (implies sb_48bit)
    compress_dirs: bool = False    # every directory whole in the packed inode (--zD)
    metabox: tuple[int, int] = (0, 0)  # -m: (pcluster bytes (0: off), -z index of its alg)
    compress_alt: tuple[tuple[int, int], ...] = ()   # more (COMPRESSORS value, level) of -z
    compress_dict_size: tuple[int, ...] = ()  # per -z algorithm: dictsize= bytes, 0: default
    compress_lzma_props: tuple[tuple[int, int, int], ...] = ()  # per -z algorithm: lzma's
                                                # (lc, lp, pb), -1: the preset's
    pcluster_max: int = 0          # the largest per-file pcluster (set_zhint); 0: pcluster_size
    max_extent: int = 0            # input bytes per compressed extent at most; 0: no cap
    chunkbits: int = 0             # every file chunk-based, 2^chunkbits-byte chunks; 0: off
    chunk_indexes: bool = False    # with chunkbits: 8-byte chunk indexes (else a block map)
    chunk_dedupe: bool = True      # with chunkbits: equal chunks stored once, zeros holes
    _extra: dict = field(default_factory=dict, repr=False)

    def to_c(self) -> Any:
        o = ffi.new("struct erofs_opts *")
        lib.erofs_default_opts(o)
        if not MIN_BLKSZBITS <= self.blkszbits <= MAX_BLKSZBITS:
            raise NativeError(
                f"block size bits {self.blkszbits} not in {MIN_BLKSZBITS}..{MAX_BLKSZBITS}")
        if len(self.uuid) != E.UUID_SIZE:
            raise NativeError(f"uuid must be {E.UUID_SIZE} bytes")
        if len(self.volume_name) >= E.VOLUME_NAME_SIZE or b"\0" in self.volume_name:
            raise InputError(f"volume label must be at most {E.VOLUME_NAME_SIZE - 1} bytes "
                             "without NUL")
        o.blkszbits = self.blkszbits
        o.meta_blkaddr = self.meta_blkaddr
        o.first_nid = self.first_nid
        o.feature_compat = self.feature_compat
        o.feature_incompat = self.feature_incompat
        o.sb_checksum = int(self.sb_checksum)
        o.shared_xattrs = int(self.shared_xattrs)
        if not 0 <= self.shared_xattr_min < 1 << 32:
            raise NativeError("shared_xattr_min out of range")
        o.shared_xattr_min = self.shared_xattr_min
        if self.root_xattr_isize and not (16 <= self.root_xattr_isize <= 65532
                                          and self.root_xattr_isize % 4 == 0):
            raise NativeError("root_xattr_isize: 0 or a multiple of 4 from 16 to 65532")
        o.root_xattr_isize = self.root_xattr_isize
        o.inline_data = int(self.inline_data)
        o.xattr_filter = int(self.xattr_filter)
        o.force_extended = int(self.force_extended)
        o.ignore_mtime = int(self.ignore_mtime or self.force_compact)
        o.force_compact = int(self.force_compact)
        o.auto_build_time = int(self.build_time is None)
        o.build_time = self.build_time or 0
        o.build_time_nsec = self.build_time_nsec
        ffi.memmove(o.uuid, self.uuid, E.UUID_SIZE)
        ffi.memmove(o.volume_name, self.volume_name.ljust(E.VOLUME_NAME_SIZE, b"\0"),
                    E.VOLUME_NAME_SIZE)
        o.devt_slotoff = self.devt_slotoff
        o.sb_blocks = self.sb_blocks
        o.stream_data = int(self.stream_data)
        o.tail_budget_mib = self.tail_budget_mib
        if self.compress_alg and self.compress_alg not in COMPRESSORS.values():
            raise NativeError(f"unknown compressor code {self.compress_alg}")
        if self.compress_alg and not self.stream_data:
            raise NativeError("compression needs stream_data")
        if not -1 <= self.compress_level < 1 << 31:
            raise NativeError(f"compression level {self.compress_level} out of range")
        if not 0 <= self.pcluster_size < 1 << 32 or not 0 <= self.compress_threads < 1 << 32:
            raise NativeError("pcluster size or thread count out of range")
        o.compress_alg = self.compress_alg
        o.compress_level = self.compress_level
        o.pcluster_size = self.pcluster_size
        o.compress_threads = self.compress_threads
        o.compress_full_index = int(self.compress_full_index)
        o.ztailpacking = int(self.ztailpacking)
        o.fragments = int(self.fragments)
        if not 0 <= self.packed_pcluster_size < 1 << 32:
            raise NativeError("packed pcluster size out of range")
        o.packed_pcluster_size = self.packed_pcluster_size
        o.dedupe = int(self.dedupe)
        o.plain_xattr_pfx = int(self.plain_xattr_pfx)
        o.all_fragments = int(self.all_fragments)
        if self.fragdedupe not in (0, 1, 2):
            raise NativeError(f"fragdedupe mode {self.fragdedupe} not 0, 1 or 2")
        o.fragdedupe = self.fragdedupe
        o.sb_48bit = int(self.sb_48bit or self.dot_omitted)      # (the one implies it)
        o.dot_omitted = int(self.dot_omitted)
        o.compress_dirs = int(self.compress_dirs)
        o.metabox, o.metabox_alg = self.metabox
        o.max_extent = self.max_extent            # (cffi refuses what is not a u32)
        o.chunkbits = self.chunkbits     # (the C core takes it from the block size up)
        o.chunk_indexes = int(self.chunk_indexes)
        o.chunk_nodedupe = int(not self.chunk_dedupe)
        if len(self.compress_alt) > 3:
            raise NativeError("at most 4 algorithms")
        for k, (alg, level) in enumerate(self.compress_alt):
            if alg not in COMPRESSORS.values() or not -1 <= level < 1 << 31:
                raise NativeError(f"bad algorithm {alg} or level {level}")
            o.compress_alt_alg[k] = alg
            o.compress_alt_level[k] = level
        if not 0 <= self.pcluster_max < 1 << 32:
            raise NativeError("pcluster size out of range")
        o.pcluster_max = self.pcluster_max
        if len(self.compress_dict_size) > 4 or len(self.compress_lzma_props) > 4:
            raise NativeError("at most 4 algorithms")
        for k, d in enumerate(self.compress_dict_size):
            if not 0 <= d < 1 << 32:
                raise InputError(f"dictionary size {d} out of range")
            o.compress_dict_size[k] = d
        for k, props in enumerate(self.compress_lzma_props):
            if len(props) != 3 or not all(-1 <= v <= 127 for v in props):
                raise InputError(f"lzma lc/lp/pb {props} out of range")
            o.compress_lzma_lc[k], o.compress_lzma_lp[k], o.compress_lzma_pb[k] = props
        return o


@dataclass
class LayoutInfo:
    inodes: int
    root_nid: int
    meta_blkaddr: int
    meta_start: int
    meta_end: int
    xattr_blkaddr: int
    shared_xattr_bytes: int
    data_start: int
    image_size: int
    build_time: int
    build_time_nsec: int
    feature_compat: int
    feature_incompat: int
    data_bytes: int


def _bytes(v: BytesLike, what: str) -> bytes:
    if isinstance(v, str):
        v = os.fsencode(v)
    if not isinstance(v, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes or str")
    return bytes(v)


class NativeBuilder:
    """One image under construction (node graph -> layout -> write)."""

    def __init__(self, options: BuildOptions | None = None) -> None:
        self.options = options or BuildOptions()
        self._b = ffi.gc(lib.erofs_builder_new(self.options.to_c()), lib.erofs_builder_free)
        if self._b == ffi.NULL:
            raise MemoryError("erofs_builder_new failed")
        self.info: LayoutInfo | None = None
        # hot-path aliases (the directory walk calls these once per entry)
        self._add_node = lib.erofs_node_add
        self._dir_add = lib.erofs_dir_add

    def close(self) -> None:
        """Free the C builder now (stops a stream worker); the object is unusable after."""
        if self._b is not None:
            ffi.release(self._b)
            self._b = None

    def __enter__(self) -> NativeBuilder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_output(self, fd: int) -> None:
        """Stream mode (BuildOptions.stream_data): the image fd, before any set_file().
        File data is then copied by a C worker thread while the caller keeps adding
        nodes; write() must get the same fd. Add a file's xattrs before its data."""
        r = lib.erofs_builder_set_output(self._b, fd)
        if r:
            _raise(self._b, r)

    def set_target(self, base: int, limit: int, device: bool, dsunit: int = 0) -> None:
        """Before set_output()/write(): see erofs_builder_set_target."""
        r = lib.erofs_builder_set_target(self._b, base, limit, int(device), dsunit)
        if r:
            _raise(self._b, r)

    def target_filled(self) -> int:      # zero bytes written to a device's gaps
        n = ffi.new("uint64_t *")
        lib.erofs_builder_target_filled(self._b, n)
        return n[0]

    def stream_progress(self) -> int:
        """Stream mode: bytes copied so far by the worker."""
        done = ffi.new("uint64_t *")
        lib.erofs_builder_stream_progress(self._b, done)
        return done[0]

    # -- nodes ---------------------------------------------------------------------
    def add_node(self, mode: int, uid: int = 0, gid: int = 0, mtime: int = 0,
                 mtime_nsec: int = 0, size: int = 0, rdev_major: int = 0,
                 rdev_minor: int = 0) -> int:
        """Add an inode; -> node id (0, 1, 2 ... in call order). nlink is computed."""
        if not (0 <= uid < 1 << 32 and 0 <= gid < 1 << 32):
            raise FormatLimitError(f"uid/gid {uid}/{gid} do not fit in 32 bits")
        if not 0 <= size < 1 << 63:
            raise FormatLimitError(f"size {size} out of range")
        r = self._add_node(self._b, mode, uid, gid, mtime, mtime_nsec, size, rdev_major,
                           rdev_minor)
        if r < 0:
            _raise(self._b, r)
        return r

    def add_xattr(self, node: int, name: BytesLike, value: BytesLike) -> None:
        """Add xattr `name` (full name, e.g. b"user.x") with `value` to a node."""
        name = _bytes(name, "xattr name")
        value = _bytes(value, "xattr value")
        r = lib.erofs_node_add_xattr(self._b, node, name, len(name), value, len(value))
        if r:
            _raise(self._b, r)

    def set_xattr_prefixes(self, table: BytesLike, count: int, ishare_id: int = -1) -> None:
        """The long xattr name prefix table (`count` encoded entries, see
        format.erofs.encode_long_prefix); `ishare_id`: the entry of the content
        fingerprints, or -1. Before any xattr is added."""
        table = _bytes(table, "xattr prefix table")
        r = lib.erofs_builder_set_xattr_prefixes(self._b, table, len(table), count, ishare_id)
        if r:
            _raise(self._b, r)

    def add_xattr_long(self, node: int, prefix_id: int, name: BytesLike,
                       value: BytesLike) -> None:
        """Add an xattr under long prefix `prefix_id`; `name` is the rest after it."""
        name = _bytes(name, "xattr name")
        value = _bytes(value, "xattr value")
        r = lib.erofs_node_add_xattr_long(self._b, node, prefix_id, name, len(name), value,
                                          len(value))
        if r:
            _raise(self._b, r)

    def add_child(self, dir_node: int, name: BytesLike, child: int) -> None:
        """Add `child` to directory `dir_node` as `name` (bytes, 1..255, no '/' or NUL).
        Adding one non-directory node under several names makes hardlinks."""
        name = _bytes(name, "name")
        r = self._dir_add(self._b, dir_node, name, len(name), child)
        if r:
            _raise(self._b, r)

    def set_file(self, node: int, path: BytesLike, offset: int = 0, sparse: bool = False) -> None:
        """Data of a regular file: copied from `path` (at `offset`) when writing. With
        sparse=True, holes found by SEEK_DATA/SEEK_HOLE become chunk holes (never read)."""
        path = _bytes(path, "path")
        r = lib.erofs_node_set_file(self._b, node, path, len(path), offset,
                                    FILE_SPARSE if sparse else 0)
        if r:
            _raise(self._b, r)

    def set_zhint(self, node: int, pcluster_size: int, alg: int) -> None:
        """Compressed images: this file's pcluster size (0: stored uncompressed) and
        algorithm (index in the -z list); before set_file."""
        if not 0 <= pcluster_size < 1 << 32 or not 0 <= alg < 4:
            raise NativeError(f"bad compression hint ({pcluster_size}, {alg})")
        r = lib.erofs_node_set_zhint(self._b, node, pcluster_size, alg)
        if r:
            _raise(self._b, r)

    def set_bytes(self, node: int, data: BytesLike) -> None:
        """In-memory data (symlink target, small files); len must equal the node size."""
        data = _bytes(data, "data")
        r = lib.erofs_node_set_bytes(self._b, node, data, len(data))
        if r:
            _raise(self._b, r)

    def set_chunks(self, node: int, chunk_format: int, entries: SizedInts) -> None:
        """CHUNK_BASED data given by the caller (RAFS pack). `chunk_format`: low 5 bits =
        log2(chunk size) - blkszbits, 0x20 = 8-byte indexes. `entries`: one int per chunk,
        for indexes `advise | device_id << 16 | blkaddr << 32` (hole: blkaddr 0xFFFFFFFF),
        for the 4-byte block map the block address. Count must be ceil(size/chunk)."""
        n = len(entries)
        arr = ffi.new("uint64_t[]", max(n, 1))
        for i, e in enumerate(entries):
            arr[i] = e
        r = lib.erofs_node_set_chunks(self._b, node, chunk_format, arr, n)
        if r:
            _raise(self._b, r)

    def set_chunks_many(self, chunk_format: int, nodes: array.array[int],
                        counts: array.array[int], entries: array.array[int]) -> None:
        """set_chunks for many nodes at once: counts[i] entries of nodes[i], back to back
        in `entries` (array typecodes "I", "I", "Q"; "I" is 4 bytes on Linux)."""
        if (nodes.typecode, counts.typecode, entries.typecode) != ("I", "I", "Q") \
                or nodes.itemsize != 4 or len(nodes) != len(counts):
            raise ValueError("set_chunks_many: two 'I' arrays of one length, a 'Q' array")
        if nodes:
            e_p = ffi.from_buffer("uint64_t[]", entries) if entries else ffi.NULL
            r = lib.erofs_nodes_set_chunks(
                self._b, chunk_format, ffi.from_buffer("uint32_t[]", nodes),
                ffi.from_buffer("uint32_t[]", counts), len(nodes), e_p, len(entries))
            if r:
                _raise(self._b, r)

    def set_root(self, node: int) -> None:
        r = lib.erofs_builder_set_root(self._b, node)
        if r:
            _raise(self._b, r)

    def dir_names(self, node: int, names: list[bytes]) -> None:
        """A walk is about to add these entries (bytewise sorted) to directory `node`:
        stream mode places the directory before its files (a hint)."""
        blob = b"".join(n + b"\0" for n in names)
        r = lib.erofs_builder_dir_names(self._b, node, blob, len(blob), len(names))
        if r:
            _raise(self._b, r)

    def add_device(self, tag: BytesLike, blocks: int, mapped_blkaddr: int = 0) -> int:
        """Device-table slot (tag <= E.DEVICE_TAG_SIZE bytes); -> device id (1-based).
        Needs BuildOptions.devt_slotoff."""
        tag = _bytes(tag, "tag")
        r = lib.erofs_builder_add_device(self._b, tag, len(tag), blocks, mapped_blkaddr)
        if r < 0:
            _raise(self._b, r)
        return r

    def put_bytes(self, offset: int, data: BytesLike) -> None:
        """Raw bytes written at image `offset` when writing (never over the superblock).
        Before layout(): only below the inode area (RAFS ext superblock, blob table,
        prefetch table). After layout(): also below the first inode, or appended at or
        after the image end (the image grows, block aligned), e.g. the chunk-info table;
        the new size is in refresh_info().image_size."""
        data = _bytes(data, "data")
        r = lib.erofs_builder_put_bytes(self._b, offset, data, len(data))
        if r:
            _raise(self._b, r)

    def set_device(self, device_id: int, blocks: int, mapped_blkaddr: int = 0) -> None:
        """Change device slot `device_id` (1-based) until the image is written."""
        r = lib.erofs_builder_set_device(self._b, device_id, blocks, mapped_blkaddr)
        if r:
            _raise(self._b, r)

    def set_sb_blocks(self, blocks: int) -> None:
        """Write exactly `blocks` (0 included) as sb.blocks instead of the image size."""
        r = lib.erofs_builder_set_sb_blocks(self._b, blocks)
        if r:
            _raise(self._b, r)

    def refresh_info(self) -> LayoutInfo:
        """Layout info now (image_size grows with bytes appended after layout())."""
        return self._get_info(lib.erofs_builder_info)

    def _get_info(self, fn: Callable[[Any, Any], int]) -> LayoutInfo:
        info = ffi.new("struct erofs_layout_info *")
        r = fn(self._b, info)
        if r:
            _raise(self._b, r)
        self.info = LayoutInfo(**{k: getattr(info, k) for k in LayoutInfo.__dataclass_fields__})
        return self.info

    @property
    def node_count(self) -> int:
        return lib.erofs_node_count(self._b)

    # -- layout and write ----------------------------------------------------------
    def layout(self) -> LayoutInfo:
        """Decide every position (nids, blocks); the node graph is fixed after this."""
        return self._get_info(lib.erofs_builder_layout)

    def nid(self, node: int) -> int:
        r = lib.erofs_node_nid(self._b, node)
        if lib.ERN_ENOMEM <= r < 0:
            _raise(self._b, r)
        return r & ((1 << 64) - 1)      # (-m: a metabox nid has bit 63 set)

    def nids(self, nodes: Sequence[int]) -> list[int]:
        return [self.nid(n) for n in nodes]

    def write(self, fd: int, progress: Callable[[int, int], object] | None = None,
              step: int = 256) -> None:
        """Serialize the image into fd (truncated first). progress(bytes_done, nodes_left)
        is called every `step` inodes."""
        r = lib.erofs_builder_write_begin(self._b, fd)
        if r:
            _raise(self._b, r)
        done = ffi.new("uint64_t *")
        while True:
            left = lib.erofs_builder_write_step(self._b, step if progress else 0xFFFFFFFF, done)
            if left < 0:
                _raise(self._b, left)
            if progress:
                progress(done[0], left)
            if left == 0:
                break
        r = lib.erofs_builder_write_end(self._b)
        if r:
            _raise(self._b, r)


def _c_table(fn: Callable[[Any], Any]) -> list[Any]:
    """Rows of a C table returned as (pointer, *count)."""
    n = ffi.new("uint32_t *")
    rows = fn(n)
    return [rows[i] for i in range(n[0])]


def format_fields() -> dict[str, dict[str, tuple[int, int]]]:
    """The C core's on-disk structs: {struct: {field: (offset, size)}}, plus the struct
    size under the key "" (csrc/erofs_fs.h, as compiled)."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for r in _c_table(lib.erofs_fs_fields):
        fields = out.setdefault(ffi.string(r.structure).decode(), {"": (0, r.struct_size)})
        fields[ffi.string(r.field).decode()] = (r.offset, r.size)
    return out


def format_constants() -> dict[str, int]:
    """The format constants the C core writes (csrc/erofs_fs.h), by macro name."""
    return {ffi.string(r.name).decode(): r.value for r in _c_table(lib.erofs_fs_consts)}


# -- decompression of one EROFS pcluster (csrc/decompress.c) ------------------------------
Z_LZ4, Z_LZMA, Z_DEFLATE, Z_ZSTD = (lib.ERN_ZD_LZ4, lib.ERN_ZD_LZMA, lib.ERN_ZD_DEFLATE,
                                    lib.ERN_ZD_ZSTD)
Z_ALGORITHM_NAMES = {Z_LZ4: "lz4", Z_LZMA: "lzma", Z_DEFLATE: "deflate", Z_ZSTD: "zstd"}
# an EROFS pcluster decodes to at most 12 MiB (erofs-utils' Z_EROFS_PCLUSTER_MAX_DSIZE);
# the cap keeps a hostile index from asking for more memory than that
Z_MAX_DECODED = 12 << 20
Z_MAX_INPUT = 1 << 20      # Z_EROFS_PCLUSTER_MAX_SIZE


_new_noclear = ffi.new_allocator(should_clear_after_alloc=False)


def z_decompress(alg: int, data: BytesLike, length: int, partial: bool = False,
                 zero_padding: bool = True, dict_size: int = 0) -> bytes:
    """Decode one pcluster `data` of algorithm `alg` (the on-disk number) into exactly
    `length` bytes; `partial`: the stream may hold more (a shared or legacy pcluster).
    A stream that is corrupt or decodes to another length is a CorruptImageError."""
    data = _bytes(data, "compressed data")
    if alg not in Z_ALGORITHM_NAMES:
        raise CorruptImageError(f"unknown compression algorithm {alg}")
    if not 0 < length <= Z_MAX_DECODED:
        raise CorruptImageError(f"decoded extent length {length} out of range")
    if len(data) > Z_MAX_INPUT:
        raise CorruptImageError(f"compressed cluster of {len(data)} bytes is too large")
    if not 0 <= dict_size < 1 << 32:
        raise CorruptImageError(f"lzma dictionary size {dict_size} out of range")
    out = _new_noclear("uint8_t[]", length)     # every byte is written or it fails
    err = ffi.new("char[]", 160)
    flags = (lib.ERN_ZD_PARTIAL if partial else 0) | \
        (lib.ERN_ZD_ZERO_PADDING if zero_padding else 0)
    r = lib.erofs_z_decompress(alg, data, len(data), out, length, flags, dict_size, err, 160)
    if r == lib.ERN_ENOMEM:
        raise MemoryError(ffi.string(err).decode("utf-8", "replace"))
    if r != ERN_OK:
        raise CorruptImageError(ffi.string(err).decode("utf-8", "replace"))
    return bytes(ffi.buffer(out, length))


# a zran access point (the wrappers using it: _native_zran.py; the cold path: below)
@dataclass(frozen=True)
class ZranPoint:
    """Where inflating can start: the compressed offset of the first whole byte, the
    unread high `bits` of the byte before it (`byte`), the uncompressed offset, and the
    window (the up to 32 KiB of output before the point)."""
    in_offset: int
    out_offset: int
    bits: int
    byte: int
    window: bytes | memoryview   # a view into a parsed index (reader/zran.py)


# -- the daemon's cold path (csrc/coldpath.c) --------------------------------------------
# blob compressor names (format/rafs.py) -> struct ern_cold_chunk.alg
COLD_ALGS = {"none": lib.ERN_COLD_NONE, "zstd": lib.ERN_COLD_ZSTD, "lz4_block": lib.ERN_COLD_LZ4}
COLD_OK = lib.ERN_COLD_OK
COLD_EWRITE = lib.ERN_COLD_EWRITE
COLD_ERRORS = {
    lib.ERN_COLD_EBOUNDS: "outside the fetched range or the cache file",
    lib.ERN_COLD_EFRAME: "not exactly one well-formed zstd frame",
    lib.ERN_COLD_ESIZE: "decompresses to another size than recorded",
    lib.ERN_COLD_EDATA: "bad compressed data",
    lib.ERN_COLD_ENOMEM: "out of memory decoding it",
    lib.ERN_COLD_EALG: "unknown compressor",
    lib.ERN_COLD_EWRITE: "writing it into the cache file failed",
}


class ColdChunks:
    """The chunks of one fetched range for ern_cold_decode / ern_cold_store: `src` the
    range's stored bytes, `dst` a writable buffer for the decoded ones (see
    csrc/erofs_native.h). Holds the buffers while the C core uses them."""

    def __init__(self, n: int, src: bytes | bytearray | memoryview,
                 dst: bytearray | memoryview) -> None:
        self.n = n
        self.arr = ffi.new("struct ern_cold_chunk[]", max(1, n))
        self._src = ffi.from_buffer("uint8_t[]", src)
        self._dst = ffi.from_buffer("uint8_t[]", dst, require_writable=True)
        self.src = memoryview(src).cast("B") if not isinstance(src, bytes) else memoryview(src)
        self.dst = memoryview(dst).cast("B")

    def set(self, i: int, alg: int, src_off: int, src_len: int, ulen: int, dst_off: int,
            file_off: int, index: int) -> None:
        c = self.arr[i]
        c.alg, c.src_off, c.src_len, c.ulen = alg, src_off, src_len, ulen
        c.dst_off, c.file_off, c.index = dst_off, file_off, index

    def decode(self) -> int:
        """Decode every chunk (GIL released); the number that decoded."""
        return int(lib.ern_cold_decode(self._src, len(self._src), self._dst, len(self._dst),
                                       self.arr, self.n))

    def zran(self, first: int, count: int, point: ZranPoint, place: tuple[int, ...]) -> int:
        """ern_cold_zran over chunks first..first+count-1 of one context (GIL released);
        place: (src_off, src_len, skip, dst_off, out_len) of the context"""
        if not 0 <= first <= first + count <= self.n or len(place) != 5 or min(place) < 0:
            raise NativeError("zran: chunk slice or place out of range")
        win = ffi.from_buffer("uint8_t[]", point.window)
        z = ffi.new("struct ern_cold_zctx *", dict(
            zip(("src_off", "src_len", "skip", "dst_off", "out_len"), place), window=win,
            window_size=len(point.window), bits=min(point.bits, 8), byte=point.byte & 0xFF))
        return int(lib.ern_cold_zran(self._src, len(self._src), self._dst, len(self._dst), z,
                                     self.arr + first, count))

    def status(self, i: int) -> int:
        return int(self.arr[i].status)

    def data(self, i: int) -> memoryview:
        """The decoded bytes of chunk i (after decode() gave it COLD_OK)."""
        c = self.arr[i]
        if c.alg == lib.ERN_COLD_NONE:
            return self.src[c.src_off:c.src_off + c.ulen]
        return self.dst[c.dst_off:c.dst_off + c.ulen]

    def mark_verified(self, i: int) -> None:
        self.arr[i].verified = 1

    def verified(self, i: int) -> bool:
        return bool(self.arr[i].verified)

    def store(self, fd: int, file_size: int, bitmap: bytearray, nbits: int,
              state_fd: int = -1, state_off: int = 0) -> tuple[int, int, int]:
        """Write the verified chunks at their file offsets (GIL released), set their bits
        in `bitmap` and the changed bitmap bytes at state_fd + state_off. Returns
        (chunks written, bits newly set, -errno of a failed write or 0)."""
        if nbits > len(bitmap) * 8:
            raise NativeError("chunk-state bitmap smaller than its bit count")
        newly = ffi.new("uint32_t *")
        werr = ffi.new("int *")
        bm = ffi.from_buffer("uint8_t[]", bitmap, require_writable=True)
        written = lib.ern_cold_store(fd, file_size, self._src, len(self._src), self._dst,
                                     len(self._dst), self.arr, self.n, bm, nbits, state_fd,
                                     state_off, newly, werr)
        return int(written), int(newly[0]), int(werr[0])

    def write(self, fd: int, file_size: int, nbits: int) -> tuple[int, int]:
        """store()'s first half: the verified chunks written at their file offsets (GIL
        released; no lock needed). Returns (chunks written, -errno of a failed write or 0)."""
        werr = ffi.new("int *")
        written = lib.ern_cold_write(fd, file_size, self._src, len(self._src), self._dst,
                                     len(self._dst), self.arr, self.n, nbits, werr)
        return int(written), int(werr[0])

    def mark(self, bitmap: bytearray, nbits: int, state_fd: int = -1,
             state_off: int = 0) -> tuple[int, int]:
        """store()'s second half, after write(): the written chunks' bits in `bitmap`
        and the changed bitmap bytes at state_fd + state_off (under the bitmap's lock).
        Returns (bits newly set, -errno of a failed record write or 0)."""
        if nbits > len(bitmap) * 8:
            raise NativeError("chunk-state bitmap smaller than its bit count")
        newly = ffi.new("uint32_t *")
        bm = ffi.from_buffer("uint8_t[]", bitmap, require_writable=True)
        err = lib.ern_cold_mark(self.arr, self.n, bm, nbits, state_fd, state_off, newly)
        return int(newly[0]), int(err)


def cold_decode_one(alg: str, raw: bytes | memoryview, ulen: int) -> bytes | None:
    """One chunk decoded by the cold path's decoder; None if it does not decode."""
    out = bytearray(ulen)
    cc = ColdChunks(1, raw, out)
    cc.set(0, COLD_ALGS[alg], 0, len(raw), ulen, 0, 0, 0)
    cc.decode()
    if cc.status(0) != COLD_OK:
        return None
    return bytes(cc.data(0))


def lz4_block_compress(data: bytes | memoryview) -> bytes | None:
    """One raw LZ4 block of `data`; None when it would not be smaller."""
    n = len(data)
    if n == 0:
        return None
    out = ffi.new("uint8_t[]", n)
    r = lib.ern_lz4_block_compress(ffi.from_buffer("uint8_t[]", data), n, out, n - 1)
    if r < 0:
        raise NativeError(f"lz4: cannot compress {n} bytes")
    return bytes(ffi.buffer(out, r)) if r else None
