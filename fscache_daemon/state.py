"""What the daemon keeps in its cache directory besides blobs: the lock that makes it the
only daemon of that directory, the bootstrap copies, and mounts.json."""

from __future__ import annotations

import fcntl
import json
import logging
import os

import blake3

from erofs_tools.fsutil import atomic_write_bytes, create_exclusive
from fscache_daemon.errors import ConflictError, DaemonError

log = logging.getLogger(__name__)

STATE_VERSION = 2
# a bootstrap copy is named after its BLAKE3 digest, this many hex digits (BLAKE3, not
# sha256: 3 ms against 15-20 ms for a 6 MB bootstrap, on every cold mount's path)
BOOT_NAME_HEX = 32


class CacheDirLock:
    """An exclusive flock on CACHE_DIR/daemon.lock for the daemon's lifetime: two daemons
    on one cache directory would share cache files, mounts.json and the fd holder, and
    answer the same kernel requests. The lock dies with the process (also on SIGKILL)."""

    def __init__(self, cache_dir: str):
        self.path = os.path.join(cache_dir, "daemon.lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                          0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            finally:
                os.close(self.fd)
                self.fd = -1
            raise ConflictError(f"{cache_dir}: cache directory in use by another "
                                f"fscache-daemon (pid {pid})") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)       # drops the flock
            self.fd = -1


def _digest_fd(fd: int) -> str:
    h = blake3.blake3()
    off = 0
    while True:
        block = os.pread(fd, 1 << 20, off)
        if not block:
            return h.hexdigest()
        h.update(block)
        off += len(block)


def copy_bootstrap(path: str, boot_dir: str) -> str:
    """Copy the bootstrap at `path` into boot_dir under the name of its digest, hashing
    exactly the bytes copied (one descriptor, read once: a file changed meanwhile cannot
    end up under another content's name). An existing copy of that name is reused only if
    its content still has that hash; else it is replaced."""
    src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd, tmp = create_exclusive(boot_dir, ".boot.", ".tmp")
        try:
            h = blake3.blake3()
            off = 0
            while True:
                block = os.read(src, 1 << 20)
                if not block:
                    break
                h.update(block)
                view = memoryview(block)
                while view:
                    n = os.pwrite(fd, view, off)
                    off += n
                    view = view[n:]
            # no fsync: the kernel mounts this copy from the page cache, and a copy
            # torn by a power cut (its mounts gone with it) is re-hashed and replaced
            # by the next mount of that name (below); ~20 ms of a cold mount
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
    finally:
        os.close(src)
    name = h.hexdigest()[:BOOT_NAME_HEX]
    dst = os.path.join(boot_dir, name + ".boot")
    try:
        try:
            dfd = os.open(dst, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            reuse = False
        else:
            try:
                reuse = _digest_fd(dfd)[:BOOT_NAME_HEX] == name
            finally:
                os.close(dfd)
            if not reuse:
                log.warning("%s: content does not match its name; replacing it", dst)
        if reuse:
            os.unlink(tmp)
        else:
            os.replace(tmp, dst)    # a mounted superblock keeps its own open file
    finally:
        os.close(fd)
    return dst


def save_state(path: str, frontend: str, records: list[dict]) -> None:
    data = {"version": STATE_VERSION, "frontend": frontend, "mounts": records}
    # replaced atomically, not fsynced: it is for a daemon that dies while the kernel
    # (and its mounts) lives on, and the page cache holds it then; a power cut takes the
    # mounts with it, and a restart reconciles any record (or an unreadable file, which
    # load_state reports) with the kernel's mounts (two fsyncs a mount, 20-300 ms each
    # on a busy disk)
    atomic_write_bytes(path, json.dumps(data, indent=1).encode(), mode=0o600, fsync=False)


def load_state(path: str) -> tuple[str | None, list[dict]]:
    """(the front end the mounts were made with, the mount records) of mounts.json."""
    try:
        with open(path) as f:
            state = json.load(f)
    except FileNotFoundError:
        return None, []
    except (OSError, ValueError) as e:
        log.error("%s: unreadable (%s); starting without mounts", path, e)
        return None, []
    mounts = state.get("mounts") if isinstance(state, dict) else None
    if not isinstance(mounts, list):
        raise DaemonError(f"{path}: no mount list")
    frontend = state.get("frontend")
    return (frontend if isinstance(frontend, str) else None,
            [m for m in mounts if isinstance(m, dict)])
