"""What the daemon streams at mount of an image with a prefetch table
(fscache_daemon/storage/image.py, `ImageInfo.prefetch`): of an optimized image, the
region the trace saw (its prefetch blob), not the untraced rest of a partly read file;
of an image packed with --prefetch-list, the listed files whole."""

import json
import random

from test_daemon_support import pack
from test_optimize import CHUNK, SIZES, chunks_of, image, synthetic_trace  # noqa: F401
from test_pack import cli

from fscache_daemon.storage.image import load_image


def test_optimized_image_prefetches_the_traced_region_only(image, tmp_path):  # noqa: F811
    # c.bin (12 chunks): only chunks 0 and 5 read; e.bin (2 chunks) read whole
    trace = synthetic_trace(image, [("/c.bin", [0, 5]), ("/e.bin", [0, 1])])
    tfile = tmp_path / "trace.json"
    tfile.write_text(json.dumps(trace))
    res = json.loads(cli("optimize", image["boot"], tmp_path / "opt.boot", "--trace", tfile,
                         "-D", image["blobs"], "--json").stdout)
    info = load_image(str(tmp_path / "opt.boot"))
    ids = [b.blob_id for b in info.blobs]
    pf = ids.index(res["prefetch_blob"])
    # the prefetch blob's chunks only: what the trace saw, 4 chunks
    assert {b for b, _, _ in info.prefetch} == {pf}, info.prefetch
    assert sum(n for _, _, n in info.prefetch) == res["prefetch_bytes"] == 3 * CHUNK + \
        (SIZES["e.bin"] - CHUNK), (info.prefetch, res)
    # the rest of c.bin stays in the source blob and is not prefetched
    src_chunks = [c for c in chunks_of(str(tmp_path / "opt.boot"), "/c.bin") if c[0] != pf]
    assert len(src_chunks) == 10


def test_prefetch_list_image_prefetches_whole_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    r = random.Random(3)
    for name, size in SIZES.items():
        if "/" not in name:     # no chunk repeated: a repeated one is listed once
            (src / name).write_bytes(r.randbytes(size))
    (tmp_path / "list").write_text("/c.bin\n/e.bin\n")
    boot = str(tmp_path / "boot")
    pack(str(src), boot, str(tmp_path / "blobs"), "--chunk-size", hex(CHUNK),
         "--prefetch-list", str(tmp_path / "list"))
    info = load_image(boot)
    assert sum(n for _, _, n in info.prefetch) == SIZES["c.bin"] + SIZES["e.bin"]


class _Chunk:
    def __init__(self, index, size):
        self.index = index
        self.uncompressed_offset = self.compressed_offset = index * size
        self.compressed_size = size


class _Meta:
    def __init__(self, n, size):
        self.size = size
        self.chunks = [_Chunk(i, size) for i in range(n)]

    def chunks_for_range(self, offset, length):
        first, last = offset // self.size, (offset + length - 1) // self.size
        return self.chunks[first:min(last + 1, len(self.chunks))]


class _Mgr:
    """What stream_table uses of a BlobManager: nothing cached, fills counted."""

    def __init__(self, n, size=1 << 20):
        self.meta = _Meta(n, size)
        self.size = n * size
        self.filled = []

    def absent(self, offset, length):
        return self.meta.chunks_for_range(offset, min(length, self.size - offset))

    def fill_chunks(self, chunks, **_kw):
        self.filled += [c.index for c in chunks]
        return sum(c.compressed_size for c in chunks)


class _Pool:
    def submit_readahead(self, fn, *args, **kw):
        from concurrent.futures import Future
        f = Future()
        f.set_result(fn(*args, **kw))
        return f


def test_a_blob_the_table_lists_whole_is_told_apart(monkeypatch):
    """stream_table notes the blobs its table lists whole (an optimized image's prefetch
    blob: unmarked once complete, prefetch.listed_whole) and not a blob of which it lists
    a part (a partly read file's source blob), nor one it never streamed."""
    import threading

    from fscache_daemon import prefetch
    monkeypatch.setattr(prefetch, "TRACE_TABLE_BLOBS", False)
    whole, part, other = _Mgr(6), _Mgr(10), _Mgr(3)
    MIB = 1 << 20
    # the whole blob in two runs (files back to back), the other in one run of 3 chunks
    jobs = [("w", 0, 4 * MIB), ("p", 2 * MIB, 3 * MIB), ("w", 4 * MIB, 2 * MIB - 100)]
    # the same files streamed for another caller (the start set): nothing noted, even
    # for a blob they cover whole (a tiny image's only blob stays marked for its trace)
    guessed = _Mgr(6)
    n = prefetch.stream_table(_Pool(), {"w": guessed}, [("w", 0, 6 * MIB)], threading.Event())
    assert n == 6 * MIB and not prefetch.listed_whole(guessed)
    n = prefetch.stream_table(_Pool(), {"w": whole, "p": part, "o": other}, jobs,
                              threading.Event(), image_table=True)
    assert n == 9 * MIB and sorted(whole.filled) == list(range(6)) and \
        sorted(part.filled) == [2, 3, 4]
    assert [prefetch.listed_whole(m) for m in (whole, part, other)] == [True, False, False]
    monkeypatch.setattr(prefetch, "TRACE_TABLE_BLOBS", True)    # kept marked, as before
    assert not prefetch.listed_whole(whole)


def test_a_table_repeating_a_file_of_one_repeated_chunk_is_one_range():
    """A hostile bootstrap's prefetch table lists one nid over and over, and that file's
    chunks are one deduplicated chunk over and over: every (entry, chunk) was a range,
    2^30 of them for a table of 65,536 entries and a file of 16,384 chunks (a ~400 KB
    bootstrap; tens of GB in the daemon at mount). Each inode and each run count once:
    here 200 x 2,000 runs (400,000 before) give one range, read once from the image."""
    from fscache_daemon.storage.image import _prefetch_ranges

    class Ino:
        def is_reg(self):
            return True

    class Img:
        name = "hostile"
        prefetch = [7] * 200
        maps = 0

        def inode(self, nid):
            assert nid == 7
            return Ino()

        def map_data(self, ino):
            Img.maps += 1
            return [(k * 4096, 4096, 1, 1 << 20) for k in range(2000)]

    assert _prefetch_ranges(Img(), 1) == [(0, 1 << 20, 4096)]
    assert Img.maps == 1
