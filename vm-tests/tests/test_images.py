"""Images written by erofs-tools mount on the VM test kernels (6.12 and 6.1), not only on
the host's 6.18: the compatibility checklist of the EROFS reference, checked for real.

Runs inside the guest (vm-tests/run); skipped elsewhere. The tree is built on the scratch
ext4 filesystem so it can hold devices, fifos and trusted./security. xattrs. On 6.1 there
are no file-backed mounts, so erofs_tools.mount falls back to loop devices.
"""
import os
import subprocess
import sys

import pytest
from vmguest import GUEST_ONLY, IN_GUEST, mounted_equal, scratch_dir

pytestmark = GUEST_ONLY

if IN_GUEST:
    from helpers import assert_same_tree  # noqa: E402

    from erofs_tools.builder.rafs import PackOptions, pack  # noqa: E402
    from erofs_tools.mount import mount_rafs, umount  # noqa: E402


def _rich_tree(root):
    """Every inode kind and the boundaries that matter to the on-disk layout."""
    os.makedirs(root)
    for size in (0, 1, 4095, 4096, 4097, 8191, 65536 + 3, 300_000):
        with open(os.path.join(root, f"f{size}"), "wb") as f:
            f.write(os.urandom(size))
    big = os.path.join(root, "bigdir")
    os.mkdir(big)
    for i in range(600):  # several directory blocks
        open(os.path.join(big, f"entry-{i:04d}-" + "x" * (i % 40)), "wb").close()
    os.symlink("f4096", os.path.join(root, "short-link"))
    os.symlink("t" * 3000, os.path.join(root, "long-link"))
    os.link(os.path.join(root, "f1"), os.path.join(big, "hardlink"))
    os.mknod(os.path.join(root, "chr"), 0o620 | 0o020000, os.makedev(4, 300))
    os.mknod(os.path.join(root, "blk"), 0o660 | 0o060000, os.makedev(8, 1))
    os.mkfifo(os.path.join(root, "fifo"))
    sparse = os.path.join(root, "sparse")
    with open(sparse, "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"middle")
    os.setxattr(os.path.join(root, "f1"), "user.note", b"hello")
    os.setxattr(os.path.join(root, "f4097"), "trusted.overlay.opaque", b"y")
    os.setxattr(os.path.join(root, "f4097"), "security.selinux", b"system_u:object_r:x\0")
    os.chown(os.path.join(root, "f8191"), 70000, 70001)
    os.chmod(os.path.join(root, "f0"), 0o4755)
    os.utime(os.path.join(root, "f1"), ns=(1, 1_600_000_000_123_456_789))
    return root


@pytest.fixture
def work(tmp_path_factory):
    with scratch_dir("images") as base:
        yield base


def test_mkfs_image_mounts_and_matches(work):
    src = _rich_tree(os.path.join(work, "src"))
    img, mnt = os.path.join(work, "img"), os.path.join(work, "mnt")
    os.mkdir(mnt)
    subprocess.run([sys.executable, "-m", "erofs_tools", "mkfs", "-q", img, src], check=True)
    subprocess.run(["fsck.erofs", img], check=True, capture_output=True)
    mounted_equal(img, src, mnt)


@pytest.mark.parametrize("compressor", ["zstd", "none"])
def test_rafs_image_mounts_and_matches(work, compressor):
    src = _rich_tree(os.path.join(work, "src"))
    boot, blobs, mnt = (os.path.join(work, n) for n in ("boot", "blobs", "mnt"))
    os.mkdir(mnt)
    pack(src, boot, blobs, PackOptions(compressor=compressor, chunk_size=64 << 10))
    mount_rafs(boot, mnt, blobs, os.path.join(work, "cache"))
    try:
        assert_same_tree(src, mnt)
    finally:
        umount(mnt)
