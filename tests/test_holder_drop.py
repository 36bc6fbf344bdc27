"""The fd holder drops the daemon's connections (what it does to a daemon it finds hung):
the daemon re-subscribes on its own, gets every still-unanswered event again, re-marks
its cache files, and the readers that waited across the drop read exact bytes.

The drop is real, not simulated: the test takes the holder's own sockets to the daemon
with pidfd_getfd(2) and shuts them down, so both ends see the connection end exactly as
when the holder closes it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import struct
import threading

import helpers
import pytest
from test_daemon_support import DaemonProc, file_sha, pack, require_lazy_kernel, write_tree

pytestmark = pytest.mark.root

SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438
_libc = ctypes.CDLL(None, use_errno=True)


def _syscall(nr: int, *args: int) -> int:
    r = _libc.syscall(nr, *[ctypes.c_long(a) for a in args])
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def _peer_pid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


def drop_connections(holder_pid: int, peer_pid: int) -> int:
    """Shut down every socket the holder has to `peer_pid`; the number shut down."""
    pidfd = _syscall(SYS_PIDFD_OPEN, holder_pid, 0)
    dropped = 0
    try:
        for name in os.listdir(f"/proc/{holder_pid}/fd"):
            try:
                if not os.readlink(f"/proc/{holder_pid}/fd/{name}").startswith("socket:"):
                    continue
                dup = _syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
            except OSError:
                continue            # closed meanwhile
            s = socket.socket(fileno=dup)
            try:
                if s.family == socket.AF_UNIX and _peer_pid(s) == peer_pid:
                    s.shutdown(socket.SHUT_RDWR)   # the description is shared with the holder
                    dropped += 1
            except OSError:
                pass
            finally:
                s.close()
    finally:
        os.close(pidfd)
    return dropped


def test_daemon_resubscribes_after_the_holder_drops_it(tmp_path):
    require_lazy_kernel()
    src = write_tree(str(tmp_path / "src"), seed=41, nfiles=8, big=(2 << 20, 2 << 20))
    boot, blobs = str(tmp_path / "boot"), str(tmp_path / "blobs")
    pack(src, boot, blobs, "--chunk-size", "0x10000")
    d = DaemonProc(str(tmp_path / "d")).start()
    holder_sock = os.path.join(d.cache_dir, "fdholder.sock")
    mnt = str(tmp_path / "mnt")
    try:
        d.mount(boot, mnt, f"localfs:{blobs}")
        assert file_sha(os.path.join(mnt, "small.txt")) == file_sha(os.path.join(src, "small.txt"))
        holder_pid = _holder_pid(holder_sock)

        # readers that wait across the drop: the daemon is stopped, so their events are
        # pending in the holder (a fact we wait on, not a guess)
        os.kill(d.proc.pid, signal.SIGSTOP)
        out: dict[str, str] = {}
        errors: list = []

        def read(rel):
            try:
                out[rel] = file_sha(os.path.join(mnt, rel))
            except OSError as e:
                errors.append((rel, e))
        readers = [threading.Thread(target=read, args=(rel,))
                   for rel in ("d1/big0.bin", "d1/big1.bin")]
        for t in readers:
            t.start()
        helpers.wait_until(lambda: helpers.holder_status(holder_sock)["pending"] >= 2,
                           what="two pending events in the holder")

        dropped = drop_connections(holder_pid, d.proc.pid)
        assert dropped >= 2, dropped        # the event connection and a control one
        helpers.wait_until(lambda: not helpers.holder_status(holder_sock)["subscribed"],
                           what="the holder to let the subscriber go")
        os.kill(d.proc.pid, signal.SIGCONT)

        helpers.wait_until(lambda: helpers.holder_status(holder_sock)["subscribed"],
                           what="the daemon to subscribe again")
        for t in readers:
            t.join(60)
        assert not any(t.is_alive() for t in readers), d.log()
        assert not errors, errors
        for rel in ("d1/big0.bin", "d1/big1.bin"):
            assert out[rel] == file_sha(os.path.join(src, rel)), rel
        # the new subscription serves later reads too, and every file reads back whole
        helpers.assert_same_tree(src, mnt)
        st = helpers.holder_status(holder_sock)
        assert st["pending"] == 0 and st["subscribed"]
        assert "re-subscribing to the fd holder" in open(d.log_path).read()
    finally:
        if d.proc is not None and d.proc.poll() is None:
            os.kill(d.proc.pid, signal.SIGCONT)
        d.cleanup()


def _holder_pid(sock_path: str) -> int:
    from fscache_daemon.frontend.fdholder import HolderChannel
    ch = HolderChannel(sock_path, timeout=10)
    try:
        return ch.holder_pid
    finally:
        ch.close()
