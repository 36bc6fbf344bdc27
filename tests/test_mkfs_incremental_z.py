"""mkfs --incremental with -z ALG (lz4, lz4hc, lzma, deflate, zstd; -C, -E ztailpacking):
the layer's regular files compressed, their pclusters appended after the base's blocks
and their indexes in the new inode records. On a plain base (lz4, lz4hc) and on an
lz4hc-first base whose superblock has every algorithm's config record: base + one and
two layers (a directory, or a tar read with --tar=f) mounted by the host kernel and
compared with full metadata against the layers extracted in order; fsck.erofs 1.9.4,
our check and unpack pass; the base's bytes kept; the layers' compressible files
stored compressed. What the base's superblock cannot take in place (a new algorithm,
a larger pcluster, fragments over a packed inode) is one `error:` line, exit 1, the base
untouched. Against mkfs.erofs 1.9.4's incremental image of the same inputs the size
ratio is printed. Before this, --incremental refused -z ("-z is not supported"), so
each test failed on the code before it."""
import os
import shutil
import subprocess

import pytest
from helpers import (
    assert_size_vs_anchor,
    compare_trees,
    fsck,
    require_tool,
    run_erofs_tools,
    run_mkfs,
)
from helpers import mounted as mounted_img
from test_mkfs_incremental import (  # noqa: F401  (layers: the shared fixture)
    PYLIB,
    _anchor_incr,
    _sha,
    assert_base_kept,
    layers,
)
from test_mkfs_tar import _tar as make_tar

from erofs_tools.format import erofs as E
from erofs_tools.reader.image import open_image
from erofs_tools.reader.zmap import ZMap

ALGS = ["lz4", "lz4hc", "lzma", "deflate", "zstd"]
# a base whose superblock has the config records of every algorithm (lz4hc first)
MULTI = ("-z", "lz4hc:lzma:deflate:zstd", "-C", "65536")


def _new_compressed(img, base):
    """The regular files whose records lie after the base image's end, compressed."""
    end = os.path.getsize(base)
    with open_image(img) as im:
        return {ino.nid for _p, _d, ino in im.walk() if ino.is_reg() and ino.offset >= end
                and ino.layout in (E.LAYOUT_COMPRESSED_FULL, E.LAYOUT_COMPRESSED_COMPACT)}


def _layer_args(base, alg, n):
    """Layer 1: -E ztailpacking; layer 2: -C 16 KiB on the multi base."""
    if n == 1:
        return ("-z", alg, "-E", "ztailpacking")
    return ("-z", alg, "-C", "16384") if base == "multi" else ("-z", alg)


# (a plain base takes lz4 and lz4hc only: the others are test_config_refused's)
CASES = [(a, b) for b in ("plain", "multi") for a in ALGS
         if b == "multi" or a in ("lz4", "lz4hc")]


@pytest.mark.parametrize("form", ["dir", "tar"])
@pytest.mark.parametrize("alg,base", CASES)
def test_compressed_layers(root_kernel, layers, tmp_path, alg, base, form):
    img = str(tmp_path / "img")
    run_mkfs(img, layers["base"], *(MULTI if base == "multi" else ()))
    base_copy = str(tmp_path / "base.img")
    shutil.copyfile(img, base_copy)
    for n in (1, 2):
        before = str(tmp_path / f"before{n}.img")
        shutil.copyfile(img, before)
        args = _layer_args(base, alg, n)
        if form == "dir":
            run_mkfs(img, layers[f"l{n}-ovl"], "--incremental", "--ovlfs-strip", *args)
        else:
            tar = make_tar(layers[f"l{n}-oci"], tmp_path / f"l{n}.tar")
            run_mkfs(img, tar, "--incremental", "--ovlfs-strip", "--tar=f", "--aufs",
                     *args)
        fsck(img)
        run_erofs_tools("check", img)
        out = str(tmp_path / f"unpacked{n}")
        run_erofs_tools("unpack", img, "-o", out)
        with mounted_img(img) as mnt:
            diffs = compare_trees(layers[f"expected{n}"], mnt)
            assert diffs == [], "\n".join(diffs[:40])
            diffs = compare_trees(mnt, out, ignore=("mtime_ns",))
            assert diffs == [], "\n".join(diffs[:40])
        assert_base_kept(before, img)
        # etc/over, d2f (layer 1), etc/added (layer 2) compress; hl/x does not
        assert len(_new_compressed(img, before)) >= (2 if n == 1 else 1)
    assert_base_kept(base_copy, img)


@pytest.mark.parametrize("base,args,what", [
    ((), ("-z", "lzma"), "config record"),
    ((), ("-z", "zstd"), "config record"),
    ((), ("-z", "lz4", "-C", "8192"), "config record"),
    (("-z", "lz4hc"), ("-z", "deflate"), "config record"),
    (("-z", "lzma"), ("-z", "lz4"), "lz4 config record"),
    (("-z", "lz4hc:lzma"), ("-z", "lz4hc", "-C", "8192"), "pclusters are at most"),
    (("-z", "lzma,dictsize=65536"), ("-z", "lzma,dictsize=1048576", "-C", "1048576"),
     "larger"),
    (("-z", "lz4", "-E", "fragments"), ("-z", "lz4", "-E", "fragments"), "packed inode"),
    ((), ("-z", "lz4", "-E", "48bit"), "48bit"),
    (("-E", "48bit"), ("-z", "lz4"), "48-bit"),
])
def test_config_refused(tmp_path, layers, base, args, what):
    img = str(tmp_path / "img")
    run_mkfs(img, layers["base"], *base)
    before = _sha(img)
    p = run_mkfs(img, layers["l1-ovl"], "--incremental", *args, check=False)
    assert p.returncode == 1
    err = p.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and what in err, err
    assert _sha(img) == before
    assert sorted(os.listdir(tmp_path)) == ["img"]


def test_legacy_lz4_base_refused(tmp_path, layers):
    """A base whose compressed files were written without zero padding (lz4_0padding
    clear: the pre-5.3 lz4 layout): setting the bit for the layer would make the kernel
    read the base's own lz4 data wrong, so the build is refused, the base untouched."""
    img = tmp_path / "img"
    run_mkfs(str(img), layers["base"], "-z", "lz4")
    b = bytearray(img.read_bytes())
    inc = E.SUPER_OFFSET + 0x50
    word = int.from_bytes(b[inc:inc + 4], "little")
    assert word & E.FEATURE_INCOMPAT_ZERO_PADDING
    b[inc:inc + 4] = (word & ~E.FEATURE_INCOMPAT_ZERO_PADDING).to_bytes(4, "little")
    if int.from_bytes(b[E.SUPER_OFFSET + 8:E.SUPER_OFFSET + 12], "little") \
            & E.FEATURE_COMPAT_SB_CHKSUM:
        b[E.CHECKSUM_FIELD:E.CHECKSUM_FIELD + 4] = \
            E.superblock_checksum(bytes(b[:4096])).to_bytes(4, "little")
    img.write_bytes(bytes(b))
    before = _sha(str(img))
    p = run_mkfs(str(img), layers["l1-ovl"], "--incremental", "-z", "lz4", check=False)
    assert p.returncode == 1
    err = p.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "zero padding" in err, err
    assert _sha(str(img)) == before
    assert sorted(os.listdir(tmp_path)) == ["img"]


def _pylib(tmp_path):
    base, layer = tmp_path / "b", tmp_path / "l"
    base.mkdir()
    (layer / "email").mkdir(parents=True)
    for d in ("email", "json"):
        shutil.copytree(f"{PYLIB}/{d}", base / d, symlinks=True)
    for d in ("asyncio", "xml"):
        shutil.copytree(f"{PYLIB}/{d}", layer / d, symlinks=True)
    shutil.copy2(f"{PYLIB}/email/_parseaddr.py", layer / "email")
    return str(base), str(layer)


@pytest.mark.parametrize("alg,base", [(a, "same") for a in ALGS]
                         + [(a, "same-C64k-ztp") for a in ALGS[1:]]
                         + [("lz4", "plain"), ("lz4hc", "plain")])
def test_size_against_mkfs_erofs(root_kernel, tmp_path, alg, base):
    """A 1.9.4-built base (plain, or -z ALG), a layer of two packages of the Python
    library with -z ALG: the same tree as mkfs.erofs 1.9.4's incremental image, the
    size ratio printed and at most 1.0 (with -C 64 KiB -E ztailpacking too; compact
    lcluster indexes, as 1.9.4's)."""
    require_tool("mkfs.erofs")
    src, layer = _pylib(tmp_path)
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    extra = ("-C", "65536", "-E", "ztailpacking") if base == "same-C64k-ztp" else ()
    bargs = () if base == "plain" else ("-z", alg, *extra)
    subprocess.run(["mkfs.erofs", "--quiet", "-T0", "-Uclear", *bargs, ours, src],
                   check=True, capture_output=True)
    shutil.copyfile(ours, theirs)
    run_mkfs(ours, layer, "-T", "0", "--incremental", "-z", alg, *extra)
    _anchor_incr(theirs, layer, "-T0", "--incremental", "-z", alg, *extra)
    fsck(ours)
    with mounted_img(ours) as a, mounted_img(theirs) as b:
        assert compare_trees(b, a) == []
    assert_size_vs_anchor(ours, theirs, f"incremental -z {alg} on a {base} base")


@pytest.mark.parametrize("alg", ["lz4hc", "zstd"])
def test_long_records_inline_tail(root_kernel, tmp_path, alg):
    """1 KiB blocks, a 600 KB file: its full indexes make its record longer than a
    block; the inline tail (-E ztailpacking) must still not cross a block."""
    base, layer = tmp_path / "b", tmp_path / "l"
    base.mkdir()
    layer.mkdir()
    (base / "a").write_bytes(b"base\n" * 1000)
    for i in range(3):
        (layer / f"f{i}").write_bytes(b"".join(b"%08d line of text\n" % n
                                               for n in range(i, 30000 + 997 * i)))
    img = str(tmp_path / "img")
    run_mkfs(img, base, "-b", "1024", "-z", "lz4hc:zstd")
    before = str(tmp_path / "before")
    shutil.copyfile(img, before)
    run_mkfs(img, layer, "--incremental", "-z", alg, "-E", "ztailpacking")
    fsck(img)
    run_erofs_tools("check", img)
    assert len(_new_compressed(img, before)) == 3
    with open_image(img) as im:
        assert im.blksz == 1024 and im.sb.feature_incompat & E.FEATURE_INCOMPAT_ZTAILPACKING
        long_inline = 0
        for i in range(3):
            ino = im.lookup(f"/f{i}")
            zm = ZMap(im, ino)
            assert ino.inode_size + 8 * zm.nlc > im.blksz
            long_inline += bool(zm.idata_size)
        assert long_inline
    with mounted_img(img) as mnt:
        for i in range(3):
            assert (layer / f"f{i}").read_bytes() == open(f"{mnt}/f{i}", "rb").read()
        assert (base / "a").read_bytes() == open(f"{mnt}/a", "rb").read()
    assert_base_kept(before, img)
