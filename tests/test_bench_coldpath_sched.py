"""benchmarks/bench_coldpath.py's split of the reader's wall time (schedstat): on a CPU,
runnable but waiting for a CPU, asleep. The cold row's reader spends about as long waiting
for a CPU as on one (helper run coldrow); the benchmark reports it per round."""
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_coldpath  # noqa: E402


def test_thread_sched_counts_running_and_sleeping_apart():
    run0, wait0, n0 = bench_coldpath.thread_sched()
    t0 = time.monotonic()
    x = 0
    while time.monotonic() - t0 < 0.15:     # on a CPU
        x += 1
    time.sleep(0.2)                        # asleep: neither run nor wait
    wall = time.monotonic() - t0
    run1, wait1, n1 = bench_coldpath.thread_sched()
    run, wait = run1 - run0, wait1 - wait0
    assert run >= 0.05                      # the loop's share, however loaded the machine
    assert wait >= 0 and n1 > n0
    # the sleep is in neither: what is left of the wall covers it
    assert wall - run - wait >= 0.15


def test_proc_sched_sums_other_threads_only():
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass

    t = threading.Thread(target=spin)
    me = threading.get_native_id()
    run0, _ = bench_coldpath.proc_sched(os.getpid(), skip=me)
    t0 = time.monotonic()
    t.start()
    time.sleep(0.2)                         # this thread asleep, the other one spinning
    run1, _ = bench_coldpath.proc_sched(os.getpid(), skip=me)   # live threads only
    wall = time.monotonic() - t0
    stop.set()
    t.join()
    assert run1 - run0 >= 0.02
    # seconds, not nanoseconds; one spinning thread (and any other of the process's)
    assert run1 - run0 <= 4 * wall
