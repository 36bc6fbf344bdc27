"""The cold-start benchmark's own parts (benchmarks/coldstart_containerd.py): the image
recipe's cache key, the apt mirror it debootstraps from, the delay relay standing in
for netem, and one quick run of the whole benchmark on a tiny image (real containerd,
registry, daemon and network namespace; not timed, only checked to work and to leave
nothing behind)."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import helpers
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import mlimage  # noqa: E402


def test_recipe_key_follows_the_recipe():
    key = mlimage.recipe_key(mlimage.RECIPE)
    assert key == mlimage.recipe_key(json.loads(json.dumps(mlimage.RECIPE)))
    changed = dict(mlimage.RECIPE, pip=[*mlimage.RECIPE["pip"], "six==1.16.0"])
    assert mlimage.recipe_key(changed) != key
    assert mlimage.recipe_key(mlimage.QUICK_RECIPE) != key
    assert mlimage.image_dir(mlimage.RECIPE, Path("/c")) == Path(f"/c/mlimage-{key}")
    assert any(p.startswith("torch==") and p.endswith("+cpu") for p in mlimage.RECIPE["pip"])


def test_apt_mirror_from_sources(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
        "\nTypes: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n")
    assert mlimage.apt_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list.d" / "debian.sources").unlink()
    (tmp_path / "sources.list").write_text(
        "deb [arch=amd64] http://other.example/debian bookworm main\n")
    assert mlimage.apt_mirror(tmp_path) == "http://other.example/debian"
    (tmp_path / "sources.list").write_text("")
    with pytest.raises(mlimage.ImageError, match="--mirror"):
        mlimage.apt_mirror(tmp_path)


def test_delay_relay_adds_its_delay_and_keeps_bytes(tmp_path):
    body = os.urandom(4 << 20)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            data = body if self.path == "/big" else b"ok"
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    relay = subprocess.Popen([sys.executable, str(BENCH / "delay_relay.py"),
                              f"127.0.0.1:{port}",
                              f"127.0.0.1:{server.server_address[1]}", "20"],
                             stdout=subprocess.PIPE)
    try:
        assert relay.stdout.readline() == b"listening\n"
        conn = http.client.HTTPConnection(f"127.0.0.1:{port}", timeout=10)
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            conn.request("GET", "/small")
            assert conn.getresponse().read() == b"ok"
            times.append(time.perf_counter() - t0)
        # 20 ms each way: a round trip takes 40 ms or more; the first one pays for the
        # handshake's round trip too
        assert times[0] >= 0.08 and min(times[1:]) >= 0.04, times
        conn.request("GET", "/big")
        assert conn.getresponse().read() == body
        conn.close()
    finally:
        relay.kill()
        relay.wait()
        server.shutdown()
        server.server_close()


@pytest.mark.root
@pytest.mark.registry
def test_quick_run_of_the_benchmark(tmp_path):
    from containerd_fixtures import require_containerd
    from test_daemon_support import require_lazy_kernel
    require_containerd()
    require_lazy_kernel()
    helpers.require(subprocess.run(["which", "docker-registry", "tc"],
                                   capture_output=True).returncode == 0,
                    "docker-registry and tc needed (apt-get install docker-registry iproute2)")
    def ours() -> tuple[set, set]:
        """Work directories and network namespaces named as the benchmark names them
        (other jobs may make their own meanwhile)."""
        dirs = {n for n in os.listdir("/var/tmp") if n.startswith("erofs-coldstart-")}
        ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return dirs, {x.split()[0] for x in ns.splitlines() if x.startswith("ecs")}
    out = tmp_path / "result.json"
    p = subprocess.run([sys.executable, str(BENCH / "coldstart_containerd.py"), "--quick",
                        "--rounds", "1", "--cache", str(tmp_path / "cache"), "--json",
                        str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["nets"]) == {"loopback", "link"}
    assert sorted(r["kind"] for r in res["rounds"]) == ["full", "full", "lazy", "lazy",
                                                        "optimized", "optimized"]
    for r in res["rounds"]:
        assert r["output"] == "quick result 42", r
        assert r["bytes"] > 0 and r["requests"] > 0
    lazy = [r for r in res["rounds"] if r["kind"] in ("lazy", "optimized")]
    # the daemon fetched the chunks the container read (busybox), through the registry
    assert all(r["daemon_bytes_fetched"] > 0 for r in lazy)
    # the optimized image: made from the traced run (busybox, the app script), its
    # prefetch blob streamed at mount, nothing of it fetched twice
    opt = res["optimize"]
    assert opt["trace_entries"] >= 2 and opt["prefetch_files"] >= 2, opt
    for r in res["rounds"]:
        if r["kind"] == "optimized":
            assert r["prefetch_bytes"] > 0, r
            blob = r["daemon_blobs"][opt["prefetch_blob"][:12]]
            assert blob["bytes_fetched"] == opt["prefetch_bytes"], (blob, opt)
    assert {"time_ratio", "opt_time_ratio", "opt_bytes_ratio"} <= set(res["nets"]["link"])
    assert res["link"]["http_rtt_ms"] >= 2.0
    # everything it started is gone (by name: other jobs may run the benchmark meanwhile)
    dirs, namespaces = ours()
    assert not os.path.exists(res["workdir"]) and res["link"]["netns"] not in namespaces
    assert os.path.basename(res["workdir"]) not in dirs
    with open("/proc/self/mounts") as f:
        assert "erofs-coldstart-" not in f.read()
