"""What the daemon streams at mount of an image with a prefetch table
(fscache_daemon/storage/image.py, `ImageInfo.prefetch`): of an optimized image, the
region the trace saw (its prefetch blob), not the untraced rest of a partly read file;
of an image packed with --prefetch-list, the listed files whole."""

import json

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
    for name, size in SIZES.items():
        if "/" not in name:
            (src / name).write_bytes(bytes([len(name)]) * size)
    (tmp_path / "list").write_text("/c.bin\n/e.bin\n")
    boot = str(tmp_path / "boot")
    pack(str(src), boot, str(tmp_path / "blobs"), "--chunk-size", hex(CHUNK),
         "--prefetch-list", str(tmp_path / "list"))
    info = load_image(boot)
    assert sum(n for _, _, n in info.prefetch) == SIZES["c.bin"] + SIZES["e.bin"]
