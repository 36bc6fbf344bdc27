"""`erofs-tools pack --type tar|targz`: every entry type, tar formats, whiteout specs,
hostile archives. Mounted results are compared with GNU tar -x of the same archive."""
import gzip
import io
import os
import stat
import subprocess
import tarfile

import pytest
from helpers import NYDUS_VECTORS, compare_trees, is_root, require
from test_tar_helpers import E, fix_root, make_tar, mounted_rafs, pack_tar, run_cli, tar_x

from erofs_tools.reader.image import Image

VECTORS = str(NYDUS_VECTORS / "tar")
ALL_TYPES = os.path.join(VECTORS, "all-entry-type.tar")
EMPTY = os.path.join(VECTORS, "empty.tar")


def _extract_ref(tar_path, dest):
    os.makedirs(dest)
    tar_x(tar_path, dest)
    fix_root(dest)
    return dest


def _assert_same(ref, mnt):
    diffs = compare_trees(ref, mnt, check_nlink=True)
    assert not diffs, "\n".join(diffs)


def _names(img, path="/"):
    return sorted(d.name for d in img.listdir(img.lookup(path)))


# ---------------------------------------------------------------- vectors ------------

@pytest.mark.root
def test_all_entry_type_vector_mounts_like_tar_x(tmp_path):
    boot, blobs = tmp_path / "l.boot", tmp_path / "blobs"
    pack_tar(ALL_TYPES, boot, blobs, "--whiteout-spec", "none")
    ref = _extract_ref(ALL_TYPES, str(tmp_path / "ref"))
    with mounted_rafs(boot, blobs) as mnt:
        _assert_same(ref, mnt)
        st = os.lstat(os.path.join(mnt, "tar/dir1/dir3/hardlink1.txt"))
        assert st.st_nlink == 4
        assert os.readlink(os.path.join(mnt, "tar/dir2/symlink1.txt")) == \
            "../dir1/dir3/file1.txt"


def test_empty_tar_vector(tmp_path):
    boot, blobs = tmp_path / "e.boot", tmp_path / "blobs"
    p = pack_tar(EMPTY, boot, blobs, "--json")
    assert os.listdir(blobs) == []
    with Image(str(boot)) as img:
        assert _names(img) == []
        root = img.inode(img.root_nid)
        assert stat.S_IMODE(root.mode) == 0o755 and root.uid == 0
    assert b'"blob_id": null' in p.stdout


@pytest.mark.root
def test_empty_tar_mounts(tmp_path):
    boot, blobs = tmp_path / "e.boot", tmp_path / "blobs"
    pack_tar(EMPTY, boot, blobs)
    with mounted_rafs(boot, blobs) as mnt:
        assert os.listdir(mnt) == []


# ---------------------------------------------------------------- rich archives -------

def _rich_tree(root):
    """A directory with every entry type GNU tar can archive."""
    os.makedirs(root)
    r = lambda *p: os.path.join(root, *p)  # noqa: E731
    os.makedirs(r("d/sub"))
    os.chmod(r("d"), 0o2775)
    with open(r("empty"), "wb"):
        pass
    with open(r("small"), "wb") as f:
        f.write(b"hello\n")
    with open(r("d/big"), "wb") as f:
        f.write(os.urandom(1 << 20) + b"tail" * 1000)
    with open(r("d/page"), "wb") as f:
        f.write(b"p" * 4096)
    os.link(r("small"), r("d/sub/small-link"))
    os.link(r("small"), r("small-link2"))
    os.symlink("small", r("sym"))
    os.symlink("../" * 20 + "x" * 900, r("d/longsym"))
    os.symlink("/nonexistent/dangling", r("dangling"))
    longdir = r("L" * 200, "M" * 150)
    os.makedirs(longdir)
    with open(os.path.join(longdir, "N" * 240), "wb") as f:
        f.write(b"deep")
    os.mknod(r("chr"), stat.S_IFCHR | 0o620, os.makedev(4, 64))
    os.mknod(r("blk"), stat.S_IFBLK | 0o660, os.makedev(7, 1000))
    os.mkfifo(r("fifo"), 0o640)
    os.chown(r("small"), 70000, 1234)
    os.lchown(r("sym"), 5, 6)
    os.chmod(r("empty"), 0o4755)
    os.mkdir(r("sticky"), 0o1777)
    os.chmod(r("sticky"), 0o1777)
    with open(r("x"), "wb") as f:
        f.write(b"xattrs")
    os.setxattr(r("x"), "user.plain", b"v")
    os.setxattr(r("x"), "trusted.bin", bytes(range(256)))
    os.setxattr(r("x"), "security.capability",
                bytes.fromhex("0100000200000000000000000000000000000000"))
    os.setxattr(r("d"), "user.dir", b"on a directory")
    # sparse: holes at the start, the middle and the end
    with open(r("sparse"), "wb") as f:
        f.seek(5 << 20)
        f.write(b"A" * 10000)
        f.seek(9 << 20)
        f.write(b"B" * 3)
        f.truncate(16 << 20)
    for dirpath, dirs, files in os.walk(root):
        for n in files + dirs:
            os.utime(os.path.join(dirpath, n), ns=(1, 1_650_000_000_123_456_789),
                     follow_symlinks=False)
    os.utime(root, ns=(0, 0))


@pytest.mark.root
@pytest.mark.parametrize("fmt,compress", [("gnu", False), ("pax", False), ("pax", True),
                                          ("posix", True)])
def test_rich_archive_every_entry_type(tmp_path, fmt, compress):
    src = str(tmp_path / "src")
    _rich_tree(src)
    tar_path = str(tmp_path / ("l.tar.gz" if compress else "l.tar"))
    fmt_opt = "pax" if fmt == "posix" else fmt
    subprocess.run(["tar", f"--format={fmt_opt}", "--sparse", "--xattrs",
                    "--xattrs-include=*", "--numeric-owner"]
                   + (["--sparse-version=0.1"] if fmt == "posix" else [])
                   + (["-z"] if compress else []) + ["-cf", tar_path, "-C", src, "."],
                   check=True)
    boot, blobs = tmp_path / "l.boot", tmp_path / "blobs"
    blobs.mkdir()
    with open(tar_path, "rb") as f:       # through stdin
        # --whiteout-spec none: the archive as GNU tar extracts it (an OCI layer's
        # trusted.* xattrs are dropped as containerd drops them: test_tar_oci_reading)
        p = run_cli("pack", "--type", "targz" if compress else "tar", "-", "-B", boot,
                    "-D", blobs, "--json", "--whiteout-spec", "none", input=f.read())
    import json
    r = json.loads(p.stdout)
    # the 16 MiB sparse file's holes are never stored: one zero chunk at most
    assert r["blobs"][0]["uncompressed_size"] < 8 << 20
    ref = _extract_ref(tar_path, str(tmp_path / "ref"))
    os.utime(ref, ns=(0, 0))
    with mounted_rafs(boot, blobs) as mnt:
        if fmt == "gnu":     # GNU format keeps whole seconds only (both sides)
            _assert_same(ref, mnt)
        else:
            _assert_same(ref, mnt)
            assert os.lstat(os.path.join(mnt, "small")).st_mtime_ns == 1_650_000_000_123_456_789
        assert os.getxattr(os.path.join(mnt, "x"), "trusted.bin") == bytes(range(256))
        assert os.lstat(os.path.join(mnt, "sparse")).st_size == 16 << 20


def test_gnu_sparse_old_format_data(tmp_path):
    """Old GNU 'S' entries with extension headers (many regions)."""
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sp", "wb") as f:
        for i in range(40):                   # > 4 regions: extension headers
            f.seek(i * 65536)
            f.write(bytes([i + 1]) * 100)
        f.truncate(40 * 65536 + 5)
    tar_path = str(tmp_path / "s.tar")
    subprocess.run(["tar", "--format=gnu", "--sparse", "-cf", tar_path, "-C", str(src), "sp"],
                   check=True)
    boot = tmp_path / "s.boot"
    pack_tar(tar_path, boot, tmp_path / "blobs", "--chunk-size", "4096")
    from erofs_tools.reader.image import open_image
    with open_image(str(boot), blob_dir=str(tmp_path / "blobs")) as img:
        data = img.read_data(img.lookup("/sp"))
    assert data == (src / "sp").read_bytes()


@pytest.mark.parametrize("version", ["0.0", "0.1", "1.0"])
def test_pax_sparse_long_name_is_the_real_name(tmp_path, version):
    """GNU tar's PAX sparse 0.1/1.0 members carry the real name in GNU.sparse.name and
    a made-up ./GNUSparseFile.PID/NAME in the header, which for a long NAME goes into a
    `path` record written after GNU.sparse.name: GNU tar, Go's archive/tar and libarchive
    extract the file under GNU.sparse.name whatever the order; the image had it under
    GNUSparseFile.PID."""
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    name = "dir/" + "n" * 120
    with open(src / name, "wb") as f:
        f.seek(8192)
        f.write(b"data")
        f.truncate(1 << 20)
    tar_path = str(tmp_path / "s.tar")
    subprocess.run(["tar", "--format=posix", "--sparse", f"--sparse-version={version}",
                    "-cf", tar_path, "-C", str(src), "dir"], check=True)
    boot = tmp_path / "s.boot"
    pack_tar(tar_path, boot, tmp_path / "blobs", "--chunk-size", "4096")
    from erofs_tools.reader.image import open_image
    with open_image(str(boot), blob_dir=str(tmp_path / "blobs")) as img:
        assert [d.name for d in img.listdir(img.lookup("/dir"))] == [b"n" * 120]
        assert img.read_data(img.lookup("/" + name)) == (src / name).read_bytes()

def test_stdin_and_file_give_identical_images(tmp_path):
    data = make_tar([E("a", "dir"), E("a/f", data=b"x" * 5000), E("a/l", "symlink", link="f")],
                    gz=True)
    (tmp_path / "l.tgz").write_bytes(data)
    (tmp_path / "b1").mkdir()
    pack_tar(tmp_path / "l.tgz", tmp_path / "1.boot", tmp_path / "b1", "-T", "7", "--type",
             "targz")
    run_cli("pack", "--type", "targz", "-", "-B", tmp_path / "2.boot", "-D", tmp_path / "b1",
            "-T", "7", input=data)
    assert (tmp_path / "1.boot").read_bytes() == (tmp_path / "2.boot").read_bytes()
    # --type tar with gzip input is refused clearly (auto-detection only in convert)
    p = pack_tar(tmp_path / "l.tgz", tmp_path / "3.boot", tmp_path / "b1", check=False)
    assert p.returncode == 1 and b"use --type targz" in p.stderr, p.stderr


# ---------------------------------------------------------------- whiteouts ----------

WH_LAYER = [E("d", "dir"), E("d/.wh.gone"), E("d/.wh..wh..opq"), E("d/kept", data=b"k"),
            E(".wh..wh.plnk", "dir"), E(".wh..wh.plnk/123", data=b"aufs"),
            E(".wh.top"), E("same", data=b"s"), E(".wh.same"),
            E("o", "dir"), E("o/.wh..wh..opq")]


def test_whiteout_spec_oci_converts(tmp_path):
    (tmp_path / "w.tar").write_bytes(make_tar(WH_LAYER))
    boot = tmp_path / "w.boot"
    pack_tar(tmp_path / "w.tar", boot, tmp_path / "b")
    with Image(str(boot)) as img:
        assert _names(img) == [b"d", b"o", b"same", b"top"]
        top = img.lookup("/top")
        assert stat.S_ISCHR(top.mode) and top.rdev == (0, 0)
        assert _names(img, "/d") == [b"gone", b"kept"]
        gone = img.lookup("/d/gone")
        assert stat.S_ISCHR(gone.mode) and gone.rdev == (0, 0)
        assert (b"trusted.overlay.opaque", b"y") in img.xattrs(img.lookup("/d"))
        assert (b"trusted.overlay.opaque", b"y") in img.xattrs(img.lookup("/o"))
        assert img.lookup("/same").is_reg()          # same-layer entry beats its whiteout


def test_whiteout_spec_none_and_overlayfs_keep_entries(tmp_path):
    (tmp_path / "w.tar").write_bytes(make_tar(WH_LAYER + [E("c", "chr", mode=0)]))
    for spec in ("none", "overlayfs"):
        boot = tmp_path / f"{spec}.boot"
        pack_tar(tmp_path / "w.tar", boot, tmp_path / "b", "--whiteout-spec", spec)
        with Image(str(boot)) as img:
            assert b".wh.top" in _names(img) and b".wh..wh.plnk" in _names(img)
            assert img.lookup("/d/.wh..wh..opq").is_reg()
            assert img.xattrs(img.lookup("/d")) == []
            c = img.lookup("/c")
            assert stat.S_ISCHR(c.mode) and c.rdev == (0, 0)


# ---------------------------------------------------------------- hostile input ------

def _hdr(name, size=0, typ=b"0", link=b"", mode=0o644):
    ti = tarfile.TarInfo(name)
    ti.size, ti.type, ti.linkname, ti.mode = size, typ, os.fsdecode(link), mode
    return ti.tobuf(tarfile.GNU_FORMAT)


def _raw_tar(*members):
    out = b""
    for name, data, typ, link in members:
        out += _hdr(name, len(data), typ, link) + data + bytes(-len(data) % 512)
    return out + bytes(1024)


def _pack_bytes(tmp_path, data, *args, name="h.tar"):
    (tmp_path / name).write_bytes(data)
    blobs = tmp_path / "blobs"
    blobs.mkdir(exist_ok=True)
    p = pack_tar(tmp_path / name, tmp_path / "h.boot", blobs, *args, check=False)
    return p


def _fails(tmp_path, data, words, *args):
    p = _pack_bytes(tmp_path, data, *args)
    err = p.stderr.decode()
    assert p.returncode == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "h.boot").exists()
    assert [n for n in os.listdir(tmp_path / "blobs")] == []     # no temp blob left
    return err


@pytest.mark.parametrize("spec", ["none", "overlayfs"])
def test_dotdot_is_an_error(tmp_path, spec):
    """Outside an OCI layer (test_tar_oci_dotdot.py: clamped to the root there)."""
    _fails(tmp_path, _raw_tar(("a/../../etc/passwd", b"x", b"0", b"")), ["'..'", "passwd"],
           "--whiteout-spec", spec)


@pytest.mark.parametrize("spec", ["none", "overlayfs"])
def test_hardlink_target_with_dotdot_is_an_error(tmp_path, spec):
    _fails(tmp_path, _raw_tar(("f", b"x", b"0", b""), ("l", b"", b"1", b"../f")), ["'..'"],
           "--whiteout-spec", spec)


def test_absolute_and_dot_paths_are_normalized(tmp_path):
    data = _raw_tar(("/abs/file", b"1", b"0", b""), ("./rel//./f", b"2", b"0", b""),
                    ("/", b"", b"5", b""))
    p = _pack_bytes(tmp_path, data)
    assert p.returncode == 0, p.stderr
    with Image(str(tmp_path / "h.boot")) as img:
        assert _names(img) == [b"abs", b"rel"]
        assert img.lookup("/abs/file").size == 1


def test_path_through_symlink_is_an_error(tmp_path):
    data = _raw_tar(("etc", b"", b"2", b"/etc"), ("etc/passwd", b"pwn", b"0", b""))
    _fails(tmp_path, data, ["etc/passwd", "symlink"])


def test_path_through_file_is_an_error(tmp_path):
    data = _raw_tar(("f", b"x", b"0", b""), ("f/g", b"y", b"0", b""))
    _fails(tmp_path, data, ["f/g", "not a directory"])


def test_duplicates_later_wins(tmp_path):
    data = _raw_tar(("a", b"first", b"0", b""), ("a", b"22", b"0", b""),
                    ("d", b"", b"5", b""), ("d/x", b"x", b"0", b""), ("d", b"", b"5", b""),
                    ("e", b"", b"5", b""), ("e/x", b"x", b"0", b""), ("e", b"file", b"0", b""),
                    ("g", b"file", b"0", b""), ("g", b"", b"5", b""),
                    ("h", b"", b"2", b"a"), ("h", b"", b"1", b"a"))
    p = _pack_bytes(tmp_path, data)
    assert p.returncode == 0, p.stderr
    from erofs_tools.reader.image import open_image
    with open_image(str(tmp_path / "h.boot"), blob_dir=str(tmp_path / "blobs")) as img:
        assert img.read_data(img.lookup("/a")) == b"22"
        assert _names(img, "/d") == [b"x"]               # dir over dir keeps children
        assert img.lookup("/e").is_reg()                 # file over dir drops the subtree
        assert img.lookup("/g").is_dir()
        assert img.lookup("/h").nid == img.lookup("/a").nid   # hardlink replaced symlink


def test_hardlink_to_missing_target_is_an_error(tmp_path):
    _fails(tmp_path, _raw_tar(("l", b"", b"1", b"nowhere")), ["l", "nowhere", "not in the"])


def test_hardlink_to_directory_is_an_error(tmp_path):
    _fails(tmp_path, _raw_tar(("d", b"", b"5", b""), ("l", b"", b"1", b"d")), ["directory"])


@pytest.mark.parametrize("cut", [100, 512 + 100, 1024 + 10])
def test_truncated_stream_is_an_error(tmp_path, cut):
    data = _raw_tar(("a", b"x" * 700, b"0", b""), ("b", b"y" * 10, b"0", b""))
    _fails(tmp_path, data[:cut], ["truncated"])


def test_truncated_gzip_is_an_error(tmp_path):
    data = gzip.compress(_raw_tar(("a", os.urandom(100000), b"0", b"")))
    (tmp_path / "h.tgz").write_bytes(data[:len(data) // 2])
    p = pack_tar(tmp_path / "h.tgz", tmp_path / "h.boot", tmp_path / "b", "--type", "targz",
                 check=False)
    assert p.returncode == 1 and b"truncated" in p.stderr, p.stderr


def test_garbage_is_an_error(tmp_path):
    _fails(tmp_path, os.urandom(4096), ["checksum"])


def test_gzip_bomb_is_bounded(tmp_path):
    """64 MiB of zeros declared and present, 64 KiB compressed: --max-size stops it."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as g:
        g.write(_hdr("bomb", 64 << 20))
        z = bytes(1 << 20)
        for _ in range(64):
            g.write(z)
        g.write(bytes(1024))
    (tmp_path / "b.tgz").write_bytes(buf.getvalue())
    assert len(buf.getvalue()) < 200_000
    p = pack_tar(tmp_path / "b.tgz", tmp_path / "h.boot", tmp_path / "blobs", "--type",
                 "targz", "--max-size", "1M", check=False)
    assert p.returncode == 1 and b"--max-size" in p.stderr, p.stderr
    assert not (tmp_path / "h.boot").exists()


def test_huge_declared_pax_header_is_refused(tmp_path):
    data = _hdr("././@PaxHeader", 1 << 40, b"x") + b"x" * 512
    _fails(tmp_path, data, ["metadata", "limit"])


def test_long_component_is_an_error(tmp_path):
    _fails(tmp_path, make_tar([E("a" * 300, data=b"x")]), ["255"])


def test_nul_and_bad_numbers_are_errors(tmp_path):
    h = bytearray(_hdr("f", 10))
    h[124:136] = b"zz zz zz zz\0"
    s = sum(h[:148]) + 256 + sum(h[156:])
    h[148:156] = b"%06o\0 " % s
    _fails(tmp_path, bytes(h) + bytes(1024), ["bad number"])


def test_unsupported_xattr_prefix_is_an_error(tmp_path):
    _fails(tmp_path, make_tar([E("f", data=b"x", xattrs={"weird.name": "v"})]), ["f"])


@pytest.mark.root
def test_no_write_outside_image(tmp_path):
    """A hostile but accepted archive (absolute paths, duplicates) only changes the
    image: nothing appears outside it."""
    require(is_root(), "mount needs root")
    before = set(os.listdir(tmp_path))
    data = _raw_tar(("/tmp/evil", b"1", b"0", b""), ("x", b"", b"2", b"/"),
                    ("y", b"", b"2", b"../../../../"))
    p = _pack_bytes(tmp_path, data)
    assert p.returncode == 0
    assert not os.path.exists("/tmp/evil")
    assert set(os.listdir(tmp_path)) - before == {"h.tar", "blobs", "h.boot"}
    with mounted_rafs(tmp_path / "h.boot", tmp_path / "blobs") as mnt:
        assert os.listdir(os.path.join(mnt, "tmp")) == ["evil"]
        assert os.readlink(os.path.join(mnt, "y")) == "../../../../"


def test_zstd_stream_and_auto_detection(tmp_path):
    import zstandard
    raw = make_tar([E("d", "dir"), E("d/f", data=os.urandom(300000)),
                    E("d/g", data=b"g" * 100)])
    (tmp_path / "l.tar.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    (tmp_path / "l.tar").write_bytes(raw)
    (tmp_path / "b").mkdir()
    pack_tar(tmp_path / "l.tar", tmp_path / "1.boot", tmp_path / "b", "-T", "1")
    pack_tar(tmp_path / "l.tar.zst", tmp_path / "2.boot", tmp_path / "b", "-T", "1",
             "--type", "tarzst")
    assert (tmp_path / "1.boot").read_bytes() == (tmp_path / "2.boot").read_bytes()
    from erofs_tools.builder.tar_source import pack_tar as api_pack
    r = api_pack(str(tmp_path / "l.tar.zst"), str(tmp_path / "3.boot"), str(tmp_path / "b"),
                 source_type="auto")
    assert r["entries"] == 3


def _pax_record(k, v):
    """One pax extended header record: "LENGTH KEY=VALUE\n", LENGTH counting itself."""
    body = k + b"=" + v + b"\n"
    n = len(body) + 2
    while len(str(n).encode()) + 1 + len(body) != n:
        n += 1
    return str(n).encode() + b" " + body


def test_pax_sparse_0_0_and_libarchive_xattrs(tmp_path):
    """Records written by hand: GNU.sparse 0.0 (offset/numbytes pairs) and a
    LIBARCHIVE.xattr (url-encoded name, base64 value)."""
    import base64

    data = b"AAAA" + b"BB"
    pax = (_pax_record(b"GNU.sparse.size", b"20000") + _pax_record(b"GNU.sparse.numblocks", b"2")
           + _pax_record(b"GNU.sparse.offset", b"0") + _pax_record(b"GNU.sparse.numbytes", b"4")
           + _pax_record(b"GNU.sparse.offset", b"19998") + _pax_record(b"GNU.sparse.numbytes", b"2")
           + _pax_record(b"GNU.sparse.name", b"sp")
           + _pax_record(b"LIBARCHIVE.xattr.user.a%3Db", base64.b64encode(b"\x00\xff")))
    out = _hdr("./PaxHeaders/sp", len(pax), b"x") + pax + bytes(-len(pax) % 512)
    out += _hdr("GNUSparseFile.0/sp", len(data)) + data + bytes(-len(data) % 512)
    out += bytes(1024)
    # LIBARCHIVE.xattr. records as libarchive reads them (an OCI layer's are ignored,
    # as containerd ignores them: test_tar_oci_reading)
    p = _pack_bytes(tmp_path, out, "--whiteout-spec", "none")
    assert p.returncode == 0, p.stderr
    from erofs_tools.reader.image import open_image
    with open_image(str(tmp_path / "h.boot"), blob_dir=str(tmp_path / "blobs")) as img:
        ino = img.lookup("/sp")
        assert ino.size == 20000
        got = img.read_data(ino)
        assert got == b"AAAA" + bytes(19994) + b"BB"
        assert img.xattrs(ino) == [(b"user.a=b", b"\x00\xff")]


def test_v7_directory_with_trailing_slash(tmp_path):
    p = _pack_bytes(tmp_path, _raw_tar(("olddir/", b"", b"0", b""),
                                       ("olddir/f", b"x", b"0", b"")))
    assert p.returncode == 0, p.stderr
    with Image(str(tmp_path / "h.boot")) as img:
        assert img.lookup("/olddir").is_dir()


def test_sparse_bomb_is_bounded(tmp_path):
    """A 1 PiB sparse file holding 1 byte: its holes count against --max-size."""
    pax = _pax_record(b"GNU.sparse.size", str(1 << 50).encode()) + _pax_record(b"GNU.sparse.map", b"0,1") \
        + _pax_record(b"GNU.sparse.name", b"bomb")
    out = _hdr("./PaxHeaders/b", len(pax), b"x") + pax + bytes(-len(pax) % 512)
    out += _hdr("GNUSparseFile.0/b", 1) + b"x" + bytes(511) + bytes(1024)
    _fails(tmp_path, out, ["bomb", "--max-size"], "--max-size", "1M")


def test_device_numbers_out_of_range(tmp_path):
    h = bytearray(_hdr("dev", 0, b"3"))
    h[329:337] = b"\x80" + (1 << 40).to_bytes(7, "big")
    s = sum(h[:148]) + 256 + sum(h[156:])
    h[148:156] = b"%06o\0 " % s
    _fails(tmp_path, bytes(h) + bytes(1024), ["dev", "device number"])
