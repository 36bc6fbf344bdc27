"""Fault-injection helpers for the reliability suites (tests/test_faults_*.py,
tests/test_load.py). No tests here.

    proxy = FaultProxy(registry.host, match=r"^GET /v2/fault/")
    proxy.script(("status", 503), ("status", 503))     # the next two matching requests
    proxy.always(("wrong",))                             # every matching request
    proxy.clear()
    proxy.log                                            # [Request] of everything seen

FaultProxy is an HTTP reverse proxy in front of a registry (the daemon is pointed at the
proxy's host as if it were the registry; the Host header is forwarded, so the registry's
own URLs point back through the proxy). Behaviours, per matching request:

    ("status", code[, retry_after])   answer `code` (500/502/503/429/404...), optional
                                      Retry-After, empty body
    ("drop",)                         close the connection without answering
    ("hold", seconds)                 accept, answer nothing for `seconds`, then close
                                      (a client read timeout fires first)
    ("trickle", bytes_per_s)          forward, then send the body slowly
    ("reset",)                        forward, send headers and half the body, then RST
    ("short",)                        forward, send the full Content-Length header but only
                                      half the body, then FIN
    ("wrong",)                        forward with one byte of the body flipped (same
                                      length: only the chunk digest can tell)
    ("longer",)                       forward with 16 extra bytes appended
    ("redirect_loop",)                307 to the same URL, forever
    ("unauth",)                       forward without the Authorization header: the
                                      registry itself rejects the request (a token that
                                      expired mid-run)
    ("delay", seconds)                forward normally after `seconds` (a slow backend)
    ("gate", event, pred)             a request for which pred(Request) is true waits until
                                      `event` is set (at most 600 s), then is forwarded;
                                      the others at once (`gated` counts those that waited)

`on_sent(request)`, if set, is called right after a faulted-or-not matching ranged GET's
body was sent in full (e.g. to SIGKILL the daemon while it verifies and writes).

`match` is a regex on "METHOD PATH"; only requests with a Range header are faulted when
`ranged_only` (the daemon's chunk reads, not its manifest/HEAD lookups).

Also: `FaultProxy.tls(...)` serves HTTPS with a self-signed certificate (for "TLS
verification is on by default"), `loop_fs(size)` a small loop-mounted ext4 (disk-full
tests), `env_int(name, default)` for configurable fault counts.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import re
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
        "proxy-authorization", "proxy-authenticate", "content-length"}


# FAULTS_DISABLE=1 turns every FaultProxy into a plain proxy: the fault tests must then
# fail (each asserts its faults happened), which is how that is demonstrated.
DISABLED = os.environ.get("FAULTS_DISABLE") == "1"


def env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass
class Request:
    t: float
    method: str
    path: str
    range: str | None
    authorization: str | None = field(repr=False)
    fault: tuple | None
    status: int | None = None

    def byte_range(self) -> tuple[int, int] | None:
        """(first, last) of a `bytes=a-b` Range header."""
        m = re.match(r"bytes=(\d+)-(\d+)$", self.range or "")
        return (int(m.group(1)), int(m.group(2))) if m else None


class FaultProxy:
    """Reverse proxy with scripted faults (see the module docstring)."""

    def __init__(self, target: str, match: str = r"^GET /v2/.*/blobs/",
                 ranged_only: bool = True, bind: str = "127.0.0.1",
                 tls: tuple[str, str] | None = None):
        self.target = target
        self.match = re.compile(match)
        self.ranged_only = ranged_only
        self.log: list[Request] = []
        self.injected: dict[str, int] = {}
        self._script: list[tuple] = []
        self._always: tuple | None = None
        self.on_sent = None
        self.gated = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_one(self):
                proxy._handle(self)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = handle_one

            def log_message(self, *args):
                pass

        self._server = http.server.ThreadingHTTPServer((bind, 0), Handler)
        self._server.daemon_threads = True
        self._server.handle_error = lambda *a: None     # clients that hang up (killed)
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self.host = f"{bind}:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    # -- control ------------------------------------------------------------------------
    def script(self, *faults: tuple) -> None:
        """Queue faults for the next matching requests (one each)."""
        with self._lock:
            self._script.extend(faults)

    def always(self, fault: tuple | None) -> None:
        """Apply `fault` to every matching request (after the script is used up)."""
        with self._lock:
            self._always = fault

    def pending(self) -> int:
        """Scripted faults not injected yet (a test asserts 0: every fault happened)."""
        with self._lock:
            return len(self._script)

    def clear(self) -> None:
        with self._lock:
            self._script.clear()
            self._always = None

    def mark(self) -> int:
        """A position in the request log (for "what happened after this point")."""
        with self._lock:
            return len(self.log)

    def blob_gets(self, since: int = 0) -> list[Request]:
        with self._lock:
            return [r for r in self.log[since:] if r.method == "GET" and "/blobs/" in r.path
                    and r.range]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- serving ------------------------------------------------------------------------
    def _pick(self, h) -> Request:
        line = f"{h.command} {h.path}"
        rng = h.headers.get("Range")
        fault = None
        with self._lock:
            if DISABLED:
                pass        # FAULTS_DISABLE=1: inject nothing (shows the tests notice)
            elif self.match.search(line) and (rng or not self.ranged_only):
                if self._script:
                    fault = self._script.pop(0)
                elif self._always:
                    fault = self._always
            if fault:
                self.injected[fault[0]] = self.injected.get(fault[0], 0) + 1
            req = Request(time.monotonic(), h.command, h.path, rng,
                          h.headers.get("Authorization"), fault)
            self.log.append(req)
        return req

    def _handle(self, h) -> None:
        req = self._pick(h)
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        fault = req.fault
        kind = fault[0] if fault else None
        if kind == "drop":
            return self._abort(h)
        if kind == "hold":
            time.sleep(fault[1])
            return self._abort(h)
        if kind == "status":
            req.status = fault[1]
            h.send_response(fault[1])
            if len(fault) > 2 and fault[2] is not None:
                h.send_header("Retry-After", str(fault[2]))
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if kind == "delay":
            time.sleep(fault[1])
        if kind == "gate" and fault[2](req):
            with self._lock:
                self.gated += 1
            fault[1].wait(600)
        if kind == "redirect_loop":
            req.status = 307
            h.send_response(307)
            h.send_header("Location", h.path)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
        if kind == "unauth":
            headers.pop("Authorization", None)
        conn = http.client.HTTPConnection(self.target, timeout=60)
        try:
            conn.request(h.command, h.path, body=body if (body or length) else None,
                         headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            rheaders = resp.getheaders()
            status = resp.status
        except OSError:
            return self._abort(h)
        finally:
            conn.close()
        req.status = status
        if h.command != "HEAD" and data and status in (200, 206):
            if kind == "wrong":
                b = bytearray(data)
                b[len(b) // 2] ^= 0x5A
                data = bytes(b)
            elif kind == "longer":
                data += b"\0" * 16
        h.send_response(status)
        for k, v in rheaders:
            if k.lower() not in _HOP:
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command == "HEAD":
            return
        try:
            if kind in ("reset", "short") and status in (200, 206):
                h.wfile.write(data[:len(data) // 2])
                h.wfile.flush()
                return self._abort(h, rst=kind == "reset")
            if kind == "trickle" and data:
                rate = max(1, int(fault[1]))
                piece = max(1, rate // 20)
                for i in range(0, len(data), piece):
                    h.wfile.write(data[i:i + piece])
                    h.wfile.flush()
                    time.sleep(piece / rate)
                return
            h.wfile.write(data)
            h.wfile.flush()
        except OSError:
            h.close_connection = True
            return
        cb = self.on_sent
        if cb is not None and req.range and self.match.search(f"{req.method} {req.path}"):
            cb(req)

    @staticmethod
    def _abort(h, rst: bool = False) -> None:
        h.close_connection = True
        try:
            if rst:     # SO_LINGER 0: close sends RST instead of FIN
                h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
            else:
                h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


# ----------------------------------------------------------------------- file systems --
@contextlib.contextmanager
def loop_fs(size: int, fstype: str = "ext4"):
    """A fresh `fstype` of `size` bytes on a loop device, mounted; yields the mount point.
    (Root only.)"""
    work = tempfile.mkdtemp(prefix="faults-loopfs-", dir="/var/tmp")
    img = os.path.join(work, "fs.img")
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt)
    with open(img, "wb") as f:
        f.truncate(size)
    subprocess.run([f"mkfs.{fstype}", "-q", "-F", "-m", "0", img] if fstype.startswith("ext")
                   else [f"mkfs.{fstype}", img], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", img, mnt], check=True, capture_output=True)
    try:
        yield mnt
    finally:
        r = subprocess.run(["umount", mnt], capture_output=True)
        if r.returncode:
            subprocess.run(["umount", "-l", mnt], capture_output=True)
        with contextlib.suppress(OSError):
            os.unlink(img)
            os.rmdir(mnt)
            os.rmdir(work)


def fill_fs(directory: str, leave: int = 0, name: str = "filler") -> str:
    """Write a file in `directory` until only `leave` bytes are free; returns its path."""
    path = os.path.join(directory, name)
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    want = max(0, free - leave)
    with open(path, "wb") as f:
        block = b"\xa5" * (1 << 20)
        while want > 0:
            n = min(len(block), want)
            try:
                f.write(block[:n])
                f.flush()
            except OSError:
                break
            want -= n
    return path


# ----------------------------------------------------------------------- readers ------
class ReadOutcome:
    """What one timed read saw: 'ok', 'wrong', 'eio', another errno, or 'stuck'."""

    def __init__(self, kind: str, elapsed: float, detail: str = ""):
        self.kind, self.elapsed, self.detail = kind, elapsed, detail

    def __repr__(self):
        return f"ReadOutcome({self.kind}, {self.elapsed:.2f}s{', ' + self.detail if self.detail else ''})"


def timed_read(path: str, expected: bytes, timeout: float) -> ReadOutcome:
    """Read `path` whole in a thread; classify the result against `expected`."""
    import errno as _errno
    out: dict = {}

    def run():
        t0 = time.monotonic()
        try:
            with open(path, "rb") as f:
                data = f.read()
            out["r"] = ReadOutcome("ok" if data == expected else "wrong",
                                   time.monotonic() - t0,
                                   "" if data == expected else _diff(data, expected))
        except OSError as e:
            kind = "eio" if e.errno == _errno.EIO else _errno.errorcode.get(e.errno, str(e.errno))
            out["r"] = ReadOutcome(kind, time.monotonic() - t0, str(e))

    t0 = time.monotonic()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        return ReadOutcome("stuck", time.monotonic() - t0)
    return out["r"]


def _diff(data: bytes, expected: bytes) -> str:
    if len(data) != len(expected):
        return f"length {len(data)} != {len(expected)}"
    for i, (a, b) in enumerate(zip(data, expected)):
        if a != b:
            zeros = data[i:i + 4096].count(0) == len(data[i:i + 4096])
            return f"first difference at {i}{' (zeros)' if zeros else ''}"
    return "?"


def percentile(values, q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(q / 100.0 * (len(s) - 1)))))
    return s[k]
