"""A registry that sends its answer's headers at once and then the body a byte at a time,
each byte well inside the read timeout (slowloris): the daemon's deadline
(RetryPolicy.deadline, FETCH_RETRY_DEADLINE) must bound the body too, else a 1 MiB range
holds the reader, and the kernel's request, for hours. Hang bounds only: the asserted
outcome is the error, not a time."""

from __future__ import annotations

import os
import threading
import time

import pytest
from test_registry_hostile import _answer, _Server

from erofs_tools.errors import ErofsToolsError, RegistryError
from erofs_tools.registry import RegistryClient

pytestmark = pytest.mark.registry

BLOB_ID = "ab" * 32
SIZE = 1 << 20
HANG_BOUND = 120            # seconds; the fixed code answers within ~deadline + timeout


def _trickler():
    """206 (or 200 without Range) with a whole Content-Length, then a byte every 50 ms
    until the client hangs up or the test ends."""
    stop = threading.Event()
    state = {"sent": 0}

    def handle(h, _):
        if "/blobs/" not in h.path:
            return _answer(h, 404)
        rng = h.headers.get("Range")
        h.send_response(206 if rng else 200)
        if rng:
            first, last = (int(x) for x in rng.split("=")[1].split("-"))
            h.send_header("Content-Range", f"bytes {first}-{last}/{SIZE}")
            h.send_header("Content-Length", str(last - first + 1))
        else:
            h.send_header("Content-Length", str(SIZE))
        h.end_headers()
        h.close_connection = True
        try:
            while not stop.wait(0.05):
                h.wfile.write(b"x")
                h.wfile.flush()
                state["sent"] += 1
        except OSError:
            state["hung_up"] = True

    return _Server(handle), stop, state


def _outcome(fn):
    """fn() on a thread: ("ok", value), ("error", exception) or ("hung", None)."""
    got: dict = {}

    def run():
        try:
            got["r"] = ("ok", fn())
        except Exception as e:         # noqa: BLE001 - the outcome is what is asserted
            got["r"] = ("error", e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(HANG_BOUND)
    return got.get("r", ("hung", None))


@pytest.fixture
def trickler():
    srv, stop, state = _trickler()
    yield srv, state
    stop.set()                  # ends a client read still going (a failing run)
    srv.stop()


def _client(srv):
    return RegistryClient(srv.host, insecure=True, docker_config=False, retries=0,
                          timeout=10, deadline=1.0)


@pytest.mark.parametrize("call", ["range", "whole"])
def test_trickled_body_fails_at_the_deadline(trickler, call):
    srv, state = trickler
    c = _client(srv)
    digest = "sha256:" + BLOB_ID
    fn = (lambda: c.read_blob_range("app", digest, 4096, SIZE - 4096)) if call == "range" \
        else (lambda: c.get_blob("app", digest, max_size=SIZE))
    kind, value = _outcome(fn)
    assert kind == "error", (kind, state)
    assert isinstance(value, RegistryError) and "deadline" in str(value), value
    # the connection was dropped, not read to its end
    for _ in range(100):
        if state.get("hung_up"):
            break
        time.sleep(0.05)
    assert state.get("hung_up") and state["sent"] < SIZE


@pytest.mark.parametrize("deadline", [None, 300.0])
def test_a_slow_body_within_the_deadline_is_read_whole(deadline):
    """No deadline (the CLI's pulls), or one not reached: a body arriving in small
    pieces is read whole, range and blob."""
    import hashlib
    data = os.urandom(3 << 20)

    def handle(h, _):
        rng = h.headers.get("Range")
        first, last = (int(x) for x in rng.split("=")[1].split("-")) if rng \
            else (0, len(data) - 1)
        last = min(last, len(data) - 1)
        h.send_response(206 if rng else 200)
        if rng:
            h.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
        h.send_header("Content-Length", str(last - first + 1))
        h.end_headers()
        body = data[first:last + 1]
        for i in range(0, len(body), 100_000):
            h.wfile.write(body[i:i + 100_000])
            h.wfile.flush()
            time.sleep(0.002)
    srv = _Server(handle)
    try:
        c = RegistryClient(srv.host, insecure=True, docker_config=False, retries=0,
                           deadline=deadline)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        assert c.read_blob_range("app", digest, 5, 2 << 20) == data[5:5 + (2 << 20)]
        assert c.read_blob_range("app", digest, len(data) - 7, 100) == data[-7:]
        assert c.get_blob("app", digest, max_size=len(data)) == data
    finally:
        srv.stop()


def test_daemon_backend_read_from_a_trickling_registry_is_bounded(trickler):
    from fscache_daemon.storage.backends import RegistryBackend
    srv, state = trickler
    b = RegistryBackend(f"{srv.host}/app:v1", insecure=True, docker_config=False,
                        retries=0, timeout=10, deadline=1.0)
    try:
        kind, value = _outcome(lambda: b.read(BLOB_ID, 0, SIZE))
    finally:
        b.close()
    assert kind == "error", (kind, state)
    assert isinstance(value, ErofsToolsError) and "deadline" in str(value), value


def _trickling(what: str):
    """A registry whose manifests (what="manifest") or token realm's reply
    (what="token") come a byte every 50 ms after headers promising 64 KiB."""
    stop = threading.Event()
    state: dict = {"sent": 0}
    srv: dict = {}

    def slow(h):
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(64 << 10))
        h.end_headers()
        h.close_connection = True
        try:
            while not stop.wait(0.05):
                h.wfile.write(b" ")
                h.wfile.flush()
                state["sent"] += 1
        except OSError:
            state["hung_up"] = True

    def handle(h, _):
        if what == "token":
            if h.path.startswith("/token"):
                return slow(h)
            realm = f'{srv["s"].url}/token'
            return _answer(h, 401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="r"'})
        if "/manifests/" in h.path:
            return slow(h)
        _answer(h, 404)
    srv["s"] = _Server(handle)
    return srv["s"], stop, state


def _manifest_and_backend_fail(srv, state, warm: bool) -> None:
    """The client's manifest request fails at the deadline, and so does a read of the
    daemon's backend (after its warm(), which reads the image's manifest, if `warm`):
    neither hangs."""
    from fscache_daemon.storage.backends import RegistryBackend
    c = _client(srv)
    kind, value = _outcome(lambda: c.get_manifest("app", "v1"))
    assert kind == "error", (kind, state)
    assert isinstance(value, RegistryError) and "deadline" in str(value), value
    b = RegistryBackend(f"{srv.host}/app:v1", insecure=True, docker_config=False,
                        retries=0, timeout=10, deadline=1.0)
    try:
        kind, value = _outcome(lambda: (b.warm() if warm else None,
                                        b.read(BLOB_ID, 0, 4096)))
    finally:
        b.close()
    assert kind == "error", (kind, state)
    assert isinstance(value, ErofsToolsError), value


@pytest.mark.parametrize("what", ["manifest", "token"])
def test_trickled_manifest_or_token_fails_at_the_deadline(what):
    srv, stop, state = _trickling(what)
    try:
        # the daemon: the image's manifest is read by warm(); a read waits for it and
        # then fails (no such blob here) instead of hanging with it
        _manifest_and_backend_fail(srv, state, warm=True)
    finally:
        stop.set()
        srv.stop()


def test_trickled_headers_fail_at_the_deadline():
    """The status line and headers a byte every 50 ms, each well inside the read
    timeout: with a deadline (the daemon's) the wait for them ends there too
    (registry/watchdog.py); the client and the daemon's backend both fail, none hangs."""
    stop = threading.Event()
    state: dict = {"sent": 0}

    def handle(h, _):
        h.close_connection = True
        try:
            for b in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Slow: " + \
                    b"y" * 100_000:
                if stop.wait(0.05):
                    return
                h.wfile.write(bytes((b,)))
                h.wfile.flush()
                state["sent"] += 1
        except OSError:
            state["hung_up"] = True

    srv = _Server(handle)
    try:
        _manifest_and_backend_fail(srv, state, warm=False)
    finally:
        stop.set()
        srv.stop()
