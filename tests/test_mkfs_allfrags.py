"""-E all-fragments[=SIZE] and -E [^]fragdedupe[=full|inode] (mkfs.erofs 1.9): every
compressed file whole in the packed inode, and which fragments are shared with earlier
ones (full: a file's end that ends an earlier fragment points there, the rest is
compressed on its own; inode: only whole files; ^fragdedupe: none). Each image is
compared with mkfs.erofs 1.9.4's of the same tree through the host kernel (full
metadata, content), fsck.erofs 1.9.4 on ours, and its size with mkfs.erofs's. All of
these were refused before ("-E: unsupported extended option")."""
import os
import random
import stat
import subprocess

import pytest
from helpers import (
    assert_same_image_for_any_workers,
    fsck,
    kernel_view,
    mounted,
    require_tool,
    run_mkfs,
)

from erofs_tools.builder.options import parse_compress, parse_extended
from erofs_tools.errors import InputError
from erofs_tools.reader.image import open_image
from erofs_tools.reader.zmap import ZMap

pytestmark = pytest.mark.root

WORDS = b"erofs packed inode fragment dedupe tail extent pcluster lcluster ".split()


def text(n, seed):
    """n bytes of words in a seeded random order (compressible, not repetitive)."""
    words = random.Random(seed).choices(WORDS, k=n // 4 + 1)
    return b" ".join(words)[:n]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Duplicates, files that end like earlier ones (a longer one's end, a shared
    tail after different heads, one with a byte inserted), small and empty files,
    incompressible data, a file over one 16 MiB segment, hardlinks, xattrs."""
    root = tmp_path_factory.mktemp("allfrags") / "src"
    (root / "a" / "b").mkdir(parents=True)
    rnd = os.urandom(1 << 20)
    common = text(30000, 7)
    files = {
        "empty": b"", "one": b"x", "small": b"small file\n", "a/small-copy": b"small file\n",
        "a/common": common, "a/b/common-end": common[-9000:],
        "head1-tail": text(6000, 1) + common, "head2-tail": os.urandom(200) + common,
        "inserted": common[:10000] + b"!" + common[10000:],
        "a/rnd": rnd, "a/b/rnd-again": rnd[:300000] + b"?" + rnd[300000:],
        "a/b/b4096": b"a" * 4096, "a/b/b4097": os.urandom(4097),
        "big": text(17 << 20, 3),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    os.link(root / "a" / "common", root / "a" / "b" / "common-link")
    os.symlink("a/common", root / "sym")
    os.setxattr(root / "a", "user.k", b"v")
    os.setxattr(root / "small", "trusted.t", b"t" * 40)
    return root


def anchor(image, source, *args):
    require_tool("mkfs.erofs")
    p = subprocess.run(["mkfs.erofs", "--help"], capture_output=True, text=True,
                       errors="replace")
    assert "xattr-inode-digest" in p.stdout + p.stderr, "mkfs.erofs is not 1.9"
    subprocess.run(["mkfs.erofs", "--quiet", "-T", "0", "-U", "clear", *args,
                    os.fspath(image), os.fspath(source)], check=True, capture_output=True)


def content(tree):
    return {rel: (rec["type"], rec.get("sha256"), rec.get("target")) for rel, rec in tree.items()}


def layout(image):
    """-> (the packed inode's size, {path: (pcluster extents, fragment bytes)})."""
    with open_image(os.fspath(image)) as img:
        packed = img.inode(img.sb.packed_nid).size if img.sb.packed_nid else 0
        files = {}
        for path, _d, ino in img.walk():
            node = img.inode(ino) if isinstance(ino, int) else ino
            if not stat.S_ISREG(node.mode) or not node.size:
                continue
            if node.layout not in (1, 3):           # COMPRESSED_FULL, COMPRESSED_COMPACT
                files[path] = (None, 0)
                continue
            ext = ZMap(img, node).extents
            files[path] = (sum(e.kind == 0 for e in ext),
                           sum(e.llen for e in ext if e.kind != 0))
        return packed, files


COMBOS = {
    "all-fragments": ("-z", "lz4hc", "-E", "all-fragments"),
    "all-fragments-inode": ("-z", "lz4hc", "-E", "all-fragments,fragdedupe=inode"),
    "all-fragments-nofragdedupe": ("-z", "lz4hc", "-E", "all-fragments,^fragdedupe"),
    "all-fragments-dedupe-ztailpacking": ("-z", "lz4", "-E",
                                          "all-fragments,dedupe,ztailpacking"),
    "all-fragments=16384-zstd": ("-z", "zstd", "-C", "65536", "-E", "all-fragments=16384"),
    "all-fragments-b1024": ("-b", "1024", "-z", "lz4hc", "-E", "all-fragments"),
    "fragments-nofragdedupe": ("-z", "lz4hc", "-E", "fragments,^fragdedupe"),
    "fragments-inode": ("-z", "lz4hc", "-E", "fragments", "-E", "fragdedupe=inode"),
    "fragments-full": ("-z", "lz4hc", "-E", "fragments,fragdedupe=full"),
}


@pytest.mark.parametrize("combo", COMBOS)
def test_same_tree_and_size_as_mkfs_erofs(tree, tmp_path, combo):
    args = COMBOS[combo]
    ours, ref = tmp_path / "ours.img", tmp_path / "ref.img"
    run_mkfs(ours, tree, "-q", "-T", "0", "-U", "clear", *args)
    anchor(ref, tree, *args)
    fsck(ours)
    size, rsize = ours.stat().st_size, ref.stat().st_size
    assert size <= rsize * 1.01 + 8192, (size, rsize)
    packed, files = layout(ours)
    rpacked, rfiles = layout(ref)
    if "all-fragments" in combo:
        # every file whole in the packed inode, but for the ends shared (full mode)
        for path, (pcl, _frag) in files.items():
            assert pcl is not None, path
            if "inode" in combo or "nofragdedupe" in combo:
                assert pcl == 0, path
        assert files[b"/big"] == (0, 17 << 20)
        if "nofragdedupe" in combo:
            # nothing shared: each inode's data appended (the hardlink once)
            assert packed == sum(os.path.getsize(tree / p.decode().lstrip("/"))
                                 for p in files if p != b"/a/b/common-link")
    if "nofragdedupe" in combo:
        assert packed == rpacked                   # nothing shared, in the same order
    elif combo == "all-fragments-inode":
        # the same whole files shared, and the small ones (mkfs.erofs shares none of
        # 64 bytes or less)
        assert rpacked - 64 <= packed <= rpacked
    if combo == "fragments-inode":
        # only whole files shared, as documented (mkfs.erofs 1.9.4's multi-threaded
        # build shares the ends of files too: it checks the mode single-threaded only)
        assert packed > rpacked
    if combo == "all-fragments":
        # files ending like an earlier one (head2-tail, inserted: a/common's end, after
        # head1-tail): their starts compressed, their ends shared, as mkfs.erofs does
        for path in (b"/head2-tail", b"/inserted", b"/a/b/rnd-again"):
            assert files[path][0] and files[path][1] < 0.8 * os.path.getsize(
                tree / path.decode().lstrip("/")), path
            assert files[path] == rfiles[path] or path == b"/a/b/rnd-again"
        assert files[b"/a/b/common-end"] == (0, 9000)
        assert packed <= rpacked
    with mounted(ours) as m_ours, mounted(ref) as m_ref:
        got = kernel_view(m_ours)
        assert got == kernel_view(m_ref)
        assert content(got) == content(kernel_view(tree))


def test_same_image_for_any_workers(tree, tmp_path):
    for ext in ("all-fragments", "all-fragments,dedupe"):
        assert_same_image_for_any_workers(tmp_path, tree, "-z", "lz4hc", "-E", ext,
                                          workers=(1, 2, 4))


def test_compress_hints_keep_a_file_out(tree, tmp_path):
    """A file --compress-hints leaves uncompressed stays out of the packed inode (as
    mkfs.erofs: only compressible files are packed)."""
    hints = tmp_path / "hints"
    hints.write_text("0 ^a/rnd$\n4096 .*\n")
    args = ("-z", "lz4hc", "-E", "all-fragments", "--compress-hints", os.fspath(hints))
    ours, ref = tmp_path / "ours.img", tmp_path / "ref.img"
    run_mkfs(ours, tree, "-q", "-T", "0", "-U", "clear", *args)
    anchor(ref, tree, *args)
    fsck(ours)
    packed, files = layout(ours)
    assert files[b"/a/rnd"] == (None, 0)
    rpacked, rfiles = layout(ref)
    assert files == rfiles and rpacked - 64 <= packed <= rpacked
    with mounted(ours) as m, mounted(ref) as m_ref:
        got = kernel_view(m)
        assert got == kernel_view(m_ref)
        assert content(got) == content(kernel_view(tree))


@pytest.mark.parametrize("ext,kept", [
    (["all-fragments"], {"fragments": None, "all-fragments": None}),
    (["all-fragments=8192"], {"fragments": "8192", "all-fragments": None}),
    (["all-fragments,^all-fragments"], {}),
    (["fragments=8192,all-fragments"], {"fragments": "8192", "all-fragments": None}),
    (["fragments", "^fragdedupe"], {"fragments": None, "fragdedupe": "off"}),
    (["fragdedupe=inode,fragdedupe"], {"fragdedupe": "full"}),
    (["^fragdedupe,fragdedupe=inode"], {"fragdedupe": "inode"}),
])
def test_parse(ext, kept):
    assert parse_extended(ext) == kept


def test_interplay():
    """all-fragments implies fragments; ^fragments after it stops both, as in
    mkfs.erofs (which keeps its all_fragments flag, but packs nothing without
    fragments)."""
    z = parse_compress("lz4", None, parse_extended(["all-fragments"]))
    assert z.fragments and z.all_fragments and z.fragdedupe == "full"
    z = parse_compress("lz4", None, parse_extended(["all-fragments,^fragments"]))
    assert not z.fragments and not z.all_fragments
    z = parse_compress("lz4", "16384", parse_extended(["all-fragments=8192,^fragdedupe"]))
    assert z.all_fragments and z.packed_pcluster_size == 8192 and z.fragdedupe == "off"
    with pytest.raises(InputError, match="larger than the pcluster size"):
        parse_compress("lz4", None, parse_extended(["all-fragments=8192"]))


@pytest.mark.parametrize("ext,msg", [
    ("fragdedupe=off", "-E fragdedupe=off: not one of full, inode (^fragdedupe turns it off)"),
    ("^fragdedupe=inode", "-E ^fragdedupe takes no value"),
    ("^all-fragments=4096", "-E ^all-fragments takes no value"),
    ("all-fragments=", "-E all-fragments=: empty value"),
    ("all-fragments=4k", "-E fragments=4k: not a byte count"),
    ("force-inode-blockmap=1", "-E force-inode-blockmap takes no value"),
])
def test_errors(tmp_path, ext, msg):
    src = tmp_path / "src"
    src.mkdir()
    p = run_mkfs(tmp_path / "x.img", src, "-z", "lz4", "-E", ext, check=False)
    assert p.returncode == 1
    assert p.stderr.strip() == f"error: {msg}"
    assert not (tmp_path / "x.img").exists()
