"""`erofs-tools merge`: layer bootstraps flattened with overlayfs semantics, checked
against an independent extraction of the layer tars (GNU tar -x per layer, OCI
whiteouts applied by hand)."""
import json
import os

import pytest
from helpers import NYDUS_VECTORS, compare_trees
from test_tar_helpers import (
    E,
    layer_paths,
    mounted_rafs,
    pack_tar,
    reference_rootfs,
    run_cli,
    sample_layers,
)

from erofs_tools.builder.chunk_dict import BootstrapTables
from erofs_tools.reader.image import Image


def _pack_layers(tmp_path, tars, *args):
    boots = []
    for i, t in enumerate(tars):
        b = str(tmp_path / f"layer{i}.boot")
        pack_tar(t, b, tmp_path / "blobs", *args)
        boots.append(b)
    return boots


def _merge(tmp_path, boots, *args, name="merged.boot"):
    out = str(tmp_path / name)
    p = run_cli("merge", *boots, "-B", out, "--json", *args)
    return out, json.loads(p.stdout)


def _assert_same(ref, mnt):
    diffs = compare_trees(ref, mnt, check_nlink=True)
    assert not diffs, "\n".join(diffs)


@pytest.mark.root
def test_merged_image_matches_independent_extraction(tmp_path):
    tars = layer_paths(tmp_path, sample_layers())
    boots = _pack_layers(tmp_path, tars)
    merged, info = _merge(tmp_path, boots)
    ref = reference_rootfs(tars, str(tmp_path / "ref"))
    with mounted_rafs(merged, tmp_path / "blobs") as mnt:
        _assert_same(ref, mnt)
        # whiteouts and the opaque marker are applied, never shown
        assert not os.path.exists(os.path.join(mnt, "etc/gone.conf"))
        assert os.listdir(os.path.join(mnt, "opt/app")) == ["new"]
        assert "trusted.overlay.opaque" not in os.listxattr(os.path.join(mnt, "opt/app"))
        assert os.lstat(os.path.join(mnt, "etc/new")).st_nlink == 2
        assert os.lstat(os.path.join(mnt, "var/lib/data.bin")).st_nlink == 1


def test_blob_table_is_the_union_with_remapped_devices(tmp_path):
    tars = layer_paths(tmp_path, sample_layers())
    boots = _pack_layers(tmp_path, tars)
    merged, info = _merge(tmp_path, boots)
    layer_ids = [BootstrapTables.read(b).blobs[0].blob_id for b in boots]
    t = BootstrapTables.read(merged)
    assert [b.blob_id for b in t.blobs] == layer_ids
    with Image(merged) as img:
        # a file of layer 1, one of layer 2 and one of layer 3: devices 1, 2, 3
        for path, dev in (("/var/lib/data.bin", 1), ("/opt/app/new", 2), ("/usr/lib/x.so", 3)):
            ino = img.lookup(path)
            assert {c.device for c in img.chunks(ino, chunk_bits=20)} == {dev}, path


def test_every_layer_blob_is_kept_even_if_fully_whited_out(tmp_path):
    l1 = [E("a", data=b"only file of layer 1")]
    l2 = [E(".wh.a"), E("b", data=b"b")]
    tars = layer_paths(tmp_path, [l1, l2])
    boots = _pack_layers(tmp_path, tars)
    merged, info = _merge(tmp_path, boots)
    assert len(BootstrapTables.read(merged).blobs) == 2
    with Image(merged) as img:
        assert [d.name for d in img.listdir(img.inode(img.root_nid))] == [b"b"]


@pytest.mark.root
def test_merge_with_oci_names(tmp_path):
    """Layers packed with --whiteout-spec none keep .wh. files; merge --whiteout-spec
    oci applies them."""
    tars = layer_paths(tmp_path, sample_layers())
    boots = _pack_layers(tmp_path, tars, "--whiteout-spec", "none")
    merged, _ = _merge(tmp_path, boots, "--whiteout-spec", "oci")
    ref = reference_rootfs(tars, str(tmp_path / "ref"), keep_trusted=True)
    with mounted_rafs(merged, tmp_path / "blobs") as mnt:
        _assert_same(ref, mnt)


@pytest.mark.root
def test_single_layer_merge_is_identity(tmp_path):
    tars = layer_paths(tmp_path, sample_layers()[:1])
    boots = _pack_layers(tmp_path, tars)
    merged, _ = _merge(tmp_path, boots)
    with mounted_rafs(boots[0], tmp_path / "blobs") as a, \
            mounted_rafs(merged, tmp_path / "blobs") as b:
        _assert_same(a, b)


def test_blob_id_rename(tmp_path):
    tars = layer_paths(tmp_path, sample_layers()[:1])
    boots = _pack_layers(tmp_path, tars)
    old = BootstrapTables.read(boots[0]).blobs[0].blob_id
    merged, _ = _merge(tmp_path, boots, "--blob-id", f"{old}={'ab' * 32}")
    t = BootstrapTables.read(merged)
    assert t.blobs[0].blob_id == "ab" * 32
    assert t.devices[0].tag.rstrip(b"\0") == b"ab" * 32


def test_merge_errors(tmp_path):
    tars = layer_paths(tmp_path, [[E("a", data=b"x" * 10000)], [E("b", data=b"y" * 10000)]])
    b1 = str(tmp_path / "1.boot")
    b2 = str(tmp_path / "2.boot")
    pack_tar(tars[0], b1, tmp_path / "blobs")
    pack_tar(tars[1], b2, tmp_path / "blobs", "--chunk-size", "4096")
    p = run_cli("merge", b1, b2, "-B", tmp_path / "m.boot", check=False)
    assert p.returncode == 1 and b"chunk size" in p.stderr
    p = run_cli("merge", b1, "-B", b1, check=False)
    assert p.returncode == 1 and b"overwrite" in p.stderr
    (tmp_path / "junk").write_bytes(b"\0" * 8192)
    p = run_cli("merge", str(tmp_path / "junk"), "-B", tmp_path / "m.boot", check=False)
    assert p.returncode == 1 and p.stderr.startswith(b"error: ")
    assert not (tmp_path / "m.boot").exists()


@pytest.mark.root
def test_many_layers_replace_and_delete(tmp_path):
    """Ten layers rewriting the same paths: the merged view is the last writer's."""
    layers = []
    for i in range(10):
        ents = [E("d", "dir", mtime=1000 + i), E(f"d/f{i}", data=f"{i}".encode() * 100),
                E("shared", data=f"layer {i}".encode())]
        if i:
            ents.append(E(f"d/.wh.f{i - 1}"))
        if i == 5:
            ents.append(E("d/.wh..wh..opq"))
        layers.append(ents)
    tars = layer_paths(tmp_path, layers)
    boots = _pack_layers(tmp_path, tars)
    merged, _ = _merge(tmp_path, boots)
    ref = reference_rootfs(tars, str(tmp_path / "ref"))
    with mounted_rafs(merged, tmp_path / "blobs") as mnt:
        _assert_same(ref, mnt)
        assert os.listdir(os.path.join(mnt, "d")) == ["f9"]
        with open(os.path.join(mnt, "shared"), "rb") as f:
            assert f.read() == b"layer 9"



@pytest.mark.root
def test_merge_nydus_built_bootstrap_with_ours(tmp_path):
    """The Nydus test vector (nydus-image 2.2) as the lower layer, one of ours on top."""
    vec = str(NYDUS_VECTORS / "rafs-v6-2.2.boot")
    vblobs = str(NYDUS_VECTORS / "blobs")
    t = BootstrapTables.read(vec)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for b in t.blobs:
        os.symlink(os.path.join(vblobs, b.blob_id), blobs / b.blob_id)
    with mounted_rafs(vec, blobs) as mnt:
        names = sorted(os.listdir(mnt))
    assert names
    upper = [E(".wh." + names[0]), E("added", data=b"new file")]
    (tar,) = layer_paths(tmp_path, [upper])
    pack_tar(tar, tmp_path / "up.boot", blobs, "--digester", t.digester,
             "--chunk-size", str(t.ext.s_chunk_size))
    merged, _ = _merge(tmp_path, [vec, str(tmp_path / "up.boot")])
    with mounted_rafs(merged, blobs) as mnt:
        assert sorted(os.listdir(mnt)) == sorted(names[1:] + ["added"])
    p = run_cli("check", merged, "--blob-dir", blobs)
    assert b"clean" in p.stdout
