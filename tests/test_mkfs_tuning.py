"""mkfs.erofs 1.9's --fsalignblks, --dsunit, --max-extent-bytes and --async-queue-limit.

--fsalignblks is written (the image and sb.blocks rounded up to a power-of-two number of
blocks, as mkfs.erofs rounds its primary device), --dsunit too without -z (each file's
data on a multiple of N blocks); the others are accepted only where they leave the image
as it is (--async-queue-limit is mkfs.erofs's job queue length; --max-extent-bytes
without -z caps nothing) and refused with one line where mkfs.erofs's image would differ
from ours."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import tarfile

import pytest
from helpers import assert_same_tree, fsck, mounted, require_tool, run_erofs_tools

B_SB_BLOCKS = 1024 + 36          # erofs_super_block.blocks


def _sb_blocks(path):
    with open(path, "rb") as f:
        f.seek(B_SB_BLOCKS)
        return struct.unpack("<I", f.read(4))[0]


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(30):
        (src / "d" / f"f{i}").write_bytes(b"data %d\n" % i * (i * 211 + 3))
    (src / "big").write_bytes(os.urandom(70000))
    return src


@pytest.mark.parametrize("n,unit", [("8", 8), ("5", 8), ("0x3", 4), ("1", 1)])
@pytest.mark.parametrize("args", [[], ["-zlz4hc", "-Efragments"]])
def test_fsalignblks_rounds_the_image_and_sb_blocks(tmp_path, tree, n, unit, args):
    plain, ours, theirs = tmp_path / "plain", tmp_path / "ours", tmp_path / "theirs"
    run_erofs_tools("mkfs", "-q", "-T1", "-Uclear", *args, plain, tree)
    run_erofs_tools("mkfs", "-q", "-T1", "-Uclear", *args, f"--fsalignblks={n}", ours, tree)
    blocks = plain.stat().st_size // 4096
    want = -(-blocks // unit) * unit
    assert ours.stat().st_size == want * 4096 and _sb_blocks(ours) == want
    assert ours.read_bytes()[plain.stat().st_size:] == bytes((want - blocks) * 4096)
    require_tool("mkfs.erofs")
    subprocess.run(["mkfs.erofs", "--quiet", "-T1", "-Uclear", *args, f"--fsalignblks={n}",
                    theirs, tree], check=True, capture_output=True)
    assert _sb_blocks(theirs) % unit == 0
    for img in (ours, theirs):
        assert img.stat().st_size == _sb_blocks(img) * 4096
        fsck(img)
        with mounted(img) as mnt:
            assert_same_tree(tree, mnt, ignore=("mtime_ns",))


def test_fsalignblks_with_tar_index_maps_the_tar_after_the_rounded_index(tmp_path, tree):
    t = tmp_path / "l.tar"
    with tarfile.open(t, "w") as tf:
        tf.add(tree, arcname=".")
    idx = tmp_path / "idx"
    run_erofs_tools("mkfs", "--tar=i", "--fsalignblks=64", "-q", idx, t)
    assert idx.stat().st_size % (64 * 512) == 0 and _sb_blocks(idx) * 512 == idx.stat().st_size
    fsck(idx, devices=[t])
    both = tmp_path / "both"
    both.write_bytes(idx.read_bytes() + t.read_bytes())
    with mounted(both) as mnt:
        assert_same_tree(tree, mnt, ignore=("mtime_ns",))     # (the tar's precision)


def _first_blocks(img):
    """{path: first data block} of every regular file with a whole block of data,
    as dump.erofs lists their extents."""
    out = {}
    for rel in ("big", *(f"d/f{i}" for i in range(30))):
        p = subprocess.run(["dump.erofs", f"--path=/{rel}", "-e", img], capture_output=True,
                           text=True, check=True).stdout
        ext = [ln for ln in p.splitlines() if ln.strip().startswith("0:")]
        size = int(p.split("Size: ")[1].split()[0])
        if size >= 4096:
            out[rel] = int(ext[0].split(":")[2].split("..")[0]) // 4096
    return out


@pytest.mark.parametrize("unit", [4, 3, 16])
@pytest.mark.parametrize("tar", [False, True])
def test_dsunit_aligns_each_files_data(tmp_path, tree, unit, tar):
    (tree / "sparse").write_bytes(b"")
    with open(tree / "sparse", "wb") as f:        # (chunk-based: aligned too, not listed)
        f.seek(3 << 20)
        f.write(b"x" * 10000)
    src = tree
    if tar:
        src = tmp_path / "l.tar"
        with tarfile.open(src, "w", format=tarfile.GNU_FORMAT) as tf:
            tf.add(tree, arcname=".")
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    tflag = ["--tar=f"] if tar else []
    run_erofs_tools("mkfs", "-q", *tflag, f"--dsunit={unit}", ours, src)
    require_tool("dump.erofs")
    firsts = _first_blocks(ours)
    assert len(firsts) >= 20 and all(b % unit == 0 for b in firsts.values()), firsts
    fsck(ours)
    with mounted(ours) as mnt:
        assert_same_tree(tree, mnt, ignore=("mtime_ns",))
    require_tool("mkfs.erofs")
    subprocess.run(["mkfs.erofs", "--quiet", *tflag, f"--dsunit={unit}", theirs, src],
                   check=True, capture_output=True)
    assert all(b % unit == 0 for b in _first_blocks(theirs).values())
    fsck(theirs)
    with mounted(theirs) as mnt:
        assert_same_tree(tree, mnt, ignore=("mtime_ns",))


def test_tuning_knobs_that_change_nothing_are_accepted(tmp_path, tree):
    base = tmp_path / "base"
    run_erofs_tools("mkfs", "-q", "-T1", "-Uclear", base, tree)
    for opt in ("--async-queue-limit=16", "--async-queue-limit=0", "--dsunit=0",
                "--dsunit=1", "--max-extent-bytes=8192"):
        out = tmp_path / "out"
        run_erofs_tools("mkfs", "-q", "-T1", "-Uclear", opt, out, tree)
        assert out.read_bytes() == base.read_bytes(), opt


@pytest.mark.parametrize("args,what", [
    (["--dsunit=x"], "--dsunit"),
    (["--max-extent-bytes=1000", "-zlz4"], "block size"),        # (mkfs.erofs: both too)
    (["--max-extent-bytes=-8192", "-zlz4"], "unaligned"),
    (["--max-extent-bytes=-8192", "-zlz4", "-E48bit"], "unaligned"),
    (["--max-extent-bytes=x"], "--max-extent-bytes"),
    (["--async-queue-limit=3"], "power of two"),
    (["--async-queue-limit=q"], "--async-queue-limit"),
    (["--fsalignblks=-1"], "--fsalignblks"),
])
def test_what_would_change_the_image_is_refused(tmp_path, tree, args, what):
    r = run_erofs_tools("mkfs", *args, tmp_path / "img", tree, check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and what in r.stderr, r.stderr
    assert not (tmp_path / "img").exists()


def _extents(img, rel, phys=False):
    """[(logical start, logical length, physical length[, physical start])] of a file,
    as dump.erofs -e."""
    p = subprocess.run(["dump.erofs", f"--path=/{rel}", "-e", img], capture_output=True,
                       text=True, check=True).stdout
    out = []
    for ln in p.splitlines():
        f = ln.replace("|", " ").replace("..", " ").replace(":", " ").split()
        if len(f) == 7 and f[0].isdigit():
            out.append((int(f[1]), int(f[3]), int(f[6]), *((int(f[4]),) if phys else ())))
    return out


@pytest.mark.parametrize("args", [["-zlz4hc"], ["-zlz4hc", "-C65536", "-Eztailpacking"],
                                  ["-zlzma", "-Efragments"], ["-zlz4", "-Ededupe"]],
                         ids=" ".join)
def test_dsunit_with_z_aligns_each_files_first_pcluster(tmp_path, tree, args):
    """--dsunit with -z (was refused): as mkfs.erofs 1.9.4 maps each file's data, the
    first pcluster of every file with data blocks (compressed or stored plain) starts on
    a multiple of the unit; the pclusters after it follow it."""
    for i in range(6):
        (tree / f"t{i}").write_bytes(b"text %d of a file, " % i * (3000 + 977 * i))
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    run_erofs_tools("mkfs", "-q", "-T1", "-Uclear", *args, "--dsunit=4", ours, tree)
    require_tool("mkfs.erofs")
    subprocess.run(["mkfs.erofs", "--quiet", "-T1", "-Uclear", *args, "--dsunit=4", theirs,
                    tree], check=True, capture_output=True)
    require_tool("dump.erofs")
    rels = ["big", *(f"t{i}" for i in range(6)), *(f"d/f{i}" for i in range(30))]
    for img in (ours, theirs):
        firsts = {}
        for rel in rels:
            ext = [e for e in _extents(img, rel, phys=True) if e[2] and e[2] % 4096 == 0]
            if ext:
                firsts[rel] = ext[0][3] // 4096
        assert firsts and all(b % 4 == 0 for b in firsts.values()), (img, sorted(firsts.items()))
        fsck(img)
        with mounted(img) as mnt:
            assert_same_tree(tree, mnt, ignore=("mtime_ns",))
    # (+ a unit: the records ours places after the data where mkfs.erofs fills the
    # blocks skipped before an aligned file; Python's library: 0.985-1.006 of its size)
    assert ours.stat().st_size <= theirs.stat().st_size * 1.01 + 4 * 4096


@pytest.mark.parametrize("cap", ["8192", "5000"])
@pytest.mark.parametrize("args", [["-zlz4hc"], ["-zlz4hc", "-C65536", "-Eztailpacking"],
                                  ["-zlz4", "-C32768", "-Efragments"],
                                  ["-zlzma", "-C16384"]], ids=" ".join)
def test_max_extent_bytes_caps_each_compressed_extent(tmp_path, tree, args, cap):
    """--max-extent-bytes with -z (was refused): every extent takes at most that much
    input, as mkfs.erofs 1.9.4 cuts them (not a fragment: the packed inode's; nor an
    inline tail), the image no larger than 1 % over mkfs.erofs's. (Not -Ededupe here:
    these files of "data N\n" repeated have no anchor for our matches, mkfs.erofs's
    rolling hash finds them: +10-22 % with the cap.)"""
    rnd = random.Random(7)
    words = [b"extent", b"of", b"text", b"capped", b"pcluster", b"erofs", b"block", b"\n"]
    (tree / "text").write_bytes(b" ".join(rnd.choice(words) for _ in range(90000))[:540000])
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    run_erofs_tools("mkfs", "-q", "-T1", "-Uclear", *args, f"--max-extent-bytes={cap}", ours, tree)
    require_tool("dump.erofs")
    for rel in ("text", "d/f29"):         # (big: random, stored uncompressed)
        ext = _extents(ours, rel)
        assert ext and all(n <= int(cap) for _s, n, plen in ext if plen), (rel, ext)
    assert len(_extents(ours, "text")) >= (500000 - 65536) // int(cap)   # (a fragment)
    fsck(ours)
    require_tool("mkfs.erofs")
    subprocess.run(["mkfs.erofs", "--quiet", "-T1", "-Uclear", *args,
                    f"--max-extent-bytes={cap}", theirs, tree], check=True, capture_output=True)
    assert ours.stat().st_size <= theirs.stat().st_size * 1.01
    for img in (ours, theirs):
        with mounted(img) as mnt:
            assert_same_tree(tree, mnt, ignore=("mtime_ns",))


def test_mkfs_erofs_refuses_a_queue_limit_not_a_power_of_two(tmp_path, tree):
    require_tool("mkfs.erofs")
    p = subprocess.run(["mkfs.erofs", "--quiet", "--async-queue-limit=3", tmp_path / "img",
                        tree], capture_output=True, text=True)
    assert p.returncode != 0, p.stdout + p.stderr


def test_help_lists_them():
    out = " ".join(run_erofs_tools("mkfs", "--help").stdout.split())
    for opt in ("--fsalignblks", "--dsunit", "--max-extent-bytes", "--async-queue-limit"):
        assert opt in out
    assert "no effect" in out


def test_max_extent_bytes_with_dedupe_stores_one_block_then_compresses_again(tmp_path):
    """-Ededupe: an extent that does not compress is stored one block at a time, the
    next one compressed again from the block after (as mkfs.erofs): here 4 KiB of
    random bytes before text, capped at 8 KiB, give mkfs.erofs's extents (one plain
    block, then 8 KiB extents; two plain blocks before)."""
    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(3)
    words = [b"extent", b"of", b"text", b"after", b"noise", b"\n"]
    text = b" ".join(rnd.choice(words) for _ in range(20000))
    (src / "mixed").write_bytes(os.urandom(4096) + text)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    args = ["-zlz4hc", "-C65536", "-Ededupe", "--max-extent-bytes=8192"]
    run_erofs_tools("mkfs", "-q", "-T1", "-Uclear", *args, ours, src)
    require_tool("mkfs.erofs")
    subprocess.run(["mkfs.erofs", "--quiet", "-T1", "-Uclear", *args, theirs, src],
                   check=True, capture_output=True)
    require_tool("dump.erofs")
    got = _extents(ours, "mixed")
    assert got[:3] == [(0, 4096, 4096), (4096, 8192, 4096), (12288, 8192, 4096)], got[:3]
    assert [e[:2] for e in got] == [e[:2] for e in _extents(theirs, "mixed")]
    assert ours.stat().st_size <= theirs.stat().st_size
    fsck(ours)
    with mounted(ours) as mnt:
        assert_same_tree(src, mnt, ignore=("mtime_ns",))
