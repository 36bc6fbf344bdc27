"""mkfs --tar=i with -z ALG, as mkfs.erofs 1.9.4 takes it (refused before: "--tar=i keeps
file data in the tar: -z does not apply", so every test here but the refusals failed on
the code before it). What 1.9.4 compresses in an index (read in its source and its
images): no file data (every regular file stays CHUNK_BASED on the tar's device, the
symlinks and, without --zD, the directories plain), but the superblock says -z
(lz4_0padding, lz4's max distance or the algorithm records and their bit mask, the
device table after the records); with --zD the directories go whole into the packed
inode, compressed; -Eztailpacking inlines the packed inode's last pcluster; -Efragments
puts nothing there but the long xattr prefix table (--xattr-inode-digest); -m# compresses
the metabox (with --tar=i 1.9.4 reads -C, -m and -Efragments= in blocks of 4 KiB, then
makes them blocks of 512 bytes: -m4096 is one 512-byte pcluster). For every algorithm
(lz4hc, lzma, zstd, deflate) and those options the host kernel mounts the index with the
tar as its device and the index+tar concatenation, each compared with `tar -x` of the
tar (full metadata); fsck.erofs 1.9.4 passes; our check and unpack read it; the mount
equals that of mkfs.erofs 1.9.4's index of the same tar with the same options, with the
same compression features, and the sizes are printed (ours / 1.9.4's). What 1.9.4
refuses is refused with one line, exit 1, nothing written."""
import os
import shutil
import subprocess

import pytest
from helpers import CI, compare_trees, fsck, mounted, require, require_tool
from test_mkfs_tar import _ref, _tar
from test_tar import _rich_tree
from test_tar_helpers import check_and_unpack, index_layer, run_cli

from erofs_tools.format import erofs as E
from erofs_tools.reader.image import open_image
from erofs_tools.reader.zdata import is_compressed

pytestmark = pytest.mark.root

ALGS = ["lz4hc", "lzma", "zstd", "deflate"]
VARIANTS = {
    "z": (),
    "zD": ("--zD",),
    "ztail": ("-Eztailpacking",),
    "ztail-zD": ("-Eztailpacking", "--zD"),
    "frags": ("-Efragments",),
    "frags-zD": ("-Efragments", "--zD"),
    "m": ("-m4096",),
    "m-zD": ("-m4096", "--zD"),
    "digest": ("--xattr-inode-digest",),
    "digest-frags": ("--xattr-inode-digest", "-Efragments"),
}
# the superblock bits -z decides (CHUNKED_FILE: ours sets it for the chunk-based files,
# mkfs.erofs 1.9.4 leaves it out of its indexes)
ZBITS = (E.FEATURE_INCOMPAT_ZERO_PADDING | E.FEATURE_INCOMPAT_COMPR_CFGS
         | E.FEATURE_INCOMPAT_FRAGMENTS | E.FEATURE_INCOMPAT_48BIT
         | E.FEATURE_INCOMPAT_METABOX | E.FEATURE_INCOMPAT_XATTR_PREFIXES)


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    """-> (the layer tar, with a sparse member; the same without it, which mkfs.erofs
    1.9.4 reads; the `tar -x` of the first)"""
    base = tmp_path_factory.mktemp("tarixz")
    src = base / "src"
    _rich_tree(str(src))
    many = src / "d" / "many"
    many.mkdir()
    for i in range(300):                      # a directory of many 512-byte blocks
        (many / (f"{i:04d}-" + "n" * 190)).write_bytes(b"%d\n" % i)
    for i in range(40):                       # directories that compress
        (src / "d" / f"sub{i:02d}").mkdir()
        (src / "d" / f"sub{i:02d}" / "file-with-a-longer-name").write_bytes(b"x" * i)
    for p in (many, *many.iterdir(), src / "d"):
        os.utime(p, ns=(1, 1_650_000_000_123_456_789), follow_symlinks=False)
    full = _tar(src, base / "full.tar")
    plain = _tar(src, base / "plain.tar", extra=("--exclude=./sparse",))
    return full, plain, _ref(full, str(base / "ref"))


def _same(ref, tree, opts):
    """`tree` equals `ref` with full metadata (-m is the 48-bit layout: mtimes to the
    second, as for -E48bit)"""
    wide = any(o.startswith("-m") for o in opts)
    diffs = compare_trees(ref, tree, check_nlink=True, ignore=("mtime_ns",) if wide else ())
    assert not diffs, "\n".join(diffs[:40])


def _what(img, tar):
    """-> (the superblock's -z bits, its u1 (lz4's distance or the algorithms' mask),
    directories, compressed ones, compressed inodes that are not directories, regular
    files not chunk-based on device 1)"""
    im = open_image(img, devices=[tar])
    dirs = nz = other = flat = 0
    for _p, _d, ino in im.walk():
        if ino.is_dir():
            dirs += 1
            nz += is_compressed(ino)
        elif is_compressed(ino):
            other += 1
        elif ino.is_reg() and ino.size and ino.layout != E.LAYOUT_CHUNK_BASED:
            flat += 1
    return im.sb.feature_incompat & ZBITS, im.sb.u1, dirs, nz, other, flat


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("alg", ALGS)
def test_index_z(tmp_path, layer, alg, variant):
    """kernel (tar as device 1, and appended), fsck.erofs 1.9.4, our check and unpack;
    the same tree and compression features as mkfs.erofs 1.9.4's index"""
    full, plain, ref = layer
    opts = ("-z", alg, *VARIANTS[variant])
    idx = tmp_path / "l.idx"
    p = run_cli("mkfs", "-q", "--tar=i", *opts, idx, full, check=False)
    assert p.returncode == 0, p.stderr
    fsck(idx, devices=[full])
    with mounted(idx, f"device={full}") as mnt:
        _same(ref, mnt, opts)
    with mounted(index_layer(idx, full, tmp_path / "layer.erofs")) as mnt:
        _same(ref, mnt, opts)
    _same(ref, str(check_and_unpack(idx, full, tmp_path / "out")), opts)
    # against mkfs.erofs 1.9.4 on the tar without the sparse member
    require_tool("mkfs.erofs")
    ours, theirs = tmp_path / "o.idx", tmp_path / "a.idx"
    run_cli("mkfs", "-q", "-T0", "-U", "clear", "--tar=i", *opts, ours, plain)
    subprocess.run(["mkfs.erofs", "--quiet", "-T0", "-Uclear", "--tar=i", *opts, str(theirs),
                    str(plain)], check=True, capture_output=True)
    fsck(ours, devices=[plain])
    mine, anchor = _what(ours, plain), _what(theirs, plain)
    assert mine == anchor, (mine, anchor)
    assert mine[3] == (mine[2] if "--zD" in opts else 0) and mine[4:] == (0, 0)
    with mounted(ours, f"device={plain}") as mnt, \
            mounted(theirs, f"device={plain}") as amnt:
        diffs = compare_trees(amnt, mnt, check_nlink=True)
        assert not diffs, "\n".join(diffs[:40])
    so, sa = os.path.getsize(ours), os.path.getsize(theirs)
    print(f"--tar=i {' '.join(opts)}: ours {so} bytes, mkfs.erofs 1.9.4 {sa}, "
          f"ratio {so / sa:.4f}")
    assert so <= sa + 1024


TREES = {"python3.11": "/usr/lib/python3.11", "doc": "/usr/share/doc"}
SIZE_OPTS = [("-zlz4hc",), ("-zlz4hc", "--zD"), ("-zlz4hc", "-Eztailpacking", "--zD"),
             ("-zlzma", "--zD"), ("-zzstd", "--zD"), ("-zdeflate", "--zD"),
             ("-zlz4hc", "-m4096"), ("-zlz4hc", "--zD", "-m4096"),
             ("-zlz4hc", "--xattr-inode-digest", "-Efragments")]


@pytest.fixture(scope="module")
def big_tars(tmp_path_factory):
    base = tmp_path_factory.mktemp("bigtars")
    out = {}
    for name, path in TREES.items():
        require(os.path.isdir(path), f"{path} missing")
        out[name] = str(base / f"{name}.tar")
        subprocess.run(["tar", "-C", os.path.dirname(path), "-cf", out[name],
                        os.path.basename(path)], check=True)
    return out


@pytest.mark.parametrize("opts", SIZE_OPTS, ids=[" ".join(o) for o in SIZE_OPTS])
@pytest.mark.parametrize("tree", sorted(TREES))
def test_index_z_size(tmp_path, big_tars, tree, opts):
    """the index of a tar of /usr/lib/python3.11 and of /usr/share/doc against mkfs.erofs
    1.9.4's with the same options (the ratio printed): fsck.erofs 1.9.4 passes on ours,
    the same compression features, at most 1 % larger (docs/tar.md has the figures)"""
    require_tool("mkfs.erofs")
    tar = big_tars[tree]
    ours, theirs = tmp_path / "o.idx", tmp_path / "a.idx"
    run_cli("mkfs", "-q", "-T0", "-U", "clear", "--tar=i", *opts, ours, tar)
    subprocess.run(["mkfs.erofs", "--quiet", "-T0", "-Uclear", "--tar=i", *opts, str(theirs),
                    tar], check=True, capture_output=True)
    fsck(ours, extract=False, devices=[tar])
    assert _what(ours, tar) == _what(theirs, tar)
    so, sa = os.path.getsize(ours), os.path.getsize(theirs)
    print(f"--tar=i {' '.join(opts)} {TREES[tree]}: ours {so} / mkfs.erofs 1.9.4 {sa} = "
          f"{so / sa:.4f}")
    assert so <= sa * 1.01


@pytest.mark.parametrize("args", [
    ("-zlz4hc", "-m8192"),          # the metabox's pcluster over -C's (4 KiB units)
    ("-zlz4hc", "-m512"),           # under 4 KiB: 1.9.4 reads -m in 4 KiB blocks
    ("-m1024",),
    ("-zlz4hc", "-C1024"),          # so it reads -C
    ("-zlz4hc", "-C2048", "--zD"),
])
def test_index_z_refused_as_mkfs_erofs(tmp_path, layer, args):
    """what mkfs.erofs 1.9.4 refuses with --tar=i is refused: one line, exit 1, nothing
    written (1.9.4 itself leaves a partial image behind)"""
    plain = layer[1]
    img = tmp_path / "x.idx"
    p = run_cli("mkfs", "--tar=i", *args, img, plain, check=False)
    assert p.returncode == 1 and p.stderr.count(b"\n") == 1, p.stderr
    assert p.stderr.startswith(b"error: ") and not img.exists()
    assert os.listdir(tmp_path) == []
    if shutil.which("mkfs.erofs") or CI:
        a = subprocess.run(["mkfs.erofs", "--quiet", "--tar=i", *args,
                            str(tmp_path / "a.idx"), plain], capture_output=True)
        assert a.returncode != 0
