"""An HTTP proxy in front of an HTTPS registry (docker-registry, Basic auth): what the
proxy is told and what the registry is told. The proxy here reads its tunnels (it
answers the TLS handshake with the registry's own certificate, which the client trusts,
and opens its own TLS connection to the registry), so the test sees both the CONNECT's
headers and the requests inside the tunnel, as a hijacking proxy (dfdaemon's HTTPS
hijack) or the registry would.

A credential goes only where it is meant: the proxy's (Proxy-Authorization, from the
proxy URL's userinfo or proxy_headers) on the CONNECT, never inside the tunnel to the
registry (and, through a redirect, to its storage); the registry's (Authorization)
inside the tunnel, never on the CONNECT."""

from __future__ import annotations

import base64
import os
import select
import socket
import ssl
import threading

import pytest
from registry_fixtures import start_registry

from erofs_tools.errors import InputError, RegistryError
from erofs_tools.registry.envproxy import EnvProxy

pytestmark = pytest.mark.registry

DATA = os.urandom(200_000)


class TunnelReadingProxy:
    # names only the proxy resolves (a name that is not loopback: Go's rules, and ours,
    # never send loopback addresses through a proxy)
    NAMES = {"registry.test": "127.0.0.1"}

    def __init__(self, cert: str, key: str, auth: str | None = None):
        self.cert, self.key, self.auth = cert, key, auth
        self.connects: list[dict] = []          # each CONNECT's headers
        self.refused = 0                        # answered 407
        self.inner = bytearray()                # what went to the registry, decrypted
        self._lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self):
        self.sock.close()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket):
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                piece = conn.recv(4096)
                if not piece:
                    return
                head += piece
            lines = head.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip()
                       for k, _, v in (line.partition(":") for line in lines[1:])}
            if method != "CONNECT":
                conn.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            with self._lock:
                self.connects.append({**headers, "_target": target})
            if self.auth and headers.get("proxy-authorization") != self.auth:
                with self._lock:
                    self.refused += 1
                conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                             b"Proxy-Authenticate: Basic realm=\"p\"\r\n"
                             b"Content-Length: 0\r\nConnection: close\r\n\r\n")
                return
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            server_ctx.load_cert_chain(self.cert, self.key)
            client_ctx = ssl.create_default_context(cafile=self.cert)
            host, port = target.rsplit(":", 1)
            try:
                down = server_ctx.wrap_socket(conn, server_side=True)
                up = client_ctx.wrap_socket(
                    socket.create_connection((self.NAMES.get(host, host), int(port))),
                    server_hostname=host)
            except (OSError, ssl.SSLError):
                return
            with down, up:
                self._pump(down, up)

    def _pump(self, down, up):
        socks = [down, up]
        while True:
            ready = [s for s in socks if s.pending()]
            if not ready:
                ready = select.select(socks, [], [], 30)[0]
                if not ready:
                    return
            for s in ready:
                try:
                    data = s.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                if s is down:
                    with self._lock:
                        self.inner += data
                (up if s is down else down).sendall(data)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def tls_registry(tmp_path):
    server = start_registry(str(tmp_path / "reg"), "basic", tls=True)
    yield server
    server.stop()


def _start(server, **kw):
    return TunnelReadingProxy(server.ca_cert, os.path.join(server.workdir, "tls-key.pem"), **kw)


def test_proxy_url_credentials_go_on_the_connect_only(tls_registry):
    """http://user:password@proxy: the proxy gets them on each CONNECT (was: urllib3
    dropped the userinfo, the proxy answered 407 and every read went direct), the
    registry never; the registry's Authorization only inside the tunnel."""
    d = tls_registry.client().push_blob("p/x", DATA).digest
    proxy = _start(tls_registry, auth=_basic("pu", "s3cr:t@"))
    try:
        # (a generous connect timeout: this proxy is Python threads doing two TLS
        # handshakes per tunnel, and a loaded CI machine once took over 10 s for one)
        c = tls_registry.client(proxy=f"http://pu:s3cr%3At%40@{proxy.host}",
                                connect_timeout=60.0)
        assert c.read_blob_range("p/x", d, 100, 50) == DATA[100:150]
        assert c.get_blob("p/x", d) == DATA
        assert c.transport.proxy_fallbacks == 0 and proxy.refused == 0, \
            c.transport.last_proxy_error
        assert proxy.connects
        for h in proxy.connects:
            assert h["proxy-authorization"] == _basic("pu", "s3cr:t@")
            assert "authorization" not in h            # the registry's stays inside
        inner = bytes(proxy.inner).lower()
        assert b"\r\nauthorization: basic " in inner       # the registry got its own
        assert b"proxy-authorization" not in inner and b"s3cr" not in inner
    finally:
        proxy.close()


def test_proxy_headers_on_the_connect_not_to_the_registry(tls_registry):
    """proxy_headers (a Proxy-Authorization among them) go on the CONNECT; inside the
    tunnel only the ones a hijacking proxy reads (was: all of them went inside the
    tunnel to the registry, none to the proxy)."""
    d = tls_registry.client().push_blob("p/y", DATA).digest
    secret = _basic("pu", "hdr-secret")
    proxy = _start(tls_registry)
    try:
        c = tls_registry.client(proxy=f"http://{proxy.host}", connect_timeout=60.0,
                                proxy_headers={"Proxy-Authorization": secret,
                                               "X-Dragonfly-Use-P2P": "true"})
        assert c.read_blob_range("p/y", d, 0, 10) == DATA[:10]
        assert c.transport.proxy_fallbacks == 0, c.transport.last_proxy_error
        assert proxy.connects and all(h.get("proxy-authorization") == secret
                                      and h.get("x-dragonfly-use-p2p") == "true"
                                      for h in proxy.connects)
        inner = bytes(proxy.inner).lower()
        assert b"proxy-authorization" not in inner
        assert secret.split()[1].lower().encode() not in inner
        assert b"x-dragonfly-use-p2p: true" in inner
    finally:
        proxy.close()


def test_status_shows_no_proxy_password():
    from fscache_daemon.cli import _no_userinfo
    assert _no_userinfo("http://pu:s3cr%3At@proxy:3128") == "http://proxy:3128"
    assert _no_userinfo("http://proxy:3128/") == "http://proxy:3128/"
    assert _no_userinfo("127.0.0.1:5000") == "127.0.0.1:5000"


def test_environment_proxy_for_a_tls_registry(tls_registry, monkeypatch):
    """HTTPS_PROXY with credentials (containerd's way to a registry in a network that
    has no other; was: the variables were not read, every request went direct): every
    request goes through the tunnel, the proxy's credentials on the CONNECT only;
    NO_PROXY sends it direct (here to a name only the proxy knows, so direct fails)."""
    d = tls_registry.client().push_blob("p/e", DATA).digest
    proxy = _start(tls_registry, auth=_basic("pu", "envpw"))
    port = tls_registry.host.rsplit(":", 1)[1]
    for k in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("https_proxy", f"pu:envpw@{proxy.host}")
    monkeypatch.setenv("NO_PROXY", "localhost,10.0.0.0/8")
    try:
        c = tls_registry.client(host=f"registry.test:{port}")
        assert c.get_blob("p/e", d) == DATA
        assert c.blob_exists("p/e", d)                 # HEAD: the same way
        assert proxy.connects and proxy.refused == 0
        assert all(h.get("proxy-authorization") == _basic("pu", "envpw")
                   and h["_target"] == f"registry.test:{port}"
                   for h in proxy.connects)
        inner = bytes(proxy.inner).lower()
        assert b"\r\nauthorization: basic " in inner and b"envpw" not in inner
        n = len(proxy.connects)
        for no_proxy in (".test", "registry.test", f"registry.test:{port}", "*"):
            monkeypatch.setenv("NO_PROXY", no_proxy)
            direct = tls_registry.client(host=f"registry.test:{port}", retries=0)
            with pytest.raises(RegistryError, match="connection failed"):
                direct.ping()
        assert len(proxy.connects) == n
    finally:
        proxy.close()


@pytest.mark.parametrize("no_proxy,url,proxied", [
    ("", "https://r.example.com/v2/", True),
    ("", "https://127.0.0.1:5000/v2/", False),         # loopback: never
    ("", "https://localhost/v2/", False),
    ("", "https://[::1]:5000/v2/", False),
    ("*", "https://r.example.com/v2/", False),
    ("example.com", "https://r.example.com/v2/", False),     # the domain and below
    ("example.com", "https://example.com/v2/", False),
    ("example.com", "https://badexample.com/v2/", True),
    (".example.com", "https://example.com/v2/", True),       # below only (curl: both)
    (".example.com", "https://r.example.com/v2/", False),
    ("*.example.com", "https://example.com/v2/", True),
    ("example.com:443", "https://r.example.com/v2/", False),  # the URL's default port
    ("example.com:5000", "https://r.example.com/v2/", True),
    ("example.com:5000", "https://r.example.com:5000/v2/", False),
    ("10.0.0.0/8", "https://10.1.2.3/v2/", False),
    ("10.0.0.0/8", "https://11.1.2.3/v2/", True),
    ("10.1.2.3:5000", "https://10.1.2.3:5000/v2/", False),
    ("10.1.2.3:5000", "https://10.1.2.3/v2/", True),
    ("fd00::/8", "https://[fd00::1]/v2/", False),
    ("[fd00::1]:443", "https://[fd00::1]/v2/", False),
    (" R.Example.COM , other", "https://r.example.com/v2/", False),
    (":443", "https://r.example.com/v2/", True),            # no host: ignored
])
def test_no_proxy_as_go_reads_it(no_proxy, url, proxied):
    p = EnvProxy({"HTTPS_PROXY": "proxy:3128", "NO_PROXY": no_proxy})
    assert p.proxy_for(url) == ("http://proxy:3128" if proxied else None)


def test_proxy_variables():
    assert EnvProxy({"HTTP_PROXY": "http://p:1"}).proxy_for("https://r.example/") is None
    assert EnvProxy({"http_proxy": "p:1"}).proxy_for("http://r.example/") == "http://p:1"
    # a CGI program's HTTP_PROXY is the client's Proxy header, never a proxy
    assert EnvProxy({"HTTP_PROXY": "p:1", "REQUEST_METHOD": "GET"}).proxy_for(
        "http://r.example/") is None
    with pytest.raises(InputError, match="socks5"):
        EnvProxy({"HTTPS_PROXY": "socks5://p:1080"})
