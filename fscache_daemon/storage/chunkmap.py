"""Chunk maps and the bootstraps they may serve.

A chunk map (`erofs_tools.reader.blob.BlobMeta`) says where every chunk of a blob lies,
compressed and uncompressed, and the digest its bytes must have. It is read from the
blob's chunk-info table through a backend and cached as `<id>.map` beside the cache
file: a header (magic, sha256 of the bootstrap chunk table it was made for) then
`BlobMeta.to_bytes()`.

A blob id is public, so a bootstrap may name another image's blob and bring a backend
with other bytes under that id. A map therefore serves a bootstrap only if it agrees
with every chunk the bootstrap's chunk-info table pins, place and digest
(`pin_mismatch`); when a map is made, the bootstrap's digests replace the blob's own
(its `blob.digest` section is whatever its backend served). See blobcache for what
happens to the cache file when the map changes.

Cache key: the stem of a blob's files. It is the blob id for the first chunk table the
cache serves, and `<blob id>@<table digest prefix>` (`variant_key`) for a bootstrap whose
chunk table disagrees with the one already cached or in use under the plain id: two
images naming one blob id with different tables then each get their own cache file and
map, and are both served (neither is refused, neither sees the other's bytes).
"""

from __future__ import annotations

import _thread
import contextlib
import functools
import hashlib
import logging
import os
import struct
import threading
from collections.abc import Callable

from erofs_tools.errors import CorruptImageError, ErofsToolsError
from erofs_tools.format import rafs
from erofs_tools.fsutil import atomic_write_bytes
from erofs_tools.reader import blob as rblob
from erofs_tools.reader import zran as rzran
from erofs_tools.reader.bootstrap import PinTable

from . import StorageError

log = logging.getLogger(__name__)

MAP_MAGIC = b"FSCDMAP2"
MAP_HEADER = struct.Struct("<8s32s24x")     # magic, sha256 of the bootstrap chunk table
assert MAP_HEADER.size == 64


# hex digits of the chunk-table digest in a variant's cache key: 64 bits, so that a table
# crafted to collide with another's needs ~2^64 work; a collision is refused, not served
VARIANT_HEX = 16

# a context manager factory telling whether a file is still wanted, and keeping it so
# while it is written (PendingCheck.write)
Hold = Callable[[], contextlib.AbstractContextManager[bool]]


def variant_key(blob_id: str, table: bytes) -> str:
    """The cache key of blob `blob_id` served for a bootstrap whose chunk table has the
    digest `table` (storage.image.table_digest), apart from the blob's plain cache."""
    return f"{blob_id}@{table.hex()[:VARIANT_HEX]}"


def key_blob_id(key: str) -> str:
    """The blob id a cache key is for."""
    return key.split("@", 1)[0]


def key_variant(key: str) -> str | None:
    """The table digest prefix of a variant's cache key; None for a blob's plain cache."""
    return key.split("@", 1)[1] if "@" in key else None


def map_path(directory: str, key: str) -> str:
    return os.path.join(directory, key + ".map")


def _place(meta, c, pin=None) -> tuple:
    """Where chunk `c` (or a pin) lies, as far as a pin can say: for zran blobs only the
    uncompressed place (the chunk map's compressed range is the chunk's access-point
    span, the chunk table's the chunk's own part of the layer)."""
    vals = pin[:4] if pin is not None else (c.uncompressed_offset, c.uncompressed_size,
                                            c.compressed_offset, c.compressed_size)
    return tuple(vals[:2]) if meta.zran is not None else tuple(vals)


def pin_mismatch(meta, uncompressed_size, pins) -> str | None:
    """Why `meta` cannot serve a bootstrap whose blob entry says `uncompressed_size` and
    whose chunk table pins `pins` ({CI index: ChunkPin}); None if it can."""
    if uncompressed_size is not None and meta.uncompressed_size != uncompressed_size:
        return (f"chunk map is {meta.uncompressed_size} bytes uncompressed, the bootstrap "
                f"says {uncompressed_size}")
    for k, p in (pins or {}).items():
        try:
            c = meta.chunk_by_index(k)
        except CorruptImageError:
            return f"the chunk map has no chunk {k}"
        if _place(meta, c) != _place(meta, c, p):
            return f"chunk {k} lies elsewhere in the chunk map"
        if c.digest != p.digest:
            return f"chunk {k} has another digest in the chunk map"
    return None


def _apply_pins(meta, pins, blob_id: str):
    """`meta` with the bootstrap's digests; StorageError if the blob's chunk-info table
    places a pinned chunk elsewhere than the bootstrap does."""
    if not pins:
        return meta
    # one pass over tens of thousands of chunks at every cold mount: plain tuple slices
    # (BlobChunk fields 1..4 and ChunkPin fields 0..3 are the same four places)
    width = 2 if meta.zran is not None else 4
    changed = False
    for k, p in pins.items():
        try:
            c = meta.chunk_by_index(k)
        except CorruptImageError:
            raise StorageError(f"blob {blob_id[:12]}: the bootstrap pins chunk {k}, the "
                               "blob has no such chunk") from None
        if c[1:1 + width] != p[:width]:
            raise StorageError(f"blob {blob_id[:12]}: chunk {k} lies elsewhere in the blob "
                               "than the bootstrap's chunk table says")
        changed = changed or c.digest != p.digest
    # a blob whose own digest section agrees with the bootstrap needs no copy
    return meta.with_digests({k: p.digest for k, p in pins.items()}) if changed else meta


def _read_map(path: str, blob_id: str):
    """(table digest, meta) from a chunk-map file, or None if absent or unusable."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    if len(data) < MAP_HEADER.size or data[:8] != MAP_MAGIC:
        log.warning("%s: chunk map in an older or unknown format; refetching", path)
        return None
    _magic, table = MAP_HEADER.unpack_from(data, 0)
    try:
        meta = rblob.BlobMeta.from_bytes(data[MAP_HEADER.size:])
    except ErofsToolsError as e:
        log.warning("%s: unusable cached chunk map (%s); refetching", path, e)
        return None
    if meta.blob_id != blob_id:
        log.warning("%s: chunk map is for blob %s; refetching", path, meta.blob_id)
        return None
    return table, meta


def _meta_from_pins(blob_id: str, entry, blob_size: int, pins) -> rblob.BlobMeta | None:
    """The chunk map as the bootstrap alone gives it, when its chunk-info table pins
    every chunk of the blob (what `erofs-tools pack` writes): places, sizes, flags and
    digests are all there, so a cold mount needs no round trip for the blob's own table
    and no parse of it. The blob's table could only agree with these pins (_apply_pins
    refuses any other), and every chunk fetched is still verified against its pinned
    digest. None when the pins do not cover the blob or it needs its own table (zran,
    unknown algorithms or features)."""
    n = getattr(entry, "chunk_count", 0)
    if entry is None or not pins or len(pins) != n or rzran.is_zran_entry(entry):
        return None
    if entry.features & rafs.BLOB_FEATURES_UNSUPPORTED:
        return None
    compressor = rafs.COMPRESSOR_NAMES.get(entry.compression_algo)
    digester = rafs.DIGESTER_NAMES.get(entry.digest_algo)
    if compressor is None or digester is None:
        return None
    if isinstance(pins, PinTable):
        # the C core checks and orders the chunks as BlobMeta and the loop below do
        made = pins.chunk_map(n, entry.uncompressed_size, blob_size, entry.chunk_size,
                              compressor == "none")
        if made is not None:
            try:
                return rblob.BlobMeta(blob_id, made[1], entry.uncompressed_size, blob_size,
                                      compressor, digester, entry.chunk_size,
                                      entry.features, checked=made[0], count=n)
            except CorruptImageError:
                pass        # the Python path below names the problem
    if any(k < 0 or k >= n or p.compressed is None for k, p in pins.items()):
        return None
    chunks = [rblob.BlobChunk(k, p.uncompressed_offset, p.uncompressed_size,
                              p.compressed_offset, p.compressed_size, p.digest, p.compressed)
              for k, p in pins.items()]
    try:
        meta = rblob.BlobMeta(blob_id, chunks, entry.uncompressed_size, blob_size,
                              compressor, digester, entry.chunk_size, entry.features)
    except CorruptImageError as e:
        log.info("blob %s: bootstrap chunk table unusable as a chunk map (%s); reading "
                 "the blob's own", blob_id[:12], e)
        return None
    by_c = sorted(chunks, key=lambda c: c.compressed_offset)
    if any(a.compressed_offset + a.compressed_size > b.compressed_offset
           for a, b in zip(by_c, by_c[1:])):
        return None
    return meta


class PendingCheck:
    """A blob's last-byte check (_fetch_meta) on a thread of its own. `wait()` waits for
    it and raises what it raised; `write()` then makes the map file (its table digest,
    its write: ~5-20 ms of CPU for 27,000 chunks), never for a blob that failed the
    check. The daemon writes it after the mount (its after-mount thread): on the check's
    thread it took the GIL from the mount's in the middle of the mount; one not written
    (the mount failed, a crash) is made again by the next mount."""

    def __init__(self, check: Callable[[], None], then: Callable[[Hold | None], None]):
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._then: Callable[[Hold | None], None] | None = then
        # not threading.Thread, whose start() waits for the new thread to run (a few ms
        # of a mount when the GIL is busy)
        _thread.start_new_thread(self._run, (check,))

    def _run(self, check: Callable[[], None]) -> None:
        try:
            check()
        except BaseException as e:  # noqa: BLE001 - raised again by wait()
            self._error = e
        finally:
            self._done.set()

    def wait(self) -> None:
        self._done.wait()
        if self._error is not None:
            raise self._error

    def write(self, hold: Hold | None = None) -> None:
        """The map file, once (after a successful wait()). `hold`: a context manager
        (made afresh by calling it) that tells whether the map is still wanted and keeps
        it so while the file is written (the daemon: its blob still open, under the lock
        eviction takes: a blob released and evicted meanwhile gets no stray map file)."""
        then, self._then = self._then, None
        if then is None or not self._done.is_set() or self._error is not None:
            return
        try:
            then(hold)
        except (OSError, ErofsToolsError) as e:
            log.warning("chunk map not cached: %s", e)

    def writer(self, hold: Hold) -> Callable[[], None]:
        """write(hold) as a function of no arguments (BlobManager.after_mount)."""
        return functools.partial(self.write, hold)


def _meta_from_table(blob_id: str, pins, made: list, ci: bytes, n: int, v2: bool,
                     digests: bytes | None, data_end: int, head: tuple):
    """BlobMeta.from_blob's `fast`: the chunk map of a blob's own CI table with the
    bootstrap's pins applied, made in the C core (csrc/chunkmap.c: the table decoded,
    the pins checked against it and their digests taken, BlobMeta's checks): an
    optimized image's original blobs, ~45,000 chunks that the pins do not cover, cost
    ~0.3 s of Python per mount. None (the Python path then names the problem) for
    anything it does not take."""
    if pins is not None and not isinstance(pins, PinTable):
        return None
    usize, blob_size, compressor, digester, chunk_size, features, region = head
    table = PinTable.of_blob_table(bytes(ci), n, v2,
                                   None if digests is None else bytes(digests), pins)
    got = table.chunk_map(n, usize, data_end, chunk_size, compressor == "none") \
        if table is not None and n else None
    if got is None:
        return None
    try:
        meta = rblob.BlobMeta(blob_id, got[1], usize, blob_size, compressor, digester,
                              chunk_size, features, region, checked=got[0], count=n)
    except CorruptImageError:
        return None
    made.append(True)
    return meta


def last_byte_check(backend, blob_id: str, end: int) -> None:
    """The check of a blob whose map the pins made: its last stored byte (`end` - 1),
    read as data is (a registry: a range GET, which proxies and mirrors serve as they
    serve the rest) instead of the table's reads: a blob missing or cut short still
    fails the mount, not later reads."""
    if end and len(backend.reader(blob_id)(end - 1, 1)) != 1:
        raise StorageError(f"blob {blob_id[:12]} is shorter than the {end} bytes the "
                           "bootstrap says")


def _fetch_meta(blob_id: str, backend, entry, blob_size, digests, pins,
                checks: list | None = None, early: Callable | None = None,
                warm: Callable | None = None):
    """The chunk map read from the blob through `backend`, with the bootstrap's pins
    applied (or made from the pins alone when they cover the blob: _meta_from_pins).
    Returns (meta, backend bytes read). With `checks` (a list), the check of a map made
    from pins is put there (a function) instead of run. `early(end)`: a function waiting
    for that check already under way (fscache_daemon.blobopen.py), or None. `warm(entry)`:
    a zran blob's (meta, bytes read) as fetch_zran_meta gave it through this backend
    before the mount asked (fscache_daemon.zranwarm), or None."""
    if blob_size is None and entry is not None and entry.compressed_size:
        blob_size = entry.compressed_size
    if blob_size is not None:
        meta = _meta_from_pins(blob_id, entry, blob_size, pins)
        if meta is not None:
            end = entry.compressed_size
            check = (early(end) if early is not None else None) or \
                functools.partial(last_byte_check, backend, blob_id, end)
            if checks is None:
                check()
            else:
                checks.append(check)
            return meta, 1 if end else 0
    fetched = 0
    read = backend.reader(blob_id)

    def counting_read(offset, length):
        nonlocal fetched
        b = read(offset, length)
        fetched += len(b)
        return b

    if blob_size is None:
        blob_size = getattr(entry, "compressed_size", None) or backend.blob_size(blob_id)
    made: list = []
    if rzran.is_zran_entry(entry):
        got = warm(entry) if warm is not None else None
        meta, fetched = got if got is not None else \
            fetch_zran_meta(blob_id, backend, entry, digests)
    else:
        meta = rblob.BlobMeta.from_blob(counting_read, blob_size, blob_id=blob_id,
                                        entry=entry, digests=digests,
                                        fast=functools.partial(_meta_from_table, blob_id,
                                                               pins, made))
    if made:
        return meta, fetched    # pins applied and digests checked in the C core
    meta = _apply_pins(meta, pins, blob_id)
    if any(c.digest is None for c in meta.chunks):
        raise StorageError(f"blob {blob_id}: chunks without digests cannot be verified")
    return meta, fetched


def fetch_zran_meta(blob_id: str, backend, entry, digests):
    """A zran blob's chunk map: its meta blob (named by the blob table's
    blob_meta_digest) fetched through the backend, checked against that digest and
    parsed (erofs_tools.reader.zran). -> (meta, bytes read). With `digests` None the
    meta blob's own chunk digests must cover every chunk (the map then is the same
    whatever the bootstrap's digests are: the pins replace them afterwards)."""
    meta_hex = bytes(entry.blob_meta_digest).hex()
    size = entry.blob_meta_size
    if not 0 < size <= rzran.MAX_META_BLOB:
        raise StorageError(f"blob {blob_id[:12]}: zran meta blob size {size}")
    backend.register_blob(meta_hex, size)
    data = backend.reader(meta_hex)(0, size)
    if len(data) != size or hashlib.sha256(data).hexdigest() != meta_hex:
        raise StorageError(f"blob {blob_id[:12]}: zran meta blob {meta_hex[:12]} does not "
                           "match its digest")
    return rzran.parse_meta(data, entry, blob_id, digests), len(data)


def load_or_fetch_meta(directory, blob_id, backend, entry=None, blob_size=None,
                       digests=None, pins=None, table: bytes | Callable[[], bytes] = b"", *,
                       key: str | None = None, rebuild: bool = True,
                       pending: list[PendingCheck] | None = None,
                       early: Callable | None = None, warm: Callable | None = None):
    """The blob's chunk map for one bootstrap: from `<id>.map` if present, valid and in
    agreement with the bootstrap, else read from the blob through the backend (its CI
    table), with the bootstrap's pins applied, and cached. Returns (meta, backend bytes
    read).

    `pins` ({CI index: ChunkPin}, storage.image) and `table` (their table_digest, or a
    function giving it: only a map written needs it) come
    from the bootstrap being mounted; None means a caller without a bootstrap (tools,
    tests), which takes any valid map of the blob. A bootstrap that pins no chunk of the
    blob only reuses a map equal to the one its own backend gives.

    `key` names the files (default: the blob id). With `rebuild=False` a cached map that
    does not fit is left alone (another table's cache stays usable) and None is
    returned. With `pending` (a list), a map made from the pins is returned before the
    blob's check ends: a PendingCheck goes there (run on a thread of its own), whose
    wait() the caller must call before the blob is used (it raises a failed check), and
    whose write() makes the map file when the caller chooses. `early`: see
    _fetch_meta."""
    path = map_path(directory, key or blob_id)
    usize = getattr(entry, "uncompressed_size", None)
    if rzran.is_zran_entry(entry):
        # the map of a zran blob holds its access points: parsed from the meta blob
        # (small, digest-checked) at every open instead of a `.map` file
        return _fetch_meta(blob_id, backend, entry, blob_size, digests, pins, warm=warm)
    cached = _read_map(path, blob_id)
    if cached is not None:
        _table, meta = cached
        if pins is None:
            return meta, 0
        why = pin_mismatch(meta, usize, pins)
        # a bootstrap pinning nothing trusts its own backend: compare with what that
        # gives (the table digest alone would not do: a blob entry is easy to copy)
        if why is None and not pins:
            fresh, fetched = _fetch_meta(blob_id, backend, entry, blob_size, digests, pins)
            if fresh.to_bytes() == meta.to_bytes():
                return meta, fetched
            why = "the bootstrap pins no chunk and its backend gives another chunk map"
        if why is None:
            return meta, 0
        if not rebuild:
            log.info("%s: made for another chunk table (%s); not this bootstrap's", path, why)
            return None
        log.warning("%s: cached chunk map does not fit this bootstrap (%s); rebuilding it",
                    path, why)
    checks: list | None = [] if pending is not None else None
    meta, fetched = _fetch_meta(blob_id, backend, entry, blob_size, digests, pins, checks,
                                early)

    def write(hold: Hold | None = None) -> None:
        header = MAP_HEADER.pack(MAP_MAGIC, (table() if callable(table) else table) or
                                 bytes(32))
        data = header + meta.to_bytes()     # before `hold`: its lock is for the write
        # a map the bootstrap's pins fix whole is made again, the same, if a crash loses
        # it (and a torn one fails its checks): no fsync (two per cold mount)
        whole = pins is not None and len(pins) == meta.chunk_count > 0
        with hold() if hold is not None else contextlib.nullcontext(True) as wanted:
            if not wanted:
                log.debug("%s: not written: the blob was released meanwhile", path)
                return
            os.makedirs(directory, exist_ok=True)
            atomic_write_bytes(path, data, mode=0o600, fsync=not whole)
    if checks and pending is not None:
        pending.append(PendingCheck(checks[0], write))
    else:
        write()
    return meta, fetched


def share_mismatch(meta, blob_id: str, backend, entry=None, blob_size=None, digests=None,
                   pins=None) -> str | None:
    """Why a blob open with chunk map `meta` (in use by mounted images, so its cache file
    cannot change) may not also serve a bootstrap with this blob entry and these pins;
    None if it may. One cache file cannot hold two different bytes at one offset: a
    disagreeing bootstrap needs a cache of its own (variant_key)."""
    why = pin_mismatch(meta, getattr(entry, "uncompressed_size", None), pins)
    if why is None and pins is not None and not pins:
        fresh, _ = _fetch_meta(blob_id, backend, entry, blob_size, digests, pins)
        if fresh.to_bytes() != meta.to_bytes():
            why = "the bootstrap pins no chunk and its backend gives another chunk map"
    return why


def check_shareable(meta, blob_id: str, backend, entry=None, blob_size=None, digests=None,
                    pins=None) -> None:
    """Raise StorageError unless `meta`'s cache may serve this bootstrap (share_mismatch)."""
    why = share_mismatch(meta, blob_id, backend, entry, blob_size, digests, pins)
    if why is not None:
        raise StorageError(f"blob {blob_id[:12]} is in use by an image whose chunk table "
                           f"differs from this bootstrap's ({why}); not sharing its cache")
