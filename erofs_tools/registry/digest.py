"""Content digests (``sha256:<64 hex>``): validation, computation and verification.

Only sha256 is accepted: it is what every registry and every Nydus blob id uses, and
refusing other algorithms keeps a hostile manifest from steering us to weak hashes.
"""

from __future__ import annotations

import hashlib
import re
from typing import BinaryIO

from ..errors import DigestMismatchError, InputError

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
READ_SIZE = 1 << 20


def check_digest(digest: str) -> str:
    """Return ``digest`` if it is a well-formed sha256 digest, else raise InputError."""
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise InputError(f"invalid digest {str(digest)[:80]!r}: expected sha256:<64 hex>")
    return digest


def digest_hex(digest: str) -> str:
    """The hex part of a digest (what a Nydus blob id is)."""
    return check_digest(digest)[len("sha256:"):]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(f: BinaryIO) -> tuple[str, int]:
    """Digest and size of the rest of an open binary file (its position moves to EOF)."""
    h = hashlib.sha256()
    size = 0
    while chunk := f.read(READ_SIZE):
        h.update(chunk)
        size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def verify(expected: str, actual: str, what: str) -> None:
    """Raise DigestMismatchError naming ``what`` unless the digests are equal."""
    if expected != actual:
        raise DigestMismatchError(f"{what}: digest mismatch, expected {expected}, got {actual}")
