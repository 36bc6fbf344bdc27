"""The Nydus tables of a RAFS v6 bootstrap, checked as nydusd checks them.

`BootstrapTables.read()` is the one reader of a bootstrap's superblock, extended
superblock, device table, blob table and chunk info table for every user that needs
the blobs of an image (chunk dicts, merge, mount, convert). The tables are decoded once,
by `reader.image.Image` (which treats every byte as untrusted); this module adds the
nydusd-level consistency checks between them and turns blob-table entries into
`BlobInfo`, the form the builder also writes them from.
"""
from __future__ import annotations

import functools
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

from erofs_tools import _native_chunkmap as cmap
from erofs_tools.errors import CorruptImageError, InputError
from erofs_tools.format import erofs as E
from erofs_tools.format import rafs as R
from erofs_tools.fsutil import round_up
from erofs_tools.reader import blob as rblob
from erofs_tools.reader.image import Image

MAX_BOOTSTRAP = 1 << 32
_HEX = frozenset("0123456789abcdef")


class ChunkPin(NamedTuple):
    """What a bootstrap's chunk-info table says about one chunk of a blob: where it lies
    and the digest of its bytes. A cached chunk may serve this bootstrap only if the
    chunk map agrees with its pin (the defence against a borrowed blob id)."""
    uncompressed_offset: int
    uncompressed_size: int
    compressed_offset: int
    compressed_size: int
    digest: bytes
    # the chunk-info flag: its bytes in the blob are compressed (None: not known)
    compressed: bool | None = None


def chunk_pins(img: Image) -> list[dict[int, ChunkPin]]:
    """Per blob of a RAFS image, {CI index: ChunkPin} from its chunk-info table. The one
    reader of pins for `erofs-tools mount` and the daemon. An index pinned twice with
    different values makes the bootstrap unusable (which would the kernel read?)."""
    n = len(img.devices)
    out: list[dict[int, ChunkPin]] = [{} for _ in range(n)]
    # raw rows, not ChunkInfo records: a cold mount reads tens of thousands of them
    for digest, blob, flags, csize, usize, coff, uoff, _fo, index, _crc in \
            img.chunk_info_rows():
        if blob >= n:
            raise CorruptImageError(f"{img.name}: chunk table names blob {blob}, "
                                    f"the bootstrap has {n}")
        pin = ChunkPin(uoff, usize, coff, csize, digest,
                       bool(flags & R.CHUNK_FLAG_COMPRESSED))
        if out[blob].setdefault(index, pin) != pin:
            raise CorruptImageError(f"{img.name}: chunk table gives chunk {index} of blob "
                                    f"{blob} twice, differently")
    if img._flags[img._slot]:       # rows read after the image file shrank (mapped.py)
        raise img._torn()
    return out


_UOFF_ONLY = "<4xQ49x"          # a PIN_FORMAT record's uncompressed offset alone


class PinTable(Mapping[int, ChunkPin]):
    """{CI index: ChunkPin} of one blob, kept as the C core's packed records
    (csrc/chunkmap.c): a cold mount needs only their table digest text and the chunk
    map they make, both made in C; the dict is built on first use as a mapping (a
    cached map compared with the pins, a blob that needs its own table)."""

    __slots__ = ("records", "_dict")

    def __init__(self, records: bytes) -> None:
        self.records = records
        self._dict: dict[int, ChunkPin] | None = None

    def _pins(self) -> dict[int, ChunkPin]:
        if self._dict is None:
            self._dict = {r[0]: ChunkPin(r[1], r[2], r[3], r[4], r[5], r[6])
                          for r in struct.iter_unpack(cmap.PIN_FORMAT, self.records)}
        return self._dict

    def __len__(self) -> int:
        return len(self.records) // cmap.PIN_REC

    def __getitem__(self, index: int) -> ChunkPin:
        return self._pins()[index]

    def __iter__(self) -> Iterator[int]:
        return iter(self._pins())

    def digests(self) -> PinDigests:
        return PinDigests(self)

    def uncompressed_offsets(self) -> Iterator[int]:
        """The pins' uncompressed offsets in index order, without making the pins (the
        daemon's mount asks this of a 45,000-chunk blob)."""
        return (r[0] for r in struct.iter_unpack(_UOFF_ONLY, self.records))

    @classmethod
    def of_blob_table(cls, ci: bytes, n: int, v2: bool, digests: bytes | None,
                      pins: PinTable | None) -> PinTable | None:
        """Pins for every entry of a blob's own CI table (n entries, v2 or v1), digests
        from `pins` (the bootstrap's, which must place each chunk as the table does)
        else from `digests` (the blob's digest section), made by the C core; None if a
        pin disagrees, a flag is unknown or a chunk has no digest."""
        recs = cmap.ci_blob_pins(ci, n, v2, digests, pins.records if pins is not None else b"")
        return None if recs is None else cls(recs)

    def table_text(self) -> bytes:
        """"index:uoff:usize:coff:csize:" + digest per pin, in index order."""
        return cmap.ci_table_text(self.records)

    def chunk_map(self, chunk_count: int, uncompressed_size: int, compressed_size: int,
                  chunk_size: int, raw_only: bool
                  ) -> tuple[bytes, Callable[[], list[rblob.BlobChunk]]] | None:
        """(the map file's entries, a function making the chunks in uncompressed order)
        when these pins are the whole blob's chunk map and pass BlobMeta's chunk checks;
        else None. The chunks are made when first needed (BlobMeta.chunks): a mount
        needs only their count and the entries."""
        got = cmap.ci_map(self.records, chunk_count, uncompressed_size, compressed_size,
                          chunk_size, raw_only)
        if got is None:
            return None
        entries, recs = got

        def chunks() -> list[rblob.BlobChunk]:
            # tuple.__new__ straight from the unpacked rows: no Python call per chunk
            make = functools.partial(tuple.__new__, rblob.BlobChunk)
            return list(map(make, struct.iter_unpack(cmap.CHUNK_FORMAT, recs)))
        return entries, chunks


class PinDigests(Mapping[int, bytes]):
    """{CI index: digest} of a PinTable, a view: the chunk map made from the pins never
    looks into it (a blob read through its own table does)."""

    __slots__ = ("pins",)

    def __init__(self, pins: PinTable) -> None:
        self.pins = pins

    def __len__(self) -> int:
        return len(self.pins)

    def __getitem__(self, index: int) -> bytes:
        return self.pins[index].digest

    def __iter__(self) -> Iterator[int]:
        return iter(self.pins)


def chunk_pin_tables(img: Image) -> list[PinTable]:
    """chunk_pins() made by the C core: per blob, its PinTable (same pins, same errors)."""
    n, ext = len(img.devices), img.rafs
    # the table's place and size were checked when the image was opened
    table = img.read(ext.s_chunk_table_offset, ext.s_chunk_table_size,
                     "chunk info table") if ext is not None and ext.s_chunk_table_size else b""
    if not n and len(table) >= cmap.CI_ROW:
        # no blob to pin: every row names one past the table (chunk_pins' first error)
        blob = struct.unpack_from("<I", table, 32)[0]
        raise CorruptImageError(f"{img.name}: chunk table names blob {blob}, "
                                f"the bootstrap has 0")
    return [PinTable(cmap.ci_pins(table, n, b, img.name)) for b in range(n)]


# BlobInfo attribute -> BlobEntry field, for the values stored as they are (blob id,
# index and algorithm codes are converted; cipher fields are never written)
_SAME_VALUE = (
    ("chunk_size", "chunk_size"), ("chunk_count", "chunk_count"), ("features", "features"),
    ("compressed_size", "compressed_size"), ("uncompressed_size", "uncompressed_size"),
    ("toc_size", "blob_toc_size"), ("toc_digest", "blob_toc_digest"),
    ("ci_compressor", "ci_compressor"), ("ci_offset", "ci_offset"),
    ("ci_compressed_size", "ci_compressed_size"),
    ("ci_uncompressed_size", "ci_uncompressed_size"),
    ("meta_digest", "blob_meta_digest"), ("meta_size", "blob_meta_size"),
)


class BlobInfo:
    """What the bootstrap needs to know about one blob (a blob-table entry, decoded)."""

    def __init__(self, **kw: Any) -> None:
        self.blob_id: str = kw.pop("blob_id")            # 64 hex chars
        self.path: str | None = kw.pop("path", None)
        self.chunk_size: int = kw.pop("chunk_size")
        self.chunk_count: int = kw.pop("chunk_count")
        self.compressor: str = kw.pop("compressor")      # "zstd" | "none" | ...
        self.digester: str = kw.pop("digester")
        self.features: int = kw.pop("features", R.BLOB_FEATURES_DEFAULT)
        self.compressed_size: int = kw.pop("compressed_size")
        self.uncompressed_size: int = kw.pop("uncompressed_size")
        self.toc_size: int = kw.pop("toc_size", 0)
        self.toc_digest: bytes = kw.pop("toc_digest", bytes(32))
        self.ci_compressor: int = kw.pop("ci_compressor", 0)
        self.ci_offset: int = kw.pop("ci_offset", 0)
        self.ci_compressed_size: int = kw.pop("ci_compressed_size", 0)
        self.ci_uncompressed_size: int = kw.pop("ci_uncompressed_size", 0)
        self.meta_digest: bytes = kw.pop("meta_digest", bytes(32))
        self.meta_size: int = kw.pop("meta_size", 0)
        if kw:
            raise TypeError(f"unknown BlobInfo fields {sorted(kw)}")

    @property
    def blocks(self) -> int:
        return self.uncompressed_size // E.BLKSZ

    def blob_entry(self, blob_index: int) -> R.BlobEntry:
        return R.BlobEntry(
            blob_id=self.blob_id.encode(), blob_index=blob_index,
            compression_algo=R.COMPRESSOR_CODES[self.compressor],
            digest_algo=R.DIGESTER_CODES[self.digester],
            **{field: getattr(self, attr) for attr, field in _SAME_VALUE})

    @classmethod
    def from_entry(cls, e: R.BlobEntry) -> BlobInfo:
        try:
            blob_id = e.blob_id.decode("ascii")
        except UnicodeDecodeError:
            raise CorruptImageError("blob table: blob id is not ASCII") from None
        if e.compression_algo not in R.COMPRESSOR_NAMES or e.digest_algo not in R.DIGESTER_NAMES:
            raise CorruptImageError(f"blob {blob_id}: unknown compression or digest algorithm")
        return cls(blob_id=blob_id, compressor=R.COMPRESSOR_NAMES[e.compression_algo],
                   digester=R.DIGESTER_NAMES[e.digest_algo],
                   **{attr: getattr(e, field) for attr, field in _SAME_VALUE})

    def read_meta(self, path: str, digests: dict[int, bytes] | None = None) -> rblob.BlobMeta:
        """The meta (CI table, digests) of the blob file `path` this entry describes; its
        size must be the table's compressed size. `digests` ({CI index: digest}, e.g. the
        bootstrap's) serve chunks the blob has no digest for."""
        try:
            f = open(path, "rb")
        except OSError as e:
            raise InputError(f"cannot open blob {path}: {e.strerror}") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size != self.compressed_size:
                raise CorruptImageError(
                    f"blob {path}: size {size} differs from the bootstrap's {self.compressed_size}")
            return rblob.BlobMeta.from_blob(rblob.file_reader(f), size, self.blob_id,
                                            self.blob_entry(0), digests=digests)

    def as_dict(self) -> dict[str, Any]:
        return {"blob_id": self.blob_id, "compressed_size": self.compressed_size,
                "uncompressed_size": self.uncompressed_size, "chunk_count": self.chunk_count,
                "compressor": self.compressor, "digester": self.digester}


class BootstrapTables:
    """The blob-related tables of one RAFS v6 bootstrap."""

    def __init__(self, path: str, sb: E.SuperBlock, ext: R.ExtSuperBlock,
                 devices: list[E.DeviceSlot], blobs: list[BlobInfo],
                 chunks: list[R.ChunkInfo]) -> None:
        self.path = path
        self.sb = sb
        self.ext = ext
        self.devices = devices      # [DeviceSlot]
        self.blobs = blobs          # [BlobInfo], blob-index order
        self.chunks = chunks        # [ChunkInfo]

    @property
    def digester(self) -> str:
        f = self.ext.s_flags
        return "sha256" if f & R.FLAG_DIGEST_SHA256 else "blake3"

    def chunk_digests(self, blob_index: int) -> dict[int, bytes]:
        """{CI index: digest} for one blob from the chunk info table."""
        return {c.index: c.digest for c in self.chunks if c.blob_index == blob_index}

    @classmethod
    def read(cls, path: str) -> BootstrapTables:
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > MAX_BOOTSTRAP:
                    raise CorruptImageError(f"{path}: bootstrap too large")
                buf = f.read()
        except OSError as e:
            raise InputError(f"cannot read bootstrap {path}: {e.strerror}") from None
        what = f"bootstrap {path}"
        if len(buf) < E.BLKSZ or len(buf) % E.BLKSZ:
            raise CorruptImageError(f"{what}: size {len(buf)} is not a multiple of {E.BLKSZ}")
        sb = E.SuperBlock.decode(buf, E.SUPER_OFFSET, what)
        if sb.magic != E.MAGIC:
            raise CorruptImageError(f"{what}: not an EROFS image (bad magic)")
        if not sb.feature_compat & E.FEATURE_COMPAT_RAFS_V6:
            raise CorruptImageError(f"{what}: not a RAFS v6 bootstrap")
        if sb.blkszbits != E.BLKSZ_BITS:
            raise CorruptImageError(f"{what}: block size 2^{sb.blkszbits} not supported")
        if sb.extra_devices and sb.devt_slotoff * E.DEVICE_SLOT_SIZE != R.DEVT_OFFSET:
            raise CorruptImageError(f"{what}: device table not at slot {R.DEVT_SLOTOFF}")
        if sb.extra_devices > R.MAX_BLOBS:
            raise CorruptImageError(f"{what}: too many blobs ({sb.extra_devices})")
        # the one decoder of the tables (bounds, alignment, overlaps, chunk size)
        img = Image(buf, name=what)
        ext = img.rafs
        assert ext is not None            # RAFS_V6 checked above
        devices = img.devices
        n = len(devices)
        if len(img.blob_entries) != n:
            raise CorruptImageError(
                f"{what}: blob table holds {len(img.blob_entries)} blobs, device table {n}")
        blobs = [cls._check_blob(what, i, e, devices[i])
                 for i, e in enumerate(img.blob_entries)]
        chunks = img.chunk_infos
        for k, c in enumerate(chunks):
            if c.blob_index >= n:
                raise CorruptImageError(f"{what}: chunk {k} names blob {c.blob_index}")
            b = blobs[c.blob_index]
            if (c.index >= b.chunk_count or c.uncompressed_size == 0
                    or c.uncompressed_size > R.CHUNK_SIZE_MAX
                    or (c.compressed_size > c.uncompressed_size
                        and not b.features & R.BLOB_FEATURE_ZRAN)   # gzip's own bytes
                    or c.uncompressed_offset % E.BLKSZ
                    or c.uncompressed_offset + round_up(c.uncompressed_size, E.BLKSZ)
                    > b.uncompressed_size
                    or c.compressed_offset + c.compressed_size > b.compressed_size):
                raise CorruptImageError(f"{what}: chunk info entry {k} out of range")
        return cls(path, sb, ext, devices, blobs, chunks)

    @staticmethod
    def _check_blob(what: str, i: int, e: R.BlobEntry, device: E.DeviceSlot) -> BlobInfo:
        """The blob-table entry `i` must name its device slot and fit its size."""
        info = BlobInfo.from_entry(e)
        tag = device.tag.rstrip(b"\0")
        if e.blob_index != i or tag != e.blob_id or len(info.blob_id) != 64 \
                or not set(info.blob_id) <= _HEX:
            raise CorruptImageError(f"{what}: blob {i} has an invalid id or index")
        if info.uncompressed_size % E.BLKSZ or device.blocks != info.blocks or info.blocks == 0:
            raise CorruptImageError(f"{what}: blob {i} size does not match its device")
        return info
