"""The plain image's blocks in the order a reader walking the tree needs them.

The kernel reads inodes, inline tails and directories one block at a time without
readahead; only file data reads ahead. So every block a walk in os.walk order (each
directory, its files' inodes and data in name order, then its subdirectories) needs for
the first time must come after every block it needed before: then the data's readahead
has already brought in the next inodes (csrc/smeta.c). Listing a directory, os.walk
stats its symlinks: their inodes are needed right after the directory's blocks.
Checked through a kernel mount: st_ino is the nid (the inode at nid * 32), FIEMAP gives
the data blocks.
"""
import fcntl
import os
import stat
import struct

import pytest
from helpers import fsck, mkfs_and_check, mounted, require_root_kernel, run_mkfs

pytestmark = pytest.mark.root

FS_IOC_FIEMAP = 0xC020660B
EXTENT_DATA_INLINE = 0x200


def extents(path):
    """[(physical byte offset, length, flags)] of a file or directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        n = 64
        buf = bytearray(struct.pack("=QQIIII", 0, 2**64 - 1, 0, 0, n, 0) + b"\0" * 56 * n)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        count = struct.unpack_from("=I", buf, 20)[0]
        return [struct.unpack_from("=QQQQQI", buf, 32 + 56 * i)[1:3] +
                struct.unpack_from("=QQQQQI", buf, 32 + 56 * i)[5:6] for i in range(count)]
    finally:
        os.close(fd)


def walk_blocks(mnt, blksz=4096):
    """Each access of a whole-tree read in os.walk order as the blocks it touches."""
    seq = []

    def add(off, length):
        seq.append(range(off // blksz, (off + max(length, 1) - 1) // blksz + 1))

    for dirpath, _, files in os.walk(mnt):
        add(os.stat(dirpath).st_ino * 32, 32)
        for phys, length, _ in extents(dirpath):
            add(phys, length)
        # listing the directory, os.walk's is_dir() (as ls -l) stats each symlink, before
        # any file is read (the target's inode, wherever it is, is not modelled)
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISLNK(st.st_mode):
                add(st.st_ino * 32, 32)
        for name in files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            add(st.st_ino * 32, 32)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            for phys, length, _ in extents(path):
                add(phys, length)
    return seq


def text(size, seed):
    """Compressible bytes (about 1/3 of their size with lz4hc)."""
    words = b"%d erofs %x block inode %o" % (seed, seed * 7, seed * 3)
    out = bytearray()
    while len(out) < size:
        out += words + os.urandom(2).hex().encode() + b"\n"
    return bytes(out[:size])


@pytest.mark.parametrize("args", [(), ("-z", "lz4hc")], ids=["plain", "lz4hc"])
def test_image_blocks_in_walk_order(tmp_path, args):
    require_root_kernel()
    src = tmp_path / "src"
    for d in ("a", "a/x", "a/x/deep", "b", "c"):
        (src / d).mkdir(parents=True)
    sizes = [0, 17, 900, 3000, 4096, 5000, 9000, 40000, 70001]
    for d in ("", "a", "a/x", "a/x/deep", "b", "c"):
        for i, size in enumerate(sizes * 4):
            data = text(size, i) if args and i % 3 else os.urandom(size)
            (src / d / f"f{i:03d}").write_bytes(data)
        os.symlink("f001", src / d / "ln")
    for i in range(300):                     # a directory of several blocks
        (src / "c" / f"{'n' * 60}{i:04d}").write_bytes(b"%d" % i)
    img = tmp_path / "p.img"
    mkfs_and_check(img, src, "-T", "0", *args, ignore=("mtime_ns",))
    with mounted(img) as mnt:
        seq = walk_blocks(mnt)
    data = sum(p.stat().st_size for p in src.rglob("*") if p.is_file() and not p.is_symlink())
    assert (img.stat().st_size < 0.8 * data) == bool(args)    # compressed files among them
    back = backward(seq)
    assert len(seq) > 400
    assert back == [], f"{len(back)} accesses need a block before ones needed earlier"


def backward(seq):
    """The accesses whose first new block lies before a block needed earlier."""
    seen, last, back = set(), -1, []
    for blocks in seq:
        new = [b for b in blocks if b not in seen]
        if new and new[0] < last:
            back.append((new[0], last))
        if new:
            last = max(last, new[-1])
        seen.update(blocks)
    return back


def test_records_packed_best_fit_decreasing(tmp_path):
    """A directory's records wait for its other files' and are packed longest first
    (csrc/smeta.c's window): 12 short records (a ~1000-byte tail) named before 12 long
    ones (~2900) take 12 blocks, a long and a short each; packed in name order, the
    short ones fill 4 blocks three by three and leave no room for a long one: 16. The
    blocks still come in the order a walk needs them."""
    require_root_kernel()
    src = tmp_path / "src"
    d = src / "d"
    d.mkdir(parents=True)
    for i in range(12):
        (d / f"a{i:02d}").write_bytes(os.urandom(1000))
        (d / f"b{i:02d}").write_bytes(os.urandom(2900))
    img = tmp_path / "p.img"
    mkfs_and_check(img, src, "-T", "0", ignore=("mtime_ns",))
    with mounted(img) as mnt:
        blocks = {os.lstat(os.path.join(mnt, "d", n)).st_ino * 32 // 4096
                  for n in os.listdir(os.path.join(mnt, "d"))}
        seq = walk_blocks(mnt)
    assert len(blocks) <= 13, f"the 24 records take {len(blocks)} blocks"
    assert backward(seq) == []


def test_record_windows_same_image_whatever_the_threads(tmp_path):
    """-z: the records known before compressing are packed per window of 256 files at
    the window's first commit (csrc/zsmeta.c); over several windows (small files stored
    plain, compressed ones, directories, symlinks) the image is the same for any thread
    count, and it checks (data decoded)."""
    src = tmp_path / "src"
    for k in range(3):
        d = src / f"d{k}"
        d.mkdir(parents=True)
        for i in range(300):
            size = (17, 900, 2500, 3900, 6000, 30000)[i % 6]
            (d / f"f{i:03d}").write_bytes(text(size, i) if i % 2 else os.urandom(size))
        os.symlink("f001", d / "ln")
    images = []
    for workers in (1, 3):
        img = tmp_path / f"w{workers}.img"
        run_mkfs(img, src, "-z", "lz4hc", "-T", "0", "-U", "clear", "--workers", workers)
        images.append(img.read_bytes())
    assert images[0] == images[1]
    fsck(tmp_path / "w3.img")
