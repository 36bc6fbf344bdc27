"""Per-blob counters and request latency percentiles for the metrics API."""

from __future__ import annotations

import collections
import threading

LATENCY_SAMPLES = 8192


def percentile(sorted_values, q: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[k]


class BlobStats:
    COUNTERS = ("requests", "requests_failed", "bytes_requested", "bytes_served_from_cache",
                "requests_from_cache", "bytes_fetched", "prefetch_bytes", "backend_requests",
                "backend_errors", "chunks_fetched", "verify_failures", "readahead_bytes")

    def __init__(self):
        self._lock = threading.Lock()
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        self._lat = collections.deque(maxlen=LATENCY_SAMPLES)
        self._miss_lat = collections.deque(maxlen=LATENCY_SAMPLES)   # requests that fetched
        self.latency_sum = 0.0

    def add(self, **kw) -> None:
        with self._lock:
            for k, v in kw.items():
                self.counters[k] += v

    def record_request(self, nbytes: int, from_cache: bool, seconds: float, failed: bool) -> None:
        with self._lock:
            c = self.counters
            c["requests"] += 1
            c["bytes_requested"] += nbytes
            if failed:
                c["requests_failed"] += 1
            if from_cache:
                c["requests_from_cache"] += 1
                c["bytes_served_from_cache"] += nbytes
            else:
                self._miss_lat.append(seconds)
            self._lat.append(seconds)
            self.latency_sum += seconds

    def snapshot(self) -> dict:
        with self._lock:
            out = dict(self.counters)
            lat = sorted(self._lat)
            miss = sorted(self._miss_lat)
            total = self.latency_sum
        out["latency_p50_ms"] = round(percentile(lat, 0.50) * 1000, 3)
        out["latency_p99_ms"] = round(percentile(lat, 0.99) * 1000, 3)
        out["latency_max_ms"] = round((lat[-1] if lat else 0.0) * 1000, 3)
        out["latency_sum_s"] = round(total, 6)
        out["fetch_latency_p50_ms"] = round(percentile(miss, 0.50) * 1000, 3)
        out["fetch_latency_p99_ms"] = round(percentile(miss, 0.99) * 1000, 3)
        return out
