"""`erofs-tools mkfs --tar=MODE,MAPFILE` against mkfs.erofs 1.9.4: with `i` (or `0`) an
index of -b blocks (no tar device) whose files' block maps point into a data region
after the metadata, left unwritten, and MAPFILE saying where each file's blocks come
from in the tar ("%08x %8x %08x[ %08u]": image block, blocks, tar offset, zeroed tail
bytes; nid order). The map's consumer is tested: the whole image assembled from the
index, the map and the tar, mounted with the host kernel and compared with the tar
extracted (full metadata), fsck.erofs 1.9.4. `--tar=0` is `i`; with `f` and
`headerball` the map is empty. Bad input: one line, exit 1, nothing written."""
import gzip
import io
import os
import tarfile

import pytest
from helpers import anchor_mkfs, compare_trees, fsck, mounted, require_tool
from test_tar_helpers import run_cli, tar_x_reference

UUID = "6f0bd3a4-3f5e-4c55-9d1a-2a1f0e5c9b77"


def _mkfs(*args, check=True, input=None, epoch=True):
    """ours, with -T 0 (every mtime 0, as mkfs.erofs's -T) unless epoch=False"""
    return run_cli("mkfs", *(("-T", "0") if epoch else ()), "-U", UUID, *args, check=check,
                   input=input)


def _add(tf, name, kind="f", data=b"", link="", mode=None, mtime=1700000000):
    ti = tarfile.TarInfo(name)
    ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = mtime, 1000, 100, "", ""
    if kind == "d":
        ti.type, ti.mode = tarfile.DIRTYPE, mode or 0o755
        tf.addfile(ti)
    elif kind == "l":
        ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, link, 0o777
        tf.addfile(ti)
    elif kind == "h":
        ti.type, ti.linkname, ti.mode = tarfile.LNKTYPE, link, mode or 0o644
        tf.addfile(ti)
    else:
        ti.size, ti.mode = len(data), mode or 0o644
        tf.addfile(ti, io.BytesIO(data))


def _small_tar(path, fmt=tarfile.GNU_FORMAT):
    """Files whose data sits at 512-byte tar offsets that are no block's start, block-sized
    and not, empty, a hardlink, a symlink, and a path given twice (the first entry's
    blocks stay in the region, unreferenced, as in mkfs.erofs 1.9.4)."""
    with tarfile.open(path, "w", format=fmt) as tf:
        _add(tf, "./", "d")
        _add(tf, "d", "d")
        _add(tf, "d/a", data=b"A" * 5000)
        _add(tf, "d/b", data=os.urandom(4096))
        _add(tf, "d/empty")
        _add(tf, "c", data=os.urandom(12345), mode=0o600)
        _add(tf, "d/ln", "l", link="a")
        _add(tf, "d/hard", "h", link="d/a")
        _add(tf, "z", data=b"z")
        _add(tf, "twice", data=b"first" * 2000)
        _add(tf, "twice", data=b"second" * 100)
        _add(tf, "big", data=os.urandom(70000) + b"\0" * 9000)
    return str(path)


def _many_tar(path, n=300):
    """Many files in several directories: a metadata area of several blocks."""
    sizes = (0, 1, 100, 511, 512, 513, 4095, 4096, 4097, 9000, 70000)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(n):
            _add(tf, f"dir{i % 7}/file{i:04d}" + "x" * (i % 40),
                 data=os.urandom(sizes[i % len(sizes)]), mtime=1700000000 + i)
    return str(path)


def _lines(path):
    with open(path, "rb") as f:
        return f.read().splitlines()


def _assemble(index, mapfile, tar_path, out, blksz):
    """The map's consumer: the index with every line's blocks filled from the tar (the
    last `zeroed` bytes of a line's blocks stay zeros)."""
    with open(index, "rb") as f:
        img = bytearray(f.read())
    with open(tar_path, "rb") as t:
        for line in _lines(mapfile):
            f = line.split()
            blk, n, off = int(f[0], 16), int(f[1], 16), int(f[2], 16)
            zeroed = int(f[3]) if len(f) > 3 else 0
            assert 0 <= zeroed < blksz
            assert (blk + n) * blksz <= len(img), "a line past the image's end"
            length = n * blksz - zeroed
            t.seek(off)
            data = t.read(length)
            assert len(data) == length
            assert img[blk * blksz:(blk + n) * blksz] == bytes(n * blksz), \
                "the region is not left zero in the index"
            img[blk * blksz:blk * blksz + length] = data
    with open(out, "wb") as f:
        f.write(img)
    return str(out)


def _nid_order(img, mapfile, tar_path):
    """The lines come in the order of their files' nids, as mkfs.erofs 1.9.4 writes
    them (it prints a file's line when it writes its inode)."""
    from erofs_tools.reader.image import open_image
    with tarfile.open(tar_path) as tf:
        by_off = {m.offset_data: m.name.lstrip("./") or "." for m in tf if m.isreg()}
    im = open_image(str(img))
    nids = {p.decode().lstrip("/"): d.nid for p, d, _ in im.walk() if d is not None}
    order = [nids[by_off[int(ln.split()[2], 16)]] for ln in _lines(mapfile)]
    assert order == sorted(order)


@pytest.mark.parametrize("bsize", [512, 1024, 4096])
def test_map_same_as_anchor(tmp_path, bsize):
    """Byte for byte 1.9.4's map on a tree whose metadata takes the same blocks in both
    (the index the same size too); on one of 300 files the same lines, each map in its
    own image's nid order (the inode records are packed otherwise)."""
    tar_path = _small_tar(tmp_path / "s.tar")
    _mkfs("-b", bsize, f"--tar=i,{tmp_path / 'o.map'}", tmp_path / "o.img", tar_path)
    anchor_mkfs(tmp_path / "a.img", tar_path, "-b", bsize, f"--tar=i,{tmp_path / 'a.map'}")
    ours, theirs = _lines(tmp_path / "o.map"), _lines(tmp_path / "a.map")
    assert ours and ours == theirs
    assert os.path.getsize(tmp_path / "o.img") == os.path.getsize(tmp_path / "a.img")
    _nid_order(tmp_path / "o.img", tmp_path / "o.map", tar_path)

    many = _many_tar(tmp_path / "m.tar")
    _mkfs("-b", bsize, f"--tar=i,{tmp_path / 'om.map'}", tmp_path / "om.img", many)
    anchor_mkfs(tmp_path / "am.img", many, "-b", bsize, f"--tar=i,{tmp_path / 'am.map'}")
    ours, theirs = _lines(tmp_path / "om.map"), _lines(tmp_path / "am.map")
    assert len(ours) == sum(1 for i in range(300) if i % 11)    # (size 0: no line)
    assert sorted(ours) == sorted(theirs)
    assert os.path.getsize(tmp_path / "om.img") == os.path.getsize(tmp_path / "am.img")
    _nid_order(tmp_path / "om.img", tmp_path / "om.map", many)
    _nid_order(tmp_path / "am.img", tmp_path / "am.map", many)


@pytest.mark.root
@pytest.mark.parametrize("bsize", [512, 4096])
def test_map_assembled_image_mounts_as_tar(tmp_path, bsize):
    """The index alone reads every file as zeros; assembled from the map and the tar it
    is the tar's tree (the kernel's view, full metadata, hardlink counts) and fsck.erofs
    1.9.4 passes; 1.9.4's index assembled from its own map reads the same."""
    tar_path = _small_tar(tmp_path / "s.tar", tarfile.PAX_FORMAT)
    ref = tar_x_reference(tar_path, tmp_path / "ref")
    for who in ("o", "a"):
        idx, mp = tmp_path / f"{who}.idx", tmp_path / f"{who}.map"
        if who == "o":
            _mkfs("-b", bsize, f"--tar=i,{mp}", idx, tar_path, epoch=False)
        else:
            anchor_mkfs(idx, tar_path, "-b", bsize, f"--tar=i,{mp}", epoch=None)
        with mounted(idx) as mnt, open(os.path.join(mnt, "c"), "rb") as f:
            assert f.read() == bytes(12345)
        full = _assemble(idx, mp, tar_path, tmp_path / f"{who}.erofs", bsize)
        fsck(full)
        with mounted(full) as mnt:
            diffs = compare_trees(str(ref), mnt, check_nlink=True)
            assert not diffs, f"{who}: " + "\n".join(diffs[:40])


def test_map_from_gzip_stdin(tmp_path):
    """From a gzip stream on stdin the map's offsets are the uncompressed tar's: the
    same map and index as from the tar file."""
    tar_path = _small_tar(tmp_path / "s.tar")
    _mkfs(f"--tar=i,{tmp_path / 'f.map'}", tmp_path / "f.img", tar_path)
    with open(tar_path, "rb") as f:
        gz = gzip.compress(f.read())
    _mkfs("--ungzip", f"--tar=0,{tmp_path / 'g.map'}", tmp_path / "g.img", "-", input=gz)
    assert _lines(tmp_path / "f.map") == _lines(tmp_path / "g.map")
    with open(tmp_path / "f.img", "rb") as a, open(tmp_path / "g.img", "rb") as b:
        assert a.read() == b.read()


def _fields(mapfile):
    """the lines without their block addresses, in tar order"""
    return sorted((ln.split()[2], ln.split()[1:]) for ln in _lines(mapfile))


@pytest.mark.root
def test_rvsp_map_fills_the_reserved_blocks(tmp_path):
    """`--clean=rvsp` and `--incremental=rvsp` with `--tar=f,MAPFILE`: a line for each
    file whose blocks are reserved, in block order, as 1.9.4; ours lays the files out in
    its own order (depth first: 1.9.4 breadth first), so the block addresses differ but
    each file's line is otherwise 1.9.4's; the image filled from the map and the tar is
    the tar's tree (kernel, full metadata), fsck.erofs 1.9.4 passes."""
    tar_path = _small_tar(tmp_path / "s.tar", tarfile.PAX_FORMAT)
    ref = tar_x_reference(tar_path, tmp_path / "ref")
    _mkfs("--clean=rvsp", f"--tar=f,{tmp_path / 'c.map'}", tmp_path / "c.img", tar_path,
          epoch=False)
    anchor_mkfs(tmp_path / "ac.img", tar_path, "--clean=rvsp",
                f"--tar=f,{tmp_path / 'ac.map'}", epoch=None)
    assert _fields(tmp_path / "c.map") == _fields(tmp_path / "ac.map") != []
    blocks = [int(ln.split()[0], 16) for ln in _lines(tmp_path / "c.map")]
    assert blocks == sorted(blocks)
    for who in ("c", "ac"):
        full = _assemble(tmp_path / f"{who}.img", tmp_path / f"{who}.map", tar_path,
                         tmp_path / f"{who}.erofs", 4096)
        fsck(full)
        with mounted(full) as mnt:
            diffs = compare_trees(str(ref), mnt, check_nlink=True)
            assert not diffs, f"{who}: " + "\n".join(diffs[:40])
    # a layer reserved over a base: lines for the layer's files only
    empty = tmp_path / "empty"
    os.mkdir(empty)
    _mkfs(tmp_path / "inc.img", empty)
    _mkfs("--incremental=rvsp", f"--tar=f,{tmp_path / 'i.map'}", tmp_path / "inc.img",
          tar_path)
    assert _fields(tmp_path / "i.map") == _fields(tmp_path / "ac.map")
    full = _assemble(tmp_path / "inc.img", tmp_path / "i.map", tar_path,
                     tmp_path / "inc.erofs", 4096)
    fsck(full)
    # --incremental (data) and --clean: an empty map, as 1.9.4
    _mkfs(tmp_path / "inc2.img", empty)
    _mkfs("--incremental", f"--tar=f,{tmp_path / 'i2.map'}", tmp_path / "inc2.img", tar_path)
    assert os.path.getsize(tmp_path / "i2.map") == 0


def test_tar_modes_as_anchor(tmp_path):
    """`--tar=0` is `i` (512-byte index), `0,MAP` is `i,MAP`; `f,MAP`, `,MAP` and
    `headerball,MAP` write the image of their mode and an empty map, as 1.9.4 does."""
    tar_path = _small_tar(tmp_path / "s.tar")

    def img(name, *args):
        _mkfs(*args, tmp_path / name, tar_path)
        with open(tmp_path / name, "rb") as f:
            return f.read()

    assert img("z.img", "--tar=0") == img("i.img", "--tar=i")
    assert img("zm.img", f"--tar=0,{tmp_path / 'z.map'}") == \
        img("im.img", f"--tar=i,{tmp_path / 'i.map'}")
    assert _lines(tmp_path / "z.map") == _lines(tmp_path / "i.map") != []
    assert img("fm.img", f"--tar=f,{tmp_path / 'f.map'}") == img("f.img", "--tar=f")
    assert img("em.img", f"--tar=,{tmp_path / 'e.map'}") == img("f.img", "--tar=f")
    for m in ("f.map", "e.map"):
        assert os.path.getsize(tmp_path / m) == 0
    anchor_mkfs(tmp_path / "af.img", tar_path, f"--tar=f,{tmp_path / 'af.map'}")
    assert os.path.getsize(tmp_path / "af.map") == 0

    # a headerball: the tar's headers without the data
    hb = tmp_path / "s.hb"
    with tarfile.open(tar_path) as tf, open(hb, "wb") as out:
        for m in tf:
            out.write(m.tobuf(format=tarfile.GNU_FORMAT))
        out.write(bytes(1024))
    _mkfs(f"--tar=headerball,{tmp_path / 'h.map'}", tmp_path / "hm.img", hb)
    _mkfs("--tar=headerball", tmp_path / "h.img", hb)
    with open(tmp_path / "hm.img", "rb") as a, open(tmp_path / "h.img", "rb") as b:
        assert a.read() == b.read()
    assert os.path.getsize(tmp_path / "h.map") == 0
    anchor_mkfs(tmp_path / "ah.img", hb, f"--tar=headerball,{tmp_path / 'ah.map'}")
    assert os.path.getsize(tmp_path / "ah.map") == 0


def _refused(tmp_path, *args, want):
    before = set(os.listdir(tmp_path))
    p = _mkfs(*args, check=False)
    err = p.stderr.decode()
    assert p.returncode == 1, (p.returncode, err)
    assert err.count("\n") == 1 and err.startswith("error: ") and want in err, err
    assert set(os.listdir(tmp_path)) == before, "something was written"


def test_map_bad_input(tmp_path):
    tar_path = _small_tar(tmp_path / "s.tar")
    img = tmp_path / "x.img"
    _refused(tmp_path, f"--tar=i,{tmp_path / 'no' / 'x.map'}", img, tar_path,
             want="cannot create")
    os.mkdir(tmp_path / "adir")
    _refused(tmp_path, f"--tar=i,{tmp_path / 'adir'}", img, tar_path, want="directory")
    _refused(tmp_path, f"--tar=i,{tar_path}", img, tar_path, want="the input")
    _refused(tmp_path, f"--tar=x,{tmp_path / 'x.map'}", img, tar_path, want="unknown mode")
    _refused(tmp_path, "--tar=ix", img, tar_path, want="unknown mode")
    for opt in (("--chunksize=4096",), ("--blobdev", tmp_path / "b")):
        _refused(tmp_path, *opt, f"--tar=i,{tmp_path / 'x.map'}", img, tar_path,
                 want="is not supported")
    _refused(tmp_path, "--chunksize=4096", f"--tar=f,{tmp_path / 'x.map'}", img, tar_path,
             want="--chunksize is not supported")
    # a sparse entry (GNU): its data is not one run of the tar
    sp = tmp_path / "sp.tar"
    os.close(os.open(tmp_path / "sparse", os.O_CREAT | os.O_WRONLY, 0o644))
    os.truncate(tmp_path / "sparse", 1 << 20)
    with open(tmp_path / "sparse", "r+b") as f:
        f.seek(8192)
        f.write(b"x" * 4096)
    require_tool("tar")
    import subprocess
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", sp, "-C", tmp_path, "sparse"],
                   check=True)
    os.unlink(tmp_path / "sparse")
    _refused(tmp_path, f"--tar=i,{tmp_path / 'x.map'}", img, sp, want="sparse")
    # a failure after MAPFILE was opened (a hostile entry): neither file is left
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w", format=tarfile.GNU_FORMAT) as tf:
        _add(tf, "a", data=b"x" * 100)
        _add(tf, "h", "h", link="missing")
    _refused(tmp_path, f"--tar=i,{tmp_path / 'x.map'}", img, bad, want="hardlink")
