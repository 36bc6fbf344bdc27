"""fscache-daemon against `mount.erofs -t erofs.fanotify` (benchmarks/bench_fanotify_anchor.py,
issue 15): the chunk map a cold mount makes from the bootstrap alone, and one quick run of
the whole benchmark on a tiny tree (real registry, kernel mounts, both daemons; not timed,
only checked to work, to read the same bytes both ways and to leave nothing behind)."""

from __future__ import annotations

import glob
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import helpers
import pytest
from test_daemon_support import pack, write_tree

from erofs_tools.reader import blob as rblob
from fscache_daemon.storage import blobcache as bc
from fscache_daemon.storage import chunkmap
from fscache_daemon.storage.backends import LocalFsBackend
from fscache_daemon.storage.image import load_image

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("compressor", ["none", "zstd"])
def test_chunk_map_from_pins_is_the_blobs_own(tmp_path, compressor):
    """A bootstrap that pins every chunk gives the chunk map the blob's own table gives
    (places, sizes, flags, digests, algorithms), with no backend read."""
    src = write_tree(str(tmp_path / "src"), seed=5, nfiles=30, big=(3 << 20, 1 << 20))
    boot, blobs = str(tmp_path / "boot"), str(tmp_path / "blobs")
    pack(src, boot, blobs, "--compressor", compressor, "--chunk-size", "0x40000")
    ref = load_image(boot).blobs[0]
    assert len(ref.pins) == ref.entry.chunk_count > 1
    with open(os.path.join(blobs, ref.blob_id), "rb") as f:
        own = rblob.BlobMeta.from_blob(rblob.file_reader(f), ref.compressed_size,
                                       blob_id=ref.blob_id, entry=ref.entry)
    made = chunkmap._meta_from_pins(ref.blob_id, ref.entry, ref.compressed_size, ref.pins)
    assert made is not None
    assert made.chunks == own.chunks
    assert (made.compressor, made.digester, made.chunk_size, made.uncompressed_size) == \
        (own.compressor, own.digester, own.chunk_size, own.uncompressed_size)
    meta, fetched = bc.load_or_fetch_meta(str(tmp_path / "cache"), ref.blob_id,
                                          LocalFsBackend(blobs), entry=ref.entry,
                                          blob_size=ref.compressed_size, digests=ref.digests,
                                          pins=ref.pins, table=ref.table_digest)
    assert fetched == 1 and meta.chunks == own.chunks    # one byte: the blob is there
    # a bootstrap pinning only part of the blob still reads the blob's own table
    some = dict(list(ref.pins.items())[:-1])
    assert chunkmap._meta_from_pins(ref.blob_id, ref.entry, ref.compressed_size, some) is None
    meta, fetched = bc.load_or_fetch_meta(str(tmp_path / "cache2"), ref.blob_id,
                                          LocalFsBackend(blobs), entry=ref.entry,
                                          blob_size=ref.compressed_size, digests=ref.digests,
                                          pins=some)
    assert fetched > 0 and meta.chunks == own.chunks


def test_metadata_ranges_cover_all_but_file_data(tmp_path):
    """What the benchmark seeds mount.erofs's sparse file with: every block of the image
    except regular files' data."""
    sys.path.insert(0, str(BENCH))
    import anchor
    import bench_fanotify_anchor as bench
    fan = anchor.cached_fanotify_builds()
    helpers.require(bool(fan), "the fanotify anchor is not built (benchmarks/anchor.py "
                    "--fanotify)")
    src = write_tree(str(tmp_path / "src"), seed=6, nfiles=20, big=(1 << 20,))
    img = str(tmp_path / "img")
    subprocess.run([str(fan[-1] / "bin" / "mkfs.erofs"), "-E^inline_data", "--quiet", img,
                    src], check=True)
    ranges = bench.metadata_ranges(img)
    size = os.path.getsize(img)
    assert ranges[0][0] == 0 and all(o % 4096 == 0 for o, _ in ranges)
    sts = {st.st_ino: st for st in (os.lstat(os.path.join(d, n))
                                     for d, _ds, fs in os.walk(src) for n in fs)}
    data = sum(st.st_size for st in sts.values() if stat.S_ISREG(st.st_mode))
    meta = sum(n for _, n in ranges)
    assert meta < size and size - meta >= data


@pytest.mark.root
@pytest.mark.registry
def test_quick_run_of_the_benchmark(tmp_path):
    from test_daemon_support import require_lazy_kernel
    require_lazy_kernel()
    helpers.require(subprocess.run(["which", "docker-registry"],
                                   capture_output=True).returncode == 0,
                    "docker-registry needed (apt-get install docker-registry)")
    out = tmp_path / "result.json"
    work = tmp_path / "work"
    p = subprocess.run([sys.executable, str(BENCH / "bench_fanotify_anchor.py"), "--mib",
                        "8", "--tree", "generated", "--rounds", "1", "--workdir", str(work),
                        "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["rows"]) == {"mount_s", "cold_s", "warm_s", "startup_s", "peak_rss_mib"}
    for row in res["rows"].values():
        assert row["theirs"] > 0 and row["ours"] > 0
    runs = res["runs"]
    # both read every byte of the tree, and the same startup set
    assert runs["theirs"]["full"][0]["bytes"] == runs["ours"]["full"][0]["bytes"] >= 8 << 20
    assert runs["theirs"]["startup"][0]["bytes"] == runs["ours"]["startup"][0]["bytes"] > 0
    assert res["theirs_seeded_metadata_bytes"] > 0
    assert runs["ours"]["full"][0]["backend_requests"] > 0
    # nothing left: mounts, mount.erofs workers and their sparse file
    with open("/proc/self/mounts") as f:
        assert str(work) not in f.read()
    for state in glob.glob("/run/erofsmount/fanotify/*.state"):
        pid = int(os.path.basename(state).split(".")[0])
        assert not os.path.exists(f"/proc/{pid}") or str(work) not in open(state).read()
    assert not [p for p in glob.glob("/var/cache/erofsmount/*")
                if os.path.basename(p) in json.dumps(res)]
