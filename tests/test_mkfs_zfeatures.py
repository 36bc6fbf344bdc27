"""erofs-tools mkfs -z with -E ztailpacking / fragments / dedupe and --compress-hints:
held-out-style trees mounted with the host kernel (every decompressor) and compared with
full metadata, fsck.erofs --extract, the on-disk markers (superblock feature bits, map
header advise bits seen with dump.erofs) and thread-count reproducibility."""
import base64
import os
import random
import re
import struct
import subprocess

import pytest
from helpers import (
    SHIFTED_COPIES,
    TAIL_WORDS,
    assert_same_image_for_any_workers,
    fsck,
    mkfs_and_check,
    noise,
    require_tool,
    run_mkfs,
    write_shifted_tree,
)
from helpers import (
    text as _text,
)

pytestmark = pytest.mark.root

ALGS = ["lz4", "lz4hc", "zstd", "lzma", "deflate"]
INCOMPAT_ZTAILPACKING = 0x10
INCOMPAT_FRAGMENTS = 0x20


def text(n, seed=0):
    return _text(n, seed, TAIL_WORDS)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Odd names, every inode type, hardlinks, xattrs, sparse files, sizes around the
    block size and a few MiB, incompressible tails, and repeated content (dedupe)."""
    root = tmp_path_factory.mktemp("zfeat") / "src"
    root.mkdir()
    (root / "d" / "e e").mkdir(parents=True)
    shared = text(300000, 42)
    files = {
        "empty": b"", "one": b"x", "t4095": text(4095), "t4096": text(4096),
        "t4097": text(4097), "t100": text(100, 3), "t3000": text(3000, 4),
        "r4097": noise(4097), "r100": noise(100, 2), "r8000": noise(8000, 3),
        "text5m": text(5 << 20, 2) + b"end",
        "text-tail-noise": text(50000, 5) + noise(3000, 5),
        "mixed": b"".join(text(20000, i) + noise(9000, i) for i in range(30)),
        "d/zeros": bytes(1 << 20),
        "d/e e/b64": base64.b64encode(noise(200000, 7)),
        "d/\u00e9t\u00e9 \\n\tname": text(10001, 8),
        "dup1": shared, "d/dup2": shared, "d/e e/dup3": shared + b"x",
        "dup-prefix": shared[:150000] + text(77777, 9),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    for i in range(40):
        (root / "d" / f"f{i:02d}").write_bytes(text(i * 431 + 1, i))
    with open(root / "sparse", "wb") as f:
        for i in range(5):
            f.seek(i * (600 << 10) + 77)
            f.write(text(7000, i))
    with open(root / "sparse-tail", "wb") as f:
        f.write(text(9000, 9))
        f.truncate(2 << 20)
    os.link(root / "text5m", root / "d" / "hardlink")
    os.link(root / "t3000", root / "d" / "e e" / "hardlink2")
    os.symlink("text5m", root / "sym")
    os.symlink("/x/" + "y" * 300, root / "d" / "longsym")
    os.mkfifo(root / "fifo")
    os.mknod(root / "d" / "chr", 0o20644, os.makedev(1, 7))
    os.mknod(root / "d" / "blk", 0o60600, os.makedev(8, 1))
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.bind(os.fspath(root / "d" / "sock"))
    s.close()
    os.setxattr(root / "t3000", "user.note", b"tail inline with xattrs")
    os.setxattr(root / "text-tail-noise", "user.big", b"v" * 900)
    os.setxattr(root / "d" / "f07", "trusted.x", b"1")
    os.chmod(root / "t100", 0o4755)
    os.chown(root / "t4097", 70000, 12)
    os.utime(root / "r100", ns=(1, 123456789))
    return root


def sb_incompat(image):
    with open(image, "rb") as f:
        f.seek(1024 + 0x50)
        return struct.unpack("<I", f.read(4))[0]


def dump(image, path):
    require_tool("dump.erofs")
    return subprocess.run(["dump.erofs", f"--path={path}", os.fspath(image)],
                          capture_output=True, text=True, check=True).stdout


def map_header(image, path):
    """(layout, map header bytes) of a compressed inode, read through dump.erofs's nid."""
    out = dump(image, path)
    nid = int(re.search(r"NID: (\d+)", out).group(1))
    with open(image, "rb") as f:
        f.seek(1024)
        sbraw = f.read(128)
        meta_blkaddr = struct.unpack_from("<I", sbraw, 0x28)[0]
        f.seek(meta_blkaddr * 4096 + nid * 32)
        ino = f.read(64)
        fmt, icount = struct.unpack_from("<HH", ino, 0)
        isize = 64 if fmt & 1 else 32
        xsize = 12 + (icount - 1) * 4 if icount else 0
        pos = meta_blkaddr * 4096 + nid * 32 + isize + xsize
        f.seek((pos + 7) // 8 * 8)
        return fmt >> 1 & 7, f.read(8)


@pytest.mark.parametrize("alg", ALGS)
def test_ztailpacking(root_kernel, tree, tmp_path, alg):
    img = tmp_path / "zt.img"
    mkfs_and_check(img, tree, "-z", alg, "-Eztailpacking", check_nlink=True)
    assert sb_incompat(img) & INCOMPAT_ZTAILPACKING
    inline = 0
    for p in ("/text5m", "/t3000", "/mixed", "/d/f20", "/text-tail-noise", "/t4097"):
        layout, h = map_header(img, p)
        assert layout in (1, 3), p
        idata, advise = struct.unpack_from("<HH", h, 2)
        if advise & 0x8:
            inline += 1
            assert 0 < idata < 4096, p
    assert inline >= 4
    plain = tmp_path / "plain.img"
    run_mkfs(plain, tree, "-z", alg)
    assert img.stat().st_size <= plain.stat().st_size


@pytest.mark.parametrize("args", [("-z", "lz4hc", "-C", "65536"), ("-z", "lzma", "-C", "131072"),
                                  ("-z", "zstd", "-E", "legacy-compress"),
                                  ("-z", "lz4", "-C", "16384", "-E", "legacy-compress")])
def test_ztailpacking_big_and_full(root_kernel, tree, tmp_path, args):
    img = tmp_path / "ztb.img"
    mkfs_and_check(img, tree, *args, "-E", "ztailpacking", check_nlink=True)
    assert sb_incompat(img) & INCOMPAT_ZTAILPACKING


def packed_nid(image):
    with open(image, "rb") as f:
        f.seek(1024 + 0x60)
        return struct.unpack("<Q", f.read(8))[0]


@pytest.mark.parametrize("alg", ALGS)
def test_fragments(root_kernel, tree, tmp_path, alg):
    """Last extents and small files in the packed inode (sb.packed_nid): whole-file
    fragments (bit 7 of h_clusterbits) and tails (FRAGMENT_PCLUSTER, h_fragmentoff)."""
    img = tmp_path / "fr.img"
    mkfs_and_check(img, tree, "-z", alg, "-Efragments", check_nlink=True)
    assert sb_incompat(img) & INCOMPAT_FRAGMENTS
    assert packed_nid(img) != 0
    _, h = map_header(img, "/t3000")
    assert h[7] & 0x80          # whole file in the packed inode
    layout, h = map_header(img, "/text5m")
    assert layout == 3 and struct.unpack_from("<H", h, 4)[0] & 0x20


@pytest.mark.parametrize("alg", ["lz4hc", "zstd"])
def test_fragment_suffix_shared(root_kernel, tmp_path, alg):
    """A fragment that ends an earlier one points into it (no bytes appended): small
    files that are tails of an earlier small file, and a big file's tail; one shorter
    than the 32-byte key is appended (only exact copies of it are shared)."""
    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(17)
    a = bytes(rnd.getrandbits(8) for _ in range(3000))
    (src / "a").write_bytes(a)                       # names in walk order: a first
    (src / "b").write_bytes(a[-1000:])
    (src / "c").write_bytes(a[-40:])
    (src / "d").write_bytes(a[-10:])
    (src / "e").write_bytes(a)                       # an exact copy still shared
    big = bytes(rnd.getrandbits(8) for _ in range(3 * 4096)) + a[-2500:]
    (src / "f").write_bytes(big)                     # tail (2500 B) shared too
    img = tmp_path / "sfx.img"
    mkfs_and_check(img, src, "-z", alg, "-Efragments")

    def fragoff(path):
        return struct.unpack_from("<I", map_header(img, path)[1], 0)[0]
    base = fragoff("/a")
    assert fragoff("/b") == base + 2000
    assert fragoff("/c") == base + 2960
    assert fragoff("/e") == base
    assert fragoff("/d") >= base + 3000               # appended after a
    layout, h = map_header(img, "/f")
    assert struct.unpack_from("<H", h, 4)[0] & 0x20     # its tail in the packed inode
    assert fragoff("/f") == base + 500


@pytest.mark.parametrize("args", [
    ("-z", "lz4hc", "-C", "65536", "-Efragments"),
    ("-z", "zstd", "-C", "131072", "-Efragments=16384"),
    ("-z", "lzma", "-C", "65536", "-Efragments,ztailpacking"),
    ("-z", "lz4", "-Efragments,ztailpacking,legacy-compress"),
    ("-z", "deflate", "-C", "32768", "-Efragments=32768", "-E", "legacy-compress"),
])
def test_fragments_combined(root_kernel, tree, tmp_path, args):
    img = tmp_path / "frc.img"
    mkfs_and_check(img, tree, *args, check_nlink=True)
    assert sb_incompat(img) & INCOMPAT_FRAGMENTS and packed_nid(img)


def on_disk(image, path):
    return int(re.search(r"On-disk size: (\d+)", dump(image, path)).group(1))


@pytest.mark.parametrize("alg", ALGS)
def test_dedupe(root_kernel, tree, tmp_path, alg):
    """Identical pclusters stored once: the copies of a file and the shared prefix of
    another take (almost) no blocks of their own; their indexes are full (layout 1)."""
    img = tmp_path / "dd.img"
    mkfs_and_check(img, tree, "-z", alg, "-Ededupe", check_nlink=True)
    assert sb_incompat(img) & INCOMPAT_FRAGMENTS      # the same bit: DEDUPE
    plain = tmp_path / "plain.img"
    run_mkfs(plain, tree, "-z", alg)
    one = on_disk(plain, "/dup1")                   # its blocks when nothing is shared
    assert one > 0
    assert on_disk(img, "/d/dup2") == 0
    assert on_disk(img, "/d/e e/dup3") <= 8192      # only the last extent differs
    # the walk goes in name order: /dup-prefix comes first, /dup1 then shares the
    # pclusters of their common prefix
    assert on_disk(img, "/dup1") < one
    assert on_disk(img, "/dup-prefix") <= on_disk(plain, "/dup-prefix")
    assert map_header(img, "/d/dup2")[0] == 1
    assert img.stat().st_size < plain.stat().st_size - 2 * one


@pytest.fixture(scope="module")
def shifted_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("shifted") / "src"
    root.mkdir()
    write_shifted_tree(root)
    return root


# zstd at its default level (raw literals, as mkfs.erofs's) packs this random-word text
# less than 2:1, one block of output per extent: copies shifted against each other's cuts
# sync only when a match may start less than a block after the extent before it begins
# (462,848 B against mkfs.erofs's 823,296 B; 1,142,784 B before); at level=3 364,544 B
# against 798,720 B
@pytest.mark.parametrize("args", [("-z", "lz4hc"), ("-z", "lz4"), ("-z", "zstd"),
                                  ("-z", "zstd", "-Eztailpacking"), ("-z", "zstd,level=3"),
                                  ("-z", "lzma"), ("-z", "deflate"),
                                  ("-z", "lz4hc", "-C", "65536"),
                                  ("-z", "zstd,level=3", "-Eztailpacking"),
                                  ("-z", "lz4hc", "-C", "65536", "-Eztailpacking"),
                                  ("-z", "lzma", "-Efragments")])
def test_dedupe_shifted(root_kernel, shifted_tree, tmp_path, args):
    """-Ededupe finds data repeated at any offset: the extent before a repeat is cut
    where it starts and extents reference (the start of) earlier pclusters' output,
    marked PARTIAL_REF when they use only a part of it. The image is smaller than
    without dedupe by about the repeated bytes' compressed size; the kernel, fsck.erofs
    and our reader read it back the same."""
    from erofs_tools.reader.image import open_image
    from erofs_tools.reader.zdata import is_compressed, state
    from erofs_tools.reader.zmap import PCLUSTER

    img = tmp_path / "sh.img"
    mkfs_and_check(img, shifted_tree, *args, "-Ededupe")
    plain = tmp_path / "plain.img"
    run_mkfs(plain, shifted_tree, *args)
    one = on_disk(plain, "/lang0.mo")             # about one copy of the text compressed
    saved = plain.stat().st_size - img.stat().st_size
    # what is not shared: each file's prefix and its first extent or two (a match starts
    # in the lcluster after the one of the extent it cuts, or a block after that)
    assert saved >= 0.5 * SHIFTED_COPIES * one, (saved, one)
    assert sb_incompat(img) & INCOMPAT_FRAGMENTS   # the same bit: DEDUPE
    assert map_header(img, "/lang3.mo")[0] == 1    # full index (partial references)
    # not larger than mkfs.erofs's rolling-hash dedupe of the same tree
    require_tool("mkfs.erofs")
    theirs = tmp_path / "theirs.img"
    subprocess.run(["mkfs.erofs", *args, "-Ededupe", os.fspath(theirs),
                    os.fspath(shifted_tree)], capture_output=True, check=True)
    assert img.stat().st_size <= theirs.stat().st_size
    with open_image(img) as im:
        partial = shared = 0
        seen = {}
        for _p, _d, ino in im.walk():
            if is_compressed(ino):
                for x in state(im).zmap(ino).extents:
                    if x.kind == PCLUSTER:
                        partial += x.partial
                        shared += x.pa in seen and seen[x.pa] != ino.nid
                        seen.setdefault(x.pa, ino.nid)
        assert partial > 0 and shared > 0


@pytest.mark.parametrize("args", [
    ("-z", "lz4hc", "-Ededupe,ztailpacking"),
    ("-z", "zstd", "-C", "65536", "-Ededupe,ztailpacking"),
    ("-z", "lzma", "-C", "131072", "-Ededupe", "-Efragments=65536"),
    ("-z", "deflate", "-Ededupe,ztailpacking,fragments,legacy-compress"),
])
def test_dedupe_combined(root_kernel, tree, tmp_path, args):
    img = tmp_path / "ddc.img"
    mkfs_and_check(img, tree, *args, check_nlink=True)
    assert on_disk(img, "/d/dup2") == 0


HINTS = """# pcluster size, algorithm index (in -z), regex on the path below SOURCE
0 ^r
65536 1 text5m$
16384 2 \\.txt$|^mixed
8192 3 ^d/f[0-3]
4096 0 ^d/
"""


def alg_of(image, path):
    layout, h = map_header(image, path)
    return layout, h[6] & 15


@pytest.mark.parametrize("extra", [(), ("-Eztailpacking",), ("-Efragments,dedupe",),
                                   ("-E", "legacy-compress")])
def test_compress_hints(root_kernel, tree, tmp_path, extra):
    """--compress-hints with -z lz4hc:lzma:zstd:deflate: per-file algorithm (the map
    header's h_algorithmtype) and pcluster size, 0 = stored plain; every algorithm's
    record in the superblock (u1 = their bit mask)."""
    hints = tmp_path / "hints"
    hints.write_text(HINTS)
    img = tmp_path / "h.img"
    mkfs_and_check(img, tree, "-z", "lz4hc,level=4:lzma:zstd,level=5:deflate",
                   "--compress-hints", hints, *extra, check_nlink=True)
    with open(img, "rb") as f:
        f.seek(1024 + 0x54)
        assert struct.unpack("<H", f.read(2))[0] == 0b1111
    for path in ("/r4097", "/r8000"):
        assert dump(img, path).count("Layout: 0") + dump(img, path).count("Layout: 2") == 1
    assert alg_of(img, "/text5m")[1] == 1              # lzma
    if "-Efragments,dedupe" not in extra:
        assert alg_of(img, "/mixed")[1] == 3           # zstd
        assert alg_of(img, "/d/f20")[1] == 2           # deflate (^d/f[0-3])
    assert alg_of(img, "/d/zeros")[1] == 0             # lz4hc (^d/)


def test_compress_hints_big_pcluster(tree, tmp_path):
    """A hint's pcluster over -C: big pclusters for that file (as with -C itself)."""
    hints = tmp_path / "hints"
    hints.write_text("65536 text5m\n")
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    run_mkfs(a, tree, "-z", "lz4hc", "--compress-hints", hints, "-T", "0", "-U", "clear")
    run_mkfs(b, tree, "-z", "lz4hc", "-C", "65536", "-T", "0", "-U", "clear")
    assert on_disk(a, "/text5m") == on_disk(b, "/text5m")
    assert on_disk(a, "/mixed") != on_disk(b, "/mixed")
    fsck(a)


@pytest.mark.parametrize("text,msg", [
    ("4096\n", ":1: no pattern"),
    ("abc foo\n", "not a pcluster size"),
    ("5000 foo\n", "pcluster size 5000"),
    ("4096 2 foo\n", "no algorithm #2"),
    ("4096 x foo\n", "not an algorithm index"),
    ("# c\n4096 (\n", ":2: invalid regular expression"),
])
def test_bad_hints(tree, tmp_path, text, msg):
    hints = tmp_path / "hints"
    hints.write_text(text)
    img = tmp_path / "out" / "bad.img"
    img.parent.mkdir()
    p = run_mkfs(img, tree, "-z", "lz4:zstd", "--compress-hints", hints, check=False)
    assert p.returncode == 1 and msg in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert os.listdir(img.parent) == []


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory):
    """Files over the 16 MiB segments and the 8 MiB in-memory limit (written in place
    while compressed), twice (dedupe), ending mid-block."""
    root = tmp_path_factory.mktemp("zfbig") / "src"
    root.mkdir()
    big = text(9 << 20, 4) + bytes(5 << 20) + noise(1 << 20, 8) + text(19 << 20, 5) + b"tail"
    (root / "big").write_bytes(big)
    (root / "big-copy").write_bytes(big)
    (root / "b64").write_bytes(base64.b64encode(noise(15 << 20, 9)) + b"!")
    (root / "small").write_bytes(text(5000))
    return root


@pytest.mark.parametrize("args", [
    ("-z", "lz4hc", "-Eztailpacking,dedupe"),
    ("-z", "zstd", "-C", "131072", "-Efragments"),
    ("-z", "lz4", "-Efragments=4096,ztailpacking,legacy-compress"),
])
def test_big_files(root_kernel, big_tree, tmp_path, args):
    img = tmp_path / "big.img"
    mkfs_and_check(img, big_tree, *args, "--workers", "2")
    # the second copy shares every pcluster (also those written while compressed)
    assert min(on_disk(img, "/big"), on_disk(img, "/big-copy")) == 0


@pytest.mark.parametrize("seed", [1, 2])
def test_inline_inodes_around_tails(root_kernel, tmp_path, seed):
    """Inodes moved on so their inline compressed tail stays in one block leave gaps;
    small files stored inline (FLAT_INLINE) placed in those gaps must not cross a block
    either (full indexes of a few KiB put the tails far from the inode)."""
    rnd = random.Random(seed)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(120):
        if i % 3 == 0:
            (src / f"{i:03d}t").write_bytes(text(rnd.randrange(600_000, 3_000_000), i))
        else:
            (src / f"{i:03d}r").write_bytes(noise(rnd.randrange(60, 3900), i))
    mkfs_and_check(tmp_path / "g.img", src, "-z", "lz4", "-E", "legacy-compress,ztailpacking")


@pytest.mark.parametrize("args,msg", [
    (["-z", "lz4", "-Efragments=5000"], "-E fragments=5000: must be a multiple of 4096"),
    (["-z", "lz4", "-C", "16384", "-Efragments=65536"], "larger than the pcluster size"),
    (["-z", "lz4", "-Ededupe=1"], "-E dedupe takes no value"),
    (["--compress-hints", "/nonexistent"], "--compress-hints needs -z"),
])
def test_bad_feature_options(tree, tmp_path, args, msg):
    img = tmp_path / "out" / "bad.img"
    img.parent.mkdir()
    p = run_mkfs(img, tree, *args, check=False)
    assert p.returncode == 1 and msg in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert os.listdir(img.parent) == []


def test_same_image_whatever_the_threads(tree, tmp_path):
    for extra in (("-Eztailpacking",), ("-Efragments", "-C", "65536"),
                  ("-Ededupe,ztailpacking",), ("-Ededupe", "-C", "65536"),
                  ("-z", "lzma:lz4", "--compress-hints", tmp_path / "h")):
        (tmp_path / "h").write_text(HINTS.replace(" 2 ", " 1 ").replace(" 3 ", " 0 "))
        assert_same_image_for_any_workers(tmp_path, tree, "-z", "lz4hc", *extra)
