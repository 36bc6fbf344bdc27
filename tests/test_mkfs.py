"""erofs-tools mkfs: images of hand-made trees, mounted with the host kernel and compared
with full metadata; fsck.erofs on every image; options, reproducibility, errors."""
import errno
import json
import os
import stat
import struct
import subprocess
import sys

import pytest
from helpers import (
    assert_same_tree,
    fsck,
    is_root,
    mkfs_and_check,
    mounted,
    require,
    require_root_kernel,
    run_mkfs,
)

pytestmark = pytest.mark.root

SB = 1024


def sb_fields(image):
    with open(image, "rb") as f:
        f.seek(SB)
        sb = f.read(128)
    (magic, csum, compat, blkszbits, extslots, root_nid, inos, build_time, build_nsec,
     blocks, meta_blkaddr, xattr_blkaddr) = struct.unpack_from("<IIIBBHQQIIII", sb, 0)
    return dict(magic=magic, csum=csum, compat=compat, blkszbits=blkszbits, root_nid=root_nid,
                inos=inos, build_time=build_time, build_nsec=build_nsec, blocks=blocks,
                meta_blkaddr=meta_blkaddr, xattr_blkaddr=xattr_blkaddr,
                uuid=sb[0x30:0x40], label=sb[0x40:0x50],
                incompat=struct.unpack_from("<I", sb, 0x50)[0])


def write(path, data=b"", mode=0o644):
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def set_mtime(path, sec, nsec=0):
    os.utime(path, ns=(sec * 10**9 + nsec, sec * 10**9 + nsec), follow_symlinks=False)


@pytest.fixture
def open_tmp():
    """A temporary directory that unprivileged users can traverse."""
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="erofs-open-", dir="/tmp")
    os.chmod(d, 0o755)
    yield __import__("pathlib").Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def basic_tree(tmp_path):
    """Every inode kind, hardlinks across dirs, xattrs, special bits, odd owners."""
    require(is_root(), "needs root to create devices and set owners")
    src = tmp_path / "src"
    src.mkdir()
    write(src / "a.txt", b"hello\n")
    os.link(src / "a.txt", src / "hard")
    (src / "sub").mkdir()
    os.link(src / "a.txt", src / "sub" / "hard2")
    os.symlink("a.txt", src / "link")
    os.symlink("x" * 4000, src / "longlink")
    os.mkfifo(src / "fifo")
    os.mknod(src / "chr", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(src / "blk", 0o640 | stat.S_IFBLK, os.makedev(259, 70000))
    os.mknod(src / "wh", 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.bind(os.fsencode(src / "sock"))
    s.close()
    write(src / "empty")
    write(src / "suid", b"#!/bin/sh\n", 0o4755)
    (src / "sticky").mkdir(mode=0o1777)
    os.chmod(src / "sticky", 0o1777)
    (src / "sgid").mkdir()
    os.chmod(src / "sgid", 0o2775)
    write(src / "big-owner", b"x" * 5000)
    os.chown(src / "big-owner", 70000, 80000, follow_symlinks=False)
    os.chown(src / "sub", 1000, 1000)
    os.lchown(src / "link", 65535, 65536)
    os.setxattr(src / "a.txt", "user.foo", b"bar")
    os.setxattr(src / "a.txt", "trusted.overlay.opaque", b"y")
    os.setxattr(src / "a.txt", "security.capability",
                bytes.fromhex("0100000200000000000000000000000000000000"))
    os.setxattr(src / "sub", "user.foo", b"bar")
    os.setxattr(src / "empty", "user.empty-value", b"")
    os.setxattr(src / "big-owner", "user." + "n" * 200, os.urandom(3000))
    for i, p in enumerate(["a.txt", "sub", "empty", "fifo", "suid", "big-owner"]):
        set_mtime(src / p, 1_600_000_000 + i, 123456789 * (i % 2))
    set_mtime(src / "link", 1_500_000_000, 5)
    return src


def test_basic_tree_mounts_and_matches(basic_tree, tmp_path):
    img = tmp_path / "basic.img"
    mkfs_and_check(img, basic_tree, check_nlink=True)
    sb = sb_fields(img)
    assert sb["magic"] == 0xE0F5E1E2
    assert sb["blkszbits"] == 12
    assert 0 < sb["root_nid"] <= 65535       # block 0 after the superblock or nid 1
    assert sb["compat"] & 1
    assert sb["incompat"] == 0
    assert os.path.getsize(img) % 4096 == 0
    assert sb["blocks"] * 4096 == os.path.getsize(img)
    # user.foo=bar is on two inodes -> shared area
    assert sb["xattr_blkaddr"] != 0


def test_superblock_checksum(basic_tree, tmp_path):
    from erofs_tools._native_sums import sb_checksum
    img = tmp_path / "c.img"
    run_mkfs(img, basic_tree)
    with open(img, "rb") as f:
        blk = f.read(4096)
    assert struct.unpack_from("<I", blk, SB + 4)[0] == sb_checksum(blk)
    # flipping a covered byte must make the kernel refuse the mount
    bad = tmp_path / "bad.img"
    data = bytearray(open(img, "rb").read())
    data[SB + 0x30] ^= 0xFF     # uuid byte
    bad.write_bytes(bytes(data))
    require_root_kernel()
    with pytest.raises(OSError) as e:
        with mounted(bad):
            pass
    # EROFS reports a superblock checksum mismatch as EBADMSG (erofs_superblock_csum_verify)
    assert e.value.errno == errno.EBADMSG, e.value


def test_no_shared_xattrs(basic_tree, tmp_path):
    img = tmp_path / "ns.img"
    mkfs_and_check(img, basic_tree, "--no-shared-xattrs")
    assert sb_fields(img)["xattr_blkaddr"] == 0


@pytest.mark.parametrize("sizes", [
    [0, 1, 2, 4095, 4096, 4097],
    [8191, 8192, 8193, 12287, 12288, 12289],
    [65535, 65536, 65537, 1 << 20, (1 << 20) + 4095, 3 * 4096 - 32],
])
def test_boundary_sizes(tmp_path, sizes):
    src = tmp_path / "src"
    src.mkdir()
    for i, n in enumerate(sizes):
        write(src / f"f{i}-{n}", os.urandom(n))
        # xattrs push the tail position around inside the block
        if i % 2:
            os.setxattr(src / f"f{i}-{n}", "user.pad", b"p" * (37 * i))
    mkfs_and_check(tmp_path / "b.img", src)


def test_tails_of_every_size_pack_without_crossing_blocks(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for n in list(range(1, 200, 7)) + list(range(3800, 4096, 13)):
        write(src / f"t{n:05d}", os.urandom(n))
        write(src / f"u{n:05d}", os.urandom(4096 + n))
    mkfs_and_check(tmp_path / "t.img", src)


@pytest.mark.parametrize("nfiles, root_nid", [(3, 36), (30, 128)])
def test_root_in_block_0_when_it_fits(tmp_path, nfiles, root_nid):
    """The root goes into the room after the superblock (nid 36, as mkfs.erofs) when its
    inode and inline dirents fit there; a larger root starts block 1 (nid 128), the
    first of the records placed among the data in walk order."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(nfiles):                     # 112-byte dirents: 30 -> a 3.4 KB tail
        write(src / f"{i:03d}{'n' * 97}", b"x" * (i * 37))
    img = tmp_path / "r.img"
    mkfs_and_check(img, src, "-T", "0", ignore=("mtime_ns",))
    assert sb_fields(img)["root_nid"] == root_nid


def test_big_directories_and_long_odd_names(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    big = src / "big"
    big.mkdir()
    for i in range(3000):                       # ~20 dirent blocks
        write(big / f"file-{i:06d}-{'z' * (i % 40)}", b"%d" % i)
    odd = src / "odd"
    odd.mkdir()
    names = [b"\x01", b"!bang", b"-dash", b".hidden", b".-x", b"..a", b"Zed", b"alpha",
             b"\xff" * 255, b"a" * 255, b"\xe2\x98\x83 snow", b"tab\tnew\nline", b" ",
             b"\x7f\x80\x81"]
    for n in names:
        write(os.path.join(os.fsencode(odd), n), n)
    mkfs_and_check(tmp_path / "d.img", src)
    with mounted(tmp_path / "d.img") as mnt:
        # lookups (not just readdir) of every odd name
        for n in names:
            with open(os.path.join(os.fsencode(mnt), b"odd", n), "rb") as f:
                assert f.read() == n


def test_deep_tree(tmp_path):
    src = tmp_path / "src"
    p = src
    for i in range(60):
        p = p / f"d{i}"
    p.mkdir(parents=True)
    write(p / "leaf", b"leaf")
    mkfs_and_check(tmp_path / "deep.img", src)


def test_acls_roundtrip(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write(src / "f", b"acl")
    (src / "d").mkdir()
    # POSIX ACL xattr blob: version 2, entries (tag, perm, id)
    def acl(entries):
        return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, p, i in entries)
    access = acl([(0x01, 6, 0xFFFFFFFF), (0x02, 4, 1234), (0x04, 4, 0xFFFFFFFF),
                  (0x10, 6, 0xFFFFFFFF), (0x20, 4, 0xFFFFFFFF)])
    try:
        os.setxattr(src / "f", "system.posix_acl_access", access)
        os.setxattr(src / "d", "system.posix_acl_default", access)
    except OSError as e:
        require(False, f"source filesystem refuses ACLs: {e}")
    mkfs_and_check(tmp_path / "acl.img", src)


def test_reproducible_with_T_and_U(basic_tree, tmp_path):
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    u = "2f1b8a7e-6d55-4c1e-9a49-1f2e3d4c5b6a"
    run_mkfs(a, basic_tree, "-T", "1700000000", "-U", u)
    # touch the tree's atimes / rebuild in another order of directory creation
    run_mkfs(b, basic_tree, "-T", "1700000000", "-U", u)
    assert a.read_bytes() == b.read_bytes()
    sb = sb_fields(a)
    assert sb["build_time"] == 1700000000
    assert sb["uuid"].hex() == u.replace("-", "")
    fsck(a)
    with mounted(a) as mnt:
        assert_same_tree(basic_tree, mnt, ignore={"mtime_ns"}, whiteout_marks=True)
        for dp, dn, fn in os.walk(mnt):
            for n in dn + fn:
                assert os.lstat(os.path.join(dp, n)).st_mtime_ns == 1700000000 * 10**9


def test_reproducible_without_T(basic_tree, tmp_path):
    """Same -U, no -T: build time is derived from the tree, so still identical."""
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    run_mkfs(a, basic_tree, "-U", "clear")
    run_mkfs(b, basic_tree, "-U", "clear")
    assert a.read_bytes() == b.read_bytes()
    c = tmp_path / "c.img"
    run_mkfs(c, basic_tree)   # random uuid
    assert sb_fields(c)["uuid"] != bytes(16)
    assert sb_fields(c)["uuid"] != sb_fields(a)["uuid"]


def test_source_date_epoch(basic_tree, tmp_path):
    img = tmp_path / "s.img"
    env = dict(os.environ, SOURCE_DATE_EPOCH="1234567890")
    p = subprocess.run([sys.executable, "-m", "erofs_tools", "mkfs", "-q", str(img),
                        str(basic_tree)], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert sb_fields(img)["build_time"] == 1234567890
    with mounted(img) as mnt:
        assert os.lstat(os.path.join(mnt, "a.txt")).st_mtime == 1234567890


def test_owner_options(basic_tree, tmp_path):
    img = tmp_path / "o.img"
    run_mkfs(img, basic_tree, "--all-root")
    fsck(img)
    with mounted(img) as mnt:
        assert_same_tree(basic_tree, mnt, ignore={"uid", "gid"}, whiteout_marks=True)
        for dp, dn, fn in os.walk(mnt):
            for n in dn + fn:
                st = os.lstat(os.path.join(dp, n))
                assert (st.st_uid, st.st_gid) == (0, 0)
    img2 = tmp_path / "o2.img"
    run_mkfs(img2, basic_tree, "--force-uid", "99999", "--force-gid", "7")
    fsck(img2)
    with mounted(img2) as mnt:
        assert_same_tree(basic_tree, mnt, ignore={"uid", "gid"}, whiteout_marks=True)
        st = os.lstat(os.path.join(mnt, "sub"))
        assert (st.st_uid, st.st_gid) == (99999, 7)


def test_label_and_json(basic_tree, tmp_path):
    img = tmp_path / "l.img"
    p = run_mkfs(img, basic_tree, "-L", "my-volume-1234", "--json")
    summary = json.loads(p.stdout)
    assert summary["inodes"] == sb_fields(img)["inos"]
    assert summary["bytes"] == os.path.getsize(img)
    assert summary["blocks"] * 4096 == summary["bytes"]
    assert "seconds" in summary
    assert sb_fields(img)["label"].rstrip(b"\0") == b"my-volume-1234"
    p = run_mkfs(img, basic_tree, "-L", "x" * 16, check=False)
    assert p.returncode == 1 and p.stderr.startswith("error: ")


def test_exclude_options(basic_tree, tmp_path):
    img = tmp_path / "e.img"
    run_mkfs(img, basic_tree, "--exclude-path", "sub", "--exclude-path", "/fifo",
             "--exclude-regex", r"^big-.*", "--exclude-regex", "^s(ock|uid)$")
    fsck(img)
    with mounted(img) as mnt:
        names = set(os.listdir(mnt))
        assert not names & {"sub", "fifo", "big-owner", "sock", "suid"}
        assert {"a.txt", "hard", "sticky", "sgid", "chr"} <= names
        assert_same_tree(basic_tree, mnt, whiteout_marks=True,
                         exclude={"sub", "fifo", "big-owner", "sock", "suid"},
                         ignore={"links"})


def test_quiet_prints_nothing_and_no_tty_no_progress(basic_tree, tmp_path):
    p = run_mkfs(tmp_path / "q.img", basic_tree, "-q")
    assert p.stdout == "" and p.stderr == ""
    p = run_mkfs(tmp_path / "q2.img", basic_tree)
    assert "\r" not in p.stderr and p.stdout.count("\n") == 1


def test_sparse_file_over_4gib(tmp_path):
    """A 5 GiB sparse file with a few data islands: packed as a chunk-based file with
    hole chunks, the holes never read (fast), read back right through the kernel."""
    import resource
    src = tmp_path / "src"
    src.mkdir()
    f = src / "sparse"
    size = 5 * 2**30 + 12345
    islands = {0: os.urandom(5000), 3 * 2**30 - 7: os.urandom(70000),
               4 * 2**30 + 1: b"over four", size - 100: os.urandom(100)}
    with open(f, "wb") as fh:
        fh.truncate(size)
        for off, data in islands.items():
            fh.seek(off)
            fh.write(data)
    st = os.stat(f)
    require(st.st_blocks * 512 < 2**24, "source filesystem does not keep files sparse")
    img = tmp_path / "sp.img"
    # its CPU time, not wall time (what the load leaves it): reading 5 GiB of holes
    # costs seconds of CPU, skipping them almost none
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run_mkfs(img, src)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    assert cpu < 20, f"mkfs took {cpu:.1f} CPU s: holes were read?"
    assert os.path.getsize(img) < 4 * 2**20      # hole chunks take no blocks
    fsck(img, extract=False)
    with mounted(img) as mnt:
        g = os.path.join(mnt, "sparse")
        assert os.stat(g).st_size == size
        with open(g, "rb") as fh:
            for off, data in islands.items():
                fh.seek(off)
                assert fh.read(len(data)) == data
            for off in (8192, 2**31, 4 * 2**30 - 4096, size - 5000):
                fh.seek(off)
                assert fh.read(4096) == bytes(4096)
        st2 = os.stat(g)
        assert (st2.st_uid, st2.st_mode) == (st.st_uid, st.st_mode)


def test_large_dense_file_and_extended_inode(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write(src / "dense", os.urandom(3 * 2**20 + 17))
    os.chown(src / "dense", 2**32 - 2, 100000)
    mkfs_and_check(tmp_path / "x.img", src)


# ------------------------------------------------------------------------ errors ----

# import everything first (site-packages may be unreadable for nobody), then drop root
# every module the run needs is imported before the switch: as nobody, this venv's python
# finds no further module (not even the standard library's signal)
AS_NOBODY = (
    "import os,sys,signal,threading; from erofs_tools.cli import main;"
    " import erofs_tools.cli.mkfs;"
    "os.setgroups([]); os.setgid(65534); os.setuid(65534);"
    "main(['mkfs', sys.argv[1], sys.argv[2]])")


def _no_tmp_left(directory):
    return [n for n in os.listdir(directory) if n.endswith(".tmp")]


def test_error_source_missing(tmp_path):
    p = run_mkfs(tmp_path / "i.img", tmp_path / "nope", check=False)
    assert p.returncode == 1
    assert p.stderr.startswith("error: ") and "nope" in p.stderr
    assert "No such file" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "i.img").exists()


def test_error_source_not_a_directory(tmp_path):
    write(tmp_path / "file", b"x")
    p = run_mkfs(tmp_path / "i.img", tmp_path / "file", check=False)
    assert p.returncode == 1 and "not a directory" in p.stderr
    assert not (tmp_path / "i.img").exists()


def test_error_image_inside_source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write(src / "f", b"x")
    p = run_mkfs(src / "out.img", src, check=False)
    assert p.returncode == 1 and "inside" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(src)) == ["f"]
    # also through a symlinked path to the source
    os.symlink(src, tmp_path / "alias")
    p = run_mkfs(tmp_path / "alias" / "o.img", src, check=False)
    assert p.returncode == 1 and "inside" in p.stderr


def test_error_unreadable_file_keeps_old_image(open_tmp):
    """As an unprivileged user: an unreadable file fails the build, naming the path; an
    existing IMAGE is left untouched and no temporary file remains."""
    require(is_root(), "needs root to switch to nobody")
    base = open_tmp / "w"
    base.mkdir()
    src = base / "src"
    src.mkdir()
    write(src / "ok", b"fine")
    write(src / "secret", b"no", 0o000)
    out = base / "out"
    out.mkdir()
    write(out / "img", b"old image")
    for p in (base, src, out, out / "img", src / "ok", src / "secret"):
        os.chown(p, 65534, 65534)
    code = AS_NOBODY
    p = subprocess.run([sys.executable, "-c", code, str(out / "img"), str(src)],
                       capture_output=True, text=True)
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith("error: ") and "secret" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert (out / "img").read_bytes() == b"old image"
    assert _no_tmp_left(out) == []


def test_error_unreadable_directory(open_tmp):
    require(is_root(), "needs root to switch to nobody")
    tmp_path = open_tmp
    src = tmp_path / "src"
    (src / "locked").mkdir(parents=True)
    os.chmod(src / "locked", 0o000)
    os.chmod(src, 0o777)
    code = AS_NOBODY
    out = tmp_path / "o"
    out.mkdir(mode=0o777)
    os.chmod(out, 0o777)
    p = subprocess.run([sys.executable, "-c", code, str(out / "i.img"), str(src)],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "locked" in p.stderr, p.stderr
    assert os.listdir(out) == []


def test_error_xattr_prefix_cannot_be_stored():
    """The walk refuses xattr names outside the EROFS prefixes, naming the path."""
    from erofs_tools._native import NativeBuilder
    from erofs_tools.errors import FormatLimitError
    b = NativeBuilder()
    r = b.add_node(stat.S_IFDIR | 0o755)
    with pytest.raises(FormatLimitError):
        b.add_xattr(r, b"system.nfs4_acl", b"x")
    with pytest.raises(FormatLimitError):
        b.add_xattr(r, b"user.", b"x")   # empty suffix after user.


def test_cli_help_and_version():
    p = subprocess.run([sys.executable, "-m", "erofs_tools", "--help"], capture_output=True,
                       text=True)
    assert p.returncode == 0 and "mkfs" in p.stdout
    p = subprocess.run(["erofs-tools", "mkfs", "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "--exclude-regex" in p.stdout


def test_pre_epoch_and_far_future_mtimes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write(src / "old", b"1969")
    write(src / "future", b"2500")
    set_mtime(src / "old", -86400 * 365, 5)
    set_mtime(src / "future", 16_725_225_600, 999_999_999)
    mkfs_and_check(tmp_path / "m.img", src)


def test_unstorable_xattr_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """A name the format cannot hold (here an xattr outside the EROFS prefixes, as some
    file systems have) fails with the path named, status 1, nothing left behind."""
    src = tmp_path / "src"
    src.mkdir()
    write(src / "f", b"x")
    real_list = os.listxattr

    def fake_list(path, follow_symlinks=True):
        names = real_list(path, follow_symlinks=follow_symlinks)
        return names + (["system.nfs4_acl"] if os.fsencode(path).endswith(b"/f") else [])

    real_get = os.getxattr

    def fake_get(path, name, follow_symlinks=True):
        if name == "system.nfs4_acl":
            return b"acl"
        return real_get(path, name, follow_symlinks=follow_symlinks)

    monkeypatch.setattr(os, "listxattr", fake_list)
    monkeypatch.setattr(os, "getxattr", fake_get)
    # the Python walk: the C walk reads xattrs without os.listxattr
    monkeypatch.setattr("erofs_tools.builder.tree.NATIVE_WALK", False)
    from erofs_tools.cli import main
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SystemExit) as ei:
        main(["mkfs", str(out / "i.img"), str(src)])
    assert ei.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert str(src / "f") in err and "nfs4_acl" in err
    assert os.listdir(out) == []


def test_progress_bar_on_a_terminal(basic_tree, tmp_path):
    """With stdout on a tty a progress bar is drawn (on stderr); --json never draws."""
    import pty
    import select
    img = tmp_path / "p.img"
    pid, master = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-m", "erofs_tools", "mkfs", str(img),
                                  str(basic_tree)])
    chunks = []
    while True:
        r, _, _ = select.select([master], [], [], 30)
        if not r:
            break
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "\r" in text and ("scanning" in text or "writing" in text)
    assert "inodes" in text


def _reg_layouts(image):
    from erofs_tools.reader.image import Image
    img = Image(str(image))
    return {p: ino.layout for p, _d, ino in img.walk() if stat.S_ISREG(ino.mode)}


def test_noinline_data_keeps_every_tail_in_whole_blocks(tmp_path):
    """-E noinline_data (containerd's EROFS differ passes it): no FLAT_INLINE file, the
    tree still reads back identical; the default image does inline the same tails."""
    from erofs_tools.format import erofs as E
    src = tmp_path / "src"
    src.mkdir()
    for n in (1, 100, 4095, 4097, 10000, 3 * 4096 - 32):
        write(src / f"f{n}", os.urandom(n))
    default = tmp_path / "default.img"
    mkfs_and_check(default, src)
    assert E.LAYOUT_FLAT_INLINE in _reg_layouts(default).values()
    img = tmp_path / "noinline.img"
    mkfs_and_check(img, src, "-E", "noinline_data")
    layouts = _reg_layouts(img)
    assert len(layouts) == 6 and set(layouts.values()) == {E.LAYOUT_FLAT_PLAIN}, layouts
    assert os.path.getsize(img) > os.path.getsize(default)


def test_noinline_data_takes_no_value(tmp_path):
    (tmp_path / "src").mkdir()
    p = subprocess.run([sys.executable, "-m", "erofs_tools", "mkfs", "-E", "noinline_data=1",
                        str(tmp_path / "x.img"), str(tmp_path / "src")],
                       capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "noinline_data" in p.stderr
    assert not (tmp_path / "x.img").exists()
