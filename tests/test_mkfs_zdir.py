"""mkfs --zD (mkfs.erofs 1.9): every directory whole in the packed inode, compressed with
it, its inode a COMPRESSED_FULL one whose map header holds the fragment's offset. Each
image (directory input and --tar=f; lz4hc, lzma, zstd, deflate; with -Eztailpacking,
-Efragments, -Ededupe, big pclusters, full indexes, 1 KiB blocks) is mounted by the host
kernel and compared with the source with full metadata, including a directory of
thousands of entries with long names; fsck.erofs 1.9.4 passes and our reader (check,
unpack) reads it; its size is within 1 % of mkfs.erofs 1.9.4's. `--zD` was refused
before ("no such option"), so each of these failed on the code before it. Our reader also
reads mkfs.erofs's compressed directory that decodes to more than the image holds.
Without -z, as mkfs.erofs 1.9.4, the packed inode is stored plain (refused before with
one line, so that test failed before too)."""
import os
import subprocess

import pytest
from helpers import (
    compare_trees,
    fsck,
    mkfs_and_check,
    mounted,
    noise,
    reader_unpack,
    require_tool,
    run_mkfs,
    text,
)
from test_mkfs_tar import _tar as make_tar

from erofs_tools.format import erofs as E
from erofs_tools.reader.fsck import check_image
from erofs_tools.reader.image import open_image
from erofs_tools.reader.zdata import is_compressed, state

MANY = 3000      # entries of the large directory, names of ~200 bytes: ~150 blocks


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Nested directories (empty ones, one per level), files of many sizes, a directory
    of MANY entries with long names, hardlinks, symlinks, xattrs on directories."""
    root = tmp_path_factory.mktemp("zdir") / "src"
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    files = {"t100k": text(100000, 1), "rnd": noise(20000, 2), "a/small": b"small\n",
             "a/b/t5000": text(5000, 3), "a/b/c/t70000": text(70000, 4), "empty": b""}
    for name, data in files.items():
        (root / name).write_bytes(data)
    many = root / "many"
    many.mkdir()
    for i in range(MANY):
        name = f"{i:05d}-" + "long-entry-name-" * 12 + f"{i * 7919 % 10007}"
        (many / name).write_bytes(b"%d\n" % i)
    for i in range(40):
        (root / "a" / f"sub{i:02d}").mkdir()
        (root / "a" / f"sub{i:02d}" / "f").write_bytes(text(300 + i, i))
    os.link(root / "t100k", root / "a" / "hard")
    os.symlink("../t100k", root / "a" / "sym")
    os.setxattr(root / "a", "user.dir", b"xattr on a compressed directory")
    os.setxattr(root / "a" / "b", "trusted.big", b"v" * 300)
    for p in sorted(root.rglob("*"), reverse=True):
        os.utime(p, ns=(1_700_000_000_123_456_789,) * 2, follow_symlinks=False)
    os.utime(root, ns=(1_700_000_000_123_456_789,) * 2)
    return root


def dirs_compressed(img):
    """-> (directories, compressed ones) of the image, read by our reader"""
    im = open_image(img)
    ndirs = nz = 0
    for _path, _d, ino in im.walk():
        if ino.is_dir():
            ndirs += 1
            nz += is_compressed(ino) and ino.layout == E.LAYOUT_COMPRESSED_FULL
    return ndirs, nz


def reader_round_trip(tmp_path, tree, img, ignore=()):
    out = tmp_path / "out"
    reader_unpack(img, out)
    assert compare_trees(tree, out, check_nlink=True, ignore=ignore) == []
    ndirs, nz = dirs_compressed(img)
    assert ndirs == nz == 46, (ndirs, nz)


VARIANTS = {
    "plain": [],
    "ztailpacking": ["-E", "ztailpacking"],
    "fragments": ["-E", "fragments"],
    "frag+tail+dedupe+big": ["-E", "fragments,ztailpacking,dedupe", "-C", "65536"],
    "legacy": ["-E", "legacy-compress"],
    "1k-blocks": ["-b", "1024"],
}


@pytest.mark.root
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("alg", ["lz4hc", "lzma", "zstd", "deflate"])
def test_zdir_mounts_and_reads(root_kernel, tree, tmp_path, alg, variant):
    img = tmp_path / "z.img"
    mkfs_and_check(img, tree, "-z", alg, "--zD", *VARIANTS[variant], check_nlink=True)
    reader_round_trip(tmp_path, tree, img)


@pytest.mark.root
def test_zdir_tar(root_kernel, tree, tmp_path):
    tar_path = make_tar(tree, tmp_path / "t.tar")
    img = tmp_path / "t.img"
    p = subprocess.run(["erofs-tools", "mkfs", "--tar=f", "-z", "lz4hc", "--zD", "-E",
                        "ztailpacking", os.fspath(img), os.fspath(tar_path)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    fsck(img)
    with mounted(img) as mnt:
        assert compare_trees(tree, mnt, check_nlink=True) == []
        assert len(os.listdir(os.path.join(mnt, "many"))) == MANY
    ndirs, nz = dirs_compressed(img)
    assert ndirs == nz == 46


def anchor(img, tree, *args):
    require_tool("mkfs.erofs")
    subprocess.run(["mkfs.erofs", "--quiet", "-T", "0", "-U", "clear", *args,
                    os.fspath(img), os.fspath(tree)], check=True, capture_output=True)


def test_reader_large_zdir_of_mkfs_erofs(tree, tmp_path):
    """a compressed directory larger than the image (1 KiB blocks, lzma): check and
    unpack read it (refused before: "size ... larger than the image")"""
    img = tmp_path / "a.img"
    anchor(img, tree, "--zD", "-zlzma", "-b", "1024")
    biggest = max(ino.size for _p, _d, ino in open_image(img).walk() if ino.is_dir())
    assert biggest > os.path.getsize(img)
    reader_round_trip(tmp_path, tree, img, ignore=("mtime_ns",))     # (-T 0)


@pytest.mark.parametrize("args", [["-zlz4hc"], ["-zlzma", "-Eztailpacking"],
                                  ["-zlz4hc", "-Efragments"]])
def test_size_as_mkfs_erofs(tree, tmp_path, args):
    """within 1 % of mkfs.erofs 1.9.4's --zD image (and its directories compressed too)"""
    ours, theirs = tmp_path / "o.img", tmp_path / "a.img"
    run_mkfs(ours, tree, "-T", "0", "-U", "clear", "--zD", *args)
    anchor(theirs, tree, "--zD", *args)
    fsck(ours)
    assert dirs_compressed(theirs) == dirs_compressed(ours) == (46, 46)
    ratio = os.path.getsize(ours) / os.path.getsize(theirs)
    assert 0.99 <= ratio <= 1.01, ratio


def dir_offsets(img):
    """-> {directory path: its offset in the packed inode}"""
    im = open_image(img)
    return {p: state(im).zmap(ino).extents[0][3] for p, _d, ino in im.walk() if ino.is_dir()}


def test_directory_order_as_mkfs_erofs(tree, tmp_path):
    """the directories go into the packed inode depth first, children in name order,
    after the fragments, as mkfs.erofs 1.9.4 puts them: each at the same offset"""
    for args in (["-zlz4"], ["-zlz4hc", "-Efragments"]):
        ours, theirs = tmp_path / "o.img", tmp_path / "a.img"
        run_mkfs(ours, tree, "-T", "0", "-U", "clear", "--zD", *args)
        anchor(theirs, tree, "--zD", *args)
        mine, ref = dir_offsets(ours), dir_offsets(theirs)
        assert len(mine) == 46 and mine == ref


@pytest.mark.root
def test_zdir_without_z(root_kernel, tree, tmp_path):
    """--zD without -z, as mkfs.erofs 1.9.4 takes it: the directories in the packed
    inode, stored plain (its tail inline); the same size as mkfs.erofs's image, the
    directories at the same offsets; --tar=f too"""
    img, ref = tmp_path / "z.img", tmp_path / "a.img"
    mkfs_and_check(img, tree, "--zD", check_nlink=True)
    reader_round_trip(tmp_path, tree, img)
    run_mkfs(img, tree, "-T", "0", "-U", "clear", "--zD")
    anchor(ref, tree, "--zD")
    assert os.path.getsize(img) == os.path.getsize(ref)
    assert dir_offsets(img) == dir_offsets(ref)
    tar_img = tmp_path / "t.img"
    p = subprocess.run(["erofs-tools", "mkfs", "--tar=f", "--zD", "-b", "1024",
                        os.fspath(tar_img), make_tar(tree, tmp_path / "t.tar")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    fsck(tar_img)
    with mounted(tar_img) as mnt:
        assert compare_trees(tree, mnt, check_nlink=True) == []
    assert dirs_compressed(tar_img) == (46, 46)


def test_zd_options(tree, tmp_path):
    """--zD=0 is no --zD, --zD=1 a bare --zD; with --tar=i too (refused before with one
    line: this failed on the code before it; tests/test_mkfs_tar_index_layouts.py mounts
    such images)"""
    t = make_tar(tree, tmp_path / "t.tar")
    for name, extra in {"i0": ["--zD=0"], "i1": ["--zD=1"], "ibare": ["--zD"]}.items():
        p = subprocess.run(["erofs-tools", "mkfs", "--tar=i", *extra,
                            os.fspath(tmp_path / f"{name}.img"), t],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
    fsck(tmp_path / "ibare.img", devices=[t])
    for name, nz in {"i0": 0, "i1": 46, "ibare": 46}.items():
        im = open_image(tmp_path / f"{name}.img", devices=[t])
        assert check_image(im) == []
        ndirs = sum(ino.is_dir() for _p, _d, ino in im.walk())
        assert (ndirs, sum(ino.is_dir() and is_compressed(ino) for _p, _d, ino in im.walk())) \
            == (46, nz)
    imgs = {}
    for name, extra in {"none": [], "0": ["--zD=0"], "1": ["--zD=1"], "bare": ["--zD"]}.items():
        imgs[name] = tmp_path / f"{name}.img"
        run_mkfs(imgs[name], tree, "-T", "0", "-U", "clear", "-z", "lz4", *extra)
    read = {k: v.read_bytes() for k, v in imgs.items()}
    assert read["none"] == read["0"] and read["1"] == read["bare"] != read["none"]
    assert dirs_compressed(imgs["none"]) == (46, 0)
    assert dirs_compressed(imgs["1"]) == (46, 46)
