"""A lazy mount that is mounted but that the daemon does not serve is never handed to a
new container. After a daemon restart a mount may be mounted and not served: *unpicked*
(restore.py: its registry refused the restart, tried again later) or unknown to the
daemon (its record could not be taken back at all). The snapshotter asks the daemon
(GET /api/v1/mounts, /api/v1/daemon): an unpicked one fails the container's Prepare with
the daemon's reason until it is picked up; an unknown one is detached and the image is
mounted afresh. Real containerd 1.6 (CRI pull, `ctr run`), the real registry behind a
proxy that refuses on command, the fanotify daemon with its snapshotter inside."""

from __future__ import annotations

import glob
import json
import os
import secrets

import pytest
from containerd_fixtures import (
    SNAPSHOTTER,
    busybox_layers,
    cri_pull,
    require_containerd,
    wait_for,
)
from nydus_fixtures import CRI_NS, ctr_run, daemon_stack, push_nydus, remove_images
from registry_fixtures import FlakyProxy, registry  # noqa: F401
from test_daemon_support import require_lazy_kernel

pytestmark = [pytest.mark.root, pytest.mark.registry]


def _state(daemon) -> tuple[list[str], list[dict]]:
    """(the mount points the daemon serves, its unpicked list)."""
    st, mounts = daemon.api.request("GET", "/api/v1/mounts")
    assert st == 200, mounts
    st, info = daemon.api.request("GET", "/api/v1/daemon")
    assert st == 200, info
    return [m["mountpoint"] for m in mounts], info["unpicked"]


@pytest.mark.parametrize("case", ["unpicked", "unknown"])
def test_a_mount_the_daemon_does_not_serve_is_not_handed_out(registry, case):  # noqa: F811
    require_containerd()
    require_lazy_kernel()
    tag = secrets.token_hex(3)
    proxy = FlakyProxy(registry.host)
    with daemon_stack("snapunserved-", (proxy.host,), after=(proxy,)) as (d, daemon, ctd):
        ref = push_nydus(registry, f"unserved{case}", busybox_layers(), via=proxy.host)
        cri_pull(ctd.sock, ref)
        out = ctd.run_out("--snapshotter", SNAPSHOTTER, ref, f"first-{tag}", "cat",
                          "/etc/greeting", ns=CRI_NS)
        assert out == b"hello from layer two\n"
        (lazy,) = daemon.lazy_mounts()
        assert _state(daemon) == ([lazy], [])

        # restarted without what it needs to take the mount back: the chunk maps gone
        # and the registry refusing (unpicked), or the bootstrap copy gone (unknown)
        daemon.stop()
        assert os.path.ismount(lazy)
        if case == "unpicked":
            for f in glob.glob(os.path.join(daemon.cache_dir, "blobs", "*.map")):
                os.unlink(f)
            proxy.failures = [404] * 1_000_000
        else:
            (boot,) = [m["bootstrap"] for m in _mounts_json(daemon)]
            os.unlink(boot)
        daemon.start()
        assert os.path.ismount(lazy)
        # containerd's proxy client redials the restarted snapshotter (backoff <= 3 s)
        wait_for(lambda: ctd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls",
                                 ns=CRI_NS, check=False).returncode == 0, 30,
                 "containerd talking to the restarted snapshotter")
        if case == "unpicked":
            served, unpicked = _state(daemon)
            assert served == [] and [u["mountpoint"] for u in unpicked] == [lazy]
            # the container's Prepare fails, naming the mount and the daemon's reason
            # (it was handed the mount nobody serves: a read of data not fetched before
            # the restart failed with EIO, `cat: read error: Input/output error`)
            p = ctr_run(ctd, ref, f"while-unpicked-{tag}", "cat", "/etc/third")
            assert p.returncode != 0, p.stdout
            err = p.stderr.decode()
            assert "not served by the daemon" in err and lazy in err, err
            assert unpicked[0]["error"][:40] in err, (err, unpicked)
            # the registry answers again: the daemon takes the mount back, and the
            # next container runs on it
            proxy.failures = []
            wait_for(lambda: _state(daemon) == ([lazy], []), 120,
                     "the mount taken back", log=daemon.log_path)
        else:
            assert _state(daemon) == ([], [])
        # run_out: stdout through a bind-mounted file (ctr's FIFO copy can lose a quick
        # container's whole output under load while it exits 0: seen in CI here)
        out = ctd.run_out("--snapshotter", SNAPSHOTTER, ref, f"after-{tag}", "cat",
                          "/etc/greeting", "/etc/third", ns=CRI_NS)
        assert out == b"hello from layer two\nlayer three\n"
        # one mount of the image, served: the unknown one was detached, then mounted anew
        assert daemon.lazy_mounts() == [lazy]
        assert _state(daemon) == ([lazy], [])

        remove_images(ctd)
        daemon.wait_snapshots_removed()
        assert daemon.lazy_mounts() == [] and _state(daemon) == ([], [])


def _mounts_json(daemon) -> list[dict]:
    with open(os.path.join(daemon.cache_dir, "mounts.json")) as f:
        return json.load(f)["mounts"]
