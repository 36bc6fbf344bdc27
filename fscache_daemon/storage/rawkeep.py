"""The last fetched compressed ranges of a zran blob, kept in memory.

A zran chunk is read from its access point on (docs/zran.md), so a request often starts
inside the range the one before it fetched: the next sequential window starts at the
access point before its first chunk, a demand read of a file next to one just read at
the same point. `RawKeep.read` serves the kept prefix of such a request and fetches only
the rest. The layer is immutable (named by its digest) and every chunk is still verified
after decoding; a chunk that fails verification clears the keep (`clear`), so bad bytes
are never served from here twice.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

KEEP_BYTES = 16 << 20       # per zran blob being read


class RawKeep:
    """Fetched ranges of one blob ({start: bytes}, least recently used first), at most
    `budget` bytes."""

    def __init__(self, budget: int = KEEP_BYTES) -> None:
        self.budget = budget
        self._lock = threading.Lock()
        self._segs: OrderedDict[int, bytes] = OrderedDict()
        self._bytes = 0

    def _prefix(self, off: int, length: int) -> bytes:
        best, key = b"", None
        for start, data in self._segs.items():
            if start <= off < start + len(data) and start + len(data) - off > len(best):
                best, key = data[off - start:off - start + length], start
        if key is not None:
            self._segs.move_to_end(key)
        return best

    def read(self, fetch: Callable[[int, int], bytes], off: int, length: int
             ) -> tuple[bytes, int]:
        """[off, off + length) of the blob: the kept prefix, the rest from `fetch(off,
        length)` -> (the bytes, how many of them were fetched)."""
        with self._lock:
            head = self._prefix(off, length)
        if len(head) >= length:
            return head, 0
        rest = fetch(off + len(head), length - len(head))
        raw = head + rest if head else bytes(rest)
        if len(raw) == length:
            self._add(off, raw)
        return raw, len(rest)

    def _add(self, off: int, data: bytes) -> None:
        if len(data) > self.budget:
            return
        with self._lock:
            old = self._segs.pop(off, None)
            if old is not None:
                self._bytes -= len(old)
            self._segs[off] = data
            self._bytes += len(data)
            while self._bytes > self.budget:
                self._bytes -= len(self._segs.popitem(last=False)[1])

    def clear(self) -> None:
        with self._lock:
            self._segs.clear()
            self._bytes = 0
