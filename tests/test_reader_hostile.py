"""Crafted images: loops, bad names and offsets, out-of-range chunks and sizes. The reader,
check and unpack must answer with a one-line ErofsToolsError, never hang, and never write
outside the target directory."""
import os
import subprocess
import sys

import pytest
from helpers import require_tool

from erofs_tools.errors import CorruptImageError, ErofsToolsError
from erofs_tools.format import erofs as E
from erofs_tools.reader.fsck import check_image
from erofs_tools.reader.image import Image
from erofs_tools.reader.unpack import unpack_to_dir, unpack_to_tar


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "erofs_tools", *map(str, args)],
                          capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    require_tool("mkfs.erofs")
    d = tmp_path_factory.mktemp("hostile")
    src = d / "src"
    outside = d / "outside"
    outside.mkdir()
    src.mkdir()
    os.symlink(str(outside), src / "aaaa")
    (src / "aaab").mkdir()
    (src / "aaab" / "pwned").write_bytes(b"should never land outside")
    (src / "file1").write_bytes(b"x" * 10000)
    (src / "sub").mkdir()
    (src / "sub" / "inner").mkdir()
    (src / "sub" / "inner" / "f").write_bytes(b"f")
    (src / "q7").write_bytes(b"zz")
    os.symlink("file1", src / "lnk")
    os.setxattr(src / "file1", "user.a", b"1")
    os.setxattr(src / "q7", "user.a", b"1")
    # a fixed UUID and build time: random superblock bytes once held "q7" by chance,
    # and the name patch below must find the dirent's name exactly once
    fixed = ["-U", "11111111-2222-3333-4444-555555555555", "-T", "0"]
    plain = d / "plain.img"
    subprocess.run(["mkfs.erofs", "--quiet", *fixed, "-x1", str(plain), str(src)], check=True,
                   capture_output=True)
    chunked = d / "chunked.img"
    subprocess.run(["mkfs.erofs", "--quiet", *fixed, "--chunksize=4096", str(chunked), str(src)],
                   check=True, capture_output=True)
    return {"dir": d, "outside": outside, "plain": plain.read_bytes(),
            "chunked": chunked.read_bytes()}


def dirent_offset(img, dir_path, name):
    dino = img.lookup(dir_path)
    for _fo, length, dev, phys in img.map_data(dino):
        assert dev == 0
        for b in range(0, length, img.blksz):
            base = phys + b
            n = E.Dirent.decode(img.data, base).nameoff // 12
            for i in range(n):
                de = E.Dirent.decode(img.data, base + 12 * i)
                start = base + de.nameoff
                if bytes(img.data[start:start + len(name)]) == name:
                    nxt = E.Dirent.decode(img.data, base + 12 * (i + 1)).nameoff \
                        if i + 1 < n else None
                    if nxt is None or nxt - de.nameoff == len(name):
                        return base + 12 * i
    raise KeyError(name)


def patch(buf, off, value, size):
    b = bytearray(buf)
    b[off:off + size] = value.to_bytes(size, "little")
    return bytes(b)


def fix_checksum(buf):
    b = bytearray(buf)
    if len(b) >= 4096 and int.from_bytes(b[E.SUPER_OFFSET + 8:E.SUPER_OFFSET + 12], "little") \
            & E.FEATURE_COMPAT_SB_CHKSUM:
        b[E.CHECKSUM_FIELD:E.CHECKSUM_FIELD + 4] = \
            E.superblock_checksum(bytes(b[:4096])).to_bytes(4, "little")
    return bytes(b)


def replace_name(buf, old, new):
    assert len(old) == len(new) and buf.count(old) == 1, (old, buf.count(old))
    return buf.replace(old, new)


def assert_clean_failure(data, tmp_path, base, expect=None, check_must_fail=True):
    """open/check/unpack/tar all end in ErofsToolsError or success; nothing escapes.
    The superblock checksum is recomputed first, as a deliberate attacker would."""
    data = fix_checksum(data)
    msgs = []
    try:
        img = Image(data)
    except ErofsToolsError as e:
        msgs.append(str(e))
        img = None
    if img is not None:
        probs = check_image(img)
        if check_must_fail:
            assert probs, "check found nothing"
        msgs += [str(p) for p in probs]
        out = tmp_path / "out"
        with pytest.raises(ErofsToolsError) as ei:
            unpack_to_dir(img, out)
        msgs.append(str(ei.value))
        assert not out.exists()
        assert [x for x in os.listdir(tmp_path) if ".unpack-" in x] == []
        import io
        try:
            unpack_to_tar(img, io.BytesIO())
        except ErofsToolsError as e:
            msgs.append(str(e))
    assert os.listdir(base["outside"]) == [], "wrote outside the target"
    for m in msgs:
        assert "\n" not in m
    if expect:
        assert any(expect in m for m in msgs), msgs
    # and through the CLI: one 'error:' line, exit 1
    p = tmp_path / "img"
    p.write_bytes(data)
    r = _cli("unpack", p, "-o", tmp_path / "cli-out")
    assert r.returncode == 1 and r.stderr.startswith(b"error: ") and r.stderr.count(b"\n") == 1, r.stderr
    assert os.listdir(base["outside"]) == []
    r = _cli("check", p)
    assert r.returncode == 1 and b"Traceback" not in r.stderr
    return msgs


def test_base_is_clean(base, tmp_path):
    for key in ("plain", "chunked"):
        img = Image(base[key])
        assert check_image(img) == []
        unpack_to_dir(img, tmp_path / key)
        assert os.readlink(tmp_path / key / "aaaa") == str(base["outside"])
    assert os.listdir(base["outside"]) == []


def test_duplicate_name_symlink_then_dir_never_escapes(base, tmp_path):
    data = replace_name(base["plain"], b"aaab", b"aaaa")
    assert_clean_failure(data, tmp_path, base, expect="duplicate")


def test_name_with_slash(base, tmp_path):
    data = replace_name(base["plain"], b"aaab", b"aa/b")
    assert_clean_failure(data, tmp_path, base, expect="contains '/'")


def test_name_dotdot(base, tmp_path):
    data = replace_name(base["plain"], b"q7", b"..")
    assert_clean_failure(data, tmp_path, base, expect="'..'")


def test_directory_loop_to_root(base, tmp_path):
    img = Image(base["plain"])
    off = dirent_offset(img, "/sub", b"inner")
    data = patch(base["plain"], off, img.root_nid, 8)
    assert_clean_failure(data, tmp_path, base, expect="linked more than once")


def test_directory_two_cycle(base, tmp_path):
    img = Image(base["plain"])
    sub = img.lookup("/sub").nid
    off = dirent_offset(img, "/sub", b"inner")
    data = patch(base["plain"], off, sub, 8)
    assert_clean_failure(data, tmp_path, base, expect="linked more than once")


def test_bad_nameoff(base, tmp_path):
    img = Image(base["plain"])
    off = dirent_offset(img, "/", b"aaaa")
    root_first = off - 12 * [d.name for d in img.dirents(img.inode(img.root_nid))].index(b"aaaa")
    for value in (0, 5, 13, 4095, 4096, 65535):
        data = patch(base["plain"], root_first + 8, value, 2)
        assert_clean_failure(data, tmp_path, base)


def test_dirent_nid_out_of_range(base, tmp_path):
    img = Image(base["plain"])
    off = dirent_offset(img, "/", b"file1")
    for nid in (0xFFFFFFFF, 1 << 40, (1 << 64) - 1, len(base["plain"]) // 32):
        data = patch(base["plain"], off, nid, 8)
        assert_clean_failure(data, tmp_path, base)


def test_flat_file_size_beyond_image(base, tmp_path):
    img = Image(base["plain"])
    ino = img.lookup("/file1")
    size_off = ino.offset + 8
    width = 8 if ino.version else 4
    data = patch(base["plain"], size_off, min((1 << (8 * width)) - 1, 1 << 40), width)
    assert_clean_failure(data, tmp_path, base, expect="outside the image")
    if width == 8:
        data = patch(base["plain"], size_off, (1 << 64) - 1, 8)
        assert_clean_failure(data, tmp_path, base, expect="negative size")


def test_chunk_index_out_of_range(base, tmp_path):
    img = Image(base["chunked"])
    ino = img.lookup("/file1")
    assert ino.layout == E.LAYOUT_CHUNK_BASED
    fmt = ino.i_u & 0xFFFF
    unit = 8 if fmt & E.CHUNK_FORMAT_INDEXES else 4
    start = (ino.data_end + unit - 1) // unit * unit
    blk_off = start + (4 if unit == 8 else 0)
    data = patch(base["chunked"], blk_off, 0xFFFFFF00, 4)
    assert_clean_failure(data, tmp_path, base, expect="outside the image")
    if unit == 8:
        data = patch(base["chunked"], start + 2, 7, 2)          # device 7 of 0
        assert_clean_failure(data, tmp_path, base, expect="device")


def test_chunk_format_huge_chunks_stay_bounded(base, tmp_path):
    """A chunk format claiming 2^43-byte chunks plus a huge size: bounded, clean."""
    img = Image(base["chunked"])
    ino = img.lookup("/file1")
    data = patch(base["chunked"], ino.offset + 0x10, (ino.i_u & ~0x1F) | 0x1F, 2)
    width = 8 if ino.version else 4
    data = patch(data, ino.offset + 8, (1 << (8 * width)) - 1, width)
    assert_clean_failure(data, tmp_path, base)


def test_symlink_sizes(base, tmp_path):
    img = Image(base["plain"])
    ino = img.lookup("/lnk")
    width = 8 if ino.version else 4
    for size in (0, 4096, 1 << 31):
        data = patch(base["plain"], ino.offset + 8, size, width)
        assert_clean_failure(data, tmp_path, base, expect="symlink")


def test_shared_xattr_id_out_of_range(base, tmp_path):
    img = Image(base["plain"])
    ino = img.lookup("/file1")
    raw = img.read(ino.offset + ino.inode_size, 12)
    assert raw[4] >= 1, "mkfs.erofs -x1 should share user.a"
    data = patch(base["plain"], ino.offset + ino.inode_size + 12, 0x3FFFFFFF, 4)
    assert_clean_failure(data, tmp_path, base, expect="shared xattr")


def test_root_not_a_directory(base, tmp_path):
    img = Image(base["plain"])
    f = img.lookup("/file1").nid
    data = patch(base["plain"], E.SUPER_OFFSET + 14, f, 2)
    # the superblock checksum now fails first; fix it so the root check is reached
    with pytest.raises(CorruptImageError, match="not a directory"):
        Image(fix_checksum(data))
    with pytest.raises(CorruptImageError, match="checksum"):
        Image(data)


def test_truncations(base, tmp_path):
    """Every truncated image is reported (opening it fails, or check finds a problem,
    and so does the CLI), and nothing is written outside the target."""
    data = base["plain"]
    for cut in (0, 100, 1024, 1100, 4095, 4096, len(data) // 2, len(data) - 1):
        (tmp_path / f"t{cut}.img").write_bytes(data[:cut])
        r = _cli("check", tmp_path / f"t{cut}.img")
        assert r.returncode == 1, (cut, r.stdout, r.stderr)
        try:
            img = Image(data[:cut])
        except ErofsToolsError as e:
            assert str(e) and "\n" not in str(e), repr(str(e))
            continue
        problems = check_image(img)
        assert problems, f"image cut to {cut} of {len(data)} bytes: check found nothing"
        try:
            unpack_to_dir(img, tmp_path / f"o{cut}")
        except ErofsToolsError:
            pass
    assert os.listdir(base["outside"]) == []


def _xattr_name_offset(data):
    """Offset of the suffix byte 'a' of the (shared) xattr user.a = "1"."""
    needle = b"\x01\x01\x01\x00a1"
    assert data.count(needle) == 1
    return data.index(needle) + 4


def test_xattr_name_with_nul(base, tmp_path):
    """Found by the fuzzer: a NUL inside an xattr name reached setxattr (ValueError)."""
    data = bytearray(base["plain"])
    data[_xattr_name_offset(base["plain"])] = 0
    assert_clean_failure(bytes(data), tmp_path, base, expect="xattr name contains NUL")


def test_xattr_name_not_utf8_in_tar(base, tmp_path):
    """Found by the fuzzer: a non-UTF-8 xattr name broke the PAX header encoder. Such a
    name is legal (the directory extraction keeps it) but a tar stream cannot hold it."""
    import io
    data = bytearray(base["plain"])
    data[_xattr_name_offset(base["plain"])] = 0xFF
    img = Image(fix_checksum(bytes(data)))
    assert dict(img.xattrs(img.lookup("/file1")))[b"user.\xff"] == b"1"
    with pytest.raises(ErofsToolsError, match="not UTF-8"):
        unpack_to_tar(img, io.BytesIO())
    unpack_to_dir(img, tmp_path / "out")
    assert os.getxattr(tmp_path / "out" / "file1", b"user.\xff") == b"1"
