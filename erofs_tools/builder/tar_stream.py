"""Tar layer input streams: plain, gzip (multi-member), zstd or (mkfs --unxz) xz/lzma, by
magic or by name;
decompression runs on its own thread a few MiB ahead of the parser (zlib and zstd
release the GIL). Every read is bounded by the caller (`tar_reader._Reader`)."""
from __future__ import annotations

import os
import queue
import sys
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO

from erofs_tools.builder.tar_reader import ReadStream
from erofs_tools.errors import ErofsToolsError, InputError

if TYPE_CHECKING:
    import threading

SOURCE_TYPES = ("tar", "targz", "tarzst", "auto")


class _Gunzip:
    """read(n) -> up to n decompressed bytes of a (multi-member) gzip stream."""

    def __init__(self, f: ReadStream) -> None:
        self.f = f
        self.d = zlib.decompressobj(31)
        self.tail = b""
        self.fed = False
        self.done = False

    def read(self, n: int) -> bytes:
        n = max(n, 1)
        while not self.done:
            inp = self.tail
            if not inp:
                inp = self.f.read(256 << 10)
                if not inp:
                    if self.fed:
                        raise InputError("truncated gzip stream")
                    self.done = True
                    break
            if not self.fed:
                if self.d_is_padding(inp):
                    self.tail = b""
                    continue
                self.fed = True
            try:
                out = self.d.decompress(inp, n)
            except zlib.error as e:
                raise InputError(f"bad gzip data: {e}") from None
            self.tail = self.d.unconsumed_tail
            if self.d.eof:           # next member (or padding / end)
                rest = self.d.unused_data
                self.d = zlib.decompressobj(31)
                self.fed = False
                self.tail = rest
            if out:
                return out
        return b""

    @staticmethod
    def d_is_padding(inp: bytes) -> bool:
        return not inp.strip(b"\0")


XZ_MAGIC = b"\xfd7zXZ\x00"
LZIP_MAGIC = b"LZIP"


def is_lzma_alone(head: bytes) -> bool:
    """The header of a .lzma (LZMA_Alone) stream: the properties byte mkfs.erofs's and
    xz's encoders write (lc=3, lp=0, pb=2) and a power-of-two dictionary from 4 KiB."""
    if len(head) < 5 or head[0] != 0x5D:
        return False
    d = int.from_bytes(head[1:5], "little")
    return d >= 4096 and d & (d - 1) == 0


class _Unxz:
    """read(n) -> up to n decompressed bytes of xz streams (concatenated, with stream
    padding) or one .lzma stream (--unxz, as mkfs.erofs's liblzma auto decoder)."""

    def __init__(self, f: ReadStream, alone: bool = False) -> None:
        import lzma
        self.lzma = lzma
        self.fmt = lzma.FORMAT_ALONE if alone else lzma.FORMAT_XZ
        self.f = f
        self.d = lzma.LZMADecompressor(self.fmt)
        self.tail = b""
        self.fed = False
        self.done = False

    def read(self, n: int) -> bytes:
        n = max(n, 1)
        while not self.done:
            if self.d.needs_input or not self.fed:
                inp = self.tail or self.f.read(256 << 10)
                self.tail = b""
                if not inp:
                    if self.fed:
                        raise InputError("truncated xz/lzma stream")
                    self.done = True
                    break
                if not self.fed and self.fmt == self.lzma.FORMAT_XZ:
                    inp = inp.lstrip(b"\0")      # stream padding between xz streams
                    if not inp:
                        continue
                self.fed = True
            else:
                inp = b""
            try:
                out = self.d.decompress(inp, n)
            except self.lzma.LZMAError as e:
                raise InputError(f"bad xz/lzma data: {e}") from None
            if self.d.eof:            # (all its output given: liblzma ends after it)
                if self.fmt == self.lzma.FORMAT_XZ:
                    self.tail = self.d.unused_data
                    self.d = self.lzma.LZMADecompressor(self.fmt)
                    self.fed = False
                else:
                    self.done = True      # one .lzma stream; what follows is ignored
            if out:
                return out
        return b""


class _Unzstd:
    def __init__(self, f: ReadStream) -> None:
        import zstandard
        # any object with read() will do; the stubs ask for IO[bytes]
        self.r = zstandard.ZstdDecompressor().stream_reader(
            f, read_across_frames=True)  # type: ignore[arg-type]

    def read(self, n: int) -> bytes:
        try:
            return self.r.read(max(n, 1))
        except Exception as e:        # zstandard.ZstdError
            raise InputError(f"bad zstd data: {e}") from None


def put_while_read(q: queue.Queue, item: object, stop: threading.Event) -> None:
    """Queue `item` from a producer thread, waiting for room as long as the consumer
    may still read it (`stop` set: it has gone, and the item is dropped)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.2)
            return
        except queue.Full:
            continue


def stop_reader(q: queue.Queue, stop: threading.Event, t: threading.Thread,
                timeout: float | None = None) -> None:
    """Stop the producer thread `t` that feeds `q` through put_while_read: `stop` set,
    what it queued dropped (a put it is waiting on returns), then wait for it."""
    stop.set()
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass
    t.join(timeout)


class _Prefetch:
    """Run a decompressing stream on its own thread (zlib and zstd release the GIL), a
    few 1 MiB pieces ahead of the parser; read(n) -> up to n bytes."""

    PIECE = 1 << 20

    def __init__(self, inner: ReadStream, depth: int = 8) -> None:
        import threading
        # pieces of the stream, b"" at its end, or the exception that stopped the thread
        self.q: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=depth)
        self.buf = b""
        self.pos = 0
        self.done = False
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, args=(inner,), daemon=True,
                                  name="erofs-untar-inflate")
        self.t.start()

    def _put(self, item: bytes | BaseException) -> None:
        put_while_read(self.q, item, self.stop)

    def _run(self, inner: ReadStream) -> None:
        try:
            while not self.stop.is_set():
                piece = inner.read(self.PIECE)
                self._put(piece)
                if not piece:
                    return
        except BaseException as e:
            # waits like a piece: an error given up on (the queue full for a while,
            # the parser busy) left the parser blocked on an empty queue for ever
            self._put(e)

    def read(self, n: int) -> bytes:
        if self.pos >= len(self.buf):
            if self.done:
                return b""
            item = self.q.get()
            if isinstance(item, BaseException):
                self.done = True
                if isinstance(item, ErofsToolsError):
                    raise item
                raise InputError(f"cannot read the tar stream: {item}") from None
            if not item:
                self.done = True
                return b""
            self.buf, self.pos = item, 0
        out = self.buf[self.pos:self.pos + n] if (self.pos or n < len(self.buf)) else self.buf
        self.pos += len(out)
        return out

    def close(self) -> None:
        # waits for the thread: after close() the caller may read the underlying stream
        # itself (convert reads the rest of a layer to check its digest)
        stop_reader(self.q, self.stop, self.t)


def drain(stream: ReadStream, budget: int) -> None:
    """Read `stream` to its end, at most `budget` more bytes (what --max-size leaves):
    the parser stops at the tar's end-of-archive record, but a compressed stream's
    checks come after it (gzip CRC-32 and size, xz block checks and index, zstd frame
    checksums), so data corrupted inside the tar is caught only by reading on (as GNU
    tar reads the rest of its pipe and containerd the rest of a layer)."""
    while True:
        piece = stream.read(1 << 20)
        if not piece:
            return
        budget -= len(piece)
        if budget < 0:
            raise InputError("tar stream is larger than the limit (--max-size)")


def detect_type(head: bytes) -> str:
    if head[:2] == b"\x1f\x8b":
        return "targz"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "tarzst"
    return "tar"


class _Peek:
    """A raw binary stream with its first bytes peeked (for type detection)."""

    def __init__(self, f: BinaryIO, n: int = 4) -> None:
        self.f = f
        try:
            self.head = f.read(n)
        except OSError as e:
            raise InputError(f"cannot read the tar stream: {e.strerror or e}") from None

    def read(self, n: int = -1) -> bytes:
        if self.head:
            h, self.head = self.head, b""
            if n is None or n < 0:
                return h + self.f.read()
            if n <= len(h):
                self.head = h[n:]
                return h[:n]
            return h + self.f.read(n - len(h))
        return self.f.read(n)


def open_stream(f: BinaryIO, source_type: str = "auto") -> ReadStream:
    """Wrap a raw binary stream by type -> object with read(n)."""
    if source_type not in SOURCE_TYPES:
        raise InputError(f"unknown source type {source_type!r}")
    stream: ReadStream = f
    if source_type == "auto":
        stream = peek = _Peek(f)
        source_type = detect_type(peek.head)
    elif source_type == "tar":
        stream = peek = _Peek(f)
        kind = detect_type(peek.head)
        if kind != "tar":
            raise InputError(f"input is {'gzip' if kind == 'targz' else 'zstd'}-compressed: "
                             f"use --type {kind}")
    if source_type == "targz":
        return _Prefetch(_Gunzip(stream))
    if source_type == "tarzst":
        return _Prefetch(_Unzstd(stream))
    return stream


def open_source(source: str | bytes | os.PathLike[str] | os.PathLike[bytes]
                ) -> tuple[BinaryIO, Callable[[], None]]:
    """SOURCE path or '-' -> (raw binary stream, closer)."""
    if source == "-" or source == b"-":
        return sys.stdin.buffer, (lambda: None)
    try:
        f = open(source, "rb")
    except OSError as e:
        raise InputError(f"{os.fsdecode(source)}: {e.strerror}") from None
    return f, f.close
