"""containerd snapshotter of fscache-daemon: the snapshots service as a proxy plugin.

    python -m fscache_daemon.snapshotter --socket PATH --root DIR

`serve(socket_path, root)` starts the same service inside another process (the daemon's
`run --snapshotter-socket PATH`). This slice serves plain OCI layers the way containerd's
overlayfs snapshotter does; see docs/snapshotter.md.
"""

from fscache_daemon.snapshotter.service import SnapshotService, serve

__all__ = ["SnapshotService", "serve"]
