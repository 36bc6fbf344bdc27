"""containerd's snapshots service over gRPC on a unix socket (a containerd proxy plugin).

`serve(socket_path, root)` starts it and returns a `SnapshotService` to stop later;
containerd reaches it through its config:

    [proxy_plugins.NAME]
      type = "snapshot"
      address = "SOCKET_PATH"

Errors travel as gRPC status codes that containerd maps back to its errdefs
(NotFound, AlreadyExists, InvalidArgument, FailedPrecondition), with a one-line message.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from fscache_daemon.errors import (
    SnapshotError,
    SnapshotExistsError,
    SnapshotInvalidError,
    SnapshotNotFoundError,
    SnapshotPreconditionError,
    SnapshotUnavailableError,
)
from fscache_daemon.snapshotter.callstats import CallStats
from fscache_daemon.snapshotter.grpcsock import claim_socket, listen_private
from fscache_daemon.snapshotter.overlay import Mount
from fscache_daemon.snapshotter.proto import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from fscache_daemon.snapshotter.snapshots import Snapshotter
from fscache_daemon.snapshotter.store import Info

log = logging.getLogger(__name__)

_CODES: dict[type[SnapshotError], grpc.StatusCode] = {
    SnapshotNotFoundError: grpc.StatusCode.NOT_FOUND,
    SnapshotExistsError: grpc.StatusCode.ALREADY_EXISTS,
    SnapshotInvalidError: grpc.StatusCode.INVALID_ARGUMENT,
    SnapshotPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    SnapshotUnavailableError: grpc.StatusCode.UNAVAILABLE,
}
WALK_BATCH = 100  # infos per streamed List reply, bounding one message's size

T = TypeVar("T")


def _call(context: grpc.ServicerContext, what: str, fn: Callable[[], T]) -> T:
    """Run one request; map a snapshot error to its status code, anything else to
    INTERNAL with the cause on one line (and a traceback in the log)."""
    try:
        return fn()
    except SnapshotError as e:
        context.abort(_CODES.get(type(e), grpc.StatusCode.UNKNOWN), str(e))
    except Exception as e:
        log.exception("%s failed", what)
        context.abort(grpc.StatusCode.INTERNAL, f"{what}: {type(e).__name__}: {e}")
    raise AssertionError("unreachable: abort raises")


def _mounts(ms: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options))
            for m in ms]


def _ts(ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def _info(i: Info) -> snapshots_pb2.Info:
    return snapshots_pb2.Info(name=i.name, parent=i.parent,
                              kind=i.kind.name,  # the enum names match the proto's
                              created_at=_ts(i.created_ns), updated_at=_ts(i.updated_ns),
                              labels=i.labels)


def _timed(method: Callable[..., Any]) -> Callable[..., Any]:
    """Record how long one unary call took, failed or not (CallStats)."""
    @functools.wraps(method)
    def run(self: SnapshotsServicer, request: Any, context: grpc.ServicerContext) -> Any:
        t0, failed = time.perf_counter(), True
        try:
            out = method(self, request, context)
            failed = False
            return out
        finally:
            self.stats.record(method.__name__, time.perf_counter() - t0, failed)
    return run


class SnapshotsServicer(snapshots_pb2_grpc.SnapshotsServicer):
    """The ten calls of containerd.services.snapshots.v1.Snapshots."""

    def __init__(self, sn: Snapshotter, stats: CallStats | None = None) -> None:
        self.sn = sn
        self.stats = stats or CallStats()

    @_timed
    def Prepare(self, request: Any, context: grpc.ServicerContext) -> Any:
        ms = _call(context, f"prepare {request.key}",
                   lambda: self.sn.prepare(request.key, request.parent, dict(request.labels)))
        return snapshots_pb2.PrepareSnapshotResponse(mounts=_mounts(ms))

    @_timed
    def View(self, request: Any, context: grpc.ServicerContext) -> Any:
        ms = _call(context, f"view {request.key}",
                   lambda: self.sn.view(request.key, request.parent, dict(request.labels)))
        return snapshots_pb2.ViewSnapshotResponse(mounts=_mounts(ms))

    @_timed
    def Mounts(self, request: Any, context: grpc.ServicerContext) -> Any:
        ms = _call(context, f"mounts {request.key}", lambda: self.sn.mounts(request.key))
        return snapshots_pb2.MountsResponse(mounts=_mounts(ms))

    @_timed
    def Commit(self, request: Any, context: grpc.ServicerContext) -> Any:
        _call(context, f"commit {request.key}",
              lambda: self.sn.commit(request.name, request.key, dict(request.labels)))
        return empty_pb2.Empty()

    @_timed
    def Remove(self, request: Any, context: grpc.ServicerContext) -> Any:
        _call(context, f"remove {request.key}", lambda: self.sn.remove(request.key))
        return empty_pb2.Empty()

    @_timed
    def Stat(self, request: Any, context: grpc.ServicerContext) -> Any:
        info = _call(context, f"stat {request.key}", lambda: self.sn.stat(request.key))
        return snapshots_pb2.StatSnapshotResponse(info=_info(info))

    @_timed
    def Update(self, request: Any, context: grpc.ServicerContext) -> Any:
        info = _call(context, f"update {request.info.name}",
                     lambda: self.sn.update(request.info.name, dict(request.info.labels),
                                            list(request.update_mask.paths)))
        return snapshots_pb2.UpdateSnapshotResponse(info=_info(info))

    def List(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        t0, failed = time.perf_counter(), True
        try:    # a stream: timed until its last batch is handed to gRPC
            infos = _call(context, "walk", lambda: self.sn.walk(list(request.filters)))
            for i in range(0, len(infos), WALK_BATCH):
                yield snapshots_pb2.ListSnapshotsResponse(
                    info=[_info(x) for x in infos[i:i + WALK_BATCH]])
            failed = False
        finally:
            self.stats.record("List", time.perf_counter() - t0, failed)

    @_timed
    def Usage(self, request: Any, context: grpc.ServicerContext) -> Any:
        size, inodes = _call(context, f"usage {request.key}",
                             lambda: self.sn.usage(request.key))
        return snapshots_pb2.UsageResponse(size=size, inodes=inodes)

    @_timed
    def Cleanup(self, request: Any, context: grpc.ServicerContext) -> Any:
        _call(context, "cleanup", self.sn.cleanup)
        return empty_pb2.Empty()


class SnapshotService:
    """A running snapshots service: its gRPC server and snapshotter."""

    def __init__(self, server: grpc.Server, sn: Snapshotter, socket_path: str,
                 stats: CallStats | None = None) -> None:
        self.server = server
        self.snapshotter = sn
        self.socket_path = socket_path
        self.stats = stats or CallStats()

    def metrics(self) -> dict:
        """Per-call latency (see callstats.py), for the daemon's metrics."""
        return {"socket": self.socket_path, "calls": self.stats.snapshot()}

    def wait(self) -> None:
        self.server.wait_for_termination()

    def stop(self, grace: float | None = 2.0) -> None:
        self.server.stop(grace).wait()
        self.snapshotter.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)


# Threads for calls in progress, made as calls need them (ThreadPoolExecutor). A
# container's Prepare holds one while its image's lazy mount is made or waited for
# (seconds to minutes on a slow registry, the daemon client's 300 s at most): with 8,
# eight containers of one such image left every other call (another image's unpack,
# Stat, containerd's GC) waiting on that registry. Enough for a node's pods starting at
# once (kubelet's default limit: 110 pods).
WORKERS = 128


def serve(socket_path: str, root: str, workers: int = WORKERS, daemon_api: str | None = None,
          insecure_registries: tuple[str, ...] = (),
          containerd_address: str | None = None) -> SnapshotService:
    """Start the snapshots service for snapshots under `root` on unix socket
    `socket_path` (mode 0600: only its owner, root, may connect). `daemon_api`: the
    daemon's API socket, for Nydus layers (lazy mounts); `insecure_registries`: hosts
    whose blobs the daemon fetches over plain HTTP; `containerd_address`: containerd's
    socket, asked which images stand on a Nydus image's chain when it is mounted."""
    socket_path = os.path.abspath(socket_path)
    os.makedirs(os.path.dirname(socket_path), mode=0o700, exist_ok=True)
    claim_socket(socket_path, "snapshotter")     # before the store opens its database
    sn = Snapshotter(root, daemon_api, tuple(insecure_registries), containerd_address)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers,
                                                    thread_name_prefix="snapshots"))
    stats = CallStats()
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(SnapshotsServicer(sn, stats), server)
    try:
        listen_private(server, socket_path, "snapshotter")
    except BaseException:
        server.stop(None)
        sn.close()
        raise
    log.info("snapshots service on %s, root %s", socket_path, sn.layout.root)
    return SnapshotService(server, sn, socket_path, stats)
