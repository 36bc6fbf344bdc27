"""erofs-tools mkfs -z: compressed images mounted with the host kernel and compared with
the source tree (full metadata), fsck.erofs --extract on every image, the layouts chosen
(compressed vs stored plain, seen with dump.erofs), thread-count reproducibility and
option errors."""
import base64
import os
import re
import struct
import subprocess

import pytest
from helpers import (
    assert_same_image_for_any_workers,
    fsck,
    mkfs_and_check,
    noise,
    require_tool,
    run_mkfs,
    text,
)

pytestmark = pytest.mark.root

ALGS = ["lz4", "lz4hc", "zstd", "lzma", "deflate"]
INCOMPAT_ZERO_PADDING = 0x1
INCOMPAT_COMPR_CFGS = 0x2
ALG_IDS = {"lz4": 0, "lz4hc": 0, "lzma": 1, "deflate": 2, "zstd": 3}



@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Text (compressible), random (incompressible), sizes around one block, a few MiB,
    a file that alternates the two, sparse-ish files, hard links, symlinks, xattrs."""
    root = tmp_path_factory.mktemp("ztree") / "src"
    root.mkdir()
    (root / "sub" / "deeper").mkdir(parents=True)
    files = {
        "empty": b"", "one": b"x", "t4095": text(4095), "t4096": text(4096),
        "t4097": text(4097), "t8193": text(8193), "r4097": noise(4097),
        "text3m": text(3 << 20, 2), "rand2m": noise(2 << 20, 3),
        "mixed": b"".join(text(20000, i) + noise(9000, i) for i in range(40)),
        "sub/deeper/zeros": bytes(1 << 20),
        "sub/small.txt": b"hello\n" * 100,
        "sub/b64": base64.b64encode(noise(300000, 7)),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    # sparse-ish: holes between data runs, and one ending in a hole
    with open(root / "sparse", "wb") as f:
        for i in range(6):
            f.seek(i * (700 << 10) + 123)
            f.write(text(5000, i))
    with open(root / "sparse-tail", "wb") as f:
        f.write(text(10000, 9))
        f.truncate(3 << 20)
    os.link(root / "text3m", root / "sub" / "hardlink")
    os.link(root / "mixed", root / "sub" / "deeper" / "hardlink2")
    os.symlink("text3m", root / "sym")
    os.symlink("/nonexistent/" + "n" * 200, root / "sub" / "longsym")
    os.setxattr(root / "t8193", "user.note", b"compressed with xattrs")
    for i in range(30):
        (root / "sub" / f"f{i:02d}").write_bytes(text(i * 700 + 1, i))
    return root


def sb(image):
    with open(image, "rb") as f:
        f.seek(1024)
        raw = f.read(128)
    incompat, u1 = struct.unpack_from("<IH", raw, 0x50)
    return incompat, u1


def layout_of(image, path):
    require_tool("dump.erofs")
    out = subprocess.run(["dump.erofs", f"--path={path}", os.fspath(image)],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"Layout: (\d+)", out)
    assert m, out
    return int(m.group(1))


@pytest.mark.parametrize("alg", ALGS)
def test_roundtrip(root_kernel, tree, tmp_path, alg):
    img = tmp_path / "z.img"
    mkfs_and_check(img, tree, "-z", alg, "-U", "clear", check_nlink=True)
    incompat, u1 = sb(img)
    assert incompat & INCOMPAT_ZERO_PADDING
    if alg.startswith("lz4"):
        assert not incompat & INCOMPAT_COMPR_CFGS and u1 == 65535
    else:
        assert incompat & INCOMPAT_COMPR_CFGS and u1 == 1 << ALG_IDS[alg]
    # compressible files compressed (compact indexes, layout 3); what cannot save a
    # block is stored plain (0) or inline (2)
    for path in ("/text3m", "/mixed", "/t8193", "/sparse", "/sub/deeper/zeros"):
        assert layout_of(img, path) == 3, path
    for path in ("/rand2m", "/r4097", "/t4096", "/t4095", "/one"):
        assert layout_of(img, path) in (0, 2), path
    assert img.stat().st_size < sum(f.stat().st_size for f in tree.rglob("*")
                                    if f.is_file() and not f.is_symlink()) // 2


@pytest.mark.parametrize("alg", ["lz4hc", "zstd", "lzma"])
def test_full_indexes(root_kernel, tree, tmp_path, alg):
    """-E legacy-compress: 8-byte lcluster indexes (layout 1), same data."""
    img = tmp_path / "f.img"
    mkfs_and_check(img, tree, "-z", alg, "-E", "legacy-compress", check_nlink=True)
    for path in ("/text3m", "/mixed", "/sparse"):
        assert layout_of(img, path) == 1, path
    big = tmp_path / "fc.img"
    mkfs_and_check(big, tree, "-z", alg, "-C", "32768", "-E", "legacy-compress")
    assert layout_of(big, "/text3m") == 1


@pytest.mark.parametrize("alg,size", [("lz4hc", 16384), ("zstd", 65536), ("lzma", 131072),
                                      ("lz4", 1 << 20), ("deflate", 32768)])
def test_big_pclusters(root_kernel, tree, tmp_path, alg, size):
    img = tmp_path / "c.img"
    mkfs_and_check(img, tree, "-z", alg, "-C", size, check_nlink=True)
    incompat, u1 = sb(img)
    assert incompat & INCOMPAT_COMPR_CFGS       # also BIG_PCLUSTER (same bit)
    assert u1 == 1 << ALG_IDS[alg]


def test_levels(root_kernel, tree, tmp_path):
    sizes = {}
    for z in ("lz4hc,level=1", "lz4hc,level=12", "zstd,level=1", "zstd,level=19",
              "lzma,level=109", "deflate,level=12"):
        img = tmp_path / f"{z}.img"
        mkfs_and_check(img, tree, "-z", z)
        sizes[z] = img.stat().st_size
    assert sizes["lz4hc,level=12"] <= sizes["lz4hc,level=1"]
    assert sizes["zstd,level=19"] <= sizes["zstd,level=1"]


def zstd_literal_types(image):
    """The literals-section type (0 raw, 1 RLE, 2 Huffman, 3 treeless) of every
    compressed block of every zstd pcluster of image -> {type: count}."""
    from erofs_tools.format import erofs as E
    from erofs_tools.reader import zmap
    from erofs_tools.reader.image import open_image

    types: dict[int, int] = {}
    data = image.read_bytes()
    with open_image(os.fspath(image)) as img:
        for _, _, ino in img.walk():
            if not ino.is_reg() or ino.layout not in (E.LAYOUT_COMPRESSED_FULL,
                                                       E.LAYOUT_COMPRESSED_COMPACT):
                continue
            for e in zmap.ZMap(img, ino).extents:
                if e.kind != zmap.PCLUSTER or e.alg != ALG_IDS["zstd"]:
                    continue
                b = data[e.pa:e.pa + e.plen]
                p = b.index(b"\x28\xb5\x2f\xfd") + 4        # 0padding: zeros first
                fhd = b[p]
                single, fcs_flag = (fhd >> 5) & 1, fhd >> 6
                p += 1 + (not single) + (0, 1, 2, 4)[fhd & 3] + \
                    ((1 if single else 0), 2, 4, 8)[fcs_flag]
                while True:
                    h = int.from_bytes(b[p:p + 3], "little")
                    p += 3
                    if (h >> 1) & 3 == 2:
                        types[b[p] & 3] = types.get(b[p] & 3, 0) + 1
                    p += 1 if (h >> 1) & 3 == 1 else h >> 3
                    if h & 1:
                        break
    return types


def test_zstd_default_stores_literals(root_kernel, tree, tmp_path):
    """-z zstd without a level: level 3's matches, literals stored raw (the kernel
    decodes a 4 KiB pcluster's frame faster without a Huffman table); an explicit level
    is plain libzstd, literals Huffman-coded where that pays."""
    dflt = mkfs_and_check(tmp_path / "d.img", tree, "-z", "zstd")
    lvl3 = mkfs_and_check(tmp_path / "l3.img", tree, "-z", "zstd,level=3")
    d, l3 = zstd_literal_types(dflt), zstd_literal_types(lvl3)
    assert d.get(0, 0) > 10, d
    assert not d.get(2) and not d.get(3), d
    assert l3.get(2, 0) > 0, l3
    assert dflt.stat().st_size >= lvl3.stat().st_size
    (tmp_path / "w").mkdir()
    assert_same_image_for_any_workers(tmp_path / "w", tree, "-z", "zstd")


def test_large_output_written_in_place(root_kernel, tmp_path):
    """A file whose compressed form is over the in-memory limit (8 MiB) is written at
    its final place while it is compressed; an incompressible one of that size is then
    stored plain over the same blocks."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a-before").write_bytes(text(50000))
    (src / "b64").write_bytes(base64.b64encode(noise(18 << 20, 5)))   # ~77% with zstd
    (src / "c-rand").write_bytes(noise(20 << 20, 6))
    (src / "d-after").write_bytes(text(70000, 3))
    img = tmp_path / "big.img"
    # an explicit level: base64 compresses only by its literals' Huffman coding, which
    # the default level leaves out
    mkfs_and_check(img, src, "-z", "zstd,level=3", "--workers", "2")
    assert layout_of(img, "/b64") == 3
    assert layout_of(img, "/c-rand") == 0


def test_same_image_whatever_the_threads(tree, tmp_path):
    images = []
    for workers in (1, 2, 3):
        img = tmp_path / f"w{workers}.img"
        run_mkfs(img, tree, "-z", "lz4hc", "-T", "0", "-U", "clear", "--workers", workers)
        images.append(img.read_bytes())
    assert images[0] == images[1] == images[2]
    img = tmp_path / "zstd.img"
    run_mkfs(img, tree, "-z", "zstd", "-C", "65536", "-T", "0", "-U", "clear",
             "--workers", 3)
    img1 = tmp_path / "zstd1.img"
    run_mkfs(img1, tree, "-z", "zstd", "-C", "65536", "-T", "0", "-U", "clear",
             "--workers", 1)
    assert img.read_bytes() == img1.read_bytes()
    fsck(img)


@pytest.mark.parametrize("args,msg", [
    (["-z", "nosuch"], "unknown compressor 'nosuch'"),
    (["-z", "lz4hc,level=99"], "level 99 is not in 0..12"),
    (["-z", "zstd,level=23"], "level 23 is not in 1..22"),
    (["-z", "lzma,level=10"], "level 10 is not in"),
    (["-z", "lz4,level=3"], "lz4 takes no compression level"),
    (["-z", "zstd,level=x"], "level is not an integer"),
    (["-z", "zstd,window=3"], "unknown option"),
    (["-z", "lz4:lzma:zstd:lz4hc:deflate"], "at most 4 algorithms"),
    (["-z", "lz4", "--compress-hints", "/nonexistent"], "--compress-hints /nonexistent"),
    (["-z", "lz4", "-C", "5000"], "-C 5000"),
    (["-z", "lz4", "-C", "2097152"], "-C 2097152"),
    (["-C", "65536"], "-C needs -z"),
    (["-z", "lz4", "-E", "nosuch"], "unsupported extended option 'nosuch'"),
    (["-z", "lz4", "-E", "ztailpacking=1"], "-E ztailpacking takes no value"),
])
def test_bad_options(tree, tmp_path, args, msg):
    img = tmp_path / "bad.img"
    p = run_mkfs(img, tree, *args, check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], p.stderr
    assert os.listdir(tmp_path) == []       # no image, no temporary file


def on_disk_sizes(image, paths):
    require_tool("dump.erofs")
    out = {}
    for p in paths:
        text_out = subprocess.run(["dump.erofs", f"--path={p}", os.fspath(image)],
                                  capture_output=True, text=True, check=True).stdout
        m = re.search(r"On-disk size: (\d+)\s.*\n.*Layout: (\d+)", text_out)
        assert m, text_out
        out[p] = (int(m.group(1)), int(m.group(2)))
    return out


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory):
    """Files over mkfs.erofs's 16 MiB segments and 8000 KiB window: text, zeros, noise."""
    root = tmp_path_factory.mktemp("zbig") / "src"
    root.mkdir()
    (root / "big").write_bytes(text(9 << 20, 4) + bytes(12 << 20) + noise(3 << 20, 8) +
                               text(17 << 20, 5))
    (root / "b64").write_bytes(base64.b64encode(noise(13 << 20, 9)))
    (root / "small").write_bytes(text(5000))
    return root


@pytest.mark.parametrize("args", [("-z", "lz4hc"), ("-z", "lz4"), ("-z", "lz4hc", "-C", "65536"),
                                  ("big", "-z", "lz4"), ("big", "-z", "lz4hc", "-C", "131072")])
def test_same_choices_as_mkfs_erofs(tree, big_tree, tmp_path, args):
    """With the same liblz4, every file takes as many bytes on disk, in the same layout
    (compressed or stored plain), as with mkfs.erofs 1.9 (the anchor)."""
    require_tool("mkfs.erofs")
    if args[0] == "big":
        tree, args = big_tree, args[1:]
    ours, ref = tmp_path / "ours.img", tmp_path / "ref.img"
    run_mkfs(ours, tree, *args, "-T", "0")
    subprocess.run(["mkfs.erofs", "-T", "0", *args, os.fspath(ref), os.fspath(tree)],
                   capture_output=True, check=True)
    paths = sorted("/" + os.path.relpath(os.path.join(d, f), tree)
                   for d, _, files in os.walk(tree) for f in files
                   if not os.path.islink(os.path.join(d, f)))
    assert len(paths) > 40 or tree == big_tree
    a, b = on_disk_sizes(ours, paths), on_disk_sizes(ref, paths)
    assert a == b, {p: (a[p], b[p]) for p in paths if a[p] != b[p]}


def test_large_files_in_segments(root_kernel, tmp_path):
    """Files over 16 MiB are compressed segment by segment by different workers: the
    image is the same whatever the threads, mounts and compares clean, and passes fsck
    (a last segment with an inline tail or a fragment, an incompressible file stored
    plain over its segments' blocks, a file of exactly two segments)."""
    src = tmp_path / "src"
    src.mkdir()
    chunks = [text(1 << 20, i) for i in range(4)]
    (src / "a-before").write_bytes(text(50000))
    (src / "big").write_bytes(b"".join(chunks[i % 4] + b"%d" % i for i in range(40)) +
                              text(3000, 9))
    (src / "c-rand").write_bytes(noise(33 << 20, 6))
    (src / "d-two").write_bytes(b"".join(chunks[i % 3][: 1 << 20] for i in range(32)))
    (src / "e-after").write_bytes(text(70000, 3))
    for extra in ((), ("-Eztailpacking",), ("-Efragments", "-C", "65536")):
        assert_same_image_for_any_workers(tmp_path, src, "-z", "lz4", *extra)
    img = tmp_path / "check.img"
    mkfs_and_check(img, src, "-z", "lz4", "-Eztailpacking", "--workers", "2")
    assert layout_of(img, "/big") == 3 and layout_of(img, "/c-rand") == 0
