"""`erofs-tools mkfs --tar=f|i` images mount on the VM test kernels (6.12 and 6.1), not
only on the host's 6.18: a full image, an index image with the tar as its extra device
(loop devices on 6.1, which has no file-backed mounts), and the tar appended to the
index (containerd's layout; refused by 6.1, which needs a path for every extra
device), each equal to GNU tar -x of the archive.

Runs inside the guest (vm-tests/run); skipped elsewhere.
"""
import os
import shutil
import subprocess
import sys

import pytest
from vmguest import GUEST_ONLY, IN_GUEST, mounted_equal, scratch_dir

pytestmark = GUEST_ONLY

if IN_GUEST:
    from test_images import _rich_tree  # noqa: E402

    from erofs_tools.mount import mount_erofs  # noqa: E402


@pytest.fixture
def work():
    with scratch_dir("tar") as base:
        yield base


@pytest.mark.parametrize("mode", ["f", "i"])
def test_tar_images_mount(work, mode):
    src = _rich_tree(os.path.join(work, "src"))
    tar_path = os.path.join(work, "l.tar")
    subprocess.run(["tar", "--format=pax", "--sparse", "--xattrs", "--xattrs-include=*",
                    "--numeric-owner", "-cf", tar_path, "-C", src, "."], check=True)
    ref = os.path.join(work, "ref")
    os.mkdir(ref)
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner",
                    "--same-owner", "-xpf", tar_path, "-C", ref], check=True)
    img, mnt = os.path.join(work, "img"), os.path.join(work, "mnt")
    os.mkdir(mnt)
    subprocess.run([sys.executable, "-m", "erofs_tools", "mkfs", "-q", f"--tar={mode}", img,
                    tar_path], check=True)
    if mode == "f":
        mounted_equal(img, ref, mnt, check_nlink=True)
        return
    mounted_equal(img, ref, mnt, devices=[tar_path], check_nlink=True)
    layer = os.path.join(work, "layer.erofs")
    with open(layer, "wb") as out:
        for part in (img, tar_path):
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out)
    if os.uname().release.startswith("6.1."):
        # 6.1 has no flat multi-device addressing: every extra device needs a tag or a
        # device= path ("erofs_init_device: empty device tag"); mkfs.erofs's index+tar
        # is refused the same way, so containerd's layout needs a later kernel
        from erofs_tools.errors import MountError
        with pytest.raises(MountError):
            mount_erofs(layer, mnt)
        return
    mounted_equal(layer, ref, mnt, check_nlink=True)
