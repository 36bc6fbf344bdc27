"""Random trees (hypothesis) -> erofs-tools mkfs / pack / mkfs.erofs -> unpack: the unpacked
tree equals the source with full metadata, and check passes."""
import os
import random
import shutil
import subprocess
import sys
import tempfile

import pytest
from helpers import compare_trees, is_root, require
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erofs_tools.reader.fsck import check_image
from erofs_tools.reader.image import open_image
from erofs_tools.reader.unpack import unpack_to_dir

NAMES = st.text(
    alphabet=st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)),
    min_size=1, max_size=24).filter(lambda n: n not in (".", "..") and len(n.encode()) <= 254)
MTIME = st.integers(min_value=0, max_value=(1 << 33) - 1).flatmap(
    lambda s: st.integers(min_value=0, max_value=999_999_999).map(lambda ns: s * 10**9 + ns))
IDS = st.integers(min_value=0, max_value=70000)
XATTRS = st.dictionaries(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=20)
    .map(lambda s: "user." + s), st.binary(max_size=64), max_size=3)
_WORDS = [bytes(random.Random(i).choice(b"abcdefghij") for _ in range(1 + i % 7)) for i in range(64)]
_rnd = random.Random(99)
# one compressible text that files hold parts of, at other offsets (-E dedupe)
SHARED = b" ".join(_rnd.choice(_WORDS) for _ in range(40000))
DATA = st.one_of(
    st.binary(max_size=9000),
    st.tuples(st.binary(min_size=1, max_size=64), st.integers(1, 3000)).map(lambda t: t[0] * t[1]),
    st.tuples(st.binary(max_size=3000), st.integers(0, 60000), st.integers(5000, 200000)).map(
        lambda t: t[0] + SHARED[t[1]:t[1] + t[2]]),
)


@st.composite
def trees(draw, depth=0):
    """A directory spec: {name: entry}; entry = (kind, payload, meta)."""
    n = draw(st.integers(0, 7 if depth < 2 else 3))
    names = draw(st.lists(NAMES, min_size=n, max_size=n, unique_by=lambda s: s.encode()))
    out = {}
    for name in names:
        kinds = ["file", "file", "symlink", "fifo", "hardlink"]
        if depth < 3:
            kinds.append("dir")
        kind = draw(st.sampled_from(kinds))
        meta = {"mode": draw(st.integers(0, 0o7777)), "uid": draw(IDS), "gid": draw(IDS),
                "mtime": draw(MTIME), "xattrs": draw(XATTRS) if kind in ("file", "dir") else {}}
        if kind == "file":
            payload = draw(DATA)
        elif kind == "symlink":
            payload = draw(st.text(min_size=1, max_size=80).filter(
                lambda t: "\0" not in t and len(t.encode()) < 4000))
        elif kind == "dir":
            payload = draw(trees(depth + 1))
            meta["mode"] |= 0o700
        else:
            payload = None
        out[name] = (kind, payload, meta)
    return out


def materialize(spec, root):
    """Create the tree; hardlinks point at the first regular file created before them."""
    files = []
    dirs = []

    def build(d, spec):
        for name, (kind, payload, meta) in spec.items():
            p = os.path.join(d, name)
            if kind == "file":
                with open(p, "wb") as f:
                    f.write(payload)
                files.append(p)
            elif kind == "symlink":
                os.symlink(payload, p)
            elif kind == "fifo":
                os.mkfifo(p)
            elif kind == "hardlink":
                if not files:
                    with open(p, "wb") as f:
                        f.write(b"standalone")
                    files.append(p)
                else:
                    os.link(files[0], p)
                    continue              # metadata belongs to the first link
            elif kind == "dir":
                os.mkdir(p)
                build(p, payload)
                dirs.append((p, meta))
                continue
            _meta(p, meta, kind)

    def _meta(p, meta, kind):
        os.chown(p, meta["uid"], meta["gid"], follow_symlinks=False)
        for k, v in meta["xattrs"].items():
            os.setxattr(p, k, v)
        if kind != "symlink":
            os.chmod(p, meta["mode"])
        os.utime(p, ns=(meta["mtime"],) * 2, follow_symlinks=False)

    os.mkdir(root)
    build(root, spec)
    for p, meta in reversed(dirs):
        _meta(p, meta, "dir")
    os.utime(root, ns=(1_600_000_000_123_456_789,) * 2)
    return root


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "erofs_tools", *map(str, args)],
                          capture_output=True)


def _round_trip(spec, builder, zargs=()):
    work = tempfile.mkdtemp(prefix="hyp-")
    try:
        src = materialize(spec, os.path.join(work, "src"))
        blobs = None
        devices = []
        if builder == "mkfs":
            img_path = os.path.join(work, "img")
            p = _cli("mkfs", "-q", img_path, src)
        elif builder == "mkfs -z":
            img_path = os.path.join(work, "img")
            p = _cli("mkfs", "-q", *zargs, img_path, src)
        elif builder == "mkfs.erofs -z":
            img_path = os.path.join(work, "img")
            p = subprocess.run(["mkfs.erofs", "--quiet", *zargs, img_path, src],
                               capture_output=True)
        elif builder == "pack":
            img_path = os.path.join(work, "boot")
            blobs = os.path.join(work, "blobs")
            os.mkdir(blobs)
            p = _cli("pack", "-q", "-B", img_path, "-D", blobs, "--chunk-size", "4K", src)
        else:
            img_path = os.path.join(work, "img")
            dev = os.path.join(work, "dev")
            open(dev, "wb").close()
            p = subprocess.run(["mkfs.erofs", "--quiet", "--chunksize=4096",
                                f"--blobdev={dev}", img_path, src], capture_output=True)
            devices = [dev]
        assert p.returncode == 0, p.stderr
        img = open_image(img_path, blob_dir=blobs, devices=devices)
        problems = check_image(img, img.blobs)
        assert problems == [], problems
        out = os.path.join(work, "out")
        unpack_to_dir(img, out)
        diffs = compare_trees(src, out, check_nlink=True)
        assert diffs == [], diffs
    finally:
        shutil.rmtree(work, ignore_errors=True)


SETTINGS = settings(max_examples=12, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("builder", ["mkfs", "pack", "mkfs.erofs"])
def test_random_trees_round_trip(builder):
    require(is_root(), "needs root (owners, modes)")
    if builder == "mkfs.erofs":
        require(shutil.which("mkfs.erofs") is not None, "mkfs.erofs not installed")

    @SETTINGS
    @given(trees())
    def run(spec):
        _round_trip(spec, builder)

    run()


# compressed layouts: every algorithm, big pclusters, full indexes, ztailpacking,
# fragments and dedupe (data repeats in DATA make dedupe and fragments share pclusters,
# whole or in part)
Z_ALGS = st.sampled_from(["lz4", "lz4hc", "zstd", "lzma", "deflate"])
OUR_Z = st.tuples(Z_ALGS, st.sampled_from([[], ["-C", "16384"], ["-C", "65536"],
                                           ["-E", "legacy-compress"]]),
                  st.sampled_from([[], ["-E", "dedupe"], ["-E", "dedupe,ztailpacking"],
                                   ["-E", "fragments,dedupe"]])).map(
    lambda t: ["-z", t[0], *t[1], *t[2]])
REF_Z = st.tuples(Z_ALGS, st.lists(st.sampled_from(["ztailpacking", "fragments", "dedupe",
                                                    "legacy-compress"]), unique=True),
                  st.sampled_from([[], ["-C16384"], ["-C65536"]])).map(
    lambda t: [f"-z{t[0]}", *([f"-E{','.join(t[1])}"] if t[1] else []), *t[2]])


@pytest.mark.parametrize("builder", ["mkfs -z", "mkfs.erofs -z"])
def test_random_trees_round_trip_compressed(builder):
    """Random trees compressed by our mkfs -z and by mkfs.erofs 1.9 (every layout it
    writes): unpack equals the source, check passes."""
    require(is_root(), "needs root (owners, modes)")
    if builder == "mkfs.erofs -z":
        require(shutil.which("mkfs.erofs") is not None, "mkfs.erofs not installed")

    @SETTINGS
    @given(trees(), OUR_Z if builder == "mkfs -z" else REF_Z)
    def run(spec, zargs):
        _round_trip(spec, builder, zargs)

    run()
