"""More mkfs.erofs 1.9 flags taken by `erofs-tools mkfs` with mkfs.erofs's meaning:
--uid-offset/--gid-offset (after --force-uid/--force-gid/--all-root), --ignore-mtime /
--preserve-mtime, --hard-dereference, --mount-point, -x, -d. Each image mounts with
the host kernel and compares with its source (as the flag changes it) and with
mkfs.erofs 1.9.4's image of the same tree, through the C walk (csrc/walk.c), the Python
walk (an exclude takes it) and --tar=f where mkfs.erofs applies the flag there; bad
values are one `error:` line, exit 1, nothing written."""
import os
import subprocess
import tarfile

import pytest
from helpers import (
    assert_same_tree,
    fsck,
    is_root,
    mounted,
    require,
    require_tool,
    run_mkfs,
    scan_tree,
    text,
)

pytestmark = pytest.mark.root

T = 1_600_000_000
# the walks: csrc/walk.c; TreeWalker's own loop (an exclude of nothing takes it); a tar
WALKS = ["c", "python", "tar"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Owners above 65535 and below, hardlinks, mtimes other than T, xattrs."""
    require(is_root(), "needs root (chown)")
    root = tmp_path_factory.mktemp("flags19") / "src"
    (root / "d" / "e").mkdir(parents=True)
    for i, name in enumerate(["a", "b", "d/c", "d/e/f"]):
        (root / name).write_bytes(text(100 + i * 9000, i))
    os.link(root / "a", root / "d" / "a-link")
    os.link(root / "a", root / "d" / "e" / "a-link2")
    os.symlink("a", root / "sym")
    os.chown(root / "b", 1000, 2000)
    os.chown(root / "d", 70000, 80000)
    os.lchown(root / "sym", 5, 6)
    for name, value in (("a", b"1"), ("b", b"1"), ("d/c", b"1"), ("d", b"2")):
        os.setxattr(root / name, "user.x", value)
    os.setxattr(root / "d/e/f", "user.only", b"once")
    for i, name in enumerate(["a", "b", "d/c", "d/e/f", "d/e", "d", "."]):
        os.utime(root / name, ns=((T + i * 3) * 10**9 + 5,) * 2)
    os.utime(root / "sym", ns=(T * 10**9,) * 2, follow_symlinks=False)
    return root


def walk_args(walk):
    return ["--exclude-path", "no-such-path"] if walk == "python" else []


def build(tmp_path, name, tree, walk, *args):
    """Our image of `tree` through `walk` with these flags; -> path."""
    img = tmp_path / f"{name}-{walk}.img"
    if walk == "tar":
        layer = tmp_path / "layer.tar"
        if not layer.exists():
            with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as t:
                t.add(tree, arcname=".")
        run_mkfs(img, layer, "--tar=f", "-U", "clear", *map(str, args))
    else:
        run_mkfs(img, tree, "-U", "clear", *walk_args(walk), *map(str, args))
    fsck(img)
    return img


def reference(tmp_path, name, tree, *args, tar=False):
    """mkfs.erofs 1.9.4's image of the same source with the same flags."""
    require_tool("mkfs.erofs")
    img = tmp_path / f"{name}-ref.img"
    src = tree
    if tar:
        src = tmp_path / "layer.tar"
        args = ("--tar=f", *args)
    p = subprocess.run(["mkfs.erofs", "--quiet", "-U", "clear", *map(str, args),
                        os.fspath(img), os.fspath(src)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return img


def owners(mnt):
    return {rel: (r["uid"], r["gid"]) for rel, r in scan_tree(mnt, content=False).items()}


def shifted(tree, du, dg, force_uid=None, force_gid=None):
    return {rel: ((r["uid"] if force_uid is None else force_uid) + du,
                  (r["gid"] if force_gid is None else force_gid) + dg)
            for rel, r in scan_tree(tree, content=False).items()}


@pytest.mark.parametrize("walk", WALKS)
def test_id_offsets(root_kernel, tree, tmp_path, walk):
    """--uid-offset/--gid-offset add to every owner; after --force-uid/--force-gid and
    --all-root (mkfs.erofs's order), and the same owners as mkfs.erofs gives."""
    cases = [
        (["--uid-offset", "100000", "--gid-offset=0x10"], shifted(tree, 100000, 16)),
        (["--force-uid", "5", "--uid-offset", "10", "--gid-offset", "010"],
         shifted(tree, 10, 8, force_uid=5)),
        (["--all-root", "--gid-offset", "7"], shifted(tree, 0, 7, 0, 0)),
    ]
    for k, (args, want) in enumerate(cases):
        img = build(tmp_path, f"o{k}", tree, walk, *args)
        ref = reference(tmp_path, f"o{k}", tree, *args, tar=walk == "tar")
        with mounted(img) as mnt, mounted(ref) as rmnt:
            # (Python's tar writer keeps no xattrs)
            assert_same_tree(tree, mnt, ignore={"uid", "gid", "mtime_ns"} |
                             ({"xattr"} if walk == "tar" else set()))
            got = owners(mnt)
            assert got == want       # (the tar's root is its "." entry: offset too)
            assert got == owners(rmnt)


@pytest.mark.parametrize("walk", WALKS)
def test_id_offset_overflow_is_an_error(root_kernel, tree, tmp_path, walk):
    """An owner past 2^32-1 with the offset: mkfs.erofs reports it and writes the
    wrapped id (another owner); here one error line, nothing written."""
    out = tmp_path / "out"
    out.mkdir()
    img = out / "x.img"
    if walk == "tar":
        layer = tmp_path / "l.tar"
        with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as t:
            t.add(tree, arcname=".")
        p = run_mkfs(img, layer, "--tar=f", "--gid-offset", str(2**32 - 80000), check=False)
    else:
        p = run_mkfs(img, tree, *walk_args(walk), "--gid-offset", str(2**32 - 80000),
                     check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, p
    assert lines[0].startswith("error:") and "gid overflows with the offset" in lines[0]
    assert "d" in lines[0]
    assert os.listdir(out) == []


@pytest.mark.parametrize("args,msg", [
    (["--uid-offset", "-1"], "--uid-offset: invalid offset '-1'"),
    (["--gid-offset", "12x"], "--gid-offset: invalid offset '12x'"),
    (["--uid-offset", "0x100000000"], "larger than 2^32-1"),
])
def test_bad_values(tree, tmp_path, args, msg):
    out = tmp_path / "out"
    out.mkdir()
    p = run_mkfs(out / "bad.img", tree, *args, check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, p
    assert lines[0].startswith("error:") and msg in lines[0], p.stderr
    assert os.listdir(out) == []


def mtimes(mnt):
    return {rel: r["mtime_ns"] for rel, r in scan_tree(mnt, content=False).items()}


def inode_versions(img):
    """{path: 0 compact / 1 extended} of an image, by our reader."""
    from erofs_tools.reader.image import Image
    with Image(os.fspath(img)) as im:
        return {os.fsdecode(p): ino.version for p, _, ino in im.walk()}


@pytest.mark.parametrize("walk", WALKS)
def test_ignore_mtime(root_kernel, tree, tmp_path, walk):
    """--ignore-mtime: an inode extended only for its mtime is compact, its mtime the
    build time (-T with --mkfs-time, or SOURCE_DATE_EPOCH after clamping); an inode
    extended anyway (d: uid 70000) keeps its own. The mtimes mkfs.erofs 1.9.4 gives;
    --preserve-mtime (the default) after it keeps every mtime."""
    bt = T + 1
    img = build(tmp_path, "im", tree, walk, "-T", bt, "--mkfs-time", "--ignore-mtime")
    ref = reference(tmp_path, "im", tree, "-T", bt, "--mkfs-time", "--ignore-mtime",
                    tar=walk == "tar")
    src = mtimes(tree)
    with mounted(img) as mnt, mounted(ref) as rmnt:
        assert_same_tree(tree, mnt, ignore={"mtime_ns"} | ({"xattr"} if walk == "tar"
                                                          else set()))
        got = mtimes(mnt)
        assert got == mtimes(rmnt)
    if walk != "tar":              # (the tar writer keeps microseconds at best)
        assert got == {k: v if k == b"d" else bt * 10**9 for k, v in src.items()}
    versions = inode_versions(img)
    assert versions.pop("/d") == 1 and set(versions.values()) == {0}
    kept = build(tmp_path, "pm", tree, walk, "-T", bt, "--mkfs-time", "--ignore-mtime",
                 "--preserve-mtime")
    with mounted(kept) as mnt:
        if walk != "tar":
            assert mtimes(mnt) == src
        assert len(set(mtimes(mnt).values())) > 2


def test_ignore_mtime_compressed(root_kernel, tree, tmp_path):
    """-z with inline tails (streamed inodes sized before the layout): the same."""
    bt = T + 1
    img = build(tmp_path, "iz", tree, "c", "-T", bt, "--mkfs-time", "--ignore-mtime",
                "-z", "lz4hc", "-E", "ztailpacking")
    with mounted(img) as mnt:
        assert_same_tree(tree, mnt, ignore={"mtime_ns"})
        assert set(mtimes(mnt).values()) == {bt * 10**9, mtimes(tree)[b"d"]}


def test_ignore_mtime_with_source_date_epoch(root_kernel, tree, tmp_path):
    """SOURCE_DATE_EPOCH clamps, then --ignore-mtime puts the earlier mtimes at it too:
    as mkfs.erofs 1.9.4."""
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(T + 7))
    ours, ref = tmp_path / "o.img", tmp_path / "r.img"
    for cmd in (["python3", "-m", "erofs_tools", "mkfs", "-q", "--ignore-mtime",
                 os.fspath(ours), os.fspath(tree)],
                ["mkfs.erofs", "--quiet", "--ignore-mtime", os.fspath(ref),
                 os.fspath(tree)]):
        cmd[0] = {"python3": __import__("sys").executable}.get(cmd[0], cmd[0])
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
    fsck(ours)
    with mounted(ours) as mnt, mounted(ref) as rmnt:
        got = mtimes(mnt)
        assert got == mtimes(rmnt)
    src = mtimes(tree)
    sde = (T + 7) * 10**9        # d (extended for its uid) is only clamped
    assert got == {k: min(v, sde) if k == b"d" else sde for k, v in src.items()}


def test_ignore_mtime_without_build_time(root_kernel, tree, tmp_path):
    """Without -T the build time is the tree's most common mtime (mkfs.erofs: the
    current time): every compact inode shows it."""
    img = build(tmp_path, "nt", tree, "c", "--ignore-mtime")
    from erofs_tools.reader.image import Image
    with Image(os.fspath(img)) as im:
        bt = im.sb.build_time * 10**9 + im.sb.build_time_nsec
    with mounted(img) as mnt:
        got = mtimes(mnt)
    assert got.pop(b"d") == mtimes(tree)[b"d"]
    assert set(got.values()) == {bt}


@pytest.mark.parametrize("walk", WALKS)
def test_hard_dereference(root_kernel, tree, tmp_path, walk):
    """--hard-dereference: the three links of `a` are three inodes (one link each, the
    same data), as mkfs.erofs 1.9.4 makes them; --tar's hardlink entries stay links
    (mkfs.erofs applies the flag to directory sources only)."""
    from helpers import compare_trees
    img = build(tmp_path, "hd", tree, walk, "--hard-dereference")
    ref = reference(tmp_path, "hd", tree, "--hard-dereference", tar=walk == "tar")
    names = ["a", "d/a-link", "d/e/a-link2"]
    with mounted(img) as mnt, mounted(ref) as rmnt:
        assert_same_tree(tree, mnt, ignore={"links", "mtime_ns"} |
                         ({"xattr"} if walk == "tar" else set()))
        assert compare_trees(rmnt, mnt, check_nlink=True) == []
        st = [os.lstat(os.path.join(mnt, n)) for n in names]
        if walk == "tar":
            assert len({s.st_ino for s in st}) == 1 and {s.st_nlink for s in st} == {3}
        else:
            assert len({s.st_ino for s in st}) == 3 and {s.st_nlink for s in st} == {1}
        data = {open(os.path.join(mnt, n), "rb").read() for n in names}
        assert data == {(tree / "a").read_bytes()}


def test_mount_point_changes_nothing(tree, tmp_path):
    """--mount-point only prefixes the paths mkfs.erofs looks up in SELinux file contexts
    and Android fs-config (neither is read here, nor by a mkfs.erofs built without
    them, as 1.9.4 here): the image is byte for byte the one without it, and so is
    mkfs.erofs's."""
    fixed = ["-T", T, "-U", "clear"]
    run_mkfs(tmp_path / "a.img", tree, *fixed)
    run_mkfs(tmp_path / "b.img", tree, *fixed, "--mount-point=/system/")
    run_mkfs(tmp_path / "c.img", tree, *fixed, "--mount-point", "/", "--exclude-path", "x")
    assert (tmp_path / "a.img").read_bytes() == (tmp_path / "b.img").read_bytes() == \
        (tmp_path / "c.img").read_bytes()
    require_tool("mkfs.erofs")
    ref = []
    for k, extra in enumerate([[], ["--mount-point=/system/"]]):
        img = tmp_path / f"r{k}.img"
        subprocess.run(["mkfs.erofs", "--quiet", "-T", str(T), "-U", "clear", *extra,
                        os.fspath(img), os.fspath(tree)], check=True, capture_output=True)
        ref.append(img.read_bytes())
    assert ref[0] == ref[1]


def shared_counts(img):
    """{path: shared xattr ids in its inode} of the inodes with xattrs."""
    from erofs_tools.format import erofs as E
    from erofs_tools.reader.image import Image
    out = {}
    with Image(os.fspath(img)) as im:
        for p, _, ino in im.walk():
            if ino.xattr_icount:
                buf = im.read(ino.offset + ino.inode_size, E.XattrIbodyHeader.SIZE, "hdr")
                out[os.fsdecode(p)] = E.XattrIbodyHeader.decode(buf, 0).h_shared_count
    return out


@pytest.mark.parametrize("walk", ["c", "python"])
def test_xattr_tolerance(root_kernel, tree, tmp_path, walk):
    """-x N: an xattr on more than N inodes is shared (user.x=1 is on 3: a, b, d/c);
    -x 0 shares every xattr, as mkfs.erofs 1.9.4 does; -x 2147483647 none. The kernel
    reads the same xattrs whatever N."""
    want = {
        "0": {"/a": 1, "/b": 1, "/d/c": 1, "/d": 1, "/d/e/f": 1},
        "2": {"/a": 1, "/b": 1, "/d/c": 1, "/d": 0, "/d/e/f": 0},
        "3": {"/a": 0, "/b": 0, "/d/c": 0, "/d": 0, "/d/e/f": 0},
        "0x7fffffff": {"/a": 0, "/b": 0, "/d/c": 0, "/d": 0, "/d/e/f": 0},
    }
    for n, counts in want.items():
        img = build(tmp_path, f"x{n}", tree, walk, "-x", n)
        got = shared_counts(img)
        assert {k: got[k] for k in counts} == counts, n
        with mounted(img) as mnt:
            assert_same_tree(tree, mnt)
    ref = reference(tmp_path, "x0", tree, "-x", "0")
    got = shared_counts(ref)
    assert {k: got[k] for k in want["0"]} == want["0"]


@pytest.mark.parametrize("walk", ["c", "python", "tar"])
def test_xattr_tolerance_negative_leaves_xattrs_out(root_kernel, tmp_path, walk):
    """-x -1: the source's xattrs are left out (a directory holding a whiteout is still
    marked trusted.overlay.origin, its own origin not copied), as mkfs.erofs 1.9.4;
    --tar keeps the archive's xattrs (mkfs.erofs applies -x to directories only)."""
    import stat as st
    require(is_root(), "needs root (mknod, trusted xattrs)")
    src = tmp_path / "src"
    (src / "w").mkdir(parents=True)
    (src / "f").write_bytes(b"data")
    os.setxattr(src / "f", "user.a", b"1")
    os.setxattr(src / "w", "trusted.overlay.origin", b"\x00\x01")
    os.setxattr(src / "w", "user.b", b"2")
    os.mknod(src / "w" / "gone", 0o600 | st.S_IFCHR, 0)
    img = build(tmp_path, "xn", src, walk, "-x", "-1")
    ref = reference(tmp_path, "xn", src, "-x", "-1", tar=walk == "tar")
    from helpers import compare_trees
    with mounted(img) as mnt, mounted(ref) as rmnt:
        assert compare_trees(rmnt, mnt, ignore={"mtime_ns"}) == []
        xs = {rel: r["xattr"] for rel, r in scan_tree(mnt, content=False).items()}
    if walk == "tar":   # Python's tar writer keeps no xattrs; a 0:0 entry of a tar
        assert xs[b"w"] == {}       # is no mark's reason without --aufs (mkfs.erofs)
    else:
        assert xs == {b"": {}, b"f": {}, b"w": {"trusted.overlay.origin": b""},
                      b"w/gone": {}}


@pytest.mark.parametrize("args,msg", [
    (["-x", "two"], "-x: invalid xattr tolerance 'two'"),
    (["-x", "1.5"], "-x: invalid xattr tolerance"),
    (["-d", "10"], "-d"),
    (["-d", "x"], "-d"),
])
def test_bad_tolerance_and_debug_level(tree, tmp_path, args, msg):
    test_bad_values(tree, tmp_path, args, msg)


def test_debug_level_changes_nothing(tree, tmp_path):
    """-d 0..9 (mkfs.erofs's message level) is taken; the output and image stay."""
    fixed = ["-T", T, "-U", "clear", "-q"]
    run_mkfs(tmp_path / "a.img", tree, *fixed)
    p = run_mkfs(tmp_path / "b.img", tree, *fixed, "-d", "9")
    assert p.stdout == p.stderr == ""
    assert (tmp_path / "a.img").read_bytes() == (tmp_path / "b.img").read_bytes()


def xz_layers(tree, tmp_path):
    """The tree as a tar, and that tar as .tar.xz, two concatenated xz streams (with
    stream padding between) and .tar.lzma; -> (plain tar, {kind: path})."""
    import lzma
    plain = tmp_path / "p.tar"
    with tarfile.open(plain, "w", format=tarfile.PAX_FORMAT) as t:
        t.add(tree, arcname=".")
    raw = plain.read_bytes()
    out = {}
    for kind, data in (
        ("xz", lzma.compress(raw)),
        ("xz2", lzma.compress(raw[:10240]) + bytes(8) + lzma.compress(raw[10240:])),
        ("lzma", lzma.compress(raw, format=lzma.FORMAT_ALONE)),
    ):
        out[kind] = tmp_path / f"l.{kind}"
        out[kind].write_bytes(data)
    return plain, out


def test_unxz(root_kernel, tree, tmp_path):
    """--tar=f --unxz: xz (one stream or several) and .lzma tars give the image of the
    plain tar (the kernel shows the tree, as in mkfs.erofs 1.9.4's image of the tar);
    --unxz=FILE keeps the uncompressed tar in FILE; stdin works too."""
    plain, layers = xz_layers(tree, tmp_path)
    base = tmp_path / "plain.img"
    run_mkfs(base, plain, "--tar=f", "-T", T, "-U", "clear")
    for kind, layer in layers.items():
        img = tmp_path / f"{kind}.img"
        run_mkfs(img, layer, "--tar=f", "--unxz", "-T", T, "-U", "clear")
        assert img.read_bytes() == base.read_bytes(), kind
    fsck(base)
    require_tool("mkfs.erofs")
    ref = tmp_path / "ref.img"
    # mkfs.erofs 1.9.4's own --unxz fails here ("Could not format the device: Input/
    # output error" for any of these: its liblzma loop passes LZMA_FINISH, then
    # LZMA_RUN, to one stream), so its image of the plain tar is the reference
    subprocess.run(["mkfs.erofs", "--quiet", "--tar=f", "-T", str(T), "-U", "clear",
                    os.fspath(ref), os.fspath(plain)], check=True, capture_output=True)
    from helpers import compare_trees
    with mounted(base) as mnt, mounted(ref) as rmnt:
        assert_same_tree(tree, mnt, ignore={"mtime_ns", "xattr"})
        assert compare_trees(rmnt, mnt) == []
    dump = tmp_path / "dump.tar"
    run_mkfs(tmp_path / "d.img", layers["xz2"], "--tar=f", f"--unxz={dump}", "-T", T,
             "-U", "clear")
    assert dump.read_bytes() == plain.read_bytes()
    assert (tmp_path / "d.img").read_bytes() == base.read_bytes()
    with open(layers["lzma"], "rb") as stdin:
        p = subprocess.run([__import__("sys").executable, "-m", "erofs_tools", "mkfs",
                            "--tar=f", "--unxz", "-T", str(T), "-U", "clear", "-q",
                            os.fspath(tmp_path / "s.img")], stdin=stdin,
                           capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "s.img").read_bytes() == base.read_bytes()


def test_unxz_errors(tree, tmp_path):
    """Without --unxz an xz tar is refused; a truncated stream, lzip, an xz bomb past
    --max-size and --unxz without --tar are one error line with nothing written."""
    import lzma
    _, layers = xz_layers(tree, tmp_path)
    cut = tmp_path / "cut.xz"
    cut.write_bytes(layers["xz"].read_bytes()[:-40])
    lz = tmp_path / "x.lz"
    lz.write_bytes(b"LZIP\x01" + bytes(40))
    import io
    big = io.BytesIO()
    with tarfile.open(fileobj=big, mode="w") as t:
        info = tarfile.TarInfo("zeros")
        info.size = 64 << 20
        t.addfile(info, io.BytesIO(bytes(info.size)))
    bomb = tmp_path / "bomb.xz"
    bomb.write_bytes(lzma.compress(big.getvalue()))
    out = tmp_path / "out"
    out.mkdir()
    for src, args, msg in (
        (layers["xz"], ["--tar=f"], "input is xz-compressed: use --unxz"),
        (cut, ["--tar=f", "--unxz"], "xz"),
        (lz, ["--tar=f", "--unxz"], "lzip"),
        (bomb, ["--tar=f", "--unxz", "--max-size", "1M"], "--max-size"),
        (tree, ["--unxz"], "need --tar"),
    ):
        p = run_mkfs(out / "bad.img", src, *args, check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1, (args, p)
        assert lines[0].startswith("error:") and msg in lines[0], (args, p.stderr)
        assert os.listdir(out) == []


def entry_indexes(img):
    """{(path, xattr name): the e_name_index it is stored with} of an image (inline and
    shared entries), and the image's long prefixes."""
    from erofs_tools.format import erofs as E
    from erofs_tools.reader.image import Image
    out = {}
    with Image(os.fspath(img)) as im:
        longs = im.long_xattr_prefixes()
        for p, _, ino in im.walk():
            if not ino.xattr_icount:
                continue
            buf = im.read(ino.offset + ino.inode_size, ino.xattr_isize, "ibody")
            hdr = E.XattrIbodyHeader.decode(buf, 0)
            off = E.XattrIbodyHeader.SIZE
            entries = []
            for _ in range(hdr.h_shared_count):
                xid = int.from_bytes(buf[off:off + 4], "little")
                entries.append(im.read(im.xattr_off + 4 * xid, 4, "shared")[1])
                off += 4
            while off < len(buf):
                e = E.XattrEntry.decode(buf, off)
                entries.append(e.e_name_index)
                off += (E.XattrEntry.SIZE + e.e_name_len + e.e_value_size + 3) & ~3
            names = [n for n, _ in im.xattrs(ino)]
            for n, index in zip(names, entries, strict=True):
                out[(os.fsdecode(p), os.fsdecode(n))] = index
    return out, longs


@pytest.fixture
def xtree(tmp_path):
    require(is_root(), "needs root (trusted xattrs)")
    src = tmp_path / "xsrc"
    (src / "d").mkdir(parents=True)
    for name in ("f1", "f2", "d/f3"):
        (src / name).write_bytes(name.encode() * 100)
    os.setxattr(src / "f1", "user.myapp.key1", b"v1")
    os.setxattr(src / "f2", "user.myapp.key1", b"v1")
    os.setxattr(src / "f1", "user.myapp.key2", b"v2" * 50)
    os.setxattr(src / "d/f3", "user.myapp.", b"bare")
    os.setxattr(src / "d", "trusted.x.long.name", b"t")
    os.setxattr(src / "d/f3", "user.other", b"o")
    os.setxattr(src / "d/f3", "security.myapp.key1", b"not user.")
    return src


@pytest.mark.parametrize("walk", WALKS)
def test_xattr_prefix(root_kernel, xtree, tmp_path, walk):
    """--xattr-prefix: names starting with a long prefix are stored after it (index
    0x80 | its id; the first one that matches, as mkfs.erofs), others as before; the
    kernel reads every xattr back by name and list, the table is mkfs.erofs 1.9.4's and
    so is what the kernel shows."""
    from helpers import compare_trees
    args = ["--xattr-prefix=user.myapp.", "--xattr-prefix", "trusted.x.",
            "--xattr-prefix=user.myapp.key"]
    if walk == "tar":          # a pax tar with the xattrs (Python's tarfile writes none)
        layer = tmp_path / "layer.tar"
        subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--format=pax", "-C",
                        os.fspath(xtree), "-cf", os.fspath(layer), "."], check=True)
    img = build(tmp_path, "xp", xtree, walk, *args)
    ref = reference(tmp_path, "xp", xtree, *args, tar=walk == "tar")
    with mounted(img) as mnt, mounted(ref) as rmnt:
        assert_same_tree(xtree, mnt, ignore={"mtime_ns"} if walk == "tar" else set())
        assert compare_trees(rmnt, mnt, ignore={"mtime_ns"}) == []
        assert os.getxattr(os.path.join(mnt, "d/f3"), "user.myapp.") == b"bare"
    got, longs = entry_indexes(img)
    want_longs = [b"user.myapp.", b"trusted.x.", b"user.myapp.key"]
    assert longs == want_longs and entry_indexes(ref)[1] == want_longs
    assert got == {("/f1", "user.myapp.key1"): 0x80, ("/f1", "user.myapp.key2"): 0x80,
                   ("/f2", "user.myapp.key1"): 0x80, ("/d/f3", "user.myapp."): 0x80,
                   ("/d", "trusted.x.long.name"): 0x81, ("/d/f3", "user.other"): 1,
                   ("/d/f3", "security.myapp.key1"): 6}
    fsck(img)


def test_xattr_prefix_with_digest(root_kernel, xtree, tmp_path):
    """With --xattr-inode-digest the fingerprints' prefix comes after --xattr-prefix's."""
    img = build(tmp_path, "xd", xtree, "c", "--xattr-prefix=user.myapp.",
                "--xattr-inode-digest")
    got, longs = entry_indexes(img)
    assert longs == [b"user.myapp.", b"erofs.fingerprint.v1"]
    assert got[("/f1", "user.myapp.key1")] == 0x80
    assert got[("/f1", "erofs.fingerprint.v1")] == 0x81
    with mounted(img) as mnt:
        assert_same_tree(xtree, mnt)


def root_ibody(img):
    from erofs_tools.reader.image import Image
    with Image(os.fspath(img)) as im:
        ino = im.inode(im.sb.root_nid)
        return bytes(im.read(ino.offset + ino.inode_size, ino.xattr_isize, "ibody")), \
            im.xattrs(ino)


@pytest.mark.parametrize("walk", WALKS)
def test_root_xattr_isize(root_kernel, tmp_path, walk):
    """--root-xattr-isize N: the root's xattr ibody is at least N bytes (4-byte
    multiple), its xattrs then zeros; the same ibody bytes as mkfs.erofs 1.9.4 writes,
    with and without an xattr on the root; more xattrs than N: as they need."""
    require(is_root(), "needs root")
    src = tmp_path / "rsrc"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 5000)
    for k, (n, xattr) in enumerate([("13", None), ("0x40", None), ("200", b"v" * 30),
                                    ("20", b"w" * 100)]):
        if xattr is not None:
            os.setxattr(src, "user.root", xattr)
        img = build(tmp_path, f"r{k}", src, walk, f"--root-xattr-isize={n}")
        body, xattrs = root_ibody(img)
        if walk == "tar":        # (Python's tar writer keeps no xattrs)
            assert xattrs == [] and len(body) == max(16, (int(n, 0) + 3) & ~3)
        else:
            ref = reference(tmp_path, f"r{k}", src, f"--root-xattr-isize={n}")
            assert root_ibody(ref) == (body, xattrs), n    # (our reader reads its padding)
            assert xattrs == ([(b"user.root", xattr)] if xattr else [])
            assert len(body) >= int(n, 0)
        with mounted(img) as mnt:
            assert_same_tree(src, mnt, ignore={"mtime_ns", "xattr"} if walk == "tar"
                             else set())
    if walk != "tar":
        assert len(body) > 20                    # 100 bytes of value: past N


def test_root_xattr_isize_largest_compressed(root_kernel, tree, tmp_path):
    """65532 bytes (the most), with -z and inline tails: the streamed records' room
    (reserved before the layout) holds the padding."""
    for extra in ([], ["-z", "lz4hc", "-E", "ztailpacking"]):
        img = build(tmp_path, f"big{len(extra)}", tree, "c", "--root-xattr-isize=65532",
                    *extra)
        assert len(root_ibody(img)[0]) == 65532
        with mounted(img) as mnt:
            assert_same_tree(tree, mnt)


@pytest.mark.parametrize("args,msg", [
    (["--root-xattr-isize", "65533"], "too large (at most 65532)"),
    (["--root-xattr-isize", "-4"], "--root-xattr-isize: invalid size '-4'"),
    (["--xattr-prefix", ""], "--xattr-prefix: empty prefix"),
    (["--xattr-prefix", "user." + "x" * 300], "longer than 255 bytes"),
])
def test_bad_xattr_layout_values(tree, tmp_path, args, msg):
    test_bad_values(tree, tmp_path, args, msg)


def test_force_inode_compact(root_kernel, tree, tmp_path):
    """-E force-inode-compact: every inode 32 bytes, mtimes as --ignore-mtime (as
    mkfs.erofs 1.9.4's); an inode that cannot be (d: uid 70000) is one error line, as
    mkfs.erofs refuses it; the later of force-inode-extended/-compact wins."""
    out = tmp_path / "out"
    out.mkdir()
    p = run_mkfs(out / "x.img", tree, "-E", "force-inode-compact", check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and "cannot be compact" in lines[0], p
    assert os.listdir(out) == []
    args = ["-E", "force-inode-extended,force-inode-compact", "--uid-offset", "0",
            "--force-uid", "7", "--force-gid", "8", "-T", T, "--mkfs-time"]
    img = build(tmp_path, "fc", tree, "c", *args)
    ref = reference(tmp_path, "fc", tree, *args)
    assert set(inode_versions(img).values()) == {0}
    assert set(inode_versions(ref).values()) == {0}
    from helpers import compare_trees
    with mounted(img) as mnt, mounted(ref) as rmnt:
        assert compare_trees(rmnt, mnt) == []
        assert set(mtimes(mnt).values()) == {T * 10**9}


def test_more_than_255_shared_xattrs_on_one_inode(root_kernel, tmp_path):
    """An inode lists at most 255 shared xattr ids (a u8 count): with 300 xattrs that
    two files share (or -x 0 on one file), 255 are shared and the rest inline, as
    mkfs.erofs keeps them (this failed: "more than 255 shared xattrs")."""
    import stat as st

    from helpers import write_native_image

    from erofs_tools._native import BuildOptions, NativeBuilder
    for k, (files, share_min) in enumerate([(2, 0), (1, 1)]):
        b = NativeBuilder(BuildOptions(shared_xattr_min=share_min))
        root = b.add_node(st.S_IFDIR | 0o755)
        b.set_root(root)
        names = [b"f%d" % i for i in range(files)]
        for name in names:
            f = b.add_node(st.S_IFREG | 0o644, size=1)
            for i in range(300):
                b.add_xattr(f, b"user.k%03d" % i, b"v%d" % i)
            b.set_bytes(f, b"x")
            b.add_child(root, name, f)
        img = tmp_path / f"many{k}.img"
        write_native_image(b, img)
        fsck(img)
        counts = shared_counts(img)
        assert set(counts.values()) == {255}, counts
        with mounted(img) as mnt:
            for name in names:
                p = os.path.join(mnt, os.fsdecode(name))
                assert len(os.listxattr(p)) == 300
                assert os.getxattr(p, "user.k299") == b"v299"
                assert os.getxattr(p, "user.k000") == b"v0"
