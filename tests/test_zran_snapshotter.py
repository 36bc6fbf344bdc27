"""A gzip image indexed with `convert --oci-ref` (zran, docs/zran.md), pulled through
containerd's CRI plugin from the real docker-registry and run with `ctr run` on the
snapshotter: containerd downloads none of the original gzip layers (only the bootstrap
layer; at its commit the daemon fetches the layers' meta blobs for the coming mount), the
container's rootfs is an overlay on the daemon's lazy mount, which reads the
layers by range from their access points; a file nobody read is not fetched."""

from __future__ import annotations

import hashlib
import os

import pytest
from containerd_fixtures import (
    SNAPSHOTTER,
    OciImage,
    cri_pull,
    require_containerd,
)
from nydus_fixtures import (
    BUSYBOX_EXPECTED,
    BUSYBOX_SCRIPT,
    CRI_NS,
    busybox_with_file,
    convert,
    separate_stack,
)
from registry_fixtures import registry  # noqa: F401
from test_daemon_support import require_lazy_kernel

pytestmark = [pytest.mark.root, pytest.mark.registry]


def test_zran_image_runs_lazily(registry, tmp_path):  # noqa: F811
    require_containerd()
    require_lazy_kernel()
    with separate_stack("snapzran-", registry) as st:
        daemon, ctd, root = st.daemon, st.ctd, st.root
        layers, big = busybox_with_file(4 << 20)
        image = OciImage(layers, ["/bin/sh"], gzipped=True)
        image.push(registry.client(), "src/zbusy", "1")
        src_manifest = registry.client().get_manifest("src/zbusy", "1").data
        ref = f"{registry.host}/zran/zbusy:1"
        convert(f"{registry.host}/src/zbusy:1", ref, "--oci-ref")
        assert registry.client().get_manifest("src/zbusy", "1").data == src_manifest

        cri_pull(ctd.sock, ref)
        content = [line.split()[0] for line in
                   ctd.ctr("content", "ls", ns=CRI_NS).stdout.decode().splitlines()[1:]]
        manifest = registry.client().get_manifest("zran/zbusy", "1").json
        src_layers = [x["digest"] for x in
                      registry.client().get_manifest("src/zbusy", "1").json["layers"]]
        gz = [x["digest"] for x in manifest["layers"][:len(src_layers)]]
        assert gz == src_layers                      # the original layers, by digest
        assert all(x["annotations"]["containerd.io/snapshot/nydus-blob"] == "true"
                   for x in manifest["layers"][:-1])
        assert not any(b in content for b in gz), content
        assert manifest["layers"][-1]["digest"] in content
        # the bootstrap layer's commit had the daemon fetch and parse the meta blobs
        # (zranwarm.py); the container's lazy mount takes them below
        assert daemon.metrics()["zran_warm"]["started"] == len(gz)

        out = ctd.run_out("--snapshotter", SNAPSHOTTER, ref, "zran1",
                          "/bin/sh", "-c", BUSYBOX_SCRIPT, ns=CRI_NS)
        assert out == BUSYBOX_EXPECTED
        warm = daemon.metrics()["zran_warm"]
        assert (warm["taken"], warm["failed"], warm["held"]) == (len(gz), 0, 0), warm
        lazy = os.path.join(root, "lazy")
        (mp,) = [os.path.join(lazy, n) for n in os.listdir(lazy)]
        assert os.path.ismount(mp)
        per_blob = {k: b["bytes_fetched"] for k, b in daemon.metrics()["blobs"].items()}
        big_layer = gz[-1].split(":", 1)[1]
        assert per_blob.get(big_layer, 0) == 0, per_blob     # nobody read /data/big yet
        out = ctd.run_out("--snapshotter", SNAPSHOTTER, ref, "zran2",
                          "/bin/busybox", "sha256sum", "/data/big", ns=CRI_NS)
        assert out.split()[0].decode() == hashlib.sha256(big).hexdigest()
        assert daemon.metrics()["blobs"][big_layer]["bytes_fetched"] >= 4 << 20


def test_source_image_after_its_zran_index_is_whole(registry, tmp_path):  # noqa: F811
    """SRC pulled after its zran index DST, on the same snapshotter: DST's gzip layers
    are committed as empty Nydus data-blob snapshots, so DST must not give them SRC's
    chain IDs (diff_ids), or containerd takes those empty snapshots for SRC's unpacked
    layers and SRC's containers run on an empty rootfs."""
    require_containerd()
    require_lazy_kernel()
    import json
    with separate_stack("snapzsrc-", registry) as st:
        ctd = st.ctd
        layers, _big = busybox_with_file(1 << 20)
        image = OciImage(layers, ["/bin/sh"], gzipped=True)
        image.push(registry.client(), "src/zboth", "1")
        src = f"{registry.host}/src/zboth:1"
        ref = f"{registry.host}/zran/zboth:1"
        convert(src, ref, "--oci-ref")
        c = registry.client()
        src_ids = json.loads(c.get_blob("src/zboth", c.get_manifest(
            "src/zboth", "1").json["config"]["digest"]))["rootfs"]["diff_ids"]
        dst_ids = json.loads(c.get_blob("zran/zboth", c.get_manifest(
            "zran/zboth", "1").json["config"]["digest"]))["rootfs"]["diff_ids"]
        assert not set(src_ids) & set(dst_ids), (src_ids, dst_ids)
        cri_pull(ctd.sock, ref)
        assert ctd.run_out("--snapshotter", SNAPSHOTTER, ref, "zsrc1", "/bin/sh", "-c",
                           BUSYBOX_SCRIPT, ns=CRI_NS) == BUSYBOX_EXPECTED
        cri_pull(ctd.sock, src)
        assert ctd.run_out("--snapshotter", SNAPSHOTTER, src, "zsrc2", "/bin/sh", "-c",
                           BUSYBOX_SCRIPT, ns=CRI_NS) == BUSYBOX_EXPECTED


def _old_style_index(registry, dst_repo, src_repo):  # noqa: F811
    """DST re-published with SRC's diff_ids (what convert --oci-ref wrote before its
    gzip layers got their own digests as diff_ids): -> its reference."""
    import json

    from erofs_tools.registry import Descriptor, build_manifest
    c = registry.client()
    m = c.get_manifest(dst_repo, "1")
    cfg = json.loads(c.get_blob(dst_repo, m.config().digest))
    src_ids = json.loads(c.get_blob(src_repo, c.get_manifest(src_repo, "1").config().digest)
                         )["rootfs"]["diff_ids"]
    cfg["rootfs"]["diff_ids"][:len(src_ids)] = src_ids
    data = json.dumps(cfg).encode()
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    c.push_blob(dst_repo, data, digest=d)
    old = build_manifest(Descriptor(m.config().media_type, d, len(data)), m.layers())
    c.put_manifest(dst_repo, "old", old)
    return f"{registry.host}/{dst_repo}:old"


def test_image_on_empty_blob_layers_is_refused_not_run_empty(registry, tmp_path):  # noqa: F811
    """An index converted the old way shares SRC's chain IDs; SRC pulled after it finds
    its layers committed empty (Nydus data blobs). Its container is refused with the
    cause named, not started on an empty rootfs."""
    require_containerd()
    require_lazy_kernel()
    with separate_stack("snapzold-", registry) as st:
        ctd = st.ctd
        layers, _big = busybox_with_file(1 << 20)
        OciImage(layers, ["/bin/sh"], gzipped=True).push(registry.client(), "src/zold", "1")
        src = f"{registry.host}/src/zold:1"
        convert(src, f"{registry.host}/zran/zold:1", "--oci-ref")
        old = _old_style_index(registry, "zran/zold", "src/zold")
        cri_pull(ctd.sock, old)
        assert ctd.run_out("--snapshotter", SNAPSHOTTER, old, "zold1", "/bin/sh", "-c",
                           BUSYBOX_SCRIPT, ns=CRI_NS) == BUSYBOX_EXPECTED
        cri_pull(ctd.sock, src)
        with pytest.raises(AssertionError, match="Nydus data-blob layer"):
            ctd.run_out("--snapshotter", SNAPSHOTTER, src, "zold2", "/bin/sh", "-c",
                        BUSYBOX_SCRIPT, ns=CRI_NS)
