"""Real containerd 1.6 (private config, root, state, socket) with the snapshotter as its
proxy plugin: import an OCI image, run containers with runc, list the chain, remove the
image and see every snapshot directory go, and SIGKILL + restart the snapshotter while
containers exist and run."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import time

import pytest
from containerd_fixtures import (
    SNAPSHOTTER,
    Containerd,
    OciImage,
    Snapshotter,
    busybox_layers,
    oci_archive,
    require_containerd,
    short_tmpdir,
    wait_for,
)
from registry_fixtures import registry  # noqa: F401

pytestmark = pytest.mark.root

IMAGE = "example.test/erofs-tools/busybox:1"
SCRIPT = ("cat /etc/greeting /etc/third; test -e /etc/gone || echo gone-ok; "
          "echo written > /tmp/mine; cat /tmp/mine")
EXPECTED = b"hello from layer two\nlayer three\ngone-ok\nwritten\n"


class Env:
    def __init__(self) -> None:
        require_containerd()
        self.dir = short_tmpdir("snapctd-")
        self.root = os.path.join(self.dir, "snaproot")
        self.snap = Snapshotter(self.root, os.path.join(self.dir, "snap.sock"))
        self.ctd = Containerd(self.dir, {SNAPSHOTTER: self.snap.sock})
        self.archive = os.path.join(self.dir, "image.tar")
        self.chain = oci_archive(self.archive, IMAGE, busybox_layers(), ["/bin/sh"])

    def import_image(self) -> None:
        self.ctd.ctr("image", "import", "--snapshotter", SNAPSHOTTER, self.archive)

    def run(self, cid: str, script: str = SCRIPT) -> bytes:
        return self.ctd.run_out("--snapshotter", SNAPSHOTTER, IMAGE, cid,
                            "/bin/sh", "-c", script)

    def snapshots_ls(self) -> list[list[str]]:
        out = self.ctd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls").stdout.decode()
        return [line.split() for line in out.splitlines()[1:] if line.strip()]

    def snapshot_dirs(self) -> list[str]:
        return sorted(os.listdir(os.path.join(self.root, "snapshots")))

    def mounts_under_root(self) -> list[str]:
        with open("/proc/self/mountinfo") as f:
            return [line for line in f if self.root in line]

    def close(self) -> None:
        try:
            self.ctd.stop()
        finally:
            self.snap.stop()
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def env():
    e = Env()
    yield e
    e.close()


def test_import_run_and_chain(env):
    t0 = time.monotonic()
    env.import_image()
    t_import = time.monotonic() - t0
    # the chain: bottom layer without parent, each next on the one below, all committed
    rows = {r[0]: r[1:] for r in env.snapshots_ls()}
    assert set(rows) == set(env.chain)
    assert rows[env.chain[0]] == ["Committed"]
    assert rows[env.chain[1]] == [env.chain[0], "Committed"]
    assert rows[env.chain[2]] == [env.chain[1], "Committed"]
    # the layers were unpacked into this snapshotter's directories, not containerd's own
    assert env.snapshot_dirs() == ["1", "2", "3"]
    assert open(os.path.join(env.root, "snapshots", "2", "fs", "etc", "greeting"),
                "rb").read() == b"hello from layer two\n"
    native = os.path.join(env.dir, "root", "io.containerd.snapshotter.v1.overlayfs",
                          "snapshots")
    assert not os.path.isdir(native) or os.listdir(native) == []
    usage = env.ctd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "usage",
                        env.chain[0]).stdout.decode()
    # what Usage measured at Commit: busybox's blocks; the root, 6 dirs, busybox, 5 links
    assert usage.splitlines()[1].split() == [env.chain[0], "1.9", "MiB", "13"]

    t0 = time.monotonic()
    assert env.run("c1") == EXPECTED
    t_run = time.monotonic() - t0
    # a second container gets a fresh writable layer: the first one's file is not there
    assert env.run("c2", "test -e /tmp/mine && echo leaked || echo fresh") == b"fresh\n"
    info = json.loads(env.ctd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "info",
                                  env.chain[2]).stdout)
    assert info["Kind"] == "Committed" and info["Parent"] == env.chain[1]
    print(f"import {t_import:.2f}s, ctr run {t_run:.2f}s")


def test_image_rm_removes_every_snapshot_dir(env):
    env.import_image()
    assert env.run("c1") == EXPECTED
    env.ctd.ctr("container", "create", "--snapshotter", SNAPSHOTTER, IMAGE, "kept")
    # three layers + the container's active one (+ c1's, until containerd's GC runs)
    assert ["kept", env.chain[2], "Active"] in env.snapshots_ls()
    assert len(env.snapshot_dirs()) >= 4
    env.ctd.ctr("container", "rm", "kept")
    env.ctd.ctr("image", "rm", "--sync", IMAGE)
    # containerd's GC removes the snapshots from the backend: wait for that fact
    wait_for(lambda: env.snapshot_dirs() == [], 30, "snapshot dirs removed")
    assert env.snapshots_ls() == []
    assert env.mounts_under_root() == []
    # and the image comes back from scratch afterwards
    env.import_image()
    assert env.run("c3") == EXPECTED


def test_snapshotter_sigkill_restart_keeps_state(env):
    env.import_image()
    # (no "-c" here: ctr's container create would read it as its own --config flag)
    env.ctd.ctr("container", "create", "--snapshotter", SNAPSHOTTER, IMAGE, "later",
                "/bin/cat", "/etc/greeting", "/etc/third")
    env.ctd.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, IMAGE, "running",
                "/bin/sh", "-c", "echo started > /tmp/state; exec sleep 600")
    before = sorted(env.snapshots_ls())
    dirs_before = env.snapshot_dirs()
    assert len(before) == 5 and len(dirs_before) == 5  # three layers, two containers

    env.snap.kill()
    env.snap.start()

    # containerd's proxy client sees the old connection closed ("unavailable") and
    # redials with gRPC backoff: wait for it to answer again, then compare the state
    t0 = time.monotonic()

    def answers() -> bool:
        p = env.ctd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "mounts", "/tmp/x",
                        "later", check=False)
        return p.returncode == 0 and b"overlay" in p.stdout
    wait_for(answers, 60, "containerd talking to the restarted snapshotter")
    print(f"containerd reconnected {time.monotonic() - t0:.2f}s after the restart")
    assert sorted(env.snapshots_ls()) == before
    assert env.snapshot_dirs() == dirs_before
    # the running container never depended on the process: its overlay is the kernel's
    out = env.ctd.ctr("task", "exec", "--exec-id", "e1", "running", "cat",
                      "/tmp/state", "/etc/third").stdout
    assert out == b"started\nlayer three\n"
    # the container prepared before the kill starts from the restored metadata
    assert env.ctd.ctr("task", "start", "later").stdout == (
        b"hello from layer two\nlayer three\n")
    assert env.run("after") == EXPECTED

    env.ctd.ctr("task", "kill", "-s", "SIGKILL", "running")
    wait_for(lambda: b"STOPPED" in env.ctd.ctr("task", "ls").stdout
             or b"running" not in env.ctd.ctr("task", "ls").stdout, 30, "task stopped")
    env.ctd.ctr("task", "rm", "-f", "running")
    env.ctd.ctr("container", "rm", "running", "later")
    env.ctd.ctr("image", "rm", "--sync", IMAGE)
    wait_for(lambda: env.snapshot_dirs() == [], 30, "snapshot dirs removed")
    assert env.mounts_under_root() == []


def test_pull_from_registry_and_run(env, registry):
    """The way images usually arrive: `ctr image pull` of gzip layers from a real
    registry (Debian's docker-registry), unpacked by containerd into our snapshots."""
    image = OciImage(busybox_layers(), ["/bin/sh"], gzipped=True)
    image.push(registry.client(), "erofs/busybox", "1")
    ref = f"{registry.host}/erofs/busybox:1"
    t0 = time.monotonic()
    env.ctd.ctr("image", "pull", "--plain-http", "--snapshotter", SNAPSHOTTER, ref)
    t_pull = time.monotonic() - t0
    rows = {r[0]: r[1:] for r in env.snapshots_ls()}
    assert rows == {image.chain[0]: ["Committed"],
                    image.chain[1]: [image.chain[0], "Committed"],
                    image.chain[2]: [image.chain[1], "Committed"]}
    out = env.ctd.run_out("--snapshotter", SNAPSHOTTER, ref, "pulled",
                      "/bin/sh", "-c", SCRIPT)
    assert out == EXPECTED
    env.ctd.ctr("image", "rm", "--sync", ref)
    wait_for(lambda: env.snapshot_dirs() == [], 30, "snapshot dirs removed")
    print(f"pull+unpack {t_pull:.2f}s")


def test_sixteen_containers_from_four_images_at_once(env):
    """16 `ctr run` at once over 4 images sharing their bottom layer: every container
    sees its own image's files, and removing everything leaves no directory."""
    images = []
    for n in range(4):
        name = f"example.test/erofs-tools/multi{n}:1"
        archive = os.path.join(env.dir, f"multi{n}.tar")
        oci_archive(archive, name, busybox_layers(f"image {n}\n".encode()), ["/bin/sh"])
        env.ctd.ctr("image", "import", "--snapshotter", SNAPSHOTTER, archive)
        images.append(name)
    # one busybox layer shared by all four, then two own layers each
    assert len(env.snapshots_ls()) == 1 + 4 * 2
    t0 = time.monotonic()

    def run(i: int) -> tuple[int, bytes]:
        return i, env.ctd.run_out("--snapshotter", SNAPSHOTTER, images[i % 4], f"multi-{i}",
                                  "/bin/sh", "-c",
                                  f"cat /etc/greeting; echo {i} > /tmp/id; cat /tmp/id",
                                  timeout=300)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for i, out in pool.map(run, range(16)):
            assert out == f"image {i % 4}\n{i}\n".encode()
    elapsed = time.monotonic() - t0
    for name in images:
        env.ctd.ctr("image", "rm", "--sync", name)
    wait_for(lambda: env.snapshot_dirs() == [], 60, "snapshot dirs removed")
    assert env.mounts_under_root() == []
    print(f"16 containers from 4 images: {elapsed:.2f}s")
