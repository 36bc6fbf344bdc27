"""A gRPC server listening on a unix socket only root can reach (the snapshots service
and the CRI image-service proxy)."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile

import grpc

from fscache_daemon.errors import DaemonError


def claim_socket(path: str, what: str) -> None:
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
    raise DaemonError(f"{path}: another {what} is listening there")


def listen_private(server: grpc.Server, socket_path: str, what: str) -> None:
    """Start `server` on `socket_path` (absolute) with mode 0600. It is bound inside a
    private 0700 directory, made 0600, then renamed into place: the socket is never
    reachable by anyone else, not even for an instant."""
    parent = os.path.dirname(socket_path)
    os.makedirs(parent, mode=0o700, exist_ok=True)
    claim_socket(socket_path, what)
    private = tempfile.mkdtemp(prefix=".grpc-", dir=parent)
    try:
        tmp_sock = os.path.join(private, "s")
        if server.add_insecure_port(f"unix:{tmp_sock}") == 0:
            raise DaemonError(f"{socket_path}: cannot listen")
        server.start()
        os.chmod(tmp_sock, 0o600)
        os.rename(tmp_sock, socket_path)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(private)
