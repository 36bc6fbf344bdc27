"""A hostile metabox (mkfs -m) costs memory in proportion to the image, not the 1 GiB
MAX_METABOX the reader would otherwise decode and hold: a metabox inode given a size of
1 GiB and made of zeros (a chunk-based layout whose one chunk is a hole, or an extent
record without stored bytes in a compressed one, as --tar=i -m -z writes them) was read
whole when the image opened: a MemoryError under a 1 GiB address-space cap (three 1 GiB
copies while it was read), from images of 28 KiB and 8 KiB. Both are now one-line
corrupt-image errors (found reading the new seeds of tools/fuzz_reader.py: --MZ -m4096
and --tar=i -m4096 -zlzma)."""
from __future__ import annotations

import io
import struct
import tarfile

from helpers import run_mkfs
from image_edits import append_records_inode, no_checksum, run_capped

from erofs_tools.format import erofs as E
from erofs_tools.reader.image import Image

GIB = (1 << 30) - 1

# the image opened (under image_edits' cap): what the test checks is the error
_OPEN = """
import sys
from erofs_tools.errors import ErofsToolsError
from erofs_tools.reader.image import Image
try:
    Image(open(sys.argv[1], "rb").read())
    print("opened")
except ErofsToolsError as e:
    print("error:", e)
"""


def _tree(root):
    (root / "sub").mkdir(parents=True)
    for i in range(150):        # a metabox of two pclusters: 16-byte extent records
        (root / "sub" / f"file-{i}").write_bytes(b"x" * i)
    (root / "a").write_text("hello\n")


def _set_size(data: bytearray, ino, size: int) -> None:
    struct.pack_into("<Q" if ino.version else "<I", data, ino.offset + 8, size)


def _open(tmp_path, data) -> str:
    p = tmp_path / "bad.img"
    p.write_bytes(bytes(data))
    return "\n".join(run_capped(_OPEN, p)).strip()


def test_chunk_based_metabox_of_one_hole(tmp_path):
    _tree(tmp_path / "t")
    img = tmp_path / "m.img"
    run_mkfs(img, tmp_path / "t", "-m4096")             # the metabox stored plain
    data = bytearray(img.read_bytes())
    im = Image(bytes(data))
    box = im.inode(im.metabox.nid)
    fmt = struct.unpack_from("<H", data, box.offset)[0] & ~0xE
    struct.pack_into("<H", data, box.offset, fmt | E.LAYOUT_CHUNK_BASED << 1)
    struct.pack_into("<I", data, box.offset + 16, 18)   # chunks of 1 GiB, 4-byte indexes
    struct.pack_into("<I", data, (box.data_end + 3) // 4 * 4, 0xFFFFFFFF)   # a hole
    _set_size(data, box, GIB)
    no_checksum(data)
    got = _open(tmp_path, data)
    assert got.startswith("error:") and "stored uncompressed" in got, got
    assert "\n" not in got


def test_compressed_metabox_extent_without_stored_bytes(tmp_path):
    _tree(tmp_path / "t")
    tar = tmp_path / "t.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(tmp_path / "t", arcname=".")
    img = tmp_path / "m.img"
    run_mkfs(img, tar, "--tar=i", "-m4096", "-zlzma")   # extent records
    data = bytearray(img.read_bytes())
    im = Image(bytes(data))
    box = im.inode(im.metabox.nid)
    head = (box.data_end + 7) // 8 * 8
    adv = struct.unpack_from("<H", data, head + 4)[0]
    assert adv & E.ADVISE_EXTENTS and E.extent_recsize(adv) == 16
    last = (head + 8 + 15) // 16 * 16 + 16 * (len(_extents(im, box)) - 1)
    struct.pack_into("<I", data, last, 0)               # no stored bytes: a hole to EOF
    _set_size(data, box, GIB)
    no_checksum(data)
    got = _open(tmp_path, data)
    assert got.startswith("error:") and "a hole of" in got, got
    assert "\n" not in got


def _extents(im, box):
    from erofs_tools.reader.zdata import state
    return state(im).zmap(box).extents


def test_the_metaboxes_read_before_the_edits(tmp_path):
    """(the images above, unedited, open and read: the new rules refuse only the edits)"""
    _tree(tmp_path / "t")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(tmp_path / "t", arcname=".")
    (tmp_path / "t.tar").write_bytes(buf.getvalue())
    for name, src, args in (("a.img", tmp_path / "t", ["-m4096"]),
                            ("b.img", tmp_path / "t.tar", ["--tar=i", "-m4096", "-zlzma"])):
        run_mkfs(tmp_path / name, src, *args)
        assert _open(tmp_path, bytearray((tmp_path / name).read_bytes())) == "opened"


# the image opened and walked: its paths, seconds, peak RSS (MiB)
_WALK = """
import sys, time
from erofs_tools.reader.image import Image
t = time.monotonic()
img = Image(open(sys.argv[1], "rb").read())
paths = sorted(p for p, _d, _i in img.walk())
print(len(paths), img.metabox.size, round(time.monotonic() - t, 2),
      peak_mib())
"""


def test_metabox_records_sharing_one_block(tmp_path):
    """A compressed metabox of 1 GiB whose 262,144 records (8 bytes, one per 4 KiB
    lcluster) all name the first block of the metabox's data: it was decoded into 1 GiB
    (512 times the records' bytes; a MemoryError under the cap). Its extents share one
    pcluster, decoded and held once: the image opens and walks as the unedited one."""
    t = tmp_path / "t"
    t.mkdir()
    for name in ("a", "b", "c"):
        (t / name).write_text(name * 10)
    img = tmp_path / "m.img"
    run_mkfs(img, t, "-m4096")                          # the metabox stored plain
    data = bytearray(img.read_bytes())
    im = Image(bytes(data))
    want = sorted(p for p, _d, _i in im.walk())
    box = im.inode(im.metabox.nid)
    assert box.layout == E.LAYOUT_FLAT_PLAIN and not box.xattr_isize
    bs, n = im.blksz, GIB // 4096 + 1
    # a new metabox inode: 1 GiB of 8-byte records (lclusters of a block), each the
    # same plain block
    nid = append_records_inode(data, im, box, n * bs,
                               E.ADVISE_EXTENTS | 1 << E.ADVISE_EXTRECSZ_BIT, 0,
                               struct.pack("<II", bs, box.startblk * bs) * n, bs)
    struct.pack_into("<Q", data, E.SUPER_OFFSET + E.SB_METABOX_NID_OFFSET, nid)
    no_checksum(data)
    p = tmp_path / "bad.img"
    p.write_bytes(bytes(data))
    paths, size, seconds, rss_mib = run_capped(_WALK, p)[0].split()
    assert int(paths) == len(want) and int(size) == n * bs == 1 << 30
    # (the records alone make some 70 MiB of Python objects: 2 MiB of 8-byte records)
    assert float(seconds) < 30 and int(rss_mib) < 300, (seconds, rss_mib)
