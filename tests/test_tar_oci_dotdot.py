"""`..` in an OCI layer, read as containerd 1.6's applier reads it (archive/tar.go
applyNaive, hardlinkRootPath; continuity fs.RootPath), not refused:

- an entry's name is cleaned (Go's filepath.Clean: `x/y/../z` is `x/z`) and what `..`
  is left at its start stops at the root: `a/../../etc/passwd` is `etc/passwd`; one
  that cleans to the root (`../`) is ignored, like `./`;
- a hardlink's target goes through fs.RootPath, whose `..` also stops at the root:
  `../etc/passwd` and `sub/../../../outside` are `etc/passwd` and `outside`, after a
  name not in the layer or a file alike (`nothere/../x/z`, `outside/../x/z`); after a
  symlink it goes up from where the symlink leads (what one layer may not tell: an
  error here);
- a symlink's target is kept as it is (`../../etc/passwd`).

Outside an OCI layer (`--whiteout-spec none|overlayfs`, mkfs --tar) a `..` stays an
error (test_tar.py). The root test unpacks the layer with Debian's containerd and
compares the trees. Each test failed before: a `..` was an error in every layer.
"""

from __future__ import annotations

import os
import stat

import pytest
from helpers import compare_trees
from test_tar_helpers import E, make_tar, mounted_rafs, pack_tar

from erofs_tools.reader.image import Image


def dotdot_layer() -> bytes:
    return make_tar([
        E("../", "dir", mode=0o700),                     # the root: ignored
        E("a/../../etc/passwd", data=b"root:x:0:0\n"),
        E("../outside", data=b"out\n"),
        E("d/../../../d2/f", data=b"f\n"),
        E("x/y/../z", data=b"z\n"),
        E("h1", "hardlink", link="../etc/passwd"),
        E("sub/h2", "hardlink", link="sub/../../../outside"),
        E("h3", "hardlink", link="nothere/../x/z"),
        E("h4", "hardlink", link="outside/../x/z"),
        E("s", "symlink", link="../../etc/passwd"),
    ])


# the components a `..` cancels are never made: `a`, `d` and `x/y` are not there
EXPECTED = [b"/", b"/d2", b"/d2/f", b"/etc", b"/etc/passwd", b"/h1", b"/h3", b"/h4",
            b"/outside", b"/s", b"/sub", b"/sub/h2", b"/x", b"/x/z"]


def test_dotdot_clamped_at_the_root_in_an_oci_layer(tmp_path):
    (tmp_path / "l.tar").write_bytes(dotdot_layer())
    pack_tar(tmp_path / "l.tar", tmp_path / "l.boot", tmp_path / "blobs")
    with Image(str(tmp_path / "l.boot")) as img:
        assert sorted(p for p, _, _ in img.walk()) == EXPECTED
        nid = {p: img.lookup(p).nid for p in ("/etc/passwd", "/h1", "/outside",
                                              "/sub/h2", "/x/z", "/h3", "/h4")}
        assert nid["/h1"] == nid["/etc/passwd"] and img.lookup("/h1").nlink == 2
        assert nid["/sub/h2"] == nid["/outside"]
        assert nid["/h3"] == nid["/h4"] == nid["/x/z"] and img.lookup("/x/z").nlink == 3
        assert img.readlink(img.lookup("/s")) == b"../../etc/passwd"
        root = img.inode(img.root_nid)
        assert stat.S_IMODE(root.mode) == 0o755          # `../` did not set it


def test_hardlink_going_up_from_a_symlink_is_an_error(tmp_path):
    """containerd goes up from where `l` leads (`x/..`: the root); the layer alone
    cannot always tell where that is: a one-line error, nothing written."""
    data = make_tar([E("x/f", data=b"f"), E("l", "symlink", link="x"),
                     E("h", "hardlink", link="l/../x/f")])
    (tmp_path / "l.tar").write_bytes(data)
    (tmp_path / "blobs").mkdir()
    p = pack_tar(tmp_path / "l.tar", tmp_path / "l.boot", tmp_path / "blobs", check=False)
    err = p.stderr.decode()
    assert p.returncode == 1 and err.count("\n") == 1, err
    assert "goes up ('..') from symlink l" in err
    assert not (tmp_path / "l.boot").exists() and os.listdir(tmp_path / "blobs") == []


@pytest.mark.root
def test_dotdot_layer_same_tree_as_containerd(tmp_path):
    """The layer unpacked by containerd (overlayfs snapshotter) and converted by us:
    the same tree, metadata, contents and link counts (mtimes aside: containerd's
    implied directories carry the time of extraction)."""
    from containerd_fixtures import overlayfs_rootfs, require_containerd
    require_containerd()
    layer = dotdot_layer()
    (tmp_path / "l.tar").write_bytes(layer)
    pack_tar(tmp_path / "l.tar", tmp_path / "l.boot", tmp_path / "blobs")
    with overlayfs_rootfs([layer], "docker.io/t/dotdot:1") as theirs:
        names = sorted(os.fsencode("/" + os.path.relpath(os.path.join(d, n), theirs))
                       for d, ds, fs in os.walk(theirs) for n in ds + fs)
        assert [b"/"] + names == EXPECTED     # containerd places them where we do
        with mounted_rafs(str(tmp_path / "l.boot"), str(tmp_path / "blobs")) as ours:
            diffs = compare_trees(theirs, ours, ignore=("mtime_ns",), check_nlink=True)
    assert not diffs, "\n".join(diffs)
