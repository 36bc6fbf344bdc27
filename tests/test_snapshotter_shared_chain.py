"""Two images of the same layers in two repositories (a promotion copy: staging/app to
prod/app) share containerd's snapshot chain, so one bootstrap snapshot and one lazy
mount. The image first pulled goes (ctr image rm), then its repository goes from the
registry: the other image must still start, its lazy reads coming from a repository
that has them. Real containerd 1.6 (CRI pulls, `ctr run`), the real registry behind a
proxy that answers 404 for the deleted repository, the fanotify daemon with its
snapshotter inside."""

from __future__ import annotations

import re
import secrets

import pytest
from containerd_fixtures import (
    SNAPSHOTTER,
    busybox_layers,
    cri_pull,
    require_containerd,
    wait_for,
)
from nydus_fixtures import (
    CRI_NS,
    ctr_run,
    daemon_stack,
    force_gc,
    push_nydus,
    remove_images,
    snapshot_rows,
)
from registry_fixtures import FlakyProxy, registry  # noqa: F401
from test_daemon_support import require_lazy_kernel

pytestmark = [pytest.mark.root, pytest.mark.registry]


def _copy_image(client, src: str, dst: str, tag: str) -> None:
    """Copy repository src:tag to dst:tag, byte for byte (same digests)."""
    from erofs_tools.registry.manifest import Manifest
    m = client.get_manifest(src, tag)
    doc = m.json
    for d in [doc["config"], *doc["layers"]]:
        client.push_blob(dst, client.get_blob(src, d["digest"]), digest=d["digest"])
    client.put_manifest(dst, tag, Manifest(m.data, m.media_type, m.digest))


@pytest.mark.parametrize("mounted", ["no", "before", "running"])
def test_image_on_a_shared_chain_outlives_the_first_pullers_repository(registry,  # noqa: F811
                                                                       mounted):
    """`mounted`: "no", the image was never mounted before (the mount is made with the
    first puller's reference, 404); "before", a container of the first image mounted it
    (its reference no image names any more: mounted afresh); "running", one of them
    still runs on that mount (its blobs' caches, shared with the new mount, read through
    the second image's backend when the first's fails). Each failed (404 or EIO)."""
    require_containerd()
    require_lazy_kernel()
    tag = secrets.token_hex(3)
    proxy = FlakyProxy(registry.host)
    # the snapshotter asks this test's containerd which images stand on the chain
    with daemon_stack("snapshared-", (proxy.host,), cri_address=True,
                      after=(proxy,)) as (d, daemon, ctd):
        first = push_nydus(registry, f"staging{tag}", busybox_layers(), via=proxy.host)
        _copy_image(registry.client(), f"nydus/staging{tag}", f"nydus/prod{tag}", "1")
        second = f"{proxy.host}/nydus/prod{tag}:1"
        cri_pull(ctd.sock, first)
        rows = snapshot_rows(ctd)
        cri_pull(ctd.sock, second)
        assert snapshot_rows(ctd) == rows           # one chain for both images

        if mounted == "before":     # a container of the first image mounted it
            p = ctr_run(ctd, first, f"first-{tag}", "cat", "/etc/greeting")
            assert p.returncode == 0, p.stderr
        elif mounted == "running":
            ctd.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, first, f"long-{tag}",
                    "/bin/busybox", "sleep", "600", ns=CRI_NS)
        # the first image goes from the node (its tag and CRI's repo@digest name for it;
        # the image id, sha256:<config>, names both): the chain stays, held by the second
        names = ctd.ctr("image", "ls", "-q", ns=CRI_NS).stdout.decode().split()
        gone = [n for n in names if f"/nydus/staging{tag}" in n]
        assert first in gone and len(gone) == 2, names
        ctd.ctr("image", "rm", *gone, ns=CRI_NS)
        force_gc(ctd)
        assert snapshot_rows(ctd) == rows or mounted == "running"   # + the container's
        # ... and its repository from the registry
        proxy.match = re.compile(f"/v2/nydus/staging{tag}/")
        proxy.failures = [404] * 1_000_000
        # run_out: stdout through a bind-mounted file, not ctr's FIFOs (which can lose
        # a quick container's output under load)
        out = ctd.run_out("--snapshotter", SNAPSHOTTER, second, f"second-{tag}", "cat",
                          "/etc/greeting", "/etc/third", ns=CRI_NS)
        assert out == b"hello from layer two\nlayer three\n"
        st, mounts = daemon.api.request("GET", "/api/v1/mounts")
        assert st == 200 and [m["backend"] for m in mounts] == [f"registry:{second}"]
        if mounted == "running":
            ctd.ctr("task", "kill", "-s", "SIGKILL", f"long-{tag}", ns=CRI_NS)
            wait_for(lambda: b"RUNNING" not in ctd.ctr("task", "ls", ns=CRI_NS).stdout,
                     30, "task stopped")
            ctd.ctr("task", "rm", "-f", f"long-{tag}", ns=CRI_NS, check=False)
            ctd.ctr("container", "rm", f"long-{tag}", ns=CRI_NS)

        remove_images(ctd)
        daemon.wait_snapshots_removed()
        assert daemon.lazy_mounts() == []


def test_names_on_chain_follow_containerds_gc_labels():
    """The images found for a chain: a manifest's and an index's (through its manifest
    label), not an image of another chain; CRI's config-digest names are no reference."""
    from fscache_daemon.snapshotter.imagerefs import names_on_chain, registry_refs
    chain, other = "sha256:" + "c" * 64, "sha256:" + "d" * 64
    labels = {
        "cfg1": {"containerd.io/gc.ref.snapshot.erofs": chain},
        "cfg2": {"containerd.io/gc.ref.snapshot.erofs": other},
        "man1": {"containerd.io/gc.ref.content.config": "cfg1",
                 "containerd.io/gc.ref.content.l.0": "layer"},
        "man2": {"containerd.io/gc.ref.content.config": "cfg2"},
        "idx1": {"containerd.io/gc.ref.content.m.0": "man2",
                 "containerd.io/gc.ref.content.m.1": "man1"},
    }
    images = [("reg.test/a:1", "man1"), ("reg.test/b:1", "idx1"), ("reg.test/c:1", "man2"),
              ("sha256:" + "e" * 64, "man1"), ("reg.test/gone:1", "nothing")]
    names = names_on_chain(labels, images, chain)
    assert names == ["reg.test/a:1", "reg.test/b:1", "sha256:" + "e" * 64]
    assert registry_refs(names) == ["reg.test/a:1", "reg.test/b:1"]
    assert names_on_chain(labels, images, "sha256:" + "0" * 64) == []
