"""The reader on compressed images: every algorithm and layout, written by our mkfs -z
and by mkfs.erofs 1.9 (ztailpacking, fragments, dedupe, big pclusters, full and compact
indexes): `unpack` equals the source tree (full metadata) and what the kernel shows,
`check` passes; corrupt compressed data or indexes fail `check`/`unpack` with one-line
errors and exit 1."""
import json
import os
import random
import struct
import subprocess
import sys

import pytest
from helpers import (
    compare_trees,
    is_root,
    mounted,
    noise,
    reader_unpack,
    require_root_kernel,
    require_tool,
    text,
)

from erofs_tools.errors import CorruptImageError
from erofs_tools.format import erofs as E
from erofs_tools.reader.fsck import check_image
from erofs_tools.reader.image import open_image
from erofs_tools.reader.unpack import unpack_to_dir
from erofs_tools.reader.zdata import is_compressed, state
from erofs_tools.reader.zmap import FRAGMENT, INLINE, PCLUSTER

ALGS = ["lz4", "lz4hc", "zstd", "lzma", "deflate"]
# mkfs.erofs 1.9 layouts: extended options and cluster sizes, alone and combined
REF_VARIANTS = {
    "default": [],
    "ztailpacking": ["-Eztailpacking"],
    "fragments": ["-Efragments"],
    "dedupe": ["-Ededupe"],
    "big": ["-C65536"],
    "tail+frag+dedupe+big": ["-Eztailpacking,fragments,dedupe", "-C65536"],
    "all-fragments": ["-Eall-fragments", "-C16384"],
    "legacy+big": ["-Elegacy-compress", "-C65536"],
    "dedupe+ztail": ["-Ededupe,ztailpacking"],
    "fragdedupe": ["-Efragments,fragdedupe"],
    "small-extents": ["--max-extent-bytes=16384"],
    "1k-blocks": ["-b", "1024", "-C", "4096"],
    "zdirs": ["--zD", "-Eztailpacking"],
}
OUR_VARIANTS = {"default": [], "big": ["-C", "65536"], "full-index": ["-E", "legacy-compress"]}



@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Compressible and incompressible files of many sizes (tails for ztailpacking and
    fragments), duplicates (dedupe), hardlinks, symlinks, xattrs, an empty file."""
    root = tmp_path_factory.mktemp("zr") / "src"
    (root / "d" / "e").mkdir(parents=True)
    (root / "p").mkdir()
    files = {
        "empty": b"", "one": b"x", "t4095": text(4095), "t4097": text(4097, 1),
        "t70000": text(70000, 2), "text1m": text(1 << 20, 3), "rand300k": noise(300000),
        "mixed": b"".join(text(9000, i) + noise(3000, i) for i in range(20)),
        "zeros": bytes(600000), "d/small.txt": b"hello\n" * 50,
        "d/dup1": text(50000, 4), "d/e/dup2": text(50000, 4),
        "d/e/dup-tail": text(50000, 4) + b"tail",
        # dedupe: a prefix and a shifted copy of a longer file share parts of its
        # pclusters (PARTIAL_REF: decoded partially)
        "p/a": text(200000, 5), "p/b-prefix": text(200000, 5)[:100000],
        "p/c-shift": b"123" + text(200000, 5)[:150000],
        "p/d-mid": noise(5000, 6) + text(200000, 5)[50000:120000],
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    for i in range(12):
        (root / "d" / f"f{i:02d}").write_bytes(text(i * 911 + 3, 10 + i))
    (root / "many").mkdir()          # a directory of several blocks
    for i in range(300):
        (root / "many" / f"entry-with-a-longer-name-{i:04d}").write_bytes(b"%d" % i)
    os.link(root / "text1m", root / "d" / "hard")
    os.symlink("text1m", root / "sym")
    os.setxattr(root / "t70000", "user.note", b"compressed with xattrs")
    for p in sorted(root.rglob("*"), reverse=True):
        os.utime(p, ns=(1_700_000_000_123_456_789,) * 2, follow_symlinks=False)
    os.utime(root, ns=(1_700_000_000_123_456_789,) * 2)
    return root


def _run(*cmd):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          errors="replace")


def _cli(*args):
    return _run(sys.executable, "-m", "erofs_tools", *args)


def build(tmp_path, tree, writer, alg, variant):
    img = tmp_path / "z.img"
    if writer == "ours":
        p = _cli("mkfs", "-z", alg, *OUR_VARIANTS[variant], img, tree)
    else:
        require_tool("mkfs.erofs")
        p = _run("mkfs.erofs", "--quiet", f"-z{alg}", *REF_VARIANTS[variant], img, tree)
    assert p.returncode == 0, p.stdout + p.stderr
    return img


def _round_trip(tmp_path, tree, img, ignore=()):
    """check, unpack: the source tree (but for `ignore`: fields the image does not
    keep) and, as root, the kernel's (full metadata)."""
    out = tmp_path / "out"
    im = reader_unpack(img, out)
    assert compare_trees(tree, out, check_nlink=True, ignore=ignore) == []
    p = _cli("check", img)
    assert p.returncode == 0 and p.stdout.strip().endswith("clean"), p.stdout + p.stderr
    if is_root():
        require_root_kernel()
        with mounted(img) as mnt:
            assert compare_trees(mnt, out, check_nlink=True) == []
    return im


def _kinds(im):
    kinds = set()
    for _p, _d, ino in im.walk():
        if is_compressed(ino):
            for x in state(im).zmap(ino).extents:
                kinds.add((x.kind, x.partial))
    return kinds


@pytest.mark.parametrize("variant", sorted(REF_VARIANTS))
@pytest.mark.parametrize("alg", ALGS)
def test_mkfs_erofs_images(tmp_path, tree, alg, variant):
    img = build(tmp_path, tree, "mkfs.erofs", alg, variant)
    im = _round_trip(tmp_path, tree, img)
    kinds = {k for k, _ in _kinds(im)}
    # all-fragments: every file is a fragment, the pclusters are the packed inode's
    assert kinds == {FRAGMENT} if variant == "all-fragments" else PCLUSTER in kinds
    if "fragments" in variant or "frag" in variant:
        assert FRAGMENT in kinds
    if variant == "ztailpacking":
        assert INLINE in kinds
    if variant == "zdirs":
        # directories compressed too (read through the same maps)
        assert any(ino.is_dir() and is_compressed(ino) for _p, _d, ino in im.walk())
    if variant == "dedupe":
        # the three copies share pclusters; the one with a longer tail uses part of one
        assert (PCLUSTER, True) in _kinds(im)


@pytest.mark.parametrize("variant", sorted(OUR_VARIANTS))
@pytest.mark.parametrize("alg", ALGS)
def test_our_mkfs_images(tmp_path, tree, alg, variant):
    img = build(tmp_path, tree, "ours", alg, variant)
    _round_trip(tmp_path, tree, img)


def _first_compressed(im, min_plen=1):
    """(path, extent) of the first compressed (not plain) pcluster extent."""
    for p, _d, ino in im.walk():
        if is_compressed(ino) and ino.is_reg():
            for x in state(im).zmap(ino).extents:
                if x.kind == PCLUSTER and x.alg >= 0 and x.plen >= min_plen:
                    return p, x
    raise AssertionError("no compressed extent")


@pytest.mark.parametrize("writer", ["ours", "mkfs.erofs"])
@pytest.mark.parametrize("alg", ALGS)
def test_corrupt_data_fails_check(tmp_path, tree, writer, alg):
    img = build(tmp_path, tree, writer, alg, "default")
    im = open_image(img)
    path, x = _first_compressed(im)
    im.close()
    orig = img.read_bytes()
    raw = bytearray(orig)
    raw[x.pa:x.pa + x.plen] = bytes(x.plen)            # the stream zeroed
    img.write_bytes(raw)
    p = _cli("check", img)
    assert p.returncode == 1
    lines = p.stdout.strip().splitlines()
    assert lines and all(line.startswith(f"{img}: ") for line in lines), p.stdout
    assert any(os.fsdecode(path) in line for line in lines), p.stdout
    p = _cli("unpack", "-o", tmp_path / "out", img)
    assert p.returncode == 1
    assert p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1, p.stderr
    # a stream cut short (its first half zeroed: the decoder starts mid-stream)
    raw = bytearray(orig)
    body = raw[x.pa:x.pa + x.plen]
    first = next(i for i, b in enumerate(body) if b)
    cut = first + (x.plen - first) // 2
    raw[x.pa + first:x.pa + cut] = bytes(cut - first)
    img.write_bytes(raw)
    p = _cli("check", img)
    assert p.returncode == 1, p.stdout


def test_corrupt_indexes_are_one_line_errors(tmp_path, tree):
    """Every byte of a compressed file's map header and indexes set to each of a few
    values: open/check/unpack never fail other than with a one-line CorruptImageError.
    (Our mkfs puts the inodes after the data, outside the superblock checksum.)"""
    img = build(tmp_path, tree, "ours", "lz4hc", "big")
    raw = img.read_bytes()
    im = open_image(img)
    ino = im.lookup("/mixed")
    m = state(im).zmap(ino)
    start = m.hpos
    im.close()
    rnd = random.Random(5)
    failures = reported = 0
    for off in range(start, start + 64):
        for k, val in enumerate((0, 0xFF, rnd.randrange(256))):
            b = bytearray(raw)
            b[off] = val
            problems = None
            try:
                bad = open_image(bytes(b))
                problems = check_image(bad)
                reported += bool(problems)
                unpack_to_dir(bad, tmp_path / f"o{off}-{k}", [])
            except CorruptImageError as e:
                assert "\n" not in str(e)
                # check and unpack agree: what unpack refuses, check reports
                assert problems is None or problems, (off, val, str(e))
                failures += 1
    assert failures > 0 and reported > 0


def test_stat_and_inspect(tmp_path, tree):
    require_tool("mkfs.erofs")
    img = build(tmp_path, tree, "mkfs.erofs", "zstd", "fragments")
    p = _cli("stat", "--json", img)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)["images"][0]
    comp = d["compression"]
    assert comp["zstd"]["ratio"] > 1.5
    assert comp["fragment"]["extents"] > 0
    assert d["compressed_files"] > 0 and d["bytes_flat"] < d["bytes_logical"]
    p = _cli("inspect", "--json", img, "/text1m")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert sum(x["length"] for x in info["extents"]) == 1 << 20
    assert {x["algorithm"] for x in info["extents"]} >= {"zstd"}
    p = _cli("inspect", img)
    assert p.returncode == 0 and "compression: algorithms=['zstd']" in p.stdout, p.stdout


def test_unsupported_layouts_refused_in_one_line(tmp_path, tree):
    """An algorithm the superblock does not declare."""
    img = build(tmp_path, tree, "ours", "lz4", "default")
    im = open_image(img)
    ino = im.lookup("/text1m")
    hpos = state(im).zmap(ino).hpos
    im.close()
    raw = bytearray(img.read_bytes())
    raw[hpos + 6] = 0x03          # HEAD1 = zstd in an lz4-only image
    if hpos < 4096:               # the inode sits in block 0, after the superblock
        struct.pack_into("<I", raw, 1028, E.superblock_checksum(bytes(raw[:4096])))
    p = _cli("unpack", "-o", tmp_path / "o", bytes_file(tmp_path, raw))
    assert p.returncode == 1 and "does not declare" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def bytes_file(tmp_path, data):
    p = tmp_path / f"img-{random.randrange(1 << 30)}"
    p.write_bytes(bytes(data))
    return p


def test_48bit_layout_read(tmp_path, tree):
    """mkfs.erofs -E48bit (extent records) is read: check, stat, unpack (the source's
    content); it was refused in one line before (tests/test_read_48bit.py covers the
    layouts and the kernel)."""
    require_tool("mkfs.erofs")
    img = tmp_path / "48.img"
    p = _run("mkfs.erofs", "--quiet", "-zlz4", "-E48bit", img, tree)
    assert p.returncode == 0, p.stderr
    for args in (["check", img], ["unpack", "-o", tmp_path / "o", img], ["stat", img]):
        p = _cli(*args)
        assert p.returncode == 0, p.stdout + p.stderr
    for name in os.listdir(tree):
        src = os.path.join(tree, name)
        if os.path.isfile(src) and not os.path.islink(src):
            with open(src, "rb") as a, open(tmp_path / "o" / name, "rb") as b:
                assert a.read() == b.read(), name


def test_inodes_sharing_index_bytes_are_refused(tmp_path, tree):
    """Many inodes whose maps read the same index bytes (a crafted image) cost at most
    one lcluster entry per image byte, then a one-line error."""
    from erofs_tools.reader import zdata
    img = build(tmp_path, tree, "ours", "lz4", "default")
    im = open_image(img)
    ino = im.lookup("/text1m")
    z = zdata.state(im)
    z.entries_left = 2 * z.zmap(ino).nlc      # as if the image were this small
    z.maps.clear()
    z.built.clear()
    z.zmap(ino)
    z.maps.clear()
    z.zmap(ino)                  # the same inode again: free (an evicted map)
    clone = im.inode(ino.nid)
    for nid in (10**6, 10**6 + 1):
        # another nid, same index bytes
        clone = type(clone)()
        for k in type(clone).__slots__:
            setattr(clone, k, getattr(ino, k))
        clone.nid = nid
        if nid == 10**6:
            z.zmap(clone)
        else:
            with pytest.raises(CorruptImageError, match="add up to more than the image"):
                z.zmap(clone)
