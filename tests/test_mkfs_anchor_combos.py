"""Flag combinations an image builder uses, each image compared with mkfs.erofs 1.9.4's
of the same tree through the host kernel (full metadata, content), fsck.erofs 1.9.4 on
ours: compression with fragments, dedupe, ztailpacking, big pclusters, small blocks,
fingerprints; the old `-z ALG,LEVEL` form mkfs.erofs still takes."""
import os

import pytest
from helpers import fsck, kernel_view, mkfs_both, mounted, require_tool, run_mkfs

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("combos") / "src"
    (root / "d" / "e").mkdir(parents=True)
    rnd = os.urandom(2 << 20)
    files = {
        "empty": b"", "small": b"small\n", "d/small2": b"small\n",
        "text": b"an image builder's tree\n" * 3000, "d/big": rnd,
        "d/e/big2": rnd[:1 << 20] + b"!" + rnd[1 << 20:], "d/e/b4097": os.urandom(4097),
        "tail": os.urandom(7000) + b"shared tail" * 200,
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    with open(root / "d" / "sparse", "wb") as f:
        f.truncate(3 << 20)
        f.seek(1 << 20)
        f.write(b"island" * 100)
    os.link(root / "text", root / "d" / "text-link")
    os.symlink("../text", root / "d" / "sym")
    os.mkfifo(root / "fifo")
    os.chown(root / "small", 1000, 1000)
    os.chmod(root / "small", 0o4755)
    os.setxattr(root / "d", "user.k", b"v")
    os.setxattr(root / "text", "trusted.t", b"t" * 50)
    return root


COMBOS = [
    ("-z", "lz4hc", "-C", "65536", "-E", "fragments,dedupe,ztailpacking"),
    ("-z", "zstd", "-C", "131072", "-E", "fragments"),
    ("-b", "1024", "-z", "lz4", "-E", "fragments"),
    ("-b", "512", "-z", "lz4hc", "-E", "fragments,dedupe,ztailpacking", "-C", "65536",
     "--xattr-inode-digest=user.d"),
    ("-x", "0", "-z", "lz4", "-E", "noinline_data"),
    ("--all-root", "-z", "deflate", "-E", "ztailpacking"),
    ("-b", "512",),
    # mkfs.erofs's old -z ALG,LEVEL form (was refused: "unknown option '12'")
    ("-z", "lz4hc,12", "-C", "16384", "-E", "dedupe"),
    ("-z", "lzma,9", "-E", "fragments"),
]


@pytest.mark.parametrize("args", COMBOS, ids=[" ".join(c) for c in COMBOS])
def test_same_tree_as_mkfs_erofs(tree, tmp_path, args):
    require_tool("mkfs.erofs")
    ours, ref = mkfs_both(tmp_path, tree, *args)
    fsck(ours)
    with mounted(ours) as m_ours, mounted(ref) as m_ref:
        got = kernel_view(m_ours)
        assert got == kernel_view(m_ref)
        want = kernel_view(tree)
        assert got.keys() == want.keys()


def test_old_level_form_errors(tree, tmp_path):
    p = run_mkfs(tmp_path / "x.img", tree, "-z", "lz4hc,12x", check=False)
    assert p.returncode == 1
    assert p.stderr.strip() == "error: -z 'lz4hc,12x': level is not an integer: '12x'"
    p = run_mkfs(tmp_path / "x.img", tree, "-z", "lz4hc,13", check=False)
    assert p.returncode == 1 and "13" in p.stderr, p.stderr
    assert not (tmp_path / "x.img").exists()


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory):
    """300 files of 1-100 bytes in 5 directories (2 with a symlink)."""
    root = tmp_path_factory.mktemp("tiny") / "src"
    for i in range(300):
        d = root / f"d{i % 5}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:03d}").write_bytes(os.urandom(1 + (i * 37) % 100))
    os.symlink("d0/f000", root / "d1" / "s")
    os.symlink("x" * 200, root / "d2" / "long")
    return root


@pytest.mark.parametrize("args", [(), ("-E", "noinline_data")], ids=["default", "noinline"])
def test_tiny_files_no_larger_than_mkfs_erofs(tiny_tree, tmp_path, args):
    """-E noinline_data keeps regular files' tails out of their inodes only (mkfs.erofs:
    directories and symlinks stay inline; ours put every directory in a block of its
    own: 310 blocks against 304), and block 0's room after the root's inode takes
    inodes (ours left it empty: 10 blocks against 9 without options)."""
    from erofs_tools.format import erofs as E
    from erofs_tools.reader.image import Image
    require_tool("mkfs.erofs")
    ours, ref = mkfs_both(tmp_path, tiny_tree, *args)
    assert os.path.getsize(ours) <= os.path.getsize(ref)
    with Image(os.fspath(ours)) as im:
        layouts = {p: (ino.mode & 0o170000, ino.layout) for p, _d, ino in im.walk()}
    for p, (fmt, lay) in layouts.items():
        if fmt == 0o100000 and args:
            assert lay == E.LAYOUT_FLAT_PLAIN, p
        elif fmt in (0o040000, 0o120000, 0o100000):
            assert lay == E.LAYOUT_FLAT_INLINE or fmt == 0o120000 and p.endswith("long"), p
    fsck(ours)
    with mounted(ours) as m_ours, mounted(ref) as m_ref:
        got = kernel_view(m_ours)
        assert got == kernel_view(m_ref)
        assert got.keys() == kernel_view(tiny_tree).keys()
