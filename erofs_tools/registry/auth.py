"""Registry authentication: anonymous, HTTP Basic, and Bearer tokens (ecosystem.md §1.4).

The flow is driven by the registry: a request without usable credentials gets ``401``
with a ``WWW-Authenticate`` challenge. ``Basic`` means "send user:password on every
request"; ``Bearer realm=...,service=...,scope=...`` means "get a token from the realm
for these scopes and send it". Tokens are cached per (realm, service, scope) and renewed
shortly before they expire, or at once when the registry refuses one it issued (a token
can expire mid-run, or the clocks disagree).

Secrets never leave this module except inside an Authorization header: Credentials and
tokens have redacting reprs, and no message here contains a user name, password or token.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import AuthError

log = logging.getLogger(__name__)

# Default lifetime when the token reply omits expires_in (the token spec's default).
DEFAULT_TOKEN_LIFETIME = 60.0
# Renew this long before expiry (capped to a fraction of short lifetimes).
REFRESH_MARGIN = 20.0
MAX_TOKEN_REPLY = 1 << 20


@dataclass(frozen=True)
class Credentials:
    """A user name and password (or registry token used as a password), or an OAuth2
    refresh token (docker config.json ``identitytoken``) exchanged at the token realm."""

    username: str = field(repr=False)
    password: str = field(repr=False)
    identity_token: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return "Credentials(<redacted>)"

    __str__ = __repr__

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


# --- docker-style config.json -------------------------------------------------------


def docker_config_path() -> str:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``."""
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(base, "config.json")


def _auth_keys(host: str) -> list[str]:
    # config.json keys are written by many tools: bare hosts, URLs, Docker Hub's v1 URL.
    keys = [host, f"https://{host}", f"http://{host}", f"https://{host}/v1/",
            f"https://{host}/v2/", f"http://{host}/v1/", f"http://{host}/v2/"]
    if host in ("docker.io", "registry-1.docker.io", "index.docker.io"):
        keys += ["https://index.docker.io/v1/", "index.docker.io", "docker.io",
                 "registry-1.docker.io"]
    return keys


def decode_basic_auth(encoded: str) -> tuple[str, str] | None:
    """(user, password) of an ``auth`` value (base64 of user:password, as docker
    config files, containerd's CRI config and kubelet's pull secrets carry it), or None
    if it is not one. Trailing NULs of the password go, as docker and containerd drop
    them."""
    try:
        user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):  # binascii.Error is a ValueError
        return None
    if not sep or not user:
        return None
    return user, password.rstrip("\0")


def _entry_credentials(entry: dict, path: str) -> Credentials | None:
    if entry.get("identitytoken"):
        return Credentials(str(entry.get("username") or "<token>"), "",
                           str(entry["identitytoken"]))
    if entry.get("username") and entry.get("password") is not None:
        return Credentials(str(entry["username"]), str(entry["password"]))
    encoded = entry.get("auth")
    if not encoded:
        return None
    pair = decode_basic_auth(encoded)
    if pair is None:
        # Say which file is broken, never what it holds.
        raise AuthError(f"{path}: malformed 'auth' entry (expected base64 of user:password)")
    return Credentials(*pair)


def load_credentials(host: str, config_path: str | None = None) -> Credentials | None:
    """Credentials for ``host`` from a docker config.json, or None if it has none:
    a ``credHelpers`` entry for the host, else an ``auths`` entry, else ``credsStore``
    (the helper programs are ``docker-credential-<name>`` on PATH)."""
    path = config_path or docker_config_path()
    try:
        with open(path, "rb") as f:
            config = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise AuthError(f"{path}: cannot read docker config ({type(e).__name__})") from None
    if not isinstance(config, dict):
        return None
    helpers = config.get("credHelpers")
    if isinstance(helpers, dict):
        for key in _auth_keys(host):
            if isinstance(helpers.get(key), str):
                return _from_helper(helpers[key], key, path)
    auths = config.get("auths")
    if isinstance(auths, dict):
        for key in _auth_keys(host):
            entry = auths.get(key)
            if isinstance(entry, dict):
                creds = _entry_credentials(entry, path)
                if creds:
                    return creds
    if isinstance(config.get("credsStore"), str) and config["credsStore"]:
        return _from_helper(config["credsStore"], host, path)
    return None


def _from_helper(name: str, server: str, path: str) -> Credentials | None:
    """Ask ``docker-credential-<name> get`` (server on stdin, JSON on stdout)."""
    exe = shutil.which(f"docker-credential-{name}")
    if not exe or "/" in name:
        log.warning("%s: credential helper docker-credential-%s not found", path, name)
        return None
    try:
        out = subprocess.run([exe, "get"], input=server.encode(), capture_output=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AuthError(f"docker-credential-{name} failed ({type(e).__name__})") from None
    if out.returncode != 0:
        return None         # "credentials not found": go anonymous
    try:
        reply = json.loads(out.stdout)
        user, secret = str(reply["Username"]), str(reply["Secret"])
    except (ValueError, KeyError, TypeError):
        raise AuthError(f"docker-credential-{name} sent an unreadable answer") from None
    if user == "<token>":
        return Credentials(user, "", secret)
    return Credentials(user, secret)


# --- WWW-Authenticate -----------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    scheme: str          # lowercased: "basic" or "bearer"
    params: dict

    @property
    def scopes(self) -> list[str]:
        return self.params.get("scope", "").split()


_SCHEME_RE = re.compile(r"\s*,?\s*([A-Za-z][A-Za-z0-9_-]*)(?:\s+|$)")
_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a WWW-Authenticate value into challenges (one per auth scheme)."""
    out: list[Challenge] = []
    pos = 0
    while pos < len(header):
        m = _SCHEME_RE.match(header, pos)
        if not m:
            break
        scheme, pos = m.group(1).lower(), m.end()
        params: dict[str, str] = {}
        while pos < len(header):
            p = _PARAM_RE.match(header, pos)
            # A bare word not followed by '=' starts the next challenge.
            if not p:
                break
            value = p.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params[p.group(1).lower()] = value
            pos = p.end()
        out.append(Challenge(scheme, params))
    return out


# --- tokens and the authenticator ---------------------------------------------------


class _Token:
    __slots__ = ("value", "expires_at")

    def __init__(self, value: str, expires_at: float):
        self.value = value
        self.expires_at = expires_at

    def __repr__(self) -> str:
        return f"_Token(<redacted>, expires_at={self.expires_at:.0f})"


# fetch(method, url, headers, body) -> (status, body bytes); supplied by the client so
# that token requests share its pools, timeouts, TLS settings and retries.
Fetch = Callable[[str, str, dict, bytes | None], tuple[int, bytes]]


class Authenticator:
    """Per-registry auth state: which scheme the registry wants, and cached tokens."""

    def __init__(self, host: str, credentials: Credentials | None, fetch: Fetch,
                 allow_http_realm: bool = False, clock: Callable[[], float] = time.monotonic):
        self.host = host
        self.credentials = credentials
        self._fetch = fetch
        self._allow_http_realm = allow_http_realm
        self._clock = clock
        self._lock = threading.Lock()
        self._basic = False
        self._bearer: Challenge | None = None      # realm/service learned from challenges
        self._tokens: dict[tuple, _Token] = {}
        self.token_requests = 0                    # for tests and metrics

    def __repr__(self) -> str:
        mode = "basic" if self._basic else "bearer" if self._bearer else "anonymous"
        return f"Authenticator({self.host}, {mode})"

    def authorization(self, scope: str) -> str | None:
        """The Authorization header value to send for a request needing ``scope``, or
        None (anonymous). Fetches a token if the registry is known to want one."""
        if self._basic and self.credentials:
            return self.credentials.basic_header()
        if self._bearer is None:
            return None
        return "Bearer " + self._token(self._bearer, scope.split(), scope).value

    def on_unauthorized(self, header: str | None, scope: str, sent: str | None) -> None:
        """Handle a 401: learn the challenge and get fresh credentials for a retry, or
        raise AuthError when a retry cannot help."""
        challenges = {c.scheme: c for c in parse_challenges(header or "")}
        if "bearer" in challenges and challenges["bearer"].params.get("realm"):
            ch = challenges["bearer"]
            key = self._key(ch, scope)
            with self._lock:
                self._bearer = ch
                self._basic = False
                cached = self._tokens.get(key)
                # The token we sent is no good (expired or too narrow); one that another
                # thread fetched meanwhile is tried before asking for yet another.
                if cached and sent == "Bearer " + cached.value:
                    del self._tokens[key]
            self._token(ch, ch.scopes + scope.split(), scope)
            return
        if "basic" in challenges:
            if not self.credentials:
                raise AuthError(f"registry {self.host} requires authentication and no "
                                "credentials were found (docker config.json)")
            if sent and sent.startswith("Basic "):
                raise AuthError(f"registry {self.host} rejected the credentials")
            self._basic = True
            return
        if sent:
            raise AuthError(f"registry {self.host} refused the request's credentials")
        raise AuthError(f"registry {self.host} demands authentication with an unsupported "
                        "or missing WWW-Authenticate challenge")

    def _key(self, ch: Challenge, scope: str) -> tuple:
        return (ch.params.get("realm"), ch.params.get("service"), scope)

    def _token(self, ch: Challenge, scopes: list[str], scope: str) -> _Token:
        key = self._key(ch, scope)
        with self._lock:
            tok = self._tokens.get(key)
            if tok and self._clock() < tok.expires_at:
                return tok
            tok = self._request_token(ch, list(dict.fromkeys(s for s in scopes if s)))
            self._tokens[key] = tok
            return tok

    def _request_token(self, ch: Challenge, scopes: list[str]) -> _Token:
        realm = ch.params["realm"]
        parsed = urllib.parse.urlsplit(realm)
        where = f"token service {parsed.scheme}://{parsed.netloc}{parsed.path}"
        if parsed.scheme not in ("https", "http"):
            raise AuthError(f"registry {self.host}: unsupported token realm scheme "
                            f"{parsed.scheme!r}")
        if self.credentials and parsed.scheme == "http" and not self._allow_http_realm:
            raise AuthError(f"{where}: refusing to send credentials over plain HTTP "
                            "(use insecure mode for test registries)")
        self.token_requests += 1
        log.debug("requesting token from %s for %s", where, " ".join(scopes))
        if self.credentials and self.credentials.identity_token:
            status, body = self._oauth2_token(ch, realm, scopes,
                                              self.credentials.identity_token)
        else:
            status, body = self._basic_token(ch, realm, parsed, scopes)
        if status in (401, 403):
            raise AuthError(f"{where} refused the credentials for {self.host}"
                            if self.credentials else
                            f"{where} requires credentials for {self.host} and none were found")
        if status != 200:
            raise AuthError(f"{where} answered HTTP {status}")
        return self._parse_token_reply(body, where)

    def _basic_token(self, ch, realm, parsed, scopes) -> tuple[int, bytes]:
        """GET realm?service=&scope=..., with Basic credentials if we have them."""
        headers = {"Accept": "application/json"}
        if self.credentials:
            headers["Authorization"] = self.credentials.basic_header()
        query = [("service", ch.params["service"])] if ch.params.get("service") else []
        query += [("scope", s) for s in scopes]
        sep = "&" if parsed.query else "?"
        url = realm + (sep + urllib.parse.urlencode(query) if query else "")
        return self._fetch("GET", url, headers, None)

    def _oauth2_token(self, ch, realm, scopes, identity_token: str) -> tuple[int, bytes]:
        """POST an OAuth2 refresh_token grant (what docker does with identity tokens)."""
        form = {"grant_type": "refresh_token", "client_id": "erofs-tools",
                "refresh_token": identity_token,
                "service": ch.params.get("service", ""), "scope": " ".join(scopes)}
        headers = {"Accept": "application/json",
                   "Content-Type": "application/x-www-form-urlencoded"}
        return self._fetch("POST", realm, headers, urllib.parse.urlencode(form).encode())

    def _parse_token_reply(self, body: bytes, where: str) -> _Token:
        try:
            reply = json.loads(body[:MAX_TOKEN_REPLY])
            value = reply.get("token") or reply.get("access_token")
            lifetime = float(reply.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError):
            raise AuthError(f"{where} sent an unreadable token reply") from None
        if not isinstance(value, str) or not value:
            raise AuthError(f"{where} sent a reply without a token")
        if not lifetime > 0 or lifetime == float("inf"):
            # negative, NaN (Python's json reads it) or infinite: no lifetime we can
            # use; the default, as for a missing one (a token expired on arrival was
            # fetched again for every request, doubling them)
            lifetime = DEFAULT_TOKEN_LIFETIME
        margin = min(REFRESH_MARGIN, lifetime / 5)
        return _Token(value, self._clock() + max(lifetime - margin, 0.0))
