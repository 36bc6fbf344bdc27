"""Which index entry a platform takes, as containerd's pull has it (platforms.Only and
images.Manifest): an entry without a platform sorts after every matching one and is
taken only when its config names the platform; a variant above the asked one never
matches (its binaries may use instructions the CPU lacks), lower ones and the 32-bit
relatives do, best first; os.features a node does not ask for make no match; an index
may hold another index. The registry cases run against docker-registry."""

from __future__ import annotations

import json

import pytest
from registry_fixtures import registry  # noqa: F401

from erofs_tools.errors import CorruptImageError
from erofs_tools.registry import mediatypes as mt
from erofs_tools.registry.image import resolve_manifest
from erofs_tools.registry.manifest import (
    Descriptor,
    build_index,
    build_manifest,
    platform_vector,
    select_platform,
)


def _plat(spec: str | None, **extra) -> dict | None:
    if spec is None:
        return None
    os_, arch, *variant = spec.split("/")
    return {"os": os_, "architecture": arch, **({"variant": variant[0]} if variant else {}),
            **extra}


def _index(*entries) -> tuple:
    """An index of fake entries; entry i's digest ends in its number."""
    descs = [Descriptor(mt.OCI_MANIFEST, "sha256:" + f"{i:064x}", 100, platform=p)
             for i, p in enumerate(entries)]
    return build_index(descs), descs


@pytest.mark.parametrize("entries,want,picked", [
    # no platform: after every matching entry (was: taken first, whatever its image)
    ([None, "linux/amd64"], "linux/amd64", 1),
    ([None, "linux/arm64"], "linux/arm64", 1),
    ([None], "linux/amd64", 0),          # only then (its config is checked)
    # a higher variant is no match (was: taken when the asked one was missing)
    (["linux/arm/v7", "linux/arm/v5"], "linux/arm/v6", 1),
    (["linux/amd64/v3", "linux/386"], "linux/amd64", 1),
    # lower variants and 32-bit relatives, best first whatever the index order
    (["linux/amd64/v2", "linux/amd64/v3", "linux/amd64"], "linux/amd64/v3", 1),
    (["linux/386", "linux/amd64/v2"], "linux/amd64/v3", 1),
    (["linux/386", "linux/amd64"], "linux/amd64", 1),
    (["linux/arm/v7", "linux/arm64"], "linux/arm64", 1),
    (["linux/arm/v6", "linux/arm/v7", "linux/arm64/v8.2"], "linux/arm64", 1),
    (["linux/arm64/v9", "linux/arm64/v8.2"], "linux/arm64/v9", 0),
    (["linux/arm64/v8.6", "linux/arm64/v8.1"], "linux/arm64/v9", 1),  # v9 runs v8.5 down
    # names containerd normalizes
    (["linux/x86_64"], "linux/amd64", 0),
    (["linux/aarch64/v8"], "linux/arm64", 0),
    (["linux/arm/7"], "linux/arm/v7", 0),
])
def test_entry_like_containerd(entries, want, picked):
    index, descs = _index(*(_plat(e) for e in entries))
    os_, arch, *variant = want.split("/")
    assert select_platform(index, os_, arch, None, variant[0] if variant else None) \
        == descs[picked]


@pytest.mark.parametrize("entries,want", [
    (["linux/arm/v7"], "linux/arm/v6"),
    (["linux/amd64/v2"], "linux/amd64"),
    (["linux/arm64"], "linux/arm/v7"),
    (["windows/amd64"], "linux/amd64"),
])
def test_no_entry_the_node_runs(entries, want):
    index, _ = _index(*(_plat(e) for e in entries))
    os_, arch, *variant = want.split("/")
    with pytest.raises(CorruptImageError, match="no manifest for"):
        select_platform(index, os_, arch, None, variant[0] if variant else None)


def test_os_features_the_node_lacks():
    index, descs = _index(_plat("linux/amd64", **{"os.features": ["sse4"]}),
                          _plat("linux/amd64", **{"os.version": "10.0.17763"}))
    assert select_platform(index) == descs[1]       # os.version: compared on Windows only
    nydus, descs = _index(_plat("linux/amd64", **{"os.features": [mt.NYDUS_OS_FEATURE]}),
                          _plat("linux/amd64"))
    assert select_platform(nydus, nydus=True) == descs[0]
    assert select_platform(nydus, nydus=False) == descs[1]


def test_vector():
    assert platform_vector("linux", "amd64", "v3") == [
        ("linux", "amd64", "v3"), ("linux", "amd64", "v2"), ("linux", "amd64", "v1"),
        ("linux", "386", "")]
    assert platform_vector("linux", "arm64", None)[1:] == [
        ("linux", "arm", "v8"), ("linux", "arm", "v7"), ("linux", "arm", "v6"),
        ("linux", "arm", "v5")]


def _push_image(client, repo, arch):
    cfg = json.dumps({"os": "linux", "architecture": arch,
                      "config": {"Cmd": [f"/bin/{arch}"]}}).encode()
    r = client.push_blob(repo, cfg)
    m = build_manifest(Descriptor(mt.OCI_CONFIG, r.digest, r.size), [])
    client.put_manifest(repo, m.digest, m)
    return m


def _entry(m, platform=None):
    return Descriptor(m.media_type, m.digest, len(m.data), platform=platform)


def _arch(client, repo, m):
    return json.loads(client.get_blob(repo, m.config().digest))["architecture"]


@pytest.mark.registry
def test_registry_index_without_platforms(registry):  # noqa: F811
    """A platformless entry listed first (a tool that wrote none for it) must not win
    over the node's own; alone, its config decides."""
    c = registry.client()
    arm, amd = _push_image(c, "p/a", "arm64"), _push_image(c, "p/a", "amd64")
    c.put_manifest("p/a", "first", build_index([_entry(arm), _entry(amd, _plat("linux/amd64"))]))
    m = resolve_manifest(c, "p/a", "first", os_name="linux", arch="amd64")
    assert _arch(c, "p/a", m) == "amd64"
    c.put_manifest("p/a", "alone", build_index([_entry(arm)]))
    assert _arch(c, "p/a", resolve_manifest(c, "p/a", "alone", arch="arm64")) == "arm64"
    with pytest.raises(CorruptImageError, match="not of linux/amd64"):
        resolve_manifest(c, "p/a", "alone", arch="amd64")


@pytest.mark.registry
def test_registry_nested_index(registry):  # noqa: F811
    """An index holding an index (was: 'nested index is not supported')."""
    c = registry.client()
    arm, amd = _push_image(c, "p/n", "arm64"), _push_image(c, "p/n", "amd64")
    inner = build_index([_entry(arm, _plat("linux/arm64")), _entry(amd, _plat("linux/amd64"))])
    c.put_manifest("p/n", inner.digest, inner)
    c.put_manifest("p/n", "v1", build_index([Descriptor(inner.media_type, inner.digest,
                                                       len(inner.data))]))
    for arch in ("amd64", "arm64"):
        assert _arch(c, "p/n", resolve_manifest(c, "p/n", "v1", arch=arch)) == arch
