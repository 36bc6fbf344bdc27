"""How a mount opens its blobs: their checks started before the bootstrap is copied and
parsed, and the blobs opened side by side.

A cold mount checks each blob whose chunk map it makes from the bootstrap's pins by
reading the blob's last byte (storage.chunkmap.last_byte_check: a missing or short blob
fails the mount, not later reads). That read is a registry round trip, and it used to
start only once the bootstrap was copied, parsed and its pins decoded: ~30-200 ms of a
cold mount on a busy machine spent waiting after the rest was done. Here the blob table
is read from the user's bootstrap at once (its superblock and blob table: ~0.2 ms) and
the checks run on threads of their own beside the copy, the parse and the pins; the
mount then waits for the check of the same blob id and size (chunkmap._fetch_meta's
`early`). A bootstrap changed between the two reads simply finds no matching check and
checks again; the check's result is the same read through the same backend, so what it
proves (and when the mount waits for it: before the blob's cache is shared and before
the kernel mount) is unchanged.

A blob whose map comes from its own table (the pins do not cover it) needs no check:
its early check is one extra one-byte read, on a thread nobody waits for.

The blobs of one image are opened side by side (open_side_by_side): an image whose maps
come from the blobs' own tables (an optimized image's original blobs: 5 range requests
each) waited for one blob's requests after another's, ~0.7 s of the ML cold start's
mount on a busy machine.
"""
from __future__ import annotations

import _thread
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from erofs_tools.reader.image import open_image
from erofs_tools.reader.zran import is_zran_entry
from fscache_daemon.storage.chunkmap import last_byte_check

log = logging.getLogger(__name__)

MAX_EARLY = 64      # blobs checked early per mount (a hostile table lists thousands)
OPEN_WIDTH = 8      # blobs of one mount opened at once


def peek_blobs(bootstrap: str) -> list[tuple[str, int, Any]]:
    """(blob id, stored size, blob-table entry) of each blob in the bootstrap's blob
    table; [] for anything that is not a readable RAFS v6 bootstrap (the mount names the
    problem itself)."""
    try:
        img = open_image(bootstrap)
    except Exception:  # noqa: BLE001 - load_image reports it
        return []
    try:
        if not img.is_rafs:
            return []
        out = []
        for i, e in enumerate(img.blob_entries[:MAX_EARLY]):
            blob_id = img.blob_id(i + 1)
            if len(blob_id) == 64 and e.compressed_size > 0:
                out.append((blob_id, int(e.compressed_size), e))
        return out
    except Exception:  # noqa: BLE001 - as above
        return []
    finally:
        img.close()


class _Check:
    def __init__(self) -> None:
        self._done = threading.Event()
        self._error: BaseException | None = None

    def run(self, backend, blob_id: str, end: int, release: Callable[[], None]) -> None:
        try:
            last_byte_check(backend, blob_id, end)
        except BaseException as e:  # noqa: BLE001 - raised again by wait()
            self._error = e
        finally:
            self._done.set()
            release()

    def wait(self) -> None:
        self._done.wait()
        if self._error is not None:
            raise self._error


class EarlyChecks:
    """The last-byte checks of one mount's blobs, run early through `backend`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._backend = None
        self._checks: dict[tuple[str, int], _Check] = {}

    def start(self, backend, bootstrap: str, hold: Callable[[], object],
              release: Callable[[], None], zran=None) -> None:
        """Peek at `bootstrap`'s blob table and start one check per blob; `hold()` keeps
        the backend open for a check (a use of it, given back by `release()`). A zran
        blob's map is its meta blob, not its pins (no check waits for its last byte):
        with `zran` (zranwarm.ZranWarm) its meta blob is fetched and parsed instead."""
        for blob_id, end, entry in peek_blobs(bootstrap):
            backend.register_blob(blob_id, end)
            if zran is not None and is_zran_entry(entry):
                zran.start(backend, blob_id, entry, hold, release)
                continue
            c = _Check()
            with self._lock:
                self._backend = backend
                self._checks[(blob_id, end)] = c
            hold()
            try:
                _thread.start_new_thread(c.run, (backend, blob_id, end, release))
            except BaseException:
                release()
                raise

    def waiter(self, backend, blob_id: str, end: int) -> Callable[[], None] | None:
        """Wait for (and raise the failure of) the check of this blob's last byte at
        `end` through this very backend; None if none was started."""
        with self._lock:
            if backend is not self._backend:
                return None
            c = self._checks.get((blob_id, end))
        return c.wait if c is not None else None


def open_side_by_side(calls: Sequence[Callable[[], Any]],
                      close_unused: Callable[[list], None], width: int = OPEN_WIDTH) -> list:
    """[call() for call in calls], up to `width` at a time: this thread and width - 1
    others take the calls in order. If any raises, what the others opened goes to
    `close_unused` and the first failure (in call order) is raised."""
    n = len(calls)
    results: list = [None] * n
    errors: list[BaseException | None] = [None] * n
    lock = threading.Lock()
    todo = iter(range(n))
    left = [n]
    all_done = threading.Event()

    def work() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                results[i] = calls[i]()
            except BaseException as e:  # noqa: BLE001 - raised below, on the mount's thread
                errors[i] = e
            with lock:
                left[0] -= 1
                if not left[0]:
                    all_done.set()

    for _ in range(min(n, width) - 1):
        _thread.start_new_thread(work, ())
    work()
    if n:
        all_done.wait()
    failed = [e for e in errors if e is not None]
    if failed:
        close_unused([r for r in results if r is not None])
        raise failed[0]
    return results
