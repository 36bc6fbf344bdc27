"""fscache-daemon run exits cleanly when its front end cannot start."""
import os
import subprocess
import sys

import helpers
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


def test_stop_ends_a_running_daemon(tmp_path):
    sock = str(tmp_path / "api.sock")
    p = subprocess.Popen([sys.executable, "-m", "fscache_daemon.cli", "run", "--frontend",
                          "none", "--cache-dir", str(tmp_path / "c"), "--api-sock", sock],
                         stderr=subprocess.DEVNULL)
    try:
        # until the daemon answers on its socket (the path alone could exist before it
        # listens; and 30 s without a check ran `stop` against a daemon still starting)
        from fscache_daemon.api import socket_answers
        helpers.wait_until(lambda: socket_answers(sock) or p.poll() is not None,
                           what="the daemon answering", interval=0.05)
        assert p.poll() is None, f"the daemon exited with {p.returncode} at start"
        r = subprocess.run([sys.executable, "-m", "fscache_daemon.cli", "stop",
                            "--release-holder", "--api-sock", sock],
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert f"pid {p.pid}" in r.stdout.decode()
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()


def _rpull(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fscache_daemon.cli", "rpull", *args],
                          capture_output=True, text=True, timeout=60)


def test_rpull_errors_are_one_line(tmp_path):
    """Bad input to rpull: `error: ...` on one line, exit 1, before any registry or
    containerd work (the real-containerd cases are in test_rpull.py)."""
    import socket
    stale = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.close()               # a socket file nobody listens on: a stopped containerd's
    cases = [
        (["UPPER/Case:1", "--address", stale], "UPPER/Case"),
        (["127.0.0.1:1/a/b:1", "--address", stale], "Connection refused"),
        (["127.0.0.1:1/a/b:1", "--address", str(tmp_path / "none.sock")],
         "No such file or directory"),
    ]
    for args, needle in cases:
        r = _rpull(*args)
        assert r.returncode == 1 and r.stdout == "", (args, r)
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert needle in r.stderr, r.stderr
