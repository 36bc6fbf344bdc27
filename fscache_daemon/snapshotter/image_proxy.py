"""The Kubernetes CRI image service, proxied to containerd, to learn kubelet's pull secrets.

kubelet sends an image pull secret only in the CRI PullImage request, to containerd;
containerd uses it for its own pulls and passes it to no snapshotter, so the daemon's
lazy reads of that image's blobs would have no credentials. With
`fscache-daemon run --image-service-socket PATH --cri-address CONTAINERD_SOCK`, kubelet
is pointed at PATH (`--image-service-endpoint unix://PATH`; its runtime endpoint stays
containerd's): every runtime.v1 (and v1alpha2) ImageService call is forwarded to
containerd byte for byte, with its metadata and deadline, and its answer or status comes
back the same way. Before a PullImage is forwarded, its `auth` is recorded in the
daemon's keychain (storage/keychain.py) under the image's registry host and repository,
so the blob reads of exactly that image's registry get it (nydus-snapshotter calls the
same idea its CRI keychain).
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from collections.abc import Callable
from concurrent import futures

import grpc
from google.protobuf.message import DecodeError

from erofs_tools.errors import ErofsToolsError
from erofs_tools.registry.auth import Credentials, decode_basic_auth
from erofs_tools.registry.reference import DOCKER_HUB, DOCKER_HUB_API, parse_registry_reference
from fscache_daemon.snapshotter.grpcsock import listen_private
from fscache_daemon.snapshotter.proto import cri_image_pb2
from fscache_daemon.storage.keychain import Keychain

log = logging.getLogger(__name__)

SERVICES = ("/runtime.v1.ImageService/", "/runtime.v1alpha2.ImageService/")
PULL = "PullImage"
# what kubelet's docker-config keyring names Docker Hub by
_HUB_ADDRESSES = ("index.docker.io", DOCKER_HUB, DOCKER_HUB_API)


def _identity(b: bytes) -> bytes:
    return b


def pull_credentials(request: bytes) -> tuple[str, str, Credentials | None] | None:
    """(registry host, repository, credentials or None) of a PullImageRequest, None if it
    names no registry image. Credentials as containerd's CRI plugin reads them: username
    and password, else identity token, else `auth` (base64 of user:password); a
    `server_address` that is not the image's registry means none (containerd does not
    use them either)."""
    msg = cri_image_pb2.PullImageRequest()
    try:
        msg.ParseFromString(request)
    except DecodeError:
        return None
    try:
        ref = parse_registry_reference(msg.image.image)
    except ErofsToolsError:
        return None
    auth = msg.auth
    creds: Credentials | None = None
    if auth.username:
        creds = Credentials(auth.username, auth.password)
    elif auth.identity_token:
        creds = Credentials("<token>", "", auth.identity_token)
    elif auth.auth:
        pair = decode_basic_auth(auth.auth)
        if pair is not None:
            creds = Credentials(*pair)
    if creds is not None and auth.server_address and \
            not _same_registry(auth.server_address, ref.host):
        creds = None
    return ref.api_host, ref.repository, creds


def _same_registry(server_address: str, host: str) -> bool:
    netloc = urllib.parse.urlsplit(server_address if "://" in server_address
                                   else "//" + server_address).netloc.lower()
    if host == DOCKER_HUB:
        return netloc in _HUB_ADDRESSES
    return netloc == host.lower()


class _Forwarder(grpc.GenericRpcHandler):
    def __init__(self, channel: grpc.Channel, on_pull: Callable[[bytes], None]) -> None:
        self.channel = channel
        self.on_pull = on_pull

    def service(self, details):
        method = details.method
        if not method.startswith(SERVICES):
            return None                     # UNIMPLEMENTED: only the image service
        call = self.channel.unary_unary(method, request_serializer=_identity,
                                        response_deserializer=_identity)
        pull = method.rsplit("/", 1)[1] == PULL

        def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
            if pull:
                self.on_pull(request)
            remaining = context.time_remaining()
            try:
                return call(request, timeout=remaining,
                            metadata=tuple(context.invocation_metadata()))
            except grpc.RpcError as e:
                context.abort(e.code(), e.details() or "")
                raise                        # not reached: abort raises
        return grpc.unary_unary_rpc_method_handler(
            forward, request_deserializer=_identity, response_serializer=_identity)


class ImageServiceProxy:
    """A running proxy: its gRPC server, the channel to containerd, the keychain."""

    def __init__(self, server: grpc.Server, channel: grpc.Channel, socket_path: str,
                 keychain: Keychain) -> None:
        self.server, self.channel = server, channel
        self.socket_path, self.keychain = socket_path, keychain
        self.pulls = 0

    def record(self, request: bytes) -> None:
        self.pulls += 1
        found = pull_credentials(request)
        if found is None:
            return
        host, repository, creds = found
        # a pull without a secret forgets nothing: another pod's pull of the same image
        # gave one, and the blobs it opens to are the same
        if creds is not None:
            log.info("pull secret of %s/%s kept for its blob reads", host, repository)
            self.keychain.put(host, repository, creds)

    def stop(self, grace: float | None = 2.0) -> None:
        self.server.stop(grace).wait()
        self.channel.close()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass


# Threads for calls in progress, made as calls need them. A forwarded PullImage holds
# one for as long as containerd pulls (minutes for a large image); kubelet without
# serialized pulls sends one per image at once: with 8, eight slow pulls held up its
# ImageStatus, ListImages and ImageFsInfo calls until a pull ended.
WORKERS = 128


def serve_image_proxy(socket_path: str, cri_address: str, keychain: Keychain,
                      workers: int = WORKERS) -> ImageServiceProxy:
    """Forward the CRI image service on `socket_path` (mode 0600) to containerd's
    socket `cri_address`, recording pull secrets in `keychain`."""
    socket_path = os.path.abspath(socket_path)
    channel = grpc.insecure_channel(f"unix:{os.path.abspath(cri_address)}")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers,
                                                    thread_name_prefix="image-proxy"))
    proxy = ImageServiceProxy(server, channel, socket_path, keychain)
    server.add_generic_rpc_handlers((_Forwarder(channel, proxy.record),))
    try:
        listen_private(server, socket_path, "image service")
    except BaseException:
        server.stop(None)
        channel.close()
        raise
    log.info("CRI image service on %s, forwarded to %s", socket_path, cri_address)
    return proxy
