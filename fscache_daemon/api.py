"""The management API: JSON over HTTP/1.1 on a unix socket (mode 0600, root or the
daemon's own uid only, checked with SO_PEERCRED on every connection).

    GET    /api/v1/daemon                 version, pid, front end, cache dir, cache size
                                          limit, hosts dir, uptime
    GET    /api/v1/mounts                 [mount]
    POST   /api/v1/mounts                 {"bootstrap","mountpoint","backend",
                                           "prefetch"?: bool, "domain"?: str,
                                           "options"?: {"proxy","mirror","insecure"}}
                                          -> 201 mount
    POST   /api/v1/warm                   {"bootstrap","backend","options"?} -> 202
                                          {"zran_blobs": n}: the image's zran meta blobs
                                          fetched and parsed ahead of its mount
                                          (zranwarm.py; the snapshotter, at the commit
                                          of a bootstrap layer)
    DELETE /api/v1/mounts?mountpoint=P[&lazy=1]   -> 200
    POST   /api/v1/umount                 {"mountpoint", "lazy"?}  (same as DELETE)
    GET    /api/v1/metrics                per-blob counters, latency p50/p99, process,
                                          cache (bytes, limit, in use, evicted)
    GET    /api/v1/trace?mountpoint=P|bootstrap=B   the image's access trace (trace.py)
    GET    /metrics                       the same in Prometheus text format 0.0.4
    POST   /api/v1/shutdown               stop the daemon (mounts stay)

Paths (bootstrap, mountpoint, a localfs backend's directory) must be absolute: the
daemon's working directory means nothing to a client. A mount point is kept canonical
(realpath). DELETE/umount answers {"mountpoint","unmounted":true,"released":bool}:
released false means the kernel still uses the image's superblock (another mount
namespace, an overlay, a lazily detached mount) and its blobs stay served until it lets go.

Errors are {"error": "<one line>"} with 400 (malformed request, relative path), 404 (no
such route or mount), 405, 409 (already mounted, busy, another mount covers the image,
cache directory in use), 411, 413, 500 (mount(2) or front end failure) or 502 (the
registry or blob directory behind a backend refused or failed).
"""

from __future__ import annotations

import _thread
import http
import http.client
import http.server
import json
import logging
import os
import socket
import socketserver
import struct
import threading
import time
import urllib.parse

from erofs_tools import errors as erofs_tools_errors
from erofs_tools.errors import ErofsToolsError
from fscache_daemon.errors import (
    ApiError,
    ConflictError,
    DaemonError,
    FrontendError,
    MountError,
    NotFoundError,
    check_unix_socket_path,
)
from fscache_daemon.storage import BackendUnavailableError

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20


def _status_of(exc: Exception) -> int:
    if isinstance(exc, ApiError):
        return exc.status
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, ConflictError):      # before MountError: a busy umount is both
        return 409
    if isinstance(exc, (MountError, erofs_tools_errors.MountError, FrontendError)):
        return 500
    if isinstance(exc, (erofs_tools_errors.RegistryError, BackendUnavailableError)):
        return 502      # the request was fine; the registry or blob store behind it failed
    return 400


def _absolute(field: str, value: str) -> str:
    """The daemon's working directory means nothing to a client: paths must be absolute."""
    if not os.path.isabs(value):
        raise ApiError(400, f"field {field!r} must be an absolute path, got {value!r}")
    return value


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, path, handler, daemon):
        self.fscache = daemon
        self.shutdown_requested = threading.Event()
        super().__init__(path, handler, bind_and_activate=False)

    def process_request(self, request, client_address):
        # a thread per connection, as ThreadingMixIn's, but not a threading.Thread:
        # its start() waits for the new thread to run, a few ms of every call (a mount)
        # when the daemon's GIL is busy
        _thread.start_new_thread(self.process_request_thread, (request, client_address))

    def server_bind(self):
        old = os.umask(0o177)
        try:
            self.socket.bind(self.server_address)
        finally:
            os.umask(old)
        os.chmod(self.server_address, 0o600)

    def handle_error(self, request, client_address) -> None:
        import sys
        exc = sys.exc_info()[1]
        if isinstance(exc, (BrokenPipeError, ConnectionResetError, TimeoutError)):
            log.debug("api: client went away: %s", exc)
        else:
            log.exception("api: error while serving a request")

    def verify_request(self, request, client_address) -> bool:
        try:
            _pid, uid, _gid = struct.unpack("3i", request.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        except OSError:
            return False
        if uid not in (0, os.getuid()):
            log.warning("api: refusing connection from uid %d", uid)
            return False
        return True


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fscache-daemon"

    def address_string(self) -> str:
        return "unix"

    def log_message(self, fmt, *args) -> None:
        log.debug("api: " + fmt, *args)

    # -- plumbing ---------------------------------------------------------------------
    def send_error(self, code, message=None, explain=None):
        """Protocol-level errors (bad request line, oversized headers) as JSON too."""
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        self.close_connection = True
        body = (json.dumps({"error": message or http.HTTPStatus(code).phrase}) + "\n").encode()
        try:
            self.send_response(code, message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if getattr(self, "command", None) != "HEAD" and code >= 200 and code not in (204, 304):
                self.wfile.write(body)
        except OSError:
            pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())

    def _body(self) -> dict:
        te = self.headers.get("Transfer-Encoding")
        if te:
            raise ApiError(411, "chunked request bodies are not supported; send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "Content-Length required")
        try:
            n = int(length)
        except ValueError:
            raise ApiError(400, "bad Content-Length") from None
        if n < 0:
            raise ApiError(400, "bad Content-Length")
        if n > MAX_BODY:
            raise ApiError(413, f"request body over {MAX_BODY} bytes")
        raw = self.rfile.read(n)
        if len(raw) != n:
            raise ApiError(400, "request body truncated")
        try:
            obj = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "request body is not valid JSON") from None
        if not isinstance(obj, dict):
            raise ApiError(400, "request body must be a JSON object")
        return obj

    def _route(self):
        url = urllib.parse.urlsplit(self.path)
        try:
            query = urllib.parse.parse_qs(url.query, strict_parsing=False)
        except ValueError:
            raise ApiError(400, "bad query string") from None
        return url.path.rstrip("/") or "/", query

    def _dispatch(self, method: str) -> None:
        try:
            path, query = self._route()
            handler = ROUTES.get(path)
            if handler is None:
                raise ApiError(404, f"no such endpoint {path}")
            fn = handler.get(method)
            if fn is None:
                raise ApiError(405, f"{method} not allowed on {path}")
            fn(self, query)
        except (ErofsToolsError, ValueError, TypeError) as e:
            status = _status_of(e) if isinstance(e, ErofsToolsError) else 400
            if status >= 500:
                log.error("api: %s %s: %s", method, self.path, e)
            self._json(status, {"error": str(e).splitlines()[0] if str(e) else type(e).__name__})
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # noqa: BLE001 - a bug must not kill the API
            log.exception("api: %s %s failed", method, self.path)
            self._json(500, {"error": f"internal error: {type(e).__name__}"})

    def do_GET(self):  # noqa: N802
        self._dispatch("GET")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def do_DELETE(self):  # noqa: N802
        self._dispatch("DELETE")

    def do_PUT(self):  # noqa: N802
        self._dispatch("PUT")

    # -- endpoints ----------------------------------------------------------------------
    @property
    def d(self):
        return self.server.fscache

    def get_daemon(self, _q):
        from fscache_daemon import __version__
        d = self.d
        self._json(200, {"version": __version__, "pid": os.getpid(),
                         "frontend": d.frontend.name, "cache_dir": d.cache_dir,
                         "threads": d.pool.threads, "mounts": len(d.images),
                         "detached": len(d.detached), "cache_size": d.cache_size,
                         # mounts the kernel has that this daemon could not take back
                         # after its restart yet (restore.py): retried until it can
                         "unpicked": [{"mountpoint": u.mountpoint, "error": u.error}
                                      for u in list(d.unpicked)],
                         "hosts_dir": d.hosts_dir,
                         "containerd_config": d.containerd_config,
                         "uptime_s": round(time.time() - d.started_at, 3)})

    def get_mounts(self, _q):
        self._json(200, self.d.list())

    def post_mounts(self, _q):
        b = self._body()
        for k in ("bootstrap", "mountpoint", "backend"):
            if not isinstance(b.get(k), str) or not b[k]:
                raise ApiError(400, f"field {k!r} (non-empty string) is required")
        prefetch = b.get("prefetch", False)
        domain = b.get("domain")
        options = b.get("options") or {}
        if not isinstance(prefetch, bool):
            raise ApiError(400, "field 'prefetch' must be a boolean")
        if domain is not None and not isinstance(domain, str):
            raise ApiError(400, "field 'domain' must be a string")
        if not isinstance(options, dict) or any(k not in ("proxy", "mirror", "insecure")
                                                for k in options):
            raise ApiError(400, "field 'options' may hold only proxy, mirror, insecure")
        unknown = set(b) - {"bootstrap", "mountpoint", "backend", "prefetch", "domain",
                            "options"}
        if unknown:
            raise ApiError(400, f"unknown fields {sorted(unknown)}")
        _absolute("bootstrap", b["bootstrap"])
        _absolute("mountpoint", b["mountpoint"])
        if b["backend"].startswith("localfs:"):
            _absolute("backend", b["backend"][len("localfs:"):])
        # the mount's record saved after the answer (Daemon.mount's state_later)
        try:
            self._json(201, self.d.mount(b["bootstrap"], b["mountpoint"], b["backend"],
                                         prefetch=prefetch, domain=domain, options=options,
                                         state_later=True))
        finally:
            self.d.save_state_later()

    def post_warm(self, _q):
        b = self._body()
        for k in ("bootstrap", "backend"):
            if not isinstance(b.get(k), str) or not b[k]:
                raise ApiError(400, f"field {k!r} (non-empty string) is required")
        options = b.get("options") or {}
        if not isinstance(options, dict) or any(k not in ("proxy", "mirror", "insecure")
                                                for k in options):
            raise ApiError(400, "field 'options' may hold only proxy, mirror, insecure")
        unknown = set(b) - {"bootstrap", "backend", "options"}
        if unknown:
            raise ApiError(400, f"unknown fields {sorted(unknown)}")
        _absolute("bootstrap", b["bootstrap"])
        if b["backend"].startswith("localfs:"):
            _absolute("backend", b["backend"][len("localfs:"):])
        self._json(202, self.d.warm(b["bootstrap"], b["backend"], options))

    def _umount(self, mountpoint, lazy):
        if not isinstance(mountpoint, str) or not mountpoint:
            raise ApiError(400, "mountpoint (non-empty string) is required")
        _absolute("mountpoint", mountpoint)
        self._json(200, self.d.umount(mountpoint, lazy=bool(lazy)))

    def delete_mounts(self, q):
        mp = q.get("mountpoint", [None])[0]
        lazy = q.get("lazy", ["0"])[0] in ("1", "true", "yes")
        self._umount(mp, lazy)

    def post_umount(self, _q):
        b = self._body()
        lazy = b.get("lazy", False)
        if not isinstance(lazy, bool):
            raise ApiError(400, "field 'lazy' must be a boolean")
        self._umount(b.get("mountpoint"), lazy)

    def get_trace(self, q):
        mp, boot = q.get("mountpoint", [None])[0], q.get("bootstrap", [None])[0]
        if (mp is None) == (boot is None):
            raise ApiError(400, "give exactly one of mountpoint= and bootstrap=")
        _absolute("mountpoint" if mp else "bootstrap", mp or boot)
        self._json(200, self.d.trace(mountpoint=mp, bootstrap=boot))

    def get_metrics(self, _q):
        self._json(200, self.d.metrics())

    def get_prometheus(self, _q):
        from fscache_daemon.metrics import prometheus_text
        self._send(200, prometheus_text(self.d.metrics()).encode(),
                   "text/plain; version=0.0.4; charset=utf-8")

    def post_shutdown(self, _q):
        self._json(202, {"stopping": True})
        self.server.shutdown_requested.set()


ROUTES = {
    "/api/v1/daemon": {"GET": _Handler.get_daemon},
    "/api/v1/mounts": {"GET": _Handler.get_mounts, "POST": _Handler.post_mounts,
                       "DELETE": _Handler.delete_mounts},
    "/api/v1/umount": {"POST": _Handler.post_umount},
    "/api/v1/warm": {"POST": _Handler.post_warm},
    "/api/v1/metrics": {"GET": _Handler.get_metrics},
    "/api/v1/trace": {"GET": _Handler.get_trace},
    "/metrics": {"GET": _Handler.get_prometheus},
    "/api/v1/shutdown": {"POST": _Handler.post_shutdown},
}


def socket_answers(path: str, timeout: float = 2.0) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class ApiServer:
    """Serves the API for `daemon` on `path` in a background thread."""

    def __init__(self, daemon, path: str):
        self.path = check_unix_socket_path(os.path.abspath(path), "API socket")
        parent = os.path.dirname(self.path)
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=0o700)
        if os.path.exists(self.path) or os.path.islink(self.path):
            if socket_answers(self.path):
                raise DaemonError(f"{self.path}: another daemon answers on this socket")
            os.unlink(self.path)
        self.server = _Server(self.path, _Handler, daemon)
        # bound now (the path is ours), listening only in start(): a client that finds
        # the socket answering talks to a daemon that started, never to one that is
        # still restoring its mounts or about to refuse to start and exit (its queued
        # connections were reset: `start` and the tests took it for up)
        try:
            self.server.server_bind()
        except BaseException:
            self.server.server_close()
            raise
        self._thread = threading.Thread(target=self.server.serve_forever, name="api",
                                        kwargs={"poll_interval": 0.2}, daemon=True)

    @property
    def shutdown_requested(self) -> threading.Event:
        return self.server.shutdown_requested

    def start(self) -> ApiServer:
        self.server.server_activate()
        self._thread.start()
        log.info("api listening on %s", self.path)
        return self

    def stop(self) -> None:
        # shutdown() waits for serve_forever() to notice; it never returns if the server
        # was never started (e.g. the front end failed before api.start()).
        if self._thread.is_alive():
            self.server.shutdown()
        self.server.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


# ------------------------------------------------------------------------------ client
class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


class ApiClient:
    """A small client: request() -> (status, decoded JSON or text)."""

    def __init__(self, path: str, timeout: float = 600.0):
        self.path = path
        self.timeout = timeout

    def request(self, method: str, path: str, body=None, raw: bytes | None = None,
                headers: dict | None = None):
        conn = _UnixConnection(self.path, self.timeout)
        try:
            data = raw if raw is not None else \
                (json.dumps(body).encode() if body is not None else None)
            hdrs = {"Content-Type": "application/json"} if data is not None else {}
            hdrs.update(headers or {})
            try:
                conn.request(method, path, body=data, headers=hdrs)
                resp = conn.getresponse()
                payload = resp.read()
            except OSError as e:
                raise DaemonError(f"{self.path}: cannot reach the daemon: "
                                  f"{e.strerror or e}") from None
            ctype = resp.getheader("Content-Type", "")
            if ctype.startswith("application/json"):
                try:
                    return resp.status, json.loads(payload)
                except ValueError:
                    return resp.status, {"error": "daemon sent invalid JSON"}
            return resp.status, payload.decode("utf-8", "replace")
        finally:
            conn.close()

    def call(self, method: str, path: str, body=None):
        """request(), raising DaemonError with the daemon's message on 4xx/5xx."""
        status, obj = self.request(method, path, body)
        if status >= 400:
            msg = obj.get("error") if isinstance(obj, dict) else str(obj)
            raise DaemonError(f"daemon: {msg}")
        return obj

    def answers(self) -> bool:
        return socket_answers(self.path)
