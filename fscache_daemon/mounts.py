"""mount(2) and umount2(2) for the daemon's front ends, and what /proc and /sys say about
EROFS mounts (and a thread's kernel name, prctl(2)). One libc binding for the whole daemon; errors are OSError with the errno,
which the callers turn into their own messages."""
from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MNT_DETACH = 0x2
PR_SET_NAME = 15
# FS_IOC_GETFSSYSFSPATH (Linux 6.10+): _IOR(0x15, 1, struct fs_sysfs_path), that struct
# being one length byte and 128 name bytes; it answers "<fs type>/<sysfs name>"
_SYSFS_PATH_SIZE = 1 + 128
FS_IOC_GETFSSYSFSPATH = (2 << 30) | (_SYSFS_PATH_SIZE << 16) | (0x15 << 8) | 1
_libc = None


def _libc_handle():
    global _libc
    if _libc is None:
        try:
            # glibc's soname, without find_library: that runs `ldconfig -p` in a child
            # process (~3-7 ms, more after the page cache was dropped), and the first
            # call came inside a mount, just before mount(2)
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
        except OSError:
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
        libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        _libc = libc
    return _libc


def load_libc() -> None:
    """Bind libc now (the daemon's start), not in the first mount."""
    _libc_handle()


def name_thread(name: str) -> None:
    """Give the calling thread `name` in the kernel (/proc/PID/task/TID/comm, top -H):
    Python's thread names are its own. Best effort."""
    try:
        _libc_handle().prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    if _libc_handle().mount(os.fsencode(source), os.fsencode(target), fstype.encode(),
                            flags, data.encode()) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def umount(target: str, lazy: bool = False) -> None:
    if _libc_handle().umount2(os.fsencode(target), MNT_DETACH if lazy else 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _unescape_mountinfo(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""
    mount_id: int
    parent_id: int
    dev: str            # major:minor of the superblock
    mountpoint: str
    fstype: str
    source: str


def mountinfo() -> list[MountEntry]:
    """Every mount of this process's mount namespace, in the kernel's order."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                pre, _, post = line.partition(" - ")
                fields, pfields = pre.split(), post.split()
                if len(fields) < 5 or not pfields:
                    continue
                out.append(MountEntry(int(fields[0]), int(fields[1]), fields[2],
                                      _unescape_mountinfo(fields[4]), pfields[0],
                                      _unescape_mountinfo(pfields[1]) if len(pfields) > 1
                                      else ""))
    except (OSError, ValueError):
        pass
    return out


def top_mount(path: str, entries: list[MountEntry] | None = None) -> MountEntry | None:
    """The mount a lookup of `path` (canonical) lands on: of the mounts stacked on that
    path, the one no other mount there sits on."""
    here = [e for e in (entries if entries is not None else mountinfo())
            if e.mountpoint == path]
    parents = {e.parent_id for e in here}
    tops = [e for e in here if e.mount_id not in parents]
    return tops[-1] if tops else None


def find_mount(mount_id: int, entries: list[MountEntry] | None = None) -> MountEntry | None:
    for e in entries if entries is not None else mountinfo():
        if e.mount_id == mount_id:
            return e
    return None


def mounted_erofs() -> dict[str, str]:
    """{mount point: source} of every EROFS mount in this namespace."""
    return {e.mountpoint: e.source for e in mountinfo() if e.fstype == "erofs"}


def erofs_instances() -> set[str]:
    """Names of the live EROFS superblocks (/sys/fs/erofs/<name>): s_id (also the bdi
    name, "erofs-N", never reused within a boot) for file-backed mounts, "[domain,]fsid"
    in fscache mode. The entry exists from fill_super to put_super, whichever mounts
    (other namespaces, overlayfs' private clones, lazily detached ones) hold it, so it
    says whether the kernel may still read the superblock's blob files."""
    try:
        return {n for n in os.listdir("/sys/fs/erofs") if n != "features"}
    except OSError:
        return set()


def erofs_instance_of(path: str) -> str | None:
    """The /sys/fs/erofs/<name> of the EROFS superblock mounted at `path` (its root),
    as the kernel names it for that very superblock (FS_IOC_GETFSSYSFSPATH): exact even
    when other EROFS mounts are made at the same moment, which a before/after diff of
    erofs_instances() is not. None where the kernel cannot say (before 6.10, or an EROFS
    that does not name its sysfs entry there), or if `path` is no EROFS root: the caller
    falls back to the diff."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        buf = bytearray(_SYSFS_PATH_SIZE)
        fcntl.ioctl(fd, FS_IOC_GETFSSYSFSPATH, buf)
    except OSError:
        return None
    finally:
        os.close(fd)
    fstype, _, name = bytes(buf[1:1 + buf[0]]).decode(errors="replace").partition("/")
    # a kernel whose sysfs entry and ioctl name differ (the ioctl came to EROFS in a
    # release after its sysfs entries) must not be trusted: the name must be a live one
    if fstype != "erofs" or not name or name not in erofs_instances():
        return None
    return name


def get_readahead(instance: str) -> int | None:
    """The kernel readahead window (KiB) of one EROFS instance, or None if unknown."""
    try:
        with open(f"/sys/class/bdi/{instance}/read_ahead_kb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def set_readahead(instance: str, kb: int) -> None:
    """Set the kernel readahead window of one EROFS instance (best effort)."""
    try:
        with open(f"/sys/class/bdi/{instance}/read_ahead_kb", "w") as f:
            f.write(f"{kb}\n")
    except OSError as e:
        log.debug("%s: cannot set read_ahead_kb: %s", instance, e)
