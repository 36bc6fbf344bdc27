"""containerd 1.6 runs a container from a lazily loaded Nydus image through the
snapshotter, on the cachefiles front end, inside the QEMU guest (issue 14).

Run:  vm-tests/run --kernel 6.12 -- python3 -m pytest -q vm-tests/tests/test_containerd.py
Outside the guest (VMTEST_GUEST unset) the test skips; inside it must not skip.

Everything is real and runs in the guest from the host's userspace (9p root): Debian's
docker-registry on the guest's loopback, `erofs-tools convert`, `fscache-daemon run
--frontend cachefiles --snapshotter-socket` (the snapshotter inside the daemon, its cache
on the ext4 scratch disk), a private containerd (own config with the proxy plugin, root,
state, socket: tests/containerd_fixtures.py) pulling through its CRI plugin's PullImage
as kubelet does, and `ctr run` with containerd's default spec: runc in new pid, ipc, uts,
network and mount namespaces, on the guest's cgroup2 hierarchy with cpu.weight and its
eBPF device filter (what vm-tests/kernel-frag.config gives the tinyconfig kernels for it).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

IN_GUEST = os.environ.get("VMTEST_GUEST") == "1"
pytestmark = pytest.mark.skipif(not IN_GUEST, reason="runs only inside the vm-tests guest")

REPO = Path(__file__).resolve().parents[2]
# the host suite's fixtures: private containerd, docker-registry, the small OCI image
sys.path.insert(0, str(REPO / "tests"))

from containerd_fixtures import (  # noqa: E402
    Containerd,
    OciImage,
    cri_pull,
    require_containerd,
    tar_layer,
    wait_for,
)
from registry_fixtures import registry_binary, start_registry  # noqa: E402

SNAPSHOTTER = "erofs-vm"
CRI_NS = "k8s.io"          # the namespace containerd's CRI plugin pulls into
READ_SIZE = 384 << 10      # the file the container reads (random: incompressible)
UNREAD_SIZE = 4 << 20      # a file in its own layer nobody reads: its blob stays unfetched
SLACK = 256 << 10          # blob bytes beyond what was read (chunk rounding, metadata)


def image_layers() -> tuple[list[bytes], bytes]:
    """Three layers: static busybox; /data/read.bin; /data/unread.bin."""
    with open(shutil.which("busybox") or "/bin/busybox", "rb") as f:
        busybox = f.read()
    rnd = random.Random(14)
    read, unread = rnd.randbytes(READ_SIZE), rnd.randbytes(UNREAD_SIZE)
    base = [(d, "dir", None) for d in ("bin", "dev", "proc", "tmp")]
    base += [("bin/busybox", "file", busybox), ("bin/sh", "symlink", "busybox"),
             ("bin/sha256sum", "symlink", "busybox")]
    return [tar_layer(base),
            tar_layer([("data", "dir", None), ("data/read.bin", "file", read)]),
            tar_layer([("data", "dir", None), ("data/unread.bin", "file", unread)])], read


def mounts_under(prefix: str) -> list[tuple[str, str, str]]:
    """(fstype, mount point, options) of every mount at or below prefix."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            _dev, mnt, fstype, opts = line.split()[:4]
            mnt = mnt.replace("\\040", " ")
            if mnt == prefix or mnt.startswith(prefix + "/"):
                out.append((fstype, mnt, opts))
    return out


class Daemon:
    """`fscache-daemon run --frontend cachefiles --snapshotter-socket`: one process holds
    the cache, the lazy mounts and the snapshot state."""

    def __init__(self, cache: Path, workdir: str, insecure_host: str) -> None:
        self.cache = cache
        self.sock = os.path.join(workdir, "api.sock")
        self.snap_sock = os.path.join(workdir, "snap.sock")
        self.log = cache.parent / "daemon.log"
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                ["fscache-daemon", "run", "--cache-dir", str(cache), "--api-sock", self.sock,
                 "--frontend", "cachefiles", "--threads", "4", "--snapshotter-socket",
                 self.snap_sock, "--insecure-registry", insecure_host,
                 "--log-level", "DEBUG"],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
        from fscache_daemon.api import socket_answers
        wait_for(lambda: socket_answers(self.sock) and socket_answers(self.snap_sock), 180,
                 "fscache-daemon (API and snapshots sockets)", self.proc, str(self.log))

    def api(self, method: str, path: str):
        from fscache_daemon.api import ApiClient
        return ApiClient(self.sock).call(method, path)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # the cachefiles holder keeps /dev/cachefiles past the daemon: let it go, so the
        # next test of the suite can bind the device
        from fscache_daemon.frontend import cachefiles_holder
        cachefiles_holder.release(str(self.cache / "cachefiles-holder.sock"))


def wait_device_free(timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            os.close(os.open("/dev/cachefiles", os.O_RDWR | os.O_CLOEXEC))
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > end:
                raise
            time.sleep(0.05)


def test_cri_pull_ctr_run_gc_on_cachefiles():
    require_containerd()
    registry_binary()
    assert os.path.exists("/dev/cachefiles"), "guest kernel without cachefiles"
    with open("/proc/self/mounts") as f:
        assert any(line.split()[1:3] == ["/sys/fs/cgroup", "cgroup2"] for line in f), \
            "vm-tests/guest-fstab mounts cgroup2 on /sys/fs/cgroup (runc needs it)"
    t: dict[str, float] = {}
    t_start = time.monotonic()
    scratch = Path(os.environ["VMTEST_SCRATCH"]) / "containerd"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    short = tempfile.mkdtemp(prefix="ctd-", dir="/tmp")  # unix sockets: 108-byte paths
    reg = daemon = ctd = None
    try:
        t0 = time.monotonic()
        reg = start_registry(str(scratch / "registry"))
        t["registry_start"] = time.monotonic() - t0

        layers, read = image_layers()
        image = OciImage(layers, ["/bin/sh"], gzipped=True)
        t0 = time.monotonic()
        image.push(reg.client(), "src/lazy", "1")
        t["push"] = time.monotonic() - t0
        ref = f"{reg.host}/nydus/lazy:1"
        t0 = time.monotonic()
        p = subprocess.run(["erofs-tools", "convert", "--insecure", f"{reg.host}/src/lazy:1",
                            ref, "--json"], capture_output=True, text=True, timeout=900)
        t["convert"] = time.monotonic() - t0
        assert p.returncode == 0, p.stderr
        manifest = reg.client().get_manifest("nydus/lazy", "1").json
        blob_layers = [x for x in manifest["layers"]
                       if x.get("annotations", {}).get("containerd.io/snapshot/nydus-blob")]
        assert len(blob_layers) == 3, manifest
        blobs = [x["digest"].split(":", 1)[1] for x in blob_layers]
        blob_size = {b: x["size"] for b, x in zip(blobs, blob_layers, strict=True)}
        busybox_blob, read_blob, unread_blob = blobs

        t0 = time.monotonic()
        daemon = Daemon(scratch / "cache", short, reg.host)
        t["daemon_start"] = time.monotonic() - t0
        t0 = time.monotonic()
        ctd = Containerd(short, {SNAPSHOTTER: daemon.snap_sock}, cri_snapshotter=SNAPSHOTTER,
                         plain_http_hosts=(reg.host,), start_timeout=180)
        t["containerd_start"] = time.monotonic() - t0

        t0 = time.monotonic()
        cri_pull(ctd.sock, ref, timeout=600)
        t["cri_pull"] = time.monotonic() - t0
        content = [row.split()[0] for row in
                   ctd.ctr("content", "ls", ns=CRI_NS).stdout.decode().splitlines()[1:]]
        assert not any(f"sha256:{b}" in content for b in blobs), content  # no data blob
        assert manifest["layers"][-1]["digest"] in content      # the bootstrap layer
        rows = [r.split() for r in ctd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls",
                                           ns=CRI_NS).stdout.decode().splitlines()[1:]]
        assert len(rows) == 4 and all(r[-1] == "Committed" for r in rows), rows
        assert daemon.api("GET", "/api/v1/mounts") == []         # nothing mounted yet

        # `ctr run` with containerd's default spec: containerd creates the container and
        # its snapshot (the snapshotter mounts the image lazily through the cachefiles
        # front end and stacks the overlay on it), runc starts it in its own namespaces.
        # The container reports its pid, the file's digest and its mount table.
        assert daemon.api("GET", "/api/v1/metrics")["totals"]["bytes_fetched"] == 0
        script = ('echo "pid $$"; sha256sum /data/read.bin; '
                  "exec busybox cat /proc/self/mounts")
        t0 = time.monotonic()
        out = ctd.run_out("--snapshotter", SNAPSHOTTER, ref, "c1", "/bin/sh", "-c", script,
                          ns=CRI_NS, timeout=600).decode()
        t["ctr_run"] = time.monotonic() - t0
        assert len(out.splitlines()) > 2, out
        pid_line, sha_line, *mount_lines = out.splitlines()
        assert pid_line == "pid 1", out                          # its own pid namespace
        assert sha_line == f"{hashlib.sha256(read).hexdigest()}  /data/read.bin", out
        (lazy,) = daemon.api("GET", "/api/v1/mounts")
        lazy_mp = lazy["mountpoint"]
        (kind,) = [(fs, opts) for fs, mp, opts in mounts_under(lazy_mp) if mp == lazy_mp]
        assert kind[0] == "erofs" and "fsid=" in kind[1], kind   # fscache mode, not a file
        root = [line.split() for line in mount_lines if line.split()[1:2] == ["/"]]
        assert len(root) == 1 and root[0][2] == "overlay", out
        assert f"lowerdir={lazy_mp}" in root[0][3], out         # the lazy mount, stacked
        assert ctd.ctr("containers", "ls", "-q", ns=CRI_NS).stdout.split() == []  # --rm

        # the daemon fetched what the container read (busybox, read.bin) and no more
        fetched = {b: m["bytes_fetched"]
                   for b, m in daemon.api("GET", "/api/v1/metrics")["blobs"].items()}
        assert fetched.get(unread_blob, 0) == 0, fetched
        assert READ_SIZE <= fetched[read_blob] <= READ_SIZE + SLACK, fetched
        assert 0 < fetched[busybox_blob] <= blob_size[busybox_blob] + SLACK, fetched
        total = sum(fetched.values())
        assert total < sum(blob_size.values()) - UNREAD_SIZE + SLACK, (fetched, blob_size)

        # removal (the container went with `ctr run --rm`): the image, containerd's GC:
        # no snapshot, no mount
        t0 = time.monotonic()
        names = ctd.ctr("image", "ls", "-q", ns=CRI_NS).stdout.decode().split()
        assert ref in names
        ctd.ctr("image", "rm", "--sync", *names, ns=CRI_NS)
        snapdir = scratch / "cache" / "snapshotter" / "snapshots"
        wait_for(lambda: os.listdir(snapdir) == [], 120, "snapshots removed",
                 log=str(daemon.log))
        t["remove_gc"] = time.monotonic() - t0
        assert ctd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls",
                       ns=CRI_NS).stdout.decode().splitlines()[1:] == []
        assert daemon.api("GET", "/api/v1/mounts") == []
        assert mounts_under(str(scratch)) == [] and mounts_under(short) == []
        t["total"] = time.monotonic() - t_start
        report = {"kernel": os.uname().release, "seconds": {k: round(v, 2)
                                                            for k, v in t.items()},
                  "blob_bytes_fetched": fetched, "blob_sizes": blob_size}
        print(f"guest timings: {json.dumps(report)}")
        out = os.environ.get("VMTEST_OUT")
        if out:
            with open(os.path.join(out, "containerd-timings.json"), "w") as f:
                json.dump(report, f, indent=1)
    finally:
        if ctd is not None:
            # Containerd.stop() clears its own namespace, not CRI's: a task left by a
            # failed run goes first, so no shim outlives the test
            ctd.ctr("tasks", "rm", "-f", "c1", ns=CRI_NS, check=False)  # kills it
            ctd.ctr("containers", "rm", "c1", ns=CRI_NS, check=False)
            ctd.stop()
        for _fs, mp, _opts in reversed(mounts_under(short) + mounts_under(str(scratch))):
            subprocess.run(["umount", "-l", mp], capture_output=True)
        if daemon is not None:
            daemon.stop()
            with contextlib.suppress(OSError):
                wait_device_free()
        if reg is not None:
            reg.stop()
        shutil.rmtree(short, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
