"""Registry credentials from containerd's config file (erofs_tools/registry/cri_config.py)
and the daemon's registry backend using them (`fscache-daemon run --containerd-config`):
the format as containerd 1.6 reads it, then real docker-registry servers with htpasswd
auth: the credentials of a host go to that host only (not to a mirror, not across a
redirect to another host, not to another registry)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import pytest
from registry_fixtures import FlakyProxy, StorageServer, registry_basic, start_registry  # noqa: F401
from test_registry_hosts import _push, write_hosts

from erofs_tools.errors import AuthError, InputError
from erofs_tools.registry.cri_config import load_cri_config
from fscache_daemon.storage import BackendError, BackendUnavailableError
from fscache_daemon.storage.backends import open_backend

CRI = 'plugins."io.containerd.grpc.v1.cri".registry'
CLI = [sys.executable, "-m", "fscache_daemon.cli"]


def _b64(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def _basic(user: str, password: str) -> str:
    return "Basic " + _b64(user, password)


def cri_config(path, auths: dict[str, dict], config_path: str | None = None,
               table: str = CRI, header: str = "version = 2\n") -> str:
    """containerd's config.toml with `configs."HOST".auth` entries."""
    text = header + f"[{table}]\n"
    if config_path is not None:
        text += f'  config_path = "{config_path}"\n'
    for host, auth in auths.items():
        text += f'[{table}.configs."{host}".auth]\n'
        text += "".join(f"  {k} = {json.dumps(v)}\n" for k, v in auth.items())
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def _creds(cfg, host):
    c = cfg.credentials(host)
    return c and (c.username, c.password, c.identity_token)


# --- the format -------------------------------------------------------------------------


def test_configs_in_containerd_order(tmp_path):
    path = cri_config(tmp_path / "config.toml", {
        "Reg.Example:5000": {"username": "u", "password": "p", "auth": _b64("x", "y")},
        "tok.example": {"identitytoken": "refresh-me", "auth": _b64("x", "y")},
        "b64.example": {"auth": _b64("u2", "p:2") + ""},
        "anon.example": {},
    }, config_path="/etc/containerd/certs.d:/srv/certs.d")
    cfg = load_cri_config(path)
    assert cfg.config_path == "/etc/containerd/certs.d:/srv/certs.d"
    # username wins over identitytoken over auth (ParseAuth's order); hosts match
    # case-insensitively, with their port
    assert _creds(cfg, "reg.example:5000") == ("u", "p", None)
    assert _creds(cfg, "reg.example") is None and _creds(cfg, "reg.example:5001") is None
    assert _creds(cfg, "tok.example") == ("<token>", "", "refresh-me")
    assert _creds(cfg, "b64.example") == ("u2", "p:2", None)
    assert _creds(cfg, "anon.example") is None
    assert "p:2" not in repr(cfg) and "refresh-me" not in repr(cfg)


def test_config_versions_and_deprecated_auths(tmp_path, caplog):
    v1 = cri_config(tmp_path / "v1.toml", {"a.example": {"username": "v1"}},
                    table="plugins.cri.registry", header="")
    assert _creds(load_cri_config(v1), "a.example") == ("v1", "", None)
    v3 = cri_config(tmp_path / "v3.toml", {"a.example": {"username": "v3", "password": "x"}},
                    table='plugins."io.containerd.cri.v1.images".registry',
                    header="version = 3\n")
    assert _creds(load_cri_config(v3), "a.example") == ("v3", "x", None)
    # `auths` keyed by URL: its host's entry, replacing `configs` (containerd 1.6)
    p = tmp_path / "auths.toml"
    p.write_text(f'version = 2\n[{CRI}.configs."a.example:443".auth]\n  username = "old"\n'
                 f'[{CRI}.auths."https://a.example:443"]\n  username = "new"\n'
                 f'[{CRI}.mirrors."docker.io"]\n  endpoint = ["https://m.example"]\n')
    assert _creds(load_cri_config(str(p)), "a.example:443") == ("new", "", None)
    assert "mirrors is not read" in caplog.text
    # no CRI section, no registry table: nothing configured
    (tmp_path / "none.toml").write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n'
                                        '  sandbox_image = "pause"\n')
    cfg = load_cri_config(str(tmp_path / "none.toml"))
    assert cfg.auths == {} and cfg.config_path is None


@pytest.mark.parametrize("text,error,needle", [
    ("version = 2\n[plugins\n", InputError, "not valid TOML"),
    (f'[{CRI}]\nconfigs = 3\n', InputError, "configs must be a table"),
    (f'[{CRI}.configs."a.example".auth]\nusername = 5\n', InputError,
     "username must be a string"),
    (f'[{CRI}.configs."a.example".auth]\nuser = "x"\n', InputError, "unknown key 'user'"),
    (f'[{CRI}.configs."a.example".auth]\nauth = "c2VjcmV0LXNhdWNl"\n', AuthError,
     "auth is malformed"),            # base64 of "secret-sauce": no ':'
    (f'[{CRI}.configs."a.example".auth]\nauth = "secret-sauce!!"\n', AuthError,
     "auth is malformed"),
    (f'[{CRI}.configs."a.example/x".auth]\nusername = "x"\n', InputError,
     "not a registry host"),
    (f'[{CRI}]\nconfig_path = ["/a"]\n', InputError, "config_path must be a string"),
])
def test_bad_config_one_line_no_secret(tmp_path, text, error, needle):
    p = tmp_path / "config.toml"
    p.write_text(text)
    with pytest.raises(error) as e:
        load_cri_config(str(p))
    msg = str(e.value)
    assert needle in msg and str(p) in msg and "\n" not in msg
    assert "secret-sauce" not in msg and "c2VjcmV0LXNhdWNl" not in msg


def test_missing_or_huge_file(tmp_path):
    with pytest.raises(InputError, match="cannot read containerd config"):
        load_cri_config(str(tmp_path / "nope.toml"))
    p = tmp_path / "big.toml"
    p.write_bytes(b"#" * ((4 << 20) + 1))
    with pytest.raises(InputError, match="larger than"):
        load_cri_config(str(p))


def test_imports_merged_as_containerd_does(tmp_path):
    """`imports`: breadth first, each file once (a cycle ends), relative to the importing
    file, globs in name order; a later file's CRI plugin section replaces the earlier
    one whole (containerd merges plugins by name, not inside one)."""
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    main = cri_config(tmp_path / "config.toml", {"a.example": {"username": "main"}},
                      header='version = 2\nimports = ["conf.d/*.toml", "extra.toml"]\n')
    # no CRI section: the main file's stays
    (tmp_path / "extra.toml").write_text('version = 2\nimports = ["config.toml"]\n'
                                         '[plugins."io.containerd.gc.v1.scheduler"]\n'
                                         '  pause_threshold = 0.02\n')
    cfg = load_cri_config(main)
    assert _creds(cfg, "a.example") == ("main", "", None) and cfg.path == main
    # 10-... then 20-... (name order): the last CRI section wins, as a whole
    cri_config(conf_d / "20-late.toml", {"b.example": {"username": "late"}},
               config_path="/late/certs.d")
    cri_config(conf_d / "10-early.toml", {"a.example": {"username": "early"}})
    cfg = load_cri_config(main)
    assert _creds(cfg, "b.example") == ("late", "", None)
    assert cfg.credentials("a.example") is None and cfg.config_path == "/late/certs.d"
    # a broken entry is named with the file that holds it
    (conf_d / "30-bad.toml").write_text(f'[{CRI}.configs."a.example".auth]\nuser = "x"\n')
    with pytest.raises(InputError, match="30-bad.toml: .*unknown key 'user'"):
        load_cri_config(main)
    (conf_d / "30-bad.toml").write_text('imports = "x.toml"\n')
    with pytest.raises(InputError, match="30-bad.toml: 'imports' must be a list"):
        load_cri_config(main)
    (conf_d / "30-bad.toml").write_text('imports = ["missing.toml"]\n')
    with pytest.raises(InputError, match="missing.toml: cannot read containerd config"):
        load_cri_config(main)


def test_hosts_dir_roots_searched_in_order(tmp_path):
    from erofs_tools.registry.hosts import registry_hosts
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_hosts(b, "reg.example", 'server = "http://reg.example:5000"\n')
    write_hosts(b, "other.example", 'server = "http://b.example"\n')
    write_hosts(a, "other.example", 'server = "http://a.example"\n')
    root = f"{a}{os.pathsep}{tmp_path / 'missing'}{os.pathsep}{b}"
    assert registry_hosts(root, "reg.example")[-1].host == "reg.example:5000"
    assert registry_hosts(root, "other.example")[-1].host == "a.example"


# --- real registries ---------------------------------------------------------------------


@pytest.fixture
def no_docker_config(tmp_path, monkeypatch):
    """An empty docker config: any credential a test sees comes from containerd's file."""
    d = tmp_path / "docker-empty"
    d.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(d))


@pytest.mark.registry
def test_backend_reads_with_containerd_credentials(registry_basic, tmp_path,  # noqa: F811
                                                   no_docker_config):
    payload = os.urandom(300_000)
    blob = _push(registry_basic, "cri/app", payload)
    spec = f"registry:{registry_basic.host}/cri/app:v1"
    # without an entry for the host: the registry's refusal, naming the layer
    other = cri_config(tmp_path / "other.toml", {"127.0.0.1:1": {
        "username": registry_basic.username, "password": registry_basic.password}})
    be = open_backend(spec, containerd_config=other, retries=0)
    try:
        with pytest.raises(BackendUnavailableError, match="no credentials were found"):
            be.read(blob, 0, 10)
    finally:
        be.close()
    for auth in ({"username": registry_basic.username, "password": registry_basic.password},
                 {"auth": _b64(registry_basic.username, registry_basic.password)}):
        path = cri_config(tmp_path / "config.toml", {registry_basic.host: auth})
        be = open_backend(spec, containerd_config=path, retries=0)
        try:
            assert be.read(blob, 1000, 5000) == payload[1000:6000]
            assert be.blob_size(blob) == len(payload)
        finally:
            be.close()
    # a broken file fails the backend's opening with the file's one-line error
    (tmp_path / "bad.toml").write_text(f'[{CRI}.configs."x".auth]\nauth = "!!"\n')
    with pytest.raises(BackendError, match="bad.toml.*malformed") as e:
        open_backend(spec, containerd_config=str(tmp_path / "bad.toml"))
    assert "\n" not in str(e.value)


@pytest.mark.registry
def test_credentials_never_reach_another_host(registry_basic, tmp_path,  # noqa: F811
                                              no_docker_config):
    """Hostile: host A's credentials (containerd's file) must not reach host B in any
    role: a mirror of A that asks for credentials (B has no entry: A's are not tried
    there; the read falls back to A), object storage A redirects to, or B read as a
    registry of its own."""
    os.makedirs(tmp_path / "b")
    other = start_registry(str(tmp_path / "b"), "basic")      # B: its own password
    os.makedirs(tmp_path / "redir" / "storage")
    store = StorageServer(str(tmp_path / "redir" / "storage"))
    redirecting = start_registry(str(tmp_path / "redir"), "basic", redirect_to=store.url)
    up, mp = FlakyProxy(registry_basic.host), FlakyProxy(other.host)
    try:
        payload = os.urandom(200_000)
        blob = _push(registry_basic, "cri/app", payload)
        _push(other, "cri/app", payload)
        _push(redirecting, "cri/app", payload)
        a_creds = {"username": registry_basic.username, "password": registry_basic.password}
        r_creds = {"username": redirecting.username, "password": redirecting.password}
        path = cri_config(tmp_path / "config.toml", {up.host: a_creds,
                                                     redirecting.host: r_creds})
        hosts = str(tmp_path / "hosts")
        write_hosts(hosts, up.host, f'server = "http://{up.host}"\n'
                    f'[host."http://{mp.host}"]\n  capabilities = ["pull"]\n')
        be = open_backend(f"registry:{up.host}/cri/app:v1", containerd_config=path,
                          hosts_dir=hosts, backoff=0.01)
        try:
            assert be.read(blob, 0, 4096) == payload[:4096]
        finally:
            be.close()
        a_header = _basic(registry_basic.username, registry_basic.password)
        # the mirror was asked (and refused: no credentials of its own), never with A's
        assert any("/blobs/sha256:" in r for r in mp.requests), mp.requests
        assert not any(h.get("Authorization") for h in mp.seen_headers), mp.seen_headers
        assert any(h.get("Authorization") == a_header for h in up.seen_headers)

        # B as a registry of its own: A's entry is not B's
        be = open_backend(f"registry:{mp.host}/cri/app:v1", containerd_config=path,
                          retries=0)
        try:
            with pytest.raises(BackendUnavailableError, match="no credentials"):
                be.read(blob, 0, 10)
        finally:
            be.close()
        assert not any(h.get("Authorization") for h in mp.seen_headers)

        # a registry redirecting blob reads to storage on another host (127.0.0.2): the
        # storage gets the bytes request, never the credentials
        be = open_backend(f"registry:{redirecting.host}/cri/app:v1",
                          containerd_config=path, retries=0)
        try:
            assert be.read(blob, 100_000, 100_000) == payload[100_000:]
        finally:
            be.close()
        gets = [r for r in store.requests if r[0] == "GET"]
        assert gets and all(r[2] is None for r in store.requests), store.requests
    finally:
        up.stop()
        mp.stop()
        other.stop()
        redirecting.stop()
        store.stop()


# --- the daemon's option -----------------------------------------------------------------


def test_daemon_rejects_broken_containerd_config(tmp_path):
    p = tmp_path / "config.toml"
    p.write_text(f'[{CRI}.configs."a.example".auth]\nauth = "c2VjcmV0LXNhdWNl"\n')
    r = subprocess.run([*CLI, "run", "--containerd-config", str(p), "--frontend", "none",
                        "--cache-dir", str(tmp_path / "c"), "--api-sock",
                        str(tmp_path / "api.sock")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "malformed" in lines[0] and str(p) in lines[0], lines
    assert "c2VjcmV0LXNhdWNl" not in r.stderr and "secret-sauce" not in r.stderr
    assert not (tmp_path / "c").exists() and not (tmp_path / "api.sock").exists()


@pytest.mark.parametrize("explicit", [False, True])
def test_daemon_takes_config_path_unless_hosts_dir_given(tmp_path, explicit):
    from containerd_fixtures import short_tmpdir, wait_for
    from test_daemon_support import socket_answers
    d = short_tmpdir("cricfg-")
    api = os.path.join(d, "api.sock")
    certs = os.path.join(d, "certs.d")
    os.makedirs(certs)
    path = cri_config(os.path.join(d, "config.toml"), {"a.example": {"username": "u"}},
                      config_path=certs)
    flags = ["--hosts-dir", ""] if explicit else []
    log = os.path.join(d, "daemon.log")
    with open(log, "w") as out:
        proc = subprocess.Popen([*CLI, "run", "--containerd-config", path, "--frontend",
                                 "none", "--cache-dir", os.path.join(d, "c"), "--api-sock",
                                 api, *flags], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: socket_answers(api), 30, "daemon", proc, log)
        r = subprocess.run([*CLI, "status", "--json", "--api-sock", api],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)["daemon"]
        assert st["containerd_config"] == path
        assert st["hosts_dir"] == (None if explicit else certs)
    finally:
        proc.terminate()
        proc.wait(30)
        import shutil
        shutil.rmtree(d, ignore_errors=True)
