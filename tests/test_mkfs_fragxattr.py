"""Long xattr name prefixes (--xattr-prefix, --xattr-inode-digest's) with -E fragments,
-E dedupe and -E ztailpacking, as mkfs.erofs 1.9.4 writes them: with -E fragments the
prefix table heads the packed inode's data (xattr_prefix_start 0, no PLAIN_XATTR_PFX),
else it follows the superblock. Each file's fingerprint is the sha256 of its content
whatever holds its data (a fragment shared with another file, a deduplicated
pcluster, an inline tail). Checked against the anchor's mkfs.erofs image of the same
tree through the host kernel (full metadata) and our reader, fsck.erofs 1.9.4 on ours.
Also: -E force-inode-compact names the inode that cannot be compact."""
import hashlib
import os
import subprocess

import pytest
from helpers import (
    file_digests,
    fsck,
    kernel_view,
    mkfs_both,
    mounted,
    require_root_kernel,
    run_mkfs,
)

from erofs_tools.format import erofs as E
from erofs_tools.reader.image import open_image

pytestmark = pytest.mark.root

DEFAULT = b"erofs.fingerprint.v1"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Small files (whole in the packed inode), duplicates and shared tails (one
    fragment for several files), repeated data (-E dedupe), a few MiB, xattrs under a
    long prefix, an empty file, hardlinks."""
    root = tmp_path_factory.mktemp("fragx") / "src"
    (root / "d" / "e").mkdir(parents=True)
    rnd = os.urandom(3 << 20)
    files = {
        "empty": b"", "one": b"x", "small": b"small file\n", "d/small-copy": b"small file\n",
        "tail-a": os.urandom(9000) + b"common tail " * 300,
        "tail-b": os.urandom(5000) + b"common tail " * 300,
        "text": b"the erofs packed inode holds fragments\n" * 4000,
        "d/big": rnd, "d/e/big-again": rnd[:1 << 20] + b"x" + rnd[1 << 20:],
        "d/e/b4096": b"a" * 4096, "d/e/b4097": os.urandom(4097),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    os.link(root / "text", root / "d" / "text-link")
    os.symlink("text", root / "sym")
    os.setxattr(root / "small", "user.myapp.key", b"v1")
    os.setxattr(root / "d", "user.myapp.dir", b"dir")
    os.setxattr(root / "d" / "e", "user.other", b"o")
    os.setxattr(root / "tail-a", "trusted.myapp.t", b"t" * 70)
    os.setxattr(root / "d" / "big", "user.myapp.big", b"b" * 200)
    return root


def both(tmp_path, tree, *args):
    return mkfs_both(tmp_path, tree, *args, need="xattr-inode-digest")


def reader_view(image):
    """-> (superblock, long prefixes, {path: {name: value}}, the packed inode's data)."""
    with open_image(os.fspath(image)) as img:
        xattrs = {p.lstrip(b"/"): dict(img.xattrs(ino)) for p, _d, ino in img.walk()}
        packed = b""
        if img.sb.packed_nid:
            # its first piece (mkfs.erofs's packed inode with an inline interlaced tail
            # is one our reader cannot read yet)
            ino = img.inode(img.sb.packed_nid)
            for _off, data, n in img.iter_data(ino, piece=4096):
                packed = (data if data is not None else bytes(n))[:1024]
                break
            packed = (packed, ino.size)
        return img.sb, img.long_xattr_prefixes(), xattrs, packed


def table_of(prefixes):
    return b"".join(E.encode_long_prefix(p)[1] for p in prefixes)


COMBOS = {
    "fragments": ("-z", "lz4hc", "-E", "fragments"),
    "fragments-dedupe": ("-z", "lz4hc", "-E", "fragments,dedupe"),
    # (not with -C 16384: mkfs.erofs 1.9.4 then writes d/e/b4097 wrong, its fsck and
    # the kernel read other bytes, prefixes or not)
    "fragments-ztailpacking": ("-z", "lz4hc", "-E", "fragments,ztailpacking"),
    "dedupe": ("-z", "lz4hc", "-E", "dedupe"),
    "dedupe-ztailpacking": ("-z", "lz4", "-E", "dedupe,ztailpacking"),
    "fragments=8192-zstd": ("-z", "zstd", "-C", "16384", "-E", "fragments=8192"),
}


@pytest.mark.parametrize("combo", COMBOS)
def test_digest_and_prefix_through_the_kernel(tree, tmp_path, combo):
    """--xattr-prefix user.myapp. --xattr-inode-digest=user.digest: every file's digest
    is its content's sha256 through the kernel, both images have the same tree with
    full metadata, the prefix table is where mkfs.erofs puts it (failed before: both
    options were refused with -E fragments)."""
    extra = COMBOS[combo]
    args = ("--xattr-prefix", "user.myapp.", "--xattr-prefix", "trusted.myapp.",
            "--xattr-inode-digest=user.digest", *extra)
    ours, ref = both(tmp_path, tree, *args)
    fsck(ours)
    views = {}
    for image in (ours, ref):
        sb, prefixes, xattrs, packed = reader_view(image)
        assert sorted(prefixes) == [b"trusted.myapp.", b"user.digest", b"user.myapp."]
        assert sb.feature_incompat & E.FEATURE_INCOMPAT_XATTR_PREFIXES, image
        assert sb.feature_compat & E.FEATURE_COMPAT_ISHARE_XATTRS, image
        frags = "fragments" in combo
        assert bool(sb.packed_nid) == frags, image
        assert bool(sb.feature_compat & E.FEATURE_COMPAT_PLAIN_XATTR_PFX) != frags, image
        if frags:
            # the table heads the packed inode's data
            assert sb.xattr_prefix_start == 0
            assert packed[0].startswith(table_of(prefixes)), image
        views[image] = xattrs
    assert views[ours] == views[ref]
    want = file_digests(tree)
    require_root_kernel()
    with mounted(ours) as m_ours, mounted(ref) as m_ref:
        a = kernel_view(m_ours)
        assert a == kernel_view(m_ref)
        for rel, rec in a.items():
            if rel in want:
                assert rec["xattr"]["user.digest"] == want[rel], rel
                with open(os.path.join(m_ours, os.fsdecode(rel)), "rb") as f:
                    assert want[rel] == b"sha256:" + hashlib.sha256(f.read()).digest()
            else:
                assert "user.digest" not in rec["xattr"], rel
        assert a[b"small"]["xattr"]["user.myapp.key"] == b"v1"
        assert a[b"tail-a"]["xattr"]["trusted.myapp.t"] == b"t" * 70


def test_default_digest_with_fragments(tree, tmp_path):
    """The default name (the kernel lists no xattr outside the namespaces): our reader
    reads the same fingerprints from both images; only the prefix given."""
    ours, ref = both(tmp_path, tree, "--xattr-inode-digest", "-z", "lz4hc", "-E",
                     "fragments,dedupe")
    fsck(ours)
    want = file_digests(tree)
    got = {}
    for image in (ours, ref):
        sb, prefixes, xattrs, packed = reader_view(image)
        assert prefixes == [DEFAULT] and sb.ishare_xattr_prefix_id == 0
        assert sb.xattr_prefix_start == 0 and packed[0].startswith(table_of(prefixes))
        assert not sb.feature_compat & E.FEATURE_COMPAT_PLAIN_XATTR_PFX
        got[image] = xattrs
        for rel, xs in xattrs.items():
            assert xs.get(DEFAULT) == want.get(rel), (image, rel)
    assert got[ours] == got[ref]
    require_root_kernel()
    with mounted(ours) as m_ours, mounted(ref) as m_ref:
        assert kernel_view(m_ours) == kernel_view(m_ref)


def test_prefix_only_with_fragments_no_compressible_file(tmp_path):
    """-E fragments with a prefix table and no file compressed into a fragment (only
    an empty file and a directory): the packed inode holds only the table, as
    mkfs.erofs writes it, and the kernel reads the xattr through it."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "empty").write_bytes(b"")
    os.setxattr(src / "empty", "user.myapp.k", b"v")
    out = tmp_path / "out"
    out.mkdir()
    ours, ref = both(out, src, "--xattr-prefix", "user.myapp.", "-z", "lz4", "-E", "fragments")
    fsck(ours)
    sb, prefixes, xattrs, packed = reader_view(ours)
    rsb, _, rxattrs, rpacked = reader_view(ref)
    # the table alone, its last entry unpadded, as mkfs.erofs writes it
    assert packed == rpacked
    assert xattrs == rxattrs
    assert packed[0].startswith(table_of([b"user.myapp."])[:9])
    assert sb.feature_incompat == rsb.feature_incompat
    require_root_kernel()
    with mounted(ours) as m:
        assert os.getxattr(os.path.join(m, "empty"), "user.myapp.k") == b"v"


def test_force_inode_compact_names_the_path(tmp_path):
    """-E force-inode-compact with an inode that cannot be compact: one error line
    naming its path in the image (control bytes escaped), exit 1, no image left (the
    message named no path before), directories and --tar alike."""
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "ok").write_bytes(b"ok")
    bad = src / "a" / "b" / "new\nline"
    bad.write_bytes(b"x")
    os.chown(bad, 70000, 0)
    out = tmp_path / "out"
    out.mkdir()
    for args in ((), ("-z", "lz4", "-E", "fragments")):
        p = run_mkfs(out / "x.img", src, "-E", "force-inode-compact", *args, check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1, p
        assert lines[0].startswith("error: -E force-inode-compact: /a/b/new\\x0aline "
                                   "cannot be compact (uid 70000"), lines
        assert os.listdir(out) == []
    tar = tmp_path / "t.tar"
    subprocess.run(["tar", "-C", src, "--numeric-owner", "-cf", tar, "."], check=True)
    p = run_mkfs(out / "t.img", tar, "--tar=f", "-E", "force-inode-compact", check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, p
    assert "/a/b/new\\x0aline cannot be compact" in lines[0], lines
    assert os.listdir(out) == []


TAR_COMBOS = {
    "plain": (),
    "lz4hc-fragments-dedupe-ztailpacking": ("-z", "lz4hc", "-E",
                                            "fragments,dedupe,ztailpacking"),
    "lz4hc-C65536-fragments-prefix": ("-z", "lz4hc", "-C", "65536", "-E", "fragments,dedupe",
                                      "--xattr-prefix", "user.myapp."),
    "b512": ("-b", "512"),
    "lz4-b1024-ztailpacking": ("-z", "lz4", "-b", "1024", "-E", "ztailpacking"),
}


@pytest.mark.parametrize("combo", TAR_COMBOS)
def test_tar_digest_as_mkfs_erofs(tree, tmp_path, combo):
    """--tar=f --xattr-inode-digest=user.digest (was refused): as mkfs.erofs 1.9.4 --tar=f,
    every non-empty regular file gets its content's digest; both images' trees are
    equal through the kernel with full metadata, fsck.erofs passes on ours."""
    tar = tmp_path / "t.tar"
    subprocess.run(["tar", "-C", tree, "--numeric-owner", "--xattrs", "--xattrs-include=*",
                    "-cf", tar, "."], check=True)
    args = ("--tar=f", "--xattr-inode-digest=user.digest", *TAR_COMBOS[combo])
    ours, ref = both(tmp_path, tar, *args)
    fsck(ours)
    want = {os.path.normpath(b"./" + rel): v for rel, v in file_digests(tree).items()}
    require_root_kernel()
    with mounted(ours) as m_ours, mounted(ref) as m_ref:
        a = kernel_view(m_ours)
        assert a == kernel_view(m_ref)
        for rel, rec in a.items():
            if rec["type"] == 0o100000 and rec["size"]:
                assert rec["xattr"]["user.digest"] == want[os.path.normpath(rel)], rel
            else:
                assert "user.digest" not in rec["xattr"], rel


@pytest.mark.parametrize("args", [
    ("--xattr-inode-digest=user.digest", "--xattr-prefix=user.myapp."),
    ("--xattr-prefix", "user.myapp.", "--xattr-inode-digest", "--xattr-prefix",
     "trusted.myapp."),
    ("--xattr-prefix=user.myapp.", "-z", "lz4", "-E", "fragments", "--xattr-prefix",
     "trusted.myapp.", "--xattr-inode-digest"),
], ids=["digest-first", "digest-between", "digest-last-fragments"])
def test_prefix_table_in_command_line_order(tree, tmp_path, args):
    """The prefix table in command-line order, the fingerprints' among the others, as
    mkfs.erofs 1.9.4 (ours put it last whatever the order before)."""
    ours, ref = both(tmp_path, tree, *args)
    sb, prefixes, xattrs, _ = reader_view(ours)
    rsb, rprefixes, rxattrs, _ = reader_view(ref)
    assert prefixes == rprefixes
    assert sb.ishare_xattr_prefix_id == rsb.ishare_xattr_prefix_id
    assert xattrs == rxattrs


def test_digest_replaces_a_stale_xattr_of_its_name(tmp_path):
    """A file that has an xattr of the fingerprint's name: the kernel reads the content's
    digest (ours kept the stale value first before; mkfs.erofs writes both, the digest
    first); an empty file keeps its own; directories and --tar=f alike."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"content\n" * 100)
    (src / "empty").write_bytes(b"")
    os.setxattr(src / "f", "user.digest", b"stale")
    os.setxattr(src / "empty", "user.digest", b"own")
    tar = tmp_path / "t.tar"
    subprocess.run(["tar", "-C", src, "--xattrs", "--xattrs-include=*", "-cf", tar, "."],
                   check=True)
    want = b"sha256:" + hashlib.sha256(b"content\n" * 100).digest()
    for source, extra in ((src, ()), (src, ("-z", "lz4hc", "-E", "fragments")),
                          (tar, ("--tar=f",)), (tar, ("--tar=f", "-z", "lz4", "-E", "fragments"))):
        out = tmp_path / "out"
        out.mkdir()
        ours, ref = both(out, source, "--xattr-inode-digest=user.digest", *extra)
        fsck(ours)
        _, _, xattrs, _ = reader_view(ours)
        assert xattrs[b"f"] == {b"user.digest": want}, extra
        with mounted(ours) as m, mounted(ref) as r:
            for mnt in (m, r):
                assert os.getxattr(os.path.join(mnt, "f"), "user.digest") == want
                assert os.getxattr(os.path.join(mnt, "empty"), "user.digest") == b"own"
        for p in (ours, ref):
            p.unlink()
        out.rmdir()


def test_plain_xattr_prefixes_with_fragments(tree, tmp_path):
    """-E plain-xattr-prefixes (was an unknown -E option): the table after the
    superblock (PLAIN_XATTR_PFX) even with -E fragments, where mkfs.erofs 1.9.4 puts it."""
    ours, ref = both(tmp_path, tree, "--xattr-prefix=user.myapp.", "--xattr-inode-digest",
                     "-z", "lz4hc", "-E", "fragments,plain-xattr-prefixes")
    fsck(ours)
    sb, prefixes, xattrs, packed = reader_view(ours)
    rsb, rprefixes, rxattrs, _ = reader_view(ref)
    for s in (sb, rsb):
        assert s.feature_compat & E.FEATURE_COMPAT_PLAIN_XATTR_PFX and s.packed_nid
    assert sb.xattr_prefix_start == rsb.xattr_prefix_start
    assert prefixes == rprefixes == [b"user.myapp.", DEFAULT]
    assert xattrs == rxattrs
    assert not packed[0].startswith(table_of(prefixes)[:4])
    with mounted(ours) as m:
        assert os.getxattr(os.path.join(m, "small"), "user.myapp.key") == b"v1"
