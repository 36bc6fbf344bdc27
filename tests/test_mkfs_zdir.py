"""Compressed directories (mkfs.erofs 1.9 --zD: every directory whole in the packed
inode, its inode a COMPRESSED_FULL one whose map header holds the fragment's offset):
our reader reads one that decodes to more bytes than the image holds."""
import os
import subprocess

import pytest
from helpers import (
    compare_trees,
    noise,
    require_tool,
    text,
)

from erofs_tools.format import erofs as E
from erofs_tools.reader.fsck import check_image
from erofs_tools.reader.image import open_image
from erofs_tools.reader.unpack import unpack_to_dir
from erofs_tools.reader.zdata import is_compressed

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
    im = open_image(img)
    assert check_image(im) == []
    out = tmp_path / "out"
    warnings = []
    unpack_to_dir(im, out, warnings)
    assert warnings == []
    assert compare_trees(tree, out, check_nlink=True, ignore=ignore) == []
    ndirs, nz = dirs_compressed(img)
    assert ndirs == nz == 46, (ndirs, nz)


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
