"""`erofs-tools mkfs --tar=f|i [--aufs] [--ungzip[=FILE]]`: tar layers to full images and
to index images, mounted with the host kernel and compared with GNU tar -x of the same
archive (full metadata: modes, owners, mtimes, xattrs, hardlinks, devices, symlinks,
sparse files), fsck.erofs 1.9 on every image, whiteouts through a real overlayfs,
and hostile archives (one-line error, exit 1, nothing written)."""
import gzip
import os
import shutil
import stat
import subprocess
import sys
import tarfile

import pytest
from helpers import compare_trees, fsck, mounted, require_tool, sys_mount, sys_umount
from test_tar import _rich_tree
from test_tar_helpers import E, index_layer, make_tar, run_cli, tar_x

pytestmark = pytest.mark.root


def _tar(src, tar_path, fmt="pax", gz=False, extra=()):
    subprocess.run(["tar", f"--format={fmt}", "--sparse", "--xattrs", "--xattrs-include=*",
                    "--numeric-owner", *extra, *(["-z"] if gz else []),
                    "-cf", str(tar_path), "-C", str(src), "."], check=True)
    return str(tar_path)


def _ref(tar_path, dest):
    os.makedirs(dest)
    tar_x(tar_path, dest)
    return dest


def _same(ref, mnt, **kw):
    diffs = compare_trees(ref, mnt, check_nlink=True, **kw)
    assert not diffs, "\n".join(diffs[:40])


def _mkfs(*args, input=None, check=True):
    return run_cli("mkfs", *args, input=input, check=check)


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    base = tmp_path_factory.mktemp("rich")
    src = str(base / "src")
    _rich_tree(src)
    return src


@pytest.mark.parametrize("fmt,extra", [("pax", ()), ("gnu", ()),
                                       ("pax", ("--sparse-version=1.0",)),
                                       ("pax", ("--sparse-version=0.1",))])
def test_full_image_equals_tar_x(tmp_path, rich, fmt, extra):
    tar_path = _tar(rich, tmp_path / "l.tar", fmt, extra=extra)
    img = tmp_path / "l.img"
    _mkfs("--tar=f", img, tar_path)
    fsck(img)
    ref = _ref(tar_path, str(tmp_path / "ref"))
    with mounted(img) as mnt:
        _same(ref, mnt)
        assert os.lstat(os.path.join(mnt, "sparse")).st_size == 16 << 20
    # the 16 MiB sparse file keeps its holes: the image holds little more than the data
    assert os.path.getsize(img) < 4 << 20


@pytest.mark.parametrize("fmt,extra", [("pax", ()), ("gnu", ()),
                                       ("pax", ("--sparse-version=1.0",))])
def test_index_image_mounts_with_the_tar_as_device_and_appended(tmp_path, rich, fmt, extra):
    tar_path = _tar(rich, tmp_path / "l.tar", fmt, extra=extra)
    idx = tmp_path / "l.idx"
    p = _mkfs("--tar=i", "--json", idx, tar_path)
    assert os.path.getsize(idx) < 64 << 10          # metadata only: data stays in the tar
    assert b'"mode": "i"' in p.stdout
    fsck(idx, devices=[tar_path])
    ref = _ref(tar_path, str(tmp_path / "ref"))
    with mounted(idx, f"device={tar_path}") as mnt:
        _same(ref, mnt)
    # containerd's layout: the tar appended to the index is one self-contained image
    layer = index_layer(idx, tar_path, tmp_path / "layer.erofs")
    # (fsck.erofs 1.9.4 --extract cannot read this flat layout, not even mkfs.erofs's own:
    # "invalid device id 1"; the kernel can)
    with mounted(layer) as mnt:
        _same(ref, mnt)


@pytest.mark.parametrize("mode", ["f", "i"])
@pytest.mark.parametrize("fmt,extra", [("gnu", ()), ("pax", ("--sparse-version=1.0",)),
                                       ("pax", ("--sparse-version=0.0",))])
def test_sparse_many_regions_odd_size(tmp_path, mode, fmt, extra):
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sp", "wb") as f:
        for i in range(40):                   # > 4 regions: GNU extension headers
            f.seek(i * 65536)
            f.write(bytes([i + 1]) * 4096)
        f.truncate(40 * 65536 + 5)            # a size that is no block multiple
    with open(src / "hole-only", "wb") as f:
        f.truncate(3 << 20)
    tar_path = _tar(src, tmp_path / "s.tar", fmt, extra=extra)
    img = tmp_path / "s.img"
    _mkfs(f"--tar={mode}", img, tar_path)
    fsck(img, devices=[tar_path] if mode == "i" else [])
    ref = _ref(tar_path, str(tmp_path / "ref"))
    with mounted(img, f"device={tar_path}" if mode == "i" else None) as mnt:
        _same(ref, mnt)


def test_stdin_gzip_and_dump(tmp_path, rich):
    plain = _tar(rich, tmp_path / "l.tar")
    gz = str(tmp_path / "l.tar.gz")
    with open(plain, "rb") as f, open(gz, "wb") as out:
        out.write(gzip.compress(f.read()))
    ref = _ref(plain, str(tmp_path / "ref"))
    with open(gz, "rb") as f:
        data = f.read()
    p = _mkfs("--tar=f", tmp_path / "a.img", gz, check=False)
    assert p.returncode == 1 and b"--ungzip" in p.stderr
    assert not os.path.exists(tmp_path / "a.img")
    # full image from stdin (a spool beside the image, removed afterwards); a bare
    # --tar is full mode and no SOURCE is stdin, as mkfs.erofs has them
    _mkfs("--tar", "--ungzip", tmp_path / "a.img", input=data)
    fsck(tmp_path / "a.img")
    with mounted(tmp_path / "a.img") as mnt:
        _same(ref, mnt)
    # index from stdin, the uncompressed tar dumped for it (mkfs.erofs --ungzip=FILE)
    dump = tmp_path / "dump.tar"
    _mkfs("--tar=i", f"--ungzip={dump}", tmp_path / "i.img", input=data)
    with open(dump, "rb") as a, open(plain, "rb") as b:
        assert a.read() == b.read()
    with mounted(tmp_path / "i.img", f"device={dump}") as mnt:
        _same(ref, mnt)
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".")]
    assert leftovers == []


@pytest.mark.parametrize("alg", ["lz4", "lz4hc", "zstd"])
def test_compressed_full_image(tmp_path, rich, alg):
    tar_path = _tar(rich, tmp_path / "l.tar")
    img = tmp_path / "z.img"
    _mkfs("--tar=f", "-z", alg, img, tar_path)
    fsck(img)
    ref = _ref(tar_path, str(tmp_path / "ref"))
    with mounted(img) as mnt:
        _same(ref, mnt)


def _mkfs_erofs_tree(tmp_path, tar_path, *args):
    require_tool("mkfs.erofs")
    img = tmp_path / "anchor.img"
    subprocess.run(["mkfs.erofs", "--quiet", *args, str(img), str(tar_path)], check=True)
    return img


@pytest.mark.parametrize("aufs", [False, True])
def test_whiteouts_as_mkfs_erofs(tmp_path, aufs):
    """Default: entries kept as in the archive; --aufs: .wh. files converted; both the
    same tree (xattrs included) as mkfs.erofs 1.9 gives for the same archive."""
    entries = [E(".", "dir"), E("a", "dir"), E("a/keep", data=b"k"), E("a/.wh.gone", mode=0o600, uid=7),
               E("a/.wh.back"), E("a/back", data=b"later wins"),
               E("b", "dir"), E("b/.wh..wh..opq"), E("b/new", data=b"n"),
               E("c", "dir"), E("c/dead", "chr", rdev=(0, 0)),
               E("d", "dir", xattrs={"trusted.overlay.opaque": "y"})]
    tar_path = tmp_path / "w.tar"
    tar_path.write_bytes(make_tar(entries))
    flags = ["--aufs"] if aufs else []
    img = tmp_path / "w.img"
    _mkfs("--tar=f", *flags, img, tar_path)
    fsck(img)
    anchor = _mkfs_erofs_tree(tmp_path, tar_path, "--tar=f", *flags)
    with mounted(img) as mnt, mounted(anchor) as amnt:
        _same(amnt, mnt)
        names = sorted(os.listdir(os.path.join(mnt, "a")))
        if aufs:
            assert names == ["back", "gone", "keep"]
            st = os.lstat(os.path.join(mnt, "a/gone"))
            assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (0, 0)
            assert os.getxattr(os.path.join(mnt, "b"), "trusted.overlay.opaque") == b"y"
        else:
            assert ".wh.gone" in names and os.path.exists(os.path.join(mnt, "b/.wh..wh..opq"))


def test_aufs_layer_hides_lower_through_overlayfs(tmp_path):
    lower = tmp_path / "lower"
    for p in ("a/gone", "a/keep", "b/old", "c"):
        (lower / p).parent.mkdir(parents=True, exist_ok=True)
        (lower / p).write_bytes(b"lower")
    tar_path = tmp_path / "up.tar"
    tar_path.write_bytes(make_tar([E("a", "dir"), E("a/.wh.gone"), E("b", "dir"),
                                   E("b/.wh..wh..opq"), E("b/new", data=b"upper"),
                                   E(".wh.c")]))
    img = tmp_path / "up.img"
    _mkfs("--tar=f", "--aufs", img, tar_path)
    with mounted(img) as upper:
        ovl = tmp_path / "ovl"
        ovl.mkdir()
        sys_mount("overlay", str(ovl), "overlay", data=f"lowerdir={upper}:{lower}")
        try:
            assert sorted(os.listdir(ovl)) == ["a", "b"]
            assert sorted(os.listdir(ovl / "a")) == ["keep"]
            assert sorted(os.listdir(ovl / "b")) == ["new"]
        finally:
            sys_umount(str(ovl))


def test_index_tree_equals_mkfs_erofs_index(tmp_path, rich):
    # mkfs.erofs 1.9 does not read sparse entries: compare on the rest
    plain = _tar(rich, tmp_path / "plain.tar", extra=("--exclude=./sparse",))
    _mkfs("--tar=i", tmp_path / "p.idx", plain)
    anchor = _mkfs_erofs_tree(tmp_path, plain, "--tar=i")
    with mounted(tmp_path / "p.idx", f"device={plain}") as mnt, \
            mounted(anchor, f"device={plain}") as amnt:
        _same(amnt, mnt)


# ------------------------------------------------------------------ hostile input ----

def _hdr(name, size=0, typ=b"0", link=b""):
    ti = tarfile.TarInfo(name.decode())
    ti.size, ti.type, ti.linkname = size, typ, link.decode()
    return ti.tobuf(format=tarfile.GNU_FORMAT)


@pytest.mark.parametrize("mode", ["f", "i"])
@pytest.mark.parametrize("case,words", [
    ("dotdot", "'..'"), ("truncated", "truncated"), ("garbage", "checksum"),
    ("through-symlink", "symlink"), ("hardlink-missing", "not in the archive"),
])
def test_bad_tars_one_line_error_nothing_written(tmp_path, mode, case, words):
    good = make_tar([E("d", "dir"), E("d/f", data=b"x" * 3000)])
    data = {
        "dotdot": _hdr(b"../evil", 1) + b"x".ljust(512, b"\0") + bytes(1024),
        "truncated": good[:1536 + 700],
        "garbage": os.urandom(4096),
        "through-symlink": make_tar([E("l", "symlink", link="/etc"), E("l/passwd", data=b"x")]),
        "hardlink-missing": make_tar([E("h", "hardlink", link="nowhere")]),
    }[case]
    src = tmp_path / "bad.tar"
    src.write_bytes(data)
    before = sorted(os.listdir(tmp_path))
    for args, inp in (([src], None), (["-"], data)):
        p = _mkfs(f"--tar={mode}", tmp_path / "out.img", *args, input=inp, check=False)
        err = p.stderr.decode()
        assert p.returncode == 1, err
        assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err
        assert sorted(os.listdir(tmp_path)) == before
    p = _mkfs(f"--tar={mode}", "--ungzip=" + str(tmp_path / "dump.tar"), tmp_path / "o.img",
              "-", input=data, check=False)
    assert p.returncode == 1 and sorted(os.listdir(tmp_path)) == before


def test_flags_need_tar(tmp_path):
    """(--tar=i -z is taken now, as mkfs.erofs 1.9.4 takes it: test_mkfs_tar_index_z.py;
    a metabox pcluster under its 4 KiB unit there is refused, as there)"""
    p = _mkfs("--aufs", tmp_path / "x.img", tmp_path, check=False)
    assert p.returncode == 1 and b"need --tar" in p.stderr
    t = tmp_path / "t.tar"
    t.write_bytes(make_tar([E("f", data=b"x")]))
    p = _mkfs("--tar=i", "-z", "lz4", "-m512", tmp_path / "x.img", t, check=False)
    assert p.returncode == 1 and b"-m 512" in p.stderr
    assert not os.path.exists(tmp_path / "x.img")
    before = t.read_bytes()
    for args in (["--tar=f", t, t], ["--tar=i", f"--ungzip={t}", tmp_path / "y.img", t],
                 ["--tar=f", tmp_path / "y.img", tmp_path]):
        p = _mkfs(*args, check=False)
        assert p.returncode == 1 and p.stderr.count(b"\n") == 1, p.stderr
    assert t.read_bytes() == before and not os.path.exists(tmp_path / "y.img")


def test_root_entry_metadata_and_implied_dirs(tmp_path):
    tar_path = tmp_path / "r.tar"
    tar_path.write_bytes(make_tar([E(".", "dir", mode=0o700, uid=5, mtime=123),
                                   E("x/y/z", data=b"deep", mtime=456)]))
    img = tmp_path / "r.img"
    _mkfs("--tar=f", img, tar_path)
    fsck(img)
    with mounted(img) as mnt:
        st = os.lstat(mnt)
        assert (st.st_mode & 0o7777, st.st_uid, st.st_mtime) == (0o700, 5, 123)
        st = os.lstat(os.path.join(mnt, "x/y"))
        assert (st.st_mode & 0o7777, st.st_uid, st.st_mtime) == (0o755, 0, 0)
        with open(os.path.join(mnt, "x/y/z"), "rb") as f:
            assert f.read() == b"deep"


@pytest.mark.parametrize("regions,size,ok", [
    ([(0, 4096), (65536, 4096)], 65536 + 4096, True),
    ([(0, 4096), (65536, 100)], 65536 + 100, True),        # the last region ends at EOF
    ([(0, 100), (65536, 4096)], 65536 + 4096, False),      # data not 512-aligned in the tar
    ([(700, 512)], 4096, False),                           # region not on a block
    ([(1 << 20, 0)], 1 << 20, True),                       # all hole
])
def test_index_sparse_mapping(regions, size, ok):
    from erofs_tools.builder.mkfs_tar import _chunk_entries, _Data
    from erofs_tools.errors import InputError
    if not ok:
        with pytest.raises(InputError, match="--tar=f"):
            _chunk_entries(_Data(1024, regions), size, b"f")
        return
    fmt, ents = _chunk_entries(_Data(1024, regions), size, b"f")
    csz = 512 << (fmt & 0x1F)
    toff = 1024
    for off, ln in regions:       # every data byte maps to its place in the tar
        for pos in range(off, off + ln, 512):
            e = ents[pos // csz]
            assert e >> 16 & 0xFFFF == 1
            assert (e >> 32) * 512 + pos % csz == toff + pos - off
        toff += ln
    holes = [i for i, e in enumerate(ents) if e >> 32 == 0xFFFFFFFF]
    assert all(not any(o < (i + 1) * csz and o + ln > i * csz for o, ln in regions if ln)
               for i in holes)


def test_gzip_bomb_bounded_by_max_size(tmp_path):
    """A small gzip of a large file: --max-size stops it, nothing written (no spool)."""
    import io
    import zlib
    hdr = _hdr(b"big", 64 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = io.BytesIO()
    out.write(c.compress(hdr))
    zero = bytes(1 << 20)
    for _ in range(64):
        out.write(c.compress(zero))
    out.write(c.compress(bytes(1024)) + c.flush())
    data = out.getvalue()
    assert len(data) < 1 << 20
    before = sorted(os.listdir(tmp_path))
    p = _mkfs("--tar=f", "--ungzip", "--max-size", "16M", tmp_path / "b.img", "-",
              input=data, check=False)
    assert p.returncode == 1 and b"--max-size" in p.stderr, p.stderr
    assert sorted(os.listdir(tmp_path)) == before
    _mkfs("--tar=f", "--ungzip", "--max-size", "1G", tmp_path / "b.img", "-", input=data)
    with mounted(tmp_path / "b.img") as mnt:
        assert os.path.getsize(os.path.join(mnt, "big")) == 64 << 20


def test_tarfile_through_symlinks(tmp_path, rich):
    """A TARFILE that is a symlink (or /dev/stdin redirected from a file) is read in
    place although the C core opens data sources with O_NOFOLLOW."""
    tar_path = _tar(rich, tmp_path / "l.tar")
    link = tmp_path / "link.tar"
    link.symlink_to(tar_path)
    ref = _ref(tar_path, str(tmp_path / "ref"))
    _mkfs("--tar=f", tmp_path / "a.img", link)
    with open(tar_path, "rb") as f:
        p = subprocess.run([sys.executable, "-m", "erofs_tools", "mkfs", "--tar=f",
                            str(tmp_path / "b.img"), "/dev/stdin"], stdin=f,
                           capture_output=True)
    assert p.returncode == 0, p.stderr
    for img in ("a.img", "b.img"):
        with mounted(tmp_path / img) as mnt:
            _same(ref, mnt)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]   # no spool made


@pytest.mark.parametrize("mode", ["f", "i"])
def test_ownership_time_overrides_and_reproducible(tmp_path, rich, mode):
    tar_path = _tar(rich, tmp_path / "l.tar")
    args = [f"--tar={mode}", "-T", "1000", "-U", "clear", "-L", "layer", "--force-uid", "5",
            "--force-gid", "6"]
    _mkfs(*args, tmp_path / "a.img", tar_path)
    with open(tar_path, "rb") as f:
        _mkfs(*args, tmp_path / "b.img", "-", input=f.read())
    assert (tmp_path / "a.img").read_bytes() == (tmp_path / "b.img").read_bytes()
    with mounted(tmp_path / "a.img", f"device={tar_path}" if mode == "i" else None) as mnt:
        for dirpath, dirs, files in os.walk(mnt):
            for n in [dirpath] + [os.path.join(dirpath, x) for x in dirs + files]:
                st = os.lstat(n)
                assert (st.st_uid, st.st_gid, st.st_mtime) == (5, 6, 1000), n
    _mkfs(f"--tar={mode}", "--all-root", tmp_path / "c.img", tar_path)
    with mounted(tmp_path / "c.img", f"device={tar_path}" if mode == "i" else None) as mnt:
        assert os.lstat(os.path.join(mnt, "small")).st_uid == 0


def test_containerd_tar_index_invocation(tmp_path, rich):
    """containerd's EROFS differ (tar index mode): `--tar=i --aufs --quiet IMAGE` with
    the layer on stdin (teed to a file by the caller), then the tar appended to the
    index; the result mounts alone."""
    tar_path = _tar(rich, tmp_path / "l.tar")
    layer = tmp_path / "layer.erofs"
    with open(tar_path, "rb") as f:
        p = _mkfs("--tar=i", "--aufs", "--quiet", layer, input=f.read())
    assert p.stdout == b"" and p.stderr == b""
    with open(layer, "ab") as out, open(tar_path, "rb") as f:
        shutil.copyfileobj(f, out)
    ref = _ref(tar_path, str(tmp_path / "ref"))
    with mounted(layer) as mnt:
        _same(ref, mnt)


def test_containerd_full_image_invocation(tmp_path, rich):
    """containerd's EROFS differ (full image mode): `--tar=f --aufs --quiet
    -Enoinline_data IMAGE` with the layer on stdin: no file tail inline, the image
    equals the tar extracted, fsck.erofs passes."""
    from erofs_tools.format import erofs as FE
    from erofs_tools.reader.image import Image
    tar_path = _tar(rich, tmp_path / "l.tar")
    layer = tmp_path / "layer.erofs"
    with open(tar_path, "rb") as f:
        p = _mkfs("--tar=f", "--aufs", "--quiet", "-Enoinline_data", layer, input=f.read())
    assert p.stdout == b"" and p.stderr == b""
    img = Image(str(layer))
    regs = [ino for _p, _d, ino in img.walk() if stat.S_ISREG(ino.mode) and ino.size]
    assert regs and all(ino.layout != FE.LAYOUT_FLAT_INLINE for ino in regs)
    fsck(layer)
    ref = _ref(tar_path, str(tmp_path / "ref"))
    with mounted(layer) as mnt:
        _same(ref, mnt)
