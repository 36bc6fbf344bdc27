"""The registry backend against Debian's docker-registry on 127.0.0.1 (registry_fixtures)."""

import hashlib
import os
import threading
import time

import pytest
from registry_fixtures import FlakyProxy, registry, registry_token  # noqa: F401
from test_storage_support import NYDUS_BLOB as NYDUS_BLOB_PATH
from test_storage_support import NYDUS_BLOB_ID, make_blob

from erofs_tools.registry import NYDUS_BLOB, OCI_CONFIG, BlobSource, push_image
from fscache_daemon.storage import BackendError
from fscache_daemon.storage import blobcache as bc
from fscache_daemon.storage.backends import RegistryBackend, open_backend

pytestmark = pytest.mark.registry


def sha256_file(path):
    with open(path, "rb") as f:
        return "sha256:" + hashlib.sha256(f.read()).hexdigest()


def push_blob_image(server, repo, tag, blob_paths):
    client = server.client()
    layers = [BlobSource(p, NYDUS_BLOB, {"containerd.io/snapshot/nydus-blob": "true"})
              for p in blob_paths]
    push_image(client, repo, tag, config=BlobSource(b"{}", OCI_CONFIG), layers=layers)
    client.close()


def manager(cache_dir, backend, blob_id, size):
    backend.register_blob(blob_id, size)
    meta, fetched = bc.load_or_fetch_meta(cache_dir, blob_id, backend, blob_size=size)
    return bc.BlobManager(meta, bc.BlobCache(cache_dir, meta), backend), fetched


def test_registry_backend_serves_nydus_vector(registry, tmp_path):  # noqa: F811
    push_blob_image(registry, "lazy/nydus", "v1", [NYDUS_BLOB_PATH])
    be = open_backend(f"registry:{registry.host}/lazy/nydus:v1", backoff=0.01,
                      docker_config=False)
    size = os.path.getsize(NYDUS_BLOB_PATH)
    be.register_blob(NYDUS_BLOB_ID, size)
    # the vector's blob id is not the sha256 of the file: matched through the manifest
    assert be.digest_of(NYDUS_BLOB_ID) == sha256_file(NYDUS_BLOB_PATH)
    mgr, meta_bytes = manager(str(tmp_path / "c"), be, NYDUS_BLOB_ID, size)
    assert 0 < meta_bytes < size
    fetched = mgr.fill(0, mgr.size)
    assert fetched == sum(c.compressed_size for c in mgr.meta.chunks)
    assert mgr.complete()
    with open(NYDUS_BLOB_PATH, "rb") as f:
        from erofs_tools.reader import blob as rblob
        ra = rblob.file_reader(f)
        for c in mgr.meta.chunks:
            want = rblob.read_chunk(mgr.meta, c, ra)
            with open(mgr.cache.path, "rb") as g:
                g.seek(c.uncompressed_offset)
                assert g.read(c.uncompressed_size) == want
    mgr.close()
    be.close()


def test_registry_backend_with_token_auth_and_corruption(registry_token, tmp_path):  # noqa: F811
    bdir = str(tmp_path / "blobs")
    blob_id, datas = make_blob(bdir, 12, chunk_size=65536)
    path = os.path.join(bdir, blob_id)
    push_blob_image(registry_token, "lazy/synth", "v1", [path])
    be = RegistryBackend(f"{registry_token.host}/lazy/synth:v1", docker_config=False,
                         credentials=registry_token.credentials, backoff=0.01)
    size = os.path.getsize(path)
    mgr, _ = manager(str(tmp_path / "c"), be, blob_id, size)
    c3 = mgr.meta.chunks[3]
    # corrupt chunk 3 in the registry's storage
    stored = registry_token.blob_data_path(be.digest_of(blob_id))
    with open(stored, "r+b") as f:
        f.seek(c3.compressed_offset + 10)
        b = f.read(1)
        f.seek(c3.compressed_offset + 10)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(bc.FillError):
        mgr.fill(0, mgr.size)
    assert mgr.cache.cached_chunks == 11 and not mgr.cache.has(c3)
    assert mgr.stats.snapshot()["verify_failures"] == 1
    mgr.close()
    be.close()


def test_registry_backend_missing_blob(registry):  # noqa: F811
    be = open_backend(f"registry:{registry.host}/nothing/here", backoff=0.01,
                      docker_config=False, retries=0)
    with pytest.raises(BackendError):
        be.read("c" * 64, 0, 10)
    with pytest.raises(BackendError):
        be.blob_size("c" * 64)
    be.close()


def test_registry_backend_through_a_flaky_mirror(registry, tmp_path):  # noqa: F811
    """dfdaemon-style registry mirror in front of the registry: every blob read goes
    through it, its 5xx answers and dropped connections are retried."""
    from registry_fixtures import FlakyProxy
    bdir = str(tmp_path / "blobs")
    blob_id, datas = make_blob(bdir, 10, chunk_size=65536)
    path = os.path.join(bdir, blob_id)
    push_blob_image(registry, "lazy/mirror", "v1", [path])
    mirror = FlakyProxy(registry.host, failures=[503, "drop", 503], match=r"GET .*/blobs/")
    try:
        # the reference names a host that does not exist: only the mirror can answer
        be = open_backend("registry:registry.invalid:5000/lazy/mirror:v1",
                          mirror=mirror.host, docker_config=False, backoff=0.01)
        size = os.path.getsize(path)
        mgr, _ = manager(str(tmp_path / "c"), be, blob_id, size)
        mgr.fill(0, mgr.size)
        assert mgr.complete() and mgr.stats.snapshot()["verify_failures"] == 0
        with open(mgr.cache.path, "rb") as f:
            for c in mgr.meta.chunks:
                f.seek(c.uncompressed_offset)
                assert f.read(c.uncompressed_size) == datas[c.index]
        assert sum(1 for r in mirror.requests if "/blobs/" in r) >= 4
        mgr.close()
        be.close()
    finally:
        mirror.stop()


def _read_while_manifest_held(server, repo, path, blob_id):
    """A registry backend whose image manifest the proxy holds: warm() on a thread, then
    read() of the blob's last byte (a mount's blob check). -> (byte, requests the proxy
    saw before the manifest was let through, the requests after)."""
    push_blob_image(server, repo, "v1", [path])
    proxy = FlakyProxy(server.host, ["hold"], match=r"^GET /v2/.*/manifests/")
    be = open_backend(f"registry:{proxy.host}/{repo}:v1", backoff=0.01,
                      docker_config=False, retries=0)
    size = os.path.getsize(path)
    be.register_blob(blob_id, size)
    try:
        warm = threading.Thread(target=be.warm)
        warm.start()
        deadline = time.monotonic() + 60
        while not proxy.held:
            assert time.monotonic() < deadline, proxy.requests
            time.sleep(0.01)
        got: list = []
        reader = threading.Thread(target=lambda: got.append(be.read(blob_id, size - 1, 1)))
        reader.start()
        # the read goes out while the manifest is held, then waits for it
        while len(proxy.requests) < 2:
            assert time.monotonic() < deadline, proxy.requests
            time.sleep(0.01)
        reader.join(0.3)
        assert reader.is_alive() and not got     # kept only once the manifest says so
        before = list(proxy.requests)
        proxy.release()
        reader.join(60)
        warm.join(60)
        with open(path, "rb") as f:
            f.seek(size - 1)
            assert got == [f.read(1)]
        return before, proxy.requests[len(before):]
    finally:
        be.close()
        proxy.stop()


def test_a_blob_check_beside_the_held_manifest(registry, tmp_path):  # noqa: F811
    """A mount's blob check reads sha256:<blob id> (the Nydus convention) while the
    image's manifest is still on its way, and keeps it once the manifest maps the blob
    there: no second read."""
    data = os.urandom(200_000)
    blob_id = hashlib.sha256(data).hexdigest()
    path = str(tmp_path / blob_id)
    with open(path, "wb") as f:
        f.write(data)
    before, after = _read_while_manifest_held(registry, "lazy/early", path, blob_id)
    assert [r.split("?")[0] for r in before] == [
        "GET /v2/lazy/early/manifests/v1", f"GET /v2/lazy/early/blobs/sha256:{blob_id}"]
    assert after == []


def test_a_blob_check_guessed_wrong_reads_where_the_manifest_says(registry, tmp_path):  # noqa: F811
    """A blob named by its RAFS id (not its sha256): the early read of sha256:<blob id>
    finds nothing, and the byte is read from the layer the manifest maps it to."""
    before, after = _read_while_manifest_held(registry, "lazy/named", NYDUS_BLOB_PATH,
                                              NYDUS_BLOB_ID)
    assert [r.split("?")[0] for r in before] == [
        "GET /v2/lazy/named/manifests/v1", f"GET /v2/lazy/named/blobs/sha256:{NYDUS_BLOB_ID}"]
    assert [r.split("?")[0] for r in after] == [
        f"GET /v2/lazy/named/blobs/{sha256_file(NYDUS_BLOB_PATH)}"]
