"""`erofs-tools mkfs --tar=f|i --gzinfo[=FILE]`: gzip input (as `--ungzip`), and with
`=FILE` an AWS SOCI-compatible zinfo (version 2) of the gzip stream, as mkfs.erofs 1.9
writes it: a 12-byte header (le32 number of checkpoints, le64 span = 4 MiB), then per
checkpoint le64 compressed offset, le64 uncompressed offset, u8 bits and a 32 KiB window
(17 + 32768 bytes each).

The compressed bytes are tapped on their way to the decoder and inflated once more by
the C core (csrc/zinfo.c, which holds the rules for where checkpoints are and what their
windows hold), so the tar is decoded, and the image built, exactly as with `--ungzip`.
mkfs.erofs stops reading the stream at the tar's end (the second zero block): the
checkpoints of the 32 KiB reads it would not have made are left out, so the file is the
same byte for byte. With its checkpoints the layer's ranges inflate through
`_native_zran.zran_extract` (tests/test_mkfs_gzinfo.py).
"""
from __future__ import annotations

import os
import struct
from contextlib import AbstractContextManager
from typing import BinaryIO

from erofs_tools._native_zran import ZinfoBuilder
from erofs_tools.builder.tar_reader import ReadStream
from erofs_tools.errors import InputError
from erofs_tools.fsutil import atomic_output

__all__ = ["GZINFO_SPAN", "GzinfoTap", "check_zinfo_path", "zinfo_output"]

GZINFO_SPAN = 4 << 20           # mkfs.erofs 1.9's span between checkpoints
_BLOCK = 512


def check_zinfo_path(path: str) -> None:
    """Refused before any work: a directory, or a missing parent directory."""
    if os.path.isdir(path):
        raise InputError(f"--gzinfo={path}: is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InputError(f"--gzinfo={path}: directory {parent} does not exist")


class GzinfoTap:
    """A compressed stream whose bytes are also fed to the zinfo builder."""

    def __init__(self, span: int = GZINFO_SPAN) -> None:
        self.span = span
        self.builder = ZinfoBuilder(span)
        self.inner: ReadStream | None = None

    def wrap(self, inner: ReadStream) -> GzinfoTap:
        self.inner = inner
        return self

    def read(self, n: int) -> bytes:
        assert self.inner is not None
        data = self.inner.read(n)
        if data:
            self.builder.feed(data)
        return data

    def write_to(self, f: BinaryIO, tar_end: int) -> None:
        """The zinfo into f; tar_end: the uncompressed offset after the tar's first zero
        block (mkfs.erofs reads one more block, then makes no further 32 KiB read)."""
        tin, _, ended = self.builder.totals()
        if not ended:
            raise InputError(f"gzip stream truncated at compressed offset {tin}")
        need = tar_end + _BLOCK
        recs = [rec for start, rec in self.builder.records if start < need]
        f.write(struct.pack("<IQ", len(recs), self.span))
        for rec in recs:
            f.write(rec)


def zinfo_output(path: str, umask: int) -> AbstractContextManager[BinaryIO]:
    """The zinfo file, written atomically (renamed when the context ends without error;
    a device or FIFO is written in place, as mkfs.erofs opens FILE)."""
    return atomic_output(path, mode=0o644 & ~umask, stream=True)
