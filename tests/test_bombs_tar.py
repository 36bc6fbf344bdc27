"""Resource bombs in tar layers (issue 19 items 7 and 10), each built in the test and
asserted bounded: peak RSS of the `erofs-tools` process < 200 MB and < 10 s.

- PAX records that pile up: one global header of 10^6 records, then hundreds of
  entries (each used to re-read all of them); stacked 'x' headers before one entry.
- A sparse entry of 16 GiB of hole at 4 KiB chunks (4 M chunk indexes): holes are runs,
  not per-chunk objects.
"""
import gzip
import os
import sys

import pytest
from bomb_helpers import pax_rec, run_bounded
from test_tar_helpers import E, make_tar

from erofs_tools.reader.image import Image

RSS_LIMIT = 200 << 20
TIME_LIMIT = 10.0


def _hdr(name, size=0, typ=b"0"):
    import tarfile
    ti = tarfile.TarInfo(name)
    ti.size, ti.type, ti.mode = size, typ, 0o644
    return ti.tobuf(tarfile.USTAR_FORMAT)


def _pax_block(records, typ=b"x", name="./PaxHeaders/e"):
    return _hdr(name, len(records), typ) + records + bytes(-len(records) % 512)


def _entries(n, prefix="f"):
    out = b""
    for i in range(n):
        out += _hdr(f"{prefix}{i}", 1) + b"x" + bytes(511)
    return out


def _pack(tmp_path, data, *args, gz=True):
    src = tmp_path / ("bomb.tar.gz" if gz else "bomb.tar")
    src.write_bytes(gzip.compress(data, 1) if gz else data)
    blobs = tmp_path / "blobs"
    return run_bounded([sys.executable, "-m", "erofs_tools", "pack", "--type",
                        "targz" if gz else "tar", str(src), "-B", str(tmp_path / "b.boot"),
                        "-D", str(blobs), "--json", *args])


def _bounded(res):
    assert res.maxrss < RSS_LIMIT, f"peak RSS {res.maxrss >> 20} MiB"
    assert res.cpu_seconds < TIME_LIMIT, f"{res.cpu_seconds:.1f} CPU s"


def test_global_header_of_a_million_records_costs_nothing_per_entry(tmp_path):
    """10^6 records of keys the reader honours (uid, an xattr) and of keys it drops
    (comment): later ones replace earlier ones, so one value of each stays in force."""
    recs = b"".join(pax_rec(b"uid", str(i).encode()) for i in range(750_000))
    recs += b"".join(pax_rec(b"SCHILY.xattr.user.k", b"v%d" % i) for i in range(100_000))
    recs += b"".join(pax_rec(b"c", b"%d" % (i % 10)) for i in range(150_000))
    assert len(recs) < 16 << 20
    data = _pax_block(recs, b"g", "./GlobalHead") + _entries(400) + bytes(1024)
    # POSIX reading (mkfs --tar's; an OCI layer's global headers are ignored)
    res = _pack(tmp_path, data, "--whiteout-spec", "none")
    assert res.returncode == 0, res.stderr
    _bounded(res)
    with Image(str(tmp_path / "b.boot")) as img:
        ino = img.lookup("/f399")
        assert ino.uid == 749_999
        assert img.xattrs(ino) == [(b"user.k", b"v99999")]


def test_global_records_in_force_are_capped(tmp_path):
    """10^6 distinct xattr keys in global headers: the extended metadata in force is
    capped (one-line error), not re-applied to every entry."""
    recs = b"".join(pax_rec(b"SCHILY.xattr.user.k%d" % i, b"v") for i in range(100_000))
    data = b""
    for i in range(10):
        data += _pax_block(recs, b"g", f"./GlobalHead{i}") + _entries(2, f"g{i}-")
    res = _pack(tmp_path, data + bytes(1024), "--whiteout-spec", "none")
    _bounded(res)
    assert res.returncode == 1
    err = res.stderr.decode()
    assert err.startswith("error: ") and err.count("\n") == 1 and "over the limit" in err
    assert not (tmp_path / "b.boot").exists()


def test_stacked_x_headers_are_capped(tmp_path):
    """Hundreds of 'x' headers stacked before one entry add up to one limit."""
    one = _pax_block(b"".join(pax_rec(b"comment", b"%0100d" % i) for i in range(9000)))
    data = one * 200 + _entries(1) + bytes(1024)
    res = _pack(tmp_path, data)
    _bounded(res)
    assert res.returncode == 1
    err = res.stderr.decode()
    assert err.count("\n") == 1 and "extended metadata" in err, err


def test_stacked_x_headers_later_key_wins(tmp_path):
    recs = [_pax_block(pax_rec(b"mtime", b"%d" % (1000 + i))) for i in range(50)]
    data = b"".join(recs) + _entries(1) + bytes(1024)
    res = _pack(tmp_path, data, gz=False)
    assert res.returncode == 0, res.stderr
    with Image(str(tmp_path / "b.boot")) as img:
        assert img.lookup("/f0").mtime == 1049


def _sparse_entry(name, realsize, data_at, data):
    """A PAX sparse 1.0 entry: map '1 region' at the start of the data."""
    sp_map = b"1\n%d\n%d\n" % (data_at, len(data))
    sp_map += bytes(-len(sp_map) % 512)
    body = sp_map + data
    pax = (pax_rec(b"GNU.sparse.major", b"1") + pax_rec(b"GNU.sparse.minor", b"0")
           + pax_rec(b"GNU.sparse.name", name.encode())
           + pax_rec(b"GNU.sparse.realsize", str(realsize).encode()))
    return (_pax_block(pax) + _hdr(f"GNUSparseFile.0/{name}", len(body)) + body
            + bytes(-len(body) % 512))


def test_sparse_hole_of_16_gib_at_4k_chunks_is_bounded(tmp_path):
    size = 16 << 30
    tail = b"the end\n"
    data = _sparse_entry("hole", size, size - len(tail), tail) + bytes(1024)
    res = _pack(tmp_path, data, "--chunk-size", "4K", gz=False)
    assert res.returncode == 0, res.stderr
    _bounded(res)
    import json
    r = json.loads(res.stdout)
    assert r["chunks_total"] == size // 4096
    assert r["chunks_new"] == 2                 # one zero chunk, one tail chunk
    with Image(str(tmp_path / "b.boot")) as img:
        ino = img.lookup("/hole")
        assert ino.size == size
    assert os.path.getsize(tmp_path / "b.boot") < 64 << 20


@pytest.mark.root
def test_sparse_hole_image_reads_back(tmp_path):
    """The run-length holes give the same image bytes a chunk-by-chunk build gives:
    the kernel reads zeros in the hole and the tail at the end."""
    from test_tar_helpers import mounted_rafs
    size = 64 << 20
    tail = b"tail!"
    data = _sparse_entry("hole", size, size - len(tail), tail) + bytes(1024)
    res = _pack(tmp_path, data, "--chunk-size", "4K", gz=False)
    assert res.returncode == 0, res.stderr
    with mounted_rafs(str(tmp_path / "b.boot"), str(tmp_path / "blobs")) as mnt:
        with open(os.path.join(mnt, "hole"), "rb") as f:
            f.seek(size // 2)
            assert f.read(8192) == bytes(8192)
            f.seek(size - 4096)
            assert f.read() == bytes(4096 - len(tail)) + tail


def test_plain_layer_still_packs(tmp_path):
    """Sanity: an ordinary layer with PAX headers of every kind goes through."""
    data = make_tar([E("d", "dir"), E("d/f", data=b"abc", xattrs={"user.a": "1"})])
    res = _pack(tmp_path, data, gz=False)
    assert res.returncode == 0, res.stderr


def test_merge_and_check_of_a_16_gib_hole_run_are_bounded(tmp_path):
    """merge keeps a hole run as one object too, and the reader decodes the 4 Mi chunk
    indexes on access (reader.chunkrefs.ChunkList), so check and merge stay small."""
    size = 16 << 30
    data = _sparse_entry("hole", size, size - 4, b"end\n") + bytes(1024)
    res = _pack(tmp_path, data, "--chunk-size", "4K", gz=False)
    assert res.returncode == 0, res.stderr
    res = run_bounded([sys.executable, "-m", "erofs_tools", "check", tmp_path / "b.boot",
                       "--blob-dir", tmp_path / "blobs"])
    assert res.returncode == 0, res.stderr
    assert res.maxrss < RSS_LIMIT, f"check: peak RSS {res.maxrss >> 20} MiB"
    assert res.cpu_seconds < 60, f"check: {res.cpu_seconds:.1f} CPU s"
    res = run_bounded([sys.executable, "-m", "erofs_tools", "merge", tmp_path / "b.boot",
                       "-B", tmp_path / "m.boot"])
    assert res.returncode == 0, res.stderr
    assert res.maxrss < RSS_LIMIT, f"merge: peak RSS {res.maxrss >> 20} MiB"
    assert res.cpu_seconds < 60, f"merge: {res.cpu_seconds:.1f} CPU s"
    with Image(str(tmp_path / "m.boot")) as img:
        assert img.lookup("/hole").size == size


def _deep_paths(n, depth):
    """n entries, each a path of `depth` one-letter directories under its own top
    directory (PAX path records): every component is a new implied directory."""
    out = b""
    for i in range(n):
        path = f"d{i}/" + "a/" * depth + "f"
        out += _pax_block(pax_rec(b"path", path.encode())) + _hdr(f"d{i}/f")
    return out + bytes(1024)


@pytest.mark.parametrize("cmd", ["pack", "mkfs"])
def test_deep_path_bomb_is_bounded(tmp_path, cmd):
    """Implied parent directories are the only nodes no header pays for: 30 entries of
    30,000 `a/` components (a 4 KB gzip) made 900,000 of them, ~700 bytes each (0.6 GB
    peak RSS, 8 s; a few hundred such entries, tens of GB). Their number is bounded by
    the bytes read: a one-line error, nothing written."""
    data = _deep_paths(30, 30_000)
    src = tmp_path / "bomb.tar.gz"
    src.write_bytes(gzip.compress(data, 6))
    if cmd == "pack":
        res = _pack(tmp_path, data)
        outputs = [tmp_path / "b.boot"]
    else:
        outputs = [tmp_path / "bomb.img"]
        res = run_bounded([sys.executable, "-m", "erofs_tools", "mkfs", "--tar=f",
                           "--ungzip", str(outputs[0]), str(src)])
    _bounded(res)
    assert res.returncode == 1
    err = res.stderr.decode()
    assert err.count("\n") == 1 and "implied directories" in err, err
    assert not any(p.exists() for p in outputs)
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["bomb.tar.gz"] + (["blobs"] if cmd == "pack" else []))


def test_deep_paths_within_the_bound_pack(tmp_path):
    """One 64 KiB path of one-letter components (32,767 implied directories) and 20,000
    header-only entries with four implied parents each stay accepted."""
    data = _deep_paths(1, 32_766)[:-1024]
    data += b"".join(_hdr(f"t{i}/u/v/w/f{i}") for i in range(20_000)) + bytes(1024)
    res = _pack(tmp_path, data)
    assert res.returncode == 0, res.stderr
    with Image(str(tmp_path / "b.boot")) as img:
        assert img.lookup("/t19999/u/v/w/f19999").is_reg()
        # (the reader's lookup stops at 4096 components: the deep one by its length)
        assert img.lookup("/d0/" + "a/" * 4000).is_dir()
