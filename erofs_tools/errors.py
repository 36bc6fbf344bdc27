"""The one exception hierarchy of erofs-tools.

Every error a user can cause (bad arguments, bad input trees, corrupt or hostile images,
registry failures) is an ErofsToolsError whose str() is a one-line message fit to print
after "error: ". The CLI turns these into exit status 1; anything else is a bug.
"""


class ErofsToolsError(Exception):
    """Base class; the message is one line a user understands."""


class InputError(ErofsToolsError):
    """The user's input (source tree, tar stream, option) cannot be turned into an image."""


class FormatLimitError(InputError):
    """The input holds something the on-disk format cannot represent."""


class CorruptImageError(ErofsToolsError):
    """An image, bootstrap or blob is truncated, inconsistent or hostile."""


class DigestMismatchError(CorruptImageError):
    """Data does not match the digest recorded for it."""


class RegistryError(ErofsToolsError):
    """A registry request failed (after retries) or returned something invalid."""

    # set by RegistrySession.fail on an HTTP answer (for upload restarts); absent else
    status: int
    codes: list[str]


class AuthError(RegistryError):
    """The registry refused our credentials or no usable credentials were found."""


class MountError(ErofsToolsError):
    """mount(2)/umount(2) or the cache setup around them failed."""
