"""A deadline over an answer's headers.

A read timeout bounds each read only: a registry (or anything between) that sends an
answer's status line and headers a byte per read timeout held the request, and with it
a daemon's range read, the kernel's request and its reader, for hours. When a request
has a deadline (RetryPolicy.deadline: the daemon's fetches), the connection waiting for
the headers is registered here, and one thread shuts its socket down at the deadline:
the blocked read ends, the request fails (transport.Transport.request says why). Bodies
are bounded by the same deadline as they are read (transport.read_body).
"""
from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time
import weakref
from typing import Any

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

# the deadline of the request this thread is sending (Transport.request sets it), and
# whether the watchdog ended its wait for headers
_local = threading.local()


def set_deadline(until: float | None) -> float | None:
    """Headers of this thread's requests must have arrived by `until` (None: no bound);
    -> the previous value, to put back."""
    prev = getattr(_local, "until", None)
    _local.until = until
    _local.fired = False
    return prev


def fired() -> bool:
    """Whether the watchdog cut this thread's wait for headers since set_deadline."""
    return bool(getattr(_local, "fired", False))


class _Watchdog:
    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int, weakref.ref]] = []
        self._live: set[int] = set()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, until: float, sock: socket.socket) -> int:
        key = next(self._seq)
        with self._cv:
            heapq.heappush(self._heap, (until, key, weakref.ref(sock)))
            self._live.add(key)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="registry-deadlines")
                self._thread.start()
            if self._heap[0][1] == key:     # due before what the thread waits for
                self._cv.notify()
        return key

    def unwatch(self, key: int) -> bool:
        """Stop watching `key`; -> True if its deadline came first (socket shut down)."""
        with self._cv:
            if key in self._live:
                self._live.discard(key)
                return False
            return True

    def _run(self) -> None:
        with self._cv:
            while True:
                while self._heap and self._heap[0][1] not in self._live:
                    heapq.heappop(self._heap)           # answered in time
                if not self._heap:
                    self._cv.wait()
                    continue
                until, key, ref = self._heap[0]
                now = time.monotonic()
                if now < until:
                    self._cv.wait(until - now)
                    continue
                heapq.heappop(self._heap)
                self._live.discard(key)
                sock = ref()
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass


_WATCHDOG = _Watchdog()


class _Watched:
    """getresponse() (the wait for the status line and headers) under this thread's
    deadline, if it has one."""

    sock: Any

    def getresponse(self, *args: Any, **kw: Any) -> Any:
        until = getattr(_local, "until", None)
        sock = self.sock
        if until is None or sock is None:
            return super().getresponse(*args, **kw)  # type: ignore[misc]
        key = _WATCHDOG.watch(until, sock)
        try:
            return super().getresponse(*args, **kw)  # type: ignore[misc]
        finally:
            if _WATCHDOG.unwatch(key):
                _local.fired = True


class _HTTPConnection(_Watched, HTTPConnection):
    pass


class _HTTPSConnection(_Watched, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


# for PoolManager.pool_classes_by_scheme (and ProxyManager's, which shares it)
POOL_CLASSES: dict[str, type] = {"http": _HTTPPool, "https": _HTTPSPool}
