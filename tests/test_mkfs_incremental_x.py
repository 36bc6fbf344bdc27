"""mkfs --incremental, the combinations added after -z: compact lcluster indexes for the
layer's compressed files (mkfs.erofs 1.9.4's default; before, full 8-byte ones),
-E dedupe within the layer, --compress-hints for the layer's files, --tar=i layers (the
files' data left in the tar, device 1, over a base without devices: what 1.9.4 builds
correctly) and -E fragments over a base without a packed inode. Each: base + one and
two layers mounted by the host kernel and compared with full metadata against the
layers extracted in order; fsck.erofs 1.9.4, our check and unpack pass; the base's bytes
kept; the size against mkfs.erofs 1.9.4's incremental image of the same inputs printed
(and at most 1.0) where 1.9.4 builds it. What stays refused (-E fragments over a packed
inode: 1.9.4's images read wrong bytes; --tar=i over a base with devices: 1.9.4 replaces
the base's device; --tar=i whose data is not aligned to the base's blocks) is one
`error:` line, exit 1, the base untouched. Before this change -E dedupe, -E fragments,
--compress-hints and --tar=i were refused and the layer's indexes were full, so each
test here failed on the code before it."""
import os
import shutil
import subprocess

import pytest
from helpers import compare_trees, fsck, require_tool, run_erofs_tools, run_mkfs
from helpers import mounted as mounted_img
from test_mkfs_incremental import (  # noqa: F401  (layers: the shared fixture)
    _anchor_incr,
    _sha,
    assert_base_kept,
    layers,
)
from test_mkfs_incremental_z import MULTI, _pylib
from test_mkfs_tar import _tar as make_tar

from erofs_tools.format import erofs as E
from erofs_tools.reader.image import open_image
from erofs_tools.reader.zmap import FRAGMENT, ZMap


def _layouts(img, base):
    """The layouts of the regular files whose records lie after the base image's end."""
    end = os.path.getsize(base)
    with open_image(img) as im:
        return [ino.layout for _p, _d, ino in im.walk() if ino.is_reg() and ino.offset >= end]


def _check_all(img, expected, devices=()):
    fsck(img, devices=devices)
    dev = [a for d in devices for a in ("--device", d)]
    run_erofs_tools("check", img, *dev)
    out = img + ".unpacked"
    run_erofs_tools("unpack", img, "-o", out, *dev)
    opts = ",".join(f"device={d}" for d in devices) or None
    with mounted_img(img, opts) as mnt:
        diffs = compare_trees(expected, mnt)
        assert diffs == [], "\n".join(diffs[:40])
        diffs = compare_trees(mnt, out, ignore=("mtime_ns",))
        assert diffs == [], "\n".join(diffs[:40])
    shutil.rmtree(out)


@pytest.mark.parametrize("base,args", [
    ((), ("-z", "lz4")),
    (("-z", "lz4hc"), ("-z", "lz4hc", "-E", "ztailpacking")),
    (MULTI, ("-z", "zstd", "-C", "16384", "-E", "ztailpacking")),
    (MULTI, ("-z", "lzma", "-C", "65536")),
    (("-b", "1024", "-z", "lz4hc:deflate", "-C", "8192"), ("-z", "deflate", "-C", "4096")),
])
@pytest.mark.parametrize("form", ["dir", "tar"])
def test_compact_indexes(root_kernel, layers, tmp_path, base, args, form):
    """The layer's compressed files get compact indexes (their packs shaped by where the
    index lies in the new record), big pclusters or not, with inline tails too."""
    img = str(tmp_path / "img")
    for _n, before in _two_layers(img, layers, tmp_path, form, base, args, args):
        lay = _layouts(img, before)
        assert E.LAYOUT_COMPRESSED_COMPACT in lay and E.LAYOUT_COMPRESSED_FULL not in lay


def _two_layers(img, layers, tmp_path, form, base, args1, args2):
    """The base built with `base`, then layers 1 and 2 (directory or tar form) added
    with args1 and args2; after each: the kernel's view as the layers extracted in order
    (_check_all) and the image before it kept; yields (n, the image before it) for the
    caller's own checks, and at the end checks the base kept."""
    run_mkfs(img, layers["base"], *base)
    base_copy = img + ".base"
    shutil.copyfile(img, base_copy)
    for n, args in ((1, args1), (2, args2)):
        before = f"{img}.before{n}"
        shutil.copyfile(img, before)
        if form == "dir":
            run_mkfs(img, layers[f"l{n}-ovl"], "--incremental", "--ovlfs-strip", *args)
        else:
            tar = make_tar(layers[f"l{n}-oci"], tmp_path / f"l{n}.tar")
            run_mkfs(img, tar, "--incremental", "--ovlfs-strip", "--tar=f", "--aufs", *args)
        _check_all(img, layers[f"expected{n}"])
        assert_base_kept(before, img)
        yield n, before
    assert_base_kept(base_copy, img)


def _dupes(root):
    """A layer of repeated data: whole copies, copies with a prefix, a shared middle."""
    body = b"".join(b"%06d some words that repeat in this file\n" % i for i in range(6000))
    os.makedirs(root)
    for i in range(4):
        with open(f"{root}/copy{i}", "wb") as f:
            f.write(body)
    with open(f"{root}/shifted", "wb") as f:
        f.write(b"a header of 37 bytes, not a block!!\n" + body)
    with open(f"{root}/middle", "wb") as f:
        f.write(os.urandom(5000) + body[100000:180000] + os.urandom(3000))


def _expected(src, layer, dst):
    """src with the layer (no whiteouts) extracted over it."""
    subprocess.run(["cp", "-a", src, dst], check=True)
    subprocess.run(["cp", "-a", f"{layer}/.", dst], check=True)
    os.utime(dst, ns=(os.stat(layer).st_mtime_ns,) * 2)
    return dst


@pytest.mark.parametrize("alg", ["lz4hc", "zstd"])
def test_dedupe_within_layer(root_kernel, tmp_path, alg):
    """-E dedupe: the layer's repeated data stored once (shared pclusters, partial
    references into them: full indexes there); smaller than without it; the tree right;
    against mkfs.erofs 1.9.4 (which builds this one correctly) the size ratio."""
    require_tool("mkfs.erofs")
    src, _layer = _pylib(tmp_path)
    layer = str(tmp_path / "dupes")
    _dupes(layer)
    expected = _expected(src, layer, str(tmp_path / "expected"))
    bargs = ("-z", "lz4hc:zstd")
    imgs = {}
    for name, extra in (("plain", ()), ("dedupe", ("-E", "dedupe"))):
        img = imgs[name] = str(tmp_path / name)
        run_mkfs(img, src, "-U", "clear", *bargs)
        before = str(tmp_path / f"{name}.before")
        shutil.copyfile(img, before)
        run_mkfs(img, layer, "--incremental", "-z", alg, *extra)
        _check_all(img, expected)
        assert_base_kept(before, img)
    assert os.path.getsize(imgs["dedupe"]) < os.path.getsize(imgs["plain"])
    theirs = str(tmp_path / "theirs")
    shutil.copyfile(str(tmp_path / "dedupe.before"), theirs)
    _anchor_incr(theirs, layer, "--incremental", "-z", alg, "-Ededupe")
    fsck(theirs)
    # (mtimes aside: 1.9.4 writes the new build time, which moves the base's compact
    # inodes' mtimes; ours keeps the base's)
    with mounted_img(theirs) as b, mounted_img(imgs["dedupe"]) as a:
        assert compare_trees(b, a, ignore=("mtime_ns",)) == []
    ratio = os.path.getsize(imgs["dedupe"]) / os.path.getsize(theirs)
    print(f"incremental -z {alg} -E dedupe: {os.path.getsize(imgs['dedupe'])} / "
          f"{os.path.getsize(theirs)} = {ratio:.4f}")
    assert ratio <= 1.0


def _zinfo(img, prefixes):
    """path -> (algorithms, largest pcluster) of the compressed files under prefixes."""
    out = {}
    with open_image(img) as im:
        for raw, _d, ino in im.walk():
            path = raw.decode() if isinstance(raw, bytes) else raw
            if ino.is_reg() and ino.layout in (E.LAYOUT_COMPRESSED_FULL,
                                               E.LAYOUT_COMPRESSED_COMPACT) \
                    and path.startswith(prefixes):
                zm = ZMap(im, ino)
                out[path] = ({e.alg for e in zm.extents if e.alg >= 0},
                             max(e.plen for e in zm.extents))
    return out


@pytest.mark.parametrize("with_alg", [True, False])
def test_compress_hints(root_kernel, tmp_path, with_alg):
    """--compress-hints: the layer's files matched by path get the hint's pcluster size
    and algorithm (with_alg: the second of -z for asyncio/; mkfs.erofs 1.9.4 dies of
    SIGSEGV on an algorithm index with --incremental), the others the first; without
    algorithm indexes the same tree and pcluster sizes as mkfs.erofs 1.9.4's incremental
    image, the size ratio printed."""
    require_tool("mkfs.erofs")
    src, layer = _pylib(tmp_path)
    hints = tmp_path / "hints"
    hints.write_text(("16384 1 ^asyncio/\n" if with_alg else "16384 ^asyncio/\n")
                     + "4096 xml/dom\n")
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    t = () if with_alg else ("-T0",)
    if with_alg:        # (ours, with the files' own mtimes: compared with the layers)
        run_mkfs(ours, src, *MULTI)
    else:
        subprocess.run(["mkfs.erofs", "--quiet", *t, "-Uclear", *MULTI, ours, src],
                       check=True, capture_output=True)
    shutil.copyfile(ours, theirs)
    before = str(tmp_path / "before")
    shutil.copyfile(ours, before)
    args = ("--incremental", "-z", "lz4hc:zstd", "-C", "65536", "--compress-hints", str(hints))
    run_mkfs(ours, layer, *t, *args)
    fsck(ours)
    run_erofs_tools("check", ours)
    assert_base_kept(before, ours)
    mine = _zinfo(ours, ("/asyncio/", "/xml/"))
    assert any(p.startswith("/asyncio/") for p in mine) and any(p.startswith("/xml/dom/")
                                                                for p in mine)
    for path, (a, plen) in mine.items():
        if path.startswith("/asyncio/"):
            assert a <= {E.COMPRESSION_ZSTD if with_alg else E.COMPRESSION_LZ4}, path
            assert plen <= 16384, path
        else:
            assert a <= {E.COMPRESSION_LZ4}, path
            if path.startswith("/xml/dom/"):
                assert plen <= 4096, path
    if with_alg:
        _check_all(ours, _expected(src, layer, str(tmp_path / "expected")))
        return
    _anchor_incr(theirs, layer, "-T0", *args)
    with mounted_img(ours) as a, mounted_img(theirs) as b:
        assert compare_trees(b, a) == []
    ratio = os.path.getsize(ours) / os.path.getsize(theirs)
    print(f"incremental --compress-hints: {os.path.getsize(ours)} / "
          f"{os.path.getsize(theirs)} = {ratio:.4f}")
    assert ratio <= 1.0


@pytest.mark.parametrize("base_by", ["ours", "theirs"])
def test_tar_index_layer(root_kernel, layers, tmp_path, base_by):
    """--tar=i over a 512-byte-block base without devices: the layer's files are chunk
    indexes into the tar (device 1, mounted with -o device=TAR), the tree right, the
    same size as mkfs.erofs 1.9.4's (which builds this case correctly); a second --tar=i
    layer (the base now has a device) is refused, as is one over a 4 KiB base whose tar
    data is not 4 KiB-aligned; the image untouched."""
    require_tool("mkfs.erofs")
    ours, theirs, mine = (str(tmp_path / n) for n in ("ours", "theirs", "mine"))
    if base_by == "ours":
        run_mkfs(ours, layers["base"], "-b", "512", "-T", "0", "-U", "clear")
        run_mkfs(mine, layers["base"], "-b", "512")
    else:
        for img, t in ((ours, ("-T0",)), (mine, ())):
            subprocess.run(["mkfs.erofs", "--quiet", "-b512", "-Uclear", *t, img,
                            layers["base"]], check=True, capture_output=True)
    shutil.copyfile(ours, theirs)
    before = str(tmp_path / "before")
    shutil.copyfile(mine, before)
    tar = make_tar(layers["l1-oci"], tmp_path / "l1.tar")
    args = ("--incremental", "--ovlfs-strip", "--tar=i", "--aufs")
    run_mkfs(mine, tar, *args)
    _check_all(mine, layers["expected1"], devices=(tar,))
    assert_base_kept(before, mine)
    run_mkfs(ours, tar, "-T", "0", *args)
    _anchor_incr(theirs, tar, "-T0", *args)
    with open_image(mine) as im:
        assert im.sb.extra_devices == 1
        new = [ino for _p, _d, ino in im.walk()
               if ino.is_reg() and ino.offset >= os.path.getsize(before)]
        assert new and all(ino.layout == E.LAYOUT_CHUNK_BASED for ino in new if ino.size)
    with mounted_img(ours, f"device={tar}") as a, mounted_img(theirs, f"device={tar}") as b:
        assert compare_trees(b, a) == []
    ratio = os.path.getsize(ours) / os.path.getsize(theirs)
    print(f"incremental --tar=i on {base_by} base: {os.path.getsize(ours)} / "
          f"{os.path.getsize(theirs)} = {ratio:.4f}")
    assert ratio <= 1.0
    # a second --tar=i layer: the base has a device now
    tar2 = make_tar(layers["l2-oci"], tmp_path / "l2.tar")
    _refused(mine, tar2, ("--incremental", "--tar=i", "--aufs"), "extra devices")


def _refused(img, src, args, what):
    before = _sha(img)
    listing = sorted(os.listdir(os.path.dirname(img)))
    p = run_mkfs(img, src, *args, check=False)
    assert p.returncode == 1
    err = p.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and what in err, err
    assert _sha(img) == before
    assert sorted(os.listdir(os.path.dirname(img))) == listing


def test_refusals(tmp_path, layers):
    """--tar=i over a 4 KiB base whose tar data is 512-byte aligned (mkfs.erofs 1.9.4:
    "invalid tar data alignment"), --tar=i with -z, from gzip; -E fragments over a base
    with a packed inode (1.9.4's images read wrong bytes in the base's fragment files)."""
    img = str(tmp_path / "img")
    run_mkfs(img, layers["base"])
    tar = make_tar(layers["l1-oci"], tmp_path / "l1.tar")
    tgz = make_tar(layers["l1-oci"], tmp_path / "l1.tgz", gz=True)
    _refused(img, tar, ("--incremental", "--tar=i"), "not aligned")
    _refused(img, tar, ("--incremental", "--tar=i", "-z", "lz4"), "-z")
    _refused(img, tar, ("--incremental=rvsp", "--tar=i"), "rvsp")
    _refused(img, tgz, ("--incremental", "--tar=i", "--ungzip"), "plain tar")
    # the layer's data stays in its tar, a device: no data region for a block map
    _refused(img, tar, ("--incremental", f"--tar=i,{tmp_path / 'l1.map'}"), "MAPFILE")
    assert not (tmp_path / "l1.map").exists()
    z = str(tmp_path / "z.img")
    run_mkfs(z, layers["base"], "-z", "lz4hc", "-E", "fragments")
    _refused(z, layers["l1-ovl"], ("--incremental", "-z", "lz4hc", "-E", "fragments"),
             "packed inode")


@pytest.mark.parametrize("base,args", [
    ((), ("-z", "lz4hc", "-E", "fragments")),
    (("-z", "lz4hc", "-C", "65536"), ("-z", "lz4hc", "-E", "all-fragments,ztailpacking")),
    (MULTI, ("-z", "zstd", "-C", "16384", "-E", "fragments,dedupe")),
])
@pytest.mark.parametrize("form", ["dir", "tar"])
def test_fragments_first_layer(root_kernel, layers, tmp_path, base, args, form):
    """-E fragments over a base without a packed inode: the layer's tails (or whole
    files) in a new packed inode the superblock names; a second layer (plain -z) over
    it; a second -E fragments layer is refused (the packed inode cannot grow in place).
    mkfs.erofs 1.9.4 accepts both and its images read wrong bytes (no size compared)."""
    img = str(tmp_path / "img")
    for _n, _before in _two_layers(img, layers, tmp_path, form, base, args, args[:2]):
        with open_image(img) as im:
            assert im.sb.packed_nid and im.sb.feature_incompat & E.FEATURE_INCOMPAT_FRAGMENTS
            assert any(any(e.kind == FRAGMENT for e in ZMap(im, ino).extents)
                       for _p, _d, ino in im.walk() if ino.is_reg()
                       and ino.layout in (E.LAYOUT_COMPRESSED_FULL,
                                          E.LAYOUT_COMPRESSED_COMPACT))
    _refused(img, layers["l1-ovl"], ("--incremental", *args), "packed inode")
