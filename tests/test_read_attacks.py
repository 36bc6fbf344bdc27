"""Crafted images against the read side (review 'readrev'): structures a byte fuzzer rarely
builds. Each test failed before its fix."""
import io
import os
import tarfile

import pytest
from test_reader_hostile import _cli, base, fix_checksum, replace_name  # noqa: F401

from erofs_tools.errors import ErofsToolsError
from erofs_tools.reader.image import Image
from erofs_tools.reader.unpack import unpack_to_tar


def test_tar_refuses_duplicate_names(base, tmp_path):  # noqa: F811
    """'aaaa' a symlink to a directory outside, then a directory 'aaaa' holding 'pwned':
    the tar stream held both, and an extractor that replaces the directory entry by the
    symlink's target (Python's tarfile, fully trusted) wrote aaaa/pwned outside."""
    data = fix_checksum(replace_name(base["plain"], b"aaab", b"aaaa"))
    img = Image(data)
    with pytest.raises(ErofsToolsError, match="duplicate names"):
        unpack_to_tar(img, io.BytesIO())
    p = tmp_path / "img"
    p.write_bytes(data)
    out = tmp_path / "out.tar"
    r = _cli("unpack", p, "--tar", out)
    assert r.returncode == 1 and r.stderr.count(b"\n") == 1 and b"duplicate" in r.stderr
    assert not out.exists()
    r = _cli("inspect", p)
    assert r.returncode == 1 and b"Traceback" not in r.stderr


def test_tar_stream_of_clean_image_extracts_inside(base, tmp_path):  # noqa: F811
    buf = io.BytesIO()
    unpack_to_tar(Image(base["plain"]), buf)
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tf:
        names = [m.name for m in tf.getmembers()]
    assert len(names) == len(set(names))
    assert all(not n.startswith("/") and ".." not in n.split("/") for n in names)
    assert os.listdir(base["outside"]) == []
