"""`fscache-daemon run --config FILE`: the daemon's options, the snapshotter's among them,
from a TOML file; flags on the command line win; a bad file is one line and exit 1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from containerd_fixtures import short_tmpdir, wait_for
from test_daemon_support import socket_answers

CLI = [sys.executable, "-m", "fscache_daemon.cli"]


def _start(d: str, config: str, *flags: str) -> tuple[subprocess.Popen, str]:
    log = os.path.join(d, "daemon.log")
    with open(log, "w") as out:
        proc = subprocess.Popen([*CLI, "run", "--config", config, *flags],
                                stdout=out, stderr=subprocess.STDOUT)
    return proc, log


def _status(api: str) -> dict:
    r = subprocess.run([*CLI, "status", "--json", "--api-sock", api],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("override", [False, True])
def test_config_file_sets_run_options(override):
    d = short_tmpdir("cfg-")
    api, snap = os.path.join(d, "api.sock"), os.path.join(d, "snap.sock")
    config = os.path.join(d, "config.toml")
    with open(config, "w") as f:
        f.write(f'cache-dir = "{d}/cache"\napi_sock = "{api}"\nfrontend = "none"\n'
                f'snapshotter-socket = "{snap}"\ncache-size = "64M"\nthreads = 3\n'
                f'insecure-registry = ["127.0.0.1:5000", "10.0.0.1:5000"]\n')
    flags = ("--cache-size", "32M") if override else ()
    proc, log = _start(d, config, *flags)
    try:
        wait_for(lambda: socket_answers(snap) and socket_answers(api), 30, "daemon",
                 proc, log)
        st = _status(api)
        assert st["daemon"]["cache_size"] == (32 if override else 64) << 20, st["daemon"]
        assert st["daemon"]["cache_dir"] == os.path.join(d, "cache")
        # the snapshotter's default root: inside the cache dir the file named
        assert os.path.isdir(os.path.join(d, "cache", "snapshotter"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, open(log).read()[-3000:]
        assert not os.path.exists(snap)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("content,needle", [
    ('cache-sise = "1G"\n', "unknown key 'cache-sise'"),
    ('cache-size = \n', "config.toml"),
    ('[snapshotter]\nsocket = "x"\n', "unknown key 'snapshotter'"),
    ('threads = 0\n', "threads"),
    (None, "No such file or directory"),
])
def test_bad_config_is_one_line(tmp_path, content, needle):
    config = tmp_path / "config.toml"
    if content is not None:
        config.write_text(content)
    r = subprocess.run([*CLI, "run", "--config", str(config), "--frontend", "none",
                        "--cache-dir", str(tmp_path / "c"), "--api-sock",
                        str(tmp_path / "api.sock")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert not (tmp_path / "api.sock").exists() and not (tmp_path / "c").exists()
