"""Lazy mounts of different images are made side by side: image A's registry holds
every blob read (the daemon cannot open A's blobs), and a container of image B starts
meanwhile, on its own lazy mount, through real containerd 1.6 and `fscache-daemon run
--snapshotter-socket`. Once A's registry answers, A's container runs too.

    EROFS_TOOLS_CI=1 python -m pytest -q -s tests/test_snapshotter_parallel_mounts.py
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from containerd_fixtures import (
    SNAPSHOTTER,
    busybox_layers,
    cri_pull,
    require_containerd,
    wait_for,
)
from nydus_fixtures import CRI_NS, daemon_stack, push_nydus, remove_images, snapshot_rows
from registry_fixtures import FlakyProxy, registry  # noqa: F401
from test_daemon_support import require_lazy_kernel

pytestmark = [pytest.mark.root, pytest.mark.registry]

# how long the test waits for B's container while A's mount waits (a start takes
# 0.3-3.5 s here, under load). A's reads are held until release() (and its fetch deadline
# is 600 s), so what is proved is structural: B's container ran while A's was still
# held (asserted below); the bound only ends a hang, and 60 s was one a CI's load could
# break. Before, mounts were made one at a time and B waited for A's registry; the two
# images share their busybox blob, whose chunk map B reads from its own registry
B_BOUND = 300.0


def test_a_slow_registry_does_not_hold_up_another_images_mount(registry):  # noqa: F811
    require_containerd()
    require_lazy_kernel()
    proxy = FlakyProxy(registry.host, match=r"^GET /v2/nydus/slowa/blobs/")
    pool = ThreadPoolExecutor(2)
    with daemon_stack("snappar-", (registry.host, proxy.host),
                      extra=("--fetch-deadline", "600"),
                      before=(proxy.release, lambda: pool.shutdown(wait=False, cancel_futures=True)),
                      after=(proxy,)) as (d, daemon, ctd):
        try:
            ref_a = push_nydus(registry, "slowa", busybox_layers(b"image A\n"), via=proxy.host)
            ref_b = push_nydus(registry, "fastb", busybox_layers(b"image B\n"))
            cri_pull(ctd.sock, ref_a)
            cri_pull(ctd.sock, ref_b)
            assert daemon.lazy_mounts() == []

            def run(ref: str, cid: str) -> tuple[bytes, float]:
                t0 = time.monotonic()
                out = ctd.run_out("--snapshotter", SNAPSHOTTER, ref, cid, "/bin/sh", "-c",
                                  "cat /etc/greeting", ns=CRI_NS, timeout=600)
                return out, time.monotonic() - t0

            # from now on every read of A's blobs waits until release()
            proxy.failures = ["hold"] * 10_000
            fut_a = pool.submit(run, ref_a, "par-a")
            wait_for(lambda: proxy.held >= 1, 120, "A's lazy mount reading its registry",
                     log=daemon.log_path)
            fut_b = pool.submit(run, ref_b, "par-b")
            out_b, t_b = fut_b.result(timeout=B_BOUND)
            assert out_b == b"image B\n"
            # A's mount still waits for its registry; B's lazy mount is made
            assert not fut_a.done()
            mounts = daemon.lazy_mounts()
            assert len(mounts) == 1, mounts
            st, listed = daemon.api.request("GET", "/api/v1/mounts")
            assert st == 200 and [m["backend"] for m in listed] == [f"registry:{ref_b}"], listed
            held = proxy.held

            proxy.release()
            out_a, t_a = fut_a.result(timeout=600)
            assert out_a == b"image A\n"
            assert len(daemon.lazy_mounts()) == 2
            print(f"\nB's container while A's registry held {held} read(s): {t_b:.2f} s; "
                  f"A's container: {t_a:.2f} s (held until B was done)")

            # the refcounted mounts go with their images, as before
            remove_images(ctd)
            wait_for(lambda: snapshot_rows(ctd) == [], 60, "snapshots removed",
                     log=daemon.log_path)
            assert daemon.lazy_mounts() == []
            st, listed = daemon.api.request("GET", "/api/v1/mounts")
            assert st == 200 and listed == []
        except BaseException:
            print(daemon.log(200))
            raise
