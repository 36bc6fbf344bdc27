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


def _two_blob_bootstrap(tmp_path):
    from test_tar_helpers import run_cli
    for i, n in ((1, 300000), (2, 200000)):
        d = tmp_path / f"l{i}"
        d.mkdir()
        (d / f"f{i}").write_bytes(os.urandom(n))
        run_cli("pack", "-q", "-B", tmp_path / f"l{i}.boot", "-D", tmp_path / "blobs",
                "--chunk-size", "64K", d)
    m = tmp_path / "m.boot"
    run_cli("merge", "-q", "-B", m, tmp_path / "l1.boot", tmp_path / "l2.boot")
    return m


def test_merge_refuses_one_blob_id_for_two_blobs(tmp_path):
    """A bootstrap whose blob table names blob 1 with blob 0's id: merge mapped both to
    one entry and wrote (exit 0) a bootstrap whose second file's chunks index the first
    blob (check then called it corrupt)."""
    from test_tar_helpers import run_cli
    m = _two_blob_bootstrap(tmp_path)
    img = Image(str(m))
    a, b = (img.blob_id(1).encode(), img.blob_id(2).encode())
    img.close()
    bad = tmp_path / "dup.boot"
    bad.write_bytes(m.read_bytes().replace(b, a))
    out = tmp_path / "out.boot"
    p = run_cli("merge", "-q", "-B", out, bad, check=False)
    assert p.returncode == 1 and p.stderr.count(b"\n") == 1, p.stderr
    assert b"described differently" in p.stderr
    assert not out.exists()
    # the same blob named by two layers alike is still one blob
    p = run_cli("merge", "-q", "-B", out, m, tmp_path / "l1.boot")
    assert len(Image(str(out)).devices) == 2


def test_prefetch_table_costs_its_size(tmp_path):
    """A 64 MiB prefetch table (legal: its size field is 32 bits) was decoded into a list
    of 16 M ints by every command opening the image: check took 286 MiB and 6 s."""
    import sys

    from bomb_helpers import run_bounded

    from erofs_tools.format import rafs as R
    m = _two_blob_bootstrap(tmp_path)
    d = bytearray(m.read_bytes())
    ext = R.ExtSuperBlock.decode(d, R.EXT_SUPER_OFFSET)
    n = 64 << 20
    ext.s_prefetch_table_offset, ext.s_prefetch_table_size = len(d), n
    d += b"\x80\0\0\0" * (n // 4)
    d[R.EXT_SUPER_OFFSET:R.EXT_SUPER_OFFSET + R.ExtSuperBlock.SIZE] = ext.encode()
    big = tmp_path / "pf.boot"
    big.write_bytes(bytes(d))
    for cmd in (["check", big], ["unpack", big, "--blob-dir", tmp_path / "blobs", "--tar", "/dev/null"]):
        r = run_bounded([sys.executable, "-m", "erofs_tools", *cmd])
        assert r.returncode == 0, r.stderr
        assert r.maxrss < 150 << 20 and r.cpu_seconds < 3, (cmd, r.maxrss, r.cpu_seconds)
    img = Image(str(big))
    assert len(img.prefetch) == n // 4 and img.prefetch[0] == 128


def test_inspect_path_is_linear_in_the_chunk_table(tmp_path):
    """`inspect IMAGE PATH` without blobs scanned the whole chunk-info table for each
    chunk of the file: 10,240 chunks x 20,000 decoy entries took 12 s of CPU."""
    import sys

    from bomb_helpers import run_bounded
    from test_tar_helpers import run_cli

    from erofs_tools.format import rafs as R
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"ab" * (20 << 20))       # 10,240 chunks of one content
    boot = tmp_path / "z.boot"
    run_cli("pack", "-q", "-B", boot, "-D", tmp_path / "blobs", "--chunk-size", "4K", src)
    d = bytearray(boot.read_bytes())
    ext = R.ExtSuperBlock.decode(d, R.EXT_SUPER_OFFSET)
    real = bytes(d[ext.s_chunk_table_offset:][:ext.s_chunk_table_size])
    decoy = bytearray(real)
    decoy[32] = 9                                       # another blob index
    table = bytes(decoy) * 20000 + real
    ext.s_chunk_table_offset, ext.s_chunk_table_size = len(d), len(table)
    d += table + bytes(-len(table) % 4096)
    d[R.EXT_SUPER_OFFSET:R.EXT_SUPER_OFFSET + R.ExtSuperBlock.SIZE] = ext.encode()
    boot.write_bytes(bytes(d))
    r = run_bounded([sys.executable, "-m", "erofs_tools", "inspect", "--json", boot, "/f"],
                    timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.cpu_seconds < 4, r.cpu_seconds
    import json
    chunks = json.loads(r.stdout)["chunks"]
    assert len(chunks) == 10240
    assert chunks[-1]["digest"] == real[:32].hex()
