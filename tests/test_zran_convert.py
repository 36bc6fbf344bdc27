"""`convert --oci-ref`: gzip OCI images indexed where they are (zran, docs/zran.md).

Source images are built from real layer tars (whiteouts, opaque dirs, hardlinks,
xattrs, a file spanning many access points, empty files at layer boundaries), indexed
into an `oci:` layout or through the real docker-registry, then read back with `unpack`
and `check`: every file equals the layers extracted in order by GNU tar, the source
manifest and layers are unchanged, and a flipped byte in a gzip layer is an error for the
files it covers, never wrong bytes."""
import errno
import hashlib
import json
import os
import random

import pytest
from helpers import assert_same_tree, vocab_text
from registry_fixtures import registry  # noqa: F401
from test_tar_helpers import (
    E,
    layer_paths,
    make_oci_layout,
    reference_rootfs,
    run_cli,
    sample_layers,
)

from erofs_tools.errors import ErofsToolsError
from erofs_tools.reader.image import open_image

SPAN = "64K"


def _text(n, seed):
    return vocab_text(n, seed, 500)


def zran_layers():
    l1, l2, l3 = sample_layers()
    l1 = l1 + [E("spans", data=_text(3_000_000, 1)),
                E("z-small", data=b"tail file\n"), E("z-empty-last", data=b"")]
    l2 = [E("a-empty-first", data=b"")] + l2 + [E("docs", "dir"),
                                                E("docs/small.txt", data=b"small file\n")]
    l3 = l3 + [E("rnd.bin", data=random.Random(3).randbytes(700_000))]
    return [l1, l2, l3]


def _layout(tmp_path, layers=None):
    tars = layer_paths(tmp_path, layers or zran_layers())
    lay, m = make_oci_layout(str(tmp_path / "src"), tars)
    return tars, lay, m


def _tree_hash(path):
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f)
            h.update(p.encode() + open(p, "rb").read())
    return h.hexdigest()


def _convert(src, dst, out, *args):
    p = run_cli("convert", "--oci-ref", src, dst, "--zran-span", SPAN, "-o", out, "--json",
                *args)
    return json.loads(p.stdout)


def _blob_dir(out, lay, m):
    """The index's output directory plus the source's gzip layers, named by digest."""
    for d in m.layers():
        dst = os.path.join(out, d.digest.split(":")[1])
        if not os.path.exists(dst):
            os.symlink(lay.blob_path(d.digest), dst)
    return out


def test_convert_oci_layout_unpack_equals_layers(tmp_path):
    tars, lay, m = _layout(tmp_path)
    before = _tree_hash(tmp_path / "src")
    out = str(tmp_path / "out")
    r = _convert(f"oci:{tmp_path / 'src'}:v1", f"oci:{tmp_path / 'dst'}:z", out,
                 "--chunk-size", "0x10000")
    assert _tree_hash(tmp_path / "src") == before          # SRC untouched
    assert [x["digest"] for x in r["layers"]] == [d.digest for d in m.layers()]
    assert r["layers"][0]["contexts"] > 10                 # the big file spans points
    bd = _blob_dir(out, lay, m)
    c = run_cli("check", os.path.join(out, "image.boot"), "--blob-dir", bd, check=False)
    assert c.returncode == 0, c.stdout + c.stderr
    run_cli("unpack", os.path.join(out, "image.boot"), "--blob-dir", bd, "-o",
            str(tmp_path / "up"))
    ref = reference_rootfs(tars, str(tmp_path / "ref"))
    assert_same_tree(ref, str(tmp_path / "up"), check_nlink=True)
    # DST: the original layers by digest, then the bootstrap layer
    from erofs_tools.registry import OciLayout
    dl = OciLayout(str(tmp_path / "dst"))
    dm = dl.get_manifest(dl.resolve("z").digest)
    n = len(m.layers())
    assert [d.digest for d in dm.layers()[:n]] == [d.digest for d in m.layers()]
    assert [d.digest.split(":")[1] for d in dm.layers()[n:-1]] == \
        [x["meta_blob"] for x in r["layers"]]
    for d in m.layers():
        assert open(dl.blob_path(d.digest), "rb").read() == \
            open(lay.blob_path(d.digest), "rb").read()
    boot = dm.layers()[-1]
    assert boot.size == r["bootstrap_layer_size"]
    total = sum(d.size for d in m.layers())
    assert r["meta_bytes"] < total


def test_flipped_byte_is_an_error_never_wrong_bytes(tmp_path):
    tars, lay, m = _layout(tmp_path)
    out = str(tmp_path / "out")
    _convert(f"oci:{tmp_path / 'src'}:v1", f"oci:{tmp_path / 'dst'}:z", out)
    d0 = m.layers()[0]
    bad = os.path.join(out, d0.digest.split(":")[1])
    data = bytearray(open(lay.blob_path(d0.digest), "rb").read())
    data[len(data) // 2] ^= 0x40                    # inside the big file's deflate data
    open(bad, "wb").write(bytes(data))
    bd = _blob_dir(out, lay, m)
    c = run_cli("check", os.path.join(out, "image.boot"), "--blob-dir", bd, check=False)
    assert c.returncode == 1
    p = run_cli("unpack", os.path.join(out, "image.boot"), "--blob-dir", bd, "-o",
                str(tmp_path / "up"), check=False)
    assert p.returncode == 1 and p.stderr.startswith(b"error: ") \
        and p.stderr.count(b"\n") == 1, p.stderr
    # file by file: the ones whose chunks the flip covers fail, every other one reads
    # back right; none reads back wrong
    ref = reference_rootfs(tars, str(tmp_path / "ref"))
    failed = good = 0
    with open_image(os.path.join(out, "image.boot"), bd) as img:
        for rel in _regular_files(ref):
            want = open(os.path.join(ref, rel), "rb").read()
            try:
                got = img.read_data(img.lookup("/" + rel))
            except ErofsToolsError:
                failed += 1
                continue
            assert got == want, rel
            good += 1
    assert failed >= 1 and good >= 5, (failed, good)


def _regular_files(root):
    for d, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            if os.path.isfile(p) and not os.path.islink(p):
                yield os.path.relpath(p, root)


def reads_right_or_eio(ref, mnt):
    """Every regular file of ref read under mnt: (how many failed with EIO, how many read
    back identical); any other error, or one wrong byte, fails the test."""
    eio = good = 0
    for rel in _regular_files(ref):
        want = open(os.path.join(ref, rel), "rb").read()
        try:
            with open(os.path.join(mnt, rel), "rb") as f:
                got = f.read()
        except OSError as e:
            assert e.errno == errno.EIO, (rel, e)
            eio += 1
            continue
        assert got == want, rel
        good += 1
    return eio, good


def test_small_file_reads_at_most_a_span_and_a_chunk(tmp_path):
    tars, lay, m = _layout(tmp_path)
    out = str(tmp_path / "out")
    _convert(f"oci:{tmp_path / 'src'}:v1", f"oci:{tmp_path / 'dst'}:z", out)
    bd = _blob_dir(out, lay, m)
    with open_image(os.path.join(out, "image.boot"), bd) as img:
        reads = []
        for dev in range(1, len(img.devices) + 1):
            d = img.blobs.device(dev)
            inner = d.read_at
            d.read_at = (lambda o, n, inner=inner: reads.append(n) or inner(o, n))
        assert img.read_data(img.lookup("/z-small")) == b"tail file\n"
        small = list(reads)
        # the middle of the file spanning access points: one span before its chunk
        ino = img.lookup("/spans")
        assert img.read_data(ino)[:100] == _text(100, 1)
    span = 64 << 10
    # a small file behind 3 MB of the layer: at most one span of compressed bytes
    assert len(small) == 1 and small[0] <= span + 4096, small
    assert m.layers()[0].size > 10 * small[0]
    assert max(reads) <= span + (1 << 20) + 4096, reads


@pytest.mark.registry
def test_convert_in_one_registry_mounts_layers_and_keeps_source(tmp_path, registry):
    from erofs_tools.registry import push_from_layout
    tars, lay, m = _layout(tmp_path)
    with registry.client() as c:
        push_from_layout(lay, c, "src/app", "v1")
        src_manifest = c.get_manifest("src/app", "v1").data
    out = str(tmp_path / "out")
    r = _convert(f"{registry.host}/src/app:v1", f"{registry.host}/idx/app:v1", out,
                 "--insecure")
    assert r["layers_placed"] == ["mounted"] * 3
    with registry.client() as c:
        assert c.get_manifest("src/app", "v1").data == src_manifest
        dm = c.get_manifest("idx/app", "v1")
        assert [d.digest for d in dm.layers()[:3]] == [d.digest for d in m.layers()]
        assert len(dm.layers()) == 3 + 3 + 1           # + meta blobs + bootstrap
        for d in m.layers():       # the layers as they were, read from DST's repository
            c.pull_blob("idx/app", d.digest, os.path.join(out, d.digest.split(":")[1]),
                        max_size=d.size)
    bd = out
    run_cli("unpack", os.path.join(out, "image.boot"), "--blob-dir", bd, "-o",
            str(tmp_path / "up"))
    ref = reference_rootfs(tars, str(tmp_path / "ref"))
    assert_same_tree(ref, str(tmp_path / "up"), check_nlink=True)
    # the index is small against the image
    assert r["bootstrap_layer_size"] + r["meta_bytes"] < r["compressed_layer_bytes"] * 0.2, r
    # pull --blobs: bootstrap, layers and meta blobs; check, inspect and stat read them
    pulled = str(tmp_path / "pulled")
    p = json.loads(run_cli("pull", f"{registry.host}/idx/app:v1", "-o", pulled, "--blobs",
                           "--insecure", "--json").stdout)
    assert len(p["fetched"]) == 6
    boot = os.path.join(pulled, "image.boot")
    c = run_cli("check", boot, "--blob-dir", pulled, check=False)
    assert c.returncode == 0, c.stdout + c.stderr
    i = run_cli("inspect", boot, "--blob-dir", pulled).stdout
    assert b"compressor=gzip" in i and b"features=0x7000003d" in i
    i = run_cli("inspect", boot, "/spans", "--blob-dir", pulled).stdout
    assert b"size: 3000000" in i
    st = json.loads(run_cli("stat", boot, "--blob-dir", pulled, "--json").stdout)["images"][0]
    assert st["files"] >= 15 and all(b["zran_access_points"] >= 1 for b in st["blobs"])
    assert [b["chunk_data_bytes"] for b in st["blobs"]] == [d.size for d in m.layers()]
    # the chunks' own parts of the layers: no more than the layers (no span counted twice)
    assert 0 < st["bytes_after_compression"] <= sum(d.size for d in m.layers())


@pytest.mark.root
@pytest.mark.registry
def test_lazy_mount_through_the_daemon(tmp_path, registry):
    """The fscache daemon mounts the index image lazily with the registry backend: each
    read fetches the meta blob (once) and its access point's compressed range of the
    original gzip layer, inflates, verifies and serves; every file equals the layers
    extracted in order."""
    from test_daemon_support import DaemonProc, require_lazy_kernel

    from erofs_tools.registry import push_from_layout
    require_lazy_kernel()
    tars, lay, m = _layout(tmp_path)
    with registry.client() as c:
        push_from_layout(lay, c, "src/lazy", "v1")
    out = str(tmp_path / "out")
    r = _convert(f"{registry.host}/src/lazy:v1", f"{registry.host}/idx/lazy:v1", out,
                 "--insecure")
    for x in r["layers"]:                 # only image.boot stays local
        os.unlink(os.path.join(out, x["meta_blob"]))
    ref = reference_rootfs(tars, str(tmp_path / "ref"))
    d = DaemonProc(str(tmp_path / "d")).start()
    try:
        mnt = str(tmp_path / "mnt")
        d.mount(os.path.join(out, "image.boot"), mnt, f"registry:{registry.host}/idx/lazy:v1")
        layer0 = m.layers()[0].digest.split(":")[1]
        before = d.blob_metrics(layer0)["bytes_fetched"]
        with open(os.path.join(mnt, "z-small"), "rb") as f:
            assert f.read() == b"tail file\n"
        small = d.blob_metrics(layer0)["bytes_fetched"] - before
        # one access point's span (64 KiB of output) and the file's chunk, compressed
        assert 0 < small <= (64 << 10) + 4096, small
        assert small * 10 < m.layers()[0].size
        assert_same_tree(ref, mnt, check_nlink=True)
    finally:
        d.cleanup()


@pytest.mark.root
@pytest.mark.registry
def test_flipped_byte_in_the_registry_gives_eio_never_wrong_bytes(tmp_path, registry):
    from test_daemon_support import DaemonProc, require_lazy_kernel

    from erofs_tools.registry import push_from_layout
    require_lazy_kernel()
    layers = zran_layers()
    layers[0].append(E("unique", data=os.urandom(64)))      # digests of this test only
    tars, lay, m = _layout(tmp_path, layers)
    with registry.client() as c:
        push_from_layout(lay, c, "src/flip", "v1")
    out = str(tmp_path / "out")
    _convert(f"{registry.host}/src/flip:v1", f"{registry.host}/idx/flip:v1", out,
             "--insecure")
    hexd = m.layers()[0].digest.split(":")[1]
    data_file = os.path.join(registry.storage, "docker", "registry", "v2", "blobs", "sha256",
                             hexd[:2], hexd, "data")
    buf = bytearray(open(data_file, "rb").read())
    buf[len(buf) // 2] ^= 0x40                  # inside the big file's deflate data
    open(data_file, "wb").write(bytes(buf))
    ref = reference_rootfs(tars, str(tmp_path / "ref"))
    d = DaemonProc(str(tmp_path / "d")).start()
    try:
        mnt = str(tmp_path / "mnt")
        d.mount(os.path.join(out, "image.boot"), mnt, f"registry:{registry.host}/idx/flip:v1")
        eio, good = reads_right_or_eio(ref, mnt)
        assert eio >= 1 and good >= 5, (eio, good)
    finally:
        d.cleanup()


@pytest.mark.root
def test_erofs_tools_mount_of_a_zran_image(tmp_path):
    """`erofs-tools mount` with a local blob directory (the layers and the meta blobs):
    the kernel reads the expanded cache files; every file equals the layers extracted
    in order."""
    from test_tar_helpers import mounted_rafs
    tars, lay, m = _layout(tmp_path)
    out = str(tmp_path / "out")
    _convert(f"oci:{tmp_path / 'src'}:v1", f"oci:{tmp_path / 'dst'}:z", out)
    bd = _blob_dir(out, lay, m)
    ref = reference_rootfs(tars, str(tmp_path / "ref"))
    with mounted_rafs(os.path.join(out, "image.boot"), bd) as mnt:
        assert_same_tree(ref, mnt, check_nlink=True)


def test_refused_sources_leave_no_destination(tmp_path):
    """Uncompressed layers, a corrupt gzip layer, a bad span: one-line error, exit 1,
    no destination image."""
    tars = layer_paths(tmp_path, sample_layers()[:1])
    make_oci_layout(str(tmp_path / "plain"), tars, gz=False)
    p = run_cli("convert", "--oci-ref", f"oci:{tmp_path / 'plain'}:v1",
                f"oci:{tmp_path / 'dst'}:z", check=False)
    assert p.returncode == 1 and b"not gzip" in p.stderr and p.stderr.count(b"\n") == 1
    lay, m = make_oci_layout(str(tmp_path / "bad"), tars)
    path = lay.blob_path(m.layers()[0].digest)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x55
    os.chmod(path, 0o644)
    open(path, "wb").write(bytes(data))
    p = run_cli("convert", "--oci-ref", f"oci:{tmp_path / 'bad'}:v1",
                f"oci:{tmp_path / 'dst'}:z", check=False)
    assert p.returncode == 1 and p.stderr.startswith(b"error: ") \
        and p.stderr.count(b"\n") == 1, p.stderr
    p = run_cli("convert", "--oci-ref", f"oci:{tmp_path / 'plain'}:v1",
                f"oci:{tmp_path / 'dst'}:z", "--zran-span", "1K", check=False)
    assert p.returncode == 1 and b"span" in p.stderr
    idx = tmp_path / "dst" / "index.json"
    assert not idx.exists() or json.loads(idx.read_text())["manifests"] == []
