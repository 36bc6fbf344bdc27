"""Medians, ratios, goals and the printed tables of benchmarks/coldstart_containerd.py.

Ways: `full` (overlayfs: ctr pull + ctr run), `lazy` (the plain Nydus image through the
snapshotter: rpull + ctr run) and `optimized` (the same image after `erofs-tools
optimize` with a trace of an earlier lazy run: its prefetch table is streamed at mount)
and `zran` (the unconverted source image through its `convert --oci-ref` index: the
original gzip layers read by range, docs/zran.md).
"""
from __future__ import annotations

import statistics

from benchlib import goal

# issue 14: lazy / full; issue 15: optimized / full (both nets), bytes for both
GOALS = {"loopback": 0.3, "link": 0.2}
OPT_GOAL = 0.12
ZRAN_GOALS = {"loopback": 0.35, "link": 0.25}     # issue 16: unconverted image, zran index
BYTES_GOAL = 0.25
LAZY_WAYS = ("lazy", "optimized", "zran")


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def summarize(net: str, rounds: list[dict]) -> dict:
    s: dict = {"net": net}
    ways = [w for w in ("full", *LAZY_WAYS) if any(r["kind"] == w for r in rounds)]
    for name in ways:
        rs = [r for r in rounds if r["kind"] == name]
        for key in ("s", "pull_s", "run_s", "bytes", "requests", "containerd_cpu_s"):
            s[f"{name}_{key}"] = median([r[key] for r in rs])
        s[f"{name}_runs_s"] = [round(r["s"], 2) for r in rs]
        if name in LAZY_WAYS:
            s[f"{name}_daemon_cpu_s"] = median([r["daemon_cpu_s"] for r in rs])
            s[f"{name}_holder_cpu_s"] = median([r.get("holder_cpu_s") or 0.0 for r in rs])
    s["goals"] = []
    if "full" not in ways:
        return s
    full_best = min(r["s"] for r in rounds if r["kind"] == "full")
    for name, prefix, target in (("lazy", "", GOALS.get(net, 0.3)),
                                 ("optimized", "opt_", OPT_GOAL),
                                 ("zran", "zran_", ZRAN_GOALS.get(net, 0.35))):
        if name not in ways:
            continue
        s[f"{prefix}time_ratio"] = s[f"{name}_s"] / s["full_s"]
        s[f"{prefix}time_ratio_best"] = min(
            r["s"] for r in rounds if r["kind"] == name) / full_best
        s[f"{prefix}bytes_ratio"] = s[f"{name}_bytes"] / s["full_bytes"]
        s["goals"] += [goal(f"{net}: {name} / full time, medians", s[f"{prefix}time_ratio"],
                            "<=", target),
                       goal(f"{net}: {name} / full bytes pulled", s[f"{prefix}bytes_ratio"],
                            "<=", BYTES_GOAL)]
    if "zran" in ways and "lazy" in ways:
        s["zran_vs_nydus"] = s["zran_s"] / s["lazy_s"]
    return s


def print_rounds(rounds: list[dict]) -> None:
    print(f"{'net':8} {'#':>2} {'way':9} {'total s':>8} {'pull s':>7} {'run s':>6} "
          f"{'import s':>8} {'MB pulled':>10} {'reqs':>6} {'ctd cpu':>7} {'daemon cpu':>10} "
          f"{'load':>5} {'reg busy':>8} {'fetched MB (ahead/prefetch)':>27} {'events':>6} "
          f"{'holder cpu':>10}")
    for r in rounds:
        dcpu = "" if r["daemon_cpu_s"] is None else f"{r['daemon_cpu_s']:.1f}"
        imp = "" if r["app_import_s"] is None else f"{r['app_import_s']:.2f}"
        print(f"{r['net']:8} {r['round']:>2} {r['kind']:9} {r['s']:8.2f} {r['pull_s']:7.2f} "
              f"{r['run_s']:6.2f} {imp:>8} {r['bytes'] / 1e6:10.1f} {r['requests']:6d} "
              f"{r['containerd_cpu_s']:7.1f} {dcpu:>10} {r['load']:5.1f} "
              f"{r['registry_busy_s']:8.2f}", end="")
        if r["kind"] in LAZY_WAYS:
            print(f" {r['daemon_bytes_fetched'] / 1e6:9.1f} ({r['readahead_bytes'] / 1e6:6.1f}"
                  f"/{r['prefetch_bytes'] / 1e6:6.1f}) {r['daemon_requests']:6d} "
                  f"{r.get('holder_cpu_s') or 0:10.1f}", end="")
        print()


def print_summary(net: str, s: dict, rounds: int) -> None:
    parts = [f"{w} {s[f'{w}_s']:.2f} s" for w in ("full", *LAZY_WAYS) if f"{w}_s" in s]
    print(f"{net}: {', '.join(parts)} (medians of {rounds})")
    for name, prefix in (("lazy", ""), ("optimized", "opt_"), ("zran", "zran_")):
        if f"{prefix}time_ratio" not in s:
            continue
        print(f"  {name}/full {s[f'{prefix}time_ratio']:.3f} (best runs "
              f"{s[f'{prefix}time_ratio_best']:.3f}); bytes {s[f'{name}_bytes'] / 1e6:.1f} / "
              f"{s['full_bytes'] / 1e6:.1f} MB = {s[f'{prefix}bytes_ratio']:.3f}; daemon CPU "
              f"{s[f'{name}_daemon_cpu_s']:.1f} s, fd holder CPU "
              f"{s[f'{name}_holder_cpu_s']:.1f} s")


def print_steps(steps: list[dict]) -> None:
    print(f"{'net':8} {'way':9} {'step':22} {'s':>6} {'MB':>8} {'reqs':>5} {'ctd cpu':>7} "
          f"{'daemon cpu':>10} {'daemon reqs':>11} {'holder cpu':>10}")
    for st in steps:
        print(f"{st['net']:8} {st['kind']:9} {st['step']:22} {st['s']:6.2f} "
              f"{st['bytes'] / 1e6:8.1f} {st['requests']:5d} {st['containerd_cpu_s']:7.1f} "
              f"{st.get('daemon_cpu_s', 0):10.1f} {st.get('daemon_requests', 0):11d} "
              f"{st.get('holder_cpu_s', 0):10.1f}")
