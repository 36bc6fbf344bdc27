"""`erofs-tools mkfs` layouts past plain and `-z` files on the VM test kernels (6.12 and
6.1), not only on the host's 6.18: compressed directories (`--zD`: every directory
whole in the packed inode, Linux 6.1+; with lz4hc and lzma, ztailpacking and fragments,
and without -z), chunk-based files (`--chunksize`, a block map or `-E
force-chunk-indexes`; with -z for the files stored uncompressed) and their chunks in an
extra device (`--blobdev`, mounted with `-o device=`: a file-backed mount on 6.12, loop
devices for both image and blob on 6.1, where there are no file-backed mounts). Each
image is built in the guest from one varied tree (a directory of many blocks, nested and
empty directories with xattrs, duplicate files and chunks, chunks of zeros, sparse
files, hardlinks, symlinks, devices), its layout checked with our reader (so the mount
really reads that layout), mounted by the guest kernel and compared with the tree
(full metadata, nlink), with no kernel warning logged.

The 48-bit layout (`-E48bit`, with and without -z) is Linux 6.15+: a kernel before it
must refuse the image at mount with its "unidentified incompatible feature 80" (the
INCOMPAT_48BIT bit), cleanly: mount(2) fails, nothing is mounted and the kernel logs no
oops or warning. A kernel from 6.15 on (the host's) mounts it and it is compared as the
others, mtimes to the second (the layout's compact inodes keep no nanoseconds).

Runs inside the guest (vm-tests/run); skipped elsewhere.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest
from vmguest import GUEST_ONLY, IN_GUEST, kernel_log, scratch_dir, text

pytestmark = GUEST_ONLY

if IN_GUEST:
    from helpers import assert_same_tree, noise  # noqa: E402

    from erofs_tools.errors import MountError  # noqa: E402
    from erofs_tools.format import erofs as E  # noqa: E402
    from erofs_tools.mount import mount_erofs, umount  # noqa: E402
    from erofs_tools.reader.image import open_image  # noqa: E402

ZDIR = [
    ("--zD", "-z", "lz4hc"),
    ("--zD", "-z", "lzma"),
    ("--zD", "-z", "lz4hc", "-E", "ztailpacking,fragments"),
    ("--zD", "-z", "lzma", "-E", "ztailpacking,fragments"),
    ("--zD",),                                  # the packed inode stored plain
]
CHUNKED = [
    ("--chunksize=4096",),
    ("--chunksize=65536", "-E", "force-chunk-indexes"),
    ("-z", "lz4hc", "--chunksize=4096"),        # what -z stores uncompressed: chunks
]
LAYOUT_48BIT = [("-E48bit", "-z", "lz4hc"), ("-E48bit",)]
# what a kernel must not log while it mounts, reads or refuses an image
KERNEL_TROUBLE = re.compile(r"Oops|BUG:|WARNING:|Call Trace|general protection|"
                            r"KASAN|UBSAN|corrupted|Kernel panic")


def kernel():
    m = re.match(r"(\d+)\.(\d+)\.", os.uname().release)
    assert m, os.uname().release
    return int(m.group(1)), int(m.group(2))


@pytest.fixture(scope="module")
def tree():
    """On the scratch ext4 (trusted. xattrs, device nodes): a directory of many blocks
    (long names), nested and empty directories with xattrs, files around the block and
    chunk edges, a 1.5 MiB file and its copy, a file sharing another's start, chunks of
    zeros, sparse files (holes inside and across chunks, one with no data), hardlinks,
    symlinks, devices, a fifo, owners, modes and mtimes."""
    base = os.path.join(os.environ["VMTEST_SCRATCH"], "ltree-" + os.urandom(4).hex())
    root = os.path.join(base, "src")
    for d in ("a/b/c", "a/empty", "empty", "many", "d/e e"):
        os.makedirs(os.path.join(root, d))
    big = noise(3 << 19, 7)                 # 1.5 MiB
    files = {
        "empty-file": b"", "one": b"x", "t100": text(100, 3),
        "t4095": text(4095), "t4096": text(4096), "t4097": text(4097),
        "r65535": noise(65535, 2), "r65537": noise(65537, 3), "t70000": text(70000, 4),
        "big": big, "d/big-copy": big,
        "d/big-head": big[:(1 << 20) + 5000] + noise(70000, 8),
        "text": text(300_000, 5), "d/e e/text-copy": text(300_000, 5),
        "zeros": bytes(2 << 20), "zeros-tail": bytes(70000) + b"end",
        "a/b/c/\u00e9t\u00e9 name": text(10001, 8), "a/small": b"small\n",
    }
    for name, data in files.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
    for i in range(1500):                   # ~70 directory blocks
        name = f"{i:05d}-" + "long-entry-name-" * 10 + f"{i * 7919 % 10007}"
        with open(os.path.join(root, "many", name), "wb") as f:
            f.write(b"%d\n" % i)
    for i in range(30):
        sub = os.path.join(root, "a", f"sub{i:02d}")
        os.mkdir(sub)
        with open(os.path.join(sub, "f"), "wb") as f:
            f.write(text(300 + i * 97, i))
    with open(os.path.join(root, "sparse"), "wb") as f:
        f.truncate(5 << 20)
        f.seek(1 << 20)
        f.write(noise(9000, 9))
        f.seek((4 << 20) + 100)
        f.write(b"later")
    with open(os.path.join(root, "hole-only"), "wb") as f:
        f.truncate((7 << 20) + 3)
    with open(os.path.join(root, "d", "hole-tail"), "wb") as f:
        f.write(text(10000, 10))
        f.truncate(2 << 20)
    os.link(os.path.join(root, "big"), os.path.join(root, "d", "e e", "big-link"))
    os.link(os.path.join(root, "t4097"), os.path.join(root, "a", "hard"))
    os.symlink("big", os.path.join(root, "sym"))
    os.symlink("/x/" + "y" * 3000, os.path.join(root, "d", "longsym"))
    os.mkfifo(os.path.join(root, "fifo"))
    os.mknod(os.path.join(root, "d", "chr"), 0o20644, os.makedev(1, 7))
    os.mknod(os.path.join(root, "d", "blk"), 0o60600, os.makedev(8, 1))
    os.setxattr(os.path.join(root, "a"), "user.dir", b"xattr on a directory")
    os.setxattr(os.path.join(root, "a", "b"), "trusted.big", b"v" * 300)
    os.setxattr(os.path.join(root, "t4097"), "user.note", b"with xattrs")
    os.chmod(os.path.join(root, "t100"), 0o4755)
    os.chown(os.path.join(root, "t70000"), 70000, 12)
    os.chown(os.path.join(root, "a", "empty"), 1234, 5678)
    os.utime(os.path.join(root, "one"), ns=(1, 1_600_000_000_123_456_789))
    for dirpath, _dirs, _files in os.walk(root, topdown=False):   # directories last
        os.utime(dirpath, ns=(1, 1_500_000_000_987_654_321))
    yield root
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def work():
    with scratch_dir("limg", "mnt") as base:
        yield base


def _mkfs(tree, work, args):
    img = os.path.join(work, "img")
    subprocess.run([sys.executable, "-m", "erofs_tools", "mkfs", "-q", *args, img, tree],
                   check=True)
    return img


def _mountinfo_source(mnt):
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mnt:
                return fields[fields.index("-") + 2]
    raise AssertionError(f"{mnt} not in /proc/self/mountinfo")


def _mtime_seconds(root):
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in ["", *dirs, *files]:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = os.lstat(p).st_mtime_ns // 10**9
    return out


def _mount_and_compare(tree, img, mnt, devices=(), whole_seconds=False):
    """Mounted by the guest kernel, equal to the tree (whole_seconds: mtimes to the
    second), nothing logged but erofs's own lines; -> the mount's source as mountinfo
    shows it (the image, or a loop device)."""
    with kernel_log() as log:
        mount_erofs(img, mnt, devices)
        try:
            source = _mountinfo_source(mnt)
            if whole_seconds:
                assert_same_tree(tree, mnt, check_nlink=True, ignore=("mtime_ns",))
                assert _mtime_seconds(tree) == _mtime_seconds(mnt)
            else:
                assert_same_tree(tree, mnt, check_nlink=True)
        finally:
            umount(mnt)
    assert not KERNEL_TROUBLE.search("".join(log)), log
    assert not os.path.ismount(mnt)
    return source


@pytest.mark.parametrize("args", ZDIR, ids=lambda a: " ".join(a))
def test_compressed_directories(tree, work, args):
    img = _mkfs(tree, work, args)
    with open_image(img) as im:
        assert im.sb.packed_nid
        dirs = [ino for _p, _d, ino in im.walk() if ino.is_dir()]
        assert len(dirs) > 35
        assert {ino.layout for ino in dirs} == {E.LAYOUT_COMPRESSED_FULL}
        many = [ino for p, _d, ino in im.walk() if p == b"/many"]
        assert many[0].size > 50 * 4096        # many blocks, in the packed inode
    _mount_and_compare(tree, img, os.path.join(work, "mnt"))


def _chunk_layout(img, args):
    """Every regular file with data chunk-based (with -z: those stored uncompressed),
    its chunks of the asked size, 8-byte chunk indexes exactly with force-chunk-indexes
    or --blobdev; -> the set of devices the chunks name."""
    size = int(next(a for a in args if a.startswith("--chunksize=")).split("=")[1])
    indexes = "force-chunk-indexes" in args or any(a.startswith("--blobdev=") for a in args)
    devices = set()
    chunked = 0
    with open_image(img) as im:
        for path, _d, ino in im.walk():
            if not ino.is_reg() or not ino.size:
                continue
            if "-z" in args and ino.layout != E.LAYOUT_CHUNK_BASED:
                assert ino.layout in (E.LAYOUT_COMPRESSED_FULL, E.LAYOUT_COMPRESSED_COMPACT)
                continue
            assert ino.layout == E.LAYOUT_CHUNK_BASED, path
            chunked += 1
            fmt, bits = im.chunk_format(ino)
            assert bool(fmt & E.CHUNK_FORMAT_INDEXES) == indexes, (path, fmt)
            # contiguous chunks may be merged into larger ones, never split smaller
            assert 1 << bits >= size, (path, bits)
            devices |= {c.device for c in im.chunks(ino) if not c.hole}
    assert chunked >= (5 if "-z" in args else 40), chunked
    return devices


@pytest.mark.parametrize("args", CHUNKED, ids=lambda a: " ".join(a))
def test_chunked_files(tree, work, args):
    img = _mkfs(tree, work, args)
    assert _chunk_layout(img, args) == {0}
    _mount_and_compare(tree, img, os.path.join(work, "mnt"))


def test_chunks_in_blob_device(tree, work):
    """--blobdev: the image holds only metadata, every chunk names device 1; mounted
    with the blob as its device (-o device=), file-backed on 6.12+, on two loop devices
    before (no file-backed mounts: the kernel wants block devices for both)."""
    blob = os.path.join(work, "blob")
    args = ("--chunksize=65536", f"--blobdev={blob}")
    img = _mkfs(tree, work, args)
    with open_image(img) as im:
        assert len(im.devices) == 1
    assert _chunk_layout(img, args) == {1}
    assert os.path.getsize(img) < os.path.getsize(blob) // 10
    source = _mount_and_compare(tree, img, os.path.join(work, "mnt"), devices=[blob])
    if kernel() >= (6, 12):
        assert source == img, source
    else:
        assert re.fullmatch(r"/dev/loop\d+", source), source


@pytest.mark.parametrize("args", LAYOUT_48BIT, ids=lambda a: " ".join(a))
def test_48bit_refused_before_6_15(tree, work, args):
    img = _mkfs(tree, work, args)
    with open_image(img) as im:
        assert im.sb.feature_incompat & E.FEATURE_INCOMPAT_48BIT
    mnt = os.path.join(work, "mnt")
    if kernel() >= (6, 15):
        # compact inodes keep the seconds from the epoch, the superblock's nsec (0)
        _mount_and_compare(tree, img, mnt, whole_seconds=True)
        return
    with kernel_log() as log, pytest.raises(MountError) as exc:
        mount_erofs(img, mnt)
    assert "Invalid argument" in str(exc.value), exc.value
    logged = "".join(log)
    assert re.search(r"erofs.*unidentified incompatible feature 80\b", logged), log
    assert not KERNEL_TROUBLE.search(logged), log
    assert not os.path.ismount(mnt)
