"""One configuration file for both: real containerd 1.6 pulls a Nydus image through CRI
(PullImage without a pull secret) from a docker-registry that needs htpasswd
credentials, with the credentials and the hosts directory its own config.toml holds
(`registry.config_path`, `registry.configs."HOST".auth`); the daemon, started with
`--containerd-config` on that same file (no `--hosts-dir`, an empty docker config),
reads the image's blobs lazily from the mirror hosts.toml names, with the mirror's own
credentials; the upstream's never reach the mirror, the mirror's never the upstream.
`fscache-daemon rpull --containerd-config` reads the registry with the same file's
entry."""

from __future__ import annotations

import hashlib
import json
import os
import random

import pytest
from containerd_fixtures import (
    SNAPSHOTTER,
    Containerd,
    cri_pull,
    require_containerd,
    wait_for,
)
from nydus_fixtures import BUSYBOX_EXPECTED, BUSYBOX_SCRIPT, CRI_NS
from registry_fixtures import registry_basic  # noqa: F401
from test_daemon_support import DaemonProc, require_lazy_kernel, socket_answers
from test_rpull import rpull
from test_snapshotter_hosts_cache import basic_auth, nydus_image_on_mirror, upstream_with_mirror

pytestmark = [pytest.mark.root, pytest.mark.registry]

CRI = 'plugins."io.containerd.grpc.v1.cri".registry'


def test_cri_pull_and_lazy_reads_with_containerd_credentials(registry_basic,  # noqa: F811
                                                             monkeypatch):
    require_containerd()
    require_lazy_kernel()
    with upstream_with_mirror(registry_basic, "snapcri-") as s:
        d, mirror, up, mp, hosts = s.d, s.mirror, s.up, s.mp, s.hosts
        empty = os.path.join(d, "docker")
        os.makedirs(empty)
        monkeypatch.setenv("DOCKER_CONFIG", empty)   # no credentials but containerd's

        big = random.Random(12).randbytes(4 << 20)
        ref, blobs = nydus_image_on_mirror(
            registry_basic, up.host, mirror, big,
            env={**os.environ, "DOCKER_CONFIG": _docker_config(d, up.host, registry_basic)})
        up.requests.clear()
        up.seen_headers.clear()

        # containerd's own registry settings: hosts directory and credentials per host
        registry = (f"[{CRI}]\n  config_path = \"{hosts}\"\n"
                    f'[{CRI}.configs."{up.host}".auth]\n'
                    f'  username = "{registry_basic.username}"\n'
                    f'  password = "{registry_basic.password}"\n'
                    f'[{CRI}.configs."{mp.host}".auth]\n'
                    f'  auth = "{basic_auth(mirror.username, mirror.password)[6:]}"\n')
        snap_sock = os.path.join(d, "snap.sock")
        s.ctd = ctd = Containerd(d, {SNAPSHOTTER: snap_sock}, cri_snapshotter=SNAPSHOTTER,
                         extra_config=registry)
        s.daemon = daemon = DaemonProc(os.path.join(d, "daemon"), extra=(
            "--snapshotter-socket", snap_sock, "--containerd-config", ctd.config)).start()
        wait_for(lambda: socket_answers(snap_sock), 30, "snapshotter socket")  # answers
        ctd.wait_snapshotter(SNAPSHOTTER)
        st, info = daemon.api.request("GET", "/api/v1/daemon")
        assert st == 200 and info["hosts_dir"] == hosts, info
        cri_pull(ctd.sock, ref)          # no pull secret: containerd's configs
        out = ctd.run_out("--snapshotter", SNAPSHOTTER, ref, "cri1",
                          "/bin/busybox", "sha256sum", "/data/big", ns=CRI_NS)
        assert out.split()[0].decode() == hashlib.sha256(big).hexdigest()
        out = ctd.run_out("--snapshotter", SNAPSHOTTER, ref, "cri2",
                          "/bin/sh", "-c", BUSYBOX_SCRIPT, ns=CRI_NS)
        assert out == BUSYBOX_EXPECTED

        # the data blobs came from the mirror, each host saw its own credentials only
        data_reads = [r for r in mp.requests if "/blobs/sha256:" in r]
        assert any(blobs[-1] in r for r in data_reads), mp.requests
        assert not [r for r in up.requests if any(b in r for b in blobs)], up.requests
        up_creds = basic_auth(registry_basic.username, registry_basic.password)
        mirror_creds = basic_auth(mirror.username, mirror.password)
        assert any(h.get("Authorization") == mirror_creds for h in mp.seen_headers)
        assert any(h.get("Authorization") == up_creds for h in up.seen_headers)
        assert not any(h.get("Authorization") == up_creds for h in mp.seen_headers)
        assert not any(h.get("Authorization") == mirror_creds for h in up.seen_headers)
        # rpull reads the registry with its entry of the same file (none: refused)
        p = rpull(ctd, ref)
        assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
        assert "no credentials" in p.stderr
        p = rpull(ctd, ref, "--containerd-config", ctd.config, "--json")
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["lazy_layers"] == len(blobs)
        assert ref in ctd.ctr("image", "ls", "-q").stdout.decode().split()
        # nothing in the daemon's log shows a secret
        log = open(daemon.log_path, errors="replace").read()
        assert registry_basic.password not in log and mirror.password not in log


def _docker_config(d: str, host: str, server) -> str:
    """A docker config for the convert step only (the test's own upload)."""
    path = os.path.join(d, "convert-docker")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"auths": {host: {"username": server.username,
                                    "password": server.password}}}, f)
    return path
