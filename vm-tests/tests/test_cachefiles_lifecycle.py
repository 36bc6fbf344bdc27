"""The cachefiles front end keeps serving an image the kernel still uses after
`fscache-daemon umount` (issue 13, defect 1), inside the QEMU guest.

Run:  vm-tests/run --kernel 6.12 -- python3 -m pytest -q vm-tests/tests/test_cachefiles_lifecycle.py
Outside the guest (VMTEST_GUEST unset) every test skips; inside it none may skip.

An overlayfs whose lower layer is the fscache-mode EROFS mount, a second mount namespace
and an open file hold the superblock; `fscache-daemon umount` removes our mount point,
then files never fetched are read through the overlay and the other namespace: exact
bytes, never zeros. The daemon releases the image once the last holder is gone (the
EROFS sysfs entry "[domain,]fsid" goes with the superblock; the kernel CLOSEs the
cookies at the same time).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest
from test_cachefiles import IN_GUEST, DaemonProc, make_tree, pack, scratch  # noqa: F401

pytestmark = pytest.mark.skipif(not IN_GUEST, reason="runs only inside the vm-tests guest")


@pytest.fixture
def daemon(scratch):  # noqa: F811 - the fixture imported above
    d = DaemonProc(scratch)
    try:
        yield d
    finally:
        d.teardown()


def sha(p) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def wait_for(pred, timeout=60.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_umount_overlay_ns(daemon, scratch):
    """Never zeros after `fscache-daemon umount` under an overlay and another namespace
    (short name: the scratch path, and the unix sockets in it, carry it; 108-byte limit)."""
    src = scratch / "src"
    make_tree(src, nfiles=30, seed=13)
    boot = pack(src, scratch / "image.boot", scratch / "blobs", "--chunk-size", "64K")
    daemon.start()
    mnt = daemon.mount(boot, scratch / "mnt", scratch / "blobs", cli=True)
    files = sorted((str(p.relative_to(src)) for p in src.rglob("*")
                    if p.is_file() and not p.is_symlink() and p.stat().st_size > 0),
                   key=lambda r: -(src / r).stat().st_size)
    via_overlay, via_ns, via_fd = files[0::3], files[1::3], files[2]
    assert daemon.fetched() == 0
    ov = {k: scratch / k for k in ("upper", "work", "merged")}
    for p in ov.values():
        p.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={mnt},upperdir={ov['upper']},workdir={ov['work']}",
                    str(ov["merged"])], check=True)
    ns = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "600"])
    fd = None
    try:
        wait_for(lambda: os.readlink(f"/proc/{ns.pid}/ns/mnt") !=
                 os.readlink("/proc/self/ns/mnt"), what="the new namespace")
        fd = os.open(ov["merged"] / via_fd, os.O_RDONLY)
        r = subprocess.run(["fscache-daemon", "umount", str(mnt), "--api-sock", daemon.sock],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert "still in use" in r.stdout, r.stdout
        daemon.mounts.remove(mnt)
        m = daemon.metrics()
        assert m["mounts"] == 0 and m["detached"] == 1, m
        for rel in via_overlay:
            assert sha(ov["merged"] / rel) == sha(src / rel), rel
        for rel in via_ns:
            assert sha(f"/proc/{ns.pid}/root{mnt}/{rel}") == sha(src / rel), rel
        data = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
        assert data == (src / via_fd).read_bytes()
        assert daemon.fetched() > 0
        os.close(fd)
        fd = None
        subprocess.run(["umount", str(ov["merged"])], check=True)
        time.sleep(1)
        assert daemon.metrics()["detached"] == 1     # the namespace still holds it
    finally:
        if fd is not None:
            os.close(fd)
        if os.path.ismount(ov["merged"]):
            subprocess.run(["umount", "-l", str(ov["merged"])])
        ns.kill()
        ns.wait()
    wait_for(lambda: daemon.metrics()["detached"] == 0 and not daemon.metrics()["blobs"],
             what="the release of the image's blobs")
