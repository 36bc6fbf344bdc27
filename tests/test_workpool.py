"""builder/workpool.py: pack's chunk pipeline's thread pool (results in submission
order whatever the finishing order, exceptions handed to the waiter, cancelled tasks
skipped, threads joined on exit)."""
import threading
import time

import pytest

from erofs_tools.builder.workpool import TaskCancelled, WorkPool


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
