"""`erofs-tools convert | push | pull` against Debian's docker-registry on 127.0.0.1
(no auth, htpasswd Basic, Bearer tokens): an OCI image built from real layer tars is
pushed, converted, pulled, mounted and compared with the expected overlay tree."""
import base64
import gzip
import io
import json
import os
import tarfile

import pytest
from helpers import NYDUS_VECTORS, compare_trees
from registry_fixtures import registry, registry_basic, registry_token  # noqa: F401
from test_tar_helpers import (
    E,
    fix_root,
    layer_paths,
    make_oci_layout,
    mounted_rafs,
    pack_tar,
    reference_rootfs,
    run_cli,
    sample_layers,
    tar_x,
)

from erofs_tools.builder.chunk_dict import BootstrapTables
from erofs_tools.registry import mediatypes as mt
from erofs_tools.registry import push_from_layout

pytestmark = pytest.mark.registry


def _docker_env(tmp_path, server):
    """DOCKER_CONFIG with the server's credentials (none without auth)."""
    d = tmp_path / "docker"
    d.mkdir(exist_ok=True)
    auths = {}
    if server.username:
        tok = base64.b64encode(f"{server.username}:{server.password}".encode()).decode()
        auths[server.host] = {"auth": tok}
    (d / "config.json").write_text(json.dumps({"auths": auths}))
    return {"DOCKER_CONFIG": str(d)}


def _source_image(tmp_path, server, repo="src/app", tag="v1", layers=None, index=False):
    tars = layer_paths(tmp_path, layers or sample_layers())
    lay, m = make_oci_layout(str(tmp_path / "layout"), tars, index=index)
    with server.client() as c:
        if index:
            idx = lay.get_manifest(lay.resolve("v1").digest)
            inner = lay.get_manifest(idx.manifests()[0].digest)
            for d in inner.blobs():
                c.push_blob(repo, lay.blob_path(d.digest), digest=d.digest)
            c.put_manifest(repo, inner.digest, inner)
            c.put_manifest(repo, tag, idx)
        else:
            push_from_layout(lay, c, repo, tag)
    return tars


def _convert(tmp_path, server, src, dst, *args, env=None):
    p = run_cli("convert", f"{server.host}/{src}", f"{server.host}/{dst}", "--insecure",
                "--json", *args, env=env or _docker_env(tmp_path, server))
    return json.loads(p.stdout)


def _pull(tmp_path, server, ref, out, *args, env=None):
    p = run_cli("pull", f"{server.host}/{ref}", "-o", out, "--insecure", "--json", *args,
                env=env or _docker_env(tmp_path, server))
    return json.loads(p.stdout)


def _assert_same(ref, mnt):
    diffs = compare_trees(ref, mnt, check_nlink=True)
    assert not diffs, "\n".join(diffs)


@pytest.mark.root
@pytest.mark.parametrize("auth", ["none", "basic", "token"])
def test_convert_pull_mount(tmp_path, request, auth):
    server = request.getfixturevalue({"none": "registry", "basic": "registry_basic",
                                      "token": "registry_token"}[auth])
    tars = _source_image(tmp_path, server)
    r = _convert(tmp_path, server, "src/app:v1", "nydus/app:v1")
    assert len(r["blob_layers"]) == 3
    out = str(tmp_path / "pulled")
    p = _pull(tmp_path, server, "nydus/app:v1", out, "--blobs")
    assert sorted(os.listdir(out)) == sorted(["image.boot"] + p["blobs"])
    ref = reference_rootfs(tars, str(tmp_path / "ref"))
    with mounted_rafs(os.path.join(out, "image.boot"), out) as mnt:
        _assert_same(ref, mnt)
    # blobs renamed to their layer digests still pass the fsck, digests and ids included
    c = run_cli("check", os.path.join(out, "image.boot"), "--blob-dir", out)
    assert c.returncode == 0, c.stdout + c.stderr
    if auth == "token":
        assert server.issuer is not None


def test_nydus_manifest_conventions(tmp_path, registry):
    _source_image(tmp_path, registry)
    r = _convert(tmp_path, registry, "src/app:v1", "nydus/app:v1")
    with registry.client() as c:
        m = c.get_manifest("nydus/app", "v1")
        assert m.media_type == mt.OCI_MANIFEST and m.digest == r["manifest"]
        layers = m.layers()
        blobs, boot = layers[:-1], layers[-1]
        for d in blobs:
            assert d.media_type == mt.NYDUS_BLOB
            assert d.annotations == {mt.ANNOTATION_NYDUS_BLOB: "true"}
        assert boot.media_type == mt.OCI_LAYER_TAR_GZIP
        assert boot.annotations == {mt.ANNOTATION_NYDUS_BOOTSTRAP: "true",
                                    mt.ANNOTATION_NYDUS_FS_VERSION: "6"}
        layer = c.get_blob("nydus/app", boot.digest)
        raw = gzip.decompress(layer)
        with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
            names = {m_.name: m_ for m_ in tf.getmembers()}
        assert set(names) == {"image", "image/image.boot"}
        assert names["image/image.boot"].mode == 0o444
        cfg = json.loads(c.get_blob("nydus/app", m.config().digest))
        import hashlib
        assert cfg["rootfs"]["diff_ids"] == [d.digest for d in blobs] + \
            ["sha256:" + hashlib.sha256(raw).hexdigest()]
        assert cfg["config"] == {"Env": ["PATH=/usr/bin"]}
        assert cfg["history"][-1]["created_by"] == "Nydus Bootstrap Layer"
        # blob ids in the bootstrap are the blob layers' digests
        out = str(tmp_path / "pulled")
        _pull(tmp_path, registry, "nydus/app:v1", out)
        ids = [b.blob_id for b in BootstrapTables.read(os.path.join(out, "image.boot")).blobs]
        assert ["sha256:" + i for i in ids] == [d.digest for d in blobs]


def test_convert_again_uploads_nothing_new(tmp_path, registry):
    _source_image(tmp_path, registry)
    r1 = _convert(tmp_path, registry, "src/app:v1", "nydus/app:v1")
    assert {p["how"] for p in r1["pushed"]} == {"uploaded"}
    r2 = _convert(tmp_path, registry, "src/app:v1", "nydus/app:v2")
    assert {p["how"] for p in r2["pushed"]} == {"exists"}
    assert r2["manifest"] == r1["manifest"]          # reproducible conversion


def test_index_in_index_out(tmp_path, registry):
    _source_image(tmp_path, registry, index=True)
    r = _convert(tmp_path, registry, "src/app:v1", "nydus/app:v1")
    assert "index" in r
    with registry.client() as c:
        idx = c.get_manifest("nydus/app", "v1")
        assert idx.is_index
        (entry,) = idx.manifests()
        assert entry.artifact_type == mt.NYDUS_MANIFEST_ARTIFACT
        assert entry.platform["os.features"] == [mt.NYDUS_OS_FEATURE]
        assert entry.digest == r["manifest"]
    p = _pull(tmp_path, registry, "nydus/app:v1", str(tmp_path / "p"))
    assert p["manifest"] == r["manifest"]


@pytest.mark.root
def test_push_and_pull_a_packed_layer(tmp_path, registry_basic):
    """pack (blob named by our own id) -> push (renamed to its digest) -> pull -> mount."""
    (tmp_path / "l.tar").write_bytes(
        open(NYDUS_VECTORS / "tar" / "all-entry-type.tar", "rb").read())
    boot, blobs = tmp_path / "l.boot", tmp_path / "blobs"
    pack_tar(tmp_path / "l.tar", boot, blobs, "--whiteout-spec", "none")
    own = BootstrapTables.read(str(boot)).blobs[0].blob_id
    env = _docker_env(tmp_path, registry_basic)
    p = run_cli("push", boot, f"{registry_basic.host}/packed/one:latest", "-D", blobs,
                "--insecure", "--json", env=env)
    r = json.loads(p.stdout)
    digest_hex = r["blob_ids"][own]
    assert digest_hex != own and r["blob_layers"] == ["sha256:" + digest_hex]
    out = str(tmp_path / "pulled")
    pl = _pull(tmp_path, registry_basic, "packed/one:latest", out, "--blobs", env=env)
    assert pl["blobs"] == [digest_hex]
    ref = str(tmp_path / "ref")
    os.makedirs(ref)
    tar_x(str(tmp_path / "l.tar"), ref)
    fix_root(ref)
    with mounted_rafs(os.path.join(out, "image.boot"), out) as mnt:
        _assert_same(ref, mnt)


def test_daemon_registry_backend_reads_converted_blobs(tmp_path, registry):
    """The daemon's registry backend fetches /v2/<repo>/blobs/sha256:<blob id>."""
    from fscache_daemon.storage.backends import RegistryBackend
    _source_image(tmp_path, registry)
    _convert(tmp_path, registry, "src/app:v1", "nydus/app:v1")
    out = str(tmp_path / "pulled")
    p = _pull(tmp_path, registry, "nydus/app:v1", out, "--blobs")
    be = RegistryBackend(f"{registry.host}/nydus/app:v1", insecure=True)
    try:
        for blob_id in p["blobs"]:
            assert be.digest_of(blob_id) == "sha256:" + blob_id
            local = open(os.path.join(out, blob_id), "rb").read()
            assert be.blob_size(blob_id) == len(local)
            assert be.read(blob_id, 100, 500) == local[100:600]
    finally:
        be.close()


@pytest.mark.root
def test_convert_with_chunk_dict(tmp_path, registry):
    """Image B shares a big file with image A: converting B with A's bootstrap as chunk
    dict stores none of it again, and B still mounts with A's blob."""
    big = os.urandom(3 << 20)
    a = [[E("data", "dir"), E("data/big", data=big)]]
    b = [[E("data", "dir"), E("data/big", data=big), E("data/small", data=b"s")]]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    tars_a = layer_paths(tmp_path / "a", a)
    tars_b = layer_paths(tmp_path / "b", b)
    lay_a, _ = make_oci_layout(str(tmp_path / "la"), tars_a)
    lay_b, _ = make_oci_layout(str(tmp_path / "lb"), tars_b)
    with registry.client() as c:
        push_from_layout(lay_a, c, "src/a", "v1")
        push_from_layout(lay_b, c, "src/b", "v1")
    _convert(tmp_path, registry, "src/a:v1", "nydus/shared:a")
    pa = _pull(tmp_path, registry, "nydus/shared:a", str(tmp_path / "pa"))
    r = _convert(tmp_path, registry, "src/b:v1", "nydus/shared:b", "--chunk-dict",
                 pa["bootstrap"])
    assert len(r["blob_layers"]) == 2
    new = [p for p in r["pushed"] if p["media_type"] == mt.NYDUS_BLOB and p["how"] == "uploaded"]
    assert len(new) == 1 and new[0]["size"] < 100_000
    out = str(tmp_path / "pb")
    _pull(tmp_path, registry, "nydus/shared:b", out, "--blobs")
    ref = reference_rootfs(tars_b, str(tmp_path / "ref"))
    with mounted_rafs(os.path.join(out, "image.boot"), out) as mnt:
        _assert_same(ref, mnt)


def test_corrupt_source_layer_is_refused(tmp_path, registry):
    tars = layer_paths(tmp_path, sample_layers()[:1])
    lay, m = make_oci_layout(str(tmp_path / "layout"), tars)
    path = lay.blob_path(m.layers()[0].digest)
    data = bytearray(open(path, "rb").read())
    data[-12] ^= 1                      # inside the gzip stream's trailer or data
    os.chmod(path, 0o644)
    open(path, "wb").write(bytes(data))
    p = run_cli("convert", f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/x/y:z",
                "--insecure", check=False)
    assert p.returncode == 1 and p.stderr.startswith(b"error: "), p.stderr
    with registry.client() as c:
        assert c.head_manifest("x/y", "z") is None


def test_oci_layout_to_layout_without_registry(tmp_path):
    tars = layer_paths(tmp_path, sample_layers())
    make_oci_layout(str(tmp_path / "src"), tars)
    p = run_cli("convert", f"oci:{tmp_path / 'src'}:v1", f"oci:{tmp_path / 'dst'}:nydus",
                "--json")
    r = json.loads(p.stdout)
    p = run_cli("pull", f"oci:{tmp_path / 'dst'}:nydus", "-o", tmp_path / "out", "--blobs",
                "--json")
    pl = json.loads(p.stdout)
    assert pl["manifest"] == r["manifest"]
    assert len(pl["fetched"]) == 3


def test_pull_of_a_plain_image_is_refused(tmp_path, registry):
    _source_image(tmp_path, registry)
    p = run_cli("pull", f"{registry.host}/src/app:v1", "-o", tmp_path / "o", "--insecure",
                check=False)
    assert p.returncode == 1 and b"not a Nydus image" in p.stderr
    p = run_cli("convert", f"{registry.host}/src/app:v1", f"{registry.host}/n/a:1",
                "--insecure", check=False)
    assert p.returncode == 0
    p = run_cli("convert", f"{registry.host}/n/a:1", f"{registry.host}/n/b:1", "--insecure",
                check=False)
    assert p.returncode == 1 and b"already a Nydus image" in p.stderr


@pytest.mark.root
def test_lazy_mount_of_converted_image_through_the_daemon(tmp_path, registry):
    """pull without --blobs, then the fscache daemon mounts the bootstrap lazily with the
    registry backend: it fetches /v2/<repo>/blobs/sha256:<blob id> by range."""
    from test_daemon_support import DaemonProc, require_lazy_kernel
    require_lazy_kernel()
    tars = _source_image(tmp_path, registry)
    _convert(tmp_path, registry, "src/app:v1", "nydus/lazy:v1")
    out = str(tmp_path / "pulled")
    p = _pull(tmp_path, registry, "nydus/lazy:v1", out)
    assert os.listdir(out) == ["image.boot"]
    ref = reference_rootfs(tars, str(tmp_path / "ref"))
    d = DaemonProc(str(tmp_path / "d")).start()
    try:
        mnt = str(tmp_path / "mnt")
        d.mount(p["bootstrap"], mnt, f"registry:{registry.host}/nydus/lazy:v1")
        _assert_same(ref, mnt)
        m = d.metrics()
        assert set(m["blobs"]) == set(p["blobs"])
    finally:
        d.cleanup()


def test_docker_schema2_source(tmp_path, registry):
    """A Docker (schema 2) manifest with docker layer media types converts too."""
    import hashlib

    from erofs_tools.registry import Descriptor, build_manifest
    tars = layer_paths(tmp_path, sample_layers()[:2])
    with registry.client() as c:
        descs = []
        for t in tars:
            data = gzip.compress(open(t, "rb").read(), mtime=0)
            r = c.push_blob("docker/app", data)
            descs.append(Descriptor(mt.DOCKER_LAYER_TAR_GZIP, r.digest, len(data)))
        cfg = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
            "type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(
                open(t, "rb").read()).hexdigest() for t in tars]}}).encode()
        r = c.push_blob("docker/app", cfg)
        m = build_manifest(Descriptor(mt.DOCKER_CONFIG, r.digest, len(cfg)), descs,
                           media_type=mt.DOCKER_MANIFEST)
        c.put_manifest("docker/app", "v1", m)
    r = _convert(tmp_path, registry, "docker/app:v1", "nydus/docker:v1")
    assert len(r["blob_layers"]) == 2
    out = str(tmp_path / "p")
    _pull(tmp_path, registry, "nydus/docker:v1", out, "--blobs")
    assert len(BootstrapTables.read(os.path.join(out, "image.boot")).blobs) == 2


@pytest.mark.parametrize("same_registry", [True, False])
def test_merge_platform_index_lists_both(tmp_path, registry, same_registry):
    """--merge-platform: one index with the source manifest (and its blobs, copied) and
    the Nydus manifest; pull picks the Nydus one, plain platform selection the other."""
    from erofs_tools.registry import resolve_manifest
    if same_registry:
        _source_image(tmp_path, registry)
        src = f"{registry.host}/src/app:v1"
    else:
        tars = layer_paths(tmp_path, sample_layers())
        make_oci_layout(str(tmp_path / "layout"), tars)
        src = f"oci:{tmp_path / 'layout'}:v1"
    p = run_cli("convert", src, f"{registry.host}/multi/app:v1", "--insecure",
                "--merge-platform", "--json", env=_docker_env(tmp_path, registry))
    r = json.loads(p.stdout)
    with registry.client() as c:
        idx = c.get_manifest("multi/app", "v1")
        plain, nydus = idx.manifests()
        assert nydus.artifact_type == mt.NYDUS_MANIFEST_ARTIFACT and nydus.digest == r["manifest"]
        assert plain.artifact_type is None and plain.platform["architecture"] == "amd64"
        m = resolve_manifest(c, "multi/app", "v1", nydus=False)
        assert m.digest == plain.digest
        for d in m.blobs():
            assert c.blob_exists("multi/app", d.digest)
    pl = _pull(tmp_path, registry, "multi/app:v1", str(tmp_path / "p"))
    assert pl["manifest"] == r["manifest"]
