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
import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from fscache_daemon.errors import (
    DaemonError,
    SnapshotError,
    SnapshotExistsError,
    SnapshotInvalidError,
    SnapshotNotFoundError,
    SnapshotPreconditionError,
    SnapshotUnavailableError,
)
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


class SnapshotsServicer(snapshots_pb2_grpc.SnapshotsServicer):
    """The ten calls of containerd.services.snapshots.v1.Snapshots."""

    def __init__(self, sn: Snapshotter) -> None:
        self.sn = sn

    def Prepare(self, request: Any, context: grpc.ServicerContext) -> Any:
        ms = _call(context, f"prepare {request.key}",
                   lambda: self.sn.prepare(request.key, request.parent, dict(request.labels)))
        return snapshots_pb2.PrepareSnapshotResponse(mounts=_mounts(ms))

    def View(self, request: Any, context: grpc.ServicerContext) -> Any:
        ms = _call(context, f"view {request.key}",
                   lambda: self.sn.view(request.key, request.parent, dict(request.labels)))
        return snapshots_pb2.ViewSnapshotResponse(mounts=_mounts(ms))

    def Mounts(self, request: Any, context: grpc.ServicerContext) -> Any:
        ms = _call(context, f"mounts {request.key}", lambda: self.sn.mounts(request.key))
        return snapshots_pb2.MountsResponse(mounts=_mounts(ms))

    def Commit(self, request: Any, context: grpc.ServicerContext) -> Any:
        _call(context, f"commit {request.key}",
              lambda: self.sn.commit(request.name, request.key, dict(request.labels)))
        return empty_pb2.Empty()

    def Remove(self, request: Any, context: grpc.ServicerContext) -> Any:
        _call(context, f"remove {request.key}", lambda: self.sn.remove(request.key))
        return empty_pb2.Empty()

    def Stat(self, request: Any, context: grpc.ServicerContext) -> Any:
        info = _call(context, f"stat {request.key}", lambda: self.sn.stat(request.key))
        return snapshots_pb2.StatSnapshotResponse(info=_info(info))

    def Update(self, request: Any, context: grpc.ServicerContext) -> Any:
        info = _call(context, f"update {request.info.name}",
                     lambda: self.sn.update(request.info.name, dict(request.info.labels),
                                            list(request.update_mask.paths)))
        return snapshots_pb2.UpdateSnapshotResponse(info=_info(info))

    def List(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        infos = _call(context, "walk", lambda: self.sn.walk(list(request.filters)))
        for i in range(0, len(infos), WALK_BATCH):
            yield snapshots_pb2.ListSnapshotsResponse(
                info=[_info(x) for x in infos[i:i + WALK_BATCH]])

    def Usage(self, request: Any, context: grpc.ServicerContext) -> Any:
        size, inodes = _call(context, f"usage {request.key}",
                             lambda: self.sn.usage(request.key))
        return snapshots_pb2.UsageResponse(size=size, inodes=inodes)

    def Cleanup(self, request: Any, context: grpc.ServicerContext) -> Any:
        _call(context, "cleanup", self.sn.cleanup)
        return empty_pb2.Empty()


def _claim_socket(path: str) -> None:
    """Refuse a socket path another server answers on; remove a stale one."""
    if not os.path.lexists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: left by a killed process
        return
    finally:
        probe.close()
    raise DaemonError(f"{path}: another snapshotter is listening there")


class SnapshotService:
    """A running snapshots service: its gRPC server and snapshotter."""

    def __init__(self, server: grpc.Server, sn: Snapshotter, socket_path: str) -> None:
        self.server = server
        self.snapshotter = sn
        self.socket_path = socket_path

    def wait(self) -> None:
        self.server.wait_for_termination()

    def stop(self, grace: float | None = 2.0) -> None:
        self.server.stop(grace).wait()
        self.snapshotter.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)


def serve(socket_path: str, root: str, workers: int = 8, daemon_api: str | None = None,
          insecure_registries: tuple[str, ...] = ()) -> SnapshotService:
    """Start the snapshots service for snapshots under `root` on unix socket
    `socket_path` (mode 0600: only its owner, root, may connect). `daemon_api`: the
    daemon's API socket, for Nydus layers (lazy mounts); `insecure_registries`: hosts
    whose blobs the daemon fetches over plain HTTP."""
    socket_path = os.path.abspath(socket_path)
    parent = os.path.dirname(socket_path)
    os.makedirs(parent, mode=0o700, exist_ok=True)
    _claim_socket(socket_path)
    sn = Snapshotter(root, daemon_api, tuple(insecure_registries))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers,
                                                    thread_name_prefix="snapshots"))
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(SnapshotsServicer(sn), server)
    # bound inside a private 0700 directory, made 0600, then renamed into place: the
    # socket is never reachable by anyone else, not even for an instant
    private = tempfile.mkdtemp(prefix=".snapshotter-", dir=parent)
    try:
        tmp_sock = os.path.join(private, "s")
        if server.add_insecure_port(f"unix:{tmp_sock}") == 0:
            raise DaemonError(f"{socket_path}: cannot listen")
        server.start()
        os.chmod(tmp_sock, 0o600)
        os.rename(tmp_sock, socket_path)
    except BaseException:
        server.stop(None)
        sn.close()
        raise
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(private)
    log.info("snapshots service on %s, root %s", socket_path, sn.layout.root)
    return SnapshotService(server, sn, socket_path)
