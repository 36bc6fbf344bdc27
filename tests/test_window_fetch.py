"""The daemon's readahead windows fetched by its workers (in process, no kernel): a
window's planned requests grouped into tasks, and through the daemon a sequential and a
random reader's reads with their windows: every stored byte read from the backend once,
only verified bytes in the cache file, a sequential reader's windows fetched ahead."""

from __future__ import annotations

import random
import threading
import time
from types import SimpleNamespace
from typing import NamedTuple

import pytest
from test_daemon_support import pack

from fscache_daemon import readahead
from fscache_daemon.daemon import Daemon
from fscache_daemon.storage import backends
from fscache_daemon.storage.planner import tasks_of

MiB = 1 << 20


def test_tasks_of_groups_requests():
    class B:
        def __init__(self, chunks, length):
            self.chunks, self.length = chunks, length

    bs = [B([i], n) for i, n in enumerate([300, 300, 500, 1200, 100])]
    assert tasks_of(bs, 1000) == [[0, 1, 2], [3], [4]]
    assert tasks_of([], 1000) == []


class _Chunk(NamedTuple):
    index: int
    compressed_offset: int
    compressed_size: int
    uncompressed_size: int


@pytest.mark.parametrize("kind,mib,task_mib", [
    ("marker", 16, 4), ("sequential", 64, 4), ("marker", 8, 1), ("sequential", 2, 1),
    ("file", 16, 1), ("neighbours", 16, 1), ("", 16, 1)])
def test_long_streams_windows_go_in_larger_tasks(kind, mib, task_mib):
    """A long sequential stream's windows are fetched in tasks of several requests (a
    worker's next one read while it decodes its last), any other window in tasks of one
    request each."""
    tasks: list = []

    class Pool:
        def submit_readahead(self, fn, mgr, task):
            tasks.append([c.index for c in task])

    fake = SimpleNamespace(batch_size=MiB, pool=Pool(), _readahead_batch=None)
    # 1 MiB chunks stored in 512 KiB each: a request of 1 MiB holds two of them
    n = mib
    chunks = [_Chunk(i, i * (MiB // 2), MiB // 2, MiB) for i in range(n)]
    assert readahead.task_bytes(kind, chunks) == task_mib * MiB
    Daemon._submit_window(fake, None, chunks, kind)     # type: ignore[arg-type]
    per = task_mib * 2      # chunks per task
    assert [len(t) for t in tasks] == [per] * (n // per) + ([n % per] if n % per else [])
    assert sorted(i for t in tasks for i in t) == list(range(n))     # each chunk once


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
def test_daemon_windows_read_each_stored_byte_once(tmp_path, monkeypatch, order):
    data, boot, blobs, blob_id = _daemon_image(tmp_path)
    reads: list = []
    lock = threading.Lock()
    real_read = backends.LocalFsBackend.read_pooled

    def counting_read(self, bid, offset, length, pool):
        with lock:
            reads.append((offset, length))
        return real_read(self, bid, offset, length, pool)

    monkeypatch.setattr(backends.LocalFsBackend, "read_pooled", counting_read)
    monkeypatch.delenv("FSCACHE_DAEMON_COLDPATH", raising=False)
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
        assert not mgr._inflight
        # a chunk's bit is set after its bytes are written: those seen set now are there
        have = [c for c in mgr.meta.chunks if mgr.cache.has(c)]
        with open(mgr.cache.path, "rb") as f:
            cached = f.read()
        for c in have:
            assert cached[c.uncompressed_offset:c.uncompressed_end] == \
                data[c.uncompressed_offset:c.uncompressed_end]
        stats = mgr.stats.snapshot()
        if order == "sequential":
            # the whole file read through the daemon, most of it by windows ahead
            assert mgr.cache.complete()
            assert stats["readahead_bytes"] > stats["bytes_fetched"] // 2
        # never a stored byte read twice
        offs2 = sorted(reads)
        assert reads and all(a[0] + a[1] <= b[0] for a, b in zip(offs2, offs2[1:]))
        assert stats["verify_failures"] == 0
    finally:
        d.shutdown()
