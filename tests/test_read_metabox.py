"""The reader on metadata compression (mkfs.erofs 1.9 -m#[:X], Linux 6.17+: the inodes in
a compressed metabox inode, their nids with bit 63 set) and on the 48-bit layout's
compressed files (extent records; -m turns the 48-bit layout on, and its metabox has
them): `check`, `unpack`, `inspect` and `stat` read mkfs.erofs 1.9.4's images; unpack
gives the source tree and the kernel's (full metadata, hardlinks); fsck.erofs passes;
a corrupted metabox is one `error:` line and exit 1, as the kernel refuses to mount it.
All failed before: "unsupported incompatible features 0x100" (the metabox),
"compressed files in the 48-bit layout (its encoded extents) are not supported".
"""
import json
import os
import struct

import pytest
from helpers import compare_trees, fsck, mounted, require, require_tool
from test_reader_compressed import _cli, _round_trip, _run, tree  # noqa: F401 (a fixture)

from erofs_tools.format import erofs as E
from erofs_tools.reader.fsck import check_image
from erofs_tools.reader.image import open_image
from erofs_tools.reader.unpack import unpack_to_dir
from erofs_tools.reader.zdata import is_compressed, state

SB = E.SUPER_OFFSET
# the 48-bit layout's compact inodes keep the superblock's nsec (0), as mkfs.erofs
# writes them: the source's nsec is not in the image (the kernel's tree is compared whole)
NSEC = ("mtime_ns",)

# mkfs.erofs 1.9.4 -m: the metabox plain or compressed with the -z algorithm or another
METABOX = {
    "plain": ["-m4096"],
    "lz4": ["-zlz4", "-m4096"],
    "lz4hc-64k": ["-zlz4", "-C65536", "-m65536:lz4hc"],
    "lzma": ["-zlzma", "-C16384", "-m8192"],
    "zstd+lzma-box+all-fragments": ["-zzstd", "-C16384", "-m4096:lzma", "-Eall-fragments"],
    "deflate+dedupe+ztail": ["-zdeflate", "-Ededupe,ztailpacking", "-m4096:deflate"],
    "fragments+xattr-prefix": ["-zlz4hc", "-Efragments", "-m4096", "--xattr-prefix=user.no"],
    "1k-blocks": ["-b1024", "-zlz4", "-C4096", "-m2048"],
}
# mkfs.erofs 1.9.4 -E48bit -z: extent records (4-, 8-, 16-byte), unaligned pclusters
B48 = {
    "lz4": ["-zlz4", "-E48bit"],
    "lzma": ["-zlzma", "-C16384", "-E48bit"],
    "zstd-64k": ["-zzstd", "-C65536", "-E48bit"],
    "deflate": ["-zdeflate", "-E48bit"],
    "lz4hc+fragments+dedupe": ["-zlz4hc", "-E48bit,fragments,dedupe"],
}


def anchor(tmp_path, tree, args, name="m.img"):  # noqa: F811 (tree: the fixture)
    require_tool("mkfs.erofs")
    img = tmp_path / name
    p = _run("mkfs.erofs", "--quiet", *args, img, tree)
    assert p.returncode == 0, p.stdout + p.stderr
    return img


def _cli_reads(img):
    for args in (["inspect", img], ["inspect", "--json", img, "/d"], ["stat", "--json", img]):
        p = _cli(*args)
        assert p.returncode == 0, p.stdout + p.stderr


def _record_sizes(im):
    """Record sizes of the inodes with extent records (the metabox's included)."""
    out = set()
    inodes = [ino for _p, _d, ino in im.walk()]
    if im.metabox is not None:
        inodes.append(im.inode(im.metabox.nid))
    if im.sb.packed_nid:
        inodes.append(im.inode(im.sb.packed_nid))
    for ino in inodes:
        if ino.layout == E.LAYOUT_COMPRESSED_FULL:
            m = state(im).zmap(ino)
            if getattr(m, "advise", 0) & E.ADVISE_EXTENTS:
                out.add(E.extent_recsize(m.advise))
    return out


@pytest.mark.root
@pytest.mark.parametrize("combo", METABOX)
def test_metabox_images_read_back(tmp_path, tree, combo):  # noqa: F811
    img = anchor(tmp_path, tree, METABOX[combo])
    # fsck.erofs 1.9.4 --extract exits 1 on an in-metabox inode's ztailpacking tail (it
    # reads the inline pcluster from the image, not the metabox); the kernel and we agree
    fsck(img, extract="ztail" not in combo)
    im = _round_trip(tmp_path, tree, img, ignore=NSEC)
    assert im.sb.feature_incompat & E.FEATURE_INCOMPAT_METABOX
    assert im.root_nid >> E.NID_METABOX_BIT            # the root is in the metabox
    assert is_compressed(im.inode(im.metabox.nid)) == (combo != "plain")
    inside = sum(im.space_of(ino) is im.metabox for _p, _d, ino in im.walk())
    assert inside > 300
    if "prefix" in combo:
        assert im.long_xattr_prefixes() == [b"user.no"]
    _cli_reads(img)
    p = _cli("inspect", "--json", img)
    assert json.loads(p.stdout)["metabox"] == {
        "nid": im.metabox.nid, "size": im.metabox.size,
        "layout": im.inode(im.metabox.nid).layout_name}


@pytest.mark.root
@pytest.mark.parametrize("combo", B48)
def test_48bit_compressed_images_read_back(tmp_path, tree, combo):  # noqa: F811
    img = anchor(tmp_path, tree, B48[combo])
    im = _round_trip(tmp_path, tree, img, ignore=NSEC)
    assert im.is_48bit and _record_sizes(im)
    _cli_reads(img)


@pytest.mark.root
@pytest.mark.parametrize("args", [["-zlz4hc", "-C65536", "-m65536:lz4hc"],
                                  ["-zlzma", "-C65536", "-m65536"]], ids=["lz4hc", "lzma"])
def test_real_tree(tmp_path, args):
    """/usr/lib/python3.11 (1,500 inodes, a metabox of ~1.1 MiB in 4-6 extents of 64 KiB pclusters):
    unpack = the kernel's tree (full metadata), check clean."""
    src = "/usr/lib/python3.11"
    require(os.path.isdir(src), f"no {src}")
    img = anchor(tmp_path, src, args)
    im = open_image(img)
    assert check_image(im) == []
    assert len(state(im).zmap(im.inode(im.metabox.nid)).extents) > 3
    out = tmp_path / "out"
    unpack_to_dir(im, out, [])
    with mounted(img) as mnt:
        assert compare_trees(mnt, out, check_nlink=True) == []


def test_extent_record_forms(tmp_path, tree):  # noqa: F811
    """Every record size mkfs.erofs 1.9.4 writes is met: 4 (the packed inode), 8 and 16
    (unaligned pclusters, the metabox)."""
    seen = set()
    for i, args in enumerate([*B48.values(), METABOX["lz4hc-64k"]]):
        seen |= _record_sizes(open_image(anchor(tmp_path, tree, args, f"{i}.img")))
    assert {4, 16} <= seen, seen


def _fix_sum(data):
    if struct.unpack_from("<I", data, SB + 8)[0] & E.FEATURE_COMPAT_SB_CHKSUM:
        blksz = 1 << data[SB + 0x0C]
        struct.pack_into("<I", data, SB + 4,
                         E.superblock_checksum(bytes(data[:max(blksz, 2 * SB)])))


def _one_line(tmp_path, img, want):
    for args in (["check", img], ["unpack", "-o", tmp_path / "o", img], ["inspect", img]):
        p = _cli(*args)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stdout + p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], \
            p.stdout + p.stderr


@pytest.mark.root
def test_corrupted_metabox_is_one_line(tmp_path, tree):  # noqa: F811
    """The metabox's pclusters overwritten: check, unpack and inspect say so in one line
    (exit 1), and the kernel refuses the image too."""
    img = anchor(tmp_path, tree, METABOX["lz4hc-64k"])
    im = open_image(img)
    exts = state(im).zmap(im.inode(im.metabox.nid)).extents
    im.close()
    data = bytearray(img.read_bytes())
    for x in exts:
        if x.alg >= 0:
            data[x.pa:x.pa + x.plen] = b"\xff" * x.plen
    img.write_bytes(data)
    _one_line(tmp_path, img, f"inode {im.metabox.nid}: extent at 0")
    with pytest.raises(OSError):
        with mounted(img):
            pass


@pytest.mark.parametrize("edit,want", [
    ("nid-bit63", "has bit 63 set"),
    ("nid-0", "inode 0: bad file mode"),
    ("no-extslot", "no metabox nid"),
    ("no-feature", "in the metabox (bit 63), which this image has none of"),
    ("huge", "more than the 1024 MiB read"),
])
def test_bad_metabox_fields_are_one_line(tmp_path, tree, edit, want):  # noqa: F811
    img = anchor(tmp_path, tree, METABOX["lz4"])
    im = open_image(img)
    mino = im.inode(im.metabox.nid)
    im.close()
    data = bytearray(img.read_bytes())
    at = SB + E.SB_METABOX_NID_OFFSET
    if edit == "nid-bit63":
        struct.pack_into("<Q", data, at, struct.unpack_from("<Q", data, at)[0] | 1 << 63)
    elif edit == "nid-0":
        struct.pack_into("<Q", data, at, 0)
    elif edit == "no-extslot":
        data[SB + 0x0D] = 0
    elif edit == "no-feature":
        inc = struct.unpack_from("<I", data, SB + 0x50)[0]
        struct.pack_into("<I", data, SB + 0x50, inc & ~E.FEATURE_INCOMPAT_METABOX)
    else:
        assert mino.version == E.INODE_COMPACT
        struct.pack_into("<I", data, mino.offset + 8, 3 << 30)     # i_size 3 GiB
    _fix_sum(data)
    img.write_bytes(data)
    _one_line(tmp_path, img, want)
