"""Mirrors and proxies that do not behave (issue 19 items 17 and 18).

17: a server that ignores Range and answers 200 with the whole blob -- a real cold
pull-through docker-registry mirror does exactly that -- gives the asked range, taken out
of the stream in bounded pieces; a download broken midway resumes against such a server.
18: a proxy's own refusal (squid's stock 403, a 502, a 407) falls back to direct; the
registry's answer passed on by the proxy does not."""

from __future__ import annotations

import os
import time
import urllib.request

import pytest
from registry_fixtures import FlakyProxy, registry, start_registry  # noqa: F401
from test_registry_hostile import _answer, _Server

from erofs_tools.errors import RegistryError
from erofs_tools.registry import RegistryClient

pytestmark = pytest.mark.registry

DATA = os.urandom(3_000_000)


@pytest.fixture
def mirror(registry, tmp_path):  # noqa: F811
    """A pull-through docker-registry (proxy.remoteurl) in front of ``registry``."""
    m = start_registry(str(tmp_path / "mirror"), extra_config={
        "proxy": {"remoteurl": registry.url}})
    yield m
    m.stop()


def test_cold_pull_through_mirror_range_reads(registry, mirror):  # noqa: F811
    origin = registry.client()
    probe = origin.push_blob("lib/app", os.urandom(100_000)).digest
    d = origin.push_blob("lib/app", DATA).digest
    # What makes this test bite: the cold mirror ignores Range (checked on another blob).
    req = urllib.request.Request(f"{mirror.url}/v2/lib/app/blobs/{probe}",
                                 headers={"Range": "bytes=10-19"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200 and r.headers.get("Content-Range") is None
    c = mirror.client()
    assert c.read_blob_range("lib/app", d, 1_000_000, 4096) == DATA[1_000_000:1_004_096]
    assert c.read_blob_range("lib/app", d, 0, 10) == DATA[:10]
    assert c.read_blob_range("lib/app", d, len(DATA) - 5, 100) == DATA[-5:]
    assert c.get_blob("lib/app", d) == DATA


PATTERN = bytes(range(256)) * 256          # byte i of the endless blob is i % 256


def _ignoring_range(endless: bool, cut_first: bool = False, blob: bytes = DATA):
    """A server answering every blob GET with 200 and the whole body (Range ignored):
    an endless pattern, or ``blob`` (the first answer cut halfway with cut_first)."""
    state = {"sent": 0, "gets": 0}

    def handle(h, body):
        if "/blobs/" not in h.path:
            return _answer(h, 200)
        state["gets"] += 1
        h.send_response(200)
        if endless:
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            try:
                while state["sent"] < 8 << 30:
                    h.wfile.write(b"%x\r\n%s\r\n" % (len(PATTERN), PATTERN))
                    state["sent"] += len(PATTERN)
            except OSError:
                state["dropped"] = True         # the client closed the connection
        else:
            h.send_header("Content-Length", str(len(blob)))
            h.end_headers()
            data = blob[:len(blob) // 2] if cut_first and state["gets"] == 1 else blob
            h.wfile.write(data)
        h.close_connection = True

    return _Server(handle), state


def test_range_out_of_an_endless_200_is_bounded():
    srv, state = _ignoring_range(endless=True)
    try:
        c = RegistryClient(srv.host, insecure=True, docker_config=False, retries=0)
        t = time.monotonic()
        off, n = 64 << 20, 100_000
        got = c.read_blob_range("x/y", "sha256:" + "a" * 64, off, n)
        seconds = time.monotonic() - t
        assert got == bytes((off + i) % 256 for i in range(n))
        # bounded by what the server sent (below), not by the clock: skipping 64 MiB
        # of stream took 2.2 s of the 10 s this asserted at load 10 here
        assert seconds < 120, seconds           # a hang bound only
        deadline = time.monotonic() + 120
        while not state.get("dropped") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state.get("dropped")                     # the rest was never read:
        assert state["sent"] < off + n + (32 << 20)     # only socket buffers' worth more
    finally:
        srv.stop()


def test_download_resumes_against_a_server_ignoring_range(tmp_path):
    import hashlib
    srv, state = _ignoring_range(endless=False, cut_first=True)
    try:
        c = RegistryClient(srv.host, insecure=True, docker_config=False, backoff=0.01)
        d = "sha256:" + hashlib.sha256(DATA).hexdigest()
        assert c.pull_blob("x/y", d, tmp_path / "blob") == len(DATA)
        assert (tmp_path / "blob").read_bytes() == DATA and state["gets"] == 2
    finally:
        srv.stop()


# --- item 18: whose error is it? -----------------------------------------------------

def _squid_like(status: int, marker: dict):
    def handle(h, body):
        _answer(h, status, {"Server": "squid/6.13", **marker}, b"<html>denied</html>")
    return _Server(handle)


@pytest.mark.parametrize("status,marker", [
    (403, {"X-Squid-Error": "ERR_ACCESS_DENIED 0"}),        # Debian's stock squid
    (502, {"X-Squid-Error": "ERR_CONNECT_FAIL 111"}),
    (502, {}),                                               # some other gateway
    (407, {"Proxy-Authenticate": 'Basic realm="proxy"'}),
    (500, {"X-Dragonfly-Error-Type": "proxy"}),              # dfdaemon
])
def test_proxy_own_errors_fall_back_to_direct(registry, status, marker):  # noqa: F811
    d = registry.client().push_blob("r/p", DATA).digest
    proxy = _squid_like(status, marker)
    try:
        c = registry.client(proxy=proxy.url)
        assert c.read_blob_range("r/p", d, 5, 10) == DATA[5:15]
        assert c.transport.proxy_fallbacks == 1
        assert c.transport.last_proxy_error == f"HTTP {status}"
        assert proxy.seen and proxy.seen[0][1].startswith("http://")  # really asked it
    finally:
        proxy.stop()


def test_registry_answers_through_the_proxy_are_not_proxy_errors(registry):  # noqa: F811
    """A 404 or a distribution-marked 403/503 passed on by the proxy is the registry's
    answer: no fallback (the direct request would get the same)."""
    proxy = FlakyProxy(registry.host)
    try:
        c = registry.client(proxy=f"http://{proxy.host}")
        with pytest.raises(RegistryError, match="HTTP 404"):
            c.read_blob_range("r/q", "sha256:" + "b" * 64, 0, 10)
        assert c.transport.proxy_fallbacks == 0
    finally:
        proxy.stop()

    def denying(h, body):
        _answer(h, 403, {"Docker-Distribution-Api-Version": "registry/2.0"},
                b'{"errors":[{"code":"DENIED","message":"no"}]}')
    reg = _Server(denying)
    relay = FlakyProxy(reg.host)
    try:
        c = RegistryClient(reg.host, insecure=True, docker_config=False, retries=0,
                           proxy=f"http://{relay.host}")
        with pytest.raises(RegistryError, match="DENIED"):
            c.read_blob_range("r/q", "sha256:" + "b" * 64, 0, 10)
        assert c.transport.proxy_fallbacks == 0
        assert len(reg.seen) == 1                         # only through the proxy
    finally:
        relay.stop()
        reg.stop()
