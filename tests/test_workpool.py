"""builder/workpool.py: pack's chunk pipeline's thread pool (results in submission
order whatever the finishing order, exceptions handed to the waiter, cancelled tasks
skipped, threads joined on exit), and `started`: one call on a thread of its own (pack's
blob finish and chunk info table sort)."""
import threading
import time

import pytest
from helpers import HANG

from erofs_tools.builder.workpool import TaskCancelled, WorkPool, started


def test_results_and_errors_reach_the_waiter():
    def work(i):
        time.sleep(0.001 * (7 - i % 7))       # later tasks finish first
        if i == 5:
            raise ValueError("five")
        return i * i

    with WorkPool(3, "t") as pool:
        tasks = [pool.submit(work, i) for i in range(20)]
        for i, t in enumerate(tasks):
            if i == 5:
                with pytest.raises(ValueError, match="five"):
                    t.result()
            else:
                assert t.result() == i * i
    assert not [t for t in threading.enumerate() if t.name.startswith("t-")]


def test_cancelled_tasks_do_not_run():
    gate = threading.Event()
    ran = []

    def work(i):
        gate.wait()
        ran.append(i)
        return i

    pool = WorkPool(1, "c")
    first = pool.submit(work, 0)        # the one worker blocks in it
    later = [pool.submit(work, i) for i in range(1, 4)]
    for t in later:
        t.cancel()
    gate.set()
    pool.close()
    assert first.result() == 0
    assert ran == [0]
    for t in later:
        with pytest.raises(TaskCancelled):
            t.result()


def test_needs_a_worker():
    with pytest.raises(ValueError):
        WorkPool(0, "z")


def _named(name):
    return [t for t in threading.enumerate() if t.name == name]


def test_started_gives_the_value_or_raises_the_error_to_every_waiter():
    """result() returns the call's value (any number of times, from any thread) or
    raises what it raised; once it returns the thread is gone, and it was no daemon
    (the interpreter lets it end rather than freeze it)."""
    gate = threading.Event()
    daemon = []

    def add(a, b):
        daemon.append(threading.current_thread().daemon)
        gate.wait(HANG)
        return a + b
    job = started(add, 2, 3, name="s-add")
    assert not job.running_here()
    got = []
    other = threading.Thread(target=lambda: got.append(job.result()))
    other.start()
    gate.set()
    assert job.result() == 5 and job.result() == 5
    other.join()
    assert got == [5]
    assert daemon == [False]
    assert not _named("s-add")

    def boom():
        raise KeyError("boom")
    job = started(boom, name="s-boom")
    for _ in range(2):
        with pytest.raises(KeyError, match="boom"):
            job.result()
    job.join()                  # only waits: the error is result()'s
    assert not _named("s-boom")


def test_started_join_waits_from_other_threads_and_not_on_its_own():
    """join() from another thread waits for the call's end; from the call's own
    thread (a cleanup the call runs itself on failure, BlobWriter.abort) it returns at
    once instead of waiting for itself, and result() there refuses."""
    gate = threading.Event()
    handle = []
    seen = []

    def work():
        gate.wait(HANG)         # until the handle is here
        job = handle[0]
        seen.append(job.running_here())
        job.join()              # must not wait for itself
        try:
            job.result()
        except RuntimeError:
            seen.append("refused")
        return "done"
    job = started(work, name="s-self")
    handle.append(job)
    joined = []
    waiter = threading.Thread(target=lambda: (job.join(), joined.append(seen[:])))
    waiter.start()
    gate.set()
    waiter.join(HANG)
    assert not waiter.is_alive(), "join() from the call's own thread waited for itself"
    assert joined == [[True, "refused"]]    # the other thread's join saw the call end
    assert job.result() == "done"
    assert not _named("s-self")


def test_started_interrupted_while_starting_never_leaves_the_call_running(monkeypatch):
    """An interrupt inside Thread.start(): if the call had begun, started() waits for
    its end before raising (its caller has no handle to wait with); if the thread had
    not taken it, the call never runs."""
    real_start = threading.Thread.start
    began = threading.Event()
    ended = []

    def work():
        began.set()
        time.sleep(0.05)            # still running when the interrupt reaches started()
        ended.append(1)

    def start_then_interrupt(self):
        real_start(self)
        began.wait(HANG)
        raise KeyboardInterrupt
    monkeypatch.setattr(threading.Thread, "start", start_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        started(work, name="s-int")
    assert ended == [1]
    assert not _named("s-int")

    ran = []

    def never_started(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(threading.Thread, "start", never_started)
    with pytest.raises(KeyboardInterrupt):
        started(ran.append, 1, name="s-none")
    monkeypatch.setattr(threading.Thread, "start", real_start)
    assert ran == []
