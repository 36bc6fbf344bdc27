"""Containers of an image whose lazy mount is slow (its registry holds the blob reads)
must not hold up the snapshots calls of everything else: each waiting Prepare occupies
one of the gRPC server's threads until the mount is made."""

from __future__ import annotations

import os
import shutil
import threading

import grpc
import pytest
from containerd_fixtures import short_tmpdir, wait_for
from helpers import HANG
from test_snapshotter_service import (
    Client,
    StandInDaemonAPI,
    blob_then_bootstrap,
)

from fscache_daemon.snapshotter import serve
from fscache_daemon.snapshotter.proto import snapshots_pb2 as pb

pytestmark = pytest.mark.root

CONTAINERS = 16     # as many as test_snapshotter_load starts at once


class HeldDaemonAPI(StandInDaemonAPI):
    """The daemon API, its mount requests held until `release` is set (then refused:
    what matters here is the wait)."""

    def __init__(self, path: str) -> None:
        self.release = threading.Event()
        self.mounts = 0
        super().__init__(path)

    def answer(self, path: str, body: dict) -> tuple[int, dict]:
        if path == "/api/v1/mounts":
            self.mounts += 1
            self.release.wait(HANG)
        return super().answer(path, body)

    def close(self) -> None:
        self.release.set()
        super().close()


def test_containers_waiting_for_a_slow_mount_leave_other_calls_answered(tmp_path):
    """16 containers of one image start while its lazy mount waits for the registry:
    the first asks the daemon, the others wait for that mount under the image's lock.
    Each holds a gRPC server thread meanwhile; with the 8 threads the server had,
    every other call (a Stat, another image's unpack, containerd's GC) waited for that
    registry too, up to the daemon client's 300 s. They must all get to the lock and a
    Stat must still be answered."""
    sockdir = short_tmpdir("snapslow-")
    api = HeldDaemonAPI(os.path.join(sockdir, "daemon.sock"))
    svc = serve(os.path.join(sockdir, "s.sock"), str(tmp_path / "root"),
                daemon_api=os.path.join(sockdir, "daemon.sock"))
    c = Client(svc.socket_path)
    threads: list[threading.Thread] = []
    errors: list[grpc.StatusCode] = []
    try:
        blob_then_bootstrap(c, tmp_path)
        c.commit("boot-c", "boot")
        boot_id = svc.snapshotter.store.get("boot-c").id

        def start(i: int) -> None:
            try:
                c.prepare(f"ctr-{i}", "boot-c")
            except grpc.RpcError as e:
                errors.append(e.code())

        threads = [threading.Thread(target=start, args=(i,)) for i in range(CONTAINERS)]
        for t in threads:
            t.start()
        wait_for(lambda: api.mounts == 1, HANG, "the first container's mount request")
        locks = svc.snapshotter._lazy_locks

        def waiting() -> int:
            with locks._guard:
                entry = locks._locks.get(boot_id)
                return entry[1] if entry else 0
        # every container's Prepare got a thread and waits for the image's one mount
        wait_for(lambda: waiting() == CONTAINERS, HANG, "every Prepare at the lock")
        info = c.stub.Stat(pb.StatSnapshotRequest(key="boot-c"), timeout=60)
        assert info.info.name == "boot-c"
        assert api.mounts == 1
    finally:
        api.release.set()
        for t in threads:
            t.join(HANG)
        c.channel.close()
        svc.stop()
        api.close()
        shutil.rmtree(sockdir)
    # refused by the stand-in: each Prepare failed and left nothing registered
    assert errors == [grpc.StatusCode.UNAVAILABLE] * CONTAINERS
