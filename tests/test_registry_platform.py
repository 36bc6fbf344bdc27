"""Which manifest of an index a --platform picks: the variant counts, as in containerd's
platform matcher (an entry without one is of its architecture's default: arm v7, arm64
v8, amd64 v1), rather than the first entry of the OS and architecture in index order."""

from __future__ import annotations

import json

import pytest

from erofs_tools.registry import mediatypes as mt
from erofs_tools.registry.convert import SourceImage
from erofs_tools.registry.manifest import Descriptor, build_index, build_manifest
from erofs_tools.registry.oci_layout import OciLayout


def _layout(path, entries):
    """An OCI layout tagged v1: an index of one (empty) image per (arch, variant)."""
    layout = OciLayout(str(path), create=True)
    descs = []
    for arch, variant in entries:
        cfg = json.dumps({"os": "linux", "architecture": arch,
                          **({"variant": variant} if variant else {})}).encode()
        c = layout.write_blob(cfg)
        m = build_manifest(Descriptor(mt.OCI_CONFIG, c.digest, c.size), [])
        layout.write_blob(m.data, m.digest)
        plat = {"os": "linux", "architecture": arch, **({"variant": variant} if variant else {})}
        descs.append(Descriptor(m.media_type, m.digest, len(m.data), platform=plat))
    layout.put_manifest(build_index(descs), "v1")
    return f"oci:{path}:v1"


@pytest.mark.parametrize("entries,platform,picked", [
    # an index listing v7 before v6: a v6 CPU cannot run the v7 binaries
    ([("arm", "v7"), ("arm", "v6")], "linux/arm/v6", ("arm", "v6")),
    ([("arm", "v6"), ("arm", "v7")], "linux/arm/v7", ("arm", "v7")),
    # the baseline amd64 image, not an x86-64-v3 build listed first
    ([("amd64", "v3"), ("amd64", None)], "linux/amd64", ("amd64", None)),
    ([("amd64", "v3"), ("amd64", "v1")], "linux/amd64", ("amd64", "v1")),
    # a missing variant is the architecture's default
    ([("arm", "v6"), ("arm", None)], "linux/arm/v7", ("arm", None)),
    ([("arm64", "v9"), ("arm64", None)], "linux/arm64", ("arm64", None)),
    # no entry of that variant: the first of the architecture, as before
    ([("arm", "v6"), ("arm", "v5")], "linux/arm/v7", ("arm", "v6")),
])
def test_index_entry_by_variant(tmp_path, entries, platform, picked):
    ref = _layout(tmp_path / "layout", entries)
    src = SourceImage(ref, platform=platform)
    try:
        got = src.index_entry.platform
        assert (got["architecture"], got.get("variant")) == picked
        cfg = json.loads(src.config)
        assert (cfg["architecture"], cfg.get("variant")) == picked
    finally:
        src.close()
