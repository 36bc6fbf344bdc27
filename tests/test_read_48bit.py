"""The reader on the 48-bit layout (mkfs.erofs 1.9 -E48bit, Linux 6.15+) and on
directories without "." (-Edot-omitted), written by our mkfs and by mkfs.erofs 1.9.4:
`unpack -o` gives the tree the kernel shows of the same image (full metadata) and the
source's content, `check` passes, `inspect` and `stat` work; block addresses past 2^32
(an inode's bits 32-47) are read as the kernel reads them; corrupted variants give one
line, never a traceback. All failed before: "unsupported incompatible features 0x80".
"""
import json
import os
import socket
import struct
import subprocess
import sys

import pytest
from helpers import (
    anchor_mkfs,
    kernel_view,
    mounted,
    record_sizes,
    run_mkfs,
    sha256s,
    text,
    write_48bit_tree,
    write_zmix_tree,
)

from erofs_tools.format import erofs as E

pytestmark = pytest.mark.root

SB = 1024
ANCHOR_BIN = "/var/cache/erofs-tools-anchor/erofs-utils-1.9.4/bin"


def cli(*args):
    return subprocess.run([sys.executable, "-m", "erofs_tools", *map(os.fspath, args)],
                          capture_output=True, text=True, errors="replace")


def anchor(image, source, *args):
    anchor_mkfs(image, source, *args, epoch=None)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """helpers.write_48bit_tree and every other inode type (a block device, a socket),
    mtimes before 1970 and after 2106, a sparse file."""
    root = write_48bit_tree(tmp_path_factory.mktemp("r48") / "src", "y", 30, "chr")
    with open(root / "sparse", "wb") as f:
        f.truncate(64 << 20)
        f.seek(40 << 20)
        f.write(b"tail" * 1000)
    os.mknod(root / "blk", 0o60600, os.makedev(7, 200))
    s = socket.socket(socket.AF_UNIX)
    s.bind(os.fspath(root / "sock"))
    s.close()
    os.utime(root / "d" / "e", ns=(0, -1_000_000_001))
    return root


def _check_and_unpack(img, tmp_path):
    """check (clean) and unpack -o of IMG through the CLI; -> the unpacked tree."""
    p = cli("check", img)
    assert p.returncode == 0 and p.stdout.strip().endswith("clean"), p.stdout + p.stderr
    out = tmp_path / "out"
    p = cli("unpack", "-o", out, img)
    assert p.returncode == 0, p.stderr
    return out


def _read_back(img, tmp_path):
    """check, unpack -o, inspect, stat of IMG through the CLI; -> the unpacked tree."""
    out = _check_and_unpack(img, tmp_path)
    p = cli("inspect", "--json", img)
    assert p.returncode == 0, p.stderr
    p = cli("inspect", img, "/d")
    assert p.returncode == 0 and "name=.. " in p.stdout, p.stdout + p.stderr
    p = cli("stat", "--json", img)
    assert p.returncode == 0, p.stderr
    return out


OURS = {
    "48bit": ("-E", "48bit"),
    "48bit-T-over-32bit": ("-T", "5000000000", "-E", "48bit"),
    "dot-omitted": ("-E", "dot-omitted"),
    "dot-omitted-b1024": ("-b", "1024", "-E", "dot-omitted"),
    "48bit-extended": ("-E", "48bit,force-inode-extended"),
}


@pytest.mark.parametrize("combo", OURS)
def test_ours_read_back(tree, tmp_path, combo):
    img = tmp_path / "x.img"
    run_mkfs(img, tree, "-q", "-U", "clear", *OURS[combo])
    out = _read_back(img, tmp_path)
    got = kernel_view(out)
    with mounted(img) as m:
        assert got == kernel_view(m)
    src = kernel_view(tree)
    assert sha256s(got) == sha256s(src)
    if "-T" not in OURS[combo]:
        # out of a compact inode's range from the epoch: extended, whole
        assert got[b"d/b"]["mtime_ns"] == -315619200_000000000
        assert got[b"d/e/c"]["mtime_ns"] == 5364662400_500000000
        assert got[b"d/e"]["mtime_ns"] == -1_000_000_001
        assert got[b"a"]["mtime_ns"] == 981173106_000000000 + \
            ("extended" in combo) * 123456789
    assert got[b"d/a-link"]["links"] == [b"a", b"d/a-link"]


ANCHORS = {
    "48bit": ("-E48bit",),
    "48bit-T-over-32bit": ("-T", "5000000000", "-E48bit"),
    "dot-omitted": ("-Edot-omitted",),
    "dot-omitted-b1024": ("-b", "1024", "-Edot-omitted"),
}


@pytest.mark.parametrize("combo", ANCHORS)
def test_mkfs_erofs_read_back(tree, tmp_path, combo):
    """mkfs.erofs 1.9.4's images (root nid in the le16 field, rootnid_8b 0): the reader's
    tree is the kernel's, mtimes included (mkfs.erofs wraps those out of range)."""
    img = tmp_path / "ref.img"
    anchor(img, tree, *ANCHORS[combo])
    assert struct.unpack_from("<I", img.read_bytes()[:2048], SB + 0x50)[0] & 0x80
    out = _read_back(img, tmp_path)
    got = kernel_view(out)
    with mounted(img) as m:
        assert got == kernel_view(m)
    assert got[b"d/e/c"]["sha256"] == kernel_view(tree)[b"d/e/c"]["sha256"]


@pytest.fixture(scope="module")
def ztree(tmp_path_factory):
    root = tmp_path_factory.mktemp("r48z") / "src"
    write_zmix_tree(root)
    return root


# mkfs.erofs 1.9.4 with -E48bit and -z: extent records (16 bytes: each extent's own
# offsets; 4: pclusters back to back, every extent but the last one lcluster; zstd's
# unaligned pclusters) or, with an inline tail or when records would not be smaller
# than a full index, lcluster indexes as without -E48bit
ZANCHORS = {
    "lz4hc": ("-zlz4hc",),
    "lz4hc-C": ("-zlz4hc", "-C65536"),
    "lzma": ("-zlzma",),
    "zstd": ("-zzstd",),
    "zstd-C": ("-zzstd", "-C16384"),
    "deflate": ("-zdeflate",),
    "lz4hc-fragments": ("-zlz4hc", "-Efragments"),
    "zstd-fragments": ("-zzstd", "-Efragments"),
    "lz4hc-dedupe": ("-zlz4hc", "-Ededupe"),
    "zstd-dedupe": ("-zzstd", "-Ededupe"),
    "zstd-fragments-dedupe": ("-zzstd", "-Efragments,dedupe"),     # 8-byte records too
    "lzma-ztailpacking": ("-zlzma", "-Eztailpacking"),
    "lz4hc-all-fragments": ("-zlz4hc", "-Eall-fragments"),
    "lz4hc-b1024": ("-zlz4hc", "-b", "1024"),
}


@pytest.mark.parametrize("combo", ZANCHORS)
def test_mkfs_erofs_compressed_read_back(ztree, tmp_path, combo):
    """mkfs.erofs 1.9.4's compressed 48-bit images: check passes and unpack gives the
    kernel's tree (full metadata) and the source's content. Failed before: "compressed
    files in the 48-bit layout (its encoded extents) are not supported"."""
    img = tmp_path / "z.img"
    anchor(img, ztree, "-E48bit", *ZANCHORS[combo])
    p = cli("check", img)
    assert p.returncode == 0 and p.stdout.strip().endswith("clean"), p.stdout + p.stderr
    out = tmp_path / "out"
    p = cli("unpack", "-o", out, img)
    assert p.returncode == 0, p.stderr
    got = kernel_view(out)
    with mounted(img) as m:
        assert got == kernel_view(m)
    assert sha256s(got) == sha256s(kernel_view(ztree))
    for cmd in (("inspect", "--json", img, "/large"), ("stat", "--json", img)):
        p = cli(*cmd)
        assert p.returncode == 0, p.stderr
    kinds = record_sizes(img)
    if "ztailpacking" not in combo and "all-fragments" not in combo:
        assert kinds.get(4 if "zstd" in combo or combo.endswith("-C") else 16), kinds
    if combo == "zstd-fragments-dedupe":
        assert kinds.get(8), kinds


def _records_of(img, path):
    """-> (image offset of the records, record size, count, map header offset) of IMG's file PATH."""
    from erofs_tools.reader.image import open_image
    from erofs_tools.reader.zdata import state
    with open_image(img) as im:
        ino = im.inode(_nid_of(img, path))
        m = state(im).zmap(ino)
        recsz = E.extent_recsize(m.advise)
        assert ino.layout == E.LAYOUT_COMPRESSED_FULL and m.advise & E.ADVISE_EXTENTS
        return -(-(m.hpos + 8) // recsz) * recsz, recsz, len(m.extents), m.hpos


CORRUPT = {
    "out-of-order": (lambda d, o, h: struct.pack_into("<I", d, o + 16 + 12, 0),
                     "extent record 1: file offset 0 out of order"),
    "past-the-end": (lambda d, o, h: struct.pack_into("<I", d, o + 8, 0x7FFF0000),
                     "is outside the image"),
    "bad-format": (lambda d, o, h: struct.pack_into("<I", d, o, (
        struct.unpack_from("<I", d, o)[0] & 0x0FFFFFFF) | 9 << 28),
        "extent record 0: format 9 is no algorithm the superblock declares"),
    "count": (lambda d, o, h: struct.pack_into("<I", d, h, 1 << 30),
              "extent records of 16 bytes run past the image end"),
}


@pytest.mark.parametrize("how", CORRUPT)
def test_corrupt_extent_record(ztree, tmp_path, how):
    """A corrupted 16-byte extent record: `check` (and unpack) report it in one line."""
    img = tmp_path / "z.img"
    anchor(img, ztree, "-E48bit", "-zlz4hc")
    off, recsz, n, hpos = _records_of(img, "/large")
    assert recsz == 16 and n > 2 and off % 16 == 0
    data = bytearray(img.read_bytes())
    edit, msg = CORRUPT[how]
    edit(data, off, hpos)
    _fix_sum(data)
    img.write_bytes(data)
    for cmd in (("check",), ("unpack", "-o", tmp_path / "o")):
        p = cli(*cmd, img)
        lines = (p.stdout + p.stderr).strip().splitlines()
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        err = [ln for ln in lines if msg in ln]
        assert len(err) == 1 and len(p.stderr.strip().splitlines()) <= 1, p.stdout + p.stderr


@pytest.mark.parametrize("plen", [0, 3 << 28])
def test_extent_record_without_bytes_is_a_hole(ztree, tmp_path, plen):
    """A 16-byte extent record whose length (its low 28 bits) is 0 stores nothing: Linux
    6.18 leaves that extent unmapped (z_erofs_map_blocks_ext maps an extent only when
    `plen & Z_EROFS_EXTENT_PLEN_MASK` is set) and reads it as zeros, whatever its format
    bits say; `check` calls the image clean and unpack gives the kernel's bytes. Failed
    before: "extent record 1 (file offset ...): no pcluster"."""
    img = tmp_path / "z.img"
    anchor(img, ztree, "-E48bit", "-zlz4hc")
    off, recsz, n, _hpos = _records_of(img, "/large")
    assert recsz == 16 and n > 2
    data = bytearray(img.read_bytes())
    start, end = (struct.unpack_from("<I", data, off + 16 * k + 12)[0] for k in (1, 2))
    struct.pack_into("<I", data, off + 16, plen)
    _fix_sum(data)
    img.write_bytes(data)
    src = (ztree / "large").read_bytes()
    want = src[:start] + bytes(end - start) + src[end:]
    with mounted(img) as m:
        kernel = open(os.path.join(m, "large"), "rb").read()
    assert kernel == want
    p = cli("check", img)
    assert p.returncode == 0 and p.stdout.strip().endswith("clean"), p.stdout + p.stderr
    out = tmp_path / "out"
    p = cli("unpack", "-o", out, img)
    assert p.returncode == 0, p.stderr
    assert (out / "large").read_bytes() == kernel
    p = cli("inspect", "--json", img, "/large")
    assert p.returncode == 0 and '"hole"' in p.stdout, p.stderr


def _kernel_or_error(img, path, windows):
    """-> the kernel's bytes of PATH in IMG at each (offset, length) of WINDOWS, or
    ("error", errno) where its read fails; ("mount", message) if the mount fails."""
    from erofs_tools.errors import ErofsToolsError
    try:
        with mounted(img) as m, open(os.path.join(m, path), "rb") as f:
            out = []
            for off, n in windows:
                f.seek(off)
                try:
                    out.append(f.read(n))
                except OSError as e:
                    out.append(("error", e.errno))
            return out
    except (OSError, ErofsToolsError) as e:
        return [("mount", str(e))]


def _ours_refuses(img, tmp_path):
    """`check` and `unpack` of IMG each fail with one line, no traceback."""
    for cmd in (("check",), ("unpack", "-o", tmp_path / "refused")):
        p = cli(*cmd, img)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stdout + p.stderr
        assert len(p.stderr.strip().splitlines()) <= 1, p.stderr


@pytest.mark.parametrize("plen", [0, 1 << 28])
@pytest.mark.parametrize("which", [0, 1])
def test_empty_8_byte_extent_record(tmp_path, which, plen):
    """8-byte extent records (each extent one lcluster, its plen and pstart_lo) with one
    record storing nothing (its length, the low 28 bits, 0; with or without format
    bits): our mkfs writes the file (16000 bytes, --max-extent-bytes=8192: two
    lclusters of 8 KiB) as 4-byte records (the base address, then each plen: 16 bytes),
    rewritten in place as two 8-byte records. As written, the kernel (Linux 6.18) and
    unpack read the source; with record WHICH emptied the kernel reads that lcluster as
    zeros (z_erofs_map_blocks_ext leaves it unmapped) and unpack gives its bytes, check
    calls the image clean, inspect shows the hole. Were the kernel to refuse the record,
    ours must refuse it too. Only 16-byte records were tested before."""
    src = tmp_path / "src"
    src.mkdir()
    body = text(16000, 5)
    (src / "f").write_bytes(body)
    img = tmp_path / "z.img"
    run_mkfs(img, src, "-q", "-E48bit", "-zlz4hc", "--max-extent-bytes=8192")
    off, recsz, n, hpos = _records_of(img, "/f")
    assert (recsz, n, off) == (4, 2, hpos + 8)
    data = bytearray(img.read_bytes())
    assert data[hpos + 7] & 15 == 1                         # lclusters of 8 KiB
    base = struct.unpack_from("<Q", data, off)[0]
    plens = struct.unpack_from("<2I", data, off + 8)
    starts = (base, base + (plens[0] & E.EXTENT_PLEN_MASK))
    struct.pack_into("<H", data, hpos + 4, struct.unpack_from("<H", data, hpos + 4)[0] |
                     1 << E.ADVISE_EXTRECSZ_BIT)               # 4 -> 8-byte records
    for i in (0, 1):
        struct.pack_into("<2I", data, off + 8 * i, plens[i], starts[i])
    _fix_sum(data)
    img.write_bytes(data)
    assert record_sizes(img) == {8: 1}
    assert _kernel_or_error(img, "f", [(0, 16000)]) == [body]
    out = tmp_path / "asis"
    assert cli("unpack", "-o", out, img).returncode == 0 and (out / "f").read_bytes() == body
    struct.pack_into("<I", data, off + 8 * which, plen)
    _fix_sum(data)
    img.write_bytes(data)
    kernel = _kernel_or_error(img, "f", [(0, 16000)])
    if not isinstance(kernel[0], bytes):
        _ours_refuses(img, tmp_path)
        return
    assert kernel == [body[:8192] + bytes(7808) if which else bytes(8192) + body[8192:]]
    p = cli("check", img)
    assert p.returncode == 0 and p.stdout.strip().endswith("clean"), p.stdout + p.stderr
    out = tmp_path / "out"
    p = cli("unpack", "-o", out, img)
    assert p.returncode == 0, p.stderr
    assert [(out / "f").read_bytes()] == kernel
    p = cli("inspect", "--json", img, "/f")
    assert p.returncode == 0 and '"hole"' in p.stdout, p.stderr


MARKS_4G = {0: b"head", (1 << 32) - 5: b"across 4 GiB", (1 << 32) + 12345: b"past 4 GiB"}
SIZE_4G = (1 << 32) + (300 << 20) + 5


@pytest.fixture(scope="module")
def image_4g(tmp_path_factory):
    """Our mkfs -E48bit -zlz4 of a sparse 4.3 GiB file with text at its start, across
    2^32, past it and at its end: 32-byte extent records (their lstart_hi)."""
    work = tmp_path_factory.mktemp("e32")
    (work / "src").mkdir()
    with open(work / "src" / "z", "wb") as f:
        f.truncate(SIZE_4G - 5)
        for at, mark in MARKS_4G.items():
            f.seek(at)
            f.write(mark)
        f.seek(0, 2)
        f.write(b"tail\n")
    img = work / "z.img"
    run_mkfs(img, work / "src", "-q", "-E48bit", "-zlz4")
    assert record_sizes(img) == {32: 1}
    return img, work / "src" / "z"


@pytest.mark.parametrize("where,plen", [("start", 0), ("past 4 GiB", 0),
                                        ("past 4 GiB", 1 << 28), ("end", 0)])
def test_empty_32_byte_extent_record(image_4g, tmp_path, where, plen):
    """A 32-byte extent record storing nothing (length 0, with or without format bits)
    in the sparse 4.3 GiB file: the extent holding its first byte, the text past 2^32 or
    its last byte. The kernel (Linux 6.18) reads that extent as zeros, the rest as the
    source; our reader gives the kernel's bytes around each mark and at the extent's
    edges, and check calls the image clean (were the kernel to refuse the record, ours
    must refuse too)."""
    from erofs_tools.reader.image import open_image
    from erofs_tools.reader.zdata import read_range, state
    img, source = image_4g
    off, recsz, n, _hpos = _records_of(img, "/z")
    with open_image(img) as im:
        exts = state(im).zmap(im.inode(_nid_of(img, "/z"))).extents
    at = {"start": 0, "past 4 GiB": (1 << 32) + 12345, "end": SIZE_4G - 1}[where]
    k = next(i for i, x in enumerate(exts) if x.la <= at < x.la + x.llen)
    x = exts[k]
    assert recsz == 32 and n == len(exts) > 1000 and x.plen
    windows = sorted({(max(o - 8, 0), min(24, SIZE_4G - max(o - 8, 0)))
                      for o in (*MARKS_4G, SIZE_4G - 5, x.la, x.la + x.llen)})
    with open(source, "rb") as f:
        src = [os.pread(f.fileno(), ln, o) for o, ln in windows]
    want = [bytes(b if not x.la <= o + i < x.la + x.llen else 0 for i, b in enumerate(s))
            for (o, _ln), s in zip(windows, src)]
    assert want != src                          # (the emptied extent held text)
    bad = tmp_path / "z.img"
    data = bytearray(img.read_bytes())
    struct.pack_into("<I", data, off + 32 * k, plen)
    _fix_sum(data)
    bad.write_bytes(data)
    kernel = _kernel_or_error(bad, "z", windows)
    if not all(isinstance(b, bytes) for b in kernel):
        _ours_refuses(bad, tmp_path)
        return
    assert kernel == want
    with open_image(bad) as im:
        ino = im.inode(_nid_of(bad, "/z"))
        assert [read_range(im, ino, o, ln) for o, ln in windows] == kernel
    p = cli("check", bad)
    assert p.returncode == 0 and p.stdout.strip().endswith("clean"), p.stdout + p.stderr


@pytest.mark.parametrize("plen", [4096, 4097])
def test_interlaced_plain_record_needs_aligned_length(ztree, tmp_path, plen):
    """A plain extent record of an inode marked interlaced (ADVISE_INTERLACED_PCLUSTER)
    is interlaced only when both its pcluster's start and its length are block-aligned,
    else shifted: Linux since "erofs: fix interlaced plain identification for encoded
    extents" (4a2d046e4b13, in the host's 6.18 stable kernel), as our reader. mkfs.erofs
    1.9.4's /mixed has one plain 16-byte record (aligned start, 4096 bytes); with the
    advise bit set, the kernel's bytes and unpack's agree: rotated at 4096, as stored at
    4097 (the source's bytes)."""
    img = tmp_path / "z.img"
    anchor(img, ztree, "-E48bit", "-zlz4hc")
    off, recsz, n, hpos = _records_of(img, "/mixed")
    from erofs_tools.reader.image import open_image
    from erofs_tools.reader.zdata import state
    from erofs_tools.reader.zmap import ALG_SHIFTED
    with open_image(img) as im:
        exts = state(im).zmap(im.inode(_nid_of(img, "/mixed"))).extents
    plain = [k for k, x in enumerate(exts) if x.alg == ALG_SHIFTED]
    assert recsz == 16 and len(plain) == 1
    k = plain[0]
    x = exts[k]
    assert x.pa % 4096 == 0 and x.plen == 4096 and x.llen == 4096 and x.la % 4096
    data = bytearray(img.read_bytes())
    struct.pack_into("<H", data, hpos + 4,
                     struct.unpack_from("<H", data, hpos + 4)[0] | E.ADVISE_INTERLACED_PCLUSTER)
    struct.pack_into("<I", data, off + 16 * k, plen)
    _fix_sum(data)
    img.write_bytes(data)
    with mounted(img) as m:
        kernel = open(os.path.join(m, "mixed"), "rb").read()
    src = (ztree / "mixed").read_bytes()
    assert (kernel == src) == (plen % 4096 != 0)
    out = tmp_path / "out"
    p = cli("unpack", "-o", out, img)
    assert p.returncode == 0, p.stderr
    assert (out / "mixed").read_bytes() == kernel


def _root_off(data):
    meta = struct.unpack_from("<I", data, SB + 0x28)[0]
    nid = struct.unpack_from("<Q", data, SB + 0x70)[0] or struct.unpack_from(
        "<H", data, SB + 0x0E)[0]
    return (meta << data[SB + 0x0C]) + nid * 32


def _fix_sum(data):
    if struct.unpack_from("<I", data, SB + 8)[0] & E.FEATURE_COMPAT_SB_CHKSUM:
        blksz = 1 << data[SB + 0x0C]
        struct.pack_into("<I", data, SB + 4,
                         E.superblock_checksum(bytes(data[:max(blksz, 2 * SB)])))


def _without_48bit(data):
    """The superblock in DATA without the 48BIT feature, the root nid (rootnid_8b) in
    the le16 field it had before; the checksum fixed."""
    struct.pack_into("<I", data, SB + 0x50,
                     struct.unpack_from("<I", data, SB + 0x50)[0] & ~E.FEATURE_INCOMPAT_48BIT)
    struct.pack_into("<H", data, SB + 0x0E, struct.unpack_from("<Q", data, SB + 0x70)[0])
    _fix_sum(data)


def _nid_of(img, path):
    p = cli("inspect", "--json", img, path)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)["nid"]


def test_dot_bits_checked(tree, tmp_path):
    """A directory whose format bit says "." omitted but which has one, and one without
    it whose bit is clear: `check` names both; the bit without the 48BIT feature is
    refused."""
    small = tmp_path / "small"
    (small / "d").mkdir(parents=True)
    (small / "d" / "f").write_bytes(b"f")
    for ext, want in (("48bit", "a '.' entry, but its format says omitted"),
                      ("dot-omitted", "missing or wrong '.'")):
        img = tmp_path / f"{ext}.img"
        run_mkfs(img, small, "-q", "-T", "0", "-E", ext)
        nid = _nid_of(img, "/d")
        data = bytearray(img.read_bytes())
        meta = struct.unpack_from("<I", data, SB + 0x28)[0] << data[SB + 0x0C]
        data[meta + nid * 32] ^= E.I_DOT_OMITTED
        _fix_sum(data)      # (the inode may sit in block 0, which the checksum covers)
        img.write_bytes(data)
        p = cli("check", img)
        assert p.returncode == 1 and "Traceback" not in p.stderr
        assert f"/d: directory {nid}: {want}" in p.stdout + p.stderr, p.stdout + p.stderr
        p = cli("unpack", "-o", tmp_path / f"o-{ext}", img)
        assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    img = tmp_path / "dot-omitted.img"
    data = bytearray(img.read_bytes())
    _without_48bit(data)
    img.write_bytes(data)
    p = cli("inspect", img)
    root = struct.unpack_from("<H", data, SB + 0x0E)[0]
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        f"error: {img}: inode {root}: unsupported i_format 0x14"], p.stderr


@pytest.mark.parametrize("extended", [False, True])
def test_block_addresses_past_32_bits(tmp_path, extended):
    """A file whose blocks start past block 2^32 (its inode's le16 at 6 the high bits:
    an extended inode's, or a compact one's with the NLINK_1 bit) in a sparse 4 TiB
    image (1 KiB blocks): the reader's data is the kernel's."""
    src = tmp_path / "src"
    src.mkdir()
    body = os.urandom(3000)
    (src / "big").write_bytes(body)
    img = tmp_path / "x.img"
    run_mkfs(img, src, "-q", "-T", "0", "-b", "1024", "-E",
             "48bit,noinline_data" + (",force-inode-extended" if extended else ""))
    nid = _nid_of(img, "/big")
    data = bytearray(img.read_bytes())
    meta = struct.unpack_from("<I", data, SB + 0x28)[0] << 10
    off = meta + nid * 32
    fmt = struct.unpack_from("<H", data, off)[0]
    assert E.i_format_layout(fmt) == E.LAYOUT_FLAT_PLAIN
    old = struct.unpack_from("<I", data, off + 16)[0]
    new = (1 << 32) + 7
    if not extended:
        assert struct.unpack_from("<H", data, off + 6)[0] == 1      # nlink
        struct.pack_into("<H", data, off, fmt | E.I_NLINK_1)
    struct.pack_into("<H", data, off + 6, new >> 32)
    struct.pack_into("<I", data, off + 16, new & 0xFFFFFFFF)
    data[old << 10:(old << 10) + 3000] = bytes(3000)     # (no longer read there)
    img.write_bytes(data)
    with open(img, "r+b") as f:
        f.seek(new << 10)
        f.write(body + bytes(-len(body) % 1024))
    assert img.stat().st_size > 1 << 42
    p = cli("check", img)
    assert p.returncode == 0, p.stdout + p.stderr
    p = cli("inspect", "--json", img, "/big")
    assert json.loads(p.stdout)["startblk"] == new
    out = tmp_path / "out"
    p = cli("unpack", "-o", out, img)
    assert p.returncode == 0, p.stderr
    assert (out / "big").read_bytes() == body
    with mounted(img) as m:
        assert open(os.path.join(m, "big"), "rb").read() == body
    # without the 48BIT feature the high bits are not read (an extended inode's are
    # reserved: check says so; a compact one's format bit is refused)
    with open(img, "rb") as f:
        data = bytearray(f.read(1 << 20))
    _without_48bit(data)
    img.write_bytes(data)
    p = cli("check", img)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert ("i_nb (reserved) is not 0" if extended else "unsupported i_format 0x10") in \
        p.stdout + p.stderr, p.stdout + p.stderr


@pytest.mark.parametrize("source", ["ours", "mkfs.erofs"])
def test_flipped_bytes_in_new_fields(tree, tmp_path, source):
    """Every bit of the new superblock fields (the le16 root nid / blocks_hi, the epoch,
    the le32 build time, rootnid_8b) and of the root inode's format flipped in turn:
    each command ends with its result or one error line, never a traceback."""
    img = tmp_path / "base.img"
    small = tmp_path / "small"
    (small / "d").mkdir(parents=True)
    (small / "d" / "f").write_bytes(b"data" * 100)
    (small / "l").symlink_to("d/f")
    if source == "ours":
        run_mkfs(img, small, "-q", "-E", "dot-omitted")
    else:
        anchor(img, small, "-Edot-omitted")
    base = img.read_bytes()
    spots = [SB + 0x0E, SB + 0x0F, SB + 0x18, SB + 0x1F, SB + 0x6C, SB + 0x6F,
             SB + 0x70, SB + 0x71, SB + 0x77, _root_off(base), _root_off(base) + 1]
    bad = tmp_path / "bad.img"
    n = 0
    for at in spots:
        for bit in (0, 3, 4, 7):
            data = bytearray(base)
            data[at] ^= 1 << bit
            _fix_sum(data)
            bad.write_bytes(data)
            for cmd in (("check",), ("inspect",), ("stat",),
                        ("unpack", "-o", tmp_path / f"o{n}")):
                p = cli(*cmd, bad)
                n += 1
                assert p.returncode in (0, 1), (at, bit, cmd, p.stderr)
                assert "Traceback" not in p.stderr, (at, bit, cmd, p.stderr)
                if p.returncode and cmd[0] != "check":
                    assert len(p.stderr.strip().splitlines()) == 1, (at, bit, cmd, p.stderr)


@pytest.mark.parametrize("ext", [(), ("-E", "48bit")])
def test_mtimes_before_1970(tmp_path, ext):
    """An extended inode's i_mtime is the kernel's signed time64_t: before 1970 it is
    read back, by unpack to a directory and to a tar stream (-1.5 s: the PAX mtime
    -1.500000000), in the usual layout too. Failed before: check said "mtime
    18446744073393932416 beyond what the kernel can hold" and unpack refused it."""
    src = tmp_path / "src"
    (src / "x").mkdir(parents=True)
    (src / "f").write_bytes(b"a")
    os.utime(src / "f", ns=(0, -1_500_000_000))
    os.utime(src / "x", ns=(0, -315619200_000000000))
    img = tmp_path / "x.img"
    run_mkfs(img, src, "-q", *ext)
    out = _check_and_unpack(img, tmp_path)
    assert os.stat(out / "f").st_mtime_ns == -1_500_000_000
    assert os.stat(out / "x").st_mtime_ns == -315619200_000000000
    p = cli("unpack", "--tar", tmp_path / "t.tar", img)
    assert p.returncode == 0, p.stderr
    import tarfile
    with tarfile.open(tmp_path / "t.tar") as t:
        assert t.getmember("f").pax_headers["mtime"] == "-1.500000000"
        assert t.getmember("x").pax_headers["mtime"] == "-315619200.000000000"
    with mounted(img) as m:
        assert os.stat(os.path.join(m, "f")).st_mtime_ns == -1_500_000_000


def test_chunk_indexes_past_32_bits(tmp_path):
    """mkfs.erofs 1.9.4 -E48bit --blobdev chunk indexes, the second chunk moved past
    device block 2^32 (the chunk format's 48BIT bit, its index's le16 at 0 the high
    bits; a sparse 4 TiB device): unpack --device reads the kernel's data."""
    src = tmp_path / "src"
    src.mkdir()
    body = os.urandom(3000)
    (src / "big").write_bytes(body)
    img, dev = tmp_path / "x.img", tmp_path / "dev"
    dev.touch()
    anchor(img, src, "-b1024", "--chunksize=1024", "-E48bit", f"--blobdev={dev}")
    p = cli("inspect", "--json", img, "/big")
    d = json.loads(p.stdout)
    assert d["chunk_format"] == "0x21" and d["chunk_size"] == 2048
    data = bytearray(img.read_bytes())
    off = (struct.unpack_from("<I", data, SB + 0x28)[0] << 10) + d["nid"] * 32
    fmt = struct.unpack_from("<H", data, off)[0]
    isize = 64 if fmt & 1 else 32
    struct.pack_into("<H", data, off + 16, 0x21 | E.CHUNK_FORMAT_48BIT)
    icount = struct.unpack_from("<H", data, off + 2)[0]
    idx = off + isize + E.xattr_ibody_size(icount)
    idx += -idx % 8
    new = (1 << 32) + 5
    assert struct.unpack_from("<HHI", data, idx + 8) == (0, 1, 2)
    struct.pack_into("<HHI", data, idx + 8, new >> 32, 1, new & 0xFFFFFFFF)
    _fix_sum(data)          # (1 KiB blocks: the checksum covers the inodes)
    img.write_bytes(data)
    with open(dev, "r+b") as f:
        f.seek(2 << 10)
        f.write(bytes(1024))
        f.seek(new << 10)
        f.write(body[2048:] + bytes(-len(body[2048:]) % 1024))
    p = cli("inspect", "--json", img, "/big")
    assert [c["blkaddr"] for c in json.loads(p.stdout)["chunks"]] == [0, new]
    out = tmp_path / "out"
    p = cli("unpack", "--device", dev, "-o", out, img)
    assert p.returncode == 0, p.stderr
    assert (out / "big").read_bytes() == body
    p = cli("check", "--device", dev, img)
    assert p.returncode == 0, p.stdout + p.stderr
    with mounted(img, f"device={dev}") as m:
        assert open(os.path.join(m, "big"), "rb").read() == body
