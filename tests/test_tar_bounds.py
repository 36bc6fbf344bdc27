"""The tar parser's bounds, each at the limit (accepted) and one past it (a one-line
error, nothing written): 64 KiB path and link names, symlink targets of 4,095 bytes,
the number of sparse regions (PAX 1.0, PAX 0.1 and old GNU maps) and a sparse map
larger than the per-entry metadata limit."""
import io
import os
import pathlib
import tarfile
import tempfile

import pytest
from test_pack_validate import validate_rafs_bootstrap

from erofs_tools.builder import tar_reader as T
from erofs_tools.builder.tar_source import pack_tar
from erofs_tools.builder.tar_tree import MAX_SYMLINK
from erofs_tools.errors import ErofsToolsError

BLOCK = 512


def _outdir(tmp_path):
    return pathlib.Path(tempfile.mkdtemp(dir=tmp_path))


def _pack(tmp_path, data):
    out = _outdir(tmp_path)
    boot, blobs = out / "o.boot", out / "blobs"
    blobs.mkdir()
    pack_tar(io.BytesIO(data), str(boot), str(blobs), source_type="tar")
    sizes = {n: os.path.getsize(blobs / n) for n in os.listdir(blobs)}
    return validate_rafs_bootstrap(str(boot), sizes)


def _rejected(tmp_path, data, *words):
    out = _outdir(tmp_path)
    boot, blobs = out / "o.boot", out / "blobs"
    blobs.mkdir()
    with pytest.raises(ErofsToolsError) as e:
        pack_tar(io.BytesIO(data), str(boot), str(blobs), source_type="tar")
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 1000, msg[:2000]
    for w in words:
        assert w in msg, msg
    assert not boot.exists() and os.listdir(blobs) == []
    return msg


def _tar(*members):
    """members: (TarInfo, data bytes or None)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def _file(name, data=b"x", **pax):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = 1_700_000_000
    if pax:
        ti.pax_headers = {k: str(v) for k, v in pax.items()}
    return ti, data


def _long_path(length):
    """A relative path of exactly `length` bytes, components of at most 200 bytes."""
    parts, left = [], length
    while left > 201:
        parts.append("d" * 200)
        left -= 201
    parts.append("f" * left)
    path = "/".join(parts)
    assert len(path) == length
    return path


def test_limits_are_the_documented_ones():
    assert (T.MAX_NAME, MAX_SYMLINK, T.MAX_SPARSE_REGIONS, T.MAX_META) == \
        (64 << 10, 4095, 1 << 20, 16 << 20)


def test_path_of_64k_accepted_one_more_rejected(tmp_path):
    name = _long_path(T.MAX_NAME)
    stats = _pack(tmp_path, _tar(_file(name, b"deep")))
    assert b"/" + name.encode() in stats["paths"]
    _rejected(tmp_path, _tar(_file(_long_path(T.MAX_NAME + 1))), "longer than 65536")


def test_hardlink_target_over_64k_rejected(tmp_path):
    ti = tarfile.TarInfo("h")
    ti.type = tarfile.LNKTYPE
    ti.linkname = _long_path(T.MAX_NAME + 1)
    _rejected(tmp_path, _tar(_file("f"), (ti, None)), "longer than 65536")


@pytest.mark.parametrize("length,ok", [(MAX_SYMLINK, True), (MAX_SYMLINK + 1, False)])
def test_symlink_target_length(tmp_path, length, ok):
    ti = tarfile.TarInfo("l")
    ti.type = tarfile.SYMTYPE
    ti.linkname = "t" * length
    data = _tar((ti, None))
    if ok:
        assert b"/l" in _pack(tmp_path, data)["paths"]
    else:
        _rejected(tmp_path, data, "1..4095")


def _sparse_1_0(map_text, data=b"", realsize=1 << 30):
    """A PAX sparse 1.0 member whose data area starts with `map_text`."""
    body = map_text + bytes(-len(map_text) % BLOCK) + data
    return _file("GNUSparseFile.0/s", body, **{
        "GNU.sparse.major": 1, "GNU.sparse.minor": 0, "GNU.sparse.name": "s",
        "GNU.sparse.realsize": realsize})


def test_sparse_1_0_region_count_limit(tmp_path):
    ok = _sparse_1_0(b"2\n0\n4\n8192\n4\n", b"abcdwxyz", realsize=1 << 20)
    assert b"/s" in _pack(tmp_path, _tar(ok))["paths"]
    too_many = _sparse_1_0(f"{T.MAX_SPARSE_REGIONS + 1}\n".encode())
    _rejected(tmp_path, _tar(too_many), "bad sparse 1.0 map")


def test_sparse_1_0_map_over_metadata_limit(tmp_path):
    # one number padded with zeros past 16 MiB, never ending its line
    _rejected(tmp_path, _tar(_sparse_1_0(b"0" * (T.MAX_META + BLOCK))), "sparse map too large")


def test_sparse_0_1_map_region_limit(tmp_path):
    nums = ",".join(["0,0"] * (T.MAX_SPARSE_REGIONS + 1))
    ti, _ = _file("s", b"", **{"GNU.sparse.major": 0, "GNU.sparse.minor": 1,
                               "GNU.sparse.realsize": 1 << 20, "GNU.sparse.map": nums})
    _rejected(tmp_path, _tar((ti, b"")), "bad GNU.sparse.map")


def _gnu_old_sparse(n_regions):
    """An old-GNU 'S' member with n_regions one-byte regions (4 in the header, 21 per
    extension block)."""
    regions = [(2 * i, 1) for i in range(n_regions)]
    hdr = bytearray(BLOCK)
    hdr[0:1] = b"s"
    hdr[100:108] = b"0000644\0"
    hdr[108:116] = b"0000000\0"
    hdr[116:124] = b"0000000\0"
    hdr[124:136] = b"%011o\0" % n_regions
    hdr[136:148] = b"%011o\0" % 1_700_000_000
    hdr[156:157] = b"S"
    hdr[257:265] = b"ustar  \0"

    def put(buf, at, off, num):
        buf[at:at + 12] = b"%011o\0" % off
        buf[at + 12:at + 24] = b"%011o\0" % num

    head, rest = regions[:4], regions[4:]
    for i, (o, n) in enumerate(head):
        put(hdr, 386 + 24 * i, o, n)
    hdr[482] = 1 if rest else 0
    hdr[483:495] = b"%011o\0" % (2 * n_regions)
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    out = bytearray(hdr)
    for at in range(0, len(rest), 21):
        ext = bytearray(BLOCK)
        for i, (o, n) in enumerate(rest[at:at + 21]):
            put(ext, 24 * i, o, n)
        ext[504] = 1 if at + 21 < len(rest) else 0
        out += ext
    data = b"\x01" * n_regions
    out += data + bytes(-len(data) % BLOCK) + bytes(2 * BLOCK)
    return bytes(out)


def test_gnu_old_sparse_region_limit(tmp_path):
    assert b"/s" in _pack(tmp_path, _gnu_old_sparse(30))["paths"]
    _rejected(tmp_path, _gnu_old_sparse(T.MAX_SPARSE_REGIONS + 22), "too many sparse regions")
