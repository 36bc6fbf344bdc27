"""-E 48bit and -E dot-omitted (mkfs.erofs 1.9, Linux 6.15+): the 48-bit layout (the
root nid in rootnid_8b, the le16 root nid field blocks_hi, the build time as epoch +
le32; compact inodes keep their own mtime seconds from the epoch, nsec the
superblock's 0) and directories without their "." entry (which implies 48bit). Each
image is compared with mkfs.erofs 1.9.4's of the same tree through the host kernel
(full metadata, content against the source), fsck.erofs 1.9.4 on ours, and its size
with mkfs.erofs's. Both options were refused before ("-E: unsupported extended
option"). Compressed images (extent records): tests/test_mkfs_48bit_z.py."""
import os
import struct
import subprocess

import pytest
from helpers import (
    anchor_mkfs,
    assert_same_image_for_any_workers,
    fsck,
    kernel_view,
    mounted,
    run_erofs_tools,
    run_mkfs,
    sha256s,
    write_48bit_tree,
    write_native_image,
)

pytestmark = pytest.mark.root

SB = 1024
INCOMPAT_48BIT = 0x80
I_DOT_OMITTED = 1 << 4


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """helpers.write_48bit_tree: mtimes before 1970 and after 2038, a uid over 65535,
    hardlinks, symlinks, a FIFO, a device, xattrs, dirents over several blocks, tails
    inline and not, empty directories."""
    return write_48bit_tree(tmp_path_factory.mktemp("b48") / "src")


def anchor(image, source, *args):
    anchor_mkfs(image, source, *args, epoch=None)


def superblock(image):
    """-> (feature_incompat, le16 at 0x0E, epoch, fixed nsec, le32 build_time,
    rootnid_8b)."""
    with open(image, "rb") as f:
        f.seek(SB)
        sb = f.read(128)
    return (struct.unpack_from("<I", sb, 0x50)[0], struct.unpack_from("<H", sb, 0x0E)[0],
            *struct.unpack_from("<QI", sb, 0x18), struct.unpack_from("<I", sb, 0x6C)[0],
            struct.unpack_from("<Q", sb, 0x70)[0])


COMBOS = {
    "48bit": ("-E", "48bit"),
    "48bit-T": ("-T", "1000000", "-E", "48bit"),
    "48bit-T-over-32bit": ("-T", "5000000000", "-E", "48bit"),
    "dot-omitted": ("-E", "dot-omitted"),
    "dot-omitted-b1024": ("-b", "1024", "-E", "dot-omitted"),
    "48bit-extended": ("-E", "48bit,force-inode-extended"),
    "48bit-mkfs-time": ("-T", "77", "--mkfs-time", "-E", "48bit"),
}


@pytest.mark.parametrize("combo", COMBOS)
def test_same_tree_and_size_as_mkfs_erofs(tree, tmp_path, combo):
    args = COMBOS[combo]
    ours, ref = tmp_path / "ours.img", tmp_path / "ref.img"
    run_mkfs(ours, tree, "-q", "-U", "clear", *args)
    anchor(ref, tree, *args)
    fsck(ours)
    size, rsize = ours.stat().st_size, ref.stat().st_size
    assert size <= rsize * 1.01 + 8192, (size, rsize)
    incompat, blocks_hi, epoch, nsec, bt, rootnid = superblock(ours)
    assert incompat & INCOMPAT_48BIT and blocks_hi == 0 and rootnid and nsec == 0
    if "-T" in args:
        t = int(args[args.index("-T") + 1])
        assert (epoch, bt) == superblock(ref)[2:3] + (t - epoch,)
        assert epoch == max(0, t - 0xFFFFFFFF)
    with mounted(ours) as m_ours, mounted(ref) as m_ref:
        got, theirs = kernel_view(m_ours), kernel_view(m_ref)
        own_mtimes = "-T" not in args or "--mkfs-time" in args
        if own_mtimes and "extended" not in combo:
            # mkfs.erofs 1.9.4 writes an mtime 2^32 s or more after the epoch into a
            # compact inode, wrapped (2140 reads back as 2003): ours is extended
            assert theirs[b"d/e/c"].pop("mtime_ns") != 5364662400_500000000
            assert got[b"d/e/c"].pop("mtime_ns") == 5364662400_500000000
        assert got == theirs
        assert sha256s(got) == sha256s(kernel_view(tree))
        if own_mtimes:
            # compact inodes keep their mtime seconds (nsec 0); the ones out of range
            # (1960, 2140) are extended and keep theirs whole
            keep = "extended" in combo
            assert got[b"a"]["mtime_ns"] == 981173106_000000000 + keep * 123456789
            assert got[b"d/b"]["mtime_ns"] == -315619200_000000000
        names = sorted(os.listdir(os.path.join(m_ours, "many")))
        assert len(names) == 300
        # "." still resolves (the kernel does not need the entry)
        assert os.stat(os.path.join(m_ours, "d", ".")).st_ino == os.stat(
            os.path.join(m_ours, "d")).st_ino
    data = ours.read_bytes()
    dots = data.count(b"..")
    if "dot-omitted" in combo:
        # no "." entries: each directory's dirents start with ".." (and the format bit)
        assert dots >= 5
        fmt = struct.unpack_from("<H", data, _root_off(data))[0]
        assert fmt & I_DOT_OMITTED
    else:
        assert not struct.unpack_from("<H", data, _root_off(data))[0] & I_DOT_OMITTED


def _root_off(data):
    """The root inode's byte offset (meta_blkaddr, rootnid_8b)."""
    blkszbits = data[SB + 0x0C]
    meta = struct.unpack_from("<I", data, SB + 0x28)[0]
    rootnid = struct.unpack_from("<Q", data, SB + 0x70)[0]
    return (meta << blkszbits) + rootnid * 32


def test_dot_omitted_saves_the_dot_entries(tree, tmp_path):
    """The directories without "." are smaller by one dirent (13 bytes) each."""
    sizes = {}
    for ext in ("48bit", "dot-omitted"):
        img = tmp_path / f"{ext}.img"
        run_mkfs(img, tree, "-q", "-T", "0", "-U", "clear", "-E", ext)
        with mounted(img) as m:
            sizes[ext] = {rel: os.stat(os.path.join(m, os.fsdecode(rel))).st_size
                          for rel, rec in kernel_view(m).items() if rec["type"] == 0o040000}
    assert sizes["48bit"].keys() == sizes["dot-omitted"].keys()
    for rel, n in sizes["48bit"].items():
        # (one in several blocks: its first block holds one dirent more)
        assert sizes["dot-omitted"][rel] == n - 13 if n < 4096 else \
            sizes["dot-omitted"][rel] <= n, rel


def test_same_image_for_any_workers(tree, tmp_path):
    assert_same_image_for_any_workers(tmp_path, tree, "-E", "dot-omitted", workers=(1, 3))


@pytest.mark.parametrize("args,msg", [
    (("-E", "48bit=1"), "-E 48bit takes no value"),
    (("-E", "^dot-omitted=1"), "-E ^dot-omitted takes no value"),
])
def test_errors(tmp_path, args, msg):
    src = tmp_path / "src"
    src.mkdir()
    p = run_mkfs(tmp_path / "x.img", src, *args, check=False)
    assert p.returncode == 1
    assert p.stderr.strip() == f"error: {msg}"
    assert not (tmp_path / "x.img").exists()


def test_turned_off(tree, tmp_path):
    """^48bit / ^dot-omitted after them: the usual layout (no 48BIT bit, "." entries)."""
    img = tmp_path / "x.img"
    run_mkfs(img, tree, "-q", "-T", "0", "-U", "clear", "-E", "dot-omitted,48bit",
             "-E", "^dot-omitted,^48bit")
    assert not superblock(img)[0] & INCOMPAT_48BIT


@pytest.fixture(scope="module")
def wide_root_tree(tmp_path_factory):
    """The smallest tree that had its root nid past 16 bits: a root whose dirents
    (~3 KiB: 90 long names) are too long for block 0's room after the superblock, and
    over 2 MiB of data before the inode area; a subdirectory too."""
    root = tmp_path_factory.mktemp("wide") / "src"
    (root / "d").mkdir(parents=True)
    (root / "big").write_bytes(os.urandom(2_200_000))
    for i in range(90):
        (root / f"file-with-long-name-{i:02}").write_text(f"{i}\n" * (i + 1))
    (root / "d" / "x").write_text("x")
    return root


WIDE = {
    "dot-omitted": ("-E", "dot-omitted"),
    "dot-omitted-lz4": ("-E", "dot-omitted", "-z", "lz4"),
    "48bit-lz4": ("-E", "48bit", "-z", "lz4"),
    "dot-omitted-tar": ("--tar=f", "-E", "dot-omitted"),
    "dot-omitted-m": ("-E", "dot-omitted", "-m4096"),
    "dot-omitted-lz4-m": ("-E", "dot-omitted", "-z", "lz4", "-m4096"),
}


@pytest.mark.parametrize("combo", WIDE)
def test_root_past_block0_room_over_2mib_of_data(wide_root_tree, tmp_path, combo):
    """-E dot-omitted (directory source) refused this tree ("root nid 69248 does not fit
    in 16 bits"): every directory's size under dot-omitted differed from the one its
    place among the data was taken for (the "." counted), so each went to the inode area
    after the data, the root too. The root's record now keeps its place first among the
    data (nid 128 here, as 1.9.4's; its nid in 16 bits); same tree as 1.9.4's image through
    the kernel, fsck.erofs 1.9.4 and our check pass, size against 1.9.4's."""
    args = WIDE[combo]
    src = wide_root_tree
    if "--tar=f" in args:
        src = tmp_path / "src.tar"
        subprocess.run(["tar", "-C", wide_root_tree, "-cf", src, "."], check=True)
    ours, ref = tmp_path / "ours.img", tmp_path / "ref.img"
    run_mkfs(ours, src, "-q", "-U", "clear", *args)
    anchor(ref, src, *args)
    fsck(ours)
    run_erofs_tools("check", ours)
    from erofs_tools.reader.image import open_image
    im = open_image(ours)
    assert im.root_nid == superblock(ours)[5] or im.root_nid & 1 << 63
    if "-m4096" not in args:
        assert 0 < im.root_nid <= 0xFFFF
    assert_as_anchor(ours, ref, combo, wide_root_tree)


def assert_as_anchor(ours, ref, combo, source):
    """At most 1 % (and two blocks) over mkfs.erofs 1.9.4's image; both mount to the same
    tree, whose files are the source's."""
    size, rsize = ours.stat().st_size, ref.stat().st_size
    print(f"{combo}: ours {size} bytes, mkfs.erofs 1.9.4 {rsize}: {size / rsize:.4f}")
    assert size <= rsize * 1.01 + 8192, (size, rsize)
    with mounted(ours) as m_ours, mounted(ref) as m_ref:
        got = kernel_view(m_ours)
        assert got == kernel_view(m_ref)
        assert sha256s(got) == sha256s(kernel_view(source))


@pytest.fixture(scope="module")
def big_root_tree(tmp_path_factory):
    """A root of 65,001 entries (past the 65,000 whose directory got its place among the
    data while walking: the link count may need the extended inode) whose last dirent
    block (3,434 bytes, inline) is too long for block 0's room after the superblock,
    after a 2.2 MB file."""
    root = tmp_path_factory.mktemp("bigroot") / "src"
    root.mkdir()
    (root / "big").write_bytes(os.urandom(2_200_000))
    for i in range(65000):
        f = root / f"{i:05}"
        f.touch()
        # one fixed past mtime: mkfs.erofs 1.9.4 (no -T) writes a compact inode for a
        # file whose mtime is its build time's second, so files touched in the second it
        # ran in made its image up to 3 % smaller, run by run (seen: 1.0311)
        os.utime(f, (1_000_000_000, 1_000_000_000))
    os.utime(root / "big", (1_000_000_000, 1_000_000_000))
    os.utime(root, (1_000_000_000, 1_000_000_000))  # (its mtime was the last touch's)
    return root


@pytest.mark.parametrize("combo", ["plain", "48bit", "dot-omitted-lz4"])
def test_root_of_65001_entries_keeps_a_16bit_nid(big_root_tree, tmp_path, combo):
    """Such a root's record went to the inode area after the data, nid 168,448: refused
    ("root nid 168448 does not fit in 16 bits"; the 48-bit layouts since eae866f wrote
    it in rootnid_8b). Its room is now taken among the data as an extended inode's, so
    its nid is 128, mkfs.erofs 1.9.4's. Same tree as 1.9.4's image through the kernel,
    fsck.erofs 1.9.4 and our check pass, size against 1.9.4's."""
    args = {"plain": (), "48bit": ("-E", "48bit"),
            "dot-omitted-lz4": ("-E", "dot-omitted", "-zlz4")}[combo]
    ours, ref = tmp_path / "ours.img", tmp_path / "ref.img"
    run_mkfs(ours, big_root_tree, "-q", "-U", "clear", *args)
    anchor(ref, big_root_tree, *args)
    fsck(ours)
    run_erofs_tools("check", ours)
    from erofs_tools.reader.image import open_image
    assert open_image(ours).root_nid == open_image(ref).root_nid == 128
    assert_as_anchor(ours, ref, combo, big_root_tree)


def test_root_nid_past_16_bits_in_rootnid_8b(tmp_path):
    """The 48-bit layout's root nid past 16 bits (the C core's first_nid here: mkfs
    keeps its root first) is written in rootnid_8b, the le16 blocks_hi 0, as the kernel
    and mkfs.erofs 1.9.4 read it; before eae866f refused: "root nid 70000 does not fit
    in 16 bits". Mounted, fsck.erofs 1.9.4, our check and reader."""
    from erofs_tools._native import BuildOptions, NativeBuilder
    from erofs_tools.reader.image import open_image
    b = NativeBuilder(BuildOptions(meta_blkaddr=1, first_nid=70000, build_time=0,
                                   sb_48bit=True, dot_omitted=True))
    root, sub, f = (b.add_node(0o040755), b.add_node(0o040755), b.add_node(0o100644, size=5))
    b.set_root(root)
    b.set_bytes(f, b"hello")
    b.add_child(root, b"d", sub)
    b.add_child(sub, b"f", f)
    img = tmp_path / "wide.img"
    write_native_image(b, img)
    incompat, blocks_hi, *_, rootnid = superblock(img)
    assert incompat & INCOMPAT_48BIT and (blocks_hi, rootnid) == (0, 70000)
    assert open_image(img).root_nid == 70000
    fsck(img)
    run_erofs_tools("check", img)
    with mounted(img) as m:
        assert os.listdir(m) == ["d"]
        with open(os.path.join(m, "d", "f"), "rb") as fp:
            assert fp.read() == b"hello"
