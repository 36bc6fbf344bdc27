"""Where a lazy read's latency goes, as the daemon's metrics tell it: backend request
time, waits for chunks another fill has in flight, and on-demand waits for a worker."""

import threading
import time

from helpers import HANG
from test_storage_support import make_blob

from fscache_daemon.pool import PriorityPool
from fscache_daemon.storage import blobcache as bc
from fscache_daemon.storage.backends import LocalFsBackend


class SlowBackend(LocalFsBackend):
    """Every read is announced by `started`, waits for `gate` (if given), then takes
    `delay` s more."""

    def __init__(self, directory, delay, gate=None):
        super().__init__(directory)
        self.delay = delay
        self.gate = gate
        self.started = threading.Event()

    def read(self, blob_id, offset, length):
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(HANG)
        time.sleep(self.delay)
        return super().read(blob_id, offset, length)


def test_a_reader_waiting_for_a_chunk_in_flight_is_counted(tmp_path, monkeypatch):
    blobs = str(tmp_path / "blobs")
    blob_id, _ = make_blob(blobs, 4)
    # the readahead's read is held until the reader is seen waiting for its chunk: a
    # reader slower than a timed read (a loaded machine) found the chunk cached and
    # waited for nothing (flight_waits 0)
    gate = threading.Event()
    be = SlowBackend(blobs, 0.3)
    cdir = str(tmp_path / "cache")
    meta, _ = bc.load_or_fetch_meta(cdir, blob_id, be)
    mgr = bc.BlobManager(meta, bc.BlobCache(cdir, meta), be)
    be.started.clear()
    be.gate = gate                              # the chunk reads from here on
    waiting = threading.Event()
    flight_wait = bc._Flight.wait

    def announced_wait(self):
        waiting.set()
        flight_wait(self)
    monkeypatch.setattr(bc._Flight, "wait", announced_wait)
    # readahead holds chunk 0 in flight; a reader then asks for it
    ra = threading.Thread(target=mgr.fill_chunks, args=([meta.chunks[0]],),
                          kwargs={"prefetch": False})
    ra.start()
    assert be.started.wait(HANG)
    got = []
    reader = threading.Thread(target=lambda: got.append(mgr.fill(0, 4096)))
    reader.start()
    assert waiting.wait(HANG)                   # the reader waits for the flight
    gate.set()                                  # which then lasts `delay` s at least
    reader.join(HANG)
    ra.join(HANG)
    assert got == [0]                           # fetched nothing itself: it waited
    s = mgr.stats.snapshot()
    assert s["flight_waits"] == 1 and 0.05 < s["flight_wait_s"] < 10, s
    assert s["backend_requests"] == 1 and s["backend_read_p50_ms"] >= 250, s
    assert s["backend_read_s"] >= 0.25, s
    # a reader that fetches its own chunk waits for nothing in flight
    mgr.fill(meta.chunks[1].uncompressed_offset, 4096)
    assert mgr.stats.snapshot()["flight_waits"] == 1


def test_the_pool_counts_how_long_readers_waited_for_a_worker():
    pool = PriorityPool(1)
    try:
        gate = threading.Event()
        running = threading.Event()

        def busy():
            running.set()
            gate.wait(10)

        pool.submit_readahead(busy)           # the only worker is taken by readahead
        assert running.wait(10)
        fut = pool.submit(lambda: 1)          # a reader's request queues behind it
        time.sleep(0.2)
        gate.set()
        assert fut.result(10) == 1
        st = pool.stats()
        # readahead tasks are not counted: one on-demand task, which waited >= 0.2 s
        assert st["ondemand_tasks"] == 1 and st["ondemand_queue_wait_s"] >= 0.15, st
        assert st["ondemand_queue_p50_ms"] >= 150, st
    finally:
        pool.shutdown()
