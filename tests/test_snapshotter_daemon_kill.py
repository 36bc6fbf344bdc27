"""SIGKILL of the daemon that runs the snapshotter (`fscache-daemon run
--snapshotter-socket`) while a container reads a large file of a lazily mounted Nydus
image: the reader waits (its events stay in the fd holder), never sees zeros, and gets
exact bytes once the daemon restarts on the same cache directory; containerd finds the
snapshotter in the same state, starts new containers, and removes the image."""

from __future__ import annotations

import hashlib
import os
import random
import re
import secrets
import signal
import subprocess
import time

import helpers
import pytest
from containerd_fixtures import (
    SNAPSHOTTER,
    busybox_layers,
    cri_pull,
    require_containerd,
    tar_layer,
    wait_for,
)
from nydus_fixtures import CRI_NS, daemon_stack, push_nydus, remove_images, snapshot_rows
from registry_fixtures import FlakyProxy, registry  # noqa: F401
from test_daemon_support import require_lazy_kernel

pytestmark = [pytest.mark.root, pytest.mark.registry]

BIG = 64 << 20


def _kill(p: subprocess.Popen | None) -> None:
    if p is not None and p.poll() is None:
        p.send_signal(signal.SIGKILL)
        p.wait()


def test_daemon_sigkill_while_a_container_reads(registry):  # noqa: F811
    require_containerd()
    require_lazy_kernel()
    tag = secrets.token_hex(3)          # container ids are global to runc's state root
    big = random.Random(11).randbytes(BIG)      # incompressible: a 64 MiB blob
    proxy = FlakyProxy(registry.host)
    reader = None
    with daemon_stack("snapkill-", (proxy.host,), before=(lambda: _kill(reader),),
                      after=(proxy,)) as (d, daemon, ctd):
        ref = push_nydus(registry, "bigread", busybox_layers() + [
            tar_layer([("data", "dir", None), ("data/big", "file", big)])], via=proxy.host)
        manifest = registry.client().get_manifest("nydus/bigread", "1").json
        big_digest = manifest["layers"][3]["digest"]
        big_blob = big_digest.split(":", 1)[1]
        cri_pull(ctd.sock, ref)
        out = ctd.run_out("--snapshotter", SNAPSHOTTER, ref, f"first-{tag}",
                          "cat", "/etc/greeting", ns=CRI_NS)
        assert out == b"hello from layer two\n"
        (lazy,) = daemon.lazy_mounts()
        assert daemon.blob_metrics(big_blob)["bytes_fetched"] == 0
        ctd.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, ref, f"long-{tag}",
                "/bin/busybox", "sleep", "600", ns=CRI_NS)

        # the registry answers the first 4 range reads of the big blob, then holds the
        # rest: the reader is certainly in the middle of the file when the daemon dies
        proxy.match = re.compile(f"GET .*/blobs/{big_digest}")
        proxy.failures = [None] * 4 + ["hold"] * 100_000
        reader = subprocess.Popen(
            ["ctr", "-a", ctd.sock, "-n", CRI_NS, "run", "--snapshotter", SNAPSHOTTER, ref,
             f"reader-{tag}", "/bin/busybox", "sha256sum", "/data/big"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for(lambda: proxy.held >= 1, 120, "a held read of the big blob", reader)
        fetched = daemon.blob_metrics(big_blob)["bytes_fetched"]
        before = snapshot_rows(ctd)
        daemon.kill()
        assert 0 < fetched < BIG, fetched
        holder = os.path.join(daemon.cache_dir, "fdholder.sock")
        helpers.wait_until(lambda: helpers.holder_status(holder)["pending"] >= 1,
                           what="the reader's events pending in the fd holder")
        assert reader.poll() is None        # it waits; nothing answered it with zeros

        proxy.failures = []
        proxy.release()
        daemon.start()      # same cache directory: mounts.json, the holder, metadata.db
        stdout, stderr = reader.communicate(timeout=300)
        assert reader.returncode == 0, stderr
        assert stdout.split()[0].decode() == hashlib.sha256(big).hexdigest()
        assert "picked up mounted mount " + lazy in open(daemon.log_path).read()
        assert daemon.lazy_mounts() == [lazy]

        # containerd sees the same snapshots, and the snapshotter keeps working (its
        # proxy client first sees the old connection closed, "unavailable", and redials
        # with a backoff of at most 3 s)
        wait_for(lambda: ctd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls",
                                 ns=CRI_NS, check=False).returncode == 0, 30,
                 "containerd talking to the restarted snapshotter")
        assert snapshot_rows(ctd) == before
        out = ctd.run_out("--snapshotter", SNAPSHOTTER, ref, f"after-{tag}",
                      "cat", "/etc/third", ns=CRI_NS)
        assert out == b"layer three\n"
        out = ctd.ctr("task", "exec", "--exec-id", "e1", f"long-{tag}", "/bin/busybox", "sha256sum",
                      "/data/big", ns=CRI_NS).stdout
        assert out.split()[0].decode() == hashlib.sha256(big).hexdigest()
        assert daemon.lazy_mounts() == [lazy]

        ctd.ctr("task", "kill", "-s", "SIGKILL", f"long-{tag}", ns=CRI_NS)
        wait_for(lambda: b"RUNNING" not in ctd.ctr("task", "ls", ns=CRI_NS).stdout, 30,
                 "task stopped")
        for c in (f"long-{tag}", f"reader-{tag}"):
            ctd.ctr("task", "rm", "-f", c, ns=CRI_NS, check=False)
            ctd.ctr("container", "rm", c, ns=CRI_NS)
        remove_images(ctd)
        daemon.wait_snapshots_removed()
        assert snapshot_rows(ctd) == []
        assert daemon.lazy_mounts() == []
        st, mounts = daemon.api.request("GET", "/api/v1/mounts")
        assert st == 200 and mounts == []
        print(f"killed at {fetched} of {BIG} bytes fetched; reader exact after restart")


def test_daemon_sigkill_while_it_mounts_an_image(registry):  # noqa: F811
    """SIGKILL while a container's Prepare waits for the image's lazy mount (the daemon
    is reading the blobs' chunk maps from a registry that does not answer yet): the
    start fails, and after the restart nothing of it stays: containerd's GC removes the
    snapshot containerd never recorded, the next container mounts the image once and
    runs, and removing the image leaves nothing."""
    require_containerd()
    require_lazy_kernel()
    tag = secrets.token_hex(3)
    proxy = FlakyProxy(registry.host)
    starter = None
    with daemon_stack("snapkillm-", (proxy.host,), before=(lambda: _kill(starter),),
                      after=(proxy,)) as (d, daemon, ctd):
        ref = push_nydus(registry, "mountkill", busybox_layers(), via=proxy.host)
        manifest = registry.client().get_manifest("nydus/mountkill", "1").json
        blobs = [x["digest"] for x in manifest["layers"][:-1]]
        cri_pull(ctd.sock, ref)
        before = snapshot_rows(ctd)
        proxy.match = re.compile("GET .*/blobs/(" + "|".join(blobs) + ")")
        proxy.failures = ["hold"] * 1000
        starter = subprocess.Popen(
            ["ctr", "-a", ctd.sock, "-n", CRI_NS, "run", "--rm", "--snapshotter",
             SNAPSHOTTER, ref, f"starter-{tag}", "cat", "/etc/greeting"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for(lambda: proxy.held >= 1, 60, "the lazy mount waiting for the registry",
                 starter)
        daemon.kill()
        proxy.failures = []
        proxy.release()
        _, err = starter.communicate(timeout=60)
        assert starter.returncode != 0, err        # its Prepare's connection went away
        daemon.start()
        t0 = time.monotonic()
        # containerd's proxy client redials with a backoff of at most 3 s
        wait_for(lambda: ctd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls",
                                 ns=CRI_NS, check=False).returncode == 0, 30,
                 "containerd talking to the restarted snapshotter")
        print(f"containerd reached the restarted snapshotter after "
              f"{time.monotonic() - t0:.2f}s")
        assert snapshot_rows(ctd) == before        # containerd recorded nothing of it

        out = ctd.run_out("--snapshotter", SNAPSHOTTER, ref, f"next-{tag}",
                      "cat", "/etc/greeting", ns=CRI_NS)
        assert out == b"hello from layer two\n"
        assert len(daemon.lazy_mounts()) == 1
        # the killed Prepare's snapshot, which containerd never recorded, goes with
        # containerd's next snapshot GC (the one above's container removal)
        snaps = os.path.join(daemon.snap_root, "snapshots")
        wait_for(lambda: len(os.listdir(snaps)) == len(before), 60,
                 "the orphaned snapshot collected", log=daemon.log_path)
        remove_images(ctd)
        daemon.wait_snapshots_removed()
        assert snapshot_rows(ctd) == [] and daemon.lazy_mounts() == []
        st, mounts = daemon.api.request("GET", "/api/v1/mounts")
        assert st == 200 and mounts == []
