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
