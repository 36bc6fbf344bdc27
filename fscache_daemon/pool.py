"""The daemon's worker pool (one priority queue: on-demand, readahead, prefetch) and the
token bucket that paces prefetch."""

from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future

PRIO_ONDEMAND = 0
PRIO_READAHEAD = 5                        # after the reader's own requests, before prefetch
PRIO_PREFETCH = 10
QUEUE_SAMPLES = 8192                      # on-demand queue waits kept for the percentiles
# per worker thread: how long the task it runs waited in the queue (the daemon's DEBUG
# line of a fill shows it)
TASK = threading.local()


class PriorityPool(Executor):
    """A fixed pool of threads serving one priority queue (lower value first).

    `submit()` (the Executor API the front ends use) queues on-demand work;
    `submit_readahead()` work a reader will need soon (after on-demand work, any number
    of threads); `submit_prefetch()` background work that waits behind both and never
    occupies more than `prefetch_workers` threads at once.
    """

    def __init__(self, threads: int, prefetch_workers: int = 1):
        self.threads = max(1, threads)
        self.prefetch_workers = max(1, min(prefetch_workers, self.threads))
        self._q: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._prefetch_slots = threading.Semaphore(self.prefetch_workers)
        self._shutdown = False
        self.active_ondemand = 0
        # tasks submitted and not finished (queued or running, any priority): 0 means the
        # pool is idle, which a test waits for to order a reader after the windows
        self.unfinished = 0
        self._lock = threading.Lock()
        # how long a reader's request waited for a worker (behind readahead tasks
        # already running): part of its latency that the blobs' stats do not see
        self._ondemand_waits: collections.deque = collections.deque(maxlen=QUEUE_SAMPLES)
        self._ondemand_wait_s = 0.0
        self._workers = [threading.Thread(target=self._run, name=f"worker-{i}", daemon=True)
                         for i in range(self.threads)]
        for t in self._workers:
            t.start()

    def _put(self, prio, fn, args, kwargs) -> Future:
        if self._shutdown:
            raise RuntimeError("pool is shut down")
        fut: Future = Future()
        with self._lock:
            self.unfinished += 1
        self._q.put((prio, next(self._seq), fut, fn, args, kwargs, time.monotonic()))
        return fut

    def submit(self, fn, /, *args, **kwargs) -> Future:
        return self._put(PRIO_ONDEMAND, fn, args, kwargs)

    def submit_readahead(self, fn, /, *args, **kwargs) -> Future:
        return self._put(PRIO_READAHEAD, fn, args, kwargs)

    def submit_prefetch(self, fn, /, *args, **kwargs) -> Future:
        self._prefetch_slots.acquire()
        return self._put_prefetch(fn, args, kwargs)

    def try_submit_prefetch(self, fn, /, *args, **kwargs) -> Future | None:
        """submit_prefetch() if a prefetch slot is free now, else None (never blocks)."""
        if not self._prefetch_slots.acquire(blocking=False):
            return None
        return self._put_prefetch(fn, args, kwargs)

    def _put_prefetch(self, fn, args, kwargs) -> Future:
        """Queue a prefetch task holding the slot just acquired; the slot is released
        when the task ends, or now if it cannot be queued."""
        try:
            fut = self._put(PRIO_PREFETCH, fn, args, kwargs)
        except BaseException:
            self._prefetch_slots.release()
            raise
        fut.add_done_callback(lambda _f: self._prefetch_slots.release())
        return fut

    def ondemand_pending(self) -> int:
        """On-demand and readahead tasks running (the prefetcher backs off while > 0)."""
        with self._lock:
            return self.active_ondemand

    def _run(self) -> None:
        while True:
            prio, _, fut, fn, args, kwargs, queued = self._q.get()
            if fn is None:
                return
            if not fut.set_running_or_notify_cancel():
                with self._lock:
                    self.unfinished -= 1
                continue
            ondemand = prio < PRIO_PREFETCH
            TASK.waited = time.monotonic() - queued
            if ondemand:
                with self._lock:
                    self.active_ondemand += 1
                    if prio == PRIO_ONDEMAND:
                        waited = time.monotonic() - queued
                        self._ondemand_waits.append(waited)
                        self._ondemand_wait_s += waited
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - delivered to the submitter
                fut.set_exception(e)
            finally:
                with self._lock:
                    if ondemand:
                        self.active_ondemand -= 1
                    self.unfinished -= 1

    def stats(self) -> dict:
        """How long on-demand tasks waited in the queue for a worker."""
        with self._lock:
            waits = sorted(self._ondemand_waits)
            total = self._ondemand_wait_s
            unfinished = self.unfinished
        def q(p: float) -> float:
            return round(waits[min(len(waits) - 1, int(p * (len(waits) - 1)))] * 1000, 3) \
                if waits else 0.0
        return {"threads": self.threads, "ondemand_tasks": len(waits), "unfinished": unfinished,
                "ondemand_queue_wait_s": round(total, 6),
                "ondemand_queue_p50_ms": q(0.5), "ondemand_queue_p99_ms": q(0.99)}

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True
        for _ in self._workers:
            self._q.put((1 << 30, next(self._seq), None, None, None, None, 0.0))
        if wait:
            for t in self._workers:
                t.join(timeout=30)


class TokenBucket:
    """Paces prefetch to `rate` bytes/s (0 = unlimited) with a one-second burst."""

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self._clock = clock             # a test's own clock: pacing checked exactly
        self._tokens = float(rate)
        self._t = clock()
        self._lock = threading.Lock()

    def take(self, n: int, stop: threading.Event) -> None:
        if self.rate <= 0:
            return
        with self._lock:
            now = self._clock()
            self._tokens = min(self.rate, self._tokens + (now - self._t) * self.rate)
            self._t = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            stop.wait(wait)
