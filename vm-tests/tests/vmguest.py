"""What the VM suite's image modules (test_images, test_tar_images,
test_compressed_images, test_mkfs_layouts) share: the repository, whether this runs
inside the guest (their tests are skipped elsewhere: `pytestmark = GUEST_ONLY`), the
host suite's tests/ on sys.path for its helpers, the tail-word text, scratch
directories on the guest's scratch ext4, and the kernel log written while a block runs.
"""
import contextlib
import errno
import os
import shutil
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IN_GUEST = os.environ.get("VMTEST_GUEST") == "1"
GUEST_ONLY = pytest.mark.skipif(not IN_GUEST, reason="runs only inside the vm-tests guest")

if IN_GUEST:
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from helpers import TAIL_WORDS  # noqa: E402
    from helpers import text as _text  # noqa: E402


def text(n, seed=0):
    return _text(n, seed, TAIL_WORDS)


@contextlib.contextmanager
def scratch_dir(prefix, *sub):
    """A new directory PREFIX-<random> on the scratch ext4 (with SUB made inside it),
    removed afterwards."""
    base = os.path.join(os.environ["VMTEST_SCRATCH"], prefix + "-" + os.urandom(4).hex())
    os.makedirs(os.path.join(base, *sub))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def kernel_log():
    """The kernel log lines written while the block runs (/dev/kmsg from its end)."""
    lines: list[str] = []
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    try:
        os.lseek(fd, 0, os.SEEK_END)
        yield lines
        while True:
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != errno.EPIPE:      # records overwritten meanwhile: go on
                    raise
                continue
            lines.append(rec.decode(errors="replace").split(";", 1)[-1])
    finally:
        os.close(fd)


def mounted_equal(image, ref, mnt, devices=(), **kw):
    """IMAGE mounted by the guest kernel at MNT (with its extra DEVICES) equals the tree
    REF (assert_same_tree with KW); unmounted afterwards."""
    from helpers import assert_same_tree

    from erofs_tools.mount import mount_erofs, umount
    mount_erofs(image, mnt, devices=devices)
    try:
        assert_same_tree(ref, mnt, **kw)
    finally:
        umount(mnt)
