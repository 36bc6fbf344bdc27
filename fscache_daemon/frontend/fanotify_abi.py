"""fanotify(7) pre-content ABI: constants, ctypes bindings, event parsing, responses.

Only what the FAN_PRE_ACCESS front end needs (Linux 6.14+). Values come from the uapi
header as documented in the project's fanotify reference; glibc provides the wrappers, so
no raw syscall numbers are used. Nothing here knows about blobs, keys or threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import resource
import struct
from dataclasses import dataclass

from fscache_daemon.errors import FanotifyUnsupportedError, FrontendError

log = logging.getLogger(__name__)

# fanotify_init flags
FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_NOTIF = 0x0
FAN_CLASS_CONTENT = 0x4
FAN_CLASS_PRE_CONTENT = 0x8
# FAN_UNLIMITED_QUEUE (0x10) is deliberately not offered: the bounded queue is a safety valve.

# fanotify_mark flags (FAN_MARK_INODE is 0)
FAN_MARK_ADD = 0x1
FAN_MARK_REMOVE = 0x2
FAN_MARK_FLUSH = 0x80

# event masks
FAN_ACCESS_PERM = 0x20000
FAN_PRE_ACCESS = 0x100000
FAN_Q_OVERFLOW = 0x4000

FANOTIFY_METADATA_VERSION = 3
FAN_EVENT_INFO_TYPE_RANGE = 6

FAN_ALLOW = 0x1
FAN_DENY = 0x2
FAN_NOFD = -1
AT_FDCWD = -100


def FAN_DENY_ERRNO(err: int) -> int:  # noqa: N802 - mirrors the uapi macro name
    """A deny response that makes the reader's syscall fail with `err` (6.14+)."""
    return FAN_DENY | ((err & 0xFF) << 24)


RESPONSE_EIO = FAN_DENY_ERRNO(errno.EIO)

# struct fanotify_event_metadata: u32 event_len, u8 vers, u8 reserved, u16 metadata_len,
# u64 mask, s32 fd, s32 pid
_METADATA = struct.Struct("=IBBHQii")
METADATA_LEN = _METADATA.size  # 24
# info record header: u8 info_type, u8 pad, u16 len
_INFO_HDR = struct.Struct("=BBH")
# range record: header, u32 pad, u64 offset, u64 count (24 bytes; only this form is trusted)
_RANGE = struct.Struct("=BBHIQQ")
# struct fanotify_response: s32 fd, u32 response
_RESPONSE = struct.Struct("=iI")

# Big enough for a burst of events in one read(2) (each event is 48 bytes with its range).
READ_BUFFER_SIZE = 64 * 1024

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_init.restype = ctypes.c_int
# the mask is 64-bit on every ABI; declaring it keeps ctypes from truncating it
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                ctypes.c_char_p]
_libc.fanotify_mark.restype = ctypes.c_int


def fanotify_init(flags: int = FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC,
                  event_f_flags: int = os.O_RDWR | os.O_LARGEFILE) -> int:
    """Create a fanotify group; returns its fd. O_RDWR event fds let fills write through them."""
    fd = _libc.fanotify_init(flags, event_f_flags)
    if fd >= 0:
        return fd
    err = ctypes.get_errno()
    if err == errno.EPERM:
        raise FrontendError("fanotify_init: pre-content groups need CAP_SYS_ADMIN")
    if err in (errno.EINVAL, errno.ENOSYS):
        raise FanotifyUnsupportedError(
            f"fanotify_init: kernel lacks pre-content fanotify ({os.strerror(err)})")
    raise FrontendError(f"fanotify_init: {os.strerror(err)}")


def fanotify_mark(group_fd: int, flags: int, mask: int, target: str | os.PathLike | int,
                  name: str | None = None) -> None:
    """fanotify_mark(2) on an inode, by path or by an open fd (int).

    By fd, the mark lands on exactly the inode that fd has open, so a file replaced at
    the same path in between cannot be marked by mistake. `name` is for messages.
    """
    if isinstance(target, int):
        dirfd, p = target, None
        label = name or f"fd {target}"
    else:
        dirfd, p = AT_FDCWD, os.fsencode(os.path.abspath(target))
        label = name or os.fsdecode(p)
    if _libc.fanotify_mark(group_fd, flags, mask, dirfd, p) == 0:
        return
    err = ctypes.get_errno()
    what = "remove mark" if flags & FAN_MARK_REMOVE else "mark"
    # filesystems that do not opt in to HSM events refuse the mark; the errno varies
    if flags & FAN_MARK_ADD and err in (errno.EINVAL, errno.EOPNOTSUPP, errno.EXDEV,
                                        errno.ENOTSUP):
        raise FanotifyUnsupportedError(
            f"{label}: cannot {what} for pre-content events ({os.strerror(err)});"
            " cache files must be on ext4, XFS or btrfs")
    raise FrontendError(f"{label}: fanotify {what} failed: {os.strerror(err)}")


def mark_pre_access(group_fd: int, target: str | os.PathLike | int,
                    name: str | None = None) -> None:
    fanotify_mark(group_fd, FAN_MARK_ADD, FAN_PRE_ACCESS, target, name)


def unmark_pre_access(group_fd: int, target: str | os.PathLike | int,
                      name: str | None = None) -> None:
    fanotify_mark(group_fd, FAN_MARK_REMOVE, FAN_PRE_ACCESS, target, name)


@dataclass(frozen=True)
class RawEvent:
    """One event as the kernel reported it. `fd` is an open fd owned by the reader."""
    fd: int
    mask: int
    pid: int
    offset: int | None = None  # from the range record; None if the record is missing
    count: int | None = None

    @property
    def overflow(self) -> bool:
        return bool(self.mask & FAN_Q_OVERFLOW)


def parse_events(buf: bytes | memoryview) -> list[RawEvent]:
    """Walk the events of one read(2).

    A bad version or event length means the stream cannot be walked any further: that
    raises FrontendError and the caller must treat the group as broken (a correct kernel
    never does this). A broken info record only drops that event's range, so the event
    still gets answered (denied) and its fd closed.
    """
    events = []
    off = 0
    while off < len(buf):
        if len(buf) - off < METADATA_LEN:
            raise FrontendError(f"fanotify: truncated event metadata ({len(buf) - off} bytes)")
        event_len, vers, _, meta_len, mask, fd, pid = _METADATA.unpack_from(buf, off)
        if vers != FANOTIFY_METADATA_VERSION:
            raise FrontendError(f"fanotify: unsupported metadata version {vers}")
        if event_len < METADATA_LEN or off + event_len > len(buf) or not (
                METADATA_LEN <= meta_len <= event_len):
            raise FrontendError(f"fanotify: malformed event (event_len {event_len}, "
                                f"metadata_len {meta_len})")
        offset = count = None
        pos, end = off + meta_len, off + event_len
        while pos + _INFO_HDR.size <= end:
            info_type, _, rec_len = _INFO_HDR.unpack_from(buf, pos)
            if rec_len < _INFO_HDR.size or pos + rec_len > end:
                log.warning("fanotify: bad info record length %d; ignoring the rest", rec_len)
                break
            if info_type == FAN_EVENT_INFO_TYPE_RANGE:
                if rec_len == _RANGE.size:
                    _, _, _, _, offset, count = _RANGE.unpack_from(buf, pos)
                else:
                    log.warning("fanotify: range record of %d bytes ignored", rec_len)
            pos += rec_len
        events.append(RawEvent(fd, mask, pid, offset, count))
        off += event_len
    return events


def encode_response(event_fd: int, response: int) -> bytes:
    return _RESPONSE.pack(event_fd, response)


def write_response(group_fd: int, event_fd: int, response: int) -> bool:
    """Answer one permission event. Returns False if the kernel no longer knows the event.

    ENOENT means no pending event has that fd number (already answered); the caller
    must still close its fd. Other errors are real failures.
    """
    try:
        os.write(group_fd, _RESPONSE.pack(event_fd, response))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise FrontendError(f"fanotify: writing response for fd {event_fd}: "
                            f"{exc.strerror}") from exc
    return True


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one: every in-flight event pins an fd."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise RLIMIT_NOFILE to %d: %s", hard, exc)
    return soft
