"""mkfs --tar=i (index images: metadata only, the data stays in the tar) with --zD (every
directory whole in the packed inode, stored plain) and with -E48bit / -Edot-omitted (the
48-bit layout), alone and together, as mkfs.erofs 1.9.4 takes them. Both were refused
before with one line ("not with --tar=i"), so every test here failed on the code before
it. A layer tar (hardlinks, symlinks, a long symlink target and long names, xattrs,
devices, a fifo, a directory of long names over many 512-byte blocks, aufs whiteouts, a
sparse member) is indexed: the host kernel mounts the index with the tar as its extra
device and the index+tar concatenation alone, each compared with `tar -x` of the archive
(full metadata; the 48-bit layout's compact inodes keep whole seconds, as mkfs.erofs
1.9.4's); fsck.erofs 1.9.4 passes; our check and unpack read it back the same. With and
without --aufs (and --ungzip=FILE) the mount equals mkfs.erofs 1.9.4's index of the same
tar with the same options, and the index is no larger than 1.01 times its size (the
ratio is printed). A 5 GiB member, and a tar over 2 TiB (48-bit block addresses, turned
on by themselves as in mkfs.erofs 1.9.4; refused before), are read by the kernel past
4 GiB and past 2 TiB (their data holes of the tar file: cheap)."""
import gzip
import os
import subprocess

import pytest
from helpers import compare_trees, fsck, mounted, require_tool
from test_mkfs_tar import _ref, _tar
from test_tar import _rich_tree
from test_tar_helpers import check_and_unpack, index_layer, run_cli

from erofs_tools.format import erofs as E
from erofs_tools.reader.image import open_image
from erofs_tools.reader.zdata import is_compressed

pytestmark = pytest.mark.root

OPTS = [("--zD",), ("-E48bit",), ("--zD", "-E48bit"), ("-Edot-omitted", "--zD")]
IDS = ["zD", "48bit", "zD-48bit", "dot-omitted-zD"]


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    """-> (the layer tar with a sparse member, the same without it: mkfs.erofs 1.9.4 does
    not read sparse entries)"""
    base = tmp_path_factory.mktemp("tarix")
    src = base / "src"
    _rich_tree(str(src))
    many = src / "d" / "many"
    many.mkdir()
    for i in range(300):              # ~130 blocks of 512 bytes of dirents
        (many / (f"{i:04d}-" + "n" * 190)).write_bytes(b"%d\n" % i)
    (src / ".wh.gone").write_bytes(b"")          # aufs whiteouts (--aufs converts them)
    (src / "d" / "sub" / ".wh..wh..opq").write_bytes(b"")
    for p in (many, *many.iterdir(), src / ".wh.gone", src / "d" / "sub" / ".wh..wh..opq",
              src / "d" / "sub", src / "d"):
        os.utime(p, ns=(1, 1_650_000_000_123_456_789), follow_symlinks=False)
    full = _tar(src, base / "full.tar")
    plain = _tar(src, base / "plain.tar", extra=("--exclude=./sparse",))
    return full, plain


def _seconds_differ(ref, mnt):
    """-> paths whose mtime differs in whole seconds"""
    out = []
    for dirpath, dirs, files in os.walk(ref):
        for name in [""] + dirs + files:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, ref)
            if os.lstat(p).st_mtime_ns // 10**9 != os.lstat(os.path.join(mnt, rel)).st_mtime_ns // 10**9:
                out.append(rel)
    return out


def _same(ref, tree, opts):
    """`tree` equals `ref` with full metadata (48-bit: mtimes to the second)"""
    wide = any("48bit" in o or "dot-omitted" in o for o in opts)
    diffs = compare_trees(ref, tree, check_nlink=True, ignore=("mtime_ns",) if wide else ())
    assert not diffs, "\n".join(diffs[:40])
    if wide:
        assert _seconds_differ(ref, tree) == []


def _features(img, tar, opts):
    """the superblock and inodes say what the options asked for"""
    im = open_image(img, devices=[tar])
    sb = im.sb
    assert bool(sb.feature_incompat & E.FEATURE_INCOMPAT_48BIT) == (
        "-E48bit" in opts or "-Edot-omitted" in opts)
    dirs = [ino for _p, _d, ino in im.walk() if ino.is_dir()]
    nz = sum(is_compressed(ino) and ino.layout == E.LAYOUT_COMPRESSED_FULL for ino in dirs)
    assert nz == (len(dirs) if "--zD" in opts else 0)
    assert (sb.packed_nid != 0) == ("--zD" in opts)


@pytest.mark.parametrize("opts", OPTS, ids=IDS)
def test_index_equals_tar_x(tmp_path, layer, opts):
    """kernel (tar as device 1, and appended), fsck.erofs 1.9.4, our check and unpack"""
    tar = layer[0]
    idx = tmp_path / "l.idx"
    p = run_cli("mkfs", "--tar=i", *opts, idx, tar, check=False)
    assert p.returncode == 0, p.stderr
    fsck(idx, devices=[tar])
    _features(idx, tar, opts)
    ref = _ref(tar, str(tmp_path / "ref"))
    with mounted(idx, f"device={tar}") as mnt:
        _same(ref, mnt, opts)
        assert sorted(os.listdir(os.path.join(mnt, "d", "many")))[:1] == ["0000-" + "n" * 190]
        with open(os.path.join(mnt, "sparse"), "rb") as f:
            f.seek(5 << 20)
            assert f.read(10001) == b"A" * 10000 + b"\0"
    with mounted(index_layer(idx, tar, tmp_path / "layer.erofs")) as mnt:
        _same(ref, mnt, opts)
    # our reader: check, then unpack, of the index with the tar as its device
    _same(ref, str(check_and_unpack(idx, tar, tmp_path / "out")), opts)


@pytest.mark.parametrize("aufs", [False, True], ids=["plain", "aufs-ungzip"])
@pytest.mark.parametrize("opts", OPTS, ids=IDS)
def test_index_as_mkfs_erofs(tmp_path, layer, opts, aufs):
    """the same tree as mkfs.erofs 1.9.4's index of the same tar and options (with --aufs:
    from the gzip layer with --ungzip=FILE), within 1 % of its size"""
    require_tool("mkfs.erofs")
    plain = layer[1]
    src, flags = plain, ["--tar=i", *opts]
    if aufs:
        src = tmp_path / "l.tar.gz"
        with open(plain, "rb") as f:
            src.write_bytes(gzip.compress(f.read(), 1))
        flags.append("--aufs")
    dev = {"o": plain, "a": plain}
    for who in ("o", "a"):
        extra = [f"--ungzip={tmp_path / (who + '.tar')}"] if aufs else []
        if aufs:
            dev[who] = tmp_path / (who + ".tar")
        img = tmp_path / f"{who}.idx"
        if who == "o":
            p = run_cli("mkfs", "-q", *flags, *extra, img, src, check=False)
            assert p.returncode == 0, p.stderr
        else:
            subprocess.run(["mkfs.erofs", "--quiet", *flags, *extra, str(img), str(src)],
                           check=True)
        fsck(img, devices=[dev[who]])
    if aufs:
        assert (tmp_path / "o.tar").read_bytes() == (tmp_path / "a.tar").read_bytes()
    ours, theirs = tmp_path / "o.idx", tmp_path / "a.idx"
    _features(ours, dev["o"], opts)
    with mounted(ours, f"device={dev['o']}") as mnt, \
            mounted(theirs, f"device={dev['a']}") as amnt:
        diffs = compare_trees(amnt, mnt, check_nlink=True)
        assert not diffs, "\n".join(diffs[:40])
        names = os.listdir(mnt)
        if aufs:
            st = os.lstat(os.path.join(mnt, "gone"))
            assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (0, 0)
            assert os.getxattr(os.path.join(mnt, "d", "sub"), "trusted.overlay.opaque") == b"y"
        else:
            assert ".wh.gone" in names
    so, sa = os.path.getsize(ours), os.path.getsize(theirs)
    print(f"--tar=i {' '.join(opts)}{' --aufs --ungzip' if aufs else ''}: ours {so} bytes, "
          f"mkfs.erofs 1.9.4 {sa}, ratio {so / sa:.4f}")
    assert so <= sa * 1.01


def _hole_tar(tar, size, marks):
    """A tar of the root, a member "huge" of `size` bytes whose data is a hole of the tar
    file but for `marks` ({offset: bytes}), and a 6-byte file "after" past it."""
    import tarfile
    with open(tar, "wb") as f:
        ti = tarfile.TarInfo("./")        # (the root: not implied, as mkfs.erofs's differs)
        ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_650_000_000
        f.write(ti.tobuf(format=tarfile.PAX_FORMAT))
        ti = tarfile.TarInfo("huge")
        ti.size, ti.mtime, ti.mode = size, 1_650_000_000, 0o644
        f.write(ti.tobuf(format=tarfile.PAX_FORMAT))
        start = f.tell()
        for off, data in marks.items():
            f.seek(start + off)
            f.write(data)
        f.seek(start + size + (-size % 512))
        ti = tarfile.TarInfo("after")
        ti.size, ti.mtime, ti.mode = 6, 1_650_000_000, 0o644
        f.write(ti.tobuf(format=tarfile.PAX_FORMAT) + b"after\n".ljust(512, b"\0") + bytes(1024))


def test_index_member_over_4gib(tmp_path):
    """a 5 GiB member (its data a hole of the tar file: cheap), then a small one past it:
    `--tar=i --zD -E48bit` maps both (an extended inode, one chunk of 8 GiB), the kernel
    reads the marks at its start, past 4 GiB and at its end, and the small file after it;
    fsck.erofs 1.9.4 and our check pass; the same tree and size as mkfs.erofs 1.9.4's"""
    size = (5 << 30) + 1000
    tar = tmp_path / "big.tar"
    marks = {0: b"HEAD", (4 << 30) + 12345: b"MIDDLE", size - 4: b"TAIL"}
    _hole_tar(tar, size, marks)
    require_tool("mkfs.erofs")
    ours, theirs = tmp_path / "o.idx", tmp_path / "a.idx"
    p = run_cli("mkfs", "-q", "--tar=i", "--zD", "-E48bit", ours, tar, check=False)
    assert p.returncode == 0, p.stderr
    subprocess.run(["mkfs.erofs", "--quiet", "--tar=i", "--zD", "-E48bit", str(theirs),
                    str(tar)], check=True)
    fsck(ours, extract=False, devices=[tar])
    _features(ours, tar, ("--zD", "-E48bit"))
    p = run_cli("check", "--device", tar, ours, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    with mounted(ours, f"device={tar}") as mnt, mounted(theirs, f"device={tar}") as amnt:
        assert compare_trees(amnt, mnt, content=False, check_nlink=True) == []
        assert os.stat(os.path.join(mnt, "huge")).st_size == size
        with open(os.path.join(mnt, "huge"), "rb") as f:
            for off, data in marks.items():
                f.seek(off)
                assert f.read(len(data)) == data
            f.seek(3 << 30)
            assert f.read(1 << 16) == bytes(1 << 16)
        with open(os.path.join(mnt, "after"), "rb") as f:
            assert f.read() == b"after\n"
    assert os.path.getsize(ours) == os.path.getsize(theirs)


@pytest.mark.parametrize("opts", [(), ("--zD", "-E48bit")], ids=["auto", "zD-48bit"])
def test_index_tar_over_2tib(tmp_path, opts):
    """a tar over 2 TiB (a member of 2 TiB + 3 MiB, its data a hole of the tar file): its
    blocks past 2^32 need 48-bit addresses, which mkfs.erofs 1.9.4 turns on by itself,
    and so does this mkfs now (refused before: "tar larger than 2 TiB cannot be
    indexed", so this failed on the code before it); the chunk indexes past 2 TiB carry
    CHUNK_FORMAT_48BIT, the device slot blocks_hi. The kernel reads the marks before and
    past 2 TiB and the file after the member; fsck.erofs 1.9.4 and our check pass; the
    same tree and size as mkfs.erofs 1.9.4's"""
    size = (2 << 40) + (3 << 20) + 1000
    tar = tmp_path / "huge.tar"
    marks = {0: b"HEAD", (2 << 40) + 5: b"PAST2T", size - 4: b"TAIL"}
    _hole_tar(tar, size, marks)
    require_tool("mkfs.erofs")
    ours, theirs = tmp_path / "o.idx", tmp_path / "a.idx"
    p = run_cli("mkfs", "-q", "--tar=i", "--max-size", "3T", *opts, ours, tar, check=False)
    assert p.returncode == 0, p.stderr
    subprocess.run(["mkfs.erofs", "--quiet", "--tar=i", *opts, str(theirs), str(tar)],
                   check=True)
    fsck(ours, extract=False, devices=[tar])
    im = open_image(ours, devices=[tar])
    assert im.sb.feature_incompat & E.FEATURE_INCOMPAT_48BIT
    dev = im.devices[0]
    assert 1 << 32 < dev.blocks | dev.blocks_hi << 32 <= os.path.getsize(tar) // 512
    after = im.lookup("/after")
    assert im.read_data(after) == b"after\n"
    p = run_cli("check", "--device", tar, ours, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    with mounted(ours, f"device={tar}") as mnt, mounted(theirs, f"device={tar}") as amnt:
        # (without -E48bit mkfs.erofs 1.9.4 turns the layout on after writing compact
        # inodes for the old one: the kernel reads their mtimes 2^32 s late, 2158 for
        # 2022; ours keep the archive's)
        assert compare_trees(amnt, mnt, content=False, check_nlink=True,
                             ignore=() if opts else ("mtime_ns",)) == []
        for name in ("", "huge", "after"):
            assert os.lstat(os.path.join(mnt, name)).st_mtime_ns == 1_650_000_000 * 10**9
        assert os.stat(os.path.join(mnt, "huge")).st_size == size
        with open(os.path.join(mnt, "huge"), "rb") as f:
            for off, data in marks.items():
                f.seek(off)
                assert f.read(len(data)) == data
        with open(os.path.join(mnt, "after"), "rb") as f:
            assert f.read() == b"after\n"
    assert os.path.getsize(ours) == os.path.getsize(theirs)
