"""Open plain EROFS and Nydus RAFS v6 images (bootstraps) and read them.

Every byte is untrusted. Every offset is checked against the image size before use,
every count is bounded by the bytes that would have to hold it, directories are visited
once each, and every problem is a CorruptImageError whose message names the inode path
(or nid) and what is wrong.
"""
from __future__ import annotations

import array
import os
import sys

from erofs_tools.errors import CorruptImageError, ErofsToolsError, ImageChangedError
from erofs_tools.format import erofs as E
from erofs_tools.format import rafs as R
from erofs_tools.fsutil import round_up
from erofs_tools.reader.blobid import shown_id
from erofs_tools.reader.chunkrefs import ChunkList, ChunkRef  # noqa: F401 (re-exported)
from erofs_tools.reader.inode import Dirent, Inode, check_dots, read_inode  # noqa: F401
from erofs_tools.reader.mapped import UNGUARDED, MappedFile
from erofs_tools.reader.metabox import load_metabox, metabox_nid
from erofs_tools.reader.xprefix import read_long_prefixes, read_xattrs
from erofs_tools.reader.zdata import check_unshared, is_compressed, iter_compressed
from erofs_tools.reader.zmap import parse_config

MAX_SYMLINK = 4095
MAX_ZDIR = 256 << 20       # a compressed directory's bytes at most (when over the image size)
MAX_BLOCK_BITS = 16        # we read 512 B .. 64 KiB blocks; the kernel stops at PAGE_SIZE
MIN_BLOCK_BITS = 9
MAX_CHUNK_BITS = 48
MAX_WALK_PATH_BYTES = 2 << 30   # all paths of one walk: a deep tree x a wide bottom directory
META_DEVICE = -1        # map_data's device of an inline tail inside the metabox
MAX_SB_SIZE = 4096 - E.SUPER_OFFSET     # the kernel's bound (a page less the offset)


def _cstr(b):
    return bytes(b).split(b"\0", 1)[0]


class Image:
    """A read-only EROFS / RAFS v6 image.

    `source`: a path, a binary file object (read through mmap), or a bytes-like object.
    `blobs`: an optional BlobSource giving the data of extra devices (see data.py).
    """

    def __init__(self, source, blobs=None, name=None):
        self._map = None            # MappedFile: the mapping and its guard (mapped.py)
        self._file = None
        self._flags, self._slot = UNGUARDED, 0      # _flags[_slot] set: the file shrank
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.data = bytes(source)
            self.name = name or "<image>"
        else:
            if isinstance(source, (str, os.PathLike)):
                try:
                    self._file = open(source, "rb")
                except OSError as e:
                    raise CorruptImageError(f"{source}: cannot open ({e.strerror})") from None
                self.name = name or os.fspath(source)
                f = self._file
            else:
                f = source
                self.name = name or getattr(source, "name", "<image>")
            try:
                fd = f.fileno()
            except (AttributeError, OSError, ValueError):
                fd = None           # e.g. BytesIO: read it whole
            if fd is None:
                f.seek(0)
                self.data = bytes(f.read())
            else:
                try:
                    self._map = MappedFile(fd, self.name)
                except BaseException:
                    self.close()
                    raise
                self.data = self._map.data
                self._flags, self._slot = self._map.flags, self._map.slot
        self.size = len(self.data)
        self.blobs = blobs
        self._inode_cache = {}
        self._zstate = self.zconfig = None      # zdata.py's caches; ZConfig if compressed
        self._xprefixes = None      # long xattr name prefixes, read on first use
        self.metabox = None         # reader/metabox.py's MetaSpace with the feature
        try:
            self._parse_super()
        except CorruptImageError as e:
            raise self.changed() or e from None

    def close(self):
        self.data = b""
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def changed(self) -> ImageChangedError | None:
        """The error when the image file shrank, grew or was rewritten since it was opened
        (mapped.py), else None: checked before an output is committed, and to explain
        an error."""
        return self._map.changed() if self._map is not None else None

    def check_unchanged(self):
        if (e := self.changed()) is not None:
            raise e

    def _torn(self):        # for a copy made after the mapping faulted (it holds zeros)
        return self.changed() or ImageChangedError(f"{self.name}: the image file changed")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- raw access ------------------------------------------------------------------------
    def read(self, offset, length, what="data"):
        if offset < 0 or length < 0 or offset + length > self.size:
            raise CorruptImageError(
                f"{self.name}: {what} at [{offset}, {offset + length}) is outside the image "
                f"({self.size} bytes)")
        out = bytes(self.data[offset:offset + length])
        if self._flags[self._slot]:
            raise self._torn()
        return out

    def _err(self, msg):
        # an inconsistency in bytes that changed under the reader is that change
        return self.changed() or CorruptImageError(f"{self.name}: {msg}")

    # -- superblock ------------------------------------------------------------------------
    def _parse_super(self):
        if self.size < E.SUPER_OFFSET + E.SuperBlock.SIZE:
            raise self._err(f"too small for an EROFS image ({self.size} bytes)")
        sb = E.SuperBlock.decode(self.data, E.SUPER_OFFSET)
        if sb.magic != E.MAGIC:
            raise self._err(f"bad superblock magic {sb.magic:#x}")
        if not MIN_BLOCK_BITS <= sb.blkszbits <= MAX_BLOCK_BITS:
            raise self._err(f"unsupported block size bits {sb.blkszbits}")
        self.sb = sb
        self.blkszbits = sb.blkszbits
        self.blksz = 1 << sb.blkszbits
        if sb.dirblkbits:
            raise self._err(f"dirblkbits {sb.dirblkbits} is not 0")
        known = (E.FEATURE_INCOMPAT_SUPPORTED | E.FEATURE_INCOMPAT_COMPRESSED
                 | E.FEATURE_INCOMPAT_XATTR_PREFIXES | E.FEATURE_INCOMPAT_48BIT
                 | E.FEATURE_INCOMPAT_METABOX)
        if sb.feature_incompat & ~known:
            raise self._err(
                f"unsupported incompatible features {sb.feature_incompat & ~known:#x}")
        self.is_48bit = bool(sb.feature_incompat & E.FEATURE_INCOMPAT_48BIT)
        # the superblock's extension slots (the metabox nid is in the first)
        self.sb_size = E.SuperBlock.SIZE + sb.sb_extslots * E.SB_EXTSLOT_SIZE
        if self.sb_size > MAX_SB_SIZE or E.SUPER_OFFSET + self.sb_size > self.size:
            raise self._err(f"superblock of {self.sb_size} bytes (sb_extslots "
                            f"{sb.sb_extslots}) does not fit")
        if sb.feature_compat & E.FEATURE_COMPAT_SB_CHKSUM:
            need = self.blksz if self.blksz > E.SUPER_OFFSET else E.SUPER_OFFSET + self.blksz
            if self.size < need:
                raise self._err("superblock block truncated")
            if E.superblock_checksum(bytes(self.data[:need])) != sb.checksum:
                raise self._err("superblock checksum mismatch")
        self.meta_off = sb.meta_blkaddr * self.blksz
        self.xattr_off = sb.xattr_blkaddr * self.blksz
        if self.meta_off > self.size:
            raise self._err(f"meta_blkaddr {sb.meta_blkaddr} beyond the image")
        shared_in_mbox = sb.feature_compat & E.FEATURE_COMPAT_SHARED_EA_IN_METABOX
        if sb.xattr_blkaddr and self.xattr_off > self.size and not shared_in_mbox:
            raise self._err(f"xattr_blkaddr {sb.xattr_blkaddr} beyond the image")
        if sb.packed_nid >> E.NID_METABOX_BIT:
            raise self._err(f"packed nid {sb.packed_nid:#x} has bit 63 (in the metabox) set")
        self._parse_48bit(sb)
        # device table
        self.devices = []
        n = sb.extra_devices
        if n:
            if not sb.feature_incompat & E.FEATURE_INCOMPAT_DEVICE_TABLE:
                raise self._err("extra devices without the DEVICE_TABLE feature")
            base = sb.devt_slotoff * E.DEVICE_SLOT_SIZE
            if base < E.SUPER_OFFSET + self.sb_size or \
                    base + n * E.DEVICE_SLOT_SIZE > self.size:
                raise self._err(f"device table ({n} slots at {base}) outside the image")
            for i in range(n):
                self.devices.append(E.DeviceSlot.decode(self.data, base + i * E.DEVICE_SLOT_SIZE))
        m = 1
        while m < n + 1:
            m <<= 1
        self.device_id_mask = m - 1
        self._parse_rafs()
        self.zconfig = parse_config(self)
        mnid = metabox_nid(self)
        if mnid is not None:
            self.metabox = load_metabox(self, mnid)
        # root
        if self.root_nid == 0:
            raise self._err("root nid is 0")
        root = self.inode(self.root_nid)
        if not root.is_dir():
            raise self._err(f"root inode (nid {self.root_nid}) is not a directory")

    def _parse_48bit(self, sb):
        """The root nid, the epoch compact inodes' mtimes count from (and its nsec),
        the build time: in the 48-bit layout the root nid is le64 rootnid_8b unless 0
        (then the le16, as mkfs.erofs writes it for a small root nid), the epoch
        signed and the build time the epoch + a le32 (format/erofs.py)."""
        self.root_nid, self.blocks = sb.root_nid, sb.blocks
        self.epoch, self.fixed_nsec = sb.build_time, sb.build_time_nsec
        self.build_time = sb.build_time
        if self.is_48bit:
            base = E.SUPER_OFFSET
            rootnid_8b = int.from_bytes(
                self.data[base + E.SB_ROOTNID_8B_OFFSET:base + E.SB_ROOTNID_8B_OFFSET + 8],
                "little")
            if rootnid_8b:         # (the le16 is then blocks_hi)
                self.root_nid, self.blocks = rootnid_8b, sb.blocks | sb.root_nid << 32
            if sb.build_time >> 63:
                self.epoch -= 1 << 64
            self.build_time = self.epoch + int.from_bytes(
                self.data[base + E.SB_BUILD_TIME32_OFFSET:base + E.SB_BUILD_TIME32_OFFSET + 4],
                "little")

    def _parse_rafs(self):
        self.rafs = None
        self.blob_entries = []
        self._chunk_table, self._chunk_infos = (0, 0), None   # (offset, entries); lazy
        self._prefetch_table = (0, 0)          # (offset, bytes); decoded on first use
        self._prefetch = None           # array.array once decoded
        sb = self.sb
        if not sb.feature_compat & E.FEATURE_COMPAT_RAFS_V6:
            return
        if self.size < E.SUPER_OFFSET + E.SuperBlock.SIZE + R.ExtSuperBlock.SIZE:
            raise self._err("RAFS extended superblock truncated")
        ext = R.ExtSuperBlock.decode(self.data, R.EXT_SUPER_OFFSET)
        self.rafs = ext
        cs = ext.s_chunk_size
        if cs < R.CHUNK_SIZE_MIN or cs > R.CHUNK_SIZE_MAX or cs & (cs - 1):
            raise self._err(f"RAFS chunk size {cs:#x} is not a power of two in [4 KiB, 16 MiB]")
        devt_end = (R.DEVT_OFFSET + len(self.devices) * E.DEVICE_SLOT_SIZE)
        tables = []

        def table(off, size, unit, what, align=True):
            if size == 0:
                return
            if (align and off % 4096) or off < 4096 or off < devt_end or size % unit \
                    or off + size > self.size:
                raise self._err(f"RAFS {what} at {off} ({size} bytes) is invalid or outside the image")
            tables.append((off, off + size, what))

        table(ext.s_blob_table_offset, ext.s_blob_table_size, R.BlobEntry.SIZE, "blob table")
        table(ext.s_chunk_table_offset, ext.s_chunk_table_size, R.ChunkInfo.SIZE, "chunk info table")
        if ext.s_prefetch_table_offset:
            table(ext.s_prefetch_table_offset, ext.s_prefetch_table_size, 4, "prefetch table",
                  align=False)
        tables.sort()
        for a, b in zip(tables, tables[1:]):
            if a[1] > b[0]:
                raise self._err(f"RAFS {a[2]} overlaps the {b[2]}")
        nblobs = ext.s_blob_table_size // R.BlobEntry.SIZE
        if nblobs > R.MAX_BLOBS:
            raise self._err(f"{nblobs} blobs, more than {R.MAX_BLOBS}")
        for i in range(nblobs):
            be = R.BlobEntry.decode(self.data, ext.s_blob_table_offset + i * R.BlobEntry.SIZE)
            self.blob_entries.append(be)
        if ext.s_chunk_table_size:
            self._chunk_table = (ext.s_chunk_table_offset,
                                 ext.s_chunk_table_size // R.ChunkInfo.SIZE)
        if ext.s_prefetch_table_offset and ext.s_prefetch_table_size:
            self._prefetch_table = (ext.s_prefetch_table_offset, ext.s_prefetch_table_size)

    @property
    def prefetch(self) -> array.array:
        """The RAFS prefetch table (nids), decoded when first asked for and held as 4-byte
        integers: a table of 4 GiB is legal, and as a list of ints it cost 9x its size
        and seconds for every command that opened the image."""
        if self._prefetch is None:
            off, size = self._prefetch_table
            out = array.array("I")
            if size:
                out.frombytes(self.read(off, size, "prefetch table"))
                if sys.byteorder != "little":
                    out.byteswap()
            self._prefetch = out
        return self._prefetch

    @property
    def chunk_infos(self) -> list:
        """The RAFS chunk-info table as R.ChunkInfo records (decoded on first use)."""
        if self._chunk_infos is None:
            off, n = self._chunk_table
            infos = R.ChunkInfo.decode_many(self.data, off, n) if n else []
            if self._flags[self._slot]:
                raise self._torn()
            self._chunk_infos = infos
        return self._chunk_infos

    def chunk_info_rows(self):
        """The chunk-info table as tuples in R.ChunkInfo field order, no records."""
        off, n = self._chunk_table
        if not n:
            return iter(())
        return R.ChunkInfo.iter_rows(self.data, off, n)

    @property
    def is_rafs(self):
        return self.rafs is not None

    def blob_id(self, device):
        """Blob id / device tag of extra device `device` (1-based)."""
        if 1 <= device <= len(self.devices):
            tag = _cstr(self.devices[device - 1].tag)
            if not tag and device - 1 < len(self.blob_entries):
                tag = _cstr(self.blob_entries[device - 1].blob_id)
            return shown_id(tag)
        raise self._err(f"no device {device}")

    def blob_meta(self, device):
        """The BlobMeta of blob device `device` (1-based) from the blobs given at open,
        or None: no blobs given, a raw device, or a blob that cannot be opened."""
        if self.blobs is None:
            return None
        try:
            return self.blobs.meta(device)
        except ErofsToolsError:
            return None

    def blob_digests(self, blob_index):
        """{ci_index: digest} for one blob from the bootstrap's chunk info table."""
        out = {}
        for ci in self.chunk_infos:
            if ci.blob_index == blob_index:
                out[ci.index] = ci.digest
        return out

    # -- inodes ----------------------------------------------------------------------------
    def inode(self, nid) -> Inode:
        ino = self._inode_cache.get(nid)
        if ino is not None:
            return ino
        ino = self._read_inode(nid)
        if len(self._inode_cache) < 100000:
            self._inode_cache[nid] = ino
        return ino

    def _read_inode(self, nid):
        ino = read_inode(self, nid)
        if self._flags[self._slot]:
            raise self._torn()
        return ino

    def metabox_space(self, nid):
        """The MetaSpace holding in-metabox inode `nid` (bit 63 set)."""
        if self.metabox is None:
            raise self._err(f"nid {nid:#x} is in the metabox (bit 63), which this image "
                            "has none of")
        return self.metabox

    def space_of(self, ino):
        """What holds `ino`'s bytes (offset, data_end count in it): this image, or the
        metabox for a nid with bit 63 set."""
        return self.metabox_space(ino.nid) if ino.nid >> E.NID_METABOX_BIT else self

    def shared_xattr_space(self):
        """Where the shared xattr area is: the image, or the metabox (COMPAT bit 0x8)."""
        if self.sb.feature_compat & E.FEATURE_COMPAT_SHARED_EA_IN_METABOX:
            return self.metabox_space(-1)
        return self

    # -- data mapping ----------------------------------------------------------------------
    def chunk_format(self, ino):
        fmt = ino.i_u & 0xFFFF
        if fmt & ~(E.CHUNK_FORMAT_SUPPORTED | (E.CHUNK_FORMAT_48BIT if self.is_48bit else 0)):
            raise self._err(f"inode {ino.nid}: unsupported chunk format {fmt:#x}")
        bits = self.blkszbits + (fmt & E.CHUNK_FORMAT_BLKBITS_MASK)
        if bits > MAX_CHUNK_BITS:
            raise self._err(f"inode {ino.nid}: chunk size 2^{bits} too large")
        return fmt, bits

    def chunks(self, ino, chunk_bits=None):
        """The index array of a chunk-based inode as ChunkRefs (kernel view by default;
        `chunk_bits` reads it at another granularity, e.g. the RAFS chunk size)."""
        if ino.layout != E.LAYOUT_CHUNK_BASED:
            return []
        fmt, bits = self.chunk_format(ino)
        if chunk_bits is not None:
            bits = chunk_bits
        csize = 1 << bits
        count = (ino.size + csize - 1) >> bits
        unit = 8 if fmt & E.CHUNK_FORMAT_INDEXES else 4
        start = round_up(ino.data_end, unit)
        sp = self.space_of(ino)
        if count > (sp.size - start) // unit if start <= sp.size else True:
            raise self._err(f"inode {ino.nid}: {count} chunk indexes do not fit in the image "
                            f"(size {ino.size}, chunk {csize})")
        raw = sp.read(start, count * unit, f"inode {ino.nid} chunk indexes")
        return ChunkList(self, ino, raw, unit, bits, count,
                         wide=bool(fmt & E.CHUNK_FORMAT_48BIT and unit == 8))

    def map_data(self, ino):
        """Yield extents (file_offset, length, device, physical_offset) covering the
        inode's data; device None = hole. Every extent is bounds-checked (device 0
        against the image; blob devices later, by whoever reads them)."""
        size = ino.size
        if size == 0:
            return
        bs = self.blksz
        if ino.layout == E.LAYOUT_FLAT_PLAIN:
            blk = ino.startblk
            if blk == E.NULL_ADDR:
                yield 0, size, None, None         # 6.15+: whole-file hole
                return
            base = blk * bs
            if base + size > self.size:
                raise self._err(f"inode {ino.nid}: data [{base}, {base + size}) outside the image")
            yield 0, size, 0, base
        elif ino.layout == E.LAYOUT_FLAT_INLINE:
            nblocks = (size + bs - 1) // bs
            full = (nblocks - 1) * bs
            tail = size - full
            if full:
                blk = ino.startblk
                base = blk * bs
                if blk == E.NULL_ADDR or base + full > self.size:
                    raise self._err(f"inode {ino.nid}: data blocks outside the image")
                yield 0, full, 0, base
            toff = ino.data_end
            if toff % bs + tail > bs:
                raise self._err(f"inode {ino.nid}: inline data crosses a block boundary")
            sp = self.space_of(ino)
            if toff + tail > sp.size:
                raise self._err(f"inode {ino.nid}: inline data outside the image")
            yield full, tail, (0 if sp is self else META_DEVICE), toff
        elif is_compressed(ino):
            raise self._err(f"inode {ino.nid}: compressed data has no direct mapping")
        elif ino.layout == E.LAYOUT_CHUNK_BASED:
            hole_start = hole_len = 0
            for c in self.chunks(ino):
                if c.hole:
                    # one extent per run of holes: a sparse file may have millions
                    if not hole_len:
                        hole_start = c.file_offset
                    hole_len += c.length
                    continue
                if hole_len:
                    yield hole_start, hole_len, None, None
                    hole_len = 0
                base = c.blkaddr * bs
                if c.device == 0 and base + c.length > self.size:
                    raise self._err(
                        f"inode {ino.nid}: chunk {c.index} at block {c.blkaddr} outside the image")
                yield c.file_offset, c.length, c.device, base
            if hole_len:
                yield hole_start, hole_len, None, None
        else:
            raise self._err(f"inode {ino.nid}: unsupported data layout {ino.layout_name}")

    def iter_data(self, ino, blobs=None, piece=1 << 20):
        """Yield (file_offset, bytes or None, length) pieces covering the inode's data;
        None = hole (zeros). Raises CorruptImageError on any inconsistency."""
        blobs = blobs if blobs is not None else self.blobs
        if is_compressed(ino):
            yield from iter_compressed(self, ino, piece)
            return
        for fo, length, dev, phys in self.map_data(ino):
            if dev is None:
                yield fo, None, length
            elif dev == META_DEVICE:
                yield fo, self.space_of(ino).read(phys, length, f"inode {ino.nid} inline data"), length
            elif dev == 0:
                for pos in range(0, length, piece):
                    n = min(piece, length - pos)
                    data = bytes(self.data[phys + pos:phys + pos + n])
                    if self._flags[self._slot]:
                        raise self._torn()
                    yield fo + pos, data, n
            else:
                if blobs is None:
                    raise self._err(
                        f"inode {ino.nid}: data is in blob {self.blob_id(dev)} "
                        f"(device {dev}); give the blob directory")
                for pos in range(0, length, piece):
                    n = min(piece, length - pos)
                    data = blobs.read(self, dev, phys + pos, n)
                    if len(data) != n:
                        raise self._err(f"inode {ino.nid}: short read from device {dev}")
                    yield fo + pos, data, n

    def read_data(self, ino, blobs=None, limit=None):
        """All data of an inode as bytes (for directories, symlinks, small files)."""
        if limit is not None and ino.size > limit:
            raise self._err(f"inode {ino.nid}: size {ino.size} exceeds {limit}")
        if ino.size > self.size and ino.layout != E.LAYOUT_CHUNK_BASED and \
                not is_compressed(ino):
            raise self._err(f"inode {ino.nid}: size {ino.size} larger than the image")
        out = bytearray()
        for _off, data, n in self.iter_data(ino, blobs):
            out += data if data is not None else bytes(n)
        return bytes(out)

    # -- symlinks --------------------------------------------------------------------------
    def readlink(self, ino) -> bytes:
        if not ino.is_lnk():
            raise self._err(f"inode {ino.nid} is not a symlink")
        if ino.size == 0 or ino.size > MAX_SYMLINK:
            raise self._err(f"inode {ino.nid}: symlink length {ino.size} out of range")
        target = self.read_data(ino, limit=MAX_SYMLINK)
        if b"\0" in target:
            raise self._err(f"inode {ino.nid}: symlink target contains NUL")
        return target

    # -- directories -----------------------------------------------------------------------
    def dirents(self, ino) -> list:
        """All entries of a directory (including '.' and '..'), as stored ('.' is not
        there in a directory whose format says omitted: Inode.dot_omitted)."""
        if not ino.is_dir():
            raise self._err(f"inode {ino.nid} is not a directory")
        # a compressed directory (mkfs.erofs 1.9 --zD, ours) may decode to more than the
        # image holds: bounded then by MAX_ZDIR (a million entries of 255-byte names)
        if ino.size > (max(self.size, MAX_ZDIR) if is_compressed(ino) else self.size):
            raise self._err(f"directory {ino.nid}: size {ino.size} larger than the image")
        if is_compressed(ino):
            check_unshared(self, ino, f"directory {ino.nid}")
        bs = self.blksz
        out = []
        for bno, blk in enumerate(self._dir_blocks(ino)):
            bstart = bno * bs
            used = len(blk)
            if used < E.Dirent.SIZE:
                raise self._err(f"directory {ino.nid}: block {bstart // bs} too short for a dirent")
            first = E.Dirent.decode(blk, 0)
            n0 = first.nameoff
            if n0 < E.Dirent.SIZE or n0 >= bs or n0 % E.Dirent.SIZE or n0 > used:
                raise self._err(f"directory {ino.nid}: invalid de[0].nameoff {n0} in block {bstart // bs}")
            count = n0 // E.Dirent.SIZE
            des = [E.Dirent.decode(blk, i * E.Dirent.SIZE) for i in range(count)]
            for i, de in enumerate(des):
                start = de.nameoff
                if i + 1 < count:
                    end = des[i + 1].nameoff
                else:
                    end = used
                    nul = blk.find(b"\0", start, used)
                    if nul >= 0:
                        end = nul
                if start < n0 or end > used or end <= start:
                    raise self._err(f"directory {ino.nid}: bad nameoff {start} in block {bstart // bs}")
                name = blk[start:end]
                if len(name) > E.NAME_MAX:
                    raise self._err(f"directory {ino.nid}: name longer than {E.NAME_MAX} bytes")
                if b"/" in name or b"\0" in name:
                    raise self._err(f"directory {ino.nid}: name {name!r} contains '/' or NUL")
                out.append(Dirent(name, de.nid, de.file_type))
        return out

    def _dir_blocks(self, ino):
        """A directory's data a block at a time (the last may be short), read as dirents()
        parses them: a bad block ends the read, not after it (a compressed directory of
        MAX_ZDIR zeros, one extent record, cost 2 s and 530 MiB before its refusal)."""
        bs = self.blksz
        buf = bytearray()
        for _off, data, n in self.iter_data(ino):
            buf += data if data is not None else bytes(n)
            whole = len(buf) // bs * bs
            for b in range(0, whole, bs):
                yield bytes(buf[b:b + bs])
            del buf[:whole]
        if buf:
            yield bytes(buf)

    def listdir(self, ino):
        """Entries without '.' and '..'."""
        return [d for d in self.dirents(ino) if d.name not in (b".", b"..")]

    def lookup(self, path) -> Inode:
        """Inode at an absolute path inside the image (symlinks are not followed)."""
        if isinstance(path, str):
            path = os.fsencode(path)
        ino = self.inode(self.root_nid)
        seen = 0
        for comp in path.split(b"/"):
            if comp in (b"", b"."):
                continue
            if not ino.is_dir():
                raise CorruptImageError(f"{self.name}: {os.fsdecode(path)}: not a directory")
            for d in self.dirents(ino):
                if d.name == comp:
                    ino = self.inode(d.nid)
                    break
            else:
                raise CorruptImageError(f"{self.name}: {os.fsdecode(path)}: no such file")
            seen += 1
            if seen > 4096:
                raise self._err("path too deep")
        return ino

    def walk(self, on_error=None):
        """Yield (path bytes, Dirent-or-None, Inode) for every entry, parents first.

        Each directory nid is entered once; a second link to a directory (a loop or a
        hard-linked directory) is a CorruptImageError. With `on_error(path, exc)`, errors
        are reported and the offending subtree skipped; otherwise they propagate.
        """
        root = self.inode(self.root_nid)
        yield b"/", None, root
        visited = {self.root_nid}
        stack = [(b"/", root, self.root_nid)]
        spent = 0         # bytes of paths made: their sum grows as depth x entries
        while stack:
            path, dino, parent_nid = stack.pop()
            try:
                ents = self.dirents(dino)
                check_dots(self, dino, ents, parent_nid)
                if len({d.name for d in ents}) != len(ents):
                    # a tar stream holding one name twice (a symlink, then a directory
                    # through it) writes outside the target of a naive extractor
                    raise self._err(f"directory {dino.nid}: duplicate names")
            except CorruptImageError as e:
                if on_error is None or isinstance(e, ImageChangedError):
                    raise
                on_error(path, e)
                continue
            subdirs = []
            for d in ents:
                if d.name in (b".", b".."):
                    continue
                if (spent := spent + len(path) + len(d.name) + 1) > MAX_WALK_PATH_BYTES:
                    raise self._err("the paths add up to more than 2 GiB (a crafted deep tree?)")
                cpath = (path if path.endswith(b"/") else path + b"/") + d.name
                try:
                    ino = self.inode(d.nid)
                    if ino.is_dir():
                        if d.nid in visited:
                            raise self._err(
                                f"directory nid {d.nid} linked more than once (loop or hard-linked directory)")
                        visited.add(d.nid)
                        subdirs.append((cpath, ino, dino.nid))
                except CorruptImageError as e:
                    if on_error is None or isinstance(e, ImageChangedError):
                        raise
                    on_error(cpath, e)
                    continue
                yield cpath, d, ino
            stack.extend(reversed(subdirs))

    # -- xattrs ----------------------------------------------------------------------------
    def long_xattr_prefixes(self) -> list:
        """The long xattr name prefixes (full names, bytes), [] without the feature."""
        if self._xprefixes is None:
            self._xprefixes = read_long_prefixes(self)
        return self._xprefixes

    def xattrs(self, ino) -> list:
        """[(name, value)] of an inode, shared ones first, as stored."""
        return read_xattrs(self, ino)


def open_image(source, blob_dir=None, devices=None, verify=True) -> Image:
    """Open an image; with `blob_dir` / `devices`, file data on extra devices is readable."""
    from erofs_tools.reader.data import BlobSource
    img = Image(source)
    if blob_dir is not None or devices:
        img.blobs = BlobSource(img, blob_dir=blob_dir, devices=devices, verify=verify)
    return img
