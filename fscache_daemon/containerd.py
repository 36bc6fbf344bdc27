"""containerd's gRPC API as a client, for `fscache-daemon rpull`: the content store,
images, leases, the diff service and containerd's own snapshots service (which reaches a
proxy snapshotter through containerd's metadata layer, so containerd records what the
snapshotter creates).

Every call carries the namespace (`containerd-namespace` metadata) and, inside
`with client.lease():`, the lease (`containerd-lease`) that keeps what the calls create
from containerd's garbage collector until something else refers to it. Errors become one
`ContainerdError` line naming the call and containerd's answer.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, TypeVar

import grpc
from google.protobuf import field_mask_pb2

from fscache_daemon.errors import ContainerdError
from fscache_daemon.snapshotter.proto import (
    content_pb2,
    content_pb2_grpc,
    descriptor_pb2,
    diff_pb2,
    diff_pb2_grpc,
    images_pb2,
    images_pb2_grpc,
    leases_pb2,
    leases_pb2_grpc,
    snapshots_pb2,
    snapshots_pb2_grpc,
)

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
DEFAULT_NAMESPACE = "default"
# what containerd's own clients send: a lease that outlives a killed client expires
LEASE_EXPIRE_LABEL = "containerd.io/gc.expire"
LEASE_TTL = datetime.timedelta(hours=1)
WRITE_PIECE = 1 << 20
# bytes/s below which a content write or a layer apply is taken for stuck (on top of
# the per-call timeout): large plain layers must not time out on a slow disk
SLOW_DISK = 4 << 20
T = TypeVar("T")


def _code(e: grpc.RpcError) -> str:
    code = e.code() if hasattr(e, "code") else None
    return code.name if code is not None else "UNKNOWN"


def _details(e: grpc.RpcError) -> str:
    d = e.details() if hasattr(e, "details") else None
    return " ".join(str(d or e).split())


class ContainerdClient:
    """One connection to containerd's socket, in one namespace."""

    def __init__(self, address: str = DEFAULT_ADDRESS, namespace: str = DEFAULT_NAMESPACE,
                 timeout: float = 300.0, connect_timeout: float = 10.0) -> None:
        self.address = address
        self.namespace = namespace
        self.timeout = timeout
        self._lease: str | None = None
        _probe(address)
        self.channel = grpc.insecure_channel(
            f"unix:{os.path.abspath(address)}",
            options=[("grpc.max_receive_message_length", 16 << 20),
                     ("grpc.max_send_message_length", 16 << 20)])
        try:
            grpc.channel_ready_future(self.channel).result(timeout=connect_timeout)
        except grpc.FutureTimeoutError:
            self.channel.close()
            raise ContainerdError(f"containerd at {address}: no answer within "
                                  f"{connect_timeout:.0f}s") from None
        self.content = content_pb2_grpc.ContentStub(self.channel)
        self.images = images_pb2_grpc.ImagesStub(self.channel)
        self.leases = leases_pb2_grpc.LeasesStub(self.channel)
        self.diff = diff_pb2_grpc.DiffStub(self.channel)
        self.snapshots = snapshots_pb2_grpc.SnapshotsStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ContainerdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------

    def _metadata(self) -> list[tuple[str, str]]:
        md = [("containerd-namespace", self.namespace)]
        if self._lease is not None:
            md.append(("containerd-lease", self._lease))
        return md

    def call(self, what: str, fn: Callable[..., T], request: Any,
             timeout: float | None = None) -> T:
        """fn(request) with our metadata; a gRPC error becomes one ContainerdError line."""
        try:
            return fn(request, metadata=self._metadata(), timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise ContainerdError(f"containerd {what}: {_details(e)}", _code(e)) from None

    @contextlib.contextmanager
    def lease(self) -> Iterator[str]:
        """A lease for the calls inside. It is deleted on the way out; after an error
        synchronously, so that the garbage collection it triggers has removed what the
        failed calls left (snapshots, content) before we return."""
        lease_id = f"fscache-rpull-{secrets.token_hex(8)}"
        expire = datetime.datetime.now(datetime.UTC) + LEASE_TTL
        self.call("create lease", self.leases.Create, leases_pb2.CreateRequest(
            id=lease_id, labels={LEASE_EXPIRE_LABEL: expire.strftime("%Y-%m-%dT%H:%M:%SZ")}))
        self._lease = lease_id
        ok = False
        try:
            yield lease_id
            ok = True
        finally:
            self._lease = None
            try:
                self.call(f"delete lease {lease_id}", self.leases.Delete,
                          leases_pb2.DeleteRequest(id=lease_id, sync=not ok))
            except ContainerdError as e:
                if ok:
                    raise
                log.warning("%s (it expires in %s)", e, LEASE_TTL)

    # -- content ----------------------------------------------------------------------

    def content_info(self, digest: str) -> dict[str, str] | None:
        """The labels of content `digest`, or None if the store lacks it."""
        try:
            res = self.call(f"content info {digest}", self.content.Info,
                            content_pb2.InfoRequest(digest=digest))
        except ContainerdError as e:
            if e.code == "NOT_FOUND":
                return None
            raise
        return dict(res.info.labels)

    def write_content(self, digest: str, size: int, source: BinaryIO | bytes,
                      labels: dict[str, str]) -> bool:
        """Write a blob into the content store, verified there against `digest` and
        `size`, with `labels`; -> False if the store had it already (then only `labels`
        are set on it). Under a lease the content joins the lease either way."""
        ref = f"fscache-rpull-{digest}"

        def requests() -> Iterator[Any]:
            if not isinstance(source, bytes):
                source.seek(0)   # again from the start after waiting for a lock
            # the first message names the writer and what must come out of it; offset 0
            # makes containerd drop what an interrupted earlier write left under `ref`
            yield content_pb2.WriteContentRequest(
                action=content_pb2.WRITE, ref=ref, total=size, expected=digest, offset=0)
            off = 0
            while off < size:
                if isinstance(source, bytes):
                    piece = source[off:off + WRITE_PIECE]
                else:
                    piece = source.read(min(WRITE_PIECE, size - off))
                if not piece:
                    break  # short source: containerd's commit refuses the size
                yield content_pb2.WriteContentRequest(
                    action=content_pb2.WRITE, ref=ref, offset=off, data=piece)
                off += len(piece)
            yield content_pb2.WriteContentRequest(
                action=content_pb2.COMMIT, ref=ref, total=size, expected=digest,
                offset=off, labels=labels)

        if self._write(digest, requests, self.timeout + size / SLOW_DISK):
            return True
        self.set_content_labels(digest, labels)
        return False

    def lease_existing(self, digest: str, size: int) -> bool:
        """Put content `digest` that the store has into our lease (containerd does that
        when a writer is opened for content it has, and answers AlreadyExists);
        -> False if the store no longer has it."""
        req = content_pb2.WriteContentRequest(
            action=content_pb2.STAT, ref=f"fscache-rpull-{digest}", total=size,
            expected=digest)
        return not self._write(digest, lambda: iter([req]), self.timeout)

    def _write(self, digest: str, requests: Callable[[], Iterator[Any]],
               timeout: float) -> bool:
        """One Write stream; -> True if it ran through, False if containerd has the
        content (AlreadyExists). While another writer (a concurrent pull) holds the
        ref, containerd answers Unavailable: wait and try again, as its own clients do;
        once that writer committed, the answer is AlreadyExists."""
        deadline = time.monotonic() + timeout
        pause = 0.02
        while True:
            try:
                for _ in self.content.Write(requests(), metadata=self._metadata(),
                                            timeout=timeout):
                    pass
                return True
            except grpc.RpcError as e:
                code = _code(e)
                if code == "ALREADY_EXISTS":
                    return False
                if code != "UNAVAILABLE" or "locked" not in _details(e) or \
                        time.monotonic() + pause > deadline:
                    raise ContainerdError(f"containerd write {digest}: {_details(e)}",
                                          code) from None
            time.sleep(pause)
            pause = min(pause * 2, 1.0)

    def set_content_labels(self, digest: str, labels: dict[str, str]) -> None:
        """Set (only) these labels on existing content."""
        if not labels:
            return
        self.call(f"update labels of {digest}", self.content.Update,
                  content_pb2.UpdateRequest(
                      info=content_pb2.Info(digest=digest, labels=labels),
                      update_mask=field_mask_pb2.FieldMask(
                          paths=[f"labels.{k}" for k in labels])))

    # -- snapshots (containerd's service, for snapshotter `name`) ----------------------

    def prepare(self, snapshotter: str, key: str, parent: str,
                labels: dict[str, str]) -> list[Any]:
        res = self.call(f"prepare snapshot {key!r} ({snapshotter})", self.snapshots.Prepare,
                        snapshots_pb2.PrepareSnapshotRequest(
                            snapshotter=snapshotter, key=key, parent=parent, labels=labels))
        return list(res.mounts)

    def commit(self, snapshotter: str, name: str, key: str, labels: dict[str, str]) -> None:
        self.call(f"commit snapshot {key!r} ({snapshotter})", self.snapshots.Commit,
                  snapshots_pb2.CommitSnapshotRequest(snapshotter=snapshotter, name=name,
                                                      key=key, labels=labels))

    def lease_snapshot(self, snapshotter: str, key: str) -> None:
        """Put snapshot `key` (there or not: containerd checks nothing) into our lease,
        so that a collection keeps it (and its parents) from now on. A snapshot found
        present is held by whatever else refers to it (another image) only as long as
        that does: containerd's Stat takes no lease."""
        assert self._lease is not None, "lease_snapshot outside lease()"
        self.call(f"lease snapshot {key!r} ({snapshotter})", self.leases.AddResource,
                  leases_pb2.AddResourceRequest(
                      id=self._lease, resource=leases_pb2.Resource(
                          id=key, type=f"snapshots/{snapshotter}")))

    def stat(self, snapshotter: str, key: str) -> bool:
        """Whether snapshot `key` exists."""
        try:
            self.call(f"stat snapshot {key!r} ({snapshotter})", self.snapshots.Stat,
                      snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=key))
        except ContainerdError as e:
            if e.code == "NOT_FOUND":
                return False
            raise
        return True

    def remove(self, snapshotter: str, key: str) -> None:
        self.call(f"remove snapshot {key!r} ({snapshotter})", self.snapshots.Remove,
                  snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key))

    # -- diff, images -----------------------------------------------------------------

    def apply(self, desc: descriptor_pb2.Descriptor, mounts: list[Any]) -> str:
        """Unpack layer `desc` (in the content store) onto `mounts`; -> its diff id."""
        res = self.call(f"apply layer {desc.digest}", self.diff.Apply,
                        diff_pb2.ApplyRequest(diff=desc, mounts=mounts),
                        timeout=self.timeout + desc.size / SLOW_DISK)
        return str(res.applied.digest)

    def put_image(self, name: str, target: descriptor_pb2.Descriptor,
                  labels: dict[str, str] | None = None) -> None:
        """Create image record `name` pointing at `target`, or repoint an existing one."""
        image = images_pb2.Image(name=name, target=target, labels=labels or {})
        try:
            self.call(f"create image {name}", self.images.Create,
                      images_pb2.CreateImageRequest(image=image))
        except ContainerdError as e:
            if e.code != "ALREADY_EXISTS":
                raise
            self.call(f"update image {name}", self.images.Update,
                      images_pb2.UpdateImageRequest(
                          image=image, update_mask=field_mask_pb2.FieldMask(
                              paths=["target"] + [f"labels.{k}" for k in labels or {}])))


def descriptor(media_type: str, digest: str, size: int,
               annotations: dict[str, str] | None = None) -> descriptor_pb2.Descriptor:
    return descriptor_pb2.Descriptor(media_type=media_type, digest=digest, size=size,
                                     annotations=annotations or {})


def _probe(address: str) -> None:
    """A clear error for a path where no containerd listens (gRPC would only retry
    until its deadline)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(address)
    except OSError as e:
        raise ContainerdError(f"containerd at {address}: cannot connect: "
                              f"{e.strerror or e}") from None
    finally:
        s.close()
