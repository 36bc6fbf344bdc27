"""RAFS v6 data blobs: the writer (pack) and the meta reader (mount, chunk dicts).

Layout written (rafs-v6.md §10, "blob-toc" flavour as nydus-image writes it):

    compressed chunks back to back
    tar header "image.blob"                         size = data size
    CI table (CI v1, zstd-compressed if smaller)
    BlobCompressionContextHeader (4096 bytes)
    tar header "blob.meta"                          size = CI stored size + 4096
    chunk digests (32 bytes each, raw)
    tar header "blob.digest"
    TOC entries (128 bytes each)
    tar header "rafs.blob.toc"

The blob id is the sha256 of every byte written except the raw digest array (§11); the
file is built under a temporary name in the blob directory and renamed to the id.
"""
import hashlib
import os
import queue
import struct
import tempfile
import threading

import zstandard

from erofs_tools.errors import CorruptImageError, DigestMismatchError, InputError
from erofs_tools.format import rafs as R

BLKSZ = 4096
CI_ZSTD_LEVEL = 3
WRITE_BATCH = 4 << 20      # chunks handed to the writer thread in groups of this size


def round_up(n, a=BLKSZ):
    return (n + a - 1) // a * a


class BlobInfo:
    """What the bootstrap needs to know about one blob."""

    def __init__(self, **kw):
        self.blob_id = kw.pop("blob_id")                 # str, 64 hex chars
        self.path = kw.pop("path", None)
        self.chunk_size = kw.pop("chunk_size")
        self.chunk_count = kw.pop("chunk_count")
        self.compressor = kw.pop("compressor")           # "zstd" | "none" | ...
        self.digester = kw.pop("digester")
        self.features = kw.pop("features", R.BLOB_FEATURES_DEFAULT)
        self.compressed_size = kw.pop("compressed_size")
        self.uncompressed_size = kw.pop("uncompressed_size")
        self.toc_size = kw.pop("toc_size", 0)
        self.toc_digest = kw.pop("toc_digest", bytes(32))
        self.ci_compressor = kw.pop("ci_compressor", 0)
        self.ci_offset = kw.pop("ci_offset", 0)
        self.ci_compressed_size = kw.pop("ci_compressed_size", 0)
        self.ci_uncompressed_size = kw.pop("ci_uncompressed_size", 0)
        self.meta_digest = kw.pop("meta_digest", bytes(32))
        self.meta_size = kw.pop("meta_size", 0)
        if kw:
            raise TypeError(f"unknown BlobInfo fields {sorted(kw)}")

    @property
    def blocks(self):
        return self.uncompressed_size // BLKSZ

    def blob_entry(self, blob_index):
        return R.BlobEntry(
            blob_id=self.blob_id.encode(), blob_index=blob_index,
            chunk_size=self.chunk_size, chunk_count=self.chunk_count,
            compression_algo=R.COMPRESSOR_CODES[self.compressor],
            digest_algo=R.DIGESTER_CODES[self.digester], features=self.features,
            compressed_size=self.compressed_size, uncompressed_size=self.uncompressed_size,
            blob_toc_size=self.toc_size, ci_compressor=self.ci_compressor,
            ci_offset=self.ci_offset, ci_compressed_size=self.ci_compressed_size,
            ci_uncompressed_size=self.ci_uncompressed_size,
            blob_toc_digest=self.toc_digest, blob_meta_digest=self.meta_digest,
            blob_meta_size=self.meta_size)

    @classmethod
    def from_entry(cls, e):
        try:
            blob_id = e.blob_id.decode("ascii")
        except UnicodeDecodeError:
            raise CorruptImageError("blob table: blob id is not ASCII") from None
        if e.compression_algo not in R.COMPRESSOR_NAMES or e.digest_algo not in R.DIGESTER_NAMES:
            raise CorruptImageError(f"blob {blob_id}: unknown compression or digest algorithm")
        return cls(blob_id=blob_id, chunk_size=e.chunk_size, chunk_count=e.chunk_count,
                   compressor=R.COMPRESSOR_NAMES[e.compression_algo],
                   digester=R.DIGESTER_NAMES[e.digest_algo], features=e.features,
                   compressed_size=e.compressed_size, uncompressed_size=e.uncompressed_size,
                   toc_size=e.blob_toc_size, toc_digest=e.blob_toc_digest,
                   ci_compressor=e.ci_compressor, ci_offset=e.ci_offset,
                   ci_compressed_size=e.ci_compressed_size,
                   ci_uncompressed_size=e.ci_uncompressed_size,
                   meta_digest=e.blob_meta_digest, meta_size=e.blob_meta_size)

    def as_dict(self):
        return {"blob_id": self.blob_id, "compressed_size": self.compressed_size,
                "uncompressed_size": self.uncompressed_size, "chunk_count": self.chunk_count,
                "compressor": self.compressor, "digester": self.digester}


_CHUNK_INFO = struct.Struct("<32sIIIIQQQII")
assert _CHUNK_INFO.size == R.ChunkInfo.SIZE


class StoredChunk:
    """Where one distinct chunk lives: blob index + its CI entry."""
    __slots__ = ("digest", "blob_index", "index", "compressed_offset", "compressed_size",
                 "uncompressed_offset", "uncompressed_size")

    def __init__(self, digest, blob_index, index, compressed_offset, compressed_size,
                 uncompressed_offset, uncompressed_size):
        self.digest = digest
        self.blob_index = blob_index
        self.index = index
        self.compressed_offset = compressed_offset
        self.compressed_size = compressed_size
        self.uncompressed_offset = uncompressed_offset
        self.uncompressed_size = uncompressed_size

    @property
    def compressed(self):
        return self.compressed_size != self.uncompressed_size

    def chunk_index_bytes(self):
        """The 8-byte RafsV6InodeChunkAddr / EROFS chunk index of this chunk (§8)."""
        lo = self.index & 0xFFFF
        hi = ((self.blob_index + 1) & 0xFF) | (((self.index >> 16) & 0xFF) << 8)
        blk = self.uncompressed_offset // BLKSZ
        return lo.to_bytes(2, "little") + hi.to_bytes(2, "little") + blk.to_bytes(4, "little")

    def chunk_info_bytes(self, blob_index, file_offset=0):
        """The 80-byte RafsV5ChunkInfo of this chunk (fast path of chunk_info().encode())."""
        return _CHUNK_INFO.pack(
            self.digest, blob_index,
            R.CHUNK_FLAG_COMPRESSED if self.compressed_size != self.uncompressed_size else 0,
            self.compressed_size, self.uncompressed_size, self.compressed_offset,
            self.uncompressed_offset, file_offset, self.index, 0)

    def chunk_info(self, file_offset=0):
        return R.ChunkInfo(
            digest=self.digest, blob_index=self.blob_index,
            flags=R.CHUNK_FLAG_COMPRESSED if self.compressed else 0,
            compressed_size=self.compressed_size, uncompressed_size=self.uncompressed_size,
            compressed_offset=self.compressed_offset,
            uncompressed_offset=self.uncompressed_offset, file_offset=file_offset,
            index=self.index, crc32=0)


class BlobWriter:
    """Append stored chunks, then `finish()` the meta sections and name the file."""

    def __init__(self, blob_dir, chunk_size, compressor="zstd", digester="blake3",
                 blob_index=0):
        if not os.path.isdir(blob_dir):
            raise InputError(f"blob directory {blob_dir} does not exist")
        self.blob_dir = blob_dir
        self.chunk_size = chunk_size
        self.compressor = compressor
        self.digester = digester
        self.blob_index = blob_index
        fd, self.tmp_path = tempfile.mkstemp(prefix=".blob-", suffix=".tmp", dir=blob_dir)
        self._f = os.fdopen(fd, "wb", buffering=1 << 20)
        self._hash = hashlib.sha256()
        self._pos = 0
        self._upos = 0
        self._ci = bytearray()
        self._digests = bytearray()
        self.count = 0
        self.info = None
        # chunk data is written and hashed (blob id) by a background thread, so the
        # sequential sha256 overlaps with chunking; the queue bounds memory to ~64 MiB
        self._q = queue.Queue(maxsize=max(2, (64 << 20) // max(WRITE_BATCH, chunk_size)))
        self._buf = []
        self._buf_bytes = 0
        self._error = None
        self._thread = threading.Thread(target=self._drain, name="erofs-blob-writer",
                                        daemon=True)
        self._thread.start()

    def _drain(self):
        f, h = self._f, self._hash
        while True:
            batch = self._q.get()
            if batch is None:
                return
            if self._error is None:
                try:
                    for data in batch:
                        f.write(data)
                        h.update(data)
                except BaseException as e:   # reported by the next add_chunk / finish
                    self._error = e

    def _sync(self):
        """Stop the background writer; later writes are synchronous."""
        if self._thread is not None:
            if self._buf:
                self._q.put(self._buf)
                self._buf = []
            self._q.put(None)
            self._thread.join()
            self._thread = None
        if self._error is not None:
            e = self._error
            raise InputError(f"cannot write blob in {self.blob_dir}: "
                             f"{getattr(e, 'strerror', None) or e}") from None

    def _write(self, data, hashed=True):
        if self._thread is not None and hashed:
            if self._error is not None:
                self._sync()
            self._buf.append(data)
            self._buf_bytes += len(data)
            if self._buf_bytes >= WRITE_BATCH:
                self._q.put(self._buf)
                self._buf = []
                self._buf_bytes = 0
        else:
            self._f.write(data)
            if hashed:
                self._hash.update(data)
        self._pos += len(data)

    def add_chunk(self, stored, uncompressed_size, digest):
        """Append one chunk's stored bytes; -> StoredChunk."""
        if self.count >= R.MAX_CHUNKS_PER_BLOB:
            raise InputError("too many distinct chunks for one blob (2^24)")
        if len(stored) > uncompressed_size:
            raise ValueError("stored chunk larger than its data")
        sc = StoredChunk(digest, self.blob_index, self.count, self._pos, len(stored),
                         self._upos, uncompressed_size)
        self._ci += R.encode_ci_v1(self._upos, uncompressed_size, self._pos, len(stored))
        self._digests += digest
        self._write(stored)
        self._upos += round_up(uncompressed_size)
        self.count += 1
        return sc

    def abort(self):
        try:
            self._sync()
        except InputError:
            pass
        if self._f is not None:
            try:
                self._f.close()     # flushing the buffer fails again on a full disk
            except OSError:
                pass
            self._f = None
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            pass

    def finish(self, commit=True):
        """Write the meta sections; -> BlobInfo, or None if no chunk was added.

        With commit=False the file stays under its temporary name until `commit()` (so a
        pack that fails later leaves nothing behind; `abort()` removes it).
        """
        if self.count == 0:
            self.abort()
            return None
        try:
            info = self._finish()
            if commit:
                self.commit()
            return info
        except BaseException:
            self.abort()
            raise

    def commit(self):
        """Rename the finished blob to its id."""
        os.chmod(self.tmp_path, 0o644)
        os.replace(self.tmp_path, self.info.path)

    def _finish(self):
        self._sync()
        toc = []
        data_size = self._pos
        # image.blob: nydus records the running blob hash after this header as its digest
        # and the data size as its offset (see format/rafs.py).
        self._write(R.tar_header(R.TOC_NAME_BLOB_DATA, data_size))
        toc.append(R.TocEntry(flags=R.TOC_FLAG_NONE, name=R.TOC_NAME_BLOB_DATA,
                              uncompressed_digest=self._hash.copy().digest(),
                              compressed_offset=data_size, compressed_size=data_size,
                              uncompressed_size=self._upos))
        # CI table, compressed when that is smaller and the blob is compressed
        ci_raw = bytes(self._ci)
        ci_stored, ci_comp = ci_raw, 0
        if self.compressor == "zstd":
            z = zstandard.ZstdCompressor(level=CI_ZSTD_LEVEL).compress(ci_raw)
            if len(z) < len(ci_raw):
                ci_stored, ci_comp = z, R.COMPRESSOR_CODES["zstd"]
        features = R.BLOB_FEATURES_DEFAULT
        ci_offset = self._pos
        self._write(ci_stored)
        hdr = R.BlobMetaHeader(
            magic=R.BLOB_META_MAGIC, features=features, ci_compressor=ci_comp,
            ci_entries=self.count, ci_offset=ci_offset, ci_compressed_size=len(ci_stored),
            ci_uncompressed_size=len(ci_raw), magic2=R.BLOB_META_MAGIC).encode()
        hdr_offset = self._pos
        self._write(hdr)
        self._write(R.tar_header(R.TOC_NAME_BLOB_META, len(ci_stored) + len(hdr)))
        toc.append(R.TocEntry(flags=R.TOC_FLAG_ZSTD if ci_comp else R.TOC_FLAG_NONE,
                              name=R.TOC_NAME_BLOB_META,
                              uncompressed_digest=hashlib.sha256(ci_raw).digest(),
                              compressed_offset=ci_offset, compressed_size=len(ci_stored),
                              uncompressed_size=len(ci_raw)))
        toc.append(R.TocEntry(flags=R.TOC_FLAG_NONE, name=R.TOC_NAME_BLOB_META_HEADER,
                              uncompressed_digest=hashlib.sha256(hdr).digest(),
                              compressed_offset=hdr_offset, compressed_size=len(hdr),
                              uncompressed_size=len(hdr)))
        # chunk digests: written raw, not part of the blob id (§11)
        digests = bytes(self._digests)
        dig_offset = self._pos
        self._write(digests, hashed=False)
        self._write(R.tar_header(R.TOC_NAME_BLOB_DIGEST, len(digests)))
        toc.append(R.TocEntry(flags=R.TOC_FLAG_NONE, name=R.TOC_NAME_BLOB_DIGEST,
                              uncompressed_digest=hashlib.sha256(digests).digest(),
                              compressed_offset=dig_offset, compressed_size=len(digests),
                              uncompressed_size=len(digests)))
        toc_bytes = b"".join(e.encode() for e in toc)
        toc_bytes += R.tar_header(R.TOC_NAME_TOC, len(toc_bytes))
        self._write(toc_bytes)
        self._f.close()
        self._f = None
        blob_id = self._hash.hexdigest()
        path = os.path.join(self.blob_dir, blob_id)
        self.info = BlobInfo(
            blob_id=blob_id, path=path, chunk_size=self.chunk_size, chunk_count=self.count,
            compressor=self.compressor, digester=self.digester, features=features,
            compressed_size=self._pos, uncompressed_size=self._upos,
            toc_size=len(toc_bytes), toc_digest=hashlib.sha256(toc_bytes).digest(),
            ci_compressor=ci_comp, ci_offset=ci_offset, ci_compressed_size=len(ci_stored),
            ci_uncompressed_size=len(ci_raw))
        return self.info


# --- reading ------------------------------------------------------------------------------

def read_toc(f, size, toc_size=0):
    """-> {name: TocEntry} from the blob's tail, or {} if the blob has no TOC."""
    if size < R.TAR_BLOCK:
        return {}
    f.seek(size - R.TAR_BLOCK)
    parsed = R.parse_tar_header(f.read(R.TAR_BLOCK))
    if parsed is None or parsed[0] != R.TOC_NAME_TOC:
        return {}
    n = parsed[1]
    if n <= 0 or n % R.TocEntry.SIZE or n + R.TAR_BLOCK > min(size, R.TOC_MAX_SIZE):
        raise CorruptImageError(f"blob TOC size {n} is invalid")
    f.seek(size - R.TAR_BLOCK - n)
    buf = f.read(n)
    out = {}
    for k in range(n // R.TocEntry.SIZE):
        e = R.TocEntry.decode(buf, k * R.TocEntry.SIZE, "TOC entry")
        out[e.name.rstrip(b"\0")] = e
    return out


class BlobMeta:
    """The CI table (and inlined digests, if any) of one blob file."""

    def __init__(self, info, entries, digests):
        self.info = info
        self.entries = entries        # [(uoff, usize, coff, csize)]
        self.digests = digests        # [bytes32] or None

    @classmethod
    def read(cls, path, info):
        """Read and check CI table + digests of `path` described by blob table `info`."""
        try:
            f = open(path, "rb")
        except OSError as e:
            raise InputError(f"cannot open blob {path}: {e.strerror}") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size != info.compressed_size:
                raise CorruptImageError(
                    f"blob {path}: size {size} differs from the bootstrap's {info.compressed_size}")
            if info.features & R.BLOB_FEATURES_UNSUPPORTED:
                raise CorruptImageError(
                    f"blob {info.blob_id}: unsupported features {info.features:#x}")
            if info.ci_offset + info.ci_compressed_size > size:
                raise CorruptImageError(f"blob {path}: CI table beyond end of blob")
            if info.ci_uncompressed_size != info.chunk_count * R.CI_V1_SIZE:
                raise CorruptImageError(f"blob {path}: CI table size does not match chunk count")
            f.seek(info.ci_offset)
            raw = f.read(info.ci_compressed_size)
            if info.ci_compressor == 0:
                ci = raw
            elif info.ci_compressor == R.COMPRESSOR_CODES["zstd"]:
                try:
                    ci = zstandard.ZstdDecompressor().decompress(
                        raw, max_output_size=info.ci_uncompressed_size)
                except zstandard.ZstdError as e:
                    raise CorruptImageError(f"blob {path}: bad CI table: {e}") from None
            else:
                raise CorruptImageError(f"blob {path}: unsupported CI compressor")
            if len(ci) != info.ci_uncompressed_size:
                raise CorruptImageError(f"blob {path}: CI table truncated")
            entries = []
            for k in range(info.chunk_count):
                uoff, us, coff, cs = R.decode_ci_v1(ci, k * R.CI_V1_SIZE)
                if (coff + cs > info.ci_offset or cs > us or us > R.CHUNK_SIZE_MAX
                        or uoff + round_up(us) > info.uncompressed_size):
                    raise CorruptImageError(f"blob {path}: CI entry {k} out of range")
                entries.append((uoff, us, coff, cs))
            digests = None
            toc = read_toc(f, size, info.toc_size)
            d = toc.get(R.TOC_NAME_BLOB_DIGEST)
            if d is not None:
                if (d.compressed_size != 32 * info.chunk_count
                        or d.compressed_offset + d.compressed_size > size):
                    raise CorruptImageError(f"blob {path}: digest array has a wrong size")
                f.seek(d.compressed_offset)
                buf = f.read(d.compressed_size)
                if hashlib.sha256(buf).digest() != d.uncompressed_digest:
                    raise DigestMismatchError(f"blob {path}: digest array checksum mismatch")
                digests = [buf[i:i + 32] for i in range(0, len(buf), 32)]
        return cls(info, entries, digests)
