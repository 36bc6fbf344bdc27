"""Keeps the /dev/cachefiles fd open while the daemon is down, for `restore`.

/dev/cachefiles has a single opener; when its last fd closes the cache goes DEAD and
every mounted EROFS instance fails uncached reads. So the daemon hands a duplicate of its
device fd to this small process (inherited at spawn) and a restarted daemon fetches it
back over a unix socket (SCM_RIGHTS) and writes `restore` (Linux 6.8+ and backports).

Protocol on the socket (root-only, one request per connection, one line each):
    "get\\n"      -> one byte b"F" carrying the device fd
    "release\\n"  -> b"K", then the holder closes the fd and exits (cache unbinds)
    "ping\\n"     -> b"P"

Run: python -m fscache_daemon.frontend.cachefiles_holder SOCKET_PATH FD
It has no dependencies beyond the standard library and logs to stderr.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import sys

log = logging.getLogger("fscache_daemon.cachefiles_holder")


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def serve(sock_path: str, devfd: int) -> int:
    os.set_inheritable(devfd, False)
    try:
        os.unlink(sock_path)
    except FileNotFoundError:
        pass
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    # bound and listening under a temporary name, then renamed into place: the path
    # appears only once connecting to it works (a client that saw it between bind and
    # listen was refused: a loaded machine widened that window enough to hit it)
    tmp = os.path.join(os.path.dirname(os.path.abspath(sock_path)), f".h{os.getpid()}")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    old = os.umask(0o077)
    try:
        srv.bind(tmp)
    finally:
        os.umask(old)
    os.chmod(tmp, 0o600)
    srv.listen(8)
    os.rename(tmp, sock_path)
    log.info("holding /dev/cachefiles fd %d on %s (pid %d)", devfd, sock_path, os.getpid())
    while True:
        conn, _ = srv.accept()
        with conn:
            try:
                conn.settimeout(5)
                if _peer_uid(conn) not in (0, os.getuid()):
                    log.warning("refusing holder client with uid %d", _peer_uid(conn))
                    continue
                req = conn.recv(64).strip()
                if req == b"get":
                    socket.send_fds(conn, [b"F"], [devfd])
                elif req == b"ping":
                    conn.sendall(b"P")
                elif req == b"release":
                    conn.sendall(b"K")
                    break
                else:
                    log.warning("unknown holder request %r", req[:20])
            except OSError as e:
                log.warning("holder client failed: %s", e)
    srv.close()
    try:
        os.unlink(sock_path)
    except FileNotFoundError:
        pass
    os.close(devfd)
    log.info("released /dev/cachefiles fd")
    return 0


def _request(sock_path: str, req: bytes, timeout: float = 5.0):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(sock_path)
        s.sendall(req + b"\n")
        if req == b"get":
            msg, fds, _flags, _addr = socket.recv_fds(s, 16, 1)
            if msg != b"F" or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise OSError(f"cachefiles holder {sock_path} sent no fd")
            os.set_inheritable(fds[0], False)
            return fds[0]
        return s.recv(16)
    finally:
        s.close()


def fetch_fd(sock_path: str) -> int | None:
    """The held device fd, or None when no holder answers on sock_path."""
    try:
        return _request(sock_path, b"get")
    except (FileNotFoundError, ConnectionRefusedError):
        return None


def release(sock_path: str) -> bool:
    try:
        return _request(sock_path, b"release") == b"K"
    except (FileNotFoundError, ConnectionRefusedError):
        return False


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        sys.stderr.write("usage: cachefiles_holder SOCKET_PATH FD\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="cachefiles-holder: %(message)s")
    # A daemon's SIGINT/SIGTERM (same terminal, same group) must not take the fd away.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return serve(argv[0], int(argv[1]))


if __name__ == "__main__":
    sys.exit(main())
