"""RegistryClient: the OCI distribution API (ecosystem.md §1) for one registry host.

Reads: blob existence and size (HEAD), whole blobs verified against their digest (to
memory or streamed to a file), byte ranges of blobs (the daemon's lazy reads), manifests
and indexes (digest-verified). Writes: blob uploads (upload.py), manifests.

Request plumbing (authorization, the 401 challenge flow, redirects to storage and the
rule for URLs the registry hands out) is RegistrySession's (session.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from typing import BinaryIO

from urllib3.exceptions import HTTPError as Urllib3Error

from ..errors import CorruptImageError, InputError, RegistryError
from ..fsutil import atomic_output
from . import mediatypes as mt
from . import upload
from .digest import check_digest, verify
from .manifest import MAX_MANIFEST_SIZE, Manifest, media_type_of
from .reference import check_ref, check_repository
from .session import DEFAULT_CHUNK_SIZE, RegistrySession, origin, pull_scope, push_scope  # noqa: F401
from .transport import body_deadline, drain, in_time, read_body, safe_url

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20
# pages of a tag list followed at most (a registry's endless next links end here)
MAX_TAG_PAGES = 1000
# all pages of a tag list together (a repository of 10^6 tags is ~40 MB): each page may be
# up to MAX_MANIFEST_SIZE, and 1000 of them held 4 GB
MAX_TAG_BYTES = 64 << 20
# Download pieces: a broken connection loses at most one piece before resuming.
STREAM_PIECE = 64 << 10


class RegistryClient(RegistrySession):
    """A client for one registry host (``host[:port]``); see RegistrySession for the
    constructor's arguments. Thread-safe: the daemon shares one client between worker
    threads."""

    # --- whole blobs and ranges ---------------------------------------------------

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
        with atomic_output(os.fspath(path)) as f:
            return self.stream_blob(repo, digest, f, max_size)

    def stream_blob(self, repo: str, digest: str, f: BinaryIO,
                    max_size: int | None = None) -> int:
        """Write a whole blob into the open file ``f`` and check its digest (the caller
        discards ``f`` on an error). Returns the size."""
        h = hashlib.sha256()
        size = self._download(repo, digest, h, f.write, max_size)
        verify(digest, "sha256:" + h.hexdigest(), f"blob {digest}")
        return size

    def read_blob(self, repo: str, digest: str, sink, max_size: int | None = None) -> int:
        """The whole blob into ``sink(piece)`` through one GET (resumed with Range if the
        connection breaks), like read_blob_range NOT digest-verified: for a caller that
        hashes what it reads (convert's layer reader). Returns the size."""
        return self._download(repo, digest, _NO_HASH, sink, max_size)

    def _download(self, repo: str, digest: str, h, sink, max_size: int | None) -> int:
        """Stream a blob into ``sink`` and ``h``; a connection that breaks mid-body is
        resumed with a Range request from the bytes already received (from a server
        that ignores Range, by skipping what we hold in its whole answer)."""
        url = self.blob_url(repo, digest)
        policy = self.transport.policy
        until = body_deadline(policy)
        done = 0
        for attempt in range(policy.retries + 1):
            headers = {"Range": f"bytes={done}-"} if done else {}
            resp = self._blob_request("GET", repo, digest, headers)
            try:
                if resp.status == 206 and done:
                    _check_range_start(resp, url, done)
                elif resp.status == 200:
                    _skip(resp, done, until, url)
                else:
                    raise self.fail("GET", url, resp)
                for chunk in _pieces(resp, STREAM_PIECE, until, url):
                    done += len(chunk)
                    if max_size is not None and done > max_size:
                        resp.close()
                        raise CorruptImageError(f"blob {digest}: larger than {max_size} "
                                                "bytes")
                    h.update(chunk)
                    try:
                        sink(chunk)
                    except BaseException:
                        resp.close()        # the sink gave up: drop the rest
                        raise
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
        until = body_deadline(policy)
        for attempt in range(policy.retries + 1):
            resp = self._blob_request("GET", repo, digest, headers)
            try:
                return self._range_body(resp, url, offset, length, until)
            except Urllib3Error as e:
                resp.close()
                wait = policy.delay(attempt)
                if policy.out_of_time(started, wait):
                    break
                log.info("GET %s range broke (%s), retrying", safe_url(url), type(e).__name__)
                self.transport.retried += 1
                time.sleep(wait)
        raise RegistryError(f"GET {safe_url(url)}: connection kept breaking")

    def _range_body(self, resp, url: str, offset: int, length: int,
                    until: float | None = None) -> bytes:
        if resp.status == 206:
            _check_range_start(resp, url, offset)
            data = read_body(resp, length + 1, until, url)
            if len(data) > length:
                resp.close()
                raise RegistryError(f"GET {safe_url(url)}: answered more bytes than asked")
        elif resp.status == 200:
            # The server ignored Range (a cold pull-through mirror answers with the whole
            # blob): take the asked bytes out of the stream, in bounded pieces, and drop
            # the connection with the rest of the body unread.
            _skip(resp, offset, until, url)
            data = read_body(resp, length, until, url)
            if resp.length_remaining != 0:
                resp.close()
                return data
        elif resp.status == 416:
            drain(resp)
            raise RegistryError(f"GET {safe_url(url)}: range {offset}+{length} is beyond "
                                "the blob's end")
        else:
            raise self.fail("GET", url, resp)
        resp.release_conn()
        return data

    def delete_blob(self, repo: str, digest: str) -> None:
        url = self.blob_url(repo, digest)
        resp = self.send("DELETE", url, push_scope(repo))
        if resp.status not in (200, 202):
            raise self.fail("DELETE", url, resp)
        drain(resp)

    # --- manifests and indexes -------------------------------------------------------

    def manifest_url(self, repo: str, ref: str) -> str:
        return self.pull_url(f"/v2/{check_repository(repo)}/manifests/{check_ref(ref)}")

    def get_manifest(self, repo: str, ref: str,
                     accept: tuple[str, ...] = mt.ALL_MANIFEST_TYPES) -> Manifest:
        """Fetch a manifest or index by tag or digest. A digest reference is verified
        against the bytes; a tag is checked against Docker-Content-Digest if sent."""
        url = self.manifest_url(repo, ref)
        resp = self._manifest_request("GET", url, repo, accept)
        if resp.status != 200:
            raise self.fail("GET", url, resp)
        # within the daemon's deadline: a trickled manifest would hold its image's
        # warm(), and every read waiting for the blob map with it
        data = read_body(resp, MAX_MANIFEST_SIZE + 1, body_deadline(self.transport.policy),
                         url)
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

    def _manifest_request(self, method: str, url: str, repo: str, accept: tuple[str, ...]):
        # Redirects are followed as containerd and skopeo do: registry.k8s.io and
        # cgr.dev answer every manifest request with a 307 to the registry that holds
        # it (which wants its own anonymous token). The bytes are checked as ever (a
        # digest reference, Docker-Content-Digest); the credentials stay at our origin.
        headers = {"Accept": ", ".join(accept)}
        resp = self.send(method, url, pull_scope(repo), headers)
        return self.follow(method, url, pull_scope(repo), resp, headers)

    def head_manifest(self, repo: str, ref: str,
                      accept: tuple[str, ...] = mt.ALL_MANIFEST_TYPES) -> str | None:
        """The digest of a tag or digest reference, or None if it does not exist."""
        url = self.manifest_url(repo, ref)
        resp = self._manifest_request("HEAD", url, repo, accept)
        if not self.found("HEAD", url, resp):
            return None
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
        resp = self.send("PUT", url, push_scope(repo), {"Content-Type": manifest.media_type},
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
        resp = self.send("DELETE", url, push_scope(repo))
        if resp.status not in (200, 202):
            raise self.fail("DELETE", url, resp)
        drain(resp)

    def list_tags(self, repo: str) -> list[str]:
        """Every tag of the repository. Registries page the list (distribution with
        ?n=, ghcr.io, ECR, Harbor): the next page is named by a ``Link: <...>;
        rel="next"`` header, followed (at most MAX_TAG_PAGES, each under the rule of
        send_to), as containerd and skopeo do; the first page alone was all we gave."""
        url = self.url(f"/v2/{check_repository(repo)}/tags/list")
        first = url
        tags: list[str] = []
        seen = {url}
        total = 0
        for _ in range(MAX_TAG_PAGES):
            resp = self.send_to("GET", url, pull_scope(repo))
            if resp.status != 200:
                raise self.fail("GET", url, resp)
            body = read_body(resp, MAX_MANIFEST_SIZE + 1, body_deadline(self.transport.policy),
                             url)
            link = resp.headers.get("Link")
            drain(resp)
            total += len(body)
            if total > MAX_TAG_BYTES:
                raise RegistryError(f"GET {safe_url(first)}: tag list larger than "
                                    f"{MAX_TAG_BYTES} bytes")
            try:
                got = json.loads(body).get("tags") or []
                if not isinstance(got, list) or not all(isinstance(t, str) for t in got):
                    raise TypeError
            except (ValueError, AttributeError, TypeError):
                raise RegistryError(f"GET {safe_url(url)}: unreadable tag list") from None
            tags += got
            nxt = _next_link(link)
            if nxt is None:
                return tags
            url = self.checked_location("GET", url, nxt, "next page")[0]
            if url in seen:     # a page naming itself or an earlier one: no end
                raise RegistryError(f"GET {safe_url(first)}: the tag pages loop")
            seen.add(url)
        raise RegistryError(f"GET {safe_url(first)}: more than {MAX_TAG_PAGES} pages of tags")

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


class _NoHash:
    def update(self, data: bytes) -> None:
        pass


_NO_HASH = _NoHash()


def _check_range_start(resp, url: str, offset: int) -> None:
    start = _content_range_start(resp.headers.get("Content-Range"))
    if start != offset:
        drain(resp)
        raise RegistryError(f"GET {safe_url(url)}: answered range starting at {start}, "
                            f"asked {offset}")


def _pieces(resp, size: int, until: float | None, url: str):
    """The body in pieces of at most ``size`` bytes. With a deadline (the daemon's), a
    piece is what has arrived (read1) and the clock is checked between pieces: the read
    timeout bounds one wait for bytes, not a body trickled a byte per wait, which would
    hold the daemon's reader (and the kernel's request) for hours."""
    if until is None:
        yield from resp.stream(size)
        return
    while True:
        in_time(resp, until, url)
        piece = resp.read1(size)
        if not piece:
            return
        yield piece


def _skip(resp, n: int, until: float | None = None, url: str = "") -> None:
    """Read and drop the first ``n`` bytes of a body, one bounded piece at a time."""
    while n:
        got = read_body(resp, min(n, READ_SIZE), until, url)
        if not got:
            return          # the blob ends before n: the caller sees a short answer
        n -= len(got)


def _next_link(value: str | None) -> str | None:
    """The URL of a ``Link`` header's rel="next" entry, or None."""
    for part in (value or "").split(","):
        m = re.match(r'\s*<([^>]*)>\s*;(.*)$', part)
        if m and re.search(r'(?:^|;)\s*rel\s*=\s*"?next"?\s*(?:;|$)', m.group(2)):
            return m.group(1)
    return None


def _content_range_start(value: str | None) -> int | None:
    # "bytes <first>-<last>/<total or *>"
    try:
        unit, _, rest = (value or "").partition(" ")
        return int(rest.split("-", 1)[0]) if unit == "bytes" else None
    except ValueError:
        return None
