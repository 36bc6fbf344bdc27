"""Chunk dictionaries: chunks of existing RAFS v6 bootstraps that a new image references.

`BootstrapTables.read()` decodes the Nydus tables of a bootstrap (superblock, extended
superblock, device table, blob table, chunk info table) with the checks nydusd applies,
treating every byte as untrusted; `ChunkDict` turns several bootstraps into one lookup
(digest, size) -> chunk location, with the dict blobs numbered first in the new image.
"""
import os

from erofs_tools.builder.blob import BlobInfo, StoredChunk, round_up
from erofs_tools.errors import CorruptImageError, InputError
from erofs_tools.format import erofs as E
from erofs_tools.format import rafs as R

MAX_BOOTSTRAP = 1 << 32


class BootstrapTables:
    def __init__(self, path, sb, ext, devices, blobs, chunks):
        self.path = path
        self.sb = sb
        self.ext = ext
        self.devices = devices      # [DeviceSlot]
        self.blobs = blobs          # [BlobInfo], blob-index order
        self.chunks = chunks        # [ChunkInfo]

    @property
    def digester(self):
        f = self.ext.s_flags
        return "sha256" if f & R.FLAG_DIGEST_SHA256 else "blake3"

    def chunk_digests(self, blob_index):
        """{CI index: digest} for one blob from the chunk info table."""
        return {c.index: c.digest for c in self.chunks if c.blob_index == blob_index}

    @classmethod
    def read(cls, path):
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > MAX_BOOTSTRAP:
                    raise CorruptImageError(f"{path}: bootstrap too large")
                buf = f.read()
        except OSError as e:
            raise InputError(f"cannot read bootstrap {path}: {e.strerror}") from None
        what = f"bootstrap {path}"
        if len(buf) < 4096 or len(buf) % 4096:
            raise CorruptImageError(f"{what}: size {len(buf)} is not a multiple of 4096")
        sb = E.SuperBlock.decode(buf, E.SUPER_OFFSET, what)
        if sb.magic != E.MAGIC:
            raise CorruptImageError(f"{what}: not an EROFS image (bad magic)")
        if not sb.feature_compat & E.FEATURE_COMPAT_RAFS_V6:
            raise CorruptImageError(f"{what}: not a RAFS v6 bootstrap")
        if sb.blkszbits != 12:
            raise CorruptImageError(f"{what}: block size 2^{sb.blkszbits} not supported")
        if sb.extra_devices and sb.devt_slotoff * 128 != R.DEVT_OFFSET:
            raise CorruptImageError(f"{what}: device table not at slot 11")
        if sb.extra_devices > R.MAX_BLOBS:
            raise CorruptImageError(f"{what}: too many blobs ({sb.extra_devices})")
        ext = R.ExtSuperBlock.decode(buf, R.EXT_SUPER_OFFSET, what)
        n = sb.extra_devices
        devices = [E.DeviceSlot.decode(buf, R.DEVT_OFFSET + 128 * i, what) for i in range(n)]
        toff, tsize = ext.s_blob_table_offset, ext.s_blob_table_size
        if tsize % R.BlobEntry.SIZE or toff % 4096 or toff + tsize > len(buf) or \
                (tsize and toff < R.DEVT_OFFSET + 128 * n):
            raise CorruptImageError(f"{what}: blob table out of bounds")
        if tsize // R.BlobEntry.SIZE != n:
            raise CorruptImageError(
                f"{what}: blob table holds {tsize // R.BlobEntry.SIZE} blobs, device table {n}")
        blobs = []
        for i in range(n):
            e = R.BlobEntry.decode(buf, toff + 256 * i, what)
            info = BlobInfo.from_entry(e)
            tag = devices[i].tag.rstrip(b"\0")
            if e.blob_index != i or tag != e.blob_id or len(info.blob_id) != 64 \
                    or not all(c in "0123456789abcdef" for c in info.blob_id):
                raise CorruptImageError(f"{what}: blob {i} has an invalid id or index")
            if info.uncompressed_size % 4096 or devices[i].blocks != info.blocks \
                    or info.blocks == 0:
                raise CorruptImageError(f"{what}: blob {i} size does not match its device")
            blobs.append(info)
        coff, csize = ext.s_chunk_table_offset, ext.s_chunk_table_size
        chunks = []
        if csize:
            if csize % R.ChunkInfo.SIZE or coff % 4096 or coff + csize > len(buf):
                raise CorruptImageError(f"{what}: chunk info table out of bounds")
            for k in range(csize // R.ChunkInfo.SIZE):
                c = R.ChunkInfo.decode(buf, coff + 80 * k, what)
                if c.blob_index >= n:
                    raise CorruptImageError(f"{what}: chunk {k} names blob {c.blob_index}")
                b = blobs[c.blob_index]
                if (c.index >= b.chunk_count or c.uncompressed_size == 0
                        or c.uncompressed_size > R.CHUNK_SIZE_MAX
                        or c.compressed_size > c.uncompressed_size
                        or c.uncompressed_offset % 4096
                        or c.uncompressed_offset + round_up(c.uncompressed_size)
                        > b.uncompressed_size
                        or c.compressed_offset + c.compressed_size > b.compressed_size):
                    raise CorruptImageError(f"{what}: chunk info entry {k} out of range")
                chunks.append(c)
        return cls(path, sb, ext, devices, blobs, chunks)


class ChunkDict:
    """Chunks of one or more bootstraps, looked up by (digest, size).

    Dict blobs are numbered 0..n-1 in the order the bootstraps (and their blob tables)
    are given; a blob listed by several dicts keeps its first index.
    """

    def __init__(self, paths=(), digester="blake3", chunk_size=None):
        self.blobs = []            # [BlobInfo]
        self._blob_index = {}      # blob id -> new index
        self.chunks = {}           # (digest, size) -> StoredChunk
        for p in paths:
            self._add(BootstrapTables.read(p), digester, chunk_size)

    def _add(self, t, digester, chunk_size):
        if t.digester != digester:
            raise InputError(f"chunk dict {t.path} uses {t.digester} digests, not {digester}")
        if chunk_size is not None and t.blobs and t.ext.s_chunk_size != chunk_size:
            raise InputError(f"chunk dict {t.path} has chunk size {t.ext.s_chunk_size}, "
                             f"not {chunk_size}")
        remap = {}
        for i, b in enumerate(t.blobs):
            if b.blob_id not in self._blob_index:
                if b.digester != digester:
                    raise InputError(f"chunk dict {t.path}: blob {b.blob_id} uses "
                                     f"{b.digester} digests")
                self._blob_index[b.blob_id] = len(self.blobs)
                self.blobs.append(b)
            remap[i] = self._blob_index[b.blob_id]
        for c in t.chunks:
            key = (c.digest, c.uncompressed_size)
            if key in self.chunks:
                continue
            self.chunks[key] = StoredChunk(c.digest, remap[c.blob_index], c.index,
                                           c.compressed_offset, c.compressed_size,
                                           c.uncompressed_offset, c.uncompressed_size)
        if len(self.blobs) > R.MAX_BLOBS - 1:
            raise InputError(f"chunk dicts list {len(self.blobs)} blobs, at most "
                             f"{R.MAX_BLOBS - 1} fit beside the new one")

    def get(self, key):
        return self.chunks.get(key)

    def __contains__(self, key):
        return key in self.chunks

    def __len__(self):
        return len(self.chunks)
