"""The reader, check, unpack and stat on the Nydus test vector, against the kernel."""
import io
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
from helpers import NYDUS_VECTORS as NYDUS
from helpers import compare_trees, fsck, mounted, require_root_kernel

from erofs_tools.errors import ErofsToolsError
from erofs_tools.reader.blob import file_reader, open_blob, read_chunk
from erofs_tools.reader.data import BlobSource
from erofs_tools.reader.fsck import check_image
from erofs_tools.reader.image import Image, open_image
from erofs_tools.reader.stats import image_stats, multi_stats

BLOB_ID = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
BOOT = NYDUS / "rafs-v6-2.2.boot"
BLOB_DIR = NYDUS / "blobs"
BLOB = BLOB_DIR / BLOB_ID


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "erofs_tools", *map(str, args)],
                          capture_output=True, input=stdin)


def make_cache(blob_path, out):
    """The uncompressed, block-aligned view of a blob (what the kernel reads)."""
    m = open_blob(blob_path)
    with open(blob_path, "rb") as f, open(out, "wb") as o:
        ra = file_reader(f)
        o.truncate(m.uncompressed_size)
        for c in m.chunks:
            o.seek(c.uncompressed_offset)
            o.write(read_chunk(m, c, ra))
    return out


@pytest.fixture
def cache(tmp_path):
    return make_cache(BLOB, tmp_path / "cache")


def test_reader_sees_the_vector():
    img = open_image(BOOT, blob_dir=BLOB_DIR)
    entries = {p: ino for p, _d, ino in img.walk()}
    assert sorted(entries) == [b"/", b"/lib.rs", b"/sync_io.rs"]
    assert entries[b"/lib.rs"].size == 16931 and entries[b"/sync_io.rs"].size == 13400
    for p in (b"/lib.rs", b"/sync_io.rs"):
        ino = img.lookup(p)
        assert ino.nid == entries[p].nid
        assert oct(ino.mode) == "0o100644" and (ino.uid, ino.gid) == (0, 0)
        data = img.read_data(ino)
        assert data.startswith(b"// Copyright (C) 2020 Alibaba Cloud")
    assert img.is_rafs and len(img.blob_entries) == 1 and len(img.chunk_infos) == 2
    with pytest.raises(ErofsToolsError):
        img.lookup("/nope")


def test_unpack_matches_kernel_view(tmp_path, cache):
    require_root_kernel()
    out_blob = tmp_path / "from-blob"
    out_cache = tmp_path / "from-cache"
    p = run_cli("unpack", BOOT, "--blob-dir", BLOB_DIR, "-o", out_blob)
    assert p.returncode == 0, p.stderr
    p = run_cli("unpack", BOOT, "--device", cache, "-o", out_cache)
    assert p.returncode == 0, p.stderr
    with mounted(BOOT, f"device={cache}") as mnt:
        assert sorted(os.listdir(mnt)) == ["lib.rs", "sync_io.rs"]
        assert compare_trees(mnt, out_blob) == []
        assert compare_trees(mnt, out_cache) == []
    # fsck.erofs agrees the image + cache is sound
    fsck(BOOT, devices=[cache])


def test_check_passes_and_stat(tmp_path, cache):
    p = run_cli("check", BOOT, "--blob-dir", BLOB_DIR)
    assert p.returncode == 0 and b"clean" in p.stdout, p.stdout + p.stderr
    p = run_cli("check", BOOT)
    assert p.returncode == 0, p.stdout + p.stderr
    p = run_cli("check", BOOT, "--device", cache)
    assert p.returncode == 0, p.stdout + p.stderr
    p = run_cli("inspect", BOOT, "--json")
    assert p.returncode == 0 and BLOB_ID.encode() in p.stdout
    p = run_cli("inspect", BOOT, "/lib.rs", "--blob-dir", BLOB_DIR)
    assert p.returncode == 0 and b"compressed': [0, 4828]" in p.stdout, p.stdout


def test_stat_agrees_with_stored_bytes():
    img = open_image(BOOT, blob_dir=BLOB_DIR)
    d, digests = image_stats(img)
    data = BLOB.read_bytes()
    meta = open_blob(BLOB)
    data_end = meta.chunks[-1].compressed_offset + meta.chunks[-1].compressed_size
    # the blob's chunk data region (before its image.blob tar header) is exactly the
    # compressed bytes stat reports
    assert data[data_end:data_end + 10] == b"image.blob"
    assert d["bytes_after_compression"] == data_end == 7802
    assert d["bytes_after_dedup"] == 16931 + 13400 == d["bytes_logical"]
    assert d["bytes_chunk_blocks"] == meta.uncompressed_size == 36864
    assert d["files"] == 2 and d["chunks"] == 2 and d["unique_chunks"] == 2
    # the same image twice: every chunk shared, dedup across images halves the bytes
    img2 = Image(BOOT)
    tot = multi_stats([img, img2])["total"]
    assert tot["shared_chunks"] == 2 and tot["unique_chunks"] == 2
    assert tot["bytes_after_dedup_across_images"] == 30331
    assert tot["bytes_logical"] == 2 * 30331


def _flipped_dir(tmp_path, off, xor=0xFF):
    d = tmp_path / f"b{off}"
    d.mkdir()
    data = bytearray(BLOB.read_bytes())
    data[off] ^= xor
    (d / BLOB_ID).write_bytes(bytes(data))
    return d


def test_every_chunk_byte_flip_fails_check(tmp_path):
    """Inverting any single byte of the chunk data fails check on that chunk (the
    problem names the file and the chunk); a handful of zstd bytes whose inversion
    leaves the decoded chunk identical fail the blob-id check instead."""
    meta = open_blob(BLOB)
    base = bytearray(BLOB.read_bytes())
    d = tmp_path / "blobs"
    d.mkdir()
    target = d / BLOB_ID
    img = Image(BOOT)
    only_id = []
    n = 0
    for c in meta.chunks:
        for off in range(c.compressed_offset, c.compressed_offset + c.compressed_size):
            data = bytearray(base)
            data[off] ^= 0xFF
            target.write_bytes(data)
            src = BlobSource(img, blob_dir=d)
            probs = [str(p) for p in check_image(img, src)]
            src.close()
            assert probs, f"flip at {off} not detected"
            if any(f"chunk {c.index}" in p for p in probs):
                assert any(p.startswith(("/lib.rs", "/sync_io.rs")) for p in probs)
            else:
                assert any("blob id" in p for p in probs), probs
                only_id.append(off)
            n += 1
    assert n == 7802
    assert len(only_id) <= 2, only_id


def test_cli_check_flip_exit_status(tmp_path):
    d = _flipped_dir(tmp_path, 5000)       # inside chunk 1 (sync_io.rs)
    p = run_cli("check", BOOT, "--blob-dir", d)
    assert p.returncode == 1
    assert b"/sync_io.rs: chunk 0: uses corrupt blob chunk 1" in p.stdout, p.stdout
    assert b"chunk 1: digest mismatch" in p.stdout
    # unpack refuses the corrupt data and leaves nothing behind
    out = tmp_path / "out"
    p = run_cli("unpack", BOOT, "--blob-dir", d, "-o", out)
    assert p.returncode == 1 and p.stderr.startswith(b"error: ")
    assert p.stderr.count(b"\n") == 1
    assert not out.exists()
    assert not [x for x in os.listdir(tmp_path) if x.startswith(".out.unpack")]


def test_truncated_blob_is_clean_error(tmp_path):
    data = BLOB.read_bytes()
    for cut in (0, 100, 7802, 8400, 13000, len(data) - 1):
        d = tmp_path / f"t{cut}"
        d.mkdir()
        (d / BLOB_ID).write_bytes(data[:cut])
        p = run_cli("check", BOOT, "--blob-dir", d)
        assert p.returncode == 1, (cut, p.stdout, p.stderr)
        assert b"Traceback" not in p.stderr


def test_tar_output(tmp_path):
    p = run_cli("unpack", BOOT, "--blob-dir", BLOB_DIR, "--tar", "-")
    assert p.returncode == 0, p.stderr
    with tarfile.open(fileobj=io.BytesIO(p.stdout)) as tf:
        names = tf.getnames()
        assert names == [".", "lib.rs", "sync_io.rs"]
        m = tf.getmember("lib.rs")
        assert m.size == 16931 and m.mode == 0o644
        assert m.pax_headers["mtime"] == "1676819553.628661334"
        img = open_image(BOOT, blob_dir=BLOB_DIR)
        assert tf.extractfile(m).read() == img.read_data(img.lookup("/lib.rs"))


def test_inline_meta_blob(tmp_path):
    """The toc/ vector: a blob with its bootstrap inside; extract it and read through it."""
    from erofs_tools.format import rafs
    from erofs_tools.reader.blob import read_toc, read_toc_section
    toc_blob = NYDUS / "toc" / "2fa78cad554b75ac91a4a125ed148d0ddeb25efa4aaa8bd80e5dc292690a4dca"
    data = toc_blob.read_bytes()
    toc = read_toc(file_reader(open(toc_blob, "rb")), len(data))
    boot = read_toc_section(file_reader(open(toc_blob, "rb")), len(data), toc,
                            rafs.TOC_NAME_BOOTSTRAP)
    img = Image(boot)
    tag = img.blob_id(1)
    d = tmp_path / "blobs"
    d.mkdir()
    shutil.copy(toc_blob, d / tag)
    img.blobs = BlobSource(img, blob_dir=d)
    files = {}
    for p, _de, ino in img.walk():
        if ino.is_reg():
            files[p] = img.read_data(ino)
    assert files and sum(map(len, files.values())) > 0
    probs = [str(p) for p in check_image(img, img.blobs)]
    # the embedded bootstrap carries a placeholder blob id, so only the id check fails
    assert all("blob id" in p for p in probs), probs


def test_cli_on_blob_with_inline_bootstrap(tmp_path):
    """inspect/check/unpack accept a Nydus blob that carries its own bootstrap."""
    toc_blob = NYDUS / "toc" / "2fa78cad554b75ac91a4a125ed148d0ddeb25efa4aaa8bd80e5dc292690a4dca"
    p = run_cli("check", toc_blob)
    assert p.returncode == 0 and b"clean" in p.stdout, p.stdout + p.stderr
    p = run_cli("unpack", toc_blob, "-o", tmp_path / "out")
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["error.rs", "lib.rs", "logger.rs"]
    p = run_cli("inspect", BLOB, "--json")
    assert p.returncode == 0
    import json
    d = json.loads(p.stdout)
    assert d["blob_id"] == BLOB_ID and len(d["chunks"]) == 2
    # a changed byte in the blob's own bootstrap section fails its TOC digest
    data = bytearray(toc_blob.read_bytes())
    data[8100] ^= 0xFF
    bad = tmp_path / toc_blob.name
    bad.write_bytes(bytes(data))
    p = run_cli("check", bad)
    assert p.returncode == 1 and p.stderr.startswith(b"error: "), p.stdout + p.stderr
