"""Nydus RAFS v6 structures: see shared reference rafs-v6.md.

The bootstrap is an EROFS image (erofs.py) plus the tables below; each data blob is an
EROFS extra device whose kernel-visible address space is the uncompressed blob in 4 KiB
blocks, while the blob file itself holds compressed chunks, a compression-info (CI)
table, its header, the chunk digests and a TOC, each followed by a tar header.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator

from erofs_tools.format._struct import Buffer, Record
from erofs_tools.format.erofs import DEVICE_SLOT_SIZE

EXT_SUPER_OFFSET = 1152
DEVT_SLOTOFF = 11            # device table at 11 * 128 = 1408
DEVT_OFFSET = DEVT_SLOTOFF * DEVICE_SLOT_SIZE
ROOT_NID = 128               # one empty block after meta_addr
MAX_BLOBS = 254
BLOCK_SEG_ALIGNMENT = 0x8_0000  # mapped_blkaddr alignment of blobs (512 KiB)
BLOB_ID_LEN = 64

CHUNK_SIZE_MIN = 0x1000
CHUNK_SIZE_MAX = 0x100_0000
CHUNK_SIZE_DEFAULT = 0x10_0000
MAX_CHUNKS_PER_BLOB = 1 << 24

# RafsSuperFlags
FLAG_COMPRESSION_NONE = 0x1
FLAG_COMPRESSION_LZ4 = 0x2
FLAG_DIGEST_BLAKE3 = 0x4
FLAG_DIGEST_SHA256 = 0x8
FLAG_EXPLICIT_UID_GID = 0x10
FLAG_HAS_XATTR = 0x20
FLAG_COMPRESSION_GZIP = 0x40
FLAG_COMPRESSION_ZSTD = 0x80
FLAG_INLINED_CHUNK_DIGEST = 0x100
FLAG_TARFS_MODE = 0x200
FLAG_ENCRYPTION_NONE = 0x0100_0000
FLAG_ENCRYPTION_AES128XTS = 0x0200_0000

COMPRESSION_FLAGS = {"none": FLAG_COMPRESSION_NONE, "lz4_block": FLAG_COMPRESSION_LZ4,
                     "gzip": FLAG_COMPRESSION_GZIP, "zstd": FLAG_COMPRESSION_ZSTD}
DIGEST_FLAGS = {"blake3": FLAG_DIGEST_BLAKE3, "sha256": FLAG_DIGEST_SHA256}

# Blob-table algorithm codes
COMPRESSOR_CODES = {"none": 0, "lz4_block": 1, "gzip": 2, "zstd": 3}
DIGESTER_CODES = {"blake3": 0, "sha256": 1}
COMPRESSOR_NAMES = {v: k for k, v in COMPRESSOR_CODES.items()}
DIGESTER_NAMES = {v: k for k, v in DIGESTER_CODES.items()}

# BlobFeatures
BLOB_FEATURE_ALIGNED = 0x1
BLOB_FEATURE_INLINED_FS_META = 0x2
BLOB_FEATURE_CHUNK_INFO_V2 = 0x4
BLOB_FEATURE_ZRAN = 0x8
BLOB_FEATURE_SEPARATE = 0x10
BLOB_FEATURE_INLINED_CHUNK_DIGEST = 0x20
BLOB_FEATURE_TARFS = 0x40
BLOB_FEATURE_BATCH = 0x80
BLOB_FEATURE_ENCRYPTED = 0x100
BLOB_FEATURE_HAS_TAR_HEADER = 0x1000_0000
BLOB_FEATURE_HAS_TOC = 0x2000_0000
BLOB_FEATURE_CAP_TAR_TOC = 0x4000_0000
# What our packer writes: aligned, chunk digests in the blob, tar headers, TOC.
BLOB_FEATURES_DEFAULT = (BLOB_FEATURE_ALIGNED | BLOB_FEATURE_INLINED_CHUNK_DIGEST
                         | BLOB_FEATURE_HAS_TAR_HEADER | BLOB_FEATURE_HAS_TOC
                         | BLOB_FEATURE_CAP_TAR_TOC)
# Features whose blobs we cannot serve (different CI layouts or data transforms).
BLOB_FEATURES_UNSUPPORTED = (BLOB_FEATURE_ZRAN | BLOB_FEATURE_BATCH | BLOB_FEATURE_ENCRYPTED
                             | BLOB_FEATURE_TARFS | BLOB_FEATURE_SEPARATE)


class ExtSuperBlock(Record):
    FIELDS = (
        ("s_flags", "Q"), ("s_blob_table_offset", "Q"), ("s_blob_table_size", "I"),
        ("s_chunk_size", "I"), ("s_chunk_table_offset", "Q"), ("s_chunk_table_size", "Q"),
        ("s_prefetch_table_offset", "Q"), ("s_prefetch_table_size", "I"),
        (None, "4x"), (None, "200x"),
    )


assert ExtSuperBlock.SIZE == 256


class BlobEntry(Record):
    """One `RafsV6Blob` in the bootstrap's blob table."""
    FIELDS = (
        ("blob_id", "64s"), ("blob_index", "I"), ("chunk_size", "I"), ("chunk_count", "I"),
        ("compression_algo", "I"), ("digest_algo", "I"), ("features", "I"),
        ("compressed_size", "Q"), ("uncompressed_size", "Q"), ("blob_toc_size", "I"),
        ("ci_compressor", "I"), ("ci_offset", "Q"), ("ci_compressed_size", "Q"),
        ("ci_uncompressed_size", "Q"), ("blob_toc_digest", "32s"),
        ("blob_meta_digest", "32s"), ("blob_meta_size", "Q"), ("cipher_iv", "8s"),
        ("cipher_algo", "I"), (None, "36x"),
    )


assert BlobEntry.SIZE == 256


class ChunkInfo(Record):
    """`RafsV5ChunkInfo`: the bootstrap's chunk info table entry (80 bytes)."""
    FIELDS = (
        ("digest", "32s"), ("blob_index", "I"), ("flags", "I"),
        ("compressed_size", "I"), ("uncompressed_size", "I"),
        ("compressed_offset", "Q"), ("uncompressed_offset", "Q"), ("file_offset", "Q"),
        ("index", "I"), ("crc32", "I"),
    )


assert ChunkInfo.SIZE == 80
CHUNK_FLAG_COMPRESSED = 0x1
CHUNK_FLAG_ENCRYPTED = 0x4
CHUNK_FLAG_BATCH = 0x8
CHUNK_FLAG_HAS_CRC32 = 0x10


# --- blob meta ------------------------------------------------------------------------
BLOB_META_MAGIC = 0xB10BB10B
BLOB_META_HEADER_SIZE = 4096


class BlobMetaHeader(Record):
    """`BlobCompressionContextHeader`, 4096 bytes, magic at both ends."""
    FIELDS = (
        ("magic", "I"), ("features", "I"), ("ci_compressor", "I"), ("ci_entries", "I"),
        ("ci_offset", "Q"), ("ci_compressed_size", "Q"), ("ci_uncompressed_size", "Q"),
        ("ctx_offset", "Q"), ("ctx_size", "Q"), ("ctx_count", "I"),
        (None, "4032x"), ("magic2", "I"),
    )


assert BlobMetaHeader.SIZE == 4096

CI_V1_SIZE = 16
CI_V2_SIZE = 24


def encode_ci_v1(uncompressed_offset: int, uncompressed_size: int, compressed_offset: int,
                 compressed_size: int) -> bytes:
    """16-byte CI v1 entry. Sizes are stored minus one; offsets must be 4 KiB aligned."""
    us = uncompressed_size - 1
    cs = compressed_size - 1
    uncomp = (((us >> 20) & 0xF) << 8) | (uncompressed_offset & 0x0FFF_FFFF_F000) \
        | ((us & 0xFFFFF) << 44)
    comp = (compressed_offset & 0xFF_FFFF_FFFF) | (((cs >> 20) & 0xF) << 40) \
        | ((cs & 0xFFFFF) << 44)
    return uncomp.to_bytes(8, "little") + comp.to_bytes(8, "little")


def decode_ci_v1(buf: Buffer, offset: int = 0) -> tuple[int, int, int, int]:
    """-> (uncompressed_offset, uncompressed_size, compressed_offset, compressed_size)."""
    uncomp = int.from_bytes(buf[offset:offset + 8], "little")
    comp = int.from_bytes(buf[offset + 8:offset + 16], "little")
    us = (((uncomp >> 8) & 0xF) << 20) | ((uncomp >> 44) & 0xFFFFF)
    uoff = uncomp & 0x0FFF_FFFF_F000
    cs = (((comp >> 40) & 0xF) << 20) | ((comp >> 44) & 0xFFFFF)
    coff = comp & 0xFF_FFFF_FFFF
    return uoff, us + 1, coff, cs + 1


def decode_ci_v2(buf: Buffer, offset: int = 0) -> tuple[int, int, int, int, int]:
    """-> (uncompressed_offset, uncompressed_size, compressed_offset, compressed_size, flags)."""
    uncomp = int.from_bytes(buf[offset:offset + 8], "little")
    comp = int.from_bytes(buf[offset + 8:offset + 16], "little")
    uoff = (uncomp & 0xFFFF_FFFF) << 12
    us = ((uncomp >> 32) & 0xFF_FFFF) + 1
    flags = (uncomp >> 56) & 0xFF
    coff = comp & 0xFF_FFFF_FFFF
    cs = (comp >> 40) & 0xFF_FFFF
    return uoff, us, coff, cs, flags


def decode_ci_table(buf: Buffer, n: int, v2: bool) -> Iterator[tuple[int, int, int, int, int]]:
    """Yield (uncompressed_offset, uncompressed_size, compressed_offset, compressed_size,
    flags (0 for v1)) of a CI table's first `n` entries: decode_ci_v1/v2's arithmetic on
    one table unpack (a cold mount decodes tens of thousands of entries)."""
    if v2:
        for i in range(n):
            uncomp, comp = struct.unpack_from("<QQ", buf, i * CI_V2_SIZE)
            yield ((uncomp & 0xFFFF_FFFF) << 12, ((uncomp >> 32) & 0xFF_FFFF) + 1,
                   comp & 0xFF_FFFF_FFFF, (comp >> 40) & 0xFF_FFFF, (uncomp >> 56) & 0xFF)
        return
    for uncomp, comp in struct.iter_unpack("<QQ", memoryview(buf)[:n * CI_V1_SIZE]):
        yield (uncomp & 0x0FFF_FFFF_F000,
               ((((uncomp >> 8) & 0xF) << 20) | ((uncomp >> 44) & 0xFFFFF)) + 1,
               comp & 0xFF_FFFF_FFFF,
               ((((comp >> 40) & 0xF) << 20) | ((comp >> 44) & 0xFFFFF)) + 1, 0)


CI_V2_FLAG_COMPRESSED = 0x01
CI_V2_FLAG_ZRAN = 0x02
CI_V2_FLAG_HAS_CRC32 = 0x10
CI_V2_MAX_SIZE = 0xFF_FFFF          # 24-bit size fields


def encode_ci_v2(uncompressed_offset: int, uncompressed_size: int, compressed_offset: int,
                 compressed_size: int, flags: int, data: int = 0) -> bytes:
    """24-byte CI v2 entry: uncompressed offset (4 KiB aligned) >> 12 | (size - 1) << 32 |
    flags << 56; compressed offset | size << 40 (not minus one); the data word (zran:
    context index << 32 | offset in the context's output)."""
    uncomp = ((uncompressed_offset >> 12) & 0xFFFF_FFFF) \
        | (((uncompressed_size - 1) & 0xFF_FFFF) << 32) | ((flags & 0xFF) << 56)
    comp = (compressed_offset & 0xFF_FFFF_FFFF) | ((compressed_size & 0xFF_FFFF) << 40)
    return struct.pack("<QQQ", uncomp, comp, data)


def decode_ci_v2_data(buf: Buffer, offset: int = 0) -> int:
    """The third word of a CI v2 entry (zran: context index << 32 | offset)."""
    return int.from_bytes(buf[offset + 16:offset + 24], "little")


# --- zran (random access into gzip layers; Nydus `ZranInflateContext`) ------------------
# The uncompressed CI area of a zran blob is: CI v2 table | context table (40 bytes per
# context) | dictionary table (the contexts' windows back to back); the blob meta header's
# ctx_offset/ctx_size/ctx_count locate the last two (offset inside that area, size of
# both, number of contexts). A context lets inflating start at `in_offset` of the gzip
# layer (the high `ctx_bits` bits of the byte before it first, then the window as
# dictionary) and yields `out_len` bytes from `in_len` compressed bytes, starting at
# `out_offset` of the decompressed layer. A zran chunk's data word names its context and
# the offset of the chunk in that context's output.
class ZranContext(Record):
    FIELDS = (
        ("in_offset", "Q"), ("out_offset", "Q"), ("dict_offset", "Q"),
        ("in_len", "I"), ("out_len", "I"), ("dict_size", "I"),
        ("ctx_byte", "B"), ("ctx_bits", "B"), (None, "2x"),
    )


assert ZranContext.SIZE == 40
ZRAN_WINDOW = 0x8000
ZRAN_MAX_CONTEXT_OUT = CHUNK_SIZE_MAX    # nydusd's bound on one context's output
# What a zran blob (the layer itself, meta in a separate RAFS blob) says it is
BLOB_FEATURES_ZRAN = (BLOB_FEATURE_ALIGNED | BLOB_FEATURE_CHUNK_INFO_V2 | BLOB_FEATURE_ZRAN
                      | BLOB_FEATURE_SEPARATE | BLOB_FEATURE_INLINED_CHUNK_DIGEST
                      | BLOB_FEATURE_HAS_TAR_HEADER | BLOB_FEATURE_HAS_TOC
                      | BLOB_FEATURE_CAP_TAR_TOC)


# --- TOC and tar headers ------------------------------------------------------------------
class TocEntry(Record):
    FIELDS = (
        ("flags", "I"), (None, "4x"), ("name", "16s"), ("uncompressed_digest", "32s"),
        ("compressed_offset", "Q"), ("compressed_size", "Q"), ("uncompressed_size", "Q"),
        (None, "48x"),
    )


assert TocEntry.SIZE == 128
TOC_FLAG_NONE = 1
TOC_FLAG_ZSTD = 2
TOC_FLAG_LZ4_BLOCK = 4
TOC_MAX_SIZE = 4096
# Note: nydus-image writes the `image.blob` entry with compressed_offset equal to the data
# size (where its tar header starts), not 0; readers locate chunk data through the CI
# table and must not rely on that entry's offset.

TAR_BLOCK = 512
TOC_NAME_BLOB_DATA = b"image.blob"
TOC_NAME_BLOB_META = b"blob.meta"
TOC_NAME_BLOB_META_HEADER = b"blob.meta.header"
TOC_NAME_BLOB_DIGEST = b"blob.digest"
TOC_NAME_BOOTSTRAP = b"image.boot"
TOC_NAME_TOC = b"rafs.blob.toc"


def tar_header(name: bytes, size: int) -> bytes:
    """A 512-byte GNU tar header for the reversed-tar blob sections.

    Nydus readers only look at the name and size; we write a complete, checksummed
    header (mode 0444, uid/gid 0, mtime 0) so ordinary tar tools can list the blob.
    """
    h = bytearray(TAR_BLOCK)
    h[0:len(name)] = name
    h[100:108] = b"0000444\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[148:156] = b" " * 8
    h[156] = ord("0")
    h[257:265] = b"ustar  \0"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def parse_tar_header(buf: Buffer) -> tuple[bytes, int] | None:
    """-> (name, size) of a 512-byte tar header, or None if it is not one."""
    if len(buf) != TAR_BLOCK:
        return None
    name = bytes(buf[0:100]).split(b"\0", 1)[0]
    field = bytes(buf[124:136]).strip(b"\0 ")
    try:
        size = int(field, 8) if field else 0
        stored = int(bytes(buf[148:156]).strip(b"\0 ") or b"-1", 8)
    except ValueError:
        return None
    h = bytearray(buf)
    h[148:156] = b" " * 8
    if stored != sum(h):
        return None
    return name, size
