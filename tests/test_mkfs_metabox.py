"""mkfs -m (mkfs.erofs 1.9's metadata compression, Linux 6.17+: INCOMPAT_METABOX): every
inode record (xattrs, inline tails, indexes, inline pclusters) in the metabox inode's
data, nids with bit 63 set, the 48-bit superblock with one extension slot naming the
metabox. Without -z the metabox is stored plain; with -z compressed with the first -z
algorithm (lz4, lz4hc, lzma, zstd, deflate; -m65536:lz4hc with -C65536) or with -m#:X's
X (added to the -z list when not in it), as mkfs.erofs 1.9.4 writes them. Each image
(4 KiB and 1 KiB blocks, noinline_data, extended inodes, dedupe, ztailpacking,
fragments and all-fragments (the packed inode kept in the image), --xattr-prefix,
--compress-hints, --chunksize with and without --blobdev, --xattr-inode-digest, --tar=f,
--tar=i with the tar as its device, --zD plain, with lz4hc and with lzma and fragments:
the packed inode kept in the image) is mounted by the
host kernel and compared with the source with full metadata; fsck.erofs 1.9.4 passes
(with --extract but on ztailpacking, which it reads wrongly from its own images too)
and our reader (check, unpack) reads it back identical; the image is the same for any
thread count; its size against mkfs.erofs 1.9.4's with the same options on
/usr/lib/python3.11 is at most 1.001. `-m` was refused before ("no such option"), so
each of these failed on the code before it. What is not written (X without -z, # over
-C, a fifth algorithm) is refused in one line, nothing written."""
import os
import subprocess
import sys

import pytest
from helpers import (
    assert_mkfs_refused,
    assert_same_image_for_any_workers,
    assert_size_vs_anchor,
    compare_trees,
    file_digests,
    fsck,
    metadata_tree,
    mkfs_and_check,
    mounted,
    reader_unpack,
    require,
    require_tool,
    run_mkfs,
    scan_tree,
)
from test_mkfs_tar import _tar as make_tar

from erofs_tools.format import erofs as E
from erofs_tools.reader.fsck import check_image
from erofs_tools.reader.image import open_image
from erofs_tools.reader.unpack import unpack_to_dir
from erofs_tools.reader.zdata import is_compressed, state
from erofs_tools.reader.zmap import INLINE

PYLIB = "/usr/lib/python3.11"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Files of many sizes (inline tails of up to a block), empty ones, a directory of
    600 entries (its blocks in the image), xattrs inline and shared, hardlinks,
    symlinks (fast and long), devices, fifos, mixed owners and mtimes (whole seconds: the
    48-bit layout's compact inodes keep an mtime's seconds, their nsec the superblock's,
    as mkfs.erofs 1.9.4 writes them; test_mkfs_48bit.py has the rest)."""
    return metadata_tree(tmp_path_factory.mktemp("mbox") / "src")


def assert_metabox(img):
    """the image has the metabox; every inode of the tree is in it (nid bit 63)"""
    im = open_image(img)
    assert im.sb.feature_incompat & E.FEATURE_INCOMPAT_METABOX
    assert im.metabox is not None and im.root_nid >> E.NID_METABOX_BIT
    n = 0
    for _path, _d, ino in im.walk():
        assert ino.nid >> E.NID_METABOX_BIT, ino.nid
        n += 1
    assert n > 1


def inline_extents(img):
    """-> the extents of the image's compressed files that are inline pclusters"""
    im = open_image(img)
    out = []
    for _p, _d, ino in im.walk():
        if ino.is_reg() and is_compressed(ino):
            out += [e for e in state(im).zmap(ino).extents if e.kind == INLINE]
    return out


def reader_round_trip(tmp_path, tree, img):
    im = open_image(img)
    assert check_image(im) == []
    p = subprocess.run([sys.executable, "-m", "erofs_tools", "check", os.fspath(img)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "out"
    warnings = []
    unpack_to_dir(im, out, warnings)
    assert warnings == []
    assert compare_trees(tree, out, check_nlink=True) == []


VARIANTS = {
    "4k": ["-m4096"],
    "pcluster-64k": ["-m65536"],
    "hex": ["-m", "0x4000"],
    "1k-blocks": ["-b", "1024", "-m1024"],
    "noinline": ["-m4096", "-E", "noinline_data"],
    "extended": ["-m4096", "-E", "force-inode-extended"],
    "no-shared": ["-m4096", "--no-shared-xattrs", "-E", "^xattr-name-filter"],
    "lz4hc": ["-zlz4hc", "-m4096"],
    "lz4": ["-zlz4", "-m4096"],
    "lzma": ["-zlzma", "-m4096"],
    "zstd": ["-zzstd", "-m4096"],
    "deflate": ["-zdeflate", "-m4096"],
    "lz4hc-64k": ["-zlz4hc", "-C65536", "-m65536:lz4hc"],
    "lzma-1k-blocks": ["-zlzma", "-b", "1024", "-C16384", "-m", "8192"],
    "zstd-dedupe-legacy": ["-zzstd", "-C65536", "-E", "dedupe,legacy-compress", "-m16384"],
    "lz4hc-extended": ["-zlz4hc", "-m4096", "-E", "force-inode-extended"],
    "lz4hc-ztailpacking": ["-zlz4hc", "-Eztailpacking", "-m4096"],
    "lzma-ztailpacking-dedupe": ["-zlzma", "-C65536", "-Eztailpacking,dedupe", "-m16384"],
    "xattr-prefix": ["-m4096", "--xattr-prefix", "user.sh", "--xattr-prefix", "trusted."],
    "zstd-xattr-prefix": ["-zzstd", "-m4096", "--xattr-prefix", "user.sh"],
    "lz4hc-fragments": ["-zlz4hc", "-Efragments", "-m4096"],
    "lzma-all-fragments": ["-zlzma", "-C65536", "-Eall-fragments", "-m16384"],
    "zstd-frag-tail-dedupe-prefix": ["-zzstd", "-Efragments,ztailpacking,dedupe",
                                     "--xattr-prefix", "user.sh", "-m4096"],
    "zD": ["--zD", "-m4096"],
    "lz4hc-zD": ["-zlz4hc", "--zD", "-m4096"],
    "lzma-zD-fragments": ["-zlzma", "--zD", "-Efragments", "-m4096"],
}


@pytest.mark.root
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_metabox_mounts_and_reads(root_kernel, tree, tmp_path, variant):
    img = tmp_path / "m.img"
    args = VARIANTS[variant]
    tail = any("ztailpacking" in a for a in args)
    mkfs_and_check(img, tree, *args, check_nlink=True, do_fsck=not tail)
    if tail:
        # fsck.erofs 1.9.4 --extract reads an in-metabox inode's inline pcluster from
        # the image, not the metabox (its own images fail it too): without --extract
        fsck(img, extract=False)
        if not any("fragments" in a for a in args):     # (else the tails are fragments)
            assert inline_extents(img), "no inline pcluster"
    assert_metabox(img)
    if any("fragments" in a or a == "--zD" for a in args):
        # the packed inode stays in the image (no bit 63), as mkfs.erofs 1.9.4 keeps it
        im = open_image(img)
        assert im.sb.packed_nid and not im.sb.packed_nid >> E.NID_METABOX_BIT
    reader_round_trip(tmp_path, tree, img)


@pytest.mark.root
@pytest.mark.parametrize("args", [["-m4096"], ["-zlzma", "-m4096"], ["--zD", "-m4096"],
                                  ["-zlz4hc", "--zD", "-m4096"]])
def test_metabox_tar(root_kernel, tree, tmp_path, args):
    tar_path = make_tar(tree, tmp_path / "t.tar")
    img = tmp_path / "t.img"
    p = subprocess.run([sys.executable, "-m", "erofs_tools", "mkfs", "--tar=f", *args,
                        os.fspath(img), os.fspath(tar_path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    fsck(img)
    assert_metabox(img)
    with mounted(img) as mnt:
        assert compare_trees(tree, mnt, check_nlink=True) == []


@pytest.mark.root
@pytest.mark.parametrize("extra", [[], ["--xattr-inode-digest"], ["--zD"]],
                         ids=["plain", "digest", "zD"])
def test_metabox_tar_index(root_kernel, tree, tmp_path, extra):
    """--tar=i -m4096: the index (512-byte blocks) with its records in the plain metabox,
    the device table after the superblock's extension slot; mounted with the tar as its
    device, it is the tar's tree; fsck.erofs 1.9.4 and our check/unpack with the tar
    pass (the size: test_pylib_tar_index_size)"""
    tar_path = make_tar(tree, tmp_path / "t.tar")
    img = tmp_path / "t.idx"
    p = subprocess.run([sys.executable, "-m", "erofs_tools", "mkfs", "--tar=i", "-U", "clear",
                        *extra, "-m4096", os.fspath(img), tar_path],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    fsck(img, devices=[tar_path])
    im = open_image(img, devices=[tar_path])
    assert im.sb.feature_incompat & E.FEATURE_INCOMPAT_METABOX
    assert im.sb.blkszbits == 9 and im.root_nid >> E.NID_METABOX_BIT
    assert all(ino.nid >> E.NID_METABOX_BIT for _p, _d, ino in im.walk())
    with mounted(img, f"device={tar_path}") as mnt:
        assert compare_trees(tree, mnt, check_nlink=True) == []
    out = tmp_path / "out"
    for cmd in (["check", "--device", tar_path, os.fspath(img)],
                ["unpack", "--device", tar_path, "-o", os.fspath(out), os.fspath(img)]):
        p = subprocess.run([sys.executable, "-m", "erofs_tools", *cmd], capture_output=True,
                           text=True)
        assert p.returncode == 0, p.stderr
    assert compare_trees(tree, out, check_nlink=True) == []


@pytest.mark.parametrize("extra", [[], ["--xattr-inode-digest"], ["--zD"]],
                         ids=["plain", "digest", "zD"])
def test_pylib_tar_index_size(tmp_path, extra):
    """--tar=i -m4096 of a tar of /usr/lib/python3.11: fsck.erofs 1.9.4 passes; about
    mkfs.erofs 1.9.4's index size with the same options (at most 0.1 % over; on the
    small test tree --zD is one 512-byte block of 139 over)"""
    require(os.path.isdir(PYLIB), f"{PYLIB} missing")
    require_tool("mkfs.erofs")
    tar_path = os.fspath(tmp_path / "py.tar")
    subprocess.run(["tar", "-C", PYLIB, "-cf", tar_path, "."], check=True)
    ours, theirs = tmp_path / "o.idx", tmp_path / "a.idx"
    p = subprocess.run([sys.executable, "-m", "erofs_tools", "mkfs", "--tar=i", "-U", "clear",
                        *extra, "-m4096", os.fspath(ours), tar_path],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    subprocess.run(["mkfs.erofs", "--quiet", "-U", "clear", "--tar=i", *extra, "-m4096",
                    os.fspath(theirs), tar_path], check=True, capture_output=True)
    fsck(ours, extract=False, devices=[tar_path])
    assert_size_vs_anchor(ours, theirs, f"--tar=i {' '.join(extra)} -m4096 {PYLIB}", 1.001)


@pytest.mark.parametrize("args", [["-zlz4hc", "-m4096"], ["-zlz4hc", "--zD", "-m4096"],
                                  ["-zlzma", "-C65536", "-Ededupe", "-m65536"]])
def test_same_image_for_any_workers(tree, tmp_path, args):
    """the compressed metabox is the same whatever the compression thread count"""
    assert_same_image_for_any_workers(tmp_path, tree, *args)


@pytest.mark.root
@pytest.mark.parametrize("args, alg", [
    (["-zlz4hc", "-m4096:lzma"], 1), (["-zlzma", "-m4096:lz4hc"], 0),
    (["-zlz4hc:zstd", "-m4096:zstd"], 3), (["-zlz4hc", "-C65536", "-m65536:zstd,level=9"], 3),
    (["-zlzma", "-m4096:lzma"], 1)])
def test_metabox_algorithm(root_kernel, tree, tmp_path, args, alg):
    """-m#:X: the metabox compressed with X, added to the -z list when not in it (as
    mkfs.erofs 1.9.4 adds it); the files with the first -z algorithm"""
    img = tmp_path / "x.img"
    mkfs_and_check(img, tree, *args, check_nlink=True)
    assert_metabox(img)
    im = open_image(img)
    mext = state(im).zmap(im.inode(im.metabox.nid)).extents
    assert mext and {e.alg for e in mext if e.alg >= 0} == {alg}
    first = {"lz4hc": 0, "lzma": 1}[args[0][2:].split(":")[0]]
    fext = state(im).zmap(im.lookup(b"/t100k")).extents
    assert {e.alg for e in fext} == {first}
    reader_round_trip(tmp_path, tree, img)


@pytest.mark.root
def test_metabox_compress_hints(root_kernel, tree, tmp_path):
    """--compress-hints with two algorithms: the metabox with the first, a file with the
    second in 64 KiB pclusters, some files stored plain"""
    hints = tmp_path / "hints"
    hints.write_text("65536 1 t100k\n0 many/00[0-4]\n16384 0 rnd\n")
    img = tmp_path / "h.img"
    mkfs_and_check(img, tree, "-zlz4hc:lzma", "-C65536", "--compress-hints", hints,
                   "-m4096", check_nlink=True)
    assert_metabox(img)
    im = open_image(img)
    ext = state(im).zmap(im.lookup(b"/t100k")).extents
    assert ext and all(e.alg == 1 for e in ext)             # lzma
    mino = im.inode(im.metabox.nid)
    assert [e.alg for e in state(im).zmap(mino).extents][:1] == [0]     # lz4(hc)
    reader_round_trip(tmp_path, tree, img)


@pytest.mark.root
@pytest.mark.parametrize("blob", [False, True])
def test_metabox_chunks(root_kernel, tree, tmp_path, blob):
    """--chunksize (the chunk indexes in the metabox), with --blobdev too (the device
    table after the superblock's extension slot)"""
    img, dev = tmp_path / "c.img", tmp_path / "blob.img"
    extra = [f"--blobdev={dev}"] if blob else []
    run_mkfs(img, tree, "--chunksize", "8192", *extra, "-m4096")
    fsck(img, devices=[dev] if blob else ())
    assert_metabox(img)
    with mounted(img, f"device={dev}" if blob else None) as mnt:
        assert compare_trees(tree, mnt, check_nlink=True) == []
    more = ["--device", os.fspath(dev)] if blob else []
    out = tmp_path / "out"
    for cmd in (["check", os.fspath(img), *more], ["unpack", os.fspath(img), *more, "-o",
                                                   os.fspath(out)]):
        p = subprocess.run([sys.executable, "-m", "erofs_tools", *cmd], capture_output=True,
                           text=True)
        assert p.returncode == 0, p.stderr
    assert compare_trees(tree, out, check_nlink=True) == []


@pytest.mark.root
def test_metabox_z_blobdev_joined(root_kernel, tree, tmp_path):
    """-zlz4hc --chunksize --blobdev -m4096: the blob's slot maps it right after the image
    the compressed metabox leaves, so the image with the blob appended mounts alone
    (was: after the layout's larger image; the kernel read the blob's chunks at the wrong
    blocks, as test_mkfs_tar_index_z's index+tar did with -m: failed before)"""
    img, dev = tmp_path / "c.img", tmp_path / "blob.img"
    run_mkfs(img, tree, "-zlz4hc", "--chunksize", "4096", f"--blobdev={dev}", "-m4096")
    im = open_image(img, devices=[dev])
    assert im.devices[0].mapped_blkaddr == os.path.getsize(img) // 4096
    assert os.path.getsize(dev) > 0
    joined = tmp_path / "joined.img"
    joined.write_bytes(img.read_bytes() + dev.read_bytes())
    with mounted(joined) as mnt:
        assert compare_trees(tree, mnt, check_nlink=True) == []


def digest_diffs(tree, actual, name):
    """the differences of `actual` from `tree` plus xattr NAME (sha256:<digest> of the
    content) on every non-empty regular file, with full metadata"""
    want, got = scan_tree(tree), scan_tree(actual)
    for rel, value in file_digests(tree).items():
        want[rel]["xattr"][name] = value
    diffs = []
    for rel in sorted(set(want) | set(got)):
        a, b = want.get(rel, {}), got.get(rel, {})
        diffs += [f"{rel!r}: {k}: {a.get(k)!r} != {b.get(k)!r}"
                  for k in sorted(set(a) | set(b)) if k != "_ino" and a.get(k) != b.get(k)]
    return diffs


@pytest.mark.root
@pytest.mark.parametrize("extra", [[], ["-zlz4hc"]], ids=["plain", "lz4hc"])
def test_metabox_inode_digest(root_kernel, tree, tmp_path, extra):
    """--xattr-inode-digest=user.fp -m4096: the fingerprints in the metabox's records
    (the long prefix table plain); the kernel lists them, the rest as the source"""
    img = tmp_path / "d.img"
    run_mkfs(img, tree, *extra, "--xattr-inode-digest=user.fp", "-m4096")
    fsck(img)
    assert_metabox(img)
    with mounted(img) as mnt:
        assert digest_diffs(tree, mnt, "user.fp") == []
    out = tmp_path / "out"
    reader_unpack(img, out)
    assert digest_diffs(tree, out, "user.fp") == []


def anchor(img, src, *args):
    require_tool("mkfs.erofs")
    subprocess.run(["mkfs.erofs", "--quiet", "-T", "0", "-U", "clear", *args,
                    os.fspath(img), os.fspath(src)], check=True, capture_output=True)


PYLIB_ARGS = {
    "plain": ["-m4096"],
    "lz4hc": ["-zlz4hc", "-m4096"],
    "lzma": ["-zlzma", "-m4096"],
    "zstd": ["-zzstd", "-m4096"],
    "lz4hc-64k": ["-zlz4hc", "-C65536", "-m65536"],
    "lz4hc-fragments": ["-zlz4hc", "-Efragments", "-m4096"],
    "lz4hc-lzma-metabox": ["-zlz4hc", "-m4096:lzma"],
    "digest": ["--xattr-inode-digest", "-m4096"],
    "lz4hc-digest": ["-zlz4hc", "--xattr-inode-digest", "-m4096"],
    "zD": ["--zD", "-m4096"],
    "lz4hc-zD": ["-zlz4hc", "--zD", "-m4096"],
}


@pytest.mark.root
@pytest.mark.parametrize("variant", sorted(PYLIB_ARGS))
def test_pylib_size_as_mkfs_erofs(root_kernel, tmp_path, variant):
    """/usr/lib/python3.11: mounted and compared; about mkfs.erofs 1.9.4's image size
    with the same options (at most 0.1 % over)"""
    require(os.path.isdir(PYLIB), f"{PYLIB} missing")
    args = PYLIB_ARGS[variant]
    ours, theirs = tmp_path / "o.img", tmp_path / "a.img"
    # (--xattr-inode-digest: the fingerprints, test_metabox_inode_digest compares them)
    ignore = ("mtime_ns", "xattr") if "--xattr-inode-digest" in args else ("mtime_ns",)
    mkfs_and_check(ours, PYLIB, "-T", "0", "-U", "clear", *args, ignore=ignore)
    anchor(theirs, PYLIB, *args)
    fsck(theirs, extract=False)
    assert_metabox(ours)
    # (-zlz4hc -C65536 -m65536: 1.0002, one block over; the others under)
    assert_size_vs_anchor(ours, theirs, f"{' '.join(args)} {PYLIB}", 1.001)


@pytest.mark.parametrize("args, msg", [
    (["-m4096:lzma"], "-m 4096:lzma: a metabox algorithm without -z is not written by this "
     "mkfs (without -z the metabox is stored plain)"),
    (["-zlz4:lz4hc:lzma:zstd", "-m4096:deflate"], "-m 4096:deflate: the -z list has 4 "
     "algorithms already"),
    (["-zlz4hc", "-m8192"], "-m 8192: the metabox's pcluster size exceeds -C's 4096"),
    (["-m100"], "-m 100: invalid pcluster size 100 for the metabox inode"),
    (["-mfoo"], "-m foo: invalid metabox option"),
])
def test_refused(tree, tmp_path, args, msg):
    assert_mkfs_refused(tmp_path / "x.img", tree, args, msg)
