"""16 containers from 4 Nydus images at once through real containerd 1.6 and
`fscache-daemon run --snapshotter-socket`: CRI PullImage of each image, then 16 `ctr run`
at the same time (4 per image). Every container prints its image's bytes exactly, each
image is mounted lazily once (4 lazy mounts, shared by its 4 containers), and the
snapshotter's per-call latency (p50/p99, from the daemon's metrics) is reported.

    EROFS_TOOLS_CI=1 python -m pytest -q -s tests/test_snapshotter_load.py
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from containerd_fixtures import (
    SNAPSHOTTER,
    busybox_layers,
    cri_pull,
    require_containerd,
    tar_layer,
    wait_for,
)
from nydus_fixtures import CRI_NS, daemon_stack, push_nydus, remove_images, snapshot_rows
from registry_fixtures import registry  # noqa: F401
from test_daemon_support import require_lazy_kernel

pytestmark = [pytest.mark.root, pytest.mark.registry]

IMAGES = 4
PER_IMAGE = 4
DATA = 3 << 20          # per image: its own file, read whole by each of its containers


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(0, -(-int(q * 100) * len(s) // 100) - 1)]


def test_sixteen_containers_from_four_images(registry):  # noqa: F811
    require_containerd()
    require_lazy_kernel()
    tag = secrets.token_hex(3)
    with daemon_stack("snapload-", (registry.host,)) as (d, daemon, ctd):
        images = []
        for n in range(IMAGES):
            data = random.Random(100 + n).randbytes(DATA)
            layers = busybox_layers(f"image {n}\n".encode()) + [
                tar_layer([("data", "dir", None), ("data/file", "file", data)])]
            ref = push_nydus(registry, f"load{n}", layers)
            images.append((ref, f"image {n}\n{hashlib.sha256(data).hexdigest()}  "
                                "/data/file\n".encode()))

        t0 = time.monotonic()
        with ThreadPoolExecutor(IMAGES) as pool:
            list(pool.map(lambda im: cri_pull(ctd.sock, im[0]), images))
        t_pull = time.monotonic() - t0
        assert daemon.lazy_mounts() == []       # pulls mount nothing

        def run(job: tuple[int, int]) -> tuple[bytes, bytes, float]:
            n, k = job
            started = time.monotonic()
            out = ctd.run_out("--snapshotter", SNAPSHOTTER, images[n][0],
                              f"load-{tag}-{n}-{k}", "/bin/sh", "-c",
                              "cat /etc/greeting; /bin/busybox sha256sum /data/file",
                              ns=CRI_NS, timeout=600)
            return out, b"", time.monotonic() - started

        jobs = [(n, k) for k in range(PER_IMAGE) for n in range(IMAGES)]
        t0 = time.monotonic()
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(run, jobs))
        t_all = time.monotonic() - t0
        for (n, _k), (out, err, _t) in zip(jobs, results):
            assert out == images[n][1], (n, out, err)
        mounts = daemon.lazy_mounts()
        assert len(mounts) == IMAGES, mounts      # one lazy mount per image
        st, listed = daemon.api.request("GET", "/api/v1/mounts")
        assert st == 200 and sorted(m["mountpoint"] for m in listed) == mounts

        calls = daemon.metrics()["snapshotter"]["calls"]
        # (Prepare's errors are the blob layers' AlreadyExists answers of the pulls;
        # containerd removes the containers' snapshots later, in its GC)
        assert calls["Prepare"]["count"] >= len(jobs) and calls["Mounts"]["errors"] == 0
        runs = [r[2] for r in results]
        figures = {"pull_all_s": round(t_pull, 2), "run_all_s": round(t_all, 2),
                   "ctr_run_p50_s": round(_quantile(runs, 0.5), 2),
                   "ctr_run_p99_s": round(_quantile(runs, 0.99), 2),
                   "calls": {k: {f: v[f] for f in ("count", "errors", "p50_ms", "p99_ms")}
                             for k, v in sorted(calls.items())}}
        print(json.dumps(figures, indent=1))

        remove_images(ctd)
        wait_for(lambda: snapshot_rows(ctd) == [], 60, "snapshots removed",
                 log=daemon.log_path)
        assert daemon.lazy_mounts() == []
        st, listed = daemon.api.request("GET", "/api/v1/mounts")
        assert st == 200 and listed == []
