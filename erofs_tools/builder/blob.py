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
from __future__ import annotations

import array
import errno
import os
import queue
import struct
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

from erofs_tools._native_chunkio import ci_v1_append, gather
from erofs_tools._native_sha256 import Sha256
from erofs_tools.builder.workpool import Started, started
from erofs_tools.errors import InputError
from erofs_tools.format import erofs as E
from erofs_tools.format import rafs as R
from erofs_tools.fsutil import create_exclusive, round_up

if TYPE_CHECKING:
    # BlobInfo (a decoded blob-table entry) lives in the reader layer, which reads
    # bootstraps; imported when first used (pack needs it only at the end, and the
    # reader's modules are ~2 MiB of pack's RSS)
    from erofs_tools.reader.bootstrap import BlobInfo


def __getattr__(name: str) -> Any:
    if name == "BlobInfo":          # re-exported for the builder's modules
        from erofs_tools.reader.bootstrap import BlobInfo
        return BlobInfo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["BLKSZ", "BlobInfo", "BlobMeta", "BlobWriter", "StoredChunk", "read_toc",
           "round_up"]

BLKSZ = E.BLKSZ
CI_ZSTD_LEVEL = 3
# chunks handed to the writer thread in groups of this size, at most this much queued:
# every byte of it is held twice at the peak (queued, and joined for the hash), and with
# --compressor none 2 and 4 MiB cost ~8 MiB of pack's peak RSS, at no gain in time
WRITE_BATCH = 512 << 10
WRITE_QUEUE_BYTES = 1 << 20
# gather buffers of the writer and the hasher thread: the writer writes one group while
# the hasher hashes the one before (more would only hold memory: the write is the slower)
HASH_BUFFERS = 2
# pieces of a group at least this big are written as they are, not gathered
GATHER_MAX = WRITE_BATCH // 2
_CI_V1 = struct.Struct("<QQ")        # a CI v1 entry: uncompressed word, compressed word


class StoredChunk:
    """Where one distinct chunk lives: blob index + its CI entry."""
    __slots__ = ("digest", "blob_index", "index", "compressed_offset", "compressed_size",
                 "uncompressed_offset", "uncompressed_size")

    def __init__(self, digest: bytes, blob_index: int, index: int, compressed_offset: int,
                 compressed_size: int, uncompressed_offset: int,
                 uncompressed_size: int) -> None:
        self.digest = digest
        self.blob_index = blob_index
        self.index = index
        self.compressed_offset = compressed_offset
        self.compressed_size = compressed_size
        self.uncompressed_offset = uncompressed_offset
        self.uncompressed_size = uncompressed_size

    @property
    def compressed(self) -> bool:
        return self.compressed_size != self.uncompressed_size

    def chunk_index_bytes(self) -> bytes:
        """The 8-byte RafsV6InodeChunkAddr / EROFS chunk index of this chunk (§8): CI
        index bits 0-15 in advise, device id (blob index + 1) and CI index bits 16-23 in
        device_id."""
        lo = self.index & 0xFFFF
        hi = ((self.blob_index + 1) & 0xFF) | (((self.index >> 16) & 0xFF) << 8)
        return E.ChunkIndex.pack(lo, hi, self.uncompressed_offset // BLKSZ)

    def chunk_info_bytes(self, blob_index: int, file_offset: int = 0) -> bytes:
        """The 80-byte RafsV5ChunkInfo of this chunk (fast path of chunk_info().encode())."""
        return R.ChunkInfo.pack(
            self.digest, blob_index,
            R.CHUNK_FLAG_COMPRESSED if self.compressed_size != self.uncompressed_size else 0,
            self.compressed_size, self.uncompressed_size, self.compressed_offset,
            self.uncompressed_offset, file_offset, self.index, 0)

    def chunk_info(self, file_offset: int = 0) -> R.ChunkInfo:
        return R.ChunkInfo(
            digest=self.digest, blob_index=self.blob_index,
            flags=R.CHUNK_FLAG_COMPRESSED if self.compressed else 0,
            compressed_size=self.compressed_size, uncompressed_size=self.uncompressed_size,
            compressed_offset=self.compressed_offset,
            uncompressed_offset=self.uncompressed_offset, file_offset=file_offset,
            index=self.index, crc32=0)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of `data` at the fd's offset (short writes retried)."""
    mv = memoryview(data)
    while mv:
        k = os.write(fd, mv)
        if k <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        mv = mv[k:]


class BlobWriter:
    """Append stored chunks, then `finish()` the meta sections and name the file."""

    def __init__(self, blob_dir: str, chunk_size: int, compressor: str = "zstd",
                 digester: str = "blake3", blob_index: int = 0,
                 digests: bytearray | None = None) -> None:
        """digests: the caller's buffer that holds every appended chunk's digest in CI
        order by the time of finish() (pack's ChunkRefs keeps them anyway: a second copy
        was ~1.5 MiB of its peak on /usr/share); None: the writer keeps its own."""
        if not os.path.isdir(blob_dir):
            raise InputError(f"blob directory {blob_dir} does not exist")
        self.blob_dir = blob_dir
        self.chunk_size = chunk_size
        self.compressor = compressor
        self.digester = digester
        self.blob_index = blob_index
        self._own_digests = digests is None
        self._digests = bytearray() if digests is None else digests
        self._finishing: Started[BlobInfo] | None = None     # finish_started's
        fd, self.tmp_path = create_exclusive(blob_dir, ".blob-")
        try:
            self._start(fd, chunk_size)
        except BaseException:       # e.g. SIGINT while the thread starts: no temp left
            # the stop marker even if start() was interrupted before the thread showed
            # alive: it may still run, and must find the marker, not a closed file
            if getattr(self, "_thread", None) is not None:
                self._q.put(None)
            elif getattr(self, "_hasher", None) is not None:
                self._hq.put(None)      # the writer never started: nor will it end it
            f = getattr(self, "_f", None)
            try:
                if f is not None:
                    f.close()
                else:
                    os.close(fd)
            except OSError:
                pass
            os.unlink(self.tmp_path)
            raise

    def _start(self, fd: int, chunk_size: int) -> None:
        self._f: BinaryIO | None = os.fdopen(fd, "wb", buffering=1 << 20)
        # the blob id; the C core's, not hashlib's: libcrypto was ~3.5 MiB of pack's RSS
        self._hash = Sha256()
        self._pos = 0
        self._upos = 0
        self._ci = bytearray()
        # raw chunks whose CI entries are not in _ci yet: (coff, csize, uoff, start, end)
        self._raw_ci: tuple[array.array[int], array.array[int], array.array[int], int,
                            int] | None = None
        # compressed runs (append_chunks with csizes) not placed yet: the caller's
        # (coff, csize, uoff) arrays and each chunk's stored and data sizes since
        # (_runs_flush places them all in one C call; _pos and _upos lag until then)
        self._runs: tuple[array.array[int], array.array[int], array.array[int]] | None = None
        self._run_cs = array.array("I")
        self._run_us = array.array("I")
        self.count = 0
        self.info: BlobInfo | None = None
        # chunk data is written by one background thread and hashed (the blob id) by
        # another, so that the sequential sha256 overlaps with the page-cache copy of the
        # write as well as with chunking (one thread doing both was pack's critical path
        # with --compressor none: ~0.4 s of sha256 after ~1 s of write per 640 MB). Two
        # queued groups keep the writer busy; more only hold memory (64 MiB of queue was
        # a third of pack's peak RSS with --compressor none, at no gain in time).
        # Uncompressed, one: a queued group is views of the chunker's batch buffers,
        # each holding its whole ~1 MiB buffer (a second one was ~1.3 MiB of the peak)
        self._q: queue.Queue[list[bytes | memoryview] | None] = queue.Queue(
            maxsize=1 if self.compressor == "none"
            else max(2, (WRITE_QUEUE_BYTES) // max(WRITE_BATCH, chunk_size)))
        # written groups on their way to the hasher, in write order (one queued: the
        # writer is at most a group ahead); the gather buffers come back through _free
        # once hashed
        self._hq: queue.Queue[tuple[bytes | memoryview | bytearray, int, bool] | None] = \
            queue.Queue(maxsize=1)
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(HASH_BUFFERS):
            self._free.put(bytearray())
        self._buf: list[bytes | memoryview] = []
        self._buf_bytes = 0
        self._error: BaseException | None = None
        # the fd handed over now: a SIGINT during start() closes self._f before the
        # thread may have looked at it (it then only waits for the stop marker)
        self._hasher: threading.Thread | None = threading.Thread(
            target=self._hash_groups, name="erofs-blob-hash", daemon=True)
        self._hasher.start()
        self._thread: threading.Thread | None = threading.Thread(
            target=self._drain, args=(self._f.fileno(),), name="erofs-blob-writer",
            daemon=True)
        self._thread.start()

    def _drain(self, fd: int) -> None:
        try:
            self._drain_groups(fd)
        finally:
            self._hq.put(None)          # the hasher ends after the last written group

    def _drain_groups(self, fd: int) -> None:
        while True:
            batch = self._q.get()
            if batch is None:
                return
            if self._error is not None:
                continue
            try:
                self._write_group(fd, batch)
            except BaseException as e:   # reported by the next add_chunk / finish
                self._error = e
            del batch

    def _write_group(self, fd: int, batch: list[bytes | memoryview]) -> None:
        """Write one group and hand it to the hasher: a piece of GATHER_MAX bytes or
        more as it is (with --compressor none most pieces are runs of new chunks back to
        back in a batch's read buffer, up to 1 MiB: never copied), runs of smaller ones
        gathered into one of the pooled buffers of WRITE_BATCH bytes, so that the hash
        drops the GIL once per run, not once per chunk (47k times for /usr/share); copied
        in C without the GIL (b"".join held it for ~0.1 s of a pack). The buffers stay
        WRITE_BATCH bytes: gathering whole groups (up to WRITE_BATCH + a chunk) grew
        both to ~1.5 MiB, ~2 MiB of pack's peak."""
        i, k = 0, len(batch)
        while i < k:
            j, size = i, 0
            while j < k and len(batch[j]) < GATHER_MAX and size + len(batch[j]) <= WRITE_BATCH:
                size += len(batch[j])
                j += 1
            data: bytes | memoryview | bytearray
            if j <= i + 1:
                # one piece: written and hashed as it is (never pooled, even as a
                # bytearray: its owner may still hold it)
                data = batch[i]
                n = len(data)
                pooled = False
                i += 1
            else:
                data = self._free.get()
                if len(data) < size:
                    data = bytearray(WRITE_BATCH)
                n = gather(batch[i:j], data)
                pooled = True
                i = j
            _write_all(fd, memoryview(data)[:n])
            self._hq.put((data, n, pooled))     # the hasher takes it from here
            del data

    def _hash_groups(self) -> None:
        h = self._hash
        while True:
            item = self._hq.get()
            if item is None:
                return
            data, n, pooled = item
            del item
            try:
                if self._error is None:
                    h.update(memoryview(data)[:n])
            except BaseException as e:
                self._error = e
            if pooled:
                assert isinstance(data, bytearray)
                self._free.put(data)
            del data

    def _sync(self) -> None:
        """Stop the background writer; later writes are synchronous."""
        if self._thread is not None:
            if self._buf:
                self._q.put(self._buf)
                self._buf = []
            self._q.put(None)
            self._thread.join()
            self._thread = None
        if self._hasher is not None:
            self._hasher.join()         # the writer's last act was its stop marker
            self._hasher = None
        if self._error is not None:
            e = self._error
            raise InputError(f"cannot write blob in {self.blob_dir}: "
                             f"{getattr(e, 'strerror', None) or e}") from None

    def _write(self, data: bytes | memoryview, hashed: bool = True) -> None:
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
            assert self._f is not None, "blob already finished"
            self._f.write(data)
            if hashed:
                self._hash.update(data)
        self._pos += len(data)

    def add_chunk(self, stored: bytes | memoryview, uncompressed_size: int,
                  digest: bytes) -> StoredChunk:
        """Append one chunk's stored bytes; -> StoredChunk."""
        index, coff, uoff = self.append_chunk(stored, uncompressed_size, digest)
        return StoredChunk(digest, self.blob_index, index, coff, len(stored), uoff,
                           uncompressed_size)

    def append_chunk(self, stored: bytes | memoryview, uncompressed_size: int,
                     digest: bytes) -> tuple[int, int, int]:
        """add_chunk without the StoredChunk (pack's per-chunk path, which keeps arrays);
        -> (CI index, compressed offset, uncompressed offset)."""
        index = self.count
        if index >= R.MAX_CHUNKS_PER_BLOB:
            raise InputError("too many distinct chunks for one blob (2^24)")
        n = len(stored)
        if n > uncompressed_size:
            raise ValueError("stored chunk larger than its data")
        self._runs_flush()
        coff, uoff = self._pos, self._upos
        self._ci_flush()
        self._ci += R.encode_ci_v1(uoff, uncompressed_size, coff, n)
        if self._own_digests:
            self._digests += digest
        self._write(stored)
        self._upos = uoff + round_up(uncompressed_size, BLKSZ)
        self.count = index + 1
        return index, coff, uoff

    def append_chunks(self, stored: Sequence[bytes | memoryview], sizes: Sequence[int],
                      coff: array.array[int], csize: array.array[int],
                      uoff: array.array[int], raw: bool = False,
                      csizes: Sequence[int] | None = None) -> None:
        """append_chunk for many chunks in a row (pack's placement, a batch at a time:
        one call instead of one per chunk); their compressed offsets, stored sizes and
        uncompressed offsets are appended to `coff`, `csize`, `uoff`. Only for a writer
        given its digests (the caller keeps them). raw: the chunks are stored as they
        are (no compression), `stored` their bytes in order in pieces of one or more
        chunks each (`sizes` cut them). csizes: each chunk's stored size, `stored` their
        stored bytes in order in pieces of one or more chunks each (`csizes` cut them):
        a run of a compressed batch's chunks goes to the writer as one piece of the
        batch's buffer, never gathered (copied) again, nor handled chunk by chunk."""
        if self._own_digests:
            raise AssertionError("append_chunks: the writer keeps no digests of its own")
        if raw:
            self._append_raw(stored, sizes, coff, csize, uoff)
            return
        if csizes is None:
            if len(stored) != len(sizes):
                raise ValueError("append_chunks: stored and sizes of different lengths")
            csizes = [len(data) for data in stored]     # one piece per chunk
        self._append_runs(stored, sizes, csizes, coff, csize, uoff)

    def _append_runs(self, pieces: Sequence[bytes | memoryview], sizes: Sequence[int],
                     csizes: Sequence[int], coff: array.array[int],
                     csize: array.array[int], uoff: array.array[int]) -> None:
        """append_chunks(csizes=...): the CI entries from `csizes` and `sizes`, then the
        pieces queued for the writer thread as they are."""
        k = len(sizes)
        if len(csizes) != k:
            raise ValueError("append_chunks: csizes and sizes of different lengths")
        if self.count + k > R.MAX_CHUNKS_PER_BLOB:
            raise InputError("too many distinct chunks for one blob (2^24)")
        if sum(map(len, pieces)) != sum(csizes):
            raise ValueError("append_chunks: pieces and csizes disagree")
        self._ci_flush()
        # placed later, all runs in one C call (_runs_flush): one here per batch let go
        # of the GIL on the consumer's thread, which then waited for a worker or the
        # walk to give it back before it could hand out the next batch
        pend = self._runs
        if pend is not None and (pend[0] is not coff or pend[1] is not csize
                                 or pend[2] is not uoff):
            self._runs_flush()
        self._runs = (coff, csize, uoff)
        self._run_cs.extend(csizes if isinstance(csizes, array.array)
                            else array.array("I", csizes))
        self._run_us.extend(sizes if isinstance(sizes, array.array)
                            else array.array("I", sizes))
        self._write_pieces(pieces)
        self.count += k

    def _runs_flush(self) -> None:
        """Place the compressed runs appended since the last call (append_chunks with
        csizes): their offsets and stored sizes appended to the caller's arrays, their
        CI entries to self._ci, _pos and _upos advanced past them; a stored size of 0
        or over its data's is refused here (ValueError). Before anything reads _pos,
        _upos, _ci or those arrays."""
        pend = self._runs
        if pend is None:
            return
        self._runs = None
        cs, us = self._run_cs, self._run_us
        self._run_cs, self._run_us = array.array("I"), array.array("I")
        coff, csize, uoff = pend
        c_off, u_off, ci, pos, upos = ci_v1_append(cs, us, self._pos, self._upos)
        self._ci += ci
        coff.extend(c_off)
        csize.extend(cs)
        uoff.extend(u_off)
        self._pos, self._upos = pos, upos

    def _write_pieces(self, pieces: Sequence[bytes | memoryview]) -> None:
        """The pieces to the writer thread in groups of WRITE_BATCH bytes (or written
        and hashed here when there is none); a writer error raised first."""
        if self._thread is not None and self._error is not None:
            self._sync()
        if self._thread is not None:
            buf, buf_bytes = self._buf, self._buf_bytes
            for data in pieces:
                buf.append(data)
                buf_bytes += len(data)
                if buf_bytes >= WRITE_BATCH:
                    self._q.put(buf)
                    buf = []
                    buf_bytes = 0
            self._buf, self._buf_bytes = buf, buf_bytes
        else:
            assert self._f is not None, "blob already finished"
            for data in pieces:
                self._f.write(data)
                self._hash.update(data)

    def _append_raw(self, pieces: Sequence[bytes | memoryview], sizes: Sequence[int],
                    coff: array.array[int], csize: array.array[int],
                    uoff: array.array[int]) -> None:
        """append_chunks(raw=True): the CI entries from `sizes`, then the pieces queued
        for the writer thread as they are (a piece of ~1 MiB is written and hashed
        straight from its batch's buffer)."""
        if self.count + len(sizes) > R.MAX_CHUNKS_PER_BLOB:
            raise InputError("too many distinct chunks for one blob (2^24)")
        if sum(map(len, pieces)) != sum(sizes) or min(sizes, default=1) <= 0:
            raise ValueError("append_chunks: pieces and sizes disagree, or empty chunks")
        self._runs_flush()
        pos, upos = self._pos, self._upos
        mask = BLKSZ - 1
        # their CI entries are encoded from these arrays at finish (_ci_flush): 16 bytes
        # a chunk held through chunking was ~0.75 MiB of pack's peak on /usr/share
        start = len(coff)
        pend = self._raw_ci
        if pend is not None and (pend[0] is not coff or pend[1] is not csize
                                 or pend[2] is not uoff or pend[4] != start):
            self._ci_flush()
            pend = None
        for us in sizes:
            coff.append(pos)
            csize.append(us)
            uoff.append(upos)
            pos += us
            upos += (us + mask) & ~mask
        self._write_pieces(pieces)
        self._pos, self._upos = pos, upos
        self.count += len(sizes)
        self._raw_ci = (coff, csize, uoff, start if pend is None else pend[3], len(coff))

    def _ci_flush(self) -> None:
        """Encode the CI entries of the raw chunks appended since the last call (their
        offsets and sizes in the caller's arrays) into self._ci."""
        if self._raw_ci is None:
            return
        coff, csize, uoff, start, end = self._raw_ci
        self._raw_ci = None
        ci = self._ci
        if end > start:
            # in one C call (a Python step per chunk was ~50 ms of pack none's
            # single-threaded tail on /usr/share): raw chunks appended in a row lie
            # back to back, which the offsets it gives back confirm
            sizes = csize[start:end]
            c_off, u_off, entries, _, _ = ci_v1_append(sizes, sizes, coff[start],
                                                       uoff[start])
            if c_off == coff[start:end] and u_off == uoff[start:end]:
                ci += entries
                return
        enc = _CI_V1.pack
        for pos, us, upos in zip(coff[start:end], csize[start:end], uoff[start:end]):
            # R.encode_ci_v1, inlined (sizes minus one; offsets 4 KiB aligned); stored
            # size = size
            u1 = us - 1
            hi = (((u1 >> 20) & 0xF) << 8, (u1 & 0xFFFFF) << 44)
            ci += enc(hi[0] | (upos & 0x0FFF_FFFF_F000) | hi[1],
                      (pos & 0xFF_FFFF_FFFF) | (hi[0] << 32) | hi[1])

    def abort(self) -> None:
        if self._finishing is not None:
            # finish_started's thread: never two at the file at once. Not when this is
            # that thread (finish() aborts on its own failure): join() returns at once
            self._finishing.join()
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

    def finish(self, commit: bool = True) -> BlobInfo | None:
        """Write the meta sections; -> BlobInfo, or None if no chunk was added.

        With commit=False the file stays under its temporary name until `commit()` (so a
        pack that fails later leaves nothing behind; `abort()` removes it).
        """
        if self.count == 0:
            self.abort()
            return None
        try:
            self._runs_flush()
            info = self._finish()
            if commit:
                self.commit()
            return info
        except BaseException:
            self.abort()
            raise

    def finish_started(self) -> Started[BlobInfo] | None:
        """finish(commit=False) on a thread of its own; -> its Started, whose result()
        waits for it and returns its BlobInfo (or raises what it raised), or None if no
        chunk was added (finished here). pack's bootstrap sets its chunk indexes
        meanwhile: the blob's last writes, its CI table compressed and its hashes (~10 ms
        for /usr/share) were single-threaded tail with one core idle. abort() waits for
        the thread first."""
        if self.count == 0:
            self.finish(commit=False)
            return None
        # here, not on the thread: the caller reads the offsets meanwhile
        self._runs_flush()
        job = self._finishing = started(self._finish_uncommitted, name="erofs-blob-finish")
        return job

    def _finish_uncommitted(self) -> BlobInfo:
        info = self.finish(commit=False)
        assert info is not None         # chunks were added (finish_started's check)
        return info

    def commit(self) -> None:
        """Rename the finished blob to its id."""
        assert self.info is not None and self.info.path is not None, "finish() first"
        os.chmod(self.tmp_path, 0o644)
        os.replace(self.tmp_path, self.info.path)

    def _finish(self) -> BlobInfo:
        self._runs_flush()
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
        self._ci_flush()
        ci_raw = bytes(self._ci)
        ci_stored, ci_comp = ci_raw, 0
        if self.compressor == "zstd":
            import zstandard
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
                              uncompressed_digest=Sha256(ci_raw).digest(),
                              compressed_offset=ci_offset, compressed_size=len(ci_stored),
                              uncompressed_size=len(ci_raw)))
        toc.append(R.TocEntry(flags=R.TOC_FLAG_NONE, name=R.TOC_NAME_BLOB_META_HEADER,
                              uncompressed_digest=Sha256(hdr).digest(),
                              compressed_offset=hdr_offset, compressed_size=len(hdr),
                              uncompressed_size=len(hdr)))
        # chunk digests: written raw, not part of the blob id (§11)
        digests = bytes(self._digests)
        if len(digests) != 32 * self.count:
            raise AssertionError(f"{len(digests) // 32} chunk digests for {self.count} chunks")
        dig_offset = self._pos
        self._write(digests, hashed=False)
        self._write(R.tar_header(R.TOC_NAME_BLOB_DIGEST, len(digests)))
        toc.append(R.TocEntry(flags=R.TOC_FLAG_NONE, name=R.TOC_NAME_BLOB_DIGEST,
                              uncompressed_digest=Sha256(digests).digest(),
                              compressed_offset=dig_offset, compressed_size=len(digests),
                              uncompressed_size=len(digests)))
        toc_bytes = b"".join(e.encode() for e in toc)
        toc_bytes += R.tar_header(R.TOC_NAME_TOC, len(toc_bytes))
        self._write(toc_bytes)
        assert self._f is not None
        self._f.close()
        self._f = None
        blob_id = self._hash.hexdigest()
        path = os.path.join(self.blob_dir, blob_id)
        from erofs_tools.reader.bootstrap import BlobInfo
        self.info = BlobInfo(
            blob_id=blob_id, path=path, chunk_size=self.chunk_size, chunk_count=self.count,
            compressor=self.compressor, digester=self.digester, features=features,
            compressed_size=self._pos, uncompressed_size=self._upos,
            toc_size=len(toc_bytes), toc_digest=Sha256(toc_bytes).digest(),
            ci_compressor=ci_comp, ci_offset=ci_offset, ci_compressed_size=len(ci_stored),
            ci_uncompressed_size=len(ci_raw))
        return self.info


# --- reading (views of the reader layer's blob-meta reader) ------------------------------

def read_toc(f: BinaryIO, size: int, toc_size: int = 0) -> dict[bytes, R.TocEntry]:
    """-> {name: TocEntry} from the blob's tail, or {} if the blob has no TOC."""
    from erofs_tools.reader import blob as rblob
    toc = rblob.read_toc(rblob.file_reader(f), size, toc_size=toc_size or None)
    return {} if toc is None else dict(toc.entries)


class BlobMeta:
    """The CI table (and inlined digests, if any) of one blob file, in CI order."""

    def __init__(self, info: BlobInfo, entries: list[tuple[int, int, int, int]],
                 digests: list[bytes] | None) -> None:
        self.info = info
        self.entries = entries        # [(uoff, usize, coff, csize)]
        self.digests = digests        # [bytes32] or None

    @classmethod
    def read(cls, path: str, info: BlobInfo) -> BlobMeta:
        """Read and check CI table + digests of `path` described by blob table `info`."""
        meta = info.read_meta(path)
        chunks = sorted(meta.chunks, key=lambda c: c.index)
        entries = [(c.uncompressed_offset, c.uncompressed_size, c.compressed_offset,
                    c.compressed_size) for c in chunks]
        # digests inlined in the blob (its blob.digest section), not the bootstrap's
        digests = [c.digest for c in chunks] if meta.digest_region is not None else None
        return cls(info, entries, digests)

