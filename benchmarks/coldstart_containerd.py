#!/usr/bin/env python3
"""Cold start of a Python/ML container through containerd, side by side in one run
(root; Linux 6.14+ for the fanotify front end; containerd, runc, docker-registry, tc):

    python3 benchmarks/coldstart_containerd.py [--rounds 3] [--net loopback,link]
        [--rate 1gbit] [--rtt-ms 2] [--pull auto|rpull|cri] [--quick] [--json FILE]

The image (benchmarks/mlimage.py: Debian 12 minbase + python3, torch CPU, numpy, scipy,
pandas, scikit-learn, transformers; three gzip layers, about 1.7 GB in 50,000 files)
is built once and cached under /var/cache/erofs-tools-bench. Each run pushes it to a
private docker-registry and converts it with `erofs-tools convert` (not timed). Then,
for each network (the registry on 127.0.0.1, or in a network namespace behind a veth
pair with tc netem on both ends: RATE, RTT/2 each way), rounds alternate the two ways
(full, lazy / lazy, full):

  full  containerd's overlayfs snapshotter: `ctr image pull` + `ctr run`
  lazy  fscache-daemon (fanotify front end) serving containerd's snapshots API as a
        proxy plugin: `fscache-daemon rpull` (if this checkout has it) or CRI PullImage
        as kubelet calls it, then `ctr run --snapshotter NAME`
  zran  (with --zran) the same, on the source image indexed with `convert --oci-ref`
        instead of converted: its original gzip layers read by range (docs/zran.md)

Every round starts from nothing: a fresh containerd (root, state, content store), for
lazy a fresh daemon and cache; the page cache is dropped right before the timed part,
which runs from the start of the pull to the container's output line (the app prints
the time its own `import torch` + a matmul took). Bytes pulled = the sum of the
registry's response bodies during the timed part (its request log), which counts what
crossed the (emulated) network for both ways. Everything started here is stopped and
removed at the end (containerd, daemon, registry, mounts, network namespace), also on
failure.

Prints every round, medians, lazy/full ratios and the goals (lazy/full time <= 0.3 on
loopback, <= 0.2 on the link; bytes <= 0.25) met or not, and one JSON document.
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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlimage
from benchlib import REPO, anchor_line, anchors, child_env, goal, goal_line

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

SNAPSHOTTER = "erofs-bench"
CRI_NS = "k8s.io"
GOALS = {"loopback": 0.3, "link": 0.2}
BYTES_GOAL = 0.25
ZRAN_GOALS = {"loopback": 0.35, "link": 0.25}     # issue 16: unconverted image, zran index
LAZY_KINDS = ("lazy", "zran")                     # the ways through the daemon
REPOS = {"full": "src", "lazy": "nydus", "zran": "zran"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def cpu_s(pid: int) -> float:
    """user + system CPU seconds of a process and its reaped children."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def holder_pid(cache_dir: str) -> int | None:
    """The fanotify fd holder the daemon spawned for cache_dir (its own session, so not
    a child to wait for): found by the socket path on its command line."""
    needle = os.path.join(cache_dir, "fdholder.sock").encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if b"fscache_daemon.frontend.fdholder" in cmd and needle in cmd:
            return int(pid)
    return None


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


def stop(proc: subprocess.Popen | None, timeout: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def umount_under(path: str) -> None:
    with open("/proc/self/mounts") as f:
        mps = [line.split()[1] for line in f]
    for mp in sorted(mps, key=len, reverse=True):  # overlays before the lazy mounts
        if mp == path or mp.startswith(path + "/"):
            subprocess.run(["umount", "-l", mp], check=False)


# --- the registry, on loopback or behind an emulated link -----------------------------


class Registry:
    """docker-registry serving STORAGE on ADDR (run inside NETNS when given); its
    request log gives the bytes and requests of a time span."""

    def __init__(self, workdir: str, storage: str, addr: str, netns: str | None = None,
                 host: str | None = None):
        from registry_fixtures import registry_binary, wait_http
        self.host = host or addr
        self.log_path = os.path.join(workdir, f"registry-{addr}.log")
        config = os.path.join(workdir, f"registry-{addr}.json")
        with open(config, "w") as f:
            json.dump({"version": "0.1", "log": {"level": "info"},
                       "storage": {"filesystem": {"rootdirectory": storage},
                                   "delete": {"enabled": True}},
                       "http": {"addr": addr, "secret": secrets.token_hex(8)}}, f)
        cmd = [registry_binary(), "serve", config]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        wait_http(f"http://{self.host}/v2/", proc=self.proc, timeout=30)

    def mark(self) -> int:
        return os.path.getsize(self.log_path)

    def traffic(self, since: int) -> dict:
        """Requests and response body bytes logged after `since` (a mark())."""
        with open(self.log_path, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        n = blob_gets = written = 0
        busy = 0.0
        units = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
        for line in text.splitlines():
            if "response completed" not in line:
                continue
            n += 1
            m = re.search(r"http\.response\.written=(\d+)", line)
            written += int(m.group(1)) if m else 0
            # the registry's own time per request (Go duration: 12.4ms, 1.2s, 950µs)
            m = re.search(r"http\.response\.duration=([\d.]+)(ns|µs|us|ms|s)\b", line)
            busy += float(m.group(1)) * units[m.group(2)] if m else 0.0
            if re.search(r'http\.request\.method=GET .*?/blobs/', line):
                blob_gets += 1
        return {"requests": n, "blob_gets": blob_gets, "bytes": written,
                "registry_busy_s": round(busy, 3)}

    def stop(self) -> None:
        stop(self.proc, 10)


class Link:
    """A network namespace for the registry, joined to the host by a veth pair. With
    netem in the kernel: netem on both ends (rate, rtt/2 delay each way). Without it
    (CONFIG_NET_SCH_NETEM unset, as on this project's 6.18 host): tbf at `rate` on both
    ends and benchmarks/delay_relay.py in the namespace, in front of the registry,
    holding every chunk rtt/2 each way. Clients use `host`; the registry listens on
    `registry_addr` inside the namespace."""

    def __init__(self, rate: str, rtt_ms: float, workdir: str) -> None:
        tag = f"{os.getpid() % 100000}{secrets.token_hex(1)}"
        self.ns, self.host_if, self.ns_if = f"ecs{tag}", f"ecs{tag}h", f"ecs{tag}n"
        used = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
        for _ in range(50):
            net = f"10.{secrets.choice(range(200, 250))}.{secrets.choice(range(256))}"
            if f"{net}." not in used:
                break
        self.host_ip, self.ns_ip = f"{net}.1", f"{net}.2"
        self.host = f"{self.ns_ip}:5000"
        self.rate, self.rtt_ms = rate, rtt_ms
        self.relay: subprocess.Popen | None = None
        try:
            self._sh(["ip", "netns", "add", self.ns])
            self._sh(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name",
                      self.ns_if])
            self._sh(["ip", "link", "set", self.ns_if, "netns", self.ns])
            self._sh(["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if])
            self._sh(["ip", "link", "set", self.host_if, "up"])
            self._sh(["ip", "-n", self.ns, "addr", "add", f"{self.ns_ip}/30", "dev",
                      self.ns_if])
            self._sh(["ip", "-n", self.ns, "link", "set", self.ns_if, "up"])
            self._sh(["ip", "-n", self.ns, "link", "set", "lo", "up"])
            netem = ["netem", "delay", f"{rtt_ms / 2}ms", "rate", rate, "limit", "100000"]
            if self._qdisc(self.host_if, netem, check=False):
                self._qdisc(self.ns_if, netem)
                self.emulation = f"netem delay {rtt_ms / 2} ms + rate {rate} on both ends"
                self.registry_addr = self.host
            else:
                tbf = ["tbf", "rate", rate, "burst", "256kb", "latency", "20ms"]
                self._qdisc(self.host_if, tbf)
                self._qdisc(self.ns_if, tbf)
                self.registry_addr = "127.0.0.1:5001"
                self.relay = subprocess.Popen(
                    ["ip", "netns", "exec", self.ns, sys.executable,
                     str(Path(__file__).with_name("delay_relay.py")), self.host,
                     self.registry_addr, str(rtt_ms / 2)], stdout=subprocess.PIPE,
                    stderr=open(os.path.join(workdir, "relay.log"), "ab"))
                assert self.relay.stdout is not None
                if self.relay.stdout.readline() != b"listening\n":
                    raise SystemExit("delay relay did not start (see relay.log)")
                self.emulation = (f"no netem in this kernel: tbf rate {rate} on both ends "
                                  f"+ a TCP relay holding data {rtt_ms / 2} ms each way")
        except BaseException:
            self.remove()
            raise

    @staticmethod
    def _sh(cmd: list[str]) -> None:
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)}: {p.stderr.strip()}")

    def _qdisc(self, dev: str, spec: list[str], check: bool = True) -> bool:
        cmd = ["tc", "qdisc", "add", "dev", dev, "root", *spec]
        if dev == self.ns_if:
            cmd = ["ip", "netns", "exec", self.ns, *cmd]
        if check:
            self._sh(cmd)
            return True
        return subprocess.run(cmd, capture_output=True).returncode == 0

    def http_rtt_ms(self, n: int = 20) -> float:
        """Median time of a small request/response over one kept-alive connection."""
        import http.client
        conn = http.client.HTTPConnection(self.host, timeout=10)
        times = []
        for _ in range(n + 1):
            t0 = time.perf_counter()
            conn.request("GET", "/v2/")
            conn.getresponse().read()
            times.append((time.perf_counter() - t0) * 1000)
        conn.close()
        return round(median(times[1:]), 2)  # the first pays for the connection

    def relay_cpu_s(self) -> float | None:
        if self.relay is None or self.relay.poll() is not None:
            return None
        # ip netns exec execs the relay: same pid
        return cpu_s(self.relay.pid)

    def remove(self) -> None:
        if self.relay is not None:
            stop(self.relay, 5)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)


def throughput_mbs(host: str, repo: str, digest: str, nbytes: int = 256 << 20) -> float:
    """One ranged blob GET of nbytes through the link: its wall-clock MB/s."""
    import urllib.request
    req = urllib.request.Request(f"http://{host}/v2/{repo}/blobs/{digest}",
                                 headers={"Range": f"bytes=0-{nbytes - 1}"})
    t0 = time.perf_counter()
    got = 0
    with urllib.request.urlopen(req, timeout=120) as r:
        while chunk := r.read(1 << 20):
            got += len(chunk)
    return got / (time.perf_counter() - t0) / 1e6


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
        self.daemon: subprocess.Popen | None = None
        self.ctd = None
        if kind in LAZY_KINDS:
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
        return cmd + ["--snapshotter", SNAPSHOTTER] if self.kind in LAZY_KINDS else cmd

    def steps(self, ref: str, pull: str) -> list[dict]:
        """The cold start in steps, each measured alone (caches dropped once, before
        the pull; each step finds what the earlier ones fetched): pull, a container
        running /bin/true (snapshot + lazy mount + runc), `python3 -c pass` (the
        interpreter's own start), then the app. Times are to the exit of `ctr run --rm`."""
        ns = CRI_NS if self.kind in LAZY_KINDS else self.ctd.namespace
        drop_caches()
        out = []
        todo = [("pull", None), ("run /bin/true", ["/bin/true"]),
                ("run python3 -c pass", ["python3", "-c", "pass"]), ("run the app", [])]
        for i, (what, args) in enumerate(todo):
            mark = self.registry.mark()
            c0 = cpu_s(self.ctd.proc.pid)
            d0 = cpu_s(self.daemon.pid) if self.daemon else 0.0
            r0 = self.daemon_metrics()["totals"]["requests"] if self.daemon else 0
            h0 = holder_pid(os.path.join(self.dir, "cache")) if self.daemon else None
            h_cpu0 = cpu_s(h0) if h0 else 0.0
            t0 = time.perf_counter()
            if args is None:
                self._pull(ref, pull, ns)
            else:
                p = subprocess.run([*self._ctr_run(ns), ref, f"step{i}", *args],
                                   capture_output=True, timeout=600)
                if p.returncode != 0:
                    raise SystemExit(f"{what} failed: {p.stderr.decode(errors='replace')}")
            step = {"kind": self.kind, "step": what, "s": time.perf_counter() - t0,
                    **self.registry.traffic(mark),
                    "containerd_cpu_s": cpu_s(self.ctd.proc.pid) - c0}
            if self.daemon:
                step["daemon_cpu_s"] = cpu_s(self.daemon.pid) - d0
                step["daemon_requests"] = self.daemon_metrics()["totals"]["requests"] - r0
                h = holder_pid(os.path.join(self.dir, "cache"))
                step["holder_cpu_s"] = (cpu_s(h) - (h_cpu0 if h == h0 else 0.0)) if h else 0.0
            out.append(step)
        return out

    def timed(self, ref: str, pull: str) -> dict:
        """drop caches; pull; run; -> seconds to the output line and what it cost."""
        ctd = self.ctd
        ns = CRI_NS if self.kind in LAZY_KINDS else ctd.namespace
        drop_caches()
        load = os.getloadavg()[0]
        mark = self.registry.mark()
        ctd_cpu0 = cpu_s(ctd.proc.pid)
        d_cpu0 = cpu_s(self.daemon.pid) if self.daemon else 0.0
        cache = os.path.join(self.dir, "cache")
        h0 = holder_pid(cache) if self.daemon else None
        h_cpu0 = cpu_s(h0) if h0 else 0.0  # started with the first mount otherwise
        t0 = time.perf_counter()
        self._pull(ref, pull, ns)
        t_pull = time.perf_counter() - t0
        proc = subprocess.Popen([*self._ctr_run(ns), ref, f"cold-{self.kind}"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode(errors="replace")
        t_out = time.perf_counter() - t0
        traffic = self.registry.traffic(mark)
        ctd_cpu = cpu_s(ctd.proc.pid) - ctd_cpu0
        d_cpu = (cpu_s(self.daemon.pid) - d_cpu0) if self.daemon else None
        h = holder_pid(cache) if self.daemon else None
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
                       frontend_stats=m["frontend_stats"])
        return res

    def close(self, keep_logs: str | None = None) -> None:
        if keep_logs:  # the round's logs, for a look at where the time went
            dest = os.path.join(keep_logs, os.path.basename(self.dir))
            os.makedirs(dest, exist_ok=True)
            for name in ("daemon.log", "containerd.log"):
                if os.path.exists(os.path.join(self.dir, name)):
                    shutil.copy(os.path.join(self.dir, name), dest)
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


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def summarize(net: str, rounds: list[dict]) -> dict:
    full = [r for r in rounds if r["kind"] == "full"]
    lazy = [r for r in rounds if r["kind"] == "lazy"]
    s = {"net": net}
    for name, rs in (("full", full), ("lazy", lazy)):
        s[f"{name}_s"] = median([r["s"] for r in rs])
        s[f"{name}_pull_s"] = median([r["pull_s"] for r in rs])
        s[f"{name}_run_s"] = median([r["run_s"] for r in rs])
        s[f"{name}_bytes"] = median([r["bytes"] for r in rs])
        s[f"{name}_requests"] = median([r["requests"] for r in rs])
        s[f"{name}_containerd_cpu_s"] = median([r["containerd_cpu_s"] for r in rs])
        s[f"{name}_runs_s"] = [round(r["s"], 2) for r in rs]
    s["lazy_daemon_cpu_s"] = median([r["daemon_cpu_s"] for r in lazy])
    s["lazy_holder_cpu_s"] = median([r.get("holder_cpu_s") or 0.0 for r in lazy])
    s["time_ratio"] = s["lazy_s"] / s["full_s"]
    s["time_ratio_best"] = min(r["s"] for r in lazy) / min(r["s"] for r in full)
    s["bytes_ratio"] = s["lazy_bytes"] / s["full_bytes"]
    s["goals"] = [goal(f"{net}: lazy / full time, medians", s["time_ratio"], "<=",
                       GOALS.get(net, 0.3)),
                  goal(f"{net}: lazy / full bytes pulled", s["bytes_ratio"], "<=",
                       BYTES_GOAL)]
    zran = [r for r in rounds if r["kind"] == "zran"]
    if zran:   # the unconverted image through its zran index (docs/zran.md)
        s["zran_s"] = median([r["s"] for r in zran])
        s["zran_bytes"] = median([r["bytes"] for r in zran])
        s["zran_runs_s"] = [round(r["s"], 2) for r in zran]
        s["zran_daemon_cpu_s"] = median([r["daemon_cpu_s"] for r in zran])
        s["zran_time_ratio"] = s["zran_s"] / s["full_s"]
        s["zran_vs_nydus"] = s["zran_s"] / s["lazy_s"]
        s["goals"].append(goal(f"{net}: zran / full time, medians", s["zran_time_ratio"],
                               "<=", ZRAN_GOALS.get(net, 0.35)))
    return s


def print_rounds(rounds: list[dict]) -> None:
    print(f"{'net':8} {'#':>2} {'way':4} {'total s':>8} {'pull s':>7} {'run s':>6} "
          f"{'import s':>8} {'MB pulled':>10} {'reqs':>6} {'ctd cpu':>7} {'daemon cpu':>10} "
          f"{'load':>5} {'reg busy':>8} {'fetched MB (ahead)':>18} {'events':>6} "
          f"{'holder cpu':>10}")
    for r in rounds:
        dcpu = "" if r["daemon_cpu_s"] is None else f"{r['daemon_cpu_s']:.1f}"
        imp = "" if r["app_import_s"] is None else f"{r['app_import_s']:.2f}"
        print(f"{r['net']:8} {r['round']:>2} {r['kind']:4} {r['s']:8.2f} {r['pull_s']:7.2f} "
              f"{r['run_s']:6.2f} {imp:>8} {r['bytes'] / 1e6:10.1f} {r['requests']:6d} "
              f"{r['containerd_cpu_s']:7.1f} {dcpu:>10} {r['load']:5.1f} "
              f"{r['registry_busy_s']:8.2f}", end="")
        if r["kind"] in LAZY_KINDS:
            print(f" {r['daemon_bytes_fetched'] / 1e6:8.1f} ({r['readahead_bytes'] / 1e6:6.1f})"
                  f" {r['daemon_requests']:6d} {r.get('holder_cpu_s') or 0:10.1f}", end="")
        print()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each way per network")
    ap.add_argument("--net", default="loopback,link",
                    help="networks, comma-separated: loopback, link")
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
                    help="copy the registry's, containerd's and the daemon's logs here")
    ap.add_argument("--quick", action="store_true",
                    help="a tiny busybox image instead of the ML image (smoke test)")
    ap.add_argument("--mirror", help="Debian mirror for debootstrap (default: apt's)")
    ap.add_argument("--cache", default=str(mlimage.CACHE), help="image cache directory")
    ap.add_argument("--json", help="also write the JSON document here")
    ap.add_argument("--zran", action="store_true",
                    help="also index the source image with `convert --oci-ref` and run it "
                         "lazily through its zran index (a third way)")
    args = ap.parse_args()
    ways = ["full", "lazy", "zran"] if args.zran else ["full", "lazy"]
    if os.geteuid() != 0:
        raise SystemExit("error: needs root (containerd, mounts, drop_caches, netns)")
    for tool in ("containerd", "ctr", "runc", "docker-registry", "ip", "tc"):
        if shutil.which(tool) is None:
            raise SystemExit(f"error: {tool} not installed (apt-get install containerd runc "
                             "docker-registry iproute2)")
    nets = [n.strip() for n in args.net.split(",") if n.strip()]
    if not nets or any(n not in ("loopback", "link") for n in nets):
        raise SystemExit(f"error: --net: loopback and/or link, not {args.net!r}")
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
                    "pull": pull, "daemon_args": list(daemon_args), "rounds": [],
                    "nets": {}, "anchors": anchors()}
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
        if args.zran:
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "erofs_tools", "convert", "--oci-ref",
                                "--insecure", f"{registry.host}/ml/src:1",
                                f"{registry.host}/ml/zran:1", "--json"], capture_output=True,
                               text=True, cwd=REPO, env=child_env())
            if p.returncode != 0:
                raise SystemExit(f"convert --oci-ref failed: {p.stderr[-3000:]}")
            z = json.loads(p.stdout)
            index = z["meta_bytes"] + z["bootstrap_layer_size"]
            result["zran"] = {"convert_s": round(time.perf_counter() - t0, 1),
                              "index_bytes": index, "meta_bytes": z["meta_bytes"],
                              "bootstrap_layer_bytes": z["bootstrap_layer_size"],
                              "image_bytes": z["compressed_layer_bytes"],
                              "index_ratio": index / z["compressed_layer_bytes"],
                              "layers_placed": z["layers_placed"]}
            log(f"zran index in {result['zran']['convert_s']} s: {index / 1e6:.2f} MB = "
                f"{100 * result['zran']['index_ratio']:.2f} % of the image")
        client.close()
        for net in nets:
            if net == "link":
                registry.stop()
                link = Link(args.rate, args.rtt_ms, workdir)
                registry = Registry(workdir, storage, link.registry_addr, link.ns, link.host)
                result["link"] = {"rate": args.rate, "rtt_ms": args.rtt_ms,
                                  "emulation": link.emulation,
                                  "http_rtt_ms": link.http_rtt_ms(),
                                  "blob_get_MBps": round(throughput_mbs(
                                      registry.host, "ml/src", info["layers"][1]["digest"],
                                      min(256 << 20, info["layers"][1]["size"])), 1)}
                log(f"link: {result['link']}")
            rounds = []
            for i in range(args.rounds):
                order = ways[i % len(ways):] + ways[:i % len(ways)]
                for kind in order:
                    ref = f"{registry.host}/ml/{REPOS[kind]}:1"
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
                    ref = f"{registry.host}/ml/{REPOS[kind]}:1"
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
    for net, s in result["nets"].items():
        print(f"{net}: full {s['full_s']:.2f} s, lazy {s['lazy_s']:.2f} s (medians of "
              f"{args.rounds}); lazy/full {s['time_ratio']:.3f} (best runs "
              f"{s['time_ratio_best']:.3f}); bytes {s['lazy_bytes'] / 1e6:.1f} / "
              f"{s['full_bytes'] / 1e6:.1f} MB = {s['bytes_ratio']:.3f}; daemon CPU "
              f"{s['lazy_daemon_cpu_s']:.1f} s, fd holder CPU {s['lazy_holder_cpu_s']:.1f} s")
        goals += s["goals"]
        if "zran_s" in s:
            print(f"{net}: zran {s['zran_s']:.2f} s (medians); zran/full "
                  f"{s['zran_time_ratio']:.3f}, zran/nydus {s['zran_vs_nydus']:.3f}; bytes "
                  f"{s['zran_bytes'] / 1e6:.1f} MB; daemon CPU {s['zran_daemon_cpu_s']:.1f} s")
    if "zran" in result:
        goals.append(goal("zran index / image size", result["zran"]["index_ratio"], "<=",
                          0.03))
    if result.get("steps"):
        print(f"{'net':8} {'way':4} {'step':22} {'s':>6} {'MB':>8} {'reqs':>5} {'ctd cpu':>7} "
              f"{'daemon cpu':>10} {'daemon reqs':>11} {'holder cpu':>10}")
        for st in result["steps"]:
            print(f"{st['net']:8} {st['kind']:4} {st['step']:22} {st['s']:6.2f} "
                  f"{st['bytes'] / 1e6:8.1f} {st['requests']:5d} {st['containerd_cpu_s']:7.1f} "
                  f"{st.get('daemon_cpu_s', 0):10.1f} {st.get('daemon_requests', 0):11d} "
                  f"{st.get('holder_cpu_s', 0):10.1f}")
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
