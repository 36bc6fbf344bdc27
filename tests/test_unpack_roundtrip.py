"""Round trips: trees -> mkfs.erofs / erofs-tools mkfs / pack -> unpack (and check), compared
with the source and with what the kernel shows for the image."""
import io
import os
import socket
import stat
import subprocess
import sys
import tarfile

import pytest
from helpers import (
    compare_trees,
    is_root,
    mounted,
    require,
    require_root_kernel,
    require_tool,
    scan_tree,
)

from erofs_tools.reader.fsck import check_image
from erofs_tools.reader.image import open_image
from erofs_tools.reader.stats import image_stats
from erofs_tools.reader.unpack import unpack_to_dir, unpack_to_tar

MTIME = (1_700_000_000, 123_456_789)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "erofs_tools", *map(str, args)],
                          capture_output=True)


def set_mtime(p, follow=False, ns=None):
    t = ns if ns is not None else MTIME[0] * 10**9 + MTIME[1]
    os.utime(p, ns=(t, t), follow_symlinks=follow)


def build_tree(root, long_name=254):
    """A tree with every inode type and the metadata unpack must keep."""
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)

    def w(rel, data, mode=0o644):
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
        os.chmod(p, mode)
        return p

    rnd = os.urandom
    w("empty", b"")
    w("one", b"x")
    w("block", rnd(4096))
    w("block+1", rnd(4097), 0o600)
    w("big", rnd(300_000), 0o755)
    w("same1", b"dup" * 30000)
    w("same2", b"dup" * 30000)
    p = w("sparse", b"")
    with open(p, "r+b") as f:
        f.seek(200_000)
        f.write(b"tail")
    w("sub/deeper/leaf.txt", b"leaf\n")
    w("sub/setuid", b"#!/bin/sh\n", 0o4755)
    w("\u00e9t\u00e9 \u2603.txt", b"unicode")
    w("!bang", b"bang")
    w("-dash", b"dash")
    w("x" * long_name, b"long name")   # mkfs.erofs 1.5 fails on 255-byte names
    many = os.path.join(root, "many")
    os.makedirs(many)
    for i in range(400):
        w(f"many/file-{i:04d}-{'y' * (i % 40)}", b"%d" % i)
    os.link(os.path.join(root, "one"), os.path.join(root, "hardlink-to-one"))
    os.link(os.path.join(root, "big"), os.path.join(root, "sub", "big-link"))
    os.symlink("one", os.path.join(root, "rel-link"))
    os.symlink("/etc/passwd", os.path.join(root, "abs-link"))
    os.symlink("../../escape", os.path.join(root, "sub", "dotdot-link"))
    os.symlink("nowhere", os.path.join(root, "dangling"))
    os.symlink("t" * 1000, os.path.join(root, "long-link"))
    os.mkdir(os.path.join(root, "emptydir"))
    os.mkdir(os.path.join(root, "ro-dir"), 0o555)
    os.mkfifo(os.path.join(root, "fifo"), 0o640)
    if is_root():
        os.mknod(os.path.join(root, "null-ish"), stat.S_IFCHR | 0o620, os.makedev(1, 3))
        os.mknod(os.path.join(root, "blkdev"), stat.S_IFBLK | 0o600, os.makedev(259, 70000))
        os.mknod(os.path.join(root, "whiteout"), stat.S_IFCHR | 0o000, os.makedev(0, 0))
        s = socket.socket(socket.AF_UNIX)
        s.bind(os.path.join(root, "sock"))
        s.close()
        os.chown(os.path.join(root, "one"), 1000, 1001)
        os.chown(os.path.join(root, "big"), 70000, 80000)
        os.chown(os.path.join(root, "rel-link"), 1234, 4321, follow_symlinks=False)
        os.chown(os.path.join(root, "sub"), 5, 6)
        os.setxattr(os.path.join(root, "one"), "trusted.overlay.opaque", b"y")
        os.setxattr(os.path.join(root, "sub"), "trusted.overlay.opaque", b"y")
        os.setxattr(os.path.join(root, "block"), "security.capability",
                    bytes.fromhex("0100000200200000000000000000000000000000"))
        os.setxattr(os.path.join(root, "abs-link"), "trusted.sym", b"on-a-symlink",
                    follow_symlinks=False)
    os.setxattr(os.path.join(root, "one"), "user.foo", b"bar")
    os.setxattr(os.path.join(root, "big"), "user.foo", b"bar")
    os.setxattr(os.path.join(root, "big"), "user.binary", bytes(range(256)))
    os.setxattr(os.path.join(root, "emptydir"), "user.e", b"")
    # mtimes: ns precision everywhere, set last (children before parents)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for n in filenames + dirnames:
            set_mtime(os.path.join(dirpath, n))
        set_mtime(dirpath)
    return root


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return build_tree(tmp_path_factory.mktemp("src") / "tree")


@pytest.fixture(scope="module")
def source255(tmp_path_factory):
    return build_tree(tmp_path_factory.mktemp("src255") / "tree", long_name=255)


MKFS_VARIANTS = {
    "plain": [],
    "shared-xattrs": ["-x1"],
    "chunk4k": ["--chunksize=4096"],
    "chunk64k": ["--chunksize=65536"],
    "blobdev": ["--chunksize=65536", "BLOBDEV"],
    "fixed-time": ["-T1600000000", "--all-root"],
}


def _mkfs_erofs(tmp_path, source, args):
    require_tool("mkfs.erofs")
    img = tmp_path / "img.erofs"
    devices = []
    real = []
    for a in args:
        if a == "BLOBDEV":
            b = tmp_path / "blob.img"
            real.append(f"--blobdev={b}")
            devices.append(b)
        else:
            real.append(a)
    p = subprocess.run(["mkfs.erofs", "--quiet", *real, str(img), str(source)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return img, devices


def _compare_tar(tar_bytes, unpacked):
    """The tar stream holds what the directory extraction holds."""
    tree = scan_tree(unpacked)
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        members = {m.name: m for m in tf.getmembers()}
        names = {os.fsencode(n) if n != "." else b"" for n in members}
        want = {k for k, v in tree.items() if v["type"] != stat.S_IFSOCK}
        assert names == want
        for name, m in members.items():
            rel = os.fsencode(name) if name != "." else b""
            t = tree[rel]
            assert m.mode == t["mode"] and (m.uid, m.gid) == (t["uid"], t["gid"]), name
            sec, _, ns = m.pax_headers["mtime"].partition(".")
            assert int(sec) * 10**9 + int(ns) == t["mtime_ns"], name
            xs = {k[len("SCHILY.xattr."):]: v for k, v in m.pax_headers.items()
                  if k.startswith("SCHILY.xattr.")}
            assert {os.fsencode(k): v.encode("utf-8", "surrogateescape")
                    for k, v in xs.items()} == {os.fsencode(k) if isinstance(k, str) else k: v
                                                for k, v in t["xattr"].items()}, name
            if m.isreg():
                import hashlib
                assert hashlib.sha256(tf.extractfile(m).read()).hexdigest() == t["sha256"]
            elif m.issym():
                assert os.fsencode(m.linkname) == os.fsencode(t["target"])
            elif m.islnk():
                assert os.fsencode(m.linkname) in t["links"]


def _xattrs(root, whiteout_origin=False):
    """rel path -> xattrs. whiteout_origin: drop the empty trusted.overlay.origin that
    mkfs.erofs 1.9 adds to a directory holding a whiteout (it tells overlayfs not to
    iterate that directory directly); only there, only empty."""
    tree = scan_tree(root, content=False)
    holds_whiteout = {os.path.dirname(rel) for rel, e in tree.items()
                      if stat.S_ISCHR(e["type"]) and e["rdev"] == (0, 0)}
    out = {rel: dict(e["xattr"]) for rel, e in tree.items()}
    if whiteout_origin:
        for rel in holds_whiteout:
            if out[rel].get("trusted.overlay.origin") == b"":
                del out[rel]["trusted.overlay.origin"]
    return out


@pytest.mark.parametrize("variant", sorted(MKFS_VARIANTS))
def test_mkfs_erofs_round_trip(tmp_path, source, variant):
    """mkfs.erofs images (independent writer) unpack exactly like the kernel shows them."""
    require_root_kernel()
    img_path, devices = _mkfs_erofs(tmp_path, source, MKFS_VARIANTS[variant])
    img = open_image(img_path, devices=devices)
    assert check_image(img, img.blobs) == []
    out = tmp_path / "out"
    warnings = []
    unpack_to_dir(img, out, warnings)
    assert warnings == []
    opts = ",".join(f"device={d}" for d in devices) or None
    with mounted(img_path, opts) as mnt:
        diffs = compare_trees(mnt, out, check_nlink=True)
        assert diffs == [], diffs
    if variant in ("plain", "shared-xattrs"):
        # mkfs.erofs keeps every piece of metadata we set: compare with the source too
        assert compare_trees(source, out, ignore=("xattr",)) == []
        assert _xattrs(out, whiteout_origin=True) == _xattrs(source)
    buf = io.BytesIO()
    unpack_to_tar(img, buf, [])
    _compare_tar(buf.getvalue(), out)
    # the CLI agrees
    args = [a for d in devices for a in ("--device", d)]
    p = run_cli("check", img_path, *args)
    assert p.returncode == 0, p.stdout + p.stderr
    p = run_cli("unpack", img_path, *args, "-o", tmp_path / "cli-out")
    assert p.returncode == 0, p.stderr
    assert compare_trees(out, tmp_path / "cli-out") == []


def test_shared_xattrs_are_read(tmp_path, source):
    require(is_root(), "needs root for trusted xattrs")
    img_path, _ = _mkfs_erofs(tmp_path, source, ["-x1"])
    img = open_image(img_path)
    shared = 0
    for _p, _d, ino in img.walk():
        if ino.xattr_icount:
            raw = img.read(ino.offset + ino.inode_size, 12)
            shared += raw[4]
    assert shared > 0
    assert dict(img.xattrs(img.lookup("/one"))) == {b"user.foo": b"bar",
                                                    b"trusted.overlay.opaque": b"y"}


def test_stat_chunked_matches_blobdev(tmp_path, source):
    """stat's deduplicated chunk blocks equal the bytes mkfs.erofs stored in the blob."""
    img_path, devices = _mkfs_erofs(tmp_path, source, ["--chunksize=4096", "BLOBDEV"])
    img = open_image(img_path, devices=devices)
    d, _ = image_stats(img)
    assert d["bytes_chunk_blocks"] == os.path.getsize(devices[0])
    assert d["unique_chunks"] * 4096 == os.path.getsize(devices[0])
    assert d["chunks"] > d["unique_chunks"]            # same1/same2 and the hardlinks
    # every file byte is accounted for: chunked + holes
    assert d["bytes_chunks_before_dedup"] + d["bytes_holes"] == d["bytes_logical"]


def test_unpack_refuses_non_empty_target(tmp_path, source):
    img_path, _ = _mkfs_erofs(tmp_path, source, [])
    out = tmp_path / "busy"
    out.mkdir()
    (out / "x").write_text("keep")
    p = run_cli("unpack", img_path, "-o", out)
    assert p.returncode == 1 and p.stderr.startswith(b"error: ")
    assert (out / "x").read_text() == "keep"
    # an existing empty directory is fine
    out2 = tmp_path / "empty"
    out2.mkdir()
    p = run_cli("unpack", img_path, "-o", out2)
    assert p.returncode == 0, p.stderr


def test_our_mkfs_round_trip(tmp_path, source255):
    source = source255
    p = run_cli("mkfs", "-q", tmp_path / "ours.erofs", source)
    if p.returncode != 0:
        pytest.fail(f"erofs-tools mkfs failed: {p.stderr}")
    img = open_image(tmp_path / "ours.erofs")
    assert check_image(img) == []
    out = tmp_path / "out"
    unpack_to_dir(img, out)
    assert compare_trees(source, out, check_nlink=True, whiteout_marks=True) == []


def test_pack_round_trip(tmp_path, source255):
    source = source255
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    boot = tmp_path / "boot"
    p = run_cli("pack", "-q", "-B", boot, "-D", blobs, "--chunk-size", "64K", source)
    if p.returncode != 0:
        pytest.fail(f"erofs-tools pack failed: {p.stderr}")
    img = open_image(boot, blob_dir=blobs)
    assert check_image(img, img.blobs) == []
    out = tmp_path / "out"
    unpack_to_dir(img, out)
    assert compare_trees(source, out, check_nlink=True) == []
    # stat: the compressed bytes of the unique chunks are exactly the blob's data region
    d, _ = image_stats(img)
    (blob_name,) = os.listdir(blobs)
    meta = img.blobs.meta(1)
    data_end = max(c.compressed_offset + c.compressed_size for c in meta.chunks)
    assert d["bytes_after_compression"] - d["bytes_flat"] == data_end
    with open(blobs / blob_name, "rb") as f:
        f.seek(data_end)
        assert f.read(10) == b"image.blob"
    assert d["unique_chunks"] == len(meta.chunks)
