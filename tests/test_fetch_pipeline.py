"""The daemon's pipelined fetches (fscache_daemon/storage/pipeline.py): a fill's next
backend request read by the process's long-lived reader threads, not by a thread started
per fill; results in order, errors delivered to the fill, a forked child with threads of
its own, and a process that cannot start a thread reading its batches itself."""

import _thread
import os
import threading
import time

from test_coldpath import expected, make_blob, open_mgr
from test_storage_support import CountingBackend

from fscache_daemon.storage import pipeline


def test_reads_run_on_a_few_long_lived_threads():
    rt = pipeline.ReadThreads(max_threads=2)
    idents = set()

    def job(i):
        idents.add(threading.get_ident())
        return i * i

    for _ in range(50):
        pend = [rt.submit(job, i, lambda e: None) for i in range(3)]
        assert [p.get() for p in pend] == [0, 1, 4]
    # 150 reads, never on the caller's thread, on at most two threads (made once)
    assert threading.get_ident() not in idents
    assert 1 <= len(idents) <= 2


def test_a_slow_read_holds_up_no_other_fill():
    """Reads in flight at once each get a thread (one more is made whenever every one is
    busy); past max_threads a read waits for the next thread to finish."""
    rt = pipeline.ReadThreads(max_threads=3)
    started = threading.Semaphore(0)
    go = threading.Event()

    def slow(i):
        started.release()
        assert go.wait(20)
        return i

    pend = [rt.submit(slow, i, lambda e: None) for i in range(3)]
    for _ in range(3):      # all three run at once: none waits behind another
        assert started.acquire(timeout=20)
    fourth = rt.submit(lambda x: x, 3, lambda e: None)
    assert not fourth.ready()       # every thread busy: it waits for one of them
    go.set()
    assert [p.get() for p in pend] + [fourth.get()] == [0, 1, 2, 3]
    # the threads are idle again and taken before any new one is made
    assert [rt.submit(lambda x: -x, i, lambda e: None).get() for i in range(5)] == \
        [0, -1, -2, -3, -4]
    deadline = time.monotonic() + 20     # the last one marks itself idle after its result
    while rt._idle < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rt._threads == 3 and rt._idle == 3 and rt._backlog == 0


def test_an_exception_is_the_fill_s_result():
    rt = pipeline.ReadThreads()

    def boom(_):
        raise ValueError("disk on fire")

    p = rt.submit(boom, None, lambda e: ("failed", str(e)))
    assert p.get() == ("failed", "disk on fire")
    assert p.ready()
    # the thread survived it
    assert rt.submit(lambda x: x + 1, 1, lambda e: None).get() == 2


def test_a_forked_child_starts_its_own_threads():
    rt = pipeline.ReadThreads()
    assert rt.submit(lambda x: x, 7, lambda e: None).get() == 7
    pid = os.fork()
    if pid == 0:        # the parent's reader thread does not exist here
        code = 1
        try:
            p = rt.submit(lambda x: x * 3, 5, lambda e: None)
            code = 0 if p is not None and p.get() == 15 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _pipelined_fill(tmp_path, monkeypatch):
    """A 12-chunk zstd blob behind a pipelined CountingBackend, its manager filling
    through the Python fill (not the C cold path) -> (chunk datas, backend, manager)."""
    monkeypatch.delenv("FSCACHE_DAEMON_COLDPATH", raising=False)
    bdir, cdir = str(tmp_path / "b"), str(tmp_path / "c")
    blob_id, datas, _ = make_blob(bdir, 12, "zstd")
    be = CountingBackend(bdir)
    be.pipelined = True
    return datas, be, open_mgr(cdir, be, blob_id, batch_size=100 << 10, pipeline=True)


def test_no_thread_to_be_had_reads_in_the_fill(tmp_path, monkeypatch):
    datas, be, mgr = _pipelined_fill(tmp_path, monkeypatch)
    # a fresh set of reader threads that cannot start one (as under a tight RLIMIT_NPROC)
    monkeypatch.setattr(pipeline, "READS", pipeline.ReadThreads())

    def refuse(*a, **kw):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(_thread, "start_new_thread", refuse)
    assert pipeline.READS.submit(lambda x: x, 1, lambda e: None) is None
    be.reads.clear()
    mgr.fill(0, mgr.size)
    with open(mgr.cache.path, "rb") as f:
        assert f.read() == expected(mgr.meta, datas)
    # every stored byte once, in several requests, all from this thread
    assert len(be.reads) > 2 and len({r[1] for r in be.reads}) == len(be.reads)
    mgr.close()


def test_a_fill_given_up_mid_way_leaves_nothing_in_flight(tmp_path, monkeypatch):
    """A failing first request: the fill fails, the batch read ahead is resolved too
    (no chunk stays in flight: a second fill fetches and stores everything)."""
    datas, be, mgr = _pipelined_fill(tmp_path, monkeypatch)
    be.fail = OSError(5, "Input/output error")
    try:
        mgr.fill(0, mgr.size)
    except Exception as e:  # noqa: BLE001 - FillError expected
        assert "failed" in str(e)
    else:
        raise AssertionError("the fill did not fail")
    assert not mgr._inflight and mgr.cache.cached_chunks == 0
    be.fail = None
    mgr.fill(0, mgr.size)
    with open(mgr.cache.path, "rb") as f:
        assert f.read() == expected(mgr.meta, datas)
    mgr.close()
