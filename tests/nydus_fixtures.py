"""Nydus images in a real registry and `fscache-daemon run --snapshotter-socket` for the
snapshotter's fault and load tests (real containerd 1.6 through containerd_fixtures).

    daemon = SnapshotterDaemon(workdir, insecure=(host,)).start()   the daemon + snapshotter
    ref = push_nydus(registry, "app", layers, via=host)   OCI image pushed and converted
    mutate_image(client, "nydus/app", "1", "bad", fn)    a copy with fn(manifest, config)
                                                           applied (blobs pushed, diff ids kept)
    force_gc(ctd)                                         containerd's GC, synchronously
    snapshot_rows(ctd, ns)                                `ctr snapshots ls` as sorted rows
    with separate_stack("prefix-", registry) as st:      daemon, snapshotter process and
                                                           containerd (st.daemon, st.snap,
                                                           st.ctd, st.root), torn down after
    with daemon_stack("prefix-", (host,)) as (d, daemon, ctd):   the snapshotter inside
                                                           the daemon, and containerd
    ctr_run(ctd, ref, name, *cmd); remove_images(ctd)    `ctr run --rm`; every image gone
    busybox_with_file(size)                               busybox + /data/big: (layers, bytes)
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator

import helpers
from containerd_fixtures import (
    SNAPSHOTTER,
    Containerd,
    OciImage,
    Snapshotter,
    busybox_layers,
    short_tmpdir,
    tar_layer,
    wait_for,
)
from test_daemon_support import DaemonProc, socket_answers

CRI_NS = "k8s.io"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
# what a container of busybox_layers() runs and prints: the layers applied in order (the
# whiteout of /etc/gone too), and no /image: a Nydus bootstrap layer's files stay hidden
BUSYBOX_SCRIPT = "cat /etc/greeting /etc/third; test -e /etc/gone || echo gone-ok; ls /image || true"
BUSYBOX_EXPECTED = b"hello from layer two\nlayer three\ngone-ok\n"


class SnapshotterDaemon(DaemonProc):
    """`fscache-daemon run --snapshotter-socket` (fanotify front end), the snapshotter
    inside the daemon as containerd nodes would run it; restartable after a SIGKILL."""

    def __init__(self, workdir: str, insecure: tuple[str, ...] = (),
                 extra: tuple[str, ...] = ()) -> None:
        self.snap_sock = os.path.join(workdir, "snap.sock")
        args = ["--snapshotter-socket", self.snap_sock]
        for host in insecure:
            args += ["--insecure-registry", host]
        super().__init__(workdir, extra=(*args, *extra))
        self.snap_root = os.path.join(self.cache_dir, "snapshotter")

    def start(self, timeout: float = helpers.HANG):     # a hang bound: fails at once on exit
        super().start(timeout)
        wait_for(lambda: socket_answers(self.snap_sock), timeout, "snapshotter socket",
                 self.proc, self.log_path)
        return self

    def wait_snapshots_removed(self, timeout: float = 60) -> None:
        """Wait until the snapshotter's snapshot directories are all gone."""
        snaps = os.path.join(self.snap_root, "snapshots")
        wait_for(lambda: os.listdir(snaps) == [], timeout, "snapshots removed",
                 log=self.log_path)

    def lazy_mounts(self) -> list[str]:
        lazy = os.path.join(self.snap_root, "lazy")
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        return sorted(p for p in points if p.startswith(lazy + "/"))

    def cleanup(self) -> None:
        """Stop the daemon, unmount whatever a failed test left under its directory
        (overlays first), release the fd holder."""
        self.stop()
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        for mp in reversed([p for p in points if p.startswith(self.workdir + "/")]):
            helpers.sys_umount(mp, lazy=True)
        super().cleanup()


@dataclasses.dataclass
class Stack:
    """A daemon, the snapshotter as its own process on the daemon's API (so a test can
    SIGKILL it alone) and a private containerd using it for CRI."""
    dir: str
    root: str
    daemon: DaemonProc
    snap: Snapshotter
    ctd: Containerd


@contextlib.contextmanager
def separate_stack(prefix: str, registry, keep_log: str | None = None) -> Iterator[Stack]:
    """Start the three against `registry` (plain HTTP) and tear them down whatever the
    test did: containerd, the snapshotter, the lazy mounts a failed test left, the daemon.
    `keep_log`: copy the daemon's log there afterwards."""
    d = short_tmpdir(prefix)
    daemon = DaemonProc(os.path.join(d, "daemon")).start()
    snap = ctd = None
    try:
        root = os.path.join(d, "snaproot")
        snap = Snapshotter(root, os.path.join(d, "snap.sock"),
                           ("--daemon-api", daemon.sock, "--insecure-registry", registry.host))
        ctd = Containerd(d, {SNAPSHOTTER: snap.sock}, cri_snapshotter=SNAPSHOTTER,
                         plain_http_hosts=(registry.host,))
        yield Stack(d, root, daemon, snap, ctd)
    finally:
        if ctd is not None:
            ctd.stop()
        if snap is not None:
            snap.stop()
        with open("/proc/self/mounts") as f:  # a failed test's leftover lazy mounts
            for mp in [line.split()[1] for line in f if line.split()[1].startswith(d)]:
                helpers.sys_umount(mp, lazy=True)
        daemon.cleanup()
        if keep_log:
            shutil.copy(daemon.log_path, keep_log)
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def daemon_stack(prefix: str, hosts: tuple[str, ...], extra: tuple[str, ...] = (),
                 cri: bool = True, cri_address: bool = False, before=(),
                 after=()) -> Iterator[tuple[str, SnapshotterDaemon, Containerd]]:
    """A directory short_tmpdir(prefix), a SnapshotterDaemon in it (the snapshotter
    inside the daemon) trusting the plain HTTP registries `hosts`, and a private
    containerd using it (for CRI too unless `cri` is false; `cri_address`: the
    snapshotter asks this containerd which images stand on a chain) -> (directory,
    daemon, containerd). Torn down whatever the test did: the `before` callables (what
    the test holds released), containerd, the daemon (its lazy mounts, the fd holder),
    the `after` objects stopped (proxies), the directory."""
    d = short_tmpdir(prefix)
    if cri_address:
        extra = (*extra, "--cri-address", os.path.join(d, "containerd.sock"))
    daemon = SnapshotterDaemon(os.path.join(d, "daemon"), insecure=hosts, extra=extra)
    ctd = None
    try:
        daemon.start()
        ctd = Containerd(d, {SNAPSHOTTER: daemon.snap_sock},
                         cri_snapshotter=SNAPSHOTTER if cri else None,
                         plain_http_hosts=hosts)
        yield d, daemon, ctd
    finally:
        for fn in before:
            fn()
        if ctd is not None:
            ctd.stop()
        daemon.cleanup()
        for x in after:
            x.stop()
        shutil.rmtree(d, ignore_errors=True)


def ctr_run(ctd, ref: str, name: str, *cmd: str) -> subprocess.CompletedProcess:
    """`ctr run --rm` of `ref` on the snapshotter in the CRI namespace, not checked."""
    return ctd.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, ref, name, *cmd,
                   ns=CRI_NS, check=False, timeout=120)


def remove_images(ctd) -> list[str]:
    """`ctr image rm --sync` of every image in the CRI namespace -> their names."""
    names = ctd.ctr("image", "ls", "-q", ns=CRI_NS).stdout.decode().split()
    ctd.ctr("image", "rm", "--sync", *names, ns=CRI_NS)
    return names


def busybox_with_file(size: int) -> tuple[list[bytes], bytes]:
    """busybox's layers plus one holding /data/big: `size` incompressible bytes (a blob
    or layer of its own that a test can watch being fetched, or not)."""
    big = random.Random(7).randbytes(size)
    return busybox_layers() + [tar_layer([("data", "dir", None),
                                          ("data/big", "file", big)])], big


def convert(src_ref: str, dst_ref: str, *flags: str, env: dict | None = None) -> dict:
    """`erofs-tools convert --insecure [FLAGS] SRC DST --json`, which must succeed ->
    its report."""
    p = subprocess.run([sys.executable, "-m", "erofs_tools", "convert", *flags, "--insecure",
                        src_ref, dst_ref, "--json"], capture_output=True, text=True,
                       timeout=600, env=env)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def push_nydus(registry, name: str, layers: list[bytes], via: str | None = None) -> str:
    """Push an OCI image of `layers` as src/NAME:1, convert it to nydus/NAME:1; -> the
    reference containerd pulls (through host `via`, e.g. a proxy, else the registry)."""
    OciImage(layers, ["/bin/sh"], gzipped=True).push(registry.client(), f"src/{name}", "1")
    convert(f"{registry.host}/src/{name}:1", f"{registry.host}/nydus/{name}:1")
    return f"{via or registry.host}/nydus/{name}:1"


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def bootstrap_tar(boot: bytes, name: str = "image/image.boot",
                  mtime: int = 0) -> tuple[bytes, str]:
    """A bootstrap layer holding `boot` at `name`: (gzip bytes, diff id). Another
    `mtime` gives the same bootstrap in a layer of another digest."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        d = tarfile.TarInfo(os.path.dirname(name))
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, mtime
        tf.addfile(d)
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode, ti.mtime = len(boot), 0o444, mtime
        tf.addfile(ti, io.BytesIO(boot))
    tar = raw.getvalue()
    return gzip.compress(tar, mtime=0), _sha(tar)


def original_bootstrap(client, repo: str, tag: str) -> bytes:
    """image/image.boot of a converted image's bootstrap layer."""
    manifest = client.get_manifest(repo, tag).json
    gz = client.get_blob(repo, manifest["layers"][-1]["digest"])
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(gz))) as tf:
        f = tf.extractfile("image/image.boot")
        assert f is not None
        return f.read()


def mutate_image(client, repo: str, tag: str, new_tag: str, fn) -> dict:
    """Push a copy of repo:tag as repo:new_tag after fn(manifest, config, push) changed
    its manifest and config dicts in place (`push(data) -> digest` uploads a blob);
    -> the new manifest."""
    from erofs_tools.registry.manifest import Manifest
    manifest = client.get_manifest(repo, tag).json
    config = json.loads(client.get_blob(repo, manifest["config"]["digest"]))

    def push(data: bytes) -> str:
        d = _sha(data)
        client.push_blob(repo, data, digest=d)
        return d
    fn(manifest, config, push)
    cfg = json.dumps(config).encode()
    manifest["config"] = dict(manifest["config"], digest=push(cfg), size=len(cfg))
    body = json.dumps(manifest).encode()
    client.put_manifest(repo, new_tag, Manifest(body, MANIFEST_TYPE, _sha(body)))
    return manifest


def replace_bootstrap(boot: bytes, name: str = "image/image.boot", mtime: int = 0):
    """A mutate_image function: the bootstrap layer holds `boot` instead."""
    def fn(manifest: dict, config: dict, push) -> None:
        gz, diff_id = bootstrap_tar(boot, name, mtime)
        layer = manifest["layers"][-1]
        manifest["layers"][-1] = dict(layer, digest=push(gz), size=len(gz))
        config["rootfs"]["diff_ids"][-1] = diff_id
    return fn


def force_gc(ctd) -> None:
    """Run containerd's garbage collection now: deleting a lease with --sync waits for a
    full collection (what `ctr image rm --sync` does)."""
    out = ctd.ctr("leases", "create", ns=CRI_NS).stdout.decode().split()
    ctd.ctr("leases", "delete", "--sync", out[0], ns=CRI_NS)


def snapshot_rows(ctd, ns: str = CRI_NS) -> list[str]:
    """`ctr snapshots ls` rows (key, parent, kind), sorted."""
    out = ctd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls", ns=ns).stdout.decode()
    return sorted(" ".join(line.split()) for line in out.splitlines()[1:] if line.strip())
