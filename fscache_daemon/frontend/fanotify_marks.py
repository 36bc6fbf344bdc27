"""What the fanotify front end and the fd holder share: the pending-event record, the
shared "filled" bitmap (FilledMap, the daemon's side; FilledView, the holder's), and the
table of marked cache files. Both fanotify.py and fdholder.py import this module, never
each other at import time."""

from __future__ import annotations

import collections.abc
import fcntl
import itertools
import json
import mmap
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass

from erofs_tools.reader import fanhold
from fscache_daemon.errors import FrontendError, HolderError
from fscache_daemon.frontend import fanotify_abi as abi

# ------------------------------------------------ the fd holder's messages (fdholder.py)

MAX_MSG = 64 * 1024


def send_msg(sock: socket.socket, obj: dict, fds: collections.abc.Sequence[int] = ()) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def recv_msg(sock: socket.socket, maxfds: int = 0) -> tuple[dict | None, list[int]]:
    """One message; (None, []) at EOF (BlockingIOError on an empty non-blocking socket).

    Received fds belong to the caller.
    """
    if maxfds:
        data, fds, flags, _ = socket.recv_fds(sock, MAX_MSG, maxfds)
    else:
        data, fds, flags = sock.recv(MAX_MSG), [], 0
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise HolderError("fd holder: message or fds truncated")
    try:
        return json.loads(data), fds
    except ValueError as exc:
        for fd in fds:
            os.close(fd)
        raise HolderError(f"fd holder: bad message: {exc}") from exc


@dataclass(frozen=True)
class PendingEvent:
    """An unanswered pre-content event as a channel hands it to the watcher.

    `fd` is open in this process on the marked file (fstat, or pwrite: it is opened with
    notifications suppressed). `token` is what the channel needs to answer it.
    """
    fd: int
    mask: int
    pid: int
    offset: int | None
    count: int | None
    token: int


# ---------------------------------------------------------------- shared "filled" bitmap

FILLED_BLOCK = 4096


# the holder's poll loop in C (FastAllow.serve): select.poll's calls, its statuses
PollSet = fanhold.PollSet
SERVE_READY = fanhold.SERVE_READY

def _covers(mm, nblocks: int, start: int, end: int) -> bool:
    """Every block of [start, end) (end > start) has its bit set in `mm`."""
    first, last = start // FILLED_BLOCK, (end - 1) // FILLED_BLOCK
    if last >= nblocks:
        return False
    b0 = first >> 3
    val = int.from_bytes(mm[b0:(last >> 3) + 1], "little")
    need = ((1 << (last - first + 1)) - 1) << (first & 7)
    return val & need == need


def _set_bits(mm, nblocks: int, offset: int, length: int) -> None:
    """Set the bit of every block touched by [offset, offset+length) (length > 0)."""
    i = offset // FILLED_BLOCK
    end = min(nblocks, -(-(offset + length) // FILLED_BLOCK))
    while i < end and i & 7:
        mm[i >> 3] |= 1 << (i & 7)
        i += 1
    full = (end - i) >> 3
    if full > 0:
        mm[i >> 3:(i >> 3) + full] = b"\xff" * full
        i += full << 3
    while i < end:
        mm[i >> 3] |= 1 << (i & 7)
        i += 1


class FilledMap:
    """The daemon's side of a cache file's "filled" bitmap, shared with the fd holder.

    One bit per 4 KiB block of the cache file (bit `i & 7` of byte `i >> 3`), in a sealed
    memfd (its size can never change, so the holder's mapping can never fault) mapped
    MAP_SHARED by the daemon (read-write) and the holder (read-only). The holder allows an
    event whose every block is set without asking the daemon.

    Rules that make that safe: a bit is set only after the block's verified data was
    written into the cache file (the pwrite returned: the data is in the page cache), and
    bits are never cleared while the holder maps the file. A stale read by the holder can
    only miss a bit (the event is forwarded), never see one early. Blocks are set whole:
    the caller guarantees no unfilled data shares a block it sets (RAFS chunks start 4 KiB
    aligned and never overlap, so a chunk's last partial block holds only its padding).
    Stores rely on the CPU making the cache-file data visible before the later bit store
    (x86-64 TSO; see docs/fanotify.md).
    """

    def __init__(self, size: int, inode: tuple[int, int] | None = None,
                 name: str = "fscache-filled"):
        self.size = size
        self.inode = inode
        self.nblocks = -(-size // FILLED_BLOCK)
        nbytes = max(1, -(-self.nblocks // 8))
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, nbytes)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self._mm: mmap.mmap | None = mmap.mmap(self.fd, nbytes)
        except BaseException:
            os.close(self.fd)
            raise
        self._lock = threading.Lock()  # bytes are read-modify-written

    @classmethod
    def for_file(cls, fd: int) -> FilledMap:
        """A map (all blocks unfilled) for the file open at `fd`: its size and inode."""
        st = os.fstat(fd)
        return cls(st.st_size, (st.st_dev, st.st_ino))

    def set_range(self, offset: int, length: int) -> None:
        """Record every block touched by [offset, offset+length) as filled. Call only
        after that data, verified, was written into the cache file."""
        if length <= 0:
            return
        with self._lock:
            if self._mm is not None:
                _set_bits(self._mm, self.nblocks, offset, length)

    def covers(self, offset: int, length: int) -> bool:
        end = min(offset + length, self.size)
        with self._lock:
            return (self._mm is not None and end > offset
                    and _covers(self._mm, self.nblocks, offset, end))

    def close(self) -> None:
        with self._lock:
            if self._mm is not None:
                self._mm.close()
                self._mm = None
                os.close(self.fd)
                self.fd = -1


class FilledView:
    """The holder's read-only mapping of a FilledMap, for one marked file of `size` bytes.

    Takes ownership of `fd` (closed here). Refuses a memfd that is too small or whose size
    is not sealed: a mapping that could shrink under the holder would kill it with SIGBUS,
    and a dead holder fails open.
    """

    def __init__(self, fd: int, size: int):
        try:
            self.size = size
            self.nblocks = -(-size // FILLED_BLOCK)
            nbytes = max(1, -(-self.nblocks // 8))
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError as exc:
                raise FrontendError(f"filled map: not a sealable memfd ({exc.strerror})") \
                    from exc
            if not seals & fcntl.F_SEAL_SHRINK:
                raise FrontendError("filled map: size not sealed against shrinking")
            if os.fstat(fd).st_size < nbytes:
                raise FrontendError(f"filled map: {os.fstat(fd).st_size} bytes, "
                                    f"{nbytes} needed for {size} bytes")
            self._mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        # the bitmap for the C fast path (FastAllow), released before the unmap; the
        # generation tells FastAllow's table apart from one of a closed view
        self.ptr = fanhold.pin(self._mm)
        self.gen = next(_VIEW_GEN)
        # first accesses the holder answers itself, for the daemon's access traces
        self.touches = TouchLog(size)

    def covers(self, offset: int, count: int) -> bool:
        """The range (clamped to the file size) is non-empty and every block is filled."""
        start, end = min(offset, self.size), min(offset + count, self.size)
        return end > start and _covers(self._mm, self.nblocks, start, end)

    def close(self) -> None:
        fanhold.unpin(self.ptr)
        self._mm.close()

    @staticmethod
    def touches_reply(views: dict, msg: dict) -> dict:
        """The holder's answer to {"op": "touches", "inode": [dev, ino], "since": N}:
        `views` maps inodes to (FilledView, connection)."""
        inode = msg.get("inode")
        item = views.get(tuple(inode)) if isinstance(inode, list) else None
        if item is None:
            return {"ok": False, "error": f"no filled map for inode {inode!r}"}
        since = msg.get("since", 0)
        log = item[0].touches
        reply = log.page(since if isinstance(since, int) else 0)
        if msg.get("rearm") and reply["next"] == len(log):
            log.rearm()     # every record handed out: the next touch of a block is new
        return reply


_VIEW_GEN = itertools.count(1)


class FastAllow:
    """The holder's answers from the filled bitmaps in the C core (csrc/fanhold.c): the
    events of one read of the group whose ranges are filled are allowed and their fds
    closed in one call, then their first accesses noted. On a cold sequential read
    that is nearly every event (6,232 of 6,320 per GiB), each holding its reader until
    answered; the Python loop spent ~30 us per event (0.19 s of CPU per cold GiB)."""

    def __init__(self) -> None:
        # a read of READ_BUFFER_SIZE bytes holds at most this many events
        self._c = fanhold.FilledAnswerer(abi.READ_BUFFER_SIZE // abi.METADATA_LEN + 1)
        self._key: tuple = ()
        self._views: list[FilledView] = []

    def run(self, group_fd: int, buf, filled: dict) -> tuple[int, int] | None:
        """Answer the filled events of `buf`; (allowed, events in buf), or None if the
        stream is malformed (nothing answered: the caller's parser reports it).
        `filled`: inode -> (FilledView, connection), the holder's maps."""
        self.sync_maps(filled)
        return self._c.allow(group_fd, buf)     # first touches noted in C

    def sync_maps(self, filled: dict) -> None:
        key = tuple((v.gen, v.touches.area.gen) for v, _ in filled.values())
        if key != self._key:    # maps added or dropped: a table of the live ones
            items = [(inode, v) for inode, (v, _) in filled.items()]
            self._c.set_maps([(i[0], i[1], v.size, v.nblocks, v.ptr, v.touches.area)
                              for i, v in items])
            self._key, self._views = key, [v for _, v in items]

    def serve(self, group_fd: int, fds: fanhold.PollSet, timeout_ms: int, buf,
              filled: dict) -> tuple[int, int, int, int]:
        """Poll `fds` with the filled events of the group answered in C meanwhile
        (FilledAnswerer.serve; an unanswered one's read left in buf) and their first
        accesses noted: (status, bytes of buf read, events in them, events answered)."""
        self.sync_maps(filled)
        r, used, nev = self._c.serve(group_fd, fds, timeout_ms, buf)
        return r, used, nev, self._c.nlog()     # first touches noted in C

    def done(self, i: int) -> bool:
        """Whether event i of the last buffer was answered here (its fd closed)."""
        return self._c.done(i)


class TouchLog:
    """First accesses of one marked file that the fd holder allowed from the filled
    bitmap: the daemon never sees those events, but its access traces (trace.py) must
    list them. Kept by the holder, read by the daemon with the `touches` request.

    Cost per allowed event: one bitmap test (the common case, a block read again after
    the page cache dropped it, stops there); a first access also sets its bits and
    appends one record. Memory is bounded by the file: a record is appended only when
    at least one block is touched for the first time, so at most one per 4 KiB block
    (16 bytes each), plus one bit per block.
    """

    # records per `touches` reply: each is ~30 bytes of JSON, replies must stay well
    # below the holder's 64 KiB message size
    PAGE = 1024

    def __init__(self, size: int):
        self.size = size
        self.nblocks = -(-size // FILLED_BLOCK)
        # the seen bits and the records (first block << 24 | block count, CLOCK_MONOTONIC
        # in ns), where the holder's C fast path appends too (FastAllow: the events it
        # answers; note() here for the rest)
        self.area = fanhold.TouchArea(self.nblocks)
        self._seen = self.area.seen
        self._log = self.area.log

    def __len__(self) -> int:
        return self.area.count[0]

    def note(self, offset: int, count: int, when: int | None = None) -> None:
        """A touch of [offset, offset+count) at `when` (CLOCK_MONOTONIC ns; now)."""
        start, end = min(offset, self.size), min(offset + count, self.size)
        if end <= start or _covers(self._seen, self.nblocks, start, end):
            return
        _set_bits(self._seen, self.nblocks, start, end - start)
        first = start // FILLED_BLOCK
        n = min((end - 1) // FILLED_BLOCK - first + 1, (1 << 24) - 1)
        k = self.area.count[0]
        if k >= self.area.cap:      # not reached: rearm() makes room for nblocks more
            return
        self._log[2 * k] = first << 24 | n
        self._log[2 * k + 1] = time.monotonic_ns() if when is None else when
        self.area.count[0] = k + 1

    def rearm(self) -> None:
        """Record every block's next touch again (another image now reads this file);
        the records so far stay. (Cleared in place: the C core holds the buffer.)"""
        k = self.area.count[0]
        if self.area.cap - k <= self.nblocks:     # room for every block's next touch
            self.area = fanhold.TouchArea(self.nblocks, k, self.area)
            self._seen, self._log = self.area.seen, self.area.log
        else:
            self._seen[:] = bytes(len(self._seen))

    def page(self, since: int) -> dict:
        """Records from index `since` on, at most PAGE of them: {"records": [[offset,
        length, monotonic ns]], "next": index after the last one}."""
        since = max(0, min(int(since), len(self)))
        stop = min(len(self), since + self.PAGE)
        recs = []
        for i in range(since, stop):
            packed, t = self._log[2 * i], self._log[2 * i + 1]
            recs.append([(packed >> 24) * FILLED_BLOCK, (packed & 0xFFFFFF) * FILLED_BLOCK,
                         t])
        return {"ok": True, "records": recs, "next": stop}


class MarkTable:
    """Marked cache files, by inode, each with a writer fd opened before its mark.

    Keyed by inode, not path: a cache file replaced at the same path is a new file that
    needs its own mark, while the old inode may still back a mount and keeps its mark.
    Not thread-safe; callers lock.
    """

    def __init__(self, group_fd: int):
        self.group_fd = group_fd
        self._marks: dict[tuple[int, int], tuple[str, int]] = {}  # inode -> (path, wfd)

    def __len__(self) -> int:
        return len(self._marks)

    def paths(self) -> list[str]:
        return sorted(p for p, _ in self._marks.values())

    def mark(self, path: str) -> tuple[bool, int]:
        """(newly marked?, writer fd). The writer fd stays owned by the table."""
        path = os.path.abspath(path)
        try:
            st = os.stat(path)
            known = self._marks.get((st.st_dev, st.st_ino))
        except FileNotFoundError:
            known = None
        if known is not None:
            self._marks[(st.st_dev, st.st_ino)] = (path, known[1])
            return False, known[1]
        # opened *before* marking: an fd opened after the mark would raise events on its
        # own writes, and a fill could wait on itself
        wfd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            abi.mark_pre_access(self.group_fd, wfd, path)  # by fd: exactly this inode
        except BaseException:
            os.close(wfd)
            raise
        st = os.fstat(wfd)
        self._marks[(st.st_dev, st.st_ino)] = (path, wfd)
        return True, wfd

    def unmark(self, path: str, inode: tuple[int, int] | None = None) -> tuple[int, int]:
        """Unmark `inode` if given and marked; else the file at path; else (replaced or
        deleted) the one last marked under path. Returns the inode unmarked."""
        path = os.path.abspath(path)
        key = inode if inode in self._marks else None
        if key is None:
            try:
                st = os.stat(path)
                if (st.st_dev, st.st_ino) in self._marks:
                    key = (st.st_dev, st.st_ino)
            except FileNotFoundError:
                pass
        if key is None:
            keys = [k for k, (p, _) in self._marks.items() if p == path]
            if not keys:
                raise FrontendError(f"{path}: not marked")
            key = keys[-1]
        _, wfd = self._marks[key]
        abi.unmark_pre_access(self.group_fd, wfd, path)
        del self._marks[key]
        os.close(wfd)
        return key

    def release_unused(self, keep: collections.abc.Container) -> list[tuple[tuple[int, int], str]]:
        """Unmark every file whose inode is not in `keep` and that nothing but our writer
        fd has open: [(inode, path)] unmarked.

        The kernel says whether a file is in use: a write lease (F_SETLEASE) is granted
        only while the inode has no open file but the one asking (fs/locks.c counts every
        open for reading and for writing, whoever made it). An EROFS superblock holds its
        device files open from mount to its last user's exit, in any mount namespace,
        lazily detached or under an overlay; so does an event waiting for its answer (its
        fd). A file nobody has open has no reader that could see its holes as zeros, and
        a later mount opens it again only after marking it (before the mount: a file
        opened before its mark raises no events). The lease is held over the unmark: an
        open meanwhile waits for it, and so finds the file unmarked.

        Taking a lease makes us the target of a lease-break signal (SIGIO, whose default
        action ends the process: a holder ended fails open), so this does nothing unless
        SIGIO is ignored (the holder's serve())."""
        done: list[tuple[tuple[int, int], str]] = []
        if signal.getsignal(signal.SIGIO) is not signal.SIG_IGN:
            return done
        for inode, (path, wfd) in list(self._marks.items()):
            if inode in keep:
                continue
            try:
                fcntl.fcntl(wfd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
            except OSError:
                continue        # in use (EAGAIN), or no leases here: kept
            try:
                abi.unmark_pre_access(self.group_fd, wfd, path)
            except (FrontendError, OSError):
                fcntl.fcntl(wfd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
                continue
            del self._marks[inode]
            os.close(wfd)       # with the lease
            done.append((inode, path))
        return done

    def close_all(self) -> None:
        for _, wfd in self._marks.values():
            os.close(wfd)
        self._marks.clear()
