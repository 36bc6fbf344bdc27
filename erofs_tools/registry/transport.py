"""HTTP plumbing under the registry client: pooled urllib3 connections, timeouts, and
bounded retries with exponential backoff and jitter.

What is retried: 429 and 5xx answers (honouring Retry-After) and connection failures
(refused, reset, timed out, closed mid-answer). What is not: TLS verification failures and
every other status, which the caller interprets. A request body must be bytes or a
seekable file (rewound before each attempt), so that a retry resends the same bytes.

An optional HTTP proxy (e.g. Dragonfly's dfdaemon, ecosystem.md §3, or squid) serves the
requests that ask for it; if the proxy itself fails (no connection, or an answer that is
the proxy's own error: see proxy_failed), the request goes direct, as nydus does.
"Direct" is the way the environment names (HTTPS_PROXY, HTTP_PROXY, NO_PROXY, read as
Go reads them: envproxy.py), as containerd's pulls go: without a fallback, since a
network that names a proxy may have no other way out.
"""

from __future__ import annotations

import base64
import email.utils
import logging
import random
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeGuard

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import SSLError

from ..errors import RegistryError
from . import watchdog
from .envproxy import EnvProxy

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "erofs-tools/0.1"
# After the proxy fails, go direct for this long before trying it again (a dead proxy
# would otherwise cost a failed connection on every request).
PROXY_PAUSE = 10.0
# read_body's largest piece
BODY_PIECE = 1 << 20


def safe_url(url: str) -> str:
    """The URL without its query and userinfo, fit for messages and logs: upload
    locations and storage redirects carry state and signatures in the query."""
    p = urllib.parse.urlsplit(url)
    netloc = p.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((p.scheme, netloc, p.path, "", ""))


def one_line(text: str, limit: int = 200) -> str:
    return " ".join(text.split())[:limit]


@dataclass
class RetryPolicy:
    """``retries`` extra attempts; the n-th waits a random time in
    [0, min(max_backoff, backoff * 2**n)] ("full jitter", so that many clients hitting
    one overloaded registry spread out), or what Retry-After asks, capped.
    ``deadline`` (seconds, optional) bounds one request across all its attempts: no
    retry starts whose wait would end past it (the daemon sets it so a reader stuck on a
    dead registry gets EIO in bounded time)."""

    retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 30.0
    deadline: float | None = None

    def out_of_time(self, started: float, wait: float) -> bool:
        return self.deadline is not None and time.monotonic() - started + wait > self.deadline

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        asked = parse_retry_after(retry_after)
        if asked is not None:
            return min(asked, self.max_backoff)
        return random.uniform(0, min(self.max_backoff, self.backoff * (2 ** attempt)))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), None if absent."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Transport:
    """Sends one logical request, retrying transient failures. Responses are returned
    unread (``preload_content=False``); callers read and release them."""

    def __init__(self, *, timeout: float = 30.0, connect_timeout: float = 10.0,
                 pool_size: int = 8, ca_certs: str | None = None,
                 policy: RetryPolicy | None = None, proxy: str | None = None,
                 proxy_headers: dict | None = None, user_agent: str = USER_AGENT,
                 extra_ca: tuple[str, ...] = (), client_cert: tuple[str, str] | None = None,
                 skip_verify: bool = False, env_proxy: EnvProxy | None = None):
        self.policy = policy or RetryPolicy()
        self.user_agent = user_agent
        common: dict[str, Any] = dict(timeout=urllib3.Timeout(connect=connect_timeout, read=timeout),
                      retries=False, maxsize=pool_size, block=False,
                      cert_reqs="CERT_REQUIRED", ca_certs=ca_certs)
        if extra_ca or client_cert or skip_verify:
            # a hosts.toml endpoint: its CA files on top of the system's, a client
            # certificate, or no verification at all (skip_verify)
            common.pop("ca_certs")
            common["ssl_context"] = _tls_context(ca_certs, extra_ca, client_cert, skip_verify)
            if skip_verify:
                common.update(cert_reqs="CERT_NONE", assert_hostname=False)
        self._direct = urllib3.PoolManager(num_pools=8, **common)
        # the environment's proxies (HTTPS_PROXY...), one manager each, made when needed
        self._env = env_proxy if env_proxy is not None else EnvProxy()
        self._env_pools: dict[str, urllib3.ProxyManager] = {}
        self._common = common
        # Sent to the proxy, e.g. {"X-Dragonfly-Use-P2P": "true"}: on the CONNECT that
        # opens a tunnel to an HTTPS origin, on the request itself to an HTTP one.
        self.proxy_headers = dict(proxy_headers or {})
        # Configured per client, never globally, and with a direct pool to fall back on.
        self._proxy = None
        if proxy:
            proxy, to_proxy = _proxy_auth(proxy, self.proxy_headers)
            self._proxy = urllib3.ProxyManager(proxy, num_pools=8, proxy_headers=to_proxy,
                                               **common)
        # Inside a tunnel the origin reads the request: the proxy's own headers
        # (Proxy-Authorization) never go there. Others do too, for a proxy that opens
        # the tunnel to read the requests (dfdaemon hijacking HTTPS).
        self._tunnel_headers = {k: v for k, v in self.proxy_headers.items()
                                if not k.lower().startswith("proxy-")}
        # connections whose wait for an answer's headers a deadline bounds (watchdog.py)
        for pm in (self._direct, self._proxy):
            if pm is not None:
                pm.pool_classes_by_scheme = watchdog.POOL_CLASSES
        self._env_lock = threading.Lock()
        self.proxy_fallbacks = 0
        self.last_proxy_error: str | None = None    # why the last fallback happened
        self._proxy_down_until = 0.0
        self.retried = 0

    def close(self) -> None:
        self._direct.clear()
        if self._proxy:
            self._proxy.clear()
        for pm in self._env_pools.values():
            pm.clear()

    def _route(self, url: str) -> urllib3.PoolManager:
        """The direct way to ``url``: the environment's proxy for it, or none."""
        proxy = self._env.proxy_for(url)
        if proxy is None:
            return self._direct
        with self._env_lock:
            pm = self._env_pools.get(proxy)
            if pm is None:
                bare, to_proxy = _proxy_auth(proxy, {})
                pm = self._env_pools[proxy] = urllib3.ProxyManager(
                    bare, num_pools=8, proxy_headers=to_proxy, **self._common)
                pm.pool_classes_by_scheme = watchdog.POOL_CLASSES
            return pm

    def request(self, method: str, url: str, headers: dict | None = None,
                body: bytes | BinaryIO | None = None, *, via_proxy: bool = False,
                retry: bool = True) -> urllib3.BaseHTTPResponse:
        """Send ``method url`` and return the first non-retryable response, or raise
        RegistryError once the retries are spent."""
        headers = {"User-Agent": self.user_agent, **(headers or {})}
        rewind = body if _seekable(body) else None
        start = rewind.tell() if rewind is not None else None
        attempts = self.policy.retries + 1 if retry else 1
        started = time.monotonic()
        # the answer's headers bounded too (a read timeout bounds one read only)
        prev = watchdog.set_deadline(None if self.policy.deadline is None
                                     else started + self.policy.deadline)
        try:
            return self._attempts(method, url, headers, body, via_proxy, attempts,
                                  rewind, start, started)
        finally:
            watchdog.set_deadline(prev)

    def _attempts(self, method, url, headers, body, via_proxy, attempts, rewind, start,
                  started) -> urllib3.BaseHTTPResponse:
        last = ""
        for attempt in range(attempts):
            if attempt:
                self.retried += 1
            if rewind is not None and start is not None:
                rewind.seek(start)
            resp: urllib3.BaseHTTPResponse | None
            try:
                resp = self._send(method, url, headers, body, via_proxy)
            except Urllib3Error as e:
                if watchdog.fired():    # our deadline shut the socket, not the peer
                    raise _headers_late(method, url) from None
                if isinstance(e, SSLError):
                    raise _tls_error(method, url, e) from None
                last = f"connection failed ({type(e).__name__})"
                wait = self.policy.delay(attempt)
                resp = None
            if resp is not None and watchdog.fired():
                # the headers cut short by our deadline read as complete (an end of
                # stream ends them): not an answer
                resp.close()
                raise _headers_late(method, url)
            if resp is not None:
                if resp.status not in RETRY_STATUSES:
                    return resp
                last = f"HTTP {resp.status}"
                wait = self.policy.delay(attempt, resp.headers.get("Retry-After"))
                drain(resp)
            if body is not None and start is None and not isinstance(body, bytes):
                break       # a consumed stream cannot be sent again
            if self.policy.out_of_time(started, wait):
                last += ", out of time"
                break
            if attempt + 1 < attempts:
                log.debug("%s %s: %s, retry %d in %.2fs", method, safe_url(url), last,
                          attempt + 1, wait)
                time.sleep(wait)
        raise RegistryError(f"{method} {safe_url(url)}: {last} (after {attempt + 1} attempts)")

    def _send(self, method, url, headers, body, via_proxy):
        # via_proxy is for bodiless reads only, so falling back never resends a body.
        kw = dict(headers=headers, body=body, redirect=False, preload_content=False)
        if via_proxy and self._proxy is not None and time.monotonic() >= self._proxy_down_until:
            # tunnelled to an HTTPS origin: urllib3 puts the proxy's on the CONNECT
            via = {**kw, "headers": {**headers, **self._tunnel_headers}} \
                if url.startswith("https:") else kw
            try:
                resp = self._proxy.request(method, url, **via)
            except Urllib3Error as e:
                self.last_proxy_error = f"{type(e).__name__}: {e}"
                log.info("proxy failed for %s (%s); going direct", safe_url(url),
                         type(e).__name__)
            else:
                if not proxy_failed(resp):
                    return resp
                drain(resp)
                self.last_proxy_error = f"HTTP {resp.status}"
                log.info("proxy answered %d for %s; going direct", resp.status, safe_url(url))
            self.proxy_fallbacks += 1
            self._proxy_down_until = time.monotonic() + PROXY_PAUSE
        return self._route(url).request(method, url, **kw)


def _proxy_auth(proxy: str, headers: dict) -> tuple[str, dict]:
    """The proxy URL without its userinfo, and the headers for the proxy with a Basic
    Proxy-Authorization of that userinfo (as curl and Go send it): urllib3 drops a
    proxy URL's userinfo, so an authenticating proxy answered 407 and every read went
    direct."""
    p = urllib.parse.urlsplit(proxy)
    if "@" not in p.netloc:
        return proxy, dict(headers)
    userinfo, _, hostport = p.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    raw = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()
    auth = {"Proxy-Authorization": "Basic " + base64.b64encode(raw).decode("ascii")}
    bare = urllib.parse.urlunsplit((p.scheme, hostport, p.path, p.query, p.fragment))
    return bare, {**headers, **auth}


def _headers_late(method: str, url: str) -> RegistryError:
    # the same words as a read timeout cut to the deadline: either may end the wait first
    return RegistryError(f"{method} {safe_url(url)}: timed out waiting for the answer's "
                         "headers, out of time (the deadline)")


def _tls_error(method: str, url: str, e: SSLError) -> RegistryError:
    reason = one_line(str(getattr(e, "reason", None) or e))
    # A handshake answered by something that is not TLS: most likely a plain-HTTP
    # registry. Say what to do instead of OpenSSL's words only.
    hint = "" if "certificate" in reason else " (a plain-HTTP registry? pass --insecure)"
    return RegistryError(f"{method} {safe_url(url)}: TLS error: {reason}{hint}")


def _tls_context(ca_certs: str | None, extra_ca: tuple[str, ...],
                 client_cert: tuple[str, str] | None, skip_verify: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_certs)
    try:
        for f in extra_ca:
            ctx.load_verify_locations(cafile=f)
        if client_cert:
            ctx.load_cert_chain(client_cert[0], client_cert[1] or None)
    except (OSError, ssl.SSLError) as e:
        what = getattr(e, "filename", None) or (extra_ca + tuple(client_cert or ()))[0]
        raise RegistryError(f"{what}: cannot load TLS file: "
                            f"{one_line(getattr(e, 'strerror', None) or str(e))}") from None
    if skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def proxy_failed(resp: urllib3.BaseHTTPResponse) -> bool:
    """Whether an answer through the proxy is the proxy's own failure, not the
    registry's (or storage's) answer passed on: then the request goes direct.

    - dfdaemon marks its errors (``X-Dragonfly-Error-Type: proxy``), squid its error
      pages (``X-Squid-Error``, e.g. Debian's stock configuration denying loopback with
      403, or 502/503 when it cannot connect);
    - 407: the proxy wants credentials we do not have;
    - 502/503/504 without the distribution API's header: a gateway error of some other
      proxy that could not reach the registry (a registry's own 5xx carries the header
      and is retried as usual).
    A 403 or 404 without a proxy's mark is the registry's or storage's answer (an expired
    signed URL is re-resolved by the client).
    """
    h = resp.headers
    if h.get("X-Dragonfly-Error-Type") == "proxy" or h.get("X-Squid-Error"):
        return True
    if resp.status == 407:
        return True
    return resp.status in (502, 503, 504) and not h.get("Docker-Distribution-Api-Version")


def _seekable(body: bytes | BinaryIO | None) -> TypeGuard[BinaryIO]:
    try:
        return body is not None and not isinstance(body, bytes) and body.seekable()
    except (AttributeError, OSError):
        return False


def drain(resp: urllib3.BaseHTTPResponse, limit: int = 1 << 16) -> bytes:
    """Read a small body (errors, JSON) and give the connection back to the pool; a
    connection with a large unread body is closed rather than drained."""
    try:
        data = resp.read(limit)
        remaining = resp.length_remaining
        if remaining is not None and remaining > limit:
            resp.close()
        else:
            resp.drain_conn()
        return data
    except Urllib3Error:
        resp.close()
        return b""
    finally:
        resp.release_conn()


def body_deadline(policy: RetryPolicy) -> float | None:
    """When a body read must be over: the policy's deadline from now, or None."""
    return None if policy.deadline is None else time.monotonic() + policy.deadline


def in_time(resp: urllib3.BaseHTTPResponse, until: float, url: str) -> None:
    if time.monotonic() > until:
        resp.close()
        raise RegistryError(f"{safe_url(url)}: answer still arriving at the deadline")


def read_body(resp: urllib3.BaseHTTPResponse, n: int, until: float | None, url: str) -> bytes:
    """Up to ``n`` bytes of the body (fewer at its end), within the deadline."""
    if until is None:
        return resp.read(n)
    parts: list[bytes] = []
    got = 0
    while got < n:
        in_time(resp, until, url)
        piece = resp.read1(min(n - got, BODY_PIECE))
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)
