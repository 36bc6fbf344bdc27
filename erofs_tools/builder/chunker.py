"""Fixed-size chunking with a parallel hash + compress pipeline.

Files are cut into fixed `chunk_size` pieces (the last one short). Chunks are read,
hashed and compressed by a thread pool (a batch's reads and zstd frames one C call
each without the GIL, its chunks of at most SMALL_HASH_MAX bytes hashed with BLAKE3 in
the read's call; the blake3 package and hashlib release it for inputs of 2 KiB and
more) while the caller's thread consumes the results strictly in submission order, so
the output is reproducible whatever the scheduling. At most `window` batches are in
flight, which bounds memory to a few chunks per worker whatever the file sizes.

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
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import repeat as repeat_of
from typing import Any, TypeVar

import blake3

from erofs_tools._native_chunkio import (
    ChunkReadError,
    batch_buffer,
    batch_buffers_kept,
    read_chunks,
)
from erofs_tools.builder.compressor import (  # noqa: F401 (re-exported)
    COMPRESSORS,
    ZSTD_LEVEL,
    Compressor,
    Pieces,
)
from erofs_tools.builder.tree import shown_path
from erofs_tools.builder.workpool import Task, WorkPool
from erofs_tools.errors import InputError
from erofs_tools.format import rafs as R

DIGESTERS = ("blake3", "sha256")

# Batches group small chunks so that per-task overhead stays small for trees of many
# small files; a batch is closed at this many bytes (without compression: holds at
# most this many, or one bigger chunk) or chunks.
BATCH_BYTES = 1 << 20
BATCH_CHUNKS = 256
# blake3: chunks of at most this many bytes are hashed by the C core's own BLAKE3 in
# the batch's read call, without the GIL; bigger ones by the blake3 package, whose SIMD
# hashes 1 KiB pieces side by side (ours hashes ~0.85 GB/s: a 4 KiB chunk ~5 us against
# the package's ~1.8 us). /usr/share, alternated pairs: 4 KiB faster than 2 KiB in 10 of
# 12, equal to 16 KiB (docs/performance.md, helper run packc)
SMALL_HASH_MAX = 4096

Digest = Callable[[bytes | memoryview], bytes]
ChunkKey = tuple[bytes, int]                     # (digest, uncompressed size)
KnownMany = Callable[[Sequence[bytes | None], Sequence[int]], list[bool]]
FileItem = tuple[int, str | bytes, int, bool]    # (file_key, path, size, sparse)
StreamItem = tuple[int, int, bytes | None, int, int]   # (file_key, offset, data, length,
                                                       #  repeat)
_Batch = TypeVar("_Batch")


def _sha256() -> Callable[..., Any]:
    """hashlib.sha256, imported when first needed: with blake3 chunk digests (the
    default) pack never maps libcrypto (~3.5 MiB of its RSS; the blob id is the C
    core's sha256)."""
    import hashlib
    return hashlib.sha256


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


class _ChunkBatch:
    """One batch of chunks as its read takes them: chunk i is lengths[i] bytes at
    file_off[i] of the file whose NUL-terminated name starts at names[name_off[i]],
    read to buf_off[i] (chunks back to back; a batch with sparse files is read
    without its hole chunks, see ChunkPipeline._holes); keys[i] its file's key.
    paths: each file's path as given (messages); sparse: name offset -> (path, size)
    of the files that may have holes."""
    __slots__ = ("buf_off", "file_off", "keys", "lengths", "name_off", "names", "nbytes",
                 "paths", "sparse")

    def __init__(self) -> None:
        self.names = bytearray()
        self.name_off = array.array("I")
        self.file_off = array.array("Q")
        self.lengths = array.array("I")
        self.buf_off = array.array("Q")
        self.keys: list[int] = []
        self.paths: list[str | bytes] = []
        self.sparse: dict[int, tuple[str | bytes, int]] = {}
        self.nbytes = 0

    def appender(self) -> tuple[Callable[[int], None], ...]:
        """The appends of a chunk's name offset, file offset, length, buffer offset and
        file key (bound once per batch: five attribute lookups a chunk fewer)."""
        return (self.name_off.append, self.file_off.append, self.lengths.append,
                self.buf_off.append, self.keys.append)

    def add_name(self, path: str | bytes, size: int, sparse: bool) -> int:
        """A file's NUL-terminated name appended; -> its offset in `names`."""
        names = self.names
        no = len(names)
        names += path if isinstance(path, bytes) else os.fsencode(path)
        names.append(0)
        self.paths.append(path)
        if sparse:
            self.sparse[no] = (path, size)
        return no


class ChunkPipeline:
    """Chunk, hash and compress files in parallel; yield results in deterministic order.

    files: iterable of (file_key, path, size, sparse) where sparse says the file may have
    holes (st_blocks * 512 < size); results come back per file in the order given.
    known: callable(key) -> bool for keys that need no data (already stored or in a dict);
    known_many: the same for a batch's chunks at once, callable(digests, sizes) -> one
    flag per chunk (a digest None, a hole's, is any flag: holes ask `known`).
    """

    def __init__(self, chunk_size: int, digester: str = "blake3",
                 compressor: str | Compressor = "zstd", workers: int | None = None,
                 window: int | None = None,
                 known: Callable[[ChunkKey], bool] | None = None,
                 known_many: KnownMany | None = None) -> None:
        self.chunk_size = check_chunk_size(chunk_size)
        self.digester = digester
        self.digest = digest_function(digester)
        self._hasher = blake3.blake3 if digester == "blake3" else _sha256()
        self._tls = threading.local()       # each worker's read buffer
        self.compressor = compressor if isinstance(compressor, Compressor) \
            else Compressor(compressor)
        self.workers = workers or os.cpu_count() or 1
        # compressed: three batches per worker. The consumer takes them in order, so a
        # slow batch at the head (1 MiB chunks of hard data) holds the window: with two
        # per worker the other worker finished the rest and then idled, nothing queued
        # (/usr/share: 0.55-1.07 worker-seconds idle with nothing to take, 0.21-0.36
        # with three, 4 alternations; peak RSS the same, ~55 MiB: the batches' stored
        # bytes leave with the writer; one per worker cost ~5 % of the time, the
        # workers waiting for the consumer). Without compression one: a raw batch is
        # ~1 MiB of data held until written, and the workers, which only read and hash,
        # are not the slower side (/usr/share: peak RSS 52.7 -> 49.3 MiB, the same wall
        # time at real-time priority)
        self.window = window or (max(2, self.workers) if self.compressor.name == "none"
                                 else self.workers * 3)
        self._known = known or (lambda key: False)
        self._known_many = known_many
        self._claims: dict[ChunkKey, _Claim] = {}
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
        """-> (claim if this caller must produce the data else None, claim-or-None).
        No lock: setdefault on a key of bytes and an int runs no Python code, so it is
        one atomic step under the GIL (a lock taken per new chunk was ~0.5 us of it)."""
        if self._known(key):
            return None, None
        c = self._claims.get(key)
        if c is not None:
            return None, c
        new = _Claim(seq)
        c = self._claims.setdefault(key, new)
        return (new, new) if c is new else (None, c)

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

    def _run_batch(self, seq: int, batch: _ChunkBatch) -> list[ChunkResult]:
        """Read the batch in one C call (which also hashes its small chunks), hash the
        others, claim the new keys and compress the claimed chunks in one call."""
        where: list[int] | array.array[int]
        if batch.sparse:
            where, name_off, file_off, lengths, buf_off, total = self._holes(batch)
        else:
            # the read arrays are the batch's own, as _batches made them: no loop here
            name_off, file_off, lengths = batch.name_off, batch.file_off, batch.lengths
            where = buf_off = batch.buf_off
            total = batch.nbytes
        names = bytes(batch.names)
        buf = self._read_buffer(total)
        n = len(lengths)
        c_hash = self._hasher is blake3.blake3
        dbuf = bytearray(32 * n) if c_hash else None
        try:
            read_chunks(names, name_off, file_off, lengths, buf_off, buf, SMALL_HASH_MAX,
                        dbuf)
        except ChunkReadError as e:
            failed = names[name_off[e.index]:names.index(0, name_off[e.index])]
            shown = next((p for p in batch.paths if os.fsencode(p) == failed), failed)
            if e.what == "short":
                raise InputError(f"{shown_path(shown)} changed size while being packed") \
                    from None
            raise InputError(f"cannot read {shown_path(shown)}: {e.strerror}") from None
        self.bytes_read += total
        mv = memoryview(buf)
        digs = self._digests(mv, dbuf, lengths, buf_off)
        if batch.sparse:        # aligned with the batch's chunks: None for a hole
            it = iter(digs)
            digs = [next(it) if at >= 0 else None for at in where]
        out: list[ChunkResult] = []
        keys, offs, sizes = batch.keys, batch.file_off, batch.lengths
        digest: bytes | None
        if self.compressor.name == "none":
            # each result carries its bytes (no claims, see ChunkResult.data)
            out = BatchResults()
            out.buf = mv[:total]
            for file_key, off, length, at, digest in zip(keys, offs, sizes, where, digs):
                if digest is None:
                    digest = self.zero_digest(length)
                    self.bytes_hole += length
                    data: bytes | memoryview = self._zero_bytes(length)
                else:
                    data = mv[at:at + length]
                out.append(ChunkResult(file_key, off, length, digest, None, self, 1, data))
            return out
        # _claim inlined: one chunk's Python here is most of a small file's cost
        known = self._known
        claims_get, claims_set = self._claims.get, self._claims.setdefault
        claims: list[_Claim] = []
        pieces: list[tuple[int, int]] = []
        # the batch's lookups in one call: a `known` call per chunk, with its
        # attribute lookups, was ~0.4 us of a worker's GIL each
        flags: Iterable[bool | None] = repeat_of(None) if self._known_many is None \
            else self._known_many(digs, sizes)
        for file_key, off, length, at, digest, flag in zip(keys, offs, sizes, where, digs,
                                                           flags):
            if digest is None:
                digest = self.zero_digest(length)
                self.bytes_hole += length
                mine, claim = self._claim((digest, length), seq)
                if mine is not None:
                    self._store(mine, bytes(length))
            else:
                key = (digest, length)
                if flag if flag is not None else known(key):
                    claim = None
                else:
                    claim = claims_get(key)
                    if claim is None:
                        new = _Claim(seq)
                        claim = claims_set(key, new)
                        if claim is new:        # compressed below, all in one call
                            claims.append(new)
                            pieces.append((at, length))
            out.append(ChunkResult(file_key, off, length, digest, claim, self))
        del mv
        # every chunk read was new (the usual batch): its pieces are the read's own arrays
        todo = Pieces(buf_off, lengths) if len(pieces) == len(lengths) else Pieces.of(pieces)
        sized = self.compressor.compress_batch_sized(buf, todo)
        if sized is None:
            for mine, data in zip(claims, self.compressor.compress_many(buf, todo)):
                mine.data = data
        else:
            # the C core's zstd: the stored pieces back to back in `base`; each claim's
            # view made here (not a list of them first: one step a chunk fewer)
            base, stored_sizes = sized
            pos = 0
            for mine, n in zip(claims, stored_sizes):
                mine.base = base
                mine.off = pos
                mine.data = base[pos:pos + n]
                pos += n
        return out

    def _digests(self, mv: memoryview, dbuf: bytearray | None, lengths: array.array[int],
                 buf_off: array.array[int]) -> list[bytes | None]:
        """The digests of a batch's chunks that were read: dbuf's (the C core's BLAKE3
        of the chunks of at most SMALL_HASH_MAX bytes, hashed in the read's call without
        the GIL), the bigger ones hashed here (the blake3 package's SIMD hashes many
        1 KiB pieces at once and releases the GIL for them; one hasher for the batch,
        reset after each chunk); dbuf None (the sha256 digester): every one here."""
        if dbuf is None:
            sha = self._hasher
            return [sha(mv[at:at + n]).digest() for at, n in zip(buf_off, lengths)]
        d = bytes(dbuf)
        digs: list[bytes | None] = [d[i:i + 32] for i in range(0, len(d), 32)]
        if len(lengths) and max(lengths) > SMALL_HASH_MAX:
            h = blake3.blake3()
            upd, fin, rst = h.update, h.digest, h.reset
            for i, (at, n) in enumerate(zip(buf_off, lengths)):
                if n > SMALL_HASH_MAX:
                    upd(mv[at:at + n])
                    digs[i] = fin()
                    rst()
        return digs

    def _holes(self, batch: _ChunkBatch) -> tuple[
            list[int], array.array[int], array.array[int], array.array[int],
            array.array[int], int]:
        """A batch with sparse files: per chunk its offset in the read buffer or -1 (in
        a hole: not read), and the read arrays of the chunks that are read."""
        name_off, file_off = array.array("I"), array.array("Q")
        lengths, buf_off = array.array("I"), array.array("Q")
        where: list[int] = []
        ranges: dict[int, list[tuple[int, int]] | None] = {}
        total = 0
        for no, off, length in zip(batch.name_off, batch.file_off, batch.lengths):
            if no in ranges:
                r = ranges[no]
            else:
                sp = batch.sparse.get(no)
                r = ranges[no] = None if sp is None else self._sparse_ranges(*sp)
            if r is not None and not _overlaps(r, off, off + length):
                where.append(-1)
                continue
            where.append(total)
            name_off.append(no)
            file_off.append(off)
            lengths.append(length)
            buf_off.append(total)
            total += length
        return where, name_off, file_off, lengths, buf_off, total

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
    def _batches(self, files: Iterable[FileItem]) -> Iterator[_ChunkBatch]:
        """The files' chunks cut into batches, each already in the arrays its read takes
        (the worker's per-chunk loop that built them from a tuple per chunk was ~1 us a
        chunk with the GIL held)."""
        cs = self.chunk_size
        whole = self.compressor.name == "none"
        batch = _ChunkBatch()
        a_no, a_off, a_len, a_at, a_key = batch.appender()
        nbytes = nchunks = 0
        for file_key, path, size, sparse in files:
            off = 0
            no = -1
            while off < size:
                length = min(cs, size - off)
                # without compression closed before a chunk would take it over
                # BATCH_BYTES: batch buffers of at most 1 MiB, any pooled one serves any
                # batch (/usr/share: peak RSS 1.2 MiB lower; with zstd 1.3 MiB lower
                # but 1-3 % slower, python-zstandard's context made once per batch)
                if whole and nchunks and nbytes + length > BATCH_BYTES:
                    batch.nbytes = nbytes
                    yield batch
                    batch = _ChunkBatch()
                    a_no, a_off, a_len, a_at, a_key = batch.appender()
                    nbytes = nchunks = 0
                    no = -1
                if no < 0:          # the file's name, once per batch it has chunks in
                    no = batch.add_name(path, size, sparse)
                a_no(no)
                a_off(off)
                a_len(length)
                a_at(nbytes)
                a_key(file_key)
                nbytes += length
                nchunks += 1
                off += length
                if nbytes >= BATCH_BYTES or nchunks >= BATCH_CHUNKS:
                    batch.nbytes = nbytes
                    yield batch
                    batch = _ChunkBatch()
                    a_no, a_off, a_len, a_at, a_key = batch.appender()
                    nbytes = nchunks = 0
                    no = -1
        if nchunks:
            batch.nbytes = nbytes
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
