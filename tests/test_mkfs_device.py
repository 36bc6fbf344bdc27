"""mkfs into a block device, as mkfs.erofs (`mkfs.erofs /dev/loop0 DIR`), and --offset.

Real loop devices (losetup) over files filled with 0xAA, so that a byte the image leaves
unwritten (the zeros a file gets from its truncation) shows; the host kernel mounts the
device, fsck.erofs 1.9.4 checks it. A mounted device is refused, a device too small for
the image is refused with nothing written (or, when that shows only while the data is
streamed, the message says the device was partly written and no superblock is left).
Loop devices and mounts are removed even when a test fails."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
from helpers import assert_same_tree, fsck, is_root, mounted, require, require_tool, run_erofs_tools

pytestmark = pytest.mark.root
FILL = b"\xaa"


@contextlib.contextmanager
def _loop(backing, offset=0):
    require(is_root(), "needs root (losetup)")
    require_tool("losetup")
    cmd = ["losetup", "-f", "--show"] + (["-o", str(offset)] if offset else []) + [
        os.fspath(backing)]
    dev = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


@pytest.fixture
def loopdev(tmp_path):
    """-> make(size): a loop device over a file of `size` bytes of 0xAA."""
    stack = contextlib.ExitStack()

    def make(size, name="dev"):
        backing = tmp_path / name
        backing.write_bytes(FILL * size)
        return stack.enter_context(_loop(backing))
    with stack:
        yield make


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    (src / "d" / "e").mkdir(parents=True)
    for i in range(40):
        (src / "d" / f"f{i}").write_bytes(b"text %d\n" % i * (i * 97 + 1))
    (src / "d" / "e" / "big").write_bytes(os.urandom(300000) + b"tail")
    (src / "sym").symlink_to("d/f1")
    os.link(src / "d" / "f2", src / "hard")
    with open(src / "sparse", "wb") as f:           # holes in a data chunk: gaps
        f.seek(1 << 20)
        f.write(b"end")
        f.seek(5000)
        f.write(b"mid")
    (src / "empty").mkdir()
    return src


def _read(dev, n, off=0):
    with open(dev, "rb") as f:
        f.seek(off)
        return f.read(n)


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("args", [[], ["-zlz4hc"],
                                  ["-zlzma", "-Efragments,dedupe,ztailpacking"]])
def test_mkfs_writes_a_loop_device_as_its_image_file(tmp_path, loopdev, tree, args):
    fixed = ["-U", "clear", "-T", "1", "--mkfs-time", "-q", *args]
    img = tmp_path / "img"
    run_erofs_tools("mkfs", img, tree, *fixed)
    dev = loopdev(16 << 20)
    run_erofs_tools("mkfs", dev, tree, *fixed)
    size = img.stat().st_size
    # every byte written, the zeros the file got from its truncation too (no 0xAA left)
    assert _read(dev, size) == img.read_bytes()
    assert _read(dev, 4096, size) == FILL * 4096          # nothing past the image
    fsck(dev)
    with mounted(dev) as mnt:
        assert_same_tree(tree, mnt, whiteout_marks=True)


@pytest.mark.parametrize("mode", ["f", "i"])
def test_mkfs_tar_writes_a_loop_device(tmp_path, loopdev, tree, mode):
    t = tmp_path / "l.tar"
    with tarfile.open(t, "w") as tf:
        tf.add(tree, arcname=".")
    fixed = ["-U", "clear", "-T", "1", "--mkfs-time", "-q"]
    img = tmp_path / "img"
    run_erofs_tools("mkfs", f"--tar={mode}", img, t, *fixed)
    dev = loopdev(16 << 20)
    run_erofs_tools("mkfs", f"--tar={mode}", dev, t, *fixed)
    assert _read(dev, img.stat().st_size) == img.read_bytes()
    fsck(dev, devices=[t] if mode == "i" else ())
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_a_mounted_device_is_refused(tmp_path, loopdev, tree):
    dev = loopdev(16 << 20)
    run_erofs_tools("mkfs", dev, tree, "-q")
    with mounted(dev):
        before = _digest(dev)
        r = run_erofs_tools("mkfs", dev, tree, check=False)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert "busy" in r.stderr and "nothing written" in r.stderr, r.stderr
        assert _digest(dev) == before


def test_a_mounted_device_is_refused_before_the_tar_is_read(tmp_path, loopdev, tree):
    dev = loopdev(16 << 20)
    run_erofs_tools("mkfs", dev, tree, "-q")
    with mounted(dev):
        # stdin stays open and empty: the refusal must not wait for the tar's end
        p = subprocess.Popen([sys.executable, "-m", "erofs_tools", "mkfs", "--tar=f", dev,
                              "-"], stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            p.wait(timeout=60)
            err = p.stderr.read()
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdin.close()
            p.stderr.close()
        assert p.returncode == 1 and "busy" in err and err.count("\n") == 1, err


def test_a_device_too_small_is_refused_with_nothing_written(tmp_path, loopdev, tree):
    (tree / "more").write_bytes(os.urandom(2 << 20))
    dev = loopdev(1 << 20)
    for extra in ([], ["--tar=f"]):
        src = tree
        if extra:
            src = tmp_path / "l.tar"
            with tarfile.open(src, "w") as tf:
                tf.add(tree, arcname=".")
        r = run_erofs_tools("mkfs", *extra, dev, src, check=False)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert "nothing written" in r.stderr and "1048576" in r.stderr, r.stderr
        assert _read(dev, 1 << 20) == FILL * (1 << 20)


def test_a_device_outgrown_midway_says_it_was_partly_written(tmp_path, loopdev, tree):
    # compressed data has no lower bound: incompressible data outgrows the device while
    # it is written; the old superblock was zeroed first, so no image is left
    (tree / "more").write_bytes(os.urandom(2 << 20))
    dev = loopdev(1 << 20)
    r = run_erofs_tools("mkfs", "-zlz4", dev, tree, check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "does not fit" in r.stderr and "partly written" in r.stderr, r.stderr
    assert _read(dev, 4096) == bytes(4096)
    rest = (1 << 20) - 4096
    assert _read(dev, rest, 4096) != FILL * rest          # (data was written)


def test_a_device_build_killed_midway_says_so(tmp_path, tree):
    import signal
    import time
    backing = tmp_path / "dev"
    with open(backing, "wb") as f:
        f.truncate(400 << 20)
    with _loop(backing) as dev:
        run_erofs_tools("mkfs", dev, tree, "-q")                  # an image there to be destroyed
        big = tree / "big"
        big.mkdir()
        chunk = os.urandom(1 << 20)
        for i in range(300):
            (big / f"f{i}").write_bytes(chunk[i:] + chunk[:i])
        p = subprocess.Popen([sys.executable, "-m", "erofs_tools", "mkfs", dev, tree],
                             stderr=subprocess.PIPE, text=True)
        try:
            # the old superblock zeroed: the device is being written
            deadline = time.monotonic() + 120
            while _read(dev, 4, 1024) != bytes(4) and p.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        err = p.stderr.read()
        p.stderr.close()
        assert p.returncode == 128 + signal.SIGTERM, err
        assert "terminated by SIGTERM" in err and err.count("\n") == 1, err
        assert "partly written" in err, err
        assert _read(dev, 4096) == bytes(4096)        # the old superblock gone


def test_offset_in_a_file_keeps_the_bytes_before_and_mounts_through_losetup_o(
        tmp_path, tree):
    fixed = ["-U", "clear", "-T", "1", "--mkfs-time", "-q"]
    img = tmp_path / "img"
    run_erofs_tools("mkfs", img, tree, *fixed)
    out = tmp_path / "disk"
    out.write_bytes(b"P" * 12288 + b"old" * 100000)
    run_erofs_tools("mkfs", "--offset=12288", out, tree, *fixed)
    data = out.read_bytes()
    assert data[:12288] == b"P" * 12288
    assert data[12288:] == img.read_bytes()
    # a new file: zeros before the image
    new = tmp_path / "new"
    run_erofs_tools("mkfs", "--offset=0x1000", new, tree, *fixed)
    assert new.read_bytes() == bytes(4096) + img.read_bytes()
    require_tool("fsck.erofs")
    p = subprocess.run(["fsck.erofs", "--offset=12288", "--extract", out],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    with _loop(out, 12288) as dev, mounted(dev) as mnt:
        assert_same_tree(tree, mnt, whiteout_marks=True)


@pytest.mark.parametrize("args", [["-zlz4hc", "-Efragments,dedupe"], ["--tar=f"],
                                  ["--tar=i"]])
def test_offset_not_block_aligned_with_z_and_tar(tmp_path, tree, args):
    src = tree
    if "--tar=f" in args or "--tar=i" in args:
        src = tmp_path / "l.tar"
        with tarfile.open(src, "w") as tf:
            tf.add(tree, arcname=".")
    out = tmp_path / "disk"
    out.write_bytes(b"head" * 25)
    run_erofs_tools("mkfs", "--offset=100", *args, out, src, "-q")
    assert out.read_bytes()[:100] == b"head" * 25
    require_tool("fsck.erofs")
    dev = [f"--device={src}"] if "--tar=i" in args else []
    p = subprocess.run(["fsck.erofs", "--offset=100", "--extract", *dev, out],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    if "--tar=i" not in args:
        with _loop(out, 100) as dev_, mounted(dev_) as mnt:
            assert_same_tree(tree, mnt, whiteout_marks=True,
                             ignore=("mtime_ns",) if "--tar=f" in args else ())


@pytest.mark.parametrize("bad", ["abc", "-5", "0x", "9223372036854775808"])
def test_a_bad_offset_is_one_line(tmp_path, tree, bad):
    r = run_erofs_tools("mkfs", f"--offset={bad}", tmp_path / "img", tree, check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--offset" in r.stderr, r.stderr
    assert not (tmp_path / "img").exists()


def test_offset_in_a_device(tmp_path, loopdev, tree):
    fixed = ["-U", "clear", "-T", "1", "--mkfs-time", "-q"]
    img = tmp_path / "img"
    run_erofs_tools("mkfs", img, tree, *fixed)
    dev = loopdev(16 << 20)
    run_erofs_tools("mkfs", "--offset=65536", dev, tree, *fixed)
    assert _read(dev, 65536) == FILL * 65536
    assert _read(dev, img.stat().st_size, 65536) == img.read_bytes()
    with _loop(dev, 65536) as inner, mounted(inner) as mnt:
        assert_same_tree(tree, mnt, whiteout_marks=True)


def test_help_says_a_device_is_written_in_place():
    out = " ".join(run_erofs_tools("mkfs", "--help").stdout.split())
    assert "--offset" in out and "block device" in out
    assert shutil.which("losetup") or not is_root()
