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
