"""Property test: random trees packed in both compressor modes and two chunk sizes mount
with the kernel and compare clean (full metadata), pass the nydusd structural rules and
fsck.erofs, and repack byte-identically."""
import os
import shutil
import subprocess
import tempfile

import pytest
from helpers import fsck
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_pack import compare_trees, need_root
from test_pack_validate import validate_rafs_bootstrap

from erofs_tools.builder.rafs import PackOptions, pack
from erofs_tools.mount import mount_rafs, umount

NAMES = st.text(alphabet="abc.-_XYZ\u00e9 ", min_size=1, max_size=12).filter(
    lambda s: s not in (".", ".."))

# content: (kind, size, seed); pooled seeds make identical chunks across files
CONTENT = st.tuples(st.sampled_from(["random", "zeros", "pattern", "sparse"]),
                    st.integers(0, 70_000), st.integers(0, 3))

ENTRY = st.tuples(
    st.lists(NAMES, min_size=1, max_size=3),               # path components
    st.sampled_from(["file", "file", "file", "dir", "symlink", "hardlink", "fifo"]),
    CONTENT,
    st.sampled_from([0o644, 0o600, 0o755, 0o4755, 0o2700, 0o1777, 0o444]),
    st.integers(0, 2_000_000_000), st.integers(0, 999_999_999),   # mtime s, ns
    st.integers(0, 70_000),                                 # uid
    st.booleans(),                                          # xattr
)


def _content(kind, size, seed):
    if kind == "zeros":
        return bytes(size)
    if kind == "pattern":
        return (bytes([seed + 1]) * 4096 + b"pattern%d" % seed)[: max(size, 1)] * \
            (size // max(4096, 1) + 1)
    r = __import__("random").Random(seed * 7919 + size)
    return r.randbytes(size)


def build(root, entries):
    root.mkdir()
    files = []
    made = []
    for comps, kind, (ckind, size, seed), mode, mt, mtn, uid, xa in entries:
        parent = root
        for c in comps[:-1]:
            parent = parent / c
            # lstat first: a symlink made earlier may point at a name too long to stat
            if parent.is_symlink() or os.path.lexists(parent) and not parent.is_dir():
                break
            parent.mkdir(exist_ok=True)
        else:
            p = parent / comps[-1]
            if os.path.lexists(p):
                continue
            if kind == "file":
                if ckind == "sparse":
                    with open(p, "wb") as f:
                        f.truncate(size * 8)
                        f.seek(size * 3)
                        f.write(b"s" * (seed * 100 + 1))
                else:
                    data = _content(ckind, size, seed)[:size]
                    p.write_bytes(data)
                files.append(p)
            elif kind == "dir":
                p.mkdir()
            elif kind == "symlink":
                os.symlink("t" * (size % 300 + 1), p)
            elif kind == "hardlink":
                if not files:
                    continue
                os.link(files[seed % len(files)], p)
            elif kind == "fifo":
                os.mkfifo(p)
            if kind != "symlink":
                os.chmod(p, mode)
            os.lchown(p, uid, uid // 2)
            if xa and kind in ("file", "dir"):
                os.setxattr(p, f"user.k{seed}", b"v" * (size % 200))
            made.append((p, mt, mtn))
    # mtimes last, deepest first, so later writes do not move directory mtimes
    for p, mt, mtn in sorted(made, key=lambda x: -len(x[0].parts)):
        os.utime(p, ns=(mt * 10**9, mt * 10**9 + mtn), follow_symlinks=False)


@pytest.mark.root
@pytest.mark.parametrize("compressor", ["zstd", "none"])
@pytest.mark.parametrize("chunk_size", [4096, 16384])
def test_random_trees(compressor, chunk_size):
    need_root()

    @settings(max_examples=int(os.environ.get("PACK_PROPERTY_EXAMPLES", "40")), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(ENTRY, min_size=0, max_size=25))
    def check(entries):
        tmp = tempfile.mkdtemp(prefix="packprop-")
        try:
            from pathlib import Path
            t = Path(tmp)
            src = t / "src"
            build(src, entries)
            blobs = t / "blobs"
            blobs.mkdir()
            opts = PackOptions(chunk_size=chunk_size, compressor=compressor, workers=2)
            r = pack(src, t / "boot", blobs, opts)
            sizes = {n: os.path.getsize(blobs / n) for n in os.listdir(blobs)}
            validate_rafs_bootstrap(str(t / "boot"), sizes)
            mnt = t / "mnt"
            mnt.mkdir()
            devices = mount_rafs(str(t / "boot"), str(mnt), str(blobs), str(t / "cache"))
            try:
                compare_trees(src, mnt)
            finally:
                umount(str(mnt))
            fsck(t / "boot", extract=False, devices=devices)
            # reproducible
            (t / "b2").mkdir()
            r2 = pack(src, t / "boot2", t / "b2", opts)
            assert r2["blob_id"] == r["blob_id"]
            assert (t / "boot").read_bytes() == (t / "boot2").read_bytes()
        finally:
            subprocess.run(["umount", os.path.join(tmp, "mnt")], capture_output=True)
            shutil.rmtree(tmp)

    check()
