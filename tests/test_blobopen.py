"""How a mount opens its blobs (fscache_daemon/blobopen.py): the blobs' last-byte checks
started from the user's bootstrap before it is copied and parsed (a real packed image,
the localfs backend: a short blob fails the check the mount waits for), and an image's
blobs opened side by side (at once, results in order, a failure closing the others)."""

from __future__ import annotations

import os
import shutil
import threading
import time

import helpers
import pytest
from test_daemon_support import pack, write_tree

from fscache_daemon.blobopen import EarlyChecks, open_side_by_side, peek_blobs
from fscache_daemon.daemon import Daemon
from fscache_daemon.storage import BackendError
from fscache_daemon.storage.backends import open_backend
from fscache_daemon.storage.image import load_image


def test_side_by_side_runs_the_calls_at_once_in_order():
    barrier = threading.Barrier(3, timeout=30)     # one at a time would never pass it

    def call(i):
        return lambda: (barrier.wait(), i)[1]
    assert open_side_by_side([call(i) for i in range(3)], lambda _: None) == [0, 1, 2]
    assert open_side_by_side([], lambda _: None) == []


def test_side_by_side_closes_the_others_and_raises_the_first_failure():
    closed = []

    def fail(msg):
        def f():
            time.sleep(0.05 if msg == "first" else 0)     # the later failure ends first
            raise ValueError(msg)
        return f
    with pytest.raises(ValueError, match="^first$"):
        open_side_by_side([lambda: "a", fail("first"), lambda: "c", fail("second")],
                          closed.extend)
    assert sorted(closed) == ["a", "c"]


def test_side_by_side_bounds_its_threads():
    now = peak = 0
    lock = threading.Lock()

    def call():
        nonlocal now, peak
        with lock:
            now += 1
            peak = max(peak, now)
        time.sleep(0.02)
        with lock:
            now -= 1
        return 1
    assert open_side_by_side([call] * 12, lambda _: None, width=3) == [1] * 12
    assert 1 <= peak <= 3


def _image(tmp_path):
    src = write_tree(str(tmp_path / "src"), seed=5, nfiles=12, big=(1 << 20,))
    boot, blobs = str(tmp_path / "boot"), str(tmp_path / "blobs")
    pack(src, boot, blobs, "--compressor", "zstd")
    ref = load_image(boot).blobs[0]
    return boot, blobs, ref


def test_early_checks_pass_fail_and_hold_the_backend(tmp_path):
    boot, blobs, ref = _image(tmp_path)
    assert [(b, n) for b, n, _entry in peek_blobs(boot)] == [(ref.blob_id, ref.compressed_size)]
    assert peek_blobs(str(tmp_path / "nothing")) == []
    held = []

    def run(directory):
        be = open_backend(f"localfs:{directory}")
        checks = EarlyChecks()
        checks.start(be, boot, lambda: held.append(1), lambda: held.append(-1))
        return be, checks

    be, checks = run(blobs)
    wait = checks.waiter(be, ref.blob_id, ref.compressed_size)
    assert wait is not None
    wait()                                          # the blob is whole
    # only for this very backend, blob and size: anything else checks itself
    assert checks.waiter(open_backend(f"localfs:{blobs}"), ref.blob_id,
                         ref.compressed_size) is None
    assert checks.waiter(be, ref.blob_id, ref.compressed_size + 1) is None
    # a blob cut short fails the check the mount waits for
    short = str(tmp_path / "short")
    shutil.copytree(blobs, short)
    path = os.path.join(short, ref.blob_id)
    os.truncate(path, os.path.getsize(path) - 1)
    be2, checks2 = run(short)
    wait2 = checks2.waiter(be2, ref.blob_id, ref.compressed_size)
    assert wait2 is not None
    with pytest.raises(BackendError, match="short read"):
        wait2()
    # each check gave its hold back (on its own thread, after the waiter's answer:
    # waited for, not given 5 s)
    helpers.wait_until(lambda: held.count(-1) >= 2, what="both holds given back")
    assert held.count(1) == 2 and sum(held) == 0, held


def test_a_mount_of_a_short_blob_fails_with_the_early_check(tmp_path):
    boot, blobs, ref = _image(tmp_path)
    path = os.path.join(blobs, ref.blob_id)
    os.truncate(path, os.path.getsize(path) - 1)
    d = Daemon(str(tmp_path / "cache"), frontend="none", threads=2)
    d.start()
    try:
        with pytest.raises(BackendError, match="short read"):
            d.mount(boot, str(tmp_path), f"localfs:{blobs}")
        assert d.list() == [] and not d.blobs
    finally:
        d.shutdown()
