"""containerd's hosts directory (erofs_tools/registry/hosts.py) and the daemon's registry
backend reading through it: the format, and mirrors, plain HTTP and credentials per
host against real docker-registry servers."""

from __future__ import annotations

import base64
import json
import os

import pytest
from registry_fixtures import FlakyProxy, StorageServer, registry_basic, start_registry  # noqa: F401

from erofs_tools.errors import InputError
from erofs_tools.registry import NYDUS_BLOB, OCI_CONFIG, BlobSource, push_image
from erofs_tools.registry.hosts import host_dir, registry_hosts
from fscache_daemon.storage.backends import RegistryBackend


def write_hosts(root, name, text):
    os.makedirs(os.path.join(root, name), exist_ok=True)
    with open(os.path.join(root, name, "hosts.toml"), "w") as f:
        f.write(text)


def test_hosts_file_order_paths_capabilities(tmp_path):
    root = str(tmp_path)
    write_hosts(root, "reg.example_5000_", """
server = "https://upstream.example:5000"
ca = "up-ca.pem"
[host."http://mirror-b.local:5001"]
  capabilities = ["pull"]
  [host."http://mirror-b.local:5001".header]
    X-Mirror = ["one", "two"]
[host."https://mirror-a.local/cache"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
  client = [["c.cert", "/abs/c.key"]]
[host."https://raw.local/api/v2x"]
  override_path = true
""")
    hosts = registry_hosts(root, "reg.example:5000")
    # file order (not sorted), the server last
    assert [h.host for h in hosts] == ["mirror-b.local:5001", "mirror-a.local", "raw.local",
                                       "upstream.example:5000"]
    b, a, raw, up = hosts
    assert (b.scheme, b.path, b.insecure) == ("http", "/v2", True)
    assert b.capabilities == {"pull"} and b.header == (("X-Mirror", "one"), ("X-Mirror", "two"))
    assert (a.path, a.skip_verify, a.capabilities) == ("/cache/v2", True, {"pull", "resolve"})
    assert a.client == ((os.path.join(root, "reg.example_5000_", "c.cert"), "/abs/c.key"),)
    assert raw.path == "/api/v2x" and raw.capabilities == {"pull", "resolve", "push"}
    assert up.ca == (os.path.join(root, "reg.example_5000_", "up-ca.pem"),)
    assert all(h.is_mirror("reg.example:5000") for h in hosts)


def test_host_dir_lookup_and_defaults(tmp_path):
    root = str(tmp_path)
    assert registry_hosts(root, "quay.example")[0].host == "quay.example"
    assert registry_hosts(root, "quay.example")[0].scheme == "https"
    assert registry_hosts(None, "127.0.0.1:5000")[0].scheme == "http"     # loopback
    assert registry_hosts(None, "quay.example", "http")[0].scheme == "http"  # --insecure
    hub = registry_hosts(None, "docker.io")[0]
    assert hub.host == "registry-1.docker.io" and not hub.is_mirror("docker.io")
    os.makedirs(os.path.join(root, "127.0.0.1:5000"))
    assert host_dir(root, "127.0.0.1:5000") == os.path.join(root, "127.0.0.1:5000")
    os.makedirs(os.path.join(root, "127.0.0.1_5000_"))
    assert host_dir(root, "127.0.0.1:5000") == os.path.join(root, "127.0.0.1_5000_")
    write_hosts(root, "_default", '[host."http://m:1"]\ncapabilities = ["pull"]\n')
    assert [h.host for h in registry_hosts(root, "other.example")] == ["m:1", "other.example"]
    # docker's certs.d layout without hosts.toml: CA and client files for the server
    d = os.path.join(root, "certs.example")
    os.makedirs(d)
    for n in ("ca.crt", "client.cert", "client.key", "notes.txt"):
        open(os.path.join(d, n), "w").close()
    (h,) = registry_hosts(root, "certs.example")
    assert h.ca == (os.path.join(d, "ca.crt"),)
    assert h.client == ((os.path.join(d, "client.cert"), os.path.join(d, "client.key")),)


@pytest.mark.parametrize("text,msg", [
    ("server = [", "not valid TOML"),
    ('[host."http://m:1"]\ncapabilities = ["pull", "fly"]', "unknown capability 'fly'"),
    ('[host."ftp://m:1"]', "only http:// and https://"),
    ('[host."http://user:pw@m:1"]', "is not a registry URL"),
    ('[host."http://m:1"]\nskip_verify = "yes"', "skip_verify must be true or false"),
    ('[host."http://m:1"]\nmirror = true', "unknown key 'mirror'"),
    ('[host."http://m:99999"]', "bad port"),
    ("server = 5", "'server' must be a URL string"),
])
def test_bad_hosts_file_is_one_line_error(tmp_path, text, msg):
    write_hosts(str(tmp_path), "reg.example", text)
    with pytest.raises(InputError) as e:
        registry_hosts(str(tmp_path), "reg.example")
    assert msg in str(e.value) and "\n" not in str(e.value)
    assert os.path.join(str(tmp_path), "reg.example", "hosts.toml") in str(e.value)


# --- against real registries ---------------------------------------------------------


def _basic(user, password) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _push(server, repo, payload: bytes) -> str:
    client = server.client()
    try:
        layer = BlobSource(payload, NYDUS_BLOB, {"containerd.io/snapshot/nydus-blob": "true"})
        push_image(client, repo, "v1", config=BlobSource(b"{}", OCI_CONFIG), layers=[layer])
    finally:
        client.close()
    import hashlib
    return hashlib.sha256(payload).hexdigest()


@pytest.mark.registry
def test_backend_mirror_first_credentials_per_host(registry_basic, tmp_path,  # noqa: F811
                                                  monkeypatch):
    """Blobs from the mirror (with the mirror's own credentials, ?ns= and its header),
    the manifest from the upstream (resolve), a dead first mirror skipped without ever
    seeing a credential, and the image named by a host that exists only in hosts.toml."""
    os.makedirs(str(tmp_path / "mirror"))
    mirror = start_registry(str(tmp_path / "mirror"), "basic")   # its own random password
    assert mirror.password != registry_basic.password
    up = FlakyProxy(registry_basic.host)
    mp = FlakyProxy(mirror.host)
    os.makedirs(str(tmp_path / "empty"))
    trap = StorageServer(str(tmp_path / "empty"), bind="127.0.0.2")
    try:
        payload = os.urandom(300_000)
        blob = _push(registry_basic, "lazy/app", payload)
        assert _push(mirror, "lazy/app", payload) == blob
        cfg = tmp_path / "docker"
        cfg.mkdir()
        (cfg / "config.json").write_text(json.dumps({"auths": {
            up.host: {"auth": base64.b64encode(
                f"{registry_basic.username}:{registry_basic.password}".encode()).decode()},
            mp.host: {"username": mirror.username, "password": mirror.password}}}))
        monkeypatch.setenv("DOCKER_CONFIG", str(cfg))
        hosts = str(tmp_path / "hosts")
        # the image's host has no registry: server names where it really is
        write_hosts(hosts, "registry.invalid_5000_", f"""
server = "http://{up.host}"
[host."{trap.url}"]
  capabilities = ["pull"]
[host."http://{mp.host}"]
  capabilities = ["pull"]
  [host."http://{mp.host}".header]
    X-Test-Mirror = "yes"
""")
        be = RegistryBackend("registry.invalid:5000/lazy/app:v1", hosts_dir=hosts,
                             backoff=0.01, max_backoff=0.1)
        try:
            assert be.endpoints == [trap.url + "/v2", f"http://{mp.host}/v2",
                                    f"http://{up.host}/v2"]
            assert be.blob_size(blob) == len(payload)
            assert be.read(blob, 1000, 5000) == payload[1000:6000]
        finally:
            be.close()
        up_creds = _basic(registry_basic.username, registry_basic.password)
        mirror_creds = _basic(mirror.username, mirror.password)
        blob_lines = [r for r in mp.requests if "/blobs/" in r]
        assert blob_lines and all("ns=registry.invalid%3A5000" in r for r in blob_lines)
        assert not [r for r in up.requests if "/blobs/" in r], up.requests
        assert any("/manifests/v1" in r for r in up.requests)
        assert any(h.get("Authorization") == mirror_creds for h in mp.seen_headers)
        assert all(h.get("X-Test-Mirror") == "yes" for h in mp.seen_headers)
        assert not any(up_creds in json.dumps(h) for h in mp.seen_headers)
        assert not any("X-Test-Mirror" in h or mirror_creds in json.dumps(h)
                       for h in up.seen_headers)
        # the dead mirror was asked first and never got an Authorization header
        assert trap.requests and all(r[2] is None for r in trap.requests)
    finally:
        up.stop()
        mp.stop()
        trap.stop()
        mirror.stop()


def test_backend_without_pull_host_refused(tmp_path):
    write_hosts(str(tmp_path), "reg.example", 'capabilities = ["push"]\nserver = '
                '"https://reg.example"\n')
    from fscache_daemon.storage import BackendError
    with pytest.raises(BackendError, match="no host with the pull capability"):
        RegistryBackend("reg.example/app:v1", hosts_dir=str(tmp_path))


def test_daemon_refuses_mount_on_bad_hosts_file(tmp_path):
    """A malformed hosts.toml fails the mount with one line naming the file; nothing
    stays registered or copied."""
    from test_daemon_support import pack, write_tree

    from fscache_daemon.daemon import Daemon
    from fscache_daemon.errors import DaemonError
    src = write_tree(str(tmp_path / "src"), seed=3, nfiles=2, big=(64 << 10,), text=False)
    pack(src, str(tmp_path / "boot"), str(tmp_path / "blobs"))
    write_hosts(str(tmp_path / "hosts"), "reg.example", '[host."http://m:1"]\nskip_verify = 1\n')
    d = Daemon(str(tmp_path / "cache"), frontend="none", threads=2,
               hosts_dir=str(tmp_path / "hosts"))
    d.start()
    try:
        with pytest.raises(DaemonError) as e:
            d.mount(str(tmp_path / "boot"), str(tmp_path / "m"), "registry:reg.example/app:v1")
        msg = str(e.value)
        assert "hosts.toml" in msg and "skip_verify must be true or false" in msg
        assert "\n" not in msg
        assert d.images == {} and d.backends == {}
        assert os.listdir(d.boot_dir) == []
    finally:
        d.shutdown()


def test_run_refuses_missing_hosts_dir(tmp_path):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "fscache_daemon.cli", "run", "--frontend", "none",
                        "--hosts-dir", str(tmp_path / "nope"), "--cache-dir",
                        str(tmp_path / "cache")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "no such directory" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "cache")


@pytest.mark.registry
def test_mirror_redirect_to_storage_gets_no_credentials(registry_basic, tmp_path,  # noqa: F811
                                                        monkeypatch):
    """A mirror that redirects blob reads to object storage on another host: the mirror
    gets its credentials, the storage host none, the upstream no blob request."""
    store = StorageServer(str(tmp_path / "mirror" / "storage"))
    os.makedirs(tmp_path / "mirror" / "storage")
    mirror = start_registry(str(tmp_path / "mirror"), "basic", redirect_to=store.url)
    up = FlakyProxy(registry_basic.host)
    try:
        payload = os.urandom(200_000)
        blob = _push(registry_basic, "lazy/app", payload)
        _push(mirror, "lazy/app", payload)
        cfg = tmp_path / "docker"
        cfg.mkdir()
        (cfg / "config.json").write_text(json.dumps({"auths": {
            up.host: {"username": registry_basic.username, "password": registry_basic.password},
            mirror.host: {"username": mirror.username, "password": mirror.password}}}))
        monkeypatch.setenv("DOCKER_CONFIG", str(cfg))
        hosts = str(tmp_path / "hosts")
        write_hosts(hosts, up.host, f'[host."http://{mirror.host}"]\n'
                    'capabilities = ["pull", "resolve"]\n')
        be = RegistryBackend(f"{up.host}/lazy/app:v1", hosts_dir=hosts, backoff=0.01)
        try:
            assert be.read(blob, 0, 4096) == payload[:4096]
            assert be.read(blob, 150_000, 50_000) == payload[150_000:]
        finally:
            be.close()
        gets = [r for r in store.requests if r[0] == "GET"]
        assert gets and all(r[2] is None for r in store.requests), store.requests
        assert up.requests == [], up.requests      # manifest and blobs from the mirror
    finally:
        up.stop()
        mirror.stop()
        store.stop()


@pytest.mark.registry
def test_tls_ca_and_skip_verify_from_hosts_file(tmp_path):
    """A registry serving HTTPS with its own CA: trusted through `ca` (relative to the
    host's directory), or not checked with `skip_verify`; refused without either."""
    import shutil

    from fscache_daemon.storage import BackendError
    os.makedirs(tmp_path / "reg")
    server = start_registry(str(tmp_path / "reg"), tls=True)
    try:
        payload = os.urandom(100_000)
        blob = _push(server, "tls/app", payload)
        hosts = str(tmp_path / "hosts")
        name = server.host.replace(":", "_") + "_"
        write_hosts(hosts, name, f'server = "https://{server.host}"\nca = "ca.pem"\n')
        shutil.copy(server.ca_cert, os.path.join(hosts, name, "ca.pem"))
        for text in (None, f'server = "https://{server.host}"\nskip_verify = true\n'):
            if text:
                write_hosts(hosts, name, text)
            be = RegistryBackend(f"{server.host}/tls/app:v1", hosts_dir=hosts,
                                 docker_config=False)
            try:
                assert be.read(blob, 10, 1000) == payload[10:1010]
            finally:
                be.close()
        write_hosts(hosts, name, f'server = "https://{server.host}"\n')
        be = RegistryBackend(f"{server.host}/tls/app:v1", hosts_dir=hosts,
                             docker_config=False, retries=0)
        try:
            with pytest.raises(BackendError, match="certificate"):
                be.read(blob, 10, 1000)
        finally:
            be.close()
    finally:
        server.stop()
