"""The Nydus blob id of a data blob: sha256 of its bytes but the raw blob.digest
payload (apart from blob.py only to keep each module small)."""
from __future__ import annotations

from collections.abc import Callable

from erofs_tools.errors import CorruptImageError, shown_path

ReadAt = Callable[[int, int], bytes]


def shown_id(raw: bytes | str) -> str:
    """A blob id or device tag for a message or a listing: up to its first NUL, non-ASCII
    as U+FFFD, control characters as \\xNN (a hostile blob table's id may hold a
    newline: a fake line of `check`, or a second line of an error)."""
    if isinstance(raw, (bytes, bytearray)):
        raw = bytes(raw).split(b"\0", 1)[0].decode("ascii", "replace")
    return shown_path(raw, 1 << 62)


def compute_blob_id(read_at: ReadAt, blob_size: int, exclude=None, piece=1 << 20) -> str:
    """Nydus blob id: sha256 of the blob bytes except the raw blob.digest payload
    (`exclude` = (offset, size), e.g. BlobMeta.digest_region)."""
    import hashlib  # when first needed (pack imports the reader, see blob._sha256)
    h = hashlib.sha256()
    ranges = [(0, blob_size)]
    if exclude:
        eo, es = exclude
        ranges = [(0, eo), (eo + es, blob_size)]
    for start, end in ranges:
        pos = start
        while pos < end:
            n = min(piece, end - pos)
            data = read_at(pos, n)
            if len(data) != n:
                raise CorruptImageError(f"blob: short read at {pos}")
            h.update(data)
            pos += n
    return h.hexdigest()
