"""Where blobs come from: `localfs` (a directory of blob files) and `registry` (OCI
distribution API range reads through `erofs_tools.registry`, optionally via an HTTP proxy
or a mirror such as Dragonfly's dfdaemon).

A backend is addressed by blob id (64 hex chars) and answers `read(blob_id, offset,
length)` with exactly `length` bytes of the stored (compressed) blob, or raises
BackendError. Backends are thread-safe; they are shared by every blob of an image and
by every image mounted with the same backend spec.
"""

from __future__ import annotations

import logging
import os
import re
import threading

from erofs_tools.errors import ErofsToolsError

from . import BackendError

log = logging.getLogger(__name__)

_BLOB_ID = re.compile(r"^[0-9a-f]{64}$")


def check_blob_id(blob_id: str) -> str:
    if not isinstance(blob_id, str) or not _BLOB_ID.match(blob_id):
        raise BackendError(f"invalid blob id {blob_id!r}: expected 64 lowercase hex chars")
    return blob_id


class Backend:
    """Interface every backend implements."""

    kind = "?"

    @property
    def spec(self) -> str:
        """The `kind:location` string this backend was made from."""
        raise NotImplementedError

    def blob_size(self, blob_id: str) -> int:
        raise NotImplementedError

    def read(self, blob_id: str, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def reader(self, blob_id: str):
        """A `read_at(offset, length) -> bytes` closure for one blob."""
        return lambda offset, length: self.read(blob_id, offset, length)


class LocalFsBackend(Backend):
    """A directory holding blob files named by their blob id (as nydusd's localfs)."""

    kind = "localfs"

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        if not os.path.isdir(self.directory):
            raise BackendError(f"{self.directory}: localfs backend directory does not exist")
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def spec(self) -> str:
        return f"localfs:{self.directory}"

    def _path(self, blob_id: str) -> str:
        check_blob_id(blob_id)
        for name in (blob_id, blob_id + ".blob", "sha256:" + blob_id):
            p = os.path.join(self.directory, name)
            if os.path.exists(p):
                return p
        raise BackendError(f"{os.path.join(self.directory, blob_id)}: blob not found")

    def _fd(self, blob_id: str) -> int:
        with self._lock:
            fd = self._fds.get(blob_id)
            if fd is None:
                path = self._path(blob_id)
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as e:
                    raise BackendError(f"{path}: cannot open blob: {e.strerror}") from None
                self._fds[blob_id] = fd
            return fd

    def blob_size(self, blob_id: str) -> int:
        return os.fstat(self._fd(blob_id)).st_size

    def read(self, blob_id: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise BackendError(f"blob {blob_id[:12]}: bad range {offset}+{length}")
        fd = self._fd(blob_id)
        parts = []
        got = 0
        while got < length:
            try:
                b = os.pread(fd, length - got, offset + got)
            except OSError as e:
                raise BackendError(f"{self.directory}/{blob_id}: read failed at {offset + got}: "
                                   f"{e.strerror}") from None
            if not b:
                raise BackendError(f"{self.directory}/{blob_id}: short read: wanted "
                                   f"{offset}+{length}, blob ends at {offset + got}")
            parts.append(b)
            got += len(b)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class RegistryBackend(Backend):
    """Blob range reads from an OCI registry repository (`registry:HOST/REPO[:TAG]`).

    Transport concerns (pooled keep-alive connections, basic/bearer auth with token
    refresh, redirects cached per blob, retries with backoff, timeouts, an optional HTTP
    proxy with direct fallback) live in `erofs_tools.registry`; this class only maps blob
    ids to `sha256:` digests and checks lengths. `mirror` replaces the registry endpoint
    (e.g. dfdaemon in registry-endpoint mode, `http://127.0.0.1:4001`); `proxy` is a
    forward HTTP proxy (dfdaemon's proxy port).
    """

    kind = "registry"

    def __init__(self, reference: str, *, proxy: str | None = None,
                 mirror: str | None = None, insecure: bool | None = None):
        from erofs_tools import registry as reg
        self.reference = reference
        self.proxy = proxy
        self.mirror = mirror
        try:
            self._client = reg.open_blob_reader(reference, proxy=proxy, mirror=mirror,
                                                insecure=insecure)
        except ErofsToolsError as e:
            raise BackendError(f"registry backend {reference}: {e}") from None
        except AttributeError:
            raise BackendError("registry backend: erofs_tools.registry has no blob reader "
                               "(not installed yet)") from None

    @property
    def spec(self) -> str:
        return f"registry:{self.reference}"

    def blob_size(self, blob_id: str) -> int:
        check_blob_id(blob_id)
        try:
            return self._client.blob_size("sha256:" + blob_id)
        except ErofsToolsError as e:
            raise BackendError(f"registry {self.reference} blob {blob_id[:12]}: {e}") from None

    def read(self, blob_id: str, offset: int, length: int) -> bytes:
        check_blob_id(blob_id)
        try:
            data = self._client.read_blob_range("sha256:" + blob_id, offset, length)
        except ErofsToolsError as e:
            raise BackendError(f"registry {self.reference} blob {blob_id[:12]}: {e}") from None
        if len(data) != length:
            raise BackendError(f"registry {self.reference} blob {blob_id[:12]}: range "
                               f"{offset}+{length} returned {len(data)} bytes")
        return data

    def close(self) -> None:
        close = getattr(self._client, "close", None)
        if close:
            close()


def parse_backend_spec(spec: str) -> tuple[str, str]:
    kind, sep, where = spec.partition(":")
    if not sep or not where or kind not in ("localfs", "registry"):
        raise BackendError(f"invalid backend {spec!r}: expected localfs:DIR or registry:REF")
    return kind, where


def open_backend(spec: str, *, proxy: str | None = None, mirror: str | None = None,
                 insecure: bool | None = None) -> Backend:
    kind, where = parse_backend_spec(spec)
    if kind == "localfs":
        return LocalFsBackend(where)
    return RegistryBackend(where, proxy=proxy, mirror=mirror, insecure=insecure)
