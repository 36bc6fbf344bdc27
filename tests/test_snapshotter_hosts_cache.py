"""Where the snapshotter's lazy mounts get their bytes, and what they leave in the cache:
real containerd 1.6 pulls a Nydus image through CRI (kubelet's PullImage, with the pull
secret's credentials) from a docker-registry that needs htpasswd credentials; the daemon
(`fscache-daemon run --snapshotter-socket --hosts-dir --cache-size`) reads the blobs
with credentials from a docker config file, from the mirror that hosts.toml names; the
upstream's credentials never reach the mirror. Removing the image (`ctr image rm` +
containerd's GC) leaves no snapshot and no mount, and the cache, over its limit while
the image was in use, shrinks back under it."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil

import helpers
import pytest
from containerd_fixtures import (
    SNAPSHOTTER,
    Containerd,
    OciImage,
    busybox_layers,
    cri_pull,
    require_containerd,
    short_tmpdir,
    tar_layer,
    wait_for,
)
from nydus_fixtures import BUSYBOX_EXPECTED, BUSYBOX_SCRIPT, CRI_NS, convert
from registry_fixtures import (  # noqa: F401
    FlakyProxy,
    RegistryServer,
    registry_basic,
    start_registry,
)
from test_cache_limit import du
from test_daemon_support import DaemonProc, require_lazy_kernel, socket_answers

pytestmark = [pytest.mark.root, pytest.mark.registry]

LIMIT = 4 << 20


def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclasses.dataclass
class MirrorSetup:
    """A registry's stand-in `up` (a recording proxy in front of it) and a mirror with
    its own password behind the recording proxy `mp`; `hosts`: a hosts directory naming
    mp as the `pull` mirror of up (plain HTTP). The test sets `ctd` and `daemon`."""

    d: str
    mirror: RegistryServer
    up: FlakyProxy
    mp: FlakyProxy
    hosts: str
    ctd: Containerd | None = None
    daemon: DaemonProc | None = None


@contextlib.contextmanager
def upstream_with_mirror(server, prefix: str):
    """A MirrorSetup for `server`; stops everything (containerd and its containers
    first, lazy mounts a failed test left, the daemon, proxies, the mirror) at the end."""
    d = short_tmpdir(prefix)
    os.makedirs(os.path.join(d, "mirror"))
    mirror = start_registry(os.path.join(d, "mirror"), "basic")  # its own password
    s = MirrorSetup(d, mirror, FlakyProxy(server.host), FlakyProxy(mirror.host),
                    os.path.join(d, "certs.d"))
    try:
        os.makedirs(os.path.join(s.hosts, s.up.host))
        with open(os.path.join(s.hosts, s.up.host, "hosts.toml"), "w") as f:
            f.write(f'server = "http://{s.up.host}"\n\n[host."http://{s.mp.host}"]\n'
                    '  capabilities = ["pull"]\n')
        yield s
    finally:
        if s.ctd is not None:
            s.ctd.stop()
        with open("/proc/self/mounts") as f:
            for m in [ln.split()[1] for ln in f if ln.split()[1].startswith(d)]:
                helpers.sys_umount(m, lazy=True)
        if s.daemon is not None:
            s.daemon.cleanup()
        s.up.stop()
        s.mp.stop()
        mirror.stop()
        shutil.rmtree(d, ignore_errors=True)


def nydus_image_on_mirror(server, up_host: str, mirror, big: bytes,
                          env: dict | None = None) -> tuple[str, list[str]]:
    """busybox plus /data/big pushed to `server`, converted (`erofs-tools convert`
    through `up_host`, the server or its proxy; `env` for its credentials) into the Nydus
    image UP_HOST/nydus/busybox:1, whose data blobs `mirror` holds too (copied, as a
    registry mirror would). -> (the Nydus image's reference, its data blob digests)"""
    image = OciImage(busybox_layers() + [tar_layer([("data", "dir", None),
                                                   ("data/big", "file", big)])],
                     ["/bin/sh"], gzipped=True)
    image.push(server.client(), "src/busybox", "1")
    ref = f"{up_host}/nydus/busybox:1"
    convert(f"{up_host}/src/busybox:1", ref, env=env)
    src, dst = server.client(), mirror.client()
    try:
        manifest = src.get_manifest("nydus/busybox", "1").json
        blobs = [x["digest"] for x in manifest["layers"]
                 if x.get("annotations", {}).get("containerd.io/snapshot/nydus-blob")]
        for digest in blobs:
            dst.push_blob("nydus/busybox", src.get_blob("nydus/busybox", digest),
                          digest=digest)
    finally:
        src.close()
        dst.close()
    return ref, blobs


def test_cri_pull_with_credentials_mirror_and_cache_limit(registry_basic,  # noqa: F811
                                                          monkeypatch):
    require_containerd()
    require_lazy_kernel()
    with upstream_with_mirror(registry_basic, "snaphc-") as s:
        d, mirror, up, mp, hosts = s.d, s.mirror, s.up, s.mp, s.hosts
        # credentials for both hosts in a docker config file, as `docker login` writes it
        cfg = os.path.join(d, "docker")
        os.makedirs(cfg)
        with open(os.path.join(cfg, "config.json"), "w") as f:
            json.dump({"auths": {
                up.host: {"auth": base64.b64encode(
                    f"{registry_basic.username}:{registry_basic.password}".encode()).decode()},
                mp.host: {"auth": base64.b64encode(
                    f"{mirror.username}:{mirror.password}".encode()).decode()}}}, f)
        monkeypatch.setenv("DOCKER_CONFIG", cfg)

        big = random.Random(11).randbytes(8 << 20)
        ref, blobs = nydus_image_on_mirror(registry_basic, up.host, mirror, big)
        up.requests.clear()
        up.seen_headers.clear()

        snap_sock = os.path.join(d, "snap.sock")
        s.daemon = daemon = DaemonProc(os.path.join(d, "daemon"), extra=(
            "--snapshotter-socket", snap_sock, "--hosts-dir", hosts, "--cache-size", "4M",
            "--insecure-registry", up.host)).start()
        # a socket that answers, not one whose path exists (bound, maybe not listening
        # yet), and containerd's client connected before the first call: a refused first
        # dial backs containerd off for up to 3 s, failing calls meanwhile
        wait_for(lambda: socket_answers(snap_sock), helpers.HANG, "snapshotter socket")
        s.ctd = ctd = Containerd(d, {SNAPSHOTTER: snap_sock}, cri_snapshotter=SNAPSHOTTER,
                         plain_http_hosts=(up.host,))
        ctd.wait_snapshotter(SNAPSHOTTER)
        cri_pull(ctd.sock, ref, auth=(registry_basic.username, registry_basic.password))
        out = ctd.run_out("--snapshotter", SNAPSHOTTER, ref, "hc1",
                      "/bin/sh", "-c", BUSYBOX_SCRIPT, ns=CRI_NS)
        assert out == BUSYBOX_EXPECTED
        out = ctd.run_out("--snapshotter", SNAPSHOTTER, ref, "hc2",
                      "/bin/busybox", "sha256sum", "/data/big", ns=CRI_NS)
        assert out.split()[0].decode() == hashlib.sha256(big).hexdigest()

        # the data blobs came from the mirror, none from the upstream
        data_reads = [r for r in mp.requests if "/blobs/sha256:" in r]
        assert any(blobs[-1] in r for r in data_reads), mp.requests
        assert all(f"ns={up.host.replace(':', '%3A')}" in r for r in data_reads)
        assert not [r for r in up.requests if any(b in r for b in blobs)], up.requests
        # each host saw its own credentials only
        up_creds = basic_auth(registry_basic.username, registry_basic.password)
        mirror_creds = basic_auth(mirror.username, mirror.password)
        assert any(h.get("Authorization") == mirror_creds for h in mp.seen_headers)
        assert not any(h.get("Authorization") == up_creds for h in mp.seen_headers)
        assert not any(h.get("Authorization") == mirror_creds for h in up.seen_headers)

        # the image in use holds more than the limit: kept, and reported
        cache = daemon.metrics()["cache"]
        assert cache["limit"] == LIMIT and cache["bytes"] > LIMIT and cache["over_limit"]
        assert cache["in_use_bytes"] == cache["bytes"]
        blob_dir = os.path.join(daemon.cache_dir, "blobs")
        before = du(blob_dir)

        names = ctd.ctr("image", "ls", "-q", ns=CRI_NS).stdout.decode().split()
        ctd.ctr("image", "rm", "--sync", *names, ns=CRI_NS)
        root = os.path.join(daemon.cache_dir, "snapshotter")
        wait_for(lambda: os.listdir(os.path.join(root, "snapshots")) == [], 60,
                 "snapshots removed")
        rows = ctd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls",
                       ns=CRI_NS).stdout.decode().splitlines()[1:]
        assert rows == []
        st, mounts = daemon.api.request("GET", "/api/v1/mounts")
        assert st == 200 and mounts == []
        with open("/proc/self/mounts") as f:
            assert not [ln for ln in f if os.path.join(root, "lazy") in ln]
        wait_for(lambda: du(blob_dir) <= LIMIT, 60, "cache space reclaimed")
        cache = daemon.metrics()["cache"]
        assert not cache["over_limit"] and cache["evicted_bytes"] >= 8 << 20
        print(f"cache {before} bytes on disk while the image ran (limit {LIMIT}), "
              f"{du(blob_dir)} after ctr image rm + GC; evicted {cache['evicted_blobs']} "
              f"blobs, {cache['evicted_bytes']} bytes; mirror served "
              f"{len(data_reads)} blob requests, upstream 0")
