"""Fixed-size chunking with a parallel hash + compress pipeline.

Files are cut into fixed `chunk_size` pieces (the last one short). Chunks are read,
hashed and compressed by a thread pool (a batch's reads and zstd frames one C call
each without the GIL; blake3 and hashlib release it for inputs of 2 KiB and more) while
the caller's thread consumes the results strictly in submission order, so the output is
reproducible whatever the scheduling. At most `window` batches are in flight,
which bounds memory to a few chunks per worker whatever the file sizes.

Deduplication is by (digest, uncompressed size). The first task to meet a new key
"claims" it and compresses the data; every later occurrence (even one consumed earlier in
order) waits for that claim instead of compressing again. Keys already known (from a
chunk dict, or stored earlier) are never compressed. Without compression there is nothing
to share: no claims, each result carries its own bytes (ChunkResult.data).

Holes of sparse files are never read: chunks entirely inside a hole (found with
SEEK_DATA/SEEK_HOLE) are synthesized as zero chunks whose digest is computed once per size.
"""
from __future__ import annotations

import array
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

import blake3

from erofs_tools._native_chunkio import (
    ChunkReadError,
    batch_buffer,
    batch_buffers_kept,
    read_chunks,
    zstd_chunks,
)
from erofs_tools.builder.tree import shown_path
from erofs_tools.builder.workpool import Task, WorkPool
from erofs_tools.errors import InputError
from erofs_tools.format import rafs as R

if TYPE_CHECKING:
    from types import ModuleType

    from typing_extensions import Buffer

DIGESTERS = ("blake3", "sha256")
COMPRESSORS = ("zstd", "lz4_block", "none")
ZSTD_LEVEL = 3

# Batches group small chunks so that per-task overhead stays small for trees of many
# small files; a batch is closed at this many bytes (without compression: holds at
# most this many, or one bigger chunk) or chunks.
BATCH_BYTES = 1 << 20
BATCH_CHUNKS = 256

Digest = Callable[[bytes | memoryview], bytes]
ChunkKey = tuple[bytes, int]                     # (digest, uncompressed size)
FileItem = tuple[int, str | bytes, int, bool]    # (file_key, path, size, sparse)
_FileChunk = tuple[int, str | bytes, int, bool, int, int]   # FileItem + (offset, length)
StreamItem = tuple[int, int, bytes | None, int, int]   # (file_key, offset, data, length,
                                                       #  repeat)
_Batch = TypeVar("_Batch")

def _debug(msg: str, *args: object) -> None:  # only if logging is loaded (configured):
    if (lg := sys.modules.get("logging")) is not None:  # importing it: ~1.2 MiB, ~10 ms
        lg.getLogger(__name__).debug(msg, *args)


def _zstandard() -> ModuleType:
    """python-zstandard, imported when first needed (pack --compressor none never
    loads it: ~1 MiB of pack's RSS)."""
    import zstandard
    return zstandard


def _sha256() -> Callable[..., Any]:
    """hashlib.sha256, imported when first needed: with blake3 chunk digests (the
    default) pack never maps libcrypto (~3.5 MiB of its RSS; the blob id is the C
    core's sha256)."""
    import hashlib
    return hashlib.sha256


def _multi_compress() -> bool:
    """python-zstandard's C backend compresses many inputs in one call (its cffi one
    cannot)."""
    return getattr(_zstandard(), "backend", "") == "cext"


class _ZstdFns:
    """python-zstandard's bundled zstd as C function pointers (its cffi module's
    ZSTD_compress2 and ZSTD_isError) and one compression context per thread, for the C
    core's batch compressor (_native_chunkio.zstd_chunks): the same library, so the same
    frames, as its own calls; None of it when that module is missing or holds another
    zstd than the one python-zstandard uses."""

    def __init__(self, level: int) -> None:
        z = _zstandard()
        from zstandard import _cffi  # type: ignore[attr-defined]
        zl, zf = _cffi.lib, _cffi.ffi
        v = zl.ZSTD_versionNumber()
        if (v // 10000, v // 100 % 100, v % 100) != tuple(z.ZSTD_VERSION):
            raise ImportError("zstandard's cffi module bundles another zstd")
        self._lib, self._ffi = zl, zf
        self.level = level
        self.compress2 = int(zf.cast("uintptr_t", zf.addressof(zl, "ZSTD_compress2")))
        self.is_error = int(zf.cast("uintptr_t", zf.addressof(zl, "ZSTD_isError")))
        self._local = threading.local()

    def cctx(self) -> int:
        """This thread's context (its address), made once and freed with the thread.
        A static one, in a workspace of its own for any input at this level: a context
        of ZSTD_createCCtx gives its tables back after ~128 inputs that need far
        smaller ones (most chunks are small files) and maps them again for the next big
        one (~0.2 CPU s of a /usr/share pack in page faults, zeroing and munmap)."""
        addr: int | None = getattr(self._local, "addr", None)
        if addr is None:
            zl, zf = self._lib, self._ffi
            size = zl.ZSTD_estimateCStreamSize(self.level)
            ws = zf.new("char[]", size)
            c = zl.ZSTD_initStaticCCtx(ws, size)
            if c == zf.NULL:
                raise MemoryError("zstd: no compression context")
            # a static context starts with every parameter 0 (no content size in the
            # frame header, unlike ZSTD_createCCtx's and python-zstandard's): the
            # defaults first, then the level
            if zl.ZSTD_isError(zl.ZSTD_CCtx_reset(c, zl.ZSTD_reset_session_and_parameters)) \
                    or zl.ZSTD_isError(zl.ZSTD_CCtx_setParameter(
                        c, zl.ZSTD_c_compressionLevel, self.level)):
                raise InputError(f"zstd: cannot set level {self.level}")
            self._local.ws = ws         # the context lives in it: kept with it
            addr = self._local.addr = int(zf.cast("uintptr_t", c))
        return addr


def _zstd_fns(level: int) -> _ZstdFns | None:
    try:
        return _ZstdFns(level)
    except (ImportError, AttributeError) as e:
        _debug("zstd: no C core batches (python-zstandard's cffi module: %s)", e)
        return None


def digest_function(name: str) -> Digest:
    """-> callable(bytes-like) -> 32-byte digest."""
    if name == "blake3":
        # max_threads is not used: parallelism comes from hashing many chunks at once.
        return lambda data: blake3.blake3(data).digest()
    if name == "sha256":
        sha256 = _sha256()
        return lambda data: sha256(data).digest()
    raise InputError(f"unknown digester {name!r} (choose blake3 or sha256)")


def check_chunk_size(chunk_size: int) -> int:
    if (not isinstance(chunk_size, int) or chunk_size < R.CHUNK_SIZE_MIN
            or chunk_size > R.CHUNK_SIZE_MAX or chunk_size & (chunk_size - 1)):
        raise InputError(f"chunk size {chunk_size} is not a power of two between "
                         f"4096 and {R.CHUNK_SIZE_MAX}")
    return chunk_size


class Compressor:
    """Per-chunk compression; a chunk that does not shrink is stored raw."""

    def __init__(self, name: str, level: int = ZSTD_LEVEL) -> None:
        if name not in COMPRESSORS:
            raise InputError(f"unknown compressor {name!r} (choose zstd, lz4_block or none)")
        self.name = name
        self.level = level
        self._local = threading.local()
        self._z = _zstandard() if name == "zstd" else None
        self._multi = name == "zstd" and _multi_compress()
        self._fns = _zstd_fns(level) if name == "zstd" else None
        # compress_many's stored chunks are buffers of the C core's pool
        self.pooled = self._fns is not None
        if name == "zstd":      # the same frames each way, not the same speed: say which
            _debug("zstd batches: %s", self.batch_path())

    def batch_path(self) -> str:
        """Which way compress_many compresses zstd batches (each gives the same bytes)."""
        if self._fns is not None:
            return "C core (csrc/chunkzstd.c, python-zstandard's zstd)"
        if self._multi:
            return "python-zstandard multi_compress_to_buffer"
        return "python-zstandard, one call per chunk"

    def compress(self, data: bytes) -> bytes:
        """-> bytes to store (compressed, or the data itself when it does not shrink)."""
        if self.name == "none":
            return data
        if self.name == "lz4_block":
            # a raw LZ4 block, as Nydus stores lz4_block chunks (C core, csrc/coldpath.c)
            from erofs_tools import _native
            out4 = _native.lz4_block_compress(data)
            return data if out4 is None else out4
        c = getattr(self._local, "c", None)
        if c is None:
            assert self._z is not None
            c = self._local.c = self._z.ZstdCompressor(level=self.level)
        out = c.compress(data)
        return out if len(out) < len(data) else data

    def compress_batch(self, buf: bytearray | memoryview, pieces: Pieces
                       ) -> tuple[memoryview | None, Sequence[bytes | memoryview]]:
        """compress_many; -> (base, stored pieces): base is the one buffer in which the
        stored pieces lie back to back in order (the C core's zstd), so that a run of
        them can be written as one piece of it; None when they do not."""
        fns = self._fns
        if fns is None or not len(pieces.lengths):
            return None, self.compress_many(buf, pieces)
        stored, sizes = zstd_chunks(fns.compress2, fns.is_error, fns.cctx(), buf,
                                    pieces.off, pieces.lengths)
        views: list[bytes | memoryview] = []
        pos = 0
        for n in sizes:
            views.append(stored[pos:pos + n])
            pos += n
        return stored, views

    def compress_many(self, buf: bytearray | memoryview,
                      pieces: list[tuple[int, int]] | Pieces) -> list[bytes | memoryview]:
        """Stored forms of the pieces (offset, length) of `buf`, as `compress` gives them
        one by one. zstd: one call for them all, the GIL released once, not once per
        chunk: the C core's (_ZstdFns: python-zstandard's zstd, one context per thread
        for the whole pack; the stored chunks views of one buffer of the C core's pool,
        back in the pool once the writer has copied them), else python-zstandard's
        multi_compress_to_buffer (a new context per call); the same frames as
        `compress`. Only with "none" are they views of `buf`: otherwise the caller may
        reuse `buf` for the next batch. `pieces` as a Pieces: the caller's own arrays,
        taken as they are."""
        p = pieces if isinstance(pieces, Pieces) else Pieces.of(pieces)
        if self.name == "none":
            mv = memoryview(buf)
            return [mv[o:o + n] for o, n in zip(p.off, p.lengths)]
        fns = self._fns
        if fns is not None and len(p.lengths):
            return list(self.compress_batch(buf, p)[1])
        if self._multi and len(p.lengths):
            z = self._z
            assert z is not None
            c = getattr(self._local, "c", None)
            if c is None:
                c = self._local.c = z.ZstdCompressor(level=self.level)
            res = c.multi_compress_to_buffer(
                z.BufferWithSegments(buf, p.segments().tobytes()), threads=1)
            mv = memoryview(buf)
            out: list[bytes | memoryview] = []
            for i, (o, n) in enumerate(zip(p.off, p.lengths)):
                zc = res[i]
                # incompressible: the data, copied once from a view (a view kept would hold
                # the batch buffer until this chunk is written; bytes() of a slice: twice)
                out.append(memoryview(cast("Buffer", zc)) if len(zc) < n
                           else bytes(mv[o:o + n]))
            return out
        return [self.compress(bytes(buf[o:o + n])) for o, n in zip(p.off, p.lengths)]


class Pieces:
    """Pieces of a batch buffer as the C core takes them: offsets (array "Q") and
    lengths (array "I"), i-th piece lengths[i] bytes at off[i]."""
    __slots__ = ("lengths", "off")

    def __init__(self, off: array.array[int], lengths: array.array[int]) -> None:
        if off.typecode != "Q" or lengths.typecode != "I" or len(off) != len(lengths):
            raise ValueError("Pieces: offsets 'Q' and lengths 'I', as many of each")
        self.off = off
        self.lengths = lengths

    @classmethod
    def of(cls, pieces: Sequence[tuple[int, int]]) -> Pieces:
        """From (offset, length) pairs, transposed in one call (for 256 pieces ~15 %
        less time than an append per piece into each array)."""
        if not pieces:
            return cls(array.array("Q"), array.array("I"))
        off, lengths = zip(*pieces)
        return cls(array.array("Q", off), array.array("I", lengths))

    def segments(self) -> array.array[int]:
        """offset, length, offset, length, ... (python-zstandard's BufferWithSegments)."""
        segs = array.array("Q", bytes(16 * len(self.off)))
        segs[0::2] = self.off
        segs[1::2] = array.array("Q", self.lengths)
        return segs


class _Claim:
    """The stored bytes of one distinct chunk, filled in by the batch that claimed it.

    No per-claim synchronisation: the consumer that needs the bytes before the owning
    batch was consumed waits for that batch's future (ChunkPipeline._wait_batch).
    """
    __slots__ = ("data", "seq", "taken", "base", "off")

    def __init__(self, seq: int) -> None:
        self.data: bytes | memoryview | None = None
        self.seq = seq
        self.taken = False
        # `data` is base[off:off + len(data)] (Compressor.compress_batch), or base None
        self.base: memoryview | None = None
        self.off = 0


class ChunkResult:
    """One chunk of one file, in file order; `repeat` > 1: that many identical chunks
    in a row (a run of hole chunks of a tar entry), one object however long."""
    __slots__ = ("file_key", "file_offset", "size", "digest", "claim", "pipe", "repeat",
                 "data")

    def __init__(self, file_key: int, file_offset: int, size: int, digest: bytes,
                 claim: _Claim | None, pipe: ChunkPipeline, repeat: int = 1,
                 data: bytes | memoryview | None = None) -> None:
        self.file_key = file_key
        self.file_offset = file_offset
        self.size = size
        self.digest = digest
        self.claim = claim          # None when the key was already known, or `data` set
        self.pipe = pipe
        self.repeat = repeat
        # without compression: the chunk's own bytes (a view of its batch's buffer), no
        # claim: storing a copy costs nothing to produce, and a claim per chunk (the
        # `known` lookup, the claims dict and its lock, the release) was ~a fifth of the
        # workers' and the consumer's per-chunk Python
        self.data = data

    @property
    def key(self) -> ChunkKey:
        return (self.digest, self.size)

    def stored_bytes(self) -> bytes | memoryview:
        """Stored form (compressed or raw) of this chunk; call once per distinct key."""
        d = self.data
        if d is not None:
            self.data = None
            return d
        c = self.claim
        if c is None:
            raise RuntimeError("chunk key was already known: no bytes to take")
        if c.taken:
            raise RuntimeError("chunk bytes already taken")
        if c.data is None:
            self.pipe._wait_batch(c.seq)
        data, c.data, c.taken = c.data, None, True
        if data is None:                # the claiming batch always fills it, or raises
            raise RuntimeError("chunk bytes missing after their batch completed")
        return data


class BatchResults(list[ChunkResult]):
    """One batch's results in order. `buf` (without compression): the batch's read
    buffer, in which the data of its chunks that were read (holes are not) lie back to
    back in result order, so that the consumer hands the blob writer a run of new
    chunks as one piece of it, uncopied; None otherwise."""
    __slots__ = ("buf",)

    def __init__(self) -> None:
        super().__init__()
        self.buf: memoryview | None = None


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """Data extents [(start, end)] of a file via SEEK_DATA/SEEK_HOLE (whole file if unknown)."""
    out = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == 6:  # ENXIO: no data after pos
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            if start >= size:
                break
            out.append((start, end))
            pos = end
    except (OSError, AttributeError):
        return [(0, size)]
    return out


def _overlaps(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    for a, b in ranges:
        if a < end and start < b:
            return True
    return False


class ChunkPipeline:
    """Chunk, hash and compress files in parallel; yield results in deterministic order.

    files: iterable of (file_key, path, size, sparse) where sparse says the file may have
    holes (st_blocks * 512 < size); results come back per file in the order given.
    known: callable(key) -> bool for keys that need no data (already stored or in a dict).
    """

    def __init__(self, chunk_size: int, digester: str = "blake3",
                 compressor: str | Compressor = "zstd", workers: int | None = None,
                 window: int | None = None,
                 known: Callable[[ChunkKey], bool] | None = None) -> None:
        self.chunk_size = check_chunk_size(chunk_size)
        self.digester = digester
        self.digest = digest_function(digester)
        self._hasher = blake3.blake3 if digester == "blake3" else _sha256()
        self._tls = threading.local()       # each worker's read buffer
        self.compressor = compressor if isinstance(compressor, Compressor) \
            else Compressor(compressor)
        self.workers = workers or os.cpu_count() or 1
        # compressed: two batches per worker, one being worked on, one done and waiting
        # for the consumer (a third only held memory: ~1 MiB per batch; one cost ~5 % of
        # pack zstd's time, the workers waiting for the consumer). Without compression
        # one: a raw batch is ~1 MiB of data held until written, and the workers, which
        # only read and hash, are not the slower side (/usr/share: peak RSS 52.7 -> 49.3
        # MiB, the same wall time at real-time priority)
        self.window = window or (max(2, self.workers) if self.compressor.name == "none"
                                 else self.workers * 2)
        self._known = known or (lambda key: False)
        self._claims: dict[ChunkKey, _Claim] = {}
        self._lock = threading.Lock()
        self._zero_digests: dict[int, bytes] = {}
        self._zeros: dict[int, bytes] = {}
        self._futures: dict[int, Task[list[ChunkResult]]] = {}
        self.bytes_read = 0
        self.bytes_hole = 0

    # -- worker side ---------------------------------------------------------------------
    def zero_digest(self, size: int) -> bytes:
        d = self._zero_digests.get(size)
        if d is None:
            d = self._zero_digests[size] = self.digest(bytes(size))
        return d

    def _zero_bytes(self, size: int) -> bytes:
        """`size` zero bytes, one object per size (the stored form of a hole chunk
        without compression; a sparse file's holes are many chunks of one size)."""
        z = self._zeros.get(size)
        if z is None:
            z = self._zeros[size] = bytes(size)
        return z

    def _claim(self, key: ChunkKey, seq: int) -> tuple[_Claim | None, _Claim | None]:
        """-> (claim if this caller must produce the data else None, claim-or-None)."""
        if self._known(key):
            return None, None
        c = self._claims.get(key)          # fast path without the lock
        if c is not None:
            return None, c
        with self._lock:
            c = self._claims.get(key)
            if c is not None:
                return None, c
            c = self._claims[key] = _Claim(seq)
            return c, c

    def release(self, key: ChunkKey) -> None:
        """The consumer stored `key` (its `known` now says so): drop its claim, so that
        claims do not pile up one per distinct chunk. A worker racing with this may claim
        the key again and compress it once more; the consumer finds it stored."""
        self._claims.pop(key, None)

    def _store(self, mine: _Claim, data: bytes) -> None:
        mine.data = self.compressor.compress(data)

    def _wait_batch(self, seq: int) -> None:
        fut = self._futures.get(seq)
        if fut is not None:
            fut.result()

    def _run_batch(self, seq: int,
                   batch: list[_FileChunk]) -> list[ChunkResult]:
        """Read the batch in one C call, hash each chunk, claim the new keys and compress
        the claimed chunks in one call."""
        names = bytearray()
        name_off, file_off = array.array("I"), array.array("Q")
        lengths, buf_off = array.array("I"), array.array("Q")
        where: list[int] = []       # per chunk: its offset in buf, or -1: a hole
        paths: list[str | bytes] = []       # per name: the path (for messages)
        cur: str | bytes | None = None
        ranges: list[tuple[int, int]] | None = None
        total = 0
        for _file_key, path, size, sparse, off, length in batch:
            if path is not cur:
                cur = path
                ranges = self._sparse_ranges(path, size) if sparse else None
                no = len(names)
                names += os.fsencode(path)
                names.append(0)
                paths.append(path)
            if ranges is not None and not _overlaps(ranges, off, off + length):
                where.append(-1)
                continue
            where.append(total)
            name_off.append(no)
            file_off.append(off)
            lengths.append(length)
            buf_off.append(total)
            total += length
        buf = self._read_buffer(total)
        try:
            read_chunks(bytes(names), name_off, file_off, lengths, buf_off, buf)
        except ChunkReadError as e:
            failed = bytes(names[name_off[e.index]:names.index(0, name_off[e.index])])
            shown = next((p for p in paths if os.fsencode(p) == failed), failed)
            if e.what == "short":
                raise InputError(f"{shown_path(shown)} changed size while being packed") \
                    from None
            raise InputError(f"cannot read {shown_path(shown)}: {e.strerror}") from None
        self.bytes_read += total
        mv = memoryview(buf)
        hasher = self._hasher
        out: list[ChunkResult] = []
        if self.compressor.name == "none":
            # each result carries its bytes (no claims, see ChunkResult.data)
            out = BatchResults()
            out.buf = mv[:total]
            for (file_key, _path, _size, _sparse, off, length), at in zip(batch, where):
                if at < 0:
                    digest = self.zero_digest(length)
                    self.bytes_hole += length
                    data: bytes | memoryview = self._zero_bytes(length)
                else:
                    data = mv[at:at + length]
                    digest = hasher(data).digest()
                out.append(ChunkResult(file_key, off, length, digest, None, self, 1, data))
            return out
        claim_key = self._claim
        claims: list[_Claim] = []
        pieces: list[tuple[int, int]] = []
        for (file_key, _path, _size, _sparse, off, length), at in zip(batch, where):
            if at < 0:
                digest = self.zero_digest(length)
                self.bytes_hole += length
                mine, claim = self._claim((digest, length), seq)
                if mine is not None:
                    self._store(mine, bytes(length))
            else:
                digest = hasher(mv[at:at + length]).digest()
                mine, claim = claim_key((digest, length), seq)
                if mine is not None:        # compressed below, all in one call
                    claims.append(mine)
                    pieces.append((at, length))
            out.append(ChunkResult(file_key, off, length, digest, claim, self))
        del mv
        # every chunk read was new (the usual batch): its pieces are the read's own arrays
        todo = Pieces(buf_off, lengths) if len(pieces) == len(lengths) else Pieces.of(pieces)
        base, stored = self.compressor.compress_batch(buf, todo)
        if base is None:
            for mine, data in zip(claims, stored):
                mine.data = data
        else:
            pos = 0
            for mine, data in zip(claims, stored):
                mine.base = base
                mine.off = pos
                mine.data = data
                pos += len(data)
        return out

    def _read_buffer(self, size: int) -> bytearray | memoryview:
        """A buffer of at least `size` bytes for one batch's data. Each worker reuses
        its own (a new 1 MiB bytearray per batch cost a memset and the page faults of
        fresh pages: ~5 % of the pack's CPU time), except without compression, where
        the stored chunks are views of the batch's buffer: there one of the C core's
        pool, back in the pool when the writer has copied the last of its chunks (a
        bytearray per batch, mapped, zeroed, faulted in and unmapped again, was ~0.3
        CPU s of a /usr/share pack)."""
        if self.compressor.name == "none":
            return batch_buffer(size)
        buf: bytearray | None = getattr(self._tls, "buf", None)
        if buf is None or len(buf) < size:
            buf = self._tls.buf = bytearray(max(size, BATCH_BYTES))
        return buf

    @staticmethod
    def _sparse_ranges(path: str | bytes, size: int) -> list[tuple[int, int]]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise InputError(f"cannot read {shown_path(path)}: {e.strerror}") from None
        try:
            return _data_ranges(fd, size)
        finally:
            os.close(fd)

    # -- consumer side -------------------------------------------------------------------
    def _batches(self, files: Iterable[FileItem]
                 ) -> Iterator[list[_FileChunk]]:
        cs = self.chunk_size
        whole = self.compressor.name == "none"
        batch: list[_FileChunk] = []
        nbytes = 0
        for file_key, path, size, sparse in files:
            off = 0
            while off < size:
                length = min(cs, size - off)
                # without compression closed before a chunk would take it over
                # BATCH_BYTES: batch buffers of at most 1 MiB, any pooled one serves any
                # batch (/usr/share: peak RSS 1.2 MiB lower; with zstd 1.3 MiB lower
                # but 1-3 % slower, python-zstandard's context made once per batch)
                if whole and batch and nbytes + length > BATCH_BYTES:
                    yield batch
                    batch, nbytes = [], 0
                batch.append((file_key, path, size, sparse, off, length))
                nbytes += length
                off += length
                if nbytes >= BATCH_BYTES or len(batch) >= BATCH_CHUNKS:
                    yield batch
                    batch, nbytes = [], 0
        if batch:
            yield batch

    def run(self, files: Iterable[FileItem]) -> Iterator[ChunkResult]:
        """Yield ChunkResult in (file order, offset order).

        A result whose `claim` is not None refers to a chunk whose stored bytes are
        available through `stored_bytes()` (call it once per distinct key: the consumer
        does so the first time it meets the key).
        """
        for batch in self._run(self._batches(files), self._run_batch):
            yield from batch

    def run_batches(self, files: Iterable[FileItem]) -> Iterator[list[ChunkResult]]:
        """run's results a batch at a time, in the same order (the consumer's loop per
        batch, not one generator step per chunk)."""
        return self._run(self._batches(files), self._run_batch)

    # -- chunks already in memory (a tar stream) --------------------------------------------
    def run_stream(self, items: Iterable[StreamItem]) -> Iterator[ChunkResult]:
        """Like run, for chunks a stream reader has already cut: items are (file_key,
        offset, data, length, repeat); data None = `repeat` chunks of zeros in a row (a
        sparse hole, never materialized but once per size for its digest)."""
        for batch in self._run(self._stream_batches(items), self._run_stream_batch):
            yield from batch

    @staticmethod
    def _stream_batches(items: Iterable[StreamItem]) -> Iterator[list[StreamItem]]:
        batch: list[StreamItem] = []
        nbytes = 0
        for it in items:
            batch.append(it)
            nbytes += it[3] if it[2] is not None else 0
            if nbytes >= BATCH_BYTES or len(batch) >= BATCH_CHUNKS:
                yield batch
                batch, nbytes = [], 0
        if batch:
            yield batch

    def _run_stream_batch(self, seq: int, batch: list[StreamItem]) -> list[ChunkResult]:
        out = []
        for key, off, data, length, repeat in batch:
            if data is None:
                digest = self.zero_digest(length)
                self.bytes_hole += length * repeat
            else:
                digest = self.digest(data)
                self.bytes_read += length
            mine, claim = self._claim((digest, length), seq)
            if mine is not None:
                self._store(mine, data if data is not None else bytes(length))
            out.append(ChunkResult(key, off, length, digest, claim, self, repeat))
        return out

    def _run(self, batches: Iterable[_Batch],
             work: Callable[[int, _Batch], list[ChunkResult]]
             ) -> Iterator[list[ChunkResult]]:
        pending: deque[tuple[int, Task[list[ChunkResult]]]] = deque()
        self._futures = {}
        # compressed batches are buffers of the C core's pool (Compressor.compress_many)
        # held until the writer copied them: the batches in flight, the writer's queue
        # (~1 MiB) and the group it gathers. Kept idle for the next batches, not mapped,
        # faulted in and unmapped again each (~0.1 CPU s of a /usr/share pack); the pool
        # keeps one (the C core's default) again after
        pooled = self.compressor.pooled
        if pooled:
            batch_buffers_kept(self.window + 4)
        with WorkPool(self.workers, "erofs-chunk") as pool:
            try:
                for seq, batch in enumerate(batches):
                    fut = pool.submit(work, seq, batch)
                    self._futures[seq] = fut
                    pending.append((seq, fut))
                    while len(pending) >= self.window:
                        yield self._pop(pending)
                while pending:
                    yield self._pop(pending)
            finally:
                for _, f in pending:
                    f.cancel()
                if pooled:
                    batch_buffers_kept(1)

    def _pop(self, pending: deque[tuple[int, Task[list[ChunkResult]]]]
             ) -> list[ChunkResult]:
        seq, fut = pending.popleft()
        out = fut.result()
        del self._futures[seq]
        return out
