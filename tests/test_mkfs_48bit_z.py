"""-E48bit with -z (mkfs.erofs 1.9, Linux 6.15+): a compressed file's extents listed as
records (16 bytes: each extent's file and pcluster offsets; 4: every extent but the last
one lcluster of 2^k bytes, the pclusters back to back; 8: the same with their own
offsets) where they are smaller than the full lcluster index, else the lcluster indexes
as without -E48bit (and always with an inline tail, -Eztailpacking), as mkfs.erofs 1.9.4
decides. Each image is mounted by the host kernel and compared with mkfs.erofs 1.9.4's of
the same tree (full metadata) and the source's content; fsck.erofs 1.9.4 passes on it;
our reader reads it back; its size is compared with mkfs.erofs's. Before, "-E 48bit: not
with -z yet" refused every one.

mkfs.erofs 1.9.4 compresses zstd (an algorithm it can compress to any length) into
unaligned pclusters with -E48bit (each 2^k bytes of input to its exact compressed length,
byte after byte); this mkfs keeps block-aligned pclusters filled to the block (as for
every algorithm), written as extent records."""
import os
import subprocess
import sys

import pytest
from helpers import (
    anchor_mkfs,
    assert_same_image_for_any_workers,
    fsck,
    kernel_view,
    mounted,
    record_sizes,
    run_mkfs,
    sha256s,
    write_zmix_tree,
)

from erofs_tools.format import erofs as E

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def ztree(tmp_path_factory):
    root = tmp_path_factory.mktemp("m48z") / "src"
    write_zmix_tree(root)
    return root


def anchor(image, source, *args):
    anchor_mkfs(image, source, *args, epoch=None)


# (our args, the size bound against mkfs.erofs 1.9.4's image, the record sizes expected)
COMBOS = {
    "lz4hc": (("-zlz4hc",), 1.01, {16, 4}),
    "lz4hc-C": (("-zlz4hc", "-C65536"), 1.01, {4}),
    "lzma": (("-zlzma",), 1.01, {16, 4}),
    "lzma-C": (("-zlzma,level=9", "-C32768"), 1.01, {16, 4}),
    "zstd": (("-zzstd",), 1.10, {16, 4}),
    "lz4hc-fragments": (("-zlz4hc", "-Efragments"), 1.01, {16}),
    "lzma-fragments-C": (("-zlzma", "-Efragments", "-C16384"), 1.01, {16}),
    "lz4hc-ztailpacking": (("-zlz4hc", "-Eztailpacking"), 1.01, set()),
    "lz4hc-dedupe": (("-zlz4hc", "-Ededupe"), 1.01, {16}),
    "zstd-fragments-dedupe": (("-zzstd", "-Efragments,dedupe"), 1.10, {16}),
    "lz4hc-b1024": (("-zlz4hc", "-b", "1024"), 1.01, {16}),
    "lz4hc-legacy-compress": (("-zlz4hc", "-Elegacy-compress"), 1.01, {16, 4}),
    "lz4hc-max-extent-bytes": (("-zlz4hc", "--max-extent-bytes=8192"), 1.01, {4}),
    "lz4hc-dedupe-fragments-C": (("-zlz4hc", "-Ededupe,fragments", "-C16384"), 1.01, {16}),
    "lzma-all-fragments": (("-zlzma", "-Eall-fragments,fragdedupe=full"), 1.01, set()),
}


@pytest.mark.parametrize("combo", COMBOS)
def test_same_tree_as_mkfs_erofs(ztree, tmp_path, combo):
    args, bound, recs = COMBOS[combo]
    ours, ref = tmp_path / "ours.img", tmp_path / "ref.img"
    run_mkfs(ours, ztree, "-q", "-U", "clear", "-E48bit", *args)
    anchor(ref, ztree, "-E48bit", *args)
    fsck(ours)
    size, rsize = ours.stat().st_size, ref.stat().st_size
    assert size <= rsize * bound + 4096, (size, rsize)
    kinds = record_sizes(ours)
    assert recs <= set(kinds), kinds
    if "ztailpacking" in combo:
        # an inline tail: lcluster indexes, as mkfs.erofs 1.9.4
        assert all(isinstance(k, str) for k in kinds), kinds
    with mounted(ours) as m_ours, mounted(ref) as m_ref:
        got = kernel_view(m_ours)
        assert got == kernel_view(m_ref)
    assert sha256s(got) == sha256s(kernel_view(ztree))
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "erofs_tools", "check", os.fspath(ours)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    p = subprocess.run([sys.executable, "-m", "erofs_tools", "unpack", "-o", os.fspath(out),
                        os.fspath(ours)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert kernel_view(out) == got


def test_records_only_where_smaller(ztree, tmp_path):
    """A file of many small extents (each block compressed alone, -C4096 incompressible
    noise between text) keeps the lcluster indexes when 16-byte records would not be
    smaller than its full index, as mkfs.erofs 1.9.4; the same files in both images."""
    src = tmp_path / "src"
    src.mkdir()
    from helpers import noise, text
    (src / "striped").write_bytes(b"".join(text(2048, i) + noise(2048, i) for i in range(64)))
    (src / "plain-text").write_bytes(text(100_000, 99))
    ours, ref = tmp_path / "ours.img", tmp_path / "ref.img"
    run_mkfs(ours, src, "-q", "-U", "clear", "-E48bit", "-zlz4hc")
    anchor(ref, src, "-E48bit", "-zlz4hc")
    assert record_sizes(ours) == record_sizes(ref)
    fsck(ours)
    with mounted(ours) as m_ours, mounted(ref) as m_ref:
        assert kernel_view(m_ours) == kernel_view(m_ref)


def test_file_over_4gib(tmp_path):
    """A sparse 4.3 GiB file: 32-byte records (their lstart_hi), ours as mkfs.erofs
    1.9.4's; the kernel and our reader agree on its bytes past 2^32 and at its end."""
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "z", "wb") as f:
        f.truncate((1 << 32) + (300 << 20))
        f.seek((1 << 32) + 12345)
        f.write(b"past 4 GiB")
        f.seek(0, 2)
        f.write(b"tail\n")
    ours, ref = tmp_path / "ours.img", tmp_path / "ref.img"
    run_mkfs(ours, src, "-q", "-U", "clear", "-E48bit", "-zlz4")
    anchor(ref, src, "-E48bit", "-zlz4")
    assert record_sizes(ours) == record_sizes(ref) == {32: 1}
    assert ours.stat().st_size <= ref.stat().st_size
    fsck(ours, extract=False)
    from erofs_tools.reader.image import open_image
    from erofs_tools.reader.zdata import read_range
    size = (1 << 32) + (300 << 20) + 5
    for img in (ours, ref):
        with open_image(img) as im:
            ino = next(i for _p, _d, i in im.walk() if i.is_reg())
            assert ino.size == size
            got = (read_range(im, ino, (1 << 32) + 12340, 20), read_range(im, ino, size - 8, 8))
        with mounted(img) as m, open(os.path.join(m, "z"), "rb") as f:
            f.seek((1 << 32) + 12340)
            kernel = f.read(20)
            f.seek(size - 8)
            assert got == (kernel, f.read(8)) == (b"\0" * 5 + b"past 4 GiB" + b"\0" * 5,
                                                  b"\0\0\0tail\n")


@pytest.mark.parametrize("args", [("-zlz4hc", "-Efragments"), ("-zlzma", "-Ededupe")])
def test_same_image_for_any_workers(ztree, tmp_path, args):
    assert_same_image_for_any_workers(tmp_path, ztree, "-E48bit", *args, workers=(1, 3))


def test_compress_hints(ztree, tmp_path):
    """--compress-hints with -E48bit: each record's format is its file's algorithm (lzma
    for /large, lz4hc else); the kernel reads the files as the source holds them
    (mkfs.erofs 1.9.4 crashes on these options: no image to compare with)."""
    hints = tmp_path / "hints"
    hints.write_text("16384 1 large\n4096 0 .*\n")
    img = tmp_path / "ours.img"
    run_mkfs(img, ztree, "-q", "-U", "clear", "-E48bit", "-zlz4hc:lzma",
             f"--compress-hints={hints}")
    fsck(img)
    from erofs_tools.reader.image import open_image
    from erofs_tools.reader.zdata import state
    algs = {}
    with open_image(img) as im:
        for path, _d, ino in im.walk():
            if ino.is_reg() and ino.layout == E.LAYOUT_COMPRESSED_FULL and ino.size:
                m = state(im).zmap(ino)
                if m.advise & E.ADVISE_EXTENTS:
                    algs[path] = {x.alg for x in m.extents}
    assert algs[b"/large"] == {E.COMPRESSION_LZMA}
    assert algs[b"/big"] == {E.COMPRESSION_LZ4}
    with mounted(img) as m:
        got = kernel_view(m)
    assert sha256s(got) == sha256s(kernel_view(ztree))
