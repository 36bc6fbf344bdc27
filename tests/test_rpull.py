"""`fscache-daemon rpull`: a Nydus image converted by `erofs-tools convert`, pushed to the
real docker-registry, pulled into a private containerd 1.6 through containerd's own gRPC
API without its blob layers, then started by a stock `ctr run --snapshotter NAME` on the
daemon's lazy mount (fanotify front end; the snapshotter inside `fscache-daemon run`).
Removal through `ctr image rm` + containerd's GC, a re-pull after it, and the error
paths (missing image, unreachable containerd) with nothing left registered."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time

import helpers
import pytest
from containerd_fixtures import (
    REPO,
    SNAPSHOTTER,
    Containerd,
    OciImage,
    busybox_layers,
    require_containerd,
    short_tmpdir,
    tar_layer,
    wait_for,
)
from nydus_fixtures import convert
from registry_fixtures import FlakyProxy, registry  # noqa: F401
from test_daemon_support import DaemonProc, require_lazy_kernel, socket_answers

pytestmark = [pytest.mark.root, pytest.mark.registry]

SCRIPT = "cat /etc/greeting /etc/third; test -e /etc/gone || echo gone-ok"
EXPECTED = b"hello from layer two\nlayer three\ngone-ok\n"


def rpull(ctd: Containerd, ref: str, *extra: str, address: str | None = None
          ) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fscache_daemon.cli", "rpull", ref, "--address",
         address or ctd.sock, "--namespace", ctd.namespace, "--snapshotter", SNAPSHOTTER,
         *extra], capture_output=True, text=True, timeout=300, cwd=REPO)


def snapshot_rows(ctd: Containerd) -> list[list[str]]:
    out = ctd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls").stdout.decode()
    return [line.split() for line in out.splitlines()[1:]]


def gc(ctd: Containerd) -> None:
    """Run containerd's garbage collection to its end (deleting a lease with --sync)."""
    lease = ctd.ctr("leases", "create").stdout.decode().split()[0]
    ctd.ctr("leases", "delete", "--sync", lease)


def content_digests(ctd: Containerd) -> list[str]:
    out = ctd.ctr("content", "ls").stdout.decode()
    return [line.split()[0] for line in out.splitlines()[1:]]


def assert_nothing_registered(ctd: Containerd, root: str) -> None:
    assert ctd.ctr("image", "ls", "-q").stdout.split() == []
    assert snapshot_rows(ctd) == []
    assert content_digests(ctd) == []
    assert ctd.ctr("leases", "ls", "-q").stdout.split() == []
    assert os.listdir(os.path.join(root, "snapshots")) == []


@contextlib.contextmanager
def daemon_and_containerd(prefix: str):
    """The daemon with its snapshotter socket and a containerd using it, in a short
    temporary directory: -> (that directory, DaemonProc, Containerd, the snapshotter's
    root). At the end: containerd stopped, a failed test's leftover lazy mounts
    unmounted, the daemon stopped (its log copied to $RPULL_KEEP_LOG if set), the
    directory removed."""
    d = short_tmpdir(prefix)
    sock = os.path.join(d, "snap.sock")
    root = os.path.join(d, "daemon", "cache", "snapshotter")
    daemon = DaemonProc(os.path.join(d, "daemon"),
                        extra=("--snapshotter-socket", sock)).start()
    ctd = None
    try:
        wait_for(lambda: socket_answers(sock), 30, "snapshots socket")
        ctd = Containerd(d, {SNAPSHOTTER: sock})
        yield d, daemon, ctd, root
    finally:
        if ctd is not None:
            ctd.stop()
        with open("/proc/self/mounts") as f:
            for m in [line.split()[1] for line in f if line.split()[1].startswith(d)]:
                helpers.sys_umount(m, lazy=True)
        daemon.cleanup()
        if os.environ.get("RPULL_KEEP_LOG"):
            shutil.copy(daemon.log_path, os.environ["RPULL_KEEP_LOG"])
        shutil.rmtree(d, ignore_errors=True)


def test_rpull_runs_lazily_and_goes_with_the_image(registry, tmp_path):  # noqa: F811
    require_containerd()
    require_lazy_kernel()
    with daemon_and_containerd("rpull-") as (d, daemon, ctd, root):
        big = random.Random(11).randbytes(8 << 20)  # incompressible: its own 8 MiB blob
        image = OciImage(busybox_layers() + [tar_layer([("data", "dir", None),
                                                       ("data/big", "file", big)])],
                         ["/bin/sh"], gzipped=True)
        image.push(registry.client(), "src/busybox", "1")
        ref = f"{registry.host}/nydus/busybox:1"
        convert(f"{registry.host}/src/busybox:1", ref)
        manifest = registry.client().get_manifest("nydus/busybox", "1").json
        blobs = [x["digest"] for x in manifest["layers"]
                 if x.get("annotations", {}).get("containerd.io/snapshot/nydus-blob")]
        assert len(blobs) == 4
        boot_layer = manifest["layers"][-1]
        big_blob = blobs[3].split(":", 1)[1]

        # -- errors: one line, exit 1, nothing registered ---------------------------
        p = rpull(ctd, f"{registry.host}/nydus/busybox:missing")
        assert p.returncode == 1 and p.stdout == ""
        assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
        assert "missing" in p.stderr
        p = rpull(ctd, ref, address=os.path.join(d, "no-containerd.sock"))
        assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
        assert "no-containerd.sock" in p.stderr and "cannot connect" in p.stderr
        p = rpull(ctd, ref, "--snapshotter", "no-such-snapshotter")
        assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
        assert "no-such-snapshotter" in p.stderr
        assert_nothing_registered(ctd, root)
        # a snapshotter that would want the blob layers' bytes: refused, rolled back
        p = rpull(ctd, ref, "--snapshotter", "overlayfs")
        assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
        assert "does not serve Nydus blob layers lazily" in p.stderr
        assert ctd.ctr("snapshots", "--snapshotter", "overlayfs", "ls").stdout.count(
            b"\n") <= 1
        assert_nothing_registered(ctd, root)
        # the bootstrap layer does not unpack to the config's diff id: after four blob
        # layers were committed by our snapshotter, all goes again (lease, GC)
        bad = f"{registry.host}/nydus/busybox:bad-diff-id"
        push_with_bad_last_diff_id(registry.client(), "nydus/busybox", "1", "bad-diff-id")
        p = rpull(ctd, bad)
        assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
        assert "diff id" in p.stderr
        wait_for(lambda: os.listdir(os.path.join(root, "snapshots")) == [], 60,
                 "rolled-back snapshots removed", log=daemon.log_path)
        assert_nothing_registered(ctd, root)

        # -- rpull: no blob layer downloaded, the chain registered ------------------
        t0 = time.monotonic()
        p = rpull(ctd, ref, "--json")
        t_cli = time.monotonic() - t0
        assert p.returncode == 0, p.stderr
        res = json.loads(p.stdout)
        assert res["image"] == ref and res["layers"] == 5
        assert res["lazy_layers"] == 4 and res["unpacked_layers"] == 1
        # manifest + config + the bootstrap layer, nothing else
        assert res["bytes_fetched"] <= boot_layer["size"] + (64 << 10), res
        t_pull = res["seconds"]
        assert ref in ctd.ctr("image", "ls", "-q").stdout.decode().split()
        content = content_digests(ctd)
        assert not any(b in content for b in blobs), content
        assert boot_layer["digest"] in content
        rows = snapshot_rows(ctd)
        assert len(rows) == 5 and all(r[-1] == "Committed" for r in rows)
        assert rows_form_one_chain(rows, res["chain_id"])
        assert ctd.ctr("leases", "ls", "-q").stdout.split() == []  # kept by the image
        gc(ctd)   # a full collection now: the image's labels keep all of it
        assert snapshot_rows(ctd) == rows and boot_layer["digest"] in content_digests(ctd)
        # the snapshotter mounted the image when its bootstrap layer was committed
        # (--mount-early, rpull's default), before any container asked for it
        lazy = os.path.join(root, "lazy")
        wait_for(lambda: os.path.isdir(lazy) and len(os.listdir(lazy)) == 1 and
                 os.path.ismount(os.path.join(lazy, os.listdir(lazy)[0])), 60,
                 "the lazy mount made at the bootstrap layer's commit",
                 log=daemon.log_path)
        (early_mp,) = [os.path.join(lazy, n) for n in os.listdir(lazy)]
        assert daemon.metrics()["blobs"][big_blob]["bytes_fetched"] == 0

        # -- ctr run on the lazy mount ------------------------------------------------
        t0 = time.monotonic()
        out = ctd.run_out("--snapshotter", SNAPSHOTTER, ref, "lazy1",
                      "/bin/sh", "-c", SCRIPT)
        t_run = time.monotonic() - t0
        assert out == EXPECTED
        (mp,) = [os.path.join(lazy, n) for n in os.listdir(lazy)]
        assert os.path.ismount(mp) and mp == early_mp     # the container used that one
        per_blob = {k: b["bytes_fetched"] for k, b in daemon.metrics()["blobs"].items()}
        fetched = sum(per_blob.values())
        # busybox ran (about 1 MiB compressed); the 8 MiB file nobody read was not fetched
        assert 0 < fetched <= 2 << 20 and per_blob[big_blob] == 0, per_blob

        # a second container shares the lazy mount, beside a running one
        ctd.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, ref, "long", "/bin/busybox",
                "sleep", "600")
        out = ctd.run_out("--snapshotter", SNAPSHOTTER, ref, "reader",
                      "/bin/busybox", "sha256sum", "/data/big")
        assert out.split()[0].decode() == hashlib.sha256(big).hexdigest()
        assert os.listdir(lazy) == [os.path.basename(mp)]
        st, mounts = daemon.api.request("GET", "/api/v1/mounts")
        assert st == 200 and [m["mountpoint"] for m in mounts] == [mp]
        big_fetched = daemon.metrics()["blobs"][big_blob]["bytes_fetched"]
        assert (8 << 20) <= big_fetched <= (8 << 20) + (1 << 20)

        # rpull again while the image is there: nothing to do, nothing fetched twice
        p = rpull(ctd, ref, "--json")
        assert p.returncode == 0, p.stderr
        again = json.loads(p.stdout)
        assert again["present_layers"] == 5 and again["unpacked_layers"] == 0, again
        ctd.ctr("task", "kill", "-s", "SIGKILL", "long")
        wait_for(lambda: b"RUNNING" not in ctd.ctr("task", "ls").stdout, 30, "task stopped")
        ctd.ctr("task", "rm", "-f", "long")
        ctd.ctr("container", "rm", "long")

        # -- image rm + GC: no snapshot, no content, no mount ------------------------
        ctd.ctr("image", "rm", "--sync", ref)
        wait_for(lambda: os.listdir(os.path.join(root, "snapshots")) == [], 60,
                 "snapshots removed", log=daemon.log_path)
        assert_nothing_registered(ctd, root)
        assert not os.path.ismount(mp)
        st, mounts = daemon.api.request("GET", "/api/v1/mounts")
        assert st == 200 and mounts == []

        # -- pulled again after removal, by two rpulls at once; the daemon mounts the
        # image again, its big blob complete in the cache (the remount that once
        # failed with EBADF) ---------------------------------------------------------
        cmd = [sys.executable, "-m", "fscache_daemon.cli", "rpull", ref, "--address",
               ctd.sock, "--namespace", ctd.namespace, "--snapshotter", SNAPSHOTTER,
               "--no-mount-early"]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, cwd=REPO) for _ in range(2)]
        for proc in procs:
            out_, err_ = proc.communicate(timeout=300)
            assert proc.returncode == 0, err_
        rows = snapshot_rows(ctd)
        assert len(rows) == 5 and all(r[-1] == "Committed" for r in rows), rows
        # the race's losers (their extraction snapshots) leave containerd's metadata
        # at once and the snapshotter at containerd's next collection
        gc(ctd)
        wait_for(lambda: len(os.listdir(os.path.join(root, "snapshots"))) == 5, 60,
                 "the losers' snapshots removed by GC", log=daemon.log_path)
        st, mounts = daemon.api.request("GET", "/api/v1/mounts")
        assert st == 200 and mounts == []       # --no-mount-early: the first run mounts
        out = ctd.run_out("--snapshotter", SNAPSHOTTER, ref, "again",
                      "/bin/busybox", "sha256sum", "/data/big")
        assert out.split()[0].decode() == hashlib.sha256(big).hexdigest()
        out = ctd.run_out("--snapshotter", SNAPSHOTTER, ref, "again2",
                      "/bin/sh", "-c", SCRIPT)
        assert out == EXPECTED
        ctd.ctr("image", "rm", "--sync", ref)
        wait_for(lambda: os.listdir(os.path.join(root, "snapshots")) == [], 60,
                 "snapshots removed", log=daemon.log_path)
        assert_nothing_registered(ctd, root)
        # a plain OCI image that containerd pulled already for its overlayfs
        # snapshotter: rpull applies every layer from the content store (nothing
        # downloaded again), repoints the image record, and it runs the same way
        plain = f"{registry.host}/src/busybox:1"
        ctd.ctr("image", "pull", "--plain-http", "--snapshotter", "overlayfs", plain)
        p = rpull(ctd, plain, "--json")
        assert p.returncode == 0, p.stderr
        res_plain = json.loads(p.stdout)
        assert res_plain["unpacked_layers"] == 4 and res_plain["lazy_layers"] == 0
        assert res_plain["bytes_fetched"] < 64 << 10, res_plain
        out = ctd.run_out("--snapshotter", SNAPSHOTTER, plain, "plain",
                      "/bin/sh", "-c", SCRIPT)
        assert out == EXPECTED
        ctd.ctr("image", "rm", "--sync", plain)
        wait_for(lambda: os.listdir(os.path.join(root, "snapshots")) == [], 60,
                 "snapshots removed", log=daemon.log_path)
        assert_nothing_registered(ctd, root)
        assert ctd.ctr("snapshots", "--snapshotter", "overlayfs", "ls").stdout.count(
            b"\n") <= 1
        print(f"rpull {t_pull:.2f}s ({t_cli:.2f}s with the process start, "
              f"{res['bytes_fetched']} bytes), first lazy run "
              f"{t_run:.2f}s, {fetched} blob bytes fetched for it, {big_fetched} for the "
              f"8 MiB file")


def rows_form_one_chain(rows: list[list[str]], top: str) -> bool:
    """`ctr snapshots ls` rows (KEY PARENT KIND; the bottom one has no parent): one
    chain from `top` down to a root."""
    parent = {r[0]: (r[1] if len(r) == 3 else "") for r in rows}
    seen, key = 0, top
    while key:
        if key not in parent:
            return False
        key, seen = parent[key], seen + 1
    return seen == len(rows)


def push_with_bad_last_diff_id(client, repo: str, tag: str, new_tag: str) -> None:
    """Push `repo:tag` again as `new_tag` with a config whose last diff id is wrong."""
    from erofs_tools.registry.manifest import Manifest
    m = client.get_manifest(repo, tag)
    doc = json.loads(m.data)
    config = json.loads(client.get_blob(repo, doc["config"]["digest"]))
    config["rootfs"]["diff_ids"][-1] = "sha256:" + "0" * 64
    data = json.dumps(config).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    client.push_blob(repo, data, digest=digest)
    doc["config"].update(digest=digest, size=len(data))
    raw = json.dumps(doc).encode()
    client.put_manifest(repo, new_tag, Manifest(raw, m.media_type,
                                                "sha256:" + hashlib.sha256(raw).hexdigest()))


def test_rpull_insecure_reaches_the_lazy_mount(registry):  # noqa: F811
    """`rpull --insecure` of an image on a registry that is not loopback (127.0.0.2 to
    the plain-HTTP rule) and speaks plain HTTP only: the pull works, and so do the
    container's lazy reads, though the daemon was given no --insecure-registry."""
    require_containerd()
    require_lazy_kernel()
    with daemon_and_containerd("rpullhttp-") as (d, daemon, ctd, root):
        proxy = FlakyProxy(registry.host, bind="127.0.0.2")
        OciImage(busybox_layers(), ["/bin/sh"], gzipped=True).push(
            registry.client(), "src/plain", "1")
        convert(f"{registry.host}/src/plain:1", f"{registry.host}/nydus/plain:1")
        ref = f"{proxy.host}/nydus/plain:1"
        # not loopback: verified HTTPS unless asked, and this registry has no TLS
        p = rpull(ctd, ref)
        assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
        assert_nothing_registered(ctd, root)
        p = rpull(ctd, ref, "--insecure", "--json")
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["lazy_layers"] == 3
        out = ctd.run_out("--snapshotter", SNAPSHOTTER, ref, "http1",
                          "/bin/sh", "-c", "cat /etc/greeting")
        assert out == b"hello from layer two\n"
        fetched = daemon.metrics()["totals"]["bytes_fetched"]
        assert fetched > 0
        # the blobs came through the plain-HTTP host the pull named
        assert any("/blobs/" in r for r in proxy.requests[-50:]), proxy.requests
        ctd.ctr("image", "rm", "--sync", ref)
        wait_for(lambda: os.listdir(os.path.join(root, "snapshots")) == [], 60,
                 "snapshots removed", log=daemon.log_path)
        assert_nothing_registered(ctd, root)
