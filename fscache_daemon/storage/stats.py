"""Per-blob counters and request latency percentiles for the metrics API."""

from __future__ import annotations

import collections
import threading

LATENCY_SAMPLES = 8192


# Where the time of the current thread's fill went (seconds): backend reads, decode
# + verify + write, waits for chunks other fills had in flight. Reset by the caller
# (the daemon's fill, for its DEBUG line); each thread keeps its own.
FILL_TIMES = threading.local()


def add_fill_time(what: str, dt: float) -> None:
    setattr(FILL_TIMES, what, getattr(FILL_TIMES, what, 0.0) + dt)


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
        self._read_lat = collections.deque(maxlen=LATENCY_SAMPLES)   # backend requests
        self.latency_sum = 0.0
        # where a reader's request spends its time: backend requests (any fill), and
        # waiting for chunks another fill (readahead, another reader) had in flight
        self.backend_read_s = 0.0
        self.flight_wait_s = 0.0
        self.flight_waits = 0

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

    def record_backend_read(self, seconds: float) -> None:
        with self._lock:
            self._read_lat.append(seconds)
            self.backend_read_s += seconds

    def record_flight_wait(self, seconds: float) -> None:
        """A reader's request waited `seconds` for chunks another fill was fetching."""
        with self._lock:
            self.flight_waits += 1
            self.flight_wait_s += seconds

    def snapshot(self) -> dict:
        with self._lock:
            out = dict(self.counters)
            lat = sorted(self._lat)
            miss = sorted(self._miss_lat)
            total = self.latency_sum
            reads = sorted(self._read_lat)
            out["backend_read_s"] = round(self.backend_read_s, 6)
            out["flight_waits"] = self.flight_waits
            out["flight_wait_s"] = round(self.flight_wait_s, 6)
        out["latency_p50_ms"] = round(percentile(lat, 0.50) * 1000, 3)
        out["latency_p99_ms"] = round(percentile(lat, 0.99) * 1000, 3)
        out["latency_max_ms"] = round((lat[-1] if lat else 0.0) * 1000, 3)
        out["latency_sum_s"] = round(total, 6)
        out["fetch_latency_p50_ms"] = round(percentile(miss, 0.50) * 1000, 3)
        out["fetch_latency_p99_ms"] = round(percentile(miss, 0.99) * 1000, 3)
        out["backend_read_p50_ms"] = round(percentile(reads, 0.50) * 1000, 3)
        out["backend_read_p99_ms"] = round(percentile(reads, 0.99) * 1000, 3)
        return out
