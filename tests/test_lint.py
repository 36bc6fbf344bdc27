"""Lint and type checks as part of the suite (issue 13): `ruff check .` over the whole
repository and `mypy` over the packages pyproject.toml names, both with pyproject's
configuration, run from the repository root with this interpreter's tools. A finding of
either fails the suite, and so CI, which runs it."""
import importlib.util
import subprocess
import sys
from pathlib import Path

from helpers import require

REPO = Path(__file__).resolve().parent.parent


def _run(tool, *args):
    """`python -m tool args` in the repository root; (exit status, its output)."""
    # skipped without the tool, except under EROFS_TOOLS_CI=1: there a missing checker
    # must fail the run rather than let errors through unseen
    require(importlib.util.find_spec(tool) is not None,
            f"{tool} not installed (pip install -e '.[test]')")
    proc = subprocess.run([sys.executable, "-m", tool, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def test_ruff_clean():
    rc, out = _run("ruff", "check", ".")
    assert rc == 0, f"ruff check . found problems (exit {rc}):\n{out}"
    assert "All checks passed" in out, out


def test_mypy_clean():
    # no targets on the command line: mypy checks pyproject's `packages`
    rc, out = _run("mypy")
    assert rc == 0, f"mypy found problems (exit {rc}):\n{out}"
    assert out.startswith("Success: no issues found"), out
