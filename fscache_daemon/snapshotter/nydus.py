"""Nydus layers: what the snapshotter does differently for an image that `erofs-tools
convert` (or nydusify) wrote, told apart by the labels containerd's CRI plugin passes
on Prepare (the layer's annotations, `disable_snapshot_annotations = false`).

  * a data-blob layer (`containerd.io/snapshot/nydus-blob`): nothing is downloaded; the
    snapshot is committed at once, labelled with containerd's target ref, and Prepare
    answers AlreadyExists, which makes containerd skip the layer;
  * the bootstrap layer (`containerd.io/snapshot/nydus-bootstrap`): unpacked by
    containerd like any tar layer (it is small: `image/image.boot`); the snapshot
    remembers the image reference so its blobs can be found later;
    when it is committed, the daemon is asked to fetch what the image's lazy mount will
    need first (`POST /api/v1/warm`: a zran image's meta blobs) while containerd goes
    on to the container;
  * a container's snapshot on that bootstrap: the image is mounted lazily once through
    the daemon's JSON API (`POST /api/v1/mounts`) and that mount is the overlay's only
    lower, shared by every container of the image; it is released (`POST
    /api/v1/umount`) when the bootstrap snapshot itself is removed (containerd's GC,
    after the image and its containers are gone).

Failures name the layer (digest) and the cause, so that containerd's caller (kubelet,
`ctr`) can tell which layer of which image failed and why: a bootstrap that is not a
usable RAFS v6 image fails the Commit of its layer (the pull), a lazy mount the daemon
cannot make (e.g. the registry refuses or does not answer its blob reads) fails the
container's Prepare.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket

from erofs_tools.errors import ErofsToolsError
from fscache_daemon.errors import DaemonError, SnapshotInvalidError

log = logging.getLogger(__name__)

BLOB_LABEL = "containerd.io/snapshot/nydus-blob"
BOOTSTRAP_LABEL = "containerd.io/snapshot/nydus-bootstrap"
TARGET_LABEL = "containerd.io/snapshot.ref"
IMAGE_REF_LABEL = "containerd.io/snapshot/cri.image-ref"
LAYER_LABEL = "containerd.io/snapshot/cri.layer-digest"
# on a bootstrap layer's Prepare (rpull sets it): mount the image lazily as soon as the
# layer is committed, not at its first container's Prepare (snapshots.py: _mount_ahead)
MOUNT_EARLY_LABEL = "containerd.io/snapshot/fscache-daemon.mount-early"
FS_VERSION_LABEL = "containerd.io/snapshot/nydus-fs-version"
# set by `fscache-daemon rpull --insecure` on the layers it prepares: the user asked for
# plain HTTP to this image's registry, so its lazy mount reads the blobs that way too
# (containerd passes only labels under containerd.io/snapshot/ to a snapshotter)
PLAIN_HTTP_LABEL = "containerd.io/snapshot/fscache-daemon.plain-http"
# how rpull's extraction keys begin (after containerd's "<namespace>/<n>/"); see
# from_rpull
RPULL_KEY_PREFIX = "extract-fscache-rpull-"
BOOTSTRAP_PATH = os.path.join("image", "image.boot")


def from_rpull(key: str) -> bool:
    """Whether a Prepare's key is one rpull chose (containerd's metadata layer passes it
    as "<namespace>/<n>/<the client's key>"). Labels cannot tell: containerd's CRI pull
    passes every `containerd.io/snapshot/` annotation of a layer as a label, so an
    image's author can write any of ours; the key is the client's alone."""
    return key.split("/", 2)[-1].startswith(RPULL_KEY_PREFIX)


def layer_kind(labels: dict[str, str]) -> str | None:
    """"blob", "bootstrap" or None (a plain layer or a container's snapshot)."""
    if labels.get(BLOB_LABEL) == "true":
        return "blob"
    if labels.get(BOOTSTRAP_LABEL) == "true":
        return "bootstrap"
    return None


def layer_digest(labels: dict[str, str], key: str) -> str:
    """How messages name a layer: its digest when containerd passed it (CRI), else the
    snapshot key."""
    return labels.get(LAYER_LABEL) or labels.get(TARGET_LABEL) or key


def check_fs_version(labels: dict[str, str], layer: str) -> None:
    """Refuse a bootstrap layer of another RAFS version before containerd downloads it
    (nydusify writes "5" for RAFS v5 images; the daemon mounts RAFS v6 only)."""
    version = labels.get(FS_VERSION_LABEL, "6")
    if version != "6":
        raise SnapshotInvalidError(
            f"nydus bootstrap layer {layer}: nydus-fs-version {version[:16]!r} is not "
            "served (RAFS v6 only)")


def check_bootstrap(fs_dir: str, layer: str) -> None:
    """The bootstrap layer as containerd applied it must hold a usable RAFS v6
    bootstrap: checked when the layer is committed, so that a corrupted one fails the
    pull (naming the layer) instead of every container start later."""
    path = os.path.join(fs_dir, BOOTSTRAP_PATH)
    # every component, not only the last, must be the layer's own: a symlinked `image`
    # directory (the image author's to write) would be resolved on the host, and the
    # daemon would mount a host file (another image's bootstrap) for this image. A
    # committed layer does not change afterwards, so the check holds for its mounts.
    inside = os.path.realpath(path) == os.path.join(os.path.realpath(fs_dir),
                                                    BOOTSTRAP_PATH)
    if not inside or not os.path.isfile(path):
        raise SnapshotInvalidError(f"nydus bootstrap layer {layer}: no {BOOTSTRAP_PATH} "
                                   "(regular file, no symlink on its path) in the layer")
    try:
        # imported here: rpull uses this module for its labels alone (its start counts)
        from fscache_daemon.storage.image import load_image
        load_image(path)
    except (ErofsToolsError, OSError) as e:
        cause = str(e).replace(path, BOOTSTRAP_PATH)
        raise SnapshotInvalidError(f"nydus bootstrap layer {layer}: {cause}") from None


def image_ref(labels: dict[str, str]) -> str:
    """The registry reference the blobs come from; a Nydus layer without it (pulled by a
    client that adds no CRI labels) cannot be served lazily."""
    ref = labels.get(IMAGE_REF_LABEL, "")
    if not ref:
        layer = labels.get(LAYER_LABEL) or labels.get(TARGET_LABEL, "?")
        raise SnapshotInvalidError(
            f"nydus layer {layer}: no {IMAGE_REF_LABEL} label (pull through CRI with "
            "disable_snapshot_annotations = false)")
    return ref


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError:
            s.close()
            raise
        self.sock = s


class DaemonClient:
    """The daemon's unix-socket JSON API, as a client (mount, warm, umount, and whether
    it serves a mount point)."""

    def __init__(self, path: str, timeout: float = 300.0) -> None:
        self.path = path
        self.timeout = timeout

    def _request(self, method: str, route: str,
                 body: dict | None = None) -> tuple[int, dict | list]:
        conn = _UnixHTTPConnection(self.path, self.timeout)
        try:
            if body is None:
                conn.request(method, route)
            else:
                conn.request(method, route, body=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = resp.read()
        except OSError as e:
            raise DaemonError(f"cannot reach the daemon at {self.path}: {e}") from None
        finally:
            conn.close()
        try:
            answer = json.loads(payload) if payload else {}
        except ValueError:
            answer = {"error": payload[:200].decode("utf-8", "replace")}
        return resp.status, answer if isinstance(answer, (dict, list)) else {}

    def _post(self, route: str, body: dict) -> tuple[int, dict]:
        st, answer = self._request("POST", route, body)
        return st, answer if isinstance(answer, dict) else {}

    def _get(self, route: str) -> dict | list:
        st, answer = self._request("GET", route)
        if st != 200:
            raise DaemonError(f"GET {route}: the daemon answered {st}: "
                              f"{answer.get('error', answer) if isinstance(answer, dict) else ''}")
        return answer

    def serving(self, mountpoint: str) -> tuple[str, str]:
        """Whether the daemon serves `mountpoint`: ("served", its backend spec),
        ("unpicked", why) (a restart could not take it back yet; the daemon retries) or
        ("unknown", "") (the daemon does not know it: nothing answers its reads)."""
        mp = os.path.realpath(mountpoint)   # the daemon keeps mount points canonical
        for m in self._get("/api/v1/mounts"):
            if isinstance(m, dict) and m.get("mountpoint") == mp:
                return "served", str(m.get("backend", ""))
        info = self._get("/api/v1/daemon")
        unpicked = info.get("unpicked") if isinstance(info, dict) else None
        for u in unpicked or ():
            if isinstance(u, dict) and u.get("mountpoint") == mp:
                return "unpicked", str(u.get("error", ""))
        return "unknown", ""

    def mount(self, bootstrap: str, mountpoint: str, backend: str,
              options: dict[str, object]) -> None:
        st, res = self._post("/api/v1/mounts", {"bootstrap": bootstrap,
                                                "mountpoint": mountpoint,
                                                "backend": backend, "options": options})
        if st == 409 and "already mounted" in str(res.get("error", "")):
            return  # ours from before a restart of this process
        if st != 201:
            # the caller names the layer and the image; the daemon's message the cause
            raise DaemonError(f"the daemon refused it ({st}): {res.get('error', res)}")

    def warm(self, bootstrap: str, backend: str, options: dict[str, object]) -> None:
        """Ask the daemon to fetch what the mount of this bootstrap will need first (its
        zran meta blobs) now; best effort: the mount does it itself otherwise."""
        st, res = self._post("/api/v1/warm", {"bootstrap": bootstrap, "backend": backend,
                                              "options": options})
        if st != 202:
            raise DaemonError(f"the daemon did not warm it ({st}): {res.get('error', res)}")

    def umount(self, mountpoint: str) -> None:
        st, res = self._post("/api/v1/umount", {"mountpoint": mountpoint, "lazy": True})
        if st not in (200, 404):
            raise DaemonError(f"lazy umount of {mountpoint}: daemon answered {st}: "
                              f"{res.get('error', res)}")


def backend_spec(ref: str) -> str:
    """The daemon's registry backend for an image reference."""
    return f"registry:{ref}"


def backend_options(ref: str, insecure_hosts: frozenset[str],
                    plain_http: bool = False) -> dict[str, object]:
    """Plain HTTP for the image's registry when the daemon's --insecure-registry names
    its host or the pull asked for it (PLAIN_HTTP_LABEL)."""
    host = ref.split("/", 1)[0]
    return {"insecure": True} if plain_http or host in insecure_hosts else {}
