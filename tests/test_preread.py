"""A sequential readahead window's backend requests read ahead of its tasks
(fscache_daemon/storage/preread.py): bounded reads in flight, each chunk read once and
stored verified, a fill needing a pre-read chunk processes that pre-read instead of
waiting behind the task queue, a failed pre-read leaves nothing in flight; through the
daemon (in process, no kernel) a sequential reader's windows are read ahead and a
random reader's are not."""

from __future__ import annotations

import random
import threading
import time

import pytest
from test_coldpath import expected, make_blob, open_mgr
from test_daemon_support import pack
from test_storage_support import CountingBackend

from fscache_daemon.daemon import Daemon
from fscache_daemon.storage import backends, preread
from fscache_daemon.storage.blobcache import FillError
from fscache_daemon.storage.planner import plan

MiB = 1 << 20


def _chain_setup(tmp_path, monkeypatch, nchunks=24, batch=100 << 10):
    monkeypatch.delenv("FSCACHE_DAEMON_COLDPATH", raising=False)
    bdir, cdir = str(tmp_path / "b"), str(tmp_path / "c")
    blob_id, datas, _ = make_blob(bdir, nchunks, "zstd")
    be = CountingBackend(bdir)
    be.pipelined = True
    done: list = []
    mgr = open_mgr(cdir, be, blob_id, batch_size=batch, pipeline=True,
                   on_complete=done.append)
    mgr.completions = done
    assert mgr.can_preread()
    chunks = sorted(mgr.meta.chunks, key=lambda c: c.compressed_offset)
    tasks = preread.tasks_of(plan(chunks, batch), 1)     # a request per task
    return mgr, be, datas, tasks


def test_tasks_of_groups_requests():
    class B:
        def __init__(self, chunks, length):
            self.chunks, self.length = chunks, length

    bs = [B([i], n) for i, n in enumerate([300, 300, 500, 1200, 100])]
    assert preread.tasks_of(bs, 1000) == [[0, 1, 2], [3], [4]]
    assert preread.tasks_of([], 1000) == []


def test_chain_reads_depth_ahead_and_each_byte_once(tmp_path, monkeypatch):
    mgr, be, datas, tasks = _chain_setup(tmp_path, monkeypatch)
    assert len(tasks) >= 6
    be.reads.clear()
    chain = preread.PreReadChain(mgr, tasks, depth=2)
    # two tasks' requests asked for at once (their chunks claimed), none of the rest
    claimed = {c.index for t in tasks[:2] for c in t}
    assert set(mgr._inflight) == claimed and set(mgr._prereads) == claimed
    deadline = time.monotonic() + 20
    while len(be.reads) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(be.reads) == 2
    for k in range(len(tasks)):
        chain.run(k)
        # after task k: the reads of tasks up to k + 2 asked for, no more
        assert len(be.reads) <= min(len(tasks), k + 3)
    assert not mgr._inflight and not mgr._prereads
    # the last task's chunks completed the blob: its hook ran (the front end's window
    # and mark depend on it)
    assert mgr.completions == [mgr]
    with open(mgr.cache.path, "rb") as f:
        assert f.read() == expected(mgr.meta, datas)
    # one backend request per task, every stored byte once
    assert len(be.reads) == len(tasks)
    offs = sorted((o, n) for _, o, n in be.reads)
    assert all(a[0] + a[1] <= b[0] for a, b in zip(offs, offs[1:]))
    assert mgr.stats.snapshot()["verify_failures"] == 0
    mgr.close()


def test_a_fill_takes_over_a_pre_read_its_task_has_not_run(tmp_path, monkeypatch):
    """A reader reaching a chunk a queued task pre-read processes that request itself
    (no second read of it, no wait for the task); the task then finds it done."""
    mgr, be, datas, tasks = _chain_setup(tmp_path, monkeypatch)
    be.reads.clear()
    chain = preread.PreReadChain(mgr, tasks, depth=3)
    c = tasks[1][-1]
    mgr.fill(c.uncompressed_offset, 4096)
    assert all(mgr.cache.has(x) for x in tasks[1])       # the whole pre-read stored
    deadline = time.monotonic() + 20                     # task 2's read, after it
    while len(be.reads) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(be.reads) == 3                            # nothing read again
    assert chain.run(1) == 0                             # the task has nothing left
    for k in (0, *range(2, len(tasks))):
        chain.run(k)
    assert len(be.reads) == len(tasks)
    with open(mgr.cache.path, "rb") as f:
        assert f.read() == expected(mgr.meta, datas)
    mgr.close()


def test_a_failed_pre_read_leaves_nothing_in_flight(tmp_path, monkeypatch):
    mgr, be, datas, tasks = _chain_setup(tmp_path, monkeypatch)
    be.fail = OSError(5, "Input/output error")
    chain = preread.PreReadChain(mgr, tasks, depth=2)
    c = tasks[0][0]
    with pytest.raises(FillError):          # the reader gets the pre-read's failure
        mgr.fill(c.uncompressed_offset, 4096)
    for k in range(len(tasks)):             # the tasks fail quietly (readahead)
        chain.run(k)
    assert not mgr._inflight and not mgr._prereads
    assert mgr.cache.cached_chunks == 0      # nothing unverified was stored
    be.fail = None
    mgr.fill(0, mgr.size)
    with open(mgr.cache.path, "rb") as f:
        assert f.read() == expected(mgr.meta, datas)
    mgr.close()


def _daemon_image(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(5)
    # 24 MiB: half random, half text (compressible), 1 MiB chunks
    data = b"".join(rng.randbytes(MiB) if i % 2 else
                    ((b"line %d of some text\n" % i) * (MiB // 16))[:MiB]
                    for i in range(24))
    assert len(data) == 24 * MiB
    (src / "big.bin").write_bytes(data)
    boot, blobs = str(tmp_path / "boot"), str(tmp_path / "blobs")
    info = pack(str(src), boot, blobs, "--compressor", "zstd")
    return data, boot, blobs, info["blobs"][0]["blob_id"]


def _settle(d, mgr) -> None:
    """Wait until the windows' tasks are done: nothing queued or in flight, twice."""
    deadline = time.monotonic() + 60
    quiet = 0
    while quiet < 5 and time.monotonic() < deadline:
        busy = mgr._inflight or d.pool._q.qsize()
        quiet = 0 if busy else quiet + 1
        time.sleep(0.1)


@pytest.mark.parametrize("order", ["sequential", "random"])
def test_daemon_reads_ahead_for_a_sequential_reader_only(tmp_path, monkeypatch, order):
    data, boot, blobs, blob_id = _daemon_image(tmp_path)
    chains: list = []
    reads: list = []
    lock = threading.Lock()
    real_init = preread.PreReadChain.__init__
    real_read = backends.LocalFsBackend.read_pooled

    def counting_init(self, mgr, tasks, *a, **kw):
        with lock:
            chains.append(sum(len(t) for t in tasks))
        real_init(self, mgr, tasks, *a, **kw)

    def counting_read(self, bid, offset, length, pool):
        with lock:
            reads.append((offset, length))
        return real_read(self, bid, offset, length, pool)

    monkeypatch.setattr(preread.PreReadChain, "__init__", counting_init)
    monkeypatch.setattr(backends.LocalFsBackend, "read_pooled", counting_read)
    monkeypatch.delenv("FSCACHE_DAEMON_COLDPATH", raising=False)
    monkeypatch.setattr(preread, "DEPTH", 4)     # FSCACHE_DAEMON_PREREAD=4
    d = Daemon(str(tmp_path / "cache"), frontend="none", threads=4)
    d.start()
    try:
        d.mount(boot, str(tmp_path / "mnt"), f"localfs:{blobs}")
        mgr = d.blobs[blob_id]
        step = 128 << 10
        offs = list(range(0, len(data), step))
        if order == "random":
            # scattered reads, never the chunk after one read lately
            offs = random.Random(1).sample(range(0, len(data), 4 * MiB), 6)
            offs = [o + 3 * MiB // 2 for o in offs if o + 2 * MiB <= len(data)]
        for o in offs:
            d.fill(blob_id, o, step)
        _settle(d, mgr)
        assert not mgr._inflight and not mgr._prereads
        # a chunk's bit is set after its bytes are written: those seen set now are there
        have = [c for c in mgr.meta.chunks if mgr.cache.has(c)]
        with open(mgr.cache.path, "rb") as f:
            cached = f.read()
        for c in have:
            assert cached[c.uncompressed_offset:c.uncompressed_end] == \
                data[c.uncompressed_offset:c.uncompressed_end]
        if order == "sequential":
            # the whole file read through the daemon; the windows after the first
            # sequential miss were read ahead, at most a few chains (2, 4, 8, 16 MiB)
            assert mgr.cache.complete()
            assert 1 <= len(chains) <= 6 and sum(chains) >= 8
        else:
            assert chains == []
        # never a stored byte read twice
        offs2 = sorted(reads)
        assert all(a[0] + a[1] <= b[0] for a, b in zip(offs2, offs2[1:]))
        assert mgr.stats.snapshot()["verify_failures"] == 0
    finally:
        d.shutdown()


def test_preread_off_keeps_the_old_path(tmp_path, monkeypatch):
    """FSCACHE_DAEMON_PREREAD=0 (DEPTH 0): windows are fetched by their tasks alone."""
    monkeypatch.setattr(preread, "DEPTH", 0)
    made: list = []
    monkeypatch.setattr(preread.PreReadChain, "__init__",
                        lambda self, *a, **kw: made.append(1))
    data, boot, blobs, blob_id = _daemon_image(tmp_path)
    d = Daemon(str(tmp_path / "cache"), frontend="none", threads=2)
    d.start()
    try:
        d.mount(boot, str(tmp_path / "mnt"), f"localfs:{blobs}")
        for o in range(0, len(data), 256 << 10):
            d.fill(blob_id, o, 256 << 10)
        _settle(d, d.blobs[blob_id])
        assert made == [] and d.blobs[blob_id].cache.complete()
    finally:
        d.shutdown()
