"""The C core parsers' own fuzzer (tools/fuzz_native.py: the fd holder's event-stream
parser, the chunk-info table's pins and chunk maps, the daemon's cold path, its mount-time
walks of the newest image shapes) runs with zero failures.
EROFS_TOOLS_FUZZ_CASES overrides the case count (docs/fuzzing.md has the long runs)."""
from __future__ import annotations

import importlib.util
import os

# the fuzzer is a tool, not a library module
_SPEC = importlib.util.spec_from_file_location(
    "fuzz_native", os.path.join(os.path.dirname(__file__), "..", "tools", "fuzz_native.py"))
fuzz = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(fuzz)

CASES = int(os.environ.get("EROFS_TOOLS_FUZZ_CASES", "2000"))


def test_fuzz_native_cases():
    res = fuzz.run(CASES, seed="suite", timeout=20.0)
    assert res["cases"] == CASES
    assert not res["failures"], "\n".join(
        f"case {f['case']} [{f['target']}]: {f['error']}\n{f.get('traceback', '')}"
        for f in res["failures"][:10])
    o = res["outcomes"]
    # the mutations reach every side: answered events, streams refused, pins, chunk maps
    assert o.get("fanhold:allowed", 0) > CASES // 50
    assert o.get("fanhold:refused (parser too)", 0) > CASES // 50
    assert o.get("ci:pins with maps", 0) > CASES // 50 and o.get("ci:refused", 0) > CASES // 50
    assert o.get("cold:decoded", 0) > CASES // 50 and o.get("cold:none-decoded", 0) > 0
    # the daemon's walks of the newest image shapes: the C walk takes some, leaves some
    def walks(prefix):
        return sum(v for k, v in o.items() if k.startswith(prefix))
    assert walks("walk:c-walk") > CASES // 100 and walks("walk:reader-walk") > CASES // 100
    assert walks("walk:open-refused") > 0


def test_fuzz_native_case_is_reproducible():
    a = fuzz.run(1, seed="repro", only=7)
    b = fuzz.run(1, seed="repro", only=7)
    assert a["outcomes"] == b["outcomes"] and a["per_target"] == b["per_target"]
