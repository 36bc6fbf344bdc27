"""Retries (5xx, 429 + Retry-After, dropped and cut connections), redirects to storage
(no credentials forwarded, cached per blob), and an HTTP proxy in front of the registry."""

import base64
import http.server
import os
import re
import threading
import time

import pytest
from registry_fixtures import FlakyProxy, free_port, registry, sha256  # noqa: F401

from erofs_tools.errors import RegistryError
from erofs_tools.registry import Credentials

pytestmark = pytest.mark.registry

DATA = os.urandom(200_000)


@pytest.fixture
def flaky(registry):
    proxies = []

    def make(failures, match=".*", retry_after=None):
        p = FlakyProxy(registry.host, failures, match, retry_after)
        proxies.append(p)
        return p

    yield make
    for p in proxies:
        p.stop()


def test_retry_on_5xx(registry, flaky):
    d = registry.client().push_blob("r/a", DATA).digest
    proxy = flaky([503, 500, 502], match=r"GET /v2/r/a/blobs/")
    c = registry.client(host=proxy.host)
    assert c.get_blob("r/a", d) == DATA
    assert sum("GET /v2/r/a/blobs/" in r for r in proxy.requests) == 4
    assert c.transport.retried == 3


def test_retry_after_is_honoured(registry, flaky):
    d = registry.client().push_blob("r/b", DATA).digest
    proxy = flaky([429], match=r"/blobs/", retry_after="1")
    c = registry.client(host=proxy.host, max_backoff=5.0)
    t = time.monotonic()
    assert c.read_blob_range("r/b", d, 100, 50) == DATA[100:150]
    assert time.monotonic() - t >= 0.9


def test_retries_are_bounded(registry, flaky):
    d = registry.client().push_blob("r/c", DATA).digest
    proxy = flaky([503] * 10, match=r"/blobs/")
    c = registry.client(host=proxy.host, retries=2)
    with pytest.raises(RegistryError, match=r"HTTP 503 \(after 3 attempts\)") as e:
        c.get_blob("r/c", d)
    assert "\n" not in str(e.value)
    assert len(proxy.requests) == 3


def test_deadline_bounds_retrying(registry, flaky):
    """A registry that keeps asking for an hour's patience: the deadline ends it."""
    d = registry.client().push_blob("r/dl", DATA).digest
    proxy = flaky([503] * 50, match=r"/blobs/", retry_after="3600")
    c = registry.client(host=proxy.host, retries=20, max_backoff=2.0, deadline=5.0)
    t = time.monotonic()
    with pytest.raises(RegistryError, match="out of time"):
        c.read_blob_range("r/dl", d, 0, 100)
    took = time.monotonic() - t
    # the deadline, structurally: each wait is 2 s (Retry-After capped), so no attempt
    # after the third can start within 5 s (20 retries would wait 40 s). The clock only
    # bounds a hang: a wall-clock bound a few seconds past the deadline (was 8 s) was a
    # loaded machine's to break
    assert 2 <= len(proxy.requests) <= 3, proxy.requests
    assert 3.5 <= took < 20, took


def test_dropped_connections_during_upload_and_manifests(registry, flaky):
    # Drop the first POST, PUT and manifest GET on the floor; everything still works.
    proxy = flaky(["drop", "drop", "drop"], match=r"^(POST|PUT|GET /v2/r/d/manifests)")
    c = registry.client(host=proxy.host)
    from erofs_tools.registry import BlobSource, push_image
    from erofs_tools.registry import mediatypes as mt
    m = push_image(c, "r/d", "v1", BlobSource(b"{}", mt.OCI_CONFIG),
                   [BlobSource(DATA, mt.OCI_LAYER_TAR_GZIP)])
    assert c.get_manifest("r/d", "v1").digest == m.digest
    assert proxy.failures == [] and c.transport.retried >= 3


def test_5xx_on_upload_body_resends_it(registry, flaky, tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(DATA)
    proxy = flaky([500, 503], match=r"^(PUT|PATCH) ")
    c = registry.client(host=proxy.host)
    assert c.push_blob("r/e", str(path)).how == "uploaded"          # monolithic PUT
    assert c.get_blob("r/e", sha256(DATA)) == DATA
    other = DATA[::-1]
    proxy.failures = [503, 502]
    assert c.push_blob("r/e", other, chunk_size=64 * 1024).how == "uploaded"   # PATCHes
    assert c.get_blob("r/e", sha256(other)) == other


def test_lost_answers_during_upload(registry, flaky, tmp_path):
    """The registry acted but the answer never arrived: a committed PUT is recognised,
    a PATCH whose fate is unknown makes the upload start over in a new session."""
    path = tmp_path / "blob"
    path.write_bytes(DATA)
    proxy = flaky(["lose"], match=r"^PUT ")
    c = registry.client(host=proxy.host)
    assert c.push_blob("r/l", str(path)).how == "uploaded"
    assert c.get_blob("r/l", sha256(DATA)) == DATA
    other = DATA[::-1]
    proxy.failures = ["lose"]
    proxy.match = re.compile(r"^PATCH ")
    posts = sum(r.startswith("POST") for r in proxy.requests)
    assert c.push_blob("r/l", other, chunk_size=64 * 1024).how == "uploaded"
    assert sum(r.startswith("POST") for r in proxy.requests) == posts + 2
    assert c.get_blob("r/l", sha256(other)) == other


def test_cut_download_resumes_with_range(registry, flaky, tmp_path):
    d = registry.client().push_blob("r/f", DATA).digest
    proxy = flaky(["cut"], match=r"GET /v2/r/f/blobs/")
    c = registry.client(host=proxy.host)
    assert c.pull_blob("r/f", d, tmp_path / "out") == len(DATA)
    assert (tmp_path / "out").read_bytes() == DATA
    ranges = [h.get("Range") for h in proxy.seen_headers if h.get("Range")]
    assert ranges and ranges[0].startswith("bytes=") and ranges[0] != "bytes=0-"


def test_http_proxy_for_blob_reads(registry, flaky):
    d = registry.client().push_blob("r/g", DATA).digest
    proxy = flaky([])
    c = registry.client(proxy=f"http://{proxy.host}",
                        proxy_headers={"X-Dragonfly-Use-P2P": "true"})
    assert c.read_blob_range("r/g", d, 10, 20) == DATA[10:30]
    assert proxy.seen_headers[0].get("X-Dragonfly-Use-P2P") == "true"
    assert c.get_blob("r/g", d) == DATA
    blob_reads = [r for r in proxy.requests if "/v2/r/g/blobs/" in r]
    assert len(blob_reads) == 2 and blob_reads[0].startswith("GET http://")  # absolute form
    assert c.blob_exists("r/g", d)                   # HEAD and manifests go direct
    assert not [r for r in proxy.requests if r.startswith("HEAD")]
    assert c.transport.proxy_fallbacks == 0


def test_dead_proxy_falls_back_to_direct(registry):
    d = registry.client().push_blob("r/h", DATA).digest
    c = registry.client(proxy=f"http://127.0.0.1:{free_port()}")   # nothing listens
    assert c.read_blob_range("r/h", d, 0, 5) == DATA[:5]
    assert c.get_blob("r/h", d) == DATA
    assert c.transport.proxy_fallbacks == 1          # then direct for a while
    assert "MaxRetryError" in c.transport.last_proxy_error or \
        "NewConnectionError" in c.transport.last_proxy_error, c.transport.last_proxy_error


class _Storage:
    """Fake object storage on its own port: serves blobs with Range, can answer 403
    once (an expired signed URL), and records the Authorization headers it gets."""

    def __init__(self, blobs):
        self.blobs, self.auth_seen, self.hits, self.expire_next = blobs, [], 0, False
        storage = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                storage.hits += 1
                storage.auth_seen.append(self.headers.get("Authorization"))
                data = storage.blobs.get(self.path.split("?")[0].rsplit("/", 1)[-1])
                status = 200
                if storage.expire_next or data is None:
                    storage.expire_next = False
                    status, data = 403, b""
                elif self.headers.get("Range"):
                    first, last = self.headers["Range"][6:].split("-")
                    first, last = int(first), min(int(last or len(data) - 1), len(data) - 1)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
                    data = data[first:last + 1]
                    status = None
                if status:
                    self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class _RedirectingRegistry:
    """A registry front that wants Basic auth and redirects blob GETs to storage."""

    def __init__(self, storage, user, password):
        self.hits = 0
        expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        front = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                if self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="test"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                front.hits += 1
                hexd = self.path.rsplit("sha256:", 1)[-1]
                self.send_response(307)
                self.send_header("Location", f"{storage.url}/bucket/{hexd}?X-Signature=s3cr3t")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_redirect_to_storage():
    d = sha256(DATA)
    storage = _Storage({d.split(":")[1]: DATA})
    front = _RedirectingRegistry(storage, "u", "pw")
    try:
        from erofs_tools.registry import RegistryClient
        c = RegistryClient(front.host, insecure=True, credentials=Credentials("u", "pw"),
                           backoff=0.01)
        assert c.get_blob("x/y", d) == DATA
        assert c.read_blob_range("x/y", d, 7, 9) == DATA[7:16]
        assert c.read_blob_range("x/y", d, 1000, 1) == DATA[1000:1001]
        assert storage.auth_seen == [None, None, None]     # credentials stayed home
        assert front.hits == 1                              # location cached per blob
        storage.expire_next = True                          # signed URL expired
        assert c.read_blob_range("x/y", d, 0, 3) == DATA[:3]
        assert front.hits == 2
        storage.blobs.clear()
        with pytest.raises(RegistryError) as e:
            c.get_blob("x/y", d)
        assert "s3cr3t" not in str(e.value)                 # no signed query in errors
    finally:
        front.server.shutdown()
        storage.server.shutdown()
