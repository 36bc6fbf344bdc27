"""Eager mount of RAFS v6 images: the Nydus vector through the kernel, and bad input."""
import hashlib
import os

import pytest
from click.testing import CliRunner
from helpers import NYDUS_VECTORS, fsck, require_root_kernel

from erofs_tools.cli.mount import mount_cmd, umount_cmd
from erofs_tools.errors import CorruptImageError, InputError, MountError
from erofs_tools.mount import mount_rafs, prepare_caches, umount

VEC = str(NYDUS_VECTORS)
VEC_BOOT = os.path.join(VEC, "rafs-v6-2.2.boot")
VEC_ID = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"



def _need_root():
    require_root_kernel()


def _vector_expected():
    """Expected content of the vector from the blob itself (decompressed chunks)."""
    import zstandard
    raw = open(os.path.join(VEC, "blobs", VEC_ID), "rb").read()
    d = zstandard.ZstdDecompressor()
    lib = d.decompress(raw[0:4828], max_output_size=1 << 20)
    sync = d.decompress(raw[4828:7802], max_output_size=1 << 20)
    return {"lib.rs": lib, "sync_io.rs": sync}


@pytest.mark.root
def test_mount_nydus_vector(tmp_path):
    _need_root()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = tmp_path / "cache"
    devs = mount_rafs(VEC_BOOT, str(mnt), os.path.join(VEC, "blobs"), str(cache))
    try:
        assert devs == [str(cache / VEC_ID)]
        names = sorted(os.listdir(mnt))
        assert names == ["lib.rs", "sync_io.rs"]
        exp = _vector_expected()
        for n in names:
            st = os.stat(mnt / n)
            assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o644, 0, 0)
            assert (mnt / n).read_bytes() == exp[n]
        assert os.stat(mnt / "lib.rs").st_size == 16931
        assert os.stat(mnt / "sync_io.rs").st_size == 13400
    finally:
        umount(str(mnt))
    assert os.listdir(mnt) == []
    fsck(VEC_BOOT, extract=False, devices=devs[:1])


@pytest.mark.root
def test_mount_cli_vector(tmp_path):
    _need_root()
    mnt = tmp_path / "m"
    mnt.mkdir()
    runner = CliRunner()
    r = runner.invoke(mount_cmd, [VEC_BOOT, str(mnt), "--blob-dir", os.path.join(VEC, "blobs"),
                                  "--cache-dir", str(tmp_path / "c"), "--json"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    try:
        assert hashlib.sha256((mnt / "lib.rs").read_bytes()).hexdigest() == \
            hashlib.sha256(_vector_expected()["lib.rs"]).hexdigest()
    finally:
        r = runner.invoke(umount_cmd, [str(mnt)])
        assert r.exit_code == 0, repr(r.exception)
    assert os.listdir(mnt) == []


def test_prepare_missing_blob(tmp_path):
    with pytest.raises(InputError, match="not found"):
        prepare_caches(VEC_BOOT, str(tmp_path), str(tmp_path / "cache"))
    assert not os.path.exists(tmp_path / "cache") or os.listdir(tmp_path / "cache") == []


def test_prepare_truncated_blob(tmp_path):
    blobs = tmp_path / "b"
    blobs.mkdir()
    raw = open(os.path.join(VEC, "blobs", VEC_ID), "rb").read()
    (blobs / VEC_ID).write_bytes(raw[:-100])
    with pytest.raises(CorruptImageError):
        prepare_caches(VEC_BOOT, str(blobs), str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == [] if (tmp_path / "cache").exists() else True


def test_bad_bootstrap(tmp_path):
    bad = tmp_path / "boot"
    bad.write_bytes(b"\0" * 8192)
    with pytest.raises(CorruptImageError, match="magic"):
        prepare_caches(str(bad), str(tmp_path), str(tmp_path / "c"))
    bad.write_bytes(b"\0" * 100)
    with pytest.raises(CorruptImageError):
        prepare_caches(str(bad), str(tmp_path), str(tmp_path / "c"))
    with pytest.raises(InputError):
        prepare_caches(str(tmp_path / "none"), str(tmp_path), str(tmp_path / "c"))


def test_mount_point_missing(tmp_path):
    with pytest.raises(MountError, match="not a directory"):
        mount_rafs(VEC_BOOT, str(tmp_path / "nope"), os.path.join(VEC, "blobs"),
                   str(tmp_path / "c"))


@pytest.mark.root
def test_umount_not_mounted(tmp_path):
    _need_root()
    with pytest.raises(MountError, match="umount"):
        umount(str(tmp_path))
