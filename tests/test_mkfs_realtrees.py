"""Real trees of this machine: the Python standard library and /usr/share, built with
erofs-tools mkfs, checked by fsck.erofs, mounted and compared with full metadata."""
import os
import sysconfig

import pytest
from helpers import assert_same_tree, fsck, mounted, require, run_mkfs

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
