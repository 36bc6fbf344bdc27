"""mkfs.erofs 1.9 flags that image builders pass as they are, taken by `erofs-tools
mkfs`: containerd's EROFS differ's own command line (`--tar=f --aufs --quiet
-Enoinline_data --sort=none -U UUID IMAGE`, the tar on stdin), `-b SIZE`, `-T`
with `--mkfs-time` / `--all-time`, and SOURCE_DATE_EPOCH, which clamps the mtimes after
it (the reproducible-builds rule) as mkfs.erofs 1.9 does. Each image mounts with the
host kernel and compares with its source (or the tar extracted); fsck.erofs 1.9
passes."""
import os
import stat
import struct
import subprocess
import sys
import tarfile

import pytest
from helpers import (
    assert_same_tree,
    fsck,
    mkfs_and_check,
    mounted,
    require_tool,
    run_mkfs,
    text,
)

pytestmark = pytest.mark.root

OLD, SDE, NEW = 1_000_000_000, 1_500_000_000, 1_700_000_000


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Files and directories with mtimes before and after SDE (and nanoseconds)."""
    root = tmp_path_factory.mktemp("flags") / "src"
    (root / "d" / "e").mkdir(parents=True)
    for i, (name, t) in enumerate([("old", OLD), ("new", NEW), ("d/at", SDE),
                                   ("d/e/f", SDE - 1), ("d/big", NEW)]):
        (root / name).write_bytes(text(100 + i * 40000, i))
        os.utime(root / name, ns=(t * 10**9 + 123, t * 10**9 + 456789))
    os.symlink("old", root / "link")
    os.utime(root / "link", ns=(OLD * 10**9, OLD * 10**9), follow_symlinks=False)
    for d, t in (("d/e", OLD), ("d", NEW), (".", SDE + 5)):
        os.utime(root / d, ns=(t * 10**9 + 7, t * 10**9 + 7))
    return root


def sb_time_and_bits(image):
    with open(image, "rb") as f:
        f.seek(1024)
        sb = f.read(128)
    return struct.unpack_from("<Q", sb, 0x18)[0], sb[0x0C]      # build_time, blkszbits


def mtimes(mnt):
    out = {".": os.lstat(mnt).st_mtime_ns}
    for dp, dn, fn in os.walk(mnt):
        for n in dn + fn:
            p = os.path.join(dp, n)
            out[os.path.relpath(p, mnt)] = os.lstat(p).st_mtime_ns
    return out


def mkfs_env(image, source, *args, env=None):
    p = subprocess.run([sys.executable, "-m", "erofs_tools", "mkfs", "-q", *map(str, args),
                        os.fspath(image), os.fspath(source)],
                       env=dict(os.environ, **(env or {})), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return image


def test_containerd_differ_command_line(root_kernel, tree, tmp_path):
    """containerd's EROFS differ runs mkfs.erofs with these flags and the layer on stdin:
    the image equals the tar extracted, and --sort=none gives the image --sort=path does."""
    layer = tmp_path / "layer.tar"
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as t:
        t.add(tree, arcname=".")
    out = {}
    for sort in ("none", "path"):
        img = tmp_path / f"{sort}.img"
        with open(layer, "rb") as stdin:
            p = subprocess.run([sys.executable, "-m", "erofs_tools", "mkfs", "--tar=f",
                                "--aufs", "--quiet", "-Enoinline_data", f"--sort={sort}",
                                "-U", "550e8400-e29b-41d4-a716-446655440000", os.fspath(img)],
                               stdin=stdin, capture_output=True, text=True)
        assert p.returncode == 0 and p.stdout == "" and p.stderr == "", p
        out[sort] = img.read_bytes()
    assert out["none"] == out["path"]
    img = tmp_path / "none.img"
    fsck(img)
    with mounted(img) as mnt:
        # Python's tar writer keeps microseconds at best: the seconds compared apart
        assert_same_tree(tree, mnt, check_nlink=True, ignore={"mtime_ns"})
        assert seconds(mtimes(mnt)) == seconds(mtimes(os.fspath(tree)))


def seconds(times):
    return {k: v // 10**9 for k, v in times.items()}


@pytest.mark.parametrize("size", [512, 1024, 2048, 4096])
def test_block_size(root_kernel, tree, tmp_path, size):
    bits = size.bit_length() - 1
    plain = mkfs_and_check(tmp_path / "p.img", tree, "-b", size)
    packed = mkfs_and_check(tmp_path / "z.img", tree, f"-b{size}", "-z", "lz4hc",
                            "-C", 16384)
    layer = tmp_path / "l.tar"
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as t:
        t.add(tree, arcname=".")
    fromtar = tmp_path / "t.img"
    run_mkfs(fromtar, layer, "--tar=f", "-b", size)
    fsck(fromtar)
    with mounted(fromtar) as mnt:
        assert_same_tree(tree, mnt, ignore={"mtime_ns"})
    for img in (plain, packed, fromtar):
        assert sb_time_and_bits(img)[1] == bits
        assert img.stat().st_size % size == 0


def test_mkfs_time_keeps_the_files_mtimes(root_kernel, tree, tmp_path):
    img = mkfs_and_check(tmp_path / "m.img", tree, "-T", SDE, "--mkfs-time")
    assert sb_time_and_bits(img)[0] == SDE
    every = tmp_path / "a.img"
    run_mkfs(every, tree, "-T", SDE, "--all-time")
    with mounted(every) as mnt:
        assert set(mtimes(mnt).values()) == {SDE * 10**9}


def expected_clamped(tree):
    want = {}
    for rel, ns in mtimes(os.fspath(tree)).items():
        want[rel] = ns if ns < SDE * 10**9 else SDE * 10**9
    return want


@pytest.mark.parametrize("how", ["dir", "python-walk", "tar"])
def test_source_date_epoch_clamps(root_kernel, tree, tmp_path, how):
    """SOURCE_DATE_EPOCH: mtimes from before it stay (nanoseconds too), later ones (and
    one at it with nanoseconds) become it; the build time is it."""
    img = tmp_path / "s.img"
    env = {"SOURCE_DATE_EPOCH": str(SDE)}
    if how == "dir":
        mkfs_env(img, tree, env=env)
    elif how == "python-walk":           # an exclude takes the Python walk, not csrc/walk.c
        mkfs_env(img, tree, "--exclude-path", "nothing-here", env=env)
    else:
        layer = tmp_path / "l.tar"
        with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as t:
            t.add(tree, arcname=".")
        mkfs_env(img, layer, "--tar=f", env=env)
    fsck(img)
    assert sb_time_and_bits(img)[0] == SDE
    with mounted(img) as mnt:
        got = mtimes(mnt)
        assert_same_tree(tree, mnt, ignore={"mtime_ns"})
    if how == "tar":                     # the tar writer's microseconds: seconds only
        assert seconds(got) == seconds(expected_clamped(tree))
    else:
        assert got == expected_clamped(tree)


def test_source_date_epoch_as_mkfs_erofs(root_kernel, tree, tmp_path):
    """The same mtimes as mkfs.erofs 1.9 gives the same tree under SOURCE_DATE_EPOCH."""
    require_tool("mkfs.erofs")
    ours, ref = tmp_path / "o.img", tmp_path / "r.img"
    env = {"SOURCE_DATE_EPOCH": str(SDE)}
    mkfs_env(ours, tree, env=env)
    subprocess.run(["mkfs.erofs", "--quiet", os.fspath(ref), os.fspath(tree)],
                   env=dict(os.environ, **env), check=True, capture_output=True)
    with mounted(ours) as a, mounted(ref) as b:
        assert mtimes(a) == mtimes(b)


@pytest.mark.parametrize("args,msg", [
    (["-b", "8192"], "-b 8192: the block size must be 512, 1024, 2048 or 4096"),
    (["-b", "1000"], "-b 1000"),
    (["--tar=i", "-b", "4096"], "--tar=i images have 512-byte blocks"),
    (["--sort=random"], "'random' is not one of 'path', 'none'"),
])
def test_bad_flags(tree, tmp_path, args, msg):
    out = tmp_path / "out"
    out.mkdir()
    p = run_mkfs(out / "bad.img", tree, *args, check=False)
    assert p.returncode == 1, p
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], p.stderr
    assert os.listdir(out) == []


def test_extended_options_as_mkfs_erofs_names_them(root_kernel, tree, tmp_path):
    """-E force-inode-extended, nosbcrc, ^inline_data (= noinline_data), and ^NAME of an
    option that is off already."""
    from erofs_tools.format import erofs as E
    from erofs_tools.reader.image import Image
    img = mkfs_and_check(tmp_path / "e.img", tree, "-E", "force-inode-extended,nosbcrc",
                         "-E", "^inline_data,^ztailpacking")
    with Image(os.fspath(img)) as im:
        assert not im.sb.feature_compat & E.FEATURE_COMPAT_SB_CHKSUM
        inodes = [ino for _, _, ino in im.walk()]
        assert {ino.version for ino in inodes} == {1}                 # all extended
        # (regular files only, as mkfs.erofs: directories keep their tails inline)
        assert E.LAYOUT_FLAT_INLINE not in {ino.layout for ino in inodes
                                            if stat.S_ISREG(ino.mode)}
    again = mkfs_and_check(tmp_path / "i.img", tree, "-E", "noinline_data,^noinline_data")
    with Image(os.fspath(again)) as im:
        assert im.sb.feature_compat & E.FEATURE_COMPAT_SB_CHKSUM
        assert E.LAYOUT_FLAT_INLINE in {ino.layout for _, _, ino in im.walk()}
