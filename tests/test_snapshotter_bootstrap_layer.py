"""A Nydus bootstrap layer's content is the image author's: what its Commit accepts as
the bootstrap the daemon then mounts must be a file of the layer itself."""

from __future__ import annotations

import os

import grpc
import pytest
from test_daemon_support import pack
from test_snapshotter_service import (
    _RecordingDaemonAPI,
    code_of,
    nydus_service,
    prepare_blob_layer,
)

pytestmark = pytest.mark.root

BOOT = {"containerd.io/snapshot/nydus-bootstrap": "true",
        "containerd.io/snapshot/cri.image-ref": "registry.test/app:1"}


@pytest.mark.parametrize("link", ["image", "image/image.boot"])
def test_bootstrap_reached_through_a_symlink_in_the_layer_is_refused(tmp_path, link):
    """A layer whose `image` directory (or `image/image.boot`) is a symlink to a host
    path: containerd applies it as it is (a symlink is resolved inside the container's
    root, never on the host), but the snapshotter resolved it on the host, and the
    daemon was asked to read and mount whatever host file it names (another image's
    bootstrap under ROOT/snapshots/, whose cached blobs the hostile image's container
    would then read). Only the final component was checked for a symlink."""
    outside = tmp_path / "host-dir"
    outside.mkdir()
    src = tmp_path / "src"
    src.mkdir()
    (src / "secret").write_bytes(b"another image's file\n")
    pack(str(src), str(outside / "image.boot"), str(tmp_path / "blobs"))
    with nydus_service(tmp_path, _RecordingDaemonAPI) as (c, api):
        target = "sha256:" + "1" * 64
        prepare_blob_layer(c, "extract-1 " + target, target)
        (blob,) = c.walk()
        (m,) = c.prepare("boot", blob.name, BOOT)
        upper = dict(o.split("=", 1) for o in m.options if "=" in o)["upperdir"]
        if link == "image":
            os.symlink(str(outside), os.path.join(upper, "image"))
        else:
            os.mkdir(os.path.join(upper, "image"))
            os.symlink(str(outside / "image.boot"), os.path.join(upper, link))
        with pytest.raises(grpc.RpcError) as ei:
            c.commit("boot-c", "boot")
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "image/image.boot" in ei.value.details()
        assert str(outside) not in ei.value.details()
        assert api.posts == []             # the daemon was never pointed at it
        assert code_of(c.stat, "boot-c") == grpc.StatusCode.NOT_FOUND
        c.remove("boot")


def test_plain_http_label_is_taken_from_rpull_only(tmp_path):
    """containerd's CRI pull passes every `containerd.io/snapshot/` annotation of a layer
    as a label, so the image's author can write the plain-http label too: the
    snapshotter then asked the daemon for plain HTTP to the image's registry (its
    credentials in clear to whoever is on the path) because the image said so. Only a
    Prepare by `fscache-daemon rpull --insecure` (its extraction key, which containerd
    passes as the client chose it and no image can) may ask for it."""
    from fscache_daemon import rpull
    from fscache_daemon.snapshotter import nydus
    with nydus_service(tmp_path, _RecordingDaemonAPI) as (c, api):
        target = "sha256:" + "1" * 64
        prepare_blob_layer(c, "extract-1 " + target, target)
        (blob,) = c.walk()
        labels = dict(BOOT, **{nydus.PLAIN_HTTP_LABEL: "true"})
        cid = "sha256:" + "2" * 64
        keys = {"cri": f"k8s.io/7/extract-123-AbC_= {cid}",
                "rpull": f"default/8/{rpull.extraction_key(cid)}"}
        for who, key in keys.items():
            (m,) = c.prepare(key, blob.name, labels)
            upper = dict(o.split("=", 1) for o in m.options if "=" in o)["upperdir"]
            os.mkdir(os.path.join(upper, "image"))
            src = tmp_path / f"src-{who}"
            src.mkdir()
            (src / "f").write_bytes(b"x" * 10000)
            pack(str(src), os.path.join(upper, "image", "image.boot"),
                 str(tmp_path / f"blobs-{who}"))
            c.commit(f"boot-{who}", key)
        warms = [body for route, body in api.posts if route == "/api/v1/warm"]
        assert [w["options"] for w in warms] == [{}, {"insecure": True}]
        for who in keys:
            c.remove(f"boot-{who}")
