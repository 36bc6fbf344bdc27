"""mkfs --incremental[=data|rvsp|0] (and --clean), as mkfs.erofs 1.9.4 builds: a base
image plus one and two layers (a directory with overlayfs whiteouts and opaque xattrs,
or a tar with OCI `.wh.` entries read with --tar=f --aufs) mounted by the host kernel
and compared, with full metadata, with the layers extracted in order over the base's
tree; fsck.erofs 1.9.4 passes; the base's bytes stay (every regular file's blocks the
same, the only other changes the superblock, the old root record, the `..` entries
of kept directories and the nlink of hardlinked files that lost a link); against mkfs.erofs 1.9.4's incremental image of the same inputs:
the same tree when mounted, the size ratio printed and at most 1.0; a bad base (not
EROFS, truncated, missing) and unsupported options get one line, exit 1, the base
untouched. Before this, mkfs rejected --incremental and --clean ("No such option"), so
each test failed on the code before it."""
import hashlib
import os
import random
import shutil
import stat
import subprocess
import sys

import pytest
from helpers import (
    MS_RDONLY,
    assert_size_vs_anchor,
    compare_trees,
    fsck,
    is_root,
    mounted,
    require,
    require_tool,
    run_erofs_tools,
    run_mkfs,
    sys_mount,
    sys_umount,
)
from test_mkfs_tar import _tar as make_tar

from erofs_tools.format import erofs as E
from erofs_tools.reader.image import open_image

OPQ = "trusted.overlay.opaque"
PYLIB = "/usr/lib/python3.11"


# ---------------------------------------------------------------- layer trees ----

def _w(path, data, mode=0o644, mtime=1_600_000_000, uid=0, gid=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    os.chown(path, uid, gid)
    os.utime(path, (mtime, mtime))


def _wh(form, d, name):
    """A whiteout of NAME in directory d: overlayfs's char 0:0, or OCI's .wh.NAME."""
    os.makedirs(d, exist_ok=True)
    if form == "ovl":
        os.mknod(os.path.join(d, name), stat.S_IFCHR | 0o600, os.makedev(0, 0))
    else:
        _w(os.path.join(d, ".wh." + name), b"")


def _opq(form, d):
    os.makedirs(d, exist_ok=True)
    if form == "ovl":
        os.setxattr(d, OPQ, b"y")
    else:
        _w(os.path.join(d, ".wh..wh..opq"), b"")


def write_base(root, big=False):
    """Files of many sizes, xattrs, hardlinks, symlinks, devices, a fifo, a directory of
    300 entries (its blocks), nested directories; `big`: a 3 MiB file too, so that the
    new root's nid passes 16 bits and it takes the base root's place."""
    _w(f"{root}/etc/conf", b"conf\n" * 10)
    _w(f"{root}/etc/gone", b"to be whited out\n")
    _w(f"{root}/etc/over", b"old " * 3000)
    os.setxattr(f"{root}/etc/conf", "user.tag", b"base")
    os.setxattr(f"{root}/etc", "trusted.dirmark", b"etc")
    for i in range(300):
        _w(f"{root}/many/file-{i:04d}-with-a-longer-name", bytes([i % 251]) * (i * 37 % 5000))
    _w(f"{root}/opq/a", b"a")
    _w(f"{root}/opq/sub/b", b"b" * 5000)
    _w(f"{root}/f2d", b"file becomes a directory")
    _w(f"{root}/d2f/x/y", b"directory becomes a file")
    _w(f"{root}/deep/a/b/c/d", b"deep" * 900)
    _w(f"{root}/deep/keep", b"keep")
    _w(f"{root}/links/one", b"linked" * 100)
    os.link(f"{root}/links/one", f"{root}/links/two")
    os.symlink("../etc/conf", f"{root}/links/sym")
    os.symlink("x" * 300, f"{root}/links/longsym")
    os.mknod(f"{root}/dev-null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mkfifo(f"{root}/fifo")
    for p in ("links/sym", "links/longsym", "dev-null", "fifo"):   # (whole seconds: the
        os.utime(f"{root}/{p}", (1_600_000_050, 1_600_000_050),   # 48-bit layout's compact
                 follow_symlinks=False)                           # inodes keep no nsec)
    _w(f"{root}/owned", b"owned", uid=70000, gid=5, mode=0o600)
    if big:
        _w(f"{root}/big", random.Random(2).randbytes(3 << 20))
    os.chmod(root, 0o755)
    os.utime(f"{root}/many", (1_600_000_100, 1_600_000_100))


def write_layer1(root, form):
    """Adds, overwrites, deletes, an opaque directory, hardlinks, xattrs, a file
    replaced by a directory and a directory by a file, a new directory in a kept one."""
    os.makedirs(root)
    _w(f"{root}/etc/over", b"new " * 1500, mode=0o640)
    _w(f"{root}/etc/added", b"added\n")
    os.setxattr(f"{root}/etc/added", "user.tag", b"layer1")
    os.setxattr(f"{root}/etc", "user.layer", b"1")
    _wh(form, f"{root}/etc", "gone")
    _opq(form, f"{root}/opq")
    _w(f"{root}/opq/fresh", b"fresh")
    _w(f"{root}/f2d/now-a-dir", b"inside")
    _w(f"{root}/d2f", b"now a file " * 500)
    _w(f"{root}/deep/a/b/new", b"new deep")
    _w(f"{root}/hl/x", random.Random(1).randbytes(9000))
    os.link(f"{root}/hl/x", f"{root}/hl/y")
    os.link(f"{root}/hl/x", f"{root}/hl2")
    os.symlink("hl/x", f"{root}/hl-sym")
    _w(f"{root}/many/file-0007-with-a-longer-name", b"replaced")
    _wh(form, f"{root}/many", "file-0008-with-a-longer-name")
    _wh(form, f"{root}/links", "two")
    os.mknod(f"{root}/blk", stat.S_IFBLK | 0o600, os.makedev(8, 1))
    for p in ("blk", "hl-sym"):
        os.utime(f"{root}/{p}", (1_600_000_150, 1_600_000_150), follow_symlinks=False)
    for d in ("etc", "opq", "f2d", "deep/a/b", "deep/a", "deep", "hl", "many", "links"):
        os.utime(f"{root}/{d}", (1_600_000_200, 1_600_000_200))
    os.utime(root, (1_600_000_300, 1_600_000_300))


def write_layer2(root, form):
    os.makedirs(root)
    _w(f"{root}/etc/added", b"added again, longer " * 400)
    _wh(form, f"{root}/opq", "fresh")
    _w(f"{root}/f2d", b"a file again")
    _wh(form, f"{root}/deep", "a")
    _w(f"{root}/hl/z", b"z")
    _w(f"{root}/l2/" + "n" * 200, b"long name")
    _wh(form, root, "fifo")
    for d in ("etc", "opq", "deep", "hl", "l2"):
        os.utime(f"{root}/{d}", (1_600_000_400, 1_600_000_400))
    os.utime(root, (1_600_000_500, 1_600_000_500))


# ----------------------------------------------- the layers extracted in order ----

def _is_wh(st):
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _rm(p):
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p)
    elif os.path.lexists(p):
        os.unlink(p)


def _meta(src, dst, st):
    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
        for k in os.listxattr(dst):
            os.removexattr(dst, k)
        for k in os.listxattr(src):
            if k != OPQ:
                os.setxattr(dst, k, os.getxattr(src, k))
    os.utime(dst, ns=(st.st_mtime_ns, st.st_mtime_ns), follow_symlinks=False)


def apply_layer(layer, dest):
    """An overlayfs-form layer over the tree `dest`, as extracting it in order does."""
    links = {}

    def walk(src, dst):
        if os.getxattr(src, OPQ, follow_symlinks=False) == b"y" if OPQ in os.listxattr(src) else False:
            for name in os.listdir(dst):
                _rm(os.path.join(dst, name))
        for name in sorted(os.listdir(src)):
            s, d = os.path.join(src, name), os.path.join(dst, name)
            st = os.lstat(s)
            if _is_wh(st):
                _rm(d)
                continue
            if stat.S_ISDIR(st.st_mode):
                if os.path.lexists(d) and (os.path.islink(d) or not os.path.isdir(d)):
                    _rm(d)
                if not os.path.lexists(d):
                    os.mkdir(d)
                walk(s, d)
                continue
            _rm(d)
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in links:
                os.link(links[key], d)
                continue
            if stat.S_ISREG(st.st_mode):
                shutil.copyfile(s, d)
            elif stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(s), d)
            elif stat.S_ISFIFO(st.st_mode):
                os.mkfifo(d)
            else:
                os.mknod(d, st.st_mode, st.st_rdev)
            _meta(s, d, st)
            links[key] = d
        _meta(src, dst, os.lstat(src))

    walk(layer, dest)


@pytest.fixture(scope="module", params=["small", "big"])
def layers(request, tmp_path_factory):
    """base, layer1, layer2 in both forms, and the expected trees after 1 and 2 (root:
    devices, whiteouts, owners and trusted. xattrs)."""
    require(is_root(), "needs root (devices, owners, trusted. xattrs in the layers)")
    t = tmp_path_factory.mktemp(f"incr-{request.param}")
    base = str(t / "base")
    write_base(base, big=request.param == "big")
    out = {"base": base, "dir": t, "kind": request.param}
    for form in ("ovl", "oci"):
        write_layer1(str(t / f"l1-{form}"), form)
        write_layer2(str(t / f"l2-{form}"), form)
        out[f"l1-{form}"], out[f"l2-{form}"] = str(t / f"l1-{form}"), str(t / f"l2-{form}")
    for n in (1, 2):
        exp = str(t / f"expected{n}")
        subprocess.run(["cp", "-a", base if n == 1 else str(t / "expected1"), exp],
                       check=True)
        apply_layer(out[f"l{n}-ovl"], exp)
        out[f"expected{n}"] = exp
    return out


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _incremental(img, layer, *args):
    return run_mkfs(img, layer, "--incremental", "--ovlfs-strip", *args)


def assert_base_kept(base_img, new_img):
    """The base's bytes are a prefix of the new image: every regular file's blocks the
    same; what differs lies in the superblock, the old root record or a directory's
    entries (its `..`) or a hardlinked inode (its nlink)."""
    with open(base_img, "rb") as f:
        old = f.read()
    with open(new_img, "rb") as f:
        new = f.read(len(old))
    allowed = [(E.SUPER_OFFSET, E.SUPER_OFFSET + E.SuperBlock.SIZE)]
    with open_image(base_img) as img:
        bs = img.blksz
        root = img.inode(img.root_nid)
        allowed.append((root.offset, root.data_end + root.size % bs))
        for _path, _d, ino in img.walk():
            if ino.is_reg() and ino.size and ino.layout in (0, 2):
                a = ino.startblk * bs
                n = ino.size // bs * bs if ino.layout == 2 else -(-ino.size // bs) * bs
                assert old[a:a + n] == new[a:a + n]
            if not ino.is_dir() and ino.nlink > 1:      # (its nlink, when links went)
                allowed.append((ino.offset, ino.offset + ino.inode_size))
            if ino.is_dir():
                if ino.size // bs:
                    a = ino.startblk * bs
                    allowed.append((a, a + ino.size // bs * bs))
                allowed.append((ino.data_end, ino.data_end + ino.size % bs))
    changed = [i for i in range(0, len(old), 4096) if old[i:i + 4096] != new[i:i + 4096]]
    for blk in changed:
        for i in range(blk, min(blk + 4096, len(old))):
            if old[i] != new[i]:
                assert any(a <= i < b for a, b in allowed), f"base byte {i} changed"


@pytest.mark.parametrize("form", ["dir", "tar"])
def test_two_layers_mount_and_compare(root_kernel, layers, tmp_path, form):
    img = str(tmp_path / "img")
    run_mkfs(img, layers["base"])
    base_copy = str(tmp_path / "base.img")
    shutil.copyfile(img, base_copy)
    for n in (1, 2):
        before = str(tmp_path / f"before{n}.img")
        shutil.copyfile(img, before)
        if form == "dir":
            _incremental(img, layers[f"l{n}-ovl"])
        else:
            tar = make_tar(layers[f"l{n}-oci"], tmp_path / f"l{n}.tar")
            _incremental(img, tar, "--tar=f", "--aufs")
        fsck(img)
        run_erofs_tools("check", img)
        with mounted(img) as mnt:
            diffs = compare_trees(layers[f"expected{n}"], mnt)
            assert diffs == [], "\n".join(diffs[:40])
        assert_base_kept(before, img)
    assert_base_kept(base_copy, img)


def test_whiteouts_kept_without_strip(root_kernel, layers, tmp_path):
    """Without --ovlfs-strip the layer's whiteouts stay in the image, shadowing the base
    entries (an overlayfs lower layer), their directories marked, as mkfs.erofs 1.9.4."""
    img = str(tmp_path / "img")
    run_mkfs(img, layers["base"])
    run_mkfs(img, layers["l1-ovl"], "--incremental")
    fsck(img)
    with mounted(img) as mnt:
        st = os.lstat(f"{mnt}/etc/gone")
        assert _is_wh(st)
        assert os.getxattr(f"{mnt}/etc", "trusted.overlay.origin") == b""
        assert os.getxattr(f"{mnt}/opq", OPQ) == b"y"
        assert sorted(os.listdir(f"{mnt}/opq")) == ["fresh"]
        assert os.path.exists(f"{mnt}/etc/conf")


@pytest.mark.parametrize("form", ["dir", "tar"])
def test_kept_whiteouts_as_overlayfs_lower(root_kernel, layers, tmp_path, form):
    """Two layers without --ovlfs-strip: the image, as overlayfs's lower layer, shows
    the layers extracted in order (overlayfs hides the whiteouts and what they name, and
    what an opaque directory hides)."""
    img = str(tmp_path / "img")
    run_mkfs(img, layers["base"])
    for n in (1, 2):
        if form == "dir":
            run_mkfs(img, layers[f"l{n}-ovl"], "--incremental")
        else:
            tar = make_tar(layers[f"l{n}-oci"], tmp_path / f"l{n}.tar")
            run_mkfs(img, tar, "--incremental", "--tar=f", "--aufs")
    fsck(img)
    empty, ovl = tmp_path / "empty", tmp_path / "ovl"
    empty.mkdir()
    ovl.mkdir()
    with mounted(img) as mnt:
        sys_mount("overlay", str(ovl), "overlay", MS_RDONLY, f"lowerdir={mnt}:{empty}")
        try:
            diffs = compare_trees(layers["expected2"], str(ovl))
        finally:
            sys_umount(str(ovl))
    assert diffs == [], "\n".join(diffs[:40])


def test_rvsp_reserves_tar_data(root_kernel, layers, tmp_path):
    """--incremental=rvsp with a tar layer: the files' blocks reserved, read as zeros,
    the tree otherwise the layer's; the same tree as mkfs.erofs 1.9.4's."""
    tar = make_tar(layers["l1-oci"], tmp_path / "l1.tar")
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    run_mkfs(ours, layers["base"], "-T", "0", "-U", "clear")
    shutil.copyfile(ours, theirs)
    run_mkfs(ours, tar, "-T", "0", "--incremental=rvsp", "--tar=f", "--aufs", "--ovlfs-strip")
    _anchor_incr(theirs, tar, "-T0", "--incremental=rvsp", "--tar=f", "--aufs",
                 "--ovlfs-strip")
    fsck(ours, extract=False)
    with mounted(ours) as a, mounted(theirs) as b:
        with open(f"{a}/d2f", "rb") as f:
            assert f.read() == bytes(os.path.getsize(f"{layers['l1-ovl']}/d2f"))
        diffs = compare_trees(b, a, content=True)
        assert diffs == [], "\n".join(diffs[:40])


def _anchor_incr(img, source, *args):
    require_tool("mkfs.erofs")
    subprocess.run(["mkfs.erofs", "--quiet", *args, img, source], check=True,
                   capture_output=True)


@pytest.mark.parametrize("form", ["dir", "tar"])
def test_same_tree_as_mkfs_erofs(root_kernel, layers, tmp_path, form):
    """The same base (mkfs.erofs 1.9.4's and ours), the same two layers: the same tree
    when mounted; our image at most the size of mkfs.erofs 1.9.4's."""
    require_tool("mkfs.erofs")
    for base_by in ("ours", "theirs"):
        ours, theirs = str(tmp_path / f"o-{base_by}"), str(tmp_path / f"t-{base_by}")
        if base_by == "ours":
            run_mkfs(ours, layers["base"], "-T", "0", "-U", "clear")
        else:
            subprocess.run(["mkfs.erofs", "--quiet", "-T0", "-Uclear", ours, layers["base"]],
                           check=True, capture_output=True)
        shutil.copyfile(ours, theirs)
        for n in (1, 2):
            if form == "dir":
                args, src = (), layers[f"l{n}-ovl"]
            else:
                args, src = ("--tar=f", "--aufs"), make_tar(layers[f"l{n}-oci"],
                                                           tmp_path / f"l{n}.tar")
            # (-T0 for both: mkfs.erofs 1.9.4 writes the new build time into the
            # superblock, which moves the base's compact inodes' mtimes with it)
            run_mkfs(ours, src, "-T", "0", "--incremental", "--ovlfs-strip", *args)
            _anchor_incr(theirs, src, "-T0", "--incremental", "--ovlfs-strip", *args)
        fsck(ours)
        with mounted(ours) as a, mounted(theirs) as b:
            # (mkfs.erofs 1.9.4 gives a tar's root its own metadata; from a directory
            # it takes an opaque xattr for no more than an xattr, the base entries
            # show through: ours hides them, as overlayfs does and the tar form has it)
            skip = (".:",) if form == "tar" else (".:", "opq/")
            diffs = [d for d in compare_trees(b, a) if not d.startswith(skip)]
            assert diffs == [], "\n".join(diffs[:40])
        assert_size_vs_anchor(ours, theirs, f"incremental {form} on {base_by} base")


def test_pylib_size_against_mkfs_erofs(root_kernel, tmp_path):
    """A base of three packages of /usr/lib/python3.11, a layer adding two more and
    replacing a file: the same tree as mkfs.erofs 1.9.4's, the size ratio printed."""
    require_tool("mkfs.erofs")
    base, layer = tmp_path / "b", tmp_path / "l"
    base.mkdir()
    (layer / "email").mkdir(parents=True)
    for d in ("email", "json", "http"):
        shutil.copytree(f"{PYLIB}/{d}", base / d, symlinks=True)
    for d in ("asyncio", "xml"):
        shutil.copytree(f"{PYLIB}/{d}", layer / d, symlinks=True)
    shutil.copy2(f"{PYLIB}/email/_parseaddr.py", layer / "email")
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    subprocess.run(["mkfs.erofs", "--quiet", "-T0", "-Uclear", ours, str(base)], check=True,
                   capture_output=True)
    shutil.copyfile(ours, theirs)
    run_mkfs(ours, str(layer), "-T", "0", "--incremental")
    _anchor_incr(theirs, str(layer), "-T0", "--incremental")
    fsck(ours)
    with mounted(ours) as a, mounted(theirs) as b:
        assert compare_trees(b, a) == []
    assert_size_vs_anchor(ours, theirs, "pylib incremental")


def test_clean_is_a_full_build(tmp_path, layers):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_mkfs(a, layers["base"], "-T", "0", "-U", "clear")
    run_mkfs(b, layers["base"], "-T", "0", "-U", "clear", "--clean")
    assert _sha(a) == _sha(b)
    run_mkfs(b, layers["base"], "-T", "0", "-U", "clear", "--incremental", "--clean=data")
    assert _sha(a) == _sha(b)


@pytest.mark.parametrize("bad", ["not-erofs", "truncated", "missing", "empty"])
def test_bad_base_refused(tmp_path, layers, bad):
    img = str(tmp_path / "img")
    if bad == "not-erofs":
        with open(img, "wb") as f:
            f.write(os.urandom(20000))
    elif bad == "truncated":
        run_mkfs(img, layers["base"])
        with open(img, "r+b") as f:
            f.truncate(os.path.getsize(img) // 2)
    elif bad == "empty":
        open(img, "wb").close()
    before = _sha(img) if bad != "missing" else None
    p = run_mkfs(img, layers["l1-ovl"], "--incremental", check=False)
    assert p.returncode == 1
    err = p.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    if before is None:
        assert not os.path.exists(img)
    else:
        assert _sha(img) == before
    assert sorted(os.listdir(tmp_path)) == (["img"] if before else [])


@pytest.mark.parametrize("args", [("-z", "lzma"), ("--chunksize=4096",), ("--tar=i",),
                                  ("-E", "48bit"), ("--incremental=bogus",), ("--MZ",),
                                  ("--MZ=i",)])
def test_unsupported_refused(tmp_path, layers, args):
    img = str(tmp_path / "img")
    run_mkfs(img, layers["base"])
    before = _sha(img)
    p = run_mkfs(img, layers["l1-ovl"], "--incremental", *args, check=False)
    assert p.returncode == 1
    err = p.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert _sha(img) == before


def test_failure_midway_leaves_base(tmp_path, layers, monkeypatch):
    """An error while the new blocks are written (here: the third pwrite fails) leaves
    the base image as it was and no temporary file behind."""
    from erofs_tools.builder import incr_write
    from erofs_tools.builder.incremental import mkfs_incremental
    from erofs_tools.builder.options import MkfsOptions
    img = str(tmp_path / "img")
    run_mkfs(img, layers["base"])
    before = _sha(img)
    calls = []
    real = incr_write._pwrite

    def failing(fd, data, off):
        calls.append(off)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(fd, data, off)

    monkeypatch.setattr(incr_write, "_pwrite", failing)
    with pytest.raises(OSError):
        mkfs_incremental(img, layers["l1-ovl"], MkfsOptions(whiteouts="strip"))
    assert _sha(img) == before
    assert os.listdir(tmp_path) == ["img"]


@pytest.mark.parametrize("zargs", [("-z", "lz4hc"), ("-z", "lz4hc", "-E", "fragments,ztailpacking"),
                                   ("-z", "lzma", "-E", "dedupe"), ("--chunksize=4096",),
                                   ("-E", "force-inode-extended", "-b", "1024"),
                                   ("-E", "48bit"), ("anchor", "-Edot-omitted"), ("-Edot-omitted",), ("-m", "4096"),
                                   ("-z", "lz4hc", "-m", "4096"), ("-b", "1024", "-m", "1024")])
def test_layers_over_other_bases(root_kernel, layers, tmp_path, zargs):
    """Compressed, chunk-based, extended-inode, 1 KiB-block and 48-bit layout bases
    (`dot-omitted` too, mkfs.erofs 1.9.4's), metadata-compressed (-m, plain and lz4hc;
    mkfs.erofs 1.9.4 refuses them: every kept directory rewritten plain outside the
    metabox, whose records cannot be updated in place): their files are kept as they are (only directories are read),
    the layers' files written plain (48-bit: compact inodes with their mtimes from the
    base's epoch, the root nid in rootnid_8b when it passes 16 bits)."""
    require_tool("mkfs.erofs")
    img = str(tmp_path / "img")
    if zargs[0] == "anchor":    # (mkfs.erofs 1.9.4's dot-omitted base, and ours)
        subprocess.run(["mkfs.erofs", "--quiet", *zargs[1:], img, layers["base"]],
                       check=True, capture_output=True)
    else:
        run_mkfs(img, layers["base"], *zargs)
    for n in (1, 2):
        _incremental(img, layers[f"l{n}-ovl"])
    fsck(img)
    with mounted(img) as mnt:
        diffs = compare_trees(layers["expected2"], mnt)
        assert diffs == [], "\n".join(diffs[:40])


def test_zdir_base(root_kernel, layers, tmp_path):
    """A base whose directories are compressed (--zD; mkfs.erofs 1.9.4 refuses it: a
    kept directory's `..` cannot be updated in place): each kept one under a rewritten
    directory is rewritten plain (its files kept), so the tree is right and fsck passes."""
    img = str(tmp_path / "img")
    run_mkfs(img, layers["base"], "--zD")
    for n in (1, 2):
        _incremental(img, layers[f"l{n}-ovl"])
    fsck(img)
    run_erofs_tools("check", img)
    with mounted(img) as mnt:
        diffs = compare_trees(layers["expected2"], mnt)
        assert diffs == [], "\n".join(diffs[:40])


def test_tar_layers_gzip_and_stdin(root_kernel, layers, tmp_path):
    """A gzip layer (--ungzip) and one on stdin (spooled): the same tree; the summary
    line counts what was added; no spool left beside the image."""
    img = str(tmp_path / "img")
    run_mkfs(img, layers["base"])
    tgz = make_tar(layers["l1-oci"], tmp_path / "l1.tgz", gz=True)
    _incremental(img, tgz, "--tar=f", "--aufs", "--ungzip")
    tar = make_tar(layers["l2-oci"], tmp_path / "l2.tar")
    with open(tar, "rb") as f:
        p = subprocess.run([sys.executable, "-m", "erofs_tools", "mkfs", "--incremental",
                            "--ovlfs-strip", "--tar=f", "--aufs", img, "-"], stdin=f,
                           capture_output=True, text=True, check=True)
    assert "inodes added" in p.stdout and "new)" in p.stdout
    assert sorted(os.listdir(tmp_path)) == ["img", "l1.tgz", "l2.tar"]
    fsck(img)
    with mounted(img) as mnt:
        diffs = compare_trees(layers["expected2"], mnt)
        assert diffs == [], "\n".join(diffs[:40])


def test_symlinked_image_keeps_owner_and_mode(tmp_path, layers):
    """IMAGE a symlink: the image it names is built on (the link stays a link), with the
    base file's owner and mode."""
    real = str(tmp_path / "real.img")
    run_mkfs(real, layers["base"])
    os.chown(real, 1234, 5678)
    os.chmod(real, 0o640)
    link = str(tmp_path / "link.img")
    os.symlink("real.img", link)
    before = os.path.getsize(real)
    run_mkfs(link, layers["l1-ovl"], "--incremental")
    assert os.path.islink(link) and os.path.getsize(real) > before
    st = os.stat(real)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o640)
    run_erofs_tools("check", real)


@pytest.mark.parametrize("opt", ["noinline_data", "force-inode-extended"])
def test_layer_extended_options(root_kernel, layers, tmp_path, opt):
    """-E noinline_data: the layer's regular files' data in whole blocks only;
    -E force-inode-extended: every new inode 64 bytes. The tree as without them."""
    img = str(tmp_path / "img")
    run_mkfs(img, layers["base"])
    base_size = os.path.getsize(img)
    _incremental(img, layers["l1-ovl"], "-E", opt)
    fsck(img)
    with mounted(img) as mnt:
        assert compare_trees(layers["expected1"], mnt) == []
    with open_image(img) as im:
        new = [ino for _p, _d, ino in im.walk() if ino.offset >= base_size]
        assert new
        if opt == "noinline_data":
            assert all(ino.layout == 0 for ino in new if ino.is_reg())
        else:
            assert all(ino.inode_size == 64 for ino in new)


def test_clean_rvsp_tar(root_kernel, layers, tmp_path):
    """--clean=rvsp --tar=f: a full build whose files' blocks are reserved, not written
    (they read as zeros), as mkfs.erofs 1.9.4's: the same tree mounted, at most one
    block more (the empty root the layer is laid over)."""
    tar = make_tar(layers["l1-oci"], tmp_path / "l1.tar")
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    run_mkfs(ours, tar, "-T", "0", "--clean=rvsp", "--tar=f", "--aufs")
    _anchor_incr(theirs, tar, "-T0", "--clean=rvsp", "--tar=f", "--aufs")
    fsck(ours, extract=False)
    with mounted(ours) as a, mounted(theirs) as b:
        assert compare_trees(b, a) == []
        with open(f"{a}/hl/x", "rb") as f:
            assert f.read() == bytes(9000)
    assert os.path.getsize(ours) <= os.path.getsize(theirs) + 4096
    assert sorted(os.listdir(tmp_path)) == ["l1.tar", "ours", "theirs"]


def test_layer_excludes(root_kernel, layers, tmp_path):
    """--exclude-path / --exclude-regex leave the layer's paths out, as a full build
    does (the base's entries of those names stay)."""
    img = str(tmp_path / "img")
    run_mkfs(img, layers["base"])
    _incremental(img, layers["l1-ovl"], "--exclude-path", "etc/added",
                 "--exclude-regex", "^hl", "--exclude-path", "etc/over")
    with mounted(img) as mnt:
        diffs = compare_trees(layers["expected1"], mnt, ignore=("sha256", "size", "mode",
                                                                 "mtime_ns"))
        assert sorted(diffs) == sorted(f"{p}: missing entry" for p in (
            "etc/added", "hl", "hl/x", "hl/y", "hl2", "hl-sym"))
        with open(f"{mnt}/etc/over", "rb") as f:
            assert f.read() == b"old " * 3000           # (the base's)


def test_zero_and_numbers_are_data(tmp_path, layers):
    """--incremental=0 (mkfs.erofs zero-fills only its S3 source) and =1 write the data:
    the same bytes as --incremental=data and a bare --incremental (the base's UUID and
    build time kept, the layout fixed: byte for byte reproducible)."""
    img = str(tmp_path / "base")
    run_mkfs(img, layers["base"])
    sums = set()
    for mode in ("", "=data", "=0", "=1"):
        out = str(tmp_path / f"img{mode}")
        shutil.copyfile(img, out)
        run_mkfs(out, layers["l1-ovl"], f"--incremental{mode}")
        sums.add(_sha(out))
    assert len(sums) == 1


def test_kept_whiteouts_same_as_mkfs_erofs(root_kernel, layers, tmp_path):
    """Two tar layers (--aufs) without --ovlfs-strip: the raw mounted tree (whiteouts,
    their directories' trusted.overlay.origin, opaque xattrs) the same as mkfs.erofs
    1.9.4's incremental image of the same base and layers. (On the big base 1.9.4 fails
    the second layer, "no enough room for the root inode": its root, in the base root's
    place since layer 1, cannot take the origin mark a whiteout at the root brings;
    ours keeps the place's whole room, test_kept_whiteouts_as_overlayfs_lower.)"""
    require_tool("mkfs.erofs")
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    run_mkfs(ours, layers["base"], "-T", "0", "-U", "clear")
    shutil.copyfile(ours, theirs)
    for n in (1, 2) if layers["kind"] == "small" else (1,):
        tar = make_tar(layers[f"l{n}-oci"], tmp_path / f"l{n}.tar")
        run_mkfs(ours, tar, "-T", "0", "--incremental", "--tar=f", "--aufs")
        _anchor_incr(theirs, tar, "-T0", "--incremental", "--tar=f", "--aufs")
    fsck(ours)
    with mounted(ours) as a, mounted(theirs) as b:
        assert compare_trees(b, a) == []
        assert _is_wh(os.lstat(f"{a}/etc/gone"))


def test_ignore_mtime(layers, tmp_path):
    """--ignore-mtime: a new inode extended only for its mtime is compact, its mtime the
    base's build time, as a full build's."""
    img = str(tmp_path / "img")
    run_mkfs(img, layers["base"], "-T", "0")
    base_size = os.path.getsize(img)
    _incremental(img, layers["l1-ovl"], "--ignore-mtime")
    with open_image(img) as im:
        new = [ino for _p, _d, ino in im.walk() if ino.offset >= base_size]
        assert new and all(ino.inode_size == 32 and ino.mtime == 0 for ino in new)
