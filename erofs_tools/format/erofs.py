"""EROFS on-disk format (uncompressed subset): see shared reference erofs-format.md.

The Python twin of csrc/erofs_fs.h: same structs, same field names (the C core exposes
its offsets and tests/test_format_agreement.py compares them with these).
"""
from __future__ import annotations

import stat as _stat

from erofs_tools.format._struct import Record

# --- superblock -------------------------------------------------------------------------
SUPER_OFFSET = 1024
MAGIC = 0xE0F5E1E2
BLKSZ_BITS = 12
BLKSZ = 1 << BLKSZ_BITS
SLOT_SIZE = 32          # inode slot: nid * 32 bytes from the meta area start
NULL_ADDR = 0xFFFFFFFF  # hole / "no block"

FEATURE_COMPAT_SB_CHKSUM = 0x1
FEATURE_COMPAT_MTIME = 0x2
FEATURE_COMPAT_XATTR_FILTER = 0x4
FEATURE_COMPAT_SHARED_EA_IN_METABOX = 0x8  # the shared xattr area inside the metabox
FEATURE_COMPAT_PLAIN_XATTR_PFX = 0x10   # the long prefix table in metadata, not the packed inode
FEATURE_COMPAT_ISHARE_XATTRS = 0x20     # per-inode content fingerprints (page-cache sharing)
FEATURE_COMPAT_RAFS_V6 = 0x4000_0000

FEATURE_INCOMPAT_CHUNKED_FILE = 0x4
FEATURE_INCOMPAT_DEVICE_TABLE = 0x8
FEATURE_INCOMPAT_48BIT = 0x80     # the 48-bit layout (mkfs.erofs 1.9 -E48bit, Linux 6.15+)
FEATURE_INCOMPAT_METABOX = 0x100  # metadata compression (mkfs.erofs 1.9 -m, Linux 6.17+)
# Bits every kernel from 5.19 to 6.18 accepts and that we know how to read.
FEATURE_INCOMPAT_SUPPORTED = FEATURE_INCOMPAT_CHUNKED_FILE | FEATURE_INCOMPAT_DEVICE_TABLE


class SuperBlock(Record):
    FIELDS = (
        ("magic", "I"), ("checksum", "I"), ("feature_compat", "I"),
        ("blkszbits", "B"), ("sb_extslots", "B"), ("root_nid", "H"),
        ("inos", "Q"), ("build_time", "Q"), ("build_time_nsec", "I"),
        ("blocks", "I"), ("meta_blkaddr", "I"), ("xattr_blkaddr", "I"),
        ("uuid", "16s"), ("volume_name", "16s"), ("feature_incompat", "I"),
        ("u1", "H"), ("extra_devices", "H"), ("devt_slotoff", "H"),
        ("dirblkbits", "B"), ("xattr_prefix_count", "B"), ("xattr_prefix_start", "I"),
        ("packed_nid", "Q"), ("xattr_filter_reserved", "B"), ("ishare_xattr_prefix_id", "B"),
        (None, "22x"),
    )


assert SuperBlock.SIZE == 128

# The 48-bit layout (FEATURE_INCOMPAT_48BIT) gives the superblock's fields other roles:
# build_time (0x18) is the epoch compact inodes' i_mtime counts from (signed), the le16
# root_nid (0x0E) is blocks_hi when rootnid_8b is not 0, and the build time is the epoch
# plus a le32 at 0x6C. (Inside the reserved tail of SuperBlock, which csrc/erofs_fs.h
# keeps as one array: read by offset.)
SB_BUILD_TIME32_OFFSET = 0x6C
SB_ROOTNID_8B_OFFSET = 0x70
# Metadata compression (FEATURE_INCOMPAT_METABOX): the superblock is 144 bytes (one
# 16-byte extension slot, sb_extslots 1) and its le64 at 0x80 is the nid of the metabox
# inode, a regular file (compressed or not) whose data holds the inodes of every nid
# with bit 63 set: such an inode is at (nid & NID_MASK) * 32 in that data, not in the
# metadata area; its xattrs, inline tail, chunk or lcluster indexes and inline
# pcluster follow it there. The metabox inode's own nid must not have the bit.
SB_EXTSLOT_SIZE = 16
SB_METABOX_NID_OFFSET = 0x80
NID_METABOX_BIT = 63
NID_MASK = (1 << NID_METABOX_BIT) - 1

CHECKSUM_FIELD = SUPER_OFFSET + SuperBlock.field_layout()["checksum"][0]
UUID_SIZE = SuperBlock.field_layout()["uuid"][1]
VOLUME_NAME_SIZE = SuperBlock.field_layout()["volume_name"][1]   # NUL padded


def crc32c_raw(data: bytes, crc: int = 0xFFFFFFFF) -> int:
    """CRC-32C (Castagnoli) with the given seed and no final XOR (the EROFS convention).

    Pure-Python fallback used by the reader; the builder uses the C implementation.
    """
    table = _crc_table()
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


_TABLE: list[int] | None = None


def _crc_table() -> list[int]:
    global _TABLE
    if _TABLE is None:
        t = []
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
            t.append(c)
        _TABLE = t
    return _TABLE


def superblock_checksum(block0: bytes) -> int:
    """Checksum over [1024, blksz) of the first block with the checksum field zeroed."""
    blksz = 1 << block0[SUPER_OFFSET + 12]
    end = blksz if blksz > SUPER_OFFSET else SUPER_OFFSET + blksz
    data = bytearray(block0[SUPER_OFFSET:end])
    at = CHECKSUM_FIELD - SUPER_OFFSET
    data[at:at + 4] = b"\0\0\0\0"
    return crc32c_raw(bytes(data))


# --- inodes ---------------------------------------------------------------------------
INODE_COMPACT = 0
INODE_EXTENDED = 1

LAYOUT_FLAT_PLAIN = 0
LAYOUT_COMPRESSED_FULL = 1
LAYOUT_FLAT_INLINE = 2
LAYOUT_COMPRESSED_COMPACT = 3
LAYOUT_CHUNK_BASED = 4
LAYOUT_NAMES = {0: "FLAT_PLAIN", 1: "COMPRESSED_FULL", 2: "FLAT_INLINE",
                3: "COMPRESSED_COMPACT", 4: "CHUNK_BASED"}

I_FORMAT_BITS = 0xF  # version + datalayout; bit 4 is the 48-bit layout's (below)
# i_format bit 4 (48-bit layout only): on a directory, no "." dirent (-Edot-omitted); on
# another compact inode, nlink 1 and its le16 at 6 the block address's bits 32-47
I_FORMAT_BIT4 = 1 << 4
I_DOT_OMITTED = I_FORMAT_BIT4
I_NLINK_1 = I_FORMAT_BIT4
ADDR_MASK_48 = (1 << 48) - 1


def i_format(version: int, layout: int) -> int:
    return version | (layout << 1)


def i_format_version(fmt: int) -> int:
    return fmt & 1


def i_format_layout(fmt: int) -> int:
    return (fmt >> 1) & 0x7


class CompactInode(Record):
    FIELDS = (
        ("i_format", "H"), ("i_xattr_icount", "H"), ("i_mode", "H"), ("i_nlink", "H"),
        ("i_size", "I"), ("i_mtime", "I"), ("i_u", "I"), ("i_ino", "I"),
        ("i_uid", "H"), ("i_gid", "H"), (None, "4x"),
    )


class ExtendedInode(Record):
    FIELDS = (
        ("i_format", "H"), ("i_xattr_icount", "H"), ("i_mode", "H"), ("i_nb", "H"),
        ("i_size", "Q"), ("i_u", "I"), ("i_ino", "I"),
        ("i_uid", "I"), ("i_gid", "I"), ("i_mtime", "Q"), ("i_mtime_nsec", "I"),
        ("i_nlink", "I"), (None, "16x"),
    )


assert CompactInode.SIZE == 32 and ExtendedInode.SIZE == 64


def xattr_ibody_size(icount: int) -> int:
    """Bytes of the inline xattr area for a given i_xattr_icount."""
    return 0 if icount == 0 else XattrIbodyHeader.SIZE + 4 * (icount - 1)


# --- chunk-based files ------------------------------------------------------------------
CHUNK_FORMAT_BLKBITS_MASK = 0x1F
CHUNK_FORMAT_INDEXES = 0x20
CHUNK_FORMAT_48BIT = 0x40     # chunk indexes' le16 at 0 is the block address's bits 32-47
CHUNK_FORMAT_SUPPORTED = 0x3F


class ChunkIndex(Record):
    FIELDS = (("advise", "H"), ("device_id", "H"), ("blkaddr", "I"))


assert ChunkIndex.SIZE == 8


# --- compressed files ------------------------------------------------------------------
FEATURE_INCOMPAT_ZERO_PADDING = 0x1    # compressed bytes right-aligned in their pcluster
FEATURE_INCOMPAT_COMPR_CFGS = 0x2      # per-algorithm records after the superblock
FEATURE_INCOMPAT_BIG_PCLUSTER = 0x2    # same bit: pclusters over one block
FEATURE_INCOMPAT_ZTAILPACKING = 0x10   # a file's last pcluster inline after its indexes
FEATURE_INCOMPAT_FRAGMENTS = 0x20      # file tails in the packed inode (sb.packed_nid)
FEATURE_INCOMPAT_DEDUPE = 0x20         # same bit: pclusters shared, partially referenced
# what the reader understands of compressed images (on top of FEATURE_INCOMPAT_SUPPORTED)
FEATURE_INCOMPAT_COMPRESSED = (FEATURE_INCOMPAT_ZERO_PADDING | FEATURE_INCOMPAT_COMPR_CFGS
                               | FEATURE_INCOMPAT_ZTAILPACKING | FEATURE_INCOMPAT_FRAGMENTS)
FEATURE_INCOMPAT_XATTR_PREFIXES = 0x40    # long xattr name prefix table (Linux 6.4+)
COMPRESSION_LZ4, COMPRESSION_LZMA, COMPRESSION_DEFLATE, COMPRESSION_ZSTD = range(4)
LCLUSTER_TYPE_PLAIN, LCLUSTER_TYPE_HEAD1, LCLUSTER_TYPE_NONHEAD, LCLUSTER_TYPE_HEAD2 = range(4)
LI_D0_CBLKCNT = 0x800                  # first NONHEAD's delta[0]: pcluster block count
ADVISE_COMPACTED_2B = 0x1
ADVISE_BIG_PCLUSTER_1 = 0x2
ADVISE_BIG_PCLUSTER_2 = 0x4
ADVISE_EXTENTS = 0x1                   # COMPRESSED_FULL, 48-bit layout: extent records
ADVISE_EXTRECSZ_BIT = 1                # bits 1-2: record size 4 << n (4, 8, 16, 32 bytes)
ADVISE_EXTRECSZ_MASK = 0x3
ADVISE_INLINE_PCLUSTER = 0x8           # ztailpacking: the tail pcluster after the indexes
ADVISE_INTERLACED_PCLUSTER = 0x10      # plain pclusters stored rotated within their block
ADVISE_FRAGMENT_PCLUSTER = 0x20        # the tail extent lives in the packed inode
FRAGMENT_INODE_BIT = 7                 # h_clusterbits bit 7: the whole file is a fragment
LI_PARTIAL_REF = 0x8000                # full index HEAD: the pcluster decodes to more
LI_TYPE_MASK = 0x3
FULL_INDEX_PADDING = 8                 # full indexes start 8 bytes after the map header
PCLUSTER_MAX_SIZE = 1 << 20            # erofs-utils' bounds of one pcluster
PCLUSTER_MAX_DSIZE = 12 << 20
EXTENT_PLEN_PARTIAL = 1 << 27          # extent record plen: a partial reference
EXTENT_PLEN_FMT_BIT = 28               # bits 28-31: 0 stored plain, else algorithm + 1
EXTENT_PLEN_MASK = (PCLUSTER_MAX_SIZE << 1) - 1
LZMA_MAX_DICT_SIZE = 8 * PCLUSTER_MAX_SIZE  # the largest windows the kernel takes
ZSTD_MAX_DICT_SIZE = PCLUSTER_MAX_SIZE
DEFLATE_MAX_DICT_SIZE = 1 << 15


class MapHeader(Record):
    """At the 8-byte boundary after a compressed inode's xattrs."""
    FIELDS = (("h_reserved1", "H"), ("h_idata_size", "H"), ("h_advise", "H"),
              ("h_algorithmtype", "B"), ("h_clusterbits", "B"))


class LclusterIndex(Record):
    """Full index entry; di_u: HEAD/PLAIN blkaddr, NONHEAD delta[0] | delta[1] << 16."""
    FIELDS = (("di_advise", "H"), ("di_clusterofs", "H"), ("di_u", "I"))


class Extent(Record):
    """An extent record of the 48-bit layout; a record of 4 << n bytes holds the leading
    bytes only (4: plen, 8: + pstart_lo, 16: + pstart_hi, lstart_lo, 32: all). With 16
    or 32-byte records the map header's h_reserved1/h_idata_size (le32) and
    h_algorithmtype/h_clusterbits (le16) hold the record count."""
    FIELDS = (("plen", "I"), ("pstart_lo", "I"), ("pstart_hi", "I"), ("lstart_lo", "I"),
              ("lstart_hi", "I"), (None, "12x"))


def extent_recsize(advise: int) -> int:
    return 4 << ((advise >> ADVISE_EXTRECSZ_BIT) & ADVISE_EXTRECSZ_MASK)


class Lz4Cfgs(Record):
    FIELDS = (("max_distance", "H"), ("max_pclusterblks", "H"), (None, "10x"))


class LzmaCfgs(Record):
    FIELDS = (("dict_size", "I"), ("format", "H"), (None, "8x"))


class DeflateCfgs(Record):
    FIELDS = (("windowbits", "B"), (None, "5x"))


class ZstdCfgs(Record):
    FIELDS = (("format", "B"), ("windowlog", "B"), (None, "4x"))


assert MapHeader.SIZE == LclusterIndex.SIZE == 8 and Extent.SIZE == 32
assert Lz4Cfgs.SIZE == LzmaCfgs.SIZE == 14 and DeflateCfgs.SIZE == ZstdCfgs.SIZE == 6


# --- directories ------------------------------------------------------------------------
class Dirent(Record):
    FIELDS = (("nid", "Q"), ("nameoff", "H"), ("file_type", "B"), (None, "x"))


assert Dirent.SIZE == 12

FT_UNKNOWN, FT_REG, FT_DIR, FT_CHR, FT_BLK, FT_FIFO, FT_SOCK, FT_SYMLINK = range(8)
NAME_MAX = 255

_FT_BY_IFMT = {
    _stat.S_IFREG: FT_REG, _stat.S_IFDIR: FT_DIR, _stat.S_IFCHR: FT_CHR,
    _stat.S_IFBLK: FT_BLK, _stat.S_IFIFO: FT_FIFO, _stat.S_IFSOCK: FT_SOCK,
    _stat.S_IFLNK: FT_SYMLINK,
}


def file_type_of_mode(mode: int) -> int:
    return _FT_BY_IFMT.get(_stat.S_IFMT(mode), FT_UNKNOWN)


# --- device table -----------------------------------------------------------------------
class DeviceSlot(Record):
    # blocks_hi: the block count's bits 32-47 (a device over 2^32 blocks: a tar index's
    # of a tar over 2 TiB, the 48-bit layout)
    FIELDS = (("tag", "64s"), ("blocks", "I"), ("mapped_blkaddr", "I"), ("blocks_hi", "H"),
              (None, "54x"))


assert DeviceSlot.SIZE == 128
DEVICE_SLOT_SIZE = DeviceSlot.SIZE
DEVICE_TAG_SIZE = DeviceSlot.field_layout()["tag"][1]


# --- xattrs -----------------------------------------------------------------------------
class XattrIbodyHeader(Record):
    FIELDS = (("h_name_filter", "I"), ("h_shared_count", "B"), (None, "7x"))


class XattrEntry(Record):
    FIELDS = (("e_name_len", "B"), ("e_name_index", "B"), ("e_value_size", "H"))


assert XattrIbodyHeader.SIZE == 12 and XattrEntry.SIZE == 4

XATTR_INDEX_USER = 1
XATTR_INDEX_POSIX_ACL_ACCESS = 2
XATTR_INDEX_POSIX_ACL_DEFAULT = 3
XATTR_INDEX_TRUSTED = 4
XATTR_INDEX_LUSTRE = 5
XATTR_INDEX_SECURITY = 6

# index -> prefix; the ACL indexes carry the whole name as their prefix.
XATTR_PREFIXES = {
    XATTR_INDEX_USER: b"user.",
    XATTR_INDEX_POSIX_ACL_ACCESS: b"system.posix_acl_access",
    XATTR_INDEX_POSIX_ACL_DEFAULT: b"system.posix_acl_default",
    XATTR_INDEX_TRUSTED: b"trusted.",
    XATTR_INDEX_LUSTRE: b"lustre.",
    XATTR_INDEX_SECURITY: b"security.",
}


# e_name_index with XATTR_LONG_PREFIX set: the low bits index the long prefix table.
# Each table entry (the first at sb.xattr_prefix_start * 4, each 4-byte aligned) is a
# le16 size, then `size` bytes: the short index it extends (0: none) and the infix.
XATTR_LONG_PREFIX = 0x80
XATTR_LONG_PREFIX_MASK = 0x7F
# FEATURE_COMPAT_XATTR_FILTER: h_name_filter bit (xxh32(name after its short prefix,
# SEED + the prefix's index) % BITS) set = no xattr of the inode has a name hashing there
XATTR_FILTER_BITS = 32
XATTR_FILTER_SEED = 0x25BBE08F
XATTR_PREFIX_ENTRY_ALIGN = 4


def encode_long_prefix(prefix: bytes) -> tuple[int, bytes]:
    """A long prefix -> (its base index, 0 when it extends none of the short ones; the
    table entry: le16 size, base index, the rest of the prefix, padded to 4 bytes)."""
    base, infix = 0, prefix
    for index, short in sorted(XATTR_PREFIXES.items()):
        if prefix.startswith(short):
            base, infix = index, prefix[len(short):]
            break
    body = bytes([base]) + infix
    entry = len(body).to_bytes(2, "little") + body
    return base, entry + b"\0" * (-len(entry) % XATTR_PREFIX_ENTRY_ALIGN)


def decode_long_prefixes(data: bytes | memoryview, count: int) -> list[bytes] | str:
    """The full prefixes of a long prefix table of `count` entries starting at data[0],
    or a one-line reason why it is not one."""
    out = []
    off = 0
    for i in range(count):
        if off + 2 > len(data):
            return f"long xattr prefix {i} truncated"
        size = int.from_bytes(data[off:off + 2], "little")
        if size < 1 or size > 1 + NAME_MAX or off + 2 + size > len(data):
            return f"long xattr prefix {i} has a bad size {size}"
        base = data[off + 2]
        short = XATTR_PREFIXES.get(base, b"") if base else b""
        if base and not short:
            return f"long xattr prefix {i} has a bad base index {base}"
        infix = bytes(data[off + 3:off + 2 + size])
        if b"\0" in infix:
            return f"long xattr prefix {i} contains NUL"
        out.append(short + infix)
        off += 2 + size
        off += -off % XATTR_PREFIX_ENTRY_ALIGN
    return out


def split_xattr_name(name: bytes) -> tuple[int, bytes] | None:
    """Return (index, suffix) for a full xattr name, or None if it has no short prefix."""
    if name in (b"system.posix_acl_access", b"system.posix_acl_default"):
        return (XATTR_INDEX_POSIX_ACL_ACCESS if name.endswith(b"access")
                else XATTR_INDEX_POSIX_ACL_DEFAULT), b""
    for index in (XATTR_INDEX_USER, XATTR_INDEX_TRUSTED, XATTR_INDEX_SECURITY):
        prefix = XATTR_PREFIXES[index]
        if name.startswith(prefix) and len(name) > len(prefix):
            return index, name[len(prefix):]
    return None


# --- rdev -------------------------------------------------------------------------------
def encode_rdev(major: int, minor: int) -> int:
    """Linux 'new' dev_t encoding stored in i_u for device inodes."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def decode_rdev(value: int) -> tuple[int, int]:
    major = (value >> 8) & 0xFFF
    minor = (value & 0xFF) | ((value >> 12) & 0xFFF00)
    return major, minor
