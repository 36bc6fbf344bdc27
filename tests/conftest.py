"""Project-wide pytest configuration.

EROFS_TOOLS_CI=1 turns missing prerequisites (root, kernel features, tools) into
failures instead of skips, structurally: whatever skips a test (helpers.require(), a
skipif marker, pytest.skip() in a fixture or at module level, importorskip) is
reported as a failure under CI, and so is a non-strict xfail (an xfail may only stay
when it is strict, i.e. an unexpected pass fails too).
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CI = os.environ.get("EROFS_TOOLS_CI") == "1"


def _skip_reason(rep) -> str:
    longrepr = rep.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _xfail_is_strict(item) -> bool:
    default = bool(item.config.getini("xfail_strict"))
    marks = list(item.iter_markers("xfail"))
    return bool(marks) and all(m.kwargs.get("strict", default) for m in marks)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not CI:
        return
    if hasattr(rep, "wasxfail"):
        if not _xfail_is_strict(item):
            rep.outcome = "failed"
            rep.longrepr = (f"non-strict xfail under EROFS_TOOLS_CI=1 ({rep.wasxfail!r}): "
                            "make it strict or fix the test")
            del rep.wasxfail
        return
    if rep.skipped:
        rep.outcome = "failed"
        rep.longrepr = f"skipped under EROFS_TOOLS_CI=1 (a skip is a failure in CI): " \
                       f"{_skip_reason(rep)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    rep = outcome.get_result()
    if CI and rep.skipped:
        rep.outcome = "failed"
        rep.longrepr = f"module skipped under EROFS_TOOLS_CI=1: {_skip_reason(rep)}"


@pytest.fixture
def root_kernel():
    """Root and a kernel that mounts EROFS images (file-backed): what mounting needs."""
    from helpers import is_root, require, require_root_kernel
    require(is_root(), "needs root (mount)")
    require_root_kernel()
