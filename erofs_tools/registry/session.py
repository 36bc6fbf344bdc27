"""RegistrySession: requests to one registry host, the plumbing under RegistryClient and
the upload protocol (upload.py), which both import it (so neither imports the other).

Every request to the registry goes through ``send``, which adds authorization and
answers 401s by running the challenge flow (auth.py), and through the Transport, which
retries transient failures. URLs the registry hands out (blob redirects to storage,
upload session locations) go through ``send_to``, which applies one rule to all of them:
the scheme must be HTTPS unless the registry itself is spoken to in plain HTTP, and the
registry's credentials go only to the registry's own origin (scheme, host, port), never
to another host.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.parse
from collections.abc import Callable
from typing import BinaryIO

import urllib3

from ..errors import AuthError, InputError, RegistryError
from .auth import Authenticator, Credentials, RedirectRefused, load_credentials
from .digest import check_digest
from .envproxy import EnvProxy
from .reference import Reference, check_repository
from .transport import (
    REDIRECT_STATUSES,
    RetryPolicy,
    Transport,
    body_deadline,
    drain,
    one_line,
    read_body,
    safe_url,
)

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
# a token realm's redirects: as many as Go's http.Client follows (containerd fetches
# tokens with it, without a CheckRedirect of its own)
TOKEN_MAX_REDIRECTS = 10
DEFAULT_CHUNK_SIZE = 16 << 20
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


class RegistrySession:
    """Authorized requests to one registry host (``host[:port]``). Thread-safe.

    ``insecure=True`` talks plain HTTP (test registries); otherwise HTTPS with
    certificate verification. ``credentials`` default to the docker config.json entry for
    the host (``docker_config`` names another config file; ``False`` disables the
    lookup). ``proxy`` is an HTTP proxy URL used for blob reads (e.g. dfdaemon), with a
    direct fallback when the proxy fails; ``proxy_headers`` go to the proxy only (e.g.
    ``{"X-Dragonfly-Use-P2P": "true"}``).

    An endpoint from a hosts directory (hosts.py) may also give: ``api_root`` (the
    path the distribution API answers under, "/v2" normally), ``namespace`` (the
    registry a mirror stands in for: blob and manifest requests carry ``?ns=``),
    ``headers`` (sent with every request to this host, never to other origins),
    ``extra_ca``, ``client_cert``, ``skip_verify`` (TLS).

    Every request goes the way the environment names (HTTPS_PROXY, HTTP_PROXY,
    NO_PROXY as Go reads them, envproxy.py) unless ``env_proxy`` gives other settings.
    """

    def __init__(self, host: str, *, insecure: bool = False,
                 credentials: Credentials | None = None,
                 docker_config: str | bool | None = None,
                 timeout: float = 30.0, connect_timeout: float = 10.0,
                 retries: int = 5, backoff: float = 0.5, max_backoff: float = 30.0,
                 deadline: float | None = None,
                 proxy: str | None = None, proxy_headers: dict | None = None,
                 pool_size: int = 8, ca_certs: str | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, api_root: str = "/v2",
                 namespace: str | None = None, headers: tuple[tuple[str, str], ...] = (),
                 extra_ca: tuple[str, ...] = (), client_cert: tuple[str, str] | None = None,
                 skip_verify: bool = False, env_proxy: EnvProxy | None = None):
        if not host or "/" in host:
            raise InputError(f"invalid registry host {host!r}")
        if not api_root.startswith("/") or "?" in api_root or "#" in api_root:
            raise InputError(f"invalid registry API path {api_root!r}")
        self.host = host
        self.insecure = insecure
        self.base = f"{'http' if insecure else 'https'}://{host}"
        self.api_root = api_root.rstrip("/")
        self._ns = "?" + urllib.parse.urlencode({"ns": namespace}) if namespace else ""
        self.headers = {k: v for k, v in headers}
        self.chunk_size = chunk_size
        if credentials is None and docker_config is not False:
            # a path, or None for the default one (True would be open()ed as fd 1)
            credentials = load_credentials(
                host, docker_config if isinstance(docker_config, str) and docker_config else None)
        self.transport = Transport(timeout=timeout, connect_timeout=connect_timeout,
                                   pool_size=pool_size, ca_certs=ca_certs, proxy=proxy,
                                   proxy_headers=proxy_headers, extra_ca=extra_ca,
                                   client_cert=client_cert, skip_verify=skip_verify,
                                   env_proxy=env_proxy, policy=RetryPolicy(retries, backoff, max_backoff, deadline))
        self.auth = Authenticator(host, credentials, self._fetch_token,
                                  allow_http_realm=insecure)
        # Other origins a redirect sends us to (registry.k8s.io's and cgr.dev's manifests
        # live on another registry, which wants an anonymous token of its own): each
        # runs its own challenge flow, without credentials, so the registry's never go
        # there.
        self._foreign: dict[tuple, Authenticator] = {}
        self._locations: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_reference(cls, ref: Reference, **kw):
        return cls(ref.api_host, **kw)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base})"

    def close(self) -> None:
        self.transport.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- request plumbing ---------------------------------------------------------

    def url(self, path: str) -> str:
        """The URL of an API path ("/v2/..."), under this host's API root."""
        if self.api_root != "/v2" and path.startswith("/v2"):
            path = self.api_root + path[3:]
        return self.base + path

    def pull_url(self, path: str) -> str:
        """url() for a read a mirror answers (blobs, manifests): with ?ns=."""
        return self.url(path) + self._ns

    def _fetch_token(self, method: str, url: str, headers: dict,
                     body: bytes | None) -> tuple[int, bytes]:
        """A request to the token realm, following its redirects as containerd's Go
        client does (at most TOKEN_MAX_REDIRECTS hops; 301/302 turn a POST and 303 any
        method into a bodiless GET, 307/308 resend it), each hop under the rule of
        checked_location. The credentials in it (Basic in Authorization, an OAuth2
        refresh token or password in a POST body) are for the realm's origin: a hop to
        another origin goes without Authorization (and no hop after it gets it back),
        and a body is never resent there (RedirectRefused: the Authenticator takes the
        realm for one without the POST endpoint and GETs the token)."""
        first, scoped = url, origin(url)
        headers = dict(headers)
        for hop in range(TOKEN_MAX_REDIRECTS + 1):
            resp = self.transport.request(method, url, headers, body)
            if resp.status not in REDIRECT_STATUSES:
                try:
                    # within the deadline: a realm trickling its reply holds every
                    # request waiting for the token
                    return resp.status, read_body(
                        resp, 1 << 20, body_deadline(self.transport.policy), url)
                finally:
                    drain(resp, 0)
            location = resp.headers.get("Location")
            drain(resp, 0)
            if hop == TOKEN_MAX_REDIRECTS:
                break
            target, _ = self.checked_location(method, url, location, "token redirect")
            if resp.status == 303 or (resp.status in (301, 302) and method == "POST"):
                method, body = "GET", None
                headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
            if origin(target) != scoped:
                if body is not None:
                    raise RedirectRefused(f"token service {safe_url(first)} redirected "
                                          f"a {method} carrying credentials to another "
                                          f"host ({safe_url(target)}); not sent there")
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url = target
        raise AuthError(f"token service {safe_url(first)}: more than "
                        f"{TOKEN_MAX_REDIRECTS} redirects")

    def send(self, method: str, url: str, scope: str, headers: dict | None = None,
             body: bytes | BinaryIO | None = None, *, via_proxy: bool = False,
             retry: bool = True) -> urllib3.BaseHTTPResponse:
        """Send to the registry with authorization; on 401 run the challenge flow and
        resend. Two rounds at most: the first 401 may just be discovery (we sent
        nothing), the second means the registry refused what it asked for (an expired
        token gets renewed once). ``url`` must be the registry's own (see send_to)."""
        return self._authorized(self.auth, method, url, scope,
                                {**self.headers, **(headers or {})}, body, via_proxy, retry)

    def _authorized(self, auth: Authenticator, method: str, url: str, scope: str,
                    headers: dict, body: bytes | BinaryIO | None, via_proxy: bool,
                    retry: bool) -> urllib3.BaseHTTPResponse:
        """send()'s challenge flow with ``auth``: the registry's own, or an anonymous one
        of another origin (send_to)."""
        rewind = _rewind_point(body)
        sent = auth.authorization(scope)
        for round_ in range(3):
            if sent:
                headers["Authorization"] = sent
            if round_ and rewind is not None:
                rewind[0].seek(rewind[1])
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
            auth.on_unauthorized(challenge, scope, sent)
            sent = auth.authorization(scope)
        raise AuthError(f"registry {auth.host}: access denied for "
                        f"{scope or 'the API'} ({method} {safe_url(url)})")

    def checked_location(self, method: str, url: str, location: str | None,
                         what: str = "redirect") -> tuple[str, bool]:
        """Resolve a Location the registry answered to ``method url``: (absolute URL,
        whether it is the registry's own origin). Refuses non-HTTP schemes and a
        downgrade to plain HTTP from an HTTPS registry: credentials, upload bodies and
        blob bytes would travel in clear text, or to whoever sits on the path."""
        if not location:
            raise RegistryError(f"{method} {safe_url(url)}: {what} without Location")
        target = urllib.parse.urljoin(url, location.strip())
        parts = urllib.parse.urlsplit(target)
        scheme = parts.scheme
        try:
            _ = parts.port      # a port out of range or not a number: a ValueError later
        except ValueError:
            raise RegistryError(f"{method} {safe_url(url)}: {what} to a malformed URL") \
                from None
        if scheme not in ("http", "https") or (scheme == "http" and not self.insecure):
            why = " (plain HTTP from an HTTPS registry)" if scheme == "http" else ""
            raise RegistryError(f"{method} {safe_url(url)}: refusing {what} to "
                                f"{safe_url(target)}{why}")
        return target, origin(target) == origin(self.base)

    def send_to(self, method: str, target: str, scope: str, headers: dict | None = None,
                body: bytes | BinaryIO | None = None, *, via_proxy: bool = False,
                retry: bool = True) -> urllib3.BaseHTTPResponse:
        """Send to a URL the registry handed out (checked by checked_location): with the
        registry's authorization at its own origin, without it anywhere else."""
        _, own = self.checked_location(method, target, target, "request")
        if own:
            return self.send(method, target, scope, headers, body, via_proxy=via_proxy,
                             retry=retry)
        headers = {k: v for k, v in (headers or {}).items() if k.lower() != "authorization"}
        return self._authorized(self._foreign_auth(target), method, target, scope, headers,
                                body, via_proxy, retry)

    def _foreign_auth(self, target: str) -> Authenticator:
        key = origin(target)
        with self._lock:
            auth = self._foreign.get(key)
            if auth is None:
                auth = self._foreign[key] = Authenticator(
                    f"{key[1]}:{key[2]}", None, self._fetch_token,
                    allow_http_realm=self.insecure)
            return auth

    def follow(self, method: str, url: str, scope: str, resp: urllib3.BaseHTTPResponse,
               headers: dict | None = None, *, via_proxy: bool = False,
               seen: Callable[[str], None] | None = None) -> urllib3.BaseHTTPResponse:
        """The answer at the end of the redirects ``resp`` starts (at most
        MAX_REDIRECTS), each hop under the rule of send_to; ``seen(target)`` is told
        every hop to another origin."""
        first = url
        for hop in range(MAX_REDIRECTS + 1):
            if resp.status not in REDIRECT_STATUSES:
                return resp
            if hop == MAX_REDIRECTS:
                break
            location = resp.headers.get("Location")
            drain(resp)
            target, own = self.checked_location(method, url, location)
            if not own and seen is not None:
                seen(target)
            resp = self.send_to(method, target, scope, headers, via_proxy=via_proxy)
            url = target
        drain(resp)
        raise RegistryError(f"{method} {safe_url(first)}: too many redirects")

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

    def found(self, method: str, url: str, resp: urllib3.BaseHTTPResponse) -> bool:
        """For HEAD-style checks: False on 404, True on 200 (body drained), else the
        registry's error."""
        if resp.status not in (200, 404):
            raise self.fail(method, url, resp)
        drain(resp)
        return resp.status == 200

    # --- API version check --------------------------------------------------------

    def ping(self) -> None:
        """GET /v2/: checks that the host speaks the distribution API and that our
        credentials (if the registry wants any) work."""
        url = self.url("/v2/")
        resp = self.send("GET", url, "")
        if resp.status != 200:
            raise self.fail("GET", url, resp, f"registry {self.host}")
        drain(resp)

    # --- blobs: requests (with redirects) and existence ---------------------------

    def blob_url(self, repo: str, digest: str) -> str:
        return self.pull_url(f"/v2/{check_repository(repo)}/blobs/{check_digest(digest)}")

    def _blob_request(self, method: str, repo: str, digest: str,
                      headers: dict | None = None) -> urllib3.BaseHTTPResponse:
        """GET/HEAD a blob, following redirects to storage, whose URL is remembered per
        blob so that later range reads go straight there."""
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

        def remember(target: str) -> None:
            # Another host (object storage): the registry's credentials stay here.
            with self._lock:
                self._locations[key] = target
        resp = self.send(method, url, pull_scope(repo), headers, via_proxy=proxy)
        return self.follow(method, url, pull_scope(repo), resp, headers, via_proxy=proxy,
                           seen=remember)

    def stat_blob(self, repo: str, digest: str) -> int | None:
        """The blob's size from HEAD, or None if the registry does not have it."""
        resp = self._blob_request("HEAD", repo, digest)
        url = self.blob_url(repo, digest)
        if not self.found("HEAD", url, resp):
            return None
        try:
            return int(resp.headers["Content-Length"])
        except (KeyError, ValueError):
            raise RegistryError(f"HEAD {safe_url(url)}: no Content-Length") from None

    def blob_exists(self, repo: str, digest: str) -> bool:
        return self.stat_blob(repo, digest) is not None


def _rewind_point(body: bytes | BinaryIO | None) -> tuple[BinaryIO, int] | None:
    """A seekable file body and where it starts (to rewind it for a resend), else None."""
    try:
        if body is not None and not isinstance(body, bytes) and body.seekable():
            return body, body.tell()
    except (AttributeError, OSError):
        pass
    return None
