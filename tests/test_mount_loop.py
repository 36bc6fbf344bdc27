"""Mounting on loop devices, the path kernels before 6.12 (no file-backed EROFS) take."""
import os

from helpers import assert_same_tree, require_root_kernel

from erofs_tools.builder.rafs import pack
from erofs_tools.mount import mount_erofs, prepare_caches, umount


def _loop_backing_files():
    out = set()
    for name in os.listdir("/sys/block"):
        p = f"/sys/block/{name}/loop/backing_file"
        if os.path.exists(p):
            out.add(open(p).read().strip())
    return out


def test_rafs_image_on_loop_devices(tmp_path):
    require_root_kernel()
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "big").write_bytes(os.urandom(300_000))
    (src / "small").write_bytes(b"hello\n")
    os.symlink("d/big", src / "link")
    boot, blobs, mnt = tmp_path / "boot", tmp_path / "blobs", tmp_path / "mnt"
    mnt.mkdir()
    pack(src, boot, blobs)
    devices = prepare_caches(boot, blobs, tmp_path / "cache")
    mount_erofs(boot, mnt, devices, loop=True)
    try:
        backing = _loop_backing_files()
        assert str(boot) in backing and all(str(d) in backing for d in devices)
        assert_same_tree(src, mnt)
    finally:
        umount(mnt)
    # auto-clear: the loop devices went away with the mount
    backing = _loop_backing_files()
    assert str(boot) not in backing and not any(str(d) in backing for d in devices)
