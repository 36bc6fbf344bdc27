"""Exceptions of fscache-daemon, rooted in erofs_tools' one hierarchy.

Every daemon failure a user or operator can cause is a DaemonError, so the CLI's
`error: <msg>` mapping covers the daemon too. Messages are one line.
"""

from erofs_tools.errors import ErofsToolsError


class DaemonError(ErofsToolsError):
    """Base class of daemon errors."""


class FrontendError(DaemonError):
    """A kernel front end (fanotify, cachefiles) failed: syscall, protocol or setup."""


class FanotifyUnsupportedError(FrontendError):
    """The kernel or the filesystem cannot deliver fanotify pre-content events."""


class HolderError(FrontendError):
    """The fanotify fd holder is unreachable, refused us, or broke its protocol."""


class SnapshotError(DaemonError):
    """A snapshots-service request failed; the subclass says how (gRPC status code)."""


class SnapshotNotFoundError(SnapshotError):
    """The snapshot (or the parent) named in a request does not exist."""


class SnapshotExistsError(SnapshotError):
    """A snapshot with that key or name exists already."""


class SnapshotInvalidError(SnapshotError):
    """A request names a parent of the wrong kind, a bad filter, a bad label or field."""


class SnapshotPreconditionError(SnapshotError):
    """The snapshot is in the wrong state for the request (not active, has children)."""
