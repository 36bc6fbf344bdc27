"""Property test: random trees with everything a directory can hold -> mkfs -> fsck ->
mount with the host kernel -> full metadata comparison with the source.

Trees hold names of 1..255 arbitrary bytes, hardlinks across directories, user./trusted./
security. xattrs (some shared between inodes), valid POSIX ACLs (access and default),
character/block devices, fifos, sockets, setuid/setgid/sticky bits, uid/gid above 65535,
mtimes with nanoseconds, empty files and sizes around 4 KiB multiples, and sometimes a
directory of several dirent blocks; the image's layout drawn too (--chunksize, with it
--blobdev: the chunks in an extra device, mounted with -o device=; -E48bit, --zD, with
and without -z). Example counts are modest (2 shared cores);
EROFS_TOOLS_HYPOTHESIS_EXAMPLES raises them.
"""
import contextlib
import os
import shutil
import stat
import struct
import tempfile

import pytest
from helpers import (
    assert_same_tree,
    fsck,
    is_root,
    mounted,
    require,
    require_root_kernel,
    scan_tree,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from erofs_tools.builder import tree as tree_mod
from erofs_tools.builder.mkfs import mkfs
from erofs_tools.builder.options import Compression, MkfsOptions
from erofs_tools.reader.fsck import check_image
from erofs_tools.reader.image import open_image
from erofs_tools.reader.unpack import unpack_to_dir

pytestmark = pytest.mark.root

EXAMPLES = int(os.environ.get("EROFS_TOOLS_HYPOTHESIS_EXAMPLES", "25"))

name_bytes = st.binary(min_size=1, max_size=255).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))
short_name = st.binary(min_size=1, max_size=12).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))
names = st.one_of(short_name, short_name, name_bytes)

sizes = st.one_of(
    st.sampled_from([0, 1, 7, 4095, 4096, 4097, 8191, 8192, 8193, 12288, 4096 * 5 + 3,
                     65536, 65537]),
    st.integers(0, 20000),
    st.integers(0, 3).map(lambda k: 4096 * k + 4096 - 32 * k),
)
ids = st.one_of(st.sampled_from([0, 1, 1000, 65534, 65535, 65536, 100000, 2**32 - 2]),
                st.integers(0, 2**32 - 2))
mtimes = st.tuples(st.sampled_from([0, 1, 1_600_000_000, 1_700_000_000]) | st.integers(0, 2**34),
                   st.sampled_from([0, 0, 1, 999_999_999]) | st.integers(0, 999_999_999))
xattr_suffix = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e),
                       min_size=1, max_size=40)
SHARED_POOL = [("user.shared", b"same-value"), ("trusted.overlay.opaque", b"y"),
               ("user.mime_type", b"text/plain"), ("security.label", b"x" * 100)]
CAP = bytes.fromhex("0100000200200000000000000000000000000000")
xattrs = st.lists(st.one_of(
    st.tuples(st.sampled_from(["user.", "trusted.", "security."]), xattr_suffix,
              st.binary(max_size=300)).map(lambda t: (t[0] + t[1], t[2])),
    st.sampled_from(SHARED_POOL),
), max_size=4, unique_by=lambda t: t[0])


def acl_blob(draw_perms, users, groups):
    ents = [(0x01, draw_perms[0], 0xFFFFFFFF)]
    ents += [(0x02, 5, u) for u in users]
    ents.append((0x04, draw_perms[1], 0xFFFFFFFF))
    ents += [(0x08, 4, g) for g in groups]
    if users or groups:
        ents.append((0x10, 7, 0xFFFFFFFF))
    ents.append((0x20, draw_perms[2], 0xFFFFFFFF))
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in ents)


acls = st.builds(acl_blob, st.tuples(st.integers(0, 7), st.integers(0, 7), st.integers(0, 7)),
                 st.sets(st.integers(1, 100000), max_size=3).map(sorted),
                 st.sets(st.integers(1, 100000), max_size=2).map(sorted))

meta = st.fixed_dictionaries({
    "perm": st.integers(0, 0o7777),
    "uid": ids, "gid": ids, "mtime": mtimes, "xattrs": xattrs,
    "acl": st.none() | st.none() | acls,
    "cap": st.booleans(),
})

leaf = st.one_of(
    st.tuples(st.just("file"), sizes, meta),
    st.tuples(st.just("file"), sizes, meta),
    st.tuples(st.just("symlink"), st.binary(min_size=1, max_size=300).filter(
        lambda b: b"\0" not in b), meta),
    st.tuples(st.just("fifo"), st.none(), meta),
    st.tuples(st.just("sock"), st.none(), meta),
    st.tuples(st.sampled_from(["chr", "blk"]),
              st.tuples(st.integers(0, 4095), st.integers(0, 2**20 - 1)), meta),
    st.tuples(st.just("hardlink"), st.integers(0, 1000), meta),
)


def dir_of(children):
    return st.tuples(st.just("dir"),
                     st.dictionaries(names, children, max_size=8),
                     meta, st.sampled_from([0] * 6 + [300, 700]),
                     st.none() | acls)


trees = st.recursive(leaf, dir_of, max_leaves=40)
root_tree = dir_of(trees)


def _apply_meta(path, m, kind, mtimes_todo):
    is_link = kind == "symlink"
    os.chown(path, m["uid"], m["gid"], follow_symlinks=False)
    if not is_link:
        perm = m["perm"]
        if kind == "dir":
            perm |= 0o700          # keep it walkable for building the tree
        os.chmod(path, perm)
        if m["acl"] is not None:
            os.setxattr(path, "system.posix_acl_access", m["acl"])
        if m["cap"] and kind == "file":
            os.setxattr(path, "security.capability", CAP)
    for k, v in m["xattrs"]:
        if kind not in ("file", "dir") and k.startswith("user."):
            continue              # user.* only exists on regular files and directories
        os.setxattr(path, k, v, follow_symlinks=False)
    mtimes_todo.append((path, m["mtime"]))


def assert_same(src, out, lay):
    """The trees agree in full metadata; with -E48bit a compact inode holds its mtime's
    seconds only (the nanoseconds are the superblock's, mkfs.erofs 1.9 keeps it compact
    as well), so there the mtimes agree to the second."""
    if not lay["sb_48bit"]:
        assert_same_tree(src, out, check_nlink=True)
        return
    assert_same_tree(src, out, check_nlink=True, ignore=("mtime_ns",))
    secs = [{k: v["mtime_ns"] // 10**9 for k, v in scan_tree(t, False).items()}
            for t in (src, out)]
    assert secs[0] == secs[1]


def materialize(root, spec):
    """Create the tree; returns nothing. Hardlinks point at an earlier regular file."""
    files = []
    mtimes_todo = []
    serial = [0]

    def make(path, node):
        kind = node[0]
        if kind == "dir":
            _, children, m, extra, default_acl = node
            os.mkdir(path)
            for name, child in children.items():
                make(os.path.join(path, name), child)
            for i in range(extra):
                p = os.path.join(path, b"many-%05d-%s" % (i, b"n" * (i % 60)))
                if not os.path.lexists(p):
                    with open(p, "wb") as f:
                        f.write(b"%d" % i)
            _apply_meta(path, m, "dir", mtimes_todo)
            if default_acl is not None:
                os.setxattr(path, "system.posix_acl_default", default_acl)
            return
        _, arg, m = node
        if kind == "file":
            serial[0] += 1
            with open(path, "wb") as f:
                if arg:
                    f.write((b"%08d" % serial[0]) * (arg // 8) + b"z" * (arg % 8))
            files.append(path)
        elif kind == "symlink":
            os.symlink(arg, path)
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "sock":
            os.mknod(path, 0o600 | stat.S_IFSOCK)
        elif kind in ("chr", "blk"):
            os.mknod(path, 0o600 | (stat.S_IFCHR if kind == "chr" else stat.S_IFBLK),
                     os.makedev(*arg))
        elif kind == "hardlink":
            if files:
                os.link(files[arg % len(files)], path)
                return
            with open(path, "wb") as f:
                f.write(b"lonely")
            files.append(path)
        _apply_meta(path, m, kind, mtimes_todo)

    make(root, spec)
    # mtimes last, deepest first, so creating entries does not disturb them
    for path, (sec, nsec) in sorted(mtimes_todo, key=lambda t: -t[0].count(b"/")):
        os.utime(path, ns=(sec * 10**9 + nsec,) * 2, follow_symlinks=False)


# the layouts drawn beside the tree: chunk-based files (--chunksize; with it, `blob`:
# --blobdev, their chunks in an extra device), the 48-bit layout (-E48bit), directories
# in the packed inode (--zD; stored plain without -z)
layout = st.fixed_dictionaries({
    "chunksize": st.sampled_from([0, 0, 0, 4096, 8192, 65536]),
    "blob": st.booleans(),
    "sb_48bit": st.booleans(),
    "compress_dirs": st.sampled_from([False, False, True]),
})


def options(lay, blob, **kw):
    """MkfsOptions of the drawn layout LAY; -> (options, the --blobdev path BLOB or
    None: a blob only with --chunksize, as mkfs requires)."""
    blob = blob if lay["blob"] and lay["chunksize"] else None
    fields = {k: v for k, v in lay.items() if k != "blob"}
    return MkfsOptions(uuid=bytes(16), blobdev=blob, **fields, **kw), blob


@contextlib.contextmanager
def materialized(spec, prefix):
    """SPEC made a tree in a new temporary directory -> (that directory, the tree);
    all removed afterwards."""
    require(is_root(), "needs root (owners, devices, trusted xattrs, mount)")
    require_root_kernel()
    work = tempfile.mkdtemp(prefix=prefix)
    try:
        src = os.path.join(os.fsencode(work), b"src")
        materialize(src, spec)
        yield work, src
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_and_mount(work, src, lay, **kw):
    """mkfs of SRC in WORK (t.img, with a drawn blob t.blob) -> fsck (with the blob as
    its device) -> mounted by the host kernel (-o device=BLOB) and compared with SRC;
    -> (image, blob or None)."""
    img = os.path.join(work, "t.img")
    opts, blob = options(lay, os.path.join(work, "t.blob"), **kw)
    mkfs(img, src, opts)
    event("--blobdev" if blob else "no --blobdev")
    with open_image(img) as im:
        assert len(im.devices) == (1 if blob else 0)
    fsck(img, devices=[blob] if blob else ())
    with mounted(img, f"device={blob}" if blob else None) as mnt:
        assert_same(src, mnt, lay)
    return img, blob


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.large_base_example])
@given(spec=root_tree, lay=layout)
def test_random_trees_roundtrip(spec, lay):
    with materialized(spec, "erofs-prop-") as (work, src):
        img, blob = build_and_mount(work, src, lay)
        # the C walk (mkfs's) and the Python walk give the same bytes (and blob)
        tree_mod.NATIVE_WALK = False
        try:
            opts, py_blob = options(lay, os.path.join(work, "py.blob"))
            mkfs(os.path.join(work, "py.img"), src, opts)
        finally:
            tree_mod.NATIVE_WALK = True
        for mine, py in ((img, os.path.join(work, "py.img")), (blob, py_blob)):
            if mine:
                with open(mine, "rb") as a, open(py, "rb") as b:
                    assert a.read() == b.read()


@settings(max_examples=max(EXAMPLES // 3, 5), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.large_base_example])
@given(spec=root_tree, alg=st.sampled_from(["lz4", "lz4hc", "zstd", "lzma", "deflate"]),
       pcluster=st.sampled_from([0, 0, 16384, 65536]), lay=layout)
def test_random_trees_roundtrip_compressed(spec, alg, pcluster, lay):
    """The same trees compressed (-z, and -C big pclusters; with -E48bit extent records,
    with --zD the directories compressed in the packed inode, with --chunksize the files
    stored uncompressed chunk-based, with --blobdev their chunks in the blob): the
    compressed layouts, plain extents and whole-file fallbacks read back exactly through
    the kernel."""
    with materialized(spec, "erofs-propz-") as (work, src):
        img, blob = build_and_mount(work, src, lay,
                                    compress=Compression(alg, None, pcluster))
        # our reader decodes the same layouts (the blob's chunks through it as the
        # image's device): check is clean, unpack equals the source
        with open_image(img, devices=[blob] if blob else None) as im:
            assert check_image(im, im.blobs) == []
            out = os.path.join(work, "out")
            unpack_to_dir(im, out)
        assert_same(src, out, lay)
