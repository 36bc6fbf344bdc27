"""An output path that names a device, a FIFO or a socket is never replaced by a file.

Every tool writes its outputs to a temporary file renamed over the target; renamed over
/dev/null (`erofs-tools unpack IMG --tar /dev/null`, `mkfs /dev/null SRC`, as root) it left
a regular file there, and apt and every `> /dev/null` on the machine broke. The tests use
their own character device node (1:3, the null device) in tmp_path, never /dev/null."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tarfile
import threading

import pytest
from helpers import is_root, require

pytestmark = pytest.mark.root


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "erofs_tools", *map(str, args)],
                          capture_output=True, timeout=120)


@pytest.fixture
def null_node(tmp_path):
    require(is_root(), "needs root (mknod)")
    node = tmp_path / "null"
    os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return node


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "a").write_bytes(b"hello\n" * 1000)
    (src / "b").write_bytes(b"x" * 70000)
    return src


def _still_a_device(node):
    st = os.lstat(node)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3), oct(st.st_mode)


@pytest.mark.parametrize("kind", ["mkfs", "mkfs-tar", "pack"])
def test_an_image_onto_a_device_is_refused_and_the_device_kept(tmp_path, null_node, tree,
                                                               kind):
    if kind == "mkfs":
        r = _cli("mkfs", null_node, tree)
    elif kind == "mkfs-tar":
        t = tmp_path / "l.tar"
        with tarfile.open(t, "w") as tf:
            tf.add(tree, arcname=".")
        r = _cli("mkfs", "--tar=f", null_node, t)
    else:
        r = _cli("pack", tree, "-B", null_node, "-D", tmp_path / "blobs")
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert err.count("\n") == 1 and "is a character device" in err, err
    _still_a_device(null_node)
    # nothing half-written beside it
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_mkfs_tar_ungzip_file_onto_a_device_is_refused(tmp_path, null_node, tree):
    import gzip
    t = tmp_path / "l.tar.gz"
    with tarfile.open(tmp_path / "l.tar", "w") as tf:
        tf.add(tree, arcname=".")
    t.write_bytes(gzip.compress((tmp_path / "l.tar").read_bytes()))
    r = _cli("mkfs", "--tar=f", f"--ungzip={null_node}", tmp_path / "img", t)
    assert r.returncode == 1 and "is a character device" in r.stderr.decode(), r.stderr
    _still_a_device(null_node)
    assert not (tmp_path / "img").exists()


def test_unpack_tar_streams_into_a_device_or_fifo_in_place(tmp_path, null_node, tree):
    img = tmp_path / "img"
    assert _cli("mkfs", img, tree).returncode == 0
    r = _cli("unpack", img, "--tar", null_node)
    assert r.returncode == 0, r.stderr
    _still_a_device(null_node)
    # a FIFO: the tar goes through it, whole, and the FIFO stays one
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    reader.start()
    r = _cli("unpack", img, "--tar", fifo)
    reader.join(60)
    assert r.returncode == 0, r.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    out = tmp_path / "t.tar"
    out.write_bytes(got[0])
    with tarfile.open(out) as tf:
        assert tf.extractfile("d/a").read() == b"hello\n" * 1000
        assert tf.getmember("b").size == 70000
