"""The snapshots service over its real gRPC unix socket: containerd's overlayfs
snapshotter semantics (kinds, parent chains, labels, usage, Walk filters, errors), the
mounts it hands out mounted with the kernel, restart persistence and Cleanup of crash
leftovers. containerd itself drives it in test_snapshotter_containerd.py."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import threading

import grpc
import pytest
from containerd_fixtures import Snapshotter, short_tmpdir, wait_for
from google.protobuf import field_mask_pb2
from helpers import HANG, require, sys_mount, sys_umount
from test_daemon_support import pack

from fscache_daemon.errors import DaemonError
from fscache_daemon.snapshotter import serve
from fscache_daemon.snapshotter.proto import snapshots_pb2 as pb
from fscache_daemon.snapshotter.proto import snapshots_pb2_grpc

pytestmark = pytest.mark.root

# a gRPC call's deadline bounds a hang only: 10 s was one that a loaded machine could
# break (a Prepare mounts, a Remove unmounts and removes a tree)
CALL = HANG


class Client:
    def __init__(self, sock: str) -> None:
        self.channel = grpc.insecure_channel(f"unix:{sock}")
        self.stub = snapshots_pb2_grpc.SnapshotsStub(self.channel)

    def prepare(self, key, parent="", labels=None):
        return list(self.stub.Prepare(pb.PrepareSnapshotRequest(
            key=key, parent=parent, labels=labels or {}), timeout=CALL).mounts)

    def view(self, key, parent="", labels=None):
        return list(self.stub.View(pb.ViewSnapshotRequest(
            key=key, parent=parent, labels=labels or {}), timeout=CALL).mounts)

    def commit(self, name, key, labels=None):
        self.stub.Commit(pb.CommitSnapshotRequest(name=name, key=key, labels=labels or {}),
                         timeout=CALL)

    def stat(self, key):
        return self.stub.Stat(pb.StatSnapshotRequest(key=key), timeout=CALL).info

    def walk(self, *filters):
        return [i for r in self.stub.List(pb.ListSnapshotsRequest(filters=list(filters)),
                                          timeout=CALL) for i in r.info]

    def remove(self, key):
        self.stub.Remove(pb.RemoveSnapshotRequest(key=key), timeout=CALL)

    def usage(self, key):
        r = self.stub.Usage(pb.UsageRequest(key=key), timeout=CALL)
        return r.size, r.inodes

    def mounts(self, key):
        return list(self.stub.Mounts(pb.MountsRequest(key=key), timeout=CALL).mounts)

    def update(self, key, labels, paths=()):
        return self.stub.Update(pb.UpdateSnapshotRequest(
            info=pb.Info(name=key, labels=labels),
            update_mask=field_mask_pb2.FieldMask(paths=list(paths))), timeout=CALL).info

    def cleanup(self):
        self.stub.Cleanup(pb.CleanupRequest(), timeout=CALL)


@pytest.fixture
def service(tmp_path):
    sockdir = short_tmpdir("snapsvc-")
    root = str(tmp_path / "root")
    svc = serve(os.path.join(sockdir, "snap.sock"), root)
    client = Client(svc.socket_path)
    yield svc, client, root
    client.channel.close()
    svc.stop()
    os.rmdir(sockdir)


def code_of(fn, *args) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as ei:
        fn(*args)
    return ei.value.code()


def write(mount_fs: str, name: str, data: bytes) -> None:
    with open(os.path.join(mount_fs, name), "wb") as f:
        f.write(data)


def test_socket_is_private(service):
    svc, client, _ = service
    st = os.stat(svc.socket_path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()


def test_chain_kinds_mounts_and_stat(service):
    svc, c, root = service
    m = c.prepare("a-active", labels={"x": "1"})
    assert [(x.type, list(x.options)) for x in m] == [("bind", ["rw", "rbind"])]
    write(m[0].source, "base", b"base\n")
    c.commit("a", "a-active", labels={"containerd.io/snapshot.ref": "a"})
    info = c.stat("a")
    assert (info.name, info.parent, info.kind) == ("a", "", pb.COMMITTED)
    assert dict(info.labels) == {"containerd.io/snapshot.ref": "a"}
    assert code_of(c.stat, "a-active") == grpc.StatusCode.NOT_FOUND

    m = c.prepare("b-active", "a")
    (ov,) = m
    assert ov.type == "overlay"
    opts = dict(o.split("=", 1) for o in ov.options if "=" in o)
    assert opts["lowerdir"] == os.path.join(root, "snapshots", "1", "fs")
    b_upper = opts["upperdir"]
    write(b_upper, "second", b"second\n")
    c.commit("b", "b-active")

    # active on two parents: lowerdir nearest first, as overlayfs stacks them
    (ov,) = c.prepare("work", "b")
    opts = dict(o.split("=", 1) for o in ov.options if "=" in o)
    assert opts["lowerdir"].split(":") == [b_upper, os.path.join(root, "snapshots", "1", "fs")]
    assert c.stat("work").kind == pb.ACTIVE and c.stat("work").parent == "b"

    # views: one parent -> ro bind of it; two parents -> overlay without upper
    (v1,) = c.view("v1", "a")
    assert (v1.type, v1.source, list(v1.options)) == (
        "bind", os.path.join(root, "snapshots", "1", "fs"), ["ro", "rbind"])
    (v2,) = c.view("v2", "b")
    assert v2.type == "overlay" and not any(o.startswith("upperdir=") for o in v2.options)
    assert c.stat("v2").kind == pb.VIEW
    assert list(c.mounts("work")[0].options) == list(ov.options)


def test_active_overlay_mounts_with_kernel(service, tmp_path):
    require(os.geteuid() == 0, "needs root (overlay mount)")
    _, c, _ = service
    (m,) = c.prepare("l1-active")
    write(m.source, "f", b"one\n")
    write(m.source, "gone", b"x\n")
    c.commit("l1", "l1-active")
    (ov,) = c.prepare("l2-active", "l1")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sys_mount("overlay", str(mnt), "overlay", 0, ",".join(ov.options))
    try:
        assert (mnt / "f").read_bytes() == b"one\n"
        os.unlink(mnt / "gone")
        (mnt / "new").write_bytes(b"two\n")
    finally:
        sys_umount(str(mnt))
    c.commit("l2", "l2-active")
    (top,) = c.view("top", "l2")
    sys_mount("overlay", str(mnt), "overlay", 1, ",".join(top.options))
    try:
        assert sorted(os.listdir(mnt)) == ["f", "new"]
        assert (mnt / "new").read_bytes() == b"two\n"
    finally:
        sys_umount(str(mnt))


def test_errors_match_containerd(service):
    _, c, _ = service
    c.prepare("k")
    assert code_of(c.prepare, "k") == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(c.prepare, "x", "missing") == grpc.StatusCode.NOT_FOUND
    assert code_of(c.prepare, "x", "k") == grpc.StatusCode.INVALID_ARGUMENT  # not committed
    assert code_of(c.commit, "n", "missing") == grpc.StatusCode.NOT_FOUND
    c.commit("n", "k")
    assert code_of(c.commit, "n2", "n") == grpc.StatusCode.FAILED_PRECONDITION
    c.prepare("k2", "n")
    assert code_of(c.commit, "n", "k2") == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(c.remove, "n") == grpc.StatusCode.FAILED_PRECONDITION  # has a child
    assert code_of(c.remove, "nothing") == grpc.StatusCode.NOT_FOUND
    assert code_of(c.walk, "name==a b") == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(c.update, "n", {}, ["parent"]) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(c.prepare, "big", "", {"k": "v" * 5000}) == grpc.StatusCode.INVALID_ARGUMENT
    # the failed calls registered nothing
    assert sorted(i.name for i in c.walk()) == ["k2", "n"]


def test_labels_update(service):
    _, c, _ = service
    c.prepare("k", labels={"a": "1", "b": "2"})
    info = c.update("k", {"b": "3", "c": "4"}, ["labels.b"])
    assert dict(info.labels) == {"a": "1", "b": "3"}
    info = c.update("k", {}, ["labels.a"])  # absent value: the label goes
    assert dict(info.labels) == {"b": "3"}
    info = c.update("k", {"z": "9"})  # no mask: labels replaced
    assert dict(info.labels) == {"z": "9"}
    assert info.updated_at.ToNanoseconds() >= info.created_at.ToNanoseconds()
    assert dict(c.stat("k").labels) == {"z": "9"}


def test_walk_filters(service):
    _, c, _ = service
    c.prepare("base-active", labels={"containerd.io/gc.root": "x"})
    c.commit("base", "base-active", labels={"containerd.io/snapshot.ref": "base",
                                            "containerd.io/gc.root": "x"})
    c.prepare("extract-1", "base", labels={"tier": "top"})
    c.view("view-1", "base")
    names = lambda *f: sorted(i.name for i in c.walk(*f))  # noqa: E731
    assert names() == ["base", "extract-1", "view-1"]
    assert names("kind==committed") == ["base"]
    assert names("kind==active", "kind==view") == ["extract-1", "view-1"]
    assert names("parent==base,kind!=view") == ["extract-1"]
    assert names('labels."containerd.io/gc.root"') == ["base"]
    assert names("labels.containerd.io/snapshot.ref==base") == ["base"]
    assert names("name~=^extract-") == ["extract-1"]
    assert names('labels.tier=="top"') == ["extract-1"]


def test_usage_and_remove(service):
    _, c, root = service
    (m,) = c.prepare("u")
    write(m.source, "data", b"z" * 100_000)
    size, inodes = c.usage("u")
    assert size >= 100_000 and inodes == 2  # the fs directory and the file
    c.commit("uc", "u")
    assert c.usage("uc") == (size, inodes)
    os.unlink(os.path.join(m.source, "data"))  # recorded usage of a committed snapshot
    assert c.usage("uc") == (size, inodes)
    c.remove("uc")
    assert os.listdir(os.path.join(root, "snapshots")) == []
    assert c.walk() == []


def test_restart_resumes_and_cleanup_removes_leftovers(tmp_path):
    sockdir = short_tmpdir("snapsvc-")
    sock = os.path.join(sockdir, "snap.sock")
    root = str(tmp_path / "root")
    svc = serve(sock, root)
    c = Client(sock)
    (m,) = c.prepare("p-active", labels={"l": "v"})
    write(m.source, "f", b"kept\n")
    c.commit("p", "p-active")
    c.prepare("child", "p")
    with pytest.raises(DaemonError, match="another snapshotter"):
        serve(sock, str(tmp_path / "other"))  # a live server is never displaced
    before = {i.name: (i.kind, i.parent, dict(i.labels), i.created_at.ToNanoseconds())
              for i in c.walk()}
    c.channel.close()
    svc.stop()
    snaps = os.path.join(root, "snapshots")
    # what a crash leaves: a half-made directory, a half-removed one, a made one whose
    # row never committed (the next id)
    for leftover in ("new-7", "rm-1", "3"):
        os.makedirs(os.path.join(snaps, leftover, "fs"))
    svc = serve(sock, root)
    c = Client(sock)
    after = {i.name: (i.kind, i.parent, dict(i.labels), i.created_at.ToNanoseconds())
             for i in c.walk()}
    assert after == before
    assert c.mounts("child")[0].type == "overlay"
    # the id the crashed Prepare had used is taken again safely
    (m3,) = c.prepare("again", "p")
    assert os.listdir(os.path.join(snaps, "3", "fs")) == []
    c.remove("again")
    assert sorted(os.listdir(snaps)) == ["1", "2", "new-7", "rm-1"]
    c.cleanup()
    assert sorted(os.listdir(snaps)) == ["1", "2"]
    assert open(os.path.join(snaps, "1", "fs", "f"), "rb").read() == b"kept\n"
    c.channel.close()
    svc.stop()
    os.rmdir(sockdir)


def test_cli_entry_point_bad_root_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    p = subprocess.run([sys.executable, "-m", "fscache_daemon.snapshotter", "--socket",
                        str(tmp_path / "s.sock"), "--root", str(blocker / "root")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr


def test_concurrent_calls_keep_one_consistent_state(service):
    _, c, root = service
    c.prepare("base-a")
    c.commit("base", "base-a")

    def worker(n: int) -> None:
        for i in range(10):
            c.prepare(f"w{n}-{i}-a", "base")
            c.commit(f"w{n}-{i}", f"w{n}-{i}-a")
            if i % 2:
                c.remove(f"w{n}-{i}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    infos = c.walk()
    assert len(infos) == 1 + 8 * 5
    assert all(i.parent == "base" for i in infos if i.name != "base")
    assert len(os.listdir(os.path.join(root, "snapshots"))) == len(infos)


def test_sigkill_during_calls_leaves_rows_with_dirs(tmp_path):
    """SIGKILL the snapshotter process while clients prepare, commit and remove: after a
    restart every listed snapshot has its directory and mounts, and Cleanup leaves
    exactly one directory per snapshot."""
    require(os.geteuid() == 0, "runs as root like the daemon")
    sockdir = short_tmpdir("snapsvc-")
    root = str(tmp_path / "root")
    proc = Snapshotter(root, os.path.join(sockdir, "snap.sock"))
    c = Client(proc.sock)
    c.prepare("base-a")
    c.commit("base", "base-a")
    stop = threading.Event()

    def churn(n: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                c.prepare(f"k{n}-{i}", "base")
                c.commit(f"n{n}-{i}", f"k{n}-{i}")
                if i % 3 == 0:
                    c.remove(f"n{n}-{i}")
            except grpc.RpcError:
                return  # the process is gone
            i += 1

    threads = [threading.Thread(target=churn, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    snaps = os.path.join(root, "snapshots")
    wait_for(lambda: len(os.listdir(snaps)) > 40, 60, "snapshots made")
    proc.kill()
    stop.set()
    for t in threads:
        t.join()
    c.channel.close()
    proc.start()
    c = Client(proc.sock)
    infos = c.walk()
    assert len(infos) > 20
    for info in infos:
        (m,) = c.mounts(info.name)
        upper = m.source if m.type == "bind" else dict(
            o.split("=", 1) for o in m.options if "=" in o)["upperdir"]
        if info.kind == pb.COMMITTED and info.name != "base":
            upper = None  # a committed one's mounts name its parent (ro bind)
        assert upper is None or os.path.isdir(upper), info.name
    c.cleanup()
    assert len(os.listdir(snaps)) == len(infos)
    for info in infos:
        if info.kind == pb.COMMITTED:
            (v,) = c.view(f"view-{info.name}", info.name)  # every committed one is usable
            lowers = [v.source] if v.type == "bind" else dict(
                o.split("=", 1) for o in v.options if "=" in o)["lowerdir"].split(":")
            assert all(os.path.isdir(d) for d in lowers), info.name
    c.channel.close()
    proc.stop()
    shutil.rmtree(sockdir)


def test_new_upper_is_owned_like_the_parent(service):
    _, c, _ = service
    (m,) = c.prepare("owned-a")
    os.chown(m.source, 1234, 5678)  # e.g. an image whose root belongs to a user
    c.commit("owned", "owned-a")
    (ov,) = c.prepare("child", "owned")
    upper = dict(o.split("=", 1) for o in ov.options if "=" in o)["upperdir"]
    st = os.stat(upper)
    assert (st.st_uid, st.st_gid) == (1234, 5678)


def test_entry_point_serves_and_sigterm_removes_socket(tmp_path):
    sockdir = short_tmpdir("snapsvc-")
    proc = Snapshotter(str(tmp_path / "root"), os.path.join(sockdir, "snap.sock"))
    c = Client(proc.sock)
    c.prepare("k")
    assert [i.name for i in c.walk()] == ["k"]
    c.channel.close()
    proc.stop()
    assert proc.proc.returncode == 0
    assert not os.path.exists(proc.sock)
    shutil.rmtree(sockdir)


NYDUS_BLOB = {"containerd.io/snapshot/nydus-blob": "true",
              "containerd.io/snapshot/cri.image-ref": "registry.test/app:1",
              "containerd.io/snapshot/cri.layer-digest": "sha256:" + "b" * 64}


@contextlib.contextmanager
def nydus_service(tmp_path, api_server=None, containerd_address=None):
    """The snapshots service on a short socket path, its daemon API at `daemon.sock`
    beside it (`api_server(path)` serves it, or nothing does): -> (Client, the server)."""
    sockdir = short_tmpdir("snapsvc-")
    api_sock = os.path.join(sockdir, "daemon.sock")
    api = api_server(api_sock) if api_server is not None else None
    svc = serve(os.path.join(sockdir, "s.sock"), str(tmp_path / "root"), daemon_api=api_sock,
                containerd_address=containerd_address)
    c = Client(svc.socket_path)
    try:
        yield c, api
    finally:
        c.channel.close()
        svc.stop()
        if api is not None:
            api.close()
        shutil.rmtree(sockdir)


def prepare_blob_layer(c: Client, key: str, target: str, parent: str = "") -> None:
    """Prepare a Nydus blob layer as containerd's CRI pull does: AlreadyExists (the
    snapshotter commits it at once, nothing is downloaded)."""
    labels = dict(NYDUS_BLOB, **{"containerd.io/snapshot.ref": target})
    assert code_of(c.prepare, key, parent, labels) == grpc.StatusCode.ALREADY_EXISTS


def test_nydus_blob_layer_is_committed_without_download(tmp_path):
    """What containerd's CRI pull does with a Nydus blob layer: Prepare answers
    AlreadyExists, and the committed snapshot is found by containerd's own Walk filter
    (target ref label and parent)."""
    with nydus_service(tmp_path) as (c, _):
        target = "sha256:" + "1" * 64
        prepare_blob_layer(c, "ns/1/extract-1 " + target, target)
        (found,) = c.walk(f'labels."containerd.io/snapshot.ref"=={target},parent==""')
        assert found.kind == pb.COMMITTED and found.name != "ns/1/extract-1 " + target
        target2 = "sha256:" + "2" * 64
        prepare_blob_layer(c, "ns/2/extract-2 " + target2, target2, found.name)
        (second,) = c.walk(f'labels."containerd.io/snapshot.ref"=={target2},'
                           f'parent=="{found.name}"')
        assert second.parent == found.name
        # a container (or plain layer) on a chain of blob layers without a bootstrap
        # would be an overlay of empty layers: an image sharing a Nydus image's chain
        # IDs, never unpacked (docs/zran.md, diff_ids). Refused, naming why
        with pytest.raises(grpc.RpcError) as ei:
            c.prepare("plain", second.name)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Nydus data-blob layer" in ei.value.details()
        assert code_of(c.stat, "plain") == grpc.StatusCode.NOT_FOUND
        # the bootstrap layer needs the image reference to find the blobs later
        boot = {"containerd.io/snapshot/nydus-bootstrap": "true"}
        assert code_of(c.prepare, "boot", second.name, boot) == \
            grpc.StatusCode.INVALID_ARGUMENT
        (m,) = c.prepare("boot", second.name, dict(boot, **{
            "containerd.io/snapshot/cri.image-ref": "registry.test/app:1"}))
        image_dir = os.path.join(dict(o.split("=", 1) for o in m.options if "=" in o)
                                 ["upperdir"], "image")
        os.makedirs(image_dir)
        # the layer must hold a usable bootstrap: its Commit (the pull) fails otherwise
        with pytest.raises(grpc.RpcError) as ei:
            c.commit("boot-c", "boot")
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "nydus bootstrap layer boot: no image/image.boot" in ei.value.details()
        with open(os.path.join(image_dir, "image.boot"), "wb") as f:
            f.write(b"\0" * 8192)
        assert code_of(c.commit, "boot-c", "boot") == grpc.StatusCode.INVALID_ARGUMENT
        src = tmp_path / "src"
        src.mkdir()
        (src / "f").write_bytes(b"x" * 10000)
        pack(str(src), os.path.join(image_dir, "image.boot"), str(tmp_path / "blobs"))
        c.commit("boot-c", "boot")
        # the daemon is unreachable: the container's Prepare fails, naming the cause,
        # and leaves nothing registered
        with pytest.raises(grpc.RpcError) as ei:
            c.prepare("container", "boot-c")
        assert "cannot reach the daemon" in ei.value.details()
        assert code_of(c.stat, "container") == grpc.StatusCode.NOT_FOUND
        c.remove("boot-c")  # no lazy mount left registered on it


def test_nydus_layer_without_daemon_is_refused(service):
    _, c, _ = service
    labels = dict(NYDUS_BLOB, **{"containerd.io/snapshot.ref": "sha256:" + "3" * 64})
    with pytest.raises(grpc.RpcError) as ei:
        c.prepare("x", "", labels)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sha256:" + "b" * 64 in ei.value.details() and "--daemon-api" in ei.value.details()
    assert c.walk() == []


def test_call_latency_is_recorded_per_call(service):
    """Every call is timed, failed ones too (counted as errors); the daemon shows these
    figures in its metrics, JSON and Prometheus."""
    svc, c, _ = service
    c.prepare("a")
    c.commit("a-c", "a")
    for _ in range(5):
        c.stat("a-c")
    assert code_of(c.stat, "missing") == grpc.StatusCode.NOT_FOUND
    c.walk()
    calls = svc.metrics()["calls"]
    assert calls["Prepare"]["count"] == 1 and calls["Commit"]["count"] == 1
    assert calls["Stat"]["count"] == 6 and calls["Stat"]["errors"] == 1
    assert calls["List"]["count"] == 1 and calls["List"]["errors"] == 0
    s = calls["Stat"]
    assert 0 < s["p50_ms"] <= s["p99_ms"] <= s["max_ms"] and s["sum_s"] > 0
    # what `fscache-daemon run --snapshotter-socket` does: the daemon shows them
    from fscache_daemon.daemon import Daemon
    from fscache_daemon.metrics import prometheus_text
    d = Daemon(os.path.join(os.path.dirname(svc.snapshotter.layout.root), "cache"),
               frontend="none")
    try:
        d.metric_sources["snapshotter"] = svc.metrics
        m = d.metrics()
        text = prometheus_text(m)
    finally:
        d.shutdown()
    assert m["snapshotter"]["calls"]["Stat"]["count"] == 6
    assert 'fscache_daemon_snapshotter_call_seconds_count{call="Stat"} 6' in text
    assert 'fscache_daemon_snapshotter_call_seconds{call="Prepare",quantile="0.99"}' in text


def test_call_stats_quantiles():
    from fscache_daemon.snapshotter.callstats import CallStats
    st = CallStats(window=100)
    for i in range(1, 201):          # only the last 100 (101..200 ms) are kept
        st.record("Prepare", i / 1000, failed=i % 50 == 0)
    p = st.snapshot()["Prepare"]
    assert (p["count"], p["errors"]) == (200, 4)
    assert (p["p50_ms"], p["p99_ms"], p["max_ms"]) == (150.0, 199.0, 200.0)


class StandInDaemonAPI:
    """A unix socket in the daemon API's place: each POST's JSON body goes to
    `answer(path, body)`, each GET to `answer_get(path)`, whose (status, object) is sent
    back. Subclasses say what it answers (the real daemon's mounts at a pull are in
    test_rpull)."""

    def __init__(self, path: str) -> None:
        import http.server
        import socketserver
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                n = int(self.headers.get("Content-Length", 0))
                self.send(*api.answer(self.path, json.loads(self.rfile.read(n))))

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self.send(*api.answer_get(self.path))

            def send(self, status: int, obj: object) -> None:
                out = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a) -> None:
                pass

        self.server = socketserver.ThreadingUnixStreamServer(path, Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path: str, body: dict) -> tuple[int, dict]:
        return 503, {"error": "refused by the test"}

    def answer_get(self, path: str) -> tuple[int, object]:
        """A daemon that serves no mount and has none unpicked."""
        if path == "/api/v1/mounts":
            return 200, []
        if path == "/api/v1/daemon":
            return 200, {"unpicked": []}
        return 404, {"error": "no such route"}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _RecordingDaemonAPI(StandInDaemonAPI):
    """Refuses the daemon API's mount request, recording each request: what the
    snapshotter asks the daemon, and when."""

    def __init__(self, path: str) -> None:
        self.posts: list[tuple[str, dict]] = []
        super().__init__(path)

    def answer(self, path: str, body: dict) -> tuple[int, dict]:
        self.posts.append((path, body))
        return super().answer(path, body)


def _bootstrap_layer(c: Client, key: str, parent: str, labels: dict, tmp_path) -> None:
    (m,) = c.prepare(key, parent, labels)
    image_dir = os.path.join(dict(o.split("=", 1) for o in m.options if "=" in o)
                             ["upperdir"], "image")
    os.makedirs(image_dir)
    src = tmp_path / f"src-{key}"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 10000)
    pack(str(src), os.path.join(image_dir, "image.boot"), str(tmp_path / f"blobs-{key}"))


# a bootstrap layer's labels as containerd's CRI pull gives them
BOOT = {"containerd.io/snapshot/nydus-bootstrap": "true",
        "containerd.io/snapshot/cri.image-ref": "registry.test/app:1"}


def blob_then_bootstrap(c: Client, tmp_path, labels: dict = BOOT, key: str = "boot"):
    """A Nydus blob layer (chain sha256:1...1) as containerd's CRI pull commits it, then
    the bootstrap layer `key` on it prepared and given an image.boot, not committed ->
    the blob layer's snapshot info."""
    target = "sha256:" + "1" * 64
    prepare_blob_layer(c, "extract-1 " + target, target)
    (blob,) = c.walk()
    _bootstrap_layer(c, key, blob.name, labels, tmp_path)
    return blob


def test_mount_early_label_mounts_at_commit(tmp_path):
    """A bootstrap layer Prepared with the mount-early label (rpull's) is mounted lazily
    as soon as it is committed, before any container; one without it is not. The mount
    made ahead failing is only logged: the container's Prepare asks again and fails
    with the daemon's answer; Remove then leaves nothing."""
    from fscache_daemon.snapshotter import nydus
    with nydus_service(tmp_path, _RecordingDaemonAPI) as (c, api):
        blob = blob_then_bootstrap(c, tmp_path, key="plain-boot")
        c.commit("plain-c", "plain-boot")
        _bootstrap_layer(c, "early-boot", blob.name,
                         dict(BOOT, **{nydus.MOUNT_EARLY_LABEL: "true"}), tmp_path)
        c.commit("early-c", "early-boot")
        def mounts():
            return [p for p in api.posts if p[0] == "/api/v1/mounts"]
        wait_for(lambda: len(mounts()) >= 1, 30, "the mount asked for at the commit")
        # the one without the label was only warmed (zranwarm), at its own commit
        assert api.posts[0][0] == "/api/v1/warm", api.posts
        ((route, body),) = mounts()        # the one with the label only
        assert body["backend"] == "registry:registry.test/app:1"
        assert body["bootstrap"].endswith("image/image.boot")
        # refused: no mount recorded; the container's Prepare asks again, and fails
        with pytest.raises(grpc.RpcError) as ei:
            c.prepare("container", "early-c")
        assert "refused by the test" in ei.value.details()
        assert len(mounts()) == 2 and mounts()[1][1] == body
        assert [p[0] for p in api.posts].count("/api/v1/warm") == 1
        c.remove("early-c")
        c.remove("plain-c")
        assert sorted(i.name for i in c.walk()) == [blob.name]
