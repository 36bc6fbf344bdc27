"""Exceptions of fscache-daemon, rooted in erofs_tools' one hierarchy.

Every daemon failure a user or operator can cause is a DaemonError, so the CLI's
`error: <msg>` mapping covers the daemon too. Messages are one line.
"""

from erofs_tools import errors as erofs_tools_errors
from erofs_tools.errors import ErofsToolsError


class DaemonError(ErofsToolsError):
    """Base class of daemon errors."""


class FrontendError(DaemonError):
    """A kernel front end (fanotify, cachefiles) failed: syscall, protocol or setup."""


class FanotifyUnsupportedError(FrontendError):
    """The kernel or the filesystem cannot deliver fanotify pre-content events."""


class HolderError(FrontendError):
    """The fanotify fd holder is unreachable, refused us, or broke its protocol."""


class NotFoundError(DaemonError):
    """No such mount, blob or bootstrap (API: 404)."""


class ConflictError(DaemonError):
    """The request conflicts with the daemon's state: already mounted, busy, covered by
    another mount, cache directory in use (API: 409)."""


class MountError(DaemonError, erofs_tools_errors.MountError):
    """mount(2)/umount(2) or the image setup around them failed (API: 500). Also an
    erofs_tools MountError, so callers of either layer catch it."""


class MountBusyError(MountError, ConflictError):
    """umount(2) refused (EBUSY) or the mount is still in use: a conflict (API: 409),
    checked before MountError's 500."""


class CachefilesUnsupportedError(FrontendError):
    """This kernel cannot run the cachefiles on-demand front end."""


class CachefilesProtocolError(FrontendError):
    """A message from /dev/cachefiles that does not follow the layout (a bug or a new
    kernel)."""


class ApiError(DaemonError):
    """A malformed API request, answered with `status` (4xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


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


class SnapshotUnavailableError(SnapshotError):
    """A Nydus image could not be mounted lazily now: the daemon, or the registry
    behind it, refused or failed (gRPC Unavailable; containerd's caller may retry)."""


class ContainerdError(DaemonError):
    """containerd (its gRPC API, as a client: `fscache-daemon rpull`) refused a call or
    could not be reached; the message names the call and containerd's answer."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code  # the gRPC status code's name ("NOT_FOUND", ...), if any


# sockaddr_un.sun_path holds 108 bytes with the terminating NUL
UNIX_PATH_MAX = 107


def check_unix_socket_path(path: str, what: str = "socket") -> str:
    """`path` if a unix socket can be bound or reached there, else a DaemonError that
    names it (bind(2) would only say "AF_UNIX path too long", deep in a traceback)."""
    n = len(path.encode())
    if n > UNIX_PATH_MAX:
        raise DaemonError(f"{path}: {what} path is {n} bytes, unix sockets allow at most "
                          f"{UNIX_PATH_MAX}; choose a shorter directory")
    return path
