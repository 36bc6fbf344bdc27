"""Smoke tests of the VM test guest (run inside QEMU by vm-tests/run).

Outside the guest (VMTEST_GUEST unset) every test here is skipped.
"""

import errno
import gzip
import os
import re
import stat
import uuid

import pytest

IN_GUEST = os.environ.get("VMTEST_GUEST") == "1"
pytestmark = pytest.mark.skipif(not IN_GUEST, reason="runs only inside the vm-tests guest")

SCRATCH = os.environ.get("VMTEST_SCRATCH", "")


def mount_of(path):
    """(fstype, options) of the mount point at exactly `path`."""
    path = os.path.realpath(path)
    found = None
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, mnt, fstype, opts = line.split()[:4]
            if mnt.encode().decode("unicode_escape") == path:
                found = (fstype, opts.split(","))
    assert found, f"{path} is not a mount point"
    return found


def test_kernel_version():
    label = os.environ.get("VMTEST_KERNEL", "")
    release = os.uname().release
    if re.fullmatch(r"\d+\.\d+", label):
        assert release.startswith(label + "."), (label, release)
    assert re.match(r"\d+\.\d+\.\d+", release)


def test_kernel_config_has_ondemand():
    with gzip.open("/proc/config.gz", "rt") as f:
        cfg = set(f.read().splitlines())
    for opt in ("CONFIG_EROFS_FS_ONDEMAND=y", "CONFIG_CACHEFILES_ONDEMAND=y",
                "CONFIG_FANOTIFY_ACCESS_PERMISSIONS=y"):
        assert opt in cfg


def test_dev_cachefiles_exists():
    st = os.stat("/dev/cachefiles")
    assert stat.S_ISCHR(st.st_mode)
    assert os.major(st.st_rdev) == 10


def test_erofs_registered():
    with open("/proc/filesystems") as f:
        names = {line.split()[-1] for line in f if line.strip()}
    assert "erofs" in names
    assert "ext4" in names


def test_root_is_host_fs_readonly():
    fstype, opts = mount_of("/")
    assert fstype == "9p" and "ro" in opts
    with pytest.raises(OSError) as e:
        open(os.path.join(os.path.dirname(__file__), f".vmtest-{uuid.uuid4().hex}"), "w")
    assert e.value.errno == errno.EROFS


def test_scratch_is_writable_ext4():
    assert SCRATCH
    fstype, opts = mount_of(SCRATCH)
    assert fstype == "ext4" and "rw" in opts
    path = os.path.join(SCRATCH, f"w-{uuid.uuid4().hex}")
    with open(path, "wb") as f:
        f.write(b"x" * 65536)
    os.setxattr(path, "user.vmtest", b"1")
    assert os.getxattr(path, "user.vmtest") == b"1"
    fd = os.open(SCRATCH, os.O_TMPFILE | os.O_RDWR, 0o600)  # cachefiles needs tmpfile
    os.close(fd)
    os.unlink(path)


def test_cgroup2_mounted():
    """runc (vm-tests/tests/test_containerd.py) needs the unified hierarchy; the test
    kernels have CONFIG_CGROUPS without controllers."""
    fstype, _ = mount_of("/sys/fs/cgroup")
    assert fstype == "cgroup2"
    assert os.path.exists("/sys/fs/cgroup/cgroup.procs")


def test_tmp_and_shm_writable():
    for d in ("/tmp", "/run", "/dev/shm"):
        assert mount_of(d)[0] == "tmpfs"
        p = os.path.join(d, f"w-{uuid.uuid4().hex}")
        with open(p, "w") as f:
            f.write("x")
        os.unlink(p)


def test_cachefiles_bind_ondemand():
    cache = os.path.join(SCRATCH, f"fscache-{uuid.uuid4().hex[:8]}")
    os.mkdir(cache)
    fd = os.open("/dev/cachefiles", os.O_RDWR)
    try:
        for cmd in (f"dir {cache}", "tag test", "bind ondemand"):
            assert os.write(fd, cmd.encode()) == len(cmd), cmd
        assert os.path.isdir(os.path.join(cache, "cache"))
        assert os.path.isdir(os.path.join(cache, "graveyard"))
        # A second opener is refused while the cache is bound.
        with pytest.raises(OSError) as e:
            os.open("/dev/cachefiles", os.O_RDWR)
        assert e.value.errno == errno.EBUSY
    finally:
        os.close(fd)
