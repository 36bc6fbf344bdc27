"""Hostile bootstraps against the C core's file-runs walk (csrc/fileruns.c), the walk the
daemon does at every mount (reader.runs.data_runs): its memory stays bounded, and where
it gives up the reader's walk gives the same answer. Found by helper fuzzc's fuzzing
(docs/fuzzing.md)."""
from __future__ import annotations

import io
import subprocess
import sys
import tarfile

DEPTH = 6000


def _deep_chain_tar(path, depth: int) -> None:
    # a/a/a/... : one-letter names make the most levels for the bytes of an image
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        p = ""
        for _ in range(depth):
            p = (p + "/" if p else "") + "a"
            ti = tarfile.TarInfo(p)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            t.addfile(ti)
        ti = tarfile.TarInfo(p + "/f")
        ti.size = 5
        t.addfile(ti, io.BytesIO(b"hello"))


# the child's own peak, VmHWM of its mm (ru_maxrss starts at pytest's, forked: in a
# whole-suite run hundreds of MiB, under which the walk's growth would not show)
_MEASURE = """
import sys
from erofs_tools._native_runs import file_runs_walk
from erofs_tools.reader.image import open_image


def peak_kib():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))


img = open_image(sys.argv[1])
before = peak_kib()
got = file_runs_walk(img.data, img.meta_off, img.blkszbits, img.root_nid,
                     img.device_id_mask, len(img.devices), 1 << 22)
grew = peak_kib() - before
print(got is None, grew >> 10)
"""


def test_a_deep_directory_chain_costs_the_c_walk_bounded_memory(tmp_path):
    """6,000 nested directories (an image of ~600 KB that our own mkfs builds): the C
    walk kept every directory's path, the sum of their lengths (36 MB here, ~1 GB at
    the 32,000 levels a 64 KiB path allows, unbounded for a crafted image). Past its
    budget (16 x image size + 16 MiB) it leaves the image to the reader's walk, which
    finds the same (no) runs."""
    from erofs_tools.reader.image import open_image
    from erofs_tools.reader.runs import _reader_runs, data_runs

    tar, boot = tmp_path / "deep.tar", tmp_path / "deep.img"
    _deep_chain_tar(tar, DEPTH)
    r = subprocess.run([sys.executable, "-m", "erofs_tools", "mkfs", "--tar=f", "-T", "0",
                        str(boot), str(tar)], capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr
    tar.unlink()
    size = boot.stat().st_size
    assert size < 1 << 20
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(boot)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    gave_up, grew_mib = out.stdout.split()
    assert gave_up == "True"
    # at most the budget's pages touched (and a little), not the 36 MB of paths
    assert int(grew_mib) < ((16 * size + (16 << 20)) >> 20) + 4
    img = open_image(str(boot))
    try:
        assert data_runs(img) == _reader_runs(img, 1 << 22, 0) == ([], [])
        # the tree is walked whole: the file at the bottom is found
        deepest = [p for p, _d, ino in img.walk() if ino.is_reg()]
        assert deepest == [b"/" + b"/".join([b"a"] * DEPTH) + b"/f"]
    finally:
        img.close()
