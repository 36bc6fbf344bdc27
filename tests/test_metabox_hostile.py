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
import subprocess
import sys
import tarfile

from helpers import run_mkfs

from erofs_tools.format import erofs as E
from erofs_tools.reader.image import Image

GIB = (1 << 30) - 1

# the image opened with 512 MiB of address space: what the test checks is the error
_OPEN = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))
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


def _no_checksum(data: bytearray) -> None:
    off = E.SUPER_OFFSET + 8                    # feature_compat: the checksum's bit off
    struct.pack_into("<I", data, off, struct.unpack_from("<I", data, off)[0] & ~1)


def _set_size(data: bytearray, ino, size: int) -> None:
    struct.pack_into("<Q" if ino.version else "<I", data, ino.offset + 8, size)


def _open(tmp_path, data) -> str:
    p = tmp_path / "bad.img"
    p.write_bytes(bytes(data))
    r = subprocess.run([sys.executable, "-c", _OPEN, str(p)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()


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
    _no_checksum(data)
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
    _no_checksum(data)
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
