"""OCI and overlayfs whiteout conventions shared by the tar source and merge.

OCI layers (image-spec layer.md) mark deletions with entries named `.wh.NAME` (remove
NAME of the layers below) and `.wh..wh..opq` (the directory hides everything below it);
other `.wh..wh.*` names are reserved (aufs metadata such as `.wh..wh.plnk`). overlayfs
uses a character device 0:0 named NAME for a whiteout and the xattr
`trusted.overlay.opaque=y` on an opaque directory (erofs-format.md §8).
"""
import stat
from collections.abc import Iterable

WH_PREFIX = b".wh."
WH_OPAQUE = b".wh..wh..opq"
WH_META = b".wh..wh."
OPAQUE_XATTR = b"trusted.overlay.opaque"
# a directory holding whiteouts, as mkfs.erofs 1.9 marks it: overlayfs never iterates
# it directly (kernel commit b79e05aaa166), which would list them
ORIGIN_XATTR = b"trusted.overlay.origin"
OPAQUE_VALUE = b"y"
# Set by `pack --type tar --mark-implied-dirs` (and convert) on a directory that has no
# entry of its own in the layer; `merge` reads it (the directory keeps the metadata of
# the layers below, as tar -x and containerd's applier give) and never carries it over.
IMPLIED_XATTR = b"trusted.erofs-tools.implied"
IMPLIED_VALUE = b"y"


def classify(name: bytes) -> tuple[str | None, bytes | None]:
    """-> ("opaque", None) | ("whiteout", NAME) | ("meta", None) | (None, None)."""
    if not name.startswith(WH_PREFIX):
        return None, None
    if name == WH_OPAQUE:
        return "opaque", None
    if name.startswith(WH_META) or len(name) == len(WH_PREFIX):
        return "meta", None
    return "whiteout", name[len(WH_PREFIX):]


def is_overlay_whiteout(mode: int, rdev: Iterable[int]) -> bool:
    """A character device 0:0 (overlayfs whiteout)."""
    return stat.S_ISCHR(mode) and tuple(rdev) == (0, 0)


def is_implied(xattrs: Iterable[tuple[bytes, bytes]]) -> bool:
    """xattrs: iterable of (name, value) pairs."""
    return any(n == IMPLIED_XATTR for n, _ in xattrs)


def is_opaque(xattrs: Iterable[tuple[bytes, bytes]]) -> bool:
    """xattrs: iterable of (name, value) pairs."""
    return any(n == OPAQUE_XATTR and v == OPAQUE_VALUE for n, v in xattrs)
