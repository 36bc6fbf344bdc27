"""Hostile registries (issue 19 item 4): upload session locations follow the rule for
every URL a registry hands out. An HTTPS registry cannot move an upload to plain HTTP
(the push fails before any byte or credential goes there), and a location on another
host is used without the registry's credentials. Each "other host" records everything
it receives."""

from __future__ import annotations

import base64
import http.server
import os
import ssl
import threading

import pytest
from registry_fixtures import make_tls_cert, sha256

from erofs_tools.errors import RegistryError
from erofs_tools.registry import Credentials, RegistryClient

pytestmark = pytest.mark.registry

USER, PASSWORD = "alice", "pw-not-for-other-hosts"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
DATA = os.urandom(100_000)


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 (optionally TLS) recording every request as
    (method, path, headers); ``handle(h, body)`` answers."""

    def __init__(self, handle, tls: tuple[str, str] | None = None):
        self.seen: list[tuple[str, str, dict]] = []
        server = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def any(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                server.seen.append((self.command, self.path, dict(self.headers)))
                handle(self, body)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = any

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.url = f"{'https' if tls else 'http'}://{self.host}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _answer(h, status, headers=None, body=b""):
    h.send_response(status)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


def _upload_sink():
    """The other host: takes PATCHes and the final PUT like a registry would."""
    got = [0]

    def handle(h, body):
        if h.command == "PATCH":
            got[0] += len(body)
            _answer(h, 202, {"Range": f"0-{got[0] - 1}", "Location": h.path})
        elif h.command == "PUT":
            _answer(h, 201, {"Docker-Content-Digest": sha256(DATA)})
        else:
            _answer(h, 404)
    return handle


def _fake_registry(post_location, patch_location=None, tls=None):
    """Wants Basic auth; no blob exists; POST opens a session at ``post_location``;
    a PATCH to its own session answers with ``patch_location``."""

    def handle(h, body):
        if h.headers.get("Authorization") != BASIC:
            _answer(h, 401, {"WWW-Authenticate": 'Basic realm="fake"'})
        elif h.command == "HEAD":
            _answer(h, 404)
        elif h.command == "POST":
            _answer(h, 202, {"Location": post_location, "Docker-Upload-UUID": "u1"})
        elif h.command == "PATCH":
            _answer(h, 202, {"Range": f"0-{len(body) - 1}",
                             "Location": patch_location or h.path})
        elif h.command == "PUT":
            _answer(h, 201, {"Docker-Content-Digest": sha256(DATA)})
        else:
            _answer(h, 405)

    return _Server(handle, tls)


@pytest.fixture
def cert(tmp_path):
    return make_tls_cert(str(tmp_path))


def _client(host, insecure, cert=None):
    return RegistryClient(host, insecure=insecure, credentials=Credentials(USER, PASSWORD),
                          docker_config=False, ca_certs=cert and cert[0], retries=1,
                          backoff=0.01)


@pytest.mark.parametrize("where", ["post", "patch"])
def test_https_registry_cannot_move_upload_to_plain_http(cert, where):
    other = _Server(_upload_sink())
    loc = f"{other.url}/upload/u1?_state=secret"
    reg = _fake_registry(loc if where == "post" else "/v2/app/blobs/uploads/u1",
                         loc if where == "patch" else None, tls=cert)
    try:
        c = _client(reg.host, insecure=False, cert=cert)
        with pytest.raises(RegistryError, match="refusing upload location .*plain HTTP") as e:
            c.push_blob("app", DATA, chunk_size=40_000 if where == "patch" else None)
        assert "secret" not in str(e.value) and "\n" not in str(e.value)
        assert other.seen == []                 # not a byte, not a credential
        # The registry itself did get the credentials (over TLS): the flow really ran.
        assert any(hd.get("Authorization") == BASIC for _, _, hd in reg.seen)
    finally:
        reg.stop()
        other.stop()


@pytest.mark.parametrize("insecure", [False, True])
def test_upload_on_another_host_gets_no_credentials(cert, insecure):
    """A location on another origin (object storage, a second front) is followed, but
    without the registry's Authorization: the push completes there."""
    other = _Server(_upload_sink(), tls=None if insecure else cert)
    reg = _fake_registry(f"{other.url}/upload/u2", tls=None if insecure else cert)
    try:
        c = _client(reg.host, insecure=insecure, cert=cert)
        r = c.push_blob("app", DATA, chunk_size=30_000)
        assert (r.digest, r.how) == (sha256(DATA), "uploaded")
        methods = [m for m, _, _ in other.seen]
        assert methods == ["PATCH"] * 4 + ["PUT"]
        assert [hd.get("Authorization") for _, _, hd in other.seen] == [None] * 5
    finally:
        reg.stop()
        other.stop()


def test_same_host_other_scheme_is_another_origin(cert):
    """https://host:P to http://host:Q: a downgrade on the same host is refused too."""
    plain = _Server(_upload_sink())
    reg = _fake_registry(f"http://127.0.0.1:{plain.httpd.server_address[1]}/up", tls=cert)
    try:
        with pytest.raises(RegistryError, match="refusing upload location"):
            _client(reg.host, insecure=False, cert=cert).push_blob("app", DATA)
        assert plain.seen == []
    finally:
        reg.stop()
        plain.stop()
