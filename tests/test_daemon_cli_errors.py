"""fscache-daemon run exits cleanly when its front end cannot start."""
import os
import subprocess
import sys

import pytest


@pytest.mark.skipif(os.path.exists("/dev/cachefiles"), reason="this kernel has cachefiles")
def test_run_without_cachefiles_exits_with_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fscache_daemon.cli", "run", "--frontend",
                        "cachefiles", "--cache-dir", str(tmp_path / "c"), "--api-sock",
                        str(tmp_path / "api.sock")], capture_output=True, timeout=60)
    assert r.returncode == 1
    last = r.stderr.decode().strip().splitlines()[-1]
    assert last.startswith("error: ") and "cachefiles" in last
    assert not (tmp_path / "api.sock").exists()
