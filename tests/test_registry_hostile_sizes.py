"""What a registry declares is not taken over what we know: a blob HEAD whose
Content-Length is wrong (a CDN answering HEAD with 0) must not become the size in the
manifest we push; a redirect to a URL with a malformed port is a one-line RegistryError,
not a ValueError out of the client (the daemon handles ErofsToolsError)."""

from __future__ import annotations

import json
import os

import pytest
from test_registry_hostile import _answer, _Server

from erofs_tools.errors import RegistryError
from erofs_tools.registry import (
    NYDUS_BLOB,
    OCI_CONFIG,
    BlobSource,
    RegistryClient,
    push_image,
)

pytestmark = pytest.mark.registry

DATA = os.urandom(50_000)


def test_pushed_manifest_has_the_sizes_we_know_not_the_heads():
    manifests = []

    def handle(h, body):
        if h.command == "HEAD" and "/blobs/" in h.path:
            # "we have it" with a wrong size: the blobs are never uploaded
            h.send_response(200)
            h.send_header("Content-Length", "3")
            h.end_headers()
        elif h.command == "PUT" and "/manifests/" in h.path:
            manifests.append(body)
            _answer(h, 201)
        else:
            _answer(h, 404)
    srv = _Server(handle)
    try:
        c = RegistryClient(srv.host, insecure=True, docker_config=False, retries=0)
        m = push_image(c, "app", "v1", config=BlobSource(b"{}", OCI_CONFIG),
                       layers=[BlobSource(DATA, NYDUS_BLOB)])
        sent = json.loads(manifests[-1])
        assert sent["config"]["size"] == 2
        assert [x["size"] for x in sent["layers"]] == [len(DATA)]
        assert [d.size for d in m.layers()] == [len(DATA)]
    finally:
        srv.stop()


@pytest.mark.parametrize("location", ["http://127.0.0.1:99999/blob",
                                      "http://127.0.0.1:port/blob"])
def test_redirect_to_a_malformed_port_is_a_registry_error(location):
    def handle(h, _):
        _answer(h, 307, {"Location": location})
    srv = _Server(handle)
    try:
        c = RegistryClient(srv.host, insecure=True, docker_config=False, retries=0)
        with pytest.raises(RegistryError, match="malformed"):
            c.read_blob_range("app", "sha256:" + "a" * 64, 0, 10)
        with pytest.raises(RegistryError, match="malformed"):
            c.get_manifest("app", "v1")
    finally:
        srv.stop()


def test_pushed_nydus_manifest_has_the_bootstrap_sizes_of_blobs_already_there(tmp_path):
    """push/convert with a blob only in the destination (a chunk dict's): the size in
    the manifest is the bootstrap's, not what the registry's HEAD declares."""
    import subprocess
    import sys

    from erofs_tools.builder.chunk_dict import BootstrapTables
    from erofs_tools.registry.nydus_push import push_nydus
    tool = os.path.join(os.path.dirname(sys.executable), "erofs-tools")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(DATA)
    boot, blobs = tmp_path / "boot", tmp_path / "blobs"
    subprocess.run([tool, "pack", str(src), "-B", str(boot), "-D", str(blobs)], check=True)
    (blob,) = BootstrapTables.read(str(boot)).blobs
    there = "sha256:" + blob.blob_id
    manifests = []

    def handle(h, body):
        if h.command == "HEAD" and "/blobs/" in h.path:
            if h.path.endswith(there):
                h.send_response(200)                # "have it", with a wrong size
                h.send_header("Content-Length", "3")
                h.end_headers()
            else:
                _answer(h, 404)
        elif h.command == "POST":
            _answer(h, 202, {"Location": "/v2/app/blobs/uploads/u1"})
        elif h.command == "PUT" and "/uploads/" in h.path:
            _answer(h, 201)
        elif h.command == "PUT" and "/manifests/" in h.path:
            manifests.append(body)
            _answer(h, 201)
        else:
            _answer(h, 404)
    srv = _Server(handle)
    try:
        empty = tmp_path / "none"
        empty.mkdir()
        push_nydus(str(boot), str(empty), f"{srv.host}/app:v1",
                   client_kw={"docker_config": False, "retries": 0})
        layers = json.loads(manifests[-1])["layers"]
        assert layers[0]["digest"] == there
        assert layers[0]["size"] == blob.compressed_size > 3
    finally:
        srv.stop()
