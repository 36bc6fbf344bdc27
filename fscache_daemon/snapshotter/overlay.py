"""Snapshot directories on disk and the mounts that containerd performs over them,
following containerd's overlayfs snapshotter.

    ROOT/snapshots/<id>/fs     the snapshot's upper directory (what a layer holds)
    ROOT/snapshots/<id>/work   overlayfs' work directory (active snapshots only)

Mounts (what containerd gets from Prepare, View and Mounts):
  * no parent: a bind mount of the snapshot's own fs (rw when active, ro for a view);
  * a view of one parent: a read-only bind mount of the parent's fs;
  * active with parents: overlay with lowerdir = the parents' fs (nearest first),
    upperdir = its fs, workdir = its work;
  * a view of several parents: overlay with only the lowerdir chain (read-only).
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass

from erofs_tools.fsutil import fsync_dir
from fscache_daemon.snapshotter.store import Kind, Snapshot

TMP_PREFIX = "new-"
RM_PREFIX = "rm-"
# overlayfs' inodes index makes a reused upper directory fail to mount (EBUSY); containerd
# turns it off wherever the module has the knob.
_INDEX_KNOB = "/sys/module/overlay/parameters/index"


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...]


class Layout:
    """The directory tree of one snapshotter root."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.snapshots = os.path.join(self.root, "snapshots")
        os.makedirs(self.snapshots, mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o700)

    def dir(self, sid: int) -> str:
        return os.path.join(self.snapshots, str(sid))

    def fs(self, sid: int) -> str:
        return os.path.join(self.snapshots, str(sid), "fs")

    def work(self, sid: int) -> str:
        return os.path.join(self.snapshots, str(sid), "work")

    def make(self, snap: Snapshot) -> None:
        """Build `snap`'s directory under a temporary name and rename it into place, so
        a crash never leaves a half-made directory under a snapshot id."""
        final = self.dir(snap.id)
        tmp = os.path.join(self.snapshots, f"{TMP_PREFIX}{snap.id}")
        for stale in (tmp, final):
            # ids are never reused once committed, so a directory here is a leftover of
            # a crash between making it and committing its row
            if os.path.lexists(stale):
                shutil.rmtree(stale)
        os.mkdir(tmp, 0o700)
        try:
            os.mkdir(os.path.join(tmp, "fs"), 0o755)
            if snap.kind == Kind.ACTIVE:
                os.mkdir(os.path.join(tmp, "work"), 0o711)
            if snap.parent_ids:
                # the new upper layer's root is owned like the parent's (containerd does
                # the same), so a non-root image's top directory keeps its owner
                st = os.stat(self.fs(snap.parent_ids[0]))
                os.lchown(os.path.join(tmp, "fs"), st.st_uid, st.st_gid)
            fsync_dir(tmp)
            os.rename(tmp, final)
            fsync_dir(self.snapshots)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def remove(self, sid: int) -> None:
        """Delete a snapshot's directory (its row is gone already): rename first, so
        a crash mid-delete leaves an `rm-` name that Cleanup finishes."""
        final = self.dir(sid)
        if not os.path.lexists(final):
            return
        doomed = os.path.join(self.snapshots, f"{RM_PREFIX}{sid}")
        os.rename(final, doomed)
        shutil.rmtree(doomed)

    def lazy_mountpoint(self, sid: int) -> str:
        return os.path.join(self.root, "lazy", str(sid))

    def orphans(self, ids: set[int]) -> list[str]:
        """Entries of snapshots/ that belong to no registered snapshot."""
        keep = {str(i) for i in ids}
        return sorted(os.path.join(self.snapshots, n) for n in os.listdir(self.snapshots)
                      if n not in keep)


def mounts(layout: Layout, snap: Snapshot, lazy_lower: str | None = None,
           lazy_depth: int = 0) -> list[Mount]:
    """The mounts that make `snap`'s tree, as containerd's overlayfs snapshotter gives.
    `lazy_lower`: a lazily loaded image's mount point (a Nydus image; see nydus.py) that
    stands for `snap.parent_ids[lazy_depth]` and every parent below it; the parents
    above it (layers committed on the image) stay lowers on top of it."""
    if lazy_lower is not None:
        lowers = [layout.fs(p) for p in snap.parent_ids[:lazy_depth]] + [lazy_lower]
    else:
        lowers = [layout.fs(p) for p in snap.parent_ids]
    if not lowers:
        rw = "rw" if snap.kind == Kind.ACTIVE else "ro"
        return [Mount("bind", layout.fs(snap.id), (rw, "rbind"))]
    if snap.kind != Kind.ACTIVE and len(lowers) == 1:
        return [Mount("bind", lowers[0], ("ro", "rbind"))]
    options: list[str] = []
    if os.path.exists(_INDEX_KNOB):
        options.append("index=off")
    if snap.kind == Kind.ACTIVE:
        options += [f"workdir={layout.work(snap.id)}", f"upperdir={layout.fs(snap.id)}"]
    options.append("lowerdir=" + ":".join(lowers))
    return [Mount("overlay", "overlay", tuple(options))]


def disk_usage(path: str) -> tuple[int, int]:
    """(bytes allocated, inodes) of the tree at `path`, each hard-linked inode counted
    once, as containerd's usage of a snapshot directory is measured."""
    seen: set[tuple[int, int]] = set()
    size = 0
    stack = [path]
    while stack:
        p = stack.pop()
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue  # an active snapshot's tree may change while it is measured
        ino = (st.st_dev, st.st_ino)
        if ino in seen:
            continue
        seen.add(ino)
        size += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            try:
                stack.extend(os.path.join(p, n) for n in os.listdir(p))
            except FileNotFoundError:
                continue
    return size, len(seen)
