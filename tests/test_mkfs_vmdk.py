"""mkfs --vmdk-desc FILE (mkfs.erofs 1.9): a VMDK descriptor joining the image and its
extra device (the --blobdev blob, the --tar=i tar) into one flat disk. The oracle is QEMU's
own reader of VMDK: `qemu-img convert` turns the descriptor into one raw disk, which the
host kernel mounts (extra devices read at their mapped_blkaddr) and which compares clean
with the source; the descriptor is the text mkfs.erofs 1.9.4 writes for the same image
(where 1.9.4 names the --blobdev blob "", ours names the file). The option was refused
before ("no such option"), so each of these failed on the code before it."""
import os
import subprocess
import sys

import pytest
from helpers import (
    anchor_mkfs,
    assert_same_tree,
    fsck,
    mounted,
    noise,
    require_tool,
    run_mkfs,
    text,
)
from test_mkfs_tar import _tar as make_tar

from erofs_tools.builder.vmdk import write_vmdk_desc


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("vmdk") / "src"
    (root / "d").mkdir(parents=True)
    for i in range(20):
        (root / "d" / f"f{i:02d}").write_bytes(text(100 + 997 * i, i))
    (root / "big").write_bytes(noise(300000, 1))
    (root / "big-copy").write_bytes(noise(300000, 1))
    os.symlink("big", root / "sym")
    os.setxattr(root / "d", "user.k", b"v")
    return root


def flat_disk(desc, out):
    """QEMU's reading of the descriptor: one raw disk."""
    require_tool("qemu-img")
    subprocess.run(["qemu-img", "convert", "-f", "vmdk", "-O", "raw", os.fspath(desc),
                    os.fspath(out)], check=True, capture_output=True)
    return out


def extents(desc):
    return [line for line in desc.read_text().splitlines() if " FLAT " in line]


def test_plain_image(tree, tmp_path, monkeypatch):
    """The descriptor of mkfs.erofs 1.9.4's own image, written by ours, is the one 1.9.4
    wrote byte for byte (CID from a set uuid); ours of our image is a disk that is it."""
    monkeypatch.chdir(tmp_path)          # (names as given: relative, as mkfs.erofs's)
    uuid = "01234567-89ab-cdef-0011-2233445566ff"
    subprocess.run(["mkfs.erofs", "--quiet", "-U", uuid, "--vmdk-desc=ref.vmdk", "ref.img",
                    os.fspath(tree)], check=True, capture_output=True)
    write_vmdk_desc("again.vmdk", "ref.img", [])
    assert (tmp_path / "again.vmdk").read_bytes() == (tmp_path / "ref.vmdk").read_bytes()
    assert "CID=0\n" not in (tmp_path / "ref.vmdk").read_text()
    run_mkfs("ours.img", tree, "-q", "-U", uuid, "--vmdk-desc", "ours.vmdk")
    raw = flat_disk(tmp_path / "ours.vmdk", tmp_path / "disk.raw")
    assert raw.read_bytes() == (tmp_path / "ours.img").read_bytes()


def test_blobdev_one_disk(tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_mkfs("ours.img", tree, "-q", "-U", "clear", "--chunksize=4096", "--blobdev=ours.blob",
             "--vmdk-desc", "ours.vmdk")
    anchor_mkfs("ref.img", tree, "--chunksize=4096", "--blobdev=ref.blob",
                "--vmdk-desc=ref.vmdk", need="vmdk-desc")
    ours, ref = extents(tmp_path / "ours.vmdk"), extents(tmp_path / "ref.vmdk")
    size = os.path.getsize("ours.blob") // 512
    assert ours == [f'RW {os.path.getsize("ours.img") // 512} FLAT "ours.img" 0',
                    f'RW {size} FLAT "ours.blob" 0']
    assert ref[1] == f'RW {os.path.getsize("ref.blob") // 512} FLAT "" 0'   # (1.9.4)
    fsck("ours.img", devices=["ours.blob"])   # (fsck.erofs reads no flat disk)
    raw = flat_disk(tmp_path / "ours.vmdk", tmp_path / "disk.raw")
    with mounted(raw) as mnt:          # no device=: the blob read inside the one disk
        assert_same_tree(tree, mnt, ignore=("mtime_ns",), whiteout_marks=True)


def test_tar_index_one_disk(tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_tar(tree, tmp_path / "layer.tar")
    run_mkfs("ours.img", "layer.tar", "-q", "-U", "clear", "--tar=i", "--vmdk-desc",
             "ours.vmdk")
    lines = extents(tmp_path / "ours.vmdk")
    assert lines[0] == f'RW {os.path.getsize("ours.img") // 512} FLAT "ours.img" 0'
    assert lines[1].endswith(' FLAT "layer.tar" 0')
    raw = flat_disk(tmp_path / "ours.vmdk", tmp_path / "disk.raw")
    with mounted(raw) as mnt:
        assert_same_tree(tree, mnt, ignore=("mtime_ns",), whiteout_marks=True)


@pytest.mark.parametrize("args, message", [
    (("--tar=i", "-"), "not stdin"),
    (("--tar=i", "--ungzip", "layer.tar"), "only in the dump"),
    (("--offset=4096",), "not with --offset"),
    (("--vmdk-desc", "no/such/dir/x.vmdk"), "does not exist"),
    (("--vmdk-desc", "."), "is a directory"),
])
def test_refused_one_line(tree, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "layer.tar").write_bytes(b"")
    src = () if "--tar=i" in args else (tree,)
    desc = () if "--vmdk-desc" in args else ("--vmdk-desc", "x.vmdk")
    p = subprocess.run([sys.executable, "-m", "erofs_tools", "mkfs", "x.img", *map(str, src),
                        *args, *desc], capture_output=True, text=True)
    assert p.returncode == 1, p
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], p.stderr
    assert not os.path.exists("x.img") and not os.path.exists("x.vmdk")
