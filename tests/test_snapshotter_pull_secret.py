"""kubelet's image pull secret reaches the daemon's lazy reads: the daemon's CRI
image-service proxy (`run --image-service-socket`, snapshotter/image_proxy.py) stands
where kubelet's `--image-service-endpoint` points, forwards every ImageService call to
real containerd 1.6 and keeps the `auth` of each PullImage (storage/keychain.py) for the
blob reads of that image's registry host and repository only. The registry is a real
docker-registry with htpasswd; neither containerd's config nor the daemon's docker config
holds a credential: the pull secret is the only one, as on a Kubernetes node with an
imagePullSecret. After a SIGKILL the restarted daemon still reads with it."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import stat

import grpc
import pytest
from containerd_fixtures import (
    SNAPSHOTTER,
    Containerd,
    OciImage,
    busybox_layers,
    cri_pull,
    require_containerd,
    short_tmpdir,
    tar_layer,
    wait_for,
)
from nydus_fixtures import CRI_NS, SnapshotterDaemon, convert
from registry_fixtures import registry_basic  # noqa: F401
from test_daemon_support import require_lazy_kernel, socket_answers

from erofs_tools.registry.auth import Credentials
from fscache_daemon.snapshotter.image_proxy import pull_credentials
from fscache_daemon.snapshotter.proto import cri_image_pb2
from fscache_daemon.storage import keychain as kc_mod
from fscache_daemon.storage.keychain import Keychain


def _request(image: str, **auth) -> bytes:
    return cri_image_pb2.PullImageRequest(
        image=cri_image_pb2.ImageSpec(image=image),
        auth=cri_image_pb2.AuthConfig(**auth)).SerializeToString()


def test_pull_credentials_as_containerd_reads_them():
    host = "reg.example:5000"
    assert pull_credentials(_request(f"{host}/app:1", username="u", password="p")) == \
        (host, "app", Credentials("u", "p"))
    b64 = base64.b64encode(b"v:w").decode()
    assert pull_credentials(_request(f"{host}/a/b:1", auth=b64))[2] == Credentials("v", "w")
    tok = pull_credentials(_request(f"{host}/app:1", identity_token="t"))[2]
    assert tok is not None and tok.identity_token == "t"
    # the secret kubelet matched for another registry: not used for this one
    assert pull_credentials(_request(f"{host}/app:1", username="u", password="p",
                                     server_address="other.example"))[2] is None
    assert pull_credentials(_request(f"{host}/app:1", username="u", password="p",
                                     server_address=f"https://{host}/v1/"))[2] is not None
    assert pull_credentials(_request("busybox:1", username="u", password="p",
                                     server_address="https://index.docker.io/v1/"))[2] \
        is not None
    assert pull_credentials(_request(f"{host}/app:1", auth="bm90LWJhc2U2NCE="))[2] is None
    assert pull_credentials(_request(f"{host}/app:1"))[2] is None
    assert pull_credentials(b"\xff\xff not protobuf") is None
    assert pull_credentials(_request("UPPER/Case!!")) is None


def test_keychain_persists_privately_and_stays_bounded(tmp_path, monkeypatch, caplog):
    kc = Keychain(str(tmp_path))
    kc.put("Reg.Example:5000", "app", Credentials("u", "secret-1"))
    assert kc.credentials("reg.example:5000", "app") == Credentials("u", "secret-1")
    assert kc.credentials("reg.example:5000", "other") is None
    assert kc.credentials("mirror.example", "app") is None
    path = tmp_path / kc_mod.FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = Keychain(str(tmp_path))
    assert again.credentials("reg.example:5000", "app") == Credentials("u", "secret-1")
    monkeypatch.setattr(kc_mod, "MAX_ENTRIES", 3)
    for i in range(5):
        kc.put("h", f"r{i}", Credentials("u", str(i)))
    assert len(kc) == 3 and kc.credentials("h", "r4") and not kc.credentials("h", "r1")
    path.write_text('{"version": 1, "entries": [{"host": 5}]} secret-1')
    assert len(Keychain(str(tmp_path))) == 0           # ignored, with a warning
    assert "secret-1" not in caplog.text and kc_mod.FILE_NAME in caplog.text


@pytest.mark.root
@pytest.mark.registry
def test_kubelet_pull_secret_reaches_lazy_reads(registry_basic, monkeypatch):  # noqa: F811
    require_containerd()
    require_lazy_kernel()
    server = registry_basic
    d = short_tmpdir("snapsecret-")
    empty = os.path.join(d, "docker")
    os.makedirs(empty)
    monkeypatch.setenv("DOCKER_CONFIG", empty)       # the daemon has no credentials
    big = random.Random(21).randbytes(4 << 20)
    later = random.Random(22).randbytes(1 << 20)
    OciImage(busybox_layers() + [tar_layer([("data", "dir", None), ("data/big", "file", big)]),
                                 tar_layer([("data/later", "file", later)])],
             ["/bin/sh"], gzipped=True).push(server.client(), "src/secret", "1")
    conv = os.path.join(d, "convert-docker")
    os.makedirs(conv)
    with open(os.path.join(conv, "config.json"), "w") as f:
        json.dump({"auths": {server.host: {"username": server.username,
                                           "password": server.password}}}, f)
    monkeypatch.setenv("DOCKER_CONFIG", conv)
    convert(f"{server.host}/src/secret:1", f"{server.host}/nydus/secret:1")
    monkeypatch.setenv("DOCKER_CONFIG", empty)
    ref = f"{server.host}/nydus/secret:1"

    workdir = os.path.join(d, "daemon")
    image_sock = os.path.join(d, "image.sock")
    ctd = daemon = None
    try:
        ctd = Containerd(d, {SNAPSHOTTER: os.path.join(workdir, "snap.sock")},
                         cri_snapshotter=SNAPSHOTTER, plain_http_hosts=(server.host,))
        daemon = SnapshotterDaemon(workdir, insecure=(server.host,), extra=(
            "--image-service-socket", image_sock, "--cri-address", ctd.sock)).start()
        wait_for(lambda: socket_answers(image_sock), 30, "image service socket")
        ctd.wait_snapshotter(SNAPSHOTTER)
        assert stat.S_IMODE(os.stat(image_sock).st_mode) == 0o600
        keychain = os.path.join(daemon.cache_dir, kc_mod.FILE_NAME)

        # without the secret containerd cannot pull: its status comes back as it is
        with pytest.raises(grpc.RpcError) as e:
            cri_pull(image_sock, ref)
        assert e.value.code() != grpc.StatusCode.UNIMPLEMENTED
        assert "401" in (e.value.details() or "") or \
            "unauthorized" in (e.value.details() or "").lower(), e.value.details()
        assert not os.path.exists(keychain)

        cri_pull(image_sock, ref, auth=(server.username, server.password))
        assert stat.S_IMODE(os.stat(keychain).st_mode) == 0o600
        out = ctd.run_out("--snapshotter", SNAPSHOTTER, ref, "secret1",
                          "/bin/busybox", "sha256sum", "/data/big", ns=CRI_NS)
        assert out.split()[0].decode() == hashlib.sha256(big).hexdigest()
        manifest = server.client().get_manifest("nydus/secret", "1").json
        big_blob, later_blob = [x["digest"].split(":", 1)[1] for x in manifest["layers"][-3:-1]]
        assert daemon.blob_metrics(big_blob)["bytes_fetched"] >= 4 << 20  # lazily, with it
        assert daemon.blob_metrics(later_blob)["bytes_fetched"] == 0

        # the other ImageService calls pass through too (kubelet's ListImages); the
        # runtime service is not the proxy's
        with grpc.insecure_channel(f"unix:{image_sock}") as ch:
            raw = ch.unary_unary("/runtime.v1.ImageService/ListImages",
                                 request_serializer=lambda b: b,
                                 response_deserializer=lambda b: b)(b"", timeout=30)
            assert ref.encode() in raw
            with pytest.raises(grpc.RpcError) as e:
                ch.unary_unary("/runtime.v1.RuntimeService/Version",
                               request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)(b"", timeout=30)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED

        # a restarted daemon reads the rest of the image with the kept secret
        daemon.kill()
        daemon.start()
        wait_for(lambda: socket_answers(image_sock), 30, "image service socket again")
        wait_for(lambda: ctd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls",
                                 check=False, ns=CRI_NS).returncode == 0, 60,
                 "containerd talking to the restarted snapshotter")
        out = ctd.run_out("--snapshotter", SNAPSHOTTER, ref, "secret2",
                          "/bin/busybox", "sha256sum", "/data/later", ns=CRI_NS)
        assert out.split()[0].decode() == hashlib.sha256(later).hexdigest()
        assert daemon.blob_metrics(later_blob)["bytes_fetched"] >= 1 << 20
        log = open(daemon.log_path, errors="replace").read()
        assert server.password not in log
    finally:
        if ctd is not None:
            ctd.stop()
        if daemon is not None:
            daemon.cleanup()
        shutil.rmtree(d, ignore_errors=True)
