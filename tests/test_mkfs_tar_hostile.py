"""Hostile tars found by the review of `mkfs --tar` and `pack --type tar` (each test
failed on the code before its fix): compressed streams whose checks come after the
tar's end-of-archive record, the decoding thread's error when the parser lags, output
paths that are the input, numbers Python's int() takes and tar readers refuse,
negative mtimes, xattr names the kernel cannot read."""
import gzip
import lzma
import os
import tarfile

import pytest
from test_tar_helpers import E, make_tar, run_cli

DATA = b"A" * 100_000


def _padded_tar():
    """A file, then the end-of-archive record and 12 MiB of zeros (a large blocking
    factor): the compressed stream's checks come long after the tar's end."""
    return make_tar([E("a", data=DATA)], fmt=tarfile.GNU_FORMAT) + bytes(12 << 20)


def _one_error(p, *words):
    err = p.stderr.decode()
    assert p.returncode == 1, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for w in words:
        assert w in err, err
    return err


def _stored_gzip_flipped():
    """A gzip of stored (level 0) deflate blocks with one byte of the file's data
    changed: the deflate stream is valid, only the CRC-32 at its end tells."""
    gz = bytearray(gzip.compress(_padded_tar(), 0))
    i = gz.find(b"A" * 1000)
    gz[i + 500] = ord("B")
    return bytes(gz)


def _xz_without_footer():
    xz = lzma.compress(_padded_tar(), check=lzma.CHECK_CRC64, preset=0)
    return xz[:-12]          # the stream footer cut off


@pytest.mark.parametrize("kind", ["gzip-crc", "xz-footer"])
@pytest.mark.parametrize("stdin", [False, True])
def test_mkfs_checks_the_compressed_stream_to_its_end(tmp_path, kind, stdin):
    """Before: the parser stopped at the end-of-archive record, the rest of the gzip or
    xz stream (its CRC, its footer) was never read: an image with the changed byte in
    `a` (or from a truncated xz) was written, exit 0."""
    data = _stored_gzip_flipped() if kind == "gzip-crc" else _xz_without_footer()
    flag = "--ungzip" if kind == "gzip-crc" else "--unxz"
    src = tmp_path / "in.tar.x"
    src.write_bytes(data)
    before = sorted(os.listdir(tmp_path))
    for mode in ("f", "i"):
        p = run_cli("mkfs", f"--tar={mode}", flag, tmp_path / "o.img",
                    "-" if stdin else src, input=data if stdin else None, check=False)
        _one_error(p, "incorrect data check" if kind == "gzip-crc" else "truncated xz")
        assert sorted(os.listdir(tmp_path)) == before


def test_pack_checks_the_gzip_stream_to_its_end(tmp_path):
    src = tmp_path / "in.tar.gz"
    src.write_bytes(_stored_gzip_flipped())
    p = run_cli("pack", "--type", "targz", src, "-B", tmp_path / "b.boot", "-D",
                tmp_path / "blobs", check=False)
    _one_error(p, "incorrect data check")
    assert not (tmp_path / "b.boot").exists() and os.listdir(tmp_path / "blobs") == []


def test_intact_padded_streams_still_build(tmp_path):
    for name, data, flag in (("g", gzip.compress(_padded_tar(), 1), "--ungzip"),
                             ("x", lzma.compress(_padded_tar(), preset=0), "--unxz")):
        src = tmp_path / name
        src.write_bytes(data)
        run_cli("mkfs", "--tar=f", flag, tmp_path / f"{name}.img", src)


def test_decoding_error_reaches_a_parser_that_lags():
    """Before: the decoding thread gave up queueing its error after 5 s with the queue
    full (the parser busy: a slow disk under the spool, a loaded compression pool),
    and the parser, having read the queued pieces, waited on the empty queue for
    ever."""
    import threading
    import time

    from erofs_tools.builder.tar_stream import _Prefetch
    from erofs_tools.errors import InputError

    class Inner:
        n = 0

        def read(self, size):
            self.n += 1
            if self.n > 2:         # the queue (depth 2) full when it fails
                raise InputError("bad gzip data: boom")
            return b"x" * size

    pf = _Prefetch(Inner(), depth=2)
    time.sleep(6)                   # the parser busy while the queue is full
    out = []

    def consume():
        try:
            while pf.read(1 << 20):
                pass
        except InputError as e:
            out.append(str(e))

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    t.join(30)
    pf.close()
    assert out == ["bad gzip data: boom"], "the parser never got the error"


def test_outputs_that_are_the_input_or_each_other(tmp_path):
    """Before: `--ungzip=X X TAR` (neither existing yet) wrote both outputs to X, one
    lost, exit 0; `mkfs --tar=f T - < T` replaced the input it was reading."""
    data = make_tar([E("a", data=b"x" * 3000)])
    src = tmp_path / "in.tar"
    src.write_bytes(data)
    img = tmp_path / "o.img"
    for flag in ("--ungzip", "--unxz"):
        p = run_cli("mkfs", "--tar=f", f"{flag}={img}", img, src, check=False)
        _one_error(p, "would overwrite --ungzip FILE")
        # the same name spelled through another path of its directory
        p = run_cli("mkfs", "--tar=f", f"{flag}={tmp_path}/./o.img", img, src, check=False)
        _one_error(p, "would overwrite")
    assert sorted(os.listdir(tmp_path)) == ["in.tar"]
    import subprocess
    import sys
    for args in (["--tar=f", src, "-"], ["--tar=i", src, "-"],
                 ["--tar=f", f"--ungzip={src}", img, "-"]):
        with open(src, "rb") as f:
            p = subprocess.run([sys.executable, "-m", "erofs_tools", "mkfs", *map(str, args)],
                               stdin=f, capture_output=True)
        _one_error(p)
        assert src.read_bytes() == data and sorted(os.listdir(tmp_path)) == ["in.tar"]
    # stdin from another file, or a pipe, is fine
    with open(src, "rb") as f:
        p = subprocess.run([sys.executable, "-m", "erofs_tools", "mkfs", "--tar=f", str(img),
                            "-"], stdin=f, capture_output=True)
    assert p.returncode == 0, p.stderr
    p = run_cli("mkfs", "--tar=f", f"--ungzip={tmp_path}/d.tar", tmp_path / "p.img", "-",
                input=data)
    assert (tmp_path / "d.tar").read_bytes() == data


def _hdr(name, size=0, typ=b"0", fields=None):
    ti = tarfile.TarInfo(name)
    ti.size, ti.type, ti.mode, ti.mtime = size, typ, 0o644, 1_600_000_000
    b = bytearray(ti.tobuf(tarfile.USTAR_FORMAT))
    for off, v in (fields or {}).items():
        b[off:off + len(v)] = v
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


def _rec(k, v):
    body = b" " + k + b"=" + v + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def _pax(recs):
    data = b"".join(_rec(k, v) for k, v in recs)
    return _hdr("PaxHeaders/a", len(data), b"x") + data + bytes(-len(data) % 512)


def _file(name=b"a", data=b"hello", **kw):
    return _hdr(name.decode(), len(data), **kw) + data + bytes(-len(data) % 512)


END = bytes(1024)


@pytest.mark.parametrize("case", [
    "pax-uid-underscore", "pax-uid-space", "pax-mtime-underscore", "pax-size-underscore",
    "pax-length-underscore", "octal-0o", "octal-underscore", "sparse-map-space",
    "sparse10-space"])
def test_numbers_tar_readers_refuse_are_refused(tmp_path, case):
    """Before: Python's int() read '1_0' as 10, ' 10' as 10, '0o17' (base 8) as 15:
    images built from numbers GNU tar and Go refuse (a uid, mtime, size or sparse map
    other than the one a tar extraction sees, or none)."""
    data = {
        "pax-uid-underscore": _pax([(b"uid", b"1_0")]) + _file(),
        "pax-uid-space": _pax([(b"uid", b" 10")]) + _file(),
        "pax-mtime-underscore": _pax([(b"mtime", b"1_000.5")]) + _file(),
        "pax-size-underscore": _pax([(b"size", b"0_5")]) + _file(),
        "pax-length-underscore": _hdr("PaxHeaders/a", 512, b"x")
        + (b"1_3 uid=1234\n").ljust(512, b"\0") + _file(),
        "octal-0o": _file(fields={108: b"0o17\0"}),
        "octal-underscore": _file(fields={108: b"1_7\0"}),
        "sparse-map-space": _pax([(b"GNU.sparse.size", b"600"), (b"GNU.sparse.map",
                                                              b"0, 5")]) + _file(),
        "sparse10-space": _pax([(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"),
                                (b"GNU.sparse.name", b"a"),
                                (b"GNU.sparse.realsize", b"600")])
        + _file(b"GNUSparseFile.0/a", b" 1\n0\n5\n".ljust(512, b"\0") + b"hello"),
    }[case] + END
    src = tmp_path / "in.tar"
    src.write_bytes(data)
    for mode in ("f", "i"):
        p = run_cli("mkfs", f"--tar={mode}", tmp_path / "o.img", src, check=False)
        _one_error(p, "bad")
    p = run_cli("pack", "--type", "tar", src, "-B", tmp_path / "b.boot", "-D",
                tmp_path / "blobs", "--whiteout-spec", "none", check=False)
    _one_error(p, "bad")
    assert sorted(os.listdir(tmp_path)) == ["blobs", "in.tar"]
    if case == "pax-uid-underscore":      # the number written as tar writes it
        src.write_bytes(_pax([(b"uid", b"10")]) + _file() + END)
        run_cli("mkfs", "--tar=f", tmp_path / "o.img", src)


def _mtimes(mnt):
    return {n: os.lstat(os.path.join(mnt, n)).st_mtime_ns for n in sorted(os.listdir(mnt))}


@pytest.mark.parametrize("mode", ["f", "i"])
def test_negative_mtimes_kept_as_mkfs_erofs(root_kernel, tmp_path, mode):
    """Before: mkfs --tar clamped mtimes before 1970 to 0, where mkfs.erofs 1.9.4 and
    our own directory walk keep them (EROFS inodes hold a signed 64-bit mtime). A
    base-256 mtime below -2^63 is clamped to -2^63 (mkfs.erofs's parser wraps it to 0);
    pack (RAFS layers) still clamps to 0 as documented."""
    from helpers import fsck, mounted, require_tool
    data = (_pax([(b"mtime", b"-100.5")]) + _file(b"a")
            + _file(b"b", fields={136: b"\xff" * 12})
            + _hdr("d", 0, b"5", fields={136: b"\xff" * 12})
            + _file(b"c", fields={136: b"\xff" + bytes(11)}) + END)
    src = tmp_path / "in.tar"
    src.write_bytes(data)
    img = tmp_path / "o.img"
    run_cli("mkfs", f"--tar={mode}", img, src)
    dev = [src] if mode == "i" else []
    fsck(img, devices=dev)
    want = {"a": -100_500_000_000, "b": -10**9, "c": -(1 << 63) * 10**9, "d": -10**9}
    with mounted(img, f"device={src}" if mode == "i" else None) as mnt:
        assert _mtimes(mnt) == want
    require_tool("mkfs.erofs")
    theirs = tmp_path / "t.img"
    import subprocess
    subprocess.run(["mkfs.erofs", f"--tar={mode}", str(theirs), str(src)], check=True,
                   capture_output=True)
    with mounted(theirs, f"device={src}" if mode == "i" else None) as mnt:
        got = _mtimes(mnt)
    assert got == {**want, "c": 0}
    boot = tmp_path / "b.boot"
    run_cli("pack", "--type", "tar", src, "-B", boot, "-D", tmp_path / "blobs",
            "--whiteout-spec", "none")
    from erofs_tools.reader.image import Image
    with Image(str(boot)) as im:
        assert {n: im.lookup("/" + n).mtime for n in "abcd"} == dict.fromkeys("abcd", 0)


def test_xattr_names_over_255_bytes_refused(root_kernel, tmp_path):
    """Before: a name of 256 bytes with its prefix (user. + 251) was written (the 251
    after the prefix fit the entry's one-byte length): the kernel lists it, but
    getxattr(2) refuses names over 255 bytes (ERANGE), so no reader gets its value
    (mkfs.erofs 1.9.4 writes it too). 255 bytes are written and read back."""
    from helpers import mounted
    src = tmp_path / "in.tar"
    for n, ok in ((250, True), (251, False)):
        name = b"user." + b"n" * n
        src.write_bytes(_pax([(b"SCHILY.xattr." + name, b"v")]) + _file() + END)
        for mode in ("f", "i"):
            img = tmp_path / "o.img"
            p = run_cli("mkfs", f"--tar={mode}", img, src, check=False)
            if not ok:
                _one_error(p, "xattr name too long (256 bytes")
                assert not img.exists()
                continue
            assert p.returncode == 0, p.stderr
            with mounted(img, f"device={src}" if mode == "i" else None) as mnt:
                assert os.getxattr(os.path.join(mnt, "a"), name.decode()) == b"v"
            img.unlink()
        p = run_cli("pack", "--type", "tar", src, "-B", tmp_path / "b.boot", "-D",
                    tmp_path / "blobs", check=False)
        assert p.returncode == (0 if ok else 1), p.stderr


@pytest.mark.parametrize("mode", ["f", "i"])
def test_sparse_maps_of_empty_regions_cost_bounded_memory(tmp_path, mode):
    """A GNU.sparse.map of 10^6 regions, all empty but the last ('0,0,0,0,...,0,512':
    4 bytes of tar per region, 17 KB of gzip for 5 such entries). Before: mkfs --tar
    kept every entry's map as 10^6 tuples to the end (365 MB for 4 entries, growing
    by ~85 MB per entry); now empty regions are dropped, adjacent ones merged, and
    --tar=f keeps only the expanded copy."""
    import sys

    from bomb_helpers import run_bounded

    from erofs_tools.builder.tar_reader import MAX_SPARSE_REGIONS
    m = b",".join([b"0,0"] * (MAX_SPARSE_REGIONS - 1) + [b"0,512"])
    ents = b""
    for i in range(5):
        ents += _pax([(b"GNU.sparse.size", b"4096"), (b"GNU.sparse.map", m)])
        ents += _file(b"s%d" % i, bytes([65 + i]) * 512)
    src = tmp_path / "in.tar.gz"
    src.write_bytes(gzip.compress(ents + END, 9))
    img = tmp_path / "o.img"
    res = run_bounded([sys.executable, "-m", "erofs_tools", "mkfs", f"--tar={mode}",
                       "--ungzip", str(img), str(src)])
    assert res.returncode == 0, res.stderr
    assert res.maxrss < 200 << 20, f"peak RSS {res.maxrss >> 20} MiB"
    from erofs_tools.reader.image import Image
    if mode == "f":
        with Image(str(img)) as im:
            assert im.read_data(im.lookup("/s4")) == b"E" * 512 + bytes(4096 - 512)


def test_xattrs_no_inode_holds_refused_as_read(tmp_path):
    """An entry with 200,000 xattrs (5 MB of PAX records) first, then a broken tail.
    Before: its xattrs were kept until the whole archive was read (4 bytes of memory
    per byte of them, for every such entry) and refused only when laid out, without
    the entry's name (here the tail's error came first); now the entry is refused
    as it is read, by name."""
    recs = [(b"SCHILY.xattr.user.%x" % i, b"") for i in range(200_000)]
    data = _pax(recs) + _file(b"big") + _file(b"next")[:700]
    src = tmp_path / "in.tar"
    src.write_bytes(data)
    for cmd in (["mkfs", "--tar=f", tmp_path / "o.img", src],
                ["pack", "--type", "tar", src, "-B", tmp_path / "b.boot",
                 "-D", tmp_path / "blobs", "--whiteout-spec", "none"]):
        p = run_cli(*cmd, check=False)
        _one_error(p, "big: xattrs of one inode exceed the inline limit (200000 xattrs)")
    # 300 of 1000 bytes: more than the inline room, but they may be shared: left to
    # the builder (refused there unless shared)
    recs = [(b"SCHILY.xattr.user.%x" % i, b"v" * 1000) for i in range(300)]
    src.write_bytes(_pax(recs) + _file(b"big") + END)
    p = run_cli("mkfs", "--tar=f", tmp_path / "o.img", src, check=False)
    _one_error(p, "xattrs of one inode exceed the inline limit")
    assert "300 xattrs" not in p.stderr.decode()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("cmd", ["mkfs", "pack"])
def test_killed_while_reading_leaves_nothing(tmp_path, sig, cmd):
    """`kill PID` of a run reading a tar from a pipe that stalls. Before: the process
    died at once and left its spool (as large as the tar read so far) or its blob;
    now it ends with one error line, status 128 + the signal, everything temporary
    removed."""
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "out"
    out.mkdir()
    argv = ([sys.executable, "-m", "erofs_tools", "mkfs", "--tar=f", str(out / "o.img"), "-"]
            if cmd == "mkfs" else
            [sys.executable, "-m", "erofs_tools", "pack", "--type", "tar", "-", "-B",
             str(out / "b.boot"), "-D", str(out / "blobs")])
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # (pack holds up to three compressed 1 MiB batches per worker before its first
        # blob write: enough of the file for the blob to hold data first)
        tar = make_tar([E("a", data=os.urandom(16 << 20))])
        p.stdin.write(tar[:12 << 20])         # the pipe then stalls mid-file
        p.stdin.flush()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:   # until the spool / blob holds data
            if any(f.stat().st_size >= 1 << 20 for f in out.rglob("*") if f.is_file()):
                break
            time.sleep(0.1)
        else:
            pytest.fail("nothing spooled")
        p.send_signal(getattr(signal, sig))
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    signum = getattr(signal, sig)
    assert (p.returncode, err.decode()) == (128 + signum, f"error: terminated by {sig}\n")
    left = [f for f in out.rglob("*") if f.is_file()]
    assert left == [], left


def test_outputs_where_no_file_can_be_created(tmp_path):
    """Before: a traceback (FileNotFoundError from creating the temporary file), not
    one error line, for an IMAGE, --ungzip FILE, bootstrap or blob directory where no
    file can be created (/proc, a directory that does not exist)."""
    src = tmp_path / "in.tar"
    src.write_bytes(make_tar([E("a", data=b"x")]))
    src_dir = tmp_path / "tree"
    src_dir.mkdir()
    for args in (["mkfs", "--tar=f", "/proc/o.img", src],
                 ["mkfs", "--tar=f", f"--ungzip={tmp_path}/nodir/d.tar", tmp_path / "o.img",
                  src],
                 ["mkfs", "/proc/o.img", src_dir],
                 ["pack", "--type", "tar", src, "-B", "/proc/b.boot", "-D", tmp_path / "bl"],
                 ["pack", "--type", "tar", src, "-B", tmp_path / "b.boot", "-D", "/proc"]):
        p = run_cli(*args, check=False)
        _one_error(p, "cannot create a file there")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bl", "in.tar", "tree"]


def test_read_errors_of_the_input_are_one_line(tmp_path):
    """Before: an OSError traceback when reading the tar failed (EIO): /proc/self/mem
    as TARFILE (its first read), or a stream failing after its first entry."""
    import errno

    from erofs_tools.builder.tar_source import pack_tar
    from erofs_tools.errors import InputError
    for args in (["--tar=f"], ["--tar=i"], ["--tar=f", "--ungzip"]):
        p = run_cli("mkfs", *args, tmp_path / "o.img", "/proc/self/mem", check=False)
        _one_error(p, "cannot read the tar stream: Input/output error")
    data = make_tar([E("a", data=b"x" * 100), E("b", data=b"y" * 100_000)])

    class Failing:
        pos = 0

        def read(self, n=-1):
            if self.pos >= 2048:
                raise OSError(errno.EIO, "Input/output error")
            n = min(n if n >= 0 else len(data), 2048 - self.pos)
            self.pos += n
            return data[self.pos - n:self.pos]

    with pytest.raises(InputError, match="cannot read the tar stream: Input/output error"):
        pack_tar(Failing(), str(tmp_path / "b.boot"), str(tmp_path / "bl"), source_type="tar")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bl"]
    assert os.listdir(tmp_path / "bl") == []
