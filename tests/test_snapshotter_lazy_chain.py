"""Snapshots above a Nydus image's lazy mount, through the real gRPC service with the
kernel: a stand-in for the daemon's API bind-mounts a directory (the image's tree) where
the snapshotter asks for the lazy mount, so that what a container would see can be
mounted and read."""

from __future__ import annotations

import contextlib
import os

import grpc
import pytest
from helpers import require, sys_mount, sys_umount
from test_snapshotter_service import (
    StandInDaemonAPI,
    blob_then_bootstrap,
    code_of,
    nydus_service,
)

from fscache_daemon.snapshotter.proto import snapshots_pb2 as pb

pytestmark = pytest.mark.root

MS_BIND = 0x1000


class MountingDaemonAPI(StandInDaemonAPI):
    """Answers the daemon API's mount by bind-mounting `tree` (a tmpfs: a device of its
    own, as the daemon's EROFS mount has, which the snapshotter's ismount check needs)
    on the mount point (201) and its umount by detaching it (200), recording every
    request."""

    tree = ""
    forgets = False     # umount answered 404, the mount left: a daemon that lost it

    def __init__(self, path: str) -> None:
        self.posts: list[tuple[str, dict]] = []
        self.mounted: list[str] = []
        self.backends: dict[str, str] = {}
        super().__init__(path)

    def answer(self, path: str, body: dict) -> tuple[int, dict]:
        self.posts.append((path, body))
        mp = body.get("mountpoint")
        if path == "/api/v1/mounts":
            sys_mount(self.tree, mp, "none", MS_BIND)
            self.mounted.append(mp)
            self.backends[mp] = body.get("backend", "")
            return 201, {}
        if path == "/api/v1/umount":
            if mp in self.mounted and not self.forgets:
                sys_umount(mp, lazy=True)
                self.mounted.remove(mp)
                return 200, {}
            return 404, {}
        return 202, {}

    def answer_get(self, path: str) -> tuple[int, object]:
        if path == "/api/v1/mounts":    # the snapshotter asks whether it serves a mount
            return 200, [{"mountpoint": os.path.realpath(mp),
                          "backend": self.backends.get(mp, "")} for mp in self.mounted]
        return super().answer_get(path)

    def close(self) -> None:
        super().close()
        for mp in reversed(self.mounted):
            with contextlib.suppress(OSError):
                sys_umount(mp, lazy=True)


def _opts(m) -> dict[str, str]:
    return dict(o.split("=", 1) for o in m.options if "=" in o)


@contextlib.contextmanager
def _mounted(m, where: str, flags: int = 0):
    sys_mount(m.source, where, m.type, flags | (MS_BIND if m.type == "bind" else 0),
              None if m.type == "bind" else ",".join(m.options))
    try:
        yield
    finally:
        sys_umount(where)


def _image_tree(tmp_path, files: dict):
    """A tmpfs at tmp_path/image-tree holding `files` ({relative path: bytes}), the tree
    MountingDaemonAPI mounts for an image (the caller unmounts it) -> its path."""
    tree = tmp_path / "image-tree"
    tree.mkdir()
    sys_mount("tmpfs", str(tree), "tmpfs", 0, "size=1m")
    for rel, data in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    MountingDaemonAPI.tree = str(tree)
    return tree


def test_snapshot_above_a_committed_child_of_a_nydus_image_sees_the_image(tmp_path):
    """A container's snapshot committed on a Nydus image (nerdctl commit, a build
    FROM the image) and a snapshot prepared on that: its lower layers are the committed
    layer over the image's lazy mount, as with containerd's overlayfs snapshotter every
    parent's content is visible. Before, only the nearest parent was looked at for the
    bootstrap layer, so this snapshot got the bootstrap layer's own directory (holding
    image/image.boot) and the empty blob layers as lowers: none of the image's files."""
    require(os.geteuid() == 0, "needs root (bind and overlay mounts)")
    tree = _image_tree(tmp_path, {"bin/app": b"the image's file\n"})
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with contextlib.ExitStack() as stack:
        stack.callback(sys_umount, str(tree), True)
        c, api = stack.enter_context(nydus_service(tmp_path, MountingDaemonAPI))
        blob = blob_then_bootstrap(c, tmp_path)
        c.commit("boot-c", "boot")
        (ctr,) = c.prepare("ctr", "boot-c")
        lazy = _opts(ctr)["lowerdir"]
        assert lazy in api.mounted
        with _mounted(ctr, str(mnt)):
            assert (mnt / "bin" / "app").read_bytes() == b"the image's file\n"
            (mnt / "added").write_bytes(b"committed on top\n")
        c.commit("ctr-c", "ctr")

        (top,) = c.prepare("top", "ctr-c")
        assert top.type == "overlay"
        assert _opts(top)["lowerdir"].split(":") == [_opts(ctr)["upperdir"], lazy]
        with _mounted(top, str(mnt)):
            assert (mnt / "bin" / "app").read_bytes() == b"the image's file\n"
            assert (mnt / "added").read_bytes() == b"committed on top\n"
            assert not (mnt / "image").exists()   # the bootstrap layer's own files
        (view,) = c.view("view", "ctr-c")
        assert view.type == "overlay" and "upperdir" not in _opts(view)
        with _mounted(view, str(mnt), flags=1):
            assert sorted(os.listdir(mnt)) == ["added", "bin"]
        assert c.mounts("top") == [top]

        # the image's mount stays while anything above it exists, and goes with it
        assert code_of(c.remove, "boot-c") == grpc.StatusCode.FAILED_PRECONDITION
        for key in ("view", "top", "ctr-c", "boot-c"):
            c.remove(key)
        assert not api.mounted
        assert [i.name for i in c.walk()] == [blob.name]
        assert [p for p, _ in api.posts].count("/api/v1/mounts") == 1
        assert c.stat(blob.name).kind == pb.COMMITTED


def test_lazy_mount_the_daemon_no_longer_knows_goes_with_its_snapshot(tmp_path):
    """The daemon answers the release of an image's lazy mount with 404 (it does not
    know the mount: a restart that could not pick it up, logged "cannot pick up mount",
    or its state lost) while the kernel still has it at ROOT/lazy/<id>. The snapshot
    went, its row too, and the mount stayed for good (rmdir's EBUSY was ignored): nothing
    would ever release it, nor the cache files its superblock holds. The snapshotter
    detaches it itself."""
    require(os.geteuid() == 0, "needs root (bind mounts)")
    tree = _image_tree(tmp_path, {"f": b"x"})
    with contextlib.ExitStack() as stack:
        stack.callback(sys_umount, str(tree), True)
        stack.callback(setattr, MountingDaemonAPI, "forgets", False)
        c, api = stack.enter_context(nydus_service(tmp_path, MountingDaemonAPI))
        blob = blob_then_bootstrap(c, tmp_path)
        c.commit("boot-c", "boot")
        (ctr,) = c.prepare("ctr", "boot-c")
        lazy = _opts(ctr)["lowerdir"]
        assert os.path.ismount(lazy)
        c.remove("ctr")
        MountingDaemonAPI.forgets = True
        c.remove("boot-c")
        assert ("/api/v1/umount", {"mountpoint": lazy, "lazy": True}) in api.posts
        assert not os.path.ismount(lazy) and not os.path.exists(lazy)
        assert [i.name for i in c.walk()] == [blob.name]


def test_mount_whose_image_is_gone_is_made_afresh_before_it_is_handed_out(tmp_path,
                                                                        monkeypatch):
    """The image's lazy mount reads through a reference no image on the node has any
    more (containerd lists another image of the same layers): the next container's
    Prepare releases it and hands out the mount made afresh through the other image's
    reference. The release once answered the old mount point, unmounted (an empty
    directory as the container's lower), and only a later Mounts call mounted it."""
    from fscache_daemon.snapshotter import imagerefs
    require(os.geteuid() == 0, "needs root (bind mounts)")
    tree = _image_tree(tmp_path, {"f": b"x"})
    on_chain: list[str] = []
    asked: list[tuple[str, str]] = []

    def refs_on_chain(address: str, namespace: str, chain_id: str) -> list[str]:
        asked.append((namespace, chain_id))
        return list(on_chain)
    monkeypatch.setattr(imagerefs, "refs_on_chain", refs_on_chain)
    with contextlib.ExitStack() as stack:
        stack.callback(sys_umount, str(tree), True)
        c, api = stack.enter_context(nydus_service(tmp_path, MountingDaemonAPI,
                                                   containerd_address="/nonexistent"))
        blob_then_bootstrap(c, tmp_path)
        chain = "sha256:" + "2" * 64
        c.commit(f"ns1/8/{chain}", "boot")     # named as containerd's metadata names it
        (ctr,) = c.prepare("ctr", f"ns1/8/{chain}")     # no image listed: the recorded one
        lazy = _opts(ctr)["lowerdir"]
        assert api.backends[lazy] == "registry:registry.test/app:1"
        on_chain[:] = ["registry.test/app:1", "registry.test/copy:1"]
        (ctr2,) = c.prepare("ctr2", f"ns1/8/{chain}")   # still listed: kept
        assert [p for p, _ in api.posts].count("/api/v1/mounts") == 1
        on_chain[:] = ["registry.test/copy:1"]
        (ctr3,) = c.prepare("ctr3", f"ns1/8/{chain}")
        assert _opts(ctr3)["lowerdir"] == lazy and os.path.ismount(lazy)
        assert api.backends[lazy] == "registry:registry.test/copy:1"
        assert [p for p, _ in api.posts if p != "/api/v1/warm"] == [
            "/api/v1/mounts", "/api/v1/umount", "/api/v1/mounts"]
        assert set(asked) == {("ns1", chain)}
        for key in ("ctr", "ctr2", "ctr3", f"ns1/8/{chain}"):
            c.remove(key)
        assert not api.mounted
