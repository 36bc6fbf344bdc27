"""The C directory walk (csrc/walk.c) against the Python one (TreeWalker's own loop):
the same tree gives byte-identical images under every option the C walk takes, and
the images mount and compare clean with the source."""
import os
import socket
import stat

import pytest
from helpers import assert_same_tree, fsck, is_root, mounted, require, require_root_kernel

from erofs_tools.builder import tree as tree_mod
from erofs_tools.builder.mkfs import mkfs
from erofs_tools.builder.options import MkfsOptions
from erofs_tools.errors import InputError

pytestmark = pytest.mark.root


@pytest.fixture
def rich_tree(tmp_path):
    """Every inode kind, hardlinks (all links inside, and some links outside the tree),
    xattrs in unsorted creation order, a sparse file, odd names, a big directory."""
    require(is_root(), "needs root to create devices, owners and trusted xattrs")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"hello\n")
    os.link(src / "a.txt", src / "hard")
    (src / "sub").mkdir()
    os.link(src / "a.txt", src / "sub" / "hard2")
    outside = tmp_path / "outside"
    outside.write_bytes(b"3 links, 2 in the tree" * 300)
    os.link(outside, src / "sub" / "o1")
    os.link(outside, src / "o2")
    os.symlink("a.txt", src / "link")
    os.symlink("x" * 4000, src / "longlink")
    os.mkfifo(src / "fifo")
    os.mknod(src / "chr", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(src / "blk", 0o640 | stat.S_IFBLK, os.makedev(259, 70000))
    s = socket.socket(socket.AF_UNIX)
    s.bind(os.fsencode(src / "sock"))
    s.close()
    (src / "empty").write_bytes(b"")
    for name in (b"\xff\xfe-bytes", b"UPPER", b"lower", b"-dash", b"~tilde",
                 b"x" * 255, "ünï".encode()):
        (src / os.fsdecode(name)).write_bytes(name * 37)
    big = src / "big"
    big.mkdir()
    for i in range(700):
        (big / f"e{(i * 7919) % 1000:04d}-{'n' * (i % 50)}").write_bytes(b"%d" % i * i)
    with open(src / "sparse", "wb") as f:
        f.seek(5 << 20)
        f.write(b"end")
        f.seek(1 << 20)
        f.write(b"middle" * 2000)
    for name in ("user.zz", "user.aa", "trusted.overlay.opaque", "user.mm"):
        os.setxattr(src / "a.txt", name, name.encode() * 3)
    os.setxattr(src / "sub", "user.aa", b"user.aauser.aauser.aa")      # shared
    os.setxattr(src / "empty", "user.empty-value", b"")
    os.chown(src / "sub", 1000, 1000)
    os.lchown(src / "link", 65535, 65536)
    os.utime(src / "a.txt", ns=(1_600_000_000_123_456_789,) * 2)
    return src


def _image(tmp_path, name, src, native, **kw):
    img = tmp_path / name
    saved = tree_mod.NATIVE_WALK
    tree_mod.NATIVE_WALK = native
    try:
        mkfs(img, src, MkfsOptions(uuid=bytes(16), **kw))
    finally:
        tree_mod.NATIVE_WALK = saved
    return img.read_bytes()


@pytest.mark.parametrize("kw", [{}, {"timestamp": 0}, {"all_root": True},
                                {"force_uid": 7, "force_gid": 9, "timestamp": 12345},
                                {"inline_data": False, "shared_xattrs": False},
                                {"uid_offset": 100000, "gid_offset": 3, "force_uid": 1},
                                {"ignore_mtime": True, "timestamp": 5, "all_time": False},
                                {"hard_dereference": True}, {"xattrs": False},
                                {"shared_xattr_min": 1},
                                {"xattr_prefixes": [b"user.a", b"trusted.overlay."]},
                                {"root_xattr_isize": 400}])
def test_c_walk_equals_python_walk(rich_tree, tmp_path, kw):
    c = _image(tmp_path, "c.img", rich_tree, True, **kw)
    py = _image(tmp_path, "py.img", rich_tree, False, **kw)
    assert len(c) > 1 << 19 and c == py


def test_c_walk_image_mounts_and_matches(rich_tree, tmp_path):
    require_root_kernel()
    _image(tmp_path, "c.img", rich_tree, True)
    fsck(tmp_path / "c.img")
    with mounted(tmp_path / "c.img") as mnt:
        assert_same_tree(rich_tree, mnt, check_nlink=False)
        # the links outside the tree: one inode, its data intact
        assert os.stat(os.path.join(mnt, "o2")).st_ino == \
            os.stat(os.path.join(mnt, "sub", "o1")).st_ino
        assert open(os.path.join(mnt, "o2"), "rb").read() == b"3 links, 2 in the tree" * 300


def test_c_walk_progress_and_errors(tmp_path, rich_tree):
    """on_entry ends on the Python walk's counts (inodes, file bytes); a source that is
    not a directory or does not exist is one InputError naming it."""
    def counts(native):
        seen = []

        class P:
            def scan(self, n, nbytes, copied):
                seen.append((n, nbytes))

            def write(self, done, total):
                pass

            def done(self):
                pass
        saved = tree_mod.NATIVE_WALK
        tree_mod.NATIVE_WALK = native
        try:
            mkfs(tmp_path / "p.img", rich_tree, MkfsOptions(uuid=bytes(16)), progress=P())
        finally:
            tree_mod.NATIVE_WALK = saved
        return seen[-1]
    c, py = counts(True), counts(False)
    assert c == py and c[0] > 700 and c[1] > 1 << 20
    from erofs_tools._native import BuildOptions, NativeBuilder
    from erofs_tools._native_walk import native_walk
    with NativeBuilder(BuildOptions()) as b:
        with pytest.raises(InputError, match="gone: No such file"):
            native_walk(b, tmp_path / "gone")
    with NativeBuilder(BuildOptions()) as b:
        with pytest.raises(InputError, match="a.txt: not a directory"):
            native_walk(b, rich_tree / "a.txt")
