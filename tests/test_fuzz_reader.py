"""Fuzz the read side: thousands of mutated images and blobs through open/inspect, check,
unpack (directory and tar), stat and the blob-meta parser, each case under a wall-clock
alarm in a worker whose address space is capped (RLIMIT_AS). Only ErofsToolsError may
come out. EROFS_TOOLS_FUZZ_CASES overrides the case count (docs/fuzzing.md has a longer
run)."""
import importlib.util
import os

import pytest

# the fuzzer is a tool (tools/fuzz_reader.py), not a library module
_SPEC = importlib.util.spec_from_file_location(
    "fuzz_reader", os.path.join(os.path.dirname(__file__), "..", "tools", "fuzz_reader.py"))
fuzz = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(fuzz)

CASES = int(os.environ.get("EROFS_TOOLS_FUZZ_CASES", "2000"))


def _report(res):
    lines = [f"{len(res['failures'])} of {res['cases']} cases failed"]
    for f in res["failures"][:20]:
        lines.append(f"case {f['case']} [{f.get('seed')}] {f.get('mutation')}: {f['error']}")
        if f.get("traceback"):
            lines.append(f["traceback"])
    return "\n".join(lines)


def test_fuzz_reader_cases():
    res = fuzz.run(CASES, jobs=2, seed="suite", timeout=20.0, mem=1024)
    assert res["cases"] == CASES
    assert not res["failures"], _report(res)
    # the corpus holds Nydus-written, mkfs.erofs-written and our own images
    assert {"nydus-vector", "nydus-inline-meta", "zran"} <= set(res["seeds"])
    # and the late seeds of our mkfs's newer layouts (--zD, --chunksize, -E48bit -z)
    assert {name for name, _a, _d in fuzz.LATE_SEEDS_OURS} <= set(res["seeds"])
    # and the newest shapes: --MZ (with -m too), --tar=i -z, --incremental
    newer = {name for name, _a in fuzz.NEWER_SEEDS_OURS}
    assert newer <= set(res["seeds"])
    assert all(res["cases_per_seed"].get(name, 0) > 0 for name in newer), res["cases_per_seed"]
    # mutations reach deep: some cases still unpack, many are rejected
    o = res["outcomes"]
    assert o.get("unpack:ok", 0) > CASES // 10 and o.get("open:err", 0) > CASES // 20
    # whatever check calls clean, unpack extracts (check misses no rule unpack enforces)
    assert o.get("check-clean-unpack-failed", 0) == 0, res["check_clean_but_unpack_failed"]


def test_fuzz_case_is_reproducible():
    a = fuzz.run(1, jobs=1, seed="repro", only=0)
    b = fuzz.run(1, jobs=1, seed="repro", only=0)
    assert a["cases"] == b["cases"] == 1
    assert a["outcomes"] == b["outcomes"]


@pytest.mark.parametrize("seed,cases,case", [("long5", 60000, 2194), ("long5", 60000, 39413),
                                             ("long6", 40000, 37324)])
def test_long_run_findings_stay_fixed(seed, cases, case):
    """Found by the long runs `--seed long5` (60,000 cases) and `long6` (40,000): spliced
    bytes gave a file a name, or a blob a device-table id, holding a newline; errors that
    quoted it took several lines (now escaped: errors.shown_path, and ErofsToolsError's
    str() for whatever else a message quotes)."""
    res = fuzz.run(cases, jobs=1, seed=seed, only=case)
    assert res["cases"] == 1 and not res["failures"], _report(res)
