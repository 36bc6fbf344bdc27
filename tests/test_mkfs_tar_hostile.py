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
