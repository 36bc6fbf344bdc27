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


def _deep_tree_with_links(root, depth, files, links_each):
    """FILES files at the bottom of a chain of DEPTH directories 'd', each with
    LINKS_EACH more links at the top (named h*, after 'd': extracted after the chain)."""
    os.mkdir(root)
    top = os.open(root, os.O_RDONLY)
    fd = os.dup(top)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        n = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = n
    for i in range(files):
        w = os.open(f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(w, b"x")
        os.close(w)
        for k in range(links_each):
            os.link(f"f{i}", f"h{i}.{k}", src_dir_fd=fd, dst_dir_fd=top)
    os.close(fd)
    os.close(top)


def _mkfs(src, img):
    from test_tar_helpers import run_cli
    run_cli("mkfs", img, src)
    return img


def test_hardlinks_to_a_deep_file_cost_one_link_each(tmp_path):
    """A file 2,000 directories down and 2,000 links to it at the top: each link walked
    the 2,000 directories again (4 M opens, ~17 s; 5,000 links: 43 s from 344 KB)."""
    import time

    from erofs_tools.reader.unpack import remove_tree, unpack_to_dir
    try:
        _deep_tree_with_links(tmp_path / "src", 2000, 1, 2000)
        img = Image(str(_mkfs(tmp_path / "src", tmp_path / "deep.img")))
        t0 = time.process_time()
        unpack_to_dir(img, tmp_path / "out")
        assert time.process_time() - t0 < 5
        assert os.stat(tmp_path / "out" / "h0.1999").st_nlink == 2001
        assert [x for x in os.listdir(tmp_path) if x.startswith(".")] == []
    finally:        # (pytest's own clean-up recurses per level)
        remove_tree(str(tmp_path / "src"))
        remove_tree(str(tmp_path / "out"))


def test_hardlinks_nlink_does_not_announce_are_bounded(tmp_path):
    """The same with 1,200 files whose nlink says 1: each first link is reached by its
    path once (then staged); past a budget of lookups, a clean error."""
    from erofs_tools.format import erofs as E
    from erofs_tools.reader.unpack import remove_tree, unpack_to_dir
    try:
        _liars(tmp_path, E, unpack_to_dir, remove_tree)
    finally:
        for d in ("src", "out", "out2"):
            remove_tree(str(tmp_path / d))


def _liars(tmp_path, E, unpack_to_dir, remove_tree):
    _deep_tree_with_links(tmp_path / "src", 1000, 1200, 2)
    data = bytearray(_mkfs(tmp_path / "src", tmp_path / "deep.img").read_bytes())
    img = Image(bytes(data))
    import struct

    def nlink_at(rec):
        names = [n for n, _ in rec.FIELDS]
        i = names.index("i_nlink")
        return struct.calcsize("<" + "".join(f for _, f in rec.FIELDS[:i])), \
            struct.calcsize("<" + rec.FIELDS[i][1])
    for _p, _d, ino in img.walk():
        if ino.is_reg():
            rec = E.ExtendedInode if ino.version == E.INODE_EXTENDED else E.CompactInode
            off, size = nlink_at(rec)
            data[ino.offset + off:ino.offset + off + size] = (1).to_bytes(size, "little")
    liar = Image(fix_checksum(bytes(data)))
    with pytest.raises(ErofsToolsError, match="nlink does not announce"):
        unpack_to_dir(liar, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["deep.img", "src"]
    # announced links of files that deep are staged: 2 more links of each of 3 files
    remove_tree(str(tmp_path / "src"))
    _deep_tree_with_links(tmp_path / "src", 1000, 3, 2)
    unpack_to_dir(Image(str(_mkfs(tmp_path / "src", tmp_path / "small.img"))),
                  tmp_path / "out2")
    assert os.stat(tmp_path / "out2" / "h2.1").st_nlink == 3


def _chunk_bomb(tmp_path):
    """An image of ~1 MiB whose one file, 256 MiB at 1 MiB chunks, is 1 MiB of data and
    255 holes; every hole index is then pointed at the data: 256 MiB of output."""
    import subprocess

    from test_reader_hostile import require_tool
    require_tool("mkfs.erofs")
    src = tmp_path / "bsrc"
    src.mkdir()
    with open(src / "f", "wb") as f:
        f.write(os.urandom(1 << 20))
        f.truncate(256 << 20)
    plain = tmp_path / "chunked.img"
    subprocess.run(["mkfs.erofs", "--quiet", "-T0", "--chunksize=1048576", str(plain),
                    str(src)], check=True, capture_output=True)
    data = bytearray(plain.read_bytes())
    img = Image(bytes(data))
    ino = img.lookup("/f")
    refs = list(img.chunks(ino))
    assert len(refs) == 256 and not refs[0].hole and all(c.hole for c in refs[1:])
    start = -(-ino.data_end // 4) * 4          # 4-byte block-map indexes (mkfs.erofs)
    first = bytes(data[start:start + 4])
    assert int.from_bytes(first, "little") == refs[0].blkaddr
    for k in range(1, 256):
        data[start + 4 * k:start + 4 * k + 4] = first
    bomb = tmp_path / "bomb.img"
    bomb.write_bytes(fix_checksum(bytes(data)))
    assert not any(c.hole for c in Image(str(bomb)).chunks(ino))
    return bomb


def test_unpack_output_is_bounded(tmp_path):
    """unpack had no bound on the data it writes: a 1 MiB image wrote 256 MiB (one with
    1 MiB of indexes and 1 MiB chunks: 256 GiB). --max-size (default 1 TiB) bounds it."""
    bomb = _chunk_bomb(tmp_path)
    for how in (["-o", tmp_path / "out"], ["--tar", tmp_path / "out.tar"]):
        r = _cli("unpack", bomb, "--max-size", "16M", *how)
        assert r.returncode == 1 and r.stderr.count(b"\n") == 1, r.stderr
        assert b"limit of 16777216 bytes" in r.stderr
        assert sorted(os.listdir(tmp_path)) == ["bomb.img", "bsrc", "chunked.img"]
    r = _cli("unpack", bomb, "--max-size", "300M", "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(tmp_path / "out" / "f") == 256 << 20


def test_inspect_text_escapes_control_characters(base, tmp_path):  # noqa: F811
    """A name holding a newline printed a fake tree line (and ESC, a terminal's escape
    sequence) in inspect's text output; now \\xNN, as in error messages."""
    for new, shown in ((b"q\n", b"q\\x0a"), (b"\x1b7", b"\\x1b7")):
        data = fix_checksum(replace_name(base["plain"], b"q7", new))
        p = tmp_path / "img"
        p.write_bytes(data)
        r = _cli("inspect", p)
        assert r.returncode == 0, r.stderr
        tree = r.stdout.split(b"tree:\n", 1)[1]
        entries = len(list(Image(data).walk()))
        assert tree.count(b"\n") == entries and b"\x1b" not in tree, tree
        assert b" /" + shown + b"\n" in tree
        r = _cli("inspect", p, "/")
        assert r.returncode == 0 and b"name=" + shown + b" " in r.stdout, r.stdout


def test_blob_ids_with_control_characters_stay_on_their_line(tmp_path):
    """A blob table whose id holds a newline: check printed a second, fake 'error:' line,
    stat and inspect fake lines; now \\xNN everywhere it is shown."""
    from test_tar_helpers import run_cli
    m = _two_blob_bootstrap(tmp_path)
    img = Image(str(m))
    old = img.blob_id(2).encode()
    img.close()
    new = (old[:8] + b"\nerror: fake" + old[20:])[:64]
    bad = tmp_path / "nl.boot"
    bad.write_bytes(m.read_bytes().replace(old, new))
    for cmd in (["check", bad, "--blob-dir", tmp_path / "blobs"], ["stat", bad],
                ["inspect", bad], ["unpack", bad, "--blob-dir", tmp_path / "blobs", "-o",
                                    tmp_path / "out"]):
        p = run_cli(*cmd, check=False)
        out = p.stdout + p.stderr
        assert b"\nerror: fake" not in out, (cmd, out)
        if cmd[0] in ("check", "unpack"):
            assert p.returncode == 1
    assert b"\\x0aerror: fake" in run_cli("inspect", bad).stdout
