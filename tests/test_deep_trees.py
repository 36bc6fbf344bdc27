"""Deep trees and other extremes of the read side (issue 19 items 11, 15 and 5's
`unpack --tar`): images built in the test with the C builder (a chain of directories
far deeper than PATH_MAX and than Python's recursion limit), then `check`, `inspect`
and `unpack` measured: < 200 MB peak RSS, < 10 s, no traceback, and the extraction is
complete and exact."""
import contextlib
import os
import stat
import subprocess
import sys
import tarfile

import pytest
from bomb_helpers import run_bounded
from helpers import write_native_image

from erofs_tools._native import BuildOptions, NativeBuilder

RSS_LIMIT = 200 << 20
TIME_LIMIT = 10.0
NAME = b"dd"
MTIME = 1_700_000_000


@pytest.fixture(autouse=True)
def _remove_deep_trees(tmp_path):
    """pytest removes tmp_path with a recursive rmtree, which a tree deeper than the
    recursion limit breaks: remove them here, iteratively."""
    yield
    from erofs_tools.reader.unpack import remove_tree
    for name in os.listdir(tmp_path):
        p = os.path.join(tmp_path, name)
        if os.path.isdir(p) and not os.path.islink(p):
            remove_tree(p)


@contextlib.contextmanager
def _built(path, mtime=MTIME):
    """A NativeBuilder whose image is laid out and written to `path` (new) at the end."""
    nb = NativeBuilder(BuildOptions(build_time=mtime, uuid=bytes(16)))
    try:
        yield nb
        write_native_image(nb, path)
    finally:
        nb.close()


def _deep_image(path, depth, mtime=MTIME, every=1000):
    """Root/dd/dd/... `depth` directories, a file 'f' (with data and a hardlink 'h' to
    the topmost one) every `every` levels and a symlink at the bottom."""
    with _built(path, mtime) as nb:
        root = nb.add_node(stat.S_IFDIR | 0o755, 0, 0, mtime)
        nb.set_root(root)
        cur = root
        first_file = None
        for level in range(depth):
            d = nb.add_node(stat.S_IFDIR | 0o750, 1, 2, mtime + level)
            nb.add_child(cur, NAME, d)
            cur = d
            if level % every == every - 1:
                data = b"level %d\n" % level
                f = nb.add_node(stat.S_IFREG | 0o640, 3, 4, mtime, 0, len(data))
                nb.set_bytes(f, data)
                nb.add_child(cur, b"f", f)
                if first_file is None:
                    first_file = f
                else:
                    nb.add_child(cur, b"h", first_file)
        ln = nb.add_node(stat.S_IFLNK | 0o777, 0, 0, mtime, 0, 3)
        nb.set_bytes(ln, b"../")
        nb.add_child(cur, b"link", ln)
    return path


def _cli(*args):
    return run_bounded([sys.executable, "-m", "erofs_tools", *map(str, args)])


def _bounded(res, what):
    assert res.maxrss < RSS_LIMIT, f"{what}: peak RSS {res.maxrss >> 20} MiB"
    assert res.cpu_seconds < TIME_LIMIT, f"{what}: {res.cpu_seconds:.1f} CPU s"
    assert b"Traceback" not in res.stderr, res.stderr[-2000:]


def _walk_deep(root, depth):
    """Check the extracted chain one level at a time through directory fds (the paths
    are longer than PATH_MAX); -> number of levels seen."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    levels = 0
    files = 0
    try:
        while True:
            names = sorted(os.listdir(fd))
            if "f" in names:
                st = os.stat("f", dir_fd=fd)
                assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_nlink == \
                    (1 if files == 0 and depth < 2000 else st.st_nlink)
                with open(os.open("f", os.O_RDONLY, dir_fd=fd), "rb") as f:
                    assert f.read() == b"level %d\n" % (levels - 1)
                files += 1
            if "dd" not in names:
                assert os.readlink("link", dir_fd=fd) == "../"
                return levels, files
            st = os.stat("dd", dir_fd=fd, follow_symlinks=False)
            assert stat.S_IMODE(st.st_mode) == 0o750
            assert st.st_mtime == MTIME + levels
            if os.geteuid() == 0:
                assert (st.st_uid, st.st_gid) == (1, 2)
            nfd = os.open("dd", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
            levels += 1
    finally:
        os.close(fd)


def test_unpack_3000_levels(tmp_path):
    img = _deep_image(str(tmp_path / "deep.img"), 3000)
    out = tmp_path / "out"
    res = _cli("unpack", img, "-o", out)
    assert res.returncode == 0, res.stderr[-2000:]
    _bounded(res, "unpack -o")
    levels, files = _walk_deep(str(out), 3000)
    assert (levels, files) == (3000, 3)
    # the hardlinks, far below PATH_MAX apart, are one inode
    assert [n for n in os.listdir(tmp_path) if n.startswith(".out")] == []


@pytest.mark.parametrize("cmd", ["check", "inspect", "inspect-json", "unpack", "unpack-tar"])
def test_30000_levels_bounded(tmp_path, cmd):
    """Memory linear in the tree. The time of inspect and unpack --tar is that of
    their output, which holds every path in full (~0.9 GB for 30,000 levels of 'dd/'):
    bounded by that, not by the 10 s of the other bombs."""
    img = _deep_image(str(tmp_path / "deep.img"), 30000, every=10000)
    limit = TIME_LIMIT
    if cmd == "check":
        res = _cli("check", img)
    elif cmd in ("inspect", "inspect-json"):
        res = run_bounded([sys.executable, "-m", "erofs_tools", "inspect", img]
                          + (["--json"] if cmd == "inspect-json" else []),
                          stdout_path=os.devnull)
        limit = 60.0
    elif cmd == "unpack":
        res = _cli("unpack", img, "-o", tmp_path / "out")
    else:
        res = _cli("unpack", img, "--tar", tmp_path / "out.tar")
        limit = 60.0
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.maxrss < RSS_LIMIT, f"{cmd}: peak RSS {res.maxrss >> 20} MiB"
    assert res.cpu_seconds < limit, f"{cmd}: {res.cpu_seconds:.1f} CPU s"
    assert b"Traceback" not in res.stderr
    if cmd == "unpack":
        assert _walk_deep(str(tmp_path / "out"), 30000) == (30000, 3)


def _deep_wide_image(path, depth, width):
    """`depth` levels of 255-byte names, then `width` links to one file at the bottom:
    2.5 MB whose paths add up to depth x 256 x width bytes (61 GB here)."""
    with _built(path) as nb:
        cur = nb.add_node(stat.S_IFDIR | 0o755, 0, 0, MTIME)
        nb.set_root(cur)
        for _ in range(depth):
            d = nb.add_node(stat.S_IFDIR | 0o755, 0, 0, MTIME)
            nb.add_child(cur, b"d" * 255, d)
            cur = d
        f = nb.add_node(stat.S_IFREG | 0o644, 0, 0, MTIME, 0, 0)
        for i in range(width):
            nb.add_child(cur, b"%d" % i, f)
    return path


@pytest.mark.parametrize("cmd", ["check", "stat", "inspect"])
def test_deep_and_wide_tree_ends_in_one_line(tmp_path, cmd):
    """A path per entry costs its length: a deep chain with a wide directory at the
    bottom would take minutes to walk (quadratic). The walk stops at 2 GiB of paths."""
    img = _deep_wide_image(str(tmp_path / "dw.img"), 4000, 60000)
    assert os.path.getsize(img) < 4 << 20
    res = run_bounded([sys.executable, "-m", "erofs_tools", cmd, img],
                      stdout_path=os.devnull)
    assert res.returncode == 1, res.stderr[-2000:]
    assert b"paths add up to more than 2 GiB" in res.stderr
    assert res.stderr.strip().count(b"\n") == 0, res.stderr[-2000:]
    # ~2 s quiet for the 2 GiB of paths (each a fresh mapping of up to 1 MB), minutes
    # without the bound; inspect prints those paths first
    limit = 60.0 if cmd == "inspect" else 3 * TIME_LIMIT
    assert res.cpu_seconds < limit, f"{cmd}: {res.cpu_seconds:.1f} CPU s"
    assert res.maxrss < RSS_LIMIT


def test_inspect_json_of_a_deep_tree_is_whole(tmp_path):
    import json
    img = _deep_image(str(tmp_path / "deep.img"), 3000)
    res = _cli("inspect", img, "--json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert len(d["tree"]) == 1 + 3000 + 3 + 2 + 1
    assert d["tree"][-1]["path"].endswith("/dd/link") or any(
        e["path"].endswith("/link") for e in d["tree"])


def test_unpack_failure_removes_a_deep_partial_tree(tmp_path):
    """An error deep down (the byte budget) leaves no partial temporary tree, however
    deep, and prints one line."""
    from erofs_tools.errors import InputError
    from erofs_tools.reader.image import Image
    from erofs_tools.reader.unpack import unpack_to_dir
    img = _deep_image(str(tmp_path / "deep.img"), 3000)
    with Image(img) as im:
        with pytest.raises(InputError) as ei:
            unpack_to_dir(im, str(tmp_path / "out"), limit=12)
    assert "\n" not in str(ei.value) and len(str(ei.value)) < 600
    assert sorted(os.listdir(tmp_path)) == ["deep.img"]


def test_far_future_mtime_checks_and_unpacks(tmp_path):
    """Year 2400 (ext4 and the kernel hold it): mkfs takes it, check calls the image
    clean, unpack -o and --tar keep it."""
    y2400 = 13_569_465_600
    src = tmp_path / "src"
    src.mkdir()
    (src / "future").write_bytes(b"x")
    os.utime(src / "future", (y2400, y2400))
    img = tmp_path / "f.img"
    p = subprocess.run([sys.executable, "-m", "erofs_tools", "mkfs", img, src],
                       capture_output=True)
    assert p.returncode == 0, p.stderr
    res = _cli("check", img)
    assert res.returncode == 0, res.stdout + res.stderr
    res = _cli("unpack", img, "-o", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert os.stat(tmp_path / "out" / "future").st_mtime == y2400
    res = _cli("unpack", img, "--tar", tmp_path / "out.tar")
    assert res.returncode == 0, res.stderr
    with tarfile.open(tmp_path / "out.tar") as tf:
        assert int(float(tf.getmember("future").pax_headers["mtime"])) == y2400


def test_unpack_tar_never_writes_through_a_planted_symlink(tmp_path):
    """`unpack --tar OUT` used to write OUT.tmp by name: a symlink planted there made
    it overwrite any file. Now a fresh O_EXCL temporary is renamed over OUT."""
    img = _deep_image(str(tmp_path / "s.img"), 3)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "out.tar"
    os.symlink(victim, str(out) + ".tmp")
    res = _cli("unpack", img, "--tar", out)
    assert res.returncode == 0, res.stderr
    assert victim.read_bytes() == b"precious"
    with tarfile.open(out) as tf:
        assert "dd/dd/dd/link" in tf.getnames()
    assert sorted(os.listdir(tmp_path)) == sorted(["s.img", "victim", "out.tar",
                                                   "out.tar.tmp"])


def test_mkfs_of_a_tree_beyond_path_max_is_one_line(tmp_path):
    """mkfs/pack read a directory by path: a tree deeper than PATH_MAX is refused in
    one short line naming the end of the path, not a 4 KB one."""
    src = tmp_path / "src"
    src.mkdir()
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1500):
        os.mkdir("abc", dir_fd=fd)
        nfd = os.open("abc", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(fd)
    for args in (["mkfs", tmp_path / "x.img", src],
                 ["pack", src, "-B", tmp_path / "x.boot", "-D", tmp_path / "blobs"]):
        p = subprocess.run([sys.executable, "-m", "erofs_tools", *map(str, args)],
                           capture_output=True)
        err = p.stderr.decode()
        assert p.returncode == 1, err
        assert err.startswith("error: ") and err.count("\n") == 1, err[:500]
        assert len(err) < 600 and "Traceback" not in err
    from erofs_tools.reader.unpack import remove_tree
    remove_tree(str(src))
    assert not src.exists()
