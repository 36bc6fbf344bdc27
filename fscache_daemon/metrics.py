"""Metrics: per-blob counters, the daemon process, and the Prometheus text format."""

from __future__ import annotations

import threading
import time

import psutil

# cpu_percent is averaged over at least this long: two requests a few ms apart (status
# asks for the daemon and the metrics) must not divide a tick of CPU by a tick of time
CPU_WINDOW_S = 1.0


class ProcessSampler:
    """The daemon process's resource use. cpu_percent is the CPU time used between two
    samples at least CPU_WINDOW_S apart divided by the wall time between them (100 = one
    core busy); a request within the window gets the last value again."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self._lock = threading.Lock()
        self._t = time.monotonic()
        self._cpu = self._cpu_s()
        self._percent = 0.0

    def _cpu_s(self) -> float:
        c = self.proc.cpu_times()
        return c.user + c.system

    def cpu_percent(self) -> float:
        with self._lock:
            now, cpu = time.monotonic(), self._cpu_s()
            if now - self._t >= CPU_WINDOW_S:
                self._percent = round(100.0 * (cpu - self._cpu) / (now - self._t), 1)
                self._t, self._cpu = now, cpu
            return self._percent

    def sample(self) -> dict:
        percent = self.cpu_percent()
        with self.proc.oneshot():
            mem = self.proc.memory_info()
            cpu = self.proc.cpu_times()
            return {"pid": self.proc.pid, "rss_bytes": mem.rss, "vms_bytes": mem.vms,
                    "cpu_user_s": cpu.user, "cpu_system_s": cpu.system,
                    "cpu_percent": percent, "threads": self.proc.num_threads(),
                    "open_fds": self.proc.num_fds()}


PROM_COUNTERS = {
    "requests": ("fscache_daemon_blob_requests_total", "Kernel read requests for the blob"),
    "requests_failed": ("fscache_daemon_blob_requests_failed_total",
                        "Requests answered with an I/O error"),
    "bytes_fetched": ("fscache_daemon_blob_backend_bytes_total",
                      "Bytes fetched from the backend (stored, compressed)"),
    "bytes_served_from_cache": ("fscache_daemon_blob_cache_bytes_total",
                                "Requested bytes already in the cache"),
    "prefetch_bytes": ("fscache_daemon_blob_prefetch_bytes_total",
                       "Stored bytes fetched by background prefetch (whole-blob or the "
                       "image's prefetch list)"),
    "readahead_bytes": ("fscache_daemon_blob_readahead_bytes_total",
                        "Stored bytes fetched ahead of a reader (readahead windows)"),
    "verify_failures": ("fscache_daemon_blob_verify_failures_total",
                        "Chunks that failed digest verification"),
    "backend_errors": ("fscache_daemon_blob_backend_errors_total", "Failed backend requests"),
    "chunks_fetched": ("fscache_daemon_blob_chunks_fetched_total", "Chunks fetched and stored"),
}


def prometheus_text(m: dict) -> str:
    out = []

    def esc(v: str) -> str:
        return v.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")

    for key, (name, help_) in PROM_COUNTERS.items():
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} counter")
        for b, s in m["blobs"].items():
            out.append(f'{name}{{blob="{esc(b)}"}} {s[key]}')
    out.append("# HELP fscache_daemon_blob_request_latency_seconds Request latency quantiles")
    out.append("# TYPE fscache_daemon_blob_request_latency_seconds summary")
    for b, s in m["blobs"].items():
        out.append(f'fscache_daemon_blob_request_latency_seconds{{blob="{esc(b)}",'
                   f'quantile="0.5"}} {s["latency_p50_ms"] / 1000:.6f}')
        out.append(f'fscache_daemon_blob_request_latency_seconds{{blob="{esc(b)}",'
                   f'quantile="0.99"}} {s["latency_p99_ms"] / 1000:.6f}')
        out.append(f'fscache_daemon_blob_request_latency_seconds_sum{{blob="{esc(b)}"}} '
                   f'{s["latency_sum_s"]}')
        out.append(f'fscache_daemon_blob_request_latency_seconds_count{{blob="{esc(b)}"}} '
                   f'{s["requests"]}')
    out.append("# HELP fscache_daemon_blob_cached_ratio Fraction of the blob's chunks cached")
    out.append("# TYPE fscache_daemon_blob_cached_ratio gauge")
    for b, s in m["blobs"].items():
        ratio = s["cached_chunks"] / s["total_chunks"] if s["total_chunks"] else 1.0
        out.append(f'fscache_daemon_blob_cached_ratio{{blob="{esc(b)}"}} {ratio:.6f}')
    calls = m.get("snapshotter", {}).get("calls", {})
    if calls:
        name = "fscache_daemon_snapshotter_call_seconds"
        out.append(f"# HELP {name} containerd snapshots API call latency (recent calls)")
        out.append(f"# TYPE {name} summary")
        for call, c in sorted(calls.items()):
            for q, key in (("0.5", "p50_ms"), ("0.99", "p99_ms")):
                out.append(f'{name}{{call="{esc(call)}",quantile="{q}"}} '
                           f'{c[key] / 1000:.6f}')
            out.append(f'{name}_sum{{call="{esc(call)}"}} {c["sum_s"]}')
            out.append(f'{name}_count{{call="{esc(call)}"}} {c["count"]}')
    p = m["process"]
    for name, help_, typ, val in (
            ("fscache_daemon_mounts", "Mounted images", "gauge", m["mounts"]),
            ("fscache_daemon_process_resident_memory_bytes", "Resident set size", "gauge",
             p["rss_bytes"]),
            ("fscache_daemon_process_cpu_seconds_total", "User and system CPU time",
             "counter", round(p["cpu_user_s"] + p["cpu_system_s"], 6)),
            ("fscache_daemon_process_open_fds", "Open file descriptors", "gauge",
             p["open_fds"]),
            ("fscache_daemon_uptime_seconds", "Seconds since start", "gauge", m["uptime_s"]),
            ("fscache_daemon_cache_bytes", "Bytes the blob cache occupies on disk", "gauge",
             m["cache"]["bytes"]),
            ("fscache_daemon_cache_in_use_bytes", "Cache bytes of blobs in use", "gauge",
             m["cache"]["in_use_bytes"]),
            ("fscache_daemon_cache_limit_bytes", "Cache size limit (-1: none)", "gauge",
             -1 if m["cache"]["limit"] is None else m["cache"]["limit"]),
            ("fscache_daemon_cache_evicted_bytes_total", "Bytes evicted for the limit",
             "counter", m["cache"]["evicted_bytes"])):
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {typ}", f"{name} {val}"]
    return "\n".join(out) + "\n"
