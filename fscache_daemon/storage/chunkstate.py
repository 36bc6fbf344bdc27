"""The chunk-state record of one blob's cache file (`<key>.chunks`, see blobcache): a
96-byte header (magic, version, chunk count, uncompressed size, sha256 of the chunk map,
boot id) then two bitmaps of one bit per chunk index, *live* and *durable*.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import uuid

from erofs_tools.reader import coldpath

log = logging.getLogger(__name__)

STATE_MAGIC = b"FSCDCHK1"
# magic, version, chunks, uncompressed size, sha256 of the chunk map, boot id
STATE_HEADER = struct.Struct("<8sIIQ32s16s24x")
assert STATE_HEADER.size == 96
STATE_VERSION = 2



def _boot_id() -> bytes:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return uuid.UUID(f.read().strip()).bytes
    except (OSError, ValueError):
        return bytes(16)


def state_bits(path: str) -> bytes:
    """The live bitmap of a chunk-state file (for tests and tools)."""
    with open(path, "rb") as f:
        data = f.read()
    _m, _v, n, _u, _d, _b = STATE_HEADER.unpack_from(data, 0)
    nb = (n + 7) // 8
    return data[STATE_HEADER.size:STATE_HEADER.size + nb]


class ChunkState:
    """The persistent record of verified chunks of one blob: two bitmaps.

    The *live* bitmap gets a chunk's bit right after its verified data was written to
    the cache file (no fsync: both sit in the page cache, so a daemon crash loses
    neither). The *durable* bitmap is a copy of the live one taken before an fdatasync
    of the cache file and written after it (`commit`, once a second and at close), so
    every durable bit has its data on disk. The header records the boot id: after a
    reboot (when the page cache, and with it unsynced data, may have been lost) only the
    durable bitmap is trusted; within one boot the live one is.
    """

    def __init__(self, path: str, nchunks: int, usize: int, map_digest: bytes):
        self.path = path
        self.nchunks = nchunks
        self.nbytes = (nchunks + 7) // 8
        self.boot_id = _boot_id()
        self._ident = (STATE_MAGIC, STATE_VERSION, nchunks, usize, map_digest)
        self.bits = bytearray(self.nbytes)
        self.count = 0
        # True when a record existed but was made for another chunk map (or is damaged):
        # the cache file's bytes were verified against other digests, if at all
        self.mismatched = False
        # whether the file may hold set bits that a crash could bring back after a reset
        # (a new file holds none: its reset needs no fsync, ~2 per cold mount)
        self._maybe_bits = True
        self._lock = threading.Lock()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.fd = fd
        data = os.pread(fd, STATE_HEADER.size + 2 * self.nbytes, 0)
        ok = len(data) == STATE_HEADER.size + 2 * self.nbytes
        if ok:
            *ident, boot = STATE_HEADER.unpack_from(data, 0)
            ok = tuple(ident) == self._ident
        if not ok:
            if data:
                log.warning("%s: chunk state does not match the chunk map; resetting", path)
                self.mismatched = True
            self._maybe_bits = bool(data)
            self.reset()
            return
        live = data[STATE_HEADER.size:STATE_HEADER.size + self.nbytes]
        durable = data[STATE_HEADER.size + self.nbytes:]
        if boot == self.boot_id:
            self.bits[:] = live
        else:
            log.info("%s: written before the last reboot; trusting only synced chunks", path)
            self.bits[:] = durable
        if nchunks % 8 and self.bits and self.bits[-1] >> (nchunks % 8):
            log.warning("%s: stray bits past the last chunk; resetting", path)
            self.mismatched = True
            self.reset()
            return
        self.count = sum(bin(b).count("1") for b in self.bits)
        os.pwrite(fd, self._header() + bytes(self.bits), 0)

    def _header(self) -> bytes:
        return STATE_HEADER.pack(*self._ident, self.boot_id)

    def reset(self) -> None:
        with self._lock:
            self.bits[:] = bytes(self.nbytes)
            self.count = 0
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, self._header() + bytes(2 * self.nbytes), 0)
            if self._maybe_bits:
                os.fsync(self.fd)
                self._maybe_bits = False

    def has(self, i: int) -> bool:
        return bool(self.bits[i >> 3] & (1 << (i & 7)))

    def clear(self, indexes) -> None:
        with self._lock:
            for i in indexes:
                if self.has(i):
                    self.bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF
                    self.count -= 1
            snap = bytes(self.bits)
            os.pwrite(self.fd, snap + snap, STATE_HEADER.size)
            os.fsync(self.fd)

    def set(self, indexes) -> None:
        """Record chunks whose verified data is in the cache file (live bitmap)."""
        with self._lock:
            self._maybe_bits = True
            idx = list(indexes)
            if not idx:
                return
            lo = min(idx) >> 3
            hi = max(idx) >> 3
            rec = bytearray(self.bits[lo:hi + 1])
            for i in idx:
                rec[(i >> 3) - lo] |= 1 << (i & 7)
            # the record first, then the bits others read (as the C core's store does):
            # a chunk served because its bit was seen set is never missing from it
            os.pwrite(self.fd, rec, STATE_HEADER.size + lo)
            for i in idx:
                if not self.has(i):
                    self.bits[i >> 3] |= 1 << (i & 7)
                    self.count += 1

    def store_decoded(self, decoded, fd: int, size: int):
        """Write the verified chunks of a decoded range (erofs_tools.reader.coldpath)
        into the cache file open at `fd` and record them. The bytes are written without
        this record's lock (the kernel orders writes to one file); only the bits, read-
        modify-written with the record first, are set under it. Holding it through the
        write too, four workers on 2 CPUs waited ~0.2 s per cold GiB for it, behind a
        holder preempted or waiting for the GIL after its write (branch coldfill)."""
        target = coldpath.StoreTarget(fd, size, self.bits, self.nchunks, self.fd,
                                      STATE_HEADER.size)
        werr = decoded.write(target)
        with self._lock:
            self._maybe_bits = True
            res = decoded.mark(target, werr)
            self.count += res.newly
        return res

    def snapshot(self) -> bytes:
        with self._lock:
            return bytes(self.bits)

    def commit(self, snap: bytes) -> None:
        """Make `snap` (taken before the cache file's fdatasync) the durable bitmap."""
        self._maybe_bits = True
        os.pwrite(self.fd, snap, STATE_HEADER.size + self.nbytes)
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
