"""RegistryClient against a real docker-registry (no auth): blobs, ranges, uploads,
mounts, manifests, digest verification, whole images and OCI layouts."""

import io
import json
import os

import pytest
from registry_fixtures import registry, sha256  # noqa: F401  (fixture)

from erofs_tools.errors import DigestMismatchError, InputError, RegistryError
from erofs_tools.registry import (
    BlobSource,
    Descriptor,
    OciLayout,
    build_index,
    build_manifest,
    pull_image,
    pull_to_layout,
    push_from_layout,
    push_image,
    resolve_manifest,
)
from erofs_tools.registry import mediatypes as mt
from erofs_tools.registry.manifest import Manifest

pytestmark = pytest.mark.registry

DATA = os.urandom(300_000)


class Pipe(io.RawIOBase):
    """A non-seekable stream, like stdin."""

    def __init__(self, data):
        self._b = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, buf):
        return self._b.readinto(buf)


def test_monolithic_upload_and_pull(registry, tmp_path):
    c = registry.client()
    r = c.push_blob("app/one", DATA)
    assert (r.digest, r.size, r.how) == (sha256(DATA), len(DATA), "uploaded")
    assert c.blob_exists("app/one", r.digest)
    assert c.stat_blob("app/one", r.digest) == len(DATA)
    assert not c.blob_exists("app/one", sha256(b"other"))
    assert c.get_blob("app/one", r.digest) == DATA
    assert c.pull_blob("app/one", r.digest, tmp_path / "blob") == len(DATA)
    assert (tmp_path / "blob").read_bytes() == DATA
    # Already present: nothing is sent again.
    assert c.push_blob("app/one", DATA).how == "exists"


def test_upload_from_file_and_streams(registry, tmp_path):
    c = registry.client()
    path = tmp_path / "f"
    path.write_bytes(DATA)
    assert c.push_blob("app/f", str(path)).how == "uploaded"
    assert c.get_blob("app/f", sha256(DATA)) == DATA
    other = DATA[::-1]
    with open(path, "wb") as f:
        f.write(other)
    with open(path, "rb") as f:
        r = c.push_blob("app/f", f, chunk_size=64 * 1024)     # chunked PATCH from a file
    assert r.digest == sha256(other) and c.get_blob("app/f", r.digest) == other
    piped = os.urandom(200_001)
    r = c.push_blob("app/f", Pipe(piped), chunk_size=50_000)  # digest computed on the way
    assert (r.digest, r.size) == (sha256(piped), len(piped))
    assert c.get_blob("app/f", r.digest) == piped


def test_declared_digest_checked(registry):
    c = registry.client()
    with pytest.raises(InputError, match="changed while uploading"):
        c.push_blob("app/x", Pipe(b"abc"), digest=sha256(b"abd"), chunk_size=1024)
    with pytest.raises(RegistryError, match="DIGEST_INVALID|HTTP 400"):
        c.push_blob("app/x", b"abc", digest=sha256(b"abd"))
    assert not c.blob_exists("app/x", sha256(b"abd"))


def test_cross_repository_mount(registry):
    c = registry.client()
    d = c.push_blob("src/repo", DATA).digest
    assert c.push_blob("dst/repo", DATA, mount_from="src/repo").how == "mounted"
    assert c.get_blob("dst/repo", d) == DATA
    assert c.mount_blob("third/repo", d, "src/repo")
    # Nothing to mount from: falls back to an upload.
    small = b"not anywhere yet"
    assert c.push_blob("dst/repo", small, mount_from="src/repo").how == "uploaded"
    assert not c.mount_blob("fourth/repo", sha256(b"missing"), "src/repo")


def test_range_reads(registry):
    c = registry.client()
    d = c.push_blob("app/r", DATA).digest
    for off, n in [(0, 1), (0, 4096), (12345, 777), (len(DATA) - 10, 10)]:
        assert c.read_blob_range("app/r", d, off, n) == DATA[off:off + n]
    assert c.read_blob_range("app/r", d, len(DATA) - 5, 100) == DATA[-5:]
    assert c.read_blob_range("app/r", d, 5, 0) == b""
    with pytest.raises(RegistryError, match="beyond"):
        c.read_blob_range("app/r", d, len(DATA) + 10, 10)


def test_missing_blob_is_a_clear_error(registry):
    c = registry.client()
    with pytest.raises(RegistryError) as e:
        c.get_blob("app/none", sha256(b"x"))
    msg = str(e.value)
    assert "HTTP 404" in msg and "BLOB_UNKNOWN" in msg and "\n" not in msg


def test_corrupt_blob_detected(registry, tmp_path):
    c = registry.client()
    d = c.push_blob("app/c", DATA).digest
    path = registry.blob_data_path(d)
    bad = bytearray(DATA)
    bad[1000] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bad)
    with pytest.raises(DigestMismatchError, match=d):
        c.get_blob("app/c", d)
    with pytest.raises(DigestMismatchError):
        c.pull_blob("app/c", d, tmp_path / "out")
    assert os.listdir(tmp_path) == []           # no partial file left behind


def _image(c, repo, tag="v1"):
    cfg = json.dumps({"architecture": "amd64", "os": "linux",
                      "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    layers = [BlobSource(DATA, mt.NYDUS_BLOB, {mt.ANNOTATION_NYDUS_BLOB: "true"}),
              BlobSource(b"bootstrap", mt.OCI_LAYER_TAR_GZIP,
                         {mt.ANNOTATION_NYDUS_BOOTSTRAP: "true"})]
    return push_image(c, repo, tag, BlobSource(cfg, mt.OCI_CONFIG), layers)


def test_manifests_oci_and_docker(registry):
    c = registry.client()
    m = _image(c, "img/a")
    got = c.get_manifest("img/a", "v1")
    assert (got.data, got.digest, got.media_type) == (m.data, m.digest, mt.OCI_MANIFEST)
    assert c.get_manifest("img/a", m.digest).data == m.data
    assert c.head_manifest("img/a", "v1") == m.digest
    assert c.head_manifest("img/a", "nope") is None
    assert got.layers()[0].annotations == {mt.ANNOTATION_NYDUS_BLOB: "true"}
    # A Docker schema 2 manifest of the same blobs.
    docker = build_manifest(Descriptor(mt.DOCKER_CONFIG, m.config().digest, m.config().size),
                            [Descriptor(mt.DOCKER_LAYER_TAR_GZIP, d.digest, d.size)
                             for d in m.layers()], media_type=mt.DOCKER_MANIFEST)
    assert c.put_manifest("img/a", "docker", docker) == docker.digest
    assert c.get_manifest("img/a", "docker").media_type == mt.DOCKER_MANIFEST
    # An index pointing at both; resolve_manifest follows it.
    index = build_index([Descriptor(mt.OCI_MANIFEST, m.digest, len(m.data),
                                    platform={"os": "linux", "architecture": "amd64"},
                                    artifact_type=mt.NYDUS_MANIFEST_ARTIFACT),
                         Descriptor(mt.DOCKER_MANIFEST, docker.digest, len(docker.data),
                                    platform={"os": "linux", "architecture": "amd64"})])
    c.put_manifest("img/a", "multi", index)
    assert c.get_manifest("img/a", "multi").is_index
    assert resolve_manifest(c, "img/a", "multi", nydus=True).digest == m.digest
    assert resolve_manifest(c, "img/a", "multi", nydus=False).digest == docker.digest
    assert sorted(c.list_tags("img/a")) == ["docker", "multi", "v1"]


def test_manifest_referencing_missing_blob_rejected(registry):
    c = registry.client()
    m = build_manifest(Descriptor(mt.OCI_CONFIG, sha256(b"cfg"), 3), [])
    with pytest.raises(RegistryError, match="MANIFEST_BLOB_UNKNOWN|HTTP 400"):
        c.put_manifest("img/b", "v1", m)


def test_corrupt_manifest_detected(registry):
    c = registry.client()
    m = _image(c, "img/c")
    path = registry.blob_data_path(m.digest)
    data = open(path, "rb").read()
    forged = data.replace(b"v1.tar+gzip", b"v1.tar+zstd")     # still valid JSON
    assert forged != data
    with open(path, "wb") as f:
        f.write(forged)
    with pytest.raises(DigestMismatchError):
        c.get_manifest("img/c", m.digest)
    with pytest.raises(DigestMismatchError):
        c.get_manifest("img/c", "v1")       # checked against Docker-Content-Digest


def test_put_manifest_digest_reference_must_match(registry):
    c = registry.client()
    m = _image(c, "img/d")
    with pytest.raises(DigestMismatchError):
        c.put_manifest("img/d", sha256(b"else"), m)
    assert c.put_manifest("img/d", m.digest, m) == m.digest


def test_pull_image_and_layouts(registry, tmp_path):
    c = registry.client()
    m = _image(c, "img/e")
    got = pull_image(c, "img/e", "v1", str(tmp_path / "blobs"))
    assert got.digest == m.digest
    names = sorted(os.listdir(tmp_path / "blobs"))
    assert names == sorted(d.digest.split(":")[1] for d in m.blobs())
    # A damaged local copy is fetched again; intact ones are kept.
    layer = tmp_path / "blobs" / m.layers()[0].digest.split(":")[1]
    layer.write_bytes(bytes(len(DATA)))
    pull_image(c, "img/e", "v1", str(tmp_path / "blobs"))
    assert layer.read_bytes() == DATA
    # registry -> layout -> another repository
    layout = OciLayout(tmp_path / "layout", create=True)
    pull_to_layout(c, "img/e", "v1", layout, "v1")
    assert layout.resolve("v1").digest == m.digest
    copied = push_from_layout(layout, c, "img/copy", "latest", "v1")
    assert c.get_manifest("img/copy", "latest").digest == copied.digest == m.digest
    assert Manifest(copied.data, copied.media_type, copied.digest).layers()[0].size == len(DATA)


def test_tls_verified_by_default(tmp_path):
    from registry_fixtures import start_registry

    from erofs_tools.registry import RegistryClient
    server = start_registry(str(tmp_path), tls=True)
    try:
        c = server.client()                          # trusts the server's certificate
        d = c.push_blob("tls/app", DATA).digest
        assert c.read_blob_range("tls/app", d, 3, 4) == DATA[3:7]
        untrusting = RegistryClient(server.host, docker_config=False, retries=0)
        with pytest.raises(RegistryError, match="TLS error") as e:
            untrusting.ping()
        assert "\n" not in str(e.value)
    finally:
        server.stop()
