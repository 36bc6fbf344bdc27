"""Nydus images through the snapshotter: an image converted by `erofs-tools convert`,
pulled through containerd's CRI plugin (kubelet's PullImage) from the real
docker-registry, runs with `ctr run`: the blob layers are never downloaded by
containerd, the container's rootfs is an overlay on the daemon's lazy mount, and the
lazy mount goes when the last snapshot on it goes."""

from __future__ import annotations

import hashlib
import os
import time

import pytest
from containerd_fixtures import (
    SNAPSHOTTER,
    OciImage,
    cri_pull,
    require_containerd,
    wait_for,
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


def test_nydus_image_runs_lazily(registry, tmp_path):  # noqa: F811
    require_containerd()
    require_lazy_kernel()
    with separate_stack("snapnyd-", registry, keep_log=os.environ.get("SNAP_KEEP_LOG")) as st:
        daemon, snap, ctd, root = st.daemon, st.snap, st.ctd, st.root
        layers, big = busybox_with_file(8 << 20)
        image = OciImage(layers, ["/bin/sh"], gzipped=True)
        image.push(registry.client(), "src/busybox", "1")
        ref = f"{registry.host}/nydus/busybox:1"
        convert(f"{registry.host}/src/busybox:1", ref)

        t0 = time.monotonic()
        cri_pull(ctd.sock, ref)
        t_pull = time.monotonic() - t0
        # containerd's content store holds the bootstrap layer, no data blob
        content = [line.split()[0] for line in
                   ctd.ctr("content", "ls", ns=CRI_NS).stdout.decode().splitlines()[1:]]
        manifest = registry.client().get_manifest("nydus/busybox", "1").json
        blobs = [x["digest"] for x in manifest["layers"]
                 if x.get("annotations", {}).get("containerd.io/snapshot/nydus-blob")]
        assert len(blobs) == 4
        big_blob = blobs[3].split(":", 1)[1]
        assert not any(b in content for b in blobs), content
        assert manifest["layers"][-1]["digest"] in content
        rows = ctd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls",
                       ns=CRI_NS).stdout.decode().splitlines()[1:]
        assert len(rows) == 5 and all(r.split()[-1] == "Committed" for r in rows)

        t0 = time.monotonic()
        out = ctd.run_out("--snapshotter", SNAPSHOTTER, ref, "lazy1",
                      "/bin/sh", "-c", BUSYBOX_SCRIPT, ns=CRI_NS)
        t_run = time.monotonic() - t0
        assert out == BUSYBOX_EXPECTED  # no /image: the bootstrap layer's files stay hidden
        lazy = os.path.join(root, "lazy")
        (mp,) = [os.path.join(lazy, n) for n in os.listdir(lazy)]
        assert os.path.ismount(mp)
        per_blob = {k: b["bytes_fetched"] for k, b in daemon.metrics()["blobs"].items()}
        fetched = sum(per_blob.values())
        # busybox ran (about 1 MiB compressed); the 8 MiB file nobody read was not fetched
        assert 0 < fetched <= 2 << 20 and per_blob[big_blob] == 0, per_blob
        out = ctd.run_out("--snapshotter", SNAPSHOTTER, ref, "reader",
                      "/bin/busybox", "sha256sum", "/data/big", ns=CRI_NS)
        assert out.split()[0].decode() == hashlib.sha256(big).hexdigest()
        big_fetched = daemon.metrics()["blobs"][big_blob]["bytes_fetched"]
        assert (8 << 20) <= big_fetched <= (8 << 20) + (1 << 20)
        # a container keeps running on the lazy mount while the snapshotter is SIGKILLed
        ctd.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, ref, "long", "/bin/busybox", "sleep",
                "600", ns=CRI_NS)
        snap.kill()
        snap.start()

        def answers() -> bool:
            p = ctd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "mounts", "/tmp/x",
                        "long", check=False, ns=CRI_NS)
            return p.returncode == 0 and mp.encode() in p.stdout
        wait_for(answers, 60, "containerd talking to the restarted snapshotter")
        # after the restart a second container shares the same lazy mount
        out = ctd.run_out("--snapshotter", SNAPSHOTTER, ref, "lazy2",
                      "/bin/sh", "-c", BUSYBOX_SCRIPT, ns=CRI_NS)
        assert out == BUSYBOX_EXPECTED
        assert os.listdir(lazy) == [os.path.basename(mp)]
        out = ctd.ctr("task", "exec", "--exec-id", "e1", "long", "cat", "/etc/third",
                      ns=CRI_NS).stdout
        assert out == b"layer three\n"
        ctd.ctr("task", "kill", "-s", "SIGKILL", "long", ns=CRI_NS)
        wait_for(lambda: b"RUNNING" not in ctd.ctr("task", "ls", ns=CRI_NS).stdout, 30,
                 "task stopped")
        ctd.ctr("task", "rm", "-f", "long", ns=CRI_NS)
        ctd.ctr("container", "rm", "long", ns=CRI_NS)
        assert os.path.ismount(mp)  # no container left, but the image keeps it warm

        # CRI records the image under its tag, its repo digest and its id: remove them all
        names = ctd.ctr("image", "ls", "-q", ns=CRI_NS).stdout.decode().split()
        assert ref in names
        ctd.ctr("image", "rm", "--sync", *names, ns=CRI_NS)
        wait_for(lambda: os.listdir(os.path.join(root, "snapshots")) == [], 60,
                 "snapshots removed", log=snap.log)
        assert not os.path.exists(mp) or not os.path.ismount(mp)
        st, mounts = daemon.api.request("GET", "/api/v1/mounts")
        assert st == 200 and mounts == []
        print(f"CRI pull {t_pull:.2f}s, first lazy run {t_run:.2f}s, "
              f"{fetched} blob bytes fetched for it, {big_fetched} for the 8 MiB file")
