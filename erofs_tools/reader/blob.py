"""Nydus RAFS v6 data blobs: TOC, blob meta (compression-info table), chunk digests.

Everything read from a blob is untrusted: every offset and size is checked against the
blob size and the format limits before anything is allocated, and every problem is a
CorruptImageError with a one-line message naming the blob.

The daemon uses `BlobMeta` (where each chunk lives) and `decode_chunk` (decode, verify)."""
from __future__ import annotations

import bisect
import os
import struct
from collections.abc import Callable
from typing import NamedTuple

from erofs_tools.errors import CorruptImageError, DigestMismatchError
from erofs_tools.format import rafs
from erofs_tools.format.erofs import BLKSZ
from erofs_tools.fsutil import round_up
from erofs_tools.reader.blobid import shown_id
from erofs_tools.reader.chunkcodec import ZSTD_MAGIC
from erofs_tools.reader.chunkcodec import decompress as _decompress

ReadAt = Callable[[int, int], bytes]

DIGEST_SIZE = 32
MAX_CHUNK_SIZE = rafs.CHUNK_SIZE_MAX          # 16 MiB: no chunk is larger
MAX_UNCOMPRESSED_SIZE = 1 << 44
MAX_COMPRESSED_SIZE = 1 << 40

COMPRESSORS_SUPPORTED = ("none", "zstd", "lz4_block")
DIGESTERS = ("blake3", "sha256")


class BlobChunk(NamedTuple):
    """One chunk of a data blob (a CI-table entry plus its digest)."""
    index: int  # type: ignore[assignment]  # position in the blob's CI array
    # (shadows tuple.index on purpose: the name the formats use)
    uncompressed_offset: int    # in the kernel-visible (cache-file) address space
    uncompressed_size: int
    compressed_offset: int      # in the blob file
    compressed_size: int
    digest: bytes | None     # digest of the uncompressed bytes, or None if unknown
    compressed: bool
    zran_index: int = -1        # zran blobs (reader/zran.py): the chunk's context
    zran_offset: int = 0        # and its offset in that context's output

    @property
    def uncompressed_end(self):
        """End of the chunk's 4 KiB-aligned slot in the uncompressed space."""
        return self.uncompressed_offset + round_up(self.uncompressed_size, BLKSZ)



def _blob_name(blob_id):
    return shown_id(blob_id) if blob_id else "<unknown blob>"


def _sha256(data) -> bytes:
    # hashlib when first needed: pack imports this module for BlobInfo and would map
    # libcrypto (~3.5 MiB of its RSS) only for that
    import hashlib
    return hashlib.sha256(data).digest()


def _digest(digester, data):
    if digester == "sha256":
        return _sha256(data)
    if digester == "blake3":
        import blake3
        return blake3.blake3(data).digest()
    raise CorruptImageError(f"unsupported chunk digest algorithm {digester!r}")



def _read_exact(read_at, offset, length, blob_size, what):
    if offset < 0 or length < 0 or offset + length > blob_size:
        raise CorruptImageError(
            f"{what}: range [{offset}, {offset + length}) outside the blob ({blob_size} bytes)")
    data = read_at(offset, length) if length else b""
    if len(data) != length:
        raise CorruptImageError(f"{what}: short read ({len(data)} of {length} bytes)")
    return data


class TocInfo(NamedTuple):
    """Parsed blob TOC: entries by name, plus where the TOC itself sits."""
    entries: dict           # name (bytes) -> rafs.TocEntry
    offset: int             # start of the TOC entries in the blob
    size: int               # entries + tar header


def read_toc(read_at: ReadAt, blob_size: int, blob_id=None, toc_size=None):
    """Find and parse the blob TOC at the end of the blob; None if the blob has none."""
    name = _blob_name(blob_id)
    if blob_size < rafs.TAR_BLOCK:
        return None
    hdr = _read_exact(read_at, blob_size - rafs.TAR_BLOCK, rafs.TAR_BLOCK, blob_size,
                      f"blob {name}: TOC header")
    parsed = rafs.parse_tar_header(hdr)
    if parsed is None or parsed[0] != rafs.TOC_NAME_TOC:
        return None
    size = parsed[1]
    if (size <= 0 or size % rafs.TocEntry.SIZE or size + rafs.TAR_BLOCK > rafs.TOC_MAX_SIZE
            or size + rafs.TAR_BLOCK > blob_size):
        raise CorruptImageError(f"blob {name}: bad TOC size {size}")
    if toc_size and toc_size != size + rafs.TAR_BLOCK:
        raise CorruptImageError(
            f"blob {name}: TOC is {size + rafs.TAR_BLOCK} bytes, blob table says {toc_size}")
    start = blob_size - rafs.TAR_BLOCK - size
    raw = _read_exact(read_at, start, size, blob_size, f"blob {name}: TOC")
    entries = {}
    for off in range(0, size, rafs.TocEntry.SIZE):
        e = rafs.TocEntry.decode(raw, off)
        ename = e.name.split(b"\0", 1)[0]
        if not ename:
            continue
        if ename in entries:
            raise CorruptImageError(f"blob {name}: duplicate TOC entry {ename.decode(errors='replace')}")
        # Offsets are checked where an entry is used: nydus-image writes the image.blob
        # entry with compressed_offset = data size, which points past the data.
        entries[ename] = e
    return TocInfo(entries, start, size + rafs.TAR_BLOCK)


def read_toc_section(read_at, blob_size, toc: TocInfo, section: bytes, blob_id=None,
                     limit=64 << 20):
    """Read, decompress and sha256-verify one TOC section (e.g. b"image.boot")."""
    name = _blob_name(blob_id)
    e = toc.entries.get(section)
    sname = section.decode()
    if e is None:
        raise CorruptImageError(f"blob {name}: no {sname} in the TOC")
    if e.uncompressed_size > limit:
        raise CorruptImageError(f"blob {name}: {sname} too large ({e.uncompressed_size} bytes)")
    raw = _read_exact(read_at, e.compressed_offset, e.compressed_size, blob_size,
                      f"blob {name}: {sname}")
    if e.flags & rafs.TOC_FLAG_ZSTD:
        data = _decompress("zstd", raw, e.uncompressed_size, f"blob {name}: {sname}")
    elif e.flags & rafs.TOC_FLAG_NONE or e.flags == 0:
        data = bytes(raw)
        if len(data) != e.uncompressed_size:
            raise CorruptImageError(f"blob {name}: {sname} size mismatch in the TOC")
    else:
        raise CorruptImageError(f"blob {name}: {sname} has unsupported TOC flags {e.flags:#x}")
    if e.uncompressed_digest != b"\0" * 32 and _sha256(data) != e.uncompressed_digest:
        raise DigestMismatchError(f"blob {name}: {sname} does not match its TOC digest")
    return data


class BlobMeta:
    """Where every chunk of one data blob lives, compressed and uncompressed."""

    __slots__ = ("blob_id", "_chunks", "chunk_count", "uncompressed_size", "compressed_size",
                 "compressor", "digester", "chunk_size", "features", "digest_region",
                 "_starts", "_by_index", "zran", "_bytes")

    def __init__(self, blob_id, chunks, uncompressed_size, compressed_size, compressor,
                 digester, chunk_size, features=0, digest_region=None, zran=None, *,
                 checked: bytes | None = None, count: int | None = None):
        # checked: chunks checked and ordered by the C core, and their compact form; then
        # `chunks` may be a function making them on first use and `count` their number
        # (a cold mount's 27,000 chunks: ~25 ms of Python objects, after the mount)
        self.blob_id = blob_id
        self._chunks = chunks if checked is not None else \
            sorted(chunks, key=lambda c: c.uncompressed_offset)
        self.chunk_count = len(chunks) if count is None else count
        self.uncompressed_size = uncompressed_size
        self.compressed_size = compressed_size
        self.compressor = compressor
        self.digester = digester
        self.chunk_size = chunk_size
        self.features = features
        # (offset, size) of the raw blob.digest payload (excluded from the blob id), or None
        self.digest_region = digest_region
        self._starts: list[int] | None = None     # made with the chunks
        self._by_index: dict[int, BlobChunk] | None = None
        # a zran blob's contexts and chunk decoder (reader/zran.py), else None
        self.zran = zran
        self._bytes: bytes | None = None
        self._validate_head()
        if checked is None:
            self._validate_chunks()
        else:
            self._bytes = self._encode_head() + checked

    def __repr__(self):
        return (f"BlobMeta({self.blob_id!r}, {self.chunk_count} chunks, "
                f"uncompressed={self.uncompressed_size}, compressed={self.compressed_size}, "
                f"{self.compressor}/{self.digester}, chunk_size={self.chunk_size})")

    @property
    def chunks(self) -> list:
        """The chunks in uncompressed order (made on first use from the C core's)."""
        if self._starts is None:    # two threads may both make them: equal lists
            c = self._chunks = self._chunks() if callable(self._chunks) else self._chunks
            self._starts = [x.uncompressed_offset for x in c]
        return self._chunks

    # -- validation ----------------------------------------------------------------------
    def _validate_head(self):
        name = _blob_name(self.blob_id)
        if self.compressor not in COMPRESSORS_SUPPORTED and \
                not (self.compressor == "gzip" and self.zran is not None):
            raise CorruptImageError(f"blob {name}: unsupported compressor {self.compressor!r}")
        if self.digester not in DIGESTERS:
            raise CorruptImageError(f"blob {name}: unsupported digester {self.digester!r}")
        cs = self.chunk_size
        if cs < rafs.CHUNK_SIZE_MIN or cs > rafs.CHUNK_SIZE_MAX or cs & (cs - 1):
            raise CorruptImageError(f"blob {name}: bad chunk size {cs:#x}")
        if not 0 <= self.uncompressed_size <= MAX_UNCOMPRESSED_SIZE:
            raise CorruptImageError(f"blob {name}: bad uncompressed size {self.uncompressed_size}")
        if not 0 <= self.compressed_size <= MAX_COMPRESSED_SIZE:
            raise CorruptImageError(f"blob {name}: bad compressed size {self.compressed_size}")
        if self.chunk_count > rafs.MAX_CHUNKS_PER_BLOB:
            raise CorruptImageError(f"blob {name}: too many chunks ({self.chunk_count})")

    def _validate_chunks(self):
        name = _blob_name(self.blob_id)
        cs = self.chunk_size
        prev_end = 0
        seen = set()
        n = len(self.chunks)
        usize, csize, raw_blob = self.uncompressed_size, self.compressed_size, \
            self.compressor == "none"
        # fields unpacked, not read by name: a zran mount checks 38,000 chunks
        for index, uoff, us, coff, csz, digest, compressed, *_z in self.chunks:
            if index in seen or not 0 <= index < n:
                raise CorruptImageError(f"blob {name}: bad or duplicate chunk index {index}")
            seen.add(index)
            if not 0 < us <= cs:
                raise CorruptImageError(
                    f"blob {name}: chunk {index} uncompressed size {us} "
                    f"outside 1..{cs}")
            if uoff % BLKSZ:
                raise CorruptImageError(
                    f"blob {name}: chunk {index} uncompressed offset not 4 KiB aligned")
            if uoff < prev_end:
                raise CorruptImageError(f"blob {name}: chunk {index} overlaps the previous chunk")
            prev_end = uoff + -(-us // BLKSZ) * BLKSZ      # BlobChunk.uncompressed_end
            if prev_end > usize:
                raise CorruptImageError(
                    f"blob {name}: chunk {index} ends past the uncompressed size "
                    f"{usize}")
            if csz <= 0 or coff < 0 or coff + csz > csize:
                raise CorruptImageError(
                    f"blob {name}: chunk {index} compressed range outside the blob")
            if not compressed and csz != us:
                raise CorruptImageError(f"blob {name}: chunk {index} stored raw but sizes differ")
            if compressed and raw_blob:
                raise CorruptImageError(
                    f"blob {name}: chunk {index} compressed in an uncompressed blob")
            if digest is not None and len(digest) != DIGEST_SIZE:
                raise CorruptImageError(f"blob {name}: chunk {index} bad digest length")

    # -- lookups -------------------------------------------------------------------------
    def chunks_for_range(self, offset: int, length: int):
        """Whole chunks whose uncompressed slots intersect [offset, offset+length)."""
        if length <= 0 or offset < 0:
            return []
        end = offset + length
        chunks = self.chunks
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)  # type: ignore[arg-type]
        out = []
        while i < len(chunks):
            c = chunks[i]
            if c.uncompressed_offset >= end:
                break
            if c.uncompressed_end > offset:
                out.append(c)
            i += 1
        return out

    def chunk_by_index(self, index: int) -> BlobChunk:
        """The chunk at position `index` of the CI array (KeyError-free: CorruptImageError)."""
        if self._by_index is None:
            self._by_index = {c.index: c for c in self.chunks}
        c = self._by_index.get(index)
        if c is None:
            raise CorruptImageError(f"blob {_blob_name(self.blob_id)}: no chunk with index {index}")
        return c

    def chunk_at(self, uncompressed_offset: int) -> BlobChunk | None:
        """The chunk starting exactly at `uncompressed_offset`, or None."""
        chunks = self.chunks
        starts: list[int] = self._starts  # type: ignore[assignment]
        i = bisect.bisect_left(starts, uncompressed_offset)
        return chunks[i] if i < len(starts) and starts[i] == uncompressed_offset else None

    def with_digests(self, digests):
        """A copy whose chunks take digests from {index: digest} (e.g. the bootstrap's)."""
        chunks = [c._replace(digest=digests.get(c.index, c.digest)) for c in self.chunks]
        return BlobMeta(self.blob_id, chunks, self.uncompressed_size, self.compressed_size,
                        self.compressor, self.digester, self.chunk_size, self.features,
                        self.digest_region, self.zran)

    # -- compact cache form --------------------------------------------------------------
    _CACHE_MAGIC = b"ETBMETA1"
    _HEAD = struct.Struct("<8s64sQQQIIIII16x")   # magic, id, usize, csize, chunk, n, algos, feats, dr
    _ENTRY = struct.Struct("<IQIQIB")          # index, uoff, usize, coff, csize, flags
    _ENTRY_DIGEST = struct.Struct("<IQIQIB32s")     # the same, then its digest

    def to_bytes(self) -> bytes:
        # made once: a mount needs it twice (the map file, the cache's chunk-map digest)
        if self._bytes is None:
            self._bytes = self._encode()
        return self._bytes

    def _encode_head(self) -> bytes:
        algos = (rafs.COMPRESSOR_CODES[self.compressor] << 8) | rafs.DIGESTER_CODES[self.digester]
        dr_off, dr_size = self.digest_region or (0, 0)
        head = self._HEAD.pack(self._CACHE_MAGIC, (self.blob_id or "").encode(),
                               self.uncompressed_size, self.compressed_size, self.chunk_size,
                               self.chunk_count, algos, self.features, 0, 0)
        return head + struct.pack("<QQ", dr_off, dr_size)

    def _encode(self) -> bytes:
        parts = [self._encode_head()]
        # an entry and its digest in one pack (the same bytes as _ENTRY then the digest)
        pack = self._ENTRY_DIGEST.pack
        zero = b"\0" * DIGEST_SIZE
        for index, uoff, us, coff, csz, digest, compressed, *_z in self.chunks:
            flags = (1 if compressed else 0) | (2 if digest is not None else 0)
            parts.append(pack(index, uoff, us, coff, csz, flags,
                              digest if digest is not None else zero))
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> BlobMeta:
        data = bytes(data)
        hs = cls._HEAD.size
        if len(data) < hs + 16:
            raise CorruptImageError("blob meta cache: truncated")
        (magic, bid, usize, csize, chunk_size, n, algos, feats, _r1, _r2) = \
            cls._HEAD.unpack_from(data, 0)
        if magic != cls._CACHE_MAGIC:
            raise CorruptImageError("blob meta cache: bad magic")
        dr_off, dr_size = struct.unpack_from("<QQ", data, hs)
        es = cls._ENTRY.size + DIGEST_SIZE
        if n > rafs.MAX_CHUNKS_PER_BLOB or len(data) != hs + 16 + n * es:
            raise CorruptImageError("blob meta cache: size does not match its chunk count")
        comp = rafs.COMPRESSOR_NAMES.get(algos >> 8)
        dig = rafs.DIGESTER_NAMES.get(algos & 0xFF)
        chunks = []
        off = hs + 16
        for _ in range(n):
            idx, uoff, us, coff, cs, flags = cls._ENTRY.unpack_from(data, off)
            digest = data[off + cls._ENTRY.size: off + es] if flags & 2 else None
            chunks.append(BlobChunk(idx, uoff, us, coff, cs, digest, bool(flags & 1)))
            off += es
        try:
            blob_id = bid.rstrip(b"\0").decode("ascii") or None
        except UnicodeDecodeError:
            raise CorruptImageError("blob meta cache: bad blob id") from None
        return cls(blob_id, chunks, usize, csize, comp, dig, chunk_size, feats,
                   (dr_off, dr_size) if dr_size else None)

    # -- parsing a blob ------------------------------------------------------------------
    @classmethod
    def from_blob(cls, read_at: ReadAt, blob_size: int, blob_id=None, entry=None, *,
                  digests=None, compressor=None, digester=None, fast=None) -> BlobMeta:
        """Parse a blob's meta from its end (TOC) or through its bootstrap `BlobEntry`.

        `read_at(offset, length) -> bytes` reads the blob; `blob_size` is its length.
        `digests` ({ci_index: digest}) supplies chunk digests when the blob has no
        blob.digest section (they then come from the bootstrap's chunk info table).
        With `entry`, `fast(ci table, n, v2, digest section or None, data end, head)`
        (head: BlobMeta's arguments after the chunks) may make the meta instead of the
        per-chunk loop below (the daemon's, in C); None: the loop runs."""
        if entry is not None and blob_id is None:
            blob_id = entry.blob_id.split(b"\0", 1)[0].decode("ascii", "replace")
        name = _blob_name(blob_id)
        if not isinstance(blob_size, int) or blob_size < 0 or blob_size > MAX_COMPRESSED_SIZE:
            raise CorruptImageError(f"blob {name}: bad blob size {blob_size!r}")
        features = 0
        chunk_size = None
        # (CI table offset, compressed size, uncompressed size): the bootstrap's, else the
        # blob meta header's
        ci_table: tuple[int, int, int] | None = None
        ci_comp = None
        uncompressed_size = None
        if entry is not None:
            features = entry.features
            if features & rafs.BLOB_FEATURES_UNSUPPORTED:
                raise CorruptImageError(
                    f"blob {name}: unsupported blob features {features:#x} "
                    "(zran, batch, encrypted, tarfs or separate)")
            # compressed_size is the blob size, or only its data part for blobs with an
            # inlined bootstrap (written before the meta was appended)
            if entry.compressed_size > blob_size:
                raise CorruptImageError(
                    f"blob {name}: blob is {blob_size} bytes, bootstrap says "
                    f"{entry.compressed_size}")
            compressor = compressor or rafs.COMPRESSOR_NAMES.get(entry.compression_algo)
            if compressor is None:
                raise CorruptImageError(
                    f"blob {name}: unknown compression algorithm {entry.compression_algo}")
            digester = digester or rafs.DIGESTER_NAMES.get(entry.digest_algo)
            if digester is None:
                raise CorruptImageError(f"blob {name}: unknown digest algorithm {entry.digest_algo}")
            chunk_size = entry.chunk_size
            ci_table = (entry.ci_offset, entry.ci_compressed_size, entry.ci_uncompressed_size)
            ci_comp = rafs.COMPRESSOR_NAMES.get(entry.ci_compressor)
            uncompressed_size = entry.uncompressed_size

        toc = None
        if entry is None or entry.features & rafs.BLOB_FEATURE_HAS_TOC or entry.blob_toc_size:
            toc = read_toc(read_at, blob_size, blob_id,
                           entry.blob_toc_size if entry is not None else None)
            if toc is None and entry is not None and entry.features & rafs.BLOB_FEATURE_HAS_TOC:
                raise CorruptImageError(f"blob {name}: blob table says it has a TOC, none found")

        # locate the blob meta header
        if ci_table is None:
            if toc is not None and rafs.TOC_NAME_BLOB_META in toc.entries:
                m = toc.entries[rafs.TOC_NAME_BLOB_META]
                hdr_off = m.compressed_offset + m.compressed_size
                h = toc.entries.get(rafs.TOC_NAME_BLOB_META_HEADER)
                if h is not None:
                    hdr_off = h.compressed_offset
            elif toc is None:
                hdr_off = blob_size - rafs.BLOB_META_HEADER_SIZE   # data | CI | header
            else:
                raise CorruptImageError(f"blob {name}: TOC has no blob.meta entry")
        else:
            hdr_off = ci_table[0] + ci_table[1]
        hraw = _read_exact(read_at, hdr_off, rafs.BLOB_META_HEADER_SIZE, blob_size,
                           f"blob {name}: blob meta header")
        hdr = rafs.BlobMetaHeader.decode(hraw)
        if hdr.magic != rafs.BLOB_META_MAGIC or hdr.magic2 != rafs.BLOB_META_MAGIC:
            raise CorruptImageError(f"blob {name}: bad blob meta header magic")
        if ci_table is None:
            ci_offset, ci_csize, ci_usize = (hdr.ci_offset, hdr.ci_compressed_size,
                                             hdr.ci_uncompressed_size)
            ci_comp = rafs.COMPRESSOR_NAMES.get(hdr.ci_compressor)
            features = hdr.features
            if features & rafs.BLOB_FEATURES_UNSUPPORTED:
                raise CorruptImageError(f"blob {name}: unsupported blob features {features:#x}")
        elif (hdr.ci_offset, hdr.ci_compressed_size, hdr.ci_uncompressed_size) != ci_table:
            raise CorruptImageError(
                f"blob {name}: blob meta header disagrees with the bootstrap's blob table")
        else:
            ci_offset, ci_csize, ci_usize = ci_table
        if ci_comp is None:
            raise CorruptImageError(f"blob {name}: unknown CI compressor {hdr.ci_compressor}")
        if ci_offset + ci_csize != hdr_off or ci_csize > ci_usize:
            raise CorruptImageError(f"blob {name}: CI table not right before its header")
        v2 = bool(features & rafs.BLOB_FEATURE_CHUNK_INFO_V2)
        esize = rafs.CI_V2_SIZE if v2 else rafs.CI_V1_SIZE
        n = hdr.ci_entries
        # every chunk takes at least one byte of the blob: bound the count by its size
        if n > rafs.MAX_CHUNKS_PER_BLOB or n > blob_size:
            raise CorruptImageError(f"blob {name}: implausible chunk count {n}")
        if entry is not None and entry.chunk_count != n:
            raise CorruptImageError(
                f"blob {name}: {n} CI entries, bootstrap says {entry.chunk_count} chunks")
        if (ci_usize < n * esize if v2 else ci_usize != n * esize):
            raise CorruptImageError(f"blob {name}: CI table size {ci_usize} does not fit {n} entries")
        if ci_usize > rafs.MAX_CHUNKS_PER_BLOB * rafs.CI_V2_SIZE:
            raise CorruptImageError(f"blob {name}: CI table too large")
        if ci_comp == "none" and ci_csize != ci_usize:
            raise CorruptImageError(f"blob {name}: raw CI table size mismatch")
        craw = _read_exact(read_at, ci_offset, ci_csize, blob_size, f"blob {name}: CI table")
        ci = _decompress(ci_comp, craw, ci_usize, f"blob {name}: CI table")
        data_end = ci_offset
        if entry is not None:
            data_end = min(data_end, entry.compressed_size)

        digest_region = dig_list = draw = None      # blob.digest, else `digests`
        if toc is not None and rafs.TOC_NAME_BLOB_DIGEST in toc.entries:
            d = toc.entries[rafs.TOC_NAME_BLOB_DIGEST]
            if d.flags & ~rafs.TOC_FLAG_NONE or d.compressed_size != n * DIGEST_SIZE \
                    or d.uncompressed_size != n * DIGEST_SIZE:
                raise CorruptImageError(
                    f"blob {name}: blob.digest is {d.compressed_size} bytes for {n} chunks")
            draw = _read_exact(read_at, d.compressed_offset, d.compressed_size, blob_size,
                               f"blob {name}: blob.digest")
            if d.uncompressed_digest != b"\0" * 32 and \
                    _sha256(draw) != d.uncompressed_digest:
                raise DigestMismatchError(f"blob {name}: blob.digest does not match its TOC digest")
            digest_region = (d.compressed_offset, d.compressed_size)
        if fast is not None and entry is not None:
            meta = fast(ci, n, v2, draw, data_end, (uncompressed_size, blob_size, compressor,
                                                    digester, chunk_size, features, digest_region))
            if meta is not None:
                return meta
        if draw is not None:
            dig_list = [bytes(draw[i * 32:(i + 1) * 32]) for i in range(n)]

        if toc is not None and uncompressed_size is None:
            b = toc.entries.get(rafs.TOC_NAME_BLOB_DATA)
            if b is not None:
                uncompressed_size = b.uncompressed_size

        chunks = []
        for i, (uoff, us, coff, cs, flags) in enumerate(rafs.decode_ci_table(ci, n, v2)):
            if v2:
                comp = bool(flags & rafs.CI_V2_FLAG_COMPRESSED)
                if flags & ~(rafs.CI_V2_FLAG_COMPRESSED | 0x10):
                    raise CorruptImageError(f"blob {name}: chunk {i} has unsupported flags {flags:#x}")
            else:
                comp = cs != us
            if coff + cs > data_end:
                raise CorruptImageError(
                    f"blob {name}: chunk {i} compressed range [{coff}, {coff + cs}) "
                    f"runs into the blob meta at {data_end}")
            dg = dig_list[i] if dig_list is not None else (digests or {}).get(i)
            chunks.append(BlobChunk(i, uoff, us, coff, cs, dg, comp))

        max_end = max((c.uncompressed_end for c in chunks), default=0)
        if uncompressed_size is None:
            uncompressed_size = max_end
        if chunk_size is None:
            biggest = max((c.uncompressed_size for c in chunks), default=rafs.CHUNK_SIZE_MIN)
            chunk_size = rafs.CHUNK_SIZE_MIN
            while chunk_size < biggest and chunk_size < rafs.CHUNK_SIZE_MAX:
                chunk_size <<= 1
        if compressor is None:
            compressor = "none"
            for c in chunks:
                if c.compressed:
                    head = _read_exact(read_at, c.compressed_offset, min(4, c.compressed_size),
                                       blob_size, f"blob {name}: chunk {c.index}")
                    compressor = "zstd" if head == ZSTD_MAGIC else _lz4_or_none(
                        read_at, blob_size, c, digests, dig_list)
                    if compressor is None:
                        raise CorruptImageError(
                            f"blob {name}: chunk {c.index} is not zstd and no bootstrap "
                            "says which compressor the blob uses")
                    break
        if digester is None:
            digester = "blake3"
            first = next((c for c in chunks if c.digest is not None), None)
            if first is not None:
                raw = _read_exact(read_at, first.compressed_offset, first.compressed_size,
                                  blob_size, f"blob {name}: chunk {first.index}")
                data = _decompress(compressor if first.compressed else "none", raw,
                                   first.uncompressed_size,
                                   f"blob {name}: chunk {first.index}")
                for alg in DIGESTERS:
                    if _digest(alg, data) == first.digest:
                        digester = alg
                        break
                else:
                    raise DigestMismatchError(
                        f"blob {name}: chunk {first.index} matches its digest under no "
                        "known algorithm")
        meta = cls(blob_id, chunks, uncompressed_size, blob_size, compressor, digester,
                   chunk_size, features, digest_region)
        # compressed ranges of distinct chunks must not overlap
        by_c = sorted(chunks, key=lambda c: c.compressed_offset)
        for a, b in zip(by_c, by_c[1:]):
            if a.compressed_offset + a.compressed_size > b.compressed_offset:
                raise CorruptImageError(
                    f"blob {name}: chunks {a.index} and {b.index} overlap in the blob")
        return meta


def _lz4_or_none(read_at, blob_size, c, digests, dig_list):
    """"lz4_block" if chunk `c` (compressed, not zstd) is a raw LZ4 block of data that
    matches its digest under a known algorithm (LZ4 blocks have no magic to tell them
    by), else None."""
    digest = dig_list[c.index] if dig_list is not None else (digests or {}).get(c.index)
    if digest is None:
        return None
    raw = _read_exact(read_at, c.compressed_offset, c.compressed_size, blob_size,
                      f"chunk {c.index}")
    from erofs_tools import _native
    data = _native.cold_decode_one("lz4_block", raw, c.uncompressed_size)
    if data is not None and any(_digest(alg, data) == digest for alg in DIGESTERS):
        return "lz4_block"
    return None


def decode_chunk(meta: BlobMeta, chunk: BlobChunk, raw: bytes, verify: bool = True) -> bytes:
    """Decompress one chunk's blob bytes and verify its digest; returns exactly
    chunk.uncompressed_size bytes or raises CorruptImageError / DigestMismatchError."""
    name = _blob_name(meta.blob_id)
    what = f"blob {name}: chunk {chunk.index}"
    zran = meta.zran is not None and chunk.compressed
    # a zran chunk may be given more: the bytes after its own range (same access point)
    if len(raw) != chunk.compressed_size and not (zran and len(raw) > chunk.compressed_size):
        raise CorruptImageError(f"{what}: got {len(raw)} bytes, expected {chunk.compressed_size}")
    if zran:
        try:
            data = meta.zran.decode(meta, chunk, raw)
        except CorruptImageError as e:
            raise CorruptImageError(f"{what}: {e}") from None
    elif chunk.compressed:
        data = _decompress(meta.compressor, raw, chunk.uncompressed_size, what)
    else:
        data = raw if isinstance(raw, bytes) else bytes(raw)
        if len(data) != chunk.uncompressed_size:
            raise CorruptImageError(f"{what}: raw chunk size mismatch")
    if verify and chunk.digest is not None and _digest(meta.digester, data) != chunk.digest:
        raise DigestMismatchError(f"{what}: digest mismatch ({meta.digester})")
    return data


def read_chunk(meta: BlobMeta, chunk: BlobChunk, read_at: ReadAt, verify: bool = True) -> bytes:
    """Read one chunk from the blob with `read_at` and decode it."""
    if meta.zran is not None:
        return read_zran_chunk(meta, chunk, read_at, verify)
    raw = _read_exact(read_at, chunk.compressed_offset, chunk.compressed_size,
                      meta.compressed_size, f"blob {_blob_name(meta.blob_id)}: chunk {chunk.index}")
    return decode_chunk(meta, chunk, raw, verify)


def read_zran_chunk(meta: BlobMeta, chunk: BlobChunk, read_at: ReadAt,
                    verify: bool = True) -> bytes:
    """A zran chunk: from its context's inflated bytes when they are at hand, else read
    the context's compressed bytes and decode; digest-checked either way."""
    data = meta.zran.cached(chunk)
    if data is None:
        # the whole context: its other chunks are then inflated by the same pass
        off, size = meta.zran.context_range(chunk)
        raw = _read_exact(read_at, off, size, meta.compressed_size,
                          f"blob {_blob_name(meta.blob_id)}: chunk {chunk.index}")
        return decode_chunk(meta, chunk, raw, verify)
    if verify and chunk.digest is not None and _digest(meta.digester, data) != chunk.digest:
        raise DigestMismatchError(f"blob {_blob_name(meta.blob_id)}: chunk {chunk.index}: "
                                  f"digest mismatch ({meta.digester})")
    return data


def file_reader(f):
    """A read_at(offset, length) over an open binary file (os.pread)."""
    fd = f if isinstance(f, int) else f.fileno()

    def read_at(offset, length, _keep=f):
        out = bytearray()
        while len(out) < length:
            b = os.pread(fd, length - len(out), offset + len(out))
            if not b:
                break
            out += b
        return bytes(out)
    return read_at


def open_blob(path, blob_id=None, entry=None, **kw) -> BlobMeta:
    """BlobMeta of a blob file on disk."""
    if blob_id is None and entry is None:
        base = os.path.basename(os.fspath(path))
        if len(base) == 64 and all(ch in "0123456789abcdef" for ch in base):
            blob_id = base
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return BlobMeta.from_blob(file_reader(f), size, blob_id, entry, **kw)
