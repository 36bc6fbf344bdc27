"""Options of `erofs-tools mkfs` (what mkfs.erofs offers, plus JSON/progress handling)."""
import os
import re
import uuid as _uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from erofs_tools.errors import InputError


@dataclass
class MkfsOptions:
    timestamp: int | None = None      # -T: every inode gets this mtime (nsec 0)
    uuid: bytes | None = None         # -U: 16 bytes; None = random (like mkfs.erofs)
    label: bytes = b""                # -L: <= 15 bytes
    all_root: bool = False            # uid = gid = 0 everywhere
    force_uid: int | None = None
    force_gid: int | None = None
    exclude_paths: list[bytes] = field(default_factory=list)   # relative paths (bytes), exact
    exclude_regex: list[re.Pattern[bytes]] = field(default_factory=list)   # compiled bytes regexes, re.search
    shared_xattrs: bool = True        # xattrs carried by >= 2 inodes go to the shared area

    def effective_timestamp(self, environ: Mapping[str, str] = os.environ) -> int | None:
        """-T wins; else SOURCE_DATE_EPOCH (same meaning as -T, as mkfs.erofs)."""
        if self.timestamp is not None:
            return self.timestamp
        sde = environ.get("SOURCE_DATE_EPOCH")
        if sde:
            return parse_timestamp(sde, "SOURCE_DATE_EPOCH")
        return None


def parse_timestamp(text: object, what: str = "-T") -> int:
    try:
        v = int(str(text).strip(), 10)
    except ValueError:
        raise InputError(f"{what}: not an integer UNIX timestamp: {text!r}") from None
    if not 0 <= v < 1 << 63:
        raise InputError(f"{what}: timestamp out of range: {text!r}")
    return v


def parse_uuid(text: str) -> bytes | None:
    """UUID string, 'random' or 'clear' (all zero) -> 16 bytes or None (random)."""
    t = text.strip().lower()
    if t == "random":
        return None
    if t == "clear":
        return bytes(16)
    try:
        return _uuid.UUID(t).bytes
    except ValueError:
        raise InputError(f"-U: invalid UUID {text!r}") from None


def parse_label(text: str) -> bytes:
    b = os.fsencode(text)
    if len(b) > 15:
        raise InputError(f"-L: volume label {text!r} is longer than 15 bytes")
    if b"\0" in b:
        raise InputError("-L: volume label contains NUL")
    return b


def parse_exclude_path(text: str) -> bytes:
    b = os.fsencode(text).strip(b"/")
    while b.startswith(b"./"):
        b = b[2:]
    return b


def parse_exclude_regex(text: str) -> re.Pattern[bytes]:
    try:
        return re.compile(os.fsencode(text))
    except re.error as e:
        raise InputError(f"--exclude-regex: invalid regular expression {text!r}: {e}") from None


class Progress(Protocol):
    """What mkfs and pack report progress to (cli.progress.Progress)."""

    def scan(self, entries: int, nbytes: int, copied: int | None = None) -> object: ...

    def write(self, done: int, total: int) -> object: ...

    def done(self) -> object: ...
