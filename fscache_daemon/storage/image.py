"""What the daemon needs from a RAFS v6 bootstrap: its blobs in device-table order (id,
stored and uncompressed sizes, blob-table entry, chunk digests from the chunk-info table)
and the uncompressed ranges of its prefetch list.

This is the one place that talks to the image reader (`erofs_tools.reader.image`), so a
change of reader API touches only this module.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from erofs_tools.errors import CorruptImageError, ErofsToolsError
from erofs_tools.reader.bootstrap import ChunkPin, PinTable, chunk_pin_tables
from erofs_tools.reader.image import open_image
from erofs_tools.reader.runs import Runs, data_runs_later

from . import StorageError

log = logging.getLogger(__name__)


class BlobRef:
    """One blob of the bootstrap: device slot (= blob_index; EROFS device id = index +
    1), id, stored and uncompressed sizes, blob-table entry (format.rafs.BlobEntry, for
    BlobMeta.from_blob), its pins from the chunk-info table ({CI index: ChunkPin}, a
    PinTable: packed until looked into) and their table digest (table_digest)."""

    __slots__ = ("index", "blob_id", "compressed_size", "uncompressed_size", "entry",
                 "pins", "_table", "_digests")

    def __init__(self, index: int, blob_id: str, compressed_size: int,
                 uncompressed_size: int, entry=None, pins: Mapping[int, ChunkPin] | None = None,
                 table_digest: bytes = b""):
        self.index = index
        self.blob_id = blob_id
        self.compressed_size = compressed_size
        self.uncompressed_size = uncompressed_size
        self.entry = entry
        self.pins: Mapping[int, ChunkPin] = pins if pins is not None else {}
        self._table = table_digest
        self._digests: Mapping[int, bytes] | None = None

    @property
    def table_digest(self) -> bytes:
        """table_digest(entry, pins), made on first use: a cold mount needs it only for
        the map file it writes after the mount's checks (~10 ms for 27,000 chunks)."""
        if not self._table:
            self._table = table_digest(self.entry, self.pins)
        return self._table

    @property
    def digests(self) -> Mapping[int, bytes] | None:
        """{CI index: digest} from the bootstrap's chunk table (None: it pins nothing); of
        a PinTable a view (a cold mount whose pins are its chunk map never looks)."""
        if self._digests is None and self.pins:
            self._digests = self.pins.digests() if isinstance(self.pins, PinTable) else \
                {k: p.digest for k, p in self.pins.items()}
        return self._digests


_TABLE_TAG = b"fscache-daemon chunk table v1\0"


def table_digest(entry, pins: Mapping[int, ChunkPin]) -> bytes:
    """sha256 of what one bootstrap says about one blob: its blob-table entry and its
    chunk pins in index order. A chunk map records the digest of the table it was made
    for (blobcache.load_or_fetch_meta)."""
    h = hashlib.sha256(_TABLE_TAG)
    h.update(entry.encode() if entry is not None else b"")
    if isinstance(pins, PinTable):      # the same text, made by the C core
        h.update(pins.table_text())
        return h.digest()
    # the same bytes as one update per pin, hashed in one call (a cold mount's pins)
    h.update(b"".join(b"%d:%d:%d:%d:%d:" % (k, p.uncompressed_offset, p.uncompressed_size,
                                            p.compressed_offset, p.compressed_size)
                      + p.digest for k, p in sorted(pins.items())))
    return h.digest()


def _pins(img, path: str) -> list[PinTable]:
    try:
        return chunk_pin_tables(img)
    except CorruptImageError as e:
        # the reader names the image by its path already
        raise StorageError(str(e)) from None


@dataclass
class ImageInfo:
    path: str
    blobs: list = field(default_factory=list)
    # [(blob index, uncompressed offset, length)] of the prefetch list's file data
    prefetch: list = field(default_factory=list)


MAX_PREFETCH_INODES = 1 << 16


def _prefetch_ranges(img, nblobs: int, pins: list | None = None) -> list:
    """(blob index, uncompressed offset, length) of the data of the prefetch-table files,
    merged where they touch, in table order.

    An image `erofs-tools optimize` wrote keeps what its trace saw in a prefetch blob
    (every chunk of it belongs to a prefetch-table file; `pins`, the chunk-info table,
    tells) and the rest of a partly read file (most of a big shared library) where it
    was: of a file with chunks in such a blob only those are listed, the region the
    trace saw; the rest is read on demand. Files of other images are listed whole."""
    files: list[list[tuple[int, int, int]]] = []
    # Each inode once, each run once: a table of 65,536 times one nid whose file is
    # 16,384 chunks of one deduplicated chunk (a bootstrap of ~400 KB) made 2^30 runs,
    # tens of GB at mount, killing the daemon; a file's or files' repeated chunk is one
    # range to fetch, not one per occurrence
    for nid in dict.fromkeys(img.prefetch[:MAX_PREFETCH_INODES]):
        try:
            ino = img.inode(nid)
            if not ino.is_reg():
                continue
            files.append(list(dict.fromkeys(
                (device - 1, phys, length) for _fo, length, device, phys in img.map_data(ino)
                if device is not None and 1 <= device <= nblobs)))
        except ErofsToolsError as e:
            log.warning("%s: prefetch entry nid %d unusable: %s", img.name, nid, e)
    only = _prefetch_blobs(files, pins or [])
    out: list[tuple[int, int, int]] = []
    seen: set[tuple[int, int, int]] = set()     # a run another file listed already
    for runs in files:
        if any(b in only for b, _, _ in runs):
            runs = [r for r in runs if r[0] in only]
        for b, phys, length in runs:
            if (b, phys, length) in seen:
                continue
            seen.add((b, phys, length))
            if out and out[-1][0] == b and out[-1][1] + out[-1][2] == phys:
                out[-1] = (b, out[-1][1], out[-1][2] + length)
            else:
                out.append((b, phys, length))
    return out


def _prefetch_blobs(files: list[list[tuple[int, int, int]]], pins: list) -> set[int]:
    """Blobs every chunk of which (by the chunk-info table) is data of a prefetch-table
    file, when the table's files also have data in other blobs: an optimized image's
    prefetch blobs."""
    spans: dict[int, list[tuple[int, int]]] = {}
    for runs in files:
        for b, phys, length in runs:
            spans.setdefault(b, []).append((phys, phys + length))
    if len(spans) < 2:
        return set()
    only = set()
    for b, ranges in spans.items():
        if b >= len(pins) or not pins[b]:
            continue
        ranges.sort()
        starts = [r[0] for r in ranges]

        def covered(off: int, ranges=ranges, starts=starts) -> bool:
            i = bisect.bisect_right(starts, off) - 1
            return i >= 0 and ranges[i][0] <= off < ranges[i][1]
        table = pins[b]
        offsets = table.uncompressed_offsets() if isinstance(table, PinTable) else \
            (p.uncompressed_offset for p in table.values())
        if all(map(covered, offsets)):
            only.add(b)
    return only if len(only) < len(spans) else set()


def _read_image(path: str) -> ImageInfo:
    img = open_image(path)
    try:
        if not img.is_rafs:
            raise StorageError(f"{path}: not a RAFS v6 bootstrap")
        n = len(img.devices)
        if len(img.blob_entries) != n:
            raise StorageError(f"{path}: blob table holds {len(img.blob_entries)} blobs, "
                               f"device table {n}")
        blobs = []
        pins = _pins(img, path)
        for i, e in enumerate(img.blob_entries):
            blob_id = img.blob_id(i + 1)
            if len(blob_id) != 64 or any(c not in "0123456789abcdef" for c in blob_id):
                raise StorageError(f"{path}: blob {i} has an invalid id")
            if e.uncompressed_size != img.devices[i].blocks * 4096:
                raise StorageError(f"{path}: blob {i} size does not match its device slot")
            blobs.append(BlobRef(i, blob_id, e.compressed_size, e.uncompressed_size, e,
                                 pins[i]))
        return ImageInfo(path, blobs, _prefetch_ranges(img, n, pins))
    finally:
        img.close()


def load_image(path: str) -> ImageInfo:
    """Blobs (device order) and prefetch ranges of the bootstrap at `path`."""
    try:
        info = _read_image(path)
    except StorageError:
        raise
    except ErofsToolsError as e:
        raise StorageError(f"cannot use bootstrap: {e}") from None
    except OSError as e:
        raise StorageError(f"{path}: cannot read bootstrap: {e.strerror}") from None
    if not info.blobs:
        raise StorageError(f"{path}: bootstrap names no data blobs (not a RAFS v6 image?)")
    return info


# Files a program's start rarely reads, by name: readahead windows leave them out (a
# reader of one still gets it: its own requests, and the rest of the file it is in).
# Sources and headers beside the compiled code and type stubs; on the ML cold start they
# were 45 % of the chunks the windows fetched, and 12 of their 2,400 chunks were read.
COLD_SUFFIXES = (b".pyi", b".h", b".hpp", b".hxx", b".cuh", b".c", b".cc", b".cpp", b".cxx",
                 b".cmake", b".pxd", b".pyx")


def _cold_files(paths: list[bytes]) -> bytearray:
    """1 per path of a file a start rarely reads: COLD_SUFFIXES, and X.py files whose
    directory has __pycache__/X.<tag>.pyc (Python reads the compiled file, the source
    only when that is stale)."""
    flags = bytearray(len(paths))
    py: dict[tuple[bytes, bytes], int] = {}   # (dir, stem) -> file number of X.py
    pyc: set[tuple[bytes, bytes]] = set()     # (dir, stem) with __pycache__/stem.*.pyc
    for i, p in enumerate(paths):
        if p.endswith(COLD_SUFFIXES):
            flags[i] = 1
        elif p.endswith(b".py"):
            d, _, base = p.rpartition(b"/")
            py[(d, base[:-3])] = i
        elif p.endswith(b".pyc"):
            d, _, base = p.rpartition(b"/")
            if d.endswith(b"/__pycache__"):
                pyc.add((d[:-12], base.split(b".", 1)[0]))
    for key, i in py.items():
        if key in pyc:
            flags[i] = 1
    return flags


def is_module(path: bytes) -> bool:
    """Whether the file at image path `path` is a Python module (compiled or source),
    whose chunks readahead fetches with their neighbours (fscache_daemon.readahead):
    the one place this is decided."""
    return path.endswith(MODULE_SUFFIXES)


MODULE_SUFFIXES = (b".pyc", b".py")


def file_runs(path: str, max_inodes: int = 1 << 22, *,
              cold: dict[int, list[tuple[int, int]]] | None = None,
              modules: dict[int, list[tuple[int, int]]] | None = None,
              pause_every: int = 0) -> dict[int, list[tuple[int, int]]]:
    """{blob index: [(start, end)]}: the uncompressed ranges where a regular file's data
    is contiguous in a blob (a whole file, or a piece between deduplicated chunks that
    live elsewhere). Used for file-aware readahead: a miss at the start of a run can
    fetch the rest of it. Unreadable entries are skipped. With `cold` (a dict), the runs
    of files a start rarely reads (COLD_SUFFIXES, compiled Python sources) also go there,
    by blob index; with `modules` (a dict), the runs of Python modules (is_module), whose
    neighbours readahead fetches. The walk (walk_file_runs) is the C core's (reader.runs,
    the GIL released); `pause_every` applies to the reader's walk it falls back to. The
    rest (group_file_runs) is Python."""
    paths, found = walk_file_runs(path, max_inodes, pause_every)()
    return group_file_runs(paths, found, cold=cold, modules=modules)


def walk_file_runs(path: str, max_inodes: int = 1 << 22, pause_every: int = 0
                   ) -> Callable[[], Runs]:
    """file_runs' walk alone (reader.runs.data_runs_later): a function giving its (paths,
    runs). The daemon walks beside a mount (the GIL released, on the other CPU) and makes
    the lists and the groups after the mount: their ~35 ms of Python for 28,000 files
    took the GIL from the mount's thread at each of its system calls."""
    img = open_image(path)
    try:
        return data_runs_later(img, max_inodes, pause_every)
    finally:
        img.close()


def group_file_runs(paths: list[bytes], found: list[tuple[int, int, int, int]], *,
                    cold: dict[int, list[tuple[int, int]]] | None = None,
                    modules: dict[int, list[tuple[int, int]]] | None = None
                    ) -> dict[int, list[tuple[int, int]]]:
    """file_runs from walk_file_runs' (paths, runs); `cold` and `modules` as there."""
    runs: dict[int, list[tuple[int, int]]] = {}
    # per file: is_module, and (with `cold`) a file a start rarely reads
    mod = [is_module(p) for p in paths] if modules is not None else None
    cold_files = _cold_files(paths) if cold is not None else None
    for f, b, start, end in found:
        r = (start, end)
        lst = runs.get(b)
        if lst is None:
            lst = runs[b] = []
        lst.append(r)
        if modules is not None and mod is not None and mod[f]:
            modules.setdefault(b, []).append(r)
        if cold is not None and cold_files is not None and cold_files[f]:
            cold.setdefault(b, []).append(r)
    return runs


def chunk_owners(path: str, wanted: dict[int, set[int]], max_inodes: int = 1 << 22
                 ) -> dict[tuple[int, int], list[tuple[str, int, int]]]:
    """{(blob index, uncompressed offset): [(path, nid, file offset)]} for the chunks of
    `wanted` ({blob index: {uncompressed offsets of chunk starts}}): which regular files
    hold them (several for a deduplicated chunk), for access traces (fscache_daemon.trace).
    Paths are absolute image paths, decoded with os.fsdecode. Unreadable entries are
    skipped."""
    out: dict[tuple[int, int], list[tuple[str, int, int]]] = {}
    if not any(wanted.values()):
        return out
    sorted_starts = {b: sorted(s) for b, s in wanted.items()}
    img = open_image(path)
    try:
        seen: set[int] = set()
        for p, _d, ino in img.walk(on_error=lambda _p, _e: None):
            if len(seen) >= max_inodes:
                break
            if not ino.is_reg() or ino.nid in seen:
                continue
            seen.add(ino.nid)
            name = os.fsdecode(p)
            try:
                for fo, length, device, phys in img.map_data(ino):
                    starts = sorted_starts.get(device - 1) if device else None
                    if not starts:
                        continue
                    # an extent may span several chunks: every wanted start inside it
                    i = bisect.bisect_left(starts, phys)
                    while i < len(starts) and starts[i] < phys + length:
                        out.setdefault((device - 1, starts[i]), []).append(
                            (name, ino.nid, fo + starts[i] - phys))
                        i += 1
            except ErofsToolsError:
                continue
    finally:
        img.close()
    return out
