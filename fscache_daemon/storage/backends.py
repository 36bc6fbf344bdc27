"""Where blobs come from: `localfs` (a directory of blob files) and `registry` (OCI
distribution API range reads through `erofs_tools.registry`, optionally via an HTTP proxy
or a mirror such as Dragonfly's dfdaemon).

A backend is addressed by blob id (64 hex chars) and answers `read(blob_id, offset,
length)` with exactly `length` bytes of the stored (compressed) blob, or raises
BackendError. Backends are thread-safe; they are shared by every blob of an image and
by every image mounted with the same backend spec.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from erofs_tools.errors import ErofsToolsError
from erofs_tools.registry.reference import default_insecure

from . import BackendError, BackendUnavailableError, pipeline
from .iobuf import BufferPool, IOBuffer

if TYPE_CHECKING:
    from erofs_tools.registry.auth import Credentials

    from .keychain import Keychain

log = logging.getLogger(__name__)

POOL_SIZE = 8 + pipeline.MAX_THREADS      # workers (--threads default) + pipeline readers

_BLOB_ID = re.compile(r"^[0-9a-f]{64}$")


def check_blob_id(blob_id: str) -> str:
    if not isinstance(blob_id, str) or not _BLOB_ID.match(blob_id):
        raise BackendError(f"invalid blob id {blob_id!r}: expected 64 lowercase hex chars")
    return blob_id


# Seconds one registry read may spend retrying (plus one last attempt's timeout).
FETCH_RETRY_DEADLINE = 60.0
# ... and on a mirror that is not the last endpoint to ask (then the next one is)
MIRROR_DEADLINE = 5.0

class Backend:
    """Interface every backend implements."""

    kind = "?"
    # the daemon keeps a fill's next request in flight while it decodes the current one
    # (BlobManager pipeline) when a request has latency worth hiding
    pipelined = True

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

    def will_need(self, blob_id: str, offset: int, length: int) -> None:
        """A hint: [offset, offset+length) of the blob will be read soon, in pieces and
        possibly out of order (readahead fetches a window with several workers)."""

    def register_blob(self, blob_id: str, size: int | None = None) -> None:
        """Tell the backend about a blob it will be asked for (its stored size, from the
        bootstrap's blob table), before the first read."""

    def warm(self) -> None:
        """Do now what the first read would do once (a registry: resolve the image's
        manifest), so that a mount overlaps it with reading its bootstrap."""

    def reader(self, blob_id: str):
        """A `read_at(offset, length) -> bytes` closure for one blob."""
        return lambda offset, length: self.read(blob_id, offset, length)

    def reads_direct(self, blob_id: str) -> bool:
        """read_pooled() of this blob bypasses the page cache (will_need would only
        fill it with pages nobody reads)."""
        return False

    def read_pooled(self, blob_id: str, offset: int, length: int,
                    pool: BufferPool) -> tuple[bytes | memoryview, IOBuffer | None]:
        """read(), possibly into a buffer of `pool`: (the bytes, the buffer to give back
        to the pool once nothing uses them, or None). For the cold path, whose use of
        the bytes ends with the range stored."""
        return self.read(blob_id, offset, length), None


# O_DIRECT offsets, lengths and buffer addresses are aligned to this (any logical block
# size up to a page)
DIRECT_ALIGN = 4096


class LocalFsBackend(Backend):
    """A directory holding blob files named by their blob id (as nydusd's localfs).

    The cold path's reads (read_pooled) use O_DIRECT into reused aligned buffers where
    the file system takes it: each stored byte is read once, so going through the
    blob's page cache would only add a page-cache insertion and a copy per byte.
    """

    kind = "localfs"

    def __init__(self, directory: str, *, direct: bool = True):
        self.directory = os.path.abspath(directory)
        if not os.path.isdir(self.directory):
            raise BackendError(f"{self.directory}: localfs backend directory does not exist")
        self._fds: dict[str, int] = {}
        # blob id -> an O_DIRECT descriptor, or -1 where the file system refuses it
        self._dfds: dict[str, int] = {}
        self._spent: list[int] = []     # O_DIRECT descriptors given up (see _no_direct)
        self._lock = threading.Lock()
        # a subclass that overrides read() (a wrapper counting or failing reads) is
        # asked through it for every read
        self.direct = direct and type(self).read is LocalFsBackend.read

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
                    raise BackendUnavailableError(f"{path}: cannot open blob: {e.strerror}") from None
                self._fds[blob_id] = fd
            return fd

    def blob_size(self, blob_id: str) -> int:
        return os.fstat(self._fd(blob_id)).st_size

    def _direct_fd(self, blob_id: str) -> int:
        """An O_DIRECT descriptor of the blob, or -1 (not supported there, or off)."""
        if not self.direct:
            return -1
        with self._lock:
            fd = self._dfds.get(blob_id)
        if fd is not None:
            return fd
        path = self._path(blob_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise BackendUnavailableError(f"{path}: cannot open blob: {e.strerror}") from None
            fd = -1
        with self._lock:
            if blob_id in self._dfds:       # another thread opened it meanwhile
                if fd >= 0:
                    os.close(fd)
                return self._dfds[blob_id]
            self._dfds[blob_id] = fd
        return fd

    def reads_direct(self, blob_id: str) -> bool:
        try:
            return self._direct_fd(blob_id) >= 0
        except BackendError:
            return False

    def _no_direct(self, blob_id: str, fd: int) -> None:
        # not closed before close(): another thread may be reading through it, and a
        # closed number could be reused by any file meanwhile
        with self._lock:
            if self._dfds.get(blob_id) == fd:
                self._dfds[blob_id] = -1
                self._spent.append(fd)

    def read_pooled(self, blob_id: str, offset: int, length: int,
                    pool: BufferPool) -> tuple[bytes | memoryview, IOBuffer | None]:
        if offset < 0 or length < 0:
            raise BackendError(f"blob {blob_id[:12]}: bad range {offset}+{length}")
        fd = self._direct_fd(blob_id)
        if fd < 0:
            return self.read(blob_id, offset, length), None
        start = offset - offset % DIRECT_ALIGN
        end = offset + length
        total = -(-end // DIRECT_ALIGN) * DIRECT_ALIGN - start
        buf = pool.get(total)
        got = 0
        try:
            while got < end - start:
                n = os.preadv(fd, [buf.view[got:total]], start + got)
                got += n
                # 0 at the end of the file; an unaligned count ends there too
                if n == 0 or got % DIRECT_ALIGN:
                    break
        except OSError as e:
            pool.put(buf)
            if e.errno == errno.EINVAL and got == 0:
                # the file system takes O_DIRECT opens but not these reads
                log.info("%s/%s: O_DIRECT reads refused (%s); reading through the page "
                         "cache", self.directory, blob_id, e.strerror)
                self._no_direct(blob_id, fd)
                return self.read(blob_id, offset, length), None
            raise BackendUnavailableError(f"{self.directory}/{blob_id}: read failed at "
                                          f"{start + got}: {e.strerror}") from None
        if got < end - start:
            pool.put(buf)
            raise BackendUnavailableError(f"{self.directory}/{blob_id}: short read: wanted "
                                          f"{offset}+{length}, blob ends at {start + got}")
        return buf.view[offset - start:end - start], buf

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
                raise BackendUnavailableError(f"{self.directory}/{blob_id}: read failed at {offset + got}: "
                                   f"{e.strerror}") from None
            if not b:
                raise BackendUnavailableError(f"{self.directory}/{blob_id}: short read: wanted "
                                   f"{offset}+{length}, blob ends at {offset + got}")
            parts.append(b)
            got += len(b)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def will_need(self, blob_id: str, offset: int, length: int) -> None:
        # workers read a window's chunks in parallel, out of order, which defeats the
        # kernel's sequential readahead on the blob file: ask for the whole span at once
        # (measured on the 1 GiB benchmark image: cold reads 270 -> ~400 MB/s)
        try:
            os.posix_fadvise(self._fd(blob_id), offset, length, os.POSIX_FADV_WILLNEED)
        except (OSError, BackendError):
            pass

    def close(self) -> None:
        with self._lock:
            for fd in list(self._fds.values()) + list(self._dfds.values()) + self._spent:
                if fd >= 0:
                    os.close(fd)
            self._fds.clear()
            self._dfds.clear()
            self._spent.clear()


class RegistryBackend(Backend):
    """Blob range reads from an OCI registry repository (`registry:HOST/REPO[:TAG]`).

    Transport concerns (pooled keep-alive connections, basic/bearer auth with token
    refresh, redirects cached per blob, retries with backoff, timeouts, an optional HTTP
    proxy with direct fallback) live in `erofs_tools.registry.RegistryClient`; this class
    maps blob ids to `sha256:` digests and checks lengths. `mirror` (`HOST[:PORT]`)
    replaces the registry endpoint, e.g. dfdaemon in registry-endpoint mode
    (`127.0.0.1:4001`); `proxy` (`http://HOST:PORT`) is a forward HTTP proxy such as
    dfdaemon's proxy port. Plain HTTP is used for loopback registries unless `insecure`
    says otherwise.

    Without `mirror`, `hosts_dir` (containerd's layout, `erofs_tools.registry.hosts`)
    may list mirrors for the registry: blob reads go to the endpoints with the `pull`
    capability in order, the manifest to those with `resolve`, and the first that
    answers wins (a mirror that fails or lacks the blob costs one quick attempt, then
    the next is asked). Each endpoint has its own client, so its own host's credentials:
    `credentials_for(host)` (containerd's CRI registry configs, `open_backend`'s
    `containerd_config`) if it has an entry for exactly that `host[:port]`, else the
    docker config's: the registry's never reach a mirror.
    """

    kind = "registry"

    def __init__(self, reference: str, *, proxy: str | None = None,
                 mirror: str | None = None, insecure: bool | None = None,
                 digest_map: dict | None = None, hosts_dir: str | None = None,
                 credentials_for: Callable[[str], Credentials | None] | None = None,
                 **client_kw):
        from erofs_tools import registry as reg
        from erofs_tools.registry.hosts import RegistryHost, registry_hosts
        self.reference = reference
        self.proxy = proxy
        self.mirror = mirror
        self._clients: list[tuple[RegistryHost, reg.RegistryClient]] = []
        try:
            ref = reg.parse_reference(reference)
            if not isinstance(ref, reg.Reference):
                raise BackendError(f"registry backend {reference!r}: not a registry reference")
            self.repository = ref.repository
            # A reader waits on every retry: bound one fetch's retrying (the kernel may
            # retry a failed range once or twice more) so a dead registry means EIO.
            client_kw.setdefault("deadline", FETCH_RETRY_DEADLINE)
            # a connection per request in flight: the daemon's workers and the fetch
            # pipeline's reader threads (pipeline.MAX_THREADS); with urllib3's pool of
            # 8 the connections past it were closed after each request and opened again
            client_kw.setdefault("pool_size", POOL_SIZE)
            if mirror:
                # one plain-HTTP rule with erofs-tools convert/push/pull: loopback only
                scheme = "http" if default_insecure(mirror, insecure) else "https"
                hosts = [RegistryHost(scheme, mirror)]
            else:
                default = None if insecure is None else ("http" if insecure else "https")
                hosts = registry_hosts(hosts_dir, ref.api_host, default)
            for i, h in enumerate(hosts):
                kw = dict(client_kw)
                creds = credentials_for(h.host) if credentials_for else None
                if creds is not None:
                    kw["credentials"] = creds
                self._clients.append((h, self._make_client(reg, ref.api_host, h, proxy,
                                                           i < len(hosts) - 1, kw)))
        except BackendError:
            self.close()
            raise
        except ErofsToolsError as e:
            self.close()
            raise BackendError(f"registry backend {reference}: {e}") from None
        self.host = hosts[-1].host
        self._pull = [c for h, c in self._clients if h.can("pull")]
        self._resolve = [c for h, c in self._clients if h.can("resolve")]
        if not self._pull:
            self.close()
            raise BackendError(f"registry backend {reference}: no host with the pull "
                               f"capability for {ref.api_host} in {hosts_dir}")
        self._ref = ref
        self._digests: dict[str, str] = dict(digest_map or {})
        self._sizes: dict[str, int] = {}
        self._layers: list | None = None
        self._config_desc = None          # the image config's descriptor (its manifest's)
        self._map_lock = threading.Lock()

    @staticmethod
    def _make_client(reg, registry: str, h, proxy, mirror: bool, client_kw: dict):
        kw = dict(client_kw)
        if mirror:
            # not the last resort: one quick attempt, then the next endpoint
            kw["retries"] = min(kw.get("retries", 1), 1)
            kw["deadline"] = min(kw["deadline"] or MIRROR_DEADLINE, MIRROR_DEADLINE)
        return reg.RegistryClient(h.host, insecure=h.insecure, proxy=proxy,
                                  api_root=h.path,
                                  namespace=registry if h.is_mirror(registry) else None,
                                  headers=h.header, extra_ca=h.ca,
                                  client_cert=_one_pair(h.client), skip_verify=bool(h.skip_verify),
                                  **kw)

    @property
    def spec(self) -> str:
        return f"registry:{self.reference}"

    @property
    def endpoints(self) -> list[str]:
        """Where blobs are read from, in order (for status and logs)."""
        return [c.base + c.api_root for c in self._pull]

    def register_blob(self, blob_id: str, size: int | None = None) -> None:
        if size:
            self._sizes[blob_id] = size

    def _first(self, clients: list, what: str, op):
        """op(client) on each endpoint in turn until one answers (None from op means
        "not here": the next is asked); raises the first endpoint's error if none did."""
        first: ErofsToolsError | None = None
        for i, c in enumerate(clients):
            try:
                got = op(c)
            except ErofsToolsError as e:
                first = first or e
                if i + 1 < len(clients):
                    log.warning("registry %s: %s from %s failed (%s); trying %s",
                                self.reference, what, c.host, e, clients[i + 1].host)
                continue
            if got is not None:
                return got
        if first is not None:
            raise first
        return None

    def warm(self) -> None:
        with self._map_lock:        # digest_of waits for it rather than asking again
            self._nydus_layers()

    def _nydus_layers(self) -> list:
        """The image's Nydus blob layers (empty if the reference names no image)."""
        if self._layers is not None:
            return self._layers
        layers: list = []
        if (self._ref.tag or self._ref.digest) and self._resolve:
            from erofs_tools import registry as reg
            from erofs_tools.registry.manifest import CONFIG_LIMIT, host_platform, resolve_index
            from erofs_tools.registry.nydus_pull import nydus_entry
            # the node's platform, as containerd pulls the image for it (linux/amd64
            # was taken on every node: an arm64 node mapped its blobs by the amd64
            # manifest and read the amd64 config's command for its start set), and of
            # an index holding both (nydusify --merge-platform) the Nydus entry, as rpull
            # takes it: the OCI one listed first has no Nydus layers to map blobs by
            node = host_platform()
            repo = self.repository

            def resolve(c):
                return resolve_index(
                    c.get_manifest(repo, self._ref.ref), lambda i: nydus_entry(i, *node),
                    lambda digest: c.get_manifest(repo, digest),
                    lambda d: c.get_blob(repo, d.digest, max_size=CONFIG_LIMIT), node)[1]
            try:
                m = self._first(self._resolve, "the manifest", resolve)
                layers = [d for d in m.layers() if d.media_type == reg.NYDUS_BLOB]
                self._config_desc = m.config()
            except ErofsToolsError as e:
                log.warning("registry %s: cannot read the image manifest (%s); "
                            "using blob ids as digests", self.reference, e)
        self._layers = layers
        return layers

    def image_config(self, max_size: int = 1 << 20) -> bytes | None:
        """The image config blob (its command and environment: startset.py), verified
        against its digest; None if the reference names no image or it is bigger than
        `max_size`. One small request (the manifest was read by warm())."""
        with self._map_lock:
            self._nydus_layers()
            desc = self._config_desc
        if desc is None or desc.size > max_size:
            return None
        return self._first(self._resolve, "the image config", lambda c: c.get_blob(
            self.repository, desc.digest, max_size=desc.size))

    def digest_of(self, blob_id: str) -> str:
        """The registry digest holding a blob: an explicit mapping, else the layer whose
        digest is the blob id (the Nydus convention), else the one Nydus blob layer of the
        image with the blob's size (for blobs named by their RAFS id, not their sha256),
        else `sha256:<blob id>`."""
        with self._map_lock:
            return self._digest_locked(blob_id)

    def _digest_locked(self, blob_id: str) -> str:
        d = self._digests.get(blob_id)
        if d:
            return d
        want = "sha256:" + blob_id
        d = want
        layers = self._nydus_layers()
        if layers and not any(x.digest == want for x in layers):
            size = self._sizes.get(blob_id)
            same = [x for x in layers if size and x.size == size]
            if len(same) == 1:
                d = same[0].digest
                log.info("registry %s: blob %s is layer %s (matched by size)",
                         self.reference, blob_id[:12], d)
        if d != want or blob_id in self._sizes or not layers:
            self._digests[blob_id] = d
        return d

    def blob_size(self, blob_id: str) -> int:
        check_blob_id(blob_id)
        digest = self.digest_of(blob_id)
        try:
            size = self._first(self._pull, f"layer {digest}",
                               lambda c: c.stat_blob(self.repository, digest))
        except ErofsToolsError as e:
            # the layer digest in full: what the image's manifest and its users name
            raise BackendUnavailableError(f"registry {self.reference} layer {digest}: {e}") from None
        if size is None:
            raise BackendUnavailableError(f"registry {self.reference}: layer {digest} not found")
        return size

    def _digest_now(self, blob_id: str) -> str | None:
        """digest_of(blob_id) if that does not wait for the image's manifest another
        thread is reading (warm); else None."""
        if not self._map_lock.acquire(blocking=False):
            if self._layers is not None:    # the manifest is known: a short wait
                return self.digest_of(blob_id)
            return self._digests.get(blob_id)
        try:
            # the manifest is read by now, or read here by this thread (nobody warms)
            return self._digest_locked(blob_id)
        finally:
            self._map_lock.release()

    def read(self, blob_id: str, offset: int, length: int) -> bytes:
        check_blob_id(blob_id)
        digest = self._digest_now(blob_id)
        if digest is not None:
            return self._read_at(digest, offset, length)
        # The manifest is still on its way (a mount's first reads: the blob's check runs
        # beside the warming): read the layer of the Nydus convention, sha256:<blob id>,
        # at once, then keep it only if the manifest maps the blob there (it does unless
        # the blob is named by its RAFS id); else read again where it says. One registry
        # round trip less on a cold mount's path.
        guess = "sha256:" + blob_id
        try:
            data: bytes | None = self._read_at(guess, offset, length)
            failed: ErofsToolsError | None = None
        except ErofsToolsError as e:
            data, failed = None, e
        digest = self.digest_of(blob_id)
        if digest != guess:
            return self._read_at(digest, offset, length)
        if failed is not None:
            raise failed
        assert data is not None
        return data

    def _read_at(self, digest: str, offset: int, length: int) -> bytes:
        def one(c) -> bytes:
            data = c.read_blob_range(self.repository, digest, offset, length)
            if len(data) != length:
                raise BackendUnavailableError(f"range {offset}+{length} returned {len(data)} bytes "
                                   f"from {c.host}")
            return data
        try:
            return self._first(self._pull, f"layer {digest}", one)
        except ErofsToolsError as e:
            raise BackendUnavailableError(f"registry {self.reference} layer {digest}: {e}") from None

    def close(self) -> None:
        for _, c in self._clients:
            c.close()


def _one_pair(pairs: tuple) -> tuple[str, str] | None:
    if len(pairs) > 1:
        raise BackendError(f"hosts.toml: {len(pairs)} client certificates for one host; "
                           "one is supported")
    return pairs[0] if pairs else None


def parse_backend_spec(spec: str) -> tuple[str, str]:
    kind, sep, where = spec.partition(":")
    if not sep or not where or kind not in ("localfs", "registry"):
        raise BackendError(f"invalid backend {spec!r}: expected localfs:DIR or registry:REF")
    return kind, where


def open_backend(spec: str, *, proxy: str | None = None, mirror: str | None = None,
                 insecure: bool | None = None, hosts_dir: str | None = None,
                 containerd_config: str | None = None, keychain: Keychain | None = None,
                 **client_kw) -> Backend:
    """A backend for `spec`. `containerd_config` (containerd's config.toml) is read now,
    so a registry backend sees the credentials the file holds when the mount opens it.
    `keychain`: the pull secrets kubelet sent (keychain.py); one recorded for this
    image's registry host and repository comes first, for that host only."""
    kind, where = parse_backend_spec(spec)
    if kind == "localfs":
        return LocalFsBackend(where)
    sources: list[Callable[[str], Credentials | None]] = []
    if keychain is not None:
        from erofs_tools import registry as reg
        try:
            ref = reg.parse_reference(where)
        except ErofsToolsError as e:
            raise BackendError(f"registry backend {where}: {e}") from None
        if isinstance(ref, reg.Reference):
            repository = ref.repository
            sources.append(lambda host: keychain.credentials(host, repository))
    if containerd_config:
        from erofs_tools.registry.cri_config import load_cri_config
        try:
            sources.append(load_cri_config(containerd_config).credentials)
        except ErofsToolsError as e:
            raise BackendError(f"registry backend {where}: {e}") from None

    def credentials_for(host: str) -> Credentials | None:
        for source in sources:
            creds = source(host)
            if creds is not None:
                return creds
        return None
    return RegistryBackend(where, proxy=proxy, mirror=mirror, insecure=insecure,
                           hosts_dir=hosts_dir,
                           credentials_for=credentials_for if sources else None,
                           **client_kw)
