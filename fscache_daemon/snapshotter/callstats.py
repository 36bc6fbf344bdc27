"""Per-call latency of the snapshots service: how long containerd waits on each gRPC
call (Prepare, Mounts, Commit, ...), as counts, errors and p50/p99/max over the most
recent calls. The daemon shows them in its metrics (`snapshotter.calls`) when it runs
the service (`fscache-daemon run --snapshotter-socket`)."""

from __future__ import annotations

import threading
from collections import deque

WINDOW = 4096       # recent calls per method the quantiles are taken over (bounded memory)


def _quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of an ascending list (0.0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-int(q * 1000) * len(sorted_values) // 1000))   # ceil(q * n)
    return sorted_values[min(rank, len(sorted_values)) - 1]


class CallStats:
    """Thread-safe: gRPC runs calls on a pool of worker threads."""

    def __init__(self, window: int = WINDOW) -> None:
        self._lock = threading.Lock()
        self._window = window
        self._recent: dict[str, deque[float]] = {}
        self._count: dict[str, int] = {}
        self._errors: dict[str, int] = {}
        self._sum: dict[str, float] = {}

    def record(self, call: str, seconds: float, failed: bool) -> None:
        with self._lock:
            if call not in self._recent:
                self._recent[call] = deque(maxlen=self._window)
                self._count[call] = self._errors[call] = 0
                self._sum[call] = 0.0
            self._recent[call].append(seconds)
            self._count[call] += 1
            self._errors[call] += int(failed)
            self._sum[call] += seconds

    def snapshot(self) -> dict[str, dict[str, float]]:
        """{call: {count, errors, sum_s, p50_ms, p99_ms, max_ms}}; the quantiles and the
        maximum over the last WINDOW calls of that kind."""
        with self._lock:
            recent = {c: sorted(v) for c, v in self._recent.items()}
            out = {c: {"count": self._count[c], "errors": self._errors[c],
                       "sum_s": round(self._sum[c], 6)} for c in recent}
        for c, values in recent.items():
            out[c].update(p50_ms=round(_quantile(values, 0.50) * 1000, 3),
                          p99_ms=round(_quantile(values, 0.99) * 1000, 3),
                          max_ms=round(values[-1] * 1000, 3) if values else 0.0)
        return out
