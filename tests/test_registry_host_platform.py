"""The daemon picks an index entry for the node it runs on, as containerd does: on an
arm64 node the arm64 image's manifest and config, not linux/amd64's (rpull uses the same
host_platform())."""

from __future__ import annotations

import json
import platform

import pytest
from registry_fixtures import registry  # noqa: F401

from erofs_tools.registry import mediatypes as mt
from erofs_tools.registry.manifest import Descriptor, build_index, build_manifest

pytestmark = pytest.mark.registry


def _push_index(client, repo):
    descs = []
    for arch in ("amd64", "arm64"):
        cfg = json.dumps({"os": "linux", "architecture": arch,
                          "config": {"Cmd": [f"/bin/{arch}"]}}).encode()
        r = client.push_blob(repo, cfg)
        m = build_manifest(Descriptor(mt.OCI_CONFIG, r.digest, r.size), [])
        client.put_manifest(repo, m.digest, m)
        descs.append(Descriptor(m.media_type, m.digest, len(m.data),
                                platform={"os": "linux", "architecture": arch,
                                          "os.features": [mt.NYDUS_OS_FEATURE]},
                                artifact_type=mt.NYDUS_MANIFEST_ARTIFACT))
    client.put_manifest(repo, "v1", build_index(descs))


@pytest.mark.parametrize("machine,arch", [("aarch64", "arm64"), ("x86_64", "amd64")])
def test_backend_reads_the_nodes_image(registry, monkeypatch, machine, arch):  # noqa: F811
    from fscache_daemon.storage.backends import RegistryBackend
    _push_index(registry.client(), "multi/app")
    monkeypatch.setattr(platform, "machine", lambda: machine)
    b = RegistryBackend(f"{registry.host}/multi/app:v1", docker_config=False)
    try:
        cfg = json.loads(b.image_config())
    finally:
        b.close()
    assert cfg["architecture"] == arch and cfg["config"]["Cmd"] == [f"/bin/{arch}"]


def test_host_platform_names(monkeypatch):
    from erofs_tools.registry.manifest import host_platform
    monkeypatch.setattr(platform, "machine", lambda: "armv7l")
    assert host_platform() == ("linux", "arm", "v7")
    monkeypatch.undo()
    assert host_platform()[0] == "linux"
    assert host_platform()[1] in ("amd64", "arm64", "arm", "386", "ppc64le", "s390x",
                                  "riscv64")


def test_backend_takes_the_nydus_entry_of_a_merged_index(registry, monkeypatch):  # noqa: F811
    """An index holding the OCI image and its Nydus conversion for the same platform
    (nydusify --merge-platform lists the OCI one first): the backend maps blobs by the
    Nydus manifest's layers (was: the first entry, the OCI one, had no Nydus layers)."""
    from fscache_daemon.storage.backends import RegistryBackend
    c = registry.client()
    repo = "multi/merged"
    descs = []
    for nydus in (False, True):
        cfg = json.dumps({"os": "linux", "architecture": "amd64",
                          "config": {"Cmd": ["/bin/nydus" if nydus else "/bin/oci"]}}).encode()
        r = c.push_blob(repo, cfg)
        blob = c.push_blob(repo, b"nydus blob" if nydus else b"oci layer")
        layer = Descriptor(mt.NYDUS_BLOB if nydus else mt.OCI_LAYER_TAR, blob.digest, blob.size)
        m = build_manifest(Descriptor(mt.OCI_CONFIG, r.digest, r.size), [layer])
        c.put_manifest(repo, m.digest, m)
        plat = {"os": "linux", "architecture": "amd64",
                **({"os.features": [mt.NYDUS_OS_FEATURE]} if nydus else {})}
        descs.append(Descriptor(m.media_type, m.digest, len(m.data), platform=plat))
    c.put_manifest(repo, "v1", build_index(descs))
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    b = RegistryBackend(f"{registry.host}/{repo}:v1", docker_config=False)
    try:
        layers = b._nydus_layers()
        cfg = json.loads(b.image_config())
    finally:
        b.close()
    assert [d.media_type for d in layers] == [mt.NYDUS_BLOB]
    assert cfg["config"]["Cmd"] == ["/bin/nydus"]
