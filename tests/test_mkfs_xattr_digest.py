"""erofs-tools mkfs --xattr-inode-digest[=NAME]: every non-empty regular file carries an
xattr NAME = b"sha256:" + sha256(content) under a long xattr name prefix (the prefix
table right after the superblock, PLAIN_XATTR_PFX, ISHARE_XATTRS), as erofs-utils 1.9
writes it. Checked against the anchor's mkfs.erofs 1.9.4 image of the same tree: through
the host kernel file by file (a NAME in the user./trusted. namespace is visible there),
through our reader (the default name has no namespace: the kernel keeps it internal),
superblock features, fsck.erofs, unpack."""
import hashlib
import os
import subprocess
import sys

import pytest
from helpers import (
    file_digests,
    fsck,
    kernel_view,
    mkfs_both,
    mounted,
    require_root_kernel,
    require_tool,
    run_mkfs,
)

from erofs_tools.format import erofs as E
from erofs_tools.reader.image import open_image

pytestmark = pytest.mark.root

DEFAULT = b"erofs.fingerprint.v1"
DIGEST_BITS = E.FEATURE_COMPAT_PLAIN_XATTR_PFX | E.FEATURE_COMPAT_ISHARE_XATTRS


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Sizes around a block and a few MiB, an empty file, a sparse one, hardlinks,
    identical contents in two inodes, files with their own xattrs, every inode type."""
    root = tmp_path_factory.mktemp("xdigest") / "src"
    (root / "d" / "sub dir").mkdir(parents=True)
    files = {
        "empty": b"", "one": b"x", "b4095": os.urandom(4095), "b4096": b"a" * 4096,
        "b4097": os.urandom(4097), "text": b"the erofs inode digest\n" * 5000,
        "d/big": os.urandom(3 << 20) + b"tail", "d/sub dir/same1": b"same" * 1000,
        "d/sub dir/same2": b"same" * 1000, "d/\xe9t\xe9": b"odd name",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    with open(root / "sparse", "wb") as f:
        f.truncate(5 << 20)
        f.seek(2 << 20)
        f.write(b"island")
    os.link(root / "text", root / "d" / "text-link")
    os.link(root / "one", root / "d" / "sub dir" / "one-link")
    os.symlink("text", root / "sym")
    os.mkfifo(root / "fifo")
    os.setxattr(root / "b4096", "user.own", b"mine")
    os.setxattr(root / "d", "user.dir", b"dir xattr")
    os.setxattr(root / "d" / "big", "trusted.t", b"t" * 100)
    return root


def both(tmp_path, tree, *args):
    return mkfs_both(tmp_path, tree, *args, need="xattr-inode-digest")


def reader_view(image):
    """-> (superblock, long prefixes, {relative path: {xattr name: value}}, {relative
    path: xattr icount}) by our reader."""
    with open_image(os.fspath(image)) as img:
        xattrs, icounts = {}, {}
        for p, _d, ino in img.walk():
            xattrs[p.lstrip(b"/")] = dict(img.xattrs(ino))
            icounts[p.lstrip(b"/")] = ino.xattr_icount
        return img.sb, img.long_xattr_prefixes(), xattrs, icounts


def erofs_tools(*args):
    return subprocess.run([sys.executable, "-m", "erofs_tools", *map(os.fspath, args)],
                          capture_output=True, text=True)


def test_default_name_as_mkfs_erofs(tree, tmp_path):
    """The default name: same prefix table, same fingerprint on every file (read by our
    reader: the kernel shows no xattr outside the known namespaces), same features."""
    ours, ref = both(tmp_path, tree, "--xattr-inode-digest")
    want = file_digests(tree)
    got, sbs, icounts = {}, {}, {}
    for image in (ours, ref):
        sb, prefixes, xattrs, icounts[image] = reader_view(image)
        assert sb.feature_compat & DIGEST_BITS == DIGEST_BITS, image
        assert sb.feature_incompat & E.FEATURE_INCOMPAT_XATTR_PREFIXES, image
        assert prefixes == [DEFAULT]
        assert sb.ishare_xattr_prefix_id == 0
        got[image], sbs[image] = xattrs, sb
        for rel, xs in xattrs.items():
            if rel in want:
                assert xs.get(DEFAULT) == want[rel], (image, rel)
            else:
                assert DEFAULT not in xs, (image, rel)
    assert got[ours] == got[ref]
    # the same inline xattr areas: fingerprints are never shared, even when two files
    # (d/sub dir/same1 and same2) have the same content
    assert icounts[ours] == icounts[ref]
    assert icounts[ours][b"d/sub dir/same1"] == 12      # header + one 39-byte value inline
    # the same superblock feature bits of this feature (not compared: the xattr name
    # filter we do not write, and CHUNKED_FILE: our sparse files are chunk-based)
    compat = DIGEST_BITS | E.FEATURE_COMPAT_SB_CHKSUM | E.FEATURE_COMPAT_MTIME
    assert sbs[ours].feature_compat & compat == sbs[ref].feature_compat & compat == compat
    assert (sbs[ours].feature_incompat & E.FEATURE_INCOMPAT_XATTR_PREFIXES
            == sbs[ref].feature_incompat & E.FEATURE_INCOMPAT_XATTR_PREFIXES)
    fsck(ours)
    # the kernel mounts it and the rest of the tree is unchanged
    require_root_kernel()
    with mounted(ours) as m_ours, mounted(ref) as m_ref:
        assert kernel_view(m_ours) == kernel_view(m_ref)


@pytest.mark.parametrize("name", ["user.digest", "trusted.erofs.fp"])
@pytest.mark.parametrize("extra", [(), ("-z", "lz4hc"), ("-z", "lz4hc", "-E", "ztailpacking")],
                         ids=["plain", "lz4hc", "lz4hc-ztailpacking"])
def test_named_digest_through_the_kernel(tree, tmp_path, name, extra):
    """A NAME in a namespace: the kernel lists it; both images compare equal file by
    file with full metadata (hardlinks included), and the value is the content's sha256."""
    require_root_kernel()
    ours, ref = both(tmp_path, tree, f"--xattr-inode-digest={name}", *extra)
    want = file_digests(tree)
    fsck(ours)
    with mounted(ours) as m_ours, mounted(ref) as m_ref:
        a = kernel_view(m_ours)
        assert a == kernel_view(m_ref)
        for rel, rec in a.items():
            if rel in want:
                assert rec["xattr"][name] == want[rel], rel
            else:
                assert name not in rec["xattr"], rel
        # hardlinks: one inode, one fingerprint
        assert a[b"d/text-link"]["links"] == [b"d/text-link", b"text"]
        assert a[b"b4096"]["xattr"]["user.own"] == b"mine"
        with open(os.path.join(m_ours, "d", "big"), "rb") as f:
            assert (b"sha256:" + hashlib.sha256(f.read()).digest()
                    == os.getxattr(os.path.join(m_ours, "d", "big"), name))


def test_unpack_restores_the_fingerprint(tree, tmp_path):
    """unpack of our image and of mkfs.erofs's restores NAME (in user.) on every file."""
    ours, ref = both(tmp_path, tree, "--xattr-inode-digest=user.fp")
    want = file_digests(tree)
    for image in (ours, ref):
        out = tmp_path / (image.stem + "-unpacked")
        p = erofs_tools("unpack", "-o", out, image)
        assert p.returncode == 0, p.stderr
        for rel, value in want.items():
            assert os.getxattr(os.path.join(out, os.fsdecode(rel)), "user.fp") == value
        assert "user.fp" not in os.listxattr(out / "empty")


def test_inspect_shows_the_prefix_table(tree, tmp_path):
    ours, _ = both(tmp_path, tree, "--xattr-inode-digest")
    p = erofs_tools("inspect", ours)
    assert p.returncode == 0, p.stderr
    assert "xattr_prefixes: ['erofs.fingerprint.v1']" in p.stdout
    assert "ishare_xattr_prefix_id: 0" in p.stdout


@pytest.mark.parametrize("args, message", [
    (["--xattr-inode-digest="], "empty name"),
    (["--xattr-inode-digest=user."], "nothing after the namespace"),
    (["--xattr-inode-digest=system.posix_acl_access"], "reserved for ACLs"),
    (["--xattr-inode-digest=" + "n" * 256], "longer than 255 bytes"),
])
def test_bad_names_and_combinations(tree, tmp_path, args, message):
    image = tmp_path / "bad.img"
    p = run_mkfs(image, tree, *args, check=False)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], p.stderr
    assert not image.exists()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flags", [["--xattr-inode-digest"], ["--xattr-prefix=user.a."],
                                   ["--xattr-inode-digest", "--xattr-prefix=user.a.",
                                    "--xattr-prefix=trusted."]])
def test_tar_index_mode_writes_the_table_after_the_device_table(tmp_path, flags):
    """--tar=i: the long prefix table after the device slot and the root after the
    table, where mkfs.erofs 1.9.4 puts them (same table bytes, same root nid); no
    fingerprints, as there (the data stays in the tar, unread). Was refused ("not
    supported with --tar=i yet")."""
    import tarfile
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"hello\n" * 300)
    (src / "g").write_bytes(os.urandom(9000))
    xattrs = {"d/f": ("user.a.key", "v1"), "g": ("user.a.other", "v2"),
              "d": ("user.plain", "v3")}
    tar = tmp_path / "l.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        for rel in (".", "d", "d/f", "g"):
            ti = tf.gettarinfo(src / rel, arcname=rel)
            if rel in xattrs:
                ti.pax_headers = {f"SCHILY.xattr.{xattrs[rel][0]}": xattrs[rel][1]}
            if ti.isfile():
                with open(src / rel, "rb") as f:
                    tf.addfile(ti, f)
            else:
                tf.addfile(ti)
    ours, theirs = tmp_path / "ours.img", tmp_path / "theirs.img"
    run_mkfs(ours, tar, "--tar=i", *flags)
    require_tool("mkfs.erofs")
    subprocess.run(["mkfs.erofs", "--quiet", "--tar=i", *flags, theirs, tar], check=True,
                   capture_output=True)
    a, b = ours.read_bytes(), theirs.read_bytes()
    sb = E.SUPER_OFFSET
    assert a[sb + 14:sb + 16] == b[sb + 14:sb + 16]               # root nid
    assert a[sb + 91:sb + 96] == b[sb + 91:sb + 96]               # prefix count, start
    start = int.from_bytes(a[sb + 92:sb + 96], "little") * 4
    root = int.from_bytes(a[sb + 14:sb + 16], "little") * 32
    assert start >= sb + 128 + 128 and a[start:root] == b[start:root]
    fsck(ours, devices=[tar])
    both = tmp_path / "both.img"
    both.write_bytes(a + tar.read_bytes())
    with mounted(both) as mnt:
        for rel, name, value in (("d/f", "user.a.key", b"v1"), ("g", "user.a.other", b"v2"),
                                 ("d", "user.plain", b"v3")):
            assert os.getxattr(os.path.join(mnt, rel), name) == value
        with open(os.path.join(mnt, "d", "f"), "rb") as f:
            assert f.read() == b"hello\n" * 300


def test_hostile_prefix_table(tree, tmp_path):
    """A prefix table whose entry size runs past NAME_MAX: check says so in one line."""
    ours = tmp_path / "ours.img"
    run_mkfs(ours, tree, "-q", "--xattr-inode-digest=user.digest")
    data = bytearray(ours.read_bytes())
    sb = E.SuperBlock.decode(data, E.SUPER_OFFSET)
    pos = sb.xattr_prefix_start * 4
    assert data[pos:pos + 9] == b"\x07\x00\x01digest"
    data[pos:pos + 2] = (300).to_bytes(2, "little")
    # keep the superblock checksum right, so the table itself is what is refused
    data[E.CHECKSUM_FIELD:E.CHECKSUM_FIELD + 4] = bytes(4)
    csum = E.superblock_checksum(bytes(data[:4096]))
    data[E.CHECKSUM_FIELD:E.CHECKSUM_FIELD + 4] = csum.to_bytes(4, "little")
    bad = tmp_path / "bad.img"
    bad.write_bytes(bytes(data))
    p = erofs_tools("check", bad)
    assert p.returncode == 1
    out = (p.stdout + p.stderr).strip().splitlines()
    assert any("long xattr prefix 0 has a bad size 300" in line for line in out), out


def test_long_prefix_encoding_round_trip():
    for name, base in ((b"erofs.fingerprint.v1", 0), (b"user.digest", E.XATTR_INDEX_USER),
                       (b"trusted.a.b", E.XATTR_INDEX_TRUSTED),
                       (b"security.ima2", E.XATTR_INDEX_SECURITY)):
        got_base, entry = E.encode_long_prefix(name)
        assert got_base == base and len(entry) % 4 == 0
        assert E.decode_long_prefixes(entry + entry, 2) == [name, name]
    assert isinstance(E.decode_long_prefixes(b"\x05\x00\x09abcd", 1), str)   # base 9
    assert isinstance(E.decode_long_prefixes(b"\x03\x00", 1), str)           # truncated
