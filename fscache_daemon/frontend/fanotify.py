"""The fanotify pre-content front end: cache-file reads become fill(key, offset, length).

A PreContentWatcher marks sparse cache files for FAN_PRE_ACCESS. When the kernel wants to
read a range of a marked file (EROFS reading a `device=` blob file), the reader blocks and
the watcher calls fill(key, offset, length); when it returns the access is allowed, when
it raises the reader gets EIO. The watcher knows nothing of blobs or chunks.

Where the fanotify group lives is the channel's business:
  * LocalGroup: this process owns the group. Simple, but if the process dies the kernel
    allows every pending access and drops the marks, so readers of holes see zeros.
  * fdholder.HolderChannel: a separate holder process owns the group and reads its events;
    this process only answers them. Daemon death leaves readers waiting, not reading zeros.

Threading contract: one loop thread (start()) reads events and dispatches them. fill runs
in `executor` if given (so slow fetches never stall the loop), else in the loop thread.
Every event is answered exactly once, from whichever thread ran fill, and its fd closed.
mark()/unmark() may be called from any thread.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from fscache_daemon.errors import FrontendError
from fscache_daemon.frontend import fanotify_abi as abi

# shared with the fd holder; re-exported here, where callers have always found them
from fscache_daemon.frontend.fanotify_marks import (
    FILLED_BLOCK,
    FilledMap,
    FilledView,
    MarkTable,
    PendingEvent,
)

__all__ = ["PreContentWatcher", "LocalGroup", "FilledMap", "FilledView", "MarkTable",
           "PendingEvent", "FILLED_BLOCK"]

log = logging.getLogger(__name__)

# called with the key a file was marked with (any Hashable: the daemon's are str cache
# keys, and a Callable taking str is not one taking every Hashable, hence Any)
FillFn = Callable[[Any, int, int], None]
FastPathFn = Callable[[Any, int, int], bool]


class LocalGroup:
    """A fanotify group owned by this process (no crash protection: see module doc)."""

    def __init__(self):
        self.group_fd = abi.fanotify_init(
            abi.FAN_CLASS_PRE_CONTENT | abi.FAN_CLOEXEC | abi.FAN_NONBLOCK,
            os.O_RDWR | os.O_LARGEFILE)
        self._marks = MarkTable(self.group_fd)
        self._lock = threading.Lock()

    def fileno(self) -> int:
        return self.group_fd

    def receive(self) -> list[PendingEvent]:
        try:
            buf = os.read(self.group_fd, abi.READ_BUFFER_SIZE)
        except BlockingIOError:
            return []
        return [PendingEvent(e.fd, e.mask, e.pid, e.offset, e.count, e.fd)
                for e in abi.parse_events(buf)]

    def answer(self, ev: PendingEvent, response: int) -> None:
        try:
            # under the lock: after close() the group's fd number may name another file
            with self._lock:
                if self.group_fd < 0:
                    log.warning("fanotify: group closed before event fd %d was answered",
                                ev.token)
                elif not abi.write_response(self.group_fd, ev.token, response):
                    log.warning("fanotify: event fd %d was already answered", ev.token)
        finally:
            os.close(ev.fd)

    def mark(self, path: str, filled: FilledMap | None = None) -> int:
        # `filled` serves the fd holder; here the watcher's fast_path does the same job
        with self._lock:
            return self._marks.mark(path)[1]

    def unmark(self, path: str, inode: tuple[int, int] | None = None) -> None:
        with self._lock:
            self._marks.unmark(path, inode)

    def close(self) -> None:
        """Closing the group allows every pending access (fail-open): unmount first."""
        with self._lock:
            self._marks.close_all()
            if self.group_fd >= 0:
                os.close(self.group_fd)
                self.group_fd = -1


@dataclass
class _Marked:
    key: Hashable
    path: str
    size: int
    writer_fd: int
    # the marked file's (st_dev, st_ino), taken at mark time: the writer fd may be closed
    # (and its number reused) once the mark is gone, so it is never fstat'ed later
    inode: tuple[int, int] = (0, 0)


class PreContentWatcher:
    """Marks cache files and turns their pre-content events into fill() calls.

    fill(key, offset, length) must make [offset, offset+length) of the cache file hold the
    real data (write through writer_fd(key)) or raise; the range is page-aligned by the
    kernel and clamped here to the file size recorded at mark time. fast_path(key, offset,
    length) -> bool, if given, runs in the loop thread and answers "allow" at once when it
    returns True (ranges already cached); keep it cheap and non-blocking.
    """

    def __init__(self, fill: FillFn, *, executor: Executor | None = None,
                 fast_path: FastPathFn | None = None, channel=None):
        self._fill = fill
        self._executor = executor
        self._fast_path = fast_path
        self._channel = channel if channel is not None else LocalGroup()
        self._by_inode: dict[tuple[int, int], _Marked] = {}
        self._by_key: dict[Hashable, _Marked] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.overflowed = False
        self.stats = {"events": 0, "fast": 0, "filled": 0, "denied": 0}
        self._stats_lock = threading.Lock()

    def _count(self, name: str) -> None:
        with self._stats_lock:
            self.stats[name] += 1

    @classmethod
    def from_holder(cls, sock_path: str | os.PathLike, fill: FillFn,
                    **kwargs) -> PreContentWatcher:
        """A watcher whose group lives in the fd holder at sock_path (crash-safe)."""
        from fscache_daemon.frontend.fdholder import HolderChannel
        return cls(fill, channel=HolderChannel(os.fspath(sock_path)), **kwargs)

    # -- marks -------------------------------------------------------------------------

    def mark(self, path: str | os.PathLike, key: Hashable,
             filled: FilledMap | None = None) -> int:
        """Mark a cache file; returns an fd for writing fills (owned by the watcher).

        Mark every cache file before mounting: EROFS opens its device files at mount time
        and an open file that saw no pre-content mark never raises events. `filled` (the
        file's FilledMap, owned by the caller) lets an fd holder allow events on filled
        ranges itself; marking again replaces it.
        """
        path = os.path.abspath(os.fspath(path))
        wfd = self._channel.mark(path, filled=filled)
        st = os.fstat(wfd)
        inode = (st.st_dev, st.st_ino)
        m = _Marked(key, path, st.st_size, wfd, inode)
        with self._lock:
            old = self._by_key.get(key)
            if old is not None and old.inode != inode:
                # the key now names another file (replaced at its path): events on the old
                # inode must not be "filled" through the new file; they get EIO instead
                if self._by_inode.get(old.inode) is old:
                    self._by_inode.pop(old.inode, None)
                log.warning("fanotify: key %r moved to a new file; the old one stays marked "
                            "and its reads fail with EIO", key)
            self._by_inode[(st.st_dev, st.st_ino)] = m
            self._by_key[key] = m
        log.info("fanotify: marked %s (key %r, %d bytes)", path, key, st.st_size)
        return wfd

    def unmark(self, key: Hashable) -> None:
        """Remove the mark once the cache file is complete: later reads stay in the kernel."""
        with self._lock:
            m = self._by_key.pop(key, None)
            if m is None:
                raise FrontendError(f"fanotify: key {key!r} is not marked")
            inode = m.inode
            if self._by_inode.get(inode) is m:
                self._by_inode.pop(inode, None)
        self._channel.unmark(m.path, inode)
        log.info("fanotify: unmarked %s (key %r)", m.path, key)

    def writer_fd(self, key: Hashable) -> int:
        with self._lock:
            return self._by_key[key].writer_fd

    @property
    def group_fd(self) -> int:
        return self._channel.group_fd

    @property
    def channel(self):
        """The LocalGroup or HolderChannel this watcher reads and answers through."""
        return self._channel

    @property
    def running(self) -> bool:
        """False once the loop thread ended (stop(), or the event channel broke: then a
        supervisor should build a new watcher on the holder and re-mark)."""
        return self._thread is not None and self._thread.is_alive()

    # -- event loop --------------------------------------------------------------------

    def start(self) -> PreContentWatcher:
        self._thread = threading.Thread(target=self.run, name="fanotify-loop", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """The loop; returns after stop(). Only one thread may run it."""
        poller = select.poll()
        try:
            poller.register(self._channel.fileno(), select.POLLIN)
        except FrontendError as exc:  # e.g. the holder refused our subscription
            log.critical("fanotify: no event channel: %s", exc)
            self._stopping = True
            return
        poller.register(self._wake_r, select.POLLIN)
        while not self._stopping:
            for fd, revents in poller.poll():
                if fd == self._wake_r:
                    continue
                if revents & (select.POLLHUP | select.POLLERR) and not revents & select.POLLIN:
                    log.critical("fanotify: event channel closed; no more events")
                    self._stopping = True
                    break
                try:
                    events = self._channel.receive()
                except FrontendError as exc:
                    # without events readers would wait forever on this daemon; say so
                    log.critical("fanotify: event channel broken: %s", exc)
                    self._stopping = True
                    break
                for ev in events:
                    self._dispatch(ev)

    def stop(self) -> None:
        """Stop the loop thread. Events already dispatched are still answered by fill."""
        self._stopping = True
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass  # already woken
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def close(self) -> None:
        """Stop and release the channel. With a LocalGroup this fails open: unmount first."""
        if self._wake_w < 0:
            return  # already closed
        self.stop()
        self._channel.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._wake_r = self._wake_w = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- per event ---------------------------------------------------------------------

    def _dispatch(self, ev: PendingEvent) -> None:
        self._count("events")
        if ev.mask & abi.FAN_Q_OVERFLOW or ev.fd < 0:
            # lost events cannot be answered; flag it loudly for the daemon's health checks
            self.overflowed = True
            log.critical("fanotify: event queue overflow (mask %#x); events were lost", ev.mask)
            return
        try:
            req = self._map(ev)
        except Exception:  # noqa: BLE001 - an unmappable event must still be answered
            log.exception("fanotify: cannot map event on fd %d", ev.fd)
            req = None
        if req is None:
            self._answer(ev, abi.RESPONSE_EIO)
            return
        key, off, length = req
        if length == 0:
            self._answer(ev, abi.FAN_ALLOW)
            return
        if self._fast_path is not None:
            try:
                if self._fast_path(key, off, length):
                    self._count("fast")
                    self._answer(ev, abi.FAN_ALLOW)
                    return
            except Exception:  # noqa: BLE001 - fall back to the slow path
                log.exception("fanotify: fast path failed for %r", key)
        if self._executor is None:
            self._serve(ev, key, off, length)
            return
        try:
            self._executor.submit(self._serve, ev, key, off, length)
        except RuntimeError as exc:  # executor shut down: the event must still be answered
            log.error("fanotify: cannot queue fill for %r: %s; denying", key, exc)
            self._count("denied")
            self._answer(ev, abi.RESPONSE_EIO)

    def _map(self, ev: PendingEvent) -> tuple[Hashable, int, int] | None:
        st = os.fstat(ev.fd)
        with self._lock:
            m = self._by_inode.get((st.st_dev, st.st_ino))
        if m is None:
            log.error("fanotify: event on unknown inode %d:%d (pid %d); denying",
                      st.st_dev, st.st_ino, ev.pid)
            return None
        if ev.offset is None or ev.count is None:
            log.error("fanotify: event without range on %s (pid %d); denying", m.path, ev.pid)
            return None
        start = min(ev.offset, m.size)
        end = min(ev.offset + ev.count, m.size)
        return m.key, start, end - start

    def _serve(self, ev: PendingEvent, key: Hashable, off: int, length: int) -> None:
        try:
            self._fill(key, off, length)
        except Exception as exc:  # noqa: BLE001 - any failure becomes EIO for this reader
            self._count("denied")
            log.warning("fanotify: fill(%r, %d, %d) failed: %s; reader gets EIO",
                        key, off, length, exc)
            response = abi.RESPONSE_EIO
        else:
            self._count("filled")
            response = abi.FAN_ALLOW
        self._answer(ev, response)

    def _answer(self, ev: PendingEvent, response: int) -> None:
        try:
            self._channel.answer(ev, response)
        except (OSError, FrontendError) as exc:
            if getattr(exc, "errno", None) == errno.EBADF or self._stopping:
                log.warning("fanotify: could not answer event %d: %s", ev.token, exc)
            else:
                log.error("fanotify: could not answer event %d: %s", ev.token, exc)
