"""`erofs-tools mkfs --tar=f|i --gzinfo[=FILE]`: gzip input (as `--ungzip`), and with
`=FILE` an AWS SOCI-compatible zinfo (version 2) of the gzip stream, as mkfs.erofs 1.9
writes it: a 12-byte header (le32 number of checkpoints, le64 span = 4 MiB), then per
checkpoint le64 compressed offset, le64 uncompressed offset, u8 bits and a 32 KiB window
(17 + 32768 bytes each).

The compressed bytes are tapped on their way to the decoder and inflated once more by
the C core (csrc/zinfo.c, which holds the rules for where checkpoints are and what their
windows hold), so the tar is decoded, and the image built, exactly as with `--ungzip`.
Each checkpoint goes straight into FILE's temporary file (a stream of many small gzip
members has one per member: never held in memory). mkfs.erofs stops reading the stream
at the tar's end (the second zero block): the checkpoints of the 32 KiB reads it would
not have made, the last ones, are cut off at the end, so the file is the same byte for
byte. With its checkpoints the layer's ranges inflate through
`_native_zran.zran_extract` (tests/test_mkfs_gzinfo.py).
"""
from __future__ import annotations

import struct
from contextlib import AbstractContextManager
from typing import BinaryIO

from erofs_tools._native_zran import ZINFO_RECORD, ZinfoBuilder
from erofs_tools.builder.tar_reader import ReadStream
from erofs_tools.errors import InputError
from erofs_tools.fsutil import atomic_output, check_new_output

__all__ = ["GZINFO_SPAN", "GzinfoTap", "check_zinfo_path", "zinfo_output"]

GZINFO_SPAN = 4 << 20           # mkfs.erofs 1.9's span between checkpoints
_HEADER = struct.Struct("<IQ")
_BLOCK = 512


def check_zinfo_path(path: str) -> None:
    """Refused before any work: a directory, a device or FIFO, a missing parent."""
    check_new_output(path, f"--gzinfo={path}")


def zinfo_output(path: str, umask: int) -> AbstractContextManager[BinaryIO]:
    """FILE, written atomically: renamed when the context ends without an error."""
    return atomic_output(path, mode=0o644 & ~umask)


class GzinfoTap:
    """A compressed stream whose bytes also go to the zinfo builder, whose records go
    into `out` (after 12 bytes left for the header) as they come."""

    def __init__(self, out: BinaryIO, span: int = GZINFO_SPAN) -> None:
        self.out = out
        self.span = span
        self.builder = ZinfoBuilder(span)
        self.inner: ReadStream | None = None
        self.starts: list[int] = []     # each record's read start (ascending)
        self._write(bytes(_HEADER.size))

    def wrap(self, inner: ReadStream) -> GzinfoTap:
        self.inner = inner
        return self

    def _write(self, data: bytes) -> None:
        try:
            self.out.write(data)
        except OSError as e:
            raise InputError(f"writing the zinfo: {e.strerror or e}") from None

    def read(self, n: int) -> bytes:
        assert self.inner is not None
        data = self.inner.read(n)
        if data:
            for start, rec in self.builder.feed(data):
                self.starts.append(start)
                self._write(rec)
        return data

    def finish(self, tar_end: int) -> None:
        """The header, and the file cut after the last checkpoint mkfs.erofs records;
        tar_end: the uncompressed offset after the tar's first zero block (mkfs.erofs
        reads one block more, then makes no further 32 KiB read)."""
        tin, _, ended = self.builder.totals()
        if not ended:
            raise InputError(f"gzip stream truncated at compressed offset {tin}")
        need = tar_end + _BLOCK
        n = sum(1 for s in self.starts if s < need)
        try:
            self.out.flush()
            self.out.truncate(_HEADER.size + n * ZINFO_RECORD)
            self.out.seek(0)
            self.out.write(_HEADER.pack(n, self.span))
        except OSError as e:
            raise InputError(f"writing the zinfo: {e.strerror or e}") from None
