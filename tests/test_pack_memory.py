"""`erofs-tools pack` keeps its memory bounded: a fixed amount (interpreter, buffers in
flight) plus a few hundred bytes per entry and per distinct chunk (issue 17: pack's
peak RSS against mkfs.erofs --chunksize --blobdev's).

The peak is VmHWM of the pack process itself (reset by exec), read at exit; the
per-entry growth is the difference between a tree of many small files plus a few large
ones and a one-file tree, so the interpreter's own size does not enter the bound.
"""
import os
import random
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIB, MIB = 1 << 10, 1 << 20

# pack's own VmHWM, printed to stderr at exit
_CHILD = (
    "import atexit, sys\n"
    "def hwm():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            sys.stderr.write('HWM %d\\n' % int(line.split()[1]))\n"
    "atexit.register(hwm)\n"
    "from erofs_tools.cli import main\n"
    "sys.argv[0] = 'erofs-tools'\n"
    "main()\n")

FILES = 20000           # small files, each distinct (a chunk each)
BIG = 6                 # files of BIG_SIZE: the chunk buffers in flight
BIG_SIZE = 6 * MIB
# bytes per entry allowed over the one-file tree: the C node (~180 bytes), its dirent
# and name, the chunk records (~100 bytes per chunk) and headroom. Before issue 17's
# work this tree took ~1 KiB per entry (and ~25 MiB of buffers and free heap more).
PER_ENTRY = 600
FIXED = 12 * MIB        # buffers in flight, free heap, the bootstrap written at the end


def _tree(root, files, big):
    rnd = random.Random(17)
    for i in range(files):
        d = os.path.join(root, f"d{i % 100:02d}", f"e{i % 7}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"file-{i:05d}.txt"), "wb") as f:
            f.write(b"%d\n" % i + rnd.randbytes(rnd.randrange(64, 1024)))
    for i in range(big):
        with open(os.path.join(root, f"big{i}"), "wb") as f:
            f.write(rnd.randbytes(BIG_SIZE))


def _pack_hwm(src, out):
    os.makedirs(out)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _CHILD, "pack", str(src), "-B",
                        os.path.join(out, "boot"), "-D", str(out), "--compressor", "none",
                        "-q"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    hwm = [int(x.split()[1]) for x in r.stderr.splitlines() if x.startswith("HWM ")]
    assert hwm, r.stderr
    return hwm[0] * KIB


def test_pack_peak_memory_per_entry(tmp_path):
    small = tmp_path / "small"
    os.makedirs(small)
    (small / "one").write_bytes(b"x" * 100)
    big = tmp_path / "big"
    _tree(big, FILES, BIG)
    entries = sum(len(d) + len(f) for _, d, f in os.walk(big)) + 1
    # the lower of two runs each: another job's burst never adds to our RSS, but a
    # slow run keeps more buffers in flight
    base = min(_pack_hwm(small, tmp_path / "o1"), _pack_hwm(small, tmp_path / "o2"))
    peak = min(_pack_hwm(big, tmp_path / "o3"), _pack_hwm(big, tmp_path / "o4"))
    grew = peak - base
    print(f"pack peak RSS: {base / MIB:.1f} MiB for one file, {peak / MIB:.1f} MiB for "
          f"{entries} entries ({grew / entries:.0f} bytes per entry over it)")
    assert grew <= FIXED + PER_ENTRY * entries, \
        (f"pack's peak RSS grew {grew / MIB:.1f} MiB over the one-file tree for {entries} "
         f"entries (bound {(FIXED + PER_ENTRY * entries) / MIB:.1f} MiB)")


# modules a default pack (blake3 digests) must not load: each is RSS for nothing
# (libcrypto ~3.5 MiB: the blob id is the C core's sha256; ctypes ~0.5 MiB; logging via
# concurrent.futures ~1.2 MiB; zstandard with --compressor none ~1 MiB)
_UNWANTED = ("_hashlib", "ctypes", "concurrent.futures", "logging", "zstandard")
_MODULES = (
    "import atexit, sys\n"
    "atexit.register(lambda: sys.stderr.write('MODULES %s\\n' % ' '.join(\n"
    f"    m for m in {_UNWANTED!r} if m in sys.modules)))\n"
    "from erofs_tools.cli import main\n"
    "sys.argv[0] = 'erofs-tools'\n"
    "main()\n")


@pytest.mark.parametrize("compressor,wanted", [("none", ""), ("zstd", "zstandard")])
def test_pack_loads_no_module_it_does_not_use(tmp_path, compressor, wanted):
    """zstd: zstandard only (logging was imported for a debug line nobody configured to
    see: ~10 ms before the workers started)."""
    src = tmp_path / "src"
    _tree(src, 50, 1)
    out = tmp_path / "out"
    os.makedirs(out)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _MODULES, "pack", str(src), "-B",
                        str(out / "boot"), "-D", str(out), "--compressor", compressor, "-q"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    line = [x for x in r.stderr.splitlines() if x.startswith("MODULES")]
    assert line == ["MODULES " + wanted], r.stderr
    assert len(os.listdir(out)) == 2        # the bootstrap and the blob
