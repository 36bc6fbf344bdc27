"""The snapshotter's operations, independent of gRPC: containerd's overlayfs snapshotter
semantics over the SQLite metadata store and the snapshot directories.

  prepare(key, parent)  a new active (writable) snapshot on a committed parent
  view(key, parent)     a new read-only view of a committed parent
  commit(name, key)     the active snapshot becomes committed `name` (usage recorded)
  remove(key)           a snapshot without children goes, with its directory
  cleanup()             directories that no snapshot owns go (crash leftovers)
Nydus layers (nydus.py) take other paths in prepare/mounts/remove, each marked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time

from fscache_daemon import mounts
from fscache_daemon.errors import (
    DaemonError,
    SnapshotError,
    SnapshotExistsError,
    SnapshotInvalidError,
    SnapshotPreconditionError,
    SnapshotUnavailableError,
)
from fscache_daemon.keyedlock import KeyedLock
from fscache_daemon.snapshotter import imagerefs, nydus, overlay
from fscache_daemon.snapshotter.filters import compile_filters, matches
from fscache_daemon.snapshotter.overlay import Layout, Mount
from fscache_daemon.snapshotter.store import Info, Kind, MetaStore, Snapshot

log = logging.getLogger(__name__)

DB_NAME = "metadata.db"
# the name a Nydus data-blob layer is committed under (empty: _commit_remote_blob)
BLOB_SNAPSHOT_PREFIX = "nydus-blob "


class Snapshotter:
    """Snapshots under one root directory (`root/metadata.db`, `root/snapshots/`)."""

    def __init__(self, root: str, daemon_api: str | None = None,
                 insecure_registries: tuple[str, ...] = (),
                 containerd_address: str | None = None) -> None:
        self.layout = Layout(root)
        self.store = MetaStore(os.path.join(self.layout.root, DB_NAME))
        # Nydus layers need the daemon (lazy mounts); without it they are refused
        self.daemon = nydus.DaemonClient(daemon_api) if daemon_api else None
        self.insecure = frozenset(insecure_registries)
        # containerd's socket: which images stand on a bootstrap's chain when it is
        # mounted (imagerefs.py); None: the reference recorded at the pull
        self.containerd = containerd_address
        # per bootstrap snapshot: its lazy mount is made and released one at a time, while
        # another image's mount (seconds when its registry is slow) goes on beside it
        self._lazy_locks = KeyedLock()

    def close(self) -> None:
        self.store.close()

    def _create(self, kind: Kind, key: str, parent: str,
                labels: dict[str, str]) -> list[Mount]:
        layer = nydus.layer_kind(labels)
        if layer is not None and self.daemon is None:
            raise SnapshotInvalidError(
                f"nydus layer {labels.get(nydus.LAYER_LABEL, key)}: this snapshotter has no "
                "daemon API to mount it lazily (--daemon-api)")
        if layer == "blob" and kind == Kind.ACTIVE and labels.get(nydus.TARGET_LABEL):
            self._commit_remote_blob(key, parent, labels)
        extra = {}
        if layer == "bootstrap":
            digest = nydus.layer_digest(labels, key)
            nydus.check_fs_version(labels, digest)
            extra = {"nydus": "bootstrap", "image_ref": nydus.image_ref(labels),
                     "layer": digest}
            if labels.get(nydus.PLAIN_HTTP_LABEL) == "true" and nydus.from_rpull(key):
                # rpull --insecure only: from an image's annotations (CRI) the label
                # would send the registry's credentials over plain HTTP on its say-so
                extra["plain_http"] = "true"
            if labels.get(nydus.MOUNT_EARLY_LABEL) == "true":
                extra["mount_early"] = "true"
        snap = self.store.create(kind, key, parent, labels, self.layout.make, extra)
        log.info("snapshot %s: %s %r on %r", snap.id, kind.name.lower(), key, parent)
        try:
            return self._mounts(snap)
        except BaseException:
            # e.g. the daemon refused the lazy mount: containerd gets the error and must
            # not find the snapshot registered
            self.remove(key)
            raise

    def _commit_remote_blob(self, key: str, parent: str, labels: dict[str, str]) -> None:
        """A Nydus data-blob layer: register it committed (empty: its bytes are read
        lazily through the bootstrap's mount) and tell containerd it exists, so that
        containerd neither downloads nor applies it. containerd then finds it by Walk
        with the target-ref label and the parent."""
        target = labels[nydus.TARGET_LABEL]
        name = f"{BLOB_SNAPSHOT_PREFIX}{key}"
        snap = self.store.create(Kind.COMMITTED, name, parent, labels, self.layout.make)
        log.info("snapshot %s: nydus blob layer %s committed as %r, not downloaded",
                 snap.id, labels.get(nydus.LAYER_LABEL, target), name)
        raise SnapshotExistsError(f"target snapshot {target!r} exists (nydus blob layer)")

    def _lazy_lower(self, snap: Snapshot) -> tuple[str, int] | None:
        """(the lazy mount, its depth among `snap`'s parents) when a parent is a Nydus
        bootstrap layer: that mount stands for it and every parent below it (mounted
        through the daemon on first use). The whole chain is searched, not only the
        nearest parent: a layer committed on the image (a container's changes, a
        build's step) must see the image under it, as with any overlay chain."""
        if self.daemon is None:
            return None
        for depth, pid in enumerate(snap.parent_ids):
            if self.store.extra(pid).get("nydus") == "bootstrap":
                mp = self._lazy_mount(pid)
                return None if mp is None else (mp, depth)
        return None

    def _lazy_mount(self, boot_id: int) -> str | None:
        """The lazy mount of bootstrap snapshot `boot_id`, made now if not yet; None if
        the snapshot is gone (a mount ahead of time lost the race with its removal)."""
        assert self.daemon is not None
        with self._lazy_locks.hold(boot_id):
            # read under the lock: remove() deletes the row while holding it
            extra = self.store.extra(boot_id)
            if extra.get("nydus") != "bootstrap":
                return None
            mp = self.store.lazy_mount(boot_id)
            if mp is not None and os.path.ismount(mp):
                backend = self._served(boot_id, mp, extra)
                if backend is not None and self._reference_stands(boot_id, mp, extra,
                                                                  backend):
                    return mp
            mp = self.layout.lazy_mountpoint(boot_id)
            os.makedirs(mp, mode=0o755, exist_ok=True)
            ref = self._image_ref(boot_id, extra)
            # recorded before the mount: a crash in between leaves a row that the next
            # use re-mounts (the daemon answers "already mounted" if it got that far)
            self.store.set_lazy_mount(boot_id, mp)
            try:
                self.daemon.mount(
                    os.path.join(self.layout.fs(boot_id), nydus.BOOTSTRAP_PATH), mp,
                    nydus.backend_spec(ref), self._backend_options(extra, ref))
            except BaseException as e:
                if not os.path.ismount(mp):  # else keep the row: release unmounts it
                    self.store.set_lazy_mount(boot_id, None)
                    with contextlib.suppress(OSError):
                        os.rmdir(mp)
                if isinstance(e, DaemonError) and not isinstance(e, SnapshotError):
                    layer = extra.get("layer") or f"snapshot {boot_id}"
                    raise SnapshotUnavailableError(
                        f"nydus image {ref}, bootstrap layer {layer}: lazy mount failed: "
                        f"{e}") from None
                raise
            log.info("snapshot %s: %s mounted lazily on %s", boot_id, ref, mp)
            return mp

    def _served(self, boot_id: int, mp: str, extra: dict[str, str]) -> str | None:
        """Whether lazy mount `mp`, which the kernel has, is one the daemon serves: a
        mounted path alone is no proof after a daemon restart, and a container given a
        mount nobody serves gets EIO for every byte not fetched before. Unpicked (the
        restart could not take it back yet; the daemon retries): the Prepare fails with
        the daemon's reason. Unknown to the daemon: detached here -> None, and the
        image is mounted afresh (what still uses the old mount keeps it until it ends).
        Served: -> its backend. The caller holds the snapshot's lazy lock."""
        assert self.daemon is not None
        what = (f"nydus image {extra.get('image_ref')}, bootstrap layer "
                f"{extra.get('layer') or f'snapshot {boot_id}'}")
        try:
            state, why = self.daemon.serving(mp)
        except DaemonError as e:
            raise SnapshotUnavailableError(
                f"{what}: cannot ask the daemon whether it serves lazy mount {mp}: "
                f"{e}") from None
        if state == "served":
            return why
        if state == "unpicked":
            raise SnapshotUnavailableError(
                f"{what}: lazy mount {mp} is not served by the daemon since its restart "
                f"(it tries again until it can): {why}")
        log.warning("snapshot %s: the daemon does not serve lazy mount %s; detaching "
                    "it and mounting the image afresh", boot_id, mp)
        try:
            mounts.umount(mp, lazy=True)
        except OSError as e:
            raise SnapshotUnavailableError(
                f"{what}: lazy mount {mp}, which the daemon does not serve, cannot be "
                f"detached: {e}") from None
        return None

    def _reference_stands(self, boot_id: int, mp: str, extra: dict[str, str],
                          backend: str) -> bool:
        """Whether served lazy mount `mp` reads through the reference of an image the
        node still has; if another image (of the same layers) is left instead, the mount
        is released through the daemon -> False (mounted afresh through that one's). Its
        first puller's tag or repository may be gone from the registry: every byte not
        fetched before failed with EIO in the next container."""
        assert self.daemon is not None
        current = backend.removeprefix("registry:")
        if current == backend:
            return True                 # not a registry backend: nothing to choose
        ref = self._image_ref(boot_id, extra, current)
        if ref == current:
            return True
        log.warning("snapshot %s: lazy mount %s reads through %s, which no image on the "
                    "node names any more; mounting it afresh through %s", boot_id, mp,
                    current, ref)
        try:
            self.daemon.umount(mp)
        except DaemonError as e:
            log.warning("snapshot %s: %s; keeping it", boot_id, e)
        return os.path.ismount(mp)     # released: mounted afresh; else kept

    def _mount_ahead(self, boot_id: int) -> None:
        """The lazy mount made as soon as the bootstrap layer is committed (rpull asks for
        it with MOUNT_EARLY_LABEL), on a thread of its own: its blobs' opening and the
        prefetch stream run while the pull finishes and `ctr run` starts, instead of after
        the container's first Prepare, which then finds the mount made (or waits for it
        under the same lock). A failure is only logged: that Prepare mounts again and
        reports it."""
        try:
            mp = self._lazy_mount(boot_id)
        except Exception as e:  # noqa: BLE001 - the container's Prepare retries it
            log.warning("snapshot %s: lazy mount ahead of the container failed: %s",
                        boot_id, e)
        else:
            if mp is not None:
                log.info("snapshot %s: mounted ahead of its first container", boot_id)

    def _release_lazy(self, boot_id: int) -> None:
        """Unmount a bootstrap snapshot's lazy mount before the snapshot goes (the
        caller holds the snapshot's lazy lock). The mount lives as long as the image's
        bootstrap snapshot, not only while containers run: the next container of the
        image starts on a warm mount."""
        assert self.daemon is not None
        mp = self.store.lazy_mount(boot_id)
        if mp is None or self.store.has_children(boot_id):
            return  # Remove refuses a snapshot with children anyway
        try:
            self.daemon.umount(mp)
            if os.path.ismount(mp):
                # the daemon does not know it (404: a restart that could not pick it
                # up, its state lost) and the kernel still has it: nobody else would
                # ever release it once the row is gone, nor what its superblock holds
                log.warning("snapshot %s: the daemon did not know lazy mount %s; "
                            "detaching it", boot_id, mp)
                mounts.umount(mp, lazy=True)
        except (DaemonError, OSError) as e:
            # a precondition failure: containerd's GC logs it and tries again later
            raise SnapshotPreconditionError(
                f"snapshot {boot_id}: lazy mount {mp} not released: {e}") from None
        self.store.set_lazy_mount(boot_id, None)
        with contextlib.suppress(OSError):
            os.rmdir(mp)
        log.info("snapshot %s: lazy mount %s released", boot_id, mp)

    def _mounts(self, snap: Snapshot) -> list[Mount]:
        lazy = self._lazy_lower(snap)
        if lazy is None:
            self._refuse_bare_blobs(snap)
            return overlay.mounts(self.layout, snap)
        return overlay.mounts(self.layout, snap, *lazy)

    def _refuse_bare_blobs(self, snap: Snapshot) -> None:
        """A snapshot on Nydus data-blob layers with no bootstrap layer above them has
        nothing under it: those layers are committed empty (their bytes come through the
        bootstrap's lazy mount). It is an image whose chain IDs are a Nydus image's,
        e.g. the source of a zran index converted with the source's diff_ids (before
        docs/zran.md's diff_ids): its layers were never unpacked, and an overlay of empty
        directories would run its containers on an empty rootfs. Refused, naming why."""
        if self.store.extra(snap.id).get("nydus") == "bootstrap":
            return          # the bootstrap layer itself, being applied
        for pid in snap.parent_ids:
            if self.store.extra(pid).get("nydus") == "bootstrap":
                return
            name = self.store.name_of(pid)
            if name.startswith(BLOB_SNAPSHOT_PREFIX):
                raise SnapshotInvalidError(
                    f"snapshot {self.store.name_of(snap.id)!r}: its parent {name!r} is a "
                    "Nydus data-blob layer, committed empty for a Nydus image, with no "
                    "bootstrap layer above it: this image shares that image's chain IDs "
                    "(diff_ids) and its layers were never unpacked; remove the Nydus image "
                    "(or convert it again) and pull this one again")

    def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._create(Kind.ACTIVE, key, parent, labels)

    def view(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, labels)

    def mounts(self, key: str) -> list[Mount]:
        return self._mounts(self.store.get(key))

    def commit(self, name: str, key: str, labels: dict[str, str]) -> None:
        snap = self.store.get(key)
        extra = self.store.extra(snap.id)
        if extra.get("nydus") == "bootstrap" and snap.kind == Kind.ACTIVE:
            # a corrupted bootstrap fails the pull here, naming its layer
            nydus.check_bootstrap(self.layout.fs(snap.id), extra.get("layer", key))
        # measured before the commit, as containerd does: the layer is complete (the
        # differ applied it) and nothing writes a committed snapshot afterwards
        size, inodes = overlay.disk_usage(self.layout.fs(snap.id))
        self.store.commit(key, name, labels, size, inodes)
        log.info("snapshot %s: committed %r as %r (%d bytes)", snap.id, key, name, size)
        if extra.get("nydus") == "bootstrap" and snap.kind == Kind.ACTIVE:
            if extra.get("mount_early"):
                # the mount itself starts now (its start warms what _warm would)
                threading.Thread(target=self._mount_ahead, args=(snap.id,), daemon=True,
                                 name=f"mount-ahead-{snap.id}").start()
            else:
                self._warm(snap.id, extra)

    def _image_ref(self, boot_id: int, extra: dict[str, str],
                   current: str | None = None) -> str:
        """The registry reference the image's lazy mount reads through: `current` (the
        mount's) or else the one recorded at the pull, while an image of that name still
        stands on the bootstrap's chain, else another image's that does (images of the
        same layers share the chain: the first puller's may be gone from the node, and
        its tag or repository from the registry, while the node still runs the other):
        the one containerd's image store changed last (imagerefs.py says why)."""
        recorded = current or extra["image_ref"]
        if self.containerd is None:
            return recorded
        # the committed bootstrap's name, as containerd's metadata layer gives it:
        # "<namespace>/<n>/<chain id>"
        parts = self.store.name_of(boot_id).split("/", 2)
        if len(parts) != 3:
            return recorded
        t0 = time.monotonic()
        refs = imagerefs.refs_on_chain(self.containerd, parts[0], parts[2])
        log.debug("snapshot %s: images on its chain %s (asked in %.1f ms)", boot_id, refs,
                  (time.monotonic() - t0) * 1000)
        if not refs or recorded in refs:
            return recorded
        log.info("snapshot %s: no image %s on the node any more; the image's lazy mount "
                 "reads through %s (of the same layers, the latest of %d)", boot_id,
                 recorded, refs[0], len(refs))
        return refs[0]

    def _backend_options(self, extra: dict[str, str],
                         ref: str | None = None) -> dict[str, object]:
        return nydus.backend_options(ref or extra["image_ref"], self.insecure,
                                     extra.get("plain_http") == "true")

    def _warm(self, boot_id: int, extra: dict) -> None:
        """The daemon fetches what the image's lazy mount will need first (a zran
        image's meta blobs) while containerd goes on to the container's snapshot; a
        failure only costs that head start (the mount fetches and reports itself)."""
        assert self.daemon is not None
        ref = extra["image_ref"]
        try:
            self.daemon.warm(os.path.join(self.layout.fs(boot_id), nydus.BOOTSTRAP_PATH),
                             nydus.backend_spec(ref), self._backend_options(extra))
        except DaemonError as e:
            log.warning("snapshot %s: %s not warmed: %s", boot_id, ref, e)

    def remove(self, key: str) -> None:
        sid = self.store.get(key).id
        # one lock over the release and the row's deletion: a mount ahead of time
        # (_mount_ahead) either ran before (and is released here) or finds no row
        with self._lazy_locks.hold(sid):
            if self.daemon is not None:
                self._release_lazy(sid)
            sid, _ = self.store.remove(key)
        log.info("snapshot %s: removed %r", sid, key)
        try:
            self.layout.remove(sid)
        except OSError as e:
            # the row is gone; Cleanup retries the directory
            log.warning("snapshot %s: directory not removed (%s); Cleanup will", sid, e)

    def stat(self, key: str) -> Info:
        return self.store.stat(key)

    def update(self, info_name: str, labels: dict[str, str], paths: list[str]) -> Info:
        return self.store.update_labels(info_name, labels, paths)

    def usage(self, key: str) -> tuple[int, int]:
        """(bytes, inodes): measured now for an active snapshot, recorded otherwise."""
        kind, sid, size, inodes = self.store.usage(key)
        if kind == Kind.ACTIVE:
            return overlay.disk_usage(self.layout.fs(sid))
        return size, inodes

    def walk(self, filters: list[str]) -> list[Info]:
        compiled = compile_filters(filters)
        return [i for i in self.store.walk() if matches(i, compiled)]

    def cleanup(self) -> list[str]:
        """Remove every directory under snapshots/ that no registered snapshot owns;
        -> the paths removed."""
        with self.store.locked():
            doomed = self.layout.orphans(self.store.ids())
            for path in doomed:
                log.info("cleanup: removing orphaned %s", path)
                shutil.rmtree(path, ignore_errors=True)
        return doomed
