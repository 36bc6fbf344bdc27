"""A fill's next backend request in flight while its current one is decoded, read by
long-lived threads shared by every blob.

A fill of several backend requests (BlobManager._reads) hands the read of batch j+1 to a
reader thread before it decodes and writes batch j, so the two overlap; batch j+1 is
asked for only once batch j was taken, so at most two batches' bytes are held per fill.

The threads live as long as the process: a thread started per fill cost a clone, a stack
mapping and, worse, a wait for the new thread to get the GIL before the fill could go on
(on a cold sequential GiB most readahead tasks are two requests: ~400 thread starts,
the costliest line under the GIL in the daemon's fetch path). They are made on demand,
one more whenever every one is busy: a fill has at most one read handed over at a time,
so their number follows the fills running at once (the daemon's workers: 4 on a cold
sequential read), and a slow backend read of one fill does not hold up another's. Past
MAX_THREADS a job waits for a free thread. A forked child starts its own (none of the
parent's threads survives a fork), and where no thread can be started (limits)
`submit` says so and the fill reads its batches itself. Threads are started with
`_thread`, not `threading.Thread`, whose start() waits for the new thread to run (and,
for one that died starting, forever).
"""
from __future__ import annotations

import _thread
import logging
import os
import queue
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

MAX_THREADS = 16


class Pending:
    """One read handed to a reader thread; `get()` waits for its result."""

    __slots__ = ("_done", "result")

    def __init__(self) -> None:
        # a raw lock held until the result is in: cheaper than an Event (no Condition)
        self._done = _thread.allocate_lock()
        self._done.acquire()
        self.result: Any = None

    def get(self) -> Any:
        self._done.acquire()
        self._done.release()
        return self.result

    def ready(self) -> bool:
        """Whether the result is in (never waits)."""
        if self._done.acquire(False):
            self._done.release()
            return True
        return False


class ReadThreads:
    """The process's reader threads (see the module docstring)."""

    def __init__(self, max_threads: int = MAX_THREADS) -> None:
        self.max_threads = max(1, max_threads)
        self._reset()
        # a forked child has none of the parent's threads, and the lock may have been
        # held by one of them at the fork: the child starts afresh
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = _thread.allocate_lock()
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = 0
        self._idle = 0          # threads waiting for a job no one has claimed yet
        self._backlog = 0       # jobs queued for a thread that is still busy

    def submit(self, fn: Callable[[Any], Any], arg: Any,
               on_error: Callable[[BaseException], Any]) -> Pending | None:
        """Run fn(arg) on a reader thread (on_error(e) is the result if it raises);
        None if no reader thread can be had (the caller runs fn itself)."""
        p = Pending()
        with self._lock:
            q = self._q
            # each job is matched with a thread that will take it: an idle one, a new
            # one, or past MAX_THREADS the next one to finish (counted in _backlog)
            start = False
            if self._idle:
                self._idle -= 1
            elif self._threads < self.max_threads:
                self._threads += 1
                start = True
            else:
                self._backlog += 1
        if start:
            try:
                _thread.start_new_thread(self._run, (q,))
            except RuntimeError as e:
                with self._lock:
                    self._threads -= 1
                    none_left = self._threads == 0
                    if not none_left:
                        self._backlog += 1      # an existing thread will take it
                if none_left:
                    log.debug("no reader thread: %s; reading in the fill's thread", e)
                    return None
        q.put((fn, arg, on_error, p))
        return p

    def _run(self, q: queue.SimpleQueue) -> None:
        # started for a job: the first one it takes is that one
        while True:
            fn, arg, on_error, p = q.get()
            try:
                p.result = fn(arg)
            except BaseException as e:  # noqa: BLE001 - the fill must get a result
                p.result = on_error(e)
            p._done.release()
            del p, fn, arg, on_error    # nothing of the job kept while idle
            with self._lock:
                if self._backlog:       # a job queued for the next thread to finish
                    self._backlog -= 1
                else:
                    self._idle += 1


# the daemon's one set of reader threads: every blob's fills share them
READS = ReadThreads()
