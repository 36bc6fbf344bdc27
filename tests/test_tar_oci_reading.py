"""An OCI layer read as containerd's applier reads it (Go's archive/tar), not as GNU tar
does, where the two differ: a converted image must be the one containerd runs.

- a global PAX header ('g') is an entry containerd ignores: its uid, mtime or xattr
  records do not apply to the entries after it (POSIX: they do);
- xattrs come from SCHILY.xattr. records only (LIBARCHIVE.xattr. ones never reach the
  rootfs), and containerd sets no trusted.* xattr from a layer: a layer's
  trusted.overlay.opaque hid the lower layers' files in the merged image (merge reads
  that xattr), which containerd shows;
- a GNU long name wins over a PAX path (Go applies it after the records);
- an entry that is the root (./) is ignored: its mode and owner are not the image's.
`--whiteout-spec none` (and mkfs --tar) keep the POSIX reading. The last test unpacks the
same layers with Debian's containerd (overlayfs snapshotter) and compares the trees."""

from __future__ import annotations

import base64
import stat
import tarfile

import pytest
from bomb_helpers import pax_rec
from helpers import compare_trees
from test_tar_helpers import MTIME, E, make_tar, mounted_rafs, pack_tar, run_cli

from erofs_tools.reader.image import Image


def _ustar(name: str, size: int = 0, typ: bytes = b"0") -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size, ti.type, ti.mode, ti.mtime = size, typ, 0o644, MTIME
    return ti.tobuf(tarfile.USTAR_FORMAT)


def _block(data: bytes, typ: bytes, name: str = "././@PaxHeader") -> bytes:
    return _ustar(name, len(data), typ) + data + bytes(-len(data) % 512)


def _file(name: str, data: bytes) -> bytes:
    return _ustar(name, len(data)) + data + bytes(-len(data) % 512)


def odd_layer() -> bytes:
    """One layer with every case above, built record by record."""
    out = _block(pax_rec(b"uid", b"77") + pax_rec(b"SCHILY.xattr.user.g", b"global"), b"g")
    out += _file("g", b"g")
    out += _block(pax_rec(b"LIBARCHIVE.xattr.user.lib", base64.b64encode(b"v"))
                  + pax_rec(b"SCHILY.xattr.user.ok", b"1")
                  + pax_rec(b"SCHILY.xattr.trusted.t", b"tv")
                  + pax_rec(b"SCHILY.xattr.security.s", b"sv"), b"x")
    out += _file("x", b"x")
    out += _block(pax_rec(b"SCHILY.xattr.user.both", b"schily")
                  + pax_rec(b"LIBARCHIVE.xattr.user.both", base64.b64encode(b"lib")), b"x")
    out += _file("both", b"b")
    out += _block(pax_rec(b"path", b"from-pax"), b"x")
    out += _block(b"from-gnu\0", b"L", "././@LongLink")
    out += _file("short", b"n")
    root = tarfile.TarInfo("./")
    root.type, root.mode, root.uid, root.gid = tarfile.DIRTYPE, 0o700, 3, 4
    out += root.tobuf(tarfile.USTAR_FORMAT)
    return out + bytes(1024)


def _lower_upper() -> list[bytes]:
    """A directory whose upper-layer entry carries trusted.overlay.opaque=y."""
    lower = make_tar([E("d", "dir"), E("d/x", data=b"x")])
    upper = make_tar([E("d", "dir", xattrs={"trusted.overlay.opaque": "y"}),
                      E("d/y", data=b"y")])
    return [lower, upper]


def _xattrs(img: Image, path: str) -> dict:
    return dict(img.xattrs(img.lookup(path)))


def test_layer_read_as_containerd(tmp_path):
    (tmp_path / "l.tar").write_bytes(odd_layer())
    pack_tar(tmp_path / "l.tar", tmp_path / "l.boot", tmp_path / "blobs")
    with Image(str(tmp_path / "l.boot")) as img:
        names = sorted(p for p, _, _ in img.walk())
        assert b"/from-gnu" in names and b"/from-pax" not in names
        g = img.lookup("/g")
        assert (g.uid, _xattrs(img, "/g")) == (0, {})              # global: ignored
        assert _xattrs(img, "/x") == {b"user.ok": b"1", b"security.s": b"sv"}
        assert _xattrs(img, "/both") == {b"user.both": b"schily"}
        root = img.inode(img.root_nid)
        assert (stat.S_IMODE(root.mode), root.uid, root.gid) == (0o755, 0, 0)


def test_posix_reading_kept_without_oci_whiteouts(tmp_path):
    (tmp_path / "l.tar").write_bytes(odd_layer())
    pack_tar(tmp_path / "l.tar", tmp_path / "l.boot", tmp_path / "blobs",
             "--whiteout-spec", "none")
    with Image(str(tmp_path / "l.boot")) as img:
        names = sorted(p for p, _, _ in img.walk())
        assert b"/from-pax" in names and b"/from-gnu" not in names
        assert img.lookup("/g").uid == 77
        assert _xattrs(img, "/g") == {b"user.g": b"global"}
        assert _xattrs(img, "/x")[b"user.lib"] == b"v"
        assert _xattrs(img, "/x")[b"trusted.t"] == b"tv"
        root = img.inode(img.root_nid)
        assert (stat.S_IMODE(root.mode), root.uid, root.gid) == (0o700, 77, 4)  # global uid


def test_layer_opaque_xattr_hides_nothing(tmp_path):
    boots = []
    for i, data in enumerate(_lower_upper()):
        (tmp_path / f"l{i}.tar").write_bytes(data)
        boots.append(str(tmp_path / f"l{i}.boot"))
        pack_tar(tmp_path / f"l{i}.tar", boots[-1], tmp_path / "blobs", "--mark-implied-dirs")
    run_cli("merge", *boots, "-B", tmp_path / "m.boot")
    with Image(str(tmp_path / "m.boot")) as img:
        assert sorted(p for p, _, _ in img.walk()) == [b"/", b"/d", b"/d/x", b"/d/y"]
        assert _xattrs(img, "/d") == {}


@pytest.mark.root
def test_same_tree_as_containerd(tmp_path):
    """Both cases unpacked by containerd (overlayfs snapshotter, its default) and
    converted by us: the same tree, metadata and contents (mtimes aside: containerd's
    implied root and bumped directories carry the time of extraction)."""
    from containerd_fixtures import overlayfs_rootfs, require_containerd
    require_containerd()
    layers = _lower_upper() + [odd_layer()]
    boots = []
    for i, data in enumerate(layers):
        (tmp_path / f"l{i}.tar").write_bytes(data)
        boots.append(str(tmp_path / f"l{i}.boot"))
        pack_tar(tmp_path / f"l{i}.tar", boots[-1], tmp_path / "blobs", "--mark-implied-dirs")
    run_cli("merge", *boots, "-B", tmp_path / "m.boot")
    with overlayfs_rootfs(layers, "docker.io/t/odd:1") as theirs:
        with mounted_rafs(str(tmp_path / "m.boot"), str(tmp_path / "blobs")) as ours:
            diffs = compare_trees(theirs, ours, ignore=("mtime_ns",), check_nlink=True)
    assert not diffs, "\n".join(diffs)

