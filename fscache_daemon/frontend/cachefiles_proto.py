"""The cachefiles on-demand wire protocol (/dev/cachefiles), without any threads.

Pure Python and kernel-independent, so it is unit-tested on hosts without the device
from message bytes built by `build_*` below (the layouts of the uapi header, see
docs/cachefiles.md). `CachefilesDevice` wraps the device fd: the text commands written to
it and the one-message-per-read() requests read from it.

Message layout (little-endian on x86-64; native byte order in general):

    header  msg_id u32 | opcode u32 | len u32 | object_id u32          (16 bytes)
    OPEN    volume_key_size u32 | cookie_key_size u32 | fd u32 | flags u32 | keys...
    CLOSE   (header only)
    READ    off u64 | len u64
"""
from __future__ import annotations

import errno
import os
import select
import struct
from dataclasses import dataclass

from fscache_daemon.errors import CachefilesProtocolError

DEVICE_PATH = "/dev/cachefiles"

OP_OPEN = 0
OP_CLOSE = 1
OP_READ = 2
OP_NAMES = {OP_OPEN: "OPEN", OP_CLOSE: "CLOSE", OP_READ: "READ"}

MSG_MAX_SIZE = 1024          # a read() buffer must hold at least this much
HEADER = struct.Struct("=IIII")
OPEN_BODY = struct.Struct("=IIII")
READ_BODY = struct.Struct("=QQ")
HEADER_SIZE = HEADER.size    # 16
OPEN_FIXED = HEADER_SIZE + OPEN_BODY.size   # 32
READ_SIZE = HEADER_SIZE + READ_BODY.size    # 32


def _iow(type_, nr, size):
    # _IOC(dir=_IOC_WRITE(1), type, nr, size): dir<<30 | size<<16 | type<<8 | nr
    return (1 << 30) | (size << 16) | (type_ << 8) | nr


# _IOW(0x98, 1, int): the argument is the msg_id itself, passed by value.
IOC_READ_COMPLETE = _iow(0x98, 1, 4)
assert IOC_READ_COMPLETE == 0x40049801

COMMAND_MAX = 4095           # one write(), at most PAGE_SIZE - 1 bytes


# A message from the kernel that does not follow the layout (a bug or a new kernel); the
# class lives with the daemon's other errors
ProtocolError = CachefilesProtocolError


@dataclass(frozen=True)
class OpenMsg:
    msg_id: int
    object_id: int
    volume_key: str      # without the trailing NUL, e.g. "erofs,mydomain"
    cookie_key: str      # e.g. the fsid (bootstrap) or a blob id (device tag)
    fd: int              # anon fd, already installed in our fd table
    flags: int

    opcode = OP_OPEN

    @property
    def volume_name(self) -> str:
        """The domain or fsid part of an EROFS volume key ("erofs,<name>")."""
        prefix, sep, name = self.volume_key.partition(",")
        return name if sep and prefix == "erofs" else self.volume_key


@dataclass(frozen=True)
class ReadMsg:
    msg_id: int
    object_id: int
    off: int
    len: int

    opcode = OP_READ


@dataclass(frozen=True)
class CloseMsg:
    msg_id: int
    object_id: int

    opcode = OP_CLOSE


def _key(raw: bytes) -> str:
    # Keys are arbitrary bytes for fscache; EROFS ones are ASCII. Keep any odd byte
    # visible instead of failing: a lookup with such a key simply finds nothing.
    return raw.decode("utf-8", "backslashreplace")


def parse_message(buf: bytes | bytearray | memoryview):
    """Decode one message as returned by a single read() of the device."""
    buf = bytes(buf)
    if len(buf) < HEADER_SIZE:
        raise ProtocolError(f"cachefiles message truncated: {len(buf)} bytes")
    msg_id, opcode, length, object_id = HEADER.unpack_from(buf, 0)
    if length != len(buf):
        raise ProtocolError(
            f"cachefiles message {msg_id}: len field {length} but read returned {len(buf)}")
    if opcode == OP_OPEN:
        if length < OPEN_FIXED:
            raise ProtocolError(f"cachefiles OPEN {msg_id} truncated: {length} bytes")
        vsize, csize, fd, flags = OPEN_BODY.unpack_from(buf, HEADER_SIZE)
        if OPEN_FIXED + vsize + csize != length:
            raise ProtocolError(
                f"cachefiles OPEN {msg_id}: keys {vsize}+{csize} do not fill {length} bytes")
        vkey = buf[OPEN_FIXED:OPEN_FIXED + vsize]
        ckey = buf[OPEN_FIXED + vsize:OPEN_FIXED + vsize + csize]
        # volume_key_size counts the NUL; cookie_key_size does not.
        vkey = vkey.split(b"\0", 1)[0]
        return OpenMsg(msg_id, object_id, _key(vkey), _key(ckey), fd, flags)
    if opcode == OP_READ:
        if length != READ_SIZE:
            raise ProtocolError(f"cachefiles READ {msg_id}: len {length}, expected {READ_SIZE}")
        off, ln = READ_BODY.unpack_from(buf, HEADER_SIZE)
        return ReadMsg(msg_id, object_id, off, ln)
    if opcode == OP_CLOSE:
        if length != HEADER_SIZE:
            raise ProtocolError(f"cachefiles CLOSE {msg_id}: len {length}, expected 16")
        return CloseMsg(msg_id, object_id)
    raise ProtocolError(f"cachefiles message {msg_id}: unknown opcode {opcode}")


# --- builders: the kernel's side, for tests and recorded vectors ------------------------
def build_open(msg_id, object_id, volume_key: bytes, cookie_key: bytes, fd, flags=0):
    vkey = volume_key + b"\0"
    length = OPEN_FIXED + len(vkey) + len(cookie_key)
    return (HEADER.pack(msg_id, OP_OPEN, length, object_id)
            + OPEN_BODY.pack(len(vkey), len(cookie_key), fd, flags) + vkey + cookie_key)


def build_read(msg_id, object_id, off, length):
    return HEADER.pack(msg_id, OP_READ, READ_SIZE, object_id) + READ_BODY.pack(off, length)


def build_close(msg_id, object_id):
    return HEADER.pack(msg_id, OP_CLOSE, HEADER_SIZE, object_id)


# --- commands -------------------------------------------------------------------------
def format_command(verb: str, *args) -> bytes:
    text = verb if not args else verb + " " + " ".join(str(a) for a in args)
    raw = text.encode()
    if b"\0" in raw or b"\n" in raw:
        raise ValueError(f"cachefiles command must be one line without NUL: {text!r}")
    if len(raw) > COMMAND_MAX:
        raise ValueError(f"cachefiles command longer than {COMMAND_MAX} bytes: {text[:60]!r}")
    return raw


def format_copen(msg_id: int, size_or_errno: int) -> bytes:
    """`copen <id>,<size>`; a negative value (-errno) fails the OPEN."""
    return format_command("copen", f"{int(msg_id)},{int(size_or_errno)}")


class CachefilesDevice:
    """The /dev/cachefiles fd: commands (write) and requests (read).

    Thread safety: read_message() from one poller thread; command writes are single
    write() calls and may come from any thread.
    """

    def __init__(self, fd: int, path: str = DEVICE_PATH):
        self.fd = fd
        self.path = path

    @classmethod
    def open(cls, path: str = DEVICE_PATH) -> CachefilesDevice:
        # Opening fails with ENOENT (no CONFIG_CACHEFILES), EBUSY (cachefilesd or another
        # daemon holds it) or EPERM (needs CAP_SYS_ADMIN); callers turn these into errors.
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        return cls(fd, path)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def command(self, verb: str, *args) -> None:
        self.write_raw(format_command(verb, *args))

    def write_raw(self, raw: bytes) -> None:
        n = os.write(self.fd, raw)
        if n != len(raw):   # the kernel either consumes a command whole or fails it
            raise OSError(errno.EIO, f"short write of cachefiles command {raw[:40]!r}")

    # setup
    def set_dir(self, path: str) -> None:
        self.command("dir", path)

    def set_tag(self, tag: str) -> None:
        self.command("tag", tag)

    def bind_ondemand(self) -> None:
        self.command("bind", "ondemand")

    def restore(self) -> None:
        self.command("restore")

    # replies
    def copen(self, msg_id: int, size_or_errno: int) -> None:
        self.write_raw(format_copen(msg_id, size_or_errno))

    # requests
    def read_message(self):
        """One parsed message, or None when nothing is pending (read() returned 0/EAGAIN)."""
        try:
            buf = os.read(self.fd, MSG_MAX_SIZE)
        except BlockingIOError:
            return None
        if not buf:
            return None
        return parse_message(buf)

    def wait(self, timeout: float | None) -> bool:
        """Block until a request may be pending (POLLIN) or the timeout passes."""
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        ms = None if timeout is None else max(0, int(timeout * 1000))
        while True:
            try:
                events = p.poll(ms)
            except InterruptedError:
                continue
            return any(ev & select.POLLIN for _, ev in events)


def complete_read(anon_fd: int, msg_id: int) -> None:
    """ioctl(CACHEFILES_IOC_READ_COMPLETE) on the object's anon fd; the kernel then checks
    the cache file and fails the reader with EIO if the range is still a hole."""
    import fcntl
    fcntl.ioctl(anon_fd, IOC_READ_COMPLETE, msg_id)
