"""The CRI image-service proxy while pulls are slow: kubelet (with
`--serialize-image-pulls=false`, no `--max-parallel-image-pulls`) sends a PullImage per
image at once, each forwarded to containerd for as long as the pull takes (minutes for a
large image), while it keeps asking ImageStatus, ListImages and ImageFsInfo (its image
GC, the eviction manager). A stand-in for containerd's image service holds every pull."""

from __future__ import annotations

import os
import shutil
import threading
from concurrent import futures

import grpc
from containerd_fixtures import short_tmpdir, wait_for
from helpers import HANG

from fscache_daemon.snapshotter.image_proxy import serve_image_proxy
from fscache_daemon.snapshotter.proto import cri_image_pb2
from fscache_daemon.storage.keychain import Keychain

PULLS = 16
SERVICE = "/runtime.v1.ImageService/"


class HeldImageService(grpc.GenericRpcHandler):
    """containerd's CRI image service: PullImage held until `release`, anything else
    answered at once (an empty message)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.pulls = 0
        self._lock = threading.Lock()

    def service(self, details):
        def answer(request: bytes, context) -> bytes:
            if details.method.endswith("/PullImage"):
                with self._lock:
                    self.pulls += 1
                self.release.wait(HANG)
            return b""
        return grpc.unary_unary_rpc_method_handler(
            answer, request_deserializer=lambda b: b, response_serializer=lambda b: b)


def test_slow_pulls_leave_image_status_answered(tmp_path):
    """16 pulls in progress at once: every one reaches containerd, and an ImageStatus
    is still answered. With the proxy's 8 threads, 8 slow pulls held up every other
    image-service call (kubelet's status checks timing out) until a pull ended."""
    sockdir = short_tmpdir("imgproxy-")
    upstream_sock = os.path.join(sockdir, "containerd.sock")
    held = HeldImageService()
    upstream = grpc.server(futures.ThreadPoolExecutor(max_workers=PULLS + 4))
    upstream.add_generic_rpc_handlers((held,))
    upstream.add_insecure_port(f"unix:{upstream_sock}")
    upstream.start()
    proxy = serve_image_proxy(os.path.join(sockdir, "image.sock"), upstream_sock,
                              Keychain(str(tmp_path)))
    channel = grpc.insecure_channel(f"unix:{proxy.socket_path}")
    raw = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    pull = channel.unary_unary(SERVICE + "PullImage", **raw)
    status = channel.unary_unary(SERVICE + "ImageStatus", **raw)
    threads: list[threading.Thread] = []
    try:
        def one(i: int) -> None:
            req = cri_image_pb2.PullImageRequest(
                image=cri_image_pb2.ImageSpec(image=f"registry.test/app{i}:1"))
            pull(req.SerializeToString(), timeout=HANG)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(PULLS)]
        for t in threads:
            t.start()
        wait_for(lambda: held.pulls == PULLS, HANG, "every pull forwarded to containerd")
        assert status(b"", timeout=60) == b""
    finally:
        held.release.set()
        for t in threads:
            t.join(HANG)
        channel.close()
        proxy.stop()
        upstream.stop(None).wait()
        shutil.rmtree(sockdir)
    assert proxy.pulls == PULLS
