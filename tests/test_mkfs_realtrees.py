"""Real trees of this machine: the Python standard library and /usr/share, built with
erofs-tools mkfs, checked by fsck.erofs, mounted and compared with full metadata."""
import os
import subprocess
import sysconfig

import pytest
from helpers import assert_same_tree, fsck, mounted, require, require_tool, run_mkfs

pytestmark = [pytest.mark.root, pytest.mark.slow]


def test_python_stdlib(tmp_path):
    stdlib = sysconfig.get_paths()["stdlib"]
    require(os.path.isdir(stdlib), f"no stdlib at {stdlib}")
    img = tmp_path / "stdlib.img"
    # site-packages changes while other tests pip install; leave it out
    run_mkfs(img, stdlib, "--exclude-path", "site-packages", "--exclude-path", "dist-packages")
    fsck(img)
    with mounted(img) as mnt:
        assert_same_tree(stdlib, mnt, exclude={"site-packages", "dist-packages"})


def test_usr_share(tmp_path):
    require(os.path.isdir("/usr/share/doc"), "no /usr/share")
    img = tmp_path / "share.img"
    p = run_mkfs(img, "/usr/share", "--json")
    assert '"inodes"' in p.stdout
    fsck(img, extract=False)
    with mounted(img) as mnt:
        assert_same_tree("/usr/share", mnt)


@pytest.mark.parametrize("args", [(), ("-z", "lz4hc"), ("-z", "lz4hc", "-E", "ztailpacking")],
                         ids=["plain", "lz4hc", "lz4hc-ztailpacking"])
def test_not_larger_than_mkfs_erofs(tmp_path, args):
    """Issue 17: our image of a real tree is no larger than mkfs.erofs's (the anchor,
    1.9.x) with the same flags; the metadata blocks are packed at least as tightly."""
    require_tool("mkfs.erofs")
    tree = "/usr/lib/python3.11"       # Debian's: changes only with apt
    require(os.path.isdir(tree), f"no {tree}")
    ref, ours = tmp_path / "ref.img", tmp_path / "ours.img"
    p = subprocess.run(["mkfs.erofs", "-T", "0", *args, os.fspath(ref), tree],
                       capture_output=True, text=True, errors="replace")
    assert p.returncode == 0, f"mkfs.erofs failed: {p.stdout}{p.stderr}"
    run_mkfs(ours, tree, "-q", "-T", "0", *args)
    assert os.path.getsize(ours) <= os.path.getsize(ref), \
        f"{os.path.getsize(ours)} B > mkfs.erofs's {os.path.getsize(ref)} B"
    fsck(ours, extract=False)
    with mounted(ours) as mnt:
        assert_same_tree(tree, mnt, ignore=("mtime_ns",))      # -T 0: every mtime is 0
