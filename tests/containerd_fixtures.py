"""Real containerd (Debian's 1.6) with a private config, root, state and socket, and the
project's snapshotter as its proxy plugin, for tests as root.

    snap = Snapshotter(root, sock)      python -m fscache_daemon.snapshotter, a real process
    ctd = Containerd(workdir, {NAME: sock})
    ctd.ctr("image", "import", ...)     ctr -a PRIVATE_SOCK -n PRIVATE_NS ...
    oci_archive(path, layers, ...)      a small OCI image tar (static busybox + files)
    with overlayfs_rootfs(layers, name) as theirs:   containerd's own unpacking, mounted

Nothing here touches the system's containerd: its own socket, root and state live in
the test's directories, and containers run in a namespace named for the test run.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time

from helpers import HANG, require

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNAPSHOTTER = "erofs-test"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def require_containerd() -> None:
    require(os.geteuid() == 0, "needs root (containerd, mounts)")
    for tool in ("containerd", "ctr", "runc", "containerd-shim-runc-v2", "busybox"):
        require(shutil.which(tool) is not None,
                f"{tool} not installed (apt-get install containerd runc busybox-static)")


def short_tmpdir(prefix: str) -> str:
    """A directory under /tmp: unix socket paths must stay under 108 bytes."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None,
             log: str | None = None) -> None:
    """Wait until cond() is true. Every caller waits for something that happens (a
    process answering, containerd reconnecting, snapshots removed), so `timeout` only
    bounds a hang and is at least helpers.HANG: a start of containerd, the snapshotter
    or a container under a CI's load took longer than the 30 s that some callers gave.
    A cond whose own command timed out (a ctr call on a loaded machine) is not true
    yet, and cond is asked once more after the deadline (a poll preempted past it is
    not a failure)."""
    deadline = time.monotonic() + max(timeout, HANG)
    while True:
        try:
            if cond():
                return
        except subprocess.TimeoutExpired:
            pass
        if proc is not None and proc.poll() is not None:
            tail = open(log).read()[-3000:] if log else ""
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{tail}")
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    tail = open(log).read()[-3000:] if log else ""
    raise RuntimeError(f"{what}: not ready after {max(timeout, HANG)}s\n{tail}")


class Snapshotter:
    """The snapshotter as its own process (so a test can SIGKILL it)."""

    def __init__(self, root: str, sock: str, extra: tuple[str, ...] = ()) -> None:
        self.root, self.sock, self.extra = root, sock, extra
        self.log = os.path.join(os.path.dirname(sock), "snapshotter.log")
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        """Start the process; ready once its socket accepts a connection (a previous,
        killed process's socket file refuses them; its inode number may be reused)."""
        assert self.proc is None or self.proc.poll() is not None
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fscache_daemon.snapshotter", "--socket", self.sock,
                 "--root", self.root, "--log-level", "DEBUG", *self.extra],
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO)

        def ready() -> bool:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(self.sock)
                except OSError:
                    return False
                return True
        wait_for(ready, HANG, "snapshotter", self.proc, self.log)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self) -> str:
        return open(self.log).read()[-4000:]


# every plugin this test containerd does not need; the opt plugin would use /opt/containerd
_DISABLED = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt",
             "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
             "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
             "io.containerd.tracing.processor.v1.otlp"]


class Containerd:
    """containerd with a private config, root, state and socket."""

    def __init__(self, workdir: str, proxies: dict[str, str],
                 cri_snapshotter: str | None = None,
                 plain_http_hosts: tuple[str, ...] = (),
                 start_timeout: float = HANG, extra_config: str = "") -> None:
        self.dir = workdir
        self.cri = cri_snapshotter is not None
        self.sock = os.path.join(workdir, "containerd.sock")
        # containerd namespaces allow [A-Za-z0-9] runs joined by single . _ -
        self.namespace = f"erofs-test-{os.getpid()}-{secrets.token_hex(4)}"
        self.log = os.path.join(workdir, "containerd.log")
        config = os.path.join(workdir, "config.toml")
        lines = [
            "version = 2",
            f'root = "{workdir}/root"',
            f'state = "{workdir}/state"',
            "disabled_plugins = [" + ", ".join(
                f'"{p}"' for p in _DISABLED
                if not (cri_snapshotter and p == "io.containerd.grpc.v1.cri")) + "]",
            "[grpc]", f'  address = "{self.sock}"',
            "[ttrpc]", f'  address = "{self.sock}.ttrpc"',
            "[debug]", '  address = ""', '  level = "debug"',
            "[metrics]", '  address = ""',
        ]
        if cri_snapshotter:
            # CRI pulls through the snapshotter with the layer annotations as labels
            cri = '[plugins."io.containerd.grpc.v1.cri"'
            lines += [f"{cri}]", '  stream_server_port = "0"',
                      f"{cri}.containerd]", f'  snapshotter = "{cri_snapshotter}"',
                      "  disable_snapshot_annotations = false",
                      f"{cri}.cni]", f'  bin_dir = "{workdir}/cni-bin"',
                      f'  conf_dir = "{workdir}/cni-conf"']
            for host in plain_http_hosts:
                lines += [f'{cri}.registry.mirrors."{host}"]',
                          f'  endpoint = ["http://{host}"]']
        for name, address in proxies.items():
            lines += [f"[proxy_plugins.{name}]", '  type = "snapshot"',
                      f'  address = "{address}"']
        self.config = config
        with open(config, "w") as f:
            # extra_config: more TOML tables (e.g. the CRI plugin's registry settings)
            f.write("\n".join(lines) + "\n" + extra_config)
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(["containerd", "--config", config],
                                         stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: self.ctr("version", check=False).returncode == 0, start_timeout,
                 "containerd", self.proc, self.log)

    def ctr(self, *args: str, check: bool = True, timeout: float = 120,
            input: bytes | None = None, ns: str | None = None) -> subprocess.CompletedProcess:
        p = subprocess.run(["ctr", "-a", self.sock, "-n", ns or self.namespace, *args],
                           capture_output=True, timeout=timeout, input=input)
        if check and p.returncode != 0:
            raise AssertionError(
                f"ctr {' '.join(args)} failed ({p.returncode}): "
                f"{p.stderr.decode(errors='replace')}\ncontainerd log:\n"
                f"{open(self.log).read()[-3000:]}")
        return p

    def wait_snapshotter(self, name: str, timeout: float = HANG) -> None:
        """Wait until containerd reaches proxy snapshotter `name`. Needed when containerd
        started before the snapshotter's socket existed: its gRPC client then backs off
        between attempts (up to 3 s) and fails calls meanwhile ("dial ...: timeout")."""
        wait_for(lambda: self.ctr("snapshots", "--snapshotter", name, "ls",
                                  check=False, timeout=10).returncode == 0,
                 timeout, f"containerd's connection to snapshotter {name}", self.proc,
                 self.log)

    def run_out(self, *args: str, ns: str | None = None, timeout: float = 120) -> bytes:
        """`ctr run --rm ARGS...` (ARGS = options, image, id, command...) and what the
        command wrote to its stdout.

        The output goes to a file in a bind-mounted host directory, not through ctr's
        FIFOs: containerd 1.6's ctr cancels a FIFO copy that has not started yet when the
        task exits (task.Delete -> io.Cancel), so a quick container on a loaded machine
        can lose its whole stdout while exiting 0 (seen here once in three runs under a
        CI load)."""
        opts, rest = _split_run_args(args)
        image, cid, argv = rest[0], rest[1], rest[2:]
        outdir = tempfile.mkdtemp(prefix="ctr-out-", dir=self.dir)
        try:
            self.ctr("run", "--rm", *opts, "--mount",
                     f"type=bind,src={outdir},dst=/.ctr-out,options=rbind:rw",
                     image, cid, "/bin/sh", "-c", 'exec "$@" >/.ctr-out/stdout', "sh",
                     *argv, ns=ns, timeout=timeout)
            with open(os.path.join(outdir, "stdout"), "rb") as f:
                return f.read()
        finally:
            shutil.rmtree(outdir, ignore_errors=True)

    def stop(self) -> None:
        # containers of this run first, so no shim (nor its rootfs mount) outlives the
        # test: in the test's namespace and, with CRI, in CRI's (this containerd's own
        # k8s.io: its root and socket are the test's)
        namespaces = (self.namespace, "k8s.io") if self.cri else (self.namespace,)
        for ns in namespaces:
            tasks = self.ctr("tasks", "ls", "-q", check=False, ns=ns).stdout.decode().split()
            for t in tasks:
                self.ctr("tasks", "kill", "-s", "SIGKILL", t, check=False, ns=ns)
                self.ctr("tasks", "rm", "-f", t, check=False, ns=ns)
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        # runc's state root for this run's namespace (the shim puts it under /run); empty
        # once its containers are gone, and named for this run only
        for ns in namespaces:
            with contextlib.suppress(OSError):  # only when empty: never another's state
                os.rmdir(os.path.join("/run/containerd/runc", ns))


# --- a small OCI image -----------------------------------------------------------------


def tar_layer(entries: list[tuple[str, str, bytes | str | None]]) -> bytes:
    """entries: (path, kind, data): kind "file" (data bytes, mode 0644, or 0755 when
    the path is under bin/), "dir", "symlink" (data = target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for path, kind, data in entries:
            ti = tarfile.TarInfo(path)
            ti.mtime = 1_700_000_000
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            elif kind == "symlink":
                ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, str(data), 0o777
                tf.addfile(ti)
            else:
                assert isinstance(data, bytes)
                ti.size, ti.mode = len(data), 0o755 if path.startswith("bin/") else 0o644
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def busybox_layers(greeting: bytes = b"hello from layer two\n") -> list[bytes]:
    """Three layers: static busybox + applet links; /etc files (/etc/greeting holds
    `greeting`); a whiteout of one layer-2 file and a new file. A container's view shows
    all three applied."""
    # busybox-static's: the image has no libc for a dynamically linked one
    with open(shutil.which("busybox") or "/bin/busybox", "rb") as f:
        busybox = f.read()
    base = [("bin", "dir", None), ("bin/busybox", "file", busybox)]
    base += [(f"bin/{a}", "symlink", "busybox") for a in ("sh", "cat", "echo", "ls", "test")]
    base += [("etc", "dir", None), ("tmp", "dir", None), ("proc", "dir", None),
             ("dev", "dir", None), ("sys", "dir", None)]
    second = [("etc", "dir", None), ("etc/greeting", "file", greeting),
              ("etc/gone", "file", b"deleted by layer three\n")]
    third = [("etc", "dir", None), ("etc/.wh.gone", "file", b""),
             ("etc/third", "file", b"layer three\n")]
    return [tar_layer(base), tar_layer(second), tar_layer(third)]


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class OciImage:
    """An image's blobs by digest, its manifest bytes and its layers' chain ids."""

    def __init__(self, layers: list[bytes], cmd: list[str], gzipped: bool = False) -> None:
        self.blobs: dict[str, bytes] = {}
        diff_ids = [_sha(layer) for layer in layers]
        config = json.dumps({
            "architecture": "amd64", "os": "linux",
            "config": {"Cmd": cmd, "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }).encode()
        layer_type = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if gzipped else "")
        stored = [gzip.compress(x, mtime=0) if gzipped else x for x in layers]
        self.manifest = json.dumps({
            "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       **self._blob(config)},
            "layers": [{"mediaType": layer_type, **self._blob(x)} for x in stored],
        }).encode()
        self.manifest_digest = _sha(self.manifest)
        self.chain = [diff_ids[0]]
        for d in diff_ids[1:]:
            self.chain.append(_sha(f"{self.chain[-1]} {d}".encode()))

    def _blob(self, data: bytes) -> dict:
        d = _sha(data)
        self.blobs[d] = data
        return {"digest": d, "size": len(data)}

    def write_archive(self, path: str, name: str) -> None:
        """An OCI image-layout tar naming the image `name` (for `ctr image import`)."""
        index = json.dumps({"schemaVersion": 2, "manifests": [{
            "mediaType": MANIFEST_TYPE, "digest": self.manifest_digest,
            "size": len(self.manifest),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": name,
                            "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]},
        }]}).encode()
        files = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": index,
                 f"blobs/sha256/{self.manifest_digest[7:]}": self.manifest}
        files.update({f"blobs/sha256/{d[7:]}": b for d, b in self.blobs.items()})
        with tarfile.open(path, "w") as tf:
            for fname, data in files.items():
                ti = tarfile.TarInfo(fname)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))

    def push(self, client, repo: str, tag: str) -> None:
        """Upload to a registry through the project's client (erofs_tools.registry)."""
        from erofs_tools.registry.manifest import Manifest
        for d, data in self.blobs.items():
            client.push_blob(repo, data, digest=d)
        client.put_manifest(repo, tag, Manifest(self.manifest, MANIFEST_TYPE,
                                                self.manifest_digest))


def oci_archive(path: str, name: str, layers: list[bytes], cmd: list[str]) -> list[str]:
    """Write an OCI image-layout tar of uncompressed `layers` named `name`; -> the
    layers' chain ids, bottom first."""
    image = OciImage(layers, cmd)
    image.write_archive(path, name)
    return image.chain


@contextlib.contextmanager
def overlayfs_rootfs(layers: list[bytes], name: str):
    """The root file system containerd itself unpacks from uncompressed `layers` (an
    image `name` imported with the overlayfs snapshotter into a private containerd and
    mounted by `ctr image mount`) -> its mount point; unmounted and removed after."""
    wd = short_tmpdir("erofs-ctd-")
    ctd = Containerd(wd, {})
    try:
        OciImage(layers, ["/x"]).write_archive(os.path.join(wd, "i.tar"), name)
        ctd.ctr("image", "import", "--snapshotter", "overlayfs", os.path.join(wd, "i.tar"))
        theirs = os.path.join(wd, "mnt")
        os.mkdir(theirs)
        ctd.ctr("image", "mount", "--snapshotter", "overlayfs", name, theirs)
        try:
            yield theirs
        finally:
            ctd.ctr("image", "unmount", theirs)
    finally:
        ctd.stop()
        shutil.rmtree(wd, ignore_errors=True)


# --- CRI: PullImage as kubelet calls it -----------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


DIAL_RETRIES = 3


def cri_pull(containerd_sock: str, ref: str, timeout: float = 120,
             auth: tuple[str, str] | None = None) -> None:
    """runtime.v1.ImageService/PullImage{image: ImageSpec{image: ref}, auth?:
    AuthConfig{username, password}} (what kubelet sends from an image pull secret):
    nested length-delimited fields, encoded here rather than from the whole CRI API."""
    import grpc
    request = _field(1, _field(1, ref.encode()))
    if auth is not None:
        request += _field(2, _field(1, auth[0].encode()) + _field(2, auth[1].encode()))
    # containerd 1.6 dials a proxy snapshotter with a deadline of its gRPC backoff (1 s,
    # growing to 3 s) and fails calls at once while a dial is in backoff: on a loaded
    # machine a redial that misses that deadline failed a whole pull ("failed to
    # prepare extraction snapshot ... Error while dialing ... timeout", CI at load 8)
    # although the snapshotter answered before and after. PullImage is idempotent: such
    # a pull is sent again (a bounded number of times), any other error ends the test.
    for attempt in range(DIAL_RETRIES + 1):
        with grpc.insecure_channel(f"unix:{containerd_sock}") as ch:
            call = ch.unary_unary("/runtime.v1.ImageService/PullImage",
                                  request_serializer=lambda b: b,
                                  response_deserializer=lambda b: b)
            try:
                call(request, timeout=timeout)
                return
            except grpc.RpcError as e:
                dial = (e.code() == grpc.StatusCode.UNAVAILABLE
                        and "Error while dialing" in (e.details() or ""))
                if not dial or attempt == DIAL_RETRIES:
                    raise
        time.sleep(3.0)     # containerd's longest backoff between dials


def _split_run_args(args: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """`ctr run` options (those before the image) and the rest; the options these
    tests use take a value unless they are flags."""
    flags = {"--rm", "-d", "--detach", "-t", "--tty", "--read-only", "--privileged",
             "--net-host", "--rootfs"}
    opts: list[str] = []
    i = 0
    while i < len(args) and args[i].startswith("-"):
        opts.append(args[i])
        if args[i] not in flags and "=" not in args[i]:
            i += 1
            opts.append(args[i])
        i += 1
    return opts, list(args[i:])
