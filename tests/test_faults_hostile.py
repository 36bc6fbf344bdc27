"""Hostile access and input: the management API socket (only root; a non-root peer is
refused even when the socket file is opened up), malformed and mutated API requests (4xx,
the daemon survives), registry credentials never in logs or error messages, TLS
verification on by default, and a mutation fuzzer over the daemon's parsing of a blob's
chunk-info table and TOC (`load_or_fetch_meta` -> `BlobMeta.from_blob` with the
bootstrap's blob-table entry, and the on-disk `<id>.map` cache) with bounded time and
memory per case.

FAULTS_FUZZ_CASES (default 800) and FAULTS_API_CASES (default 300) set the case counts.
"""

import base64
import errno
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback

import pytest
from faults import FaultProxy, env_int
from test_daemon_support import DaemonProc, pack, write_tree
from test_storage_support import NYDUS_BLOB, NYDUS_BLOB_ID, NYDUS_BOOT

from erofs_tools.errors import ErofsToolsError
from fscache_daemon.api import ApiClient, ApiServer
from fscache_daemon.daemon import Daemon

FUZZ_CASES = env_int("FAULTS_FUZZ_CASES", 800)
API_CASES = env_int("FAULTS_API_CASES", 300)
NOBODY = 65534


@pytest.fixture
def api_daemon(tmp_path):
    import tempfile
    d = Daemon(str(tmp_path / "cache"), frontend="none", threads=2, prefetch_rate=0)
    d.start()
    # a directory others may traverse, so that only the socket's own checks stand
    run_dir = tempfile.mkdtemp(prefix="faults-api-", dir="/tmp")
    os.chmod(run_dir, 0o755)
    srv = ApiServer(d, os.path.join(run_dir, "api.sock")).start()
    yield d, srv
    srv.stop()
    d.shutdown()
    shutil.rmtree(run_dir, ignore_errors=True)


# ---------------------------------------------------------------------- API access ----
_CLIENT = r"""
import os, socket, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("connect-error", e.errno); sys.exit(0)
try:
    s.sendall(b"GET /api/v1/daemon HTTP/1.1\r\nHost: x\r\n\r\n")
    data = s.recv(4096)
except OSError as e:
    print("io-error", e.errno); sys.exit(0)
print("answer" if data else "closed", data[:40])
"""


def _as_nobody(sock):
    r = subprocess.run([sys.executable, "-c", _CLIENT, sock], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()[0], r.stdout


@pytest.mark.root
def test_api_refuses_non_root(api_daemon, tmp_path):
    import helpers
    helpers.require(helpers.is_root(), "needs root (setuid to nobody)")
    d, srv = api_daemon
    assert os.stat(srv.path).st_mode & 0o777 == 0o600
    # as created: the file mode alone keeps nobody out
    kind, out = _as_nobody(srv.path)
    assert kind == "connect-error" and str(errno.EACCES) in out, out
    # opened up by mistake (chmod 666): SO_PEERCRED still refuses the peer
    os.chmod(srv.path, 0o666)
    kind, out = _as_nobody(srv.path)
    assert kind in ("closed", "io-error"), out
    assert "HTTP/1.1 200" not in out
    # root still served
    st, info = ApiClient(srv.path, timeout=10).request("GET", "/api/v1/daemon")
    assert st == 200 and info["pid"] == os.getpid()


# ---------------------------------------------------------------- malformed requests --
VALID = [
    b"GET /api/v1/daemon HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /api/v1/metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    b"DELETE /api/v1/mounts?mountpoint=/nonexistent&lazy=1 HTTP/1.1\r\nHost: x\r\n\r\n",
]


def _post(path, body: bytes) -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def _raw(sock_path, data: bytes, timeout=10.0) -> bytes:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(sock_path)
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            out += b
    except (TimeoutError, ConnectionResetError, BrokenPipeError):
        pass
    finally:
        s.close()
    return out


def _mutate(rnd, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(7)
        if op == 0 and b:
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        elif op == 1 and b:
            del b[rnd.randrange(len(b)):]
        elif op == 2:
            i = rnd.randrange(len(b) + 1)
            b[i:i] = rnd.choice([b"\r\n", b"\0", b"\xff\xfe", b"%00", b"../" * 10, b"{" * 50,
                                 b"9" * 30, b"-1", b"\r\n\r\n", b"\xc3\x28", b" " * 70000])
        elif op == 3 and b:
            i = rnd.randrange(len(b))
            b[i:i] = bytes(b[i:i + rnd.randint(1, 64)]) * rnd.randint(2, 50)
        elif op == 4:
            b = bytearray(data.replace(b"Content-Length: ", b"Content-Length: " +
                                       rnd.choice([b"-", b"99999999", b"0", b"1"])))
        elif op == 5:
            b = bytearray(data.replace(b"HTTP/1.1", rnd.choice([b"HTTP/0.9", b"HTTP/9.9", b"",
                                                                  b"HTTP/1.1 extra"])))
        else:
            b = bytearray(data.replace(b"Host: x\r\n", b"Transfer-Encoding: chunked\r\n"))
    return bytes(b)


def test_api_mutated_requests_get_4xx_and_daemon_survives(api_daemon, tmp_path):
    d, srv = api_daemon
    boot = str(tmp_path / "b")
    write_tree(str(tmp_path / "s"), seed=3, nfiles=3, big=(1 << 16,), text=False)
    pack(str(tmp_path / "s"), boot, str(tmp_path / "blobs"))
    bodies = [
        json.dumps({"bootstrap": boot, "mountpoint": str(tmp_path / "m"),
                    "backend": f"localfs:{tmp_path / 'blobs'}"}).encode(),
        json.dumps({"bootstrap": boot, "mountpoint": str(tmp_path / "m2"),
                    "backend": "registry:127.0.0.1:1/x/y:z", "options": {"proxy": "x"}}).encode(),
        b'{"mountpoint": "/nonexistent", "lazy": true}',
    ]
    seeds = VALID + [_post(b"/api/v1/mounts", bodies[0]), _post(b"/api/v1/mounts", bodies[1]),
                     _post(b"/api/v1/umount", bodies[2])]
    rnd = random.Random(int(os.environ.get("FAULTS_SEED", "8")))
    statuses = {}
    t_max = 0.0
    for n in range(API_CASES):
        req = _mutate(rnd, rnd.choice(seeds))
        t0 = time.monotonic()
        out = _raw(srv.path, req)
        t_max = max(t_max, time.monotonic() - t0)
        first = req.split(b"\r\n", 1)[0]
        if out and not out.startswith(b"HTTP/") and (b"HTTP/0.9" in first
                                                     or len(first.split()) < 3):
            # http.server answers a request line without a version the HTTP/0.9 way
            statuses["http/0.9 answer"] = statuses.get("http/0.9 answer", 0) + 1
        elif out:
            line = out.split(b"\r\n", 1)[0]
            parts = line.split()
            assert len(parts) >= 2 and parts[0].startswith(b"HTTP/"), (req[:200], out[:200])
            code = int(parts[1])
            statuses[code] = statuses.get(code, 0) + 1
            # 501 (unknown method) and 505 (unknown HTTP version) are what RFC 9110 asks
            # for; both are refusals like the 4xx answers, the connection is closed
            assert code < 500 or code in (501, 505), (n, req[:300], out[:300])
        else:
            statuses["closed"] = statuses.get("closed", 0) + 1
        # the daemon is alive and answering after every case
        if n % 25 == 0:
            st, _ = ApiClient(srv.path, timeout=10).request("GET", "/api/v1/daemon")
            assert st == 200
    print(f"{API_CASES} mutated API requests: {statuses}, slowest {t_max:.2f}s")
    assert sum(v for k, v in statuses.items() if isinstance(k, int) and 400 <= k < 500) \
        >= API_CASES // 4
    st, _ = ApiClient(srv.path, timeout=10).request("GET", "/api/v1/daemon")
    assert st == 200
    for m in list(d.images):         # mutations that still mounted something
        d.umount(m)


# ---------------------------------------------------------------------- credentials ---
def _secrets(server):
    user_pass = f"{server.username}:{server.password}"
    return [server.password, base64.b64encode(user_pass.encode()).decode()]


@pytest.mark.registry
@pytest.mark.parametrize("auth", ["basic", "token"])
def test_credentials_never_logged(auth, tmp_path):
    from registry_fixtures import start_registry
    reg = start_registry(str(tmp_path / "reg"), auth=auth)
    proxy = FaultProxy(reg.host)
    try:
        src = write_tree(str(tmp_path / "src"), seed=4, nfiles=3, big=(1 << 16,), text=False)
        boot, blobs = str(tmp_path / "boot"), str(tmp_path / "blobs")
        info = pack(src, boot, blobs)
        from erofs_tools.registry import NYDUS_BLOB, OCI_CONFIG, BlobSource, push_image
        c = reg.client()
        push_image(c, "sec/app", "v1", config=BlobSource(b"{}", OCI_CONFIG),
                   layers=[BlobSource(os.path.join(blobs, info["blobs"][0]["blob_id"]),
                                      NYDUS_BLOB)])
        c.close()
        cfg = tmp_path / "docker"
        cfg.mkdir()
        outputs = []
        for password in (reg.password[::-1] + "x", reg.password):      # wrong, then right
            auth_b64 = base64.b64encode(f"{reg.username}:{password}".encode()).decode()
            (cfg / "config.json").write_text(json.dumps({"auths": {proxy.host:
                                                                   {"auth": auth_b64}}}))
            os.environ["DOCKER_CONFIG"] = str(cfg)
            try:
                d = DaemonProc(str(tmp_path / f"d{len(outputs)}"), frontend="none").start()
            finally:
                del os.environ["DOCKER_CONFIG"]
            try:
                st, res = d.api.request("POST", "/api/v1/mounts", {
                    "bootstrap": boot, "mountpoint": str(tmp_path / "m"),
                    "backend": f"registry:{proxy.host}/sec/app:v1"})
                outputs.append(json.dumps(res))
                if password != reg.password:
                    assert st == 502 and "credentials" in res["error"], (st, res)
                else:
                    assert st == 201, (st, res)
                r = subprocess.run([sys.executable, "-m", "fscache_daemon.cli", "status",
                                    "--json", "--api-sock", d.sock], capture_output=True,
                                   text=True)
                outputs.append(r.stdout + r.stderr)
                d.stop()
                with open(d.log_path, errors="replace") as f:
                    outputs.append(f.read())
            finally:
                d.stop()
        secrets = _secrets(reg) + [reg.password[::-1] + "x"]
        for g in proxy.log:               # every Authorization value the client sent
            if g.authorization:
                secrets.append(g.authorization.split(" ", 1)[-1])
        assert len(secrets) > 3
        text = "\n".join(outputs)
        assert "DEBUG" in text            # the daemon logged at DEBUG level
        leaked = [s[:6] + "..." for s in set(secrets) if s and s in text]
        assert not leaked, f"credentials in daemon logs/API answers: {leaked}"
    finally:
        proxy.stop()
        reg.stop()


# --------------------------------------------------------------------------- TLS ------
@pytest.mark.registry
def test_tls_verification_on_by_default(tmp_path):
    """A registry name that is not loopback is spoken to over HTTPS with certificate
    verification: a self-signed certificate is refused, by the client and by the daemon's
    registry backend, before any blob byte is read."""
    from registry_fixtures import make_tls_cert, start_registry

    from erofs_tools.errors import RegistryError
    from erofs_tools.registry import RegistryClient
    reg = start_registry(str(tmp_path / "reg"))
    cert = make_tls_cert(str(tmp_path))
    try:
        tls = FaultProxy(reg.host, bind="127.0.0.2", tls=cert)
    except OSError as e:
        pytest.skip(f"cannot bind 127.0.0.2: {e}")
    try:
        c = RegistryClient(tls.host, docker_config=False, retries=0)
        with pytest.raises(RegistryError, match="certificate verify failed"):
            c.ping()
        c.close()
        src = write_tree(str(tmp_path / "src"), seed=5, nfiles=2, big=(1 << 16,), text=False)
        boot = str(tmp_path / "boot")
        pack(src, boot, str(tmp_path / "blobs"))
        d = DaemonProc(str(tmp_path / "d"), frontend="none").start()
        try:
            st, res = d.api.request("POST", "/api/v1/mounts", {
                "bootstrap": boot, "mountpoint": str(tmp_path / "m"),
                "backend": f"registry:{tls.host}/x/app:v1"})
            assert st >= 400 and ("TLS" in res["error"] or "certificate" in res["error"]), res
        finally:
            d.stop()
        assert not tls.blob_gets(), "blob bytes were requested over an unverified connection"
        # the same proxy with its certificate trusted works: the refusal was verification
        # trusting the certificate is not enough either: it names 127.0.0.1, not
        # 127.0.0.2 (the host name is checked too)
        c = RegistryClient(tls.host, docker_config=False, ca_certs=cert[0], retries=0)
        with pytest.raises(RegistryError, match="mismatch"):
            c.ping()
        c.close()
    finally:
        tls.stop()
        reg.stop()


# ---------------------------------------------------------------- blob meta fuzzing ---
def _fuzz_worker(conn, blob_bytes, blob_id, entry, digests, expect, cases, seed, workdir):
    """Child process: RLIMIT_AS 1 GiB, each case under a 10 s alarm."""
    import logging
    logging.disable(logging.CRITICAL)      # thousands of expected verification errors
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    class Timeout(BaseException):
        pass

    def on_alarm(*_):
        raise Timeout()

    signal.signal(signal.SIGALRM, on_alarm)
    from fscache_daemon.storage import blobcache as bc
    from fscache_daemon.storage.backends import LocalFsBackend
    rnd = random.Random(seed)
    size = len(blob_bytes)
    meta_start = max(0, size - 64 * 1024) if entry is None else min(entry.ci_offset, size)
    outcomes, failures = {}, []
    for n in range(cases):
        b = bytearray(blob_bytes)
        muts = []
        for _ in range(rnd.randint(1, 3)):
            if len(b) < 2:
                break
            op = rnd.randrange(6)
            lo = min(meta_start if rnd.random() < 0.85 else 0, len(b) - 1)
            if op == 0:
                i = rnd.randrange(lo, len(b))
                b[i] ^= 1 << rnd.randrange(8)
            elif op == 1:
                i = rnd.randrange(lo, len(b))
                width = rnd.choice([1, 2, 4, 8])
                b[i:i + width] = rnd.choice([b"\xff", b"\x00", b"\x7f", b"\x80"]) * width
            elif op == 2:
                del b[rnd.randrange(lo, len(b)):]
            elif op == 3:
                b += os.urandom(rnd.randint(1, 5000))
            elif op == 4:
                i = rnd.randrange(lo, len(b))
                j = rnd.randrange(lo, len(b))
                b[i:i + 64] = b[j:j + 64]
            else:
                i = rnd.randrange(lo, len(b))
                b[i:i + 8] = rnd.getrandbits(64).to_bytes(8, "little")
            muts.append(op)
        d = os.path.join(workdir, f"case{n % 4}")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(os.path.join(d, "src"))
        with open(os.path.join(d, "src", blob_id), "wb") as f:
            f.write(b)
        be = LocalFsBackend(os.path.join(d, "src"))
        outcome = "?"
        signal.alarm(10)
        try:
            meta, _ = bc.load_or_fetch_meta(os.path.join(d, "cache"), blob_id, be,
                                            entry=entry, blob_size=len(b) if entry is None
                                            else entry.compressed_size, digests=digests)
            outcome = "parsed"
            # a map that parses goes through the cache like the daemon's: store what
            # verifies, and the stored bytes must be the original image's bytes
            outcome = _fill_and_compare(meta, os.path.join(d, "cache"), be, expect, n, muts,
                                        failures, "parsed")
            # the map written for this blob, damaged, loads back (the restart path) or is
            # rejected; what it stores must still be the original bytes
            mp = bc.map_path(os.path.join(d, "cache"), blob_id)
            if os.path.exists(mp):
                m = bytearray(open(mp, "rb").read())
                if m:
                    i = rnd.randrange(len(m))
                    m[i] ^= 1 << rnd.randrange(8)
                    for name in os.listdir(os.path.join(d, "cache")):
                        os.unlink(os.path.join(d, "cache", name))
                    open(mp, "wb").write(bytes(m))
                    try:
                        meta2, fetched = bc.load_or_fetch_meta(
                            os.path.join(d, "cache"), blob_id, be, entry=entry,
                            blob_size=len(b) if entry is None else entry.compressed_size,
                            digests=digests)
                        if fetched == 0:
                            _fill_and_compare(meta2, os.path.join(d, "cache"), be, expect, n,
                                              muts + [f"map byte {i}"], failures, "")
                    except ErofsToolsError:
                        pass
        except ErofsToolsError:
            outcome = "rejected"
        except Timeout:
            failures.append((n, muts, "timeout (10 s)"))
        except MemoryError:
            failures.append((n, muts, "MemoryError (1 GiB address space)"))
        except BaseException as e:  # noqa: BLE001
            failures.append((n, muts, f"{type(e).__name__}: {e}\n"
                             + traceback.format_exc(limit=6)))
        finally:
            signal.alarm(0)
            be.close()
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    conn.send((outcomes, failures))
    conn.close()


def _fill_and_compare(meta, cache_dir, be, expect, n, muts, failures, outcome):
    from fscache_daemon.storage import blobcache as bc
    if meta.uncompressed_size != expect["usize"]:
        return outcome
    cache = bc.BlobCache(cache_dir, meta, durable=False)
    mgr = bc.BlobManager(meta, cache, be)
    try:
        mgr.fill(0, meta.uncompressed_size)
        outcome = "filled"
    except ErofsToolsError:
        outcome = "fill-error"
    for c in meta.chunks:
        if cache.has(c):
            got = os.pread(cache._own_fd, c.uncompressed_size, c.uncompressed_offset)
            want = expect["data"][c.uncompressed_offset:c.uncompressed_offset +
                                  c.uncompressed_size]
            if got != want:
                failures.append((n, muts, f"chunk {c.index} stored at {c.uncompressed_offset} "
                                 "differs from the original image's bytes there"))
                break
    mgr.close()
    return outcome


def _expected_cache_bytes(blob_path, blob_id, entry, digests):
    from erofs_tools.reader import blob as rblob
    with open(blob_path, "rb") as f:
        read_at = rblob.file_reader(f)
        size = os.path.getsize(blob_path)
        meta = rblob.BlobMeta.from_blob(read_at, entry.compressed_size if entry else size,
                                        blob_id=blob_id, entry=entry, digests=digests)
        out = bytearray(meta.uncompressed_size)
        for c in meta.chunks:
            data = rblob.read_chunk(meta, c, read_at)
            out[c.uncompressed_offset:c.uncompressed_offset + len(data)] = data
    return {"usize": meta.uncompressed_size, "data": bytes(out)}


@pytest.mark.parametrize("seed_name", ["packed-toc", "nydus-entry"])
def test_fuzz_blob_meta_through_daemon_path(seed_name, tmp_path):
    import multiprocessing

    from fscache_daemon.storage.image import load_image
    if seed_name == "packed-toc":
        src = write_tree(str(tmp_path / "src"), seed=6, nfiles=12, big=(300_000,), text=True)
        info = pack(src, str(tmp_path / "boot"), str(tmp_path / "blobs"), "--chunk-size",
                    "0x4000")
        blob_id = info["blobs"][0]["blob_id"]
        path = os.path.join(str(tmp_path / "blobs"), blob_id)
        entry = digests = None                          # the TOC path (no bootstrap)
    else:
        blob_id, path = NYDUS_BLOB_ID, NYDUS_BLOB
        ref = load_image(NYDUS_BOOT).blobs[0]
        entry, digests = ref.entry, ref.digests         # what the daemon passes
    blob_bytes = open(path, "rb").read()
    expect = _expected_cache_bytes(path, blob_id, entry, digests)
    ctx = multiprocessing.get_context("fork")
    results = []
    per = max(1, FUZZ_CASES // 2)
    procs = []
    for k in range(2):
        parent, child = ctx.Pipe(duplex=False)
        wd = str(tmp_path / f"w{k}")
        os.makedirs(wd)
        p = ctx.Process(target=_fuzz_worker, args=(child, blob_bytes, blob_id, entry, digests,
                                                   expect, per, f"{seed_name}-{k}", wd))
        p.start()
        procs.append((p, parent))
    t0 = time.monotonic()
    deadline = time.monotonic() + per * 2.0 + 120
    for p, parent in procs:
        while not parent.poll(1.0):
            assert p.is_alive(), f"fuzz worker died ({p.exitcode}) without a report"
            assert time.monotonic() < deadline, "fuzz worker hung"
        results.append(parent.recv())
        p.join(30)
        assert p.exitcode == 0, f"fuzz worker died ({p.exitcode})"
    outcomes, failures = {}, []
    for o, f in results:
        for k, v in o.items():
            outcomes[k] = outcomes.get(k, 0) + v
        failures += f
    print(f"blob meta fuzz {seed_name}: {2 * per} cases in {time.monotonic() - t0:.1f}s: "
          f"{outcomes}")
    assert not failures, "\n".join(f"case {n} ops {m}: {e}" for n, m, e in failures[:10])
    assert outcomes.get("rejected", 0) > per // 10
