"""One lock per key (a mount point, a blob id, a snapshot id), made on first use and
forgotten when nobody holds or waits for it: so that work on one image never waits for
work on another, while two operations on the same thing still run one after the other.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Hashable, Iterator


class KeyedLock:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        # key -> [lock, threads holding or waiting for it]
        self._locks: dict[Hashable, list] = {}

    @contextlib.contextmanager
    def hold(self, key: Hashable) -> Iterator[None]:
        with self._guard:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._guard:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._locks[key]

    def busy(self, key: Hashable) -> bool:
        """Someone holds or waits for `key` now."""
        with self._guard:
            return key in self._locks

    def __len__(self) -> int:
        with self._guard:
            return len(self._locks)
