"""`fscache-daemon run --snapshotter-socket`: one process holds the mounts, the cache and
the snapshot state; real containerd 1.6 runs a container through it, and SIGTERM of the
daemon takes the snapshots socket down with it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
from containerd_fixtures import (
    SNAPSHOTTER,
    Containerd,
    busybox_layers,
    oci_archive,
    require_containerd,
    short_tmpdir,
    wait_for,
)
from test_daemon_support import socket_answers

pytestmark = pytest.mark.root

IMAGE = "example.test/erofs-tools/runflag:1"


def test_daemon_run_serves_the_snapshots_api():
    require_containerd()
    d = short_tmpdir("runflag-")
    api, snap = os.path.join(d, "api.sock"), os.path.join(d, "snap.sock")
    log = os.path.join(d, "daemon.log")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fscache_daemon.cli", "run",
                                 "--cache-dir", os.path.join(d, "cache"), "--api-sock", api,
                                 "--frontend", "fanotify", "--snapshotter-socket", snap],
                                stdout=out, stderr=subprocess.STDOUT)
    ctd = None
    try:
        wait_for(lambda: socket_answers(snap) and socket_answers(api), 30, "daemon", proc, log)
        assert os.stat(snap).st_mode & 0o777 == 0o600
        ctd = Containerd(d, {SNAPSHOTTER: snap})
        archive = os.path.join(d, "image.tar")
        chain = oci_archive(archive, IMAGE, busybox_layers(), ["/bin/sh"])
        ctd.ctr("image", "import", "--snapshotter", SNAPSHOTTER, archive)
        out = ctd.run_out("--snapshotter", SNAPSHOTTER, IMAGE, "c1",
                      "/bin/sh", "-c", "cat /etc/greeting")
        assert out == b"hello from layer two\n"
        listed = ctd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls").stdout.decode()
        assert all(key in listed for key in chain)
        # the default root is inside the daemon's cache directory
        assert os.path.isdir(os.path.join(d, "cache", "snapshotter", "snapshots"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, open(log).read()[-3000:]
        assert not socket_answers(snap) and not os.path.exists(snap)
    finally:
        if ctd is not None:
            ctd.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(d, ignore_errors=True)
