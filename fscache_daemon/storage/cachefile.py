"""The cache file and the chunk-state record of one blob under one cache key (BlobCache;
blobcache.py's BlobManager fills it), and their paths in the cache directory.

The cache file's descriptors are closed when its last writer is gone: a fill still
running when the blob is released (a fetch that outlived its mount: a hung registry, a
readahead task) finds the cache closed and stores nothing, instead of writing through a
descriptor number closed, and maybe reused for another file, meanwhile.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import threading
from collections.abc import Iterator

from erofs_tools.errors import CorruptImageError
from erofs_tools.reader import blob as rblob

from . import StorageError
from .chunkmap import key_blob_id
from .chunkstate import ChunkState

log = logging.getLogger(__name__)


class ReleasedError(StorageError):
    """The cache file was closed (its blob released) before this write or read."""


def cache_path(directory: str, key: str) -> str:
    """The cache file of a cache key (a blob id, or a variant: chunkmap.variant_key)."""
    return os.path.join(directory, key + ".blob")


def state_path(directory: str, key: str) -> str:
    return os.path.join(directory, key + ".chunks")


class BlobCache:
    """The cache file and chunk state of one blob under one cache key (default: the
    blob id; a variant key for a disagreeing chunk table)."""

    def __init__(self, directory: str, meta, *, durable: bool = True, key: str | None = None):
        self.directory = directory
        self.meta = meta
        self.blob_id = meta.blob_id
        self.key = key or meta.blob_id
        if key_blob_id(self.key) != self.blob_id:
            raise StorageError(f"cache key {self.key!r} is not one of blob {self.blob_id}")
        self.size = meta.uncompressed_size
        self.durable = durable
        self.path = cache_path(directory, self.key)
        # BlobMeta's checks (or the C core's, for a map made from pins) leave the indexes
        # exactly 0..n-1: no look at the chunks (made after a cold mount, not in it)
        nchunks = meta.chunk_count
        self.nchunks = nchunks
        self.total_chunks = nchunks
        digest = hashlib.sha256(meta.to_bytes()).digest()
        os.makedirs(directory, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StorageError(f"{self.path}: cannot open cache file: {e.strerror}") from None
        self._own_fd = fd
        self.write_fd = fd
        # writes and reads in progress (_use): close() and a write_fd swap wait for them
        self._users = threading.Condition(threading.Lock())
        self._using = 0
        self._closed = False
        self._store_listeners: list = []
        st = os.fstat(fd)
        # The daemon writes a chunk's data before its bit, and the record last of all at
        # close; a cache file modified after the record was (by anything but us, or by a
        # daemon killed between a write and its bit) gets its cached chunks re-verified.
        # The ctime too: a writer can set the mtime back (`touch -d`), not the ctime.
        try:
            written_after = max(st.st_mtime_ns, st.st_ctime_ns) > \
                os.stat(state_path(directory, self.key)).st_mtime_ns
        except FileNotFoundError:
            written_after = False
        self.state = ChunkState(state_path(directory, self.key), nchunks, self.size, digest)
        if st.st_size != self.size or (self.state.mismatched and st.st_blocks):
            if st.st_size:
                log.warning("%s: cache file is %d bytes for a blob of %d, or was filled for "
                            "another chunk map; resetting (emptied)",
                            self.path, st.st_size, self.size)
            self.state.reset()
            self._empty_cache_file()
        elif self.state.count:
            self._check_present()
        # Verification reads the file: at a restart under the fanotify front end the file
        # is still marked (the fd holder kept the mark), and a read through a descriptor
        # opened after the mark waits for this very daemon, not yet listening: it hangs.
        # So it waits for the front end's writer fd (opened before the mark, it raises no
        # events: use_write_fd) or for verify_now() when the front end has none.
        self._verify_pending = bool(written_after and self.state.count)

    def _empty_cache_file(self) -> None:
        """Drop every byte of the cache file, in place. In place, not a new file: a mount
        that still has this file open (the kernel opened it at mount time) must go on
        reading the file the daemon fills; with every bit clear, each of its reads is
        fetched and verified again before it is served."""
        os.ftruncate(self._own_fd, 0)
        os.ftruncate(self._own_fd, self.size)

    def _check_present(self) -> None:
        """Clear bits whose chunk start is a hole in the cache file (a record that
        outlived its data, e.g. a cache file replaced behind our back)."""
        bad = []
        for c in self.meta.chunks:
            if not self.state.has(c.index):
                continue
            try:
                pos = os.lseek(self._own_fd, c.uncompressed_offset, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                pos = -1
            if pos != c.uncompressed_offset:
                bad.append(c.index)
        if bad:
            log.warning("%s: %d chunks recorded as cached are holes; refetching them",
                        self.path, len(bad))
            self.state.clear(bad)

    def verify_now(self) -> None:
        """Run the verification the constructor deferred (see there), reading through
        write_fd; a no-op once done. Call before the cached chunks are served or
        published."""
        if self._verify_pending:
            self._verify_pending = False
            self._verify_cached(self.write_fd)

    def _verify_cached(self, fd: int) -> None:
        """Check the digest of every chunk recorded as cached; clear the bad ones."""
        bad = []
        for c in self.meta.chunks:
            if not self.state.has(c.index) or c.digest is None:
                continue
            data = os.pread(fd, c.uncompressed_size, c.uncompressed_offset)
            try:
                rblob.decode_chunk(self.meta, c._replace(
                    compressed=False, compressed_size=c.uncompressed_size), data)
            except CorruptImageError:
                bad.append(c.index)
        log.warning("%s: modified after its chunk record; %d of %d cached chunks fail "
                    "verification and will be refetched", self.path, len(bad),
                    self.state.count)
        if bad:
            self.state.clear(bad)

    # -- queries ---------------------------------------------------------------------
    def has(self, chunk) -> bool:
        return self.state.has(chunk.index)

    @property
    def cached_chunks(self) -> int:
        return self.state.count

    def complete(self) -> bool:
        return self.state.count >= self.total_chunks

    # -- writes ----------------------------------------------------------------------
    def fileno(self) -> int:
        """Our own descriptor of the cache file (for fstat; writes go through write_fd)."""
        return self._own_fd

    def add_store_listener(self, fn) -> None:
        """Call fn(chunks) after chunks' verified data was written and recorded (e.g. a
        front end publishing filled ranges). fn must be quick and must not raise."""
        self._store_listeners.append(fn)

    def remove_store_listener(self, fn) -> None:
        try:
            self._store_listeners.remove(fn)
        except ValueError:
            pass

    @contextlib.contextmanager
    def _use(self) -> Iterator[int]:
        """write_fd for one write or read: neither closed nor swapped before it ends
        (ReleasedError once closed)."""
        with self._users:
            if self._closed:
                raise ReleasedError(f"{self.path}: the blob was released")
            self._using += 1
            fd = self.write_fd
        try:
            yield fd
        finally:
            with self._users:
                self._using -= 1
                if not self._using:
                    self._users.notify_all()

    def _idle(self) -> None:
        """Wait for the writes and reads in progress (self._users held)."""
        while self._using:
            self._users.wait()

    def pread(self, length: int, offset: int) -> bytes:
        """Bytes of the cache file (ReleasedError once the blob was released)."""
        with self._use() as fd:
            return os.pread(fd, length, offset)

    def use_write_fd(self, fd: int | None) -> None:
        """Write through `fd` instead of our own descriptor (a front end may need writes
        to go through an fd that raises no fanotify events); None restores ours. Returns
        once no write goes through the one before (its owner may close it then)."""
        with self._users:
            self._idle()
            self.write_fd = self._own_fd if fd is None else fd
        self.verify_now()

    def store(self, pieces) -> None:
        """Write verified `(chunk, data)` pieces at their uncompressed offsets, then record
        the chunks as cached (live bitmap; `sync_state` makes them durable)."""
        if not pieces:
            return
        for chunk, data in pieces:
            if len(data) != chunk.uncompressed_size or \
                    chunk.uncompressed_offset + len(data) > self.size:
                raise StorageError(f"blob {self.blob_id}: chunk {chunk.index} does not fit "
                                   f"the cache file")
        with self._use() as fd:
            for chunk, data in pieces:
                view = memoryview(data)
                off = chunk.uncompressed_offset
                while view:
                    n = os.pwrite(fd, view, off)
                    view = view[n:]
                    off += n
            self.state.set([c.index for c, _ in pieces])
        for fn in list(self._store_listeners):
            try:
                fn([c for c, _ in pieces])
            except Exception:  # noqa: BLE001 - the data is stored; a listener only lags
                log.exception("%s: store listener failed", self.path)

    def store_range(self, decoded):
        """Write a decoded range's verified chunks (erofs_tools.reader.coldpath
        .decode_range) and record them, as store() does, in one C call; returns its
        StoreResult (chunks stored; chunks failed, with why)."""
        with self._use() as fd:
            res = self.state.store_decoded(decoded, fd, self.size)
        if res.stored:
            for fn in list(self._store_listeners):
                try:
                    fn(res.stored)
                except Exception:  # noqa: BLE001 - the data is stored; a listener only lags
                    log.exception("%s: store listener failed", self.path)
        return res

    def sync_state(self) -> None:
        """fdatasync the cache file, then record what it holds as durable."""
        snap = self.state.snapshot()
        if self.durable:
            os.fdatasync(self._own_fd)
        self.state.commit(snap)

    def close(self) -> None:
        """Close the cache file and its record once no write or read is in progress
        (those are short: a fill's fetch is not one), and refuse later ones: a number
        closed here may be reused for another file at once."""
        with self._users:
            self._closed = True
            self._idle()
        if self._own_fd >= 0 and self.state.fd >= 0:
            try:
                self.sync_state()
            except OSError as e:
                log.warning("%s: final sync failed: %s", self.path, e)
        self.state.close()
        if self._own_fd >= 0:
            os.close(self._own_fd)
            self._own_fd = -1
