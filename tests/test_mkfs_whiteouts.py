"""Overlayfs whiteouts (char 0:0) in mkfs's source, as mkfs.erofs 1.9 treats them: a
directory holding one is marked trusted.overlay.origin="" (unless the source has it), so
that overlayfs, with the image as a lower layer, never iterates it directly and lists
the whiteouts as entries; `--ovlfs-strip[=1]` leaves whiteouts and opaque markers out.
Compared with mkfs.erofs 1.9.4 on the same trees (both directory walks, and --tar
--aufs); pack's RAFS bootstraps keep them as nydus-image does."""
import os
import subprocess

import pytest
from helpers import fsck, is_root, mounted, require, require_tool, run_mkfs, run_pack

from erofs_tools.builder.mkfs import mkfs
from erofs_tools.builder.options import MkfsOptions
from erofs_tools.reader.image import Image

pytestmark = pytest.mark.root
ORIGIN = "trusted.overlay.origin"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    require(is_root(), "needs root (mknod)")
    root = tmp_path_factory.mktemp("wh") / "src"
    for d in ("d", "e", "o", "p/q"):
        (root / d).mkdir(parents=True)
    for f in ("d/y", "e/z", "p/q/r"):
        (root / f).write_bytes(b"data")
    for wh in ("d/x", "e/w", "n", "p/q/gone"):
        os.mknod(root / wh, 0o20000, os.makedev(0, 0))
    os.mknod(root / "p" / "tty", 0o20644, os.makedev(5, 0))     # a device, not a whiteout
    os.setxattr(root / "o", "trusted.overlay.opaque", b"y")
    os.setxattr(root / "e", ORIGIN, b"")                         # the source's own mark
    return root


def listing(mnt):
    """{path: (sorted entries, xattrs)} of every directory."""
    out = {}
    for dp, dn, fn in os.walk(mnt):
        rel = os.path.relpath(dp, mnt)
        out[rel] = (sorted(dn + fn), {k: os.getxattr(dp, k) for k in os.listxattr(dp)})
    return out


def test_overlayfs_lists_no_whiteouts_of_a_marked_directory(root_kernel, tree, tmp_path):
    """The reason for the mark: the image as the top lower layer, /d not below it."""
    seen = {}
    empty = tmp_path / "empty"
    empty.mkdir()
    for mode in ("keep", "mark"):
        img = tmp_path / f"{mode}.img"
        mkfs(img, tree, MkfsOptions(whiteouts=mode))
        with mounted(img) as lower:
            ovl = tmp_path / f"ovl-{mode}"
            ovl.mkdir()
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                            f"lowerdir={lower}:{empty}", os.fspath(ovl)], check=True)
            try:
                seen[mode] = (sorted(os.listdir(ovl / "d")), sorted(os.listdir(ovl / "p" / "q")))
            finally:
                subprocess.run(["umount", os.fspath(ovl)], check=True)
    assert seen["keep"] == (["x", "y"], ["gone", "r"])      # listed: what the mark prevents
    assert seen["mark"] == (["y"], ["r"])


@pytest.mark.parametrize("args", [[], ["--ovlfs-strip"], ["--ovlfs-strip=1"],
                                  ["--ovlfs-strip=0"]])
@pytest.mark.parametrize("walk", ["c", "python"])
def test_as_mkfs_erofs(root_kernel, tree, tmp_path, args, walk):
    require_tool("mkfs.erofs")
    more = ["--exclude-path=not-there"] if walk == "python" else []  # the Python walk
    ours, ref = tmp_path / "o.img", tmp_path / "r.img"
    run_mkfs(ours, tree, *args, *more)
    subprocess.run(["mkfs.erofs", "--quiet", *args, *more, os.fspath(ref), os.fspath(tree)],
                   check=True, capture_output=True)
    fsck(ours)
    with mounted(ours) as a, mounted(ref) as b:
        got, want = listing(a), listing(b)
        assert os.stat(os.path.join(a, "p", "tty")).st_rdev == os.makedev(5, 0)
    assert got == want
    strip = args and args[0] != "--ovlfs-strip=0"
    assert ("x" in got["d"][0]) == (not strip)
    assert (ORIGIN in got["d"][1]) == (not strip)
    assert ORIGIN not in got["o"][1]                        # no whiteout there
    assert ("trusted.overlay.opaque" in got["o"][1]) == (not strip)


def test_tar_aufs_strip_as_mkfs_erofs(root_kernel, tmp_path):
    require_tool("mkfs.erofs")
    src = tmp_path / "layer"
    (src / "d").mkdir(parents=True)
    (src / "o").mkdir()
    for f in ("d/y", "d/.wh.x", "o/.wh..wh..opq", "o/z", ".wh.gone"):
        (src / f).write_bytes(b"" if ".wh." in f else b"data")
    layer = tmp_path / "l.tar"
    subprocess.run(["tar", "-C", os.fspath(src), "-cf", os.fspath(layer), "."], check=True)
    for args in ([], ["--ovlfs-strip"]):
        ours, ref = tmp_path / "o.img", tmp_path / "r.img"
        run_mkfs(ours, layer, "--tar=f", "--aufs", *args)
        subprocess.run(["mkfs.erofs", "--quiet", "--tar=f", "--aufs", *args, os.fspath(ref),
                        os.fspath(layer)], check=True, capture_output=True)
        with mounted(ours) as a, mounted(ref) as b:
            got, want = listing(a), listing(b)
        assert got == want
        assert ("x" in got["d"][0]) == (not args)


def test_pack_keeps_whiteouts_unmarked(tree, tmp_path):
    boot = tmp_path / "p.boot"
    run_pack(tree, boot, tmp_path / "blobs")
    with Image(os.fspath(boot)) as img:
        d = img.lookup(b"/d")
        assert img.xattrs(d) == []
        assert sorted(x.name for x in img.dirents(d)) == [b".", b"..", b"x", b"y"]
