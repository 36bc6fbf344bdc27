"""Lazy mounts whose blobs come from Debian's docker-registry on 127.0.0.1 (range GETs),
through a real daemon with the fanotify front end."""

import os

import helpers
import pytest
from registry_fixtures import registry, registry_token  # noqa: F401
from test_daemon_support import lazy_daemon, pack, write_tree

from erofs_tools.registry import NYDUS_BLOB, OCI_CONFIG, BlobSource, push_image

pytestmark = [pytest.mark.root, pytest.mark.registry]


def push_blobs(server, repo, tag, blob_dir, blob_ids):
    client = server.client()
    layers = [BlobSource(os.path.join(blob_dir, b), NYDUS_BLOB,
                         {"containerd.io/snapshot/nydus-blob": "true"}) for b in blob_ids]
    push_image(client, repo, tag, config=BlobSource(b"{}", OCI_CONFIG), layers=layers)
    client.close()


@pytest.fixture
def daemon(tmp_path):
    yield from lazy_daemon(tmp_path)


def test_registry_lazy_mount(daemon, registry, tmp_path):  # noqa: F811
    src = write_tree(str(tmp_path / "src"), seed=31, big=(3 << 20,))
    boot, blobs = str(tmp_path / "boot"), str(tmp_path / "blobs")
    info = pack(src, boot, blobs)
    blob_id = info["blobs"][0]["blob_id"]
    push_blobs(registry, "lazy/app", "v1", blobs, [blob_id])
    mnt = str(tmp_path / "mnt")
    daemon.mount(boot, mnt, f"registry:{registry.host}/lazy/app:v1")
    m = daemon.metrics()
    assert m["blobs"][blob_id]["bytes_fetched"] == 0
    # the chunk map comes from the bootstrap's chunk table: one byte read at mount
    assert m["meta_bytes_fetched"] == 1
    with open(os.path.join(mnt, "small.txt"), "rb") as f, \
            open(os.path.join(src, "small.txt"), "rb") as g:
        assert f.read() == g.read()
    b = daemon.blob_metrics(blob_id)
    assert 0 < b["bytes_fetched"] <= (1 << 20) + 4096
    helpers.assert_same_tree(src, mnt)
    assert daemon.blob_metrics(blob_id)["complete"]


def test_registry_token_auth_multi_blob(daemon, registry_token, tmp_path):  # noqa: F811
    base = write_tree(str(tmp_path / "base"), seed=32, nfiles=10, big=(1 << 20,))
    blobs = str(tmp_path / "blobs")
    i1 = pack(base, str(tmp_path / "b1"), blobs, "--chunk-size", "0x10000")
    src = str(tmp_path / "src")
    write_tree(src, seed=33, nfiles=10, big=(1 << 20,))
    import shutil
    shutil.copytree(base, os.path.join(src, "base"), symlinks=True)
    i2 = pack(src, str(tmp_path / "b2"), blobs, "--chunk-size", "0x10000", "--chunk-dict",
              str(tmp_path / "b1"))
    ids = [b["blob_id"] for b in i2["blobs"]]
    assert len(ids) == 2 and i1["blobs"][0]["blob_id"] in ids
    push_blobs(registry_token, "lazy/multi", "v2", blobs, ids)
    # the daemon finds credentials in a docker config.json
    import base64
    import json
    cfg = tmp_path / "docker"
    cfg.mkdir()
    auth = base64.b64encode(f"{registry_token.username}:{registry_token.password}".encode())
    (cfg / "config.json").write_text(json.dumps({"auths": {registry_token.host:
                                                           {"auth": auth.decode()}}}))
    daemon.stop()
    os.environ["DOCKER_CONFIG"] = str(cfg)
    try:
        daemon.start()
    finally:
        del os.environ["DOCKER_CONFIG"]
    mnt = str(tmp_path / "mnt")
    daemon.mount(str(tmp_path / "b2"), mnt, f"registry:{registry_token.host}/lazy/multi:v2")
    helpers.assert_same_tree(src, mnt)
    assert daemon.metrics()["totals"]["verify_failures"] == 0


def test_status_names_the_mirror_and_proxy(daemon, registry, tmp_path):  # noqa: F811
    """Plain `status` shows where a mount's bytes come from (mirror, proxy), not only --json."""
    import subprocess
    import sys
    src = write_tree(str(tmp_path / "src"), seed=34, nfiles=3)
    boot, blobs = str(tmp_path / "boot"), str(tmp_path / "blobs")
    info = pack(src, boot, blobs)
    push_blobs(registry, "lazy/st", "v1", blobs, [info["blobs"][0]["blob_id"]])
    mnt = str(tmp_path / "mnt")
    # the registry itself as the mirror of a host that does not exist: reads must go there
    daemon.mount(boot, mnt, "registry:nowhere.invalid/lazy/st:v1",
                 options={"mirror": registry.host, "insecure": True})
    helpers.assert_same_tree(src, mnt)
    out = subprocess.run([sys.executable, "-m", "fscache_daemon.cli", "status", "--api-sock",
                          daemon.sock], capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith(os.path.realpath(mnt)))
    assert f"mirror {registry.host}" in line
    assert "proxy" not in line


def test_status_shows_no_proxy_password(daemon, registry, tmp_path):  # noqa: F811
    """A proxy URL with credentials: the API (status, status --json) names the proxy
    without them. The proxy here is dead: reads fall back to the registry."""
    import json
    import subprocess
    import sys

    from registry_fixtures import free_port
    src = write_tree(str(tmp_path / "src"), seed=35, nfiles=2)
    boot, blobs = str(tmp_path / "boot"), str(tmp_path / "blobs")
    info = pack(src, boot, blobs)
    push_blobs(registry, "lazy/pw", "v1", blobs, [info["blobs"][0]["blob_id"]])
    mnt = str(tmp_path / "mnt")
    proxy = f"http://pu:s3cret@127.0.0.1:{free_port()}"
    daemon.mount(boot, mnt, f"registry:{registry.host}/lazy/pw:v1",
                 options={"proxy": proxy, "insecure": True})
    helpers.assert_same_tree(src, mnt)
    for args in ([], ["--json"]):
        out = subprocess.run([sys.executable, "-m", "fscache_daemon.cli", "status",
                              "--api-sock", daemon.sock, *args],
                             capture_output=True, text=True, check=True).stdout
        assert "s3cret" not in out and "pu:" not in out
        assert "127.0.0.1" in out
    mounts = json.loads(subprocess.run(
        [sys.executable, "-m", "fscache_daemon.cli", "status", "--api-sock", daemon.sock,
         "--json"], capture_output=True, text=True, check=True).stdout)["mounts"]
    assert any(m["options"].get("proxy", "").startswith("http://127.0.0.1:") for m in mounts)


def _proxy_auths(proxy, since: int) -> list[str | None]:
    """The Proxy-Authorization of each blob read the proxy got after the first `since`
    requests."""
    return [h.get("Proxy-Authorization") for line, h in
            list(zip(proxy.requests, proxy.seen_headers))[since:] if "/blobs/" in line]


def test_mounts_json_keeps_no_proxy_password(daemon, registry, tmp_path):  # noqa: F811
    """mounts.json records the proxy without its user name and password; a restart takes
    the mount back reading through the proxy without them (their only source, the mount
    request, is not repeated). A file an older daemon wrote with the password is read
    with it once and rewritten without it. Failed before: mounts.json kept the URL."""
    import base64
    import json
    import subprocess
    import sys

    from registry_fixtures import FlakyProxy
    src = write_tree(str(tmp_path / "src"), seed=36, nfiles=2, big=(2 << 20,) * 3,
                     text=False)
    boot, blobs = str(tmp_path / "boot"), str(tmp_path / "blobs")
    info = pack(src, boot, blobs)
    push_blobs(registry, "lazy/pj", "v1", blobs, [info["blobs"][0]["blob_id"]])
    proxy = FlakyProxy(registry.host)       # a forward proxy in front of the registry
    state = os.path.join(daemon.cache_dir, "mounts.json")
    basic = "Basic " + base64.b64encode(b"pu:s3cret").decode()
    try:
        mnt = str(tmp_path / "mnt")
        daemon.mount(boot, mnt, f"registry:{registry.host}/lazy/pj:v1",
                     options={"proxy": f"http://pu:s3cret@{proxy.host}", "insecure": True})

        def read(name: str) -> None:
            with open(os.path.join(mnt, "d1", name), "rb") as f, \
                    open(os.path.join(src, "d1", name), "rb") as g:
                assert f.read() == g.read()

        def saved() -> dict:
            with open(state) as f:
                text = f.read()
            assert "s3cret" not in text and "pu:" not in text and "pu@" not in text
            (rec,) = json.loads(text)["mounts"]
            assert rec["options"]["proxy"] == f"http://{proxy.host}"
            return rec

        read("big0.bin")
        auths = _proxy_auths(proxy, 0)
        assert auths and set(auths) == {basic}      # the password is used while running
        assert saved()["proxy_credentials_dropped"] is True

        # an older daemon's file, with the password: used, then never written back
        daemon.stop()
        with open(state) as f:
            old = json.load(f)
        old["mounts"][0]["options"]["proxy"] = f"http://pu:s3cret@{proxy.host}"
        old["mounts"][0].pop("proxy_credentials_dropped")
        with open(state, "w") as f:
            json.dump(old, f)
        daemon.start()
        assert saved()["proxy_credentials_dropped"] is True
        n = len(proxy.requests)
        read("big1.bin")
        assert set(_proxy_auths(proxy, n)) <= {basic}

        # a restart from the file as written now: the proxy without credentials
        daemon.stop()
        daemon.start()
        n = len(proxy.requests)
        read("big2.bin")
        auths = _proxy_auths(proxy, n)
        assert auths and set(auths) == {None}
        assert "proxy_credentials_dropped" not in saved()   # said once, at this restart
        assert "credentials were not kept across the restart" in daemon.log(400)
        assert "s3cret" not in daemon.log(1 << 30)      # nor in the daemon's log
        helpers.assert_same_tree(src, mnt)
        for args in ([], ["--json"]):
            out = subprocess.run([sys.executable, "-m", "fscache_daemon.cli", "status",
                                  "--api-sock", daemon.sock, *args],
                                 capture_output=True, text=True, check=True).stdout
            assert "s3cret" not in out and "pu:" not in out and proxy.host in out
    finally:
        proxy.stop()
