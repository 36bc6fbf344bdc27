"""xattr name filters (EROFS_FEATURE_COMPAT_XATTR_FILTER, Linux 6.6+), which mkfs.erofs
1.9 writes by default: each inode's xattr header holds a 32-bit Bloom filter of its xattr
names, so the kernel answers a lookup of an absent name (every exec's and write's
security.capability) without reading the xattrs. A wrong bit hides an xattr: every image
here is mounted and each xattr read back by name through the kernel, the filters are
compared with mkfs.erofs 1.9's for the same tree, `check` finds a filter that hides a
name, and pack's RAFS bootstraps (as nydus-image's) have none."""
import errno
import os
import subprocess
import sys

import pytest
from helpers import (
    assert_same_tree,
    fsck,
    mounted,
    require_tool,
    run_mkfs,
    run_pack,
)

from erofs_tools._native_sums import xxh32
from erofs_tools.format import erofs as E
from erofs_tools.reader.fsck import xattr_name_filter
from erofs_tools.reader.image import Image

pytestmark = pytest.mark.root


def test_xxh32_reference_values():
    """xxHash32's published test values."""
    assert xxh32(b"") == 0x02CC5D05
    assert xxh32(b"a") == 0x550D7456
    assert xxh32(b"abc") == 0x32D153FF
    assert xxh32(b"Nobody inspects the spammish repetition") == 0xE2293B2F
    data = bytes(range(256)) * 3
    assert xxh32(data, 1) != xxh32(data, 0)            # the seed counts
    assert xxh32(data[:17]) != xxh32(data[:16])        # and the tail after the stripes


XATTRS = {
    "f1": {"user.a": b"1", "user." + "x" * 200: b"long name"},
    "f2": {"user.mime_type": b"text/plain", "trusted.erofs.fingerprint": b"f" * 20},
    "f3": {"security.selinux": b"system_u:object_r:x", "user.a": b"1"},
    "d": {"trusted.overlay.opaque": b"y", **{f"user.k{i}": b"v" for i in range(40)}},
    "d/g": {"trusted.overlay.origin": b"", "user.z": b"one letter"},
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("xfilter") / "src"
    (root / "d").mkdir(parents=True)
    for name in ("f1", "f2", "f3", "plain"):
        (root / name).write_bytes(name.encode() * 100)
    (root / "d" / "g").write_bytes(b"g")
    for name, xattrs in XATTRS.items():
        for k, v in xattrs.items():
            os.setxattr(root / name, k, v)
    return root


def filters(image):
    """{path: h_name_filter} of every inode with xattrs."""
    out = {}
    with Image(os.fspath(image)) as img:
        assert img.sb.feature_compat & E.FEATURE_COMPAT_XATTR_FILTER
        for path, _, ino in img.walk():
            if ino.xattr_icount:
                out[path] = xattr_name_filter(img, ino)
    return out


def read_back(tree, mnt):
    """Every xattr by name through the kernel, and absent names answered ENODATA."""
    assert_same_tree(tree, mnt, check_nlink=True)
    for name, xattrs in XATTRS.items():
        for k, v in xattrs.items():
            assert os.getxattr(os.path.join(mnt, name), k) == v, (name, k)
        for absent in ("security.capability", "user.nope", "trusted.overlay.redirect"):
            with pytest.raises(OSError) as e:
                os.getxattr(os.path.join(mnt, name), absent)
            assert e.value.errno == errno.ENODATA


def test_filters_read_back_and_equal_mkfs_erofs(root_kernel, tree, tmp_path):
    require_tool("mkfs.erofs")
    ours, ref = tmp_path / "o.img", tmp_path / "r.img"
    run_mkfs(ours, tree, "-U", "clear")
    subprocess.run(["mkfs.erofs", "--quiet", "-Uclear", os.fspath(ref), os.fspath(tree)],
                   check=True, capture_output=True)
    fsck(ours)
    with mounted(ours) as mnt:
        read_back(tree, mnt)
    got, want = filters(ours), filters(ref)
    assert got == want
    # 41 names: some bits stay set (names ruled out), computed here as the kernel does
    used = 0
    for k in XATTRS["d"]:
        index = 4 if k.startswith("trusted.") else 1
        rest = k.split(".", 1)[1] if index == 1 else k[len("trusted."):]
        used |= 1 << (xxh32(rest.encode(), E.XATTR_FILTER_SEED + index) % 32)
    assert got[b"/d"] == 0xFFFFFFFF & ~used != 0
    assert all(v != 0xFFFFFFFF for v in got.values())


def test_filters_with_long_prefixes_and_tar(root_kernel, tree, tmp_path):
    """--xattr-inode-digest (a long prefix: the filter hashes its infix too) and --tar."""
    require_tool("mkfs.erofs")
    ours, ref = tmp_path / "o.img", tmp_path / "r.img"
    run_mkfs(ours, tree, "--xattr-inode-digest")
    subprocess.run(["mkfs.erofs", "--quiet", "--xattr-inode-digest", os.fspath(ref),
                    os.fspath(tree)], check=True, capture_output=True)
    assert filters(ours) == filters(ref)
    with Image(os.fspath(ours)) as img:     # the long-prefixed fingerprints are there
        assert any(img.xattrs(img.lookup(b"/plain")))
    with mounted(ours) as mnt:
        read_back(tree, mnt)
    layer = tmp_path / "l.tar"         # GNU tar keeps the xattrs (SCHILY.xattr records)
    subprocess.run(["tar", "-C", os.fspath(tree), "--xattrs", "--xattrs-include=*", "-cf",
                    os.fspath(layer), "."], check=True)
    fromtar, reftar = tmp_path / "t.img", tmp_path / "rt.img"
    run_mkfs(fromtar, layer, "--tar=f")
    subprocess.run(["mkfs.erofs", "--quiet", "--tar=f", os.fspath(reftar), os.fspath(layer)],
                   check=True, capture_output=True)
    assert filters(fromtar) == filters(reftar)
    with mounted(fromtar) as mnt:
        assert_same_tree(tree, mnt, ignore={"mtime_ns"})
        for name, xattrs in XATTRS.items():
            for k, v in xattrs.items():
                assert os.getxattr(os.path.join(mnt, name), k) == v


def test_turned_off_and_pack_has_none(tree, tmp_path):
    off = tmp_path / "off.img"
    run_mkfs(off, tree, "-E", "^xattr-name-filter")
    with Image(os.fspath(off)) as img:
        assert not img.sb.feature_compat & E.FEATURE_COMPAT_XATTR_FILTER
    boot = tmp_path / "p.boot"
    run_pack(tree, boot, tmp_path / "blobs")
    with Image(os.fspath(boot)) as img:
        assert not img.sb.feature_compat & E.FEATURE_COMPAT_XATTR_FILTER


def test_check_finds_a_filter_that_hides_a_name(tree, tmp_path):
    img = tmp_path / "x.img"
    run_mkfs(img, tree)
    with Image(os.fspath(img)) as im:
        ino = im.lookup(b"/f3")
        at = ino.offset + ino.inode_size
    with open(img, "r+b") as f:        # every bit set: every name ruled out
        f.seek(at)
        f.write(b"\xff\xff\xff\xff")
        f.seek(0)                       # (the inode may sit in block 0, as mkfs.erofs's
        block0 = f.read(4096)           # do: its checksum then covers it)
        f.seek(E.CHECKSUM_FIELD)
        f.write(E.superblock_checksum(block0).to_bytes(4, "little"))
    p = subprocess.run([sys.executable, "-m", "erofs_tools", "check", os.fspath(img)],
                       capture_output=True, text=True)
    assert p.returncode == 1
    assert "xattr name filter hides" in p.stdout + p.stderr
    assert "security.selinux" in p.stdout + p.stderr
