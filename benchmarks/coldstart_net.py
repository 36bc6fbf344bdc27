"""The registry of benchmarks/coldstart_containerd.py, on loopback or behind an emulated
link (a network namespace, a veth pair, netem or tbf + benchmarks/delay_relay.py), and
the process helpers both use."""
from __future__ import annotations

import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path


def cpu_s(pid: int) -> float:
    """user + system CPU seconds of a process and its reaped children."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def stop(proc: subprocess.Popen | None, timeout: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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
        return round(statistics.median(times[1:]), 2)  # the first pays for the connection

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
