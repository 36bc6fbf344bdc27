"""`erofs-tools mkfs --tar=f|i --gzinfo[=FILE]` (mkfs.erofs 1.9): gzip tar input, and with
=FILE an AWS SOCI-compatible zinfo (v2) of the gzip stream. The oracle is mkfs.erofs
1.9.4 itself: for a small layer, one of 14 MiB (four checkpoints), two gzip members,
many (as estargz) and a layer with an empty member after the tar's end (which 1.9.4
never reads),
our zinfo is its zinfo byte for byte; our image is our --ungzip image; the zinfo is
usable: from its checkpoints the C core's zran extraction gives random ranges of the
tar; the --tar=f image mounts with the host kernel and equals tar -x of the layer. Bad
input is one line, exit 1, nothing written. The option was refused before ("no such
option"), so each test failed on the code before it."""
import gzip
import os
import random
import re
import shutil
import struct
import subprocess
import sys

import pytest
from helpers import compare_trees, mounted, noise, require_tool, text
from test_tar_helpers import run_cli, tar_x

from erofs_tools._native import ZranPoint
from erofs_tools._native_zran import zran_extract

UUID = "01234567-89ab-cdef-0011-2233445566ff"
REC = 17 + 32768


def _tar(src, out):
    subprocess.run(["tar", "--format=pax", "--numeric-owner", "-cf", str(out), "-C",
                    str(src), "."], check=True)
    return out


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    base = tmp_path_factory.mktemp("gzinfo")
    small = base / "small"
    (small / "d").mkdir(parents=True)
    (small / "d" / "a").write_bytes(text(3000, 1))
    (small / "b").write_bytes(b"hello\n")
    os.symlink("d/a", small / "s")
    big = base / "big"
    big.mkdir()
    (big / "rand").write_bytes(noise(6 << 20, 2))
    (big / "text").write_bytes(text(8 << 20, 3))
    (big / "few").write_bytes(text(70000, 4))
    out = {}
    for name, src in (("small", small), ("big", big)):
        subprocess.run(["tar", "--format=pax", "--numeric-owner", "-czf",
                        str(base / f"{name}.tar.gz"), "-C", str(src), "."], check=True)
        out[name] = base / f"{name}.tar.gz"
    raw = _tar(big, base / "big.tar").read_bytes()
    half = len(raw) // 2 // 512 * 512       # two members, split on a tar block
    (base / "two.tar.gz").write_bytes(gzip.compress(raw[:half], 6)
                                      + gzip.compress(raw[half:], 1))
    out["two"] = base / "two.tar.gz"
    # many members of 512 B to 5 MiB, each ending on a tar block (1.9.4 fails on a
    # member that ends inside a tar header: "failed to read header block")
    rnd, pos, members = random.Random(1), 0, []
    while pos < len(raw):
        n = rnd.choice([512, 1024, 4096, 29696, 33280, 65536, 1 << 20, 5 << 20])
        members.append(gzip.compress(raw[pos:pos + n], rnd.choice([1, 6, 9])))
        pos += n
    (base / "many.tar.gz").write_bytes(b"".join(members))
    out["many"] = base / "many.tar.gz"
    # an (estargz-like) empty member after the tar: mkfs.erofs stops before it
    (base / "footer.tar.gz").write_bytes(out["big"].read_bytes() + gzip.compress(b""))
    out["footer"] = base / "footer.tar.gz"
    out["base"] = base
    out["srcs"] = {"small": small, "big": big}
    return out


def _anchor(tmp_path, mode, layer):
    require_tool("mkfs.erofs")
    p = subprocess.run(["mkfs.erofs", "--help"], capture_output=True, text=True)
    assert "--gzinfo" in p.stdout + p.stderr, "mkfs.erofs is not the 1.9 anchor"
    ref = tmp_path / "ref.zinfo"
    subprocess.run(["mkfs.erofs", "--quiet", "-T", "0", "-U", UUID, f"--tar={mode}",
                    f"--gzinfo={ref}", str(tmp_path / "ref.img"), str(layer)],
                   check=True, capture_output=True)
    return ref.read_bytes()


def _ours(tmp_path, mode, layer, *opts, name="ours"):
    img = tmp_path / f"{name}.img"
    run_cli("mkfs", "-q", "-T", "0", "-U", UUID, f"--tar={mode}", *opts, img, layer)
    return img


@pytest.mark.parametrize("name,mode", [("small", "f"), ("big", "f"), ("big", "i"),
                                       ("two", "f"), ("two", "i"), ("footer", "f"),
                                       ("many", "i")])
def test_zinfo_is_mkfs_erofs_1_9s(tmp_path, layers, name, mode):
    layer = layers[name]
    ref = _anchor(tmp_path, mode, layer)
    zinfo = tmp_path / "ours.zinfo"
    img = _ours(tmp_path, mode, layer, f"--gzinfo={zinfo}")
    ours = zinfo.read_bytes()
    n, span = struct.unpack_from("<IQ", ours)
    assert span == 4 << 20 and len(ours) == 12 + n * REC
    assert ours == ref
    if name == "many":      # a checkpoint at each member's start
        assert n > 10
    else:
        assert n == {"small": 1, "big": 4, "two": 4, "footer": 4}[name]
    # the image is --ungzip's, and bare --gzinfo's (which writes no zinfo)
    ung = _ours(tmp_path, mode, layer, "--ungzip", name="ung")
    bare = _ours(tmp_path, mode, layer, "--gzinfo", name="bare")
    assert img.read_bytes() == ung.read_bytes() == bare.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["bare.img", "ours.img", "ours.zinfo", "ref.img",
                                            "ref.zinfo", "ung.img"]


def _checkpoints(zinfo, comp):
    n, _ = struct.unpack_from("<IQ", zinfo)
    pts = []
    for i in range(n):
        off = 12 + i * REC
        cin, cout, bits = struct.unpack_from("<QQB", zinfo, off)
        pts.append(ZranPoint(cin, cout, bits, comp[cin - 1] if bits else 0,
                             zinfo[off + 17:off + REC]))
    return pts


@pytest.mark.parametrize("name", ["big", "two", "many"])
def test_zinfo_checkpoints_extract_the_tar(tmp_path, layers, name):
    comp = layers[name].read_bytes()
    tar = gzip.decompress(comp)
    zinfo = tmp_path / "z"
    _ours(tmp_path, "i", layers[name], f"--gzinfo={zinfo}")
    pts = _checkpoints(zinfo.read_bytes(), comp)
    assert [p.out_offset for p in pts] == sorted({p.out_offset for p in pts})
    assert pts[0].out_offset == 0 and len(pts) >= 4
    if name != "big":       # a later member's start is a checkpoint
        assert any(p.in_offset > 20 and comp[p.in_offset - 10:p.in_offset - 8]
                   == b"\x1f\x8b" for p in pts)
    rnd = random.Random(7)
    ranges = [(rnd.randrange(len(tar) - 70000), rnd.randrange(1, 70000)) for _ in range(40)]
    ranges += [(p.out_offset, 5000) for p in pts] + [(len(tar) - 100, 100)]
    for start, length in ranges:
        p = max((q for q in pts if q.out_offset <= start), key=lambda q: q.out_offset)
        got = zran_extract(p, memoryview(comp)[p.in_offset:], start - p.out_offset, length)
        assert got == tar[start:start + length], (start, length, p.out_offset)


@pytest.mark.root
@pytest.mark.parametrize("name", ["small", "two"])
def test_full_image_mounts_as_the_tar(tmp_path, layers, name):
    img = tmp_path / "l.img"       # (the archive's mtimes: no -T)
    run_cli("mkfs", "-q", "--tar=f", f"--gzinfo={tmp_path / 'z'}", img, layers[name])
    assert os.path.getsize(tmp_path / "z") > 12
    ref = tmp_path / "ref"
    ref.mkdir()
    tar_x(str(layers[name]), str(ref))
    with mounted(img) as mnt:
        diffs = compare_trees(str(ref), mnt, check_nlink=True)
        assert not diffs, "\n".join(diffs[:40])


def _refused(tmp_path, layer, zinfo, *, contains):
    before = set(os.listdir(tmp_path))
    p = run_cli("mkfs", "--tar=f", f"--gzinfo={zinfo}", tmp_path / "out.img", layer,
                check=False)
    err = p.stderr.decode()
    assert p.returncode == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert contains in err
    assert set(os.listdir(tmp_path)) == before        # no image, no zinfo, no temp file


def test_refusals(tmp_path, layers):
    plain = _tar(layers["srcs"]["small"], tmp_path / "plain.tar")
    _refused(tmp_path, plain, tmp_path / "z", contains="not gzip-compressed")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(layers["big"].read_bytes()[:3 << 20])
    _refused(tmp_path, cut, tmp_path / "z", contains="truncated")
    bad = tmp_path / "bad.tar.gz"
    data = bytearray(layers["big"].read_bytes())
    data[30:4096] = bytes(4066)     # a stored block whose lengths do not match
    bad.write_bytes(bytes(data))
    _refused(tmp_path, bad, tmp_path / "z", contains="gzip")
    (tmp_path / "adir").mkdir()
    _refused(tmp_path, layers["small"], tmp_path / "adir", contains="is a directory")
    _refused(tmp_path, layers["small"], tmp_path / "nodir" / "z", contains="does not exist")
    p = run_cli("mkfs", "--gzinfo=z", tmp_path / "x.img", layers["base"], check=False)
    assert p.returncode == 1 and b"need --tar" in p.stderr
    p = run_cli("mkfs", "--tar=f", "--gzinfo=", tmp_path / "x.img", layers["small"],
                check=False)
    assert p.returncode == 1 and p.stderr == b"error: --gzinfo=: empty file name\n"
    # a VMDK disk of an index needs the tar's bytes: not the gzip file
    p = run_cli("mkfs", "--tar=i", "--gzinfo", "--vmdk-desc=d.vmdk", tmp_path / "x.img",
                layers["small"], check=False)
    assert p.returncode == 1 and b"--ungzip=FILE" in p.stderr
    shutil.rmtree(tmp_path / "adir")


def test_many_checkpoints_not_held_in_memory(tmp_path, layers):
    """6000 empty gzip members inside the tar: a checkpoint each, 196 MB of zinfo (what
    1.9.4 writes too); mkfs's peak RSS stays far below it (the checkpoints go straight
    to the file). Before, they were all held in memory until the end."""
    raw = _tar(layers["srcs"]["small"], tmp_path / "s.tar").read_bytes()
    empty = gzip.compress(b"")
    layer = tmp_path / "hollow.tar.gz"
    layer.write_bytes(gzip.compress(raw[:1024]) + empty * 6000 + gzip.compress(raw[1024:]))
    zinfo, status = tmp_path / "ours.zinfo", tmp_path / "status"
    # (the child's own peak: VmHWM of its mm; ru_maxrss would count pytest's, forked)
    code = ("import atexit, sys\n"
            f"atexit.register(lambda: open({str(status)!r}, 'w').write("
            "open('/proc/self/status').read()))\n"
            "from erofs_tools.__main__ import main\n"
            "sys.argv = ['erofs-tools'] + sys.argv[1:]\n"
            "main()\n")
    subprocess.run([sys.executable, "-c", code, "mkfs", "-q", "-T", "0", "-U", UUID,
                    "--tar=i", f"--gzinfo={zinfo}", str(tmp_path / "ours.img"), str(layer)],
                   check=True)
    hwm = int(re.search(r"VmHWM:\s+(\d+) kB", status.read_text()).group(1)) << 10
    assert os.path.getsize(zinfo) == 12 + 6002 * REC         # 196 MB
    assert hwm < 120 << 20, hwm
    ref = _anchor(tmp_path, "i", layer)
    assert struct.unpack_from("<I", ref)[0] == 6002
    assert zinfo.read_bytes() == ref


def test_stdin_and_dump(tmp_path, layers):
    """From stdin, and beside --ungzip=FILE (the tar kept): the same zinfo as 1.9.4's of
    the file, and the dump is the whole decompressed layer."""
    ref = _anchor(tmp_path, "i", layers["two"])
    zinfo, dump = tmp_path / "s.zinfo", tmp_path / "l.tar"
    p = run_cli("mkfs", "-q", "--tar=i", f"--gzinfo={zinfo}", f"--ungzip={dump}",
                tmp_path / "s.img", "-", input=layers["two"].read_bytes())
    assert p.returncode == 0
    assert zinfo.read_bytes() == ref
    assert dump.read_bytes() == gzip.decompress(layers["two"].read_bytes())
