"""The labels rpull passes on a layer's Prepare: the layer's own `containerd.io/snapshot/`
annotations (the image author's), and the snapshotter's options, which only rpull's
command line may set."""

from __future__ import annotations

import pytest

from erofs_tools.registry import mediatypes as mt
from erofs_tools.registry.manifest import Descriptor
from fscache_daemon.errors import ContainerdError
from fscache_daemon.rpull import _Puller
from fscache_daemon.snapshotter import nydus


class _PrepareOnly:
    """containerd's API as far as a layer's Prepare: its labels recorded, then refused."""

    def __init__(self) -> None:
        self.labels: list[dict[str, str]] = []

    def lease_snapshot(self, snapshotter: str, key: str) -> None:
        pass

    def stat(self, snapshotter: str, key: str) -> bool:
        return False

    def prepare(self, snapshotter: str, key: str, parent: str,
                labels: dict[str, str]) -> list:
        self.labels.append(dict(labels))
        raise ContainerdError("stopped by the test", "INVALID_ARGUMENT")


@pytest.mark.parametrize("plain_http", [False, True])
def test_layer_annotations_cannot_set_the_snapshotters_options(plain_http):
    """A bootstrap layer annotated `fscache-daemon.plain-http: "true"`: without
    `--insecure` the Prepare must not carry it, or the image's lazy reads (with the
    registry's credentials) go over plain HTTP because the image says so. rpull copied
    every `containerd.io/snapshot/` annotation, the snapshotter's own labels too, and
    only ever added them."""
    layer = Descriptor(mt.OCI_LAYER_TAR_GZIP, "sha256:" + "a" * 64, 100,
                       {mt.ANNOTATION_NYDUS_BOOTSTRAP: "true",
                        nydus.PLAIN_HTTP_LABEL: "true",
                        nydus.MOUNT_EARLY_LABEL: "true",
                        "containerd.io/snapshot/other": "kept"})
    ctd = _PrepareOnly()
    p = _Puller(ctd, None, "app", "registry.test/app:1", "erofs",  # type: ignore[arg-type]
                mount_early=False, plain_http=plain_http)
    with pytest.raises(ContainerdError, match="stopped by the test"):
        p.unpack(0, layer, [layer], "sha256:" + "m" * 64, ["sha256:" + "c" * 64],
                 ["sha256:" + "d" * 64])
    (labels,) = ctd.labels
    assert labels.get(nydus.PLAIN_HTTP_LABEL) == ("true" if plain_http else None)
    assert nydus.MOUNT_EARLY_LABEL not in labels
    assert labels[mt.ANNOTATION_NYDUS_BOOTSTRAP] == "true"
    assert labels["containerd.io/snapshot/other"] == "kept"
