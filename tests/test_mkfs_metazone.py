"""mkfs --MZ[=0|i|id] (mkfs.erofs 1.9's metadata zone): 'i' puts the inode records
(xattrs, inline tails, indexes) in a zone after all the data, nids counted from the
block before it (the superblock's meta_blkaddr; the root's record first there, nid
blksz / 32), 'd' also the directories' blocks (here: after the records); a bare --MZ is
both, 0 neither (the very image of no --MZ). No on-disk
flag: the kernel reads it as any image. With -m the records are in the metabox already
('d': the directories' blocks right before its data; mkfs.erofs 1.9.4's own -m --MZ
images with 'd' fail its fsck and the kernel). Each image (alone, -zlz4hc, -m4096,
--tar=f, --tar=i, with 1 KiB blocks, --zD, -E48bit, --chunksize, fragments) is mounted
by the host kernel and compared with the source with full metadata, fsck.erofs 1.9.4
passes, our reader (inspect, check, unpack) reads it back identical; the image is the
same for any thread count; its size against mkfs.erofs 1.9.4's with the same options on
/usr/lib/python3.11 is at most 1.0. `--MZ` was refused before ("No such option"), so
each of these failed on the code before it. What mkfs.erofs 1.9.4 refuses ('d' without
'i', another letter) is refused in one line, nothing written."""
import json
import os
import subprocess
import sys

import pytest
from helpers import (
    anchor_mkfs,
    assert_mkfs_refused,
    assert_same_image_for_any_workers,
    assert_size_vs_anchor,
    compare_trees,
    fsck,
    metadata_tree,
    mkfs_and_check,
    mounted,
    reader_unpack,
    require,
    require_tool,
    run_erofs_tools,
    run_mkfs,
    text,
)
from test_mkfs_tar import _tar as make_tar

from erofs_tools.format import erofs as E
from erofs_tools.reader.image import open_image
from erofs_tools.reader.zdata import is_compressed, state
from erofs_tools.reader.zmap import PCLUSTER

PYLIB = "/usr/lib/python3.11"
FLAGS = {"MZ": ["--MZ"], "MZ=i": ["--MZ=i"], "MZ=id": ["--MZ=id"], "MZ=0": ["--MZ=0"]}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Files of many sizes (inline tails), empty ones, directories of 600 and 150
    entries (their blocks in the image) before long symlinks in nid order (blocks of
    their own: 'd' moves the directories' after them), xattrs inline and shared,
    hardlinks, a fast symlink, devices, a fifo, mixed owners and mtimes."""
    return metadata_tree(tmp_path_factory.mktemp("mzone") / "src",
                         more_files={"a/b/c/t9000": text(9000, 6)},
                         dirs=(("many", 600), ("a/more", 150)),
                         # (not inline: a block between /many's and /a/more's in nid order)
                         links=(("zz-link", "y" * 4090),))


def data_ranges(im, ino):
    """-> the [start, end) byte ranges of `ino`'s blocks in the image (not its inline
    tail nor fragments)"""
    bs = im.blksz
    if is_compressed(ino):
        return [(e.pa, e.pa + e.plen) for e in state(im).zmap(ino).extents
                if e.kind == PCLUSTER]
    out = []
    for _lo, n, dev, phys in im.map_data(ino):
        if dev == 0 and phys % bs == 0 and (ino.layout != E.LAYOUT_FLAT_INLINE or
                                            n % bs == 0 and n >= bs):
            out.append((phys, phys + -(-n // bs) * bs))
    return out


def zone_layout(img, flags, devices=()):
    """Where --MZ put things: without -m every record after the data, in the zone that
    starts a block after meta_blkaddr, the root's first, 'd': the directories' blocks
    after the records (with -m: the last data, before the metabox's); 0: no zone (a
    record before some data, as smeta.c places them, or the root in block 0).
    -> the image's meta_blkaddr."""
    with open_image(img, devices=list(devices)) as im:
        bs, mbox = im.blksz, im.metabox is not None
        zone = (im.sb.meta_blkaddr + 1) * bs
        records, dirs, other = [], [], []
        for _p, _d, ino in im.walk():
            if not ino.nid >> E.NID_METABOX_BIT:
                records.append(ino.offset)
            (dirs if ino.is_dir() else other).extend(data_ranges(im, ino))
        assert dirs and other
        if "--MZ=0" in flags:
            assert mbox or min(records) < max(e for _s, e in other) or im.root_nid < bs // 32
            return im.sb.meta_blkaddr
        d = flags != ["--MZ=i"]
        if mbox:
            assert not records and im.root_nid >> E.NID_METABOX_BIT
            if d:       # (the directories' blocks after every other's)
                assert min(s for s, _e in dirs) >= max(e for _s, e in other)
            return im.sb.meta_blkaddr
        assert im.root_nid == bs // E.SLOT_SIZE and min(records) == zone
        assert max(e for _s, e in other) <= zone
        if d:
            assert min(s for s, _e in dirs) > max(records)
        else:
            assert max(e for _s, e in dirs) <= zone
        if im.sb.xattr_blkaddr:
            assert im.sb.xattr_blkaddr * bs >= max(e for _s, e in dirs + other)
            assert im.sb.xattr_blkaddr * bs > max(records)
        return im.sb.meta_blkaddr


def reader_round_trip(tmp_path, tree, img, devices=()):
    """inspect shows the zone's meta_blkaddr; check and unpack read the tree back"""
    more = [a for d in devices for a in ("--device", os.fspath(d))]
    info = json.loads(run_erofs_tools("inspect", "--json", *more, img).stdout)
    with open_image(img, devices=list(devices)) as im:
        assert info["meta_blkaddr"] == im.sb.meta_blkaddr
        assert info["root_nid"] == im.root_nid
    run_erofs_tools("check", *more, img)
    out = tmp_path / "out"
    reader_unpack(img, out, devices=list(devices))
    assert compare_trees(tree, out, check_nlink=True) == []


MODES = {"plain": [], "lz4hc": ["-zlz4hc"], "metabox": ["-m4096"],
         "lz4hc-metabox": ["-zlz4hc", "-m4096"]}


@pytest.mark.root
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("flag", sorted(FLAGS))
def test_metazone_mounts_and_reads(root_kernel, tree, tmp_path, flag, mode):
    """--MZ, --MZ=i, --MZ=id, --MZ=0 alone, with -zlz4hc, -m4096 and both"""
    img = tmp_path / "z.img"
    args = [*MODES[mode], *FLAGS[flag]]
    mkfs_and_check(img, tree, "-U", "clear", *args, check_nlink=True)
    zone_layout(img, FLAGS[flag])
    reader_round_trip(tmp_path, tree, img)
    if flag == "MZ=0":          # the very image of no --MZ
        plain = tmp_path / "p.img"
        run_mkfs(plain, tree, "-U", "clear", *MODES[mode])
        assert plain.read_bytes() == img.read_bytes()


def test_dirs_last_only_with_d(tree, tmp_path):
    """'i' alone leaves the directories' blocks among the other data (nid order: a long
    symlink's between /many's and /a/more's); 'd' moves them into the zone, after the
    records, which start as many blocks earlier"""
    a, b = tmp_path / "i.img", tmp_path / "id.img"
    run_mkfs(a, tree, "-T", "0", "-U", "clear", "--MZ=i")
    run_mkfs(b, tree, "-T", "0", "-U", "clear", "--MZ")
    with open_image(a) as im:
        dirs = [r for _p, _d, ino in im.walk() if ino.is_dir() for r in data_ranges(im, ino)]
        links = [r for _p, _d, ino in im.walk() if ino.is_lnk() for r in data_ranges(im, ino)]
    assert links and min(s for s, _e in dirs) < min(s for s, _e in links) < max(
        e for _s, e in dirs)
    moved = sum(e - s for s, e in dirs) // 4096
    assert zone_layout(b, ["--MZ"]) == zone_layout(a, ["--MZ=i"]) - moved
    assert os.path.getsize(a) == os.path.getsize(b)


VARIANTS = {
    "1k-blocks": ["-b", "1024", "--MZ"],
    "512-blocks-i": ["-b", "512", "--MZ=i"],
    "zD": ["--zD", "--MZ"],
    "lz4hc-zD": ["-zlz4hc", "--zD", "--MZ=i"],
    "48bit": ["-E48bit", "--MZ"],
    "chunks": ["--chunksize", "8192", "--MZ"],
    "lzma-fragments-dedupe": ["-zlzma", "-C65536", "-Efragments,dedupe", "--MZ"],
    "lz4hc-ztailpacking": ["-zlz4hc", "-Eztailpacking", "--MZ=id"],
    "noinline-extended": ["-E", "noinline_data,force-inode-extended", "--MZ"],
    "xattr-prefix": ["--xattr-prefix", "user.sh", "--MZ"],
}


@pytest.mark.root
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_metazone_variants(root_kernel, tree, tmp_path, variant):
    img = tmp_path / "v.img"
    args = VARIANTS[variant]
    mkfs_and_check(img, tree, "-U", "clear", *args, check_nlink=True)
    flags = [a for a in args if a.startswith("--MZ")]
    if "--zD" not in args:      # (--zD: the directories in the packed inode)
        zone_layout(img, flags)
    reader_round_trip(tmp_path, tree, img)


@pytest.mark.root
@pytest.mark.parametrize("mbox", [[], ["-m4096"]], ids=["plain", "metabox"])
def test_metazone_blobdev(root_kernel, tree, tmp_path, mbox):
    """--chunksize --blobdev: the chunks in the blob (device 1), the device table after
    the superblock, the zone after the directories' blocks"""
    img, dev = tmp_path / "c.img", tmp_path / "blob.img"
    run_mkfs(img, tree, "-U", "clear", "--chunksize", "8192", f"--blobdev={dev}", *mbox, "--MZ")
    fsck(img, devices=[dev])
    with open_image(img, devices=[dev]) as im:
        assert im.sb.extra_devices == 1
        if not mbox:
            assert im.root_nid == im.blksz // E.SLOT_SIZE
            zone = (im.sb.meta_blkaddr + 1) * im.blksz
            assert all(ino.offset >= zone for _p, _d, ino in im.walk())
    with mounted(img, f"device={dev}") as mnt:
        assert compare_trees(tree, mnt, check_nlink=True) == []
    reader_round_trip(tmp_path, tree, img, devices=[dev])


@pytest.mark.root
@pytest.mark.parametrize("args", [["--MZ"], ["--MZ=i"], ["--MZ=0"], ["-zlz4hc", "--MZ"],
                                  ["-m4096", "--MZ"], ["--zD", "--MZ"]])
def test_metazone_tar(root_kernel, tree, tmp_path, args):
    """--tar=f: the records after the data as from a directory"""
    tar_path = make_tar(tree, tmp_path / "t.tar")
    img = tmp_path / "t.img"
    p = subprocess.run([sys.executable, "-m", "erofs_tools", "mkfs", "--tar=f", "-U", "clear",
                        *args, os.fspath(img), tar_path], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    fsck(img)
    if "--zD" not in args:
        zone_layout(img, [a for a in args if a.startswith("--MZ")])
    with mounted(img) as mnt:
        assert compare_trees(tree, mnt, check_nlink=True) == []
    reader_round_trip(tmp_path, tree, img)


@pytest.mark.root
@pytest.mark.parametrize("args", [["--MZ"], ["--MZ=i"], ["-m4096", "--MZ"],
                                  ["-zlz4hc", "--MZ"], ["-zlzma", "--MZ=i"]])
def test_metazone_tar_index(root_kernel, tree, tmp_path, args):
    """--tar=i: the index's symlinks' blocks (and directories' without 'd') first, then
    the zone; mounted with the tar as its device, it is the tar's tree"""
    tar_path = make_tar(tree, tmp_path / "t.tar")
    img = tmp_path / "t.idx"
    p = subprocess.run([sys.executable, "-m", "erofs_tools", "mkfs", "--tar=i", "-U", "clear",
                        *args, os.fspath(img), tar_path], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    fsck(img, devices=[tar_path])
    with open_image(img, devices=[tar_path]) as im:
        bs, zone = im.blksz, (im.sb.meta_blkaddr + 1) * im.blksz
        if im.metabox is None:
            assert im.root_nid == bs // E.SLOT_SIZE
            records = [ino.offset for _p, _d, ino in im.walk()]
            assert min(records) == zone
            ranges = {kind: [r for _p, _d, ino in im.walk() if getattr(ino, kind)()
                             for r in data_ranges(im, ino)] for kind in ("is_dir", "is_lnk")}
            assert max(e for _s, e in ranges["is_lnk"]) <= zone
            if "--MZ" in args:
                assert min(s for s, _e in ranges["is_dir"]) > max(records)
            else:
                assert max(e for _s, e in ranges["is_dir"]) <= zone
    with mounted(img, f"device={tar_path}") as mnt:
        assert compare_trees(tree, mnt, check_nlink=True) == []
    reader_round_trip(tmp_path, tree, img, devices=[tar_path])


@pytest.mark.parametrize("args", [["-zlz4hc", "--MZ"], ["-zlzma", "-C65536", "-Ededupe",
                                                        "--MZ=i"]])
def test_same_image_for_any_workers(tree, tmp_path, args):
    assert_same_image_for_any_workers(tmp_path, tree, *args)


PYLIB_ARGS = {
    "MZ": ["--MZ"],
    "MZ=i": ["--MZ=i"],
    "lz4hc-MZ": ["-zlz4hc", "--MZ"],
    "lz4hc-MZ=i": ["-zlz4hc", "--MZ=i"],
    "metabox-MZ=i": ["-m4096", "--MZ=i"],
    "lz4hc-metabox-MZ=i": ["-zlz4hc", "-m4096", "--MZ=i"],
    "metabox-MZ": ["-m4096", "--MZ"],
}


@pytest.mark.root
@pytest.mark.parametrize("variant", sorted(PYLIB_ARGS))
def test_pylib_size_as_mkfs_erofs(root_kernel, tmp_path, variant):
    """/usr/lib/python3.11: mounted and compared; at most mkfs.erofs 1.9.4's image size
    with the same options (0.9982 to 0.9985 when measured)"""
    require(os.path.isdir(PYLIB), f"{PYLIB} missing")
    args = PYLIB_ARGS[variant]
    ours, theirs = tmp_path / "o.img", tmp_path / "a.img"
    mkfs_and_check(ours, PYLIB, "-T", "0", "-U", "clear", *args, ignore=("mtime_ns",))
    anchor_mkfs(theirs, PYLIB, *args, need="MZ")
    if args != ["-m4096", "--MZ"]:  # (mkfs.erofs 1.9.4's -m with 'd' fails its fsck)
        fsck(theirs, extract=False)
    assert_size_vs_anchor(ours, theirs, f"{' '.join(args)} {PYLIB}")


@pytest.mark.parametrize("mode", ["f", "i"])
def test_pylib_tar_size(tmp_path, mode):
    """--tar=f / --tar=i --MZ of a tar of /usr/lib/python3.11: fsck.erofs 1.9.4 passes;
    at most mkfs.erofs 1.9.4's size (0.9983, 0.9930 when measured)"""
    require(os.path.isdir(PYLIB), f"{PYLIB} missing")
    require_tool("mkfs.erofs")
    tar_path = os.fspath(tmp_path / "py.tar")
    subprocess.run(["tar", "-C", PYLIB, "-cf", tar_path, "."], check=True)
    ours, theirs = tmp_path / "o.img", tmp_path / "a.img"
    p = subprocess.run([sys.executable, "-m", "erofs_tools", "mkfs", f"--tar={mode}", "-T",
                        "0", "-U", "clear", "--MZ", os.fspath(ours), tar_path],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    subprocess.run(["mkfs.erofs", "--quiet", "-T", "0", "-U", "clear", f"--tar={mode}",
                    "--MZ", os.fspath(theirs), tar_path], check=True, capture_output=True)
    fsck(ours, extract=mode == "f", devices=[tar_path] if mode == "i" else ())
    assert_size_vs_anchor(ours, theirs, f"--tar={mode} --MZ {PYLIB}")


DIRS_ALONE = "inode metadata must be in the metadata zone if directory data is stored there"


@pytest.mark.parametrize("flags, msg", [
    (["--MZ=d"], f"--MZ=d: {DIRS_ALONE}"),
    (["--MZ=dd"], f"--MZ=dd: {DIRS_ALONE}"),
    (["--MZ=d", "--MZ=i"], f"--MZ=d: {DIRS_ALONE}"),
    (["--MZ", "--MZ=0", "--MZ=d"], f"--MZ=d: {DIRS_ALONE}"),
    (["--MZ=x"], "--MZ=x: invalid metazone flags"),
    (["--MZ=i0"], "--MZ=i0: invalid metazone flags"),
    (["--MZ=1"], "--MZ=1: invalid metazone flags"),
])
def test_refused(tree, tmp_path, flags, msg):
    """as mkfs.erofs 1.9.4 refuses them (it too writes nothing)"""
    img = tmp_path / "x.img"
    assert_mkfs_refused(img, tree, flags, msg)
    require_tool("mkfs.erofs")
    p = subprocess.run(["mkfs.erofs", *flags, os.fspath(img), os.fspath(tree)],
                       capture_output=True, text=True)
    assert p.returncode != 0 and not img.exists()


@pytest.mark.parametrize("flags, want", [
    (["--MZ=di"], "--MZ=id"), (["--MZ=ii"], "--MZ=i"), (["--MZ="], "--MZ=0"),
    (["--MZ=i", "--MZ=d"], "--MZ=id"), (["--MZ", "--MZ=0"], "--MZ=0"),
    (["--MZ=0", "--MZ=i"], "--MZ=i"), (["--MZ", "--MZ=i"], "--MZ=id")])
def test_accepted_as_mkfs_erofs(tree, tmp_path, flags, want):
    """letters in any order, repeated, an empty value none; several --MZ add their
    letters up, 0 clears them (as there); the same meta_blkaddr as mkfs.erofs 1.9.4"""
    img, ref, theirs = tmp_path / "x.img", tmp_path / "r.img", tmp_path / "a.img"
    run_mkfs(img, tree, "-T", "0", "-U", "clear", *flags)
    run_mkfs(ref, tree, "-T", "0", "-U", "clear", want)
    assert img.read_bytes() == ref.read_bytes()
    anchor_mkfs(theirs, tree, *flags, need="MZ")
    with open_image(img) as ours, open_image(theirs) as im:
        assert (ours.sb.meta_blkaddr == 0) == (im.sb.meta_blkaddr == 0)
