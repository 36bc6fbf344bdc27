"""containerd snapshotter of fscache-daemon: the snapshots service as a proxy plugin.

    python -m fscache_daemon.snapshotter --socket PATH --root DIR

`serve(socket_path, root)` starts the same service inside another process (the daemon's
`run --snapshotter-socket PATH`). This slice serves plain OCI layers the way containerd's
overlayfs snapshotter does; see docs/snapshotter.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fscache_daemon.snapshotter.service import SnapshotService, serve

__all__ = ["SnapshotService", "serve"]


def __getattr__(name: str) -> Any:
    # the service (gRPC server, SQLite store, the bootstrap reader) is imported when
    # asked for, not with the package: `fscache-daemon rpull` only needs the proto stubs
    # and nydus's labels, and its process start is on a container's cold-start path
    if name in __all__:
        from fscache_daemon.snapshotter import service
        return getattr(service, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
