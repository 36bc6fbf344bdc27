"""erofs-tools mkfs --chunksize (every regular file chunk-based, identical chunks stored
once, chunks of zeros holes), --blobdev (the chunks in an extra device) and -E
force-inode-blockmap / force-chunk-indexes, against mkfs.erofs 1.9.4: the same chunk
layout file by file, the same image and blob sizes (the blob byte for byte); the images
mount with the host kernel (-o device=BLOB) and compare with the source with full
metadata, fsck.erofs 1.9.4 (--device=BLOB) passes, our check and unpack read them. Bad
values: one `error:` line, exit 1, nothing written."""
import os
import shutil
import subprocess
import sys

import pytest
from helpers import (
    assert_same_tree,
    fsck,
    mounted,
    noise,
    require,
    require_tool,
    run_mkfs,
    text,
)
from test_mkfs import basic_tree  # noqa: F401  (every inode kind, as chunked files)
from test_mkfs_device import _loop, loopdev  # noqa: F401  (loop devices over 0xAA files)

from erofs_tools.reader.image import Image

pytestmark = pytest.mark.root

PY = "/usr/lib/python3.11"
TIME = ("-T", "0", "--mkfs-time")     # (the files keep their mtimes, to compare them)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Duplicate files and chunks, sparse files (data in one chunk, none at all, holes
    inside a chunk), whole chunks of zeros, files shorter than a block, empty files,
    hardlinks, a file sharing another's start."""
    root = tmp_path_factory.mktemp("chunked") / "src"
    (root / "d" / "e").mkdir(parents=True)
    big = noise(3 << 20, 7)
    (root / "big").write_bytes(big)
    (root / "d" / "big-copy").write_bytes(big)
    (root / "d" / "big-head").write_bytes(big[:(1 << 20) + 5000] + noise(70000, 8))
    (root / "text").write_bytes(text(200_000, 3))
    (root / "d" / "e" / "text-copy").write_bytes(text(200_000, 3))
    (root / "small").write_bytes(b"tiny\n")
    (root / "d" / "small-copy").write_bytes(b"tiny\n")
    (root / "empty").write_bytes(b"")
    (root / "zeros").write_bytes(bytes(3 << 20))
    (root / "zeros-tail").write_bytes(bytes(70000) + b"end")
    with open(root / "sparse", "wb") as f:
        f.truncate(5 << 20)
        f.seek(1 << 20)
        f.write(noise(9000, 9))
        f.seek((4 << 20) + 100)
        f.write(b"later")
    with open(root / "hole-only", "wb") as f:
        f.truncate((7 << 20) + 3)
    with open(root / "d" / "hole-tail", "wb") as f:
        f.write(noise(10000, 10))
        f.truncate(2 << 20)
    os.link(root / "big", root / "d" / "e" / "big-link")
    (root / "sym").symlink_to("big")
    return root


def anchor(img, src, *args, blob=None):
    require_tool("mkfs.erofs")
    extra = [f"--blobdev={blob}"] if blob else []
    p = subprocess.run(["mkfs.erofs", "--quiet", *TIME, "-U", "clear", *extra,
                        *map(str, args), os.fspath(img), os.fspath(src)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def ours(img, src, *args, blob=None):
    extra = [f"--blobdev={blob}"] if blob else []
    run_mkfs(img, src, *TIME, "-U", "clear", *extra, *map(str, args))


def chunk_tables(img, paths):
    """Each file's layout, chunk format and chunks (device, block; None: a hole), the
    blocks of device 0 counted from the first one used (mkfs.erofs puts the chunks after
    the first inode blocks, this mkfs before them), read by our reader."""
    image = Image(os.fspath(img))
    out = {}
    for path in paths:
        ino = image.lookup(path)
        fmt = image.chunk_format(ino) if ino.layout == 4 else None
        out[path] = (ino.layout, fmt, [(c.device, None if c.hole else c.blkaddr)
                                       for c in image.chunks(ino)] if fmt else [])
    base = min((b for _, _, cs in out.values() for d, b in cs if d == 0 and b is not None),
               default=0)
    return {p: (lay, fmt, [(d, b - base if d == 0 and b is not None else b) for d, b in cs])
            for p, (lay, fmt, cs) in out.items()}


def files(src):
    for d, _, names in os.walk(src):
        for n in names:
            p = os.path.join(d, n)
            if not os.path.islink(p):
                yield os.fsencode("/" + os.path.relpath(p, src))


def mount_and_compare(img, src, blob=None):
    fsck(img, devices=[blob] if blob else ())
    with mounted(img, f"device={blob}" if blob else None) as mnt:
        assert_same_tree(src, mnt, whiteout_marks=True)
    dev = ["--device", os.fspath(blob)] if blob else []
    shutil.rmtree(os.fspath(img) + ".out", ignore_errors=True)
    for cmd in (["check", os.fspath(img), *dev],
                ["unpack", os.fspath(img), *dev, "-o", os.fspath(img) + ".out"]):
        p = subprocess.run([sys.executable, "-m", "erofs_tools", *cmd], capture_output=True,
                           text=True)
        assert p.returncode == 0, p.stdout + p.stderr
    assert_same_tree(src, os.fspath(img) + ".out", whiteout_marks=True)


def compare_with_anchor(tmp_path, src, ob=None, tb=None):
    """o.img (and its blob OB) against mkfs.erofs 1.9.4's t.img (TB) of SRC: the size
    within a block, the blob byte for byte, each file's chunks; then mounted and
    compared (mount_and_compare)."""
    # (the inode records packed otherwise: here 2 blocks fewer to 1 more)
    assert os.path.getsize(tmp_path / "o.img") <= os.path.getsize(tmp_path / "t.img") + 4096
    if ob is not None:
        assert ob.read_bytes() == tb.read_bytes()
    paths = sorted(files(src))
    assert chunk_tables(tmp_path / "o.img", paths) == chunk_tables(tmp_path / "t.img", paths)
    mount_and_compare(tmp_path / "o.img", src, ob)


CASES = [(cs, blob, e) for cs in (4096, 65536, 1048576) for blob in (False, True)
         for e in ((), ("-E", "force-chunk-indexes"))] + \
    [(4096, False, ("-E", "force-inode-blockmap")), (65536, False, ("-E", "^dedupe")),
     (65536, True, ("-E", "^dedupe"))]


@pytest.mark.parametrize("cs,blob,ext", CASES)
def test_same_chunks_as_mkfs_erofs(tree, tmp_path, root_kernel, cs, blob, ext):
    """Each file's chunks where mkfs.erofs 1.9.4 puts them (duplicates shared, zeros and
    holes as holes, runs of chunks merged into larger ones), the same sizes, the blob the
    same bytes; mounted and compared, fsck'd, read by check and unpack."""
    args = (f"--chunksize={cs}", *ext)
    tb, ob = (tmp_path / "t.blob", tmp_path / "o.blob") if blob else (None, None)
    anchor(tmp_path / "t.img", tree, *args, blob=tb)
    ours(tmp_path / "o.img", tree, *args, blob=ob)
    compare_with_anchor(tmp_path, tree, ob, tb)


@pytest.mark.parametrize("z,cs,blob", [("lz4", 4096, False), ("lz4", 65536, True),
                                       ("lz4hc", 4096, True), ("lz4hc", 65536, False),
                                       ("lzma", 65536, True)])   # (the slot after its
                                                                 # configuration record)
def test_compressed(tree, tmp_path, root_kernel, z, cs, blob):
    """-z with --chunksize: what is not compressed (the noise, the files of a block) is
    chunks, as mkfs.erofs 1.9.4 does it (there the blob of chunks follows the compressed
    data, here the chunks are among it: their addresses differ without --blobdev, the
    size within a block); with --blobdev the blob byte for byte as its."""
    args = (f"--chunksize={cs}", "-z", z)
    tb, ob = (tmp_path / "t.blob", tmp_path / "o.blob") if blob else (None, None)
    anchor(tmp_path / "t.img", tree, *args, blob=tb)
    ours(tmp_path / "o.img", tree, *args, blob=ob)
    assert os.path.getsize(tmp_path / "o.img") <= os.path.getsize(tmp_path / "t.img") + 4096
    paths = sorted(files(tree))
    mine, ref = (chunk_tables(tmp_path / i, paths) for i in ("o.img", "t.img"))
    if blob:
        assert ob.read_bytes() == tb.read_bytes()
    else:           # (which chunks are holes, which data)
        mine, ref = ({p: (lay, fmt, [(d, b is None) for d, b in cs])
                      for p, (lay, fmt, cs) in t.items()} for t in (mine, ref))
    assert mine == ref
    assert {lay for lay, _, _ in mine.values()} >= {3, 4}   # (compressed and chunks)
    mount_and_compare(tmp_path / "o.img", tree, ob)


def test_duplicates_and_zeros_take_no_blocks(tree, tmp_path):
    """The copies and the chunks of zeros cost no data (-E ^dedupe: they do)."""
    ours(tmp_path / "a.img", tree, "--chunksize=4096", blob=tmp_path / "a.blob")
    ours(tmp_path / "b.img", tree, "--chunksize=4096", "-E^dedupe", blob=tmp_path / "b.blob")
    shared = (tmp_path / "a.blob").stat().st_size
    stored = (tmp_path / "b.blob").stat().st_size
    assert stored - shared >= (3 << 20) + (3 << 20) + (1 << 20) + 65536


def test_every_inode_kind(basic_tree, tmp_path, root_kernel):  # noqa: F811
    """Every inode kind, xattrs and owners with chunked files, and the Python walk (an
    exclude of nothing takes it)."""
    for k, walk in enumerate(((), ("--exclude-path", "nothing-here"))):
        img = tmp_path / f"k{k}.img"
        ours(img, basic_tree, "--chunksize=8192", *walk)
        mount_and_compare(img, basic_tree)
        ours(img, basic_tree, "--chunksize=8192", *walk, blob=tmp_path / f"k{k}.blob")
        mount_and_compare(img, basic_tree, tmp_path / f"k{k}.blob")


@pytest.mark.parametrize("blob", [False, True])
def test_tar(tree, tmp_path, root_kernel, blob):
    """--tar=f --chunksize: the chunks in mkfs.erofs 1.9.4's order (the tree's, not the
    archive's), the blob byte for byte; mounted and compared."""
    layer = tmp_path / "layer.tar"
    require_tool("tar")         # (GNU tar: pax mtimes to the nanosecond)
    subprocess.run(["tar", "--format=pax", "-C", os.fspath(tree), "-cf", os.fspath(layer),
                    "."], check=True)
    tb, ob = (tmp_path / "t.blob", tmp_path / "o.blob") if blob else (None, None)
    anchor(tmp_path / "t.img", layer, "--tar=f", "--chunksize=65536", blob=tb)
    ours(tmp_path / "o.img", layer, "--tar=f", "--chunksize=65536", blob=ob)
    compare_with_anchor(tmp_path, tree, ob, tb)


def test_blob_on_a_block_device(tree, tmp_path, root_kernel, loopdev):  # noqa: F811
    """--blobdev a block device: written in place, the blob's bytes as mkfs.erofs 1.9.4's
    blob file; the kernel mounts the image (a loop device: with a block-device blob the
    kernel wants the image on one too) with -o device=, fsck.erofs passes."""
    dev = loopdev(16 << 20)
    anchor(tmp_path / "t.img", tree, "--chunksize=65536", blob=tmp_path / "t.blob")
    ours(tmp_path / "o.img", tree, "--chunksize=65536", blob=dev)
    ref = (tmp_path / "t.blob").read_bytes()
    with open(dev, "rb") as f:
        assert f.read(len(ref)) == ref
    fsck(tmp_path / "o.img", devices=[dev])
    with _loop(tmp_path / "o.img") as img, mounted(img, f"device={dev}") as mnt:
        assert_same_tree(tree, mnt)


def test_dedupe_without_z_is_chunks_of_a_block(tree, tmp_path, root_kernel):
    """-E dedupe without -z: chunk-based files of one-block chunks, duplicates stored
    once, as mkfs.erofs 1.9.4 makes of it (which leaves the chunked-file feature bit
    out, set here); mounted and compared."""
    anchor(tmp_path / "t.img", tree, "-E", "dedupe")
    ours(tmp_path / "o.img", tree, "-E", "dedupe")
    compare_with_anchor(tmp_path, tree)


def test_chunk_options_without_chunksize(tree, tmp_path):
    """-E force-chunk-indexes / force-inode-blockmap without --chunksize: accepted, the
    same image (as mkfs.erofs 1.9.4, which then writes no chunk-based file)."""
    ours(tmp_path / "a.img", tree)
    for e in ("force-chunk-indexes", "force-inode-blockmap"):
        ours(tmp_path / "b.img", tree, "-E", e)
        assert (tmp_path / "b.img").read_bytes() == (tmp_path / "a.img").read_bytes(), e


@pytest.mark.parametrize("blob", [False, True])
def test_python_library(tmp_path, root_kernel, blob):
    """/usr/lib/python3.11: the same sizes as mkfs.erofs 1.9.4 (the blob the same bytes)."""
    require(os.path.isdir(PY), f"needs {PY}")
    tb, ob = (tmp_path / "t.blob", tmp_path / "o.blob") if blob else (None, None)
    anchor(tmp_path / "t.img", PY, "--chunksize=65536", blob=tb)
    ours(tmp_path / "o.img", PY, "--chunksize=65536", blob=ob)
    assert os.path.getsize(tmp_path / "o.img") == os.path.getsize(tmp_path / "t.img")
    if blob:
        assert ob.read_bytes() == tb.read_bytes()
    fsck(tmp_path / "o.img", devices=[ob] if blob else ())
    with mounted(tmp_path / "o.img", f"device={ob}" if blob else None) as mnt:
        assert_same_tree(PY, mnt)


@pytest.mark.parametrize("args,msg", [
    (("--chunksize=3000",), "not a power of two"),
    (("--chunksize=0",), "not a power of two"),
    (("--chunksize=2048",), "smaller than the block size"),
    (("-b", "1024", "--chunksize=512"), "smaller than the block size"),
    (("--blobdev=BLOB",), "needs --chunksize"),
    (("--chunksize=4096", "--blobdev=BLOB", "-E", "force-inode-blockmap"), "block map"),
    (("--chunksize=4096", "--blobdev="), "empty path"),
    (("--chunksize=4096", "--blobdev=IMG"), "the image itself"),
    (("--chunksize=4096", "--blobdev=SRC/blob"), "inside SOURCE"),
    (("--chunksize=abc",), "invalid value"),
])
def test_bad_values(tree, tmp_path, args, msg):
    """One `error:` line, exit 1, neither the image nor the blob written."""
    blob = tmp_path / "blob"
    args = [a.replace("BLOB", os.fspath(blob)).replace("IMG", os.fspath(tmp_path / "x.img"))
            .replace("SRC", os.fspath(tree)) for a in args]
    p = run_mkfs(tmp_path / "x.img", tree, *args, check=False)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], p.stderr
    assert sorted(os.listdir(tmp_path)) == []
    assert not (tree / "blob").exists()


def test_tar_index_refused(tree, tmp_path):
    """--tar=i --chunksize: one line, nothing written (mkfs.erofs 1.9.4 chunks nothing
    there and writes the tar's device slot with 0 blocks)."""
    (tmp_path / "in").mkdir()
    layer = tmp_path / "in" / "layer.tar"
    subprocess.run(["tar", "-C", os.fspath(tree), "-cf", os.fspath(layer), "."], check=True)
    p = run_mkfs(tmp_path / "x.img", layer, "--tar=i", "--chunksize=65536", check=False)
    assert p.returncode == 1 and p.stderr.startswith("error: --chunksize: not with --tar=i")
    assert len(p.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["in"]
