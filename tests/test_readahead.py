"""The readahead plan (fscache_daemon.readahead): windows, markers, growth, limits."""
from __future__ import annotations

import bisect
import os
import struct

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


def test_random_miss_in_a_file_bigger_than_the_largest_window_reads_around_it():
    """A large shared library faults in at random places: each miss gets 1 MiB after
    it (AROUND), not the largest window of the file."""
    mgr = FakeMgr(n=64, file_mib=64)          # one 64 MiB file
    ra, log = make(mgr, initial=2 * MiB, maximum=16 * MiB)
    mgr.cache.cached.add(17)
    w = ra.on_request(17 * MiB, 4096, True)
    assert idx(w) == [18] and w.marker is None and log == []
    mgr.cache.cached.add(50)                  # 13 MiB left in the file: all of it
    w = ra.on_request(50 * MiB, 4096, True)
    assert idx(w) == list(range(51, 64))


def test_windows_past_the_whole_file_size_still_leave_a_big_file_to_around():
    """The largest window (64 MiB by default) is reached only by sequential windows: a
    random miss in a 24 MiB file (bigger than WHOLE_FILE, 16 MiB) gets AROUND, not the
    rest of the file, while a reader going on sequentially gets windows past 16 MiB."""
    mgr = FakeMgr(n=128, file_mib=24)
    ra, _ = make(mgr, initial=2 * MiB, maximum=64 * MiB)
    mgr.cache.cached.add(25)                  # 25 of the file 24..47: 22 MiB after it
    assert idx(ra.on_request(25 * MiB, 4096, True)) == [26]
    mgr.cache.cached.add(40)                  # 7 MiB left: all of it
    assert idx(ra.on_request(40 * MiB, 4096, True)) == list(range(41, 48))
    seq = FakeMgr(n=256, file_mib=256)
    ra, _ = make(seq, initial=2 * MiB, maximum=64 * MiB)
    seq.cache.cached.update({0, 1})
    assert ra.on_request(0, 4096, False) is None
    w = ra.on_request(1 * MiB, 4096, True)
    sizes = []
    for _ in range(7):
        seq.fetch(w)
        w = ra.on_request(w.marker.uncompressed_offset, 4096, False)
        sizes.append(len(w.chunks))
    assert sizes == [4, 8, 16, 32, 64, 64, 64]

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


class ColdMgr(FakeMgr):
    """FakeMgr whose chunks in `cold` belong to files a start rarely reads."""

    def __init__(self, cold, **kw):
        super().__init__(**kw)
        self.cold = set(cold)

    def is_cold(self, c):
        return c.index in self.cold


def test_windows_leave_out_cold_files_but_not_the_rest_of_the_file_being_read():
    mgr = ColdMgr(cold={3, 4, 9, 10, 11}, file_mib=8)    # files of 8 chunks: 0..7, 8..15
    ra, _ = make(mgr, initial=4 * MiB)
    mgr.cache.cached.update({0, 1})
    assert ra.on_request(0, 4096, False) is None          # the reader read chunk 0
    w = ra.on_request(1 * MiB, 4096, True)               # sequential in file 0..7
    # chunks 3 and 4 are of this very file: the reader gets them
    assert idx(w) == [2, 3, 4, 5] and w.marker.index == 2
    mgr.fetch(w)
    w = ra.on_request(2 * MiB, 4096, False)              # marker hit: 6..13
    assert idx(w) == [6, 7, 8, 12, 13]                   # 9..11: cold, of the next file


def test_the_sequential_test_looks_back_past_cold_chunks():
    """The cold files between two files a reader reads one after the other were never
    fetched: the reader is still sequential."""
    mgr = ColdMgr(cold={4, 5}, file_mib=1)                 # a file per chunk
    ra, _ = make(mgr)
    mgr.cache.cached.update({3, 6})                      # 3 read before, 6 just fetched
    assert ra.on_request(3 * MiB, 4096, False) is None   # the reader read chunk 3
    w = ra.on_request(6 * MiB, 4096, True)
    assert w.marker is not None and idx(w)[0] == 7       # a sequential window after it
    mgr2 = FakeMgr(file_mib=1)
    ra2, _ = make(mgr2)
    mgr2.cache.cached.update({3, 6})
    w2 = ra2.on_request(6 * MiB, 4096, True)             # nothing cold: 5 not cached
    assert w2 is None or w2.marker is None


class SmallMeta(FakeMeta):
    """64 KiB chunks: a stretch of small files."""

    def __init__(self, n):
        K = 64 << 10
        self.chunks = [BlobChunk(i, i * K, K, i * K, K, b"d" * 32, False) for i in range(n)]
        self._starts = [c.uncompressed_offset for c in self.chunks]


def test_a_small_file_window_does_not_grow():
    mgr = FakeMgr(n=256)
    mgr.meta = SmallMeta(256)
    mgr.size = 256 * (64 << 10)
    mgr.run_end = lambda c: c.uncompressed_end           # a file per chunk
    ra, _ = make(mgr, initial=1 * MiB)
    mgr.cache.cached.update({0, 1})
    assert ra.on_request(0, 4096, False) is None          # the reader read chunk 0
    w = ra.on_request(1 * (64 << 10), 4096, True)
    assert len(w.chunks) == 16
    mgr.fetch(w)
    w = ra.on_request(w.marker.uncompressed_offset, 4096, False)
    assert len(w.chunks) == 16                           # not 32: small files


COLD_TREE = {"pkg/mod.py": 5000, "pkg/__pycache__/mod.cpython-311.pyc": 6000,
             "pkg/lonely.py": 7000, "pkg/inc.h": 9000, "pkg/stub.pyi": 3000,
             "data.bin": 11000}


def cold_image(tmp_path) -> str:
    import random

    from test_daemon_support import pack
    rnd = random.Random(5)
    src = tmp_path / "src"
    for name, size in COLD_TREE.items():
        p = src / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rnd.randbytes(size))
    boot = str(tmp_path / "boot")
    pack(str(src), boot, str(tmp_path / "blobs"))
    return boot


def test_file_runs_names_the_cold_files(tmp_path):
    """Sources beside their compiled file and headers are cold; a source without a
    compiled file and other files are not."""
    from fscache_daemon.storage.image import chunk_owners, file_runs
    files = COLD_TREE
    boot = cold_image(tmp_path)
    cold: dict = {}
    runs = file_runs(boot, cold=cold)
    assert sum(len(r) for r in runs.values()) == len(files)
    wanted = {b: {s for s, _ in rs} for b, rs in cold.items()}
    owners = chunk_owners(boot, wanted)
    names = sorted(o[0][0] for o in owners.values())
    assert names == ["/pkg/inc.h", "/pkg/mod.py", "/pkg/stub.pyi"]
    assert file_runs(boot) == runs                     # the same runs without `cold`
    modules: dict = {}
    assert file_runs(boot, modules=modules) == runs
    owners = chunk_owners(boot, {b: {s for s, _ in rs} for b, rs in modules.items()})
    assert sorted(o[0][0] for o in owners.values()) == \
        ["/pkg/__pycache__/mod.cpython-311.pyc", "/pkg/lonely.py", "/pkg/mod.py"]


def test_a_file_read_whole_brings_the_small_files_after_it_but_not_cold_ones():
    """A random miss in a small file: the rest of it, and the small files (not cold)
    within NEIGHBOURS after it and NEIGHBOURS_BEFORE before it; no big file's chunks, no
    marker."""
    K = 64 << 10
    mgr = FakeMgr(n=256)
    mgr.meta = SmallMeta(256)
    mgr.size = 256 * K
    mgr.run_end = lambda c: c.uncompressed_end if c.index != 4 else 6 * K   # 4..5 a file
    mgr.is_cold = lambda c: c.index in (7, 9)
    ra, log = make(mgr, initial=2 * MiB)
    mgr.cache.cached.update({4, 1})
    w = ra.on_request(4 * K, 4096, True)
    assert w.marker is None and log == []
    # before it (NEIGHBOURS_BEFORE = 256 KiB = 4 chunks, 1 cached): 0, 2, 3; the rest of
    # its file: 5; after it 1 MiB = 16 chunks after 5, less the cold ones
    assert idx(w) == [5, 0, 2, 3, 6, 8] + list(range(10, 22))
    big = FakeMgr()                                      # 1 MiB chunks: none follow
    ra2, _ = make(big)
    big.cache.cached.add(17)
    assert idx(ra2.on_request(17 * MiB, 4096, True)) == [18, 19, 20, 21, 22, 23]


def test_the_daemon_marks_the_chunks_of_cold_files(tmp_path):
    """At mount the daemon learns the file runs and which chunks only cold files hold
    (BlobManager.is_cold): what readahead windows leave out."""
    import helpers

    from fscache_daemon.daemon import Daemon
    from fscache_daemon.storage.image import chunk_owners
    boot = cold_image(tmp_path)
    d = Daemon(str(tmp_path / "cache"), frontend="none", threads=2)
    d.start()
    try:
        d.mount(boot, str(tmp_path / "m"), f"localfs:{tmp_path / 'blobs'}")
        mgr = next(iter(d.blobs.values()))
        helpers.wait_until(lambda: mgr.run_end(mgr.meta.chunks[0]) > 0, 10, "file runs")
        owners = chunk_owners(boot, {0: {c.uncompressed_offset for c in mgr.meta.chunks}})
        by_name = {o[0][0]: mgr.is_cold(c) for c in mgr.meta.chunks
                   for o in [owners[(0, c.uncompressed_offset)]]}
        assert by_name == {"/pkg/mod.py": True, "/pkg/inc.h": True, "/pkg/stub.pyi": True,
                           "/pkg/__pycache__/mod.cpython-311.pyc": False,
                           "/pkg/lonely.py": False, "/data.bin": False}
    finally:
        d.shutdown()


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


class SizedMeta(FakeMeta):
    """Chunks of the given sizes (KiB) back to back, 4 KiB aligned; chunk size 1 MiB."""

    chunk_size = MiB

    def __init__(self, kib):
        self.chunks, off = [], 0
        for i, k in enumerate(kib):
            self.chunks.append(BlobChunk(i, off, k << 10, off, k << 10, b"d" * 32, False))
            off += k << 10
        self._starts = [c.uncompressed_offset for c in self.chunks]


def test_before_the_bootstrap_walk_a_run_ends_at_its_first_short_chunk():
    """Until the file runs are known (mgr.run_end 0) a file is guessed from the chunk
    map: full chunks, then a short last one. A miss in a file of 3 chunks gets the rest
    of that file only (not a small file); one in a small file its small neighbours, within
    NEIGHBOURS_BEFORE on both sides (the cold files are not known yet); one in a file
    longer than the largest window is a big file's (AROUND only)."""
    kib = [1024, 1024, 200, 8, 12, 100, 60, 100, 1024] + [1024] * 40 + [4]
    mgr = FakeMgr(n=len(kib))
    mgr.meta = SizedMeta(kib)
    mgr.size = sum(kib) << 10
    mgr.run_end = lambda c: 0                             # the walk is not done yet
    ra, _ = make(mgr, initial=2 * MiB, maximum=16 * MiB)
    mgr.cache.cached.add(0)
    w = ra.on_request(0, 4096, True)
    assert idx(w) == [1, 2] and w.marker is None          # the rest of file 0..2
    mgr.cache.cached.add(4)
    w = ra.on_request(mgr.meta.chunks[4].uncompressed_offset, 4096, True)
    # 256 KiB before 4 reach into 1 (a full chunk: no small file), after it 5, 6, 7
    assert idx(w) == [2, 3, 5, 6, 7]
    mgr.fetch(w)
    mgr.cache.cached.add(20)                              # in the 41 MiB file 8..49
    w = ra.on_request(mgr.meta.chunks[20].uncompressed_offset, 4096, True)
    assert idx(w) == [21] and w.marker is None


def test_once_the_modules_are_known_only_a_module_miss_brings_neighbours():
    """entry_points.txt, /etc/group, small libraries: their neighbours were rarely read.
    After add_modules a miss in another small file gets only the rest of it."""
    K = 64 << 10
    mgr = FakeMgr(n=64)
    mgr.meta = SmallMeta(64)
    mgr.size = 64 * K
    mgr.run_end = lambda c: c.uncompressed_end           # a file per chunk
    ra, _ = make(mgr, initial=2 * MiB)
    ra.add_modules([(10 * K, 12 * K)])                   # chunks 10 and 11: modules
    mgr.cache.cached.add(4)
    assert ra.on_request(4 * K, 4096, True) is None      # no module: nothing around it
    mgr.cache.cached.add(10)
    w = ra.on_request(10 * K, 4096, True)
    assert w.kind == "neighbours" and 11 in idx(w) and 9 in idx(w)


def _runs_tree(src) -> None:
    import random
    rnd = random.Random(7)
    shared = rnd.randbytes(3 << 20)                       # deduplicated chunks
    for d in range(3):
        sub = src / f"d{d}" / "deeper"
        sub.mkdir(parents=True)
        (sub / "big.so").write_bytes(shared + rnd.randbytes(2 << 20))
        (src / f"d{d}" / "again.so").write_bytes(rnd.randbytes(1 << 20) + shared)
        (src / f"d{d}" / "empty").write_bytes(b"")
        os.symlink("deeper/big.so", src / f"d{d}" / "link")
    many = src / "many"
    many.mkdir()
    for i in range(400):                                  # several directory blocks
        (many / f"module_with_a_long_name_{i:04d}.pyc").write_bytes(rnd.randbytes(100 + i))
    os.link(many / "module_with_a_long_name_0001.pyc", src / "hardlink.pyc")


def test_the_c_walk_finds_the_readers_file_runs(tmp_path):
    """The C core's bootstrap walk (reader.runs) gives exactly the reader's walk's runs,
    in its order (hard links: the first path), at every max_inodes; on a tree the
    reader refuses part of, the reader's walk (which skips that part) decides."""
    from test_daemon_support import pack

    from erofs_tools._native_runs import file_runs_walk
    from erofs_tools.reader.image import open_image
    from erofs_tools.reader.runs import _reader_runs, data_runs
    src = tmp_path / "src"
    src.mkdir()
    _runs_tree(src)
    boot = str(tmp_path / "boot")
    pack(str(src), boot, str(tmp_path / "blobs"), "--chunk-size", "0x100000")
    img = open_image(boot)
    want_paths, want = _reader_runs(img, 1 << 22, 0)
    assert len(want_paths) == 3 * 2 + 400                 # empty files have no runs
    assert (b"/hardlink.pyc" in want_paths) + \
        (b"/many/module_with_a_long_name_0001.pyc" in want_paths) == 1
    again = [want_paths.index(p) for p in want_paths if p.endswith(b"again.so")]
    assert any(sum(r[0] == f for r in want) > 1 for f in again)   # split by dedupe
    assert file_runs_walk(img.data, img.meta_off, img.blkszbits, img.root_nid,
                          img.device_id_mask, len(img.devices), 1 << 22) == \
        (want_paths, want)
    for m in (0, 1, 7, 100, 1000):
        assert data_runs(img, m) == _reader_runs(img, m, 0)
    # a subdirectory whose '..' is wrong: the reader skips it; the C walk leaves it to it
    sub = img.lookup("/d1/deeper")
    ents = img.dirents(sub)
    dotdot = [i for i, d in enumerate(ents) if d.name == b".."][0]
    assert sub.layout == 2 and sub.size <= img.blksz       # inline: the block at data_end
    data = bytearray(img.data)
    img.close()
    struct.pack_into("<Q", data, sub.data_end + 12 * dotdot, sub.nid)
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(data))
    img = open_image(str(bad))
    assert file_runs_walk(img.data, img.meta_off, img.blkszbits, img.root_nid,
                          img.device_id_mask, len(img.devices), 1 << 22) is None
    paths, got = data_runs(img)
    assert (paths, got) == _reader_runs(img, 1 << 22, 0)
    kept = [p for p in want_paths if not p.startswith(b"/d1/deeper/")]
    assert paths == kept and len(kept) == len(want_paths) - 1
    assert [(paths[f], b, s, e) for f, b, s, e in got] == \
        [(want_paths[f], b, s, e) for f, b, s, e in want if want_paths[f] in kept]
    img.close()


def test_a_reader_going_through_cold_files_in_blob_order_stays_sequential():
    """Cold files (sources beside their compiled Python, headers) are left out of
    windows and skipped by the sequential test, for a program's start rarely reads
    them; a reader in a cold file reads them itself (a tree read whole): for it the
    chunk before counts as it is and its windows take the cold files too (left out,
    each cold file was a miss of its own: 1,100 misses on a 300 MiB /usr tree)."""
    mgr = ColdMgr(cold=set(range(16, 40)), file_mib=1)   # a file per chunk
    ra, _ = make(mgr, initial=4 * MiB)
    mgr.cache.cached.update({16})
    assert ra.on_request(16 * MiB, 4096, False) is None  # the reader read cold chunk 16
    mgr.cache.cached.add(17)
    w = ra.on_request(17 * MiB, 4096, True)              # next cold file: a miss
    assert w is not None and w.kind == "sequential" and idx(w) == [18, 19, 20, 21]
    warm = ColdMgr(cold={18, 19}, file_mib=1)            # a warm reader: as before
    ra2, _ = make(warm, initial=4 * MiB)
    warm.cache.cached.update({16})
    assert ra2.on_request(16 * MiB, 4096, False) is None
    warm.cache.cached.add(17)
    assert idx(ra2.on_request(17 * MiB, 4096, True)) == [20, 21]
