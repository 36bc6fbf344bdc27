"""Real registries for tests: Debian's ``docker-registry`` (distribution 2.8) on
127.0.0.1 with a temporary storage directory, without auth, with htpasswd Basic auth, or
with Bearer tokens from a small token issuer that lives here.

Use from a test module::

    from registry_fixtures import registry, registry_basic, registry_token  # noqa: F401

    def test_x(registry):
        client = registry.client()          # RegistryClient(insecure=True, fast retries)
        ...

Each fixture yields a RegistryServer: ``.host`` ("127.0.0.1:PORT"), ``.url``,
``.username``/``.password`` (None without auth), ``.credentials``, ``.storage``,
``.blob_data_path(digest)`` (to corrupt stored data), ``.log_tail()``, ``.stop()``;
``registry_token`` also has ``.issuer`` (a TokenIssuer: counts requests, can issue
expired or short-lived tokens, and answers the OAuth2 refresh-token grant: POST /token
with ``grant_type=refresh_token`` and one of ``.refresh_tokens``). ``start_registry(dir,
auth, tls=True)`` starts one serving HTTPS with a fresh self-signed certificate
(``.ca_cert``); ``redirect_to=URL`` makes the registry answer blob GETs with a redirect
to URL + the blob's storage path (distribution's redirect middleware), e.g. a
``StorageServer`` on another loopback address serving the registry's storage. ``FlakyProxy`` sits in
front of a server and fails chosen requests (5xx, 429, dropped connections, lost answers,
cut bodies) before forwarding; it also works as a forward HTTP proxy.

A missing ``docker-registry`` or ``htpasswd`` skips the tests, or fails them when
EROFS_TOOLS_CI=1 (CI must run them).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import http.server
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from erofs_tools.registry import Credentials, RegistryClient

SERVICE = "erofs-test-registry"
ISSUER = "erofs-test-issuer"


def _missing(what: str):
    msg = f"{what} not found (apt-get install docker-registry apache2-utils)"
    if os.environ.get("EROFS_TOOLS_CI") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


def registry_binary() -> str:
    path = shutil.which("docker-registry") or shutil.which("registry")
    if not path:
        _missing("docker-registry")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, ok=(200, 401), timeout: float = 20.0, proc=None,
              cafile: str | None = None) -> None:
    """Poll ``url`` until it answers one of ``ok`` (or the process dies)."""
    import ssl
    context = ssl.create_default_context(cafile=cafile) if cafile else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as r:
                if r.status in ok:
                    return
        except urllib.error.HTTPError as e:
            if e.code in ok:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {timeout}s")


# --- a tiny Bearer token issuer -------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class _Signer:
    """An RSA key and a self-signed certificate (the registry's rootcertbundle); signs
    RS256. Uses the cryptography package when present, else the openssl CLI."""

    def __init__(self, workdir: str):
        self.cert_path = os.path.join(workdir, "token-cert.pem")
        self.key_path = os.path.join(workdir, "token-key.pem")
        try:
            self._make_with_cryptography()
        except ImportError:
            self._make_with_openssl()
        with open(self.cert_path, "rb") as f:
            pem = f.read().decode()
        body = re.search(r"-----BEGIN CERTIFICATE-----(.*?)-----END", pem, re.S).group(1)
        self.cert_der_b64 = "".join(body.split())

    def _make_with_cryptography(self):
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
        from cryptography.x509.oid import NameOID

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                .sign(key, hashes.SHA256()))
        with open(self.cert_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        self._sign = lambda data: key.sign(data, padding.PKCS1v15(), hashes.SHA256())

    def _make_with_openssl(self):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                        "-keyout", self.key_path, "-out", self.cert_path, "-days", "30",
                        "-subj", f"/CN={ISSUER}"], check=True, capture_output=True)
        self._sign = lambda data: subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", self.key_path], input=data,
            check=True, capture_output=True).stdout

    def jwt(self, claims: dict) -> str:
        # distribution 2.8 finds the signing key through the x5c chain, verified against
        # the rootcertbundle (here: the self-signed certificate itself).
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.cert_der_b64]}
        signing_input = (_b64url(json.dumps(header).encode()) + "."
                         + _b64url(json.dumps(claims).encode()))
        return signing_input + "." + _b64url(self._sign(signing_input.encode()))


class _HttpServed:
    """A ThreadingHTTPServer on `bind` (a free port) serving `handler` on a thread of
    its own (self._server); stop() ends it."""

    _server: http.server.ThreadingHTTPServer

    def _listen(self, handler, bind: str = "127.0.0.1", daemon_threads: bool = True) -> int:
        """Start serving -> the port."""
        self._server = http.server.ThreadingHTTPServer((bind, 0), handler)
        self._server.daemon_threads = daemon_threads
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self._server.server_address[1]

    def stop(self):
        self._server.shutdown()
        self._server.server_close()


class TokenIssuer(_HttpServed):
    """A token server as containerd's docker authorizer meets them: GET
    /token?service=&scope=... (Basic credentials, or none) -> {"token", "expires_in",
    "issued_at"}, and the OAuth2 endpoint: POST /token with a form (RFC 6749: a
    ``password`` grant with ``username``/``password``, or a ``refresh_token`` grant with
    one of ``.refresh_tokens``) -> {"access_token", ...}.

    Knobs for tests: ``expires_in`` (what the reply claims), ``expire_next`` (that many
    next tokens are already expired for the registry, although the reply says they are
    good: a token expiring mid-run), ``actions`` (granted actions), ``denied`` (repositories
    whose scopes get no actions), ``anonymous`` (issue tokens without credentials),
    ``refuse_post`` (answer every POST with that status, as registries without the
    OAuth2 endpoint do: 404, 405, 400, 401), ``issue_refresh`` (replies carry a new
    refresh token, which the next grant may use), ``get_key``/``post_key`` (the reply's
    name for the token) and ``reply_extra`` (more fields in every reply).

    Logs: ``methods`` ("GET"/"POST" per request, in order), ``requests`` (user, scopes)
    per request of either method, ``grants`` (the POSTed forms), ``authorizations``
    (each request's Authorization, raw), ``issued_refresh`` (refresh tokens handed out).
    """

    def __init__(self, workdir: str, username: str | None, password: str | None):
        self.signer = _Signer(workdir)
        self.username, self.password = username, password
        self.expires_in = 300
        self.expire_next = 0
        self.actions = {"pull", "push", "delete", "*"}
        self.denied: set[str] = set()
        self.anonymous = False
        self.refuse_post: int | None = None
        self.issue_refresh = False
        self.get_key, self.post_key = "token", "access_token"
        self.reply_extra: dict = {}
        self.methods: list[str] = []
        self.requests: list[tuple[str | None, list[str]]] = []
        self.refresh_tokens: dict[str, str] = {}     # OAuth2 refresh token -> user
        self.issued_refresh: list[str] = []
        self.grants: list[dict] = []                 # the OAuth2 forms POSTed
        self.authorizations: list[str | None] = []   # each request's Authorization, raw
        self.moved: dict[str, str] = {}              # path -> where a 307 sends it
        self._lock = threading.Lock()
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if not issuer._moved(self):
                    issuer._handle(self)

            def do_POST(self):
                if not issuer._moved(self):
                    issuer._handle_oauth2(self)

            def log_message(self, *args):
                pass

        self.url = f"http://127.0.0.1:{self._listen(Handler, daemon_threads=False)}"

    def _user(self, header: str | None) -> str | None | bool:
        """The authenticated user, None for anonymous, False for bad credentials."""
        if not header:
            return None
        try:
            scheme, _, value = header.partition(" ")
            user, _, password = base64.b64decode(value).decode().partition(":")
        except ValueError:
            return False
        if scheme == "Basic" and not user and password in self.refresh_tokens:
            return self.refresh_tokens[password]    # an identity token as containerd GETs
        ok = scheme == "Basic" and user == self.username and password == self.password
        return user if ok else False

    def _moved(self, h: http.server.BaseHTTPRequestHandler) -> bool:
        """A 307 to ``moved[path]`` (with the query) for a path that moved."""
        path, _, query = h.path.partition("?")
        if path not in self.moved:
            return False
        h.send_response(307)
        h.send_header("Location", self.moved[path] + ("?" + query if query else ""))
        h.send_header("Content-Length", "0")
        h.end_headers()
        return True

    def _log(self, h, method: str, user, scopes: list[str]) -> bool:
        """Record a request; -> whether its token is issued already expired."""
        with self._lock:
            self.methods.append(method)
            self.requests.append((user or None, scopes))
            self.authorizations.append(h.headers.get("Authorization"))
            expired = self.expire_next > 0
            self.expire_next -= expired
        return expired

    def _refuse(self, h, status: int, body: bytes = b"", challenge: bool = False):
        h.send_response(status)
        if challenge:
            h.send_header("WWW-Authenticate", 'Basic realm="token"')
        if body:
            h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _handle_oauth2(self, h: http.server.BaseHTTPRequestHandler):
        """The OAuth2 token endpoint (RFC 6749 s. 4.3 and 6): a password or
        refresh_token grant in a form."""
        length = int(h.headers.get("Content-Length") or 0)
        form = {k: v[0] for k, v in
                urllib.parse.parse_qs(h.rfile.read(length).decode()).items()}
        grant = form.get("grant_type")
        user = None
        if grant == "refresh_token":
            user = self.refresh_tokens.get(form.get("refresh_token", ""))
        elif grant == "password" and form.get("username") == self.username and \
                form.get("password") == self.password:
            user = self.username
        with self._lock:
            self.grants.append(form)
        expired = self._log(h, "POST", user, form.get("scope", "").split())
        if self.refuse_post:
            return self._refuse(h, self.refuse_post)
        if user is None:
            return self._refuse(h, 400, json.dumps({"error": "invalid_grant"}).encode())
        self._reply_token(h, user, form.get("scope", "").split(), form.get("service", ""),
                          self.post_key, expired)

    def _handle(self, h: http.server.BaseHTTPRequestHandler):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(h.path).query)
        scopes = [s for v in query.get("scope", []) for s in v.split()]
        user = self._user(h.headers.get("Authorization"))
        expired = self._log(h, "GET", user, scopes)
        if user is False or (user is None and not self.anonymous):
            return self._refuse(h, 401, challenge=True)
        self._reply_token(h, user, scopes, query.get("service", [""])[0], self.get_key,
                          expired)

    def _reply_token(self, h, user, scopes, service, key, expired=False):
        now = int(time.time())
        # The registry allows 60 s of clock skew: an "expired" token must be older.
        # (an expires_in that is not an int, e.g. NaN, is only claimed: the token is good)
        life = self.expires_in if isinstance(self.expires_in, int) else 300
        exp = now - 3600 if expired else now + max(life, 1)
        claims = {"iss": ISSUER, "sub": user or "", "aud": service,
                  "exp": exp, "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8),
                  "access": [self._grant(s) for s in scopes if s.startswith("repository:")]}
        reply = {**self.reply_extra, key: self.signer.jwt(claims),
                 "expires_in": self.expires_in,
                 "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))}
        if self.issue_refresh and user:
            refresh = "RT-issued-" + secrets.token_hex(8)
            with self._lock:
                self.refresh_tokens[refresh] = user
                self.issued_refresh.append(refresh)
            reply["refresh_token"] = refresh
        body = json.dumps(reply).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _grant(self, scope: str) -> dict:
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        return {"type": kind, "name": name,
                "actions": [] if name in self.denied else
                [a for a in actions.split(",") if a in self.actions]}


def make_tls_cert(workdir: str) -> tuple[str, str]:
    """A self-signed server certificate for 127.0.0.1, localhost and registry.test (a
    name that is not loopback, reached through a proxy in test_registry_proxy_tls):
    (cert path, key path)."""
    cert_path = os.path.join(workdir, "tls-cert.pem")
    key_path = os.path.join(workdir, "tls-key.pem")
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key_path,
                        "-out", cert_path, "-days", "30", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:registry.test"],
                       check=True, capture_output=True)
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                       x509.DNSName("localhost"),
                                       x509.DNSName("registry.test")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(san, False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


# --- the registry process -------------------------------------------------------------


@dataclass
class RegistryServer:
    host: str
    workdir: str
    storage: str
    log_path: str
    proc: subprocess.Popen
    auth: str = "none"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    issuer: TokenIssuer | None = None
    ca_cert: str | None = None          # set when serving HTTPS

    @property
    def url(self) -> str:
        return f"{'https' if self.ca_cert else 'http'}://{self.host}"

    @property
    def credentials(self) -> Credentials | None:
        return Credentials(self.username, self.password) if self.username else None

    def client(self, **kw) -> RegistryClient:
        """A client for this server: plain HTTP (or HTTPS trusting the server's own
        certificate), its credentials, quick retries."""
        kw.setdefault("credentials", self.credentials)
        kw.setdefault("insecure", self.ca_cert is None)
        if not kw["insecure"]:
            kw.setdefault("ca_certs", self.ca_cert)
        kw.setdefault("docker_config", False)
        kw.setdefault("backoff", 0.01)
        kw.setdefault("max_backoff", 0.2)
        kw.setdefault("timeout", 10.0)
        return RegistryClient(kw.pop("host", self.host), **kw)

    def blob_data_path(self, digest: str) -> str:
        hexd = digest.split(":", 1)[1]
        return os.path.join(self.storage, "docker", "registry", "v2", "blobs", "sha256",
                            hexd[:2], hexd, "data")

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.issuer:
            self.issuer.stop()


def _htpasswd(path: str, user: str, password: str) -> None:
    tool = shutil.which("htpasswd")
    if not tool:
        _missing("htpasswd")
    # distribution accepts bcrypt entries only.
    out = subprocess.run([tool, "-nbB", user, password], check=True, capture_output=True)
    with open(path, "wb") as f:
        f.write(out.stdout.strip() + b"\n")


def start_registry(workdir: str, auth: str = "none", extra_config: dict | None = None,
                   attempts: int = 3, tls: bool = False,
                   redirect_to: str | None = None,
                   realm: str | Callable[[str], str] | None = None) -> RegistryServer:
    """Start ``docker-registry serve`` on a free loopback port; ``auth`` is "none",
    "basic" (htpasswd) or "token" (Bearer, with a TokenIssuer); ``tls`` serves HTTPS
    with a fresh self-signed certificate (``.ca_cert``); ``realm`` is the token realm
    the registry names in its challenges instead of the issuer's (e.g. a Redirector's
    URL sending the token requests on to the issuer), or a function of the issuer's
    URL giving it."""
    binary = registry_binary()
    storage = os.path.join(workdir, "storage")
    os.makedirs(storage, exist_ok=True)
    username = password = None
    issuer = None
    auth_config: dict = {}
    if auth in ("basic", "token"):
        username, password = "tester", "pw-" + secrets.token_hex(8)
    if auth == "basic":
        path = os.path.join(workdir, "htpasswd")
        _htpasswd(path, username, password)
        auth_config = {"htpasswd": {"realm": "erofs-test", "path": path}}
    elif auth == "token":
        issuer = TokenIssuer(workdir, username, password)
        where = realm(issuer.url) if callable(realm) else realm
        auth_config = {"token": {"realm": where or issuer.url + "/token", "service": SERVICE,
                                 "issuer": ISSUER,
                                 "rootcertbundle": issuer.signer.cert_path}}
    elif auth != "none":
        raise ValueError(f"unknown auth {auth!r}")
    log_path = os.path.join(workdir, "registry.log")
    tls_cert = make_tls_cert(workdir) if tls else None
    last_error = None
    for _ in range(attempts):
        port = free_port()
        config = {"version": "0.1", "log": {"level": "info"},
                  "storage": {"filesystem": {"rootdirectory": storage},
                              "delete": {"enabled": True}},
                  "http": {"addr": f"127.0.0.1:{port}", "secret": "erofs-test-secret"}}
        if auth_config:
            config["auth"] = auth_config
        if tls_cert:
            config["http"]["tls"] = {"certificate": tls_cert[0], "key": tls_cert[1]}
        if redirect_to:
            config["middleware"] = {"storage": [{"name": "redirect",
                                                 "options": {"baseurl": redirect_to}}]}
        config.update(extra_config or {})
        config_path = os.path.join(workdir, "config.yml")
        with open(config_path, "w") as f:
            json.dump(config, f)        # JSON is YAML
        log = open(log_path, "ab")
        proc = subprocess.Popen([binary, "serve", config_path], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        server = RegistryServer(f"127.0.0.1:{port}", workdir, storage, log_path, proc, auth,
                                username, password, issuer, tls_cert and tls_cert[0])
        try:
            wait_http(f"{server.url}/v2/", proc=proc, cafile=server.ca_cert)
            return server
        except RuntimeError as e:       # port taken meanwhile, or a bad config
            last_error = e
            server.issuer = None
            server.stop()
    if issuer:
        issuer.stop()
    with open(log_path, errors="replace") as f:
        tail = "".join(f.readlines()[-10:])
    raise RuntimeError(f"docker-registry did not start: {last_error}\n{tail}")


def _fixture(tmp_path_factory, auth: str):
    registry_binary()
    server = start_registry(str(tmp_path_factory.mktemp(f"registry-{auth}")), auth)
    return server


@pytest.fixture
def registry(tmp_path_factory):
    server = _fixture(tmp_path_factory, "none")
    yield server
    server.stop()


@pytest.fixture
def registry_basic(tmp_path_factory):
    server = _fixture(tmp_path_factory, "basic")
    yield server
    server.stop()


@pytest.fixture
def registry_token(tmp_path_factory):
    server = _fixture(tmp_path_factory, "token")
    yield server
    server.stop()


# --- blob storage on another host ------------------------------------------------------


class StorageServer(_HttpServed):
    """Serves a registry's storage directory over plain HTTP (GET/HEAD with one Range),
    like an object store a registry redirects blob GETs to; binds `bind` (e.g.
    127.0.0.2: another host as far as a client can tell). ``requests`` records
    (method, path, Authorization header or None, Range or None)."""

    def __init__(self, root: str, bind: str = "127.0.0.2"):
        self.root = root
        self.requests: list[tuple[str, str, str | None, str | None]] = []
        store = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                store._serve(self)

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        self.url = f"http://{bind}:{self._listen(Handler, bind)}"

    def _serve(self, h):
        path = urllib.parse.urlsplit(h.path).path
        self.requests.append((h.command, path, h.headers.get("Authorization"),
                              h.headers.get("Range")))
        full = os.path.realpath(os.path.join(self.root, path.lstrip("/")))
        if not full.startswith(os.path.realpath(self.root) + os.sep) or \
                not os.path.isfile(full):
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        with open(full, "rb") as f:
            data = f.read()
        status, start, end = 200, 0, len(data)
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("Range") or "")
        if m:
            status, start = 206, int(m.group(1))
            end = min(len(data), int(m.group(2)) + 1) if m.group(2) else len(data)
        h.send_response(status)
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        h.send_header("Content-Length", str(end - start))
        h.end_headers()
        if h.command == "GET":
            h.wfile.write(data[start:end])


class Redirector(_HttpServed):
    """Answers every request with a redirect (``status``, 307 by default) to
    ``target`` + the request's path and query, e.g. a token realm that moved; binds
    ``bind`` (127.0.0.2: another host). ``requests`` records (method, path with query,
    Authorization or None, body)."""

    def __init__(self, target: str = "", status: int = 307, bind: str = "127.0.0.2"):
        self.target, self.status = target, status
        self.requests: list[tuple[str, str, str | None, bytes]] = []
        red = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                length = int(self.headers.get("Content-Length") or 0)
                red.requests.append((self.command, self.path,
                                     self.headers.get("Authorization"),
                                     self.rfile.read(length)))
                self.send_response(red.status)
                self.send_header("Location", red.target + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_GET

            def log_message(self, *args):
                pass

        self.url = f"http://{bind}:{self._listen(Handler, bind)}"


# --- a proxy that fails on purpose ------------------------------------------------------


_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer",
               "upgrade", "proxy-authorization", "proxy-authenticate"}


class FlakyProxy(_HttpServed):
    """An HTTP server in front of ``target`` ("host:port") that consumes one planned
    failure per matching request, then forwards the rest unchanged (the Host header
    too, so the registry's Location URLs point back here).

    Failures: an int status (e.g. 503, 429; ``retry_after`` sets Retry-After), "drop"
    (close the connection without answering), "lose" (forward, then close without
    relaying the answer: the request took effect but the client cannot know) or "cut"
    (forward, but close halfway through the answer's body) or "hold" (accept the request and
    answer nothing until ``release()``, then forward it: a registry that hangs; ``held``
    counts the requests that arrived held). ``match`` is a regex on "METHOD PATH"
    selecting the requests that may fail. ``requests`` records "METHOD PATH" of
    everything received.
    """

    def __init__(self, target: str, failures=(), match: str = ".*",
                 retry_after: str | None = None, bind: str = "127.0.0.1"):
        self.target = target
        self.failures = list(failures)
        self.match = re.compile(match)
        self.retry_after = retry_after
        self.requests: list[str] = []
        self.seen_headers: list[dict] = []
        self.held = 0
        self._released = threading.Event()
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_one(self):
                try:
                    proxy._handle(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass        # the client went away (e.g. a killed daemon's held read)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = handle_one

            def log_message(self, *args):
                pass

        # bind "127.0.0.2": a host that is not loopback to the tools' plain-HTTP rule
        self.host = f"{bind}:{self._listen(Handler, bind)}"

    def _next_failure(self, line: str):
        with self._lock:
            self.requests.append(line)
            if self.failures and self.match.search(line):
                return self.failures.pop(0)
        return None

    def _handle(self, h):
        line = f"{h.command} {h.path}"
        self.seen_headers.append(dict(h.headers))
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        failure = self._next_failure(line)
        if failure == "hold":
            with self._lock:
                self.held += 1
            self._released.wait()
        if failure == "drop":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if isinstance(failure, int):
            h.send_response(failure)
            if self.retry_after is not None:
                h.send_header("Retry-After", self.retry_after)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        conn = http.client.HTTPConnection(self.target, timeout=30)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP_BY_HOP}
        conn.request(h.command, h.path, body=body if (body or length) else None,
                     headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        if failure == "lose":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                h.send_header(k, v)
        # a HEAD answer has no body: its Content-Length is the registry's, passed on
        h.send_header("Content-Length", resp.getheader("Content-Length", "0")
                      if h.command == "HEAD" else str(len(data)))
        h.end_headers()
        if h.command == "HEAD":
            return
        if failure == "cut":
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        h.wfile.write(data)

    def release(self) -> None:
        """Let held requests (and later "hold" failures) through."""
        self._released.set()

    def stop(self):
        self._released.set()
        super().stop()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
