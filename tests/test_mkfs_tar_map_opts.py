"""`erofs-tools mkfs --tar=i,MAPFILE` with `-z`, `--zD`, `--MZ`, a plain `-m` and
`--vmdk-desc`, which mkfs.erofs 1.9.4 takes there (they were refused before, so each test
here failed on the code before it). What they change is the metadata, never the map's
lines but for their block addresses: with `-z` alone (and its algorithms) and with a
compressed metabox (`-m -z`: the region before its blocks, as 1.9.4 places it) the same
lines as 1.9.4's; with `--zD`, `--MZ` and a plain `-m` every block address moved by the
same amount, since 1.9.4 puts the packed inode's data, the metadata zone and the
metabox's data after the data region and ours before it. Each image (ours and 1.9.4's)
assembled from its map and the tar is the tar's tree in the host kernel (full metadata)
and passes fsck.erofs 1.9.4."""
import gzip
import os
import subprocess
import tarfile

import pytest
from helpers import anchor_mkfs, compare_trees, fsck, mounted, require_tool
from test_mkfs_tar_map import _add, _assemble, _lines, _mkfs, _nid_order
from test_tar_helpers import tar_x_reference


def _layer(path, n=240):
    """Every directory with an entry of its own (the kernel's view compares with `tar
    -x` in full), a metadata area of several blocks, files of unaligned sizes, symlinks
    (plain even with -z), a hardlink."""
    sizes = (0, 1, 100, 511, 513, 4095, 4096, 4097, 9000, 70000)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "./", "d")
        for d in range(6):
            _add(tf, f"dir{d}", "d", mode=0o750 + d)
        for i in range(n):
            _add(tf, f"dir{i % 6}/file{i:04d}" + "y" * (i % 30),
                 data=bytes([i % 251]) * sizes[i % len(sizes)], mtime=1700000000 + i)
        _add(tf, "dir0/ln", "l", link="file0001")
        _add(tf, "dir1/hard", "h", link="dir1/file0001y")
    return str(path)


def _by_offset(mapfile):
    """tar offset -> (image block, the rest of the line)"""
    return {ln.split()[2]: (int(ln.split()[0], 16), ln.split()[1:]) for ln in _lines(mapfile)}


# (options, 1.9.4's lines the same as ours: the metadata before the region placed alike)
CASES = [
    (("-zlz4hc",), True),
    (("-zlzma", "-Eztailpacking"), True),
    (("-zdeflate",), True),
    (("--zD",), False),
    (("-zlz4hc", "--zD"), False),
    (("-zzstd", "--zD", "-Eztailpacking"), False),
    (("-zlz4hc", "--zD", "-Efragments"), False),
    (("--MZ",), False),
    (("--MZ=i", "-zlz4hc", "--zD"), False),
    (("-m4096",), False),
    (("-m4096", "--zD"), False),
    (("-m4096", "-zlz4hc"), True),
    (("-m8192:lzma", "-zlz4hc:lzma", "-C8192", "--zD"), True),
    (("-m4096", "-zlz4hc", "--MZ=id"), True),
]


@pytest.mark.root
@pytest.mark.parametrize("args, same", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_map_with_metadata_options(tmp_path, args, same, capsys):
    tar_path = _layer(tmp_path / "l.tar")
    ref = tar_x_reference(tar_path, tmp_path / "ref")
    ours, theirs = tmp_path / "o.map", tmp_path / "a.map"
    _mkfs(*args, f"--tar=i,{ours}", tmp_path / "o.idx", tar_path, epoch=False)
    anchor_mkfs(tmp_path / "a.idx", tar_path, *args, f"--tar=i,{theirs}", epoch=None)
    o, a = _by_offset(ours), _by_offset(theirs)
    assert o.keys() == a.keys() and len(o) == 216        # (size 0: no line)
    assert all(o[k][1] == a[k][1] for k in o)            # blocks, zeroed tail
    shift = {o[k][0] - a[k][0] for k in o}
    assert len(shift) == 1
    if same:
        assert shift == {0} and sorted(_lines(ours)) == sorted(_lines(theirs))
    _nid_order(tmp_path / "o.idx", ours, tar_path)
    sizes = [os.path.getsize(tmp_path / f"{w}.idx") for w in "oa"]
    with capsys.disabled():
        print(f"\n{' '.join(args)}: index {sizes[0]} bytes, 1.9.4 {sizes[1]} "
              f"({sizes[0] / sizes[1]:.3f}); ours - 1.9.4 block addresses: {shift.pop()}")
    for who, mp in (("o", ours), ("a", theirs)):
        full = _assemble(tmp_path / f"{who}.idx", mp, tar_path, tmp_path / f"{who}.erofs",
                         4096)
        fsck(full)
        with mounted(full) as mnt:
            diffs = compare_trees(str(ref), mnt, check_nlink=True)
            assert not diffs, f"{who} {args}: " + "\n".join(diffs[:40])


@pytest.mark.root
def test_map_vmdk_desc(tmp_path, monkeypatch):
    """`--vmdk-desc` with `i,MAPFILE`: no extra device, the descriptor names the image
    alone, as 1.9.4's (the same text for the same uuid); once the image's region is
    filled in place from the map, QEMU's reading of the descriptor is that image, which
    the kernel mounts as the tar's tree."""
    monkeypatch.chdir(tmp_path)
    tar_path = _layer(tmp_path / "l.tar")
    ref = tar_x_reference(tar_path, tmp_path / "ref")
    _mkfs("--vmdk-desc", "o.vmdk", "--tar=i,o.map", "o.img", "l.tar", epoch=False)
    anchor_mkfs("a.img", "l.tar", "-U", "6f0bd3a4-3f5e-4c55-9d1a-2a1f0e5c9b77",
                "--vmdk-desc=a.vmdk", "--tar=i,a.map", epoch=None)
    text = (tmp_path / "o.vmdk").read_text()
    assert text.replace('"o.img"', '"a.img"') == (tmp_path / "a.vmdk").read_text()
    assert f'RW {os.path.getsize("o.img") // 512} FLAT "o.img" 0\n' in text
    # from a gzip stream on stdin too (no tar device, so no tar file to name)
    with open("l.tar", "rb") as f:
        _mkfs("--gzinfo", "--vmdk-desc", "g.vmdk", "--tar=i,g.map", "g.img", "-",
              input=gzip.compress(f.read()), epoch=False)
    assert (tmp_path / "g.vmdk").read_text() == text.replace('"o.img"', '"g.img"')
    os.replace(_assemble("o.img", "o.map", tar_path, tmp_path / "o.full", 4096), "o.img")
    require_tool("qemu-img")
    subprocess.run(["qemu-img", "convert", "-f", "vmdk", "-O", "raw", "o.vmdk", "disk.raw"],
                   check=True, capture_output=True)
    assert (tmp_path / "disk.raw").read_bytes() == (tmp_path / "o.img").read_bytes()
    fsck(tmp_path / "disk.raw")
    with mounted(tmp_path / "disk.raw") as mnt:
        diffs = compare_trees(str(ref), mnt, check_nlink=True)
        assert not diffs, "\n".join(diffs[:40])

