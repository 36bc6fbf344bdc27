"""The snapshotter's operations, independent of gRPC: containerd's overlayfs snapshotter
semantics over the SQLite metadata store and the snapshot directories.

  prepare(key, parent)  a new active (writable) snapshot on a committed parent
  view(key, parent)     a new read-only view of a committed parent
  commit(name, key)     the active snapshot becomes committed `name` (usage recorded)
  remove(key)           a snapshot without children goes, with its directory
  cleanup()             directories that no snapshot owns go (crash leftovers)
"""

from __future__ import annotations

import logging
import os
import shutil

from fscache_daemon.snapshotter import overlay
from fscache_daemon.snapshotter.filters import compile_filters, matches
from fscache_daemon.snapshotter.overlay import Layout, Mount
from fscache_daemon.snapshotter.store import Info, Kind, MetaStore

log = logging.getLogger(__name__)

DB_NAME = "metadata.db"


class Snapshotter:
    """Snapshots under one root directory (`root/metadata.db`, `root/snapshots/`)."""

    def __init__(self, root: str) -> None:
        self.layout = Layout(root)
        self.store = MetaStore(os.path.join(self.layout.root, DB_NAME))

    def close(self) -> None:
        self.store.close()

    def _create(self, kind: Kind, key: str, parent: str,
                labels: dict[str, str]) -> list[Mount]:
        snap = self.store.create(kind, key, parent, labels, self.layout.make)
        log.info("snapshot %s: %s %r on %r", snap.id, kind.name.lower(), key, parent)
        return overlay.mounts(self.layout, snap)

    def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._create(Kind.ACTIVE, key, parent, labels)

    def view(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, labels)

    def mounts(self, key: str) -> list[Mount]:
        return overlay.mounts(self.layout, self.store.get(key))

    def commit(self, name: str, key: str, labels: dict[str, str]) -> None:
        snap = self.store.get(key)
        # measured before the commit, as containerd does: the layer is complete (the
        # differ applied it) and nothing writes a committed snapshot afterwards
        size, inodes = overlay.disk_usage(self.layout.fs(snap.id))
        self.store.commit(key, name, labels, size, inodes)
        log.info("snapshot %s: committed %r as %r (%d bytes)", snap.id, key, name, size)

    def remove(self, key: str) -> None:
        sid = self.store.remove(key)
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
