"""Registry authentication: anonymous, HTTP Basic, and Bearer tokens (ecosystem.md §1.4).

The flow is driven by the registry: a request without usable credentials gets ``401``
with a ``WWW-Authenticate`` challenge. ``Basic`` means "send user:password on every
request"; ``Bearer realm=...,service=...,scope=...`` means "get a token from the realm
for these scopes and send it" (fetched as containerd's docker authorizer does: the
OAuth2 POST first when we hold a secret, then the GET; docs/registry.md). Tokens are
cached per (realm, service, scope) and renewed shortly before they expire, or at once
when the registry refuses one it issued (a token can expire mid-run, or the clocks
disagree).

Secrets never leave this module except inside an Authorization header or the OAuth2
form POSTed to the realm: Credentials and tokens have redacting reprs, and no message
here contains a user name, password or token.
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
# What a realm without the OAuth2 POST endpoint answers it (containerd falls back to the
# GET on these; on 405 too when the grant names a user): GCR 404, Artifactory 401, ACR 400.
OAUTH2_FALLBACK = frozenset({400, 401, 404})
OAUTH2_CLIENT_ID = "erofs-tools"


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


class RedirectRefused(AuthError):
    """The token realm redirected a request carrying credentials in its body to another
    origin; it was not resent there."""


def _user_secret(creds: Credentials | None) -> tuple[str, str]:
    """(user, secret) as containerd's credentials callback gives them: an identity
    token has no user (CRI's ParseAuth); no secret means anonymous."""
    if creds is None:
        return "", ""
    if creds.identity_token:
        return "", creds.identity_token
    return creds.username, creds.password


class _Token:
    __slots__ = ("value", "expires_at")

    def __init__(self, value: str, expires_at: float):
        self.value = value
        self.expires_at = expires_at

    def __repr__(self) -> str:
        return f"_Token(<redacted>, expires_at={self.expires_at:.0f})"


# fetch(method, url, headers, body) -> (status, body bytes); supplied by the client so
# that token requests share its pools, timeouts, TLS settings and retries. It raises
# RedirectRefused when the realm redirects a request with a body (an OAuth2 grant) to
# another host.
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
        # (realm, service) -> the refresh token its last answer carried, for the next
        # POST there (never sent to another realm or service)
        self._refresh_tokens: dict[tuple[str, str], str] = {}
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
            # sorted and without duplicates, as containerd's GetTokenScopes
            tok = self._request_token(ch, sorted({s for s in scopes if s}))
            self._tokens[key] = tok
            return tok

    def _request_token(self, ch: Challenge, scopes: list[str]) -> _Token:
        """A token for ``scopes`` as containerd's docker authorizer gets one
        (remotes/docker/authorizer.go, doBearerAuth): with a secret, the OAuth2 POST
        first (a password grant, or a refresh_token grant with an identity token or a
        refresh token this realm+service handed out), then the GET with Basic
        credentials if the realm answers 400, 401 or 404 (or 405 to a grant naming a
        user), as registries without the POST endpoint do; without a secret, the GET
        without Authorization."""
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
        user, secret = _user_secret(self.credentials)
        oauth2 = bool(secret)
        if oauth2:
            status, body = self._oauth2_token(ch, realm, scopes, user, secret)
            if status in OAUTH2_FALLBACK or (status == 405 and user):
                log.debug("%s answered HTTP %d to the OAuth2 POST: GET instead", where,
                          status)
                oauth2 = False
                status, body = self._get_token(ch, realm, parsed, scopes, user, secret)
        else:
            status, body = self._get_token(ch, realm, parsed, scopes, "", "")
        if status in (401, 403):
            raise AuthError(f"{where} refused the credentials for {self.host}"
                            if self.credentials else
                            f"{where} requires credentials for {self.host} and none were found")
        if not 200 <= status < 300:
            raise AuthError(f"{where} answered HTTP {status}")
        return self._parse_token_reply(body, where, oauth2, (realm, ch.params.get("service", "")))

    def _get_token(self, ch, realm, parsed, scopes, user: str,
                   secret: str) -> tuple[int, bytes]:
        """GET realm?service=&scope=..., with Basic credentials if we have a secret."""
        headers = {"Accept": "application/json"}
        if secret:
            raw = f"{user}:{secret}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode("ascii")
        query = [("service", ch.params["service"])] if ch.params.get("service") else []
        query += [("scope", s) for s in scopes]
        sep = "&" if parsed.query else "?"
        url = realm + (sep + urllib.parse.urlencode(query) if query else "")
        return self._fetch("GET", url, headers, None)

    def _oauth2_token(self, ch, realm, scopes, user: str, secret: str) -> tuple[int, bytes]:
        """POST the OAuth2 grant: the refresh token this realm+service handed out, else
        refresh_token with an identity token (no user), else password. A realm that
        redirects the POST to another host (its body is not resent there: a
        RedirectRefused) is a realm without the POST endpoint: HTTP 404."""
        service = ch.params.get("service", "")
        form = {"service": service, "client_id": OAUTH2_CLIENT_ID}
        if scopes:
            form["scope"] = " ".join(scopes)
        held = self._refresh_tokens.get((realm, service))
        if held or not user:
            form.update(grant_type="refresh_token", refresh_token=held or secret)
        else:
            form.update(grant_type="password", username=user, password=secret)
        headers = {"Accept": "application/json",
                   "Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
        try:
            status, body = self._fetch("POST", realm, headers,
                                       urllib.parse.urlencode(form).encode())
        except RedirectRefused as e:
            log.debug("%s", e)
            return 404, b""
        if held and status in (400, 401):
            # the realm no longer takes it: the user's own credentials next time
            self._refresh_tokens.pop((realm, service), None)
        return status, body

    def _parse_token_reply(self, body: bytes, where: str, oauth2: bool,
                           realm_service: tuple[str, str]) -> _Token:
        """The token of a reply: ``access_token`` from the POST (containerd reads no
        other), ``access_token`` else ``token`` from the GET; ``expires_in`` (the
        default when missing or not a positive number); ``issued_at`` is not read (as
        containerd: the lifetime counts from the reply, on our clock). A
        ``refresh_token`` is kept for the next POST to this realm and service."""
        try:
            reply = json.loads(body[:MAX_TOKEN_REPLY])
            value = reply.get("access_token") or (None if oauth2 else reply.get("token"))
            lifetime = float(reply.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
            refresh = reply.get("refresh_token")
        except (ValueError, AttributeError, TypeError):
            raise AuthError(f"{where} sent an unreadable token reply") from None
        if not isinstance(value, str) or not value:
            raise AuthError(f"{where} sent a reply without a"
                            f"{'n access_token' if oauth2 else ' token'}")
        if isinstance(refresh, str) and refresh and _user_secret(self.credentials)[1]:
            self._refresh_tokens[realm_service] = refresh
        if not lifetime > 0 or lifetime == float("inf"):
            # negative, NaN (Python's json reads it) or infinite: no lifetime we can
            # use; the default, as for a missing one (a token expired on arrival was
            # fetched again for every request, doubling them)
            lifetime = DEFAULT_TOKEN_LIFETIME
        margin = min(REFRESH_MARGIN, lifetime / 5)
        return _Token(value, self._clock() + max(lifetime - margin, 0.0))
