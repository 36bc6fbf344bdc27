"""RegistryClient: the OCI distribution API (ecosystem.md §1) for one registry host.

Reads: blob existence and size (HEAD), whole blobs verified against their digest (to
memory or streamed to a file), byte ranges of blobs (the daemon's lazy reads), manifests
and indexes (digest-verified). Writes: blob uploads (in upload.py), manifests.

Every request goes through ``_send``, which adds authorization and answers 401s by
running the challenge flow (auth.py), and through the Transport, which retries transient
failures. Blob GETs follow redirects to storage without the registry's Authorization and
remember the storage URL per blob, so later range reads go straight there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import urllib.parse
from typing import BinaryIO

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error

from ..errors import AuthError, CorruptImageError, InputError, RegistryError
from . import mediatypes as mt
from . import upload
from .auth import Authenticator, Credentials, load_credentials
from .digest import check_digest, verify
from .manifest import MAX_MANIFEST_SIZE, Manifest, media_type_of
from .reference import Reference, check_ref, check_repository
from .transport import (REDIRECT_STATUSES, RetryPolicy, Transport, drain, one_line,
                        safe_url)

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
READ_SIZE = 1 << 20
# Download pieces: a broken connection loses at most one piece before resuming.
STREAM_PIECE = 64 << 10
# Storage answers that mean "this cached redirect URL is stale" (expired signature,
# rotated object): resolve the blob through the registry again.
STALE_LOCATION = frozenset({401, 403, 404, 410})


def pull_scope(repo: str) -> str:
    return f"repository:{repo}:pull"


def push_scope(repo: str) -> str:
    return f"repository:{repo}:pull,push"


def origin(url: str) -> tuple:
    p = urllib.parse.urlsplit(url)
    port = p.port or (443 if p.scheme == "https" else 80)
    return (p.scheme, (p.hostname or "").lower(), port)


class RegistryClient:
    """A client for one registry host (``host[:port]``). Thread-safe: the daemon shares
    one client between worker threads.

    ``insecure=True`` talks plain HTTP (test registries); otherwise HTTPS with
    certificate verification. ``credentials`` default to the docker config.json entry for
    the host (``docker_config`` names another config file; ``False`` disables the
    lookup). ``proxy`` is an HTTP proxy URL used for blob reads (e.g. dfdaemon), with a
    direct fallback when the proxy fails; ``proxy_headers`` go to the proxy only (e.g.
    ``{"X-Dragonfly-Use-P2P": "true"}``).
    """

    def __init__(self, host: str, *, insecure: bool = False,
                 credentials: Credentials | None = None,
                 docker_config: str | bool | None = None,
                 timeout: float = 30.0, connect_timeout: float = 10.0,
                 retries: int = 5, backoff: float = 0.5, max_backoff: float = 30.0,
                 deadline: float | None = None,
                 proxy: str | None = None, proxy_headers: dict | None = None,
                 pool_size: int = 8, ca_certs: str | None = None,
                 chunk_size: int = upload.DEFAULT_CHUNK_SIZE):
        if not host or "/" in host:
            raise InputError(f"invalid registry host {host!r}")
        self.host = host
        self.insecure = insecure
        self.base = f"{'http' if insecure else 'https'}://{host}"
        self.chunk_size = chunk_size
        if credentials is None and docker_config is not False:
            credentials = load_credentials(host, docker_config or None)
        self.transport = Transport(timeout=timeout, connect_timeout=connect_timeout,
                                   pool_size=pool_size, ca_certs=ca_certs, proxy=proxy,
                                   proxy_headers=proxy_headers,
                                   policy=RetryPolicy(retries, backoff, max_backoff, deadline))
        self.auth = Authenticator(host, credentials, self._fetch_token,
                                  allow_http_realm=insecure)
        self._locations: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_reference(cls, ref: Reference, **kw) -> "RegistryClient":
        return cls(ref.api_host, **kw)

    def __repr__(self) -> str:
        return f"RegistryClient({self.base})"

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- request plumbing ---------------------------------------------------------

    def url(self, path: str) -> str:
        return self.base + path

    def _fetch_token(self, method: str, url: str, headers: dict,
                     body: bytes | None) -> tuple[int, bytes]:
        resp = self.transport.request(method, url, headers, body)
        return resp.status, drain(resp, 1 << 20)

    def _send(self, method: str, url: str, scope: str, headers: dict | None = None,
              body: bytes | BinaryIO | None = None, *, via_proxy: bool = False,
              retry: bool = True) -> urllib3.BaseHTTPResponse:
        """Send with authorization; on 401 run the challenge flow and resend. Two rounds
        at most: the first 401 may just be discovery (we sent nothing), the second means
        the registry refused what it asked for (an expired token gets renewed once)."""
        headers = dict(headers or {})
        start = _position(body)
        sent = self.auth.authorization(scope)
        for round_ in range(3):
            if sent:
                headers["Authorization"] = sent
            if round_ and start is not None:
                body.seek(start)
            elif round_ and body is not None and not isinstance(body, bytes):
                raise RegistryError(f"{method} {safe_url(url)}: cannot resend a stream "
                                    "after an authentication challenge")
            resp = self.transport.request(method, url, headers, body, via_proxy=via_proxy,
                                          retry=retry)
            if resp.status != 401:
                return resp
            challenge = resp.headers.get("WWW-Authenticate")
            drain(resp)
            if round_ == 2:
                break
            self.auth.on_unauthorized(challenge, scope, sent)
            sent = self.auth.authorization(scope)
        raise AuthError(f"registry {self.host}: access denied for "
                        f"{scope or 'the API'} ({method} {safe_url(url)})")

    def fail(self, method: str, url: str, resp: urllib3.BaseHTTPResponse,
             what: str = "") -> RegistryError:
        """A one-line RegistryError for an unexpected answer, with the registry's error
        code and message when it sent them (never headers, never query strings)."""
        body = drain(resp)
        codes: list[str] = []
        detail = ""
        try:
            errors = [e for e in json.loads(body).get("errors") or [] if isinstance(e, dict)]
            codes = [str(e.get("code", "")) for e in errors]
            detail = "; ".join(f"{e.get('code', '')}: {e.get('message', '')}"
                               for e in errors[:3])
        except (ValueError, AttributeError, TypeError):
            pass
        msg = f"{method} {safe_url(url)}: HTTP {resp.status}"
        if what:
            msg = f"{what}: {msg}"
        err = RegistryError(one_line(msg + (f" {detail}" if detail else ""), 400))
        # For callers that decide what to do next (upload restarts); not in the message.
        err.status, err.codes = resp.status, codes
        return err

    # --- API version check --------------------------------------------------------

    def ping(self) -> None:
        """GET /v2/: checks that the host speaks the distribution API and that our
        credentials (if the registry wants any) work."""
        url = self.url("/v2/")
        resp = self._send("GET", url, "")
        if resp.status != 200:
            raise self.fail("GET", url, resp, f"registry {self.host}")
        drain(resp)

    # --- blobs: existence, whole reads, ranges --------------------------------------

    def blob_url(self, repo: str, digest: str) -> str:
        return self.url(f"/v2/{check_repository(repo)}/blobs/{check_digest(digest)}")

    def _blob_request(self, method: str, repo: str, digest: str,
                      headers: dict | None = None) -> urllib3.BaseHTTPResponse:
        """GET/HEAD a blob, following redirects to storage (see module docstring)."""
        key = (repo, digest)
        # Only data reads go through the proxy (what dfdaemon distributes); HEADs and
        # everything else talk to the registry directly.
        proxy = method == "GET"
        cached = self._locations.get(key)
        if cached:
            resp = self.transport.request(method, cached, headers, via_proxy=proxy)
            if resp.status not in STALE_LOCATION and resp.status not in REDIRECT_STATUSES:
                return resp
            drain(resp)
            log.debug("cached location for %s is stale (HTTP %d)", digest, resp.status)
            with self._lock:
                self._locations.pop(key, None)
        url = self.blob_url(repo, digest)
        resp = self._send(method, url, pull_scope(repo), headers, via_proxy=proxy)
        for _ in range(MAX_REDIRECTS):
            if resp.status not in REDIRECT_STATUSES:
                return resp
            location = resp.headers.get("Location")
            drain(resp)
            if not location:
                raise RegistryError(f"{method} {safe_url(url)}: redirect without Location")
            target = urllib.parse.urljoin(url, location)
            scheme = urllib.parse.urlsplit(target).scheme
            if scheme not in ("http", "https") or (scheme == "http" and not self.insecure):
                raise RegistryError(f"{method} {safe_url(url)}: refusing redirect to "
                                    f"{safe_url(target)}")
            if origin(target) == origin(self.base):
                resp = self._send(method, target, pull_scope(repo), headers, via_proxy=proxy)
            else:
                # Another host (object storage): the registry's credentials stay here.
                with self._lock:
                    self._locations[key] = target
                resp = self.transport.request(method, target, headers, via_proxy=proxy)
            url = target
        raise RegistryError(f"{method} {safe_url(self.blob_url(repo, digest))}: "
                            "too many redirects")

    def stat_blob(self, repo: str, digest: str) -> int | None:
        """The blob's size from HEAD, or None if the registry does not have it."""
        resp = self._blob_request("HEAD", repo, digest)
        url = self.blob_url(repo, digest)
        if resp.status == 404:
            drain(resp)
            return None
        if resp.status != 200:
            raise self.fail("HEAD", url, resp)
        drain(resp)
        try:
            return int(resp.headers["Content-Length"])
        except (KeyError, ValueError):
            raise RegistryError(f"HEAD {safe_url(url)}: no Content-Length") from None

    def blob_exists(self, repo: str, digest: str) -> bool:
        return self.stat_blob(repo, digest) is not None

    def get_blob(self, repo: str, digest: str, max_size: int | None = None) -> bytes:
        """A whole blob in memory, verified against its digest; ``max_size`` (e.g. the
        descriptor's size) bounds what a hostile registry can make us hold."""
        h = hashlib.sha256()
        parts: list[bytes] = []
        self._download(repo, digest, h, parts.append, max_size)
        verify(digest, "sha256:" + h.hexdigest(), f"blob {digest}")
        return b"".join(parts)

    def pull_blob(self, repo: str, digest: str, path: str | os.PathLike,
                  max_size: int | None = None) -> int:
        """Stream a whole blob into ``path`` (atomically: a temporary file beside it is
        renamed once the digest checks out). Returns the size."""
        path = os.fspath(path)
        fd, tmp = tempfile.mkstemp(prefix=".part-", dir=os.path.dirname(path) or ".")
        try:
            with os.fdopen(fd, "wb") as f:
                h = hashlib.sha256()
                size = self._download(repo, digest, h, f.write, max_size)
            verify(digest, "sha256:" + h.hexdigest(), f"blob {digest}")
            os.replace(tmp, path)
            return size
        except BaseException:
            os.unlink(tmp)
            raise

    def _download(self, repo: str, digest: str, h, sink, max_size: int | None) -> int:
        """Stream a blob into ``sink`` and ``h``; a connection that breaks mid-body is
        resumed with a Range request from the bytes already received."""
        url = self.blob_url(repo, digest)
        policy = self.transport.policy
        done = 0
        for attempt in range(policy.retries + 1):
            headers = {"Range": f"bytes={done}-"} if done else {}
            resp = self._blob_request("GET", repo, digest, headers)
            if resp.status != (206 if done else 200):
                if done and resp.status == 200:
                    drain(resp)     # Range ignored: the bytes we hold cannot be extended
                    raise RegistryError(f"GET {safe_url(url)}: cannot resume download")
                raise self.fail("GET", url, resp)
            try:
                for chunk in resp.stream(STREAM_PIECE):
                    done += len(chunk)
                    if max_size is not None and done > max_size:
                        resp.close()
                        raise CorruptImageError(f"blob {digest}: larger than {max_size} "
                                                "bytes")
                    h.update(chunk)
                    sink(chunk)
                resp.release_conn()
                return done
            except Urllib3Error as e:
                resp.close()
                log.info("GET %s broke after %d bytes (%s), resuming", safe_url(url), done,
                         type(e).__name__)
                self.transport.retried += 1
                time.sleep(policy.delay(attempt))
        raise RegistryError(f"GET {safe_url(url)}: connection kept breaking")

    def read_blob_range(self, repo: str, digest: str, offset: int, length: int) -> bytes:
        """``length`` bytes of a blob from ``offset`` (fewer only at the blob's end).
        Not digest-verified: callers verify the chunks they read."""
        if offset < 0 or length < 0:
            raise InputError(f"blob {digest}: invalid range {offset}+{length}")
        if length == 0:
            return b""
        url = self.blob_url(repo, digest)
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        policy = self.transport.policy
        started = time.monotonic()
        for attempt in range(policy.retries + 1):
            resp = self._blob_request("GET", repo, digest, headers)
            try:
                return self._range_body(resp, url, offset, length)
            except Urllib3Error as e:
                resp.close()
                wait = policy.delay(attempt)
                if policy.out_of_time(started, wait):
                    break
                log.info("GET %s range broke (%s), retrying", safe_url(url), type(e).__name__)
                self.transport.retried += 1
                time.sleep(wait)
        raise RegistryError(f"GET {safe_url(url)}: connection kept breaking")

    def _range_body(self, resp, url: str, offset: int, length: int) -> bytes:
        if resp.status == 206:
            start = _content_range_start(resp.headers.get("Content-Range"))
            if start != offset:
                drain(resp)
                raise RegistryError(f"GET {safe_url(url)}: answered range starting at "
                                    f"{start}, asked {offset}")
            data = resp.read(length + 1)
        elif resp.status == 200:
            # The server ignored Range: skip to the offset in the stream.
            skip = offset
            while skip:
                got = resp.read(min(skip, READ_SIZE))
                if not got:
                    break
                skip -= len(got)
            data = resp.read(length + 1)
        elif resp.status == 416:
            drain(resp)
            raise RegistryError(f"GET {safe_url(url)}: range {offset}+{length} is beyond "
                                "the blob's end")
        else:
            raise self.fail("GET", url, resp)
        if len(data) > length:
            resp.close()
            raise RegistryError(f"GET {safe_url(url)}: answered more bytes than asked")
        resp.release_conn()
        return data

    def delete_blob(self, repo: str, digest: str) -> None:
        url = self.blob_url(repo, digest)
        resp = self._send("DELETE", url, push_scope(repo))
        if resp.status not in (200, 202):
            raise self.fail("DELETE", url, resp)
        drain(resp)

    # --- manifests and indexes -------------------------------------------------------

    def manifest_url(self, repo: str, ref: str) -> str:
        return self.url(f"/v2/{check_repository(repo)}/manifests/{check_ref(ref)}")

    def get_manifest(self, repo: str, ref: str,
                     accept: tuple[str, ...] = mt.ALL_MANIFEST_TYPES) -> Manifest:
        """Fetch a manifest or index by tag or digest. A digest reference is verified
        against the bytes; a tag is checked against Docker-Content-Digest if sent."""
        url = self.manifest_url(repo, ref)
        resp = self._send("GET", url, pull_scope(repo), {"Accept": ", ".join(accept)})
        if resp.status != 200:
            raise self.fail("GET", url, resp)
        data = resp.read(MAX_MANIFEST_SIZE + 1)
        resp.release_conn()
        what = f"manifest {repo}:{ref}" if not ref.startswith("sha256:") else \
            f"manifest {repo}@{ref}"
        if len(data) > MAX_MANIFEST_SIZE:
            raise CorruptImageError(f"{what}: larger than {MAX_MANIFEST_SIZE} bytes")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if ref.startswith("sha256:"):
            verify(ref, digest, what)
        claimed = resp.headers.get("Docker-Content-Digest")
        if claimed and claimed.startswith("sha256:"):
            verify(claimed, digest, what)
        return Manifest(data, media_type_of(data, resp.headers.get("Content-Type"), what),
                        digest)

    def head_manifest(self, repo: str, ref: str,
                      accept: tuple[str, ...] = mt.ALL_MANIFEST_TYPES) -> str | None:
        """The digest of a tag or digest reference, or None if it does not exist."""
        url = self.manifest_url(repo, ref)
        resp = self._send("HEAD", url, pull_scope(repo), {"Accept": ", ".join(accept)})
        if resp.status == 404:
            drain(resp)
            return None
        if resp.status != 200:
            raise self.fail("HEAD", url, resp)
        drain(resp)
        digest = resp.headers.get("Docker-Content-Digest")
        if digest is None and ref.startswith("sha256:"):
            return ref
        if digest is None:
            # Older registries: fall back to fetching it.
            return self.get_manifest(repo, ref, accept).digest
        return check_digest(digest)

    def put_manifest(self, repo: str, ref: str, manifest: Manifest) -> str:
        """Upload a manifest or index under a tag or its digest; returns its digest.
        The blobs it references must be pushed first."""
        url = self.manifest_url(repo, ref)
        if ref.startswith("sha256:"):
            verify(ref, manifest.digest, f"manifest {repo}@{ref}")
        resp = self._send("PUT", url, push_scope(repo), {"Content-Type": manifest.media_type},
                          manifest.data)
        if resp.status not in (200, 201):
            raise self.fail("PUT", url, resp)
        drain(resp)
        claimed = resp.headers.get("Docker-Content-Digest")
        if claimed:
            verify(manifest.digest, claimed, f"manifest {repo}:{ref} as stored")
        return manifest.digest

    def delete_manifest(self, repo: str, digest: str) -> None:
        url = self.manifest_url(repo, check_digest(digest))
        resp = self._send("DELETE", url, push_scope(repo))
        if resp.status not in (200, 202):
            raise self.fail("DELETE", url, resp)
        drain(resp)

    def list_tags(self, repo: str) -> list[str]:
        url = self.url(f"/v2/{check_repository(repo)}/tags/list")
        resp = self._send("GET", url, pull_scope(repo))
        if resp.status != 200:
            raise self.fail("GET", url, resp)
        body = resp.read(MAX_MANIFEST_SIZE)
        resp.release_conn()
        try:
            return list(json.loads(body).get("tags") or [])
        except (ValueError, AttributeError, TypeError):
            raise RegistryError(f"GET {safe_url(url)}: unreadable tag list") from None

    # --- uploads (upload.py does the protocol) ----------------------------------------

    def push_blob(self, repo: str, source, *, digest: str | None = None,
                  size: int | None = None, mount_from: str | None = None,
                  chunk_size: int | None = None) -> upload.PushResult:
        """Upload a blob unless the repository has it already (or it can be mounted from
        ``mount_from``). ``source`` is bytes, a path, or a binary file; a non-seekable
        stream is sent in chunks with its digest computed on the way. ``chunk_size``
        forces chunked PATCH uploads. Returns the digest, size and what was done."""
        return upload.push_blob(self, repo, source, digest=digest, size=size,
                                mount_from=mount_from, chunk_size=chunk_size)

    def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        """Cross-repository mount; True if the registry mounted it."""
        return upload.mount_blob(self, repo, digest, from_repo)


def _position(body) -> int | None:
    """Where a seekable file body starts (to rewind it for a resend), else None."""
    try:
        if body is not None and not isinstance(body, bytes) and body.seekable():
            return body.tell()
    except (AttributeError, OSError):
        pass
    return None


def _content_range_start(value: str | None) -> int | None:
    # "bytes <first>-<last>/<total or *>"
    try:
        unit, _, rest = (value or "").partition(" ")
        return int(rest.split("-", 1)[0]) if unit == "bytes" else None
    except ValueError:
        return None
