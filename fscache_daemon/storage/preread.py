"""Backend reads of a sequential readahead window started before a worker takes its
tasks: the disk (or link) stays busy ahead of the decoders, as the direct read of a blob
keeps it (one thread reading a few ranges ahead of the decoding one).

Without this a readahead task's worker read its backend request itself, then decoded
it: on a cold sequential GiB the four workers spent 5-6 thread-seconds blocked in their
O_DIRECT reads (p50 4-5 ms, queued behind each other), and while the reader waited for
the window's next chunk both CPUs could sit idle (quiet runs: 0.1-0.5 s of idle and
iowait per 1.1-1.3 s cold read).

`PreReadChain` holds one window's tasks (lists of chunks, one backend request each,
Daemon._submit_window). The reads of its first DEPTH tasks start at once on a reader
thread (storage/pipeline.py); task k, when a worker takes it and fewer than DEPTH / 2
tasks after it are read or on their way, starts the reads up to task k + DEPTH, in
order, as one job (a thread hand-over per two requests: one per request cost ~0.4 more
context switches per chunk), so at most DEPTH requests per window are read and not yet
decoded (bounded memory: DEPTH x --batch-size of reused buffers). A pre-read *claims* its chunks (they
are in flight, so no other fill fetches them again) and is processed exactly once:
by its task, or by the first fill that needs one of its chunks before the task ran
(`PreReadMixin._steal`: an on-demand read never waits behind queued readahead; it
decodes the request whose bytes are already read or on their way). Only windows the
readahead plan found sequential get pre-reads; a random reader's windows are fetched
as before, and nothing is read that the window would not have fetched.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from . import StorageError, iobuf, pipeline
from .planner import plan

# Requests of a sequential window read ahead of its decoding tasks; 0: off, every task
# reads its own request when a worker takes it. Off by default until a quiet run
# decides: under load 7-11 (2026-12-06, branch coldpar) neither the cold read's wall
# time nor the reader's blocked time moved outside the noise, and the daemon's CPU per
# cold GiB moved -4 % to +10 % between runs; FSCACHE_DAEMON_PREREAD=4 turns it on.
DEPTH = int(os.environ.get("FSCACHE_DAEMON_PREREAD", "0"))

log = logging.getLogger(__name__)


def tasks_of(batches, task_bytes: int) -> list[list]:
    """A window's planned backend requests grouped into tasks of about `task_bytes`
    stored bytes each (lists of chunks)."""
    tasks: list[list] = []
    size = task_bytes
    for b in batches:
        if size >= task_bytes:
            tasks.append([])
            size = 0
        tasks[-1] += b.chunks
        size += b.length
    return tasks


def _no_result(e: BaseException) -> None:
    """_read_each hands every result over itself (and catches what _read raises)."""
    log.error("pre-read job failed: %s", e)


class PreRead:
    """One backend request read before its task runs: its chunks' flights, the read."""
    __slots__ = ("batch", "flights", "pending", "taken")

    def __init__(self, batch, flights: dict) -> None:
        self.batch = batch
        self.flights = flights      # chunk index -> _Flight (claimed by this pre-read)
        self.pending: pipeline.Pending | None = None
        self.taken = False          # processed (or being) by a task or a fill


class PreReadMixin:
    """BlobManager's pre-reads (the manager's _lock, _inflight, _prereads, _read,
    _process, _flight_type and its completion report are used)."""

    _lock: threading.Lock
    _inflight: dict
    _prereads: dict
    pipeline: bool
    batch_size: int
    meta: Any
    cache: Any

    def can_preread(self) -> bool:
        """Whether preread works here: not for zran blobs (their requests start at
        access points, storage/rawkeep.py) nor without pipelining (the Python path)."""
        return self.pipeline and getattr(self.meta, "zran", None) is None

    def preread(self, tasks: list[list], max_gap: int = 0) -> list[list[PreRead]]:
        """Claim the chunks of `tasks` (those neither cached nor in flight) and start
        reading their backend requests, in order, by one job on the reader threads (one
        hand-over for them all); per task its pre-reads (can_preread() must hold)."""
        out: list[list[PreRead]] = []
        with self._lock:
            for chunks in tasks:
                prs: list[PreRead] = []
                out.append(prs)
                mine = {}
                for c in chunks:
                    if c.index not in self._inflight and not self.cache.has(c):
                        mine[c.index] = self._inflight[c.index] = self._flight_type()
                claimed = [c for c in chunks if c.index in mine]
                for b in plan(claimed, self.batch_size, max_gap) if claimed else []:
                    pr = PreRead(b, {c.index: mine[c.index] for c in b.chunks})
                    pr.pending = pipeline.Pending()
                    for c in b.chunks:
                        self._prereads[c.index] = pr
                    prs.append(pr)
            todo = [pr for prs in out for pr in prs]
            # asked for under the lock: a fill that steals one sees its read on its way
            if todo and pipeline.READS.submit(self._read_each, todo, _no_result) is None:
                for pr in todo:     # no reader thread: the taker reads it itself
                    pr.pending = None
        return out

    def _read_each(self, prs: list[PreRead]) -> None:
        """The reader thread's job: each pre-read's request in order, each result
        handed over as soon as it is in (never left without one)."""
        for pr in prs:
            p = pr.pending
            if p is None:
                continue
            try:
                p.result = self._read(pr.batch)
            except BaseException as e:  # noqa: BLE001 - the taker must get a result
                p.result = self._read_failed(e)
            p._done.release()

    def _take(self, pr: PreRead) -> bool:
        """Claim `pr` for processing (under self._lock); False if another did."""
        if pr.taken:
            return False
        pr.taken = True
        for c in pr.batch.chunks:
            self._prereads.pop(c.index, None)
        return True

    def _steal(self, index: int, out: list) -> None:
        """A fill found chunk `index` in flight (under self._lock): if a pre-read that
        no task took yet holds it, the fill processes that pre-read itself."""
        pr = self._prereads.get(index)
        if pr is not None and self._take(pr):
            out.append(pr)

    def run_prereads(self, prs, prefetch: bool = False) -> int:
        """Process (decode, verify, store) those of `prs` no fill took yet; the
        backend bytes they held."""
        with self._lock:
            todo = [pr for pr in prs if self._take(pr)]
        n = self._run_taken(todo, prefetch)
        if self._completed_now():       # the blob's last chunks: its front end's hook
            self._report_complete()
        return n

    def _run_taken(self, prs, prefetch: bool) -> int:
        fetched = 0
        failures: list = []         # a chunk's waiters get its error from its flight
        for pr in prs:
            got = pr.pending.get() if pr.pending is not None else self._read(pr.batch)
            try:
                fetched += self._process(pr.batch, got, pr.flights, failures, prefetch)
            finally:
                if got[2] is not None:
                    iobuf.POOL.put(got[2])
                left = [(i, f) for i, f in pr.flights.items() if not f.done]
                if left:        # an unexpected exception: nobody may wait forever
                    err = StorageError(f"blob {self.meta.blob_id[:12]}: fill aborted")
                    with self._lock:
                        for i, f in left:
                            f.error = err
                            self._inflight.pop(i, None)
                            f.set()
        return fetched

    # provided by BlobManager
    _flight_type: Callable[[], Any]

    def _read(self, batch) -> Any:
        raise NotImplementedError

    def _read_failed(self, e: BaseException) -> Any:
        raise NotImplementedError

    def _process(self, batch, got, flights, failures, prefetch) -> int:
        raise NotImplementedError

    def _completed_now(self) -> bool:
        raise NotImplementedError

    def _report_complete(self) -> None:
        raise NotImplementedError


class PreReadChain:
    """One sequential window's tasks, each task's request read `depth` tasks ahead of
    the task a worker takes (module docstring)."""

    def __init__(self, mgr, tasks: list, depth: int = DEPTH, max_gap: int = 0) -> None:
        self.mgr = mgr
        self.tasks = tasks
        self.depth = max(1, depth)
        self.max_gap = max_gap
        self.prs: list[list[PreRead] | None] = [None] * len(tasks)
        self._next = 0
        self._lock = threading.Lock()
        self.top_up(-1)

    def top_up(self, k: int) -> None:
        """Once fewer than half the depth of tasks after k are read or on their way,
        start the reads of every task up to k + depth (one reader-thread job for them:
        a hand-over per two requests, not per request)."""
        with self._lock:    # held while reading is asked for: task k finds its own
            end = min(len(self.tasks), k + 1 + self.depth)
            if self._next >= end or (k >= 0 and self._next - k - 1 > self.depth // 2):
                return
            start, self._next = self._next, end
            got = self.mgr.preread(self.tasks[start:end], self.max_gap)
            self.prs[start:end] = got

    def run(self, k: int) -> int:
        """Task k: start the read depth tasks ahead, then process its own (or fetch
        its chunks when it has no pre-read); backend bytes fetched."""
        self.top_up(k)
        prs = self.prs[k]
        self.prs[k] = None
        if prs:
            return self.mgr.run_prereads(prs)
        return 0
