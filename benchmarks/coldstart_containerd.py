#!/usr/bin/env python3
"""Cold start of a Python/ML container through containerd, side by side in one run
(root; Linux 6.14+ for the fanotify front end; containerd, runc, docker-registry, tc):

    python3 benchmarks/coldstart_containerd.py [--rounds 3] [--net loopback,link]
        [--ways full,lazy,optimized] [--rate 1gbit] [--rtt-ms 2] [--pull auto|rpull|cri]
        [--quick] [--json FILE]

The image (benchmarks/mlimage.py: Debian 12 minbase + python3, torch CPU, numpy, scipy,
pandas, scikit-learn, transformers; three gzip layers, about 1.7 GB in 50,000 files)
is built once and cached under /var/cache/erofs-tools-bench. Each run pushes it to a
private docker-registry and converts it with `erofs-tools convert` (not timed). Then,
for each network (the registry on 127.0.0.1, or in a network namespace behind a veth
pair with tc netem on both ends: RATE, RTT/2 each way), rounds alternate the ways
(full, lazy, optimized / optimized, lazy, full):

  full       containerd's overlayfs snapshotter: `ctr image pull` + `ctr run`
  lazy       fscache-daemon (fanotify front end) serving containerd's snapshots API as
             a proxy plugin: `fscache-daemon rpull` (if this checkout has it) or CRI
             PullImage as kubelet calls it, then `ctr run --snapshotter NAME`
  optimized  the same for the image `erofs-tools optimize` made of the Nydus image with
             the access trace of one earlier lazy run of the same app (recorded once
             per run, before the rounds, on loopback, not timed: rpull, ctr run,
             `GET /api/v1/trace` of its lazy mount); its prefetch table is streamed at
             mount
  zran       (--ways ...,zran) the unconverted source image indexed in place with
             `convert --oci-ref`: its original gzip layers read by range (docs/zran.md)

Every round starts from nothing: a fresh containerd (root, state, content store), for
lazy a fresh daemon and cache; the page cache is dropped right before the timed part,
which runs from the start of the pull to the container's output line (the app prints
the time its own `import torch` + a matmul took). Bytes pulled = the sum of the
registry's response bodies during the timed part (its request log), which counts what
crossed the (emulated) network for both ways. Everything started here is stopped and
removed at the end (containerd, daemon, registry, mounts, network namespace), also on
failure.

Prints every round, medians, lazy/full and optimized/full ratios and the goals
(lazy/full time <= 0.3 on loopback, <= 0.2 on the link, issue 14; optimized/full <=
0.12, issue 15; bytes <= 0.25) met or not, and one JSON document.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlimage
from benchlib import (
    REPO,
    anchor_line,
    anchors,
    child_env,
    drop_caches,
    goal,
    goal_line,
    holder_pid,
)
from coldstart_net import Link, Registry, cpu_s, stop, throughput_mbs
from coldstart_report import LAZY_WAYS, print_rounds, print_steps, print_summary, summarize

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

SNAPSHOTTER = "erofs-bench"
CRI_NS = "k8s.io"
REPOS = {"full": "ml/src:1", "lazy": "ml/nydus:1", "optimized": "ml/nydus:opt",
         "zran": "ml/zran:1"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def wait_socket(path: str, proc: subprocess.Popen, what: str, log_path: str,
                timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(path)
                return
            except OSError:
                pass
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited ({proc.returncode}):\n"
                             f"{Path(log_path).read_text()[-3000:]}")
        time.sleep(0.05)
    raise SystemExit(f"{what}: {path} not answering after {timeout}s")


def umount_under(path: str) -> None:
    with open("/proc/self/mounts") as f:
        mps = [line.split()[1] for line in f]
    for mp in sorted(mps, key=len, reverse=True):  # overlays before the lazy mounts
        if mp == path or mp.startswith(path + "/"):
            subprocess.run(["umount", "-l", mp], check=False)


# --- one timed cold start --------------------------------------------------------------


def has_rpull() -> bool:
    p = subprocess.run([sys.executable, "-m", "fscache_daemon.cli", "rpull", "--help"],
                       capture_output=True, cwd=REPO, env=child_env())
    return p.returncode == 0


class Round:
    """A fresh containerd (and for lazy a fresh daemon + cache) in its own directory."""

    def __init__(self, workdir: str, kind: str, registry: Registry,
                 daemon_args: tuple[str, ...] = ()) -> None:
        from containerd_fixtures import Containerd
        self.dir = tempfile.mkdtemp(prefix=f"{kind}-", dir=workdir)
        self.kind, self.registry = kind, registry
        self.lazy = kind in LAZY_WAYS
        # container ids unique per round: runc keeps its state under /run/containerd/runc/
        # NAMESPACE/ID, outside the round's containerd, and a round right after another
        # of the same way found the last one's id still there ("already exists")
        self.tag = secrets.token_hex(3)
        self.daemon: subprocess.Popen | None = None
        self.ctd = None
        if self.lazy:
            self.api = os.path.join(self.dir, "api.sock")
            self.snap = os.path.join(self.dir, "snap.sock")
            self.daemon_log = os.path.join(self.dir, "daemon.log")
            with open(self.daemon_log, "ab") as out:
                self.daemon = subprocess.Popen(
                    [sys.executable, "-m", "fscache_daemon.cli", "run",
                     "--cache-dir", os.path.join(self.dir, "cache"), "--api-sock", self.api,
                     "--frontend", "fanotify", "--snapshotter-socket", self.snap,
                     "--insecure-registry", registry.host, "--log-level", "INFO",
                     *daemon_args],
                    stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=child_env())
            wait_socket(self.api, self.daemon, "fscache-daemon", self.daemon_log)
            wait_socket(self.snap, self.daemon, "fscache-daemon snapshotter",
                        self.daemon_log)
            self.ctd = Containerd(self.dir, {SNAPSHOTTER: self.snap},
                                  cri_snapshotter=SNAPSHOTTER,
                                  plain_http_hosts=(registry.host,))
        else:
            self.ctd = Containerd(self.dir, {})

    def daemon_metrics(self) -> dict:
        from fscache_daemon.api import ApiClient
        st, m = ApiClient(self.api, timeout=60).request("GET", "/api/v1/metrics")
        if st != 200:
            raise SystemExit(f"daemon metrics: {st} {m}")
        return m

    def _pull(self, ref: str, pull: str, ns: str) -> None:
        ctd = self.ctd
        if self.kind == "full":
            ctd.ctr("image", "pull", "--plain-http", ref, ns=ns, timeout=3600)
        elif pull == "rpull":
            p = subprocess.run([sys.executable, "-m", "fscache_daemon.cli", "rpull", ref,
                                "--address", ctd.sock, "--namespace", ns, "--snapshotter",
                                SNAPSHOTTER, "--insecure"], capture_output=True, cwd=REPO,
                               env=child_env(), timeout=600)
            if p.returncode != 0:
                raise SystemExit(f"rpull failed: {p.stderr.decode(errors='replace')}")
        else:
            from containerd_fixtures import cri_pull
            cri_pull(ctd.sock, ref, timeout=600)

    def _ctr_run(self, ns: str) -> list[str]:
        cmd = ["ctr", "-a", self.ctd.sock, "-n", ns, "run", "--rm"]
        return cmd + ["--snapshotter", SNAPSHOTTER] if self.lazy else cmd

    def record_trace(self, ref: str, pull: str) -> dict:
        """Pull and run the app once lazily (caches dropped first, not timed); -> the
        daemon's access trace of the image's lazy mount (what `fscache-daemon trace`
        exports)."""
        from fscache_daemon.api import ApiClient
        drop_caches()
        self._pull(ref, pull, CRI_NS)
        p = subprocess.run([*self._ctr_run(CRI_NS), ref, f"trace-run-{self.tag}"], capture_output=True,
                           timeout=600)
        if p.returncode != 0 or b"result" not in p.stdout:
            raise SystemExit(f"traced run failed: {p.stdout!r} {p.stderr!r}")
        api = ApiClient(self.api, timeout=60)
        st, mounts = api.request("GET", "/api/v1/mounts")
        if st != 200 or len(mounts) != 1:
            raise SystemExit(f"traced run: expected one lazy mount, got {st} {mounts}")
        st, trace = api.request("GET", "/api/v1/trace?mountpoint=" + mounts[0]["mountpoint"])
        if st != 200:
            raise SystemExit(f"trace: {st} {trace}")
        return trace

    def steps(self, ref: str, pull: str) -> list[dict]:
        """The cold start in steps, each measured alone (caches dropped once, before
        the pull; each step finds what the earlier ones fetched): pull, a container
        running /bin/true (snapshot + lazy mount + runc), `python3 -c pass` (the
        interpreter's own start), then the app. Times are to the exit of `ctr run --rm`."""
        ns = CRI_NS if self.lazy else self.ctd.namespace
        drop_caches()
        out = []
        todo = [("pull", None), ("run /bin/true", ["/bin/true"]),
                ("run python3 -c pass", ["python3", "-c", "pass"]), ("run the app", [])]
        for i, (what, args) in enumerate(todo):
            mark = self.registry.mark()
            c0 = cpu_s(self.ctd.proc.pid)
            d0 = cpu_s(self.daemon.pid) if self.daemon else 0.0
            r0 = self.daemon_metrics()["totals"]["requests"] if self.daemon else 0
            h0 = (holder_pid(os.path.join(self.dir, "cache", "fdholder.sock"))
                  if self.daemon else None)
            h_cpu0 = cpu_s(h0) if h0 else 0.0
            t0 = time.perf_counter()
            if args is None:
                self._pull(ref, pull, ns)
            else:
                p = subprocess.run([*self._ctr_run(ns), ref, f"step{i}-{self.tag}", *args],
                                   capture_output=True, timeout=600)
                if p.returncode != 0:
                    raise SystemExit(f"{what} failed: {p.stderr.decode(errors='replace')}")
            step = {"kind": self.kind, "step": what, "s": time.perf_counter() - t0,
                    **self.registry.traffic(mark),
                    "containerd_cpu_s": cpu_s(self.ctd.proc.pid) - c0}
            if self.daemon:
                step["daemon_cpu_s"] = cpu_s(self.daemon.pid) - d0
                step["daemon_requests"] = self.daemon_metrics()["totals"]["requests"] - r0
                h = holder_pid(os.path.join(self.dir, "cache", "fdholder.sock"))
                step["holder_cpu_s"] = (cpu_s(h) - (h_cpu0 if h == h0 else 0.0)) if h else 0.0
            out.append(step)
        return out

    def timed(self, ref: str, pull: str) -> dict:
        """drop caches; pull; run; -> seconds to the output line and what it cost."""
        ctd = self.ctd
        ns = CRI_NS if self.lazy else ctd.namespace
        drop_caches()
        load = os.getloadavg()[0]
        mark = self.registry.mark()
        ctd_cpu0 = cpu_s(ctd.proc.pid)
        d_cpu0 = cpu_s(self.daemon.pid) if self.daemon else 0.0
        cache = os.path.join(self.dir, "cache")
        h0 = holder_pid(os.path.join(cache, "fdholder.sock")) if self.daemon else None
        h_cpu0 = cpu_s(h0) if h0 else 0.0  # started with the first mount otherwise
        t0 = time.perf_counter()
        self._pull(ref, pull, ns)
        t_pull = time.perf_counter() - t0
        proc = subprocess.Popen([*self._ctr_run(ns), ref, f"cold-{self.kind}-{self.tag}"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode(errors="replace")
        t_out = time.perf_counter() - t0
        traffic = self.registry.traffic(mark)
        ctd_cpu = cpu_s(ctd.proc.pid) - ctd_cpu0
        d_cpu = (cpu_s(self.daemon.pid) - d_cpu0) if self.daemon else None
        h = holder_pid(os.path.join(cache, "fdholder.sock")) if self.daemon else None
        h_cpu = (cpu_s(h) - (h_cpu0 if h == h0 else 0.0)) if h else None
        rest, err = proc.communicate(timeout=600)
        if proc.returncode != 0 or "result" not in line:
            raise SystemExit(f"ctr run ({self.kind}) failed ({proc.returncode}): {line!r}"
                             f"{rest!r} {err.decode(errors='replace')}")
        m = re.search(r"import\+compute ([\d.]+)s", line)
        res = {"kind": self.kind, "s": t_out, "pull_s": t_pull, "run_s": t_out - t_pull,
               "app_import_s": float(m.group(1)) if m else None, "output": line.strip(),
               "bytes": traffic["bytes"], "requests": traffic["requests"],
               "registry_busy_s": traffic["registry_busy_s"],
               "blob_gets": traffic["blob_gets"], "containerd_cpu_s": ctd_cpu,
               "daemon_cpu_s": d_cpu, "holder_cpu_s": h_cpu, "load": load}
        if self.daemon:
            m = self.daemon_metrics()
            t = m["totals"]
            res.update(daemon_requests=t["requests"], daemon_bytes_fetched=t["bytes_fetched"],
                       readahead_bytes=t["readahead_bytes"], prefetch_bytes=t["prefetch_bytes"],
                       meta_bytes_fetched=m["meta_bytes_fetched"],
                       # per blob: requests, fetches, latency quantiles (where time goes)
                       daemon_blobs={b[:12]: {k: v for k, v in x.items()
                                              if isinstance(v, (int, float))}
                                     for b, x in m["blobs"].items()},
                       frontend_stats=m["frontend_stats"], pool=m.get("pool"))
        return res

    def _keep_traces(self, dest: str) -> None:
        """The access trace of each lazy mount (what the app read, chunk by chunk: set
        beside the daemon's log of its readahead windows, it tells which were read)."""
        from fscache_daemon.api import ApiClient
        try:
            api = ApiClient(self.api, timeout=60)
            st, mounts = api.request("GET", "/api/v1/mounts")
            for i, m in enumerate(mounts if st == 200 else []):
                st, trace = api.request("GET", "/api/v1/trace?mountpoint=" + m["mountpoint"])
                if st == 200:
                    with open(os.path.join(dest, f"trace-{i}.json"), "w") as f:
                        json.dump(trace, f)
                    if os.environ.get("EROFS_BENCH_KEEP_BOOTSTRAP"):
                        shutil.copy(trace["image"]["bootstrap"],
                                    os.path.join(dest, f"bootstrap-{i}"))
        except Exception as e:  # noqa: BLE001  (a diagnostic: the round stands without it)
            log(f"warning: no access trace kept: {e}")

    def close(self, keep_logs: str | None = None) -> None:
        if keep_logs:  # the round's logs, for a look at where the time went
            dest = os.path.join(keep_logs, os.path.basename(self.dir))
            os.makedirs(dest, exist_ok=True)
            for name in ("daemon.log", "containerd.log"):
                if os.path.exists(os.path.join(self.dir, name)):
                    shutil.copy(os.path.join(self.dir, name), dest)
            if self.daemon is not None:
                self._keep_traces(dest)
        if self.ctd is not None:
            try:
                self.ctd.stop()
            except Exception as e:  # noqa: BLE001  (clean up the rest regardless)
                log(f"warning: containerd stop: {e}")
        if self.daemon is not None:
            stop(self.daemon)
        umount_under(self.dir)
        if self.daemon is not None:
            from test_daemon_support import release_holder
            release_holder(os.path.join(self.dir, "cache", "fdholder.sock"))
        subprocess.run(["rm", "-rf", "--one-file-system", self.dir], check=False)


# --- the run ----------------------------------------------------------------------------


def make_optimized(workdir: str, registry: Registry, pull: str,
                   daemon_args: tuple[str, ...], keep_logs: str | None) -> dict:
    """ml/nydus:opt: the Nydus image optimized with the trace of one lazy run of the
    app (its own fresh containerd and daemon; not timed)."""
    t0 = time.perf_counter()
    rnd = Round(workdir, "lazy", registry, daemon_args)
    try:
        trace = rnd.record_trace(f"{registry.host}/{REPOS['lazy']}", pull)
    finally:
        rnd.close(keep_logs)
    trace_s = round(time.perf_counter() - t0, 1)
    tfile = os.path.join(workdir, "trace.json")
    with open(tfile, "w") as f:
        json.dump(trace, f)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "erofs_tools", "optimize",
                        f"{registry.host}/{REPOS['lazy']}",
                        f"{registry.host}/{REPOS['optimized']}", "--trace", tfile,
                        "--insecure", "--work-dir", workdir, "--json"], capture_output=True,
                       text=True, cwd=REPO, env=child_env())
    if p.returncode != 0:
        raise SystemExit(f"optimize failed: {p.stderr[-3000:]}")
    res = json.loads(p.stdout)
    out = {"trace_entries": len(trace["entries"]), "trace_run_s": trace_s,
           "optimize_s": round(time.perf_counter() - t0, 1),
           **{k: res[k] for k in ("prefetch_files", "prefetch_chunks", "prefetch_bytes",
                                  "reused_chunks", "prefetch_blob")}}
    log(f"optimized image: {out}")
    return out


def make_zran(registry: Registry) -> dict:
    """ml/zran:1: the source image indexed in place by `convert --oci-ref` (its gzip
    layers cross-mounted, never re-uploaded); not timed."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "erofs_tools", "convert", "--oci-ref",
                        "--insecure", f"{registry.host}/{REPOS['full']}",
                        f"{registry.host}/{REPOS['zran']}", "--json"], capture_output=True,
                       text=True, cwd=REPO, env=child_env())
    if p.returncode != 0:
        raise SystemExit(f"convert --oci-ref failed: {p.stderr[-3000:]}")
    z = json.loads(p.stdout)
    index = z["meta_bytes"] + z["bootstrap_layer_size"]
    out = {"convert_s": round(time.perf_counter() - t0, 1), "index_bytes": index,
           "meta_bytes": z["meta_bytes"], "bootstrap_layer_bytes": z["bootstrap_layer_size"],
           "image_bytes": z["compressed_layer_bytes"],
           "index_ratio": index / z["compressed_layer_bytes"],
           "layers_placed": z["layers_placed"]}
    log(f"zran index in {out['convert_s']} s: {index / 1e6:.2f} MB = "
        f"{100 * out['index_ratio']:.2f} % of the image")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each way per network")
    ap.add_argument("--net", default="loopback,link",
                    help="networks, comma-separated: loopback, link")
    ap.add_argument("--ways", default="full,lazy,optimized",
                    help="ways, comma-separated: full, lazy, optimized, zran (the "
                         "source image indexed by `convert --oci-ref`, read by range)")
    ap.add_argument("--rate", default="1gbit", help="link rate (tc netem syntax)")
    ap.add_argument("--rtt-ms", type=float, default=2.0, help="link round-trip time")
    ap.add_argument("--pull", choices=("auto", "rpull", "cri"), default="auto",
                    help="lazy pull: fscache-daemon rpull, or CRI PullImage (auto: rpull "
                         "when this checkout has it)")
    ap.add_argument("--breakdown", action="store_true",
                    help="after the rounds of each network, one more of each way in steps "
                         "(pull, /bin/true, python3 -c pass, the app), not in the medians")
    ap.add_argument("--daemon-arg", action="append", default=[],
                    help="an extra `fscache-daemon run` argument for the lazy rounds "
                         "(repeatable; e.g. --daemon-arg=--readahead=2M): the default is "
                         "the daemon's defaults")
    ap.add_argument("--keep-logs", metavar="DIR",
                    help="copy the registry's, containerd's and the daemon's logs here, "
                         "and the lazy mounts' access traces (with "
                         "EROFS_BENCH_KEEP_BOOTSTRAP=1 their bootstraps too)")
    ap.add_argument("--quick", action="store_true",
                    help="a tiny busybox image instead of the ML image (smoke test)")
    ap.add_argument("--mirror", help="Debian mirror for debootstrap (default: apt's)")
    ap.add_argument("--cache", default=str(mlimage.CACHE), help="image cache directory")
    ap.add_argument("--json", help="also write the JSON document here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("error: needs root (containerd, mounts, drop_caches, netns)")
    for tool in ("containerd", "ctr", "runc", "docker-registry", "ip", "tc"):
        if shutil.which(tool) is None:
            raise SystemExit(f"error: {tool} not installed (apt-get install containerd runc "
                             "docker-registry iproute2)")
    nets = [n.strip() for n in args.net.split(",") if n.strip()]
    if not nets or any(n not in ("loopback", "link") for n in nets):
        raise SystemExit(f"error: --net: loopback and/or link, not {args.net!r}")
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    if not ways or any(w not in REPOS for w in ways) or len(set(ways)) != len(ways):
        raise SystemExit(f"error: --ways: full, lazy, optimized and/or zran, not {args.ways!r}")
    pull = args.pull
    daemon_args = tuple(args.daemon_arg)
    if pull == "auto":
        pull = "rpull" if has_rpull() else "cri"

    recipe = mlimage.QUICK_RECIPE if args.quick else mlimage.RECIPE
    info = mlimage.ensure_image(recipe, Path(args.cache), args.mirror, say=log)
    log(f"image {info['key']}: {info['entries']} entries, {info['file_bytes'] / 1e9:.2f} GB "
        f"of files, {info['tar_bytes'] / 1e9:.2f} GB tar, {info['gzip_bytes'] / 1e9:.2f} GB "
        f"gzip in {len(info['layers'])} layers (built in {info['build_s']} s, cached)")
    workdir = tempfile.mkdtemp(prefix="erofs-coldstart-", dir="/var/tmp")
    storage = os.path.join(workdir, "storage")
    result: dict = {"image": {k: v for k, v in info.items() if k not in ("manifest", "recipe")},
                    "pull": pull, "daemon_args": list(daemon_args), "ways": ways,
                    "rounds": [],
                    "nets": {}, "anchors": anchors(), "workdir": workdir}
    registry: Registry | None = None
    link: Link | None = None
    current: Round | None = None
    try:
        # push + convert once, on loopback; both registries serve the same storage
        from registry_fixtures import free_port

        from erofs_tools.registry.client import RegistryClient
        registry = Registry(workdir, storage, f"127.0.0.1:{free_port()}")
        client = RegistryClient(registry.host, insecure=True, docker_config=False)
        t0 = time.perf_counter()
        mlimage.push(info, client, "ml/src", "1")
        log(f"pushed the source image in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "erofs_tools", "convert", "--insecure",
                            f"{registry.host}/ml/src:1", f"{registry.host}/ml/nydus:1",
                            "--json"], capture_output=True, text=True, cwd=REPO,
                           env=child_env())
        if p.returncode != 0:
            raise SystemExit(f"convert failed: {p.stderr[-3000:]}")
        result["convert_s"] = round(time.perf_counter() - t0, 1)
        manifest = client.get_manifest("ml/nydus", "1").json
        result["nydus_layers"] = [{"size": x["size"], "annotations": x.get("annotations", {})}
                                  for x in manifest["layers"]]
        log(f"converted in {result['convert_s']} s: "
            f"{sum(x['size'] for x in manifest['layers']) / 1e9:.2f} GB in "
            f"{len(manifest['layers'])} layers")
        client.close()
        if "zran" in ways:
            result["zran"] = make_zran(registry)
        if "optimized" in ways:
            result["optimize"] = make_optimized(workdir, registry, pull, daemon_args,
                                                args.keep_logs)
        for net in nets:
            if net == "link":
                registry.stop()
                link = Link(args.rate, args.rtt_ms, workdir)
                registry = Registry(workdir, storage, link.registry_addr, link.ns, link.host)
                result["link"] = {"rate": args.rate, "rtt_ms": args.rtt_ms, "netns": link.ns,
                                  "emulation": link.emulation,
                                  "http_rtt_ms": link.http_rtt_ms(),
                                  "blob_get_MBps": round(throughput_mbs(
                                      registry.host, "ml/src", info["layers"][1]["digest"],
                                      min(256 << 20, info["layers"][1]["size"])), 1)}
                log(f"link: {result['link']}")
            rounds = []
            for i in range(args.rounds):
                order = ways if i % 2 == 0 else ways[::-1]
                for kind in order:
                    ref = f"{registry.host}/{REPOS[kind]}"
                    current = Round(workdir, kind, registry, daemon_args)
                    relay0 = link.relay_cpu_s() if link and net == "link" else None
                    try:
                        r = current.timed(ref, pull)
                        if relay0 is not None and link is not None:
                            r["relay_cpu_s"] = (link.relay_cpu_s() or 0.0) - relay0
                    finally:
                        current.close(args.keep_logs)
                        current = None
                    r.update(net=net, round=i + 1)
                    rounds.append(r)
                    log(f"{net} round {i + 1} {kind}: {r['s']:.2f} s (pull {r['pull_s']:.2f}, "
                        f"run {r['run_s']:.2f}), {r['bytes'] / 1e6:.1f} MB, "
                        f"{r['requests']} requests; {r['output']}")
            result["rounds"] += rounds
            result["nets"][net] = summarize(net, rounds)
            if args.breakdown:
                for kind in ways:
                    ref = f"{registry.host}/{REPOS[kind]}"
                    current = Round(workdir, kind, registry, daemon_args)
                    try:
                        for step in current.steps(ref, pull):
                            step["net"] = net
                            result.setdefault("steps", []).append(step)
                            log(f"{net} {kind} step {step['step']}: {step['s']:.2f} s, "
                                f"{step['bytes'] / 1e6:.1f} MB, {step['requests']} requests")
                    finally:
                        current.close(args.keep_logs)
                        current = None
    finally:
        if current is not None:
            current.close()
        if registry is not None:
            registry.stop()
        if args.keep_logs:
            os.makedirs(args.keep_logs, exist_ok=True)
            for name in os.listdir(workdir):
                if name.endswith(".log"):
                    shutil.copy(os.path.join(workdir, name), args.keep_logs)
        if link is not None:
            link.remove()
        umount_under(workdir)
        subprocess.run(["rm", "-rf", "--one-file-system", workdir], check=False)

    print()
    print(anchor_line(result["anchors"]))
    print(f"image: {info['entries']} entries, {info['tar_bytes'] / 1e9:.2f} GB tar, "
          f"{info['gzip_bytes'] / 1e9:.2f} GB gzip; lazy pull via {pull}; daemon args "
          f"{' '.join(daemon_args) or '(defaults)'}")
    print_rounds(result["rounds"])
    goals = []
    if result.get("optimize"):
        o = result["optimize"]
        print(f"optimized image: trace of {o['trace_entries']} files, prefetch blob "
              f"{o['prefetch_bytes'] / 1e6:.1f} MB ({o['prefetch_files']} files, "
              f"{o['prefetch_chunks']} chunks); trace run {o['trace_run_s']} s, optimize "
              f"{o['optimize_s']} s (not timed)")
    if result.get("zran"):
        z = result["zran"]
        print(f"zran index: {z['index_bytes'] / 1e6:.2f} MB = {100 * z['index_ratio']:.2f} % "
              f"of the image, made in {z['convert_s']} s (not timed)")
        goals.append(goal("zran index / image size", z["index_ratio"], "<=", 0.03))
    for net, s in result["nets"].items():
        print_summary(net, s, args.rounds)
        goals += s["goals"]
    if result.get("steps"):
        print_steps(result["steps"])
    for g in goals:
        print(goal_line(g))
    result["goals"] = goals
    doc = json.dumps(result, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(doc)
    print(doc)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the clean-up on SIGTERM
    sys.exit(main())
