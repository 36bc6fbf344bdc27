"""Socket paths a unix socket cannot have are refused in one line, before anything starts
(bind(2) alone says only "AF_UNIX path too long", deep in a traceback)."""

import os
import subprocess
import sys

import pytest

from fscache_daemon.errors import UNIX_PATH_MAX, DaemonError, check_unix_socket_path


def test_check_unix_socket_path_bounds():
    ok = "/" + "a" * (UNIX_PATH_MAX - 1)
    assert check_unix_socket_path(ok) == ok
    with pytest.raises(DaemonError, match=r"108 bytes, unix sockets allow at most 107"):
        check_unix_socket_path(ok + "b", "API socket")


@pytest.mark.parametrize("which", ["api", "holder"])
def test_run_with_too_long_socket_path_is_one_line_error(tmp_path, which):
    deep = tmp_path / ("d" * 110)
    deep.mkdir()
    short = tmp_path / "s"
    short.mkdir()
    api = deep / "api.sock" if which == "api" else short / "api.sock"
    cache = short / "c" if which == "api" else deep
    r = subprocess.run([sys.executable, "-m", "fscache_daemon.cli", "run", "--cache-dir",
                        str(cache), "--api-sock", str(api), "--frontend",
                        "none" if which == "api" else "fanotify"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr
    name = "api.sock" if which == "api" else "fdholder.sock"
    assert f"{name}: " in lines[0] and "at most 107" in lines[0]
    assert not os.path.exists(api)
