"""The readahead plan (fscache_daemon.readahead): windows, markers, growth, limits."""
from __future__ import annotations

import bisect

from erofs_tools.reader.blob import BlobChunk
from fscache_daemon.readahead import BlobReadahead

MiB = 1 << 20


class FakeMeta:
    def __init__(self, n):
        self.chunks = [BlobChunk(i, i * MiB, MiB, i * MiB, MiB, b"d" * 32, False)
                       for i in range(n)]
        self._starts = [c.uncompressed_offset for c in self.chunks]

    def chunks_for_range(self, offset, length):
        if length <= 0 or offset < 0:
            return []
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        return [c for c in self.chunks[i:] if c.uncompressed_offset < offset + length
                and c.uncompressed_end > offset]


class FakeCache:
    def __init__(self):
        self.cached = set()

    def has(self, c):
        return c.index in self.cached


class FakeMgr:
    """What BlobReadahead uses of a BlobManager: 64 chunks of 1 MiB, files of 8 MiB."""

    def __init__(self, n=64, file_mib=8):
        self.meta = FakeMeta(n)
        self.cache = FakeCache()
        self.inflight = set()
        self.size = n * MiB
        self.file = file_mib * MiB

    def absent(self, offset, length):
        length = min(length, self.size - offset)
        return [c for c in self.meta.chunks_for_range(offset, length)
                if c.index not in self.cache.cached and c.index not in self.inflight]

    def run_end(self, chunk):
        return (chunk.uncompressed_offset // self.file + 1) * self.file

    def fetch(self, window):
        """The daemon fetched the window."""
        self.cache.cached.update(c.index for c in window.chunks)


def make(mgr, initial=2 * MiB, maximum=16 * MiB):
    log = []
    ra = BlobReadahead(mgr, initial, maximum, withhold=lambda c: log.append(("hold", c.index)),
                       publish=lambda c: log.append(("pub", c.index)))
    return ra, log


def idx(window):
    return [c.index for c in window.chunks]


def test_random_miss_fetches_the_rest_of_its_file_only():
    mgr = FakeMgr()
    ra, log = make(mgr)
    mgr.cache.cached.add(17)                  # the miss itself (chunk 17 of file 16..23)
    w = ra.on_request(17 * MiB, 4096, True)
    assert idx(w) == [18, 19, 20, 21, 22, 23] and w.marker is None
    assert log == [] and ra.marker is None


def test_sequential_miss_opens_a_window_with_a_marker_then_markers_double_it():
    mgr = FakeMgr()
    ra, log = make(mgr)
    mgr.cache.cached.update({0, 1})           # chunk 0 read before, chunk 1 just fetched
    assert ra.on_request(0, 4096, False) is None   # the reader read chunk 0
    w = ra.on_request(1 * MiB, 4096, True)
    assert idx(w) == [2, 3] and w.marker.index == 2
    assert log == [("hold", 2)]
    mgr.fetch(w)
    # reads inside the window that are not the marker plan nothing
    assert ra.on_request(3 * MiB, 4096, False) is None
    # the reader reaches the marker: the next window, twice as large, right after
    w = ra.on_request(2 * MiB, 128 << 10, False)
    assert idx(w) == [4, 5, 6, 7] and w.marker.index == 4
    assert log == [("hold", 2), ("pub", 2), ("hold", 4)]   # hit: its bits go out
    mgr.fetch(w)
    sizes = []
    for _ in range(4):
        w = ra.on_request(w.marker.uncompressed_offset, 4096, False)
        sizes.append(len(w.chunks))
        mgr.fetch(w)
    assert sizes == [8, 16, 16, 16]           # doubles up to the 16 MiB maximum
    assert ra.on_request(0, 4096, False) is None


def test_catching_up_with_the_window_in_flight_grows_the_next_one():
    mgr = FakeMgr()
    ra, log = make(mgr)
    mgr.cache.cached.update({0, 1})
    assert ra.on_request(0, 4096, False) is None   # the reader read chunk 0
    w = ra.on_request(1 * MiB, 4096, True)
    assert idx(w) == [2, 3]
    mgr.inflight.update(idx(w))
    # chunk 2 is still being fetched when the reader needs it: its miss (after waiting
    # for it) comes from a sequential reader inside the window
    mgr.inflight.discard(2)
    mgr.cache.cached.add(2)
    w2 = ra.on_request(2 * MiB, 4096, True)
    assert idx(w2) == [4, 5, 6, 7]
    assert ("pub", 2) in log                  # the old marker is given back


def test_windows_skip_what_is_cached_or_in_flight():
    mgr = FakeMgr()
    ra, _ = make(mgr)
    mgr.cache.cached.update({0, 1, 2, 3, 4, 5, 6, 7, 9})
    mgr.inflight.add(8)
    assert ra.on_request(0, 4096, False) is None   # the reader read chunk 0
    w = ra.on_request(1 * MiB, 4096, True)     # window 2..3 all cached: look further
    assert idx(w) == [10, 11] and w.marker.index == 10
    mgr.cache.cached.update(range(64))
    assert ra.on_request(10 * MiB, 4096, False) is None   # nothing left to fetch


def test_off_and_reset():
    mgr = FakeMgr()
    ra, _ = make(mgr, maximum=0)
    mgr.cache.cached.update({0, 1})
    assert ra.on_request(1 * MiB, 4096, True) is None
    ra, log = make(mgr)
    assert ra.on_request(0, 4096, False) is None   # the reader read chunk 0
    w = ra.on_request(1 * MiB, 4096, True)
    ra.reset()
    assert log == [("hold", w.marker.index), ("pub", w.marker.index)]
    assert ra.marker is None


def test_without_marker_hits_a_miss_at_the_window_end_grows_the_next_window():
    """cachefiles asks only for missing ranges, so markers are never seen: a sequential
    reader's miss right after the window still doubles it."""
    mgr = FakeMgr()
    ra, _ = make(mgr)
    mgr.cache.cached.update({0, 1})
    assert ra.on_request(0, 4096, False) is None   # the reader read chunk 0
    w = ra.on_request(1 * MiB, 4096, True)
    assert idx(w) == [2, 3]
    mgr.fetch(w)
    mgr.cache.cached.add(4)                   # the reader's own miss at the window end
    w = ra.on_request(4 * MiB, 4096, True)
    assert idx(w) == [5, 6, 7, 8]
    mgr.fetch(w)
    mgr.cache.cached.add(9)
    assert idx(ra.on_request(9 * MiB, 4096, True)) == list(range(10, 18))


def test_miss_after_a_chunk_no_reader_asked_for_is_random():
    """Scattered small reads (a program's start): a miss whose preceding chunk is cached
    only because a window or another file brought it opens no window (it would fetch
    several times what is read); after a chunk a reader did ask for, it does."""
    mgr = FakeMgr()
    ra, _ = make(mgr)
    mgr.cache.cached.update({4, 5})               # brought by someone else
    w = ra.on_request(5 * MiB, 4096, True)
    assert w is None or all(c.index < 8 for c in w.chunks)   # the rest of its file only
    assert ra.marker is None
    assert ra.on_request(5 * MiB, 4096, False) is None        # the reader read chunk 5
    mgr.cache.cached.add(6)
    w = ra.on_request(6 * MiB, 4096, True)
    assert idx(w) == [7, 8] and w.marker.index == 7
