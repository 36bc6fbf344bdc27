"""rpull's pure parts: chain ids, the cri.image-layers label, the config's diff ids
(the containerd round trip is tests/test_rpull.py)."""

from __future__ import annotations

import json

import pytest
from containerd_fixtures import OciImage, busybox_layers

from erofs_tools.errors import CorruptImageError
from erofs_tools.registry.manifest import Descriptor
from fscache_daemon.rpull import IMAGE_LAYERS_LABEL, MAX_LABEL, _diff_ids, _image_layers, chain_ids


def test_chain_ids_match_the_oci_rule():
    image = OciImage(busybox_layers(), ["/bin/sh"])
    diff_ids = json.loads(image.blobs[json.loads(image.manifest)["config"]["digest"]]
                          )["rootfs"]["diff_ids"]
    assert chain_ids(diff_ids) == image.chain
    assert chain_ids(diff_ids[:1]) == diff_ids[:1]


def test_image_layers_label_fits_containerds_limit():
    layers = [Descriptor("application/vnd.oci.image.layer.v1.tar", f"sha256:{i:064x}", 1)
              for i in range(100)]
    value = _image_layers(layers)
    assert len(IMAGE_LAYERS_LABEL) + len(value) <= MAX_LABEL
    parts = value.split(",")
    assert parts == [d.digest for d in layers[:len(parts)]] and 40 < len(parts) < 100
    assert _image_layers(layers[:2]) == f"{layers[0].digest},{layers[1].digest}"


@pytest.mark.parametrize("config, why", [
    (b"not json", "no rootfs.diff_ids"),
    (b'{"rootfs": {}}', "no rootfs.diff_ids"),
    (b'{"rootfs": {"diff_ids": ["sha256:12"]}}', "bad rootfs.diff_ids"),
    (b'{"rootfs": {"diff_ids": []}}', "1 layers but 0 diff ids"),
])
def test_bad_config_is_one_line(config, why):
    with pytest.raises(CorruptImageError, match=why) as e:
        _diff_ids(config, 1, "example/img:1")
    assert "\n" not in str(e.value) and "example/img:1" in str(e.value)
