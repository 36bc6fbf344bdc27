"""An optimized image through the snapshotter: real containerd 1.6, `fscache-daemon run
--snapshotter-socket`, `fscache-daemon rpull`.

A container of a Nydus image reads its hot files; the daemon's access trace of that run
(`GET /api/v1/trace`, what `fscache-daemon trace` exports) goes to `erofs-tools
optimize` of the registry reference; the optimized image is rpulled and a container of
it runs. Its lazy mount streams the prefetch table's region right after the mount:

* in at most ceil(prefetch bytes / 4 MiB) backend requests, nothing fetched twice;
* never ahead of on-demand reads: the registry holds every prefetch request but the
  first (which carries what the container starts with: busybox and the greeting, first
  in the trace), and the container's read of a cold file (another blob) is answered
  while the rest of the prefetch is held;
* a read of a prefetched file whose request is in flight waits for it (no request of
  its own), and every byte the container reads is exact.

    EROFS_TOOLS_CI=1 python -m pytest -q -s tests/test_snapshotter_prefetch.py
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from containerd_fixtures import (
    SNAPSHOTTER,
    busybox_layers,
    require_containerd,
    tar_layer,
    wait_for,
)
from faults import FaultProxy
from nydus_fixtures import daemon_stack, push_nydus
from registry_fixtures import registry  # noqa: F401
from test_daemon_support import require_lazy_kernel
from test_rpull import rpull

from fscache_daemon.prefetch import PREFETCH_REQUEST

pytestmark = [pytest.mark.root, pytest.mark.registry]

MIB = 1 << 20
HOT = [f"/hot/h{i}" for i in range(3)]          # read by the traced run, 3 MiB each
COLD = [f"/cold/c{i}" for i in range(4)]        # not read then: stay in the source blob


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_optimized_image_prefetches_through_the_snapshotter(registry, tmp_path):  # noqa: F811
    require_containerd()
    require_lazy_kernel()
    rnd = random.Random(15)
    files = {p: rnd.randbytes(3 * MIB) for p in HOT}
    files.update({p: rnd.randbytes(MIB + 500_000) for p in COLD})
    gate = threading.Event()
    proxy = FaultProxy(registry.host, match=r"^GET /v2/nydus/pf/blobs/sha256:PREFETCH")
    pool = ThreadPoolExecutor(1)
    with daemon_stack("snappf-", (registry.host, proxy.host), cri=False,
                      before=(gate.set, lambda: pool.shutdown(wait=False, cancel_futures=True)),
                      after=(proxy,)) as (d, daemon, ctd):
        data = tar_layer([("hot", "dir", None), ("cold", "dir", None)] +
                         [(p[1:], "file", b) for p, b in files.items()])
        ref = push_nydus(registry, "pf", busybox_layers(b"optimized\n") + [data])
        # the run the trace records: busybox, the greeting, the hot files in this order
        r = rpull(ctd, ref)
        assert r.returncode == 0, r.stderr
        out = ctd.run_out("--snapshotter", SNAPSHOTTER, ref, "pf-trace", "/bin/sh", "-c",
                          "cat /etc/greeting; cd /hot && /bin/busybox sha256sum h0 h1 h2")
        assert out == b"optimized\n" + b"".join(
            f"{_sha(files[p])}  {os.path.basename(p)}\n".encode() for p in HOT)
        mounts = daemon.lazy_mounts()
        assert len(mounts) == 1
        st, trace = daemon.api.request("GET", f"/api/v1/trace?mountpoint={mounts[0]}")
        assert st == 200, trace
        traced = [e["path"] for e in trace["entries"]]
        assert [p for p in traced if p.startswith("/hot/")] == HOT, traced
        assert not any(p.startswith("/cold/") for p in traced), traced
        tfile = tmp_path / "trace.json"
        tfile.write_text(json.dumps(trace))

        opt_ref = f"{registry.host}/nydus/pf:opt"
        p = subprocess.run([sys.executable, "-m", "erofs_tools", "optimize", ref, opt_ref,
                            "--trace", str(tfile), "--insecure", "--json"],
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr
        res = json.loads(p.stdout)
        pf_id, pf_bytes = res["prefetch_blob"], res["prefetch_bytes"]
        # the optimized image runs as the source does: its config's settings are kept
        client = registry.client()
        configs = [json.loads(client.get_blob("nydus/pf", client.get_manifest(
            "nydus/pf", tag).json["config"]["digest"])) for tag in ("1", "opt")]
        assert configs[1]["config"] == configs[0]["config"]
        assert configs[1]["config"]["Cmd"] == ["/bin/sh"]
        # the hot files (9 MiB) and busybox: more than one request, fewer than four.
        # Every chunk of the hot files read whole is in it: a trace once missed some
        # (8.4 MB instead of 10.5 MB under load: readahead completed the blob while h2 was
        # read, the cache file was unmarked and the rest of h2 raised no event; issue 15)
        assert sum(len(files[p]) for p in HOT) < pf_bytes <= 3 * PREFETCH_REQUEST, res
        assert PREFETCH_REQUEST < pf_bytes, res
        proxy.match = re.compile(
            rf"^GET /v2/nydus/pf/blobs/sha256:{pf_id}")

        def held(req) -> bool:          # every prefetch-region request but the first
            rng = req.byte_range()
            return rng is not None and 0 < rng[0] < pf_bytes
        proxy.always(("gate", gate, held))

        via = f"{proxy.host}/nydus/pf:opt"
        r = rpull(ctd, via)
        assert r.returncode == 0, r.stderr
        outdir = tempfile.mkdtemp(prefix="ctr-out-", dir=d)
        out_file = os.path.join(outdir, "stdout")
        script = ("cat /etc/greeting; /bin/busybox sha256sum /cold/c1; "
                  "cd /hot && /bin/busybox sha256sum h0 h1 h2")
        fut = pool.submit(ctd.ctr, "run", "--rm", "--snapshotter", SNAPSHOTTER, "--mount",
                          f"type=bind,src={outdir},dst=/.ctr-out,options=rbind:rw", via,
                          "pf-opt", "/bin/sh", "-c", f"exec >/.ctr-out/stdout; {script}",
                          timeout=600)
        cold_line = f"{_sha(files['/cold/c1'])}  /cold/c1\n".encode()

        def cold_answered() -> bool:
            try:
                with open(out_file, "rb") as f:
                    return f.read().startswith(b"optimized\n" + cold_line)
            except FileNotFoundError:
                return False
        wait_for(cold_answered, 120, "the container's read of a cold file",
                 log=daemon.log_path)
        # answered while the prefetch is still held at the registry
        blob = daemon.metrics()["blobs"][pf_id]
        assert not blob["complete"] and proxy.gated >= 1, (blob, proxy.gated)
        assert not fut.done()
        gate.set()
        fut.result(timeout=600)
        with open(out_file, "rb") as f:
            assert f.read() == b"optimized\n" + cold_line + b"".join(
                f"{_sha(files[p])}  {os.path.basename(p)}\n".encode() for p in HOT)

        wait_for(lambda: daemon.metrics()["blobs"][pf_id]["complete"], 120,
                 "the prefetch blob complete", log=daemon.log_path)
        blob = daemon.metrics()["blobs"][pf_id]
        assert blob["bytes_fetched"] == pf_bytes, blob          # nothing twice
        assert blob["prefetch_bytes"] == pf_bytes, blob         # all of it prefetched
        limit = math.ceil(pf_bytes / PREFETCH_REQUEST)
        gets = [q for q in proxy.blob_gets() if pf_id in q.path and
                q.byte_range() is not None and q.byte_range()[0] < pf_bytes]
        assert len(gets) == blob["backend_requests"] <= limit, (gets, blob)
        print(f"\ntraced {traced}; prefetch blob {pf_bytes} bytes in {len(gets)} "
              f"requests (at most {limit}); {proxy.gated} held while the cold file was read")
