"""atomic_output's unlink_first (mkfs: no rename over an existing image, which makes
ext4 flush the new one) and the stream output's truncation (only of a file with bytes)."""
import os

import pytest
from helpers import fsck

from erofs_tools._native import BuildOptions, NativeBuilder
from erofs_tools.fsutil import atomic_output


@pytest.mark.parametrize("unlink_first", [False, True])
def test_atomic_output_replaces_or_keeps(tmp_path, unlink_first):
    target = tmp_path / "out"
    target.write_bytes(b"old")
    ino = target.stat().st_ino
    with pytest.raises(RuntimeError):
        with atomic_output(str(target), mode=0o640, fsync=False,
                           unlink_first=unlink_first) as f:
            f.write(b"half")
            raise RuntimeError("stop")
    assert target.read_bytes() == b"old" and target.stat().st_ino == ino
    with atomic_output(str(target), mode=0o640, fsync=False, unlink_first=unlink_first) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o640
    assert os.listdir(tmp_path) == ["out"]
    # a fresh target works too
    with atomic_output(str(tmp_path / "fresh"), fsync=False, unlink_first=unlink_first) as f:
        f.write(b"x")
    assert (tmp_path / "fresh").read_bytes() == b"x"


def test_stream_output_truncates_a_file_with_bytes(tmp_path):
    """set_output on a file holding stale bytes (longer than the image) still gives a
    clean image: the stale tail is cut."""
    img = tmp_path / "s.img"
    img.write_bytes(os.urandom(3 << 20))
    fd = os.open(img, os.O_RDWR)
    try:
        b = NativeBuilder(BuildOptions(stream_data=True, build_time=0, uuid=bytes(16)))
        b.set_output(fd)
        root = b.add_node(0o40755)
        b.set_root(root)
        f = b.add_node(0o100644, size=5)
        b.set_bytes(f, b"hello")
        b.add_child(root, b"f", f)
        info = b.layout()
        b.write(fd)
        b.close()
    finally:
        os.close(fd)
    assert img.stat().st_size == info.image_size < 1 << 20
    fsck(img)
