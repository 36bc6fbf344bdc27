"""erofs-tools mkfs -z ALG,dictsize=N (lzma, zstd, deflate) and lzma's lc=/lp=/pb=, as
mkfs.erofs 1.9 spells them: the images mount with the host kernel and compare clean,
fsck.erofs 1.9 passes, the configuration records after the superblock hold the window
mkfs.erofs writes for the same options, and what the kernel or liblzma would refuse is
a one-line error."""
import os
import struct
import subprocess

import pytest
from helpers import mkfs_and_check, noise, require_tool, run_mkfs, text

pytestmark = pytest.mark.root

ALG_NAMES = {1: "lzma", 2: "deflate", 3: "zstd"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Text with repeats farther apart than a small window, noise, small files."""
    root = tmp_path_factory.mktemp("dtree") / "src"
    root.mkdir()
    block = text(200 << 10, 3)
    (root / "far").write_bytes(block + noise(300 << 10, 4) + block)
    (root / "text").write_bytes(text(1 << 20, 5))
    (root / "rand").write_bytes(noise(70000, 6))
    for i in range(12):
        (root / f"f{i}").write_bytes(text(i * 900 + 7, i))
    return root


def records(image):
    """{algorithm name: its configuration record's payload} of an image with
    COMPR_CFGS (le16 length + payload each, 4-byte aligned, in algorithm order)."""
    with open(image, "rb") as f:
        f.seek(1024)
        sb = f.read(128)
        incompat, u1 = struct.unpack_from("<IH", sb, 0x50)
        assert incompat & 0x2, "no COMPR_CFGS"
        out, off = {}, 1024 + 128
        for alg in range(16):
            if u1 & (1 << alg):
                off = (off + 3) & ~3
                f.seek(off)
                (n,) = struct.unpack("<H", f.read(2))
                out[ALG_NAMES[alg]] = f.read(n)
                off += 2 + n
    return out


def window(alg, rec):
    if alg == "lzma":
        return struct.unpack_from("<I", rec, 0)[0]
    if alg == "deflate":
        return 1 << rec[0]
    return 1 << (rec[1] + 10)                 # zstd: format, then log2(window) - 10


@pytest.mark.parametrize("z,size,expect", [
    ("lzma,dictsize=64k", 131072, {"lzma": 65536}),
    ("lzma,level=6,dictsize=0x100000,lc=4,lp=0,pb=0", 131072, {"lzma": 1 << 20}),
    ("lzma,dictsize=5000", 65536, {"lzma": 5000}),
    ("zstd,dictsize=65536", 131072, {"zstd": 65536}),
    ("zstd,level=9,dictsize=1m", 65536, {"zstd": 1 << 20}),
    ("deflate,dictsize=32768", 65536, {"deflate": 32768}),
    # one record per algorithm: the widest window of its -z entries
    ("lzma,dictsize=32k:lzma,dictsize=256k", 65536, {"lzma": 262144}),
    ("zstd,dictsize=4k:lzma,dictsize=128k:zstd", 16384, {"zstd": 131072, "lzma": 131072}),
])
def test_dictsize(root_kernel, tree, tmp_path, z, size, expect):
    img = tmp_path / "d.img"
    mkfs_and_check(img, tree, "-z", z, "-C", size)
    got = {alg: window(alg, rec) for alg, rec in records(img).items()}
    assert got == expect
    # the records are the ones mkfs.erofs 1.9 writes for the same options
    require_tool("mkfs.erofs")
    ref = tmp_path / "ref.img"
    subprocess.run(["mkfs.erofs", "-T", "0", f"-z{z}", f"-C{size}", os.fspath(ref),
                    os.fspath(tree)], capture_output=True, check=True)
    assert records(img) == records(ref)


def test_lzma_props_change_the_stream(root_kernel, tree, tmp_path):
    """lc/lp/pb reach the encoder: other streams, which the kernel decodes the same."""
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    mkfs_and_check(a, tree, "-z", "lzma", "-U", "clear")
    mkfs_and_check(b, tree, "-z", "lzma,lc=0,lp=2,pb=0", "-U", "clear")
    assert a.read_bytes() != b.read_bytes()


def test_small_dict_compresses_far_repeats_worse(tree, tmp_path):
    """dictsize= is the encoder's window too, not only the record: a repeat 500 KiB
    back is found with a 1 MiB window and not with a 64 KiB one."""
    small, big = tmp_path / "s.img", tmp_path / "b.img"
    run_mkfs(small, tree, "-z", "lzma,dictsize=64k", "-C", "1048576", "-T", "0")
    run_mkfs(big, tree, "-z", "lzma,dictsize=1m", "-C", "1048576", "-T", "0")
    assert big.stat().st_size < small.stat().st_size


@pytest.mark.parametrize("z,msg", [
    ("lz4,dictsize=64k", "lz4 takes no dictionary size"),
    ("lz4hc,dictsize=64k", "lz4hc takes no dictionary size"),
    ("zstd,dictsize=3000", "zstd dictionary size 3000 is not a power of two"),
    ("zstd,dictsize=2m", "zstd dictionary size 2097152 is not a power of two in 1024..1048576"),
    ("zstd,dictsize=512", "zstd dictionary size 512"),
    ("lzma,dictsize=16m", "lzma dictionary size 16777216 is not in 4096..8388608"),
    ("lzma,dictsize=1000", "lzma dictionary size 1000"),
    ("deflate,dictsize=4096", "deflate dictionary size 4096: only 32768"),
    ("lzma,dictsize=12q", "dictsize is not a number: '12q'"),
    ("lzma,dictsize=8g", "dictsize 8g is too large"),
    ("lzma,dictsize=0", "dictsize 0"),
    ("lzma,lp=2", "lzma lc=3 lp=2 pb=2: each at most 4, lc + lp at most 4"),
    ("lzma,pb=5", "lzma lc=3 lp=0 pb=5"),
    ("lzma,lc=1k", "lc is not a number"),
    ("zstd,lc=1", "lc= is an lzma option, not zstd's"),
    ("lz4:lzma,dictsize=64k:zstd,dictsize=3", "zstd dictionary size 3 "),
])
def test_bad_dictsize(tree, tmp_path, z, msg):
    out = tmp_path / "out"
    out.mkdir()
    p = run_mkfs(out / "bad.img", tree, "-z", z, check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], p.stderr
    assert os.listdir(out) == []            # no image, no temporary file
