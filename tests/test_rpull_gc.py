"""`fscache-daemon rpull` against containerd's garbage collector: a layer rpull finds
already present (another image's chain) must be kept by rpull's lease until the new
image's config refers to it. containerd's collection is made to run at the worst moment
through a hook on rpull's containerd client: right after rpull saw the image's top
snapshot present, the other image goes and a full collection runs (what kubelet's image
GC removing an old tag while a new tag of the same layers is pulled can do)."""

from __future__ import annotations

import json

import pytest
from containerd_fixtures import SNAPSHOTTER, busybox_layers, require_containerd, wait_for
from nydus_fixtures import push_nydus
from registry_fixtures import registry  # noqa: F401
from test_daemon_support import require_lazy_kernel
from test_rpull import daemon_and_containerd, gc, rpull, snapshot_rows

pytestmark = [pytest.mark.root, pytest.mark.registry]


def test_present_chain_survives_a_collection_during_rpull(registry, monkeypatch):  # noqa: F811
    require_containerd()
    require_lazy_kernel()
    from erofs_tools.registry.manifest import Manifest
    from fscache_daemon import rpull as rpull_mod
    from fscache_daemon.containerd import ContainerdClient

    with daemon_and_containerd("rpullgc-") as (_d, daemon, ctd, _root):
        old = push_nydus(registry, "gcrace", busybox_layers())
        client = registry.client()
        m = client.get_manifest("nydus/gcrace", "1")
        client.put_manifest("nydus/gcrace", "2", Manifest(m.data, m.media_type, m.digest))
        new = old.rsplit(":", 1)[0] + ":2"      # the same layers under another tag
        p = rpull(ctd, old, "--json")
        assert p.returncode == 0, p.stderr
        top = json.loads(p.stdout)["chain_id"]
        rows = snapshot_rows(ctd)
        assert len(rows) >= 2, rows

        fired: list[str] = []
        stat = ContainerdClient.stat

        def stat_then_collect(self, snapshotter: str, key: str) -> bool:
            found = stat(self, snapshotter, key)
            if found and key == top and not fired:
                # rpull of `new` saw the whole chain present: the old image goes now
                fired.append(key)
                ctd.ctr("image", "rm", old)
                gc(ctd)
            return found

        monkeypatch.setattr(ContainerdClient, "stat", stat_then_collect)
        res = rpull_mod.rpull(new, ctd.sock, ctd.namespace, SNAPSHOTTER)
        monkeypatch.undo()
        assert fired == [top], "the hook did not run"
        assert res["present_layers"] == len(rows), res
        assert ctd.ctr("image", "ls", "-q").stdout.decode().split() == [new]
        # rpull's lease kept the chain until the config's gc.ref.snapshot label did;
        # without it the collection took the whole chain and the image named a missing chain
        assert snapshot_rows(ctd) == rows
        gc(ctd)
        assert snapshot_rows(ctd) == rows
        out = ctd.run_out("--snapshotter", SNAPSHOTTER, new, "after-gc",
                          "cat", "/etc/greeting")
        assert out == b"hello from layer two\n"
        ctd.ctr("image", "rm", "--sync", new)
        wait_for(lambda: snapshot_rows(ctd) == [], 60, "snapshots removed",
                 log=daemon.log_path)
