"""Blob uploads (ecosystem.md §1.2): monolithic POST + PUT, chunked POST + PATCH... + PUT,
and cross-repository mounts (POST ?mount=&from=).

Before uploading a blob whose digest is known we ask HEAD whether the repository has it,
and if another repository is named, try to mount it from there: both save sending bytes
the registry already stores (converted images share most blobs).

Retrying inside an upload session is unsafe: distribution 2.8 cancels a session when a
PATCH or PUT arrives whose recorded offset differs from what it holds, which is exactly
what a resend after a lost answer looks like. So requests to a session are sent once,
and a failed upload from a seekable source starts over in a fresh session (after checking
whether the blob got committed after all). Streams cannot be rewound; their session
requests keep the transport's retries as the only chance.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO

from ..errors import AuthError, InputError, RegistryError
from .digest import check_digest, file_digest
from .reference import check_repository
from .session import DEFAULT_CHUNK_SIZE, RegistrySession, push_scope  # noqa: F401
from .transport import drain, safe_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushResult:
    digest: str
    size: int
    how: str        # "exists", "mounted" or "uploaded"


def _with_digest(location: str, digest: str) -> str:
    # The location may carry required query parameters: append, never replace.
    sep = "&" if urllib.parse.urlsplit(location).query else "?"
    return f"{location}{sep}digest={urllib.parse.quote(digest, safe=':')}"


def _location(client: RegistrySession, method: str, url: str, resp,
              default: str | None = None) -> str:
    """The upload session's next URL, under the rule for URLs the registry hands out
    (session.py): an HTTPS registry cannot send us, or the blob, to plain HTTP."""
    loc = resp.headers.get("Location") or default
    return client.checked_location(method, url, loc, "upload location")[0]


def start_upload(client: RegistrySession, repo: str, query: str = "",
                 scope: str | None = None) -> tuple[int, str, Mapping[str, str]]:
    """POST an upload session; returns (status, location, response headers)."""
    url = client.url(f"/v2/{check_repository(repo)}/blobs/uploads/") + query
    resp = client.send("POST", url, scope or push_scope(repo), {"Content-Length": "0"}, b"")
    if resp.status not in (201, 202):
        raise client.fail("POST", url, resp)
    drain(resp)
    # 201 (mounted): nothing more to send, the Location names the blob and is not used.
    location = _location(client, "POST", url, resp) if resp.status == 202 else ""
    return resp.status, location, resp.headers


def mount_blob(client: RegistrySession, repo: str, digest: str, from_repo: str) -> bool:
    status, location, _ = _mount(client, repo, digest, from_repo)
    if status == 202:
        _cancel(client, repo, location)
    return status == 201


def _mount(client, repo, digest, from_repo):
    query = "?" + urllib.parse.urlencode({"mount": check_digest(digest),
                                          "from": check_repository(from_repo)})
    # The registry needs pull on the source too; a token must carry both scopes.
    scope = f"{push_scope(repo)} repository:{from_repo}:pull"
    return start_upload(client, repo, query, scope)


def _cancel(client, repo: str, location: str) -> None:
    """Drop an upload session the registry opened when it could not mount."""
    resp = client.send_to("DELETE", location, push_scope(repo))
    drain(resp)


def finish_upload(client: RegistrySession, repo: str, location: str, digest: str,
                  body=b"", size: int = 0, retry: bool = False) -> None:
    url = _with_digest(location, digest)
    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
    resp = client.send_to("PUT", url, push_scope(repo), headers, body, retry=retry)
    if resp.status not in (201, 204):
        raise client.fail("PUT", url, resp, f"upload of {digest} to {repo}")
    drain(resp)
    stored = resp.headers.get("Docker-Content-Digest")
    if stored and stored != digest:
        raise RegistryError(f"upload of {digest} to {repo}: registry stored {stored}")


def _chunks(stream: BinaryIO, chunk_size: int):
    while True:
        chunk = stream.read(chunk_size)
        if not chunk:
            return
        # Short reads from pipes: fill the chunk so PATCHes have the size we promise.
        while len(chunk) < chunk_size:
            more = stream.read(chunk_size - len(chunk))
            if not more:
                break
            chunk += more
        yield chunk


def upload_chunked(client, repo: str, location: str, stream: BinaryIO, chunk_size: int,
                   min_chunk: int = 0, retry: bool = False) -> tuple[str, int, str]:
    """PATCH the stream in order; returns the digest and size computed on the way and
    the session's latest location, which the caller's PUT finishes."""
    h = hashlib.sha256()
    offset = 0
    chunk_size = max(chunk_size, min_chunk)
    for chunk in _chunks(stream, chunk_size):
        h.update(chunk)
        location = _patch(client, repo, location, chunk, offset, retry)
        offset += len(chunk)
    return "sha256:" + h.hexdigest(), offset, location


def _patch(client, repo: str, location: str, chunk: bytes, offset: int, retry: bool) -> str:
    end = offset + len(chunk) - 1
    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(chunk)),
               "Content-Range": f"{offset}-{end}"}
    resp = client.send_to("PATCH", location, push_scope(repo), headers, chunk, retry=retry)
    if resp.status != 202:
        raise client.fail("PATCH", location, resp, f"chunk {offset}-{end}")
    drain(resp)
    got = _range_end(resp.headers.get("Range"))
    if got is not None and got != end:
        raise RegistryError(f"PATCH {safe_url(location)}: registry has bytes 0-{got}, "
                            f"sent up to {end}")
    return _location(client, "PATCH", location, resp, location)


def _range_end(value: str | None) -> int | None:
    m = re.fullmatch(r"(?:bytes=)?0-(\d+)", (value or "").strip())
    return int(m.group(1)) if m else None


def push_blob(client: RegistrySession, repo: str, source, *, digest: str | None = None,
              size: int | None = None, mount_from: str | None = None,
              chunk_size: int | None = None) -> PushResult:
    """See RegistryClient.push_blob."""
    if digest is not None:
        check_digest(digest)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return _push_seekable(client, repo, io.BytesIO(data), digest, len(data),
                              mount_from, chunk_size)
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return _push_seekable(client, repo, f, digest, os.fstat(f.fileno()).st_size,
                                  mount_from, chunk_size)
    if _is_seekable(source):
        start = source.tell()
        total = source.seek(0, os.SEEK_END) - start
        source.seek(start)
        return _push_seekable(client, repo, source, digest, total, mount_from, chunk_size)
    return _push_stream(client, repo, source, digest, size, mount_from, chunk_size)


def _is_seekable(f) -> bool:
    try:
        return f.seekable()
    except (AttributeError, OSError):
        return False


def _push_seekable(client, repo, f: BinaryIO, digest, size, mount_from, chunk_size):
    start = f.tell()
    if digest is None:
        digest, size = file_digest(f)
    session = _skip_or_start(client, repo, digest, size, mount_from)
    if isinstance(session, PushResult):
        return session
    policy = client.transport.policy
    for attempt in range(policy.retries + 1):
        f.seek(start)
        try:
            _send_seekable(client, repo, session, f, digest, size, chunk_size)
            break
        except AuthError:
            raise
        except RegistryError as e:
            # The answer may have been lost after the blob was committed.
            if client.stat_blob(repo, digest) is not None:
                break
            if attempt == policy.retries or not _restartable(e):
                raise
            log.info("upload of %s to %s failed (%s); new session", digest, repo, e)
            time.sleep(policy.delay(attempt))
            _, location, headers = start_upload(client, repo)
            session = location, _int(headers.get("OCI-Chunk-Min-Length"))
    log.info("uploaded %s (%d bytes) to %s", digest, size, repo)
    return PushResult(digest, size, "uploaded")


# Answers after which a new session may succeed: the session is gone or confused, or
# the registry failed. Others (a digest or size the registry refuses) would fail again.
_SESSION_CODES = frozenset({"BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "RANGE_INVALID"})


def _restartable(e: RegistryError) -> bool:
    status = getattr(e, "status", None)
    if status is None or status >= 500 or status in (404, 416):
        return True     # connection failures and retries spent carry no status
    return bool(_SESSION_CODES & set(getattr(e, "codes", ())))


def _send_seekable(client, repo, session, f, digest, size, chunk_size) -> None:
    location, min_chunk = session
    if chunk_size:
        got, n, location = upload_chunked(client, repo, location, f, chunk_size, min_chunk)
        _check(digest, got, size, n)
        finish_upload(client, repo, location, digest)
    else:
        # The PUT body is the open file, streamed with its Content-Length.
        finish_upload(client, repo, location, digest, f, size)


def _push_stream(client, repo, stream, digest, size, mount_from, chunk_size):
    if digest is not None:
        early = _skip_or_start(client, repo, digest, size, mount_from)
        if isinstance(early, PushResult):
            return early
        location, min_chunk = early
    else:
        _, location, headers = start_upload(client, repo)
        min_chunk = _int(headers.get("OCI-Chunk-Min-Length"))
    got, n, location = upload_chunked(client, repo, location, stream,
                                      chunk_size or client.chunk_size, min_chunk, retry=True)
    if digest is not None:
        _check(digest, got, size, n)
    elif size is not None and size != n:
        raise InputError(f"blob stream: expected {size} bytes, read {n}")
    finish_upload(client, repo, location, got, retry=True)
    return PushResult(got, n, "uploaded")


def _check(expected: str, got: str, size, n: int) -> None:
    if got != expected or (size is not None and size != n):
        raise InputError(f"blob source changed while uploading: expected {expected}, "
                         f"read {got} ({n} bytes)")


def _skip_or_start(client, repo, digest, size, mount_from):
    """HEAD, then mount, then open an upload session: returns a PushResult when nothing
    needs sending, else (upload location, minimum chunk length)."""
    existing = client.stat_blob(repo, digest)
    if existing is not None:
        # The size we know (the source's) goes into the manifest, not the one the HEAD
        # declares: a registry or a CDN answering HEAD with Content-Length 0, or a wrong
        # one, made a manifest whose layer no runtime can pull.
        return PushResult(digest, size if size is not None else existing, "exists")
    if mount_from and mount_from != repo:
        status, location, headers = _mount(client, repo, digest, mount_from)
        if status == 201:
            log.info("mounted %s from %s into %s", digest, mount_from, repo)
            return PushResult(digest, size if size is not None else -1, "mounted")
        # 202: the registry opened an ordinary upload session instead.
        return location, _int(headers.get("OCI-Chunk-Min-Length"))
    _, location, headers = start_upload(client, repo)
    return location, _int(headers.get("OCI-Chunk-Min-Length"))


def _int(value) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0
