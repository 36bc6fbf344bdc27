"""The C core through erofs_tools._native: crc32c, argument checks, layout rules, and a
RAFS-shaped image (reserved area, root nid 128, device table at slot 11, chunk-based
files on an extra device) mounted by the kernel."""
import array
import os
import stat
import struct
import subprocess

import pytest
from helpers import fsck, mounted, require_tool, write_native_image

from erofs_tools import _native, _native_sums
from erofs_tools._native import BuildOptions, NativeBuilder, NativeError
from erofs_tools.errors import FormatLimitError, InputError

DIR = stat.S_IFDIR | 0o755
REG = stat.S_IFREG | 0o644


def test_crc32c_vectors():
    assert _native_sums.crc32c(b"123456789") == 0xE3069283
    assert _native_sums.crc32c(b"") == 0
    assert _native_sums.crc32c(bytes(32)) == 0x8A9136AA
    data = os.urandom(100_001)
    # incremental == one shot, across the SSE4.2 / table paths and odd alignments
    assert _native_sums.crc32c(data[7:], _native_sums.crc32c(data[:7])) == _native_sums.crc32c(data)


def test_sb_checksum_matches_mkfs_erofs(tmp_path):
    require_tool("mkfs.erofs")
    src = tmp_path / "s"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    img = tmp_path / "ref.img"
    subprocess.run(["mkfs.erofs", str(img), str(src)], check=True, capture_output=True)
    blk = img.read_bytes()[:4096]
    assert struct.unpack_from("<I", blk, 1028)[0] == _native_sums.sb_checksum(blk)


def test_argument_checks():
    b = NativeBuilder()
    root = b.add_node(DIR)
    f = b.add_node(REG, size=3)
    for bad in (b"", b"a/b", b"a\0b", b"x" * 256, b".", b".."):
        with pytest.raises((FormatLimitError, NativeError)):
            b.add_child(root, bad, f)
    with pytest.raises(NativeError):
        b.add_child(f, b"x", root)                  # not a directory
    with pytest.raises(NativeError):
        b.add_node(0o644)                           # no file type
    with pytest.raises(FormatLimitError):
        b.add_node(REG, uid=1 << 32)
    with pytest.raises(FormatLimitError):
        b.add_xattr(f, b"os2.x", b"")
    with pytest.raises(FormatLimitError):
        b.add_xattr(f, b"user.x", bytes(70000))
    with pytest.raises(NativeError):
        b.set_bytes(f, b"toolong")
    with pytest.raises(NativeError):
        b.set_chunks(f, 0x20, [])                   # 1 chunk needed
    d = b.add_node(DIR)
    b.add_child(root, b"d", d)
    with pytest.raises(NativeError):
        b.add_child(root, b"d2", d)                 # directory hardlink
    b.set_root(root)
    with pytest.raises(NativeError):
        b.layout()                                  # f has size but no data, not linked


def test_duplicate_and_unreachable():
    b = NativeBuilder()
    root = b.add_node(DIR)
    b.set_root(root)
    f = b.add_node(REG)
    b.add_child(root, b"same", f)
    b.add_child(root, b"same", b.add_node(REG))
    with pytest.raises(NativeError, match="duplicate"):
        b.layout()
    b = NativeBuilder()
    root = b.add_node(DIR)
    b.set_root(root)
    b.add_node(REG)
    with pytest.raises(NativeError, match="reachable"):
        b.layout()


def test_layout_nids_and_nlink(tmp_path):
    b = NativeBuilder(BuildOptions(build_time=0))
    root = b.add_node(DIR)
    b.set_root(root)
    sub = b.add_node(DIR)
    f = b.add_node(REG, size=5)
    b.set_bytes(f, b"hello")
    b.add_child(root, b"sub", sub)
    b.add_child(root, b"f", f)
    b.add_child(sub, b"f-again", f)
    info = b.layout()
    assert info.root_nid == 36 == b.nid(root)
    nids = b.nids([root, sub, f])
    assert len(set(nids)) == 3 and 0 not in nids
    img = tmp_path / "n.img"
    fd = os.open(img, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    b.write(fd)
    os.close(fd)
    fsck(img)
    with mounted(img) as mnt:
        assert os.stat(os.path.join(mnt, "f")).st_nlink == 2
        assert os.stat(os.path.join(mnt, "f")).st_ino == os.stat(
            os.path.join(mnt, "sub", "f-again")).st_ino
        assert os.stat(mnt).st_nlink == 3
        assert open(os.path.join(mnt, "sub", "f-again"), "rb").read() == b"hello"


def test_dirent_order_matches_reference_example(tmp_path):
    """erofs-format.md 6.4: '!bang -dash Zed alpha' -> ! - . .. Z a, i_size 93."""
    b = NativeBuilder(BuildOptions(build_time=0))
    root = b.add_node(DIR)
    b.set_root(root)
    for n in (b"alpha", b"Zed", b"-dash", b"!bang"):
        b.add_child(root, n, b.add_node(REG))
    img = tmp_path / "o.img"
    write_native_image(b, img)
    data = img.read_bytes()
    off = 1152  # root inode at nid 36, compact
    assert struct.unpack_from("<H", data, off)[0] == 0x04       # compact FLAT_INLINE
    assert struct.unpack_from("<I", data, off + 8)[0] == 93
    names_at = off + 32
    nameoffs = [struct.unpack_from("<H", data, names_at + 12 * i + 8)[0] for i in range(6)]
    assert nameoffs == [72, 77, 82, 83, 85, 88]
    assert data[names_at + 72:names_at + 93] == b"!bang-dash...Zedalpha"
    fsck(img)


def test_rafs_shaped_image_with_extra_device(tmp_path):
    """What the RAFS packer needs: meta_blkaddr/root nid 128, no sb checksum, the RAFS
    compat bit, reserved bytes before the inodes, device slot at 11 (1408), chunk-based
    files whose indexes point into device 1 - mounted with device=BLOB."""
    blob = tmp_path / "blob"
    chunk = 64 * 1024
    payload_a = os.urandom(200_000)            # 4 chunks of 64 KiB
    payload_b = os.urandom(5000)
    blob_data = bytearray()

    def put(data):
        start = len(blob_data) // 4096
        blob_data.extend(data)
        blob_data.extend(bytes(-len(blob_data) % 4096))
        return start

    idx_a = []
    for i in range(0, len(payload_a), chunk):
        idx_a.append(put(payload_a[i:i + chunk]))
    idx_b = [put(payload_b)]
    blob.write_bytes(bytes(blob_data))
    blocks = len(blob_data) // 4096
    opts = BuildOptions(meta_blkaddr=2, first_nid=128, sb_checksum=False,
                        feature_compat=0x4000_0000, feature_incompat=0xC,
                        shared_xattrs=False, force_extended=True, devt_slotoff=11,
                        sb_blocks=blocks, build_time=0)
    b = NativeBuilder(opts)
    dev = b.add_device(b"a" * 64, blocks, 0)
    assert dev == 1
    b.put_bytes(1152, b"RAFSEXT!" + bytes(248))      # stand-in for the ext superblock
    b.put_bytes(4096, b"BLOBTABLE" * 10)
    root = b.add_node(DIR, mtime=5)
    b.set_root(root)
    fa = b.add_node(REG, mtime=5, size=len(payload_a))
    fb = b.add_node(REG, mtime=5, size=len(payload_b))
    b.add_xattr(fa, b"user.k", b"v")
    b.add_xattr(fb, b"user.k", b"v")             # would be shared in mkfs mode
    fmt = 0x20 | 4                                # INDEXES, 64 KiB chunks
    b.set_chunks(fa, fmt, [(1 << 16) | (blk << 32) for blk in idx_a])
    b.set_chunks(fb, fmt, [(1 << 16) | (blk << 32) for blk in idx_b])
    b.add_child(root, b"a", fa)
    b.add_child(root, b"b", fb)
    link = b.add_node(stat.S_IFLNK | 0o777, mtime=5, size=1)
    b.set_bytes(link, b"a")
    b.add_child(root, b"l", link)
    info = b.layout()
    assert info.root_nid == 128
    assert info.xattr_blkaddr == 0
    assert info.meta_start == 8192
    nid_a, nid_b = b.nids([fa, fb])
    img = tmp_path / "boot"
    fd = os.open(img, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    b.write(fd)
    os.close(fd)
    data = img.read_bytes()
    assert len(data) == info.image_size and len(data) % 4096 == 0
    sb = data[1024:1152]
    assert struct.unpack_from("<I", sb, 4)[0] == 0                     # no checksum
    assert struct.unpack_from("<I", sb, 8)[0] == 0x4000_0000
    assert struct.unpack_from("<H", sb, 0x0E)[0] == 128
    assert struct.unpack_from("<II", sb, 0x24) == (blocks, 2)
    assert struct.unpack_from("<IHH", sb, 0x50) == (0xC, 0, 1)
    assert struct.unpack_from("<H", sb, 0x58)[0] == 11
    assert data[1152:1160] == b"RAFSEXT!"
    assert data[4096:4105] == b"BLOBTABLE"
    assert data[1408:1472] == b"a" * 64
    assert struct.unpack_from("<II", data, 1408 + 64) == (blocks, 0)
    ino_a = 8192 + 32 * nid_a
    assert struct.unpack_from("<HH", data, ino_a) == (0x09, 3)  # ext chunk-based; 12 + 8 bytes of xattrs
    fsck(img, devices=[str(blob)])
    with mounted(img, f"device={blob}") as mnt:
        assert open(os.path.join(mnt, "a"), "rb").read() == payload_a
        assert open(os.path.join(mnt, "b"), "rb").read() == payload_b
        assert os.getxattr(os.path.join(mnt, "b"), "user.k") == b"v"
        assert os.readlink(os.path.join(mnt, "l")) == "a"
        assert os.stat(os.path.join(mnt, "a")).st_ino != os.stat(os.path.join(mnt, "b")).st_ino


def test_chunk_holes_read_as_zero(tmp_path):
    """Caller-supplied block-map chunks with NULL entries on the primary device."""
    b = NativeBuilder(BuildOptions(build_time=0))
    root = b.add_node(DIR)
    b.set_root(root)
    f = b.add_node(REG, size=3 * 4096)
    b.set_chunks(f, 0, [0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF])
    b.add_child(root, b"holes", f)
    img = tmp_path / "h.img"
    write_native_image(b, img)
    fsck(img)
    with mounted(img) as mnt:
        assert open(os.path.join(mnt, "holes"), "rb").read() == bytes(3 * 4096)


def test_set_chunks_many_same_image_as_one_by_one(tmp_path):
    """set_chunks_many (pack's one call for every file) writes the image set_chunks
    writes node by node, and refuses entries that do not add up."""
    sizes = [0, 3 * 4096, 4096, 1, 2 * 4096 + 5]
    per = [[0xFFFFFFFF] * -(-n // 4096) for n in sizes]     # block map, every chunk a hole

    def build(many):
        b = NativeBuilder(BuildOptions(build_time=0, uuid=bytes(16)))
        root = b.add_node(DIR)
        b.set_root(root)
        nodes = [b.add_node(REG, size=n) for n in sizes]
        for i, f in enumerate(nodes):
            b.add_child(root, b"f%d" % i, f)
        if many:
            b.set_chunks_many(0, array.array("I", nodes),
                              array.array("I", [len(e) for e in per]),
                              array.array("Q", [x for e in per for x in e]))
        else:
            for f, e in zip(nodes, per):
                b.set_chunks(f, 0, e)
        img = tmp_path / f"many{int(many)}.img"
        write_native_image(b, img)
        return b, nodes, img.read_bytes()

    _, _, one = build(False)
    b, nodes, many = build(True)
    assert many == one
    fsck(tmp_path / "many1.img")
    b = NativeBuilder(BuildOptions(build_time=0))
    f = b.add_node(REG, size=2 * 4096)
    with pytest.raises(NativeError, match="add up to 2"):
        b.set_chunks_many(0, array.array("I", [f]), array.array("I", [2]),
                          array.array("Q", [0xFFFFFFFF]))
    with pytest.raises(NativeError, match="add up to 2"):
        b.set_chunks_many(0, array.array("I", [f]), array.array("I", [2]),
                          array.array("Q", [0xFFFFFFFF] * 3))
    with pytest.raises(NativeError, match="needed"):
        b.set_chunks_many(0, array.array("I", [f]), array.array("I", [1]),
                          array.array("Q", [0xFFFFFFFF]))
    with pytest.raises(ValueError):
        b.set_chunks_many(0, array.array("I", [f]), array.array("I", [2]),
                          array.array("L", [0xFFFFFFFF] * 2))


def test_write_errors_name_the_path(tmp_path):
    b = NativeBuilder()
    root = b.add_node(DIR)
    b.set_root(root)
    f = b.add_node(REG, size=10)
    b.set_file(f, str(tmp_path / "vanished"))
    b.add_child(root, b"f", f)
    b.layout()
    fd = os.open(tmp_path / "x.img", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with pytest.raises(InputError, match="vanished"):
            b.write(fd)
    finally:
        os.close(fd)


def test_reserved_append_grows_the_image_and_keeps_no_bytes(tmp_path):
    """pack's chunk info table: room reserved after layout (zeros in the written image,
    the caller pwrites it afterwards); only after layout and at or after the end."""
    from erofs_tools._native_put import put_buffer, reserve_bytes
    b = NativeBuilder(BuildOptions(meta_blkaddr=1, first_nid=128, build_time=0))
    root = b.add_node(DIR)
    b.set_root(root)
    with pytest.raises(NativeError, match="reserved"):
        reserve_bytes(b, 1 << 20, 80)                # before layout
    end = b.layout().image_size
    with pytest.raises(NativeError, match="reserved"):
        reserve_bytes(b, end - 4096, 80)             # inside what the builder writes
    reserve_bytes(b, end, 3 * 4096 + 80)
    put_buffer(b, end + 4 * 4096, bytearray(b"AFTER"))
    assert b.refresh_info().image_size == end + 5 * 4096
    img = tmp_path / "r.img"
    fd = os.open(img, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, b"\xff" * 10, end)               # written before: zeroed by write
        b.write(fd)
    finally:
        os.close(fd)
    data = img.read_bytes()
    assert len(data) == end + 5 * 4096
    assert data[end:end + 4 * 4096] == bytes(4 * 4096)
    assert data[end + 4 * 4096:end + 4 * 4096 + 5] == b"AFTER"


def test_after_layout_appends_device_updates_and_sb_blocks(tmp_path):
    """RAFS pack needs: a table appended after the inodes, device slots and sb.blocks
    fixed up once the bootstrap size is known, devt_slotoff written without devices."""
    opts = BuildOptions(meta_blkaddr=1, first_nid=128, sb_checksum=False, devt_slotoff=11,
                        build_time=0)
    b = NativeBuilder(opts)
    dev = b.add_device(b"b" * 64, 1, 0)
    root = b.add_node(DIR)
    b.set_root(root)
    info = b.layout()
    end = info.image_size
    b.put_bytes(end + 100, b"CHUNKINFO")
    b.put_bytes(4096 - 8, b"PREFETCH")           # below the first inode (nid 128 of block 1)
    with pytest.raises(NativeError):
        b.put_bytes(info.meta_start + 128 * 32, b"x")   # the root inode
    b.set_device(dev, 7, (end + 8192) // 4096)
    b.set_sb_blocks(0)
    assert b.refresh_info().image_size == end + 4096
    img = tmp_path / "a.img"
    fd = os.open(img, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    b.write(fd)
    os.close(fd)
    data = img.read_bytes()
    assert len(data) == end + 4096
    assert data[end + 100:end + 109] == b"CHUNKINFO"
    assert data[4088:4096] == b"PREFETCH"
    assert struct.unpack_from("<II", data, 1408 + 64) == (7, (end + 8192) // 4096)
    assert struct.unpack_from("<I", data, 1024 + 0x24)[0] == 0
    assert struct.unpack_from("<H", data, 1024 + 0x58)[0] == 11
    with pytest.raises(NativeError):
        b.put_bytes(end, b"late")

    b2 = NativeBuilder(BuildOptions(meta_blkaddr=1, first_nid=128, devt_slotoff=11))
    b2.set_root(b2.add_node(DIR))
    b2.layout()
    img2 = tmp_path / "b.img"
    fd = os.open(img2, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    b2.write(fd)
    os.close(fd)
    d2 = img2.read_bytes()
    assert struct.unpack_from("<HH", d2, 1024 + 0x56) == (0, 11)
    fsck(img2)
    with mounted(img2) as mnt:
        assert os.listdir(mnt) == []


def test_stream_mode_tail_budget_and_worker_errors(tmp_path):
    """Stream mode: tails beyond the memory budget are re-read at write time; a file the
    copy thread cannot read fails the build with its path."""
    from erofs_tools.builder.options import MkfsOptions
    from erofs_tools.builder.tree import TreeWalker
    src = tmp_path / "src"
    src.mkdir()
    for i in range(400):                          # ~1.6 MB of inline tails
        (src / f"f{i:03d}").write_bytes(os.urandom(4000 + i % 50))
    img = tmp_path / "s.img"
    fd = os.open(img, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        b = NativeBuilder(BuildOptions(stream_data=True, tail_budget_mib=1))
        b.set_output(fd)
        TreeWalker(b, MkfsOptions()).walk(src)
        info = b.layout()
        # the data first, the inode area after it (the root may sit in block 0's room
        # after the superblock: meta_blkaddr 0 then)
        assert info.data_start == 4096 and info.meta_end > info.data_start
        b.write(fd)
        b.close()
    finally:
        os.close(fd)
    fsck(img)
    with mounted(img) as mnt:
        for i in (0, 250, 399):
            assert open(os.path.join(mnt, f"f{i:03d}"), "rb").read() == \
                (src / f"f{i:03d}").read_bytes()

    fd = os.open(tmp_path / "e.img", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        b = NativeBuilder(BuildOptions(stream_data=True))
        b.set_output(fd)
        root = b.add_node(DIR)
        b.set_root(root)
        f = b.add_node(REG, size=10000)
        b.set_file(f, str(tmp_path / "gone"))
        b.add_child(root, b"f", f)
        with pytest.raises(InputError, match="gone"):
            b.layout()
        b.close()
    finally:
        os.close(fd)


def test_nlink_above_65535_uses_extended_inodes(tmp_path):
    """One file under 70,000 names and a directory with 66,000 subdirectories: both
    nlinks exceed the compact 16-bit field and must read back exactly."""
    b = NativeBuilder(BuildOptions(build_time=0, uuid=bytes(16)))
    root = b.add_node(DIR)
    b.set_root(root)
    f = b.add_node(REG, size=2)
    b.set_bytes(f, b"hi")
    links = b.add_node(DIR)
    b.add_child(root, b"links", links)
    for i in range(70000):
        b.add_child(links, b"l%d" % i, f)
    many = b.add_node(DIR)
    b.add_child(root, b"many", many)
    for i in range(66000):
        b.add_child(many, b"d%d" % i, b.add_node(DIR))
    img = tmp_path / "n.img"
    write_native_image(b, img)
    fsck(img, extract=False)
    with mounted(img) as mnt:
        assert os.stat(os.path.join(mnt, "links", "l69999")).st_nlink == 70000
        assert os.stat(os.path.join(mnt, "many")).st_nlink == 66002
        assert open(os.path.join(mnt, "links", "l12345"), "rb").read() == b"hi"


def test_start_writeback(tmp_path):
    """The C core's writeback start (pack's bootstrap, before its fsync): a regular
    file's dirty pages are written back and stay as they were; a bad fd is refused
    with -EBADF (the Python wrapper ignores it: advice only)."""
    import errno

    from erofs_tools._native_put import start_writeback
    p = tmp_path / "f"
    data = os.urandom(1 << 20)
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        assert _native.lib.ern_start_writeback(fd) == 0
        start_writeback(fd)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert p.read_bytes() == data
    assert _native.lib.ern_start_writeback(-1) == -errno.EBADF
    start_writeback(-1)
