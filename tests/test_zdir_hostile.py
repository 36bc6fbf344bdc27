"""A compressed directory (--zD) is read a block at a time as its dirents are parsed: a
directory made one extent record without stored bytes, MAX_ZDIR (256 MiB) of zeros, was
decoded whole before its first block was refused: 2 s and 530 MiB from a 13 KiB image
(--tar=i -zlz4hc --zD, the seed of tools/fuzz_reader.py), a MemoryError under a 512 MiB
cap, and as many seconds again for each directory so made. Now the first block ends it:
one line, "invalid de[0].nameoff 0", in milliseconds."""
from __future__ import annotations

import struct
import tarfile

from helpers import run_mkfs
from image_edits import append_records_inode, no_checksum, run_capped

from erofs_tools.format import erofs as E
from erofs_tools.reader.image import Image

_READ = """
import sys, time
from erofs_tools.errors import ErofsToolsError
from erofs_tools.reader.fsck import check_image
from erofs_tools.reader.image import Image
img = Image(open(sys.argv[1], "rb").read())
t = time.monotonic()
try:
    img.dirents(img.inode(img.root_nid))
    print("read")
except ErofsToolsError as e:
    print("error:", e)
problems = check_image(img)
print(len(problems), round(time.monotonic() - t, 2))
"""


def test_compressed_directory_of_zeros(tmp_path):
    t = tmp_path / "t"
    (t / "sub").mkdir(parents=True)
    for i in range(30):
        (t / "sub" / f"file-{i}").write_bytes(b"%d" % i)
    with tarfile.open(tmp_path / "t.tar", "w") as tf:
        tf.add(t, arcname=".")
    img = tmp_path / "z.img"
    run_mkfs(img, tmp_path / "t.tar", "--tar=i", "-zlz4hc", "--zD")
    data = bytearray(img.read_bytes())
    im = Image(bytes(data))
    root = im.inode(im.root_nid)
    # the root directory: COMPRESSED_FULL, 256 MiB, one 16-byte extent record of no bytes
    fmt = struct.unpack_from("<H", data, root.offset)[0] & ~0xE
    struct.pack_into("<H", data, root.offset, fmt | E.LAYOUT_COMPRESSED_FULL << 1)
    struct.pack_into("<Q" if root.version else "<I", data, root.offset + 8, 256 << 20)
    head = (root.data_end + 7) // 8 * 8
    struct.pack_into("<IHH", data, head, 1, E.ADVISE_EXTENTS | 2 << E.ADVISE_EXTRECSZ_BIT, 0)
    struct.pack_into("<16x", data, (head + 8 + 15) // 16 * 16)
    no_checksum(data)
    bad = tmp_path / "bad.img"
    bad.write_bytes(bytes(data))
    first, second = run_capped(_READ, bad)
    assert first.startswith("error:") and "invalid de[0].nameoff 0 in block 0" in first
    problems, seconds = second.split()
    assert int(problems) > 0 and float(seconds) < 1.5, second


_LIST = """
import sys, time
from erofs_tools.errors import ErofsToolsError
from erofs_tools.reader.image import Image
img = Image(open(sys.argv[1], "rb").read())
t = time.monotonic()
try:
    print("listed", len(img.dirents(img.inode(img.root_nid))))
except ErofsToolsError as e:
    print("error:", e)
print(round(time.monotonic() - t, 2), peak_mib())
"""


def test_compressed_directory_of_one_block_repeated(tmp_path):
    """A compressed root directory of MAX_ZDIR bytes whose 65,536 extent records (8 bytes,
    one per 4 KiB lcluster) all name one block of dirents stored plain: the block's 78
    entries were listed 65,536 times (a MemoryError under 512 MiB; GiBs without the cap)
    from a 560 KiB image. A directory repeats no block: refused before its first one."""
    t = tmp_path / "t"
    (t / "sub").mkdir(parents=True)
    for i in range(200):        # a directory of two full blocks and a tail
        (t / "sub" / f"{i:040d}").write_bytes(b"")
    img = tmp_path / "p.img"
    run_mkfs(img, t)
    data = bytearray(img.read_bytes())
    im = Image(bytes(data))
    sub = im.lookup("/sub")
    assert sub.layout in (E.LAYOUT_FLAT_PLAIN, E.LAYOUT_FLAT_INLINE)
    bs, n = im.blksz, (256 << 20) // 4096
    # a new root: 256 MiB of 8-byte records (lclusters of a block), each sub's first block
    nid = append_records_inode(data, im, sub, n * bs,
                               E.ADVISE_EXTENTS | 1 << E.ADVISE_EXTRECSZ_BIT, 0,
                               struct.pack("<II", bs, sub.startblk * bs) * n, bs)
    struct.pack_into("<H", data, E.SUPER_OFFSET + 14, nid)      # root_nid
    no_checksum(data)
    bad = tmp_path / "bad.img"
    bad.write_bytes(bytes(data))
    first, second = run_capped(_LIST, bad)
    assert first.startswith("error:") and "a directory repeats no block" in first, first
    seconds, rss_mib = second.split()
    assert float(seconds) < 5 and int(rss_mib) < 200, second
